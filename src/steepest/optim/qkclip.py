r"""QK-Clip (MuonClip): cap each attention head's largest logit by rescaling its query and key weights.

Sources: Kimi Team, *Kimi K2: Open Agentic Intelligence* (2025), arXiv:2507.20534,
§2.1 "MuonClip"; Su, *QK-Clip: taking Muon one step further on the way to
scale-up*, kexue.fm/archives/11126.

For head h let ``S_max^h`` be the largest attention logit it produced over the
last batch (the scores the softmax sees, ``q·k/√d`` for scaled dot-product
attention). After the optimizer step, a head with ``S_max^h > τ`` gets

    γ_h = τ / S_max^h,    W_q^h ← √γ_h · W_q^h,    W_k^h ← √γ_h · W_k^h,

so its logits on the same inputs scale by γ_h and their maximum becomes τ;
heads at or below τ are left exactly as they were. Muon's updates can let query
and key weights grow until logits explode (the K2 report); clipping per head
touches only the heads that do.

- :func:`qk_clip_` — the in-place rescale of a (W_q, W_k) pair;
- :func:`max_attention_logits` — per-head max logits of given queries and keys
  (``F.scaled_dot_product_attention`` cannot report them);
- :class:`ClipAttention` — multi-head self-attention that records them while
  training and clips itself with :meth:`ClipAttention.qk_clip_`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_flag, check_int, check_number
from ..distributed import local_part
from ._matrices import dim0_range

__all__ = ["ClipAttention", "max_attention_logits", "qk_clip_"]


def _head_rows(w: Tensor, name: str, heads: int) -> int:
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (heads·d_head, d_model) weight, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if w.shape[0] % heads:
        raise ValueError(f"{name} has {w.shape[0]} rows, not a multiple of heads={heads}")
    return w.shape[0] // heads


def _scale_rows_(t: Tensor, rows_per_head: int, factors: dict[int, float]) -> None:
    """``t``'s rows of head h multiplied by ``factors[h]`` in place (this rank's rows of a sharded DTensor)."""
    loc = local_part(t)  # under no_grad a DTensor's own storage
    a, b = dim0_range(t)
    for h, s in factors.items():
        lo, hi = max(a, h * rows_per_head), min(b, (h + 1) * rows_per_head)
        if lo < hi:
            loc[lo - a:hi - a].mul_(s)


@torch.no_grad()
def qk_clip_(
    w_q: Tensor,
    w_k: Tensor,
    max_logits: Tensor,
    *,
    tau: float,
    heads: int,
    b_q: Tensor | None = None,
    b_k: Tensor | None = None,
) -> Tensor:
    r"""Per-head QK-Clip in place: heads whose max logit exceeded τ get their W_q, W_k rows times √(τ/S_max).

    Kimi K2's MuonClip (arXiv:2507.20534; Su, kexue.fm/archives/11126):
    ``γ_h = min(1, τ/S_max^h)``; the rows of head h in ``w_q`` and ``w_k``
    (``nn.Linear`` weights of shape (heads·d_head, d_model), head h owning rows
    ``[h·d_head, (h+1)·d_head)``) and in the optional biases ``b_q``, ``b_k`` are
    multiplied by ``√γ_h``. On the same inputs, a clipped head's logits scale by
    γ_h, so their maximum becomes τ (up to the rounding of the weights' dtype);
    heads with ``S_max ≤ τ`` (or ``-inf``: no logit) are not written.

    Under data parallelism every rank must pass the same ``max_logits``
    (all-reduce them with MAX first; :meth:`ClipAttention.qk_clip_` does). Weights
    may be FSDP2 DTensors sharded on rows; each rank scales its own rows.

    Args:
        w_q, w_k: query and key projection weights, same shape (multi-head
            attention; one key head per query head).
        max_logits: (heads,) the largest attention logit of each head (the scores
            the softmax sees), e.g. from :func:`max_attention_logits`.
        tau: the cap τ > 0 (K2 uses 100).
        heads: the number of heads.
        b_q, b_k: the projections' biases, if any (scaled with their rows so that
            ``q = W_q x + b_q`` scales exactly).

    Returns:
        The (heads,) float64 factors γ applied to the logits (1 for untouched heads).
    """
    tau = check_number("tau", tau, low=0.0, low_open=True)
    heads = check_int("heads", heads, low=1)
    dq = _head_rows(w_q, "w_q", heads)
    dk = _head_rows(w_k, "w_k", heads)
    if w_q.shape != w_k.shape:
        raise ValueError(f"w_q {tuple(w_q.shape)} and w_k {tuple(w_k.shape)} must have the same shape (one key "
                         "head per query head)")
    for name, b in (("b_q", b_q), ("b_k", b_k)):
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w_q.shape[0],)):
            raise ValueError(f"{name} must be a ({w_q.shape[0]},) bias, got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    if not isinstance(max_logits, Tensor) or max_logits.shape != (heads,):
        raise ValueError(f"max_logits must be a ({heads},) tensor, one value per head, got "
                         f"{tuple(max_logits.shape) if isinstance(max_logits, Tensor) else type(max_logits).__name__}")
    s = max_logits.detach().double().cpu()
    if bool(torch.isnan(s).any()) or bool((s == math.inf).any()):
        raise ValueError("max_logits holds NaN or +inf: the attention overflowed; clipping cannot restore it")
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
    factors = {h: math.sqrt(float(g)) for h, g in enumerate(gamma.tolist()) if g < 1.0}
    if factors:
        for t, d in ((w_q, dq), (w_k, dk), (b_q, dq), (b_k, dk)):
            if t is not None:
                _scale_rows_(t, d, factors)
    return gamma


@torch.no_grad()
def max_attention_logits(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
) -> Tensor:
    r"""Each head's largest attention logit ``max q_i·k_j·scale`` over the batch and all allowed (i, j).

    ``q`` (…, heads, L, E) and ``k`` (…, heads, S, E) in the layout of
    ``F.scaled_dot_product_attention``; ``scale`` defaults to 1/√E as there;
    ``is_causal`` allows j ≤ i (top-left aligned, as SDPA); a boolean
    ``attn_mask`` broadcastable to (…, heads, L, S) marks allowed pairs with True.
    Computed in float32 at least, one (…, heads, L, S) score tensor at a time like
    the attention itself. Returns a float (heads,) tensor; a head with no allowed
    pair gets ``-inf``.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim < 3:
            raise ValueError(f"{name} must be a floating (..., heads, length, head_dim) tensor")
    if q.shape[-3] != k.shape[-3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on heads and head_dim")
    check_flag("is_causal", is_causal)
    if attn_mask is not None and (not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool):
        raise TypeError("attn_mask must be a boolean tensor (True: the query may attend to the key)")
    E = q.shape[-1]
    sc = 1.0 / math.sqrt(E) if scale is None else check_number("scale", scale, low=None)
    cd = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(cd) @ k.to(cd).transpose(-1, -2)) * sc
    L, S = scores.shape[-2:]
    allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        allowed = allowed & attn_mask.to(scores.device)
    scores = scores.masked_fill(~allowed, -math.inf)
    heads = scores.shape[-3]
    return scores.transpose(0, -3).reshape(heads, -1).amax(1) if scores.numel() else \
        torch.full((heads,), -math.inf, dtype=cd, device=scores.device)


