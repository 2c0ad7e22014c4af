"""Matrix functions of singular values: ``msign`` and what is built on it.

Source: Su, *Computing singular value clipping mclip via msign*, kexue.fm/archives/11006
(the mclip note), and the Newton–Schulz literature cited per function. Notation: ``M = U Σ Vᵀ``
(thin SVD, rank r). Every function here is batched over leading dimensions,
returns the input's dtype and shape, and lets gradients flow.

Rank convention (the one of ``numpy.linalg.pinv`` / ``matrix_rank``): singular
values ``σ ≤ max(m, n) · eps · σ_max`` count as zero, with ``eps`` the machine
epsilon of the input (float32's for bfloat16/float16 inputs, whose values are
taken as exact). So ``msign`` of a rank-r matrix is ``U[:, :r] V[:, :r]ᵀ`` and
``msign(0) = 0``. Where a function is linear near zero (``mclip`` below its
bound, ``mpoly`` without a constant term) those directions pass through scaled by
its slope instead, so clipping leaves small singular values as they are.

Every function is exact in its accurate schedule (one float64 decomposition,
first and second derivatives exact, batched by ``torch.func.vmap``); the
Newton–Schulz schedules state their own accuracy contract (:func:`mclip`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

import torch
from torch import Tensor
from ._validate import check_choice, check_int, check_number, check_tensor, no_data

__all__ = [
    "EXACT",
    "NSConfig",
    "fast_bf16",
    "ns_dtype_for",
    "Schedule",
    "SCHEDULES",
    "resolve_schedule",
    "msign",
    "mclip",
    "mclamp",
    "mstep",
    "msquare",
    "mpoly",
    "spectral_norm",
    "inv_sqrt",
    "ns_scalar",
]

# Quintic Newton–Schulz: p(x) = (15x − 10x³ + 3x⁵)/8, converges to 1 on (0, ~1.4).
_QUINTIC = (1.875, -1.25, 0.375)


# ---------------------------------------------------------------------------
# Schedules as data
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """A Newton–Schulz coefficient schedule.

    Step k maps ``X ← a_k X + b_k (X Xᵀ) X + c_k (X Xᵀ)² X``, i.e. each singular value
    ``σ ← a σ + b σ³ + c σ⁵``. ``X₀ = M / (‖M‖_F · safety)``. Steps past the listed
    rows use ``tail`` (default: the convergent quintic (1.875, −1.25, 0.375)).
    """

    name: str
    coeffs: tuple[tuple[float, float, float], ...]
    safety: float = 1.0
    tail: tuple[float, float, float] = _QUINTIC
    source: str = ""
    #: start from X/(‖XXᵀ‖²-based bound on σ_max) instead of X/‖X‖_F (see ``_newton_schulz``)
    gram_scale: bool = False

    def rows(self, steps: int | None = None) -> list[tuple[float, float, float]]:
        if steps is None:
            return list(self.coeffs)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        rows = list(self.coeffs[:steps])
        return rows + [self.tail] * (steps - len(rows))


def _su_row(a: float, b: float, c: float, s: float = 1.01) -> tuple[float, float, float]:
    # Each row is used as f(x/1.01) so rounding cannot push a value past the interval.
    return (a / s, b / s**3, c / s**5)


SCHEDULES: dict[str, Schedule] = {
    "muon": Schedule(
        "muon",
        ((3.4445, -4.7750, 2.0315),) * 5,
        safety=1.0,
        tail=(3.4445, -4.7750, 2.0315),
        source="Keller Jordan, Muon (2024); leaves σ spread over about [0.5, 1.5]",
    ),
    "polar_express": Schedule(
        "polar_express",
        (
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        safety=1.02,
        source="Amsel, Persson, Musco, Gower (2025), Polar Express, as used in modded-nanogpt",
        gram_scale=True,
    ),
    "minimax": Schedule(
        "minimax",
        tuple(
            _su_row(*r)
            for r in (
                (8.28721, -23.5959, 17.3004),
                (4.10706, -2.94785, 0.544843),
                (3.94869, -2.9089, 0.551819),
                (3.31842, -2.48849, 0.510049),
                (2.30065, -1.6689, 0.418807),
                (1.8913, -1.268, 0.376804),
            )
        ),
        safety=1.0,
        source="Su, kexue.fm/archives/10996 (minimax table), rows used as f(x/1.01)",
    ),
    # Twice Muon's cost for a converged result: eight of Keller Jordan's steps bring σ ≥ 1e-3·‖M‖_F into
    # [0.68, 1.14], two steps of a polynomial with f(1) = 1, f'(1) = 0 then settle them within 1 ± 6e-4.
    "deepseek_v4": Schedule(
        "deepseek_v4",
        ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2,
        safety=1.0,
        tail=(2.0, -1.5, 0.5),
        source="DeepSeek-AI, DeepSeek-V4 technical report (2026), as reported: eight steps of Keller Jordan's "
               "quintic, then two of (2, -1.5, 0.5); from X/‖X‖_F, ten steps put σ ≥ 1e-3·‖M‖_F within [1, 1.0006]",
    ),
}


def ns_scalar(x: Tensor, schedule: str | Schedule | Sequence[Sequence[float]], steps: int | None = None) -> Tensor:
    """The scalar map a schedule applies to each (already normalized) singular value.

    ``x ← a x + b x³ + c x⁵`` for each row; used to inspect a schedule's range, e.g.
    Polar Express maps [1e-3, 1] into about [0.84, 1.15].
    """
    for a, b, c in _resolve_schedule(schedule).rows(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


# ---------------------------------------------------------------------------
# Device-aware precision
# ---------------------------------------------------------------------------
_FAST_BF16: dict[tuple[str, int | None], bool] = {}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_has_bf16_units() -> bool | None:
    """True/False from the CPU's feature flags (Linux), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    return any(flag in text.split() for flag in _BF16_FLAGS)


def _probe_cpu_bf16() -> bool:
    """Time one 256² product in float32 and in bfloat16 (after a warm-up): bf16 counts as fast at ≤ half the time."""
    import time

    a = torch.randn(256, 256)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        t0 = time.perf_counter()
        for _ in range(3):
            x @ x
        times[dt] = time.perf_counter() - t0
    return times[torch.bfloat16] <= 0.5 * times[torch.float32]


def fast_bf16(device: torch.device | str | None = None) -> bool:
    """Whether bfloat16 matrix products are much faster than float32 ones on ``device`` (decided once, cached).

    CUDA: whenever the GPU supports bfloat16 (tensor cores). CPU: only with bf16
    units (AVX512-BF16 or AMX flags, then confirmed by timing one product each
    way; without readable flags the timing decides); on CPUs without them bf16
    products are emulated and 8–100× slower than float32. Other devices: False.
    This is what ``dtype="auto"`` (:func:`msign`'s Newton–Schulz schedules) and
    Muon's ``ns_dtype="auto"`` follow.
    """
    dev = torch.device("cpu" if device is None else device)
    key = (dev.type, dev.index)
    if key not in _FAST_BF16:
        if dev.type == "cuda":
            _FAST_BF16[key] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        elif dev.type == "cpu":
            flags = _cpu_has_bf16_units()
            _FAST_BF16[key] = _probe_cpu_bf16() if flags in (True, None) else False
        else:
            _FAST_BF16[key] = False
    return _FAST_BF16[key]


