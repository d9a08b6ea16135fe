r"""Oscillatory leaky integrate-and-fire neuron with delta-pulse coupling."""

from __future__ import annotations

from dataclasses import dataclass
from math import log

import jax.numpy as jnp
from jax import Array

from jax_kernels.models.base import PhaseOscillatorModel, require_positive


@dataclass(frozen=True)
class OscLIF(PhaseOscillatorModel):
    r"""Oscillatory LIF neuron with delta-pulse coupling.

    .. math::  \tau \dot V = -V + I_0 + \tau \sum_i w_i \sum_{t_i} \delta(t - t_i)

    With ``I0 > V_th`` the neuron oscillates: ``V`` rises from the reset value 0 to the threshold
    ``V_th`` in the free period ``Theta = Phi(V_th)``. The state is the phase
    ``phi = Phi(V) = tau log(1 / (1 - V / I0))`` (inverse ``V(phi) = I0 (1 - exp(-phi / tau))``),
    which grows at rate 1. An input pulse adds ``w`` to ``V``, up to the threshold:
    ``H(phi, w) = Phi(min(V(phi) + w, V_th))``, so an excitatory input can trigger a spike at once.
    Negative phases are negative voltages and valid states (``Phi`` is finite for all ``V < I0``).

    Attributes:
        tau: membrane time constant (> 0).
        I0: constant input current (> V_th).
        V_th: threshold voltage (> 0).
    """

    tau: float = 1.0
    I0: float = 1.25
    V_th: float = 1.0

    def __post_init__(self):
        require_positive(self, "tau", "V_th")
        if not self.I0 > self.V_th:
            raise ValueError(
                f"OscLIF: `I0` must be greater than `V_th` (oscillatory regime), got {self.I0!r}."
            )

    @property
    def period(self) -> float:
        return -self.tau * log(1 - self.V_th / self.I0)

    def clip_state(self, x: Array) -> Array:
        return jnp.minimum(x, self.period)

    def phase_to_voltage(self, phase: Array) -> Array:
        """``V(phi) = I0 (1 - exp(-phi / tau))``."""
        return -self.I0 * jnp.expm1(-phase / self.tau)

    def voltage_to_phase(self, voltage: Array) -> Array:
        """``Phi(V) = tau log(1 / (1 - V / I0))``, finite for ``V < I0``."""
        return -self.tau * jnp.log1p(-voltage / self.I0)

    def phase_transfer(self, phase: Array, w: Array) -> Array:
        voltage = self.phase_to_voltage(phase) + w
        # ``<=`` rather than ``min``: a zero-weight input at threshold passes phase gradients on.
        return self.voltage_to_phase(jnp.where(voltage <= self.V_th, voltage, self.V_th))
