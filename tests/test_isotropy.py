"""steepest.isotropy against independent references (numpy/scipy float64, closed forms, gradcheck)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from steepest.isotropy import AlignmentMonitor, Whitening, feature_alignment, isotropy_metrics, whiten

SETTINGS = settings(max_examples=12, deadline=None)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _np_msign(M: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    keep = s > rtol * s.max()
    return U[:, keep] @ Vt[keep]


def _np_shrink(X: np.ndarray, eps: float) -> np.ndarray:
    """U Σ (Σ² + ε)^{-1/2} Vᵀ: the closed form of X (XᵀX + εI)^{-1/2}."""
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return (U * (s / np.sqrt(s**2 + eps))) @ Vt


def _np_zca(X: np.ndarray, eps: float = 0.0) -> np.ndarray:
    Xc = X - X.mean(0)
    C = np.cov(Xc, rowvar=False, bias=True) + eps * np.eye(X.shape[1])
    return Xc @ np.real(scipy.linalg.inv(scipy.linalg.sqrtm(C)))


def _orthonormal_rows(b: int, d: int, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(_rng(seed).standard_normal((d, b)))
    return Q.T  # b × d, Q Qᵀ = I_b


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# ----------------------------------------------------------------------------- whiten
@SETTINGS
@given(n=st.integers(2, 12), d=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_whiten_uncentered_is_polar_factor(n, d, seed):
    X = _rng(seed).standard_normal((n, d)) * np.linspace(0.2, 5.0, d)
    Y = whiten(_t(X)).numpy()
    # the Gram route (XᵀX)^{-1/2} loses about u·cond(X)² (a square draw reached cond 3e4: error 7e-8)
    s = np.linalg.svd(X, compute_uv=False)
    tol = 1e-9 + 10 * np.finfo(np.float64).eps * (s[0] / s[-1]) ** 2
    np.testing.assert_allclose(Y, _np_msign(X), atol=tol)
    # isotropy: YᵀY = I (n ≥ d) or YYᵀ = I (n ≤ d)
    k = min(n, d)
    G = Y.T @ Y if n >= d else Y @ Y.T
    np.testing.assert_allclose(G, np.eye(k), atol=2 * k * tol)


@SETTINGS
@given(n=st.integers(1, 10), d=st.integers(1, 10), eps=st.floats(1e-4, 10.0), seed=st.integers(0, 10_000))
def test_whiten_eps_closed_form_both_sides(n, d, eps, seed):
    X = _rng(seed).standard_normal((n, d))
    np.testing.assert_allclose(whiten(_t(X), eps=eps).numpy(), _np_shrink(X, eps), atol=1e-9)


@SETTINGS
@given(n=st.integers(8, 40), d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_whiten_centered_is_zca_with_identity_covariance(n, d, seed):
    rng = _rng(seed)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d) * 3
    Y = whiten(_t(X), centered=True).numpy()
    np.testing.assert_allclose(Y.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.cov(Y, rowvar=False, bias=True).reshape(d, d), np.eye(d), atol=1e-8)
    np.testing.assert_allclose(Y, _np_zca(X), atol=1e-7)


def test_whiten_centered_small_batch_with_eps_matches_zca():
    X = _rng(1).standard_normal((5, 9))
    Y = whiten(_t(X), centered=True, eps=0.1).numpy()
    np.testing.assert_allclose(Y, _np_zca(X, eps=0.1), atol=1e-9)


def test_whiten_float32_ill_conditioned_is_accepted():
    # cond(XᵀX) = 1e6 is well inside float32's range for a 3 × 3 Gram matrix
    X = _rng(5).standard_normal((40, 3)) * np.array([1.0, 1e-1, 1e-3])
    Y = whiten(torch.tensor(X, dtype=torch.float32))
    np.testing.assert_allclose(Y.numpy(), _np_msign(X), atol=1e-3)


def test_whiten_batched_and_float32():
    X = _rng(2).standard_normal((3, 7, 4))
    Y = whiten(torch.tensor(X, dtype=torch.float32))
    assert Y.dtype == torch.float32 and Y.shape == (3, 7, 4)
    for i in range(3):
        np.testing.assert_allclose(Y[i].numpy(), _np_msign(X[i]), atol=1e-5)


@pytest.mark.parametrize("shape,centered,eps", [((7, 3), False, 0.0), ((3, 6), False, 0.0), ((6, 3), True, 0.0), ((4, 5), True, 0.5)])
def test_whiten_gradcheck(shape, centered, eps):
    X = _t(_rng(3).standard_normal(shape)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: whiten(x, centered=centered, eps=eps), (X,), atol=1e-6, rtol=1e-5)


def test_whiten_bad_inputs():
    with pytest.raises(ValueError, match="eps > 0"):
        whiten(_t(np.ones((5, 3))))  # rank one
    with pytest.raises(ValueError, match="eps > 0"):
        whiten(_t(_rng(0).standard_normal((3, 5))), centered=True)  # n <= d
    with pytest.raises(ValueError, match="NaN"):
        whiten(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="floating"):
        whiten(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dimensions"):
        whiten(torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        whiten(torch.eye(3), eps=-1.0)
    with pytest.raises(TypeError, match="Tensor"):
        whiten(np.eye(3))


# ----------------------------------------------------------------------------- metrics
def test_isotropy_metrics_references():
    rng = _rng(4)
    X = rng.standard_normal((20, 6)) @ rng.standard_normal((6, 6)) + 1.0
    m = isotropy_metrics(_t(X))
    G = X @ X.T
    c = np.trace(G) / 20
    assert m["gram_distance"] == pytest.approx(np.linalg.norm(G - c * np.eye(20)) / np.linalg.norm(G), rel=1e-9)
    s = np.linalg.svd(X, compute_uv=False)
    p = s / s.sum()
    assert m["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert m["condition_number"] == pytest.approx(np.linalg.cond(np.cov(X, rowvar=False, bias=True)), rel=1e-6)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = Xn @ Xn.T
    assert m["mean_cosine"] == pytest.approx((C.sum() - np.trace(C)) / (20 * 19), rel=1e-9)


def test_isotropy_metrics_extremes():
    Q = _orthonormal_rows(5, 9, 0)
    m = isotropy_metrics(_t(Q))
    assert m["gram_distance"] == pytest.approx(0.0, abs=1e-7)
    assert m["effective_rank"] == pytest.approx(5.0)
    assert m["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert m["condition_number"] == math.inf  # 5 samples in 9 dims
    r1 = np.outer(np.arange(1.0, 6.0), _rng(1).standard_normal(4))
    m1 = isotropy_metrics(_t(r1))
    assert m1["gram_distance"] == pytest.approx(math.sqrt(1 - 1 / 5), rel=1e-9)
    assert m1["effective_rank"] == pytest.approx(1.0)
    assert m1["mean_cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2-D"):
        isotropy_metrics(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="2 rows"):
        isotropy_metrics(torch.ones(1, 3))


# ----------------------------------------------------------------------------- alignment
@SETTINGS
@given(b=st.integers(2, 8), extra=st.integers(0, 6), d_out=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_alignment_is_one_for_orthonormal_rows_sgd_and_muon(b, extra, d_out, seed):
    X = _orthonormal_rows(b, b + extra, seed)
    G = _rng(seed + 1).standard_normal((b, d_out))
    for rule in ("sgd", "muon"):
        assert float(feature_alignment(_t(X), _t(G), rule)) == pytest.approx(1.0, abs=1e-9)


def test_alignment_signsgd_below_one_for_orthonormal_rows():
    vals = []
    for seed in range(10):
        X = _orthonormal_rows(6, 10, seed)
        G = _rng(100 + seed).standard_normal((6, 5))
        v = float(feature_alignment(_t(X), _t(G), "signsgd"))
        ref_dY = -X @ np.sign(X.T @ G)
        ref = np.sum(ref_dY * -np.sign(G)) / (np.linalg.norm(ref_dY) * np.linalg.norm(np.sign(G)))
        assert v == pytest.approx(ref, rel=1e-9)
        vals.append(v)
    assert max(vals) < 0.99 and np.mean(vals) < 0.9


@pytest.mark.parametrize("rule", ["sgd", "muon", "signsgd"])
def test_alignment_matches_numpy_on_anisotropic_inputs(rule):
    rng = _rng(7)
    X = rng.standard_normal((12, 5)) * np.array([5.0, 2.0, 1.0, 0.3, 0.1]) + 0.7
    G = rng.standard_normal((12, 4))
    if rule == "sgd":
        dY, D = -X @ X.T @ G, -G
    elif rule == "muon":
        # seed 000: ΔY = −X XᵀG (GᵀXXᵀG)^{-1/2}
        dY = -X @ X.T @ G @ np.real(scipy.linalg.inv(scipy.linalg.sqrtm(G.T @ X @ X.T @ G)))
        D = -_np_msign(G)
    else:
        dY, D = -X @ np.sign(X.T @ G), -np.sign(G)
    ref = np.sum(dY * D) / (np.linalg.norm(dY) * np.linalg.norm(D))
    got = float(feature_alignment(_t(X), _t(G), rule))
    assert got == pytest.approx(ref, rel=1e-8)
    assert got < 0.99  # anisotropic inputs: not the steepest feature direction


def test_alignment_muon_rank_deficient_gradient():
    # softmax cross-entropy gradients have rows summing to 0: G is rank-deficient
    X = _orthonormal_rows(6, 10, 3)
    G = _rng(5).standard_normal((6, 4))
    G -= G.mean(1, keepdims=True)
    assert float(feature_alignment(_t(X), _t(G), "muon")) == pytest.approx(1.0, abs=1e-9)


def test_alignment_bad_inputs():
    X, G = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="share"):
        feature_alignment(X, G, "sgd")
    with pytest.raises(ValueError, match="rule"):
        feature_alignment(X, torch.randn(4, 2), "adam")
    with pytest.raises(ValueError, match="NaN"):
        feature_alignment(X, torch.full((4, 2), float("inf")), "sgd")


# ----------------------------------------------------------------------------- Whitening module
def test_whitening_train_mode_whitens_batch_and_updates_running_stats():
    rng = _rng(8)
    X = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 6)) + rng.standard_normal(6)
    m = Whitening(6, momentum=0.25, eps=1e-3, affine=False).double()
    Y = m(_t(X)).detach().numpy()
    np.testing.assert_allclose(Y, _np_zca(X, eps=1e-3), atol=1e-9)
    np.testing.assert_allclose(np.cov(Y, rowvar=False, bias=True), np.eye(6), atol=0.01)
    np.testing.assert_allclose(m.running_mean.numpy(), 0.25 * X.mean(0), atol=1e-12)
    np.testing.assert_allclose(m.running_cov[0].numpy(), 0.75 * np.eye(6) + 0.25 * np.cov(X, rowvar=False), atol=1e-12)
    assert int(m.num_batches_tracked) == 1


def test_whitening_eval_uses_running_stats_per_sample():
    rng = _rng(9)
    m = Whitening(4, eps=1e-2, affine=False).double()
    A = rng.standard_normal((4, 4))
    mu, S = rng.standard_normal(4), A @ A.T + np.eye(4)
    m.running_mean.copy_(_t(mu))
    m.running_cov.copy_(_t(S)[None])
    m.eval()
    X = rng.standard_normal((5, 4))
    ref = (X - mu) @ np.real(scipy.linalg.inv(scipy.linalg.sqrtm(S + 1e-2 * np.eye(4))))
    with torch.no_grad():
        np.testing.assert_allclose(m(_t(X)).numpy(), ref, atol=1e-9)
        np.testing.assert_allclose(m(_t(X[2:3])).numpy(), ref[2:3], atol=1e-9)  # no batch dependence
    before = m.running_cov.clone()
    m(_t(X))
    assert torch.equal(before, m.running_cov)


def test_whitening_uncentered_groups_and_nchw():
    rng = _rng(10)
    x = rng.standard_normal((3, 6, 4, 5)) + 0.5
    m = Whitening(6, centered=False, groups=2, eps=1e-4, affine=False).double()
    y = m(_t(x)).detach().numpy()
    flat = x.transpose(0, 2, 3, 1).reshape(-1, 6)
    n = flat.shape[0]
    ref = math.sqrt(n) * np.concatenate([_np_shrink(flat[:, 3 * g : 3 * g + 3] / math.sqrt(n), 1e-4) for g in range(2)], axis=1)
    np.testing.assert_allclose(y.transpose(0, 2, 3, 1).reshape(-1, 6), ref, atol=1e-9)
    # per group, second moment = I (uncentered whitening)
    yf = y.transpose(0, 2, 3, 1).reshape(-1, 6)
    np.testing.assert_allclose((yf.T @ yf / n)[:3, :3], np.eye(3), atol=1e-3)


def test_whitening_small_batch_matches_closed_form():
    # fewer samples than channels: X (XᵀX/n + εI)^{-1/2}, XXᵀ ≈ n·I
    X = _rng(11).standard_normal((5, 12))
    m = Whitening(12, centered=False, eps=1e-6, affine=False).double()
    Y = m(_t(X)).detach().numpy()
    np.testing.assert_allclose(Y, math.sqrt(5) * _np_shrink(X / math.sqrt(5), 1e-6), atol=1e-8)
    np.testing.assert_allclose(Y @ Y.T, 5 * np.eye(5), atol=1e-4)


def test_whitening_newton_schulz_converges_to_eigh():
    X = _t(_rng(12).standard_normal((50, 5)) @ np.diag([3.0, 1.0, 1.0, 0.5, 0.2]))
    exact = Whitening(5, method="eigh", affine=False).double()(X)
    ns = Whitening(5, method="newton_schulz", iters=40, affine=False).double()(X)
    ns5 = Whitening(5, method="newton_schulz", iters=2, affine=False).double()(X)
    torch.testing.assert_close(ns, exact, atol=1e-7, rtol=1e-6)
    assert (ns5 - exact).abs().max() > 1e-3  # few iterations whiten only approximately (IterNorm)


def test_whitening_gradcheck_and_affine():
    x = _t(_rng(13).standard_normal((7, 4))).requires_grad_()
    m = Whitening(4, eps=1e-2).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        m.bias.copy_(torch.tensor([0.1, 0.0, -0.3, 1.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: m(t), (x,), atol=1e-6, rtol=1e-5)
    y = m(x).detach().numpy()
    ref = _np_zca(x.detach().numpy(), eps=1e-2) * np.array([1.0, 2.0, 0.5, -1.0]) + np.array([0.1, 0.0, -0.3, 1.0])
    np.testing.assert_allclose(y, ref, atol=1e-9)


def test_whitening_state_dict_round_trip():
    m = Whitening(3, eps=1e-3)
    m(torch.randn(20, 3))
    m2 = Whitening(3, eps=1e-3)
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    x = torch.randn(4, 3)
    assert torch.equal(m(x), m2(x))


def test_whitening_bad_inputs():
    with pytest.raises(ValueError, match="groups"):
        Whitening(6, groups=4)
    with pytest.raises(ValueError, match="method"):
        Whitening(6, method="svd")
    with pytest.raises(ValueError, match="num_features"):
        Whitening(0)
    with pytest.raises(ValueError, match="eps"):
        Whitening(3, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        Whitening(3, momentum=2.0)
    m = Whitening(4)
    with pytest.raises(ValueError, match=r"\(B, 4"):
        m(torch.randn(8, 5))
    with pytest.raises(ValueError, match="more than one sample"):
        m(torch.randn(1, 4))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(8, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((8, 4), float("nan")))
    with pytest.raises(ValueError, match="eps > 0"):
        Whitening(4, eps=0.0)(torch.randn(3, 4))


# ----------------------------------------------------------------------------- AlignmentMonitor
class _NumpyMuon(torch.optim.Optimizer):
    """W ← W − η msign(∇W) with msign from a numpy SVD (independent of steepest.linalg)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                p.sub_(g["lr"] * torch.tensor(_np_msign(p.grad.numpy())))


