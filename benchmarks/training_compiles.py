"""What a long training run compiles: layer programs and memory maps per training step.

Run: ``python benchmarks/training_compiles.py --steps 300`` (writes
``benchmarks/results/training_compiles.json``).

Trains the best spiking-only Fashion-MNIST row of README "Results" (784-600-10 theta neurons,
8 input time bins, ``w_scale`` 2, batch 250, AdamW lr 2e-3 with weight decay 0.1, input flips 2%)
on shuffled training batches and records after every step: wall seconds since the start, the
layer kernel's cache entries (distinct buffer-size combinations met, each compiled once) and
entries holding compiled programs, the process's memory maps (``/proc/self/maps``; Linux), and
each layer's ``"auto"`` buffer sizes. Steps that compile take seconds instead of a fraction of
one; a count of maps that keeps growing ends the process at ``vm.max_map_count``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spike_bridge.data import BinPixels, load_dataset
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.networks import mlp
from spike_bridge.nn import _layer_kernel

RESULTS = Path(__file__).resolve().parent / "results" / "training_compiles.json"


def memory_maps() -> int | None:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--root", default="data", help="spike_bridge.data root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train = load_dataset("fashion-mnist", args.root, train=True, transform=BinPixels(8))
    loader = torch.utils.data.DataLoader(train, batch_size=250, shuffle=True, drop_last=True)
    net = mlp([600], n_bins=8, encoder_input="bins", w_scale=2.0, flip_probability=0.02)
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.1)
    layers = [module for module in net if hasattr(module, "get_extra_state")
              and hasattr(module, "max_spikes")]
    records, step, started = [], 0, time.perf_counter()
    while step < args.steps:
        for images, labels in loader:
            loss = first_spike_cross_entropy(net(images), labels, 2.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            info = _layer_kernel.cache_info()
            records.append({
                "step": step, "seconds": round(time.perf_counter() - started, 2),
                "layer_programs": info.entries, "compiled_entries": info.compiled_entries,
                "memory_maps": memory_maps(),
                "buffers": [layer.get_extra_state() for layer in layers],
            })
            if step % 25 == 0:
                print(f"step {step}: {records[-1]['seconds']:.0f} s, "
                      f"{info.entries} layer programs, {records[-1]['memory_maps']} maps",
                      flush=True)
            if step >= args.steps:
                break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "records": records}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
