"""Singular value clipping through msign, nested vs de-nested, against float64 SVD.

The notes: Su, *Computing singular value clipping mclip via msign (part 1)*,
kexue.fm/archives/11006 (the nested formula) and *mclip via msign (part 2)*,
kexue.fm/archives/11059 (the de-nested one). Measuring (``_errors``, ``_costs``,
``_function_errors``) returns plain data; ``_report_*`` / ``_plot_errors`` write it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..linalg import mclip, mpoly, msign, msquare, mstep
from ..report import Context
from . import claim

TOL = 1e-4  # the library's accuracy contract for the exact (schedule="accurate") mclip
TOL_TEXT = "1e-4"
FLOOR = 1e-16  # errors below this (exact zeros) are drawn at it on the log axis

TITLE = "mclip via msign"
# None: the library's default thread count (the cost table times it as a user would run it).
THREADS: int | None = None

#: the spectra as the verdict and the plot name them
SPECTRA_SHORT = {"gaussian": "Gaussian", "rank-deficient": "rank-deficient", "wide": "σ ∈ [1e-3, 1e3]",
                 "clustered": "clustered σ", "below": "all σ below 1"}
SPECTRA = {
    "gaussian": "Gaussian entries ×0.1/√n·3 (σ about 0–6)",
    "rank-deficient": "rank n/4, σ ∈ [0.2, 3]",
    "wide": "σ log-spaced over [1e-3, 1e3]",
    "clustered": "σ = 1 ± 10^U(−7, −2)",
    "below": "all σ = 0.9 (‖M‖_F above the bound)",
}


def _matrix(kind: str, m: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    k = min(m, n)
    if kind == "gaussian":
        return torch.from_numpy(rng.standard_normal((m, n)) * 3.0 / np.sqrt(n)).float()
    if kind == "rank-deficient":
        r = max(1, k // 4)
        s = np.concatenate([np.linspace(3.0, 0.2, r), np.zeros(k - r)])
    elif kind == "wide":
        s = np.logspace(3, -3, k)
    elif kind == "clustered":
        s = 1.0 + rng.choice([-1.0, 1.0], k) * 10.0 ** rng.uniform(-7, -2, k)
    else:
        s = np.full(k, 0.9)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy((U * s) @ V.T).float()


def _svd_fn(M: torch.Tensor, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    U, S, Vh = np.linalg.svd(M.double().numpy(), full_matrices=False)
    return (U * f(S)) @ Vh


def _err(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.double().numpy() - ref) / np.linalg.norm(ref))


def _top(out: torch.Tensor) -> float:
    return float(np.linalg.svd(out.double().numpy(), compute_uv=False).max())


def _errors(mats: dict[str, torch.Tensor], steps_grid: list[int], kinds: Any) -> dict[str, dict[str, Any]]:
    """Per spectrum and form: relative error of mclip (exact msign; Polar Express NS per step count; bf16)."""
    results = {}
    for kind in kinds:
        M = mats[kind]
        ref = _svd_fn(M, lambda s: np.minimum(s, 1.0))
        for form in ("denested", "nested"):
            exact = mclip(M, schedule="accurate", form=form)
            errs = [_err(mclip(M, schedule="polar_express", steps=s, form=form), ref) for s in steps_grid]
            bf16 = mclip(M, schedule="polar_express", steps=max(steps_grid), form=form, dtype=torch.bfloat16)
            results[f"{kind}/{form}"] = {
                "accurate": _err(exact, ref),
                "accurate_top_sigma": _top(exact),
                "ns_steps": dict(zip(steps_grid, errs)),
                "ns_bf16": _err(bf16, ref),
            }
    return results


def _report_errors(ctx: Context, results: dict[str, dict[str, Any]], steps_grid: list[int]) -> None:
    rows = []
    for key, r in results.items():
        kind, form = key.split("/")
        rows.append([kind, form, r["accurate"], r["accurate_top_sigma"], *r["ns_steps"].values(), r["ns_bf16"]])
    ctx.table(
        ["spectrum", "form", "exact msign", "σ_max(result)", *[f"PE {s} steps" for s in steps_grid],
         f"PE {max(steps_grid)} steps, bf16"],
        rows,
        caption="Relative error of mclip against float64 SVD (bound 1). 'exact msign': `schedule=\"accurate\"`; "
                "PE k steps: Polar Express Newton–Schulz with k steps in float32 (last column: in bfloat16); "
                "σ_max(result): largest singular value of the exact-msign result.",
        floatfmt=".2e",
    )
    ctx.result("errors", results)
    worst = max(max(r[2] for r in rows if r[1] == "denested"), 0.0)
    worst_top = max(r[3] for r in rows if r[1] == "denested")
    ctx.result("accurate_denested_worst_error", worst)
    ctx.result("accurate_denested_worst_top_sigma", worst_top)
    ctx.text(
        f"Default (exact msign, de-nested): worst error {worst:.2e} over the five spectra (contract ≤ {TOL_TEXT}), "
        f"largest singular value of a result {worst_top:.6f} (contract ≤ 1 + {TOL_TEXT}).\n\n"
        + "\n".join(route_lines(results, steps_grid))
    )
    ctx.result("routes", route_summary(results, steps_grid))


FORMS = {"denested": "de-nested (part 2)", "nested": "nested (part 1, the note's formula)"}


def route_summary(results: dict[str, dict[str, Any]], steps_grid: list[int], tol: float = TOL
                  ) -> dict[str, dict[str, Any]]:
    """Per form, every route: the exact msign's worst error, the fewest Newton–Schulz steps (float32) that
    bring each spectrum within ``tol`` (None: none of the grid does) with the error at the most steps, and
    bfloat16's worst error."""
    out: dict[str, dict[str, Any]] = {}
    for form in FORMS:
        rows = {k.split("/")[0]: r for k, r in results.items() if k.endswith("/" + form)}
        first = {}
        for kind, r in rows.items():
            ok = [s for s in steps_grid if math.isfinite(r["ns_steps"][s]) and r["ns_steps"][s] <= tol]
            first[kind] = {"steps": ok[0] if ok else None, "error_at_most_steps": r["ns_steps"][max(steps_grid)]}
        out[form] = {"exact_worst": max(r["accurate"] for r in rows.values()),
                     "exact_within": sorted(k for k, r in rows.items() if r["accurate"] <= tol),
                     "ns_float32": first,
                     "bf16_worst": max(r["ns_bf16"] for r in rows.values()),
                     "bf16_best": min(r["ns_bf16"] for r in rows.values())}
    return out


