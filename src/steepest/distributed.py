"""Generic torch.distributed plumbing: whole-matrix maps over DDP and FSDP2, and one finite check for all ranks.

Everything here takes a function and knows nothing about any optimizer; the
optimizers in :mod:`steepest.optim` decide *what* to run and call these to decide
*where*. Built on torch.distributed's own machinery (process groups, DTensor,
FSDP2's ``fully_shard``); no home-made scheme.

- :func:`map_whole_matrices` applies a whole-matrix map (``msign``, a spectral-ball
  projection) to FSDP2 parameters, whose rows are sharded across ranks
  (DTensor ``Shard(0)``), with one of two strategies:

  * ``"all_to_all"`` (default) — each matrix gets one owner rank (greedy balance
    of the cost m·n·min(m, n)); one ``all_to_all_single`` sends every rank's rows
    to the owners, each owner maps its whole matrices, and a second one returns
    the rows. The work is split W ways and each rank moves about 2·(W−1)/W² of
    the matrices instead of (W−1)/W: the distributed Muon of Keller Jordan's
    modded-nanogpt and of Dion (Ahn et al. 2025, "Dion: Distributed
    Orthonormalized Updates").
  * ``"all_gather"`` — every rank gathers every matrix (``full_tensor()``), maps
    all of them and keeps its own rows. Simple; every rank does all the work.

  (``"spread"`` and ``"gather"`` are accepted as older names of the two.)
- :func:`map_replicated` applies such a map to replicated (DDP) matrices with the
  work dealt out: each rank maps its share, one all-gather shares the results.
- :func:`finite_mask` decides "all entries finite?" per tensor, one decision for
  all ranks when tensors are sharded (a per-rank decision would leave ranks
  waiting in different collectives, or half a tensor stepped).

Measured speed-ups are in ``docs/results/`` (``steepest bench --only distributed``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SHARD_STRATEGIES",
    "assign_owners",
    "extrema",
    "finite_mask",
    "finite_mask_sharded",
    "full_value",
    "is_dtensor",
    "local_part",
    "map_replicated",
    "map_whole_matrices",
    "rank_world",
    "shard_strategy",
]

#: Ways to map row-sharded (FSDP2) matrices whole, see :func:`map_whole_matrices`.
SHARD_STRATEGIES = ("all_to_all", "all_gather")
_SHARD_ALIASES = {"spread": "all_to_all", "gather": "all_gather"}

MatrixMap = Callable[[list[Tensor]], list[Tensor]]


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_strategy(name: str) -> str:
    """The canonical name of a strategy for :func:`map_whole_matrices` (older names accepted)."""
    canon = _SHARD_ALIASES.get(name, name) if isinstance(name, str) else name
    if canon not in SHARD_STRATEGIES:
        raise ValueError(f"shard_strategy must be one of {SHARD_STRATEGIES}, got {name!r}")
    return canon


# ---------------------------------------------------------------------------
# DTensor
# ---------------------------------------------------------------------------
def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or its gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def local_part(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (``to_local()``); a plain tensor is returned as is."""
    return t.to_local() if is_dtensor(t) else t


def full_value(t: Tensor) -> Tensor:
    """The whole value of a DTensor (``full_tensor()``: a collective, every rank must call it), else ``t``.

    For a partial sum (a DTensor reduction) this is the sum over the ranks, so a
    scalar computed from sharded tensors means the same on every rank.
    """
    return t.full_tensor() if is_dtensor(t) else t


def extrema(t: Tensor) -> tuple[float, float, bool]:
    """``(min, max, all finite)`` of every entry on every rank (a DTensor's shards, possibly empty).

    An empty tensor (or shard) has min +inf and max −inf. With DTensors this is one
    all-reduce, the same answer on every rank.
    """
    import torch.distributed as dist

    loc = local_part(t).detach()
    if loc.numel():
        fin = torch.isfinite(loc).all()
        vals = torch.stack([-loc.min().double(), loc.max().double(), (~fin).double()])
    else:
        vals = torch.tensor([-math.inf, -math.inf, 0.0], dtype=torch.float64, device=loc.device)
    if is_dtensor(t) and t.device_mesh.size() > 1 and dist.is_initialized():
        for d in range(t.device_mesh.ndim):
            dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=t.device_mesh.get_group(d))
    neg_min, mx, bad = vals.tolist()
    return -neg_min, mx, bad == 0


def _check_row_sharded(m: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    if m.ndim != 2:
        raise ValueError(f"map_whole_matrices takes 2-D matrices, got shape {tuple(m.shape)}")
    mesh = m.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"only 1-D device meshes are supported (FSDP2's default), got a {mesh.ndim}-D mesh; for HSDP "
            "map on the shard dimension's sub-mesh")
    (pl,) = m.placements
    if not (isinstance(pl, Shard) and pl.dim == 0) and not isinstance(pl, Replicate):
        raise NotImplementedError(
            f"matrices must be sharded on rows (Shard(0), FSDP2's default) or replicated, got {pl}; pass "
            "fully_shard a shard_placement_fn that returns Shard(0)")


