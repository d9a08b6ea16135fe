"""Ready-made networks: the reference's feedforward classifier and a hybrid conv network.

* :func:`mlp`: binned latency encoder, spiking layers of any registered neuron model,
  first-spike readout (with the defaults and ``hidden=[100, 100]``: the reference MNIST network);
* :func:`dense_layers`: the stack of fully connected spiking layers itself, to put after any
  spike-producing front end (e.g. convolution and pooling);
* :class:`HybridConvNet`: a convolutional front end feeding theta layers through a
  differentiable latency encoder, trained end to end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn

from jax_kernels.models import PseudoNeuronModel
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    BufferSize,
    FirstSpikeTime,
    LatencyEncoder,
    SpikingLinear,
    ThetaLinear,
)

__all__ = ["HybridConvNet", "dense_layers", "mlp"]


def mlp(
    hidden: Sequence[int],
    model: str = "theta",
    *,
    in_features: int = 784,
    out_features: int = 10,
    n_bins: int = 1,
    T: float = 2.0,
    flip_probability: float = 0.0,
    encoder_input: str = "pixels",
    w_scale: float = 0.5,
    max_spikes: BufferSize = "auto",
    model_params: Optional[Mapping[str, float]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Sequential:
    """Feedforward spiking classifier: binned latency encoder, spiking layers, first-spike readout.

    With the defaults and ``hidden=[100, 100]`` this is the reference MNIST network
    (784-100-100-10 theta neurons, binary input, ``T = 2``, initial weights uniform in
    ``+-0.5/sqrt(fan_in)``, learnable initial phases ``Theta/2``).

    Args:
        hidden: neurons of each hidden layer (may be empty: input straight to output).
        model: a registered neuron model name (``jax_kernels.models.MODELS``).
        in_features: input pixels; out_features: classes (one output neuron each).
        n_bins: input time bins of the encoder (1 = binary image); T: trial duration.
        flip_probability: the encoder's input noise in training mode (reference: 0.02).
        encoder_input: what the network is fed (``BinnedLatencyEncoder(input=...)``):
            ``"pixels"`` or ``"bins"`` (``spike_bridge.data.BinPixels`` in the dataset transform).
        w_scale: initial weight scale; max_spikes: spike buffers (``"auto"`` or an int).
        model_params: neuron parameters, e.g. ``{"I0": 1.5}``.
        device, dtype: of the parameters (and the encoder's spike times).

    Returns:
        ``nn.Sequential(encoder, layer_1, ..., layer_out, FirstSpikeTime(pseudo=...))``, modules
        ``"0"`` (encoder) to ``str(len(hidden) + 1)`` (output layer). The readout uses
        pseudospikes for models that have them; LIF neurons have none, so their silent output
        neurons read ``T`` (and get no gradient).
    """
    dense = dense_layers([in_features, *hidden, out_features], model, T=T, w_scale=w_scale,
                         max_spikes=max_spikes, model_params=model_params, device=device,
                         dtype=dtype)
    encoder = BinnedLatencyEncoder(n_bins=n_bins, T=T, flip_probability=flip_probability,
                                   input=encoder_input, device=device, dtype=dtype)
    return nn.Sequential(encoder, *dense,
                         FirstSpikeTime(pseudo=isinstance(dense[-1].model, PseudoNeuronModel)))


def dense_layers(
    sizes: Sequence[int],
    model: str = "theta",
    *,
    T: float = 2.0,
    w_scale: float = 0.5,
    max_spikes: BufferSize = "auto",
    model_params: Optional[Mapping[str, float]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> list[SpikingLinear]:
    """Fully connected spiking layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    The last layer is named the output layer, the others hidden 1, 2, ...; arguments as in
    :func:`mlp`. Returns ``len(sizes) - 1`` :class:`SpikingLinear` layers (a list, to splice into
    an ``nn.Sequential`` after an encoder or a convolutional front end).
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise ValueError(f"layer sizes must be at least two positive ints, got {sizes}")
    layers = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        role = "output" if index == len(sizes) - 2 else f"hidden {index + 1}"
        layers.append(SpikingLinear(
            n_in, n_out, model, T=T, max_spikes=max_spikes, w_scale=w_scale,
            name=f"{role} layer ({model} {n_in}->{n_out})", **dict(model_params or {}),
            device=device, dtype=dtype,
        ))
    return layers


class HybridConvNet(nn.Module):
    """Conv front end -> latency encoder -> theta layers -> first-spike readout.

    ``image -> [Conv2d -> BatchNorm -> ReLU -> MaxPool] x 2 -> AdaptiveMaxPool(pool_to)
    -> standardise per channel, minus threshold -> LatencyEncoder -> ThetaLinear(features,
    hidden) -> ThetaLinear(hidden, n_classes) -> FirstSpikeTime()``. The latency encoder is
    differentiable, so the exact spike-time gradients reach the convolutions.

    Args:
        channels: output channels of the two conv blocks.
        pool_to: side of the final adaptive max pooling (features = channels[-1] * pool_to**2).
        hidden: theta neurons in the hidden spiking layer; n_classes: output neurons.
        T: trial duration (theta time units; the reference MNIST setup uses 2).
        scale: latency scale, spike time ``T exp(-x / scale)`` of a feature ``x > 0``.
        threshold: features are standardised per channel (BatchNorm without affine parameters)
            and shifted down by ``threshold``; only features above it spike (0: roughly half of
            them; 0.5: about 27% in the trained default network).
        max_spikes: spike buffers of the theta layers (``"auto"`` or an int).

    Shapes: input ``[B, 1, H, W]`` float images; output ``[B, n_classes]`` first spike times.
    """

    def __init__(self, channels: Sequence[int] = (32, 64), pool_to: int = 4, hidden: int = 100,
                 n_classes: int = 10, T: float = 2.0, scale: float = 0.5,
                 threshold: float = 0.5, max_spikes: BufferSize = "auto"):
        super().__init__()
        c1, c2 = channels
        self.T = float(T)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveMaxPool2d(pool_to),
        )
        self.norm = nn.BatchNorm2d(c2, affine=False)
        self.threshold = float(threshold)
        self.n_features = c2 * pool_to * pool_to
        self.encoder = LatencyEncoder(T=T, scale=scale)
        self.hidden = ThetaLinear(self.n_features, hidden, T=T, max_spikes=max_spikes)
        self.output = ThetaLinear(hidden, n_classes, T=T, max_spikes=max_spikes)
        self.readout = FirstSpikeTime(pseudo=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.conv(images)) - self.threshold
        return self.readout(self.output(self.hidden(self.encoder(features))))
