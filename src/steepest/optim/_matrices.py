"""Parameters as matrices, and where their whole-matrix maps run.

Muon's orthogonalization (``msign``) and its spectral-ball projection need whole
(out, in·…) matrices, while the rest of an optimizer step is elementwise and runs
on whatever piece of a parameter a rank holds. :class:`Placement` is the one
place that decides where a whole-matrix map runs — locally, dealt out across DDP
ranks, or on FSDP2 shards — using the generic maps of :mod:`steepest.distributed`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import linalg
from .._validate import check_choice
from ..distributed import is_dtensor, map_replicated, map_whole_matrices, shard_strategy
from ..linalg import NSConfig, resolve_schedule

__all__ = ["DDP_STRATEGIES", "Placement", "matrix_shape", "orthogonalize", "orthogonalize_sharded",
           "project_spectral_ball"]

#: ``"local"``: every DDP rank maps every matrix; ``"partition"``: each maps its share, one all-gather shares them.
DDP_STRATEGIES = ("local", "partition")
_DDP_ALIASES = {"spread": "partition"}

MatrixMap = Callable[[list[Tensor]], list[Tensor]]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The (out, in) matrix a parameter is treated as: ``(shape[0], prod(shape[1:]))``.

    ``nn.Linear.weight`` is (out, in) already; a conv weight (out, in, kh, kw)
    becomes (out, in·kh·kw), as in Keller Jordan's Muon.
    """
    if len(shape) < 2:
        raise ValueError(f"a Muon parameter needs at least 2 dimensions, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


@dataclass(frozen=True)
class Placement:
    """Where a whole-matrix map runs: the one dispatcher for Muon's NS and spectral-ball maps.

    - DTensor matrices (FSDP2, rows sharded): :func:`steepest.distributed.map_whole_matrices`
      with ``shard_strategy`` (``"all_to_all"``: each matrix to one owner rank, two
      all-to-alls; ``"all_gather"``: every rank gathers and maps every matrix);
    - plain matrices with ``ddp_strategy="partition"`` (DDP: equal values on every
      rank of ``process_group``): :func:`steepest.distributed.map_replicated`, each
      rank maps its share and one all-gather shares the results;
    - otherwise locally.
    """

    shard_strategy: str = "all_to_all"
    ddp_strategy: str = "local"
    process_group: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_strategy", shard_strategy(self.shard_strategy))
        ddp = _DDP_ALIASES.get(self.ddp_strategy, self.ddp_strategy) if isinstance(self.ddp_strategy, str) \
            else self.ddp_strategy
        object.__setattr__(self, "ddp_strategy", check_choice("ddp_strategy", ddp, DDP_STRATEGIES))

    def map(self, matrices: Sequence[Tensor], fn: MatrixMap) -> list[Tensor]:
        """``fn`` of every matrix (list in, same-shaped list out), run where this placement says."""
        mats = list(matrices)
        if not mats:
            return []
        if any(is_dtensor(m) for m in mats):
            return map_whole_matrices(mats, fn, strategy=self.shard_strategy)
        if self.ddp_strategy == "partition":
            return map_replicated(mats, fn, group=self.process_group)
        return fn(mats)


LOCAL = Placement()

# Same-shaped matrices are stacked for one batched NS, except on CPU above this many
# entries: there bmm ran about 5% slower than a loop of GEMMs (512×512 and 512×2048,
# 1 and 2 threads), while small matrices gain 2.4× (64×64) from batching.
_CPU_BATCH_MAX = 1 << 17


def _orthogonalize_local(matrices: list[Tensor], ns: NSConfig) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(matrices)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        if m.ndim != 2:
            raise ValueError(f"orthogonalize takes 2-D matrices, got shape {tuple(m.shape)}; flatten with matrix_shape")
        buckets[(tuple(m.shape), m.dtype, m.device)].append(i)
    for (shape, _, device), idx in buckets.items():
        if device.type == "cpu" and shape[0] * shape[1] > _CPU_BATCH_MAX and len(idx) > 1:
            groups = [[i] for i in idx]  # large CPU matrices: a loop of GEMMs beats bmm (see _CPU_BATCH_MAX)
        else:
            groups = [idx]
        for grp in groups:
            X = torch.stack([matrices[i] for i in grp]) if len(grp) > 1 else matrices[grp[0]].unsqueeze(0)
            O = ns.msign(X)
            for j, i in enumerate(grp):
                out[i] = O[j]
    return out  # type: ignore[return-value]


def orthogonalize(
    matrices: Sequence[Tensor],
    ns: NSConfig | None = None,
    *,
    schedule: Any = "polar_express",
    steps: int | None = None,
    ns_dtype: torch.dtype | None = None,
    placement: Placement = LOCAL,
) -> list[Tensor]:
    """``msign`` of each matrix (:func:`steepest.linalg.msign`), batching same-shaped ones.

    ``ns`` is an :class:`steepest.linalg.NSConfig` (from
    :func:`steepest.linalg.resolve_schedule`); without it the keyword settings
    build one (``ns_dtype`` is its ``dtype``). Matrices of equal shape, dtype and
    device are stacked into one (k, m, n) batch (on CPU only up to 2¹⁷ entries per
    matrix; larger ones go one by one, which is faster there). ``ns_dtype=None``
    computes in the matrices' own dtype (float32 for half inputs). The direction
    does not depend on the matrix's scale down to the dtype's smallest values;
    only an exactly zero matrix gets a zero direction (``msign(0) = 0``).
    ``placement`` says where the work runs (:class:`Placement`). Results are in the
    inputs' dtype.
    """
    if ns is None:
        ns = resolve_schedule(schedule, steps=steps, dtype=ns_dtype)
    return placement.map(matrices, lambda mats: _orthogonalize_local(mats, ns))


def orthogonalize_sharded(matrices: Sequence[Tensor], *, strategy: str = "all_to_all", **settings: Any) -> list[Tensor]:
    """:func:`orthogonalize` of row-sharded (FSDP2) matrices with the given ``shard_strategy``."""
    return orthogonalize(matrices, placement=Placement(shard_strategy=strategy), **settings)


def _clip_local(bound: float) -> MatrixMap:
    """The spectral-ball projection as a whole-matrix map (copies in, projected copies out), same shapes batched."""

    def clip(ws: list[Tensor]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(ws)
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, w in enumerate(ws):
            buckets[(tuple(w.shape), w.dtype, w.device)].append(i)
        for idx in buckets.values():
            C = linalg.mclip(torch.stack([ws[i] for i in idx]), bound)
            for j, i in enumerate(idx):
                out[i] = C[j]
        return out  # type: ignore[return-value]

    return clip


def project_spectral_ball(params: Sequence[Tensor], bound: float, *, placement: Placement = LOCAL) -> None:
    """``W ← c·mclip(W/c)`` in place for each parameter viewed as its (out, in·…) matrix.

    Singular values above ``c = bound`` are clipped to c (:func:`steepest.linalg.mclip`,
    accurate schedule); the matrices are mapped where ``placement`` says.
    """
    if not params:
        return
    mats = [p.reshape(matrix_shape(p.shape)) for p in params]
    for p, new in zip(params, placement.map(mats, _clip_local(float(bound)))):
        p.copy_(new.view(p.shape))
