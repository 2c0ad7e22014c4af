"""The reporting harness shared by ``steepest reproduce`` and ``steepest bench``.

An experiment or a benchmark is a module with one entry point ``run(ctx: Context)``
(and optionally ``TITLE`` and ``THREADS``); it writes markdown paragraphs, tables,
figures and JSON-able results through the :class:`Context` it is given.
:func:`run_sections` runs the registered modules one after the other and
:func:`write_report` turns the collected sections into ``report.md`` /
``results.json`` (or ``bench.md`` / ``bench.json``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")

from ._table import markdown_table  # noqa: E402  (re-exported for the experiments)

__all__ = [
    "MODES", "RESERVED", "Context", "Entry", "Section", "Settings", "markdown_table", "measure", "run_sections",
    "select", "thread_limit", "write_json", "write_report",
]

MODES = ("smoke", "quick", "full")
#: keys the harness writes next to each section's results in results.json / bench.json
RESERVED = frozenset({"title", "seconds", "error", "figures"})


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


@dataclass(frozen=True)
class Settings:
    """What every section of one run shares (the command line's options).

    ``jobs`` is ``steepest reproduce --jobs``; ``warmup``, ``repeat`` and ``shapes``
    are ``steepest bench``'s options (``shapes=None``: each benchmark's own).
    """

    mode: str = "quick"
    seed: int = 0
    jobs: int = 1
    warmup: int = 1
    repeat: int = 5
    shapes: list[tuple[int, int]] | None = None


class Context:
    """What an experiment or benchmark sees: its mode, output folder, options and writers.

    ``mode`` is ``"smoke"`` (tiny sizes, used by the tests), ``"quick"`` (the
    default of ``steepest reproduce``) or ``"full"``. ``jobs`` is how many worker
    processes :meth:`map` may use; ``warmup`` and ``repeat`` are :meth:`timeit`'s
    defaults; ``shapes`` are matrix shapes asked for on the command line (None:
    the benchmark picks its own).
    """

    def __init__(
        self,
        section: Section,
        out: Path,
        mode: str = "quick",
        seed: int = 0,
        *,
        jobs: int = 1,
        warmup: int = 1,
        repeat: int = 5,
        shapes: list[tuple[int, int]] | None = None,
        progress: Any = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.section = section
        self.out = Path(out)
        self.mode = mode
        self.seed = seed
        self.jobs: int = int(jobs)
        self.warmup: int = int(warmup)
        self.repeat: int = int(repeat)
        self.shapes: list[tuple[int, int]] | None = list(shapes) if shapes else None
        self._progress = progress
        self._echo = echo

    @classmethod
    def of(cls, section: Section, out: Path, settings: Settings, **kwargs: Any) -> Context:
        """A context for ``section`` with the run's ``settings`` (``kwargs``: progress, echo)."""
        return cls(section, out, settings.mode, settings.seed, jobs=settings.jobs, warmup=settings.warmup,
                   repeat=settings.repeat, shapes=settings.shapes, **kwargs)

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
    def timeit(self, fn: Callable[[], Any], *, warmup: int | None = None,
               repeat: int | None = None) -> dict[str, float]:
        """Median (and spread) of ``repeat`` wall-clock runs of ``fn`` after ``warmup`` runs (default: the run's)."""
        return measure(fn, warmup=self.warmup if warmup is None else warmup,
                       repeat=self.repeat if repeat is None else repeat)


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
    """A registered experiment or benchmark: a name and the module holding ``run(ctx)``.

    The module is imported on first use and kept.
    """

    name: str
    module: str

    @functools.cached_property
    def loaded(self) -> ModuleType:
        return importlib.import_module(self.module)

    def run(self, ctx: Context) -> Any:
        return self.loaded.run(ctx)

    @property
    def title(self) -> str:
        return getattr(self.loaded, "TITLE", self.name)

    @property
    def threads(self) -> int | None:
        """The module's ``THREADS`` (intra-op threads it runs with), or None for the default."""
        return getattr(self.loaded, "THREADS", None)


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


# -- running the sections and writing the report ------------------------------
def _run_one(entry: Entry, ctx: Context) -> None:
    """Run one entry into ``ctx.section``; a failure (also on import) is recorded there, not raised."""
    sec = ctx.section
    t0 = time.perf_counter()
    try:
        sec.title = entry.title
        with thread_limit(entry.threads):
            entry.run(ctx)
    except Exception:  # a failed section is reported, the others still run
        sec.error = traceback.format_exc()
    sec.seconds = time.perf_counter() - t0


def run_sections(kind: str, entries: Sequence[Entry], out: Path, settings: Settings, *, verbose: bool = False) -> int:
    """Run ``entries`` with a progress display, write the report into ``out``; exit code 1 if any failed, else 0.

    ``kind`` is ``"reproduce"`` (report.md, results.json) or ``"bench"`` (bench.md, bench.json).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    echo = console.print if verbose else None
    sections: list[Section] = []
    with progress:
        top = progress.add_task(f"steepest {kind} ({settings.mode})", total=len(entries))
        for entry in entries:
            sec = Section(entry.name, entry.name)
            progress.update(top, description=f"steepest {kind}: {entry.name}")
            _run_one(entry, Context.of(sec, out, settings, progress=progress, echo=echo))
            if sec.error:
                console.print(f"[red]{entry.name} failed[/red]\n{sec.error}")
            sections.append(sec)
            if not console.is_terminal:  # logs get a line per section; a terminal has the live bar
                console.print(f"{entry.name}: {'failed' if sec.error else 'done'} in {sec.seconds:.0f} s")
            progress.advance(top)

    md = write_report(kind, out, sections, settings)
    console.print(f"wrote {md} ({len(sections)} sections, {sum(s.seconds for s in sections):.0f} s)")
    failed = [s.name for s in sections if s.error]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


def environment() -> dict[str, str]:
    """Versions and thread count the report records."""
    from . import __version__

    return {
        "steepest": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def write_report(kind: str, out: Path, sections: Sequence[Section], settings: Settings) -> Path:
    """Write ``report.md`` + ``results.json`` (``kind="reproduce"``) or ``bench.md`` + ``bench.json``; the .md path."""
    env = environment()
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    name, data = ("report", "results") if kind == "reproduce" else ("bench", "bench")
    head = [
        f"# steepest {kind}",
        f"Mode `{settings.mode}`, seed {settings.seed}, {stamp}. "
        + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "\n".join(f"- [{s.title}](#{_anchor(s.title)}) — {s.seconds:.1f} s" + (" (failed)" if s.error else "")
                  for s in sections),
    ]
    md = Path(out) / f"{name}.md"
    md.write_text("\n\n".join(head + [s.markdown() for s in sections]) + "\n")
    write_json(
        Path(out) / f"{data}.json",
        {
            "mode": settings.mode,
            "seed": settings.seed,
            "environment": env,
            "sections": {
                s.name: {"title": s.title, "seconds": s.seconds, "error": s.error, "figures": s.figures, **s.results}
                for s in sections
            },
        },
    )
    return md
