"""Coincident input spikes fused into one event == the same spikes as separate events.

The fused layer (:func:`jax_kernels.layers.spiking_layer`, both fusion strategies) is compared
with the unfused single-sample reference (:func:`jax_kernels.simulate.feedforward_layer` on
:func:`~jax_kernels.simulate.events_from_spike_trains`: one event per input spike, coincident
ones applied one after the other with zero-length intervals between them) in float64: spike
times, counts, final states, pseudospikes and every gradient.

Gradients w.r.t. the time of one of several *coincident* spikes: the loss has a kink there (moving
one spike before or after the others gives different one-sided derivatives), so per-spike values
are a convention. The unfused reference's split follows the arbitrary order in which it applies
the coincident spikes; the fused layer shares the group's derivative equally. Both agree on what
is well defined: the derivative for moving the coincident spikes together (the group sum), and
every non-coincident spike's derivative.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_kernels.layers import cotangent_like, spiking_layer
from jax_kernels.models import QIF, Theta
from jax_kernels.simulate import events_from_spike_trains, feedforward_layer, filled_spike_times

B, N_IN, K_IN, N, K = 3, 6, 2, 5, 4
T = 3.0


def problem(model, seed=0):
    """Inputs with three coincident groups per sample (sizes 3, 2, 2) and distinct spikes."""
    rng = np.random.default_rng(seed)
    times = rng.uniform(0.0, T, (B, N_IN, K_IN))
    times[:, :, 1] = np.where(rng.random((B, N_IN)) < 0.5, np.inf, times[:, :, 1])
    for b in range(B):
        times[b, 0, 0] = times[b, 1, 0] = times[b, 2, 0] = 0.7 + 0.1 * b
        times[b, 3, 0] = times[b, 4, 1] = 1.9
        times[b, 5, 0] = times[b, 5, 1] = 2.4  # one input spiking twice at once
    times[0, 4, 0] = T + 0.5  # after the trial: not an event
    mean, spread = (0.4, 0.8) if isinstance(model, Theta) else (2.0, 1.5)
    weights = rng.normal(mean, spread, (N, N_IN))
    if isinstance(model, Theta):
        state = rng.uniform(0.5, model.period - 0.5, (1, N))
    else:
        state = np.stack([rng.uniform(-1.0, 0.5, N), rng.uniform(0.0, 1.0, N)])
    rate = rng.uniform(0.0, 0.5, (B, N_IN))
    return tuple(jnp.asarray(x) for x in (weights, state, times, rate))


def unfused(model, weights, state, times, rate):
    """One sample at a time, one event per input spike (the reference formulation)."""

    def one_sample(sample_times, sample_rate):
        events = events_from_spike_trains(sample_times, weights, N_IN * K_IN, T)
        result = feedforward_layer(model, events, state, T, K)
        drive = weights @ sample_rate
        filled = filled_spike_times(
            model, result.spike_times, result.spike_count, result.final_state, drive, T
        )
        return result.spike_times, result.final_state, filled, model.pseudo_rate(
            result.final_state, drive), result.spike_count

    return jax.vmap(one_sample)(times, rate)


def fused(model, max_input_spikes, weights, state, times, rate):
    out = spiking_layer(weights, state, times, rate, model=model, T=T, max_events=N_IN * K_IN,
                        max_spikes=K, max_input_spikes=max_input_spikes)
    return out.spike_times, out.final_state, out.filled_times, out.pseudo_rate, out.spike_count


def weighted_sum(outputs, cotangents):
    spike_times, final_state, filled, rate, _ = outputs
    total = 0.0
    for value, cotangent in zip((spike_times, final_state, filled, rate), cotangents):
        total = total + jnp.sum(jnp.where(jnp.isfinite(value), value * cotangent, 0.0))
    return total


# Each fusion strategy once, each through one simulator path (theta fast path, generic QIF
# scan): every case costs two compiles (outputs with gradients, fused and unfused).
@pytest.mark.parametrize(
    "model, max_input_spikes",
    [(Theta(), None), (QIF(), N_IN * K_IN), (Theta(), N_IN * K_IN)],
    ids=["theta-matmul", "qif-segments", "theta-segments"],
)
def test_fused_events_equal_separate_events(model, max_input_spikes):
    with jax.enable_x64(True):
        args = problem(model)
        times = np.asarray(args[2])
        rng = np.random.default_rng(1)
        shapes = jax.eval_shape(partial(unfused, model), *args)
        cotangents = [jnp.asarray(rng.normal(size=x.shape)) for x in shapes[:4]]

        def outputs_and_gradients(fn):  # one compile for both
            def loss(*a):
                outputs = fn(*a)
                return weighted_sum(outputs, cotangents), outputs

            (_, outputs), grads = jax.jit(
                jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
            return outputs, grads

        out, grads = outputs_and_gradients(partial(fused, model, max_input_spikes))
        reference, reference_grads = outputs_and_gradients(partial(unfused, model))

    counts = np.asarray(reference[4])
    assert counts.sum() > 0 and counts.max() >= 2  # spikes, and neurons spiking repeatedly
    np.testing.assert_array_equal(out[4], counts)
    for name, a, b in zip(("spike times", "final state", "filled times", "pseudo rate"),
                          out[:4], reference[:4]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
    for name, a, b in zip(("weights", "initial state", "input rate"),
                          (grads[0], grads[1], grads[3]),
                          (reference_grads[0], reference_grads[1], reference_grads[3])):
        assert np.any(np.asarray(b) != 0), name
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name + " gradient")

    time_grad, reference_time_grad = np.asarray(grads[2]), np.asarray(reference_grads[2])
    in_trial = times < T
    np.testing.assert_array_equal(time_grad[~in_trial], 0.0)
    n_groups = 0
    for b in range(B):
        values, group_of = np.unique(times[b][in_trial[b]], return_inverse=True)
        fused_b, reference_b = time_grad[b][in_trial[b]], reference_time_grad[b][in_trial[b]]
        for g in range(len(values)):
            members = group_of == g
            # the derivative for moving the group together is the same
            np.testing.assert_allclose(fused_b[members].sum(), reference_b[members].sum(),
                                       rtol=1e-9, atol=1e-12)
            if members.sum() == 1:
                continue
            n_groups += 1
            # shared equally, where the reference's split follows its order of application
            np.testing.assert_allclose(fused_b[members], fused_b[members].mean(), rtol=1e-12)
    assert n_groups == 3 * B  # every coincident group was checked
    assert np.any(time_grad != 0)
