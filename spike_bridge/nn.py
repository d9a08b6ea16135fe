"""Spiking layers, encoders and readouts as ``torch.nn.Module`` drop-ins.

A network is an ``nn.Sequential`` of an encoder, spiking layers and a readout; the layers pass
:class:`~spike_bridge.spikes.Spikes` values between them::

    net = nn.Sequential(
        BinnedLatencyEncoder(n_bins=1, T=2.0),
        ThetaLinear(784, 100), ThetaLinear(100, 100), ThetaLinear(100, 10),
        FirstSpikeTime(),
    )
    first_times = net(images)        # [B, 10], train with any torch.optim optimizer

Each spiking layer simulates its neurons event by event in JAX (exact spike times, exact
gradients) and computes pseudospike times for missing spikes, so gradient descent can add and
remove spikes. Times are in units of the neuron time constant ``tau``.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from jax_kernels import layers as kernel_layers
from jax_kernels.models import LIF, MODELS, QIF, NeuronModel, OscLIF, PseudoNeuronModel, Theta
from spike_bridge.bridge import jax_function, register_static_type
from spike_bridge.functional import ENCODER_INPUTS, binned_latency_encode, latency_encode
from spike_bridge.spikes import Spikes

__all__ = [
    "BinnedLatencyEncoder",
    "BufferOverflowError",
    "EarliestSpikePool2d",
    "FirstSpikeTime",
    "LIFLinear",
    "LatencyEncoder",
    "OscLIFLinear",
    "QIFLinear",
    "QIFRecurrent",
    "SpikeTimes",
    "SpikingConv2d",
    "SpikingLinear",
    "ThetaLinear",
]

#: Event buffers are rounded up to multiples of this, so that recompiles stay rare.
EVENT_BUCKET = 16

_layer_kernel = jax_function(
    kernel_layers.spiking_layer,
    static_argnames=("model", "T", "max_events", "max_spikes", "pseudo", "max_input_spikes"),
)
_binned_layer_kernel = jax_function(
    kernel_layers.binned_spiking_layer,
    static_argnames=("bin_times", "model", "T", "max_spikes", "pseudo"),
)
_recurrent_kernel = jax_function(
    kernel_layers.recurrent_spiking_network,
    static_argnames=("model", "T", "max_events", "max_spikes", "pseudo"),
)
# The models are static kernel arguments; under torch.compile they must cross torch's pytree.
for _model_type in MODELS.values():
    register_static_type(_model_type)


class BufferOverflowError(RuntimeError):
    """A fixed-size spike or event buffer was too small for the data."""


def _host_ints(*values: torch.Tensor) -> list[int]:
    """Several integer scalars from the device in one transfer."""
    return [int(v) for v in torch.stack([v.to(torch.int64) for v in values]).tolist()]


def _input_event_counts(times: torch.Tensor, T: float) -> tuple[torch.Tensor, ...]:
    """Most distinct input spike times and most input spikes in the trial of any sample, and
    the number of invalid (NaN or negative) times: scalars on the tensors' device."""
    if not times.numel():
        zero = times.new_zeros((), dtype=torch.int64)
        return zero, zero, zero
    flat = times.detach().flatten(1)
    in_trial = flat < T
    ordered, _ = torch.sort(torch.where(in_trial, flat, torch.inf), dim=1)
    distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] < T)
    n_events = distinct.sum(1) + in_trial.any(1)
    invalid = (torch.isnan(flat) | (flat < 0)).sum()
    return n_events.max(), in_trial.sum(1).max(), invalid


def _check_spikes(spikes: object, layer: nn.Module, n_inputs: int, T: float,
                  dtype: torch.dtype, device: torch.device) -> Spikes:
    if not isinstance(spikes, Spikes):
        raise TypeError(
            f"{layer._name()}: expected a spike_bridge Spikes value (from an encoder or a spiking "
            f"layer), got {type(spikes).__name__}; put an encoder such as BinnedLatencyEncoder "
            "or LatencyEncoder in front of the first spiking layer"
        )
    times = spikes.times
    if times.dim() != 3 or times.shape[1] != n_inputs:
        raise ValueError(
            f"{layer._name()}: input spike times must have shape [batch, {n_inputs}, spikes], "
            f"got {list(times.shape)}"
        )
    if times.dtype != dtype:
        raise TypeError(
            f"{layer._name()}: input spike times are {times.dtype} but the layer is {dtype}; "
            "convert the whole network (encoder included) with .to(dtype) / .double()"
        )
    if times.device != device:
        raise ValueError(
            f"{layer._name()}: input spike times are on {times.device} but the layer is on "
            f"{device}; move the whole network (encoder included) with .to(device)"
        )
    if spikes.T != T:
        raise ValueError(
            f"{layer._name()}: input trial duration T={spikes.T} differs from the layer's T={T}; "
            "use one T for the encoder and all layers"
        )
    return spikes


