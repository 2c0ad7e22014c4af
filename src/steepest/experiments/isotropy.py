"""Why isotropy: is parameter-space steepest descent also feature-space steepest descent?

The note: Su, *Why we prefer isotropy: an understanding via steepest descent*,
kexue.fm/archives/11549. For ``Y = XW`` the feature update of SGD is ``−η XXᵀG`` and
that of (momentum-free) Muon is ``−η X msign(XᵀG)``; both equal the feature-space
steepest direction (``−G`` resp. ``−msign(G)``) when ``XXᵀ ∝ I``, which whitening
provides; SignSGD has no such property. This experiment measures the cosine
between the actual feature update and the steepest feature direction

1. on synthetic batches, as a function of the batch-to-width ratio b / d
   (``XXᵀ`` is b × b of rank ≤ d, so ``XXᵀ ∝ I`` is only attainable for b ≤ d);
2. on a digits MLP trained with SGD, Muon, SignSGD and Adam, with raw,
   BatchNorm, LayerNorm, RMSNorm and whitened inputs to every linear layer,
   per layer, over training (:class:`steepest.isotropy.AlignmentMonitor`);
3. training curves with and without whitening for SGD and Muon;
4. whether a whitening layer can train as well as BatchNorm while keeping the alignment:
   ``whitening-running`` whitens with running statistics in training as in eval, shrinks the
   covariance toward its mean eigenvalue and decorrelates the samples of each training batch
   (:class:`steepest.isotropy.Whitening`'s ``train_stats``, ``shrinkage``,
   ``sample_decorrelation``); its two settings are chosen on a validation part held out of the
   training part, under the constraint that SGD's and Muon's alignment stays ≥ ``ALIGNED``.

Measuring (``_synthetic_alignment``, ``_train``, ``_digits_runs``, ``_lr_sweep``,
``_best_by_lr``) returns plain data; ``_report_*`` / ``_plot_*`` / ``_verdict`` write it.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..isotropy import AlignmentMonitor, Whitening, feature_alignment, isotropy_metrics, whiten
from ..optim import Muon, SignSGD
from ..report import DIVERGED, Context
from . import claim
from ._data import digits_generator_split
from ._protocol import choose, combine, fmt_cell, fmt_interval, interval, n_caption, outcome, paired

TITLE = "Why isotropy: feature-space steepest descent"
# Small models: one intra-op thread is fastest (measured) and leaves the other core free.
THREADS = 1

OPTIMIZERS = ("sgd", "muon", "signsgd", "adam")
TREATMENTS = ("raw", "batchnorm", "layernorm", "rmsnorm", "whitening", "whitening-running")
#: whitening-running: running statistics in training (the eval map), shrinkage α, sample decorrelation ρ
RUNNING_BASE = {"centered": False, "affine": False, "eps": 1e-3, "train_stats": "running"}
#: candidate (ρ, α) settings of whitening-running, chosen on validation
CANDIDATES = ((0.5, 0.1), (0.5, 0.3), (0.8, 0.1), (0.8, 0.3), (0.95, 0.1), (0.95, 0.3))
#: "within 1 point of BatchNorm": the largest accepted drop in test accuracy
ACC_MARGIN = 0.01
VAL_SHARE = 0.2  # of the training part, held out to choose (ρ, α)
# The norm each optimizer is steepest in; Adam (without its averages) is SignSGD.
OWN_NORM = {"sgd": "sgd", "muon": "muon", "signsgd": "signsgd", "adam": "signsgd"}
LR = {"sgd": 0.05, "muon": 0.02, "signsgd": 3e-4, "adam": 1e-3}
RULES = ("sgd", "muon", "signsgd")
# Inputs of the synthetic sweep: anisotropic raw batches and three ways to normalize them.
SYNTHETIC: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "raw (anisotropic, mean≠0)": lambda X: X,
    "standardized (BatchNorm)": lambda X: (X - X.mean(0)) / X.std(0, correction=0).clamp_min(1e-12),
    "row-normalized (RMSNorm)": lambda X: X / X.pow(2).mean(1, keepdim=True).sqrt(),
    "whitened X(XᵀX)^-1/2": lambda X: whiten(X, eps=1e-12),
}
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
ALIGNED = 0.95  # "cosine ≈ 1"
NOT_ALIGNED = 0.9  # SignSGD "lacks this": below


@dataclass
class Record:
    """What the report needs of an AlignmentMonitor: per layer and norm, the cosine after each step."""

    history: dict[str, dict[str, list[float]]]


# ----------------------------------------------------------------------------- optimizers
def _make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "signsgd":
        return SignSGD(params, lr=lr)
    # the note's Muon: no momentum, no lr scale, accurate msign, W ← W − η msign(∇W)
    return Muon(params, lr=lr, momentum=0.0, nesterov=False, schedule="accurate", adjust_lr_fn="none")


# ----------------------------------------------------------------------------- model/data
def _norm(treatment: str, d: int, setting: tuple[float, float] | None = None) -> nn.Module:
    # affine=False everywhere: the linear layer must see the normalized features
    if treatment == "whitening-running":
        rho, alpha = setting if setting is not None else CANDIDATES[0]
        return Whitening(d, **RUNNING_BASE, shrinkage=alpha, sample_decorrelation=rho)
    if treatment == "raw":
        return nn.Identity()
    if treatment == "batchnorm":
        return nn.BatchNorm1d(d, affine=False)
    if treatment == "layernorm":
        return nn.LayerNorm(d, elementwise_affine=False)
    if treatment == "rmsnorm":
        return nn.RMSNorm(d, elementwise_affine=False)
    # the note's uncentered whitening X (XᵀX/b + εI)^{-1/2}; "-g16": groups of 16 channels
    groups = d // 16 if treatment == "whitening-g16" else 1
    return Whitening(d, centered=False, affine=False, eps=1e-3, groups=groups)


def _mlp(treatment: str, widths: tuple[int, ...], setting: tuple[float, float] | None = None) -> nn.Sequential:
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    n = len(widths) - 1
    for i in range(n):
        mods[f"norm{i + 1}"] = _norm(treatment, widths[i], setting)
        mods[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1], bias=False)
        if i < n - 1:
            mods[f"relu{i + 1}"] = nn.ReLU()
    return nn.Sequential(mods)


def _smooth(v: Sequence[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(v, dtype=float)
    if len(v) < k or k <= 1:
        return np.arange(len(v)), v
    c = np.convolve(v, np.ones(k) / k, mode="valid")
    return np.arange(k - 1, len(v)), c


# ----------------------------------------------------------------------------- training
def _train(opt_name: str, treatment: str, data: Data, *, steps: int, batch: int, widths: tuple[int, ...], seed: int,
           eval_every: int, lr_mult: float = 1.0, monitor: bool = True,
           setting: tuple[float, float] | None = None) -> dict[str, Any]:
    """Train one MLP; its losses, (step, test accuracy) evaluations, alignment monitor and end-of-training probes.

    ``setting``: (ρ, α) of the whitening-running treatment."""
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = _mlp(treatment, widths, setting)
    opt = _make_optimizer(opt_name, model.parameters(), LR[opt_name] * lr_mult)
    mon = AlignmentMonitor(model, opt, norms=RULES) if monitor else None
    g = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    order = torch.randperm(len(ytr), generator=g)
    pos = 0
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        if pos + batch > len(order):
            order = torch.randperm(len(ytr), generator=g)
            pos = 0
        idx = order[pos : pos + batch]
        pos += batch
        model.train()
        loss = loss_fn(model(Xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # diverged (too large a learning rate in the sweep): record it and stop
            losses += [math.nan] * (steps - len(losses))
            evals.append((steps, math.nan))
            if mon is not None:
                mon.remove()
            return {"monitor": mon, "losses": losses, "evals": evals, "iso": None, "batch_acc": math.nan, "diverged": True}
        if (step + 1) % eval_every == 0 or step == steps - 1:
            evals.append((step + 1, _accuracy(model, Xte, yte)))
    if mon is not None:
        mon.remove()
    # the end-of-training probes run on a copy in train mode, so the running statistics stay untouched
    probe = copy.deepcopy(model).train()
    out = {"monitor": mon, "losses": losses, "evals": evals, "iso": None,
           "batch_acc": _batch_stats_accuracy(probe, Xte, yte, batch), "diverged": False}
    if mon is not None:
        out["iso"] = _input_isotropy(probe, mon.layers, Xtr[order[:batch]])
    return out


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in eval mode (running statistics)."""
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def _batch_stats_accuracy(probe: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Test accuracy with batch statistics: train-mode normalization on whole test batches."""
    with torch.no_grad():
        nb = len(y) // batch
        hits = sum(int((probe(X[i * batch : (i + 1) * batch]).argmax(1) == y[i * batch : (i + 1) * batch]).sum())
                   for i in range(nb))
    return hits / (nb * batch)


def _input_isotropy(probe: nn.Module, layers: Iterable[str], x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Isotropy metrics of each linear layer's input on one training batch."""
    feats: dict[str, torch.Tensor] = {}
    mods = dict(probe.named_modules())
    hooks = [mods[name].register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, i[0].detach()))
             for name in layers]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    return {name: isotropy_metrics(x) for name, x in feats.items()}


