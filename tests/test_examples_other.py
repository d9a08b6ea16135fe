"""End-to-end smoke tests of ``examples/hybrid_conv.py``, ``examples/conv.py`` and
``examples/spike_timing.py``.

Each example runs on a tiny setting (a training step or two) and must print (or, called in
process, return) its output directory, with the metrics JSON and the PNGs in it and finite
losses.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TIMEOUT_S = 300


def run_example(script: str, *args: str) -> Path:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{script} failed ({result.returncode})\nstdout:\n{result.stdout[-4000:]}\n"
        f"stderr:\n{result.stderr[-4000:]}"
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    out = Path(lines[-1])
    assert out.is_dir(), f"last line of {script} is not the output directory: {lines[-1]!r}"
    return out


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def test_hybrid_conv_tiny(tmp_path):
    """Two epochs of 8 steps; measured: test accuracy 18.5% after epoch 1, 24.5% after epoch 2
    (chance 10%; Fashion-MNIST, the first 256 / 200 images)."""
    out = run_example(
        "hybrid_conv.py", "--epochs", "2", "--max-train-samples", "256",
        "--max-test-samples", "200", "--batch-size", "32", "--eval-batch-size", "100",
        "--channels", "8", "16", "--pool-to", "4", "--hidden", "32", "--threshold", "0",
        "--lr", "1e-2",
        "--data-root", str(REPO / "data"), "--out", str(tmp_path / "hybrid"), "--no-progress",
    )
    assert out == (tmp_path / "hybrid").resolve()
    for name in ("metrics.json", "learning_curves.png", "raster.png", "model.pt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert len(history["train_loss"]) == 2
    assert _finite(history["train_loss"] + history["test_loss"])
    for key in ("test_acc", "test_acc_ordinary", "train_acc"):
        assert all(0.0 <= v <= 1.0 for v in history[key])
    # it learns: beats chance (10%) by a margin, and the losses fell
    assert history["test_acc"][-1] >= 0.17
    assert history["train_loss"][1] < history["train_loss"][0]
    assert history["test_loss"][1] < history["test_loss"][0]
    assert metrics["network"]["features"] == 16 * 4 * 4
    assert metrics["data"]["train_samples"] == 256
    assert 0 < metrics["final"]["test_input_spikes_per_sample"] <= 16 * 4 * 4


def test_spike_timing_both_tiny(tmp_path):
    out = run_example(
        "spike_timing.py", "both", "--single-trials", "3", "--recurrent-trials", "2",
        "--out", str(tmp_path / "timing"), "--no-progress",
    )
    assert out == (tmp_path / "timing").resolve()
    for part, trials in (("single", 3), ("recurrent", 2)):
        folder = out / part
        for name in ("metrics.json", "spike_times.png", "loss.png"):
            assert (folder / name).is_file(), f"{part}/{name}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert len(metrics["loss"]) == trials + 1  # before each step and after the last
        assert _finite(metrics["loss"] + [metrics["initial_loss"], metrics["final_loss"]])
        # every gradient step lowered the loss (measured: single 42.698 -> 42.695, recurrent
        # 0.8619 -> 0.8591)
        loss = metrics["loss"]
        assert all(after < before for before, after in zip(loss, loss[1:])), loss
        assert metrics["final_loss"] < metrics["initial_loss"]
    single = json.loads((out / "single" / "metrics.json").read_text())
    assert all(0.0 <= t <= single["config"]["T"] for t in single["after"]["trained_times"])
    recurrent = json.loads((out / "recurrent" / "metrics.json").read_text())
    assert len(recurrent["targets"]) == 2 and len(recurrent["after"]["spike_trains"]) == 10


def test_ddp_example_under_torchrun(tmp_path):
    """The README's launch command: 2 processes, gloo; --check compares the averaged gradients of
    the first step with one process on the whole global batch (float64: to 1e-12)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         str(EXAMPLES / "ddp.py"), "--steps", "2", "--check", "--dtype", "float64",
         "--hidden", "16", "--batch-size", "16", "--max-train-samples", "64",
         "--data-root", str(REPO / "data")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = re.search(r"gradient difference (\S+) \(largest gradient (\S+)\)", result.stdout)
    assert check, result.stdout
    difference, largest = float(check.group(1)), float(check.group(2))
    assert difference <= 1e-12 and largest > 1e-3
    assert re.search(r"^final loss \d+\.\d{4}$", result.stdout, flags=re.MULTILINE)


