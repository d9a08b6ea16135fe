"""Neuron models against numerical ODE integration; parameters, registry, pseudodynamics."""

import dataclasses
import itertools
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from jax_kernels.models import (  # noqa: E402
    LIF,
    MODELS,
    OscLIF,
    PhaseOscillatorModel,
    QIF,
    Theta,
    get_model,
)

TOL = 1e-6
#: Spikes later than this (in units of tau) are not looked for by the ODE solver.
HORIZON = 40.0
DT_FRACTIONS = (0.3, 0.7, 0.95)
#: Flows without a spike are checked up to this time.
MAX_FLOW_DT = 3.0

MODEL_VARIANTS = [
    Theta(),
    Theta(tau=0.7, I0=1.1),
    QIF(),
    QIF(tau=2.0),
    LIF(),
    LIF(tau=1.5, V_th=0.8),
    OscLIF(),
    OscLIF(tau=1.3, I0=1.5, V_th=1.1),
]


def model_id(model):
    return repr(model)


# Jitted model methods (eager evaluation of the many small ops would dominate the test time).
@partial(jax.jit, static_argnums=0)
def flow(model, x, dt):
    return model.flow(x, dt)


@partial(jax.jit, static_argnums=0)
def next_spike_dt(model, x):
    return model.next_spike_dt(x)


@partial(jax.jit, static_argnums=0)
def receive(model, x, w):
    return model.receive(x, w)


@partial(jax.jit, static_argnums=(0, 4))
def pseudospike_time(model, x_end, drive, k, T):
    return model.pseudospike_time(x_end, drive, k, T)


# --- reference solutions ------------------------------------------------------------------------
def ode_voltage_and_spike(model, voltage, current, dts):
    """Integrate the model's voltage ODE from ``(V, I)`` (``I`` ignored for phase models).

    Returns ``V`` at the times ``dts`` (before the first spike) and the first spike time (``inf``
    if none before ``HORIZON * tau``). QIF-type blow-ups are integrated in ``theta = arctan(V)``.
    """
    tau = model.tau
    if isinstance(model, (QIF, Theta)):
        constant_current = model.I0 if isinstance(model, Theta) else None

        def rhs(t, y):
            sin, cos = np.sin(y[0]), np.cos(y[0])
            i = constant_current if constant_current is not None else y[1]
            return [(sin**2 - sin * cos + i * cos**2) / tau, -2 * y[1] / tau]

        def threshold(t, y):
            return y[0] - np.pi / 2

        y0 = [np.arctan(voltage), 0.0 if constant_current is not None else current]
        to_voltage = np.tan
    else:
        constant_current = model.I0 if isinstance(model, OscLIF) else None

        def rhs(t, y):
            i = constant_current if constant_current is not None else y[1]
            return [(-y[0] + i) / tau, -2 * y[1] / tau]

        def threshold(t, y):
            return y[0] - model.V_th

        y0 = [voltage, 0.0 if constant_current is not None else current]
        to_voltage = np.asarray

    threshold.terminal = True
    threshold.direction = 1
    # A LIF voltage can cross the threshold and fall back within one solver step, hiding the
    # event; short steps rule that out (and after 15 tau its voltage is too small to spike).
    if isinstance(model, LIF):
        max_step, horizon = 0.05 * tau, 15 * tau
    else:
        max_step, horizon = np.inf, HORIZON * tau
    solution = solve_ivp(
        rhs,
        (0.0, horizon),
        y0,
        method="DOP853",
        rtol=1e-10,
        atol=1e-12,
        events=threshold,
        dense_output=True,
        max_step=max_step,
    )
    events = solution.t_events[0]
    spike = events[0] if len(events) else np.inf
    dts = np.asarray(dts)
    assert np.all(dts <= min(spike, horizon))
    trajectory = solution.sol(dts)
    return to_voltage(trajectory[0]), trajectory[1], spike


def voltage_of(model, x):
    x = np.asarray(x)
    if isinstance(model, PhaseOscillatorModel):
        return np.asarray(model.phase_to_voltage(jnp.asarray(x[0])))
    return x[0]


def state_grid(model):
    """States ``[D, N]`` covering all branches of the model's closed forms."""
    if isinstance(model, QIF):
        voltages = (-1e6, -3.0, -1.0, -0.5, 0.0, 0.3, 1.2, 1.5, 2.0, 4.0)
        currents = (-4.0, -1.0, -0.25, -1e-5, 0.0, 1e-5, 0.5, 2.0, 6.0, 30.0)
        # |V| = sqrt(-I) exactly, on both fixed points (V = 1, I = 0 is left out: the ODE solution
        # drifts off that unstable equilibrium).
        pairs = list(itertools.product(voltages, currents)) + [(1.0, -1.0), (-2.0, -4.0)]
        return np.array(pairs).T
    if isinstance(model, LIF):
        voltages = (-1.0, 0.0, 0.5, 0.99 * model.V_th)
        currents = (-2.0, 0.0, 1.0, 3.0, 4.5, 8.0)
        return np.array(list(itertools.product(voltages, currents))).T
    fractions = np.array([0.02, 0.3, 0.5, 0.8, 0.97])
    phases = fractions * model.period
    if isinstance(model, OscLIF):  # negative phases are negative voltages
        phases = np.concatenate([[-2.0 * model.tau, -0.1 * model.tau], phases])
    return phases[None]


