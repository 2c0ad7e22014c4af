"""Input checks shared by the functional modules: one wording for one mistake.

Every check names the argument and says how to fix it, so that bad input is a
clear error at the call instead of a NaN several layers later.
"""

from __future__ import annotations

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
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf entries; clean the input or find where they come from")
    return x
