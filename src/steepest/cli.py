"""The ``steepest`` command line: ``reproduce``, ``bench`` and ``list``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
from collections.abc import Sequence

from . import __version__

#: import name -> distribution of what ``reproduce`` and ``bench`` need beyond torch and numpy
#: (the ``reproduce`` extra in pyproject.toml)
EXTRA = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy", "rich": "rich",
         "threadpoolctl": "threadpoolctl"}
INSTALL_EXTRA = "pip install 'steepest[reproduce]'"
#: experiments whose independent runs ``--jobs`` spreads over worker processes
PARALLEL = ("flatnce", "eg", "penalties", "isotropy")


def missing_extra() -> list[str]:
    """The distributions of :data:`EXTRA` that cannot be imported here."""
    missing = []
    for module, dist in EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed install counts as missing
            found = False
        if not found:
            missing.append(dist)
    return missing


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes takes e.g. 512x512,1024x4096; got {text!r}")
    return shapes  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def _nonnegative_int(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return n


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _notes_text() -> str:
    """Two lines per experiment: its name and the note it reproduces (or what it tests beyond them), the address."""
    from .experiments import REGISTRY, SOURCES

    width = max(map(len, REGISTRY))
    lines = []
    for name in REGISTRY:
        src = SOURCES.get(name)
        if src is None:
            lines.append(f"  {name}")
            continue
        if src.beyond:
            lines.append(f"  {name:<{width}}  beyond the notes: {src.topic}")
            lines.append(f"  {'':<{width}}  Muon after {src.short}, {src.title}")
            lines.append(f"  {'':<{width}}  {src.url}")
        else:
            lines.append(f"  {name:<{width}}  {src.title}")
            lines.append(f"  {'':<{width}}  {src.url}")
    return "\n".join(lines)


DESCRIPTION = """\
steepest: optimization geometry for PyTorch. `steepest reproduce` tests the claims of five technical
notes by Jianlin Su (kexue.fm), one experiment each, plus one comparison beyond them:

{notes}

and writes a report that opens with the table of claims and verdicts (held, partly held, not held,
not measured). `steepest bench` times the library against its peers. Run `steepest COMMAND --help`
for a command's options."""

REPRODUCE = """\
Run the experiments (all, or those named with --only) and write into --out: report.md (the machine it
ran on, a table of the notes' claims and verdicts, then one section per experiment), one PNG per
figure, and results.json (every number, and the verdicts under "claims").

Modes: quick (the default; about 13 minutes on 2 idle cores) gives a verdict where its sizes are
evidence and says "not measured", with the command that measures it, where they are not; --full runs
the full-size experiments (long: FlatNCE alone takes about 90 minutes on 2 cores with --jobs 2);
--smoke runs tiny sizes that only exercise the code, for the tests.

With --only, an existing report in --out is updated: the sections run are replaced, the others kept.

experiments:
{notes}"""

