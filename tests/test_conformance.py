"""Every registered neuron model through the same checks.

The tests are parametrized over ``jax_kernels.models.MODELS`` itself, so a newly registered model
is checked without editing this file; what the checks need to know about a model independently of
its implementation (its equations, states covering its closed forms' branches, weight scales at
which small networks spike) is its ``ModelSpec`` in ``tests/model_specs.py``, and a model without
one fails here with a message saying what to add.

(a) Closed forms against a numerical integration (scipy's DOP853, float64) of the model's equations
    as documented: free flow, time to the next spike, flow to the spike, spike reset, input
    response; pseudospike times tend to ``T`` as the end state approaches a spike.
(b) Exact gradients against central finite differences in float64: a ``spiking_layer`` (the shared
    network of ``tests/kernel_stack.py``) and ``SpikingLinear(model=name)`` through torch.
(c) Spike and pseudospike times stay continuous when a spike leaves the trial, where the model
    claims it: an output spike for models with pseudodynamics; a hidden spike (a removed input
    event of the next layer) only where input pulses compose additively.
(d) ``SpikingRecurrent(model=name)`` against finite differences (every model has an event-driven
    next-spike time, which is all the recurrent simulator needs).
(e) Layer by layer (``spiking_layer`` stacked) == the same network as one recurrent network.
"""

import dataclasses
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402
from torch.func import functional_call  # noqa: E402

from conftest import (  # noqa: E402
    INPUT_TIMES,
    RECURRENT_CONFIG,
    assert_close_scaled,
    assert_spikes_robust,
    flow,
    next_spike_dt,
)
from jax_kernels.layers import cotangent_like  # noqa: E402
from jax_kernels.models import MODELS, get_model  # noqa: E402
from kernel_stack import (  # noqa: E402
    B,
    K,
    N,
    T,
    assert_close,
    assert_trees_close,
    layer,
    layer_backward,
    layer_by_layer,
    layer_forward,
    random_problem,
    stack_backward,
    stack_forward,
    whole_network_and_gradients,
)
from model_specs import models_of, spec_of  # noqa: E402
from spike_bridge.nn import SpikingLinear, SpikingRecurrent  # noqa: E402
from spike_bridge.spikes import Spikes  # noqa: E402

NAMES = sorted(MODELS)


def pseudo_model(name):
    """The default model ``name``; a skip, with the model's own reason, without pseudodynamics."""
    model = get_model(name)
    if not model.has_pseudodynamics:
        pytest.skip(f"{type(model).__name__}.has_pseudodynamics is False: no pseudospikes")
    return model


# Jitted model methods: flow and next_spike_dt from conftest.py.
@partial(jax.jit, static_argnums=0)
def receive(model, x, w):
    return model.receive(x, w)


@partial(jax.jit, static_argnums=(0, 4))
def pseudospike_time(model, x_end, drive, k, T):
    return model.pseudospike_time(x_end, drive, k, T)


# --- (a) closed forms against the ODE -------------------------------------------------------------
TOL = 1e-6
#: Spikes later than this (in units of tau) are not looked for by the ODE solver.
HORIZON = 40.0
DT_FRACTIONS = (0.3, 0.7, 0.95)
#: Flows without a spike are checked up to this time.
MAX_FLOW_DT = 3.0


