"""Pieces of the flatnce experiment that the numbers rest on: the split, the augmentation, the probe draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steepest.experiments import flatnce as E


def test_split_has_three_parts_and_a_fixed_validation_part():
    a, b = E.load_split(0), E.load_split(1)
    assert a["xtr"].shape[1:] == (1, 8, 8) and len(a["xte"]) == E.TEST_SIZE and len(a["xva"]) == E.VAL_SIZE
    assert len(a["xtr"]) + len(a["xva"]) + len(a["xte"]) == 1797
    assert torch.equal(a["xva"], b["xva"]) and not torch.equal(a["xte"], b["xte"])
    # stratified: every class in every part in proportion
    for part in ("ytr", "yva", "yte"):
        assert np.all(np.abs(np.bincount(a[part]) / len(a[part]) - 0.1) < 0.02)
    # no test image appears in the training part
    tr = {bytes(x.numpy().tobytes()) for x in a["xtr"]}
    assert sum(bytes(x.numpy().tobytes()) in tr for x in a["xte"]) <= 2  # digits has a couple of exact duplicates


def test_augment_keeps_shape_and_varies_per_sample():
    x = E.load_split()["xtr"][:200]
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


def test_xi_floor_says_where_round_off_can_happen():
    """log ξ ≥ log(2B − 2) − 2/T: the audit's statement, and the floor reached by the worst-case logits."""
    from steepest.losses import nce_diagnostics, pair_logits

    fp32, bf16 = E.U["fp32"], E.U["bf16"]
    assert E.roundoff_reachable(8, 0.1, fp32)  # barely: -17.36 against -16.64
    assert not any(E.roundoff_reachable(b, 0.1, fp32) for b in (16, 32, 64, 256))
    assert not any(E.roundoff_reachable(b, 0.5, u) for b in (8, 16, 32, 64, 256) for u in (fp32, bf16))
    assert all(E.roundoff_reachable(b, 0.1, bf16) for b in (8, 16, 32, 64, 256))
    assert not E.roundoff_reachable(8, 0.25, bf16)
    # views whose positives coincide: orthogonal negatives sit above the floor, antipodal ones reach it
    B, T = 8, 0.1
    u = torch.eye(B, dtype=torch.float64)
    logits, target = pair_logits(u, u, T)
    d = nce_diagnostics(logits, target, xi_threshold=1e-3)
    # orthogonal negatives (cos 0): log ξ = log(2B − 2) − 1/T exactly, above the floor
    assert math.isclose(d["log_xi"], math.log(2 * B - 2) - 1 / T, rel_tol=1e-12)
    assert E.xi_floor(B, T) < d["log_xi"]
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # B = 2: the negative is antipodal
    logits, target = pair_logits(v, v, T)
    assert math.isclose(nce_diagnostics(logits, target)["log_xi"], E.xi_floor(2, T), rel_tol=1e-12)


def test_advantage_verdict_from_paired_gaps():
    assert E.advantage_verdict([6.0, 5.5, 10.4, 4.0, 7.0]) == "held"
    assert E.advantage_verdict([0.1, 2.0, 3.6]) == "partly held"  # the audit's T = 0.5 case: p ≈ 0.2
    assert E.advantage_verdict([-1.0, -2.0, 0.5]) == "not held"
    assert E.advantage_verdict([0.0, 0.0, 0.0]) == "not held"
    assert E.advantage_verdict([4.0]) == "not measured"  # one seed: direction only
    assert E.advantage_verdict([]) == "not measured"


def test_roundoff_verdict_needs_a_gap_growing_as_precision_drops():
    flat = {"bf16-loss": [-0.3, 2.0, -4.0], "bf16": [-2.0, 0.5, -3.0]}
    assert E.roundoff_verdict(flat, 0.0) == "not held"
    assert E.roundoff_verdict(flat, None) == "not held"  # the float32 diagnostic could not fire: no evidence
    grows = {"bf16-loss": [5.0, 6.0, 7.0], "bf16": [4.0, 5.0, 6.5]}
    assert E.roundoff_verdict(grows, 0.2) == "held"
    assert E.roundoff_verdict(grows, 0.0) == "partly held"  # reachable in float32, never seen
    assert E.roundoff_verdict(grows, None) == "held"
    assert E.roundoff_verdict({"bf16": [3.0]}, 0.0) == "not measured"
    assert E.roundoff_verdict({}, 0.0) == "not measured"


