"""Muon: steepest descent under the spectral norm, with AdamW for everything else.

Sources: Keller Jordan, *Muon: An optimizer for hidden layers in neural networks*
(2024), kellerjordan.github.io/posts/muon; torch.optim.Muon (the drop-in peer);
Liu et al., *Muon is Scalable for LLM Training* (Moonlight, 2025, arXiv:2502.16982)
for the AdamW-matching scale; Amsel, Persson, Musco, Gower, *The Polar Express*
(2025, arXiv:2505.16932) for the default Newton–Schulz schedule.

Functional core (tensors in, in-place updates, no optimizer object):

- :func:`muon_momentum` — EMA momentum and the Nesterov look-ahead,
- :func:`steepest.optim.orthogonalize_blocks` — ``msign`` of every block of every parameter
  (:class:`steepest.optim.MatrixView`: the (out, in·…) matrix by default, or a stack
  of matrices, or row blocks such as fused Q/K/V parts), same shapes batched,
- :func:`muon_apply` — decoupled weight decay, the scaled step, optional
  spectral-ball projection,
- :func:`muon_step` — the three in a row for one param group (what :class:`Muon` calls),
- :func:`adamw_step` — AdamW with torch.optim.AdamW's arithmetic.

:class:`Muon` is a thin optimizer over them that accepts ``torch.optim.Muon``'s
keyword arguments; :func:`muon_param_groups` splits a model into a Muon group and
an AdamW group. Only the orthogonalization and the spectral-ball projection need
whole matrices; a :class:`steepest.optim.Placement` decides where they run (one
process, DDP ranks, FSDP2 shards), the rest is elementwise and runs on shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_flag, check_int, check_number
from ..linalg import SCHEDULES, NSConfig, resolve_schedule
from ._base import _TORCH_KEYS, SteepestOptimizer, lr_value, ordered, slot_dtype
from ._matrices import (
    LOCAL,
    WHOLE,
    MatrixView,
    Placement,
    as_views,
    from_local_rows,
    local_rows,
    matrix_shape,
    orthogonalize_blocks,
    project_spectral_ball,
)

__all__ = [
    "KELLER_JORDAN",
    "Muon",
    "adamw_step",
    "muon_apply",
    "muon_lr_scale",
    "muon_momentum",
    "muon_param_groups",
    "muon_step",
]

#: Keller Jordan's quintic coefficients, torch.optim.Muon's default ``ns_coefficients``.
KELLER_JORDAN: tuple[float, float, float] = SCHEDULES["muon"].coeffs[0]
_ADJUST = ("original", "match_rms_adamw", "spectral", "none")
#: Muon's default orthogonalization: five Polar Express steps in the gradient's dtype.
DEFAULT_NS = resolve_schedule("polar_express")

AdjustLR = str | Callable[[int, int], float] | None


# ---------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------
def muon_lr_scale(shape: Sequence[int], adjust_lr_fn: AdjustLR = "original") -> float:
    """The per-matrix factor on the learning rate, from the flattened (A, B) = (out, in) shape.

    - ``None`` / ``"original"`` (Keller Jordan; torch.optim.Muon's default): ``√max(1, A/B)``,
    - ``"match_rms_adamw"`` (Moonlight, Liu et al. 2025): ``0.2·√max(A, B)`` — the
      update's RMS matches AdamW's, so AdamW's lr and weight decay carry over,
    - ``"spectral"`` (μP / spectral condition, Yang et al. 2023): ``√(A/B)``,
    - ``"none"``: 1,
    - a callable ``f(A, B) -> float``.
    """
    A, B = matrix_shape(shape)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if adjust_lr_fn == "spectral":
        return math.sqrt(A / B)
    if adjust_lr_fn == "none":
        return 1.0
    if callable(adjust_lr_fn):
        return float(adjust_lr_fn(A, B))
    raise ValueError(f"adjust_lr_fn must be one of {_ADJUST}, None or a callable (A, B) -> float; got {adjust_lr_fn!r}")


def muon_momentum(
    grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *, momentum: float, nesterov: bool = True
) -> list[Tensor]:
    """Update the momentum buffers in place and return the matrices to orthogonalize.

    torch.optim.Muon's form (an EMA): ``B ← μB + (1−μ)G``; Nesterov ``(1−μ)G + μB``,
    else ``B``. Keller Jordan's post writes ``B ← μB + G`` and ``G + μB``; the two
    differ by the factor ``1−μ`` only, which msign's scale invariance removes.
    """
    if not grads:
        return []
    bufs = list(momentum_buffers)
    grads = [g.to(b.dtype) for g, b in zip(grads, bufs)]  # buffers of half-precision parameters are float32
    torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    if nesterov:
        return list(torch._foreach_lerp(grads, bufs, momentum))
    return bufs


def muon_apply(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    adjust_lr_fn: AdjustLR = "original",
    max_spectral_norm: float | None = None,
    placement: Placement = LOCAL,
    views: MatrixView | Sequence[MatrixView] | None = None,
) -> None:
    """``W ← W(1 − η·λ)``, then ``W ← W − η·scale(B)·O_B`` for each block B (torch.optim.Muon's order), in place.

    ``directions`` are the orthogonalized parameters (any shape with the
    parameter's number of elements). ``views`` (:class:`steepest.optim.MatrixView`;
    default: each parameter is its one (out, in·…) matrix) cut each parameter into
    blocks; block B of shape (m, N) is scaled by ``muon_lr_scale((m, N))``. With
    ``max_spectral_norm=c`` each block is then projected onto the spectral ball,
    ``B ← c·mclip(B/c)`` (:func:`steepest.optim.project_spectral_ball`, mapped where
    ``placement`` says): singular values above c are clipped to c.
    """
    if not params:
        return
    vs = as_views(views, len(params))
    if weight_decay:
        torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
    for p, o, v in zip(params, directions, vs):
        if p.numel():
            _add_scaled(p, o, v, lr, adjust_lr_fn)
    if max_spectral_norm is not None:
        project_spectral_ball(params, max_spectral_norm, placement=placement, views=vs)


def _add_scaled(p: Tensor, o: Tensor, view: MatrixView, lr: float, adjust_lr_fn: AdjustLR) -> None:
    """``p ← p − lr·scale(B)·o_B`` for every block B of ``view``."""
    _, N, sizes = view.layout(p.shape)
    if len(sizes) == 1:
        p.add_(o.view_as(p), alpha=-lr * muon_lr_scale((sizes[0], N), adjust_lr_fn))
        return
    scales = {m: muon_lr_scale((m, N), adjust_lr_fn) for m in set(sizes)}
    if len(set(scales.values())) == 1:
        p.add_(o.view_as(p), alpha=-lr * next(iter(scales.values())))
        return
    # blocks of different shapes (e.g. GQA's Q and K/V parts): one factor per row
    rows, a, b = local_rows(o, view)
    w = torch.tensor([lr * scales[m] for m in sizes], dtype=rows.dtype, device=rows.device)
    w = w.repeat_interleave(torch.tensor(sizes, device=rows.device))[a:b]
    p.add_(from_local_rows(rows * w[:, None], p), alpha=-1.0)


def muon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns: NSConfig | Any = DEFAULT_NS,
    adjust_lr_fn: AdjustLR = "original",
    max_spectral_norm: float | None = None,
    placement: Placement = LOCAL,
    views: MatrixView | Sequence[MatrixView] | None = None,
) -> None:
    """One Muon step on ≥2-D parameters, in place (Keller Jordan 2024).

    ``B ← μB + (1−μ)G``; ``X = (1−μ)G + μB`` (Nesterov) or ``B``;
    ``O = msign(X)`` on each matrix of the parameter's view (``views``: default the
    (out, in·…) matrix; :class:`steepest.optim.MatrixView` for stacks and row
    blocks), by the orthogonalization ``ns`` (an :class:`steepest.linalg.NSConfig`,
    or anything :func:`steepest.linalg.resolve_schedule` takes);
    ``W ← W(1 − ηλ) − η·scale·O`` with the scale of each block's own (m, N)
    (:func:`muon_lr_scale`); optionally ``B ← c·mclip(B/c)`` per block.
    ``placement`` says where the whole-matrix work runs (one process, DDP ranks,
    FSDP2 shards).
    """
    if not params:
        return
    ns = resolve_schedule(ns)
    vs = as_views(views, len(params))
    inputs = muon_momentum(grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
    dirs = orthogonalize_blocks(inputs, vs, ns, placement=placement)
    muon_apply(params, dirs, lr=lr, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn,
               max_spectral_norm=max_spectral_norm, placement=placement, views=vs)


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's arithmetic, in place.

    ``θ ← θ(1 − ηλ)``; ``m ← β₁m + (1−β₁)g``; ``v ← β₂v + (1−β₂)g²``;
    ``θ ← θ − η/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``. ``steps[i]`` is t for parameter i,
    already counting this step. Moments of half-precision parameters are float32;
    a gradient above √(finfo.max) of the moments' dtype (≈1.8e19 in float32)
    overflows ``v`` and its step is zero, as in torch.optim.AdamW.
    """
    if not params:
        return
    params, exp_avgs, exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]  # moments of half-precision parameters are float32
    beta1, beta2 = betas
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    scales = [-lr / (1.0 - beta1**t) for t in steps]
    if all(p.dtype == m.dtype for p, m in zip(params, exp_avgs)):
        torch._foreach_addcdiv_(params, exp_avgs, denom, scales)
        return
    for p, m, d, a in zip(params, exp_avgs, denom, scales):
        p.add_((m / d) * a)  # computed in the moments' float32, rounded once into the parameter


