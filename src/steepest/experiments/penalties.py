"""Input-gradient vs parameter-gradient penalty: the inequality between them, checked and used.

The note: Su, *An inequality between input-gradient and parameter-gradient
penalties*, kexue.fm/archives/8796.

1. The inequality ``‖∇_x f‖² Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_θ f‖²`` on random
   MLPs in float64: violations and the distribution of the tightness lhs/rhs.
2. Its factors along SGD training of a digits MLP, at several learning rates and
   replicates: does the multiplier stay "nearly constant" (the note's claim) over the
   whole run, in the initial transient (early window) and after it (late window)?
3. Training with each penalty (input / parameter — per example, as the inequality
   bounds it, and of the batch-mean loss — exact / finite difference) vs none, with
   the lr and each λ chosen on validation and everything read on test, paired by
   replicate: test accuracy, final input-gradient norm, cost per step.
4. The finite-difference error against the exact penalty gradient.

Each part measures into plain data (``_tightness``, ``_probe_job``, ``window_spreads``,
``_train_penalized``, ``_step_costs``, ``_fd_errors``) and reports it separately.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..penalties import input_grad_norm2, occam_bound, param_grad_norm2, param_penalty_grads_fd
from ..report import DIVERGED, Context, measure, plural
from . import claim, full_command
from ._data import digits_three_way
from ._protocol import (MIN_SEEDS, choose, fmt_cell, fmt_interval, fmt_spread, mean_or_inf, n_caption, outcome,
                        paired, protocol_text)

TITLE = "Input vs parameter gradient penalty"
# Tiny tensors: intra-op threads only add synchronisation cost.
THREADS = 1

SPREAD = 2.0  # "nearly constant": max/min over training below this
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}
RTOL = 1e-9  # float64 round-off allowance when counting violations
# x_train, x_val, x_test, y_train, y_val, y_test
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------ 1. random MLPs
def _random_mlp(g: torch.Generator, rng: np.random.Generator) -> tuple[nn.Sequential, int, list[int], str, float]:
    depth = int(rng.integers(1, 7))
    widths = [int(w) for w in rng.integers(1, 33, size=depth + 1)]
    act = str(rng.choice(sorted(ACTS)))
    scale = float(math.exp(rng.uniform(math.log(0.2), math.log(5.0))))
    layers: list[nn.Module] = []
    for t in range(depth):
        lin = nn.Linear(widths[t], widths[t + 1]).double()
        with torch.no_grad():
            lin.weight.normal_(0.0, scale / math.sqrt(widths[t]), generator=g)
            lin.bias.normal_(0.0, 0.1 * scale, generator=g)
        layers.append(lin)
        if t < depth - 1 or rng.random() < 0.5:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers), depth, widths, act, scale


def _tightness(ctx: Context, n: int, batch: int) -> dict[str, Any]:
    """Both bounds (spectral, Frobenius) on ``n`` random float64 MLPs: violations and tightness lhs/rhs per example."""
    rng = np.random.default_rng(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    by: dict[tuple[int, str], list[np.ndarray]] = {}
    tight_s, tight_f = [], []
    viol_s = viol_f = n_examples = zero_rhs = 0
    worst = 0.0
    for _ in ctx.track(range(n), "random MLPs (float64)"):
        model, depth, widths, act, scale = _random_mlp(g, rng)
        x = torch.randn(batch, widths[0], dtype=torch.float64, generator=g) * float(rng.choice([0.3, 1.0, 3.0]))
        b = occam_bound(model, x)
        bf = occam_bound(model, x, norm="frobenius")
        viol_s += b.violations(RTOL)
        viol_f += bf.violations(RTOL)
        n_examples += batch
        ok = b.rhs > 0
        zero_rhs += int((~ok).sum())
        t_s = (b.lhs[ok] / b.rhs[ok]).numpy()
        t_f = (bf.lhs[ok] / bf.rhs[ok]).numpy()
        if t_s.size:
            worst = max(worst, float(t_s.max()))
        tight_s.append(t_s)
        tight_f.append(t_f)
        by.setdefault((depth, act), []).append(t_s)
    return {"n": n, "batch": batch, "ts": np.concatenate(tight_s), "tf": np.concatenate(tight_f), "by": by,
            "viol_s": viol_s, "viol_f": viol_f, "n_examples": n_examples, "zero_rhs": zero_rhs, "worst": worst}


def _q(a: np.ndarray, p: float) -> float:
    return float(np.quantile(a, p)) if a.size else float("nan")


def _median_by_depth(by: dict[tuple[int, str], list[np.ndarray]]) -> tuple[list[int], dict[tuple[int, str], float]]:
    """Median spectral tightness per (depth, activation); nan where no example fell."""
    depths = sorted({d for d, _ in by})
    med = {}
    for d in depths:
        for a in sorted(ACTS):
            t = np.concatenate(by[(d, a)]) if (d, a) in by else np.empty(0)
            med[(d, a)] = float(np.median(t)) if t.size else float("nan")
    return depths, med


def _report_random_mlps(ctx: Context, m: dict[str, Any]) -> None:
    n, ts, tf, ne = m["n"], m["ts"], m["tf"], m["n_examples"]
    ctx.text(
        f"**1. The inequality on {n} random MLPs** (float64; depth 1–6, widths 1–32, tanh/ReLU/GELU/softplus, "
        f"weights N(0, s²/fan_in) with s log-uniform in [0.2, 5], optional final activation, {m['batch']} inputs "
        f"each, f = sum of outputs). Violations are counted as lhs > rhs·(1 + {RTOL:g})."
    )
    ctx.table(
        ["norm in the bound", "MLPs", "examples", "violations", "min lhs/rhs", "median", "90%", "max"],
        [
            ["spectral", n, ne, m["viol_s"], _q(ts, 0), _q(ts, 0.5), _q(ts, 0.9), _q(ts, 1)],
            ["Frobenius", n, ne, m["viol_f"], _q(tf, 0), _q(tf, 0.5), _q(tf, 0.9), _q(tf, 1)],
        ],
        caption=f"Tightness lhs/rhs per example ({m['zero_rhs']} examples with ∇_θ f = 0, hence lhs = 0, left out of "
        "the ratios).",
    )
    depths, med = _median_by_depth(m["by"])
    acts = sorted(ACTS)
    ctx.table(["depth", *acts], [[d, *[med[(d, a)] for a in acts]] for d in depths],
              caption="Median tightness lhs/rhs (spectral) by depth and activation.")
    _plot_tightness(ctx, m, depths, med)
    ctx.result(
        "random_mlps",
        {
            "n_mlps": n,
            "n_examples": ne,
            "violations_spectral": m["viol_s"],
            "violations_frobenius": m["viol_f"],
            "zero_rhs_examples": m["zero_rhs"],
            "tightness_spectral_median": _q(ts, 0.5),
            "tightness_spectral_max": m["worst"],
            "tightness_frobenius_median": _q(tf, 0.5),
        },
    )


def _plot_tightness(ctx: Context, m: dict[str, Any], depths: list[int], med: dict[tuple[int, str], float]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.linspace(-6, 0.05, 62)
    for arr, lab in ((m["ts"], "spectral ‖W‖, ‖∇ₓh‖"), (m["tf"], "Frobenius")):
        axes[0].hist(np.log10(np.clip(arr, 1e-6, None)), bins=bins, histtype="step", lw=1.6, label=lab)
    axes[0].axvline(0, color="k", ls="--", lw=1)
    axes[0].set_xlabel("log10(lhs / rhs)   (≤ 0 means the inequality holds)")
    axes[0].set_ylabel("examples")
    axes[0].set_title(f"{m['n']} random MLPs, {m['n_examples']} examples: "
                      f"{plural(m['viol_s'] + m['viol_f'], 'violation')}")
    axes[0].legend()
    for a in sorted(ACTS):
        axes[1].plot(depths, [med[(d, a)] for d in depths], "o-", label=a)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("depth (Linear layers)")
    axes[1].set_ylabel("median lhs / rhs")
    axes[1].set_title("median tightness by depth, spectral-norm bound")
    axes[1].legend(title="activation")
    for ax in axes:
        ax.grid(alpha=0.25)
    fig.tight_layout(w_pad=3.0)
    ctx.figure(
        fig,
        "tightness",
        "Tightness lhs/rhs of the note's inequality on random float64 MLPs, with spectral norms ‖W_t‖₂, ‖∇ₓh_t‖₂ "
        "and with Frobenius norms (left; ratios below 1e-6, including lhs = 0 where ∇ₓf vanishes, are piled at "
        "−6), and its median by depth and activation with spectral norms (right).",
    )


# ------------------------------------------------------------------ digits data
def _digits(seed: int) -> Data:
    """Replicate ``seed``: training, validation and test parts (pixels / 16; the validation part is shared)."""
    d = digits_three_way(seed)
    return d["xtr"], d["xva"], d["xte"], d["ytr"], d["yva"], d["yte"]


def _digits_mlp(seed: int, width: int = 128) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def _input_grad_mean(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over examples of ‖∇_x ℓ_i‖² (per-example loss)."""
    f = lambda x: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    return float(input_grad_norm2(f, X, create_graph=False).mean())


