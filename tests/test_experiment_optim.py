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