def ode_voltage_and_spike(model, voltage, current, dts):
    """Integrate the model's equations (its ``ModelSpec``) from ``(V, I)``.

    Returns ``V`` and ``I`` at the times ``dts`` (before the first spike) and the first spike time
    (``inf`` if none before ``HORIZON * tau``). Blow-up models are integrated in
    ``theta = arctan(V)``; ``I`` is constant for models without a synaptic current.
    """
    spec, tau = spec_of(model), model.tau
    decay = 2.0 / tau if spec.synaptic else 0.0
    if spec.blows_up:
        def rhs(t, y):  # d arctan(V) / dt = cos^2 dV/dt
            return [np.cos(y[0]) ** 2 * spec.dvdt(model, np.tan(y[0]), y[1]) / tau, -decay * y[1]]

        level, y0, to_voltage = np.pi / 2, [np.arctan(voltage), current], np.tan
    else:
        def rhs(t, y):
            return [spec.dvdt(model, y[0], y[1]) / tau, -decay * y[1]]

        level, y0, to_voltage = model.V_th, [voltage, current], np.asarray

    def threshold(t, y):
        return y[0] - level

    threshold.terminal = True
    threshold.direction = 1
    # A voltage driven by a decaying current can cross a finite threshold and fall back within one
    # solver step, hiding the event; short steps rule that out (after 15 tau it is too small).
    if spec.synaptic and not spec.blows_up:
        max_step, horizon = 0.05 * tau, 15 * tau
    else:
        max_step, horizon = np.inf, HORIZON * tau
    solution = solve_ivp(rhs, (0.0, horizon), y0, method="DOP853", rtol=1e-10, atol=1e-12,
                         events=threshold, dense_output=True, max_step=max_step)
    events = solution.t_events[0]
    spike = events[0] if len(events) else np.inf
    dts = np.asarray(dts)
    assert np.all(dts <= min(spike, horizon))
    trajectory = solution.sol(dts)
    return to_voltage(trajectory[0]), trajectory[1], spike


def currents_of(model, x):
    """Synaptic currents ``[N]`` of states ``[D, N]`` (zeros for models without one)."""
    return np.asarray(x[1]) if spec_of(model).synaptic else np.zeros(x.shape[1])


def ode_spike_times(model, voltages, currents):
    return np.array([ode_voltage_and_spike(model, v, i, [0.0])[2]
                     for v, i in zip(voltages, currents)])


def assert_close_abs(actual, expected, tol=TOL):
    """Agreement to ``tol`` relative to ``max(1, |expected|)``."""
    assert_close_scaled(actual, expected, tol)


def assert_spike_times_match_ode(model, x, voltages, currents):
    spike = np.asarray(next_spike_dt(model, jnp.asarray(x)))
    spike_ode = ode_spike_times(model, voltages, currents)
    assert np.array_equal(np.isinf(spike), np.isinf(spike_ode)), (spike, spike_ode)
    finite = np.isfinite(spike)
    assert_close_abs(spike[finite], spike_ode[finite])
    return spike


