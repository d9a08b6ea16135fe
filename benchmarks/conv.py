"""Per-event cost of the theta convolution: event-driven kernel vs the dense unrolled layer.

Sweep: one theta convolutional layer, input grid ``C_in x 16 x 16``, ``C_out`` channels, padding
``k // 2`` (output grid 16 x 16), batch 32, T = 2, one spike per active input at a random time.
Timed: forward+backward (``jax.value_and_grad`` of the sum of the pseudospike-filled times, jitted)
of ``jax_kernels.conv.theta_conv_layer`` on its CPU path (the C++ kernel of
``jax_kernels.native``), on its pure-JAX path (the batched ``lax.scan`` that GPUs run; chosen
when tracing, so toggled in-process) and of ``jax_kernels.layers.spiking_layer`` with the
unrolled ``[C_out 256, C_in 256]`` weight matrix (which advances all neurons at every event).
All give the same result (checked). Swept: the number of input events per sample (kernel 3) and
the kernel size (64 events).

``--example``: the second convolution of ``examples/conv.py`` (8 x 12 x 12 grid -> 16 channels,
5 x 5, no padding, 1,024 neurons, batch 50, up to two spikes per input as its pooling passes on),
forward and forward+backward, for 256 to 1,024 input events per sample; ``--previous DIR`` adds
the same measurement of another checkout's ``jax_kernels`` (e.g. a ``git worktree`` of the last
release), imported in a child process.

Memory: the bytes of each compiled program's temporaries, from XLA's ``memory_analysis``; the C++
kernel's own scratch (outside XLA's accounting) is reported apart: per thread, the touched points
before each event of one sample, ``E C_out k^2 x 2`` floats, in the reverse pass.

Run: ``.venv/bin/python benchmarks/conv.py [--example [--previous DIR]]``; results in
``benchmarks/results/conv.json`` (sweep) and ``benchmarks/results/conv_example.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_kernels import native
from jax_kernels.conv import theta_conv_layer
from jax_kernels.layers import spiking_layer
from jax_kernels.models import Theta

RESULTS = Path(__file__).parent / "results"
MODEL = Theta(tau=6 / math.pi, I0=1.25)
T, BATCH, SIDE, MAX_SPIKES = 2.0, 32, 16, 4


def unrolled(weights, in_shape, padding):
    n_in = math.prod(in_shape)
    unit = jnp.eye(n_in, dtype=weights.dtype).reshape(n_in, *in_shape)
    out = jax.lax.conv_general_dilated(unit, weights, (1, 1), [(padding, padding)] * 2)
    return out.reshape(n_in, -1).T


def inputs(n_events, in_shape, batch, spikes_per_input=1, seed=0):
    """``[batch, C H W, spikes_per_input]``: ``n_events`` spikes per sample at random inputs
    (slots) and times."""
    rng = np.random.default_rng(seed)
    n_slots = math.prod(in_shape) * spikes_per_input
    times = np.full((batch, n_slots), np.inf, np.float32)
    for b in range(batch):
        active = rng.choice(n_slots, size=n_events, replace=False)
        times[b, active] = rng.uniform(0, T, n_events)
    times = np.sort(times.reshape(batch, -1, spikes_per_input), axis=-1)
    return jnp.asarray(times)


def time_call(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def temp_bytes(compiled):
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def compiled_steps(layer, weights, phase, times):
    """Jitted forward (loss) and forward+backward of the sum of the filled times, compiled
    now: the path (native or pure JAX) is fixed when tracing."""
    def loss(w, p, t):
        out = layer(w, p, t)
        return jnp.sum(jnp.where(jnp.isfinite(out.filled_times), out.filled_times, 0.0))

    return (jax.jit(loss).lower(weights, phase, times).compile(),
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(weights, phase,
                                                                       times).compile())


def pure_jax(build):
    """``build()`` traced with the native kernel off (the GPU path)."""
    available = native.available
    native.available = lambda: False
    try:
        return build()
    finally:
        native.available = available


def relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def native_scratch_bytes(max_events, lanes, n_neurons, itemsize=4):
    return int(min(os.cpu_count() or 1, 2) * (2 * max_events * lanes + 6 * n_neurons) * itemsize)


def measure(n_events, k, c_in, c_out, repeats):
    in_shape, padding = (c_in, SIDE, SIDE), k // 2
    weights = 2.0 * jax.random.normal(jax.random.PRNGKey(k), (c_out, c_in, k, k)) / k
    phase = jnp.full((1, c_out), MODEL.period / 2)
    times = inputs(n_events, in_shape, BATCH)
    max_events = 16 * math.ceil(n_events / 16)
    conv = partial(theta_conv_layer, model=MODEL, in_shape=in_shape, stride=1, padding=padding,
                   T=T, max_events=max_events, max_spikes=MAX_SPIKES)
    dense = partial(spiking_layer, model=MODEL, T=T, max_events=max_events,
                    max_spikes=MAX_SPIKES)

    def dense_layer(w, phase, times):
        return dense(unrolled(w, in_shape, padding), jnp.repeat(phase, SIDE * SIDE, axis=1),
                     times)

    _, conv_step = compiled_steps(conv, weights, phase, times)
    _, jax_step = pure_jax(lambda: compiled_steps(conv, weights, phase, times))
    _, dense_step = compiled_steps(dense_layer, weights, phase, times)
    (a, ga), (b, gb), (c, gc) = (step(weights, phase, times)
                                 for step in (conv_step, jax_step, dense_step))
    return {
        "input_events": n_events, "kernel_size": k, "c_in": c_in, "c_out": c_out,
        "neurons": c_out * SIDE * SIDE, "touched_per_event": c_out * k * k,
        "conv_s": time_call(conv_step, weights, phase, times, repeats=repeats),
        "conv_pure_jax_s": time_call(jax_step, weights, phase, times, repeats=repeats),
        "dense_s": time_call(dense_step, weights, phase, times, repeats=repeats),
        "conv_temp_bytes": temp_bytes(conv_step),
        "conv_native_scratch_bytes": native_scratch_bytes(max_events, c_out * k * k,
                                                          c_out * SIDE * SIDE),
        "conv_pure_jax_temp_bytes": temp_bytes(jax_step),
        "dense_temp_bytes": temp_bytes(dense_step),
        # conv vs dense and pure JAX vs dense: loss, largest weight-gradient difference
        "relative_difference_loss_grad": [float(abs(a - c) / abs(c)), relative(ga[0], gc[0])],
        "relative_difference_pure_jax_loss_grad": [float(abs(b - c) / abs(c)),
                                                   relative(gb[0], gc[0])],
    }


EXAMPLE_GEOMETRY = dict(in_shape=(8, 12, 12), c_out=16, k=5, batch=50)


def measure_example(n_events, repeats, paths=("native", "pure_jax")):
    """The example's second convolution; returns ``{path: {forward_s, forward_backward_s}}``
    and the gradients of the first path for the agreement check."""
    g = EXAMPLE_GEOMETRY
    in_shape, c_out, k = g["in_shape"], g["c_out"], g["k"]
    weights = 1.0 * jax.random.normal(jax.random.PRNGKey(0), (c_out, in_shape[0], k, k)) / k
    phase = jnp.full((1, c_out), MODEL.period / 2)
    times = inputs(n_events, in_shape, g["batch"], spikes_per_input=2)
    layer = partial(theta_conv_layer, model=MODEL, in_shape=in_shape, stride=1, padding=0, T=T,
                    max_events=16 * math.ceil(n_events / 16), max_spikes=4)
    row, gradients = {}, {}
    for path in paths:
        build = partial(compiled_steps, layer, weights, phase, times)
        forward, step = pure_jax(build) if path == "pure_jax" else build()
        gradients[path] = step(weights, phase, times)[1]
        row[path] = {"forward_s": time_call(forward, weights, phase, times, repeats=repeats),
                     "forward_backward_s": time_call(step, weights, phase, times,
                                                     repeats=repeats),
                     "temp_bytes": temp_bytes(step)}
    return row, gradients


def example(args):
    rows = []
    for n_events in (256, 512, 1024):
        row, gradients = measure_example(n_events, args.repeats)
        row["input_events"] = n_events
        row["relative_difference_pure_jax_grad"] = [
            relative(a, b) for a, b in zip(gradients["native"], gradients["pure_jax"])]
        if args.previous:  # the other checkout in its own process (its own jax_kernels)
            out = subprocess.run(
                [sys.executable, __file__, "--previous-child", str(n_events),
                 "--repeats", str(args.repeats)],
                env={**os.environ, "PYTHONPATH": str(Path(args.previous).resolve())},
                check=True, capture_output=True, text=True).stdout
            row["previous"] = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = RESULTS / "conv_example.json"
    path.write_text(json.dumps({
        "setup": {**EXAMPLE_GEOMETRY, "T": T, "max_spikes": 4, "repeats": args.repeats,
                  "dtype": "float32", "previous": args.previous,
                  "machine": platform.platform(), "cpus": os.cpu_count(),
                  "jax": jax.__version__, "load_average": os.getloadavg()},
        "rows": rows,
    }, indent=2) + "\n")
    print(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--c-in", type=int, default=4)
    parser.add_argument("--c-out", type=int, default=8)
    parser.add_argument("--example", action="store_true")
    parser.add_argument("--previous", help="checkout whose jax_kernels to time as well")
    parser.add_argument("--previous-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.previous_child:  # one path: whatever this checkout's layer does
        row, _ = measure_example(args.previous_child, args.repeats, paths=("default",))
        print(json.dumps(row["default"]))
        return
    if args.example:
        example(args)
        return
    rows = []
    sweeps = [(n, 3) for n in (16, 64, 256)] + [(64, k) for k in (1, 5)]
    for n_events, k in sweeps:
        row = measure(n_events, k, args.c_in, args.c_out, args.repeats)
        rows.append(row)
        print(f"events {n_events:4d} kernel {k}: conv {1e3 * row['conv_s']:8.1f} ms, pure JAX "
              f"{1e3 * row['conv_pure_jax_s']:8.1f} ms, dense {1e3 * row['dense_s']:8.1f} ms",
              flush=True)
    path = RESULTS / "conv.json"
    path.write_text(json.dumps({
        "setup": {"batch": BATCH, "grid": [SIDE, SIDE], "T": T, "max_spikes": MAX_SPIKES,
                  "repeats": args.repeats, "dtype": "float32",
                  "machine": platform.platform(), "jax": jax.__version__,
                  "load_average": os.getloadavg()},
        "rows": rows,
    }, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
