r"""Contrastive losses: InfoNCE and FlatNCE.

Sources: Su, *FlatNCE: is floating-point error why small-batch contrastive
learning does poorly?*, https://kexue.fm/archives/8586 ("the FlatNCE note"
below; equation numbers refer to it), and the paper it reads, Chen et al.,
*Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive Learners
With FlatNCE* (2021), arXiv:2107.01152.

One anchor has scores ``s_1..s_K`` (usually cosine similarity / temperature) and
a positive ``t``; the others are its negatives. With

    ξ = Σ_{i≠t} exp(s_i − s_t),

* **InfoNCE** (cross-entropy) is ``logsumexp_i s_i − s_t = log(1 + ξ)``;
* **FlatNCE** (Chen et al. 2021) is the loss ``ξ / sg(ξ)`` (``sg`` =
  stop-gradient). Its gradient is that of

      log ξ = logsumexp_{i≠t} s_i − s_t,

  i.e. cross-entropy with the positive *removed* from the logsumexp (the FlatNCE
  note writes it this way). Its value can be negative; that is normal.

Why it matters (the FlatNCE note): once pairs are separated, ξ → 0 and
``∇ log(1 + ξ) = ξ/(1 + ξ) · ∇ log ξ`` shrinks with ξ. Below the floating-point
unit roundoff (ξ < 2⁻²⁴ in float32, 2⁻⁸ in bfloat16) the cross-entropy gradient on
the positive is exactly zero while an adaptive optimizer still takes full-size
steps on whatever is left. FlatNCE keeps every anchor's gradient at O(1): each
anchor is weighted equally instead of by ``ξ/(1 + ξ)``.

Neighbours: in the batch (SimCLR / NT-Xent) form FlatNCE *is* the Decoupled
Contrastive Learning loss (Yeh et al. 2022, "Decoupled Contrastive Learning",
arXiv:2110.06848; lightly's ``DCLLoss`` with ``weight_fn=None``): value and
gradient agree (tested in ``tests/test_losses.py``). The official FlatCLR code
descends ``exp(log ξ − sg(log ξ))`` and logs the InfoNCE value; ``value=`` below
offers both without changing the gradient.

Past the batch: a :class:`NegativeQueue` (MoCo's queue: He et al., *Momentum
Contrast for Unsupervised Visual Representation Learning*, 2020,
arXiv:1911.05722) keeps the embeddings of earlier batches as extra negatives,
passed as ``negatives=`` to :func:`pair_logits`, :func:`info_nce_pairs`,
:func:`flat_nce_pairs` and the loss modules. ``weighting="vmf"`` turns the FlatNCE
pair loss into DCLW, DCL with the von Mises–Fisher weight on the positive
(Yeh et al. 2022, arXiv:2110.06848).

Everything is computed in float32 or wider (float16/bfloat16 inputs are upcast,
autocast is switched off inside) with ``logsumexp``, so ±1e4 logits stay finite.
InfoNCE is formed from ``log ξ`` as ``softplus(log ξ)`` rather than
``logsumexp_i s_i − s_t``: the latter rounds the logsumexp (≈ s_t) to the float
spacing of |s_t| and loses ξ below it (at tiny loss its float32 gradient has O(1)
relative error, worse than ``F.cross_entropy``'s). The float32 gradient is within
~1e-5 relative of float64 for every ξ ≥ 1e-12 (tested), and the gradient on the
positive, ``−ξ/(1 + ξ)``, does not round to zero below 2⁻²⁴.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_flag, check_int, check_number

__all__ = [
    "info_nce",
    "flat_nce",
    "pair_logits",
    "info_nce_pairs",
    "flat_nce_pairs",
    "nce_diagnostics",
    "InfoNCELoss",
    "FlatNCELoss",
    "NegativeQueue",
    "vmf_weights",
]

_REDUCTIONS = ("mean", "sum", "none")
_VALUES = ("log_xi", "info_nce", "xi_over_sg")
_WEIGHTINGS = (None, "vmf")
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _compute_dtype(x: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32 if x.dtype in _HALF else x.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


def _check_reduction(reduction: str) -> None:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        if x.numel() == 0:  # torch would return NaN
            raise ValueError("logits has no rows (B = 0): the mean over no anchors is undefined; use reduction='sum'")
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _check_value(value: Any) -> None:
    if not isinstance(value, str) or value not in _VALUES:
        raise ValueError(f"value must be one of {_VALUES}, got {value!r}")


def _check_logits(logits: Any) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}; cast it with .float()")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, K) (one row of K scores per anchor), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(
            f"logits has K={logits.shape[1]} column(s): a contrastive loss needs at least one negative "
            "besides the positive (K >= 2)"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf; check the scores (and the temperature) upstream")


def _positive_mask(logits: Tensor, target: Tensor | None, positive_mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """(target or None, boolean (B, K) mask of positives), validated."""
    B, K = logits.shape
    if (target is None) == (positive_mask is None):
        raise ValueError("give exactly one of target (B,) indices or positive_mask (B, K) booleans")
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer indices (torch.long), got dtype {target.dtype}")
        if target.shape != (B,):
            raise ValueError(f"target must have shape (B,) = ({B},) to match logits, got {tuple(target.shape)}")
        if B and (target.min() < 0 or target.max() >= K):
            raise ValueError(f"target indices must lie in [0, K) = [0, {K}); got min {int(target.min())}, max {int(target.max())}")
        target = target.to(device=logits.device, dtype=torch.long)
        mask = F.one_hot(target, K).bool()
        return target, mask
    assert positive_mask is not None
    if not isinstance(positive_mask, Tensor) or positive_mask.dtype != torch.bool:
        raise TypeError("positive_mask must be a torch.bool tensor of shape (B, K)")
    if positive_mask.shape != (B, K):
        raise ValueError(f"positive_mask must have the shape of logits {(B, K)}, got {tuple(positive_mask.shape)}")
    mask = positive_mask.to(logits.device)
    n_pos = mask.sum(1)
    if B and bool((n_pos == 0).any()):
        raise ValueError("every row of positive_mask needs at least one positive (True)")
    if B and bool((n_pos == K).any()):
        raise ValueError("every row of positive_mask needs at least one negative (False); K = 1 negatives-free rows are undefined")
    return None, mask


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` without ``F.softplus``'s linear cut-off at 20 (a 1e-10 relative error in float64)."""
    return -F.logsigmoid(-x)


