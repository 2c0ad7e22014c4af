"""The reporting harness shared by ``steepest reproduce`` and ``steepest bench``.

An experiment or a benchmark is a module with one entry point ``run(ctx: Context)``
(and optionally ``TITLE`` and ``THREADS``); it writes markdown paragraphs, tables,
figures, JSON-able results and the verdicts on the claims it tests through the
:class:`Context` it is given. :func:`run_sections` checks the output folder, runs
the registered modules one after the other and :func:`write_report` turns the
collected sections into ``report.md`` / ``results.json`` (or ``bench.md`` /
``bench.json``): a header naming the machine, the table of claims and verdicts,
the contents, then one part per section. A run of some sections only (``--only``)
updates those sections inside an existing report and keeps the others.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
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
    "DIVERGED", "MODES", "RESERVED", "SPLITS", "VERDICTS", "Claim", "Context", "Entry", "OutputError", "Section",
    "Settings", "check_out", "machine_info", "markdown_table", "measure", "plural", "run_sections", "select",
    "thread_limit", "write_json", "write_report",
]

MODES = ("smoke", "quick", "full")
#: keys the harness writes next to each section's results in results.json / bench.json
RESERVED = frozenset({"title", "seconds", "error", "figures", "mode", "date"})
#: the only words a claim's verdict may be
VERDICTS = ("held", "partly held", "not held", "not measured")
#: where the evidence for a claim comes from: held-out data, the data the choices were made on, the training
#: data, or none (pure numerics)
SPLITS = ("test", "validation", "train", "none")
#: the one label of a diverged run in every table of the report
DIVERGED = "diverged"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 section"``, ``"2 sections"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


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
class Claim:
    """One claim a section tests and the verdict its numbers give.

    ``note`` and ``url`` cite the source of the claim; ``beyond`` marks a claim that
    is not one of the notes' (a comparison this project adds). ``split`` says where
    the evidence comes from (:data:`SPLITS`), ``seeds`` which seeds it rests on.
    ``command`` is the run that would measure a claim this run left ``"not measured"``.
    """

    note: str
    url: str
    claim: str
    verdict: str
    figure: str
    split: str
    seeds: list[int]
    section: str = ""
    beyond: bool = False
    command: str | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.verdict == "not measured" and not self.command:
            raise ValueError("a claim left 'not measured' names the command that measures it")

    def record(self) -> dict[str, Any]:
        """The claim as results.json stores it."""
        out: dict[str, Any] = {
            "note": self.note, "url": self.url, "claim": self.claim, "verdict": self.verdict, "figure": self.figure,
            "evidence": {"split": self.split, "seeds": list(self.seeds)}, "section": self.section,
            "beyond_the_notes": self.beyond,
        }
        if self.command:
            out["command"] = self.command
        return out

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Claim:
        ev = r.get("evidence", {})
        return cls(r["note"], r.get("url", ""), r["claim"], r["verdict"], r["figure"], ev.get("split", "none"),
                   list(ev.get("seeds", [])), r.get("section", ""), bool(r.get("beyond_the_notes", False)),
                   r.get("command"))


@dataclass
class Section:
    """One experiment's (or benchmark's) part of the report."""

    name: str
    title: str
    blocks: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    mode: str = "quick"
    date: str = ""

    def body(self) -> str:
        """The section's own paragraphs, tables and figures (what ``--only`` keeps of the other sections)."""
        body = list(self.blocks)
        if self.error:
            body.append(f"**This section failed:**\n\n```\n{self.error}\n```")
        return "\n\n".join(body)

    def markdown(self) -> str:
        """The section on its own: its heading, then its body (write_report numbers and cites it)."""
        return _section_markdown(self.name, self.title, self.seconds, self.mode, self.claims, self.body(), None)


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
    device: str = "cpu"


