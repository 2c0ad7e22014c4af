"""Steepest descent under three norms: SGD (Euclidean), SignSGD (∞-norm), Muon (spectral).

Muon as in Keller Jordan, *Muon: An optimizer for hidden layers in neural networks*
(2024), kellerjordan.github.io/posts/muon/; the three optimizers as steepest descent
under a norm as in Su, *Why we prefer isotropy: an understanding via steepest
descent*, kexue.fm/archives/11549. Two tasks, every optimizer with its learning
rate picked from a small grid by final validation loss:

- **digits**: an MLP 64→128→128→10 on scikit-learn's digits (1797 images),
  stratified 75/25 train/validation split (``random_state=0``), minibatch 64.
- **char-LM**: a small GPT-style character model (pre-LayerNorm blocks, separate
  q/k/v/o projections, 4× GELU MLP, learned positions, untied head) on Python source
  text that ships with Python: the standard library files in ``TRAIN_FILES``
  (training) and ``VAL_FILES`` (validation) under ``sysconfig.get_paths()["stdlib"]``,
  read as ASCII (other characters become ``?``). Files missing from a Python
  version are skipped; the files used are listed in the report.

Optimizers: steepest Muon (+AdamW for embeddings, head and vectors via
``muon_param_groups``), torch.optim.Muon (+ a separate torch AdamW for the same
non-matrix parameters), AdamW, SGD with Nesterov momentum 0.9, SignSGD with
momentum 0.9. Both Muons use AdamW's best lr for their AdamW part. All runs share
the initialization, the batches and the lr schedule (linear warm-up over 5 %, flat,
linear decay to 0 over the last 30 %).

Measuring (``train``, ``run_task``, ``_goal_rows``) returns plain data; the
``_report_*`` / ``_plot_curves`` functions write it.
"""

from __future__ import annotations

import math
import os
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optim import Muon, SignSGD, muon_param_groups
from ..report import DIVERGED, Context
from . import claim
from ._data import digits_split

TITLE = "Steepest descent under three norms: SGD, SignSGD and Muon on digits and a character LM"
# Small models: one intra-op thread is fastest (measured) and leaves the other core free.
THREADS = 1

TRAIN_FILES = [
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "dataclasses.py", "difflib.py", "enum.py",
    "functools.py", "inspect.py", "pathlib.py", "pprint.py", "shutil.py", "subprocess.py", "tarfile.py",
    "threading.py", "typing.py",
]
VAL_FILES = ["textwrap.py", "string.py", "fractions.py", "heapq.py"]

GOAL = 0.8  # Muon reaches AdamW's final validation loss in at most this fraction of AdamW's steps
CHANCE = {"digits": math.log(10), "char-LM": math.log(128)}  # the loss of a uniform prediction
OPTIMIZERS = ["AdamW", "Muon (steepest)", "torch.optim.Muon", "SGD", "SignSGD"]
COLORS = {"AdamW": "C0", "Muon (steepest)": "C3", "torch.optim.Muon": "C1", "SGD": "C2", "SignSGD": "C4"}
# markers keep curves that coincide (the two Muons) apart; hollow for torch.optim.Muon
MARKERS = {"AdamW": ("o", None), "Muon (steepest)": ("s", None), "torch.optim.Muon": ("D", "none"), "SGD": ("^", None),
           "SignSGD": ("v", None)}


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def read_stdlib(files: list[str]) -> tuple[torch.Tensor, list[str]]:
    """ASCII codes of the given standard-library files, concatenated; and the files found."""
    root = sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    for f in files:
        path = os.path.join(root, f)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read())
            used.append(f)
    text = "\n".join(parts).encode("ascii", errors="replace")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long(), used


@dataclass
class Task:
    """A model factory, a batch stream, the loss, a validation loss (and accuracy) and a description."""

    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    val_loss: Callable[[nn.Module], float]
    notes: str
    accuracy: Callable[[nn.Module], float] | None = None