class _BoundedStates:
    """Keeps learnable initial states inside their valid range under any optimizer.

    The layers clamp the states they use in ``forward``; this global optimizer post-step hook
    also projects the parameters themselves (as the reference clips after each step), so that
    ``state_dict()`` never holds invalid states.
    """

    layers: "weakref.WeakSet[SpikingLinear]" = weakref.WeakSet()
    hook = None

    @classmethod
    def register(cls, layer) -> None:
        cls.layers.add(layer)
        if cls.hook is None:
            cls.hook = register_optimizer_step_post_hook(cls._project)

    @classmethod
    def _project(cls, optimizer, args, kwargs) -> None:
        parameters = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in list(cls.layers):
            if id(layer.initial_state) in parameters:
                with torch.no_grad():
                    layer.initial_state.copy_(layer.clamped_initial_state())


def _state_bounds(model: NeuronModel) -> tuple[list[float], list[float]]:
    """Lower and upper bound of each state variable (``-+inf`` where unbounded)."""
    import jax.numpy as jnp

    size = model.state_size
    low = model.clip_state(jnp.full((size, 1), -jnp.inf))[:, 0]
    high = model.clip_state(jnp.full((size, 1), jnp.inf))[:, 0]
    return [float(v) for v in low], [float(v) for v in high]


class SpikingLinear(nn.Module):
    r"""Fully connected feedforward layer of spiking neurons (any registered neuron model).

    Every input spike reaches every neuron with weight ``weight[i, j]``. The neurons are simulated
    exactly between input events; their ordinary spikes (up to ``max_spikes`` per neuron) and, for
    models with pseudodynamics, their pseudospike times and pseudo rates are passed on.

    Args:
        in_features: ``N_in``; out_features: ``N``.
        model: a neuron model from :mod:`jax_kernels.models` (frozen dataclass).
        T: trial duration.
        max_spikes: spike buffer per neuron ``K``; more spikes raise :class:`BufferOverflowError`
            naming a size that fits.
        w_scale: initial weights are uniform in ``+-w_scale / sqrt(in_features)``.
        pseudo: compute pseudospikes (``False``: ordinary spikes only).
        learn_initial_state: whether the initial states are a ``Parameter`` (else a buffer).
        name: used in error messages (default: class and sizes).

    Shapes:
        input: :class:`Spikes` with ``times [B, N_in, K_in]``; output: :class:`Spikes` with
        ``times``/``filled_times`` ``[B, N, K]``, ``pseudo_rate`` and ``spike_count`` ``[B, N]``.

    Attributes:
        weight: ``[N, N_in]``. initial_state: ``[D, N]`` states at ``t = 0`` (``D`` =
        ``len(model.state_names)``), kept in the model's valid range.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        model: NeuronModel,
        T: float = 2.0,
        max_spikes: int = 8,
        w_scale: float = 0.5,
        pseudo: bool = True,
        learn_initial_state: bool = True,
        name: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        if not T > 0:
            raise ValueError(f"T (trial duration) must be positive, got {T}")
        if max_spikes < 1:
            raise ValueError(f"max_spikes must be at least 1, got {max_spikes}")
        register_static_type(type(model))  # a user-defined model class too
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.model, self.T, self.max_spikes = model, float(T), int(max_spikes)
        self.w_scale, self.pseudo = float(w_scale), bool(pseudo)
        self.name = name
        self._state_low, self._state_high = _state_bounds(model)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        state = torch.empty(model.state_size, out_features, **factory)
        if learn_initial_state:
            self.initial_state = nn.Parameter(state)
            _BoundedStates.register(self)
        else:
            self.register_buffer("initial_state", state)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: uniform weights, the model's default initial states."""
        bound = self.w_scale / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            default = torch.as_tensor(
                [float(v) for v in self.model.default_initial_state()], dtype=self.weight.dtype
            )
            self.initial_state.copy_(default[:, None].expand_as(self.initial_state))

    def clamped_initial_state(self) -> torch.Tensor:
        """``initial_state`` projected onto the model's valid range (differentiable inside)."""
        low = torch.tensor(self._state_low, dtype=self.weight.dtype, device=self.weight.device)
        high = torch.tensor(self._state_high, dtype=self.weight.dtype, device=self.weight.device)
        return torch.clamp(self.initial_state, low[:, None], high[:, None])

    def _name(self) -> str:
        return self.name or f"{type(self).__name__}({self.in_features}->{self.out_features})"

    def forward(self, spikes: Spikes) -> Spikes:
        spikes = _check_spikes(
            spikes, self, self.in_features, self.T, self.weight.dtype, self.weight.device
        )
        initial_state = self.clamped_initial_state()
        pseudo = self.pseudo and isinstance(self.model, PseudoNeuronModel)
        if spikes.binned is not None and not spikes.times.requires_grad:
            out = _binned_layer_kernel(
                self.weight, initial_state, spikes.binned.bin_index,
                bin_times=spikes.binned.bin_times, model=self.model, T=self.T,
                max_spikes=self.max_spikes, pseudo=pseudo,
            )
        else:
            times = spikes.times
            n_events, n_spikes, n_invalid = _host_ints(*_input_event_counts(times, self.T))
            if n_invalid:
                raise ValueError(
                    f"{self._name()}: {n_invalid} input spike times are NaN or negative; spike "
                    "times must be >= 0 (use +inf for 'no spike')"
                )
            rate = spikes.pseudo_rate if pseudo else None
            max_events, max_input_spikes = kernel_layers.event_buffer_sizes(
                n_events, n_spikes, times.shape[1] * times.shape[2], EVENT_BUCKET
            )
            out = _layer_kernel(
                self.weight, initial_state, times, rate, model=self.model, T=self.T,
                max_events=max_events, max_spikes=self.max_spikes, pseudo=pseudo,
                max_input_spikes=max_input_spikes,
            )
        (most_spikes,) = _host_ints(out.spike_count.max())
        if most_spikes > self.max_spikes:
            raise BufferOverflowError(
                f"{self._name()}: a neuron spiked {most_spikes} times but max_spikes="
                f"{self.max_spikes}; construct the layer with max_spikes>={most_spikes}"
            )
        return Spikes(
            times=out.spike_times,
            T=self.T,
            filled_times=out.filled_times if pseudo else None,
            pseudo_rate=out.pseudo_rate if pseudo else None,
            spike_count=out.spike_count,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"model={self.model}, T={self.T}, max_spikes={self.max_spikes}, pseudo={self.pseudo}"
        )


