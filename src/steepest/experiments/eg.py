"""Exponentiated gradient: EGD under constraints, and EG step sizes against a mis-set lr.

The note: Su, *Exponentiated gradient descent + meta-learning = adaptive learning
rates*, kexue.fm/archives/8968.

Part 1 — non-negative least squares and mixture weights on the simplex: EGD
(:func:`steepest.optim.egd_step`) against projected gradient descent, objective gap
to an independent optimum (``scipy.optimize.nnls``; SLSQP polished by EM for the
mixture) versus step. Each method gets the best step size of the same grid.

Part 2 — learning-rate robustness on a digits MLP (sklearn ``load_digits``, fixed
60/20/20 split): final validation loss versus the initial lr over ×0.01 … ×100 of
the tuned lr, for SGD, :class:`~steepest.optim.EGStepSize` (three granularities),
:class:`~steepest.optim.EGDD`, :class:`~steepest.optim.HypergradientSGD`, Adam,
and the note's rule on top of Adam; plus the learned rates over time.

Measuring (``_best_runs``, ``_tune``, ``_lr_grid``, ``_goal``, ``_kappa_runs``) returns
plain data; the ``_report_*`` / ``_plot_*`` functions write it through the context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..optim import EGDD, EGStepSize, HypergradientSGD, egd_step
from ..report import Context
from ._data import digits_permutation_split

TITLE = "Exponentiated gradient: EGD under constraints and EG step sizes against a mis-set learning rate"
# Tiny models: one intra-op thread is faster and leaves the other core free.
THREADS = 1

# Rate-of-adaptation constants κ: γ = κ / (size of g_{t−1}·g_t at initialization), see _methods.
# Picked once in a preliminary sweep on this task (seed 0); full mode reruns the sweep.
KAPPA = {"coordinate": 0.003, "tensor": 0.1, "global": 0.1, "hd": 0.1, "adam_note": 0.1, "adam_hyper": 0.1}
DIVERGED = 5.0  # a final validation loss above this (or NaN/Inf) counts as diverged; log(10) ≈ 2.3 is chance
# the note's rule ν ← ν·exp(γ⟨g_{t−1}, g_t⟩) applied to Adam's lr
ADAM_NOTE = "Adam + note's rule"


# =========================================================================== part 1: constrained problems
def _project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008, sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    ok = u - css / k > 0
    ok[0] = True  # always true in exact arithmetic; rounding can lose it for huge inputs
    rho = int(torch.nonzero(ok).max())
    return (v - css[rho] / (rho + 1)).clamp(min=0.0)


def _nnls_problem(rng: np.random.Generator, m: int, n: int) -> dict[str, Any]:
    from scipy.optimize import nnls

    # correlated columns so the problem is not trivially conditioned
    A = rng.normal(size=(m, n)) @ (np.eye(n) + 0.3 * rng.normal(size=(n, n)) / math.sqrt(n))
    x_true = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.5, 2.0, n))
    b = A @ x_true + 0.5 * rng.normal(size=m)
    x_star, _ = nnls(A, b, maxiter=50 * n)
    def f(x: np.ndarray) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # diverging step sizes: inf is the answer
            v = 0.5 * float(np.sum((A @ x - b) ** 2))
        return v if math.isfinite(v) else math.inf

    At, bt = torch.tensor(A), torch.tensor(b)

    def grad(x: torch.Tensor) -> torch.Tensor:
        return At.T @ (At @ x - bt)

    return dict(
        name="NNLS  min ½‖Ax − b‖², x ≥ 0",
        short="nnls",
        f=lambda x: f(x.numpy()),
        grad=grad,
        f_star=f(x_star),
        L=float(np.linalg.norm(A, 2) ** 2),
        x0=torch.full((n,), 1.0, dtype=torch.float64),
        simplex=False,
        project=lambda x: x.clamp(min=0.0),
        active=int(np.sum(x_star == 0.0)),
        x_star=torch.tensor(x_star),
        n=n,
        reference="scipy.optimize.nnls",
    )


def _mixture_problem(rng: np.random.Generator, n_data: int, k: int) -> dict[str, Any]:
    from scipy.optimize import minimize

    mu = np.linspace(-4, 4, k)
    sd = 0.7
    w_true = np.zeros(k)
    w_true[rng.choice(k, 3, replace=False)] = rng.dirichlet(np.ones(3))
    comp = rng.choice(k, n_data, p=w_true)
    x = rng.normal(mu[comp], sd)
    P = np.exp(-0.5 * ((x[:, None] - mu[None, :]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    def f(w: np.ndarray) -> float:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # diverging PGD runs: inf is the answer
            v = -float(np.mean(np.log(P @ w)))
        return v if math.isfinite(v) else math.inf

    def g(w: np.ndarray) -> np.ndarray:
        return -np.mean(P / (P @ w)[:, None], axis=0)

    w0 = np.full(k, 1.0 / k)
    res = minimize(f, w0, jac=g, method="SLSQP", bounds=[(0, 1)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(k)}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    w = np.clip(res.x, 0, None)
    w = w / w.sum()
    for _ in range(5000):  # EM polish: monotone, converges to the (convex) optimum
        w = w * np.mean(P / (P @ w)[:, None], axis=0)
    f_star = min(f(w), f(np.clip(res.x, 1e-300, None) / np.clip(res.x, 1e-300, None).sum()))
    Pt = torch.tensor(P)
    H = P.T @ (P / ((P @ w0) ** 2)[:, None]) / n_data  # Hessian at the start
    return dict(
        name="mixture weights  min −mean log(Pw), w ∈ simplex",
        short="mixture",
        f=lambda wt: f(wt.numpy()),
        grad=lambda wt: -torch.mean(Pt / (Pt @ wt)[:, None], dim=0),
        f_star=f_star,
        L=float(np.linalg.eigvalsh(H).max()),
        x0=torch.tensor(w0),
        simplex=True,
        project=_project_simplex,
        active=int(np.sum(w < 1e-8)),
        x_star=torch.tensor(w),
        n=k,
        reference="SLSQP polished by 5000 EM steps",
    )


def _descend(prob: dict[str, Any], method: str, lr: float, steps: int) -> tuple[np.ndarray, torch.Tensor]:
    x = prob["x0"].clone()
    vals = np.empty(steps + 1)
    vals[0] = prob["f"](x)
    for t in range(steps):
        g = prob["grad"](x)
        if not bool(torch.isfinite(g).all()):
            vals[t + 1:] = math.inf
            break
        if method == "EGD":
            x = egd_step(x, g, lr=lr, simplex=prob["simplex"])
        else:
            x = prob["project"](x - lr * g)
        v = prob["f"](x)
        vals[t + 1] = v if math.isfinite(v) else math.inf
        if not math.isfinite(v):
            vals[t + 1:] = math.inf
            break
    return vals, x


def _constrained(ctx: Context) -> None:
    rng = np.random.default_rng(ctx.seed)
    steps = ctx.pick(60, 1500, 5000)
    probs = [_nnls_problem(rng, *ctx.pick((30, 15), (120, 60), (300, 150))),
             _mixture_problem(rng, ctx.pick(300, 2000, 10000), ctx.pick(6, 12, 20))]
    grid = ctx.pick([0.25, 1.0, 4.0, 16.0], [2.0**k for k in range(-6, 7)], [2.0**k for k in range(-6, 7)])  # c / L
    outcomes = []
    for prob in probs:
        runs = {(method, c): _descend(prob, method, c / prob["L"], steps)
                for method in ("EGD", "projected GD")
                for c in ctx.track(grid, f"{prob['short']}: {method} step grid")}
        outcomes.append(_best_runs(prob, runs))
    _report_constrained(ctx, probs, outcomes, grid, steps)


def _best_runs(prob: dict[str, Any], runs: dict[tuple[str, float], tuple[np.ndarray, torch.Tensor]]) -> dict[str, Any]:
    """Per method, the gap curve of its best step size; f* used for the gaps; EGD's coordinates that should be 0."""
    curves = {key: vals for key, (vals, _) in runs.items()}
    f_ref = prob["f_star"]
    # if an iterate beats the reference by rounding, measure from it (gaps stay >= 0)
    f_star = min(f_ref, min(float(np.min(v)) for v in curves.values()))
    floor = 1e-15 * max(1.0, abs(f_star))
    best: dict[str, tuple[tuple[float, float], np.ndarray, float]] = {}
    for (method, c), vals in curves.items():
        gap = np.maximum(vals - f_star, floor)
        # best = lowest final gap, ties (both at the floor) broken by the area under log(gap)
        key = (float(gap[-1]), float(np.sum(np.log(np.minimum(gap, 1e300)))))
        if method not in best or key < best[method][0]:
            best[method] = (key, gap, c)
    c_egd = best["EGD"][2]
    return {"f_ref": f_ref, "f_star": f_star, "best": {m: (gap, c) for m, (_, gap, c) in best.items()},
            "zeros": _zero_coordinates(prob, runs[("EGD", c_egd)][1], c_egd)}