def test_one_seed_has_no_spread_and_gaps_are_signed():
    assert E._fmt([62.8]) == "62.8" and E._fmt([1.0, 3.0]) == "2.0 ± 1.4"
    assert E._fmt_gap([-4.44]) == "-4.4 pp (n = 1: direction only)" and E._fmt_gap([-0.01]).startswith("+0.0 pp")
    assert E._fmt_gap([1.0, 3.0, 2.0]).startswith("+2.0 pp, 95 % CI [")


def test_equal_steps_budget_and_the_grid_are_the_same_for_both_losses():
    from steepest.report import Context, Section

    for mode in ("quick", "full"):
        cfg = E._config(Context(Section("flatnce", "f"), ".", mode=mode))
        assert E.MECH_T in cfg["temps"] and set(cfg["bf16_loss"]) | set(cfg["bf16"]) <= set(cfg["batches"])
        ref = cfg["equal_steps_ref"]
        assert cfg["equal_steps"] == E._epochs_budget(cfg, ref)
        assert E._epochs_budget(cfg, min(cfg["batches"])) > cfg["equal_steps"]  # small batches: more steps per epoch
    full = E._config(Context(Section("flatnce", "f"), ".", mode="full"))
    # runs are long on CPU: 3 replicates (the report says so), selection on the first 2
    assert full["seeds"] >= 3 and full["bf16_seeds"] >= 3 and full["sel"] < full["seeds"]
    assert 0.2 in full["temps"] and 0.2 in E._config(Context(Section("flatnce", "f"), ".", mode="quick"))["temps"]


def test_queue_verdict_reads_the_gap_to_the_largest_batch():
    assert E.queue_verdict({"infonce": [0.5, 1.0, 0.2], "flatnce": [-0.2, 0.3, 0.1]}) == "held"  # within 1 pp
    assert E.queue_verdict({"infonce": [0.5, -2.5, 0.2], "flatnce": [0.2, 0.3, 0.1]}) == "partly held"
    assert E.queue_verdict({"infonce": [-4.0, -3.0, -5.0], "flatnce": [-3.5, -2.0, -4.0]}) == "not held"
    assert E.queue_verdict({"infonce": [-4.0, -3.0, -5.0]}, margin=5.0) == "partly held"
    assert E.queue_verdict({"infonce": [2.0]}) == "not measured"  # one replicate: direction only
    assert E.queue_verdict({}) == "not measured"


def test_a_queue_run_uses_past_embeddings_as_negatives():
    """Same seed and settings: the queue changes training (the logits get its columns) and is keyed apart."""
    x = E.load_split(0)["xtr"][:64]
    plain = E.Run("flatnce", 8, 0.5, 0, "fp32", 1e-3, budget=6)
    queued = E.Run("flatnce", 8, 0.5, 0, "fp32", 1e-3, budget=6, queue=16)
    assert plain.key != queued.key
    a, b = E.train(x, plain), E.train(x, queued)
    pa = torch.cat([p.flatten() for p in a.parameters()])
    pb = torch.cat([p.flatten() for p in b.parameters()])
    assert not torch.equal(pa, pb)
    # the floor of log ξ counts the queued negatives (none at the first step, then up to 16)
    assert math.isclose(plain.curve[0]["min_log_xi_floor"], E.xi_floor(8, 0.5), rel_tol=1e-12)
    assert E.xi_floor(8, 0.5) < queued.curve[0]["min_log_xi_floor"] < E.xi_floor(8, 0.5, 16)
    # MoCo's form: the keys come from a momentum copy, so training differs again, and stays finite
    moco = E.Run("flatnce", 8, 0.5, 0, "fp32", 1e-3, budget=6, queue=16, momentum=0.99)
    assert moco.key not in (plain.key, queued.key)
    c = E.train(x, moco)
    pc = torch.cat([p.flatten() for p in c.parameters()])
    assert torch.isfinite(pc).all() and not torch.equal(pc, pb) and not moco.nonfinite


def test_queue_arm_sizes_per_mode():
    from steepest.report import Context, Section

    quick = E._config(Context(Section("flatnce", "f"), ".", mode="quick"))
    full = E._config(Context(Section("flatnce", "f"), ".", mode="full"))
    assert quick["queue"] == full["queue"] == E.QUEUE and not quick["queue_grid"] and not full["queue_grid"]
    assert quick["queue_losses"] == ("flatnce",) and set(full["queue_losses"]) == set(E.LOSSES)


