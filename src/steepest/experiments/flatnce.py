"""FlatNCE vs InfoNCE at small batch.

The note: Su, *FlatNCE: is floating-point error why small-batch contrastive learning
does poorly?*, kexue.fm/archives/8586 (after Chen et al., *Simpler, Faster, Stronger:
Breaking The log-K Curse On Contrastive Learners With FlatNCE*, arXiv:2107.01152).

Claim of the note: small-batch contrastive learning underperforms because once
pairs separate, ξ = Σ_{i≠t} e^{s_i − s_t} → 0 and InfoNCE's gradient drowns in
floating-point error; FlatNCE (gradient of log ξ) fixes it.

Protocol: SimCLR-style pre-training on scikit-learn's 8×8 digits (augmentations
written in torch: small affine, brightness, noise, cutout), a small conv encoder
with a projection head, Adam. The frozen encoder output is probed on a held-out
split with logistic regression (1-shot and 5-shot, averaged over fixed random draws
of the labelled examples, and all labels). Hyper-parameters are fixed in advance;
nothing is selected on the test split.

Two explanations compete for a FlatNCE advantage: round-off (the note: InfoNCE's
positive gradient ξ/(1+ξ) falls below the unit roundoff u and becomes exactly 0)
and weighting (∇log(1+ξ) = ξ/(1+ξ)·∇log ξ down-weights easy anchors, FlatNCE
weights all equally). The float32 arm logs the share of anchors with ξ < u₃₂ = 2⁻²⁴;
a "bf16-loss" arm (float32 network, loss in bf16, u = 2⁻⁸) and a pure-bfloat16 arm
(weights, activations, Adam state and loss in bf16) put the round-off mechanism
in reach, so it can be seen whether it changes the comparison.

Measuring (``_job``: train and probe one run, in a worker with ``--jobs``) returns
plain :class:`Run` records; ``_report`` and the functions it calls write them.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import flat_nce, info_nce, nce_diagnostics, pair_logits
from ..report import Context, plural
from . import claim, full_command
from ._data import digits_split

TITLE = "FlatNCE vs InfoNCE at small batch"
# Small models: one intra-op thread is fastest (measured) and leaves the other core free.
THREADS = 1

LR = 1e-3
REP_DIM = 64
PROJ_DIM = 32
PROBE_C = 1.0  # fixed a priori; not tuned
TEST_SIZE = 600
SPLIT_SEED = 12345
# What a verdict needs: the full protocol's seeds and epochs (quick mode shows directions only).
MIN_SEEDS = 3
MIN_EPOCHS = 50
STORED_FULL_RUN = "docs/results/flatnce-full/report.md"  # in the steepest repository


# --------------------------------------------------------------------------- data and augmentation
def load_split() -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Digits as (N, 1, 8, 8) in [0, 1]; a fixed stratified train/test split."""
    xtr, ytr, xte, yte = digits_split(TEST_SIZE, SPLIT_SEED, images=True)
    return xtr, ytr.numpy(), xte, yte.numpy()


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


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    loss: str
    batch: int
    temperature: float
    seed: int
    precision: str  # "fp32" | "bf16-loss" (fp32 network, loss in bf16) | "bf16" (everything bf16)
    steps: int = 0
    seconds: float = 0.0
    probe: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch
    nonfinite: bool = False