def route_lines(results: dict[str, dict[str, Any]], steps_grid: list[int]) -> list[str]:
    """One sentence per form covering the three routes, generated from the errors."""
    lines = []
    for form, s in route_summary(results, steps_grid).items():
        n = len(s["ns_float32"])
        ns = []
        for kind, f in s["ns_float32"].items():
            name = SPECTRA_SHORT[kind]
            ns.append(f"{name} from {f['steps']} steps" if f["steps"] is not None else
                      f"{name} never up to {max(steps_grid)} steps ({f['error_at_most_steps']:.1e} there)")
        lines.append(
            f"- **{FORMS[form]}** — exact msign: worst error {s['exact_worst']:.1e}, {len(s['exact_within'])}/{n} "
            f"spectra within {TOL_TEXT}; Polar Express Newton–Schulz in float32 (the practical route): within "
            f"{TOL_TEXT} for " + "; ".join(ns) + f"; the same in bfloat16 ({max(steps_grid)} steps): errors "
            f"{s['bf16_best']:.1e}–{s['bf16_worst']:.1e} (bfloat16 resolves only 2⁻⁸ ≈ 4e-3, so {TOL_TEXT} is "
            "out of its reach).")
    return lines


def verdict(errors: dict[str, float], tol: float = TOL) -> tuple[str, dict[str, list[str]]]:
    """The verdict on "mclip via msign equals the SVD result" from the exact-msign errors per ``spectrum/form``.

    held: every spectrum within ``tol`` in both forms; partly held: some (spectrum, form) within it;
    not held: none. Also returns, per form, the spectra where it failed.
    """
    forms: dict[str, list[str]] = {}
    for key, err in errors.items():
        kind, form = key.split("/")
        forms.setdefault(form, [])
        if not (math.isfinite(err) and err <= tol):
            forms[form].append(kind)
    failed = sum(len(v) for v in forms.values())
    if failed == 0:
        return "held", forms
    return ("not held" if failed == len(errors) else "partly held"), forms


