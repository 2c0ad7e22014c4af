"""Fuzz battery for steepest.isotropy: every public function over shapes, ranks, scales, dtypes and bad values.

Each generated case either matches an independent float64 reference (numpy SVD /
eigh on the same rounded inputs) within the tolerance below, or raises a
ValueError / TypeError naming the argument. Never a silent NaN or Inf, never a
value outside the contract. Seeded (``derandomize=True``); the last test checks
how many cases ran.

Tolerances (u = unit roundoff of the output's dtype, u₆₄ = 2⁻⁵³; σ the singular values
of X, λ the eigenvalues of the matrix whose inverse square root is taken, ε' its
regulariser):

* ``whiten`` / ``Whitening`` (Gram matrices in float64): in each direction the
  relative error is at most ``δ/(λ_i + ε')`` with ``δ = 8·n·u₆₄·λ_max``, so
  ``‖ΔY‖_F ≤ Σ_i δ/(λ_i + ε')·|y_i| + 2u·‖Y‖_F`` (y_i the output's component);
* ``isotropy_metrics``: every entry within ``1e-9`` (relative) of numpy, except a
  condition number within a factor 10 of the documented "singular" threshold;
* ``feature_alignment``: ``|Δcos| ≤ 4(b + d)·u_c·‖X‖²‖G‖/‖XXᵀG‖`` (sgd),
  ``… · σ_max/σ_min`` of the kept singular values (muon; cases whose spectrum
  straddles the rank threshold are skipped), and sign flips of entries of XᵀG
  below their rounding (signsgd).
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from steepest.isotropy import (
    AlignmentMonitor,
    Whitening,
    feature_alignment,
    isotropy_metrics,
    steepest_feature_direction,
    whiten,
)

CASES: Counter[str] = Counter()  # per test
FUZZ: Counter[str] = Counter()  # this module's total, read by the shared summary hook in conftest.py


def _count(test: str) -> None:
    CASES[test] += 1
    FUZZ["isotropy"] += 1
MIN_CASES = 1300
_BASE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(n: int) -> settings:
    return settings(_BASE, max_examples=n)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [None, None, None, None, None, "nan", "inf"]
U64 = 2.0**-53


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _refused(exc: BaseException, *names: str) -> None:
    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
    assert any(n in str(exc) for n in names), f"{exc!r} does not name {names}"


def _matrix(rng: np.random.Generator, shape: tuple[int, ...], rank: int, log10_scale: int) -> np.ndarray:
    """A (…, n, d) matrix of rank ≤ ``rank`` with entries of size 10^log10_scale."""
    *batch, n, d = shape
    r = max(0, min(rank, n, d))
    A = rng.standard_normal((*batch, n, r)) @ rng.standard_normal((*batch, r, d)) / math.sqrt(max(r, 1))
    return 10.0**log10_scale * A


def _cast(a: np.ndarray, dtype: torch.dtype, special: str | None, rng: np.random.Generator) -> torch.Tensor:
    a = a.copy()
    if special is not None and a.size:
        a.flat[rng.integers(a.size)] = float(special)
    return torch.tensor(a).to(dtype)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- whiten
def _ref_whiten(X: np.ndarray, centered: bool, eps: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Y by SVD (float64), the λ_i + ε' per direction, and δ."""
    n = X.shape[-2]
    Xw = X - X.mean(-2, keepdims=True) if centered else X
    U, s, Vt = np.linalg.svd(Xw, full_matrices=False)
    lam = s**2 / n if centered else s**2
    # the documented floor: ε raised to min(n, d)·u₆₄·tr of the Gram matrix (in the covariance's scale)
    e = np.maximum(eps, min(X.shape[-2:]) * 2 * U64 * lam.sum(-1, keepdims=True)) if eps > 0 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(lam + e > 0, 1.0 / np.sqrt(lam + e), 0.0)
    Y = (U * (s * gain)[..., None, :]) @ Vt
    delta = 8 * max(X.shape[-2], X.shape[-1]) * U64 * float(lam.max(initial=0.0))
    return Y, lam + e, delta


