"""Tests of steepest.optim.eg against independent references.

References: the published TF Lingvo ``egdd_test.py`` values (SPEC §2), float64
closed forms of the seed-004 rules computed with numpy, torch.optim.SGD, and
autograd for the hypergradient identity.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steepest.optim import EGD, EGDD, EGStepSize, HypergradientSGD, egd_step, eg_nu_update

SETTINGS = settings(max_examples=25, deadline=None)


def _feed(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=p.dtype).clone()
    opt.step()


# --------------------------------------------------------------------------- EGDD: published values
@pytest.mark.parametrize(
    "use_signs, var2, mom2, gain2",
    [
        # lingvo/core/egdd_test.py, testDenseLayer / testDenseLayerSigns
        (False, [0.5810, 1.2463], [-0.0909, -0.1961], [0.9990, 1.0075]),
        (True, [0.5801, 1.2466], [-0.0900, -0.1965], [0.9900, 1.0101]),
    ],
)
def test_egdd_published_unit_test_values(use_signs, var2, mom2, gain2):
    var = torch.nn.Parameter(torch.tensor([0.5, 1.0]))
    opt = EGDD([var], lr=0.1, momentum=0.9, beta=0.1, gain_lr=1e-2, scale_lr=1e-3, use_signs=use_signs)
    _feed(opt, [var], [[0.1, -0.5]])
    st_ = opt.state[var]
    np.testing.assert_allclose(var.detach().numpy(), [0.49, 1.05], atol=1e-6)
    np.testing.assert_allclose(st_["momentum_buffer"].numpy(), [0.01, -0.05], atol=1e-6)
    np.testing.assert_allclose(st_["gain"].numpy(), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(float(st_["scale"]), 1.0, atol=1e-6)
    _feed(opt, [var], [[-1.0, -1.5]])
    np.testing.assert_allclose(var.detach().numpy(), var2, atol=1e-4)
    np.testing.assert_allclose(st_["momentum_buffer"].numpy(), mom2, atol=1e-4)
    np.testing.assert_allclose(st_["gain"].numpy(), gain2, atol=1e-4)
    np.testing.assert_allclose(float(st_["scale"]), 1.0007, atol=1e-4)


def _egdd_numpy(theta, grads, lr, mu, beta, eta_p, eta_s, use_signs, use_directions, lo_p, hi_p, lo_s, hi_s, s0=1.0):
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    gbar = np.zeros_like(theta)
    p = np.ones_like(theta)
    s = s0
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        if use_directions:
            c = np.dot(g / (np.linalg.norm(g) + 1e-10), m / (np.linalg.norm(m) + 1e-10))
        else:
            c = np.dot(g, m)
        s = float(np.clip(s * math.exp(eta_s * c), lo_s, hi_s))
        if use_signs:
            a = np.sign(g) * np.sign(gbar)
        else:
            a = g * gbar / (1 - beta ** max(t - 1, 1))
        with np.errstate(over="ignore"):  # exp overflows to inf, then the clip applies
            p = np.clip(p * np.exp(eta_p * a), lo_p, hi_p)
        m = mu * m + lr * p * g
        gbar = beta * gbar + (1 - beta) * g
        theta = theta - s * m
    return theta, p, s


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), use_signs=st.booleans(), use_directions=st.booleans())
def test_egdd_matches_float64_reference_with_clipping(seed, use_signs, use_directions):
    rng = np.random.default_rng(seed)
    theta0 = rng.normal(size=7)
    grads = rng.normal(size=(12, 7)) * rng.uniform(0.1, 30)
    # large gain/scale rates so the clips are exercised
    kw = dict(lr=0.05, mu=0.8, beta=0.7, eta_p=0.5, eta_s=0.3, lo_p=0.5, hi_p=2.0, lo_s=0.8, hi_s=1.25)
    ref_theta, ref_p, ref_s = _egdd_numpy(theta0, grads, use_signs=use_signs, use_directions=use_directions, **kw)
    var = torch.nn.Parameter(torch.tensor(theta0))
    opt = EGDD([var], lr=kw["lr"], momentum=kw["mu"], beta=kw["beta"], gain_lr=kw["eta_p"],
               scale_lr=kw["eta_s"], use_signs=use_signs, use_directions=use_directions,
               min_gain=kw["lo_p"], max_gain=kw["hi_p"], min_scale=kw["lo_s"], max_scale=kw["hi_s"])
    for g in grads:
        _feed(opt, [var], [g])
    np.testing.assert_allclose(var.detach().numpy(), ref_theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(opt.state[var]["gain"].numpy(), ref_p, rtol=1e-12)
    np.testing.assert_allclose(float(opt.state[var]["scale"]), ref_s, rtol=1e-12)


# --------------------------------------------------------------------------- seed rule
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), granularity=st.sampled_from(["coordinate", "tensor", "global"]),
       steps=st.integers(1, 8))
def test_eg_step_size_closed_form(seed, granularity, steps):
    """ν_{t+1} = exp(γ Σ_{k=1..t} g_{k−1} g_k) (g_{−1}=0 … first step SGD), θ_{t+1} = θ_t − lr ν_{t+1} g_t."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,)]
    theta = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
    lr, gamma = 0.07, 0.3
    params = [torch.nn.Parameter(torch.tensor(t)) for t in theta]
    opt = EGStepSize(params, lr=lr, gamma=gamma, granularity=granularity)
    ref = [t.copy() for t in theta]
    acc = [np.zeros(s) for s in shapes]  # Σ g_{k−1} ⊙ g_k per coordinate
    prev = [np.zeros(s) for s in shapes]
    for gs in grads:
        acc = [a + gp * g for a, gp, g in zip(acc, prev, gs)]
        if granularity == "coordinate":
            nus = [np.exp(gamma * a) for a in acc]
        elif granularity == "tensor":
            nus = [np.exp(gamma * a.sum()) for a in acc]
        else:
            nus = [np.exp(gamma * sum(a.sum() for a in acc))] * len(acc)
        ref = [r - lr * nu * g for r, nu, g in zip(ref, nus, gs)]
        prev = gs
        _feed(opt, params, gs)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-10, atol=1e-12)
    got = opt.nus()[0]
    for nu_got, nu_ref in zip(got, nus):
        np.testing.assert_allclose(torch.as_tensor(nu_got, dtype=torch.float64).numpy(), nu_ref, rtol=1e-10)