def _mse_step(model, opt, X, T):
    loss = ((model(X) - T) ** 2).sum() / 2  # ∂L/∂Y = Y − T
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("opt_cls,lr,norm", [(torch.optim.SGD, 0.1, "sgd"), (_NumpyMuon, 0.05, "muon")])
def test_monitor_alignment_one_for_orthonormal_inputs(opt_cls, lr, norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 4, bias=False)).double()
    opt = opt_cls(model.parameters(), lr=lr)
    mon = AlignmentMonitor(model, opt, norms=("sgd", "muon", "signsgd"))
    for seed in range(3):
        X = _t(_orthonormal_rows(6, 10, seed))
        _mse_step(model, opt, X, torch.randn(6, 4, dtype=torch.float64))
    assert mon.steps["0"] == [0, 1, 2]
    assert np.allclose(mon.history["0"][norm], 1.0, atol=1e-9)
    assert max(mon.history["0"]["signsgd"]) < 0.99
    mon.remove()


def test_monitor_matches_manual_feature_update_with_bias():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X = torch.randn(7, 5, dtype=torch.float64)
    T = torch.randn(7, 2, dtype=torch.float64)
    with AlignmentMonitor(model, opt, norms=["sgd", "signsgd"]) as mon:
        for _ in range(2):
            W0, b0 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
            H = torch.tanh(model[0](X)).detach().numpy()
            Y = model(X)
            G = (Y - T).detach().numpy()
            loss = ((Y - T) ** 2).sum() / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            dY = H @ (model[2].weight.detach() - W0).numpy().T + (model[2].bias.detach() - b0).numpy()
            ref_sgd = np.sum(dY * -G) / (np.linalg.norm(dY) * np.linalg.norm(G))
            ref_sign = np.sum(dY * -np.sign(G)) / (np.linalg.norm(dY) * np.linalg.norm(np.sign(G)))
            assert mon.history["2"]["sgd"][-1] == pytest.approx(ref_sgd, rel=1e-9)
            assert mon.history["2"]["signsgd"][-1] == pytest.approx(ref_sign, rel=1e-9)
    assert len(mon.history["0"]["sgd"]) == 2
    rows = mon.summary()
    assert {r["layer"] for r in rows} == {"0", "2"} and all(r["steps"] == 2 for r in rows)
    assert "| layer | norm |" in mon.table()
    fig = mon.plot("signsgd")
    assert len(fig.axes[0].lines) == 2


