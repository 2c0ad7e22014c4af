"""Fuzz battery for steepest.penalties: every public function over shapes, scales, dtypes and bad values.

Each generated case either matches an independent float64 reference (closed forms in
numpy, or per-example autograd on a float64 copy of the model) within the tolerance
below, or raises a ValueError / TypeError naming the argument. Never a silent NaN or
Inf. Seeded (``derandomize=True``); the last test checks how many cases ran.

Test functions have closed-form gradients: per example
``f_i(x) = Σ_j s·tanh(a·x_ij) + q·x_ij + ½c·x_ij²`` (so ``g_ij = s·a·sech²(a·x_ij) + q + c·x_ij``),
and per parameter ``L = Σ_k ½c_k‖p_k‖² + q_k·Σp_k`` (``g_k = c_k p_k + q_k``, ``H = c_k I``).
With u the unit roundoff of the dtype the function computes in and ``G_j`` the sum
of the magnitudes of the terms of ``g_j``:

* ``‖g‖²`` (input and parameter penalties): ``|Δ| ≤ 16u·Σ_j G_j² + tiny``;
* finite differences (quadratic f, so the O(ε) term is exact: ``D = ‖g‖²(1 + εc/2)``):
  ``|Δ| ≤ 8u(|f(x)| + |f(x + εg)|)/ε + 16u·Σ G_j²``; for parameters
  ``|Δ| ≤ (2/ε)[4u(|g| + |g(θ+εg)|) + c·u(|θ| + ε|g|)] + 8u|2cg|`` per entry (the step
  rounds to the parameter's spacing in its own dtype);
* occam_bound: ``rhs`` and ``‖∇_x f‖²`` within ``1e-3`` (float32) / ``1e-9`` (float64)
  relative of float64 autograd, plus four times float32 autograd's own distance from
  float64 (a saturated tanh's derivative ``1 − tanh²`` cancels in float32), and
  ``lhs ≤ rhs`` within the same slack.
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

from steepest.isotropy import Whitening
from steepest.penalties import (
    check_per_example,
    input_grad_norm2,
    occam_bound,
    param_grad_norm2,
    param_penalty_grads_fd,
)

CASES: Counter[str] = Counter()  # per test
FUZZ: Counter[str] = Counter()  # this module's total, read by the shared summary hook in conftest.py


def _count(test: str) -> None:
    CASES[test] += 1
    FUZZ["penalties"] += 1
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
SPECIALS = [None, None, None, None, "nan", "inf"]


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _tiny(dtype: torch.dtype) -> float:
    return 2.0**-24 if dtype == torch.float16 else torch.finfo(dtype).tiny


def _refused(exc: BaseException, *names: str) -> None:
    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
    assert any(n in str(exc) for n in names), f"{exc!r} does not name {names}"


# ----------------------------------------------------------------------------- input_grad_norm2
@st.composite
def input_cases(draw):
    return dict(
        B=draw(st.integers(0, 4)),
        shape=draw(st.sampled_from([(1,), (3,), (5,), (1, 4), (4, 1), (2, 3)])),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_x=draw(st.integers(-30, 30)),
        coef=draw(st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.5, 1.0, 3.0, 1e3]), min_size=4, max_size=4)),
        method=draw(st.sampled_from(["exact", "exact", "finite_difference"])),
        normalize=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-3, 1e-2, 1e-5])),
        special=draw(st.sampled_from(SPECIALS)),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(600)
@given(case=input_cases())
def test_fuzz_input_grad_norm2(case):
    _count("input")
    rng = np.random.default_rng(case["seed"])
    B, dtype, method = case["B"], case["dtype"], case["method"]
    s, a, q, c = case["coef"]
    if method == "finite_difference":
        s = 0.0  # quadratic f: the finite difference's O(ε) term is exact
    raw = 10.0 ** case["log10_x"] * rng.standard_normal((B, *case["shape"]))
    if case["special"] and raw.size:
        raw.flat[rng.integers(raw.size)] = float(case["special"])
    x = torch.tensor(raw).to(dtype)

    def f(v):
        flat = v.reshape(v.shape[0], -1)
        return (s * torch.tanh(a * flat) + q * flat + 0.5 * c * flat * flat).sum(1)

    X = x.double().numpy().reshape(B, int(np.prod(case["shape"])))
    with np.errstate(all="ignore"):  # NaN/Inf inputs reach the reference; they must be refused anyway
        g = s * a / np.cosh(np.clip(a * X, -700, 700)) ** 2 + q + c * X
        # |s·a| rather than |s·a·sech²|: autograd forms sech² as 1 − tanh², which cancels (error u)
        G = abs(s * a) + abs(q) + np.abs(c * X)
        ref = (g**2).sum(1)
        fvals = (s * np.tanh(a * X) + q * X + 0.5 * c * X * X).sum(1)
    big = torch.finfo(dtype).max / 4
    kw = dict(method=method, normalize=case["normalize"], eps=case["eps"])
    try:
        out = input_grad_norm2(f, x, **kw)
    except (ValueError, TypeError) as exc:
        finite = bool(torch.isfinite(x).all())
        too_big = B and (np.abs(ref).max() > big or (G**2).sum(1).max() > big or np.abs(fvals).max() > big)
        if "too small" in str(exc):  # the step x + εg is lost to rounding: allowed when rounding rivals it
            gn = np.sqrt((g**2).sum(1, keepdims=True))
            st_ = case["eps"] * (g / np.where(gn > 0, gn, 1.0) if case["normalize"] else g)
            lost = (np.abs(g) * (2 * _u(dtype) * np.abs(X + st_) + _tiny(dtype))).sum(1) >= 0.25 * (g * st_).sum(1)
            assert method == "finite_difference" and bool(lost.any()), f"valid input refused: {exc!r}"
            _refused(exc, "eps")
            return
        assert B == 0 or not finite or too_big, f"valid input refused: {exc!r}"
        _refused(exc, "x", "f", "overflow")
        return
    assert B >= 1 and bool(torch.isfinite(x).all())
    assert out.shape == (B,) and out.dtype == dtype and bool(torch.isfinite(out).all())
    u = _u(dtype)
    tol = 16 * u * (G**2).sum(1) + 4 * _tiny(dtype)
    if method == "finite_difference":
        gn = np.sqrt(ref)
        step = np.where(gn > 0, case["eps"] / np.where(gn > 0, gn, 1.0), 0.0) if case["normalize"] else np.full(B, case["eps"])
        ref = ref * (1 + step * c / 2)
        # f's rounding (u·Σ|terms| per evaluation) and the step x + εg rounded to x's spacing (u|x_j|)
        fterms = (np.abs(q * X) + np.abs(0.5 * c * X * X)).sum(1)
        f2 = 2 * fterms + step * ref + (np.abs(g) * np.abs(X)).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # values below the dtype's normal range are rounded absolutely (to ~tiny)
            f_err = 8 * u * f2 + 4 * _tiny(dtype)
            tol = tol + np.where(step > 0, f_err / np.where(step > 0, step, 1.0), 0.0) + 8 * u * np.abs(ref)
    got = out.detach().double().numpy()
    assert np.all(np.abs(got - ref) <= tol), (got, ref, tol)
    if method == "exact" and dtype == torch.float64:
        # differentiable: d/dx ‖g‖² = 2 g g', g' = −2 s a² tanh(ax) sech²(ax) + c
        xr = x.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(input_grad_norm2(f, xr).sum(), xr)
        th = np.tanh(a * X)
        with np.errstate(over="ignore"):  # cosh² = inf: sech² = 0
            gp = -2 * s * a * a * th / np.cosh(np.clip(a * X, -700, 700)) ** 2 + c
        dref = 2 * g * gp
        dtol = 64 * u * (G * (np.abs(2 * s * a * a * th) + abs(c)) + 1e-300)
        assert np.all(np.abs(dx.numpy().reshape(B, -1) - dref) <= dtol * 4 + 1e-300)


# ----------------------------------------------------------------------------- parameter penalties
@st.composite
def param_cases(draw):
    k = draw(st.integers(1, 4))
    return dict(
        shapes=draw(st.lists(st.sampled_from([(), (1,), (3,), (2, 2), (1, 3), (0,), (3, 1)]), min_size=k, max_size=k)),
        used=draw(st.lists(st.booleans(), min_size=k, max_size=k)),
        dup=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_p=draw(st.integers(-30, 30)),
        c=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e3])),
        q=draw(st.sampled_from([0.0, 1e-3, 1.0])),
        eps=draw(st.sampled_from([1e-3, 1e-2, 1e-6])),
        normalize=draw(st.booleans()),
        fd=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@fuzz(450)
@given(case=param_cases())
def test_fuzz_param_penalties(case):
    _count("params")
    rng = np.random.default_rng(case["seed"])
    dtype, c, q = case["dtype"], case["c"], case["q"]
    ps = [
        torch.tensor(10.0 ** case["log10_p"] * rng.standard_normal(sh)).to(dtype).requires_grad_(True)
        for sh in case["shapes"]
    ]
    used = case["used"]
    listed = ps + ps[:1] if case["dup"] else ps

    def closure():
        total = torch.zeros((), dtype=dtype)
        for p, on in zip(ps, used):
            if on:
                total = total + (0.5 * c * p * p + q * p).sum()
        return total

    P = [p.detach().double().numpy() for p in ps]
    if not all(np.isfinite(p).all() for p, on in zip(P, used) if on):  # overflowed the dtype: the loss is not finite
        with pytest.raises(ValueError, match="loss is NaN or Inf"):
            param_penalty_grads_fd(closure, listed) if case["fd"] else param_grad_norm2(closure(), listed)
        return
    g_ref = [(c * p + q) if on else np.zeros_like(p) for p, on in zip(P, used)]
    G2 = sum(float(((abs(c) * np.abs(p) + abs(q)) ** 2).sum()) for p, on in zip(P, used) if on)
    ref = sum(float((g**2).sum()) for g in g_ref)
    loss_ref = sum(float((0.5 * c * p * p + q * p).sum()) for p, on in zip(P, used) if on)
    big = torch.finfo(dtype).max / 4
    u = _u(dtype)
    try:
        if case["fd"]:
            res = param_penalty_grads_fd(closure, listed, eps=case["eps"], normalize=case["normalize"])
            val = res.grad_norm2
        else:
            val = param_grad_norm2(closure(), listed)
    except (ValueError, TypeError) as exc:
        if "too small" in str(exc):  # θ + εg lost to rounding: allowed when rounding rivals the step
            gn = math.sqrt(ref)
            stp = (case["eps"] / gn if gn > 0 else 0.0) if case["normalize"] else case["eps"]
            err = sum(float((np.abs(gr) * (2 * u * np.abs(p + stp * gr) + _tiny(dtype))).sum()) for p, gr in zip(P, g_ref))
            assert case["fd"] and err >= 0.25 * stp * ref, f"valid input refused: {exc!r}"
            _refused(exc, "eps")
            return
        mags = [abs(loss_ref), ref, G2] + [float(np.abs(p).max()) * (1 + c) for p, on in zip(P, used) if p.size and on]
        assert max(mags) > big or (case["fd"] and max(mags) * 1e6 > big), f"valid input refused: {exc!r}"
        _refused(exc, "loss", "overflow", "params")
        return
    assert bool(torch.isfinite(val))
    assert abs(float(val.detach()) - ref) <= 16 * u * G2 + 4 * _tiny(dtype), (float(val), ref)
    if not case["fd"]:
        # differentiable in the parameters: ∂‖g‖²/∂p_k = 2 c g_k
        grads = torch.autograd.grad(val, ps, allow_unused=True)
        for gk, p, gr, on in zip(grads, P, g_ref, used):
            want = 2 * c * gr
            have = np.zeros_like(want) if gk is None else gk.double().numpy()
            if not on:
                assert np.all(have == 0)
                continue
            if np.abs(want).max(initial=0.0) > torch.finfo(dtype).max / 2:
                continue  # autograd returns it in the parameter's dtype, which cannot hold it
            assert np.all(np.abs(have - want) <= 32 * u * 2 * abs(c) * (abs(c) * np.abs(p) + abs(q)) + 4 * _tiny(dtype))
        return
    assert len(res.grads) == len(res.penalty_grads) == len(listed)
    assert all(torch.equal(p.detach(), torch.tensor(pp).to(dtype)) for p, pp in zip(ps, P))  # restored
    gn = math.sqrt(ref)
    step = (case["eps"] / gn if gn > 0 else 0.0) if case["normalize"] else case["eps"]
    for pen, p, gr, on in zip(res.penalty_grads, P + P[:1], g_ref + g_ref[:1], used + used[:1]):
        want = 2 * c * gr
        have = pen.double().numpy()
        if step == 0 or not on:
            assert np.all(have == 0) if not on else np.all(np.abs(have - want) <= 1e-300 + 16 * u * np.abs(want))
            continue
        g2 = gr + step * c * gr
        tol = (2 / step) * (4 * u * (np.abs(gr) + np.abs(g2)) + abs(c) * u * (np.abs(p) + step * np.abs(gr)))
        tol = tol + 8 * u * np.abs(want) + 8 * _tiny(dtype) / step
        assert np.all(np.abs(have - want) <= tol), (have, want, tol)


# ----------------------------------------------------------------------------- occam_bound
ACTS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Softplus, nn.Identity, nn.LeakyReLU, nn.Sigmoid, nn.SiLU]


@st.composite
def mlp_cases(draw):
    depth = draw(st.integers(1, 3))
    return dict(
        widths=draw(st.lists(st.integers(1, 4), min_size=depth + 1, max_size=depth + 1)),
        acts=draw(st.lists(st.sampled_from(range(len(ACTS))), min_size=depth, max_size=depth)),
        bias=draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        final_act=draw(st.booleans()),
        B=draw(st.integers(0, 3)),
        dtype=draw(st.sampled_from(DTYPES)),
        log10_w=draw(st.integers(-6, 6)),
        log10_x=draw(st.integers(-30, 30)),
        norm=draw(st.sampled_from(["spectral", "frobenius"])),
        odd=draw(st.sampled_from([None] * 6 + ["shared", "tied", "batchnorm", "whitening", "dtype"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _per_example_reference(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """‖∇_θ f_i‖² over model.parameters() and ‖∇_x f_i‖², one example at a time, float64 autograd."""
    rhs, gx2 = [], []
    params = list(model.parameters())
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        out = model(xi).sum()
        grads = torch.autograd.grad(out, [xi, *params], allow_unused=True)
        gx2.append(float(grads[0].pow(2).sum()))
        rhs.append(sum(float(gp.pow(2).sum()) for gp in grads[1:] if gp is not None))
    return np.array(rhs), np.array(gx2)


@fuzz(300)
@given(case=mlp_cases())
def test_fuzz_occam_bound(case):
    _count("occam")
    gen = torch.Generator().manual_seed(case["seed"])
    widths, dtype, odd = case["widths"], case["dtype"], case["odd"]
    layers: list[nn.Module] = []
    for t, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, bias=case["bias"][t]).double()
        with torch.no_grad():
            lin.weight.copy_(10.0 ** case["log10_w"] * torch.randn(b, a, generator=gen, dtype=torch.float64))
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(b, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if t < len(widths) - 2 or case["final_act"]:
            layers.append(ACTS[case["acts"][t]]())
    if odd == "shared" and widths[0] == widths[-1]:
        layers.append(layers[0])
    elif odd == "tied":
        extra = nn.Linear(widths[-1], widths[-1]).double()
        if widths[-1] == widths[0] and len(layers) >= 1:
            extra.weight = layers[0].weight
        else:
            odd = None
        layers += [nn.Tanh(), extra]
    elif odd == "batchnorm":
        layers.insert(1, nn.BatchNorm1d(widths[1]).double())
    elif odd == "whitening":
        layers.insert(1, Whitening(widths[1]).double())
    elif odd == "shared" or (odd == "dtype" and dtype == torch.float64):
        odd = None
    ref_model = nn.Sequential(*layers)
    model = copy.deepcopy(ref_model).to(dtype) if odd != "dtype" else ref_model
    x = (10.0 ** case["log10_x"] * torch.randn(case["B"], widths[0], generator=gen, dtype=torch.float64)).to(dtype)
    try:
        b = occam_bound(model, x, norm=case["norm"])
    except (ValueError, TypeError) as exc:
        allowed = (
            odd is not None
            or case["B"] == 0
            or dtype in (torch.float16, torch.bfloat16)
            or not bool(torch.isfinite(x).all())
            or "overflow" in str(exc)
        )
        assert allowed, f"valid input refused: {exc!r}"
        _refused(exc, "model", "x", "overflow", "dtype")
        if "overflow" in str(exc):  # only when float64 says the quantities exceed the dtype
            rhs, gx2 = _per_example_reference(ref_model, x.double())
            h_big = float(max(np.abs(rhs).max(), np.abs(gx2).max()))
            assert not (h_big < torch.finfo(dtype).max / 1e6 and 10.0 ** (2 * case["log10_x"]) < torch.finfo(dtype).max / 1e6)
        return
    assert odd is None and dtype in (torch.float32, torch.float64) and case["B"] >= 1
    for v in (b.lhs, b.rhs, b.input_grad_norm2):
        assert v.shape == (case["B"],) and bool(torch.isfinite(v).all())
    rhs, gx2 = _per_example_reference(ref_model, x.double())
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    tiny = 1e6 * _tiny(dtype)
    # no less precise than float32 autograd: a saturated tanh's derivative 1 − tanh² cancels there
    rhs32, gx32 = _per_example_reference(model, x) if dtype == torch.float32 else (rhs, gx2)
    slack_r, slack_g = 4 * np.abs(rhs32 - rhs), 4 * np.abs(gx32 - gx2)
    assert np.all(np.abs(b.rhs.double().numpy() - rhs) <= rtol * rhs + slack_r + tiny)
    assert np.all(np.abs(b.input_grad_norm2.double().numpy() - gx2) <= rtol * gx2 + slack_g + tiny)
    lhs = b.lhs.double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_g = np.where(gx2 > 0, slack_g / np.where(gx2 > 0, gx2, 1.0), 0.0)  # lhs ∝ ‖∇_x f‖²
    assert np.all(lhs <= rhs * (1 + 2 * rtol) + slack_r + lhs * rel_g + tiny)


# ----------------------------------------------------------------------------- check_per_example
def _mixes(model: nn.Module, B: int, d: int) -> bool:
    """Empirically: does output 0 change when only the other examples change (float64)?"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, dtype=torch.float64, generator=g)
    x2 = x.clone()
    x2[1:] += torch.randn(B - 1, d, dtype=torch.float64, generator=g)
    with torch.no_grad():
        return bool((model(x)[0] - model(x2)[0]).abs().max() > 1e-9)


