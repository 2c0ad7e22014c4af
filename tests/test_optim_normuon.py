"""NorMuon against a hand-written float64 loop of the paper's rule (arXiv:2510.05491) and its own properties."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from steepest.optim import Muon, NorMuon, muon_param_groups, normuon_step


def _polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vt = np.linalg.svd(G.double().numpy(), full_matrices=False)
    return torch.from_numpy(U @ Vt)


def reference(W0, grads, *, lr, beta1, beta2, eps, wd, nesterov=False):
    """The paper's Algorithm, one matrix, float64, exact polar factor, written out row by row."""
    W = W0.clone().double()
    m, n = W.shape
    M = torch.zeros_like(W)
    v = torch.zeros(m, dtype=torch.float64)
    for G in grads:
        M = beta1 * M + (1 - beta1) * G
        X = (1 - beta1) * G + beta1 * M if nesterov else M
        O = _polar(X)
        for i in range(m):
            v[i] = beta2 * v[i] + (1 - beta2) * float((O[i] ** 2).sum()) / n
        Oh = torch.stack([O[i] / (math.sqrt(v[i]) + eps) for i in range(m)])
        W = W - lr * wd * W - lr * 0.2 * math.sqrt(m * n) * Oh / Oh.norm()
    return W


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_the_papers_rule(shape, nesterov):
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5)]
    kw = dict(lr=0.03, beta1=0.9, beta2=0.8, eps=1e-3, wd=0.1, nesterov=nesterov)
    want = reference(W0, grads, **kw)
    W = nn.Parameter(W0.clone())
    opt = NorMuon([W], lr=0.03, momentum=0.9, beta2=0.8, eps=1e-3, weight_decay=0.1, nesterov=nesterov,
                  schedule="svd")
    for G in grads:
        W.grad = G.clone()
        opt.step()
    torch.testing.assert_close(W.detach(), want, rtol=0, atol=1e-12)
    assert (W.detach() - W0).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16), (3, 4, 5)])
def test_first_update_has_equal_row_norms_and_rms_point_two_lr(shape):
    torch.manual_seed(2)
    W = nn.Parameter(torch.zeros(shape))  # the step is read exactly
    W0 = W.detach().clone()
    # rows of unequal size: Muon's rows differ (ε = 1e-8 stays far below every row's √v here)
    W.grad = torch.randn(shape) * torch.logspace(-1, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    lr = 0.01
    NorMuon([W], lr=lr).step()  # default Polar Express in float32
    step = (W.detach() - W0).reshape(shape[0], -1)
    rms = float(step.square().mean().sqrt())
    assert rms == pytest.approx(0.2 * lr, rel=1e-5)
    rows = step.norm(dim=1)
    assert float(rows.max() / rows.min()) == pytest.approx(1.0, abs=1e-4)
    # Muon's own step has unequal rows (the test can tell)
    M = nn.Parameter(W0.clone())
    M.grad = W.grad.clone()
    Muon([M], lr=lr).step()
    mrows = (M.detach() - W0).reshape(shape[0], -1).norm(dim=1)
    assert float(mrows.max() / mrows.min()) > 1.05


def test_gradient_scale_does_not_matter_and_zero_gradient_gives_no_step():
    torch.manual_seed(3)
    G = torch.randn(6, 4)
    steps = []
    for scale in (1e-30, 1.0, 1e30):
        W = nn.Parameter(torch.zeros(6, 4))
        W.grad = G * scale
        NorMuon([W], lr=0.1).step()
        steps.append(W.detach().clone())
    for s in steps:
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, steps[1], rtol=0, atol=1e-6)
    W = nn.Parameter(torch.ones(6, 4))
    W.grad = torch.zeros(6, 4)
    NorMuon([W], lr=0.1).step()
    assert torch.equal(W.detach(), torch.ones(6, 4))


def test_zero_rows_stay_put():
    W = nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    G = torch.randn(5, 3, dtype=torch.float64)
    G[2] = 0.0  # this row's orthogonal factor row is exactly zero
    W.grad = G
    NorMuon([W], lr=0.1, schedule="svd").step()
    assert torch.equal(W.detach()[2], torch.zeros(3, dtype=torch.float64))
    assert float(W.detach().square().mean().sqrt()) == pytest.approx(0.02, rel=1e-9)


