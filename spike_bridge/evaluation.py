"""One evaluation of a spike-time classifier over a data loader: :func:`evaluate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

from spike_bridge.functional import accuracy, ordinary_accuracy
from spike_bridge.nn import spiking_layers
from spike_bridge.recording import record

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    net: nn.Module,
    loader: Iterable,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    include_encoders: bool = False,
) -> dict[str, Any]:
    """Test metrics of a classifier whose output is first (pseudo)spike times ``[B, C]``.

    Runs ``net`` in eval mode without gradients (its training mode is restored afterwards) on
    every ``(inputs, labels)`` batch of ``loader`` (moved to the device of ``net``'s
    parameters), recording its spiking layers with :func:`spike_bridge.record`. The last
    spiking layer called is the output layer.

    Args:
        net: e.g. encoder, spiking layers and ``FirstSpikeTime()``.
        loader: yields ``(inputs, labels)``.
        loss_fn: optional ``loss_fn(first_times, labels)`` (a batch mean), e.g.
            ``lambda t, y: first_spike_cross_entropy(t, y, T)``.
        include_encoders: also report the encoders' activity and silent fraction per layer
            (input spikes per input neuron); they never count as hidden or output layers.

    Returns:
        dict of sample-weighted means: ``accuracy`` (:func:`~spike_bridge.functional.accuracy`
        of ``net``'s output: with pseudospikes if its readout uses them), ``accuracy_ordinary``
        (:func:`~spike_bridge.functional.ordinary_accuracy` of the output layer: ordinary
        spikes only, a sample with all outputs silent is wrong), ``loss`` (with ``loss_fn``);
        ``activity_per_layer`` and ``silent_fraction_per_layer`` (``{layer name: value}``,
        every spiking layer; silent = no spike for any sample of the loader), ``activity`` and
        ``silent_fraction`` over all hidden (non-output) spiking neurons (NaN without hidden
        layers), and ``samples``.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    sums = {"accuracy": 0.0, "accuracy_ordinary": 0.0, "loss": 0.0}
    spike_sums: dict[str, torch.Tensor] = {}
    ever_spiked: dict[str, torch.Tensor] = {}
    samples = 0
    output_name = None
    spiking = {module for module in spiking_layers(net)}
    spiking_names = {name for name, module in net.named_modules() if module in spiking}
    try:
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            with record(net, include_encoders=include_encoders) as recording:
                first_times = net(inputs)
            called = [name for name in recording if name in spiking_names]
            if not called:
                raise ValueError("evaluate: the network has no spiking layer")
            output_name = called[-1]
            batch = labels.shape[0]
            samples += batch
            sums["accuracy"] += accuracy(first_times, labels) * batch
            sums["accuracy_ordinary"] += (
                ordinary_accuracy(recording[output_name][-1], labels) * batch
            )
            if loss_fn is not None:
                sums["loss"] += loss_fn(first_times, labels) * batch
            for name, spikes in recording.last().items():
                counts = spikes.counts
                spike_sums[name] = spike_sums.get(name, 0) + counts.sum()
                spiked = (counts > 0).any(0)
                ever_spiked[name] = ever_spiked[name] | spiked if name in ever_spiked else spiked
    finally:
        net.train(was_training)
    if samples == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    metrics: dict[str, Any] = {key: float(value) / samples for key, value in sums.items()}
    if loss_fn is None:
        del metrics["loss"]
    sizes = {name: mask.numel() for name, mask in ever_spiked.items()}
    metrics["activity_per_layer"] = {
        name: float(spike_sums[name]) / (samples * sizes[name]) for name in sizes
    }
    metrics["silent_fraction_per_layer"] = {
        name: float((~mask).float().mean()) for name, mask in ever_spiked.items()
    }
    hidden = [name for name in sizes if name in spiking_names and name != output_name]
    n_hidden = sum(sizes[name] for name in hidden)
    metrics["activity"] = (
        sum(float(spike_sums[name]) for name in hidden) / (samples * n_hidden)
        if n_hidden else float("nan")
    )
    metrics["silent_fraction"] = (
        sum(float((~ever_spiked[name]).sum()) for name in hidden) / n_hidden
        if n_hidden else float("nan")
    )
    metrics["samples"] = samples
    return metrics