def test_smoke_run_reports_the_queue_arm(tmp_path):
    import json

    from steepest.cli import main

    assert main(["reproduce", "--smoke", "--only", "flatnce", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    sec = data["sections"]["flatnce"]
    assert sec["error"] is None
    q = sec["queue"]
    assert q["batch"] == 8 and len(q["arms"]) == len(E.QUEUE_ARMS) * len(E.LOSSES)
    assert q["selection_val_1shot"]  # own grid in smoke
    assert any(r["queue"] == q["size"] and r["momentum"] == 0 for r in sec["runs"])
    assert any(r["queue"] == q["size"] and r["momentum"] > 0 for r in sec["runs"])
    assert sum("queue" in c["claim"] for c in data["claims"]) == len(E.QUEUE_ARMS)


def test_features_name_the_layer_the_head_reads():
    torch.manual_seed(0)
    net, x = E.Net(), E.load_split(0)["xtr"][:16]
    pre, rep, z = (E.features(net, x, layer) for layer in ("pre-activation", "representation", "projection"))
    assert np.array_equal(rep, np.maximum(pre, 0)) and (pre < 0).any()
    with torch.no_grad():
        assert np.allclose(z, net(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        E.features(net, x, "head")


def _clusters(seed: int, n: int, d: int = 6, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    means = 3.0 * rng.standard_normal((3, d))
    y = np.repeat(np.arange(3), n)
    return scale * (means[y] + rng.standard_normal((3 * n, d))), y


def test_probe_chooses_c_on_validation_and_matches_a_hand_fit():
    """The k-shot accuracy is the mean over draws of a logistic regression fitted by hand on the same
    (L2-scaled) examples, at the C that scores best on the validation part."""
    from sklearn.linear_model import LogisticRegression

    ftr, ytr = _clusters(0, 30)
    fva, yva = _clusters(1, 40)
    fte, yte = _clusters(2, 40)
    draws = {1: E.few_shot_draws(ytr, 1, 5, 0)}
    spec = E.ProbeSpec(cs=(0.01, 1.0, 100.0))
    out = E.probe(ftr, ytr, {"val": (fva, yva), "test": (fte, yte)}, draws, spec)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731

    def by_hand(c, f, y):
        return np.mean([100 * LogisticRegression(C=c, max_iter=3000).fit(unit(ftr)[i], ytr[i]).score(unit(f), y)
                        for i in draws[1]])

    val = {c: by_hand(c, fva, yva) for c in spec.cs}
    best = max(spec.cs, key=lambda c: (val[c], -c))
    assert out["C"]["1-shot"] == best
    assert math.isclose(out["val"]["1-shot"], val[best]) and math.isclose(out["test"]["1-shot"], by_hand(best, fte, yte))
    full = LogisticRegression(C=out["C"]["full"], max_iter=3000).fit(unit(ftr), ytr).score(unit(fte), yte)
    assert math.isclose(out["test"]["full"], 100 * full)
    # L2 scaling makes the probe blind to each vector's norm; standardisation is not
    s = np.exp(np.random.default_rng(3).uniform(-3, 3, (len(ftr), 1)))
    again = E.probe(ftr * s, ytr, {"val": (fva, yva), "test": (fte, yte)}, draws, spec)
    assert again["test"] == out["test"] and again["C"] == out["C"]
    assert out["draw_sd"]["1-shot"] >= 0 and "full" not in out["draw_sd"]


def test_probe_refuses_to_choose_without_a_validation_part_and_flags_nonfinite_features():
    ftr, ytr = _clusters(0, 10)
    draws = {1: E.few_shot_draws(ytr, 1, 2, 0)}
    with pytest.raises(ValueError, match="val"):
        E.probe(ftr, ytr, {"test": (ftr, ytr)}, draws)
    one = E.probe(ftr, ytr, {"test": (ftr, ytr)}, draws, E.PROBE_BEFORE)  # one C: nothing to choose
    assert one["C"] == {"1-shot": 1.0, "full": 1.0}
    bad = ftr.copy()
    bad[0, 0] = np.nan
    assert math.isnan(E.probe(bad, ytr, {"val": (ftr, ytr)}, draws)["val"]["1-shot"])
    with pytest.raises(ValueError, match="scaling"):
        E.probe(ftr, ytr, {"val": (ftr, ytr)}, draws, E.ProbeSpec(scaling="whiten"))
