"""Input- and parameter-gradient penalties, and the inequality linking them.

Source: Su, *An inequality between input-gradient and parameter-gradient
penalties*, https://kexue.fm/archives/8796 ("the penalties note" below), after
Dherin et al., *The Geometric Occam's Razor Implicit in Deep Learning* (2021),
arXiv:2111.15090.

For an MLP ``h^{(t+1)} = g^{(t)}(W^{(t)} h^{(t)} + b^{(t)})``, ``h^{(1)} = x``, and a
scalar ``f`` of the output, per example::

    ‖∇_x f‖² · Σ_t (1 + ‖h^{(t)}‖²) / (‖W^{(t)}‖² ‖∇_x h^{(t)}‖²)  ≤  ‖∇_θ f‖²

(:func:`occam_bound`). The two penalties themselves are :func:`input_grad_norm2`
(per example, exact by double backprop or by a finite difference) and
:func:`param_grad_norm2` / :func:`param_penalty_grads_fd`.

Examples must not interact. Everything here computes per-example quantities as
gradients of a batch sum, which is only right when example ``i``'s value depends
on ``x_i`` alone. A layer normalising with batch statistics breaks that:
BatchNorm and :class:`steepest.isotropy.Whitening` in train mode, or in eval mode
without running statistics. The policy is:

* :func:`input_grad_norm2` *refuses* (``ValueError``) when it can see such a
  layer (``f`` is an ``nn.Module``, or ``model=`` is given): the
  "per-example" norms would silently include cross-example terms.
* :func:`occam_bound` refuses every module outside ``Linear`` + elementwise
  activations, BatchNorm included (in eval mode it is an affine map the bound's
  derivation does not cover; fold it into the preceding ``Linear``).
* :func:`param_grad_norm2` is the gradient norm of one scalar batch loss, which
  is well defined with BatchNorm; it is not a sum of per-example penalties.
* :func:`param_penalty_grads_fd` *warns* (``UserWarning``) when ``model=`` holds
  such a layer, and restores the model's buffers after its second forward pass
  so the running statistics are updated exactly once per call.

Inputs or parameters a value does not depend on have gradient exactly 0 here
(not torch's "does not require grad" / ``allow_unused`` errors), and a tensor
listed twice in ``params`` is one parameter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_flag, check_number, check_tensor
from .isotropy import Whitening

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "FDPenaltyGrads",
    "LayerTerms",
    "OccamBound",
    "check_per_example",
    "input_grad_norm2",
    "occam_bound",
    "param_grad_norm2",
    "param_penalty_grads_fd",
]

#: Modules :func:`occam_bound` treats as elementwise activations ``g^{(t)}``.
#: (PReLU is left out: its slope is a parameter outside θ = {W, b}.)
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
)

_DROPOUTS = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


# --------------------------------------------------------------------------- checks
def _check_eps(eps: float) -> float:
    return check_number("eps", eps, low=0.0, low_open=True)


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _check_module(name: str, module: object) -> None:
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be an nn.Module or None, got {type(module).__name__}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # finite-difference arithmetic (1/ε up to 1e6) in at least float32: 1/ε overflows float16
    return torch.promote_types(dtype, torch.float32)


def _check_finite_result(t: Tensor, what: str, fix: str) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{what} is NaN or Inf (it overflows {t.dtype}, or the function itself gave NaN); {fix}")


def _batch_statistics(m: nn.Module) -> str | None:
    """How ``m`` normalises with the statistics of the batch (so mixes its examples), or None."""
    if isinstance(m, _BATCHNORMS):
        kind = "BatchNorm"
        # torch's rule: eval mode uses batch statistics when there are no running buffers
        batch = m.training or (m.running_mean is None and m.running_var is None)
    elif isinstance(m, Whitening):
        kind = "Whitening"
        batch = m.training or not m.track_running_stats
    else:
        return None
    if not batch:
        return None
    return f"{kind} in train mode" if m.training else f"{kind} in eval mode without running statistics"


def _first_mixing(module: nn.Module | None) -> tuple[str, str] | None:
    """(name, description) of the first layer of ``module`` that mixes examples, or None."""
    if module is None:
        return None
    for name, m in module.named_modules():
        why = _batch_statistics(m)
        if why is not None:
            return name or type(module).__name__, why
    return None


def check_per_example(module: nn.Module | None) -> None:
    """Raise ``ValueError`` if ``module`` contains a layer that normalises with batch statistics.

    Per-example gradients computed as gradients of a batch sum (this module's
    method) are wrong when examples interact. BatchNorm and
    :class:`steepest.isotropy.Whitening` in train mode (or in eval mode without
    running statistics) normalise with batch statistics, so ``f(x)_i`` depends
    on every ``x_j`` (the penalties note only covers per-example MLPs).
    ``module.eval()`` with running statistics, or a per-example normalisation
    (LayerNorm, GroupNorm), fixes it.
    """
    _check_module("module", module)
    found = _first_mixing(module)
    if found is not None:
        name, why = found
        raise ValueError(
            f"module {name!r} is {why}: it normalises with batch statistics and so mixes the examples of a "
            "batch, and per-example input gradients are not defined by a batch backward pass; call .eval() on "
            "the model (with track_running_stats=True) or use LayerNorm/GroupNorm"
        )


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class _SameRandomness:
    """Replays the global RNG so two forward passes draw the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        # reading CUDA's state would start CUDA; if it is not running, see rewind
        self.cuda = torch.cuda.get_rng_state_all() if _cuda_ready() else None

    def rewind(self) -> tuple[Tensor, list[Tensor] | None]:
        cuda_now = _cuda_ready()
        after = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda_now else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        elif cuda_now:
            # CUDA started during the first pass, so its generators began it fresh: reseed them
            for gen in torch.cuda.default_generators:
                gen.manual_seed(gen.initial_seed())
        return after

    @staticmethod
    def restore(after: tuple[Tensor, list[Tensor] | None]) -> None:
        torch.set_rng_state(after[0])
        if after[1] is not None:
            torch.cuda.set_rng_state_all(after[1])