# ---------------------------------------------------------------------------
# Whole-matrix maps
# ---------------------------------------------------------------------------
def map_whole_matrices(matrices: Sequence[Tensor], fn: MatrixMap, *, strategy: str = "all_to_all") -> list[Tensor]:
    """Apply a whole-matrix map ``fn`` (list of matrices → list of same-shaped results) to row-sharded DTensors.

    ``fn`` sees whole (m, n) plain tensors — any number, any mix of shapes — and
    must act on each matrix independently (batching inside is fine). The result
    for each input is a DTensor with the input's mesh and placements whose full
    value is ``fn`` of the full matrix, the same numbers one process computes;
    plain tensors in the list get ``fn``'s output as is. ``strategy``:
    ``"all_to_all"`` or ``"all_gather"`` (module docstring).
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    strategy = shard_strategy(strategy)
    out: list[Tensor | None] = [None] * len(matrices)
    plain = [i for i, m in enumerate(matrices) if not is_dtensor(m)]
    if plain:
        for i, o in zip(plain, fn([matrices[i] for i in plain])):
            out[i] = o
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        if is_dtensor(m):
            _check_row_sharded(m)
            buckets[(m.dtype, m.device_mesh, tuple(m.placements))].append(i)
    for (_, mesh, placements), idx in buckets.items():
        mats = [matrices[i] for i in idx]
        if isinstance(placements[0], Replicate) or mesh.size() == 1:  # every rank holds whole matrices already
            results = fn([m.to_local() for m in mats])
        elif strategy == "all_gather":
            results = [distribute_tensor(o, mesh, placements, src_data_rank=None).to_local()
                       for o in fn([m.full_tensor() for m in mats])]
        else:
            results = _spread(mats, mesh.get_group(), fn)
        for i, o in zip(idx, results):
            out[i] = DTensor.from_local(o, mesh, placements, shape=matrices[i].shape, stride=matrices[i].stride())
    return out  # type: ignore[return-value]


def map_replicated(
    matrices: Sequence[Tensor], fn: Callable[[list[Tensor]], list[Tensor]], *, group: Any = None
) -> list[Tensor]:
    """``fn`` of replicated matrices (DDP: the same values on every rank), the work dealt out across ranks.

    Matrix j gets one owner rank (greedy balance of the cost m·n·min(m, n), the
    same assignment on every rank); each rank applies ``fn`` to its own matrices
    only, and one ``all_gather`` per dtype (results packed into one flat buffer per
    rank, padded to the longest) gives every rank every result. The work drops W times;
    each rank receives (W−1)/W of the results. Every rank ends with the owner's
    bits, so replicated parameters stay bit-identical across ranks (Keller
    Jordan's modded-nanogpt does this for Muon under DDP).

    ``fn`` as in :func:`map_whole_matrices`. Without an initialized process group,
    or with one rank, it is ``fn(matrices)``. Correct only when the inputs are
    equal on every rank of ``group``: the other ranks' copies are never read.
    """
    import torch.distributed as dist

    mats = list(matrices)
    if not mats or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return fn(mats)
    if any(is_dtensor(m) for m in mats):
        raise TypeError("map_replicated takes plain (replicated) tensors; for DTensors use map_whole_matrices")
    W, r = dist.get_world_size(group), dist.get_rank(group)
    out: list[Tensor | None] = [None] * len(mats)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for j, m in enumerate(mats):
        if m.ndim != 2:
            raise ValueError(f"map_replicated takes 2-D matrices, got shape {tuple(m.shape)}")
        by_dtype[m.dtype].append(j)
    for dtype in sorted(by_dtype, key=str):  # the same collective order on every rank
        idx = by_dtype[dtype]
        owner = assign_owners([mats[j].shape[0] * mats[j].shape[1] * min(mats[j].shape) for j in idx], W)
        by_owner = [[j for j, o in zip(idx, owner) if o == q] for q in range(W)]
        sizes = [sum(mats[j].numel() for j in js) for js in by_owner]
        ref = mats[idx[0]]
        done = fn([mats[j] for j in by_owner[r]]) if by_owner[r] else []
        flat = torch.cat([d.reshape(-1).to(dtype) for d in done] + [ref.new_zeros(max(sizes) - sizes[r])])
        recv = [ref.new_empty(max(sizes)) for _ in range(W)]
        dist.all_gather(recv, flat.contiguous(), group=group)
        for q, js in enumerate(by_owner):
            for j, part in zip(js, recv[q][: sizes[q]].split([mats[j].numel() for j in js])):
                out[j] = part.view(mats[j].shape)
    return out  # type: ignore[return-value]


def _row_counts(m: int, world: int) -> list[int]:
    """Rows per rank of an ``m``-row ``Shard(0)`` DTensor (DTensor's own rule: ``torch.chunk``'s split)."""
    from torch.distributed.tensor import Shard

    return [int(Shard.local_shard_size_and_offset(m, world, q)[0]) for q in range(world)]


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Greedy longest-processing-time assignment of jobs to ranks (deterministic, the same on every rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        q = min(range(world), key=lambda q: (load[q], q))
        owner[j] = q
        load[q] += costs[j]
    return owner


def _spread(mats: Sequence[Tensor], group: Any, fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """Local rows of ``fn`` of each row-sharded matrix, the work dealt out across ranks.

    Matrix j goes whole to one owner rank (balanced by the cost m·n·min(m, n));
    two ``all_to_all_single`` calls move rows to the owners and results back.
    """
    import torch.distributed as dist

    W, r = dist.get_world_size(group), dist.get_rank(group)
    shapes = [(int(x.shape[0]), int(x.shape[1])) for x in mats]
    rows = [_row_counts(m, W) for m, _ in shapes]
    offs = [[sum(rj[:q]) for q in range(W)] for rj in rows]
    owner = assign_owners([m * n * min(m, n) for m, n in shapes], W)
    locs = [x.to_local() for x in mats]
    for j, x in enumerate(locs):
        if x.shape[0] != rows[j][r]:
            raise RuntimeError(f"rank {r} holds {x.shape[0]} rows of a {shapes[j][0]}-row matrix; expected "
                               f"torch.chunk's {rows[j][r]} (DTensor Shard(0))")
    by_owner = [[j for j in range(len(mats)) if owner[j] == q] for q in range(W)]
    mine = by_owner[r]
    ref = locs[0]
    # forward: my rows of each matrix go to its owner; I receive every rank's rows of mine
    send = torch.cat([locs[j].reshape(-1) for q in range(W) for j in by_owner[q]] or [ref.new_empty(0)])
    in_splits = [sum(rows[j][r] * shapes[j][1] for j in by_owner[q]) for q in range(W)]
    out_splits = [sum(rows[j][s] * shapes[j][1] for j in mine) for s in range(W)]
    recv = ref.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    per_rank = [list(piece.split([rows[j][s] * shapes[j][1] for j in mine]))
                for s, piece in enumerate(recv.split(out_splits))]
    whole = [torch.cat([per_rank[s][i].view(rows[j][s], shapes[j][1]) for s in range(W)])
             for i, j in enumerate(mine)]
    done = fn(whole) if whole else []
    # back: rank s's rows of my results go to s; I receive my rows of everyone's results
    send = torch.cat([done[i][offs[j][s]:offs[j][s] + rows[j][s]].reshape(-1)
                      for s in range(W) for i, j in enumerate(mine)] or [ref.new_empty(0)])
    recv = ref.new_empty(sum(in_splits))
    dist.all_to_all_single(recv, send, output_split_sizes=in_splits, input_split_sizes=out_splits, group=group)
    out: list[Tensor | None] = [None] * len(mats)
    pieces = recv.split(in_splits)
    for q in range(W):
        for j, part in zip(by_owner[q], pieces[q].split([rows[j][r] * shapes[j][1] for j in by_owner[q]])):
            out[j] = part.view(rows[j][r], shapes[j][1])
    return out  # type: ignore[return-value]


def finite_mask(tensors: Sequence[Tensor]) -> list[bool]:
    """Per tensor: True when every entry is finite — on every rank, when tensors are sharded.

    ``max |t|`` is finite exactly when all entries are (NaN and Inf propagate
    through the ∞-norm), so no overflow gives a false alarm. One reduction per
    tensor and one host sync in all; with DTensors (FSDP2) one all-reduce more,
    so that every rank reaches the same decision.
    """
    if not tensors:
        return []
    if any(is_dtensor(t) for t in tensors):
        return finite_mask_sharded(tensors)
    full = [i for i, t in enumerate(tensors) if t.numel()]  # empty tensors are finite (and _foreach_norm rejects them)
    ok = [True] * len(tensors)
    if full:
        norms = torch._foreach_norm([tensors[i] for i in full], float("inf"))
        for i, good in zip(full, torch.isfinite(torch.stack([n.float() for n in norms])).tolist()):
            ok[i] = good
    return ok


def finite_mask_sharded(grads: Sequence[Tensor]) -> list[bool]:
    """:func:`finite_mask` for a list that may mix DTensors and plain tensors: one all-reduce for the list.

    Each rank flags its local shards and the flags are summed over the DTensors'
    process groups, so all ranks reach the same decision.
    """
    import torch.distributed as dist

    if not grads:
        return []
    locs = [local_part(g) for g in grads]
    bad = torch.stack([(~torch.isfinite(torch.linalg.vector_norm(g.float(), float("inf")))).float()
                       if g.numel() else g.new_zeros((), dtype=torch.float32) for g in locs])
    meshes = {g.device_mesh for g in grads if is_dtensor(g) and g.device_mesh.size() > 1}
    if meshes and dist.is_initialized():
        for mesh in meshes:
            for d in range(mesh.ndim):
                dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
    return (bad == 0).tolist()