@pytest.mark.parametrize("name", NAMES)
def test_flow_and_next_spike_match_ode(name):
    for model in models_of(name):
        spec = spec_of(model)
        x = spec.state_grid(model)
        v0, i0 = spec.voltage(model, x), currents_of(model, x)
        spike = assert_spike_times_match_ode(model, x, v0, i0)
        finite = np.isfinite(spike)
        assert finite.any()
        if not hasattr(model, "period"):  # the grid has states that never spike (oscillators do)
            assert not finite.all()
        # Flows at fractions of the way to the spike (or to MAX_FLOW_DT).
        dts = np.array(DT_FRACTIONS)[None] * np.minimum(spike, MAX_FLOW_DT * model.tau)[:, None]
        references = [ode_voltage_and_spike(model, v, i, dt) for v, i, dt in zip(v0, i0, dts)]
        for j in range(dts.shape[1]):
            flowed = flow(model, jnp.asarray(x), jnp.asarray(dts[:, j]))
            assert_close_abs(spec.voltage(model, flowed), [r[0][j] for r in references])
            assert_close_abs(currents_of(model, flowed), [r[1][j] for r in references])

        # Flowing to the spike reaches the threshold, also for a step rounded just past it
        # (which must not wrap around, e.g. tan past pi/2); the next spike is then due at once.
        xs, spike = jnp.asarray(x[:, finite]), jnp.asarray(spike[finite])
        for dt in (spike, spike * (1 + 1e-13)):
            at_spike = flow(model, xs, dt)
            assert jnp.all(jnp.isfinite(at_spike))
            voltage = spec.voltage(model, at_spike)
            if spec.blows_up:  # V = +-inf (the same point of the phase circle) or a stand-in
                assert_close_abs(1 / voltage, 0.0, 1e-8)
            else:
                assert_close_abs(voltage, spec.threshold(model), 1e-12)
            assert_close_abs(next_spike_dt(model, at_spike), 0.0, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_spike_reset_matches_ode(name):
    """The state after a spike: the reset voltage, the current decayed as in free flow; the next
    spike from there where the ODE started at the reset voltage puts it (for oscillators: after
    one free period)."""
    for model in models_of(name):
        spec = spec_of(model)
        x = jnp.asarray(spec.state_grid(model))
        dt = jnp.full(x.shape[1:], 0.4)
        reset = model.spike_reset(x, dt)
        assert reset.shape == x.shape
        voltage, reset_voltage = spec.voltage(model, reset), spec.reset_voltage(model)
        if np.isinf(reset_voltage):
            assert_close_abs(np.arctan(voltage), -np.pi / 2, 1e-12)
        else:
            assert np.all(voltage == reset_voltage)
        assert_close_abs(currents_of(model, reset), currents_of(model, flow(model, x, dt)), 1e-15)
        # States after a reset differ only in their currents: one ODE solve per distinct state.
        reset = np.unique(np.asarray(reset), axis=1)
        start = np.maximum(spec.voltage(model, reset), -1e12)  # -inf: a finite start
        spike = assert_spike_times_match_ode(model, reset, start, currents_of(model, reset))
        if hasattr(model, "period"):
            assert_close_abs(spike, model.period)


@pytest.mark.parametrize("name", NAMES)
def test_receive_matches_voltage_space_jump(name):
    """An input pulse changes the state as the equations say (``V`` or ``I`` jumps by ``w``), and
    the spike time after it equals that of the ODE started from the jumped state."""
    for model in models_of(name):
        spec = spec_of(model)
        x = spec.state_grid(model)
        weights = np.resize([-1.5, -0.2, 0.3, 2.0], x.shape[1])
        received = receive(model, jnp.asarray(x), jnp.asarray(weights))
        assert received.shape == x.shape
        voltage, current = spec.voltage(model, x), currents_of(model, x)
        if spec.synaptic:
            current = current + weights
        else:
            voltage = voltage + weights
            if spec.saturating:
                voltage = np.minimum(voltage, spec.threshold(model))
        assert_close_abs(spec.voltage(model, received), voltage)
        assert_close_abs(currents_of(model, received), current, 1e-15)
        assert_spike_times_match_ode(model, received, voltage, current)


@pytest.mark.parametrize("name", NAMES)
def test_frozen_hashable_and_static(name):
    for model in models_of(name):
        with pytest.raises(dataclasses.FrozenInstanceError):
            model.tau = 3.0
        assert hash(model) == hash(model.replace()) and model == model.replace()
        x0 = model.default_initial_state(jnp.float64)
        assert x0.shape == (model.state_size,) and x0.dtype == jnp.float64
        assert flow(model, x0[:, None], 0.1).shape == (model.state_size, 1)  # static jit argument


PSEUDO_T = 2.0


@pytest.mark.parametrize("name", NAMES)
def test_pseudospike_time_tends_to_trial_end(name):
    """As the end state approaches an ordinary spike at T, the first pseudospike tends to T.

    Drives: zero, excitatory, and inhibitory unless the model saturates at threshold (an
    inhibitory drive d lowers V(Theta) = V_th, and the first pseudospike tends to
    T + Theta - Phi(V_th + d) > T instead).
    """
    pseudo_model(name)
    for model in models_of(name):
        spec = spec_of(model)
        x = jnp.asarray(spec.state_grid(model))
        spike = next_spike_dt(model, x)
        x, spike = x[:, jnp.isfinite(spike)], spike[jnp.isfinite(spike)]
        # A finite stand-in 1/eps for V = +inf leaves the pseudospike tau eps after T.
        reset = abs(spec.reset_voltage(model))
        limit = 2 * model.tau / reset if spec.blows_up and np.isfinite(reset) else 1e-12
        for drive in (0.0, 0.3) + (() if spec.saturating else (-1.5,)):
            gaps = []
            for delta in (1e-2, 1e-4, 1e-6, 0.0):
                x_end = flow(model, x, spike - delta)
                drives = jnp.full(x.shape[1:], drive)
                gaps.append(pseudospike_time(model, x_end, drives, 1.0, PSEUDO_T) - PSEUDO_T)
            gaps = np.asarray(jnp.stack(gaps))
            assert np.all(gaps >= -1e-12)
            assert np.all(gaps[1:] <= gaps[:-1] + 1e-12)
            assert np.all(gaps[2] <= 1e-5), (drive, gaps[2].max())
            assert np.all(gaps[3] <= limit)


@pytest.mark.parametrize("name", NAMES)
def test_pseudodynamics_shapes_and_ranges(name):
    """Pseudo rates in [0, 1] for states at or above the reset voltage (below it, e.g. an OscLIF
    phase for V < 0, the rate is negative); pseudospikes after T, ascending."""
    pseudo_model(name)
    for model in models_of(name):
        spec = spec_of(model)
        x = jnp.asarray(spec.state_grid(model))
        drive = jnp.linspace(-3.0, 3.0, x.shape[1])
        rate = np.asarray(model.pseudo_rate(x, drive))
        assert rate.shape == x.shape[1:]
        assert np.all(rate <= 1)
        assert np.all(rate[spec.voltage(model, x) >= spec.reset_voltage(model)] >= 0)
        k = jnp.arange(1, 4)[:, None]
        times = model.pseudospike_time(x, drive, k, PSEUDO_T)
        assert times.shape == (3, x.shape[1])
        assert jnp.all(times[0] >= PSEUDO_T) and jnp.all(jnp.diff(times, axis=0) > 0)


# --- (b) gradients of a spiking_layer and a SpikingLinear against finite differences ------------
FD_STEP = 1e-6
FD_RTOL = 1e-6
#: Every output spike is at least this far from the inputs of its sample and from T.
MIN_GAP = 1e-3


def fd_layer_problem(model):
    """The first layer of the shared network (first seed whose spikes are all well separated from
    the inputs and from T, so that no spike enters, leaves or changes order under a step), random
    input pseudo rates and output cotangents."""
    for seed in range(20):
        params, _ = random_problem(model, seed)
        rng = np.random.default_rng(seed)
        args = [np.asarray(params["weights"][0]), np.asarray(params["states"][0]),
                np.asarray(params["input_times"]), rng.uniform(0.0, 1.0, (B, N))]
        out = layer_forward(layer(model), *map(jnp.asarray, args))[0]
        times, count = np.asarray(out.spike_times), np.asarray(out.spike_count)
        if count.max() > K or count.sum() < 10 or (model.has_pseudodynamics and count.min() == K):
            continue
        # (A spike at exactly an input's time was triggered by it: it moves with that input.)
        distances = [np.abs(times[b][np.isfinite(times[b])][:, None]
                            - np.append(args[2][b][args[2][b] < T], T)[None]) for b in range(B)]
        if all(np.all((d >= MIN_GAP) | (d == 0)) for d in distances):
            cotangents = {name: rng.normal(0.0, 1.0, np.shape(getattr(out, name))) for name in
                          ("spike_times", "final_state", "filled_times", "pseudo_rate")}
            return args, cotangents
    raise AssertionError("no well-separated layer among the seeds")


def layer_loss(model, args, cotangents):
    """``sum(c * output)`` over the finite outputs, and the outputs."""
    out = layer_forward(layer(model), *map(jnp.asarray, args))[0]
    loss = 0.0
    for name, c in cotangents.items():
        value = np.asarray(getattr(out, name))
        loss += np.sum(c * np.where(np.isfinite(value), value, 0.0))
    return loss, out


@pytest.mark.parametrize("name", NAMES)
def test_spiking_layer_gradients_match_finite_differences(name):
    model = get_model(name)
    args, cotangents = fd_layer_problem(model)
    _, out = layer_loss(model, args, cotangents)
    count = np.asarray(out.spike_count)
    masked = {name: np.where(np.isfinite(np.asarray(getattr(out, name))), c, 0.0)
              for name, c in cotangents.items()}
    vjp = layer_forward(layer(model), *map(jnp.asarray, args))[1]
    gradients = layer_backward(vjp, cotangent_like(out, **jax.tree.map(jnp.asarray, masked)))
    for index, (what, value) in enumerate(zip(("weights", "state", "times", "rate"), args)):
        grad = np.asarray(gradients[index])
        assert np.all(np.isfinite(grad)), what
        difference = np.zeros_like(value)
        for i in zip(*np.nonzero(np.isfinite(value))):
            losses = []
            for step in (FD_STEP, -FD_STEP):
                perturbed = [a.copy() for a in args]
                perturbed[index][i] += step
                loss, out = layer_loss(model, perturbed, cotangents)
                np.testing.assert_array_equal(out.spike_count, count)  # no spike entered/left
                losses.append(loss)
            difference[i] = (losses[0] - losses[1]) / (2 * FD_STEP)
        error = np.abs(grad - difference) / np.maximum(np.abs(difference), 1.0)
        assert error.max() <= FD_RTOL, (what, error.max())
        if what != "rate" or model.has_pseudodynamics:  # every parameter group reaches the loss
            assert np.any(grad != 0), what


@pytest.mark.parametrize("name", NAMES)
def test_spiking_linear_gradcheck(name):
    """``SpikingLinear(model=name)`` through the torch bridge: weights, initial states and input
    times against torch's central differences (float64)."""
    model_type = MODELS[name]
    assert SpikingLinear(4, 3, model=model_type(), T=2.0).model == model_type()  # or an instance
    torch.manual_seed(0)
    layer_module = SpikingLinear(4, 3, model=name, T=2.0, max_spikes=3).double()
    assert isinstance(layer_module.model, model_type)
    with torch.no_grad():
        layer_module.weight.uniform_(*spec_of(name).torch_weights)

    def f(weight, initial_state, times):
        out = functional_call(layer_module, {"weight": weight, "initial_state": initial_state},
                              (Spikes(times, 2.0),))
        if out.filled_times is None:  # no pseudospikes
            return torch.where(torch.isfinite(out.times), out.times, 0), out
        # one output tensor: one gradient pattern, so one backward compile
        return torch.cat([out.filled_times.flatten(), out.pseudo_rate.flatten()]), out

    args = [t.detach().clone().requires_grad_() for t in
            (layer_module.weight, layer_module.initial_state, INPUT_TIMES)]
    assert_spikes_robust(f(*args)[1].detach(), INPUT_TIMES, 2.0)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[0], args)


