"""Benchmarks of spike_bridge.bridge (run: `python benchmarks/bridge.py`, or `make bench`).

Sections (each a function returning a JSON-able dict; `main()` runs the registered ones):

* ``overhead`` -- per-call time of a 1k-float elementwise function (``sin(x) * 2``, float32, CPU),
  forward only and forward+backward: direct jitted JAX vs ``spike_bridge.bridge.jax_function``
  (eager path, and the custom-op path used under torch.compile) vs torch-jax-interop's
  ``WrappedJaxFunction``.

* ``training_step`` -- the gradient of the first-spike loss of a 784-100-100-10 theta network at
  batch 1000 through ``spike_bridge.nn`` (one bridged call per layer) vs the same kernels in one
  jitted JAX ``value_and_grad``.

A new section is a ``run_<name>() -> dict`` registered in ``SECTIONS``.

Timing: every candidate of a section runs once per round, in a shuffled order, for many rounds;
the median per candidate is reported. Interleaving keeps the comparison fair on a shared,
noisy machine. Each timed call includes waiting for the result (``block_until_ready`` for JAX;
the bridge's DLPack export waits for the computation).

Results are merged into ``benchmarks/results/bridge.json`` (one key per section; with
``--jax-cpu-sync-dispatch`` JAX runs CPU computations inline and the key gets a suffix).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import spike_bridge  # noqa: F401  (first: passive OpenMP waiting, set before torch loads)

import jax
import jax.numpy as jnp
import numpy as np
import torch

from spike_bridge.bridge import jax_function

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bridge.json"


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def interleaved_timings(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Median / 10th / 90th percentile wall time (microseconds) of each zero-argument callable.

    Each round runs every candidate once, in a freshly shuffled order.
    """
    for call in candidates.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, call in order:
            start = time.perf_counter_ns()
            call()
            samples[name].append((time.perf_counter_ns() - start) / 1e3)
    summary = {}
    for name, values in samples.items():
        deciles = statistics.quantiles(values, n=10)
        summary[name] = {
            "median_us": statistics.median(values),
            "p10_us": deciles[0],
            "p90_us": deciles[-1],
        }
    return summary


def print_table(title: str, timings: dict[str, dict[str, float]], baseline: str) -> None:
    base = timings[baseline]["median_us"]
    print(f"\n{title}")
    header = f"{'candidate':46s} {'median us':>10s} {'p10':>8s} {'p90':>8s} {'ratio':>7s}"
    print(f"  {header} {'+us':>8s}")
    for name, stats in timings.items():
        median = stats["median_us"]
        print(
            f"  {name:46s} {median:10.1f} {stats['p10_us']:8.1f} {stats['p90_us']:8.1f} "
            f"{median / base:7.2f} {median - base:8.1f}"
        )


def environment() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------------------------
# Section: per-call overhead
# --------------------------------------------------------------------------------------------


def sin_times_two(x):
    """The benchmarked function: x: f32[n] -> f32[n]."""
    return jnp.sin(x) * 2


def torch_jax_interop_candidates(
    x: torch.Tensor, x_grad: torch.Tensor, cotangent: torch.Tensor
) -> tuple[Callable[[], object] | None, Callable[[], object] | None, str | None]:
    """torch-jax-interop's WrappedJaxFunction: (forward, forward+backward, None), or
    (None, None, why it cannot run)."""
    try:
        from torch_jax_interop import WrappedJaxFunction

        # Its first argument is a parameter pytree; pass none and the jitted function (its best
        # case: WrappedJaxFunction calls jax.vjp eagerly on whatever it is given).
        module = WrappedJaxFunction(jax.jit(lambda params, x: sin_times_two(x)), jax_params={})
        with torch.no_grad():
            reference = sin_times_two(jnp.asarray(x.numpy()))
            if not np.allclose(module(x).numpy(), np.asarray(reference), rtol=1e-6):
                return None, None, "wrong forward result"
    except Exception as error:  # record the failure instead of aborting the benchmark
        return None, None, f"{type(error).__name__}: {error}"

    def forward() -> object:
        with torch.no_grad():
            return module(x)

    def forward_backward() -> object:
        return torch.autograd.grad(module(x_grad), x_grad, cotangent)

    return forward, forward_backward, None


