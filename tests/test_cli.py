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


# -- the help, the list ---------------------------------------------------------------------------------------
def _help(argv):
    p = _python(f"import sys; from steepest.cli import main; sys.exit(main({argv!r}))")
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_help_is_plain_text_and_names_the_notes():
    from steepest.experiments import SOURCES

    text = _help(["--help"])
    assert "``" not in text and ":func:" not in text  # no reStructuredText markup
    for src in SOURCES.values():
        assert src.title in text and src.url in text
    for command in ("reproduce", "bench", "list"):
        assert command in text


@pytest.mark.parametrize("command", ["reproduce", "bench"])
def test_every_option_has_help_with_its_default(command):
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert sub.description, f"`steepest {command} --help` needs a description"
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and "default" in action.help, action.option_strings
    text = _help([command, "--help"])
    assert "%(default)" not in text and "(default: " in text


def test_jobs_help_names_every_parallel_experiment():
    text = _help(["reproduce", "--help"])
    for name in cli.PARALLEL:
        assert name in text
    assert "(flatnce)" not in text


def test_plurals():
    from steepest.report import plural

    assert plural(1, "section") == "1 section" and plural(2, "section") == "2 sections"
    assert plural(0, "seed") == "0 seeds"


def test_list_counts_with_plurals_and_names_the_notes(capsys, monkeypatch):
    monkeypatch.setattr("steepest.benchmarks.REGISTRY", {"only": "x"})
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    from steepest.experiments import REGISTRY

    assert f"{len(REGISTRY)} experiments" in out and "1 benchmark " in out and "1 benchmarks" not in out
    assert "https://kexue.fm/archives/11006" in out


# -- fake experiments for the harness -----------------------------------------------------------------------
def _fake(monkeypatch, name, run, title=None):
    mod = types.ModuleType(f"steepest_test_{name}")
    mod.TITLE = title or f"Experiment {name}"
    mod.run = run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def _figure(ctx, stem):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ctx.figure(fig, stem, f"plot {stem}")


def _experiment(tag, stem=None, verdict="held"):
    def run(ctx):
        ctx.text(f"body of {ctx.section.name} ({tag})")
        ctx.table(["x"], [[1]])
        ctx.result("tag", tag)
        _figure(ctx, stem or tag)
        if verdict is None:  # no claim: only what every version of the harness offers
            return
        ctx.claim(f"Note {ctx.section.name}", f"https://example.org/{ctx.section.name}", "a claim", verdict,
                  f"figure {tag}", split="none", seeds=[ctx.seed],
                  command="steepest reproduce --full" if verdict == "not measured" else None)
    return run


def _registry(monkeypatch, runs):
    reg = {name: _fake(monkeypatch, name, run) for name, run in runs.items()}
    monkeypatch.setattr("steepest.experiments.REGISTRY", reg)
    return reg


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


# -- --out is checked before anything runs ------------------------------------------------------------------
def _unwritable_dir(tmp_path):
    """An existing folder this process cannot write into, or None (root ignores chmod)."""
    from pathlib import Path

    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_text("")
    except OSError:
        return d
    (d / "probe").unlink()
    for candidate in (Path("/sys"), Path("/proc")):  # existing folders no one may write into, root included
        if candidate.is_dir():
            try:
                (candidate / "steepest-probe").write_text("")
            except OSError:
                return candidate
            (candidate / "steepest-probe").unlink()
    return None