def test_eg_step_size_first_step_is_sgd():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    g = torch.randn(4, 3)
    o1 = EGStepSize([a], lr=0.3, gamma=5.0)
    o2 = torch.optim.SGD([b], lr=0.3)
    _feed(o1, [a], [g])
    _feed(o2, [b], [g])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_global_rate_update_is_the_exact_hypergradient():
    """d L(θ_{t−1} − lr ν g_{t−1}) / dν = −lr ⟨g_{t−1}, g_t⟩, so the EG step on ν is exp(γ⟨g_{t−1}, g_t⟩)."""
    torch.manual_seed(1)
    A = torch.randn(6, 6, dtype=torch.float64)
    H = A @ A.T
    theta_prev = torch.randn(6, dtype=torch.float64)
    loss = lambda th: 0.5 * th @ H @ th  # noqa: E731
    g_prev = torch.func.grad(loss)(theta_prev)
    lr, nu0, gamma = 0.05, 1.3, 0.2
    dl_dnu = torch.func.grad(lambda nu: loss(theta_prev - lr * nu * g_prev))(torch.tensor(nu0, dtype=torch.float64))
    g_t = torch.func.grad(loss)(theta_prev - lr * nu0 * g_prev)
    # EG on ν with rate γ/lr: ν ← ν exp(−(γ/lr) dL/dν)
    expected = nu0 * math.exp(-(gamma / lr) * float(dl_dnu))
    (got,) = eg_nu_update([torch.tensor(nu0, dtype=torch.float64)], [g_prev], [g_t], gamma=gamma,
                          granularity="global")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_eg_step_size_bounds_and_stats():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = EGStepSize([p], lr=0.1, gamma=1.0, nu_min=0.5, nu_max=2.0)
    for g in ([1.0, 1.0], [3.0, -3.0]):
        _feed(opt, [p], [g])
    nu = opt.state[p]["nu"].numpy()
    np.testing.assert_allclose(nu, [2.0, 0.5])  # exp(±3), clipped to the bounds
    # the step used the clipped rates: θ = −0.1·[1, 1] − 0.1·[2·3, 0.5·(−3)]
    np.testing.assert_allclose(p.detach().numpy(), [-0.1 - 0.6, -0.1 + 0.15])
    s = opt.nu_stats()[0]
    assert s["min"] == 0.5 and s["max"] == 2.0
    assert s["mean"] == pytest.approx(1.25) and s["geo_mean"] == pytest.approx(1.0)


