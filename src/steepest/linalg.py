"""Matrix functions of singular values: ``msign`` and what is built on it.

Source: Su, *Computing singular value clipping mclip via msign*, kexue.fm/archives/11006
(the mclip note), and the Newton–Schulz literature cited per function. Notation: ``M = U Σ Vᵀ``
(thin SVD, rank r). Every function here is batched over leading dimensions,
returns the input's dtype and shape, and lets gradients flow.

Rank convention (the one of ``numpy.linalg.pinv`` / ``matrix_rank``): singular
values ``σ ≤ max(m, n) · eps · σ_max`` count as zero, with ``eps`` the machine
epsilon of the input (float32's for bfloat16/float16 inputs, whose values are
taken as exact). So ``msign`` of a rank-r matrix is ``U[:, :r] V[:, :r]ᵀ`` and
``msign(0) = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor
from ._validate import check_tensor

__all__ = [
    "EXACT",
    "NSConfig",
    "Schedule",
    "SCHEDULES",
    "resolve_schedule",
    "msign",
    "mclip",
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
    Newton–Schulz (``None``: the input's, float32 for half inputs); ``eps``: a
    matrix with ``‖X‖_F ≤ eps`` counts as zero where a caller asks for that
    (Muon). Hashable, so equal settings share one batched computation.
    """

    schedule: Schedule | str = "accurate"
    steps: int | None = None
    dtype: torch.dtype | None = None
    eps: float = 0.0

    def msign(self, M: Tensor) -> Tensor:
        """``msign(M)`` with these settings (no finiteness check: callers decide)."""
        return msign(M, schedule=self.schedule, steps=self.steps, dtype=self.dtype, check_finite=False)


