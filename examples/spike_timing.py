"""Learning precise spike times with exact gradients: one QIF neuron, and a recurrent QIF network.

Two experiments of Klos & Memmesheimer (arXiv 2309.14523), as sub-commands:

``single``
    One QIF neuron (``tau = 1``, ``T = 10``) receives 22 input spikes, each from its own input
    neuron. 20 have fixed random times (uniform in ``[0, T]``) and weights (standard normal); the
    other 2 are learnable in weight (starting at 0) *and* time (starting at 1 and 9). The neuron
    learns to spike at 2.5 and 7.5. The input times are a learnable tensor fed as
    ``Spikes(times, T)`` into a ``QIFLinear(22, 1)``; the readout ``SpikeTimes(2)`` fills missing
    spikes with pseudospike times, so a silent neuron is pulled into the trial. Loss
    ``spike_time_mse``, plain SGD (lr 0.1) with element-wise gradient clipping at 0.02, learned
    input times clipped to ``[0, T]`` after each step.

``recurrent``
    A recurrent network of 10 QIF neurons (``QIFRecurrent``), each driven by its own excitatory
    (weight 5) and inhibitory (weight -5) Poisson input of rate 1. The recurrent weights (starting
    at 0) and the initial states ``(V, I)`` are learned so that neurons 0 and 1 reproduce Poisson
    target spike trains (rates 1 and 1/2). Loss: mean over targets of ``((t - t*) / (t* + 2))^2``,
    plus a term that pushes one extra spike beyond the last target (an extra target at 1.1 T that
    only penalises a spike before it). Optimizer AdaBelief (lr 1e-2, b2 0.99) from
    ``spike_bridge.optim`` (Adam if that is unavailable). The reference trains 10,000 trials; the
    default here is fewer, to finish in a few minutes.

``both`` runs the two one after the other. Each experiment writes ``metrics.json``,
``spike_times.png`` (spikes before / after training vs the targets) and ``loss.png`` into its
output directory; the last line printed is that directory (for ``both``: the parent directory).

    python examples/spike_timing.py single
    python examples/spike_timing.py recurrent --trials 3000
    python examples/spike_timing.py both --out outputs/spike_timing
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import spike_bridge  # noqa: F401  (first: passive OpenMP waiting, set before torch loads)

import numpy as np
import torch
from matplotlib.figure import Figure

from spike_bridge import plot
from spike_bridge.functional import spike_time_mse
from spike_bridge.nn import QIFLinear, QIFRecurrent, SpikeTimes
from spike_bridge.spikes import Spikes

DTYPE = torch.float64  # as the reference (JAX_ENABLE_X64); the bridge keeps float64 in JAX


def _progress(iterable, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, mininterval=0.5)


def _finite_list(values) -> list:
    """JSON-safe floats (``None`` for ``inf`` / NaN = no spike)."""
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(values).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Single neuron
# ---------------------------------------------------------------------------------------------


class SingleNeuronTask(torch.nn.Module):
    """One QIF neuron, ``n_in`` input spikes; the first ``n_train`` are learnable (weight, time)."""

    def __init__(self, n_in: int = 22, n_train: int = 2, T: float = 10.0, seed: int = 0,
                 initial_times=(1.0, 9.0), max_spikes: int = 25):
        super().__init__()
        if len(initial_times) != n_train:
            raise ValueError(f"need {n_train} initial times of the trained inputs")
        generator = torch.Generator().manual_seed(seed)
        self.T, self.n_train = float(T), int(n_train)
        self.neuron = QIFLinear(n_in, 1, T=T, max_spikes=max_spikes, learn_initial_state=False,
                                dtype=DTYPE)  # V = I = 0 at t = 0
        with torch.no_grad():
            self.neuron.weight.zero_()
            self.neuron.weight[0, n_train:] = torch.randn(n_in - n_train, generator=generator,
                                                          dtype=DTYPE)
        # Only the trained inputs' weights get gradients; the rest stay as drawn.
        mask = torch.zeros(1, n_in, dtype=DTYPE)
        mask[0, :n_train] = 1
        self.register_buffer("weight_mask", mask)
        self.neuron.weight.register_hook(lambda grad: grad * self.weight_mask)
        self.trained_times = torch.nn.Parameter(torch.tensor(initial_times, dtype=DTYPE))
        self.register_buffer(
            "fixed_times", T * torch.rand(n_in - n_train, generator=generator, dtype=DTYPE)
        )

    def input_times(self) -> torch.Tensor:
        return torch.cat([self.trained_times, self.fixed_times])

    def forward(self) -> Spikes:
        return self.neuron(Spikes(self.input_times().view(1, -1, 1), self.T))

    @torch.no_grad()
    def clip_times(self) -> None:
        """Keep the learned input times inside the trial, as the reference does."""
        self.trained_times.clamp_(0.0, self.T)


def run_single(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    targets = torch.tensor(args.targets, dtype=DTYPE)
    k = targets.numel()
    task = SingleNeuronTask(n_in=args.n_in, n_train=args.n_train, T=args.T, seed=args.seed,
                            initial_times=[1.0 + (args.T - 2.0) * i / max(args.n_train - 1, 1)
                                           for i in range(args.n_train)])
    readout, ordinary = SpikeTimes(k), SpikeTimes(k, pseudo=False)
    parameters = [task.neuron.weight, task.trained_times]
    optimizer = torch.optim.SGD(parameters, lr=args.lr)

    def snapshot(spikes: Spikes) -> dict:
        return {
            "output_times": _finite_list(readout(spikes)[0, 0]),
            "ordinary_output_times": _finite_list(ordinary(spikes)[0, 0]),
            "trained_weights": task.neuron.weight[0, : task.n_train].tolist(),
            "trained_times": task.trained_times.tolist(),
            "input_times": task.input_times().tolist(),
            "input_weights": task.neuron.weight[0].tolist(),
        }

    losses, output_history, time_history = [], [], []
    before = after = None
    start = time.perf_counter()
    # trials + 1 passes: the last one only evaluates the final parameters (same compiled kernel).
    for trial in _progress(range(args.trials + 1), args.no_progress, "single neuron"):
        spikes = task()
        times = readout(spikes)[0, 0]
        loss = spike_time_mse(times, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at trial {trial}")
        losses.append(value)
        output_history.append(times.detach().tolist())
        time_history.append(task.trained_times.detach().tolist())
        with torch.no_grad():
            if before is None:
                before = snapshot(spikes.detach())
            if trial == args.trials:
                after = snapshot(spikes.detach())
                break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(parameters, args.clip)  # optax.clip: element-wise
        optimizer.step()
        task.clip_times()
    seconds = time.perf_counter() - start
    final_loss = value

    plot.spike_timing(
        [math.inf if t is None else t for t in before["ordinary_output_times"]],
        [math.inf if t is None else t for t in after["ordinary_output_times"]],
        targets, args.T, path=out / "spike_times.png",
    )
    _single_figure(losses, output_history, time_history, before, after, targets.tolist(), args.T,
                   args.n_train).savefig(out / "loss.png", dpi=120)
    metrics = {
        "experiment": "single QIF neuron learns target spike times",
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "targets": targets.tolist(),
        "initial_loss": losses[0],
        "final_loss": final_loss,
        "loss_reduction_factor": losses[0] / final_loss if final_loss > 0 else None,
        "seconds": seconds,
        "seconds_per_trial": seconds / len(losses),
        "before": before,
        "after": after,
        "loss": losses,  # trials + 1 values: before each step, and after the last one
        "output_times_per_trial": output_history,
        "trained_input_times_per_trial": time_history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    print(f"single neuron: loss {metrics['initial_loss']:.4g} -> {final_loss:.4g} after "
          f"{args.trials} trials ({seconds:.0f} s); output spikes {before['output_times']} -> "
          f"{after['output_times']} (targets {targets.tolist()})")
    return out


def _single_figure(losses, outputs, trained_times, before, after, targets, T, n_train) -> Figure:
    fig = Figure(figsize=(12, 3.6))
    ax_loss, ax_times, ax_inputs = fig.subplots(1, 3)
    trials = np.arange(1, len(losses) + 1)
    ax_loss.plot(trials, losses, color="k", linewidth=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("trial")
    ax_loss.set_ylabel("loss (spike-time MSE)")
    ax_loss.set_title("loss")
    outputs, trained_times = np.array(outputs), np.array(trained_times)
    if outputs.size:
        for i in range(outputs.shape[1]):
            ax_times.plot(trials, outputs[:, i], color=f"C{i}", label=f"output spike {i + 1}")
        for i in range(trained_times.shape[1]):
            ax_times.plot(trials, trained_times[:, i], color=f"C{i}", linestyle=":",
                          label=f"trained input {i + 1}")
    for target in targets:
        ax_times.axhline(target, color="C4", linewidth=0.8, linestyle="--")
    ax_times.axhspan(T, max(T * 1.5, np.nanmax(outputs) if outputs.size else T), color="k",
                     alpha=0.12, label="pseudospikes (t >= T)")
    ax_times.set_xlabel("trial")
    ax_times.set_ylabel("time")
    ax_times.set_title("output spike times (targets dashed)")
    ax_times.legend(fontsize=6)
    for row, (label, snap) in enumerate([("before", before), ("after", after)]):
        times = np.array(snap["input_times"])
        y = 2 * row
        ax_inputs.eventplot([times[n_train:]], lineoffsets=y, linelengths=0.6, colors="0.4")
        ax_inputs.eventplot([times[:n_train]], lineoffsets=y, linelengths=0.6, colors="C1")
        out = [t for t in snap["ordinary_output_times"] if t is not None and t < T]
        ax_inputs.eventplot([out], lineoffsets=y + 0.8, linelengths=0.6, colors="C0")
    ax_inputs.eventplot([targets], lineoffsets=3.8, linelengths=0.6, colors="C4")
    ax_inputs.set_yticks([0, 0.8, 2, 2.8, 3.8],
                         ["inputs before", "output before", "inputs after", "output after",
                          "targets"], fontsize=7)
    ax_inputs.set_xlim(0, T)
    ax_inputs.set_xlabel("time")
    ax_inputs.set_title("inputs (orange: trained), outputs")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Recurrent network
# ---------------------------------------------------------------------------------------------


def poisson_trains(rates, T: float, generator: torch.Generator, refractory: float = 0.0,
                   ) -> list[torch.Tensor]:
    """One Poisson spike train in ``[0, T)`` per rate; ``refractory`` is added to every
    inter-spike interval after the first (the reference's target trains use 1)."""
    trains = []
    for rate in rates:
        n = int(5 * T * rate) + 10
        intervals = torch.empty(n, dtype=DTYPE).exponential_(generator=generator) / rate
        intervals[1:] += refractory
        times = torch.cumsum(intervals, 0)
        trains.append(times[times < T])
    return trains


def pad_trains(trains: list[torch.Tensor]) -> torch.Tensor:
    """``[N, K]`` spike times, ``+inf`` padded."""
    k = max(1, max(len(t) for t in trains))
    padded = torch.full((len(trains), k), math.inf, dtype=DTYPE)
    for i, train in enumerate(trains):
        padded[i, : len(train)] = train
    return padded


def recurrent_loss(times: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """The reference's loss: relative squared errors of each target spike (offset 2) summed, plus
    the extra target's term only while that spike comes too early, over the number of targets.

    ``times``: ``[N_target, K]`` (pseudo)spike times of the trained neurons; ``targets``: per
    neuron the target times with the extra target (beyond the trial) last.
    """
    total, count = times.new_zeros(()), 0
    for i, target in enumerate(targets):
        t = times[i, : len(target)]
        error = ((t - target) / (target + 2)) ** 2
        total = total + error[:-1].sum() + error[-1] * (t[-1] < target[-1]).to(times.dtype)
        count += len(target)
    return total / count


def run_recurrent(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    n, T = args.neurons, args.T
    # Inputs: neuron i gets excitatory input i and inhibitory input n + i.
    input_trains = poisson_trains([args.input_rate] * (2 * n), T, generator)
    input_times = pad_trains(input_trains)[None]  # [1, 2n, K_in]
    input_weight = torch.zeros(n, 2 * n, dtype=DTYPE)
    input_weight[torch.arange(n), torch.arange(n)] = args.w_exc
    input_weight[torch.arange(n), n + torch.arange(n)] = args.w_inh
    target_trains = poisson_trains(args.target_rates, T, generator, refractory=1.0)
    targets = [torch.cat([t, torch.tensor([1.1 * T], dtype=DTYPE)]) for t in target_trains]
    n_target = len(targets)
    k = max(len(t) for t in targets)

    net = QIFRecurrent(2 * n, n, T=T, max_events=args.max_events, max_spikes=args.max_spikes,
                       input_weight=input_weight, recurrent_scale=0.0, dtype=DTYPE)
    readout = SpikeTimes(k)
    optimizer_name = args.optimizer
    if optimizer_name == "adabelief":
        try:
            from spike_bridge.optim import AdaBelief
        except ImportError:
            optimizer_name = "adam"
            print("spike_bridge.optim.AdaBelief is not available; using torch.optim.Adam")
    if optimizer_name == "adabelief":
        optimizer = AdaBelief(net.parameters(), lr=args.lr, betas=(0.9, args.b2))
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, args.b2))

    def snapshot(spikes: Spikes) -> dict:
        all_times = spikes.times[0]
        return {
            "spike_trains": [[float(t) for t in row if t < T] for row in all_times.tolist()],
            "spike_counts": spikes.counts[0].tolist(),
            "trained_neuron_times": [
                _finite_list(readout(spikes)[0, i, : len(targets[i])]) for i in range(n_target)
            ],
        }

    losses = []
    best = (math.inf, None)
    before = None
    start = time.perf_counter()
    for trial in _progress(range(args.trials + 1), args.no_progress, "recurrent network"):
        spikes = net(Spikes(input_times, T))
        loss = recurrent_loss(readout(spikes)[0, :n_target], targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at trial {trial}")
        losses.append(value)
        if before is None:
            before = snapshot(spikes.detach())
        if value < best[0]:
            best = (value, trial)
        if trial == args.trials:  # the last pass only evaluates the final parameters
            after = snapshot(spikes.detach())
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start

    _recurrent_figure(before, after, [t[:-1].tolist() for t in targets], T, n_target).savefig(
        out / "spike_times.png", dpi=120)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, color="k", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trial + 1")
    ax.set_ylabel("loss")
    ax.set_title("recurrent network: loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)

    metrics = {
        "experiment": "recurrent QIF network learns target spike trains",
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "optimizer": optimizer_name,
        "targets": [t.tolist() for t in targets],
        "input_spike_trains": [t.tolist() for t in input_trains],
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "best_loss": best[0],
        "best_trial": best[1],
        "loss_reduction_factor": losses[0] / losses[-1] if losses[-1] > 0 else None,
        "seconds": seconds,
        "seconds_per_trial": seconds / max(len(losses), 1),
        "before": before,
        "after": after,
        "loss": losses,
        "recurrent_weight": net.recurrent_weight.detach().mul(net._off_diagonal).tolist(),
        "initial_state": net.initial_state.detach().tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    print(f"recurrent network: loss {losses[0]:.4g} -> {losses[-1]:.4g} after {args.trials} "
          f"trials ({seconds:.0f} s, best {best[0]:.4g} at trial {best[1]})")
    for i in range(n_target):
        print(f"  neuron {i}: targets {[round(t, 2) for t in targets[i][:-1].tolist()]}")
        print(f"            before  {[round(t, 2) for t in before['spike_trains'][i]]}")
        print(f"            after   {[round(t, 2) for t in after['spike_trains'][i]]}")
    return out


def _recurrent_figure(before, after, targets, T, n_target) -> Figure:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (title, snap) in zip(axes, [("before training", before), ("after training", after)]):
        trains = snap["spike_trains"]
        n = len(trains)
        offsets = [1.5 * i for i in range(n_target)] + [1.5 * n_target + 0.6 * j
                                                        for j in range(n - n_target)]
        for i in range(n_target):
            ax.eventplot([targets[i]], lineoffsets=offsets[i] + 0.5, linelengths=0.45,
                         colors="C4")
            ax.eventplot([trains[i]], lineoffsets=offsets[i], linelengths=0.45, colors=f"C{i}")
        for j in range(n_target, n):
            ax.eventplot([trains[j]], lineoffsets=offsets[j], linelengths=0.45, colors="k")
        ax.set_xlim(0, T)
        ax.set_xlabel("time")
        ax.set_title(title)
        ax.set_yticks(
            [offsets[i] + d for i in range(n_target) for d in (0, 0.5)] + offsets[n_target:],
            [f"{label} {i}" for i in range(n_target) for label in ("neuron", "target")]
            + [f"neuron {j}" for j in range(n_target, n)], fontsize=7)
        ax.invert_yaxis()
    fig.suptitle("recurrent QIF network: trained neurons (colour) vs targets (purple)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--T", type=float, default=10.0, help="trial duration (units of tau)")
    common.add_argument("--no-progress", action="store_true")

    single = sub.add_parser("single", parents=[common],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            help="one QIF neuron learns to spike at target times")
    single.add_argument("--trials", type=int, default=5000)
    single.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    single.add_argument("--clip", type=float, default=2e-2,
                        help="element-wise gradient clipping (as optax.clip)")
    single.add_argument("--n-in", type=int, default=22, help="input spikes")
    single.add_argument("--n-train", type=int, default=2,
                        help="inputs with learnable weight and time")
    single.add_argument("--targets", type=float, nargs="+", default=[2.5, 7.5])
    single.add_argument("--out", default="outputs/spike_timing/single")

    recurrent = sub.add_parser("recurrent", parents=[common],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               help="a recurrent QIF network learns target spike trains")
    recurrent.add_argument("--trials", type=int, default=3000)
    recurrent.add_argument("--lr", type=float, default=1e-2)
    _add_recurrent_only(recurrent)
    recurrent.add_argument("--out", default="outputs/spike_timing/recurrent")

    both = sub.add_parser("both", parents=[common],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="run both experiments (sub-directories single/ and recurrent/)")
    both.add_argument("--single-trials", type=int, default=5000)
    both.add_argument("--recurrent-trials", type=int, default=3000)
    both.add_argument("--out", default="outputs/spike_timing")
    return parser.parse_args(argv)


def _add_recurrent_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--b2", type=float, default=0.99, help="AdaBelief / Adam beta2")
    parser.add_argument("--optimizer", choices=["adabelief", "adam"], default="adabelief")
    parser.add_argument("--neurons", type=int, default=10)
    parser.add_argument("--w-exc", type=float, default=5.0)
    parser.add_argument("--w-inh", type=float, default=-5.0)
    parser.add_argument("--input-rate", type=float, default=1.0)
    parser.add_argument("--target-rates", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--max-events", type=int, default=500,
                        help="event steps per trial (input plus network spikes)")
    parser.add_argument("--max-spikes", type=int, default=32, help="spike buffer per neuron")


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.command == "single":
        out = run_single(args)
    elif args.command == "recurrent":
        out = run_recurrent(args)
    else:
        common = {"seed": args.seed, "T": args.T, "no_progress": args.no_progress}
        single = parse_args(["single", "--trials", str(args.single_trials),
                             "--out", str(Path(args.out) / "single")])
        recurrent = parse_args(["recurrent", "--trials", str(args.recurrent_trials),
                                "--out", str(Path(args.out) / "recurrent")])
        vars(single).update(common)
        vars(recurrent).update(common)
        run_single(single)
        run_recurrent(recurrent)
        out = Path(args.out)
    print(out.resolve())
    return out


if __name__ == "__main__":
    main()