# --- (c) continuity when a spike leaves the trial ----------------------------------------------
SWEEP_STEP = 1e-7
SWEEP_HALF = 5  # points on each side of the crossing
MAX_JUMP = 1e-6
MAX_GRADIENT = 100.0


def pulses_compose_additively(model):
    """Whether two input pulses equal one of their summed weight, ``receive(receive(x, a), b) ==
    receive(x, a + b)``, on the model's state grid (for weights that saturate a threshold not)."""
    x = jnp.asarray(spec_of(model).state_grid(model))
    for a, b in [(2.0, -1.5), (-1.5, 2.0), (0.3, -0.2), (3.0, -3.0)]:
        wa, wb = jnp.full(x.shape[1:], a), jnp.full(x.shape[1:], b)
        twice = receive(model, receive(model, x, wa), wb)
        once = receive(model, x, wa + wb)
        if not np.allclose(np.asarray(twice), np.asarray(once), rtol=1e-9, atol=1e-9):
            return False
    return True


def max_jump(values):
    """Largest change between neighbouring sweep points (axis 0); ``inf`` if a value turns inf."""
    values = np.asarray(values)
    same = values[1:] == values[:-1]  # also inf == inf
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(values[1:] - values[:-1]))))


def with_weight(params, l, i, j, value):
    weights = list(params["weights"])
    weights[l] = weights[l].at[i, j].set(value)
    return {**params, "weights": tuple(weights)}