def digits_task(ctx: Context, steps: int, seed: int) -> Task:
    Xtr, ytr, Xva, yva = digits_split(0.25, 0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(Xtr), (steps, 64), generator=g)

    def val(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(Xva), yva))

    def acc(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(Xva).argmax(1) == yva).float().mean())

    return Task(
        name="digits",
        make_model=lambda: MLP(128),
        batch=lambda i: (Xtr[order[i]], ytr[order[i]]),
        loss=lambda out, target: F.cross_entropy(out, target),
        val_loss=val,
        notes=f"digits: {len(Xtr)} train / {len(Xva)} validation images, MLP 64-128-128-10, batch 64",
        accuracy=acc,
    )


def charlm_task(ctx: Context, steps: int, seed: int) -> Task:
    d, layers, heads, seq, bs = ctx.pick((32, 1, 2, 32, 8), (64, 2, 4, 64, 16), (128, 2, 4, 64, 32))
    n_val = ctx.pick(8, 64, 128)
    train, used_tr = read_stdlib(TRAIN_FILES)
    val, used_va = read_stdlib(VAL_FILES)
    if len(train) < 10 * seq or len(val) < n_val * seq + 1:
        raise RuntimeError("too little standard-library text found for the char-LM task")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - seq - 1, (steps, bs), generator=g)
    offs = torch.arange(seq + 1)
    vstarts = torch.linspace(0, len(val) - seq - 2, n_val).long()
    vx = val[vstarts[:, None] + offs]

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = train[starts[i][:, None] + offs]
        return w[:, :-1], w[:, 1:]

    def val_loss(model: nn.Module) -> float:
        with torch.no_grad():
            out = model(vx[:, :-1])
            return float(F.cross_entropy(out.reshape(-1, out.shape[-1]), vx[:, 1:].reshape(-1)))

    return Task(
        name="char-LM",
        make_model=lambda: CharGPT(128, d, layers, heads, seq),
        batch=batch,
        loss=lambda out, target: F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1)),
        val_loss=val_loss,
        notes=(f"char-LM: d={d}, {layers} blocks, {heads} heads, context {seq}, batch {bs}; "
               f"{len(train) / 1e3:.0f} k training characters from {', '.join(used_tr)}; "
               f"validation: {n_val} windows evenly spaced over {len(val) / 1e3:.0f} k characters of "
               f"{', '.join(used_va)}"),
    )