NORMS = ["bn_train", "bn_eval", "bn_eval_nostats", "wh_train", "wh_eval", "wh_eval_nostats", "layernorm", "groupnorm",
         "dropout", "identity"]


@fuzz(120)
@given(which=st.lists(st.sampled_from(NORMS), min_size=1, max_size=2), nest=st.booleans())
def test_fuzz_check_per_example_matches_the_dependence(which, nest):
    _count("per_example")
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(3, 4)]
    for w in which:
        if w.startswith("bn"):
            m = nn.BatchNorm1d(4, track_running_stats=not w.endswith("nostats"))
        elif w.startswith("wh"):
            m = Whitening(4, track_running_stats=not w.endswith("nostats"))
        elif w == "layernorm":
            m = nn.LayerNorm(4)
        elif w == "groupnorm":
            m = nn.GroupNorm(2, 4)
        elif w == "dropout":
            m = nn.Dropout(0.0)
        else:
            m = nn.Identity()
        mods += [m, nn.Tanh()]
    model = nn.Sequential(nn.Sequential(*mods)) if nest else nn.Sequential(*mods)
    model = model.double()
    for m, w in zip(mods[1::2], which):
        m.train(w.endswith("train"))
    mixes = _mixes(model, 5, 3)
    try:
        check_per_example(model)
    except ValueError as exc:
        assert mixes, f"refused a per-example model: {exc!r}"
        _refused(exc, "module")
        return
    assert not mixes, f"accepted a model that mixes examples: {which}"