@st.composite
def whiten_cases(draw):
    return dict(
        batch=draw(st.sampled_from([(), (), (2,)])),
        n=draw(st.integers(1, 6)),
        d=draw(st.integers(1, 6)),
        rank=draw(st.integers(0, 6)),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_scale=draw(st.integers(-30, 30)),
        centered=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 0.0, 1e-5, 1e-2, 1.0])),
        special=draw(st.sampled_from(SPECIALS)),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(400)
@given(case=whiten_cases())
def test_fuzz_whiten(case):
    _count("whiten")
    rng = np.random.default_rng(case["seed"])
    shape = (*case["batch"], case["n"], case["d"])
    X = _cast(_matrix(rng, shape, case["rank"], case["log10_scale"]), case["dtype"], case["special"], rng)
    n, d, eps, centered = case["n"], case["d"], case["eps"], case["centered"]
    try:
        Y = whiten(X, centered=centered, eps=eps)
    except (ValueError, TypeError) as exc:
        Xd = X.double().numpy()
        ok_refusal = not _finite(X) or (centered and n < 2)
        if not ok_refusal and eps == 0:
            Xw = Xd - Xd.mean(-2, keepdims=True) if centered else Xd
            s = np.linalg.svd(Xw, compute_uv=False)
            # singular (to float64 resolution of the Gram matrix): refusing is the contract
            ok_refusal = bool((s.min(-1) ** 2 <= 1e3 * max(n, d) * U64 * s.max(-1) ** 2).any()) or (centered and n <= d)
        assert ok_refusal, f"valid input refused: {exc!r}"
        _refused(exc, "X", "eps", "singular", "centered")
        return
    assert _finite(X) and Y.shape == X.shape and Y.dtype == X.dtype and _finite(Y)
    Yr, lam_e, delta = _ref_whiten(X.double().numpy(), centered, eps)
    # centering cancels: X − μ is known to ~u₆₄·|X| only, amplified by the largest gain
    with np.errstate(divide="ignore"):
        gain = np.where(lam_e > 0, 1 / np.sqrt(np.where(lam_e > 0, lam_e, 1.0)), 0.0).max(-1, initial=0.0)
    center_err = 8 * U64 * np.abs(X.double().numpy()).max(axis=(-2, -1)) * math.sqrt(n * d) * gain * (math.sqrt(n) if centered else 0.0)
    # per-direction error δ/(λ+ε'), applied to the output's size in that direction
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(lam_e > 0, delta / lam_e, 0.0).max(-1, initial=0.0)
    ynorm = np.linalg.norm(Yr, axis=(-2, -1))
    tol = 4 * rel * ynorm + (2 * _u(X.dtype) * math.sqrt(n * d) + 64 * (n + d) * U64) * ynorm + center_err + 4 * torch.finfo(X.dtype).tiny
    err = np.linalg.norm(Y.double().numpy() - Yr, axis=(-2, -1))
    assert np.all(err <= tol), (err, tol)


# ----------------------------------------------------------------------------- Whitening
@st.composite
def whitening_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    return dict(
        B=draw(st.integers(1, 9)),
        c=draw(st.integers(1, 4)),
        groups=groups,
        spatial=draw(st.sampled_from([(), (), (2,)])),
        rank=draw(st.integers(0, 8)),
        dtype=draw(st.sampled_from(DTYPES)),
        module64=draw(st.booleans()),
        log10_scale=draw(st.integers(-30, 30)),
        centered=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 1e-5, 1e-5, 1e-2])),
        track=draw(st.booleans()),
        method=draw(st.sampled_from(["eigh", "eigh", "newton_schulz"])),
        special=draw(st.sampled_from(SPECIALS)),
        seed=draw(st.integers(0, 2**16)),
    )


