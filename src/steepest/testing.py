"""Test and benchmark support for torch.distributed: a local process launcher and a collective counter.

Not part of the numerical library: :func:`launch` runs a function on W local
processes joined in a gloo process group on loopback (how the tests and
``steepest bench --only distributed`` check the distributed code against one
process), and :class:`CommCounter` counts the collectives and bytes a block of
code issues.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributed import rank_world

__all__ = ["CommCounter", "free_port", "launch"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to port 0, read back, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, out_dir: str,
            backend: str, threads: int, pg_timeout: float) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 120.0,
           threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return each rank's result.

    Each process is started with ``torch.multiprocessing`` (spawn), joins a
    ``backend`` process group on loopback (a free port) with ``threads`` intra-op
    threads, and sends back what ``fn`` returns (anything ``torch.save`` takes).
    ``fn`` must be importable (a module-level function). An exception in any rank is
    re-raised here; after ``timeout`` seconds the processes are killed and
    ``TimeoutError`` is raised, so a deadlocked collective cannot hang the caller.
    """
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    with tempfile.TemporaryDirectory(prefix="steepest-dist-") as out_dir:
        port = free_port()
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned interpreters from the start
        try:
            ctx = mp.start_processes(_worker, args=(fn, world_size, port, args, out_dir, backend, threads,
                                                    max(30.0, float(timeout))),
                                     nprocs=world_size, join=False, start_method="spawn")
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} processes did not finish "
                                       f"within {timeout:.0f} s (a rank may be stuck in a collective)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------------------
# Counting communication
# ---------------------------------------------------------------------------
def _ring_bytes(name: str, nbytes_in: int, nbytes_out: int, world: int) -> float:
    """Bytes one rank sends for a collective under the ring/pairwise algorithms (Patarasuk & Yuan 2009)."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world
    if "allreduce" in name or "all_reduce" in name:
        return 2 * f * nbytes_in
    if "reduce_scatter" in name:
        return f * nbytes_in
    if "allgather" in name or "all_gather" in name:
        return f * nbytes_out
    if "alltoall" in name or "all_to_all" in name:
        return f * nbytes_in
    if "broadcast" in name or "scatter" in name:
        return f * nbytes_in
    return float(nbytes_in)


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


class CommCounter:
    """Count the collectives issued inside a ``with`` block and the bytes each rank sends.

    A ``TorchDispatchMode`` that sees c10d collectives (DDP, FSDP2, ``dist.*``) and
    DTensor's functional collectives — the same ops ``torch.distributed.tensor.debug.
    CommDebugMode`` counts — and, per call, the payload size. ``bytes_sent`` models
    what one rank puts on the wire with ring/pairwise algorithms: all-reduce
    2(W−1)/W·N, reduce-scatter (W−1)/W·N of the input, all-gather (W−1)/W·N of the
    output, all-to-all (W−1)/W·N of the input (the split sizes are not
    inspected: uneven all-to-alls are counted at their total size).
    """

    def __init__(self, world_size: int | None = None) -> None:
        self.world_size = rank_world()[1] if world_size is None else int(world_size)
        self.counts: dict[str, int] = defaultdict(int)
        self.bytes_by_op: dict[str, float] = defaultdict(float)
        self.bytes_sent = 0.0
        self._mode: Any = None

    def add(self, name: str, nbytes_in: int, nbytes_out: int | None = None) -> None:
        """Record one collective by hand (e.g. DDP's bucketed all-reduce, issued from C++)."""
        sent = _ring_bytes(name, nbytes_in, nbytes_in if nbytes_out is None else nbytes_out, self.world_size)
        self.counts[name] += 1
        self.bytes_by_op[name] += sent
        self.bytes_sent += sent

    def __enter__(self) -> CommCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
                kwargs = kwargs or {}
                ns = func.namespace
                if ns in ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
                    name = func.__name__.split(".")[0]
                    if name not in ("wait_tensor", "barrier", "monitored_barrier", "_wrap_tensor_autograd"):
                        out = func(*args, **kwargs)
                        nin = _nbytes(args[0]) if args else 0
                        if name in ("allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_"):
                            nin, nout = _nbytes(args[1]), _nbytes(args[0])  # (output, input) order
                        elif name in ("reduce_scatter_", "_reduce_scatter_base_",
                                      "reduce_scatter_tensor_coalesced_", "alltoall_base_", "alltoall_"):
                            nin = _nbytes(args[1])
                            nout = _nbytes(args[0])
                        elif name.startswith("all_gather"):
                            nout = nin * counter.world_size
                        else:
                            nout = nin
                        counter.add(name, nin, nout)
                        return out
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._mode = None

