"""The command line: argument handling, failure reporting, and the report files."""

from __future__ import annotations

import json
import sys
import types

import pytest

from steepest import cli
from steepest.report import Context, Section, markdown_table, measure


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mclip" in out and "linalg" in out


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown name"):
        cli.main(["reproduce", "--only", "no-such-experiment", "--out", str(tmp_path)])


def test_bad_shapes_argument():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shapes", "12xa"])


def test_failing_section_is_reported_and_others_run(tmp_path, monkeypatch):
    good = types.ModuleType("steepest_test_good")
    good.TITLE = "Good one"

    def ok(ctx):
        ctx.table(["a", "b"], [[1, 0.5]])
        ctx.result("value", 3)

    good.run = ok
    bad = types.ModuleType("steepest_test_bad")
    bad.run = lambda ctx: 1 / 0
    monkeypatch.setitem(sys.modules, "steepest_test_good", good)
    monkeypatch.setitem(sys.modules, "steepest_test_bad", bad)
    monkeypatch.setattr("steepest.experiments.REGISTRY", {"bad": "steepest_test_bad", "good": "steepest_test_good"})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert "ZeroDivisionError" in data["sections"]["bad"]["error"]
    assert data["sections"]["good"]["value"] == 3
    assert "| 1 | 0.5 |" in (tmp_path / "report.md").read_text()


def test_markdown_table_and_measure():
    assert markdown_table(["x", "y"], [[1, 0.123456]]) == "| x | y |\n|---|---|\n| 1 | 0.123 |"
    calls = []
    stats = measure(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and stats["repeat"] == 3 and stats["min"] <= stats["median"] <= stats["max"]
    with pytest.raises(ValueError, match="repeat"):
        measure(lambda: None, repeat=0)


def test_context_pick_and_bad_mode(tmp_path):
    ctx = Context(Section("x", "X"), tmp_path, mode="full")
    assert ctx.pick(1, 2, 3) == 3 and ctx.full
    with pytest.raises(ValueError, match="mode"):
        Context(Section("x", "X"), tmp_path, mode="fast")


def test_reserved_result_keys(tmp_path):
    ctx = Context(Section("x", "X"), tmp_path, mode="smoke")
    with pytest.raises(ValueError, match="reserved"):
        ctx.result("seconds", 1.0)


@pytest.mark.parametrize("jobs", [1, 2])
def test_context_map_results_and_errors(tmp_path, jobs):
    import math

    ctx = Context(Section("x", "X"), tmp_path, mode="smoke", options={"jobs": jobs})
    assert ctx.jobs == jobs
    assert sorted(ctx.map(math.sqrt, [16.0, 4.0, 9.0], "roots")) == [(4.0, 2.0), (9.0, 3.0), (16.0, 4.0)]
    with pytest.raises(ValueError, match="math domain"):
        list(ctx.map(math.sqrt, [4.0, -1.0, 9.0], "roots"))


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["reproduce", "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err
