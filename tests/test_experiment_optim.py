"""The optimizer comparison's verdict and its label for diverged runs."""

from __future__ import annotations

import math

from steepest.experiments import optim as E


def test_steps_verdict():
    assert E.steps_verdict({"digits": 0.75, "char-LM": 0.65}) == "held"
    assert E.steps_verdict({"digits": 0.85, "char-LM": 0.65}) == "partly held"
    assert E.steps_verdict({"digits": math.nan, "char-LM": 0.9}) == "not held"  # nan: not reached
    assert E.steps_verdict({"digits": 0.8}) == "held"
    assert E.steps_verdict({}) == "not measured"


def test_a_run_at_chance_or_non_finite_is_diverged():
    run = {"diverged": False, "final": 0.07}
    assert not E.diverged("digits", run)
    assert E.diverged("digits", {**run, "final": 2.303})  # no better than guessing among 10 classes
    assert not E.diverged("char-LM", {**run, "final": 2.303})  # 128 symbols: chance is log 128
    assert E.diverged("char-LM", {**run, "final": math.inf})
    assert E.diverged("digits", {**run, "diverged": True})
    assert E._fmt_final("digits", {**run, "final": 2.31}) == "diverged"
