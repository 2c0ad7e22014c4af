"""Bench: msign, Polar Express and mclip against torch.linalg.svd and torch.optim.Muon's Newton–Schulz.

The peer's Newton–Schulz is torch's own function (``torch.optim._muon``), the one
torch.optim.Muon calls; steepest is used through its public API only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..linalg import SCHEDULES, mclip, mpoly, msign, mstep
from ..report import Context

TITLE = "linalg: msign, mclip, mstep, mpoly vs SVD; Newton–Schulz vs torch.optim.Muon's, float32 and bfloat16"
# None: the default thread count, as a user runs the library.
THREADS: int | None = None


def _svd_polar(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def _svd_clip(M: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * S.clamp(max=1.0).unsqueeze(-2)) @ Vh


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _srange(out: torch.Tensor) -> str:
    s = torch.linalg.svdvals(out.double())
    return f"[{float(s.min()):.3f}, {float(s.max()):.3f}]"


SLOW = 20.0  # seconds: a case whose first call takes longer is timed by that call alone


def _timer(ctx: Context) -> Callable[[Callable[[], Any]], float]:
    """Median seconds after ``--warmup`` (the first call counts as warm-up; a first call over SLOW is the time)."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def time_it(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
        if first > SLOW:
            return first
        return ctx.timeit(lambda: (fn(), sync()), warmup=max(0, ctx.warmup - 1))["median"]

    return time_it


