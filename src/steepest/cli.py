"""The ``steepest`` command line: ``reproduce``, ``bench`` and ``list``."""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .report import Context, Section, select, thread_limit, write_json


def _environment() -> dict[str, str]:
    import torch

    return {
        "steepest": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def _run_entries(kind: str, registry: dict[str, str], args: argparse.Namespace, options: dict) -> int:
    console = Console(stderr=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = select(registry, args.only)
    sections: list[Section] = []
    failed = []
    mode = getattr(args, "mode", "quick")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    echo = console.print if args.verbose else None
    with progress:
        top = progress.add_task(f"steepest {kind} ({mode})", total=len(entries))
        for entry in entries:
            title = entry.title()
            sec = Section(entry.name, title)
            ctx = Context(sec, out, mode=mode, seed=args.seed, options=options, progress=progress, echo=echo)
            progress.update(top, description=f"steepest {kind}: {entry.name}")
            t0 = time.perf_counter()
            try:
                with thread_limit(entry.threads()):
                    entry.load()(ctx)
            except Exception:  # a failed section is reported, the others still run
                sec.error = traceback.format_exc()
                failed.append(entry.name)
                console.print(f"[red]{entry.name} failed[/red]\n{sec.error}")
            sec.seconds = time.perf_counter() - t0
            sections.append(sec)
            if not console.is_terminal:  # logs get a line per section; a terminal has the live bar
                console.print(f"{entry.name}: {'failed' if sec.error else 'done'} in {sec.seconds:.0f} s")
            progress.advance(top)

    env = _environment()
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    name = "report" if kind == "reproduce" else "bench"
    head = [
        f"# steepest {kind}",
        f"Mode `{mode}`, seed {args.seed}, {stamp}. " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "\n".join(f"- [{s.title}](#{_anchor(s.title)}) — {s.seconds:.1f} s" + (" (failed)" if s.error else "") for s in sections),
    ]
    (out / f"{name}.md").write_text("\n\n".join(head + [s.markdown() for s in sections]) + "\n")
    write_json(
        out / ("results.json" if kind == "reproduce" else "bench.json"),
        {
            "mode": mode,
            "seed": args.seed,
            "environment": env,
            "sections": {
                s.name: {"title": s.title, "seconds": s.seconds, "error": s.error, "figures": s.figures, **s.results}
                for s in sections
            },
        },
    )
    total = sum(s.seconds for s in sections)
    console.print(f"wrote {out / (name + '.md')} ({len(sections)} sections, {total:.0f} s)")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    try:
        return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes e.g. 512x512,1024x4096; got {text!r}") from None


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .benchmarks import REGISTRY as BENCH
    from .experiments import REGISTRY as EXP

    p = argparse.ArgumentParser(prog="steepest", description=__doc__)
    p.add_argument("--version", action="version", version=f"steepest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="run the experiments behind every claim of the notes; write a report")
    r.add_argument("--out", default="steepest-report", help="output folder (default: %(default)s)")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="full-size runs (long)")
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny sizes, for tests")
    r.set_defaults(mode="quick")
    r.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(EXP)}")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "-j", "--jobs", type=_positive_int, default=1,
        help="worker processes for experiments made of independent runs (flatnce); results do not depend on it "
        "(default: %(default)s; 2 on a 2-core machine nearly halves the flatnce runs)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="echo tables to the console")

    b = sub.add_parser("bench", help="time steepest against its peers in one run; print ratio tables")
    b.add_argument("--out", default="steepest-bench", help="output folder (default: %(default)s)")
    b.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(BENCH)}")
    b.add_argument("--repeat", type=int, default=5, help="timed runs per case; the median is reported")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    b.add_argument("--shapes", type=_parse_shapes, default=None, help="matrix shapes, e.g. 512x512,1024x4096")
    b.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny sizes, for tests")
    b.set_defaults(mode="quick")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("-v", "--verbose", action="store_true", default=True, help=argparse.SUPPRESS)

    sub.add_parser("list", help="list the registered experiments and benchmarks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        from .benchmarks import REGISTRY as BENCH
        from .experiments import REGISTRY as EXP

        print("experiments:", ", ".join(EXP))
        print("benchmarks: ", ", ".join(BENCH))
        return 0
    if args.command == "reproduce":
        from .experiments import REGISTRY

        return _run_entries("reproduce", REGISTRY, args, {"jobs": args.jobs})
    from .benchmarks import REGISTRY

    options = {"repeat": args.repeat, "warmup": args.warmup}
    if args.shapes:
        options["shapes"] = args.shapes
    return _run_entries("bench", REGISTRY, args, options)


if __name__ == "__main__":
    sys.exit(main())
