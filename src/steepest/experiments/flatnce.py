"""FlatNCE vs InfoNCE at small batch.

The note: Su, *FlatNCE: is floating-point error why small-batch contrastive learning
does poorly?*, kexue.fm/archives/8586 (after Chen et al., *Simpler, Faster, Stronger:
Breaking The log-K Curse On Contrastive Learners With FlatNCE*, arXiv:2107.01152).

Claim of the note: small-batch contrastive learning underperforms because once
pairs separate, ξ = Σ_{i≠t} e^{s_i − s_t} → 0 and InfoNCE's gradient drowns in
floating-point error; FlatNCE (gradient of log ξ) fixes it.

Protocol (:mod:`steepest.experiments._protocol`): SimCLR-style pre-training on
scikit-learn's 8×8 digits (augmentations written in torch: small affine, brightness,
noise, cutout), a small conv encoder with a projection head, Adam. Each replicate has
its own train/test division and seed; the validation part is shared. The frozen
representation h = ReLU(encoder output) — the projection head's input, SimCLR's h —
scaled to unit norm is probed with logistic regression (:data:`PROBE`: 1-shot and
5-shot, averaged over fixed random draws of the labelled examples, and all labels;
its C chosen per network on validation) on the validation part —
where each loss's temperature and learning rate are chosen, per batch size, from the
same grid — and on the test part, where the comparison is read, paired by replicate.
Two budgets: equal epochs (small batches take more steps) and equal steps.

Two explanations compete for a FlatNCE advantage: round-off (the note: InfoNCE's
positive gradient ξ/(1+ξ) falls below the unit roundoff u and becomes exactly 0)
and weighting (∇log(1+ξ) = ξ/(1+ξ)·∇log ξ down-weights easy anchors, FlatNCE
weights all equally). With cosine logits s_i ∈ [−1/T, 1/T], log ξ ≥ log(2B − 2) − 2/T
(:func:`xi_floor`), so round-off can only occur where that floor is below log u
(:func:`roundoff_reachable`); the float32 arm logs the share of anchors with ξ below
u₃₂ = 2⁻²⁴, a "bf16-loss" arm (float32 network, loss in bf16, u = 2⁻⁸) and a
pure-bfloat16 arm put the mechanism in reach at T = 0.1, so it can be seen whether
it changes the comparison.

A negative queue at batch 8: the small-batch remedy of MoCo (He et al., *Momentum
Contrast for Unsupervised Visual Representation Learning*, arXiv:1911.05722) and
lightly's memory bank — the last :data:`QUEUE` embeddings of earlier batches
(:class:`steepest.losses.NegativeQueue`, the second view of each pair, enqueued after
the step) as extra negatives of every anchor. Two arms (:data:`QUEUE_ARMS`): the
queue filled by the network being trained (a memory bank beside SimCLR), and MoCo's
form, where the second views — the positives' keys and what is queued — come from a
momentum copy of the network (an exponential moving average of its weights, no
gradient). Their temperature and lr are chosen on validation like the others'
(quick mode: those chosen for batch 8 without a queue, FlatNCE only). Read on the
test part beside the batch grid: each arm's effect at batch 8 and its distance to the
largest batch (:func:`queue_verdict`).

Measuring (``_job``: train and probe one run, in a worker with ``--jobs``) returns
plain :class:`Run` records; ``_report`` and the functions it calls write them.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import NegativeQueue, flat_nce, info_nce, nce_diagnostics, pair_logits
from ..report import Context, plural
from . import claim, full_command
from ._data import digits_three_way
from ._protocol import (FULL_SEEDS, MIN_SEEDS, choose, combine, direction_only, fmt_cell, fmt_interval, holm, interval,
                        n_caption, outcome, protocol_text)

TITLE = "FlatNCE vs InfoNCE at small batch"
# Small models: one intra-op thread is fastest (measured) and leaves the other core free.
THREADS = 1

REP_DIM = 64
PROJ_DIM = 32
PROBE_CS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # the probe's inverse regularizations C, chosen per run on validation (the validation optimum lies at 100-1000 here)
VAL_SIZE = 300  # images in the (fixed) validation part
TEST_SIZE = 500  # images in each replicate's test part
MECH_T = 0.1  # the temperature of the precision arms: where bf16 round-off can occur (see roundoff_reachable)
LOSSES = ("infonce", "flatnce")
STORED_FULL_RUN = "docs/results/flatnce-full/report.md"  # in the steepest repository
# 256 queued embeddings: 14 + 256 negatives per anchor at batch 8, between batch 64 (126) and batch 256 (510);
# without a momentum encoder the queue is at most 32 steps stale at batch 8
QUEUE = 256
QUEUE_MARGIN = 1.0  # percentage points: "closes the gap" allows batch 8 + queue this far below the largest batch
# the queue arms: name -> momentum of the key encoder (0: the queue holds the trained network's own embeddings)
QUEUE_ARMS = {"queue": 0.0, "queue + momentum encoder": 0.99}


# --------------------------------------------------------------------------- data and augmentation
def load_split(seed: int = 0) -> dict[str, Any]:
    """Replicate ``seed``: digits as (N, 1, 8, 8) in [0, 1]; training, validation (fixed) and test parts."""
    d = digits_three_way(seed, val=VAL_SIZE, test=TEST_SIZE, images=True)
    return {"xtr": d["xtr"], "ytr": d["ytr"].numpy(), "xva": d["xva"], "yva": d["yva"].numpy(), "xte": d["xte"],
            "yte": d["yte"].numpy()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine (±15°, scale 0.9–1.1, shift ≤ 0.8 px), brightness ×[0.7, 1.3],
    Gaussian noise σ = 0.05 and, with probability 1/2, a 3×3 cutout — per sample."""
    B = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, generator=gen)

    ang = u(-math.pi / 12, math.pi / 12)
    sc = u(0.9, 1.1)
    tx, ty = u(-0.2, 0.2), u(-0.2, 0.2)  # grid units: 1 px = 0.25
    theta = torch.stack(
        [torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang), tx], 1), torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), ty], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    y = (y * u(0.7, 1.3)[:, None, None, None]).clamp(0, 1)
    y = y + 0.05 * torch.randn(y.shape, generator=gen)
    cy = torch.randint(0, 6, (B,), generator=gen)
    cx = torch.randint(0, 6, (B,), generator=gen)
    on = torch.rand(B, generator=gen) < 0.5
    r = torch.arange(8)
    rows = (r[None] >= cy[:, None]) & (r[None] < cy[:, None] + 3)
    cols = (r[None] >= cx[:, None]) & (r[None] < cx[:, None] + 3)
    cut = rows[:, :, None] & cols[:, None, :] & on[:, None, None]
    return y.masked_fill(cut[:, None], 0.0)


# --------------------------------------------------------------------------- model
class Net(nn.Module):
    """Conv encoder (8×8 → 64-d representation) and a 2-layer projection head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, REP_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(REP_DIM, REP_DIM), nn.ReLU(), nn.Linear(REP_DIM, PROJ_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------- the round-off bound
U = {"fp32": 2.0**-24, "bf16": 2.0**-8}  # unit roundoff of the precision the loss is computed in


def xi_floor(batch: int, temperature: float, extra: int = 0) -> float:
    """The smallest log ξ cosine logits allow: every s_i − s_t ≥ −2/T over the 2B − 2 negatives (and ``extra``
    queued ones)."""
    return math.log(2 * batch - 2 + extra) - 2.0 / temperature


def roundoff_reachable(batch: int, temperature: float, u: float) -> bool:
    """Can InfoNCE's positive gradient ξ/(1 + ξ) fall below ``u`` at all (log ξ < log(u/(1 − u)))?"""
    return xi_floor(batch, temperature) < math.log(u / (1 - u))


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    loss: str
    batch: int
    temperature: float
    seed: int
    precision: str  # "fp32" | "bf16-loss" (fp32 network, loss in bf16) | "bf16" (everything bf16)
    lr: float = 1e-3
    budget: int = 0  # optimizer steps this run is given
    steps: int = 0
    seconds: float = 0.0
    probe: dict[str, float] = field(default_factory=dict)  # on the test part
    probe_val: dict[str, float] = field(default_factory=dict)  # on the validation part
    probe_c: dict[str, float] = field(default_factory=dict)  # the probe's C per accuracy key, chosen on validation
    draw_sd: dict[str, float] = field(default_factory=dict)  # sd of the k-shot test accuracy over the draws
    variants: dict[str, float] = field(default_factory=dict)  # 1-shot test accuracy per PROBE_VARIANTS entry
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch
    nonfinite: bool = False
    queue: int = 0  # embeddings of earlier batches used as extra negatives (0: none)
    momentum: float = 0.0  # > 0: second views (and the queue) from a momentum copy of the network, MoCo's key encoder

    @property
    def key(self) -> tuple[str, int, float, int, str, float, int, int, float]:
        return (self.loss, self.batch, self.temperature, self.seed, self.precision, self.lr, self.budget, self.queue,
                self.momentum)