class ClipAttention(nn.Module):
    r"""Multi-head self-attention that records each head's max logit for QK-Clip (Kimi K2's MuonClip).

    ``y = W_o · concat_h softmax(q_h k_hᵀ/√d) v_h`` with ``q = W_q x``, ``k = W_k x``,
    ``v = W_v x`` (``nn.Linear`` projections ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``; inputs (batch, length, embed_dim)). The output comes from
    ``F.scaled_dot_product_attention``; in training mode each forward also
    computes the per-head max logits (:func:`max_attention_logits`) and keeps
    their running maximum in the buffer :attr:`max_logits` (not saved in the
    state_dict). After ``optimizer.step()``, :meth:`qk_clip_` clips the heads
    above τ (:func:`qk_clip_`) and resets the record.

    The projections are separate ``nn.Linear`` layers, so :class:`steepest.optim.Muon`
    treats each as its own matrix; mark ``heads=num_heads`` on ``q_proj`` and
    ``k_proj`` (``muon_param_groups(..., blocks=...)``) to orthogonalize per head.

    Args:
        embed_dim: model width, a multiple of ``num_heads``.
        num_heads: number of heads.
        bias: projections with biases (default False, as in K2).
        is_causal: causal attention (default False).
    """

    max_logits: Tensor

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = False, is_causal: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, low=1)
        check_int("num_heads", num_heads, low=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.is_causal = check_flag("is_causal", is_causal)
        kw = {"bias": check_flag("bias", bias), "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.register_buffer("max_logits", torch.full((num_heads,), -math.inf, device=device), persistent=False)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attention over ``x`` (batch, length, embed_dim); ``attn_mask`` boolean, True = may attend."""
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (batch, length, {self.embed_dim}), got {tuple(x.shape)}")
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.training:
            m = max_attention_logits(q, k, is_causal=self.is_causal, attn_mask=attn_mask)
            self.max_logits.copy_(torch.maximum(self.max_logits, m.to(self.max_logits)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.embed_dim))

    @torch.no_grad()
    def qk_clip_(self, tau: float, *, sync: bool = True) -> Tensor:
        """Clip the heads whose recorded max logit exceeds ``tau`` (:func:`qk_clip_`); reset the record.

        With ``sync`` and an initialised process group the record is first
        all-reduced with MAX, so every rank applies the same factors. Returns γ.
        """
        check_flag("sync", sync)
        m = self.max_logits.clone()
        import torch.distributed as dist

        if sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        gamma = qk_clip_(self.q_proj.weight, self.k_proj.weight, m, tau=tau, heads=self.num_heads,
                         b_q=self.q_proj.bias, b_k=self.k_proj.bias)
        self.max_logits.fill_(-math.inf)
        return gamma

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, is_causal={self.is_causal}"