def resolve_schedule(
    schedule: ScheduleLike | NSConfig = "accurate",
    *,
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    eps: float = 0.0,
) -> NSConfig:
    """Check an orthogonalization setting once and return it as an :class:`NSConfig`.

    ``schedule``: ``"accurate"``, ``"svd"``, a name in :data:`SCHEDULES`, a
    :class:`Schedule` or a sequence of ``(a, b, c)`` rows; ``steps``: an int in
    [1, 100) or None; ``dtype``: None or a floating dtype for Newton–Schulz;
    ``eps`` ≥ 0. An :class:`NSConfig` passes through unchanged. Every mistake is a
    ValueError/TypeError naming the argument.
    """
    if isinstance(schedule, NSConfig):
        return schedule
    if not (isinstance(schedule, str) and schedule in EXACT):
        schedule = _resolve_schedule(schedule)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100):
        raise ValueError(f"steps must be an int in [1, 100) or None, got {steps!r}")
    if dtype is not None and dtype not in _NS_DTYPES:
        raise TypeError(f"dtype must be None or one of {_NS_DTYPES}, got {dtype!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return NSConfig(schedule, steps, dtype, float(eps))


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
# Exact polar factor by a Gram eigendecomposition (float64), with exact backward
# ---------------------------------------------------------------------------
def _polar_parts(X: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """For wide X (…, m, n), m ≤ n, float64: U, σ and the kept-mask of X Xᵀ = U Σ² Uᵀ."""
    if X.dtype == torch.float64 and rtol < 1e-10:
        # Float64 inputs ask for a rank threshold the Gram matrix cannot resolve.
        U, S, _ = torch.linalg.svd(X, full_matrices=False)
    else:
        lam, U = torch.linalg.eigh(X @ X.mT)
        S = lam.clamp_min(0).sqrt()
    smax = S.amax(dim=-1, keepdim=True)
    keep = S > rtol * smax
    return U, S, keep


class _Polar(torch.autograd.Function):
    """msign of a wide float64 X with the exact (pinv-convention) derivative.

    Forward ``O = U Σ⁻¹ Uᵀ X`` over kept σ. Backward, with ``V = Xᵀ U Σ⁻¹``,
    ``W = UᵀG``, ``Y = W V``, ``Z = (Y − Yᵀ) / (σ_i + σ_j)``:
    ``∇X = U Σ⁻¹ W + [U (Z − Σ⁻¹ Y) + (I − U_r U_rᵀ) G V Σ⁻¹] Vᵀ``
    (the skew part of the polar derivative plus the two subspace rotations).
    """

    @staticmethod
    def forward(ctx, X: Tensor, rtol: float) -> Tensor:  # type: ignore[override]
        U, S, keep = _polar_parts(X, rtol)
        inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
        O = ((U * inv.unsqueeze(-2)) @ U.mT) @ X  # m³ + m²n, cheaper than 2m²n for wide X
        ctx.save_for_backward(X, U, S, inv, keep)
        return O

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G: Tensor):  # type: ignore[override]
        X, U, S, inv, keep = ctx.saved_tensors
        G = G.to(X.dtype)
        V = X.mT @ (U * inv.unsqueeze(-2))  # (n, m), zero columns where dropped
        W = U.mT @ G
        GV = G @ V
        Y = U.mT @ GV
        both = keep.unsqueeze(-1) & keep.unsqueeze(-2)
        denom = S.unsqueeze(-1) + S.unsqueeze(-2)
        Z = torch.where(both, (Y - Y.mT) / torch.where(both, denom, torch.ones_like(denom)), torch.zeros_like(Y))
        kf = keep.to(X.dtype)
        proj = GV - U @ (kf.unsqueeze(-1) * Y)  # (I − U_r U_rᵀ) G V
        inner = U @ (Z - inv.unsqueeze(-1) * Y) + proj * inv.unsqueeze(-2)
        grad = U @ (inv.unsqueeze(-1) * W) + inner @ V.mT
        return grad, None


def _msign_exact(X: Tensor, rtol: float) -> Tensor:
    """Exact msign of a wide X (any float dtype), computed and returned in float64."""
    X64 = X.to(torch.float64)
    # Scale out the magnitude so float32 inputs near 1e±30 cannot overflow the Gram matrix.
    s = _amax(X64).detach()
    X64 = X64 / torch.where(s > 0, s, torch.ones_like(s))
    return _Polar.apply(X64, rtol)


# ---------------------------------------------------------------------------
# Symmetric matrix functions by eigh, with the Daleckii–Krein backward
# ---------------------------------------------------------------------------
def _check_positive(lam: Tensor) -> None:
    if bool((lam[..., 0] <= 0).any()):
        raise ValueError(
            f"A is not positive definite (smallest eigenvalue {float(lam[..., 0].min()):.3g}); "
            "pass eps > 0 to add eps·I, or check the input"
        )


class _SymFunc(torch.autograd.Function):
    """f(A) = Q f(Λ) Qᵀ for symmetric A, float64.

    Backward (Daleckii–Krein): ``∇A = Q [(Qᵀ sym(G) Q) ∘ L] Qᵀ`` with
    ``L_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j)`` (``f'`` on the diagonal), given in
    closed form so repeated eigenvalues (A ≈ I) cannot produce inf/NaN.
    """

    @staticmethod
    def forward(ctx, A: Tensor, kind: str) -> Tensor:  # type: ignore[override]
        lam, Q = torch.linalg.eigh(A)
        if kind == "inv_sqrt":
            _check_positive(lam)
            r = lam.sqrt()
            fl = 1.0 / r
            L = -1.0 / (r.unsqueeze(-1) * r.unsqueeze(-2) * (r.unsqueeze(-1) + r.unsqueeze(-2)))
        elif kind == "sign":
            tol = lam.shape[-1] * torch.finfo(lam.dtype).eps * lam.abs().amax(dim=-1, keepdim=True)
            fl = torch.where(lam.abs() > tol, lam.sign(), torch.zeros_like(lam))
            df = fl.unsqueeze(-1) - fl.unsqueeze(-2)
            dl = lam.unsqueeze(-1) - lam.unsqueeze(-2)
            L = torch.where(df != 0, df / torch.where(df != 0, dl, torch.ones_like(dl)), torch.zeros_like(dl))
        else:  # pragma: no cover - internal
            raise AssertionError(kind)
        ctx.save_for_backward(Q, L)
        return (Q * fl.unsqueeze(-2)) @ Q.mT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G: Tensor):  # type: ignore[override]
        Q, L = ctx.saved_tensors
        G = G.to(Q.dtype)
        Gs = 0.5 * (G + G.mT)
        return Q @ ((Q.mT @ Gs @ Q) * L) @ Q.mT, None


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
    if X.device.type == "cpu" and X.dtype != torch.float64:
        n = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
        if bool((torch.isfinite(n) & (n >= 1e-10)).all()):
            return n
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float64)


