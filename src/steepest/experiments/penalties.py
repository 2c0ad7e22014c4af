"""Seed 001: the input-gradient / parameter-gradient inequality, checked and used.

1. The inequality ``‖∇_x f‖² Σ_t (1 + ‖h_t‖²)/(‖W_t‖² ‖∇_x h_t‖²) ≤ ‖∇_θ f‖²`` on random
   MLPs in float64: violations and the distribution of the tightness lhs/rhs.
2. Its factors along SGD training of a digits MLP: does the multiplier stay
   "nearly constant" (the seed's claim), so that the parameter penalty tracks the
   input penalty?
3. Training with each penalty (input / parameter, exact / finite difference) vs
   none: test accuracy, final input-gradient norm, cost per step; and the
   finite-difference error against the exact penalty gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steepest.penalties import input_grad_norm2, occam_bound, param_grad_norm2, param_penalty_grads_fd
from ._data import digits_split

TITLE = "Input vs parameter gradient penalty (seed 001)"

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}
RTOL = 1e-9  # float64 round-off allowance when counting violations


@contextlib.contextmanager
def _threads(n: int):
    # tiny tensors: intra-op threads only add synchronisation cost
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ 1. random MLPs
def _random_mlp(g: torch.Generator, rng: np.random.Generator):
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


def _random_mlps(ctx) -> None:
    n = ctx.pick(40, 1000, 5000)
    batch = ctx.pick(4, 16, 32)
    rng = np.random.default_rng(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    rows = []
    tight_s, tight_f = [], []
    viol_s = viol_f = n_examples = zero_rhs = 0
    worst = 0.0
    with _threads(1):
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
            rows.append((depth, act, t_s))
    ts, tf = np.concatenate(tight_s), np.concatenate(tight_f)
    ctx.text(
        f"**1. The inequality on {n} random MLPs** (float64; depth 1–6, widths 1–32, tanh/ReLU/GELU/softplus, "
        f"weights N(0, s²/fan_in) with s log-uniform in [0.2, 5], optional final activation, {batch} inputs each, "
        f"f = sum of outputs). Violations are counted as lhs > rhs·(1 + {RTOL:g})."
    )
    q = lambda a, p: float(np.quantile(a, p)) if a.size else float("nan")  # noqa: E731
    ctx.table(
        ["norm in the bound", "MLPs", "examples", "violations", "min lhs/rhs", "median", "90%", "max"],
        [
            ["spectral", n, n_examples, viol_s, q(ts, 0), q(ts, 0.5), q(ts, 0.9), q(ts, 1)],
            ["Frobenius", n, n_examples, viol_f, q(tf, 0), q(tf, 0.5), q(tf, 0.9), q(tf, 1)],
        ],
        caption=f"Tightness lhs/rhs per example ({zero_rhs} examples with ∇_θ f = 0, hence lhs = 0, left out of the ratios).",
    )
    by = {}
    for depth, act, t in rows:
        by.setdefault((depth, act), []).append(t)
    depths = sorted({d for d, _ in by})
    acts = sorted(ACTS)
    med = {(d, a): float(np.median(np.concatenate(by[(d, a)]))) if (d, a) in by and np.concatenate(by[(d, a)]).size else float("nan") for d in depths for a in acts}
    ctx.table(["depth", *acts], [[d, *[med[(d, a)] for a in acts]] for d in depths], caption="Median tightness lhs/rhs (spectral) by depth and activation.")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.linspace(-6, 0.05, 62)
    for arr, lab in ((ts, "spectral ‖W‖, ‖∇ₓh‖"), (tf, "Frobenius")):
        axes[0].hist(np.log10(np.clip(arr, 1e-6, None)), bins=bins, histtype="step", lw=1.6, label=lab)
    axes[0].axvline(0, color="k", ls="--", lw=1)
    axes[0].set_xlabel("log10(lhs / rhs)   (≤ 0 means the inequality holds)")
    axes[0].set_ylabel("examples")
    axes[0].set_title(f"{n} random MLPs, {n_examples} examples: {viol_s} violations")
    axes[0].legend()
    for a in acts:
        axes[1].plot(depths, [med[(d, a)] for d in depths], "o-", label=a)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("depth (Linear layers)")
    axes[1].set_ylabel("median lhs / rhs")
    axes[1].legend()
    fig.subplots_adjust(wspace=0.3)
    ctx.figure(
        fig,
        "tightness",
        "Tightness of the seed-001 inequality on random float64 MLPs (left; ratios below 1e-6, including lhs = 0 where "
        "∇ₓf vanishes, are piled at −6) and its median by depth (right).",
    )
    ctx.result(
        "random_mlps",
        {
            "n_mlps": n,
            "n_examples": n_examples,
            "violations_spectral": viol_s,
            "violations_frobenius": viol_f,
            "zero_rhs_examples": zero_rhs,
            "tightness_spectral_median": q(ts, 0.5),
            "tightness_spectral_max": worst,
            "tightness_frobenius_median": q(tf, 0.5),
        },
    )


# ------------------------------------------------------------------ digits data
def _digits(seed: int):
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
def _along_training(ctx, data) -> None:
    Xtr, Xte, ytr, yte = data
    steps = ctx.pick(60, 1500, 6000)
    every = ctx.pick(20, 50, 100)
    lr, bs = 0.05, 32
    model = _digits_mlp(ctx.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    probe_x = Xtr[: ctx.pick(64, 256, 512)].double()
    probe_y = ytr[: probe_x.shape[0]]
    hist: dict[str, list] = {"step": [], "lhs": [], "rhs": [], "gx2": [], "mult": [], "tight": [], "h": [], "W": [], "J": []}

    def probe(step: int) -> None:
        m64 = copy.deepcopy(model).double()
        b = occam_bound(m64, probe_x, lambda out: F.cross_entropy(out, probe_y, reduction="none"))
        ok = b.input_grad_norm2 > 0
        hist["step"].append(step)
        hist["lhs"].append(float(b.lhs.mean()))
        hist["rhs"].append(float(b.rhs.mean()))
        hist["gx2"].append(float(b.input_grad_norm2.mean()))
        hist["mult"].append(float((b.lhs[ok] / b.input_grad_norm2[ok]).median()))
        hist["tight"].append(float((b.lhs / b.rhs).median()))
        hist["h"].append([float(L.h_norm2.mean().sqrt()) for L in b.layers])
        hist["W"].append([float(L.weight_norm2.sqrt()) for L in b.layers])
        hist["J"].append([float(L.jac_norm2.mean().sqrt()) for L in b.layers])

    with _threads(1):
        for step in ctx.track(range(steps + 1), "digits MLP, SGD"):
            if step % every == 0 or step == steps:
                probe(step)
            if step == steps:
                break
            idx = torch.randint(0, Xtr.shape[0], (bs,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            acc = float((model(Xte).argmax(1) == yte).float().mean())

    s = np.array(hist["step"])
    H, W, J = (np.array(hist[k]) for k in ("h", "W", "J"))
    spread = lambda a: float(np.max(a) / np.min(a))  # noqa: E731
    gx2, rhs, lhs = (np.array(hist[k]) for k in ("gx2", "rhs", "lhs"))
    ratio = rhs / gx2
    rows = []
    for t in range(H.shape[1]):
        rows.append([f"‖h_{t + 1}‖ (RMS)", H[0, t], H[-1, t], spread(H[:, t])])
    for t in range(W.shape[1]):
        rows.append([f"‖W_{t + 1}‖ (spectral)", W[0, t], W[-1, t], spread(W[:, t])])
    for t in range(1, J.shape[1]):
        rows.append([f"‖∇ₓh_{t + 1}‖ (RMS of spectral)", J[0, t], J[-1, t], spread(J[:, t])])
    mult = np.array(hist["mult"])
    rows += [
        ["multiplier Σ_t (1+‖h‖²)/(‖W‖²‖∇ₓh‖²) (median)", mult[0], mult[-1], spread(mult)],
        ["input penalty ‖∇ₓℓ‖² (mean)", gx2[0], gx2[-1], spread(gx2)],
        ["parameter penalty ‖∇_θℓ‖² (mean)", rhs[0], rhs[-1], spread(rhs)],
        ["ratio param / input penalty", ratio[0], ratio[-1], spread(ratio)],
        ["tightness lhs/rhs (median)", hist["tight"][0], hist["tight"][-1], spread(np.array(hist["tight"]))],
    ]
    ctx.text(
        f"**2. Along training.** MLP 64-128-128-10 (tanh) on sklearn digits (1347 train / 450 test, pixels/16), "
        f"plain SGD lr {lr}, batch {bs}, {steps} steps, final test accuracy {acc:.3f}. Every {every} steps the bound "
        f"is evaluated in float64 on {probe_x.shape[0]} fixed training examples with f = the per-example "
        "cross-entropy. 'max/min' is the spread of a quantity over the whole run."
    )
    ctx.table(["quantity", "at step 0", f"at step {steps}", "max/min over the run"], rows)
    factor_spread = max(spread(H[:, t]) for t in range(H.shape[1]))
    factor_spread = max(factor_spread, *(spread(W[:, t]) for t in range(W.shape[1])))
    factor_spread = max(factor_spread, *(spread(J[:, t]) for t in range(1, J.shape[1])), 1.0)
    corr = float(np.corrcoef(np.log(gx2), np.log(rhs))[0, 1])
    tight = np.array(hist["tight"])
    factors_const = factor_spread < 2.0 and spread(mult) < 2.0
    tracks = spread(ratio) < 2.0
    ctx.text(
        f"Verdict on the seed's claim. (a) *The factors stay nearly constant*: ‖h_t‖, ‖W_t‖, ‖∇ₓh_t‖ change by at "
        f"most {factor_spread:.2f}× over the run and the multiplier Σ_t(…) by {spread(mult):.2f}× — "
        + ("this holds (< 2×)." if factors_const else "this does NOT hold (≥ 2×).")
        + f" (b) *So the parameter penalty tracks the input penalty*: the input penalty spans {spread(gx2):.3g}×, the "
        f"parameter penalty {spread(rhs):.3g}×, their ratio {spread(ratio):.3g}× (correlation of their logs over the "
        f"run {corr:.3f}); the tightness lhs/rhs itself moves {spread(tight):.3g}×. "
        + (
            "The ratio stays within 2×, so here the two penalties are interchangeable up to a nearly fixed factor."
            if tracks
            else "A constant multiplier only pins the lower bound lhs to the input penalty; the bound's slack "
            "(tightness) changes during training, so the parameter penalty is not a fixed multiple of the input "
            "penalty — it bounds it, it does not track it."
        )
    )
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6))
    axes[0].plot(s, lhs, label="lhs (bound)")
    axes[0].plot(s, rhs, label="rhs = ‖∇_θℓ‖²")
    axes[0].plot(s, gx2, label="‖∇ₓℓ‖²")
    axes[0].set_yscale("log")
    axes[0].set_title("penalties (mean over probe set)")
    axes[0].legend(fontsize=8)
    for ax, arr, name, start in ((axes[1], H, "‖h_t‖ (RMS)", 0), (axes[2], W, "‖W_t‖ (spectral)", 0), (axes[3], J, "‖∇ₓh_t‖ (RMS)", 1)):
        for t in range(start, arr.shape[1]):
            ax.plot(s, arr[:, t], label=f"t={t + 1}")
        ax.set_title(name)
        ax.legend(fontsize=8)
    axes[4].plot(s, mult, label="multiplier Σ_t (1+‖h‖²)/(‖W‖²‖∇ₓh‖²)")
    axes[4].plot(s, ratio, label="‖∇_θℓ‖² / ‖∇ₓℓ‖²")
    axes[4].plot(s, tight, label="tightness lhs/rhs")
    axes[4].set_yscale("log")
    axes[4].set_title("multiplier, penalty ratio, tightness")
    axes[4].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("SGD step")
    ctx.figure(fig, "training", "Both sides of the bound and its per-layer factors along SGD training of the digits MLP.")
    ctx.result(
        "along_training",
        {
            "steps": steps,
            "test_acc": acc,
            "max_factor_spread": factor_spread,
            "multiplier_spread": spread(mult),
            "input_penalty_spread": spread(gx2),
            "param_penalty_spread": spread(rhs),
            "ratio_spread": spread(ratio),
            "log_corr": corr,
            "tightness_spread": spread(tight),
            "factors_nearly_constant": factors_const,
            "param_tracks_input": tracks,
        },
    )


# ------------------------------------------------------------------ 3. training with penalties
LAM = {"input": 0.1, "param": 0.3}
FD_EPS = 1e-2  # step length (normalize=True) in input / parameter space


def _step_fn(method: str, model: nn.Module, opt: torch.optim.Optimizer):
    ps = list(model.parameters())

    def step(xb, yb):
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


def _with_penalties(ctx, data) -> None:
    Xtr, Xte, ytr, yte = data
    steps = ctx.pick(40, 1200, 4000)
    seeds = ctx.pick([0], [0, 1], [0, 1, 2, 3, 4])
    every = max(steps // 12, 1)
    lr, bs = 0.05, 32
    res = {m: {"acc": [], "gx": [], "gc": []} for m in METHODS}
    curves = {m: [] for m in METHODS}
    with _threads(1):
        for seed in seeds:
            for method in ctx.track(METHODS, f"penalties, seed {seed}"):
                model = _digits_mlp(ctx.seed + 100 + seed)
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                step = _step_fn(method, model, opt)
                g = torch.Generator().manual_seed(ctx.seed + 200 + seed)
                curve = []
                for k in range(steps):
                    if k % every == 0:
                        curve.append((k, _input_grad_mean(model, Xte, yte)))
                    idx = torch.randint(0, Xtr.shape[0], (bs,), generator=g)
                    step(Xtr[idx], ytr[idx])
                curve.append((steps, _input_grad_mean(model, Xte, yte)))
                curves[method].append(curve)
                with torch.no_grad():
                    res[method]["acc"].append(float((model(Xte).argmax(1) == yte).float().mean()))
                res[method]["gx"].append(curve[-1][1])
                res[method]["gc"].append(_jacobian_gc(model, Xte))

        # cost per step on one fixed batch, all methods measured in this run, at two widths
        xb, yb = Xtr[:bs], ytr[:bs]
        cost: dict[int, dict[str, float]] = {}
        for width in (128, 1024):
            cost[width] = {}
            for method in METHODS:
                model = _digits_mlp(ctx.seed, width)
                step = _step_fn(method, model, torch.optim.SGD(model.parameters(), lr=1e-4))
                t = ctx.timeit(lambda: step(xb, yb), warmup=ctx.pick(1, 5, 20), repeat=ctx.pick(3, 11, 100))
                cost[width][method] = t["median"]

    rows = []
    for m in METHODS:
        r = res[m]
        lam = "" if m == "none" else f"{LAM[m.split()[0]]:g}"
        rows.append(
            [
                m,
                lam,
                float(np.mean(r["acc"])),
                float(np.min(r["acc"])),
                float(np.mean(r["gx"])),
                float(np.mean(r["gc"])),
                cost[128][m] * 1e3,
                cost[128][m] / cost[128]["none"],
                cost[1024][m] * 1e3,
                cost[1024][m] / cost[1024]["none"],
            ]
        )
    ctx.text(
        f"**3. Training with each penalty.** Same MLP and SGD (lr {lr}, batch {bs}, {steps} steps), averaged over "
        f"{len(seeds)} seed(s) (same init and batches across methods). Input penalty: λ·mean_i ‖∇_{{x_i}} ℓ_i‖²; "
        "parameter penalty: λ·‖∇_θ L‖² of the batch-mean loss L. FD = finite difference with a step of length "
        f"{FD_EPS:g} (normalize=True). 'input-grad norm²' = mean over the test set of ‖∇ₓℓ_i‖²; 'GC' = geometric "
        "complexity, mean ‖∂logits/∂x‖_F². Cost = median wall time of one training step on one batch of 32 (single "
        "thread), all measured in this run, for the trained width 128 and for width 1024."
    )
    ctx.table(["penalty", "λ", "test acc", "worst seed", "input-grad norm²", "GC", "ms/step (w128)", "× none", "ms/step (w1024)", "× none"], rows)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for m in METHODS:
        arr = np.array([[v for _, v in c] for c in curves[m]])
        ax.plot([k for k, _ in curves[m][0]], arr.mean(0), "o-", ms=3, label=m)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test mean ‖∇ₓℓ_i‖²")
    ax.legend(fontsize=8)
    ctx.figure(fig, "penalized", "Input-gradient norm on the test set while training with each penalty.")
    ctx.result("with_penalties", {m: {"test_acc": rows[i][2], "worst_seed_acc": rows[i][3], "input_grad_norm2": rows[i][4], "gc": rows[i][5], "ms_per_step_w128": rows[i][6], "ms_per_step_w1024": rows[i][8]} for i, m in enumerate(METHODS)})


# ------------------------------------------------------------------ 4. FD accuracy
def _fd_error(ctx, data) -> None:
    Xtr, _, ytr, _ = data
    xb, yb = Xtr[:64], ytr[:64]
    eps_list = [1e-1, 1e-2, 1e-3, 1e-4]
    rows = []
    with _threads(1):
        for act in ("tanh", "relu"):
            for dtype in (torch.float32, torch.float64):
                torch.manual_seed(ctx.seed)
                a = ACTS[act]
                model = nn.Sequential(nn.Linear(64, 128), a(), nn.Linear(128, 128), a(), nn.Linear(128, 10)).to(dtype)
                ps = list(model.parameters())
                x, y = xb.to(dtype), yb
                f = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
                flat = lambda gs: torch.cat([t.flatten() for t in gs])  # noqa: E731
                ex_in = flat(torch.autograd.grad(input_grad_norm2(f, x).mean(), ps))
                loss = F.cross_entropy(model(x), y)
                ex_p = flat(torch.autograd.grad(param_grad_norm2(loss, ps), ps))
                e_in, e_p = [], []
                for eps in eps_list:
                    fd_in = flat(torch.autograd.grad(input_grad_norm2(f, x, method="finite_difference", eps=eps, normalize=True).mean(), ps))
                    e_in.append(float((fd_in - ex_in).norm() / ex_in.norm()))
                    out = param_penalty_grads_fd(lambda: F.cross_entropy(model(x), y), ps, eps=eps, normalize=True)
                    e_p.append(float((flat(out.penalty_grads) - ex_p).norm() / ex_p.norm()))
                name = str(dtype).replace("torch.", "")
                rows.append([f"{act}, {name}, input", *e_in])
                rows.append([f"{act}, {name}, param", *e_p])
    ctx.table(
        ["network, dtype, penalty", *[f"ε={e:g}" for e in eps_list]],
        rows,
        caption="**4. Finite-difference error.** Relative error ‖FD − exact‖/‖exact‖ of the penalty's gradient w.r.t. θ "
        "(digits MLP at init, 64 examples, step length ε). Smooth (tanh): O(ε) until round-off takes over (float32 "
        "below ~1e-3). ReLU: a step that crosses an activation kink picks up the gradient's jump divided by ε, which "
        "double backprop does not see, so the error does not shrink with ε until ε is below the distance to the "
        "nearest kink of the batch — use smooth activations (or a tiny ε in float64) with finite-difference penalties.",
    )
    ctx.result("fd_error", {r[0]: dict(zip([str(e) for e in eps_list], r[1:])) for r in rows})


def run(ctx) -> None:
    seconds = {}
    t0 = time.perf_counter()
    _random_mlps(ctx)
    seconds["random_mlps"] = time.perf_counter() - t0
    data = _digits(ctx.seed)
    for name, part in (("along_training", _along_training), ("with_penalties", _with_penalties), ("fd_error", _fd_error)):
        t = time.perf_counter()
        part(ctx, data)
        seconds[name] = time.perf_counter() - t
    ctx.result("timings", seconds)
