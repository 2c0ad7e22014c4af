"""The mclip experiment's verdict, on synthetic errors."""

from __future__ import annotations

import math

from steepest.experiments import mclip as E


def _errors(nested, denested):
    return {**{f"{k}/nested": v for k, v in nested.items()}, **{f"{k}/denested": v for k, v in denested.items()}}


def test_verdict_counts_the_spectra_within_the_contract():
    ok = {"gaussian": 2e-8, "wide": 3e-8}
    assert E.verdict(_errors(ok, ok)) == ("held", {"nested": [], "denested": []})
    v, failed = E.verdict(_errors({"gaussian": 2e-8, "wide": 7.9e-3}, ok))
    assert v == "partly held" and failed == {"nested": ["wide"], "denested": []}
    bad = {"gaussian": 1.0, "wide": math.nan}
    assert E.verdict(_errors(bad, bad))[0] == "not held"  # nan counts as a miss
    assert E.verdict(_errors({"gaussian": 1e-4}, {"gaussian": 1e-4}))[0] == "held"  # the bound itself is within
    assert E.verdict(_errors({"gaussian": 2e-4}, {"gaussian": 2e-5}), tol=1e-3)[0] == "held"
