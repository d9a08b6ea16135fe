"""Helpers shared by several test files (import them: ``from conftest import ...``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The suite compiles hundreds of small XLA programs that then run for milliseconds; most of its
# time went to XLA's LLVM backend optimising their machine code. Tests (and the examples they
# start, which inherit the environment) compile at LLVM -O0: the same HLO programs (XLA's own
# passes, fusion and reduction order are unchanged), results within a few units in the last
# place of the default -O3 build (test_compile.py's
# test_suite_compiler_setting_agrees_with_the_default_level checks it). Set before JAX
# initialises its CPU backend; a level set by the caller wins.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

# Many programs are compiled again by another process (the examples and DDP workers the tests
# start) or another layer instance with the same shapes: a persistent compilation cache shared by
# the suite's processes compiles each once (keyed by the program and XLA_FLAGS, so the -O3 check
# compiles its own). `make test` points its pytest processes at one fresh folder; a bare pytest
# run gets a temporary one. A folder set by the caller wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spike-bridge-tests-jax-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from functools import partial  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from spike_bridge.nn import BinnedLatencyEncoder, FirstSpikeTime, ThetaLinear  # noqa: E402
from spike_bridge.spikes import Spikes  # noqa: E402

# Continuous input spike times [B=2, N_in=4, K_in=2] (as from a LatencyEncoder): all distinct, away
# from each other, from 0 and from T = 2; two of them fall after T (not part of the trial).
# Shared by the layer tests so that their kernels compile once per model.
INPUT_TIMES = torch.tensor(
    [[[0.10, 0.90], [0.35, 2.50], [0.60, 1.30], [0.20, 1.70]],
     [[0.45, 1.10], [0.05, 0.75], [1.45, 2.20], [0.30, 1.90]]],
    dtype=torch.float64,
)

#: A small recurrent network's configuration (``SpikingRecurrent(4, 3, **RECURRENT_CONFIG)`` on
#: ``INPUT_TIMES``), shared by its gradient check and its training test: one set of compiles.
RECURRENT_CONFIG = dict(T=3.0, max_events=32, max_spikes=2, recurrent_scale=1.0,
                        learn_input_weights=True)


def assert_spikes_robust(out: Spikes, input_times: torch.Tensor, T: float, margin=1e-3):
    """Ordinary spikes exist and none is within ``margin`` of the trial end or an input spike
    (where a perturbation could add, remove or reorder events: finite differences need neither)."""
    spikes = out.times[torch.isfinite(out.times)]
    assert spikes.numel() > 0
    assert (spikes - T).abs().min() > margin
    assert (spikes[:, None] - input_times.flatten()[None]).abs().min() > margin


def readme_network() -> nn.Sequential:
    """The README's Quick-start network (784-100-100-10 theta neurons, ``T = 2``) in float64,
    weights scaled by 16 for active hidden layers, as in a trained network (seeded)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        BinnedLatencyEncoder(n_bins=1, T=2.0),
        ThetaLinear(784, 100), ThetaLinear(100, 100), ThetaLinear(100, 10),
        FirstSpikeTime(),
    ).double()
    with torch.no_grad():
        for layer in net[1:4]:
            layer.weight.mul_(16)
    return net


# Jitted model methods (eager evaluation of the many small ops would dominate the test time).
@partial(jax.jit, static_argnums=0)
def flow(model, x, dt):
    return model.flow(x, dt)


@partial(jax.jit, static_argnums=0)
def next_spike_dt(model, x):
    return model.next_spike_dt(x)


def assert_close_scaled(actual, expected, tol):
    """``|actual - expected| <= tol * max(1, |expected|)`` elementwise (NaN fails)."""
    actual, expected = np.broadcast_arrays(np.asarray(actual), np.asarray(expected))
    scale = np.maximum(1.0, np.abs(expected))
    bad = ~(np.abs(actual - expected) <= tol * scale)
    assert not bad.any(), (
        f"mismatch at {np.argwhere(bad).tolist()}: {actual[bad]} vs {expected[bad]}"
    )
