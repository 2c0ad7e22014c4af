"""Fuzz battery for steepest.linalg: every public function, any shape, rank, scale, dtype, NaN/Inf.

Each generated case either matches a float64 SVD/eigh reference within the
documented tolerance, or raises a ValueError/TypeError that names the argument.
Never a silent NaN, never a result outside its contract. Seeded (derandomize), so
CI runs the same cases every time; the count is printed in the terminal summary.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steepest.linalg import inv_sqrt, mclamp, mclip, mpoly, msign, msquare, mstep, spectral_norm

FUZZ: Counter = Counter()
FUZZ_SETTINGS = settings(max_examples=1500, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Accuracy of the exact routes against float64, by input dtype: the result is rounded to it.
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}
NS_TOL = 2e-2  # the Newton–Schulz contract (1e-2) plus the result's rounding in half precision

case = st.fixed_dictionaries({
    "batch": st.sampled_from([(), (), (2,), (1, 2)]),
    "m": st.integers(1, 7), "n": st.integers(1, 7),
    "rank": st.integers(0, 7),
    "log_scale": st.sampled_from([-30, -20, -8, 0, 0, 0, 3, 8, 20, 30]),
    "dtype": st.sampled_from(list(DTYPES)),
    "bad": st.sampled_from([None] * 8 + ["nan", "inf"]),
    "kind": st.sampled_from(["uniform", "spread", "equal"]),
    "seed": st.integers(0, 2**31 - 1),
})


def _matrix(d: dict) -> tuple[torch.Tensor, np.ndarray]:
    """The input in its dtype, and its exact value in float64 (what the reference sees)."""
    rng = np.random.default_rng(d["seed"])
    m, n = d["m"], d["n"]
    k = min(m, n)
    r = min(d["rank"], k)
    out = np.zeros((*d["batch"], m, n))
    for idx in np.ndindex(*d["batch"]) if d["batch"] else [()]:
        s = {"uniform": rng.uniform(0.1, 1.0, r), "spread": np.logspace(0, -3, r), "equal": np.ones(r)}[d["kind"]]
        U, _ = np.linalg.qr(rng.standard_normal((m, k)))
        V, _ = np.linalg.qr(rng.standard_normal((n, k)))
        out[idx] = (U[:, :r] * s) @ V[:, :r].T
    out *= 10.0 ** d["log_scale"]
    if d["bad"] and out.size:
        out.reshape(-1)[rng.integers(out.size)] = np.nan if d["bad"] == "nan" else np.inf
    M = torch.from_numpy(out).to(DTYPES[d["dtype"]])
    return M, M.double().numpy()


def _svd_apply(A: np.ndarray, f, eps: float, band: float = 1.0) -> np.ndarray:
    """U f(Σ) Vᵀ with the library's rank convention (σ ≤ max(m, n)·eps·σ_max count as zero) times ``band``."""
    U, S, Vh = np.linalg.svd(A, full_matrices=False)
    tol = max(A.shape[-2:]) * eps * S.max(axis=-1, keepdims=True, initial=0.0) * band
    return (U * np.where(S > tol, f(S), 0.0)[..., None, :]) @ Vh


def _close(out: torch.Tensor, refs: list[np.ndarray], tol: float) -> bool:
    """Within tol (relative, Frobenius, per matrix) of one of the references (the rank decision is ambiguous
    for singular values right at the threshold, so the reference is taken with it halved and doubled).

    The references are rounded to the result's dtype first: what underflows there is 0 for both."""
    got = out.double().numpy()
    for ref in refs:
        ref = torch.from_numpy(ref).to(out.dtype).double().numpy()
        den = np.linalg.norm(ref, axis=(-2, -1))
        err = np.linalg.norm(got - ref, axis=(-2, -1))
        if np.all(err <= tol * np.maximum(den, 1e-300) + 1e-300):
            return True
    return False


def _refs(A: np.ndarray, f, eps: float) -> list[np.ndarray]:
    return [_svd_apply(A, f, eps, band) for band in (1.0, 0.5, 2.0)]