def _ref_zca(F: np.ndarray, centered: bool, eps: float, G: int) -> tuple[np.ndarray, float]:
    """Group-wise (F − μ)(Σ + ε'I)^{-1/2} by numpy eigh (ε' the documented floor) and a tolerance."""
    N, C = F.shape
    c = C // G
    out = np.empty_like(F)
    tol2 = 0.0
    for g in range(G):
        Fg = F[:, g * c : (g + 1) * c]
        Xc = Fg - Fg.mean(0) if centered else Fg
        S = Xc.T @ Xc / N
        e = max(eps, c * 2 * U64 * max(np.trace(S), 0.0)) if eps > 0 else 0.0
        lam, Q = np.linalg.eigh(S)
        Y = Xc @ (Q / np.sqrt(np.clip(lam, 0, None) + e)) @ Q.T
        out[:, g * c : (g + 1) * c] = Y
        delta = 8 * N * c * U64 * max(float(lam.max()), 0.0)
        rel = delta / max(float((np.clip(lam, 0, None) + e).min()), 1e-300)
        tol2 += (rel * np.linalg.norm(Y)) ** 2
        # centering cancels: X − μ is known to ~u·|X| only, amplified by the largest gain
        gain = 1.0 / math.sqrt(max(float((np.clip(lam, 0, None) + e).min()), 1e-300))
        tol2 += (8 * U64 * float(np.abs(Fg).max(initial=0.0)) * math.sqrt(N * c) * gain) ** 2
    return out, math.sqrt(tol2)


@fuzz(350)
@given(case=whitening_cases())
def test_fuzz_whitening(case):
    _count("Whitening")
    rng = np.random.default_rng(case["seed"])
    G, c = case["groups"], case["c"]
    C = G * c
    B, sp = case["B"], case["spatial"]
    N = B * int(np.prod(sp)) if sp else B
    F = _matrix(rng, (N, C), case["rank"], case["log10_scale"]) + 10.0 ** case["log10_scale"] * rng.standard_normal(C) * 0.3
    x = _cast(F.reshape(B, *sp, C), case["dtype"], case["special"], rng).movedim(-1, 1)
    m = Whitening(C, centered=case["centered"], eps=case["eps"], groups=G, affine=False,
                  track_running_stats=case["track"], method=case["method"])
    if case["module64"]:
        m = m.double()
    try:
        y = m(x)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        Fd = x.movedim(1, -1).reshape(N, C).double().numpy()
        allowed = not _finite(x) or N < 2
        if "overflow" in msg:  # statistics beyond the buffers' dtype
            allowed = allowed or float(np.abs(Fd).max()) ** 2 > torch.finfo(m.running_cov.dtype).max / 1e3
        if case["eps"] == 0:
            allowed = allowed or N <= c or "singular" in msg
        assert allowed, f"valid input refused: {exc!r}"
        _refused(exc, "input", "eps", "running_cov", "running_mean", "samples")
        return
    assert _finite(x) and N >= 2 and y.shape == x.shape and y.dtype == x.dtype and _finite(y)
    Fd = x.movedim(1, -1).reshape(N, C).double().numpy()
    if case["method"] == "newton_schulz":
        return  # converged NS agrees with eigh to its own tolerance; checked in test_isotropy
    ref, tol = _ref_zca(Fd, case["centered"], case["eps"], G)
    if case["eps"] == 0 and N <= c:
        return
    got = y.movedim(1, -1).reshape(N, C).double().numpy()
    tol = 4 * tol + (4 * _u(x.dtype) + 64 * (N + c) * U64) * np.linalg.norm(ref) + 1e-300
    assert np.linalg.norm(got - ref) <= tol, (np.linalg.norm(got - ref), tol)
    if case["track"]:  # eval: per example, with the running statistics, never NaN
        m.eval()
        with torch.no_grad():
            ye = m(x[:1])
        assert ye.shape == x[:1].shape and _finite(ye)


