"""steepest.losses against independent references.

References: ``F.cross_entropy``; float64 numpy/scipy closed forms; the
stop-gradient form ``ξ / sg(ξ)`` written out term by term; a loop-based NT-Xent
(SimCLR) and a loop-based Decoupled Contrastive Learning loss written from their
published formulas; the actual float32/bfloat16 cross-entropy gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp, softmax

from steepest import losses
from steepest.losses import (
    FlatNCELoss,
    InfoNCELoss,
    flat_nce,
    flat_nce_pairs,
    info_nce,
    info_nce_pairs,
    nce_diagnostics,
    pair_logits,
)

SETTINGS = settings(max_examples=25, deadline=None)


def _case(seed: int, B: int, K: int, scale: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, K, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, K, (B,), generator=g)
    return logits, target


def _np_flat(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = []
    for row, t in zip(logits, target):
        neg = np.delete(row, t)
        out.append(logsumexp(neg) - row[t])
    return np.array(out)


# ----------------------------------------------------------------------------- logits API
@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 6),
    K=st.integers(2, 7),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_info_nce_equals_cross_entropy(seed, B, K, scale, reduction):
    logits, target = _case(seed, B, K, scale)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = info_nce(a, target, reduction)
    ref = F.cross_entropy(b, target, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), B=st.integers(1, 6), K=st.integers(2, 7), scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_flat_nce_value_excludes_positive(seed, B, K, scale):
    logits, target = _case(seed, B, K, scale)
    ours = flat_nce(logits, target, "none")
    ref = _np_flat(logits.numpy(), target.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-12)
    # InfoNCE = log(1 + ξ) = softplus(log ξ): a port that kept the positive would give this instead
    np.testing.assert_allclose(info_nce(logits, target, "none").numpy(), np.logaddexp(0.0, ref), rtol=1e-12, atol=1e-12)


def test_flat_nce_is_not_cross_entropy():
    # well separated: InfoNCE ~ 0 with a vanishing gradient, FlatNCE very negative with ∂/∂s_t = −1
    logits = torch.tensor([[20.0, 0.0, -1.0], [0.5, 15.0, 1.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1])
    flat = flat_nce(logits, target, "sum")
    assert flat.item() < -10
    assert info_nce(logits, target, "sum").item() < 1e-5
    (g,) = torch.autograd.grad(flat, logits)
    torch.testing.assert_close(g[[0, 1], [0, 1]], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    # negatives get softmax over the negatives only (sums to +1 per row)
    torch.testing.assert_close(g.sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-15, rtol=0)


def test_flat_nce_value_can_be_negative():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    assert flat_nce(logits, torch.tensor([0])).item() == pytest.approx(math.log(2) - 5, rel=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), B=st.integers(1, 5), K=st.integers(2, 6), scale=st.sampled_from([0.3, 3.0]))
def test_flat_nce_gradient_is_xi_over_sg_xi(seed, B, K, scale):
    logits, target = _case(seed, B, K, scale)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    flat_nce(a, target, "sum").backward()
    # ξ / sg(ξ) written out: ξ_b = Σ_{i≠t} exp(s_i − s_t)
    total = 0.0
    for r in range(B):
        t = int(target[r])
        xi = sum(torch.exp(b[r, i] - b[r, t]) for i in range(K) if i != t)
        total = total + xi / xi.detach()
    total.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flat_nce_value_options_share_the_gradient(reduction):
    logits, target = _case(3, 5, 4, 2.0)
    grads, values = {}, {}
    for v in ("log_xi", "info_nce", "xi_over_sg"):
        x = logits.clone().requires_grad_(True)
        out = flat_nce(x, target, reduction, value=v)
        out.sum().backward()
        grads[v], values[v] = x.grad, out.detach()
    torch.testing.assert_close(grads["info_nce"], grads["log_xi"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["xi_over_sg"], grads["log_xi"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(values["info_nce"], F.cross_entropy(logits, target, reduction=reduction))
    n = 1 if reduction == "mean" else 5
    torch.testing.assert_close(values["xi_over_sg"].sum(), torch.tensor(float(n), dtype=torch.float64))


def test_positive_mask():
    logits, target = _case(11, 6, 5, 2.0)
    one = F.one_hot(target, 5).bool()
    torch.testing.assert_close(info_nce(logits, positive_mask=one), info_nce(logits, target))
    torch.testing.assert_close(flat_nce(logits, positive_mask=one), flat_nce(logits, target))
    mask = one.clone()
    mask[:, 0] = True  # several positives in most rows
    mask[target == 0, 1] = True
    L, M = logits.numpy(), mask.numpy()
    ref_info = np.array([-np.log(softmax(L[r])[M[r]].sum()) for r in range(6)])
    ref_flat = np.array([logsumexp(L[r][~M[r]]) - logsumexp(L[r][M[r]]) for r in range(6)])
    np.testing.assert_allclose(info_nce(logits, positive_mask=mask, reduction="none").numpy(), ref_info, rtol=1e-12)
    np.testing.assert_allclose(flat_nce(logits, positive_mask=mask, reduction="none").numpy(), ref_flat, rtol=1e-12)
    # the identity InfoNCE = log(1 + ξ) survives several positives
    np.testing.assert_allclose(ref_info, np.logaddexp(0.0, ref_flat), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    logits, target = _case(5, 8, 6, 4.0, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    for fn in (info_nce, flat_nce):
        out = fn(x, target)
        assert out.dtype == torch.float32
        exact = fn(logits.double(), target)
        # half arithmetic would be off by ~1e-2 relative; float32 by ~1e-7
        torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=2e-6)
    flat_nce(x, target, "sum").backward()
    assert x.grad.dtype == dtype
    assert torch.all(x.grad[torch.arange(8), target] == -1)


def test_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    exact = info_nce_pairs(z1.double(), z2.double(), 0.1, reduction="none")
    exact_flat = flat_nce_pairs(z1.double(), z2.double(), 0.1, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = info_nce_pairs(z1, z2, 0.1, reduction="none")
        flat = flat_nce_pairs(z1, z2, 0.1, reduction="none")
        # what an autocast matmul would give: shows the check below can fail
        naive = F.cross_entropy(*_naive_pair_logits(z1, z2, 0.1), reduction="none")
    assert ours.dtype == torch.float32 and flat.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat.double(), exact_flat, rtol=1e-5, atol=1e-5)
    assert (naive.double() - exact).abs().max().item() > 1e-3


def _naive_pair_logits(z1, z2, T):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / T
    n = z1.shape[0]
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return s, torch.cat([torch.arange(n, 2 * n), torch.arange(n)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_are_finite(dtype):
    big = 1e4 if dtype != torch.float16 else 6e4
    logits = torch.tensor([[big, -big, -big], [-big, big, -big], [0.0, -big, big]], dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 0, 2])
    b = float(logits[0, 0].detach())
    info = info_nce(logits, target, "none")
    flat = flat_nce(logits, target, "none")
    expected_info = torch.tensor([0.0, 2 * b, 0.0])
    expected_flat = torch.tensor([math.log(2) - 2 * b, 0.0, -b])  # row 1: logsumexp(b, −b) − (−b) = 2b → b − (−b)
    expected_flat[1] = 2 * b
    torch.testing.assert_close(info, expected_info, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat, expected_flat, rtol=1e-6, atol=1e-2)
    (info.sum() + flat.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_input_errors():
    x = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="K=1"):
        flat_nce(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="K=1"):
        info_nce(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        flat_nce(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        flat_nce(torch.randn(4), torch.tensor(0))
    with pytest.raises(TypeError, match="integer"):
        flat_nce(x, t.float())
    with pytest.raises(TypeError, match="floating"):
        flat_nce(torch.ones(3, 4, dtype=torch.long), t)
    with pytest.raises(ValueError, match=r"\[0, K\)"):
        flat_nce(x, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="shape"):
        flat_nce(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        flat_nce(x, t, "avg")
    with pytest.raises(ValueError, match="value"):
        flat_nce(x, t, value="xi")
    with pytest.raises(ValueError, match="exactly one"):
        flat_nce(x)
    with pytest.raises(ValueError, match="exactly one"):
        flat_nce(x, t, positive_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one negative"):
        flat_nce(x, positive_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one positive"):
        flat_nce(x, positive_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        flat_nce(x, positive_mask=torch.ones(3, 4))
    z = torch.randn(1, 8)
    with pytest.raises(ValueError, match="N >= 2"):
        flat_nce_pairs(z, z + 1)
    with pytest.raises(ValueError, match="N >= 2"):
        info_nce_pairs(z, z + 1, gather_distributed=True)
    with pytest.raises(ValueError, match="same shape"):
        info_nce_pairs(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_pairs(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="z2 contains NaN"):
        info_nce_pairs(torch.randn(4, 8), torch.full((4, 8), float("inf")))
    with pytest.raises(ValueError, match="temperature_range"):
        InfoNCELoss(0.001, learnable_temperature=True)


# ----------------------------------------------------------------------------- pair API
def _ntxent_reference(z1: np.ndarray, z2: np.ndarray, T: float) -> float:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), averaged over all 2N views, loop by loop."""
    v = np.concatenate([z1, z2])
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    n2 = len(v)
    total = 0.0
    for a in range(n2):
        p = (a + n2 // 2) % n2
        denom = sum(math.exp(v[a] @ v[b] / T) for b in range(n2) if b != a)
        total += -math.log(math.exp(v[a] @ v[p] / T) / denom)
    return total / n2


def _dcl_reference(z1: torch.Tensor, z2: torch.Tensor, T: float) -> torch.Tensor:
    """Decoupled Contrastive Learning (Yeh et al. 2022, eq. 6), written term by term:
    L_i^(k) = −⟨z_i^(1), z_i^(2)⟩/τ + log Σ_{l∈{1,2}, j≠i} exp(⟨z_i^(k), z_j^(l)⟩/τ), averaged over i and k."""
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = u1.shape[0]
    terms = []
    for k, (a, b) in enumerate(((u1, u2), (u2, u1))):
        for i in range(n):
            pos = a[i] @ b[i] / T
            negs = [a[i] @ a[j] / T for j in range(n) if j != i] + [a[i] @ b[j] / T for j in range(n) if j != i]
            terms.append(-pos + torch.logsumexp(torch.stack(negs), 0))
    return torch.stack(terms).mean()


@SETTINGS
@given(seed=st.integers(0, 10_000), N=st.integers(2, 6), D=st.integers(1, 5), T=st.sampled_from([0.05, 0.1, 0.5, 2.0]))
def test_info_nce_pairs_is_nt_xent(seed, N, D, T):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    ours = info_nce_pairs(z1, z2, T).item()
    assert ours == pytest.approx(_ntxent_reference(z1.numpy(), z2.numpy(), T), rel=1e-10, abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), N=st.integers(2, 5), D=st.integers(2, 5), T=st.sampled_from([0.1, 0.5]))
