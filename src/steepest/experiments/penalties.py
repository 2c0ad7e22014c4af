"""Input-gradient vs parameter-gradient penalty: the inequality between them, checked and used.

The note: Su, *An inequality between input-gradient and parameter-gradient
penalties*, kexue.fm/archives/8796.

1. The inequality ``‖∇_x f‖² Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_θ f‖²`` on random
   MLPs in float64: violations and the distribution of the tightness lhs/rhs.
2. Its factors along SGD training of a digits MLP: does the multiplier stay
   "nearly constant" (the note's claim), so that the parameter penalty tracks the
   input penalty?
3. Training with each penalty (input / parameter, exact / finite difference) vs
   none: test accuracy, final input-gradient norm, cost per step; and the
   finite-difference error against the exact penalty gradient.

Each part measures into plain data (``_tightness``, ``_train_and_probe``,
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
from ..report import Context, measure, plural
from . import claim
from ._data import digits_split

TITLE = "Input vs parameter gradient penalty"
# Tiny tensors: intra-op threads only add synchronisation cost.
THREADS = 1

SPREAD = 2.0  # "nearly constant": max/min over training below this
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}
RTOL = 1e-9  # float64 round-off allowance when counting violations
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, x_test, y_train, y_test


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
    Xtr, ytr, Xte, yte = digits_split(0.25, seed)
    return Xtr, Xte, ytr, yte


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


def _train_and_probe(ctx: Context, data: Data, steps: int, every: int, n_probe: int, lr: float, bs: int
                     ) -> tuple[dict[str, list], float]:
    """Plain SGD on the digits MLP, the bound probed every ``every`` steps; the history and final test accuracy."""
    Xtr, Xte, ytr, yte = data
    model = _digits_mlp(ctx.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    probe_x, probe_y = Xtr[:n_probe].double(), ytr[:n_probe]
    hist: dict[str, list] = {k: [] for k in ("step", "lhs", "rhs", "gx2", "mult", "tight", "h", "W", "J")}
    for step in ctx.track(range(steps + 1), "digits MLP, SGD"):
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
    """max / min over the run."""
    return float(np.max(a) / np.min(a))


def _training_summary(hist: dict[str, list]) -> dict[str, Any]:
    """Arrays of the history, the spreads over the run and the two verdicts (factors constant; penalties track)."""
    s = {k: np.array(hist[k]) for k in hist}
    H, W, J = s["h"], s["W"], s["J"]
    s["ratio"] = s["rhs"] / s["gx2"]
    factor_spread = max(_spread(H[:, t]) for t in range(H.shape[1]))
    factor_spread = max(factor_spread, *(_spread(W[:, t]) for t in range(W.shape[1])))
    s["factor_spread"] = max(factor_spread, *(_spread(J[:, t]) for t in range(1, J.shape[1])), 1.0)
    s["corr"] = float(np.corrcoef(np.log(s["gx2"]), np.log(s["rhs"]))[0, 1])
    s["factors_const"] = s["factor_spread"] < SPREAD and _spread(s["mult"]) < SPREAD
    s["tracks"] = _spread(s["ratio"]) < SPREAD
    return s


def _factor_rows(s: dict[str, Any]) -> list[list[Any]]:
    """One row per quantity: value at the first and last probe, spread over the run."""
    H, W, J, mult, gx2, rhs, ratio = (s[k] for k in ("h", "W", "J", "mult", "gx2", "rhs", "ratio"))
    rows = [[f"‖h_{t + 1}‖ (RMS)", H[0, t], H[-1, t], _spread(H[:, t])] for t in range(H.shape[1])]
    rows += [[f"‖W_{t + 1}‖ (spectral)", W[0, t], W[-1, t], _spread(W[:, t])] for t in range(W.shape[1])]
    rows += [[f"‖∇ₓh_{t + 1}‖ (RMS of spectral)", J[0, t], J[-1, t], _spread(J[:, t])] for t in range(1, J.shape[1])]
    tight = s["tight"]
    return rows + [
        ["multiplier Σ_t (1+‖h‖²)/(‖W‖²‖∇ₓh‖²) (median)", mult[0], mult[-1], _spread(mult)],
        ["input penalty ‖∇ₓℓ‖² (mean)", gx2[0], gx2[-1], _spread(gx2)],
        ["parameter penalty ‖∇_θℓ‖² (mean)", rhs[0], rhs[-1], _spread(rhs)],
        ["ratio param / input penalty", ratio[0], ratio[-1], _spread(ratio)],
        ["tightness lhs/rhs (median)", float(tight[0]), float(tight[-1]), _spread(tight)],
    ]


def _report_along_training(ctx: Context, s: dict[str, Any], acc: float, cfg: dict[str, Any]) -> None:
    steps = cfg["steps"]
    ctx.text(
        f"**2. Along training.** MLP 64-128-128-10 (tanh) on sklearn digits (1347 train / 450 test, pixels/16), "
        f"plain SGD lr {cfg['lr']}, batch {cfg['bs']}, {steps} steps, final test accuracy {acc:.3f}. Every "
        f"{cfg['every']} steps the bound is evaluated in float64 on {cfg['n_probe']} fixed training examples with "
        "f = the per-example cross-entropy. 'max/min' is the spread of a quantity over the whole run."
    )
    ctx.table(["quantity", "at step 0", f"at step {steps}", "max/min over the run"], _factor_rows(s))
    ctx.text(
        f"Against the note's claim. (a) *The factors stay nearly constant*: ‖h_t‖, ‖W_t‖, ‖∇ₓh_t‖ change by up to "
        f"{s['factor_spread']:.2f}× over the run and the multiplier Σ_t(…) by {_spread(s['mult']):.2f}× (nearly "
        f"constant would be < {SPREAD:g}×). (b) *So the parameter penalty tracks the input penalty*: the input penalty "
        f"spans {_spread(s['gx2']):.3g}×, the parameter penalty {_spread(s['rhs']):.3g}×, their ratio "
        f"{_spread(s['ratio']):.3g}× (correlation of their logs over the run {s['corr']:.3f}); the tightness lhs/rhs "
        f"itself moves {_spread(s['tight']):.3g}×. "
        + (
            f"The ratio stays within {SPREAD:g}×: here the two penalties are interchangeable up to a nearly fixed factor."
            if s["tracks"]
            else "A constant multiplier would only pin the lower bound lhs to the input penalty; the bound's slack "
            "(tightness) changes during training, so the parameter penalty is not a fixed multiple of the input "
            "penalty — it bounds it, it does not track it."
        )
    )
    _plot_along_training(ctx, s)
    ctx.result(
        "along_training",
        {
            "steps": steps,
            "test_acc": acc,
            "max_factor_spread": s["factor_spread"],
            "multiplier_spread": _spread(s["mult"]),
            "input_penalty_spread": _spread(s["gx2"]),
            "param_penalty_spread": _spread(s["rhs"]),
            "ratio_spread": _spread(s["ratio"]),
            "log_corr": s["corr"],
            "tightness_spread": _spread(s["tight"]),
            "factors_nearly_constant": s["factors_const"],
            "param_tracks_input": s["tracks"],
        },
    )


def _plot_along_training(ctx: Context, s: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    x = s["step"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.6), sharex=True)
    ax = axes[0, 0]
    ax.plot(x, s["lhs"], marker="o", ms=3, label="lhs of the bound")
    ax.plot(x, s["rhs"], marker="s", ms=3, label="rhs = parameter penalty ‖∇_θℓ‖²")
    ax.plot(x, s["gx2"], marker="^", ms=3, label="input penalty ‖∇ₓℓ‖²")
    ax.set_yscale("log")
    ax.set_ylabel("mean over the probe examples")
    for ax, arr, name, start in ((axes[0, 1], s["h"], "‖h_t‖ (RMS over examples)", 0),
                                 (axes[0, 2], s["W"], "‖W_t‖₂ (spectral norm)", 0),
                                 (axes[1, 0], s["J"], "‖∇ₓh_t‖₂ (RMS over examples)", 1)):
        for t in range(start, arr.shape[1]):  # one marker shape per layer: close lines stay apart
            ax.plot(x, arr[:, t], marker="os^D"[t % 4], ms=4 + (t % 2), mfc="none" if t % 2 else None,
                    label=f"layer t = {t + 1}")
        ax.set_ylabel(name)
    ax = axes[1, 1]
    ax.plot(x, s["mult"], marker="o", ms=3, label="multiplier Σ_t(…) (median)")
    ax.plot(x, s["ratio"], marker="s", ms=3, label="parameter ÷ input penalty")
    ax.set_yscale("log")
    ax.set_ylabel("multiplier and penalty ratio")
    ax = axes[1, 2]
    ax.plot(x, s["tight"], marker="o", ms=3, color="C2", label="tightness lhs/rhs (median)")
    ax.set_ylabel("tightness lhs / rhs")
    for ax in axes.flat:
        ax.grid(alpha=0.25)
        ax.legend(fontsize=9, loc="center right" if ax is axes[1, 1] else "best")  # its top-left holds data
    for ax in axes[1]:
        ax.set_xlabel("SGD step")
    fig.tight_layout()
    ctx.figure(fig, "training", "Both sides of the bound and its per-layer factors along SGD training of the digits "
               "MLP (h_t: input of the t-th Linear layer, W_t its weight); the note's claim needs the multiplier "
               f"(bottom middle) to stay within {SPREAD:g}×.")


def _along_training(ctx: Context, data: Data) -> dict[str, Any]:
    cfg = {"steps": ctx.pick(60, 1500, 6000), "every": ctx.pick(20, 50, 100), "lr": 0.05, "bs": 32,
           "n_probe": ctx.pick(64, 256, 512)}
    hist, acc = _train_and_probe(ctx, data, cfg["steps"], cfg["every"], cfg["n_probe"], cfg["lr"], cfg["bs"])
    summary = _training_summary(hist)
    _report_along_training(ctx, summary, acc, cfg)
    return {"multiplier_spread": _spread(summary["mult"]), "steps": cfg["steps"]}


# ------------------------------------------------------------------ 3. training with penalties
LAM = {"input": 0.1, "param": 0.3}
FD_EPS = 1e-2  # step length (normalize=True) in input / parameter space


def _step_fn(method: str, model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    ps = list(model.parameters())

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        if method == "none":
            F.cross_entropy(model(xb), yb).backward()
        elif method.startswith("input"):
            f = lambda x: F.cross_entropy(model(x), yb, reduction="none")  # noqa: E731
            kw = {"method": "finite_difference", "eps": FD_EPS, "normalize": True} if method == "input FD" else {}
            pen, ell = input_grad_norm2(f, xb, return_output=True, **kw)
            (ell.mean() + LAM["input"] * pen.mean()).backward()
        elif method == "param exact":
            loss = F.cross_entropy(model(xb), yb)
            (loss + LAM["param"] * param_grad_norm2(loss, ps)).backward()
        else:
            out = param_penalty_grads_fd(lambda: F.cross_entropy(model(xb), yb), ps, eps=FD_EPS, normalize=True)
            for p, gi, pi in zip(ps, out.grads, out.penalty_grads):
                p.grad = gi + LAM["param"] * pi
        opt.step()

    return step


METHODS = ["none", "input exact", "input FD", "param exact", "param FD"]


def _train_penalized(method: str, data: Data, seed: int, steps: int, every: int, lr: float, bs: int
                     ) -> tuple[float, list[tuple[int, float]], float]:
    """Train with one penalty; test accuracy, test input-gradient norm² over training, final geometric complexity."""
    Xtr, Xte, ytr, yte = data
    model = _digits_mlp(100 + seed)
    step = _step_fn(method, model, torch.optim.SGD(model.parameters(), lr=lr))
    g = torch.Generator().manual_seed(200 + seed)
    curve = []
    for k in range(steps):
        if k % every == 0:
            curve.append((k, _input_grad_mean(model, Xte, yte)))
        idx = torch.randint(0, Xtr.shape[0], (bs,), generator=g)
        step(Xtr[idx], ytr[idx])
    curve.append((steps, _input_grad_mean(model, Xte, yte)))
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    return acc, curve, _jacobian_gc(model, Xte)


def _step_costs(seed: int, data: Data, bs: int, warmup: int, repeat: int) -> dict[int, dict[str, float]]:
    """Median seconds of one training step per method, on one fixed batch, at widths 128 and 1024."""
    Xtr, _, ytr, _ = data
    xb, yb = Xtr[:bs], ytr[:bs]
    cost: dict[int, dict[str, float]] = {}
    for width in (128, 1024):
        cost[width] = {}
        for method in METHODS:
            model = _digits_mlp(seed, width)
            step = _step_fn(method, model, torch.optim.SGD(model.parameters(), lr=1e-4))
            cost[width][method] = measure(lambda: step(xb, yb), warmup=warmup, repeat=repeat)["median"]
    return cost


def _with_penalties(ctx: Context, data: Data) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    cfg = {"steps": ctx.pick(40, 1200, 4000), "seeds": ctx.pick([0], [0, 1], [0, 1, 2, 3, 4]), "lr": 0.05, "bs": 32}
    every = max(cfg["steps"] // 12, 1)
    res: dict[str, dict[str, list[float]]] = {m: {"acc": [], "gx": [], "gc": []} for m in METHODS}
    curves: dict[str, list[list[tuple[int, float]]]] = {m: [] for m in METHODS}
    jobs = [(method, ctx.seed, ctx.seed + seed, cfg["steps"], every, cfg["lr"], cfg["bs"])
            for seed in cfg["seeds"] for method in METHODS]
    for (method, *_), (acc, curve, gc) in zip(jobs, ctx.map_ordered(_penalized_job, jobs, "penalties: training runs")):
        curves[method].append(curve)
        res[method]["acc"].append(acc)
        res[method]["gx"].append(curve[-1][1])
        res[method]["gc"].append(gc)
    ctx.phase("penalties: timing one training step per penalty")
    cost = _step_costs(ctx.seed, data, cfg["bs"], warmup=ctx.pick(1, 5, 20), repeat=ctx.pick(3, 11, 100))
    _report_penalties(ctx, res, cost, cfg)
    _plot_penalized(ctx, curves)
    return res, cfg


def _penalized_job(job: tuple[str, int, int, int, int, float, int]) -> tuple[float, list[tuple[int, float]], float]:
    """One training run with one penalty; self-contained (loads the split, seeds itself) for a worker process."""
    method, split_seed, seed, steps, every, lr, bs = job
    return _train_penalized(method, _digits(split_seed), seed, steps, every, lr, bs)


def _report_penalties(ctx: Context, res: dict[str, dict[str, list[float]]], cost: dict[int, dict[str, float]],
                      cfg: dict[str, Any]) -> None:
    rows = []
    for m in METHODS:
        r = res[m]
        lam = "" if m == "none" else f"{LAM[m.split()[0]]:g}"
        rows.append([m, lam, float(np.mean(r["acc"])), float(np.min(r["acc"])), float(np.mean(r["gx"])),
                     float(np.mean(r["gc"])), cost[128][m] * 1e3, cost[128][m] / cost[128]["none"],
                     cost[1024][m] * 1e3, cost[1024][m] / cost[1024]["none"]])
    ctx.text(
        f"**3. Training with each penalty.** Same MLP and SGD (lr {cfg['lr']}, batch {cfg['bs']}, {cfg['steps']} "
        f"steps), averaged over {plural(len(cfg['seeds']), 'seed')} (same init and batches across methods). Input penalty: "
        "λ·mean_i ‖∇_{x_i} ℓ_i‖²; parameter penalty: λ·‖∇_θ L‖² of the batch-mean loss L. FD = finite difference "
        f"with a step of length {FD_EPS:g} (normalize=True). 'input-grad norm²' = mean over the test set of "
        "‖∇ₓℓ_i‖²; 'GC' = geometric complexity, mean ‖∂logits/∂x‖_F². Cost = median wall time of one training step "
        "on one batch of 32 (single thread), all measured in this run, for the trained width 128 and for width 1024."
    )
    ctx.table(["penalty", "λ", "test acc", "worst seed", "input-grad norm²", "GC", "ms/step (w128)", "× none",
               "ms/step (w1024)", "× none"], rows, caption="Training with each penalty (λ: its weight).", timing=True)
    ctx.result("with_penalties", {m: {"test_acc": rows[i][2], "worst_seed_acc": rows[i][3],
                                      "input_grad_norm2": rows[i][4], "gc": rows[i][5], "ms_per_step_w128": rows[i][6],
                                      "ms_per_step_w1024": rows[i][8]} for i, m in enumerate(METHODS)})


def _plot_penalized(ctx: Context, curves: dict[str, list[list[tuple[int, float]]]]) -> None:
    import matplotlib.pyplot as plt

    # exact and finite-difference versions of a penalty nearly coincide: solid filled markers for exact,
    # dashed hollow bigger markers for FD, and FD drawn a little to the right
    styles = {"none": dict(color="k", marker="o", ls="-", mfc="k", ms=5),
              "input exact": dict(color="C0", marker="o", ls="-", mfc="C0", ms=5),
              "input FD": dict(color="C0", marker="s", ls="--", mfc="none", ms=8),
              "param exact": dict(color="C3", marker="^", ls="-", mfc="C3", ms=5),
              "param FD": dict(color="C3", marker="D", ls="--", mfc="none", ms=8)}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    last = max(k for k, _ in curves["none"][0])
    for m in METHODS:
        arr = np.array([[v for _, v in c] for c in curves[m]])
        steps = np.array([k for k, _ in curves[m][0]], dtype=float) + (0.006 * last if "FD" in m else 0.0)
        lam = "" if m == "none" else f" (λ = {LAM[m.split()[0]]:g})"
        ax.plot(steps, arr.mean(0), label=m + lam, mew=1.3, **styles[m])
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test mean ‖∇ₓℓ_i‖²")
    ax.set_title(f"Input-gradient norm on the test set, training with each penalty ({plural(len(curves['none']), 'seed')})",
                 fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    ctx.figure(fig, "penalized", "Input-gradient norm on the test set while training with each penalty (mean over "
               "seeds); exact penalties: solid, filled markers; finite-difference (FD): dashed, hollow markers, "
               "drawn slightly to the right where they would hide the exact ones.")


# ------------------------------------------------------------------ 4. FD accuracy
EPS_LIST = [1e-1, 1e-2, 1e-3, 1e-4]


def _fd_errors(seed: int, data: Data) -> list[list[Any]]:
    """Relative error of the finite-difference penalty gradients against the exact ones, per ε (digits MLP at init)."""
    Xtr, _, ytr, _ = data
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


def tracking_verdict(multiplier_spread: float, gx_param: list[float], gx_none: list[float]) -> str:
    """"The multiplier stays nearly constant, so the parameter penalty also penalizes the input gradient."

    Two measured parts: the multiplier's max/min over training below :data:`SPREAD`; training with the
    parameter penalty ends with a smaller test input-gradient norm than training without, in every seed
    (paired: same initialization and batches). held: both; partly held: one; not held: neither.
    """
    if not gx_param or len(gx_param) != len(gx_none) or not math.isfinite(multiplier_spread):
        return "not measured"
    constant = multiplier_spread < SPREAD
    lowers = all(p < n for p, n in zip(gx_param, gx_none))
    return "held" if constant and lowers else ("partly held" if constant or lowers else "not held")


def _claims(ctx: Context, m: dict[str, Any], along: dict[str, Any], res: dict[str, dict[str, list[float]]],
            cfg: dict[str, Any]) -> None:
    n, viol = m["n_examples"], m["viol_s"] + m["viol_f"]
    claim(ctx, "penalties", "‖∇ₓf‖² · Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇ₓh_t‖²) ≤ ‖∇_θ f‖²: the parameter-gradient "
          "penalty bounds the input-gradient penalty times a multiplier, for every MLP and input",
          inequality_verdict(viol, n), f"{plural(viol, 'violation')} in {n} examples of {m['n']} random float64 "
          f"MLPs; median tightness lhs/rhs {_q(m['ts'], 0.5):.3g} (spectral norms)", split="none", seeds=[ctx.seed])
    none, par, inp = (res[k]["gx"] for k in ("none", "param exact", "input exact"))
    ratio = float(np.mean(par) / np.mean(none))
    lower = sum(p < q for p, q in zip(par, none))
    claim(ctx, "penalties", "The multiplier Σ_t(…) stays nearly constant during training, so penalizing the "
          "parameter gradient also penalizes the input gradient",
          tracking_verdict(along["multiplier_spread"], par, none),
          f"the multiplier varies {along['multiplier_spread']:.3g}× over {along['steps']} SGD steps (nearly constant: "
          f"< {SPREAD:g}×); training with the parameter penalty (λ = {LAM['param']:g}) ends with a test ‖∇ₓℓ‖² "
          f"{ratio:.2f}× that of no penalty ({lower}/{len(par)} seeds lower; the input penalty itself: "
          f"{float(np.mean(inp) / np.mean(none)):.2f}×)", split="test", seeds=[ctx.seed + s for s in cfg["seeds"]])


def run(ctx: Context) -> None:
    seconds = {}
    t0 = time.perf_counter()
    m = _tightness(ctx, n=ctx.pick(40, 1000, 5000), batch=ctx.pick(4, 16, 32))
    _report_random_mlps(ctx, m)
    seconds["random_mlps"] = time.perf_counter() - t0
    data = _digits(ctx.seed)
    t = time.perf_counter()
    along = _along_training(ctx, data)
    seconds["along_training"] = time.perf_counter() - t
    t = time.perf_counter()
    res, cfg = _with_penalties(ctx, data)
    seconds["with_penalties"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx.phase("penalties: finite-difference errors")
    _report_fd(ctx, _fd_errors(ctx.seed, data))
    seconds["fd_error"] = time.perf_counter() - t
    _claims(ctx, m, along, res, cfg)
    ctx.result("timings", seconds)
