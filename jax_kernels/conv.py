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

Everything is differentiable (weights, initial phases, input times) with ``jax.grad``; the backward
pass of the scan keeps only the touched neurons of each step.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax import Array, lax

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


def _patches(source: Array, weights: Array, in_shape, out_shape, stride: int, padding: int):
    """For each event's source input, the flat indices ``[E, P]`` of the ``P = C_out k^2``
    neurons it can reach (``N`` = out of range where the kernel position falls off the grid or
    between strides) and their weights ``[E, P]``."""
    _, height, width = in_shape
    c_out, out_h, out_w = out_shape
    k = weights.shape[-1]
    channel, row, col = source // (height * width), (source // width) % height, source % width
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
    n_neurons = c_out * out_h * out_w
    # Unreached taps point past the last neuron, each to its own index: the indices of one event
    # stay unique, so scatters need no duplicate handling (whose derivative costs O(N) per step).
    off_grid = n_neurons + jnp.arange(c_out * k * k).reshape(1, c_out, k, k)
    neuron = jnp.where(valid, neuron, off_grid)
    # weights[o, c, j_row, j_col] for this event's input channel c: [E, C_out, k, k].
    tap = jnp.moveaxis(weights[:, channel], 1, 0)
    tap = jnp.where(valid, tap, 0.0)
    n_events = source.shape[0]
    return neuron.reshape(n_events, -1), tap.reshape(n_events, -1)


def _gather(index: Array, values: Array, fill_value) -> Array:
    return values.at[index].get(mode="fill", fill_value=fill_value, unique_indices=True)


def _rotate(cos: Array, sin: Array, cos_angle: Array, sin_angle: Array):
    return cos * cos_angle - sin * sin_angle, sin * cos_angle + cos * sin_angle


def _passed_pi(cos: Array, sin: Array) -> Array:
    return (sin < 0) | ((sin == 0) & (cos < 0))