# ---------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------
def _as_modules(model: nn.Module, spec: Any) -> list[nn.Module]:
    if spec is None:
        return []
    if isinstance(spec, nn.Module):
        return [spec]
    if isinstance(spec, str):
        if spec == "auto":
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            return linears[-1:]
        try:
            return [model.get_submodule(spec)]
        except AttributeError:
            raise ValueError(f"output={spec!r} names no submodule of the model") from None
    if isinstance(spec, Iterable):
        return [m for s in spec for m in _as_modules(model, s if s != "auto" else None)]
    raise TypeError(f"output must be 'auto', None, a module, a submodule name or a list of them; got {spec!r}")


def _marked(model: nn.Module, blocks: Any) -> dict[int, dict[str, Any]]:
    """``{id(parameter): view options}`` from :func:`muon_param_groups`'s ``blocks``."""
    if blocks is None:
        return {}
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(f"blocks must be None, 'auto' or a mapping, got {blocks!r}")
        found = {}
        for m in model.modules():  # torch's attention keeps Q, K and V in one (3E, E) in_proj_weight
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                found[id(m.in_proj_weight)] = {"split": (m.embed_dim,) * 3}
        return found
    if not isinstance(blocks, Mapping):
        raise TypeError(f"blocks must be None, 'auto' or a mapping {{parameter, module or name: options}}, "
                        f"got {type(blocks).__name__}")
    names = dict(model.named_parameters())
    found = {}
    for key, opts in blocks.items():
        if isinstance(opts, Sequence) and not isinstance(opts, (str, bytes)):
            opts = {"split": tuple(opts)}
        if not isinstance(opts, Mapping) or not opts or set(opts) - set(VIEW_KEYS):
            raise ValueError(f"blocks[{key!r}] must be a sequence of row counts (split) or a mapping with keys "
                             f"among {VIEW_KEYS}, got {opts!r}")
        MatrixView(**opts)  # checked here, fitted to the shapes by Muon
        if isinstance(key, Tensor):
            params = [key]
        elif isinstance(key, nn.Module):
            params = [q for q in key.parameters() if q.ndim >= 2]
        elif isinstance(key, str) and key in names:
            params = [names[key]]
        elif isinstance(key, str):
            try:
                params = [q for q in model.get_submodule(key).parameters() if q.ndim >= 2]
            except AttributeError:
                raise ValueError(f"blocks names {key!r}, which is no parameter or submodule of the model") from None
        else:
            raise TypeError(f"a key of blocks must be a parameter, a module or a name, got {type(key).__name__}")
        if not params:
            raise ValueError(f"blocks[{key!r}] marks no parameter with at least 2 dimensions")
        for q in params:
            found[id(q)] = dict(opts)
    return found


