"""Training-step cost of spike_bridge and its peers, side by side (784-100-100-10, Fashion-MNIST).

One training step = encode + forward + backward + optimizer step, float32, CPU, at ``--batch``
(default 1000) on the first ``--batch`` Fashion-MNIST test images (from
``spike_bridge.data.load_dataset(..., download=False)``: offline). Every row runs in its own
subprocess, so its peak RSS (``ru_maxrss`` of that process) is its own and no row's imports or
thread pools touch another's:

- ``S1``  ``BinnedLatencyEncoder(n_bins=1)`` (binary images, one fused input bin) -> three
  ``ThetaLinear`` -> ``FirstSpikeTime``, weights x3 after initialisation,
  ``first_spike_cross_entropy``, Adam.
- ``S2``  the same spikes given as ``Spikes(times [B, 784, 1], T)``: all at one instant, without
  the ``binned`` form (what a user who brings spike times of their own gets).
- ``S3``  ``LatencyEncoder(T=2, scale=0.5)`` on intensities in [0, 1] (about 390 distinct input
  times per sample), weights x3.
- ``S4``  as S1 with weights x16 (hidden layers active, as after training).
- ``whole-network``  ``jax_kernels.layers.block_feedforward_network``: the whole network as one
  recurrent network (the reference's formulation, our re-implementation of it), binary input,
  weights x3, one jitted ``value_and_grad`` plus an Adam update written in ``jax.numpy``.
- ``snntorch``  snnTorch 1.0's tutorial 5 setup ("Training Spiking Neural Networks with
  snnTorch"): ``Linear`` + ``Leaky(beta=0.95)`` (default arctan surrogate gradient)
  784-100-100-10, the image's intensities fed as input current at each of 25 time steps, the
  cross-entropy of the output membrane potential summed over the steps, Adam (lr 5e-4), in a clean
  process that never imports spike_bridge. (``spikegen.rate`` input, tutorial 6's alternative,
  costs more than the network itself here: its Bernoulli draws over ``[25, B, 784]``.)
- ``snntorch+import``  the same step in a process that imported ``spike_bridge.nn`` first;
  ``snntorch+S1``: in a process that also ran one S1 training step first (JAX initialised, XLA's
  thread pool alive: a hybrid network's situation). Timing only.
- ``exact-snn``  exact-snn-nn's ``ExactTTFSNetwork`` (``ExactTTFSLinear`` layers: grid-scan
  forward, implicit-function-theorem gradients), its ``latency_encode`` /
  ``latency_cross_entropy``, ``calibrate_init_fire``, Adam (lr 2e-3), its default 2001-point time
  grid; if that runs out of memory (``--memory-limit-gb`` per process) a 201-point grid, noted.
- ``jaxsnn``  jaxsnn's event-based LIF layers (``Topology``, EventProp gradients, its yin-yang
  example's parameters and optimizer) on pixel latencies; needs the ``bench`` extra.

Per row: median seconds per step over ``--steps`` timed steps after ``--warmup`` steps (spike_bridge
rows: at least 10, until the adaptive buffers have settled), training
samples/s, peak RSS, and test accuracy after ``--train-steps`` steps from a fresh initialisation
on the training split (batch ``--batch``), evaluated on ``--test-samples`` test images (spike_bridge
and whole-network: earliest first (pseudo)spike time; snnTorch: largest spike count; exact-snn and
jaxsnn: earliest output spike). Ratios against the clean-process snnTorch step are printed. Unless
``--no-scaling``, spike_bridge's S3 step is also timed against batch, hidden width and input events
per sample (only the k brightest pixels spike) -> ``benchmarks/results/peers_scaling.png``.

Results: ``benchmarks/results/peers.md`` and ``peers.json``. Quick offline smoke run::

    .venv/bin/python benchmarks/peers.py --batch 50 --steps 1 --warmup 1 --train-steps 2 --no-scaling

A row that cannot run (package missing, out of memory, ``--peer-timeout``) is reported with the
reason, and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (784, 100, 100, 10)
T = 2.0  # trial duration of the spike_bridge networks (reference MNIST setup)
RESULT_TAG = "PEERS_RESULT "

SPIKE_BRIDGE = {  # scenario -> (input, weight gain)
    "S1": ("binned", 3.0),
    "S2": ("times", 3.0),
    "S3": ("latency", 3.0),
    "S4": ("binned", 16.0),
}
ROWS = ("S1", "S2", "S3", "S4", "whole-network", "snntorch", "snntorch+import", "snntorch+S1",
        "exact-snn", "jaxsnn")
LEARNING_RATE = {"spike_bridge": 2e-3, "whole-network": 2e-3, "snntorch": 5e-4,
                 "exact-snn": 2e-3, "jaxsnn": 5e-3}
SCALING = {
    "batch": (100, 250, 500, 1000, 2000),
    "hidden": (100, 200, 400, 800),
    "events": (1, 10, 50, 100, 200, 400, 784),
}


# --------------------------------------------------------------------------------------------
# Shared helpers (standard library and numpy only: imported by every worker)
# --------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def high_water_mb() -> float | None:
    """VmHWM of this process image (Linux). ``ru_maxrss`` survives ``exec`` (a worker starts at
    its parent's peak), so the orchestrator stays small and this cross-checks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def time_steps(step, cfg: dict) -> list[float]:
    """Wall seconds of ``cfg["steps"]`` calls of ``step()`` after ``cfg["warmup"]`` untimed ones.

    A row whose steps take longer than ``cfg["slow_step_s"]`` stops early (a warm-up step after
    the first, which may hold compilation, or a timed step over the limit ends the warm-up or the
    timing) and is marked slow: its training budget is skipped too.
    """
    times = []
    for index in range(cfg["warmup"] + cfg["steps"]):
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        timed = index >= cfg["warmup"]
        if timed:
            times.append(elapsed)
        if elapsed > cfg["slow_step_s"] and (timed or index > 0):
            cfg["slow"] = True
            if timed:
                break
    if not times:  # no warm-up steps left to skip: the slow row gets one timed step
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def load_arrays(path: str) -> dict:
    import numpy as np

    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def training_batches(data: dict, batch: int, steps: int):
    """``steps`` batches of (uint8 images [batch, 784], int64 labels) from the training split."""
    import numpy as np

    images, labels = data["train_x"], data["train_y"]
    for step in range(steps):
        index = (step * batch + np.arange(batch)) % len(labels)
        yield images[index], labels[index]


def test_batches(data: dict, batch: int, samples: int):
    images, labels = data["test_x"][:samples], data["test_y"][:samples]
    for start in range(0, len(labels), batch):
        yield images[start:start + batch], labels[start:start + batch]


def summary(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"step_s": median, "step_times_s": times, "samples_per_s": batch / median,
            "peak_rss_mb": peak_rss_mb(), "vm_hwm_mb": high_water_mb()}


def summary_of(step, cfg: dict, batch: int) -> dict:
    result = summary(time_steps(step, cfg), batch)
    result["slow"] = bool(cfg.get("slow"))
    return result


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own process (``--worker NAME --config JSON``)
# --------------------------------------------------------------------------------------------


def spike_bridge_network(scenario: str, hidden: int = 100):
    """(network, encode) of a spike_bridge scenario: ``encode`` maps numpy images to Spikes."""
    import torch
    from torch import nn

    from spike_bridge.nn import BinnedLatencyEncoder, FirstSpikeTime, LatencyEncoder, ThetaLinear
    from spike_bridge.spikes import Spikes

    kind, gain = SPIKE_BRIDGE[scenario]
    torch.manual_seed(0)
    sizes = (SIZES[0], hidden, hidden, SIZES[-1])
    layers = [ThetaLinear(n_in, n_out, T=T) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(gain)
    net = nn.Sequential(*layers, FirstSpikeTime())
    binned = BinnedLatencyEncoder(n_bins=1, T=T)
    latency = LatencyEncoder(T=T, scale=0.5)

    def encode(images):  # numpy [B, 784] -> Spikes
        pixels = torch.from_numpy(images)
        if kind == "binned":
            return binned(pixels)
        if kind == "times":
            return Spikes(binned(pixels).times, T)
        # latency: uint8 pixels, or float intensities in [0, 1] (the scaling curves' k brightest)
        if pixels.dtype == torch.uint8:
            pixels = pixels.to(torch.float32) / 255
        return latency(pixels)

    return net, encode


def spike_bridge_trainer(scenario: str, hidden: int = 100):
    import torch

    from spike_bridge.functional import first_spike_cross_entropy

    net, encode = spike_bridge_network(scenario, hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE["spike_bridge"])

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        first_times = net(encode(images))
        loss = first_spike_cross_entropy(first_times, torch.from_numpy(labels), T)
        loss.backward()
        optimizer.step()
        return float(loss)

    def predict(images):
        with torch.no_grad():
            return net(encode(images)).argmin(-1).numpy()

    return step, predict


def evaluate(predict, data: dict, batch: int, samples: int) -> float:
    correct = total = 0
    for images, labels in test_batches(data, batch, samples):
        correct += int((predict(images) == labels).sum())
        total += len(labels)
    return correct / total


def train_and_evaluate(make_trainer, data: dict, cfg: dict) -> dict:
    """Fresh trainer, ``train_steps`` steps on the training split, accuracy on the test images."""
    if cfg["train_steps"] <= 0:
        return {}
    if cfg.get("slow"):
        return {"training_skipped": f"training skipped: a step took over "
                                    f"{cfg['slow_step_s']:g} s (--slow-step-s)"}
    step, predict = make_trainer()
    losses = [step(images, labels)
              for images, labels in training_batches(data, cfg["batch"], cfg["train_steps"])]
    return {"train_steps": cfg["train_steps"], "final_train_loss": losses[-1],
            "test_accuracy": evaluate(predict, data, cfg["batch"], cfg["test_samples"])}


def settled_warmup(cfg: dict) -> dict:
    """spike_bridge rows warm up until the adaptive buffers have settled: they grow at once,
    and buffers still at their starting sizes shrink after ``SHRINK_AFTER_CALLS["max_spikes"]``
    (= ``["events_at_starting_size"]``) calls (each new size compiles once). A row's batch is
    fixed, so buffers sized by its data never need to shrink later."""
    from spike_bridge.nn import SHRINK_AFTER_CALLS

    first = max(SHRINK_AFTER_CALLS["max_spikes"], SHRINK_AFTER_CALLS["events_at_starting_size"])
    return {**cfg, "warmup": max(cfg["warmup"], first + 2)}


def worker_spike_bridge(cfg: dict, data: dict) -> dict:
    scenario = cfg["row"]
    images, labels = data["test_x"][:cfg["batch"]], data["test_y"][:cfg["batch"]]
    step, _ = spike_bridge_trainer(scenario)
    cfg = settled_warmup(cfg)
    result = summary_of(lambda: step(images, labels), cfg, cfg["batch"])
    result.update(train_and_evaluate(lambda: spike_bridge_trainer(scenario), data, cfg))
    return result


def worker_scaling(cfg: dict, data: dict) -> dict:
    """One S3 point: ``batch`` samples, ``hidden`` neurons per hidden layer, the ``events``
    brightest pixels of each image spiking (every kept pixel spikes, others never)."""
    import numpy as np

    batch, hidden, events = cfg["batch"], cfg["hidden"], cfg["events"]
    pixels, labels = data["test_x"][:batch], data["test_y"][:batch]
    rank = np.argsort(np.argsort(-pixels.astype(np.int64), axis=1, kind="stable"), axis=1)
    intensities = np.where(rank < events, (pixels.astype(np.float32) + 1) / 256, 0.0)
    step, _ = spike_bridge_trainer("S3", hidden)
    kept = intensities.astype(np.float32)
    result = summary_of(lambda: step(kept, labels), settled_warmup(cfg), batch)
    result["input_events_per_sample"] = float((kept > 0).sum(1).mean())
    return result


def worker_whole_network(cfg: dict, data: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(HERE))
    import kernels  # the reference setup and whole-network step of benchmarks/kernels.py

    gain, lr, (b1, b2, eps) = 3.0, LEARNING_RATE["whole-network"], (0.9, 0.999, 1e-8)

    def bins_of(images):  # 0: bright pixel (spikes), 1: never (BinnedLatencyEncoder(n_bins=1))
        return jnp.asarray((255 - images.astype(np.int32)) // 128, jnp.int32)

    def loss_fn(params, bins, labels):
        first, end_time = kernels.whole_first_times(*params, bins)
        return kernels.first_spike_loss(first, labels), (first, end_time)

    @jax.jit
    def train_step(params, moments, count, bins, labels):
        (loss, (_, end_time)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, bins, labels)
        count = count + 1
        first = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, moments[0], grads)
        second = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, moments[1], grads)
        params = jax.tree.map(
            lambda p, m, v: p - lr * (m / (1 - b1**count)) / (jnp.sqrt(v / (1 - b2**count)) + eps),
            params, first, second)
        weights, phases = params
        phases = [jnp.clip(p, 0.0, kernels.MODEL.period) for p in phases]
        return (weights, phases), (first, second), count, loss, jnp.min(end_time)

    predict_fn = jax.jit(lambda params, bins: kernels.whole_first_times(*params, bins)[0])

    def make_trainer():
        state = {"params": kernels.init_params(jnp.float32, gain)}
        state["moments"] = (jax.tree.map(jnp.zeros_like, state["params"]),) * 2
        state["count"] = jnp.zeros((), jnp.float32)
        state["min_end_time"] = float("inf")

        def step(images, labels):
            params, moments, count, loss, end = jax.block_until_ready(train_step(
                state["params"], state["moments"], state["count"], bins_of(images),
                jnp.asarray(labels, jnp.int32)))
            state.update(params=params, moments=moments, count=count)
            state["min_end_time"] = min(state["min_end_time"], float(end))
            return float(loss)

        def predict(images):
            return np.asarray(jnp.argmin(predict_fn(state["params"], bins_of(images)), -1))

        return step, predict, state

    images, labels = data["test_x"][:cfg["batch"]], data["test_y"][:cfg["batch"]]
    step, _, state = make_trainer()
    result = summary_of(lambda: step(images, labels), cfg, cfg["batch"])
    trainer_state = {}

    def trainer():
        step, predict, trainer_state["state"] = make_trainer()
        return step, predict

    result.update(train_and_evaluate(trainer, data, cfg))
    end_times = [state["min_end_time"]] + (
        [trainer_state["state"]["min_end_time"]] if trainer_state else [])
    result["event_buffer_sufficient"] = bool(min(end_times) >= T)
    result["note"] = (f"{kernels.WHOLE_NETWORK_EVENTS} event steps; Adam in jax.numpy inside the "
                      "jitted step")
    return result


def snntorch_trainer():
    import snntorch as snn
    import torch
    from torch import nn

    num_steps = 25

    class Net(nn.Module):  # snnTorch tutorial 5's network, 784-100-100-10
        def __init__(self):
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(SIZES[:-1], SIZES[1:]))
            self.lifs = nn.ModuleList(snn.Leaky(beta=0.95) for _ in self.fcs)

        def forward(self, x):  # [B, 784] -> output spikes and membranes [steps, B, 10]
            membranes = [lif.init_leaky() for lif in self.lifs]
            spikes, potentials = [], []
            for _ in range(num_steps):
                h = x
                for index, (fc, lif) in enumerate(zip(self.fcs, self.lifs)):
                    h, membranes[index] = lif(fc(h), membranes[index])
                spikes.append(h)
                potentials.append(membranes[-1])
            return torch.stack(spikes), torch.stack(potentials)

    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE["snntorch"], betas=(0.9, 0.999))
    cross_entropy = nn.CrossEntropyLoss()

    def encode(images):
        return torch.from_numpy(images).to(torch.float32) / 255

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        _, potentials = net(encode(images))
        targets = torch.from_numpy(labels)
        loss = sum(cross_entropy(potential, targets) for potential in potentials)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def predict(images):
        with torch.no_grad():
            return net(encode(images))[0].sum(0).argmax(-1).numpy()

    return step, predict


