"""Convolutional layer of theta neurons whose cost follows the input events.

A convolutional layer is a feedforward layer whose weight matrix is the unrolled convolution, so
:func:`jax_kernels.layers.spiking_layer` with that matrix computes it exactly; but it advances
all ``C_out H' W'`` neurons at every input event. Here an input event at ``(c, h, w)`` touches
only the ``C_out k^2`` neurons whose receptive field contains it.

Theta neurons (``T`` below their free period) make this cheap: free flow rotates every neuron's
phase point ``z = (cos a, sin a)``, ``a = pi phi / Theta``, by the same angle. The layer stores
each neuron in the *co-rotating* frame, ``z~ = R(-omega t) z``, which stays constant between the
neuron's own inputs. At an event at time ``t`` the touched neurons are rotated to ``t``; one whose
angle passed ``pi`` since it was last touched spiked in between (at most once, as ``T <
Theta``), at the time read off its angle; then the kick is applied (the phase transfer function
in the algebraic form of ``Theta._rotating_layer``) and the point rotated back. Spikes after a
neuron's last kick are found at the trial end, where all neurons are rotated once more.

Everything is differentiable (weights, initial phases, input times) with ``jax.grad``. On CPU the
event loop runs in a C++ kernel (:mod:`jax_kernels.native`): sample by sample with the sample's
neurons in the cache, each spike recorded as it is found, and a reverse pass that recomputes the
sample's events and runs them backwards. Elsewhere (GPU, or no compiler) a batched ``lax.scan``
does the same arithmetic on the touched lanes, with a hand-written reverse pass (JAX's transpose
of the per-event gathers would add a whole-layer cotangent per event); spike times are read off
after the loop for the spiked lanes only. Both paths are tested equal.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import Array, lax

from jax_kernels import native
from jax_kernels.layers import LayerOutput
from jax_kernels.models.theta import Theta
from jax_kernels.simulate import (
    BatchEvents,
    batched_feedforward_layer,
    earliest_input_spikes,
    filled_spike_times,
)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (``torch.nn.Conv2d``'s formula)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def check_conv_geometry(in_shape: tuple[int, int, int], kernel_size: int, stride: int,
                        padding: int) -> tuple[int, int]:
    """Validate the geometry (``in_shape`` a tuple or list); return the output grid
    ``(H', W')``."""
    if (not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in in_shape)):
        raise ValueError(f"`in_shape` must be (C, H, W), three positive ints, got {in_shape!r}")
    for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1),
                             ("padding", padding, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    _, height, width = in_shape
    out = tuple(conv_output_size(n, kernel_size, stride, padding) for n in (height, width))
    if min(out) < 1:
        raise ValueError(
            f"kernel_size={kernel_size} with padding={padding} does not fit the input grid "
            f"{height}x{width}; use a smaller kernel or more padding"
        )
    return out


def _checked_geometry(caller: str, model, weights: Array, in_shape, stride: int, padding: int,
                      T: float) -> tuple[int, int]:
    """The one validation of a conv layer's arguments; returns the output grid ``(H', W')``."""
    if not isinstance(model, Theta):
        raise TypeError(f"{caller}: `model` must be a Theta neuron, got {model!r}")
    if not T < model.period:
        raise ValueError(
            f"{caller}: needs T < the theta period {model.period} (at most one spike "
            f"between a neuron's inputs), got T={T}"
        )
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError(f"{caller}: weights must be [C_out, C_in, k, k], got shape "
                         f"{weights.shape}")
    if weights.shape[1] != in_shape[0]:
        raise ValueError(
            f"{caller}: weights have {weights.shape[1]} input channels but in_shape is {in_shape}"
        )
    return check_conv_geometry(in_shape, weights.shape[-1], stride, padding)


def _convolve(values: Array, weights: Array, in_shape, stride: int, padding: int) -> Array:
    """``[M, C_in H W]`` -> ``[M, C_out H' W']``: the convolution, flattened channel-major."""
    out = lax.conv_general_dilated(
        values.reshape(values.shape[0], *in_shape).astype(weights.dtype), weights,
        window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        precision=lax.Precision.HIGHEST,
    )
    return out.reshape(values.shape[0], -1)