def muon_param_groups(
    model: nn.Module,
    *,
    output: Any = "auto",
    muon: dict[str, Any] | None = None,
    adamw: dict[str, Any] | None = None,
    blocks: Any = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a Muon group and an AdamW group.

    Muon gets the hidden matrices: every parameter with ≥ 2 dimensions (conv
    weights included) that is not an embedding (``nn.Embedding``/``EmbeddingBag``)
    and not in the output layer. AdamW gets the rest: vectors, scalars, embeddings
    and the output layer — they are lookup tables or a readout, not linear maps
    between hidden features (Keller Jordan 2024). A parameter shared
    (tied) with an embedding goes to AdamW.

    ``output``: ``"auto"`` (the last ``nn.Linear`` in ``model.modules()`` order — the
    head of a typical classifier or language model), ``None``, a module, a submodule
    name, or a list of these. ``muon`` / ``adamw``: extra per-group settings, e.g.
    ``adamw={"lr": 3e-3}``. Returns the non-empty groups, each with its
    ``use_muon`` flag, ready for :class:`Muon`.

    ``blocks`` marks fused weights whose parts are separate matrices: a mapping from
    a parameter, a module (its ≥2-D parameters) or a name (of either) to the
    :class:`steepest.optim.MatrixView` options of those parameters — ``{"split": (d_q,
    d_k, d_v)}``, ``{"heads": h}``, ``{"batched": True}`` or a combination; a
    sequence of ints means ``split``. ``"auto"`` marks every ``nn.MultiheadAttention``'s
    fused ``in_proj_weight`` (3E, E) with ``split=(E, E, E)``. Marked parameters form
    one extra Muon group per distinct setting, after the plain Muon group; marking a
    parameter that goes to AdamW is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    special: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            special.update(id(p) for p in m.parameters())
    for m in _as_modules(model, output):
        special.update(id(p) for p in m.parameters())
    marked = _marked(model, blocks)
    seen: set[int] = set()
    hidden, rest = [], []
    by_view: dict[tuple, list[Tensor]] = {}
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        to_muon = p.ndim >= 2 and id(p) not in special
        if id(p) in marked:
            if not to_muon:
                raise ValueError(f"blocks marks a parameter of shape {tuple(p.shape)} that goes to AdamW (an "
                                 "embedding, the output layer or a vector); mark hidden matrices only")
            opts = marked[id(p)]
            by_view.setdefault(tuple(sorted((k, tuple(v) if isinstance(v, Sequence) else v)
                                            for k, v in opts.items())), []).append(p)
        else:
            (hidden if to_muon else rest).append(p)
    stray = set(marked) - {id(p) for p in model.parameters()}
    if stray:
        raise ValueError(f"blocks marks {len(stray)} tensor(s) that are not parameters of the model")
    groups = []
    if hidden:
        groups.append({**(muon or {}), "params": hidden, "use_muon": True})
    for opts, ps in by_view.items():
        groups.append({**(muon or {}), **dict(opts), "params": ps, "use_muon": True})
    if rest:
        groups.append({**(adamw or {}), "params": rest, "use_muon": False})
    return groups


# ---------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------
_MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
              "adjust_lr_fn", "schedule", "ns_dtype", "max_spectral_norm", "batched", "split", "heads")