def worker_snntorch(cfg: dict, data: dict) -> dict:
    images, labels = data["test_x"][:cfg["batch"]], data["test_y"][:cfg["batch"]]
    if cfg["row"] == "snntorch+import":
        import spike_bridge.nn  # noqa: F401  (what the import alone does to torch's own ops)
    elif cfg["row"] == "snntorch+S1":
        step_s1, _ = spike_bridge_trainer("S1")
        step_s1(images, labels)
    elif "spike_bridge" in sys.modules:
        raise RuntimeError("the clean snnTorch process imported spike_bridge")
    step, _ = snntorch_trainer()
    result = summary_of(lambda: step(images, labels), cfg, cfg["batch"])
    if cfg["row"] == "snntorch":
        result.update(train_and_evaluate(snntorch_trainer, data, cfg))
    import snntorch

    result["note"] = f"snntorch {snntorch.__version__}, tutorial 5: 25 steps, current input"
    return result


def exact_snn_trainer(grid_pts: int):
    import exact_snn
    import torch

    torch.manual_seed(0)
    net = exact_snn.ExactTTFSNetwork(list(SIZES), grid_pts=grid_pts)
    net.calibrate_init_fire()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE["exact-snn"])

    def encode(images):  # its latency code, [784, B]
        return exact_snn.latency_encode(torch.from_numpy(images).T.to(torch.float32) / 255,
                                        t_max=net.t_max)

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = net.loss(encode(images), torch.from_numpy(labels))
        loss.backward()
        optimizer.step()
        return float(loss)

    def predict(images):
        with torch.no_grad():
            return net(encode(images)).argmin(0).numpy()

    return step, predict