@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_bad_out_is_one_line_and_exit_2_before_any_compute(tmp_path, monkeypatch, capsys, case):
    ran = []
    _registry(monkeypatch, {"a": lambda ctx: ran.append(1)})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if case == "file":
        out = blocker
    elif case == "under a file":
        out = blocker / "report"
    else:
        out = _unwritable_dir(tmp_path)  # exists, so only a write shows the problem
        if out is None:
            pytest.skip("no folder is unwritable for this user")
    code = cli.main(["reproduce", "--smoke", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert ran == []  # nothing was computed
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "--out" in err and str(out) in err


# -- the report: header, claims, sections -------------------------------------------------------------------
def test_report_opens_with_the_machine_and_the_claims_table(tmp_path, monkeypatch):
    _registry(monkeypatch, {"a": _experiment("1"), "b": _experiment("2", verdict="not measured")})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    head = md[: md.index("## Contents")]
    from steepest.report import cpu_model

    assert cpu_model() in head and "core" in head and "bf16" in head and "load average" in head
    assert "| note | claim | verdict | key figure | section |" in head
    assert "[Note a — example.org/a](https://example.org/a)" not in head  # the link is on the address
    assert "Note a — [example.org/a](https://example.org/a)" in head
    assert "**not measured**" in head and "`steepest reproduce --full`" in head
    assert "[§1](#1-experiment-a)" in head and "## 1. Experiment a" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert [c["section"] for c in data["claims"]] == ["a", "b"]
    first = data["claims"][0]
    assert {"note", "claim", "verdict", "figure", "evidence", "section"} <= set(first)
    assert first["evidence"] == {"split": "none", "seeds": [0]} and first["verdict"] == "held"
    assert set(data["machine"]) >= {"cpu", "cores", "threads", "bf16_gemm"}
    assert isinstance(data["machine"]["bf16_gemm"]["fast"], bool)
    assert set(data["load_average"]) == {"start", "end"}


def test_claims_take_only_the_four_verdicts(tmp_path):
    ctx = Context(Section("x", "X"), tmp_path, mode="smoke")
    for bad in ("holds", "met", "NOT HELD", ""):
        with pytest.raises(ValueError, match="verdict"):
            ctx.claim("n", "u", "c", bad, "f", split="none", seeds=[0])
    with pytest.raises(ValueError, match="split"):
        ctx.claim("n", "u", "c", "held", "f", split="val", seeds=[0])
    with pytest.raises(ValueError, match="command"):
        ctx.claim("n", "u", "c", "not measured", "f", split="test", seeds=[0])


def test_timing_tables_say_when_the_load_exceeded_the_cores(tmp_path, monkeypatch):
    from steepest import report

    def run(ctx):
        ctx.table(["ms"], [[1.0]], caption="Times.", timing=True)
        ctx.table(["x"], [[1.0]], caption="Not times.")

    _registry(monkeypatch, {"a": run})
    monkeypatch.setattr(report, "load_average", lambda: 99.0)
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.count("Measured under load") == 1
    assert "Times. **⚠ Measured under load:** the load average was 99.00" in md
    assert "The load exceeded the" in md  # the header too
    monkeypatch.setattr(report, "load_average", lambda: 0.5)
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Measured under load" not in md and "(Load average 0.50 on" in md


# -- --only updates an existing report ----------------------------------------------------------------------
def test_only_updates_its_sections_inside_an_existing_report(tmp_path, monkeypatch):
    _registry(monkeypatch, {"a": _experiment("first", stem="x", verdict=None), "b": _experiment("b1", verdict=None)})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    assert _pngs(tmp_path) == ["a-x.png", "b-b1.png"]
    _registry(monkeypatch, {"a": _experiment("second", stem="y", verdict=None), "b": _experiment("b2", verdict=None)})
    assert cli.main(["reproduce", "--smoke", "--only", "a", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sections"]["a"]["tag"] == "second" and data["sections"]["b"]["tag"] == "b1"  # b kept, not rerun
    assert "body of a (second)" in md and "body of a (first)" not in md and "body of b (b1)" in md
    assert md.index("Experiment a\n") < md.index("Experiment b\n")
    assert _pngs(tmp_path) == ["a-y.png", "b-b1.png"]  # a's old plot removed, b's kept
    for png in _pngs(tmp_path):
        assert f"]({png})" in md  # no orphaned plots
    assert md.count("body of b (b1)") == 1
    # and again: the kept section survives a second round trip unchanged
    assert cli.main(["reproduce", "--smoke", "--only", "a", "--out", str(tmp_path)]) == 0
    md2 = (tmp_path / "report.md").read_text()
    assert md2.count("body of b (b1)") == 1 and md2.count("| 1 |") == 2
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["sections"] for r in runs] == [["b"], ["a"]]


def test_only_keeps_the_other_sections_claims(tmp_path, monkeypatch):
    _registry(monkeypatch, {"a": _experiment("first"), "b": _experiment("b1", verdict="partly held")})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    _registry(monkeypatch, {"a": _experiment("second"), "b": _experiment("b2")})
    assert cli.main(["reproduce", "--smoke", "--only", "a", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(c["figure"], c["verdict"]) for c in data["claims"]] == [("figure second", "held"),
                                                                     ("figure b1", "partly held")]
    md = (tmp_path / "report.md").read_text()
    head = md[: md.index("## Contents")]
    assert "figure b1" in head and "figure first" not in md
    assert md.index("## 1. Experiment a") < md.index("## 2. Experiment b")
    assert "**Verdict: partly held.**" in md


def test_only_keeps_sections_of_a_report_in_the_earlier_layout(tmp_path, monkeypatch):
    """A report.md written before the section markers: sections are found under their headings."""
    (tmp_path / "b-old.png").write_bytes(b"png")
    (tmp_path / "a-old.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text(
        "# steepest reproduce\n\nMode `quick`, seed 0.\n\n- [Experiment a](#experiment-a) — 1.0 s\n\n"
        "## Experiment a\n\n*`a` — 1.0 s*\n\nold a body\n\n![p](a-old.png)\n\n"
        "## Experiment b\n\n*`b` — 2.0 s*\n\nold b body with ## inside\n\n![p](b-old.png)\n")
    (tmp_path / "results.json").write_text(json.dumps({
        "mode": "quick", "seed": 0, "environment": {}, "sections": {
            "a": {"title": "Experiment a", "seconds": 1.0, "error": None, "figures": ["a-old.png"]},
            "b": {"title": "Experiment b", "seconds": 2.0, "error": None, "figures": ["b-old.png"], "kept": 1}}}))
    _registry(monkeypatch, {"a": _experiment("new", verdict=None), "b": _experiment("b-not-run", verdict=None)})
    assert cli.main(["reproduce", "--smoke", "--only", "a", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert "old b body with ## inside" in md and "](b-old.png)" in md and "old a body" not in md
    assert data["sections"]["b"]["kept"] == 1
    assert _pngs(tmp_path) == ["a-new.png", "b-old.png"]
    assert "sections b: `quick` mode, seed 0; the machine was not recorded." in md


def test_a_full_run_replaces_the_report_and_removes_plots_no_longer_made(tmp_path, monkeypatch):
    _registry(monkeypatch, {"a": _experiment("1", stem="x", verdict=None), "b": _experiment("2", verdict=None)})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    _registry(monkeypatch, {"a": _experiment("3", stem="z", verdict=None), "b": _experiment("4", verdict=None)})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    assert _pngs(tmp_path) == ["a-z.png", "b-4.png"]
    (tmp_path / "mine.png").write_bytes(b"")  # a file the report never listed is left alone
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path)]) == 0
    assert "mine.png" in _pngs(tmp_path)


# -- progress ------------------------------------------------------------------------------------------------
def test_progress_shows_a_line_for_the_section_between_its_bars(tmp_path):
    from rich.progress import Progress

    progress = Progress()
    ctx = Context(Section("x", "X"), tmp_path, mode="smoke", progress=progress)
    ctx.phase("x: starting")
    (phase,) = progress.tasks
    assert phase.visible and phase.description == "  x: starting"
    for _ in ctx.track([1, 2], "inner"):
        assert not phase.visible and len(progress.tasks) == 2
    assert phase.visible and "after inner" in phase.description
    ctx.phase("x: timing")
    assert phase.description == "  x: timing"
    ctx._close_phase()
    assert progress.tasks == []


def test_claims_header_counts_notes_and_comparisons(tmp_path, monkeypatch):
    def beyond(ctx):
        ctx.claim("a comparison", "https://example.org/c", "a claim", "held", "fig", split="none", seeds=[0],
                  beyond=True)

    _registry(monkeypatch, {"c": beyond})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path / "only-beyond")]) == 0
    md = (tmp_path / "only-beyond" / "report.md").read_text()
    assert "1 claim from the comparisons this project adds." in md and "0 notes" not in md
    _registry(monkeypatch, {"a": _experiment("x"), "c": beyond})
    assert cli.main(["reproduce", "--smoke", "--out", str(tmp_path / "both")]) == 0
    assert "2 claims from 1 note and the comparisons this project adds." in (tmp_path / "both" / "report.md").read_text()
