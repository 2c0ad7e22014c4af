"""World size 3 on gloo: dimensions not divisible by the world, a rank holding 0 rows, NaN in one shard.

Every optimizer under FSDP2 and DDP must equal the one-process run on the
concatenated batch (1e-5, float64), and a decision that depends on data (the
non-finite check, a learned rate, a positivity check) must be the same on every
rank. Each case failed before its fix: EGStepSize/EGDD checked NaN only in their
own shard (half-stepped tensors, deadlocks), HypergradientSGD learned a different
lr on each rank, EGD's check crashed on an empty shard, nu_stats() raised or
returned per-rank partial values.

Matrix views (Muon's and NorMuon's ``split``, ``heads``, ``batched``) are checked
against the one-process run of the blocks as separate parameters: a fused weight
whose blocks straddle the shards (gathered), one whose shard boundaries fall
between blocks (local), and a stack of 4 matrices over 3 ranks (2/2/0). QK-Clip on
row-sharded projections (a head straddling two ranks) equals the one-process clip.
DCLW with a negative queue and ``gather_distributed`` (DDP) gives the one-process
gradients and queue contents.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from steepest.optim import (
    EGD,
    EGDD,
    EGStepSize,
    HypergradientSGD,
    Muon,
    NonFiniteGradientError,
    ClipAttention,
    NorMuon,
    muon_param_groups,
)
from steepest.losses import FlatNCELoss, NegativeQueue
from steepest.testing import launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD, STEPS, BATCH, TIMEOUT = 3, 3, 6, 180.0
NAMES = ("muon_a2a", "muon_gather", "muon_ball", "eg_coordinate", "eg_tensor", "eg_global", "egdd",
         "hypergradient", "egd")


def _model() -> nn.Module:
    # 7 rows split 3/2/2, 5 rows 2/2/1, 2 rows 1/1/0: rank 2 holds no row of the last weight
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _optimizer(name: str, params, **kw) -> torch.optim.Optimizer:
    params = list(params)
    if name.startswith("muon"):
        strategy = "all_gather" if name == "muon_gather" else "all_to_all"
        ball = 0.6 if name == "muon_ball" else None
        groups = [{"params": [p for p in params if p.ndim == 2], "use_muon": True},
                  {"params": [p for p in params if p.ndim < 2], "use_muon": False}]
        return Muon(groups, lr=0.05, adamw_lr=0.01, max_spectral_norm=ball, shard_strategy=strategy, **kw)
    return {
        "eg_coordinate": lambda: EGStepSize(params, lr=0.05, gamma=5.0, **kw),
        "eg_tensor": lambda: EGStepSize(params, lr=0.05, gamma=5.0, granularity="tensor", **kw),
        "eg_global": lambda: EGStepSize(params, lr=0.05, gamma=5.0, granularity="global", **kw),
        "egdd": lambda: EGDD(params, lr=0.05, momentum=0.9, gain_lr=0.05, scale_lr=0.05, **kw),
        "hypergradient": lambda: HypergradientSGD(params, lr=0.05, hypergrad_lr=0.01, **kw),
        "egd": lambda: EGD(params, lr=0.05, **kw),
    }[name]()


def _prepare(model: nn.Module, name: str) -> nn.Module:
    if name == "egd":  # EGD needs θ ≥ 0
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
    return model


def _train(model: nn.Module, opt, rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, BATCH, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(STEPS, BATCH, 2, generator=g, dtype=torch.float64)
    b = BATCH // world
    for t in range(STEPS):
        opt.zero_grad()
        ((model(X[t, rank * b:(rank + 1) * b]) - Y[t, rank * b:(rank + 1) * b]) ** 2).mean().backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _extras(name: str, opt) -> dict:
    out = {}
    if name.startswith("eg_"):
        out["nu_stats"] = opt.nu_stats()
    if name == "hypergradient":
        out["lr"] = [g["lr"] for g in opt.param_groups]
    return out


class _Fused(nn.Module):
    """Fused weights read through matrix views: 7 QKV rows split (4, 2, 1) — shards 3/2/2 straddle the blocks;
    6 rows in 3 heads — shards 2/2/2 are whole heads; 4 stacked experts — shards of 2/2/0 matrices."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(4, 7, bias=False).double()
        self.heads = nn.Linear(7, 6, bias=False).double()
        self.experts = nn.Parameter(torch.randn(4, 6, 5, dtype=torch.float64) * 0.3)
        self.out = nn.Linear(5, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.heads(torch.tanh(self.qkv(x))))
        return self.out(torch.tanh(torch.einsum("bd,edf->bf", h, self.experts)))