def train(x: torch.Tensor, run: Run) -> Net:
    """Pre-train for ``run.budget`` optimizer steps (whole epochs where the budget is a number of epochs)."""
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(10_000 + run.seed)
    net = Net()
    dt = torch.bfloat16 if run.precision == "bf16" else torch.float32
    cd = torch.bfloat16 if run.precision in ("bf16", "bf16-loss") else None  # the loss's compute dtype
    net = net.to(dt)
    opt = torch.optim.Adam(net.parameters(), lr=run.lr)
    n = x.shape[0]
    per_epoch = n // run.batch
    stat_every = max(1, per_epoch // 8)
    queue = NegativeQueue(run.queue, PROJ_DIM) if run.queue else None
    keys = None
    if run.momentum:  # MoCo's key encoder: an exponential moving average of the network, no gradient
        keys = copy.deepcopy(net).requires_grad_(False)
    t0 = time.perf_counter()
    while run.steps < run.budget:
        perm = torch.randperm(n, generator=gen)
        rec: list[dict[str, float]] = []
        for k in range(per_epoch):
            xb = x[perm[k * run.batch : (k + 1) * run.batch]]
            if keys is None:
                z1, z2 = net(torch.cat([augment(xb, gen), augment(xb, gen)]).to(dt)).chunk(2)
            else:
                a1, a2 = augment(xb, gen), augment(xb, gen)
                z1 = net(a1.to(dt))
                with torch.no_grad():
                    z2 = keys(a2.to(dt))
            logits, target = pair_logits(z1, z2, run.temperature, dtype=cd, negatives=queue)
            if run.loss == "flatnce":
                loss = flat_nce(logits, target, value="info_nce", dtype=cd)
            else:
                loss = info_nce(logits, target, dtype=cd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if keys is not None:
                with torch.no_grad():
                    for pk, p in zip(keys.parameters(), net.parameters()):
                        pk.lerp_(p, 1.0 - run.momentum)
            if queue is not None:  # after the loss: a batch is never its own queued negative
                queue.enqueue(z2.detach().float())
            run.steps += 1
            if k % stat_every == 0:
                d = nce_diagnostics(logits, target, xi_threshold=1e-3)
                d16 = nce_diagnostics(logits, target, resolution_dtype=torch.bfloat16)
                rec.append(
                    {
                        "info_nce": float(loss.detach()),
                        "xi_lt_1e-3": d["share_xi_below"],
                        "below_fp32": d["share_below_resolution"],
                        "below_bf16": d16["share_below_resolution"],
                        "median_log10_xi": d["log10_xi_quantiles"][0.5],
                        "min_log_xi_floor": xi_floor(run.batch, run.temperature, logits.shape[1] - (2 * run.batch - 1)),
                    }
                )
            if run.steps >= run.budget:
                break
        run.curve.append({key: statistics.fmean(r[key] for r in rec) for key in rec[0]})
    run.seconds = time.perf_counter() - t0
    run.nonfinite = not all(torch.isfinite(p).all() for p in net.parameters())
    return net


# --------------------------------------------------------------------------- probes
LAYERS = ("representation", "pre-activation", "projection")


@torch.no_grad()
def features(net: Net, x: torch.Tensor, layer: str = "representation") -> np.ndarray:
    """Frozen features of ``x``: ``"representation"`` is h = ReLU(encoder(x)), what the projection head reads
    (SimCLR's h, the output of the encoder's last non-linearity); ``"pre-activation"`` the encoder's last linear
    output before that ReLU (the layer probed before); ``"projection"`` the head's output z, the vectors the loss
    compares."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    dt = next(net.parameters()).dtype
    h = net.encoder(x.to(dt))
    out = torch.relu(h) if layer == "representation" else h if layer == "pre-activation" else net.head(h)
    return out.float().numpy().astype(np.float64)


def few_shot_draws(y: np.ndarray, shots: int, draws: int, seed: int) -> list[np.ndarray]:
    """Index sets with ``shots`` labelled examples per class; fixed across runs (paired comparison)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    return [np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes]) for _ in range(draws)]


@dataclass(frozen=True)
class ProbeSpec:
    """How frozen features are probed: the layer, the scaling of the features, and the candidate inverse
    regularizations C of the logistic regression (with more than one, C is chosen on the validation part for each
    accuracy key: the C with the highest mean validation accuracy; ties go to the smaller C)."""

    layer: str = "representation"
    scaling: str = "l2"  # "l2": every feature vector scaled to unit norm (the cosine geometry the loss trains);
    # "standardize": every coordinate z-scored with the training features' mean and sd
    cs: tuple[float, ...] = PROBE_CS


#: the probe behind every reported accuracy
PROBE = ProbeSpec()
#: the probe of the earlier protocol (encoder pre-activation, standardised, C = 1 fixed), kept for comparison
PROBE_BEFORE = ProbeSpec("pre-activation", "standardize", (1.0,))
#: the probe variants compared at the smallest batch (1-shot), the first being the reported probe
PROBE_VARIANTS = {
    "representation h = ReLU(encoder), L2, C on validation (the probe)": PROBE,
    "representation h, standardised, C on validation": ProbeSpec("representation", "standardize"),
    "encoder pre-activation, standardised, C = 1 (earlier protocol)": PROBE_BEFORE,
    "encoder pre-activation, standardised, C on validation": ProbeSpec("pre-activation", "standardize"),
    "encoder pre-activation, L2, C on validation": ProbeSpec("pre-activation", "l2"),
    "projection z, L2, C on validation": ProbeSpec("projection", "l2"),
}


def _scaled(scaling: str, ftr: np.ndarray, others: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    if scaling == "standardize":
        from sklearn.preprocessing import StandardScaler

        sc = StandardScaler().fit(ftr)  # unlabelled training features only
        return sc.transform(ftr), [sc.transform(o) for o in others]
    if scaling == "l2":
        unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)  # noqa: E731
        return unit(ftr), [unit(o) for o in others]
    raise ValueError(f"scaling must be 'l2' or 'standardize', got {scaling!r}")