BENCH = """\
Time steepest against its peers in the same run (torch.linalg, torch.optim.Muon, AdamW, ...) and write
bench.md and bench.json into --out: ratio tables, each with the load average of the machine when it
was measured. Benchmarks: {names}."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; wide enough for the option help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)
        self._action_max_length = 14  # the commands' help starts in one column, after "reproduce"


def build_parser() -> argparse.ArgumentParser:
    from .benchmarks import REGISTRY as BENCH_REGISTRY
    from .experiments import REGISTRY as EXP

    notes = _notes_text()
    p = argparse.ArgumentParser(prog="steepest", description=DESCRIPTION.format(notes=notes), formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"steepest {__version__}")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    r = sub.add_parser("reproduce", help="test the notes' claims and write a report (report.md, PNGs, results.json)",
                       description=REPRODUCE.format(notes=notes), formatter_class=_Formatter)
    r.add_argument("--out", default="steepest-report", metavar="DIR",
                   help="folder for report.md, the PNGs and results.json (default: %(default)s)")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="full-size runs, the evidence for every verdict (long; default: quick mode)")
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes that only exercise the code, for the tests (default: quick mode)")
    r.set_defaults(mode="quick")
    r.add_argument("--only", nargs="+", metavar="NAME",
                   help=f"run only these experiments and update their sections in an existing report: "
                        f"{', '.join(EXP)} (default: all)")
    r.add_argument("--seed", type=int, default=0,
                   help="base random seed of every experiment; the published numbers use 0 (default: %(default)s)")
    r.add_argument(
        "-j", "--jobs", type=_positive_int, default=1, metavar="N",
        help=f"worker processes for the experiments made of independent runs ({', '.join(PARALLEL)}); results do "
        "not depend on N, times are measured in the main process; 2 on a 2-core machine nearly halves those "
        "experiments (default: %(default)s)",
    )
    r.add_argument("-v", "--verbose", action="store_true",
                   help="also print every table to the console (default: off)")

    b = sub.add_parser("bench", help="time steepest against its peers; write ratio tables (bench.md, bench.json)",
                       description=BENCH.format(names=", ".join(BENCH_REGISTRY)), formatter_class=_Formatter)
    b.add_argument("--out", default="steepest-bench", metavar="DIR",
                   help="folder for bench.md and bench.json (default: %(default)s)")
    b.add_argument("--only", nargs="+", metavar="NAME",
                   help=f"run only these benchmarks: {', '.join(BENCH_REGISTRY)} (default: all)")
    b.add_argument("--repeat", type=_positive_int, default=5, metavar="N",
                   help="timed runs per case; the median is reported (default: %(default)s)")
    b.add_argument("--warmup", type=_nonnegative_int, default=1, metavar="N",
                   help="untimed runs before timing a case (default: %(default)s)")
    b.add_argument("--shapes", type=_parse_shapes, default=None, metavar="MxN,...",
                   help="matrix shapes to time, e.g. 512x512,1024x4096 (default: each benchmark's own)")
    b.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                   help="tiny sizes that only exercise the code, for the tests (default: quick sizes)")
    b.set_defaults(mode="quick")
    b.add_argument("--seed", type=int, default=0, help="random seed of the timed inputs (default: %(default)s)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the timed tensors live (default: %(default)s)")
    b.add_argument("-v", "--verbose", action="store_true", default=True, help=argparse.SUPPRESS)

    sub.add_parser("list", help="list the experiments (with their notes) and the benchmarks",
                   description="List the experiments, the note each reproduces, and the benchmarks.",
                   formatter_class=_Formatter)
    return p


def _list() -> int:
    from .benchmarks import REGISTRY as BENCH_REGISTRY
    from .experiments import REGISTRY as EXP

    print(f"{_plural(len(EXP), 'experiment')} (steepest reproduce --only NAME):")
    print(_notes_text())
    print(f"{_plural(len(BENCH_REGISTRY), 'benchmark')} (steepest bench --only NAME): {', '.join(BENCH_REGISTRY)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list()
    missing = missing_extra()
    if missing:  # checked before anything imports them: one line, not a traceback
        print(f"steepest {args.command} needs {', '.join(missing)}: {INSTALL_EXTRA}", file=sys.stderr)
        return 2

    from .report import Settings, run_sections, select

    if args.command == "reproduce":
        from .experiments import REGISTRY

        settings = Settings(mode=args.mode, seed=args.seed, jobs=args.jobs)
    else:
        from .benchmarks import REGISTRY

        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("steepest bench --device cuda: this torch sees no CUDA device; run on a GPU machine or use "
                  "--device cpu", file=sys.stderr)
            return 2
        settings = Settings(mode=args.mode, seed=args.seed, warmup=args.warmup, repeat=args.repeat, shapes=args.shapes,
                            device=args.device)
    entries = select(REGISTRY, args.only)
    return run_sections(args.command, entries, args.out, settings, verbose=args.verbose,
                        partial=len(entries) < len(REGISTRY), order=list(REGISTRY))


if __name__ == "__main__":
    sys.exit(main())
