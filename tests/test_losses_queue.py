"""NegativeQueue, extra negatives and DCLW's weighting against loops written out one term at a time."""

from __future__ import annotations

import math

import pytest
import torch

from steepest.losses import (
    FlatNCELoss,
    InfoNCELoss,
    NegativeQueue,
    flat_nce,
    flat_nce_pairs,
    info_nce_pairs,
    pair_logits,
    vmf_weights,
)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def loop_pair_loss(z1, z2, tau, negatives=None, *, flat=False, sigma=None):
    """Mean over the 2N views of the NT-Xent (or DCL / DCLW) loss, one exponential at a time."""
    views = [_unit(v) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    extra = [] if negatives is None else [_unit(q) for q in negatives]
    if sigma is not None:
        c = [views[i] @ views[n + i] for i in range(n)]
        total = sum(torch.exp(ci / sigma) for ci in c)
        w = [2 - n * torch.exp(ci / sigma) / total for ci in c]
    losses = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        s_pos = views[a] @ views[pos] / tau
        neg = [torch.exp(views[a] @ views[b] / tau) for b in range(2 * n) if b not in (a, pos)]
        neg += [torch.exp(views[a] @ q / tau) for q in extra]
        if flat:
            weight = 1.0 if sigma is None else w[a % n]
            losses.append(torch.log(sum(neg)) - weight * s_pos)
        else:
            losses.append(-torch.log(torch.exp(s_pos) / (torch.exp(s_pos) + sum(neg))))
    return sum(losses) / len(losses)


def _pairs(seed=0, n=4, d=5):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    return z1, z2


# -- the queue ------------------------------------------------------------------------------------
def test_queue_is_fifo_and_wraps_around():
    q = NegativeQueue(5, 3, dtype=torch.float64)
    rows = torch.randn(9, 3, dtype=torch.float64)
    unit = rows / rows.norm(dim=1, keepdim=True)
    assert len(q) == 0 and q.negatives().shape == (0, 3)
    q.enqueue(rows[:2])
    torch.testing.assert_close(q.negatives(), unit[:2], rtol=1e-15, atol=0)
    q.enqueue(rows[2:4])
    q.enqueue(rows[4:7])  # 7 rows into 5 slots: the two oldest go
    assert len(q) == 5 and int(q.ptr) == 2
    torch.testing.assert_close(q.negatives(), unit[2:7], rtol=1e-15, atol=0)
    q.enqueue(rows[7:9])
    torch.testing.assert_close(q.negatives(), unit[4:9], rtol=1e-15, atol=0)
    big = torch.randn(12, 3, dtype=torch.float64)  # more rows than slots: the last 5 stay, in order
    q.enqueue(big)
    torch.testing.assert_close(q.negatives(), big[7:] / big[7:].norm(dim=1, keepdim=True), rtol=1e-15, atol=0)
    assert int(q.ptr) == (4 + 12) % 5
    q.enqueue(rows[:1])
    torch.testing.assert_close(q.negatives()[-1], unit[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(q.negatives()[0], big[8] / big[8].norm(), rtol=1e-15, atol=0)


def test_queue_state_dict_round_trip_and_copy_semantics():
    q = NegativeQueue(4, 3)
    q.enqueue(torch.randn(6, 3))
    r = NegativeQueue(4, 3)
    r.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"embeddings", "ptr", "count"}
    assert torch.equal(r.negatives(), q.negatives())
    nxt = torch.randn(3, 3)
    q.enqueue(nxt)
    r.enqueue(nxt)
    assert torch.equal(r.negatives(), q.negatives())
    got = q.negatives()
    got.zero_()  # a copy: the queue is unchanged
    assert q.negatives().abs().sum() > 0
    q.reset()
    assert len(q) == 0


def test_queue_gets_no_gradient():
    z1, z2 = _pairs(1)
    old = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    q = NegativeQueue(6, 5, dtype=torch.float64)
    q.enqueue(old * 2.0)
    assert not q.embeddings.requires_grad and q.embeddings.grad_fn is None
    loss = info_nce_pairs(z1, z2, 0.5, negatives=q)
    q.enqueue(z2)  # the queue changes before backward: the loss kept its own copy
    loss.backward()
    assert old.grad is None  # nothing flows back into what was queued
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


# -- extra negatives --------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_pair_losses_with_negatives_match_the_loop(flat):
    z1, z2 = _pairs(2)
    negs = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = NegativeQueue(6, 5, dtype=torch.float64)
    q.enqueue(negs)
    fn = flat_nce_pairs if flat else info_nce_pairs
    for given in (negs, q):
        got = fn(z1, z2, 0.3, negatives=given)
        want = loop_pair_loss(z1, z2, 0.3, negs, flat=flat)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got, (z1, z2))
        g_want = torch.autograd.grad(want, (z1, z2))
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    without = fn(z1, z2, 0.3)
    assert abs(float((without - got).detach())) > 1e-3  # the negatives count


def test_pair_logits_append_the_negatives_as_columns():
    z1, z2 = _pairs(4)
    negs = torch.randn(3, 5, dtype=torch.float64)
    base, target = pair_logits(z1, z2, 0.2)
    logits, target2 = pair_logits(z1, z2, 0.2, negatives=negs)
    assert logits.shape == (8, 7 + 3) and torch.equal(target, target2)
    torch.testing.assert_close(logits[:, :7], base, rtol=0, atol=0)
    views = torch.cat([z1, z2])
    cos = torch.nn.functional.normalize(views, dim=1) @ torch.nn.functional.normalize(negs, dim=1).T
    torch.testing.assert_close(logits[:, 7:], cos / 0.2, rtol=1e-12, atol=1e-12)
    empty = NegativeQueue(4, 5, dtype=torch.float64)
    torch.testing.assert_close(pair_logits(z1, z2, 0.2, negatives=empty)[0], base, rtol=0, atol=0)


# -- DCLW -----------------------------------------------------------------------------------------
def test_vmf_weights_are_the_published_formula():
    z1, z2 = _pairs(5)
    w = vmf_weights(z1, z2, sigma=0.5)
    c = torch.nn.functional.cosine_similarity(z1, z2, dim=1)
    want = torch.stack([2 - 4 * torch.exp(ci / 0.5) / torch.exp(c / 0.5).sum() for ci in c])
    torch.testing.assert_close(w, want, rtol=1e-14, atol=1e-14)
    assert float(w.detach().mean()) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("with_queue", [False, True])
def test_dclw_matches_the_loop_value_and_gradient(with_queue):
    z1, z2 = _pairs(6, n=5)
    negs = torch.randn(4, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if with_queue else None
    got = flat_nce_pairs(z1, z2, 0.2, weighting="vmf", sigma=0.5, negatives=negs)
    want = loop_pair_loss(z1, z2, 0.2, negs, flat=True, sigma=0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    dcl = flat_nce_pairs(z1, z2, 0.2, negatives=negs)
    assert abs(float((got - dcl).detach())) > 1e-4  # the weighting changes the loss


def test_flat_nce_positive_weight_and_values():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 5, 1])
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    got = flat_nce(logits, target, "none", positive_weight=w)
    x = logits.detach()
    for i in range(4):
        neg = torch.logsumexp(torch.cat([x[i, :target[i]], x[i, target[i] + 1:]]), 0)
        assert float(got[i].detach()) == pytest.approx(float(neg - w[i] * x[i, target[i]]), rel=1e-12)
    plain = flat_nce(logits, target, "none")
    monitor = flat_nce(logits, target, "none", positive_weight=w, value="info_nce")
    torch.testing.assert_close(monitor, flat_nce(logits, target, "none", value="info_nce"), rtol=0, atol=0)
    g1 = torch.autograd.grad(monitor.sum(), logits)[0]
    g2 = torch.autograd.grad(got.sum(), logits)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-15)  # info_nce reports, the gradient stays DCLW's
    assert not torch.allclose(plain, got)
    with pytest.raises(ValueError, match="positive_weight"):
        flat_nce(logits, target, positive_weight=torch.ones(3))


