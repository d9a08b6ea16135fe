"""Forward and forward+backward time and memory of one theta layer on the S3 input, pure JAX.

784 -> 100 theta neurons, batch 1000, Fashion-MNIST test images through latencies
``t = 2 exp(-x / 0.5)`` (as ``LatencyEncoder(scale=0.5)``), float32, buffers sized from the data.
Runs against whichever checkout is on ``PYTHONPATH`` (also one from before engine v2, which had no
``event_buffer_sizes``), so that two versions can be compared one after the other:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/layer_profile.py [--root data]
"""
import time, math, functools, resource, inspect
import numpy as np, jax, jax.numpy as jnp
import jax_kernels.layers as kl
from jax_kernels.models import Theta
from spike_bridge.data import load_dataset
MODEL = Theta(tau=6/math.pi, I0=1.25)
import argparse
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--root", default="data", help="data directory (spike_bridge.data)")
ds = load_dataset("fashion-mnist", parser.parse_args().root, train=False, download=False)
x = ds.data[:1000].reshape(1000, -1).numpy() / 255.0
times = jnp.asarray(np.where(x > 0, 2.0 * np.exp(-x / 0.5), np.inf)[..., None], jnp.float32)
rng = np.random.default_rng(0)
W = jnp.asarray(rng.uniform(-1, 1, (100, 784)) * 1.5 / math.sqrt(784), jnp.float32)
phi = jnp.full((1, 100), 3.0, jnp.float32)
inside = np.asarray(times[..., 0] < 2)
n_spikes = int(inside.sum(1).max())
n_distinct = max(len(np.unique(np.asarray(times)[b, inside[b], 0])) for b in range(1000))
kwargs = dict(model=MODEL, T=2.0, max_spikes=8)
if hasattr(kl, "event_buffer_sizes"):
    E, P = kl.event_buffer_sizes(n_distinct, n_spikes, 784)
    kwargs.update(max_events=E, max_input_spikes=P)
else:
    kwargs.update(max_events=16 * math.ceil(n_spikes / 16))
f = functools.partial(kl.spiking_layer, **kwargs)
def tm(fn, *a, n=5):
    r = fn(*a); jax.block_until_ready(r)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
fwd = jax.jit(f)
fv = jax.jit(lambda W, phi, t: jax.vjp(f, W, phi, t))
def loss(W, phi, t):
    o = f(W, phi, t).filled_times[..., 0]
    return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0))
g = jax.jit(jax.grad(loss, argnums=(0, 1)))
mem = fv.lower(W, phi, times).compile().memory_analysis()
print(f"spikes/sample max {n_spikes}, distinct times max {n_distinct}, buffers {kwargs.get('max_events')} / {kwargs.get('max_input_spikes')}")
print(f"forward {tm(fwd, W, phi, times):.3f} s, forward+backward {tm(g, W, phi, times):.3f} s, "
      f"VJP residuals {mem.output_size_in_bytes/1e6:.0f} MB, temp {mem.temp_size_in_bytes/1e6:.0f} MB, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")