def _newton_schulz(X: Tensor, sched: Schedule, steps: int | None) -> Tensor:
    """NS on a wide X (…, m, n), m ≤ n, in X's dtype."""
    shape = X.shape
    X = X.reshape(-1, shape[-2], shape[-1]) if X.ndim != 2 else X
    norm = _frobenius(X) * sched.safety
    X = X / torch.where(norm > 0, norm, torch.ones_like(norm)).to(X.dtype)
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in sched.rows(steps):
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a, alpha=1.0)
    return X.reshape(shape)


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
    if isinstance(schedule, str) and schedule == "accurate":
        return _msign_exact(X, rtol)
    if isinstance(schedule, str) and schedule == "svd":
        X64 = X.to(torch.float64)
        U, S, Vh = torch.linalg.svd(X64, full_matrices=False)
        keep = (S > rtol * S.amax(dim=-1, keepdim=True)).to(X64.dtype)
        return (U * keep.unsqueeze(-2)) @ Vh
    sched = _resolve_schedule(schedule)
    work = dtype if dtype is not None else _work_dtype(X.dtype)
    return _newton_schulz(X.to(work), sched, steps)


def msign(
    M: Tensor,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
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
      ``dtype`` (default: M's dtype, float32 for half inputs). ``steps`` truncates or
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
    return isinstance(schedule, str) and schedule in ("accurate", "svd")


def _sym_sign(H: Tensor, schedule, steps, dtype) -> Tensor:
    """msign of a symmetric matrix: eigh for exact schedules, NS otherwise."""
    if _is_exact(schedule):
        return _SymFunc.apply(H.to(torch.float64), "sign")
    return _msign_wide(H, schedule, steps, dtype, _rank_rtol(H.shape, H.dtype))


def _eye_like(H: Tensor) -> Tensor:
    return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)


def _work(M: Tensor, schedule, dtype: torch.dtype | None) -> torch.dtype:
    # Exact schedules combine terms in float64 so that σ ≫ 1 cannot cancel catastrophically.
    if _is_exact(schedule):
        return torch.float64
    return dtype if dtype is not None else _work_dtype(M.dtype)


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

    With ``O = msign(M)`` (on the tall orientation, ``H = sym(OᵀM) = V Σ Vᵀ``):

    - ``form="denested"`` (default; Su, kexue.fm/archives/11059, and leloykun's
      spectral clipping): ``2 mclip(M) = M + O + (O − M) msign(H − I)``. One msign
      of M and one of the small symmetric ``H − I`` (an eigendecomposition in the
      exact schedules), so errors of the inner msign are not amplified.
    - ``form="nested"`` (the mclip note's): ``2 mclip(M) = M + O + (I − M Oᵀ) msign(M − O)``,
      evaluated as ``X − M (Oᵀ X)`` with ``X = msign(M − O)``; it loses accuracy on
      rank-deficient and wide-spectrum inputs (``steepest reproduce --only mclip``).

    Free exit: matrices with ``‖M‖_F ≤ c`` are returned unchanged. With the exact
    schedules the terms are combined in float64 (σ ≫ c would otherwise cancel
    catastrophically). ``bound`` must be positive and finite.
    """
    check_tensor(M, "M", min_ndim=2)
    bound = float(bound)
    if not (bound > 0 and bound < float("inf")):
        raise ValueError(f"bound must be a positive finite number, got {bound}")
    if form not in ("denested", "nested"):
        raise ValueError(f"form must be 'denested' or 'nested', got {form!r}")
    if M.numel() == 0:
        return M.clone()
    rtol = _rank_rtol(M.shape, M.dtype)
    X, t = _wide(M)  # wide orientation: X = U Σ Vᵀ with U square (m×m)
    X = X.to(_work(M, schedule, dtype)) / bound
    inside = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) <= 1
    if bool(inside.all()):
        return M.clone()
    O = _msign_wide(X, schedule, steps, dtype, rtol).to(X.dtype)
    if form == "denested":
        H = X @ O.mT
        H = 0.5 * (H + H.mT)  # = U Σ Uᵀ (m×m)
        S = _sym_sign(H - _eye_like(H), schedule, steps, dtype).to(X.dtype)
        C = 0.5 * (X + O + S @ (O - X))
    else:
        D = _msign_wide(X - O, schedule, steps, dtype, rtol).to(X.dtype)
        C = 0.5 * (X + O + D - (X @ O.mT) @ D)
    C = torch.where(inside, X, C) * bound
    return _unwide(C, t).to(M.dtype)


def mstep(
    M: Tensor,
    threshold: float = 1.0,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Step function of the singular values ``U step(Σ − t) Vᵀ`` (σ > t → 1, σ < t → 0).

    The mclip note: ``mstep(M) = ½[O + msign(M − O)]``; evaluated in the de-nested form
    ``½[O + msign(H − I) O]`` on the wide orientation, ``H = sym(M Oᵀ) = U Σ Uᵀ``,
    applied to ``M / t``. σ exactly at t maps to ½.
    """
    check_tensor(M, "M", min_ndim=2)
    threshold = float(threshold)
    if not (threshold > 0 and threshold < float("inf")):
        raise ValueError(f"threshold must be a positive finite number, got {threshold}")
    if M.numel() == 0:
        return M.clone()
    X, t = _wide(M)
    X = X.to(_work(M, schedule, dtype)) / threshold
    O = _msign_wide(X, schedule, steps, dtype, _rank_rtol(M.shape, M.dtype)).to(X.dtype)
    H = X @ O.mT
    H = 0.5 * (H + H.mT)
    S = _sym_sign(H - _eye_like(H), schedule, steps, dtype).to(X.dtype)
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

    ``U Σ^{2k+1} Vᵀ = M (MᵀM)ᵏ`` and ``U Σ^{2k} Vᵀ = O (MᵀM)ᵏ``, so
    ``U f(Σ) Vᵀ = M · p_odd(MᵀM) + O · p_even(MᵀM)`` with ``O = msign(M)``; the
    even part (which needs O) is skipped when every even coefficient is zero. Zero
    singular values stay zero (the constant term acts on the range of M only).
    """
    check_tensor(M, "M", min_ndim=2)
    coeffs = [float(c) for c in coeffs]
    if not coeffs:
        raise ValueError("coeffs must hold at least one coefficient, e.g. [0, 1] for f(x) = x")
    if M.numel() == 0:
        return M.clone()
    X, t = _wide(M)
    X = X.to(_work(M, schedule, dtype))
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
        O = _msign_wide(X, schedule, steps, dtype, _rank_rtol(M.shape, M.dtype)).to(X.dtype)
        out = out + peven @ O
    return _unwide(out, t).to(M.dtype)


def msquare(
    M: Tensor,
    *,
    schedule: str | Schedule | Sequence[Sequence[float]] = "accurate",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U Σ² Vᵀ = msign(M) MᵀM`` (the mclip note); ``mpoly(M, [0, 0, 1])``."""
    return mpoly(M, [0.0, 0.0, 1.0], schedule=schedule, steps=steps, dtype=dtype)


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
    ``|θ − λ|``; at most ``max_iters`` steps. Otherwise it runs exactly ``iters``
    steps. Returned as ``‖Mᵀ v‖`` with v held fixed, so its gradient is ``u vᵀ``,
    the derivative of σ_max.
    """
    check_tensor(M, "M", min_ndim=2)
    if iters is not None and iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    X, _ = _wide(M)  # X is (…, m, n) with m ≤ n: iterate in R^m
    work = _work_dtype(M.dtype)
    tol = 100 * torch.finfo(work).eps if tol is None else float(tol)
    m = X.shape[-2]
    b = max(1, min(int(block), m))
    with torch.no_grad():
        s = _amax(X.detach().to(work))
        Y = X.detach().to(work) / torch.where(s > 0, s, torch.ones_like(s))
        gen = torch.Generator(device=M.device).manual_seed(0)
        V = torch.randn(*Y.shape[:-2], m, b, generator=gen, dtype=work, device=M.device)
        V = torch.linalg.qr(V).Q
        limit = max_iters if iters is None else iters
        exact = b == m  # Rayleigh–Ritz on the whole space is exact
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
                    break
            V = torch.linalg.qr(Y @ (Y.mT @ V)).Q
    sigma = torch.linalg.vector_norm(X.to(work).mT @ v, dim=(-2, -1))
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
    if bool((asym > 1e3 * torch.finfo(_work_dtype(A.dtype)).eps * scale.clamp_min(torch.finfo(A.dtype).tiny)).any()):
        raise ValueError("A must be symmetric; symmetrize it first, e.g. 0.5 * (A + A.mT)")
    if eps:
        A = A + eps * torch.eye(n, dtype=A.dtype, device=A.device)
    if method == "eigh":
        A64 = A.to(torch.float64)
        return _SymFunc.apply(0.5 * (A64 + A64.mT), "inv_sqrt").to(A.dtype)
    if method != "newton_schulz":
        raise ValueError(f"method must be 'eigh' or 'newton_schulz', got {method!r}")
    _check_positive(torch.linalg.eigvalsh(A.detach().to(torch.float64)))
    work = _work_dtype(A.dtype)
    Aw = A.to(work)
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
    return (Z / c.sqrt()).to(A.dtype)
