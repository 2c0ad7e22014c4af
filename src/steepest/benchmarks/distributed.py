"""Bench: steepest Muon on 1, 2 and 4 local processes under DDP and FSDP2, each with both strategies.

DDP: ``ddp_strategy="local"`` / ``"partition"``; FSDP2: ``shard_strategy="all_gather"`` /
``"all_to_all"``.

Every configuration runs in its own gloo process group on loopback (one intra-op
thread per process, ``steepest.testing.launch``). Per strategy and world size:
the median time of a whole training step (forward, backward, ``opt.step()``) and
of ``opt.step()`` alone, the slowest rank counting; and the bytes one rank sends
per step (``steepest.testing.CommCounter``: every collective seen, ring-model
bytes), split into the data-parallel traffic (DDP's all-reduce / FSDP2's
all-gather + reduce-scatter) and the optimizer's own (Muon's orthogonalization
of sharded matrices or, for DDP "partition", the all-gather of the results each
rank computed for its share of the matrices; the non-finite check).
torch.optim.AdamW under FSDP2 is the peer: an elementwise optimizer that needs no
communication of its own.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..report import Context

TITLE = ("distributed: Muon under DDP (local vs partition) and FSDP2 (all_gather vs all_to_all), 1/2/4 processes on "
         "one machine")
# None: the parent keeps its threads; each worker process runs with one (launch's default).
THREADS: int | None = None

# "DDP <ddp_strategy>", "FSDP2 <shard_strategy>" (Muon's option values), and the AdamW peer
STRATEGIES = ("DDP local", "DDP partition", "FSDP2 all_gather", "FSDP2 all_to_all", "FSDP2 AdamW (peer)")


def _model(d: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, d), nn.GELU(), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.GELU()]
    layers.append(nn.Linear(d, 16))
    return nn.Sequential(*layers)


def _worker(rank: int, world: int, d: int, blocks: int, batch: int, warmup: int, repeat: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from ..optim import Muon, muon_param_groups
    from ..testing import CommCounter

    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(batch, d, generator=g), torch.randn(batch, 16, generator=g)
    out = {}
    for strategy in STRATEGIES:
        base = _model(d, blocks)
        if strategy.startswith("DDP"):
            model: nn.Module = DistributedDataParallel(base) if world > 1 else base
            opt = Muon(muon_param_groups(base), lr=0.02, ddp_strategy=strategy.split()[-1])
        else:
            for layer in base:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            model = fully_shard(base)
            if strategy.endswith("AdamW (peer)"):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            else:
                opt = Muon(muon_param_groups(model), lr=0.02, shard_strategy=strategy.split()[-1])

        def fwd_bwd() -> None:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()

        step_times, opt_times = [], []
        for i in range(warmup + repeat):
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= warmup:
                step_times.append(t2 - t0)
                opt_times.append(t2 - t1)
        dist.barrier()
        with CommCounter() as c_train:
            fwd_bwd()
        with CommCounter() as c_opt:
            opt.step()
        out[strategy] = {
            "step_s": statistics.median(step_times),
            "opt_s": statistics.median(opt_times),
            "train_bytes": c_train.bytes_sent,
            "opt_bytes": c_opt.bytes_sent,
            "opt_collectives": dict(c_opt.counts),
        }
    return out


def run(ctx: Context) -> None:
    from ..testing import launch

    d, blocks, batch = ctx.pick((32, 1, 16), (192, 2, 64), (512, 6, 128))
    worlds = ctx.pick((2,), (1, 2, 4), (1, 2, 4))
    warmup, repeat = ctx.warmup, ctx.repeat
    timeout = ctx.pick(60.0, 900.0, 3600.0)
    n_params = sum(p.numel() for p in _model(d, blocks).parameters())
    ctx.text(
        f"Model: {blocks} block(s) of Linear(d, d), Linear(d, 4d), Linear(4d, d) with d = {d} and a Linear(d, 16) "
        f"head ({n_params / 1e6:.2f} M float32 parameters; the head and biases go to AdamW inside Muon). Batch "
        f"{batch} per rank, MSE loss. gloo on loopback, 1 thread per process, {torch.get_num_threads()} "
        f"thread(s) in the parent; this machine has {torch.multiprocessing.cpu_count()} cores, so 4 processes "
        f"oversubscribe it when it has fewer than 4. Times are medians of {repeat} steps after {warmup} warm-up "
        "step(s), the slowest rank counting."
    )
    res: dict[int, dict] = {}
    for W in ctx.track(worlds, "world sizes"):
        per_rank = launch(_worker, W, d, blocks, batch, warmup, repeat, timeout=timeout)
        res[W] = {s: {"step_s": max(r[s]["step_s"] for r in per_rank), "opt_s": max(r[s]["opt_s"] for r in per_rank),
                      "train_bytes": per_rank[0][s]["train_bytes"], "opt_bytes": per_rank[0][s]["opt_bytes"],
                      "opt_collectives": per_rank[0][s]["opt_collectives"]} for s in STRATEGIES}
    _report(ctx, res)
    ctx.result("config", {"d": d, "blocks": blocks, "batch": batch, "params": n_params})
    ctx.result("by_world", {str(W): by for W, by in res.items()})
    _plot(ctx, res)


def _report(ctx: Context, res: dict[int, dict]) -> None:
    """Per world size and strategy: times and bytes; then the two strategy-vs-strategy ratio tables."""
    rows = []
    for W, by in res.items():
        ddp = by["DDP local"]
        for s in STRATEGIES:
            m = by[s]
            rows.append([W, s, m["step_s"] * 1e3, m["opt_s"] * 1e3, m["step_s"] / ddp["step_s"],
                         m["train_bytes"] / 1e6, m["opt_bytes"] / 1e6,
                         ", ".join(f"{k}×{v}" for k, v in sorted(m["opt_collectives"].items())) or "—"])
    ctx.table(["W", "strategy", "step ms", "opt.step ms", "step / DDP local", "data-parallel MB sent",
               "optimizer MB sent", "optimizer collectives"], rows,
              caption="Per step and per rank. MB sent: ring-model bytes one rank puts on the wire.")
    gather_vs_a2a = []
    for W, by in res.items():
        if W > 1:
            gth, a2a = by["FSDP2 all_gather"], by["FSDP2 all_to_all"]
            gather_vs_a2a.append([W, gth["opt_s"] / a2a["opt_s"], gth["step_s"] / a2a["step_s"],
                                  gth["opt_bytes"] / max(a2a["opt_bytes"], 1.0)])
    if gather_vs_a2a:
        ctx.table(["W", "opt.step all_gather / all_to_all", "step all_gather / all_to_all",
                   "optimizer bytes all_gather / all_to_all"], gather_vs_a2a,
                  caption="FSDP2 Muon: `shard_strategy=\"all_gather\"` relative to `\"all_to_all\"` (the default; "
                  "> 1: all_to_all is better).")
    local, part = "DDP local", "DDP partition"
    ddp_rows = [[W, by[local]["opt_s"] / by[part]["opt_s"], by[local]["step_s"] / by[part]["step_s"],
                 by[part]["opt_bytes"] / 1e6] for W, by in res.items() if W > 1]
    if ddp_rows:
        ctx.table(["W", "opt.step local / partition", "step local / partition", "partition: optimizer MB sent"],
                  ddp_rows, caption="DDP Muon: every rank orthogonalizing every matrix (`ddp_strategy=\"local\"`, the "
                  "default) relative to the matrices dealt out and all-gathered (`ddp_strategy=\"partition\"`; > 1: "
                  "partition is better).")


def _plot(ctx: Context, res: dict[int, dict]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    Ws = list(res)
    width = 0.8 / len(STRATEGIES)
    for i, s in enumerate(STRATEGIES):
        xs = [j + (i - (len(STRATEGIES) - 1) / 2) * width for j in range(len(Ws))]
        opt_ms = [res[W][s]["opt_s"] * 1e3 for W in Ws]
        rest_ms = [max(res[W][s]["step_s"] * 1e3 - o, 0.0) for W, o in zip(Ws, opt_ms)]
        bars = axes[0].bar(xs, rest_ms, width, label=s)
        axes[0].bar(xs, opt_ms, width, bottom=rest_ms, color=bars[0].get_facecolor(), alpha=0.55, hatch="//")
        axes[1].bar(xs, [(res[W][s]["train_bytes"] + res[W][s]["opt_bytes"]) / 1e6 for W in Ws], width, label=s)
    for ax, lab in zip(axes, ("step time (ms); hatched: opt.step()", "MB sent per rank per step")):
        ax.set_xticks(range(len(Ws)), [f"W = {W}" for W in Ws])
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=7)
    ctx.figure(fig, "step-time-bytes", "Step time (solid: forward + backward, hatched: opt.step()) and bytes sent per rank per "
               "step, by strategy and world size.")