def _claim(ctx: Context, results: dict[str, dict[str, Any]]) -> None:
    errors = {key: r["accurate"] for key, r in results.items()}
    v, failed = verdict(errors)
    parts = []
    for form, name in (("nested", "part 1's nested formula"), ("denested", "part 2's de-nested one")):
        worst = max(e for k, e in errors.items() if k.endswith("/" + form))
        n = sum(1 for k in errors if k.endswith("/" + form))
        miss = f", misses on {', '.join(SPECTRA_SHORT[k] for k in failed[form])}" if failed[form] else ""
        parts.append(f"{name} {worst:.1e} ({n - len(failed[form])}/{n} spectra ≤ {TOL_TEXT}{miss})")
    claim(ctx, "mclip", f"mclip(M) = U min(Σ, 1) Vᵀ computed from msign alone equals the SVD result within {TOL_TEXT}",
          v, "worst error with the exact msign: " + "; ".join(parts) + _ns_phrase(results), split="none",
          seeds=[ctx.seed])


def _ns_phrase(results: dict[str, dict[str, Any]]) -> str:
    """The Newton–Schulz route in a few words, for the claim's key figure (the verdict rests on the exact msign)."""
    steps_grid = sorted(next(iter(results.values()))["ns_steps"])
    parts = []
    for form, s in route_summary(results, steps_grid).items():
        missed = [SPECTRA_SHORT[k] for k, f in s["ns_float32"].items() if f["steps"] is None]
        parts.append(f"{form} " + (f"misses on {', '.join(missed)}" if missed else "reaches it on every spectrum"))
    return f"; with Newton–Schulz (Polar Express, float32, up to {max(steps_grid)} steps) instead: " + ", ".join(parts)


def _plot_errors(ctx: Context, results: dict[str, dict[str, Any]], steps_grid: list[int]) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    x_bf16, x_exact = max(steps_grid) + 4, max(steps_grid) + 8  # two extra slots right of the step axis
    fig, axes = plt.subplots(1, len(SPECTRA), figsize=(3.3 * len(SPECTRA), 3.6), sharey=True)
    styles = {"denested": dict(color="C0", marker="o", ms=6, ls="-", dx=-0.6, mfc="C0"),
              "nested": dict(color="C1", marker="s", ms=8, ls="--", dx=0.6, mfc="none")}
    for ax, kind in zip(axes, SPECTRA):
        for form, st in styles.items():
            r = results[f"{kind}/{form}"]
            kw = dict(color=st["color"], marker=st["marker"], ms=st["ms"], mfc=st["mfc"], mew=1.5)
            ax.semilogy(steps_grid, np.maximum(list(r["ns_steps"].values()), FLOOR), ls=st["ls"], **kw)
            ax.semilogy([x_bf16 + st["dx"]], [max(r["ns_bf16"], FLOOR)], ls="none", **kw)
            ax.semilogy([x_exact + st["dx"]], [max(r["accurate"], FLOOR)], ls="none", **kw)
        ax.axhline(TOL, color="k", lw=0.8)
        ax.axvline((max(steps_grid) + x_bf16) / 2, color="0.7", lw=0.6)
        ax.set_title(SPECTRA_SHORT[kind], fontsize=10)
        ax.set_xticks([*steps_grid, x_bf16, x_exact], [*map(str, steps_grid), "bf16", "exact"], fontsize=8)
        ax.set_xlabel("Newton–Schulz steps")
        ax.set_ylim(FLOOR / 3, 1e3)
        ax.grid(alpha=0.25, axis="y")
    axes[0].set_ylabel("relative error vs float64 SVD")
    handles = [Line2D([], [], color="C0", marker="o", ls="-", label="de-nested (part 2)"),
               Line2D([], [], color="C1", marker="s", mfc="none", ls="--", label="nested (part 1)"),
               Line2D([], [], color="k", lw=0.8, label=f"contract {TOL_TEXT}")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    ctx.figure(fig, "errors", f"mclip error vs Newton–Schulz steps (Polar Express, float32) per spectrum; "
               f"'bf16': {max(steps_grid)} steps in bfloat16; 'exact': with the exact msign. Errors below "
               f"{FLOOR:g} would be drawn at {FLOOR:g}.")


def _costs(ctx: Context, shape: tuple[int, int]) -> list[list[Any]]:
    """Median seconds of msign and of both mclip forms; the mclip forms in units of one msign."""
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(ctx.seed)) * 3.0 / shape[1] ** 0.5
    rows = []
    for label, kw in (("accurate", {"schedule": "accurate"}), ("PE 10 steps", {"schedule": "polar_express", "steps": 10})):
        t_sign = ctx.timeit(lambda: msign(X, **kw), warmup=1, repeat=3)["median"]
        t_den = ctx.timeit(lambda: mclip(X, **kw), warmup=1, repeat=3)["median"]
        t_nes = ctx.timeit(lambda: mclip(X, form="nested", **kw), warmup=1, repeat=3)["median"]
        rows.append([label, t_sign * 1e3, t_den / t_sign, t_nes / t_sign])
    return rows