def test_split_blocks_are_normalized_alone():
    torch.manual_seed(4)
    W0 = torch.randn(10, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    W = nn.Parameter(W0.clone())
    opt = NorMuon([W], lr=0.05, weight_decay=0.1, split=(6, 4), schedule="svd")
    parts = [nn.Parameter(b.clone()) for b in W0.split((6, 4))]
    ref = NorMuon(parts, lr=0.05, weight_decay=0.1, schedule="svd")
    for G in grads:
        W.grad = G.clone()
        for p, b in zip(parts, G.split((6, 4))):
            p.grad = b.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(W.detach(), torch.cat([p.detach() for p in parts]), rtol=0, atol=1e-12)
    assert opt.state[W]["row_second_moment"].shape == (10,)


def test_batched_stack_keeps_one_moment_per_row_of_each_matrix():
    torch.manual_seed(6)
    W0 = torch.randn(3, 5, 4, dtype=torch.float64)
    W = nn.Parameter(W0.clone())
    W.grad = torch.randn(3, 5, 4, dtype=torch.float64)
    opt = NorMuon([W], lr=0.05, batched=True, schedule="svd")
    opt.step()
    assert opt.state[W]["row_second_moment"].shape == (3, 5)
    step = W.detach() - W0
    for s in step.unbind(0):  # each matrix its own RMS 0.2·lr
        assert float(s.square().mean().sqrt()) == pytest.approx(0.01, rel=1e-9)


def test_bfloat16_parameters_keep_float32_state_and_follow_float32():
    torch.manual_seed(7)
    W0 = torch.randn(8, 6)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(8, 6, generator=g) for _ in range(20)]

    def run(dtype):
        W = nn.Parameter(W0.to(dtype))
        opt = NorMuon([W], lr=1e-3, weight_decay=0.01)
        for G in grads:
            W.grad = G.to(dtype)
            opt.step()
        return W.detach().float(), opt

    f32, _ = run(torch.float32)
    b16, opt = run(torch.bfloat16)
    assert opt.state[next(iter(opt.state))]["row_second_moment"].dtype == torch.float32
    assert opt.state[next(iter(opt.state))]["momentum_buffer"].dtype == torch.float32
    moved = float((f32 - W0).abs().max())
    assert float((b16 - f32).abs().max()) < 0.1 * moved + 2 ** -8 * float(W0.abs().max())


def test_takes_muons_param_groups_and_adamw_part():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 11))
    twin = copy.deepcopy(model)
    opt = NorMuon(muon_param_groups(model, adamw={"lr": 2e-3}), lr=0.02)
    ref = Muon(muon_param_groups(twin, adamw={"lr": 2e-3}), lr=0.02)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    idx = torch.randint(0, 11, (4, 7))
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(idx).square().mean().backward()
            o.step()
    # the embedding and biases (AdamW) move alike; the hidden matrix differently
    assert not torch.equal(model[1].weight, twin[1].weight)
    assert float((model[0].weight - twin[0].weight).detach().abs().max()) < 1e-2


def test_bad_settings_and_foreign_state_are_refused():
    W = nn.Parameter(torch.randn(4, 3))
    for kw, exc, word in [(dict(beta2=1.0), ValueError, "beta2"), (dict(eps=0.0), ValueError, "eps"),
                          (dict(momentum=-0.1), ValueError, "momentum"), (dict(heads=3), ValueError, "heads")]:
        with pytest.raises(exc, match=word):
            NorMuon([W], **kw)
    with pytest.raises(ValueError, match="unknown key.*adjust_lr_fn"):
        NorMuon([{"params": [W], "use_muon": True, "adjust_lr_fn": "spectral"}])
    W.grad = torch.randn(4, 3)
    muon = Muon([W])
    muon.step()
    nm = NorMuon([W])
    with pytest.raises(ValueError, match=r"load_state_dict.*adjust_lr_fn.*another optimizer"):
        nm.load_state_dict(muon.state_dict())
    nm.step()
    before = {k: v.clone() for k, v in muon.state[W].items()}
    with pytest.raises(ValueError, match=r"load_state_dict.*beta2.*another optimizer"):
        muon.load_state_dict(nm.state_dict())  # it would have stepped on with NorMuon's momentum
    assert muon.state[W].keys() == before.keys() and torch.equal(muon.state[W]["momentum_buffer"],
                                                                  before["momentum_buffer"])
    sd = copy.deepcopy(muon.state_dict())
    sd["param_groups"][0].pop("adjust_lr_fn")  # the keys match now; the missing second moment still does not
    with pytest.raises(ValueError, match="row_second_moment"):
        NorMuon([W]).load_state_dict(sd)
    other = NorMuon([W], batched=True)
    other.load_state_dict(nm.state_dict())  # a 2-D parameter: the same rows either way
    wrong = NorMuon([W], heads=2)
    sd = copy.deepcopy(nm.state_dict())
    sd["state"][0]["row_second_moment"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"row_second_moment.*\(3,\).*\(4,\)"):
        wrong.load_state_dict(sd)


def test_functional_core():
    torch.manual_seed(10)
    W0 = torch.randn(6, 4, dtype=torch.float64)
    G = torch.randn(6, 4, dtype=torch.float64)
    W, M, v = W0.clone(), torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    normuon_step([W], [G], [M], [v], lr=0.1, momentum=0.5, beta2=0.5, eps=1e-12, ns="svd")
    O = _polar(0.5 * G)
    torch.testing.assert_close(v, 0.5 * O.square().mean(1), rtol=1e-12, atol=0)
    Oh = O / (v.sqrt()[:, None] + 1e-12)
    torch.testing.assert_close(W, W0 - 0.1 * 0.2 * math.sqrt(24) * Oh / Oh.norm(), rtol=0, atol=1e-12)