def continuity_problem(model):
    """The 2-layer stack (the first two layers of the shared problem)."""
    params, _ = random_problem(model)
    # no input spikes late in the trial: leaves a path to T for hidden spikes of OscLIF neurons
    times = jnp.where(params["input_times"] > 0.8 * T, T + 0.5, params["input_times"])
    params = {"weights": params["weights"][:2], "states": params["states"][:2],
              "input_times": times}
    rng = np.random.default_rng(3)
    output_coefficients = jnp.asarray(rng.normal(0.0, 1.0, (B, N, K)))
    return params, output_coefficients


def monitored_gradient(model, params, l, spike, output_coefficients):
    """Outputs and gradient w.r.t. ``weights[l]`` of ``P = filled[l][spike] + c . filled[-1]``."""
    outs, vjps = stack_forward(model, params)
    one_hot = jnp.zeros((B, N, K)).at[spike].set(1.0)
    cotangents = [{} for _ in outs]
    cotangents[-1]["filled_times"] = output_coefficients
    cotangents[l]["filled_times"] = cotangents[l].get("filled_times", 0.0) + one_hot
    grads = stack_backward(outs, vjps, cotangents)
    value = outs[l].filled_times[spike] + jnp.sum(output_coefficients * outs[-1].filled_times)
    return outs, float(value), np.asarray(grads["weights"][l])


