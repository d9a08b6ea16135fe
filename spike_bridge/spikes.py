"""The spike-train value passed between spiking layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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

    The output of a spiking layer is checked when it is first read: reading ``times``,
    ``filled_times``, ``pseudo_rate`` or ``spike_count`` (or anything computed from them) first
    checks the buffers of every spiking layer that led to it, all at once, with one
    device-to-host transfer. A layer whose buffer was too small is then rerun with a larger one
    (``max_spikes="auto"``) before the value is returned, or raises
    :class:`~spike_bridge.nn.BufferOverflowError` (a fixed buffer size). Spiking layers pass
    values on without reading them, so a network is checked once, at its readout. Under
    ``torch.compile`` the check is a custom op in the graph (see :mod:`spike_bridge.nn`).
    """

    def __init__(
        self,
        times: torch.Tensor,
        T: float,
        filled_times: Optional[torch.Tensor] = None,
        pseudo_rate: Optional[torch.Tensor] = None,
        spike_count: Optional[torch.Tensor] = None,
        binned: Optional[BinnedInput] = None,
    ):
        self._times = times
        self.T = T
        self._filled_times = filled_times
        self._pseudo_rate = pseudo_rate
        self._spike_count = spike_count
        self.binned = binned
        # The unchecked layer call that made these spikes (see spike_bridge.nn), or None.
        self._call: Any = None

    def _checked(self) -> "Spikes":
        if self._call is not None:
            self._call.check(self)
        return self

    @property
    def times(self) -> torch.Tensor:
        return self._checked()._times

    @property
    def filled_times(self) -> Optional[torch.Tensor]:
        return self._checked()._filled_times

    @property
    def pseudo_rate(self) -> Optional[torch.Tensor]:
        return self._checked()._pseudo_rate

    @property
    def spike_count(self) -> Optional[torch.Tensor]:
        return self._checked()._spike_count

    @property
    def batch_size(self) -> int:
        return self._times.shape[0]

    @property
    def num_neurons(self) -> int:
        return self._times.shape[1]

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

        self._checked()
        return Spikes(
            self._times.detach(), self.T, detached(self._filled_times),
            detached(self._pseudo_rate), self._spike_count, self.binned,
        )

    def _assign(self, other: "Spikes") -> None:
        """Take over ``other``'s values (a rerun with larger buffers), keeping this object, so
        that everyone who holds it (later layers' calls, recordings) sees the new values."""
        self._times, self._filled_times = other._times, other._filled_times
        self._pseudo_rate, self._spike_count = other._pseudo_rate, other._spike_count
        self._call = other._call

    def __repr__(self) -> str:
        state = ", unchecked" if self._call is not None else ""
        return (f"Spikes(times={list(self._times.shape)}, T={self.T}, "
                f"pseudo={self._filled_times is not None}{state})")
