"""torch.compile of bridged spiking kernels and of whole networks: outputs and gradients equal
eager mode, overflow is still reported.

The tests use the ``aot_eager`` backend: dynamo and AOTAutograd are what meet the bridge (the
nonstrict-traced entry point, the custom ops' fake kernels, their autograd registration); the
default backend, inductor, only compiles the torch code around them differently, at several times
the compile time (``benchmarks/compile.py`` measures it).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from jax_kernels import layers as kernel_layers
from jax_kernels.models import Theta
from spike_bridge.bridge import jax_function
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BufferOverflowError,
    FirstSpikeTime,
    ThetaLinear,
)
from spike_bridge.spikes import Spikes

from conftest import INPUT_TIMES, TEST_XLA_FLAG, readme_network

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T = 2.0

@pytest.fixture(autouse=True)
def fresh_dynamo_cache():
    """Dynamo caches compiled frames per code object: without a reset a fullgraph compile could
    reuse the graph-broken frames of an earlier test and pass without one graph."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same(compiled, eager, what):
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12, msg=what)


# ------------------------------------------------------------------------------------------------
# The bridged kernels with a layer's static configuration (neuron model dataclass, floats, ints,
# a tuple of bin times; NamedTuple outputs), fullgraph
# ------------------------------------------------------------------------------------------------

_binned_kernel = jax_function(
    kernel_layers.binned_spiking_layer,
    static_argnames=("bin_times", "model", "T", "max_spikes", "pseudo"),
)
_kernel = jax_function(
    kernel_layers.spiking_layer,
    static_argnames=("model", "T", "max_events", "max_spikes", "pseudo"),
)


def _two_layers(w1, x1, w2, x2, bins, model1, model2):
    first = _binned_kernel(w1, x1, bins, bin_times=(0.1, 0.6), model=model1, T=T,
                           max_spikes=4, pseudo=True)
    second = _kernel(w2, x2, first.spike_times, first.pseudo_rate, model=model2, T=T,
                     max_events=32, max_spikes=4, pseudo=True)
    # None (no input pseudo rates) crosses the compiled call as well
    without_rates = _kernel(w2, x2, first.spike_times, None, model=model2, T=T, max_events=32,
                            max_spikes=4, pseudo=True)
    loss = (second.filled_times[..., 0].square().mean() + first.filled_times[..., 0].mean()
            + without_rates.filled_times[..., 0].mean())
    return loss, first.spike_count.sum(), second.spike_count.sum()