def _log_xi(
    logits: Tensor, target: Tensor | None, positive_mask: Tensor | None, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor ``log ξ`` in the compute dtype, with the scores ``x`` and positives ``mask`` it came from.

    Scores are shifted by a positive before the logsumexp, so its rounding is
    relative to log ξ rather than to |s| (at s ≈ 1e3 in float32 the plain form
    was off by ~1e-5 absolute, at 1e30 by everything).
    """
    _check_logits(logits)
    target, mask = _positive_mask(logits, target, positive_mask)
    cd = _compute_dtype(logits, dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(cd)
        if target is not None:
            d = x - x.gather(1, target[:, None])  # exactly 0 at the positive
            log_xi = torch.logsumexp(d.masked_fill(mask, -math.inf), dim=1)
        else:
            r = x.detach().masked_fill(~mask, -math.inf).amax(1, keepdim=True)
            d = x - r
            log_xi = torch.logsumexp(d.masked_fill(mask, -math.inf), dim=1) - torch.logsumexp(
                d.masked_fill(~mask, -math.inf), dim=1
            )
    return log_xi, x, mask


def _textbook_terms(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logsumexp over positives, over negatives, over all)`` evaluated plainly in x's dtype."""
    pos = torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)
    return pos, torch.logsumexp(x.masked_fill(mask, -math.inf), dim=1), torch.logsumexp(x, dim=1)


