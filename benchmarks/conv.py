"""Per-event cost of the theta convolution: event-driven kernel vs the dense unrolled layer.

One theta convolutional layer, input grid ``C_in x 16 x 16``, ``C_out`` channels, padding
``k // 2`` (output grid 16 x 16), batch 32, T = 2, one spike per active input at a random time.
Timed: forward+backward (``jax.value_and_grad`` of the sum of the pseudospike-filled times, jitted)
of ``jax_kernels.conv.theta_conv_layer`` and of ``jax_kernels.layers.spiking_layer`` with the
unrolled ``[C_out 256, C_in 256]`` weight matrix (which advances all neurons at every event).
Both give the same result (checked). Swept: the number of input events per sample (kernel 3) and
the kernel size (64 events). Memory: the bytes of each compiled program's temporaries, from XLA's
``memory_analysis``.

Run: ``.venv/bin/python benchmarks/conv.py``; results in ``benchmarks/results/conv.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_kernels.conv import theta_conv_layer
from jax_kernels.layers import spiking_layer
from jax_kernels.models import Theta

RESULTS = Path(__file__).parent / "results" / "conv.json"
MODEL = Theta(tau=6 / math.pi, I0=1.25)
T, BATCH, SIDE, MAX_SPIKES = 2.0, 32, 16, 4


def unrolled(weights, in_shape, padding):
    n_in = math.prod(in_shape)
    unit = jnp.eye(n_in, dtype=weights.dtype).reshape(n_in, *in_shape)
    out = jax.lax.conv_general_dilated(unit, weights, (1, 1), [(padding, padding)] * 2)
    return out.reshape(n_in, -1).T


def inputs(n_events, c_in, seed=0):
    rng = np.random.default_rng(seed)
    n_in = c_in * SIDE * SIDE
    times = np.full((BATCH, n_in, 1), np.inf, np.float32)
    for b in range(BATCH):
        active = rng.choice(n_in, size=n_events, replace=False)
        times[b, active, 0] = rng.uniform(0, T, n_events)
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


def measure(n_events, k, c_in, c_out, repeats):
    in_shape, padding = (c_in, SIDE, SIDE), k // 2
    weights = 2.0 * jax.random.normal(jax.random.PRNGKey(k), (c_out, c_in, k, k)) / k
    phase = jnp.full((1, c_out), MODEL.period / 2)
    times = inputs(n_events, c_in)
    max_events = 16 * math.ceil(n_events / 16)
    conv = partial(theta_conv_layer, model=MODEL, in_shape=in_shape, stride=1, padding=padding,
                   T=T, max_events=max_events, max_spikes=MAX_SPIKES)
    dense = partial(spiking_layer, model=MODEL, T=T, max_events=max_events,
                    max_spikes=MAX_SPIKES)

    def conv_loss(w, phase, times):
        return jnp.sum(conv(w, phase, times).filled_times)

    def dense_loss(w, phase, times):
        n_positions = SIDE * SIDE
        return jnp.sum(dense(unrolled(w, in_shape, padding),
                             jnp.repeat(phase, n_positions, axis=1), times).filled_times)

    conv_step = jax.jit(jax.value_and_grad(conv_loss)).lower(weights, phase, times).compile()
    dense_step = jax.jit(jax.value_and_grad(dense_loss)).lower(weights, phase, times).compile()
    (a, ga), (b, gb) = conv_step(weights, phase, times), dense_step(weights, phase, times)
    agree = float(jnp.abs(a - b) / jnp.abs(b)), float(jnp.max(jnp.abs(ga - gb)) /
                                                       jnp.max(jnp.abs(gb)))
    return {
        "input_events": n_events, "kernel_size": k, "c_in": c_in, "c_out": c_out,
        "neurons": c_out * SIDE * SIDE, "touched_per_event": c_out * k * k,
        "conv_s": time_call(conv_step, weights, phase, times, repeats=repeats),
        "dense_s": time_call(dense_step, weights, phase, times, repeats=repeats),
        "conv_temp_bytes": temp_bytes(conv_step),
        "dense_temp_bytes": temp_bytes(dense_step),
        "relative_difference_loss_grad": agree,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--c-in", type=int, default=4)
    parser.add_argument("--c-out", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    sweeps = [(n, 3) for n in (16, 64, 256)] + [(64, k) for k in (1, 5)]
    for n_events, k in sweeps:
        row = measure(n_events, k, args.c_in, args.c_out, args.repeats)
        rows.append(row)
        print(f"events {n_events:4d} kernel {k}: conv {1e3 * row['conv_s']:8.1f} ms, dense "
              f"{1e3 * row['dense_s']:8.1f} ms, temporaries conv {row['conv_temp_bytes']} B / "
              f"dense {row['dense_temp_bytes']} B", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "setup": {"batch": BATCH, "grid": [SIDE, SIDE], "T": T, "max_spikes": MAX_SPIKES,
                  "repeats": args.repeats, "dtype": "float32",
                  "machine": platform.platform(), "jax": jax.__version__},
        "rows": rows,
    }, indent=2) + "\n")
    print(RESULTS)


if __name__ == "__main__":
    main()
