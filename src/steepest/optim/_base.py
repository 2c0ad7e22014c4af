"""The one base of every optimizer in :mod:`steepest.optim`: checks, the non-finite policy, state loading.

Each optimizer is a thin ``torch.optim.Optimizer`` over its functional core. What
they share lives here, once:

- **param groups** are checked when added (unknown keys, bad values: a
  ValueError/TypeError naming the key; a rejected group is not kept) and again at
  every step (a value changed by hand or by a scheduler is caught before anything
  moves);
- **gradients** must be dense and real; the **non-finite policy** is one parameter,
  ``nonfinite``: ``"skip"`` leaves a parameter whose gradient holds NaN/Inf exactly
  as it was (value and state), counts it in ``state[p]["nonfinite_skips"]``
  (total: :attr:`skipped_steps`) and warns with :class:`NonFiniteGradientWarning`;
  ``"raise"`` raises :class:`NonFiniteGradientError` before anything is modified.
  With FSDP2 (DTensor gradients) the decision is taken once for all ranks;
- **load_state_dict** checks the loaded groups and per-parameter state against
  what this optimizer keeps, so another optimizer's state, another parameter
  layout or a corrupt state is a clear error at load time — and the optimizer is
  left as it was — instead of a KeyError at the next step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validate import check_choice, check_grad, param_name
from ..distributed import finite_mask

NONFINITE_POLICIES = ("skip", "raise")
#: keys torch.optim and its LR schedulers may keep in any param group
_TORCH_KEYS = frozenset({"params", "initial_lr", "param_names"})

GroupItems = list[tuple[Tensor, Tensor]]


class NonFiniteGradientWarning(UserWarning):
    """A parameter's step was skipped because its gradient held NaN or Inf."""


class NonFiniteGradientError(ValueError):
    """Raised (with ``nonfinite="raise"``) when a gradient holds NaN or Inf; nothing was modified."""


