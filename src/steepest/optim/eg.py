"""Exponentiated-gradient optimizers and meta-learned step sizes.

Source: Su, *Exponentiated gradient descent + meta-learning = adaptive learning
rates*, kexue.fm/archives/8968 (the EG note), and the papers it builds on.

Functional core (tensors in, new tensors out; nothing is modified in place):

- :func:`egd_step` — exponentiated gradient descent for non-negative parameters.
- :func:`eg_nu_update` and :func:`eg_step_size_step` — the EG note's step-size rule.
- :func:`egdd_step` — the EGDD rule of TF Lingvo's ``egdd.py`` (Amid, Anil, Fifty, Warmuth 2022).
- :func:`sgd_hd_step` — hypergradient-descent SGD (Baydin et al. 2018), the classic peer.

Thin optimizer classes over it (:class:`steepest.optim.SteepestOptimizer`):
:class:`EGD`, :class:`EGStepSize`, :class:`EGDD`, :class:`HypergradientSGD`. Every
class checks its hyperparameters (also for groups added later and at every step),
refuses NaN/Inf gradients before touching any parameter or state (``nonfinite=
"raise"``, their default; ``"skip"`` skips such parameters), and round-trips
``state_dict()`` bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._validate import check_choice, check_flag, check_number, param_name
from ..distributed import extrema, full_value
from ._base import SteepestOptimizer, lr_value, slot_dtype

__all__ = [
    "EGD",
    "EGDD",
    "EGDDState",
    "EGStepSize",
    "GRANULARITIES",
    "HypergradientSGD",
    "egd_step",
    "egdd_step",
    "eg_nu_update",
    "eg_step_size_step",
    "sgd_hd_step",
]

GRANULARITIES = ("coordinate", "tensor", "global")


# --------------------------------------------------------------------------- helpers
def _nu0(group: dict[str, Any]) -> float:
    """The initial rate: ``nu0`` when given (checked to lie in the bounds), else 1 moved into [nu_min, nu_max]."""
    if group.get("nu0") is not None:
        return float(group["nu0"])
    lo, hi = group["nu_min"], group["nu_max"]
    nu = 1.0 if lo is None else max(1.0, lo)
    return nu if hi is None else min(nu, hi)


def _cosine(prev_grads: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """cos(a, b) of the concatenated ``prev_grads`` (a) and ``grads`` (b), in float64; 0 when either is zero.

    Both sides are divided by their largest entry first, so the squares cannot overflow.
    """
    a = [x.double() for x in prev_grads]
    b = [x.double() for x in grads]
    if not a:
        return torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64, device=a[0].device)

    def scale(xs: list[Tensor]) -> Tensor:
        m = torch.stack([x.abs().amax() if x.numel() else 0.0 * one for x in xs]).amax()
        return torch.where(m > 0, m, one)

    sa, sb = scale(a), scale(b)
    dot = sum((torch.sum((x / sa) * (y / sb)) for x, y in zip(a, b, strict=True)), 0.0 * one)
    na = torch.sqrt(sum((torch.sum((x / sa) ** 2) for x in a), 0.0 * one))
    nb = torch.sqrt(sum((torch.sum((y / sb) ** 2) for y in b), 0.0 * one))
    den = na * nb
    return torch.where(den > 0, dot / torch.where(den > 0, den, one), 0.0 * one).clamp(-1.0, 1.0)


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive value of ``dtype`` (a subnormal): the floor that keeps a positive entry positive.

    ``finfo.tiny`` (the smallest normal) is too coarse a floor in half precision: 6.1e-5
    in float16, above 1/n for n > 16384 entries on the simplex.
    """
    info = torch.finfo(dtype)
    return float(info.tiny) * float(info.eps)


def _saturate(x: Tensor) -> Tensor:
    """``x`` with ±inf replaced by ±max of its dtype (an exponent that large saturates anyway)."""
    big = torch.finfo(x.dtype).max
    return x.clamp(-big, big)


def _limits(dtype: torch.dtype) -> tuple[float, float, float]:
    info = torch.finfo(dtype)
    return _smallest(dtype), float(info.max), math.log(float(info.max))


