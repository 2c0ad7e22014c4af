"""The EG experiment's choices and verdict, on synthetic runs (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steepest.experiments import eg as E
from steepest.experiments._protocol import interval


def _log(ratios):
    return interval([math.log(r) if math.isfinite(r) else math.inf for r in ratios])


def test_goal_verdict_reads_the_interval_of_the_paired_ratios():
    tight = [0.95, 0.97, 0.99, 1.0, 0.96]
    assert E.goal_verdict({"x0.1": _log(tight), "x10": _log(tight)}) == "held"
    # the audit's numbers: test ratios 1.123, 1.248, 1.005 — mean above 1.1, interval across it
    assert E.goal_verdict({"x0.1": _log([1.123, 1.248, 1.005])}) == "not held"
    assert E.goal_verdict({"x0.1": _log([1.05, 1.20, 0.98])}) == "partly held"  # mean below 1.1, interval across
    assert E.goal_verdict({"x0.1": _log(tight), "x10": _log([0.9, math.inf, 0.95])}) == "partly held"  # diverged once
    assert E.goal_verdict({"x0.1": _log([1.3, 1.4, 1.5]), "x10": _log([math.inf] * 3)}) == "not held"
    assert E.goal_verdict({"x0.1": _log([0.9])}) == "not measured"  # one replicate: direction only
    assert E.goal_verdict({}) == "not measured"


class FakeRuns:
    """E._Runs without training: each (spec, replicate) gets validation and test losses from ``loss``."""

    def __init__(self, loss, reps):
        self.loss, self.reps, self.done, self.calls = loss, reps, {}, []

    def run(self, specs, description):
        self.calls.append(description)
        for s in specs:
            for r in self.reps:
                self.done.setdefault((s, r), {"val": self.loss(s, r, "val"), "test": self.loss(s, r, "test"),
                                              "test_acc": 0.9})

    def get(self, spec, key):
        return [self.done[(spec, r)][key] for r in self.reps]


def test_choices_are_made_on_validation_and_the_claim_is_read_on_test():
    cfg = {"sgd_grid": [0.1, 0.3, 1.0], "adam_grid": [1e-3, 1e-2], "kappas": [0.01, 0.1], "bounded_kappas": [0.05, 0.1]}

    def loss(spec, rep, part):
        name, base, m, kap = spec
        lr = base * m
        if name in ("SGD", "Adam"):  # best base lr on validation: 0.3 and 0.01; test would prefer others
            best = 0.3 if name == "SGD" else 1e-2
            v = 0.1 + abs(math.log(lr / best))
            return v if part == "val" else 0.1 + abs(math.log(lr / (1.0 if name == "SGD" else 1e-3)))
        if name == "EGDD":
            return 0.5
        if name == "EGStepSize tensor":  # validation prefers κ 0.1, test κ 0.01
            good = 0.1 if part == "val" else 0.01
            return (0.105 if kap == good else 0.3) + 0.001 * rep
        if name == "EGStepSize coordinate" and m == 10.0:
            return math.inf  # diverges at ×10: never chosen
        return 0.2

    runs = FakeRuns(loss, [0, 1, 2])
    sel = E._choose_settings(runs, cfg)
    assert sel["lr_sgd"] == 0.3 and sel["lr_adam"] == 1e-2
    assert sel["kappa"]["EGStepSize tensor"] == 0.1 and sel["chosen"] == "EGStepSize tensor"
    assert sel["kappa_scores"]["EGStepSize coordinate"][0.01] == math.inf
    runs.run([E._spec(sel, n, m) for n in E.METHODS for m in (0.1, 1.0, 10.0)], "the grid")
    goal = E._goal(runs, sel)
    g = goal["x0.1"]
    assert g["best"] == "EGStepSize tensor" and g["kappa"] == 0.1
    # test losses of the validation choice: κ 0.1 is the bad one on test (0.3 + ...), tuned SGD's test 0.1 + log(1/0.3)
    sgd_test = 0.1 + abs(math.log(0.3))
    assert np.allclose(g["ratio_test_per_replicate"], [(0.3 + 0.001 * r) / sgd_test for r in range(3)])
    assert g["verdict"] == "held"  # ratios ~0.3/1.3: far below 1.1
    assert {"ratio_to_tuned_sgd", "ratio_to_tuned_sgd_test", "within_10pct", "within_10pct_test", "sgd_val",
            "sgd_test", "log_ratio_test_interval"} <= set(g)


def test_the_sgd_arm_has_as_many_candidates_as_the_eg_family():
    from steepest.report import Context, Section

    for mode in ("smoke", "quick", "full"):
        cfg = E._robustness_setup(Context(Section("eg", "eg"), ".", mode=mode))
        # the note's three granularities and its tensor rule from ν₀ small × κ; the cosine rule and EGDD from s₀
        # small × their own κ; EGDD with its published defaults
        n_eg = 4 * len(cfg["kappas"]) + 2 * len(cfg["bounded_kappas"]) + 1
        assert len(cfg["sgd_grid"]) == len(cfg["adam_grid"]) == n_eg
        assert len(set(cfg["sgd_grid"])) == n_eg
        assert set(E.MISSET) <= set(cfg["mults"])
    assert E._robustness_setup(Context(Section("eg", "eg"), ".", mode="full"))["replicates"] >= 5


def test_stretch_multipliers_are_reported_beside_the_claim_and_left_out_of_its_verdict():
    cfg = {"sgd_grid": [0.3], "adam_grid": [1e-2], "kappas": [0.1], "bounded_kappas": [0.1]}

    def loss(spec, rep, part):
        name, base, m, kap = spec
        if name == E.COSINE:
            return math.inf if m == 100.0 else 0.1 + 0.001 * rep  # diverges only in the stretch
        return 0.1 + 0.002 * rep if (name == "SGD" and m == 1.0) else 0.5

    runs = FakeRuns(loss, [0, 1, 2])
    sel = E._choose_settings(runs, cfg)
    assert sel["chosen"] == E.COSINE and sel["kappa"][E.COSINE] == 0.1
    mults = [0.01, 0.1, 1.0, 10.0, 100.0]
    runs.run([E._spec(sel, n, m) for n in E.METHODS for m in mults], "the grid")
    goal = E._goal(runs, sel, mults)
    assert list(goal) == ["x0.01", "x0.1", "x10", "x100"]
    assert [g["stretch"] for g in goal.values()] == [True, False, False, True]
    assert goal["x100"]["ratio_to_tuned_sgd_test"] == math.inf and goal["x100"]["verdict"] == "not held"
    intervals = E._claim_intervals(goal)
    assert set(intervals) == {"x0.1", "x10"}
    assert E.goal_verdict(intervals) == "held"  # the stretch's divergence does not reach the claim
    assert set(E._goal(runs, sel, [0.1, 1.0, 10.0])) == {"x0.1", "x10"}  # no stretch where it was not run


def test_adam_with_the_cosine_rule_matches_a_hand_written_loop():
    """ν ← ν·exp(γ cos(ū_{t−1}, g_t)) from ν₀, ū the running average of Adam's direction u = Δθ / (lr ν)."""
    import torch

    rng = np.random.default_rng(0)
    shapes = [(3, 2), (4,)]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(6)]
    theta = [rng.normal(size=s) for s in shapes]
    lr, gamma, nu0, beta = 0.05, 0.3, 0.01, 0.9
    ps = [torch.nn.Parameter(torch.tensor(t)) for t in theta]
    opt = E.AdamEG(ps, lr=lr, gamma=gamma, hyper=True, normalize=True, nu0=nu0, beta=beta)
    qs = [torch.nn.Parameter(torch.tensor(t)) for t in theta]
    adam = torch.optim.Adam(qs, lr=lr)
    nu, avg = nu0, [np.zeros(s) for s in shapes]
    for gs in grads:
        a, b = np.concatenate([x.ravel() for x in avg]), np.concatenate([g.ravel() for g in gs])
        den = np.linalg.norm(a) * np.linalg.norm(b)
        nu *= math.exp(gamma * (a @ b / den if den > 0 else 0.0))
        adam.param_groups[0]["lr"] = lr * nu
        before = [q.detach().clone().numpy() for q in qs]
        for q, g in zip(qs, gs):
            q.grad = torch.tensor(g)
        adam.step()
        avg = [beta * u + (1 - beta) * (b0 - q.detach().numpy()) / (lr * nu) for u, b0, q in zip(avg, before, qs)]
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g)
        opt.step()
        assert opt.nu == pytest.approx(nu, rel=1e-9)
    for p, q in zip(ps, qs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert opt.nu != nu0  # the rate moved
