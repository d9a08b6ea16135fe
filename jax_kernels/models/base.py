"""Neuron model templates for event-based simulation.

Every model is a small frozen (hashable) dataclass whose methods are elementwise over neurons. A
neuron's state is an array ``x`` of shape ``[D, *N]``: ``D`` state variables (``state_names``) for
``*N`` neurons. Times and durations share the units of the model's time constant ``tau``.

The event-based simulators in :mod:`jax_kernels.simulate` need five things from a model:

- ``flow(x, dt)``: free evolution over ``dt`` (valid for ``0 <= dt <= next_spike_dt(x)``; at equality
  it returns a state at threshold without overflowing),
- ``next_spike_dt(x)``: time until the next threshold crossing without input (``+inf`` if never),
- ``spike_reset(x, dt)``: the state right after a spike that happens ``dt`` from now,
- ``receive(x, w)``: the effect of an input pulse of weight ``w``,
- ``emit_spikes(...)``: all own spikes in an input-free interval (a generic loop here; phase models
  override it with a closed form).

Models with pseudodynamics also provide ``pseudo_rate`` and ``pseudospike_time`` (see
:class:`PseudoNeuronModel`).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import jax.numpy as jnp
from jax import Array, lax


def require_positive(model: object, *names: str) -> None:
    """Raise ``ValueError`` naming the first field of ``model`` in ``names`` that is not > 0."""
    for name in names:
        value = getattr(model, name)
        if not value > 0:  # also catches NaN
            raise ValueError(
                f"{type(model).__name__}: `{name}` must be positive, got {value!r}."
            )


class NeuronModel(ABC):
    """Abstract neuron model used by the event-based simulators.

    Subclasses are frozen dataclasses (hashable, usable as static arguments of ``jax.jit``).
    """

    #: Names of the ``D`` state variables, in the order of the leading state axis.
    state_names: ClassVar[tuple[str, ...]]
    #: Whether the model defines pseudodynamics (pseudo rates and pseudospike times).
    has_pseudodynamics: ClassVar[bool] = False

    @property
    def state_size(self) -> int:
        """Number ``D`` of state variables per neuron."""
        return len(self.state_names)

    def replace(self, **changes) -> "NeuronModel":
        """A copy of the model with some parameters changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- ordinary dynamics ---------------------------------------------------------------------
    @abstractmethod
    def default_initial_state(self, dtype=jnp.float32) -> Array:
        """Default initial state of one neuron, shape ``[D]``."""

    @abstractmethod
    def flow(self, x: Array, dt: Array) -> Array:
        """Evolve states ``x`` ``[D, *N]`` freely by ``dt`` (broadcastable to ``[*N]``)."""

    @abstractmethod
    def next_spike_dt(self, x: Array) -> Array:
        """Time ``[*N]`` until each neuron reaches threshold without input; ``+inf`` if never."""

    @abstractmethod
    def spike_reset(self, x: Array, dt: Array) -> Array:
        """State ``[D, *N]`` right after a spike that occurs ``dt`` from now (``dt`` is the
        neuron's ``next_spike_dt``)."""

    @abstractmethod
    def receive(self, x: Array, w: Array) -> Array:
        """State ``[D, *N]`` right after an input pulse of weight ``w`` ``[*N]``."""

    def clip_state(self, x: Array) -> Array:
        """Project states onto the valid range (identity unless the model has bounded states)."""
        return x

    def layer_simulator(self, T: float):
        """A specialised batched layer simulator for trials of length ``T``, or ``None``.

        If given, :func:`jax_kernels.simulate.batched_feedforward_layer` calls it as
        ``fn(times [B, S], kicks, initial_state [D, N], max_spikes)`` (event times ascending per
        sample; the last event is a zero-weight event at ``T``; times ``>= T`` are not applied;
        ``kicks`` is ``[S, B, N]`` or :class:`~jax_kernels.simulate.GatheredKicks`, where
        coincident spikes are separate zero-length events: a model with a layer simulator must
        be one whose inputs compose, ``receive(receive(x, w1), w2) = receive(x, w1 + w2)``, and
        cannot spike at an input) and expects ``(spike_times [B, N, K], spike_count [B, N],
        final_state [B, D, N])``. Without it the generic event scan runs per sample.
        """
        return None

    def spikes_per_interval(self, T: float, max_spikes: int) -> int:
        """Bound ``J`` on the spikes :meth:`emit_spikes` reports per neuron and interval."""
        return max_spikes

    def emit_spikes(
        self, x: Array, t_start: Array, t_end: Array, n_slots: int
    ) -> tuple[Array, Array, Array]:
        """Simulate the input-free interval ``[t_start, t_end)`` and return its spikes.

        Generic version: ``n_slots`` rounds of ``next_spike_dt`` / ``spike_reset`` (a fixed trip
        count keeps it reverse-differentiable); a spike still pending after them is counted, so
        an overflow of the caller's buffer stays visible.

        Args:
            x: states ``[D, N]`` at ``t_start``.
            t_start, t_end: interval bounds (scalars, ``t_start <= t_end``).
            n_slots: ``J`` spike times to report per neuron (static).

        Returns:
            ``(x at t_end [D, N], spike times [N, J] ascending and +inf padded,
            spike count [N] int32)``; the count may exceed ``J``.
        """
        t_neuron = jnp.broadcast_to(t_start, x.shape[1:]).astype(x.dtype)

        def one_spike(carry, _):
            x, t_neuron = carry
            dt = self.next_spike_dt(x)
            spikes = t_neuron + dt < t_end
            dt_safe = jnp.where(spikes, dt, 0.0)
            x = jnp.where(spikes, self.spike_reset(x, dt_safe), x)
            t_neuron = t_neuron + dt_safe
            return (x, t_neuron), jnp.where(spikes, t_neuron, jnp.inf)

        (x, t_neuron), times = lax.scan(one_spike, (x, t_neuron), None, length=n_slots)
        count = jnp.sum(jnp.isfinite(times), axis=0, dtype=jnp.int32)
        # Spikes beyond the n_slots (an overflow) are counted by a forward-only loop, so that the
        # count is the true need (a buffer size that fits) and later intervals start from the
        # true state. Without overflow its condition is false at once.
        x_rest, t_rest, extra = self._count_remaining_spikes(
            lax.stop_gradient(x), lax.stop_gradient(t_neuron), t_end
        )
        overflow = extra > 0
        # With a spike still pending stop at it: flows are only valid up to a spike.
        x = self.flow(x, jnp.minimum(t_end - t_neuron, self.next_spike_dt(x)))
        x_true = self.flow(x_rest, jnp.minimum(t_end - t_rest, self.next_spike_dt(x_rest)))
        x = jnp.where(overflow, x_true, x)
        return x, times.T, count + extra

    #: Iteration cap of :meth:`_count_remaining_spikes` (a degenerate state whose next spike is
    #: always due at once must not loop forever; the count is then a lower bound).
    max_counted_spikes: ClassVar[int] = 1 << 20

    def _count_remaining_spikes(
        self, x: Array, t_neuron: Array, t_end: Array
    ) -> tuple[Array, Array, Array]:
        """Run the spikes still due before ``t_end`` without recording them (no gradient).

        Returns the states right after the last of them, their times and their number ``[N]``.
        """

        def due(x, t):
            return t + self.next_spike_dt(x) < t_end

        def condition(carry):
            x, t, _, iteration = carry
            return jnp.any(due(x, t)) & (iteration < self.max_counted_spikes)

        def body(carry):
            x, t, n, iteration = carry
            dt = self.next_spike_dt(x)
            spikes = t + dt < t_end
            dt = jnp.where(spikes, dt, 0.0)
            x = jnp.where(spikes, self.spike_reset(x, dt), x)
            return x, t + dt, n + spikes.astype(jnp.int32), iteration + 1

        init = (x, t_neuron, jnp.zeros(t_neuron.shape, jnp.int32), jnp.zeros((), jnp.int32))
        x, t_neuron, n, _ = lax.while_loop(condition, body, init)
        return x, t_neuron, n


