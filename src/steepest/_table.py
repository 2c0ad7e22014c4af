"""Plain-text tables: the one formatting helper the library itself may use (no harness imports)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table"]


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
