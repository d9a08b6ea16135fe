"""What the tests know about each registered neuron model, independently of its implementation.

For every model class in ``jax_kernels.models.MODELS`` a :class:`ModelSpec` holds the model's
equations as documented (written here again, not taken from the model's closed forms), the states
on which its closed forms are compared with a numerical integration of those equations, and the
weight scales at which small test networks spike a few times. ``tests/test_conformance.py``
runs every registered model through the same checks; a model registered without a spec here
fails them with a message saying what to add.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jax_kernels.models import LIF, MODELS, OscLIF, QIF, Theta, get_model


@dataclass(frozen=True)
class ModelSpec:
    """Reference description of one model class (``model`` arguments are instances of it).

    Attributes:
        dvdt: ``tau dV/dt`` without input pulses, as a function ``(model, V, I)`` of the voltage
            and the synaptic current (``I = 0`` for models without one).
        synaptic: inputs add to a synaptic current ``I`` decaying with ``tau / 2`` (else they
            add to ``V``, capped at the threshold for ``saturating`` models).
        blows_up: the spike is ``V -> +inf`` (integrated in ``arctan V``); else ``V = V_th``.
        voltage: the state ``x [D, N]`` as voltages ``[N]``.
        reset_voltage: the voltage right after a spike, as the model represents it.
        saturating: an input pulse raises ``V`` at most to the threshold.
        state_grid: states ``[D, N]`` covering every branch of the model's closed forms.
        variants: non-default parameter sets, checked too.
        layer_weights: ``(mean, spread)`` of the weights (over ``sqrt(N_in / 4)``) of the shared
            ``tests/kernel_stack.py`` network at which every layer spikes a few times.
        initial_states: ``(model, rng, n) -> [D, n]`` random initial states of such a network.
        layer_variants: further models run through that network (e.g. another code path).
        torch_weights: ``(low, high)`` uniform weights of a ``SpikingLinear(4, 3)`` at which it
            spikes (tests/test_conformance.py); recurrent_weights: ``(low, high, scale)``, the
            same for the input weights of a ``SpikingRecurrent(4, 3)``, and a factor on its
            initial recurrent weights (all with no spike near an input or ``T``).
    """

    dvdt: Callable
    synaptic: bool
    blows_up: bool
    voltage: Callable
    reset_voltage: Callable
    state_grid: Callable
    layer_weights: tuple[float, float]
    initial_states: Callable
    torch_weights: tuple[float, float]
    recurrent_weights: tuple[float, float, float]
    saturating: bool = False
    variants: tuple = ()
    layer_variants: tuple = ()

    def threshold(self, model) -> float:
        return np.inf if self.blows_up else model.V_th


def _theta_voltage(model, x):
    c = np.sqrt(model.I0 - 0.25)
    return c * np.tan(c * np.asarray(x[0]) / model.tau - np.pi / 2) + 0.5


def _osclif_voltage(model, x):
    return model.I0 * (1 - np.exp(-np.asarray(x[0]) / model.tau))


def _qif_grid(model):
    voltages = (-1e6, -3.0, -1.0, -0.5, 0.0, 0.3, 1.2, 1.5, 2.0, 4.0)
    currents = (-4.0, -1.0, -0.25, -1e-5, 0.0, 1e-5, 0.5, 2.0, 6.0, 30.0)
    # |V| = sqrt(-I) exactly, on both fixed points (V = 1, I = 0 is left out: the ODE solution
    # drifts off that unstable equilibrium).
    pairs = list(itertools.product(voltages, currents)) + [(1.0, -1.0), (-2.0, -4.0)]
    return np.array(pairs).T


def _lif_grid(model):
    voltages = (-1.0, 0.0, 0.5, 0.99 * model.V_th)
    currents = (-2.0, 0.0, 1.0, 3.0, 4.5, 8.0)
    return np.array(list(itertools.product(voltages, currents))).T


def _phase_grid(model):
    return (np.array([0.02, 0.3, 0.5, 0.8, 0.97]) * model.period)[None]


def _osclif_grid(model):  # negative phases are negative voltages
    return np.concatenate([[-2.0 * model.tau, -0.1 * model.tau], _phase_grid(model)[0]])[None]


def _phase_states(model, rng, n, low=0.1, high=0.9):
    return rng.uniform(low * model.period, high * model.period, (1, n))


SPECS: dict[type, ModelSpec] = {
    Theta: ModelSpec(
        dvdt=lambda m, v, i: v * (v - 1) + m.I0 + i, synaptic=False, blows_up=True,
        voltage=_theta_voltage, reset_voltage=lambda m: -np.inf, state_grid=_phase_grid,
        variants=(Theta(tau=0.7, I0=1.1),), layer_weights=(0.0, 0.6),
        initial_states=_phase_states, torch_weights=(-1.0, 3.0),
        recurrent_weights=(0.5, 2.0, 1.0),
        layer_variants=(Theta(tau=0.5),),  # period pi/2 < T = 3: the generic phase path
    ),
    QIF: ModelSpec(
        dvdt=lambda m, v, i: v * (v - 1) + i, synaptic=True, blows_up=True,
        voltage=lambda m, x: np.asarray(x[0]), reset_voltage=lambda m: -1 / m.eps,
        state_grid=_qif_grid, variants=(QIF(tau=2.0, alpha=1.0),), layer_weights=(2.0, 1.5),
        initial_states=lambda m, rng, n: rng.uniform([[-0.5], [0.0]], [[0.5], [1.0]], (2, n)),
        torch_weights=(1.0, 4.0), recurrent_weights=(0.5, 2.0, 1.0),
    ),
    LIF: ModelSpec(
        dvdt=lambda m, v, i: -v + i, synaptic=True, blows_up=False,
        voltage=lambda m, x: np.asarray(x[0]), reset_voltage=lambda m: 0.0,
        state_grid=_lif_grid, variants=(LIF(tau=1.5, V_th=0.8),), layer_weights=(0.6, 0.5),
        initial_states=lambda m, rng, n: rng.uniform([[0.0], [0.0]], [[0.5], [1.0]], (2, n)),
        torch_weights=(1.0, 2.5), recurrent_weights=(0.6, 1.6, 0.5),
    ),
    OscLIF: ModelSpec(
        dvdt=lambda m, v, i: -v + m.I0 + i, synaptic=False, blows_up=False, saturating=True,
        voltage=_osclif_voltage, reset_voltage=lambda m: 0.0, state_grid=_osclif_grid,
        variants=(OscLIF(tau=1.3, I0=1.5, V_th=1.1),), layer_weights=(-0.02, 0.08),
        initial_states=_phase_states, torch_weights=(-0.3, 0.3),
        # inhibitory inputs, weak coupling: an excitatory pulse that reaches the threshold makes
        # a spike at the pulse's time, and cascades through the network
        recurrent_weights=(-0.2, 0.0, 0.1),
    ),
}


def spec_of(model) -> ModelSpec:
    """The spec of a model instance, class or registered name; fails with what to add."""
    if isinstance(model, str):
        model = MODELS[model]
    cls = model if isinstance(model, type) else type(model)
    for known, spec in SPECS.items():
        if issubclass(cls, known):
            return spec
    raise AssertionError(
        f"registered model {cls.__name__} has no ModelSpec in tests/model_specs.py: add its "
        "equations (dvdt, synaptic, blows_up, voltage, reset_voltage), a state grid and "
        "weight scales at which small networks spike, so that tests/test_conformance.py checks it"
    )


def models_of(name: str) -> list:
    """The registered model ``name`` with default parameters, then its spec's variants."""
    return [get_model(name), *spec_of(name).variants]
