"""steepest: optimization geometry for deep learning.

Modules (imported on first use, so ``import steepest`` stays light):
:mod:`steepest.linalg` (msign and matrix functions of singular values),
:mod:`steepest.optim` (Muon, SignSGD, exponentiated gradient),
:mod:`steepest.losses` (InfoNCE, FlatNCE), :mod:`steepest.penalties` (input and
parameter gradient penalties), :mod:`steepest.isotropy` (whitening, alignment),
:mod:`steepest.distributed` (whole-matrix maps over DDP and FSDP2) and
:mod:`steepest.testing` (a local process launcher for tests and benchmarks).
The notes the library implements are listed in ``docs/notes.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("linalg", "optim", "losses", "penalties", "isotropy", "distributed", "testing")
__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
