"""Fuzz battery for the optimizers' step: shapes (zero-size, 1×n, n×1, conv), dtypes, gradient scales, NaN/Inf.

Each generated case either matches the same optimizer run on float64 copies of
the same values (rounded to the parameter dtype) within the dtype's tolerance, or
applies its non-finite policy exactly (``raise``: NonFiniteGradientError and
nothing changed; ``skip``: that parameter and its state unchanged), or the true
result lies beyond the dtype's range. Never a silent NaN.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

FUZZ: Counter = Counter()

MAKERS = {
    "muon": lambda ps, **kw: Muon(ps, lr=0.02, weight_decay=0.01, adamw_lr=1e-2, **kw),
    "muon_kj": lambda ps, **kw: Muon(ps, lr=0.02, ns_coefficients=(3.4445, -4.7750, 2.0315), **kw),
    "normuon": lambda ps, **kw: NorMuon(ps, lr=0.02, weight_decay=0.01, adamw_lr=1e-2, **kw),
    "signsgd": lambda ps, **kw: SignSGD(ps, lr=0.01, **kw),
    "signum": lambda ps, **kw: SignSGD(ps, lr=0.01, momentum=0.9, weight_decay=0.01, **kw),
    "egd": lambda ps, **kw: EGD(ps, lr=0.1, **kw),
    "egd_simplex": lambda ps, **kw: EGD(ps, lr=0.1, simplex=True, **kw),
    "eg_coordinate": lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, **kw),
    "eg_tensor": lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, granularity="tensor", **kw),
    "eg_global": lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.5, granularity="global", **kw),
    "egdd": lambda ps, **kw: EGDD(ps, lr=0.05, momentum=0.9, **kw),
    "eg_cosine_tensor": lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.2, granularity="tensor", nu0=0.1, beta=0.9,
                                                    normalize=True, **kw),
    "eg_cosine_global": lambda ps, **kw: EGStepSize(ps, lr=0.05, gamma=0.2, granularity="global", nu0=0.1, beta=0.9,
                                                    normalize=True, **kw),
    "egdd_s0": lambda ps, **kw: EGDD(ps, lr=0.05, momentum=0.9, scale_lr=0.1, initial_scale=0.1, min_scale=1e-3, **kw),
    "hypergradient": lambda ps, **kw: HypergradientSGD(ps, lr=0.05, hypergrad_lr=1e-3, **kw),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
SHAPES = [(0, 3), (1, 5), (5, 1), (3, 4), (2, 3, 2, 2), (4,), (1,)]
# relative tolerance of a step against its float64 twin: the dtype's rounding, and Newton–Schulz run
# in float32 (not float64) for Muon
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 2e-4, torch.float64: 1e-9}

case = st.fixed_dictionaries({
    "name": st.sampled_from(sorted(MAKERS)),
    "dtype": st.sampled_from(list(DTYPES)),
    "shapes": st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
    "log_scale": st.sampled_from([-30, -12, -6, 0, 0, 3, 12, 30]),
    "bad": st.sampled_from([None] * 6 + ["nan", "inf"]),
    "policy": st.sampled_from(["skip", "raise"]),
    "steps": st.integers(1, 3),
    "seed": st.integers(0, 2**31 - 1),
})


def amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().max()) if x.numel() else 0.0


def _state_copy(opt) -> dict:
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st_.items()}
            for p, st_ in opt.state.items()}


@settings(max_examples=3500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_fuzz_optimizer_step(d):
    FUZZ["optim"] += 1
    dtype = DTYPES[d["dtype"]]
    big, tiny = float(torch.finfo(dtype).max), float(torch.finfo(dtype).tiny)
    g = torch.Generator().manual_seed(d["seed"])
    base = [torch.rand(s, generator=g, dtype=torch.float64) * 0.9 + 0.1 for s in d["shapes"]]
    ps = [torch.nn.Parameter(b.to(dtype)) for b in base]
    refs = [torch.nn.Parameter(p.detach().double()) for p in ps]
    ours, twin = MAKERS[d["name"]](ps, nonfinite=d["policy"]), MAKERS[d["name"]](refs)
    for t in range(d["steps"]):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** d["log_scale"] for s in d["shapes"]]
        if d["bad"] and t == d["steps"] - 1 and grads[0].numel():
            grads[0].view(-1)[0] = float("nan") if d["bad"] == "nan" else float("inf")
        for p, q, gr in zip(ps, refs, grads):
            p.grad = gr.to(dtype)
            q.grad = p.grad.double()
        bad = [not bool(torch.isfinite(p.grad).all()) for p in ps]
        if d["name"].startswith(("muon", "normuon")) and not any(bad) and any(
                p.ndim < 2 and amax(p.grad) ** 2 > float(torch.finfo(torch.promote_types(dtype, torch.float32)).max)
                for p in ps):
            return  # AdamW's second moment g² overflows its float32 slot (as in torch.optim.AdamW): zero step
        if any(bad):
            before, state = [p.detach().clone() for p in ps], _state_copy(ours)
            if d["policy"] == "raise":
                with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
                    ours.step()
                assert all(torch.equal(p, b) for p, b in zip(ps, before))
                assert _state_copy(ours).keys() == state.keys()
                return
            with pytest.warns(NonFiniteGradientWarning):
                ours.step()
            for p, b, is_bad in zip(ps, before, bad):
                if is_bad:
                    assert torch.equal(p, b)
                    kept = {k: v for k, v in ours.state[p].items() if k != "nonfinite_skips"}
                    old = {k: v for k, v in state.get(id(p), {}).items() if k != "nonfinite_skips"}
                    assert kept.keys() == old.keys()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteGradientWarning)
            ours.step()
        twin.step()
        if any(not bool(torch.isfinite(q).all()) or amax(q) > big / 2
               or bool(((q != 0) & (q.abs() < tiny)).any()) for q in refs):
            return  # the true trajectory left the dtype's normal range: saturation is all a dtype can do
    for p, q, b0 in zip(ps, refs, base):
        want = q.detach()
        assert not bool(torch.isnan(p).any()), "silent NaN"
        want_d = want.to(dtype).double()
        scale = max(amax(want), amax(b0), 1e-30)  # rounding errors scale with the values along the way
        err = amax(p.detach().double() - want_d)
        assert err <= TOL[dtype] * scale + 4 * float(torch.finfo(dtype).eps) * scale, (d["name"], err, scale)
