"""The ``steepest`` command line: ``reproduce``, ``bench`` and ``list``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from . import __version__

#: import name -> distribution of what ``reproduce`` and ``bench`` need beyond torch and numpy
#: (the ``reproduce`` extra in pyproject.toml)
EXTRA = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy", "rich": "rich",
         "threadpoolctl": "threadpoolctl"}
INSTALL_EXTRA = "pip install 'steepest[reproduce]'"


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

        settings = Settings(mode=args.mode, seed=args.seed, warmup=args.warmup, repeat=args.repeat, shapes=args.shapes)
    return run_sections(args.command, select(REGISTRY, args.only), args.out, settings, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