class ThetaLinear(SpikingLinear):
    r"""Feedforward layer of theta neurons, ``tau V' = V(V-1) + I0 + tau sum w delta(t - t_i)``.

    Defaults are the reference MNIST setup: ``tau = 6/pi``, ``I0 = 5/4`` (free period 6),
    ``T = 2``, initial phases ``Theta/2``, weights uniform ``+-0.5/sqrt(in_features)``.
    The initial phases (``initial_state [1, N]``) are learnable and kept in ``[0, Theta]``.
    """

    def __init__(self, in_features: int, out_features: int, tau: float = 6 / math.pi,
                 I0: float = 1.25, **kwargs):
        super().__init__(in_features, out_features, Theta(tau=tau, I0=I0), **kwargs)


class QIFLinear(SpikingLinear):
    r"""Feedforward layer of QIF neurons with exponential synaptic currents (``tau_s = tau/2``).

    State ``initial_state [2, N]``: voltage ``V`` and synaptic current ``I`` at ``t = 0``.
    """

    def __init__(self, in_features: int, out_features: int, tau: float = 1.0,
                 alpha: float = 10.0, **kwargs):
        super().__init__(in_features, out_features, QIF(tau=tau, alpha=alpha), **kwargs)


class LIFLinear(SpikingLinear):
    r"""Feedforward layer of current-based LIF neurons (``tau_s = tau/2``, threshold ``V_th``).

    LIF neurons have no pseudodynamics: silent neurons have no pseudospike times.
    """

    def __init__(self, in_features: int, out_features: int, tau: float = 1.0,
                 V_th: float = 1.0, **kwargs):
        super().__init__(in_features, out_features, LIF(tau=tau, V_th=V_th), **kwargs)