class Context:
    """What an experiment or benchmark sees: its mode, output folder, options and writers.

    ``mode`` is ``"smoke"`` (tiny sizes, used by the tests), ``"quick"`` (the
    default of ``steepest reproduce``) or ``"full"``. ``jobs`` is how many worker
    processes :meth:`map` may use; ``warmup`` and ``repeat`` are :meth:`timeit`'s
    defaults; ``shapes`` are matrix shapes asked for on the command line (None:
    the benchmark picks its own); ``device`` is where benchmarks run (``--device``). ``timing_tables``: every table is a timing table
    (the benchmarks), see :meth:`table`.
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
        device: str = "cpu",
        progress: Any = None,
        echo: Callable[[str], None] | None = None,
        timing_tables: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.section = section
        self.section.mode = mode
        self.out = Path(out)
        self.mode = mode
        self.seed = seed
        self.jobs: int = int(jobs)
        self.warmup: int = int(warmup)
        self.repeat: int = int(repeat)
        self.shapes: list[tuple[int, int]] | None = list(shapes) if shapes else None
        self.device = torch.device(device)
        self.timing_tables = timing_tables
        self._progress = progress
        self._echo = echo
        self._phase: Any = None  # the progress line shown while no bar of this section runs
        self._bars = 0

    @classmethod
    def of(cls, section: Section, out: Path, settings: Settings, **kwargs: Any) -> Context:
        """A context for ``section`` with the run's ``settings`` (``kwargs``: progress, echo, timing_tables)."""
        return cls(section, out, settings.mode, settings.seed, jobs=settings.jobs, warmup=settings.warmup,
                   repeat=settings.repeat, shapes=settings.shapes, device=settings.device, **kwargs)

    # -- sizes ---------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self.mode == "full"

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for the current mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    # -- progress --------------------------------------------------------------
    def phase(self, description: str) -> None:
        """Say what the section is doing now, on the progress line under the overall bar (no count)."""
        if self._progress is None:
            return
        if self._phase is None:
            self._phase = self._progress.add_task(f"  {description}", total=None)
        else:
            self._progress.update(self._phase, description=f"  {description}", visible=self._bars == 0)

    def _close_phase(self) -> None:
        if self._progress is not None and self._phase is not None:
            self._progress.remove_task(self._phase)
            self._phase = None

    def track(self, iterable: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
        """Iterate with a progress bar (rich) when the harness shows one."""
        if self._progress is None:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if self._phase is not None:
            self._progress.update(self._phase, visible=False)
        self._bars += 1
        task = self._progress.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)
            self._bars -= 1
            if self._phase is not None and self._bars == 0:
                self._progress.update(self._phase, description=f"  {self.section.name}: after {description}",
                                      visible=True)

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

    def map_ordered(self, fn: Callable[[Any], Any], items: Sequence[Any], description: str) -> list[Any]:
        """``[fn(item) for item in items]`` through :meth:`map` (worker processes with ``jobs > 1``), in order."""
        items = list(items)
        done: dict[int, Any] = {}
        for (i, _), result in self.map(_indexed, [(i, (fn, item)) for i, item in enumerate(items)], description):
            done[i] = result
        return [done[i] for i in range(len(items))]

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
        *,
        timing: bool = False,
    ) -> str:
        """Append a markdown table. ``timing=True``: it holds wall-clock times, and its caption says the
        load average when it was written, flagged when the load exceeded the cores."""
        rows = [list(r) for r in rows]
        md = markdown_table(headers, rows, floatfmt)
        if timing or self.timing_tables:
            caption = ((caption or "") + " " + load_note()).strip()
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

    def claim(self, note: str, url: str, claim: str, verdict: str, figure: str, *, split: str, seeds: Sequence[int],
              beyond: bool = False, command: str | None = None) -> Claim:
        """Record the verdict on one claim (it heads the section and goes into the report's claims table).

        A held / partly held / not held verdict never rests on the validation split: that split chose the
        settings, so a verdict read there would judge the choice on the data that made it.
        """
        if split == "validation" and verdict in VERDICTS[:3]:
            raise ValueError(f"a verdict ({verdict!r}) cannot rest on the validation split, which chose the settings; "
                             "read it on the test split")
        c = Claim(note, url, claim, verdict, figure, split, [int(s) for s in seeds], self.section.name, beyond,
                  command)
        self.section.claims.append(c)
        return c

    # -- timing ----------------------------------------------------------------
    def timeit(self, fn: Callable[[], Any], *, warmup: int | None = None,
               repeat: int | None = None) -> dict[str, float]:
        """Median (and spread) of ``repeat`` wall-clock runs of ``fn`` after ``warmup`` runs (default: the run's)."""
        return measure(fn, warmup=self.warmup if warmup is None else warmup,
                       repeat=self.repeat if repeat is None else repeat)


