"""Isotropy: whitening, isotropy diagnostics and feature-space steepest descent.

Source: Su, *Why we prefer isotropy: an understanding via steepest descent*,
https://kexue.fm/archives/11549 ("the isotropy note" below). The argument: for a
linear layer ``Y = X W`` with input ``X`` (b × d_in) and ``G = ∂L/∂Y``, gradient
descent moves the features by ``ΔY = −η X Xᵀ G``. That is the steepest direction
*in feature space* (``−G``) only when ``X Xᵀ ∝ I``. Muon (Keller Jordan, *Muon:
An optimizer for hidden layers in neural networks* (2024),
https://kellerjordan.github.io/posts/muon/) moves them by
``ΔY = −η X msign(XᵀG) = −η X XᵀG (GᵀX XᵀG)^{-1/2}``, which becomes the spectral
steepest direction ``−η msign(G)`` under the same condition; SignSGD (Bernstein
et al., *signSGD: Compressed Optimisation for Non-Convex Problems* (2018),
arXiv:1802.04434) has no such property. Whitening ``X (XᵀX)^{-1/2}`` makes
features isotropic; BatchNorm is its diagonal approximation, LayerNorm / RMSNorm
put each sample on a sphere.

This module provides the pieces to test the argument:

- :func:`whiten` — uncentered ``X (XᵀX + εI)^{-1/2}`` or centered ZCA whitening
  (differentiable);
- :class:`Whitening` — a whitening layer in the manner of IterNorm (Huang et al.,
  *Iterative Normalization: Beyond Standardization towards Efficient Whitening*,
  CVPR 2019, arXiv:1904.03441): batch statistics in training, running
  statistics in eval, exact (eigh) or Newton–Schulz inverse square root,
  group-wise; optionally the running statistics in training too
  (``train_stats="running"``), covariance shrinkage and a training-time
  decorrelation of the batch's samples (``sample_decorrelation``), which
  aim at training like BatchNorm while keeping ``XXᵀ`` near ∝ I;
- :func:`isotropy_metrics` — how far a batch of features is from isotropic;
- :func:`feature_alignment` — cosine between a rule's feature update ``X ΔW`` and
  its feature-space steepest direction;
- :class:`AlignmentMonitor` — the same measurement on a live model, per
  ``nn.Linear`` layer and per optimizer step.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import linalg
from ._validate import check_flag, check_int, check_number, check_tensor

__all__ = [
    "RULES",
    "whiten",
    "Whitening",
    "isotropy_metrics",
    "feature_alignment",
    "steepest_feature_direction",
    "AlignmentMonitor",
]

#: Update rules / norms understood by :func:`feature_alignment` and
#: :class:`AlignmentMonitor`: the parameter update each applies to the weight
#: gradient, and the norm in which it is steepest (the isotropy note; Muon's
#: spectral-norm reading is Keller Jordan's Muon post).
RULES = {
    "sgd": "Frobenius (Euclidean) norm: ΔW = −XᵀG, steepest feature direction −G",
    "muon": "spectral norm: ΔW = −msign(XᵀG), steepest feature direction −msign(G)",
    "signsgd": "max (ℓ∞) norm: ΔW = −sign(XᵀG), steepest feature direction −sign(G)",
}


# ----------------------------------------------------------------------------- checks
def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return eps


def _check_rule(rule: Any, name: str = "rule") -> str:
    if not isinstance(rule, str) or rule.lower() not in RULES:
        raise ValueError(f"{name} must be one of {sorted(RULES)}, got {rule!r}")
    return rule.lower()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # eigh / NS in half precision are not supported or not accurate enough
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _assert_nonsingular(K: Tensor, what: str) -> None:
    """Raise when the SPD matrix ``K`` is numerically singular (used when eps == 0)."""
    with torch.no_grad():
        ev = torch.linalg.eigvalsh(K.double())
        top = ev[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
        # K was formed in its own dtype: eigenvalues below ~k·eps·λ_max are rounding noise
        tol = K.shape[-1] * 10 * torch.finfo(K.dtype).eps
        if bool((ev[..., :1] <= tol * top).any()):
            raise ValueError(
                f"{what} is singular (X has fewer independent rows/columns than needed); "
                "pass eps > 0 to regularise the whitening"
            )


# ----------------------------------------------------------------------------- whiten
def whiten(X: Tensor, centered: bool = False, eps: float = 0.0) -> Tensor:
    """Whiten the rows of ``X`` (shape ``(..., n, d)``: n samples of d features).

    - ``centered=False`` (the isotropy note's formula, in its section on
      normalization layers, "标准化层"):
      ``X (XᵀX + εI)^{-1/2}``. For ε = 0 the result ``Y`` has ``YᵀY = I`` when
      n ≥ d and ``YYᵀ = I`` when n ≤ d: it is the orthogonal polar factor
      ``msign(X) = U Vᵀ``. It solves ``min_A ‖(XA)(XA)ᵀ − I‖`` with
      ``AAᵀ = (XᵀX)^{-1}``.
    - ``centered=True`` (ZCA, Bell & Sejnowski 1997; Kessy, Lewin, Strimmer,
      *Optimal Whitening and Decorrelation*, The American Statistician 2018):
      ``X_c (X_cᵀX_c / n + εI)^{-1/2}`` with ``X_c = X − mean``; the result has
      mean 0 and (biased) covariance ``YᵀY / n = I`` (for ε = 0, n > d).

    The identity ``X (XᵀX + εI)^{-1/2} = (XXᵀ + εI)^{-1/2} X`` (both equal
    ``U Σ (Σ² + ε)^{-1/2} Vᵀ``) lets the inverse square root be taken on the
    smaller Gram side. Computed in float64 (the Gram matrix squares the condition
    number), returned in X's dtype. With ε > 0, ε is raised to ``k·2⁻⁵²·tr K`` (K the
    k × k Gram matrix, in the scale of the formula used) when smaller: the
    float64 rounding of a rank-deficient K moves its zero eigenvalues by about
    that much, which would leave ``K + εI`` indefinite (only at extreme scales or
    ratios ‖X‖²/ε ≳ 1e15). Per direction the relative error is then at most
    ``~8·max(n, d)·2⁻⁵³·λ_max/(λ_i + ε)`` plus the output's rounding. Differentiable (through
    :func:`steepest.linalg.inv_sqrt`, exact eigh). With ε = 0 a singular Gram
    matrix (rank-deficient X, or centered with n ≤ d) raises ``ValueError``;
    pass ε > 0.
    """
    X = check_tensor(X, "X", min_ndim=2)
    eps = _check_eps(eps)
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be a bool, got {type(centered).__name__}")
    n, d = X.shape[-2], X.shape[-1]
    if centered and n < 2:
        raise ValueError(f"centered whitening needs at least 2 rows (samples), got X of shape {tuple(X.shape)}")
    out_dtype = X.dtype
    # Gram matrices square the condition number: form them in float64
    Xw = X.to(torch.float64)
    scale = 1.0
    if centered:
        Xw = Xw - Xw.mean(dim=-2, keepdim=True)
        # Xc (XcᵀXc/n + εI)^{-1/2} = √n · Xc (XcᵀXc + nεI)^{-1/2}
        scale = math.sqrt(n)
        eps = eps * n
    if n >= d:
        K = Xw.mT @ Xw
        side = "XᵀX"
    else:
        K = Xw @ Xw.mT
        side = "XXᵀ"
    if centered and eps == 0 and n <= d:
        raise ValueError(
            f"centered whitening of n={n} samples in d={d} dimensions: the covariance has rank <= n-1 < d "
            "and cannot be inverted; pass eps > 0 or use more samples than features"
        )
    if eps == 0:
        _assert_nonsingular(K, side + (" of the centered X" if centered else ""))
    else:
        # rounding moves K's zero eigenvalues by ~k·u₆₄·tr K: a smaller ε left K + εI indefinite
        tr = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)[..., None, None]
        K = K + torch.clamp_min(K.shape[-1] * torch.finfo(torch.float64).eps * tr, eps) * _eye_like(K)
    R = linalg.inv_sqrt(K, method="eigh")
    Y = Xw @ R if n >= d else R @ Xw
    if scale != 1.0:
        Y = Y * scale
    return Y.to(out_dtype)


# ----------------------------------------------------------------------------- Whitening
class Whitening(nn.Module):
    """Whitening layer (ZCA or uncentered), in the manner of IterNorm.

    For features ``x`` with C = ``num_features`` channels, split into ``groups``
    groups of c = C / groups channels (group-wise whitening, Huang et al.,
    *Decorrelated Batch Normalization*, CVPR 2018, arXiv:1804.08450; IterNorm
    2019), each group is mapped to

        y = Σ^{-1/2} (x − μ),      Σ = E[(x − μ)(x − μ)ᵀ] + εI,

    with μ = 0 when ``centered=False`` (then Σ is the second moment E[x xᵀ] + εI,
    the isotropy note's uncentered whitening with the 1/n scaling of a covariance). In
    training (with the default ``train_stats="batch"``), μ and Σ are the batch
    statistics (gradients flow through them) and the running estimates
    ``running_mean`` / ``running_cov`` are updated with ``momentum`` like
    BatchNorm (unbiased covariance for the running estimate). In eval, Σ is
    ``running_cov + εI`` (shrunk first when ``shrinkage > 0``). Unlike IterNorm, which averages per-batch
    whitening matrices, the running estimate is the covariance itself, so eval
    whitens with the inverse square root of the population estimate (the average
    of batch whitening matrices is biased, strongly so when the batch is smaller
    than the group).

    ``method="eigh"`` computes Σ^{-1/2} exactly; ``method="newton_schulz"``
    uses the coupled Newton–Schulz iteration with ``iters`` steps (IterNorm's
    choice: fewer steps whiten only approximately, which IterNorm argues is a
    useful regulariser). Both via :func:`steepest.linalg.inv_sqrt`.

    Inputs: ``(B, C)`` or ``(B, C, *spatial)`` (e.g. ``(B, C, H, W)``: the
    statistics are over batch and spatial positions, like BatchNorm2d). With
    ``affine=True`` a per-channel scale and shift follow (as in IterNorm).

    Note: with fewer samples per batch than channels per group the batch
    covariance is singular; ε then sets the gain of the unseen directions
    (1/√ε). Use groups (c < samples) or a larger ε in that regime.

    Precision: the statistics and the whitening map are computed in float64
    (the output has the input's dtype). A float32 covariance of rank-deficient
    features (e.g. ``Linear(16→64)`` in front) has zero eigenvalues rounded to
    about ±2⁻²³·λ_max, beyond a default ε, and overflows above ~1e19. For the
    same reason ε is raised, per group, to ``c·2⁻⁵²·tr Σ`` when smaller (the
    float64 rounding level; only matters at extreme scales), and in eval the
    stored ``running_cov`` is replaced by its positive semidefinite part.
    Statistics that would overflow the buffers' dtype raise ``ValueError``.

    Args:
        num_features: C, the number of channels (dim 1 of the input); a
            positive int.
        centered: default ``True`` (a bool): subtract the mean μ (ZCA whitening). ``False``
            whitens the uncentered second moment (μ = 0; ``running_mean`` is
            then never updated).
        momentum: default ``0.1``, a number in [0, 1] (not a bool). Running statistics are
            updated as ``running = (1 − momentum)·running + momentum·batch``
            (``None``, BatchNorm's cumulative average, is not accepted).
        eps: default ``1e-5``, a finite float ≥ 0; ``εI`` is added to Σ (ε
            floored at the rounding level, see Precision). With ``eps=0``
            training needs more samples than channels per group and a
            nonsingular Σ (otherwise ``ValueError``).
        groups: default ``1``, a positive int dividing ``num_features``. The
            channels are whitened independently in ``groups`` blocks of
            ``C / groups`` (Σ is block diagonal).
        method: ``"eigh"`` (default; exact Σ^{-1/2} by eigendecomposition) or
            ``"newton_schulz"`` (coupled Newton–Schulz iteration).
        iters: default ``None``; a positive int or ``None``. The number of
            Newton–Schulz steps (IterNorm uses 5); ``None`` iterates to
            convergence (see :func:`steepest.linalg.inv_sqrt`). Ignored by
            ``"eigh"``.
        affine: default ``True``: a learnable per-channel scale ``weight``
            (init 1) and shift ``bias`` (init 0) follow the whitening.
        track_running_stats: default ``True``: keep ``running_mean``,
            ``running_cov`` (``(groups, c, c)``, init I) and
            ``num_batches_tracked``, and use them in eval. ``False``: batch
            statistics in train and eval, no buffers.
        train_stats: default ``"batch"``: training whitens with the batch
            statistics (gradients flow through them). ``"running"``: training
            folds the batch into the running estimates first (detached) and
            whitens with them, i.e. with the map eval uses, so training and
            eval see the same per-sample function (running statistics used
            consistently, the idea of Ioffe, *Batch Renormalization: Towards
            Reducing Minibatch Dependence in Batch-Normalized Models*, NeurIPS
            2017, here without its batch correction). Needs
            ``track_running_stats=True``.
        shrinkage: default ``0.0``, α in [0, 1]: the covariance used (batch
            or running, in training and eval) is shrunk toward its mean
            eigenvalue, ``Σ_α = (1 − α)Σ + α·(tr Σ / c)·I`` before εI is added
            (Ledoit & Wolf, *A well-conditioned estimator for large-dimensional
            covariance matrices*, J. Multivariate Analysis 2004). It bounds the
            gain of low-variance directions by ``(α·tr Σ / c)^{-1/2}`` instead
            of ``ε^{-1/2}``; α = 1 is a per-group scalar normalization.
        sample_decorrelation: default ``0.0``, ρ in [0, 1). In training only,
            the whitened rows Y (N × C, N samples — times positions for spatial
            inputs — over all C channels, before the affine map) are
            decorrelated *across samples*:
            ``Y ← √k̄ (ρYYᵀ + (1 − ρ)k̄I)^{-1/2} Y`` with ``k̄ = tr(YYᵀ)/N``
            (computed on the smaller side, ``= √k̄ Y (ρYᵀY + (1 − ρ)k̄I)^{-1/2}``).
            Each eigenvalue k of YYᵀ becomes ``k̄·k / (ρk + (1 − ρ)k̄)``:
            small deviations from k̄ are scaled by about 1 − ρ, large
            eigenvalues are capped at ``k̄/ρ``; ρ → 1 is the polar factor
            ``YYᵀ ∝ I``. Why:
            the isotropy note's condition for parameter-space steepest
            descent to be feature-space steepest descent is ``XXᵀ ∝ I`` over
            the batch, which per-sample (population) whitening meets only up
            to fluctuations of relative size ~√(N/C). Eval applies no such
            step (one sample at a time, the map of the running statistics).
    """

    def __init__(
        self,
        num_features: int,
        centered: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        groups: int = 1,
        method: str = "eigh",
        iters: int | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        train_stats: str = "batch",
        shrinkage: float = 0.0,
        sample_decorrelation: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_features % groups:
            raise ValueError(f"groups must be a positive int dividing num_features={num_features}, got {groups!r}")
        momentum = check_number("momentum", momentum, low=0.0, high=1.0)
        if method not in ("eigh", "newton_schulz"):
            raise ValueError(f"method must be 'eigh' or 'newton_schulz', got {method!r}")
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
            raise ValueError(f"iters must be a positive int or None, got {iters!r}")
        self.num_features = num_features
        self.centered = check_flag("centered", centered)
        self.momentum = momentum
        self.eps = _check_eps(eps)
        self.groups = groups
        self.method = method
        self.iters = iters
        self.affine = check_flag("affine", affine)
        self.track_running_stats = check_flag("track_running_stats", track_running_stats)
        if train_stats not in ("batch", "running"):
            raise ValueError(f"train_stats must be 'batch' or 'running', got {train_stats!r}")
        if train_stats == "running" and not self.track_running_stats:
            raise ValueError("train_stats='running' whitens with the running statistics: it needs track_running_stats=True")
        self.train_stats = train_stats
        self.shrinkage = check_number("shrinkage", shrinkage, low=0.0, high=1.0)
        self.sample_decorrelation = check_number("sample_decorrelation", sample_decorrelation, low=0.0, high=1.0,
                                                 high_open=True)
        c = num_features // groups
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_cov", torch.eye(c).repeat(groups, 1, 1))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_cov", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, centered={self.centered}, groups={self.groups}, eps={self.eps}, "
            f"momentum={self.momentum}, method={self.method!r}, iters={self.iters}, affine={self.affine}, "
            f"train_stats={self.train_stats!r}, shrinkage={self.shrinkage}, "
            f"sample_decorrelation={self.sample_decorrelation}"
        )

    def _inv_sqrt(self, S: Tensor) -> Tensor:
        if self.method == "eigh":
            return linalg.inv_sqrt(S, method="eigh")
        return linalg.inv_sqrt(S, method="newton_schulz", iters=self.iters)

    def _eps_for(self, S: Tensor) -> Tensor | float:
        """ε raised, per group, to the rounding level ``c·2⁻⁵²·tr S`` of the float64 matrix S.

        A covariance of rank-deficient features has zero eigenvalues that rounding
        moves by about that much either way; a smaller ε would leave S + εI indefinite.
        """
        if self.eps == 0:
            return 0.0
        c = S.shape[-1]
        tr = torch.diagonal(S.detach(), dim1=-2, dim2=-1).sum(-1).clamp_min(0)
        return torch.clamp_min(c * torch.finfo(torch.float64).eps * tr, self.eps)[:, None, None]

    @staticmethod
    def _mean_eig(S: Tensor) -> Tensor:
        """``tr S / c`` per group, shaped to broadcast against (G, c, c); the target scale of the shrinkage."""
        return torch.diagonal(S, dim1=-2, dim2=-1).mean(-1).clamp_min(0)[:, None, None]

    def _decorrelate_samples(self, y: Tensor) -> Tensor:
        """``√k̄ (ρYYᵀ + (1 − ρ)k̄I)^{-1/2} Y`` on the smaller side (see ``sample_decorrelation``)."""
        n, C = y.shape
        rho = self.sample_decorrelation
        small = n <= C
        K = y @ y.mT if small else y.mT @ y
        kbar = torch.diagonal(K).sum() / n
        if not bool(kbar > 0):  # all rows zero: nothing to decorrelate
            return y
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        R = self._inv_sqrt(rho * K + (1 - rho) * kbar * eye)
        return kbar.sqrt() * (R @ y if small else y @ R)

    def _check_nonsingular(self, S: Tensor, what: str) -> None:
        if self.eps == 0:
            _assert_nonsingular(S, what + " of Whitening (eps=0)")

    def _update_running(self, mean: Tensor | None, cov: Tensor, n: int) -> None:
        m = self.momentum
        unbias = n / (n - 1) if self.centered else 1.0
        new_cov = self.running_cov.double().mul(1 - m).add(cov.detach(), alpha=m * unbias)
        new_mean = None
        if mean is not None:
            new_mean = self.running_mean.double().mul(1 - m).add(mean.detach().reshape(-1), alpha=m)
        for name, new, buf in (("running_cov", new_cov, self.running_cov), ("running_mean", new_mean, self.running_mean)):
            if new is not None and not bool(torch.isfinite(new.to(buf.dtype)).all()):
                raise ValueError(
                    f"Whitening: the batch statistics (largest |entry| {float(new.abs().max()):.3g}) overflow the "
                    f"{buf.dtype} buffer {name}; rescale the input, convert the module with .double(), or use "
                    "track_running_stats=False"
                )
        self.num_batches_tracked.add_(1)
        self.running_cov.copy_(new_cov)
        if new_mean is not None:
            self.running_mean.copy_(new_mean)

    def forward(self, x: Tensor) -> Tensor:
        x = check_tensor(x, "input", min_ndim=2)
        C, G = self.num_features, self.groups
        c = C // G
        if x.shape[1] != C:
            raise ValueError(f"Whitening({C}) expects input of shape (B, {C}, *), got {tuple(x.shape)}")
        out_dtype = x.dtype
        # statistics and the map in float64: a float32 covariance rounds its zero
        # eigenvalues to ±eps32·λ_max (beyond a default eps) and overflows above ~1e19
        xs = x.to(torch.float64)
        # (B, C, *) -> (N, C) with N = B * prod(spatial)
        flat = xs.movedim(1, -1).reshape(-1, C)
        n = flat.shape[0]
        grouped = flat.reshape(n, G, c).transpose(0, 1)  # (G, N, c)
        use_batch = (self.training and self.train_stats == "batch") or not self.track_running_stats
        eye_c = torch.eye(c, dtype=xs.dtype, device=xs.device)
        if self.training and n < 2:
            raise ValueError(f"Whitening in training mode needs more than one sample per channel, got input of shape {tuple(x.shape)}")
        if use_batch:
            if n < 2:
                raise ValueError(f"Whitening with batch statistics needs more than one sample per channel, got input of shape {tuple(x.shape)}")
            if self.eps == 0 and self.shrinkage == 0 and n <= c:
                raise ValueError(f"Whitening with eps=0 needs more samples ({n}) than channels per group ({c}); set eps > 0 or groups > 1")
            if self.centered:
                mean = grouped.mean(dim=1, keepdim=True)  # (G, 1, c)
                xc = grouped - mean
            else:
                mean = None
                xc = grouped
            cov = xc.mT @ xc / n  # (G, c, c)
            a = self.shrinkage
            # Σ_α + εI = (1 − α)Σ + βI with β = α·tr Σ / c + ε
            beta = a * self._mean_eig(cov) + self._eps_for(cov)
            if n <= c:
                # fewer samples than channels: the same map on the n × n side,
                # xc ((1 − α)xcᵀxc/n + βI)^{-1/2} = √n ((1 − α)xc xcᵀ + nβI)^{-1/2} xc (cheaper, no
                # c − n repeated eigenvalues β in the covariance)
                K = (1 - a) * (xc @ xc.mT) + (n * beta) * torch.eye(n, dtype=xc.dtype, device=xc.device)
                y_small = math.sqrt(n) * (self._inv_sqrt(K) @ xc)
            else:
                S = (1 - a) * cov + beta * eye_c
                self._check_nonsingular(S, "the batch covariance")
                y_small = xc @ self._inv_sqrt(S)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self._update_running(mean, cov, n)
        else:
            if self.training:
                # train_stats="running": fold the batch in first, then whiten as eval does
                with torch.no_grad():
                    mean = grouped.mean(dim=1, keepdim=True) if self.centered else None
                    xb = grouped - mean if self.centered else grouped
                    self._update_running(mean, xb.mT @ xb / n, n)
            cov = self.running_cov.to(xs.dtype)
            # the stored (rounded) covariance can have slightly negative eigenvalues: use its PSD part
            lam, Q = torch.linalg.eigh(0.5 * (cov + cov.mT))
            cov = (Q * lam.clamp_min(0).unsqueeze(-2)) @ Q.mT
            if self.shrinkage:
                cov = (1 - self.shrinkage) * cov + (self.shrinkage * self._mean_eig(cov)) * eye_c
            self._check_nonsingular(cov, "running_cov")
            xc = grouped - self.running_mean.to(xs.dtype).reshape(G, 1, c) if self.centered else grouped
            y_small = xc @ self._inv_sqrt(cov + self._eps_for(cov) * eye_c)
        y = y_small.transpose(0, 1).reshape(n, C)
        if self.training and self.sample_decorrelation:
            y = self._decorrelate_samples(y)
        if self.affine:
            y = y * self.weight.to(y.dtype) + self.bias.to(y.dtype)
        shape = (x.shape[0], *x.shape[2:], C)
        return y.reshape(shape).movedim(-1, 1).to(out_dtype)


# ----------------------------------------------------------------------------- metrics
def isotropy_metrics(X: Tensor) -> dict[str, float]:
    """How isotropic the rows of ``X`` (n samples × d features) are (the isotropy note).

    Returns a dict of floats (computed in float64):

    - ``gram_distance``: ``min_c ‖XXᵀ − cI‖_F / ‖XXᵀ‖_F`` with the optimal
      ``c = tr(XXᵀ)/n``, i.e. ``sqrt(1 − tr(XXᵀ)² / (n ‖XXᵀ‖_F²))``: 0 when
      ``XXᵀ ∝ I`` (the isotropy note's condition), near 1 when rank one.
      Computed on the smaller Gram side (``‖XXᵀ‖_F = ‖XᵀX‖_F``). ``XXᵀ`` has
      rank ≤ d, so for n > d it is at least ``sqrt(1 − d/n)``.
    - ``effective_rank``: ``exp(H(p))``, ``p_i = σ_i / Σσ`` over the singular
      values of X (Roy & Vetterli 2007); between 1 and min(n, d) (0 for X = 0).
    - ``condition_number``: ``λ_max / λ_min`` of the centered covariance
      ``X_cᵀX_c / n``; ``inf`` when it is singular (e.g. n ≤ d).
    - ``mean_cosine``: mean over pairs i ≠ j of ``cos(x_i, x_j)``; rows of zero
      norm count as cosine 0.
    """
    X = check_tensor(X, "X", min_ndim=2)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D (samples, features) matrix, got shape {tuple(X.shape)}")
    n, d = X.shape
    if n < 2:
        raise ValueError(f"X needs at least 2 rows (samples), got shape {tuple(X.shape)}")
    Xd = X.detach().double()
    # every metric is scale-invariant: divide by the largest entry so squares cannot overflow
    top = float(Xd.abs().max()) if Xd.numel() else 0.0
    if top > 0:
        Xd = Xd / top
    K = Xd.mT @ Xd if n >= d else Xd @ Xd.mT
    fro2 = float((K * K).sum())
    tr = float(torch.diagonal(K).sum())
    gram_distance = math.sqrt(max(0.0, 1.0 - tr * tr / (n * fro2))) if fro2 > 0 else 0.0
    s = torch.linalg.svdvals(Xd)
    if float(s.sum()) > 0:
        p = s / s.sum()
        p = p[p > 0]
        effective_rank = float(torch.exp(-(p * p.log()).sum()))
    else:
        effective_rank = 0.0
    Xc = Xd - Xd.mean(dim=0, keepdim=True)
    ev = torch.linalg.eigvalsh(Xc.mT @ Xc / n)
    lmax, lmin = float(ev[-1]), float(ev[0])
    if lmax <= 0 or lmin <= d * 1e3 * torch.finfo(torch.float64).eps * lmax:
        condition_number = math.inf
    else:
        condition_number = lmax / lmin
    norms = Xd.norm(dim=1)
    U = Xd / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    U = torch.where(norms.unsqueeze(1) > 0, U, torch.zeros_like(U))
    C = U @ U.mT
    mean_cosine = float((C.sum() - torch.diagonal(C).sum()) / (n * (n - 1)))
    return {
        "gram_distance": gram_distance,
        "effective_rank": effective_rank,
        "condition_number": condition_number,
        "mean_cosine": mean_cosine,
    }


# ----------------------------------------------------------------------------- alignment
def _dual(M: Tensor, rule: str, schedule: Any) -> Tensor:
    """The rule's steepest-descent direction (before the minus sign) for gradient M."""
    if rule == "sgd":
        return M
    if rule == "muon":
        return linalg.msign(M, schedule=schedule)
    return torch.sign(M)


def _unit_max(A: Tensor) -> Tensor:
    """A divided by its largest |entry| over the last two dims (zero matrices unchanged)."""
    m = A.detach().abs().amax(dim=(-2, -1), keepdim=True)
    return A / torch.where(m > 0, m, torch.ones_like(m))


def _cosine(A: Tensor, B: Tensor) -> Tensor:
    """Frobenius cosine over the last two dims; 0 where either side is zero."""
    num = (A * B).sum(dim=(-2, -1))
    den = A.norm(dim=(-2, -1)) * B.norm(dim=(-2, -1))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def steepest_feature_direction(G: Tensor, rule: str, *, schedule: Any = "svd") -> Tensor:
    """Steepest-descent direction for the features ``Y`` under the rule's norm.

    ``−G`` (sgd / Frobenius), ``−msign(G)`` (muon / spectral), ``−sign(G)``
    (signsgd / max norm), for ``G = ∂L/∂Y`` of shape ``(..., b, d_out)``
    (the isotropy note; Muon's spectral norm: Keller Jordan's Muon post).
    """
    G = check_tensor(G, "G", min_ndim=2)
    rule = _check_rule(rule)
    return -_dual(G, rule, schedule)


def feature_alignment(X: Tensor, G: Tensor, rule: str, *, schedule: Any = "svd") -> Tensor:
    """Cosine between a rule's feature update and the feature-space steepest direction.

    For a linear layer ``Y = X W`` (the isotropy note's convention: W is d_in × d_out; for
    ``nn.Linear`` the weight is its transpose) with input ``X`` (..., b, d_in) and
    ``G = ∂L/∂Y`` (..., b, d_out), the parameter gradient is ``XᵀG`` and

    - ``rule="sgd"``:     ``ΔW = −XᵀG``,        direction ``D = −G``;
    - ``rule="muon"``:    ``ΔW = −msign(XᵀG)``, direction ``D = −msign(G)``;
    - ``rule="signsgd"``: ``ΔW = −sign(XᵀG)``,  direction ``D = −sign(G)``.

    Returns ``cos(X ΔW, D) = ⟨XΔW, D⟩_F / (‖XΔW‖_F ‖D‖_F)`` over the leading
    batch dims (0 where either is zero). The isotropy note: this is 1 for SGD and Muon
    whenever ``XXᵀ ∝ I`` (e.g. orthonormal rows); SignSGD has no such guarantee.
    ``schedule`` is passed to :func:`steepest.linalg.msign` (default exact SVD).
    """
    X = check_tensor(X, "X", min_ndim=2)
    G = check_tensor(G, "G", min_ndim=2)
    rule = _check_rule(rule)
    if X.shape[-2] != G.shape[-2] or X.shape[:-2] != G.shape[:-2]:
        raise ValueError(
            f"X (..., b, d_in) and G (..., b, d_out) must share leading dims and b, got {tuple(X.shape)} and {tuple(G.shape)}"
        )
    dtype = torch.promote_types(_compute_dtype(X.dtype), _compute_dtype(G.dtype))
    # the cosine is invariant to scaling X and G (each batch element apart): scale both to
    # largest entry 1, or X XᵀG overflows/underflows float32 for entries beyond ~1e±13
    X, G = _unit_max(X.to(dtype)), _unit_max(G.to(dtype))
    dW = -_dual(X.mT @ G, rule, schedule)
    dY = X @ dW
    D = -_dual(G, rule, schedule)
    return _cosine(dY, D)


class _LayerHook:
    """Forward hook of one monitored layer; copies of it (deepcopy, pickle) are inert.

    A closure hook would travel with ``copy.deepcopy(model)`` still feeding the
    monitor, and ``remove()`` could not reach the copy's entry.
    """

    def __init__(self, monitor: AlignmentMonitor | None, name: str, module: nn.Module | None) -> None:
        self.monitor = monitor
        self.name = name
        self.module = None if module is None else weakref.ref(module)

    def __call__(self, mod: nn.Module, inputs: tuple[Tensor, ...], out: Any) -> None:
        if self.monitor is None or self.module is None or self.module() is not mod:
            return
        self.monitor._on_forward(self.name, mod, inputs, out)

    def __deepcopy__(self, memo: dict[int, Any]) -> _LayerHook:
        return _LayerHook(None, self.name, None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_LayerHook, (None, self.name, None))


class _StepHook:
    """Optimizer step post-hook calling :meth:`AlignmentMonitor.record`; copies of it are inert."""

    def __init__(self, monitor: AlignmentMonitor | None) -> None:
        self.monitor = monitor

    def __call__(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.record()

    def __deepcopy__(self, memo: dict[int, Any]) -> _StepHook:
        return _StepHook(None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_StepHook, (None,))


class AlignmentMonitor:
    """Measure feature-space steepest descent on the ``nn.Linear`` layers of a model.

    For each monitored layer ``Y = X Wᵀ + b`` the monitor records, on every
    forward pass with gradients enabled, the input ``X`` (flattened to
    ``(b, d_in)``) and the weights, and by a tensor hook the output gradient
    ``G = ∂L/∂Y``. After ``optimizer.step()`` (automatically when an optimizer
    is given, or by calling :meth:`record`) it forms the actual feature update

        ΔY = X (W_new − W_old)ᵀ  (+ 1 (b_new − b_old)ᵀ when ``include_bias``)

    and stores ``cos(ΔY, D)`` for each requested norm, ``D`` being the
    steepest feature direction (:func:`steepest_feature_direction`: −G,
    −msign(G), −sign(G)) — the measurement of the isotropy note, for any
    optimizer.

    ``W_old`` is the weight at the first forward after the previous step. Every
    forward at those weights counts, their rows stacked (gradient accumulation,
    a layer used twice); forwards at other weights are ignored: they are the
    later evaluations of a multi-evaluation closure (``torch.optim.LBFGS``), so
    the record is the whole step's update against the gradient it started from.
    A forward whose output gets no gradient is dropped.

    A copy of the model (``copy.deepcopy``, pickling) is not monitored: its
    copies of the hooks do nothing and hold no reference to the monitor.

    ``history[layer][norm]`` is the list of cosines, ``steps[layer]`` the
    optimizer step numbers they belong to; :meth:`summary`, :meth:`table` and
    :meth:`plot` present them. Use as a context manager or call :meth:`remove`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        norms: str | Sequence[str] = ("sgd", "muon", "signsgd"),
        *,
        layers: Iterable[str] | None = None,
        every: int = 1,
        include_bias: bool = True,
        schedule: Any = "svd",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(norms, str):
            norms = (norms,)
        if not isinstance(norms, Sequence):
            raise TypeError(f"norms must be a rule name or a sequence of them ({sorted(RULES)}), got {norms!r}")
        self.norms = tuple(_check_rule(nm, "norms") for nm in norms)
        if not self.norms:
            raise ValueError("norms must name at least one of " + str(sorted(RULES)))
        self.every = check_int("every", every, low=1)
        self.include_bias = check_flag("include_bias", include_bias)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.schedule = schedule
        linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, Iterable):
                raise TypeError(f"layers must be an iterable of layer names (e.g. ['0', '2']), got {layers!r}")
            wanted = list(layers)
            unknown = [w for w in wanted if w not in linears]
            if unknown:
                raise ValueError(f"layers {unknown} are not nn.Linear modules of the model; choose from {sorted(linears)}")
            linears = {w: linears[w] for w in wanted}
        if not linears:
            raise ValueError("the model has no nn.Linear layers to monitor")
        self.layers = linears
        self.history: dict[str, dict[str, list[float]]] = {n: {nm: [] for nm in self.norms} for n in linears}
        self.steps: dict[str, list[int]] = {n: [] for n in linears}
        self.step_count = 0
        self._pending: dict[str, dict[str, Tensor | None]] = {}
        self._warned: set[str] = set()
        self._handles: list[Any] = []
        for name, mod in linears.items():
            self._handles.append(mod.register_forward_hook(_LayerHook(self, name, mod)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(_StepHook(self)))

    def _on_forward(self, name: str, mod: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        if not torch.is_grad_enabled() or not out.requires_grad or self.step_count % self.every:
            return
        w = mod.weight.detach()
        b = None if mod.bias is None else mod.bias.detach()
        entry = self._pending.get(name)
        if entry is None:
            entry = {"w": w.clone(), "b": None if b is None else b.clone(), "chunks": []}
            self._pending[name] = entry
        elif not (torch.equal(w, entry["w"]) and (b is None or torch.equal(b, entry["b"]))):
            return  # weights moved inside the step (a closure's later evaluation)
        chunk: dict[str, Tensor | None] = {"x": inputs[0].detach().reshape(-1, mod.in_features), "g": None}
        entry["chunks"].append(chunk)

        def grad_hook(g: Tensor) -> None:
            g = g.detach().reshape(-1, mod.out_features)
            chunk["g"] = g if chunk["g"] is None else chunk["g"] + g

        out.register_hook(grad_hook)

    @torch.no_grad()
    def record(self) -> None:
        """Compute and store the alignments for the step just taken."""
        for name, entry in self._pending.items():
            chunks = [ch for ch in entry["chunks"] if ch["g"] is not None]
            if not chunks:  # no backward through this layer
                continue
            mod = self.layers[name]
            x = torch.cat([ch["x"] for ch in chunks])
            g = torch.cat([ch["g"] for ch in chunks])
            # float64: X ΔWᵀ of float32 inputs beyond ~1e19 would overflow (a diagnostic, small)
            dtype = torch.float64
            x, g = x.to(dtype), g.to(dtype)
            dW = (mod.weight.detach().to(dtype) - entry["w"].to(dtype))
            dY = x @ dW.mT
            if self.include_bias and mod.bias is not None and entry["b"] is not None:
                dY = dY + (mod.bias.detach().to(dtype) - entry["b"].to(dtype))
            if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(dY).all())):
                if name not in self._warned:
                    warnings.warn(
                        f"AlignmentMonitor: non-finite gradient or update at layer {name!r} (step {self.step_count}); "
                        "recording NaN (the training has probably diverged: lower the learning rate)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self._warned.add(name)
                for nm in self.norms:
                    self.history[name][nm].append(math.nan)
                self.steps[name].append(self.step_count)
                continue
            for nm in self.norms:
                D = -_dual(g, nm, self.schedule)
                self.history[name][nm].append(float(_cosine(dY, D)))
            self.steps[name].append(self.step_count)
        self._pending = {}
        self.step_count += 1

    def remove(self) -> None:
        """Detach all hooks (the history is kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = {}

    def __enter__(self) -> AlignmentMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def summary(self, last: int | None = None) -> list[dict[str, Any]]:
        """Per layer and norm: mean, min, max and final cosine (over the last ``last`` records)."""
        rows = []
        for name in self.layers:
            for nm in self.norms:
                vals = self.history[name][nm]
                if last is not None:
                    vals = vals[-last:]
                if not vals:
                    rows.append({"layer": name, "norm": nm, "steps": 0, "mean": math.nan, "min": math.nan, "max": math.nan, "final": math.nan})
                    continue
                rows.append(
                    {
                        "layer": name,
                        "norm": nm,
                        "steps": len(vals),
                        "mean": sum(vals) / len(vals),
                        "min": min(vals),
                        "max": max(vals),
                        "final": vals[-1],
                    }
                )
        return rows

    def table(self, last: int | None = None, floatfmt: str = ".3f") -> str:
        """:meth:`summary` as a markdown table."""
        from ._table import markdown_table

        keys = ["layer", "norm", "steps", "mean", "min", "max", "final"]
        return markdown_table(keys, [[r[k] for k in keys] for r in self.summary(last)], floatfmt)

    def plot(self, norm: str | None = None, ax: Any = None, title: str | None = None) -> Any:
        """Cosine per step for each layer under ``norm`` (default: the first); returns the figure."""
        import matplotlib.pyplot as plt

        nm = self.norms[0] if norm is None else _check_rule(norm, "norm")
        if nm not in self.norms:
            raise ValueError(f"norm {nm!r} was not recorded; the monitor records {list(self.norms)}")
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
        else:
            fig = ax.figure
        for name in self.layers:
            ax.plot(self.steps[name], self.history[name][nm], label=name, lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"cos(XΔW, steepest) [{nm}]")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        return fig