def spike_count_at(model, params, l, spike):
    outs, _ = stack_forward(model, params)
    return int(outs[l].spike_count[spike[:2]])


def crossings(model, params, l):
    """Candidates ``(spike, j, sign, distance)``: a late last spike of layer ``l``, an input
    weight ``j`` of its neuron, the sign of a change that delays the spike, and the linearised
    size of the change that brings it to ``T``."""
    outs, _ = stack_forward(model, params)
    counts, times = np.asarray(outs[l].spike_count), np.asarray(outs[l].spike_times)
    spikes = [(b, i, int(counts[b, i]) - 1) for b in range(B) for i in range(N) if counts[b, i]]
    for spike in sorted(spikes, key=lambda s: -times[s])[:6]:
        _, _, grad = monitored_gradient(model, params, l, spike, jnp.zeros((B, N, K)))
        i = spike[1]
        for j in np.argsort(-np.abs(grad[i]))[:4]:
            if grad[i, j] != 0:  # weight change that would bring the spike to T, linearised
                yield spike, int(j), np.sign(grad[i, j]), (T - times[spike]) / abs(grad[i, j])


def bisect_crossing(model, params, l, spike, j, direction, distance):
    """Weight offsets ``lo < hi`` (1e-13 apart) where the count of ``spike``'s neuron drops."""
    i, count = spike[1], spike[2] + 1
    w0 = float(params["weights"][l][i, j])

    def count_at(a):
        return spike_count_at(model, with_weight(params, l, i, j, w0 + direction * a), l, spike)

    lo, hi = 0.0, 2.0 * distance
    while count_at(hi) >= count:
        lo, hi = hi, 2.0 * hi
        if hi > 10.0:
            return None
    if count_at(hi) != count - 1:
        return None
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if count_at(mid) >= count:
            lo = mid
        else:
            hi = mid
    return lo, hi


