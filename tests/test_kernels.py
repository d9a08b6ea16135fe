"""Simulation kernels against each other.

1. layer by layer (``spiking_layer`` stacked) == the whole network as one recurrent network,
2. the theta fast layer path == the generic phase path,
3. fused input bins == separate input events,
4. spike times stay continuous when a spike leaves the trial (pseudospikes),
5. buffer overflows are reported, and only then,
6. float32 agrees with float64.

Every comparison is checked to be non-vacuous (spikes in every layer, several spikes per neuron,
ties, spikes that really leave the trial).

Compile time dominates on CPU, so all layers have the same shapes (``N`` inputs and neurons, ``K``
spike slots): one compiled layer (forward with VJP, and its backward) serves every layer, model and
test. Gradients of a stack are chained through the layer VJPs, as the PyTorch bridge does.
"""

from functools import cache, partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_kernels.layers import (  # noqa: E402
    binned_spiking_layer,
    block_feedforward_network,
    cotangent_like,
    recurrent_spiking_network,
    spiking_layer,
)
from jax_kernels.models import LIF, OscLIF, QIF, Theta  # noqa: E402
from jax_kernels.models.base import PhaseOscillatorModel  # noqa: E402

N = 8  # inputs and neurons of every layer
N_LAYERS = 3
K = 6  # spike slots per neuron (outputs), and per input neuron
N_REAL = 3  # input spikes per input neuron inside the trial; then one after T, then padding
B = 3  # samples
T = 3.0
EVENTS = N * K  # input event buffer of every layer: all input slots
NETWORK_EVENTS = N * K + N_LAYERS * N * K + 1  # every input and network spike, then T
#: The LLVM backend's optimisation level only changes compile time (XLA CPU keeps IEEE semantics).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

#: model -> (weight mean, weight spread, seed): spikes in every layer of every sample, no overflow.
SETUPS = {
    Theta(): (0.0, 0.6, 0),  # period pi > T: the fast layer path
    Theta(tau=0.5): (0.0, 0.6, 0),  # period pi/2 < T: the generic phase path
    QIF(): (2.0, 1.5, 0),
    OscLIF(): (-0.02, 0.08, 0),
    LIF(): (0.6, 0.5, 0),
}


class GenericTheta(Theta):
    """Theta neuron without the fast layer path: ``feedforward_layer`` uses the phase scan."""

    def layer_simulator(self, T):
        return None


def model_id(model):
    return repr(model)


def jit(fun=None, **kwargs):
    if fun is None:
        return partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=COMPILER_OPTIONS, **kwargs)


# --- problems -------------------------------------------------------------------------------------
def random_input_times(rng, n_real=N_REAL):
    """``[B, N, K]``: ``n_real`` spikes in the trial per input, one after ``T``, then padding."""
    times = np.full((B, N, K), np.inf)
    times[:, :, :n_real] = rng.uniform(0.0, T, (B, N, n_real))
    times[:, :, n_real] = T + 0.5  # not an event, zero (not NaN) gradient
    return times


def random_states(model, rng, low=0.1, high=0.9):
    if isinstance(model, PhaseOscillatorModel):
        return rng.uniform(low * model.period, high * model.period, (1, N))
    if isinstance(model, QIF):
        return rng.uniform([[-0.5], [0.0]], [[0.5], [1.0]], (2, N))
    return rng.uniform([[0.0], [0.0]], [[0.5], [1.0]], (2, N))


def random_problem(model):
    """Parameters of an ``N``-``N``-``N``-``N`` network and random projection coefficients."""
    mean, spread, seed = SETUPS[model]
    rng = np.random.default_rng(seed)
    params = {
        "weights": tuple(
            rng.normal(mean, spread, (N, N)) / np.sqrt(N / 4) for _ in range(N_LAYERS)
        ),
        "states": tuple(random_states(model, rng) for _ in range(N_LAYERS)),
        "input_times": random_input_times(rng),
    }
    coefficients = {
        "times": tuple(rng.normal(0.0, 1.0, (B, N, K)) for _ in range(N_LAYERS)),
        "filled": rng.normal(0.0, 1.0, (B, N, K)),
        "final": tuple(rng.normal(0.0, 1.0, (B, model.state_size, N)) for _ in range(N_LAYERS)),
    }
    return jax.tree.map(jnp.asarray, (params, coefficients))