def test_nu_history_records_every_n_steps():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = EGStepSize([p], lr=0.1, gamma=1.0, record_every=2)
    for g in ([1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]):
        _feed(opt, [p], [g])
    assert [s for s, _ in opt.nu_history] == [2, 4]
    # after step 2: ν = exp([1, −1]); after steps 3 and 4: ν = exp([0, −2])
    assert opt.nu_history[0][1][0]["max"] == pytest.approx(math.e)
    assert opt.nu_history[1][1][0]["min"] == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError, match="record_every"):
        EGStepSize([p], lr=0.1, gamma=1.0, record_every=-1)


def test_nu_stats_weight_scalar_rates_by_size():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = EGStepSize([a, b], lr=0.1, gamma=1.0, granularity="tensor")
    for _ in range(2):
        _feed(opt, [a, b], [[1.0, 0.0, 0.0], [-1.0]])
    s = opt.nu_stats()[0]  # ν_a = e^1 for 3 coordinates, ν_b = e^1 for 1 → all e
    assert s["mean"] == pytest.approx(math.e) and s["geo_mean"] == pytest.approx(math.e)
    _feed(opt, [a, b], [[0.0, 0.0, 0.0], [2.0]])  # ν_b *= e^{-2}
    s = opt.nu_stats()[0]
    assert s["mean"] == pytest.approx((3 * math.e + math.e**-1) / 4)
    assert s["min"] == pytest.approx(math.e**-1) and s["max"] == pytest.approx(math.e)


def test_global_rate_is_per_param_group():
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = EGStepSize([{"params": [a]}, {"params": [b], "gamma": 2.0}], lr=0.1, gamma=1.0, granularity="global")
    for _ in range(2):
        _feed(opt, [a, b], [[1.0, 1.0], [1.0, 0.0]])
    assert opt.param_groups[0]["nu"] == pytest.approx(math.exp(2.0))
    assert opt.param_groups[1]["nu"] == pytest.approx(math.exp(2.0))
    _feed(opt, [a, b], [[1.0, 0.0], [-1.0, 0.0]])
    assert opt.param_groups[0]["nu"] == pytest.approx(math.exp(3.0))
    assert opt.param_groups[1]["nu"] == pytest.approx(math.exp(0.0))


# --------------------------------------------------------------------------- bounded variants (nu0, beta, normalize)
def _eg_reference(theta, grads, *, lr, gamma, granularity, nu0, beta, normalize):
    """A float64 numpy loop of the rule as the docstring states it (ḡ_{−1} = 0, ν_0 = nu0)."""
    theta = [t.copy() for t in theta]
    avg = [np.zeros_like(t) for t in theta]
    if granularity == "coordinate":
        nus = [np.full_like(t, nu0) for t in theta]
    else:
        nus = [nu0] * (1 if granularity == "global" else len(theta))

    def cos(a, b):
        a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
        den = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / den) if den > 0 else 0.0

    for gs in grads:
        if granularity == "coordinate":
            arg = [np.sign(a) * np.sign(g) if normalize else a * g for a, g in zip(avg, gs)]
        elif granularity == "tensor":
            arg = [cos([a], [g]) if normalize else float((a * g).sum()) for a, g in zip(avg, gs)]
        else:
            arg = [cos(avg, gs) if normalize else sum(float((a * g).sum()) for a, g in zip(avg, gs))]
        nus = [nu * np.exp(gamma * x) for nu, x in zip(nus, arg)]
        per = nus * len(theta) if granularity == "global" else nus
        theta = [t - lr * nu * g for t, nu, g in zip(theta, per, gs)]
        avg = [beta * a + (1 - beta) * g for a, g in zip(avg, gs)]
    return theta, nus


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), granularity=st.sampled_from(["coordinate", "tensor", "global"]),
       normalize=st.booleans(), beta=st.sampled_from([0.0, 0.7]), nu0=st.sampled_from([None, 0.05]),
       steps=st.integers(1, 8))