# ---------------------------------------------------------------------------
# Optimizers and training
# ---------------------------------------------------------------------------
class Several:
    """Several optimizers stepped together (torch.optim.Muon needs a separate AdamW)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = [o for o in opts if o is not None]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()


ADAMW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)


def make_optimizer(name: str, model: nn.Module, lr: float, adamw_lr: float) -> Several:
    if name == "AdamW":
        return Several(torch.optim.AdamW(model.parameters(), lr=lr, **ADAMW))
    if name == "SGD":
        return Several(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True))
    if name == "SignSGD":
        return Several(SignSGD(model.parameters(), lr=lr, momentum=0.9))
    groups = muon_param_groups(model, adamw={"lr": adamw_lr, **ADAMW})
    if name == "Muon (steepest)":
        return Several(Muon(groups, lr=lr, momentum=0.95))
    if name == "torch.optim.Muon":
        hidden = [g for g in groups if g["use_muon"]][0]["params"]
        rest = [g for g in groups if not g["use_muon"]][0]["params"]
        return Several(torch.optim.Muon(hidden, lr=lr, momentum=0.95, weight_decay=0.0),
                       torch.optim.AdamW(rest, lr=adamw_lr, **ADAMW))
    raise ValueError(name)


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5 %, flat, linear decay to 0 over the last 30 %."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    decay_start = int(0.7 * total)
    if step >= decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def train(task: Task, name: str, lr: float, adamw_lr: float, steps: int, eval_every: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(name, model, lr, adamw_lr)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps)) for o in opt.opts]
    hist_step, hist_val, hist_time = [0], [task.val_loss(model)], [0.0]
    elapsed = 0.0
    diverged = False
    for i in range(steps):
        x, y = task.batch(i)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = task.loss(model(x), y)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
        for s in scheds:
            s.step()
        elapsed += time.perf_counter() - t0
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            v = task.val_loss(model)
            hist_step.append(i + 1)
            hist_val.append(v)
            hist_time.append(elapsed)
            if not math.isfinite(v):
                diverged = True
                break
    final = hist_val[-1] if not diverged else float("inf")
    out = {"optimizer": name, "lr": lr, "steps": hist_step, "val": hist_val, "seconds": hist_time,
           "final": final, "diverged": diverged, "ms_per_step": 1e3 * elapsed / max(1, hist_step[-1])}
    if task.accuracy is not None and not diverged:
        out["accuracy"] = task.accuracy(model)
    return out


def steps_to(run: dict, target: float) -> tuple[int | None, float | None]:
    for s, v, t in zip(run["steps"], run["val"], run["seconds"]):
        if v <= target:
            return s, t
    return None, None


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------
def grids(ctx: Context) -> dict[str, list[float]]:
    return {
        "AdamW": ctx.pick([3e-3], [3e-3, 1e-2, 3e-2], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
        "Muon (steepest)": ctx.pick([0.02], [0.01, 0.02, 0.05], [0.005, 0.01, 0.02, 0.05, 0.1]),
        # quick: only steepest Muon's chosen lr (same lr convention), since torch.optim.Muon's bfloat16
        # Newton–Schulz makes it by far the slowest optimizer on CPU.
        "torch.optim.Muon": ctx.pick([], [], [0.005, 0.01, 0.02, 0.05, 0.1]),
        "SGD": ctx.pick([0.1], [0.1, 0.3, 1.0], [0.03, 0.1, 0.3, 1.0, 3.0]),
        "SignSGD": ctx.pick([1e-3], [1e-3, 3e-3, 1e-2], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    }


def run_task(ctx: Context, task: Task, steps: int, eval_every: int) -> tuple[dict[str, dict], list[list]]:
    """Every optimizer over its lr grid: the best run per optimizer and one row per run."""
    grid = grids(ctx)
    best: dict[str, dict] = {}
    rows = []
    jobs = [(n, lr) for n in OPTIMIZERS for lr in (grid[n] or [None])]
    adamw_lr = grid["AdamW"][0]
    for name, lr in ctx.track(jobs, f"{task.name}: optimizers x lr grid"):
        if name != "AdamW" and "AdamW" in best:
            adamw_lr = best["AdamW"]["lr"]
        if lr is None:  # an empty grid: steepest Muon's chosen lr
            lr = best["Muon (steepest)"]["lr"]
        r = train(task, name, lr, adamw_lr, steps, eval_every, ctx.seed)
        rows.append([task.name, name, lr, _fmt_final(task.name, r), r.get("accuracy", float("nan")), r["ms_per_step"]])
        if name not in best or r["final"] < best[name]["final"]:
            best[name] = r
    for row in rows:
        row.append("✓" if best[row[1]]["lr"] == row[2] else "")
    return best, rows


def diverged(task: str, run: dict) -> bool:
    """A run diverged when its loss became non-finite or it ended no better than chance (a uniform prediction)."""
    return bool(run["diverged"]) or not math.isfinite(run["final"]) or run["final"] >= CHANCE.get(task, math.inf)


def _fmt_final(task: str, run: dict) -> Any:
    return DIVERGED if diverged(task, run) else run["final"]


def steps_verdict(ratios: dict[str, float], goal: float = GOAL) -> str:
    """Muon needs at most ``goal`` × AdamW's steps to reach AdamW's final validation loss, per task.

    held: on every task; partly held: on some; not held: on none (not reached counts as not met).
    """
    if not ratios:
        return "not measured"
    met = [math.isfinite(r) and r <= goal for r in ratios.values()]
    return "held" if all(met) else ("partly held" if any(met) else "not held")


def _claim(ctx: Context, results: dict[str, dict[str, dict]]) -> None:
    ratios, parts = {}, []
    for tname, best in results.items():
        target = best["AdamW"]["final"]
        s_m, _ = steps_to(best["Muon (steepest)"], target)
        s_a, _ = steps_to(best["AdamW"], target)
        ratios[tname] = (s_m / s_a) if (s_m is not None and s_a) else math.nan
        parts.append(f"{tname}: {ratios[tname]:.2f}× ({s_m} vs {s_a} steps)" if s_m is not None
                     else f"{tname}: not reached in {best['Muon (steepest)']['steps'][-1]} steps")
    claim(ctx, "optim", f"steepest's Muon reaches AdamW's final validation loss in at most {GOAL:g}× AdamW's steps "
          "(each at its best learning rate of a small grid)", steps_verdict(ratios), "; ".join(parts),
          split="validation", seeds=[ctx.seed])


def _goal_rows(results: dict[str, dict[str, dict]]) -> list[list[Any]]:
    """Per task and optimizer: steps (and training seconds) to reach AdamW's final validation loss."""
    rows = []
    for tname, best in results.items():
        target = best["AdamW"]["final"]
        base_steps, _ = steps_to(best["AdamW"], target)
        for name in OPTIMIZERS:
            r = best[name]
            s, t = steps_to(r, target)
            ratio = s / base_steps if (s is not None and base_steps) else float("nan")
            rows.append([tname, name, r["lr"], _fmt_final(tname, r), s if s is not None else "not reached", ratio,
                         t if t is not None else float("nan"), r["ms_per_step"]])
    return rows


