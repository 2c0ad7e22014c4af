"""QK-Clip (Kimi K2's MuonClip) against hand-written loops: clipped heads reach τ, the others are bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from steepest.optim import ClipAttention, Muon, max_attention_logits, qk_clip_

B, L, E, H = 3, 5, 16, 4
D = E // H


def loop_max_logits(x, w_q, w_k, heads, *, b_q=None, b_k=None, causal=False, mask=None):
    """max over (batch, i, j) of q_i·k_j/√d per head, one dot product at a time, float64."""
    x, w_q, w_k = x.double(), w_q.double(), w_k.double()
    d = w_q.shape[0] // heads
    q = x @ w_q.T + (0 if b_q is None else b_q.double())
    k = x @ w_k.T + (0 if b_k is None else b_k.double())
    out = []
    for h in range(heads):
        best = -math.inf
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                for j in range(x.shape[1]):
                    if (causal and j > i) or (mask is not None and not bool(mask[i, j])):
                        continue
                    s = float(q[b, i, h * d:(h + 1) * d] @ k[b, j, h * d:(h + 1) * d]) / math.sqrt(d)
                    best = max(best, s)
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heads of very different logit size: some far above τ, some below
    size = torch.tensor([0.3, 2.0, 0.8, 3.0]).repeat_interleave(D)[:, None]
    w_q = (torch.randn(E, E, generator=g, dtype=torch.float64) * size).to(dtype)
    w_k = (torch.randn(E, E, generator=g, dtype=torch.float64) * size).to(dtype)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64).to(dtype)
    return x, w_q, w_k


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_clipped_heads_reach_tau_others_bit_identical(dtype, rel):
    x, w_q, w_k = _weights(dtype)
    before = loop_max_logits(x, w_q, w_k, H).tolist()
    tau = sorted(before)[1] * 1.01
    over = [s > tau for s in before]
    assert 0 < sum(over) < H  # some heads clipped, some not
    q0, k0 = w_q.clone(), w_k.clone()
    passed = torch.tensor(before, dtype=dtype)
    gamma = qk_clip_(w_q, w_k, passed, tau=tau, heads=H).tolist()
    after = loop_max_logits(x, w_q, w_k, H).tolist()
    for h in range(H):
        rows = slice(h * D, (h + 1) * D)
        if over[h]:
            assert after[h] <= tau * (1 + rel)  # the cap, up to the weights' rounding
            assert after[h] == pytest.approx(tau, rel=rel)  # and no lower: γ is exactly τ/S_max
            assert gamma[h] == pytest.approx(tau / float(passed[h]), rel=1e-15)
            torch.testing.assert_close(w_q[rows].double(), q0[rows].double() * math.sqrt(gamma[h]), rtol=rel, atol=0)
        else:
            assert torch.equal(w_q[rows], q0[rows]) and torch.equal(w_k[rows], k0[rows])
            assert after[h] == before[h]  # bit-identical logits
            assert gamma[h] == 1.0


def test_biases_scale_with_their_rows():
    x, w_q, w_k = _weights(torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    b_q, b_k = torch.randn(E, generator=g, dtype=torch.float64), torch.randn(E, generator=g, dtype=torch.float64)
    before = loop_max_logits(x, w_q, w_k, H, b_q=b_q, b_k=b_k)
    tau = float(before.min()) * 0.5 if float(before.min()) > 0 else 1.0
    qk_clip_(w_q, w_k, before, tau=tau, heads=H, b_q=b_q, b_k=b_k)
    after = loop_max_logits(x, w_q, w_k, H, b_q=b_q, b_k=b_k)
    for h in range(H):
        assert after[h] == pytest.approx(min(tau, float(before[h])), rel=1e-12)


def test_heads_without_logits_and_negative_maxima_are_untouched():
    _, w_q, w_k = _weights(torch.float64)
    q0 = w_q.clone()
    gamma = qk_clip_(w_q, w_k, torch.tensor([-math.inf, -5.0, 0.0, 1.0], dtype=torch.float64), tau=1.0, heads=H)
    assert torch.equal(w_q, q0) and torch.equal(gamma, torch.ones(H, dtype=torch.float64))


def test_bad_arguments():
    _, w_q, w_k = _weights(torch.float64)
    m = torch.ones(H)
    with pytest.raises(ValueError, match="tau"):
        qk_clip_(w_q, w_k, m, tau=0.0, heads=H)
    with pytest.raises(ValueError, match="heads=3"):
        qk_clip_(w_q, w_k, torch.ones(3), tau=1.0, heads=3)
    with pytest.raises(ValueError, match="max_logits"):
        qk_clip_(w_q, w_k, torch.ones(H + 1), tau=1.0, heads=H)
    with pytest.raises(ValueError, match="NaN"):
        qk_clip_(w_q, w_k, torch.tensor([1.0, float("nan"), 1.0, 1.0]), tau=1.0, heads=H)
    with pytest.raises(ValueError, match="same shape"):
        qk_clip_(w_q, w_k[:8], m, tau=1.0, heads=H)
    with pytest.raises(ValueError, match="b_q"):
        qk_clip_(w_q, w_k, m, tau=1.0, heads=H, b_q=torch.ones(3))


@pytest.mark.parametrize("causal", [False, True])
def test_max_attention_logits_matches_the_loop(causal):
    x, w_q, w_k = _weights(torch.float32, seed=3)
    mask = torch.rand(L, L, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    q = (x @ w_q.T).view(B, L, H, D).transpose(1, 2)
    k = (x @ w_k.T).view(B, L, H, D).transpose(1, 2)
    got = max_attention_logits(q, k, is_causal=causal, attn_mask=mask)
    want = loop_max_logits(x, w_q, w_k, H, causal=causal, mask=mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    none = max_attention_logits(q, k, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    assert bool((none == -math.inf).all())


def test_clip_attention_records_clips_and_resets():
    torch.manual_seed(5)
    att = ClipAttention(E, H, is_causal=True).double()
    with torch.no_grad():  # heads of different sizes, as in _weights
        _, w_q, w_k = _weights(torch.float64, seed=6)
        att.q_proj.weight.copy_(w_q)
        att.k_proj.weight.copy_(w_k)
    x = torch.randn(B, L, E, dtype=torch.float64)
    y = att(x)
    # the output is causal softmax attention, written out
    q, k, v = (x @ w.T for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight))
    heads = []
    for h in range(H):
        s = q[..., h * D:(h + 1) * D] @ k[..., h * D:(h + 1) * D].transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
        heads.append(torch.softmax(s, -1) @ v[..., h * D:(h + 1) * D])
    torch.testing.assert_close(y, torch.cat(heads, -1) @ att.out_proj.weight.T, rtol=1e-10, atol=1e-12)
    want = loop_max_logits(x, w_q, w_k, H, causal=True)
    torch.testing.assert_close(att.max_logits.double(), want, rtol=1e-6, atol=1e-6)
    att.eval()
    att(x * 10)  # eval forwards are not recorded
    torch.testing.assert_close(att.max_logits.double(), want, rtol=1e-6, atol=1e-6)
    assert "max_logits" not in att.state_dict()
    att.train()
    tau = float(want.sort().values[1:3].mean())  # between the second and third head
    gamma = att.qk_clip_(tau)
    assert bool((att.max_logits == -math.inf).all())
    assert int((gamma < 1).sum()) == int((want > tau).sum()) > 0
    att(x)
    assert bool((att.max_logits.double() <= tau * (1 + 1e-6)).all())


def test_muon_with_clip_after_each_step_keeps_logits_bounded():
    # K2's order: forward (records S_max), optimizer step, clip with that record. The step in between
    # can push logits past τ again, but not far: here they stay under 1.6τ while without clipping they
    # grow past 10τ; and a clip right after a forward caps those same logits at τ.
    def run(clip: bool) -> tuple[float, ClipAttention, torch.Tensor]:
        torch.manual_seed(7)
        att = ClipAttention(E, H)
        opt = Muon(att.parameters(), lr=0.2)
        x = torch.randn(B, L, E)
        worst = -math.inf
        for _ in range(15):
            opt.zero_grad()
            (-att(x).square().mean()).backward()  # pushes the weights, and the logits, up
            worst = max(worst, float(att.max_logits.max()))
            opt.step()
            if clip:
                att.qk_clip_(3.0)
            else:
                att.max_logits.fill_(-math.inf)
        return worst, att, x

    free, _, _ = run(False)
    capped, att, x = run(True)
    assert free > 10 * 3.0 and capped < 1.6 * 3.0
    att(x)
    att.qk_clip_(3.0)
    att(x)
    assert float(att.max_logits.max()) <= 3.0 * (1 + 1e-5)