def theta_conv_sample(
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
    """Simulate one sample of a theta convolutional layer (arguments as validated by
    :func:`theta_conv_layer`, which vmaps this over a batch).

    Args:
        model: the theta neuron (``T < model.period``).
        weights: ``[C_out, C_in, k, k]``.
        initial_phase: ``[N]`` phases at ``t = 0`` of the ``N = C_out H' W'`` neurons
            (channel-major, as ``[C_out, H', W']`` flattened).
        input_times: ``[C_in H W, K_in]`` input spike times (``>= 0``, ``+inf`` padded).

    Returns:
        ``(spike_times [N, K], spike_count [N], final_phase [N], n_dropped)``.
    """
    dtype = initial_phase.dtype
    kernel_size = weights.shape[-1]
    out_shape = (weights.shape[0], *(conv_output_size(n, kernel_size, stride, padding)
                                     for n in in_shape[1:]))
    n_neurons = math.prod(out_shape)
    root = math.sqrt(model.I0 - 0.25)
    angular_speed = root / model.tau  # pi / Theta

    times, source, n_dropped = earliest_input_spikes(input_times.astype(dtype), max_events, T)
    neuron, tap = _patches(source, weights.astype(dtype), in_shape, out_shape, stride, padding)
    in_trial = times < T
    neuron = jnp.where(in_trial[:, None], neuron, n_neurons + jnp.arange(neuron.shape[1]))
    kick = jnp.where(in_trial[:, None], tap / root, 0.0)
    angle = angular_speed * jnp.where(in_trial, times, 0.0)

    angle0 = angular_speed * initial_phase
    # sin(pi) rounds below 0 in float32: a phase of exactly Theta must not count as past it.
    sin0 = jnp.maximum(jnp.sin(angle0), 0.0)

    def step(carry, event):
        cos_frame, sin_frame = carry  # each neuron's point in the co-rotating frame, [N]
        target, u, cos_t, sin_t, t = event
        gather = partial(_gather, target)
        cos, sin = _rotate(gather(cos_frame, 1.0), gather(sin_frame, 0.0), cos_t, sin_t)
        spiked = _passed_pi(cos, sin) & (target < n_neurons)
        cos, sin = jnp.where(spiked, -cos, cos), jnp.where(spiked, -sin, sin)
        # After a spike the point is -z; its angle is the time since the spike.
        spike_time = jnp.maximum(t - jnp.arctan2(sin, cos) / angular_speed, 0.0)
        shifted = cos - u * sin
        inverse_norm = lax.rsqrt(shifted * shifted + sin * sin)
        cos, sin = _rotate(shifted * inverse_norm, sin * inverse_norm, cos_t, -sin_t)
        cos_frame = cos_frame.at[target].set(cos, mode="drop", unique_indices=True)
        sin_frame = sin_frame.at[target].set(sin, mode="drop", unique_indices=True)
        return (cos_frame, sin_frame), (spike_time, spiked)

    # (A spike counter in the carry, read and written in every step, made XLA copy it per step.)
    (cos_frame, sin_frame), (spike_time, spiked) = lax.scan(
        step, (jnp.cos(angle0), sin0), (neuron, kick, jnp.cos(angle), jnp.sin(angle), times)
    )
    # Trial end: every neuron once more, for spikes after its last kick.
    end_angle = angular_speed * T
    cos, sin = _rotate(cos_frame, sin_frame, math.cos(end_angle), math.sin(end_angle))
    spiked_end = _passed_pi(cos, sin)
    cos, sin = jnp.where(spiked_end, -cos, cos), jnp.where(spiked_end, -sin, sin)
    end_spike_time = jnp.maximum(T - jnp.arctan2(sin, cos) / angular_speed, 0.0)
    final_phase = jnp.arctan2(sin, cos) / angular_speed

    # Each neuron's spikes are found in time order, so its k-th found spike is its k-th spike:
    # a stable sort by neuron keeps that order, and the slot is the position within the neuron.
    found = jnp.concatenate([spiked.reshape(-1), spiked_end])
    found_target = jnp.where(
        found, jnp.concatenate([neuron.reshape(-1), jnp.arange(n_neurons)]), n_neurons
    )
    spike_count = jnp.zeros((n_neurons,), jnp.int32).at[found_target].add(1, mode="drop")
    found_time = jnp.concatenate([spike_time.reshape(-1), end_spike_time])
    # Only the first N K found spikes (in time order) are sorted, not all E C_out k^2 + N
    # candidates: they hold every neuron's spikes unless a neuron spiked more than K times,
    # which spike_count reports as an overflow (the output is then invalid anyway).
    kept = jnp.nonzero(found, size=min(n_neurons * max_spikes, found.shape[0]),
                       fill_value=found.shape[0])[0]
    found_target = found_target.at[kept].get(mode="fill", fill_value=n_neurons)
    found_time = found_time.at[kept].get(mode="fill", fill_value=jnp.inf)
    order = jnp.argsort(found_target, stable=True)
    target, found_time = found_target[order], found_time[order]
    position = jnp.arange(target.shape[0])
    first = jnp.concatenate([jnp.ones((1,), bool), target[1:] != target[:-1]])
    slot = position - lax.cummax(jnp.where(first, position, 0))
    target = jnp.where((target < n_neurons) & (slot < max_spikes), target, n_neurons)
    spike_times = jnp.full((n_neurons, max_spikes), jnp.inf, dtype).at[target, slot].set(
        found_time, mode="drop"
    )
    return spike_times, spike_count, final_phase, n_dropped


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

    def one_sample(times):
        return theta_conv_sample(
            model, weights, phase, times, in_shape=in_shape, stride=stride, padding=padding,
            T=T, max_events=max_events, max_spikes=max_spikes,
        )

    spike_times, spike_count, final_phase, n_dropped = jax.vmap(one_sample)(input_times)
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
