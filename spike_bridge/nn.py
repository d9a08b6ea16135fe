"""Spiking layers, encoders and readouts as ``torch.nn.Module`` drop-ins.

A network is an ``nn.Sequential`` (or any module) of an encoder, spiking layers and a readout; the
layers pass :class:`~spike_bridge.spikes.Spikes` values between them::

    net = nn.Sequential(
        BinnedLatencyEncoder(n_bins=1, T=2.0),
        ThetaLinear(784, 100), ThetaLinear(100, 100), ThetaLinear(100, 10),
        FirstSpikeTime(),
    )
    first_times = net(images)        # [B, 10], train with any torch.optim optimizer

Each spiking layer simulates its neurons event by event in JAX (exact spike times, exact
gradients) and computes pseudospike times for missing spikes, so gradient descent can add and
remove spikes. Times are in units of the neuron time constant ``tau``.

Buffers: a layer keeps at most ``max_spikes`` spikes per neuron (and a recurrent network or a
layer on continuous input times ``max_events`` events). With ``"auto"`` (the default) the layer
remembers a size, grows it when a call needs more and reruns that call before anyone reads its
outputs, and shrinks it when calls leave it mostly empty; the size is saved in ``state_dict()``. A fixed int raises :class:`BufferOverflowError`
instead. Either way nothing is truncated silently, and the check costs one device-to-host
transfer per network call: layers hand their outputs on unchecked, and the first read of a
value (usually by the readout) checks all layers that led to it at once (see
:class:`~spike_bridge.spikes.Spikes`).

Under ``torch.compile`` (``fullgraph=True`` too) that check is the custom op
``spike_bridge::check_buffers`` inside the graph (no graph break): it reads the statuses when the
compiled graph runs and raises :class:`BufferOverflowError` for a fixed buffer; an ``"auto"``
buffer that was too small grows and the call raises as well (``grown_to`` set), since the graph
was traced with the old size: the next call recompiles for the new size.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from jax_kernels import layers as kernel_layers
from jax_kernels.models import MODELS, NeuronModel, PseudoNeuronModel, get_model
from spike_bridge.bridge import jax_function, register_static_type, scoped_x64
from spike_bridge.functional import (
    ENCODER_INPUTS,
    binned_latency_encode,
    check_min_intensity,
    intensity_latency_encode,
    latency_encode,
)
from spike_bridge.spikes import BinnedInput, Spikes

__all__ = [
    "BinnedLatencyEncoder",
    "BufferOverflowError",
    "EarliestSpikePool2d",
    "FirstSpikeTime",
    "IntensityLatencyEncoder",
    "LIFLinear",
    "LatencyEncoder",
    "OscLIFLinear",
    "QIFLinear",
    "QIFRecurrent",
    "SpikeTimes",
    "SpikingConv2d",
    "SpikingLinear",
    "SpikingRecurrent",
    "ThetaLinear",
    "spiking_layers",
]

#: Event buffers are multiples of this beyond it (``jax_kernels.layers.buffer_size``).
EVENT_BUCKET = 16
#: Largest sizes that ``"auto"`` buffers grow to; beyond, BufferOverflowError is raised.
AUTO_LIMITS = {"max_spikes": 1024, "max_events": 1 << 16, "max_input_spikes": 1 << 20}
#: An ``"auto"`` buffer shrinks when this many checked calls in a row needed at most half of a
#: smaller size, since the cost of a layer grows with its buffers. Spike slots (a power of two)
#: shrink to twice the need after 8 calls; so does an event buffer still at its starting size (a
#: guess). An event buffer sized by the data before (it grew or shrank) waits for 32 calls and
#: shrinks only once the need fell to half of it, to 5/4 of the need: the busiest sample of a
#: batch sets its need, which varies twofold between training batches, and every size that
#: growth and shrinking alternate between is another compiled program.
SHRINK_AFTER_CALLS = {"max_spikes": 8, "events": 32, "events_at_starting_size": 8}

#: Layer defaults of neuron models given by name where they differ from the model's own: theta
#: neurons of the reference MNIST setup (``tau = 6/pi``, so that the free period is 6).
LAYER_DEFAULTS: dict[str, dict[str, float]] = {"theta": {"tau": 6 / math.pi}}

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

BufferSize = Union[int, str]


class BufferOverflowError(RuntimeError):
    """A spike or event buffer was too small for the data.

    Attributes:
        layer: the spiking layer (module) whose buffer overflowed.
        buffer: ``"max_spikes"`` (spikes per neuron) or ``"max_events"`` (event steps).
        needed: a size that fits this call.
        size: the size the call had.
        grown_to: under ``torch.compile``, the size an ``"auto"`` buffer grew to (the next call
            recompiles for it); ``None`` for a fixed buffer.
    """

    def __init__(self, layer: nn.Module, buffer: str, needed: int, size: int, reason: str = "",
                 grown_to: Optional[int] = None):
        self.layer, self.buffer, self.needed, self.size = layer, buffer, int(needed), int(size)
        self.grown_to = grown_to
        what = reason or (
            f"a neuron spiked {needed} times" if buffer == "max_spikes"
            else f"a sample needs {needed} events"
        )
        advice = (
            f"construct the layer with {buffer}>={needed}, or {buffer}='auto' to let it grow"
            if grown_to is None else
            f"the 'auto' buffer grew to {grown_to}, but this torch.compile graph was traced "
            f"with {buffer}={size}: call the network again (it recompiles once for the new "
            "size), or let the sizes settle in eager mode first (they are saved in state_dict)"
        )
        super().__init__(f"{layer._name()}: {what} but {buffer}={size}; {advice}")

    def __reduce__(self):
        return (RuntimeError, (str(self),))


def _resolve_model(model: Union[str, NeuronModel], params: dict[str, Any]) -> NeuronModel:
    """A model instance from a registered name (with ``LAYER_DEFAULTS``) or an instance."""
    if isinstance(model, str):
        key = model.lower()
        if key not in MODELS:
            raise ValueError(
                f"unknown neuron model {model!r}; registered models (jax_kernels.models.MODELS): "
                f"{', '.join(sorted(MODELS))}, or pass a model instance"
            )
        return get_model(key, **{**LAYER_DEFAULTS.get(key, {}), **params})
    if not isinstance(model, NeuronModel):
        raise TypeError(
            f"model must be a registered name ({', '.join(sorted(MODELS))}) or a NeuronModel "
            f"instance, got {type(model).__name__}"
        )
    model = model.replace(**params) if params else model
    register_static_type(type(model))  # under torch.compile static arguments cross torch's pytree
    return model


def _buffer_size(name: str, value: BufferSize, initial: int) -> tuple[int, bool]:
    """``(size, adaptive)`` from ``"auto"`` or a positive int."""
    if isinstance(value, str) and value == "auto":
        return initial, True
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be 'auto' or a positive int, got {value!r}")
    return int(value), False


def _rounded(n: int) -> int:
    """Event buffer sizes on the grid of ``jax_kernels.layers.buffer_size`` (few compiled
    shapes)."""
    return kernel_layers.buffer_size(n, EVENT_BUCKET)


def _host_ints(values: torch.Tensor) -> list:
    """Integers from the device in one transfer (the only device-to-host read of the layers)."""
    return values.tolist()


#: Entries of a layer call's status vector (int64 on the layer's device): what the call needed
#: of each buffer, and the number of invalid (NaN or negative) input times.
_STATUS = ("max_spikes", "max_events", "max_input_spikes", "invalid_inputs")


class _LayerCall:
    """An unchecked call of a spiking layer: what checking it and rerunning it take.

    The parameters and buffers the call used are kept (they may have been swapped in by
    ``torch.func.functional_call``), so a rerun computes what the call would have computed.
    """

    __slots__ = ("layer", "input", "status", "sizes", "grad_enabled", "tensors", "versions")

    def __init__(self, layer: "_SpikingLayer", input: Spikes, status: torch.Tensor,
                 sizes: dict[str, int]):
        self.layer, self.input, self.status, self.sizes = layer, input, status, sizes
        self.grad_enabled = torch.is_grad_enabled()
        if torch.compiler.is_compiling():  # checked by the check_buffers op, never rerun
            self.tensors, self.versions = {}, {}
            return
        self.tensors = dict(itertools.chain(layer.named_parameters(recurse=False),
                                            layer.named_buffers(recurse=False)))
        self.versions = {name: tensor._version for name, tensor in self.tensors.items()}

    def check(self, spikes: Spikes) -> None:
        _check_calls(spikes)

    def rerun(self, grad_enabled: Optional[bool] = None) -> Spikes:
        """The layer's output for the same input and parameters, with its current buffers
        (with gradients if the call had them, unless ``grad_enabled`` says otherwise)."""
        for name, tensor in self.tensors.items():
            if tensor._version != self.versions[name]:
                raise RuntimeError(
                    f"{self.layer._name()}: `{name}` was changed in place (e.g. by "
                    "optimizer.step()) after a call whose outputs are read only now; read a "
                    "network's outputs (e.g. compute the loss) before changing its parameters"
                )
        swapped = any(getattr(self.layer, name) is not tensor
                      for name, tensor in self.tensors.items())
        grad_enabled = self.grad_enabled if grad_enabled is None else grad_enabled
        with torch.set_grad_enabled(grad_enabled), (
            _reparametrize_module(self.layer, self.tensors) if swapped
            else contextlib.nullcontext()
        ):
            return self.layer._run(self.input)


def _unchecked_chain(spikes: Spikes) -> list[Spikes]:
    """The unchecked layer outputs that led to ``spikes``, first layer first."""
    chain = []
    while spikes is not None and spikes._call is not None:
        chain.append(spikes)
        spikes = spikes._call.input
    chain.reverse()
    return chain


def _check_calls(spikes: Spikes) -> None:
    """Check every unchecked layer call behind ``spikes`` with one transfer; rerun overflowed
    calls (and the calls after them) with grown buffers, then check those again."""
    if torch.compiler.is_compiling():
        _check_calls_in_graph(spikes)
        return
    while True:
        chain = _unchecked_chain(spikes)
        if not chain:
            return
        device = chain[-1]._call.status.device
        rows = _host_ints(torch.stack([s._call.status.to(device) for s in chain]))
        first_rerun = None
        for index, (output, row) in enumerate(zip(chain, rows)):
            call = output._call
            if call.layer._apply_status(dict(zip(_STATUS, row)), call) and first_rerun is None:
                first_rerun = index
        for output in chain[: len(chain) if first_rerun is None else first_rerun]:
            output._call = None
        if first_rerun is None:
            return
        for output in chain[first_rerun:]:
            output._assign(output._call.rerun())


# -- the check under torch.compile ---------------------------------------------------------------
#
# A host read in the traced forward would be a graph break (and an error with fullgraph=True), and
# a rerun with grown buffers would change the graph's shapes. Under compilation the calls are
# checked by the custom op below instead: opaque to dynamo, it reads all statuses with one
# transfer when the compiled graph runs and raises BufferOverflowError (a fixed buffer) or grows
# the "auto" buffer and raises (the graph was traced with the old size; the next call recompiles,
# since dynamo guards on the size attributes). It is given each call's input as well: on those
# error paths it reruns the call eagerly to measure the true need, as the eager check does. Its
# zero output is added to the values that were read, so that no compiler drops it as unused.

#: Spiking layers by ``_registry_key`` (an int is what a compiled graph can hold of a layer).
_LAYER_REGISTRY: "weakref.WeakValueDictionary[int, _SpikingLayer]" = weakref.WeakValueDictionary()
_LAYER_NUMBERS = itertools.count()
#: Buffers of a status row, in order (``_STATUS`` without the invalid-input count).
_BUFFERS = _STATUS[:3]


@torch.library.custom_op("spike_bridge::check_buffers", mutates_args=())
def _check_buffers_op(
    statuses: list[torch.Tensor], input_times: list[torch.Tensor],
    input_rates: list[Optional[torch.Tensor]], input_bins: list[Optional[torch.Tensor]],
    layers: list[int], sizes: list[int], bin_times: list[float], bin_counts: list[int],
) -> torch.Tensor:
    """Check layer calls made in a compiled graph; returns a zero (int64, ``[]``) or raises.

    Per call ``i``: ``statuses[i]`` (``[4]`` int64, see ``_STATUS``), its input (times ``[B, N,
    K]``, pseudo rates ``[B, N]`` or None, bin indices ``[B, N]`` or None with
    ``bin_counts[i]`` bin times in ``bin_times``), ``layers[i]`` (registry key) and the buffer
    sizes it was traced with (``sizes[3 i : 3 i + 3]``, ``-1``: not used).
    """
    device = statuses[-1].device
    rows = _host_ints(torch.stack([status.to(device) for status in statuses]))
    bin_offsets = list(itertools.accumulate(bin_counts, initial=0))
    for index, (key, row) in enumerate(zip(layers, rows)):
        layer = _LAYER_REGISTRY[key]
        call_sizes = {buffer: size for buffer, size in zip(_BUFFERS, sizes[3 * index:3 * index + 3])
                      if size >= 0}
        status = dict(zip(_STATUS, row))
        if all(status[b] <= size for b, size in call_sizes.items()) and not status["invalid_inputs"]:
            continue
        bins = input_bins[index]
        binned = None if bins is None else BinnedInput(
            bins, tuple(bin_times[bin_offsets[index]:bin_offsets[index + 1]]))
        input = Spikes(input_times[index], layer.T, pseudo_rate=input_rates[index], binned=binned)
        call = _LayerCall(layer, input, statuses[index], call_sizes)
        if not layer._apply_status(status, call):  # raises for a fixed buffer
            continue
        # An "auto" buffer grew (the counts of the layers after it are of truncated inputs, not
        # judged). Grow it to the true need at once, so that one recompile is enough.
        buffer = next(b for b, size in call_sizes.items()
                      if status[b] > size and layer._adaptive[b])
        needed = layer._true_need(buffer, status[buffer], call)
        setattr(layer, buffer, max(getattr(layer, buffer),
                                   layer._grown(buffer, needed, call_sizes[buffer])))
        raise BufferOverflowError(layer, buffer, needed, call_sizes[buffer],
                                  grown_to=getattr(layer, buffer))
    return torch.zeros((), dtype=torch.int64, device=device)


@_check_buffers_op.register_fake
def _check_buffers_fake(statuses, input_times, input_rates, input_bins, layers, sizes, bin_times,
                        bin_counts) -> torch.Tensor:
    return statuses[-1].new_zeros(())


def _check_calls_in_graph(spikes: Spikes) -> None:
    """Under torch.compile: check the calls behind ``spikes`` with the check_buffers op (in the
    graph, no graph break) and make ``spikes``'s values depend on it."""
    chain = _unchecked_chain(spikes)
    calls = [s._call for s in chain if isinstance(s._call.layer, _SpikingLayer)]
    for output in chain:
        output._call = None
    if not calls:
        return
    binned = [call.input.binned for call in calls]
    zero = _check_buffers_op(
        [call.status for call in calls],
        [call.input._times for call in calls],
        [call.input._pseudo_rate for call in calls],
        [None if b is None else b.bin_index for b in binned],
        [call.layer._registry_key for call in calls],
        [call.sizes.get(buffer, -1) for call in calls for buffer in _BUFFERS],
        [float(t) for b in binned if b is not None for t in b.bin_times],
        [0 if b is None else len(b.bin_times) for b in binned],
    )
    spikes._times = spikes._times + zero.to(spikes._times.dtype)
    if spikes._filled_times is not None:
        spikes._filled_times = spikes._filled_times + zero.to(spikes._filled_times.dtype)
    if spikes._pseudo_rate is not None:
        spikes._pseudo_rate = spikes._pseudo_rate + zero.to(spikes._pseudo_rate.dtype)
    if spikes._spike_count is not None:
        spikes._spike_count = spikes._spike_count + zero.to(spikes._spike_count.dtype)