def _exp_scale(x: Tensor, log_factor: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``x * exp(log_factor)`` for x >= 0, saturating in [smallest positive, max] of the dtype.

    Positive entries never overflow to inf nor underflow to an exact (and then
    permanent) zero; exact zeros stay exactly zero.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    tiny, big, _ = _limits(out_dtype)
    cd = torch.promote_types(x.dtype, torch.float32)  # half types: exponentiate in float32
    xc, lf = x.to(cd), log_factor.to(cd)
    log_big = _limits(cd)[2]
    cap = log_big - 1.0  # exp(cap) is finite after rounding
    direct = xc * torch.exp(lf.clamp(max=cap))
    # a huge factor on a small x can still be finite: go through log space there
    via_log = torch.exp((torch.log(xc) + lf).clamp(max=log_big))
    out = torch.where(lf > cap, via_log, direct).clamp(max=big)
    return torch.where(xc > 0, out.clamp(min=tiny), torch.zeros_like(out)).to(out_dtype)


def _copy_into(dst: Tensor, src: Tensor) -> None:
    # FSDP2: a per-tensor scalar computed from sharded (DTensor) values is a DTensor; the state keeps a plain one
    dst.copy_(src.full_tensor() if hasattr(src, "full_tensor") and not hasattr(dst, "full_tensor") else src)


# --------------------------------------------------------------------------- EGD
def egd_step(param: Tensor, grad: Tensor, *, lr: float, simplex: bool = False) -> Tensor:
    """One exponentiated-gradient step: ``θ ← θ ⊙ exp(−lr · g)`` (the EG note, kexue.fm/archives/8968).

    Gradient descent on φ = log θ with the factor e^φ dropped (Kivinen & Warmuth
    1997), so θ stays non-negative. With ``simplex=True`` the whole tensor is then
    renormalized to sum 1 (``θ_i e^{−lr g_i} / Σ_j θ_j e^{−lr g_j}``, computed with
    the maximal exponent subtracted so nothing overflows).

    Exact zeros stay zero forever (0 · e^x = 0): start from strictly positive
    values unless a coordinate is meant to be switched off. Positive entries are
    kept within [smallest positive value, ``finfo.max``]: a huge ``lr·g`` saturates instead of
    overflowing to inf or underflowing to a permanent zero. ``param`` must be
    non-negative (checked by :class:`EGD`, not here).
    """
    out_dtype = param.dtype
    cd = torch.promote_types(out_dtype, torch.float32)  # half types: compute in float32
    param, z = param.to(cd), -lr * grad.to(cd)
    if not simplex:
        return _exp_scale(param, z, out_dtype)
    if param.numel() == 0:
        return param.to(out_dtype)
    pos = param > 0
    if not bool(pos.any()):
        raise ValueError("simplex=True needs at least one positive entry per tensor")
    zmax = torch.where(pos, z, torch.full_like(z, -math.inf)).max()
    w = _exp_scale(param / param.sum(), torch.where(pos, z - zmax, torch.zeros_like(z)))
    w = w / w.sum()
    return torch.where(pos, w.clamp(min=_smallest(out_dtype)), w).to(out_dtype)


class EGD(SteepestOptimizer):
    """Exponentiated gradient descent for non-negative parameters (the EG note, kexue.fm/archives/8968).

    ``θ ← θ ⊙ exp(−lr · ∇L(θ))``; with ``simplex=True`` each tensor is renormalized
    to sum 1 after the step (mixture weights). See :func:`egd_step` for the
    numerics: exact zeros stay zero, no overflow for large ``lr·g``.

    A negative (or non-finite) parameter raises ``ValueError`` naming it: EGD is
    only defined on θ ≥ 0 (take ``abs`` or ``clamp_min(0)`` of the initial values).
    Pass ``model.named_parameters()`` to get names instead of indices in errors.

    Args:
        params: non-negative parameters or param groups (keys ``lr, simplex``).
        lr: step size ≥ 0 (required).
        simplex: renormalize each tensor to sum 1 after every step (default False).
        nonfinite: ``"raise"`` (default) or ``"skip"``: what a NaN/Inf gradient does.
    """

    def __init__(self, params: Iterable[Any], lr: float, simplex: bool = False, *, nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, simplex=simplex), nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        check_number("lr", group["lr"])
        check_flag("simplex", group["simplex"])
        if initial:
            gi = len(self.param_groups) - 1
            for i, p in enumerate(group["params"]):
                self._check_param(group, gi, i, p)

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"EGD keeps no state, got keys {sorted(state)}")

    def _check_param(self, group: dict[str, Any], gi: int, i: int, p: Tensor) -> None:
        name = param_name(group, gi, i, p)
        if not p.is_floating_point():
            raise TypeError(f"EGD needs floating-point parameters; {name} has dtype {p.dtype}")
        lo, hi, finite = extrema(p)  # over all ranks' shards (FSDP2), empty ones included
        if not finite:
            raise ValueError(f"EGD parameter {name} has NaN/Inf entries")
        if lo < 0:
            raise ValueError(
                f"EGD parameter {name} has negative entries (min {lo:.3g}); "
                "exponentiated gradient keeps parameters >= 0 and cannot start below 0 — "
                "initialize it non-negative (e.g. .abs_() or .clamp_(min=0))")
        if group["simplex"] and p.numel() and hi <= 0:
                raise ValueError(f"EGD parameter {name} is all zeros but simplex=True needs a positive entry")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._evaluate(closure)
        work = self._gradients()
        for gi, (group, items) in enumerate(work):
            index = {id(q): i for i, q in enumerate(group["params"])}
            for p, _ in items:
                self._check_param(group, gi, index[id(p)], p)
        for group, items in work:
            for p, g in items:
                p.copy_(egd_step(p, g, lr=lr_value(group["lr"]), simplex=group["simplex"]))
        return loss