# --- layer by layer -------------------------------------------------------------------------------
@cache
def layer(model, max_spikes=K, max_events=EVENTS):
    return partial(spiking_layer, model=model, T=T, max_events=max_events, max_spikes=max_spikes)


@jit(static_argnums=0)
def layer_forward(layer_fn, weights, state, times, rate):
    """Outputs of one layer and its VJP (a pytree of residuals)."""
    return jax.vjp(layer_fn, weights, state, times, rate)


@jit
def layer_backward(vjp, cotangent):
    return vjp(cotangent)


@jit(static_argnums=0)
def layer_only(layer_fn, weights, state, times, rate):
    return layer_fn(weights, state, times, rate)


def finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def stack_forward(model, params):
    """``spiking_layer`` stacked: ordinary spike times and pseudo rates are passed on."""
    times = params["input_times"]
    rate = jnp.zeros(times.shape[:2], times.dtype)
    outputs, vjps = [], []
    for weights, state in zip(params["weights"], params["states"]):
        out, vjp = layer_forward(layer(model), weights, state, times, rate)
        outputs.append(out)
        vjps.append(vjp)
        times, rate = out.spike_times, out.pseudo_rate
    return outputs, vjps


def stack_backward(outputs, vjps, cotangents):
    """Gradients w.r.t. weights, states and input times, from per-layer output cotangents."""
    weights, states = [None] * len(vjps), [None] * len(vjps)
    passed = {}
    for l in reversed(range(len(vjps))):
        cotangent = dict(cotangents[l])
        if passed:  # what the next layer sends back through its inputs
            cotangent["spike_times"] = cotangent.get("spike_times", 0.0) + passed["spike_times"]
            cotangent["pseudo_rate"] = passed["pseudo_rate"]
        weights[l], states[l], times, rate = layer_backward(
            vjps[l], cotangent_like(outputs[l], **cotangent)
        )
        passed = {"spike_times": times, "pseudo_rate": rate}
    return {
        "weights": tuple(weights), "states": tuple(states), "input_times": passed["spike_times"]
    }


def projection_cotangents(model, outputs, coefficients):
    """Per-layer cotangents of the projection ``loss`` below (the layer-by-layer side)."""
    cotangents = []
    for l, out in enumerate(outputs):
        finite_slots = jnp.isfinite(out.spike_times)
        ct = {"spike_times": jnp.where(finite_slots, coefficients["times"][l], 0.0)}
        if not model.has_pseudodynamics:
            ct["final_state"] = coefficients["final"][l]
        cotangents.append(ct)
    cotangents[-1]["filled_times"] = coefficients["filled"]
    return cotangents


def projection(model, outputs, coefficients):
    """A random linear combination of the (finite) outputs both simulators return."""
    loss = sum(jnp.sum(c * finite(t)) for c, t in zip(coefficients["times"], outputs["times"]))
    loss += jnp.sum(coefficients["filled"] * finite(outputs["filled"]))
    if not model.has_pseudodynamics:
        loss += sum(jnp.sum(c * x) for c, x in zip(coefficients["final"], outputs["final"]))
    return loss


def layer_by_layer(model, params, coefficients):
    outs, vjps = stack_forward(model, params)
    grads = stack_backward(outs, vjps, projection_cotangents(model, outs, coefficients))
    outputs = {
        "times": tuple(o.spike_times for o in outs),
        "counts": tuple(o.spike_count for o in outs),
        "final": tuple(o.final_state for o in outs),
        "filled": outs[-1].filled_times,
    }
    return outputs, grads


