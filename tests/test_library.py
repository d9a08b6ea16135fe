"""What training needs, in the library (issue 11) and the parts of issue 10 in the same code:
adaptive buffers checked with one host read per step, spike recording of any network, one set
of metrics, weight decay that spares initial states, imports without side effects, neuron
models by name, state projection that survives copies, clear errors for degenerate input."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spike_bridge
from jax_kernels.models import NeuronModel
from spike_bridge import functional as F
from spike_bridge.evaluation import evaluate
from spike_bridge.networks import HybridConvNet, dense_layers, mlp
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    BufferOverflowError,
    FirstSpikeTime,
    LatencyEncoder,
    QIFRecurrent,
    SpikingLinear,
    SpikingRecurrent,
    ThetaLinear,
)
from spike_bridge.optim import parameter_groups
from spike_bridge.spikes import Spikes

REPO = Path(__file__).resolve().parents[1]
T = 2.0
THETA = 6.0


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout first on the path."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)


def _busy_input(batch: int = 2) -> Spikes:
    """48 input spikes spread over the trial: with weights 30 a theta neuron spikes 12 times,
    more than the initial buffer of 8."""
    return LatencyEncoder(T=T)(torch.linspace(0.05, 3.0, 48).expand(batch, 48))


def _latency_input(batch: int = 4, features: int = 6, seed: int = 0) -> Spikes:
    generator = torch.Generator().manual_seed(seed)
    return LatencyEncoder(T=T)(torch.rand(batch, features, generator=generator) + 0.5)


# ------------------------------------------------------------------------------------------------
# Adaptive buffers
# ------------------------------------------------------------------------------------------------


def test_users_own_loop_grows_buffers_and_the_size_survives_state_dict():
    """A plain torch loop (no example helpers) in which the hidden layer becomes busier than its
    initial buffer trains on without an error; a checkpoint keeps the grown size."""
    torch.manual_seed(0)

    def network():
        return nn.Sequential(LatencyEncoder(T=T), ThetaLinear(48, 3, name="hidden"),
                             ThetaLinear(3, 2), FirstSpikeTime())

    net = network()
    initial = net[1].max_spikes
    x = torch.linspace(0.05, 3.0, 48).expand(2, 48)
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                net[1].weight.fill_(30.0)  # a jump in activity, as training can make
        with spike_bridge.record(net) as recording:
            loss = F.first_spike_cross_entropy(net(x), labels, T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    busiest = int(recording["1"][-1].spike_count.max())
    assert busiest > initial and net[1].max_spikes >= busiest

    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = network()
    assert fresh[1].max_spikes == initial
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh[1].max_spikes == net[1].max_spikes
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_overflowed_call_is_rerun_before_its_outputs_are_used():
    """An ``"auto"`` layer that overflows gives exactly what a layer with a large enough fixed
    buffer gives, and the layer after it sees the rerun's spikes."""
    spikes = _busy_input()
    auto = nn.Sequential(ThetaLinear(48, 3), ThetaLinear(3, 2))
    fixed = nn.Sequential(ThetaLinear(48, 3, max_spikes=64), ThetaLinear(3, 2))
    with torch.no_grad():
        auto[0].weight.fill_(30.0)
    fixed.load_state_dict(auto.state_dict())
    needed = int(fixed[0](spikes).spike_count.max())
    assert needed > auto[0].max_spikes == 8
    out_auto, out_fixed = auto(spikes), fixed(spikes)
    torch.testing.assert_close(out_auto.filled_times, out_fixed.filled_times, rtol=0, atol=0)
    assert auto[0].max_spikes >= needed


