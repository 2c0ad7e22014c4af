"""Argument checks for the whole library: one home, one wording for one mistake.

Every check names the argument and says how to fix it, so that bad input is a
clear error at the call instead of a NaN several layers later.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x: Any, name: str, *, min_ndim: int = 0, finite: bool = True) -> Tensor:
    """``x`` is a real floating tensor with at least ``min_ndim`` dimensions and, if ``finite``, no NaN/Inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(
            f"{name} has dtype {x.dtype}; use a real floating tensor (bfloat16, float16, float32 or float64), "
            f"e.g. {name}.float()"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions" + (" (..., rows, cols)" if min_ndim == 2 else "")
            + f"; got shape {tuple(x.shape)}"
        )
    if finite:
        check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> Tensor:
    """``x`` has no NaN or Inf entry; the error counts them."""
    if x.numel() == 0 or no_data(x):
        return x  # nothing to read
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf entries; clean the input or find where they come from")
    return x


def check_number(name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the interval (``low`` ≥ 0 by default), or a ValueError/TypeError naming ``name``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_int(name: str, value: Any, *, low: int | None = 0, high: int | None = None) -> int:
    """``value`` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be an int in {rng}, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` is one of ``choices``."""
    if not isinstance(value, Hashable) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def param_name(group: dict[str, Any], gi: int, i: int, p: Tensor) -> str:
    """How an error names parameter ``i`` of group ``gi``: its name when the group has ``param_names``."""
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"{names[i]!r}"
    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"


def check_grad(owner: str, name: str, p: Tensor) -> Tensor:
    """The dense real gradient of a floating-point parameter; a TypeError names what is unsupported."""
    g = p.grad
    if g is None:  # pragma: no cover - callers filter
        raise ValueError(f"{owner}: {name} has no gradient")
    if g.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients ({name}); use dense gradients, "
                        "e.g. nn.Embedding(sparse=False)")
    if torch.is_complex(p):
        raise TypeError(f"{owner} does not support complex parameters ({name}); optimize torch.view_as_real(p) "
                        "instead")
    if not p.is_floating_point():
        raise TypeError(f"{owner} needs floating-point parameters; {name} has dtype {p.dtype}")
    return g


def no_data(x: Tensor) -> bool:
    """True where a value cannot be read for a Python decision: inside torch.compile, vmap/grad, or on meta."""
    return (torch.compiler.is_compiling() or x.device.type == "meta"
            or torch._C._functorch.is_functorch_wrapped_tensor(x))
