"""Batched layer and network functions built from the single-sample kernels.

These are the functions the PyTorch side jit-compiles and calls. Leading ``B`` axes are batch.
``T``, buffer sizes and the model are static (hashable) arguments.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jax_kernels.models.base import NeuronModel, PseudoNeuronModel
from jax_kernels.simulate import (
    BatchEvents,
    batched_feedforward_layer,
    binned_input_events,
    filled_spike_times,
    fused_input_events,
    input_spike_sequence,
    recurrent_network,
)


class LayerOutput(NamedTuple):
    """Batched output of a spiking layer.

    Attributes:
        spike_times: ``[B, N, K]`` ordinary spike times, ascending, ``+inf`` padded.
        spike_count: ``[B, N]`` int32 spikes in the trial (``> K``: buffer overflow).
        final_state: ``[B, D, N]`` states at the trial end.
        filled_times: ``[B, N, K]`` spike times with missing spikes filled by pseudospikes
            (equal to ``spike_times`` for models without pseudodynamics or with pseudospikes off).
        pseudo_rate: ``[B, N]`` pseudo rates passed on to the next layer (zeros without pseudo).
        n_dropped: ``[B]`` int32 input spikes in the trial that did not fit the event buffers.
        n_input_events: ``[B]`` int32 distinct input spike times in the trial (fused events).
        n_input_spikes: ``[B]`` int32 input spikes in the trial.
    """

    spike_times: Array
    spike_count: Array
    final_state: Array
    filled_times: Array
    pseudo_rate: Array
    n_dropped: Array
    n_input_events: Array
    n_input_spikes: Array


def cotangent_like(output: NamedTuple, **cotangents: Array) -> NamedTuple:
    """A cotangent for ``jax.vjp`` of a layer: the given entries, zeros elsewhere.

    Integer entries (spike counts) get ``float0`` zeros, as ``jax.vjp`` requires.
    """

    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return np.zeros(x.shape, jax.dtypes.float0)
        return jnp.zeros_like(x)

    return jax.tree.map(zero, output)._replace(**cotangents)


#: The one-hot matmul fusion costs ``E * N_in * K_in`` multiply-adds per sample and neuron,
#: gathering ``P`` columns about ``P`` scattered adds; dense multiply-adds are this much cheaper.
MATMUL_FUSION_RATIO = 4


def buffer_size(n: int, bucket: int = 16) -> int:
    """The smallest buffer size on the grid of compiled sizes that holds ``n`` (>= 1).

    The grid: powers of two up to ``bucket``, then four sizes per octave, each a multiple of
    ``bucket`` (16: 1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...).
    A buffer that follows the data thus visits a few sizes per doubling of its need (few
    compiled programs: a training run whose activity drifts compiles a handful of shapes, not
    one per multiple of ``bucket``), and pads by at most a quarter.
    """
    n = max(int(n), 1)
    if n <= bucket:
        return 1 << (n - 1).bit_length()
    step = max(bucket, (1 << ((n - 1).bit_length() - 1)) // 4)
    return step * -(-n // step)


def event_buffer_sizes(
    n_input_events: int, n_input_spikes: int, n_input_slots: int, bucket: int = 16
) -> tuple[int, Optional[int]]:
    """``(max_events, max_input_spikes)`` for :func:`spiking_layer` that hold a batch's events.

    Sizes are rounded up on the grid of :func:`buffer_size` so that recompiles stay rare.
    ``max_input_spikes`` is ``None`` (fusion by one-hot matmul) where that
    costs at most about as much as gathering the spikes' weight columns: a few distinct times
    shared by many spikes, e.g. a binary image given as times.

    Args:
        n_input_events: most distinct input spike times in the trial of any sample.
        n_input_spikes: most input spikes in the trial of any sample.
        n_input_slots: ``N_in * K_in``.
    """
    max_events = buffer_size(n_input_events, bucket)
    max_input_spikes = min(buffer_size(n_input_spikes, bucket), n_input_slots)
    if max_events * n_input_slots <= MATMUL_FUSION_RATIO * max_input_spikes:
        return max_events, None
    return max_events, max_input_spikes


#: Output fields with a neuron axis (``[B, N]``, ``[B, N, K]`` or ``[B, D, N]``).
_PER_NEURON_OUTPUTS = ("spike_times", "spike_count", "final_state", "filled_times", "pseudo_rate")


def _nan_where_invalid(output: NamedTuple, invalid: Array) -> NamedTuple:
    """Outputs of neurons whose parameters or inputs hold NaN/inf, set to NaN (counts to 0).

    A NaN compares false, so inside the simulation it reads as "no spike" and would come out as
    plausible finite times (silent neurons, pseudospikes from a clipped phase); marking the
    affected outputs NaN afterwards makes bad values visible instead. Spike counts become 0 so
    that garbage counts cannot raise a misleading buffer overflow.

    Args:
        output: a batched :class:`LayerOutput` or :class:`NetworkOutput`.
        invalid: ``[B, N]`` bool, broadcastable.
    """
    invalid = jnp.broadcast_to(invalid, output.spike_count.shape)
    replaced = {}
    for name, value in output._asdict().items():
        if name not in _PER_NEURON_OUTPUTS:
            continue
        if name == "final_state":
            mask = invalid[:, None, :]
        elif value.ndim == 3:
            mask = invalid[..., None]
        else:
            mask = invalid
        fill = 0 if jnp.issubdtype(value.dtype, jnp.integer) else jnp.nan
        replaced[name] = jnp.where(mask, jnp.asarray(fill, value.dtype), value)
    return output._replace(**replaced)


def _invalid_neurons(weights: Array, initial_state: Array) -> Array:
    """``[N]``: neurons with a non-finite weight or initial state."""
    return jnp.any(~jnp.isfinite(weights), axis=-1) | jnp.any(~jnp.isfinite(initial_state), axis=0)


def _invalid_samples(input_times: Array, input_rate: Optional[Array]) -> Array:
    """``[B]``: samples with a NaN input time or a non-finite input pseudo rate."""
    invalid = jnp.any(jnp.isnan(input_times), axis=tuple(range(1, input_times.ndim)))
    if input_rate is not None:
        invalid = invalid | jnp.any(~jnp.isfinite(input_rate), axis=-1)
    return invalid


def _layer_from_events(
    model: NeuronModel,
    events: BatchEvents,
    weights: Array,
    initial_state: Array,
    input_rate: Optional[Array],
    T: float,
    max_spikes: int,
    pseudo: bool,
) -> LayerOutput:
    """Simulate a batch of fused input events and add the pseudospike outputs."""
    result = batched_feedforward_layer(model, events, initial_state, T, max_spikes)
    batch, n_neurons = events.times.shape[0], weights.shape[0]
    if pseudo and isinstance(model, PseudoNeuronModel):
        drive = (
            jnp.zeros((batch, n_neurons), weights.dtype)
            if input_rate is None
            else jnp.einsum("ni,bi->bn", weights, input_rate, precision=lax.Precision.HIGHEST)
        )
        filled = jax.vmap(partial(filled_spike_times, model, T=T))(
            result.spike_times, result.spike_count, result.final_state, drive
        )
        rate = jax.vmap(model.pseudo_rate)(result.final_state, drive)
    else:
        filled = result.spike_times
        rate = jnp.zeros((batch, n_neurons), weights.dtype)
    return LayerOutput(
        result.spike_times, result.spike_count, result.final_state, filled, rate,
        events.n_dropped, events.n_events, events.n_spikes,
    )


def spiking_layer(
    weights: Array,
    initial_state: Array,
    input_times: Array,
    input_rate: Optional[Array] = None,
    *,
    model: NeuronModel,
    T: float,
    max_events: int,
    max_spikes: int,
    pseudo: bool = True,
    max_input_spikes: Optional[int] = None,
) -> LayerOutput:
    """A feedforward spiking layer on a batch of input spike trains.

    Input spikes sharing a time are fused into one event (see
    :func:`jax_kernels.simulate.fused_input_events`); the layer's cost follows the distinct
    input times, not the input slots. :func:`event_buffer_sizes` gives buffers that fit a batch.

    Args:
        weights: ``[N, N_in]``.
        initial_state: ``[D, N]`` (shared by all samples).
        input_times: ``[B, N_in, K_in]`` input spike times (``>= 0``, ``+inf`` padded).
        input_rate: ``[B, N_in]`` pseudo rates of the inputs, or ``None`` (all zero, e.g. for
            encoded data).
        model, T, max_events, max_spikes, pseudo, max_input_spikes: static configuration;
            ``max_events`` is the buffer ``E`` of distinct input times, ``max_input_spikes`` the
            buffer of input spikes gathered when fusing by segments (``None``: see
            :func:`fused_input_events`), ``max_spikes`` the output buffer ``K`` per neuron.
    """
    if max_input_spikes is not None and model.layer_simulator(T) is not None:
        # The fast simulators take one step per spike, kicks gathered in the scan (cheaper than
        # building [E, B, N] fused kicks when few spikes coincide, which is when P is used).
        events = input_spike_sequence(input_times, weights, T, max_input_spikes)
    else:
        events = fused_input_events(input_times, weights, T, max_events, max_input_spikes)
    output = _layer_from_events(model, events, weights, initial_state, input_rate, T, max_spikes,
                                pseudo)
    invalid = (
        _invalid_samples(input_times, input_rate)[:, None]
        | _invalid_neurons(weights, initial_state)[None, :]
    )
    return _nan_where_invalid(output, invalid)


def binned_spiking_layer(
    weights: Array,
    initial_state: Array,
    bin_index: Array,
    *,
    bin_times: Sequence[float],
    model: NeuronModel,
    T: float,
    max_spikes: int,
    pseudo: bool = True,
) -> LayerOutput:
    """A feedforward spiking layer on binned (time-to-first-spike) encoded inputs.

    Input ``i`` of sample ``b`` spikes once at ``bin_times[bin_index[b, i]]``, or never if
    ``bin_index >= len(bin_times)``. Inputs sharing a bin are fused into one event (one matmul per
    bin), as the reference's virtual input neurons do.

    Args:
        weights: ``[N, N_in]``; initial_state: ``[D, N]``; bin_index: ``[B, N_in]`` integers.
        bin_times: ascending spike time of each bin (static tuple).
    """
    events = binned_input_events(bin_index, jnp.asarray(bin_times, weights.dtype), weights)
    output = _layer_from_events(model, events, weights, initial_state, None, T, max_spikes,
                                pseudo)
    return _nan_where_invalid(output, _invalid_neurons(weights, initial_state)[None, :])


class NetworkOutput(NamedTuple):
    """Batched output of :func:`recurrent_spiking_network`.

    Attributes:
        spike_times: ``[B, N, K]``; spike_count: ``[B, N]``; final_state: ``[B, D, N]``;
        filled_times: ``[B, N, K]`` spike times with pseudospikes filling missing slots;
        end_time: ``[B]`` (``< T``: the event buffer was too small).
    """

    spike_times: Array
    spike_count: Array
    final_state: Array
    filled_times: Array
    end_time: Array


def recurrent_spiking_network(
    network_weights: Array,
    input_weights: Array,
    initial_state: Array,
    input_times: Array,
    *,
    model: NeuronModel,
    T: float,
    max_events: int,
    max_spikes: int,
    pseudo: bool = True,
) -> NetworkOutput:
    """A recurrent network on a batch of input spike trains ``[B, N_in, K_in]``.

    Pseudospikes (as in the reference's recurrent experiment): each neuron's drive is
    ``network_weights @ r`` with ``r`` the neurons' pseudo rates without synaptic drive.

    Args:
        network_weights: ``[N, N]`` (``(i, j)``: from ``j`` to ``i``); input_weights: ``[N, N_in]``;
        initial_state: ``[D, N]``; input_times: ``[B, N_in, K_in]``.
    """

    def one_sample(times):
        result = recurrent_network(
            model, initial_state, network_weights, input_weights, times, T, max_events, max_spikes
        )
        if pseudo and isinstance(model, PseudoNeuronModel):
            drive = network_weights @ model.recurrent_pseudo_rate(result.final_state)
            filled = filled_spike_times(
                model, result.spike_times, result.spike_count, result.final_state, drive, T
            )
        else:
            filled = result.spike_times
        return NetworkOutput(
            result.spike_times, result.spike_count, result.final_state, filled, result.end_time
        )

    output = jax.vmap(one_sample)(input_times)
    # Recurrence spreads a bad weight or state to every neuron of the sample.
    invalid = jnp.any(_invalid_neurons(network_weights, initial_state)) | jnp.any(
        _invalid_neurons(input_weights, initial_state)
    )
    return _nan_where_invalid(output, (_invalid_samples(input_times, None) | invalid)[:, None])


def block_feedforward_network(
    weights: Sequence[Array],
    initial_states: Sequence[Array],
    input_times: Array,
    input_rate: Optional[Array] = None,
    *,
    model: PseudoNeuronModel,
    T: float,
    max_events: int,
    max_spikes: int,
) -> tuple[Array, Array, Array, list[Array]]:
    """A layered network simulated as *one* recurrent network (the reference's formulation).

    All layers are advanced together, one event at a time, with the feedforward weights placed in
    blocks of an ``[N, N]`` network matrix; pseudospikes come from the layer-wise pseudo-rate chain
    on the end states. Slower than :func:`spiking_layer` stacked layer by layer, and independent of
    it, so it serves as a check and as the benchmark baseline.

    Args:
        weights: per layer ``[N_l, N_{l-1}]`` (``N_0 = N_in``); the first may be per sample,
            ``[B, N_1, N_in]`` (e.g. the reference's virtual inputs, one column per input bin).
        initial_states: per layer ``[D, N_l]``.
        input_times: ``[B, N_in, K_in]`` input spike trains.
        input_rate: ``[B, N_in]`` input pseudo rates or ``None`` (zeros).

    Returns:
        ``(filled_times [B, N_L, K], spike_count [B, N], end_time [B], spike_times)`` of the last
        layer's pseudo-filled spike times, the spike counts of all neurons, the simulated end time
        and the per-layer ordinary spike times ``[B, N_l, K]``.
    """
    sizes = [w.shape[-2] for w in weights]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    n_total = offsets[-1]
    dtype = weights[0].dtype
    network_weights = jnp.zeros((n_total, n_total), dtype)
    for layer in range(1, len(weights)):
        network_weights = network_weights.at[
            offsets[layer] : offsets[layer + 1], offsets[layer - 1] : offsets[layer]
        ].set(weights[layer])
    initial_state = jnp.concatenate(list(initial_states), axis=-1)

    def one_sample(times, rate, first_weights):
        input_weights = jnp.zeros((n_total, first_weights.shape[1]), dtype)
        input_weights = input_weights.at[: sizes[0]].set(first_weights)
        result = recurrent_network(
            model, initial_state, network_weights, input_weights, times, T, max_events, max_spikes
        )
        for layer, w in enumerate([first_weights, *weights[1:]]):
            block = slice(offsets[layer], offsets[layer + 1])
            drive = w @ rate
            state = result.final_state[:, block]
            rate = model.pseudo_rate(state, drive)
        filled = filled_spike_times(
            model, result.spike_times[block], result.spike_count[block], state, drive, T
        )
        per_layer = [
            result.spike_times[offsets[layer] : offsets[layer + 1]] for layer in range(len(sizes))
        ]
        return filled, result.spike_count, result.end_time, per_layer

    if input_rate is None:
        input_rate = jnp.zeros(input_times.shape[:2], dtype)
    first_axis = 0 if weights[0].ndim == 3 else None
    return jax.vmap(one_sample, in_axes=(0, 0, first_axis))(input_times, input_rate, weights[0])