# --- whole network --------------------------------------------------------------------------------
def split_layers(x, axis=-1):
    return tuple(jnp.split(x, N_LAYERS, axis=axis))


def whole_network(model, params):
    """All layers as one network: ``block_feedforward_network`` (pseudo models) or
    ``recurrent_spiking_network`` with a block matrix built here (LIF; final states too)."""
    if model.has_pseudodynamics:
        filled, counts, end_time, times = block_feedforward_network(
            params["weights"], params["states"], params["input_times"],
            model=model, T=T, max_events=NETWORK_EVENTS, max_spikes=K,
        )
        return {"times": tuple(times), "counts": split_layers(counts), "filled": filled,
                "end_time": end_time}
    n = N * N_LAYERS
    network = jnp.zeros((n, n))
    for l in range(1, N_LAYERS):
        network = network.at[l * N : (l + 1) * N, (l - 1) * N : l * N].set(params["weights"][l])
    inputs = jnp.zeros((n, N)).at[:N].set(params["weights"][0])
    out = recurrent_spiking_network(
        network, inputs, jnp.concatenate(params["states"], axis=-1), params["input_times"],
        model=model, T=T, max_events=NETWORK_EVENTS, max_spikes=K,
    )
    times = split_layers(out.spike_times, axis=1)
    return {"times": times, "counts": split_layers(out.spike_count),
            "final": split_layers(out.final_state), "filled": times[-1], "end_time": out.end_time}