def test_eg_step_size_options_match_a_float64_loop(seed, granularity, normalize, beta, nu0, steps):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,)]
    theta = [rng.normal(size=sh) for sh in shapes]
    # some exact zeros: the cosine's 0/0 and the sign's 0 are part of the rule
    grads = [[rng.normal(size=sh) * (rng.random(sh) > 0.2) for sh in shapes] for _ in range(steps)]
    lr, gamma = 0.07, 0.3
    params = [torch.nn.Parameter(torch.tensor(t)) for t in theta]
    opt = EGStepSize(params, lr=lr, gamma=gamma, granularity=granularity, nu0=nu0, beta=beta, normalize=normalize)
    for gs in grads:
        _feed(opt, params, gs)
    ref, nus = _eg_reference(theta, grads, lr=lr, gamma=gamma, granularity=granularity,
                             nu0=1.0 if nu0 is None else nu0, beta=beta, normalize=normalize)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-10, atol=1e-12)
    got = opt.nus()[0]
    for nu_got, nu_ref in zip(got, nus * (len(shapes) if granularity == "global" else 1)):
        np.testing.assert_allclose(torch.as_tensor(nu_got, dtype=torch.float64).numpy(), nu_ref, rtol=1e-10)


def test_nu0_scales_the_first_step():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    g = torch.randn(4, 3)
    o1 = EGStepSize([a], lr=0.3, gamma=5.0, granularity="tensor", nu0=0.01, normalize=True)
    o2 = torch.optim.SGD([b], lr=0.3 * 0.01)
    _feed(o1, [a], [g])
    _feed(o2, [b], [g])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(o1.state[a]["nu"]) == pytest.approx(0.01)  # no past gradient yet: the rate has not moved


@pytest.mark.parametrize("granularity", ["coordinate", "tensor", "global"])
def test_normalized_rate_moves_at_most_gamma_per_step_whatever_the_gradient_size(granularity):
    """|Δ log ν| ≤ γ with normalize=True; the inner product with the same γ throws ν to the dtype's edge."""
    gamma = 0.1
    seq = [[1.0, -2.0, 3.0], [1e30, -1e30, -2e30], [-3e35, 1e35, 1e36], [1e-30, 1e-30, -1e-30]]
    for normalize in (True, False):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = EGStepSize([p], lr=0.0, gamma=gamma, granularity=granularity, normalize=normalize)
        logs = [0.0]
        for g in seq:
            _feed(opt, [p], [g])
            nu = opt.nus()[0][0]
            logs.append(float(torch.log(torch.as_tensor(nu, dtype=torch.float64)).max()))
        steps = np.abs(np.diff(logs))
        if normalize:
            assert steps.max() <= gamma * (1 + 1e-6)
            assert steps.max() >= 0.5 * gamma  # it does move
        else:
            assert steps.max() > 50.0


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), granularity=st.sampled_from(["coordinate", "tensor", "global"]),
       scale=st.sampled_from([1e-6, 1e-2, 1e3, 1e8]))
def test_normalized_rates_do_not_depend_on_the_gradient_scale(seed, granularity, scale):
    """Scaling every gradient by c > 0 leaves the cosine, hence ν, unchanged (lr 0 keeps θ fixed)."""
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=(2, 5)) for _ in range(6)]
    out = []
    for c in (1.0, scale):
        p = torch.nn.Parameter(torch.zeros(2, 5, dtype=torch.float64))
        opt = EGStepSize([p], lr=0.0, gamma=0.4, granularity=granularity, nu0=0.2, beta=0.5, normalize=True)
        for g in grads:
            _feed(opt, [p], [c * g])
        out.append(torch.as_tensor(opt.nus()[0][0], dtype=torch.float64).numpy())
    np.testing.assert_allclose(out[0], out[1], rtol=1e-10)