class _TimesTwo(torch.autograd.Function):
    """A trivial custom autograd.Function: the cost of torch's own autograd machinery."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


def run_overhead(rounds: int = 5000, warmup: int = 500, size: int = 1000) -> dict[str, object]:
    """Per-call time: direct jitted JAX vs the bridge vs torch-jax-interop (float32, CPU)."""
    x = torch.randn(size, generator=torch.Generator().manual_seed(0))
    x_grad = x.clone().requires_grad_()
    cotangent = torch.ones(size)
    x_jax = jnp.asarray(x.numpy())
    cotangent_jax = jnp.ones(size, jnp.float32)

    bridged = jax_function(sin_times_two)
    jitted = jax.jit(sin_times_two)
    # The bridge's two jitted calls (forward with residuals, then VJP), done directly in JAX.
    forward_with_vjp = jax.jit(lambda x: jax.vjp(sin_times_two, x))
    apply_vjp = jax.jit(lambda vjp_fn, cotangent: vjp_fn(cotangent))
    # What a pure-JAX user would write: value and VJP in one jitted call.
    fused_value_and_vjp = jax.jit(
        lambda x, cotangent: (sin_times_two(x), jax.vjp(sin_times_two, x)[1](cotangent))
    )

    def jax_two_calls() -> object:
        outputs, vjp_fn = forward_with_vjp(x_jax)
        return jax.block_until_ready((outputs, apply_vjp(vjp_fn, cotangent_jax)))

    forward_candidates: dict[str, Callable[[], object]] = {
        "jax.jit direct (jax arrays)": lambda: jitted(x_jax).block_until_ready(),
        "bridge, eager path": lambda: bridged(x),
        "bridge, custom-op path (torch.compile's ops)": lambda: bridged._call_via_custom_ops(
            (x,), {}
        ),
        "reference: torch.sin(x) * 2, no JAX": lambda: torch.sin(x) * 2,
    }
    backward_candidates: dict[str, Callable[[], object]] = {
        "jax.jit fwd+vjp fused (1 call)": lambda: jax.block_until_ready(
            fused_value_and_vjp(x_jax, cotangent_jax)
        ),
        "jax.jit fwd-with-residuals + vjp (2 calls)": jax_two_calls,
        "bridge, eager path": lambda: torch.autograd.grad(bridged(x_grad), x_grad, cotangent),
        "bridge, custom-op path (torch.compile's ops)": lambda: torch.autograd.grad(
            bridged._call_via_custom_ops((x_grad,), {}), x_grad, cotangent
        ),
        "reference: torch.sin(x) * 2, no JAX": lambda: torch.autograd.grad(
            torch.sin(x_grad) * 2, x_grad, cotangent
        ),
        "reference: autograd.Function x * 2, no JAX": lambda: torch.autograd.grad(
            _TimesTwo.apply(x_grad), x_grad, cotangent
        ),
    }
    interop_forward, interop_backward, interop_failure = torch_jax_interop_candidates(
        x, x_grad, cotangent
    )
    if interop_failure is None:
        forward_candidates["torch_jax_interop.WrappedJaxFunction"] = interop_forward
        backward_candidates["torch_jax_interop.WrappedJaxFunction"] = interop_backward

    forward = interleaved_timings(forward_candidates, rounds, warmup)
    print_table(f"forward, f32[{size}] sin(x)*2", forward, "jax.jit direct (jax arrays)")
    backward = interleaved_timings(backward_candidates, rounds, warmup)
    print_table(
        f"forward+backward, f32[{size}] sin(x)*2",
        backward,
        "jax.jit fwd-with-residuals + vjp (2 calls)",
    )
    if interop_failure:
        print(f"\ntorch_jax_interop.WrappedJaxFunction not measured: {interop_failure}")

    def overhead(table: dict, name: str, baseline: str) -> float:
        return table[name]["median_us"] - table[baseline]["median_us"]

    return {
        "function": f"sin(x) * 2, x: float32[{size}], CPU",
        "rounds": rounds,
        "forward": forward,
        "forward_backward": backward,
        "bridge_forward_overhead_us": overhead(
            forward, "bridge, eager path", "jax.jit direct (jax arrays)"
        ),
        "bridge_forward_backward_overhead_us": overhead(
            backward, "bridge, eager path", "jax.jit fwd-with-residuals + vjp (2 calls)"
        ),
        "torch_jax_interop_failure": interop_failure,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def run_training_step(rounds: int = 15, warmup: int = 2, batch: int = 1000,
                      gain: float = 16.0) -> dict[str, object]:
    """Gradient of the first-spike loss of a 784-100-100-10 theta network, batch 1000, float32.

    ``bridge``: the ``spike_bridge.nn`` modules (one bridged JAX call per layer, buffers sized
    from the data, torch autograd between layers). ``pure JAX``: the same layer kernels with the
    same event buffers in one jitted ``value_and_grad``. Weights are the reference
    initialisation times ``gain`` so that the hidden layers are active like a trained network's.
    """
    import math

    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernels  # the benchmark setup of benchmarks/kernels.py

    from jax_kernels.layers import binned_spiking_layer, spiking_layer
    from spike_bridge.functional import first_spike_cross_entropy
    from spike_bridge.nn import BinnedLatencyEncoder, FirstSpikeTime, ThetaLinear

    bins, labels = kernels.load_binary_images(batch)
    weights, phases = kernels.init_params(jnp.float32, gain)
    layers = [ThetaLinear(n_in, n_out) for n_in, n_out in zip(kernels.SIZES[:-1], kernels.SIZES[1:])]
    with torch.no_grad():
        for layer, w, p in zip(layers, weights, phases):
            layer.weight.copy_(torch.from_numpy(np.asarray(w)))
            layer.initial_state.copy_(torch.from_numpy(np.asarray(p)))
    net = nn.Sequential(BinnedLatencyEncoder(n_bins=1, T=kernels.T), *layers, FirstSpikeTime())
    bins_torch = torch.from_numpy(np.asarray(bins, dtype=np.int64))
    labels_torch = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def bridge_step():
        net.zero_grad(set_to_none=True)
        first_times = net(bins_torch)
        loss = first_spike_cross_entropy(first_times, labels_torch, T=kernels.T, gamma=kernels.GAMMA)
        loss.backward()
        return loss

    # The event buffers the modules choose, for the pure-JAX version.
    with torch.no_grad():
        spikes = net[1](net[0](bins_torch))
        buffers = []
        for layer in net[2:4]:
            buffers.append(16 * max(1, math.ceil(int(spikes.counts.sum(-1).max()) / 16)))
            spikes = layer(spikes)

    def pure_loss(params, bins, labels):
        (weights, phases) = params
        out = binned_spiking_layer(
            weights[0], phases[0], bins, bin_times=kernels.BIN_TIMES, model=kernels.MODEL,
            T=kernels.T, max_spikes=kernels.MAX_SPIKES,
        )
        for layer in (1, 2):
            out = spiking_layer(
                weights[layer], phases[layer], out.spike_times, out.pseudo_rate,
                model=kernels.MODEL, T=kernels.T, max_events=buffers[layer - 1],
                max_spikes=kernels.MAX_SPIKES,
            )
        return kernels.first_spike_loss(out.filled_times[..., 0], labels)

    pure_step = jax.jit(jax.value_and_grad(pure_loss))
    params = (weights, phases)
    bins_jax, labels_jax = jnp.asarray(bins), jnp.asarray(labels)

    def pure_jax_step():
        return jax.block_until_ready(pure_step(params, bins_jax, labels_jax))

    loss_pure, grads_pure = pure_jax_step()
    loss_bridge = bridge_step()
    grad_difference = max(
        float(np.max(np.abs(layer.weight.grad.numpy() - np.asarray(g))) / float(np.max(np.abs(g))))
        for layer, g in zip(layers, grads_pure[0])
    )
    timings = interleaved_timings(
        {"pure JAX (one jitted value_and_grad)": pure_jax_step, "bridge (spike_bridge.nn)": bridge_step},
        rounds=rounds, warmup=warmup,
    )
    print_table(f"training step, batch {batch}", timings, "pure JAX (one jitted value_and_grad)")
    pure = timings["pure JAX (one jitted value_and_grad)"]["median_us"]
    bridged = timings["bridge (spike_bridge.nn)"]["median_us"]
    return {
        "setup": f"784-100-100-10 theta, batch {batch}, float32, binary MNIST, weights x{gain}",
        "event_buffers": buffers,
        "loss_pure_jax": float(loss_pure),
        "loss_bridge": float(loss_bridge),
        "max_relative_weight_gradient_difference": grad_difference,
        "timings": timings,
        "ratio_bridge_over_pure_jax": bridged / pure,
    }


SECTIONS: dict[str, Callable[[], dict[str, object]]] = {
    "overhead": run_overhead,
    "training_step": run_training_step,
}


def write_results(section_results: dict[str, dict[str, object]], path: Path = RESULTS_PATH) -> None:
    """Merge ``section_results`` into the JSON file (other sections' results are kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    for name, result in section_results.items():
        existing[name] = {"environment": environment(), **result}
    path.write_text(json.dumps(existing, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS),
        help="sections to run (default: all)",
    )
    parser.add_argument(
        "--jax-cpu-sync-dispatch", action="store_true",
        help="run JAX CPU computations inline (jax_cpu_enable_async_dispatch=False); results "
        "are stored under '<section>_cpu_sync_dispatch'",
    )
    args = parser.parse_args(argv)
    suffix = ""
    if args.jax_cpu_sync_dispatch:
        # Must precede the first JAX computation (the CPU client reads it when created).
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        suffix = "_cpu_sync_dispatch"
    results = {}
    for name in args.sections:
        print(f"== {name}{suffix} ==")
        results[name + suffix] = SECTIONS[name]()
    write_results(results)
    print(f"\nwrote {RESULTS_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