def leaving_spike(model, params, l):
    """A spike of layer ``l`` and a weight whose change moves it out through ``T``, bisected.

    The count can also drop inside the trial for OscLIF (finite reset): a spike that meets an
    input at the same time jumps, a property of the model that pseudospikes do not (and need not)
    bridge. Such crossings are skipped: the spike must reach ``T``.
    """
    for spike, j, direction, distance in crossings(model, params, l):
        bracket = bisect_crossing(model, params, l, spike, j, direction, distance)
        if bracket is None:
            continue
        lo = bracket[0]
        w = float(params["weights"][l][spike[1], j]) + direction * lo
        outs, _ = stack_forward(model, with_weight(params, l, spike[1], j, w))
        if T - float(outs[l].spike_times[spike]) < 1e-9:
            return spike, j, direction, bracket
    raise AssertionError("no spike leaves through T")


# A hidden spike leaving removes an input event of the next layer; pseudodynamics bridge that
# exactly only where input pulses compose additively, H(H(phi, w), d - w) = H(phi, d). The
# oscillatory LIF's transfer function saturates at threshold, so its hidden-spike case is not
# continuous (in the reference's formulation either) and is not claimed.
@pytest.mark.parametrize("l", [1, 0], ids=["output_spike", "hidden_spike"])
@pytest.mark.parametrize("name", NAMES)
def test_spike_times_continuous_when_a_spike_leaves(name, l):
    model = pseudo_model(name)
    if l == 0 and not pulses_compose_additively(model):
        pytest.skip(f"{type(model).__name__}: input pulses do not compose additively "
                    "(receive(receive(x, a), b) != receive(x, a + b)), so a hidden spike "
                    "leaving the trial is not bridged")
    params, output_coefficients = continuity_problem(model)
    spike, j, direction, (lo, hi) = leaving_spike(model, params, l)
    b, i, slot = spike
    count = slot + 1
    w0 = float(params["weights"][l][i, j])

    def at(a):  # the network with weights[l][i, j] moved by a in the delaying direction
        return with_weight(params, l, i, j, w0 + direction * a)

    offsets = np.arange(-SWEEP_HALF, SWEEP_HALF + 1) * SWEEP_STEP
    # neighbours 1e-7 apart; the last point with the spike is lo, the first without it hi + 1e-7
    sweep = np.where(offsets <= 0, lo + offsets, hi + offsets)
    filled, ordinary, counts, finals, values, grads = [], [], [], [], [], []
    for a in sweep:
        outs, value, grad = monitored_gradient(model, at(a), l, spike, output_coefficients)
        filled.append(np.concatenate([np.asarray(o.filled_times) for o in outs]))
        ordinary.append(np.asarray(outs[l].spike_times[spike]))
        counts.append(int(outs[l].spike_count[b, i]))
        finals.append(np.asarray(outs[-1].final_state[b]))
        values.append(value)
        grads.append(direction * grad[i, j])
    filled, ordinary, values, grads = map(np.asarray, (filled, ordinary, values, grads))
    inside, outside = slice(0, SWEEP_HALF + 1), slice(SWEEP_HALF + 1, None)

    # the spike really leaves: ordinary count and time change, the next layer's inputs change
    assert counts[: SWEEP_HALF + 1] == [count] * (SWEEP_HALF + 1)
    assert counts[SWEEP_HALF + 1 :] == [count - 1] * SWEEP_HALF
    assert np.all(ordinary[inside] < T) and np.all(np.isinf(ordinary[outside]))
    assert T - ordinary[SWEEP_HALF] < 1e-9
    assert max_jump(ordinary) == np.inf  # the sweep detects a discontinuity
    assert max_jump(finals) > 1e-3, "ordinary end states jump (so pseudodynamics must bridge)"
    # pseudospike-filled times are continuous, the monitored one passes through T
    monitored = filled[:, l * B + b, i, slot]
    assert max_jump(monitored) <= MAX_JUMP, f"monitored slot jumps by {max_jump(monitored):.7g}"
    assert np.all(np.abs(monitored[SWEEP_HALF : SWEEP_HALF + 2] - T) < MAX_JUMP)
    jumps = np.max(np.where(filled[1:] == filled[:-1], 0, np.abs(np.diff(filled, axis=0))), axis=0)
    worst = np.argwhere(jumps > MAX_JUMP)
    worst = tuple(worst[np.argmin(worst[:, 2])]) if len(worst) else (0, 0, 0)  # lowest slot
    assert jumps.max() <= MAX_JUMP, (  # every slot of every neuron, both layers
        f"filled time (layer {worst[0] // B}, sample {worst[0] % B}, neuron {worst[1]}, slot"
        f" {worst[2]}) jumps by {jumps[worst]:.7g}; monitored: layer {l}, {spike}"
    )
    # gradients are finite, bounded and match the sweep's differences on either side
    assert np.all(np.isfinite(grads)) and np.all(np.abs(grads) < MAX_GRADIENT)
    for side in (inside, outside):
        v, g = values[side], grads[side]
        differences = (v[2:] - v[:-2]) / (2 * SWEEP_STEP)
        np.testing.assert_allclose(differences, g[1:-1], rtol=1e-4, atol=1e-4)