class _Separate(nn.Module):
    """The same function with every block of :class:`_Fused` a parameter of its own (the reference)."""

    def __init__(self, fused: _Fused) -> None:
        super().__init__()
        cut = lambda t, sizes: nn.ParameterList([nn.Parameter(b.detach().clone()) for b in t.split(sizes)])  # noqa: E731
        self.qkv = cut(fused.qkv.weight, (4, 2, 1))
        self.heads = cut(fused.heads.weight, (2, 2, 2))
        self.experts = nn.ParameterList([nn.Parameter(m.detach().clone()) for m in fused.experts.unbind(0)])
        self.out = nn.Linear(5, 2).double()
        self.out.load_state_dict(fused.out.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ torch.cat(list(self.qkv)).T)
        h = torch.tanh(h @ torch.cat(list(self.heads)).T)
        return self.out(torch.tanh(torch.einsum("bd,edf->bf", h, torch.stack(list(self.experts)))))

    def fused(self) -> list[torch.Tensor]:
        """The parameters in :class:`_Fused`'s order (experts, qkv, heads, out.weight, out.bias)."""
        cat = lambda ps: torch.cat([p.detach() for p in ps])  # noqa: E731
        return [torch.stack([p.detach() for p in self.experts]), cat(self.qkv), cat(self.heads),
                self.out.weight.detach(), self.out.bias.detach()]


VIEW_NAMES = ("muon_views_a2a", "muon_views_gather", "normuon_views")


def _view_optimizer(name: str, model: nn.Module, **kw) -> torch.optim.Optimizer:
    cls = NorMuon if name.startswith("normuon") else Muon
    kw = {**kw, "shard_strategy": "all_gather" if name.endswith("gather") else "all_to_all"}
    if cls is Muon:
        kw.update(weight_decay=0.01, max_spectral_norm=0.9)
    else:
        kw.update(weight_decay=0.01, nesterov=True)
    if isinstance(model, _Separate):  # every block its own plain matrix
        return cls([{"params": [*model.qkv, *model.heads, *model.experts, model.out.weight], "use_muon": True},
                    {"params": [model.out.bias], "use_muon": False}], lr=0.05, adamw_lr=0.01, **kw)
    return cls([{"params": [model.qkv.weight], "use_muon": True, "split": (4, 2, 1)},
                {"params": [model.heads.weight], "use_muon": True, "heads": 3},
                {"params": [model.experts], "use_muon": True, "batched": True},
                {"params": [model.out.weight], "use_muon": True},
                {"params": [model.out.bias], "use_muon": False}], lr=0.05, adamw_lr=0.01, **kw)


_TAU = 1.0


