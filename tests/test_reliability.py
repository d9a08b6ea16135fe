"""Hostile inputs: NaN anywhere, extreme weights, configurations that cannot learn, inputs that
leave the trial, buffers that overflow. Bad values must come out as NaN or as a clear error, never
as plausible finite numbers; finite inputs never give NaN; overflow errors name a size that fits.

Shapes are shared (float64 layers 4 -> 3 on [2, 4, 1] inputs) so the kernels compile once per
model.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from jax_kernels.models import MODELS
from spike_bridge.functional import first_spike_cross_entropy
from spike_bridge.nn import (
    BufferOverflowError,
    FirstSpikeTime,
    LatencyEncoder,
    LIFLinear,
    OscLIFLinear,
    QIFLinear,
    QIFRecurrent,
    SpikeTimes,
    SpikingLinear,
    ThetaLinear,
)
from spike_bridge.spikes import Spikes

T = 2.0
TIMES = torch.tensor([[[0.1], [0.5], [0.9], [1.3]], [[0.3], [0.7], [1.1], [1.7]]],
                     dtype=torch.float64)
RATES = torch.full((2, 4), 0.25, dtype=torch.float64)


def _first_times(layer, spikes):
    out = layer(spikes)
    return out.with_pseudospikes()[..., 0], out


# ------------------------------------------------------------------------------------------------
# NaN in, NaN out (issue: ThetaLinear read T everywhere, OscLIF stayed finite or raised a
# misleading BufferOverflowError, NaN pseudo rates were ignored)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("where", ["weight", "initial_state"])
def test_nan_parameter_gives_nan_outputs_for_its_neuron(name, where):
    torch.manual_seed(0)
    layer = SpikingLinear(4, 3, model=name, dtype=torch.float64)
    with torch.no_grad():
        getattr(layer, where)[0 if where == "initial_state" else 1, 1] = math.nan
    first, out = _first_times(layer, Spikes(TIMES, T, pseudo_rate=RATES))
    assert torch.isnan(first[:, 1]).all()
    assert torch.isnan(out.times[:, 1]).all()
    if out.pseudo_rate is not None and layer.pseudo and layer.model.has_pseudodynamics:
        assert torch.isnan(out.pseudo_rate[:, 1]).all()
    # the other neurons are untouched (none of their inputs is NaN)
    assert not torch.isnan(first[:, [0, 2]]).any()
    assert (out.counts[:, 1] == 0).all()  # no garbage count that could raise a false overflow


@pytest.mark.parametrize("name", [name for name in sorted(MODELS)
                                  if MODELS[name].has_pseudodynamics])
def test_nan_input_pseudo_rate_gives_nan_outputs_for_its_sample(name):
    torch.manual_seed(0)
    layer = SpikingLinear(4, 3, model=name, dtype=torch.float64)
    rates = RATES.clone()
    rates[1, 2] = math.nan
    first, out = _first_times(layer, Spikes(TIMES, T, pseudo_rate=rates))
    assert torch.isnan(first[1]).all() and torch.isnan(out.pseudo_rate[1]).all()
    assert not torch.isnan(first[0]).any()


def test_nan_weights_in_a_last_osclif_layer_give_a_nan_loss_not_an_overflow_error():
    torch.manual_seed(0)
    net = nn.Sequential(ThetaLinear(4, 3), OscLIFLinear(3, 2), FirstSpikeTime()).double()
    with torch.no_grad():
        net[1].weight.fill_(math.nan)
    first = net(Spikes(TIMES, T))
    assert torch.isnan(first).all()
    assert torch.isnan(first_spike_cross_entropy(first, torch.tensor([0, 1]), T=T))


def test_nan_weights_reach_the_recurrent_network_outputs():
    rec = QIFRecurrent(4, 3, T=T, max_events=16, max_spikes=2).double()
    with torch.no_grad():
        rec.recurrent_weight[0, 1] = math.nan
    out = rec(Spikes(TIMES, T))
    assert torch.isnan(out.with_pseudospikes()).all()


def test_nan_features_are_refused_by_the_next_layer():
    features = torch.tensor([[0.5, math.nan, 1.0, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input spike times are NaN or negative"):
        ThetaLinear(4, 3).double()(LatencyEncoder(T=T)(features)).times  # checked when read


# ------------------------------------------------------------------------------------------------
# Finite inputs never give NaN: QIF with strongly inhibitory weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, weight", [(torch.float64, -1e4), (torch.float64, -1e6),
                                           (torch.float32, -1e3), (torch.float32, -1e5)])
def test_qif_with_huge_inhibitory_weights_stays_finite(dtype, weight):
    """softplus of the pseudo current underflowed to 0: NaN pseudospike times and gradients."""
    layer = QIFLinear(4, 3, dtype=dtype)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.initial_state[0] = torch.tensor([-5.0, 0.0, 2.0])  # V below, at, above 1/2
    for times in (TIMES.to(dtype), torch.full((2, 4, 1), 1.999, dtype=dtype)):
        first, out = _first_times(layer, Spikes(times, T))
        assert torch.isfinite(first).all() and torch.isfinite(out.pseudo_rate).all()
        assert (first >= 0).all()
        (weight_grad,) = torch.autograd.grad(first.sum(), layer.weight)
        assert torch.isfinite(weight_grad).all()


# ------------------------------------------------------------------------------------------------
# A default configuration trains or refuses clearly
# ------------------------------------------------------------------------------------------------


def test_default_lif_network_with_pseudospike_readout_refuses_clearly():
    """LIF has no pseudospikes: its silent outputs read +inf and the loss was NaN."""
    net = nn.Sequential(LIFLinear(4, 3), LIFLinear(3, 2), FirstSpikeTime()).double()
    with pytest.raises(ValueError, match=r"FirstSpikeTime\(pseudo=True\): the layer before has "
                                         r"no pseudospike times .*FirstSpikeTime\(pseudo=False\)"):
        net(Spikes(TIMES, T))
    with pytest.raises(ValueError, match=r"SpikeTimes\(pseudo=True\)"):
        SpikeTimes(1)(ThetaLinear(4, 3, pseudo=False).double()(Spikes(TIMES, T)))
    first = FirstSpikeTime(pseudo=False)(net[1](net[0](Spikes(TIMES, T))))
    assert torch.isfinite(first).all() and (first <= T).all()


# ------------------------------------------------------------------------------------------------
# An input spike leaving the trial behaves like a hidden spike leaving it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [ThetaLinear, QIFLinear], ids=lambda c: c.__name__)
@pytest.mark.parametrize("weight", [0.5, -0.7, 2.0])
def test_latency_encoder_first_pseudospike_is_continuous_where_the_input_leaves(layer_cls, weight):
    """Before the fix, theta with weight 0.5: 2.804442 at x = 1e-9 but 3.000 at x = 0."""
    layer = layer_cls(1, 1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(weight)
    encoder = LatencyEncoder(T=T)
    first = {}
    for x in (1e-7, 1e-10, 0.0, -1e-10, -1e-7):
        features = torch.tensor([[x]], dtype=torch.float64, requires_grad=True)
        time = FirstSpikeTime()(layer(encoder(features)))
        (grad,) = torch.autograd.grad(time.sum(), features)
        assert torch.isfinite(time).all() and torch.isfinite(grad).all()
        first[x] = time.item()
    assert abs(first[1e-10] - first[0.0]) < 1e-8
    assert abs(first[-1e-10] - first[0.0]) < 1e-8
    assert abs(first[1e-7] - first[-1e-7]) < 1e-5


def test_latency_encoder_pseudo_rates():
    features = torch.tensor([[1.0, 1e-12, 0.0, -0.5, -50.0, -1e4, 1e4]], dtype=torch.float64)
    spikes = LatencyEncoder(T=T, scale=0.5)(features)
    expected = torch.tensor([[0.0, 0.0, 1.0, math.exp(-1.0), math.exp(-100.0), 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(spikes.pseudo_rate, expected, rtol=1e-15, atol=0)
    # the rate of an input outside the trial is T / t
    outside = spikes.times[0, :, 0] >= T
    torch.testing.assert_close(spikes.pseudo_rate[0, outside][:-1],
                               (T / spikes.times[0, outside, 0])[:-1], rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------------
# Overflow errors report the true need
# ------------------------------------------------------------------------------------------------


def _reported(error: pytest.ExceptionInfo, name: str) -> int:
    return int(re.search(rf"{name}>=(\d+)", str(error.value)).group(1))


@pytest.mark.parametrize("layer_cls, weight", [(LIFLinear, 30.0), (QIFLinear, 60.0),
                                               (OscLIFLinear, 3.0)], ids=lambda v: str(v))
def test_spike_buffer_overflow_reports_the_true_count(layer_cls, weight):
    """LIF reported 59 at max_spikes=1 and 242 at 8 for a true 614."""
    counts = set()
    for max_spikes in (1, 3):
        layer = layer_cls(4, 3, max_spikes=max_spikes, name="hot", dtype=torch.float64)
        with torch.no_grad():
            layer.weight.fill_(weight)
            with pytest.raises(BufferOverflowError, match=r"^hot: a neuron spiked") as error:
                layer(Spikes(TIMES, T)).times  # checked when the output is read
        counts.add(_reported(error, "max_spikes"))
    (need,) = counts  # the same true count whatever the buffer
    fits = layer_cls(4, 3, max_spikes=need, dtype=torch.float64)
    fits.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out = fits(Spikes(TIMES, T))
    assert int(out.counts.max()) == need
    slots = torch.arange(need)
    assert torch.equal(torch.isfinite(out.times), slots < out.counts[..., None])


def test_recurrent_event_buffer_overflow_reports_the_true_need():
    """The recurrent layer said "e.g. 2x": four retries from 4 to 64."""
    torch.manual_seed(0)
    rec = QIFRecurrent(4, 3, T=T, max_events=4, max_spikes=16, input_weight=8.0,
                       recurrent_scale=1.0, name="rec").double()
    spikes = Spikes(TIMES, T)
    with torch.no_grad(), pytest.raises(BufferOverflowError,
                                        match=r"^rec: .* but max_events=4; ") as error:
        rec(spikes).times
    need = _reported(error, "max_events")
    assert need > 8
    rec.max_events = need
    with torch.no_grad():
        out = rec(spikes)
    in_trial = (TIMES < T).sum((1, 2)) + out.counts.sum(-1)
    assert int(in_trial.max()) + 1 == need
    rec.max_events = need - 1
    with torch.no_grad(), pytest.raises(BufferOverflowError, match=rf"needs {need}"):
        rec(spikes).times


def test_recurrent_spike_buffer_overflow_reports_the_true_count():
    torch.manual_seed(0)
    rec = QIFRecurrent(4, 3, T=T, max_events=256, max_spikes=1, input_weight=8.0,
                       name="rec").double()
    with torch.no_grad(), pytest.raises(BufferOverflowError,
                                        match=r"^rec: a neuron spiked \d+ times") as error:
        rec(Spikes(TIMES, T)).times
    need = _reported(error, "max_spikes")
    assert need > 1
    rec.max_spikes = need
    with torch.no_grad():
        out = rec(Spikes(TIMES, T))
    assert int(out.counts.max()) == need