# --------------------------------------------------------------------------- logits API
def info_nce(
    logits: Tensor,
    target: Tensor | None = None,
    reduction: str = "mean",
    *,
    positive_mask: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""InfoNCE: ``logsumexp_i s_i − s_t = log(1 + ξ)`` per anchor (the FlatNCE note, eq. 1).

    The InfoNCE loss of van den Oord et al., *Representation Learning with
    Contrastive Predictive Coding* (2018), arXiv:1807.03748.

    With ``target`` (B,) indices this equals ``F.cross_entropy(logits, target,
    reduction=reduction)``. With ``positive_mask`` (B, K) booleans (several
    positives per row, set P) it is ``logsumexp_i s_i − logsumexp_{p∈P} s_p`` —
    the "log of summed positive probability" form (Khosla et al. 2020, L_in),
    which keeps ``InfoNCE = log(1 + ξ)`` with ``ξ = Σ_{i∉P} e^{s_i} / Σ_{p∈P} e^{s_p}``.

    Args:
        logits: (B, K) scores, K ≥ 2, finite.
        target: (B,) integer index of each row's positive.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        positive_mask: alternative to ``target``.
        dtype: compute dtype; default float32 for float16/bfloat16 inputs, else the
            input's dtype. Autocast is disabled inside. A half dtype (float16,
            bfloat16) is for studying round-off: it evaluates the textbook
            ``logsumexp_i s_i − s_t`` in that dtype, as ``F.cross_entropy`` does,
            so the positive's gradient rounds to 0 once ξ is below its unit roundoff.

    Returns:
        The loss in the compute dtype (per row for ``reduction="none"``).
        ``reduction="mean"`` over B = 0 rows is a ``ValueError`` (not NaN).

    Precision (float32 and float64 compute): computed as ``softplus(log ξ)`` with
    ``log ξ = logsumexp_{i≠t}(s_i − s_t)``, so value and gradient keep the relative
    precision of ξ, whatever the size of the scores: with u the unit roundoff,
    ``|Δ log ξ| ≲ 32u(1 + |log ξ| + log K)``, the value is off by at most that times
    ``σ(log ξ)`` and each gradient entry g by that plus ``32u·|log|g||`` relative
    (tested over scores 1e-30…1e30). In float32 the gradient stays within 1e-5
    of the float64 gradient of the same scores for ξ down to 1e-12 and is never less
    precise than ``F.cross_entropy``'s, which rounds the positive's gradient
    ``−ξ/(1 + ξ)`` to zero below ξ ≈ 6e-8. Values beyond the compute dtype's
    range overflow to inf.
    """
    _check_reduction(reduction)
    log_xi, x, mask = _log_xi(logits, target, positive_mask, dtype)
    if x.dtype in _HALF:
        pos, _, lse_all = _textbook_terms(x, mask)
        return _reduce(lse_all - pos, reduction)
    # log(1 + ξ) from log ξ: ``logsumexp_i s_i − s_t`` rounds the logsumexp to the
    # spacing of |s| and loses ξ below it; here ∂/∂s_t = −σ(log ξ) keeps ξ's digits
    return _reduce(_softplus(log_xi), reduction)


def flat_nce(
    logits: Tensor,
    target: Tensor | None = None,
    reduction: str = "mean",
    *,
    positive_mask: Tensor | None = None,
    value: str = "log_xi",
    dtype: torch.dtype | None = None,
    positive_weight: Tensor | None = None,
) -> Tensor:
    r"""FlatNCE (Chen et al. 2021; the FlatNCE note, eqs. 3–5): gradient of ``ξ / sg(ξ)`` = gradient of ``log ξ``.

    ``log ξ = logsumexp_{i≠t} s_i − s_t``: cross-entropy with the positive excluded
    from the logsumexp, so ``∂/∂s_t = −1`` for every anchor however well separated
    (InfoNCE's is ``−ξ/(1 + ξ)``). With ``positive_mask`` all positives P are
    excluded: ``log ξ = logsumexp_{i∉P} s_i − logsumexp_{p∈P} s_p``.

    The gradient is the same whatever ``value`` reports:

    * ``"log_xi"`` (default): ``log ξ``; can be negative (the FlatNCE note: "that is normal").
    * ``"info_nce"``: the InfoNCE value ``log(1 + ξ)``, for monitoring — computed as
      ``sg(log(1 + ξ)) + log ξ − sg(log ξ)``.
    * ``"xi_over_sg"``: the paper's form ``exp(log ξ − sg(log ξ))``, value 1.

    ``positive_weight`` (B,) weights each row's positive score:
    ``L = logsumexp_{i≠t} s_i − w·s_t = log ξ + (1 − w)·s_t`` (with ``positive_mask``,
    ``s_t`` is the logsumexp over the positives) — DCLW's weighted positive
    (Yeh et al. 2022, arXiv:2110.06848; :func:`vmf_weights`). Gradients flow into
    the weights too. ``value`` then reports ``L``, its InfoNCE ``log(1 + ξ)`` or
    ``exp(L − sg(L))``.

    Args are those of :func:`info_nce`; K ≥ 2 (at least one negative) is required.
    Precision as for :func:`info_nce`: ``|Δ log ξ| ≲ 32u(1 + |log ξ| + log K)``; a
    half ``dtype`` evaluates the textbook ``logsumexp_{i≠t} s_i − s_t`` in that dtype.
    """
    _check_reduction(reduction)
    _check_value(value)
    log_xi, x, mask = _log_xi(logits, target, positive_mask, dtype)
    if x.dtype in _HALF:
        pos, lse_neg, _ = _textbook_terms(x, mask)
        log_xi = lse_neg - pos
    monitor = log_xi
    if positive_weight is not None:
        if not isinstance(positive_weight, Tensor) or positive_weight.shape != (x.shape[0],):
            raise ValueError(f"positive_weight must be a ({x.shape[0]},) tensor, one weight per row, got "
                             f"{tuple(positive_weight.shape) if isinstance(positive_weight, Tensor) else positive_weight!r}")
        s_pos = torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)  # s_t exactly for one positive
        log_xi = log_xi + (1 - positive_weight.to(x.dtype)) * s_pos
    if value == "info_nce":
        # value softplus(log ξ) exactly (adding sg(softplus − log ξ) to log ξ cancelled at tiny ξ)
        out = _softplus(monitor).detach() + (log_xi - log_xi.detach())
    elif value == "xi_over_sg":
        out = torch.exp(log_xi - log_xi.detach())
    else:
        out = log_xi
    return _reduce(out, reduction)


# --------------------------------------------------------------------------- pair (NT-Xent) API
def _check_pair(z1: Any, z2: Any) -> None:
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D) (one embedding per row), got {tuple(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (row i of each is a positive pair), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    for name, z in (("z1", z1), ("z2", z2)):
        if not torch.isfinite(z).all():
            raise ValueError(f"{name} contains NaN or Inf")


def _check_temperature(temperature: float | Tensor, cd: torch.dtype | None = None) -> float:
    t = temperature
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"temperature must be a positive float or floating scalar tensor, got dtype {t.dtype}")
        t = float(t.detach())
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"temperature must be a positive float or scalar tensor, got {type(temperature).__name__}")
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be positive and finite, got {t}")
    # cosines lie in [-1, 1]: the logits are finite iff 1/τ is
    if cd is not None and not 1.0 / t <= torch.finfo(cd).max:
        raise ValueError(
            f"temperature {t:.3g} is too small for {cd}: the logits cos/temperature overflow; "
            "use a larger temperature or dtype=torch.float64"
        )
    return float(t)


def _unit_rows(z: Tensor) -> Tensor:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 with everything, gradient 0).

    Dividing by the row's largest entry first keeps the norm in range:
    ``F.normalize`` alone overflows above ~1e19 in float32 and, below its 1e-12
    floor, returns rows shorter than 1. At a zero row it has gradient 1e12·(…),
    which overflows; a zero row has no direction, so it gets none.
    """
    m = z.detach().abs().amax(dim=1, keepdim=True)
    nonzero = m > 0
    h = F.normalize(z / torch.where(nonzero, m, torch.ones_like(m)), dim=1)
    return torch.where(nonzero, h, torch.zeros_like(h))


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is unavailable or not initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 WITH gradients (equal sizes on every rank).

    Backward is the adjoint, a reduce-scatter: rank r's embeddings receive
    Σ_q ∂L_q/∂z_r. With DDP averaging the ranks' parameter gradients this is
    exactly the one-process gradient of the mean loss over the concatenated batch.
    (``torch.distributed.nn.functional.all_gather`` does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        z = z.contiguous()
        out = z.new_empty((dist.get_world_size() * z.shape[0], *z.shape[1:]))
        dist.all_gather_into_tensor(out, z)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
        return out


def _gather(z: Tensor) -> Tensor:
    return _AllGather.apply(z)


def _pair_logits_from(
    h1: Tensor, h2: Tensor, g1: Tensor, g2: Tensor, offset: int, temperature: float | Tensor,
    extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Local rows ``cat(h1, h2)`` (2n) against global columns ``cat(g1, g2)`` (2M), self removed, then ``extra``.

    ``h1 = g1[offset:offset+n]``: the local views sit at ``offset`` in the global batch.
    ``extra`` (Q, D) unit rows are appended as Q more columns (negatives of every row).
    """
    n, M = h1.shape[0], g1.shape[0]
    rows = torch.cat([h1, h2], 0)
    cols = torch.cat([g1, g2], 0)
    sim = rows @ cols.T / temperature  # (2n, 2M)
    i = torch.arange(n, device=rows.device)
    self_idx = torch.cat([offset + i, M + offset + i])
    pos_idx = torch.cat([M + offset + i, offset + i])
    keep = torch.ones(2 * n, 2 * M, dtype=torch.bool, device=rows.device)
    keep[torch.arange(2 * n, device=rows.device), self_idx] = False
    logits = sim[keep].view(2 * n, 2 * M - 1)
    if extra is not None and extra.shape[0]:
        logits = torch.cat([logits, rows @ extra.T / temperature], 1)
    target = pos_idx - (pos_idx > self_idx).long()
    return logits, target


def _negatives(negatives: Any, d: int, cd: torch.dtype, device: torch.device) -> Tensor | None:
    """Extra negatives as (Q, D) unit rows in the compute dtype; a queue's are its stored embeddings."""
    if negatives is None:
        return None
    if isinstance(negatives, NegativeQueue):
        negatives = negatives.negatives()
    if not isinstance(negatives, Tensor) or not negatives.is_floating_point() or negatives.dim() != 2:
        raise TypeError("negatives must be a NegativeQueue or a floating (Q, D) tensor of embeddings")
    if negatives.shape[1] != d:
        raise ValueError(f"negatives have dimension {negatives.shape[1]}, the views {d}")
    if not torch.isfinite(negatives).all():
        raise ValueError("negatives contain NaN or Inf")
    return _unit_rows(negatives.to(device=device, dtype=cd))


def _pair_parts(z1: Tensor, z2: Tensor, temperature: float | Tensor, gather_distributed: bool,
                dtype: torch.dtype | None, negatives: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(logits, target, g1, g2, offset)``: :func:`pair_logits` plus the global unit views and this rank's offset."""
    _check_pair(z1, z2)
    check_flag("gather_distributed", gather_distributed)
    cd = _compute_dtype(z1, dtype)
    _check_temperature(temperature, cd)
    rank, world = _world() if gather_distributed else (0, 1)
    n = z1.shape[0]
    if n * world < 2:
        raise ValueError(
            f"the pair losses need N >= 2 pairs in the (global) batch: with N = {n * world} a view has no negative"
        )
    with torch.autocast(device_type=z1.device.type, enabled=False):
        extra = _negatives(negatives, z1.shape[1], cd, z1.device)
        h1 = _unit_rows(z1.to(cd))
        h2 = _unit_rows(z2.to(cd))
        if world > 1:  # one collective for both views: (W·2n, d) → per rank [h1; h2]
            g = _gather(torch.cat([h1, h2])).view(world, 2, n, -1)
            g1, g2 = g[:, 0].reshape(world * n, -1), g[:, 1].reshape(world * n, -1)
        else:
            g1, g2 = h1, h2
        t = temperature.to(cd) if isinstance(temperature, Tensor) else temperature
        logits, target = _pair_logits_from(h1, h2, g1, g2, rank * n, t, extra)
    return logits, target, g1, g2, rank * n


def pair_logits(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor = 0.1,
    *,
    gather_distributed: bool = False,
    dtype: torch.dtype | None = None,
    negatives: Any = None,
) -> tuple[Tensor, Tensor]:
    r"""The NT-Xent score matrix of 2N views (SimCLR; lightly's ``NTXentLoss`` layout), self excluded.

    SimCLR: Chen, Kornblith, Norouzi, Hinton, *A Simple Framework for
    Contrastive Learning of Visual Representations* (2020), arXiv:2002.05709.

    Views ``v = [z1; z2]`` are L2-normalised (at any scale, 1e-30…1e30; a zero
    view stays zero: cosine 0 with every view, gradient 0); row ``a`` holds
    ``cos(v_a, v_b) / temperature`` for every ``b ≠ a`` (2N − 1 columns); its
    positive is the other view of the same sample (``a ± N``), the other 2N − 2 are
    negatives. Returns ``(logits (2N, 2N−1), target (2N,))`` for :func:`info_nce`,
    :func:`flat_nce` or :func:`nce_diagnostics`.

    With ``gather_distributed=True`` and an initialised process group of world size
    W > 1, the columns are all W·2N views, gathered with gradients
    (all-gather whose backward sums the ranks' gradients; equal N on every rank), and the
    rows are this rank's 2N views. A per-rank mean loss then, after DDP's gradient
    averaging over ranks, has exactly the one-process gradient of the mean loss on
    the concatenated batch (no world-size factor). Without an initialised group
    (or W = 1) it is the local computation.

    ``negatives``: extra negatives appended to every row — a :class:`NegativeQueue`
    (its stored embeddings) or a (Q, D) tensor of embeddings; they are
    L2-normalised like the views and give Q more columns ``cos(v_a, n_j)/τ`` after
    the 2N − 1 batch columns (logits (2N, 2N − 1 + Q); the target is unchanged). A
    queue's embeddings carry no gradient; a tensor is used as given (detach it if
    it should get none). They are not gathered: every rank should hold the same
    ones (a queue filled with ``enqueue(..., gather_distributed=True)`` does).
    """
    logits, target, _, _, _ = _pair_parts(z1, z2, temperature, gather_distributed, dtype, negatives)
    return logits, target


def info_nce_pairs(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor = 0.1,
    *,
    reduction: str = "mean",
    gather_distributed: bool = False,
    dtype: torch.dtype | None = None,
    negatives: Any = None,
) -> Tensor:
    r"""NT-Xent (SimCLR; lightly's ``NTXentLoss``): :func:`info_nce` on :func:`pair_logits`.

    Per view a: ``−log( e^{c_{a,a⁺}/τ} / Σ_{b≠a} e^{c_{ab}/τ} )`` with ``c`` the cosine
    similarity, averaged over the 2N views. N ≥ 2. ``negatives`` (a
    :class:`NegativeQueue` or a (Q, D) tensor) adds Q negatives to every view's
    sum (:func:`pair_logits`), as MoCo's queue does.
    """
    _check_reduction(reduction)
    logits, target = pair_logits(z1, z2, temperature, gather_distributed=gather_distributed, dtype=dtype,
                                 negatives=negatives)
    return info_nce(logits, target, reduction, dtype=dtype)


def flat_nce_pairs(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor = 0.1,
    *,
    reduction: str = "mean",
    value: str = "log_xi",
    gather_distributed: bool = False,
    dtype: torch.dtype | None = None,
    negatives: Any = None,
    weighting: str | None = None,
    sigma: float = 0.5,
) -> Tensor:
    r"""FlatCLR (Chen et al. 2021) / DCL: :func:`flat_nce` on :func:`pair_logits`.

    Per view a: ``log Σ_{b∉{a,a⁺}} e^{c_{ab}/τ} − c_{a,a⁺}/τ`` — exactly the
    Decoupled Contrastive Learning loss (Yeh et al. 2022, eq. 6; lightly's
    ``DCLLoss(weight_fn=None)``), value and gradient. N ≥ 2. ``value`` as in
    :func:`flat_nce`; ``negatives`` as in :func:`info_nce_pairs`.

    ``weighting="vmf"``: DCLW (Yeh et al. 2022, arXiv:2110.06848, §4), the positive
    weighted by the von Mises–Fisher weight of its pair,
    ``log Σ_{b∉{a,a⁺}} e^{c_{ab}/τ} − w_i·c_{a,a⁺}/τ`` with
    ``w_i = 2 − N·exp(c_i/σ) / Σ_j exp(c_j/σ)`` (:func:`vmf_weights`; ``c_i`` the
    cosine of pair i, the sum over the N pairs of the global batch, ``sigma`` = σ,
    0.5 in the paper). Both views of pair i get ``w_i``; as in the reference
    implementations the weight is differentiated through.
    """
    _check_reduction(reduction)
    _check_value(value)
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    logits, target, g1, g2, offset = _pair_parts(z1, z2, temperature, gather_distributed, dtype, negatives)
    weight = None
    if weighting == "vmf":
        n = z1.shape[0]
        w = vmf_weights(g1, g2, sigma)[offset:offset + n]
        weight = torch.cat([w, w])
    return flat_nce(logits, target, reduction, value=value, dtype=dtype, positive_weight=weight)


def vmf_weights(z1: Tensor, z2: Tensor, sigma: float = 0.5) -> Tensor:
    r"""DCLW's von Mises–Fisher weights of N positive pairs (Yeh et al. 2022, arXiv:2110.06848, §4).

    ``w_i = 2 − N·exp(c_i/σ) / Σ_j exp(c_j/σ)`` with ``c_i = cos(z1_i, z2_i)``
    (``2 − N·softmax(c/σ)``): pairs that are already close get less weight, far
    ones more; the weights average to 1. Differentiable.
    """
    sigma = check_number("sigma", sigma, low=0.0, low_open=True)
    _check_pair(z1, z2)
    c = (_unit_rows(z1) * _unit_rows(z2)).sum(1)
    return 2 - z1.shape[0] * torch.softmax(c / sigma, dim=0)


# --------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def nce_diagnostics(
    logits: Tensor,
    target: Tensor | None = None,
    *,
    positive_mask: Tensor | None = None,
    quantiles: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 1.0),
    xi_threshold: float = 1e-3,
    resolution_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    r"""Statistics of ``ξ = Σ_{i≠t} e^{s_i − s_t}`` over the anchors, in float64.

    Returns a dict with

    * ``log10_xi_quantiles``: ``{q: quantile of log₁₀ ξ}`` (log scale: ξ can underflow);
    * ``share_xi_below``: share of anchors with ``ξ < xi_threshold``;
    * ``share_below_resolution``: share of anchors whose InfoNCE gradient on the
      positive, ``ξ/(1 + ξ)``, is below the unit roundoff ``u = eps/2`` of
      ``resolution_dtype`` (2⁻²⁴ in float32, 2⁻⁸ in bfloat16): there
      ``softmax − onehot`` rounds the positive's gradient to exactly 0 (the FlatNCE
      note's floating-point argument; tests check it against ``F.cross_entropy``'s gradient);
    * ``info_nce`` and ``log_xi``: the means of ``log(1 + ξ)`` and ``log ξ``;
    * ``n``: number of anchors (B ≥ 1; no rows is a ``ValueError``).

    ``log ξ`` is formed from score differences in float64, so the quantiles are
    accurate to ~1e-15 (1 + |log ξ|) whatever the size of the scores.
    """
    xi_threshold = check_number("xi_threshold", xi_threshold, low=0.0, low_open=True)
    if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence):
        raise TypeError(f"quantiles must be a sequence of numbers in [0, 1], got {quantiles!r}")
    qs = [check_number("quantiles", q, low=0.0, high=1.0) for q in quantiles]
    if not isinstance(resolution_dtype, torch.dtype) or not resolution_dtype.is_floating_point:
        raise TypeError(f"resolution_dtype must be a floating torch.dtype, got {resolution_dtype!r}")
    _check_logits(logits)
    if logits.shape[0] == 0:
        raise ValueError("logits has no rows (B = 0): there are no anchors to describe")
    log_xi, _, _ = _log_xi(logits.detach(), target, positive_mask, torch.float64)
    log10_xi = log_xi / math.log(10.0)
    u = torch.finfo(resolution_dtype).eps / 2
    # ξ/(1+ξ) < u  ⟺  log ξ < log(u/(1−u))
    below_res = log_xi < math.log(u / (1 - u))
    n = log_xi.numel()
    qv = torch.quantile(log10_xi, torch.tensor(qs, dtype=torch.float64)) if qs else torch.zeros(0)
    return {
        "n": n,
        "log10_xi_quantiles": {q: float(v) for q, v in zip(qs, qv.tolist())},
        "share_xi_below": float((log_xi < math.log(xi_threshold)).double().mean()),
        "share_below_resolution": float(below_res.double().mean()),
        "info_nce": float(_softplus(log_xi).mean()),
        "log_xi": float(log_xi.mean()),
    }


# --------------------------------------------------------------------------- queue
class NegativeQueue(nn.Module):
    r"""A fixed-size FIFO of past embeddings, used as extra negatives (MoCo's queue, arXiv:1911.05722).

    Holds up to ``size`` rows of dimension ``dim`` in the buffer ``embeddings``
    (with ``ptr``, the next slot to write, and ``count``, the slots filled — all
    saved in the ``state_dict``). :meth:`enqueue` stores L2-normalised, detached
    copies of a batch, overwriting the oldest rows once full (a batch larger than
    the queue keeps its last ``size`` rows); :meth:`negatives` returns the stored
    rows, oldest first, as a new tensor that carries no gradient. Pass the queue as
    ``negatives=`` to :func:`pair_logits`, :func:`info_nce_pairs`,
    :func:`flat_nce_pairs`, :class:`InfoNCELoss` or :class:`FlatNCELoss`; compute the
    loss first, then enqueue the batch (MoCo's order: a batch is never its own
    queued negative).

    Args:
        size: capacity, in rows (≥ 1).
        dim: embedding dimension (≥ 1).
        dtype: storage dtype (default float32).
        device: storage device.
    """

    embeddings: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        check_int("size", size, low=1)
        check_int("dim", dim, low=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        """Capacity in rows."""
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, z: Tensor, *, gather_distributed: bool = False) -> None:
        """Append the rows of ``z`` (N, dim), normalised and detached, oldest rows overwritten first.

        With ``gather_distributed=True`` and an initialised process group of world
        size W > 1, the rows of every rank are gathered first (rank order, equal N on
        every rank), so that all ranks keep the same queue.
        """
        check_flag("gather_distributed", gather_distributed)
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be a floating (N, {self.dim}) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or Inf; a queued embedding would poison every later loss")
        h = _unit_rows(z.detach().to(torch.promote_types(z.dtype, torch.float32)))
        rank, world = _world() if gather_distributed else (0, 1)
        if world > 1:
            import torch.distributed as dist

            h = h.contiguous()
            out = h.new_empty((world * h.shape[0], h.shape[1]))
            dist.all_gather_into_tensor(out, h)
            h = out
        n, size = h.shape[0], self.size
        if n == 0:
            return
        start = int(self.ptr)
        if n > size:  # only the last `size` rows would survive the wrap-around
            start, h = (start + n - size) % size, h[n - size:]
        idx = (start + torch.arange(h.shape[0], device=self.embeddings.device)) % size
        self.embeddings.index_copy_(0, idx, h.to(self.embeddings))
        self.ptr.fill_((int(self.ptr) + n) % size)
        self.count.fill_(min(size, int(self.count) + n))

    def negatives(self) -> Tensor:
        """The stored rows, oldest first: a new (len(self), dim) tensor without gradient."""
        k, p = int(self.count), int(self.ptr)
        if k < self.size:
            return self.embeddings[:k].detach().clone()
        return torch.cat([self.embeddings[p:], self.embeddings[:p]]).detach()

    def reset(self) -> None:
        """Empty the queue."""
        self.embeddings.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={len(self)}"


# --------------------------------------------------------------------------- modules
class _PairLoss(nn.Module):
    """Temperature, reduction and distributed options shared by the pair-loss modules.

    The arguments are documented in :class:`InfoNCELoss`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        learnable_temperature: bool = False,
        temperature_range: tuple[float, float] = (0.01, 1.0),
        gather_distributed: bool = False,
        reduction: str = "mean",
        negatives: NegativeQueue | None = None,
    ) -> None:
        super().__init__()
        if negatives is not None and not isinstance(negatives, NegativeQueue):
            raise TypeError(f"negatives must be a NegativeQueue or None, got {type(negatives).__name__}; pass a "
                            "fixed tensor of negatives to the functions (info_nce_pairs, flat_nce_pairs) instead")
        self.negatives = negatives
        temperature = _check_temperature(temperature, torch.float64)
        _check_reduction(reduction)
        check_flag("learnable_temperature", learnable_temperature)
        check_flag("gather_distributed", gather_distributed)
        if isinstance(temperature_range, (str, bytes)) or not isinstance(temperature_range, Sequence) or len(temperature_range) != 2:
            raise ValueError(f"temperature_range must be a pair (low, high), got {temperature_range!r}")
        lo = check_number("temperature_range", temperature_range[0], low=0.0, low_open=True)
        hi = check_number("temperature_range", temperature_range[1], low=lo)
        if learnable_temperature and not lo <= temperature <= hi:
            raise ValueError(f"temperature {temperature} lies outside temperature_range {temperature_range}")
        self.learnable_temperature = bool(learnable_temperature)
        self.temperature_range = (lo, hi)
        self.gather_distributed = bool(gather_distributed)
        self.reduction = reduction
        if self.learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self._temperature = float(temperature)

    @property
    def temperature(self) -> float | Tensor:
        """τ; when learnable, ``exp(log_temperature)`` clamped to ``temperature_range`` (a differentiable tensor).

        The clamp is straight-through (its gradient is 1 outside the range too):
        a clamp inside the graph would give log τ an exactly zero gradient once an
        optimizer carries it past a bound, and it could never come back.
        """
        if not self.learnable_temperature:
            return self._temperature
        lo, hi = self.temperature_range
        lt = self.log_temperature
        return (lt + (lt.clamp(math.log(lo), math.log(hi)) - lt).detach()).exp()

    def _project_temperature(self) -> None:
        """Put a learnable log τ back into range in place (CLIP clamps its logit scale after each step)."""
        if self.learnable_temperature:
            lo, hi = self.temperature_range
            with torch.no_grad():
                self.log_temperature.clamp_(math.log(lo), math.log(hi))

    def _enqueue(self, z2: Tensor) -> None:
        """After the loss: the batch's second views join the queue (training mode only)."""
        if self.negatives is not None and self.training:
            self.negatives.enqueue(z2, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        t = float(self.temperature.detach()) if self.learnable_temperature else self._temperature
        return (
            f"temperature={t:.4g}, learnable_temperature={self.learnable_temperature}, "
            f"gather_distributed={self.gather_distributed}, reduction={self.reduction!r}"
        )


class InfoNCELoss(_PairLoss):
    r"""Module form of :func:`info_nce_pairs` (NT-Xent): ``loss = module(z1, z2)``.

    ``z1``, ``z2``: ``(N, D)`` embeddings of two views, row ``i`` of each a
    positive pair, N ≥ 2 (in the global batch when gathering).

    ``learnable_temperature=True`` learns ``log τ`` (an ``nn.Parameter``) kept in
    ``temperature_range=(low, high)`` (CLIP-style clamping: without it τ shrinks
    without bound once pairs separate). Each forward first projects the parameter
    back into ``[log low, log high]`` in place (under ``no_grad``, as CLIP clamps
    after each step), then uses ``τ = exp(log τ)``: the gradient at a bound is the
    true one, so a log τ carried out of range (e.g. by Adam's momentum) returns
    as soon as the loss favours it. (A clamp inside the graph gives an exactly zero
    gradient out of range; τ then stays at the bound for good.)

    Args:
        temperature: τ, the divisor of the cosine similarities; default ``0.1``.
            A positive finite float. With ``learnable_temperature`` it is the
            initial value and must lie in ``temperature_range``.
        learnable_temperature: default ``False``. If ``True``, τ is learned as
            the parameter ``log_temperature`` (initialised to ``log temperature``);
            the :attr:`temperature` property then returns a differentiable tensor.
        temperature_range: ``(low, high)``, default ``(0.01, 1.0)``, with
            ``0 < low <= high < inf``. The range a learnable τ is kept in; it is
            validated but unused when τ is fixed.
        gather_distributed: default ``False``. If ``True`` and a process group
            of world size W > 1 is initialised, the negatives are all W·2N views,
            gathered with gradients (see :func:`pair_logits`); equal N on every
            rank is required. Without a group it is the local loss.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per
            local view, shape ``(2N,)``).
        negatives: a :class:`NegativeQueue` (a submodule: saved in the
            ``state_dict``) or None. Each forward appends its stored embeddings to
            every view's negatives, then — in training mode — enqueues the batch's
            ``z2`` (the key view, as MoCo enqueues its keys; gathered over the ranks
            with ``gather_distributed``).
    """

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        self._project_temperature()
        loss = info_nce_pairs(
            z1, z2, self.temperature, reduction=self.reduction, gather_distributed=self.gather_distributed,
            negatives=self.negatives,
        )
        self._enqueue(z2)
        return loss


class FlatNCELoss(_PairLoss):
    r"""Module form of :func:`flat_nce_pairs` (FlatCLR = DCL): ``loss = module(z1, z2)``.

    Per view ``a``: ``log Σ_{b∉{a,a⁺}} e^{c_{ab}/τ} − c_{a,a⁺}/τ`` (``c`` the cosine
    similarity), the FlatNCE of Chen et al. 2021 and the FlatNCE note.
    ``value`` picks what the loss reports; the gradient is the same. FlatNCE's
    value is unbounded below, so with a learnable τ the clamp's lower bound is
    what keeps it finite.

    Args:
        temperature: τ, the divisor of the cosine similarities; default ``0.1``.
            A positive finite float. With ``learnable_temperature`` it is the
            initial value and must lie in ``temperature_range``.
        value: what the loss reports, default ``"log_xi"``: ``"log_xi"`` (``log ξ``,
            can be negative), ``"info_nce"`` (the InfoNCE value ``log(1 + ξ)``,
            for monitoring) or ``"xi_over_sg"`` (``ξ / sg(ξ)``, always 1); see
            :func:`flat_nce`.
        learnable_temperature: keyword, default ``False``. If ``True``, τ is
            learned as the parameter ``log_temperature`` (initialised to
            ``log temperature``), projected into ``temperature_range`` in place at
            each forward and used as ``exp(log τ)`` (see :class:`InfoNCELoss`).
        temperature_range: keyword, ``(low, high)``, default ``(0.01, 1.0)``, with
            ``0 < low <= high < inf``. The range a learnable τ is kept in; it is
            validated but unused when τ is fixed.
        gather_distributed: keyword, default ``False``. If ``True`` and a process
            group of world size W > 1 is initialised, the negatives are all W·2N
            views, gathered with gradients (see :func:`pair_logits`); equal N on
            every rank is required. Without a group it is the local loss.
        reduction: keyword, ``"mean"`` (default), ``"sum"`` or ``"none"`` (one
            value per local view, shape ``(2N,)``).
        weighting: keyword, ``None`` (default: DCL) or ``"vmf"`` (DCLW: the
            positive weighted by the von Mises–Fisher weight ``2 − N·softmax(c/σ)``,
            see :func:`flat_nce_pairs`).
        sigma: keyword, σ of the ``"vmf"`` weighting, default 0.5 (the paper's).
        negatives: keyword, a :class:`NegativeQueue` or None, as for
            :class:`InfoNCELoss`.
    """

    def __init__(self, temperature: float = 0.1, *, value: str = "log_xi", weighting: str | None = None,
                 sigma: float = 0.5, **kwargs: Any) -> None:
        _check_value(value)
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        sigma = check_number("sigma", sigma, low=0.0, low_open=True)
        super().__init__(temperature, **kwargs)
        self.value = value
        self.weighting = weighting
        self.sigma = sigma

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        self._project_temperature()
        loss = flat_nce_pairs(
            z1,
            z2,
            self.temperature,
            reduction=self.reduction,
            value=self.value,
            gather_distributed=self.gather_distributed,
            negatives=self.negatives,
            weighting=self.weighting,
            sigma=self.sigma,
        )
        self._enqueue(z2)
        return loss

    def extra_repr(self) -> str:
        extra = f", weighting={self.weighting!r}, sigma={self.sigma}" if self.weighting else ""
        return super().extra_repr() + f", value={self.value!r}" + extra
