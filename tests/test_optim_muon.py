"""steepest.optim.Muon against torch.optim.Muon, torch.optim.AdamW and float64 references."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch.optim._muon as torch_muon_mod
from steepest import linalg
from steepest.optim import (
    Muon,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    muon_lr_scale,
    muon_param_groups,
    orthogonalize,
)

KJ = (3.4445, -4.7750, 2.0315)
PE = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SHAPES = [(24, 12), (12, 36), (24, 12), (20, 20)]


# -- references written here, in float64 -------------------------------------------------
def ns64(G: torch.Tensor, rows, safety: float = 1.0, eps: float = 1e-7, gram_scale: bool = False) -> torch.Tensor:
    """Newton–Schulz in float64 on the short side: X ← aX + b(XXᵀ)X + c(XXᵀ)²X.

    Start X/(‖X‖_F·safety), or with ``gram_scale`` X/((Σσ¹⁶)^{1/16}·safety) (σ from numpy's SVD).
    """
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    if gram_scale:
        s = np.linalg.svd(X.numpy(), compute_uv=False)
        X = X / (float((s / s.max()) .__pow__(16).sum() ** (1 / 16) * s.max()) * safety)
    else:
        X = X / (X.norm() * safety).clamp_min(eps)
    for a, b, c in rows:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def polar64(G: torch.Tensor) -> torch.Tensor:
    """U Vᵀ by numpy's float64 SVD."""
    U, _, Vt = np.linalg.svd(G.detach().double().numpy(), full_matrices=False)
    return torch.from_numpy(U @ Vt)


def svals(W: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(W.detach().double().reshape(W.shape[0], -1).numpy(), compute_uv=False)


def make_params(seed: int = 0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 0.1 for s in shapes]


def run(make_opt, W0, steps: int = 5, seed: int = 1):
    ps = [nn.Parameter(w.clone()) for w in W0]
    opt = make_opt(ps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in ps]


# -- the drop-in contract -----------------------------------------------------------------
@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_same_update_rule_as_torch_muon(monkeypatch, adjust, nesterov):
    """torch.optim.Muon with its NS swapped for a float64 one vs ours with ns_dtype=float64: same rule."""

    def zeropower64(grad, ns_coefficients, ns_steps, eps):
        return ns64(grad, [ns_coefficients] * ns_steps, eps=eps)

    monkeypatch.setattr(torch_muon_mod, "_zeropower_via_newtonschulz", zeropower64)
    kw = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    W0 = make_params()
    ref = run(lambda ps: torch.optim.Muon(ps, **kw), W0)
    ours = run(lambda ps: Muon(ps, ns_coefficients=KJ, ns_dtype=torch.float64, **kw), W0)
    for r, o, w in zip(ref, ours, W0):
        assert (r - w).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(o, r, atol=2e-6, rtol=0)


def test_matches_torch_muon_in_bfloat16():
    """Unpatched torch.optim.Muon (bf16 NS) vs ours with the same explicit settings and ns_dtype=bfloat16."""
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=KJ, eps=1e-7, ns_steps=5)
    W0 = make_params(3)
    ref = run(lambda ps: torch.optim.Muon(ps, **kw), W0)
    ours = run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw), W0)
    exact = run(lambda ps: Muon(ps, ns_dtype=torch.float64, **kw), W0)
    for r, o, e, w in zip(ref, ours, exact, W0):
        moved = (r - w).norm()
        bf16_noise = (r - e).norm()  # torch's own distance from the exact-arithmetic trajectory
        assert bf16_noise < 0.05 * moved
        assert (o - r).norm() < 2.0 * bf16_noise + 1e-6


def test_defaults_polar_express_in_float32():
    """Default: Polar Express rows from X/((Σσ¹⁶)^{1/16}·1.02), computed in float32 (no downcast)."""
    W0 = make_params(5)
    lr, mu = 0.02, 0.95
    ours = run(lambda ps: Muon(ps), W0, steps=1)
    g = torch.Generator().manual_seed(1)
    for w, o in zip(W0, ours):
        G = torch.randn(w.shape, generator=g)
        X = (1 - mu) * G + mu * ((1 - mu) * G)  # Nesterov look-ahead after B = (1-μ)G
        A, B = w.shape
        ref = w.double() - lr * math.sqrt(max(1, A / B)) * ns64(X, PE, safety=1.02, gram_scale=True)
        torch.testing.assert_close(o.double(), ref, atol=2e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), adjust=st.sampled_from(["original", "match_rms_adamw", "spectral", "none"]))