def _function_errors(M: torch.Tensor) -> list[list[Any]]:
    """mstep / msquare / mpoly of ``M`` against float64 SVD."""
    checks = [
        ("mstep(M, 1)", mstep(M), lambda s: (s > 1).astype(float)),
        ("msquare(M)", msquare(M), lambda s: s**2),
        ("mpoly(M, [0.5, −1, 0, 2])", mpoly(M, [0.5, -1.0, 0.0, 2.0]), lambda s: 0.5 - s + 2 * s**3),
        ("mstep, PE 12 steps", mstep(M, schedule="polar_express", steps=12), lambda s: (s > 1).astype(float)),
        ("msquare, PE 12 steps", msquare(M, schedule="polar_express", steps=12), lambda s: s**2),
    ]
    return [[name, _err(out, _svd_fn(M, f))] for name, out, f in checks]


def run(ctx: Context) -> None:
    m, n = ctx.pick((48, 96), (256, 512), (1024, 2048))
    steps_grid = ctx.pick([5, 10], [5, 8, 10, 12, 15, 20], [5, 8, 10, 12, 15, 20, 30])
    rng = np.random.default_rng(ctx.seed)
    ctx.text(
        f"Singular value clipping `mclip(M) = U min(Σ, 1) Vᵀ` of float32 {m}×{n} matrices, computed from msign "
        "where M = UΣVᵀ is the singular value decomposition and msign(M) = UVᵀ. With O = msign(M), mclip is "
        "computed by the nested formula of the note (part 1) `2 mclip(M) = M + O + (I − M Oᵀ) msign(M − O)` and by "
        "the de-nested `2 mclip(M) = M + O + (O − M) msign(H − I)`, H = sym(OᵀM) = (OᵀM + MᵀO)/2, of "
        "[part 2](https://kexue.fm/archives/11059), with the exact msign (`schedule=\"accurate\"`) and with "
        "Polar Express (PE; Amsel et al., [arXiv:2505.16932](https://arxiv.org/abs/2505.16932)) Newton–Schulz "
        "iterations in float32 for a growing number of steps (extra steps use the quintic tail). Error: relative "
        "Frobenius error ‖X − X_SVD‖_F / ‖X_SVD‖_F against a float64 SVD."
    )
    mats = {kind: _matrix(kind, m, n, rng) for kind in SPECTRA}
    results = _errors(mats, steps_grid, ctx.track(list(SPECTRA), "mclip errors by spectrum"))
    _claim(ctx, results)
    _report_errors(ctx, results, steps_grid)
    _plot_errors(ctx, results, steps_grid)

    shape = ctx.pick((64, 128), (512, 1024), (1024, 4096))
    ctx.phase(f"mclip: timing msign and both mclip forms ({shape[0]}×{shape[1]})")
    cost_rows = _costs(ctx, shape)
    ctx.table(
        ["msign", "msign ms", "de-nested / msign", "nested / msign"],
        cost_rows,
        caption=f"Measured cost of mclip in units of one msign ({shape[0]}×{shape[1]} float32, median of 3).",
        timing=True,
    )
    ctx.result("cost", {r[0]: {"msign_ms": r[1], "denested": r[2], "nested": r[3]} for r in cost_rows})

    ctx.phase("mclip: mstep, msquare and mpoly against the SVD")
    check_rows = _function_errors(mats["gaussian"])
    ctx.table(["function (gaussian M)", "relative error vs SVD"], check_rows, floatfmt=".2e")
    ctx.result("functions", dict((r[0], r[1]) for r in check_rows))