def reference(model, x):
    """Per state: ODE voltages at ``DT_FRACTIONS`` of the first spike (or ``MAX_FLOW_DT``), the
    currents there (two-variable models), the evaluation times and the ODE spike time."""
    voltages, currents, dts, spikes = [], [], [], []
    v0 = voltage_of(model, x)
    for n in range(x.shape[1]):
        i0 = x[1, n] if x.shape[0] == 2 else 0.0
        _, _, spike = ode_voltage_and_spike(model, v0[n], i0, [0.0])
        dt = np.array(DT_FRACTIONS) * min(spike, MAX_FLOW_DT * model.tau)
        v, i, _ = ode_voltage_and_spike(model, v0[n], i0, dt)
        voltages.append(v)
        currents.append(i)
        dts.append(dt)
        spikes.append(spike)
    return np.array(voltages), np.array(currents), np.array(dts), np.array(spikes)


def assert_close(actual, expected, tol=TOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.maximum(1.0, np.abs(expected))
    bad = ~(np.abs(actual - expected) <= tol * scale)
    assert not bad.any(), (
        f"mismatch at {np.argwhere(bad).tolist()}: {actual[bad]} vs {expected[bad]}"
    )


# --- flows and spike times ----------------------------------------------------------------------
@pytest.mark.parametrize("model", MODEL_VARIANTS, ids=model_id)
def test_flow_and_next_spike_match_ode(model):
    x = state_grid(model)
    v_ode, i_ode, dts, spike_ode = reference(model, x)
    x = jnp.asarray(x)

    spike = np.asarray(next_spike_dt(model, x))
    assert np.array_equal(np.isinf(spike), np.isinf(spike_ode)), (spike, spike_ode)
    finite = np.isfinite(spike)
    assert finite.any()
    if not isinstance(model, PhaseOscillatorModel):  # oscillators always spike
        assert not finite.all()
    assert_close(spike[finite], spike_ode[finite])

    for j in range(dts.shape[1]):
        flowed = flow(model, x, jnp.asarray(dts[:, j]))
        assert_close(voltage_of(model, flowed), v_ode[:, j])
        if x.shape[0] == 2:
            assert_close(flowed[1], i_ode[:, j])


@pytest.mark.parametrize("model", MODEL_VARIANTS, ids=model_id)
def test_flow_to_next_spike_reaches_threshold(model):
    x = jnp.asarray(state_grid(model))
    spike = next_spike_dt(model, x)
    finite = jnp.isfinite(spike)
    x, spike = x[:, finite], spike[finite]
    # Also a step rounded just past the spike time must not wrap around (tan past pi/2).
    for dt in (spike, spike * (1 + 1e-13)):
        at_spike = flow(model, x, dt)
        assert jnp.all(jnp.isfinite(at_spike))
        if isinstance(model, QIF):
            assert jnp.all(at_spike[0] == 1 / model.eps)
        elif isinstance(model, LIF):
            assert_close(at_spike[0], model.V_th, 1e-12)
        else:
            assert_close(at_spike[0], model.period, 1e-12)
        assert_close(next_spike_dt(model, at_spike), 0.0, 1e-5)


@pytest.mark.parametrize("model", MODEL_VARIANTS, ids=model_id)
def test_spike_reset(model):
    x = jnp.asarray(state_grid(model))
    dt = jnp.full(x.shape[1:], 0.4)
    reset = model.spike_reset(x, dt)
    assert reset.shape == x.shape
    if isinstance(model, PhaseOscillatorModel):
        assert jnp.all(reset == 0.0)
        return
    expected_voltage = -1 / model.eps if isinstance(model, QIF) else 0.0
    assert jnp.all(reset[0] == expected_voltage)
    assert_close(reset[1], flow(model, x, dt)[1], 1e-15)


@pytest.mark.parametrize("model", MODEL_VARIANTS, ids=model_id)
def test_receive_matches_voltage_space_jump(model):
    """The spike time after an input equals that of the ODE started from the jumped state."""
    x = state_grid(model)
    weights = np.resize([-1.5, -0.2, 0.3, 2.0], x.shape[1])
    received = receive(model, jnp.asarray(x), jnp.asarray(weights))
    assert received.shape == x.shape
    voltage = voltage_of(model, x)
    if isinstance(model, PhaseOscillatorModel):
        jumped_voltage = voltage + weights
        if isinstance(model, OscLIF):
            jumped_voltage = np.minimum(jumped_voltage, model.V_th)
        assert_close(voltage_of(model, received), jumped_voltage)
        jumped_current = np.zeros_like(voltage)
    else:
        jumped_voltage, jumped_current = voltage, x[1] + weights
        assert jnp.all(received[0] == x[0])
        assert_close(received[1], jumped_current, 1e-15)
    spike = np.asarray(next_spike_dt(model, received))
    spike_ode = np.array(
        [
            ode_voltage_and_spike(model, v, i, [0.0])[2]
            for v, i in zip(jumped_voltage, jumped_current)
        ]
    )
    assert np.array_equal(np.isinf(spike), np.isinf(spike_ode))
    finite = np.isfinite(spike)
    assert_close(spike[finite], spike_ode[finite])


def test_theta_inputs_leave_the_singular_phases_alone():
    model = Theta()
    phases = jnp.array([0.0, 0.0, model.period, model.period])  # V = -inf, +inf
    assert_close(model.phase_transfer(phases, jnp.array([-0.7, 0.7, -0.7, 0.7])), phases, 1e-12)


def test_oscillators_spike_at_their_period():
    for model in (Theta(tau=0.7, I0=1.1), OscLIF(tau=1.3, I0=1.5, V_th=1.1)):
        reset_voltage = -1e12 if isinstance(model, Theta) else 0.0
        spike = ode_voltage_and_spike(model, reset_voltage, 0.0, [0.0])[2]
        assert_close(model.period, spike)


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


# --- pseudodynamics -----------------------------------------------------------------------------
T = 2.0


@pytest.mark.parametrize(
    "model, spiking_states, drives",
    [
        (QIF(), [[0.5, 3.0], [2.0, 0.0], [3.0, -1.0]], [-2.0, 0.0, 1.5]),
        (QIF(tau=2.0, alpha=1.0), [[0.5, 3.0], [-1e6, 20.0]], [-5.0, 0.0, 5.0]),
        (Theta(), [[1.0]], [-1.0, 0.0, 1.0]),
        (Theta(tau=0.7, I0=1.1), [[0.5]], [-1.0, 0.5]),
        # Excitatory or zero drive only: an inhibitory drive d lowers V(Theta) = V_th, and the
        # first pseudospike tends to T + Theta - Phi(V_th + d) > T instead.
        (OscLIF(), [[0.5]], [0.0, 0.3]),
        (OscLIF(tau=1.3, I0=1.5, V_th=1.1), [[-1.0]], [0.0, 2.0]),
    ],
    ids=model_id,
)
def test_pseudospike_time_tends_to_trial_end(model, spiking_states, drives):
    """As the end state approaches an ordinary spike at T, the first pseudospike tends to T."""
    x = jnp.asarray(spiking_states).T
    spike = next_spike_dt(model, x)
    assert jnp.all(jnp.isfinite(spike))
    # At the spike itself a QIF neuron's V is 1/eps, not +inf.
    limit = 2 * model.eps * model.tau if isinstance(model, QIF) else 1e-12
    for drive in drives:
        gaps = []
        for delta in (1e-2, 1e-4, 1e-6, 0.0):
            x_end = flow(model, x, spike - delta)
            gaps.append(pseudospike_time(model, x_end, jnp.full(x.shape[1:], drive), 1.0, T) - T)
        gaps = jnp.stack(gaps)
        assert jnp.all(gaps >= -1e-12)
        assert jnp.all(gaps[1:] <= gaps[:-1] + 1e-12)
        assert jnp.all(gaps[2] <= 1e-5)
        assert jnp.all(gaps[3] <= limit)


@pytest.mark.parametrize("model", [QIF(), Theta(), OscLIF()], ids=model_id)
def test_pseudodynamics_shapes_and_ranges(model):
    x = jnp.asarray(state_grid(model))
    drive = jnp.linspace(-3.0, 3.0, x.shape[1])
    rate = model.pseudo_rate(x, drive)
    assert rate.shape == x.shape[1:]
    assert jnp.all(rate <= 1)
    if not isinstance(model, OscLIF):  # an OscLIF phase, hence rate, is negative for V < 0
        assert jnp.all(rate >= 0)
    k = jnp.arange(1, 4)[:, None]
    times = model.pseudospike_time(x, drive, k, T)
    assert times.shape == (3, x.shape[1])
    assert jnp.all(times[0] >= T) and jnp.all(jnp.diff(times, axis=0) > 0)


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


@pytest.mark.parametrize(
    "name, cls", [("theta", Theta), ("qif", QIF), ("lif", LIF), ("osclif", OscLIF)]
)
def test_registry(name, cls):
    assert MODELS[name] is cls
    assert type(get_model(name)) is cls
    assert get_model(name.upper(), tau=2.0) == cls(tau=2.0)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown neuron model"):
        get_model("hodgkin-huxley")


@pytest.mark.parametrize("model", MODEL_VARIANTS, ids=model_id)
def test_frozen_hashable_and_static(model):
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.tau = 3.0
    assert hash(model) == hash(model.replace()) and model == model.replace()
    x0 = model.default_initial_state(jnp.float64)
    assert x0.shape == (model.state_size,) and x0.dtype == jnp.float64
    assert flow(model, x0[:, None], 0.1).shape == (model.state_size, 1)  # a static jit argument


def test_default_initial_states():
    assert jnp.all(QIF().default_initial_state() == 0)
    assert jnp.all(LIF().default_initial_state() == 0)
    for model in (Theta(), OscLIF()):
        assert model.default_initial_state()[0] == pytest.approx(model.period / 2)
