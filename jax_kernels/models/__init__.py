"""Neuron models. A new model is one module here plus one line in ``MODELS``."""

from jax_kernels.models.base import (
    NeuronModel,
    PhaseOscillatorModel,
    PseudoNeuronModel,
)
from jax_kernels.models.theta import Theta

#: Registered models by name (used by ``spike_bridge.nn`` to build layers).
MODELS: dict[str, type[NeuronModel]] = {
    "theta": Theta,
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
    "MODELS",
    "NeuronModel",
    "PhaseOscillatorModel",
    "PseudoNeuronModel",
    "Theta",
    "get_model",
]
