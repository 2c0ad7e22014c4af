"""Fuzz battery for steepest.losses: every public function over shapes, scales, dtypes and bad values.

Each generated case either matches an independent float64 reference (numpy/scipy on
the same rounded inputs) within the tolerance stated below, or raises a ValueError /
TypeError whose message names the offending argument. Never a silent NaN, never a
value outside the contract. Seeded (``derandomize=True``); the number of generated
cases is counted and checked by the last test of the file.

Tolerances (u = unit roundoff of the compute dtype: float32 for half and float32
inputs, float64 for float64; u_in that of the input, in which gradients are returned):

* ``log ξ`` (flat_nce): ``|Δ| ≤ 32u(1 + |log ξ| + log K)`` — rounding relative to
  the result, not to the size of the scores (differences are taken first);
* InfoNCE ``log(1 + ξ)``: ``|Δ| ≤ 32u(1 + |log ξ| + log K)·σ(log ξ)`` (relative at tiny ξ);
* gradient entries: ``|Δg| ≤ (32u(1 + |log ξ| + log K + |log|g||) + u_in)|g| + tiny_in``;
* pair losses add the cosine's rounding ``4(D + 2)u / τ`` to ``|Δ log ξ|``, and their
  gradients are compared normwise with ``64(D + 2)u(1 + 1/τ) + 4u_in``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import expit, logsumexp

from steepest.losses import (
    FlatNCELoss,
    InfoNCELoss,
    flat_nce,
    flat_nce_pairs,
    info_nce,
    info_nce_pairs,
    nce_diagnostics,
    pair_logits,
)

CASES: Counter[str] = Counter()  # per test
FUZZ: Counter[str] = Counter()  # this module's total, read by the shared summary hook in conftest.py


def _count(test: str) -> None:
    CASES[test] += 1
    FUZZ["losses"] += 1
MIN_CASES = 1400  # this file's share of the project-wide battery
_BASE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(n: int) -> settings:
    return settings(_BASE, max_examples=n)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [None, None, None, None, "nan", "inf", "-inf"]


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiny(dtype: torch.dtype) -> float:
    return 2.0**-24 if dtype == torch.float16 else torch.finfo(dtype).tiny


def _inject(x: np.ndarray, special: str | None, rng: np.random.Generator) -> np.ndarray:
    if special is not None and x.size:
        x = x.copy()
        x.flat[rng.integers(x.size)] = float(special)
    return x


def _refused(exc: BaseException, *names: str) -> None:
    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
    assert any(n in str(exc) for n in names), f"{exc!r} does not name {names}"


# ----------------------------------------------------------------------------- references
def _ref_rows(s: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log ξ per row, and the gradients of log ξ (flat) and log(1 + ξ) (info), float64."""
    B, K = s.shape
    log_xi = np.empty(B)
    g_flat = np.zeros((B, K))
    for b in range(B):
        r = s[b][pos[b]].max()
        d = s[b] - r
        ln, lp = logsumexp(d[~pos[b]]), logsumexp(d[pos[b]])
        log_xi[b] = ln - lp
        g_flat[b, ~pos[b]] = np.exp(d[~pos[b]] - ln)
        g_flat[b, pos[b]] = -np.exp(d[pos[b]] - lp)
    g_info = g_flat * expit(log_xi)[:, None]
    return log_xi, g_flat, g_info


def _reduce_np(v: np.ndarray, reduction: str) -> np.ndarray:
    return v.mean() if reduction == "mean" else v.sum() if reduction == "sum" else v