def _expect_refusal(fn, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b.*NaN or Inf"):
        fn()


@FUZZ_SETTINGS
@given(case)
def test_fuzz_singular_value_functions(d):
    M, A = _matrix(d)
    dtype = M.dtype
    eps = float(torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps)
    FUZZ["linalg"] += 1
    if not np.isfinite(A).all():  # NaN/Inf given, or a float16 overflow of 1e8…1e30
        for fn in (msign, lambda x: mclip(x, 1.0), lambda x: mclamp(x, 0.1, 1.0), lambda x: mstep(x, 1.0),
                   lambda x: mpoly(x, [0, 1]), spectral_norm):
            _expect_refusal(lambda: fn(M), "M")
        return
    smax = np.linalg.svd(A, compute_uv=False).max(initial=0.0) if A.size else 0.0
    c = 0.5 * smax if smax > 0 else 1.0
    tol = TOL[dtype]
    checks = {
        "msign": (lambda: msign(M), lambda s: np.ones_like(s)),
        "mclip": (lambda: mclip(M, c), lambda s: np.minimum(s, c)),
        "mclamp": (lambda: mclamp(M, 0.2 * c, c), lambda s: np.clip(s, 0.2 * c, c)),
        "mpoly": (lambda: mpoly(M, [0.0, 1.0, 0.0, -0.5 / c**2]), lambda s: s - 0.5 * s**3 / c**2),
        "msquare": (lambda: msquare(M), lambda s: s**2),
    }
    for name, (call, f) in checks.items():
        if np.abs(_svd_apply(A, f, 0.0)).max(initial=0.0) > float(torch.finfo(dtype).max) / 2:
            with pytest.raises(ValueError, match="overflows"):  # the result is beyond the dtype's range
                call()
            continue
        out = call()
        assert out.shape == M.shape and out.dtype == dtype, name
        assert torch.isfinite(out).all(), f"{name}: non-finite result"
        if name in ("mclip", "mclamp"):  # small singular values pass through a clip: no rank convention there
            refs = [_svd_apply(A, f, 0.0)] + _refs(A, f, eps)
        else:
            refs = _refs(A, f, eps)
        assert _close(out, refs, tol), name
    sv = np.linalg.svd(A, compute_uv=False) if A.size else np.zeros(0)
    if sv.size and np.all(np.abs(sv / c - 1) > 1e-6):
        assert _close(mstep(M, c), _refs(A, lambda s: (s > c).astype(float), eps), tol), "mstep"
    got = spectral_norm(M)
    assert got.shape == M.shape[:-2] and torch.isfinite(got).all()
    want = np.linalg.svd(A, compute_uv=False).max(axis=-1, initial=0.0) if A.size else np.zeros(M.shape[:-2])
    assert np.allclose(got.double().numpy(), want, rtol=max(tol, 1e-6) * 10, atol=0), "spectral_norm"


@FUZZ_SETTINGS
@given(case, st.sampled_from(["polar_express", "muon", "minimax"]), st.sampled_from([0.01, 0.3, 1.0, 2.0]))
def test_fuzz_newton_schulz_contracts(d, schedule, ratio):
    M, A = _matrix(d)
    FUZZ["linalg"] += 1
    if not np.isfinite(A).all():
        _expect_refusal(lambda: mclip(M, 1.0, schedule=schedule), "M")
        _expect_refusal(lambda: msign(M, schedule=schedule), "M")
        return
    smax = np.linalg.svd(A, compute_uv=False).max(initial=0.0) if A.size else 0.0
    if smax == 0:
        assert torch.equal(mclip(M, 1.0, schedule=schedule), M)
        return
    c = ratio * smax
    C = mclip(M, c, schedule=schedule)
    assert C.dtype == M.dtype and torch.isfinite(C).all()
    top = np.linalg.svd(C.double().numpy(), compute_uv=False).max()
    assert top <= c * (1 + NS_TOL)
    assert _close(C, [_svd_apply(A, lambda s: np.minimum(s, c), 0.0)], NS_TOL)
    O = msign(M, schedule=schedule)
    assert O.shape == M.shape and torch.isfinite(O).all()
    assert np.linalg.svd(O.double().numpy(), compute_uv=False).max() <= 1.5  # NS never amplifies past its range


@settings(max_examples=700, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 7), st.sampled_from([(), (2,)]), st.sampled_from([-30, -10, 0, 10, 30]),
       st.sampled_from(list(DTYPES)), st.sampled_from(["eigh", "newton_schulz"]), st.integers(0, 2**31 - 1),
       st.sampled_from([None] * 6 + ["nan", "asym", "indefinite"]))
def test_fuzz_inv_sqrt(n, batch, log_scale, dtype_name, method, seed, bad):
    FUZZ["linalg"] += 1
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((*batch, n + 2, n))
    A64 = (np.swapaxes(X, -1, -2) @ X / (n + 2) + 0.1 * np.eye(n)) * 10.0 ** log_scale
    if bad == "nan":
        A64.reshape(-1)[0] = np.nan
    elif bad == "asym" and n > 1:
        A64[..., 0, 1] += abs(A64[..., 0, 0]) * 0.5 + 1.0
    elif bad == "indefinite":
        A64 = A64 - 2 * np.abs(A64).max() * np.eye(n) if np.abs(A64).max() > 0 else -np.eye(n)
    A = torch.from_numpy(A64).to(DTYPES[dtype_name])
    A = 0.5 * (A + A.mT) if bad != "asym" else A
    exact = A.double().numpy()
    if not np.isfinite(exact).all():
        with pytest.raises(ValueError, match=r"\bA\b.*NaN or Inf"):
            inv_sqrt(A, method=method)
        return
    lam = np.linalg.eigvalsh(0.5 * (exact + np.swapaxes(exact, -1, -2)))
    if (bad == "asym" and n > 1) or lam.min() <= 0:
        with pytest.raises(ValueError, match="symmetric|positive definite"):
            inv_sqrt(A, method=method)
        return
    out = inv_sqrt(A, method=method)
    assert out.dtype == A.dtype and torch.isfinite(out).all()
    w, Q = np.linalg.eigh(exact)
    ref = (Q * w[..., None, :] ** -0.5) @ np.swapaxes(Q, -1, -2)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}[A.dtype]
    tol = max(tol, 1e-4) if method == "newton_schulz" else tol  # stopped at tol = 1e-6 on ‖T − I‖
    err = np.linalg.norm(out.double().numpy() - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))
    assert np.all(err <= tol), err


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from(["bound", "threshold", "coeffs", "schedule", "steps", "form", "dtype", "M"]))
def test_fuzz_bad_arguments_are_named(which):
    FUZZ["linalg"] += 1
    M = torch.randn(3, 4)
    calls = {
        "bound": (lambda: mclip(M, -1.0), ValueError),
        "threshold": (lambda: mstep(M, float("nan")), ValueError),
        "coeffs": (lambda: mpoly(M, []), ValueError),
        "schedule": (lambda: msign(M, schedule="fast"), ValueError),
        "steps": (lambda: mclip(M, 1.0, schedule="polar_express", steps=-1), ValueError),
        "form": (lambda: mclip(M, 1.0, form="twice"), ValueError),
        "dtype": (lambda: msign(M.to(torch.int32)), TypeError),
        "M": (lambda: msign([[1.0, 2.0]]), TypeError),
    }
    fn, exc = calls[which]
    with pytest.raises(exc, match="steps|dtype|M|" + which):
        fn()
