"""One contract battery for every optimizer in steepest.optim (in the manner of torch's ``optim_db``).

Each optimizer, in each listed configuration, must: resume bit-exactly from a
``state_dict`` (also through ``torch.load(weights_only=True)``), accept a closure,
follow an LR scheduler, leave parameters without gradient untouched, apply its
non-finite policy ("skip" and "raise"), refuse bad param groups without keeping
them, and refuse another optimizer's state, another parameter layout or a corrupt
state at ``load_state_dict`` time, leaving itself unchanged.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from steepest.optim import (
    EGD,
    EGDD,
    EGStepSize,
    HypergradientSGD,
    Muon,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    NorMuon,
    SignSGD,
)

CASES = {
    "muon": (lambda ps, **kw: Muon(ps, lr=0.02, weight_decay=0.01, adamw_lr=0.01, **kw), "skip"),
    "muon_kj_ball": (lambda ps, **kw: Muon(ps, lr=0.02, ns_coefficients=(3.4445, -4.7750, 2.0315),
                                           max_spectral_norm=2.0, **kw), "skip"),
    "normuon": (lambda ps, **kw: NorMuon(ps, lr=0.02, weight_decay=0.01, adamw_lr=0.01, **kw), "skip"),
    "normuon_nesterov_ball": (lambda ps, **kw: NorMuon(ps, lr=0.02, nesterov=True, max_spectral_norm=2.0, **kw),
                              "skip"),
    "signsgd": (lambda ps, **kw: SignSGD(ps, lr=0.01, **kw), "skip"),
    "signum": (lambda ps, **kw: SignSGD(ps, lr=0.01, momentum=0.9, weight_decay=0.01, **kw), "skip"),
    "egd": (lambda ps, **kw: EGD(ps, lr=0.1, **kw), "raise"),
    "egd_simplex": (lambda ps, **kw: EGD(ps, lr=0.1, simplex=True, **kw), "raise"),
    "eg_coordinate": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, **kw), "raise"),
    "eg_tensor": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, granularity="tensor", **kw), "raise"),
    "eg_global": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, granularity="global", **kw), "raise"),
    "egdd": (lambda ps, **kw: EGDD(ps, lr=0.05, momentum=0.9, gain_lr=0.1, scale_lr=0.1, **kw), "raise"),
    "eg_cosine_coordinate": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.2, nu0=0.1, beta=0.9, normalize=True,
                                                         **kw), "raise"),
    "eg_cosine_tensor": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.2, granularity="tensor", nu0=0.1,
                                                     beta=0.9, normalize=True, **kw), "raise"),
    "eg_cosine_global": (lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.2, granularity="global", nu0=0.1,
                                                     beta=0.9, normalize=True, **kw), "raise"),
    "egdd_s0": (lambda ps, **kw: EGDD(ps, lr=0.05, momentum=0.9, scale_lr=0.1, initial_scale=0.1, min_scale=1e-3,
                                      **kw), "raise"),
    "hypergradient": (lambda ps, **kw: HypergradientSGD(ps, lr=0.05, hypergrad_lr=1e-3, **kw), "raise"),
}
NAMES = sorted(CASES)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # positive entries so that EGD (θ ≥ 0) takes the same parameters as everyone else
    return [torch.nn.Parameter(torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1),
            torch.nn.Parameter(torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1),
            torch.nn.Parameter(torch.rand(3, generator=g, dtype=torch.float64) + 0.1)]


def _loss(ps: list[torch.Tensor], t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ ps[0]) @ ps[1] + ps[2]
    return (y - 0.3).pow(2).mean()


def _run(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        _loss(ps, t).backward()
        opt.step()


def _make(name: str, ps, **kw):
    return CASES[name][0](ps, **kw)


def _snapshot(ps) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_exact(name):
    ps = _params()
    opt = _make(name, ps)
    _run(opt, ps, range(3))
    buf = io.BytesIO()
    torch.save({"params": _snapshot(ps), "opt": opt.state_dict()}, buf)
    _run(opt, ps, range(3, 7))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    qs = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = _make(name, qs)
    opt2.load_state_dict(saved["opt"])
    _run(opt2, qs, range(3, 7))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact_for_bfloat16_parameters(name):
    # state of half-precision parameters is float32; torch's load_state_dict casts it to bf16
    ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in _params()]
    loss = lambda qs, t: _loss([q.double() for q in qs], t)  # noqa: E731

    def run(opt, qs, steps):
        for t in steps:
            opt.zero_grad()
            loss(qs, t).backward()
            opt.step()

    opt = _make(name, ps)
    run(opt, ps, range(3))
    saved = copy.deepcopy({"params": _snapshot(ps), "opt": opt.state_dict()})
    run(opt, ps, range(3, 6))
    qs = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = _make(name, qs)
    opt2.load_state_dict(saved["opt"])
    run(opt2, qs, range(3, 6))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_closure_gives_the_loss_and_the_same_step(name):
    ps, qs = _params(), _params()
    a, b = _make(name, ps), _make(name, qs)
    _run(a, ps, range(1))

    def closure():
        b.zero_grad()
        loss = _loss(qs, 0)
        loss.backward()
        return loss

    loss = b.step(closure)
    assert torch.equal(loss, _loss(_params(), 0))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_the_step(name):
    ps = _params()
    opt = _make(name, ps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    lr0 = [g["lr"] for g in opt.param_groups]
    _run(opt, ps, range(1))
    sched.step()
    if name != "hypergradient":  # its lr is a live, learned value
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * v for v in lr0])
    for g in opt.param_groups:  # lr 0: nothing moves (every rule scales its whole step by lr)
        g["lr"] = 0.0
    for g in opt.param_groups:
        if name == "hypergradient":
            g["hypergrad_lr"] = 0.0
        if name.startswith("egdd"):  # lr sits inside its momentum buffer (Lingvo's form): the buffer coasts on
            g["momentum"] = 0.0
    before = _snapshot(ps)
    _run(opt, ps, range(1, 2))
    for p, q in zip(ps, before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_gradient_are_untouched(name):
    ps = _params()
    opt = _make(name, ps)
    before = _snapshot(ps)
    opt.zero_grad()
    _loss(ps, 0).backward()
    ps[1].grad = None
    opt.step()
    assert torch.equal(ps[1].detach(), before[1])
    assert not opt.state.get(ps[1])
    assert not torch.equal(ps[0].detach(), before[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_policy(name, policy):
    ps = _params()
    opt = _make(name, ps, nonfinite=policy)
    _run(opt, ps, range(2))
    before = _snapshot(ps)
    state_before = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
                    for i, p in enumerate(ps)}
    opt.zero_grad()
    _loss(ps, 2).backward()
    ps[1].grad[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"NaN or Inf.*\['params'\]"):
            opt.step()
        for p, q in zip(ps, before):
            assert torch.equal(p.detach(), q)
        return
    with pytest.warns(NonFiniteGradientWarning, match="1 parameter"):
        opt.step()
    assert torch.equal(ps[1].detach(), before[1])
    kept = {k: v for k, v in opt.state[ps[1]].items() if k != "nonfinite_skips"}
    assert kept.keys() == state_before[1].keys()
    for k, v in kept.items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_before[1][k])), k
    assert opt.skipped_steps == 1
    assert not torch.equal(ps[0].detach(), before[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(opt, ps, range(3, 4))  # and it goes on cleanly


@pytest.mark.parametrize("name", NAMES)
def test_bad_param_groups_are_refused_and_not_kept(name):
    ps = _params()
    opt = _make(name, ps[:2])
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="unknown key"):
        opt.add_param_group({"params": [ps[2]], "lr_typo": 0.1})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [ps[2]], "lr": -1.0})
    with pytest.raises(TypeError, match="set"):
        opt.add_param_group({"params": {ps[2]}})
    assert len(opt.param_groups) == n
    opt.param_groups[0]["lr"] = float("nan")  # changed by hand later: caught at the step, before any change
    before = _snapshot(ps)
    opt.zero_grad()
    _loss(ps, 0).backward()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    for p, q in zip(ps, before):
        assert torch.equal(p.detach(), q)


def _refused(opt, ps, state_dict, match):
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()  # left as it was
    assert after["param_groups"] == saved["param_groups"]
    assert after["state"].keys() == saved["state"].keys()
    _run(opt, ps, range(5, 6))  # and still steps


@pytest.mark.parametrize("name", NAMES)
def test_foreign_state_is_refused_at_load_time(name):
    ps = _params()
    opt = _make(name, ps)
    _run(opt, ps, range(2))
    other = torch.optim.AdamW(_params(), lr=1e-3)
    _run(other, other.param_groups[0]["params"], range(2))
    foreign = other.state_dict()
    if name.startswith(("muon", "normuon")):  # Muon splits the list into a Muon and an AdamW group: both layouts
        foreign = {"state": foreign["state"],
                   "param_groups": [dict(foreign["param_groups"][0], params=[0, 1]),
                                    dict(foreign["param_groups"][0], params=[2])]}
    _refused(opt, ps, foreign, "load_state_dict")


@pytest.mark.parametrize("name", NAMES)
def test_other_layout_and_corrupt_state_are_refused(name):
    ps = _params()
    opt = _make(name, ps)
    _run(opt, ps, range(2))
    small = _make(name, _params()[:2])
    with pytest.raises(ValueError):
        opt.load_state_dict(small.state_dict())
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live per-parameter dicts
    tensors = [(i, k) for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor) and v.ndim >= 1]
    if not tensors:
        pytest.skip("keeps no per-parameter tensors")
    i, k = tensors[0]
    sd["state"][i][k] = sd["state"][i][k].reshape(-1)[:-1].clone()  # wrong shape
    _refused(opt, ps, sd, rf"load_state_dict.*{k}")


# ---------------------------------------------------------------------------
# Conventions the peers follow (each failed before its fix)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_size_parameters_are_accepted(name):
    # Muon and SignSGD crashed in _foreach_norm, EGD(simplex=True) in its positivity check
    ps = _params() + [torch.nn.Parameter(torch.zeros(0, 3, dtype=torch.float64) + 0.5)]
    opt = _make(name, ps)
    for t in range(2):
        opt.zero_grad()
        (_loss(ps, t) + ps[3].sum()).backward()
        opt.step()
    assert ps[3].shape == (0, 3)


def test_momentum_cycling_scheduler_reaches_muons_adamw_part():
    # OneCycleLR writes "momentum" into every group; the AdamW part kept β₁ = 0.9 while
    # torch.optim.AdamW under the same schedule moved to 0.8688
    torch.manual_seed(0)
    v = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    w = torch.nn.Parameter(v.detach().clone())
    ours = Muon([{"params": [v], "use_muon": False}], adamw_weight_decay=0.0, adamw_lr=1e-2)
    peer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.05, total_steps=20)
    s2 = torch.optim.lr_scheduler.OneCycleLR(peer, max_lr=0.05, total_steps=20)
    for t in range(15):
        for p, o, s in ((v, ours, s1), (w, peer, s2)):
            o.zero_grad()
            ((p - 0.3 * t) ** 2).sum().backward()
            o.step()
            s.step()
    assert peer.param_groups[0]["betas"][0] == pytest.approx(ours.param_groups[0]["momentum"])
    torch.testing.assert_close(v.detach(), w.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["eg_coordinate", "eg_tensor", "egdd"])
def test_learned_multipliers_move_in_bfloat16(name):
    # bf16 slots froze ν and EGDD's scale at exactly 1.0 (exp(0.001) rounds back to 1)
    def run(dtype):
        p = torch.nn.Parameter(torch.ones(8, dtype=dtype))
        opt = {"eg_coordinate": lambda: EGStepSize([p], lr=1e-3, gamma=1e-3),
               "eg_tensor": lambda: EGStepSize([p], lr=1e-3, gamma=1e-4, granularity="tensor"),
               "egdd": lambda: EGDD([p], lr=1e-3, momentum=0.9)}[name]()
        for _ in range(200):
            p.grad = torch.ones(8, dtype=dtype)  # consistent gradients: the multiplier grows
            opt.step()
        st = opt.state[p]
        return float((st["scale"] if name == "egdd" else st["nu"]).double().mean())

    f32, b16 = run(torch.float32), run(torch.bfloat16)
    assert f32 > 1.01
    assert b16 == pytest.approx(f32, rel=1e-3)


def test_egd_simplex_in_float16_keeps_the_sum():
    # entries were floored at finfo(float16).tiny = 6.1e-5 > 1/n: a zero gradient moved the sum to 1.2207
    n = 20_000
    w = torch.nn.Parameter(torch.full((n,), 1.0 / n, dtype=torch.float16))
    opt = EGD([w], lr=0.1, simplex=True)
    w.grad = torch.zeros(n, dtype=torch.float16)
    opt.step()
    assert abs(float(w.detach().double().sum()) - 1.0) < 1e-2
    assert float(w.detach().min()) > 0


def test_nu_before_the_first_step_respects_the_bounds():
    # EGStepSize(nu_min=2) reported ν = 1 before its first step
    for gran in ("coordinate", "tensor", "global"):
        opt = EGStepSize(_params(), lr=0.1, gamma=0.1, granularity=gran, nu_min=2.0)
        assert opt.nu_stats()[0]["min"] == 2.0
        assert all(float(torch.as_tensor(v).min()) == 2.0 for v in opt.nus()[0])