def _indexed(job: tuple[int, tuple[Callable[[Any], Any], Any]]) -> Any:
    _, (fn, item) = job
    return fn(item)


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


# -- the machine ----------------------------------------------------------------
def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (nan where the system has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return math.nan


def load_note() -> str:
    """The load at this moment, as a timing table's caption states it."""
    load, n = load_average(), cores()
    if math.isnan(load):
        return "(Load average unknown on this system.)"
    if load > n:
        return (f"**⚠ Measured under load:** the load average was {load:.2f} on {plural(n, 'core')}, so other "
                "processes shared the cores and these times are inflated.")
    return f"(Load average {load:.2f} on {plural(n, 'core')} when measured.)"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def bf16_gemm(n: int = 512) -> dict[str, Any]:
    """Seconds of one float32 and one bfloat16 n×n GEMM (best of 5 after a warm-up); 'fast' when bf16 ≤ float32."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
        times[str(dtype).replace("torch.", "")] = best
    return {"n": n, "float32_s": times["float32"], "bfloat16_s": times["bfloat16"],
            "fast": times["bfloat16"] <= times["float32"]}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads and whether bfloat16 matrix products are fast here."""
    return {"cpu": cpu_model(), "cores": cores(), "threads": torch.get_num_threads(), "bf16_gemm": bf16_gemm()}


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


# -- the output folder ------------------------------------------------------------
class OutputError(Exception):
    """The output folder cannot be written; the message says why in one line."""


def check_out(out: Path) -> Path:
    """Create ``out`` if needed and check that a file can be written there, before anything is computed."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"is under {parent}, which is a file"
            raise OutputError(f"--out {out} {what}, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".steepest-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"--out {out} cannot be written: {e.strerror or e}") from None
    return out


# -- running the sections and writing the report ------------------------------
def _run_one(entry: Entry, ctx: Context) -> None:
    """Run one entry into ``ctx.section``; a failure (also on import) is recorded there, not raised."""
    sec = ctx.section
    t0 = time.perf_counter()
    try:
        sec.title = entry.title
        ctx.phase(f"{entry.name}: starting")
        with thread_limit(entry.threads):
            entry.run(ctx)
    except Exception:  # a failed section is reported, the others still run
        sec.error = traceback.format_exc()
    finally:
        ctx._close_phase()
    sec.seconds = time.perf_counter() - t0


@dataclass
class RunInfo:
    """When and where one run of ``steepest reproduce``/``bench`` happened."""

    date: str
    mode: str
    seed: int
    machine: dict[str, Any]
    load_start: float
    load_end: float = math.nan
    sections: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"date": self.date, "mode": self.mode, "seed": self.seed, "machine": self.machine,
                "load_average": {"start": self.load_start, "end": self.load_end}, "sections": self.sections}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> RunInfo:
        load = r.get("load_average", {})
        return cls(r.get("date", "?"), r.get("mode", "?"), int(r.get("seed", 0)), dict(r.get("machine", {})),
                   _num(load.get("start")), _num(load.get("end")), list(r.get("sections", [])))


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def run_sections(kind: str, entries: Sequence[Entry], out: Path, settings: Settings, *, verbose: bool = False,
                 partial: bool = False, order: Sequence[str] | None = None) -> int:
    """Run ``entries`` with a progress display, write the report into ``out``; exit code 1 if any failed, else 0.

    ``kind`` is ``"reproduce"`` (report.md, results.json) or ``"bench"`` (bench.md, bench.json).
    ``partial``: only some of the registered sections run (``--only``); the other
    sections of an existing report in ``out`` are kept. ``order``: every registered
    name, the order of the sections in the report. An ``out`` that cannot be
    written is reported in one line (exit code 2) before anything runs.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        out = check_out(Path(out))
    except OutputError as e:
        print(f"steepest {kind}: {e}", file=sys.stderr)  # one line, however narrow the terminal
        return 2
    console = Console(stderr=True)
    run = RunInfo(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), settings.mode, settings.seed, machine_info(),
                  load_average(), sections=[e.name for e in entries])
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    echo = console.print if verbose else None
    sections: list[Section] = []
    n = len(entries)
    with progress:
        top = progress.add_task(f"steepest {kind} ({settings.mode})", total=n)
        for i, entry in enumerate(entries, 1):
            sec = Section(entry.name, entry.name, date=run.date)
            progress.update(top, description=f"steepest {kind} ({settings.mode}) {i}/{n}: {entry.name}")
            if not console.is_terminal:  # logs get a line per section; a terminal has the live bars
                console.print(f"{entry.name}: started ({i}/{n})")
            _run_one(entry, Context.of(sec, out, settings, progress=progress, echo=echo,
                                       timing_tables=kind == "bench"))
            if sec.error:
                console.print(f"[red]{entry.name} failed[/red]\n{sec.error}")
            sections.append(sec)
            if not console.is_terminal:
                console.print(f"{entry.name}: {'failed' if sec.error else 'done'} in {sec.seconds:.0f} s")
            progress.advance(top)
    run.load_end = load_average()
    md = write_report(kind, out, sections, settings, run=run, partial=partial, order=order)
    console.print(f"wrote {md} ({plural(len(sections), 'section')} run, {sum(s.seconds for s in sections):.0f} s)")
    failed = [s.name for s in sections if s.error]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def _link(url: str) -> str:
    return f"[{re.sub(r'^https?://', '', url).rstrip('/')}]({url})" if url else ""


