"""The shared layered network of the kernel tests (test_kernels.py, test_conformance.py).

Compile time dominates on CPU, so all layers have the same shapes (``N`` inputs and neurons, ``K``
spike slots): one compiled layer (forward with VJP, and its backward) serves every layer, model and
test. Gradients of a stack are chained through the layer VJPs, as the PyTorch bridge does.
Weight scales per model come from ``tests/model_specs.py``.
"""

from functools import cache, partial

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_kernels.layers import (  # noqa: E402
    block_feedforward_network,
    cotangent_like,
    recurrent_spiking_network,
    spiking_layer,
)
from jax_kernels.models import Theta  # noqa: E402
from model_specs import spec_of  # noqa: E402

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


def random_states(model, rng):
    """``[D, N]`` initial states of one layer (phases in 0.1 .. 0.9 of the period)."""
    return spec_of(model).initial_states(model, rng, N)


def random_problem(model, seed=0):
    """Parameters of an ``N``-``N``-``N``-``N`` network and random projection coefficients."""
    mean, spread = spec_of(model).layer_weights
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