def spiking_layers(net: nn.Module) -> list[nn.Module]:
    """The spiking layers of ``net`` (``SpikingLinear``, ``SpikingRecurrent``), in module order."""
    return [module for module in net.modules() if isinstance(module, _SpikingLayer)]


def _check_spikes(spikes: object, layer: nn.Module, n_inputs: int, T: float,
                  dtype: torch.dtype, device: torch.device) -> Spikes:
    """Checks that need no device read (the values are checked with the layer's status)."""
    if not isinstance(spikes, Spikes):
        raise TypeError(
            f"{layer._name()}: expected a spike_bridge Spikes value (from an encoder or a spiking "
            f"layer), got {type(spikes).__name__}; put an encoder such as BinnedLatencyEncoder "
            "or LatencyEncoder in front of the first spiking layer"
        )
    times = spikes._times
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


def _invalid_times(times: torch.Tensor) -> torch.Tensor:
    return (torch.isnan(times) | (times < 0)).sum()


class _SpikingLayer(nn.Module):
    """What all spiking layers share: the neuron model, initial states kept in the model's
    valid range, adaptive buffers (saved as extra state) and the check of their calls.

    Subclasses set ``self.model``, ``self.T``, call :meth:`_init_buffers` and
    :meth:`_init_initial_state`, and implement ``_run(spikes) -> Spikes``.
    """

    name: Optional[str]
    def __init__(self) -> None:
        super().__init__()
        self._register()

    def _register(self) -> None:
        """A key of its own in ``_LAYER_REGISTRY`` (how a compiled graph's check finds it)."""
        self._registry_key = next(_LAYER_NUMBERS)
        _LAYER_REGISTRY[self._registry_key] = self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._register()  # a copy (copy.deepcopy, pickle) is a layer of its own

    def _init_buffers(self, **sizes: tuple[BufferSize, int]) -> None:
        """``name=(value, initial size)`` for each buffer: ``"auto"`` or a fixed int."""
        self._adaptive: dict[str, bool] = {}
        for buffer, (value, initial) in sizes.items():
            size, adaptive = _buffer_size(buffer, value, initial)
            setattr(self, buffer, size)
            self._adaptive[buffer] = adaptive
        self._recent_needs: list[dict[str, int]] = []
        self._sized_by_data: set[str] = set()  # buffers that grew or shrank (or were loaded)

    def _init_initial_state(self, size: int, learnable: bool, factory: dict) -> None:
        """``initial_state [D, size]`` and the model's state bounds ``[D, 1]`` (buffers)."""
        import jax.numpy as jnp

        model = self.model
        with scoped_x64():
            low = model.clip_state(jnp.full((model.state_size, 1), -jnp.inf))
            high = model.clip_state(jnp.full((model.state_size, 1), jnp.inf))
            default = model.default_initial_state(jnp.float64)
            low, high, default = (
                [float(v) for v in a.reshape(-1)] for a in (low, high, default)
            )
        dtype = factory.get("dtype") or torch.get_default_dtype()
        device = factory.get("device")
        self.register_buffer("_state_low", torch.tensor(low, dtype=dtype, device=device)[:, None],
                             persistent=False)
        self.register_buffer("_state_high",
                             torch.tensor(high, dtype=dtype, device=device)[:, None],
                             persistent=False)
        self.register_buffer("_default_state",
                             torch.tensor(default, dtype=dtype, device=device)[:, None],
                             persistent=False)
        state = torch.empty(model.state_size, size, **factory)
        if learnable:
            self.initial_state = nn.Parameter(state)
        else:
            self.register_buffer("initial_state", state)

    # -- initial states ------------------------------------------------------------------------

    def clamped_initial_state(self) -> torch.Tensor:
        """``initial_state`` projected onto the model's valid range (differentiable inside)."""
        return torch.clamp(self.initial_state, self._state_low, self._state_high)

    @torch.no_grad()
    def project_initial_state_(self) -> None:
        """Project ``initial_state`` onto the model's valid range, in place.

        Called at the start of every forward and by ``state_dict()``, so after any optimizer
        step the states a call uses, and those a checkpoint holds, are valid (the reference
        clips after each step); a copy (``copy.deepcopy``, pickle) behaves the same. Works
        through ``.data``, so graphs of earlier calls that saved the parameter stay valid.
        """
        self.initial_state.data.copy_(self.clamped_initial_state().detach())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.project_initial_state_()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- buffers ---------------------------------------------------------------------------------

    def _buffer_repr(self, buffer: str) -> str:
        size = getattr(self, buffer)
        return f"{buffer}=auto({size})" if self._adaptive[buffer] else f"{buffer}={size}"

    def get_extra_state(self) -> dict[str, int]:
        """The current buffer sizes, so that a checkpoint reloads into the same shapes."""
        return {buffer: int(getattr(self, buffer)) for buffer in self._adaptive}

    def set_extra_state(self, state: dict[str, int]) -> None:
        """Adopt saved sizes of ``"auto"`` buffers (fixed sizes stay as constructed)."""
        for buffer, size in dict(state).items():
            if self._adaptive.get(buffer):
                setattr(self, buffer, max(int(size), 1))
                self._sized_by_data.add(buffer)

    def _apply_status(self, status: dict[str, int], call: _LayerCall) -> bool:
        """React to a call's status: raise for invalid inputs or a fixed buffer that was too
        small; grow ``"auto"`` buffers that were too small. Returns whether one grew."""
        if status["invalid_inputs"]:
            raise ValueError(
                f"{self._name()}: {status['invalid_inputs']} input spike times are NaN or "
                "negative; spike times must be >= 0 (use +inf for 'no spike')"
            )
        # Grow "auto" buffers first: while any of them was too small, the call's other counts
        # may be wrong too (e.g. spikes of truncated input events), so a fixed buffer is only
        # judged by a call whose adaptive buffers fitted.
        grew, fixed_overflows = False, []
        for buffer, size in call.sizes.items():
            needed = status[buffer]
            if needed <= size:
                continue
            if not self._adaptive[buffer]:
                fixed_overflows.append((buffer, needed, size))
            elif needed > AUTO_LIMITS[buffer]:
                raise self._overflow_error(buffer, needed, size, call)
            else:
                setattr(self, buffer, max(getattr(self, buffer), self._grown(buffer, needed, size)))
                self._sized_by_data.add(buffer)
                grew = True
        if fixed_overflows and not grew:
            raise self._overflow_error(*fixed_overflows[0], call)
        if not grew:
            self._shrink_if_oversized(status, call)
        return grew

    def _grown(self, buffer: str, needed: int, size: int) -> int:
        """A size for ``buffer`` that holds ``needed`` (> ``size``)."""
        if buffer == "max_spikes":
            return 1 << max(needed - 1, size).bit_length()  # power of two, > size, >= needed
        return _rounded(max(needed, size + 1))

    def _shrink_if_oversized(self, status: dict[str, int], call: _LayerCall) -> None:
        """Shrink ``"auto"`` buffers that the last :data:`SHRINK_AFTER_CALLS` calls all left
        mostly empty (see :data:`SHRINK_AFTER_CALLS`; same rounding as growth)."""
        needs = {buffer: status[buffer] for buffer in call.sizes if self._adaptive[buffer]}
        window = max(SHRINK_AFTER_CALLS.values())
        self._recent_needs = [*self._recent_needs, needs][-window:]
        shrunk = False
        for buffer, need in needs.items():
            calls = SHRINK_AFTER_CALLS[
                "max_spikes" if buffer == "max_spikes"
                else "events" if buffer in self._sized_by_data else "events_at_starting_size"]
            if len(self._recent_needs) < calls:
                continue
            need = max(recent.get(buffer, 0) for recent in self._recent_needs[-calls:])
            size = getattr(self, buffer)
            if buffer == "max_spikes":
                smaller = self._grown(buffer, 2 * need, 0)
            elif 2 * need <= size:
                smaller = self._grown(buffer, need + need // 4 + 1, 0)
            else:
                continue
            if smaller < size:
                setattr(self, buffer, smaller)
                self._sized_by_data.add(buffer)
                shrunk = True
        if shrunk:  # the calls so far needed sizes as they were
            self._recent_needs = []

    def _overflow_error(self, buffer: str, needed: int, size: int,
                        call: _LayerCall) -> BufferOverflowError:
        return BufferOverflowError(self, buffer, self._true_need(buffer, needed, call), size)

    def _true_need(self, buffer: str, needed: int, call: _LayerCall) -> int:
        """What a call that overflowed ``buffer`` needs. A kernel may report only a lower bound
        (it stops counting when its buffer is full, or a recurrent run stops early), so this
        reruns the call without gradient, on this error path only, with larger buffers until
        it fits."""
        if call.input is None:
            return needed
        saved = {name: getattr(self, name) for name in self._adaptive}
        trial = self._grown(buffer, needed, needed - 1)
        try:
            with torch.no_grad():
                for _ in range(32):
                    setattr(self, buffer, trial)
                    row = _host_ints(call.rerun(grad_enabled=False)._call.status)
                    status = dict(zip(_STATUS, row))
                    others = [name for name in self._adaptive
                              if name != buffer and status[name] > getattr(self, name)]
                    for name in others:  # an adaptive buffer the trial needs as well
                        setattr(self, name, self._grown(name, status[name], getattr(self, name)))
                    if others:
                        continue
                    needed = status[buffer]
                    if needed <= trial:  # it fits: the count is exact
                        break
                    trial = self._grown(buffer, needed, trial)
        finally:
            for name, size in saved.items():
                setattr(self, name, size)
        return needed

    def _finish(self, result: Spikes, input: Spikes, status: torch.Tensor,
                sizes: dict[str, int]) -> Spikes:
        """Attach the call's status to its output: checked when the output is first read."""
        result._call = _LayerCall(self, input, status, sizes)
        return result

    def _name(self) -> str:
        return self.name or f"{type(self).__name__}({self._sizes_text()})"

    def forward(self, spikes: Spikes) -> Spikes:
        spikes = self._check_input(spikes)
        self.project_initial_state_()
        if spikes._times.shape[0] == 0:
            return self._empty_output()
        return self._run(spikes)


class _FeedforwardLayer(_SpikingLayer):
    """What the feedforward layers (:class:`SpikingLinear`, :class:`SpikingConv2d`) share: one
    ``weight`` whose first axis is the output (neuron or channel) and whose other axes are the
    fan-in, initial states, buffers ``max_spikes`` / ``max_events``, the input checks and the
    empty output of a batch of size 0.

    Subclasses set ``self.model``, ``in_features``, ``out_features`` and call
    :meth:`_init_feedforward`.
    """

    #: Parameters that are weights (for :func:`spike_bridge.optim.parameter_groups`).
    weight_decay_parameters = ("weight",)

    def _init_feedforward(self, weight_shape: tuple[int, ...], n_states: int, T: float,
                          max_spikes: BufferSize, max_events: BufferSize, w_scale: float,
                          pseudo: bool, learn_initial_state: bool, name: Optional[str],
                          factory: dict, **extra_buffers: tuple[BufferSize, int]) -> None:
        """Attributes, buffers (``max_spikes`` from 8, ``max_events`` from
        :data:`EVENT_BUCKET`, ``extra_buffers`` as :meth:`_init_buffers`), ``weight``
        ``weight_shape`` and ``initial_state [D, n_states]``, then :meth:`reset_parameters`."""
        self.T, self.w_scale, self.pseudo, self.name = float(T), float(w_scale), bool(pseudo), name
        self._init_buffers(max_spikes=(max_spikes, 8), max_events=(max_events, EVENT_BUCKET),
                           **extra_buffers)
        self.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
        self._init_initial_state(n_states, learn_initial_state, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: weights uniform in ``+-w_scale / sqrt(fan_in)``, the
        model's default initial states."""
        bound = self.w_scale / math.sqrt(self.weight[0].numel())
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.initial_state.copy_(self._default_state.expand_as(self.initial_state))

    @property
    def _pseudo_active(self) -> bool:
        return self.pseudo and isinstance(self.model, PseudoNeuronModel)

    def _check_input(self, spikes: Spikes) -> Spikes:
        return _check_spikes(
            spikes, self, self.in_features, self.T, self.weight.dtype, self.weight.device
        )

    def _empty_output(self) -> Spikes:
        shape = (0, self.out_features, self.max_spikes)
        empty = self.weight.new_empty(shape)
        return Spikes(empty, self.T, filled_times=empty if self._pseudo_active else None,
                      pseudo_rate=self.weight.new_empty(shape[:2]) if self._pseudo_active else None,
                      spike_count=torch.zeros(shape[:2], dtype=torch.int32,
                                              device=self.weight.device))


class SpikingLinear(_FeedforwardLayer):
    r"""Fully connected feedforward layer of spiking neurons (any registered neuron model).

    Every input spike reaches every neuron with weight ``weight[i, j]``. The neurons are simulated
    exactly between input events; their ordinary spikes (up to ``max_spikes`` per neuron) and, for
    models with pseudodynamics, their pseudospike times and pseudo rates are passed on.

    Args:
        in_features: ``N_in``; out_features: ``N``.
        model: a registered model name (``jax_kernels.models.MODELS``: ``"theta"``, ``"qif"``,
            ``"lif"``, ``"osclif"``) built with ``**model_params`` (theta: ``tau = 6/pi`` unless
            given), or a neuron model instance.
        T: trial duration.
        max_spikes: spike buffer per neuron ``K``: ``"auto"`` (starts at 8, grows as needed,
            shrinks when mostly unused, saved in ``state_dict``) or a fixed int (more spikes raise
            :class:`BufferOverflowError`).
        max_events: input event buffer ``E`` for continuous input times (not binned input):
            ``"auto"`` (starts at 16) or a fixed int.
        w_scale: initial weights are uniform in ``+-w_scale / sqrt(in_features)``.
        pseudo: compute pseudospikes (``False``: ordinary spikes only).
        learn_initial_state: whether the initial states are a ``Parameter`` (else a buffer).
        name: used in error messages (default: class and sizes).
        **model_params: parameters of a model given by name, e.g. ``tau=1.0, I0=1.5``.

    Shapes:
        input: :class:`Spikes` with ``times [B, N_in, K_in]``; output: :class:`Spikes` with
        ``times``/``filled_times`` ``[B, N, K]``, ``pseudo_rate`` and ``spike_count`` ``[B, N]``.
        ``B = 0`` gives empty outputs of these shapes.

    Attributes:
        weight: ``[N, N_in]``. initial_state: ``[D, N]`` states at ``t = 0`` (``D`` =
        ``len(model.state_names)``), kept in the model's valid range.
        max_spikes, max_events: the current buffer sizes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        model: Union[str, NeuronModel] = "theta",
        T: float = 2.0,
        max_spikes: BufferSize = "auto",
        max_events: BufferSize = "auto",
        w_scale: float = 0.5,
        pseudo: bool = True,
        learn_initial_state: bool = True,
        name: Optional[str] = None,
        device=None,
        dtype=None,
        **model_params: float,
    ):
        super().__init__()
        for argument, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{argument} must be a positive int, got {value!r}")
        if not T > 0:
            raise ValueError(f"T (trial duration) must be positive, got {T}")
        self.in_features, self.out_features = in_features, out_features
        self.model = _resolve_model(model, model_params)
        # max_input_spikes: the gathered input spikes of a fused event buffer (internal, always
        # adaptive; jax_kernels.layers.event_buffer_sizes decides whether it is used).
        self._init_feedforward(
            (out_features, in_features), out_features, T, max_spikes, max_events, w_scale,
            pseudo, learn_initial_state, name, {"device": device, "dtype": dtype},
            max_input_spikes=("auto", EVENT_BUCKET),
        )

    def _sizes_text(self) -> str:
        return f"{self.in_features}->{self.out_features}"

    def _run(self, spikes: Spikes) -> Spikes:
        initial_state = self.clamped_initial_state()
        pseudo = self._pseudo_active
        times = spikes._times
        zero = torch.zeros((), dtype=torch.int64, device=self.weight.device)
        if spikes.binned is not None and not times.requires_grad:
            sizes = {"max_spikes": self.max_spikes}
            out = _binned_layer_kernel(
                self.weight, initial_state, spikes.binned.bin_index,
                bin_times=spikes.binned.bin_times, model=self.model, T=self.T,
                max_spikes=self.max_spikes, pseudo=pseudo,
            )
            events_needed, input_spikes_needed, invalid = zero, zero, zero
        else:
            slots = times.shape[1] * times.shape[2]
            _, max_input_spikes = kernel_layers.event_buffer_sizes(
                self.max_events, self.max_input_spikes, slots, EVENT_BUCKET
            )
            sizes = {"max_spikes": self.max_spikes, "max_events": self.max_events,
                     "max_input_spikes": slots if max_input_spikes is None else max_input_spikes}
            rate = spikes._pseudo_rate if pseudo else None
            out = _layer_kernel(
                self.weight, initial_state, times, rate, model=self.model, T=self.T,
                max_events=self.max_events, max_spikes=self.max_spikes, pseudo=pseudo,
                max_input_spikes=max_input_spikes,
            )
            invalid = _invalid_times(times)
            # The kernel counts what the inputs need, also beyond the buffers.
            events_needed, input_spikes_needed = out.n_input_events.max(), out.n_input_spikes.max()
        status = torch.stack(
            [out.spike_count.max(), events_needed, input_spikes_needed, invalid]
        ).to(torch.int64)
        result = Spikes(
            times=out.spike_times,
            T=self.T,
            filled_times=out.filled_times if pseudo else None,
            pseudo_rate=out.pseudo_rate if pseudo else None,
            spike_count=out.spike_count,
        )
        return self._finish(result, spikes, status, sizes)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"model={self.model}, T={self.T}, {self._buffer_repr('max_spikes')}, "
            f"pseudo={self.pseudo}"
        )


class ThetaLinear(SpikingLinear):
    r"""Feedforward layer of theta neurons, ``tau V' = V(V-1) + I0 + tau sum w delta(t - t_i)``.

    ``SpikingLinear(..., model="theta")``. Defaults are the reference MNIST setup:
    ``tau = 6/pi``, ``I0 = 5/4`` (free period 6), ``T = 2``, initial phases ``Theta/2``, weights
    uniform ``+-0.5/sqrt(in_features)``. The initial phases (``initial_state [1, N]``) are
    learnable and kept in ``[0, Theta]``.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, "theta", **kwargs)


class QIFLinear(SpikingLinear):
    r"""Feedforward layer of QIF neurons with exponential synaptic currents (``tau_s = tau/2``);
    ``SpikingLinear(..., model="qif")``.

    State ``initial_state [2, N]``: voltage ``V`` and synaptic current ``I`` at ``t = 0``.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, "qif", **kwargs)


class LIFLinear(SpikingLinear):
    r"""Feedforward layer of current-based LIF neurons (``tau_s = tau/2``, threshold ``V_th``);
    ``SpikingLinear(..., model="lif")``.

    LIF neurons have no pseudodynamics: silent neurons have no pseudospike times.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, "lif", **kwargs)


