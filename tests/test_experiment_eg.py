"""The EG experiment's verdict, on synthetic ratios."""

from __future__ import annotations

import math

from steepest.experiments import eg as E


def test_goal_verdict():
    assert E.goal_verdict({"x0.1": 0.95, "x10": 1.05}) == "held"
    assert E.goal_verdict({"x0.1": 1.1, "x10": 1.1}) == "held"  # "within 10 %" includes 10 %
    assert E.goal_verdict({"x0.1": 0.95, "x10": math.inf}) == "partly held"  # diverged counts as missed
    assert E.goal_verdict({"x0.1": 1.12, "x10": math.inf}) == "not held"
    assert E.goal_verdict({"x0.1": math.nan}) == "not held"
    assert E.goal_verdict({}) == "not measured"


def test_goal_test_uses_the_rule_chosen_on_validation():
    grid = {"EGStepSize tensor": {0.1: {"val": 0.076, "test": 0.072}}, "SGD": {0.1: {"val": 0.16, "test": 0.15}}}
    goal = {"x0.1": {"best": "EGStepSize tensor", "val": 0.076}}
    E._goal_test(grid, goal, tuned_test=0.064)
    g = goal["x0.1"]
    assert math.isclose(g["ratio_to_tuned_sgd_test"], 0.072 / 0.064) and g["within_10pct_test"] is False
    assert g["sgd_test"] == 0.15
    goal = {"x10": {"best": "EGStepSize tensor", "val": math.inf}}
    E._goal_test({"EGStepSize tensor": {10.0: {"test": math.inf}}, "SGD": {10.0: {"test": math.inf}}}, goal, 0.064)
    assert goal["x10"]["ratio_to_tuned_sgd_test"] == math.inf and not goal["x10"]["within_10pct_test"]
