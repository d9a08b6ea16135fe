"""torch.compile of the README's Quick-start network: compile time and step time vs eager.

Run: ``python benchmarks/compile.py`` (writes ``benchmarks/results/compile.json``).

The network (784-100-100-10 theta neurons, binary MNIST-like input, float32) takes a training
step (forward, first-spike loss, backward) at batch ``--batch-size``. Candidates: eager, and
``torch.compile(net)`` with each backend in ``--backends`` (default: inductor, torch's default,
and aot_eager). Compile time is the first compiled step minus the median eager step (the JAX
kernels are compiled beforehand by eager warm-up steps, so it is torch's compile time). Step
times are medians over ``--rounds`` interleaved rounds (one step of every candidate per round, in
a shuffled order), each step waiting for its gradients. Inductor's compile time depends on its
on-disk cache: for a cold number run with a fresh ``TORCHINDUCTOR_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import spike_bridge  # noqa: F401  (first: passive OpenMP waiting, set before torch loads)

import torch
from torch import nn

from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import BinnedLatencyEncoder, FirstSpikeTime, ThetaLinear

RESULTS = Path(__file__).resolve().parent / "results" / "compile.json"


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        BinnedLatencyEncoder(n_bins=1, T=2.0),
        ThetaLinear(784, 100), ThetaLinear(100, 100), ThetaLinear(100, 10),
        FirstSpikeTime(),
    )


def step(net, images, labels) -> float:
    start = time.perf_counter()
    loss = first_spike_cross_entropy(net(images), labels, T=2.0)
    net.zero_grad(set_to_none=True)
    loss.backward()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backends", nargs="*", default=["inductor", "aot_eager"])
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
    eager = network()
    for _ in range(3):  # JAX compiles the kernels (also for the compiled candidates: same shapes)
        step(eager, images, labels)
    eager_times = [step(eager, images, labels) for _ in range(3)]

    candidates = {"eager": eager}
    compile_s = {}
    for backend in args.backends:
        torch._dynamo.reset()
        net = network()
        # the buffer sizes the eager steps settled on (under compile an "auto" buffer that
        # grows raises once and recompiles, see README "torch.compile")
        net.load_state_dict(eager.state_dict())
        compiled = torch.compile(net, backend=backend)
        first = step(compiled, images, labels)
        compile_s[backend] = first - statistics.median(eager_times)
        step(compiled, images, labels)  # a second call may still compile (e.g. backward)
        candidates[f"compiled_{backend}"] = compiled

    times = {name: [] for name in candidates}
    order = list(candidates)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(step(candidates[name], images, labels))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                   f"{os.getloadavg()[0]:.1f}",
        "versions": {"torch": torch.__version__},
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "step_s_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
        # first and third quartiles over the rounds: how much the (shared) machine varied
        "step_s_quartiles": {k: [round(q, 4) for q in statistics.quantiles(v, n=4)[::2]]
                             for k, v in times.items()},
    }
    result["compiled_vs_eager"] = {
        k: round(result["step_s_median"][k] / result["step_s_median"]["eager"], 3)
        for k in result["step_s_median"] if k != "eager"
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