def probe(ftr: np.ndarray, ytr: np.ndarray, parts: dict[str, tuple[np.ndarray, np.ndarray]],
          draws: dict[int, list[np.ndarray]], spec: ProbeSpec = PROBE, *, full: bool = True,
          select: str = "val") -> dict[str, dict[str, float]]:
    """Logistic-regression probes fitted on labelled training features (k-shot: on each draw, accuracy averaged
    over the draws; "full": on all of them) and scored on each of ``parts`` (name → features, labels).

    Returns ``{part: {"1-shot": %, ...}}`` plus ``"C"`` (the C used per key, chosen on ``parts[select]`` when
    ``spec.cs`` has more than one) and ``"draw_sd"`` (per k-shot key, the sd of the accuracy over the draws on
    the last part: the draws' own noise, so a mean over n draws carries ± draw_sd/√n). Non-finite features give
    NaN accuracies."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    keys = [f"{k}-shot" for k in draws] + (["full"] if full else [])
    names = list(parts)
    if len(spec.cs) > 1 and select not in parts:
        raise ValueError(f"choosing C needs the {select!r} part; parts are {names}")
    if not (np.isfinite(ftr).all() and all(np.isfinite(f).all() for f, _ in parts.values())):
        return {**{p: {k: math.nan for k in keys} for p in names}, "C": {}, "draw_sd": {}}
    a, scaled = _scaled(spec.scaling, ftr, [f for f, _ in parts.values()])
    b = {p: (f, parts[p][1]) for p, f in zip(names, scaled)}
    acc: dict[float, dict[str, dict[str, list[float]]]] = {}
    with threadpool_limits(1):  # tiny problems: BLAS threads only add contention
        for c in spec.cs:
            acc[c] = {p: {k: [] for k in keys} for p in names}
            fits = [(f"{k}-shot", idx) for k, sets in draws.items() for idx in sets] + ([("full", None)] if full else [])
            for key, idx in fits:
                xa, ya = (a, ytr) if idx is None else (a[idx], ytr[idx])
                clf = LogisticRegression(C=c, max_iter=3000).fit(xa, ya)
                for p, (f, y) in b.items():
                    acc[c][p][key].append(100.0 * clf.score(f, y))
    chosen = {k: spec.cs[0] if len(spec.cs) == 1 else
              max(spec.cs, key=lambda c, k=k: (statistics.fmean(acc[c][select][k]), -c)) for k in keys}
    out: dict[str, dict[str, float]] = {p: {k: statistics.fmean(acc[chosen[k]][p][k]) for k in keys} for p in names}
    out["C"] = chosen
    out["draw_sd"] = {k: statistics.stdev(acc[chosen[k]][names[-1]][k]) for k in keys
                      if k != "full" and len(acc[chosen[k]][names[-1]][k]) > 1}
    return out


# --------------------------------------------------------------------------- report helpers
ARMS = {
    "fp32": "float32",
    "bf16-loss": "bfloat16 loss (float32 network; embeddings, logits and the loss in bf16)",
    "bf16": "pure bfloat16 (weights, activations, Adam state and the loss in bf16)",
}
_LOSS = {"infonce": "InfoNCE", "flatnce": "FlatNCE"}


def _ms(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(vals: list[float]) -> str:
    """Mean ± std over seeds; the mean alone for one seed (a spread of one value is no spread)."""
    m, s = _ms(vals)
    if math.isnan(m):
        return "nan"
    return f"{m:.1f} ± {s:.1f}" if sum(not math.isnan(v) for v in vals) > 1 else f"{m:.1f}"


def _tail(run: Run, key: str) -> float:
    """Mean of ``key`` over the last 20 % of epochs."""
    k = max(1, len(run.curve) // 5)
    return statistics.fmean(c[key] for c in run.curve[-k:])


def _fmt_gap(gaps: list[float]) -> str:
    """A paired gap in percentage points with its interval (one value: the value, direction only)."""
    return fmt_interval(interval(gaps), ".1f", " pp") if gaps else "–"


# --------------------------------------------------------------------------- the plan
def _config(ctx: Context) -> dict[str, Any]:
    cfg = ctx.pick(
        smoke=dict(batches=[8], temps=[0.1, 0.5], lrs=[1e-3], sel=1, seeds=1, bf16_seeds=1, epochs=1, cap=6,
                   bf16_loss=[8], bf16=[8], draws=2, n_train=200),
        quick=dict(batches=[8, 64], temps=[0.1, 0.2, 0.5], lrs=[1e-3], sel=1, seeds=1, bf16_seeds=1, epochs=4, cap=None,
                   bf16_loss=[8], bf16=[8], draws=10, n_train=None),
        full=dict(batches=[8, 16, 32, 64, 256], temps=[0.1, 0.2, 0.5], lrs=[1e-3, 3e-3], sel=2, seeds=3,
                  bf16_seeds=3, epochs=50, cap=None, bf16_loss=[8, 16], bf16=[8], draws=20, n_train=None),
    )  # bfloat16 matmul/conv has no fast CPU kernel here (~5-10x slower), hence the small pure-bf16 arm
    # the queue arm at the smallest batch: its own T × lr grid, or (quick) the settings chosen there without it
    cfg["queue"] = ctx.pick(16, QUEUE, QUEUE)
    cfg["queue_grid"] = ctx.pick(True, False, False)
    cfg["queue_losses"] = ctx.pick(LOSSES, ("flatnce",), LOSSES)
    cfg["n"] = cfg["n_train"] or (1797 - VAL_SIZE - TEST_SIZE)
    ref = 64 if 64 in cfg["batches"] else cfg["batches"][len(cfg["batches"]) // 2]
    cfg["equal_steps_ref"] = ref
    cfg["equal_steps"] = cfg["cap"] or cfg["epochs"] * (cfg["n"] // ref)
    return cfg


def _epochs_budget(cfg: dict[str, Any], batch: int) -> int:
    """Optimizer steps of the equal-epochs budget at ``batch``."""
    return cfg["cap"] or cfg["epochs"] * (cfg["n"] // batch)


def _job(job: tuple[Run, int | None, int, bool]) -> Run:
    """Train one run and probe it on validation and test (with ``variants``, also every probe of
    :data:`PROBE_VARIANTS`, 1-shot); self-contained (loads its replicate's parts, seeds itself) so it can run in a
    worker."""
    r, n_train, n_draws, variants = job
    d = load_split(r.seed)
    xtr, ytr = d["xtr"], d["ytr"]
    if n_train:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    draws = {k: few_shot_draws(ytr, k, n_draws, 12_345 + k) for k in (1, 5)}
    net = train(xtr, r)
    feats: dict[str, tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}

    def layer(name: str) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
        if name not in feats:
            feats[name] = (features(net, xtr, name), {"val": (features(net, d["xva"], name), d["yva"]),
                                                      "test": (features(net, d["xte"], name), d["yte"])})
        return feats[name]

    ftr, parts = layer(PROBE.layer)
    out = probe(ftr, ytr, parts, draws)
    r.probe, r.probe_val, r.probe_c, r.draw_sd = out["test"], out["val"], out["C"], out["draw_sd"]
    if variants:
        for name, spec in PROBE_VARIANTS.items():
            r.variants[name] = r.probe["1-shot"] if spec == PROBE else probe(
                layer(spec.layer)[0], ytr, layer(spec.layer)[1], {1: draws[1]}, spec, full=False)["test"]["1-shot"]
    return r


def _cost(r: Run) -> float:
    """Rough seconds of a run, to start the longest first.

    Fitted to per-step times measured on one thread: float32 and bf16-loss about
    5 ms + 0.33 ms per pair (batch 8: 7 ms, 256: 88 ms); pure bf16 about 5.7 ms per
    pair (no fast bf16 CPU kernels).
    """
    return r.budget * (0.0057 * r.batch if r.precision == "bf16" else 0.005 + 0.00033 * r.batch)


class _Runs:
    """The runs of this section, each trained once (keyed by its settings), spread by ``ctx.map``."""

    def __init__(self, ctx: Context, cfg: dict[str, Any]) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.done: dict[tuple, Run] = {}

    def run(self, plan: list[Run], description: str) -> None:
        todo = list({r.key: r for r in plan if r.key not in self.done}.values())
        todo.sort(key=lambda r: -_cost(r))  # longest first
        b0 = min(self.cfg["batches"])
        jobs = [(r, self.cfg["n_train"], self.cfg["draws"], r.batch == b0 and r.precision == "fp32" and not r.queue)
                for r in todo]
        for _, done in self.ctx.map(_job, jobs, description):
            self.done[done.key] = done
            self.ctx.log(f"{done.precision} {done.loss} B={done.batch} T={done.temperature} lr={done.lr} "
                         f"seed={done.seed} steps={done.steps}: val {done.probe_val} test {done.probe}")

    def get(self, loss: str, batch: int, t: float, lr: float, seeds: list[int], precision: str = "fp32",
            budget: int = 0, queue: int = 0, momentum: float = 0.0) -> list[Run]:
        return [self.done[(loss, batch, t, s, precision, lr, budget, queue, momentum)] for s in seeds]


def _val_score(runs: list[Run]) -> float:
    """Mean validation 1-shot accuracy over the runs; −inf when one diverged (never chosen)."""
    vals = [r.probe_val.get("1-shot", math.nan) for r in runs]
    return statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) and not any(
        r.nonfinite for r in runs) else -math.inf


def _measure(ctx: Context, cfg: dict[str, Any]) -> dict[str, Any]:
    """Selection on validation, then the evaluation runs; returns the choices and the runs they rest on."""
    seeds = [ctx.seed + s for s in range(cfg["seeds"])]
    sel_seeds = seeds[: cfg["sel"]]
    runs = _Runs(ctx, cfg)
    grid = [(t, lr) for t in cfg["temps"] for lr in cfg["lrs"]]
    b0, nq = min(cfg["batches"]), cfg["queue"]
    qbudget = _epochs_budget(cfg, b0)
    qcells = [(arm, loss) for arm in QUEUE_ARMS for loss in cfg["queue_losses"]]
    qsel = [Run(loss, b0, t, s, "fp32", lr, qbudget, queue=nq, momentum=QUEUE_ARMS[arm]) for arm, loss in qcells
            for t, lr in grid for s in sel_seeds] if cfg["queue_grid"] else []
    runs.run([Run(loss, b, t, s, "fp32", lr, _epochs_budget(cfg, b)) for b in cfg["batches"] for loss in LOSSES
              for t, lr in grid for s in sel_seeds] + qsel, "flatnce: temperature × lr grid (validation)")
    scores = {(loss, b): {(t, lr): _val_score(runs.get(loss, b, t, lr, sel_seeds, budget=_epochs_budget(cfg, b)))
                          for t, lr in grid} for loss in LOSSES for b in cfg["batches"]}
    chosen = {k: choose(sc, higher=True) for k, sc in scores.items()}
    if cfg["queue_grid"]:
        q_scores = {(arm, loss): {(t, lr): _val_score(runs.get(loss, b0, t, lr, sel_seeds, budget=qbudget, queue=nq,
                                                               momentum=QUEUE_ARMS[arm])) for t, lr in grid}
                    for arm, loss in qcells}
        q_chosen = {k: choose(sc, higher=True) for k, sc in q_scores.items()}
    else:
        q_scores, q_chosen = {}, {(arm, loss): chosen[(loss, b0)] for arm, loss in qcells}
    # the precision and temperature arms: each loss at the lr chosen for that temperature
    t_lr = {(loss, b, t): choose({lr: sc[(t, lr)] for lr in cfg["lrs"]}, higher=True)
            for (loss, b), sc in scores.items() for t in cfg["temps"]}
    mech_lr = {(loss, b): t_lr[(loss, b, MECH_T)] for loss, b in scores}
    plan = []
    for (loss, b), (t, lr) in chosen.items():
        plan += [Run(loss, b, t, s, "fp32", lr, _epochs_budget(cfg, b)) for s in seeds]
        plan += [Run(loss, b, t, s, "fp32", lr, cfg["equal_steps"]) for s in seeds]
    mech_batches = sorted(set(cfg["bf16_loss"]) | set(cfg["bf16"]))
    bf16_seeds = seeds[: cfg["bf16_seeds"]]
    for loss in LOSSES:
        for b in mech_batches:
            lr = mech_lr[(loss, b)]
            plan += [Run(loss, b, MECH_T, s, "fp32", lr, _epochs_budget(cfg, b)) for s in seeds]
            if b in cfg["bf16_loss"]:
                plan += [Run(loss, b, MECH_T, s, "bf16-loss", lr, _epochs_budget(cfg, b)) for s in seeds]
            if b in cfg["bf16"]:
                plan += [Run(loss, b, MECH_T, s, "bf16", lr, _epochs_budget(cfg, b)) for s in bf16_seeds]
    plan += [Run(loss, b0, t, s, "fp32", lr, qbudget, queue=nq, momentum=QUEUE_ARMS[arm])
             for (arm, loss), (t, lr) in q_chosen.items() for s in seeds]
    plan += [Run(loss, b0, t, s, "fp32", t_lr[(loss, b0, t)], qbudget) for loss in LOSSES for t in cfg["temps"]
             for s in seeds]
    runs.run(plan, "flatnce: evaluation runs (chosen settings, equal steps, precision arms, queue)")
    return {"runs": runs, "seeds": seeds, "sel_seeds": sel_seeds, "bf16_seeds": bf16_seeds, "scores": scores,
            "chosen": chosen, "mech_lr": mech_lr, "t_lr": t_lr, "mech_batches": mech_batches, "grid": grid,
            "queue": {"size": nq, "batch": b0, "chosen": q_chosen, "scores": q_scores}}


def _arm(m: dict[str, Any], cfg: dict[str, Any], loss: str, b: int, budget: str) -> list[Run]:
    """The evaluation runs of ``loss`` at batch ``b`` at its chosen settings, for the "epochs" or "steps" budget."""
    t, lr = m["chosen"][(loss, b)]
    steps = _epochs_budget(cfg, b) if budget == "epochs" else cfg["equal_steps"]
    return m["runs"].get(loss, b, t, lr, m["seeds"], budget=steps)


def _mech(m: dict[str, Any], cfg: dict[str, Any], loss: str, b: int, precision: str) -> list[Run]:
    seeds = m["bf16_seeds"] if precision == "bf16" else m["seeds"]
    return m["runs"].get(loss, b, MECH_T, m["mech_lr"][(loss, b)], seeds, precision, _epochs_budget(cfg, b))


def _queue_arm(m: dict[str, Any], cfg: dict[str, Any], arm: str, loss: str) -> list[Run]:
    """The evaluation runs of queue arm ``arm`` for ``loss`` at the smallest batch, at its chosen settings."""
    q = m["queue"]
    t, lr = q["chosen"][(arm, loss)]
    return m["runs"].get(loss, q["batch"], t, lr, m["seeds"], budget=_epochs_budget(cfg, q["batch"]), queue=q["size"],
                         momentum=QUEUE_ARMS[arm])


def _gap(f: list[Run], i: list[Run], key: str = "1-shot") -> list[float]:
    """Paired FlatNCE − InfoNCE probe accuracy (pp) on the test part, replicate by replicate."""
    return [a.probe[key] - c.probe[key] for a, c in zip(f, i)]


# --------------------------------------------------------------------------- verdicts
def advantage_verdict(gaps: list[float]) -> str:
    """FlatNCE beats InfoNCE at small batch? From the paired test gaps FlatNCE − InfoNCE (pp), each loss at its
    own settings chosen on validation: held when the whole 95 % interval lies above 0, partly held when the mean
    does, not held otherwise; fewer than MIN_SEEDS replicates: not measured."""
    return outcome(interval(gaps), above=0.0)


def roundoff_verdict(growth: dict[str, list[float]], fp32_share: float | None) -> str:
    """Is round-off why FlatNCE wins? Round-off as the cause predicts (a) a gap FlatNCE − InfoNCE that grows as
    the precision drops — per bf16 arm, the paired growth gap(arm) − gap(float32) above 0 (interval outcome) —
    and (b) float32 InfoNCE anchors below float32 resolution where the bound lets them occur (``fp32_share``:
    their largest share; None where the bound rules them out, which then is no evidence either way).
    Combined (:func:`combine`): held when every part holds, not held when none does, else partly held."""
    parts = [outcome(interval(g), above=0.0) for g in growth.values() if g]
    if not parts:
        return "not measured"
    if fp32_share is not None and "not measured" not in parts:
        parts.append("held" if fp32_share > 0 else "not held")
    return combine(parts)


def queue_verdict(to_large: dict[str, list[float]], margin: float = QUEUE_MARGIN) -> str:
    """Does a negative queue at batch 8 close the gap to the largest batch? Per loss, the paired test gaps
    (batch 8 + queue) − (largest batch) in 1-shot accuracy (pp): held when the whole 95 % interval lies above
    −``margin``, partly held when its mean does, not held otherwise; combined over the losses (:func:`combine`)."""
    if not to_large:
        return "not measured"
    return combine([outcome(interval(g), above=-margin) for g in to_large.values()])


def _claims(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    b0 = min(cfg["batches"])
    seeds = m["seeds"]
    cmd = full_command("flatnce", jobs=True)
    f, i = _arm(m, cfg, "flatnce", b0, "epochs"), _arm(m, cfg, "infonce", b0, "epochs")
    gaps = _gap(f, i)
    steps_gap = _gap(_arm(m, cfg, "flatnce", b0, "steps"), _arm(m, cfg, "infonce", b0, "steps"))
    mech_gap = _gap(_mech(m, cfg, "flatnce", b0, "fp32"), _mech(m, cfg, "infonce", b0, "fp32"))
    (tf, lf), (ti, li) = m["chosen"][("flatnce", b0)], m["chosen"][("infonce", b0)]
    few = len(seeds) < MIN_SEEDS
    claim(ctx, "flatnce", f"At small batch (batch {b0}), FlatNCE pre-training gives better representations than "
          "InfoNCE, each loss at its own temperature and learning rate chosen on validation (1-shot linear probe "
          "on held-out test images, equal epochs)", advantage_verdict(gaps),
          f"FlatNCE (T = {tf:g}, lr {lf:g}) − InfoNCE (T = {ti:g}, lr {li:g}) at batch {b0}, 1-shot: "
          f"{_fmt_gap(gaps)}; equal steps ({cfg['equal_steps']} steps): {_fmt_gap(steps_gap)}; both at T = "
          f"{MECH_T:g}: {_fmt_gap(mech_gap)}" + (f" ({plural(cfg['epochs'], 'epoch')}: direction only)" if few else ""),
          split="test", seeds=seeds, command=cmd if few else None)

    growth, arms_txt = {}, []
    base = _mech(m, cfg, "flatnce", b0, "fp32"), _mech(m, cfg, "infonce", b0, "fp32")
    g32 = _gap(*base)
    for arm in ("bf16-loss", "bf16"):
        if b0 not in cfg[arm.replace("-", "_")]:
            continue
        g = _gap(_mech(m, cfg, "flatnce", b0, arm), _mech(m, cfg, "infonce", b0, arm))
        growth[arm] = [a - b for a, b in zip(g, g32)]
        arms_txt.append(f"{arm} − float32 {_fmt_gap(growth[arm])}")
    reach = roundoff_reachable(b0, MECH_T, U["fp32"])
    share = max(max(c["below_fp32"] for c in r.curve) for r in base[1]) if reach else None
    fl = xi_floor(b0, MECH_T)
    bound = (f"log ξ ≥ log(2B − 2) − 2/T = {fl:.2f} at batch {b0}, T = {MECH_T:g}, against log u = "
             f"{math.log(U['fp32']):.2f} (float32) and {math.log(U['bf16']):.2f} (bfloat16)")
    at_chosen = (f"at InfoNCE's chosen T = {ti:g}, round-off is "
                 + ("possible" if roundoff_reachable(b0, ti, U["fp32"]) else "impossible") + " in float32 and "
                 + ("possible" if roundoff_reachable(b0, ti, U["bf16"]) else "impossible") + " in bfloat16")
    claim(ctx, "flatnce", "InfoNCE falls behind because its gradient is lost to floating-point round-off "
          "(ξ/(1 + ξ) below the unit roundoff u) once ξ → 0", roundoff_verdict(growth, share),
          f"bound {bound}; {at_chosen}; largest share of float32 InfoNCE anchors with ξ < u₃₂ (batch {b0}, "
          f"T = {MECH_T:g}): " + (f"{share:.3g}" if share is not None else "unreachable by the bound")
          + "; growth of the 1-shot gap FlatNCE − InfoNCE as the precision drops (paired): "
          + ("; ".join(arms_txt) or "no bf16 arm") + (" (direction only)" if few else ""),
          split="test", seeds=seeds, command=cmd if few else None)


# --------------------------------------------------------------------------- report
def _report(ctx: Context, m: dict[str, Any], refs: dict[str, dict[str, float]], cfg: dict[str, Any]) -> None:
    ctx.table(["reference (first replicate)", "1-shot", "5-shot", "full"],
              [[name, r["1-shot"], r["5-shot"], r["full"]] for name, r in refs.items()],
              caption="Probe accuracy (%) of the references on the test part.", floatfmt=".1f")
    _report_selection(ctx, m, cfg)
    _report_cells(ctx, m, cfg)
    _report_probe(ctx, m, cfg)
    _report_differences(ctx, m, cfg)
    _report_bound(ctx, m, cfg)
    _summary(ctx, m, cfg)
    _claims(ctx, m, cfg)
    _report_queue(ctx, m, cfg)
    _plot_probe_vs_batch(ctx, m, cfg, refs)
    _plot_xi(ctx, m, cfg)
    ctx.result("references", refs)
    ctx.result("epochs", cfg["epochs"])
    ctx.result("equal_steps", cfg["equal_steps"])
    ctx.result("chosen", [{"loss": loss, "batch": b, "T": t, "lr": lr, "mech_lr": m["mech_lr"][(loss, b)]}
                          for (loss, b), (t, lr) in m["chosen"].items()])
    ctx.result("selection_val_1shot", [{"loss": loss, "batch": b, "T": t, "lr": lr, "val_1shot": v}
                                       for (loss, b), sc in m["scores"].items() for (t, lr), v in sc.items()])
    ctx.result("runs", [{"loss": r.loss, "batch": r.batch, "T": r.temperature, "lr": r.lr, "seed": r.seed,
                         "precision": r.precision, "budget": r.budget, "queue": r.queue, "momentum": r.momentum,
                         "steps": r.steps,
                         "seconds": r.seconds, **r.probe, "val": r.probe_val, "C": r.probe_c,
                         "draw_sd": r.draw_sd, "probe_variants_1shot": r.variants}
                        for r in sorted(m["runs"].done.values(), key=lambda r: r.key)])


def _report_probe(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The probe protocol (which layer, scaling, C) and each temperature, at the smallest batch, on test."""
    b0, seeds = min(cfg["batches"]), m["seeds"]
    f, i = _arm(m, cfg, "flatnce", b0, "epochs"), _arm(m, cfg, "infonce", b0, "epochs")
    rows, rec = [], []
    for name in PROBE_VARIANTS:
        vf, vi = [r.variants[name] for r in f], [r.variants[name] for r in i]
        rows.append([name, fmt_cell(vf, ".1f"), fmt_cell(vi, ".1f"), _fmt_gap([a - b for a, b in zip(vf, vi)])])
        rec.append({"probe": name, "flatnce_1shot": vf, "infonce_1shot": vi,
                    "gap": interval([a - b for a, b in zip(vf, vi)]).record("pp")})
    sd = [r.draw_sd.get("1-shot", math.nan) for r in f + i]
    sd_mean = statistics.fmean(v for v in sd if math.isfinite(v)) if any(math.isfinite(v) for v in sd) else math.nan
    cs = sorted({r.probe_c.get("1-shot", math.nan) for r in f + i})
    ctx.table(["probe (1-shot, test)", f"FlatNCE (T = {f[0].temperature:g})", f"InfoNCE (T = {i[0].temperature:g})",
               "paired gap"], rows, caption=(
        f"**Which probe.** 1-shot accuracy (%) at batch {b0} of the same trained networks (each loss at its chosen "
        f"settings, equal epochs), {n_caption(len(seeds), 'replicate')}, read through different probes: the layer "
        "(h = ReLU(encoder output), the projection head's input; the encoder's linear output before that ReLU; the "
        "head's output z), the scaling of the features (unit L2 norm, the cosine geometry the loss trains, or "
        "per-coordinate standardisation) and the logistic regression's C (fixed at 1, or chosen per network on the "
        f"validation part from {{{', '.join(f'{c:g}' for c in PROBE_CS)}}}; chosen for the reported probe here: "
        f"{', '.join(f'{c:g}' for c in cs)}). The draws' own noise: the 1-shot accuracy varies by "
        f"{sd_mean:.1f} points (sd) from draw to draw, so a mean over {cfg['draws']} draws carries about "
        f"±{sd_mean / math.sqrt(cfg['draws']):.1f}; the draws do not move the level."))
    ctx.result("probe_variants", {"batch": b0, "draw_sd_1shot": sd_mean, "draws": cfg["draws"],
                                  "chosen_C_1shot": cs, "rows": rec})
    rows, rec = [], []
    for t in cfg["temps"]:
        arm = {loss: m["runs"].get(loss, b0, t, m["t_lr"][(loss, b0, t)], seeds, budget=_epochs_budget(cfg, b0))
               for loss in LOSSES}
        g = _gap(arm["flatnce"], arm["infonce"])
        rows.append([t, *[f"{fmt_cell([r.probe['1-shot'] for r in arm[loss]], '.1f')} (lr {arm[loss][0].lr:g})"
                          for loss in ("flatnce", "infonce")], _fmt_gap(g)])
        rec.append({"T": t, **{f"{loss}_1shot": [r.probe["1-shot"] for r in arm[loss]] for loss in LOSSES},
                    **{f"{loss}_lr": arm[loss][0].lr for loss in LOSSES}, "gap": interval(g).record("pp")})
    ctx.table(["T", "FlatNCE 1-shot %", "InfoNCE 1-shot %", "FlatNCE − InfoNCE"], rows, caption=(
        f"**Each temperature at batch {b0}** (equal epochs, test part, {n_caption(len(seeds), 'replicate')}): each "
        "loss at the learning rate chosen on validation for that temperature; the chosen temperature's row is the "
        "claim's comparison only where both losses chose it."))
    ctx.result("temperatures_smallest_batch", {"batch": b0, "rows": rec})


def _report_queue(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Batch 8 with a negative queue (both arms) beside the batch grid (equal epochs, each at its chosen settings)."""
    q, seeds = m["queue"], m["seeds"]
    b0, big = q["batch"], max(cfg["batches"])
    rows, rec, to_large, to_plain = [], {}, {}, {}
    for loss in cfg["queue_losses"]:
        plain, large = _arm(m, cfg, loss, b0, "epochs"), _arm(m, cfg, loss, big, "epochs")
        cells = [(f"batch {b}", _arm(m, cfg, loss, b, "epochs")) for b in cfg["batches"]]
        for k, arm in enumerate(QUEUE_ARMS):
            qr = _queue_arm(m, cfg, arm, loss)
            cells.insert(1 + k, (f"batch {b0} + {arm}", qr))
            to_plain[(arm, loss)], to_large[(arm, loss)] = _gap(qr, plain), _gap(qr, large)
            rec[f"{arm} / {loss}"] = {
                "arm": arm, "loss": loss, "momentum": QUEUE_ARMS[arm], "T": qr[0].temperature, "lr": qr[0].lr,
                "steps": qr[0].steps, "seeds": [r.seed for r in qr],
                **{k2: [r.probe[k2] for r in qr] for k2 in ("1-shot", "5-shot", "full")},
                "plain_1shot": [r.probe["1-shot"] for r in plain],
                "largest_batch_1shot": [r.probe["1-shot"] for r in large],
                "queue_minus_plain_1shot": interval(to_plain[(arm, loss)]).record("pp"),
                "queue_minus_largest_1shot": interval(to_large[(arm, loss)]).record("pp"),
                "plain_minus_largest_1shot": interval(_gap(plain, large)).record("pp")}
        for label, rs in cells:
            rows.append([_LOSS[loss], label, rs[0].temperature, rs[0].lr, rs[0].steps,
                         *[fmt_cell([r.probe[k2] for r in rs], ".1f") for k2 in ("1-shot", "5-shot", "full")],
                         f"{statistics.fmean(_tail(r, 'info_nce') for r in rs):.3g}"])
    grid_note = ("their temperature and lr chosen on validation from the same "
                 f"{plural(len(m['grid']), 'candidate')} as the others" if cfg["queue_grid"] else
                 f"at the temperature and lr chosen on validation for batch {b0} without a queue (`{ctx.mode}` mode "
                 "keeps these arms small; the full run gives each its own grid and both losses)")
    mom = QUEUE_ARMS["queue + momentum encoder"]
    ctx.table(["loss", "arm", "T", "lr", "steps", "1-shot %", "5-shot %", "full %", "InfoNCE (end)"], rows, caption=(
        f"**A negative queue at batch {b0}**: the {q['size']} most recent second-view embeddings of earlier batches "
        f"(normalised, no gradient) as extra negatives of every anchor — {2 * b0 - 2 + q['size']} negatives instead of "
        f"{2 * b0 - 2}. 'queue': filled by the network being trained; 'queue + momentum encoder': MoCo's form, the "
        f"second views (keys of the positives, and what is queued) from a copy of the network whose weights follow it "
        f"as an exponential moving average (momentum {mom:g}). Beside the batch grid; equal epochs "
        f"({plural(cfg['epochs'], 'epoch')}), probe accuracy on the test part, {n_caption(len(seeds), 'replicate')}. "
        f"The queue arms run {grid_note}; the rows without a queue are those of the tables above. The InfoNCE value of "
        "the queue arms counts the queued negatives (chance: log of the number of candidates)."), floatfmt=".3g")
    ctx.table(["loss", "arm", f"− batch {b0} (no queue)", f"− batch {big}", f"batch {b0} − batch {big}"],
              [[_LOSS[loss], arm, _fmt_gap(to_plain[(arm, loss)]), _fmt_gap(to_large[(arm, loss)]),
                _fmt_gap(_gap(_arm(m, cfg, loss, b0, "epochs"), _arm(m, cfg, loss, big, "epochs")))]
               for loss in cfg["queue_losses"] for arm in QUEUE_ARMS],
              caption=f"Paired 1-shot differences of batch {b0} with a queue on the test part (percentage points), "
                      "replicate by replicate.")
    ctx.result("queue", {"size": q["size"], "batch": b0, "largest_batch": big, "own_grid": cfg["queue_grid"],
                         "margin_pp": QUEUE_MARGIN, "arms": rec,
                         "selection_val_1shot": [{"arm": arm, "loss": loss, "T": t, "lr": lr, "val_1shot": v}
                                                 for (arm, loss), sc in q["scores"].items()
                                                 for (t, lr), v in sc.items()]})
    few = len(seeds) < MIN_SEEDS
    losses = " and ".join(_LOSS[loss] for loss in cfg["queue_losses"])
    for arm in QUEUE_ARMS:
        what = (f"a queue of {q['size']} past embeddings of the network being trained" if not QUEUE_ARMS[arm] else
                f"a queue of {q['size']} past embeddings from a momentum key encoder (MoCo, momentum {QUEUE_ARMS[arm]:g})")
        gaps = {loss: to_large[(arm, loss)] for loss in cfg["queue_losses"]}
        claim(ctx, "flatnce", f"At batch {b0}, {what} as extra negatives closes the gap to large batches: {losses} at "
              f"batch {b0} with it {'reach' if len(cfg['queue_losses']) > 1 else 'reaches'} the 1-shot probe accuracy of the largest batch ({big}) within "
              f"{QUEUE_MARGIN:g} pp (equal epochs, settings chosen on validation)", queue_verdict(gaps),
              "; ".join(f"{_LOSS[loss]}: with it − batch {big} {_fmt_gap(to_large[(arm, loss)])}, with it − without "
                        f"{_fmt_gap(to_plain[(arm, loss)])}" for loss in cfg["queue_losses"])
              + (" (direction only)" if few else ""),
              split="test", seeds=seeds, command=full_command("flatnce", jobs=True) if few else None)


def _report_selection(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    rows = []
    for (loss, b), sc in m["scores"].items():
        rows.append([b, _LOSS[loss], *[("diverged" if not math.isfinite(v) else f"{v:.1f}")
                                       + (" ←" if (t, lr) == m["chosen"][(loss, b)] else "")
                                       for (t, lr), v in sc.items()]])
    rows.sort(key=lambda r: (r[0], r[1]))
    ctx.table(["batch", "loss", *[f"T = {t:g}, lr {lr:g}" for t, lr in m["grid"]]], rows,
              caption=f"Choosing each loss's temperature and learning rate per batch size on the validation part: "
                      f"1-shot probe accuracy (%), mean over {plural(len(m['sel_seeds']), 'replicate')} "
                      f"({plural(cfg['epochs'], 'epoch')}; ← chosen). Both losses get the same "
                      f"{plural(len(m['grid']), 'candidate')}.")


def _cell_row(b: int, budget: str, loss: str, rs: list[Run], label: str) -> list[Any]:
    mean_tail = lambda key: statistics.fmean(_tail(r, key) for r in rs)  # noqa: E731
    reach32 = roundoff_reachable(b, rs[0].temperature, U["fp32"])
    reach16 = roundoff_reachable(b, rs[0].temperature, U["bf16"])
    return [b, label, _LOSS[loss], rs[0].temperature, rs[0].lr, rs[0].steps,
            fmt_cell([r.probe["1-shot"] for r in rs], ".1f"), fmt_cell([r.probe["5-shot"] for r in rs], ".1f"),
            fmt_cell([r.probe["full"] for r in rs], ".1f"), f"{mean_tail('info_nce'):.3g}",
            f"{mean_tail('xi_lt_1e-3'):.3g}",
            f"{mean_tail('below_fp32'):.3g}" if reach32 else "0 (unreachable)",
            f"{mean_tail('below_bf16'):.3g}" if reach16 else "0 (unreachable)",
            f"{mean_tail('median_log10_xi'):.3g}", sum(r.nonfinite for r in rs)]


CELL_HEAD = ["batch", "arm", "loss", "T", "lr", "steps", "1-shot %", "5-shot %", "full %", "InfoNCE (end)", "ξ<1e-3",
             "ξ<u₃₂", "ξ<u_bf16", "median log₁₀ξ", "diverged runs"]


def _report_cells(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The chosen settings (both budgets) and the precision arms: probe accuracy and ξ statistics."""
    n = len(m["seeds"])
    rows, res = [], []
    for b in cfg["batches"]:
        for budget, label in (("epochs", "equal epochs"), ("steps", "equal steps")):
            for loss in LOSSES:
                rs = _arm(m, cfg, loss, b, budget)
                rows.append(_cell_row(b, budget, loss, rs, label))
                res.append(_cell_record(b, loss, rs, budget))
    ctx.table(CELL_HEAD, rows, caption=(
        f"**float32, each loss at its chosen settings** — probe accuracy on the test part, {n_caption(n, 'replicate')}; "
        f"equal epochs: {plural(cfg['epochs'], 'epoch')} at every batch; equal steps: {cfg['equal_steps']} optimizer "
        f"steps at every batch (the steps batch {cfg['equal_steps_ref']} takes in the equal-epochs budget). The "
        "last columns are training-batch statistics averaged over the last 20 % of epochs: the InfoNCE value, the "
        "share of anchors with ξ < 1e-3, with ξ below the float32 / bfloat16 unit roundoff (where cross-entropy's "
        "gradient on the positive is exactly 0 in that precision; 'unreachable': the bound log ξ ≥ log(2B − 2) − 2/T "
        "rules it out, so the 0 is no finding) and the median of log₁₀ ξ."), floatfmt=".3g")
    ctx.result("cells_fp32", [r for r in res if r["budget"] == "epochs"])
    ctx.result("cells_fp32_equal_steps", [r for r in res if r["budget"] == "steps"])
    rows = []
    for arm in ARMS:
        recs = []
        for b in m["mech_batches"]:
            if arm != "fp32" and b not in cfg[arm.replace("-", "_")]:
                continue
            for loss in LOSSES:
                rs = _mech(m, cfg, loss, b, arm)
                rows.append(_cell_row(b, arm, loss, rs, f"{arm}, T = {MECH_T:g}"))
                recs.append(_cell_record(b, loss, rs, "epochs"))
        if arm != "fp32":
            ctx.result(f"cells_{arm}", recs)
    ctx.table(CELL_HEAD, rows, caption=(
        f"**Precision arms** at T = {MECH_T:g} (where bfloat16 round-off is reachable), equal epochs, each loss at "
        f"its lr chosen on validation for this temperature: {ARMS['bf16-loss']}; {ARMS['bf16']}. "
        f"{n_caption(len(m['seeds']), 'replicate').capitalize()} (pure bf16: "
        f"{plural(len(m['bf16_seeds']), 'replicate')}, its runs are ~10× slower on CPU); ξ shares per batch size, "
        "not averaged over batches."), floatfmt=".3g")


def _cell_record(b: int, loss: str, rs: list[Run], budget: str) -> dict[str, Any]:
    return {
        "batch": b, "temperature": rs[0].temperature, "lr": rs[0].lr, "loss": loss, "budget": budget,
        "steps": rs[0].steps,
        **{f"{k}_mean": _ms([r.probe[k] for r in rs])[0] for k in ("1-shot", "5-shot", "full")},
        **{f"{k}_std": _ms([r.probe[k] for r in rs])[1] for k in ("1-shot", "5-shot", "full")},
        "share_xi_lt_1e-3": statistics.fmean(_tail(r, "xi_lt_1e-3") for r in rs),
        "share_below_fp32": statistics.fmean(_tail(r, "below_fp32") for r in rs),
        "share_below_bf16": statistics.fmean(_tail(r, "below_bf16") for r in rs),
        "fp32_reachable": roundoff_reachable(b, rs[0].temperature, U["fp32"]),
        "bf16_reachable": roundoff_reachable(b, rs[0].temperature, U["bf16"]),
        "info_nce_end": statistics.fmean(_tail(r, "info_nce") for r in rs),
        "seeds": [r.seed for r in rs], "per_seed_1shot": [r.probe["1-shot"] for r in rs],
    }


def _differences(m: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every paired FlatNCE − InfoNCE comparison the report shows, with p-values and Holm's adjustment."""
    out: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}

    def add(label: str, b: int, f: list[Run], i: list[Run]) -> None:
        key = tuple(r.key for r in f + i)
        if key in seen:  # the same runs as a row above (e.g. equal steps = equal epochs at the reference batch)
            return
        seen[key] = label
        out.append({"arm": label, "batch": b, "d1": _gap(f, i), "d5": _gap(f, i, "5-shot")})

    for budget, label in (("epochs", "equal epochs, own settings"), ("steps", "equal steps, own settings")):
        for b in cfg["batches"]:
            add(label, b, _arm(m, cfg, "flatnce", b, budget), _arm(m, cfg, "infonce", b, budget))
    for arm in ARMS:
        for b in m["mech_batches"]:
            if arm != "fp32" and b not in cfg[arm.replace("-", "_")]:
                continue
            add(f"{arm}, T = {MECH_T:g}", b, _mech(m, cfg, "flatnce", b, arm), _mech(m, cfg, "infonce", b, arm))
    adj = holm([interval(d["d1"]).p for d in out])
    for d, a in zip(out, adj):
        d["p"], d["p_holm"] = interval(d["d1"]).p, a
    return out


def _report_differences(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    diffs = _differences(m, cfg)
    rows = [[d["arm"], d["batch"], _fmt_gap(d["d1"]), "–" if math.isnan(d["p_holm"]) else f"{d['p_holm']:.2g}",
             _fmt_gap(d["d5"])] for d in diffs]
    n_sig = sum(d["p"] < 0.05 for d in diffs if not math.isnan(d["p"]))
    n_adj = sum(d["p_holm"] < 0.05 for d in diffs if not math.isnan(d["p_holm"]))
    ctx.table(["comparison", "batch", "Δ 1-shot (FlatNCE − InfoNCE, test)", "p, Holm-adjusted", "Δ 5-shot"], rows,
              caption=f"Paired differences FlatNCE − InfoNCE (percentage points, test part), replicate by replicate. "
                      f"{n_sig} of {len(diffs)} comparisons have p < 0.05 on their own, {n_adj} after Holm's "
                      "adjustment for the number of comparisons in this table (a comparison that would repeat the "
                      "runs of a row above is listed once). Only the first row is the claim's pre-specified test.")
    ctx.result("differences", [{"arm": d["arm"], "batch": d["batch"], "delta_1shot": interval(d["d1"]).record(),
                                "p_holm": d["p_holm"], "delta_5shot": interval(d["d5"]).record()} for d in diffs])


def _report_bound(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    temps = sorted(set(cfg["temps"]) | {MECH_T})
    rows = []
    for b in cfg["batches"]:
        rows.append([b, *[f"{xi_floor(b, t):.2f}: " + ", ".join(
            p for p in ("fp32", "bf16") if roundoff_reachable(b, t, U[p])) if any(
            roundoff_reachable(b, t, U[p]) for p in U) else f"{xi_floor(b, t):.2f}: neither" for t in temps]])
    ctx.table(["batch", *[f"T = {t:g}" for t in temps]], rows, caption=(
        "**Where round-off can happen at all.** With cosine logits every s_i − s_t ≥ −2/T, so log ξ ≥ "
        "log(2B − 2) − 2/T (the number shown); InfoNCE's positive gradient ξ/(1 + ξ) is lost to round-off only "
        f"where log ξ < log(u/(1 − u)) = {math.log(U['fp32'] / (1 - U['fp32'])):.2f} in float32 and "
        f"{math.log(U['bf16'] / (1 - U['bf16'])):.2f} in bfloat16. Named: the precisions in which it is reachable. "
        "A share of 0 where it is unreachable is true by construction and says nothing about the mechanism."))
    ctx.result("xi_bound", {f"B={b},T={t:g}": {"log_xi_floor": xi_floor(b, t),
                                               **{p: roundoff_reachable(b, t, U[p]) for p in U}}
                            for b in cfg["batches"] for t in temps})


def _summary(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Facts that separate the two explanations, computed from the runs (no interpretation beyond them)."""
    b0 = min(cfg["batches"])
    lines = []
    info32 = _mech(m, cfg, "infonce", b0, "fp32")
    worst = max(max(c["below_fp32"] for c in r.curve) for r in info32)
    reach = roundoff_reachable(b0, MECH_T, U["fp32"])
    no_b = [b for b in cfg["batches"] if not roundoff_reachable(b, MECH_T, U["fp32"])]
    no_t = [t for t in cfg["temps"] if not roundoff_reachable(b0, t, U["fp32"])]
    lines.append(
        f"- float32, batch {b0}, T = {MECH_T:g}: the bound "
        + (f"leaves room for round-off (log ξ ≥ {xi_floor(b0, MECH_T):.2f}, below log u₃₂ = {math.log(U['fp32']):.2f})"
           if reach else f"rules round-off out (log ξ ≥ {xi_floor(b0, MECH_T):.2f} > log u₃₂ = {math.log(U['fp32']):.2f})")
        + f"; the largest share of InfoNCE anchors below float32 resolution (per-epoch averages of the ~8 sampled "
        f"batches) is {worst:.3g}."
        + (f" The float32 diagnostic cannot fire at all at T = {MECH_T:g} for batch {', '.join(map(str, no_b))}"
           if no_b else "")
        + ((" and" if no_b else " The float32 diagnostic cannot fire at all")
           + f" at batch {b0} for T = {', '.join(f'{t:g}' for t in no_t)}" if no_t else "")
        + ("; its zeros there are true by construction, not evidence." if no_b or no_t else ""))
    for arm in ("bf16-loss", "bf16"):
        parts = []
        for b in cfg[arm.replace("-", "_")]:
            rs = _mech(m, cfg, "infonce", b, arm)
            parts.append(f"batch {b}: {fmt_cell([_tail(r, 'below_bf16') for r in rs], '.3g')}")
        if parts:
            lines.append(f"- {arm} arm, InfoNCE at T = {MECH_T:g}, share of anchors with ξ < u_bf16 = 2⁻⁸ (last 20 % "
                         f"of epochs; there the bf16 gradient on the positive is exactly 0; FlatNCE's is −1 for every "
                         "anchor in any precision), per batch size: " + "; ".join(parts) + ".")
    g32 = _gap(_mech(m, cfg, "flatnce", b0, "fp32"), info32)
    per_arm = [f"float32 {_fmt_gap(g32)}"]
    for arm in ("bf16-loss", "bf16"):
        if b0 in cfg[arm.replace("-", "_")]:
            per_arm.append(f"{arm} {_fmt_gap(_gap(_mech(m, cfg, 'flatnce', b0, arm), _mech(m, cfg, 'infonce', b0, arm)))}")
    lines.append(f"- FlatNCE − InfoNCE at batch {b0}, T = {MECH_T:g} (1-shot, paired): " + ", ".join(per_arm)
                 + ". Round-off as the cause predicts a gap that grows as the precision drops; weighting predicts the "
                 "same gap in every arm.")
    (ti, _), (tf, _) = m["chosen"][("infonce", b0)], m["chosen"][("flatnce", b0)]
    lines.append(f"- On validation InfoNCE chose T = {ti:g} and FlatNCE T = {tf:g} at batch {b0}; at T = {ti:g} "
                 f"round-off of InfoNCE's gradient is {'reachable' if roundoff_reachable(b0, ti, U['fp32']) else 'impossible'}"
                 f" in float32, so a gap measured there "
                 + ("could in part be round-off." if roundoff_reachable(b0, ti, U["fp32"]) else
                    "cannot come from float32 round-off."))
    ctx.text("**Separating the explanations.**\n\n" + "\n".join(lines))


def _plot_probe_vs_batch(ctx: Context, m: dict[str, Any], cfg: dict[str, Any], refs: dict[str, dict[str, float]]) -> None:
    import matplotlib.pyplot as plt

    batches = cfg["batches"]
    n = len(m["seeds"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    dodge = {("bf16-loss", "infonce"): -0.24, ("bf16-loss", "flatnce"): -0.12, ("bf16", "infonce"): 0.12,
             ("bf16", "flatnce"): 0.24}
    for ax, key in zip(axes, ("1-shot", "5-shot", "full")):
        values = [r[key] for r in refs.values() if not math.isnan(r[key])]
        for budget, style in (("epochs", "-"), ("steps", ":")):
            for loss in LOSSES:
                ms = [_ms([r.probe[key] for r in _arm(m, cfg, loss, b, budget)]) for b in batches]
                ys = [v for v, _ in ms]
                values += [v for v in ys if not math.isnan(v)]
                ax.errorbar(batches, ys, yerr=[s for _, s in ms] if n > 1 else None, ls=style,
                            marker="o" if loss == "flatnce" else "D", mfc="none" if loss == "infonce" else None,
                            color="C0" if loss == "flatnce" else "C1", capsize=3,
                            label=f"{_LOSS[loss]}, own T and lr, equal {budget}")
        for arm, color in (("bf16-loss", "0.45"), ("bf16", "k")):
            for loss, mk in (("infonce", "x"), ("flatnce", "s")):
                pts = [(b, _ms([r.probe[key] for r in _mech(m, cfg, loss, b, arm)])[0])
                       for b in cfg[arm.replace("-", "_")]]
                if pts:
                    values += [p[1] for p in pts if not math.isnan(p[1])]
                    ax.plot([p[0] * 2 ** dodge[(arm, loss)] for p in pts], [p[1] for p in pts], mk, ms=8, mew=2,
                            color=color, mfc="none", label=f"{_LOSS[loss]}, {arm}, T = {MECH_T:g}")
        q = m["queue"]
        for j, (arm, loss) in enumerate((a, lo) for a in QUEUE_ARMS for lo in cfg["queue_losses"]):
            mq, sq = _ms([r.probe[key] for r in _queue_arm(m, cfg, arm, loss)])
            values += [mq] if not math.isnan(mq) else []
            ax.errorbar([q["batch"] * 2 ** (-0.36 - 0.12 * j)], [mq], yerr=[sq] if n > 1 else None,
                        marker="*" if not QUEUE_ARMS[arm] else "P", ms=10, color="C0" if loss == "flatnce" else "C1",
                        mfc="none" if loss == "infonce" else None, capsize=3, ls="none",
                        label=f"{_LOSS[loss]}, batch {q['batch']} + {arm} ({q['size']})")
        for name, ls in (("raw pixels", ":"), ("untrained encoder", "-.")):
            ax.axhline(refs[name][key], color="0.6", lw=1, ls=ls, label=f"reference: {name}")
        lo, hi = min(values), max(values)
        pad = max(0.0, (MIN_SPAN - (hi - lo)) / 2) + 1.0
        top = min(hi + pad, 100.5)
        ax.set_ylim(min(lo - pad, top - MIN_SPAN - 2.0), top)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(batches) * 2 ** -1.0, max(batches) * 2 ** 0.5)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(f"{key} probe accuracy on test (%)")
        ax.set_title(f"{key} probe", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    spread = (f"mean ± sd over {n} replicates" if n > 1 else
              "one replicate, no error bars: differences of ~2 points are noise")
    ctx.figure(fig, "probe-vs-batch", f"Linear-probe accuracy of the frozen representation vs batch size ({spread}); "
               "each loss at its temperature and lr chosen on validation; solid: equal epochs, dotted: equal steps; "
               f"bf16 arms at T = {MECH_T:g}, drawn beside their batch; stars and crosses left of batch "
               f"{m['queue']['batch']}: that batch with a queue of {m['queue']['size']} negatives, filled by the network "
               "itself (stars) or by a momentum key encoder (crosses), equal epochs; grey lines: the references "
               "(first replicate).")


MIN_SPAN = 12.0  # percentage points: the y range of a probe panel is never narrower


def _plot_xi(ctx: Context, m: dict[str, Any], cfg: dict[str, Any]) -> None:
    """ξ statistics over training at the smallest batch, T = MECH_T (float32) and in the bf16 arms."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    b0 = min(cfg["batches"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    markers = iter("oDs^vP<>*X")
    series: list[tuple[Any, str, np.ndarray, dict]] = []
    keys = ("xi_lt_1e-3", "median_log10_xi", "info_nce")

    def same(a: list, b: list) -> bool:  # equal curves: one line would hide the other
        return all(np.array_equal([[c[k] for c in r.curve] for r in a], [[c[k] for c in r.curve] for r in b])
                   for k in keys)

    cells = [(loss, _arm(m, cfg, loss, b0, "epochs"), "own T") for loss in LOSSES]
    for loss in LOSSES:
        rs, own = _mech(m, cfg, loss, b0, "fp32"), next(c for c in cells if c[0] == loss)
        if same(rs, own[1]):  # the chosen T is the mechanism's T and the runs coincide: draw them once
            cells[cells.index(own)] = (loss, own[1], f"own T = {MECH_T:g}, the same runs as at T = {MECH_T:g}")
        else:
            cells.append((loss, rs, f"T = {MECH_T:g}"))
    for loss, rs, what in cells:
        st = dict(ls="-" if loss == "flatnce" else "--", marker=next(markers))
        for ax, key in zip(axes, keys):
            curve = np.mean([[c[key] for c in r.curve] for r in rs], axis=0)
            series.append((ax, f"{_LOSS[loss]}, float32, {what}" + (f" (T = {rs[0].temperature:g})" if what == "own T" else "")
                           + (": ξ < 1e-3" if ax is axes[0] else ""), curve, st))
    for arm, color in (("bf16-loss", "0.45"), ("bf16", "k")):
        if b0 not in cfg[arm.replace("-", "_")]:
            continue
        for loss in LOSSES:
            rs = _mech(m, cfg, loss, b0, arm)
            curve = np.mean([[c["below_bf16"] for c in r.curve] for r in rs], axis=0)
            series.append((axes[0], f"{_LOSS[loss]}, {arm}: ξ < u_bf16", curve,
                           dict(ls=":" if loss == "infonce" else "-.", color=color, marker=next(markers))))
    zeros = [k for k, (ax, _, c, _) in enumerate(series) if ax is axes[0] and not np.any(c)]
    for k, (ax, label, curve, st) in enumerate(series):
        x = np.arange(1, len(curve) + 1, dtype=float)
        if k in zeros:  # lines that are 0 throughout would hide each other: each sits at its own small offset
            x = x + 0.06 * (zeros.index(k) - (len(zeros) - 1) / 2)
            label += " (0 throughout)"
        ax.plot(x, curve, label=label, ms=5, mfc="none", **st)
    axes[1].axhline(xi_floor(b0, MECH_T) / math.log(10), color="r", lw=0.8, ls=":",
                    label=f"floor of log₁₀ ξ at T = {MECH_T:g} (bound)")
    axes[1].axhline(math.log10(U["fp32"]), color="k", lw=0.8, ls="-.", label="log₁₀ u₃₂")
    ylabels = ("share of anchors", "median log₁₀ ξ", "InfoNCE value")
    titles = ("share with ξ < 1e-3 (float32) or ξ < u_bf16 (bf16 arms)", "median log₁₀ ξ over anchors",
              "InfoNCE value (both losses)")
    for ax, title, yl in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)  # below the x-label
    fig.tight_layout(w_pad=2.0)
    ctx.figure(fig, "xi-over-training", f"ξ statistics over training at batch {b0} (training batches, per-epoch "
               "averages, mean over replicates); series that stay at 0 are drawn side by side at small offsets.")


def run(ctx: Context) -> None:
    cfg = _config(ctx)
    seeds = [ctx.seed + s for s in range(cfg["seeds"])]
    ctx.text(
        "Contrastive pre-training pairs two augmented views of each image; for an anchor with similarity logits "
        "s_i = cos(z, z_i)/T over the batch (T: the temperature) and its positive t, ξ = Σ_{i≠t} e^{s_i − s_t}. "
        "InfoNCE is log(1 + ξ); FlatNCE trains with the gradient of log ξ instead. The note's account: as pairs "
        "separate, ξ → 0 and InfoNCE's gradient on the positive, ξ/(1 + ξ), falls below the unit roundoff u of the "
        "floating-point format (u₃₂ = 2⁻²⁴ for float32, u_bf16 = 2⁻⁸ for bfloat16) and becomes exactly 0, which "
        "FlatNCE avoids. Cosine logits bound how small ξ can get: log ξ ≥ log(2B − 2) − 2/T, so whether round-off "
        "can happen at all depends on B, T and the precision (table below). Two bfloat16 arms bring it within "
        "reach at T = 0.1: 'bf16-loss' (float32 network, embeddings, logits and loss in bf16) and 'bf16' "
        "(everything in bf16).")
    ctx.text(protocol_text(
        f"scikit-learn's digits, a fixed stratified validation part of {VAL_SIZE} images and, per replicate, a "
        f"stratified division of the rest into {cfg['n']} training images (unlabelled for pre-training; the labelled "
        f"pool of the probes) and {TEST_SIZE} test images; the replicate's seed also sets the initialization, "
        "batches and augmentations",
        f"each loss's temperature and Adam learning rate, per batch size, from the same "
        f"{plural(len(cfg['temps']) * len(cfg['lrs']), 'candidate')} (T ∈ {{{', '.join(f'{t:g}' for t in cfg['temps'])}}} "
        f"× lr ∈ {{{', '.join(f'{x:g}' for x in cfg['lrs'])}}}), by the mean 1-shot probe accuracy on validation over "
        f"the first {plural(len(seeds[:cfg['sel']]), 'replicate')}",
        len(seeds), long_runs=(f"runs are long on CPU: {plural(len(seeds), 'replicate')} instead of {FULL_SEEDS}, the "
                               f"pure-bfloat16 arm {plural(cfg['bf16_seeds'], 'replicate')}, the queue arms at the "
                               "settings chosen for their batch without a queue" if ctx.full else ""))
        + f" Budgets: {plural(cfg['epochs'], 'epoch')} (`{ctx.mode}` mode) at every batch, and beside it "
        f"{cfg['equal_steps']} optimizer steps at every batch. Representation h = ReLU(encoder output), {REP_DIM}-d "
        f"(the projection head's input), projection {PROJ_DIM}-d. Probes: logistic regression on the frozen h scaled "
        f"to unit L2 norm, its C chosen per network on validation from {{{', '.join(f'{c:g}' for c in PROBE_CS)}}}; "
        f"1- and 5-shot accuracies are means over {cfg['draws']} fixed draws of the labelled examples (the same draws "
        "for every run of a replicate), 'full' uses all training labels. (The earlier protocol probed the encoder's "
        "output before that ReLU, standardised, at C = 1; table 'Which probe' compares the two.) FlatNCE is trained with "
        "`flat_nce(..., value=\"info_nce\")`, so the logged loss of both arms is the InfoNCE value."
        + ("" if len(seeds) >= MIN_SEEDS else
           f" **`{ctx.mode}` mode trains for {plural(cfg['epochs'], 'epoch')} with {plural(len(seeds), 'seed')}:** "
           + direction_only(len(seeds), full_command("flatnce", jobs=True))
           + f" The full run (about 90 minutes on 2 cores) is kept in `{STORED_FULL_RUN}` of the steepest repository."))
    ctx.phase("flatnce: probing the references (raw pixels, untrained encoder)")
    d = load_split(seeds[0])
    xtr, ytr = d["xtr"], d["ytr"]
    if cfg["n_train"]:
        xtr, ytr = xtr[: cfg["n_train"]], ytr[: cfg["n_train"]]
    draws = {k: few_shot_draws(ytr, k, cfg["draws"], 12_345 + k) for k in (1, 5)}
    torch.manual_seed(seeds[0])
    flat = lambda x: x.flatten(1).numpy().astype(np.float64)  # noqa: E731
    net0 = Net()
    refs = {name: probe(f(xtr), ytr, {"val": (f(d["xva"]), d["yva"]), "test": (f(d["xte"]), d["yte"])}, draws)["test"]
            for name, f in (("raw pixels", flat), ("untrained encoder", lambda x: features(net0, x)))}
    m = _measure(ctx, cfg)
    _report(ctx, m, refs, cfg)
