"""Muon's matrix views: stacks of matrices (``batched``), row blocks (``split``, ``heads``).

The reference for every view is plain Muon run on the blocks as separate
parameters (one process, float64): a fused weight with its view must follow the
same trajectory — momentum, Nesterov, weight decay, per-block lr scale and
spectral-ball projection included.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from steepest.optim import MatrixView, Muon, NorMuon, muon_param_groups, orthogonalize_blocks
from steepest.optim.muon import muon_step

KW = dict(lr=0.05, weight_decay=0.1, momentum=0.9, ns_dtype=torch.float64)


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _fused(W0, grads, **kw):
    W = nn.Parameter(W0.clone())
    opt = Muon([W], **kw)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W.detach()


def _separate(blocks0, grads, cut, **kw):
    """Plain Muon on each block as its own parameter; ``cut(G)`` gives the blocks of a gradient."""
    ps = [nn.Parameter(b.clone()) for b in blocks0]
    opt = Muon(ps, **kw)
    for G in grads:
        for p, g in zip(ps, cut(G)):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def _svals(M):
    return np.linalg.svd(M.detach().double().numpy(), compute_uv=False)


# -- split --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(4, 4, 4), (6, 2, 2)])  # equal blocks (MHA's QKV) and GQA-like ones
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_split_equals_separate_blocks(sizes, nesterov, adjust):
    torch.manual_seed(0)
    W0 = torch.randn(sum(sizes), 5, dtype=torch.float64) * 0.3
    grads = _grads(W0.shape, 4)
    kw = dict(KW, nesterov=nesterov, adjust_lr_fn=adjust, max_spectral_norm=0.8)
    fused = _fused(W0, grads, split=sizes, **kw)
    ref = _separate(W0.split(sizes), grads, lambda G: G.split(sizes), **kw)
    torch.testing.assert_close(fused, torch.cat(ref), rtol=0, atol=1e-12)
    plain = _fused(W0, grads, **kw)  # the whole matrix takes another path: the test can tell
    assert (plain - fused).abs().max() > 1e-2


def test_split_blocks_get_their_own_lr_scale_and_orthogonal_step():
    # one step, momentum 0, exact msign: block b moves by lr·0.2·√max(m_b, N)·U_b V_bᵀ
    torch.manual_seed(1)
    sizes, N, lr = (6, 2, 2), 4, 0.1
    W0 = torch.randn(sum(sizes), N, dtype=torch.float64)
    G = torch.randn(sum(sizes), N, dtype=torch.float64)
    W = _fused(W0, [G], split=sizes, lr=lr, momentum=0.0, schedule="svd", adjust_lr_fn="match_rms_adamw")
    for (w0, w, g) in zip(W0.split(sizes), W.split(sizes), G.split(sizes)):
        step = (w0 - w) / (lr * 0.2 * max(w.shape) ** 0.5)
        np.testing.assert_allclose(_svals(step), 1.0, atol=1e-10)
        U, _, Vt = torch.linalg.svd(g, full_matrices=False)
        torch.testing.assert_close(step, U @ Vt, rtol=0, atol=1e-10)


# -- heads --------------------------------------------------------------------------------------
def test_heads_equal_separate_blocks():
    torch.manual_seed(2)
    W0 = torch.randn(12, 6, dtype=torch.float64)
    grads = _grads(W0.shape, 3)
    fused = _fused(W0, grads, heads=4, **KW)
    ref = _separate(W0.split(3), grads, lambda G: G.split(3), **KW)
    torch.testing.assert_close(fused, torch.cat(ref), rtol=0, atol=1e-12)


def test_split_and_heads_combine():
    # fused QKV with per-head blocks: Q, K, V each cut into 2 heads
    torch.manual_seed(3)
    W0 = torch.randn(12, 5, dtype=torch.float64)
    grads = _grads(W0.shape, 3)
    fused = _fused(W0, grads, split=(4, 4, 4), heads=2, **KW)
    ref = _separate(W0.split(2), grads, lambda G: G.split(2), **KW)
    torch.testing.assert_close(fused, torch.cat(ref), rtol=0, atol=1e-12)
    assert (fused - _fused(W0, grads, split=(4, 4, 4), **KW)).abs().max() > 1e-2


# -- batched ------------------------------------------------------------------------------------
def test_batched_stack_equals_separate_matrices():
    torch.manual_seed(4)
    W0 = torch.randn(2, 3, 6, 4, dtype=torch.float64)  # 6 matrices of 6 × 4 (tall: scale √(6/4))
    grads = _grads(W0.shape, 3)
    kw = dict(KW, max_spectral_norm=1.5)
    fused = _fused(W0, grads, batched=True, **kw)
    ref = _separate(W0.reshape(6, 6, 4).unbind(0), grads, lambda G: G.reshape(6, 6, 4).unbind(0), **kw)
    torch.testing.assert_close(fused, torch.stack(ref).reshape(W0.shape), rtol=0, atol=1e-12)
    flat = _fused(W0, grads, **kw)  # default: one (2, 72) matrix, as for conv weights
    ref_flat = _separate([W0.reshape(2, 72)], grads, lambda G: [G.reshape(2, 72)], **kw)[0]
    torch.testing.assert_close(flat, ref_flat.reshape(W0.shape), rtol=0, atol=1e-12)
    assert (flat - fused).abs().max() > 1e-2


def test_batched_with_split():
    torch.manual_seed(5)
    W0 = torch.randn(3, 6, 4, dtype=torch.float64)
    grads = _grads(W0.shape, 2)
    fused = _fused(W0, grads, batched=True, split=(4, 2), **KW)
    cut = lambda G: [b for m in G.unbind(0) for b in m.split((4, 2))]  # noqa: E731
    ref = _separate(cut(W0), grads, cut, **KW)
    got = cut(fused)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_max_spectral_norm_is_per_block():
    torch.manual_seed(6)
    W = nn.Parameter(torch.randn(3, 8, 5, dtype=torch.float64) * 3)
    W.grad = torch.zeros_like(W)  # zero step: only the projection acts
    Muon([W], lr=0.1, batched=True, split=(4, 4), max_spectral_norm=0.5).step()
    for m in W.detach().unbind(0):
        for blk in m.split(4):
            assert _svals(blk)[0] == pytest.approx(0.5, rel=1e-9)
    whole = nn.Parameter(torch.randn(3, 8, 5, dtype=torch.float64) * 3)
    whole.grad = torch.zeros_like(whole)
    Muon([whole], lr=0.1, max_spectral_norm=0.5).step()
    assert _svals(whole.detach().reshape(3, 40))[0] == pytest.approx(0.5, rel=1e-9)
    assert max(_svals(b)[0] for m in whole.detach().unbind(0) for b in m.split(4)) < 0.45


# -- state, groups, errors -------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=8, h=2):
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.experts = nn.Parameter(torch.randn(3, d, d) * 0.2)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, 11)

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        y = torch.einsum("btd,edf->btf", a, self.experts) + self.mlp(a)
        return self.head(torch.tanh(y))


def test_param_groups_mark_fused_weights_and_resume_bit_exact():
    torch.manual_seed(0)
    model = Block()
    groups = muon_param_groups(model, blocks={"qkv": (8, 8, 8), model.experts: {"batched": True}})
    kinds = [(g["use_muon"], g.get("split"), g.get("batched"), [tuple(p.shape) for p in g["params"]])
             for g in groups]
    # the module's own parameter (experts) comes first in model.parameters()
    assert kinds == [(True, None, None, [(8, 8)]), (True, None, True, [(3, 8, 8)]),
                     (True, (8, 8, 8), None, [(24, 8)]), (False, None, None, [(11, 8), (8,), (11, 8), (11,)])]
    idx = torch.randint(0, 11, (4, 7))

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(idx).square().mean().backward()
            o.step()

    opt = Muon(groups, lr=0.03, weight_decay=0.01, max_spectral_norm=3.0)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = Block()
    model2.load_state_dict(saved["model"])
    opt2 = Muon(muon_param_groups(model2, blocks={"qkv.weight": (8, 8, 8), "experts": {"batched": True}}), lr=0.5)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[2]["split"] == (8, 8, 8) and opt2.param_groups[1]["batched"] is True
    train(model2, opt2, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_param_groups_auto_marks_multihead_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 3))
    groups = muon_param_groups(model, blocks="auto")
    marked = [g for g in groups if g.get("split")]
    assert len(marked) == 1 and marked[0]["split"] == (8, 8, 8)
    assert marked[0]["params"][0] is model[1].in_proj_weight
    assert all(p is not model[1].in_proj_weight for g in groups if not g.get("split") for p in g["params"])
    unmarked = muon_param_groups(model)
    assert not any(g.get("split") for g in unmarked)  # the default leaves the fused weight whole


def test_param_groups_blocks_errors():
    model = Block()
    with pytest.raises(ValueError, match="AdamW"):
        muon_param_groups(model, blocks={"head": (5, 6)})
    with pytest.raises(ValueError, match="no parameter or submodule"):
        muon_param_groups(model, blocks={"nope": (8, 8, 8)})
    with pytest.raises(ValueError, match="keys among"):
        muon_param_groups(model, blocks={"qkv": {"rows": 3}})
    with pytest.raises(ValueError, match="not parameters"):
        muon_param_groups(model, blocks={torch.zeros(3, 3): (3,)})
    with pytest.raises(ValueError, match="split"):
        Muon(muon_param_groups(model, blocks={"qkv": (8, 8, 7)}))


def test_views_that_do_not_fit_are_refused_by_name():
    W = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"split=\(3, 2\) adds up to 5 rows.*6 rows"):
        Muon([W], split=(3, 2))
    with pytest.raises(ValueError, match="heads=4 does not divide"):
        Muon([W], heads=4)
    with pytest.raises(ValueError, match="heads"):
        Muon([W], heads=0)
    with pytest.raises(TypeError, match="batched"):
        Muon([W], batched=1)
    with pytest.raises(ValueError, match="split"):
        Muon([W], split=())
    opt = Muon([W])
    with pytest.raises(ValueError, match="does not fit"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(5, 4))], "use_muon": True, "heads": 2})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["split"] = (5, 2)  # changed by hand: caught at the step, before anything moves
    W.grad = torch.randn(6, 4)
    before = W.detach().clone()
    with pytest.raises(ValueError, match="adds up to 7"):
        opt.step()
    assert torch.equal(W.detach(), before)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_zero_size_parameters_with_views(cls):
    # blocks with no columns crashed joining them back ((3, 0) with heads, (2, 3, 0) batched)
    shapes = [(0, 3), (3, 0), (0, 4, 5), (2, 0, 3), (2, 3, 0)]
    ps = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = cls([{"params": ps[:2], "use_muon": True, "heads": 3},
               {"params": ps[2:], "use_muon": True, "batched": True, "max_spectral_norm": 1.0}])
    for _ in range(2):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert [tuple(p.shape) for p in ps] == shapes
    again = cls([{"params": ps[:2], "use_muon": True, "heads": 3},
                 {"params": ps[2:], "use_muon": True, "batched": True, "max_spectral_norm": 1.0}])
    again.load_state_dict(opt.state_dict())


def test_bfloat16_parameters_with_split_keep_float32_momentum():
    torch.manual_seed(7)
    W0 = torch.randn(12, 6)
    grads = [g.float() for g in _grads((12, 6), 3)]
    W = nn.Parameter(W0.bfloat16())
    opt = Muon([W], lr=0.02, split=(4, 4, 4))
    for G in grads:
        W.grad = G.bfloat16()
        opt.step()
    assert opt.state[W]["momentum_buffer"].dtype == torch.float32
    ref = _fused(W0.double(), [G.bfloat16().double() for G in grads], lr=0.02, split=(4, 4, 4))
    assert float((W.detach().double() - ref).abs().max()) < 3e-2


# -- the view itself ------------------------------------------------------------------------------
def test_matrix_view_blocks_and_join_round_trip():
    x = torch.arange(2 * 6 * 3, dtype=torch.float64).reshape(2, 6, 3)
    v = MatrixView(batched=True, split=(4, 2), heads=2)
    assert v.layout(x.shape) == (12, 3, (2, 2, 1, 1) * 2)
    assert v.block_shapes(x.shape)[:4] == [(2, 3), (2, 3), (1, 3), (1, 3)]
    blocks = v.blocks(x)
    assert torch.equal(blocks[4], x[1, :2])
    assert torch.equal(v.join(blocks, x.shape), x)
    assert MatrixView().layout((4, 3, 2, 2)) == (4, 12, (4,))  # the conv flattening
    assert MatrixView(batched=True).layout((5, 7)) == (5, 7, (5,))  # a 2-D tensor is one matrix


def test_orthogonalize_blocks_batches_equal_block_shapes(monkeypatch):
    from steepest import linalg

    calls = []
    real = linalg.msign

    def spy(M, **kw):
        calls.append(tuple(M.shape))
        return real(M, **kw)

    monkeypatch.setattr(linalg, "msign", spy)
    torch.manual_seed(8)
    xs = [torch.randn(12, 5), torch.randn(2, 4, 5), torch.randn(4, 5)]
    views = [MatrixView(split=(4, 4, 4)), MatrixView(batched=True), MatrixView()]
    out = orthogonalize_blocks(xs, views, schedule="svd")
    assert calls == [(6, 4, 5)]  # 3 + 2 + 1 blocks of 4 × 5, one batch
    torch.testing.assert_close(out[0][4:8], linalg.msign(xs[0][4:8], schedule="svd"), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1][1], linalg.msign(xs[1][1], schedule="svd"), rtol=0, atol=1e-6)


def test_functional_core_takes_views():
    torch.manual_seed(9)
    W0 = torch.randn(8, 3, dtype=torch.float64)
    G = torch.randn(8, 3, dtype=torch.float64)
    a, b = W0.clone(), W0.clone()
    muon_step([a], [G], [torch.zeros_like(G)], lr=0.1, ns="svd", views=MatrixView(heads=2))
    top, bottom = W0[:4].clone(), W0[4:].clone()
    muon_step([top, bottom], [G[:4], G[4:]], [torch.zeros(4, 3, dtype=torch.float64) for _ in range(2)], lr=0.1, ns="svd")
    torch.testing.assert_close(a, torch.cat([top, bottom]), rtol=0, atol=1e-12)
    muon_step([b], [G], [torch.zeros_like(G)], lr=0.1, ns="svd")
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="views"):
        muon_step([a], [G], [torch.zeros_like(G)], lr=0.1, views=[MatrixView(), MatrixView()])


def test_deepcopy_and_repr_of_group_with_view():
    W = nn.Parameter(torch.randn(6, 4))
    opt = Muon([W], split=[2, 4])
    W.grad = torch.randn(6, 4)
    opt.step()
    copy.deepcopy(opt).step()