def worker_exact_snn(cfg: dict, data: dict) -> dict:
    import exact_snn

    images, labels = data["test_x"][:cfg["batch"]], data["test_y"][:cfg["batch"]]
    notes = [f"exact-snn-nn {exact_snn.__version__}"]
    for grid_pts in (2001, 201):  # its default time grid, then a coarser one if memory runs out
        try:
            step, _ = exact_snn_trainer(grid_pts)
            times = time_steps(lambda: step(images, labels), cfg)
            break
        except (MemoryError, RuntimeError) as error:
            if grid_pts == 201 or "memory" not in str(error).lower():
                raise
            notes.append(f"{grid_pts}-point grid: out of memory ({str(error)[:80]})")
    notes.append(f"{grid_pts}-point time grid")
    result = summary(times, cfg["batch"])
    result["slow"] = bool(cfg.get("slow"))
    result.update(train_and_evaluate(lambda: exact_snn_trainer(grid_pts), data, cfg))
    result["note"] = "; ".join(notes)
    return result


def jaxsnn_trainer():
    """jaxsnn's layered EventProp example (yin-yang), resized to 784-100-100-10."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jaxsnn.event.loss import first_spike, ttfs_loss
    from jaxsnn.event.modules import LIF, Linear, Source
    from jaxsnn.event.modules.lif.lif import LIFParameters
    from jaxsnn.event.topology import Topology
    from jaxsnn.event.training import update
    from jaxsnn.event.types import OptState, Spike

    tau_syn, tau_mem = 6e-6, 12e-6
    params = LIFParameters(v_reset=-1000.0, v_th=1.0, tau_syn=tau_syn, tau_mem=tau_mem)
    t_late, t_max = 2.0 * tau_syn, 4.0 * tau_syn
    builder = Topology(t_max=t_max, backprop_method="eventprop")
    builder.add({  # buffers: input events + one spike per neuron (v_reset = -1000)
        "inp": Source(SIZES[0]),
        "lif1": LIF(SIZES[1], SIZES[0] + SIZES[1], params),
        "lif2": LIF(SIZES[2], SIZES[1] + SIZES[2], params),
        "lif3": LIF(SIZES[3], SIZES[2] + SIZES[3], params),
        "syn1": Linear(mean=3.0 / 784, std=1.6 / 784 ** 0.5),
        "syn2": Linear(mean=0.5 / 10, std=0.8 / 10),
        "syn3": Linear(mean=0.5 / 10, std=0.8 / 10),
    })
    builder.connect([("inp", "syn1"), ("syn1", "lif1"), ("lif1", "syn2"), ("syn2", "lif2"),
                     ("lif2", "syn3"), ("syn3", "lif3")])
    init_fn, apply_fn = builder.done()
    optimizer = optax.chain(optax.scale(1.0 / tau_syn), optax.clip(0.01),
                            optax.adam(LEARNING_RATE["jaxsnn"]))

    def encode(images):  # pixel latencies, sorted; dark pixels: empty events
        x = images.astype(np.float32) / 255
        times = np.where(x > 0, (1 - x) * t_late, np.inf).astype(np.float32)
        idx = np.broadcast_to(np.arange(x.shape[1]), x.shape)
        order = np.argsort(times, axis=1, kind="stable")
        times = np.take_along_axis(times, order, 1)
        idx = np.where(np.isfinite(times), np.take_along_axis(idx, order, 1), -1)
        return {"inp": Spike(time=jnp.asarray(times), idx=jnp.asarray(idx),
                             current=jnp.zeros(times.shape, jnp.float32),
                             layer_idx=jnp.zeros(times.shape, int),
                             internal=jnp.ones(times.shape, bool))}

    def targets_of(labels):
        return jnp.asarray(np.where(np.arange(SIZES[-1]) == labels[:, None], 0.0, 1.0))

    def loss_fn(parameters, batch_data):
        inputs, targets = batch_data
        events = apply_fn(inputs, parameters)
        first = jax.vmap(first_spike, in_axes=(0, None))(events["lif3"], SIZES[-1])
        loss = jnp.mean(jax.vmap(ttfs_loss, in_axes=(0, 0, None))(first, targets, tau_mem))
        return loss, first

    update_fn = jax.jit(partial(update, optimizer, loss_fn))
    weights = init_fn(jax.random.PRNGKey(0))
    state = {"opt": OptState(optimizer.init(weights), weights, jax.random.PRNGKey(1))}

    def step(images, labels):
        state["opt"], (recording, _) = update_fn(state["opt"], (encode(images), targets_of(labels)))
        loss = jax.block_until_ready(recording[0])
        return float(loss)

    first_times = jax.jit(lambda parameters, inputs: jax.vmap(first_spike, in_axes=(0, None))(
        apply_fn(inputs, parameters)["lif3"], SIZES[-1]))

    def predict(images):
        return np.asarray(jnp.argmin(first_times(state["opt"].params, encode(images)), -1))

    return step, predict


def worker_jaxsnn(cfg: dict, data: dict) -> dict:
    from importlib.metadata import version

    images, labels = data["test_x"][:cfg["batch"]], data["test_y"][:cfg["batch"]]
    step, _ = jaxsnn_trainer()
    result = summary_of(lambda: step(images, labels), cfg, cfg["batch"])
    result.update(train_and_evaluate(lambda: jaxsnn_trainer(), data, cfg))
    result["note"] = (f"jaxsnn {version('jaxsnn')}, LIF, EventProp, pixel latencies "
                      "(dark pixels silent)")
    return result


def run_worker(name: str, cfg: dict) -> None:
    if cfg.get("memory_limit_gb"):
        limit = int(cfg["memory_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if name == "data":
        print(RESULT_TAG + json.dumps(worker_data(cfg)), flush=True)
        return
    data = load_arrays(cfg["data"])
    workers = {"spike_bridge": worker_spike_bridge, "scaling": worker_scaling,
               "whole-network": worker_whole_network, "snntorch": worker_snntorch,
               "exact-snn": worker_exact_snn, "jaxsnn": worker_jaxsnn}
    result = workers[name](cfg, data)
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Orchestration (this process runs no benchmark itself)
# --------------------------------------------------------------------------------------------


def worker_of(row: str) -> str:
    if row in SPIKE_BRIDGE:
        return "spike_bridge"
    return "snntorch" if row.startswith("snntorch") else row


def run_subprocess(worker: str, cfg: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
               "--config", json.dumps(cfg)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--peer-timeout)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["process_wall_s"] = time.perf_counter() - start
            return result
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"error": f"exit {done.returncode}: " + (lines[-1][:300] if lines else "no output")}


def worker_data(cfg: dict) -> dict:
    """Fashion-MNIST (offline) as uint8 arrays in ``cfg["data"]`` for the other workers."""
    import numpy as np

    from spike_bridge.data import data_summary, load_dataset

    test = load_dataset("fashion-mnist", cfg["root"], train=False, download=False)
    train = load_dataset("fashion-mnist", cfg["root"], train=True, download=False)
    n_test, n_train = cfg["n_test"], min(len(train), cfg["n_train"])
    if n_test > len(test):
        raise ValueError(f"--batch/--test-samples need {n_test} test images; the split has "
                         f"{len(test)}")
    np.savez(cfg["data"],
             test_x=test.data[:n_test].reshape(n_test, -1).numpy(),
             test_y=test.targets[:n_test].numpy(),
             train_x=train.data[:n_train].reshape(n_train, -1).numpy(),
             train_y=train.targets[:n_train].numpy())
    return {"test": data_summary(test), "train": data_summary(train)}


def prepare_data(args, path: Path) -> dict:
    """Runs ``worker_data`` in a subprocess, so that this process stays small: a worker's
    ``ru_maxrss`` starts at this process's peak."""
    cfg = {"data": str(path), "root": args.root,
           "n_test": max(args.batch, args.test_samples,
                         0 if args.no_scaling else max(args.scaling_batch)),
           "n_train": args.batch * max(args.train_steps, 1)}
    result = run_subprocess("data", cfg, args.peer_timeout)
    if "error" in result:
        raise SystemExit(f"Fashion-MNIST could not be prepared: {result['error']}")
    return {"test": result["test"], "train": result["train"]}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform()}


