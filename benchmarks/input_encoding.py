"""How much of Fashion-MNIST each input encoding keeps: a linear readout's test accuracy.

The all-spiking conv example (``examples/conv.py``) sees an image only through
``BinnedLatencyEncoder(n_bins)``: each pixel's bin (``spike_bridge.data.bin_pixels``; bin 0 the
brightest, bin ``n_bins`` silent) decides its one input spike time. A multinomial logistic
regression on the spike/no-spike pattern per bin (one-hot bins, the silent bin dropped) bounds
what a network that reads the input linearly can reach, and shows what binarising the image
costs; the grey-level image (intensity / 255) for comparison, and ``IntensityLatencyEncoder``'s
spikes (whether each pixel spikes, and the intensity its spike time stands for one-to-one).
Full-batch L-BFGS (200 iterations), weight decay 1e-4, all 60,000 training / 10,000 test images,
one thread.

    python benchmarks/input_encoding.py       # writes benchmarks/results/input_encoding.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from spike_bridge.data import bin_pixels, load_dataset
from spike_bridge.functional import INPUT_THRESHOLD, intensity_latency_encode

REPO = Path(__file__).resolve().parents[1]
BINS = (1, 2, 4, 8)
WEIGHT_DECAY = 1e-4


def one_hot_bins(images: torch.Tensor, n_bins: int) -> torch.Tensor:
    """uint8 ``[B, 28, 28]`` -> float ``[B, 784 * n_bins]``: which spiking bin each pixel is in."""
    bins = bin_pixels(images, n_bins)  # [B, 784]
    return F.one_hot(bins, n_bins + 1)[..., :n_bins].reshape(len(images), -1).float()


def intensity_spikes(images: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """uint8 ``[B, 28, 28]`` -> float ``[B, 2 * 784]``: which pixels spike under
    ``IntensityLatencyEncoder()``, and the intensity ``INPUT_THRESHOLD / (1 - exp(-t / T))``
    each spike time ``t`` encodes (0 for silent pixels)."""
    times = intensity_latency_encode(images, T).times[..., 0]
    spiking = torch.isfinite(times)
    intensity = torch.where(spiking, INPUT_THRESHOLD / -torch.expm1(-times / T), 0.0)
    return torch.cat([spiking.float(), intensity], dim=1)


def linear_readout_accuracy(train_x, train_y, test_x, test_y) -> float:
    weight = torch.zeros(train_x.shape[1], 10, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(10, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.cross_entropy(train_x @ weight + bias, train_y)
                + WEIGHT_DECAY * weight.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (test_x @ weight + bias).argmax(1).eq(test_y).double().mean().item()


def main() -> dict:
    train = load_dataset("fashion-mnist", REPO / "data", train=True)
    test = load_dataset("fashion-mnist", REPO / "data", train=False)
    torch.set_num_threads(1)
    results = {"grey": linear_readout_accuracy(
        train.data.flatten(1) / 255.0, train.targets, test.data.flatten(1) / 255.0, test.targets)}
    print(f"grey levels: linear readout test accuracy {100 * results['grey']:.2f}%", flush=True)
    for n_bins in BINS:
        accuracy = linear_readout_accuracy(
            one_hot_bins(train.data, n_bins), train.targets,
            one_hot_bins(test.data, n_bins), test.targets)
        results[str(n_bins)] = accuracy
        print(f"{n_bins} bin(s): linear readout test accuracy {100 * accuracy:.2f}%", flush=True)
    results["intensity"] = linear_readout_accuracy(
        intensity_spikes(train.data), train.targets, intensity_spikes(test.data), test.targets)
    print(f"intensity latencies: linear readout test accuracy "
          f"{100 * results['intensity']:.2f}%", flush=True)
    out = REPO / "benchmarks" / "results" / "input_encoding.json"
    out.write_text(json.dumps({"weight_decay": WEIGHT_DECAY, "test_accuracy_by_bins": results},
                              indent=2) + "\n")
    print(out)
    return results


if __name__ == "__main__":
    main()
