"""PyTorch front end for exact-gradient spiking neural networks.

Submodules: ``bridge`` (JAX functions as autograd functions), ``nn`` (layers, encoders,
readouts), ``functional`` (encoders, losses, metrics), ``data`` (datasets, DataLoader helpers),
``plot``. They are imported lazily: ``spike_bridge.data`` must stay free of JAX so that DataLoader
workers start fast and never initialise JAX.
"""

import importlib
import os

# torch's OpenMP threads busy-wait after each parallel op and then compete with JAX's own
# threads for the cores: with torch and JAX alternating in every layer, a CPU training step took
# 1.6x as long (benchmarks/bridge.py). Passive waiting avoids that. OpenMP reads this once, when
# torch is first imported, so it only takes effect if spike_bridge is imported before torch
# (an explicit user setting is kept).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["bridge", "data", "functional", "nn", "plot", "Spikes"]


def __getattr__(name):
    if name == "Spikes":
        from spike_bridge.spikes import Spikes

        return Spikes
    if name in __all__:
        return importlib.import_module(f"spike_bridge.{name}")
    raise AttributeError(f"module 'spike_bridge' has no attribute {name!r}")