# ------------------------------------------------------------------ input penalty
def _per_example_values(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    fx = f(x)
    if not isinstance(fx, Tensor) or fx.shape != x.shape[:1]:
        shape = tuple(fx.shape) if isinstance(fx, Tensor) else type(fx).__name__
        raise ValueError(
            f"f must map a batch x of shape {tuple(x.shape)} to per-example scalars of shape ({x.shape[0]},), got "
            f"{shape}; e.g. use reduction='none' in the loss"
        )
    return fx


def _linked_zero(*sources: Tensor) -> Tensor | int:
    """A zero that is part of the graph of every source requiring grad (an empty slice: no inf·0 = NaN)."""
    out: Tensor | int = 0
    for t in sources:
        if isinstance(t, Tensor) and t.requires_grad:
            out = out + t.reshape(-1)[:0].sum()
    return out


def _input_grad(fx: Tensor, x_in: Tensor, **kwargs: bool) -> Tensor:
    """``∇_x Σ_i f_i``; exactly 0 where f does not depend on x (torch would raise)."""
    if fx.requires_grad:
        (g,) = torch.autograd.grad(fx.sum(), x_in, allow_unused=True, **kwargs)
        if g is not None:
            return g
    return torch.zeros_like(x_in)


def input_grad_norm2(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    method: str = "exact",
    eps: float = 1e-3,
    normalize: bool = False,
    create_graph: bool = True,
    model: nn.Module | None = None,
    return_output: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-example squared input-gradient norms ``‖∇_{x_i} f(x)_i‖²``, shape ``(B,)``.

    ``f`` maps a batch ``x`` (``(B, ...)``) to per-example scalars ``(B,)`` and must
    not mix examples (see :func:`check_per_example`); typically
    ``f = lambda x: F.cross_entropy(model(x), y, reduction="none")``. The
    input-gradient penalty of the penalties note.

    ``method="exact"``: double backprop, ``g_i = ∇_{x_i} Σ_j f_j``, ``‖g_i‖²``. With
    ``create_graph=True`` the result is differentiable (a penalty term).

    ``method="finite_difference"``: with ``ĝ = sg(g)`` (stop-gradient) and a
    per-example step ``ε_i`` (``ε_i = eps``; or ``eps / ‖g_i‖`` when ``normalize``,
    i.e. a step of length ``eps``)::

        D_i = [f_i(x_i + ε_i ĝ_i) − f_i(x_i)] / ε_i
            = ‖g_i‖² + (ε_i / 2) ĝ_iᵀ H_i ĝ_i + O(ε_i²),        H_i = ∇²_{x_i} f_i

    so the value's error is ``O(ε)`` with that leading constant (it is tested).
    In low precision ``x + ε ĝ`` rounds to x's spacing; the difference is then
    divided by ``gᵀδ / ‖g‖²`` for the displacement δ actually taken (``ε`` when
    exact), and a step lost entirely to rounding is a ``ValueError``. The
    arithmetic on ``1/ε`` is done in at least float32. Rounding adds up to
    ``~8u(Σ|terms of f| + Σ_j |g_j x_j|)/ε`` (u the unit roundoff of x's dtype).
    The returned tensor is ``2 D − sg(D)``: value ``D`` but twice its gradient,
    because ``∇_θ D ≈ (∇_θ g)ᵀ g`` is half of ``∇_θ ‖g‖² = 2 (∇_θ g)ᵀ g``. Cost: one
    backward for ``g`` and one extra forward, instead of a double backward.

    ``model``: a module to check for BatchNorm in train mode when ``f`` is a
    closure (a module ``f`` is checked itself). The finite difference replays the
    RNG so both forward passes draw the same dropout masks.
    ``return_output=True`` returns ``(norm2, f(x))`` to reuse the forward pass.

    An ``f`` that does not depend on ``x`` gives exact zeros (still part of the
    graph with ``create_graph=True``, so usable as a penalty term).
    """
    check_choice("method", method, ("exact", "finite_difference"))
    _check_callable("f", f)
    for name, flag in (("normalize", normalize), ("create_graph", create_graph), ("return_output", return_output)):
        check_flag(name, flag)
    _check_module("model", model)
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a tensor with a non-empty leading batch dimension")
    check_tensor(x, "x")
    if isinstance(f, nn.Module):
        check_per_example(f)
    check_per_example(model)
    fix = "compute in float64 (e.g. x.double() and model.double()) or rescale"

    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    if method == "exact":
        with torch.enable_grad():
            fx = _per_example_values(f, x_in)
            g = _input_grad(fx, x_in, create_graph=create_graph)
        out = g.reshape(g.shape[0], -1).pow(2).sum(1)
        _check_finite_result(out, "the squared input-gradient norm ‖∇_x f‖²", fix)
        if create_graph and not out.requires_grad:
            out = out + _linked_zero(x_in, fx)
        return (out, fx) if return_output else out

    _check_eps(eps)
    with torch.enable_grad():
        rng = _SameRandomness()
        fx = _per_example_values(f, x_in)
        _check_finite_result(fx, "f(x)", fix)
        g = _input_grad(fx, x_in, retain_graph=True).detach()
        B = g.shape[0]
        wd = _work_dtype(g.dtype)
        gw = g.to(wd).reshape(B, -1)
        # g scaled by its largest entry per example: its norm neither over- nor underflows
        m = gw.abs().amax(dim=1, keepdim=True)
        gs = gw / torch.where(m > 0, m, torch.ones_like(m))
        ns = gs.norm(dim=1, keepdim=True)
        step = eps * gs / torch.where(ns > 0, ns, torch.ones_like(ns)) if normalize else eps * gw
        x_shift = x_in + step.reshape(g.shape).to(x_in.dtype)
        # the displacement actually taken: in low precision x + εg rounds to x's spacing
        delta = (x_shift.detach() - x_in.detach()).to(wd).reshape(B, -1)
        gd = (gs * delta).sum(1)  # gᵀδ / m
        m, ns = m.squeeze(1), ns.squeeze(1)
        if bool(((m > 0) & (gd <= 0)).any()):
            raise ValueError(
                f"eps={eps} is too small for x's dtype {x_in.dtype}: x + eps·∇f rounds back to x; "
                "use a larger eps or compute in a wider dtype"
            )
        inv_step = torch.where(m > 0, m * ns * ns / torch.where(gd > 0, gd, torch.ones_like(gd)), torch.zeros_like(gd))
        after = rng.rewind()
        try:
            f_shift = _per_example_values(f, x_shift)
        finally:
            rng.restore(after)
        _check_finite_result(f_shift, "f(x + ε·g) in the finite difference", fix + ", or a smaller eps")
        # ‖g‖²/(gᵀδ) is 1/ε for an exact step and corrects a rounded one
        d = ((f_shift.to(wd) - fx.to(wd)) * inv_step).to(fx.dtype)
        _check_finite_result(d, "the finite-difference ‖∇_x f‖²", fix)
    out = 2 * d - d.detach() if create_graph else d.detach()
    if create_graph and not out.requires_grad:
        out = out + _linked_zero(x_in, fx)
    return (out, fx) if return_output else out


# -------------------------------------------------------------- parameter penalty
def _param_list(params: Iterable[Tensor]) -> tuple[list[Tensor], list[int]]:
    """The distinct parameters, and for each one passed the index of its distinct entry.

    A tensor passed twice is one parameter: counted once in ‖g‖², stepped once.
    """
    if isinstance(params, Tensor):
        params = [params]
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of tensors, e.g. model.parameters(); got {type(params).__name__}")
    ps = list(params)
    if not ps:
        raise ValueError("params is empty; pass e.g. list(model.parameters())")
    unique: list[Tensor] = []
    seen: dict[int, int] = {}
    where: list[int] = []
    for i, p in enumerate(ps):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor with requires_grad=True")
        if id(p) not in seen:
            seen[id(p)] = len(unique)
            unique.append(p)
        where.append(seen[id(p)])
    return unique, where


def _param_grads(loss: Tensor, ps: list[Tensor], **kwargs: bool) -> list[Tensor | None]:
    """``∂loss/∂p`` per parameter, None where the loss does not reach it (or has no graph)."""
    if not loss.requires_grad:
        return [None] * len(ps)
    return list(torch.autograd.grad(loss, ps, allow_unused=True, **kwargs))


def _check_scalar_loss(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor, got {shape}; reduce it with .mean() or .sum()")
    if not bool(torch.isfinite(loss).all()):
        raise ValueError("loss is NaN or Inf; the gradient penalty would be meaningless")


def param_grad_norm2(loss: Tensor, params: Iterable[Tensor], *, create_graph: bool = True) -> Tensor:
    """``‖∇_θ loss‖² = Σ_p ‖∂loss/∂p‖²`` (a scalar), differentiable by double backprop.

    The parameter-gradient penalty of the penalties note (the implicit
    regulariser of gradient descent: Barrett & Dherin, *Implicit Gradient
    Regularization* (2021), arXiv:2009.11162). ``loss`` is a scalar that must
    still have its graph; parameters it does not reach count as exactly 0 (and
    with ``create_graph=True`` the result is still differentiable in them, with
    gradient 0). A tensor passed twice counts once.
    """
    _check_scalar_loss(loss)
    check_flag("create_graph", create_graph)
    ps, _ = _param_list(params)
    grads = _param_grads(loss, ps, create_graph=create_graph)
    total = loss.new_zeros(())
    for g, p in zip(grads, ps):
        if g is not None:
            total = total + g.pow(2).sum()
        elif create_graph:
            total = total + _linked_zero(p)
    _check_finite_result(total, "‖∇_θ loss‖²", "compute the loss in float64 or rescale it")
    return total


class FDPenaltyGrads(NamedTuple):
    """What :func:`param_penalty_grads_fd` returns: ``g``, ``‖g‖²`` and ``2[g(θ+εg) − g(θ)]/ε`` (the penalties note)."""

    loss: Tensor  #: the loss at θ (detached)
    grads: list[Tensor]  #: g = ∇_θ loss at θ
    penalty_grads: list[Tensor]  #: ≈ ∇_θ ‖g‖² = 2 [g(θ + εg) − g(θ)] / ε
    grad_norm2: Tensor  #: ‖g‖², the penalty's value


def param_penalty_grads_fd(
    closure: Callable[[], Tensor],
    params: Iterable[Tensor],
    *,
    eps: float = 1e-3,
    normalize: bool = False,
    model: nn.Module | None = None,
) -> FDPenaltyGrads:
    """Gradient of the parameter penalty ``‖∇_θ L‖²`` by a finite difference, two backward passes.

    ``closure()`` recomputes the scalar loss ``L`` at the current parameters (as
    in ``torch.optim.LBFGS``). With ``g = ∇_θ L(θ)`` (the penalties note)::

        [g(θ + εg) − g(θ)] / ε = H g + O(ε),   H = ∇²_θ L,   ∇_θ ‖g‖² = 2 H g

    so ``penalty_grads = 2 [g(θ + εg) − g(θ)] / ε`` has an ``O(ε)`` error and no
    double backward. The step is taken in the parameters' own dtype, where
    ``θ + εg`` rounds to θ's spacing: the difference is divided by
    ``gᵀδ/‖g‖²`` for the displacement δ actually taken (ε when exact), the rest
    of the rounding adds up to ``~2‖H‖u|θ|/ε`` per entry, and a step that loses
    more than half its length is a ``ValueError``. ``ε = eps``, or ``eps / ‖g‖`` with ``normalize=True`` (a step of
    length ``eps``, robust to the scale of ``g``). A training step with penalty
    weight ``λ`` sets ``p.grad = g + λ·penalty_grad``.

    The parameters are restored bit-exactly (copied back, not subtracted), the
    global RNG is replayed so both passes draw the same dropout masks, and if
    ``model`` is given its buffers are restored after the second pass (BatchNorm
    running statistics move once per call; BatchNorm in train mode also warns,
    see the module docstring).

    Parameters the loss does not reach get exact zeros. A tensor passed twice is
    stepped once and counted once in ``grad_norm2``; the returned lists still
    have one entry per tensor passed.
    """
    _check_eps(eps)
    _check_callable("closure", closure)
    check_flag("normalize", normalize)
    _check_module("model", model)
    ps, where = _param_list(params)
    mixing = _first_mixing(model)
    if mixing is not None:
        warnings.warn(
            f"model has {mixing[1]} ({mixing[0]!r}): the parameter penalty then couples the examples of the "
            "batch (it is the gradient norm of the batch loss, not a per-example penalty)",
            UserWarning,
            stacklevel=2,
        )
    rng = _SameRandomness()
    with torch.enable_grad():
        loss = closure()
        _check_scalar_loss(loss)
        g = [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(_param_grads(loss, ps), ps)]
    fix = "compute the loss in float64 or rescale it"
    for gi in g:
        _check_finite_result(gi, "the loss gradient", fix)
    # ‖g‖ scaled by its largest entry: no overflow or underflow of the squares in any dtype
    gmax = max((float(gi.detach().abs().max()) for gi in g if gi.numel()), default=0.0)
    gnorm = gmax * math.sqrt(sum(float((gi.to(_work_dtype(gi.dtype)) / gmax).pow(2).sum()) for gi in g)) if gmax > 0 else 0.0
    norm2 = torch.tensor(gnorm * gnorm, dtype=loss.dtype, device=loss.device)
    _check_finite_result(norm2, "‖∇_θ loss‖²", fix)
    step = eps / gnorm if normalize and gnorm > 0 else eps

    saved = [p.detach().clone() for p in ps]
    buffers = [b.detach().clone() for b in model.buffers()] if model is not None else []
    after = rng.rewind()
    try:
        with torch.no_grad():
            for p, gi in zip(ps, g):
                p.add_(gi, alpha=step)
            # gᵀδ/gmax for the displacement δ actually taken (θ + εg rounds to θ's spacing)
            gd = sum(float(((gi / gmax).to(_work_dtype(gi.dtype)) * (p - s).to(_work_dtype(gi.dtype))).sum())
                     for p, gi, s in zip(ps, g, saved)) if gmax > 0 else 0.0
        if gmax > 0 and not gd > 0.5 * step * gnorm * gnorm / gmax:
            raise ValueError(
                f"eps={eps} is too small for the parameters' dtype: θ + eps·g rounds (nearly) back to θ; "
                "use a larger eps or keep the parameters in a wider dtype"
            )
        with torch.enable_grad():
            loss2 = closure()
            _check_scalar_loss(loss2)
            g2 = _param_grads(loss2, ps)
    finally:
        with torch.no_grad():
            for p, s in zip(ps, saved):
                p.copy_(s)
            if model is not None:
                for b, s in zip(model.buffers(), buffers):
                    b.copy_(s)
        rng.restore(after)
    # ‖g‖²/(gᵀδ): 1/ε for an exact step, and corrects the length of a rounded one
    inv_step = gnorm * (gnorm / gmax) / gd if gmax > 0 else 0.0
    pen = []
    for g2i, gi in zip(g2, g):
        wd = _work_dtype(gi.dtype)  # 2/ε overflows float16
        diff = (g2i if g2i is not None else torch.zeros_like(gi)).to(wd) - gi.to(wd)
        pen.append(((2.0 * inv_step) * diff).to(gi.dtype))
        _check_finite_result(pen[-1], "the finite-difference penalty gradient", fix + ", or a larger eps")
    return FDPenaltyGrads(loss.detach(), [g[k] for k in where], [pen[k] for k in where], norm2)


# ------------------------------------------------------------------- the bound
@dataclass(frozen=True)
class LayerTerms:
    """Per-layer terms of :func:`occam_bound` for the ``t``-th ``Linear`` (per-example tensors are ``(B,)``).

    The penalties note: ``lhs = ‖∇_x f‖² (1 + ‖h‖²)/(‖W‖² ‖∇_x h‖²) ≤ ‖∇_W f‖² + ‖∇_b f‖² = rhs``.
    """

    index: int  #: position of the Linear in the flattened Sequential
    h_norm2: Tensor  #: ‖h^{(t)}‖², the layer input
    weight_norm2: Tensor  #: ‖W^{(t)}‖² (spectral, or Frobenius), a scalar
    jac_norm2: Tensor  #: ‖∇_x h^{(t)}‖² (spectral, or Frobenius); 1 for the first layer
    grad_weight_norm2: Tensor  #: ‖∇_{W^{(t)}} f‖²
    grad_bias_norm2: Tensor  #: ‖∇_{b^{(t)}} f‖² (0 without bias)
    has_bias: bool
    coef: Tensor  #: (1[bias] + ‖h‖²) / (‖W‖² ‖∇_x h‖²)  (inf if the denominator is 0)
    lhs: Tensor  #: ‖∇_x f‖² · coef  (0 where ‖∇_x f‖ = 0)
    rhs: Tensor  #: grad_weight_norm2 + grad_bias_norm2


@dataclass(frozen=True)
class OccamBound:
    """Both sides of the penalties note's inequality per example (Dherin et al., arXiv:2111.15090)::

        lhs = ‖∇_x f‖² Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇_x h_t‖²)  ≤  ‖∇_θ f‖² = rhs
    """

    lhs: Tensor  #: ‖∇_x f‖² Σ_t coef_t, shape (B,)
    rhs: Tensor  #: ‖∇_θ f‖², shape (B,)
    input_grad_norm2: Tensor  #: ‖∇_x f‖², shape (B,)
    layers: tuple[LayerTerms, ...]
    norm: str

    @property
    def tightness(self) -> Tensor:
        """``lhs / rhs`` in [0, 1] (NaN where both are 0)."""
        return self.lhs / self.rhs

    def violations(self, rtol: float = 1e-6) -> int:
        """Number of examples with ``lhs > rhs (1 + rtol)``."""
        return int((self.lhs > self.rhs * (1 + rtol)).sum())


def _flatten_sequential(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    # iterating the Sequential keeps repeats (children() lists a module used twice once)
    for m in model:
        if isinstance(m, nn.Sequential):
            out.extend(_flatten_sequential(m))
        else:
            out.append(m)
    return out


def _validate_mlp(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Linear):
        return [model]
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model must be an nn.Sequential of nn.Linear layers and elementwise activations, got {type(model).__name__}"
        )
    mods = _flatten_sequential(model)
    allowed = ", ".join(c.__name__ for c in ELEMENTWISE_ACTIVATIONS)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear) or isinstance(m, ELEMENTWISE_ACTIVATIONS):
            continue
        if isinstance(m, _DROPOUTS):
            if m.training:
                raise ValueError(
                    f"model[{i}] is {type(m).__name__} in train mode: the network is random and the bound is not "
                    "defined; call model.eval()"
                )
            continue
        if isinstance(m, (*_BATCHNORMS, Whitening)):
            raise TypeError(
                f"model[{i}] is {type(m).__name__}: the bound covers Linear + elementwise activations only (in train "
                f"mode {type(m).__name__} mixes examples; in eval mode fold it into the preceding Linear)"
            )
        raise TypeError(
            f"model[{i}] is {type(m).__name__}, outside the class the bound covers (nn.Linear and elementwise "
            f"activations: {allowed}; Dropout in eval mode)"
        )
    if not any(isinstance(m, nn.Linear) for m in mods):
        raise ValueError("model has no nn.Linear layer")
    _check_unshared(mods)
    return mods


def _check_unshared(mods: list[nn.Module]) -> None:
    """Each Linear must own its W and b: the bound's θ has one (W_t, b_t) per layer."""
    first_use: dict[int, int] = {}
    owner: dict[int, str] = {}
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Linear):
            continue
        if id(m) in first_use:
            raise ValueError(
                f"model[{i}] is the nn.Linear of model[{first_use[id(m)]}] again (a module used more than once): "
                "the bound assumes every layer has its own weights, and a shared layer's gradient is the sum over "
                "its uses; give each use its own nn.Linear"
            )
        first_use[id(m)] = i
        for pname, p in m.named_parameters(recurse=False):
            here = f"model[{i}].{pname}"
            if id(p) in owner:
                raise ValueError(
                    f"{here} shares its tensor with {owner[id(p)]} (tied weights): the bound assumes every layer has "
                    "its own parameters; untie them"
                )
            owner[id(p)] = here


def _matrix_norm2(M: Tensor, norm: str) -> Tensor:
    if norm == "spectral":
        return torch.linalg.matrix_norm(M, ord=2).pow(2)
    return M.pow(2).sum((-2, -1))


def occam_bound(
    model: nn.Module,
    x: Tensor,
    f: Callable[[Tensor], Tensor] | None = None,
    *,
    norm: str = "spectral",
) -> OccamBound:
    """Both sides of ``‖∇_x f‖² Σ_t (1 + ‖h_t‖²) / (‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_θ f‖²`` per example.

    The penalties note (after Dherin et al., arXiv:2111.15090). ``model`` is
    an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` layers and
    elementwise activations (:data:`ELEMENTWISE_ACTIVATIONS`; Dropout in eval mode
    is the identity); anything else raises. Layer ``t`` is the ``t``-th Linear,
    ``h_t`` its input, ``θ`` all weights and biases. ``x``: ``(B, d_in)``. ``f`` maps the
    output ``(B, d_out)`` to per-example scalars ``(B,)`` without mixing examples
    (default: the sum of the outputs).

    Per layer (summed over ``t`` for the total)::

        ‖∇_x f‖² ‖h_t‖² / (‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_{W_t} f‖²,
        ‖∇_x f‖²        / (‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_{b_t} f‖²

    (a Linear without bias drops its ``1 +``). ``norm="spectral"`` (exact, via
    ``torch.linalg.matrix_norm(ord=2)``) gives the larger, tighter ``lhs``;
    ``norm="frobenius"`` also satisfies the inequality. The Jacobians ``∇_x h_t``
    (``(B, d_t, d_in)``) are accumulated layer by layer, activation derivatives by
    ``torch.func.jvp``; ``∇_{W_t} f = δ_t h_tᵀ`` with ``δ_t = ∂f/∂z_{t+1}`` gives the
    per-example parameter gradients without a per-example backward. Results are
    detached (a diagnostic, not a penalty).
    """
    if norm not in ("spectral", "frobenius"):
        raise ValueError(f"norm must be 'spectral' or 'frobenius', got {norm!r}")
    mods = _validate_mlp(model)
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (batch, features) tensor with batch >= 1, got {shape}; flatten inputs first")
    check_tensor(x, "x")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"x has dtype {x.dtype}: occam_bound takes spectral norms, which torch computes in float32 or float64 "
            "only; run it on model.float() / model.double() with x.float() / x.double()"
        )
    first = next(m for m in mods if isinstance(m, nn.Linear))
    if first.weight.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model has {first.weight.dtype}; cast one to match (e.g. .double())")
    if f is None:
        f = lambda out: out.reshape(out.shape[0], -1).sum(1)  # noqa: E731
    _check_callable("f", f)

    B, d_in = x.shape
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        h = x_leaf
        jac: Tensor | None = None  # ∇_x h, (B, d, d_in); None means the identity
        records: list[tuple[int, nn.Linear, Tensor, Tensor | None, Tensor]] = []
        for i, m in enumerate(mods):
            if isinstance(m, nn.Linear):
                if h.shape[-1] != m.in_features:
                    raise ValueError(f"model[{i}] expects {m.in_features} features but receives {h.shape[-1]}")
                z = m(h)
                records.append((i, m, h.detach(), jac, z))
                W = m.weight.detach()
                jac = W.expand(B, *W.shape) if jac is None else torch.matmul(W, jac)
                h = z
            elif isinstance(m, _DROPOUTS) or isinstance(m, nn.Identity):
                continue
            else:
                hin = h.detach().clone()
                # elementwise: the Jacobian is diagonal, its diagonal is the JVP with a ones tangent
                _, deriv = torch.func.jvp(lambda u: m(u.clone()), (hin,), (torch.ones_like(hin),))
                deriv = deriv.detach()
                if jac is None:
                    jac = torch.diag_embed(deriv)
                else:
                    jac = deriv.unsqueeze(-1) * jac
                h = m(h.clone() if getattr(m, "inplace", False) else h)
        fx = f(h)
        if not isinstance(fx, Tensor) or fx.shape != (B,):
            shape = tuple(fx.shape) if isinstance(fx, Tensor) else type(fx).__name__
            raise ValueError(f"f must map the model output to per-example scalars of shape ({B},), got {shape}")
        grads = torch.autograd.grad(fx.sum(), [x_leaf, *[r[4] for r in records]], allow_unused=True)
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    gx2 = gx.detach().pow(2).sum(1)

    layers = []
    lhs = torch.zeros_like(gx2)
    rhs = torch.zeros_like(gx2)
    for (i, m, h_in, jac_in, z), delta in zip(records, grads[1:]):
        delta = torch.zeros_like(z) if delta is None else delta.detach()
        d2 = delta.pow(2).sum(1)
        h2 = h_in.pow(2).sum(1)
        w2 = _matrix_norm2(m.weight.detach(), norm)
        if jac_in is None:
            j2 = torch.full_like(h2, 1.0 if norm == "spectral" else float(d_in))
        else:
            j2 = _matrix_norm2(jac_in, norm)
        has_bias = m.bias is not None
        num = h2 + 1.0 if has_bias else h2
        den = w2 * j2
        coef = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, math.inf))
        # ∇_x f = δᵀ W ∇_x h, so it vanishes whenever the denominator does: the term is 0, not inf·0
        term = torch.where(gx2 > 0, gx2 * coef, torch.zeros_like(gx2))
        gw2 = d2 * h2
        gb2 = d2 if has_bias else torch.zeros_like(d2)
        layers.append(LayerTerms(i, h2, w2, j2, gw2, gb2, has_bias, coef, term, gw2 + gb2))
        lhs = lhs + term
        rhs = rhs + gw2 + gb2
    for what, t in (("lhs", lhs), ("rhs", rhs), ("‖∇_x f‖²", gx2)):
        _check_finite_result(t, f"occam_bound's {what}", "the quantities overflow: use model.double() and x.double(), or rescale")
    return OccamBound(lhs, rhs, gx2, tuple(layers), norm)