def ns_dtype_for(X: Tensor, dtype: torch.dtype | str | None) -> torch.dtype:
    """The Newton–Schulz working dtype: an explicit one; ``None``: X's (float32 for half X);
    ``"auto"``: bfloat16 where :func:`fast_bf16` says so for X's device and X is at most float32,
    else as ``None``."""
    if dtype == "auto":
        return torch.bfloat16 if X.dtype != torch.float64 and fast_bf16(X.device) else _work_dtype(X.dtype)
    return _work_dtype(X.dtype) if dtype is None else dtype  # type: ignore[return-value]


#: Schedules computed exactly rather than by Newton–Schulz.
EXACT = ("accurate", "svd")
_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
ScheduleLike = Union[str, Schedule, Sequence[Sequence[float]]]


def _resolve_schedule(schedule: ScheduleLike) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        try:
            return SCHEDULES[schedule]
        except KeyError:
            raise ValueError(
                f"schedule={schedule!r} is unknown; use 'accurate', 'svd', one of {sorted(SCHEDULES)}, "
                "or a sequence of (a, b, c) triples"
            ) from None
    try:
        rows = tuple(tuple(float(v) for v in row) for row in schedule)
    except (TypeError, ValueError):
        rows = ()
    if not rows or any(len(r) != 3 for r in rows):
        raise ValueError("schedule as a sequence must hold (a, b, c) triples, e.g. [(3.4445, -4.775, 2.0315)] * 5")
    if not all(math.isfinite(v) for r in rows for v in r):
        raise ValueError(f"schedule entries must be finite numbers, got {rows}")
    return Schedule("custom", rows, safety=1.0, tail=rows[-1])  # type: ignore[arg-type]


@dataclass(frozen=True)
class NSConfig:
    """A checked orthogonalization setting: what :func:`resolve_schedule` returns.

    ``schedule`` is a :class:`Schedule` or one of :data:`EXACT`; ``steps`` truncates
    or extends it (``None``: its own length); ``dtype`` is the working precision of
    Newton–Schulz (``None``: the input's, float32 for half inputs). Hashable, so
    equal settings share one batched computation.
    """

    schedule: Schedule | str = "accurate"
    steps: int | None = None
    dtype: torch.dtype | str | None = None

    def msign(self, M: Tensor) -> Tensor:
        """``msign(M)`` with these settings (no finiteness check: callers decide)."""
        return msign(M, schedule=self.schedule, steps=self.steps, dtype=self.dtype, check_finite=False)


def resolve_schedule(
    schedule: ScheduleLike | NSConfig = "accurate",
    *,
    steps: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> NSConfig:
    """Check an orthogonalization setting once and return it as an :class:`NSConfig`.

    ``schedule``: ``"accurate"``, ``"svd"``, a name in :data:`SCHEDULES`, a
    :class:`Schedule` or a sequence of ``(a, b, c)`` rows; ``steps``: an int in
    [1, 100) or None; ``dtype``: None, ``"auto"`` (:func:`fast_bf16`) or a floating
    dtype for Newton–Schulz. An
    :class:`NSConfig` passes through unchanged. Every mistake is a
    ValueError/TypeError naming the argument.
    """
    if isinstance(schedule, NSConfig):
        return schedule
    if not (isinstance(schedule, str) and schedule in EXACT):
        schedule = _resolve_schedule(schedule)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100):
        raise ValueError(f"steps must be an int in [1, 100) or None, got {steps!r}")
    if dtype is not None and dtype != "auto" and dtype not in _NS_DTYPES:
        raise TypeError(f"dtype must be None, 'auto' or one of {_NS_DTYPES}, got {dtype!r}")
    return NSConfig(schedule, steps, dtype)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _rank_rtol(shape: torch.Size, dtype: torch.dtype) -> float:
    return max(shape[-2], shape[-1]) * torch.finfo(_work_dtype(dtype)).eps


def _amax(X: Tensor) -> Tensor:
    return X.abs().amax(dim=(-2, -1), keepdim=True)


# ---------------------------------------------------------------------------
# Exact functions of singular values by one Gram eigendecomposition (float64)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spectral:
    """A function of the singular values: ``f(σ)`` and ``f'(σ)`` on float64 σ > 0, applied as ``U f(Σ) Vᵀ``."""

    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    #: below this σ, f(σ) = slope0·σ exactly (or to within O(σ²)): there directions under the rank
    #: threshold pass through scaled by slope0 instead of being dropped (clipping leaves them as they are)
    linear_below: Tensor | float = 0.0
    slope0: float = 0.0


