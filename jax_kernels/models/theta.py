r"""Oscillatory quadratic integrate-and-fire (theta) neuron with delta-pulse coupling."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from math import pi, sqrt

import jax
import jax.numpy as jnp
from jax import Array, lax

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
        body is a few multiply-adds and one ``rsqrt`` per neuron; it records which spike slot each
        interval's spike fills, and only the ``K`` recorded spikes get an ``arctan2`` afterwards:
        a spike in the interval starting at ``t0`` in state ``a0`` is at ``t0 + (pi - a0) Theta / pi``.

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
        initial = (
            jnp.broadcast_to(jnp.cos(angle0), (batch, n_neurons)),
            jnp.broadcast_to(initial_sin, (batch, n_neurons)),
        )
        cos, sin, count, spike_interval, cos_k, sin_k, start_k = _rotation_scan(
            max_spikes, 1.0 / self._root, *initial, jnp.cos(angle_step), jnp.sin(angle_step),
            applied, table, index, interval_start.T,
        )  # spike records [K, B, N]
        n_events = times.shape[1]
        has_spike = spike_interval < n_events
        # The end of a spike's interval only bounds rounding: no gradient through it.
        end_k = lax.stop_gradient(interval_end).T[jnp.minimum(spike_interval, n_events - 1),
                                                  jnp.arange(batch)[:, None]]
        spike_times = start_k + (jnp.pi - jnp.arctan2(sin_k, cos_k)) / angular_speed
        # Rounding must not move a spike out of its interval.
        spike_times = jnp.clip(spike_times, start_k, end_k)
        spike_times = jnp.moveaxis(jnp.where(has_spike, spike_times, jnp.inf), 0, -1)
        final_phase = jnp.arctan2(sin, cos) / angular_speed
        return spike_times, count, final_phase[:, None, :]


def _spike_intervals(capped_count: Array, max_spikes: int) -> Array:
    """Event index ``[K, B, N]`` of each neuron's ``k``-th spike (``S``: no such spike).

    Counts never decrease, so spike ``k`` is in the first event after which the count exceeds
    ``k``. A scan over the events finds them; it is 100x faster on XLA's CPU backend than ``K``
    reductions of ``[S, B, N]`` over the event axis (integers: no gradient).
    """
    n_events = capped_count.shape[0]
    index_type = jnp.int16 if n_events < 2**15 - 1 else jnp.int32
    slots = jnp.arange(max_spikes, dtype=capped_count.dtype)[:, None, None]

    def step(interval, event):
        index, count = event
        first = (count[None] > slots) & (interval == n_events)
        return jnp.where(first, index.astype(index_type), interval), None

    interval, _ = lax.scan(
        step,
        jnp.full((max_spikes, *capped_count.shape[1:]), n_events, index_type),
        (jnp.arange(n_events, dtype=jnp.int32), capped_count),
    )
    return interval


def _rotate_spike_kick(cos, sin, cos_step, sin_step, u):
    """One event of the rotating layer: rotate, reset spiking neurons (``z -> -z``), kick.

    Returns the state after the event, whether each neuron spiked, and what the backward pass
    needs: the sign of the reset, the state before the kick and the inverse norm.
    """
    rotated_cos = cos * cos_step - sin * sin_step
    rotated_sin = sin * cos_step + cos * sin_step
    spiked = (rotated_sin < 0) | ((rotated_sin == 0) & (rotated_cos < 0))
    sign = jnp.where(spiked, -1.0, 1.0).astype(cos.dtype)
    reset_cos, reset_sin = sign * rotated_cos, sign * rotated_sin
    shifted = reset_cos - u * reset_sin
    inverse_norm = lax.rsqrt(shifted * shifted + reset_sin * reset_sin)
    return (shifted * inverse_norm, reset_sin * inverse_norm), spiked, (sign, reset_sin,
                                                                      inverse_norm)


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


def _rotation_scan_forward(max_spikes, inverse_root, cos, sin, cos_step, sin_step, applied,
                           table, index):
    # Spike counts leave the scan capped at K, in the narrowest integer type that holds K.
    count_type = jnp.int8 if max_spikes < 127 else jnp.int32

    def step(carry, event):
        cos, sin, count = carry
        cos_step, sin_step, applied, kicks = event
        u = _event_kicks(*_table_and_index(table, index, kicks), applied, inverse_root)
        (cos_next, sin_next), spiked, _ = _rotate_spike_kick(cos, sin, cos_step, sin_step, u)
        count = count + spiked
        capped = jnp.minimum(count, max_spikes).astype(count_type)
        return (cos_next, sin_next, count), (capped, cos, sin)

    count = jnp.zeros(cos.shape, jnp.int32)
    (cos, sin, count), (capped, cos_start, sin_start) = lax.scan(
        step, (cos, sin, count), (cos_step, sin_step, applied, _event_inputs(table, index))
    )
    return cos, sin, count, capped, cos_start, sin_start


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rotation_scan(max_spikes, inverse_root, cos, sin, cos_step, sin_step, applied, table, index,
                   interval_start):
    """The event scan of :meth:`Theta._rotating_layer` with a hand-written reverse pass.

    Args: ``inverse_root = 1 / sqrt(I0 - 1/4)``; states ``cos, sin [B, N]`` at ``t = 0``; per
    event ``cos_step, sin_step [S, B, 1]`` (the rotation since the previous event),
    ``applied [S, B]`` (bool: the event is inside the trial), the kicks (weights) either as
    ``table [S, B, N]`` with ``index = None`` or as rows ``table [R, N]`` picked by
    ``index [S, B]``, and ``interval_start [S, B]`` (the previous event's time).

    Returns: final ``cos, sin [B, N]``, spike counts ``[B, N]``, and for each neuron's first
    ``K = max_spikes`` spikes ``[K, B, N]``: the event whose interval holds it (``S``: none), and
    the state and time at the start of that interval.

    The reverse pass keeps only the states at the start of each event and recomputes the rest of
    the event (autodiff kept nine arrays per event); the spike records' cotangents enter it at
    their events, where autodiff would scatter-add them into ``[S, B, N]`` arrays. Gathered
    kicks are gathered again in the reverse pass and their rows' gradients added into the
    table's, carried through it.
    """
    return _rotation_scan_fwd(max_spikes, inverse_root, cos, sin, cos_step, sin_step, applied,
                              table, index, interval_start)[0]


def _rotation_scan_fwd(max_spikes, inverse_root, cos, sin, cos_step, sin_step, applied, table,
                       index, interval_start):
    cos_end, sin_end, count, capped, cos_start, sin_start = _rotation_scan_forward(
        max_spikes, inverse_root, cos, sin, cos_step, sin_step, applied, table, index
    )
    interval = _spike_intervals(capped, max_spikes)
    event = jnp.minimum(interval, capped.shape[0] - 1).astype(jnp.int32)
    cos_k = jnp.take_along_axis(cos_start, event, axis=0)
    sin_k = jnp.take_along_axis(sin_start, event, axis=0)
    start_k = jnp.take_along_axis(interval_start[..., None], event, axis=0)
    outputs = (cos_end, sin_end, count, interval, cos_k, sin_k, start_k)
    return outputs, (cos_start, sin_start, cos_step, sin_step, applied, table, index, interval)


def _rotation_scan_bwd(max_spikes, inverse_root, residuals, cotangents):
    cos_start, sin_start, cos_step, sin_step, applied, table, index, interval = residuals
    grad_cos, grad_sin, _, _, grad_cos_k, grad_sin_k, grad_start_k = cotangents

    def step(carry, event):
        grad_cos, grad_sin, grad_table = carry  # w.r.t. the state after this event
        event_index, cos, sin, cos_step, sin_step, applied, kicks = event
        u = _event_kicks(*_table_and_index(table, index, kicks), applied, inverse_root)
        (cos_out, sin_out), _, (sign, reset_sin, inverse_norm) = _rotate_spike_kick(
            cos, sin, cos_step, sin_step, u
        )
        # Normalisation: d(out)/d(shifted, reset_sin) is r (sin_out, -cos_out) (sin_out, -cos_out)^T.
        q = inverse_norm * (grad_cos * sin_out - grad_sin * cos_out)
        grad_shifted = q * sin_out
        grad_reset_sin = -q * cos_out - u * grad_shifted
        grad_kick = jnp.where(applied[:, None], -reset_sin * grad_shifted * inverse_root, 0.0)
        grad_rotated_cos, grad_rotated_sin = sign * grad_shifted, sign * grad_reset_sin
        grad_cos_before = grad_rotated_cos * cos_step + grad_rotated_sin * sin_step
        grad_sin_before = grad_rotated_sin * cos_step - grad_rotated_cos * sin_step
        grad_cos_step = jnp.sum(grad_rotated_cos * cos + grad_rotated_sin * sin, -1, keepdims=True)
        grad_sin_step = jnp.sum(grad_rotated_sin * cos - grad_rotated_cos * sin, -1, keepdims=True)
        # Spikes recorded at this event: their start state and start time.
        # (Sums over the K slots unrolled: XLA's CPU reductions over a leading axis are slow.)
        grad_start = jnp.zeros_like(grad_cos_before)
        for k in range(max_spikes):
            here = interval[k] == event_index
            grad_cos_before = grad_cos_before + jnp.where(here, grad_cos_k[k], 0.0)
            grad_sin_before = grad_sin_before + jnp.where(here, grad_sin_k[k], 0.0)
            grad_start = grad_start + jnp.where(here, grad_start_k[k], 0.0)
        grad_start = jnp.sum(grad_start, -1)
        if index is None:  # the event's kicks are its own slice: their gradient leaves the scan
            return (grad_cos_before, grad_sin_before, grad_table), (
                grad_cos_step, grad_sin_step, grad_kick, grad_start)
        # Gathered rows: their gradient is added into the table's, carried (no [S, B, N] array).
        grad_table = grad_table.at[kicks].add(grad_kick)
        return (grad_cos_before, grad_sin_before, grad_table), (
            grad_cos_step, grad_sin_step, None, grad_start)

    n_events = cos_start.shape[0]
    grad_table = jnp.zeros((0,) if index is None else table.shape, table.dtype)
    (grad_cos, grad_sin, grad_table), (grad_cos_step, grad_sin_step, grad_kicks, grad_start) = (
        lax.scan(
            step,
            (grad_cos, grad_sin, grad_table),
            (jnp.arange(n_events, dtype=interval.dtype), cos_start, sin_start, cos_step,
             sin_step, applied, _event_inputs(table, index)),
            reverse=True,
        )
    )
    if index is None:
        grad_table = grad_kicks
    return (grad_cos, grad_sin, grad_cos_step, grad_sin_step, None, grad_table, None,
            grad_start)


_rotation_scan.defvjp(_rotation_scan_fwd, _rotation_scan_bwd)