@fuzz(250)
@given(B=st.integers(1, 9), C=st.sampled_from([1, 3, 6, 12]), rank=st.integers(0, 12), log10_scale=st.integers(-30, 30),
       dtype=st.sampled_from(DTYPES), special=st.sampled_from(SPECIALS), centered=st.booleans(),
       train_stats=st.sampled_from(["batch", "running"]), shrinkage=st.sampled_from([0.0, 0.3, 1.0]),
       rho=st.sampled_from([0.0, 0.5, 0.9]), eps=st.sampled_from([0.0, 1e-5, 1e-2]), seed=st.integers(0, 2**16))
def test_fuzz_whitening_new_options(B, C, rank, log10_scale, dtype, special, centered, train_stats, shrinkage, rho, eps,
                                    seed):
    """Running statistics in training, shrinkage and sample decorrelation on ranks 0..full, entries 1e-30..1e30,
    four dtypes and NaN/Inf: a finite output of the input's shape and dtype (train and eval), or a refusal that
    names its reason; the decorrelated Gram spectrum follows k ↦ k̄k / (ρk + (1 − ρ)k̄)."""
    _count("Whitening")
    rng = np.random.default_rng(seed)
    F = _matrix(rng, (B, C), rank, log10_scale)
    x = _cast(F, dtype, special, rng).double() if dtype == torch.float64 else _cast(F, dtype, special, rng)
    kw = dict(centered=centered, eps=eps, affine=False, train_stats=train_stats, shrinkage=shrinkage)
    m = Whitening(C, **kw, sample_decorrelation=rho).double()
    try:
        y = m(x)
    except (ValueError, TypeError) as exc:
        allowed = not _finite(x) or B < 2 or "overflow" in str(exc) or (eps == 0 and "singular" in str(exc))
        allowed = allowed or (eps == 0 and shrinkage == 0 and B <= C)
        assert allowed, f"valid input refused: {exc!r}"
        _refused(exc, "input", "eps", "running_cov", "running_mean", "samples", "sample")
        return
    assert _finite(x) and B >= 2 and y.shape == x.shape and y.dtype == x.dtype and _finite(y)
    if rho and dtype == torch.float64 and 1e-100 < float(x.abs().max()) and abs(log10_scale) <= 8:
        plain = Whitening(C, **kw).double()
        y0 = plain(x).detach().numpy()
        k = np.linalg.eigvalsh(y0 @ y0.T)
        kbar = k.sum() / B
        if kbar > 0:
            expect = np.sort(kbar * k / (rho * k + (1 - rho) * kbar))
            got = np.linalg.eigvalsh(y.detach().numpy() @ y.detach().numpy().T)
            assert np.allclose(got, expect, atol=1e-6 * kbar * B), (got, expect)
    m.eval()
    with torch.no_grad():
        ye = m(x[:1])
    assert ye.shape == x[:1].shape and _finite(ye)


