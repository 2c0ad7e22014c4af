"""Experiments behind ``steepest reproduce``: one module per claim of the notes.

Each module defines ``TITLE``, ``THREADS`` (the intra-op threads it runs with,
applied by the harness; None for the default) and ``run(ctx: steepest.report.Context)``,
which measures into plain data and writes tables, figures and results through
``ctx``. To add one, write the module and register it here with one line.
"""

REGISTRY: dict[str, str] = {
    "mclip": "steepest.experiments.mclip",
    "flatnce": "steepest.experiments.flatnce",
    "eg": "steepest.experiments.eg",
    "penalties": "steepest.experiments.penalties",
    "isotropy": "steepest.experiments.isotropy",
    "optim": "steepest.experiments.optim",
}