def test_monitor_manual_record_every_and_no_grad_forward():
    model = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, norms="sgd", every=2)
    for _ in range(4):
        out = model(torch.randn(5, 4)).pow(2).sum()
        opt.zero_grad()
        out.backward()
        with torch.no_grad():
            model(torch.randn(5, 4))  # evaluation forward: ignored
        opt.step()
        mon.record()
    assert mon.steps[""] == [0, 2]
    mon.remove()


def test_monitor_flattens_sequence_inputs():
    torch.manual_seed(2)
    model = nn.Linear(4, 3, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, opt, norms="sgd")
    X = torch.randn(2, 5, 4, dtype=torch.float64)  # (batch, tokens, features)
    W0 = model.weight.detach().clone()
    Y = model(X)
    Y.pow(2).sum().backward()
    opt.step()
    dY = (X.reshape(10, 4) @ (model.weight.detach() - W0).T).numpy()
    G = (2 * Y).detach().reshape(10, 3).numpy()
    ref = np.sum(dY * -G) / (np.linalg.norm(dY) * np.linalg.norm(G))
    assert mon.history[""]["sgd"][0] == pytest.approx(ref, rel=1e-9)


def test_monitor_non_finite_gradient_is_reported():
    model = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, opt, norms="sgd")
    y = model(torch.randn(4, 3))
    (y * float("inf")).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert math.isnan(mon.history[""]["sgd"][0])


