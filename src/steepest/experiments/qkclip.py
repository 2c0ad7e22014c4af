"""QK-Clip against attention logits that grow without control under Muon.

Sources: Kimi Team, *Kimi K2: Open Agentic Intelligence* (2025), arXiv:2507.20534,
§2.1 "MuonClip"; Su, *QK-Clip: taking Muon one step further on the way to
scale-up*, kexue.fm/archives/11126. Muon's updates have a fixed spectral size, so at a
large learning rate the query and key weights keep growing and so do the attention
logits; QK-Clip rescales, after each optimizer step, the W_q and W_k rows of every
head whose largest logit S_max of the step exceeded τ by √(τ/S_max) each
(:func:`steepest.optim.qk_clip_`, here through :meth:`steepest.optim.ClipAttention.qk_clip_`).

Measured: the char-LM of :mod:`steepest.experiments.optim` (the same standard-library
text, training / validation / test files, sizes per mode and batches) with its
attention replaced by :class:`steepest.optim.ClipAttention` (causal; the projections
are separate matrices for Muon), trained with steepest Muon (+AdamW for embeddings,
head and vectors) at a learning rate :data:`LR` five times the one chosen for Muon in
the optim experiment, with and without QK-Clip at :data:`TAU`, paired by replicate
(same initialization and batches). Per step: the largest attention logit of the
forward pass over all layers and heads (the scores the softmax saw, before that
step's clip); every few steps the validation loss; at the end the test loss.

The claim: without the clip the largest logit grows far past τ; with it the largest
logit stays at or below τ throughout; the final test loss is no worse (at most
:data:`MARGIN` nats above). Both τ and the learning rate are fixed in advance, not
chosen on the data (:mod:`steepest.experiments._protocol`).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optim import ClipAttention, Muon, muon_param_groups
from ..report import Context, plural
from . import claim, full_command
from ._protocol import (MIN_SEEDS, combine, fmt_cell, fmt_interval, interval, n_caption, outcome, paired,
                        protocol_text)
from .optim import ADAMW, CHARLM_SIZES, CharGPT, charlm_task, lr_factor

TITLE = "QK-Clip: attention logits of a transformer trained with Muon, with and without the clip"
# Small models: one intra-op thread is fastest and leaves the other core free.
THREADS = 1

TAU = 30.0  # the cap: above the largest logit (about 19) of the same model at Muon's chosen lr of 0.02
LR = 0.1  # Muon's lr: 5x the lr the optim experiment chooses for Muon on this task, where logits run away
ADAMW_LR = 1e-2  # the AdamW part (embeddings, head, gains)
MARGIN = 0.01  # nats: "no worse" allows the clipped run's final test loss at most this far above
ARMS = ("no clip", "QK-Clip")
COLORS = {"no clip": "C3", "QK-Clip": "C0"}


class ClipBlock(nn.Module):
    """The optim char-LM's pre-LayerNorm block with :class:`ClipAttention` as its attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = ClipAttention(d, heads, is_causal=True)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


def train(mode: str, steps: int, every: int, seed: int, tau: float | None) -> dict[str, Any]:
    """One run: Muon at :data:`LR` on the char-LM, QK-Clip at ``tau`` after every step (None: no clip).

    Returns per step the largest logit of the forward pass (all layers and heads) and the number of heads
    clipped; the validation loss every ``every`` steps; the final validation and test losses.
    """
    task = charlm_task(mode, steps, seed)
    d, layers, heads, seq, _, _ = CHARLM_SIZES[mode]
    torch.manual_seed(seed)
    model = CharGPT(128, d, layers, heads, seq, block=ClipBlock)
    attn = [b.attn for b in model.blocks]
    opt = Muon(muon_param_groups(model, adamw={"lr": ADAMW_LR, **ADAMW}), lr=LR, momentum=0.95)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))

    def evaluate(f: Any) -> float:
        model.eval()  # no logit record from evaluation batches
        v = f(model)
        model.train()
        return v

    max_logit: list[float] = []
    clipped: list[int] = []
    hist_step, hist_val = [0], [evaluate(task.val_loss)]
    diverged = False
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = task.batch(i)
        loss = task.loss(model(x), y)
        s = max(float(a.max_logits.max()) for a in attn)
        if not (torch.isfinite(loss) and math.isfinite(s)):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        max_logit.append(s)
        if tau is None:
            for a in attn:
                a.max_logits.fill_(-math.inf)
            clipped.append(0)
        else:
            clipped.append(sum(int((a.qk_clip_(tau) < 1).sum()) for a in attn))
        if (i + 1) % every == 0 or i + 1 == steps:
            v = evaluate(task.val_loss)
            hist_step.append(i + 1)
            hist_val.append(v)
            if not math.isfinite(v):
                diverged = True
                break
    test = evaluate(task.test_loss) if not diverged else math.inf
    return {"arm": ARMS[tau is not None], "seed": seed, "tau": tau, "max_logit": max_logit, "clipped": clipped,
            "steps": hist_step, "val": hist_val, "final": hist_val[-1] if not diverged else math.inf,
            "test": test if math.isfinite(test) else math.inf, "diverged": diverged,
            "seconds": time.perf_counter() - t0}


