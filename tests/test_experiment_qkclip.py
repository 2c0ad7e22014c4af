"""The QK-Clip experiment: its runs clip what they should, and its verdict reads the three parts."""

from __future__ import annotations

import json
import math

from steepest.experiments import qkclip as E


def test_verdict_needs_growth_a_bound_and_no_worse_loss():
    grows, bounded, same = [600.0, 450.0, 700.0], [25.0, 26.0, 25.5], [2.40, 2.41, 2.39]
    v, parts = E.verdict(grows, bounded, [2.55, 2.57, 2.52], same, tau=30.0)
    assert v == "held" and set(parts.values()) == {"held"}
    # the clipped run overshoots τ by one update's growth: the bound is not held, the claim only partly
    v, parts = E.verdict(grows, [41.0, 38.0, 44.0], [2.55, 2.57, 2.52], same, tau=30.0)
    assert parts["bounded"] == "not held" and v == "partly held"
    # worse loss with the clip, beyond the margin
    v, parts = E.verdict(grows, bounded, same, [2.50, 2.52, 2.49], tau=30.0, margin=0.01)
    assert parts["no worse"] == "not held"
    # logits that never passed τ without the clip: nothing to show
    v, parts = E.verdict([12.0, 14.0, 11.0], [12.0, 14.0, 11.0], same, same, tau=30.0)
    assert parts["grows"] == "not held"
    assert E.verdict([600.0], [29.0], [2.5], [2.4], tau=30.0)[0] == "not measured"  # one replicate


def test_runs_share_init_and_batches_and_only_the_clip_arm_clips():
    none = E.train("smoke", 8, 4, 0, None)
    clip = E.train("smoke", 8, 4, 0, 0.5)  # a τ below the logits of the first steps: every step clips
    assert len(none["max_logit"]) == len(clip["max_logit"]) == 8
    assert none["max_logit"][0] == clip["max_logit"][0]  # same initialization and batch before any clip
    assert sum(none["clipped"]) == 0 and sum(clip["clipped"]) > 0
    assert max(clip["max_logit"][1:]) < max(none["max_logit"][1:])
    assert none["steps"] == clip["steps"] == [0, 4, 8] and math.isfinite(clip["test"])
    assert E.peak(clip) == max(clip["max_logit"]) and E.peak({**clip, "diverged": True}) == math.inf


def test_smoke_reproduce_writes_the_results(tmp_path):
    from steepest.cli import main

    assert main(["reproduce", "--smoke", "--only", "qkclip", "--out", str(tmp_path)]) == 0
    sec = json.loads((tmp_path / "results.json").read_text())["sections"]["qkclip"]
    assert sec["error"] is None
    for key in ("tau", "lr", "arms", "max_logit_per_step", "claim_parts", "claim_intervals"):
        assert key in sec, key
    assert set(sec["arms"]) == set(E.ARMS) and len(sec["max_logit_per_step"]["QK-Clip"]) == 20
    assert (tmp_path / "qkclip-logits.png").stat().st_size > 1000
