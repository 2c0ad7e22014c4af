"""The penalties experiment's verdicts, on synthetic numbers."""

from __future__ import annotations

import math

from steepest.experiments import penalties as E


def test_inequality_verdict():
    assert E.inequality_verdict(0, 16000) == "held"
    assert E.inequality_verdict(1, 16000) == "not held"
    assert E.inequality_verdict(0, 0) == "not measured"


def test_tracking_verdict_has_two_parts():
    assert E.tracking_verdict(1.5, [1.0, 2.0], [2.0, 3.0]) == "held"
    assert E.tracking_verdict(7.97, [2.4, 2.3], [2.9, 2.8]) == "partly held"  # lowers it, not constant
    assert E.tracking_verdict(1.5, [3.0, 2.0], [2.0, 3.0]) == "partly held"  # constant, one seed not lower
    assert E.tracking_verdict(8.0, [3.0], [2.0]) == "not held"
    assert E.tracking_verdict(2.0, [1.0], [2.0]) == "partly held"  # 2× is not "nearly constant"
    assert E.tracking_verdict(math.nan, [1.0], [2.0]) == "not measured"
    assert E.tracking_verdict(1.0, [], []) == "not measured"