def test_monitor_bad_inputs():
    with pytest.raises(ValueError, match="no nn.Linear"):
        AlignmentMonitor(nn.ReLU())
    with pytest.raises(ValueError, match="not nn.Linear"):
        AlignmentMonitor(nn.Sequential(nn.Linear(2, 2)), layers=["1"])
    with pytest.raises(ValueError, match="norms"):
        AlignmentMonitor(nn.Linear(2, 2), norms="adam")
    with pytest.raises(TypeError, match="nn.Module"):
        AlignmentMonitor("model")
    with pytest.raises(ValueError, match="every"):
        AlignmentMonitor(nn.Linear(2, 2), every=0)


# ----------------------------------------------------------------------------- Whitening: rank-deficient float32 features
def _np_whitening_map(S: np.ndarray, eps: float) -> np.ndarray:
    """(S₊ + ε'I)^{-1/2} in float64 by numpy: S₊ the PSD part of S, ε' = max(ε, c·2⁻⁵²·tr S) (the documented floor)."""
    lam, Q = np.linalg.eigh(S)
    c = S.shape[0]
    e = max(eps, c * np.finfo(np.float64).eps * max(np.trace(S), 0.0)) if eps > 0 else 0.0
    return (Q / np.sqrt(np.clip(lam, 0.0, None) + e)) @ Q.T