class SteepestOptimizer(torch.optim.Optimizer):
    """Shared machinery of the steepest optimizers (see the module docstring).

    A subclass passes its ``defaults`` and ``nonfinite`` policy to ``__init__`` and
    implements :meth:`_check_group` (raise on a bad hyperparameter) and
    :meth:`_check_state` (raise when a parameter's loaded state is not one this
    optimizer wrote); its ``step`` gets the gradients allowed to step from
    :meth:`_gradients` and calls its functional core.
    """

    #: group keys a subclass keeps besides its defaults (e.g. a learned rate)
    _extra_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "skip") -> None:
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (list or tuple), not a set: the order decides "
                            "how optimizer state is matched on load_state_dict")
        self._nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        super().__init__(params, defaults)

    @property
    def _name(self) -> str:
        return type(self).__name__

    # -- groups ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its keys and values; a rejected group is not kept."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if isinstance(param_group.get("params"), (set, frozenset)):
            raise TypeError("params must be an ordered collection (list or tuple), not a set: "
                            "the order decides how optimizer state is matched on load_state_dict")
        allowed = self._allowed_keys(param_group)
        unknown = set(param_group) - allowed - _TORCH_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in a {self._group_kind(param_group)} group; "
                             f"allowed: {sorted(allowed)}")
        super().add_param_group(param_group)  # fills in the defaults
        try:
            self._check_group(self.param_groups[-1], initial=True)
        except (TypeError, ValueError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _allowed_keys(self, group: dict[str, Any]) -> set[str]:
        return set(self.defaults) | set(self._extra_keys)

    def _group_kind(self, group: dict[str, Any]) -> str:
        return self._name

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _require(state: dict[str, Any], p: Tensor, *keys: str, like: bool = True) -> None:
        """``state`` holds ``keys``; with ``like``, as tensors of ``p``'s shape."""
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"its state has keys {sorted(state)}, but this optimizer keeps {sorted(keys)} "
                             f"(missing {missing})")
        for k in keys:
            v = state[k]
            if like and (not isinstance(v, Tensor) or tuple(v.shape) != tuple(p.shape)):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"state[{k!r}] has shape {shape}, the parameter {tuple(p.shape)}")

    # -- state ---------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then every group and parameter state checked; on error nothing changes.

        Keys this optimizer has and the saved groups lack (e.g. a state saved by
        ``torch.optim.Muon`` loaded into :class:`steepest.optim.Muon`) take the
        current values.
        """
        old_groups = self.param_groups
        old_state = self.state
        before = [{k: v for k, v in g.items() if k != "params"} for g in old_groups]
        super().load_state_dict(state_dict)
        self._restore_slot_dtypes(state_dict)
        try:
            for gi, (group, prev) in enumerate(zip(self.param_groups, before)):
                for k, v in prev.items():
                    group.setdefault(k, v)
                try:
                    self._check_group(group, initial=False)
                except KeyError as e:
                    raise ValueError(f"param group {gi} lacks the key {e}") from None
                for i, p in enumerate(group["params"]):
                    st = self.state.get(p)
                    if st:
                        try:
                            self._check_state(group, p, st)
                        except (KeyError, TypeError, ValueError) as e:
                            raise ValueError(f"{param_name(group, gi, i, p)}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            self.param_groups, self.state = old_groups, old_state
            raise ValueError(
                f"{self._name}.load_state_dict: {e}. Nothing was loaded; was this state_dict saved by another "
                "optimizer, or for other parameters?") from None

    def _restore_slot_dtypes(self, state_dict: dict[str, Any]) -> None:
        """Undo torch's cast of every floating state tensor to its parameter's dtype.

        State of half-precision parameters is float32 (:func:`slot_dtype`); torch's
        ``load_state_dict`` would round it to bfloat16/float16 and a resumed run would
        no longer match an uninterrupted one bit for bit.
        """
        saved = state_dict.get("state", {})
        ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in saved.get(pid, {}).items():
                cur = self.state[p].get(k)
                if isinstance(v, Tensor) and isinstance(cur, Tensor) and v.is_floating_point() and v.dtype != cur.dtype:
                    self.state[p][k] = v.to(device=cur.device, copy=True)

    @property
    def skipped_steps(self) -> int:
        """How many parameter steps were skipped because of non-finite gradients (all parameters)."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    # -- step --------------------------------------------------------------------------
    @staticmethod
    def _evaluate(closure: Callable[[], Any] | None) -> Any:
        """The closure's loss, evaluated with gradients on (``step`` itself runs under no_grad)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _gradients(self) -> list[tuple[dict[str, Any], GroupItems]]:
        """Per group, the ``(param, grad)`` pairs that step now; everything is checked before anything moves.

        Groups are re-checked, gradients must be dense and real, and the
        non-finite policy is applied (one decision for all ranks under FSDP2).
        """
        for group in self.param_groups:
            self._check_group(group, initial=False)
        entries = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    entries.append((gi, i, p, check_grad(self._name, param_name(group, gi, i, p), p)))
        ok = finite_mask([e[3] for e in entries])
        if not all(ok):
            bad = [param_name(self.param_groups[gi], gi, i, p) for (gi, i, p, _), good in zip(entries, ok)
                   if not good]
            what = f"{self._name}: non-finite gradient (NaN or Inf) in {len(bad)} parameter(s): {', '.join(bad)}"
            if self._nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"{what}; nothing was updated. Check the loss or clip gradients, or pass nonfinite='skip' to "
                    "skip such steps")
            warnings.warn(f"{what}; their step was skipped and their state left unchanged (counted in "
                          "state[p]['nonfinite_skips'])", NonFiniteGradientWarning, stacklevel=3)
        out: list[tuple[dict[str, Any], GroupItems]] = [(g, []) for g in self.param_groups]
        for (gi, _, p, g), good in zip(entries, ok):
            if good:
                out[gi][1].append((p, g))
            else:
                st = self.state[p]
                st["nonfinite_skips"] = int(st.get("nonfinite_skips", 0)) + 1
        return out


def slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of optimizer state for parameters of ``dtype``: float32 at least.

    Half-precision slots lose what optimizers accumulate (momentum of small
    gradients underflows in float16; a multiplier exp(0.001) rounds back to 1 in
    bfloat16), so state is kept in float32 and the step rounded once into the
    parameter, as mixed-precision training keeps master values.
    """
    return torch.promote_types(dtype, torch.float32)


def lr_value(x: Any) -> float:
    """A group's ``lr`` as a float (LR schedulers may keep a 0-d tensor)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def ordered(params: Iterable[Any]) -> list[Any]:
    """``params`` as a list (a single tensor as a one-element list)."""
    return [params] if isinstance(params, Tensor) else list(params)
