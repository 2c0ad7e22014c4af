"""The starting scalings compared by ``steepest bench --only linalg`` (checked against float64 SVD)."""

import torch

from steepest.benchmarks.linalg import STARTS, _start
from steepest.linalg import SCHEDULES


def _spread(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    return (U * torch.logspace(-3, 0, m, dtype=torch.float64)) @ V.mT


def test_starting_scales():
    X = _spread(96, 256, 0)
    smax = float(torch.linalg.svdvals(X).max())
    top = {k: float(torch.linalg.svdvals(_start(X, k, 1.0)).max()) for k in STARTS}
    assert 1 / 96**0.5 < top["Frobenius"] < 0.5  # ‖X‖_F far above σ_max on a spread spectrum
    assert 1 / 1.07 <= top["Gram bound"] <= 1.0  # (Σσ¹⁶)^(1/16): an upper bound within 7 %
    assert top["AOL"] <= 1.0 + 1e-12  # the AOL guarantee ‖DX‖₂ ≤ 1
    assert abs(top["power iteration"] - 1.0) < 0.05  # an estimate, from below when it has not converged
    assert top["Frobenius"] * 2 < top["Gram bound"]


def test_gram_bound_keeps_five_steps_in_range():
    X = _spread(128, 512, 1).float()
    rows = SCHEDULES["polar_express"].rows(5)
    low = {}
    for kind in ("Frobenius", "Gram bound"):
        Y = _start(X, kind, SCHEDULES["polar_express"].safety)
        for a, b, c in rows:
            A = Y @ Y.mT
            Y = a * Y + (b * A + c * A @ A) @ Y
        low[kind] = float(torch.linalg.svdvals(Y.double()).min())
    assert low["Gram bound"] >= 0.75 > low["Frobenius"]