def test_step_is_scaled_polar_factor(m, n, adjust):
    """With exact msign (schedule='svd'), momentum 0: ΔW = −lr·scale·UVᵀ; ‖ΔW‖₂ = lr·scale."""
    torch.manual_seed(m * 31 + n)
    W = nn.Parameter(torch.randn(m, n, dtype=torch.float64))
    W0 = W.detach().clone()
    G = torch.randn(m, n, dtype=torch.float64)
    W.grad = G.clone()
    Muon([W], lr=0.1, momentum=0.0, schedule="svd", adjust_lr_fn=adjust).step()
    scale = {"original": math.sqrt(max(1, m / n)), "match_rms_adamw": 0.2 * math.sqrt(max(m, n)),
             "spectral": math.sqrt(m / n), "none": 1.0}[adjust]
    assert muon_lr_scale((m, n), adjust) == pytest.approx(scale)
    torch.testing.assert_close(W.detach(), W0 - 0.1 * scale * polar64(G), atol=1e-10, rtol=0)
    assert svals(W.detach() - W0)[0] == pytest.approx(0.1 * scale, rel=1e-9)


def test_conv_weight_uses_flattened_matrix():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=False).double()
    W0 = conv.weight.detach().clone()
    G = torch.randn_like(W0)
    conv.weight.grad = G.clone()
    Muon(conv.parameters(), lr=0.05, momentum=0.0, schedule="svd").step()
    expected = W0 - 0.05 * polar64(G.reshape(8, 27)).reshape(W0.shape)  # scale √max(1, 8/27) = 1
    torch.testing.assert_close(conv.weight.detach(), expected, atol=1e-10, rtol=0)


def test_same_shapes_are_one_batch(monkeypatch):
    calls = []
    real = linalg.msign

    def spy(M, **kw):
        calls.append(tuple(M.shape))
        return real(M, **kw)

    monkeypatch.setattr(linalg, "msign", spy)
    torch.manual_seed(0)
    mats = [torch.randn(6, 4) for _ in range(3)] + [torch.randn(4, 9) for _ in range(2)] + [torch.randn(5, 5)]
    out = orthogonalize(mats, schedule="svd")
    assert sorted(calls) == sorted([(3, 6, 4), (2, 4, 9), (1, 5, 5)])
    for m, o in zip(mats, out):
        torch.testing.assert_close(o.double(), polar64(m), atol=1e-5, rtol=0)


def test_zero_gradient_gives_no_step():
    W = nn.Parameter(torch.randn(5, 3))
    W0 = W.detach().clone()
    W.grad = torch.zeros(5, 3)
    Muon([W], lr=0.1).step()
    assert torch.equal(W.detach(), W0)


# -- AdamW for the rest, and the routing ----------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 11)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)
        x = self.conv(x).transpose(1, 2)
        return self.head(self.norm(torch.relu(self.hidden(x))))


def test_muon_param_groups_routes_embeddings_head_and_vectors_to_adamw():
    model = Tiny()
    groups = muon_param_groups(model, adamw={"lr": 3e-3})
    muon_ids = {id(p) for p in groups[0]["params"]}
    adam_ids = {id(p) for p in groups[1]["params"]}
    assert groups[0]["use_muon"] is True and groups[1]["use_muon"] is False and groups[1]["lr"] == 3e-3
    assert muon_ids == {id(model.conv.weight), id(model.hidden.weight)}
    assert adam_ids == {id(p) for p in model.parameters()} - muon_ids
    tied = nn.ModuleDict({"emb": nn.Embedding(11, 16), "mid": nn.Linear(16, 16), "head": nn.Linear(16, 11)})
    tied["head"].weight = tied["emb"].weight
    tg = muon_param_groups(tied, output=None)
    assert [id(p) for p in tg[0]["params"]] == [id(tied["mid"].weight)]
    assert id(tied["emb"].weight) in {id(p) for p in tg[1]["params"]}
    named = muon_param_groups(model, output="hidden")
    assert id(model.head.weight) in {id(p) for p in named[0]["params"]}
    assert id(model.hidden.weight) in {id(p) for p in named[1]["params"]}


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    model = Tiny()
    ref_model = copy.deepcopy(model)
    groups = muon_param_groups(model, adamw={"lr": 2e-3, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05})
    opt = Muon(groups, lr=0.02)
    adam_names = {n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"])}
    ref_params = [p for n, p in ref_model.named_parameters() if n in adam_names]
    ref = torch.optim.AdamW(ref_params, lr=2e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    idx = torch.randint(0, 11, (4, 7))
    for _ in range(6):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(idx).square().mean().backward()
        # the reference model's Muon parameters stay put; copy ours over so both see the same forward
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
                if n not in adam_names:
                    q.copy_(p)
        opt.step()
        ref.step()
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
                if n not in adam_names:
                    q.copy_(p)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if n in adam_names:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_auto_split_of_plain_parameter_list():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = Muon(model.parameters(), lr=0.05, adamw_lr=1e-2)
    kinds = [(g["use_muon"], [tuple(p.shape) for p in g["params"]], g["lr"]) for g in opt.param_groups]
    assert kinds == [(True, [(6, 4), (2, 6)], 0.05), (False, [(6,), (2,)], 1e-2)]


# -- robustness ---------------------------------------------------------------------------------
def _setup(nonfinite="skip"):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3))]
    opt = Muon(ps, lr=0.05, nonfinite=nonfinite)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