def _mean_align(run: dict[str, Any], layer: str, norm: str) -> float:
    """Mean over steps of the alignment the monitor recorded for ``layer`` in ``norm``."""
    v = run["monitor"].history[layer][norm]
    return float(np.mean(v)) if v else math.nan


def _layer_mean(run: dict[str, Any] | None, layers: Sequence[str], norm: str) -> float:
    """Layer-mean alignment in ``norm`` (nan for a run that was not made)."""
    return float(np.mean([_mean_align(run, L, norm) for L in layers])) if run else math.nan


# ----------------------------------------------------------------------------- 1. synthetic batches
def _synthetic_alignment(ctx: Context, ratios: list[float], trials: int) -> dict[str, dict[str, dict[float, float]]]:
    """``res[inputs][rule][b/d]``: mean cosine over ``trials`` Gaussian batches (d = 64, anisotropic, mean 0.5)."""
    d, d_out = 64, 32
    g = torch.Generator().manual_seed(ctx.seed)
    spectrum = torch.logspace(0, -2, d, dtype=torch.float64)  # anisotropic: condition number 1e4 of the covariance
    res: dict[str, dict[str, dict[float, float]]] = {t: {r: {} for r in RULES} for t in SYNTHETIC}
    for ratio in ctx.track(ratios, "isotropy: b/d sweep"):
        b = max(2, int(round(ratio * d)))
        for t, f in SYNTHETIC.items():
            acc: dict[str, list[float]] = {r: [] for r in RULES}
            for _ in range(trials):
                Z = torch.randn(b, d, generator=g, dtype=torch.float64)
                X = f(Z * spectrum + 0.5)
                G = torch.randn(b, d_out, generator=g, dtype=torch.float64)
                for r in acc:
                    acc[r].append(float(feature_alignment(X, G, r)))
            for r in acc:
                res[t][r][ratio] = float(np.mean(acc[r]))
    return res


def _report_synthetic(ctx: Context, res: dict[str, dict[str, dict[float, float]]], ratios: list[float]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    markers = dict(zip(SYNTHETIC, "osD^"))
    for ax, r in zip(axes, RULES):
        if r == "sgd":  # drawn first, wide and pale, so the measured whitened line stays visible on top of it
            xs = np.array(ratios)
            ax.plot(xs, np.sqrt(np.minimum(1.0, 1.0 / xs)), color="0.6", lw=7, alpha=0.45, solid_capstyle="round",
                    label="theory for whitened inputs: √min(1, d/b)")
        for t in SYNTHETIC:
            ax.plot(ratios, [res[t][r][q] for q in ratios], marker=markers[t], ms=5, label=t)
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch / width  b/d")
        ax.set_title({"sgd": "SGD (vs −G)", "muon": "Muon (vs −msign G)", "signsgd": "SignSGD (vs −sign G)"}[r])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(XΔW, steepest feature direction)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=3, fontsize=9, frameon=False)
    fig.tight_layout()
    ctx.figure(fig, "ratio", "Synthetic batches X of b samples in d = 64 dimensions, random G: cosine between the "
               "feature update XΔW of each rule and the steepest feature direction, against b/d; dotted: b = d, "
               "beyond which XXᵀ (rank ≤ d) cannot be ∝ I.")
    rows = [[t, r, *[res[t][r][q] for q in ratios]] for t in SYNTHETIC for r in RULES]
    ctx.table(["X", "rule", *[f"b/d={q:g}" for q in ratios]], rows,
              caption="**Synthetic alignment** (mean over trials)", floatfmt=".3f")
    ctx.result("synthetic", {t: {r: {str(q): v for q, v in res[t][r].items()} for r in res[t]} for t in res})


