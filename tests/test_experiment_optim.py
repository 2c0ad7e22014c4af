"""The optimizer comparison's verdict and its label for diverged runs."""

from __future__ import annotations

import math

from steepest.experiments import optim as E
from steepest.experiments._protocol import interval


def test_steps_verdict_reads_the_horizon_matched_differences():
    """Muon on a 0.8× schedule minus AdamW on the full one, final test loss, paired by replicate."""
    better = interval([-0.16, -0.12, -0.15])  # the audit's horizon-matched check: 2.159 / 2.196 vs 2.319 / 2.317
    assert E.steps_verdict({"digits": better, "char-LM": better}) == "held"
    assert E.steps_verdict({"digits": interval([-0.03, 0.01, -0.02]), "char-LM": better}) == "partly held"
    assert E.steps_verdict({"digits": interval([0.03, 0.01, 0.02]), "char-LM": better}) == "partly held"
    assert E.steps_verdict({"digits": interval([0.03, 0.01, 0.02])}) == "not held"
    assert E.steps_verdict({"digits": interval([math.inf, 0.01, 0.02])}) == "not held"  # diverged
    assert E.steps_verdict({"digits": better, "char-LM": interval([-0.1])}) == "not measured"  # one char-LM seed
    assert E.steps_verdict({}) == "not measured"


def test_lr_factor_completes_every_horizon():
    for total in (240, 300, 1000):
        assert E.lr_factor(0, total) > 0 and E.lr_factor(total - 1, total) <= 1.0 / (total - int(0.7 * total)) + 1e-12
        assert max(E.lr_factor(s, total) for s in range(total)) == 1.0


def test_every_arm_has_a_grid_of_the_same_size_in_full_mode():
    from steepest.report import Context, Section

    ctx = Context(Section("optim", "o"), ".", mode="full")
    for task in ("digits", "char-LM"):
        sizes = {len(v) for v in E.grids(ctx, task).values()}
        assert len(sizes) == 1, task


def test_a_run_at_chance_or_non_finite_is_diverged():
    run = {"diverged": False, "final": 0.07}
    assert not E.diverged("digits", run)
    assert E.diverged("digits", {**run, "final": 2.303})  # no better than guessing among 10 classes
    assert not E.diverged("char-LM", {**run, "final": 2.303})  # 128 symbols: chance is log 128
    assert E.diverged("char-LM", {**run, "final": math.inf})
    assert E.diverged("digits", {**run, "diverged": True})
    assert E._fmt_final("digits", {**run, "final": 2.31}) == "diverged"


def _run(steps, val, test=None, diverged=False):
    return {"steps": steps, "val": val, "test_curve": test if test is not None else val, "diverged": diverged}


def test_steps_to_adamw_counts_each_replicate_against_its_own_adamw_final():
    steps = [0, 10, 20, 30, 40]
    arms = {"AdamW": [_run(steps, [5, 3, 2.5, 2.2, 2.0]), _run(steps, [5, 3, 2.6, 2.3, 2.1])],
            "torch.optim.Muon": [_run(steps, [5, 2.5, 2.1, 2.0, 1.9]), _run(steps, [5, 2.5, 2.2, 2.1, 2.0])],
            "Muon (steepest)": [_run(steps, [5, 2.5, 1.99, 1.9, 1.8]), _run(steps, [5, 2.0, 1.9, 1.8, 1.7])],
            "NorMuon": [_run(steps, [5, 3, 2.8, 2.5, 2.4]), _run(steps, [5, 2.09, 2.0, 1.9, 1.8])]}
    c = E.steps_to_adamw(arms)
    assert c["AdamW"] == [40, 40]
    assert c["torch.optim.Muon"] == [30, 30]  # 2.0 ≤ 2.0 on replicate 0; 2.1 ≤ 2.1 on replicate 1
    assert c["Muon (steepest)"] == [20, 10]
    assert c["NorMuon"] == [math.inf, 10]  # never reaches 2.0 on replicate 0
    arms["AdamW"][1]["diverged"] = True
    assert E.steps_to_adamw(arms)["Muon (steepest)"][1] == math.inf


def test_steps_ratio_verdict_reads_the_log_ratios_against_the_target():
    adam = [1000.0, 1000.0, 1000.0]
    fast = [450.0, 500.0, 520.0]  # about 0.49×: the whole interval below 0.6
    assert E.steps_ratio_verdict({"AdamW": adam, "Muon (steepest)": fast, "NorMuon": fast}) == "held"
    near = [500.0, 700.0, 560.0]  # mean ratio 0.59, interval across 0.6
    assert E.steps_ratio_verdict({"AdamW": adam, "Muon (steepest)": fast, "NorMuon": near}) == "partly held"
    slow = [800.0, 850.0, 900.0]
    assert E.steps_ratio_verdict({"AdamW": adam, "Muon (steepest)": slow, "NorMuon": slow}) == "not held"
    never = [450.0, math.inf, 500.0]  # one replicate never reached AdamW's final loss
    assert E.steps_ratio_verdict({"AdamW": adam, "Muon (steepest)": never, "NorMuon": never}) == "not held"
    assert E.steps_ratio_verdict({"AdamW": adam[:1], "Muon (steepest)": fast[:1], "NorMuon": fast[:1]}) == "not measured"


def test_normuon_is_an_arm_with_a_grid_and_adamw_for_the_rest():
    import torch

    from steepest.optim import NorMuon
    from steepest.report import Context, Section

    for mode in ("quick", "full"):
        g = E.grids(Context(Section("optim", "o"), ".", mode=mode), "char-LM")
        assert len(g["NorMuon"]) == len(g["AdamW"]) == len(g["Muon (steepest)"])
    torch.manual_seed(0)
    model = E.MLP(16)
    opt = E.make_optimizer("NorMuon", model, 0.02, 3e-3)
    (o,) = opt.opts
    assert isinstance(o, NorMuon)
    groups = {bool(g["use_muon"]): g for g in o.param_groups}
    assert groups[True]["lr"] == 0.02 and groups[False]["lr"] == 3e-3  # the AdamW part at AdamW's lr


def test_smoke_run_reports_normuon_and_the_steps_ratios(tmp_path):
    import json

    from steepest.cli import main

    assert main(["reproduce", "--smoke", "--only", "optim", "--out", str(tmp_path)]) == 0
    sec = json.loads((tmp_path / "results.json").read_text())["sections"]["optim"]
    assert sec["error"] is None
    for key in ("char-LM/NorMuon/lr", "digits/NorMuon/final_test_per_replicate", "charlm_steps_to_adamw",
                "charlm_steps_target", "charlm_steps_claim_intervals", "charlm_muon_steps_ratio", "claim_intervals"):
        assert key in sec, key
    assert set(sec["charlm_steps_to_adamw"]) == set(E.STEPS_ARMS)
    assert sec["charlm_steps_to_adamw"]["AdamW"]["ratio_val"] == [1.0]
