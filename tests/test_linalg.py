"""steepest.linalg against float64 SVD references, closed forms and torch's own Newton–Schulz."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steepest.linalg import (
    SCHEDULES,
    inv_sqrt,
    mclip,
    mpoly,
    msign,
    msquare,
    mstep,
    ns_scalar,
    spectral_norm,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------
# References (numpy float64 SVD) and input generators
# ---------------------------------------------------------------------------
def svd_ref(M: torch.Tensor, f, *, rank_convention: bool = True, eps: float = EPS32) -> np.ndarray:
    """U f(Σ) Vᵀ in float64 numpy; with rank_convention σ ≤ max(m,n)·eps·σ_max count as zero."""
    A = M.detach().to(torch.float64).cpu().numpy()
    U, S, Vh = np.linalg.svd(A, full_matrices=False)
    fs = f(S)
    if rank_convention:
        tol = max(A.shape[-2:]) * eps * S.max(axis=-1, keepdims=True)
        fs = np.where(S > tol, fs, 0.0)
    return (U * fs[..., None, :]) @ Vh


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    diff = np.linalg.norm(out.detach().to(torch.float64).cpu().numpy() - ref)
    den = np.linalg.norm(ref)
    return float(diff / den) if den > 0 else float(diff)


def make_matrix(seed: int, batch: tuple[int, ...], m: int, n: int, svals: np.ndarray) -> torch.Tensor:
    """A float64 matrix with prescribed singular values (random orthogonal factors)."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    out = np.empty((*batch, m, n))
    for idx in np.ndindex(*batch) if batch else [()]:
        U, _ = np.linalg.qr(rng.standard_normal((m, k)))
        V, _ = np.linalg.qr(rng.standard_normal((n, k)))
        out[idx] = (U * svals[:k]) @ V.T
    return torch.from_numpy(out)


SPECTRA = ["gaussian", "rank_deficient", "wide", "clustered", "below", "one"]


def spectrum(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return np.sort(rng.uniform(0.05, 3.0, k))[::-1]
    if kind == "rank_deficient":
        r = max(1, k // 2)
        return np.concatenate([rng.uniform(0.5, 2.0, r), np.zeros(k - r)])
    if kind == "wide":
        return np.logspace(3, -3, k) if k > 1 else np.array([10.0])
    if kind == "clustered":  # around the clipping bound 1
        return 1.0 + rng.choice([-1, 1], k) * 10.0 ** rng.uniform(-7, -2, k)
    if kind == "below":  # all below the bound, Frobenius norm above it
        return np.full(k, 0.9)
    return np.ones(k)


matrices = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.sampled_from([(), (), (2,), (2, 3)]),
        "m": st.integers(1, 24),
        "n": st.integers(1, 24),
        "kind": st.sampled_from(SPECTRA),
        "log_scale": st.integers(-30, 30),
    }
)


def build(d: dict, dtype=torch.float32, scale: bool = True) -> torch.Tensor:
    rng = np.random.default_rng(d["seed"])
    k = min(d["m"], d["n"])
    s = spectrum(d["kind"], k, rng)
    M = make_matrix(d["seed"], d["batch"], d["m"], d["n"], s)
    if scale:
        M = M * 10.0 ** d["log_scale"]
    return M.to(dtype)


# ---------------------------------------------------------------------------
# msign
# ---------------------------------------------------------------------------
@SETTINGS
@given(matrices)
def test_msign_accurate_meets_contract(d):
    M = build(d)
    O = msign(M)
    assert O.dtype == M.dtype and O.shape == M.shape
    assert rel_err(O, svd_ref(M, np.ones_like)) <= 1e-4


@SETTINGS
@given(matrices, st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
def test_msign_dtypes(d, dtype):
    M = build(d, dtype=dtype, scale=dtype == torch.float64)
    O = msign(M)
    assert O.dtype == dtype and O.shape == M.shape
    if dtype == torch.float64:
        assert rel_err(O, svd_ref(M, np.ones_like, eps=float(np.finfo(np.float64).eps))) <= 1e-10
    else:  # half values are taken as exact and processed like float32; only the output is rounded
        tol = 3 * torch.finfo(dtype).eps
        assert rel_err(O, svd_ref(M, np.ones_like)) <= tol


def test_msign_orthogonal_invariance():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(7, 5, generator=g, dtype=torch.float64)
    P, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    torch.testing.assert_close(msign(P @ R @ Q), P @ msign(R) @ Q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("schedule", ["accurate", "svd", "polar_express", "muon"])
def test_msign_zero_and_empty(schedule):
    assert torch.equal(msign(torch.zeros(3, 4), schedule=schedule), torch.zeros(3, 4))
    assert msign(torch.zeros(0, 4), schedule=schedule).shape == (0, 4)


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e10, 1e30])
@pytest.mark.parametrize("schedule", ["accurate", "polar_express"])
def test_msign_extreme_scales(scale, schedule):
    M = make_matrix(3, (), 12, 20, np.linspace(1.0, 0.5, 12)).float()
    O = msign(M * scale, schedule=schedule, steps=None if schedule == "accurate" else 12)
    assert torch.isfinite(O).all()
    assert rel_err(O, svd_ref(M, np.ones_like)) <= 1e-4