def _job(job: tuple[str, int, int, int, float | None]) -> dict[str, Any]:
    """A self-contained run (builds its task, seeds itself) for a worker process."""
    return train(*job)


def peak(run: dict[str, Any]) -> float:
    """The largest logit a run's forward passes produced (inf when it diverged)."""
    return max(run["max_logit"]) if run["max_logit"] and not run["diverged"] else math.inf


def verdict(peaks_none: list[float], peaks_clip: list[float], test_none: list[float], test_clip: list[float],
            tau: float = TAU, margin: float = MARGIN) -> tuple[str, dict[str, str]]:
    """The claim's verdict from its three parts, each an interval outcome over the replicates:

    - grows: the log of the unclipped peak over τ lies above 0 (the logits run past τ without the clip);
    - bounded: the clipped run's peak lies below τ (at or below τ at every step);
    - no worse: the paired final test loss QK-Clip − no clip lies below ``margin``.

    Combined with :func:`combine`; fewer than MIN_SEEDS replicates: not measured.
    """
    parts = {
        "grows": outcome(interval([math.log(p / tau) if p > 0 else -math.inf for p in peaks_none]), above=0.0),
        "bounded": outcome(interval(peaks_clip), below=tau),
        "no worse": outcome(paired(test_clip, test_none), below=margin),
    }
    return combine(list(parts.values())), parts


def _config(ctx: Context) -> dict[str, int]:
    return ctx.pick(smoke=dict(steps=20, every=10, seeds=1), quick=dict(steps=200, every=10, seeds=1),
                    full=dict(steps=1000, every=25, seeds=3))


def run(ctx: Context) -> None:
    cfg = _config(ctx)
    seeds = [ctx.seed + s for s in range(cfg["seeds"])]
    notes = charlm_task(ctx.mode, cfg["steps"], ctx.seed).notes
    ctx.text(
        "Attention logits are the scores q·k/√d the softmax sees. Muon's update has the same spectral size at every "
        "step, so at a large learning rate W_q and W_k can keep growing and the logits with them (Kimi K2 reports "
        "logits past 1000 and loss spikes). QK-Clip (MuonClip) rescales, after each optimizer step, the query and "
        "key rows of every head whose largest logit S_max of that step exceeded τ by √(τ/S_max) each, so that those "
        f"logits become τ; other heads are untouched. Model and data: {notes}; the attention is "
        "`steepest.optim.ClipAttention` (causal, separate q/k/v/o projections, per-head max logits recorded in "
        f"training). Optimizer: steepest Muon at lr {LR:g} (five times the lr the optim experiment chooses for Muon "
        f"here) for the hidden matrices, AdamW at {ADAMW_LR:g} for embeddings, head and gains, warm-up 5 %, flat, "
        f"linear decay over the last 30 % of {cfg['steps']} steps. τ = {TAU:g}: above the largest logit (about 19) "
        "of the same model trained at Muon's chosen lr of 0.02. The largest logit of a step is read in its forward "
        "pass, before that step's clip: the clip uses the logits of the weights before the update, so one update's "
        "growth can show in the next step's logits.")
    ctx.text(protocol_text(
        "the optim experiment's char-LM — separate standard-library files for training, validation and test; "
        "replicates differ in initialization and batches",
        f"nothing: τ = {TAU:g} and the lr are fixed in advance; the two arms share the initialization and batches",
        len(seeds)))
    jobs = [(ctx.mode, cfg["steps"], cfg["every"], s, tau) for tau in (None, TAU) for s in seeds]
    out = ctx.map_ordered(_job, jobs, "qkclip: Muon without and with QK-Clip")
    runs = {arm: out[k * len(seeds):(k + 1) * len(seeds)] for k, arm in enumerate(ARMS)}
    _report(ctx, runs, seeds, cfg)


