"""Training checkpoints and run metrics files.

* :func:`save_checkpoint` / :func:`load_checkpoint`: model, optimizer, scheduler, history,
  configuration and random generator states in one file, written atomically; a resumed run
  continues like an uninterrupted one (spiking layers' buffer sizes are in their state dict);
* :func:`rng_state` / :func:`set_rng_state`: torch (CPU, CUDA), numpy and Python generators;
* :func:`write_json`: metrics as JSON, one way for every script (non-finite floats -> null).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]

PathLike = Union[str, os.PathLike]

#: Version tag stored in checkpoints written by :func:`save_checkpoint` (2: buffer sizes moved
#: into the model's state dict).
CHECKPOINT_FORMAT = 2


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

    The checkpoint also holds the random generator states (:func:`rng_state`); the spike buffer
    sizes of the spiking layers are part of ``model.state_dict()``. A resumed run continues like
    an uninterrupted one.
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
        raise ValueError(f"{path} is not a checkpoint written by spike_bridge.checkpoint "
                         f"(format {CHECKPOINT_FORMAT})")
    model.load_state_dict(checkpoint["model"])
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