def test_nonfinite_gradient_skips_only_that_parameter():
    ps, opt = _setup()
    before = [p.detach().clone() for p in ps]
    state_before = copy.deepcopy(opt.state_dict())
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[0].grad[1, 2] = float("nan")
    ps[2].grad[0] = float("inf")
    with pytest.warns(NonFiniteGradientWarning, match="2 parameter"):
        opt.step()
    assert torch.equal(ps[0].detach(), before[0]) and torch.equal(ps[2].detach(), before[2])
    assert not torch.equal(ps[1].detach(), before[1])
    s0 = state_before["state"]
    assert torch.equal(opt.state[ps[0]]["momentum_buffer"], s0[0]["momentum_buffer"])
    assert torch.equal(opt.state[ps[2]]["exp_avg"], s0[2]["exp_avg"]) and opt.state[ps[2]]["step"] == 1
    assert opt.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in ps)


def test_nonfinite_gradient_can_raise_without_changes():
    ps, opt = _setup("raise")
    before = [p.detach().clone() for p in ps]
    buf = opt.state[ps[1]]["momentum_buffer"].clone()
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[0].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert torch.equal(opt.state[ps[1]]["momentum_buffer"], buf)


def test_state_dict_resume_is_bit_exact():
    torch.manual_seed(0)
    model = Tiny()
    idx = torch.randint(0, 11, (4, 7))

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(idx).square().mean().backward()
            o.step()

    opt = Muon(muon_param_groups(model), lr=0.03, weight_decay=0.01, max_spectral_norm=3.0)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3)

    buf.seek(0)
    saved = torch.load(buf)
    model2 = Tiny()
    model2.load_state_dict(saved["model"])
    opt2 = Muon(muon_param_groups(model2), lr=0.5)  # settings come back from the state dict
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_and_closure():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    x = torch.randn(7, 3, dtype=torch.float64)
    opt = Muon([W], lr=0.1, momentum=0.0, schedule="svd")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (x @ W.T).square().sum()
        loss.backward()
        return loss

    for k in range(3):
        W0 = W.detach().clone()
        loss = opt.step(closure)
        assert loss.item() == pytest.approx((x @ W0.T).square().sum().item())
        G = 2 * (x @ W0.T).T @ x
        expected = W0 - 0.1 * 0.5**k * math.sqrt(5 / 3) * polar64(G)
        torch.testing.assert_close(W.detach(), expected, atol=1e-10, rtol=0)
        sched.step()
    assert len(calls) == 3


def test_max_spectral_norm_clips_singular_values():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    W = nn.Parameter(U[:, :6] @ torch.diag(s) @ V.T)
    W.grad = torch.zeros_like(W)  # zero step: only the projection acts
    Muon([W], lr=0.1, max_spectral_norm=1.5).step()
    np.testing.assert_allclose(svals(W.detach()), np.minimum(s.numpy(), 1.5), atol=1e-8)


