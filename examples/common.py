"""Shared helpers of the example scripts: networks, evaluation, checkpoints, metrics and plots.

Import it from a script in ``examples/`` (the script's folder is on ``sys.path``)::

    from common import build_mlp, evaluate, record_layers, save_checkpoint, ...

This module imports :mod:`spike_bridge.nn`, hence JAX. Scripts that use DataLoader workers should
import it inside their ``if __name__ == "__main__":`` code, not at module level, so that workers
(which re-import the main script) do not load JAX.

Contents:

* networks: :data:`NEURON_MODELS`, :func:`build_mlp`, :func:`spiking_layers`, :func:`record_layers`
  (a forward pass that keeps every layer's spikes and grows too-small spike buffers);
* evaluation: :func:`evaluate` (the reference's test metrics), :class:`ExampleRecord`;
* training order and schedule: :class:`EpochShuffleSampler` (resumable shuffling),
  :class:`ExponentialDecay` (the reference's learning-rate decay, for ``LambdaLR``);
* checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`rng_state`,
  :func:`set_rng_state`;
* outputs: :func:`write_json`, :func:`history_columns`, :func:`plot_learning_curves`,
  :func:`plot_example`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import spike_bridge  # noqa: F401

import numpy as np
import torch
from torch import nn

from jax_kernels.models import MODELS, PseudoNeuronModel
from spike_bridge import plot
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    BufferOverflowError,
    FirstSpikeTime,
    LIFLinear,
    OscLIFLinear,
    QIFLinear,
    QIFRecurrent,
    SpikingLinear,
    ThetaLinear,
)
from spike_bridge.spikes import Spikes

__all__ = [
    "NEURON_MODELS",
    "CHECKPOINT_FORMAT",
    "EpochShuffleSampler",
    "ExampleRecord",
    "ExponentialDecay",
    "build_mlp",
    "spiking_layers",
    "record_layers",
    "evaluate",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "write_json",
    "history_columns",
    "plot_learning_curves",
    "plot_example",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Neuron model name -> feedforward layer class. The classes carry each model's default
#: parameters (theta: the reference MNIST setup, tau = 6/pi, I0 = 5/4).
NEURON_MODELS: dict[str, type[SpikingLinear]] = {
    "theta": ThetaLinear,
    "qif": QIFLinear,
    "osclif": OscLIFLinear,
    "lif": LIFLinear,
}
_unregistered = set(NEURON_MODELS) - set(MODELS)
if _unregistered:  # pragma: no cover - guards against renames in jax_kernels.models
    raise ImportError(f"NEURON_MODELS names {_unregistered} missing from jax_kernels MODELS")

#: Spike buffers (``max_spikes``) grow by doubling up to this size before an overflow is fatal.
MAX_SPIKE_BUFFER = 1024

#: Version tag stored in checkpoints written by :func:`save_checkpoint`.
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


def build_mlp(
    hidden_sizes: Sequence[int],
    model: str = "theta",
    *,
    in_features: int = 784,
    out_features: int = 10,
    n_bins: int = 1,
    T: float = 2.0,
    flip_probability: float = 0.0,
    encoder_input: str = "bins",
    w_scale: float = 0.5,
    max_spikes: int = 8,
    model_params: Optional[Mapping[str, float]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Sequential:
    """Feedforward spiking classifier: binned latency encoder, spiking layers, first-spike readout.

    With the defaults and ``hidden_sizes=[100, 100]`` this is the reference MNIST network
    (784-100-100-10 theta neurons, binary input, ``T = 2``, initial weights uniform in
    ``+-0.5/sqrt(fan_in)``, learnable initial phases ``Theta/2``).

    Args:
        hidden_sizes: neurons of each hidden layer (may be empty: input straight to output).
        model: neuron model, a key of :data:`NEURON_MODELS` (``"theta"``, ``"qif"``,
            ``"osclif"``, ``"lif"``).
        in_features: input pixels; out_features: classes (one output neuron each).
        n_bins: input time bins of the encoder (1 = binary image).
        T: trial duration, in units of the neurons' time constant.
        flip_probability: the encoder's input noise in training mode (reference: 0.02).
        encoder_input: what the network is fed: ``"bins"`` (``spike_bridge.data.BinPixels`` in
            the dataset transform, as ``mnist.py`` does) or ``"pixels"``.
        w_scale: initial weight scale.
        max_spikes: initial spike buffer per neuron (:func:`record_layers` grows it if needed).
        model_params: neuron parameters overriding the layer class defaults, e.g.
            ``{"I0": 1.5}`` for theta neurons.
        device, dtype: of the parameters (and the encoder's spike times).

    Returns:
        ``nn.Sequential(encoder, layer_1, ..., layer_out, FirstSpikeTime(pseudo=...))``. The readout
        uses pseudospikes for models with pseudodynamics; LIF neurons have none, so their silent
        output neurons read ``T`` (and get no gradient).
    """
    key = model.lower() if isinstance(model, str) else model
    if key not in NEURON_MODELS:
        raise ValueError(
            f"unknown neuron model {model!r}; choose one of {', '.join(sorted(NEURON_MODELS))}"
        )
    sizes = [int(in_features), *(int(n) for n in hidden_sizes), int(out_features)]
    if any(n <= 0 for n in sizes):
        raise ValueError(f"layer sizes must be positive, got {sizes}")
    layer_class = NEURON_MODELS[key]
    factory = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = [
        BinnedLatencyEncoder(n_bins=n_bins, T=T, flip_probability=flip_probability,
                             input=encoder_input, **factory)
    ]
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        is_output = index == len(sizes) - 2
        name = "output" if is_output else f"hidden {index + 1}"
        layers.append(
            layer_class(
                n_in, n_out, T=T, max_spikes=max_spikes, w_scale=w_scale,
                name=f"{name} layer ({layer_class.__name__} {n_in}->{n_out})",
                **dict(model_params or {}), **factory,
            )
        )
    has_pseudodynamics = isinstance(layers[-1].model, PseudoNeuronModel)
    layers.append(FirstSpikeTime(pseudo=has_pseudodynamics))
    return nn.Sequential(*layers)


def _is_spiking_layer(module: nn.Module) -> bool:
    return isinstance(module, (SpikingLinear, QIFRecurrent))


def spiking_layers(net: nn.Module) -> list[nn.Module]:
    """The spiking layers of ``net`` (``SpikingLinear`` / ``QIFRecurrent``), in order."""
    return [module for module in net.modules() if _is_spiking_layer(module)]


def _grow_spike_buffer(layer: nn.Module, error: BufferOverflowError) -> bool:
    """Double ``layer.max_spikes`` (up to :data:`MAX_SPIKE_BUFFER`); False if it cannot grow."""
    if not hasattr(layer, "max_spikes") or layer.max_spikes >= MAX_SPIKE_BUFFER:
        return False
    if "max_spikes" not in str(error):  # e.g. QIFRecurrent's max_events: not a spike buffer
        return False
    new_size = min(2 * layer.max_spikes, MAX_SPIKE_BUFFER)
    logger.warning("%s; growing its spike buffer to max_spikes=%d", error, new_size)
    layer.max_spikes = new_size
    return True


def run_growing_buffer(module: nn.Module, value: Any, *, grow: bool = True) -> Any:
    """``module(value)``; if a spiking layer overflows its spike buffer
    (:class:`~spike_bridge.nn.BufferOverflowError`) and ``grow``, double its ``max_spikes`` (up
    to :data:`MAX_SPIKE_BUFFER`; kept for later calls) and run it again."""
    while True:
        try:
            return module(value)
        except BufferOverflowError as error:
            if not (grow and _grow_spike_buffer(module, error)):
                raise


def record_layers(
    sequential: nn.Sequential,
    x: Any,
    *,
    include_encoder: bool = False,
    grow_buffers: bool = True,
) -> tuple[Any, list[Spikes]]:
    """Run ``sequential`` module by module; return its output and the spikes of every layer.

    Args:
        sequential: an ``nn.Sequential`` such as :func:`build_mlp`'s network.
        x: its input (e.g. images or bins ``[B, 784]``).
        include_encoder: also keep the :class:`Spikes` of modules that are not spiking layers
            (the encoder's input spikes), e.g. for a raster that starts with the input.
        grow_buffers: when a spiking layer overflows its spike buffer
            (:class:`~spike_bridge.nn.BufferOverflowError`), double its ``max_spikes`` and run
            that layer again (the change is kept for later calls), instead of failing.

    Returns:
        ``(output, spikes)``: the last module's output (differentiable, as ``sequential(x)``) and
        one :class:`Spikes` per spiking layer, in order (plus encoders' when asked).
    """
    if not isinstance(sequential, nn.Sequential):
        raise TypeError(f"record_layers needs an nn.Sequential, got {type(sequential).__name__}")
    recorded: list[Spikes] = []
    value = x
    for module in sequential:
        output = run_growing_buffer(module, value, grow=grow_buffers)
        if isinstance(output, Spikes) and (include_encoder or _is_spiking_layer(module)):
            recorded.append(output)
        value = output
    return value, recorded


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class ExampleRecord:
    """One test sample's spikes through the network, for plots.

    Attributes:
        label: true class. layer_names: one per entry of ``layer_times``.
        layer_times: ``[N_l, K_l]`` ordinary spike times of each layer, input spikes first
            (``+inf`` = no spike).
        output_times: ``[C]`` first spike time of each output neuron as the readout sees it
            (pseudospike times ``>= T`` for silent neurons with pseudodynamics).
        output_silent: ``[C]`` True for output neurons without an ordinary spike.
        T: trial duration.
    """

    label: int
    layer_names: list[str]
    layer_times: list[torch.Tensor]
    output_times: torch.Tensor
    output_silent: torch.Tensor
    T: float


def _layer_names(n_spiking: int) -> list[str]:
    return ["input"] + [f"hidden {i}" for i in range(1, n_spiking)] + ["output"]


@torch.no_grad()
def evaluate(
    net: nn.Sequential,
    loader: Iterable,
    T: Optional[float] = None,
    *,
    gamma: float = 1e-2,
    record_example: Optional[int] = None,
) -> dict[str, Any]:
    """Test metrics of the reference MNIST experiment over a whole loader (eval mode, no grad).

    Args:
        net: a network from :func:`build_mlp` (encoder, spiking layers, first-spike readout).
        loader: yields ``(inputs, labels)`` batches.
        T: trial duration for the "ordinary spikes only" readout (default: the output layer's).
        gamma: weight of the loss's spike-time regulariser (as in training).
        record_example: if given, the index (within the first batch) of a sample whose spikes
            are returned as ``"example"`` (:class:`ExampleRecord`) for plots.

    Returns:
        dict with (averages weighted by samples)

        * ``loss``, ``accuracy``: loss and accuracy of the readout (with pseudospikes for models
          that have them);
        * ``loss_ordinary``, ``accuracy_ordinary``: the same from ordinary spikes only (silent
          output neurons read ``T``);
        * ``activity``: ordinary spikes per hidden neuron and sample (all hidden layers), and
          ``activity_per_layer`` (a list, one per hidden layer);
        * ``silent_fraction``: fraction of hidden neurons that spike for no sample of the whole
          loader, and ``silent_fraction_per_layer``;
        * ``samples``: number of samples; and ``"example"`` if ``record_example`` was given.

        With no hidden layers, activity and silent fraction are NaN.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    totals = {"loss": 0.0, "accuracy": 0.0, "loss_ordinary": 0.0, "accuracy_ordinary": 0.0}
    spike_totals: Optional[list[float]] = None
    ever_spiked: Optional[list[torch.Tensor]] = None
    n_samples = 0
    example: Optional[ExampleRecord] = None
    try:
        for batch_index, (inputs, labels) in enumerate(loader):
            inputs, labels = inputs.to(device), labels.to(device)
            first_times, recorded = record_layers(
                net, inputs, include_encoder=batch_index == 0 and record_example is not None
            )
            if batch_index == 0 and record_example is not None:
                example = _example_record(first_times, recorded, labels, record_example)
                recorded = recorded[1:]  # drop the encoder's spikes again
            if not recorded:
                raise ValueError("evaluate: the network has no spiking layer")
            output = recorded[-1]
            trial_end = output.T if T is None else float(T)
            ordinary_times = torch.clamp(output.times[..., 0], max=trial_end)
            batch = labels.shape[0]
            n_samples += batch
            for key, times in (("", first_times), ("_ordinary", ordinary_times)):
                loss = first_spike_cross_entropy(times, labels, trial_end, gamma)
                correct = (times.argmin(-1) == labels).sum()
                totals["loss" + key] += float(loss) * batch
                totals["accuracy" + key] += float(correct)
            hidden = recorded[:-1]
            counts = [spikes.counts for spikes in hidden]
            if spike_totals is None:
                spike_totals = [0.0] * len(hidden)
                ever_spiked = [torch.zeros(c.shape[1], dtype=torch.bool, device=device)
                              for c in counts]
            for index, count in enumerate(counts):
                spike_totals[index] += float(count.sum())
                ever_spiked[index] |= (count > 0).any(0)
    finally:
        net.train(was_training)
    if n_samples == 0:
        raise ValueError("evaluate: the loader yielded no samples")

    metrics: dict[str, Any] = {key: value / n_samples for key, value in totals.items()}
    sizes = [int(mask.numel()) for mask in ever_spiked]
    metrics["activity_per_layer"] = [
        total / (n_samples * size) for total, size in zip(spike_totals, sizes)
    ]
    metrics["silent_fraction_per_layer"] = [
        float((~mask).float().mean()) for mask in ever_spiked
    ]
    n_hidden = sum(sizes)
    metrics["activity"] = sum(spike_totals) / (n_samples * n_hidden) if n_hidden else math.nan
    metrics["silent_fraction"] = (
        sum(float((~mask).sum()) for mask in ever_spiked) / n_hidden if n_hidden else math.nan
    )
    metrics["samples"] = n_samples
    if example is not None:
        metrics["example"] = example
    return metrics


def _example_record(first_times: torch.Tensor, recorded: list[Spikes], labels: torch.Tensor,
                    index: int) -> ExampleRecord:
    if not 0 <= index < labels.shape[0]:
        raise ValueError(
            f"record_example={index} is outside the first batch (size {labels.shape[0]})"
        )
    output = recorded[-1]
    return ExampleRecord(
        label=int(labels[index]),
        layer_names=_layer_names(len(recorded) - 1),
        layer_times=[spikes.times[index].detach().cpu() for spikes in recorded],
        output_times=first_times[index].detach().cpu(),
        output_silent=(output.counts[index] == 0).cpu(),
        T=output.T,
    )


# --------------------------------------------------------------------------------------------
# Shuffling and learning-rate schedule
# --------------------------------------------------------------------------------------------


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Random order of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Pass it as the DataLoader's ``sampler`` and call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``). Unlike ``shuffle=True``, whose order depends on how many numbers the
    loader's generator has handed out before (which differs between a fresh and a persistent
    worker iterator), a resumed run sees exactly the order of an uninterrupted one.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ExponentialDecay:
    """``LambdaLR`` factor ``exp(-step / decay_steps)``: the reference's learning-rate decay.

    The reference uses ``optax.exponential_decay(lr, decay_steps, 1/e)`` with ``decay_steps =
    int(100 epochs * steps per epoch)``; step the scheduler once per optimizer step. A class (not
    a lambda) so that it pickles and its ``decay_steps`` is part of the scheduler's state dict.
    ``decay_steps = inf`` gives a constant learning rate.
    """

    def __init__(self, decay_steps: float):
        if not decay_steps > 0:
            raise ValueError(f"decay_steps must be positive (inf: no decay), got {decay_steps}")
        self.decay_steps = float(decay_steps)

    def __call__(self, step: int) -> float:
        return math.exp(-step / self.decay_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decay_steps={self.decay_steps})"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """States of the torch (CPU and CUDA), numpy and Python random generators."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"]).astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any],
    epoch: int,
    history: Sequence[Mapping[str, Any]],
    config: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a training checkpoint atomically (a crash never leaves a truncated file).

    Args:
        path: checkpoint file (parent folders are created).
        model, optimizer, scheduler: their ``state_dict()`` is saved (``scheduler`` may be None).
        epoch: number of completed epochs.
        history: per-epoch metrics (JSON-like values).
        config: run configuration (JSON-like), checked by scripts when resuming.
        extra: anything else loadable with ``torch.load(weights_only=True)``.

    The checkpoint also holds the random generator states (:func:`rng_state`) and the spike
    buffer sizes of the spiking layers, so that a resumed run continues like an uninterrupted one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": [_jsonable(entry) for entry in history],
        "config": _jsonable(dict(config or {})),
        "rng": rng_state(),
        "max_spikes": [int(getattr(layer, "max_spikes", 0)) for layer in spiking_layers(model)],
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    restore_rng: bool = True,
    map_location: Optional[Union[str, torch.device]] = None,
) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_checkpoint` into ``model`` (and optimizer, scheduler).

    Args:
        path: checkpoint file.
        model, optimizer, scheduler: objects built like the saved ones; their states are loaded.
        restore_rng: also restore the random generator states.
        map_location: as for ``torch.load`` (default: the model's device).

    Returns:
        The checkpoint dict (``epoch``, ``history``, ``config``, ``extra``, ...).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if map_location is None:
        map_location = next(model.parameters()).device
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by examples/common.py "
                         f"(format {CHECKPOINT_FORMAT})")
    model.load_state_dict(checkpoint["model"])
    for layer, size in zip(spiking_layers(model), checkpoint.get("max_spikes", [])):
        if size and hasattr(layer, "max_spikes"):
            layer.max_spikes = max(layer.max_spikes, size)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if restore_rng:
        rng = checkpoint["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = [state.cpu() for state in rng["cuda"]]
        set_rng_state(rng)
    return checkpoint


# --------------------------------------------------------------------------------------------
# Metrics files and plots
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors/numpy -> numbers or lists, NaN/inf -> None, paths -> str."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_json(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically; non-finite floats become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def history_columns(history: Sequence[Mapping[str, Any]],
                    keys: Optional[Sequence[str]] = None) -> dict[str, list[Any]]:
    """Per-epoch records -> ``{key: [value of epoch 1, epoch 2, ...]}`` (scalar keys only)."""
    if keys is None:
        keys = [key for key, value in (history[0].items() if history else [])
                if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return {key: [entry.get(key) for entry in history] for key in keys}


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: PathLike,
                         keys: Optional[Sequence[str]] = None) -> Path:
    """Learning curves PNG from per-epoch records (losses, accuracies, other metrics panels).

    ``keys`` picks the series (default: train/test loss and accuracy, the ordinary-spikes
    accuracy, activity and silent fraction, where present).
    """
    if keys is None:
        wanted = ("train_loss", "test_loss", "test_loss_ordinary", "train_accuracy",
                  "test_accuracy", "test_accuracy_ordinary", "test_activity",
                  "test_silent_fraction")
        present = set().union(*(entry.keys() for entry in history)) if history else set()
        keys = [key for key in wanted if key in present]
    plot.learning_curves(history_columns(history, keys), path=path)
    return Path(path)


def plot_example(example: ExampleRecord, out_dir: PathLike,
                 raster_name: str = "raster.png",
                 output_name: str = "output_spike_times.png") -> list[Path]:
    """Spike raster through all layers and the output first-spike times of one example.

    Args:
        example: from :func:`evaluate` (``record_example=...``).
        out_dir: folder for the two PNGs.

    Returns:
        The paths of the raster and the output-times figure.
    """
    out_dir = Path(out_dir)
    raster_path, output_path = out_dir / raster_name, out_dir / output_name
    plot.raster(example.layer_times, example.T, names=example.layer_names, path=raster_path)
    plot.first_spike_times(example.output_times, label=example.label,
                           pseudo_mask=example.output_silent, T=example.T, path=output_path)
    return [raster_path, output_path]
