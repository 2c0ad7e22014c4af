"""Contracts of the matrix functions that reviews found broken: each test failed before its fix.

References: float64 numpy SVD, central finite differences, torch's own gradgradcheck.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steepest.linalg import inv_sqrt, mclamp, mclip, mpoly, msign, mstep, spectral_norm

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
NS = ["polar_express", "muon", "minimax"]


def svd_apply(M: torch.Tensor, f) -> np.ndarray:
    A = M.detach().double().numpy()
    U, S, Vh = np.linalg.svd(A, full_matrices=False)
    return (U * f(S)[..., None, :]) @ Vh


def rel(out: torch.Tensor, ref: np.ndarray) -> float:
    den = np.linalg.norm(ref)
    diff = np.linalg.norm(out.detach().double().numpy() - ref)
    return float(diff / den) if den > 0 else float(diff)


def top(out: torch.Tensor) -> float:
    return float(np.linalg.svd(out.detach().double().numpy(), compute_uv=False).max(initial=0.0))


def with_spectrum(s: np.ndarray, m: int, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy((U * s[:k]) @ V.T).float()


def spectrum(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "spread":  # over 1e-4 … 1 of σ_max
        return np.logspace(0, -4, k)
    if kind == "rank_deficient":
        r = max(1, k // 2)
        return np.concatenate([np.sort(rng.uniform(0.05, 1.0, r))[::-1], np.zeros(k - r)])
    if kind == "clustered":  # a cluster at 0.5·σ_max, where the bounds below often sit
        return np.concatenate([[1.0], 0.5 + rng.uniform(-1e-3, 1e-3, k - 1)])
    return np.sort(rng.uniform(0.01, 1.0, k))[::-1]


cases = st.fixed_dictionaries({
    "m": st.integers(2, 24), "n": st.integers(2, 24), "seed": st.integers(0, 10_000),
    "kind": st.sampled_from(["spread", "rank_deficient", "clustered", "uniform"]),
    "ratio": st.sampled_from([0.01, 0.05, 0.3, 0.5, 0.9, 1.0, 2.0]),
    "schedule": st.sampled_from(NS),
})


# ---------------------------------------------------------------------------
# Newton–Schulz routes honour their contract at the default number of steps
# ---------------------------------------------------------------------------
@SETTINGS
@given(cases)
def test_mclip_newton_schulz_contract(d):
    rng = np.random.default_rng(d["seed"])
    s = spectrum(d["kind"], min(d["m"], d["n"]), rng) * 3.0
    M = with_spectrum(s, d["m"], d["n"], d["seed"])
    c = d["ratio"] * float(s.max())
    C = mclip(M, c, schedule=d["schedule"])
    assert top(C) <= c * (1 + 1e-2)
    assert rel(C, svd_apply(M, lambda x: np.minimum(x, c))) <= 1e-2


@SETTINGS
@given(cases)
def test_mstep_mpoly_mclamp_newton_schulz_contract(d):
    rng = np.random.default_rng(d["seed"])
    s = spectrum(d["kind"], min(d["m"], d["n"]), rng) * 3.0
    M = with_spectrum(s, d["m"], d["n"], d["seed"])
    c = d["ratio"] * float(s.max())
    sv = np.linalg.svd(M.double().numpy(), compute_uv=False)
    if np.all(np.abs(sv / c - 1) > 1e-3):  # a step cannot be resolved right at the threshold
        assert rel(mstep(M, c, schedule=d["schedule"]), svd_apply(M, lambda x: (x > c).astype(float))) <= 1e-2
    coeffs = [0.0, 1.0, 0.5 / c, -0.2 / c**2]
    assert rel(mpoly(M, coeffs, schedule=d["schedule"]),
               svd_apply(M, lambda x: np.polynomial.polynomial.polyval(x, coeffs))) <= 1e-2
    if d["kind"] != "rank_deficient" and sv.min() >= 1e-3 * sv.max():
        lo, hi = 0.5 * c, c
        assert rel(mclamp(M, lo, hi, schedule=d["schedule"]), svd_apply(M, lambda x: np.clip(x, lo, hi))) <= 1e-2


def test_mclip_polar_express_clips_a_gaussian_matrix():
    # Five Polar Express steps returned ‖C‖₂ = 3.03 against a bound of 0.383 here.
    M = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    smax = float(torch.linalg.matrix_norm(M.double(), 2))
    for ratio in (0.01, 2.0):
        C = mclip(M, ratio * smax, schedule="polar_express")
        ref = svd_apply(M, lambda x: np.minimum(x, ratio * smax))
        assert top(C) <= ratio * smax * (1 + 1e-3)
        assert rel(C, ref) <= 1e-3


def test_explicit_steps_run_exactly_that_many():
    M = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    smax = float(torch.linalg.matrix_norm(M.double(), 2))
    five = mclip(M, 0.01 * smax, schedule="polar_express", steps=5)
    assert top(five) > 1.5 * 0.01 * smax  # the documented shortfall of a fixed short schedule


# ---------------------------------------------------------------------------
# Accurate route: one Gram eigendecomposition, exact at every scale
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e10, 1e12, 1e15, 1e30])
def test_mclip_accurate_far_above_the_bound(dtype, scale):
    # relative error was 5.9e-5 at 1e10, 4.8e-3 at 1e12 and 3.9 at 1e15 (catastrophic cancellation)
    M = torch.randn(32, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X = (M * scale).to(dtype)
    C = mclip(X, 1.0)
    assert top(C) <= 1 + 1e-6
    assert rel(C, svd_apply(X, lambda x: np.minimum(x, 1.0))) <= 1e-6


@SETTINGS
@given(cases)
def test_mclamp_accurate_matches_svd(d):
    rng = np.random.default_rng(d["seed"])
    s = spectrum(d["kind"], min(d["m"], d["n"]), rng) * 3.0
    M = with_spectrum(s, d["m"], d["n"], d["seed"])
    hi = d["ratio"] * float(s.max())
    lo = 0.3 * hi
    tol = max(M.shape) * np.finfo(np.float32).eps * float(s.max())
    ref = svd_apply(M, lambda x: np.where(x > tol, np.clip(x, lo, hi), 0.0))  # dropped directions stay zero
    assert rel(mclamp(M, lo, hi), ref) <= 1e-4
    assert torch.equal(mclamp(M, max=hi), mclip(M, hi))
    assert rel(mclamp(M, min=lo), svd_apply(M, lambda x: np.where(x > tol, np.maximum(x, lo), 0.0))) <= 1e-4


def test_mclamp_arguments():
    M = torch.randn(4, 6)
    assert torch.equal(mclamp(M), M)
    with pytest.raises(ValueError, match="min must be <= max"):
        mclamp(M, 2.0, 1.0)
    with pytest.raises(ValueError, match="max"):
        mclamp(M, max=-1.0)


# ---------------------------------------------------------------------------
# Second derivatives through the exact routes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda x: msign(x),
    lambda x: mclip(2 * x, 1.0),
    lambda x: mclamp(2 * x, 0.5, 1.5),
    lambda x: mpoly(x, [0.0, 1.0, 0.3, -0.1]),
    lambda x: msign(x, schedule="svd"),
])
def test_exact_routes_are_twice_differentiable(fn):
    X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (X,))


def test_inv_sqrt_is_twice_differentiable():
    A = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    A = (A @ A.T + torch.eye(5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: inv_sqrt(0.5 * (a + a.T)), (A,))


def _penalty(W: torch.Tensor, X: torch.Tensor, T: torch.Tensor, fn) -> torch.Tensor:
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad((fn(x @ W) * T).sum(), x, create_graph=True)
    return (g ** 2).sum()


@pytest.mark.parametrize("fn", [lambda y: msign(y), lambda y: mclip(y, 0.7),
                                lambda y: inv_sqrt(y.mT @ y + torch.eye(5, dtype=y.dtype))])
def test_input_gradient_penalty_through_exact_routes_matches_finite_differences(fn):
    # dPenalty/dW[0,:3] was [0.946, −2.454, −6.385] for msign against [0.203, 0.333, −2.994]
    g = torch.Generator().manual_seed(1)
    X, T = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    if fn(torch.ones(4, 5, dtype=torch.float64)).shape[-1] == 5 and fn(torch.ones(4, 5, dtype=torch.float64)).shape[-2] == 5:
        T = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    W0 = torch.randn(5, 5, generator=g, dtype=torch.float64)
    W = W0.clone().requires_grad_()
    _penalty(W, X, T, fn).backward()
    h = 1e-6
    for j in range(3):
        E = torch.zeros_like(W0)
        E[0, j] = h
        fd = (_penalty(W0 + E, X, T, fn) - _penalty(W0 - E, X, T, fn)).item() / (2 * h)
        assert abs(fd - float(W.grad[0, j])) <= 1e-5 * max(1.0, abs(fd))


# ---------------------------------------------------------------------------
# torch.func, meta tensors
# ---------------------------------------------------------------------------
def test_msign_under_vmap_jacrev_and_meta():
    M = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    J = torch.func.jacrev(msign)(M)
    h = 1e-6
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        E = torch.zeros_like(M)
        E[i, j] = h
        torch.testing.assert_close(J[..., i, j], (msign(M + E) - msign(M - E)) / (2 * h), atol=1e-7, rtol=0)
    B = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(msign)(B), msign(B), atol=1e-14, rtol=0)
    assert msign(torch.empty(3, 4, device="meta")).shape == (3, 4)


# ---------------------------------------------------------------------------
# spectral_norm and inv_sqrt at scale extremes, clustered tops, empty input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1.0, 1e12, 1e20])
def test_spectral_norm_at_any_scale(dtype, scale):
    # float32 gave 0 at 1e-25 and inf at 1e20
    M = torch.randn(6, 9, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    X = (M * scale).to(dtype)
    want = float(torch.linalg.matrix_norm(X.double(), 2))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(spectral_norm(X)) / want - 1) <= tol


def test_spectral_norm_clustered_top_and_empty():
    # σ = [1, 0.999×40]: the block iteration stopped at max_iters 2e-4 short, without a word
    rng = np.random.default_rng(7)
    U, _ = np.linalg.qr(rng.standard_normal((60, 41)))
    V, _ = np.linalg.qr(rng.standard_normal((50, 41)))
    A = torch.from_numpy((U * np.array([1.0] + [0.999] * 40)) @ V.T)
    assert abs(float(spectral_norm(A)) - 1.0) <= 1e-12
    assert spectral_norm(torch.zeros(0, 5)).shape == ()
    assert spectral_norm(torch.zeros(2, 5, 0)).shape == (2,)


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_inv_sqrt_newton_schulz_at_scale_extremes(scale):
    # float32 returned NaN at 1e-25 and 0 at 1e20
    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(8))
    A = (A @ A.T + torch.eye(6)) * scale
    A = 0.5 * (A + A.T)  # exactly symmetric in float32
    ns, ref = inv_sqrt(A, method="newton_schulz"), inv_sqrt(A.double())
    assert torch.isfinite(ns).all()
    assert float(((ns.double() - ref).norm() / ref.norm())) <= 1e-4


# ---------------------------------------------------------------------------
# dtype="auto": bfloat16 only where the device multiplies it fast
# ---------------------------------------------------------------------------
def test_auto_precision_follows_the_device(monkeypatch):
    from steepest import linalg

    seen = []
    real = linalg._newton_schulz
    monkeypatch.setattr(linalg, "_newton_schulz", lambda X, *a, **k: (seen.append(X.dtype), real(X, *a, **k))[1])
    M = torch.randn(8, 12)
    for fast, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(linalg, "_FAST_BF16", {("cpu", None): fast})
        seen.clear()
        O = msign(M, schedule="polar_express")
        assert seen == [want] and O.dtype == torch.float32
        seen.clear()
        msign(M.double(), schedule="polar_express")  # float64 input keeps float64
        assert seen == [torch.float64]
        seen.clear()
        msign(M, schedule="polar_express", dtype=None)  # None: always the input's precision
        assert seen == [torch.float32]


def test_fast_bf16_decision(monkeypatch):
    from steepest import linalg

    monkeypatch.setattr(linalg, "_FAST_BF16", {})
    monkeypatch.setattr(linalg, "_cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(linalg, "_probe_cpu_bf16", lambda: pytest.fail("no bf16 units: no timing needed"))
    assert linalg.fast_bf16("cpu") is False
    monkeypatch.setattr(linalg, "_FAST_BF16", {})
    monkeypatch.setattr(linalg, "_cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(linalg, "_probe_cpu_bf16", lambda: True)
    assert linalg.fast_bf16() is True
    assert linalg.fast_bf16(torch.device("meta")) is False
    assert isinstance(linalg._probe_cpu_bf16.__call__(), bool)


@pytest.mark.slow
def test_newton_schulz_msign_compiles_without_graph_breaks_or_recompiles():
    # torch.compile(fullgraph=True) with CPU inductor; 50 calls with new values of the same shapes
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(lambda X: msign(X, schedule="polar_express"), fullgraph=True)
    g = torch.Generator().manual_seed(9)
    X = torch.randn(3, 16, 40, generator=g)
    torch.testing.assert_close(fn(X), msign(X, schedule="polar_express"), atol=2e-5, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(50):
            fn(torch.randn(3, 16, 40, generator=g))


def test_inv_sqrt_under_vmap():
    A = torch.randn(4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    A = A @ A.mT + torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(inv_sqrt)(A), inv_sqrt(A), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# Muon-grade Newton–Schulz: the Gram-space iteration and the Gram-based start
# ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 24), st.sampled_from([2, 3, 5]), st.sampled_from(["spread", "rank_deficient", "uniform"]),
       st.integers(0, 10_000), st.sampled_from([torch.float32, torch.float64]))
def test_gram_space_iteration_equals_the_classic_one(m, aspect, kind, seed, dtype):
    from steepest import linalg

    rng = np.random.default_rng(seed)
    s = spectrum(kind, m, rng)
    X = with_spectrum(s, m, aspect * m, seed).to(dtype)
    sched = linalg.SCHEDULES["polar_express"]
    classic = linalg._newton_schulz(X, sched.rows(), sched.safety, gram_scale=True, gram=False)
    gram = linalg._newton_schulz(X, sched.rows(), sched.safety, gram_scale=True, gram=True)
    # rounding is amplified by the accumulated gain (∏a ≈ 10³ for Polar Express): ~1e-4 on a spread spectrum,
    # negligible against the iteration's own distance from msign (its σ end in [0.8, 1.15])
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    assert float((gram - classic).abs().max()) <= tol
    # same singular-value map, hence the same direction error against the exact polar factor
    exact = svd_apply(X, lambda x: np.where(x > 1e-6 * x.max(), 1.0, 0.0))
    assert abs(rel(gram, exact) - rel(classic, exact)) <= 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [512, 768])
def test_five_polar_express_steps_keep_a_wide_spectrum_near_one(dtype, n):
    # from X/‖X‖_F the smallest singular value ended at 0.22 on this spectrum (1e-3 … 1 of σ_max)
    X = with_spectrum(np.logspace(0, -3, 256), 256, n, 11).to(dtype)
    sv = np.linalg.svd(msign(X, schedule="polar_express", dtype=dtype).double().numpy(), compute_uv=False)
    assert 0.75 <= sv.min() and sv.max() <= 1.25
