"""Exact gradients of spike times and final states against central finite differences.

For each model and simulator a small random network is drawn (the first seed whose spikes are all
well separated from other events and from the trial end, so that no spike enters, leaves or changes
order under a finite-difference step) and the reverse-mode gradient of a random linear combination
of its spike times, final states and, for pseudo models, pseudospike-filled spike times is compared
with central differences in every parameter.
"""

from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_kernels.models import LIF, OscLIF, QIF, Theta  # noqa: E402
from jax_kernels.models.base import PhaseOscillatorModel  # noqa: E402
from jax_kernels.simulate import (  # noqa: E402
    events_from_spike_trains,
    feedforward_layer,
    filled_spike_times,
    recurrent_network,
)

N_IN, K_IN = 4, 3  # input neurons, spikes per input neuron
N, K = 3, 5  # neurons, spike buffer size per neuron
MAX_EVENTS = N_IN * K_IN + N * K + 1
FD_STEP = 1e-6
RTOL = 1e-6
#: Every output spike is at least this far from other events and from T.
MIN_GAP = 1e-2
MIN_SPIKES = 4
SEEDS = range(50)

#: model -> (trial duration, weight mean, weight spread), chosen for a few spikes per neuron.
SETUPS = {
    Theta(): (4.0, 0.0, 0.6),
    QIF(): (3.0, 1.5, 1.5),
    LIF(): (3.0, 1.0, 1.0),
    OscLIF(): (3.0, -0.05, 0.08),  # mostly inhibitory: inputs that trigger spikes are rare
}


def random_initial_state(model, rng):
    if isinstance(model, PhaseOscillatorModel):
        low = -0.2 if isinstance(model, OscLIF) else 0.05 * model.period
        return rng.uniform(low, 0.95 * model.period, (1, N))
    # V in (-1, 1) resp. (0, 0.9 V_th); I in (0, 3) resp. (0, 3 V_th)
    if isinstance(model, QIF):
        low, high = [[-1.0], [0.0]], [[1.0], [3.0]]
    else:
        low, high = [[0.0], [0.0]], [[0.9 * model.V_th], [3.0 * model.V_th]]
    state = rng.uniform(low, high, (2, N))
    state[1, 0] = 0.0  # the default I = 0, where QIF switches between closed forms
    return state


def random_problem(model, recurrent, seed):
    """Parameters (differentiated) and fixed loss coefficients of a random network."""
    T, weight_mean, weight_spread = SETUPS[model]
    rng = np.random.default_rng(seed)
    input_times = rng.uniform(0.0, T, (N_IN, K_IN))
    # Padding and a spike after the trial end must get zero gradients, not NaN.
    input_times[0, 2] = input_times[1, 1] = np.inf
    input_times[2, 0] = T + 0.5
    params = {
        "input_times": input_times,
        "weights": rng.normal(weight_mean, weight_spread, (N, N_IN)),
        "initial_state": random_initial_state(model, rng),
    }
    if recurrent:
        params["network_weights"] = rng.normal(0.0, weight_spread / 2, (N, N))
    if model.has_pseudodynamics:
        params["drive_offset"] = rng.normal(0.0, 1.0, N)
    coefficients = {
        "spike_times": rng.normal(0.0, 1.0, (N, K)),
        "final_state": rng.normal(0.0, 1.0, (model.state_size, N)),
        "filled": rng.normal(0.0, 1.0, (N, K)),
        "input_rates": rng.uniform(0.0, 1.0, N_IN),
    }
    return jax.tree.map(jnp.asarray, (params, coefficients))


def simulate(model, recurrent, params):
    T = SETUPS[model][0]
    if recurrent:
        result = recurrent_network(
            model,
            params["initial_state"],
            params["network_weights"],
            params["weights"],
            params["input_times"],
            T,
            MAX_EVENTS,
            K,
        )
        return result.spike_times, result.spike_count, result.final_state, result.end_time
    events = events_from_spike_trains(params["input_times"], params["weights"], N_IN * K_IN, T)
    result = feedforward_layer(model, events, params["initial_state"], T, K)
    return result.spike_times, result.spike_count, result.final_state, events.n_dropped


