"""Record the spikes of any network: ``spike_bridge.record(net)``.

::

    with spike_bridge.record(net) as recording:
        first_times = net(images)
    hidden = recording["1"][-1]          # Spikes of module "1" in its last call
    hidden.times                         # [B, N, K]

Built on forward hooks, so it works for any module structure (not only ``nn.Sequential``);
the hooks are removed when the block ends. Nothing is copied: the recording holds the
:class:`~spike_bridge.spikes.Spikes` values the layers returned (a layer call rerun with a
larger buffer updates its value in place, so the recording sees the final one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from spike_bridge.nn import _Encoder, spiking_layers
from spike_bridge.spikes import Spikes

__all__ = ["Recording", "record"]


class Recording(dict):
    """``{module name: [Spikes of each call, in call order]}``, in the order modules were first
    called (module names as in ``net.named_modules()``; ``""`` is ``net`` itself).

    Modules that were not called inside the block have no entry.
    """

    def last(self) -> dict[str, Spikes]:
        """``{module name: Spikes of its last call}``."""
        return {name: calls[-1] for name, calls in self.items()}

    def activity(self) -> dict[str, torch.Tensor]:
        """Mean ordinary spikes per neuron and sample of each module's last call."""
        from spike_bridge.functional import activity

        return {name: activity(spikes) for name, spikes in self.last().items()}

    def silent_fraction(self) -> dict[str, torch.Tensor]:
        """Fraction of each module's neurons silent for the whole batch of its last call."""
        from spike_bridge.functional import silent_fraction

        return {name: silent_fraction(spikes) for name, spikes in self.last().items()}


@contextmanager
def record(net: nn.Module, include_encoders: bool = False) -> Iterator[Recording]:
    """Record the output spikes of every spiking layer of ``net`` (``SpikingLinear``,
    ``SpikingRecurrent`` and subclasses) in the calls made inside the ``with`` block.

    Args:
        net: any module containing spiking layers (or a spiking layer itself).
        include_encoders: also record the :class:`Spikes` of encoders (e.g. for a raster that
            starts with the input spikes).

    Yields:
        A :class:`Recording`, filled as the calls happen.
    """
    names = {module: name for name, module in net.named_modules()}
    modules = spiking_layers(net)
    if include_encoders:
        encoders = [m for m in net.modules() if isinstance(m, _Encoder)]
        modules = [m for m in names if m in set(modules) | set(encoders)]
    recording = Recording()

    def keep(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Spikes):
            recording.setdefault(names[module], []).append(output)

    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()
