"""steepest on torch.distributed: 2 gloo processes on loopback against the one-process run.

The reference for every check is the same computation in this (single) process on
the concatenated global batch; the 2-process runs must match it to 1e-5 (float64,
so rounding leaves ~1e-14). Each test launches its processes once (spawn costs
seconds) with a hard timeout, and checks several things from that launch.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steepest import losses
from steepest.distributed import _row_counts, assign_owners as _owners, finite_mask_sharded, map_replicated
from steepest.optim._matrices import orthogonalize_sharded
from steepest.testing import CommCounter, free_port, launch
from steepest.optim import EGDD, EGStepSize, Muon, muon_param_groups, orthogonalize

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 4
TIMEOUT = 150.0


# --------------------------------------------------------------------------- shared pieces
def _mlp() -> nn.Module:
    # odd widths: FSDP2 shards rows unevenly (4 + 3 rows of a 7-row matrix)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(),
                         nn.Linear(9, 3)).double()


def _batches(steps: int = STEPS, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(steps, batch, 6, generator=g, dtype=torch.float64),
            torch.randn(steps, batch, 3, generator=g, dtype=torch.float64))


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Conv2d(5, 3, 2), nn.Flatten(), nn.Linear(27, 3)).double()


def _optimizer(name: str, model: nn.Module, strategy: str = "spread") -> torch.optim.Optimizer:
    kw = {} if strategy is None else {"shard_strategy": strategy}
    if name == "muon":
        return Muon(muon_param_groups(model), lr=0.05, weight_decay=0.01, adamw_lr=0.01, **kw)
    if name == "muon_conv_ball":  # conv weights as (out, in·kh·kw) matrices, and the spectral-ball projection
        return Muon(muon_param_groups(model), lr=0.05, max_spectral_norm=0.5, **kw)
    if name == "eg_coordinate":
        return EGStepSize(model.parameters(), lr=0.05, gamma=5.0)
    if name == "eg_tensor":
        return EGStepSize(model.parameters(), lr=0.05, gamma=5.0, granularity="tensor")
    if name == "eg_global":
        return EGStepSize(model.parameters(), lr=0.05, gamma=5.0, granularity="global")
    if name == "egdd":
        return EGDD(model.parameters(), lr=0.05, momentum=0.9, gain_lr=0.05, scale_lr=0.05)
    raise ValueError(name)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, steps: int = STEPS,
           start: int = 0) -> None:
    X, Y = _batches(start + steps)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # images (2, 6, 6) for the conv net
        X = X.repeat(1, 1, 12).view(X.shape[0], X.shape[1], 2, 6, 6)
    b = X.shape[1] // world
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = ((model(X[t, rank * b:(rank + 1) * b]) - Y[t, rank * b:(rank + 1) * b]) ** 2).mean()
        loss.backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _reference(name: str) -> list[torch.Tensor]:
    model = _conv() if "conv" in name else _mlp()
    _train(model, _optimizer(name, model, strategy=None), 0, 1)
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).abs().max())
        assert err < 1e-5, f"{what}: parameter {i} differs from the one-process run by {err:.3g}"


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer)
    return fully_shard(model)


def _pair_grads(rank: int, world: int, loss_fn, ddp: bool) -> list[torch.Tensor]:
    """Parameter gradients of a pair loss on a linear encoder; rank r takes rows [r·n, (r+1)·n)."""
    torch.manual_seed(3)
    enc = nn.Linear(5, 4).double()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        enc = DistributedDataParallel(enc)
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    n = x1.shape[0] // world
    loss = loss_fn(enc(x1[rank * n:(rank + 1) * n]), enc(x2[rank * n:(rank + 1) * n]), 0.2,
                   gather_distributed=True)
    loss.backward()
    return [p.grad.detach().clone() for p in enc.parameters()]


# --------------------------------------------------------------------------- workers (run in spawned ranks)
def _ddp_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name in ("muon", "eg_coordinate", "eg_global", "egdd"):
        model = DistributedDataParallel(_mlp())
        opt = _optimizer(name, model.module, strategy=None)
        with CommCounter() as cc:
            _train(model, opt, rank, world)
        out[name] = [_full(p) for p in model.module.parameters()]
        out[name + "_comm"] = (dict(cc.counts), dict(cc.bytes_by_op))
    # Muon with the NS work dealt out over the ranks
    model = DistributedDataParallel(_mlp())
    opt = Muon(muon_param_groups(model.module), lr=0.05, weight_decay=0.01, adamw_lr=0.01, ddp_strategy="spread")
    with CommCounter() as cc:
        _train(model, opt, rank, world)
    out["muon_spread"] = [_full(p) for p in model.module.parameters()]
    out["muon_spread_comm"] = dict(cc.counts)
    # the same with the spectral-ball projection (dealt out too) on conv weights
    model = DistributedDataParallel(_conv())
    opt = Muon(muon_param_groups(model.module), lr=0.05, max_spectral_norm=0.5, ddp_strategy="spread")
    with CommCounter() as cc:
        _train(model, opt, rank, world)
    out["ball_spread"] = [_full(p) for p in model.module.parameters()]
    out["ball_spread_comm"] = dict(cc.counts)
    # map_replicated on mixed shapes and dtypes: each rank runs fn on its own share only
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(*shape, generator=g, dtype=dt) for shape, dt in
            (((7, 5), torch.float64), ((5, 7), torch.float64), ((3, 3), torch.float32), ((9, 4), torch.float64),
             ((2, 6), torch.float32))]
    seen = []

    def fn(ms):
        seen.extend(m.shape for m in ms)
        return orthogonalize(ms)

    out["mapped"] = map_replicated(mats, fn)
    out["mapped_inputs"] = mats
    out["mapped_seen"] = seen
    out["info_nce"] = _pair_grads(rank, world, losses.info_nce_pairs, ddp=True)
    out["flat_nce"] = _pair_grads(rank, world, losses.flat_nce_pairs, ddp=True)
    return out


def _fsdp_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for name, strategy in (("muon", "spread"), ("muon", "gather"), ("muon_conv_ball", "spread"),
                           ("eg_coordinate", None), ("eg_tensor", None), ("eg_global", None), ("egdd", None)):
        model = _fsdp(_conv() if "conv" in name else _mlp())
        opt = _optimizer(name, model, strategy=strategy or "spread")
        _train(model, opt, rank, world)
        out[f"{name}-{strategy}"] = [_full(p) for p in model.parameters()]
        out[f"{name}-{strategy}-sharded"] = all(hasattr(p, "device_mesh") for p in model.parameters())
    # orthogonalize_sharded on its own: odd shapes, a 1-row matrix (rank 1 holds 0 rows), mixed batches
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((7, 5), (7, 5), (3, 9), (1, 4), (6, 6))]
    dts = [distribute_tensor(m, mesh, [Shard(0)]) for m in mats]
    for strategy in ("spread", "gather"):
        with CommCounter() as cc:
            res = orthogonalize_sharded(dts, strategy=strategy)
        out[f"ortho-{strategy}"] = [_full(r) for r in res]
        out[f"ortho-{strategy}-placements"] = [tuple(r.placements) == (Shard(0),) for r in res]
        out[f"ortho-{strategy}-counts"] = dict(cc.counts)
        out[f"svd-{strategy}"] = [_full(r) for r in orthogonalize_sharded(dts, strategy=strategy, schedule="svd")]
    # a non-finite gradient on one rank's shard is seen by every rank
    bad = torch.zeros(7, 5, dtype=torch.float64)
    bad[6, 0] = float("nan")  # row 6 lives on rank 1
    out["finite"] = finite_mask_sharded([dts[0], distribute_tensor(bad, mesh, [Shard(0)])])
    return out


def _checkpoint_worker(rank: int, world: int, path: str) -> list[torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp(_mlp())
    opt = _optimizer("muon", model)
    _train(model, opt, rank, world, steps=3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    _train(model, opt, rank, world, steps=3, start=3)
    return [_full(p) for p in model.parameters()]


# --------------------------------------------------------------------------- tests
def test_ddp_optimizers_and_pair_losses_follow_one_process():
    res = launch(_ddp_worker, WORLD, timeout=TIMEOUT)
    for name in ("muon", "eg_coordinate", "eg_global", "egdd"):
        want = _reference(name)
        for r in range(WORLD):
            _assert_close(res[r][name], want, f"DDP {name} rank {r}")
        # DDP's gradient traffic: one (bucketed) ring all-reduce of all gradients per step, 2(W−1)/W·bytes
        grad_bytes = sum(p.numel() * 8 for p in _mlp().parameters())
        counts, sent = res[0][name + "_comm"]
        assert counts["allreduce_"] == STEPS, counts
        assert sent["allreduce_"] == pytest.approx(STEPS * 2 * (WORLD - 1) / WORLD * grad_bytes)
    # ddp_strategy="spread": same trajectory, bit-identical ranks, one all-gather per step on top of DDP's all-reduce
    want = _reference("muon")
    for r in range(WORLD):
        _assert_close(res[r]["muon_spread"], want, f"DDP Muon spread rank {r}")
        assert all(torch.equal(a, b) for a, b in zip(res[r]["muon_spread"], res[0]["muon_spread"]))
        assert res[r]["muon_spread_comm"]["allgather_"] == STEPS, res[r]["muon_spread_comm"]
        assert res[r]["muon_spread_comm"]["allreduce_"] == STEPS
    want = _reference("muon_conv_ball")
    for r in range(WORLD):
        _assert_close(res[r]["ball_spread"], want, f"DDP Muon spread + spectral ball rank {r}")
        assert all(torch.equal(a, b) for a, b in zip(res[r]["ball_spread"], res[0]["ball_spread"]))
        assert res[r]["ball_spread_comm"]["allgather_"] == 2 * STEPS  # NS and projection
    seen = [res[r]["mapped_seen"] for r in range(WORLD)]
    assert all(seen) and sum(len(s_) for s_ in seen) == len(res[0]["mapped_inputs"])  # each matrix once
    want = orthogonalize(res[0]["mapped_inputs"])
    for r in range(WORLD):
        for a, b in zip(res[r]["mapped"], want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-6 if a.dtype == torch.float32 else 1e-12)
    for key, fn in (("info_nce", losses.info_nce_pairs), ("flat_nce", losses.flat_nce_pairs)):
        want = _pair_grads(0, 1, fn, ddp=False)  # one process, the concatenated batch of 6 pairs
        for r in range(WORLD):
            _assert_close(res[r][key], want, f"{key} gradient on rank {r}")


def test_fsdp2_muon_eg_and_sharded_orthogonalization_follow_one_process():
    res = launch(_fsdp_worker, WORLD, timeout=TIMEOUT)
    for key, name in (("muon-spread", "muon"), ("muon-gather", "muon"), ("muon_conv_ball-spread", "muon_conv_ball"),
                      ("eg_coordinate-None", "eg_coordinate"),
                      ("eg_tensor-None", "eg_tensor"), ("eg_global-None", "eg_global"), ("egdd-None", "egdd")):
        want = _reference(name)
        for r in range(WORLD):
            assert res[r][key + "-sharded"], "fully_shard should have turned every parameter into a DTensor"
            _assert_close(res[r][key], want, f"FSDP2 {key} rank {r}")
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((7, 5), (7, 5), (3, 9), (1, 4), (6, 6))]
    for j, m in enumerate(mats):
        U, _, Vh = torch.linalg.svd(m, full_matrices=False)
        (ns_ref,) = orthogonalize([m])  # one process, Polar Express
        for r in range(WORLD):
            for strategy in ("spread", "gather"):
                # exact polar factor U Vᵀ of the whole matrix, and the one-process Newton–Schulz result
                assert float((res[r][f"svd-{strategy}"][j] - U @ Vh).abs().max()) < 1e-10
                assert float((res[r][f"ortho-{strategy}"][j] - ns_ref).abs().max()) < 1e-10
    for r in range(WORLD):
        assert all(res[r]["ortho-spread-placements"]) and all(res[r]["ortho-gather-placements"])
        assert res[r]["ortho-spread-counts"] == {"alltoall_base_": 2}  # two all-to-alls for all five matrices
        assert res[r]["finite"] == [True, False]


def test_checkpoint_saved_on_two_ranks_resumes_on_one(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = str(tmp_path / "ckpt")
    res = launch(_checkpoint_worker, WORLD, path, timeout=TIMEOUT)
    model = _mlp()
    with torch.no_grad():  # different values, so that the load has to overwrite them
        for p in model.parameters():
            p.mul_(0.5)
    opt = _optimizer("muon", model, strategy=None)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert all("momentum_buffer" in opt.state[p] for p in opt.param_groups[0]["params"])
    assert all(opt.state[p]["step"] == 3 for p in opt.param_groups[1]["params"])
    loaded = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 0, 1, steps=3, start=3)
    want = [p.detach() for p in model.parameters()]
    for r in range(WORLD):
        _assert_close(res[r], want, f"resumed after a 2-rank checkpoint (rank {r})")
    # and the run is not trivially equal: resuming without the optimizer state gives another trajectory
    fresh = _mlp()
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), loaded):
            p.copy_(q)
    _train(fresh, _optimizer("muon", fresh, strategy=None), 0, 1, steps=3, start=3)
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(fresh.parameters(), want)) > 1e-4


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 40), world=st.integers(1, 8))
def test_row_split_is_torch_chunk(m, world):
    rows = _row_counts(m, world)
    want = [len(c) for c in torch.arange(m).chunk(world)] if m else []
    assert rows == want + [0] * (world - len(want))


@settings(max_examples=40, deadline=None)
@given(costs=st.lists(st.floats(0.0, 100.0), max_size=12), world=st.integers(1, 5))
def test_owner_assignment_is_balanced(costs, world):
    owner = _owners(costs, world)
    assert len(owner) == len(costs) and all(0 <= q < world for q in owner)
    load = [sum(c for c, q in zip(costs, owner) if q == r) for r in range(world)]
    # greedy LPT: no rank carries more than the lightest one plus the largest single job
    assert max(load) <= min(load) + max(costs, default=0.0) + 1e-9


def test_ring_byte_model():
    c = CommCounter(world_size=4)
    c.add("allreduce_", 1000)
    c.add("_reduce_scatter_base_", 1000, 250)
    c.add("_allgather_base_", 250, 1000)
    c.add("alltoall_base_", 1000, 1000)
    assert c.bytes_sent == pytest.approx(1500 + 750 + 750 + 750)
    assert dict(c.counts) == {"allreduce_": 1, "_reduce_scatter_base_": 1, "_allgather_base_": 1, "alltoall_base_": 1}
    assert CommCounter(world_size=1).bytes_sent == 0.0


def test_launch_arguments_and_free_port():
    with pytest.raises(ValueError, match="world_size"):
        launch(_ddp_worker, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch(_ddp_worker, 1, timeout=-1)
    assert 0 < free_port() < 65536
    with pytest.raises(ValueError, match="strategy"):
        orthogonalize_sharded([torch.eye(2)], strategy="scatter")
    with pytest.raises(ValueError, match="shard_strategy"):
        Muon([nn.Parameter(torch.eye(2))], shard_strategy="scatter")
    with pytest.raises(ValueError, match="ddp_strategy"):
        Muon([nn.Parameter(torch.eye(2))], ddp_strategy="gather")


def _sleeper(rank: int, world: int) -> None:
    time.sleep(600)


def test_launch_kills_a_stuck_run_at_the_timeout():
    with pytest.raises(TimeoutError, match="did not finish"):
        launch(_sleeper, 1, timeout=10.0)
