"""Tests of SpikingConv2d / EarliestSpikePool2d (spike_bridge.nn) and jax_kernels.conv.

Oracles: the dense ThetaLinear layer with the unrolled convolution as its weight matrix (an
independent simulation: every neuron advanced at every event), torch's own conv2d / max_pool2d
for the geometry, and float64 finite differences for the gradients.
"""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    BufferOverflowError,
    EarliestSpikePool2d,
    FirstSpikeTime,
    SpikingConv2d,
    ThetaLinear,
)
from spike_bridge.spikes import Spikes

T = 2.0


def unrolled(weight: torch.Tensor, in_shape, stride: int, padding: int) -> torch.Tensor:
    """The dense ``[N_out, N_in]`` matrix of a convolution, column i = conv of unit input i."""
    n_in = math.prod(in_shape)
    unit_inputs = torch.eye(n_in, dtype=weight.dtype).reshape(n_in, *in_shape)
    return F.conv2d(unit_inputs, weight, stride=stride, padding=padding).reshape(n_in, -1).T


def random_input(shape, k_in=2, seed=0, silent=0.3):
    generator = torch.Generator().manual_seed(seed)
    times = torch.rand(*shape, k_in, generator=generator, dtype=torch.float64) * 1.2 * T
    times = torch.where(torch.rand(times.shape, generator=generator, dtype=torch.float64) < silent,
                        torch.inf, times)
    rate = torch.rand(*shape, generator=generator, dtype=torch.float64)
    return times.sort(-1).values, rate


GEOMETRIES = [
    # (C_in, H, W), C_out, kernel, stride, padding, compare gradients too (each compile costs;
    # the stride-1 gradients are also checked against finite differences below)
    ((2, 5, 6), 3, 3, 1, 0, False),
    ((2, 6, 5), 3, 3, 2, 1, True),
]