class OscLIFLinear(SpikingLinear):
    r"""Feedforward layer of oscillatory LIF neurons with delta pulses (phase representation)."""

    def __init__(self, in_features: int, out_features: int, tau: float = 1.0,
                 I0: float = 1.25, V_th: float = 1.0, **kwargs):
        super().__init__(in_features, out_features, OscLIF(tau=tau, I0=I0, V_th=V_th), **kwargs)


class QIFRecurrent(nn.Module):
    r"""Recurrent network of QIF neurons driven by input spikes; all its neurons' spikes out.

    The network is simulated one event (input or network spike) at a time, ``max_events`` steps.
    Learnable: recurrent weights (no self-connections), initial states ``[2, N]`` (``V``, ``I``);
    input weights are learnable if ``learn_input_weights``.

    Args:
        in_features, num_neurons: sizes.
        T: trial duration; max_events: event steps per trial (inputs plus network spikes);
        max_spikes: spike buffer per neuron. Too small buffers raise :class:`BufferOverflowError`.
        input_weight: initial input weights: a float (all entries) or a tensor ``[N, N_in]``.
        recurrent_scale: initial recurrent weights uniform ``+-scale/sqrt(N)`` (0: start at zero,
            like the reference's experiment).

    Shapes: input :class:`Spikes` ``[B, N_in, K_in]``; output :class:`Spikes` ``[B, N, K]``.
    """

    def __init__(self, in_features: int, num_neurons: int, T: float = 10.0, max_events: int = 500,
                 max_spikes: int = 16, tau: float = 1.0, alpha: float = 10.0,
                 input_weight: float | torch.Tensor = 1.0, recurrent_scale: float = 0.0,
                 learn_input_weights: bool = False, pseudo: bool = True,
                 name: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        for argument, value in [("in_features", in_features), ("num_neurons", num_neurons),
                                ("max_events", max_events), ("max_spikes", max_spikes)]:
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"QIFRecurrent: `{argument}` must be a positive int, got {value!r}")
        if not T > 0:
            raise ValueError(f"QIFRecurrent: `T` (trial duration) must be positive, got {T!r}")
        if isinstance(input_weight, torch.Tensor) and input_weight.shape not in (
            torch.Size([]), torch.Size([num_neurons, in_features])
        ):
            raise ValueError(
                f"QIFRecurrent: `input_weight` must be a float or a tensor of shape "
                f"[{num_neurons}, {in_features}], got shape {list(input_weight.shape)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.num_neurons = in_features, num_neurons
        self.model = QIF(tau=tau, alpha=alpha)
        self.T, self.max_events, self.max_spikes = float(T), int(max_events), int(max_spikes)
        self.recurrent_scale, self.pseudo, self.name = float(recurrent_scale), bool(pseudo), name
        self._initial_input_weight = input_weight
        self.recurrent_weight = nn.Parameter(torch.empty(num_neurons, num_neurons, **factory))
        input_weight_tensor = torch.empty(num_neurons, in_features, **factory)
        if learn_input_weights:
            self.input_weight = nn.Parameter(input_weight_tensor)
        else:
            self.register_buffer("input_weight", input_weight_tensor)
        self.initial_state = nn.Parameter(torch.empty(2, num_neurons, **factory))  # V, I: unbounded
        self.register_buffer(
            "_off_diagonal", 1 - torch.eye(num_neurons, **factory), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            bound = self.recurrent_scale / math.sqrt(self.num_neurons)
            self.recurrent_weight.uniform_(-bound, bound)
            self.input_weight.copy_(torch.as_tensor(self._initial_input_weight).expand_as(
                self.input_weight))
            self.initial_state.zero_()

    def _name(self) -> str:
        return self.name or f"QIFRecurrent({self.in_features}->{self.num_neurons})"

    def forward(self, spikes: Spikes) -> Spikes:
        spikes = _check_spikes(spikes, self, self.in_features, self.T,
                               self.recurrent_weight.dtype, self.recurrent_weight.device)
        (n_invalid,) = _host_ints((torch.isnan(spikes.times) | (spikes.times < 0)).sum())
        if n_invalid:
            raise ValueError(f"{self._name()}: {n_invalid} input spike times are NaN or negative")
        out = _recurrent_kernel(
            self.recurrent_weight * self._off_diagonal, self.input_weight, self.initial_state,
            spikes.times, model=self.model, T=self.T, max_events=self.max_events,
            max_spikes=self.max_spikes, pseudo=self.pseudo,
        )
        most_spikes, incomplete = _host_ints(out.spike_count.max(), (out.end_time < self.T).sum())
        if incomplete:
            needed = self._events_needed(spikes)
            raise BufferOverflowError(
                f"{self._name()}: max_events={self.max_events} event steps did not reach the "
                f"trial end in {incomplete} samples; this batch needs {needed}: construct the "
                f"layer with max_events>={needed}"
            )
        if most_spikes > self.max_spikes:
            raise BufferOverflowError(
                f"{self._name()}: a neuron spiked {most_spikes} times but max_spikes="
                f"{self.max_spikes}; construct the layer with max_spikes>={most_spikes}"
            )
        return Spikes(out.spike_times, self.T,
                      filled_times=out.filled_times if self.pseudo else None,
                      spike_count=out.spike_count)

    def _events_needed(self, spikes: Spikes) -> int:
        """Event steps ``spikes`` needs (only called after an overflow): reruns without gradient
        with growing buffers until every sample reaches ``T``, then counts one step per input
        spike and per network spike in the trial, plus the last step, to ``T``."""
        max_events = self.max_events
        with torch.no_grad():
            while True:
                max_events *= 4
                out = _recurrent_kernel(
                    self.recurrent_weight * self._off_diagonal, self.input_weight,
                    self.initial_state, spikes.times, model=self.model, T=self.T,
                    max_events=max_events, max_spikes=self.max_spikes, pseudo=False,
                )
                if bool((out.end_time >= self.T).all()) or max_events >= 1 << 24:
                    break
            steps = (spikes.times < self.T).sum((1, 2)) + out.spike_count.sum(-1) + 1
        return int(steps.max())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_neurons={self.num_neurons}, "
                f"model={self.model}, T={self.T}, max_events={self.max_events}, "
                f"max_spikes={self.max_spikes}, pseudo={self.pseudo}")


class _Encoder(nn.Module):
    """Encoders have no parameters; a dtype/device anchor lets ``.to()`` / ``.double()`` reach
    them with the rest of the network."""

    def __init__(self, T: float, device=None, dtype=None):
        super().__init__()
        if not T > 0:
            raise ValueError(f"T (trial duration) must be positive, got {T}")
        self.T = float(T)
        self.register_buffer("_anchor", torch.empty(0, device=device, dtype=dtype),
                             persistent=False)


class BinnedLatencyEncoder(_Encoder):
    r"""Time-to-first-spike image encoding of the reference (pixel values binned into times).

    Pixel values are binned into ``n_bins + 1`` bins; bin ``i < n_bins`` spikes once at the
    ``i``-th input time (bin 0, the brightest, first), the last bin never spikes. ``n_bins = 1``
    gives a binary image whose bright pixels (>= 128) spike at ``T log(1/0.99)``.

    Args:
        n_bins: number of spiking bins. T: trial duration.
        flip_probability: in training mode, each input's bin is flipped (``i -> n_bins - i``) with
            this probability (the reference's input noise, 0.02); off in ``eval()``.
        input: what the encoder is given, never guessed from the dtype: ``"pixels"`` (default):
            ``uint8`` pixels 0-255 or float intensities in ``[0, 1]``, ``[B, *]``; ``"bins"``:
            integer bins ``[B, N]`` in ``0..n_bins`` computed beforehand, e.g. by
            :class:`spike_bridge.data.BinPixels` in a dataset transform.

    Output: :class:`Spikes` ``[B, N, 1]``.
    """

    def __init__(self, n_bins: int = 1, T: float = 2.0, flip_probability: float = 0.0,
                 input: str = "pixels", device=None, dtype=None):
        super().__init__(T, device, dtype)
        if not 1 <= n_bins <= 99:
            raise ValueError(f"n_bins must be between 1 and 99, got {n_bins}")
        if not 0 <= flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        if input not in ENCODER_INPUTS:
            raise ValueError(
                f"input must be 'pixels' (uint8 0..255 or float in [0, 1]) or 'bins' "
                f"(precomputed bin indices), got {input!r}"
            )
        self.n_bins, self.flip_probability = int(n_bins), float(flip_probability)
        self.input = input

    def forward(self, images: torch.Tensor) -> Spikes:
        return binned_latency_encode(
            images, self.n_bins, self.T,
            flip_probability=self.flip_probability if self.training else 0.0,
            dtype=self._anchor.dtype, device=self._anchor.device, input=self.input,
        )

    def extra_repr(self) -> str:
        return (f"n_bins={self.n_bins}, T={self.T}, flip_probability={self.flip_probability}, "
                f"input={self.input!r}")


class LatencyEncoder(_Encoder):
    r"""Continuous latency encoding ``t = T exp(-x / scale)``, differentiable w.r.t. ``x``.

    Larger inputs spike earlier; ``x <= 0`` gives ``t >= T`` (no spike in the trial), and an input
    approaching 0 from above moves its spike continuously to the trial end, so gradients flow from
    spiking layers into a front end (e.g. ``Conv2d``) without discontinuities.

    Input: ``[B, *]`` float features; output: :class:`Spikes` ``[B, N, 1]`` (features flattened).
    """

    def __init__(self, T: float = 2.0, scale: float = 1.0, device=None, dtype=None):
        super().__init__(T, device, dtype)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)

    def forward(self, features: torch.Tensor) -> Spikes:
        return latency_encode(features, self.T, self.scale)

    def extra_repr(self) -> str:
        return f"T={self.T}, scale={self.scale}"