def _charlm_ratio(results: dict[str, dict[str, dict]]) -> tuple[float, int | None, int | None]:
    """Steepest Muon's steps to AdamW's final char-LM validation loss, relative to AdamW's own."""
    lm = results["char-LM"]
    s_m, _ = steps_to(lm["Muon (steepest)"], lm["AdamW"]["final"])
    s_a, _ = steps_to(lm["AdamW"], lm["AdamW"]["final"])
    return ((s_m / s_a) if (s_m is not None and s_a) else float("nan")), s_m, s_a


def _report_intro(ctx: Context, tasks: list[Task]) -> None:
    ctx.text(
        "Steepest descent `ΔW = −η·dualmap(G)` under three norms: Euclidean (SGD), ∞-norm (SignSGD, "
        "`sign(G)`) and spectral (Muon, `msign(G)`), with AdamW as the common baseline. "
        + " ".join(t.notes + "." for t in tasks)
        + " Each optimizer's lr is the grid value with the lowest final validation loss (grids in the first table); "
        + ("torch.optim.Muon runs at steepest Muon's chosen lr only (same lr convention), because its bfloat16 "
           "Newton–Schulz makes it by far the slowest optimizer on CPU; `--full` gives it the whole grid. "
           if not ctx.full else "")
        + "The two Muons use AdamW's best lr for their AdamW part (embeddings, head, gains and biases). steepest Muon "
        "runs its defaults (Polar Express NS in float32); torch.optim.Muon its own (Keller Jordan coefficients in "
        "bfloat16), weight decay 0 for both. Schedule: warm-up 5 %, flat, linear decay to 0 over the last 30 %."
    )