#: the group keys that say which matrices a parameter is (a :class:`MatrixView`)
VIEW_KEYS = ("batched", "split", "heads")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


class Muon(SteepestOptimizer):
    r"""Muon for matrices, AdamW for the rest, in one optimizer (Keller Jordan 2024).

    For each ≥2-D parameter W (viewed as the (out, in·…) matrix) with gradient G:
    ``B ← μB + (1−μ)G``; ``X = (1−μ)G + μB`` (Nesterov) or ``B``; ``O = msign(X)``
    by Newton–Schulz (:func:`steepest.linalg.msign`); ``W ← W(1 − ηλ) − η·s(W)·O`` with
    ``s`` from ``adjust_lr_fn`` (:func:`muon_lr_scale`); optionally
    ``W ← c·mclip(W/c)``. Each step calls :func:`muon_step` once per Muon group and
    :func:`adamw_step` once per AdamW group.

    Drop-in for ``torch.optim.Muon``: the keyword arguments ``lr, weight_decay,
    momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn`` mean the
    same, and its ``state_dict`` loads here; with
    ``ns_coefficients=KELLER_JORDAN, ns_dtype=torch.bfloat16`` and equal settings
    the trajectory matches torch.optim.Muon's within bf16 rounding.

    Args:
        params: parameters or param groups. A group with ``use_muon=True`` must hold
            ≥2-D parameters; ``use_muon=False`` gets AdamW (keys ``lr, betas, eps,
            weight_decay``). A group without ``use_muon`` is split: its ≥2-D
            parameters form a Muon group with the group's settings, the rest an
            AdamW group with the AdamW defaults. Embeddings and the output layer are
            2-D; :func:`muon_param_groups` sends them to AdamW.
        lr: learning rate η of the Muon groups (default 0.02, Keller Jordan's; torch
            uses 1e-3, an AdamW-sized value that gives tiny steps under the
            ``"original"`` scale, whose update has spectral norm η·√max(1, A/B)).
        weight_decay: decoupled decay λ, ``W ← W(1 − ηλ)`` (default 0; torch uses 0.1,
            which at lr=0.02 shrinks every matrix by 0.2 % per step).
        momentum: μ in [0, 1) (default 0.95).
        nesterov: use the Nesterov look-ahead (default True).
        ns_coefficients: one (a, b, c) row repeated ``ns_steps`` times (default 5):
            torch.optim.Muon's rule. Exclusive with ``schedule``.
        eps: accepted for torch.optim.Muon compatibility (default 1e-7; torch
            divides by max(‖X‖_F, eps), which shrinks the step of gradients below
            eps). steepest normalizes exactly, so the direction does not depend on
            the gradient's scale down to the dtype's range; only an exactly zero
            matrix gets a zero direction.
        ns_steps: number of Newton–Schulz steps, an int in [1, 100) (default: the
            schedule's own length, 5 for Polar Express).
        adjust_lr_fn: the per-matrix scale s: ``None``/``"original"`` √max(1, A/B),
            ``"match_rms_adamw"`` 0.2·√max(A, B) (Moonlight), ``"spectral"`` √(A/B),
            ``"none"``, or a callable ``(A, B) -> float``.
        schedule: a :data:`steepest.linalg.SCHEDULES` name, ``"accurate"``, ``"svd"``
            or a list of (a, b, c) rows (default ``"polar_express"``: five Polar
            Express steps, which bring singular values much closer to 1 than Keller
            Jordan's coefficients, whose results spread over about [0.5, 1.5]).
        ns_dtype: working dtype of Newton–Schulz. ``"auto"`` (default): bfloat16
            where the device multiplies it much faster than float32 (CUDA; CPUs with
            AVX512-BF16/AMX units; decided once per device,
            :func:`steepest.linalg.fast_bf16`), else the gradient's dtype (float32
            for half gradients). ``None``: always the latter; or an explicit dtype
            (torch computes in bfloat16 everywhere, which is 8–100× slower than
            float32 on CPUs without bf16 units).
        max_spectral_norm: if set, c > 0: after each step ``W ← c·mclip(W/c)`` (per block).
        batched: a parameter with ndim ≥ 3 is a stack of matrices over its leading
            dimensions, each orthogonalized and lr-scaled by its own (M, N) (default
            False: flattened to (out, in·…), as for conv weights).
        split: ``(d_1, …, d_k)``: the rows of each (out, in) matrix are cut into
            blocks of these sizes (adding up to ``out``), each orthogonalized, scaled
            and projected alone — e.g. ``split=(d, d, d)`` for a fused QKV weight.
        heads: ``h``: the rows (of each split block) are cut into h equal blocks.
            These three are usually given per param group (:func:`muon_param_groups`'s
            ``blocks``); :class:`steepest.optim.MatrixView` states the cut. Under FSDP2
            (DTensor parameters sharded on rows) a rank holding whole blocks (a batched
            stack, or shard boundaries between blocks) works on them alone; a matrix
            whose blocks straddle shards is gathered whole on every rank, its blocks
            dealt out over the ranks (``shard_strategy="all_to_all"``) or done by every
            rank (``"all_gather"``), and each rank keeps its rows.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW
            groups (torch.optim.AdamW's defaults: 1e-3, (0.9, 0.999), 1e-8, 0.01).
        nonfinite: ``"skip"`` (default) or ``"raise"`` — what a NaN/Inf gradient does
            (:class:`steepest.optim.SteepestOptimizer`; one host sync per step).
        shard_strategy: FSDP2 (DTensor parameters sharded on rows): ``"all_to_all"``
            (default; each matrix is orthogonalized whole by one owner rank, two
            all-to-alls per step) or ``"all_gather"`` (every rank gathers and
            orthogonalizes every matrix). ``"spread"``/``"gather"`` are older names.
        ddp_strategy: DDP (replicated parameters, averaged gradients): ``"local"``
            (default; every rank runs NS on every matrix) or ``"partition"`` (each rank
            orthogonalizes about 1/W of the matrices and one all-gather shares the
            results, as does the spectral-ball projection; ranks stay bit-identical).
            ``"partition"`` needs equal gradients on every rank, as DDP gives: do not
            use it for per-rank independent models or pipeline stages. ``"spread"``
            is an older name.
        process_group: the group ``ddp_strategy="partition"`` deals over (default: the
            world).

    LR schedulers act on each group's ``lr``; ``step(closure)`` is supported.
    ``torch.compile``: compiling the model works as usual (the trajectory equals the
    eager one); ``step()`` runs eagerly (the non-finite check synchronizes).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] | None = None,
        eps: float = 1e-7,
        ns_steps: int | None = None,
        adjust_lr_fn: AdjustLR = None,
        *,
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
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn, "schedule": schedule, "ns_dtype": ns_dtype,
                    "max_spectral_norm": max_spectral_norm, "batched": batched, "split": split, "heads": heads}
        self._setup(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                    adamw_weight_decay=adamw_weight_decay, nonfinite=nonfinite, shard_strategy=shard_strategy,
                    ddp_strategy=ddp_strategy, process_group=process_group)

    #: the keys of a Muon group (a subclass with another matrix rule keeps its own)
    _muon_keys: tuple[str, ...] = _MUON_KEYS

    def _setup(self, params: Any, defaults: dict[str, Any], *, adamw_lr: float, adamw_betas: tuple[float, float],
               adamw_eps: float, adamw_weight_decay: float, nonfinite: str, shard_strategy: str, ddp_strategy: str,
               process_group: Any) -> None:
        """What every Muon-like optimizer does at construction: placement, AdamW defaults, checks, groups."""
        self._placement = Placement(shard_strategy, ddp_strategy, process_group)
        self._adamw_defaults = {"lr": adamw_lr, "betas": adamw_betas, "eps": adamw_eps,
                                "weight_decay": adamw_weight_decay}
        _check_adamw(self._adamw_defaults)
        self._check_matrix_group(defaults)
        SteepestOptimizer.__init__(self, params, defaults, nonfinite=nonfinite)

    def _check_matrix_group(self, g: dict[str, Any]) -> None:
        """Raise on a bad setting of a matrix (Muon) group; its parameters' shapes too when it has them."""
        _check_muon(g)
        _check_view_shapes(g)

    # -- groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without ``use_muon`` is split into a Muon part (≥2-D) and an AdamW part."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if isinstance(param_group.get("params"), (set, frozenset)):
            raise TypeError("params must be an ordered collection (list or tuple), not a set: "
                            "the order decides how optimizer state is matched on load_state_dict")
        params = ordered(param_group["params"])
        use_muon = param_group.get("use_muon")
        if use_muon is None:
            mats = [p for p in params if _is_matrix(p)]
            rest = [p for p in params if not _is_matrix(p)]
            own = {k: v for k, v in param_group.items() if k not in ("params", "use_muon")}
            unknown = set(own) - set(self._muon_keys) - {"initial_lr", "param_names"}
            if unknown:  # the group's settings are Muon settings (the rest gets the AdamW defaults)
                raise ValueError(f"unknown key(s) {sorted(unknown)} in a {self._name} group; "
                                 f"allowed: {sorted(self._muon_keys)}")
            self._check_matrix_group({**self.defaults, **own})
            if mats or not rest:
                self.add_param_group({**own, "params": mats, "use_muon": True})
            if rest:
                self.add_param_group({"params": rest, "use_muon": False})
            return
        if not isinstance(use_muon, bool):
            raise TypeError(f"use_muon must be True, False or absent, got {use_muon!r}")
        group = dict(param_group, params=params)
        if use_muon:
            for p in params:
                p = p[1] if isinstance(p, tuple) else p  # (name, parameter) pairs are allowed
                if isinstance(p, Tensor) and p.ndim < 2:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in a use_muon=True group, but Muon needs ≥2-D "
                        "parameters; put it in a use_muon=False group (AdamW) or omit use_muon to route automatically"
                    )
            super().add_param_group(group)
        else:
            for k, v in self._adamw_defaults.items():
                group.setdefault(k, v)
            super().add_param_group(group)
            g = self.param_groups[-1]
            for k in self._muon_keys:  # torch fills in the Muon defaults; an AdamW group has none of them
                if k not in _ADAMW_KEYS:
                    g.pop(k, None)

    def _allowed_keys(self, group: dict[str, Any]) -> set[str]:
        return set(self._muon_keys if group.get("use_muon", True) else _ADAMW_KEYS) | {"use_muon"}

    def _group_kind(self, group: dict[str, Any]) -> str:
        return self._name if group.get("use_muon", True) else "AdamW"

    def _check_group(self, group: dict[str, Any], initial: bool = True) -> None:
        if group.get("use_muon", True):
            self._check_matrix_group(group)
        else:
            _check_adamw(group)

    def _check_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if group.get("use_muon", True):
            self._check_matrix_state(group, p, state)
        else:
            self._require(state, p, "exp_avg", "exp_avg_sq")
            self._require(state, p, "step", like=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`SteepestOptimizer.load_state_dict`, refusing first a matrix group with keys this optimizer lacks.

        A state saved by another Muon-like optimizer (NorMuon's ``beta2`` loaded
        into Muon, Muon's ``adjust_lr_fn`` into NorMuon) is an error here, and nothing
        is loaded; ``torch.optim.Muon``'s keys are all Muon keys.
        """
        groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
        for gi, g in enumerate(groups):
            if isinstance(g, dict) and g.get("use_muon", True):
                unknown = set(g) - set(self._muon_keys) - {"use_muon"} - _TORCH_KEYS
                if unknown:
                    raise ValueError(
                        f"{self._name}.load_state_dict: param group {gi} has key(s) {sorted(unknown)}, which a "
                        f"{self._name} group does not have; was this state_dict saved by another optimizer? "
                        "Nothing was loaded.")
        super().load_state_dict(state_dict)

    def _check_matrix_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        self._require(state, p, "momentum_buffer")

    # -- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        for group, items in self._gradients():
            if not items:
                continue
            if group.get("use_muon", True):
                self._muon_group(group, items)
            else:
                self._adamw_group(group, items)
        return loss

    def _momentum_buffers(self, items: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        bufs = []
        for p, g in items:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(g, dtype=slot_dtype(p.dtype),
                                                         memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        return bufs

    def _muon_group(self, group: dict[str, Any], items: list[tuple[Tensor, Tensor]]) -> None:
        bufs = self._momentum_buffers(items)
        bound = group["max_spectral_norm"]
        muon_step([p for p, _ in items], [g for _, g in items], bufs, lr=lr_value(group["lr"]),
                  weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                  nesterov=bool(group["nesterov"]), ns=ns_config(group), adjust_lr_fn=group["adjust_lr_fn"],
                  max_spectral_norm=None if bound is None else float(bound), placement=self._placement,
                  views=group_view(group))

    def _adamw_group(self, group: dict[str, Any], items: list[tuple[Tensor, Tensor]]) -> None:
        ps, gs, ms, vs, ts = [], [], [], [], []
        for p, g in items:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=slot_dtype(p.dtype), memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=slot_dtype(p.dtype), memory_format=torch.preserve_format)
            st["step"] = int(st["step"]) + 1
            ps.append(p)
            gs.append(g)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            ts.append(st["step"])
        beta1, beta2 = group["betas"]
        # Momentum-cycling schedulers (OneCycleLR, CyclicLR) write "momentum" into every group of an
        # optimizer whose defaults have it: for AdamW that is β₁, as it is for torch.optim.AdamW's betas.
        beta1 = group.get("momentum", beta1)
        adamw_step(ps, gs, ms, vs, ts, lr=lr_value(group["lr"]), betas=(float(beta1), float(beta2)),
                   eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))


def _is_matrix(p: Any) -> bool:
    p = p[1] if isinstance(p, tuple) else p  # (name, parameter) pairs are allowed
    return isinstance(p, Tensor) and p.ndim >= 2


def group_view(group: dict[str, Any]) -> MatrixView:
    """The :class:`MatrixView` of a Muon group's parameters (its ``batched``, ``split``, ``heads``)."""
    return MatrixView(batched=group.get("batched", False), split=group.get("split"), heads=group.get("heads"))


def _check_view_shapes(g: dict[str, Any]) -> None:
    """The group's view fits each of its parameters (split sizes add up to the rows, heads divide them)."""
    view = group_view(g)
    if view == WHOLE:  # every ≥2-D parameter is its (out, in·…) matrix
        return
    for i, p in enumerate(g.get("params", ())):
        p = p[1] if isinstance(p, tuple) else p
        if isinstance(p, Tensor) and p.ndim >= 2:
            try:
                view.layout(p.shape)
            except ValueError as e:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} (params[{i}]) does not fit the group's "
                                 f"matrix view: {e}") from None