def _pseudospike_times(spikes: Spikes, readout: nn.Module) -> torch.Tensor:
    """``spikes.filled_times``, refusing inputs without pseudospikes: their silent neurons read
    ``+inf``, so a loss on them is inf/NaN and nothing can learn to make them spike."""
    if spikes.filled_times is None:
        raise ValueError(
            f"{type(readout).__name__}(pseudo=True): the layer before has no pseudospike times "
            "(a LIFLinear layer, a layer with pseudo=False, or an encoder), so silent neurons "
            "would read +inf; use a model with pseudodynamics (ThetaLinear, QIFLinear, "
            f"OscLIFLinear) as the last layer, or {type(readout).__name__}(pseudo=False) for "
            "ordinary spikes only"
        )
    return spikes.filled_times


class FirstSpikeTime(nn.Module):
    r"""Readout: each neuron's first spike time ``[B, N]``.

    With ``pseudo=True`` (default) a silent neuron's first pseudospike time (``>= T``) is used, so
    the readout is continuous in the parameters. With ``pseudo=False`` only ordinary spikes count
    and silent neurons read ``T`` (the reference's "ordinary spikes only" evaluation).
    """

    def __init__(self, pseudo: bool = True):
        super().__init__()
        self.pseudo = pseudo

    def forward(self, spikes: Spikes) -> torch.Tensor:
        if self.pseudo:
            return _pseudospike_times(spikes, self)[..., 0]
        return torch.clamp(spikes.times[..., 0], max=spikes.T)

    def extra_repr(self) -> str:
        return f"pseudo={self.pseudo}"