def test_auto_buffer_shrinks_after_calls_that_left_it_mostly_empty():
    """A busy call grows the buffer; quiet calls afterwards shrink it back (to twice their need)
    after SHRINK_AFTER_CALLS of them, with outputs equal to a fixed buffer's throughout."""
    from spike_bridge.nn import SHRINK_AFTER_CALLS

    busy = _busy_input()
    keep = torch.arange(48)[None, :, None] < 4  # 4 of the 48 inputs spike: few output spikes
    quiet = Spikes(torch.where(keep, busy.times, torch.inf), T)
    auto = ThetaLinear(48, 3)
    fixed = ThetaLinear(48, 3, max_spikes=64)
    with torch.no_grad():
        auto.weight.fill_(30.0)
        fixed.weight.fill_(30.0)
        auto(busy).times  # reading the output checks the call: the buffer grows
        grown = auto.max_spikes
        quiet_need = int(fixed(quiet).spike_count.max())
        assert 2 * quiet_need <= grown // 2
        for call in range(SHRINK_AFTER_CALLS["max_spikes"]):
            assert auto.max_spikes == grown
            out = auto(quiet)
            expected = fixed(quiet).times[..., :out.times.shape[-1]]
            torch.testing.assert_close(out.times, expected, rtol=0, atol=0)
    assert quiet_need <= auto.max_spikes < grown
    assert auto.max_spikes == 1 << (2 * quiet_need - 1).bit_length()