# ----------------------------------------------------------------------------- isotropy_metrics
@fuzz(300)
@given(n=st.integers(0, 7), d=st.integers(1, 7), rank=st.integers(0, 7), dtype=st.sampled_from(DTYPES),
       log10_scale=st.integers(-30, 30), special=st.sampled_from(SPECIALS), zero_row=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_isotropy_metrics(n, d, rank, dtype, log10_scale, special, zero_row, seed):
    _count("metrics")
    rng = np.random.default_rng(seed)
    A = _matrix(rng, (n, d), rank, log10_scale)
    if zero_row and n:
        A[rng.integers(n)] = 0.0
    X = _cast(A, dtype, special, rng)
    try:
        out = isotropy_metrics(X)
    except (ValueError, TypeError) as exc:
        assert n < 2 or not _finite(X), f"valid input refused: {exc!r}"
        _refused(exc, "X")
        return
    assert n >= 2 and _finite(X)
    Xd = X.double().numpy()
    for k, v in out.items():
        assert isinstance(v, float) and not math.isnan(v), (k, v)
    s = np.linalg.svd(Xd, compute_uv=False)
    K = Xd @ Xd.T
    fro2, tr = float((K * K).sum()), float(np.trace(K))
    gd = math.sqrt(max(0.0, 1 - tr * tr / (n * fro2))) if fro2 > 0 else 0.0
    assert out["gram_distance"] == pytest.approx(gd, rel=1e-9, abs=1e-7)
    assert 0.0 <= out["gram_distance"] <= 1.0
    if s.sum() > 0:
        p = s / s.sum()
        p = p[p > 0]
        er = float(np.exp(-(p * np.log(p)).sum()))
        assert out["effective_rank"] == pytest.approx(er, rel=1e-9)
        assert 1.0 - 1e-12 <= out["effective_rank"] <= min(n, d) + 1e-9
    else:
        assert out["effective_rank"] == 0.0  # documented: a zero matrix has effective rank 0
    Xc = Xd - Xd.mean(0)
    ev = np.linalg.eigvalsh(Xc.T @ Xc / n)
    thr = d * 1e3 * 2 * U64 * ev[-1]
    if ev[-1] <= 0 or ev[0] <= thr / 10:
        assert out["condition_number"] == math.inf or ev[0] > thr / 10
    elif ev[0] > 10 * thr:
        assert out["condition_number"] == pytest.approx(ev[-1] / ev[0], rel=1e-6)
    assert out["condition_number"] >= 1.0
    nrm = np.linalg.norm(Xd, axis=1)
    Uu = np.where(nrm[:, None] > 0, Xd / np.where(nrm > 0, nrm, 1.0)[:, None], 0.0)
    Cm = Uu @ Uu.T
    mc = float((Cm.sum() - np.trace(Cm)) / (n * (n - 1)))
    assert out["mean_cosine"] == pytest.approx(mc, rel=1e-9, abs=1e-12)
    assert -1.0 - 1e-12 <= out["mean_cosine"] <= 1.0 + 1e-12


# ----------------------------------------------------------------------------- feature_alignment
def _np_msign(M: np.ndarray, keep: np.ndarray) -> np.ndarray:
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return (U * keep[..., None, :]) @ Vt


@st.composite
def alignment_cases(draw):
    return dict(
        batch=draw(st.sampled_from([(), (), (2,)])),
        b=draw(st.integers(1, 6)),
        d_in=draw(st.integers(1, 5)),
        d_out=draw(st.integers(1, 5)),
        rank=draw(st.integers(0, 5)),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_x=draw(st.integers(-30, 30)),
        log10_g=draw(st.integers(-30, 30)),
        rule=draw(st.sampled_from(["sgd", "muon", "signsgd", "SGD"])),
        special=draw(st.sampled_from(SPECIALS)),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(400)
@given(case=alignment_cases())
def test_fuzz_feature_alignment(case):
    _count("alignment")
    rng = np.random.default_rng(case["seed"])
    bt, b, dtype = case["batch"], case["b"], case["dtype"]
    X = _cast(_matrix(rng, (*bt, b, case["d_in"]), case["rank"], case["log10_x"]), dtype, case["special"], rng)
    G = _cast(_matrix(rng, (*bt, b, case["d_out"]), 5, case["log10_g"]), dtype, None, rng)
    rule = case["rule"].lower()
    try:
        cos = feature_alignment(X, G, case["rule"])
        D = steepest_feature_direction(G, case["rule"])
    except (ValueError, TypeError) as exc:
        assert not _finite(X) or not _finite(G), f"valid input refused: {exc!r}"
        _refused(exc, "X", "G")
        return
    assert _finite(X) and _finite(G)
    assert cos.shape == bt and _finite(cos) and bool((cos.abs() <= 1 + 1e-6).all())
    assert D.shape == G.shape and _finite(D)
    Xd, Gd = X.double().numpy(), G.double().numpy()
    uc = _u(_compute(dtype))
    nx = np.linalg.norm(Xd, axis=(-2, -1))
    ng = np.linalg.norm(Gd, axis=(-2, -1))
    M = np.swapaxes(Xd, -1, -2) @ Gd
    if rule == "sgd":
        dW, Dr = -M, -Gd
        dY = Xd @ dW
        with np.errstate(divide="ignore", invalid="ignore"):
            tol = np.where(np.linalg.norm(dY, axis=(-2, -1)) > 0,
                           8 * (b + case["d_in"]) * uc * nx**2 * ng / np.linalg.norm(dY, axis=(-2, -1)), 2.0)
    elif rule == "signsgd":
        dW, Dr = -np.sign(M), -np.sign(Gd)
        dY = Xd @ dW
        # entries of XᵀG within their rounding may flip sign: each flip moves XΔW by 2|X[:, i]|
        bound = 4 * (b + 2) * uc * (np.swapaxes(np.abs(Xd), -1, -2) @ np.abs(Gd))
        amb = np.abs(M) <= bound
        colnorm = np.linalg.norm(Xd, axis=-2)  # (…, d_in)
        shift = 2 * np.sqrt((amb * colnorm[..., :, None] ** 2).sum((-2, -1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            tol = np.where(np.linalg.norm(dY, axis=(-2, -1)) > 0, 2 * shift / np.linalg.norm(dY, axis=(-2, -1)), 2.0)
        tol = tol + 1e-5
    else:
        s = np.linalg.svd(M, compute_uv=False)
        smax = s.max(-1, initial=0.0)[..., None]
        rtol = max(M.shape[-2:]) * 2 * uc
        noise = 8 * (b + 2) * uc * (np.swapaxes(np.abs(Xd), -1, -2) @ np.abs(Gd))
        noise_s = np.linalg.norm(noise, axis=(-2, -1))[..., None]
        keep = s > np.maximum(rtol * smax, 0)
        hi = s > 10 * np.maximum(rtol * smax, noise_s)
        lo = s < np.minimum(rtol * smax, smax) / 10
        if not bool((hi | lo | (s == 0)).all()):
            return  # the spectrum straddles the rank threshold: either answer is right
        keep = hi
        dW = -_np_msign(M, keep.astype(float))
        sg = np.linalg.svd(Gd, compute_uv=False)
        gmax = sg.max(-1, initial=0.0)[..., None]
        gkeep = sg > max(Gd.shape[-2:]) * 2 * _u(_compute(dtype)) * gmax
        gthr = max(Gd.shape[-2:]) * 2 * uc * gmax
        if not bool(((sg > 10 * gthr) | (sg < gthr / 10)).all()):
            return
        Dr = -_np_msign(Gd, gkeep.astype(float))
        dY = Xd @ dW
        smin = np.where(keep, s, np.inf).min(-1)
        gmin = np.where(gkeep, sg, np.inf).min(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            kx = np.where(np.isfinite(smin), noise_s[..., 0] / smin, 0.0)
            kg = np.where(np.isfinite(gmin), 8 * max(Gd.shape[-2:]) * uc * gmax[..., 0] / gmin, 0.0)
            tol = 8 * (kx + kg) + 8 * (b + case["d_in"]) * uc * np.where(
                np.linalg.norm(dY, axis=(-2, -1)) > 0, nx * np.linalg.norm(dW, axis=(-2, -1)) / np.linalg.norm(dY, axis=(-2, -1)), 0.0)
    num = (dY * Dr).sum((-2, -1))
    den = np.linalg.norm(dY, axis=(-2, -1)) * np.linalg.norm(Dr, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    err = np.abs(cos.double().numpy() - ref)
    assert np.all(err <= tol + 1e-6), (cos, ref, tol)
    if rule in ("sgd", "signsgd"):
        np.testing.assert_array_equal(D.double().numpy(), Dr.astype(np.float64) if rule == "signsgd" else Dr)


# ----------------------------------------------------------------------------- AlignmentMonitor
@st.composite
def monitor_cases(draw):
    return dict(
        d_in=draw(st.integers(1, 4)),
        d_out=draw(st.integers(1, 4)),
        bias=draw(st.booleans()),
        micro=draw(st.integers(1, 3)),
        steps=draw(st.integers(1, 3)),
        opt=draw(st.sampled_from(["sgd", "adam", "lbfgs", "sgd_momentum"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        log10_x=draw(st.integers(-6, 6)),
        copy_model=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(150)
@given(case=monitor_cases())
def test_fuzz_alignment_monitor(case):
    _count("monitor")
    gen = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]
    model = nn.Sequential(nn.Linear(case["d_in"], case["d_out"], bias=case["bias"])).to(dt)
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3),
    }[case["opt"]](model.parameters())
    mon = AlignmentMonitor(model, opt, norms=("sgd", "signsgd"))
    twin = copy.deepcopy(model) if case["copy_model"] else None
    lin = model[0]
    for _ in range(case["steps"]):
        parts = [10.0 ** case["log10_x"] * torch.randn(3, case["d_in"], generator=gen, dtype=dt) for _ in range(case["micro"])]
        T = [torch.randn(3, case["d_out"], generator=gen, dtype=dt) for _ in parts]
        W0 = lin.weight.detach().clone()
        b0 = None if lin.bias is None else lin.bias.detach().clone()

        def closure():
            opt.zero_grad()
            total = 0.0
            for xp, tp in zip(parts, T):
                loss = ((model(xp) - tp) ** 2).sum() / 2
                loss.backward()
                total = total + loss.detach()
                if twin is not None:
                    twin(xp).sum().backward()  # a copy's forwards must not count
            return total

        if case["opt"] == "lbfgs":
            opt.step(closure)
        else:
            closure()
            opt.step()
        # reference: rows of every micro-batch at W0, G = Y − T there, the whole step's ΔW
        Xs = torch.cat(parts).double()
        Y0 = Xs @ W0.double().T + (0 if b0 is None else b0.double())
        Gd = (Y0 - torch.cat(T).double()).numpy()
        dY = Xs.numpy() @ (lin.weight.detach().double() - W0.double()).numpy().T
        if b0 is not None:
            dY = dY + (lin.bias.detach().double() - b0.double()).numpy()
        for nm, Dr in (("sgd", -Gd), ("signsgd", -np.sign(Gd))):
            den = np.linalg.norm(dY) * np.linalg.norm(Dr)
            ref = float((dY * Dr).sum() / den) if den > 0 else 0.0
            got = mon.history["0"][nm][-1]
            u = _u(dt)
            tol = 1e-9 if dt == torch.float64 else 1e-3
            # the recorded update is W_new − W_old in the parameter's dtype: relative rounding u|W|/|ΔW|
            dw = float((lin.weight.detach() - W0).abs().max())
            if dw > 0:
                tol += 8 * u * float(W0.abs().max()) / dw * math.sqrt(W0.numel())
            assert abs(got - ref) <= tol or not math.isfinite(ref), (nm, got, ref, tol)
    assert len(mon.history["0"]["sgd"]) == case["steps"]
    mon.remove()
    assert len(lin._forward_hooks) == 0


# ----------------------------------------------------------------------------- bad arguments
_X = torch.randn(5, 3)
_G = torch.randn(5, 2)
BAD_CALLS = {
    "X": [lambda v: whiten(v), lambda v: isotropy_metrics(v), lambda v: feature_alignment(v, _G, "sgd")],
    "G": [lambda v: feature_alignment(_X, v, "sgd"), lambda v: steepest_feature_direction(v, "sgd")],
    "eps": [lambda v: whiten(_X, eps=v), lambda v: Whitening(3, eps=v)],
    "centered": [lambda v: whiten(_X, centered=v), lambda v: Whitening(3, centered=v)],
    "rule": [lambda v: feature_alignment(_X, _G, v), lambda v: steepest_feature_direction(_G, v)],
    "norms": [lambda v: AlignmentMonitor(nn.Linear(2, 2), norms=v)],
    "momentum": [lambda v: Whitening(3, momentum=v)],
    "num_features": [lambda v: Whitening(v)],
    "groups": [lambda v: Whitening(4, groups=v)],
    "method": [lambda v: Whitening(3, method=v)],
    "iters": [lambda v: Whitening(3, iters=v)],
    "affine": [lambda v: Whitening(3, affine=v)],
    "track_running_stats": [lambda v: Whitening(3, track_running_stats=v)],
    "train_stats": [lambda v: Whitening(3, train_stats=v)],
    "shrinkage": [lambda v: Whitening(3, shrinkage=v)],
    "sample_decorrelation": [lambda v: Whitening(3, sample_decorrelation=v)],
    "input": [lambda v: Whitening(3)(v)],
    "every": [lambda v: AlignmentMonitor(nn.Linear(2, 2), every=v)],
    "include_bias": [lambda v: AlignmentMonitor(nn.Linear(2, 2), include_bias=v)],
    "model": [lambda v: AlignmentMonitor(v)],
    "optimizer": [lambda v: AlignmentMonitor(nn.Linear(2, 2), v)],
    "layers": [lambda v: AlignmentMonitor(nn.Sequential(nn.Linear(2, 2)), layers=v)],
}
BAD_VALUES = {
    "X": [torch.randn(4), torch.ones(3, 2, dtype=torch.long), [[1.0, 2.0]], torch.tensor([[math.nan, 1.0], [1.0, 1.0]]),
          torch.randn(3, 2, dtype=torch.complex64)],
    "G": [torch.randn(5), torch.randn(4, 2), torch.ones(5, 2, dtype=torch.int32), torch.full((5, 2), math.inf)],
    "eps": [-1.0, math.nan, math.inf, "a", True, None],
    "centered": ["yes", 1, None],
    "rule": ["adam", None, 3, ""],
    "norms": ["adam", (), [3], None],
    "momentum": [-0.1, 1.5, True, "a", math.nan, None],
    "num_features": [0, -1, 2.0, True, "3"],
    "groups": [0, 3, 2.0, True],
    "method": ["svd", None, 1],
    "iters": [0, -1, 2.5, True],
    "affine": ["yes", 1, None],
    "track_running_stats": ["yes", 0],
    "train_stats": ["eval", None, 1, "Running"],
    "shrinkage": [-0.1, 1.5, True, "a", math.nan, None],
    "sample_decorrelation": [-0.1, 1.0, 2.0, False, "a", math.inf],
    "input": [torch.randn(4), torch.randn(4, 5), torch.ones(4, 3, dtype=torch.long), torch.full((4, 3), math.nan), "x"],
    "every": [0, -1, 1.5, True, None],
    "include_bias": ["yes", 1],
    "model": ["model", None, 3],
    "optimizer": ["sgd", 3],
    "layers": [["missing"], "0", [0]],
}
VALID_FOR = {("G", 1, 1)}  # a (4, 2) G is bad beside a (5, 3) X only
_BAD = [(arg, i, j) for arg, calls in BAD_CALLS.items() for i in range(len(calls)) for j in range(len(BAD_VALUES[arg]))
        if (arg, i, j) not in VALID_FOR]


@fuzz(200)
@given(which=st.sampled_from(_BAD))
def test_fuzz_bad_arguments_are_named(which):
    _count("bad_args")
    arg, i, j = which
    value = BAD_VALUES[arg][j]
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[arg][i](value)
    names = {"input": ("input", "Whitening(3)"), "optimizer": ("optimizer",), "norms": ("norms",)}.get(arg, (arg,))
    _refused(info.value, *names)


# ----------------------------------------------------------------------------- count
def test_fuzz_case_count():
    """Runs last: the battery above generated its cases (skipped when only part of the file ran)."""
    expected = {"whiten", "Whitening", "metrics", "alignment", "monitor", "bad_args"}
    if set(CASES) != expected:
        pytest.skip("only part of the fuzz battery ran")
    total = sum(CASES.values())
    print(f"\nisotropy fuzz cases: {total} {dict(CASES)}")
    assert total >= MIN_CASES