# -- errors ---------------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    W = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.randn(4))
    for kw, exc, word in [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(ns_dtype=torch.int32), TypeError, "ns_dtype"),
        (dict(ns_coefficients=KJ, schedule="muon"), ValueError, "ns_coefficients"),
        (dict(schedule="fast"), ValueError, "schedule"),
        (dict(adjust_lr_fn="mup"), ValueError, "adjust_lr_fn"),
        (dict(ns_steps=0), ValueError, "ns_steps"),
        (dict(max_spectral_norm=0.0), ValueError, "max_spectral_norm"),
        (dict(adamw_betas=(0.9, 1.0)), ValueError, "betas"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
    ]:
        with pytest.raises(exc, match=word):
            Muon([W], **kw)
    with pytest.raises(ValueError, match="use_muon=False"):
        Muon([{"params": [b], "use_muon": True}])
    with pytest.raises(ValueError, match="unknown key"):
        Muon([{"params": [W], "use_muon": True, "betas": (0.9, 0.99)}])
    with pytest.raises(TypeError, match="set"):
        Muon({W})
    E = nn.Embedding(5, 3, sparse=True)
    E(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        Muon(E.parameters()).step()


def test_no_warning_on_clean_steps():
    ps, opt = _setup()
    for p in ps:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.skipped_steps == 0


def test_named_parameters_are_split_too():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = Muon(model.named_parameters())
    assert [(g["use_muon"], g["param_names"]) for g in opt.param_groups] == [
        (True, ["0.weight", "2.weight"]), (False, ["0.bias", "2.bias"])]


def test_bfloat16_parameters_step_in_float32_by_default(monkeypatch):
    seen = []
    real = linalg.msign

    def spy(M, **kw):
        seen.append((M.dtype, kw.get("dtype")))
        return real(M, **kw)

    monkeypatch.setattr(linalg, "msign", spy)
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(8, 5).bfloat16())
    W0 = W.detach().double().clone()
    G = torch.randn(8, 5).bfloat16()
    W.grad = G.clone()
    Muon([W], lr=0.1, momentum=0.0).step()
    assert seen == [(torch.float32, "auto")]  # bf16 parameter, float32 momentum; "auto" is float32 without bf16 units
    step = (W0 - W.detach().double()) / (0.1 * math.sqrt(8 / 5))
    assert np.abs(svals(step) - 1).max() < 0.2  # Polar Express: singular values near 1
    torch.testing.assert_close(step, polar64(G.float()), atol=0.1, rtol=0)


def test_compiled_model_trains_like_eager():
    """torch.compile on the model (dynamo + AOTAutograd) leaves Muon's trajectory unchanged; step() stays eager."""

    def run(compile_model: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        opt = Muon(muon_param_groups(model), lr=0.05, weight_decay=0.01)
        fwd = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_model else model
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    torch.manual_seed(0)
    init = torch.nn.Linear(6, 8).double().weight.detach()
    assert (eager[0] - init).abs().max() > 1e-3  # the run moved the weights: the comparison is not vacuous
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_orthogonalize_large_cpu_matrices_one_by_one_equal_msign():
    """Above the CPU batching threshold each matrix goes alone; results are msign's, zeros stay zero."""
    from steepest.optim._matrices import _CPU_BATCH_MAX

    g = torch.Generator().manual_seed(0)
    n = int(math.isqrt(_CPU_BATCH_MAX)) + 8  # n² entries > threshold
    mats = [torch.randn(n, n, generator=g), torch.zeros(n, n), torch.randn(n, n, generator=g) * 1e-3]
    out = orthogonalize(mats)
    for m, o in zip(mats, out):
        want = torch.zeros_like(m) if not m.any() else linalg.msign(m, schedule="polar_express")
        torch.testing.assert_close(o, want, rtol=0, atol=1e-6)
        assert o.dtype == m.dtype and o.shape == m.shape


@pytest.mark.parametrize("n", [6, int(math.isqrt(1 << 17)) + 8])  # batched, and one by one
def test_orthogonalize_direction_does_not_depend_on_scale(n):
    # A matrix with ‖X‖_F = 1e-9 used to get a zero direction (eps = 1e-7), so a small constant
    # gradient never moved the weights; the direction must be that of the matrix at any scale.
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    tiny = B * (1e-9 / float(B.norm()))
    out = orthogonalize([A, tiny, A.clone(), torch.zeros(n, n)])
    torch.testing.assert_close(out[1], linalg.msign(B, schedule="polar_express"), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0], linalg.msign(A, schedule="polar_express"), rtol=0, atol=1e-5)  # batch rounding
    assert torch.equal(out[0], out[2])
    assert torch.equal(out[3], torch.zeros(n, n))


@pytest.mark.parametrize("scale", [1e-30, 1e-7, 1.0, 1e20])
def test_muon_first_step_is_full_at_any_gradient_scale(scale):
    # torch.optim.Muon takes a full step (0.141 here) for a 1e-7 gradient; ours used to take none.
    W = nn.Parameter(torch.zeros(4, 6))
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    W.grad = G * (scale / float(G.norm()))
    Muon([W], lr=0.1, schedule="svd").step()
    torch.testing.assert_close(W.detach(), -0.1 * polar64(G).float(), rtol=0, atol=1e-6)


def test_default_ns_dtype_is_auto(monkeypatch):
    from steepest import linalg as L

    seen = []
    real = L._newton_schulz
    monkeypatch.setattr(L, "_newton_schulz", lambda X, *a, **k: (seen.append(X.dtype), real(X, *a, **k))[1])
    W = nn.Parameter(torch.randn(6, 4))
    for fast, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(L, "_FAST_BF16", {("cpu", None): fast})
        seen.clear()
        W.grad = torch.randn(6, 4)
        Muon([W]).step()
        assert seen == [want]
    with pytest.raises(TypeError, match="ns_dtype"):
        Muon([W], ns_dtype="fast")
