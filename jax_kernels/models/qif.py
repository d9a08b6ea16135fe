r"""Quadratic integrate-and-fire (QIF) neuron with exponentially decaying synaptic current."""

from __future__ import annotations

from dataclasses import dataclass
from math import pi
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import Array

from jax_kernels.models.base import PseudoNeuronModel, require_positive

# Below these magnitudes of I s^2 (flow) and I / V^2 (next spike) the closed forms are evaluated by
# their Taylor series in I, which is exact to rounding there and keeps d/dI correct at I = 0.
_FLOW_SERIES_BOUND = 1e-2
_SPIKE_SERIES_BOUND = 1e-3


@dataclass(frozen=True)
class QIF(PseudoNeuronModel):
    r"""QIF neuron with exponentially decaying synaptic current, ``tau_m = tau``, ``tau_s = tau/2``.

    .. math::
        \tau \dot V = V (V - 1) + I, \qquad
        \frac{\tau}{2} \dot I = -I + \frac{\tau}{2} \sum_i w_i \sum_{t_i} \delta(t - t_i)

    An input of weight ``w`` adds ``w`` to ``I``; ``V`` spikes at ``+inf`` and is reset to ``-inf``
    (represented by ``+-1/eps``).

    Closed form: with ``u = exp(-dt/tau)`` and ``s = 1 - u``, ``I(dt) = I u^2`` and
    ``V(dt) = u z(s)``, where ``z`` solves ``dz/ds = z^2 + I`` (``I`` at ``dt = 0``), ``z(0) = V``:

    .. math::  z(s) = \frac{V C + I S}{C - V S}

    with ``(C, S) = (cos(sqrt(I) s), sin(sqrt(I) s) / sqrt(I))`` for ``I > 0``, ``(1, s)`` for
    ``I = 0`` and ``(cosh, sinh)`` analogues for ``I < 0`` (which, divided by ``cosh``, give the
    ``|V| < sqrt(-I)``, ``|V| = sqrt(-I)`` and ``|V| > sqrt(-I)`` solutions at once). ``C`` and
    ``S`` are analytic in ``I``; near ``I = 0`` their Taylor series is used, so flows and spike
    times have exact gradients with respect to ``I`` at ``I = 0`` too: the I = 0 solution alone
    does not depend on ``I`` and would zero that gradient, and the reference code's remedy (the
    gradient of the I > 0 formula at I = 1e-6, via stop_gradient) is only approximate. The neuron
    spikes where the denominator vanishes, at ``s* = arccot(V / sqrt(I)) / sqrt(I)``
    (``arctanh(sqrt(-I) / V) / sqrt(-I)`` for ``I < 0``, ``1/V`` for ``I = 0``), if ``s* < 1``.
    Flows return ``V = 1/eps`` from there on, also for a step rounded just past the spike, where
    the closed form would wrap around to negative voltages.

    Pseudodynamics (Klos & Memmesheimer 2023): with ``I_p = I + drive`` and
    ``c = sqrt(alpha softplus(I_p / alpha))``, the neuron is treated as a theta neuron with pseudo
    period ``Theta_p = tau pi / c`` and pseudo phase
    ``phi_p = tau / c (arctan((V - 1/2) / c) + pi/2)``; the pseudo rate is ``phi_p / Theta_p`` and
    the ``k``-th pseudospike time ``T + k Theta_p - phi_p``.

    Attributes:
        tau: membrane time constant (> 0); the synaptic time constant is ``tau / 2``.
        eps: ``V`` is capped at ``1/eps`` (threshold) and reset to ``-1/eps`` (> 0).
        alpha: softplus sharpness of the pseudodynamics (> 0).
    """

    state_names: ClassVar[tuple[str, ...]] = ("V", "I")

    tau: float = 1.0
    eps: float = 1e-9
    alpha: float = 10.0

    def __post_init__(self):
        require_positive(self, "tau", "eps", "alpha")

    def default_initial_state(self, dtype=jnp.float32) -> Array:
        return jnp.zeros((2,), dtype)

    # -- ordinary dynamics ---------------------------------------------------------------------
    def _propagator(self, current: Array, s: Array) -> tuple[Array, Array]:
        """``(C, S)`` up to a common positive factor, safe for every ``current``."""
        x = current * s**2
        series = jnp.abs(x) < _FLOW_SERIES_BOUND
        c_series = 1 - x / 2 + x**2 / 24 - x**3 / 720 + x**4 / 40320
        s_series = s * (1 - x / 6 + x**2 / 120 - x**3 / 5040 + x**4 / 362880)
        positive = ~series & (current > 0)
        root = jnp.sqrt(jnp.where(positive, current, 1.0))
        c_pos, s_pos = jnp.cos(root * s), jnp.sin(root * s) / root
        negative = ~series & (current < 0)
        root = jnp.sqrt(jnp.where(negative, -current, 1.0))
        c_neg, s_neg = jnp.ones_like(x), jnp.tanh(root * s) / root
        return (
            jnp.where(series, c_series, jnp.where(positive, c_pos, c_neg)),
            jnp.where(series, s_series, jnp.where(positive, s_pos, s_neg)),
        )

    def flow(self, x: Array, dt: Array) -> Array:
        voltage, current = x[0], x[1]
        decay = jnp.exp(-dt / self.tau)
        c, s = self._propagator(current, -jnp.expm1(-dt / self.tau))
        numerator = voltage * c + current * s
        denominator = c - voltage * s
        # V >= 1/eps, or a denominator rounded past its zero at the spike (tan wrap-around).
        at_threshold = denominator <= self.eps * decay * numerator
        safe_denominator = jnp.where(at_threshold, 1.0, denominator)
        new_voltage = jnp.where(
            at_threshold, 1 / self.eps, decay * numerator / safe_denominator
        )
        return jnp.stack([new_voltage, current * decay**2])

    def next_spike_dt(self, x: Array) -> Array:
        voltage, current = x[0], x[1]
        series = (voltage > 0) & (jnp.abs(current) < _SPIKE_SERIES_BOUND * voltage**2)
        v = jnp.where(series, voltage, 1.0)
        u = current / v**2
        s_series = (1 - u / 3 + u**2 / 5 - u**3 / 7 + u**4 / 9) / v

        positive = ~series & (current > 0)
        root = jnp.sqrt(jnp.where(positive, current, 1.0))
        s_pos = jnp.arctan2(root, voltage) / root

        root = jnp.sqrt(jnp.where(current < 0, -current, 1.0))
        negative = ~series & (current < 0) & (voltage > root)
        s_neg = jnp.arctanh(root / jnp.where(negative, voltage, 2 * root)) / root

        s_spike = jnp.where(
            series, s_series, jnp.where(positive, s_pos, jnp.where(negative, s_neg, jnp.inf))
        )
        spikes = s_spike < 1
        safe_s = jnp.where(spikes, s_spike, 0.0)
        return jnp.where(spikes, -self.tau * jnp.log1p(-safe_s), jnp.inf)

    def spike_reset(self, x: Array, dt: Array) -> Array:
        voltage = jnp.full_like(x[0], -1 / self.eps)
        return jnp.stack([voltage, x[1] * jnp.exp(-2 * dt / self.tau)])

    def receive(self, x: Array, w: Array) -> Array:
        return jnp.stack([x[0], x[1] + w])

    # -- pseudodynamics ------------------------------------------------------------------------
    def _pseudo_root(self, pseudo_current: Array) -> Array:
        # For strongly negative currents softplus underflows (I_p < -7e3 alpha/10 in float64,
        # -9e2 in float32) and c = 0 gives inf / inf = NaN pseudo phases; even above that, the
        # chain rule through tau pi / c multiplies 1/c^3 by a zero and overflows to NaN. c^2 is
        # therefore floored at sqrt(tiny) (1.5e-154 in float64, 1.1e-19 in float32), where pseudo
        # periods are already astronomically long (tau pi / c = 2.6e77 tau in float64, 3e10 tau
        # in float32) and their gradient zero; above the floor nothing changes.
        squared = self.alpha * jax.nn.softplus(pseudo_current / self.alpha)
        floor = jnp.sqrt(jnp.finfo(jnp.result_type(squared)).tiny)
        return jnp.sqrt(jnp.where(squared < floor, floor, squared))

    def pseudo_period(self, pseudo_current: Array) -> Array:
        """Pseudo period ``Theta_p = tau pi / c``."""
        return self.tau * pi / self._pseudo_root(pseudo_current)

    def pseudo_phase(self, voltage: Array, pseudo_current: Array) -> Array:
        """Pseudo phase ``phi_p`` in ``(0, Theta_p)``; ``Theta_p`` at ``V = +inf``."""
        root = self._pseudo_root(pseudo_current)
        # arctan2(c, 1/2 - V) = arctan((V - 1/2) / c) + pi/2, accurate for large |V| as well.
        phase = self.tau * jnp.arctan2(root, 0.5 - voltage) / root
        # +-1/eps stand for +-inf (at threshold / just reset): map them exactly to Theta_p and 0,
        # so that pseudospikes stay continuous (not off by tau eps) when a spike crosses T.
        phase = jnp.where(voltage >= 1 / self.eps, self.pseudo_period(pseudo_current), phase)
        return jnp.where(voltage <= -1 / self.eps, 0.0, phase)

    def pseudo_rate(self, x_end: Array, drive: Array) -> Array:
        pseudo_current = x_end[1] + drive
        return self.pseudo_phase(x_end[0], pseudo_current) / self.pseudo_period(pseudo_current)

    def recurrent_pseudo_rate(self, x_end: Array) -> Array:
        # The reference cancels the synaptic current: pseudo current I + (-I) = 0.
        return self.pseudo_rate(x_end, -x_end[1])

    def pseudospike_time(self, x_end: Array, drive: Array, k: Array, T: float) -> Array:
        pseudo_current = x_end[1] + drive
        return (
            T
            + k * self.pseudo_period(pseudo_current)
            - self.pseudo_phase(x_end[0], pseudo_current)
        )