def _pseudo_outputs(model: Theta, spike_times, spike_count, final_phase, drive, T, pseudo):
    """``(filled_times [B, N, K], pseudo_rate [B, N])`` of a layer with final phases
    ``[B, N]`` and pseudo drive ``[B, N]`` (``None``: zeros); without pseudospikes the spike
    times themselves and zero rates."""
    if not pseudo:
        return spike_times, jnp.zeros(final_phase.shape, final_phase.dtype)
    if drive is None:
        drive = jnp.zeros(final_phase.shape, final_phase.dtype)
    filled = jax.vmap(filled_spike_times, in_axes=(None, 0, 0, 0, 0, None))(
        model, spike_times, spike_count, final_phase[:, None, :], drive, T
    )
    return filled, model.pseudo_rate(final_phase[None], drive)  # [D = 1, B, N] states


def _reached_neurons(source: Array, in_shape, out_shape, k: int, stride: int, padding: int):
    """For each event's source input ``[M]``, the flat indices ``[M, P]`` of the
    ``P = C_out k^2`` neurons it can reach, in the order of ``weights[:, c].reshape(-1)``, and
    whether each is on the grid (a kernel position can fall off the grid or between strides)."""
    _, height, width = in_shape
    c_out, out_h, out_w = out_shape
    row, col = (source // width) % height, source % width
    offsets = jnp.arange(k)

    def positions(coordinate, size):
        # Output position o receives input position i through kernel tap j iff
        # o * stride - padding + j = i.
        numerator = coordinate[:, None] + padding - offsets[None, :]
        position = numerator // stride
        valid = (numerator % stride == 0) & (position >= 0) & (position < size)
        return position, valid

    out_row, valid_row = positions(row, out_h)
    out_col, valid_col = positions(col, out_w)
    neuron = (jnp.arange(c_out)[None, :, None, None] * (out_h * out_w)
              + out_row[:, None, :, None] * out_w + out_col[:, None, None, :])
    valid = valid_row[:, None, :, None] & valid_col[:, None, None, :]
    shape = (source.shape[0], c_out * k * k)
    return neuron.reshape(shape), jnp.broadcast_to(valid, neuron.shape).reshape(shape)


def _rotate(cos: Array, sin: Array, cos_angle: Array, sin_angle: Array):
    return cos * cos_angle - sin * sin_angle, sin * cos_angle + cos * sin_angle


def _passed_pi(cos: Array, sin: Array) -> Array:
    return (sin < 0) | ((sin == 0) & (cos < 0))


def _half_angle_tangent(cos: Array, sin: Array) -> Array:
    """``tan(a / 2)`` of a unit-circle point at angle ``a`` in ``[0, pi)`` (``sin >= 0``): one
    division, where ``atan2`` per touched neuron and event dominated the event step. Each
    branch divides by a quantity bounded away from 0 on it (safe operands keep the unused
    branch finite)."""
    upper = cos >= 0
    return jnp.where(upper, sin / (1 + jnp.where(upper, cos, 0.0)),
                     (1 - cos) / jnp.where(upper, 1.0, sin))


def _gather_lanes(values: Array, target: Array, fill_value) -> Array:
    """``values[b, target[b, p]]`` (``[B, N]`` -> ``[B, P]``), ``fill_value`` off the grid."""
    sample = jnp.arange(values.shape[0])[:, None]
    return values.at[sample, target].get(mode="fill", fill_value=fill_value,
                                         unique_indices=True)


def _set_lanes(values: Array, target: Array, lanes: Array) -> Array:
    """``values[b, target[b, p]] = lanes[b, p]`` in place; off-grid targets are dropped."""
    sample = jnp.arange(values.shape[0])[:, None]
    return values.at[sample, target].set(lanes, mode="drop", unique_indices=True)


class _Geometry(NamedTuple):
    """Static description of a conv layer's event loop (hashable)."""
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    stride: int
    padding: int
    root: float  # sqrt(I0 - 1/4): kicks in the rotating form are w / root


def _event_lanes(geometry: _Geometry, taps: Array, source: Array, in_trial: Array):
    """The ``P`` lanes of one event per sample (``source``, ``in_trial`` ``[B]``; ``taps``
    ``[C_in, P]``, the weights by input channel): the target neurons ``[B, P]`` (off the grid or
    out of the trial: ``N + p``, distinct, so scatters need no duplicate handling, whose
    derivative would cost O(N) per event), the kicks ``[B, P]`` and where they act."""
    n_neurons = math.prod(geometry.out_shape)
    k = math.isqrt(taps.shape[1] // geometry.out_shape[0])
    neuron, valid = _reached_neurons(source, geometry.in_shape, geometry.out_shape, k,
                                     geometry.stride, geometry.padding)
    acting = valid & in_trial[:, None]
    target = jnp.where(acting, neuron, n_neurons + jnp.arange(neuron.shape[1]))
    tap = taps[source // (geometry.in_shape[1] * geometry.in_shape[2])]
    return target, jnp.where(acting, tap / geometry.root, 0.0), acting


def _taps(weights: Array) -> Array:
    """``[C_out, C_in, k, k]`` -> ``[C_in, C_out k^2]``: an event's kicks are one row."""
    return jnp.moveaxis(weights, 1, 0).reshape(weights.shape[1], -1)


class _LaneEvent(NamedTuple):
    """One event on its touched lanes ``[B, P]``, the arithmetic the forward scan runs and the
    reverse pass recomputes: the points rotated to the event and reset past a spike (``z ->
    -z``, ``sign``), then kicked and normalised (still at the event time)."""
    spiked: Array
    sign: Array
    cos_reset: Array
    sin_reset: Array
    inverse_norm: Array
    cos_kicked: Array
    sin_kicked: Array

    @classmethod
    def of(cls, cos0, sin0, kick, c, s, target, n_neurons):
        cos, sin = _rotate(cos0, sin0, c, s)
        spiked = _passed_pi(cos, sin) & (target < n_neurons)
        sign = jnp.where(spiked, -1.0, 1.0).astype(cos0.dtype)
        cos, sin = sign * cos, sign * sin
        shifted = cos - kick * sin
        inverse_norm = lax.rsqrt(shifted * shifted + sin * sin)
        return cls(spiked, sign, cos, sin, inverse_norm, shifted * inverse_norm,
                   sin * inverse_norm)


def _event_scan_forward(geometry, frame, taps, source, in_trial, cos_t, sin_t, keep_lanes):
    """The event loop: ``frame`` ``(cos, sin)`` ``[B, N]`` at ``t = 0`` (co-rotating),
    ``taps`` ``[C_in, P]`` (see :func:`_taps`), ``source``/``in_trial``/``cos_t``/``sin_t``
    ``[E, B]``. Each event rotates its touched points to the event time, checks for a spike
    (the angle passed ``pi``), kicks them and rotates them back. Returns the final frame and
    per event ``(tangent, key)`` ``[E, B, P]``: the tangent of half the angle travelled since a
    spike and the spiking neuron (``N``: none); with ``keep_lanes`` also the touched points
    before the event (the reverse pass's residuals)."""
    n_neurons = math.prod(geometry.out_shape)

    def step(carry, event):
        cos_frame, sin_frame = carry
        source_e, in_trial_e, c, s = event
        c, s = c[:, None], s[:, None]
        target, kick, _ = _event_lanes(geometry, taps, source_e, in_trial_e)
        cos0, sin0 = _gather_lanes(cos_frame, target, 1.0), _gather_lanes(sin_frame, target, 0.0)
        lane = _LaneEvent.of(cos0, sin0, kick, c, s, target, n_neurons)
        # After a spike the point is -z; its angle is the time since the spike.
        tangent = _half_angle_tangent(lane.cos_reset, lane.sin_reset)
        cos, sin = _rotate(lane.cos_kicked, lane.sin_kicked, c, -s)
        carry = (_set_lanes(cos_frame, target, cos), _set_lanes(sin_frame, target, sin))
        outputs = (tangent, jnp.where(lane.spiked, target, n_neurons))
        return carry, outputs + ((cos0, sin0) if keep_lanes else ())

    return lax.scan(step, frame, (source, in_trial, cos_t, sin_t))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _event_scan(geometry, frame, taps, source, in_trial, cos_t, sin_t):
    """Final frame and per-event ``(tangent, key)`` of the event loop, differentiable in the
    frame, the taps and the event rotations (``source``, ``in_trial``: integer, boolean)."""
    frame, (tangent, key) = _event_scan_forward(geometry, frame, taps, source, in_trial,
                                                cos_t, sin_t, keep_lanes=False)
    return frame, tangent, key


def _event_scan_fwd(geometry, frame, taps, source, in_trial, cos_t, sin_t):
    frame, (tangent, key, cos0, sin0) = _event_scan_forward(
        geometry, frame, taps, source, in_trial, cos_t, sin_t, keep_lanes=True)
    return (frame, tangent, key), (taps, source, in_trial, cos_t, sin_t, cos0, sin0)


def _event_scan_bwd(geometry, residuals, cotangents):
    """Reverse pass: the events backwards, each touching only its ``P`` lanes of the frame's
    cotangent (JAX's transpose of the gathers adds a whole-layer cotangent per event) and
    adding its kicks' cotangents to the taps' in place."""
    taps, source, in_trial, cos_t, sin_t, cos0_all, sin0_all = residuals
    frame_cotangent, tangent_cotangent, _ = cotangents
    n_neurons = math.prod(geometry.out_shape)
    _, height, width = geometry.in_shape

    def step(carry, event):
        g_cos_frame, g_sin_frame, g_taps = carry
        source_e, in_trial_e, c, s, cos0, sin0, g_tangent = event
        c, s = c[:, None], s[:, None]
        target, kick, acting = _event_lanes(geometry, taps, source_e, in_trial_e)
        # Recompute the event on its lanes: reset (2), kicked (3).
        lane = _LaneEvent.of(cos0, sin0, kick, c, s, target, n_neurons)
        sign, inverse_norm = lane.sign, lane.inverse_norm
        cos2, sin2, cos3, sin3 = lane.cos_reset, lane.sin_reset, lane.cos_kicked, lane.sin_kicked
        # Cotangents of the lanes after the event (0 off the grid: never read again).
        g_cos4 = _gather_lanes(g_cos_frame, target, 0.0)
        g_sin4 = _gather_lanes(g_sin_frame, target, 0.0)
        # Rotation back by the event angle: (cos4, sin4) = R(-a) (cos3, sin3).
        g_cos3 = g_cos4 * c - g_sin4 * s
        g_sin3 = g_cos4 * s + g_sin4 * c
        g_c = g_cos4 * cos3 + g_sin4 * sin3
        g_s = g_cos4 * sin3 - g_sin4 * cos3
        # Normalisation: (cos3, sin3) = (shifted, sin2) / r.
        radial = g_cos3 * cos3 + g_sin3 * sin3
        g_shifted = inverse_norm * (g_cos3 - radial * cos3)
        g_sin2 = inverse_norm * (g_sin3 - radial * sin3)
        # Kick: shifted = cos2 - u sin2.
        g_cos2 = g_shifted
        g_sin2 = g_sin2 - kick * g_shifted
        g_kick = jnp.where(acting, -sin2 * g_shifted / geometry.root, 0.0)
        # Spike-time tangent (see _half_angle_tangent), safe operands on both branches.
        upper = cos2 >= 0
        one_plus = 1 + jnp.where(upper, cos2, 0.0)
        safe_sin = jnp.where(upper, 1.0, sin2)
        g_cos2 = g_cos2 + g_tangent * jnp.where(upper, -sin2 / (one_plus * one_plus),
                                                -1 / safe_sin)
        g_sin2 = g_sin2 + g_tangent * jnp.where(upper, 1 / one_plus,
                                                -(1 - cos2) / (safe_sin * safe_sin))
        g_cos1, g_sin1 = sign * g_cos2, sign * g_sin2
        # Rotation to the event angle: (cos1, sin1) = R(a) (cos0, sin0).
        g_cos0 = g_cos1 * c + g_sin1 * s
        g_sin0 = -g_cos1 * s + g_sin1 * c
        g_c = g_c + g_cos1 * cos0 + g_sin1 * sin0
        g_s = g_s - g_cos1 * sin0 + g_sin1 * cos0
        # The kicks are the taps of each sample's event's input channel.
        g_taps = g_taps.at[source_e // (height * width)].add(g_kick)
        carry = (_set_lanes(g_cos_frame, target, g_cos0), _set_lanes(g_sin_frame, target, g_sin0),
                 g_taps)
        return carry, (jnp.sum(g_c, axis=1), jnp.sum(g_s, axis=1))

    (g_cos, g_sin, g_taps), (g_cos_t, g_sin_t) = lax.scan(
        step, (*frame_cotangent, jnp.zeros_like(taps)),
        (source, in_trial, cos_t, sin_t, cos0_all, sin0_all, tangent_cotangent), reverse=True)
    return (g_cos, g_sin), g_taps, None, None, g_cos_t, g_sin_t


_event_scan.defvjp(_event_scan_fwd, _event_scan_bwd)


def _jax_step_spikes(geometry, angular_speed, max_spikes, frame, taps, source, in_trial,
                     times):
    """The spikes found at the input events, by the pure-JAX event scan: the final frame,
    ``spike_count`` ``[B, N]`` and ``spike_times`` ``[B, N, K]`` (``+inf`` padded). ``frame``:
    ``(cos, sin)`` ``[B, N]``; ``taps`` ``[C_in, P]``; the rest ``[E, B]``, ``times`` 0 outside
    the trial."""
    batch, n_neurons = frame[0].shape
    frame, spike_tangent, step_neuron = _event_scan(
        geometry, frame, taps, source, in_trial, jnp.cos(angular_speed * times),
        jnp.sin(angular_speed * times))
    n_reached = step_neuron.shape[-1]
    # Spikes found in the event steps ([E, B, P], event-major, so in time order), compacted: of
    # the E B P candidates few spiked. Keys number the neurons of the whole batch, b N + n.
    n_keys = batch * n_neurons
    spiked = step_neuron < n_neurons
    step_key = jnp.where(spiked, step_neuron + n_neurons * jnp.arange(batch)[:, None], n_keys)
    spike_count = jnp.zeros((n_keys,), jnp.int32).at[step_key.reshape(-1)].add(1, mode="drop")
    # Only the first B N K spikes (in time order) are kept: they hold every neuron's spikes
    # unless a neuron spiked more than K times, which spike_count reports as an overflow (the
    # output is then invalid anyway).
    kept = jnp.nonzero(spiked.reshape(-1), size=min(n_keys * max_spikes, spiked.size),
                       fill_value=spiked.size)[0]
    key = step_key.reshape(-1).at[kept].get(mode="fill", fill_value=n_keys)
    tangent = spike_tangent.reshape(-1).at[kept].get(mode="fill", fill_value=0.0)
    step_time = times.reshape(-1).at[kept // n_reached].get(mode="fill", fill_value=jnp.inf)
    found_time = jnp.maximum(step_time - 2 * jnp.arctan(tangent) / angular_speed, 0.0)
    # Each neuron's spikes are found in time order, so its k-th found spike is its k-th spike:
    # a stable sort by neuron keeps that order, and the slot is the position within the neuron.
    order = jnp.argsort(key, stable=True)
    key, found_time = key[order], found_time[order]
    position = jnp.arange(key.shape[0])
    first = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    slot = position - lax.cummax(jnp.where(first, position, 0))
    key = jnp.where((key < n_keys) & (slot < max_spikes), key, n_keys)
    spike_times = jnp.full((n_keys, max_spikes), jnp.inf, times.dtype).at[key, slot].set(
        found_time, mode="drop")
    return (frame, spike_count.reshape(batch, n_neurons),
            spike_times.reshape(batch, n_neurons, max_spikes))


def _native_attributes(geometry: _Geometry, taps: Array, angular_speed: float) -> dict:
    (_, in_h, in_w), (out_c, out_h, out_w) = geometry.in_shape, geometry.out_shape
    return dict(in_h=in_h, in_w=in_w, out_c=out_c, out_h=out_h, out_w=out_w,
                kernel_size=math.isqrt(taps.shape[1] // out_c), stride=geometry.stride,
                padding=geometry.padding, inverse_root=float(1 / geometry.root),
                angular_speed=float(angular_speed))


def _native_step_spikes_fwd(geometry, angular_speed, max_spikes, frame, taps, source, in_trial,
                            times):
    dtype = taps.dtype
    state = jnp.stack(frame)
    batch, n_neurons = frame[0].shape
    source = source.astype(jnp.int32)
    angle = angular_speed * times
    inputs = (state, taps, source, in_trial, jnp.cos(angle), jnp.sin(angle), times)
    final, spike_count, spike_times = jax.ffi.ffi_call(
        native.target("conv_forward", dtype),
        (jax.ShapeDtypeStruct(state.shape, dtype),
         jax.ShapeDtypeStruct((batch, n_neurons), jnp.int32),
         jax.ShapeDtypeStruct((batch, n_neurons, max_spikes), dtype)),
        vmap_method="sequential",
    )(*inputs, **_native_attributes(geometry, taps, angular_speed))
    return ((final[0], final[1]), spike_count, spike_times), inputs


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _native_step_spikes(geometry, angular_speed, max_spikes, frame, taps, source, in_trial,
                        times):
    """:func:`_jax_step_spikes` (same arguments and results) computed by the C++ kernel of
    :mod:`jax_kernels.native` on CPU: sample by sample, spikes recorded as they are found. Its
    reverse pass recomputes each sample's events and runs them backwards, with the arithmetic of
    :func:`_event_scan_bwd`."""
    return _native_step_spikes_fwd(geometry, angular_speed, max_spikes, frame, taps, source,
                                   in_trial, times)[0]


def _native_step_spikes_bwd(geometry, angular_speed, max_spikes, inputs, cotangents):
    (grad_cos, grad_sin), _, grad_spike_times = cotangents
    state, taps = inputs[:2]
    dtype = taps.dtype
    grad_state, grad_taps, grad_times = jax.ffi.ffi_call(
        native.target("conv_backward", dtype),
        (jax.ShapeDtypeStruct(state.shape, dtype), jax.ShapeDtypeStruct(taps.shape, dtype),
         jax.ShapeDtypeStruct(inputs[-1].shape, dtype)),
        vmap_method="sequential",
    )(*inputs, jnp.stack([grad_cos, grad_sin]).astype(dtype), grad_spike_times.astype(dtype),
      **_native_attributes(geometry, taps, angular_speed))
    return (grad_state[0], grad_state[1]), grad_taps, None, None, grad_times


_native_step_spikes.defvjp(_native_step_spikes_fwd, _native_step_spikes_bwd)


def theta_conv_simulate(
    model: Theta,
    weights: Array,
    initial_phase: Array,
    input_times: Array,
    *,
    in_shape: tuple[int, int, int],
    stride: int,
    padding: int,
    T: float,
    max_events: int,
    max_spikes: int,
):
    """Simulate a batch through a theta convolutional layer (arguments as validated by
    :func:`theta_conv_layer`).

    Args:
        model: the theta neuron (``T < model.period``).
        weights: ``[C_out, C_in, k, k]``.
        initial_phase: ``[N]`` phases at ``t = 0`` of the ``N = C_out H' W'`` neurons
            (channel-major, as ``[C_out, H', W']`` flattened).
        input_times: ``[B, C_in H W, K_in]`` input spike times (``>= 0``, ``+inf`` padded).

    Returns:
        ``(spike_times [B, N, K], spike_count [B, N], final_phase [B, N], n_dropped [B])``.
    """
    dtype = initial_phase.dtype
    batch = input_times.shape[0]
    kernel_size = weights.shape[-1]
    out_shape = (weights.shape[0], *(conv_output_size(n, kernel_size, stride, padding)
                                     for n in in_shape[1:]))
    n_neurons = math.prod(out_shape)
    root = math.sqrt(model.I0 - 0.25)
    angular_speed = root / model.tau  # pi / Theta

    times, source, n_dropped = jax.vmap(earliest_input_spikes, (0, None, None))(
        input_times.astype(dtype), max_events, T)
    # Event-major [E, B]: the scan's inputs and outputs need no transposes.
    times, source = times.T, source.T
    in_trial = times < T
    angle0 = angular_speed * initial_phase
    # sin(pi) rounds below 0 in float32: a phase of exactly Theta must not count as past it.
    # (A phase past Theta counts as Theta; the point stays on the unit circle.)
    past = jnp.sin(angle0) < 0
    cos0 = jnp.where(past, -1.0, jnp.cos(angle0))
    sin0 = jnp.where(past, 0.0, jnp.sin(angle0))
    frame0 = tuple(jnp.broadcast_to(a, (batch, n_neurons)) for a in (cos0, sin0))
    geometry = _Geometry(tuple(in_shape), out_shape, stride, padding, root)
    step_spikes = _native_step_spikes if native.available() else _jax_step_spikes
    (cos_frame, sin_frame), step_count, step_times = step_spikes(
        geometry, angular_speed, max_spikes, frame0, _taps(weights.astype(dtype)), source,
        in_trial, jnp.where(in_trial, times, 0.0))
    # Trial end: every neuron once more, for a spike after its last kick (its next slot).
    end_angle = angular_speed * T
    cos, sin = _rotate(cos_frame, sin_frame, math.cos(end_angle), math.sin(end_angle))
    spiked_end = _passed_pi(cos, sin)
    cos, sin = jnp.where(spiked_end, -cos, cos), jnp.where(spiked_end, -sin, sin)
    end_spike_time = jnp.maximum(T - jnp.arctan2(sin, cos) / angular_speed, 0.0)
    final_phase = jnp.arctan2(sin, cos) / angular_speed
    end_slot = spiked_end[..., None] & (jnp.arange(max_spikes) == step_count[..., None])
    spike_times = jnp.where(end_slot, end_spike_time[..., None], step_times)
    return spike_times, step_count + spiked_end, final_phase, n_dropped


def theta_conv_layer(
    weights: Array,
    initial_phase: Array,
    input_times: Array,
    input_rate: Optional[Array] = None,
    *,
    model: Theta,
    in_shape: tuple[int, int, int],
    stride: int,
    padding: int,
    T: float,
    max_events: int,
    max_spikes: int,
    pseudo: bool = True,
) -> LayerOutput:
    """A convolutional layer of theta neurons on a batch of input spike trains.

    The layer equals :func:`jax_kernels.layers.spiking_layer` with the unrolled convolution as
    weight matrix (and ``initial_phase`` repeated over positions); pseudospikes use the drive
    ``conv(weights, input_rate)``, the dense layer's ``W @ r``.

    Args:
        weights: ``[C_out, C_in, k, k]``.
        initial_phase: ``[1, C_out]`` initial phases, one per output channel (the ``[D, C]``
            state layout of the dense layers).
        input_times: ``[B, C_in H W, K_in]`` (inputs channel-major: ``[C_in, H, W]`` flattened).
        input_rate: ``[B, C_in H W]`` input pseudo rates, or ``None`` (zeros).
        model: a :class:`~jax_kernels.models.theta.Theta` with ``T < model.period``.
        in_shape: ``(C_in, H, W)``; stride, padding: as ``torch.nn.Conv2d`` (static ints).
        T, max_events, max_spikes, pseudo: as for :func:`jax_kernels.layers.spiking_layer`.

    Returns:
        :class:`~jax_kernels.layers.LayerOutput` over the ``N = C_out H' W'`` neurons,
        channel-major; ``final_state`` ``[B, 1, N]``.
    """
    out_hw = _checked_geometry("theta_conv_layer", model, weights, in_shape, stride, padding, T)
    n_positions = out_hw[0] * out_hw[1]
    phase = jnp.repeat(initial_phase[0], n_positions)

    spike_times, spike_count, final_phase, n_dropped = theta_conv_simulate(
        model, weights, phase, input_times, in_shape=in_shape, stride=stride, padding=padding,
        T=T, max_events=max_events, max_spikes=max_spikes,
    )
    drive = (None if input_rate is None or not pseudo
             else _convolve(input_rate, weights, in_shape, stride, padding))
    filled, rate = _pseudo_outputs(model, spike_times, spike_count, final_phase, drive, T, pseudo)
    # Every input spike is its own event here (no fusion): events needed = spikes in the trial.
    n_input_spikes = jnp.sum(input_times < T, axis=(1, 2), dtype=jnp.int32)
    return LayerOutput(spike_times, spike_count, final_phase[:, None, :], filled, rate,
                       n_dropped, n_input_spikes, n_input_spikes)


def theta_conv_binned_layer(
    weights: Array,
    initial_phase: Array,
    bin_index: Array,
    *,
    bin_times: tuple[float, ...],
    model: Theta,
    in_shape: tuple[int, int, int],
    stride: int,
    padding: int,
    T: float,
    max_spikes: int,
    pseudo: bool = True,
) -> LayerOutput:
    """A theta convolutional layer on binned (time-to-first-spike encoded) inputs.

    Input ``i`` of sample ``b`` spikes once at ``bin_times[bin_index[b, i]]`` (never if
    ``bin_index >= len(bin_times)``). The inputs sharing a bin kick at the same time, and theta
    kicks add (``V -> V + sum w``), so each bin is one event whose kicks are one convolution of
    the bin's input grid: the cost follows the number of bins, not of input spikes (the
    dense layer's ``binned_spiking_layer`` with the unrolled weights, which it equals). No
    gradient w.r.t. the input times (they are fixed bins); input pseudo rates are zero (an
    encoder's).

    Args:
        weights: ``[C_out, C_in, k, k]``; initial_phase: ``[1, C_out]``.
        bin_index: ``[B, C_in H W]`` integers. bin_times: ascending bin times (static tuple).
        model, in_shape, stride, padding, T, max_spikes, pseudo: as :func:`theta_conv_layer`.

    Returns:
        :class:`~jax_kernels.layers.LayerOutput` over the ``N = C_out H' W'`` neurons;
        ``n_input_events`` counts the occupied bins.
    """
    out_hw = _checked_geometry("theta_conv_binned_layer", model, weights, in_shape, stride,
                               padding, T)
    batch, n_bins = bin_index.shape[0], len(bin_times)
    membership = bin_index[:, None, :] == jnp.arange(n_bins)[None, :, None]  # [B, bins, N_in]
    kicks = _convolve(membership.reshape(batch * n_bins, -1), weights, in_shape, stride, padding)
    kicks = jnp.swapaxes(kicks.reshape(batch, n_bins, -1), 0, 1)  # [bins, B, N]
    members = jnp.sum(membership, axis=2, dtype=jnp.int32)
    times = jnp.where(members > 0, jnp.asarray(bin_times, weights.dtype)[None, :], jnp.inf)
    events = BatchEvents(times, kicks, jnp.sum(members > 0, axis=1, dtype=jnp.int32),
                         jnp.sum(members, axis=1, dtype=jnp.int32),
                         jnp.zeros((batch,), jnp.int32))
    phase = jnp.repeat(initial_phase, out_hw[0] * out_hw[1], axis=1)  # [1, N]
    result = batched_feedforward_layer(model, events, phase, T, max_spikes)
    final_phase = result.final_state[:, 0, :]
    filled, rate = _pseudo_outputs(model, result.spike_times, result.spike_count, final_phase,
                                   None, T, pseudo)
    return LayerOutput(result.spike_times, result.spike_count, result.final_state, filled, rate,
                       events.n_dropped, events.n_events, events.n_spikes)