def _spectral_parts(X: Tensor, rtol: float, svd: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """For wide float64 X (…, m, n), m ≤ n: U, σ, the kept-mask and (SVD route only) Vᵀ.

    Float64 inputs ask for a rank threshold (≈1e-13·σ_max) a Gram matrix cannot
    resolve, so they take an SVD (as does ``svd=True``); the rest an
    eigendecomposition of ``X Xᵀ``.
    Differentiable (torch's own rules) when called with grad enabled: used to
    rebuild the decomposition for second derivatives.
    """
    if svd or (X.dtype == torch.float64 and rtol < 1e-10):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        keep = S.detach() > rtol * S.detach().amax(dim=-1, keepdim=True)
        return U, S, keep, Vh
    lam, U = torch.linalg.eigh(X @ X.mT)
    lam0 = lam.detach().clamp_min(0)
    keep = lam0.sqrt() > rtol * lam0.sqrt().amax(dim=-1, keepdim=True)
    S = torch.where(keep, torch.where(keep, lam, torch.ones_like(lam)).sqrt(), torch.zeros_like(lam))
    return U, S, keep, None


#: float32 Gram products are used when every eigenvalue of XXᵀ is within this factor of the largest
#: (σ_max/σ_min ≤ 9): the result's error is then ≈ eps32·(σ_max/σ_min)² ≤ 1e-5, inside the 1e-4 contract
_GRAM32_COND = 84.0


def _gram32_parts(X: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor, None] | None:
    """The decomposition of a wide float32 X from a float32 Gram product and a float64 eigh, or None.

    Half the cost of float64 products on wide matrices; returned only where the
    spectrum is narrow enough for float32 rounding of XXᵀ to stay far inside the
    1e-4 contract (otherwise the caller takes the float64 route).
    """
    if X.shape[-1] < GRAM_ASPECT * X.shape[-2] or no_data(X):
        return None  # near-square matrices are rarely that well conditioned: go straight to float64
    lam, U = torch.linalg.eigh((X @ X.mT).double())
    if not bool(((lam[..., :1] * _GRAM32_COND >= lam[..., -1:]) & (lam[..., -1:] > 0)).all()):
        return None  # a wide spectrum, or a zero matrix: the float64 route (with its rank rule)
    keep = torch.ones_like(lam, dtype=torch.bool)
    return U, lam.clamp_min(0).sqrt(), keep, None


def _safe(S: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, S, torch.ones_like(S))


def _dropped_gain(S: Tensor, rtol: float, fn: _Spectral) -> Tensor:
    """Per matrix (…, 1): the factor on directions below the rank threshold — ``slope0`` where every such σ
    (≤ rtol·σ_max) lies where f is linear, else 0 (the rank convention)."""
    smax = S.detach().amax(dim=-1, keepdim=True)
    lin = torch.as_tensor(fn.linear_below, dtype=S.dtype, device=S.device)
    return torch.where(rtol * smax <= lin, fn.slope0, 0.0).to(S.dtype)


def _spectral_forward(X: Tensor, U: Tensor, S: Tensor, keep: Tensor, Vh: Tensor | None, fn: _Spectral,
                      hd: Tensor) -> Tensor:
    if Vh is not None:  # the dropped directions are U_d S_d V_dᵀ: scale them by h_d without any cancellation
        fS = torch.where(keep, fn.f(_safe(S, keep)), hd * S)
        return (U * fS.unsqueeze(-2)) @ Vh
    h = torch.where(keep, fn.f(_safe(S, keep)) / _safe(S, keep), hd)
    return ((U * h.unsqueeze(-2)) @ U.mT).to(X.dtype) @ X  # m³ + m²n, cheaper than 2m²n for wide X


def _spectral_vjp(X: Tensor, U: Tensor, S: Tensor, keep: Tensor, Vh: Tensor | None, G: Tensor,
                  fn: _Spectral, hd: Tensor) -> Tensor:
    """``∇X`` of ``⟨G, U f(Σ) Vᵀ⟩`` over the kept singular triplets (pinv convention).

    With ``Gp = Uᵀ G V``: ``Q = A ∘ sym(Gp) + B ∘ skew(Gp)``, ``A_ij = (f_i − f_j)/(σ_i − σ_j)``
    (``f'`` where σ_i = σ_j), ``B_ij = (f_i + f_j)/(σ_i + σ_j)``, and
    ``∇X = U Q Vᵀ + U diag(f/σ) Uᵀ G (I − V Vᵀ) + (I − U Uᵀ) G V diag(f/σ) Vᵀ``
    (the last two: the complements of the row and column spaces; U, V kept columns),
    plus ``h_d (I − U Uᵀ) G (I − V Vᵀ)`` where the directions below the rank
    threshold pass through with gain h_d. Pure tensor algebra, so it is itself
    differentiable.
    """
    kf = keep.to(X.dtype)
    Ss = _safe(S, keep)
    inv = kf / Ss
    V = Vh.mT * kf.unsqueeze(-2) if Vh is not None else X.mT @ (U * inv.unsqueeze(-2))  # (n, m)
    U = U * kf.unsqueeze(-2)
    f = torch.where(keep, fn.f(Ss), torch.zeros_like(S))
    d = torch.where(keep, fn.df(Ss), torch.zeros_like(S))
    si, sj = S.unsqueeze(-1), S.unsqueeze(-2)
    fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
    ds = si - sj
    close = ds.abs() <= 1e-12 * (si.abs() + sj.abs()).clamp_min(torch.finfo(X.dtype).tiny)
    A = torch.where(close, 0.5 * (d.unsqueeze(-1) + d.unsqueeze(-2)), (fi - fj) / torch.where(close, 1.0, ds))
    ssum = si + sj
    B = torch.where(ssum > 0, (fi + fj) / torch.where(ssum > 0, ssum, 1.0), torch.zeros_like(ssum))
    both = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    GV = G @ V
    Gp = U.mT @ GV
    Q = torch.where(both, A * (0.5 * (Gp + Gp.mT)) + B * (0.5 * (Gp - Gp.mT)), torch.zeros_like(Gp))
    h = f * inv
    UtG = U.mT @ G
    rows = (h.unsqueeze(-1) * (UtG - (UtG @ V) @ V.mT))  # diag(f/σ) Uᵀ G (I − V Vᵀ)
    cols = (GV - U @ (U.mT @ GV)) * h.unsqueeze(-2)  # (I − U Uᵀ) G V diag(f/σ)
    out = U @ (Q @ V.mT + rows) + cols @ V.mT
    if fn.slope0 != 0:
        R = G - U @ UtG
        out = out + hd.unsqueeze(-1) * (R - (R @ V) @ V.mT)
    return out


class _SpectralFunction(torch.autograd.Function):
    """``U f(Σ) Vᵀ`` of a wide float64 X, exact, with an exact backward that is itself differentiable.

    First derivatives use the decomposition saved by the forward; when a second
    derivative is asked for (the backward runs with grad enabled), the
    decomposition is rebuilt with torch's own differentiable SVD/eigh so the
    gradient carries its dependence on X (exact for distinct singular values).
    Free of data-dependent Python control flow, so ``torch.func.vmap``/``jacrev``
    can batch it (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor, rtol: float, fn: _Spectral, svd: bool):  # type: ignore[override]
        parts = _gram32_parts(X, rtol) if X.dtype == torch.float32 and not svd else None
        if parts is None:
            X = X.double()
            parts = _spectral_parts(X, rtol, svd)
        U, S, keep, Vh = parts
        out = _spectral_forward(X, U, S, keep, Vh, fn, _dropped_gain(S, rtol, fn))
        return out, U, S, keep, (Vh if Vh is not None else X.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        X, rtol, fn, svd = inputs
        _, U, S, keep, Vh = output
        ctx.rtol, ctx.fn, ctx.svd = rtol, fn, svd
        ctx.mark_non_differentiable(U, S, keep, Vh)
        ctx.save_for_backward(X, U, S, keep, Vh)

    @staticmethod
    def backward(ctx, G: Tensor, *_):  # type: ignore[override]
        X, U, S, keep, Vh = ctx.saved_tensors
        X = X.double()  # a float32 input saved as is
        Vh = Vh if Vh.numel() else None
        if torch.is_grad_enabled():  # create_graph=True: make the decomposition depend on X
            U, S, keep, Vh = _spectral_parts(X, ctx.rtol, ctx.svd)
        hd = _dropped_gain(S, ctx.rtol, ctx.fn)
        return _spectral_vjp(X, U, S, keep, Vh, G.to(X.dtype), ctx.fn, hd), None, None, None


def _spectral_apply(X: Tensor, rtol: float, fn: _Spectral, svd: bool) -> Tensor:
    return _SpectralFunction.apply(X, rtol, fn, svd)[0]


def _pow2_scale(X: Tensor) -> Tensor:
    """max|X| rounded down to a power of two (float64, (…, 1, 1)): dividing by it is exact in any dtype."""
    a = _amax(X.detach().to(torch.float64))
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    return torch.exp2(e)


def _spectral_exact(M: Tensor, fn: Callable[[Tensor], _Spectral], svd: bool = False) -> Tensor:
    """``U f(Σ) Vᵀ`` of M (any float dtype and orientation), computed in float64, returned in M's dtype.

    The magnitude ``s = max|M|`` is scaled out so the Gram matrix of inputs near
    1e±300 cannot overflow: ``fn(s)`` (s of shape (…, 1)) is the function to apply
    to the singular values of ``M/s``, and the result is multiplied by s.
    """
    X, t = _wide(M)
    s = _pow2_scale(X)
    Xs = X.to(torch.float64) / s if M.dtype == torch.float64 else X.float() / s.float()
    out = _spectral_apply(Xs, _rank_rtol(M.shape, M.dtype), fn(s[..., 0]), svd)
    out = out * s.to(out.dtype)  # a power of two: exact, and no pass in float64 over a float32 result
    return _in_range(_unwide(out, t).to(M.dtype), M)


def _in_range(out: Tensor, M: Tensor) -> Tensor:
    """``out`` when finite; a result beyond M's dtype range (e.g. σ² of 1e30 in float32) is an error, not inf."""
    if not no_data(out) and not bool(torch.isfinite(out).all()):
        raise ValueError(f"the result overflows {M.dtype} (M's singular values are up to "
                         f"{float(M.detach().double().abs().max()):.3g} in magnitude); pass M in float64, e.g. M.double()")
    return out


def _msign_exact(X: Tensor, rtol: float, svd: bool = False) -> Tensor:
    """Exact msign of a wide X (any float dtype): float64, or float32 products where that keeps the contract."""
    s = _pow2_scale(X)  # scale out the magnitude: inputs near 1e±30 cannot overflow XXᵀ
    Xs = X.to(torch.float64) / s if X.dtype == torch.float64 else X.float() / s.float()
    return _spectral_apply(Xs, rtol, _POLAR, svd)


_POLAR = _Spectral(torch.ones_like, torch.zeros_like)


# ---------------------------------------------------------------------------
# Symmetric matrix functions by eigh, with the Daleckii–Krein backward
# ---------------------------------------------------------------------------
def _check_positive(lam: Tensor) -> None:
    if bool((lam[..., 0] <= 0).any()):
        raise ValueError(
            f"A is not positive definite (smallest eigenvalue {float(lam[..., 0].min()):.3g}); "
            "pass eps > 0 to add eps·I, or check the input"
        )


def _inv_sqrt_parts(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q, f(Λ) = Λ^{-1/2} and the Daleckii–Krein matrix L_ij = (f_i − f_j)/(λ_i − λ_j) (f' on the diagonal)."""
    lam, Q = torch.linalg.eigh(A)
    if not no_data(lam):
        _check_positive(lam.detach())
    r = lam.sqrt()
    # closed form of the divided difference of λ^{-1/2}: finite at repeated eigenvalues (A ≈ I)
    L = -1.0 / (r.unsqueeze(-1) * r.unsqueeze(-2) * (r.unsqueeze(-1) + r.unsqueeze(-2)))
    return Q, 1.0 / r, L


class _InvSqrt(torch.autograd.Function):
    """``A^{-1/2} = Q Λ^{-1/2} Qᵀ`` for symmetric positive definite float64 A.

    Backward (Daleckii–Krein): ``∇A = Q [(Qᵀ sym(G) Q) ∘ L] Qᵀ``; like
    :class:`_SpectralFunction`, it rebuilds the eigendecomposition with autograd
    when a second derivative is asked for, and batches under ``torch.func.vmap``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor):  # type: ignore[override]
        Q, fl, L = _inv_sqrt_parts(A)
        return (Q * fl.unsqueeze(-2)) @ Q.mT, Q, L

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        (A,) = inputs
        _, Q, L = output
        ctx.mark_non_differentiable(Q, L)
        ctx.save_for_backward(A, Q, L)

    @staticmethod
    def backward(ctx, G: Tensor, *_):  # type: ignore[override]
        A, Q, L = ctx.saved_tensors
        if torch.is_grad_enabled():
            Q, _, L = _inv_sqrt_parts(A)
        G = G.to(Q.dtype)
        Gs = 0.5 * (G + G.mT)
        return Q @ ((Q.mT @ Gs @ Q) * L) @ Q.mT


# ---------------------------------------------------------------------------
# Newton–Schulz
# ---------------------------------------------------------------------------
def _frobenius(X: Tensor) -> Tensor:
    """‖X‖_F over the last two dims, exact for inputs from 1e-30 to 1e30.

    Accumulating in float64 keeps float32 sums of squares from overflowing or
    underflowing, but on CPU it costs tens of times the float32 reduction. There the
    float32 norm is used whenever it
    is finite and ≥ 1e-10 (squares lost to underflow then weigh < numel·1e-18 of it).
    """
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph: the wide accumulation, fused
        return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    if X.device.type == "cpu" and X.dtype != torch.float64:
        n = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
        if bool((torch.isfinite(n) & (n >= 1e-10)).all()):
            return n
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float64)


Rows = list[tuple[float, float, float]]


#: Gram-space iteration for wide matrices with n ≥ GRAM_ASPECT·m (below it the classic one is cheaper).
GRAM_ASPECT = 2.0


def _newton_schulz(X: Tensor, rows: Rows, safety: float, *, gram_scale: bool = False,
                   gram: bool | None = None) -> Tensor:
    """NS on a wide X (…, m, n), m ≤ n, in X's dtype: ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` per row.

    Start: ``X/(‖X‖_F·safety)``; with ``gram_scale`` instead ``X/(s·safety)`` with
    ``s = ‖(XXᵀ)⁴‖_F^{1/8} = (Σσ¹⁶)^{1/16}``, a bound on σ_max far tighter than
    ‖X‖_F (which is up to √m·σ_max), for one m×m product: the first step forms
    XXᵀ and its square anyway. Small singular values then start inside the
    schedule's design interval instead of below it.

    ``gram`` (default: when n ≥ ``GRAM_ASPECT``·m in float32/float64): iterate on
    ``R = XXᵀ`` (m×m) and accumulate ``Q = ∏ p_k(R_k)``, ``R ← P R P``, then
    ``X ← Q X₀`` (Gram Newton–Schulz; Zhang, Amsel, Chen, Dao 2026): four m×m
    products a step instead of two m×n ones and one m×m, the same polynomial in
    exact arithmetic; in float32 the two agree to ~1e-4 on spectra spread over
    1e-3…1 (rounding amplified by Q's gain), far below the iteration's own
    distance from msign. Not in half precision, where the commuted products drift.
    """
    shape = X.shape
    X = X.reshape(-1, shape[-2], shape[-1]) if X.ndim != 2 else X
    m, n = X.shape[-2], X.shape[-1]
    if gram is None:  # in half precision the commuted products drift (σ up to 1.65 in bfloat16): classic there
        gram = n >= GRAM_ASPECT * m and X.dtype.itemsize >= 4
    norm = _frobenius(X) * (1.0 if gram_scale else safety)
    X = X / torch.where(norm > 0, norm, torch.ones_like(norm)).to(X.dtype)
    if not rows:
        return X.reshape(shape)
    A = X @ X.mT
    A2 = A @ A
    if gram_scale:  # (Σσ¹⁶)^{1/16} = ‖(XXᵀ)⁴‖_F^{1/8}: one m×m product more, a bound within ~7% of σ_max
        A4 = torch.linalg.vector_norm(A2 @ A2, dim=(-2, -1), keepdim=True)
        t = A4.sqrt().sqrt().sqrt() * safety
        t = torch.where(t > 0, t, torch.ones_like(t))
        X, A, A2 = X / t, A / t**2, A2 / t**4
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    if not gram:
        for k, (a, b, c) in enumerate(rows):
            if k:
                A = X @ X.mT
                B = mm(A, A, A, beta=b, alpha=c)
            else:
                B = b * A + c * A2
            X = mm(X, B, X, beta=a, alpha=1.0)
        return X.reshape(shape)
    eye = torch.eye(m, dtype=X.dtype, device=X.device)
    R, R2, Q = A, A2, None
    for k, (a, b, c) in enumerate(rows):
        if k:
            R2 = R @ R
        P = a * eye + b * R + c * R2
        Q = P if Q is None else P @ Q
        if k + 1 < len(rows):
            R = (P @ R) @ P
            R = 0.5 * (R + R.mT)
    return (Q @ X).reshape(shape)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def _wide(M: Tensor) -> tuple[Tensor, bool]:
    t = M.shape[-2] > M.shape[-1]
    return (M.mT if t else M), t


def _unwide(X: Tensor, t: bool) -> Tensor:
    return X.mT if t else X


def _msign_wide(X: Tensor, schedule, steps: int | None, dtype: torch.dtype | None, rtol: float) -> Tensor:
    """msign of a wide X in the working precision the schedule calls for (float64 for exact ones)."""
    if _is_exact(schedule):
        return _msign_exact(X, rtol, svd=schedule == "svd")
    sched = _resolve_schedule(schedule)
    work = ns_dtype_for(X, dtype)
    if work.itemsize < 4:  # normalize before a half-precision cast, so tiny inputs cannot underflow to zero
        X = X.to(_work_dtype(X.dtype))
        n = _frobenius(X)
        X = X / torch.where(n > 0, n, torch.ones_like(n)).to(X.dtype)
    return _newton_schulz(X.to(work), sched.rows(steps), sched.safety, gram_scale=sched.gram_scale)


def msign(
    M: Tensor,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | str | None = "auto",
    check_finite: bool = True,
) -> Tensor:
    """Matrix sign ``msign(M) = U Vᵀ = M (MᵀM)^{-1/2}`` (the mclip note, kexue.fm/archives/11006).

    Rank-deficient M gives ``U[:, :r] V[:, :r]ᵀ`` (pinv convention, see the module
    docstring); ``msign(0) = 0``. Works on the short side; batched over leading dims.

    ``schedule``:

    - ``"accurate"`` (default): relative Frobenius error ≤ 1e-4 against a float64
      SVD for float32 input, on any input. Algorithm: eigendecomposition of the
      float64 Gram matrix of the short side, ``O = U Σ⁻¹ Uᵀ M`` over σ above the
      rank threshold, with the exact backward. Faster than ``torch.linalg.svd`` on
      wide matrices and about 100× more accurate (``steepest bench --only linalg``
      measures both on the machine at hand); unlike any Newton–Schulz schedule it
      honours the rank threshold (NS pushes tiny singular values, noise included, towards 1
      and cannot resolve σ below ~1e-3·‖M‖_F in a fixed number of steps). Float64
      input uses a float64 SVD, since its rank threshold (≈1e-13·σ_max) is below
      what a Gram matrix resolves. The same route is used on every device.
    - ``"polar_express"``, ``"muon"``, ``"minimax"`` or a sequence of ``(a, b, c)``
      triples: Newton–Schulz ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` from
      ``X₀ = M/(‖M‖_F·safety)`` (``SCHEDULES`` holds the data and sources), in
      ``dtype``: ``"auto"`` (default) is bfloat16 where the device multiplies it
      much faster than float32 (CUDA; CPUs with bf16 units, :func:`fast_bf16`),
      else M's dtype (float32 for half inputs); ``None`` is always the latter. ``steps`` truncates or
      extends a schedule (extra steps use its ``tail``). ``"muon"`` is not msign:
      its singular values end in roughly [0.5, 1.5].
    - ``"svd"``: float64 SVD reference.

    Raises ValueError on NaN/Inf (when ``check_finite``), TypeError on non-float dtypes.
    """
    check_tensor(M, "M", min_ndim=2, finite=check_finite)
    if M.shape[-1] == 0 or M.shape[-2] == 0:
        return M.clone()
    X, t = _wide(M)
    O = _msign_wide(X, schedule, steps, dtype, _rank_rtol(M.shape, M.dtype))
    return _unwide(O, t).to(M.dtype)


def _is_exact(schedule) -> bool:
    return isinstance(schedule, str) and schedule in EXACT


def _eye_like(H: Tensor) -> Tensor:
    return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)


#: Relative accuracy the Newton–Schulz routes of mclip, mclamp, mstep and mpoly aim
#: for, by working precision; the number of steps is chosen to reach it (below).
NS_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_MAX_STEPS = 100


def _contract_rows(sched: Schedule, lower: float, tol: float) -> Rows:
    """The schedule's rows, then the convergent quintic, until every σ in [lower, 1] maps within 1 ± tol.

    Decided on the scalar map ``x ← a x + b x³ + c x⁵`` over a log grid of the
    normalized singular values the result depends on (the NS iterate acts on each
    singular value by that map): the number of steps follows from the spectrum
    that matters instead of a fixed count that fails on wide spectra.
    """
    lower = min(max(float(lower), 1e-300), 1.0)
    x = np.concatenate([np.geomspace(lower, 1.0, 256), [lower, 1.0]])
    rows: Rows = []
    while len(rows) < _MAX_STEPS:
        if np.all(np.abs(x - 1.0) <= tol):
            return rows
        row = sched.coeffs[len(rows)] if len(rows) < len(sched.coeffs) else _QUINTIC
        a, b, c = row
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
        rows.append(row)
    warnings.warn(f"Newton–Schulz ({sched.name}) cannot reach relative accuracy {tol:g} for singular values down "
                  f"to {lower:.3g}·‖M‖_F within {_MAX_STEPS} steps; use schedule='accurate' for an exact result",
                  RuntimeWarning, stacklevel=4)
    return rows


def _ns_rows(sched: Schedule, steps: int | None, lower: Tensor | float, tol: float) -> Rows:
    """Rows for a contract-bound NS: the user's ``steps`` as given, else enough for ``lower`` (a batch's worst)."""
    if steps is not None:
        return sched.rows(steps)
    low = float(lower.min()) if isinstance(lower, Tensor) else float(lower)
    return _contract_rows(sched, low, tol)


def _ns_sign(X: Tensor, sched: Schedule, steps: int | None, lower: Tensor | float, tol: float) -> Tensor:
    """``msign`` of a wide X by NS, accurate (within tol) for normalized singular values ≥ ``lower``."""
    # classic iteration: the Gram one accumulates a Q with gains up to 1/σ_min, whose rounding
    # would leak into the large singular values at the accuracy these contracts ask for
    return _newton_schulz(X, _ns_rows(sched, steps, lower, tol), sched.safety, gram_scale=sched.gram_scale,
                          gram=False)


def _fro(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X.double(), dim=(-2, -1))


def _ns_setup(M: Tensor, schedule, dtype: torch.dtype | None) -> tuple[Tensor, bool, Schedule, float]:
    X, t = _wide(M)
    work = dtype if dtype is not None else _work_dtype(M.dtype)
    return X.to(work), t, _resolve_schedule(schedule), NS_TOL[work]


def _ns_clip(X: Tensor, O: Tensor, sched: Schedule, steps: int | None, tol: float) -> Tensor:
    """De-nested ``U min(Σ, 1) Vᵀ = ½[X + O + (O − X) msign(H − I)]``, ``H = sym(X Oᵀ)``, given ``O = msign(X)``.

    Only the sign of ``H − I``'s eigenvalues λ = σ − 1 with |λ| ≥ tol matters to
    within tol (a wrong sign moves σ by at most |λ|), so the inner NS is run until
    those are resolved.
    """
    H = X @ O.mT
    E = 0.5 * (H + H.mT) - _eye_like(H)
    S = _ns_sign(E, sched, steps, tol / (_fro(E).clamp_min(1e-300) * sched.safety), tol).to(X.dtype)
    return 0.5 * (X + O + S @ (O - X))


def _frobenius_lower(X: Tensor, c: float, safety: float) -> Tensor:
    """``c`` as a normalized singular value of each matrix of the batch: ``c / (‖X‖_F·safety)``."""
    return c / (_fro(X).clamp_min(1e-300) * safety)


def mclip(
    M: Tensor,
    bound: float = 1.0,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    form: str = "denested",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Singular value clipping ``U min(Σ, c) Vᵀ = c · mclip(M / c)`` (the mclip note, kexue.fm/archives/11006).

    ``schedule="accurate"`` (default) or ``"svd"``: one float64 decomposition of
    the short side's Gram matrix (an SVD for float64 input or ``"svd"``),
    ``U diag(min(σ, c)/σ) Uᵀ M`` over the kept σ: exact at every scale (no
    cancellation, also for σ/c ≥ 1e15), relative Frobenius error ≤ 1e-4 against a
    float64 SVD for float32 input, exact first and second derivatives.

    Newton–Schulz schedules (``"polar_express"``, ``"muon"``, ``"minimax"``, rows),
    with ``O = msign(M)`` and ``H = sym(M Oᵀ) = U Σ Uᵀ``:

    - ``form="denested"`` (default; Su, *mclip via msign (part 2)*,
      kexue.fm/archives/11059, and leloykun's spectral clipping):
      ``2 mclip(M) = M + O + (O − M) msign(H − I)``. An error of the inner msign
      moves a singular value by at most |σ − c|, so it is not amplified.
    - ``form="nested"`` (the mclip note's): ``2 mclip(M) = M + O + (I − M Oᵀ) msign(M − O)``;
      it loses accuracy on rank-deficient and wide-spectrum inputs (kept to show it:
      ``steepest reproduce --only mclip``).

    Contract of the NS routes with ``steps=None``: the schedule's rows, then the
    convergent quintic (1.875, −1.25, 0.375), are run until the scalar map brings
    every normalized singular value that matters (σ ≥ c for the outer msign,
    |σ − c| ≥ 1e-4·c for the inner one) within 1e-4 of 1 (1e-2 when computing in
    bfloat16/float16), so ``σ_max(result) ≤ c·(1 + 1e-2)`` and the relative error
    is ≤ 1e-2 on any spectrum (tested from rank 0 to full, spectra spread over
    1e-4…1, c from 0.01·σ_max to 2·σ_max); the count grows like log(‖M‖_F/c).
    With ``steps`` given, exactly that many rows run (the schedule's tail after
    its rows) and nothing is promised: 5 Polar Express steps leave singular values
    ≥ c anywhere in about [0.85, 1.15]·c when c/‖M‖_F ≥ 1e-3, and far below c for
    smaller ratios.

    Free exit: matrices with ``‖M‖_F ≤ c`` are returned unchanged. ``bound`` must
    be positive and finite.
    """
    check_tensor(M, "M", min_ndim=2)
    bound = _check_positive_number("bound", bound)
    check_choice("form", form, ("denested", "nested"))
    if M.numel() == 0:
        return M.clone()
    inside = _fro(M) <= bound
    if bool(inside.all()):
        return M.clone()
    if _is_exact(schedule) and form == "denested":
        return _spectral_exact(M, lambda s: _clip_fn(bound / s), svd=schedule == "svd")
    if _is_exact(schedule):
        X, t = _wide(M)
        X = X.to(torch.float64) / bound
        O = _msign_wide(X, schedule, None, None, _rank_rtol(M.shape, M.dtype))
        D = _msign_wide(X - O, schedule, None, None, _rank_rtol(M.shape, M.dtype))
        C = 0.5 * (X + O + D - (X @ O.mT) @ D)
    else:
        X, t, sched, tol = _ns_setup(M, schedule, dtype)
        X = X / bound
        O = _ns_sign(X, sched, steps, _frobenius_lower(X, 1.0, sched.safety), tol).to(X.dtype)
        if form == "denested":
            C = _ns_clip(X, O, sched, steps, tol)
        else:
            D = _ns_sign(X - O, sched, steps, _frobenius_lower(X, 1.0, sched.safety), tol).to(X.dtype)
            C = 0.5 * (X + O + D - (X @ O.mT) @ D)
    C = torch.where(inside.unsqueeze(-1).unsqueeze(-1), _wide(M)[0].to(C.dtype) / bound, C) * bound
    return _unwide(C, t).to(M.dtype)


def mclamp(
    M: Tensor,
    min: float | None = None,  # noqa: A002 - the names of torch.clamp
    max: float | None = None,  # noqa: A002
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Two-sided clamp of the singular values, ``U clamp(Σ, min, max) Vᵀ``.

    ``mclamp(M, max=c) == mclip(M, c)``; with ``min=a``:
    ``U max(min(Σ, b), a) Vᵀ = C − mclip(C, a) + a·O`` with ``C = mclip(M, b)`` and
    ``O = msign(M)`` (C and O share M's singular vectors; the mclip note's
    calculus). NVIDIA Emerging-Optimizers calls this ``spectral_clip(σ_min, σ_max)``.

    Rank-deficient M: only the singular values above the rank threshold (module
    docstring) are raised to ``min``; the dropped directions stay zero, so the
    result's rank is M's rank. With NS schedules, singular values below the NS
    resolution (about 1e-5·‖M‖_F) are not raised; use the accurate schedule where
    that matters. Schedules and the NS contract as in :func:`mclip`.
    """
    check_tensor(M, "M", min_ndim=2)
    lo = None if min is None else _check_positive_number("min", min)
    hi = None if max is None else _check_positive_number("max", max)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min must be <= max, got min={lo}, max={hi}")
    if lo is None:
        return M.clone() if hi is None else mclip(M, hi, schedule=schedule, steps=steps, dtype=dtype)
    if M.numel() == 0:
        return M.clone()
    if _is_exact(schedule):
        return _spectral_exact(M, lambda s: _clamp_fn(lo / s, None if hi is None else hi / s), svd=schedule == "svd")
    X, t, sched, tol = _ns_setup(M, schedule, dtype)
    X = X / lo
    O = _ns_sign(X, sched, steps, 1e-5, tol).to(X.dtype)
    C = X if hi is None else _ns_clip(X / (hi / lo), O, sched, steps, tol) * (hi / lo)
    out = (C - _ns_clip(C, O, sched, steps, tol) + O) * lo
    return _unwide(out, t).to(M.dtype)


def mstep(
    M: Tensor,
    threshold: float = 1.0,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Step function of the singular values ``U step(Σ − t) Vᵀ`` (σ > t → 1, σ < t → 0, σ = t → ½).

    The mclip note: ``mstep(M) = ½[O + msign(M − O)]``. Accurate schedules: one
    Gram eigendecomposition, ``U diag(step(σ − t)/σ) Uᵀ M`` (exact). NS schedules:
    the de-nested ``½[O + msign(H − I) O]`` on ``M / t``, ``H = sym(M Oᵀ) = U Σ Uᵀ``,
    with the step counts of :func:`mclip`'s contract: within 1e-2 for singular
    values outside [t(1 − 1e-4), t(1 + 1e-4)] (inside that band a step function
    cannot be resolved by any polynomial).
    """
    check_tensor(M, "M", min_ndim=2)
    threshold = _check_positive_number("threshold", threshold)
    if M.numel() == 0:
        return M.clone()
    if _is_exact(schedule):
        return _spectral_exact(M, lambda s: _step_fn(threshold / s, s), svd=schedule == "svd")
    X, t, sched, tol = _ns_setup(M, schedule, dtype)
    X = X / threshold
    O = _ns_sign(X, sched, steps, _frobenius_lower(X, 1.0, sched.safety), tol).to(X.dtype)
    H = X @ O.mT
    E = 0.5 * (H + H.mT) - _eye_like(H)
    S = _ns_sign(E, sched, steps, tol / (_fro(E).clamp_min(1e-300) * sched.safety), tol).to(X.dtype)
    return _unwide(0.5 * (O + S @ O), t).to(M.dtype)


def mpoly(
    M: Tensor,
    coeffs: Sequence[float],
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U f(Σ) Vᵀ`` for the polynomial ``f(x) = Σ_k coeffs[k] xᵏ`` (the mclip note).

    Zero singular values stay zero (the constant term acts on the range of M
    only). Accurate schedules: one Gram eigendecomposition, ``U diag(f(σ)/σ) Uᵀ M``
    over the kept σ (exact). NS schedules: ``U Σ^{2k+1} Vᵀ = M (MᵀM)ᵏ`` and
    ``U Σ^{2k} Vᵀ = O (MᵀM)ᵏ``, so ``U f(Σ) Vᵀ = M · p_odd(MᵀM) + O · p_even(MᵀM)``
    with ``O = msign(M)``; the even part (which needs O) is skipped when every even
    coefficient is zero, and otherwise O is computed to 1e-4 for every singular value
    where ``|p_even(σ²)|`` exceeds 1e-4 of ``max |f|`` (down to 1e-5·‖M‖_F).
    """
    check_tensor(M, "M", min_ndim=2)
    try:
        coeffs = [float(c) for c in coeffs]
    except (TypeError, ValueError):
        raise TypeError(f"coeffs must be a sequence of numbers, got {coeffs!r}") from None
    if not coeffs:
        raise ValueError("coeffs must hold at least one coefficient, e.g. [0, 1] for f(x) = x")
    if not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"coeffs must be finite, got {coeffs}")
    if M.numel() == 0:
        return M.clone()
    if _is_exact(schedule):
        return _spectral_exact(M, lambda s: _poly_fn(coeffs, s), svd=schedule == "svd")
    X, t, sched, tol = _ns_setup(M, schedule, dtype)
    A = X @ X.mT  # U Σ² Uᵀ on the short side

    def horner(cs: list[float]) -> Tensor | None:
        if not any(cs):
            return None
        P = cs[-1] * _eye_like(A)
        for c in reversed(cs[:-1]):
            P = A @ P + c * _eye_like(A)
        return P

    podd = horner(coeffs[1::2])
    peven = horner(coeffs[0::2])
    out = torch.zeros_like(X)
    if podd is not None:
        out = out + podd @ X
    if peven is not None:
        lower = _even_lower(coeffs, float(_fro(X).max()), tol) / sched.safety
        O = _ns_sign(X, sched, steps, lower, tol).to(X.dtype)
        out = out + peven @ O
    return _in_range(_unwide(out, t).to(M.dtype), M)


def _even_lower(coeffs: list[float], fro: float, tol: float) -> float:
    """The smallest normalized σ whose even part ``|p_even(σ²)|`` exceeds ``tol·max|f|`` on [0, ‖M‖_F] (≥ 1e-5)."""
    x = np.geomspace(1e-5, 1.0, 512) * fro
    f = np.polynomial.polynomial.polyval(x, coeffs)
    even = np.polynomial.polynomial.polyval(x, [c if k % 2 == 0 else 0.0 for k, c in enumerate(coeffs)])
    big = np.abs(even) > tol * max(float(np.abs(f).max()), 1e-300)
    return float(x[np.argmax(big)] / fro) if big.any() else 1.0


def msquare(
    M: Tensor,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U Σ² Vᵀ = msign(M) MᵀM`` (the mclip note); ``mpoly(M, [0, 0, 1])``."""
    return mpoly(M, [0.0, 0.0, 1.0], schedule=schedule, steps=steps, dtype=dtype)


# Functions of the singular values of M/s (s = max|M|, shape (…, 1)) for the exact route; the
# result is multiplied back by s, so each f returns f_true(s·σ)/s.
def _clip_fn(c: Tensor) -> _Spectral:
    return _Spectral(lambda S: torch.minimum(S, c), lambda S: (S < c).to(S.dtype), c, 1.0)


def _clamp_fn(lo: Tensor, hi: Tensor | None) -> _Spectral:
    top = (lambda S: S) if hi is None else (lambda S: torch.minimum(S, hi))
    inside = (lambda S: S > lo) if hi is None else (lambda S: (S > lo) & (S < hi))
    return _Spectral(lambda S: torch.maximum(top(S), lo), lambda S: inside(S).to(S.dtype))


def _step_fn(t: Tensor, s: Tensor) -> _Spectral:
    def f(S: Tensor) -> Tensor:
        return torch.where(S > t, 1.0, torch.where(S < t, 0.0, 0.5)).to(S.dtype) / s

    return _Spectral(f, torch.zeros_like, t, 0.0)


def _poly_fn(coeffs: list[float], s: Tensor) -> _Spectral:
    def f(S: Tensor) -> Tensor:
        x = S * s
        out = torch.zeros_like(S)
        for c in reversed(coeffs):
            out = out * x + c
        return out / s

    def df(S: Tensor) -> Tensor:
        x = S * s
        out = torch.zeros_like(S)
        for k in range(len(coeffs) - 1, 0, -1):
            out = out * x + k * coeffs[k]
        return out

    linear = coeffs[0] == 0.0  # f(σ)/σ → c₁ as σ → 0: tiny directions pass through scaled by c₁
    return _Spectral(f, df, math.inf if linear else 0.0, coeffs[1] if linear and len(coeffs) > 1 else 0.0)


def _check_positive_number(name: str, value: Any) -> float:
    return check_number(name, value, low=0.0, low_open=True)


def spectral_norm(
    M: Tensor,
    *,
    iters: int | None = None,
    tol: float | None = None,
    block: int = 4,
    max_iters: int = 1000,
) -> Tensor:
    """Largest singular value ``σ_max(M)`` by block power iteration, shape (...,).

    Subspace iteration ``V ← qr(A V)`` on the short-side Gram ``A = M Mᵀ`` (applied
    as ``M (Mᵀ V)``, never formed) with a Rayleigh–Ritz step on the ``block``
    columns, from a fixed pseudo-random start. A block rather than one vector keeps
    clustered top singular values (where single-vector power iteration stalls) from
    biasing the estimate. With ``iters=None`` it stops when the top Ritz pair's
    residual ``‖A v − θ v‖ ≤ tol·θ`` (default ``tol = 100·eps``), which bounds
    ``|θ − λ|``; at most ``max_iters`` steps, and if it has not converged by then (a
    tightly clustered top) the top eigenvector of the float64 Gram matrix finishes
    the job, so the result is right either way. Otherwise it runs exactly ``iters``
    steps. The magnitude is scaled out first (entries from 1e-30 to 1e30 in any
    dtype). Returned as ``‖Mᵀ v‖`` with v held fixed, so its gradient is ``u vᵀ``,
    the derivative of σ_max.
    """
    check_tensor(M, "M", min_ndim=2)
    if iters is not None:
        check_int("iters", iters)
    check_int("block", block, low=1)
    check_int("max_iters", max_iters, low=1)
    X, _ = _wide(M)  # X is (…, m, n) with m ≤ n: iterate in R^m
    if X.shape[-2] == 0 or X.shape[-1] == 0:
        return M.new_zeros(M.shape[:-2])
    work = _work_dtype(M.dtype)
    tol = 100 * torch.finfo(work).eps if tol is None else check_number("tol", tol, low=0.0, low_open=True)
    m = X.shape[-2]
    b = min(int(block), m)
    # Scale out the magnitude once: norms of float32/bf16 entries near 1e±20 would under/overflow.
    s = _amax(X.detach().to(work))
    s = torch.where(s > 0, s, torch.ones_like(s))
    with torch.no_grad():
        Y = X.detach().to(work) / s
        gen = torch.Generator(device=M.device).manual_seed(0)
        V = torch.randn(*Y.shape[:-2], m, b, generator=gen, dtype=work, device=M.device)
        V = torch.linalg.qr(V).Q
        limit = max_iters if iters is None else iters
        exact = b == m  # Rayleigh–Ritz on the whole space is exact
        converged = exact
        for k in range(limit + 1):
            if exact or k == limit or (iters is None and k % 4 == 0):
                YV = Y.mT @ V
                theta, Z = torch.linalg.eigh(YV.mT @ YV)
                v = V @ Z[..., -1:]
                if exact or k == limit:
                    break
                r = Y @ (Y.mT @ v) - theta[..., -1:, None] * v
                done = torch.linalg.vector_norm(r, dim=(-2, -1)) <= tol * theta[..., -1].clamp_min(0)
                if bool(done.all()):
                    converged = True
                    break
            V = torch.linalg.qr(Y @ (Y.mT @ V)).Q
        if iters is None and not converged:  # a clustered top defeated the iteration: finish exactly
            Y64 = Y.to(torch.float64)
            v = torch.linalg.eigh(Y64 @ Y64.mT)[1][..., -1:].to(work)
    sigma = torch.linalg.vector_norm((X.to(work) / s).mT @ v, dim=(-2, -1)) * s[..., 0, 0]
    return sigma.to(M.dtype)


def inv_sqrt(
    A: Tensor,
    *,
    method: str = "eigh",
    iters: int | None = None,
    eps: float = 0.0,
    tol: float = 1e-6,
) -> Tensor:
    """``A^{-1/2}`` of a symmetric positive definite A (…, n, n) (used for whitening, the isotropy note, kexue.fm/archives/11549).

    - ``method="eigh"``: ``Q Λ^{-1/2} Qᵀ`` in float64, with the Daleckii–Krein
      backward ``L_ij = −1 / (√λ_i √λ_j (√λ_i + √λ_j))``, finite at repeated
      eigenvalues (unlike autograd through ``eigh``).
    - ``method="newton_schulz"``: coupled Newton–Schulz (Higham 2008, §6;
      IterNorm, Huang et al. 2019): ``Y₀ = A/‖A‖_F``, ``Z₀ = I``,
      ``T = ½(3I − Z Y)``, ``Y ← Y T``, ``Z ← T Z``; ``A^{-1/2} ≈ Z / √‖A‖_F``.
      ``iters`` fixes the count (IterNorm uses 5, deliberately unconverged);
      ``None`` iterates until ``‖ZY·… − I‖`` stops changing by ``tol`` (≤ 100 steps).
      Differentiated by unrolling.

    ``eps`` adds ``eps·I`` first. Non-symmetric or non-positive-definite A is a
    ValueError that says so.
    """
    check_tensor(A, "A", min_ndim=2)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square (…, n, n); got shape {tuple(A.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = A.shape[-1]
    scale = A.detach().abs().amax(dim=(-2, -1), keepdim=True)
    asym = (A.detach() - A.detach().mT).abs().amax(dim=(-2, -1), keepdim=True)
    if not no_data(A) and bool((asym > 1e3 * torch.finfo(_work_dtype(A.dtype)).eps
                                * scale.clamp_min(torch.finfo(A.dtype).tiny)).any()):
        raise ValueError("A must be symmetric; symmetrize it first, e.g. 0.5 * (A + A.mT)")
    if eps:
        A = A + eps * torch.eye(n, dtype=A.dtype, device=A.device)
    if method == "eigh":
        A64 = A.to(torch.float64)
        return _InvSqrt.apply(0.5 * (A64 + A64.mT))[0].to(A.dtype)
    if method != "newton_schulz":
        raise ValueError(f"method must be 'eigh' or 'newton_schulz', got {method!r}")
    _check_positive(torch.linalg.eigvalsh(A.detach().to(torch.float64)))
    work = _work_dtype(A.dtype)
    # scale out the magnitude first: ‖A‖_F of float32 entries near 1e±20 under/overflows
    s = A.detach().to(work).abs().amax(dim=(-2, -1), keepdim=True)
    Aw = A.to(work) / s
    c = torch.linalg.vector_norm(Aw, dim=(-2, -1), keepdim=True)
    I = torch.eye(n, dtype=work, device=A.device).expand_as(Aw)
    Y, Z = Aw / c, I
    limit = iters if iters is not None else 100
    for k in range(limit):
        T = 0.5 * (3.0 * I - Z @ Y)
        Y, Z = Y @ T, T @ Z
        if iters is None and k % 4 == 3:
            if bool(((T - I).abs().amax() < tol)):
                break
    return (Z / (c.sqrt() * s.sqrt())).to(A.dtype)
