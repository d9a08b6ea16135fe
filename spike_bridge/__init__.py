"""PyTorch front end for exact-gradient spiking neural networks.

Submodules: ``bridge`` (JAX functions as autograd functions), ``nn`` (layers, encoders,
readouts), ``functional`` (encoders, losses, metrics), ``recording`` (``spike_bridge.record``),
``evaluation`` (``evaluate``), ``networks`` (ready-made networks), ``optim``, ``checkpoint``,
``data`` (datasets, DataLoader helpers), ``plot``. They are imported lazily:
``spike_bridge.data`` must stay free of JAX so that DataLoader workers start fast and never
initialise JAX.
"""

import importlib

# Importing spike_bridge changes nothing process-wide: no environment variables (thread wait
# policies), no JAX configuration, no global hooks. README "Threads" says how torch's and XLA's
# thread pools share a CPU and what the measured options are.

__all__ = [
    "bridge", "checkpoint", "data", "evaluation", "functional", "networks", "nn", "optim", "plot", "recording",
    "record", "Spikes",
]


def __getattr__(name):
    if name == "Spikes":
        from spike_bridge.spikes import Spikes

        return Spikes
    if name == "record":
        from spike_bridge.recording import record

        return record
    if name in __all__:
        return importlib.import_module(f"spike_bridge.{name}")
    raise AttributeError(f"module 'spike_bridge' has no attribute {name!r}")
