"""Benchmarks behind ``steepest bench``: each times us against a peer in the same run.

Each module defines ``TITLE``, ``THREADS`` (None: the default thread count) and
``run(ctx: steepest.report.Context)`` and prints ratio tables through ``ctx.table``;
``ctx.timeit`` gives medians after ``ctx.warmup`` runs (``--warmup`` / ``--repeat``),
``ctx.shapes`` holds ``--shapes``. Benchmarks use steepest's public API only.
Register a module here with one line.
"""

REGISTRY: dict[str, str] = {
    "linalg": "steepest.benchmarks.linalg",
    "optim": "steepest.benchmarks.optim",
    "distributed": "steepest.benchmarks.distributed",
}