def train(x: torch.Tensor, run: Run, epochs: int, max_steps: int | None = None) -> Net:
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(10_000 + run.seed)
    net = Net()
    dt = torch.bfloat16 if run.precision == "bf16" else torch.float32
    cd = torch.bfloat16 if run.precision in ("bf16", "bf16-loss") else None  # the loss's compute dtype
    net = net.to(dt)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    n = x.shape[0]
    per_epoch = n // run.batch
    stat_every = max(1, per_epoch // 8)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        rec: list[dict[str, float]] = []
        for k in range(per_epoch):
            xb = x[perm[k * run.batch : (k + 1) * run.batch]]
            z1, z2 = net(torch.cat([augment(xb, gen), augment(xb, gen)]).to(dt)).chunk(2)
            logits, target = pair_logits(z1, z2, run.temperature, dtype=cd)
            if run.loss == "flatnce":
                loss = flat_nce(logits, target, value="info_nce", dtype=cd)
            else:
                loss = info_nce(logits, target, dtype=cd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
                    }
                )
            if max_steps is not None and run.steps >= max_steps:
                break
        run.curve.append({key: statistics.fmean(r[key] for r in rec) for key in rec[0]})
        if max_steps is not None and run.steps >= max_steps:
            break
    run.seconds = time.perf_counter() - t0
    run.nonfinite = not all(torch.isfinite(p).all() for p in net.parameters())
    return net


# --------------------------------------------------------------------------- probes
@torch.no_grad()
def features(net: Net, x: torch.Tensor) -> np.ndarray:
    dt = next(net.parameters()).dtype
    return net.encoder(x.to(dt)).float().numpy().astype(np.float64)


def few_shot_draws(y: np.ndarray, shots: int, draws: int, seed: int) -> list[np.ndarray]:
    """Index sets with ``shots`` labelled examples per class; fixed across runs (paired comparison)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    return [np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes]) for _ in range(draws)]


def probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, draws: dict[int, list[np.ndarray]]) -> dict[str, float]:
    """Logistic-regression accuracy (%) on the test split: k-shot averaged over draws, and all labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny problems: BLAS threads only add contention
        return _probe(ftr, ytr, fte, yte, draws, LogisticRegression, StandardScaler)


def _probe(ftr, ytr, fte, yte, draws, LogisticRegression, StandardScaler) -> dict[str, float]:  # type: ignore[no-untyped-def]
    if not (np.isfinite(ftr).all() and np.isfinite(fte).all()):
        return {**{f"{k}-shot": math.nan for k in draws}, "full": math.nan}
    sc = StandardScaler().fit(ftr)  # unlabelled train features only
    a, b = sc.transform(ftr), sc.transform(fte)
    out = {}
    for k, sets in draws.items():
        accs = []
        for idx in sets:
            clf = LogisticRegression(C=PROBE_C, max_iter=2000).fit(a[idx], ytr[idx])
            accs.append(100.0 * clf.score(b, yte))
        out[f"{k}-shot"] = statistics.fmean(accs)
    clf = LogisticRegression(C=PROBE_C, max_iter=3000).fit(a, ytr)
    out["full"] = 100.0 * clf.score(b, yte)
    return out


# --------------------------------------------------------------------------- report helpers
ARMS = {
    "fp32": "float32",
    "bf16-loss": "bfloat16 loss (float32 network; embeddings, logits and the loss in bf16)",
    "bf16": "pure bfloat16 (weights, activations, Adam state and the loss in bf16)",
}

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