class SpikeTimes(nn.Module):
    r"""Readout: each neuron's first ``k`` spike times ``[B, N, k]``, pseudospikes filling
    missing ones (``pseudo=True``) or ``+inf`` (``pseudo=False``).
    """

    def __init__(self, k: int, pseudo: bool = True):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k, self.pseudo = int(k), pseudo

    def forward(self, spikes: Spikes) -> torch.Tensor:
        times = _pseudospike_times(spikes, self) if self.pseudo else spikes.times
        if times.shape[-1] < self.k:
            raise ValueError(
                f"SpikeTimes(k={self.k}): the layer before keeps only {times.shape[-1]} spikes "
                f"per neuron; construct it with max_spikes>={self.k}"
            )
        return times[..., : self.k]

    def extra_repr(self) -> str:
        return f"k={self.k}, pseudo={self.pseudo}"


# --------------------------------------------------------------------------------------------
# Convolution and pooling on spike grids
# --------------------------------------------------------------------------------------------

from jax_kernels import conv as conv_kernels  # noqa: E402  (kept with the block that uses it)

_conv_kernel = jax_function(
    conv_kernels.theta_conv_layer,
    static_argnames=("model", "in_shape", "stride", "padding", "T", "max_events", "max_spikes",
                     "pseudo"),
)


def _power_of_two_bucket(n: int) -> int:
    """Event buffer of a convolution: a power of two (at least :data:`EVENT_BUCKET`). Spike grids
    give event counts in the hundreds that vary from batch to batch; doubling buckets keep the
    number of compiled kernels logarithmic, and an empty event step costs only ``C_out k^2``."""
    return max(EVENT_BUCKET, 1 << max(0, n - 1).bit_length())


def _grid_shape(argument: str, value) -> tuple[int, int, int]:
    shape = tuple(value) if isinstance(value, (tuple, list)) else None
    if shape is None or len(shape) != 3 or any(not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"`{argument}` must be (C, H, W), three positive ints, got {value!r}")
    return shape