@partial(jax.jit, static_argnums=(0, 1))
def loss_and_outputs(model, recurrent, params, coefficients):
    outputs = simulate(model, recurrent, params)
    spike_times, spike_count, final_state, _ = outputs
    finite_times = jnp.where(jnp.isfinite(spike_times), spike_times, 0.0)
    loss = jnp.sum(coefficients["spike_times"] * finite_times)
    loss += jnp.sum(coefficients["final_state"] * final_state)
    if model.has_pseudodynamics:
        drive = params["weights"] @ coefficients["input_rates"] + params["drive_offset"]
        filled = filled_spike_times(
            model, spike_times, spike_count, final_state, drive, SETUPS[model][0]
        )
        loss += jnp.sum(coefficients["filled"] * filled)
    return loss, outputs


gradient = jax.jit(
    jax.grad(lambda *args: loss_and_outputs(*args)[0], argnums=2), static_argnums=(0, 1)
)


def assert_well_separated(model, recurrent, params, coefficients):
    """The network spikes, and every spike is MIN_GAP away from inputs, other spikes and T."""
    _, outputs = loss_and_outputs(model, recurrent, params, coefficients)
    spike_times, spike_count, final_state, status = map(np.asarray, outputs)
    T = SETUPS[model][0]
    if recurrent:
        assert status == T  # enough event steps
    else:
        assert status == 0  # no input dropped
    assert np.all(spike_count <= K)  # no buffer overflow
    assert spike_count.sum() >= MIN_SPIKES
    assert np.all(np.isfinite(final_state))
    inputs = np.asarray(params["input_times"]).ravel()
    inputs = inputs[inputs < T]
    assert np.min(np.diff(np.sort(inputs))) >= MIN_GAP
    all_spikes = spike_times[np.isfinite(spike_times)]
    for neuron in range(N):
        own = spike_times[neuron, : spike_count[neuron]]
        # In a layer only inputs and the neuron's own spikes interact.
        others = all_spikes if recurrent else own
        for t in own:
            neighbours = np.concatenate([inputs, others[others != t], [T]])
            assert np.min(np.abs(neighbours - t)) >= MIN_GAP


def is_well_separated(*problem):
    try:
        assert_well_separated(*problem)
    except AssertionError:
        return False
    return True


def central_differences(model, recurrent, params, coefficients):
    """Central differences of the loss in every parameter, and the spike counts of all runs."""
    differences, counts = {}, []
    for name, value in params.items():
        value = np.asarray(value)
        differences[name] = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            losses = []
            for step in (FD_STEP, -FD_STEP):
                perturbed = value.copy()
                perturbed[index] += step
                loss, outputs = loss_and_outputs(
                    model, recurrent, {**params, name: perturbed}, coefficients
                )
                losses.append(float(loss))
                counts.append(np.asarray(outputs[1]))
            differences[name][index] = (losses[0] - losses[1]) / (2 * FD_STEP)
    return differences, counts


@pytest.mark.parametrize("recurrent", [False, True], ids=["feedforward", "recurrent"])
@pytest.mark.parametrize("model", list(SETUPS), ids=repr)
def test_gradients_match_finite_differences(model, recurrent):
    problems = (random_problem(model, recurrent, seed) for seed in SEEDS)
    problem = next((p for p in problems if is_well_separated(model, recurrent, *p)), None)
    assert problem is not None, "no well-separated network among the seeds"
    params, coefficients = problem
    assert_well_separated(model, recurrent, params, coefficients)
    spike_count = np.asarray(loss_and_outputs(model, recurrent, params, coefficients)[1][1])
    if model.has_pseudodynamics:  # some slots are filled with pseudospikes
        assert np.any(spike_count < K)

    differences, counts = central_differences(model, recurrent, params, coefficients)
    for count in counts:  # no spike entered or left under the steps
        assert np.array_equal(count, spike_count)
    gradients = gradient(model, recurrent, params, coefficients)
    for name, difference in differences.items():
        grad = np.asarray(gradients[name])
        assert np.all(np.isfinite(grad)), name
        error = np.abs(grad - difference) / np.maximum(np.abs(difference), 1.0)
        assert error.max() <= RTOL, (name, error.max(), grad, difference)
        # Every parameter group reaches the loss (padded and late input spikes excepted).
        assert np.any(grad != 0), name
