"""steepest.penalties against torch.func references and independently computed bounds (float64)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from steepest.penalties import (
    OccamBound,
    check_per_example,
    input_grad_norm2,
    occam_bound,
    param_grad_norm2,
    param_penalty_grads_fd,
)

DT = torch.float64
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


def make_mlp(widths, act="tanh", scale=1.0, seed=0, bias=True, final_act=False):
    torch.manual_seed(seed)
    layers = []
    for t, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, bias=bias if isinstance(bias, bool) else bias[t])
        layers.append(lin)
        if t < len(widths) - 2 or final_act:
            layers.append(ACTS[act]())
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


# ------------------------------------------------------------- references (torch.func)
def ref_param_grads(model, x, f1):
    """Per-example ∇_θ f by vmap(grad) over functional_call."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fi(p, xi):
        return f1(functional_call(model, p, (xi.unsqueeze(0),))[0])

    return vmap(grad(fi), in_dims=(None, 0))(params, x)


def ref_input_grads(model, x, f1):
    return vmap(grad(lambda xi: f1(model(xi.unsqueeze(0))[0])))(x)


def ref_bound(model, x, f1, norm="spectral"):
    """lhs, rhs and per-layer pieces from torch.func Jacobians and numpy norms."""
    mods = list(model)
    gx2 = ref_input_grads(model, x, f1).detach().pow(2).sum(1).numpy()
    pg = ref_param_grads(model, x, f1)
    lin_idx = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    lhs = np.zeros(x.shape[0])
    rhs = sum(v.detach().reshape(x.shape[0], -1).pow(2).sum(1).numpy() for v in pg.values())
    pieces = []
    for i in lin_idx:
        prefix = nn.Sequential(*mods[:i])
        h = prefix(x).detach().numpy()
        if i == 0:
            J = np.broadcast_to(np.eye(x.shape[1]), (x.shape[0], x.shape[1], x.shape[1]))
        else:
            J = vmap(jacrev(lambda xi: prefix(xi)))(x).detach().numpy()
        W = mods[i].weight.detach().numpy()
        ordn = 2 if norm == "spectral" else "fro"
        w2 = np.linalg.norm(W, ord=ordn) ** 2
        j2 = np.array([np.linalg.norm(Jb, ord=ordn) ** 2 for Jb in J])
        h2 = (h**2).sum(1)
        num = h2 + (1.0 if mods[i].bias is not None else 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(gx2 > 0, gx2 * num / (w2 * j2), 0.0)
        lhs += term
        pieces.append(dict(h2=h2, w2=w2, j2=j2, term=term))
    return lhs, rhs, gx2, pieces


mlp_cases = st.fixed_dictionaries(
    {
        "widths": st.lists(st.integers(1, 6), min_size=2, max_size=5),
        "act": st.sampled_from(sorted(ACTS)),
        "scale": st.sampled_from([0.3, 1.0, 3.0]),
        "seed": st.integers(0, 10_000),
        "batch": st.integers(1, 4),
        "final_act": st.booleans(),
        "bias": st.booleans(),
    }
)


@settings(max_examples=25, deadline=None)
@given(mlp_cases, st.sampled_from(["spectral", "frobenius"]))
def test_occam_bound_matches_torch_func_reference(case, norm):
    model = make_mlp(case["widths"], case["act"], case["scale"], case["seed"], case["bias"], case["final_act"])
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["widths"][0], dtype=DT, generator=g) * 2
    b = occam_bound(model, x, norm=norm)
    lhs, rhs, gx2, pieces = ref_bound(model, x, lambda o: o.sum(), norm)
    np.testing.assert_allclose(b.input_grad_norm2.numpy(), gx2, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(b.rhs.numpy(), rhs, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(b.lhs.numpy(), lhs, rtol=1e-8, atol=1e-14)
    assert len(b.layers) == len(pieces)
    for lt, pc in zip(b.layers, pieces):
        np.testing.assert_allclose(lt.h_norm2.numpy(), pc["h2"], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(float(lt.weight_norm2), pc["w2"], rtol=1e-10)
        np.testing.assert_allclose(lt.jac_norm2.numpy(), pc["j2"], rtol=1e-8, atol=1e-14)
        # the per-layer inequalities of the seed (W part and b part separately)
        assert bool((lt.lhs <= lt.rhs * (1 + 1e-9) + 1e-300).all())
    # the inequality itself
    assert b.violations(rtol=1e-9) == 0
    assert bool((b.lhs <= b.rhs * (1 + 1e-9) + 1e-300).all())


def test_per_layer_split_against_per_parameter_gradients():
    model = make_mlp([4, 5, 3, 2], "softplus", seed=3)
    x = torch.randn(6, 4, dtype=DT)
    b = occam_bound(model, x)
    pg = ref_param_grads(model, x, lambda o: o.sum())
    for lt in b.layers:
        gw = pg[f"{lt.index}.weight"].reshape(6, -1).pow(2).sum(1)
        gb = pg[f"{lt.index}.bias"].pow(2).sum(1)
        torch.testing.assert_close(lt.grad_weight_norm2, gw, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(lt.grad_bias_norm2, gb, rtol=1e-10, atol=1e-15)
        # bias inequality: ‖∇_x f‖² / (‖W‖²‖∇_x h‖²) ≤ ‖∇_b f‖²
        assert bool((b.input_grad_norm2 / (lt.weight_norm2 * lt.jac_norm2) <= gb * (1 + 1e-9)).all())


def test_spectral_bound_is_tighter_than_frobenius():
    model = make_mlp([5, 8, 8, 3], "gelu", seed=1)
    x = torch.randn(8, 5, dtype=DT)
    s, fr = occam_bound(model, x), occam_bound(model, x, norm="frobenius")
    assert bool((fr.lhs <= s.lhs * (1 + 1e-12)).all()) and bool((s.lhs <= s.rhs).all())
    assert bool((fr.lhs < s.lhs).any())


def test_occam_bound_with_a_per_example_loss():
    model = make_mlp([6, 7, 4], "relu", seed=2)
    x = torch.randn(5, 6, dtype=DT)
    y = torch.tensor([0, 1, 2, 3, 0])
    b = occam_bound(model, x, lambda out: F.cross_entropy(out, y, reduction="none"))
    for i in range(5):
        lhs, rhs, _, _ = ref_bound(model, x[i : i + 1], lambda o, yi=y[i]: F.cross_entropy(o.unsqueeze(0), yi.unsqueeze(0)))
        np.testing.assert_allclose(b.lhs[i].item(), lhs[0], rtol=1e-8)
        np.testing.assert_allclose(b.rhs[i].item(), rhs[0], rtol=1e-9)
    assert b.violations() == 0 and bool(((b.tightness > 0) & (b.tightness <= 1)).all())


def test_inequality_fails_for_a_batch_mean_loss():
    # SPEC §4: per-example parameter gradients can cancel in a batch mean, input gradients do not
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).to(DT)
    x = torch.randn(1, 3, dtype=DT)
    x = torch.cat([x, -x])
    b = occam_bound(model, x)
    mean_rhs = param_grad_norm2(model(x).mean(), model.parameters())
    assert float(mean_rhs) < 1e-20 < float(b.lhs.mean())
    assert b.violations() == 0


def test_dead_relu_network_gives_zeros_not_nan():
    model = make_mlp([3, 4, 2], "relu", seed=0)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    b = occam_bound(model, torch.randn(4, 3, dtype=DT))
    assert torch.isfinite(b.lhs).all() and torch.isfinite(b.rhs).all()
    assert bool((b.lhs == 0).all())
    assert bool((b.layers[1].coef == math.inf).all())


def test_nested_sequential_eval_dropout_and_single_linear():
    model = make_mlp([4, 5, 3], "tanh", seed=5)
    x = torch.randn(3, 4, dtype=DT)
    ref = occam_bound(model, x)
    wrapped = nn.Sequential(nn.Sequential(model[0], nn.Dropout(0.5)), model[1], nn.Identity(), model[2]).eval()
    torch.testing.assert_close(occam_bound(wrapped, x).lhs, ref.lhs, rtol=1e-12, atol=0)
    lin = nn.Linear(4, 2).to(DT)
    one = occam_bound(lin, x)
    lhs, rhs, _, _ = ref_bound(nn.Sequential(lin), x, lambda o: o.sum())
    np.testing.assert_allclose(one.lhs.numpy(), lhs, rtol=1e-9)
    np.testing.assert_allclose(one.rhs.numpy(), rhs, rtol=1e-9)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (nn.BatchNorm1d(5), TypeError, "BatchNorm"),
        (nn.LayerNorm(5), TypeError, "outside the class"),
        (nn.Softmax(dim=-1), TypeError, "outside the class"),
        (nn.PReLU(), TypeError, "outside the class"),
        (nn.Dropout(0.1), ValueError, "train mode"),
    ],
)
def test_modules_outside_the_class_are_refused(bad, exc, match):
    model = nn.Sequential(nn.Linear(4, 5), bad, nn.Linear(5, 2)).to(DT).train()
    with pytest.raises(exc, match=match):
        occam_bound(model, torch.randn(3, 4, dtype=DT))


def test_occam_bound_rejects_bad_input():
    model = make_mlp([4, 3], seed=0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        occam_bound(nn.MultiheadAttention(4, 1), torch.randn(2, 4, dtype=DT))
    with pytest.raises(ValueError, match="NaN"):
        occam_bound(model, torch.tensor([[1.0, float("nan"), 0, 0]], dtype=DT))
    with pytest.raises(ValueError, match="batch, features"):
        occam_bound(model, torch.randn(2, 3, 4, dtype=DT))
    with pytest.raises(TypeError, match="dtype"):
        occam_bound(model, torch.randn(2, 4))
    with pytest.raises(ValueError, match="expects 4 features"):
        occam_bound(model, torch.randn(2, 5, dtype=DT))
    with pytest.raises(ValueError, match="per-example scalars"):
        occam_bound(model, torch.randn(2, 4, dtype=DT), f=lambda out: out)
    with pytest.raises(ValueError, match="norm"):
        occam_bound(model, torch.randn(2, 4, dtype=DT), norm="nuclear")


# ------------------------------------------------------------------ input penalty
def _fd_setup(seed=0):
    model = make_mlp([5, 6, 6, 3], "softplus", seed=seed)
    x = torch.randn(7, 5, dtype=DT)
    y = torch.randint(0, 3, (7,))
    f = lambda xx: F.cross_entropy(model(xx), y, reduction="none")  # noqa: E731
    f1 = lambda xi, yi: F.cross_entropy(model(xi.unsqueeze(0)), yi.unsqueeze(0))  # noqa: E731
    return model, x, y, f, f1


def test_input_grad_norm2_exact_matches_vmap_grad():
    model, x, y, f, f1 = _fd_setup()
    ref = vmap(grad(f1))(x, y).pow(2).sum(1)
    torch.testing.assert_close(input_grad_norm2(f, x), ref, rtol=1e-12, atol=1e-15)
    # any trailing shape: (B, 1, 5) inputs
    x3 = x.unsqueeze(1)
    got = input_grad_norm2(lambda xx: f(xx.squeeze(1)), x3)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_input_penalty_gradient_matches_torch_func(method):
    model, x, y, f, f1 = _fd_setup(1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def penalty(p):
        def li(xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(li))(x, y).pow(2).sum()

    ref = grad(penalty)(params)
    eps = 1e-6
    pen = input_grad_norm2(f, x, method=method, eps=eps).sum()
    got = torch.autograd.grad(pen, list(model.parameters()))
    tol = 1e-10 if method == "exact" else 1e-4  # O(ε) for the finite difference
    for (k, r), gv in zip(ref.items(), got):
        torch.testing.assert_close(gv, r, rtol=tol, atol=tol * float(r.abs().max()), msg=k)


@pytest.mark.parametrize("normalize", [False, True])
def test_finite_difference_error_is_half_eps_gHg(normalize):
    model, x, y, f, f1 = _fd_setup(2)
    g = vmap(grad(f1))(x, y)
    H = vmap(hessian(f1))(x, y)
    gHg = torch.einsum("bi,bij,bj->b", g, H, g)
    exact = g.pow(2).sum(1)
    for eps in (1e-3, 1e-4):
        d = input_grad_norm2(f, x, method="finite_difference", eps=eps, normalize=normalize).detach()
        eps_i = eps / g.norm(dim=1) if normalize else torch.full_like(exact, eps)
        lead = eps_i / 2 * gHg  # documented leading error term
        torch.testing.assert_close(d - exact, lead, rtol=0.05, atol=1e-11)
    # and the error really is O(ε): ten times smaller step, about ten times smaller error
    e3 = (input_grad_norm2(f, x, method="finite_difference", eps=1e-3, normalize=normalize) - exact).abs()
    e4 = (input_grad_norm2(f, x, method="finite_difference", eps=1e-4, normalize=normalize) - exact).abs()
    ratio = (e3 / e4).detach()
    assert bool(((ratio > 8) & (ratio < 12)).all()), ratio


def test_finite_difference_replays_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).to(DT).train()
    x = torch.randn(6, 5, dtype=DT)
    f = lambda xx: model(xx).squeeze(1)  # noqa: E731
    torch.manual_seed(123)
    exact = input_grad_norm2(f, x, create_graph=False)
    after_exact = torch.rand(1)
    torch.manual_seed(123)
    fd = input_grad_norm2(f, x, method="finite_difference", eps=1e-6, create_graph=False)
    after_fd = torch.rand(1)
    torch.testing.assert_close(fd, exact, rtol=1e-4, atol=1e-9)
    assert torch.equal(after_exact, after_fd)  # the RNG moved as for one forward pass


def test_input_penalty_refuses_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    x = torch.randn(5, 4, dtype=DT)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        input_grad_norm2(lambda xx: model(xx)[:, 0], x, model=model)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        check_per_example(model)
    model.eval()
    out = input_grad_norm2(lambda xx: model(xx)[:, 0], x, model=model)
    ref = vmap(grad(lambda xi: model(xi.unsqueeze(0))[0, 0]))(x).pow(2).sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)


def test_input_grad_norm2_rejects_bad_input():
    f = lambda xx: xx.sum(1)  # noqa: E731
    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="method"):
        input_grad_norm2(f, x, method="spsa")
    with pytest.raises(ValueError, match="NaN"):
        input_grad_norm2(f, torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(TypeError, match="floating"):
        input_grad_norm2(f, torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="per-example scalars"):
        input_grad_norm2(lambda xx: xx.sum(), x)
    with pytest.raises(ValueError, match="eps"):
        input_grad_norm2(f, x, method="finite_difference", eps=0.0)
    with pytest.raises(ValueError, match="batch"):
        input_grad_norm2(f, torch.zeros(0, 2, dtype=DT))


def test_input_penalty_return_output_and_upstream_graph():
    model, x, y, f, f1 = _fd_setup(3)
    n2, fx = input_grad_norm2(f, x, return_output=True)
    torch.testing.assert_close(fx, f(x))
    # x that is itself differentiable: the penalty backpropagates into it (d/dx ‖∇_x f‖² = 2 H g)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(input_grad_norm2(f, xr).sum(), xr)
    ref = vmap(grad(lambda xi, yi: grad(f1)(xi, yi).pow(2).sum()))(x, y)
    torch.testing.assert_close(gx, ref, rtol=1e-10, atol=1e-14)


# -------------------------------------------------------------- parameter penalty
def _param_setup(seed=0):
    model = make_mlp([4, 6, 3], "tanh", seed=seed)
    x = torch.randn(9, 4, dtype=DT)
    y = torch.randint(0, 3, (9,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return model, x, y, params, loss_of


def test_param_grad_norm2_and_its_gradient_match_torch_func():
    model, x, y, params, loss_of = _param_setup()
    ref_val = sum(v.pow(2).sum() for v in grad(loss_of)(params).values())
    ref_grad = grad(lambda p: sum(v.pow(2).sum() for v in grad(loss_of)(p).values()))(params)
    val = param_grad_norm2(F.cross_entropy(model(x), y), model.parameters())
    torch.testing.assert_close(val, ref_val, rtol=1e-12, atol=0)
    got = torch.autograd.grad(val, list(model.parameters()))
    for (k, r), gv in zip(ref_grad.items(), got):
        torch.testing.assert_close(gv, r, rtol=1e-10, atol=1e-14, msg=k)


@pytest.mark.parametrize("normalize", [False, True])
def test_param_penalty_fd_converges_linearly_and_restores_params(normalize):
    model, x, y, params, loss_of = _param_setup(1)
    exact = grad(lambda p: sum(v.pow(2).sum() for v in grad(loss_of)(p).values()))(params)
    exact = torch.cat([v.flatten() for v in exact.values()])
    before = [p.detach().clone() for p in model.parameters()]
    errs = []
    for eps in (1e-3, 1e-4):
        out = param_penalty_grads_fd(lambda: F.cross_entropy(model(x), y), model.parameters(), eps=eps, normalize=normalize)
        got = torch.cat([v.flatten() for v in out.penalty_grads])
        errs.append(float((got - exact).norm() / exact.norm()))
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # bit-exact restore
    assert errs[1] < 1e-3
    assert 7 < errs[0] / errs[1] < 13, errs  # O(ε)
    g_ref = torch.cat([v.flatten() for v in grad(loss_of)(params).values()])
    torch.testing.assert_close(torch.cat([g.flatten() for g in out.grads]), g_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.grad_norm2, g_ref.pow(2).sum(), rtol=1e-12, atol=0)


def test_param_penalty_fd_batchnorm_warns_and_updates_running_stats_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(DT).train()
    twin = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(DT).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, dtype=DT)
    with pytest.warns(UserWarning, match="BatchNorm in train mode"):
        param_penalty_grads_fd(lambda: model(x).pow(2).mean(), model.parameters(), model=model)
    twin(x)  # one forward pass
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_penalty_grads_fd(lambda: model(x).pow(2).mean(), model.parameters(), model=model)


def test_param_penalties_reject_bad_input():
    model, x, y, params, loss_of = _param_setup()
    with pytest.raises(ValueError, match="scalar"):
        param_grad_norm2(model(x), model.parameters())
    with pytest.raises(ValueError, match="empty"):
        param_grad_norm2(model(x).sum(), [])
    with pytest.raises(ValueError, match="requires_grad"):
        param_grad_norm2(model(x).sum(), [torch.ones(2)])
    with pytest.raises(ValueError, match="NaN"):
        param_grad_norm2(model(x).sum() * float("nan"), model.parameters())
    with pytest.raises(ValueError, match="eps"):
        param_penalty_grads_fd(lambda: model(x).sum(), model.parameters(), eps=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        param_penalty_grads_fd(lambda: model(x), model.parameters())


def test_occam_bound_result_type():
    b = occam_bound(make_mlp([2, 3, 1]), torch.randn(2, 2, dtype=DT))
    assert isinstance(b, OccamBound) and b.norm == "spectral" and b.lhs.shape == (2,)


@pytest.mark.parametrize("normalize", [False, True])
def test_finite_differences_at_zero_gradient_are_zero_not_nan(normalize):
    x = torch.randn(3, 2, dtype=DT)
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    d = input_grad_norm2(lambda xx: xx @ w, x, method="finite_difference", normalize=normalize)
    assert torch.equal(d.detach(), torch.zeros(3, dtype=DT))
    (gw,) = torch.autograd.grad(d.sum(), w)
    assert torch.isfinite(gw).all()
    out = param_penalty_grads_fd(lambda: (w * 0).sum() + 1.0, [w], normalize=normalize)
    assert float(out.grad_norm2) == 0.0 and torch.equal(out.penalty_grads[0], torch.zeros(2, dtype=DT))


# ------------------------------------------------------------- unused inputs and parameters
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_input_grad_norm2_of_an_f_that_ignores_x_is_zero(method):
    x = torch.randn(4, 3, dtype=DT)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    # constant in x and in everything; then constant in x but a function of a parameter
    for f in (lambda xx: torch.ones(xx.shape[0], dtype=DT), lambda xx: w.pow(2).sum().expand(xx.shape[0])):
        out = input_grad_norm2(f, x, method=method)
        assert torch.equal(out.detach(), torch.zeros(4, dtype=DT))
        assert out.requires_grad  # create_graph=True: usable as a penalty term
        out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, dtype=DT))
    (gw,) = torch.autograd.grad(input_grad_norm2(lambda xx: w.sum().expand(xx.shape[0]), x, method=method).sum(), w)
    assert torch.equal(gw, torch.zeros(3, dtype=DT))
    out = input_grad_norm2(lambda xx: torch.ones(xx.shape[0], dtype=DT), x, method=method, create_graph=False)
    assert torch.equal(out, torch.zeros(4, dtype=DT)) and not out.requires_grad


def test_param_grad_norm2_counts_unused_parameters_as_zero():
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 2).to(DT), nn.Linear(3, 2).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    ps = list(used.parameters()) + list(unused.parameters())
    ref = param_grad_norm2(used(x).pow(2).sum(), list(used.parameters()))
    torch.testing.assert_close(param_grad_norm2(used(x).pow(2).sum(), ps), ref, rtol=0, atol=0)
    # none of the parameters reached (the loss still has a graph), or no graph at all
    other = torch.ones((), dtype=DT, requires_grad=True)
    for loss in ((x.sum() * other).pow(2), x.pow(2).sum()):
        val = param_grad_norm2(loss, list(unused.parameters()))
        assert val.item() == 0.0 and val.requires_grad
        grads = torch.autograd.grad(val, list(unused.parameters()))
        assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads, unused.parameters()))
    assert not param_grad_norm2(x.pow(2).sum(), list(unused.parameters()), create_graph=False).requires_grad