def _zero_coordinates(prob: dict[str, Any], x_egd: torch.Tensor, c_egd: float) -> list[Any] | None:
    """Why EGD is slow where it is: coordinates whose optimum is 0 shrink by e^{−η g_i*} per step."""
    zero = prob["x_star"] <= (1e-8 if prob["simplex"] else 0.0)
    g_star = prob["grad"](prob["x_star"])
    if prob["simplex"]:
        g_star = g_star - g_star[~zero].mean()  # the simplex multiplier shifts all gradients
    if not bool(zero.any()):
        return None
    return [prob["short"], int(zero.sum()), float(g_star[zero].min()),
            float(c_egd / prob["L"] * g_star[zero].min()), float(x_egd[zero].max())]


def _report_constrained(ctx: Context, probs: list[dict[str, Any]], outcomes: list[dict[str, Any]],
                        grid: list[float], steps: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows: list[list[Any]] = []
    ref_rows: list[list[Any]] = []
    for prob, out, ax in zip(probs, outcomes, axes):
        f_star = out["f_star"]
        ref_rows.append([prob["short"], prob["reference"], out["f_ref"], out["f_ref"] - f_star])
        for method, (gap, c) in out["best"].items():
            ax.semilogy(gap, label=f"{method} (step {c:g}/L)")
            hit = np.nonzero(gap < 1e-6 * max(1.0, abs(f_star)))[0]
            rows.append([prob["short"], method, f"{c:g}/L", float(gap[steps // 10]), float(gap[-1]),
                         int(hit[0]) if hit.size else "never"])
            ctx.result(f"{prob['short']}_{method.replace(' ', '_')}", {
                "step_times_L": c, "final_gap": float(gap[-1]), "gap_curve": gap[:: max(1, steps // 200)].tolist()})
        ax.set_title(prob["name"], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"f − f*  (f* from {prob['reference']})")
        ax.legend(fontsize=8)
        ctx.result(f"{prob['short']}_f_star", f_star)
        ctx.result(f"{prob['short']}_active_constraints", prob["active"])
    ctx.figure(fig, "constrained", "Objective gap vs step: EGD against projected gradient descent "
               "(each with its best step size from the grid "
               f"{', '.join(f'{c:g}' for c in grid)} × 1/L; L = largest Hessian eigenvalue at the start)")
    ctx.table(["problem", "method", "best step", f"gap @ {steps // 10}", f"gap @ {steps}", "first step gap < 1e-6"],
              rows, caption="Constrained problems (gap relative to the independent optimum).")
    ctx.table(["problem", "reference optimum", "f*", "reference − best iterate"], ref_rows,
              caption="f* = min(independent reference, best iterate of any run).", floatfmt=".12g")
    ctx.text(
        f"NNLS: n = {probs[0]['n']}, {probs[0]['active']} coordinates of the nnls optimum sit exactly at 0. "
        f"Mixture: K = {probs[1]['n']} fixed Gaussian components, {probs[1]['active']} optimal weights < 1e-8. "
        "EGD keeps iterates strictly inside the feasible set (positive; on the simplex by renormalization), so "
        "a coordinate whose optimum is 0 only shrinks by the factor e^{−η g_i*} per step (g_i* its gradient at "
        "the optimum, the KKT multiplier; on the simplex relative to the mean over the support), while the "
        "projection sets it to 0 exactly. The table measures that rate and what is left of those coordinates.")
    why_rows = [out["zeros"] for out in outcomes if out["zeros"]]
    if why_rows:
        ctx.table(["problem", "zeros at the optimum", "min g_i* over them", "η·min g_i* (log-decay per step)",
                   "largest such x_i after EGD"], why_rows, caption="Coordinates that should be 0, under EGD.")
        ctx.result("egd_zero_coordinates", why_rows)


# =========================================================================== part 2: digits MLP
def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


class AdamEG:
    """Adam whose lr is multiplied by one EG-adapted rate ν (the note's rule applied on top of Adam).

    ``hyper=False``: the note's formula ν ← ν·exp(γ⟨g_{t−1}, g_t⟩) (raw consecutive gradients,
    what a reader of the note tried). ``hyper=True``: ν ← ν·exp(γ⟨u_{t−1}, g_t⟩) with u the previous
    Adam direction (update / lr) — the exact hypergradient of the loss w.r.t. ν, as in Adam-HD
    (Baydin et al. 2018) but multiplicative.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, gamma: float, hyper: bool = False) -> None:
        self.params = list(params)
        self.adam = torch.optim.Adam(self.params, lr=lr)
        self.lr, self.gamma, self.hyper, self.nu = lr, gamma, hyper, 1.0
        self.prev = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        self.adam.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        dot = sum(float(torch.sum(a * p.grad)) for a, p in zip(self.prev, self.params))
        if not math.isfinite(dot):
            raise ValueError("non-finite gradient")
        self.nu = min(self.nu * math.exp(min(self.gamma * dot, 50.0)), 1e30)
        eff = self.lr * self.nu
        self.adam.param_groups[0]["lr"] = eff
        old = [p.detach().clone() for p in self.params] if self.hyper else None
        self.adam.step()
        if self.hyper:
            for u, p, o in zip(self.prev, self.params, old):  # type: ignore[arg-type]
                u.copy_((o - p) / eff if eff > 0 else torch.zeros_like(p))
        else:
            for u, p in zip(self.prev, self.params):
                u.copy_(p.grad)


def _init_grad_sizes(data: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Sizes of g·g at initialization (full training batch), which set γ = κ / size."""
    model = _mlp(seed)
    loss = torch.nn.functional.cross_entropy(model(data["xtr"]), data["ytr"])
    gs = torch.autograd.grad(loss, list(model.parameters()))
    flat = torch.cat([g.flatten() for g in gs]).double()
    return {
        "coordinate": float(flat.pow(2).mean()),
        "tensor": float(np.mean([float(g.double().pow(2).sum()) for g in gs])),
        "global": float(flat.pow(2).sum()),
        "l1": float(flat.abs().sum()),
    }


def _train(data: dict[str, torch.Tensor], make: Callable[[Any], Any], *, epochs: int, batch: int, seed: int,
           probe: Callable[[Any, int], None] | None = None) -> dict[str, float]:
    model = _mlp(seed)
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    n = data["xtr"].shape[0]
    step = 0
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            b = order[i:i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data["xtr"][b]), data["ytr"][b])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            try:
                opt.step()
            except ValueError:  # non-finite gradient: the optimizers refuse it
                diverged = True
                break
            step += 1
            if probe is not None:
                probe(opt, step)
        if diverged:
            break
    with torch.no_grad():
        va = float(torch.nn.functional.cross_entropy(model(data["xva"]), data["yva"]))
        te = float(torch.nn.functional.cross_entropy(model(data["xte"]), data["yte"]))
        acc = float((model(data["xte"]).argmax(1) == data["yte"]).float().mean())
    if diverged or not math.isfinite(va) or va > DIVERGED:
        return {"val": math.inf, "test": math.inf, "test_acc": acc, "steps": step}
    return {"val": va, "test": te, "test_acc": acc, "steps": step}


def _methods(lr_sgd: float, lr_adam: float, sizes: dict[str, float], kappa: dict[str, float]
             ) -> dict[str, Callable[[float], Callable[[Any], Any]]]:
    """Method name → (lr multiplier → optimizer factory)."""
    g = {k: kappa[k] / sizes[k] for k in ("coordinate", "tensor", "global")}
    beta_hd = kappa["hd"] * lr_sgd / sizes["global"]
    return {
        "SGD": lambda m: lambda p: torch.optim.SGD(p, lr=lr_sgd * m),
        "EGStepSize coordinate": lambda m: lambda p: EGStepSize(p, lr=lr_sgd * m, gamma=g["coordinate"]),
        "EGStepSize tensor": lambda m: lambda p: EGStepSize(p, lr=lr_sgd * m, gamma=g["tensor"], granularity="tensor"),
        "EGStepSize global": lambda m: lambda p: EGStepSize(p, lr=lr_sgd * m, gamma=g["global"], granularity="global"),
        # momentum 0.9 multiplies the effective step by 10: lr·(1 − μ) matches SGD's step at ×1
        "EGDD": lambda m: lambda p: EGDD(p, lr=lr_sgd * m * 0.1, momentum=0.9),
        "SGD-HD": lambda m: lambda p: HypergradientSGD(p, lr=lr_sgd * m, hypergrad_lr=beta_hd),
        "Adam": lambda m: lambda p: torch.optim.Adam(p, lr=lr_adam * m),
        ADAM_NOTE: lambda m: lambda p: AdamEG(p, lr=lr_adam * m, gamma=kappa["adam_note"] / sizes["global"]),
        "Adam + EG hypergradient": lambda m: lambda p: AdamEG(p, lr=lr_adam * m, gamma=kappa["adam_hyper"] / sizes["l1"],
                                                               hyper=True),
    }


def _rate(opt: Any) -> float:
    """The current rate multiplier ν (geometric mean over coordinates) of an adaptive optimizer."""
    if isinstance(opt, EGStepSize):
        return opt.nu_stats()[0]["geo_mean"]
    if isinstance(opt, AdamEG):
        return opt.nu
    if isinstance(opt, HypergradientSGD):
        return opt.param_groups[0]["lr"] / opt.defaults["lr"] if opt.defaults["lr"] > 0 else math.nan
    if isinstance(opt, EGDD):
        vals = [float(torch.log(st["gain"]).mean() + torch.log(st["scale"])) for st in opt.state.values()]
        return math.exp(float(np.mean(vals))) if vals else 1.0
    return 1.0


def _fmt_loss(v: float) -> str:
    return "div" if not math.isfinite(v) else f"{v:.3f}"



def _robustness_setup(ctx: Context) -> dict[str, Any]:
    return {
        "epochs": ctx.pick(1, 15, 40),
        "batch": 64,
        "seeds": [ctx.seed + s for s in range(ctx.pick(1, 1, 3))],
        "mults": ctx.pick([0.1, 10.0], [0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0],
                          [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]),
        "sgd_grid": ctx.pick([1.0], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]),
        "adam_grid": ctx.pick([1e-2], [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
        "every": ctx.pick(1, 2, 5),  # steps between recorded rates (all of the first 10 are recorded)
    }


def _median_run(data: dict[str, torch.Tensor], make: Callable[[Any], Any], cfg: dict[str, Any],
                probe_for: Callable[[int], Any] | None = None) -> dict[str, float]:
    """Final val / test loss and test accuracy, median over the seeds (inf if any seed diverged)."""
    runs = [_train(data, make, epochs=cfg["epochs"], batch=cfg["batch"], seed=s,
                   probe=probe_for(s) if probe_for else None) for s in cfg["seeds"]]
    out = {}
    for k in ("val", "test", "test_acc"):
        vals = [r[k] for r in runs]
        out[k] = math.inf if any(not math.isfinite(v) for v in vals) else float(np.median(vals))
    return out


def _tune(ctx: Context, data: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    """Final losses over the base-lr grids of SGD and Adam: ``{lr: median run}`` each."""
    sgd = {lr: _median_run(data, lambda p, lr=lr: torch.optim.SGD(p, lr=lr), cfg)
           for lr in ctx.track(cfg["sgd_grid"], "tune SGD lr")}
    adam = {lr: _median_run(data, lambda p, lr=lr: torch.optim.Adam(p, lr=lr), cfg)
            for lr in ctx.track(cfg["adam_grid"], "tune Adam lr")}
    return sgd, adam


def _rate_recorder(traces: dict[tuple[str, float], list[tuple[int, float]]], name: str, m: float,
                   cfg: dict[str, Any]) -> Callable[[int], Any] | None:
    """Seed → probe that appends (step, ν) to ``traces[(name, m)]``, for the first seed at the traced multipliers."""
    if m not in cfg["trace_mults"]:
        return None

    def for_seed(s: int) -> Callable[[Any, int], None] | None:
        if s != cfg["seeds"][0]:
            return None
        rec: list[tuple[int, float]] = []
        traces[(name, m)] = rec

        def probe(opt: Any, step: int) -> None:
            if step <= 10 or step % cfg["every"] == 0:
                rec.append((step, _rate(opt)))
        return probe
    return for_seed


def _lr_grid(ctx: Context, data: dict[str, torch.Tensor], methods: dict[str, Callable], cfg: dict[str, Any]
             ) -> tuple[dict[str, dict[float, dict[str, float]]], dict[tuple[str, float], list[tuple[int, float]]]]:
    """Every method at every lr multiplier: ``grid[name][m]`` (median run) and the recorded rates."""
    traces: dict[tuple[str, float], list[tuple[int, float]]] = {}
    grid: dict[str, dict[float, dict[str, float]]] = {}
    cases = [(name, m) for name in methods for m in cfg["mults"]]
    for name, m in ctx.track(cases, "lr grid × methods"):
        grid.setdefault(name, {})[m] = _median_run(data, methods[name](m), cfg, _rate_recorder(traces, name, m, cfg))
    return grid, traces


def _goal(grid: dict[str, dict[float, dict[str, float]]], mults: list[float], tuned: float) -> dict[str, dict]:
    """At ×0.1 and ×10: the best of the EG family, its final val loss and whether it is within 10% of tuned SGD."""
    goal = {}
    eg_family = ["EGStepSize coordinate", "EGStepSize tensor", "EGStepSize global", "EGDD"]
    for m in (0.1, 10.0):
        if m not in mults:
            continue
        best = min(eg_family, key=lambda n: grid[n][m]["val"])
        v = grid[best][m]["val"]
        ratio = v / tuned if math.isfinite(v) else math.inf
        goal[f"x{m:g}"] = {"best": best, "val": v, "ratio_to_tuned_sgd": ratio, "within_10pct": ratio <= 1.1,
                           "sgd_val": grid["SGD"][m]["val"]}
    return goal


def _robustness(ctx: Context) -> None:
    data = digits_permutation_split(0)  # the split is fixed; seeds vary init and batch order
    cfg = _robustness_setup(ctx)
    cfg["trace_mults"] = [m for m in (0.01, 0.1, 1.0, 10.0) if m in cfg["mults"]]
    sgd_res, adam_res = _tune(ctx, data, cfg)
    lr_sgd = min(sgd_res, key=lambda k: sgd_res[k]["val"])
    lr_adam = min(adam_res, key=lambda k: adam_res[k]["val"])
    _report_tuning(ctx, sgd_res, adam_res, lr_sgd, lr_adam, cfg)
    tuned = sgd_res[lr_sgd]["val"]
    sizes = _init_grad_sizes(data, cfg["seeds"][0])
    grid, traces = _lr_grid(ctx, data, _methods(lr_sgd, lr_adam, sizes, KAPPA), cfg)
    mults = cfg["mults"]

    _plot_robustness(ctx, grid, mults, tuned, lr_sgd, lr_adam)
    goal = _goal(grid, mults, tuned)
    _report_goal(ctx, goal)
    rate_rows = _plot_rates(ctx, grid, traces, cfg["trace_mults"])
    if rate_rows:
        ctx.table(["method", "initial lr", "final ν", "final lr ÷ tuned lr", "min ν", "max ν", "last step",
                   "final val loss"], rate_rows,
                  caption=f"Learned rates (seed {cfg['seeds'][0]}). 'final lr ÷ tuned lr' = multiplier × final ν: "
                          "close to 1 means the rule found its way back to the tuned rate. The Adam rows answer "
                          "whether the rate collapses to 0 when the note's rule sits on top of Adam.")
        ctx.result("rates", [dict(zip(["method", "initial", "final_nu", "final_over_tuned", "min_nu", "max_nu",
                                       "last_step", "val"], r)) for r in rate_rows])
        _findings(ctx, grid, mults, tuned, traces)

    ctx.result("lr_sgd_tuned", lr_sgd)
    ctx.result("lr_adam_tuned", lr_adam)
    ctx.result("tuned_sgd_val_loss", tuned)
    ctx.result("kappa", KAPPA)
    ctx.result("gammas", {k: KAPPA[k] / sizes[k] for k in ("coordinate", "tensor", "global")})
    ctx.result("lr_grid", {name: {f"x{m:g}": res[m] for m in mults} for name, res in grid.items()})
    ctx.result("goal", goal)
    ctx.result("rate_traces", {f"{n} x{m:g}": rec[:: max(1, len(rec) // 100)] for (n, m), rec in traces.items()})
    _report_setup(ctx, cfg, lr_sgd, lr_adam)
    if ctx.full:
        rows, out = _kappa_runs(ctx, data, lr_sgd, lr_adam, sizes, cfg)
        _report_kappa(ctx, rows, out, cfg)


def _report_tuning(ctx: Context, sgd_res: dict, adam_res: dict, lr_sgd: float, lr_adam: float,
                   cfg: dict[str, Any]) -> None:
    rows = [["SGD", lr, _fmt_loss(r["val"]), "←" if lr == lr_sgd else ""] for lr, r in sgd_res.items()]
    rows += [["Adam", lr, _fmt_loss(r["val"]), "←" if lr == lr_adam else ""] for lr, r in adam_res.items()]
    ctx.table(["optimizer", "lr", "final val loss", "tuned"], rows,
              caption=f"Tuning the base learning rates ({cfg['epochs']} epochs, batch {cfg['batch']}, median over "
                      f"{len(cfg['seeds'])} seed(s)).")


def _plot_robustness(ctx: Context, grid: dict[str, dict[float, dict[str, float]]], mults: list[float],
                     tuned: float, lr_sgd: float, lr_adam: float) -> None:
    """Final val loss vs lr multiplier: the figure and its table."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"SGD": "k-o", "EGStepSize coordinate": "C0-s", "EGStepSize tensor": "C1-s", "EGStepSize global": "C2-s",
              "EGDD": "C3-^", "SGD-HD": "C4-v", "Adam": "C5--o", ADAM_NOTE: "C6--D",
              "Adam + EG hypergradient": "C7--D"}
    for name, res in grid.items():
        y = [res[m]["val"] for m in mults]
        ax.plot(mults, [v if math.isfinite(v) else DIVERGED for v in y], styles[name], label=name, ms=5, alpha=0.85)
    ax.axhline(tuned, color="k", lw=0.8, ls=":")
    ax.axhspan(tuned, 1.1 * tuned, color="k", alpha=0.08, label="tuned SGD … +10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=DIVERGED * 1.3)
    ax.set_xlabel(f"initial lr ÷ tuned lr  (tuned: SGD family {lr_sgd:g}, Adam family {lr_adam:g})")
    ax.set_ylabel(f"final validation loss (diverged plotted at {DIVERGED:g})")
    ax.legend(fontsize=7, ncol=2)
    ctx.figure(fig, "lr-robustness", "Learning-rate robustness on a digits MLP: final validation loss vs initial lr")
    rows = [[name] + [_fmt_loss(res[m]["val"]) for m in mults] for name, res in grid.items()]
    ctx.table(["method"] + [f"×{m:g}" for m in mults], rows,
              caption=f"Final validation loss (tuned SGD lr {lr_sgd:g} → {tuned:.3f}; tuned Adam lr {lr_adam:g}; "
                      "'div' = diverged).")


def _report_goal(ctx: Context, goal: dict[str, dict]) -> None:
    rows = []
    for key, g in goal.items():
        v, ratio = g["val"], g["ratio_to_tuned_sgd"]
        rows.append([f"×{key[1:]}", _fmt_loss(g["sgd_val"]), g["best"] if math.isfinite(v) else "none (all diverged)",
                     _fmt_loss(v), f"{ratio:.3f}" if math.isfinite(ratio) else "div",
                     "yes" if g["within_10pct"] else "no"])
    ctx.table(["lr mis-set", "SGD", "best EGStepSize/EGDD", "its val loss", "÷ tuned SGD", "within 10%"], rows,
              caption="Goal: from an lr mis-set ×10 or ×0.1, EGStepSize or EGDD ends within 10% of tuned SGD's "
                      "final validation loss.")


def _plot_rates(ctx: Context, grid: dict[str, dict[float, dict[str, float]]],
                traces: dict[tuple[str, float], list[tuple[int, float]]], trace_mults: list[float]) -> list[list[Any]]:
    """The learned rates over training (figure); returns one summary row per recorded trace."""
    import matplotlib.pyplot as plt

    panels = ["EGStepSize coordinate", "EGStepSize tensor", "EGStepSize global", "EGDD", "SGD-HD",
              ADAM_NOTE, "Adam + EG hypergradient"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), sharex=True)
    rate_rows: list[list[Any]] = []
    for ax, name in zip(axes.flat, panels):
        for j, m in enumerate(trace_mults):
            rec = traces.get((name, m))
            if not rec:
                continue
            steps, nu = zip(*rec)
            nu_arr = np.array(nu, dtype=float)
            ax.plot(steps, np.where(nu_arr > 0, nu_arr, np.nan), color=f"C{j}", label=f"×{m:g}")
            rate_rows.append([name, f"×{m:g}", float(nu_arr[-1]), m * float(nu_arr[-1]), float(np.nanmin(nu_arr)),
                              float(np.nanmax(nu_arr)), steps[-1], _fmt_loss(grid[name][m]["val"])])
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1e4)
        ax.set_title(name, fontsize=9)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
    axes.flat[-1].axis("off")
    axes.flat[0].legend(fontsize=7, title="initial lr", title_fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("rate multiplier ν")
    axes[1, 0].set_ylabel("rate multiplier ν")
    ctx.figure(fig, "nu", "Learned rate multiplier over training (EGStepSize: geometric mean of ν over coordinates; "
               "EGDD: geometric mean of gain×scale; SGD-HD: α/α₀; Adam variants: the global ν), axis clipped to "
               "[1e-4, 1e4]. Lines that end early diverged; values ≤ 0 (ν underflowing to 0, SGD-HD's α turning "
               "negative) are not drawn on the log axis.")
    return rate_rows


def _report_setup(ctx: Context, cfg: dict[str, Any], lr_sgd: float, lr_adam: float) -> None:
    ctx.text(
        f"Setup: MLP 64–64–10 (ReLU), batch {cfg['batch']}, {cfg['epochs']} epochs, fixed 60/20/20 split of sklearn "
        f"digits; {len(cfg['seeds'])} seed(s) (median). The SGD family (SGD, EGStepSize, EGDD, SGD-HD) is scaled from "
        f"the tuned SGD lr {lr_sgd:g}; the Adam family from the tuned Adam lr {lr_adam:g} (Adam's lr lives on another "
        "scale). EGDD runs with momentum 0.9 and lr·0.1 so its effective step matches SGD's at ×1; its published "
        "defaults bound the adaptation (scale ∈ [0.1, 10] moving by at most e^0.001 a step, gains by e^0.01). "
        "γ = κ / (size of g·g at initialization): coordinate — mean g_i²; tensor — mean over tensors of ‖g_T‖²; "
        f"global, SGD-HD (β = κ·lr/‖g‖²) and the note's rule on Adam — ‖g‖²; Adam hypergradient — ‖g‖₁; "
        f"κ = {KAPPA}.")


def _findings(ctx: Context, grid: dict[str, dict[float, dict[str, float]]], mults: list[float], tuned: float,
              traces: dict[tuple[str, float], list[tuple[int, float]]]) -> None:
    """A few sentences generated from the measured numbers (nothing here is hard-coded)."""
    lines = []
    eg = ["EGStepSize tensor", "EGStepSize global", "SGD-HD"]
    small = [m for m in mults if m < 1]
    if small:
        ok = [(n, m) for n in eg for m in small if grid[n][m]["val"] <= 1.1 * tuned]
        lines.append(f"Too small an lr: {len(ok)} of {len(eg) * len(small)} (method, multiplier) cases of "
                     f"{', '.join(eg)} at ×{', ×'.join(f'{m:g}' for m in small)} end within 10% of tuned SGD "
                     f"({tuned:.3f}); SGD itself ends at "
                     + ", ".join(f"{_fmt_loss(grid['SGD'][m]['val'])} (×{m:g})" for m in small) + ".")
    big = [m for m in mults if m > 1]
    if big:
        lines += _findings_large_lr(grid, big, traces)
    for name in (ADAM_NOTE, "Adam + EG hypergradient"):
        parts = []
        for m in mults:
            rec = traces.get((name, m))
            if rec:
                nu = np.array([v for _, v in rec])
                state = "collapsed to 0" if nu[-1] < 1e-6 else ("exploded" if nu[-1] > 1e6 else f"ends at {nu[-1]:.3g}")
                parts.append(f"×{m:g}: ν {state} (val {_fmt_loss(grid[name][m]['val'])})")
        if parts:
            lines.append(f"{name}: " + "; ".join(parts) + ".")
    ctx.text("**Measured findings.** " + " ".join(lines))


def _findings_large_lr(grid: dict[str, dict[float, dict[str, float]]], big: list[float],
                       traces: dict[tuple[str, float], list[tuple[int, float]]]) -> list[str]:
    rescued = [(n, m) for n in grid for m in big
               if math.isfinite(grid[n][m]["val"]) and not math.isfinite(grid["SGD"][m]["val"])
               and not n.startswith("Adam")]
    lines = ["Too large an lr: " + (
        "runs that finish where SGD diverges — " + ", ".join(
            f"{n} ×{m:g} → {grid[n][m]['val']:.3f}" for n, m in rescued) if rescued else
        "no SGD-family rule finishes where SGD diverges") + "."]
    for name in ("EGStepSize tensor", "EGStepSize global"):
        m10 = 10.0 if 10.0 in big else big[-1]
        rec = traces.get((name, m10))
        if rec:
            nu = np.array([v for _, v in rec[:6]])
            first = ", ".join(f"{v:.3g}" for v in nu)
            bounce = any(nu[i] < 0.1 and float(nu[i + 1:].max()) > 10 * nu[i] for i in range(len(nu) - 1))
            lines.append(f"{name} at ×{m10:g}, ν over the first steps: {first}" + (
                " — the rate collapses, then the blown-up gradients of the next step (γ·⟨g_{t−1}, g_t⟩ scales "
                "with ‖g‖²) multiply it back up by orders of magnitude." if bounce else "."))
    return lines


def _kappa_runs(ctx: Context, data: dict[str, torch.Tensor], lr_sgd: float, lr_adam: float, sizes: dict[str, float],
                cfg: dict[str, Any]) -> tuple[list[list[Any]], dict[str, list[float]]]:
    """Sensitivity of the EG step-size rules to κ (full mode, first seed): where the fixed κ above comes from."""
    names = {"coordinate": "EGStepSize coordinate", "tensor": "EGStepSize tensor", "global": "EGStepSize global"}
    rows = []
    out: dict[str, list[float]] = {}
    sweep_mults = [m for m in (0.01, 0.1, 1.0, 10.0) if m in cfg["mults"]]
    cases = [(k, kap) for k in names for kap in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)]
    for key, kap in ctx.track(cases, "κ sweep"):
        methods = _methods(lr_sgd, lr_adam, sizes, {**KAPPA, key: kap})
        vals = [_train(data, methods[names[key]](m), epochs=cfg["epochs"], batch=cfg["batch"],
                       seed=cfg["seeds"][0])["val"] for m in sweep_mults]
        rows.append([names[key], kap] + [_fmt_loss(v) for v in vals])
        out[f"{key} kappa={kap:g}"] = vals
    return rows, out


def _report_kappa(ctx: Context, rows: list[list[Any]], out: dict[str, list[float]], cfg: dict[str, Any]) -> None:
    sweep_mults = [m for m in (0.01, 0.1, 1.0, 10.0) if m in cfg["mults"]]
    ctx.table(["method", "κ"] + [f"×{m:g}" for m in sweep_mults], rows,
              caption="κ sweep (one seed): final validation loss.")
    ctx.result("kappa_sweep", out)


def run(ctx: Context) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    _constrained(ctx)
    t1, c1 = time.perf_counter(), time.process_time()
    _robustness(ctx)
    # CPU seconds too: wall time on a shared machine says little about the cost
    ctx.result("timings", {"constrained": t1 - t0, "robustness": time.perf_counter() - t1,
                           "constrained_cpu": c1 - c0, "robustness_cpu": time.process_time() - c1})
