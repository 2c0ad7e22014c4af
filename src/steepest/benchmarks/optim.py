"""Bench: steepest.optim.Muon step time vs torch.optim.Muon and AdamW on a GPT-like parameter set.

torch.optim.Muon runs Newton–Schulz in bfloat16, and bfloat16 matrix products are
far slower than float32 ones on CPUs without native bf16 units, so one of its steps
on the default set can take minutes. Cases whose first (warm-up) call takes more
than ``SLOW`` seconds are therefore timed by that single call; all others use
``--warmup`` / ``--repeat``. Two like-for-like comparisons separate the optimizer
from the dtype: torch.optim.Muon with its Newton–Schulz computed in float32
(its own function with the bfloat16 cast removed, patched in for the measurement)
against steepest Muon with the same coefficients in float32 on the full set; and
both in bfloat16 on one block of d=256.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..optim import KELLER_JORDAN, Muon, matrix_shape, muon_momentum, orthogonalize
from ..report import Context

TITLE = "optim: Muon step time vs torch.optim.Muon and AdamW (GPT-like parameter set)"
# None: the default thread count, as a user runs the optimizers.
THREADS: int | None = None
SLOW = 20.0  # seconds: slower cases are timed by one call


def gpt_shapes(blocks: int, d: int) -> list[tuple[int, int]]:
    """The hidden matrices of a GPT: per block q, k, v, o (d×d), MLP in (4d×d) and out (d×4d)."""
    return [s for _ in range(blocks) for s in [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]]


def torch_ns_float32(grad: torch.Tensor, ns_coefficients: Any, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton–Schulz (``torch.optim._muon``), minus its cast to bfloat16."""
    a, b, c = ns_coefficients
    X = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


@contextmanager
def torch_ns_in_float32() -> Iterator[None]:
    """torch.optim.Muon with its own Newton–Schulz computed in float32 (patched in for the measurement)."""
    import torch.optim._muon as tm

    real = tm._zeropower_via_newtonschulz
    tm._zeropower_via_newtonschulz = torch_ns_float32
    try:
        yield
    finally:
        tm._zeropower_via_newtonschulz = real


def _interleaved(ctx: Context, fns: dict[str, Callable[[], Any]]) -> dict[str, tuple[float, int]]:
    """name -> (median seconds, timed runs), the runs of all cases interleaved round by round.

    Interleaving spreads load from other processes over all cases alike. Each case's
    first call is its warm-up; a case whose first call exceeds SLOW seconds is timed by
    that call alone.
    """
    warmup, repeat = ctx.warmup, ctx.repeat
    if ctx.device.type == "cuda":  # time finished work, not queued kernels
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    out: dict[str, tuple[float, int]] = {}
    for name, fn in ctx.track(list(fns.items()), "warm-up (first call of each case)"):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > SLOW:
            out[name] = (first, 1)
    fast = {k: f for k, f in fns.items() if k not in out}
    for _ in range(max(0, warmup - 1)):
        for f in fast.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fast}
    for _ in ctx.track(range(max(1, repeat)), "timing rounds"):
        for k, f in fast.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    for k, v in samples.items():
        out[k] = (statistics.median(v), len(v))
    return out


def _table(ctx: Context, shapes: list[tuple[int, int]], cases: list, gen: torch.Generator,
           ns_cases: dict[str, Callable[[list[torch.Tensor]], Any]], caption: str, peer: str) -> dict[str, float]:
    base = [(torch.randn(*s, generator=gen) * s[1] ** -0.5).to(ctx.device) for s in shapes]
    grads = [torch.randn(*s, generator=gen).to(ctx.device) for s in shapes]
    bufs = [torch.zeros_like(g) for g in grads]
    mats = [x.reshape(matrix_shape(x.shape)) for x in muon_momentum(grads, bufs, momentum=0.95)]
    fns: dict[str, Callable[[], Any]] = {}
    for name, make, patch in cases:
        ps = [nn.Parameter(w.clone()) for w in base]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = make(ps)

        def step(opt: Any = opt, patch: bool = patch) -> None:
            with torch_ns_in_float32() if patch else nullcontext():
                opt.step()

        fns[name] = step
    for name, f in ns_cases.items():
        fns["NS:" + name] = lambda f=f: f(mats)
    timed = _interleaved(ctx, fns)
    rows = []
    for name, _, _ in cases:
        t, runs = timed[name]
        ns = timed["NS:" + name][0] if name in ns_cases else None
        rows.append([name, t * 1e3, runs, t / timed[peer][0], ns * 1e3 if ns is not None else float("nan"),
                     (1 - ns / t) if ns is not None else float("nan")])
    ctx.table(["optimizer", "step (ms)", "timed runs", f"× {peer}", "NS alone (ms)", "share of step outside NS"],
              rows, caption=caption)
    return {name: timed[name][0] for name, _, _ in cases}