def _jacobian_gc(model: nn.Module, X: torch.Tensor) -> float:
    """Geometric complexity (Dherin et al.): mean over examples of ‖∂ logits/∂x‖_F²."""
    J = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi.unsqueeze(0))[0]))(X)
    return float(J.detach().pow(2).sum((1, 2)).mean())


def per_example_param_penalty(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses ℓ_i and per-example parameter penalties ‖∇_θ ℓ_i‖², differentiable w.r.t. θ.

    For a Linear layer t with input h_t and output gradient δ_t = ∂ℓ_i/∂(W_t h_t + b_t), ∇_{W_t} ℓ_i = δ_t h_tᵀ
    and ∇_{b_t} ℓ_i = δ_t, so ‖∇_θ ℓ_i‖² = Σ_t ‖δ_t‖² (1 + ‖h_t‖²) — the quantity the note's inequality bounds,
    from one double backward pass (examples do not interact in an MLP, so the gradient of Σ_i ℓ_i w.r.t. the
    per-example pre-activations is each example's own δ). ``model``: a Sequential of Linear layers and
    elementwise activations.
    """
    hs, zs = [], []
    a = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            hs.append(a)
            a = layer(a)
            zs.append(a)
        else:
            a = layer(a)
    ell = F.cross_entropy(a, y, reduction="none")
    deltas = torch.autograd.grad(ell.sum(), zs, create_graph=True)
    pen = sum(d.pow(2).sum(1) * (1 + h.pow(2).sum(1)) for d, h in zip(deltas, hs))
    return ell, pen  # type: ignore[return-value]


# ------------------------------------------------------------------ 2. along training
def _probe_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The bound's sides and per-layer factors (float64, on a copy of ``model``; f = per-example cross-entropy)."""
    m64 = copy.deepcopy(model).double()
    b = occam_bound(m64, x, lambda out: F.cross_entropy(out, y, reduction="none"))
    ok = b.input_grad_norm2 > 0
    return {
        "lhs": float(b.lhs.mean()),
        "rhs": float(b.rhs.mean()),
        "gx2": float(b.input_grad_norm2.mean()),
        "mult": float((b.lhs[ok] / b.input_grad_norm2[ok]).median()),
        "tight": float((b.lhs / b.rhs).median()),
        "h": [float(L.h_norm2.mean().sqrt()) for L in b.layers],
        "W": [float(L.weight_norm2.sqrt()) for L in b.layers],
        "J": [float(L.jac_norm2.mean().sqrt()) for L in b.layers],
    }


def _probe_job(job: tuple[int, float, dict[str, Any]]) -> tuple[dict[str, list], float]:
    """Plain SGD on the digits MLP of replicate ``seed`` at one lr, the bound probed every ``every`` steps on
    fixed test images; the history and the final test accuracy. Self-contained (seeds itself) for a worker."""
    seed, lr, cfg = job
    Xtr, _, Xte, ytr, _, yte = _digits(seed)
    steps, every, bs = cfg["steps"], cfg["every"], cfg["bs"]
    model = _digits_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    probe_x, probe_y = Xte[:cfg["n_probe"]].double(), yte[:cfg["n_probe"]]
    hist: dict[str, list] = {k: [] for k in ("step", "lhs", "rhs", "gx2", "mult", "tight", "h", "W", "J")}
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            hist["step"].append(step)
            for k, v in _probe_bound(model, probe_x, probe_y).items():
                hist[k].append(v)
        if step == steps:
            break
        idx = torch.randint(0, Xtr.shape[0], (bs,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    return hist, acc


def _spread(a: np.ndarray) -> float:
    """max / min of a positive series."""
    return float(np.max(a) / np.min(a))


#: the windows of a run the spreads are taken over, as fractions of its steps (the early one includes step 0)
WINDOWS = {"whole run": (0.0, 1.0), "early": (0.0, 0.2), "late": (0.5, 1.0)}


def window_spreads(hist: dict[str, list], lo: float, hi: float) -> dict[str, float]:
    """max/min of the multiplier, the per-layer factors (the largest), both penalties and their ratio, and the
    correlation of the penalties' logs, over the probes with lo·T ≤ step ≤ hi·T (T the last step)."""
    steps = np.array(hist["step"], dtype=float)
    sel = (steps >= lo * steps[-1]) & (steps <= hi * steps[-1])
    H, W, J = (np.array(hist[k])[sel] for k in ("h", "W", "J"))
    gx2, rhs, mult = (np.array(hist[k])[sel] for k in ("gx2", "rhs", "mult"))
    factors = [_spread(H[:, t]) for t in range(H.shape[1])] + [_spread(W[:, t]) for t in range(W.shape[1])]
    factors += [_spread(J[:, t]) for t in range(1, J.shape[1])]
    lg, lr = np.log(gx2), np.log(rhs)
    corr = float(np.corrcoef(lg, lr)[0, 1]) if sel.sum() > 2 and lg.std() > 0 and lr.std() > 0 else math.nan
    return {"multiplier": _spread(mult), "factors": max(factors + [1.0]), "input_penalty": _spread(gx2),
            "param_penalty": _spread(rhs), "ratio": _spread(rhs / gx2), "log_corr": corr,
            "from_step": int(steps[sel][0]), "to_step": int(steps[sel][-1])}


def constancy_verdict(multiplier_spreads: dict[str, list[float]], limit: float = SPREAD) -> str:
    """"The multiplier stays nearly constant during training", from its max/min per run and window.

    held: below ``limit`` over the whole run in every run; partly held: below it in the late window
    (after the initial transient) of at least one run; not held: in no run, not even late. Fewer than
    MIN_SEEDS runs: not measured.
    """
    whole, late = multiplier_spreads.get("whole run", []), multiplier_spreads.get("late", [])
    if len(whole) < MIN_SEEDS or len(late) != len(whole):
        return "not measured"
    if all(s < limit for s in whole):
        return "held"
    return "partly held" if any(s < limit for s in late) else "not held"


def _along_training(ctx: Context) -> dict[str, Any]:
    cfg = {"steps": ctx.pick(60, 1500, 6000), "every": ctx.pick(20, 50, 100), "bs": 32,
           "n_probe": ctx.pick(64, 128, 256), "lrs": ctx.pick([0.05], [0.05, 0.2], [0.02, 0.05, 0.2]),
           "seeds": [ctx.seed + s for s in range(ctx.pick(1, 2, 5))]}
    jobs = [(s, lr, cfg) for lr in cfg["lrs"] for s in cfg["seeds"]]
    runs = []
    for (s, lr, _), (hist, acc) in zip(jobs, ctx.map_ordered(_probe_job, jobs, "penalties: SGD runs, bound probed")):
        runs.append({"seed": s, "lr": lr, "hist": hist, "acc": acc,
                     "windows": {w: window_spreads(hist, *f) for w, f in WINDOWS.items()}})
    _report_along_training(ctx, runs, cfg)
    return {"runs": runs, "cfg": cfg,
            "multiplier": {w: [r["windows"][w]["multiplier"] for r in runs] for w in WINDOWS}}


def _report_along_training(ctx: Context, runs: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    steps = cfg["steps"]
    n = len(runs)
    win = {w: f"steps {runs[0]['windows'][w]['from_step']}–{runs[0]['windows'][w]['to_step']}" for w in WINDOWS}
    ctx.text(
        f"**2. Along training.** MLP 64-128-128-10 (tanh) on the training part of digits (pixels/16), plain SGD, "
        f"batch {cfg['bs']}, {steps} steps, at learning rates {', '.join(f'{lr:g}' for lr in cfg['lrs'])} × "
        f"{plural(len(cfg['seeds']), 'replicate')} (data division and seed; {plural(n, 'run')}). Every "
        f"{cfg['every']} steps the bound is evaluated in float64 on {cfg['n_probe']} fixed test images with f = the "
        "per-example cross-entropy. 'max/min' is a quantity's spread over a window of the run: the whole run "
        f"({win['whole run']}), the early window ({win['early']}: the initial transient, step 0 included) and the "
        f"late window ({win['late']}). Nearly constant: max/min < {SPREAD:g}.")
    keys = [("multiplier", "multiplier Σ_t (1+‖h‖²)/(‖W‖²‖∇ₓh‖²) (median over examples)"),
            ("factors", "largest per-layer factor ‖h_t‖, ‖W_t‖, ‖∇ₓh_t‖"),
            ("input_penalty", "input penalty ‖∇ₓℓ‖² (mean)"), ("param_penalty", "parameter penalty ‖∇_θℓ‖² (mean)"),
            ("ratio", "ratio parameter / input penalty"), ("log_corr", "correlation of the two penalties' logs")]
    rows = []
    for k, label in keys:
        row = [label]
        for w in WINDOWS:
            vals = [r["windows"][w][k] for r in runs]
            worst = min(vals) if k == "log_corr" else max(vals)
            row.append(fmt_cell(vals, ".3g") + (f" ({'min' if k == 'log_corr' else 'max'} {worst:.3g})" if n > 1 else ""))
        rows.append(row)
    ctx.table(["quantity", *[f"{w} ({win[w]})" for w in WINDOWS]], rows,
              caption=f"Spread max/min per window, {n_caption(n, 'run')} (in brackets: the worst run).")
    ctx.table(["lr", "seed", "test acc", *[f"multiplier max/min, {w}" for w in WINDOWS], "ratio max/min, late",
               "log-correlation, late"],
              [[r["lr"], r["seed"], r["acc"], *[r["windows"][w]["multiplier"] for w in WINDOWS],
                r["windows"]["late"]["ratio"], r["windows"]["late"]["log_corr"]] for r in runs],
              caption="Every run.")
    _plot_along_training(ctx, runs[len(runs) // 2 if len(cfg["lrs"]) > 1 else 0], runs, cfg)
    ctx.result("along_training", {
        "steps": steps, "lrs": cfg["lrs"], "seeds": cfg["seeds"],
        "test_acc": float(np.mean([r["acc"] for r in runs])),
        "multiplier_spread": max(r["windows"]["whole run"]["multiplier"] for r in runs),
        "max_factor_spread": max(r["windows"]["whole run"]["factors"] for r in runs),
        "ratio_spread": max(r["windows"]["whole run"]["ratio"] for r in runs),
        "windows": {w: {k: [r["windows"][w][k] for r in runs] for k, _ in keys} for w in WINDOWS},
        "runs": [{"lr": r["lr"], "seed": r["seed"], "test_acc": r["acc"], "windows": r["windows"]} for r in runs],
    })


def _plot_along_training(ctx: Context, first: dict[str, Any], runs: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    h = first["hist"]
    x = np.array(h["step"])
    H, W, J = (np.array(h[k]) for k in ("h", "W", "J"))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.6), sharex=True)
    ax = axes[0, 0]
    ax.plot(x, h["lhs"], marker="o", ms=3, label="lhs of the bound")
    ax.plot(x, h["rhs"], marker="s", ms=3, label="rhs = parameter penalty ‖∇_θℓ‖²")
    ax.plot(x, h["gx2"], marker="^", ms=3, label="input penalty ‖∇ₓℓ‖²")
    ax.set_yscale("log")
    ax.set_ylabel("mean over the probe examples")
    for ax, arr, name, start in ((axes[0, 1], H, "‖h_t‖ (RMS over examples)", 0),
                                 (axes[0, 2], W, "‖W_t‖₂ (spectral norm)", 0),
                                 (axes[1, 0], J, "‖∇ₓh_t‖₂ (RMS over examples)", 1)):
        for t in range(start, arr.shape[1]):  # one marker shape per layer: close lines stay apart
            ax.plot(x, arr[:, t], marker="os^D"[t % 4], ms=4 + (t % 2), mfc="none" if t % 2 else None,
                    label=f"layer t = {t + 1}")
        ax.set_ylabel(name)
    ax = axes[1, 1]
    lrs = sorted({r["lr"] for r in runs})
    for r in runs:  # every run: the multiplier over its own value at the end
        m = np.array(r["hist"]["mult"])
        ax.plot(r["hist"]["step"], m / m[-1], color=f"C{lrs.index(r['lr'])}", lw=1, alpha=0.8,
                label=f"lr {r['lr']:g}" if r["seed"] == cfg["seeds"][0] else None)
    ax.axhspan(1 / SPREAD, SPREAD, color="k", alpha=0.06, label=f"within {SPREAD:g}× of the final value")
    ax.set_yscale("log")
    ax.set_ylabel("multiplier ÷ its final value (every run)")
    ax = axes[1, 2]
    ax.plot(x, h["tight"], marker="o", ms=3, color="C2", label="tightness lhs/rhs (median)")
    ax.plot(x, np.array(h["rhs"]) / np.array(h["gx2"]), marker="s", ms=3, color="C3", label="parameter ÷ input penalty")
    ax.set_yscale("log")
    ax.set_ylabel("tightness, penalty ratio")
    last = x[-1]
    for ax in axes.flat:
        ax.axvspan(WINDOWS["early"][0] * last, WINDOWS["early"][1] * last, color="C1", alpha=0.06)
        ax.axvspan(WINDOWS["late"][0] * last, WINDOWS["late"][1] * last, color="C0", alpha=0.05)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[1]:
        ax.set_xlabel("SGD step")
    fig.tight_layout()
    ctx.figure(fig, "training", f"Both sides of the bound and its per-layer factors along SGD training of the digits "
               f"MLP (lr {first['lr']:g}, seed {first['seed']}; h_t: input of the t-th Linear layer, W_t its weight); "
               "bottom middle: the multiplier of every run relative to its final value. Shaded: the early window "
               "(orange) and the late window (blue) the spreads are taken over.")


# ------------------------------------------------------------------ 3. training with penalties
FD_EPS = 1e-2  # step length (normalize=True) in input / parameter space
METHODS = ["none", "input exact", "input FD", "param exact", "param batch-mean", "param FD"]
#: the penalty each method trains, as the report names it
PENALTY = {
    "none": "–",
    "input exact": "mean_i ‖∇_{x_i} ℓ_i‖² (double backprop)",
    "input FD": "mean_i ‖∇_{x_i} ℓ_i‖² (finite difference)",
    "param exact": "mean_i ‖∇_θ ℓ_i‖², per example (what the inequality bounds)",
    "param batch-mean": "‖∇_θ L‖², L the batch-mean loss",
    "param FD": "‖∇_θ L‖² (finite difference)",
}
#: the methods whose λ is swept on validation; a finite-difference method uses its exact counterpart's λ
SWEPT = ["input exact", "param exact", "param batch-mean"]
LAMBDA_OF = {"input FD": "input exact", "param FD": "param batch-mean"}


def _step_fn(method: str, lam: float, model: nn.Sequential, opt: torch.optim.Optimizer
             ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    ps = list(model.parameters())

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        if method == "none":
            F.cross_entropy(model(xb), yb).backward()
        elif method.startswith("input"):
            f = lambda x: F.cross_entropy(model(x), yb, reduction="none")  # noqa: E731
            kw = {"method": "finite_difference", "eps": FD_EPS, "normalize": True} if method == "input FD" else {}
            pen, ell = input_grad_norm2(f, xb, return_output=True, **kw)
            (ell.mean() + lam * pen.mean()).backward()
        elif method == "param exact":
            ell, pen = per_example_param_penalty(model, xb, yb)
            (ell.mean() + lam * pen.mean()).backward()
        elif method == "param batch-mean":
            loss = F.cross_entropy(model(xb), yb)
            (loss + lam * param_grad_norm2(loss, ps)).backward()
        else:
            out = param_penalty_grads_fd(lambda: F.cross_entropy(model(xb), yb), ps, eps=FD_EPS, normalize=True)
            for p, gi, pi in zip(ps, out.grads, out.penalty_grads):
                p.grad = gi + lam * pi
        opt.step()

    return step


def _train_penalized(method: str, lam: float, seed: int, steps: int, every: int, lr: float, bs: int
                     ) -> dict[str, Any]:
    """Train with one penalty on replicate ``seed``: validation loss, test accuracy, test input-gradient norm²
    over training, final geometric complexity."""
    Xtr, Xva, Xte, ytr, yva, yte = _digits(seed)
    model = _digits_mlp(100 + seed)
    step = _step_fn(method, lam, model, torch.optim.SGD(model.parameters(), lr=lr))
    g = torch.Generator().manual_seed(200 + seed)
    curve = []
    for k in range(steps):
        if k % every == 0:
            curve.append((k, _input_grad_mean(model, Xte, yte)))
        idx = torch.randint(0, Xtr.shape[0], (bs,), generator=g)
        step(Xtr[idx], ytr[idx])
    gx = _input_grad_mean(model, Xte, yte)
    curve.append((steps, gx))
    with torch.no_grad():
        val = float(F.cross_entropy(model(Xva), yva))
        out = model(Xte)
        acc = float((out.argmax(1) == yte).float().mean())
        test_loss = float(F.cross_entropy(out, yte))
    if not math.isfinite(val):
        val = math.inf
    return {"val": val, "acc": acc, "test_loss": test_loss, "gx": gx, "curve": curve, "gc": _jacobian_gc(model, Xte),
            "n_test": int(yte.numel())}


def _penalized_job(job: tuple[str, float, int, int, int, float, int]) -> dict[str, Any]:
    """One training run with one penalty; self-contained (loads the split, seeds itself) for a worker process."""
    return _train_penalized(*job)


def _step_costs(seed: int, data: Data, bs: int, lams: dict[str, float], warmup: int, repeat: int
                ) -> dict[int, dict[str, float]]:
    """Median seconds of one training step per method, on one fixed batch, at widths 128 and 1024."""
    Xtr, ytr = data[0], data[3]
    xb, yb = Xtr[:bs], ytr[:bs]
    cost: dict[int, dict[str, float]] = {}
    for width in (128, 1024):
        cost[width] = {}
        for method in METHODS:
            model = _digits_mlp(seed, width)
            step = _step_fn(method, lams.get(method, 0.0), model, torch.optim.SGD(model.parameters(), lr=1e-4))
            cost[width][method] = measure(lambda: step(xb, yb), warmup=warmup, repeat=repeat)["median"]
    return cost


def _with_penalties(ctx: Context) -> dict[str, Any]:
    """Section 3: lr (unpenalized) and λ per penalty chosen on validation, then every method read on test."""
    cfg = {"steps": ctx.pick(40, 800, 3000), "seeds": [ctx.seed + s for s in range(ctx.pick(1, 3, 5))], "bs": 32,
           "lrs": ctx.pick([0.05], [0.05, 0.1, 0.2], [0.02, 0.05, 0.1, 0.2]),
           "lams": ctx.pick([0.1], [0.01, 0.1, 1.0], [0.003, 0.01, 0.03, 0.1, 0.3, 1.0])}
    every = max(cfg["steps"] // 12, 1)
    done: dict[tuple[str, float, float, int], dict[str, Any]] = {}

    def run(specs: list[tuple[str, float, float]], description: str) -> None:
        todo = [(m, lam, lr, s) for m, lam, lr in specs for s in cfg["seeds"] if (m, lam, lr, s) not in done]
        jobs = [(m, lam, s, cfg["steps"], every, lr, cfg["bs"]) for m, lam, lr, s in todo]
        for key, res in zip(todo, ctx.map_ordered(_penalized_job, jobs, description)):
            done[key] = res

    def val(m: str, lam: float, lr: float) -> float:
        return mean_or_inf([done[(m, lam, lr, s)]["val"] for s in cfg["seeds"]])

    run([("none", 0.0, lr) for lr in cfg["lrs"]], "penalties: lr without a penalty (validation)")
    lr = choose({lr: val("none", 0.0, lr) for lr in cfg["lrs"]})
    run([(m, lam, lr) for m in SWEPT for lam in cfg["lams"]], "penalties: λ of each penalty (validation)")
    lam_scores = {m: {lam: val(m, lam, lr) for lam in cfg["lams"]} for m in SWEPT}
    lams = {m: choose(sc) for m, sc in lam_scores.items()}
    lams.update({m: lams[src] for m, src in LAMBDA_OF.items()})
    lams["none"] = 0.0
    run([(m, lams[m], lr) for m in METHODS if m in LAMBDA_OF], "penalties: finite-difference runs")
    res = {m: [done[(m, lams[m], lr, s)] for s in cfg["seeds"]] for m in METHODS}
    ctx.phase("penalties: timing one training step per penalty")
    cost = _step_costs(ctx.seed, _digits(ctx.seed), cfg["bs"], lams, warmup=ctx.pick(1, 5, 20),
                       repeat=ctx.pick(3, 11, 100))
    curves = {m: res[m][0]["curve"] for m in METHODS}  # the first replicate's, for the figure
    out = {"res": res, "lr": lr, "lams": lams, "lam_scores": lam_scores, "cfg": cfg, "cost": cost,
           "lr_scores": {x: val("none", 0.0, x) for x in cfg["lrs"]}}
    _report_penalties(ctx, out)
    _plot_penalized(ctx, curves, lams)
    return out


def _report_penalties(ctx: Context, out: dict[str, Any]) -> None:
    res, cfg, cost, lams = out["res"], out["cfg"], out["cost"], out["lams"]
    n = len(cfg["seeds"])
    n_test = res["none"][0]["n_test"]
    ctx.text(
        f"**3. Training with each penalty.** Same MLP and SGD (batch {cfg['bs']}, {cfg['steps']} steps), "
        f"{plural(n, 'replicate')} (data division and seed; same initialization and batches for every method within "
        "a replicate). " + protocol_text(
            "scikit-learn's digits, a fixed stratified validation part of 360 images and, per replicate, a "
            "stratified division of the other images into 1078 training and 359 test images",
            f"the learning rate (of the unpenalized model, {plural(len(cfg['lrs']), 'candidate')}: "
            f"{out['lr']:g}, then shared by every method) and λ of each penalty "
            f"({plural(len(cfg['lams']), 'candidate')} each, by final validation loss; the finite-difference "
            "versions take the λ of the exact penalty they approximate)", n)
        + f" FD = finite difference with a step of length {FD_EPS:g} (normalize=True). 'input-grad norm²' = mean "
        "over the test images of ‖∇ₓℓ_i‖²; 'GC' = geometric complexity, mean ‖∂logits/∂x‖_F². Differences are "
        f"paired by replicate; a test image is {100 / n_test:.2f} percentage points of accuracy.")
    lam_rows = [[m, PENALTY[m], *(_fmt_loss(out["lam_scores"][m][lam]) + (" ←" if lam == lams[m] else "")
                                  for lam in cfg["lams"])] for m in SWEPT]
    ctx.table(["penalty", "what it penalizes", *[f"λ = {lam:g}" for lam in cfg["lams"]]], lam_rows,
              caption=f"Choosing λ on the validation part: mean final validation loss over {plural(n, 'replicate')} "
                      f"(← chosen; no penalty: {_fmt_loss(out['lr_scores'][out['lr']])} at lr {out['lr']:g}).")
    none = res["none"]
    rows = []
    for m in METHODS:
        r = res[m]
        acc = [x["acc"] for x in r]
        gx = [x["gx"] for x in r]
        if m == "none":
            d_acc = d_gx = "–"
        else:
            d_acc = fmt_interval(paired([100 * a for a in acc], [100 * x["acc"] for x in none]), ".2f", " pp")
            d_gx = fmt_interval(paired(gx, [x["gx"] for x in none], log=True), ".2f", ratio=True)
        rows.append([m, "" if m == "none" else f"{lams[m]:g}", fmt_cell([100 * a for a in acc], ".2f"), d_acc,
                     fmt_cell(gx, ".3g"), d_gx, fmt_cell([x["gc"] for x in r], ".3g")])
    ctx.table(["penalty", "λ", "test acc %", "Δ acc vs none (paired)", "test input-grad norm²", "÷ none (paired)",
               "GC"], rows, caption=f"Training with each penalty, read on the test part ({n_caption(n, 'replicate')}).")
    ctx.table(["penalty", "ms/step (w128)", "× none", "ms/step (w1024)", "× none"],
              [[m, cost[128][m] * 1e3, cost[128][m] / cost[128]["none"], cost[1024][m] * 1e3,
                cost[1024][m] / cost[1024]["none"]] for m in METHODS],
              caption="Cost: median wall time of one training step on one batch of 32 (single thread), for the "
                      "trained width 128 and for width 1024.", timing=True)
    ctx.result("with_penalties", {m: {
        "lambda": lams[m], "test_acc": float(np.mean([x["acc"] for x in res[m]])),
        "worst_seed_acc": float(np.min([x["acc"] for x in res[m]])),
        "input_grad_norm2": float(np.mean([x["gx"] for x in res[m]])), "gc": float(np.mean([x["gc"] for x in res[m]])),
        "per_replicate": {k: [x[k] for x in res[m]] for k in ("val", "acc", "test_loss", "gx", "gc")},
        "ms_per_step_w128": cost[128][m] * 1e3, "ms_per_step_w1024": cost[1024][m] * 1e3} for m in METHODS})
    ctx.result("penalty_selection", {"lr": out["lr"], "lr_val": {f"{k:g}": v for k, v in out["lr_scores"].items()},
                                     "lambda_val": {m: {f"{k:g}": v for k, v in sc.items()}
                                                    for m, sc in out["lam_scores"].items()}})


def _fmt_loss(v: float) -> str:
    return DIVERGED if not math.isfinite(v) else f"{v:.4f}"


def _plot_penalized(ctx: Context, curves: dict[str, list[tuple[int, float]]], lams: dict[str, float]) -> None:
    import matplotlib.pyplot as plt

    # exact and finite-difference versions of a penalty nearly coincide: solid filled markers for exact,
    # dashed hollow bigger markers for FD, and FD drawn a little to the right
    styles = {"none": dict(color="k", marker="o", ls="-", mfc="k", ms=5),
              "input exact": dict(color="C0", marker="o", ls="-", mfc="C0", ms=5),
              "input FD": dict(color="C0", marker="s", ls="--", mfc="none", ms=8),
              "param exact": dict(color="C3", marker="^", ls="-", mfc="C3", ms=5),
              "param batch-mean": dict(color="C2", marker="v", ls="-", mfc="C2", ms=5),
              "param FD": dict(color="C2", marker="D", ls="--", mfc="none", ms=8)}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    last = max(k for k, _ in curves["none"])
    for m in METHODS:
        steps = np.array([k for k, _ in curves[m]], dtype=float) + (0.006 * last if "FD" in m else 0.0)
        lam = "" if m == "none" else f" (λ = {lams[m]:g})"
        ax.plot(steps, [v for _, v in curves[m]], label=m + lam, mew=1.3, **styles[m])
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test mean ‖∇ₓℓ_i‖²")
    ax.set_title("Input-gradient norm on the test part, training with each penalty (first replicate)", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    ctx.figure(fig, "penalized", "Input-gradient norm on the test part while training with each penalty at its λ "
               "chosen on validation (first replicate; the table gives every replicate's end point); exact "
               "penalties: solid, filled markers; finite-difference (FD): dashed, hollow markers, drawn slightly to "
               "the right where they would hide the exact ones.")


# ------------------------------------------------------------------ 4. FD accuracy
EPS_LIST = [1e-1, 1e-2, 1e-3, 1e-4]


def _fd_errors(seed: int, data: Data) -> list[list[Any]]:
    """Relative error of the finite-difference penalty gradients against the exact ones, per ε (digits MLP at init)."""
    Xtr, ytr = data[0], data[3]
    xb, yb = Xtr[:64], ytr[:64]
    flat = lambda gs: torch.cat([t.flatten() for t in gs])  # noqa: E731
    rows = []
    for act in ("tanh", "relu"):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(seed)
            a = ACTS[act]
            model = nn.Sequential(nn.Linear(64, 128), a(), nn.Linear(128, 128), a(), nn.Linear(128, 10)).to(dtype)
            ps = list(model.parameters())
            x, y = xb.to(dtype), yb
            f = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
            ex_in = flat(torch.autograd.grad(input_grad_norm2(f, x).mean(), ps))
            loss = F.cross_entropy(model(x), y)
            ex_p = flat(torch.autograd.grad(param_grad_norm2(loss, ps), ps))
            e_in, e_p = [], []
            for eps in EPS_LIST:
                fd_in = flat(torch.autograd.grad(
                    input_grad_norm2(f, x, method="finite_difference", eps=eps, normalize=True).mean(), ps))
                e_in.append(float((fd_in - ex_in).norm() / ex_in.norm()))
                out = param_penalty_grads_fd(lambda: F.cross_entropy(model(x), y), ps, eps=eps, normalize=True)
                e_p.append(float((flat(out.penalty_grads) - ex_p).norm() / ex_p.norm()))
            name = str(dtype).replace("torch.", "")
            rows.append([f"{act}, {name}, input", *e_in])
            rows.append([f"{act}, {name}, param", *e_p])
    return rows


def _report_fd(ctx: Context, rows: list[list[Any]]) -> None:
    ctx.table(
        ["network, dtype, penalty", *[f"ε={e:g}" for e in EPS_LIST]],
        rows,
        caption="**4. Finite-difference error.** Relative error ‖FD − exact‖/‖exact‖ of the penalty's gradient w.r.t. θ "
        "(digits MLP at init, 64 examples, step length ε). Smooth (tanh): O(ε) until round-off takes over (float32 "
        "below ~1e-3). ReLU: a step that crosses an activation kink picks up the gradient's jump divided by ε, which "
        "double backprop does not see, so the error does not shrink with ε until ε is below the distance to the "
        "nearest kink of the batch — use smooth activations (or a tiny ε in float64) with finite-difference penalties.",
    )
    ctx.result("fd_error", {r[0]: dict(zip([str(e) for e in EPS_LIST], r[1:])) for r in rows})


def inequality_verdict(violations: int, n_examples: int) -> str:
    """The note's inequality: held when no example of the random MLPs violates it (beyond round-off)."""
    if n_examples <= 0:
        return "not measured"
    return "held" if violations == 0 else "not held"


def _claims(ctx: Context, m: dict[str, Any], along: dict[str, Any], pen: dict[str, Any]) -> None:
    n, viol = m["n_examples"], m["viol_s"] + m["viol_f"]
    claim(ctx, "penalties", "‖∇ₓf‖² · Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇ₓh_t‖²) ≤ ‖∇_θ f‖²: the parameter-gradient "
          "penalty bounds the input-gradient penalty times a multiplier, for every MLP and input",
          inequality_verdict(viol, n), f"{plural(viol, 'violation')} in {n} examples of {m['n']} random float64 "
          f"MLPs; median tightness lhs/rhs {_q(m['ts'], 0.5):.3g} (spectral norms)", split="none", seeds=[ctx.seed])

    runs, cfg = along["runs"], along["cfg"]
    mult = along["multiplier"]
    late_ok = sum(s < SPREAD for s in mult["late"])
    v = constancy_verdict(mult)
    win = runs[0]["windows"]
    figure = (f"multiplier max/min over {plural(len(runs), 'run')} (lr {', '.join(f'{x:g}' for x in cfg['lrs'])} × "
              f"{plural(len(cfg['seeds']), 'replicate')}): whole run {fmt_spread(mult['whole run'], '.2f')}, early "
              f"window (steps {win['early']['from_step']}–{win['early']['to_step']}) "
              f"{fmt_spread(mult['early'], '.2f')}, late window (steps {win['late']['from_step']}–"
              f"{win['late']['to_step']}) {fmt_spread(mult['late'], '.2f')}; below {SPREAD:g}× late in "
              f"{late_ok}/{len(runs)} runs, over the whole run in {sum(s < SPREAD for s in mult['whole run'])}/"
              f"{len(runs)}")
    claim(ctx, "penalties", f"The multiplier Σ_t(…) stays nearly constant (max/min < {SPREAD:g}×) during SGD training "
          "(held: over the whole run; partly held: only after the initial transient)", v, figure, split="test",
          seeds=cfg["seeds"], command=None if len(runs) >= MIN_SEEDS else full_command("penalties"))

    res = pen["res"]
    seeds = pen["cfg"]["seeds"]
    gx = {k: [x["gx"] for x in res[k]] for k in ("none", "param exact", "input exact", "param batch-mean")}
    iv = paired(gx["param exact"], gx["none"], log=True)
    figure = (f"test ‖∇ₓℓ‖² with the per-example parameter penalty (λ = {pen['lams']['param exact']:g}, chosen on "
              f"validation) ÷ without: {fmt_interval(iv, '.2f', ratio=True)}; batch-mean ‖∇_θL‖² penalty "
              f"(λ = {pen['lams']['param batch-mean']:g}): "
              f"{fmt_interval(paired(gx['param batch-mean'], gx['none'], log=True), '.2f', ratio=True)}; the input "
              f"penalty itself: {fmt_interval(paired(gx['input exact'], gx['none'], log=True), '.2f', ratio=True)}")
    claim(ctx, "penalties", "So penalizing the parameter gradient also penalizes the input gradient: training with "
          "the per-example parameter penalty ends with a smaller input-gradient norm on test images than training "
          "without", outcome(iv, below=0.0), figure, split="test", seeds=seeds,
          command=None if len(seeds) >= MIN_SEEDS else full_command("penalties"))


def run(ctx: Context) -> None:
    seconds = {}
    t0 = time.perf_counter()
    m = _tightness(ctx, n=ctx.pick(40, 1000, 5000), batch=ctx.pick(4, 16, 32))
    _report_random_mlps(ctx, m)
    seconds["random_mlps"] = time.perf_counter() - t0
    t = time.perf_counter()
    along = _along_training(ctx)
    seconds["along_training"] = time.perf_counter() - t
    t = time.perf_counter()
    pen = _with_penalties(ctx)
    seconds["with_penalties"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx.phase("penalties: finite-difference errors")
    _report_fd(ctx, _fd_errors(ctx.seed, _digits(ctx.seed)))
    seconds["fd_error"] = time.perf_counter() - t
    _claims(ctx, m, along, pen)
    ctx.result("timings", seconds)