class OscLIFLinear(SpikingLinear):
    r"""Feedforward layer of oscillatory LIF neurons with delta pulses (phase representation);
    ``SpikingLinear(..., model="osclif")``."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, "osclif", **kwargs)


class SpikingRecurrent(_SpikingLayer):
    r"""Recurrent network of spiking neurons driven by input spikes; all its neurons' spikes out.

    The network is simulated one event (input or network spike) at a time, ``max_events`` steps;
    any registered model works (each has an event-driven next-spike time).
    Learnable: recurrent weights (no self-connections), initial states ``[D, N]``; input weights
    are learnable if ``learn_input_weights``.

    Args:
        in_features, num_neurons: sizes.
        model: registered model name (with ``**model_params``) or instance; default ``"qif"``.
        T: trial duration.
        max_events: event steps per trial (inputs plus network spikes), ``"auto"`` (starts at
            128) or a fixed int; max_spikes: spike buffer per neuron, ``"auto"`` (starts at 16)
            or a fixed int. Fixed buffers that are too small raise :class:`BufferOverflowError`.
        input_weight: initial input weights: a float (all entries) or a tensor ``[N, N_in]``.
        recurrent_scale: initial recurrent weights uniform ``+-scale/sqrt(N)`` (0: start at zero,
            like the reference's experiment).

    Shapes: input :class:`Spikes` ``[B, N_in, K_in]``; output :class:`Spikes` ``[B, N, K]``.
    """

    weight_decay_parameters = ("recurrent_weight", "input_weight")

    def __init__(self, in_features: int, num_neurons: int,
                 model: Union[str, NeuronModel] = "qif", T: float = 10.0,
                 max_events: BufferSize = "auto", max_spikes: BufferSize = "auto",
                 input_weight: float | torch.Tensor = 1.0, recurrent_scale: float = 0.0,
                 learn_input_weights: bool = False, pseudo: bool = True,
                 name: Optional[str] = None, device=None, dtype=None, **model_params: float):
        super().__init__()
        kind = type(self).__name__
        for argument, value in [("in_features", in_features), ("num_neurons", num_neurons)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{kind}: `{argument}` must be a positive int, got {value!r}")
        if not T > 0:
            raise ValueError(f"{kind}: `T` (trial duration) must be positive, got {T!r}")
        if isinstance(input_weight, torch.Tensor) and input_weight.shape not in (
            torch.Size([]), torch.Size([num_neurons, in_features])
        ):
            raise ValueError(
                f"{kind}: `input_weight` must be a float or a tensor of shape "
                f"[{num_neurons}, {in_features}], got shape {list(input_weight.shape)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.num_neurons = in_features, num_neurons
        self.model, self.T = _resolve_model(model, model_params), float(T)
        try:
            self._init_buffers(max_events=(max_events, 128), max_spikes=(max_spikes, 16))
        except ValueError as error:
            raise ValueError(f"{kind}: {error}") from None
        self.recurrent_scale, self.pseudo, self.name = float(recurrent_scale), bool(pseudo), name
        self._initial_input_weight = input_weight
        self.recurrent_weight = nn.Parameter(torch.empty(num_neurons, num_neurons, **factory))
        input_weight_tensor = torch.empty(num_neurons, in_features, **factory)
        if learn_input_weights:
            self.input_weight = nn.Parameter(input_weight_tensor)
        else:
            self.register_buffer("input_weight", input_weight_tensor)
        self._init_initial_state(num_neurons, True, factory)
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
            self.initial_state.copy_(self._default_state.expand_as(self.initial_state))

    def _sizes_text(self) -> str:
        return f"{self.in_features}->{self.num_neurons}"

    @property
    def _pseudo_active(self) -> bool:
        return self.pseudo and isinstance(self.model, PseudoNeuronModel)

    def _check_input(self, spikes: Spikes) -> Spikes:
        return _check_spikes(spikes, self, self.in_features, self.T,
                             self.recurrent_weight.dtype, self.recurrent_weight.device)

    def _empty_output(self) -> Spikes:
        shape = (0, self.num_neurons, self.max_spikes)
        empty = self.recurrent_weight.new_empty(shape)
        return Spikes(empty, self.T, filled_times=empty if self._pseudo_active else None,
                      spike_count=torch.zeros(shape[:2], dtype=torch.int32,
                                              device=empty.device))

    def _run(self, spikes: Spikes) -> Spikes:
        times = spikes._times
        sizes = {"max_spikes": self.max_spikes, "max_events": self.max_events}
        out = self._simulate(times, self.max_events, self._pseudo_active)
        incomplete = (out.end_time < self.T).any()
        # Event steps of a complete run: one per input and network spike in the trial, plus
        # the last step, to T. An incomplete run needs more than it had: ask for twice as many.
        steps = ((times < self.T).sum((1, 2)) + out.spike_count.sum(-1) + 1).max()
        events_needed = torch.where(incomplete, 2 * self.max_events, steps)
        status = torch.stack(
            [out.spike_count.max(), events_needed, torch.zeros_like(events_needed),
             _invalid_times(times)]
        ).to(torch.int64)
        result = Spikes(out.spike_times, self.T,
                        filled_times=out.filled_times if self._pseudo_active else None,
                        spike_count=out.spike_count)
        return self._finish(result, spikes, status, sizes)

    def _simulate(self, times: torch.Tensor, max_events: int, pseudo: bool):
        return _recurrent_kernel(
            self.recurrent_weight * self._off_diagonal, self.input_weight,
            self.clamped_initial_state(), times, model=self.model, T=self.T,
            max_events=max_events, max_spikes=self.max_spikes, pseudo=pseudo,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_neurons={self.num_neurons}, "
                f"model={self.model}, T={self.T}, {self._buffer_repr('max_events')}, "
                f"{self._buffer_repr('max_spikes')}, pseudo={self.pseudo}")


class QIFRecurrent(SpikingRecurrent):
    r"""``SpikingRecurrent(..., model="qif")``: a recurrent network of QIF neurons (``tau``,
    ``alpha`` as keywords), initial states ``[2, N]`` (``V``, ``I``) starting at zero."""

    def __init__(self, in_features: int, num_neurons: int, **kwargs):
        super().__init__(in_features, num_neurons, "qif", **kwargs)


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


class IntensityLatencyEncoder(_Encoder):
    r"""Time-to-first-spike image encoding with continuous times: ``BinnedLatencyEncoder``'s input
    neuron driven by each pixel's intensity instead of its bin.

    In the reference, a pixel's bin sets the constant current of a leaky integrate-and-fire input
    neuron (time constant ``T``) whose current is 100 times its threshold for the brightest bin
    and ``100 / n_bins`` times it for the dimmest spiking bin. Here the current is ``100 x``
    times the threshold for intensity ``x`` in ``[0, 1]``, so the neuron spikes once at

    .. math:: t = T \log\frac{100 x}{100 x - 1} = -T \log(1 - 0.01 / x),

    from ``-T log(0.99)`` (about ``0.01 T``, a white pixel; the brightest bin's time) to
    ``-T log(1 - 0.01 / min_intensity)`` (about ``0.1 T`` at the default 0.1); intensities below
    ``min_intensity`` never spike (like the binned encoder's dark bin, which keeps the
    background silent). Every intensity level keeps its own time, where ``n_bins = 8`` merges
    28 levels into one; in a :class:`SpikingConv2d` the input then goes through the per-event path
    (one kick per input spike) instead of one convolution per bin.

    Args:
        T: trial duration. min_intensity: the dimmest intensity that spikes, in ``(0.01, 1]``.

    Input: ``[B, *]`` uint8 pixels 0..255 or float intensities in ``[0, 1]``.
    Output: :class:`Spikes` ``[B, N, 1]`` (images flattened), no pseudo rates.
    """

    def __init__(self, T: float = 2.0, min_intensity: float = 0.1, device=None, dtype=None):
        super().__init__(T, device, dtype)
        check_min_intensity(min_intensity)
        self.min_intensity = float(min_intensity)

    def forward(self, images: torch.Tensor) -> Spikes:
        return intensity_latency_encode(images, self.T, self.min_intensity,
                                        dtype=self._anchor.dtype, device=self._anchor.device)

    def extra_repr(self) -> str:
        return f"T={self.T}, min_intensity={self.min_intensity}"


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
_conv_binned_kernel = jax_function(
    conv_kernels.theta_conv_binned_layer,
    static_argnames=("bin_times", "model", "in_shape", "stride", "padding", "T", "max_spikes",
                     "pseudo"),
)


class SpikingConv2d(_FeedforwardLayer):
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
        T, max_spikes, max_events, w_scale, pseudo, learn_initial_state, name: as in
            :class:`SpikingLinear` (``max_events`` counts input spikes; ``"auto"`` event
            buffers grow in powers of two; initial weights uniform in
            ``+-w_scale / sqrt(C_in k^2)``).

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
        max_spikes: BufferSize = "auto",
        max_events: BufferSize = "auto",
        w_scale: float = 0.5,
        pseudo: bool = True,
        learn_initial_state: bool = True,
        name: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        out_hw = conv_kernels.check_conv_geometry(in_shape, kernel_size, stride, padding)
        self.in_shape = tuple(in_shape)
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"`out_channels` must be a positive int, got {out_channels!r}")
        self.model = get_model("theta", tau=tau, I0=I0)
        if not 0 < T < self.model.period:
            raise ValueError(
                f"`T` must be in (0, {self.model.period:g}) (below the theta period, so a "
                f"neuron spikes at most once between its inputs), got {T!r}"
            )
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.stride, self.padding = stride, padding
        self.out_shape = (out_channels, *out_hw)
        self.in_features, self.out_features = math.prod(self.in_shape), math.prod(self.out_shape)
        self._init_feedforward(
            (out_channels, self.in_shape[0], kernel_size, kernel_size), out_channels, T,
            max_spikes, max_events, w_scale, pseudo, learn_initial_state, name,
            {"device": device, "dtype": dtype},
        )

    def _sizes_text(self) -> str:
        return f"{self.in_shape}->{self.out_shape}, k={self.kernel_size}"

    def _grown(self, buffer: str, needed: int, size: int) -> int:
        if buffer == "max_spikes":
            return super()._grown(buffer, needed, size)
        # Spike grids give event counts in the hundreds that vary from batch to batch; doubling
        # keeps the number of compiled kernels logarithmic (an empty step costs C_out k^2).
        return max(EVENT_BUCKET, 1 << (max(needed, size + 1) - 1).bit_length())

    def _run(self, spikes: Spikes) -> Spikes:
        times = spikes._times
        geometry = {"model": self.model, "in_shape": self.in_shape, "stride": self.stride,
                    "padding": self.padding, "T": self.T, "max_spikes": self.max_spikes,
                    "pseudo": self.pseudo}
        if spikes.binned is not None and not times.requires_grad:
            # Binned input (an encoder's): one convolution per bin instead of an event per spike.
            sizes = {"max_spikes": self.max_spikes}
            out = _conv_binned_kernel(self.weight, self.clamped_initial_state(),
                                      spikes.binned.bin_index,
                                      bin_times=spikes.binned.bin_times, **geometry)
            events_needed = invalid = torch.zeros((), dtype=torch.int64,
                                                  device=self.weight.device)
        else:
            sizes = {"max_spikes": self.max_spikes, "max_events": self.max_events}
            rate = spikes._pseudo_rate if self.pseudo else None
            out = _conv_kernel(self.weight, self.clamped_initial_state(), times, rate,
                               max_events=self.max_events, **geometry)
            events_needed = (times < self.T).sum((1, 2)).max()  # one event per input spike
            invalid = _invalid_times(times)
        status = torch.stack(
            [out.spike_count.max(), events_needed, torch.zeros_like(events_needed), invalid]
        ).to(torch.int64)
        result = Spikes(
            times=out.spike_times, T=self.T,
            filled_times=out.filled_times if self.pseudo else None,
            pseudo_rate=out.pseudo_rate if self.pseudo else None,
            spike_count=out.spike_count,
        )
        return self._finish(result, spikes, status, sizes)

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"out_shape={self.out_shape}, model={self.model}, T={self.T}, "
                f"{self._buffer_repr('max_spikes')}, pseudo={self.pseudo}")


class EarliestSpikePool2d(nn.Module):
    r"""Spike pooling: each window passes on its earliest spikes (differentiable in the times).

    Output neuron ``(c, i, j)`` carries the ``K`` earliest spike times of the input neurons in its
    ``kernel_size x kernel_size`` window (of channel ``c``); pseudospike-filled times are pooled
    the same way and pseudo rates by their maximum, so the pooled values stay continuous.

    Args:
        in_shape: ``(C, H, W)`` of the input grid; kernel_size; stride (default
            ``kernel_size``), as ``torch.nn.MaxPool2d`` without padding.
        spikes_per_window: ``K``, the earliest spikes passed on per window (e.g. 1: first
            spikes only, fewer events for the next layer); default: as many as the input has per
            neuron.

    Shapes: input :class:`Spikes` ``[B, C H W, K_in]``; output ``[B, C H' W', K]``,
    ``out_shape = (C, H', W')``.
    """

    def __init__(self, in_shape: tuple[int, int, int], kernel_size: int,
                 stride: Optional[int] = None, spikes_per_window: Optional[int] = None):
        super().__init__()
        stride = kernel_size if stride is None else stride
        out_hw = conv_kernels.check_conv_geometry(in_shape, kernel_size, stride, 0)
        self.in_shape = tuple(in_shape)
        if spikes_per_window is not None and (
            isinstance(spikes_per_window, bool) or not isinstance(spikes_per_window, int)
            or spikes_per_window < 1
        ):
            raise ValueError(
                f"`spikes_per_window` must be a positive int or None, got {spikes_per_window!r}"
            )
        self.spikes_per_window = spikes_per_window
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
        if spikes._times.dim() != 3 or spikes._times.shape[1] != n_in:
            raise ValueError(
                f"{self}: input spike times must have shape [batch, {n_in}, spikes] (in_shape "
                f"{self.in_shape} flattened), got {list(spikes._times.shape)}"
            )
        return self._run(spikes)

    def _run(self, spikes: Spikes) -> Spikes:
        # Pools the unchecked values and passes the layers' checks on (a rerun of a layer
        # before reruns this pooling too), so a network is still checked once, at its readout.
        # Each window holds K_in k^2 spikes; the earliest min(K, that) are passed on.
        k = spikes._times.shape[-1]
        if self.spikes_per_window is not None:
            k = min(self.spikes_per_window, k * self.kernel_size ** 2)
        times = self._pool(spikes._times, k)
        filled, rate = spikes._filled_times, spikes._pseudo_rate
        result = Spikes(
            times=times, T=spikes.T,
            filled_times=None if filled is None else self._pool(filled, k),
            pseudo_rate=None if rate is None else self._pool(rate, None),
            spike_count=(times < spikes.T).sum(-1),
        )
        if spikes._call is not None:
            status = torch.zeros(len(_STATUS), dtype=torch.int64, device=times.device)
            result._call = _LayerCall(self, spikes, status, {})
        return result

    def _apply_status(self, status: dict[str, int], call: _LayerCall) -> bool:
        return False  # no buffers of its own

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"spikes_per_window={self.spikes_per_window}, out_shape={self.out_shape}")