@pytest.mark.parametrize("encoding", ["binned", "intensity"])
def test_conv_example_tiny(tmp_path, monkeypatch, encoding):
    """``examples/conv.py`` end to end on a tiny setting (2 epochs of one step, 2 and 4 channels,
    a hidden dense layer of 3, 4 test images: the size of its feature-map figure, so evaluation
    and figure share one compiled forward): the README's all-spiking conv commands with their
    files, for both input encodings (the first convolution's binned and per-event paths); the
    binned run with the training augmentation (--shift 1 --flip)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import conv

    augmented = []  # (shape, shift, flip) of each call: the binned run augments its epochs
    random_shift_flip = conv.random_shift_flip

    def recording_shift_flip(images, max_shift, flip, generator):
        augmented.append((tuple(images.shape), max_shift, flip))
        return random_shift_flip(images, max_shift, flip, generator)

    monkeypatch.setattr(conv, "random_shift_flip", recording_shift_flip)
    augmentation = ["--shift", "1", "--flip"] if encoding == "binned" else []
    out = conv.main([
        "--epochs", "2", "--samples-per-epoch", "50", "--epoch-test-samples", "4",
        "--max-test-samples", "4", "--batch-size", "50", "--channels", "2", "4",
        "--hidden", "3", "--encoding", encoding, "--data-root", str(REPO / "data"),
        "--out", str(tmp_path / "conv"), *augmentation,
    ])
    assert augmented == ([((50, 28, 28), 1, True)] * 2 if augmentation else [])
    assert out == (tmp_path / "conv").resolve()
    for name in ("metrics.json", "learning_curves.png", "feature_maps_conv1.png",
                 "feature_maps_conv2.png", "raster.png", "model.pt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["bins"] == 8 and metrics["config"]["pool_spikes"] == 2
    assert metrics["config"]["hidden"] == [3] and metrics["config"]["encoding"] == encoding
    assert len(metrics["history"]) == 2
    assert _finite([h["train_loss"] for h in metrics["history"]]
                   + [h["test_loss"] for h in metrics["history"]])
    final = metrics["final"]
    assert final["test_samples"] == 4
    assert 0.0 <= final["test_accuracy_ordinary"] <= 1.0
    assert 0.0 <= final["test_accuracy"] <= 1.0 and math.isfinite(final["test_loss"])
    # every spiking layer reported (conv, conv, hidden, readout), the first convolution active
    # (input spikes of bright pixels)
    assert set(final["activity_per_layer"]) == {"1", "3", "5", "6"}
    assert final["activity_per_layer"]["1"] > 0
    if encoding == "intensity":
        # --init: a second run from the first one's model.pt (no training epochs) evaluates the
        # same network, so its final test metrics are the first run's
        again = conv.main([
            "--epochs", "0", "--max-test-samples", "4", "--epoch-test-samples", "4",
            "--channels", "2", "4", "--hidden", "3", "--encoding", encoding,
            "--data-root", str(REPO / "data"), "--init", str(out / "model.pt"),
            "--out", str(tmp_path / "conv_init"),
        ])
        final_again = json.loads((again / "metrics.json").read_text())["final"]
        assert final_again["test_loss"] == final["test_loss"]
        assert final_again["test_accuracy"] == final["test_accuracy"]
        assert final_again["activity_per_layer"] == final["activity_per_layer"]