def test_buffer_size_grid_pads_by_at_most_a_quarter_with_four_sizes_per_octave():
    from jax_kernels.layers import buffer_size

    sizes = [buffer_size(n) for n in range(1, 1 << 14)]
    for n, size in enumerate(sizes, 1):
        assert n <= size and (size & (size - 1) == 0 if n <= 16 else size % 16 == 0)
        assert size <= max(2 * n - 1, n + n // 4 + 15)
    distinct = set(sizes)
    for low in (64, 128, 256, 1024, 4096):
        assert len([s for s in distinct if low < s <= 2 * low]) <= 4


def test_auto_event_buffers_follow_drifting_activity_with_few_compiled_shapes():
    """A training run's activity drifts: the ``"auto"`` event buffers follow it on a grid of at
    most four sizes per octave, so the layer compiles a handful of programs, not one per
    multiple of 16 (every compiled program stays in the process: a long run must not pile
    them up)."""
    from spike_bridge.nn import _layer_kernel

    layer = ThetaLinear(256, 2)
    before = _layer_kernel.cache_info().entries
    visited = set()
    with torch.no_grad():
        for n_events in range(20, 257, 4):  # distinct input times, one spike each
            times = torch.full((1, 256, 1), torch.inf)
            times[0, :n_events, 0] = torch.linspace(0.01, 1.9, n_events)
            layer(Spikes(times, T)).times  # reading the output checks the call (grows buffers)
            assert layer.max_events >= n_events
            visited.add((layer.max_events, layer.max_input_spikes))
    event_sizes = {events for events, _ in visited}
    assert len([s for s in event_sizes if 128 < s <= 256]) <= 4  # multiples of 16: 8
    assert _layer_kernel.cache_info().entries - before <= 2 * len(visited)


def test_event_buffer_shrinks_only_after_its_need_fell_to_half():
    """Event needs vary twofold between batches: an event buffer keeps its size while calls
    need more than half of it, and after SHRINK_AFTER_CALLS["events"] calls needing at most
    half it shrinks to 5/4 of their need (on the grid)."""
    from jax_kernels.layers import buffer_size
    from spike_bridge.nn import SHRINK_AFTER_CALLS

    def distinct_times(n_events: int) -> Spikes:
        times = torch.full((1, 256, 1), torch.inf)
        times[0, :n_events, 0] = torch.linspace(0.01, 1.9, n_events)
        return Spikes(times, T)

    layer = ThetaLinear(256, 2)
    calls = SHRINK_AFTER_CALLS["events"]
    with torch.no_grad():
        layer(distinct_times(200)).times
        grown = layer.max_events
        assert grown == buffer_size(200)
        for _ in range(calls + 8):  # more than half: kept
            layer(distinct_times(grown // 2 + 8)).times
            assert layer.max_events == grown
        for call in range(calls):
            assert layer.max_events == grown
            layer(distinct_times(100)).times
    assert layer.max_events == buffer_size(100 + 100 // 4 + 1) < grown


def test_buffers_at_their_starting_sizes_shrink_together():
    """A binary image given as times is one event of many coincident spikes: the event buffer
    (starting at 16) and the spike slots (starting at 8) both shrink after
    SHRINK_AFTER_CALLS["events_at_starting_size"] calls, in the same call."""
    from spike_bridge.nn import SHRINK_AFTER_CALLS

    times = torch.full((2, 48, 1), torch.inf)
    times[:, :30, 0] = 0.1
    layer = ThetaLinear(48, 3)
    assert (layer.max_events, layer.max_spikes) == (16, 8)
    calls = SHRINK_AFTER_CALLS["events_at_starting_size"]
    assert calls == SHRINK_AFTER_CALLS["max_spikes"]
    with torch.no_grad():
        for _ in range(calls):
            need = int(layer(Spikes(times, T)).spike_count.max())
    assert need <= 2 and layer.max_spikes <= 4
    assert layer.max_events == 2  # 5/4 of the one event, on the grid


def test_fixed_buffer_overflow_error_names_layer_buffer_and_need():
    spikes = _busy_input()
    layer = ThetaLinear(48, 3, max_spikes=1, name="busy")
    with torch.no_grad():
        layer.weight.fill_(30.0)
    with pytest.raises(BufferOverflowError) as info:
        layer(spikes).times
    error = info.value
    assert error.layer is layer and error.buffer == "max_spikes" and error.size == 1
    assert str(error).startswith("busy: ") and f"max_spikes>={error.needed}" in str(error)
    fits = ThetaLinear(48, 3, max_spikes=error.needed)
    fits.load_state_dict(layer.state_dict())
    assert int(fits(spikes).spike_count.max()) == error.needed

    events = ThetaLinear(6, 4, max_events=2, name="few events")
    with pytest.raises(BufferOverflowError) as info:
        events(_latency_input()).times
    assert info.value.buffer == "max_events" and info.value.needed == 6  # 6 inputs in the trial


def test_recurrent_event_buffer_grows_with_auto():
    spikes = Spikes(torch.tensor([[[0.1, 0.5, 0.9], [0.3, 0.7, 1.1]]]), 3.0)
    rec = SpikingRecurrent(2, 3, T=3.0, max_events=4)
    with pytest.raises(BufferOverflowError) as info:
        rec(spikes).times
    needed = info.value.needed
    grown = SpikingRecurrent(2, 3, T=3.0)
    grown.max_events = 4  # "auto", starting small
    times = grown(spikes).times  # reading the output checks (and reruns) the call
    assert grown.max_events >= needed
    exact = SpikingRecurrent(2, 3, T=3.0, max_events=needed)
    torch.testing.assert_close(times, exact(spikes).times, rtol=0, atol=0)


class _HostReads:
    """Counts blocking device-to-host reads of torch tensors (the transfer points)."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return counted


def test_one_host_read_per_training_step(monkeypatch):
    """Steady state of a 3-layer network (encoder, three spiking layers, readout): forward,
    loss, backward and optimizer step read the device once (the buffer check)."""
    torch.manual_seed(0)
    net = nn.Sequential(BinnedLatencyEncoder(n_bins=4, T=T), ThetaLinear(16, 8, w_scale=3.0),
                        ThetaLinear(8, 8, w_scale=3.0), ThetaLinear(8, 3), FirstSpikeTime())
    images = torch.randint(0, 256, (5, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step():
        loss = F.first_spike_cross_entropy(net(images), labels, T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # compiles; buffers settle
    reads = _HostReads(monkeypatch)
    step()
    assert reads.count == 1


# ------------------------------------------------------------------------------------------------
# Recording, metrics, evaluation
# ------------------------------------------------------------------------------------------------


class _TwoPaths(nn.Module):
    """Not an nn.Sequential: two spiking layers side by side on one encoded input."""

    def __init__(self):
        super().__init__()
        self.encoder = LatencyEncoder(T=T)
        self.left, self.right = ThetaLinear(6, 3), ThetaLinear(6, 2)

    def forward(self, x):
        spikes = self.encoder(x)
        return torch.cat([FirstSpikeTime()(self.left(spikes)),
                          FirstSpikeTime()(self.right(spikes))], -1)


def test_record_any_network():
    net = _TwoPaths()
    x = torch.rand(3, 6) + 0.5
    with spike_bridge.record(net, include_encoders=True) as recording:
        out = net(x)
        net(x)
    assert list(recording) == ["encoder", "left", "right"]
    assert all(len(calls) == 2 for calls in recording.values())
    assert recording["left"][0].times.shape == (3, 3, net.left.max_spikes)
    torch.testing.assert_close(recording["left"][0].filled_times[..., 0], out[:, :3])
    assert set(recording.activity()) == {"encoder", "left", "right"}
    net(x)  # hooks are gone after the block
    assert all(len(calls) == 2 for calls in recording.values())


def test_ordinary_accuracy_of_a_silent_network_is_zero():
    torch.manual_seed(0)
    net = mlp([4], in_features=6, out_features=3)
    with torch.no_grad():
        for layer in (net[1], net[2]):
            layer.weight.zero_()  # phases Theta/2: nobody spikes within T = 2
    images = torch.full((6, 6), 255, dtype=torch.uint8)
    labels = torch.zeros(6, dtype=torch.int64)  # class 0: argmin of an all-T readout
    with spike_bridge.record(net) as recording:
        first = net(images)
    output = recording["2"][-1]
    assert int(output.spike_count.sum()) == 0
    assert F.ordinary_accuracy(output, labels).item() == 0.0
    assert F.accuracy(first, labels).item() == pytest.approx(1.0)  # pseudospikes tie-break
    metrics = evaluate(net, [(images, labels)])
    assert metrics["accuracy_ordinary"] == 0.0 and metrics["samples"] == 6
    assert metrics["activity"] == 0.0 and metrics["silent_fraction"] == 1.0
    assert set(metrics["activity_per_layer"]) == {"1", "2"}


def test_ordinary_accuracy_counts_the_earliest_spiking_output():
    times = torch.tensor([[[0.5], [0.2], [float("inf")]],
                          [[0.3], [0.3], [float("inf")]],
                          [[float("inf")], [float("inf")], [float("inf")]]])
    output = Spikes(times, T)
    # sample 0: neuron 1 first; sample 1: a tie goes to the lowest index; sample 2: silent
    assert F.ordinary_accuracy(output, torch.tensor([1, 0, 2])).item() == pytest.approx(2 / 3)
    assert F.ordinary_accuracy(output, torch.tensor([0, 1, 2])).item() == 0.0


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_accuracy_rejects_labels_out_of_range(labels):
    first = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\]"):
        F.accuracy(first, torch.tensor(labels))
    with pytest.raises(ValueError, match=r"labels must be class indices"):
        F.ordinary_accuracy(Spikes(first[..., None], T), torch.tensor(labels))


# ------------------------------------------------------------------------------------------------
# Optimizer parameter groups
# ------------------------------------------------------------------------------------------------


def test_weight_decay_spares_initial_states_of_spiking_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), LatencyEncoder(T=T), ThetaLinear(4, 5),
                        QIFRecurrent(5, 3, learn_input_weights=True), nn.LayerNorm(3))
    decayed, others = parameter_groups(net, 0.1)
    decayed_ids = {id(p) for p in decayed["params"]}
    assert decayed_ids == {id(net[0].weight), id(net[2].weight), id(net[3].recurrent_weight),
                           id(net[3].input_weight)}
    assert {id(p) for p in others["params"]} == {
        id(p) for p in net.parameters() if id(p) not in decayed_ids}
    assert decayed["weight_decay"] == 0.1 and others["weight_decay"] == 0.0

    # One AdamW step without gradients of its own: decay alone moves only the weights.
    layer = net[2]
    before = layer.initial_state.detach().clone()
    optimizer = torch.optim.AdamW(parameter_groups(net, 0.5), lr=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    weight = layer.weight.detach().clone()
    optimizer.step()
    assert torch.equal(layer.initial_state.detach(), before)
    torch.testing.assert_close(layer.weight.detach(), weight * (1 - 0.1 * 0.5))


def test_mnist_example_decays_weights_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    from mnist import build_optimizer

    net = mlp([5], in_features=8, out_features=3)
    optimizer = build_optimizer(net, "adam", 1e-3, weight_decay=0.1)
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert {id(p) for p in decayed} == {id(net[1].weight), id(net[2].weight)}


# ------------------------------------------------------------------------------------------------
# Imports without side effects
# ------------------------------------------------------------------------------------------------


def test_import_nn_without_torchvision():
    result = _python(
        "import sys; sys.modules['torchvision'] = None\n"  # import torchvision -> ImportError
        "import spike_bridge.nn, spike_bridge.recording, spike_bridge.evaluation\n"
        "import spike_bridge.networks, spike_bridge.functional, spike_bridge.data\n"
        "print('ok')"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("module", ["jax_kernels.simulate", "jax_kernels.layers",
                                    "jax_kernels.models.theta", "jax_kernels.models.base",
                                    "jax_kernels.models.qif", "jax_kernels.models"])
def test_each_kernel_module_can_be_imported_first(module):
    result = _python(f"import {module}")
    assert result.returncode == 0, result.stderr


def test_import_leaves_jax_defaults_alone_and_float64_stays_float64():
    result = _python(
        "import jax, jax.numpy as jnp\n"
        "import spike_bridge.nn, torch\n"
        "from spike_bridge.nn import LatencyEncoder, ThetaLinear\n"
        "assert not jax.config.jax_enable_x64\n"
        "layer = ThetaLinear(3, 2).double()\n"
        "out = layer(LatencyEncoder(T=2.0)(torch.rand(2, 3, dtype=torch.float64) + 0.5))\n"
        "assert out.filled_times.dtype == torch.float64\n"
        "print(jnp.arange(3).dtype, jnp.ones(2).dtype)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["int32", "float32"]


def test_layers_install_no_global_optimizer_hook():
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    before = (len(_global_optimizer_post_hooks), len(_global_optimizer_pre_hooks))
    ThetaLinear(3, 2)
    SpikingRecurrent(3, 2)
    assert (len(_global_optimizer_post_hooks), len(_global_optimizer_pre_hooks)) == before


@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_copies_keep_initial_states_in_range(duplicate):
    """After a huge step a copy's phases return to [0, Theta] (not stuck far outside, where the
    clamp passes no gradient), exactly like the original's, and its state_dict holds valid
    states."""
    torch.manual_seed(0)
    original = nn.Sequential(LatencyEncoder(T=T), ThetaLinear(4, 3), FirstSpikeTime())
    twin = (copy.deepcopy(original) if duplicate == "deepcopy"
            else pickle.loads(pickle.dumps(original)))
    x = torch.rand(5, 4) + 0.5
    for net in (original, twin):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e5)
        net(x).sum().backward()
        optimizer.step()
        stepped = net[1].initial_state.detach()
        assert ((stepped < 0) | (stepped > THETA)).any(), "the step must leave [0, Theta]"
    state = twin.state_dict()["1.initial_state"]
    assert state.min() >= 0 and state.max() <= THETA
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), rtol=0, atol=0)
    assert torch.equal(twin[1].initial_state, original[1].initial_state)
    assert twin[1].initial_state.min() >= 0 and twin[1].initial_state.max() <= THETA


# ------------------------------------------------------------------------------------------------
# Models as data, degenerate input
# ------------------------------------------------------------------------------------------------


def test_model_parameters_by_keyword_and_unknown_names():
    layer = SpikingLinear(3, 2, model="theta", I0=1.5)
    assert layer.model.I0 == 1.5 and layer.model.tau == pytest.approx(6 / 3.141592653589793)
    assert isinstance(ThetaLinear(3, 2).model, NeuronModel)
    with pytest.raises(ValueError, match="unknown neuron model 'nope'"):
        SpikingLinear(3, 2, model="nope")


@pytest.mark.parametrize("value", [2.5, 0, True, "big"])
def test_buffer_sizes_must_be_auto_or_positive_int(value):
    with pytest.raises(ValueError, match=r"max_spikes must be 'auto' or a positive int"):
        ThetaLinear(3, 2, max_spikes=value)
    with pytest.raises(ValueError, match=r"max_events must be 'auto' or a positive int"):
        SpikingRecurrent(3, 2, max_events=value)


def test_batch_size_zero_gives_empty_outputs():
    net = mlp([4], in_features=6, out_features=3)
    first = net(torch.zeros(0, 6, dtype=torch.uint8))
    assert first.shape == (0, 3)
    layer = ThetaLinear(6, 4)
    out = layer(Spikes(torch.zeros(0, 6, 1), T))
    assert out.times.shape == (0, 4, layer.max_spikes) and out.spike_count.shape == (0, 4)
    rec = SpikingRecurrent(6, 2, T=T)
    assert rec(Spikes(torch.zeros(0, 6, 1), T)).times.shape == (0, 2, rec.max_spikes)


def test_hybrid_conv_net_is_part_of_the_library():
    torch.manual_seed(0)
    net = HybridConvNet(channels=(2, 4), pool_to=2, hidden=5)
    first = net(torch.randn(3, 1, 28, 28))
    assert first.shape == (3, 10) and torch.isfinite(first).all()
    with spike_bridge.record(net) as recording:
        net(torch.randn(3, 1, 28, 28))
    assert list(recording) == ["hidden", "output"]


def test_rerun_of_an_overflowed_call_uses_the_parameters_of_that_call():
    """A call whose buffers overflowed is rerun when its output is first read; the rerun must
    use the parameters the call used (here swapped in by functional_call), and refuse to run if
    they were changed in place since."""
    from torch.func import functional_call

    from spike_bridge.nn import ThetaLinear
    from spike_bridge.spikes import Spikes

    generator = torch.Generator().manual_seed(3)
    times = torch.rand(2, 40, 1, generator=generator, dtype=torch.float64) * 1.8  # 40 distinct
    spikes = Spikes(times, 2.0)
    layer = ThetaLinear(40, 6, w_scale=0.5).double()
    strong = {"weight": (6 * layer.weight.detach()).requires_grad_(),
              "initial_state": layer.initial_state.detach().clone()}
    out = functional_call(layer, strong, (spikes,))  # read only after the swap is undone
    reference = ThetaLinear(40, 6, max_events=64).double()
    reference.load_state_dict({"weight": strong["weight"].detach(),
                               "initial_state": strong["initial_state"]}, strict=False)
    expected = reference(spikes)
    assert int(expected.spike_count.sum()) > 0
    assert torch.equal(out.spike_count, expected.spike_count)  # the read reruns the call
    torch.testing.assert_close(out.filled_times, expected.filled_times, rtol=0, atol=1e-12)
    out.filled_times[..., 0].sum().backward()  # the gradient reaches the swapped-in weight
    assert strong["weight"].grad is not None and strong["weight"].grad.abs().sum() > 0

    fresh = ThetaLinear(40, 6).double()
    unread = fresh(spikes)
    with torch.no_grad():
        fresh.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        unread.spike_count


def test_dense_layers_name_their_roles_and_reject_bad_sizes():
    """``networks.dense_layers``: the stack ``mlp`` and ``examples/conv.py`` build on."""
    layers = dense_layers([6, 4, 3], dtype=torch.float64)
    assert [layer.name for layer in layers] == ["hidden 1 layer (theta 6->4)",
                                                "output layer (theta 4->3)"]
    assert [tuple(layer.weight.shape) for layer in layers] == [(4, 6), (3, 4)]
    assert all(layer.weight.dtype == torch.float64 for layer in layers)
    for sizes in ([6, 0, 3], [6]):
        with pytest.raises(ValueError, match="layer sizes"):
            dense_layers(sizes)
