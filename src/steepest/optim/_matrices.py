"""Parameters as matrices, and where their whole-matrix maps run.

Muon's orthogonalization (``msign``) and its spectral-ball projection need whole
(out, in·…) matrices, while the rest of an optimizer step is elementwise and runs
on whatever piece of a parameter a rank holds. :class:`Placement` is the one
place that decides where a whole-matrix map runs — locally, dealt out across DDP
ranks, or on FSDP2 shards — using the generic maps of :mod:`steepest.distributed`.

A :class:`MatrixView` says which matrices a parameter is: by default the one
(out, in·…) matrix of :func:`matrix_shape`; optionally a stack of matrices over
the leading dimensions (``batched``), or row blocks (``split``, ``heads``) such
as the Q, K and V parts of a fused projection. :meth:`Placement.map_blocks` maps
every block of every parameter, batching blocks of one shape together.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import linalg
from .._validate import check_choice, check_flag, check_int
from ..distributed import is_dtensor, local_part, map_replicated, map_whole_matrices, shard_strategy
from ..linalg import NSConfig, resolve_schedule

__all__ = ["DDP_STRATEGIES", "MatrixView", "Placement", "matrix_shape", "orthogonalize", "orthogonalize_blocks",
           "orthogonalize_sharded", "project_spectral_ball"]

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
class MatrixView:
    """Which matrices a parameter is, for Muon's whole-matrix maps (``msign``, the spectral-ball projection).

    A tensor of shape S is read as R rows of N entries, cut into consecutive row
    blocks; each block is one (m, N) matrix, orthogonalized and lr-scaled on its own:

    - default: the one (out, in·…) matrix of :func:`matrix_shape` (R = S[0],
      N = S[1]·…·S[-1]), as for conv weights in Keller Jordan's Muon;
    - ``batched=True`` (ndim ≥ 3): a stack of S[-2] × S[-1] matrices over the
      leading dimensions (R = S[0]·…·S[-2], N = S[-1]), e.g. the experts of a
      mixture-of-experts layer stored as one (E, out, in) tensor;
    - ``split=(d_1, …, d_k)``: each matrix's rows cut into blocks of d_1, …, d_k
      rows (they must add up to its rows), e.g. the Q, K and V parts of a fused
      (3d, d) projection;
    - ``heads=h``: each matrix's rows (or each split block's) cut into h equal blocks.
    """

    batched: bool = False
    split: tuple[int, ...] | None = None
    heads: int | None = None

    def __post_init__(self) -> None:
        check_flag("batched", self.batched)
        if self.split is not None:
            sp = self.split
            if isinstance(sp, (str, bytes)) or not isinstance(sp, Sequence) or len(sp) == 0:
                raise ValueError(f"split must be None or a non-empty sequence of positive row counts, got {sp!r}")
            object.__setattr__(self, "split", tuple(check_int("split entry", d, low=1) for d in sp))
        if self.heads is not None:
            check_int("heads", self.heads, low=1)

    def row_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one value per row: ``S[:-1]`` when batched (ndim ≥ 3), else ``(S[0],)``."""
        shape = tuple(int(d) for d in shape)
        matrix_shape(shape)  # at least 2-D
        return shape[:-1] if self.batched and len(shape) >= 3 else shape[:1]

    def layout(self, shape: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
        """``(R, N, sizes)``: the tensor as R rows of N entries cut into consecutive row blocks of ``sizes`` rows."""
        return _layout(self, tuple(shape))

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        shape = tuple(int(d) for d in shape)
        rows = self.row_shape(shape)
        if len(rows) > 1:
            M, N, count = shape[-2], shape[-1], math.prod(shape[:-2])
        else:
            (M, N), count = matrix_shape(shape), 1
        return count * M, N, self._cut(M) * count

    def _cut(self, M: int) -> tuple[int, ...]:
        blocks: tuple[int, ...] = (M,)
        if self.split is not None:
            if sum(self.split) != M:
                raise ValueError(f"split={self.split} adds up to {sum(self.split)} rows, but the matrix has {M} rows")
            blocks = self.split
        h = self.heads
        if h is not None and h > 1:
            if any(b % h for b in blocks):
                what = f"the split blocks {blocks}" if self.split is not None else f"the {M} rows"
                raise ValueError(f"heads={h} does not divide {what} into equal blocks")
            blocks = tuple(b // h for b in blocks for _ in range(h))
        return blocks

    def is_whole(self, shape: Sequence[int]) -> bool:
        """True when the view is the one (out, in·…) matrix of :func:`matrix_shape` (the default)."""
        return _is_whole(self, tuple(shape))

    def block_shapes(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """The (m, N) shape of every block, in order."""
        _, N, sizes = self.layout(shape)
        return [(m, N) for m in sizes]

    def blocks(self, x: Tensor) -> list[Tensor]:
        """The blocks of a plain tensor, as (m, N) views of its rows where its layout allows."""
        R, N, sizes = self.layout(x.shape)
        return list(x.reshape(R, N).split(sizes)) if sizes else []

    def join(self, blocks: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
        """The inverse of :meth:`blocks`: one new tensor of ``shape`` from its blocks (or same-shaped results)."""
        R, N, sizes = self.layout(shape)
        if len(blocks) != len(sizes):
            raise ValueError(f"{len(blocks)} blocks given, the view of shape {tuple(shape)} has {len(sizes)}")
        if not sizes:
            raise ValueError(f"the view of shape {tuple(shape)} has no blocks to join")
        return torch.cat([b.reshape(m, N) for b, m in zip(blocks, sizes)]).view(tuple(shape))


WHOLE = MatrixView()


# Views and shapes repeat every step: their layouts are computed once (errors are not cached).
@functools.lru_cache(maxsize=4096)
def _layout(view: MatrixView, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    return view._layout(shape)


@functools.lru_cache(maxsize=4096)
def _is_whole(view: MatrixView, shape: tuple[int, ...]) -> bool:
    return len(view.row_shape(shape)) == 1 and len(_layout(view, shape)[2]) == 1


def as_views(views: MatrixView | Sequence[MatrixView] | None, n: int) -> list[MatrixView]:
    """One :class:`MatrixView` per tensor: ``None`` the default view, one view for all, or a list of n."""
    if views is None:
        return [WHOLE] * n
    if isinstance(views, MatrixView):
        return [views] * n
    vs = list(views)
    if len(vs) != n or not all(isinstance(v, MatrixView) for v in vs):
        raise ValueError(f"views must be None, a MatrixView or {n} MatrixViews (one per tensor), got {views!r}")
    return vs


def _row_ranges(x: Tensor, rows: int) -> tuple[list[tuple[int, int]], int] | None:
    """Each rank's [a, b) range of a DTensor's ``rows`` rows, and this rank's index; None if every rank holds all."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"only 1-D device meshes are supported (FSDP2's default), got a {mesh.ndim}-D mesh")
    (pl,) = x.placements
    if isinstance(pl, Replicate) or mesh.size() == 1:
        return None
    if not (isinstance(pl, Shard) and pl.dim == 0):
        raise NotImplementedError(
            f"parameters must be sharded on dim 0 (Shard(0), FSDP2's default) or replicated, got {pl}; pass "
            "fully_shard a shard_placement_fn that returns Shard(0)")
    d0, W = int(x.shape[0]), mesh.size()
    per = rows // d0 if d0 else 0
    ranges = []
    for q in range(W):
        n, off = Shard.local_shard_size_and_offset(d0, W, q)
        ranges.append((int(off) * per, (int(off) + int(n)) * per))
    return ranges, mesh.get_local_rank()


def dim0_range(x: Tensor) -> tuple[int, int]:
    """The [a, b) range of ``x``'s first dimension this rank holds (all of it for plain or replicated tensors)."""
    n = int(x.shape[0])
    if not is_dtensor(x):
        return 0, n
    found = _row_ranges(x, n)
    if found is None:
        return 0, n
    ranges, me = found
    return ranges[me]


def local_rows(x: Tensor, view: MatrixView = WHOLE) -> tuple[Tensor, int, int]:
    """This rank's rows of ``x`` read through ``view``: ``(rows (r, N), a, b)``, global rows [a, b).

    A plain tensor (or a replicated DTensor) gives all R rows; a DTensor sharded on
    dim 0 (FSDP2) gives its own contiguous range of them.
    """
    R, N, _ = view.layout(x.shape)
    if not is_dtensor(x):
        return x.reshape(R, N), 0, R
    loc = x.to_local()
    found = _row_ranges(x, R)
    if found is None:
        return loc.reshape(R, N), 0, R
    ranges, me = found
    a, b = ranges[me]
    return loc.reshape(b - a, N), a, b


def from_local_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`local_rows`: rows of ``like``'s local part as a tensor (DTensor) shaped like ``like``."""
    if not is_dtensor(like):
        return rows.reshape(like.shape)
    from torch.distributed.tensor import DTensor

    loc = rows.reshape(like.to_local().shape)
    return DTensor.from_local(loc, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def all_rows(values: Tensor, like: Tensor, view: MatrixView = WHOLE) -> Tensor:
    """A per-row vector of this rank's rows of ``like`` (from :func:`local_rows`) as the vector of all R rows.

    For a sharded DTensor this is one all-gather (every rank must call it); otherwise ``values`` itself.
    """
    R, _, _ = view.layout(like.shape)
    if not is_dtensor(like) or _row_ranges(like, R) is None:
        return values.reshape(R)
    from torch.distributed.tensor import DTensor

    shape = view.row_shape(like.shape)
    loc = values.reshape((values.numel() // max(1, math.prod(shape[1:])), *shape[1:]))
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(loc, like.device_mesh, like.placements, shape=torch.Size(shape),
                              stride=stride).full_tensor().reshape(R)


def zeros_rows(like: Tensor, view: MatrixView = WHOLE, dtype: torch.dtype | None = None) -> Tensor:
    """Zeros of ``view.row_shape(like.shape)`` — one value per row — sharded like ``like``'s rows for DTensors."""
    shape = view.row_shape(like.shape)
    dtype = like.dtype if dtype is None else dtype
    if not is_dtensor(like):
        return torch.zeros(shape, dtype=dtype, device=like.device)
    from torch.distributed.tensor import DTensor

    loc = like.to_local()
    local_shape = loc.shape[:len(shape)]
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(torch.zeros(local_shape, dtype=dtype, device=loc.device), like.device_mesh,
                              like.placements, shape=torch.Size(shape), stride=stride)


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

    def map_blocks(self, tensors: Sequence[Tensor], views: MatrixView | Sequence[MatrixView] | None,
                   fn: MatrixMap) -> list[Tensor]:
        """``fn`` of every block of every tensor (cut by its :class:`MatrixView`), joined back into each tensor's shape.

        Plain tensors: their blocks (views of their rows) go through :meth:`map`
        together, so blocks of one shape form one batch. FSDP2 DTensors (sharded on
        dim 0): a rank whose rows are whole blocks (a ``batched`` stack sharded on
        its leading dimension, or shard boundaries that fall between blocks) maps its
        own blocks with no communication; a tensor that is one (out, in·…) matrix
        goes to :func:`steepest.distributed.map_whole_matrices`; otherwise the
        tensor is gathered whole on every rank (``full_tensor()``) — row blocks of a
        row-sharded matrix are not row-sharded DTensors of their own — its blocks are
        dealt out over the mesh's ranks (``shard_strategy="all_to_all"``) or mapped
        by every rank (``"all_gather"``), and each rank keeps its own rows. Empty
        blocks are not mapped. Results are DTensors with the inputs' placements.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        xs = list(tensors)
        vs = as_views(views, len(xs))
        if all(v == WHOLE for v in vs):  # the default: one (out, in·…) matrix per tensor, as map() takes them
            full = [i for i, x in enumerate(xs) if x.numel()]
            res = self.map([xs[i].reshape(matrix_shape(xs[i].shape)) for i in full], fn)
            out = list(xs)  # empty tensors: nothing to map
            for i, o in zip(full, res):
                out[i] = o.view(xs[i].shape)
            return out
        shared: list[Tensor] = []
        own: list[Tensor] = []
        gathered: dict[Any, list[Tensor]] = {}
        plans: list[tuple[str, list[tuple[Any, int] | Tensor], Any]] = []

        def put(bucket: list[Tensor], key: Any, mats: Sequence[Tensor]) -> list[tuple[Any, int] | Tensor]:
            slots: list[tuple[Any, int] | Tensor] = []
            for m in mats:
                if m.numel() == 0:
                    slots.append(m)  # nothing to map
                else:
                    slots.append((key, len(bucket)))
                    bucket.append(m)
            return slots

        for x, v in zip(xs, vs):
            R, N, sizes = v.layout(x.shape)
            if not is_dtensor(x):
                mats = [x.reshape(R, N)] if v.is_whole(x.shape) else v.blocks(x)
                plans.append(("plain", put(shared, "shared", mats), None))
                continue
            found = _row_ranges(x, R)
            cum = list(itertools.accumulate(sizes, initial=0))
            if found is None or all(a in cum and b in cum for a, b in found[0]):  # this rank's rows are whole blocks
                rows, a, b = local_rows(x, v)
                lo, hi = cum.index(a), cum.index(b)
                mats = list(rows.split(list(sizes[lo:hi]))) if hi > lo else []
                plans.append(("local", put(own, "own", mats), None))
            elif v.is_whole(x.shape):
                plans.append(("whole", put(shared, "shared", [x.reshape(R, N)]), None))
            else:
                full = x.full_tensor()
                mesh = x.device_mesh
                plans.append(("gathered", put(gathered.setdefault(mesh, []), mesh, v.blocks(full)), None))

        results: dict[Any, list[Tensor]] = {"shared": self.map(shared, fn) if shared else [],
                                            "own": fn(own) if own else []}
        for mesh, mats in gathered.items():
            if self.shard_strategy == "all_to_all":
                results[mesh] = map_replicated(mats, fn, group=mesh.get_group())
            else:
                results[mesh] = fn(mats)

        out: list[Tensor] = []
        for x, v, (kind, slots, _) in zip(xs, vs, plans):
            parts = [s if isinstance(s, Tensor) else results[s[0]][s[1]] for s in slots]
            R, N, _ = v.layout(x.shape)
            if kind == "whole":
                out.append(parts[0].view(x.shape))
                continue
            if kind == "local":  # parts are (m, N) matrices, in row order
                rows = torch.cat(parts) if parts else local_part(x).new_empty((0, N))
                out.append(from_local_rows(rows, x) if is_dtensor(x) else rows.view(x.shape))
                continue
            if len(parts) == 1:
                rows = parts[0]
            else:
                rows = torch.cat(parts) if parts else x.new_empty((0, N))
            if kind == "plain":
                out.append(rows.view(x.shape))
            else:  # gathered: every rank has the whole result and keeps its own rows
                res = distribute_tensor(rows.view(x.shape), x.device_mesh, x.placements, src_data_rank=None)
                out.append(DTensor.from_local(res.to_local(), x.device_mesh, x.placements, shape=x.shape,
                                              stride=x.stride()))
        return out


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


def orthogonalize_blocks(
    tensors: Sequence[Tensor],
    views: MatrixView | Sequence[MatrixView] | None = None,
    ns: NSConfig | None = None,
    *,
    schedule: Any = "polar_express",
    steps: int | None = None,
    ns_dtype: torch.dtype | None = None,
    placement: Placement = LOCAL,
) -> list[Tensor]:
    """Each tensor with every block of its :class:`MatrixView` replaced by the block's ``msign``.

    ``views``: one view for all tensors, one per tensor, or None (each tensor its
    (out, in·…) matrix, as :func:`orthogonalize` on ``matrix_shape`` reshapes).
    Blocks of equal shape from all tensors are batched together; ``placement``
    says where the work runs (:meth:`Placement.map_blocks`, which also says how
    FSDP2 shards are treated). Other arguments as for :func:`orthogonalize`.
    """
    if ns is None:
        ns = resolve_schedule(schedule, steps=steps, dtype=ns_dtype)
    return placement.map_blocks(tensors, views, lambda mats: _orthogonalize_local(mats, ns))


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


def project_spectral_ball(params: Sequence[Tensor], bound: float, *, placement: Placement = LOCAL,
                          views: MatrixView | Sequence[MatrixView] | None = None) -> None:
    """``W ← c·mclip(W/c)`` in place for each block of each parameter (default: its (out, in·…) matrix).

    Singular values above ``c = bound`` are clipped to c (:func:`steepest.linalg.mclip`,
    accurate schedule), block by block as ``views`` cut the parameters
    (:class:`MatrixView`); the blocks are mapped where ``placement`` says.
    """
    if not params:
        return
    for p, new in zip(params, placement.map_blocks(params, views, _clip_local(float(bound)))):
        p.copy_(new)
