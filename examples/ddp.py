"""Data-parallel training on several processes: torch DistributedDataParallel around a spiking net.

Each process runs its own JAX kernels on its share of the batch; DDP averages the gradients
(gloo on CPU, nccl with CUDA tensors) before every optimizer step, so the processes keep one
model. Launch with torchrun::

    torchrun --nproc-per-node 2 examples/ddp.py --steps 20
    torchrun --nproc-per-node 2 examples/ddp.py --steps 1 --dtype float64 --check

``--batch-size`` is the global batch (split evenly over the processes). ``--check`` compares the
first step's averaged gradients with one process computing them on the whole global batch (rank
0, float64: they agree to 1e-12; the script exits with an error otherwise). The network is the
reference MNIST network (784-100-100-10 theta neurons) on the MNIST data of
``spike_bridge.data.load_dataset``; input noise is off, so that the check compares like with like.
The last line printed (rank 0) is the final training loss.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import spike_bridge  # noqa: F401  (first: passive OpenMP waiting, set before torch loads)

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size")
    parser.add_argument("--hidden", type=int, nargs="*", default=[100, 100])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--max-train-samples", type=int, default=4000)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="compare the first step's gradients with one process (rank 0)")
    return parser.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node 2 "
                         "examples/ddp.py (see the module docstring)")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} "
                         "processes")
    try:
        return train(args, rank, world)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int) -> float:
    from spike_bridge.data import BinPixels, load_dataset
    from spike_bridge.functional import first_spike_cross_entropy
    from spike_bridge.networks import mlp

    dataset = load_dataset("mnist", args.data_root, train=True, transform=BinPixels(1),
                           download=False)
    dataset = Subset(dataset, range(min(args.max_train_samples, len(dataset))))
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler,
                        drop_last=True)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # the same initial model everywhere (DDP also broadcasts it)
    net = mlp(args.hidden, "theta", encoder_input="bins", dtype=dtype)
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    step, epoch, loss = 0, 0, torch.tensor(float("nan"))
    while step < args.steps:
        sampler.set_epoch(epoch)
        for bins, labels in loader:
            reference = copy.deepcopy(net) if args.check and step == 0 else None
            loss = first_spike_cross_entropy(model(bins), labels, T=2.0)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients of all processes here
            if reference is not None:
                check_gradients(net, reference, bins, labels, rank, world)
            optimizer.step()
            step += 1
            if rank == 0:
                print(f"step {step}: loss on rank 0's share {loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1
    if rank == 0:
        print(f"final loss {loss.item():.4f}")
    return loss.item()


def check_gradients(net, reference, bins, labels, rank: int, world: int) -> None:
    """Rank 0 recomputes the gradients on the whole global batch in one process."""
    from spike_bridge.functional import first_spike_cross_entropy

    gathered_bins = [torch.empty_like(bins) for _ in range(world)]
    gathered_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(gathered_bins, bins)
    dist.all_gather(gathered_labels, labels)
    if rank != 0:
        return
    loss = first_spike_cross_entropy(reference(torch.cat(gathered_bins)),
                                     torch.cat(gathered_labels), T=2.0)
    loss.backward()
    difference = max(float((p.grad - q.grad).abs().max())
                     for p, q in zip(net.parameters(), reference.parameters()))
    scale = max(float(q.grad.abs().max()) for q in reference.parameters())
    print(f"check: max |DDP - one process| gradient difference {difference:.3g} "
          f"(largest gradient {scale:.3g})", flush=True)
    tolerance = 1e-12 if next(net.parameters()).dtype == torch.float64 else 1e-5 * scale
    if not difference <= tolerance:
        raise SystemExit(f"DDP gradients differ from one process by {difference:.3g} "
                         f"> {tolerance:.3g}")


if __name__ == "__main__":
    main()