def test_bridged_layer_kernels_compile_fullgraph():
    generator = torch.Generator().manual_seed(0)
    w1 = (3 * torch.rand(5, 8, generator=generator, dtype=torch.float64)).requires_grad_()
    w2 = (3 * torch.rand(3, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    x1 = torch.full((1, 5), 3.0, dtype=torch.float64, requires_grad=True)
    x2 = torch.full((1, 3), 1.0, dtype=torch.float64, requires_grad=True)
    bins = torch.randint(0, 3, (4, 8), generator=generator)
    # two different static models; Theta compiles much faster in JAX than QIF's generic path
    arguments = (w1, x1, w2, x2, bins, Theta(tau=6 / torch.pi), Theta(I0=1.5))

    eager_loss, *eager_counts = _two_layers(*arguments)
    eager_grads = torch.autograd.grad(eager_loss, [w1, x1, w2, x2])
    compiled = torch.compile(_two_layers, fullgraph=True, backend="aot_eager")
    loss, *counts = compiled(*arguments)
    grads = torch.autograd.grad(loss, [w1, x1, w2, x2])

    assert all(c.item() > 0 for c in eager_counts)
    assert [c.item() for c in counts] == [c.item() for c in eager_counts]
    _assert_same([loss], [eager_loss], "loss")
    _assert_same(grads, eager_grads, "gradients")
    assert all(g.abs().max() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------
# Whole networks: the README Quick-start network and examples/hybrid_conv.py's model
# ------------------------------------------------------------------------------------------------


def _hybrid_network() -> nn.Module:
    from spike_bridge.networks import HybridConvNet

    torch.manual_seed(0)
    return HybridConvNet(channels=(4, 8), pool_to=2, hidden=16).double()


NETWORKS = {
    "readme": (readme_network, lambda: torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)),
    "hybrid_conv": (_hybrid_network, lambda: torch.rand(4, 1, 28, 28, dtype=torch.float64)),
}


def _step(net, images, labels):
    first = net(images)
    loss = first_spike_cross_entropy(first, labels, T=T)
    return [first.detach(), loss.detach(), *torch.autograd.grad(loss, list(net.parameters()))]


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_compiled_network_equals_eager(name, fullgraph, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    make, make_images = NETWORKS[name]
    net = make()
    torch.manual_seed(1)
    images, labels = make_images(), torch.tensor([0, 3, 7, 9])
    net.eval()  # BatchNorm of the hybrid model: the same statistics in both runs
    eager = _step(net, images, labels)
    compiled = torch.compile(net, fullgraph=fullgraph, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graphs
        _assert_same(_step(compiled, images, labels), eager, f"{name} outputs, loss, gradients")
    assert eager[0].shape == (4, 10)
    assert all(torch.isfinite(g).all() for g in eager[2:])


# ------------------------------------------------------------------------------------------------
# The suite's compiler setting (conftest.py: XLA's LLVM backend at -O0) agrees with the default
# ------------------------------------------------------------------------------------------------

def setting_check_results() -> list[torch.Tensor]:
    """A float64 step of a small theta network (binned input: the native kernel and XLA glue)
    and of a QIF layer (XLA's own event loop): outputs, loss, gradients."""
    from spike_bridge.nn import BinnedLatencyEncoder, QIFLinear

    torch.manual_seed(1)
    net = nn.Sequential(BinnedLatencyEncoder(n_bins=4, T=T), ThetaLinear(16, 8, w_scale=3.0),
                        ThetaLinear(8, 4), FirstSpikeTime()).double()
    images = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    results = _step(net, images, torch.tensor([0, 3, 1, 2]))
    qif = QIFLinear(4, 3, T=3.0, w_scale=4.0).double()
    out = qif(Spikes(INPUT_TIMES, 3.0)).filled_times
    return [*results, out.detach(), *torch.autograd.grad(out[..., 0].sum(), list(qif.parameters()))]


def test_suite_compiler_setting_agrees_with_the_default_level(tmp_path):
    assert TEST_XLA_FLAG in os.environ["XLA_FLAGS"]
    suite = setting_check_results()
    # the same in a process at XLA's default LLVM level (3)
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(TEST_XLA_FLAG, "")
               + " --xla_backend_optimization_level=3")
    out = tmp_path / "default.pt"
    script = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_compile import setting_check_results; "
              f"torch.save(setting_check_results(), {str(out)!r})")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    default = torch.load(out)
    assert len(suite) == len(default) == 9
    assert all(g.abs().max() > 0 for g in suite[2:])
    # Not bit for bit (LLVM contracts and vectorises differently at -O3): measured at most
    # 2e-15 relative to each tensor's largest entry (7e-15 on the README network), far inside
    # the suite's tightest tolerance (1e-12); comparisons to 0 within a test compare programs
    # compiled alike.
    for a, b in zip(suite, default):
        assert (a - b).abs().max() <= 1e-13 * b.abs().max()


# ------------------------------------------------------------------------------------------------
# Buffer checks in the compiled graph (the spike_bridge::check_buffers op)
# ------------------------------------------------------------------------------------------------

# Four inputs with weight 8 make each theta neuron spike twice before T.
HOT_TIMES = torch.tensor([[[0.1], [0.5], [0.9], [1.3]]], dtype=torch.float64)


def _hot_layer(max_spikes) -> ThetaLinear:
    layer = ThetaLinear(4, 3, max_spikes=max_spikes, name="hot").double()
    with torch.no_grad():
        layer.weight.fill_(8.0)
    return layer


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_fixed_buffer_overflow_is_reported_under_compile(fullgraph):
    layer = _hot_layer(max_spikes=1)
    with pytest.raises(BufferOverflowError) as eager_error:
        layer(Spikes(HOT_TIMES, T)).times
    compiled = torch.compile(nn.Sequential(layer, FirstSpikeTime()), fullgraph=fullgraph,
                             backend="aot_eager")
    with pytest.raises(BufferOverflowError, match=r"^hot: a neuron spiked 2 times but "
                       r"max_spikes=1; construct the layer with max_spikes>=2") as error:
        compiled(Spikes(HOT_TIMES, T))
    assert error.value.needed == eager_error.value.needed == 2
    assert error.value.grown_to is None and layer.max_spikes == 1


def test_auto_buffer_grows_under_compile_and_the_next_call_recompiles():
    """The compiled graph has the old size: the call raises after growing the buffer, and the
    next call (recompiled for the new size) returns what eager mode returns."""
    layer = _hot_layer(max_spikes="auto")
    layer.max_spikes = 1  # below the need of 2
    eager = nn.Sequential(copy.deepcopy(layer), FirstSpikeTime())  # a layer of its own
    compiled = torch.compile(nn.Sequential(layer, FirstSpikeTime()), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(BufferOverflowError, match=r"^hot: a neuron spiked 2 times but "
                       r"max_spikes=1; the 'auto' buffer grew to 2, .* call the network again"
                       ) as error:
        compiled(Spikes(HOT_TIMES, T))
    assert error.value.grown_to == layer.max_spikes == 2
    assert eager[0].max_spikes == 1  # the copy was not grown by the compiled call's check

    first_times = compiled(Spikes(HOT_TIMES, T))
    expected = eager(Spikes(HOT_TIMES, T))  # eager: grows and reruns within the call
    assert eager[0].max_spikes == 2
    _assert_same([first_times], [expected], "first spike times after the growth")
    assert bool((first_times < T).all())


def test_compiled_check_reports_the_true_need_where_the_kernel_counts_a_lower_bound():
    """A recurrent run stops at its last event step, so its status holds a guess (twice the
    buffer): the compiled graph's check reruns the call eagerly to measure the need, as the
    eager check does. The op is called here as the compiled graph calls it."""
    from spike_bridge.nn import QIFRecurrent, _check_buffers_op

    torch.manual_seed(0)
    rec = QIFRecurrent(4, 3, T=T, max_events=4, max_spikes=16, input_weight=8.0,
                       recurrent_scale=1.0, name="rec").double()
    arguments = ([HOT_TIMES], [None], [None], [rec._registry_key], [16, 4, -1], [], [0])
    with torch.no_grad():
        with pytest.raises(BufferOverflowError) as eager_error:
            rec(Spikes(HOT_TIMES, T)).times
        status = rec(Spikes(HOT_TIMES, T))._call.status  # unchecked
        with pytest.raises(BufferOverflowError, match=r"^rec: a sample needs \d+ events but "
                           r"max_events=4; construct") as error:
            _check_buffers_op([status], *arguments)
    assert int(status[1]) < error.value.needed == eager_error.value.needed
    with pytest.raises(ValueError, match=r"^rec: 1 input spike times are NaN or negative"):
        _check_buffers_op([torch.tensor([1, 1, 0, 1])], *arguments)
    assert _check_buffers_op([torch.tensor([1, 4, 0, 0])], *arguments).item() == 0
