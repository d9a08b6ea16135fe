r"""Current-based leaky integrate-and-fire neuron with exponentially decaying synaptic current."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
from jax import Array

from jax_kernels.models.base import NeuronModel, require_positive


@dataclass(frozen=True)
class LIF(NeuronModel):
    r"""Current-based LIF neuron, ``tau_m = tau``, ``tau_s = tau/2``.

    .. math::
        \tau \dot V = -V + I, \qquad
        \frac{\tau}{2} \dot I = -I + \frac{\tau}{2} \sum_i w_i \sum_{t_i} \delta(t - t_i)

    An input of weight ``w`` adds ``w`` to ``I``; at ``V = V_th`` the neuron spikes and ``V`` is
    reset to 0. With ``u = exp(-dt/tau)``: ``I(dt) = I u^2`` and ``V(dt) = u (V + I (1 - u))``, so
    threshold crossings solve ``I u^2 - (I + V) u + V_th = 0``; the first one is the larger root
    ``u+`` if it lies in ``(0, 1)``, which needs ``I > 0``.

    Attributes:
        tau: membrane time constant (> 0); the synaptic time constant is ``tau / 2``.
        V_th: threshold voltage (> 0).
    """

    state_names: ClassVar[tuple[str, ...]] = ("V", "I")

    tau: float = 1.0
    V_th: float = 1.0

    def __post_init__(self):
        require_positive(self, "tau", "V_th")

    def default_initial_state(self, dtype=jnp.float32) -> Array:
        return jnp.zeros((2,), dtype)

    def flow(self, x: Array, dt: Array) -> Array:
        voltage, current = x[0], x[1]
        decay = jnp.exp(-dt / self.tau)
        new_voltage = decay * (voltage - current * jnp.expm1(-dt / self.tau))
        return jnp.stack([new_voltage, current * decay**2])

    def next_spike_dt(self, x: Array) -> Array:
        voltage, current = x[0], x[1]
        discriminant = (current + voltage) ** 2 - 4 * current * self.V_th
        root = jnp.sqrt(jnp.where(discriminant > 0, discriminant, 0.0))
        # u+ - 1, rationalised so that it stays accurate when the spike is imminent (u+ -> 1).
        denominator = root + current - voltage
        valid = (current > 0) & (discriminant > 0) & (denominator > 0)
        u_minus_one = 2 * (voltage - self.V_th) / jnp.where(valid, denominator, 1.0)
        spikes = valid & (u_minus_one > -1)  # u+ > 0
        # A voltage rounded to just above threshold means the spike is due now.
        safe = jnp.where(spikes, jnp.minimum(u_minus_one, 0.0), 0.0)
        return jnp.where(spikes, -self.tau * jnp.log1p(safe), jnp.inf)

    def spike_reset(self, x: Array, dt: Array) -> Array:
        return jnp.stack([jnp.zeros_like(x[0]), x[1] * jnp.exp(-2 * dt / self.tau)])

    def receive(self, x: Array, w: Array) -> Array:
        return jnp.stack([x[0], x[1] + w])
