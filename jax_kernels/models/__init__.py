"""Neuron models. A new model is one module here plus one line in ``MODELS``."""

from jax_kernels.models.base import (
    NeuronModel,
    PhaseOscillatorModel,
    PseudoNeuronModel,
)
from jax_kernels.models.lif import LIF
from jax_kernels.models.osclif import OscLIF
from jax_kernels.models.qif import QIF
from jax_kernels.models.theta import Theta

#: Registered models by name (used by ``spike_bridge.nn`` to build layers).
MODELS: dict[str, type[NeuronModel]] = {
    "theta": Theta,
    "qif": QIF,
    "lif": LIF,
    "osclif": OscLIF,
}


def get_model(name: str, **params) -> NeuronModel:
    """Instantiate the registered model ``name`` with ``params``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown neuron model {name!r}; registered models: {sorted(MODELS)}"
        ) from None
    return cls(**params)


__all__ = [
    "LIF",
    "MODELS",
    "NeuronModel",
    "OscLIF",
    "PhaseOscillatorModel",
    "PseudoNeuronModel",
    "QIF",
    "Theta",
    "get_model",
]