def _rank16_features(scale: float = 10.0, n: int = 256, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    lin = nn.Linear(16, 64).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(scale)
        return lin(torch.randn(n, 16, dtype=dtype))


def test_whitening_rank_deficient_float32_features_with_default_eps():
    # Linear(16→64) with weights ×10: rank 16 in 64 channels; the float32 covariance's zero
    # eigenvalues came out ≈ −5e-6, below −eps, and eigh refused "pass eps > 0" though eps = 1e-5
    x = _rank16_features()
    m = Whitening(64, affine=False)
    y = m(x)
    X = x.double().numpy()
    Xc = X - X.mean(0)
    ref = Xc @ _np_whitening_map(Xc.T @ Xc / len(X), 1e-5)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # whitened in the 16-dimensional signal subspace: 16 unit eigenvalues in the output covariance
    ev = np.linalg.eigvalsh(np.cov(y.detach().double().numpy(), rowvar=False, bias=True))
    np.testing.assert_allclose(ev[-16:], 1.0, atol=1e-3)
    # eval with the (float32, rank-deficient) running covariance works too
    m.eval()
    with torch.no_grad():
        ye = m(x[:5])
    S = m.running_cov[0].double().numpy()
    ref_e = (X[:5] - m.running_mean.double().numpy()) @ _np_whitening_map(S, 1e-5)
    np.testing.assert_allclose(ye.numpy(), ref_e, rtol=0, atol=1e-4 * np.abs(ref_e).max())


@pytest.mark.parametrize("scale", [1e6, 1e12])
def test_whitening_rank_deficient_at_large_scale_in_float64(scale):
    # float64 rounding of the zero eigenvalues (≈ 1e-16 λ_max) exceeds eps = 1e-5 here: eps is floored
    x = _rank16_features(scale, dtype=torch.float64)
    y = Whitening(64, affine=False, track_running_stats=False).double()(x)
    X = x.numpy()
    Xc = X - X.mean(0)
    ref = Xc @ _np_whitening_map(Xc.T @ Xc / len(X), 1e-5)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    ev = np.linalg.eigvalsh(np.cov(y.detach().numpy(), rowvar=False, bias=True))
    np.testing.assert_allclose(ev[-16:], 1.0, atol=1e-6)


def test_whitening_refuses_statistics_its_buffers_cannot_hold():
    m = Whitening(4)  # float32 running_cov: a covariance of 1e40 overflows it
    with pytest.raises(ValueError, match="running_cov"):
        m(torch.randn(16, 4, dtype=torch.float64) * 1e20)
    assert torch.isfinite(m.running_cov).all() and int(m.num_batches_tracked) == 0
    # without running statistics, or with float64 buffers, the same batch is whitened
    x = torch.randn(16, 4, dtype=torch.float64) * 1e20
    for w in (Whitening(4, affine=False, track_running_stats=False), Whitening(4, affine=False).double()):
        y = w(x)
        np.testing.assert_allclose(np.cov(y.detach().numpy(), rowvar=False, bias=True), np.eye(4), atol=1e-6)


def test_whitening_eps_zero_singular_batch_is_a_clear_error():
    x = torch.zeros(10, 3)
    x[:, 0] = torch.randn(10)
    with pytest.raises(ValueError, match="eps > 0"):
        Whitening(3, eps=0.0)(x)


def test_whitening_flags_are_checked():
    with pytest.raises(TypeError, match="momentum"):
        Whitening(4, momentum=True)
    with pytest.raises(TypeError, match="centered"):
        Whitening(4, centered="yes")
    with pytest.raises(TypeError, match="affine"):
        Whitening(4, affine=1)
    with pytest.raises(TypeError, match="track_running_stats"):
        Whitening(4, track_running_stats=None)


# ----------------------------------------------------------------------------- AlignmentMonitor: closures, accumulation, copies
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_monitor_lbfgs_records_the_whole_step_against_its_starting_gradient():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    X = torch.randn(12, 5, dtype=torch.float64)
    T = torch.randn(12, 3, dtype=torch.float64)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=6)
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = ((model(X) - T) ** 2).sum() / 2
        loss.backward()
        evaluations.append(1)
        return loss

    lin = model[0]
    mon = AlignmentMonitor(model, opt, norms=["sgd", "signsgd"])
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    G0 = (lin(X) - T).detach().numpy()  # ∂L/∂Y at the weights the step starts from
    opt.step(closure)
    assert len(evaluations) > 2
    dY = X.numpy() @ (lin.weight.detach() - W0).numpy().T + (lin.bias.detach() - b0).numpy()
    assert mon.history["0"]["sgd"] == [pytest.approx(_cos(dY, -G0), rel=1e-9)]
    assert mon.history["0"]["signsgd"] == [pytest.approx(_cos(dY, -np.sign(G0)), rel=1e-9)]
    mon.remove()


def test_monitor_gradient_accumulation_stacks_the_micro_batches():
    torch.manual_seed(4)
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, opt, norms="sgd")
    X = torch.randn(10, 4, dtype=torch.float64)
    T = torch.randn(10, 3, dtype=torch.float64)
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt.zero_grad()
    for part in (slice(0, 6), slice(6, 10)):
        (((model(X[part]) - T[part]) ** 2).sum() / 2).backward()
    opt.step()
    G = (X @ W0.T + b0 - T).numpy()
    dY = X.numpy() @ (model.weight.detach() - W0).numpy().T + (model.bias.detach() - b0).numpy()
    assert mon.history[""]["sgd"] == [pytest.approx(_cos(dY, -G), rel=1e-9)]
    mon.remove()


