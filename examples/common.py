"""Printing and plotting shared by the example scripts; the library does the work.

Import it from a script in ``examples/`` (the script's folder is on ``sys.path``). It imports
:mod:`spike_bridge.recording`, hence JAX: scripts that use DataLoader workers import it inside
``main()``, so that workers (which re-import the main script) do not load JAX.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from spike_bridge import plot
from spike_bridge.evaluation import evaluate
from spike_bridge.recording import record

PathLike = Union[str, os.PathLike]


def epoch_line(epoch: int, epochs: int, record_: Mapping[str, Any]) -> str:
    """One line per epoch: training and test loss and accuracy, activity, time."""
    return (
        f"epoch {epoch}/{epochs}: train loss {record_['train_loss']:.4f} "
        f"acc {record_['train_accuracy']:.2%} | test loss {record_['test_loss']:.4f} "
        f"acc {record_['test_accuracy']:.2%} with pseudospikes, "
        f"{record_['test_accuracy_ordinary']:.2%} ordinary spikes only | activity "
        f"{record_['test_activity']:.3f} spikes/hidden neuron, silent "
        f"{record_['test_silent_fraction']:.1%} | {record_['step_time_s']:.2f} s/step, "
        f"epoch {record_['epoch_time_s']:.0f} s"
    )


def history_columns(history: Sequence[Mapping[str, Any]],
                    keys: Optional[Sequence[str]] = None) -> dict[str, list[Any]]:
    """Per-epoch records -> ``{key: [value of epoch 1, epoch 2, ...]}`` (scalar keys only)."""
    if keys is None:
        keys = [key for key, value in (history[0].items() if history else [])
                if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {key: [entry.get(key) for entry in history] for key in keys}


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Learning curves PNG: losses, accuracies (both readouts), activity and silent fraction."""
    wanted = ("train_loss", "test_loss", "train_accuracy", "test_accuracy",
              "test_accuracy_ordinary", "test_activity", "test_silent_fraction")
    present = set().union(*(entry.keys() for entry in history)) if history else set()
    plot.learning_curves(history_columns(history, [k for k in wanted if k in present]), path=path)
    return Path(path)


@torch.no_grad()
def plot_example(net: nn.Module, inputs: torch.Tensor, label: int, out_dir: PathLike) -> list[Path]:
    """Raster of one sample (``inputs [1, ...]``) through all layers, input spikes first, and
    its output first-spike times (``raster.png``, ``output_spike_times.png``)."""
    was_training = net.training
    net.eval()
    try:
        with record(net, include_encoders=True) as recording:
            first_times = net(inputs)
    finally:
        net.train(was_training)
    spikes = list(recording.last().values())
    names = ["input"] + [f"hidden {i}" for i in range(1, len(spikes) - 1)] + ["output"]
    out_dir = Path(out_dir)
    paths = [out_dir / "raster.png", out_dir / "output_spike_times.png"]
    T = spikes[-1].T
    plot.raster([s.times[0].cpu() for s in spikes], T, names=names, path=paths[0])
    plot.first_spike_times(first_times[0].cpu(), label=int(label),
                           pseudo_mask=(spikes[-1].counts[0] == 0).cpu(), T=T, path=paths[1])
    return paths


def batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
            generator: Optional[torch.Generator] = None):
    """``(inputs, labels)`` batches of in-memory tensors, shuffled with ``generator`` (if given)."""
    order = (torch.randperm(len(labels), generator=generator) if generator is not None
             else torch.arange(len(labels)))
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        yield inputs[index], labels[index]


def train_and_evaluate(net: nn.Module, train_batches: Iterable, test_batches: Iterable,
                       optimizer: torch.optim.Optimizer, schedule: Any,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       epoch: int, started: float, log_every: int = 0) -> dict[str, Any]:
    """One epoch of training (a scheduler step per batch), then :func:`evaluate` on
    ``test_batches``; returns the epoch's record (the keys :func:`plot_learning_curves` reads,
    ``seconds`` since ``started``, per-layer activity)."""
    net.train()
    loss_sum = correct = samples = 0.0
    for step, (inputs, labels) in enumerate(train_batches, 1):
        first_times = net(inputs)
        loss = loss_fn(first_times, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        samples += len(labels)
        loss_sum += float(loss.detach()) * len(labels)
        correct += float((first_times.argmin(-1) == labels).sum())
        if log_every and step % log_every == 0:
            print(f"epoch {epoch} step {step}: train loss {loss_sum / samples:.4f}, accuracy "
                  f"{correct / samples:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
    metrics = evaluate(net, test_batches, loss_fn)
    return {
        "epoch": epoch, "train_loss": loss_sum / samples, "train_accuracy": correct / samples,
        "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"],
        "test_accuracy_ordinary": metrics["accuracy_ordinary"],
        "test_activity": metrics["activity"],
        "test_silent_fraction": metrics["silent_fraction"],
        "test_activity_per_layer": metrics["activity_per_layer"],
        "seconds": time.perf_counter() - started,
    }
