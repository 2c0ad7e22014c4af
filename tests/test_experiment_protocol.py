"""The protocol every learning experiment shares: the three-way split, selection, intervals, verdict words."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steepest.experiments import _data
from steepest.experiments import _protocol as P


# -- intervals --------------------------------------------------------------------------------------------------
def test_interval_matches_scipy_t():
    from scipy import stats

    vals = [1.2, 0.4, 2.9, 1.7, -0.3]
    iv = P.interval(vals)
    assert iv.n == 5 and math.isclose(iv.mean, np.mean(vals)) and math.isclose(iv.sd, np.std(vals, ddof=1))
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(vals), scale=stats.sem(vals))
    assert math.isclose(iv.lo, lo) and math.isclose(iv.hi, hi)
    assert math.isclose(iv.p, stats.ttest_1samp(vals, 0.0).pvalue)
    assert iv.above == 4


def test_interval_of_one_value_has_no_spread_and_a_diverged_run_is_not_averaged_away():
    one = P.interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.sd) and math.isnan(one.p) and math.isnan(one.lo) and math.isnan(one.hi)
    bad = P.interval([0.1, math.inf, 0.2])
    assert bad.mean == math.inf and not bad.finite and bad.lo == bad.hi == math.inf
    assert P.interval([]).n == 0 and math.isnan(P.interval([]).mean)


def test_paired_log_ratios():
    iv = P.paired([1.1, 2.2, 0.9], [1.0, 2.0, 1.0], log=True)
    assert np.allclose(iv.values, np.log([1.1, 1.1, 0.9]))
    assert P.paired([math.inf], [1.0], log=True).values == (math.inf,)  # the challenger diverged
    assert P.paired([1.0], [1.0], log=True).values == (0.0,)
    with pytest.raises(ValueError, match="same replicates"):
        P.paired([1.0, 2.0], [1.0])


# -- verdict words ----------------------------------------------------------------------------------------------
def test_outcome_reads_the_interval():
    assert P.outcome(P.interval([2.0, 2.5, 3.0, 2.2]), above=0.0) == "held"  # whole interval above
    assert P.outcome(P.interval([3.0, -1.0, 2.0]), above=0.0) == "partly held"  # mean above, interval across
    assert P.outcome(P.interval([-1.0, -2.0, 0.5]), above=0.0) == "not held"
    assert P.outcome(P.interval([0.0, 0.0, 0.0]), above=0.0) == "not held"  # "above" is strict
    assert P.outcome(P.interval([0.05, 0.02, 0.04]), below=math.log(1.1)) == "held"
    assert P.outcome(P.interval([0.05, math.inf, 0.04]), below=math.log(1.1)) == "not held"  # a diverged replicate
    assert P.outcome(P.interval([1.0, 2.0]), above=0.0) == "not measured"  # fewer than MIN_SEEDS
    assert P.outcome(P.interval([5.0]), above=0.0) == "not measured"
    with pytest.raises(ValueError):
        P.outcome(P.interval([1.0, 2.0, 3.0]))


def test_combine():
    assert P.combine(["held", "held"]) == "held"
    assert P.combine(["not held", "not held"]) == "not held"
    assert P.combine(["held", "not held"]) == "partly held"
    assert P.combine(["partly held", "partly held"]) == "partly held"
    assert P.combine(["held", "not measured"]) == "not measured"
    assert P.combine([]) == "not measured"


def test_holm_step_down():
    adj = P.holm([0.01, 0.04, 0.03, math.nan, 0.005])
    # sorted: 0.005×4 = 0.02, 0.01×3 = 0.03, 0.03×2 = 0.06, 0.04×1 → max(0.06, 0.04) = 0.06
    assert np.allclose([adj[4], adj[0], adj[2], adj[1]], [0.02, 0.03, 0.06, 0.06])
    assert math.isnan(adj[3])
    assert P.holm([0.6, 0.9]) == [1.0, 1.0]


# -- selection --------------------------------------------------------------------------------------------------
def test_choose_lowest_first_on_ties_and_never_a_diverged_setting():
    assert P.choose({0.1: 0.5, 0.3: 0.2, 1.0: 0.2}) == 0.3
    assert P.choose({0.1: math.nan, 0.3: 0.9}) == 0.3
    assert P.choose({"a": math.inf, "b": math.inf}) == "a"
    assert P.choose({"a": 60.0, "b": 71.0, "c": -math.inf}, higher=True) == "b"
    assert P.mean_or_inf([0.1, 0.3]) == pytest.approx(0.2)
    assert P.mean_or_inf([0.1, math.inf]) == math.inf and P.mean_or_inf([0.1, math.nan]) == math.inf
    assert P.choose({0.1: P.mean_or_inf([0.01, math.inf]), 0.3: P.mean_or_inf([0.5, 0.6])}) == 0.3
    with pytest.raises(ValueError):
        P.choose({})


# -- wording ----------------------------------------------------------------------------------------------------
def test_spread_is_shown_with_n_and_one_value_without_a_spread():
    assert P.fmt_spread([0.079, 0.081, 0.087]) == "0.082 ± 0.004 (n = 3)"
    assert P.fmt_spread([0.079]) == "0.079 (n = 1)"
    assert "±" not in P.fmt_spread([0.5]) and "± 0" not in P.fmt_cell([0.5])
    assert P.fmt_spread([0.1, math.inf]) == "diverged in 1/2"
    assert P.fmt_cell([1.0, 3.0], ".1f") == "2.0 ± 1.4" and P.fmt_cell([math.nan], ".1f") == "diverged 1/1"
    assert P.n_caption(1) == "one seed, no spread" and P.n_caption(5, "replicate") == "mean ± sd over 5 replicates"


def test_intervals_are_written_with_their_n():
    text = P.fmt_interval(P.interval([1.0, 3.0, 2.0]), ".1f", " pp")
    assert text.startswith("+2.0 pp, 95 % CI [") and "n = 3 (3/3 > 0)" in text and "p = " in text
    assert P.fmt_interval(P.interval([-4.44]), ".1f", " pp") == "-4.4 pp (n = 1: direction only)"
    assert P.fmt_interval(P.interval([-0.01]), ".1f", " pp").startswith("+0.0 pp")
    ratio = P.fmt_interval(P.interval(np.log([1.1, 1.2, 1.0]).tolist()), ".2f", ratio=True)
    assert ratio.startswith("1.10×, 95 % CI [") and "(2/3 > 1)" in ratio
    assert P.fmt_interval(P.interval([0.1, math.inf])) == "diverged in 1/2 replicates"
    # replicates that agree exactly (a step count read every 25 steps): no zero-width interval, no "p = 0"
    same = P.fmt_interval(P.interval(np.log([0.825] * 3).tolist()), ".2f", ratio=True)
    assert same == "0.82× in each of the 3 replicates, no spread (0/3 > 1)"
    assert "not measured" in P.direction_only(1, "steepest reproduce --full") and "One seed" in P.direction_only(
        1, "x")


# -- the data ---------------------------------------------------------------------------------------------------
def test_three_way_split_keeps_validation_fixed_and_parts_disjoint():
    a, b = _data.digits_three_way(0), _data.digits_three_way(1)
    assert torch.equal(a["xva"], b["xva"]) and torch.equal(a["yva"], b["yva"])  # chosen once for every replicate
    assert not torch.equal(a["xte"], b["xte"])  # the train/test division changes
    X, _ = _data.load_digits()
    n = len(X)
    for d in (a, b):
        assert len(d["ytr"]) + len(d["yva"]) + len(d["yte"]) == n
        for part in ("tr", "va", "te"):  # stratified: class shares within a point of the whole
            assert np.abs(np.bincount(d["y" + part].numpy(), minlength=10) / len(d["y" + part]) - 0.1).max() < 0.02
    # disjoint: the rows of the three parts together are exactly the data set's rows (pixels/16)
    rows = torch.cat([a["xtr"], a["xva"], a["xte"]]).numpy() * 16.0
    assert sorted(map(bytes, np.round(rows).astype(np.int64))) == sorted(map(bytes, X.astype(np.int64)))
    c = _data.digits_three_way(0, val=300, test=500, images=True)
    assert c["xva"].shape == (300, 1, 8, 8) and len(c["yte"]) == 500


@pytest.mark.parametrize("seed", range(5))
def test_standardizing_keeps_a_pixel_constant_in_training_at_scale_one(seed):
    """A pixel constant in the training part once became 1e8·(x − μ) elsewhere and every run 'diverged'."""
    d = _data.digits_permutation_split(seed)
    for part in ("xtr", "xva", "xte"):
        assert d[part].abs().max() < 1e3, part  # was ~1e8
    s = _data.digits_three_way(seed, standardized=True)
    for part in ("xtr", "xva", "xte"):
        assert s[part].abs().max() < 1e3, part
    X = np.array([[1.0, 5.0], [1.0, 7.0], [3.0, 6.0]])
    out = _data.standardize(X, np.array([0, 1]))
    assert np.allclose(out[:, 0], [0.0, 0.0, 2.0])  # constant on the training rows: shifted, not scaled
    assert np.allclose(out[:, 1], [-1.0, 1.0, 0.0])
