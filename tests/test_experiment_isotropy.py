"""The isotropy experiment's verdicts and choices, on synthetic numbers."""

from __future__ import annotations

import math

import torch

from steepest.experiments import isotropy as E


def test_alignment_verdict():
    assert E.alignment_verdict(0.998, 0.999, 0.720) == "held"
    assert E.alignment_verdict(0.998, 0.94, 0.720) == "partly held"  # Muon not aligned
    assert E.alignment_verdict(0.998, 0.999, 0.95) == "partly held"  # SignSGD aligned too
    assert E.alignment_verdict(0.5, 0.6, 0.95) == "not held"
    assert E.alignment_verdict(0.95, 0.95, 0.899) == "held"  # the thresholds themselves
    assert E.alignment_verdict(math.nan, 0.999, 0.7) == "not measured"



def test_alignment_verdict_reads_the_worst_replicate():
    # means would pass (SGD 0.967, SignSGD 0.83); one replicate each does not
    assert E.alignment_verdict_replicates({"sgd": [0.99, 0.99, 0.92], "muon": [0.98] * 3,
                                           "signsgd": [0.7, 0.7, 0.7]}) == "partly held"
    assert E.alignment_verdict_replicates({"sgd": [0.99] * 3, "muon": [0.98] * 3,
                                           "signsgd": [0.7, 0.7, 0.95]}) == "partly held"
    assert E.alignment_verdict_replicates({"sgd": [0.99] * 3, "muon": [0.98] * 3, "signsgd": [0.7] * 3}) == "held"
    assert E.alignment_verdict_replicates({"sgd": [0.99, float("nan")], "muon": [0.98] * 2,
                                           "signsgd": [0.7] * 2}) == "not measured"
    assert E.worst([float("nan"), 0.99], True) != E.worst([float("nan"), 0.99], True)  # NaN wherever it sits
    assert E.worst([0.99, float("nan")], False) != E.worst([0.99, float("nan")], False)

def test_training_verdict_from_paired_intervals():
    bn = {"sgd": [0.96, 0.95, 0.98], "muon": [0.97, 0.96, 0.98]}
    al = {"sgd": [0.98, 0.985, 0.979], "muon": [0.97, 0.975, 0.972]}
    # equal accuracy, aligned: every interval on the claimed side
    assert E.training_verdict(bn, bn, al) == ("held", {"sgd accuracy": "held", "sgd alignment": "held",
                                                       "muon accuracy": "held", "muon alignment": "held"})
    # 3 points worse for SGD on every replicate: that part is not held, so the whole is partly held
    worse = {"sgd": [a - 0.03 for a in bn["sgd"]], "muon": bn["muon"]}
    verdict, parts = E.training_verdict(worse, bn, al)
    assert parts["sgd accuracy"] == "not held" and verdict == "partly held"
    # a mean gap of −0.5 point whose interval reaches below −1 point: partly held
    noisy = {"sgd": [0.96 + 0.01, 0.95 - 0.02, 0.98 - 0.005], "muon": bn["muon"]}
    assert E.training_verdict(noisy, bn, al)[1]["sgd accuracy"] == "partly held"
    # alignment below 0.95: not held for that part
    low = {"sgd": al["sgd"], "muon": [0.90, 0.91, 0.92]}
    assert E.training_verdict(bn, bn, low)[1]["muon alignment"] == "not held"
    # one replicate: a direction only
    one = {o: v[:1] for o, v in bn.items()}
    assert E.training_verdict(one, one, {o: v[:1] for o, v in al.items()})[0] == "not measured"


def test_goal_met_on_means():
    bn = {"sgd": [0.958], "muon": [0.969]}
    assert E.goal_met_on_means({"sgd": [0.950], "muon": [0.960]}, bn, {"sgd": [0.98], "muon": [0.96]})
    assert not E.goal_met_on_means({"sgd": [0.947], "muon": [0.969]}, bn, {"sgd": [0.98], "muon": [0.96]})
    assert not E.goal_met_on_means({"sgd": [0.99], "muon": [0.99]}, bn, {"sgd": [0.98], "muon": [0.949]})


def test_choose_setting_is_constrained_by_alignment():
    val = {(0.5, 0.1): {"sgd": [0.99], "muon": [0.99]}, (0.8, 0.1): {"sgd": [0.97], "muon": [0.96]},
           (0.95, 0.1): {"sgd": [0.98], "muon": [0.97]}}
    align = {(0.5, 0.1): {"sgd": [0.93], "muon": [0.96]}, (0.8, 0.1): {"sgd": [0.98], "muon": [0.97]},
             (0.95, 0.1): {"sgd": [0.99], "muon": [0.98]}}
    got = E.choose_setting(val, align)
    assert got["chosen"] == (0.95, 0.1)  # (0.5, 0.1) validates best but is not aligned
    assert got["admissible"] == {(0.5, 0.1): False, (0.8, 0.1): True, (0.95, 0.1): True}
    # none aligned: the best worse-optimizer alignment
    low = {c: {o: [v[0] - 0.1] for o, v in a.items()} for c, a in align.items()}
    got = E.choose_setting(val, low)
    assert got["chosen"] == (0.95, 0.1) and not got["any_admissible"]


def test_validation_split_is_held_out_of_the_training_part():
    from steepest.experiments._data import digits_generator_split

    data = digits_generator_split(0)
    Xtr, ytr, Xva, yva = E._validation_split(data, 0)
    assert len(yva) == round(E.VAL_SHARE * len(data[1])) and len(ytr) + len(yva) == len(data[1])
    # the two parts divide the training part (as a multiset of (image, label) rows); the test part is untouched
    key = lambda X, y: sorted(map(tuple, torch.cat([X, y[:, None].float()], 1).tolist()))  # noqa: E731
    assert key(torch.cat([Xtr, Xva]), torch.cat([ytr, yva])) == key(data[0], data[1])
    assert torch.equal(E._validation_split(data, 0)[2], Xva)  # deterministic
    assert not torch.equal(E._validation_split(data, 1)[2], Xva)


def test_whitening_running_norm_uses_the_setting():
    m = E._norm("whitening-running", 16, (0.8, 0.3))
    assert (m.train_stats, m.sample_decorrelation, m.shrinkage, m.centered, m.affine) == ("running", 0.8, 0.3, False,
                                                                                           False)
