"""The spike-train value passed between spiking layers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class BinnedInput:
    """Inputs that spike at a few shared times (a binned time-to-first-spike encoding).

    Attributes:
        bin_index: ``[B, N]`` integer bin of each input; ``>= len(bin_times)`` means no spike.
        bin_times: ascending spike time of each bin.
    """

    bin_index: torch.Tensor
    bin_times: tuple[float, ...]


@dataclass(frozen=True)
class Spikes:
    """Spike trains of a batch, as passed between spiking layers.

    Attributes:
        times: ``[B, N, K]`` ordinary spike times (time units of the models' ``tau``), ascending
            per neuron, ``+inf`` where there is none.
        T: trial duration; spikes at or after ``T`` are not part of the trial.
        filled_times: ``[B, N, K]`` like ``times`` but with each missing spike replaced by a
            pseudospike time (``>= T``), or ``None`` where the producer has no pseudodynamics
            (encoders, layers with pseudospikes off).
        pseudo_rate: ``[B, N]`` pseudo rates passed on to the next layer's pseudodynamics, or
            ``None`` (treated as zeros: the reference's choice for encoded data).
        spike_count: ``[B, N]`` number of spikes in the trial, or ``None`` if not computed.
        binned: the same inputs in fused form, when they come from a binned encoder (lets the
            next layer use one event per bin).
    """

    times: torch.Tensor
    T: float
    filled_times: Optional[torch.Tensor] = None
    pseudo_rate: Optional[torch.Tensor] = None
    spike_count: Optional[torch.Tensor] = None
    binned: Optional[BinnedInput] = None

    @property
    def batch_size(self) -> int:
        return self.times.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.times.shape[1]

    @property
    def counts(self) -> torch.Tensor:
        """``[B, N]`` spikes in the trial (computed from ``times`` when not stored)."""
        if self.spike_count is not None:
            return self.spike_count
        return (self.times < self.T).sum(-1)

    def with_pseudospikes(self) -> torch.Tensor:
        """``[B, N, K]`` spike times with pseudospikes filling missing slots where available."""
        return self.times if self.filled_times is None else self.filled_times

    def detach(self) -> "Spikes":
        """A copy whose tensors are detached from the autograd graph."""
        def detached(value):
            return None if value is None else value.detach()

        return replace(
            self,
            times=self.times.detach(),
            filled_times=detached(self.filled_times),
            pseudo_rate=detached(self.pseudo_rate),
        )
