"""Every registered experiment and benchmark runs end to end in smoke mode and writes its report."""

from __future__ import annotations

import json

import pytest

from steepest.benchmarks import REGISTRY as BENCH
from steepest.cli import main
from steepest.experiments import REGISTRY as EXP


@pytest.mark.parametrize("name", list(EXP))
def test_experiment_smoke(name, tmp_path):
    assert main(["reproduce", "--smoke", "--only", name, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    section = data["sections"][name]
    assert section["error"] is None
    assert data["mode"] == "smoke"
    report = (tmp_path / "report.md").read_text()
    assert section["title"] in report
    for fig in section["figures"]:
        assert (tmp_path / fig).stat().st_size > 1000
        assert f"]({fig})" in report


@pytest.mark.parametrize("name", list(BENCH))
def test_benchmark_smoke(name, tmp_path):
    assert main(["bench", "--smoke", "--repeat", "1", "--warmup", "0", "--only", name, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["sections"][name]["error"] is None
    assert "| " in (tmp_path / "bench.md").read_text()


def test_flatnce_results_do_not_depend_on_jobs(tmp_path):
    """Runs seed themselves, so worker processes reproduce the in-process results exactly, in the same order."""
    runs = []
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        assert main(["reproduce", "--smoke", "--only", "flatnce", "--jobs", str(jobs), "--out", str(out)]) == 0
        section = json.loads((out / "results.json").read_text())["sections"]["flatnce"]
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in section["runs"]])
    assert len(runs[0]) >= 4
    assert runs[0] == runs[1]