def test_monitor_hooks_do_not_travel_with_a_deepcopy():
    import copy
    import gc
    import weakref

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, opt, norms="sgd")
    twin = copy.deepcopy(model)
    X, X2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    W0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt.zero_grad()
    Y = model(X)
    Y.pow(2).sum().backward()
    twin(X2).pow(2).sum().backward()  # the copy's forward must not replace the original's entry
    opt.step()
    dY = X.numpy() @ (model[0].weight.detach() - W0).numpy().T + (model[0].bias.detach() - b0).numpy()
    assert mon.history["0"]["sgd"] == [pytest.approx(_cos(dY, -2 * Y.detach().numpy()), rel=1e-9)]
    mon.remove()
    assert len(model[0]._forward_hooks) == 0
    twin(X2).sum().backward()
    assert mon._pending == {}
    # the copy holds no reference to the monitor
    ref = weakref.ref(mon)
    del mon
    gc.collect()
    assert ref() is None


# ----------------------------------------------------------------------------- found by the fuzz battery
def test_whiten_rank_deficient_with_eps_at_large_scale():
    # centered, n = 2 < d: XXᵀ's zero eigenvalue rounds to ±0.03 at entries 1e7, far beyond nε = 2e-5
    X = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.5, 2.0]], dtype=torch.float64) * 1e7
    Y = whiten(X.bfloat16(), centered=True, eps=1e-5)
    Xc = X.bfloat16().double().numpy()
    Xc = Xc - Xc.mean(0)
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    keep = s > 1e-6 * s.max()
    ref = math.sqrt(2) * (U[:, keep] @ Vt[keep])  # ZCA of a rank-1 centered pair: √n U Vᵀ
    np.testing.assert_allclose(Y.double().numpy(), ref, atol=2e-2)