def run(ctx: Context) -> None:
    xtr, ytr, xte, yte = load_split()
    cfg = ctx.pick(
        smoke=dict(batches=[8], temps=[0.1], seeds=[0], epochs=1, max_steps=6, bf16_loss=[8], bf16=[8], draws=2, n_train=200),
        quick=dict(batches=[8, 64], temps=[0.1], seeds=[0], epochs=4, max_steps=None, bf16_loss=[8], bf16=[8], draws=10, n_train=None),
        full=dict(
            batches=[8, 16, 32, 64, 256], temps=[0.1, 0.5], seeds=[0, 1, 2], epochs=50, max_steps=None,
            bf16_loss=[8, 16, 32, 64, 256], bf16=[8, 16], draws=20, n_train=None,
        ),
    )  # bfloat16 matmul/conv has no fast CPU kernel here (~5-10x slower), hence the small pure-bf16 grid
    if cfg["n_train"]:
        xtr, ytr = xtr[: cfg["n_train"]], ytr[: cfg["n_train"]]
    seeds = [ctx.seed + s for s in cfg["seeds"]]
    draws = {k: few_shot_draws(ytr, k, cfg["draws"], SPLIT_SEED + k) for k in (1, 5)}

    plan = [
        Run(loss, b, t, s, "fp32") for b in cfg["batches"] for t in cfg["temps"] for loss in ("infonce", "flatnce") for s in seeds
    ]
    for arm in ("bf16-loss", "bf16"):
        plan += [Run(loss, b, cfg["temps"][0], s, arm) for b in cfg[arm.replace("-", "_")] for s in seeds for loss in ("infonce", "flatnce")]
    plan.sort(key=lambda r: r.batch)

    ctx.text(
        "Contrastive pre-training pairs two augmented views of each image; for an anchor with similarity logits "
        "s_i = cos(z, z_i)/T over the batch (T: the temperature) and its positive t, ξ = Σ_{i≠t} e^{s_i − s_t}. "
        "InfoNCE is log(1 + ξ); FlatNCE trains with the gradient of log ξ instead. The note's account: as pairs "
        "separate, ξ → 0 and InfoNCE's gradient on the positive, ξ/(1 + ξ), falls below the unit roundoff u of the "
        "floating-point format (u₃₂ = 2⁻²⁴ for float32, u_bf16 = 2⁻⁸ for bfloat16) and becomes exactly 0, which "
        "FlatNCE avoids. Two bfloat16 arms bring that round-off within reach: 'bf16-loss' (float32 network, "
        "embeddings, logits and loss in bf16) and 'bf16' (everything in bf16)."
    )
    ctx.text(
        f"Digits split: {len(ytr)} training images (unlabelled for pre-training; the labelled pool of the probes), "
        f"{len(yte)} held-out test images. Adam lr {LR:g}, {cfg['epochs']} epochs (`{ctx.mode}` mode), "
        f"representation {REP_DIM}-d (encoder output), projection {PROJ_DIM}-d. Probes: logistic regression "
        f"(C = {PROBE_C:g}, fixed) on standardised frozen features; 1- and 5-shot accuracies are means over "
        f"{cfg['draws']} fixed draws of the labelled examples (the same draws for every run), 'full' uses all "
        f"{len(ytr)} labels. Seeds {seeds}. FlatNCE is trained with `flat_nce(..., value=\"info_nce\")`, so the "
        "logged loss of both arms is the InfoNCE value."
        + (
            ""
            if len(seeds) >= MIN_SEEDS and cfg["epochs"] >= MIN_EPOCHS
            else f" **`{ctx.mode}` mode trains for {plural(cfg['epochs'], 'epoch')} with {plural(len(seeds), 'seed')}: "
            "it shows the direction of each comparison, not evidence for a verdict; the verdicts need "
            f"{MIN_SEEDS} seeds × {MIN_EPOCHS} epochs: `{full_command('flatnce', jobs=True)}` (about an hour on 2 "
            f"cores). The full run of this grid is kept in `{STORED_FULL_RUN}` of the steepest repository.**"
        )
    )

    # references: raw pixels and an untrained encoder
    ctx.phase("flatnce: probing the references (raw pixels, untrained encoder)")
    torch.manual_seed(seeds[0])
    base_pix = probe(xtr.flatten(1).numpy().astype(np.float64), ytr, xte.flatten(1).numpy().astype(np.float64), yte, draws)
    net0 = Net()
    base_rand = probe(features(net0, xtr), ytr, features(net0, xte), yte, draws)

    order = sorted(range(len(plan)), key=lambda i: -_cost(plan[i], cfg["epochs"], len(ytr)))  # longest first
    jobs = [(i, plan[i], cfg["epochs"], cfg["max_steps"], cfg["n_train"], draws) for i in order]
    for (i, *_), done in ctx.map(_job, jobs, "flatnce runs"):
        plan[i] = done  # in the plan's order: paired differences zip the seeds of two cells
        ctx.log(
            f"{done.precision} {done.loss} B={done.batch} T={done.temperature} seed={done.seed}: {done.probe} "
            f"steps={done.steps} {done.seconds:.1f}s xi<1e-3={_tail(done, 'xi_lt_1e-3'):.2f}"
        )

    _report(ctx, plan, base_pix, base_rand, cfg)


