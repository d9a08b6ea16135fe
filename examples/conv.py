"""All-spiking convolutional theta network on Fashion-MNIST (or MNIST): a first, short run.

    image -> BinnedLatencyEncoder (pixel intensity -> one input spike, brighter earlier)
          -> SpikingConv2d(1 -> c1, 5x5) -> EarliestSpikePool2d(2)
          -> SpikingConv2d(c1 -> c2, 5x5) -> EarliestSpikePool2d(2)
          -> ThetaLinear(c2 * 4 * 4 -> 10) -> FirstSpikeTime()

Every layer is spiking and trained with exact spike-time gradients (pseudospikes for silent
neurons); the convolutions touch only the neurons each input event reaches. Adam with a cosine
learning-rate decay, the first-spike loss. Evaluation: accuracy with pseudospikes and with
ordinary spikes only (activity statistics cover the linear layer only).

    python examples/conv.py --epochs 1 --max-train-samples 10000     # a short run

Writes ``metrics.json``, ``learning_curves.png`` and ``model.pt`` into ``--out``; the last line
printed is that directory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import spike_bridge  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)

import torch
from torch import nn

from spike_bridge.data import load_dataset
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    EarliestSpikePool2d,
    FirstSpikeTime,
    SpikingConv2d,
    ThetaLinear,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_learning_curves  # noqa: E402

from spike_bridge.checkpoint import write_json  # noqa: E402
from spike_bridge.evaluation import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_network(args: argparse.Namespace) -> nn.Sequential:
    common = {"T": args.T, "max_spikes": args.max_spikes}
    conv1 = SpikingConv2d((1, 28, 28), args.channels[0], 5, w_scale=args.w_scale,
                          name="conv1", **common)
    pool1 = EarliestSpikePool2d(conv1.out_shape, 2)
    conv2 = SpikingConv2d(pool1.out_shape, args.channels[1], 5, w_scale=args.w_scale,
                          name="conv2", **common)
    pool2 = EarliestSpikePool2d(conv2.out_shape, 2)
    readout = ThetaLinear(math.prod(pool2.out_shape), 10, w_scale=args.w_scale,
                          name="output", **common)
    return nn.Sequential(BinnedLatencyEncoder(args.bins, args.T), conv1, pool1, conv2, pool2,
                         readout, FirstSpikeTime())


def tensors(dataset, max_samples, seed):
    images, labels = dataset.data, dataset.targets
    if max_samples is not None and max_samples < len(labels):
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        images, labels = images[keep[:max_samples]], labels[keep[:max_samples]]
    return images, labels


def batches(images, labels, batch_size, generator=None):
    order = (torch.randperm(len(labels), generator=generator) if generator is not None
             else torch.arange(len(labels)))
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    parser.add_argument("--data-root", default=str(REPO / "data"))
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--channels", type=int, nargs=2, default=[8, 16])
    parser.add_argument("--bins", type=int, default=1, help="input time bins (1: binary image)")
    parser.add_argument("--T", type=float, default=2.0)
    parser.add_argument("--w-scale", type=float, default=2.0)
    parser.add_argument("--max-spikes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--gamma", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out or REPO / "outputs" / "conv").resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train = tensors(load_dataset(args.dataset, args.data_root, train=True),
                    args.max_train_samples, args.seed)
    test = tensors(load_dataset(args.dataset, args.data_root, train=False),
                   args.max_test_samples, args.seed)
    net = build_network(args)
    print(net, flush=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(train[1]) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    shuffle = torch.Generator().manual_seed(args.seed)

    def test_loss(first_times, labels):
        return first_spike_cross_entropy(first_times, labels, args.T, args.gamma)

    history, started = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        loss_sum = correct = 0.0
        for step, (images, labels) in enumerate(batches(*train, args.batch_size, shuffle), 1):
            first_times = net(images)
            loss = first_spike_cross_entropy(first_times, labels, args.T, args.gamma)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += float((first_times.argmin(-1) == labels).sum())
            if step % 20 == 0:
                seen = step * args.batch_size
                print(f"epoch {epoch} step {step}: train loss {loss_sum / seen:.4f}, accuracy "
                      f"{correct / seen:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
        metrics = evaluate(net, batches(*test, 500), test_loss)
        history.append({
            "epoch": epoch, "train_loss": loss_sum / len(train[1]),
            "train_accuracy": correct / len(train[1]), "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"],
            "test_accuracy_ordinary": metrics["accuracy_ordinary"],
            "seconds": time.perf_counter() - started,
        })
        print(f"epoch {epoch}: test accuracy {100 * metrics['accuracy']:.2f}% with pseudospikes, "
              f"{100 * metrics['accuracy_ordinary']:.2f}% ordinary spikes only, "
              f"{history[-1]['seconds']:.0f} s", flush=True)
    write_json(out / "metrics.json", {"config": vars(args), "history": history})
    plot_learning_curves(history, out / "learning_curves.png")
    torch.save(net.state_dict(), out / "model.pt")
    print(out)
    return out


if __name__ == "__main__":
    main()