def test_polar_express_scalar_range():
    # Published: Polar Express maps [1e-3, 1] (after its 1.02 safety) into about [0.84, 1.15].
    x = torch.logspace(-3, 0, 2001, dtype=torch.float64) / SCHEDULES["polar_express"].safety
    y = ns_scalar(x, "polar_express")
    assert 0.83 <= float(y.min()) <= 0.86 and 1.13 <= float(y.max()) <= 1.16
    # The quintic tail then converges to 1 on the whole range.
    z = ns_scalar(x, "polar_express", steps=11)
    assert float((z - 1).abs().max()) < 1e-6


def test_deepseek_v4_rows_converge():
    # Eight Keller Jordan steps leave [1e-3, 1] in about [0.68, 1.13]; the two (2, -1.5, 0.5) steps,
    # whose map has f(1) = 1 and f'(1) = 0, settle it within 1 ± 1e-3.
    x = torch.logspace(-3, 0, 2001, dtype=torch.float64)
    mid = ns_scalar(x, "deepseek_v4", steps=8)
    assert 0.6 < float(mid.min()) < 0.75 and 1.1 < float(mid.max()) < 1.2
    y = ns_scalar(x, "deepseek_v4")
    assert float((y - 1).abs().max()) < 1e-3
    assert float((ns_scalar(x, "deepseek_v4", steps=9) - 1).abs().max()) > 1e-2  # the tenth step is needed
    M = make_matrix(7, (), 24, 40, np.logspace(0, -3, 24)).float()
    assert rel_err(msign(M, schedule="deepseek_v4"), svd_ref(M, np.ones_like)) <= 1e-3


def test_muon_scalar_range_is_not_msign():
    y = ns_scalar(torch.logspace(-3, 0, 2001, dtype=torch.float64), "muon")
    assert 0.4 < float(y.min()) < 0.6 and 1.1 < float(y.max()) < 1.3


@SETTINGS
@given(matrices, st.sampled_from(["polar_express", "muon", "minimax", "deepseek_v4"]), st.integers(1, 10))
def test_ns_matrix_equals_scalar_map(d, schedule, steps):
    """NS acts on each singular value by the schedule's scalar polynomials (float64)."""
    M = build(d, dtype=torch.float64, scale=False)
    O = msign(M, schedule=schedule, steps=steps)
    S = np.linalg.svd(M.numpy(), compute_uv=False)
    if SCHEDULES[schedule].gram_scale:  # the start X/((Σσ¹⁶)^{1/16}·safety)
        fro = ((S / S.max(axis=-1, keepdims=True, initial=1e-300)) ** 16).sum(axis=-1, keepdims=True) ** (1 / 16)
        fro = fro * S.max(axis=-1, keepdims=True, initial=0.0)
    else:  # the start X/(‖X‖_F·safety)
        fro = np.sqrt((S**2).sum(axis=-1, keepdims=True))
    x = torch.from_numpy(S / np.where(fro > 0, fro * SCHEDULES[schedule].safety, 1.0))
    expected = ns_scalar(x, schedule, steps=steps)
    ref = svd_ref(M, lambda s: expected.numpy() * (s > 0), rank_convention=False)
    assert rel_err(O, ref) <= 1e-9 or np.linalg.norm(ref) < 1e-12


def test_muon_schedule_matches_torch_optim_muon_bf16():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        G = torch.randn(*shape, generator=g)
        ours = msign(G, schedule="muon", dtype=torch.bfloat16).float()
        peer = _zeropower_via_newtonschulz(G, SCHEDULES["muon"].coeffs[0], 5, 1e-7).float()
        assert float((ours - peer).norm() / peer.norm()) < 0.03  # bf16 rounding of 5 steps