def test_param_penalty_fd_with_unused_parameters_gives_zeros():
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 2).to(DT), nn.Linear(3, 2).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    ps = list(used.parameters()) + list(unused.parameters())
    both = param_penalty_grads_fd(lambda: used(x).pow(2).sum(), ps, eps=1e-6)
    alone = param_penalty_grads_fd(lambda: used(x).pow(2).sum(), list(used.parameters()), eps=1e-6)
    torch.testing.assert_close(both.grad_norm2, alone.grad_norm2, rtol=0, atol=0)
    for a, b in zip(both.penalty_grads[:2], alone.penalty_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g, pg, p in zip(both.grads[2:], both.penalty_grads[2:], unused.parameters()):
        assert torch.equal(g, torch.zeros_like(p)) and torch.equal(pg, torch.zeros_like(p))
    # a loss that reaches none of the parameters, or has no graph at all
    for closure in (lambda: x.pow(2).sum(), lambda: torch.tensor(3.0, dtype=DT)):
        out = param_penalty_grads_fd(closure, list(unused.parameters()))
        assert out.grad_norm2.item() == 0.0
        assert all(torch.equal(t, torch.zeros_like(p)) for t, p in zip(out.penalty_grads, unused.parameters()))


def test_param_penalties_count_a_parameter_passed_twice_once():
    p = torch.tensor([0.7, -1.3, 0.4], dtype=DT, requires_grad=True)
    closure = lambda: p.pow(4).sum()  # noqa: E731
    g = 4 * p.detach() ** 3
    exact_pen = 2 * (12 * p.detach() ** 2) * g  # ∇‖g‖² = 2 H g, H = diag(12 p²)
    torch.testing.assert_close(param_grad_norm2(closure(), [p, p]), g.pow(2).sum(), rtol=1e-14, atol=0)
    out = param_penalty_grads_fd(closure, [p, p], eps=1e-7)
    assert len(out.grads) == len(out.penalty_grads) == 2  # one entry per position, as passed
    for pg in out.penalty_grads:
        torch.testing.assert_close(pg, exact_pen, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.grad_norm2, g.pow(2).sum(), rtol=1e-14, atol=0)
    assert torch.equal(p.detach(), torch.tensor([0.7, -1.3, 0.4], dtype=DT))


# ------------------------------------------------------------- shared modules in the bound
def test_occam_bound_refuses_a_linear_used_twice():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(DT)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(3, 4, dtype=DT)
    # what the bound would have to match: ‖∇_θ f‖² over model.parameters() (W used twice, gradients summed)
    pg = ref_param_grads(model, x, lambda o: o.sum())
    true_rhs = sum(v.reshape(3, -1).pow(2).sum(1) for v in pg.values())
    assert true_rhs.shape == (3,)
    with pytest.raises(ValueError, match="used more than once"):
        occam_bound(model, x)
    # two modules sharing one weight (tied weights) are refused too
    a, b = nn.Linear(4, 4).to(DT), nn.Linear(4, 4).to(DT)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shares"):
        occam_bound(nn.Sequential(a, nn.Tanh(), b), x)
    # untied, the same architecture is accepted and rhs is autograd's ‖∇_θ f‖²
    untied = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 4).to(DT))
    pg = ref_param_grads(untied, x, lambda o: o.sum())
    rhs = sum(v.reshape(3, -1).pow(2).sum(1) for v in pg.values())
    torch.testing.assert_close(occam_bound(untied, x).rhs, rhs, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------- our own Whitening mixes examples
def test_penalties_refuse_our_whitening_in_train_mode():
    from steepest.isotropy import Whitening

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Whitening(3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    x = torch.randn(8, 4, dtype=DT)
    f = lambda xx: model(xx)[:, 0]  # noqa: E731
    # it does mix the examples: f_0 depends on x_1
    J = torch.autograd.functional.jacobian(f, x)
    assert J[0, 1].abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="Whitening in train mode"):
        input_grad_norm2(f, x, model=model)
    with pytest.raises(ValueError, match="Whitening in train mode"):
        input_grad_norm2(model[:2], x[:, :4], method="finite_difference")  # a module f is checked itself
    with pytest.warns(UserWarning, match="Whitening in train mode"):
        param_penalty_grads_fd(lambda: f(x).pow(2).mean(), model.parameters(), model=model)
    # batch statistics in eval too when it keeps no running statistics
    model[1].track_running_stats = False
    model.eval()
    with pytest.raises(ValueError, match="batch statistics"):
        check_per_example(model)
    model[1].track_running_stats = True
    model.eval()  # running statistics: per example again
    out = input_grad_norm2(f, x, model=model)
    ref = []
    for i in range(8):  # one example at a time
        xi = x[i : i + 1].clone().requires_grad_(True)
        ref.append(torch.autograd.grad(model(xi)[0, 0], xi)[0].pow(2).sum())
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-10, atol=1e-14)