def _report_goal(ctx: Context, results: dict[str, dict[str, dict]], goal_rows: list[list[Any]]) -> None:
    for (tname, name, lr, _, steps, _, _, ms) in goal_rows:
        ctx.result(f"{tname}/{name}/steps_to_adamw_final", None if steps == "not reached" else steps)
        ctx.result(f"{tname}/{name}/final_val", results[tname][name]["final"])
        ctx.result(f"{tname}/{name}/lr", lr)
        ctx.result(f"{tname}/{name}/ms_per_step", ms)
    ctx.table(["task", "optimizer", "lr", "final val loss", "steps to AdamW's final", "× AdamW's steps",
               "seconds to it", "ms/step"], goal_rows,
              caption="Steps (and training seconds) each optimizer needs to reach AdamW's final validation loss "
                      "(evaluated every few steps; AdamW's own count is the first evaluation at or below its final "
                      "value).", timing=True)
    ratio, s_m, s_a = _charlm_ratio(results)
    ctx.result("charlm_muon_steps_ratio", ratio)
    ctx.result("charlm_goal_met", bool(ratio <= GOAL))
    ctx.text(
        f"Char-LM: steepest Muon needs {ratio:.2f}× AdamW's steps ({s_m} vs {s_a}) to reach AdamW's final "
        f"validation loss (`{ctx.mode}` mode, seed {ctx.seed}; the learning rates were chosen on the same "
        "validation split, so this compares tuned optimizers, not held-out performance)."
    )
    _claim(ctx, results)


def _plot_curves(ctx: Context, results: dict[str, dict[str, dict]]) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    for row, (tname, best) in enumerate(results.items()):
        vals = []
        for name in OPTIMIZERS:
            r = best[name]
            lab = f"{name} (lr {r['lr']:g})" + (f", {DIVERGED}" if diverged(tname, r) else "")
            fin = [v for v in r["val"] if math.isfinite(v)]
            vals += fin
            mk, mfc = MARKERS[name]
            for ax, x in zip(axes[row], (r["steps"], r["seconds"])):
                ax.plot(x[: len(fin)], fin, color=COLORS[name], label=lab, marker=mk, mfc=mfc, ms=5,
                        markevery=(OPTIMIZERS.index(name) % 3, 3))
                if diverged(tname, r) and fin:
                    ax.plot(x[len(fin) - 1], fin[-1], "x", color="red", ms=9, mew=2.5)
        target = best["AdamW"]["final"]
        for ax, xl in zip(axes[row], ("step", "training wall-clock (s)")):
            ax.axhline(target, color="0.6", lw=0.8, ls="--", label=f"AdamW's final: {target:.3g}")
            ax.set_xlabel(xl)
            ax.set_ylabel("validation loss (log scale)")
            ax.set_title(tname)
            ax.set_yscale("log")
            # enough labelled ticks on a narrow log range (e.g. 2.1–5.1 for the char-LM)
            if max(vals) / min(vals) < 10:  # less than a decade: evenly spaced round values
                ax.yaxis.set_major_locator(FixedLocator(MaxNLocator(nbins=7).tick_values(min(vals), max(vals))))
            else:
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0), numticks=20))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.25, which="major")
            ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    ctx.figure(fig, "curves", "Validation loss (log scale) of each optimizer at its best lr, against steps (left) "
               "and training wall-clock (right); dashed: AdamW's final validation loss. Wall-clock excludes the "
               "evaluations; the load the times were measured under is in the tables' captions.")


def run(ctx: Context) -> None:
    torch.manual_seed(ctx.seed)
    np.random.seed(ctx.seed)
    d_steps, d_eval = ctx.pick(20, 300, 1000), ctx.pick(10, 15, 25)
    l_steps, l_eval = ctx.pick(20, 300, 1000), ctx.pick(10, 15, 25)
    tasks = [(digits_task(ctx, d_steps, ctx.seed), d_steps, d_eval), (charlm_task(ctx, l_steps, ctx.seed), l_steps, l_eval)]
    _report_intro(ctx, [t for t, _, _ in tasks])
    all_rows, results = [], {}
    for task, steps, every in tasks:
        best, rows = run_task(ctx, task, steps, every)
        all_rows += rows
        results[task.name] = best
    ctx.table(["task", "optimizer", "lr", "final val loss", "val accuracy", "ms/step", "chosen"], all_rows,
              caption="Learning-rate grid (final validation loss; digits also accuracy). 'diverged': the loss "
                      "became non-finite or ended no better than chance (log 10 for digits, log 128 for char-LM).",
              timing=True)
    _report_goal(ctx, results, _goal_rows(results))
    _plot_curves(ctx, results)