class SpikingConv2d(nn.Module):
    r"""2-D convolution of theta neurons on spike grids, with exact gradients.

    Neuron ``(o, i, j)`` receives input ``(c, y, x)`` with weight ``weight[o, c, y - i s + p,
    x - j s + p]`` (``s`` stride, ``p`` padding), exactly like ``torch.nn.Conv2d``; it is the
    :class:`ThetaLinear` layer whose weight matrix is that unrolled convolution (initial phases
    shared per output channel), but each input event touches only the ``C_out k^2`` neurons it
    reaches (:mod:`jax_kernels.conv`). Pseudospikes use the drive ``conv(weight, input pseudo
    rates)``, the dense layer's rule. Needs ``T`` below the theta period.

    Args:
        in_shape: ``(C_in, H, W)`` of the input grid. out_channels: ``C_out``.
        kernel_size, stride, padding: ints, as in ``torch.nn.Conv2d`` (square kernels).
        tau, I0: theta neuron parameters (defaults: the reference's ``6/pi``, ``5/4``).
        T, max_spikes, w_scale, pseudo, learn_initial_state, name: as in :class:`SpikingLinear`
            (initial weights uniform in ``+-w_scale / sqrt(C_in k^2)``).

    Shapes:
        input: :class:`Spikes` ``[B, C_in H W, K_in]`` (the grid flattened channel-major);
        output: :class:`Spikes` ``[B, C_out H' W', K]``, ``out_shape = (C_out, H', W')``; a
        following :class:`ThetaLinear` takes it as it is (``in_features = C_out H' W'``).

    Attributes:
        weight: ``[C_out, C_in, k, k]``. initial_state: ``[1, C_out]`` phases at ``t = 0``,
        kept in ``[0, Theta]``.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        tau: float = 6 / math.pi,
        I0: float = 1.25,
        T: float = 2.0,
        max_spikes: int = 8,
        w_scale: float = 0.5,
        pseudo: bool = True,
        learn_initial_state: bool = True,
        name: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_shape = _grid_shape("in_shape", in_shape)
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"`out_channels` must be a positive int, got {out_channels!r}")
        out_hw = conv_kernels.check_conv_geometry(self.in_shape, kernel_size, stride, padding)
        self.model = Theta(tau=tau, I0=I0)
        if not 0 < T < self.model.period:
            raise ValueError(
                f"`T` must be in (0, {self.model.period:g}) (below the theta period, so a "
                f"neuron spikes at most once between its inputs), got {T!r}"
            )
        if max_spikes < 1:
            raise ValueError(f"`max_spikes` must be at least 1, got {max_spikes!r}")
        factory = {"device": device, "dtype": dtype}
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.stride, self.padding = stride, padding
        self.out_shape = (out_channels, *out_hw)
        self.in_features, self.out_features = math.prod(self.in_shape), math.prod(self.out_shape)
        self.T, self.max_spikes = float(T), int(max_spikes)
        self.w_scale, self.pseudo, self.name = float(w_scale), bool(pseudo), name
        self._state_low, self._state_high = _state_bounds(self.model)
        self.weight = nn.Parameter(
            torch.empty(out_channels, self.in_shape[0], kernel_size, kernel_size, **factory)
        )
        state = torch.empty(1, out_channels, **factory)
        if learn_initial_state:
            self.initial_state = nn.Parameter(state)
            _BoundedStates.register(self)
        else:
            self.register_buffer("initial_state", state)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights ``+-w_scale / sqrt(C_in k^2)``, initial phases ``Theta / 2``."""
        bound = self.w_scale / math.sqrt(self.in_shape[0] * self.kernel_size ** 2)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.initial_state.fill_(self.model.period / 2)

    def clamped_initial_state(self) -> torch.Tensor:
        """``initial_state`` projected onto ``[0, Theta]`` (differentiable inside)."""
        return torch.clamp(self.initial_state, self._state_low[0], self._state_high[0])

    def _name(self) -> str:
        return self.name or (f"SpikingConv2d({self.in_shape}->{self.out_shape}, "
                             f"k={self.kernel_size})")

    def forward(self, spikes: Spikes) -> Spikes:
        spikes = _check_spikes(
            spikes, self, self.in_features, self.T, self.weight.dtype, self.weight.device
        )
        times = spikes.times
        in_trial = (times < self.T).sum((1, 2)).max() if times.numel() else times.new_zeros(())
        invalid = (torch.isnan(times) | (times < 0)).sum()
        n_events, n_invalid = _host_ints(in_trial, invalid)
        if n_invalid:
            raise ValueError(
                f"{self._name()}: {n_invalid} input spike times are NaN or negative; spike "
                "times must be >= 0 (use +inf for 'no spike')"
            )
        rate = spikes.pseudo_rate if self.pseudo else None
        out = _conv_kernel(
            self.weight, self.clamped_initial_state(), times, rate, model=self.model,
            in_shape=self.in_shape, stride=self.stride, padding=self.padding, T=self.T,
            max_events=_power_of_two_bucket(n_events), max_spikes=self.max_spikes,
            pseudo=self.pseudo,
        )
        (most_spikes,) = _host_ints(out.spike_count.max())
        if most_spikes > self.max_spikes:
            raise BufferOverflowError(
                f"{self._name()}: a neuron spiked {most_spikes} times but max_spikes="
                f"{self.max_spikes}; construct the layer with max_spikes>={most_spikes}"
            )
        return Spikes(
            times=out.spike_times, T=self.T,
            filled_times=out.filled_times if self.pseudo else None,
            pseudo_rate=out.pseudo_rate if self.pseudo else None,
            spike_count=out.spike_count,
        )

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"out_shape={self.out_shape}, model={self.model}, T={self.T}, "
                f"max_spikes={self.max_spikes}, pseudo={self.pseudo}")