def test_batchnorm_without_running_stats_mixes_examples_in_eval():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 1)).to(DT)
    model.eval()
    with pytest.raises(ValueError, match="batch statistics"):
        check_per_example(model)


# ------------------------------------------------------------- RNG replay when CUDA starts late
def test_rng_replay_restarts_cuda_generators_that_began_during_the_first_pass(monkeypatch):
    """No GPU here: torch.cuda is stood in for by one CPU generator, initialised by the first pass."""
    from steepest import penalties

    gen = torch.Generator().manual_seed(1234)
    state = {"init": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["init"])
    monkeypatch.setattr(torch.cuda, "default_generators", (gen,), raising=False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gen.get_state()])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: gen.set_state(states[0]))

    def forward():
        state["init"] = True  # the first CUDA call initialises it
        return torch.rand(4, generator=gen)

    rng = penalties._SameRandomness()
    first = forward()
    after = rng.rewind()
    second = forward()
    assert torch.equal(first, second)  # the same "dropout mask" on the replay
    rng.restore(after)
    ref = torch.Generator().manual_seed(1234)
    torch.rand(4, generator=ref)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))  # moved as for one pass


# ------------------------------------------------------------- found by the fuzz battery
def test_finite_differences_in_float16_with_a_small_eps():
    # 1/ε = 1e5 overflowed float16: the input penalty was NaN; 2/ε likewise for parameters
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float16)
    f = lambda v: (0.5 * v * v).sum(1)  # noqa: E731  ‖∇f‖² = ‖x‖²
    # the step 1e-2·x is a few float16 spacings: the displacement actually taken is used
    d = input_grad_norm2(f, x, method="finite_difference", eps=1e-2)
    torch.testing.assert_close(d.float(), x.float().pow(2).sum(1), rtol=2e-2, atol=0)
    # a step far below x's spacing is lost entirely: an error, not 0
    with pytest.raises(ValueError, match="eps=1e-05 is too small"):
        input_grad_norm2(f, x, method="finite_difference", eps=1e-5)
    p = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16, requires_grad=True)
    out = param_penalty_grads_fd(lambda: (p * p).sum(), [p], eps=3e-3)  # H = 2I: penalty grad = 2·2·2p
    assert torch.isfinite(out.penalty_grads[0]).all()
    torch.testing.assert_close(out.penalty_grads[0].float(), 8 * p.detach().float(), rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="eps=1e-06 is too small"):
        param_penalty_grads_fd(lambda: (p * p).sum(), [p], eps=1e-6)


