"""Simulation kernels against each other, on the shared network of ``tests/kernel_stack.py``.

1. layer by layer (``spiking_layer`` stacked) == the whole network as one recurrent network, with
   layers of unequal sizes (per model on equal sizes: ``tests/test_conformance.py``),
2. the theta fast layer path == the generic phase path,
3. fused input bins == separate input events,
4. buffer overflows are reported, and only then,
5. float32 agrees with float64.

(Continuity of spike times when a spike leaves the trial, per model: tests/test_conformance.py.)
Every comparison is checked to be non-vacuous (spikes in every layer, several spikes per neuron,
ties).
"""

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_kernels.layers import binned_spiking_layer, cotangent_like
from jax_kernels.models import QIF, Theta
from kernel_stack import (
    B,
    K,
    N,
    N_LAYERS,
    N_REAL,
    NETWORK_EVENTS,
    T,
    GenericTheta,
    assert_close,
    assert_trees_close,
    jit,
    layer,
    layer_backward,
    layer_by_layer,
    layer_forward,
    layer_only,
    model_id,
    random_input_times,
    random_problem,
    random_states,
    whole_network_and_gradients,
    whole_network_forward,
)

# --- 1. layer by layer == whole network, unequal sizes ---------------------------------------
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
        "state": rng.uniform(0.5 * model.period, 0.95 * model.period, (1, N)),
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


# --- 4. buffer overflows are reported, and only then ----------------------------------------------
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


# --- 5. float32 -----------------------------------------------------------------------------------
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


# --- 6. the native CPU kernel == the pure-JAX scan --------------------------------------------------
def rotation_scan_problem(gathered: bool, dtype):
    """Events of the rotating layer: ~3 spikes per neuron for K = 2 slots (overflow included),
    events outside the trial (not applied), both kinds of kicks."""
    rng = np.random.default_rng(11)
    n_events, batch, n_neurons, n_rows = 37, 5, 7, 11
    angle = jnp.asarray(rng.uniform(0.0, 1.2, (batch, n_neurons)), dtype)
    state = jnp.stack([jnp.cos(angle), jnp.sin(angle)])
    angle_step = jnp.asarray(rng.uniform(0.0, 0.3, (n_events, batch, 1)), dtype)
    applied = jnp.asarray(rng.uniform(size=(n_events, batch)) < 0.85)
    if gathered:
        table = jnp.asarray(rng.normal(size=(n_rows, n_neurons)), dtype)
        index = jnp.asarray(rng.integers(0, n_rows, (n_events, batch)), jnp.int32)
    else:
        table, index = jnp.asarray(rng.normal(size=(n_events, batch, n_neurons)), dtype), None
    return state, angle_step, applied, table, index


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered-kicks", "dense-kicks"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
def test_native_rotation_scan_equals_pure_jax_scan(gathered, dtype):
    from jax_kernels import native
    from jax_kernels.models import theta

    assert native.available(), "the CI machine has a C++ compiler: the native kernel must build"
    state, angle_step, applied, table, index = rotation_scan_problem(gathered, dtype)
    max_spikes, n_events = 2, angle_step.shape[0]

    def value_and_gradients(scan):
        def outputs(state, angle_step, table):
            return scan(max_spikes, 0.9, state, angle_step, applied, table, index)

        def loss(state, angle_step, table):
            final, _, _, reset_cos, reset_sin = outputs(state, angle_step, table)
            weight = jnp.linspace(0.1, 1.0, reset_cos.size, dtype=dtype).reshape(reset_cos.shape)
            return (jnp.sum(final * jnp.asarray([0.3, -0.7], dtype)[:, None, None])
                    + jnp.sum(weight * reset_cos) - jnp.sum(weight ** 2 * reset_sin))

        return (jax.jit(outputs)(state, angle_step, table),
                jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state, angle_step, table))

    (final, count, interval, reset_cos, reset_sin), grads = value_and_gradients(
        theta._rotation_scan)
    (n_final, n_count, n_interval, n_reset_cos, n_reset_sin), n_grads = value_and_gradients(
        theta._native_rotation_scan)
    count = np.asarray(count)
    assert count.max() > max_spikes and np.sum(count >= 1) > count.size // 2  # not vacuous
    np.testing.assert_array_equal(np.asarray(n_count), count)
    # No spike: any event index >= n_events (the pure-JAX scan pads to whole chunks).
    recorded = np.asarray(interval) < n_events
    np.testing.assert_array_equal(np.asarray(n_interval) < n_events, recorded)
    np.testing.assert_array_equal(np.asarray(n_interval)[recorded], np.asarray(interval)[recorded])
    tolerance = 1e-12 if dtype == jnp.float64 else 1e-3  # float32: rounding over 37 events
    for name, ours, reference in [("final", n_final, final), ("reset_cos", n_reset_cos, reset_cos),
                                  ("reset_sin", n_reset_sin, reset_sin),
                                  *zip(("grad state", "grad angle", "grad table"), n_grads, grads)]:
        assert np.asarray(ours).dtype == np.dtype(dtype), name
        assert np.any(np.asarray(reference) != 0), name
        assert_close(ours, reference, tolerance, name)


def test_theta_layer_without_native_kernel_gives_the_same_results(tmp_path):
    """``JAX_KERNELS_NATIVE=0`` (or no compiler): the pure-JAX scan, same layer outputs."""
    script = tmp_path / "layer.py"
    script.write_text(
        "import sys, jax, numpy as np\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "from jax_kernels import native\n"
        "from jax_kernels.layers import spiking_layer\n"
        "from jax_kernels.models import Theta\n"
        "rng = np.random.default_rng(3)\n"
        "times = rng.uniform(0, 2.5, (4, 9, 2))\n"
        "weights = rng.normal(0, 1.5, (6, 9))\n"
        "state = rng.uniform(0, 2, (1, 6))\n"
        "out = jax.jit(lambda w, x, t: spiking_layer(w, x, t, model=Theta(), T=3.0, max_events=32,"
        " max_spikes=4, max_input_spikes=32))(weights, state, times)\n"
        "np.save(sys.argv[1], np.concatenate([np.asarray(out.filled_times).ravel(),"
        " np.asarray(out.final_state).ravel(), [native.available()]]))\n"
    )
    results = {}
    for setting in ("1", "0"):
        path = tmp_path / f"native{setting}.npy"
        env = {**os.environ, "JAX_KERNELS_NATIVE": setting}
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=300)
        results[setting] = np.load(path)
    assert results["1"][-1] == 1 and results["0"][-1] == 0
    ours, reference = results["1"][:-1], results["0"][:-1]
    assert not np.any(np.isnan(ours)) and np.sum(ours < 3.0) >= 5  # spikes inside the trial
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12, equal_nan=False)


def test_failed_native_build_warns_and_falls_back(tmp_path):
    """A compiler that fails: one warning naming the fallback, the pure-JAX scan, no error."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from jax_kernels import native\n"
        "    assert not native.available() and not native.available()\n"
        "messages = [str(w.message) for w in caught]\n"
        "assert len(messages) == 1 and 'building the native theta kernel failed' in messages[0]"
        " and 'pure-JAX scan' in messages[0], messages\n"
    )
    env = {**os.environ, "CXX": "false", "JAX_KERNELS_CACHE": str(tmp_path / "cache"),
           "JAX_KERNELS_NATIVE": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
