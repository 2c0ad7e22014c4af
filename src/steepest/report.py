"""The reporting context shared by ``steepest reproduce`` and ``steepest bench``.

An experiment or a benchmark is a module with one entry point ``run(ctx)``; it
writes markdown paragraphs, tables, figures and JSON-able results through the
:class:`Context` it is given. The harness turns the collected sections into
``report.md`` / ``results.json`` (or ``bench.md`` / ``bench.json``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")

MODES = ("smoke", "quick", "full")
#: keys the harness writes next to each section's results in results.json / bench.json
RESERVED = frozenset({"title", "seconds", "error", "figures"})


def _fmt(x: Any, floatfmt: str) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "–"  # not measured / not applicable
        return format(x, floatfmt)
    return str(x)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str = ".3g") -> str:
    """Render ``rows`` as a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(x, floatfmt) for x in row) + " |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(x.tolist())
    return x


@dataclass
class Section:
    """One experiment's (or benchmark's) part of the report."""

    name: str
    title: str
    blocks: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def markdown(self) -> str:
        head = f"## {self.title}\n\n*`{self.name}` — {self.seconds:.1f} s*"
        body = list(self.blocks)
        if self.error:
            body.append(f"**This section failed:**\n\n```\n{self.error}\n```")
        return "\n\n".join([head, *body])


class Context:
    """What an experiment or benchmark sees: its mode, output folder and writers.

    ``mode`` is ``"smoke"`` (tiny sizes, used by the tests), ``"quick"`` (the
    default of ``steepest reproduce``) or ``"full"``.
    """

    def __init__(
        self,
        section: Section,
        out: Path,
        mode: str = "quick",
        seed: int = 0,
        options: dict[str, Any] | None = None,
        progress: Any = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.section = section
        self.out = Path(out)
        self.mode = mode
        self.seed = seed
        self.options = dict(options or {})
        self._progress = progress
        self._echo = echo

    # -- sizes ---------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self.mode == "full"

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for the current mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    # -- progress --------------------------------------------------------------
    def track(self, iterable: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
        """Iterate with a progress bar (rich) when the harness shows one."""
        if self._progress is None:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self._progress.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)

    @property
    def jobs(self) -> int:
        """Worker processes :meth:`map` may use (``steepest reproduce --jobs``; 1 = in this process)."""
        return max(1, int(self.options.get("jobs", 1)))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], description: str) -> Iterator[tuple[Any, Any]]:
        """Yield ``(item, fn(item))`` for every item, in completion order, with a progress bar.

        With ``jobs > 1`` the calls run in that many spawned worker processes, each
        limited to this process's current torch thread count (an experiment's
        ``THREADS``), so ``jobs × THREADS`` should not exceed the cores. ``fn`` and the
        items must be picklable (a module-level function, plain data). A call that
        raises stops the map and re-raises here; queued calls are cancelled.
        Results do not depend on ``jobs``: each call must seed itself.
        """
        items = list(items)
        jobs = min(self.jobs, len(items))
        if jobs <= 1:
            for item in self.track(items, description):
                yield item, fn(item)
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = torch.get_num_threads()
        bar = self.track(iter(range(len(items))), f"{description} ({jobs} processes)", total=len(items))
        next(bar)  # shows the bar; each later next() advances it by one
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            try:
                for fut in cf.as_completed(futures):
                    result = fut.result()
                    next(bar, None)
                    yield futures[fut], result
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()  # removes the bar also when a call failed

    def log(self, message: str) -> None:
        if self._echo is not None:
            self._echo(message)

    # -- writers ---------------------------------------------------------------
    def text(self, markdown: str) -> None:
        self.section.blocks.append(markdown.strip())

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        caption: str | None = None,
        floatfmt: str = ".3g",
    ) -> str:
        rows = [list(r) for r in rows]
        md = markdown_table(headers, rows, floatfmt)
        if caption:
            md = f"{caption}\n\n{md}"
        self.section.blocks.append(md)
        self.log(md)
        return md

    def figure(self, fig: Any, stem: str, caption: str) -> Path:
        """Save a matplotlib figure as ``<out>/<section>-<stem>.png`` and show it inline."""
        import matplotlib.pyplot as plt

        self.out.mkdir(parents=True, exist_ok=True)
        name = f"{self.section.name}-{stem}.png"
        path = self.out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.section.figures.append(name)
        self.section.blocks.append(f"![{caption}]({name})\n\n*{caption}*")
        return path

    def result(self, key: str, value: Any) -> None:
        if key in RESERVED:
            raise ValueError(f"result key {key!r} is reserved for the harness ({sorted(RESERVED)}); pick another name")
        self.section.results[key] = _jsonable(value)

    # -- timing ----------------------------------------------------------------
    def timeit(self, fn: Callable[[], Any], *, warmup: int | None = None, repeat: int | None = None) -> dict[str, float]:
        """Median (and spread) of ``repeat`` wall-clock runs of ``fn`` after ``warmup`` runs."""
        warmup = int(self.options.get("warmup", 1) if warmup is None else warmup)
        repeat = int(self.options.get("repeat", 5) if repeat is None else repeat)
        return measure(fn, warmup=warmup, repeat=repeat)


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Median, min and max seconds of ``repeat`` calls of ``fn`` after ``warmup`` calls."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeat": repeat}


@dataclass(frozen=True)
class Entry:
    """A registered experiment or benchmark: a name and the module holding ``run(ctx)``."""

    name: str
    module: str

    def load(self) -> Callable[[Context], Any]:
        mod = importlib.import_module(self.module)
        return mod.run

    def title(self) -> str:
        mod = importlib.import_module(self.module)
        return getattr(mod, "TITLE", self.name)

    def threads(self) -> int | None:
        """The module's ``THREADS`` (intra-op threads it runs with), or None for the default."""
        return getattr(importlib.import_module(self.module), "THREADS", None)


@contextlib.contextmanager
def thread_limit(n: int | None) -> Iterator[None]:
    """Run torch and the BLAS pools (numpy, scipy, scikit-learn) with ``n`` threads, then restore."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(old)


def _worker_init(threads: int) -> None:
    """Thread limits of a :meth:`Context.map` worker: the parent's, for torch and the BLAS pools."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)  # stays in force for the worker's lifetime


def select(registry: dict[str, str], only: Sequence[str] | None) -> list[Entry]:
    """The registry entries named in ``only`` (all when empty), with a clear error for unknown names."""
    names = list(registry)
    if only:
        unknown = [n for n in only if n not in registry]
        if unknown:
            raise SystemExit(f"unknown name(s) {unknown}; choose from {names}")
        names = [n for n in names if n in only]
    return [Entry(n, registry[n]) for n in names]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