# --- (d) SpikingRecurrent against finite differences -------------------------------------------
REC_T = RECURRENT_CONFIG["T"]


@pytest.mark.parametrize("name", NAMES)
def test_spiking_recurrent_gradcheck(name):
    """``SpikingRecurrent(model=name)``: recurrent and input weights, initial states and input
    times against torch's central differences (float64)."""
    torch.manual_seed(0)
    rec = SpikingRecurrent(4, 3, model=name, **RECURRENT_CONFIG).double()
    assert isinstance(rec.model, MODELS[name])
    low, high, scale = spec_of(name).recurrent_weights
    with torch.no_grad():
        rec.input_weight.uniform_(low, high)
        rec.recurrent_weight.mul_(scale)

    def f(recurrent_weight, input_weight, initial_state, times):
        return functional_call(
            rec, {"recurrent_weight": recurrent_weight, "input_weight": input_weight,
                  "initial_state": initial_state}, (Spikes(times, REC_T),))

    args = [t.detach().clone().requires_grad_() for t in
            (rec.recurrent_weight, rec.input_weight, rec.initial_state, INPUT_TIMES)]
    assert_spikes_robust(f(*args).detach(), INPUT_TIMES, REC_T)

    def output(*a):
        out = f(*a)
        return out.filled_times if out.filled_times is not None else torch.where(
            torch.isfinite(out.times), out.times, 0)

    assert torch.autograd.gradcheck(output, args)


# --- (e) layer by layer == whole network ---------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_layer_by_layer_equals_whole_network(name):
    for model in [get_model(name), *spec_of(name).layer_variants]:
        params, coefficients = random_problem(model)
        layers, layer_grads = layer_by_layer(model, params, coefficients)
        whole, whole_grads = whole_network_and_gradients(model, params, coefficients)

        assert np.all(np.asarray(whole["end_time"]) == T)  # enough event steps
        for l, (count, other) in enumerate(zip(layers["counts"], whole["counts"])):
            count = np.asarray(count)
            assert np.all(count.sum(axis=-1) > 0), f"layer {l} is silent in a sample"
            assert np.all(count <= K), "spike buffer overflow"
            np.testing.assert_array_equal(count, np.asarray(other))
        for l, (times, other) in enumerate(zip(layers["times"], whole["times"])):
            assert_close(times, other, 1e-6, f"spike times of layer {l}")
        assert_close(layers["filled"], whole["filled"], 1e-6, "filled spike times")
        if model.has_pseudodynamics:  # output slots with pseudospikes: the pseudo-rate chain
            assert np.any(np.asarray(layers["counts"][-1]) < K)
            assert np.all(np.isfinite(np.asarray(layers["filled"])))
        else:
            for l, (x, other) in enumerate(zip(layers["final"], whole["final"])):
                assert_close(x, other, 1e-6, f"final states of layer {l}")

        for leaf in jax.tree.leaves(layer_grads):
            assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
        assert_trees_close(layer_grads, whole_grads, 1e-6, "gradient")
