"""Tests of spike_bridge.plot: every function renders small synthetic inputs to a PNG."""

import math

import matplotlib

matplotlib.use("Agg")  # headless CI; plot.py itself never touches pyplot or the backend

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from spike_bridge import plot

INF = math.inf
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def band_labels(fig):
    return [ax.get_ylabel() for ax in fig.axes]


def test_raster_padding_empty_and_silent_layers(tmp_path):
    inputs = torch.full((20, 1), INF)
    inputs[::3, 0] = torch.linspace(0.0, 0.5, 7)  # 7 input spikes
    hidden = np.array([[0.3, 1.2, INF], [np.nan, INF, INF], [0.9, INF, INF]])  # 3 spikes
    silent_output = torch.full((4, 2), INF)
    empty_layer = np.zeros((0, 3))
    out = tmp_path / "sub" / "raster.png"
    fig = plot.raster(
        [inputs, hidden, empty_layer, silent_output],
        T=2.0,
        names=["input", "hidden", "empty", "output"],
        path=out,
    )
    assert isinstance(fig, Figure)
    assert_png(out)
    texts = band_labels(fig)
    assert "7 spikes" in texts[0] and "3 spikes" in texts[1]
    assert "0 neurons" in texts[2] and "0 spikes" in texts[3]


def test_raster_accepts_one_spike_per_neuron_and_default_names(tmp_path):
    fig = plot.raster(
        [torch.tensor([0.1, INF, 0.7]), np.array([[3.0]])], T=1.0, path=tmp_path / "r.png"
    )
    assert_png(tmp_path / "r.png")
    texts = band_labels(fig)
    assert texts[0].startswith("layer 0") and "2 spikes" in texts[0]
    assert "0 spikes" in texts[1]  # the spike at 3.0 > T is outside the trial
    with pytest.raises(ValueError, match="names"):
        plot.raster([np.zeros((2, 1))], T=1.0, names=["a", "b"])
    with pytest.raises(ValueError, match="T must"):
        plot.raster([np.zeros((2, 1))], T=0.0)
    with pytest.raises(ValueError, match="at least one"):
        plot.raster([], T=1.0)


def test_first_spike_times_with_label_and_pseudospikes(tmp_path):
    times = torch.tensor([1.4, 0.6, INF, 2.3, 0.9], requires_grad=True)  # 2.3 >= T: pseudospike
    fig = plot.first_spike_times(times, label=4, T=2.0, path=tmp_path / "fst.png")
    assert_png(tmp_path / "fst.png")
    assert "no prediction" not in fig.axes[0].get_title()
    plot.first_spike_times(
        np.array([2.1, 2.5]),
        label=0,
        pseudo_mask=np.array([True, True]),
        T=2.0,
        path=tmp_path / "pseudo.png",
    )
    assert_png(tmp_path / "pseudo.png")


def test_first_spike_times_all_silent(tmp_path):
    fig = plot.first_spike_times(np.full(10, INF), label=3, T=1.0, path=tmp_path / "silent.png")
    assert_png(tmp_path / "silent.png")
    assert "no prediction" in fig.axes[0].get_title()
    plot.first_spike_times(np.full(3, np.nan), path=tmp_path / "nan.png")
    assert_png(tmp_path / "nan.png")
    with pytest.raises(ValueError, match="label"):
        plot.first_spike_times(np.ones(3), label=3)
    with pytest.raises(ValueError, match="pseudo_mask"):
        plot.first_spike_times(np.ones(3), pseudo_mask=np.ones(2, dtype=bool))


def test_feature_maps_grid_silent_neurons_and_flattened_input(tmp_path):
    times = torch.rand(2, 3, 4, 5) * 2.0
    times[0, 1, 2, 3] = INF  # silent
    times[1, 0, 0, 0] = 2.5  # after T: silent in the trial
    fig = plot.feature_maps(times, T=2.0, titles=["a", "b"], max_channels=2,
                            path=tmp_path / "maps.png")
    assert_png(tmp_path / "maps.png")
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2 * 2  # two samples x the first two channels
    assert images[1].mask[2, 3] and images[2].mask[0, 0] and images[0].mask.sum() == 0
    assert images[1][0, 0] == times[0, 1, 0, 0].item()
    flat = plot.feature_maps(times.reshape(2, -1, 1), T=2.0, shape=(3, 4, 5))
    flat_images = [ax.images[0].get_array() for ax in flat.axes if ax.images]
    assert len(flat_images) == 2 * 3
    assert np.array_equal(flat_images[1].mask, images[1].mask)
    with pytest.raises(ValueError, match="shape=\\(3, 4, 4\\)"):
        plot.feature_maps(times.reshape(2, -1), T=2.0, shape=(3, 4, 4))
    with pytest.raises(ValueError, match="titles"):
        plot.feature_maps(times, T=2.0, titles=["a"])


def test_traces(tmp_path):
    t = torch.linspace(0.0, 2.0, 200)
    values = torch.stack([torch.sin(t), 1 - torch.exp(-t)], dim=1)
    fig = plot.traces(
        t, values, T=2.0, threshold=1.0, path=tmp_path / "traces.png", labels=["a", "b"]
    )
    assert_png(tmp_path / "traces.png")
    assert len(fig.axes[0].lines) == 4  # two traces, threshold, T
    plot.traces(t.numpy(), values[:, 0].numpy(), path=tmp_path / "one.png")
    assert_png(tmp_path / "one.png")
    with pytest.raises(ValueError, match="values must have shape"):
        plot.traces(t, values[:10])


def test_learning_curves(tmp_path):
    history = {
        "train_loss": [2.3, 1.1, 0.6, 0.4],
        "test_acc": [0.3, 0.6, None, 0.8],
        "test_acc_ordinary": torch.tensor([0.2, 0.5, 0.7]),
        "n_pseudospikes": [40, 12, 5, 3],
        "unused": [],
    }
    fig = plot.learning_curves(history, path=tmp_path / "curves.png", log_loss=True)
    assert_png(tmp_path / "curves.png")
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy", "other"]
    assert fig.axes[0].get_yscale() == "log"
    plot.learning_curves({}, path=tmp_path / "empty.png")
    assert_png(tmp_path / "empty.png")


def test_spike_timing(tmp_path):
    targets = np.array([0.3, 0.8, 1.2, 1.6])
    before = torch.tensor([0.5, INF, 1.0, 1.9])
    after = torch.tensor([0.31, 0.79, 1.2, INF])
    fig = plot.spike_timing(before, after, targets, T=2.0, path=tmp_path / "timing.png")
    assert_png(tmp_path / "timing.png")
    assert fig.axes[0].get_ylim()[1] > 2.0  # room for missing spikes above T
    with pytest.raises(ValueError, match="same shape"):
        plot.spike_timing(before, after[:2], targets, T=2.0)


def test_figures_are_not_registered_with_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot.raster([np.zeros((2, 1))], T=1.0)
    plot.learning_curves({"loss": [1.0]})
    assert plt.get_fignums() == before