class PseudoNeuronModel(NeuronModel):
    """Neuron model with pseudodynamics (Klos & Memmesheimer 2023).

    A neuron's *pseudo rate* is a smooth, rate-network-like function of its state at the trial end and
    of a *drive* ``sum_j w_ij r_j`` from the pseudo rates ``r_j`` of its inputs. Its ``k``-th
    pseudospike time (``k >= 1``) lies after the trial end ``T`` and tends to ``T`` as the neuron
    approaches an ordinary spike at ``T``, which makes spike times continuous when spikes leave or
    enter the trial.
    """

    has_pseudodynamics: ClassVar[bool] = True

    @abstractmethod
    def pseudo_rate(self, x_end: Array, drive: Array) -> Array:
        """Pseudo rate ``[*N]`` from end-of-trial states ``[D, *N]`` and drive ``[*N]``."""

    @abstractmethod
    def pseudospike_time(self, x_end: Array, drive: Array, k: Array, T: float) -> Array:
        """``k``-th pseudospike time (``k >= 1``, broadcastable) after the trial end ``T``."""

    def recurrent_pseudo_rate(self, x_end: Array) -> Array:
        """Pseudo rate a neuron passes on inside a recurrent network: the rate without synaptic
        drive (the reference's recurrent experiment). Models with synaptic currents override it."""
        return self.pseudo_rate(x_end, jnp.zeros_like(x_end[0]))