def test_averaged_rate_follows_the_running_average():
    """β > 0: the rate uses ḡ_{t−1} = Σ_k (1−β) β^{t−1−k} g_k, not g_{t−1} (hand-computed, tensor rate)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = EGStepSize([p], lr=0.0, gamma=1.0, granularity="tensor", beta=0.5)
    for g in ([2.0, 0.0], [0.0, 4.0], [1.0, 1.0]):
        _feed(opt, [p], [g])
    # ḡ_0 = [1, 0], ḡ_1 = [0.5, 2]; products: ⟨ḡ_0, g_1⟩ = 0, ⟨ḡ_1, g_2⟩ = 2.5
    assert float(opt.state[p]["nu"]) == pytest.approx(math.exp(2.5))
    np.testing.assert_allclose(opt.state[p]["prev_grad"].numpy(), [0.75, 1.5])


def test_egdd_initial_scale_matches_the_reference():
    rng = np.random.default_rng(7)
    theta0 = rng.normal(size=6)
    grads = rng.normal(size=(10, 6))
    kw = dict(lr=0.05, mu=0.9, beta=0.9, eta_p=0.01, eta_s=0.2, use_signs=True, use_directions=True,
              lo_p=0.01, hi_p=100.0, lo_s=1e-4, hi_s=1e4)
    ref_theta, ref_p, ref_s = _egdd_numpy(theta0, grads, s0=0.01, **kw)
    var = torch.nn.Parameter(torch.tensor(theta0))
    opt = EGDD([var], lr=kw["lr"], momentum=kw["mu"], scale_lr=kw["eta_s"], min_scale=kw["lo_s"],
               max_scale=kw["hi_s"], initial_scale=0.01)
    _feed(opt, [var], [grads[0]])
    np.testing.assert_allclose(var.detach().numpy(), theta0 - 0.01 * kw["lr"] * grads[0], rtol=1e-12)
    for g in grads[1:]:
        _feed(opt, [var], [g])
    np.testing.assert_allclose(var.detach().numpy(), ref_theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(opt.state[var]["scale"]), ref_s, rtol=1e-6)  # a float32 slot


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, nu0=0.0), "nu0 must be > 0"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, nu0=math.nan), "nu0 must be finite"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, nu0=0.01, nu_min=0.1), r"nu0 must lie in \[nu_min, nu_max\]"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, beta=1.0), "beta must be < 1"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, beta=-0.5), "beta must be >= 0"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, normalize="yes"), "normalize must be True or False"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, initial_scale=0.0), "initial_scale must be > 0"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, initial_scale=0.01), "min_scale <= initial_scale <= max_scale"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, initial_scale=50.0), "min_scale <= initial_scale <= max_scale"),
    ],
)
def test_bad_option_values_raise_naming_the_argument(factory, match):
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises((ValueError, TypeError), match=match):
        factory(p)


def test_explicit_nu0_is_the_starting_rate_in_every_granularity():
    p = torch.nn.Parameter(torch.zeros(3))
    for gran in ("coordinate", "tensor", "global"):
        opt = EGStepSize([p], lr=0.1, gamma=0.1, granularity=gran, nu0=0.25, nu_min=0.1)
        assert opt.nus()[0][0] == 0.25 and opt.nu_stats()[0]["geo_mean"] == pytest.approx(0.25)


# --------------------------------------------------------------------------- EGD
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), simplex=st.booleans(), steps=st.integers(1, 6))
def test_egd_closed_form(seed, simplex, steps):
    """θ_T = θ_0 ⊙ exp(−lr Σ_t g_t) (normalized to sum 1 on the simplex)."""
    rng = np.random.default_rng(seed)
    theta0 = rng.uniform(0.1, 2.0, size=(4, 3))
    grads = rng.normal(size=(steps, 4, 3))
    lr = 0.4
    p = torch.nn.Parameter(torch.tensor(theta0))
    opt = EGD([p], lr=lr, simplex=simplex)
    for g in grads:
        _feed(opt, [p], [g])
    ref = theta0 * np.exp(-lr * grads.sum(0))
    if simplex:
        ref = ref / ref.sum()
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12)


def test_egd_is_gradient_descent_in_log_space_to_first_order():
    """For small lr, θ ⊙ exp(−lr g) ≈ θ − lr θ ⊙ g (the mirror-descent view)."""
    theta = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    g = torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64)
    lr = 1e-6
    got = egd_step(theta, g, lr=lr)
    np.testing.assert_allclose((got - theta).numpy(), (-lr * theta * g).numpy(), rtol=1e-5)


def test_egd_simplex_renormalizes_every_step():
    p = torch.nn.Parameter(torch.tensor([3.0, 1.0, 0.5, 4.0]))  # does not start on the simplex
    opt = EGD([p], lr=0.5, simplex=True)
    torch.manual_seed(0)
    for _ in range(5):
        _feed(opt, [p], [torch.randn(4)])
        assert float(p.detach().sum()) == pytest.approx(1.0, abs=1e-6)
        assert bool((p > 0).all())


@pytest.mark.parametrize("simplex", [False, True])
def test_egd_exact_zeros_stay_zero(simplex):
    p = torch.nn.Parameter(torch.tensor([0.0, 0.3, 0.0, 0.7]))
    opt = EGD([p], lr=2.0, simplex=simplex)
    for g in ([-50.0, 1.0, -1e3, 0.0], [-1.0, 2.0, -3.0, 4.0]):
        _feed(opt, [p], [g])
    assert p[0].item() == 0.0 and p[2].item() == 0.0
    assert p[1].item() > 0 and p[3].item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_egd_no_overflow_for_large_lr_times_grad(dtype):
    info = torch.finfo(dtype)
    p = torch.nn.Parameter(torch.tensor([0.5, 1.0, 2.0], dtype=dtype))
    opt = EGD([p], lr=1e4)
    _feed(opt, [p], [[-1e3, 1e3, 0.0]])  # exponents ±1e7
    assert bool(torch.isfinite(p).all())
    assert p[0].item() >= 0.99 * info.max  # saturates instead of inf
    assert 0 < p[1].item() <= info.tiny * 1.0001  # stays positive instead of a permanent 0
    assert p[2].item() == 2.0
    q = torch.nn.Parameter(torch.tensor([0.25, 0.25, 0.5], dtype=dtype))
    opt = EGD([q], lr=1e4, simplex=True)
    _feed(opt, [q], [[-1e3, 1e3, -900.0]])
    assert bool(torch.isfinite(q).all()) and bool((q > 0).all())
    assert q[0].item() == pytest.approx(1.0, rel=1e-2)


def test_egd_negative_parameter_error_names_it():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.abs_()
        model.bias.fill_(-0.1)
    with pytest.raises(ValueError, match=r"'bias'.*negative"):
        EGD(model.named_parameters(), lr=0.1)
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(5))
    opt = EGD([a, b], lr=0.1)
    with torch.no_grad():
        b[3] = -1.0  # made negative after construction: caught at step, before any update
    a.grad, b.grad = torch.ones(2), torch.ones(5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(5,\)\).*negative"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(2))


# --------------------------------------------------------------------------- hypergradient SGD
def test_hypergradient_sgd_matches_float64_reference():
    rng = np.random.default_rng(3)
    theta0 = [rng.normal(size=(2, 3)), rng.normal(size=4)]
    grads = [[rng.normal(size=(2, 3)), rng.normal(size=4)] for _ in range(6)]
    lr, beta = 0.1, 0.05
    params = [torch.nn.Parameter(torch.tensor(t)) for t in theta0]
    opt = HypergradientSGD(params, lr=lr, hypergrad_lr=beta)
    ref = [t.copy() for t in theta0]
    prev = [np.zeros_like(t) for t in theta0]
    alpha = lr
    for gs in grads:
        alpha += beta * sum(float((gp * g).sum()) for gp, g in zip(prev, gs))
        ref = [r - alpha * g for r, g in zip(ref, gs)]
        prev = gs
        _feed(opt, params, gs)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(alpha, rel=1e-12)


def test_hypergradient_sgd_with_zero_beta_is_sgd():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    o1, o2 = HypergradientSGD([a], lr=0.2, hypergrad_lr=0.0), torch.optim.SGD([b], lr=0.2)
    for _ in range(4):
        g = torch.randn(5)
        _feed(o1, [a], [g])
        _feed(o2, [b], [g])
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- shared contract
def _make(kind, params):
    if kind == "egd":
        return EGD(params, lr=0.05)
    if kind == "egd_simplex":
        return EGD(params, lr=0.05, simplex=True)
    if kind.startswith("eg_"):
        return EGStepSize(params, lr=0.05, gamma=0.5, granularity=kind[3:], nu_min=1e-3, nu_max=1e3)
    if kind == "egdd":
        return EGDD(params, lr=0.05, momentum=0.9)
    if kind.startswith("cos_"):
        return EGStepSize(params, lr=0.05, gamma=0.3, granularity=kind[4:], nu0=0.1, beta=0.9, normalize=True)
    if kind == "egdd_s0":
        return EGDD(params, lr=0.05, momentum=0.9, scale_lr=0.1, initial_scale=0.1, min_scale=1e-3)
    if kind == "hd":
        return HypergradientSGD(params, lr=0.05, hypergrad_lr=0.01)
    raise AssertionError(kind)


KINDS = ["egd", "egd_simplex", "eg_coordinate", "eg_tensor", "eg_global", "egdd", "hd", "cos_coordinate", "cos_tensor",
         "cos_global", "egdd_s0"]


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_is_bit_exact(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    if kind.startswith("egd"):
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.02}]
    opt = _make(kind, groups)
    _train(model, opt, 5, seed=1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 5, seed=2)

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model2.load_state_dict(saved_model)
    opt2 = _make(kind, [{"params": list(model2[0].parameters())}, {"params": list(model2[2].parameters())}])
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, 5, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[1]["lr"] == opt2.param_groups[1]["lr"]


@pytest.mark.parametrize("kind", KINDS)
def test_nan_gradient_raises_and_changes_nothing(kind):
    a = torch.nn.Parameter(torch.full((3,), 0.5))
    b = torch.nn.Parameter(torch.full((2,), 0.25))
    opt = _make(kind, [a, b])
    _feed(opt, [a, b], [torch.ones(3), torch.ones(2)])
    before = (a.detach().clone(), b.detach().clone(), copy.deepcopy(opt.state_dict()))
    a.grad = torch.ones(3)
    b.grad = torch.tensor([1.0, math.nan])
    with pytest.raises(ValueError, match=r"non-finite gradient.*\['params'\]\[1\]"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    after = opt.state_dict()
    for k, v in before[2]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(t))
    assert after["param_groups"] == before[2]["param_groups"]


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda p: EGD(p, lr=-0.1), "lr must be >= 0"),
        (lambda p: EGD(p, lr=math.nan), "lr must be finite"),
        (lambda p: EGD(p, lr=0.1, simplex="yes"), "simplex must be True or False"),
        (lambda p: EGStepSize(p, lr=-1.0, gamma=0.1), "lr must be >= 0"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=-0.1), "gamma must be >= 0"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, granularity="row"), "granularity must be one of"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, nu_min=2.0, nu_max=1.0), "nu_min must be <= nu_max"),
        (lambda p: EGStepSize(p, lr=0.1, gamma=0.1, nu_min=0.0), "nu_min must be > 0"),
        (lambda p: EGDD(p, lr=0.1, momentum=1.0), "momentum must be < 1"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, beta=-0.1), "beta must be >= 0"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, gain_lr=-1.0), "gain_lr must be >= 0"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, min_gain=2.0), "min_gain <= 1 <= max_gain"),
        (lambda p: EGDD(p, lr=0.1, momentum=0.9, max_scale=0.5), "min_scale <= initial_scale <= max_scale"),
        (lambda p: HypergradientSGD(p, lr=-0.1, hypergrad_lr=0.1), "lr must be >= 0"),
        (lambda p: HypergradientSGD(p, lr=0.1, hypergrad_lr=math.inf), "hypergrad_lr must be finite"),
        (lambda p: EGStepSize(p, lr="0.1", gamma=0.1), "lr must be a real number"),
    ],
)
def test_bad_hyperparameters_raise(factory, match):
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises((ValueError, TypeError), match=match):
        factory(p)


def test_bad_hyperparameter_in_added_group_raises():
    opt = EGStepSize([torch.nn.Parameter(torch.ones(2))], lr=0.1, gamma=0.1)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "gamma": -1.0})
    assert len(opt.param_groups) == 1  # the bad group was not kept


def test_bad_hyperparameter_in_a_later_group_blocks_the_whole_step():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = HypergradientSGD([{"params": [a]}, {"params": [b]}], lr=0.1, hypergrad_lr=0.01)
    opt.param_groups[1]["hypergrad_lr"] = math.nan
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="hypergrad_lr must be finite"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(2))  # group 0 untouched too


def test_hyperparameter_changed_later_is_checked_at_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = EGDD([p], lr=0.1, momentum=0.9)
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
