"""Bench: msign, Polar Express and mclip against torch.linalg.svd and torch.optim.Muon's Newton–Schulz.

The peer's Newton–Schulz is torch's own function (``torch.optim._muon``), the one
torch.optim.Muon calls; steepest is used through its public API only.
"""

from __future__ import annotations

import time

import torch

from ..linalg import SCHEDULES, mclip, msign
from ..report import Context

TITLE = "linalg: msign and mclip vs SVD and torch.optim.Muon's Newton–Schulz (float32)"
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


def _measure(ctx: Context, M: torch.Tensor) -> dict[str, float | str]:
    """Times (median seconds) and errors of the polar factor, five NS steps and clipping for one matrix."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    ref_sign = U @ Vh
    C = M * (2.0 / float(S.max()) * 2)  # σ_max = 4: about half the spectrum is clipped
    ref_clip = (U * (S * (4.0 / float(S.max()))).clamp(max=1.0).unsqueeze(-2)) @ Vh
    m: dict[str, float | str] = {}
    m["svd_polar_s"] = ctx.timeit(lambda: _svd_polar(M))["median"]
    m["msign_accurate_s"] = ctx.timeit(lambda: msign(M))["median"]
    m["err_svd"], m["err_accurate"] = _err(_svd_polar(M), ref_sign), _err(msign(M), ref_sign)

    # bfloat16 matmuls are tens of times slower than float32 on CPUs without bf16 units: one timed call each.
    t0 = time.perf_counter()
    peer = torch_ns(M, SCHEDULES["muon"].coeffs[0], 5, 1e-7)
    m["torch_muon_ns_s"] = time.perf_counter() - t0
    m["polar_express_s"] = ctx.timeit(lambda: msign(M, schedule="polar_express"))["median"]
    m["polar_express_bf16_s"] = ctx.timeit(lambda: msign(M, schedule="polar_express", dtype=torch.bfloat16),
                                           warmup=0, repeat=1)["median"]
    m["torch_ns_range"], m["pe_range"] = _srange(peer), _srange(msign(M, schedule="polar_express"))

    m["mclip_s"] = ctx.timeit(lambda: mclip(C))["median"]
    m["mclip_nested_s"] = ctx.timeit(lambda: mclip(C, form="nested"))["median"]
    m["svd_clip_s"] = ctx.timeit(lambda: _svd_clip(C))["median"]
    m["err_svd_clip"] = _err(_svd_clip(C), ref_clip)
    m["err_mclip"] = _err(mclip(C), ref_clip)
    m["err_mclip_nested"] = _err(mclip(C, form="nested"), ref_clip)
    return m


def _report(ctx: Context, by_shape: dict[str, dict]) -> None:
    rows_sign, rows_ns, rows_clip, results = [], [], [], {}
    for shape, m in by_shape.items():
        t_svd, t_acc, t_peer, t_pe = m["svd_polar_s"], m["msign_accurate_s"], m["torch_muon_ns_s"], m["polar_express_s"]
        t_cacc, t_csvd = m["mclip_s"], m["svd_clip_s"]
        rows_sign.append([shape, t_svd * 1e3, t_acc * 1e3, t_svd / t_acc, m["err_svd"], m["err_accurate"]])
        rows_ns.append([shape, t_peer * 1e3, t_pe * 1e3, t_pe / t_peer, m["polar_express_bf16_s"] / t_peer,
                        m["torch_ns_range"], m["pe_range"]])
        rows_clip.append([shape, t_csvd * 1e3, t_cacc * 1e3, t_cacc / t_acc, t_csvd / t_cacc,
                          m["mclip_nested_s"] / t_cacc, m["err_svd_clip"], m["err_mclip"], m["err_mclip_nested"]])
        results[shape.replace("×", "x")] = {
            "svd_polar_s": t_svd, "msign_accurate_s": t_acc, "speedup_vs_svd": t_svd / t_acc,
            "err_svd": m["err_svd"], "err_accurate": m["err_accurate"], "torch_muon_ns_s": t_peer,
            "polar_express_s": t_pe, "polar_express_bf16_s": m["polar_express_bf16_s"],
            "pe_over_torch_ns": t_pe / t_peer,
            "mclip_s": t_cacc, "mclip_over_msign": t_cacc / t_acc, "mclip_nested_s": m["mclip_nested_s"],
            "svd_clip_s": t_csvd,
        }
    ctx.table(
        ["shape", "SVD polar ms", "accurate msign ms", "speedup (SVD / ours)", "SVD error", "accurate error"],
        rows_sign,
        caption="Accurate msign vs `torch.linalg.svd` polar factor; errors against a float64 SVD. Target: ≥ 2× at 1024×4096.",
    )
    ctx.table(
        ["shape", "torch.optim.Muon NS ms", "Polar Express ms", "ratio (ours / torch)", "ratio, ours in bf16", "torch σ range", "PE σ range"],
        rows_ns,
        caption="Five Newton–Schulz steps: ours (Polar Express, float32 by default) vs torch.optim.Muon's "
        "(Keller Jordan coefficients, bfloat16 as torch computes them). Target: ratio ≤ 1.0.",
    )
    ctx.table(
        ["shape", "SVD clip ms", "mclip ms", "mclip / msign", "SVD clip / mclip", "nested / de-nested", "SVD clip error", "mclip error", "nested error"],
        rows_clip,
        caption="mclip (accurate, de-nested) vs clipping through `torch.linalg.svd` and vs the nested form of the "
        "note (Su, *mclip via msign*, kexue.fm/archives/11006). "
        "Target: mclip ≤ 2.5× the accurate msign.",
    )
    ctx.result("shapes", results)


def run(ctx: Context) -> None:
    quick = [(512, 512), (1024, 1024), (1024, 4096)]
    shapes = ctx.shapes or ctx.pick([(64, 64), (64, 256)], quick, quick)
    gen = torch.Generator().manual_seed(ctx.seed)
    by_shape = {}
    for shape in ctx.track(shapes, "shapes"):
        by_shape[f"{shape[0]}×{shape[1]}"] = _measure(ctx, torch.randn(*shape, generator=gen))
    _report(ctx, by_shape)