def ratios(rows: dict) -> dict:
    def step(row):
        return rows.get(row, {}).get("step_s")

    def ratio(a, b):
        return step(a) / step(b) if step(a) and step(b) else None

    return {
        "S1 / snntorch": ratio("S1", "snntorch"),
        "S4 / snntorch": ratio("S4", "snntorch"),
        "S3 / snntorch": ratio("S3", "snntorch"),
        "S2 / S1": ratio("S2", "S1"),
        "snntorch after import spike_bridge.nn / clean": ratio("snntorch+import", "snntorch"),
        "snntorch after an S1 step / clean": ratio("snntorch+S1", "snntorch"),
        "whole-network / S1": ratio("whole-network", "S1"),
    }


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: dict) -> list[str]:
    reference = rows.get("snntorch", {}).get("step_s")
    lines = ["| row | s / step (median) | samples / s | peak RSS (MB) | test accuracy | "
             "x snnTorch step | notes |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | not run: {r['error']} |")
            continue
        accuracy = r.get("test_accuracy")
        lines.append(
            f"| {name} | {r['step_s']:.4f} | {r['samples_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{fmt(accuracy, '.3f')} | "
            f"{fmt(r['step_s'] / reference if reference else None, '.2f')} | "
            f"{'; '.join(filter(None, [r.get('note'), r.get('training_skipped')]))} |")
    return lines


