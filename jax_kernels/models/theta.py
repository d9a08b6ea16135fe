r"""Oscillatory quadratic integrate-and-fire (theta) neuron with delta-pulse coupling."""

from __future__ import annotations

from dataclasses import dataclass
from math import pi, sqrt

import jax.numpy as jnp
from jax import Array

from jax_kernels.models.base import PhaseOscillatorModel, require_positive


@dataclass(frozen=True)
class Theta(PhaseOscillatorModel):
    r"""Theta (oscillatory QIF) neuron with delta-pulse coupling.

    .. math::  \tau \dot V = V (V - 1) + I_0 + \tau \sum_i w_i \sum_{t_i} \delta(t - t_i)

    With ``I0 > 1/4`` the neuron oscillates: ``V`` runs from ``-inf`` to ``+inf`` (spike, reset to
    ``-inf``) in the free period ``Theta = tau pi / sqrt(I0 - 1/4)``. The state is the phase
    ``phi = tau / c (arctan((V - 1/2) / c) + pi/2)`` with ``c = sqrt(I0 - 1/4)``, which grows at
    rate 1; an input pulse adds ``w`` to ``V``. It can never push the phase past ``Theta``, so spikes
    only appear or vanish at the trial end.

    Attributes:
        tau: membrane time constant (> 0).
        I0: constant input current (> 1/4).
        eps: phases within ``eps`` of 0 or ``Theta`` are treated as ``V = -inf`` / ``+inf``
            (inputs leave them unchanged), which keeps ``tan`` finite.
    """

    tau: float = 1.0
    I0: float = 1.25
    eps: float = 1e-6

    def __post_init__(self):
        require_positive(self, "tau", "eps")
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
        """``V(phi)``; phases outside ``(eps, Theta - eps)`` map to ``-+1/eps``."""
        inside = (phase > self.eps) & (phase < self.period - self.eps)
        safe_phase = jnp.where(inside, phase, self.period / 2)
        voltage = self._root * jnp.tan(safe_phase * self._root / self.tau - pi / 2) + 0.5
        return jnp.where(inside, voltage, jnp.sign(phase - self.period / 2) / self.eps)

    def voltage_to_phase(self, voltage: Array) -> Array:
        """``phi(V)``, in ``(0, Theta)`` for finite ``V``."""
        return self.tau / self._root * (jnp.arctan((voltage - 0.5) / self._root) + pi / 2)

    def phase_transfer(self, phase: Array, w: Array) -> Array:
        inside = (phase > self.eps) & (phase < self.period - self.eps)
        shifted = self.voltage_to_phase(self.phase_to_voltage(phase) + w)
        return jnp.where(inside, shifted, phase)