def _job(job: tuple[int, Run, int, int | None, int | None, dict[int, list[np.ndarray]]]) -> Run:
    """Train one run and probe it; self-contained (loads the split, seeds itself) so it can run in a worker."""
    _, r, epochs, max_steps, n_train, draws = job
    xtr, ytr, xte, yte = load_split()
    if n_train:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    net = train(xtr, r, epochs, max_steps)
    r.probe = probe(features(net, xtr), ytr, features(net, xte), yte, draws)
    return r


def _cost(r: Run, epochs: int, n: int) -> float:
    """Rough seconds of a run, to start the longest first.

    Fitted to per-step times measured on one thread: float32 and bf16-loss about
    5 ms + 0.33 ms per pair (batch 8: 7 ms, 256: 88 ms); pure bf16 about 5.7 ms per
    pair (no fast bf16 CPU kernels).
    """
    steps = epochs * (n // r.batch)
    return steps * (0.0057 * r.batch if r.precision == "bf16" else 0.005 + 0.00033 * r.batch)


def _summary(ctx: Context, plan: list[Run]) -> None:
    """Facts that separate the two explanations, computed from the runs (no interpretation beyond them)."""
    lines = []
    fp32 = [r for r in plan if r.precision == "fp32"]
    if fp32:
        worst = max(max(c["below_fp32"] for c in r.curve) for r in fp32)
        lines.append(
            f"- float32 arm: the largest share of anchors (per-epoch average over the ~8 batches sampled per epoch) "
            f"whose InfoNCE positive gradient is below float32 resolution (ξ < 2⁻²⁴) is {worst:.3g}"
            + (
                "; round-off therefore cannot have silenced InfoNCE's gradient there, and a FlatNCE advantage in "
                "float32 has to come from weighting every anchor equally (∇log ξ vs ξ/(1+ξ)·∇log ξ)."
                if worst == 0
                else "."
            )
        )
    for arm in ("bf16-loss", "bf16"):
        rs = [r for r in plan if r.precision == arm and r.loss == "infonce"]
        if rs:
            share = statistics.fmean(_tail(r, "below_bf16") for r in rs)
            lines.append(
                f"- {arm} arm, InfoNCE runs: on average {share:.3g} of the anchors (last 20 % of epochs) had "
                "ξ < u_bf16 = 2⁻⁸, where the bf16 cross-entropy gradient on the positive is exactly 0; FlatNCE's is −1 "
                "for every anchor in any precision."
            )
    gaps = _gaps_by_arm(plan)
    if gaps is not None:
        (b, t), per_arm = gaps
        lines.append(
            f"- FlatNCE − InfoNCE at batch {b}, T = {t} (1-shot, paired over seeds): "
            + ", ".join(f"{arm} {_fmt(d)}" for arm, d in per_arm.items())
            + ". Round-off as the cause predicts a gap that grows as the precision drops (bf16 gradients on "
            "the positive vanish at ξ < 2⁻⁸, float32 ones only at ξ < 2⁻²⁴); weighting predicts the same gap in "
            "every arm."
        )
    if lines:
        ctx.text("**Separating the explanations.**\n\n" + "\n".join(lines))


def advantage_verdict(gaps_by_t: dict[float, list[float]], measured: bool) -> str:
    """FlatNCE beats InfoNCE at small batch? From the paired 1-shot gaps FlatNCE − InfoNCE per temperature.

    Per temperature: held when every seed's gap is positive, not held when the mean gap is ≤ 0, partly held
    otherwise; overall held (not held) when every temperature is, else partly held. ``measured=False``
    (fewer seeds or epochs than the full protocol) gives "not measured".
    """
    if not measured or not gaps_by_t or not all(gaps_by_t.values()):
        return "not measured"
    per_t = []
    for gaps in gaps_by_t.values():
        if all(g > 0 for g in gaps):
            per_t.append("held")
        elif statistics.fmean(gaps) <= 0:
            per_t.append("not held")
        else:
            per_t.append("partly held")
    return per_t[0] if len(set(per_t)) == 1 else "partly held"


def roundoff_verdict(share_below_fp32: float, gaps: dict[str, list[float]], measured: bool) -> str:
    """Is round-off why FlatNCE wins? From the float32 InfoNCE runs' largest share of anchors with ξ < u₃₂
    and the paired gaps per precision arm at one (batch, T).

    Round-off as the cause predicts (a) anchors below float32 resolution in float32 training and (b) a gap that
    grows as the precision drops: every bf16 arm's mean gap above the float32 one by more than the float32
    gaps' seed spread. held: both; not held: neither; partly held: one of them. ``measured=False`` (or no
    bf16 arm to compare) gives "not measured".
    """
    fp32 = gaps.get("fp32", [])
    lower = [g for arm, g in gaps.items() if arm != "fp32" and g]
    if not measured or not fp32 or not lower:
        return "not measured"
    spread = statistics.stdev(fp32) if len(fp32) > 1 else 0.0
    grows = all(statistics.fmean(g) > statistics.fmean(fp32) + spread for g in lower)
    below = share_below_fp32 > 0
    if below and grows:
        return "held"
    return "partly held" if below or grows else "not held"


def _claims(ctx: Context, plan: list[Run], cfg: dict) -> None:
    """The verdicts on the note's two claims (advantage at small batch; round-off as its cause)."""
    seeds = sorted({r.seed for r in plan})
    measured = len(seeds) >= MIN_SEEDS and cfg["epochs"] >= MIN_EPOCHS
    fp32 = _cells(plan, "fp32")
    b0 = min(b for b, _, _ in fp32)
    by_t = {t: [f.probe["1-shot"] - i.probe["1-shot"] for f, i in zip(fp32.get((b0, t, "flatnce"), []),
                                                                     fp32.get((b0, t, "infonce"), []))]
            for t in sorted({t for b, t, _ in fp32 if b == b0})}
    size = f"{plural(len(seeds), 'seed')} × {plural(cfg['epochs'], 'epoch')}"
    figure = "; ".join(f"T = {t:g}: {_fmt_gap(g)}" for t, g in by_t.items())
    v = advantage_verdict(by_t, measured)
    claim(ctx, "flatnce", f"At small batch (batch {b0}), FlatNCE pre-training gives better representations than "
          "InfoNCE (1-shot linear probe on held-out test images)", v,
          f"FlatNCE − InfoNCE at batch {b0}, 1-shot, {size}: {figure}" + ("" if measured else " (direction only)"),
          split="test", seeds=seeds, command=None if measured else full_command("flatnce", jobs=True))
    share = max((max(c["below_fp32"] for c in r.curve) for r in plan if r.precision == "fp32" and r.loss == "infonce"),
                default=math.nan)
    gaps = _gaps_by_arm(plan)
    arms = "; gap per precision arm at batch {}, T = {:g}: ".format(*gaps[0]) + ", ".join(
        f"{a} {_fmt_gap(g)}" for a, g in gaps[1].items()) if gaps else ""
    v = roundoff_verdict(share, gaps[1] if gaps else {}, measured)
    claim(ctx, "flatnce", "InfoNCE falls behind because its gradient is lost to floating-point round-off "
          "(ξ/(1 + ξ) below the unit roundoff u) once ξ → 0", v,
          f"largest share of float32 InfoNCE anchors (training batches) with ξ < u₃₂: {share:.3g}{arms}"
          + ("" if measured else f" ({size}: direction only)"),
          split="test", seeds=seeds, command=None if measured else full_command("flatnce", jobs=True))


def _fmt_gap(gaps: list[float]) -> str:
    """A paired gap in percentage points: mean ± std (signed), or the one value."""
    if not gaps:
        return "–"
    m = statistics.fmean(gaps)
    m = 0.0 if round(m, 1) == 0 else m  # no "-0.0"
    if len(gaps) == 1:
        return f"{m:+.1f} pp"
    return f"{m:+.1f} ± {statistics.stdev(gaps):.1f} pp ({sum(g > 0 for g in gaps)}/{len(gaps)} seeds > 0)"


def _gaps_by_arm(plan: list[Run]) -> tuple[tuple[int, float], dict[str, list[float]]] | None:
    """Paired 1-shot differences FlatNCE − InfoNCE per precision arm at the smallest batch all arms ran."""
    arms = [a for a in ARMS if any(r.precision == a for r in plan)]
    if len(arms) < 2:
        return None
    t = min(r.temperature for r in plan if r.precision == arms[-1])
    common = set.intersection(*({r.batch for r in plan if r.precision == a and r.temperature == t} for a in arms))
    if not common:
        return None
    b = min(common)
    out = {}
    for a in arms:
        cells = _cells(plan, a)
        f, i = cells.get((b, t, "flatnce"), []), cells.get((b, t, "infonce"), [])
        out[a] = [x.probe["1-shot"] - y.probe["1-shot"] for x, y in zip(f, i)]
    return (b, t), out


def _cells(plan: list[Run], precision: str) -> dict[tuple[int, float, str], list[Run]]:
    cells: dict[tuple[int, float, str], list[Run]] = {}
    for r in plan:
        if r.precision == precision:
            cells.setdefault((r.batch, r.temperature, r.loss), []).append(r)
    return cells


def _report(ctx: Context, plan: list[Run], base_pix: dict, base_rand: dict, cfg: dict) -> None:
    ctx.table(
        ["reference", "1-shot", "5-shot", "full"],
        [
            ["raw pixels", base_pix["1-shot"], base_pix["5-shot"], base_pix["full"]],
            ["untrained encoder", base_rand["1-shot"], base_rand["5-shot"], base_rand["full"]],
        ],
        caption="Probe accuracy (%) of the references on the held-out split.",
        floatfmt=".1f",
    )
    for precision in ARMS:
        cells = _cells(plan, precision)
        if cells:
            _report_cells(ctx, precision, cells)
    _report_differences(ctx, plan)
    _summary(ctx, plan)
    _claims(ctx, plan, cfg)
    _plot_probe_vs_batch(ctx, plan, {"raw pixels": base_pix, "untrained encoder": base_rand})
    _plot_xi(ctx, plan)
    ctx.result("references", {"raw_pixels": base_pix, "untrained_encoder": base_rand})
    ctx.result("epochs", cfg["epochs"])
    ctx.result("runs", [{"loss": r.loss, "batch": r.batch, "T": r.temperature, "seed": r.seed, "precision": r.precision,
                         "steps": r.steps, "seconds": r.seconds, **r.probe} for r in plan])


def _report_cells(ctx: Context, precision: str, cells: dict[tuple[int, float, str], list[Run]]) -> None:
    """One precision arm: probe accuracy and the ξ statistics per (batch, T, loss), table and results."""
    mean_tail = lambda rs, key: statistics.fmean(_tail(r, key) for r in rs)  # noqa: E731
    n_seeds = len(next(iter(cells.values())))
    rows = []
    for (b, t, loss), rs in sorted(cells.items()):
        rows.append([b, t, loss, _fmt([r.probe["1-shot"] for r in rs]), _fmt([r.probe["5-shot"] for r in rs]),
                     _fmt([r.probe["full"] for r in rs]), rs[0].steps, mean_tail(rs, "info_nce"),
                     mean_tail(rs, "xi_lt_1e-3"), mean_tail(rs, "below_fp32"), mean_tail(rs, "below_bf16"),
                     mean_tail(rs, "median_log10_xi"), sum(r.nonfinite for r in rs)])
    ctx.table(
        ["batch", "T", "loss", "1-shot %", "5-shot %", "full %", "steps", "InfoNCE (end)", "ξ<1e-3", "ξ<u₃₂",
         "ξ<u_bf16", "median log₁₀ξ", "diverged runs"],
        rows,
        caption=(
            f"**{ARMS[precision]}** — probe accuracy on the test split, "
            + (f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed")
            + "; steps = optimizer steps; the last five columns are training-batch statistics averaged over the "
            "last 20 % of epochs: the InfoNCE value, the share of anchors with ξ < 1e-3, with ξ below the float32 / "
            "bfloat16 unit roundoff (where cross-entropy's gradient on the positive is exactly 0 in that "
            "precision), and the median of log₁₀ ξ; diverged runs: runs whose weights became non-finite."
        ),
        floatfmt=".3g",
    )
    ctx.result(
        f"cells_{precision}",
        [
            {
                "batch": b,
                "temperature": t,
                "loss": loss,
                "steps": rs[0].steps,
                **{f"{k}_mean": _ms([r.probe[k] for r in rs])[0] for k in ("1-shot", "5-shot", "full")},
                **{f"{k}_std": _ms([r.probe[k] for r in rs])[1] for k in ("1-shot", "5-shot", "full")},
                "share_xi_lt_1e-3": mean_tail(rs, "xi_lt_1e-3"),
                "share_below_fp32": mean_tail(rs, "below_fp32"),
                "share_below_bf16": mean_tail(rs, "below_bf16"),
                "info_nce_end": mean_tail(rs, "info_nce"),
                "seeds": [r.seed for r in rs],
                "per_seed_1shot": [r.probe["1-shot"] for r in rs],
            }
            for (b, t, loss), rs in sorted(cells.items())
        ],
    )


def _report_differences(ctx: Context, plan: list[Run]) -> None:
    """Paired differences FlatNCE − InfoNCE (same seeds, same probe draws) per arm, batch and temperature."""
    rows = []
    for precision in ARMS:
        cells = _cells(plan, precision)
        for b, t in sorted({(b, t) for b, t, _ in cells}):
            f, i = cells.get((b, t, "flatnce"), []), cells.get((b, t, "infonce"), [])
            if not f or not i:
                continue
            d1 = [a.probe["1-shot"] - c.probe["1-shot"] for a, c in zip(f, i)]
            d5 = [a.probe["5-shot"] - c.probe["5-shot"] for a, c in zip(f, i)]
            rows.append([precision, b, t, _fmt(d1), _fmt(d5), f"{sum(x > 0 for x in d1)}/{len(d1)}"])
    ctx.table(
        ["precision", "batch", "T", "Δ 1-shot (Flat − Info)", "Δ 5-shot", "seeds Flat better (1-shot)"],
        rows,
        caption="Paired differences FlatNCE − InfoNCE (percentage points), same seed and probe draws.",
    )


def _plot_probe_vs_batch(ctx: Context, plan: list[Run], refs: dict[str, dict[str, float]]) -> None:
    import matplotlib.pyplot as plt

    cells = _cells(plan, "fp32")
    batches = sorted({b for b, _, _ in cells})
    temps = sorted({t for _, t, _ in cells})
    n_seeds = len({r.seed for r in plan})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    # markers of the bf16 arms sit a little left / right of their batch so they do not hide each other
    dodge = {("bf16-loss", "infonce"): -0.24, ("bf16-loss", "flatnce"): -0.12, ("bf16", "infonce"): 0.12,
             ("bf16", "flatnce"): 0.24}
    for ax, key in zip(axes, ("1-shot", "5-shot", "full")):
        values = [v for v in refs_values(refs, key)]
        for t in temps:
            for loss, style in (("infonce", "--"), ("flatnce", "-")):
                bs = [b for b in batches if (b, t, loss) in cells]
                ms = [_ms([r.probe[key] for r in cells[(b, t, loss)]]) for b in bs]
                ys = [m for m, _ in ms]
                values += ys
                ax.errorbar(bs, ys, yerr=[s for _, s in ms] if n_seeds > 1 else None, ls=style,
                            marker="o" if loss == "flatnce" else "D", mfc="none" if loss == "infonce" else None,
                            capsize=3, label=f"{_LOSS[loss]}, float32, T = {t:g}")
        for arm, color in (("bf16-loss", "0.45"), ("bf16", "k")):
            for loss, mk in (("infonce", "x"), ("flatnce", "s")):
                pts = sorted((b, _ms([r.probe[key] for r in rs])[0]) for (b, t, l), rs in _cells(plan, arm).items()
                             if l == loss)
                if pts:
                    values += [p[1] for p in pts]
                    ax.plot([p[0] * 2 ** dodge[(arm, loss)] for p in pts], [p[1] for p in pts], mk, ms=8, mew=2,
                            color=color, mfc="none", label=f"{_LOSS[loss]}, {arm}")
        for name, ls in (("raw pixels", ":"), ("untrained encoder", "-.")):
            ax.axhline(refs[name][key], color="0.6", lw=1, ls=ls, label=f"reference: {name}")
        lo, hi = min(values), max(values)
        pad = max(0.0, (MIN_SPAN - (hi - lo)) / 2) + 1.0  # at least MIN_SPAN points: one seed's noise is ~±2
        top = min(hi + pad, 100.5)
        ax.set_ylim(min(lo - pad, top - MIN_SPAN - 2.0), top)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(f"{key} probe accuracy on test (%)")
        ax.set_title(f"{key} probe", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: (("float32" not in labels[k]) + 2 * labels[k].startswith("ref"),
                                                       labels[k]))
    handles, labels = [handles[k] for k in order], [labels[k] for k in order]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    spread = "mean ± std over seeds" if n_seeds > 1 else "one seed, no error bars: differences of ~2 points are noise"
    ctx.figure(fig, "probe-vs-batch", f"Linear-probe accuracy of the frozen representation vs batch size ({spread}); "
               "bf16 arms at T = first temperature, drawn beside their batch; grey lines: the references.")


_LOSS = {"infonce": "InfoNCE", "flatnce": "FlatNCE"}
MIN_SPAN = 12.0  # percentage points: the y range of a probe panel is never narrower


def refs_values(refs: dict[str, dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in refs.values() if not math.isnan(r[key])]


def _plot_xi(ctx: Context, plan: list[Run]) -> None:
    """ξ statistics over training at the smallest float32 batch."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    b0 = min(b for b, _, _ in _cells(plan, "fp32"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    markers = iter("oDs^vP<>*X")
    series: list[tuple[Any, str, np.ndarray, dict]] = []
    for (b, t, loss), rs in sorted(_cells(plan, "fp32").items()):
        if b != b0:
            continue
        st = dict(ls="-" if loss == "flatnce" else "--", marker=next(markers))
        for ax, key in zip(axes, ("xi_lt_1e-3", "median_log10_xi", "info_nce")):
            curve = np.mean([[c[key] for c in r.curve] for r in rs], axis=0)
            series.append((ax, f"{_LOSS[loss]}, float32, T = {t:g}" + (": ξ < 1e-3" if ax is axes[0] else ""),
                           curve, st))
    for arm, color in (("bf16-loss", "0.45"), ("bf16", "k")):
        for (b, t, loss), rs in sorted(_cells(plan, arm).items()):
            if b != b0:
                continue
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
    ylabels = ("share of anchors", "median log₁₀ ξ", "InfoNCE value")
    titles = ("share with ξ < 1e-3 (float32) or ξ < u_bf16 (bf16 arms)", "median log₁₀ ξ over anchors",
              "InfoNCE value (both losses)")
    for ax, title, yl in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # below: covers nothing
    fig.tight_layout(w_pad=2.0)
    ctx.figure(fig, "xi-over-training", f"ξ statistics over training at batch {b0} (training batches, per-epoch "
               "averages, mean over seeds); series that stay at 0 are drawn side by side at small offsets.")