# -- modules ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [InfoNCELoss, FlatNCELoss])
def test_modules_read_then_fill_their_queue(cls):
    q = NegativeQueue(6, 5, dtype=torch.float64)
    loss_fn = cls(0.3, negatives=q)
    assert "negatives.embeddings" in loss_fn.state_dict()
    flat = cls is FlatNCELoss
    batches = [_pairs(10 + t) for t in range(3)]
    seen: list[torch.Tensor] = []
    for z1, z2 in batches:
        loss = loss_fn(z1, z2)
        want = loop_pair_loss(z1, z2, 0.3, torch.cat(seen)[-6:] if seen else None, flat=flat)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        loss.backward()  # after the queue changed: still fine
        seen.append(z2.detach())
    assert len(q) == 6
    loss_fn.eval()
    loss_fn(*_pairs(20))
    torch.testing.assert_close(q.negatives(), torch.nn.functional.normalize(torch.cat(seen)[-6:], dim=1),
                               rtol=1e-14, atol=0)  # eval forwards do not enqueue


def test_flatnce_module_with_vmf_weighting():
    z1, z2 = _pairs(30, n=6)
    m = FlatNCELoss(0.2, weighting="vmf", sigma=0.4)
    torch.testing.assert_close(m(z1, z2), loop_pair_loss(z1, z2, 0.2, flat=True, sigma=0.4), rtol=1e-12, atol=1e-12)
    assert "weighting='vmf'" in repr(m)


def test_bad_arguments():
    z1, z2 = _pairs(40)
    with pytest.raises(ValueError, match="dimension"):
        info_nce_pairs(z1, z2, negatives=torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        info_nce_pairs(z1, z2, negatives=torch.full((2, 5), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="NegativeQueue"):
        info_nce_pairs(z1, z2, negatives=[1, 2])
    with pytest.raises(ValueError, match="weighting"):
        flat_nce_pairs(z1, z2, weighting="dclw")
    with pytest.raises(ValueError, match="sigma"):
        flat_nce_pairs(z1, z2, weighting="vmf", sigma=0.0)
    with pytest.raises(TypeError, match="NegativeQueue"):
        InfoNCELoss(negatives=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="size"):
        NegativeQueue(0, 3)
    q = NegativeQueue(3, 5)
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        q.enqueue(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        q.enqueue(torch.full((1, 5), math.inf))
    assert len(q) == 0


def test_second_derivatives_with_queue_and_weighting():
    # penalties differentiate through losses: the new terms must keep second-order gradients
    z1, z2 = _pairs(50, n=3, d=4)
    negs = torch.randn(2, 4, generator=torch.Generator().manual_seed(51), dtype=torch.float64)
    torch.autograd.gradgradcheck(
        lambda a, b: flat_nce_pairs(a, b, 0.5, weighting="vmf", negatives=negs), (z1, z2))
    torch.autograd.gradgradcheck(lambda a, b: info_nce_pairs(a, b, 0.5, negatives=negs), (z1, z2))