def _measure(ctx: Context, M: torch.Tensor) -> dict[str, float | str]:
    """Times (median seconds) and errors of the polar factor, five NS steps and clipping for one matrix."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    from .optim import torch_ns_float32

    t = _timer(ctx)
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    ref_sign = U @ Vh
    C = M * (2.0 / float(S.max()) * 2)  # σ_max = 4: about half the spectrum is clipped
    ref_clip = (U * (S * (4.0 / float(S.max()))).clamp(max=1.0).unsqueeze(-2)) @ Vh
    kj = SCHEDULES["muon"].coeffs[0]
    m: dict[str, float | str] = {}
    m["svd_polar_s"] = t(lambda: _svd_polar(M))
    m["msign_accurate_s"] = t(lambda: msign(M))
    m["err_svd"], m["err_accurate"] = _err(_svd_polar(M), ref_sign), _err(msign(M), ref_sign)

    m["torch_muon_ns_s"] = t(lambda: torch_ns(M, kj, 5, 1e-7))  # torch's default: bfloat16
    m["torch_muon_ns_f32_s"] = t(lambda: torch_ns_float32(M, kj, 5, 1e-7))
    m["polar_express_s"] = t(lambda: msign(M, schedule="polar_express", dtype=torch.float32))
    m["polar_express_bf16_s"] = t(lambda: msign(M, schedule="polar_express", dtype=torch.bfloat16))
    outs = {"torch_ns": torch_ns(M, kj, 5, 1e-7), "pe": msign(M, schedule="polar_express", dtype=torch.float32),
            "pe_bf16": msign(M, schedule="polar_express", dtype=torch.bfloat16)}
    for k, O in outs.items():  # σ range and direction error (distance to the exact polar factor)
        m[f"{k}_range"], m[f"{k}_err"] = _srange(O), _err(O.cpu(), ref_sign.cpu())

    m["mclip_s"] = t(lambda: mclip(C))
    m["mstep_s"] = t(lambda: mstep(C))
    m["mpoly_s"] = t(lambda: mpoly(C, [0.0, 1.0, 0.0, -0.1]))
    m["mclip_nested_s"] = t(lambda: mclip(C, form="nested"))
    m["svd_clip_s"] = t(lambda: _svd_clip(C))
    m["err_svd_clip"] = _err(_svd_clip(C), ref_clip)
    m["err_mclip"] = _err(mclip(C), ref_clip)
    m["err_mclip_nested"] = _err(mclip(C, form="nested"), ref_clip)
    return m


def _report(ctx: Context, by_shape: dict[str, dict]) -> None:
    rows_sign, rows_ns, rows_clip, results = [], [], [], {}
    for shape, m in by_shape.items():
        t_svd, t_acc, t_peer, t_pe = m["svd_polar_s"], m["msign_accurate_s"], m["torch_muon_ns_s"], m["polar_express_s"]
        t_peer32, t_pe16 = m["torch_muon_ns_f32_s"], m["polar_express_bf16_s"]
        t_cacc, t_csvd = m["mclip_s"], m["svd_clip_s"]
        rows_sign.append([shape, t_svd * 1e3, t_acc * 1e3, t_svd / t_acc, m["err_svd"], m["err_accurate"]])
        rows_ns.append([shape, t_peer * 1e3, t_peer32 * 1e3, t_pe * 1e3, t_pe16 * 1e3, t_pe / t_peer32,
                        t_pe16 / t_peer, m["torch_ns_range"], m["pe_range"], m["pe_bf16_range"],
                        m["torch_ns_err"], m["pe_err"], m["pe_bf16_err"]])
        rows_clip.append([shape, t_csvd * 1e3, t_cacc * 1e3, t_cacc / t_acc, m["mstep_s"] / t_acc,
                          m["mpoly_s"] / t_acc, t_csvd / t_cacc, m["mclip_nested_s"] / t_cacc,
                          m["err_svd_clip"], m["err_mclip"], m["err_mclip_nested"]])
        results[shape.replace("×", "x")] = {**{k: v for k, v in m.items()}, "speedup_vs_svd": t_svd / t_acc,
                                            "pe_f32_over_torch_f32": t_pe / t_peer32,
                                            "pe_bf16_over_torch_bf16": t_pe16 / t_peer,
                                            "pe_over_torch_ns": t_pe / t_peer, "mclip_over_msign": t_cacc / t_acc,
                                            "mstep_over_msign": m["mstep_s"] / t_acc,
                                            "mpoly_over_msign": m["mpoly_s"] / t_acc}
    ctx.table(
        ["shape", "SVD polar ms", "accurate msign ms", "speedup (SVD / ours)", "SVD error", "accurate error"],
        rows_sign,
        caption="Accurate msign vs `torch.linalg.svd` polar factor; errors against a float64 SVD. Targets: ≥ 1.5× "
                "at 512² and 1024², ≥ 3× at 1024×4096.",
    )
    ctx.table(
        ["shape", "torch NS bf16 ms", "torch NS f32 ms", "PE f32 ms", "PE bf16 ms", "PE f32 / torch f32",
         "PE bf16 / torch bf16", "torch σ range", "PE f32 σ range", "PE bf16 σ range", "torch error",
         "PE f32 error", "PE bf16 error"],
        rows_ns,
        caption="Five Newton–Schulz steps: ours (Polar Express, Gram-based start, Gram-space iteration for wide "
                "float32 matrices) vs torch.optim.Muon's own function (Keller Jordan coefficients; bfloat16 as torch "
                "runs it, and the same in float32), each in both precisions after a warm-up; errors: relative distance to the "
                "float64 SVD polar factor.",
    )
    ctx.table(
        ["shape", "SVD clip ms", "mclip ms", "mclip / msign", "mstep / msign", "mpoly / msign", "SVD clip / mclip",
         "nested / de-nested", "SVD clip error", "mclip error", "nested error"],
        rows_clip,
        caption="mclip, mstep and mpoly (accurate: one Gram eigendecomposition each) against the accurate msign and "
        "clipping through `torch.linalg.svd`, and the nested form of the note (Su, *mclip via msign*, "
        "kexue.fm/archives/11006) with exact inner msigns. Target: ≤ 1.15× the accurate msign.",
    )
    ctx.result("shapes", results)


def _start(X: torch.Tensor, kind: str, safety: float) -> torch.Tensor:
    """The Newton–Schulz starting point of a wide X under one of the compared scalings."""
    A = X @ X.mT
    if kind == "Frobenius":  # X/‖X‖_F, Keller Jordan's and torch's: ‖X‖_F is up to √m·σ_max
        return X / (torch.linalg.matrix_norm(X) * safety)
    if kind == "power iteration":  # σ_max estimated by 8 steps on XXᵀ: an estimate from below
        v = torch.ones(A.shape[-1], dtype=A.dtype, device=A.device)
        for _ in range(8):
            v = A @ v
            v = v / v.norm()
        return X / (float(v @ (A @ v)) ** 0.5 * safety)
    if kind == "AOL":  # Turbo-Muon's rows D = diag(Σ_j |XXᵀ|_ij)^(-1/2): ‖DX‖₂ ≤ 1, but msign(DX) ≠ msign(X)
        return A.abs().sum(-1).rsqrt().unsqueeze(-1) * X / safety
    A2 = A @ A  # "Gram bound", steepest's: (Σσ¹⁶)^(1/16) = ‖(XXᵀ)⁴‖_F^(1/8) ≥ σ_max, within ~7 %
    return X / (float(torch.linalg.matrix_norm(A2 @ A2)) ** 0.125 * safety)


STARTS = ("Frobenius", "power iteration", "AOL", "Gram bound")


def _starts(ctx: Context, shapes: list[tuple[int, int]], gen: torch.Generator) -> None:
    """σ range and distance to msign after five Polar Express steps (float32) from each start, on a spectrum
    log-spaced over [1e-3, 1]·σ_max with random singular vectors — the spread that exposes the start."""
    sched = SCHEDULES["polar_express"]
    rows, results = [], {}
    for m, n in shapes:
        m, n = min(m, n), max(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
        M = (U * torch.logspace(-3, 0, m, dtype=torch.float64)) @ V.mT
        X = M.float().to(ctx.device)
        for kind in STARTS:
            Y = _start(X, kind, sched.safety)
            for a, b, c in sched.rows(5):
                A = Y @ Y.mT
                Y = a * Y + (b * A + c * A @ A) @ Y
            err = _err(Y.cpu(), U @ V.mT)
            rows.append([f"{m}×{n}", kind, _srange(Y), err])
            results.setdefault(f"{m}x{n}", {})[kind] = {"range": _srange(Y), "err": err}
    ctx.table(["shape", "start", "σ range after 5 steps", "distance to msign(M)"], rows,
              caption="Where five Polar Express steps (float32) leave a spectrum spread over 1e-3…1 of σ_max, by "
              "starting scale (target: σ ∈ [0.75, 1.25]). Power iteration underestimates σ_max, so σ can start above "
              "the schedule's interval; AOL (Boissin et al. 2025, *Turbo-Muon: Accelerating Orthogonality-Based "
              "Optimization with Pre-Conditioning*) rescales rows, which changes the polar factor itself.")
    ctx.result("starts", results)


def run(ctx: Context) -> None:
    quick = [(512, 512), (1024, 1024), (1024, 4096)]
    shapes = ctx.shapes or ctx.pick([(64, 64), (64, 256)], quick, quick)
    gen = torch.Generator().manual_seed(ctx.seed)
    by_shape = {}
    for shape in ctx.track(shapes, "shapes"):
        by_shape[f"{shape[0]}×{shape[1]}"] = _measure(ctx, torch.randn(*shape, generator=gen).to(ctx.device))
    _report(ctx, by_shape)
    _starts(ctx, ctx.pick([(64, 256)], [(256, 512), (1024, 4096)], [(256, 512), (1024, 4096)]), gen)
