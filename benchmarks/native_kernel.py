"""The theta layer's native CPU kernel (``jax_kernels.native``) against its pure-JAX scan.

The same training steps as ``benchmarks/peers.py`` (S1-S4: 784-100-100-10 ``ThetaLinear``,
batch 1000, Fashion-MNIST test images, float32, Adam), each in its own process with
``JAX_KERNELS_NATIVE=1`` (the C++ kernel) or ``0`` (the pure-JAX scan of earlier releases), the two
settings alternating, ``--rounds`` times; plus the S3 first layer alone (784 -> 100, pure JAX,
forward and forward + backward). Per process: median of ``--steps`` timed steps after the
adaptive buffers settled, and peak RSS. Results: ``results/native.md`` and ``native.json``::

    .venv/bin/python benchmarks/native_kernel.py --root data
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TAG = "NATIVE_RESULT "
ROWS = ("S1", "S2", "S3", "S4", "S3-first-layer")


def median_time(call, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_layer_worker(data: dict, steps: int) -> dict:
    """The S3 first layer as ``spiking_layer`` in JAX (buffers sized for the batch)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_kernels.layers import event_buffer_sizes, spiking_layer
    from jax_kernels.models import Theta

    pixels = data["test_x"][:1000].astype(np.float32) / 255
    times = np.where(pixels > 0, 2.0 * np.exp(-pixels / 0.5), np.inf)[..., None]
    times = jnp.asarray(times, jnp.float32)  # LatencyEncoder(T=2, scale=0.5)
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.uniform(-1, 1, (100, 784)) * 3 / np.sqrt(784), jnp.float32)
    state = jnp.full((1, 100), 3.0, jnp.float32)
    inside = np.asarray(times[..., 0] < 2.0)
    distinct = max(len(np.unique(np.asarray(times)[row, inside[row], 0])) for row in range(1000))
    max_events, max_input_spikes = event_buffer_sizes(distinct, int(inside.sum(1).max()), 784)
    layer = functools.partial(spiking_layer, model=Theta(tau=6 / np.pi, I0=1.25), T=2.0,
                              max_events=max_events, max_spikes=2,
                              max_input_spikes=max_input_spikes)

    def loss(w, x, t):
        first = layer(w, x, t).filled_times[..., 0]
        return jnp.sum(jnp.where(jnp.isfinite(first), first, 0.0))

    forward = jax.jit(layer)
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return {
        "forward_s": median_time(
            lambda: jax.block_until_ready(forward(weights, state, times)), 2, steps),
        "forward_backward_s": median_time(
            lambda: jax.block_until_ready(gradient(weights, state, times)), 2, steps),
    }


def worker(row: str, root: str, steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import peers  # the S1-S4 networks and data of benchmarks/peers.py

    from spike_bridge.data import load_dataset

    test = load_dataset("fashion-mnist", root, train=False, download=False)
    data = {"test_x": test.data[:1000].reshape(1000, -1).numpy(),
            "test_y": test.targets[:1000].numpy()}
    if row == "S3-first-layer":
        result = first_layer_worker(data, steps)
    else:
        images, labels = data["test_x"][:1000], data["test_y"][:1000]
        step, _ = peers.spike_bridge_trainer(row)
        warmup = peers.settled_warmup({"warmup": 0})["warmup"]
        result = {"step_s": median_time(lambda: step(images, labels), warmup, steps)}
    from jax_kernels import native

    result["native"] = native.available()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="spike_bridge.data root")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "native"))
    args = parser.parse_args()
    if args.worker:
        print(TAG + json.dumps(worker(args.worker, args.root, args.steps)), flush=True)
        return

    load = os.getloadavg()
    runs = {row: {"native": [], "pure_jax": []} for row in args.rows}
    for round_index in range(args.rounds):
        for row in args.rows:
            for setting, key in (("1", "native"), ("0", "pure_jax")):
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", row, "--root", args.root,
                     "--steps", str(args.steps)],
                    capture_output=True, text=True, env={**os.environ, "JAX_KERNELS_NATIVE": setting},
                    timeout=1800, check=True,
                )
                line = next(line for line in done.stdout.splitlines() if line.startswith(TAG))
                result = json.loads(line[len(TAG):])
                assert result["native"] == (setting == "1"), result
                runs[row][key].append(result)
                print(f"round {round_index + 1} {row} {key}: {result}", flush=True)

    def best(results: list[dict], field: str) -> float:  # fastest process: least disturbed
        return min(result[field] for result in results)

    lines = [
        "# Native CPU kernel vs pure-JAX scan (theta layer)", "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}  ",
        f"Each figure: the fastest of {args.rounds} processes (settings alternating), each the "
        f"median of {args.steps} steps after warm-up; batch 1000, float32.", "",
        "| row | what | pure-JAX scan (s) | native kernel (s) | speed-up | peak RSS pure-JAX / native (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for row, results in runs.items():
        fields = (["forward_s", "forward_backward_s"] if row == "S3-first-layer" else ["step_s"])
        for field in fields:
            old, new = best(results["pure_jax"], field), best(results["native"], field)
            lines.append(
                f"| {row} | {field[:-2].replace('_', ' + ')} | {old:.3f} | {new:.3f} | "
                f"{old / new:.2f}x | {best(results['pure_jax'], 'peak_rss_mb'):.0f} / "
                f"{best(results['native'], 'peak_rss_mb'):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"argv": sys.argv, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