def _cite(c: Claim) -> str:
    if c.beyond:
        return f"beyond the notes: {c.note} — {_link(c.url)}"
    return f"{c.note} — {_link(c.url)}"


def _verdict_line(c: Claim) -> str:
    if c.verdict == "not measured":
        line = (f"**Verdict: not measured.** {c.claim.rstrip('.')}. This run: {c.figure.rstrip('.')}. "
                f"A verdict needs `{c.command}`.")
    else:
        line = f"**Verdict: {c.verdict}.** {c.claim.rstrip('.')}. Measured: {c.figure.rstrip('.')}."
    seeds = plural(len(c.seeds), "seed") + (f" ({', '.join(map(str, c.seeds))})" if c.seeds else "")
    where = {"test": "held-out test data", "validation": "validation data (also used to choose settings)",
             "train": "training data", "none": "no data (numerics)"}[c.split]
    return line + f" *Evidence: {where}, {seeds}.*"


def _section_markdown(name: str, title: str, seconds: float, mode: str, claims: Sequence[Claim], body: str,
                      number: int | None) -> str:
    heading = f"## {number}. {title}" if number is not None else f"## {title}"
    notes = []
    for c in claims:
        cite = (f"Beyond the notes: {c.note} ([{c.url}]({c.url}))" if c.beyond else f"Note: [*{c.note}*]({c.url})")
        if cite not in notes:
            notes.append(cite)
    meta = " · ".join([*notes, f"run alone: `steepest reproduce --only {name}`" if claims else f"`{name}`",
                       f"`{mode}` mode", f"{seconds:.1f} s"])
    parts = [heading, f"> {meta}"]
    parts += [_verdict_line(c) for c in claims]
    if body:
        parts.append(body)
    return "\n\n".join(parts)


# -- reading an existing report back (for --only) -------------------------------
_BODY = "<!-- body {} -->"
_END = "<!-- end of section {} -->"