class EarliestSpikePool2d(nn.Module):
    r"""Spike pooling: each window passes on its earliest spikes (differentiable in the times).

    Output neuron ``(c, i, j)`` carries the ``K`` earliest spike times of the input neurons in its
    ``kernel_size x kernel_size`` window (of channel ``c``); pseudospike-filled times are pooled
    the same way and pseudo rates by their maximum, so the pooled values stay continuous.

    Args:
        in_shape: ``(C, H, W)`` of the input grid; kernel_size; stride (default
            ``kernel_size``), as ``torch.nn.MaxPool2d`` without padding.

    Shapes: input :class:`Spikes` ``[B, C H W, K]``; output ``[B, C H' W', K]``,
    ``out_shape = (C, H', W')``.
    """

    def __init__(self, in_shape: tuple[int, int, int], kernel_size: int,
                 stride: Optional[int] = None):
        super().__init__()
        self.in_shape = _grid_shape("in_shape", in_shape)
        stride = kernel_size if stride is None else stride
        out_hw = conv_kernels.check_conv_geometry(self.in_shape, kernel_size, stride, 0)
        self.kernel_size, self.stride = kernel_size, stride
        self.out_shape = (self.in_shape[0], *out_hw)

    def _pool(self, values: torch.Tensor, k: Optional[int]) -> torch.Tensor:
        """``[B, C H W, *K]`` -> ``[B, C H' W', *K]``: the ``k`` smallest per window (``k =
        None``: the maximum of ``[B, C H W]``)."""
        batch = values.shape[0]
        grid = values.reshape(batch, *self.in_shape, -1)
        windows = grid.unfold(2, self.kernel_size, self.stride).unfold(
            3, self.kernel_size, self.stride)  # [B, C, H', W', K, k, k]
        windows = windows.flatten(-3)
        if k is None:
            return windows.amax(-1).reshape(batch, -1)
        return (-torch.topk(-windows, k, dim=-1).values).reshape(batch, -1, k)

    def forward(self, spikes: Spikes) -> Spikes:
        if not isinstance(spikes, Spikes):
            raise TypeError(f"{self}: expected a spike_bridge Spikes value, got "
                            f"{type(spikes).__name__}")
        n_in = math.prod(self.in_shape)
        if spikes.times.dim() != 3 or spikes.times.shape[1] != n_in:
            raise ValueError(
                f"{self}: input spike times must have shape [batch, {n_in}, spikes] (in_shape "
                f"{self.in_shape} flattened), got {list(spikes.times.shape)}"
            )
        k = spikes.times.shape[-1]
        times = self._pool(spikes.times, k)
        filled, rate = spikes.filled_times, spikes.pseudo_rate
        return Spikes(
            times=times, T=spikes.T,
            filled_times=None if filled is None else self._pool(filled, k),
            pseudo_rate=None if rate is None else self._pool(rate, None),
            spike_count=(times < spikes.T).sum(-1),
        )

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"out_shape={self.out_shape}")