@pytest.mark.parametrize("in_shape, c_out, k, stride, padding, gradients", GEOMETRIES)
def test_conv_equals_dense_layer_with_unrolled_weights(in_shape, c_out, k, stride, padding,
                                                       gradients):
    torch.manual_seed(1)
    conv = SpikingConv2d(in_shape, c_out, k, stride=stride, padding=padding, w_scale=4.0,
                         max_spikes=3).double()
    with torch.no_grad():
        conv.initial_state.uniform_(1.0, 5.0)
    n_positions = conv.out_shape[1] * conv.out_shape[2]
    dense = ThetaLinear(conv.in_features, conv.out_features, max_spikes=3).double()
    times, rate = random_input((4, conv.in_features))
    times.requires_grad_()

    def dense_forward(weight, initial_state, times):
        parameters = {"weight": unrolled(weight, in_shape, stride, padding),
                      "initial_state": initial_state.repeat_interleave(n_positions, dim=1)}
        return functional_call(dense, parameters, (Spikes(times, T, pseudo_rate=rate),))

    def loss(out):  # every output of the layer enters
        return (torch.tanh(out.filled_times).sum() + (out.pseudo_rate ** 2).sum())

    parameters = [conv.weight, conv.initial_state, times]
    with torch.set_grad_enabled(gradients):
        got = conv(Spikes(times, T, pseudo_rate=rate))
        expected = dense_forward(*parameters)
    assert int(got.spike_count.sum()) > 20  # the comparison covers many spikes
    assert torch.equal(got.spike_count, expected.spike_count)
    assert torch.equal(torch.isinf(got.times), torch.isinf(expected.times))
    finite = torch.isfinite(expected.times)
    torch.testing.assert_close(got.times[finite], expected.times[finite], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.filled_times, expected.filled_times, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.pseudo_rate, expected.pseudo_rate, rtol=0, atol=1e-12)
    if not gradients:
        return
    grads = torch.autograd.grad(loss(got), parameters)
    expected_grads = torch.autograd.grad(loss(expected), parameters)
    for name, a, b in zip(("weight", "initial_state", "times"), grads, expected_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_gradients_through_conv_pool_linear_match_finite_differences():
    conv, pool, linear, readout = conv_pool_linear()
    times, _ = random_input((3, 25), k_in=1, seed=3, silent=0.2)

    def forward(conv_weight, conv_state, linear_weight, times):
        spikes = functional_call(conv, {"weight": conv_weight, "initial_state": conv_state},
                                 (Spikes(times, T),))
        pooled = pool(spikes)
        out = functional_call(linear, {"weight": linear_weight,
                                       "initial_state": linear.initial_state}, (pooled,))
        return readout(out), spikes, pooled

    _, spikes, pooled = forward(conv.weight, conv.initial_state, linear.weight, times)
    assert int(spikes.spike_count.sum()) > 10 and int(pooled.spike_count.sum()) > 5
    assert (pooled.pseudo_rate > 0).any()  # pseudo rates pass through the pool
    args = [t.detach().clone().requires_grad_()
            for t in (conv.weight, conv.initial_state, linear.weight, times)]
    assert torch.autograd.gradcheck(lambda *a: forward(*a)[0], args)


def conv_pool_linear(seed=2):
    """The small conv -> pool -> linear stack shared by the tests below (one set of compiled
    shapes): 1x5x5 input, 2 channels 3x3 with padding 1, pooled 2x2, 3 theta outputs."""
    torch.manual_seed(seed)
    conv = SpikingConv2d((1, 5, 5), 2, 3, padding=1, w_scale=5.0, max_spikes=2).double()
    pool = EarliestSpikePool2d(conv.out_shape, 2)
    linear = ThetaLinear(math.prod(pool.out_shape), 3, w_scale=3.0, max_spikes=2).double()
    return conv, pool, linear, FirstSpikeTime()


def test_binned_input_equals_the_same_input_as_spike_times():
    """An encoder's binned input takes one convolution per bin (theta_conv_binned_layer); the
    event-driven kernel on the same spike times is the oracle (values and gradients)."""
    conv, *_ = conv_pool_linear()
    encoder = BinnedLatencyEncoder(3, T).double()
    pixels = torch.randint(0, 256, (3, 25), generator=torch.Generator().manual_seed(6),
                           dtype=torch.uint8)
    binned = encoder(pixels)
    assert binned.binned is not None
    got, expected = conv(binned), conv(Spikes(binned._times, T))
    assert int(expected.spike_count.sum()) > 10
    assert torch.equal(got.spike_count, expected.spike_count)
    finite = torch.isfinite(expected.times)
    assert torch.equal(finite, torch.isfinite(got.times))
    torch.testing.assert_close(got.times[finite], expected.times[finite], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.filled_times, expected.filled_times, rtol=0, atol=1e-12)
    parameters = [conv.weight, conv.initial_state]
    grads = torch.autograd.grad(torch.tanh(got.filled_times).sum(), parameters)
    expected_grads = torch.autograd.grad(torch.tanh(expected.filled_times).sum(), parameters)
    for a, b in zip(grads, expected_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _bisect(spikes_in_trial, low: float, high: float) -> tuple[float, float]:
    """``(a, b)``, ``b - a`` at float64 resolution, with ``spikes_in_trial(a) !=
    spikes_in_trial(b)`` (the given ends must differ)."""
    at_low = spikes_in_trial(low)
    assert spikes_in_trial(high) != at_low
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if spikes_in_trial(middle) == at_low:
            low = middle
        else:
            high = middle
    return low, high


@pytest.mark.parametrize("crossing", ["weight", "input time"])
def test_pseudospike_continuity_as_a_spike_leaves_the_trial(crossing):
    """A conv neuron's last spike moved past ``T`` becomes its pseudospike at ``T``: the layer's
    output times (spikes and pseudospikes) and a loss on them are continuous across the point,
    float64, while its spike count jumps. (Its pseudo rate ``phi_end / Theta`` jumps from 1 to
    0 there by the method's design, as in the dense layer: the ordinary spike takes over.)"""
    conv, *_ = conv_pool_linear()
    neuron = 2 * 5 + 2  # channel 0, centre of the 5x5 grid (the input pixel sits there)
    with torch.no_grad():
        conv.weight.mul_(0.2)
        conv.initial_state.fill_(3.0)  # free spike at 3 > T: only the input's kick brings it in

    def outputs(value: float):
        weight, time = conv.weight.detach().clone(), 0.5
        if crossing == "weight":
            weight[0, 0, 1, 1] = value
        else:
            weight[0, 0, 1, 1], time = 2.0, value
        times = torch.full((1, 25, 1), torch.inf, dtype=torch.float64)
        times[0, neuron, 0] = time
        with torch.no_grad():
            out = functional_call(conv, {"weight": weight}, (Spikes(times, T),))
            loss = first_spike_cross_entropy(out.filled_times[..., 0], torch.tensor([neuron]), T,
                                             1e-2)
        return out, float(loss)

    def in_trial(value):
        return int(outputs(value)[0].spike_count[0, neuron])

    low, high = _bisect(in_trial, *((0.0, 4.0) if crossing == "weight" else (0.0, 1.9)))
    (before, loss_before), (after, loss_after) = outputs(low), outputs(high)
    counts = int(before.spike_count[0, neuron]), int(after.spike_count[0, neuron])
    assert sorted(counts) == [0, 1]
    silent, spiking = (before, after) if counts[0] == 0 else (after, before)
    torch.testing.assert_close(silent.filled_times[0, neuron, 0],
                               torch.tensor(T, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(spiking.times[0, neuron, 0],
                               torch.tensor(T, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(before.filled_times, after.filled_times, rtol=0, atol=1e-8)
    assert abs(loss_before - loss_after) < 1e-8
    torch.testing.assert_close(silent.pseudo_rate[0, neuron] - spiking.pseudo_rate[0, neuron],
                               torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-8)


def test_torch_compile_of_conv_pool_linear_equals_eager():
    """torch.compile (default, graph breaks allowed; aot_eager backend as in test_compile.py):
    forward and backward equal eager mode."""
    conv, pool, linear, readout = conv_pool_linear()
    times, _ = random_input((3, 25), k_in=1, seed=3, silent=0.2)
    labels = torch.tensor([0, 1, 2])

    def loss_of(times):
        first = readout(linear(pool(conv(Spikes(times, T)))))
        return first_spike_cross_entropy(first, labels, T, 1e-2)

    parameters = [conv.weight, conv.initial_state, linear.weight, linear.initial_state]
    eager = loss_of(times)
    eager_grads = torch.autograd.grad(eager, parameters)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss_of, backend="aot_eager")(times)
        grads = torch.autograd.grad(compiled, parameters)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, eager_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_earliest_spike_pool_against_max_pool_and_brute_force():
    generator = torch.Generator().manual_seed(4)
    in_shape = (2, 6, 4)
    times = torch.rand(3, math.prod(in_shape), 2, generator=generator, dtype=torch.float64) * 3
    times = times.sort(-1).values
    rate = torch.rand(3, math.prod(in_shape), generator=generator, dtype=torch.float64)
    pool = EarliestSpikePool2d(in_shape, 2)
    out = pool(Spikes(times, T, filled_times=times + 0.5, pseudo_rate=rate))
    assert pool.out_shape == (2, 3, 2) and out.times.shape == (3, 12, 2)
    grid = times.reshape(3, *in_shape, 2)
    first = -F.max_pool2d(-grid[..., 0], 2)  # earliest first spike per window
    torch.testing.assert_close(out.times[..., 0], first.reshape(3, -1), rtol=0, atol=0)
    torch.testing.assert_close(out.pseudo_rate,
                               F.max_pool2d(rate.reshape(3, *in_shape), 2).reshape(3, -1))
    # second-earliest, by brute force over one window
    window = grid[1, 1, 2:4, 2:4].reshape(-1).sort().values
    assert out.times[1, 1 * 6 + 1 * 2 + 1, 1] == window[1]
    assert torch.equal(out.filled_times, pool._pool(times + 0.5, 2))
    assert torch.equal(out.spike_count, (out.times < T).sum(-1))
    # spikes_per_window: the earliest K of the window's K_in k^2 spikes (here more than K_in)
    for k in (1, 3):
        limited = EarliestSpikePool2d(in_shape, 2, spikes_per_window=k)(Spikes(times, T))
        assert limited.times.shape == (3, 12, k)
        torch.testing.assert_close(limited.times, out_all(times, in_shape)[..., :k], rtol=0,
                                   atol=0)
    with pytest.raises(ValueError, match="spikes_per_window"):
        EarliestSpikePool2d(in_shape, 2, spikes_per_window=0)


def out_all(times, in_shape):
    """All spikes of each 2x2 window, sorted (brute force)."""
    grid = times.reshape(times.shape[0], *in_shape, -1)
    batch, channels, height, width, _ = grid.shape
    windows = [grid[:, :, i:i + 2, j:j + 2].reshape(batch, channels, -1).sort(-1).values
               for i in range(0, height, 2) for j in range(0, width, 2)]
    return torch.stack(windows, 2).reshape(batch, -1, windows[0].shape[-1])


def test_spike_buffer_overflow_names_layer_and_size():
    conv = SpikingConv2d((1, 4, 4), 2, 3, padding=1, max_spikes=1, name="conv1").double()
    with torch.no_grad():
        conv.weight.fill_(8.0)  # every input drives its neurons to (almost) threshold
    times = torch.linspace(0.1, 1.9, 3, dtype=torch.float64).expand(2, 16, 3).contiguous()
    with torch.no_grad(), pytest.raises(BufferOverflowError, match=r"^conv1: .*max_spikes=1") as e:
        conv(Spikes(times, T)).times  # checked when the output is read
    fits = int(re.search(r"max_spikes>=(\d+)", str(e.value)).group(1))
    bigger = SpikingConv2d((1, 4, 4), 2, 3, padding=1, max_spikes=fits).double()
    bigger.load_state_dict(conv.state_dict())
    with torch.no_grad():
        assert int(bigger(Spikes(times, T)).spike_count.max()) == fits


def test_event_buffer_overflow_is_counted_by_the_kernel():

    import jax
    import jax.numpy as jnp

    from jax_kernels.conv import theta_conv_layer
    from jax_kernels.models import Theta

    times = jnp.linspace(0.1, 1.9, 2 * 9).reshape(1, 9, 2)
    layer = jax.jit(partial(theta_conv_layer, model=Theta(), in_shape=(1, 3, 3), stride=1,
                            padding=0, T=2.0, max_events=16, max_spikes=2))
    out = layer(jnp.ones((1, 1, 2, 2)), jnp.full((1, 1), 3.0), times)
    assert int(out.n_dropped[0]) == 2


def test_state_dict_round_trip_and_repr():
    torch.manual_seed(5)
    conv = SpikingConv2d((2, 5, 5), 3, 3, stride=2, padding=1)
    copy = SpikingConv2d((2, 5, 5), 3, 3, stride=2, padding=1)
    copy.load_state_dict(conv.state_dict())
    times, _ = random_input((2, 50))
    spikes = Spikes(times.float(), T)
    with torch.no_grad():
        assert torch.equal(conv(spikes).filled_times, copy(spikes).filled_times)
    assert conv.out_shape == (3, 3, 3) and conv.weight.shape == (3, 2, 3, 3)
    assert "kernel_size=3, stride=2, padding=1, out_shape=(3, 3, 3)" in repr(conv)


@pytest.mark.parametrize("kwargs, match", [
    ({"in_shape": (1, 4)}, "in_shape"),
    ({"kernel_size": 5}, "does not fit the input grid"),
    ({"stride": 0}, "`stride` must be an int >= 1"),
    ({"T": 7.0}, "below the theta period"),
    ({"out_channels": 0}, "out_channels"),
])
def test_invalid_constructor_arguments(kwargs, match):
    arguments = {"in_shape": (1, 4, 4), "out_channels": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        SpikingConv2d(**arguments)


def test_wrong_input_size_is_named():
    conv = SpikingConv2d((1, 4, 4), 2, 3, name="conv1")
    with pytest.raises(ValueError, match=r"conv1: input spike times must have shape \[batch, 16"):
        conv(Spikes(torch.zeros(2, 15, 1), T))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_native_conv_kernel_equals_pure_jax_scan(dtype, monkeypatch):
    """The C++ kernel (the CPU path) against the pure-JAX event scan (GPU, or no compiler):
    spike counts, times, final phases and all gradients, with stride 2 and padding (lanes off
    the grid and between strides), input spikes after the trial and spike-buffer overflow."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_kernels import native
    from jax_kernels.conv import theta_conv_simulate
    from jax_kernels.models import Theta

    assert native.available(), "the CI machine has a C++ compiler: the native kernel must build"
    in_shape, c_out, k, max_spikes = (2, 6, 5), 3, 3, 2
    rng = np.random.default_rng(3)
    n_neurons = c_out * 3 * 3
    with jax.enable_x64(True):
        weights = jnp.asarray(rng.normal(1.0, 1.5, (c_out, 2, k, k)), dtype)
        phase = jnp.asarray(rng.uniform(0, Theta().period, n_neurons), dtype)
        times = rng.uniform(0, 1.3 * T, (4, 60, 3))
        times = jnp.asarray(np.sort(np.where(rng.uniform(size=times.shape) < 0.3, np.inf,
                                             times), axis=-1), dtype)
        simulate = partial(theta_conv_simulate, Theta(), in_shape=in_shape, stride=2,
                           padding=1, T=T, max_events=96, max_spikes=max_spikes)
        weight_times = jnp.asarray(rng.uniform(0.5, 1.5, (4, n_neurons, max_spikes)), dtype)

        def loss(weights, phase, times):
            spike_times, _, final_phase, _ = simulate(weights, phase, times)
            finite = jnp.isfinite(spike_times)
            return (jnp.sum(weight_times * jnp.where(finite, spike_times, 0.0))
                    + jnp.sum(jnp.cos(final_phase)))

        def run():  # traced afresh: the path is chosen when tracing
            return (jax.jit(simulate)(weights, phase, times),
                    jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(weights, phase, times))

        (spike_times, count, final_phase, _), grads = run()
        monkeypatch.setattr(native, "available", lambda: False)
        (j_spike_times, j_count, j_final_phase, _), j_grads = run()
    count = np.asarray(count)
    assert count.max() > max_spikes and np.mean(count >= 1) > 0.5  # not vacuous
    np.testing.assert_array_equal(count, np.asarray(j_count))
    finite = np.isfinite(np.asarray(spike_times))
    np.testing.assert_array_equal(finite, np.isfinite(np.asarray(j_spike_times)))
    tolerance = 1e-10 if dtype == "float64" else 2e-4
    for name, ours, reference in [("spike times", np.asarray(spike_times)[finite],
                                   np.asarray(j_spike_times)[finite]),
                                  ("final phase", final_phase, j_final_phase),
                                  *zip(("grad weights", "grad phase", "grad times"), grads,
                                       j_grads)]:
        ours, reference = np.asarray(ours), np.asarray(reference)
        assert ours.dtype == np.dtype(dtype), name
        assert np.any(reference != 0), name
        scale = np.max(np.abs(reference))
        assert np.max(np.abs(ours - reference)) <= tolerance * scale, name


def _scans(jaxpr):
    """Every ``scan`` equation in ``jaxpr`` and the jaxprs nested in it (custom VJPs, jits)."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _scans(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from _scans(sub)


def test_event_steps_touch_only_the_reached_neurons(monkeypatch):
    """The pure-JAX path (GPU, or no compiler): the scan bodies of the forward pass and of the
    hand-written reverse pass (one input event each) work on ``B C_out k^2`` lanes: the only
    operations on arrays of all ``B N`` neurons are the scatters that write the touched ones
    back (in place), and no spike time (an ``atan``/``atan2`` per lane) is computed inside the
    loop."""

    import jax
    import jax.numpy as jnp

    from jax_kernels import native
    from jax_kernels.conv import theta_conv_simulate
    from jax_kernels.models import Theta

    monkeypatch.setattr(native, "available", lambda: False)
    batch, n_neurons, reached = 3, 2 * 10 * 10, 2 * 3 * 3
    simulate = partial(theta_conv_simulate, Theta(), in_shape=(1, 12, 12), stride=1, padding=0,
                       T=2.0, max_events=16, max_spikes=2)

    def loss(weights, phase, times):
        spike_times, _, final_phase, _ = simulate(weights, phase, times)
        return jnp.sum(jnp.where(jnp.isfinite(spike_times), spike_times, 0.0)) + jnp.sum(
            final_phase)

    args = (jnp.ones((2, 1, 3, 3)), jnp.full((n_neurons,), 3.0), jnp.full((batch, 144, 1), 1.0))
    scans = list(_scans(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr))
    assert [eqn.params["reverse"] for eqn in scans] == [False, True]
    for scan in scans:
        body = scan.params["jaxpr"].jaxpr
        sizes = {eqn.primitive.name: max(v.aval.size for v in eqn.outvars) for eqn in body.eqns}
        assert sizes["gather"] == batch * reached
        whole_layer = {name for name, size in sizes.items() if size >= batch * n_neurons}
        assert whole_layer <= {"scatter", "convert_element_type"}, whole_layer
        for eqn in body.eqns:  # dtype-preserving converts (weak types) are no-ops for XLA
            if (eqn.primitive.name == "convert_element_type"
                    and eqn.outvars[0].aval.size >= batch * n_neurons):
                assert eqn.params["new_dtype"] == eqn.invars[0].aval.dtype
        assert not {"atan2", "atan"} & set(sizes), "spike times are read off after the scan"