def test_custom_schedule_and_steps():
    M = make_matrix(5, (), 10, 16, np.linspace(1, 0.2, 10)).float()
    rows = [SCHEDULES["polar_express"].coeffs[0]] * 2
    a = msign(M, schedule=rows)
    b = msign(M, schedule="polar_express", steps=1)
    assert not torch.allclose(a, b)  # two steps vs one
    assert SCHEDULES["polar_express"].rows(7)[5:] == [(1.875, -1.25, 0.375)] * 2


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6), (2, 4, 3)])
def test_msign_gradcheck(shape):
    X = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(msign, (X,))


def test_msign_float32_gradient_matches_float64():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(12, 20, generator=g)
    G = torch.randn(12, 20, generator=g)
    x32 = X.clone().requires_grad_()
    (msign(x32) * G).sum().backward()
    x64 = X.double().requires_grad_()
    (msign(x64) * G.double()).sum().backward()
    assert float((x32.grad.double() - x64.grad).norm() / x64.grad.norm()) < 1e-5


def test_msign_gradient_rank_deficient_directional():
    """Finite differences along rank-preserving directions of a rank-3 matrix."""
    rng = np.random.default_rng(0)
    m, n, r = 7, 6, 3
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.array([2.0, 1.0, 0.5])
    M = torch.from_numpy((U[:, :r] * s) @ V[:, :r].T)
    G = torch.from_numpy(rng.standard_normal((m, n)))
    x = M.clone().requires_grad_()
    (msign(x) * G).sum().backward()
    directions = [
        U[:, :r] @ rng.standard_normal((r, r)) @ V[:, :r].T + U[:, r:] @ rng.standard_normal((m - r, r)) @ V[:, :r].T,
        U[:, :r] @ rng.standard_normal((r, n - r)) @ V[:, r:].T,
    ]
    for D in directions:
        D = torch.from_numpy(D)
        h = 1e-6
        fd = ((msign(M + h * D) - msign(M - h * D)) * G).sum() / (2 * h)
        assert abs(float(fd) - float((x.grad * D).sum())) < 1e-6 * max(1.0, abs(float(fd)))


def test_mclip_gradient_flows():
    X = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    X.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mclip(x, 1.5), (X,))


# ---------------------------------------------------------------------------
# mclip
# ---------------------------------------------------------------------------
@SETTINGS
@given(matrices, st.floats(0.1, 10.0))
def test_mclip_accurate_contract(d, bound):
    M = build(d, scale=False) * 3
    C = mclip(M, bound)
    assert C.shape == M.shape and C.dtype == M.dtype
    ref = svd_ref(M, lambda s: np.minimum(s, bound), rank_convention=False)
    assert rel_err(C, ref) <= 1e-4
    top = np.linalg.svd(C.double().numpy(), compute_uv=False).max(initial=0.0)
    assert top <= bound * (1 + 1e-4)


def test_mclip_free_exit_returns_input():
    M = torch.randn(5, 7) * 0.01
    assert torch.equal(mclip(M, 1.0), M)


def test_mclip_batched_mixes_free_exit_and_clipping():
    M = torch.stack([torch.randn(5, 7) * 0.01, torch.randn(5, 7) * 10])
    C = mclip(M, 1.0)
    assert torch.equal(C[0], M[0])
    assert rel_err(C[1], svd_ref(M[1], lambda s: np.minimum(s, 1.0), rank_convention=False)) <= 1e-4