def run_scaling(args, cfg_base: dict) -> dict:
    curves = {}
    defaults = {"batch": args.batch, "hidden": 100, "events": 784}
    for axis in SCALING:
        points = []
        for value in getattr(args, f"scaling_{axis}"):
            cfg = {**cfg_base, **defaults, axis: value, "steps": args.scaling_steps, "warmup": 1}
            result = run_subprocess("scaling", cfg, args.peer_timeout)
            result[axis] = value
            points.append(result)
            print(f"scaling {axis}={value}: "
                  + (result["error"] if "error" in result else
                     f"{result['step_s']:.3f} s, {result['peak_rss_mb']:.0f} MB"), flush=True)
        curves[axis] = points
    return curves


def plot_scaling(curves: dict, path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"batch": "batch size", "hidden": "hidden width (both hidden layers)",
              "events": "input events per sample (k brightest pixels)"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (axis, points) in zip(axes, curves.items()):
        ok = [p for p in points if "error" not in p]
        x = [p["input_events_per_sample"] if axis == "events" else p[axis] for p in ok]
        ax.plot(x, [p["step_s"] for p in ok], "o-", color="C0")
        ax.set_xlabel(labels[axis])
        ax.set_ylabel("s per training step", color="C0")
        twin = ax.twinx()
        twin.plot(x, [p["peak_rss_mb"] for p in ok], "s--", color="C1")
        twin.set_ylabel("peak RSS (MB)", color="C1")
        ax.grid(alpha=0.3)
    fig.suptitle(f"spike_bridge S3 (LatencyEncoder) training step: defaults batch {batch}, "
                 "hidden 100, all pixels spiking")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--train-steps", type=int, default=30,
                        help="training steps (batch --batch) before the accuracy test; 0: none")
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--root", default="data", help="spike_bridge.data root")
    parser.add_argument("--only", nargs="*", choices=ROWS, metavar="ROW",
                        help=f"rows to run, of {', '.join(ROWS)} (default: all; none: only "
                             "the scaling curves)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling curves")
    parser.add_argument("--scaling-steps", type=int, default=5)
    for axis, values in SCALING.items():
        parser.add_argument(f"--scaling-{axis}", type=int, nargs="+", default=list(values),
                            metavar="N", help=f"scaling points (default {' '.join(map(str, values))})")
    parser.add_argument("--peer-timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--slow-step-s", type=float, default=60,
                        help="a row whose steps take longer times one step and skips training")
    parser.add_argument("--memory-limit-gb", type=float, default=16,
                        help="address-space limit of the exact-snn process (its grid forward "
                             "allocates [784, batch, grid] tensors); 0: none")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, json.loads(args.config))
        return
    if min(args.batch, args.steps, args.test_samples) < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --test-samples must be >= 1, --warmup >= 0")

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "fashion_mnist.npz"
        data = prepare_data(args, data_path)
        cfg_base = {"data": str(data_path), "batch": args.batch, "steps": args.steps,
                    "warmup": args.warmup, "train_steps": args.train_steps,
                    "test_samples": args.test_samples, "slow_step_s": args.slow_step_s}
        rows = {}
        for row in ROWS if args.only is None else args.only:
            cfg = dict(cfg_base, row=row)
            if row == "exact-snn" and args.memory_limit_gb:
                cfg["memory_limit_gb"] = args.memory_limit_gb
            rows[row] = run_subprocess(worker_of(row), cfg, args.peer_timeout)
            r = rows[row]
            print(f"{row}: " + (r["error"] if "error" in r else
                                f"{r['step_s']:.4f} s/step, {r['peak_rss_mb']:.0f} MB, "
                                f"accuracy {fmt(r.get('test_accuracy'), '.3f')}"), flush=True)
        curves = None if args.no_scaling else run_scaling(args, cfg_base)
    load_after = os.getloadavg()
    result = {
        "command": command,
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "data": data,
        "setup": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                  "train_steps": args.train_steps, "test_samples": args.test_samples,
                  "dtype": "float32", "device": "cpu", "sizes": SIZES,
                  "spike_bridge_scenarios": SPIKE_BRIDGE, "learning_rates": LEARNING_RATE},
        "rows": rows,
        "ratios": ratios(rows),
        "scaling": curves,
    }
    (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    if curves:
        plot_scaling(curves, args.out / "peers_scaling.png", args.batch)

    m = result["machine"]
    md = [
        "# spike_bridge and peers: one training step, 784-100-100-10, Fashion-MNIST",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['platform']}, Python {m['python']}  ",
        f"Date: {result['date_utc']}; load average (1/5/15 min) before "
        f"{', '.join(f'{v:.2f}' for v in load_before)}, after "
        f"{', '.join(f'{v:.2f}' for v in load_after)}  ",
        f"Setup: batch {args.batch}, float32, CPU, median of {args.steps} steps after "
        f"{args.warmup} warm-up; accuracy on {args.test_samples} test images after "
        f"{args.train_steps} training steps; each row in its own process (peak RSS its own). "
        "Rows are described in `benchmarks/peers.py`.",
    ]
    if rows:
        md += ["", *table(rows), "", "Ratios of median step times:", "",
               *[f"- {name}: {fmt(value, '.2f')}" for name, value in result["ratios"].items()]]
    if curves:
        md += ["", f"Scaling of the S3 step (median of {args.scaling_steps} steps per point, "
                   "after the warm-up that lets the adaptive buffers settle): "
                   "`peers_scaling.png` (points in `peers.json`)."]
    (args.out / "peers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
