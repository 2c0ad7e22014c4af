"""The penalties experiment's verdicts and measurements, on synthetic numbers and tiny models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from steepest.experiments import penalties as E


def test_inequality_verdict():
    assert E.inequality_verdict(0, 16000) == "held"
    assert E.inequality_verdict(1, 16000) == "not held"
    assert E.inequality_verdict(0, 0) == "not measured"


def test_constancy_verdict_states_its_scope():
    assert E.constancy_verdict({"whole run": [1.5, 1.9, 1.2], "late": [1.1, 1.2, 1.1]}) == "held"
    # the audit's case: 7.97× over the run from step 0, 1.12–1.45× after the transient
    assert E.constancy_verdict({"whole run": [7.97, 8.5, 6.0], "late": [1.12, 1.45, 1.3]}) == "partly held"
    assert E.constancy_verdict({"whole run": [7.97, 8.5, 6.0], "late": [2.5, 1.9, 3.0]}) == "partly held"
    assert E.constancy_verdict({"whole run": [7.97, 8.5, 6.0], "late": [2.5, 2.0, 3.0]}) == "not held"  # 2× is not
    assert E.constancy_verdict({"whole run": [1.5], "late": [1.1]}) == "not measured"  # one run
    assert E.constancy_verdict({}) == "not measured"


def test_window_spreads_leave_the_transient_out_of_the_late_window():
    steps = list(range(0, 1001, 100))
    mult = [8.0, 4.0, 2.0, 1.3, 1.25, 1.2, 1.2, 1.15, 1.1, 1.12, 1.1]
    hist = {"step": steps, "mult": mult, "gx2": [10.0 / m for m in mult], "rhs": [10.0] * len(steps),
            "h": [[1.0, 2.0]] * len(steps), "W": [[1.0, 1.0]] * len(steps), "J": [[1.0, 1.0]] * len(steps)}
    whole = E.window_spreads(hist, *E.WINDOWS["whole run"])
    late = E.window_spreads(hist, *E.WINDOWS["late"])
    early = E.window_spreads(hist, *E.WINDOWS["early"])
    assert math.isclose(whole["multiplier"], 8.0 / 1.1) and (whole["from_step"], whole["to_step"]) == (0, 1000)
    assert math.isclose(early["multiplier"], 4.0) and early["to_step"] == 200  # steps 0, 100, 200
    assert math.isclose(late["multiplier"], 1.2 / 1.1) and late["from_step"] == 500
    assert math.isclose(late["ratio"], 1.2 / 1.1) and late["factors"] == 1.0


def test_per_example_parameter_penalty_equals_per_example_autograd():
    """‖∇_θ ℓ_i‖² for every example (what the inequality bounds), and its gradient, against torch.func."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    params = dict(model.named_parameters())

    def loss_i(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    def per_example(p):
        g = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(p, x, y)
        return sum(v.pow(2).flatten(1).sum(1) for v in g.values())

    ell, pen = E.per_example_param_penalty(model, x, y)
    assert torch.allclose(pen, per_example(params), rtol=1e-12, atol=1e-14)
    assert torch.allclose(ell, F.cross_entropy(model(x), y, reduction="none"))
    ref = torch.func.grad(lambda p: per_example(p).mean())(params)
    got = torch.autograd.grad(pen.mean(), list(model.parameters()), retain_graph=True)
    for g, (name, r) in zip(got, ref.items()):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-13), name
    # it is not the batch-mean ‖∇_θ L‖² the experiment used to train
    batch = sum(g.pow(2).sum() for g in torch.autograd.grad(ell.mean(), list(model.parameters())))
    assert float(pen.mean().detach()) > 1.5 * float(batch.detach())


def test_penalty_steps_take_their_lambda():
    torch.manual_seed(0)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for method in E.METHODS:
        grads = []
        for lam in (0.0, 1.0):
            model = E._digits_mlp(0, 16)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no move: the gradients are what is compared
            E._step_fn(method, lam, model, opt)(x, y)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert torch.isfinite(grads[1]).all(), method
        if method == "none":
            assert torch.equal(grads[0], grads[1])
        else:
            assert not torch.allclose(grads[0], grads[1]), method
    assert set(E.SWEPT) | set(E.LAMBDA_OF) | {"none"} == set(E.METHODS)
