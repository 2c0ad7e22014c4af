r"""NorMuon: Muon with a per-row second moment of the orthogonalized update.

Source: Li, Liu, Liang, Chen, Zhao, *NorMuon: Making Muon more efficient and
scalable* (2025), arXiv:2510.05491. For each matrix W (m × n) with gradient G:

    M ← β₁M + (1−β₁)G
    O = NS(M)                                   (Newton–Schulz, as in Muon)
    v ← β₂v + (1−β₂)·mean_row(O ⊙ O)            (v ∈ ℝᵐ: one second moment per row)
    Ô = O / (√v + ε)                            (each row divided by its own √v_i)
    W ← W(1 − ηλ) − η · 0.2·√(mn) · Ô / ‖Ô‖_F

Muon's orthogonal update has rows of very unequal norms; the per-row
normalization evens them out (Adam's second moment, one value per neuron), and
the final rescale gives the update the RMS 0.2·η of AdamW's (Moonlight's
convention), so AdamW's learning rate and weight decay carry over.

Built on Muon's pieces: :func:`steepest.optim.muon_momentum`,
:func:`steepest.optim.orthogonalize_blocks` (the same matrix views: stacks and row
blocks, each block normalized by its own (m, n)) and
:func:`steepest.optim.muon_apply` (decoupled decay, the spectral-ball option, the
placement of the whole-matrix work); :func:`normuon_normalize` is the new part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validate import check_number
from ..distributed import local_part
from ..linalg import NSConfig, resolve_schedule
from ._base import lr_value, slot_dtype
from ._matrices import (
    LOCAL,
    MatrixView,
    Placement,
    all_rows,
    as_views,
    from_local_rows,
    local_rows,
    orthogonalize_blocks,
    zeros_rows,
)
from .muon import DEFAULT_NS, Muon, group_view, muon_apply, muon_momentum, ns_config

__all__ = ["NorMuon", "normuon_normalize", "normuon_step"]

#: the per-parameter state key of v
ROW_MOMENT = "row_second_moment"


def normuon_normalize(
    directions: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    *,
    beta2: float = 0.95,
    eps: float = 1e-8,
    views: MatrixView | Sequence[MatrixView] | None = None,
) -> list[Tensor]:
    """NorMuon's row normalization of orthogonalized directions; the second moments are updated in place.

    For each block B (m × n) of each direction O (``views``: default the (out, in·…)
    matrix): ``v ← β₂v + (1−β₂)·mean_row(O ⊙ O)``; ``Ô = O/(√v + ε)`` row by row;
    returns ``0.2·√(mn)·Ô_B/‖Ô_B‖_F`` per block (RMS 0.2 per block; an all-zero
    block stays zero). ``second_moments[i]`` has one entry per row:
    ``view.row_shape(O.shape)``, sharded like O's rows for FSDP2 DTensors (then the
    per-block norms take one all-gather of a vector of R row sums).
    """
    out: list[Tensor] = []
    vs = as_views(views, len(directions))
    for o, v, view in zip(directions, second_moments, vs):
        R, N, sizes = view.layout(o.shape)
        if R == 0 or N == 0:
            out.append(o)
            continue
        rows, a, b = local_rows(o, view)
        vloc = local_part(v).view(-1)  # in place: v is the optimizer's state
        sq = rows.square()
        vloc.lerp_(sq.mean(1).to(vloc.dtype), 1.0 - beta2)
        inv = 1.0 / (vloc.sqrt() + eps)
        row_sq = all_rows(sq.sum(1) * inv.square().to(sq.dtype), o, view)  # ‖Ô_i‖² for every row of every rank
        k = len(sizes)
        counts = torch.tensor(sizes, device=row_sq.device)
        block_sq = row_sq.new_zeros(k).index_add_(0, torch.arange(k, device=row_sq.device).repeat_interleave(counts),
                                                  row_sq)
        target = torch.tensor([0.2 * math.sqrt(m * N) for m in sizes], dtype=row_sq.dtype, device=row_sq.device)
        c = torch.where(block_sq > 0, target / block_sq.sqrt(), torch.zeros_like(block_sq))
        factor = inv.to(rows.dtype) * c.repeat_interleave(counts)[a:b].to(rows.dtype)
        out.append(from_local_rows(rows * factor[:, None], o))
    return out


def normuon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = False,
    beta2: float = 0.95,
    eps: float = 1e-8,
    ns: NSConfig | Any = DEFAULT_NS,
    max_spectral_norm: float | None = None,
    placement: Placement = LOCAL,
    views: MatrixView | Sequence[MatrixView] | None = None,
) -> None:
    """One NorMuon step on ≥2-D parameters, in place (Li et al. 2025, arXiv:2510.05491).

    ``M ← β₁M + (1−β₁)G`` (β₁ = ``momentum``; with ``nesterov`` the look-ahead
    ``(1−β₁)G + β₁M`` is orthogonalized instead of M); ``O = NS(M)`` per block of
    the view; ``v ← β₂v + (1−β₂)·mean_row(O⊙O)``; ``Ô = O/(√v + ε)``;
    ``W ← W(1 − ηλ) − η·0.2·√(mn)·Ô/‖Ô‖_F`` per (m × n) block; optionally
    ``B ← c·mclip(B/c)`` per block. ``placement`` as for :func:`steepest.optim.muon_step`.
    """
    if not params:
        return
    ns = resolve_schedule(ns)
    vs = as_views(views, len(params))
    inputs = muon_momentum(grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
    dirs = orthogonalize_blocks(inputs, vs, ns, placement=placement)
    dirs = normuon_normalize(dirs, second_moments, beta2=beta2, eps=eps, views=vs)
    muon_apply(params, dirs, lr=lr, weight_decay=weight_decay, adjust_lr_fn="none",
               max_spectral_norm=max_spectral_norm, placement=placement, views=vs)


_NORMUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps", "schedule", "ns_dtype",
                 "max_spectral_norm", "batched", "split", "heads", "beta2", "eps")


class NorMuon(Muon):
    r"""NorMuon for matrices, AdamW for the rest (Li et al. 2025, arXiv:2510.05491).

    For each ≥2-D parameter (each block of its matrix view) W (m × n):
    ``M ← β₁M + (1−β₁)G``; ``O = NS(M)``; ``v ← β₂v + (1−β₂)·mean_row(O⊙O)``;
    ``Ô = O/(√v + ε)``; ``W ← W(1 − ηλ) − η·0.2·√(mn)·Ô/‖Ô‖_F`` (:func:`normuon_step`).
    The update has RMS 0.2·η whatever the shape (AdamW-sized ``lr`` and
    ``weight_decay`` fit), and after the first step every row moves by the same
    amount.

    Takes the same param groups as :class:`steepest.optim.Muon` (``use_muon``,
    :func:`steepest.optim.muon_param_groups`, the AdamW part and its ``adamw_*``
    defaults, ``batched``/``split``/``heads``, the distributed strategies,
    ``nonfinite``); ``adjust_lr_fn`` is not a NorMuon setting (the scale is the
    paper's 0.2·√(mn)/‖Ô‖_F) and Muon's torch-compatibility ``eps`` is replaced by
    NorMuon's ε.

    Args:
        params: parameters or param groups, as for :class:`steepest.optim.Muon`.
        lr: η of the matrix groups (default 0.02).
        momentum: β₁ in [0, 1) (default 0.95).
        beta2: β₂ in [0, 1) of the per-row second moment (default 0.95).
        eps: ε > 0 added to √v (default 1e-8).
        weight_decay: decoupled decay λ, ``W ← W(1 − ηλ)`` (default 0).
        nesterov: orthogonalize the Nesterov look-ahead instead of M (default False:
            the paper's rule).
        ns_coefficients, ns_steps, schedule, ns_dtype, max_spectral_norm, batched,
        split, heads, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay,
        nonfinite, shard_strategy, ddp_strategy, process_group: as for
        :class:`steepest.optim.Muon`.

    State per matrix parameter: ``momentum_buffer`` (the parameter's shape) and
    ``row_second_moment`` (one entry per row: ``MatrixView.row_shape``), float32
    for half-precision parameters.
    """

    _muon_keys = _NORMUON_KEYS

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        ns_coefficients: tuple[float, float, float] | None = None,
        ns_steps: int | None = None,
        schedule: Any = None,
        ns_dtype: torch.dtype | str | None = "auto",
        max_spectral_norm: float | None = None,
        batched: bool = False,
        split: Sequence[int] | None = None,
        heads: int | None = None,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
        nonfinite: str = "skip",
        shard_strategy: str = "all_to_all",
        ddp_strategy: str = "local",
        process_group: Any = None,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "ns_steps": ns_steps, "schedule": schedule,
                    "ns_dtype": ns_dtype, "max_spectral_norm": max_spectral_norm, "batched": batched,
                    "split": split, "heads": heads, "beta2": beta2, "eps": eps}
        self._setup(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                    adamw_weight_decay=adamw_weight_decay, nonfinite=nonfinite, shard_strategy=shard_strategy,
                    ddp_strategy=ddp_strategy, process_group=process_group)

    def _check_matrix_group(self, g: dict[str, Any]) -> None:
        super()._check_matrix_group({**g, "adjust_lr_fn": None})  # Muon's settings; the scale is NorMuon's own
        check_number("beta2", g["beta2"], low=0.0, high=1.0, high_open=True)
        check_number("eps", g["eps"], low=0.0, low_open=True)

    def _check_matrix_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "momentum_buffer")
        self._require(state, p, ROW_MOMENT, like=False)
        v, want = state[ROW_MOMENT], group_view(group).row_shape(p.shape)
        if not isinstance(v, Tensor) or tuple(v.shape) != tuple(want):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"state[{ROW_MOMENT!r}] has shape {shape}, one entry per row is {tuple(want)}")

    def _muon_group(self, group: dict[str, Any], items: list[tuple[Tensor, Tensor]]) -> None:
        bufs = self._momentum_buffers(items)
        view = group_view(group)
        moments = []
        for p, _ in items:
            st = self.state[p]
            if ROW_MOMENT not in st:
                st[ROW_MOMENT] = zeros_rows(p, view, slot_dtype(p.dtype))
            moments.append(st[ROW_MOMENT])
        bound = group["max_spectral_norm"]
        normuon_step([p for p, _ in items], [g for _, g in items], bufs, moments, lr=lr_value(group["lr"]),
                     weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                     nesterov=bool(group["nesterov"]), beta2=float(group["beta2"]), eps=float(group["eps"]),
                     ns=ns_config(group), max_spectral_norm=None if bound is None else float(bound),
                     placement=self._placement, views=view)

