"""spike_bridge.optim.AdaBelief against a hand-written numpy version of optax.adabelief."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spike_bridge.optim import AdaBelief


def numpy_adabelief(params, grads_per_step, lrs, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16):
    """optax.adabelief's update equations, step by step, in float64 numpy.

    params: list of arrays; grads_per_step: list (steps) of lists (params) of gradients;
    lrs: learning rate of each step. Returns the parameters after every step.
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    s = [np.zeros_like(p) for p in params]
    trajectory = []
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            s[i] = b2 * s[i] + (1 - b2) * (g - m[i]) ** 2 + eps_root
            m_hat = m[i] / (1 - b1**t)
            s_hat = s[i] / (1 - b2**t)
            params[i] = params[i] - lr * m_hat / (np.sqrt(s_hat) + eps)
        trajectory.append([p.copy() for p in params])
    return trajectory


def random_problem(n_steps, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), ()]
    initial = [rng.normal(size=shape) for shape in shapes]
    grads = [[rng.normal(size=shape) * 10.0 ** rng.integers(-3, 2) for shape in shapes]
             for _ in range(n_steps)]
    return initial, grads


def run_torch(optimizer_factory, initial, grads, scheduler_factory=None):
    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in initial]
    optimizer = optimizer_factory(params)
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    trajectory = []
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append([p.detach().numpy().copy() for p in params])
    return trajectory, params, optimizer, scheduler


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 4e-3, "betas": (0.9, 0.999)},
        {"lr": 0.1, "betas": (0.5, 0.9), "eps": 1e-8, "eps_root": 1e-12},
    ],
)
def test_matches_numpy_equations(kwargs):
    initial, grads = random_problem(n_steps=6)
    trajectory, *_ = run_torch(lambda ps: AdaBelief(ps, **kwargs), initial, grads)
    reference_kwargs = {"b1": kwargs.get("betas", (0.9, 0.999))[0],
                        "b2": kwargs.get("betas", (0.9, 0.999))[1],
                        "eps": kwargs.get("eps", 1e-16), "eps_root": kwargs.get("eps_root", 1e-16)}
    expected = numpy_adabelief(initial, grads, [kwargs.get("lr", 1e-3)] * len(grads),
                               **reference_kwargs)
    for got_step, expected_step in zip(trajectory, expected):
        for got, want in zip(got_step, expected_step):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_float32_close_to_float64_reference():
    initial, grads = random_problem(n_steps=4, seed=1)
    params = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in initial]
    optimizer = AdaBelief(params, lr=4e-3)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = torch.tensor(grad, dtype=torch.float32)
        optimizer.step()
    expected = numpy_adabelief(initial, grads, [4e-3] * len(grads))[-1]
    for got, want in zip(params, expected):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_exponential_decay_scheduler():
    """The reference's schedule lr * exp(-step / decay_steps) via LambdaLR, one step per batch."""
    initial, grads = random_problem(n_steps=7, seed=2)
    lr, decay_steps = 4e-3, 3.0
    trajectory, _, optimizer, _ = run_torch(
        lambda ps: AdaBelief(ps, lr=lr),
        initial,
        grads,
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.exp(-s / decay_steps)),
    )
    lrs = [lr * math.exp(-step / decay_steps) for step in range(len(grads))]
    expected = numpy_adabelief(initial, grads, lrs)
    for got, want in zip(trajectory[-1], expected[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * math.exp(-len(grads) / 3.0))
    # ExponentialLR with gamma = exp(-1 / decay_steps) is the same schedule.
    trajectory_exp, *_ = run_torch(
        lambda ps: AdaBelief(ps, lr=lr),
        initial,
        grads,
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, math.exp(-1 / decay_steps)),
    )
    for got, want in zip(trajectory_exp[-1], expected[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def test_state_dict_round_trip_continues_identically():
    initial, grads = random_problem(n_steps=6, seed=3)

    def make_optimizer(ps):
        return AdaBelief(ps, lr=1e-2)

    def make_scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.exp(-s / 4))

    uninterrupted, *_ = run_torch(make_optimizer, initial, grads, make_scheduler)

    first, params, optimizer, scheduler = run_torch(make_optimizer, initial, grads[:3],
                                                    make_scheduler)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "params": [p.detach().clone() for p in params]}
    saved = torch.load(_round_trip_bytes(saved), weights_only=True)
    state = saved["optimizer"]["state"]
    assert set(state[0]) == {"step", "exp_avg", "exp_avg_var"} and state[0]["step"] == 3

    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    optimizer2 = make_optimizer(resumed)
    scheduler2 = make_scheduler(optimizer2)
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    for step_grads in grads[3:]:
        for param, grad in zip(resumed, step_grads):
            param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer2.step()
        scheduler2.step()
    for got, want in zip(resumed, uninterrupted[-1]):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=0)


def _round_trip_bytes(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_parameters_without_gradient_are_untouched():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    optimizer = AdaBelief([a, b], lr=0.1)
    a.grad = torch.full((3,), 2.0)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in optimizer.state
    assert optimizer.state[a]["step"] == 1
    # First step: m = 0.1 g, s ~ 0.001 (0.9 g)^2 -> m_hat = g, sqrt(s_hat) = 0.9 |g|,
    # so the update is lr / 0.9 * sign(g), whatever the size of g.
    np.testing.assert_allclose(a.detach().numpy(), 1 - 0.1 / 0.9, rtol=1e-6)


def test_parameter_groups_and_zero_grad_closure():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    optimizer = AdaBelief([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])

    def closure():
        optimizer.zero_grad()
        loss = (a - 1).pow(2).sum() + (b - 1).pow(2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert float(loss.detach()) == pytest.approx(4.0)
    np.testing.assert_allclose(a.detach().numpy(), 0.1 / 0.9, rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), 0.01 / 0.9, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.9)}, "betas"),
     ({"eps": -1.0}, "eps"), ({"eps_root": -1e-3}, "eps_root")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaBelief([torch.zeros(1, requires_grad=True)], **kwargs)
