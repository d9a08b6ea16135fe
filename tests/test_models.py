"""Neuron models: parameters, registry, and model-specific properties.

The checks every registered model goes through (closed forms against the ODE, resets, input
responses, pseudodynamics, gradients, continuity) are in tests/test_conformance.py.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from conftest import assert_close_scaled, flow, next_spike_dt  # noqa: E402
from jax_kernels.models import LIF, MODELS, OscLIF, QIF, Theta, get_model  # noqa: E402

TOL = 1e-6


def model_id(model):
    return repr(model)


def assert_close(actual, expected, tol=TOL):
    assert_close_scaled(actual, expected, tol)


# --- model-specific properties ---------------------------------------------------------------
def test_theta_inputs_leave_the_singular_phases_alone():
    model = Theta()
    phases = jnp.array([0.0, 0.0, model.period, model.period])  # V = -inf, +inf
    assert_close(model.phase_transfer(phases, jnp.array([-0.7, 0.7, -0.7, 0.7])), phases, 1e-12)


@pytest.mark.parametrize("model", [QIF(), QIF(tau=2.0)], ids=model_id)
def test_qif_derivatives_at_branch_boundaries(model):
    """Derivatives of flow and spike time equal central differences across I = 0 and
    |V| = sqrt(-I), where the closed forms switch branches."""
    dt, h = 0.4, 1e-6
    states = jnp.array(
        [[-1.0, 0.0], [0.5, 0.0], [2.0, 0.0], [1.0, -1.0], [2.0, -4.0], [-2.0, -4.0], [-1e6, 0.0]]
    )
    jacobian = jax.jit(jax.vmap(jax.jacrev(lambda x, t: model.flow(x, t), argnums=(0, 1))))
    d_state, d_dt = jacobian(states, jnp.full(len(states), dt))
    for axis, e in enumerate(jnp.eye(2)):
        fd = (flow(model, (states + h * e).T, dt) - flow(model, (states - h * e).T, dt)) / (2 * h)
        assert_close(d_state[:, :, axis], fd.T)
    fd = (flow(model, states.T, dt + h) - flow(model, states.T, dt - h)) / (2 * h)
    assert_close(d_dt, fd.T)

    states = jnp.array([[2.0, 0.0], [3.0, 0.0], [1e6, 0.0], [3.0, -1.0], [1.5, 1e-9], [1.5, -1e-9]])
    d_state = jax.jit(jax.vmap(jax.grad(model.next_spike_dt)))(states)
    for axis, e in enumerate(jnp.eye(2)):
        fd = (
            next_spike_dt(model, (states + h * e).T) - next_spike_dt(model, (states - h * e).T)
        ) / (2 * h)
        assert_close(d_state[:, axis], fd)


# --- parameters, registry ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, params, name",
    [
        (Theta, {"tau": 0.0}, "tau"),
        (Theta, {"tau": float("nan")}, "tau"),
        (Theta, {"I0": 0.25}, "I0"),
        (QIF, {"tau": -1.0}, "tau"),
        (QIF, {"eps": 0.0}, "eps"),
        (QIF, {"alpha": 0.0}, "alpha"),
        (QIF, {"alpha": -2.0}, "alpha"),
        (LIF, {"tau": 0.0}, "tau"),
        (LIF, {"V_th": 0.0}, "V_th"),
        (LIF, {"V_th": -1.0}, "V_th"),
        (OscLIF, {"tau": -0.5}, "tau"),
        (OscLIF, {"V_th": 0.0}, "V_th"),
        (OscLIF, {"I0": 1.0}, "I0"),
        (OscLIF, {"I0": 2.0, "V_th": 3.0}, "I0"),
    ],
)
def test_invalid_parameters_raise(cls, params, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**params)
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls().replace(**params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry(name):
    cls = MODELS[name]
    assert name == name.lower() and type(get_model(name)) is cls
    assert get_model(name.upper(), tau=2.0) == cls(tau=2.0)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown neuron model"):
        get_model("hodgkin-huxley")


def test_default_initial_states():
    assert jnp.all(QIF().default_initial_state() == 0)
    assert jnp.all(LIF().default_initial_state() == 0)
    for model in (Theta(), OscLIF()):
        assert model.default_initial_state()[0] == pytest.approx(model.period / 2)