def _old_bodies(md: str, sections: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each section's body in a report written before: between this module's markers, or (older reports)
    under the heading of its title up to the next heading of the same level."""
    bodies = {}
    for name, sec in sections.items():
        start, end = md.find(_BODY.format(name)), md.find(_END.format(name))
        if start >= 0 and end > start:
            bodies[name] = md[start + len(_BODY.format(name)):end].strip()
            continue
        m = re.search(rf"^## (?:\d+\. )?{re.escape(str(sec.get('title', name)))}\n", md, flags=re.M)
        if m:
            rest = md[m.end():]
            nxt = re.search(r"^## ", rest, flags=re.M)
            text = rest[: nxt.start()] if nxt else rest
            bodies[name] = re.sub(rf"^\s*\*`{re.escape(name)}` — [^\n]*\*\s*", "", text).strip()
    return bodies


def _previous(out: Path, md_name: str, json_name: str) -> dict[str, Any] | None:
    """The results and report an earlier run left in ``out`` (None when there are none or they are unreadable)."""
    path = out / json_name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        md = (out / md_name).read_text() if (out / md_name).exists() else ""
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sections"), dict):
        return None
    data["_bodies"] = _old_bodies(md, data["sections"])
    return data


def _kept_sections(old: dict[str, Any], ran: set[str]) -> list[tuple[Section, dict[str, Any]]]:
    """The sections of an earlier report that this run did not redo, rebuilt from its files."""
    kept = []
    old_claims = [Claim.from_record(c) for c in old.get("claims", []) if isinstance(c, dict)]
    for name, data in old["sections"].items():
        if name in ran or name not in old["_bodies"]:
            continue
        sec = Section(name, str(data.get("title", name)), figures=list(data.get("figures", [])),
                      claims=[c for c in old_claims if c.section == name], seconds=_num(data.get("seconds", 0.0)),
                      error=data.get("error"), mode=str(data.get("mode", old.get("mode", "?"))),
                      date=str(data.get("date", "")))
        body = old["_bodies"][name]
        if sec.error and "**This section failed:**" in body:  # Section.body() adds it back
            body = body[: body.rfind("**This section failed:**")].strip()
        sec.blocks = [body] if body else []
        results = {k: v for k, v in data.items() if k not in RESERVED}
        kept.append((sec, {"error": data.get("error"), **results}))
    return kept


def _header(kind: str, runs: Sequence[RunInfo], settings: Settings, env: dict[str, str]) -> list[str]:
    lines = [f"# steepest {kind}"]
    for r in runs:
        m = r.machine
        bf = m.get("bf16_gemm", {})
        speed = ""
        if bf:
            n = int(bf.get("n", 512))
            t32, t16 = _num(bf.get("float32_s")), _num(bf.get("bfloat16_s"))
            ratio = t16 / t32
            flops = 2.0 * n**3 / 1e9  # one n×n product
            speed = (f"{'fast' if bf.get('fast') else 'slow'} bf16 (a {n}×{n} matrix product: float32 "
                     f"{flops / t32:.3g} GFLOP/s, bfloat16 {flops / t16:.3g} GFLOP/s, {ratio:.3g}× the time)")
        ncores = int(m.get("cores", 0) or 0)
        loads = [x for x in (r.load_start, r.load_end) if not math.isnan(x)]
        load = (f"load average {r.load_start:.2f} at start, {r.load_end:.2f} at end" if len(loads) == 2
                else "load average unknown")
        busy = bool(loads) and max(loads) > ncores > 0
        which = "" if len(runs) == 1 else f" — sections {', '.join(r.sections)}"
        if not m:  # a report written before the machine was recorded
            lines.append(f"**Run of {r.date}**{which}: `{r.mode}` mode, seed {r.seed}; the machine was not recorded.")
            continue
        lines.append(
            f"**Run of {r.date}**{which}: `{r.mode}` mode, seed {r.seed}. Machine: {m.get('cpu', '?')}, "
            f"{plural(ncores, 'core')}, {plural(int(m.get('threads', 0) or 0), 'torch thread')}, {speed}; {load}."
            + (f" **⚠ The load exceeded the {plural(ncores, 'core')}: other processes shared the machine, so "
               "wall-clock times in this report are inflated (tables of times say so where it happened).**"
               if busy else "")
        )
    lines.append("Software: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "threads") + ".")
    return lines


def _claims_table(claims: Sequence[Claim], anchors: dict[str, tuple[int, str]]) -> str:
    rows = []
    for c in claims:
        num, anchor = anchors.get(c.section, (0, ""))
        link = f"[§{num}](#{anchor})" if anchor else c.section
        verdict = f"**{c.verdict}**"
        figure = c.figure.rstrip(".")
        if c.verdict == "not measured" and c.command:
            figure += f"; a verdict needs `{c.command}`"
        rows.append([_cite(c), c.claim.rstrip("."), verdict, figure, link])
    return markdown_table(["note", "claim", "verdict", "key figure", "section"], rows)


def write_report(kind: str, out: Path, sections: Sequence[Section], settings: Settings, *, run: RunInfo | None = None,
                 partial: bool = False, order: Sequence[str] | None = None) -> Path:
    """Write ``report.md`` + ``results.json`` (``kind="reproduce"``) or ``bench.md`` + ``bench.json``; the .md path.

    ``partial``: keep the sections of an earlier report in ``out`` that ``sections``
    do not replace. PNGs the earlier report listed and the new one no longer
    references are removed.
    """
    out = Path(out)
    env = environment()
    if run is None:
        run = RunInfo(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), settings.mode, settings.seed, machine_info(),
                      load_average(), load_average(), [s.name for s in sections])
    name, data_name = ("report", "results") if kind == "reproduce" else ("bench", "bench")
    old = _previous(out, f"{name}.md", f"{data_name}.json")
    ran = {s.name for s in sections}
    all_sections: list[tuple[Section, dict[str, Any]]] = [(s, {"error": s.error, **s.results}) for s in sections]
    runs = [run]
    if partial and old is not None:
        all_sections += _kept_sections(old, ran)
        kept_names = {s.name for s, _ in all_sections} - ran
        earlier = [RunInfo.from_record(r) for r in old.get("runs", []) if isinstance(r, dict)]
        if not earlier and kept_names:  # a report from before runs were recorded
            earlier = [RunInfo(str(old.get("date", "earlier")), str(old.get("mode", "?")), int(old.get("seed", 0)),
                               {}, math.nan, math.nan, sorted(kept_names))]
        for r in earlier:
            r.sections = [s for s in r.sections if s in kept_names]
        runs = [r for r in earlier if r.sections] + [run]
    rank = {n: i for i, n in enumerate(order or [])}
    all_sections.sort(key=lambda p: rank.get(p[0].name, len(rank)))

    anchors = {}
    for i, (s, _) in enumerate(all_sections, 1):
        anchors[s.name] = (i, _anchor(f"{i}. {s.title}"))
    claims = [c for s, _ in all_sections for c in s.claims]
    head = _header(kind, runs, settings, env)
    if claims:
        notes = {c.note for c in claims if not c.beyond}
        sources = ([plural(len(notes), "note")] if notes else []) + (
            ["the comparisons this project adds"] if any(c.beyond for c in claims) else [])
        head.append(
            f"## Claims and verdicts\n\n{plural(len(claims), 'claim')} from {' and '.join(sources)}"
            + ". Each verdict — **held**, **partly held**, **not held** or **not measured** — is computed from the "
            "numbers in its section; *not measured* names the run that measures it.\n\n"
            + _claims_table(claims, anchors))
    contents = []
    for s, _ in all_sections:
        num, anchor = anchors[s.name]
        cited = "; ".join(dict.fromkeys(
            (f"beyond the notes ({c.note})" if c.beyond else f"note: *{c.note}*") for c in s.claims))
        contents.append(f"{num}. [{s.title}](#{anchor})" + (f" — {cited}" if cited else "")
                        + f" — `{s.mode}`, {s.seconds:.1f} s" + (" (failed)" if s.error else ""))
    head.append("## Contents\n\n" + "\n".join(contents))
    parts = []
    for s, _ in all_sections:
        num, _a = anchors[s.name]
        parts.append(f"<!-- section {s.name} -->\n"
                     + _section_markdown(s.name, s.title, s.seconds, s.mode, s.claims, _BODY.format(s.name), num)
                     + "\n\n" + s.body() + "\n\n" + _END.format(s.name))
    md = out / f"{name}.md"
    md.write_text("\n\n".join(head + parts) + "\n")

    modes = {s.mode for s, _ in all_sections}
    write_json(
        out / f"{data_name}.json",
        {
            "mode": modes.pop() if len(modes) == 1 else "mixed",
            "seed": settings.seed,
            "environment": env,
            "machine": run.machine,
            "load_average": {"start": run.load_start, "end": run.load_end},
            "claims": [c.record() for c in claims],
            "runs": [r.record() for r in runs],
            "sections": {
                s.name: {"title": s.title, "seconds": s.seconds, "figures": s.figures, "mode": s.mode,
                         "date": s.date, **res}
                for s, res in all_sections
            },
        },
    )
    _remove_orphans(out, old, {f for s, _ in all_sections for f in s.figures})
    return md


def _remove_orphans(out: Path, old: dict[str, Any] | None, referenced: set[str]) -> None:
    """Delete the PNGs an earlier report in ``out`` listed that the new one does not reference."""
    if old is None:
        return
    for data in old["sections"].values():
        for fig in data.get("figures", []) if isinstance(data, dict) else []:
            path = out / str(fig)
            if fig not in referenced and path.suffix == ".png" and path.parent == out and path.exists():
                path.unlink()
