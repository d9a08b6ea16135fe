"""Encoders, losses, readout metrics and activity statistics for spike-time networks.

Times are in units of the neuron time constant; ``T`` is the trial duration. First-spike times
``[B, C]`` come from :class:`spike_bridge.nn.FirstSpikeTime` (pseudospikes ``>= T`` for silent
neurons, or ``T`` when pseudospikes are off).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spike_bridge.data import bin_pixels, bin_spike_times, bins_to_times, flip_bins
from spike_bridge.spikes import BinnedInput, Spikes

__all__ = [
    "accuracy",
    "activity",
    "binned_latency_encode",
    "first_spike_cross_entropy",
    "intensity_latency_encode",
    "latency_encode",
    "ordinary_accuracy",
    "silent_fraction",
    "spike_time_mse",
]


#: What ``binned_latency_encode`` can be given: pixel values, or bins computed beforehand.
ENCODER_INPUTS = ("pixels", "bins")


def _checked_pixels(images: torch.Tensor, what: str, alternative: str = "") -> torch.Tensor:
    """``images`` if they are uint8 pixels 0..255 or float intensities in ``[0, 1]``; else raises
    naming ``what`` was given and ending with ``alternative`` (another input the caller takes)."""
    if images.is_floating_point():
        if images.numel() and (torch.isnan(images).any() or images.min() < 0 or images.max() > 1):
            raise ValueError(
                f"{what} with a float tensor expects intensities in [0, 1] (e.g. "
                "torchvision ToTensor()); pass uint8 pixels 0..255 otherwise"
            )
    elif images.dtype != torch.uint8:
        raise TypeError(
            f"{what} expects uint8 pixels 0..255 or float intensities in [0, 1], got "
            f"{images.dtype}; convert pixels with .to(torch.uint8){alternative}"
        )
    return images


def _pixel_bins(images: torch.Tensor, n_bins: int, input: str) -> torch.Tensor:
    """``[B, *]`` pixels (``input="pixels"``) or precomputed bins (``"bins"``) -> bins ``[B, N]``.

    The meaning is never guessed from the dtype: an int64 tensor holds pixel values to one caller
    and bins to another, and reading 255 as a bin silently means "never spikes".
    """
    if input not in ENCODER_INPUTS:
        raise ValueError(f"input must be one of {ENCODER_INPUTS}, got {input!r}")
    if images.dim() < 2:
        raise ValueError(f"images must have a batch axis, shape [B, *], got {list(images.shape)}")
    if input == "bins":
        if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
            raise TypeError(
                f"input='bins' expects integer bin indices (e.g. from "
                f"spike_bridge.data.BinPixels), got {images.dtype}; for pixel values use "
                "input='pixels'"
            )
        bins = images.flatten(1).to(torch.int64)
        if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) > n_bins):
            raise ValueError(
                f"input='bins' expects bin indices in 0..n_bins={n_bins} (n_bins: never spikes), "
                f"got values in {int(bins.min())}..{int(bins.max())}; for pixel values 0..255 "
                "use input='pixels'"
            )
        return bins
    images = _checked_pixels(
        images, "input='pixels'",
        ", or pass precomputed bins (spike_bridge.data.BinPixels) with input='bins'",
    )
    if images.is_floating_point():
        images = torch.round(images * 255).to(torch.uint8)
    return bin_pixels(images.flatten(1)[:, None], n_bins)  # also for an empty batch


def binned_latency_encode(
    images: torch.Tensor,
    n_bins: int,
    T: float,
    flip_probability: float = 0.0,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    input: str = "pixels",
) -> Spikes:
    """The reference's time-to-first-spike image encoding (see ``BinnedLatencyEncoder``).

    Args:
        images: ``[B, *]``: with ``input="pixels"`` uint8 pixels 0..255 or float intensities in
            ``[0, 1]``; with ``input="bins"`` integer bins in ``0..n_bins`` (from
            :class:`spike_bridge.data.BinPixels`; ``n_bins`` never spikes).
        n_bins: spiking bins; T: trial duration; flip_probability: input noise.
        dtype, device: of the spike times (default: the default dtype, the images' device).
        input: ``"pixels"`` or ``"bins"``: what ``images`` holds (never guessed from the dtype).

    Returns:
        :class:`Spikes` with ``times [B, N, 1]`` and the fused ``binned`` form.
    """
    device = images.device if device is None else device
    bins = _pixel_bins(images, n_bins, input).to(device)
    if flip_probability > 0:
        bins = flip_bins(bins, flip_probability, n_bins, generator)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    times = bins_to_times(bins, n_bins, T, dtype=dtype)[..., None]
    return Spikes(times, T, binned=BinnedInput(bins, bin_spike_times(n_bins, T)))


#: Threshold of the reference's leaky integrate-and-fire input neuron, in units of a white
#: pixel's current: intensity ``x`` first reaches it at ``-T log(1 - INPUT_THRESHOLD / x)``.
INPUT_THRESHOLD = 0.01


def check_min_intensity(min_intensity: float) -> None:
    """Raises unless ``0.01 < min_intensity <= 1`` (dimmer inputs would not reach threshold)."""
    if not INPUT_THRESHOLD < min_intensity <= 1:
        raise ValueError(
            f"min_intensity must be in ({INPUT_THRESHOLD}, 1] (the input neuron's threshold is "
            f"{INPUT_THRESHOLD}), got {min_intensity}"
        )


def intensity_latency_encode(
    images: torch.Tensor,
    T: float,
    min_intensity: float = 0.1,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> Spikes:
    """The reference's input neuron driven by each pixel's intensity, unbinned (see
    ``IntensityLatencyEncoder``).

    Args:
        images: ``[B, *]`` uint8 pixels 0..255 or float intensities in ``[0, 1]``.
        T: trial duration. min_intensity: intensities below it never spike, in ``(0.01, 1]``.
        dtype, device: of the spike times (default: the default dtype, the images' device).

    Returns:
        :class:`Spikes` with ``times [B, N, 1]`` in ``[-T log(0.99), -T log(1 - 0.01 /
        min_intensity)]`` (``+inf``: no spike); no pseudo rates (pixels are data, not learned).
    """
    check_min_intensity(min_intensity)
    if images.dim() < 2:
        raise ValueError(f"images must have a batch axis, shape [B, *], got {list(images.shape)}")
    images = _checked_pixels(images, "images")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = images.device if device is None else device
    intensity = images.flatten(1).to(device=device, dtype=dtype)
    if not images.is_floating_point():
        intensity = intensity / 255
    spiking = intensity >= min_intensity
    # log1p only of spiking intensities (>= min_intensity > 0.01): no log of <= 0 elsewhere.
    safe = torch.where(spiking, intensity, 1.0)
    times = torch.where(spiking, -T * torch.log1p(-INPUT_THRESHOLD / safe), torch.inf)
    return Spikes(times[..., None], T)


def latency_encode(features: torch.Tensor, T: float, scale: float = 1.0) -> Spikes:
    """Differentiable latency encoding ``t = T exp(-x / scale)``: ``[B, *]`` -> ``[B, N, 1]``.

    ``x <= 0`` gives ``t >= T``, i.e. no spike in the trial; spikes move continuously to the trial
    end as ``x -> 0``. An input spike that leaves the trial must act on the next layer like a
    hidden neuron's spike leaving it (arXiv 2309.14523): its direct input of weight ``w`` just
    before ``T`` is replaced by a pseudo drive ``w r`` with pseudo rate ``r = 1``, just as a
    neuron about to spike has pseudo phase ``Theta``. So inputs outside the trial get the pseudo
    rate ``r = T / t = exp(x / scale)`` (1 at ``x = 0``, decaying for ``x < 0``); inputs inside
    it, like neurons that have just spiked, ``r = 0``. For models whose input pulses add up
    (theta: ``H(H(phi, w), d) = H(phi, w + d)``; QIF: currents add) the first (pseudo)spike is
    then continuous at ``x = 0``.
    """
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if features.dim() < 2:
        raise ValueError(f"features must have a batch axis [B, *], got {list(features.shape)}")
    scaled = features.flatten(1) / scale
    times = T * torch.exp(-scaled)
    outside = scaled <= 0
    # exp only of x <= 0: no overflow (and no NaN gradient) where the rate is not used.
    pseudo_rate = torch.where(outside, torch.exp(torch.where(outside, scaled, 0.0)), 0.0)
    return Spikes(times[..., None], T, pseudo_rate=pseudo_rate)


def first_spike_cross_entropy(
    first_times: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    gamma: float = 1e-2,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""The reference's first-spike loss, averaged over the batch.

    ``-log softmax(-t)[y] + gamma (exp(t_y / T) - 1)``: the correct output neuron should spike
    first, and early (the regulariser pushes late correct spikes into the trial).

    Args:
        first_times: ``[B, C]`` first (pseudo)spike times; labels: ``[B]`` class indices.
        T: trial duration (the regulariser's time scale).
        gamma: weight of the early-spike regulariser.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``: the target puts this much
            probability uniformly on all classes (0: the reference's plain cross-entropy).
    """
    if first_times.dim() != 2 or labels.shape != first_times.shape[:1]:
        raise ValueError(
            f"first_times must be [B, C] and labels [B], got {list(first_times.shape)} and "
            f"{list(labels.shape)}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    true_time = first_times.gather(1, labels[:, None])[:, 0]
    cross_entropy = F.cross_entropy(-first_times, labels, label_smoothing=label_smoothing)
    return cross_entropy + gamma * torch.mean(torch.exp(true_time / T) - 1)


def spike_time_mse(
    times: torch.Tensor, targets: torch.Tensor, normalise: Optional[float] = None
) -> torch.Tensor:
    r"""Mean squared spike-time error ``mean(((t - t*) / (t* + normalise))^2)``.

    Args:
        times: ``[..., K]`` (pseudo)spike times, e.g. from ``SpikeTimes(k)``; targets: same shape
            (broadcastable). ``normalise``: optional offset of the reference's relative error
            (its recurrent experiment uses 2); ``None`` gives the plain squared error.
    """
    error = times - targets
    if normalise is not None:
        error = error / (targets + normalise)
    return torch.mean(error**2)


def _check_labels(scores: torch.Tensor, labels: torch.Tensor, function: str) -> None:
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"{function}: expected times [B, C] and labels [B], got {list(scores.shape)} and "
            f"{list(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{function}: labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and bool(((labels < 0) | (labels >= scores.shape[1])).any()):
        raise ValueError(
            f"{function}: labels must be class indices in [0, {scores.shape[1] - 1}] (one per "
            f"output neuron); got values from {int(labels.min())} to {int(labels.max())}"
        )


def accuracy(first_times: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose earliest output neuron is the label.

    Args:
        first_times: ``[B, C]`` first (pseudo)spike times, e.g. from ``FirstSpikeTime()``.
        labels: ``[B]`` integer classes in ``[0, C)`` (others raise ``ValueError``).

    Ties go to the lowest neuron index (``torch.argmin``'s first minimum). With pseudospikes
    every output has a finite time, so this is the reference's pseudospike-aware readout.
    Returns a 0-d tensor (NaN for an empty batch).
    """
    _check_labels(first_times, labels, "accuracy")
    return (first_times.argmin(-1) == labels).to(first_times.dtype).mean()


def ordinary_accuracy(output: Spikes, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy from ordinary spikes only: the output neuron that spikes first in the trial.

    Args:
        output: the output layer's :class:`Spikes` (``times [B, C, K]``).
        labels: ``[B]`` integer classes in ``[0, C)``.

    A sample whose output neurons are all silent (no spike before ``T``) counts as wrong, so an
    all-silent network scores 0, not the frequency of class 0. Ties between neurons spiking at
    the same time go to the lowest neuron index, as in :func:`accuracy`.
    Returns a 0-d tensor (NaN for an empty batch).
    """
    first = output.times[..., 0]
    _check_labels(first, labels, "ordinary_accuracy")
    spiked = (first < output.T).any(-1)
    correct = (first.argmin(-1) == labels) & spiked
    return correct.to(first.dtype).mean()


def activity(spikes: Spikes) -> torch.Tensor:
    """Mean number of ordinary spikes per neuron and sample (0-d tensor)."""
    return spikes.counts.to(spikes.times.dtype).mean()


def silent_fraction(spikes: Spikes) -> torch.Tensor:
    """Fraction of neurons that spike for no sample of the batch (0-d tensor)."""
    return (spikes.counts.sum(0) == 0).to(spikes.times.dtype).mean()
