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
from ..report import DIVERGED as DIVERGED_LABEL
from ..report import Context, plural
from . import claim
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

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
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
        ax.set_title(f"{prob['name']}\nf* from {prob['reference']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("objective gap f − f*")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8)
        ctx.result(f"{prob['short']}_f_star", f_star)
        ctx.result(f"{prob['short']}_active_constraints", prob["active"])
    fig.tight_layout(w_pad=3.0)
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
    return DIVERGED_LABEL if not math.isfinite(v) else f"{v:.3f}"



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


def _tune_job(job: tuple[str, float, dict[str, Any]]) -> dict[str, float]:
    """One base-lr run (median over the seeds); self-contained so it can run in a worker process."""
    name, lr, cfg = job
    make = (lambda p: torch.optim.SGD(p, lr=lr)) if name == "SGD" else (lambda p: torch.optim.Adam(p, lr=lr))
    return _median_run(digits_permutation_split(0), make, cfg)


def _tune(ctx: Context, data: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict, dict]:
    """Final losses over the base-lr grids of SGD and Adam: ``{lr: median run}`` each."""
    jobs = [("SGD", lr, cfg) for lr in cfg["sgd_grid"]] + [("Adam", lr, cfg) for lr in cfg["adam_grid"]]
    done = ctx.map_ordered(_tune_job, jobs, "eg: tune the SGD and Adam learning rates")
    sgd = {lr: r for (name, lr, _), r in zip(jobs, done) if name == "SGD"}
    adam = {lr: r for (name, lr, _), r in zip(jobs, done) if name == "Adam"}
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


def _grid_job(job: tuple[str, float, tuple[float, float, dict[str, float], dict[str, float]], dict[str, Any]]
              ) -> tuple[dict[str, float], list[tuple[int, float]] | None]:
    """One method at one lr multiplier (median run) and its recorded rates; self-contained for a worker."""
    name, m, (lr_sgd, lr_adam, sizes, kappa), cfg = job
    traces: dict[tuple[str, float], list[tuple[int, float]]] = {}
    make = _methods(lr_sgd, lr_adam, sizes, kappa)[name](m)
    res = _median_run(digits_permutation_split(0), make, cfg, _rate_recorder(traces, name, m, cfg))
    return res, traces.get((name, m))


def _lr_grid(ctx: Context, setup: tuple[float, float, dict[str, float], dict[str, float]], cfg: dict[str, Any]
             ) -> tuple[dict[str, dict[float, dict[str, float]]], dict[tuple[str, float], list[tuple[int, float]]]]:
    """Every method at every lr multiplier: ``grid[name][m]`` (median run) and the recorded rates.

    ``setup`` is (tuned SGD lr, tuned Adam lr, gradient sizes at initialization, κ), what :func:`_methods` takes.
    """
    traces: dict[tuple[str, float], list[tuple[int, float]]] = {}
    grid: dict[str, dict[float, dict[str, float]]] = {}
    jobs = [(name, m, setup, cfg) for name in _methods(*setup) for m in cfg["mults"]]
    for (name, m, _, _), (res, trace) in zip(jobs, ctx.map_ordered(_grid_job, jobs, "eg: lr grid × methods")):
        grid.setdefault(name, {})[m] = res
        if trace is not None:
            traces[(name, m)] = trace
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


def _goal_test(grid: dict[str, dict[float, dict[str, float]]], goal: dict[str, dict], tuned_test: float) -> None:
    """Add to each goal entry the test loss of its best EG rule (chosen on validation) ÷ tuned SGD's test loss."""
    for key, g in goal.items():
        m = float(key[1:])
        v = grid[g["best"]][m]["test"]
        ratio = v / tuned_test if math.isfinite(v) and tuned_test > 0 else math.inf
        g.update({"test": v, "ratio_to_tuned_sgd_test": ratio, "within_10pct_test": ratio <= GOAL_RATIO,
                  "sgd_test": grid["SGD"][m]["test"]})


GOAL_RATIO = 1.1  # "within 10 %" of tuned SGD


def goal_verdict(ratios: dict[str, float], limit: float = GOAL_RATIO) -> str:
    """EG rules recover from a mis-set lr? From the best EG rule's loss ÷ tuned SGD's per mis-set multiplier.

    held: within ``limit`` at every multiplier; partly held: at some; not held: at none (a diverged run
    counts as not within); no multiplier: not measured.
    """
    if not ratios:
        return "not measured"
    ok = [math.isfinite(r) and r <= limit for r in ratios.values()]
    return "held" if all(ok) else ("partly held" if any(ok) else "not held")


def _claim(ctx: Context, goal: dict[str, dict], seeds: list[int]) -> None:
    ratios = {key: g["ratio_to_tuned_sgd_test"] for key, g in goal.items()}
    parts = []
    for key, g in goal.items():
        r = g["ratio_to_tuned_sgd_test"]
        parts.append(f"×{key[1:]}: " + (f"{g['best']} at {r:.2f}× tuned SGD's test loss" if math.isfinite(r)
                                         else f"every EG rule {DIVERGED_LABEL}"))
    claim(ctx, "eg", "EG step sizes (the note's ν ← ν·exp(γ⟨g_{t−1}, g_t⟩) in EGStepSize, and EGDD) recover from a "
          f"learning rate mis-set ×10 or ×0.1: the best ends within {GOAL_RATIO - 1:.0%} of tuned SGD's test loss",
          goal_verdict(ratios), "; ".join(parts), split="test", seeds=seeds)


def _robustness(ctx: Context) -> None:
    data = digits_permutation_split(0)  # the split is fixed; seeds vary init and batch order
    cfg = _robustness_setup(ctx)
    cfg["trace_mults"] = [m for m in (0.01, 0.1, 1.0, 10.0) if m in cfg["mults"]]
    sgd_res, adam_res = _tune(ctx, data, cfg)
    lr_sgd = min(sgd_res, key=lambda k: sgd_res[k]["val"])
    lr_adam = min(adam_res, key=lambda k: adam_res[k]["val"])
    _report_setup(ctx, cfg, lr_sgd, lr_adam)
    _report_tuning(ctx, sgd_res, adam_res, lr_sgd, lr_adam, cfg)
    tuned = sgd_res[lr_sgd]["val"]
    sizes = _init_grad_sizes(data, cfg["seeds"][0])
    grid, traces = _lr_grid(ctx, (lr_sgd, lr_adam, sizes, KAPPA), cfg)
    mults = cfg["mults"]

    _plot_robustness(ctx, grid, mults, tuned, lr_sgd, lr_adam)
    goal = _goal(grid, mults, tuned)
    _goal_test(grid, goal, sgd_res[lr_sgd]["test"])
    _claim(ctx, goal, cfg["seeds"])
    _report_goal(ctx, goal, tuned, sgd_res[lr_sgd]["test"])
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
    ctx.result("tuned_sgd_test_loss", sgd_res[lr_sgd]["test"])
    ctx.result("kappa", KAPPA)
    ctx.result("gammas", {k: KAPPA[k] / sizes[k] for k in ("coordinate", "tensor", "global")})
    ctx.result("lr_grid", {name: {f"x{m:g}": res[m] for m in mults} for name, res in grid.items()})
    ctx.result("goal", goal)
    ctx.result("rate_traces", {f"{n} x{m:g}": rec[:: max(1, len(rec) // 100)] for (n, m), rec in traces.items()})
    if ctx.full:
        rows, out = _kappa_runs(ctx, data, lr_sgd, lr_adam, sizes, cfg)
        _report_kappa(ctx, rows, out, cfg)


def _report_tuning(ctx: Context, sgd_res: dict, adam_res: dict, lr_sgd: float, lr_adam: float,
                   cfg: dict[str, Any]) -> None:
    rows = [["SGD", lr, _fmt_loss(r["val"]), "←" if lr == lr_sgd else ""] for lr, r in sgd_res.items()]
    rows += [["Adam", lr, _fmt_loss(r["val"]), "←" if lr == lr_adam else ""] for lr, r in adam_res.items()]
    ctx.table(["optimizer", "lr", "final val loss", "tuned"], rows,
              caption=f"Tuning the base learning rates on the validation split ({cfg['epochs']} epochs, batch "
                      f"{cfg['batch']}, median over {plural(len(cfg['seeds']), 'seed')}).")


def _plot_robustness(ctx: Context, grid: dict[str, dict[float, dict[str, float]]], mults: list[float],
                     tuned: float, lr_sgd: float, lr_adam: float) -> None:
    """Final val loss vs lr multiplier: the figure and its table."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.4))
    styles = {"SGD": "k-o", "EGStepSize coordinate": "C0-s", "EGStepSize tensor": "C1-s", "EGStepSize global": "C2-s",
              "EGDD": "C3-^", "SGD-HD": "C4-v", "Adam": "C5--o", ADAM_NOTE: "C6--D",
              "Adam + EG hypergradient": "C7--D"}
    finite = [res[m]["val"] for res in grid.values() for m in mults if math.isfinite(res[m]["val"])]
    top = max(finite + [tuned]) * 1.5
    lane = top * 2.6  # the "diverged" lane above the data
    n = len(grid)
    for k, (name, res) in enumerate(grid.items()):
        y = np.array([res[m]["val"] for m in mults], dtype=float)
        ok = np.isfinite(y)
        line, = ax.plot(np.array(mults)[ok], y[ok], styles[name], label=name, ms=5, alpha=0.85)
        if (~ok).any():  # diverged runs: markers in the lane, each method at its own small offset in x and y
            xs = np.array(mults)[~ok] * 10 ** (0.03 * (k - (n - 1) / 2))
            ax.plot(xs, np.full(len(xs), lane * 1.09 ** (k - (n - 1) / 2)), ls="none",
                    marker=styles[name].lstrip("Ck0123456789-"), color=line.get_color(), ms=5, alpha=0.9)
    ax.axhline(tuned, color="k", lw=0.8, ls=":", label=f"tuned SGD (lr {lr_sgd:g}): {tuned:.3f}")
    ax.axhspan(tuned, GOAL_RATIO * tuned, color="k", alpha=0.08,
               label=f"goal: within {GOAL_RATIO - 1:.0%} of tuned SGD")
    ax.axhspan(lane / 1.6, lane * 1.6, color="red", alpha=0.07)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(finite + [tuned]) / 1.3, lane * 1.75)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0) if min(finite + [tuned]) / 1.3 < t < top]
    ax.set_yticks(ticks + [lane], [f"{t:g}" for t in ticks] + [DIVERGED_LABEL])
    ax.get_yticklabels()[-1].set_color("red")
    ax.minorticks_off()
    ax.set_xticks(mults, [f"×{m:g}" for m in mults])
    ax.set_xlabel(f"initial lr ÷ tuned lr  (tuned: SGD family {lr_sgd:g}, Adam family {lr_adam:g})")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=9, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    ctx.figure(fig, "lr-robustness", "Learning-rate robustness on a digits MLP: final validation loss vs initial lr; "
               f"runs that diverged (loss above {DIVERGED:g} or not finite) sit in the red lane at the top.")
    rows = [[name] + [_fmt_loss(res[m]["val"]) for m in mults] for name, res in grid.items()]
    ctx.table(["method"] + [f"×{m:g}" for m in mults], rows,
              caption=f"Final validation loss (tuned SGD lr {lr_sgd:g} → {tuned:.3f}; tuned Adam lr {lr_adam:g}).")


def _report_goal(ctx: Context, goal: dict[str, dict], tuned: float, tuned_test: float) -> None:
    rows = []
    for key, g in goal.items():
        v = g["val"]
        fmt_r = lambda r: f"{r:.3f}" if math.isfinite(r) else DIVERGED_LABEL  # noqa: E731
        rows.append([f"×{key[1:]}", _fmt_loss(g["sgd_val"]), g["best"] if math.isfinite(v) else f"none (all {DIVERGED_LABEL})",
                     _fmt_loss(v), fmt_r(g["ratio_to_tuned_sgd"]), _fmt_loss(g["test"]),
                     fmt_r(g["ratio_to_tuned_sgd_test"]), "yes" if g["within_10pct_test"] else "no"])
    ctx.table(["lr mis-set", "SGD (val)", "best EGStepSize/EGDD (on val)", "its val loss", "÷ tuned SGD (val)",
               "its test loss", "÷ tuned SGD (test)", f"within {GOAL_RATIO - 1:.0%} (test)"], rows,
              caption=f"The claim's test: from an lr mis-set ×10 or ×0.1, the best of EGStepSize and EGDD (chosen on "
                      f"the validation split) ends within {GOAL_RATIO - 1:.0%} of tuned SGD's final loss on the test "
                      f"split (validation columns for reference). Tuned SGD's final loss: validation {tuned:.3f}, "
                      f"test {tuned_test:.3f}.")


def _plot_rates(ctx: Context, grid: dict[str, dict[float, dict[str, float]]],
                traces: dict[tuple[str, float], list[tuple[int, float]]], trace_mults: list[float]) -> list[list[Any]]:
    """The learned rates over training (figure); returns one summary row per recorded trace."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    lo, hi = 1e-4, 1e4  # the axis; values beyond are drawn at its edge
    panels = ["EGStepSize coordinate", "EGStepSize tensor", "EGStepSize global", "EGDD", "SGD-HD",
              ADAM_NOTE, "Adam + EG hypergradient"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.8), sharex=True)
    rate_rows: list[list[Any]] = []
    for ax, name in zip(axes.flat, panels):
        for j, m in enumerate(trace_mults):
            rec = traces.get((name, m))
            if not rec:
                continue
            steps, nu = zip(*rec)
            nu_arr = np.array(nu, dtype=float)
            shown = np.where(nu_arr > 0, np.clip(nu_arr, lo, hi), np.nan)
            ax.plot(steps, shown, color=f"C{j}", label=f"×{m:g}")
            good = np.flatnonzero(np.isfinite(shown))
            if not math.isfinite(grid[name][m]["val"]) and good.size:
                ax.plot(steps[good[-1]], shown[good[-1]], "x", color="red", ms=9, mew=2.5, zorder=5)
            rate_rows.append([name, f"×{m:g}", float(nu_arr[-1]), m * float(nu_arr[-1]), float(np.nanmin(nu_arr)),
                              float(np.nanmax(nu_arr)), steps[-1], _fmt_loss(grid[name][m]["val"])])
        ax.set_yscale("log")
        ax.set_ylim(lo / 2, hi * 2)
        ax.set_title(name, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.grid(alpha=0.25)
    axes[0, 3].tick_params(labelbottom=True)  # the slot below it holds the legend
    axes[0, 3].set_xlabel("step")
    for ax in axes[1, :3]:
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("rate multiplier ν")
    axes[1, 0].set_ylabel("rate multiplier ν")
    slot = axes[1, 3]
    slot.axis("off")
    handles = [Line2D([], [], color=f"C{j}", label=f"×{m:g}") for j, m in enumerate(trace_mults)]
    handles += [Line2D([], [], ls="none", marker="x", color="red", ms=9, mew=2.5, label=f"{DIVERGED_LABEL} (last ν)"),
                Line2D([], [], color="k", lw=0.6, ls=":", label="ν = 1")]
    slot.legend(handles=handles, title="initial lr ÷ tuned lr", loc="center", fontsize=10, title_fontsize=10)
    fig.tight_layout()
    ctx.figure(fig, "nu", "Learned rate multiplier over training (EGStepSize: geometric mean of ν over coordinates; "
               "EGDD: geometric mean of gain×scale; SGD-HD: α/α₀, α its step size; Adam variants: the global ν), "
               f"first seed. Values beyond [{lo:g}, {hi:g}] are drawn at the edge; a red ✕ marks the last rate of a "
               "run that diverged; values ≤ 0 (ν underflowing to 0, SGD-HD's α turning negative) are not drawn on "
               "the log axis.")
    return rate_rows


def _report_setup(ctx: Context, cfg: dict[str, Any], lr_sgd: float, lr_adam: float) -> None:
    kappa = ", ".join(f"{k} {v:g}" for k, v in KAPPA.items())
    ctx.text(
        "**Part 2 — a mis-set learning rate.** The note's rule gives every parameter (or tensor, or the whole "
        "model) a rate multiplier ν, updated by exponentiated gradient on the step size itself: "
        "ν ← ν·exp(γ⟨g_{t−1}, g_t⟩), θ ← θ − lr·ν·g_t, with g_t the gradient at step t (EGStepSize, at three "
        "granularities: per coordinate, per tensor, global). The rate of adaptation is γ = κ / (size of g·g at "
        "initialization), κ a constant per rule: coordinate — mean g_i²; tensor — mean over tensors of ‖g_T‖²; "
        "global, SGD-HD (hypergradient SGD, step-size rate β = κ·lr/‖g‖²) and the note's rule on Adam — ‖g‖²; "
        f"Adam hypergradient — ‖g‖₁. κ: {kappa} (picked once in a preliminary sweep on this task; `--full` reruns "
        "the sweep). EGDD (Amid et al., [arXiv:2202.00145](https://arxiv.org/abs/2202.00145)) runs with momentum "
        "0.9 and lr·0.1 so its effective step matches SGD's at ×1; its published defaults bound the adaptation "
        "(scale ∈ [0.1, 10] moving by at most e^0.001 a step, gains by e^0.01).\n\n"
        f"Setup: MLP 64–64–10 (ReLU), batch {cfg['batch']}, {plural(cfg['epochs'], 'epoch')}, fixed 60/20/20 "
        f"train/validation/test split of scikit-learn's digits; {plural(len(cfg['seeds']), 'seed')} (median). The "
        f"base learning rates are tuned on the validation split: SGD {lr_sgd:g}, Adam {lr_adam:g}. The SGD family "
        "(SGD, EGStepSize, EGDD, SGD-HD) starts from the tuned SGD lr times a multiplier (×0.01 … ×100), the Adam "
        "family from the tuned Adam lr (Adam's lr lives on another scale). A run diverged when its final validation "
        f"loss is not finite or above {DIVERGED:g} (chance is log 10 ≈ 2.3).")


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
    jobs = [(names[key], key, kap, (lr_sgd, lr_adam, sizes), sweep_mults, cfg) for key, kap in cases]
    for (key, kap), vals in zip(cases, ctx.map_ordered(_kappa_job, jobs, "eg: κ sweep")):
        rows.append([names[key], kap] + [_fmt_loss(v) for v in vals])
        out[f"{key} kappa={kap:g}"] = vals
    return rows, out


def _kappa_job(job: tuple[str, str, float, tuple[float, float, dict[str, float]], list[float], dict[str, Any]]
               ) -> list[float]:
    """Final validation losses of one EG rule at one κ over the sweep's multipliers (first seed); for a worker."""
    name, key, kap, (lr_sgd, lr_adam, sizes), mults, cfg = job
    methods = _methods(lr_sgd, lr_adam, sizes, {**KAPPA, key: kap})
    data = digits_permutation_split(0)
    return [_train(data, methods[name](m), epochs=cfg["epochs"], batch=cfg["batch"], seed=cfg["seeds"][0])["val"]
            for m in mults]


def _report_kappa(ctx: Context, rows: list[list[Any]], out: dict[str, list[float]], cfg: dict[str, Any]) -> None:
    sweep_mults = [m for m in (0.01, 0.1, 1.0, 10.0) if m in cfg["mults"]]
    ctx.table(["method", "κ"] + [f"×{m:g}" for m in sweep_mults], rows,
              caption="κ sweep (one seed): final validation loss.")
    ctx.result("kappa_sweep", out)


def run(ctx: Context) -> None:
    ctx.text(
        "**Part 1 — constraints.** Exponentiated gradient descent (EGD) updates x ← x ⊙ exp(−η∇f(x)) "
        "(η the step size; renormalized to sum 1 on the probability simplex), so iterates stay positive without a projection. "
        "It is set against projected gradient descent on two problems with an independent optimum f*: "
        "non-negative least squares (NNLS) and the mixture weights of fixed Gaussian components. Step sizes are "
        "c/L, L the largest eigenvalue of the Hessian at the start, each method with its best c of one grid.")
    t0, c0 = time.perf_counter(), time.process_time()
    _constrained(ctx)
    t1, c1 = time.perf_counter(), time.process_time()
    _robustness(ctx)
    # CPU seconds too: wall time on a shared machine says little about the cost
    ctx.result("timings", {"constrained": t1 - t0, "robustness": time.perf_counter() - t1,
                           "constrained_cpu": c1 - c0, "robustness_cpu": time.process_time() - c1})
