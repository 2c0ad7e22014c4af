"""Shared pytest hooks: the fuzz battery's case count in the terminal summary."""

from __future__ import annotations

import sys
from collections import Counter


def fuzz_counts() -> Counter:
    """Generated cases per fuzz module: every ``tests/test_fuzz_*.py`` keeps a ``FUZZ`` Counter."""
    total: Counter = Counter()
    for name, mod in list(sys.modules.items()):
        counter = getattr(mod, "FUZZ", None) if name.rsplit(".", 1)[-1].startswith("test_fuzz") else None
        if isinstance(counter, Counter):
            total.update(counter)
    return total


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest's hook signature
    counts = fuzz_counts()
    if counts:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"fuzz battery: {sum(counts.values())} generated cases ({parts})")