def test_fd_normalised_step_with_tiny_gradients():
    # ‖g‖² of 1e-25 entries underflowed float32 to 0, and the "unit" step became eps²/tiny·g ≈ 1e7
    p = torch.tensor([1e-25, 2e-25], requires_grad=True)
    out = param_penalty_grads_fd(lambda: torch.cos(p).sum(), [p], normalize=True)  # g = −sin p, H = −cos p
    pd = p.detach().double()
    torch.testing.assert_close(out.penalty_grads[0].double(), 2 * torch.sin(pd) * torch.cos(pd), rtol=1e-3, atol=0)
    assert torch.equal(p.detach(), torch.tensor([1e-25, 2e-25]))


def test_overflowing_penalties_are_errors_not_inf():
    x = torch.full((2, 3), 1e17, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        input_grad_norm2(lambda v: (500.0 * v * v).sum(1), x)  # ‖1e20‖² overflows bfloat16
    with pytest.raises(ValueError, match="NaN or Inf"):
        input_grad_norm2(lambda v: (500.0 * v * v).sum(1), x, method="finite_difference")
    p = torch.full((3,), 1e20, requires_grad=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        param_grad_norm2((p * 1.0).sum() * 1e19, [p])
    model = make_mlp([2, 3, 1]).float()
    with pytest.raises(ValueError, match="overflow"):
        occam_bound(model, torch.full((1, 2), 1e30))


def test_occam_bound_refuses_half_precision():
    model = make_mlp([2, 3, 1])
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="float32 or float64"):
            occam_bound(model.to(dt), torch.randn(2, 2).to(dt), norm="frobenius")


def test_penalty_arguments_are_checked_by_name():
    x, w = torch.randn(3, 2), torch.randn(2, requires_grad=True)
    f = lambda v: v.pow(2).sum(1)  # noqa: E731
    with pytest.raises(TypeError, match="eps"):
        input_grad_norm2(f, x, method="finite_difference", eps=True)
    with pytest.raises(TypeError, match="normalize"):
        input_grad_norm2(f, x, method="finite_difference", normalize="yes")
    with pytest.raises(TypeError, match="create_graph"):
        param_grad_norm2(w.sum(), [w], create_graph=1)
    with pytest.raises(TypeError, match="closure"):
        param_penalty_grads_fd(3, [w])
    with pytest.raises(TypeError, match="f must be callable"):
        input_grad_norm2(3, x)
    with pytest.raises(TypeError, match="model"):
        input_grad_norm2(f, x, model="model")
    with pytest.raises(TypeError, match="module"):
        check_per_example("model")
    with pytest.raises(TypeError, match="params"):
        param_grad_norm2(w.sum(), None)
