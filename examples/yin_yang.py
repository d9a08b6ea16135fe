"""Yin-Yang with a theta network: exact spike-time gradients on a small 2-D problem.

The Yin-Yang dataset (Kriener et al., arXiv 2102.08211; generated offline by
``spike_bridge.data.YinYangDataset``, 5000 train / 1000 validation / 1000 test) has 4 inputs
``(x, y, 1 - x, 1 - y)`` and 3 classes. Each input spikes once, at a time that grows linearly with
its value, ``t = t_early + v (t_late - t_early)``; bias inputs spike at fixed times. A theta
network (``ThetaLinear`` layers, ``FirstSpikeTime`` readout) is trained with a torch optimizer
on the reference's first-spike loss; the output neuron that spikes first is the class.

    python examples/yin_yang.py --seed 0          # prints progress; the last line is the output dir

Outputs: ``metrics.json`` (configuration, per-epoch history, final test accuracies with
pseudospikes and with ordinary spikes only), ``learning_curves.png`` and ``model.pt``. The
model with the best validation accuracy (pseudospike readout) is the one tested.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from spike_bridge.data import YinYangDataset
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import FirstSpikeTime, ThetaLinear
from spike_bridge.spikes import Spikes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batches, plot_learning_curves, train_and_evaluate  # noqa: E402

from spike_bridge.checkpoint import write_json  # noqa: E402
from spike_bridge.evaluation import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class CoordinateEncoder(nn.Module):
    """Inputs in ``[0, 1]`` -> one spike each at ``t_early + v (t_late - t_early)``, plus bias
    spikes at fixed times.

    Input: ``[B, F]`` floats in ``[0, 1]``. Output: :class:`Spikes` ``[B, F + n_bias, 1]``.
    """

    def __init__(self, T: float, t_early: float, t_late: float, bias_times: tuple[float, ...]):
        super().__init__()
        if not 0 <= t_early < t_late <= T:
            raise ValueError(
                f"need 0 <= t_early < t_late <= T, got t_early={t_early}, t_late={t_late}, T={T}"
            )
        if any(not 0 <= t < T for t in bias_times):
            raise ValueError(f"bias_times must lie in [0, T={T}), got {bias_times}")
        self.T, self.t_early, self.t_late = float(T), float(t_early), float(t_late)
        self.bias_times = tuple(float(t) for t in bias_times)

    def forward(self, values: torch.Tensor) -> Spikes:
        if values.dim() != 2 or not values.is_floating_point():
            raise ValueError(
                f"expected float inputs [B, F], got {values.dtype} {list(values.shape)}"
            )
        if values.numel() and (torch.isnan(values).any() or values.min() < 0 or values.max() > 1):
            raise ValueError("inputs must lie in [0, 1]")
        times = self.t_early + values * (self.t_late - self.t_early)
        bias = values.new_tensor(self.bias_times).expand(values.shape[0], -1)
        return Spikes(torch.cat([times, bias], dim=1)[..., None], self.T)

    def extra_repr(self) -> str:
        return (f"T={self.T}, t_early={self.t_early}, t_late={self.t_late}, "
                f"bias_times={self.bias_times}")


def build_network(args: argparse.Namespace, dtype: torch.dtype) -> nn.Sequential:
    encoder = CoordinateEncoder(args.T, args.t_early, args.t_late, tuple(args.bias_times))
    sizes = [4 + len(args.bias_times), *args.hidden, 3]
    layers: list[nn.Module] = [encoder]
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        name = "output" if index == len(sizes) - 2 else f"hidden {index + 1}"
        layers.append(ThetaLinear(n_in, n_out, T=args.T, w_scale=args.w_scale,
                                  max_spikes=args.max_spikes, name=f"{name} {n_in}->{n_out}",
                                  dtype=dtype))
    layers.append(FirstSpikeTime(pseudo=True))
    return nn.Sequential(*layers)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the dataset and the network/shuffling")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training samples (default: the published 5000)")
    parser.add_argument("--hidden", type=int, nargs="*", default=[200], help="hidden layer sizes")
    parser.add_argument("--T", type=float, default=4.0, help="trial duration (units of tau)")
    parser.add_argument("--t-early", type=float, default=0.0, help="input time of value 0")
    parser.add_argument("--t-late", type=float, default=1.5, help="input time of value 1")
    parser.add_argument("--bias-times", type=float, nargs="*", default=[0.75],
                        help="spike times of the bias inputs")
    parser.add_argument("--w-scale", type=float, default=2.0,
                        help="initial weights uniform in +-w_scale/sqrt(fan_in)")
    parser.add_argument("--max-spikes", type=int, default=4, help="spike buffer per neuron")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--lr-final", type=float, default=1e-2,
                        help="final learning rate as a fraction of --lr (cosine schedule)")
    parser.add_argument("--gamma", type=float, default=5e-2, help="early-spike regulariser")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", default=None,
                        help="output folder (default outputs/yin_yang_s<seed>)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out or REPO / "outputs" / f"yin_yang_s{args.seed}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train = YinYangDataset("train", seed=args.seed, size=args.train_size)
    validation = YinYangDataset("validation", seed=args.seed)
    test = YinYangDataset("test", seed=args.seed)
    for split in (train, validation, test):
        split.inputs = split.inputs.to(dtype)
    net = build_network(args, dtype)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=steps, eta_min=args.lr * args.lr_final
    )
    shuffle = torch.Generator().manual_seed(args.seed)

    def loss_fn(first_times, labels):
        return first_spike_cross_entropy(first_times, labels, args.T, args.gamma)

    history, best = [], (-1.0, None)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        history.append(train_and_evaluate(
            net, batches(train.inputs, train.labels, args.batch_size, shuffle),
            batches(validation.inputs, validation.labels, 1000), optimizer, schedule, loss_fn,
            epoch, started,
        ))
        if history[-1]["test_accuracy"] > best[0]:
            best = (history[-1]["test_accuracy"], copy.deepcopy(net.state_dict()), epoch)
        if not args.quiet:
            h = history[-1]
            print(f"epoch {epoch:3d}  train loss {h['train_loss']:.4f} "
                  f"acc {h['train_accuracy']:.4f}"
                  f"  validation acc {h['test_accuracy']:.4f} / ordinary "
                  f"{h['test_accuracy_ordinary']:.4f}  activity {h['test_activity']:.2f}"
                  f"  {h['seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - started
    net.load_state_dict(best[1])
    final = evaluate(net, batches(test.inputs, test.labels, 1000), loss_fn)
    result = {
        "test_accuracy": final["accuracy"], "test_accuracy_ordinary": final["accuracy_ordinary"],
        "best_validation_accuracy": best[0], "best_epoch": best[2],
        "test_activity": final["activity"],
        "wall_seconds": wall,
    }
    # The history's "test_*" entries are validation metrics (the names plot_learning_curves reads).
    write_json(out / "metrics.json", {"config": vars(args), "history": history, "final": result})
    plot_learning_curves(history, out / "learning_curves.png")
    torch.save(net.state_dict(), out / "model.pt")
    print(f"test accuracy {100 * result['test_accuracy']:.2f}% with pseudospikes, "
          f"{100 * result['test_accuracy_ordinary']:.2f}% ordinary spikes only (model of epoch "
          f"{best[2]}, validation {100 * best[0]:.2f}%), {wall:.0f} s")
    print(out)
    return out


if __name__ == "__main__":
    main()
