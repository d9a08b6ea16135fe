"""Event-based simulation of spiking layers and recurrent networks.

Single-sample functions (``feedforward_layer``, ``recurrent_network``) are batched with
``jax.vmap``; the feedforward fast path works on whole batches (``fused_input_events``,
``batched_feedforward_layer``), time-major, so that each scan step is one wide elementwise update.
All are jit-, vmap- and reverse-mode-differentiable. Buffers have fixed sizes; running out of room
is reported in the results (never silent truncation, never NaN-filling):

- a layer's output buffer holds ``K`` spikes per neuron; ``spike_count`` is the true count, so
  ``spike_count > K`` marks an overflow,
- an input event buffer holds the earliest ``E`` distinct input spike times (coincident spikes are
  one event); ``n_dropped`` counts the input spikes inside the trial that did not fit,
- a recurrent network runs a fixed number of event steps; ``end_time < T`` marks that they did not
  suffice to reach the trial end.

Spike times are ``+inf`` where there is no spike; spikes at or after the trial end ``T`` are not
part of the trial.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax

import jax.numpy as jnp
from jax import Array, lax

from jax_kernels.models.base import NeuronModel, PseudoNeuronModel


class Events(NamedTuple):
    """Input events of one sample for a layer of ``N`` neurons.

    Attributes:
        times: ``[E]`` event times, ascending, ``+inf`` padded.
        weights: ``[E, N]`` the weight each neuron receives from each event.
        n_dropped: input spikes inside the trial that did not fit into the buffer (int32 scalar).
    """

    times: Array
    weights: Array
    n_dropped: Array


class LayerResult(NamedTuple):
    """Result of :func:`feedforward_layer` for one sample.

    Attributes:
        spike_times: ``[N, K]`` ordinary spike times, ascending per neuron, ``+inf`` padded.
        spike_count: ``[N]`` int32 number of spikes in the trial (``> K``: buffer overflow).
        final_state: ``[D, N]`` state at the trial end.
    """

    spike_times: Array
    spike_count: Array
    final_state: Array


class NetworkResult(NamedTuple):
    """Result of :func:`recurrent_network` for one sample.

    Attributes:
        spike_times: ``[N, K]`` ordinary spike times per neuron, ascending, ``+inf`` padded.
        spike_count: ``[N]`` int32 number of spikes in the trial (``> K``: buffer overflow).
        final_state: ``[D, N]`` state at ``end_time``.
        end_time: time reached by the simulation; ``< T`` means ``max_events`` was too small.
    """

    spike_times: Array
    spike_count: Array
    final_state: Array
    end_time: Array


def _flatten_spike_trains(input_times: Array) -> tuple[Array, Array]:
    """``[N_in, K_in]`` spike trains -> flat times ``[N_in*K_in]`` and source neuron indices."""
    n_in, k_in = input_times.shape
    return input_times.reshape(-1), jnp.repeat(jnp.arange(n_in), k_in)


def earliest_input_spikes(input_times: Array, max_events: int, T: float
                          ) -> tuple[Array, Array, Array]:
    """The earliest ``max_events`` input spikes of one sample, one event each.

    Args:
        input_times: ``[N_in, K_in]`` spike times (any order, ``+inf`` padded, ``>= 0``).
        max_events: buffer size ``E`` (static).
        T: trial duration; spikes at or after ``T`` are not events.

    Returns:
        ``(times [E]`` ascending, ``+inf`` where empty or at/after ``T``; ``source [E]`` input
        neuron of each; ``n_dropped`` trial spikes that did not fit, int32 scalar).
    """
    flat_times, source = _flatten_spike_trains(input_times)
    n_flat = flat_times.shape[0]
    if n_flat < max_events:  # top_k needs at least E candidates
        pad = max_events - n_flat
        flat_times = jnp.concatenate([flat_times, jnp.full((pad,), jnp.inf, flat_times.dtype)])
        source = jnp.concatenate([source, jnp.zeros((pad,), source.dtype)])
    # Indices of the earliest events; the times themselves are gathered so gradients reach them.
    _, order = lax.top_k(-lax.stop_gradient(flat_times), max_events)
    times = flat_times[order]
    times = jnp.where(times < T, times, jnp.inf)
    n_dropped = jnp.sum(flat_times < T, dtype=jnp.int32) - jnp.sum(times < T, dtype=jnp.int32)
    return times, source[order], n_dropped


def events_from_spike_trains(
    input_times: Array, weights: Array, max_events: int, T: float
) -> Events:
    """Turn input spike trains into the earliest ``max_events`` input events of a layer, one
    per spike (no fusion: the reference formulation the fused layer is tested against).

    Args:
        input_times: ``[N_in, K_in]``; weights: ``[N, N_in]``; max_events, T: as for
            :func:`earliest_input_spikes`.
    """
    times, source, n_dropped = earliest_input_spikes(input_times, max_events, T)
    return Events(times, weights[:, source].T, n_dropped)


def feedforward_layer(
    model: NeuronModel,
    events: Events,
    initial_state: Array,
    T: float,
    max_spikes: int,
) -> LayerResult:
    """Simulate one sample of a layer of independent neurons driven by input events.

    The generic event scan (no model-specific fast path), also the reference the batched fast
    paths are tested against. Neurons of a layer do not influence each other, so one scan step per
    input event suffices: the step moves all neurons to the event time (recording their own spikes
    on the way with ``model.emit_spikes``) and applies the event.

    Args:
        model: neuron model (static).
        events: input events (:class:`Events`), times ascending and ``>= 0``.
        initial_state: ``[D, N]`` states at ``t = 0``.
        T: trial duration (static).
        max_spikes: spike buffer size ``K`` per neuron (static).
    """
    dtype = initial_state.dtype
    n_neurons = initial_state.shape[-1]
    # A final zero-weight event at T flushes the spikes between the last input and the trial end.
    times = jnp.concatenate([events.times.astype(dtype), jnp.full((1,), T, dtype)])
    weights = jnp.concatenate([events.weights.astype(dtype), jnp.zeros((1, n_neurons), dtype)])
    return _scan_layer(model, times, weights, initial_state, T, max_spikes)


def _scan_layer(model, times, weights, initial_state, T, max_spikes) -> LayerResult:
    """The event scan of :func:`feedforward_layer`; the last event (at ``T``) flushes."""
    dtype = initial_state.dtype
    n_neurons = initial_state.shape[-1]
    n_slots = model.spikes_per_interval(T, max_spikes)

    # The spikes of each interval leave the scan as outputs rather than being written into a
    # buffer carried through it: the carry (and the backward pass through it) stays [D, N].
    def step(carry, event):
        t_prev, x = carry
        t_event, w = event
        in_trial = t_event < T
        t_next = jnp.where(in_trial, t_event, T)
        x, times, count = model.emit_spikes(x, t_prev, t_next, n_slots)
        x = jnp.where(in_trial, model.receive(x, w), x)
        return (t_next, x), (times, count)

    (_, final_state), (times, counts) = lax.scan(
        step, (jnp.zeros((), dtype), initial_state), (times, weights)
    )
    spike_times = earliest(jnp.moveaxis(times, 1, 0).reshape(n_neurons, -1), max_spikes)
    return LayerResult(spike_times, jnp.sum(counts, axis=0, dtype=jnp.int32), final_state)


class GatheredKicks(NamedTuple):
    """Kicks as rows of a table: event ``s`` of sample ``b`` kicks neuron ``n`` by
    ``table[index[s, b], n]`` (e.g. the table is ``weights.T`` and the index the input neuron of
    each spike), so that no ``[E, B, N]`` kick array has to exist.

    Attributes:
        table: ``[R, N]``; index: ``[E, B]`` int32.
    """

    table: Array
    index: Array


class BatchEvents(NamedTuple):
    """Input events of a batch for a layer of ``N`` neurons, coincident input spikes fused.

    Attributes:
        times: ``[B, E]`` distinct event times, ascending, ``+inf`` padded.
        kicks: ``[E, B, N]`` (time-major) the summed weight each neuron receives at each time,
            or :class:`GatheredKicks`.
        n_events: ``[B]`` int32 distinct input spike times inside the trial (what ``E`` must hold).
        n_spikes: ``[B]`` int32 input spikes inside the trial.
        n_dropped: ``[B]`` int32 input spikes inside the trial that did not fit the buffers.
    """

    times: Array
    kicks: Array
    n_events: Array
    n_spikes: Array
    n_dropped: Array


def fused_input_events(
    input_times: Array,
    weights: Array,
    T: float,
    max_events: int,
    max_input_spikes: Optional[int] = None,
) -> BatchEvents:
    """Turn a batch of input spike trains into events, one per distinct spike time.

    Input spikes sharing a time (binary or binned images given as times, quantised timestamps)
    become one event whose kick is the sum of their weight columns, so the scan takes one step
    per distinct time. Values are exact. The time of a fused event is the mean of its members'
    (equal) times, so its time gradient is shared equally among them: at exact coincidence the
    loss has a kink in each member's time, and the shares sum to the derivative for moving the
    coincident spikes together.

    Two static strategies:

    - ``max_input_spikes=None``: a one-hot matmul over all ``S = N_in * K_in`` input slots,
      ``O(E S N)`` per sample; cheap for a few distinct times with many spikes each (a binary
      image given as times).
    - ``max_input_spikes=P``: the earliest ``P`` input spikes (``top_k``) have their weight
      columns gathered and summed per distinct time, ``O(P N)`` per sample.

    Args:
        input_times: ``[B, N_in, K_in]`` spike times (any order, ``+inf`` padded, ``>= 0``).
        weights: ``[N, N_in]``.
        T: trial duration; spikes at or after ``T`` are not events.
        max_events: ``E`` distinct times per sample (static).
        max_input_spikes: ``P`` (static), or ``None`` (see above).

    Returns:
        :class:`BatchEvents`; ``n_events`` is exact when no spike was dropped, else a lower
        bound that exceeds the buffer it overflowed.
    """
    batch, n_in, k_in = input_times.shape
    n_slots = n_in * k_in
    flat = input_times.reshape(batch, n_slots)
    source = jnp.repeat(jnp.arange(n_in), k_in)  # input neuron of each slot
    key = lax.stop_gradient(flat)
    key = jnp.where(key < T, key, jnp.inf)
    n_spikes = jnp.sum(key < T, axis=1, dtype=jnp.int32)
    dtype = weights.dtype
    if max_input_spikes is None:
        # The distinct times, earliest first: E rounds of "smallest time after the previous".
        distinct = []
        previous = jnp.full((batch, 1), -jnp.inf, key.dtype)
        for _ in range(max_events):
            previous = jnp.min(jnp.where(key > previous, key, jnp.inf), axis=1, keepdims=True)
            distinct.append(previous)
        distinct = jnp.concatenate(distinct, axis=1)  # [B, E], +inf padded
        more = jnp.any(key > previous, axis=1)  # a distinct time beyond the buffer
        membership = (key[:, None, :] == distinct[:, :, None]) & (distinct[:, :, None] < T)
        kicks = jnp.einsum(
            "bes,ns->ebn", membership.astype(dtype), weights[:, source],
            precision=lax.Precision.HIGHEST,
        )
        members = jnp.sum(membership, axis=2, dtype=jnp.int32)  # [B, E]
        time_sum = jnp.sum(jnp.where(membership, flat[:, None, :], 0.0), axis=2)
        n_events = jnp.sum(members > 0, axis=1, dtype=jnp.int32) + more
    else:
        n_kept = min(max_input_spikes, n_slots)
        _, order = lax.top_k(-key, n_kept)  # earliest first
        sorted_key = jnp.take_along_axis(key, order, axis=1)
        kept = sorted_key < T
        is_new = jnp.concatenate(
            [jnp.ones((batch, 1), bool), sorted_key[:, 1:] != sorted_key[:, :-1]], axis=1
        ) & kept
        group = jnp.cumsum(is_new, axis=1, dtype=jnp.int32) - 1  # distinct-time index
        group = jnp.where(kept, group, max_events)  # E: not an event (dropped by the scatter)
        member_times = jnp.where(kept, jnp.take_along_axis(flat, order, axis=1), 0.0)
        columns = weights.T[source[order.T]]  # [P, B, N] weight column of each kept spike
        sample = jnp.broadcast_to(jnp.arange(batch), (n_kept, batch))
        kicks = jnp.zeros((max_events, batch, weights.shape[0]), dtype).at[group.T, sample].add(
            columns, mode="drop"
        )
        members = jnp.zeros((batch, max_events), jnp.int32).at[sample.T, group].add(
            1, mode="drop"
        )
        time_sum = jnp.zeros((batch, max_events), dtype).at[sample.T, group].add(
            member_times, mode="drop"
        )
        n_events = jnp.sum(is_new, axis=1, dtype=jnp.int32) + (n_spikes > n_kept)
    times = jnp.where(members > 0, time_sum / jnp.maximum(members, 1), jnp.inf)
    n_dropped = n_spikes - jnp.sum(members, axis=1, dtype=jnp.int32)
    return BatchEvents(times, kicks, n_events, n_spikes, n_dropped)


def input_spike_sequence(
    input_times: Array, weights: Array, T: float, max_input_spikes: int
) -> BatchEvents:
    """The earliest ``P`` input spikes of each sample as events, one per spike, their kicks
    gathered from ``weights`` inside the simulation (:class:`GatheredKicks`).

    Coincident spikes become consecutive events with no time between them, which equals their
    fused event only for models whose inputs compose and cannot cause a spike at the input
    (theta neurons: ``V + w1 + w2``); layers use it where the model's ``layer_simulator``
    exists. As in :func:`fused_input_events`, coincident spikes get their mean time, so the
    gradient w.r.t. their common time is shared equally. No ``[P, B, N]`` array of weight
    columns is built: the cost of an event is one gathered ``[B, N]`` row per step.

    Args:
        input_times: ``[B, N_in, K_in]`` spike times (any order, ``+inf`` padded, ``>= 0``).
        weights: ``[N, N_in]``.
        T: trial duration; spikes at or after ``T`` are not events.
        max_input_spikes: ``P`` spikes per sample (static).

    Returns:
        :class:`BatchEvents` with ``times [B, P]`` and ``n_events`` the distinct times in the
        trial (a lower bound that exceeds nothing when spikes were dropped).
    """
    batch, n_in, k_in = input_times.shape
    n_slots = n_in * k_in
    flat = input_times.reshape(batch, n_slots)
    source = jnp.repeat(jnp.arange(n_in, dtype=jnp.int32), k_in)  # input neuron of each slot
    key = lax.stop_gradient(flat)
    key = jnp.where(key < T, key, jnp.inf)
    n_spikes = jnp.sum(key < T, axis=1, dtype=jnp.int32)
    n_kept = min(max_input_spikes, n_slots)
    _, order = lax.top_k(-key, n_kept)  # earliest first
    sorted_key = jnp.take_along_axis(key, order, axis=1)
    kept = sorted_key < T
    is_new = jnp.concatenate(
        [jnp.ones((batch, 1), bool), sorted_key[:, 1:] != sorted_key[:, :-1]], axis=1
    ) & kept
    group = jnp.where(kept, jnp.cumsum(is_new, axis=1, dtype=jnp.int32) - 1, 0)
    member_times = jnp.where(kept, jnp.take_along_axis(flat, order, axis=1), 0.0)
    sample = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, n_kept))
    time_sum = jnp.zeros((batch, n_kept), flat.dtype).at[sample, group].add(member_times)
    members = jnp.zeros((batch, n_kept), jnp.int32).at[sample, group].add(kept.astype(jnp.int32))
    mean_time = time_sum / jnp.maximum(members, 1)
    times = jnp.where(kept, jnp.take_along_axis(mean_time, group, axis=1), jnp.inf)
    index = jnp.where(kept, source[order], 0).T
    n_events = jnp.sum(is_new, axis=1, dtype=jnp.int32) + (n_spikes > n_kept)
    n_dropped = n_spikes - jnp.sum(kept, axis=1, dtype=jnp.int32)
    return BatchEvents(times, GatheredKicks(weights.T, index), n_events, n_spikes, n_dropped)


def binned_input_events(bin_index: Array, bin_times: Array, weights: Array) -> BatchEvents:
    """Inputs that spike at a few shared times (binned encodings): one event per bin.

    All inputs in bin ``b`` spike at ``bin_times[b]``; their weight columns are summed with one
    matmul, as the reference's virtual input neurons do.

    Args:
        bin_index: ``[B, N_in]`` integer bin of each input; values ``>= n_bins`` never spike.
        bin_times: ``[n_bins]`` ascending spike time of each bin.
        weights: ``[N, N_in]`` layer weights.
    """
    batch = bin_index.shape[0]
    n_bins = bin_times.shape[0]
    membership = bin_index[:, None, :] == jnp.arange(n_bins)[None, :, None]  # [B, bins, N_in]
    kicks = jnp.einsum(
        "bes,ns->ebn", membership.astype(weights.dtype), weights, precision=lax.Precision.HIGHEST
    )
    members = jnp.sum(membership, axis=2, dtype=jnp.int32)
    n_spikes = jnp.sum(members, axis=1, dtype=jnp.int32)
    times = jnp.broadcast_to(bin_times.astype(weights.dtype), (batch, n_bins))
    times = jnp.where(members > 0, times, jnp.inf)
    return BatchEvents(
        times, kicks, jnp.sum(members > 0, axis=1, dtype=jnp.int32), n_spikes,
        jnp.zeros((batch,), jnp.int32),
    )


def batched_feedforward_layer(
    model: NeuronModel,
    events: BatchEvents,
    initial_state: Array,
    T: float,
    max_spikes: int,
) -> LayerResult:
    """Simulate a layer of independent neurons for a batch of fused input events.

    Models with a specialised batched simulator (``model.layer_simulator``) use it; others run
    :func:`feedforward_layer` per sample. Returns a batched :class:`LayerResult`
    (``[B, N, K]``, ``[B, N]``, ``[B, D, N]``).
    """
    dtype = initial_state.dtype
    batch, n_neurons = events.times.shape[0], initial_state.shape[-1]
    # A final zero-weight event at T flushes the spikes between the last input and the trial end.
    times = jnp.concatenate([events.times.astype(dtype), jnp.full((batch, 1), T, dtype)], axis=1)
    simulator = model.layer_simulator(T)
    if isinstance(events.kicks, GatheredKicks):
        index = jnp.concatenate([events.kicks.index, jnp.zeros((1, batch), jnp.int32)], axis=0)
        kicks = GatheredKicks(events.kicks.table.astype(dtype), index)
        if simulator is not None:
            return LayerResult(*simulator(times, kicks, initial_state, max_spikes))
        kicks = jnp.where((times < T).T[..., None], kicks.table[kicks.index], 0.0)
    else:
        kicks = jnp.concatenate(
            [events.kicks.astype(dtype), jnp.zeros((1, batch, n_neurons), dtype)], axis=0
        )
    if simulator is not None:
        return LayerResult(*simulator(times, kicks, initial_state, max_spikes))

    def one_sample(sample_times, sample_kicks):
        return _scan_layer(model, sample_times, sample_kicks, initial_state, T, max_spikes)

    return jax.vmap(one_sample, in_axes=(0, 1))(times, kicks)


def earliest(times: Array, k: int) -> Array:
    """The ``k`` smallest entries along the last axis, ascending, ``+inf`` padded."""
    if times.shape[-1] < k:
        pad = [(0, 0)] * (times.ndim - 1) + [(0, k - times.shape[-1])]
        times = jnp.pad(times, pad, constant_values=jnp.inf)
    negative, _ = lax.top_k(-times, k)
    return -negative


def recurrent_network(
    model: NeuronModel,
    initial_state: Array,
    network_weights: Array,
    input_weights: Array,
    input_times: Array,
    T: float,
    max_events: int,
    max_spikes: int,
) -> NetworkResult:
    """Simulate a recurrent network driven by input spikes, one event per scan step.

    Each step finds the next event, the earlier of the next input spike and the next network spike,
    moves all neurons to it, resets a spiking neuron and delivers the event's weights
    (``network_weights[:, j]`` for neuron ``j``, ``input_weights[:, i]`` for input ``i``). On a tie
    the network spike goes first.

    Args:
        model: neuron model (static).
        initial_state: ``[D, N]`` states at ``t = 0``.
        network_weights: ``[N, N]``, entry ``(i, j)`` from neuron ``j`` to neuron ``i``.
        input_weights: ``[N, N_in]``.
        input_times: ``[N_in, K_in]`` input spike times (any order, ``+inf`` padded, ``>= 0``).
        T: trial duration (static).
        max_events: number of event steps (input plus network spikes, static).
        max_spikes: spike buffer size ``K`` per neuron (static).
    """
    dtype = initial_state.dtype
    n_neurons = initial_state.shape[-1]
    flat_times, source = _flatten_spike_trains(input_times.astype(dtype))
    order = jnp.argsort(lax.stop_gradient(flat_times))
    queue_times = jnp.concatenate([flat_times[order], jnp.full((1,), jnp.inf, dtype)])
    queue_source = jnp.concatenate([source[order], jnp.zeros((1,), source.dtype)])
    slots = jnp.arange(max_spikes)

    def step(carry, _):
        t, x, queue_pos, spike_count, spike_times = carry
        dt_spike = model.next_spike_dt(x)
        neuron = jnp.argmin(dt_spike)
        dt_net = dt_spike[neuron]
        dt_input = queue_times[queue_pos] - t
        is_input = dt_input < dt_net
        dt = jnp.where(is_input, dt_input, dt_net)
        in_trial = t + dt < T
        dt = jnp.where(in_trial, dt, T - t)
        network_spike = in_trial & ~is_input

        x_new = model.flow(x, dt)
        reset = model.spike_reset(x[:, neuron], dt)
        x_new = x_new.at[:, neuron].set(jnp.where(network_spike, reset, x_new[:, neuron]))
        w = jnp.where(
            is_input,
            input_weights[:, queue_source[queue_pos]],
            network_weights[:, neuron],
        )
        x_new = jnp.where(in_trial, model.receive(x_new, w), x_new)

        t_new = t + dt
        write = network_spike & (slots == spike_count[neuron])
        spike_times = spike_times.at[neuron].set(
            jnp.where(write, t_new, spike_times[neuron])
        )
        spike_count = spike_count.at[neuron].add(network_spike.astype(jnp.int32))
        queue_pos = queue_pos + (is_input & in_trial)
        return (t_new, x_new, queue_pos, spike_count, spike_times), None

    init = (
        jnp.zeros((), dtype),
        initial_state,
        jnp.zeros((), jnp.int32),
        jnp.zeros((n_neurons,), jnp.int32),
        jnp.full((n_neurons, max_spikes), jnp.inf, dtype),
    )
    (end_time, final_state, _, spike_count, spike_times), _ = lax.scan(
        step, init, None, length=max_events
    )
    return NetworkResult(spike_times, spike_count, final_state, end_time)


def filled_spike_times(
    model: PseudoNeuronModel,
    spike_times: Array,
    spike_count: Array,
    final_state: Array,
    drive: Array,
    T: float,
) -> Array:
    """Spike times ``[N, K]`` with missing spikes filled by pseudospikes.

    Slot ``k`` holds the ``k``-th ordinary spike if the neuron had more than ``k`` spikes, else its
    ``(k - spike_count + 1)``-th pseudospike time (after ``T``).

    Args:
        spike_times: ``[N, K]`` ordinary spike times; spike_count: ``[N]``.
        final_state: ``[D, N]`` state at the trial end; drive: ``[N]`` pseudo drive.
    """
    slot = jnp.arange(spike_times.shape[-1])
    missing = slot[None, :] >= spike_count[:, None]
    k = (slot[None, :] - spike_count[:, None] + 1).astype(spike_times.dtype)
    pseudo = model.pseudospike_time(final_state[:, :, None], drive[:, None], jnp.maximum(k, 1), T)
    return jnp.where(missing, pseudo, spike_times)