@pytest.mark.parametrize("sx,sg", [(1e20, 1.0), (1.0, 1e-17), (1e-30, 1e30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_alignment_is_scale_invariant(sx, sg, dtype):
    # X XᵀG overflowed (NaN) or underflowed (cos 0.01 for an exact 1) in float32
    rng = _rng(3)
    X, G = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    for rule in ("sgd", "signsgd", "muon"):
        ref = float(feature_alignment(_t(X), _t(G), rule))
        got = float(feature_alignment(_t(X * sx).to(dtype), _t(G * sg).to(dtype), rule))
        assert got == pytest.approx(ref, abs=3e-2 if dtype == torch.bfloat16 else 1e-5)
    one = feature_alignment(torch.tensor([[sx]], dtype=dtype), torch.tensor([[sg]], dtype=dtype), "sgd")
    assert float(one) == pytest.approx(1.0)


def test_isotropy_metrics_at_extreme_float64_scales():
    X = _rng(4).standard_normal((8, 3))
    ref = isotropy_metrics(_t(X))
    for scale in (1e-200, 1e200):
        got = isotropy_metrics(_t(X * scale))
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-9), k


def test_monitor_records_tiny_output_gradients():
    # ‖G‖ of 1e-25 entries underflowed in float32: the recorded cosine was 0
    torch.manual_seed(6)
    model = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = AlignmentMonitor(model, opt, norms="sgd")
    X = torch.randn(4, 3) * 1e20
    T = torch.randn(4, 2) * 1e-25
    W0 = model.weight.detach().clone()
    (model(X) * T).sum().backward()  # G = T
    opt.step()
    dY = X.double().numpy() @ (model.weight.detach() - W0).double().numpy().T
    G = T.double().numpy()
    ref = np.sum(dY * -G) / (np.linalg.norm(dY) * np.linalg.norm(G))
    assert ref > 0.1
    assert mon.history[""]["sgd"][0] == pytest.approx(ref, rel=1e-5)


def test_monitor_arguments_are_checked_by_name():
    lin = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="include_bias"):
        AlignmentMonitor(lin, include_bias="yes")
    with pytest.raises(TypeError, match="norms"):
        AlignmentMonitor(lin, norms=None)
    with pytest.raises(TypeError, match="layers"):
        AlignmentMonitor(lin, layers="0")
    with pytest.raises(TypeError, match="optimizer"):
        AlignmentMonitor(lin, "sgd")
    with pytest.raises(TypeError, match="every"):
        AlignmentMonitor(lin, every=1.5)


def test_monitored_model_pickles_and_its_copy_is_not_monitored(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    mon = AlignmentMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.save(model, tmp_path / "m.pt")  # the closure hooks this replaced could not be pickled
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    loaded(torch.randn(2, 3)).sum().backward()
    assert mon._pending == {}
    mon.remove()


# ----------------------------------------------------------------------------- Whitening: shrinkage, running statistics in training, sample decorrelation
def _np_inv_sqrt(S: np.ndarray) -> np.ndarray:
    lam, Q = np.linalg.eigh(0.5 * (S + S.T))
    return (Q / np.sqrt(lam)) @ Q.T


def _np_shrunk_whiten(X: np.ndarray, centered: bool, alpha: float, eps: float) -> np.ndarray:
    """Xc ((1 − α)Σ + α·tr Σ/c·I + εI)^{-1/2}, Σ the biased batch (second-moment) covariance."""
    Xc = X - X.mean(0) if centered else X
    S = Xc.T @ Xc / len(X)
    c = S.shape[0]
    return Xc @ _np_inv_sqrt((1 - alpha) * S + (alpha * np.trace(S) / c + eps) * np.eye(c))


@pytest.mark.parametrize("n", [40, 9])  # more samples than channels, and fewer (the Gram-side path)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_whitening_shrinkage_matches_numpy(n, centered, alpha):
    rng = _rng(30)
    X = rng.standard_normal((n, 12)) @ np.diag(np.logspace(0, -2, 12)) + 0.3
    m = Whitening(12, centered=centered, eps=1e-4, affine=False, shrinkage=alpha).double()
    Y = m(_t(X)).detach().numpy()
    np.testing.assert_allclose(Y, _np_shrunk_whiten(X, centered, alpha, 1e-4), atol=1e-8)
    if alpha == 1.0:  # a scalar normalization: Y = Xc / √(tr Σ / c + ε)
        Xc = X - X.mean(0) if centered else X
        np.testing.assert_allclose(Y, Xc / math.sqrt((Xc**2).sum() / (n * 12) + 1e-4), atol=1e-10)
    # eval shrinks the running covariance the same way
    m.eval()
    R = m.running_cov[0].numpy()
    mu = m.running_mean.numpy() if centered else 0.0
    ref = (X - mu) @ _np_inv_sqrt((1 - alpha) * R + (alpha * np.trace(R) / 12 + 1e-4) * np.eye(12))
    with torch.no_grad():
        np.testing.assert_allclose(m(_t(X)).numpy(), ref, atol=1e-8)


def test_whitening_shrinkage_bounds_the_gain_of_unseen_directions():
    # a batch of 4 in 10 dimensions: without shrinkage an unseen direction is scaled by 1/√ε in eval
    rng = _rng(31)
    m0 = Whitening(10, centered=False, eps=1e-6, affine=False, momentum=1.0).double()
    m1 = Whitening(10, centered=False, eps=1e-6, affine=False, momentum=1.0, shrinkage=0.5).double()
    X = rng.standard_normal((4, 10))
    m0(_t(X)), m1(_t(X))
    m0.eval(), m1.eval()
    Q, _ = np.linalg.qr(X.T, mode="complete")
    u = _t(Q[:, -1:].T)  # orthogonal to every sample of the batch
    t = (X**2).sum() / (4 * 10)
    with torch.no_grad():
        assert float(m0(u).norm()) == pytest.approx(1e3, rel=1e-6)
        assert float(m1(u).norm()) == pytest.approx(1 / math.sqrt(0.5 * t + 1e-6), rel=1e-6)


@pytest.mark.parametrize("centered", [False, True])
def test_whitening_running_train_stats_whiten_with_the_updated_running_estimate(centered):
    rng = _rng(32)
    X = rng.standard_normal((30, 5)) @ rng.standard_normal((5, 5)) + rng.standard_normal(5)
    m = Whitening(5, centered=centered, momentum=0.25, eps=1e-3, affine=False, train_stats="running").double()
    x = _t(X).requires_grad_()
    Y = m(x)
    # numpy: the running estimates after one BatchNorm-style update from (0, I)
    mu = 0.25 * X.mean(0) if centered else np.zeros(5)
    C = np.cov(X, rowvar=False) if centered else X.T @ X / 30
    R = 0.75 * np.eye(5) + 0.25 * C
    W = _np_inv_sqrt(R + 1e-3 * np.eye(5))
    np.testing.assert_allclose(Y.detach().numpy(), (X - mu) @ W, atol=1e-9)
    np.testing.assert_allclose(m.running_cov[0].numpy(), R, atol=1e-12)
    # no gradient through the statistics: the map is affine in x, so ∂⟨Y, T⟩/∂x = T W
    T = rng.standard_normal((30, 5))
    (Y * _t(T)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), T @ W, atol=1e-9)
    # training and eval apply the same per-sample map
    m.eval()
    with torch.no_grad():
        np.testing.assert_allclose(m(_t(X[3:4])).numpy(), Y.detach().numpy()[3:4], atol=1e-12)


def test_whitening_running_train_stats_with_shrinkage_and_groups():
    rng = _rng(33)
    X = rng.standard_normal((16, 6)) * np.array([3.0, 1.0, 0.1, 2.0, 0.5, 0.01])
    m = Whitening(6, centered=False, momentum=0.5, eps=1e-5, groups=2, affine=False, train_stats="running",
                  shrinkage=0.2).double()
    Y = m(_t(X)).detach().numpy()
    ref = []
    for g in range(2):
        Xg = X[:, 3 * g : 3 * g + 3]
        R = 0.5 * np.eye(3) + 0.5 * Xg.T @ Xg / 16
        ref.append(Xg @ _np_inv_sqrt(0.8 * R + (0.2 * np.trace(R) / 3 + 1e-5) * np.eye(3)))
    np.testing.assert_allclose(Y, np.concatenate(ref, axis=1), atol=1e-9)


def _np_decorrelate(Y: np.ndarray, rho: float) -> np.ndarray:
    K = Y @ Y.T
    kbar = np.trace(K) / len(Y)
    return math.sqrt(kbar) * _np_inv_sqrt(rho * K + (1 - rho) * kbar * np.eye(len(Y))) @ Y


@pytest.mark.parametrize("n", [8, 30])  # fewer rows than channels (Gram side) and more (channel side)
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_whitening_sample_decorrelation_closed_form(n, rho):
    rng = _rng(34)
    C = 16
    X = rng.standard_normal((n, C)) @ rng.standard_normal((C, C)) * 0.3 + 1.0
    kw = dict(centered=False, eps=1e-3, affine=False, train_stats="running", momentum=1.0)
    plain = Whitening(C, **kw).double()
    m = Whitening(C, sample_decorrelation=rho, **kw).double()
    Y0 = plain(_t(X)).detach().numpy()
    Y = m(_t(X)).detach().numpy()
    np.testing.assert_allclose(Y, _np_decorrelate(Y0, rho), atol=1e-8)
    # the spectrum of YYᵀ: k ↦ k̄k / (ρk + (1 − ρ)k̄), k the eigenvalues of Y0Y0ᵀ
    k = np.linalg.eigvalsh(Y0 @ Y0.T)
    kbar = k.sum() / n
    expect = kbar * k / (rho * k + (1 - rho) * kbar)
    np.testing.assert_allclose(np.linalg.eigvalsh(Y @ Y.T), np.sort(expect), atol=1e-7 * kbar * n)
    # eval applies no decorrelation: the same per-sample map as without it
    m.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(_t(X)), plain(_t(X)), atol=1e-12, rtol=0)


