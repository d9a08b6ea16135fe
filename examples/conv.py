"""All-spiking convolutional theta network on Fashion-MNIST (or MNIST).

    image -> BinnedLatencyEncoder (8 intensity bins -> one input spike, brighter earlier;
             --encoding intensity: IntensityLatencyEncoder, one time per grey level)
          -> SpikingConv2d(1 -> c1, 5x5) -> EarliestSpikePool2d(2, two earliest spikes)
          -> SpikingConv2d(c1 -> c2, 5x5) -> EarliestSpikePool2d(2, two earliest spikes)
          -> [theta layer (c2 * 4 * 4 -> h), each --hidden size h] -> theta layer (-> 10)
          -> FirstSpikeTime()

Every layer is spiking and trained with exact spike-time gradients (pseudospikes for silent
neurons); the first convolution takes one convolution per input time bin (binned input) or, like
the second, touches only the neurons each input event reaches. Adam with a cosine learning-rate
decay, the first-spike loss. An "epoch" is ``--samples-per-epoch`` training samples drawn afresh
from the training set (default: all of it); after each, ``spike_bridge.evaluation.evaluate``
on ``--epoch-test-samples`` test samples (the learning curves); at the end on the whole test set
(or ``--max-test-samples``): accuracy with pseudospikes and with ordinary spikes only.

    python examples/conv.py --epochs 1 --samples-per-epoch 2000     # a short run

Writes into ``--out``: ``metrics.json`` (configuration, per-epoch history, final test metrics),
``learning_curves.png``, ``feature_maps_<layer>.png`` (first-spike time of every neuron of each
convolutional layer, as images, for a few test samples), ``raster.png`` and
``output_spike_times.png`` (one test sample through all layers) and ``model.pt``; the last line
printed is that directory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from spike_bridge import plot
from spike_bridge.data import load_dataset, random_shift_flip
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    EarliestSpikePool2d,
    FirstSpikeTime,
    IntensityLatencyEncoder,
    SpikingConv2d,
)
from spike_bridge.networks import dense_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batches, plot_example, plot_learning_curves, train_and_evaluate  # noqa: E402

from spike_bridge.checkpoint import write_json  # noqa: E402
from spike_bridge.evaluation import evaluate  # noqa: E402
from spike_bridge.recording import record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Test samples shown in the feature-map figures.
FEATURE_MAP_SAMPLES = 4


def build_network(args: argparse.Namespace) -> nn.Sequential:
    common = {"T": args.T, "max_spikes": args.max_spikes}
    conv1 = SpikingConv2d((1, 28, 28), args.channels[0], 5, w_scale=args.w_scale,
                          name="conv1", **common)
    pool1 = EarliestSpikePool2d(conv1.out_shape, 2, spikes_per_window=args.pool_spikes)
    conv2 = SpikingConv2d(pool1.out_shape, args.channels[1], 5, w_scale=args.w_scale,
                          name="conv2", **common)
    pool2 = EarliestSpikePool2d(conv2.out_shape, 2, spikes_per_window=args.pool_spikes)
    dense = dense_layers([math.prod(pool2.out_shape), *args.hidden, 10], "theta",
                         w_scale=args.w_scale, **common)
    encoder = (BinnedLatencyEncoder(args.bins, args.T) if args.encoding == "binned"
               else IntensityLatencyEncoder(args.T, args.min_intensity))
    return nn.Sequential(encoder, conv1, pool1, conv2, pool2, *dense, FirstSpikeTime())


def tensors(dataset, max_samples, seed):
    images, labels = dataset.data, dataset.targets
    if max_samples is not None and max_samples < len(labels):
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        images, labels = images[keep[:max_samples]], labels[keep[:max_samples]]
    return images, labels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    parser.add_argument("--data-root", default=str(REPO / "data"))
    parser.add_argument("--max-test-samples", type=int, default=None,
                        help="test samples of the final evaluation (default: all)")
    parser.add_argument("--samples-per-epoch", type=int, default=None,
                        help="training samples per epoch, drawn afresh (default: all)")
    parser.add_argument("--epoch-test-samples", type=int, default=2000,
                        help="test samples evaluated after each epoch (learning curves)")
    parser.add_argument("--channels", type=int, nargs=2, default=[8, 16])
    parser.add_argument("--hidden", type=int, nargs="*", default=[],
                        help="sizes of dense theta layers between the last pooling and the "
                             "10-neuron readout (default: none)")
    parser.add_argument("--pool-spikes", type=int, default=2,
                        help="earliest spikes each pooling window passes on (1: first spikes)")
    parser.add_argument("--encoding", choices=["binned", "intensity"], default="binned",
                        help="input spike times: the reference's --bins time bins, or one time "
                             "per intensity level (IntensityLatencyEncoder)")
    parser.add_argument("--bins", type=int, default=8,
                        help="input time bins of --encoding binned (1: binary image, which "
                             "loses most of Fashion-MNIST's texture)")
    parser.add_argument("--min-intensity", type=float, default=0.1,
                        help="dimmest pixel intensity that spikes, --encoding intensity")
    parser.add_argument("--T", type=float, default=2.0)
    parser.add_argument("--w-scale", type=float, default=2.0)
    parser.add_argument("--max-spikes", type=lambda v: v if v == "auto" else int(v),
                        default="auto", help="spike buffer per neuron: 'auto' (grows) or an int")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training time budget: the cosine decay runs over this wall time "
                             "and training stops after the epoch that exceeds it (--epochs "
                             "is then a maximum)")
    parser.add_argument("--lr-final", type=float, default=0.0,
                        help="final learning rate as a fraction of --lr (cosine schedule)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--gamma", type=float, default=1e-2)
    parser.add_argument("--shift", type=int, default=0,
                        help="augmentation: shift each training image by up to this many "
                             "pixels (random_shift_flip; default 0: none)")
    parser.add_argument("--flip", action="store_true",
                        help="augmentation: mirror a random half of the training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None,
                        help="model.pt of an earlier run (same architecture) to start from, "
                             "e.g. for a second cosine cycle")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


@torch.no_grad()
def plot_feature_maps(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, T: float,
                      out: Path, classes) -> list[Path]:
    """``feature_maps_<layer>.png``: first-spike times of each SpikingConv2d's neurons."""
    was_training = net.training
    net.eval()
    try:
        with record(net) as recording:
            net(images)
    finally:
        net.train(was_training)
    titles = [classes[int(label)] if classes else str(int(label)) for label in labels]
    paths = []
    for name, module in net.named_modules():
        if isinstance(module, SpikingConv2d):
            layer = module.name or name
            paths.append(out / f"feature_maps_{layer}.png")
            plot.feature_maps(recording[name][-1].times, T, shape=module.out_shape,
                              titles=titles, path=paths[-1])
    return paths


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out or REPO / "outputs" / "conv").resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set = load_dataset(args.dataset, args.data_root, train=True)
    test_set = load_dataset(args.dataset, args.data_root, train=False)
    train = train_set.data, train_set.targets
    test = tensors(test_set, args.max_test_samples, args.seed)
    epoch_test = tensors(test_set, min(args.epoch_test_samples, len(test[1])), args.seed + 1)
    per_epoch = min(args.samples_per_epoch or len(train[1]), len(train[1]))
    net = build_network(args)
    if args.init is not None:
        net.load_state_dict(torch.load(args.init, weights_only=True))
    print(net, flush=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(per_epoch / args.batch_size)
    started = time.perf_counter()
    if args.max_minutes is None:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=steps, eta_min=args.lr * args.lr_final)
    else:
        def decay(_step):  # cosine in the elapsed share of the time budget
            elapsed = min(1.0, (time.perf_counter() - started) / (60 * args.max_minutes))
            return args.lr_final + (1 - args.lr_final) * 0.5 * (1 + math.cos(math.pi * elapsed))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    shuffle = torch.Generator().manual_seed(args.seed)

    def loss_fn(first_times, labels):
        return first_spike_cross_entropy(first_times, labels, args.T, args.gamma)

    history = []
    for epoch in range(1, args.epochs + 1):
        subset = torch.randperm(len(train[1]), generator=shuffle)[:per_epoch]
        images = train[0][subset]
        if args.shift or args.flip:
            images = random_shift_flip(images, args.shift, args.flip, shuffle)
        history.append(train_and_evaluate(
            net, batches(images, train[1][subset], args.batch_size, shuffle),
            batches(*epoch_test, 100), optimizer, schedule, loss_fn, epoch, started,
            log_every=20,
        ))
        h = history[-1]
        print(f"epoch {epoch}: test accuracy ({len(epoch_test[1])} samples) "
              f"{100 * h['test_accuracy']:.2f}% with pseudospikes, "
              f"{100 * h['test_accuracy_ordinary']:.2f}% ordinary spikes only, activity "
              f"{h['test_activity']:.3f}, {h['seconds']:.0f} s", flush=True)
        write_json(out / "metrics.json", {"config": vars(args), "history": history})
        plot_learning_curves(history, out / "learning_curves.png")
        if args.max_minutes is not None and h["seconds"] > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min used: stopping after epoch {epoch}")
            break
    training_seconds = time.perf_counter() - started
    metrics = evaluate(net, batches(*test, 100), loss_fn)
    final = {
        "test_samples": metrics["samples"], "test_accuracy": metrics["accuracy"],
        "test_accuracy_ordinary": metrics["accuracy_ordinary"], "test_loss": metrics["loss"],
        "activity_per_layer": metrics["activity_per_layer"],
        "silent_fraction_per_layer": metrics["silent_fraction_per_layer"],
        "training_seconds": training_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(out / "metrics.json", {"config": vars(args), "history": history, "final": final})
    torch.save(net.state_dict(), out / "model.pt")
    shown = test[0][:FEATURE_MAP_SAMPLES], test[1][:FEATURE_MAP_SAMPLES]
    plot_feature_maps(net, *shown, args.T, out, getattr(test_set, "classes", None))
    plot_example(net, shown[0][:1], int(shown[1][0]), out)
    print(f"test accuracy ({final['test_samples']} samples) "
          f"{100 * final['test_accuracy']:.2f}% with pseudospikes, "
          f"{100 * final['test_accuracy_ordinary']:.2f}% ordinary spikes only; training "
          f"{training_seconds / 60:.1f} min")
    print(out)
    return out


if __name__ == "__main__":
    main()