# ----------------------------------------------------------------------------- info_nce / flat_nce
@st.composite
def logits_cases(draw):
    return dict(
        B=draw(st.integers(0, 5)),
        K=draw(st.integers(1, 7)),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_scale=draw(st.integers(-30, 30)),
        shift=draw(st.sampled_from([0.0, 0.0, 1e3, -1e6])),
        special=draw(st.sampled_from(SPECIALS)),
        masked=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        fn=draw(st.sampled_from(["info", "flat", "flat:info_nce", "flat:xi_over_sg"])),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(700)
@given(case=logits_cases())
def test_fuzz_info_nce_and_flat_nce(case):
    _count("info_flat")
    rng = np.random.default_rng(case["seed"])
    B, K, dtype = case["B"], case["K"], case["dtype"]
    raw = case["shift"] + 10.0 ** case["log10_scale"] * rng.standard_normal((B, K))
    x = torch.tensor(_inject(raw, case["special"], rng), dtype=torch.float64).to(dtype)
    if case["masked"]:
        pos = rng.random((B, K)) < 0.4
        if K >= 2:  # a valid mask most of the time; the rest must be refused
            for b in range(B):
                if rng.random() < 0.9:
                    pos[b, rng.integers(K)] = True
                    if pos[b].all():
                        pos[b, rng.integers(K)] = False
        kw = {"positive_mask": torch.tensor(pos, dtype=torch.bool)}
    else:
        t = rng.integers(0, K, B)
        pos = np.zeros((B, K), dtype=bool)
        pos[np.arange(B), t] = True
        kw = {"target": torch.tensor(t, dtype=torch.long)}
    name = case["fn"]
    fn = info_nce if name == "info" else flat_nce
    if name.startswith("flat:"):
        kw["value"] = name.split(":")[1]
    red = case["reduction"]

    xv = x.clone().requires_grad_(True)
    try:
        out = fn(xv, reduction=red, **kw)
    except (ValueError, TypeError) as exc:
        bad_mask = B and case["masked"] and bool((~pos.any(1) | pos.all(1)).any())
        expected = K < 2 or not bool(torch.isfinite(x).all()) or bad_mask or (B == 0 and red == "mean")
        assert expected, f"valid input refused: {exc!r}"
        _refused(exc, "logits", "positive_mask", "reduction", "K=")
        return
    assert K >= 2 and bool(torch.isfinite(x).all()), "invalid input accepted"
    assert not (B == 0 and red == "mean")
    cd, u, u_in = _compute(dtype), _u(_compute(dtype)), _u(dtype)
    assert out.dtype == cd
    assert bool(torch.isfinite(out).all())

    s = x.double().numpy()
    log_xi, g_flat, g_info = _ref_rows(s, pos)
    slack = 32 * u * (1 + np.abs(log_xi) + math.log(K))
    if name == "info" or name == "flat:info_nce":
        ref_rows = np.logaddexp(0.0, log_xi)
        tol_rows = slack * expit(log_xi) + u * ref_rows
    elif name == "flat:xi_over_sg":
        ref_rows, tol_rows = np.ones(B), np.zeros(B)
    else:
        ref_rows, tol_rows = log_xi, slack
    ref = _reduce_np(ref_rows, red)
    tol = _reduce_np(tol_rows, red) + _tiny(cd)
    got = out.detach().double().numpy()
    assert np.all(np.abs(got - ref) <= tol), (got, ref, tol)
    if name == "info":
        assert np.all(got >= 0)  # log(1 + ξ) ≥ 0

    out.sum().backward()
    g = xv.grad
    assert g.dtype == dtype and bool(torch.isfinite(g).all())
    g_ref = (g_info if name == "info" else g_flat) * ({"mean": 1.0 / max(B, 1), "sum": 1.0, "none": 1.0}[red])
    with np.errstate(divide="ignore"):
        lg = np.where(g_ref != 0, np.abs(np.log(np.abs(g_ref))), 0.0)
    gtol = (32 * u * (1 + np.abs(log_xi)[:, None] + math.log(K) + lg) + 2 * u_in) * np.abs(g_ref) + 2 * _tiny(dtype)
    err = np.abs(g.double().numpy() - g_ref)
    assert np.all(err <= gtol), (err - gtol).max()


# ----------------------------------------------------------------------------- pair losses
def _ref_pair(z1: np.ndarray, z2: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """log ξ per view and the positive mask, float64 (zero embeddings: cosine 0)."""
    v = np.concatenate([z1, z2])
    m = np.abs(v).max(1, keepdims=True)
    v = np.where(m > 0, v / np.where(m > 0, m, 1.0), 0.0)
    nrm = np.linalg.norm(v, axis=1, keepdims=True)
    h = np.where(nrm > 0, v / np.where(nrm > 0, nrm, 1.0), 0.0)
    n = len(z1)
    S = h @ h.T / tau
    log_xi = np.empty(2 * n)
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        neg = [b for b in range(2 * n) if b not in (a, p)]
        log_xi[a] = logsumexp(S[a, neg] - S[a, p])
    return log_xi, h


def _torch_pair_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float, info: bool) -> torch.Tensor:
    """The same loss written with a full masked 2N × 2N matrix, float64 autograd (a different code path)."""
    v = torch.cat([z1, z2])
    m = v.detach().abs().amax(1, keepdim=True)
    v = v / torch.where(m > 0, m, torch.ones_like(m))
    nrm = v.norm(dim=1, keepdim=True)
    h = torch.where(nrm > 0, v / torch.where(nrm > 0, nrm, torch.ones_like(nrm)), torch.zeros_like(v))
    n2 = v.shape[0]
    S = h @ h.T / tau
    pidx = (torch.arange(n2) + n2 // 2) % n2
    sp = S[torch.arange(n2), pidx]
    drop = torch.eye(n2, dtype=torch.bool) | torch.nn.functional.one_hot(pidx, n2).bool()
    log_xi = torch.logsumexp((S - sp[:, None]).masked_fill(drop, -math.inf), 1)
    per = torch.nn.functional.softplus(log_xi, threshold=1e9) if info else log_xi
    return per.mean()


TAUS = [1e-30, 1e-3, 0.05, 0.1, 1.0, 10.0, 1e30]


@st.composite
def pair_cases(draw):
    return dict(
        N=draw(st.integers(0, 5)),
        D=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_scale=draw(st.integers(-30, 30)),
        tau=draw(st.sampled_from(TAUS)),
        special=draw(st.sampled_from(SPECIALS)),
        zero_row=draw(st.booleans()),
        api=draw(st.sampled_from(["info_nce_pairs", "flat_nce_pairs", "InfoNCELoss", "FlatNCELoss", "learnable"])),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(450)
@given(case=pair_cases())
def test_fuzz_pair_losses(case):
    _count("pairs")
    rng = np.random.default_rng(case["seed"])
    N, D, dtype, tau = case["N"], case["D"], case["dtype"], case["tau"]
    scale = 10.0 ** case["log10_scale"]
    a = scale * rng.standard_normal((N, D))
    b = a + 0.5 * scale * rng.standard_normal((N, D))
    if case["zero_row"] and N:
        a[rng.integers(N)] = 0.0
    a = _inject(a, case["special"], rng)
    z1 = torch.tensor(a, dtype=torch.float64).to(dtype).requires_grad_(True)
    z2 = torch.tensor(b, dtype=torch.float64).to(dtype).requires_grad_(True)
    api = case["api"]
    info = api in ("info_nce_pairs", "InfoNCELoss", "learnable")
    try:
        if api == "info_nce_pairs":
            out = info_nce_pairs(z1, z2, tau)
        elif api == "flat_nce_pairs":
            out = flat_nce_pairs(z1, z2, tau)
        elif api == "InfoNCELoss":
            out = InfoNCELoss(tau)(z1, z2)
        elif api == "FlatNCELoss":
            out = FlatNCELoss(tau)(z1, z2)
        else:
            lo, hi = min(tau, 1.0), max(tau, 1.0)
            out = InfoNCELoss(tau, learnable_temperature=True, temperature_range=(lo, hi))(z1, z2)
    except (ValueError, TypeError) as exc:
        finite = bool(torch.isfinite(z1).all() and torch.isfinite(z2).all())
        assert N < 2 or not finite, f"valid input refused: {exc!r}"
        _refused(exc, "z1", "z2", "N >= 2")
        return
    assert N >= 2 and bool(torch.isfinite(z1).all() and torch.isfinite(z2).all()), "invalid input accepted"
    cd = _compute(dtype)
    u, u_in = _u(cd), _u(dtype)
    assert out.dtype == cd and bool(torch.isfinite(out))
    if api == "learnable":
        tau = float(torch.tensor(math.log(tau)).exp())  # τ as the parameter holds it
    log_xi, _ = _ref_pair(z1.detach().double().numpy(), z2.detach().double().numpy(), tau)
    K = 2 * N - 1
    dl = 4 * (D + 2) * u / tau + 32 * u * (1 + np.abs(log_xi) + math.log(K))
    if info:
        ref, tol = np.logaddexp(0.0, log_xi).mean(), (dl * expit(log_xi)).mean() + u
    else:
        ref, tol = log_xi.mean(), dl.mean()
    assert abs(out.item() - ref) <= tol + _tiny(cd), (out.item(), ref, tol)

    out.backward()
    g = torch.cat([z1.grad, z2.grad])
    assert g.dtype == dtype
    r1, r2 = z1.detach().double().requires_grad_(True), z2.detach().double().requires_grad_(True)
    _torch_pair_reference(r1, r2, tau, info).backward()
    gr = torch.cat([r1.grad, r2.grad])
    zero = torch.cat([z1, z2]).detach().abs().amax(1) == 0
    assert bool((g[zero] == 0).all())  # a zero embedding has no direction: gradient 0
    g, gr = g[~zero], gr[~zero]
    # a gradient the input's dtype cannot hold overflows as any autograd cast does
    if gr.numel() == 0 or not bool(torch.isfinite(gr.to(dtype)).all()):
        return
    assert bool(torch.isfinite(g).all())
    if tau < 1e-20 or gr.abs().max() < 1e3 * _tiny(dtype):
        return  # the tolerance below is void at τ = 1e-30; underflowed gradients cannot be compared
    gtol = 64 * (D + 2) * u * (1 + 1 / tau) * (1 + float(np.abs(log_xi).max())) + 4 * u_in
    assert float((g.double() - gr).norm()) <= gtol * float(gr.norm()) + 4 * _tiny(dtype) * math.sqrt(g.numel())


# ----------------------------------------------------------------------------- pair_logits layout
@fuzz(150)
@given(N=st.integers(2, 5), D=st.integers(1, 4), dtype=st.sampled_from(DTYPES), log10_scale=st.integers(-30, 30),
       tau=st.sampled_from(TAUS[1:-1]), seed=st.integers(0, 2**16))
def test_fuzz_pair_logits(N, D, dtype, log10_scale, tau, seed):
    _count("pair_logits")
    rng = np.random.default_rng(seed)
    scale = 10.0**log10_scale
    z1 = torch.tensor(scale * rng.standard_normal((N, D))).to(dtype)
    z2 = torch.tensor(scale * rng.standard_normal((N, D))).to(dtype)
    if not bool(torch.isfinite(z1).all() and torch.isfinite(z2).all()):  # overflowed the dtype
        with pytest.raises(ValueError, match="z[12] contains NaN or Inf"):
            pair_logits(z1, z2, tau)
        return
    logits, target = pair_logits(z1, z2, tau)
    cd = _compute(dtype)
    assert logits.shape == (2 * N, 2 * N - 1) and logits.dtype == cd and target.shape == (2 * N,)
    _, h = _ref_pair(z1.double().numpy(), z2.double().numpy(), tau)
    S = h @ h.T / tau
    ref = np.stack([np.delete(S[a], a) for a in range(2 * N)])
    np.testing.assert_allclose(logits.double().numpy(), ref, rtol=0, atol=4 * (D + 2) * _u(cd) / tau)
    expected_t = np.array([(a + N) % (2 * N) - ((a + N) % (2 * N) > a) for a in range(2 * N)])
    assert np.array_equal(target.numpy(), expected_t)


# ----------------------------------------------------------------------------- diagnostics
@fuzz(150)
@given(B=st.integers(0, 6), K=st.integers(1, 6), dtype=st.sampled_from(DTYPES), log10_scale=st.integers(-30, 30),
       special=st.sampled_from(SPECIALS), seed=st.integers(0, 2**16),
       res=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_fuzz_nce_diagnostics(B, K, dtype, log10_scale, special, seed, res):
    _count("diagnostics")
    rng = np.random.default_rng(seed)
    raw = _inject(10.0**log10_scale * rng.standard_normal((B, K)), special, rng)
    x = torch.tensor(raw).to(dtype)
    t = rng.integers(0, K, B)
    try:
        d = nce_diagnostics(x, torch.tensor(t, dtype=torch.long), resolution_dtype=res, quantiles=(0.0, 0.5, 1.0))
    except (ValueError, TypeError) as exc:
        assert K < 2 or B == 0 or not bool(torch.isfinite(x).all()), f"valid input refused: {exc!r}"
        _refused(exc, "logits")
        return
    assert K >= 2 and B >= 1 and bool(torch.isfinite(x).all())
    pos = np.zeros((B, K), dtype=bool)
    pos[np.arange(B), t] = True
    log_xi, _, _ = _ref_rows(x.double().numpy(), pos)
    tol = 64 * _u(torch.float64) * (1 + np.abs(log_xi).max() + math.log(K))
    l10 = log_xi / math.log(10.0)
    assert d["n"] == B
    for q, v in d["log10_xi_quantiles"].items():
        assert abs(v - np.quantile(l10, q)) <= tol
    assert math.isfinite(d["info_nce"]) and math.isfinite(d["log_xi"])
    assert abs(d["log_xi"] - log_xi.mean()) <= tol
    assert abs(d["info_nce"] - np.logaddexp(0.0, log_xi).mean()) <= tol * max(1.0, np.logaddexp(0.0, log_xi).mean())
    u = torch.finfo(res).eps / 2
    below = log_xi < math.log(u / (1 - u))
    near = np.abs(log_xi - math.log(u / (1 - u))) <= tol
    assert abs(d["share_below_resolution"] - below.mean()) <= near.mean() + 1e-12
    assert 0.0 <= d["share_xi_below"] <= 1.0


# ----------------------------------------------------------------------------- bad arguments
_z = torch.randn(4, 3)
_l = torch.randn(3, 4)
_t = torch.tensor([0, 1, 2])
BAD_CALLS = {
    "reduction": [lambda v: info_nce(_l, _t, v), lambda v: flat_nce(_l, _t, v), lambda v: info_nce_pairs(_z, _z, reduction=v),
                  lambda v: InfoNCELoss(reduction=v)],
    "value": [lambda v: flat_nce(_l, _t, value=v), lambda v: flat_nce_pairs(_z, _z, value=v), lambda v: FlatNCELoss(value=v)],
    "temperature": [lambda v: info_nce_pairs(_z, _z, v), lambda v: pair_logits(_z, _z, v), lambda v: InfoNCELoss(v),
                    lambda v: FlatNCELoss(v, learnable_temperature=True)],
    "dtype": [lambda v: info_nce(_l, _t, dtype=v), lambda v: pair_logits(_z, _z, dtype=v)],
    "temperature_range": [lambda v: InfoNCELoss(0.1, learnable_temperature=True, temperature_range=v)],
    "learnable_temperature": [lambda v: InfoNCELoss(0.1, learnable_temperature=v)],
    "gather_distributed": [lambda v: InfoNCELoss(0.1, gather_distributed=v), lambda v: info_nce_pairs(_z, _z, gather_distributed=v)],
    "xi_threshold": [lambda v: nce_diagnostics(_l, _t, xi_threshold=v)],
    "quantiles": [lambda v: nce_diagnostics(_l, _t, quantiles=v)],
    "resolution_dtype": [lambda v: nce_diagnostics(_l, _t, resolution_dtype=v)],
    "target": [lambda v: info_nce(_l, v), lambda v: flat_nce(_l, v)],
    "logits": [lambda v: info_nce(v, _t), lambda v: nce_diagnostics(v, _t)],
    "z1": [lambda v: info_nce_pairs(v, _z), lambda v: pair_logits(v, _z)],
}
BAD_VALUES = {
    "reduction": ["avg", "", None, 1, "MEAN"],
    "value": ["xi", None, 0, "log"],
    "temperature": [0.0, -1.0, math.nan, math.inf, True, "0.1", None, torch.tensor([0.1, 0.2]), -0.0, 1e-320],
    "dtype": [torch.int64, torch.bool, "float32", float, torch.complex64],
    "temperature_range": [(0.1,), (1.0, 0.1), (0.0, 1.0), (0.01, math.inf), (math.nan, 1.0), "ab", None, (0.2, 0.5, 0.9)],
    "learnable_temperature": ["yes", 1, None],
    "gather_distributed": ["yes", 1, None],
    "xi_threshold": [0.0, -1.0, math.nan, "a", None, math.inf],
    "quantiles": [(1.5,), (-0.1,), (math.nan,), ("a",), None],
    "resolution_dtype": [torch.int32, "float32", None],
    "target": [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1]), torch.tensor([0, 1, 9]), torch.tensor([-1, 0, 0]),
               [0, 1, 2], torch.tensor([True, False, True])],
    "logits": [torch.ones(3, 4, dtype=torch.long), torch.randn(3), torch.randn(3, 4, 1), [[0.0, 1.0]],
               torch.randn(3, 4, dtype=torch.complex64)],
    "z1": [torch.randn(4), torch.randn(4, 3, dtype=torch.float64)[:, :2], torch.ones(4, 3, dtype=torch.long), "z"],
}
_BAD = [(arg, i, j) for arg, calls in BAD_CALLS.items() for i in range(len(calls)) for j in range(len(BAD_VALUES[arg]))]


@fuzz(220)
@given(which=st.sampled_from(_BAD))
def test_fuzz_bad_arguments_are_named(which):
    _count("bad_args")
    arg, i, j = which
    value = BAD_VALUES[arg][j]
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[arg][i](value)
    names = {"z1": ("z1", "z2"), "target": ("target",), "logits": ("logits",)}.get(arg, (arg,))
    _refused(info.value, *names)


# ----------------------------------------------------------------------------- count
def test_fuzz_case_count():
    """Runs last: the battery above generated its cases (skipped when only part of the file ran)."""
    expected = {"info_flat", "pairs", "pair_logits", "diagnostics", "bad_args"}
    if set(CASES) != expected:
        pytest.skip("only part of the fuzz battery ran")
    total = sum(CASES.values())
    print(f"\nlosses fuzz cases: {total} {dict(CASES)}")
    assert total >= MIN_CASES
