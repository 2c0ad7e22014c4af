"""The command line: argument handling, failure reporting, and the report files."""

from __future__ import annotations

import json
import subprocess
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

    ctx = Context(Section("x", "X"), tmp_path, mode="smoke", jobs=jobs)
    assert ctx.jobs == jobs
    assert sorted(ctx.map(math.sqrt, [16.0, 4.0, 9.0], "roots")) == [(4.0, 2.0), (9.0, 3.0), (16.0, 4.0)]
    with pytest.raises(ValueError, match="math domain"):
        list(ctx.map(math.sqrt, [4.0, -1.0, 9.0], "roots"))


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["reproduce", "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err


def test_context_options_are_typed_fields_with_the_cli_defaults(tmp_path):
    ctx = Context(Section("x", "X"), tmp_path)
    assert (ctx.mode, ctx.seed, ctx.jobs, ctx.warmup, ctx.repeat, ctx.shapes) == ("quick", 0, 1, 1, 5, None)
    defaults = cli.build_parser().parse_args(["bench"])
    assert (defaults.warmup, defaults.repeat, defaults.shapes) == (ctx.warmup, ctx.repeat, ctx.shapes)
    assert cli.build_parser().parse_args(["reproduce"]).jobs == ctx.jobs
    calls = []
    stats = Context(Section("x", "X"), tmp_path, warmup=2, repeat=3).timeit(lambda: calls.append(1))
    assert len(calls) == 5 and stats["repeat"] == 3
    with pytest.raises(ValueError, match="jobs"):
        Context(Section("x", "X"), tmp_path, jobs=0)


def test_bench_options_reach_the_context(tmp_path, monkeypatch):
    seen = {}
    mod = types.ModuleType("steepest_test_bench")
    mod.run = lambda ctx: seen.update(warmup=ctx.warmup, repeat=ctx.repeat, shapes=ctx.shapes, mode=ctx.mode)
    monkeypatch.setitem(sys.modules, "steepest_test_bench", mod)
    monkeypatch.setattr("steepest.benchmarks.REGISTRY", {"fake": "steepest_test_bench"})
    argv = ["bench", "--smoke", "--warmup", "0", "--repeat", "2", "--shapes", "8x4,2X3", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert seen == {"warmup": 0, "repeat": 2, "shapes": [(8, 4), (2, 3)], "mode": "smoke"}
    assert json.loads((tmp_path / "bench.json").read_text())["sections"]["fake"]["title"] == "fake"


@pytest.mark.parametrize("text", ["12xa", "512", "2x3x4", ""])
def test_shapes_must_be_pairs(text):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--shapes", text])


def test_entry_imports_its_module_once(monkeypatch):
    from steepest import report

    mod = types.ModuleType("steepest_test_once")
    mod.TITLE, mod.THREADS, mod.run = "Once", 1, lambda ctx: "ran"
    monkeypatch.setitem(sys.modules, "steepest_test_once", mod)
    calls = []
    real = report.importlib.import_module
    monkeypatch.setattr(report.importlib, "import_module", lambda name: calls.append(name) or real(name))
    entry = report.Entry("once", "steepest_test_once")
    assert (entry.title, entry.threads, entry.run(None)) == ("Once", 1, "ran")
    assert calls == ["steepest_test_once"]


def test_a_module_that_fails_to_import_is_a_failed_section(tmp_path, monkeypatch):
    monkeypatch.setattr("steepest.experiments.REGISTRY", {"gone": "steepest_test_no_such_module"})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 1
    section = json.loads((tmp_path / "results.json").read_text())["sections"]["gone"]
    assert "ModuleNotFoundError" in section["error"] and section["title"] == "gone"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, blocked", [("reproduce", "matplotlib"), ("bench", "sklearn"), ("reproduce", "rich")])
def test_without_the_reproduce_extra_one_line_says_what_to_install(tmp_path, command, blocked):
    """As if the extra were not installed: None in sys.modules makes any import of the module fail."""
    out = tmp_path / "out"
    p = _python(f"import sys; sys.modules[{blocked!r}] = None; from steepest.cli import main; "
                f"sys.exit(main([{command!r}, '--out', {str(out)!r}]))")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert cli.INSTALL_EXTRA in lines[0] and cli.EXTRA[blocked] in lines[0]
    assert not out.exists()


def test_the_library_needs_only_torch_and_numpy():
    """`import steepest` and its numerical modules work with every harness dependency missing, and `list` too."""
    blocked = ["matplotlib", "sklearn", "scipy", "rich", "threadpoolctl"]
    p = _python(
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "import steepest, steepest.linalg, steepest.optim, steepest.losses, steepest.penalties, steepest.isotropy\n"
        "from steepest.cli import main\nsys.exit(main(['list']))"
    )
    assert p.returncode == 0, p.stderr
    assert "mclip" in p.stdout
    p = _python("import sys, steepest\n"
                "print(sorted(m for m in ('matplotlib', 'sklearn', 'scipy', 'rich') if m in sys.modules))")
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