def ns_config(group: dict[str, Any]) -> NSConfig:
    """The orthogonalization of a Muon group, checked (:func:`steepest.linalg.resolve_schedule`).

    ``ns_coefficients`` (torch.optim.Muon's one row) becomes ``ns_steps`` (default 5)
    copies of that row; otherwise ``schedule`` (default Polar Express) with ``ns_steps``.
    """
    coeffs, steps = group["ns_coefficients"], group["ns_steps"]
    if coeffs is not None:
        rows = [tuple(coeffs)] * (5 if steps is None else int(steps))
        return resolve_schedule(rows, dtype=group["ns_dtype"])
    schedule = "polar_express" if group["schedule"] is None else group["schedule"]
    return resolve_schedule(schedule, steps=steps, dtype=group["ns_dtype"])


def _check_muon(g: dict[str, Any]) -> None:
    check_number("lr", g["lr"])
    check_number("weight_decay", g["weight_decay"])
    check_number("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("eps", g["eps"])
    check_flag("nesterov", g["nesterov"])
    if g["ns_steps"] is not None:
        check_int("ns_steps", g["ns_steps"], low=1, high=99)
    if g["ns_dtype"] is not None and g["ns_dtype"] != "auto" and g["ns_dtype"] not in (
            torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"ns_dtype must be None, 'auto' or a floating dtype (bfloat16, float16, float32, float64), "
                        f"got {g['ns_dtype']!r}")
    c = g["ns_coefficients"]
    if c is not None:
        if g["schedule"] is not None:
            raise ValueError("give either ns_coefficients (torch.optim.Muon's single (a, b, c) row) or schedule, "
                             "not both")
        if isinstance(c, (str, bytes)) or not isinstance(c, Iterable) or len(tuple(c)) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {c!r}")
        for v in c:
            check_number("ns_coefficients entry", v, low=None)
    f = g["adjust_lr_fn"]
    if not (f is None or callable(f)):
        check_choice("adjust_lr_fn", f, _ADJUST)
    if g["max_spectral_norm"] is not None:
        check_number("max_spectral_norm", g["max_spectral_norm"], low=0.0, low_open=True)
    group_view(g)  # batched, split, heads
    ns_config(g)  # the schedule itself: linalg's checks


def _check_adamw(g: dict[str, Any]) -> None:
    check_number("lr", g["lr"])
    check_number("eps", g["eps"], low=0.0, low_open=True)
    check_number("weight_decay", g["weight_decay"])
    betas = tuple(g["betas"])
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {g['betas']!r}")
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    if "momentum" in g:  # written by a momentum-cycling scheduler: β₁
        check_number("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