class PhaseOscillatorModel(PseudoNeuronModel):
    """Oscillator in phase representation with delta-pulse coupling.

    The phase ``phi`` (state ``[1, *N]``) grows at rate 1 between inputs; the neuron spikes when it
    reaches the free period ``Theta`` and is reset to 0. An input of weight ``w`` maps the phase
    through the phase transfer function ``H(phi, w) = Phi(V(phi) + w)``. Pseudodynamics:
    ``r = phi_p / Theta`` and ``t_k = T + k Theta - phi_p`` with the pseudo phase
    ``phi_p = H(phi_end, drive)`` of the reference, normalised for saturating ``H`` (see
    :meth:`pseudo_phase`).
    """

    state_names: ClassVar[tuple[str, ...]] = ("phase",)

    @property
    @abstractmethod
    def period(self) -> float:
        """Free oscillation period ``Theta``, the threshold in phase representation."""

    @abstractmethod
    def phase_transfer(self, phase: Array, w: Array) -> Array:
        """Phase transfer function ``H(phi, w)``, elementwise."""

    def default_initial_state(self, dtype=jnp.float32) -> Array:
        return jnp.full((1,), self.period / 2, dtype)

    def clip_state(self, x: Array) -> Array:
        return jnp.clip(x, 0.0, self.period)

    def flow(self, x: Array, dt: Array) -> Array:
        return x + dt

    def next_spike_dt(self, x: Array) -> Array:
        # Rounding can leave a phase a few ulps above Theta; a spike is then due now.
        return jnp.maximum(self.period - x[0], 0.0)

    def spike_reset(self, x: Array, dt: Array) -> Array:
        return jnp.zeros_like(x)

    def receive(self, x: Array, w: Array) -> Array:
        return self.phase_transfer(x[0], w)[None]

    def spikes_per_interval(self, T: float, max_spikes: int) -> int:
        # Spikes come at least one period apart and intervals are shorter than T.
        return max(1, min(max_spikes, math.ceil(T / self.period)))

    def emit_spikes(self, x, t_start, t_end, n_slots):
        # Closed form: the phase grows linearly, so the spikes in the interval are
        # s0, s0 + Theta, s0 + 2 Theta, ... with s0 = t_start + Theta - phi, all strictly < t_end.
        period = self.period
        phase = x[0]
        first_spike = t_start + (period - phase)
        n_spikes = jnp.where(
            first_spike < t_end, jnp.ceil((t_end - first_spike) / period), 0.0
        )
        n_spikes = lax.stop_gradient(n_spikes)
        last_spike = first_spike + jnp.maximum(n_spikes - 1, 0.0) * period
        phase = jnp.where(n_spikes > 0, t_end - last_spike, phase + (t_end - t_start))
        m = jnp.arange(n_slots, dtype=x.dtype)
        times = jnp.where(
            m < n_spikes[:, None], first_spike[:, None] + m * period, jnp.inf
        )
        return phase[None], times, n_spikes.astype(jnp.int32)

    def pseudo_phase(self, phase: Array, drive: Array) -> Array:
        """Pseudo phase ``Theta (H(phi, d) - H(0, d)) / (H(Theta, d) - H(0, d))`` in ``[0, Theta]``.

        The reference uses ``H(phi, d)``; both agree when ``H(0, .) = 0`` and
        ``H(Theta, .) = Theta`` (theta neuron). The normalisation keeps pseudospikes continuous
        for saturating transfer functions (oscillatory LIF) as a spike crosses the trial end:
        the end phase then jumps between ``Theta`` and ``0`` and the spike count by one, which
        shifts every slot by exactly one period. A drive that saturates ``H`` (span 0) means an
        immediate spike: pseudo phase ``Theta``.
        """
        low = self.phase_transfer(jnp.zeros_like(phase), drive)
        high = self.phase_transfer(jnp.full_like(phase, self.period), drive)
        span = high - low
        has_span = span > 0
        ratio = (self.phase_transfer(phase, drive) - low) / jnp.where(has_span, span, 1.0)
        return self.period * jnp.where(has_span, ratio, 1.0)

    def pseudo_rate(self, x_end: Array, drive: Array) -> Array:
        return self.pseudo_phase(x_end[0], drive) / self.period

    def pseudospike_time(self, x_end: Array, drive: Array, k: Array, T: float) -> Array:
        return T + k * self.period - self.pseudo_phase(x_end[0], drive)