def run(ctx: Context) -> None:
    from ..linalg import fast_bf16, ns_dtype_for

    blocks, d = ctx.pick((1, 64), (6, 512), (12, 768))
    gen = torch.Generator().manual_seed(ctx.seed)
    shapes = gpt_shapes(blocks, d)
    n = sum(a * b for a, b in shapes)
    fast = fast_bf16(ctx.device)
    auto = ns_dtype_for(torch.empty(0, device=ctx.device), "auto")
    kind = "fast bf16 (auto → bfloat16)" if fast else "slow bf16 (auto → float32)"
    T_BF16 = "torch.optim.Muon (default: Keller Jordan ×5, bfloat16)"
    T_F32 = "torch.optim.Muon, its NS in float32"
    S_DEF = f"steepest Muon (default: Polar Express ×5, ns_dtype='auto' = {str(auto).replace('torch.', '')})"
    S_DEF32 = "steepest Muon, Polar Express ×5, float32"
    S_KJ32 = "steepest Muon, Keller Jordan ×5, float32"
    S_KJ16 = "steepest Muon, Keller Jordan ×5, bfloat16"
    kw = dict(lr=0.02, weight_decay=0.1)
    cases = [
        (T_BF16, lambda ps: torch.optim.Muon(ps, **kw), False),
        (S_DEF, lambda ps: Muon(ps, **kw), False),
        (T_F32, lambda ps: torch.optim.Muon(ps, **kw), True),
        (S_KJ32, lambda ps: Muon(ps, ns_coefficients=KELLER_JORDAN, ns_dtype=torch.float32, **kw), False),
        ("torch.optim.AdamW (same matrices)", lambda ps: torch.optim.AdamW(ps, lr=1e-3), False),
    ]
    ns_cases = {
        S_DEF: lambda mats: orthogonalize(mats, ns_dtype="auto"),
        S_KJ32: lambda mats: orthogonalize(mats, schedule=[KELLER_JORDAN] * 5, ns_dtype=torch.float32),
    }
    if fast:  # the default computes in bf16 here: time the float32 default too, against torch in float32
        cases.insert(3, (S_DEF32, lambda ps: Muon(ps, ns_dtype=torch.float32, **kw), False))
        ns_cases[S_DEF32] = lambda mats: orthogonalize(mats, ns_dtype=torch.float32)
    threads = torch.get_num_threads()
    main = _table(
        ctx, shapes, cases, gen, ns_cases, peer=T_BF16,
        caption=(f"One optimizer step on the hidden matrices of a {blocks}-block, d={d} GPT ({len(shapes)} matrices, "
                 f"{n / 1e6:.1f} M parameters; per block q, k, v, o {d}×{d}, MLP {4 * d}×{d} and {d}×{4 * d}) on "
                 f"{ctx.device.type}, a {kind} device; median of `--repeat` runs after `--warmup`, all cases "
                 f"interleaved round by round (one run when a step takes > {SLOW:.0f} s), {threads} threads. "
                 "steepest Muon runs the wide MLP matrices in Gram space (float32) and batches same-shaped "
                 "matrices up to 2¹⁷ entries on CPU; torch.optim.Muon loops over all."),
    )
    small_blocks, small_d = ctx.pick((1, 32), (1, 256), (1, 512))
    small = _table(
        ctx, gpt_shapes(small_blocks, small_d),
        [(T_BF16, lambda ps: torch.optim.Muon(ps, **kw), False),
         (S_KJ16, lambda ps: Muon(ps, ns_coefficients=KELLER_JORDAN, ns_dtype=torch.bfloat16, **kw), False)],
        gen, {S_KJ16: lambda mats: orthogonalize(mats, schedule=[KELLER_JORDAN] * 5, ns_dtype=torch.bfloat16)},
        peer=T_BF16,
        caption=f"Same NS in the same dtype (bfloat16), one block of d={small_d}.",
    )
    r_def = main[S_DEF] / main[T_BF16]
    r_def32 = main[S_DEF32 if fast else S_DEF] / main[T_F32]
    r_kj32 = main[S_KJ32] / main[T_F32]
    r_b16 = small[S_KJ16] / small[T_BF16]
    ctx.result("device", {"type": ctx.device.type, "fast_bf16": fast, "auto_ns_dtype": str(auto)})
    ctx.result("step_ms", {k: v * 1e3 for k, v in main.items()})
    ctx.result("bf16_step_ms", {k: v * 1e3 for k, v in small.items()})
    ctx.result("ratio_default_vs_torch", r_def)
    ctx.result("ratio_default_float32_vs_torch_float32", r_def32)
    ctx.result("ratio_same_ns_float32", r_kj32)
    ctx.result("ratio_same_ns_bfloat16", r_b16)
    ctx.result("goal_default_le_0.7", bool(r_def <= 0.7))
    ctx.result("goal_float32_le_0.7", bool(r_def32 <= 0.7))
    ctx.text(
        f"**Goals (on a {kind} device): steepest Muon's default step ≤ 0.7× torch.optim.Muon's default, and ≤ 0.7× "
        f"in float32 against torch with its NS in float32.** Default vs default: {r_def:.3f}× "
        f"({'met' if r_def <= 0.7 else 'not met'}); float32 vs float32: {r_def32:.2f}× "
        f"({'met' if r_def32 <= 0.7 else 'not met'}). The same coefficients (Keller Jordan's) in the same dtype: "
        f"{r_kj32:.2f}× in float32 (what the Gram-space iteration of the wide matrices saves), {r_b16:.2f}× in "
        "bfloat16 (small set). Where bfloat16 is slow (CPUs without bf16 units) torch's default pays for it and "
        "ns_dtype='auto' does not."
    )
