"""The isotropy experiment's verdict, on synthetic cosines."""

from __future__ import annotations

import math

from steepest.experiments import isotropy as E


def test_alignment_verdict():
    assert E.alignment_verdict(0.998, 0.999, 0.720) == "held"
    assert E.alignment_verdict(0.998, 0.94, 0.720) == "partly held"  # Muon not aligned
    assert E.alignment_verdict(0.998, 0.999, 0.95) == "partly held"  # SignSGD aligned too
    assert E.alignment_verdict(0.5, 0.6, 0.95) == "not held"
    assert E.alignment_verdict(0.95, 0.95, 0.899) == "held"  # the thresholds themselves
    assert E.alignment_verdict(math.nan, 0.999, 0.7) == "not measured"