# ----------------------------------------------------------------------------- 2. digits MLP
def _digits_setup(ctx: Context) -> dict[str, Any]:
    widths, steps = (64, 128, 128, 10), ctx.pick(10, 200, 1500)
    return {"widths": widths, "batch": 32, "steps": steps, "eval_every": ctx.pick(5, 20, 100),
            "layers": [f"fc{i + 1}" for i in range(len(widths) - 1)], "tail": max(1, steps // 10), "seed": ctx.seed}


def _fit(o: str, t: str, data: Data, cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return _train(o, t, data, steps=cfg["steps"], batch=cfg["batch"], widths=cfg["widths"], seed=cfg["seed"],
                  eval_every=cfg["eval_every"], **kw)


def _fit_job(job: tuple[str, str, dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """One training run, its monitor reduced to a :class:`Record`; self-contained (loads the split, seeds
    itself) so it can run in a worker process."""
    o, t, cfg, kw = job
    kw = dict(kw)
    data = digits_generator_split(cfg["seed"])
    if kw.pop("validation", False):
        data = _validation_split(data, cfg["seed"])
    if t == "whitening-running" and "setting" not in kw:
        kw["setting"] = cfg.get("setting")
    r = _fit(o, t, data, cfg, **kw)
    if r["monitor"] is not None:
        r["monitor"] = Record({L: {n: list(v) for n, v in h.items()} for L, h in r["monitor"].history.items()})
    return r


def _validation_split(data: Data, seed: int) -> Data:
    """(reduced training part, labels, validation part, labels): a share :data:`VAL_SHARE` of the training part,
    drawn by a generator seeded with ``seed``, held out; the test part is not touched."""
    Xtr, ytr, _, _ = data
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed + 7919))
    n_val = int(round(VAL_SHARE * len(ytr)))
    va, tr = perm[:n_val], perm[n_val:]
    return Xtr[tr], ytr[tr], Xtr[va], ytr[va]


def _digits_runs(ctx: Context, data: Data, cfg: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every optimizer × input treatment at its base lr, alignment monitored."""
    grid = [(o, t) for o in OPTIMIZERS for t in TREATMENTS]
    if ctx.mode == "smoke":
        grid = [("sgd", "raw"), ("muon", "whitening"), ("signsgd", "whitening"), ("adam", "batchnorm"),
                ("sgd", "whitening-running")]
    done = ctx.map_ordered(_fit_job, [(o, t, cfg, {}) for o, t in grid], "isotropy: digits MLP runs")
    return dict(zip(grid, done))


def _alignment_replicates(reps: dict[tuple[str, str, int], dict[str, Any]], cfg: dict[str, Any],
                          seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Layer-mean alignment (own norm) of SGD, Muon and SignSGD with whitened and raw inputs, one value per
    replicate, from :func:`_replicate_runs`."""
    return {t: {o: [_layer_mean(reps[(o, t, sd)], cfg["layers"], OWN_NORM[o]) for sd in seeds] for o in RULES}
            for t in ALIGN_TREATS}


def _report_digits(ctx: Context, runs: dict[tuple[str, str], dict[str, Any]], cfg: dict[str, Any]) -> None:
    layers, widths = cfg["layers"], cfg["widths"]
    rows, res = [], {}
    for (o, t), r in runs.items():
        nm = OWN_NORM[o]
        al = [_mean_align(r, L, nm) for L in layers]
        fro = [_mean_align(r, L, "sgd") for L in layers]
        acc = r["evals"][-1][1]
        tail = float(np.mean(r["losses"][-cfg["tail"] :]))
        rows.append([o, t, nm, *al, float(np.mean(al)), float(np.mean(fro)), tail, acc])
        res[f"{o}/{t}"] = {
            "own_norm": nm,
            "alignment": {L: {n: _mean_align(r, L, n) for n in RULES} for L in layers},
            "final_train_loss": tail,
            "test_accuracy": acc,
            "isotropy": r["iso"],
        }
    ctx.table(
        ["optimizer", "inputs", "norm", *layers, "layer mean", "mean cos vs −G", "train loss", "test acc (eval mode)"],
        rows,
        caption=(
            f"**Digits MLP {'-'.join(map(str, widths))}** (no biases, norms without affine parameters before every "
            f"linear layer, batch {cfg['batch']}, {cfg['steps']} steps, no momentum except Adam's): mean over steps of "
            "cos(X·ΔW, steepest feature direction) in the optimizer's own norm (Adam: sign/max norm), per layer"
        ),
        floatfmt=".3f",
    )
    ctx.result("digits", res)
    opts, treats = _present(runs)
    piv = [[o, *[_layer_mean(runs.get((o, t)), layers, OWN_NORM[o]) for t in treats]] for o in opts]
    ctx.table(["optimizer \\ inputs", *treats], piv, caption="**Layer-mean alignment** (own norm)", floatfmt=".3f")
    _report_input_isotropy(ctx, runs, treats, cfg)


def _present(runs: dict[tuple[str, str], Any]) -> tuple[list[str], list[str]]:
    """The optimizers and treatments that have runs, in the canonical order."""
    return ([o for o in OPTIMIZERS if any(k[0] == o for k in runs)],
            [t for t in TREATMENTS if any(k[1] == t for k in runs)])


def _report_input_isotropy(ctx: Context, runs: dict[tuple[str, str], dict[str, Any]], treats: list[str],
                           cfg: dict[str, Any]) -> None:
    """Isotropy of the linear layers' inputs at the end of training (SGD runs)."""
    rows = []
    for t in treats:
        r = runs.get(("sgd", t))
        if r is None or r["iso"] is None:
            continue
        for L in cfg["layers"]:
            m = r["iso"][L]
            rows.append([t, L, m["gram_distance"], m["effective_rank"], m["mean_cosine"]])
    ctx.table(
        ["inputs", "layer", "‖XXᵀ−cI‖/‖XXᵀ‖", "effective rank", "mean pair cos"],
        rows,
        caption=(
            f"**Isotropy of each linear layer's input** X (one training batch of {cfg['batch']}, end of SGD "
            "training): the Gram distance ‖XXᵀ − cI‖/‖XXᵀ‖ (c the best scalar; 0 is isotropic), the effective rank "
            "of X and the mean cosine between pairs of samples. The covariance's condition number is not shown: a "
            f"batch of {cfg['batch']} in at least {min(cfg['widths'][:-1])} dimensions has a singular covariance, "
            "so it is infinite in every row (results.json keeps it)."
        ),
        floatfmt=".3g",
    )


def _plot_alignment(ctx: Context, runs: dict[tuple[str, str], dict[str, Any]], cfg: dict[str, Any]) -> None:
    """Alignment over training: rows = optimizer, columns = layer, lines = treatment."""
    import matplotlib.pyplot as plt

    layers = cfg["layers"]
    opts, treats = _present(runs)
    k = max(1, cfg["steps"] // 30)
    fig, axes = plt.subplots(len(opts), len(layers), figsize=(4 * len(layers), 2.6 * len(opts)), sharex=True,
                             sharey=True, squeeze=False)
    for i, o in enumerate(opts):
        for j, L in enumerate(layers):
            ax = axes[i][j]
            for t in treats:
                r = runs.get((o, t))
                if r is not None:
                    ax.plot(*_smooth(r["monitor"].history[L][OWN_NORM[o]], k), label=t,
                            lw=2.2 if t == "whitening" else 1.2)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(L)
            if j == 0:
                ax.set_ylabel(f"{o}\ncos [{OWN_NORM[o]}]")
            if i == len(opts) - 1:
                ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="inputs of every linear layer", loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(labels), fontsize=10, title_fontsize=10, frameon=False)
    fig.tight_layout()
    ctx.figure(fig, "alignment", "Digits MLP: alignment of the feature update with the steepest feature direction "
               f"over training (moving average of {k} steps)")


# ----------------------------------------------------------------------------- 3. training curves
def _curve_treatments(ctx: Context) -> tuple[str, ...]:
    return ("whitening",) if ctx.mode == "smoke" else ("raw", "batchnorm", "whitening", "whitening-g16",
                                                         "whitening-running")


def _lr_sweep(ctx: Context, runs: dict[tuple[str, str], dict[str, Any]], data: Data, cfg: dict[str, Any]
              ) -> dict[tuple[str, str, float], dict[str, Any]]:
    """SGD and Muon at a few lr multipliers per curve treatment (reusing the base-lr runs)."""
    mults = ctx.pick([1.0], [1.0, 4.0], [0.3, 1.0, 3.0, 10.0])
    cases = [(o, t, m) for o in ("sgd", "muon") for t in _curve_treatments(ctx) for m in mults]
    new = [(o, t, m) for o, t, m in cases if not (m == 1.0 and (o, t) in runs)]
    jobs = [(o, t, cfg, {"lr_mult": m, "monitor": t == "whitening-g16" and m == 1.0}) for o, t, m in new]
    done = dict(zip(new, ctx.map_ordered(_fit_job, jobs, "isotropy: lr sweep for the training curves")))
    return {(o, t, m): runs[(o, t)] if (o, t, m) not in done else done[(o, t, m)] for o, t, m in cases}


def _best_by_lr(sweep: dict[tuple[str, str, float], dict[str, Any]], tail: int
                ) -> dict[tuple[str, str], tuple[float, float, dict[str, Any]]]:
    """(optimizer, treatment) → (final train loss, lr multiplier, run) of its lowest final train loss."""
    best: dict[tuple[str, str], tuple[float, float, dict[str, Any]]] = {}
    for (o, t, m), r in sweep.items():
        tl = float(np.mean(r["losses"][-tail:]))
        key = tl if math.isfinite(tl) else math.inf
        if (o, t) not in best or key < best[(o, t)][0]:
            best[(o, t)] = (key, m, r)
    return best


def _report_sweep(ctx: Context, sweep: dict[tuple[str, str, float], dict[str, Any]], cfg: dict[str, Any]) -> None:
    rows = []
    for (o, t, m), r in sweep.items():
        tl = float(np.mean(r["losses"][-cfg["tail"]:]))
        al = _layer_mean(r, cfg["layers"], OWN_NORM[o]) if r["monitor"] else math.nan
        rows.append([o, t, LR[o] * m, DIVERGED if r["diverged"] else tl, r["evals"][-1][1], r["batch_acc"], al])
    ctx.table(
        ["optimizer", "inputs", "lr", "train loss (last 10%)", "test acc (eval mode)", "test acc (batch stats)",
         "alignment (own norm)"],
        rows,
        caption=(
            "**Learning-rate sweep for the training curves** (whitening-g16: Whitening with groups of 16 channels, "
            "fewer than the 32 samples of a batch; whitening-running: running statistics in training, shrinkage and "
            "sample decorrelation at the setting chosen on validation; alignment measured at the base lr only)"
        ),
        floatfmt=".3g",
    )


def _plot_training(ctx: Context, best: dict[tuple[str, str], tuple[float, float, dict[str, Any]]],
                   treats: tuple[str, ...], steps: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    curves = {}
    colors = dict(zip(treats, ["C0", "C1", "C2", "C3", "C4"]))
    for (o, t), (_, m, r) in best.items():
        style = "-" if o == "sgd" else "--"
        label = f"{o} / {t} (lr {LR[o] * m:g})"
        axes[0].plot(*_smooth(r["losses"], max(1, steps // 30)), style, color=colors[t], label=label)
        e = np.array(r["evals"])
        axes[1].plot(e[:, 0], e[:, 1], style, color=colors[t], marker=".", label=label)
        curves[f"{o}/{t}"] = {"lr": LR[o] * m, "loss": r["losses"], "test_accuracy": r["evals"]}
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss (smoothed)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("test accuracy (eval mode)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=9, frameon=False)
    fig.tight_layout()
    ctx.figure(fig, "training", "Digits MLP: training curves with and without a Whitening layer, SGD (solid) and "
               "Muon (dashed), best lr of the sweep")
    ctx.result("curves", curves)


# ----------------------------------------------------------------------------- 4. whitening that trains
GOAL_OPTS = ("sgd", "muon")
GOAL_TREATS = ("batchnorm", "whitening", "whitening-running")
ALIGN_TREATS = ("whitening", "raw")  # the alignment claim's cells, with SGD, Muon and SignSGD


def _select(ctx: Context, cfg: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Every candidate (ρ, α) of whitening-running, with SGD and Muon, trained on the reduced training part of each
    replicate: validation accuracy (eval mode) and layer-mean alignment (own norm, on the training batches).

    Chosen: the best mean validation accuracy over SGD, Muon and the replicates among the candidates whose mean
    alignment is ≥ :data:`ALIGNED` for both optimizers; when none is, the best aligned one (the report says so).
    """
    cands = CANDIDATES if ctx.mode != "smoke" else CANDIDATES[2:4]
    jobs = [(o, "whitening-running", {**cfg, "seed": sd}, {"validation": True, "setting": c})
            for c in cands for o in GOAL_OPTS for sd in seeds]
    done = ctx.map_ordered(_fit_job, jobs, "isotropy: choosing whitening-running's (ρ, α) on validation")
    val: dict[tuple[float, float], dict[str, list[float]]] = {c: {o: [] for o in GOAL_OPTS} for c in cands}
    align: dict[tuple[float, float], dict[str, list[float]]] = {c: {o: [] for o in GOAL_OPTS} for c in cands}
    for (o, _, _, kw), r in zip(jobs, done):
        val[kw["setting"]][o].append(r["evals"][-1][1])
        align[kw["setting"]][o].append(_layer_mean(r, cfg["layers"], OWN_NORM[o]))
    return {"candidates": list(cands), "val": val, "align": align, **choose_setting(val, align)}


def choose_setting(val: dict[Any, dict[str, Sequence[float]]], align: dict[Any, dict[str, Sequence[float]]]
                   ) -> dict[str, Any]:
    """The setting with the best mean validation accuracy (over SGD, Muon and replicates) among those whose mean
    alignment is ≥ :data:`ALIGNED` for both optimizers; when none is, the one with the best worse-optimizer
    alignment. Returns ``chosen``, ``admissible`` and ``score`` per setting, ``any_admissible``."""
    cands = list(val)
    admissible = {c: all(float(np.mean(align[c][o])) >= ALIGNED for o in GOAL_OPTS) for c in cands}
    score = {c: float(np.mean([v for o in GOAL_OPTS for v in val[c][o]])) for c in cands}
    if any(admissible.values()):
        chosen = choose({c: score[c] if admissible[c] else -math.inf for c in cands}, higher=True)
    else:
        chosen = choose({c: min(float(np.mean(align[c][o])) for o in GOAL_OPTS) for c in cands}, higher=True)
    return {"chosen": chosen, "admissible": admissible, "score": score, "any_admissible": any(admissible.values())}


def _replicate_runs(ctx: Context, runs: dict[tuple[str, str], dict[str, Any]], cfg: dict[str, Any],
                    seeds: list[int]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every (optimizer, inputs) cell the verdicts read — the whitening goal's and the alignment claim's — on every
    replicate (its own split and initialization), each trained once; the first replicate's runs are the digits
    grid's where it has them."""
    cases = list(dict.fromkeys([(o, t) for o in GOAL_OPTS for t in GOAL_TREATS]
                               + [(o, t) for o in RULES for t in ALIGN_TREATS]))
    todo = [(o, t, sd) for sd in seeds for o, t in cases if not (sd == cfg["seed"] and (o, t) in runs)]
    done = ctx.map_ordered(_fit_job, [(o, t, {**cfg, "seed": sd}, {}) for o, t, sd in todo],
                           "isotropy: replicates of the cells the verdicts read")
    got = dict(zip(todo, done))
    return {(o, t, sd): got[(o, t, sd)] if (o, t, sd) in got else runs[(o, t)] for sd in seeds for o, t in cases}


def _replicates(reps: dict[tuple[str, str, int], dict[str, Any]], cfg: dict[str, Any], seeds: list[int]
                ) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Test accuracy (eval mode), layer-mean alignment and final train loss of SGD and Muon with BatchNorm,
    whitening and whitening-running, one value per replicate, from :func:`_replicate_runs`."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for o, t in [(o, t) for o in GOAL_OPTS for t in GOAL_TREATS]:
        rs = [reps[(o, t, sd)] for sd in seeds]
        out[(o, t)] = {"test_accuracy": [r["evals"][-1][1] for r in rs],
                       "alignment": [_layer_mean(r, cfg["layers"], OWN_NORM[o]) for r in rs],
                       "train_loss": [float(np.mean(r["losses"][-cfg["tail"]:])) for r in rs]}
    return out


def training_verdict(acc_new: dict[str, Sequence[float]], acc_bn: dict[str, Sequence[float]],
                     align_new: dict[str, Sequence[float]]) -> tuple[str, dict[str, str]]:
    """Goal 2 from per-replicate numbers: for SGD and for Muon, the new whitening's test accuracy is within
    :data:`ACC_MARGIN` of BatchNorm's (paired difference > −ACC_MARGIN) and its alignment is ≥ :data:`ALIGNED`.

    Each of the four parts is read from its t interval (:func:`~steepest.experiments._protocol.outcome`); the
    verdict combines them (:func:`~steepest.experiments._protocol.combine`). Returns (verdict, parts).
    """
    parts: dict[str, str] = {}
    for o in GOAL_OPTS:
        parts[f"{o} accuracy"] = outcome(paired(acc_new[o], acc_bn[o]), above=-ACC_MARGIN)
        parts[f"{o} alignment"] = outcome(interval(align_new[o]), above=ALIGNED)
    return combine(list(parts.values())), parts


def goal_met_on_means(acc_new: dict[str, Sequence[float]], acc_bn: dict[str, Sequence[float]],
                      align_new: dict[str, Sequence[float]]) -> bool:
    """Whether the means (one value each in quick mode) meet goal 2: accuracy gap ≥ −ACC_MARGIN and alignment
    ≥ ALIGNED for SGD and Muon. A direction, not a verdict."""
    return all(float(np.mean(acc_new[o])) - float(np.mean(acc_bn[o])) >= -ACC_MARGIN - 1e-12
               and float(np.mean(align_new[o])) >= ALIGNED for o in GOAL_OPTS)


def _report_selection(ctx: Context, sel: dict[str, Any], seeds: list[int]) -> None:
    rows = []
    for c in sel["candidates"]:
        rows.append([c[0], c[1], *[fmt_cell(sel["val"][c][o]) for o in GOAL_OPTS],
                     *[fmt_cell(sel["align"][c][o]) for o in GOAL_OPTS],
                     "yes" if sel["admissible"][c] else "no", "◀" if c == sel["chosen"] else ""])
    ctx.table(["ρ (sample decorrelation)", "α (shrinkage)", "val acc SGD", "val acc Muon", "alignment SGD",
               "alignment Muon", f"alignment ≥ {ALIGNED:g}", "chosen"], rows,
              caption=(f"**Choosing whitening-running's settings on validation** ({n_caption(len(seeds))}): trained on "
                       f"the training part less a held-out {VAL_SHARE:.0%} validation part; alignment = layer-mean "
                       "cosine in the optimizer's own norm on the training batches. Chosen: the best mean validation "
                       f"accuracy (SGD and Muon) among the settings whose alignment is ≥ {ALIGNED:g} for both"
                       + ("" if sel["any_admissible"] else "; none was, so the best aligned one") + "."),
              floatfmt=".3g")
    ctx.result("whitening_running_selection", {
        "candidates": [{"rho": c[0], "alpha": c[1], "val_accuracy": sel["val"][c], "alignment": sel["align"][c],
                        "admissible": sel["admissible"][c], "score": sel["score"][c]} for c in sel["candidates"]],
        "chosen": {"rho": sel["chosen"][0], "alpha": sel["chosen"][1]}, "seeds": seeds})


def _report_goal(ctx: Context, sel: dict[str, Any], reps: dict[tuple[str, str], dict[str, list[float]]],
                 seeds: list[int]) -> None:
    """Goal 2: the table, results.json's ``whitening_goal`` and the claim, computed from the numbers."""
    rows = [[o, t, fmt_cell(reps[(o, t)]["test_accuracy"]), fmt_cell(reps[(o, t)]["alignment"]),
             fmt_cell(reps[(o, t)]["train_loss"])] for o in GOAL_OPTS for t in GOAL_TREATS]
    rho, alpha = sel["chosen"]
    ctx.table(["optimizer", "inputs", "test acc (eval mode)", "alignment (own norm)", "train loss (last 10%)"], rows,
              caption=(f"**Whitening that trains** ({n_caption(len(seeds))}; base learning rates): whitening-running "
                       f"= Whitening(centered=False, eps=1e-3, train_stats='running', shrinkage={alpha:g}, "
                       f"sample_decorrelation={rho:g}), the setting chosen on validation"))
    acc = {t: {o: reps[(o, t)]["test_accuracy"] for o in GOAL_OPTS} for t in GOAL_TREATS}
    al = {t: {o: reps[(o, t)]["alignment"] for o in GOAL_OPTS} for t in GOAL_TREATS}
    verdict, parts = training_verdict(acc["whitening-running"], acc["batchnorm"], al["whitening-running"])
    gaps = {o: paired(acc["whitening-running"][o], acc["batchnorm"][o]) for o in GOAL_OPTS}
    met = goal_met_on_means(acc["whitening-running"], acc["batchnorm"], al["whitening-running"])
    ctx.result("whitening_goal", {
        "seeds": seeds, "chosen": {"rho": rho, "alpha": alpha},
        "runs": {f"{o}/{t}": reps[(o, t)] for o in GOAL_OPTS for t in GOAL_TREATS},
        "gap_to_batchnorm": {o: gaps[o].record() for o in GOAL_OPTS},
        "met_on_means": met, "verdict": verdict, "parts": parts})
    fig = "; ".join(
        f"{o}: test accuracy {fmt_cell(acc['whitening-running'][o])} vs BatchNorm {fmt_cell(acc['batchnorm'][o])} "
        f"(difference {fmt_interval(gaps[o], '.3f')}), old whitening {fmt_cell(acc['whitening'][o])}; alignment "
        f"{fmt_cell(al['whitening-running'][o])} (old whitening {fmt_cell(al['whitening'][o])}, BatchNorm "
        f"{fmt_cell(al['batchnorm'][o])})" for o in GOAL_OPTS)
    claim(ctx, "isotropy", "A whitening layer can train as well as BatchNorm (test accuracy within "
          f"{100 * ACC_MARGIN:g} point, SGD and Muon) while the feature updates stay steepest (alignment ≥ "
          f"{ALIGNED:g}): whitening with running statistics in training, shrinkage and sample decorrelation",
          verdict, f"{fig}; ρ = {rho:g}, α = {alpha:g} chosen on validation; parts: "
          + ", ".join(f"{k} {v}" for k, v in parts.items()), split="test", seeds=seeds)
    ctx.text(
        f"**Whitening that trains.** On the means ({n_caption(len(seeds))}) whitening-running "
        f"{'meets' if met else 'does not meet'} the goal (within {100 * ACC_MARGIN:g} point of BatchNorm's test "
        f"accuracy and alignment ≥ {ALIGNED:g}, SGD and Muon). What it changes relative to batch whitening: "
        "(i) training whitens each sample with the running estimate, the map eval uses, so the network is "
        "evaluated with the function it was trained with, and shrinking that covariance toward its mean "
        f"eigenvalue (α = {alpha:g}) bounds the gain of directions the estimate barely saw; (ii) per-sample "
        "whitening alone leaves XXᵀ ∝ I only up to fluctuations of relative size ~√(b/d), so the training batch's "
        f"samples are partly decorrelated (ρ = {rho:g}: each eigenvalue k of XXᵀ becomes k̄k/(ρk + (1 − ρ)k̄)), "
        "which restores the alignment in training while eval keeps the per-sample map; batch whitening instead "
        "makes every training batch orthogonal with statistics eval cannot reproduce. "
        + _loss_sentence(reps, met))


def _loss_sentence(reps: dict[tuple[str, str], dict[str, list[float]]], met: bool) -> str:
    """How the final training losses of whitening-running and BatchNorm compare (test accuracy is not the fit)."""
    new = {o: float(np.mean(reps[(o, "whitening-running")]["train_loss"])) for o in GOAL_OPTS}
    bn = {o: float(np.mean(reps[(o, "batchnorm")]["train_loss"])) for o in GOAL_OPTS}
    higher = all(new[o] > bn[o] for o in GOAL_OPTS)
    return (("The fit is not the same: " if higher else "The fit: ") + "final training loss "
            + ", ".join(f"{o} {new[o]:.3g} vs BatchNorm {bn[o]:.3g}" for o in GOAL_OPTS)
            + (" — it fits the training data more slowly than BatchNorm"
               + (" while its test accuracy keeps up." if met else ".") if higher else "."))


# ----------------------------------------------------------------------------- verdict
def alignment_verdict(sgd: float, muon: float, signsgd: float) -> str:
    """The note's claim from the layer-mean cosines with whitened inputs (batch ≤ width).

    Two parts: SGD and Muon are aligned (both ≥ :data:`ALIGNED`); SignSGD is not (< :data:`NOT_ALIGNED`).
    held: both; partly held: one; not held: neither; a missing number: not measured.
    """
    if any(math.isnan(v) for v in (sgd, muon, signsgd)):
        return "not measured"
    aligned = min(sgd, muon) >= ALIGNED
    sign_not = signsgd < NOT_ALIGNED
    return "held" if aligned and sign_not else ("partly held" if aligned or sign_not else "not held")


def worst(values: Sequence[float], low: bool) -> float:
    """The replicate least favourable to the claim: the smallest cosine (``low``) or the largest; NaN if any is."""
    vals = [float(v) for v in values]
    return math.nan if not vals or any(math.isnan(v) for v in vals) else (min(vals) if low else max(vals))


def alignment_verdict_replicates(whitened: dict[str, Sequence[float]]) -> str:
    """:func:`alignment_verdict` on the worst replicate of each optimizer: every replicate must agree."""
    return alignment_verdict(worst(whitened["sgd"], True), worst(whitened["muon"], True),
                             worst(whitened["signsgd"], False))


def _claim(ctx: Context, reps: dict[str, dict[str, list[float]]], cfg: dict[str, Any],
           syn: dict[str, dict[str, dict[float, float]]], ratios: list[float], seeds: list[int]) -> None:
    """The alignment claim, judged on its worst replicate: SGD's and Muon's smallest cosine, SignSGD's largest."""
    def spread(v: list[float], low: bool) -> str:
        return f"{fmt_cell(v)} (worst {worst(v, low):.3f})" if len(v) > 1 else fmt_cell(v)

    w, raw = reps["whitening"], reps["raw"]
    syn_w = syn["whitened X(XᵀX)^-1/2"]["sgd"]
    inside = min(syn_w[q] for q in ratios if q <= 1) if any(q <= 1 for q in ratios) else math.nan
    beyond = max(ratios)
    ctx.result("alignment_replicates", {"seeds": seeds, **reps})
    claim(ctx, "isotropy", "With isotropic inputs (XXᵀ ∝ I, reachable only when the batch is at most the layer's "
          "width) the feature update of SGD and of momentum-free Muon is the steepest descent of the features "
          f"(cosine ≥ {ALIGNED:g}); SignSGD's is not (< {NOT_ALIGNED:g})",
          alignment_verdict_replicates(w),
          f"layer-mean cosine with whitened inputs, digits MLP, batch {cfg['batch']}, "
          f"{n_caption(len(seeds), 'replicate')}: SGD {spread(w['sgd'], True)}, Muon {spread(w['muon'], True)}, "
          f"SignSGD {spread(w['signsgd'], False)} (raw inputs: "
          f"{', '.join(fmt_cell(raw[o]) for o in RULES)}); synthetic whitened SGD: "
          f"≥ {inside:.3f} for b ≤ d, {syn_w[beyond]:.3f} at b/d = {beyond:g}; measured on the training batches "
          "each update was computed from",
          split="train", seeds=seeds)


def _verdict(ctx: Context, syn: dict[str, dict[str, dict[float, float]]], ratios: list[float],
             runs: dict[tuple[str, str], dict[str, Any]], best: dict[tuple[str, str], tuple[float, float, dict]],
             cfg: dict[str, Any]) -> None:
    """The measured numbers set against the note's claim, in two paragraphs."""
    def cell(o: str, t: str) -> float:
        return _layer_mean(runs.get((o, t)), cfg["layers"], OWN_NORM[o])

    def best_of(o: str, t: str) -> tuple[float, float, float]:
        v = best.get((o, t))
        return (v[0], v[2]["evals"][-1][1], v[2]["batch_acc"]) if v else (math.nan, math.nan, math.nan)

    batch = cfg["batch"]
    syn_w = syn["whitened X(XᵀX)^-1/2"]["sgd"]
    big = max(ratios)
    lw_s, aw_s, bw_s = best_of("sgd", "whitening")
    lb_s, ab_s, _ = best_of("sgd", "batchnorm")
    lw_m, aw_m, bw_m = best_of("muon", "whitening")
    lb_m, ab_m, _ = best_of("muon", "batchnorm")
    lg_s, ag_s, _ = best_of("sgd", "whitening-g16")
    lg_m, ag_m, _ = best_of("muon", "whitening-g16")
    worse = lw_s > lb_s and lw_m > lb_m
    g16_better = lg_s < lw_s and lg_m < lw_m
    ctx.text(
        "**Measured vs the note.** The note expects whitened inputs to bring SGD and Muon to ≈ 1 and SignSGD not. "
        f"Measured (layer-mean cosine in the optimizer's own norm, whitened inputs, batch {batch} ≤ every layer's "
        f"width so XXᵀ ∝ I is attainable): SGD {cell('sgd', 'whitening'):.3f}, Muon {cell('muon', 'whitening'):.3f}, "
        f"SignSGD {cell('signsgd', 'whitening'):.3f}, Adam {cell('adam', 'whitening'):.3f}; with raw inputs "
        f"SGD {cell('sgd', 'raw'):.3f}, Muon {cell('muon', 'raw'):.3f}, SignSGD {cell('signsgd', 'raw'):.3f}. "
        f"BatchNorm (the diagonal approximation) gets part of the way (SGD {cell('sgd', 'batchnorm'):.3f}, "
        f"Muon {cell('muon', 'batchnorm'):.3f}); LayerNorm / RMSNorm much less, since they put rows on a sphere but "
        "leave them correlated (mean pairwise cosine of the inputs in the isotropy table). "
        "The claim has one condition the synthetic sweep makes explicit: XXᵀ is b × b of rank ≤ d, so it can be ∝ I "
        f"only when the batch is at most the width; beyond, even exactly whitened inputs make XXᵀ a projection and "
        f"SGD's cosine follows √(d/b) (measured {syn_w[big]:.3f} at b/d = {big:g}, theory {math.sqrt(1 / big):.3f})."
    )
    ctx.text(
        ("**Alignment is not speed.** " if worse else "**Alignment and speed.** ")
        + "In the training curves (each configuration at its best learning rate of the "
        f"sweep), whitening at batch {batch} < width trains {'worse' if worse else 'no worse'} than BatchNorm "
        f"although its feature updates are steepest: final train loss SGD {lw_s:.3g} vs {lb_s:.3g}, Muon {lw_m:.3g} "
        f"vs {lb_m:.3g}; test accuracy in eval mode SGD {aw_s:.3f} vs {ab_s:.3f}, Muon {aw_m:.3f} vs {ab_m:.3f}. Two "
        "things work against it: (i) with b < d "
        "batch whitening sets XXᵀ = b·I, i.e. makes every pair of samples in a batch orthogonal and erases their "
        "similarity structure (isotropy table: mean pairwise cosine ≈ 0, Gram distance ≈ 0); (ii) the running "
        "statistics used in eval whiten differently from the rank-deficient batch statistics seen in training "
        f"(test accuracy with batch statistics: SGD {bw_s:.3f}, Muon {bw_m:.3f}). Group-wise whitening with "
        f"groups of 16 channels (fewer than the batch) keeps most of the alignment and trains "
        f"{'better' if g16_better else 'no better'} (train loss SGD {lg_s:.3g}, Muon {lg_m:.3g}; eval-mode test "
        f"accuracy SGD {ag_s:.3f}, Muon {ag_m:.3f})."
    )


def run(ctx: Context) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(ctx.seed)
    ctx.text(
        "For a linear layer Y = XW (X: a batch of b inputs of width d, one per row) with loss gradient G = ∂L/∂Y, "
        "the note claims: with isotropic inputs (XXᵀ ∝ I) the parameter update ΔW of SGD and of momentum-free "
        "Muon moves the layer's *features* along their own steepest descent direction — the cosine between "
        "ΔY = XΔW and −G (SGD) resp. −msign(G) (Muon; msign(G) = UVᵀ for G = UΣVᵀ) is 1 — while SignSGD's "
        "(−sign(G)) is not. Measured: that cosine, in each optimizer's own norm."
    )
    ratios = ctx.pick([0.5, 4.0], [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                      [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    syn = _synthetic_alignment(ctx, ratios, trials=ctx.pick(1, 6, 20))
    _report_synthetic(ctx, syn, ratios)

    cfg = _digits_setup(ctx)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 1, 3))]
    sel = _select(ctx, cfg, seeds)
    cfg["setting"] = sel["chosen"]
    _report_selection(ctx, sel, seeds)
    data = digits_generator_split(ctx.seed)
    runs = _digits_runs(ctx, data, cfg)
    _report_digits(ctx, runs, cfg)
    _plot_alignment(ctx, runs, cfg)

    sweep = _lr_sweep(ctx, runs, data, cfg)
    best = _best_by_lr(sweep, cfg["tail"])
    _report_sweep(ctx, sweep, cfg)
    _plot_training(ctx, best, _curve_treatments(ctx), cfg["steps"])

    ctx.result("verdict_alignment", {o: {t: _layer_mean(runs.get((o, t)), cfg["layers"], OWN_NORM[o])
                                         for t in TREATMENTS} for o in OPTIMIZERS})
    reps = _replicate_runs(ctx, runs, cfg, seeds)
    _claim(ctx, _alignment_replicates(reps, cfg, seeds), cfg, syn, ratios, seeds)
    _report_goal(ctx, sel, _replicates(reps, cfg, seeds), seeds)
    if ctx.mode == "smoke":
        ctx.text("*Smoke mode: sizes too small for conclusions; run quick or full mode.*")
    else:
        _verdict(ctx, syn, ratios, runs, best, cfg)
    ctx.result("wall_seconds", time.perf_counter() - t0)