@pytest.mark.parametrize("form", ["denested", "nested"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_mclip_wide_spectrum(form, shape):
    k = min(shape)
    M = make_matrix(9, (), *shape, np.logspace(3, -3, k)).float()
    C = mclip(M, form=form)
    err = rel_err(C, svd_ref(M, lambda s: np.minimum(s, 1.0), rank_convention=False))
    if form == "denested":
        assert err <= 1e-4
    else:  # the seed's trap: σ under the rank threshold get σ/2 instead of σ
        assert 1e-4 < err < 1e-2


def test_nested_vs_denested_on_rank_deficient_input():
    """With a float32 Newton–Schulz msign the nested form amplifies the inner error."""
    s = np.concatenate([np.linspace(3.0, 0.2, 16), np.zeros(16)])
    M = make_matrix(11, (), 32, 48, s).float()
    ref = svd_ref(M, lambda x: np.minimum(x, 1.0), rank_convention=False)
    den = rel_err(mclip(M, schedule="polar_express", steps=12), ref)
    nes = rel_err(mclip(M, schedule="polar_express", steps=12, form="nested"), ref)
    exact = rel_err(mclip(M), ref)
    assert exact <= 1e-4
    assert den < nes


# ---------------------------------------------------------------------------
# mstep, msquare, mpoly
# ---------------------------------------------------------------------------
@SETTINGS
@given(matrices)
def test_mstep_msquare_mpoly(d):
    M = build(d, scale=False)
    rng = np.random.default_rng(d["seed"])
    t = float(rng.uniform(0.3, 2.0))
    S = np.linalg.svd(M.double().numpy(), compute_uv=False)
    if S.size and np.min(np.abs(S / t - 1)) < 1e-3:
        t *= 1.05  # keep σ away from the step's jump
    assert rel_err(mstep(M, t), svd_ref(M, lambda s: (s > t).astype(float), rank_convention=False)) <= 1e-4
    assert rel_err(msquare(M), svd_ref(M, lambda s: s**2)) <= 1e-4
    coeffs = rng.uniform(-1, 1, int(rng.integers(1, 6))).tolist()
    f = np.polynomial.Polynomial(coeffs)
    assert rel_err(mpoly(M, coeffs), svd_ref(M, f)) <= 1e-4


def test_mpoly_odd_needs_no_msign():
    M = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(mpoly(M, [0, 2, 0, 1]), 2 * M + M @ M.mT @ M)


# ---------------------------------------------------------------------------
# spectral_norm and inv_sqrt
# ---------------------------------------------------------------------------
@SETTINGS
@given(matrices)
def test_spectral_norm(d):
    M = build(d, dtype=torch.float64, scale=False)
    ref = torch.linalg.matrix_norm(M, ord=2)
    torch.testing.assert_close(spectral_norm(M), ref, rtol=1e-6, atol=1e-12)


def test_spectral_norm_gradient_is_top_singular_pair():
    M = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    spectral_norm(M).backward()
    U, S, Vh = torch.linalg.svd(M.detach())
    torch.testing.assert_close(M.grad, torch.outer(U[:, 0], Vh[0]), atol=1e-6, rtol=0)


def spd(n: int, cond: float, seed: int, batch=()) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = np.empty((*batch, n, n))
    for idx in np.ndindex(*batch) if batch else [()]:
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        out[idx] = (Q * np.logspace(0, -math.log10(cond), n)) @ Q.T
    return torch.from_numpy(out)


@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_inv_sqrt(method, batch):
    A = spd(8, 50.0, 0, batch)
    R = inv_sqrt(A, method=method)
    lam, Q = np.linalg.eigh(A.numpy())
    ref = (Q / np.sqrt(lam)[..., None, :]) @ np.swapaxes(Q, -1, -2)
    assert rel_err(R, ref) < 1e-8


def test_inv_sqrt_fixed_iterations_float32():
    A = spd(6, 5.0, 1).float()
    R = inv_sqrt(A, method="newton_schulz", iters=30)
    assert R.dtype == torch.float32
    torch.testing.assert_close(R @ A @ R, torch.eye(6), atol=1e-4, rtol=0)


def test_inv_sqrt_gradient_finite_at_identity():
    A = spd(5, 10.0, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: inv_sqrt(0.5 * (a + a.mT)), (A,))
    eye = torch.eye(4, dtype=torch.float64, requires_grad=True)
    G = torch.randn(4, 4, dtype=torch.float64)
    (inv_sqrt(eye) * G).sum().backward()
    # d(A^{-1/2}) = −½ dA at A = I (symmetric part of G).
    torch.testing.assert_close(eye.grad, -0.25 * (G + G.T))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [msign, mclip, mstep, msquare, spectral_norm, lambda M: mpoly(M, [0, 1])])
def test_bad_input_errors(fn):
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="dtype"):
        fn(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fn(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(np.ones((2, 2)))


def test_bad_arguments():
    M = torch.randn(3, 4)
    with pytest.raises(ValueError, match="schedule='nope'"):
        msign(M, schedule="nope")
    with pytest.raises(ValueError, match=r"\(a, b, c\) triples"):
        msign(M, schedule=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="bound"):
        mclip(M, -1.0)
    with pytest.raises(ValueError, match="form"):
        mclip(M, form="other")
    with pytest.raises(ValueError, match="threshold"):
        mstep(M, 0.0)
    with pytest.raises(ValueError, match="coeffs"):
        mpoly(M, [])
    with pytest.raises(ValueError, match="square"):
        inv_sqrt(M)
    with pytest.raises(ValueError, match="symmetric"):
        inv_sqrt(torch.tensor([[2.0, 1.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="positive definite"):
        inv_sqrt(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="method"):
        inv_sqrt(torch.eye(2), method="svd")
