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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_newton_schulz(monkeypatch):
    """Pin the device decision of ``dtype="auto"`` (bf16 only where it is fast) to "not fast".

    Whether a CPU has bf16 units differs between machines; the tests of defaults must
    not. Tests of the decision itself set ``steepest.linalg._FAST_BF16`` themselves.
    """
    from steepest import linalg

    monkeypatch.setattr(linalg, "_FAST_BF16", {("cpu", None): False})
