"""Pieces of the flatnce experiment that the numbers rest on: the split, the augmentation, the probe draws."""

from __future__ import annotations

import numpy as np
import torch

from steepest.experiments import flatnce as E


def test_split_is_fixed_stratified_and_disjoint():
    xtr, ytr, xte, yte = E.load_split()
    assert xtr.shape[1:] == (1, 8, 8) and len(xte) == E.TEST_SIZE
    assert len(xtr) + len(xte) == 1797
    # stratified: every class in both parts in proportion
    assert np.all(np.abs(np.bincount(yte) / len(yte) - np.bincount(ytr) / len(ytr)) < 0.01)
    a, b = E.load_split()[0], E.load_split()[0]
    assert torch.equal(a, b)
    # no test image appears in the training part
    tr = {bytes(x.numpy().tobytes()) for x in xtr}
    assert sum(bytes(x.numpy().tobytes()) in tr for x in xte) <= 2  # digits has a couple of exact duplicates


def test_augment_keeps_shape_and_varies_per_sample():
    x = E.load_split()[0][:200]
    g = torch.Generator().manual_seed(0)
    y1, y2 = E.augment(x, g), E.augment(x, g)
    assert y1.shape == x.shape and torch.isfinite(y1).all()
    assert (y1 - y2).abs().flatten(1).amax(1).min() > 0  # two views of every image differ
    # small perturbation: the two views stay closer to each other than to other images
    d_same = (y1 - y2).flatten(1).norm(dim=1)
    d_other = (y1 - y2.roll(1, 0)).flatten(1).norm(dim=1)
    assert d_same.mean() < 0.9 * d_other.mean()


def test_few_shot_draws_have_k_per_class():
    y = np.repeat(np.arange(10), 7)
    for k in (1, 5):
        draws = E.few_shot_draws(y, k, 4, seed=0)
        assert len(draws) == 4
        for idx in draws:
            assert len(set(idx.tolist())) == 10 * k
            assert np.all(np.bincount(y[idx], minlength=10) == k)
        assert all(np.array_equal(a, b) for a, b in zip(draws, E.few_shot_draws(y, k, 4, seed=0)))


def test_gaps_by_arm_pairs_seeds_at_the_smallest_common_batch():
    runs = []
    for arm, batches in (("fp32", (8, 16)), ("bf16", (16, 32))):
        for b in batches:
            for s in (0, 1):
                for loss, acc in (("flatnce", 70.0 + s + (b == 16) * 5), ("infonce", 68.0 + 2 * s)):
                    r = E.Run(loss, b, 0.1, s, arm)
                    r.probe = {"1-shot": acc}
                    runs.append(r)
    (b, t), gaps = E._gaps_by_arm(runs)
    assert (b, t) == (16, 0.1)
    assert gaps == {"fp32": [7.0, 6.0], "bf16": [7.0, 6.0]}
    assert E._gaps_by_arm([r for r in runs if r.precision == "fp32"]) is None


def test_advantage_verdict_from_paired_gaps():
    assert E.advantage_verdict({0.1: [6.0, 5.5, 10.4], 0.5: [0.1, 2.0, 3.6]}, True) == "held"
    assert E.advantage_verdict({0.1: [-1.0, -2.0, 0.5]}, True) == "not held"  # mean below 0
    assert E.advantage_verdict({0.1: [0.0, 0.0, 0.0]}, True) == "not held"
    assert E.advantage_verdict({0.1: [3.0, -1.0, 2.0]}, True) == "partly held"  # mean > 0, one seed worse
    assert E.advantage_verdict({0.1: [1.0, 2.0, 3.0], 0.5: [-1.0, -2.0, -3.0]}, True) == "partly held"
    assert E.advantage_verdict({0.1: [6.0, 5.5, 10.4]}, False) == "not measured"  # quick: direction only
    assert E.advantage_verdict({}, True) == "not measured"


def test_roundoff_verdict_needs_anchors_below_float32_resolution_and_a_gap_growing_as_precision_drops():
    same = {"fp32": [6.0, 5.5, 10.4], "bf16-loss": [8.5, 10.4, 2.0], "bf16": [3.9, 6.9, 5.0]}
    assert E.roundoff_verdict(0.0, same, True) == "not held"  # the stored full run's numbers
    grows = {"fp32": [1.0, 1.5, 0.5], "bf16": [6.0, 7.0, 8.0]}
    assert E.roundoff_verdict(0.2, grows, True) == "held"
    assert E.roundoff_verdict(0.0, grows, True) == "partly held"
    assert E.roundoff_verdict(0.2, same, True) == "partly held"
    assert E.roundoff_verdict(0.0, same, False) == "not measured"
    assert E.roundoff_verdict(0.0, {"fp32": [1.0]}, True) == "not measured"  # no bf16 arm to compare


def test_one_seed_has_no_spread_and_gaps_are_signed():
    assert E._fmt([62.8]) == "62.8" and E._fmt([1.0, 3.0]) == "2.0 ± 1.4"
    assert E._fmt_gap([-4.44]) == "-4.4 pp" and E._fmt_gap([-0.01]) == "+0.0 pp"
    assert E._fmt_gap([1.0, 3.0]) == "+2.0 ± 1.4 pp (2/2 seeds > 0)"
