"""The package's layering, read from the source: every import statement, lazy ones inside functions too.

Rules: no import cycle between modules; ``steepest.distributed`` (generic plumbing)
imports nothing from ``steepest.optim``; the library (everything but the harness
and the test support) imports neither the harness (``cli``, ``report``,
``experiments``, ``benchmarks``) nor ``steepest.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import steepest

PKG = Path(steepest.__file__).parent
HARNESS = ("steepest.cli", "steepest.report", "steepest.experiments", "steepest.benchmarks")
SUPPORT = ("steepest.testing",)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the package-internal modules it imports (anywhere in its body), from ``{module: (source, is_pkg)}``."""
    known = set(sources)
    top = next(iter(known)).split(".")[0]
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, (src, is_pkg) in sources.items():
        for node in ast.walk(ast.parse(src)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                while t and t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t.split(".")[0] == top and not mod.startswith(t + ".") and t != mod:
                    graph[mod].add(t)  # importing an ancestor package is not an edge (Python runs it first)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (each reported once, from its smallest module)."""
    found: set[tuple[str, ...]] = set()

    def dfs(start: str, node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:
                dfs(start, nxt, path + [nxt])

    for m in sorted(graph):
        dfs(m, m, [m])
    return [list(c) for c in sorted(found)]


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        in_library = not mod.startswith(HARNESS + SUPPORT) and mod != "steepest.cli"
        for d in sorted(deps):
            if mod.startswith("steepest.distributed") and d.startswith("steepest.optim"):
                out.append(f"{mod} imports {d}: distributed plumbing must not depend on the optimizers")
            if in_library and d.startswith(HARNESS + SUPPORT):
                out.append(f"{mod} imports {d}: the library must not import the harness or test support")
    return out


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {_module_name(p, PKG): (p.read_text(), p.name == "__init__.py") for p in sorted(PKG.rglob("*.py"))}


def test_no_cycles_and_no_upward_imports():
    graph = import_graph(_package_sources())
    assert "steepest.linalg" in graph["steepest.optim._matrices"]  # the reader sees relative imports
    assert cycles(graph) == []
    assert violations(graph) == []


def test_the_checks_catch_what_they_are_for():
    fake = {
        "steepest": ("", True),
        "steepest.distributed": ("def f():\n    from .optim import Muon\n", False),  # lazy and upward
        "steepest.optim": ("from ..steepest import x\nfrom . import muon\n", True),
        "steepest.optim.muon": ("from .. import distributed\n", False),
        "steepest.isotropy": ("def t():\n    from .report import markdown_table\n", False),
        "steepest.report": ("import steepest.isotropy\n", False),
    }
    graph = import_graph(fake)
    assert graph["steepest.distributed"] == {"steepest.optim"}
    assert graph["steepest.optim.muon"] == {"steepest.distributed"}
    found = cycles(graph)
    assert ["steepest.distributed", "steepest.optim", "steepest.optim.muon"] in found
    assert ["steepest.isotropy", "steepest.report"] in found
    v = violations(graph)
    assert any("steepest.distributed imports steepest.optim" in x for x in v)
    assert any("steepest.isotropy imports steepest.report" in x for x in v)


@pytest.mark.parametrize("name", ["linalg", "optim", "losses", "penalties", "isotropy", "distributed", "testing"])
def test_import_steepest_exposes_the_submodules(name):
    assert getattr(steepest, name).__name__ == f"steepest.{name}"
    assert name in dir(steepest)