def _queue_run(rank: int, world: int, ddp: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DCLW with a negative queue on a linear encoder, 3 steps; rank r takes pairs [2r, 2r + 2) of 6."""
    torch.manual_seed(3)
    enc = nn.Linear(5, 4).double()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        enc = DistributedDataParallel(enc)
    loss_fn = FlatNCELoss(0.2, weighting="vmf", negatives=NegativeQueue(8, 4, dtype=torch.float64),
                          gather_distributed=ddp)
    g = torch.Generator().manual_seed(4)
    grads = []
    n = BATCH // world
    for _ in range(3):
        x1, x2 = torch.randn(2, BATCH, 5, generator=g, dtype=torch.float64)
        enc.zero_grad()
        loss_fn(enc(x1[rank * n:(rank + 1) * n]), enc(x2[rank * n:(rank + 1) * n])).backward()
        grads.extend(p.grad.detach().clone() for p in enc.parameters())
    return grads, loss_fn.negatives.negatives()


def _clip_attention() -> ClipAttention:
    torch.manual_seed(2)
    att = ClipAttention(8, 2, bias=True, dtype=torch.float64)
    with torch.no_grad():
        att.q_proj.weight.mul_(torch.tensor([3.0, 0.1]).repeat_interleave(4)[:, None])  # head 0 far above τ
    return att


def _clip_input() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _fsdp_fused() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _Fused()
    for layer in (model.qkv, model.heads, model.out):
        fully_shard(layer)
    return fully_shard(model)


def _worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    out: dict = {}
    for name in NAMES:
        model = _fsdp(_prepare(_model(), name))
        opt = _optimizer(name, model.parameters())
        _train(model, opt, rank, world)
        out[f"fsdp-{name}"] = ([_full(p) for p in model.parameters()], _extras(name, opt))
    model = DistributedDataParallel(_model())
    opt = _optimizer("muon_ball", model.module.parameters(), ddp_strategy="partition")
    _train(model, opt, rank, world)
    out["ddp-muon_ball"] = ([_full(p) for p in model.module.parameters()], {})
    # QK-Clip on row-sharded projections: 8 rows over 3 ranks (3/3/2), head 0's rows straddle ranks 0 and 1
    att = _clip_attention()
    for layer in (att.q_proj, att.k_proj):
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer)
    fully_shard(att)
    att(_clip_input())
    out["qk_clip_gamma"] = att.qk_clip_(_TAU)
    out["qk_clip"] = [_full(p) for p in (att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias)]
    out["queue"] = _queue_run(rank, world, ddp=True)
    for name in VIEW_NAMES:
        model = _fsdp_fused()
        opt = _view_optimizer(name, model)
        _train(model, opt, rank, world)
        out[f"fsdp-{name}"] = [_full(p) for p in model.parameters()]
        if name == "normuon_views":  # the per-row second moments are sharded like the rows
            out["normuon-moments"] = {tuple(_full(p).shape): tuple(opt.state[p]["row_second_moment"].shape)
                                      for p in model.parameters() if p.ndim >= 2}
        model = DistributedDataParallel(_Fused())
        opt = _view_optimizer(name, model.module, ddp_strategy="partition")
        _train(model, opt, rank, world)
        out[f"ddp-{name}"] = [_full(p) for p in model.module.parameters()]
    # NaN only in rank 2's rows of one gradient: every rank must refuse (raise) or skip together
    for name in ("eg_coordinate", "eg_tensor", "egdd", "muon_a2a"):
        for policy in ("raise", "skip"):
            model = _fsdp(_model())
            opt = _optimizer(name, model.parameters(), nonfinite=policy)
            before = [_full(p) for p in model.parameters()]
            opt.zero_grad()
            model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
            w = model[0].weight.grad
            if rank == 2:
                w.to_local()[0, 0] = float("nan")
            try:
                if policy == "skip":
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt.step()
                else:
                    opt.step()
                outcome = "stepped"
            except NonFiniteGradientError:
                outcome = "raised"
            after = [_full(p) for p in model.parameters()]
            out[f"nan-{name}-{policy}"] = (outcome, torch.equal(before[0], after[0]),
                                           any(not torch.equal(a, b) for a, b in zip(before[1:], after[1:])))
    return out


def _reference(name: str, ddp_partition: bool = False) -> tuple[list[torch.Tensor], dict]:
    model = _prepare(_model(), name)
    opt = _optimizer(name, model.parameters())
    _train(model, opt, 0, 1)
    return [p.detach().clone() for p in model.parameters()], _extras(name, opt)


def test_world_three_equals_one_process_and_decides_once():
    res = launch(_worker, WORLD, timeout=TIMEOUT)
    for key in [f"fsdp-{n}" for n in NAMES] + ["ddp-muon_ball"]:
        name = key.split("-", 1)[1]
        want, want_extra = _reference(name)
        for r in range(WORLD):
            got, extra = res[r][key]
            for i, (a, b) in enumerate(zip(got, want)):
                err = float((a - b).abs().max())
                assert err < 1e-5, f"{key} rank {r} parameter {i}: {err:.3g} from the one-process run"
            if "lr" in want_extra:
                assert extra["lr"] == pytest.approx(want_extra["lr"], rel=1e-9), f"{key} rank {r}"
            if "nu_stats" in want_extra:
                for a, b in zip(extra["nu_stats"], want_extra["nu_stats"]):
                    for k in ("min", "max", "mean", "geo_mean"):
                        assert math.isclose(a[k], b[k], rel_tol=1e-9), (key, r, k, a, b)
    for name in VIEW_NAMES:
        sep = _Separate(_Fused())
        _train(sep, _view_optimizer(name, sep), 0, 1)
        want = sep.fused()
        for kind in ("fsdp", "ddp"):
            for r in range(WORLD):
                got = res[r][f"{kind}-{name}"]
                for i, (a, b) in enumerate(zip(got, want)):
                    err = float((a - b).abs().max())
                    assert err < 1e-5, f"{kind}-{name} rank {r} parameter {i}: {err:.3g} from the per-block run"
        moved = max(float((a - b).abs().max()) for a, b in zip(want, [p.detach() for p in _Fused().parameters()]))
        assert moved > 1e-2
    grads, queue = _queue_run(0, 1, ddp=False)
    for r in range(WORLD):  # the gathered batch is weighted and queued as one process does
        got_grads, got_queue = res[r]["queue"]
        for a, b in zip(got_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_queue, queue, rtol=0, atol=1e-15)
    assert queue.shape == (8, 4)
    att = _clip_attention()
    att(_clip_input())
    gamma = att.qk_clip_(_TAU)
    assert float(gamma[0]) < 0.5 and float(gamma[1]) == 1.0
    want = [p.detach() for p in (att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias)]
    for r in range(WORLD):
        assert torch.equal(res[r]["qk_clip_gamma"], gamma)
        for a, b in zip(res[r]["qk_clip"], want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert res[0]["normuon-moments"] == {(4, 6, 5): (4, 6), (7, 4): (7,), (6, 7): (6,), (2, 5): (2,)}
    for name in ("eg_coordinate", "eg_tensor", "egdd", "muon_a2a"):
        outcomes = [res[r][f"nan-{name}-raise"] for r in range(WORLD)]
        assert all(o == ("raised", True, False) for o in outcomes), (name, outcomes)
        outcomes = [res[r][f"nan-{name}-skip"] for r in range(WORLD)]
        assert all(o[0] == "stepped" and o[1] and o[2] for o in outcomes), (name, outcomes)