# --------------------------------------------------------------------------- EG step sizes
def eg_nu_update(nus: Sequence[Tensor], prev_grads: Sequence[Tensor], grads: Sequence[Tensor], *,
                 gamma: float, granularity: str = "coordinate", nu_min: float | None = None,
                 nu_max: float | None = None, normalize: bool = False) -> list[Tensor]:
    """The EG note's rate update ``ν_{t+1} = ν_t ⊙ exp(γ g_{t−1} ⊙ g_t)``, clipped to optional bounds.

    ``granularity``: ``"coordinate"`` — one ν per entry (``nus`` shaped like the
    grads); ``"tensor"`` — one 0-dim ν per tensor, updated with
    ``exp(γ ⟨g_{t−1}, g_t⟩)`` summed over that tensor; ``"global"`` — a single
    0-dim ν (``nus`` of length 1) updated with the inner product summed over all
    tensors. The sum is the exact derivative ``−∂L(θ_t)/∂ν_t`` (up to lr) of the
    loss with respect to the shared rate. With ν_0 = 1:
    ``ν_{t+1} = exp(γ Σ_{k≤t} g_{k−1} g_k)`` (Su, kexue.fm/archives/8968, eq. 12;
    simplified from Amid et al. 2022). Values saturate in the dtype's finite range.

    ``normalize=True`` replaces the inner product by the cosine
    ``cos(g_{t−1}, g_t) = ⟨g_{t−1}, g_t⟩ / (‖g_{t−1}‖ ‖g_t‖)`` over the same coordinates
    (0 when either is zero; per coordinate it is ``sign(g_{t−1,i}) sign(g_{t,i})``):
    the hypergradient's sign with a bounded size, so ``|Δ log ν| ≤ γ`` per step
    whatever the scale of the gradients — the direction-only scale update of EGDD
    (Amid et al. 2022; TF Lingvo ``egdd.py``). ``prev_grads`` may be any past-gradient
    summary, e.g. an average (see :class:`EGStepSize`'s ``beta``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    lo = -math.inf if nu_min is None else nu_min
    hi = math.inf if nu_max is None else nu_max
    if granularity == "coordinate":
        if normalize:
            out = [_exp_scale(nu, gamma * (torch.sign(gp) * torch.sign(g)).to(nu.dtype))
                   for nu, gp, g in zip(nus, prev_grads, grads, strict=True)]
        else:
            # the product of two huge gradients may overflow: saturate it (inf·γ with γ = 0 would be NaN)
            out = [_exp_scale(nu, gamma * _saturate(gp.to(nu.dtype) * g.to(nu.dtype)))
                   for nu, gp, g in zip(nus, prev_grads, grads, strict=True)]
    elif granularity == "tensor":
        if normalize:
            out = [_exp_scale(nu, (gamma * _cosine([gp], [g])).to(nu.dtype))
                   for nu, gp, g in zip(nus, prev_grads, grads, strict=True)]
        else:
            # float64 sums: ±1e60 terms would give inf − inf = NaN in float32
            out = [_exp_scale(nu, _saturate(gamma * torch.sum(gp.double() * g.double())).to(nu.dtype))
                   for nu, gp, g in zip(nus, prev_grads, grads, strict=True)]
    else:
        if len(nus) != 1:
            raise ValueError(f"granularity='global' takes one ν, got {len(nus)}")
        (nu,) = nus
        if normalize:
            arg = gamma * _cosine(list(prev_grads), list(grads)).to(nu.device)
        else:
            dot = sum((torch.sum(gp.double() * g.double()) for gp, g in zip(prev_grads, grads, strict=True)),
                      torch.zeros((), dtype=torch.float64, device=nu.device))
            arg = _saturate(gamma * dot)
        out = [_exp_scale(nu, arg.to(nu.dtype))]
    if nu_min is not None or nu_max is not None:
        out = [nu.clamp(lo, hi) for nu in out]
    return out


def eg_step_size_step(params: Sequence[Tensor], grads: Sequence[Tensor], nus: Sequence[Tensor], *,
                      lr: float) -> list[Tensor]:
    """``θ_{t+1} = θ_t − lr · ν_{t+1} ⊙ g_t`` (the EG note); a single ν (global) is shared by all tensors."""
    if len(nus) == 1 and len(params) != 1:
        nus = [nus[0]] * len(params)
    return [p - (lr * nu * g).to(p.dtype) for p, g, nu in zip(params, grads, nus, strict=True)]


class EGStepSize(SteepestOptimizer):
    """SGD with exponentiated-gradient step sizes (the EG note; Amid, Anil, Fifty, Warmuth 2022).

    ``ν_{t+1} = ν_t ⊙ exp(γ g_{t−1} ⊙ g_t)``, ``θ_{t+1} = θ_t − lr · ν_{t+1} ⊙ g_t``,
    ``ν_0 = 1``, ``g_{−1} = 0`` (the first step is plain SGD), hence
    ``ν_{t+1} = exp(γ Σ_{k=1}^{t} g_{k−1} ⊙ g_k)``: gradients that keep their sign
    raise a rate, alternating ones lower it (Su, kexue.fm/archives/8968; Amid et al.,
    *Step-size Adaptation Using Exponentiated Gradient Updates*, arXiv:2202.00145).
    The rule is derived for plain SGD; see the ``eg`` experiment for it on top of Adam.

    Three options change the rule; their defaults give the note's rule exactly:

    - ``nu0``: the initial rate ν_0. With ν_0 = 1 the first step is plain SGD at
      ``lr``, taken before ν has seen any gradient, so an lr set too large wrecks the
      model before the rule can react. ν_0 < 1 starts conservatively: an lr up to
      1/ν_0 times too large still gives a first step no larger than the right one.
    - ``beta``: the rate follows ``⟨ḡ_{t−1}, g_t⟩`` with ḡ the running average
      ``ḡ_t = β ḡ_{t−1} + (1 − β) g_t`` (ḡ_{−1} = 0) instead of the last gradient. If
      one rate ν had scaled all past steps, ``θ_t = θ_0 − lr ν Σ_k g_k``, then
      ``−∂L(θ_t)/∂ log ν ∝ ⟨Σ_k g_k, g_t⟩``: the average is that hypergradient over a
      horizon of about 1/(1 − β) steps, less noisy and less short-sighted than the
      one-step ⟨g_{t−1}, g_t⟩ (β = 0).
    - ``normalize``: the rate moves by ``exp(γ cos(ḡ_{t−1}, g_t))`` (per coordinate:
      ``exp(γ sign(ḡ_{t−1,i}) sign(g_{t,i}))``), as EGDD's scale does (TF Lingvo
      ``egdd.py``). ``log ν`` then changes by at most γ a step, whatever the size of
      the gradients: growing ν by a factor R takes at least ``log(R)/γ`` steps, and
      one blown-up gradient cannot move ν by orders of magnitude (with the inner
      product, ``γ⟨g_{t−1}, g_t⟩`` scales with ‖g‖², so it can).

    Learned rates: :meth:`nu_stats` (min / geometric mean / mean / max over all
    coordinates, weighted by size) and :meth:`nus`.

    Args:
        params: parameters or param groups (keys ``lr, gamma, granularity, nu_min, nu_max,
            nu0, beta, normalize``).
        lr: base step size η ≥ 0 (required).
        gamma: meta step size γ ≥ 0 of the rate update (required).
        granularity: ``"coordinate"`` (default; one ν per entry), ``"tensor"`` (one ν
            per tensor) or ``"global"`` (one ν per param group); the shared ones are
            updated with ``exp(γ ⟨g_{t−1}, g_t⟩)`` summed over their coordinates — the
            exact derivative of the loss with respect to that shared rate.
        nu_min, nu_max: optional bounds ν is clipped to (> 0; default off).
        nu0: initial rate ν_0 > 0, inside the bounds (default None: 1, moved into the bounds).
        beta: averaging β in [0, 1) of the past gradients the rate follows (default 0: g_{t−1}).
        normalize: follow the cosine instead of the inner product (default False).
        record_every: every N-th step appends ``(step, nu_stats())`` to
            ``nu_history`` (a plain list, not part of ``state_dict``); 0 = off.
        nonfinite: ``"raise"`` (default) or ``"skip"``: what a NaN/Inf gradient does.
    """

    _extra_keys = frozenset({"nu", "step"})

    def __init__(self, params: Iterable[Any], lr: float, gamma: float, granularity: str = "coordinate",
                 nu_min: float | None = None, nu_max: float | None = None, record_every: int = 0, *,
                 nu0: float | None = None, beta: float = 0.0, normalize: bool = False,
                 nonfinite: str = "raise") -> None:
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 0:
            raise ValueError(f"record_every must be an int >= 0 (0 = off), got {record_every!r}")
        self.record_every = record_every
        self.nu_history: list[tuple[int, list[dict[str, float]]]] = []
        super().__init__(params, dict(lr=lr, gamma=gamma, granularity=granularity, nu_min=nu_min, nu_max=nu_max,
                                      nu0=nu0, beta=beta, normalize=normalize), nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        check_number("lr", group["lr"])
        check_number("gamma", group["gamma"])
        check_choice("granularity", group["granularity"], GRANULARITIES)
        lo, hi = group["nu_min"], group["nu_max"]
        if lo is not None:
            check_number("nu_min", lo, low_open=True)
        if hi is not None:
            check_number("nu_max", hi, low_open=True)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"nu_min must be <= nu_max, got nu_min={lo}, nu_max={hi}")
        nu0 = group["nu0"]
        if nu0 is not None:
            v = check_number("nu0", nu0, low_open=True)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"nu0 must lie in [nu_min, nu_max], got nu0={v}, nu_min={lo}, nu_max={hi}")
        check_number("beta", group["beta"], high=1.0, high_open=True)
        check_flag("normalize", group["normalize"])
        if group["granularity"] == "global":
            group.setdefault("nu", _nu0(group))
        group.setdefault("step", 0)

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "prev_grad")
        if group["granularity"] == "coordinate":
            self._require(state, p, "nu")
        elif group["granularity"] == "tensor":
            self._require(state, p, "nu", like=False)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        st = self.state[p]
        if "prev_grad" not in st:
            st["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            nu0 = _nu0(group)
            slot = slot_dtype(p.dtype)  # exp(γ·small) must not round back to 1 in bf16/fp16
            if group["granularity"] == "coordinate":
                st["nu"] = torch.full_like(p, nu0, dtype=slot, memory_format=torch.preserve_format)
            elif group["granularity"] == "tensor":
                st["nu"] = torch.tensor(nu0, dtype=slot, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._evaluate(closure)
        for group, items in self._gradients():
            if not items:
                continue
            params = [p for p, _ in items]
            grads = [g for _, g in items]
            states = [self._init_state(group, p) for p in params]
            prev = [st["prev_grad"] for st in states]
            gran = group["granularity"]
            if gran == "global":
                nus = [torch.tensor(group["nu"], dtype=torch.float64, device=params[0].device)]
            else:
                nus = [st["nu"] for st in states]
            new_nus = eg_nu_update(nus, prev, grads, gamma=group["gamma"], granularity=gran,
                                   nu_min=group["nu_min"], nu_max=group["nu_max"], normalize=group["normalize"])
            new_params = eg_step_size_step(params, grads, new_nus, lr=lr_value(group["lr"]))
            beta = group["beta"]
            for p, st, g, newp in zip(params, states, grads, new_params):
                p.copy_(newp)
                if beta == 0:
                    st["prev_grad"].copy_(g)  # the note's rule: exactly g_{t−1}
                else:
                    st["prev_grad"].mul_(beta).add_(g.to(st["prev_grad"].dtype), alpha=1.0 - beta)
            if gran == "global":
                group["nu"] = float(new_nus[0])
            else:
                for st, nu in zip(states, new_nus):
                    _copy_into(st["nu"], nu)
            group["step"] += 1
        step = max(g["step"] for g in self.param_groups)
        if self.record_every and step % self.record_every == 0:
            self.nu_history.append((step, self.nu_stats()))
        return loss

    def nus(self) -> list[list[float | Tensor]]:
        """Per group, the current rate of each parameter (global: the shared float; not yet stepped: 1)."""
        out = []
        for group in self.param_groups:
            if group["granularity"] == "global":
                out.append([group["nu"]] * len(group["params"]))
            else:
                out.append([self.state[p]["nu"] if "nu" in self.state[p] else _nu0(group) for p in group["params"]])
        return out

    def nu_stats(self) -> list[dict[str, float]]:
        """Per group: ``min``, ``max``, ``mean`` and ``geo_mean`` of ν over all coordinates (size-weighted)."""
        out = []
        for group, nus in zip(self.param_groups, self.nus()):
            n_tot, s, slog, lo, hi = 0, 0.0, 0.0, math.inf, -math.inf
            for p, nu in zip(group["params"], nus):
                n = p.numel()
                if n == 0:
                    continue
                # FSDP2: a coordinate ν is sharded like its parameter; the statistics are over the whole tensor
                t = torch.as_tensor(full_value(nu) if isinstance(nu, Tensor) else nu, dtype=torch.float64).detach()
                w = n // t.numel()  # a scalar rate stands for all n coordinates
                n_tot += n
                s += w * float(t.sum())
                slog += w * float(torch.log(t.clamp(min=1e-300)).sum())
                lo, hi = min(lo, float(t.min())), max(hi, float(t.max()))
            if n_tot == 0:
                out.append({"min": 1.0, "max": 1.0, "mean": 1.0, "geo_mean": 1.0})
            else:
                out.append({"min": lo, "max": hi, "mean": s / n_tot, "geo_mean": math.exp(slog / n_tot)})
        return out


# --------------------------------------------------------------------------- EGDD
class EGDDState(NamedTuple):
    """What :func:`egdd_step` returns: the new parameter and slots."""

    param: Tensor
    momentum: Tensor
    gbar: Tensor
    gain: Tensor
    scale: Tensor


def egdd_step(param: Tensor, grad: Tensor, momentum_buf: Tensor, gbar: Tensor, gain: Tensor, scale: Tensor,
              step: int, *, lr: float, momentum: float, beta: float = 0.9, gain_lr: float = 0.01,
              scale_lr: float = 0.001, use_signs: bool = True, use_directions: bool = True,
              min_gain: float = 0.01, max_gain: float = 100.0, min_scale: float = 0.1,
              max_scale: float = 10.0) -> EGDDState:
    """One EGDD ("exponentiated gradient delta-delta") step, the rule of TF Lingvo ``egdd.py``.

    Slots: momentum m, gradient EMA ḡ (both start at 0), per-coordinate gain p
    and per-tensor scale s (both start at 1 in Lingvo; :class:`EGDD` can start s at ``initial_scale``);
    ``step`` counts this step from 1:

    - ``s ← clip(s · exp(η_s ⟨ĝ, m̂⟩), min_scale, max_scale)`` with ĝ = g/(‖g‖+1e-10),
      m̂ = m/(‖m‖+1e-10) (``use_directions``; else the raw ⟨g, m⟩);
    - ``p ← clip(p · exp(η_p sign(g) sign(ḡ)), min_gain, max_gain)`` (``use_signs``;
      else ``exp(η_p g ⊙ ḡ/(1 − β^{max(step−1, 1)}))``, bias-corrected ḡ);
    - ``m ← μ m + lr · p ⊙ g``, ``ḡ ← β ḡ + (1 − β) g``, ``θ ← θ − s · m``.

    EG updates of the gain and scale (Kivinen & Warmuth 1997) as in Amid, Anil,
    Fifty, Warmuth 2022; it reproduces the values of Lingvo's own unit test.
    """
    cd = slot_dtype(param.dtype)  # half-precision inputs: the small EG exponents are computed in float32
    param, grad, momentum_buf, gbar = param.to(cd), grad.to(cd), momentum_buf.to(cd), gbar.to(cd)
    # the scale's argument in float64: norms and products of huge gradients overflow float32
    g64, m64 = grad.double(), momentum_buf.double()
    if use_directions:
        s_arg = torch.sum(g64 * m64) / ((torch.linalg.vector_norm(g64) + 1e-10) * (torch.linalg.vector_norm(m64) + 1e-10))
    else:
        s_arg = torch.sum(g64 * m64)
    new_scale = (scale * torch.exp(_saturate(scale_lr * s_arg)).to(cd)).clamp(min_scale, max_scale)
    if use_signs:
        g_arg = torch.sign(grad) * torch.sign(gbar)
    else:
        g_arg = grad * gbar / (1.0 - beta ** max(step - 1, 1))
    new_gain = (gain * torch.exp(gain_lr * g_arg)).clamp(min_gain, max_gain)
    new_m = momentum * momentum_buf + lr * new_gain * grad
    new_gbar = beta * gbar + (1.0 - beta) * grad
    return EGDDState(param - new_scale * new_m, new_m, new_gbar, new_gain, new_scale)


class EGDD(SteepestOptimizer):
    """EGDD: momentum SGD with EG-adapted per-coordinate gains and a per-tensor scale.

    Port of TF Lingvo ``lingvo/core/egdd.py`` (Amid, Anil, Fifty, Warmuth 2022,
    *Step-size Adaptation Using Exponentiated Gradient Updates*); the rule is in
    :func:`egdd_step`: ``s ← clip(s·exp(η_s cos(g, m)))``, ``p ← clip(p·exp(η_p
    sign(g) sign(ḡ)))``, ``m ← μ m + lr p⊙g``, ``ḡ ← β ḡ + (1−β) g``, ``θ ← θ − s m``.
    Note the effective step of momentum SGD is ``lr/(1 − μ)``.

    Args:
        params: parameters or param groups.
        lr: base step size ≥ 0 (required).
        momentum: μ in [0, 1) (required).
        beta: β of the gradient EMA ḡ, in [0, 1) (default 0.9).
        gain_lr: η_p ≥ 0, meta step of the per-coordinate gains (default 0.01).
        scale_lr: η_s ≥ 0, meta step of the per-tensor scale (default 0.001).
        use_signs: gains follow sign(g)·sign(ḡ) (default True) rather than g⊙ḡ.
        use_directions: the scale follows cos(g, m) (default True) rather than ⟨g, m⟩.
        min_gain, max_gain: gain bounds, min_gain ≤ 1 ≤ max_gain (default 0.01, 100).
        min_scale, max_scale: scale bounds, min_scale ≤ initial_scale ≤ max_scale (default 0.1, 10).
        initial_scale: s_0, the scale's starting value (default 1, Lingvo's). s_0 < 1 makes the first
            steps conservative (an lr up to 1/s_0 times too large still starts no larger than the right
            one), and the scale then grows by at most e^{η_s} a step: from s_0 to a factor R above it
            takes at least ``log(R)/η_s`` steps.
        nonfinite: ``"raise"`` (default) or ``"skip"``: what a NaN/Inf gradient does.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float, beta: float = 0.9,
                 gain_lr: float = 0.01, scale_lr: float = 0.001, use_signs: bool = True,
                 use_directions: bool = True, min_gain: float = 0.01, max_gain: float = 100.0,
                 min_scale: float = 0.1, max_scale: float = 10.0, *, initial_scale: float = 1.0,
                 nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, beta=beta, gain_lr=gain_lr,
                                      scale_lr=scale_lr, use_signs=use_signs, use_directions=use_directions,
                                      min_gain=min_gain, max_gain=max_gain, min_scale=min_scale,
                                      max_scale=max_scale, initial_scale=initial_scale), nonfinite=nonfinite)

    _HYPER = ("lr", "momentum", "beta", "gain_lr", "scale_lr", "use_signs", "use_directions",
              "min_gain", "max_gain", "min_scale", "max_scale")

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        check_number("lr", group["lr"])
        check_number("momentum", group["momentum"], high=1.0, high_open=True)
        check_number("beta", group["beta"], high=1.0, high_open=True)
        check_number("gain_lr", group["gain_lr"])
        check_number("scale_lr", group["scale_lr"])
        check_flag("use_signs", group["use_signs"])
        check_flag("use_directions", group["use_directions"])
        s0 = check_number("initial_scale", group["initial_scale"], low_open=True)
        for lo, hi, start, what in (("min_gain", "max_gain", 1.0, "1"), ("min_scale", "max_scale", s0, "initial_scale")):
            a = check_number(lo, group[lo], low_open=True)
            b = check_number(hi, group[hi], low_open=True)
            if a > start or b < start:
                raise ValueError(f"need {lo} <= {what} <= {hi} (the slot starts at {what}), got {lo}={a}, "
                                 f"{hi}={b}" + ("" if what == "1" else f", initial_scale={start}"))

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "momentum_buffer", "gbar", "gain")
        self._require(state, p, "step", "scale", like=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._evaluate(closure)
        for group, items in self._gradients():
            hyper = {k: group[k] for k in self._HYPER}
            hyper["lr"] = lr_value(hyper["lr"])
            for p, g in items:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["step"] = 0
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["gbar"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    slot = slot_dtype(p.dtype)  # Lingvo keeps its learned scale in float32 whatever the variable
                    st["gain"] = torch.ones_like(p, dtype=slot, memory_format=torch.preserve_format)
                    st["scale"] = torch.full((), group["initial_scale"], dtype=slot, device=p.device)
                st["step"] += 1
                new = egdd_step(p, g, st["momentum_buffer"], st["gbar"], st["gain"], st["scale"], st["step"],
                                **hyper)
                p.copy_(new.param)
                st["momentum_buffer"].copy_(new.momentum)
                st["gbar"].copy_(new.gbar)
                st["gain"].copy_(new.gain)
                _copy_into(st["scale"], new.scale)
        return loss


# --------------------------------------------------------------------------- hypergradient SGD
def sgd_hd_step(params: Sequence[Tensor], grads: Sequence[Tensor], prev_grads: Sequence[Tensor], *,
                lr: float, hypergrad_lr: float) -> tuple[list[Tensor], float]:
    """SGD-HD (Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient Descent").

    ``α_t = α_{t−1} + β ⟨g_t, g_{t−1}⟩`` (summed over all tensors; −g_{t−1} is the
    previous update direction, so this is gradient descent on α), then
    ``θ ← θ − α_t g_t``. Returns the new params and α_t. α is additive and may
    become negative, as in the paper.
    """
    # FSDP2: the sum over a sharded tensor is a partial DTensor; full_value reduces it over the ranks
    dot = sum(float(full_value(torch.sum(gp.double() * g.double()))) for gp, g in zip(prev_grads, grads, strict=True))
    new_lr = lr + hypergrad_lr * dot
    return [p - new_lr * g for p, g in zip(params, grads, strict=True)], new_lr


class HypergradientSGD(SteepestOptimizer):
    """SGD-HD (Baydin et al. 2018): ``α ← α + β ⟨g_t, g_{t−1}⟩``, ``θ ← θ − α g_t``.

    One learning rate per param group, kept live in ``group["lr"]`` (so
    ``state_dict`` carries it). The additive cousin of
    ``EGStepSize(granularity="global")``, which multiplies by ``exp(γ⟨g_{t−1}, g_t⟩)``.

    Args:
        params: parameters or param groups (keys ``lr, hypergrad_lr``).
        lr: initial rate α ≥ 0 (the adapted one may cross 0, as in the paper).
        hypergrad_lr: β ≥ 0, the step of the rate update.
        nonfinite: ``"raise"`` (default) or ``"skip"``: what a NaN/Inf gradient does.
    """

    def __init__(self, params: Iterable[Any], lr: float, hypergrad_lr: float, *, nonfinite: str = "raise") -> None:
        super().__init__(params, dict(lr=lr, hypergrad_lr=hypergrad_lr), nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        check_number("hypergrad_lr", group["hypergrad_lr"])
        # the initial rate must be >= 0; the adapted one may cross 0 (as in the paper)
        check_number("lr", group["lr"], low=0.0 if initial else None)

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "prev_grad")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._evaluate(closure)
        for group, items in self._gradients():
            if not items:
                continue
            params = [p for p, _ in items]
            grads = [g for _, g in items]
            prev = []
            for p in params:
                st = self.state[p]
                if "prev_grad" not in st:
                    st["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                prev.append(st["prev_grad"])
            new_params, new_lr = sgd_hd_step(params, grads, prev, lr=lr_value(group["lr"]),
                                             hypergrad_lr=group["hypergrad_lr"])
            for p, g, newp in zip(params, grads, new_params):
                p.copy_(newp)
                self.state[p]["prev_grad"].copy_(g)
            group["lr"] = new_lr
        return loss