# ----------------------------------------------------------------------------- bad arguments
_x = torch.randn(3, 2)
_f = lambda v: v.pow(2).sum(1)  # noqa: E731
_w = torch.randn(2, requires_grad=True)
_mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
BAD_CALLS = {
    "method": [lambda v: input_grad_norm2(_f, _x, method=v)],
    "eps": [lambda v: input_grad_norm2(_f, _x, method="finite_difference", eps=v),
            lambda v: param_penalty_grads_fd(lambda: _w.pow(2).sum(), [_w], eps=v)],
    "normalize": [lambda v: input_grad_norm2(_f, _x, method="finite_difference", normalize=v),
                  lambda v: param_penalty_grads_fd(lambda: _w.pow(2).sum(), [_w], normalize=v)],
    "create_graph": [lambda v: input_grad_norm2(_f, _x, create_graph=v), lambda v: param_grad_norm2(_w.sum(), [_w], create_graph=v)],
    "return_output": [lambda v: input_grad_norm2(_f, _x, return_output=v)],
    "model": [lambda v: input_grad_norm2(_f, _x, model=v), lambda v: check_per_example(v),
              lambda v: param_penalty_grads_fd(lambda: _w.pow(2).sum(), [_w], model=v), lambda v: occam_bound(v, _x)],
    "f": [lambda v: input_grad_norm2(v, _x), lambda v: occam_bound(_mlp.double(), _x.double(), v)],
    "x": [lambda v: input_grad_norm2(_f, v), lambda v: occam_bound(_mlp.float(), v)],
    "closure": [lambda v: param_penalty_grads_fd(v, [_w])],
    "params": [lambda v: param_grad_norm2(_w.sum(), v), lambda v: param_penalty_grads_fd(lambda: _w.sum(), v)],
    "loss": [lambda v: param_grad_norm2(v, [_w])],
    "norm": [lambda v: occam_bound(_mlp.float(), _x, norm=v)],
}
BAD_VALUES = {
    "method": ["spsa", None, 0, "EXACT"],
    "eps": [0.0, -1.0, math.nan, math.inf, "a", True, None],
    "normalize": ["yes", 1, None],
    "create_graph": ["yes", 1, None],
    "return_output": ["yes", 1],
    "model": ["model", 3, [nn.Linear(2, 2)]],
    "f": [3, "f"],
    "x": [torch.zeros(0, 2), torch.tensor([[0.0, math.nan], [1.0, 1.0]]), torch.ones(3, 2, dtype=torch.long), [[1.0, 2.0]],
          torch.tensor(1.0)],
    "closure": [3, None, lambda: 3.0, lambda: torch.ones(2, requires_grad=True)],
    "params": [[], [torch.ones(2)], [3.0], None, 5],
    "loss": [torch.ones(2, requires_grad=True), 3.0, torch.tensor(math.nan, requires_grad=True)],
    "norm": ["nuclear", None, 2],
}
_BAD = [(arg, i, j) for arg, calls in BAD_CALLS.items() for i in range(len(calls)) for j in range(len(BAD_VALUES[arg]))]


@fuzz(200)
@given(which=st.sampled_from(_BAD))
def test_fuzz_bad_arguments_are_named(which):
    _count("bad_args")
    arg, i, j = which
    value = BAD_VALUES[arg][j]
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[arg][i](value)
    names = {"closure": ("closure", "loss"), "model": ("model", "module")}.get(arg, (arg,))
    _refused(info.value, *names)


# ----------------------------------------------------------------------------- count
def test_fuzz_case_count():
    """Runs last: the battery above generated its cases (skipped when only part of the file ran)."""
    expected = {"input", "params", "occam", "per_example", "bad_args"}
    if set(CASES) != expected:
        pytest.skip("only part of the fuzz battery ran")
    total = sum(CASES.values())
    print(f"\npenalties fuzz cases: {total} {dict(CASES)}")
    assert total >= MIN_CASES
