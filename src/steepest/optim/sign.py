"""SignSGD: steepest descent under the ∞-norm.

For the norm ``‖ΔW‖_∞ = max |ΔW_ij|`` the steepest direction of a gradient G is
``argmax_{‖D‖_∞ ≤ 1} ⟨G, D⟩ = sign(G)``, so ``ΔW = −η·sign(G)``. With momentum this
is Signum (Bernstein, Wang, Azizzadenesheli, Anandkumar 2018, "signSGD:
Compressed Optimisation for Non-Convex Problems").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validate import check_number
from ._base import SteepestOptimizer, lr_value, slot_dtype

__all__ = ["SignSGD", "sign_step"]


def sign_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> None:
    """One SignSGD / Signum step, in place.

    ``W ← W(1 − ηλ)`` (decoupled decay); ``m ← μm + (1−μ)g`` (when μ > 0);
    ``W ← W − η·sign(m)`` (``sign(g)`` without momentum; ``sign(0) = 0``). The EMA
    and the heavy-ball sum ``μm + g`` differ by the factor ``1−μ`` only, so the sign
    is the same.
    """
    if not params:
        return
    params, grads = list(params), list(grads)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if momentum:
        if momentum_buffers is None:
            raise ValueError("momentum > 0 needs momentum_buffers (zeros like the parameters at the start)")
        bufs = list(momentum_buffers)
        torch._foreach_lerp_(bufs, [g.to(b.dtype) for g, b in zip(grads, bufs)], 1.0 - momentum)
        direction = [d.to(p.dtype) for d, p in zip(torch._foreach_sign(bufs), params)]  # ±1, 0: exact
    else:
        direction = torch._foreach_sign(grads)
    torch._foreach_add_(params, direction, alpha=-lr)


class SignSGD(SteepestOptimizer):
    """SignSGD / Signum: ``ΔW = −lr·sign(m)``, the ∞-norm steepest descent.

    ``m = g`` when ``momentum=0``, else the EMA ``m ← μm + (1−μ)g`` (Signum,
    Bernstein et al. 2018, *signSGD: Compressed Optimisation for Non-Convex
    Problems*); ``weight_decay`` is decoupled: ``W ← W(1 − lr·λ)``. Each coordinate
    moves by exactly ``lr`` (or 0 where m is 0), so ``lr`` is the per-step ∞-norm of
    the update — much smaller values than SGD's are typical (1e-4 … 1e-2).

    Args:
        params: parameters or param groups (keys ``lr, momentum, weight_decay``).
        lr: step size η ≥ 0 (required).
        momentum: μ in [0, 1) (default 0: plain SignSGD).
        weight_decay: decoupled decay λ ≥ 0 (default 0).
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a NaN/Inf gradient does
            (:class:`steepest.optim.SteepestOptimizer`).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nonfinite: str = "skip",
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        _check(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        _check(group)

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "momentum_buffer")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        for group, items in self._gradients():
            if not items:
                continue
            mom = float(group["momentum"])
            bufs = []
            if mom:
                for p, _ in items:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p, dtype=slot_dtype(p.dtype),
                                                                 memory_format=torch.preserve_format)
                    bufs.append(st["momentum_buffer"])
            sign_step([p for p, _ in items], [g for _, g in items], bufs if mom else None, lr=lr_value(group["lr"]),
                      momentum=mom, weight_decay=float(group["weight_decay"]))
        return loss


def _check(g: dict[str, Any]) -> None:
    check_number("lr", g["lr"])
    check_number("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("weight_decay", g["weight_decay"])
