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


def test_the_prose_covers_every_route_and_form():
    res = {}
    for kind, exact, ns, bf in (("gaussian", 2e-8, {5: 1e-2, 10: 5e-5}, 5e-3), ("wide", 7.9e-3, {5: 0.5, 10: 0.2}, 1.0)):
        for form in ("nested", "denested"):
            res[f"{kind}/{form}"] = {"accurate": exact if form == "nested" else 3e-8, "ns_steps": ns, "ns_bf16": bf}
    s = E.route_summary(res, [5, 10])
    assert s["denested"]["ns_float32"]["gaussian"]["steps"] == 10 and s["nested"]["ns_float32"]["wide"]["steps"] is None
    assert s["nested"]["exact_within"] == ["gaussian"] and s["denested"]["exact_within"] == ["gaussian", "wide"]
    text = " ".join(E.route_lines(res, [5, 10]))
    for words in ("de-nested", "nested (part 1", "exact msign", "Newton–Schulz in float32", "bfloat16",
                  "Gaussian from 10 steps", "never up to 10 steps"):
        assert words in text, words