def test_flat_nce_pairs_is_dcl_value_and_gradient(seed, N, D, T):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    ours = flat_nce_pairs(z1, z2, T)
    ref = _dcl_reference(z1, z2, T)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(ours, (z1, z2))
    gb = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_pair_logits_layout():
    z1 = torch.eye(3, dtype=torch.float64)
    z2 = torch.eye(3, dtype=torch.float64)
    logits, target = pair_logits(z1, z2, 1.0)
    assert logits.shape == (6, 5)
    # each view's only cosine-1 partner is its pair; self is excluded
    assert torch.equal(logits.argmax(1), target)
    assert torch.equal(target, torch.tensor([2, 3, 4, 0, 1, 2]))
    assert torch.all(logits.max(1).values == 1.0) and torch.all((logits == 1.0).sum(1) == 1)


def test_gather_distributed_without_process_group_is_local():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for fn in (info_nce_pairs, flat_nce_pairs):
        torch.testing.assert_close(fn(z1, z2, 0.2, gather_distributed=True), fn(z1, z2, 0.2))
    m = FlatNCELoss(0.2, gather_distributed=True)
    torch.testing.assert_close(m(z1, z2), flat_nce_pairs(z1, z2, 0.2))


@pytest.mark.parametrize("fn", [info_nce, flat_nce])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_gradient_equals_one_process_gradient(fn, world):
    """Each simulated rank scores its local 2n views against all gathered views (gradients flow
    back through the gather, summed over ranks, as all_gather's backward does); DDP averages
    the ranks' gradients. The result must be the one-process gradient on the whole batch."""
    g = torch.Generator().manual_seed(7)
    n, T = 3, 0.3
    z1 = torch.randn(world * n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(world * n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    full = fn(*pair_logits(z1, z2, T))
    g_full = torch.autograd.grad(full, (z1, z2))
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    per_rank = []
    for r in range(world):
        sl = slice(r * n, (r + 1) * n)
        logits, target = losses._pair_logits_from(h1[sl], h2[sl], h1, h2, r * n, T)
        per_rank.append(fn(logits, target))
    ddp = torch.stack(per_rank).mean()  # DDP: average of the ranks' gradients
    torch.testing.assert_close(ddp, full, rtol=1e-12, atol=1e-12)
    g_ddp = torch.autograd.grad(ddp, (z1, z2))
    for a, b in zip(g_ddp, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- diagnostics
def _logits_with_xi(log2_xi: list[float], dtype=torch.float64) -> torch.Tensor:
    # one negative: ξ = exp(s_1 − s_0) = 2^k
    return torch.tensor([[0.0, k * math.log(2)] for k in log2_xi], dtype=dtype)


@pytest.mark.parametrize(
    "dtype,log2_xi",
    [(torch.float32, [-30, -26, -25, -22, -20, -5, 0, 3]), (torch.bfloat16, [-14, -11, -10, -7, -6, -2, 0])],
)
def test_share_below_resolution_matches_cross_entropy_gradient(dtype, log2_xi):
    logits = _logits_with_xi(log2_xi, dtype).requires_grad_(True)
    target = torch.zeros(len(log2_xi), dtype=torch.long)
    F.cross_entropy(logits, target, reduction="sum").backward()
    vanished = (logits.grad[:, 0] == 0).double().mean().item()
    d = nce_diagnostics(logits, target, resolution_dtype=dtype)
    assert 0 < vanished < 1
    assert d["share_below_resolution"] == pytest.approx(vanished)


def test_diagnostics_quantiles_and_shares():
    log2_xi = [-40.0, -12.0, -8.0, -1.0, 2.0]
    logits = _logits_with_xi(log2_xi)
    target = torch.zeros(5, dtype=torch.long)
    d = nce_diagnostics(logits, target, quantiles=(0.0, 0.5, 1.0), xi_threshold=1e-3)
    log10 = np.array(log2_xi) * math.log10(2)
    assert d["n"] == 5
    assert d["log10_xi_quantiles"][0.0] == pytest.approx(log10.min())
    assert d["log10_xi_quantiles"][0.5] == pytest.approx(np.median(log10))
    assert d["log10_xi_quantiles"][1.0] == pytest.approx(log10.max())
    assert d["share_xi_below"] == pytest.approx(2 / 5)  # 2^-40, 2^-12 < 1e-3 < 2^-8
    assert d["share_below_resolution"] == pytest.approx(1 / 5)
    assert d["info_nce"] == pytest.approx(np.mean(np.log1p(2.0 ** np.array(log2_xi))))
    assert d["log_xi"] == pytest.approx(np.mean(np.array(log2_xi) * math.log(2)))
    with pytest.raises(ValueError, match="quantiles"):
        nce_diagnostics(logits, target, quantiles=(1.5,))


# ----------------------------------------------------------------------------- modules
def test_modules_match_functions():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    torch.testing.assert_close(InfoNCELoss(0.3)(z1, z2), info_nce_pairs(z1, z2, 0.3))
    torch.testing.assert_close(FlatNCELoss(0.3)(z1, z2), flat_nce_pairs(z1, z2, 0.3))
    torch.testing.assert_close(
        FlatNCELoss(0.3, value="info_nce")(z1, z2), info_nce_pairs(z1, z2, 0.3)
    )
    torch.testing.assert_close(
        InfoNCELoss(0.3, reduction="none")(z1, z2), info_nce_pairs(z1, z2, 0.3, reduction="none")
    )
    assert list(InfoNCELoss(0.3).parameters()) == []


@pytest.mark.parametrize("cls", [InfoNCELoss, FlatNCELoss])
def test_learnable_temperature_gradient_and_clamp(cls):
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    m = cls(0.2, learnable_temperature=True, temperature_range=(0.05, 1.0)).double()
    assert [n for n, _ in m.named_parameters()] == ["log_temperature"]
    m(z1, z2).backward()
    # central finite difference in log τ
    fn = info_nce_pairs if cls is InfoNCELoss else flat_nce_pairs
    h, lt = 1e-6, math.log(0.2)
    fd = (fn(z1, z2, math.exp(lt + h)) - fn(z1, z2, math.exp(lt - h))).item() / (2 * h)
    assert m.log_temperature.grad.item() == pytest.approx(fd, rel=1e-6)
    # pushed below the range: the forward projects log τ back onto the bound, and the
    # gradient there is the true one (a clamp inside the graph would make it exactly 0)
    with torch.no_grad():
        m.log_temperature.fill_(math.log(1e-4))
    m.log_temperature.grad = None
    assert float(m.temperature.detach()) == pytest.approx(0.05)
    torch.testing.assert_close(m(z1, z2), fn(z1, z2, 0.05))
    assert m.log_temperature.item() == pytest.approx(math.log(0.05), rel=1e-15)
    m.log_temperature.grad = None
    m(z1, z2).backward()
    lt = math.log(0.05)
    fd = (fn(z1, z2, math.exp(lt + h)) - fn(z1, z2, math.exp(lt - h))).item() / (2 * h)
    assert m.log_temperature.grad.item() == pytest.approx(fd, rel=1e-6)
    assert m.log_temperature.grad.item() != 0.0
    # state dict round trip
    m2 = cls(0.5, learnable_temperature=True, temperature_range=(0.05, 1.0)).double()
    m2.load_state_dict(m.state_dict())
    assert m2.log_temperature.item() == m.log_temperature.item()


# ----------------------------------------------------------------------------- float32 precision at tiny ξ
def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


def test_info_nce_float32_gradient_one_separated_row():
    # ξ = 7 e^{-14} ≈ 5.8e-6: logsumexp(s) ≈ 20 rounds to a spacing of 1.9e-6, which swamped ξ
    row = torch.tensor([[20.0] + [6.0] * 7])
    t = torch.tensor([0])
    ref = _grad(lambda x: info_nce(x, t), row.double())
    ours = _grad(lambda x: info_nce(x, t), row)
    ce = _grad(lambda x: F.cross_entropy(x, t), row)
    assert ref[0, 0].item() == pytest.approx(-7 * math.exp(-14) / (1 + 7 * math.exp(-14)), rel=1e-12)
    assert _rel(ours, ref) < 1e-6
    assert _rel(ours, ref) <= _rel(ce, ref)


def test_info_nce_float32_gradient_aligned_pairs_matches_float64():
    # aligned embeddings, N = 256, τ = 0.05: most anchors have ξ ≈ 1e-6
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 512, generator=g)
    logits, target = pair_logits(z, z.clone(), 0.05)
    ref = _grad(lambda x: info_nce(x, target), logits.double())
    ours = _grad(lambda x: info_nce(x, target), logits)
    ce = _grad(lambda x: F.cross_entropy(x, target), logits)
    assert _rel(ce, ref) > 1e-2  # the primitive itself loses digits here
    assert _rel(ours, ref) < 1e-5


def _rows_with_xi(log10_xi: float, K: int, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with s_t = offset and negatives s_t + log(ξ w_i), Σ w_i = 1: ξ exactly 10^log10_xi (in float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, K - 1, generator=g, dtype=torch.float64) + 0.1
    w = w / w.sum(1, keepdim=True)
    neg = offset + log10_xi * math.log(10.0) + w.log()
    logits = torch.cat([torch.full((3, 1), offset, dtype=torch.float64), neg], 1)
    return logits, torch.zeros(3, dtype=torch.long)


# float32: a few roundings of the logits' spacing; half inputs: the gradient is rounded to the
# input's dtype (unit roundoff 2^-8 in bfloat16, 2^-11 in float16)
_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@settings(max_examples=40, deadline=None)
@given(
    log10_xi=st.floats(-12.0, 1.0),
    K=st.integers(2, 9),
    offset=st.floats(-30.0, 30.0),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fn=st.sampled_from([info_nce, flat_nce]),
)
def test_low_precision_gradient_matches_float64_down_to_tiny_xi(log10_xi, K, offset, seed, dtype, fn):
    logits, target = _rows_with_xi(log10_xi, K, offset, seed)
    x = logits.to(dtype)
    ref = _grad(lambda v: fn(v, target, "sum"), x.double())  # the same rounded scores, in float64
    ours = _grad(lambda v: fn(v, target, "sum"), x)
    assert ours.dtype == dtype
    tiny = torch.finfo(dtype).smallest_normal if dtype != torch.float16 else 2.0**-24
    err = ((ours.double() - ref).abs() - tiny).clamp_min(0) / ref.abs().clamp_min(tiny)
    assert err.max().item() <= _GRAD_TOL[dtype]
    if fn is info_nce:
        # at least as precise as the torch primitive on the same input (computed in float32)
        ce = _grad(lambda v: F.cross_entropy(v.float(), target, reduction="sum"), x)
        assert _rel(ours, ref) <= _rel(ce, ref) + _GRAD_TOL[dtype]


@pytest.mark.parametrize("tau", [0.1, 0.05, 0.035, 0.03])  # ξ ≲ 1e-3 … 1e-13
@pytest.mark.parametrize(
    "loss",
    [
        info_nce_pairs,
        flat_nce_pairs,
        lambda a, b, t: InfoNCELoss(t)(a, b),
        lambda a, b, t: FlatNCELoss(t, value="info_nce")(a, b),
        lambda a, b, t: InfoNCELoss(t, learnable_temperature=True, temperature_range=(0.01, 1.0))(a, b),
    ],
    ids=["info_nce_pairs", "flat_nce_pairs", "InfoNCELoss", "FlatNCELoss", "InfoNCELoss-learnable"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_loss_gradients_match_float64_when_aligned(loss, tau, dtype):
    g = torch.Generator().manual_seed(0)
    N, D = 8, 64
    q = torch.linalg.qr(torch.randn(D, N, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    z1 = (q + 0.01 * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
    z2 = (q + 0.01 * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
    grads = []
    for cd in (dtype, torch.float64):
        a, b = z1.detach().to(cd).clone().requires_grad_(True), z2.detach().to(cd).clone().requires_grad_(True)
        loss(a, b, tau).backward()
        grads.append(torch.cat([a.grad, b.grad]))
    assert _rel(grads[0], grads[1]) < (1e-5 if dtype == torch.float32 else 2**-8)


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.05])
def test_flat_nce_pairs_float32_is_dcl_in_float64(tau):
    # the DCL formula written out (Yeh et al. 2022, eq. 6) in float64 on the same float32 embeddings
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    z2 = z1 + 0.3 * z2
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    r1, r2 = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    ours, ref = flat_nce_pairs(a1, a2, tau), _dcl_reference(r1, r2, tau)
    assert abs(ours.item() - ref.item()) <= 2e-6 * max(1.0, abs(ref.item()))
    ours.backward()
    ref.backward()
    assert _rel(torch.cat([a1.grad, a2.grad]), torch.cat([r1.grad, r2.grad])) < 2e-6


@pytest.mark.parametrize("cls", [InfoNCELoss, FlatNCELoss])
def test_learnable_temperature_pushed_out_of_range_comes_back_under_adam(cls):
    # random (unaligned) pairs: the loss falls as τ grows; log τ starts below the range, as
    # Adam's momentum can leave it, and must climb back (a clamp in the graph kept it at 0.01)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    m = cls(0.05, learnable_temperature=True, temperature_range=(0.01, 1.0))
    with torch.no_grad():
        m.log_temperature.fill_(math.log(0.01) - 1.0)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = m(z1, z2)
        loss.backward()
        opt.step()
    tau = float(m.temperature.detach())
    assert 0.1 < tau <= 1.0
    fn = info_nce_pairs if cls is InfoNCELoss else flat_nce_pairs
    torch.testing.assert_close(m(z1, z2), fn(z1, z2, tau))
    assert m(z1, z2).item() < fn(z1, z2, 0.01).item() - 10


def test_temperature_property_keeps_a_gradient_outside_the_range():
    m = InfoNCELoss(0.1, learnable_temperature=True, temperature_range=(0.05, 0.5)).double()
    with torch.no_grad():
        m.log_temperature.fill_(math.log(2.0))
    t = m.temperature
    assert t.item() == pytest.approx(0.5)
    t.backward()
    assert m.log_temperature.grad.item() == pytest.approx(0.5)  # ∂τ/∂log τ = τ, straight through


# ----------------------------------------------------------------------------- found by the fuzz battery
def test_mean_over_no_rows_is_an_error_not_nan():
    empty = torch.zeros(0, 3)
    t = torch.zeros(0, dtype=torch.long)
    for fn in (info_nce, flat_nce):
        with pytest.raises(ValueError, match="B = 0"):
            fn(empty, t)
        assert fn(empty, t, "sum").item() == 0.0 and fn(empty, t, "none").shape == (0,)
    with pytest.raises(ValueError, match="B = 0"):
        nce_diagnostics(empty, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_xi_keeps_its_digits_when_the_scores_are_large(dtype):
    # K equal scores: InfoNCE = log K exactly; the logsumexp at 1e30 used to round log K away
    for big in (1e3, 1e30):
        x = torch.full((1, 5), big, dtype=dtype)
        t = torch.tensor([0])
        assert info_nce(x, t).item() == pytest.approx(math.log(5), rel=1e-6)
        assert flat_nce(x, t).item() == pytest.approx(math.log(4), rel=1e-6)
    # a shift of 1e3 in float32: the plain form was off by ~1e-5 absolute
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    x = (s + 1e3).to(dtype)
    ref = info_nce(x.double() - 1e3, t, "none")  # the same rounded scores, shifted back exactly in float64
    torch.testing.assert_close(info_nce(x, t, "none").double(), ref, rtol=1e-6, atol=0)


def test_flat_nce_info_nce_value_is_exact_at_tiny_xi():
    x = torch.tensor([[0.0, -25.8]])  # ξ = e^{-25.8} ≈ 6e-12
    v = flat_nce(x, torch.tensor([0]), value="info_nce").item()
    assert v == pytest.approx(math.log1p(math.exp(-25.8)), rel=1e-6)  # was 0: log ξ + (softplus − log ξ) cancelled


@pytest.mark.parametrize("scale", [1e-30, 1e-13, 1e20, 1e30])
def test_pair_logits_normalise_tiny_and_huge_embeddings(scale):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref, _ = pair_logits(z1, z2, 0.5)
    logits, _ = pair_logits((z1 * scale).float(), (z2 * scale).float(), 0.5)
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=1e-5)


def test_zero_embedding_scores_zero_and_gets_no_gradient():
    z1 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0], [1.0, 0.1], [0.3, 2.0]], requires_grad=True)
    logits, _ = pair_logits(z1, z2, 0.1)
    assert torch.equal(logits[0], torch.zeros(5)) and torch.equal(logits[:, 0][1:3], torch.zeros(2))
    info_nce_pairs(z1, z2, 0.1).backward()
    assert torch.equal(z1.grad[0], torch.zeros(2))  # F.normalize's 1e12-scaled gradient at 0 overflowed
    assert torch.isfinite(z2.grad).all() and z1.grad[1:].abs().sum() > 0


def test_temperature_too_small_for_the_compute_dtype_is_refused():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature .* too small"):
        pair_logits(z, z, 1e-39)  # 1/τ overflows float32: the logits were inf
    assert torch.isfinite(pair_logits(z.double(), z.double(), 1e-39)[0]).all()
    with pytest.raises(ValueError, match="temperature .* too small"):
        InfoNCELoss(1e-320)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="temperature_range"):
        InfoNCELoss(0.1, learnable_temperature=True, temperature_range="ab")
    with pytest.raises(ValueError, match="temperature_range"):
        InfoNCELoss(0.1, learnable_temperature=True, temperature_range=(0.1,))
    with pytest.raises(TypeError, match="learnable_temperature"):
        InfoNCELoss(0.1, learnable_temperature="yes")
    with pytest.raises(TypeError, match="gather_distributed"):
        FlatNCELoss(0.1, gather_distributed=1)
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="quantiles"):
        nce_diagnostics(x, t, quantiles=("a",))
    with pytest.raises(TypeError, match="quantiles"):
        nce_diagnostics(x, t, quantiles=None)
    with pytest.raises(TypeError, match="xi_threshold"):
        nce_diagnostics(x, t, xi_threshold="a")
    with pytest.raises(TypeError, match="logits"):
        nce_diagnostics([[0.0, 1.0]], t)


def test_explicit_half_dtype_evaluates_the_textbook_form_for_round_off_studies():
    # dtype=bfloat16 is the low-precision study mode: InfoNCE as F.cross_entropy computes it in bf16,
    # so the positive's gradient is exactly 0 once ξ < 2^-8 (what the FlatNCE note is about)
    x = torch.tensor([[0.0, -7.0], [0.0, -1.0]], requires_grad=True)  # ξ = e^-7 ≈ 2^-10, e^-1
    t = torch.tensor([0, 0])
    info_nce(x, t, "sum", dtype=torch.bfloat16).backward()
    y = x.detach().bfloat16().requires_grad_(True)
    F.cross_entropy(y, t, reduction="sum").backward()
    assert x.grad[0, 0].item() == 0.0 and y.grad[0, 0].item() == 0.0
    assert x.grad[1, 0].item() == pytest.approx(y.grad[1, 0].float().item(), rel=1e-2)
    # the default float32 compute keeps the gradient
    x.grad = None
    info_nce(x, t, "sum").backward()
    assert x.grad[0, 0].item() == pytest.approx(-math.exp(-7) / (1 + math.exp(-7)), rel=1e-6)


def test_second_derivatives_of_the_reformulated_losses():
    # a penalty on the loss's gradient differentiates through softplus(log ξ) and the shifted logsumexps
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 2, 4])
    m = torch.tensor([[True, False, True, False, False]] * 3)
    assert torch.autograd.gradgradcheck(lambda v: info_nce(v, t, "sum"), (x,))
    assert torch.autograd.gradgradcheck(lambda v: info_nce(v, positive_mask=m, reduction="sum"), (x,))
    assert torch.autograd.gradgradcheck(lambda v: flat_nce(v, positive_mask=m, reduction="sum"), (x,))
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: info_nce_pairs(a, z2, 0.3), (z1,))
