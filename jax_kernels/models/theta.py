r"""Oscillatory quadratic integrate-and-fire (theta) neuron with delta-pulse coupling."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from math import pi, sqrt

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jax_kernels import native
from jax_kernels.models.base import PhaseOscillatorModel, require_positive


@dataclass(frozen=True)
class Theta(PhaseOscillatorModel):
    r"""Theta (oscillatory QIF) neuron with delta-pulse coupling.

    .. math::  \tau \dot V = V (V - 1) + I_0 + \tau \sum_i w_i \sum_{t_i} \delta(t - t_i)

    With ``I0 > 1/4`` the neuron oscillates: ``V`` runs from ``-inf`` to ``+inf`` (spike, reset to
    ``-inf``) in the free period ``Theta = tau pi / sqrt(I0 - 1/4)``. The state is the phase
    ``phi = tau / c (arctan((V - 1/2) / c) + pi/2)`` with ``c = sqrt(I0 - 1/4)``, which grows at
    rate 1; an input pulse adds ``w`` to ``V``. It can never push the phase past ``Theta``, so spikes
    only appear or vanish at the trial end. (The reference code's ``eps`` guard against the pole of
    ``tan`` is not needed: see :meth:`phase_transfer`.)

    Attributes:
        tau: membrane time constant (> 0).
        I0: constant input current (> 1/4).
    """

    tau: float = 1.0
    I0: float = 1.25

    def __post_init__(self):
        require_positive(self, "tau")
        if not self.I0 > 0.25:
            raise ValueError(
                f"Theta: `I0` must be greater than 1/4 (oscillatory regime), got {self.I0!r}."
            )

    @property
    def _root(self) -> float:
        return sqrt(self.I0 - 0.25)

    @property
    def period(self) -> float:
        return self.tau * pi / self._root

    def phase_to_voltage(self, phase: Array) -> Array:
        """``V(phi)`` (``-inf`` at ``phi = 0``, ``+inf`` at ``Theta``), e.g. for voltage traces."""
        return self._root * jnp.tan(phase * self._root / self.tau - pi / 2) + 0.5

    def voltage_to_phase(self, voltage: Array) -> Array:
        """``phi(V)``, in ``(0, Theta)`` for finite ``V``."""
        return self.tau / self._root * (jnp.arctan((voltage - 0.5) / self._root) + pi / 2)

    def phase_transfer(self, phase: Array, w: Array) -> Array:
        # With a = c phi / tau in [0, pi] and V - 1/2 = -c cot(a):
        #   H = tau / c (pi/2 + arctan(w / c - cot a)) = tau / c (pi/2 + atan2(w/c sin a - cos a, sin a)),
        # which holds since sin a >= 0. Unlike the tan/arctan form it has no pole: phases 0 and Theta
        # (V = -inf, +inf) map to themselves with finite gradients, so no clamping is needed.
        angle = phase * (self._root / self.tau)
        sin, cos = jnp.sin(angle), jnp.cos(angle)
        shifted = jnp.arctan2(w / self._root * sin - cos, sin)
        return self.tau / self._root * (pi / 2 + shifted)

    def layer_simulator(self, T: float):
        # For T < Theta each neuron spikes at most once between two inputs, which allows a
        # representation without transcendental functions in the scan (see _rotating_layer).
        return partial(self._rotating_layer, T) if T < self.period else None

    def _rotating_layer(self, T, times, kicks, initial_state, max_spikes):
        """Batched feedforward layer with the phase as a point on the unit circle.

        The state ``z = (cos a, sin a)``, ``a = pi phi / Theta``, rotates by the same angle for all
        neurons of a sample between two inputs (a 2x2 rotation); passing ``a = pi`` is a spike,
        after which the reset state is ``-z``; an input maps ``z`` to ``(cos a - u sin a, sin a) /
        norm`` with ``u = w / sqrt(I0 - 1/4)`` (the phase transfer function, rewritten). The scan
        body is a few multiply-adds and one ``rsqrt`` per neuron; it records, for each neuron's
        ``k``-th spike, the event ending its interval and the state ``a1`` just after the reset,
        and only the ``K`` recorded spikes get an ``arctan2`` afterwards: the spike is at
        ``t1 - a1 Theta / pi`` with ``t1`` that event's time.

        Args: times ``[B, S]`` (the last one ``T``), kicks ``[S, B, N]`` or
        :class:`~jax_kernels.simulate.GatheredKicks` (rows gathered inside the scan, so no
        ``[S, B, N]`` kick array exists; coincident inputs may be separate zero-length steps since
        theta inputs compose: ``V + w1 + w2``), initial_state ``[1, N]``.
        Returns: spike times ``[B, N, K]``, spike counts ``[B, N]``, final phases ``[B, 1, N]``.
        """
        dtype = initial_state.dtype
        batch, n_neurons = times.shape[0], initial_state.shape[-1]
        angular_speed = self._root / self.tau  # pi / Theta
        interval_end = jnp.minimum(times, T)
        interval_start = jnp.concatenate(
            [jnp.zeros((batch, 1), dtype), interval_end[:, :-1]], axis=1
        )
        angle_step = (angular_speed * (interval_end - interval_start)).T[..., None]  # [S, B, 1]
        applied = (times < T).T  # [S, B]
        table, index = (kicks.table, kicks.index) if hasattr(kicks, "table") else (kicks, None)
        angle0 = angular_speed * initial_state[0]
        # sin(pi) rounds below 0 in float32: a phase of exactly Theta must not count as past it.
        initial_sin = jnp.sin(angle0)
        initial_sin = jnp.where(initial_sin < 0, 0.0, initial_sin)
        initial = jnp.stack([
            jnp.broadcast_to(jnp.cos(angle0), (batch, n_neurons)),
            jnp.broadcast_to(initial_sin, (batch, n_neurons)),
        ])
        scan = _native_rotation_scan if native.available() else _rotation_scan
        final, count, interval, reset_cos_k, reset_sin_k = scan(
            max_spikes, 1.0 / self._root, initial, angle_step, applied, table, index
        )  # spike records [K, B, N]
        n_events = times.shape[1]
        has_spike = interval < n_events
        event = (jnp.minimum(interval, n_events - 1).astype(jnp.int32),
                 jnp.arange(batch)[:, None])
        # A spike in an event's interval: the state just after it (reset, before the kick) has
        # turned by the angle since the spike.
        end_k = interval_end.T[event]
        spike_times = end_k - jnp.arctan2(reset_sin_k, reset_cos_k) / angular_speed
        # Rounding must not move a spike out of its interval (the start only bounds: no gradient).
        spike_times = jnp.clip(spike_times, lax.stop_gradient(interval_start).T[event], end_k)
        spike_times = jnp.moveaxis(jnp.where(has_spike, spike_times, jnp.inf), 0, -1)
        final_phase = jnp.arctan2(final[1], final[0]) / angular_speed
        return spike_times, count, final_phase[:, None, :]


#: The rotating layer's reverse pass keeps the state at every ``CHECKPOINT_EVENTS``-th event
#: and recomputes the events in between: stacking every event's state would write
#: ``[S, 2, B, N]`` per call, which on CPU costs more than the recomputation.
CHECKPOINT_EVENTS = 16


def _rotate_spike_kick(cos, sin, cos_step, sin_step, u):
    """One event of the rotating layer: rotate, reset spiking neurons (``z -> -z``), kick.

    Args: the state ``cos, sin [B, N]``, the rotation ``cos_step, sin_step [B, 1]``, kicks
    ``u [B, N]``. Returns the state after the event ``(cos, sin)``, whether each neuron spiked,
    and ``(reset_cos, reset_sin, sign, inverse_norm)``: the state after the reset (before the
    kick), the sign of the reset and the kick's inverse norm.
    """
    rotated_cos = cos * cos_step - sin * sin_step
    rotated_sin = sin * cos_step + cos * sin_step
    spiked = (rotated_sin < 0) | ((rotated_sin == 0) & (rotated_cos < 0))
    sign = jnp.where(spiked, -1.0, 1.0).astype(cos.dtype)
    reset_cos, reset_sin = sign * rotated_cos, sign * rotated_sin
    shifted = reset_cos - u * reset_sin
    inverse_norm = lax.rsqrt(shifted * shifted + reset_sin * reset_sin)
    return (shifted * inverse_norm, reset_sin * inverse_norm), spiked, (
        reset_cos, reset_sin, sign, inverse_norm)


def _stacked_event(state, cos_step, sin_step, u):
    """:func:`_rotate_spike_kick` on a stacked state ``[2, B, N]``, the form the forward scans
    carry: XLA's CPU backend then computes an event in one pass over the neurons (separate cos
    and sin carries split it into several passes, 3-4x slower). The reverse pass is the other
    way round: its separate arrays fuse better than stacked ones."""
    (cos, sin), spiked, parts = _rotate_spike_kick(state[0], state[1], cos_step, sin_step, u)
    return jnp.stack([cos, sin]), spiked, parts


def _event_kicks(table, index, applied, inverse_root):
    """Kicks ``u [B, N]`` of one event: its rows of ``table`` (``index [B]`` or, without an
    index, ``table`` is the event's ``[B, N]`` slice), zero where the event is not applied."""
    rows = table if index is None else table[index]
    return jnp.where(applied[:, None], rows, 0.0) * inverse_root


def _event_inputs(table, index):
    """What the scans slice per event: the kicks' ``[S, B, N]`` table or the ``[S, B]`` index."""
    return table if index is None else index


def _table_and_index(table, index, event_slice):
    """``(table, index)`` of one event from the slice :func:`_event_inputs` gave the scan."""
    return (event_slice, None) if index is None else (table, event_slice)


def _chunked_events(cos_step, sin_step, applied, kicks):
    """The per-event scan inputs padded to whole checkpoint chunks, ``[chunks, C, ...]``
    (``C <= CHECKPOINT_EVENTS``).

    Padding events do nothing: no rotation, no kick. (A state after an event never sits at
    ``sin = 0, cos < 0``, the one state a zero rotation would count as a spike.)
    """
    n_events = cos_step.shape[0]
    # Chunks of at most CHECKPOINT_EVENTS events, as equal as possible: fewer than one padding
    # event per chunk.
    n_chunks = -(-n_events // CHECKPOINT_EVENTS)
    chunk = -(-n_events // n_chunks)
    pad = n_chunks * chunk - n_events

    def padded(x, fill):
        if pad:
            x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    return (padded(cos_step, 1), padded(sin_step, 0), padded(applied, False), padded(kicks, 0))


def _interval_type(n_padded: int):
    return jnp.int16 if n_padded < 2**15 - 1 else jnp.int32


def _rotation_scan_fwd(max_spikes, inverse_root, state, angle_step, applied, table, index):
    cos_step, sin_step = jnp.cos(angle_step), jnp.sin(angle_step)
    chunks = _chunked_events(cos_step, sin_step, applied, _event_inputs(table, index))
    n_chunks, chunk = chunks[0].shape[:2]
    n_padded = n_chunks * chunk

    index_type = _interval_type(n_padded)
    event_index = jnp.arange(n_padded, dtype=index_type).reshape(n_chunks, chunk)

    def event_step(carry, event):
        state, count, interval, reset_cos_k, reset_sin_k = carry
        event_index, cos_step, sin_step, applied, kicks = event
        u = _event_kicks(*_table_and_index(table, index, kicks), applied, inverse_root)
        state, spiked, (reset_cos, reset_sin, _, _) = _stacked_event(state, cos_step, sin_step, u)
        # A neuron spikes at most once per event: its k-th spike is where its count passes k.
        # (K separate record arrays: stacked into one, XLA's CPU backend is several times slower.)
        here = [spiked & (count == k) for k in range(max_spikes)]
        interval = tuple(jnp.where(h, event_index, i) for h, i in zip(here, interval))
        reset_cos_k = tuple(jnp.where(h, reset_cos, r) for h, r in zip(here, reset_cos_k))
        reset_sin_k = tuple(jnp.where(h, reset_sin, r) for h, r in zip(here, reset_sin_k))
        return (state, count + spiked, interval, reset_cos_k, reset_sin_k), None

    def chunk_step(carry, chunk):
        checkpoint = carry[0]
        carry, _ = lax.scan(event_step, carry, chunk)
        return carry, checkpoint

    zeros = jnp.zeros(state.shape[1:], state.dtype)
    init = (
        state,
        jnp.zeros(state.shape[1:], jnp.int32),
        (jnp.full(state.shape[1:], n_padded, index_type),) * max_spikes,
        (zeros,) * max_spikes,
        (zeros,) * max_spikes,
    )
    (final, count, interval, reset_cos_k, reset_sin_k), checkpoints = lax.scan(
        chunk_step, init, (event_index, *chunks)
    )
    interval = jnp.stack(interval)
    outputs = (final, count, interval, jnp.stack(reset_cos_k), jnp.stack(reset_sin_k))
    return outputs, (checkpoints, cos_step, sin_step, applied, table, index, interval)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rotation_scan(max_spikes, inverse_root, state, angle_step, applied, table, index):
    """The event scan of :meth:`Theta._rotating_layer` with a hand-written reverse pass.

    Args: ``inverse_root = 1 / sqrt(I0 - 1/4)``; ``state [2, B, N]`` (cos, sin) at ``t = 0``;
    per event ``angle_step [S, B, 1]`` (the rotation since the previous event),
    ``applied [S, B]`` (bool: the event is inside the trial), the kicks (weights) either as
    ``table [S, B, N]`` with ``index = None`` or as rows ``table [R, N]`` picked by
    ``index [S, B]``.

    Returns: the final state ``[2, B, N]``, spike counts ``[B, N]`` (int32), and for each neuron's
    first ``K = max_spikes`` spikes ``[K, B, N]``: the event whose interval holds it (``>= S``:
    none) and the state just after that event's reset, before its kick (cos, sin).

    The reverse pass keeps the state every :data:`CHECKPOINT_EVENTS` events and recomputes the
    events in between, chunk by chunk; the spike records' cotangents enter it at their events.
    Gathered kicks are gathered again in the reverse pass and their rows' gradients added into
    the table's gradient, carried through it (no ``[S, B, N]`` array).
    """
    return _rotation_scan_fwd(max_spikes, inverse_root, state, angle_step, applied, table,
                              index)[0]


def _rotation_scan_bwd(max_spikes, inverse_root, residuals, cotangents):
    checkpoints, cos_step, sin_step, applied, table, index, interval = residuals
    grad_state, _, _, grad_reset_cos_k, grad_reset_sin_k = cotangents
    n_events = cos_step.shape[0]
    chunks = _chunked_events(cos_step, sin_step, applied, _event_inputs(table, index))
    n_chunks, chunk = chunks[0].shape[:2]
    event_index = jnp.arange(n_chunks * chunk, dtype=interval.dtype).reshape(n_chunks, chunk)

    def recompute(state, event):
        cos_step, sin_step, applied, kicks = event
        u = _event_kicks(*_table_and_index(table, index, kicks), applied, inverse_root)
        next_state, _, _ = _stacked_event(state, cos_step, sin_step, u)
        return next_state, (state[0], state[1])

    def reverse_step(carry, event):
        grad_cos, grad_sin, grad_table = carry  # w.r.t. the state after this event
        event_index, cos, sin, cos_step, sin_step, applied, kicks = event
        u = _event_kicks(*_table_and_index(table, index, kicks), applied, inverse_root)
        (cos_out, sin_out), _, (reset_cos, reset_sin, sign, inverse_norm) = _rotate_spike_kick(
            cos, sin, cos_step, sin_step, u
        )
        # Normalisation: d(out)/d(shifted, reset_sin) is r (sin_out, -cos_out) (sin_out, -cos_out)^T.
        q = inverse_norm * (grad_cos * sin_out - grad_sin * cos_out)
        grad_shifted = q * sin_out
        grad_reset_cos = grad_shifted
        grad_reset_sin = -q * cos_out - u * grad_shifted
        grad_kick = jnp.where(applied[:, None], -reset_sin * grad_shifted * inverse_root, 0.0)
        # Spikes recorded at this event (sums over the K slots unrolled: XLA's CPU reductions
        # over a leading axis are slow).
        for k in range(max_spikes):
            here = interval[k] == event_index
            grad_reset_cos = grad_reset_cos + jnp.where(here, grad_reset_cos_k[k], 0.0)
            grad_reset_sin = grad_reset_sin + jnp.where(here, grad_reset_sin_k[k], 0.0)
        grad_rotated_cos, grad_rotated_sin = sign * grad_reset_cos, sign * grad_reset_sin
        grad_cos_before = grad_rotated_cos * cos_step + grad_rotated_sin * sin_step
        grad_sin_before = grad_rotated_sin * cos_step - grad_rotated_cos * sin_step
        # d(rotated)/d(angle) = (-rotated_sin, rotated_cos); the reset's sign cancels. One sum
        # over the neurons rather than one per cos and sin of the angle.
        grad_angle = jnp.sum(grad_reset_sin * reset_cos - grad_reset_cos * reset_sin, -1,
                             keepdims=True)
        if index is None:  # the event's kicks are its own slice: their gradient leaves the scan
            return (grad_cos_before, grad_sin_before, grad_table), (grad_angle, grad_kick)
        # Gathered rows: their gradient is added into the table's, carried (no [S, B, N] array).
        grad_table = grad_table.at[kicks].add(grad_kick)
        return (grad_cos_before, grad_sin_before, grad_table), (grad_angle, None)

    def chunk_reverse(carry, chunk):
        checkpoint, event_index, *events = chunk
        _, (cos, sin) = lax.scan(recompute, checkpoint, tuple(events))
        return lax.scan(reverse_step, carry, (event_index, cos, sin, *events), reverse=True)

    grad_table = jnp.zeros((0,) if index is None else table.shape, table.dtype)
    (grad_cos, grad_sin, grad_table), per_event = lax.scan(
        chunk_reverse, (grad_state[0], grad_state[1], grad_table),
        (checkpoints, event_index, *chunks), reverse=True,
    )
    grad_angle, grad_kicks = (
        None if x is None else x.reshape(-1, *x.shape[2:])[:n_events] for x in per_event
    )
    if index is None:
        grad_table = grad_kicks
    return jnp.stack([grad_cos, grad_sin]), grad_angle, None, grad_table, None


_rotation_scan.defvjp(_rotation_scan_fwd, _rotation_scan_bwd)


def _native_rotation_scan_fwd(max_spikes, inverse_root, state, angle_step, applied, table, index):
    dtype = state.dtype
    batch, n_neurons = state.shape[1:]
    cos_step, sin_step = jnp.cos(angle_step[..., 0]), jnp.sin(angle_step[..., 0])  # [S, B]
    index = jnp.zeros((0,), jnp.int32) if index is None else index.astype(jnp.int32)
    attributes = dict(gathered=index.ndim == 2, inverse_root=np.float64(inverse_root))
    records = (max_spikes, batch, n_neurons)
    outputs = jax.ffi.ffi_call(
        native.target("forward", dtype),
        (
            jax.ShapeDtypeStruct(state.shape, dtype),
            jax.ShapeDtypeStruct((batch, n_neurons), jnp.int32),
            jax.ShapeDtypeStruct(records, jnp.int32),
            jax.ShapeDtypeStruct(records, dtype),
            jax.ShapeDtypeStruct(records, dtype),
        ),
        vmap_method="sequential",
    )(state, cos_step, sin_step, applied, table, index, **attributes)
    return tuple(outputs), (state, cos_step, sin_step, applied, table, index, outputs[2])


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _native_rotation_scan(max_spikes, inverse_root, state, angle_step, applied, table, index):
    """:func:`_rotation_scan` (same arguments and results; the event of a spike record is an
    int32) computed by the C++ kernel of :mod:`jax_kernels.native` on CPU: sample by sample, one
    sample's neurons in the cache for all its events. Its reverse pass recomputes each sample's
    events and runs them backwards, with the same arithmetic as :func:`_rotation_scan_bwd`."""
    return _native_rotation_scan_fwd(max_spikes, inverse_root, state, angle_step, applied,
                                     table, index)[0]


def _native_rotation_scan_bwd(max_spikes, inverse_root, residuals, cotangents):
    state, cos_step, sin_step, applied, table, index, interval = residuals
    grad_final, _, _, grad_reset_cos_k, grad_reset_sin_k = cotangents
    dtype = state.dtype
    grad_state, grad_angle, grad_table = jax.ffi.ffi_call(
        native.target("backward", dtype),
        (
            jax.ShapeDtypeStruct(state.shape, dtype),
            jax.ShapeDtypeStruct(cos_step.shape, dtype),
            jax.ShapeDtypeStruct(table.shape, dtype),
        ),
        vmap_method="sequential",
    )(state, cos_step, sin_step, applied, table, index, interval, grad_final.astype(dtype),
      grad_reset_cos_k.astype(dtype), grad_reset_sin_k.astype(dtype),
      gathered=index.ndim == 2, inverse_root=np.float64(inverse_root))
    return grad_state, grad_angle[..., None], None, grad_table, None


_native_rotation_scan.defvjp(_native_rotation_scan_fwd, _native_rotation_scan_bwd)