@jit(static_argnums=0)
def whole_network_and_gradients(model, params, coefficients):
    def loss(params):
        outputs = whole_network(model, params)
        return projection(model, outputs, coefficients), outputs

    (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return outputs, grads


@jit(static_argnums=(0, 1))
def whole_network_forward(model, max_events, params):
    return block_feedforward_network(
        params["weights"], params["states"], params["input_times"],
        model=model, T=T, max_events=max_events, max_spikes=K,
    )


# --- comparison -----------------------------------------------------------------------------------
def assert_close(actual, expected, rtol, what=""):
    """Same ``inf`` pattern, no NaN; finite entries agree to ``rtol`` relative to their magnitude
    (floored at 1e-3 of the array's largest entry, for entries that cancel to almost zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert not np.any(np.isnan(actual)) and not np.any(np.isnan(expected)), f"{what}: NaN"
    assert np.array_equal(np.isfinite(actual), np.isfinite(expected)), f"{what}: inf pattern"
    ok = np.isfinite(expected)
    if not ok.any():
        return
    floor = max(1e-3 * np.max(np.abs(expected[ok])), 1e-300)
    error = np.abs(actual[ok] - expected[ok]) / np.maximum(np.abs(expected[ok]), floor)
    assert error.max() <= rtol, f"{what}: relative error {error.max():.3g} > {rtol:.1g}"


def assert_trees_close(actual, expected, rtol, what=""):
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        name = what + jax.tree_util.keystr(path)
        other = actual
        for key in path:
            other = other[getattr(key, "key", getattr(key, "idx", None))]
        assert_close(other, leaf, rtol, name)


# --- 1. layer by layer == whole network -----------------------------------------------------------
@pytest.mark.parametrize("model", list(SETUPS), ids=model_id)
def test_layer_by_layer_equals_whole_network(model):
    if isinstance(model, Theta):  # the fast layer path exactly when T < period
        assert (model.layer_simulator(T) is None) == (T > model.period)
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
    if model.has_pseudodynamics:  # output slots with pseudospikes: the pseudo-rate chain counts
        assert np.any(np.asarray(layers["counts"][-1]) < K)
        assert np.all(np.isfinite(np.asarray(layers["filled"])))
    else:
        for l, (x, other) in enumerate(zip(layers["final"], whole["final"])):
            assert_close(x, other, 1e-6, f"final states of layer {l}")

    for leaf in jax.tree.leaves(layer_grads):
        assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
    assert_trees_close(layer_grads, whole_grads, 1e-6, "gradient")


UNEQUAL_SIZES = (12, 8, 6, 4)  # inputs, hidden, hidden, outputs


def test_layer_by_layer_equals_whole_network_unequal_sizes():
    """Non-square weight blocks (forward only, theta fast path): blocks placed by layer sizes."""
    model, sizes = Theta(), UNEQUAL_SIZES
    rng = np.random.default_rng(4)
    times = jnp.asarray(rng.uniform(0.0, T, (B, sizes[0], N_REAL)))
    params = {
        "weights": tuple(rng.normal(0.0, 0.6, (n, m)) / np.sqrt(m / 4)
                         for m, n in zip(sizes[:-1], sizes[1:])),
        "states": tuple(rng.uniform(0.1, 0.9, (1, n)) * model.period for n in sizes[1:]),
        "input_times": times,
    }
    rate, layers = jnp.zeros((B, sizes[0])), []
    for weights, state in zip(params["weights"], params["states"]):
        events = times.shape[1] * times.shape[2]
        out = layer_only(layer(model, max_events=events), weights, state, times, rate)
        layers.append(out)
        times, rate = out.spike_times, out.pseudo_rate
    max_events = sizes[0] * N_REAL + sum(sizes[1:]) * K + 1
    filled, counts, end_time, per_layer = whole_network_forward(model, max_events, params)

    np.testing.assert_array_equal(end_time, T)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(o.spike_count) for o in layers], axis=-1), counts
    )
    for l, (out, times) in enumerate(zip(layers, per_layer)):
        assert np.all(np.asarray(out.spike_count).sum(axis=-1) > 0), f"layer {l} is silent"
        assert np.all(np.asarray(out.spike_count) <= K)
        assert_close(out.spike_times, times, 1e-6, f"spike times of layer {l}")
    assert_close(layers[-1].filled_times, filled, 1e-6, "filled spike times")


# --- 2. theta fast path == generic phase path -----------------------------------------------------
def excitable_theta_problem():
    """One theta layer (T < period) whose neurons spike several times; inputs with ties."""
    rng = np.random.default_rng(1)
    model = Theta()
    times = random_input_times(rng)
    times[:, 1, 0] = times[:, 2, 0] = times[:, 0, 0]  # three inputs at exactly the same time
    times[:, 4, 1] = times[:, 3, 1]
    times[:, 5, 2] = T  # at the trial end: not an event
    params = {
        "weights": rng.normal(0.6, 0.6, (N, N)),
        "state": random_states(model, rng, 0.5, 0.95),
        "input_times": times,
        "input_rate": rng.uniform(0.0, 1.0, (B, N)),
    }
    cotangent = {
        "spike_times": rng.normal(0.0, 1.0, (B, N, K)),
        "final_state": rng.normal(0.0, 1.0, (B, 1, N)),
        "filled_times": rng.normal(0.0, 1.0, (B, N, K)),
        "pseudo_rate": rng.normal(0.0, 1.0, (B, N)),
    }
    return jax.tree.map(jnp.asarray, (params, cotangent))


def layer_value_and_gradients(model, params, cotangent):
    out, vjp = layer_forward(
        layer(model), params["weights"], params["state"], params["input_times"],
        params["input_rate"],
    )
    cotangent = dict(cotangent)
    cotangent["spike_times"] = jnp.where(jnp.isfinite(out.spike_times), cotangent["spike_times"], 0)
    grads = layer_backward(vjp, cotangent_like(out, **cotangent))
    return out, dict(zip(["weights", "state", "input_times", "input_rate"], grads))


def test_theta_fast_path_equals_generic_phase_path():
    fast_model, generic_model = Theta(), GenericTheta()
    assert T < fast_model.period
    assert fast_model.layer_simulator(T) is not None and generic_model.layer_simulator(T) is None
    params, cotangent = excitable_theta_problem()
    times = np.asarray(params["input_times"])
    assert np.all(times[:, 0, 0] < T) and np.all(times[:, 3, 1] < T)  # ties inside the trial

    fast, fast_grads = layer_value_and_gradients(fast_model, params, cotangent)
    generic, generic_grads = layer_value_and_gradients(generic_model, params, cotangent)
    count = np.asarray(fast.spike_count)
    assert count.max() >= 3 and np.sum(count >= 2) >= 5, "neurons must spike several times"
    assert np.all(count <= K) and np.any(count < K)
    np.testing.assert_array_equal(count, np.asarray(generic.spike_count))
    for name in ("spike_times", "final_state", "filled_times", "pseudo_rate"):
        assert_close(getattr(fast, name), getattr(generic, name), 1e-9, name)
    for name, grad in generic_grads.items():
        assert np.any(np.asarray(grad) != 0), name
        assert_close(fast_grads[name], grad, 1e-9, f"gradient {name}")


# --- 3. fused input bins == separate input events -------------------------------------------------
BIN_TIMES = (0.2, 0.7, 1.3, 2.1)


@jit(static_argnums=0)
def binned_value_and_gradients(model, weights, state, bin_index, cotangent):
    fn = partial(binned_spiking_layer, bin_times=BIN_TIMES, model=model, T=T, max_spikes=K)
    out, vjp = jax.vjp(lambda w, x: fn(w, x, bin_index), weights, state)
    cotangent = cotangent_like(out, **cotangent)
    cotangent = cotangent._replace(
        spike_times=jnp.where(jnp.isfinite(out.spike_times), cotangent.spike_times, 0.0)
    )
    return out, vjp(cotangent)


@pytest.mark.parametrize("model", [Theta(), QIF()], ids=model_id)
def test_binned_layer_equals_separate_events(model):
    rng = np.random.default_rng(2)
    mean = {"Theta": 0.3, "QIF": 2.5}[type(model).__name__]
    weights = jnp.asarray(rng.normal(mean, 1.0, (N, N)))
    state = jnp.asarray(random_states(model, rng))
    bin_index = rng.integers(0, len(BIN_TIMES) + 1, (B, N))  # len(BIN_TIMES): never spikes
    bin_index[:, :3] = 1  # at least three inputs share a bin
    bin_index[:, 3] = len(BIN_TIMES)
    times = np.full((B, N, K), np.inf)  # one spike per input; padded to the shared layer shape
    times[:, :, 0] = np.append(BIN_TIMES, np.inf)[bin_index]
    cotangent = jax.tree.map(jnp.asarray, {
        "spike_times": rng.normal(0.0, 1.0, (B, N, K)),
        "final_state": rng.normal(0.0, 1.0, (B, model.state_size, N)),
        "filled_times": rng.normal(0.0, 1.0, (B, N, K)),
        "pseudo_rate": rng.normal(0.0, 1.0, (B, N)),
    })

    binned, (weight_grad, state_grad) = binned_value_and_gradients(
        model, weights, state, jnp.asarray(bin_index), cotangent
    )
    params = {"weights": weights, "state": state, "input_times": jnp.asarray(times),
              "input_rate": jnp.zeros((B, N))}
    separate, grads = layer_value_and_gradients(model, params, cotangent)
    assert np.all(np.asarray(binned.spike_count).sum(axis=-1) > 0)
    np.testing.assert_array_equal(binned.spike_count, separate.spike_count)
    np.testing.assert_array_equal(binned.n_dropped, separate.n_dropped)
    for name in ("spike_times", "final_state", "filled_times", "pseudo_rate"):
        assert_close(getattr(binned, name), getattr(separate, name), 1e-9, name)
    assert np.any(np.asarray(weight_grad) != 0)
    assert_close(weight_grad, grads["weights"], 1e-9, "weight gradient")
    assert_close(state_grad, grads["state"], 1e-9, "state gradient")


# --- 4. continuity when a spike leaves the trial --------------------------------------------------
SWEEP_STEP = 1e-7
SWEEP_HALF = 5  # points on each side of the crossing
MAX_JUMP = 1e-6
MAX_GRADIENT = 100.0


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
@pytest.mark.parametrize(
    "model, l",
    [(Theta(), 1), (QIF(), 1), (OscLIF(), 1), (Theta(), 0), (QIF(), 0)],
    ids=lambda value: model_id(value) if not isinstance(value, int) else
    ("output_spike", "hidden_spike")[1 - value],
)
def test_spike_times_continuous_when_a_spike_leaves(model, l):
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


# --- 5. buffer overflows are reported, and only then ----------------------------------------------
def assert_no_nan(tree, what=""):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating):
            assert not np.any(np.isnan(leaf)), what + jax.tree_util.keystr(path)


@pytest.mark.parametrize("model", [Theta(), QIF()], ids=model_id)
def test_spike_buffer_overflow_is_reported(model):
    if isinstance(model, Theta):  # neurons spike up to 3+ times (fast layer path)
        params, _ = excitable_theta_problem()
        args = (params["weights"], params["state"], params["input_times"], params["input_rate"])
    else:  # the generic emission loop
        params, _ = random_problem(model)
        args = (params["weights"][0], params["states"][0], params["input_times"],
                jnp.zeros((B, N)))
    full, _ = layer_forward(layer(model), *args)  # K = 6 slots: enough
    true_count = np.asarray(full.spike_count)
    assert np.all(true_count <= K) and true_count.max() >= 2
    enough = int(true_count.max())
    for k in (1, enough):
        out = layer_only(layer(model, max_spikes=k), *args)
        assert_no_nan(out, f"K={k}")
        count = np.asarray(out.spike_count)
        overflow = true_count > k
        assert np.array_equal(count > k, overflow), f"K={k}: overflow not reported exactly"
        np.testing.assert_array_equal(count[~overflow], true_count[~overflow])
        # the buffer holds the earliest k spikes either way (rounding: another compiled program)
        assert_close(out.spike_times, full.spike_times[..., :k], 1e-12, f"K={k} spike times")
        if k == enough:
            assert not overflow.any()
            np.testing.assert_array_equal(count, true_count)
            assert_close(out.final_state, full.final_state, 1e-12, "final states")
            assert_close(out.filled_times, full.filled_times[..., :k], 1e-12, "filled times")
        else:
            assert overflow.sum() >= 3


def uneven_input_times(input_times):
    """24, 25 and 26 input spikes inside the trial (two of them coincident at 0.5 in the last
    two samples), and one at exactly ``T`` (never an event)."""
    times = np.array(input_times)
    for b in range(B):
        times[b, 1 : 1 + b, N_REAL + 1] = 0.5
    times[:, 0, N_REAL + 1] = T
    return times


def distinct_times_in_trial(times):
    return np.array([len(np.unique(t[t < T])) for t in times])


def layer_segments(model, max_events, max_input_spikes):
    """A layer that fuses coincident inputs by gathering and summing by segments."""
    return partial(layer(model, max_events=max_events), max_input_spikes=max_input_spikes)


def test_input_event_buffer_overflow_is_reported():
    model = Theta()
    params, _ = random_problem(model)
    times = uneven_input_times(params["input_times"])
    inside = np.sum(times < T, axis=(1, 2))
    np.testing.assert_array_equal(inside, N * N_REAL + np.arange(B))
    distinct = distinct_times_in_trial(times)
    np.testing.assert_array_equal(distinct, N * N_REAL + np.array([0, 1, 1]))
    args = (params["weights"][0], params["states"][0], jnp.asarray(times), jnp.zeros((B, N)))
    full, _ = layer_forward(layer(model), *args)  # all N * K input slots fit
    np.testing.assert_array_equal(full.n_dropped, 0)
    np.testing.assert_array_equal(full.n_input_events, distinct)
    np.testing.assert_array_equal(full.n_input_spikes, inside)
    assert np.sum(np.isfinite(times), axis=(1, 2)).min() > inside.max()  # spikes at/after T

    # The buffer holds distinct times: both fusion strategies, exactly large enough.
    for fn in (layer(model, max_events=int(distinct.max())),
               layer_segments(model, int(distinct.max()), int(inside.max()))):
        exact = layer_only(fn, *args)
        np.testing.assert_array_equal(exact.n_dropped, 0)
        np.testing.assert_array_equal(exact.spike_count, full.spike_count)
        for name in ("spike_times", "final_state", "filled_times"):
            assert_close(getattr(exact, name), getattr(full, name), 1e-12, name)
        assert_no_nan(exact)
    # Two distinct times short: the spikes at the latest two distinct times of each sample drop.
    small = int(distinct.max()) - 2
    expected = [np.sum(t[t < T] >= np.unique(t[t < T])[small]) if d > small else 0
                for t, d in zip(times, distinct)]
    short = layer_only(layer(model, max_events=small), *args)
    np.testing.assert_array_equal(short.n_dropped, expected)
    assert np.sum(expected) >= 2
    # Gathering fewer input spikes than there are drops the latest of them.
    short_spikes = layer_only(layer_segments(model, int(distinct.max()), int(inside.max()) - 2),
                              *args)
    np.testing.assert_array_equal(short_spikes.n_dropped, inside - (int(inside.max()) - 2))
    assert_no_nan((full, short, short_spikes))


def test_network_event_buffer_overflow_is_reported():
    model = Theta()
    params, coefficients = random_problem(model)
    params["input_times"] = jnp.asarray(uneven_input_times(params["input_times"]))
    whole, _ = whole_network_and_gradients(model, params, coefficients)  # NETWORK_EVENTS steps
    np.testing.assert_array_equal(whole["end_time"], T)
    counts = np.concatenate([np.asarray(c) for c in whole["counts"]], axis=-1)
    assert np.all(counts <= K)
    # one step per input spike inside the trial and per network spike, one more to reach T
    needed = np.sum(np.asarray(params["input_times"]) < T, axis=(1, 2)) + counts.sum(-1) + 1
    assert needed.max() < NETWORK_EVENTS and len(set(needed)) > 1

    filled, count, end_time, _ = out = whole_network_forward(model, int(needed.max()), params)
    np.testing.assert_array_equal(end_time, T)
    np.testing.assert_array_equal(count, counts)
    assert_close(filled, whole["filled"], 1e-12, "filled times")
    assert_no_nan(out)
    filled, count, end_time, _ = out = whole_network_forward(model, int(needed.max()) - 1, params)
    end_time = np.asarray(end_time)
    np.testing.assert_array_equal(end_time < T, needed == needed.max())
    np.testing.assert_array_equal(end_time[needed < needed.max()], T)
    assert_no_nan(out)


# --- 6. float32 -----------------------------------------------------------------------------------
def test_float32_theta_stack_agrees_with_float64():
    model = Theta()
    params, coefficients = random_problem(model)
    single = jax.tree.map(lambda x: x.astype(jnp.float32), (params, coefficients))
    (double_out, double_grads), (single_out, single_grads) = (
        layer_by_layer(model, *p) for p in ((params, coefficients), single)
    )
    for l in range(N_LAYERS):
        assert single_out["times"][l].dtype == jnp.float32
        np.testing.assert_array_equal(single_out["counts"][l], double_out["counts"][l])
        assert_close(single_out["times"][l], double_out["times"][l], 1e-4, f"times {l}")
        assert_close(single_out["final"][l], double_out["final"][l], 1e-4, f"final states {l}")
    assert_close(single_out["filled"], double_out["filled"], 1e-4, "filled times")
    assert single_grads["weights"][0].dtype == jnp.float32
    assert_trees_close(single_grads, double_grads, 1e-3, "gradient")