def test_whitening_sample_decorrelation_brings_the_gram_matrix_to_identity():
    # whitening with the population covariance (I here; momentum 0 keeps the running estimate at I)
    # leaves XXᵀ ∝ I only up to ~√(n/d) fluctuations; ρ → 1 removes them
    rng = _rng(35)
    X = _t(rng.standard_normal((16, 32)))
    from steepest.isotropy import isotropy_metrics

    dist = []
    for rho in (0.0, 0.5, 0.9, 0.999):
        m = Whitening(32, centered=False, eps=1e-6, affine=False, train_stats="running", momentum=0.0,
                      sample_decorrelation=rho).double()
        dist.append(isotropy_metrics(m(X).detach())["gram_distance"])
    assert dist[0] > 0.3
    assert all(a > b for a, b in zip(dist, dist[1:]))
    assert dist[-1] < 1e-2


def test_whitening_new_options_gradcheck():
    x = _t(_rng(36).standard_normal((6, 4)) + 0.5).requires_grad_()
    for kw in (dict(shrinkage=0.3, sample_decorrelation=0.7, track_running_stats=False),
               dict(shrinkage=0.3, sample_decorrelation=0.7, centered=False, groups=2, track_running_stats=False)):
        m = Whitening(4, eps=1e-2, **kw).double()
        assert torch.autograd.gradcheck(lambda t: m(t), (x,), atol=1e-6, rtol=1e-5)
    x = _t(_rng(37).standard_normal((10, 4))).requires_grad_()  # more rows than channels
    m = Whitening(4, eps=1e-2, sample_decorrelation=0.5, track_running_stats=False).double()
    assert torch.autograd.gradcheck(lambda t: m(t), (x,), atol=1e-6, rtol=1e-5)
    # running statistics in training are detached: with momentum 0 they do not depend on the input at all,
    # and the whole forward (running-estimate whitening, shrinkage, sample decorrelation) is checked
    m0 = Whitening(4, eps=1e-2, train_stats="running", shrinkage=0.2, sample_decorrelation=0.6, momentum=0.0).double()
    A = _rng(38).standard_normal((4, 4))
    m0.running_cov.copy_(_t(A @ A.T + 0.5 * np.eye(4))[None])
    m0.running_mean.copy_(_t(_rng(39).standard_normal(4)))
    assert torch.autograd.gradcheck(lambda t: m0(t), (x,), atol=1e-6, rtol=1e-5)


def test_whitening_running_train_stats_state_dict_round_trip():
    torch.manual_seed(0)
    kw = dict(centered=False, eps=1e-3, train_stats="running", shrinkage=0.1, sample_decorrelation=0.8)
    m = Whitening(6, **kw)
    for _ in range(3):
        m(torch.randn(8, 6))
    m2 = Whitening(6, **kw)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(8, 6)
    assert torch.equal(m(x), m2(x))  # training: same output and the same update of the buffers
    assert torch.equal(m.running_cov, m2.running_cov) and int(m2.num_batches_tracked) == 4
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    assert "train_stats='running'" in repr(m) and "sample_decorrelation=0.8" in repr(m)


def test_whitening_new_options_are_checked():
    with pytest.raises(ValueError, match="train_stats"):
        Whitening(4, train_stats="eval")
    with pytest.raises(ValueError, match="track_running_stats=True"):
        Whitening(4, train_stats="running", track_running_stats=False)
    with pytest.raises(ValueError, match="shrinkage"):
        Whitening(4, shrinkage=1.5)
    with pytest.raises(TypeError, match="shrinkage"):
        Whitening(4, shrinkage=True)
    with pytest.raises(ValueError, match="sample_decorrelation"):
        Whitening(4, sample_decorrelation=1.0)  # YYᵀ is singular when rows outnumber channels
    with pytest.raises(ValueError, match="sample_decorrelation"):
        Whitening(4, sample_decorrelation=-0.5)
    with pytest.raises(ValueError, match="more than one sample"):
        Whitening(4, train_stats="running")(torch.randn(1, 4))
    # eps = 0 with shrinkage: the shrunk covariance of a small batch is invertible
    y = Whitening(8, eps=0.0, shrinkage=0.5, affine=False)(torch.randn(3, 8))
    assert bool(torch.isfinite(y).all())