def _report(ctx: Context, runs: dict[str, list[dict[str, Any]]], seeds: list[int], cfg: dict[str, int]) -> None:
    none, clip = runs["no clip"], runs["QK-Clip"]
    peaks = {arm: [peak(r) for r in rs] for arm, rs in runs.items()}
    tests = {arm: [r["test"] for r in rs] for arm, rs in runs.items()}
    v, parts = verdict(peaks["no clip"], peaks["QK-Clip"], tests["no clip"], tests["QK-Clip"])
    rows, rec = [], {}
    for arm, rs in runs.items():
        above = [statistics.fmean(s > TAU for s in r["max_logit"]) if r["max_logit"] else math.nan for r in rs]
        late = [max(r["max_logit"][len(r["max_logit"]) // 2:]) if r["max_logit"] else math.nan for r in rs]
        rows.append([arm, fmt_cell(peaks[arm], ".1f"), fmt_cell(late, ".1f"), fmt_cell([100 * a for a in above], ".0f"),
                     fmt_cell([sum(r["clipped"]) for r in rs], ".0f"), fmt_cell([r["final"] for r in rs], ".4f"),
                     fmt_cell(tests[arm], ".4f"),
                     "–" if arm == "no clip" else fmt_interval(paired(tests[arm], tests["no clip"]), ".4f")])
        rec[arm] = {"peak_max_logit": peaks[arm], "late_max_logit": late, "share_steps_above_tau": above,
                    "clipped_head_steps": [sum(r["clipped"]) for r in rs], "final_val": [r["final"] for r in rs],
                    "final_test": tests[arm], "seconds": [r["seconds"] for r in rs]}
    ctx.table(["arm", "largest logit", "largest logit, 2nd half", "steps above τ (%)", "head clips",
               "final val loss", "final test loss", "− no clip (paired)"], rows,
              caption=f"Muon at lr {LR:g}, τ = {TAU:g}, {cfg['steps']} steps, {n_caption(len(seeds), 'replicate')}. "
                      "Largest logit: over all steps, layers and heads, as the forward pass saw it; 2nd half: over the "
                      "second half of training; head clips: head-steps the clip rescaled.")
    ctx.result("tau", TAU)
    ctx.result("lr", LR)
    ctx.result("steps", cfg["steps"])
    ctx.result("arms", rec)
    ctx.result("max_logit_per_step", {arm: [statistics.fmean(r["max_logit"][i] for r in rs)
                                            for i in range(min(len(r["max_logit"]) for r in rs))]
                                      for arm, rs in runs.items()})
    ctx.result("claim_parts", parts)
    ctx.result("claim_intervals", {
        "log_peak_over_tau_no_clip": interval([math.log(p / TAU) if p > 0 else -math.inf
                                               for p in peaks["no clip"]]).record("log(peak / τ)"),
        "peak_clip": interval(peaks["QK-Clip"]).record("largest logit with QK-Clip"),
        "test_loss_clip_minus_none": paired(tests["QK-Clip"], tests["no clip"]).record("final test loss difference")})
    few = len(seeds) < MIN_SEEDS
    claim(ctx, "qkclip", f"Muon at lr {LR:g} lets the largest attention logit of a small transformer grow far past "
          f"τ = {TAU:g}; with QK-Clip after every step it stays at or below τ throughout, and the final test loss is "
          f"no worse (at most {MARGIN:g} nats above)", v,
          f"largest logit without the clip {fmt_cell(peaks['no clip'], '.1f')}, with it "
          f"{fmt_cell(peaks['QK-Clip'], '.1f')} (τ = {TAU:g}); final test loss QK-Clip − no clip "
          f"{fmt_interval(paired(tests['QK-Clip'], tests['no clip']), '.4f')}; parts: "
          + ", ".join(f"{k} {o}" for k, o in parts.items())
          + (f" ({plural(len(seeds), 'replicate')}: direction only)" if few else ""),
          split="test", seeds=seeds, command=full_command("qkclip") if few else None)
    _plot(ctx, none, clip)


def _plot(ctx: Context, none: list[dict[str, Any]], clip: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for arm, rs in (("no clip", none), ("QK-Clip", clip)):
        for k, r in enumerate(rs):
            x = np.arange(1, len(r["max_logit"]) + 1)
            axes[0].plot(x, r["max_logit"], color=COLORS[arm], lw=1.0, alpha=0.9 if k == 0 else 0.45,
                         label=f"{arm}, peak {peak(r):.3g}" + (f" (replicate {r['seed']})" if len(rs) > 1 else ""))
            axes[1].plot(r["steps"], r["val"], color=COLORS[arm], marker="o" if arm == "no clip" else "s", ms=3,
                         alpha=0.9 if k == 0 else 0.45,
                         label=f"{arm}: final {r['final']:.4g}" + (f" (replicate {r['seed']})" if len(rs) > 1 else ""))
    axes[0].axhline(TAU, color="k", ls="--", lw=1, label=f"τ = {TAU:g}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("largest attention logit of the step (log scale)")
    axes[0].set_title(f"largest logit per step (all layers and heads), Muon lr {LR:g}", fontsize=10)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("validation loss")
    axes[1].set_title("validation loss", fontsize=10)
    lo = min(min(r["val"]) for r in none + clip)
    axes[1].set_ylim(lo - 0.05, min(max(max(r["val"][2:] or r["val"]) for r in none + clip) + 0.1, 6.0))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure(fig, "logits", f"Left: the largest attention logit of each training step (before that step's clip), "
               f"without and with QK-Clip at τ = {TAU:g} (dashed). Right: validation loss of the same runs. "
               f"{n_caption(len(none), 'replicate').capitalize()}, each replicate drawn.")
