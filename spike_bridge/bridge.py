"""Call JIT-compiled JAX functions on PyTorch tensors, with full autograd.

``jax_function(fn)`` wraps a JAX function so that it takes and returns pytrees of ``torch.Tensor``:

>>> import jax.numpy as jnp, torch
>>> from spike_bridge.bridge import jax_function
>>> sin2 = jax_function(lambda x: jnp.sin(x) * 2)
>>> x = torch.linspace(0, 1, 5, requires_grad=True)
>>> sin2(x).sum().backward()          # x.grad == 2 * cos(x)

How a call runs (eager mode):

* The arguments are flattened with ``jax.tree_util``. Tensor leaves are the traced inputs; every
  other leaf is *static* (part of the cache key, must be hashable), as are the arguments named in
  ``static_argnames`` (kept whole).
* A cache entry per (argument structure, tensor shapes/dtypes/device, static values) holds the
  jitted JAX functions and the autograd bookkeeping; it is built once. JAX compiles each jitted
  function on its first use.
* Tensors cross into JAX and back through DLPack without copies. If a gradient is needed, one
  jitted function returns the outputs and the VJP residuals (the leaves of the ``jax.vjp``
  closure); the backward pass runs a jitted VJP on those residuals. Otherwise a plain jitted
  forward runs and nothing is kept.

Under ``torch.compile`` the same cache entries are reached through ``torch.library`` custom ops
(``spike_bridge::jax_forward``, ``spike_bridge::jax_forward_with_residuals``,
``spike_bridge::jax_backward``) whose fake kernels come from ``jax.eval_shape``; the eager path
avoids the custom-op dispatcher because it costs more per call than the whole bridge.

JAX runs every bridged call with 64-bit types enabled (``jax.enable_x64``, a thread-local
scope), so float64 tensors stay float64; JAX's process-wide defaults are left as the user set
them (importing spike_bridge changes nothing global).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import itertools
import marshal
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils.dlpack

__all__ = [
    "jax_function", "JaxFunction", "BridgeCacheInfo", "register_static_type", "scoped_x64",
]


def scoped_x64():
    """Context manager: 64-bit JAX types in this thread, inside the ``with`` block only.

    Every bridged call runs inside it (float64 tensors stay float64 without switching on
    ``jax_enable_x64`` for the whole process).
    """
    return jax.enable_x64(True)


_PREFIX = "spike_bridge.bridge"
DOUBLE_BACKWARD_MESSAGE = (
    f"{_PREFIX}: double backward through a JAX function is not supported "
    "(the gradient of a bridged function is not itself differentiable)"
)

# Input dtypes the bridge accepts. float32/float64 are differentiable; the rest get None gradients
# (float0 cotangents on the JAX side).
_DIFFERENTIABLE_INPUT_DTYPES = frozenset({torch.float32, torch.float64})
_NONDIFFERENTIABLE_INPUT_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
)
_SUPPORTED_INPUT_DTYPES = _DIFFERENTIABLE_INPUT_DTYPES | _NONDIFFERENTIABLE_INPUT_DTYPES

# JAX (numpy) dtype -> torch dtype, for output/residual specs of the fake kernels.
_TORCH_DTYPE_FROM_NUMPY: dict[np.dtype, torch.dtype] = {
    np.dtype(np_type): torch_type
    for np_type, torch_type in [
        (np.bool_, torch.bool),
        (np.uint8, torch.uint8),
        (np.uint16, torch.uint16),
        (np.uint32, torch.uint32),
        (np.uint64, torch.uint64),
        (np.int8, torch.int8),
        (np.int16, torch.int16),
        (np.int32, torch.int32),
        (np.int64, torch.int64),
        (np.float16, torch.float16),
        (jnp.bfloat16, torch.bfloat16),
        (np.float32, torch.float32),
        (np.float64, torch.float64),
    ]
}
_NUMPY_DTYPE_FROM_TORCH: dict[torch.dtype, np.dtype] = {
    torch_type: np_type for np_type, torch_type in _TORCH_DTYPE_FROM_NUMPY.items()
}


# --------------------------------------------------------------------------------------------
# DLPack conversions
# --------------------------------------------------------------------------------------------
#
# On CPU the public entry points (jax.dlpack.from_dlpack, torch.from_dlpack) spend ~20 us and
# ~4 us per array in Python bookkeeping; the bridge would then cost more than the function it
# calls. The CPU path therefore uses the same jaxlib primitives jax.dlpack.from_dlpack calls,
# when this jaxlib has them, and the public API otherwise. The CUDA path always goes through the
# public API, because it carries the stream handshake: JAX passes its stream to
# torch.Tensor.__dlpack__ (torch makes that stream wait on its current stream), and torch passes
# its current stream to jax.Array.__dlpack__ (JAX makes it wait on the computation).

try:  # jaxlib >= 0.6 (extension version 467 added the device-type argument)
    from jax._src.lib import _jax as _jaxlib_ext
    from jax._src.lib import jaxlib_extension_version as _JAXLIB_EXTENSION_VERSION

    _HAS_FAST_CPU_DLPACK = (
        _JAXLIB_EXTENSION_VERSION >= 467
        and hasattr(_jaxlib_ext, "dlpack_managed_tensor_to_buffer")
        and hasattr(_jaxlib_ext, "buffer_to_dlpack_managed_tensor")
    )
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    _HAS_FAST_CPU_DLPACK = False

_DLPACK_DEVICE_TYPE_CPU = 1  # DLDeviceType.kDLCPU


def _cpu_tensor_to_jax(tensor: torch.Tensor, jax_device: jax.Device) -> jax.Array:
    """Zero-copy view of a contiguous CPU tensor as a jax.Array (copies only if misaligned)."""
    if _HAS_FAST_CPU_DLPACK:
        capsule = torch.utils.dlpack.to_dlpack(tensor)
        return _jaxlib_ext.dlpack_managed_tensor_to_buffer(
            capsule, jax_device, None, None, _DLPACK_DEVICE_TYPE_CPU
        )
    return jax.dlpack.from_dlpack(tensor.detach())


def _cpu_jax_to_tensor(array: jax.Array) -> torch.Tensor:
    """Zero-copy view of a CPU jax.Array as a torch tensor."""
    if _HAS_FAST_CPU_DLPACK:
        capsule = _jaxlib_ext.buffer_to_dlpack_managed_tensor(array, stream=None)
        return torch.utils.dlpack.from_dlpack(capsule)
    return torch.from_dlpack(array)


def _cuda_tensor_to_jax(tensor: torch.Tensor, jax_device: jax.Device) -> jax.Array:
    """Zero-copy view of a contiguous CUDA tensor as a jax.Array on ``jax_device``.

    Call inside ``torch.cuda.device(tensor.device)``: torch exports only tensors of the current
    device and synchronises with *its current stream*. jax.dlpack.from_dlpack passes JAX's
    stream for that device as the DLPack ``stream`` argument, so the JAX computation waits for
    the torch work that produced ``tensor``.
    """
    return jax.dlpack.from_dlpack(tensor.detach(), device=jax_device)


def _cuda_jax_to_tensor(array: jax.Array) -> torch.Tensor:
    """Zero-copy view of a CUDA jax.Array as a torch tensor.

    torch.from_dlpack passes torch's current stream of the array's device to
    ``jax.Array.__dlpack__``, which orders that stream after the JAX computation.
    """
    return torch.from_dlpack(array)


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # DLPack can describe strides, but XLA wants dense row-major buffers; make the copy explicit
    # here rather than leave it to whichever side would do it implicitly.
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _dedupe_storage(
    tensors: list[torch.Tensor], inputs: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """Clone outputs whose memory is already owned by an input or by an earlier output.

    XLA may hand back one buffer for two outputs, or an input buffer as an output; torch users
    expect distinct outputs (an in-place edit of one must not change another), and custom ops
    must not return aliases of their inputs.
    """
    seen = {t.data_ptr() for t in inputs if t.numel()}
    result = []
    for tensor in tensors:
        pointer = tensor.data_ptr()
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        else:
            seen.add(pointer)
        result.append(tensor)
    return result


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jax_device_for(torch_device: torch.device) -> jax.Device:
    """The JAX device that owns the memory of tensors on ``torch_device``."""
    if torch_device.type == "cpu":
        return jax.devices("cpu")[0]
    if torch_device.type == "cuda":
        try:
            gpu_devices = jax.devices("cuda")
        except RuntimeError as error:
            raise RuntimeError(
                f"{_PREFIX}: got a tensor on {torch_device}, but this JAX has no CUDA backend "
                "(install jax[cuda12] matching your CUDA)"
            ) from error
        index = torch_device.index if torch_device.index is not None else 0
        # Both libraries number GPUs by their CUDA ordinal among the visible devices.
        for device in gpu_devices:
            if device.local_hardware_id == index:
                return device
        raise RuntimeError(f"{_PREFIX}: JAX sees no CUDA device with ordinal {index}")
    raise ValueError(
        f"{_PREFIX}: tensors on {torch_device.type!r} devices are not supported (cpu and cuda are)"
    )


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


class _StaticArgument:
    """Wraps an argument named in ``static_argnames`` so it stays whole (one pytree leaf)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any):
        self.value = value
        self._hash = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((type(self.value), self.value))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is _StaticArgument
            and type(other.value) is type(self.value)
            and other.value == self.value
        )

    def __repr__(self) -> str:
        return f"static({self.value!r})"


def _unwrap_static(leaf: Any) -> Any:
    return leaf.value if type(leaf) is _StaticArgument else leaf


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _short_spec(shape: Sequence[int], dtype: Any) -> str:
    """'f32[3,4]'-style summary used in cache-entry names (shows up in compiled graphs)."""
    name = str(dtype).replace("torch.", "")
    abbreviations = {"float": "f", "int": "i", "uint": "u", "bool": "b", "bfloat": "bf"}
    for long, short in abbreviations.items():
        if name.startswith(long) and name[len(long):].isdigit():
            name = short + name[len(long):]
    return f"{name}[{','.join(str(int(s)) for s in shape)}]"


def _code_fingerprint(fn: Callable) -> str:
    """A digest of ``fn``'s bytecode and constants ('' if it has none we can read)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None:
        return ""
    try:
        return hashlib.sha1(marshal.dumps(code)).hexdigest()
    except ValueError:  # unmarshallable constants
        return ""


class _ArgumentNamer:
    """Names a flattened argument leaf ('x', "params['w']", 'args[2]') for error messages."""

    def __init__(self, fn: Callable):
        try:
            parameters = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        self._positional_names = []
        for parameter in parameters:
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                self._positional_names.append(parameter.name)

    def name(self, args: tuple, kwargs: dict, leaf_index: int) -> str:
        paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path((args, kwargs))
        path, _ = paths_and_leaves[leaf_index]
        container, top, *rest = path
        if container.idx == 0:  # positional
            position = top.idx
            base = (
                self._positional_names[position]
                if position < len(self._positional_names)
                else f"args[{position}]"
            )
        else:
            base = top.key
        return f"'{base}{jax.tree_util.keystr(tuple(rest))}'"


# --------------------------------------------------------------------------------------------
# Cache entries
# --------------------------------------------------------------------------------------------


class _TensorSpec(NamedTuple):
    """Shape and torch dtype of one flat tensor (input, output, cotangent or residual)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _spec_of_aval(aval: Any) -> _TensorSpec:
    dtype = np.dtype(aval.dtype)
    if dtype not in _TORCH_DTYPE_FROM_NUMPY:
        raise TypeError(f"{_PREFIX}: JAX dtype {dtype} has no torch equivalent")
    return _TensorSpec(tuple(aval.shape), _TORCH_DTYPE_FROM_NUMPY[dtype])


def _is_differentiable_output(spec: _TensorSpec) -> bool:
    return spec.dtype.is_floating_point


# Registry of cache entries by name: the custom ops receive the name (a str) and look the entry
# up, because an op schema can only carry tensors and primitive values.
# Weak: each JaxFunction's cache owns its entries.
_ENTRY_REGISTRY: weakref.WeakValueDictionary[str, _CacheEntry] = weakref.WeakValueDictionary()
_ENTRY_REGISTRY_LOCK = threading.Lock()


def _on_entry_device(method: Callable) -> Callable:
    """Run an entry method with the entry's CUDA device current for torch (DLPack export and
    the stream handshake use the current device) and as JAX's default device (for anything
    JAX creates without a committed input), with 64-bit JAX types (:func:`scoped_x64`)."""

    @functools.wraps(method)
    def on_device(self: _CacheEntry, *args: Any, **kwargs: Any) -> Any:
        if not self.is_cuda:
            with scoped_x64():
                return method(self, *args, **kwargs)
        with torch.cuda.device(self.torch_device), jax.default_device(self.jax_device), \
                scoped_x64():
            return method(self, *args, **kwargs)

    return on_device


class _CacheEntry:
    """Everything needed to call one JAX function on one argument signature.

    One entry exists per (argument structure, tensor shapes/dtypes/device, static values). It
    owns three jitted functions over the *flat* list of input arrays (tensor leaves in argument
    order); each is traced and compiled by JAX on its first call:

    * ``forward(*arrays) -> outputs``                           (no gradient needed)
    * ``forward_with_vjp(*arrays) -> (outputs, residuals)``     (residuals: leaves of the VJP)
    * ``backward(residuals, cotangents) -> input gradients``    (float inputs only)

    ``outputs`` is the flat list of output leaves; ``residual_treedef`` rebuilds the VJP closure
    from its leaves inside ``backward``.
    """

    def __init__(
        self,
        name: str,
        fn: Callable,
        in_treedef: Any,
        leaf_template: list[Any],
        tensor_positions: list[int],
        input_specs: list[_TensorSpec],
        torch_device: torch.device,
    ):
        self.name = name
        self.fn = fn
        self.in_treedef = in_treedef
        self.leaf_template = leaf_template  # static leaves; None where a tensor goes
        self.tensor_positions = tensor_positions
        self.input_specs = input_specs
        self.input_differentiable = [s.dtype in _DIFFERENTIABLE_INPUT_DTYPES for s in input_specs]
        self.torch_device = torch_device
        self.jax_device = _jax_device_for(torch_device)
        self.is_cuda = torch_device.type == "cuda"
        self._to_jax = _cuda_tensor_to_jax if self.is_cuda else _cpu_tensor_to_jax
        self._to_torch = _cuda_jax_to_tensor if self.is_cuda else _cpu_jax_to_tensor

        # Filled by the first trace of the user function (or by eval_shape under torch.compile).
        self.out_treedef: Any = None
        self.output_specs: list[_TensorSpec] | None = None
        self.output_differentiable: list[bool] | None = None
        self.residual_treedef: Any = None
        self._residual_specs: list[_TensorSpec] | None = None

        # The owner's record of recently used entries (see JaxFunction): a weak reference,
        # so that an entry does not keep its JaxFunction alive.
        self.owner: Callable[[], Any] = lambda: None
        self.release_programs()

        self.traces = 0
        self.forward_calls = 0
        self.forward_with_vjp_calls = 0
        self.backward_calls = 0

    # -- functions JAX traces ------------------------------------------------------------------

    def _flat_fn(self, *arrays: jax.Array) -> list[jax.Array]:
        self.traces += 1
        leaves = list(self.leaf_template)
        for position, array in zip(self.tensor_positions, arrays):
            leaves[position] = array
        leaves = [_unwrap_static(leaf) for leaf in leaves]
        args, kwargs = jax.tree_util.tree_unflatten(self.in_treedef, leaves)
        outputs = self.fn(*args, **kwargs)
        output_leaves, out_treedef = jax.tree_util.tree_flatten(outputs)
        self._record_outputs(out_treedef, output_leaves)
        return [jnp.asarray(leaf) for leaf in output_leaves]

    def _flat_fn_with_vjp(self, *arrays: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        outputs, vjp_fn = jax.vjp(self._flat_fn, *arrays)
        residuals, residual_treedef = jax.tree_util.tree_flatten(vjp_fn)
        # Every trace of this function (jit, or eval_shape for the fake kernels) yields the same
        # residual structure, so backward may rebuild residuals of one trace with the treedef of
        # another.
        self.residual_treedef = residual_treedef
        return outputs, residuals

    def _flat_vjp(
        self, residuals: list[jax.Array], cotangents: list[jax.Array | None]
    ) -> list[jax.Array]:
        """Gradients of the float inputs.

        ``cotangents`` holds one entry per float output; None means the output was unused and
        its cotangent is zero (XLA folds the zeros into the VJP). Non-float outputs get float0
        cotangents, and the float0 cotangents JAX returns for non-float inputs are dropped.
        """
        vjp_fn = jax.tree_util.tree_unflatten(self.residual_treedef, residuals)
        float_cotangents = iter(cotangents)
        full_cotangents = []
        for spec, differentiable in zip(self.output_specs, self.output_differentiable):
            if not differentiable:
                full_cotangents.append(np.zeros(spec.shape, jax.dtypes.float0))
                continue
            cotangent = next(float_cotangents)
            if cotangent is None:
                cotangent = jnp.zeros(spec.shape, _NUMPY_DTYPE_FROM_TORCH[spec.dtype])
            full_cotangents.append(cotangent)
        input_cotangents = vjp_fn(full_cotangents)
        return [
            cotangent
            for cotangent, differentiable in zip(input_cotangents, self.input_differentiable)
            if differentiable
        ]

    def _record_outputs(self, out_treedef: Any, output_leaves: list[Any]) -> None:
        if self.out_treedef is not None:
            return
        specs = []
        for index, leaf in enumerate(output_leaves):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{_PREFIX}: output leaf {index} of {self.name} is complex ({dtype}); "
                    "complex outputs are not supported (torch and JAX differ in their complex "
                    "gradient conventions)"
                )
            specs.append(_spec_of_aval(jax.ShapeDtypeStruct(jnp.shape(leaf), dtype)))
        self.output_specs = specs
        self.output_differentiable = [_is_differentiable_output(s) for s in specs]
        self.out_treedef = out_treedef

    # -- shape information without running anything (fake kernels under torch.compile) -------

    def _input_avals(self) -> list[jax.ShapeDtypeStruct]:
        return [
            jax.ShapeDtypeStruct(spec.shape, _NUMPY_DTYPE_FROM_TORCH[spec.dtype])
            for spec in self.input_specs
        ]

    @_on_entry_device
    def ensure_output_specs(self) -> None:
        if self.output_specs is None:
            jax.eval_shape(self._flat_fn, *self._input_avals())

    @property
    def residual_specs(self) -> list[_TensorSpec]:
        if self._residual_specs is None:
            with scoped_x64():
                _, residual_avals = jax.eval_shape(
                    self._flat_fn_with_vjp, *self._input_avals()
                )
            self._residual_specs = [_spec_of_aval(aval) for aval in residual_avals]
        return self._residual_specs

    # -- compiled programs -----------------------------------------------------------------

    def release_programs(self) -> None:
        """Drop the compiled programs (fresh ``jax.jit`` wrappers compile again on next use).

        Dropping the wrappers frees their executables and the memory maps of their machine
        code; the entry itself (name, specs, treedefs) stays valid for graphs that name it.
        """
        self.forward = jax.jit(self._flat_fn)
        self.forward_with_vjp = jax.jit(self._flat_fn_with_vjp)
        self.backward = jax.jit(self._flat_vjp)

    def _mark_used(self) -> None:
        owner = self.owner()
        if owner is not None:
            owner._mark_used(self)

    # -- running on torch tensors ----------------------------------------------------------

    def to_jax(self, tensors: Iterable[torch.Tensor]) -> list[jax.Array]:
        return [self._to_jax(_contiguous(t), self.jax_device) for t in tensors]

    def to_torch(self, arrays: Iterable[jax.Array]) -> list[torch.Tensor]:
        return [self._to_torch(a) for a in arrays]

    @_on_entry_device
    def run_forward(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs only: the path taken when no gradient is needed."""
        self.forward_calls += 1
        self._mark_used()
        outputs = self.forward(*self.to_jax(tensors))
        return _dedupe_storage(self.to_torch(outputs), tensors)

    @_on_entry_device
    def run_forward_with_vjp(
        self, tensors: list[torch.Tensor], residuals_as_tensors: bool = False
    ) -> tuple[list[torch.Tensor], list[jax.Array] | list[torch.Tensor]]:
        """Outputs as tensors, and the VJP residuals as JAX arrays (eager path) or as tensors
        (custom-op path, where autograd must see them)."""
        self.forward_with_vjp_calls += 1
        self._mark_used()
        outputs, residuals = self.forward_with_vjp(*self.to_jax(tensors))
        output_tensors = _dedupe_storage(self.to_torch(outputs), tensors)
        if residuals_as_tensors:
            residuals = _dedupe_storage(self.to_torch(residuals), [*tensors, *output_tensors])
        return output_tensors, residuals

    @_on_entry_device
    def run_backward(
        self,
        residuals: Sequence[jax.Array] | Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """Gradients of the float inputs, given one cotangent (or None) per float output."""
        self.backward_calls += 1
        self._mark_used()
        if residuals and isinstance(residuals[0], torch.Tensor):
            residuals = self.to_jax(residuals)
        jax_cotangents = [
            None if cotangent is None else self._to_jax(_contiguous(cotangent), self.jax_device)
            for cotangent in cotangents
        ]
        return self.to_torch(self.backward(list(residuals), jax_cotangents))

    def float_cotangents(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [g for g, differentiable in zip(grads, self.output_differentiable) if differentiable]

    def scatter_input_grads(self, float_grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One gradient per input tensor: the float inputs' gradients, None for the others."""
        float_grads_iter = iter(float_grads)
        return [next(float_grads_iter) if d else None for d in self.input_differentiable]

    # -- bookkeeping -----------------------------------------------------------------------

    def register(self) -> None:
        with _ENTRY_REGISTRY_LOCK:
            _ENTRY_REGISTRY[self.name] = self


def _lookup_entry(entry_name: str) -> _CacheEntry:
    try:
        return _ENTRY_REGISTRY[entry_name]
    except KeyError:
        raise RuntimeError(
            f"{_PREFIX}: no cache entry named {entry_name!r} in this process; the custom ops "
            "spike_bridge::jax_* are only valid inside graphs built by calling a jax_function"
        ) from None


# --------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------


class _DoubleBackwardGuard(torch.autograd.Function):
    """Passes gradients through; differentiating them raises DOUBLE_BACKWARD_MESSAGE.

    Its inputs are the gradients followed by the forward inputs that require grad: the latter
    connect the gradients to the graph, so that autograd reaches this node's backward (and its
    message) instead of reporting the inputs as unused.
    """

    @staticmethod
    def forward(
        ctx: Any, grad_count: int, *grads_then_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return tuple(grad.clone() for grad in grads_then_inputs[:grad_count])

    @staticmethod
    def backward(ctx: Any, *grad_grads: torch.Tensor) -> None:
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _guard_double_backward(
    grads: list[torch.Tensor | None], inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Route ``grads`` through _DoubleBackwardGuard (used under ``create_graph=True``, where the
    gradients would otherwise be constants and a second derivative silently wrong or missing)."""
    present = [grad for grad in grads if grad is not None]
    differentiable_inputs = [tensor for tensor in inputs if tensor.requires_grad]
    if not present or not differentiable_inputs:
        return grads
    guarded = iter(_DoubleBackwardGuard.apply(len(present), *present, *differentiable_inputs))
    return [None if grad is None else next(guarded) for grad in grads]


def _backward_keeps_graph() -> bool:
    """Whether the running backward pass has retain_graph=True (True if torch can't tell)."""
    keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps_graph is None else keeps_graph()


class _BridgeFunction(torch.autograd.Function):
    """Eager autograd node of one call: forward = jitted forward-with-VJP, backward = jitted VJP.

    The residuals stay JAX arrays on ``ctx`` (no conversion cost). Backward drops them unless
    the graph is retained, so they live exactly as long as saved tensors would.
    """

    @staticmethod
    def forward(ctx: Any, entry: _CacheEntry, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, residuals = entry.run_forward_with_vjp(list(tensors))
        ctx.entry = entry
        ctx.residuals = residuals
        # Saved only for autograd's version-counter check: an in-place edit of an input, or of an
        # output (whose buffer XLA may share with a residual), between forward and backward
        # raises instead of silently corrupting the gradient.
        ctx.save_for_backward(*tensors, *outputs)
        non_differentiable = [
            output
            for output, differentiable in zip(outputs, entry.output_differentiable)
            if not differentiable
        ]
        if non_differentiable:
            ctx.mark_non_differentiable(*non_differentiable)
        # Unused outputs arrive as None and become zero cotangents inside the jitted VJP.
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors  # raises if an input or output was modified in place
        entry: _CacheEntry = ctx.entry
        cotangents = entry.float_cotangents(grads)
        if all(cotangent is None for cotangent in cotangents):
            return (None,) * (1 + len(entry.input_specs))
        residuals = ctx.residuals
        if not _backward_keeps_graph():
            ctx.residuals = None  # free them now, as autograd frees saved tensors
        input_grads = entry.scatter_input_grads(entry.run_backward(residuals, cotangents))
        if torch.is_grad_enabled():  # backward(create_graph=True)
            input_grads = _guard_double_backward(input_grads, saved[: len(entry.input_specs)])
        return (None, *input_grads)


# --------------------------------------------------------------------------------------------
# Custom ops (the torch.compile path)
# --------------------------------------------------------------------------------------------


def _empty_from_specs(specs: Iterable[_TensorSpec], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in specs]


@torch.library.custom_op("spike_bridge::jax_forward", mutates_args=())
def _jax_forward_op(inputs: list[torch.Tensor], entry_name: str) -> list[torch.Tensor]:
    """Outputs of the cache entry ``entry_name`` on ``inputs`` (its flat tensor leaves)."""
    entry = _lookup_entry(entry_name)
    return entry.run_forward(list(inputs))


@_jax_forward_op.register_fake
def _jax_forward_fake(inputs: list[torch.Tensor], entry_name: str) -> list[torch.Tensor]:
    entry = _lookup_entry(entry_name)
    entry.ensure_output_specs()
    return _empty_from_specs(entry.output_specs, entry.torch_device)


@torch.library.custom_op("spike_bridge::jax_forward_with_residuals", mutates_args=())
def _jax_forward_with_residuals_op(
    inputs: list[torch.Tensor], entry_name: str
) -> list[torch.Tensor]:
    """Outputs followed by the VJP residuals (as tensors) of the cache entry ``entry_name``."""
    entry = _lookup_entry(entry_name)
    outputs, residuals = entry.run_forward_with_vjp(list(inputs), residuals_as_tensors=True)
    return [*outputs, *residuals]


@_jax_forward_with_residuals_op.register_fake
def _jax_forward_with_residuals_fake(
    inputs: list[torch.Tensor], entry_name: str
) -> list[torch.Tensor]:
    entry = _lookup_entry(entry_name)
    entry.ensure_output_specs()
    return _empty_from_specs([*entry.output_specs, *entry.residual_specs], entry.torch_device)


@torch.library.custom_op("spike_bridge::jax_backward", mutates_args=())
def _jax_backward_op(
    residuals: list[torch.Tensor], cotangents: list[torch.Tensor], entry_name: str
) -> list[torch.Tensor]:
    """Gradients of the float inputs, given the residuals and one cotangent per float output."""
    entry = _lookup_entry(entry_name)
    float_grads = entry.run_backward(list(residuals), list(cotangents))
    return _dedupe_storage(float_grads, [*residuals, *cotangents])


@_jax_backward_op.register_fake
def _jax_backward_fake(
    residuals: list[torch.Tensor], cotangents: list[torch.Tensor], entry_name: str
) -> list[torch.Tensor]:
    entry = _lookup_entry(entry_name)
    float_input_specs = [
        spec for spec, d in zip(entry.input_specs, entry.input_differentiable) if d
    ]
    return _empty_from_specs(float_input_specs, entry.torch_device)


def _forward_with_residuals_setup_context(ctx: Any, inputs: tuple, output: list) -> None:
    _, entry_name = inputs
    entry = _lookup_entry(entry_name)
    ctx.entry_name = entry_name
    ctx.save_for_backward(*output[len(entry.output_specs):])


def _forward_with_residuals_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    entry = _lookup_entry(ctx.entry_name)
    # One cotangent per float output (zeros for unused ones). The residual outputs, listed after
    # the real outputs, get none: zip stops at the last real output.
    cotangents = [
        torch.zeros(spec.shape, dtype=spec.dtype, device=entry.torch_device)
        if grad is None
        else grad
        for grad, spec, differentiable in zip(
            grads, entry.output_specs, entry.output_differentiable
        )
        if differentiable
    ]
    float_grads = _jax_backward_op(list(ctx.saved_tensors), cotangents, ctx.entry_name)
    return entry.scatter_input_grads(list(float_grads)), None


def _double_backward_error(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


_jax_forward_with_residuals_op.register_autograd(
    _forward_with_residuals_backward, setup_context=_forward_with_residuals_setup_context
)
_jax_backward_op.register_autograd(_double_backward_error)


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------


#: Cache entries of one JaxFunction that keep their compiled programs; the least recently used
#: beyond this drop theirs (their memory and memory maps are freed) and compile again if called.
COMPILED_ENTRIES_PER_FUNCTION = 16


class BridgeCacheInfo(NamedTuple):
    """Counters summed over the cache entries of one JaxFunction."""

    entries: int  # distinct (structure, shapes, dtypes, device, static values) seen
    compiled_entries: int  # entries that hold compiled programs (see COMPILED_ENTRIES_PER_FUNCTION)
    traces: int  # times JAX traced the wrapped function (eval_shape included)
    forward_calls: int  # calls of the plain forward (no_grad path)
    forward_with_vjp_calls: int  # calls of the forward that also returns VJP residuals
    backward_calls: int  # calls of the jitted VJP


# JaxFunctions by registry_name: under torch.compile dynamo hands only this name (a str) to the
# nonstrict-traced entry point. Weak, so that dropping a JaxFunction frees it.
_FUNCTION_REGISTRY: weakref.WeakValueDictionary[str, JaxFunction] = weakref.WeakValueDictionary()
_FUNCTION_NUMBERS = itertools.count()


class JaxFunction:
    """A JAX function made callable on pytrees of torch tensors, with autograd.

    Created by :func:`jax_function`; see there for the calling convention.
    """

    def __init__(self, fn: Callable, static_argnames: str | Iterable[str] = ()):
        if not callable(fn):
            raise TypeError(f"{_PREFIX}.jax_function: expected a callable, got {type(fn).__name__}")
        functools.update_wrapper(self, fn)
        self.fn = fn
        if isinstance(static_argnames, str):
            static_argnames = (static_argnames,)
        self.static_argnames = tuple(static_argnames)
        self._static_positions = self._positions_of(fn, self.static_argnames)
        self._namer = _ArgumentNamer(fn)
        self._code_fingerprint = _code_fingerprint(fn)
        self._cache: dict[tuple, _CacheEntry] = {}
        # Entries holding compiled programs, least recently used first (at most
        # COMPILED_ENTRIES_PER_FUNCTION).
        self._compiled: collections.OrderedDict[str, _CacheEntry] = collections.OrderedDict()
        qualname = getattr(fn, "__qualname__", type(fn).__name__)
        self.registry_name = f"{qualname}#{next(_FUNCTION_NUMBERS)}"
        _FUNCTION_REGISTRY[self.registry_name] = self

    @staticmethod
    def _positions_of(fn: Callable, names: tuple[str, ...]) -> tuple[tuple[str, int | None], ...]:
        """(name, positional index or None) for each static argument name; checks the names."""
        try:
            parameters = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return tuple((name, None) for name in names)
        accepts_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        positional = [
            p.name for p in parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        result = []
        for name in names:
            if name not in parameters and not accepts_any_keyword:
                raise ValueError(
                    f"{_PREFIX}.jax_function: static_argnames names {name!r}, which is not a "
                    f"parameter of {getattr(fn, '__qualname__', fn)}"
                )
            result.append((name, positional.index(name) if name in positional else None))
        return tuple(result)

    def __repr__(self) -> str:
        return f"<spike_bridge.bridge.JaxFunction {self.registry_name}>"

    # -- calling ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped function on ``args``/``kwargs`` (pytrees of tensors and statics).

        Returns the function's output pytree with every array leaf as a torch tensor on the
        inputs' device, in the dtype JAX computed.
        """
        if torch.compiler.is_compiling():
            # nonstrict_trace refuses None inputs: top-level None arguments cross as a marker.
            args = tuple(_NONE_ARGUMENT if a is None else a for a in args)
            kwargs = {k: _NONE_ARGUMENT if v is None else v for k, v in kwargs.items()}
            return _call_via_custom_ops(self.registry_name, args, kwargs)
        return self._call_eager(args, kwargs)

    def _call_eager(self, args: tuple, kwargs: dict) -> Any:
        entry, tensors = self._entry_and_tensors(args, kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outputs = _BridgeFunction.apply(entry, *tensors)
        else:
            outputs = entry.run_forward(tensors)
        return jax.tree_util.tree_unflatten(entry.out_treedef, outputs)

    # Disabled for dynamo: should dynamo ever trace this as a frame of its own (a graph break
    # before the nonstrict-traced entry point), it must run it as Python, not trace JAX calls.
    @torch.compiler.disable
    def _call_via_custom_ops(self, args: tuple, kwargs: dict) -> Any:
        """The same call through the spike_bridge::jax_* custom ops (used under torch.compile;
        callable eagerly as well, e.g. to compare both paths)."""
        entry, tensors = self._entry_and_tensors(args, kwargs, specialize_shapes=True)
        entry.ensure_output_specs()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            flat = _jax_forward_with_residuals_op(tensors, entry.name)
            outputs = flat[: len(entry.output_specs)]
        else:
            outputs = _jax_forward_op(tensors, entry.name)
        return jax.tree_util.tree_unflatten(entry.out_treedef, list(outputs))

    # -- cache -----------------------------------------------------------------------------

    def _mark_static(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Wrap the static_argnames arguments so that flattening keeps each one whole."""
        args = list(args)
        kwargs = dict(kwargs)
        for name, position in self._static_positions:
            if name in kwargs:
                kwargs[name] = _StaticArgument(kwargs[name])
            elif position is not None and position < len(args):
                args[position] = _StaticArgument(args[position])
        return tuple(args), kwargs

    def _entry_and_tensors(
        self, args: tuple, kwargs: dict, specialize_shapes: bool = False
    ) -> tuple[_CacheEntry, list[torch.Tensor]]:
        """The cache entry for this call signature (built on first use) and the tensor leaves.

        ``specialize_shapes``: turn symbolic sizes (torch.compile with dynamic shapes) into
        ints, which makes torch.compile guard on them; XLA compiles per shape anyway.
        """
        if self._static_positions:
            args, kwargs = self._mark_static(args, kwargs)
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        tensors = []
        key = [treedef]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                tensors.append(leaf)
                shape = tuple(int(size) for size in leaf.shape) if specialize_shapes else leaf.shape
                key.append((shape, leaf.dtype, leaf.device))
            else:
                # The type is part of the key: 1, 1.0 and True are equal and hash alike.
                key.append((type(leaf), leaf))
        key = tuple(key)
        try:
            entry = self._cache.get(key)
        except TypeError:
            raise self._unhashable_argument_error(args, kwargs, leaves) from None
        if entry is None:
            entry = self._new_entry(key, args, kwargs, leaves, treedef)
        return entry, tensors

    def _new_entry(
        self, key: tuple, args: tuple, kwargs: dict, leaves: list[Any], treedef: Any
    ) -> _CacheEntry:
        tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self._check_arguments(args, kwargs, leaves, tensor_positions)
        tensors = [leaves[i] for i in tensor_positions]
        input_specs = [_TensorSpec(tuple(int(size) for size in t.shape), t.dtype) for t in tensors]
        leaf_template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        shapes = ",".join(_short_spec(spec.shape, spec.dtype) for spec in input_specs)
        # The name is unique in this process by its counters. The digest of what determines the
        # compiled program (code, argument structure, static values, device) keeps it from
        # naming a different program in another process, where torch.compile's on-disk caches
        # could otherwise reuse a graph built for the old one.
        signature = repr((self._code_fingerprint, treedef, leaf_template, tensors[0].device))
        digest = hashlib.sha1(signature.encode()).hexdigest()[:12]
        name = f"{self.registry_name}/{len(self._cache)}({shapes})@{digest}"
        entry = _CacheEntry(
            name, self.fn, treedef, leaf_template, tensor_positions, input_specs, tensors[0].device
        )
        entry.register()
        entry.owner = weakref.ref(self)
        self._cache[key] = entry
        return entry

    def _mark_used(self, entry: _CacheEntry) -> None:
        """Record a call of ``entry``; release the programs of the least recently used entries
        beyond :data:`COMPILED_ENTRIES_PER_FUNCTION` (a program that is needed again compiles
        again). Without a bound, a process that meets ever new shapes or static values (e.g.
        adaptive buffers following drifting activity) piles up executables until mmap fails."""
        self._compiled[entry.name] = entry
        self._compiled.move_to_end(entry.name)
        while len(self._compiled) > COMPILED_ENTRIES_PER_FUNCTION:
            _, oldest = self._compiled.popitem(last=False)
            oldest.release_programs()

    # -- argument checks (run once per cache entry, or when a lookup fails) -----------------

    def _check_arguments(
        self, args: tuple, kwargs: dict, leaves: list[Any], tensor_positions: list[int]
    ) -> None:
        def name(leaf_index: int) -> str:
            return self._namer.name(args, kwargs, leaf_index)

        if not tensor_positions:
            raise ValueError(
                f"{_PREFIX}: {self.registry_name} was called without any torch.Tensor argument; "
                "tensor leaves are the traced inputs, everything else is static"
            )
        for index, leaf in enumerate(leaves):
            if type(leaf) is _StaticArgument and any(
                isinstance(inner, torch.Tensor) for inner in jax.tree_util.tree_leaves(leaf.value)
            ):
                raise TypeError(
                    f"{_PREFIX}: argument {name(index)} is named in static_argnames but holds a "
                    "torch.Tensor; static arguments must be hashable non-tensor values"
                )
        first_device = leaves[tensor_positions[0]].device
        for index in tensor_positions:
            tensor = leaves[index]
            _check_tensor_dtype(tensor, name(index))
            if tensor.layout is not torch.strided:
                raise TypeError(
                    f"{_PREFIX}: argument {name(index)} has layout {tensor.layout}; only dense "
                    "(strided) tensors can cross to JAX"
                )
            if tensor.device != first_device:
                raise ValueError(
                    f"{_PREFIX}: all tensor arguments must be on one device, but argument "
                    f"{name(tensor_positions[0])} is on {first_device} and argument "
                    f"{name(index)} is on {tensor.device}"
                )

    def _unhashable_argument_error(self, args: tuple, kwargs: dict, leaves: list[Any]) -> TypeError:
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) and not _is_hashable(leaf):
                value = _unwrap_static(leaf)
                return TypeError(
                    f"{_PREFIX}: argument {self._namer.name(args, kwargs, index)} is a "
                    f"{type(value).__module__}.{type(value).__qualname__}, which is not a "
                    "torch.Tensor and so is treated as static; static arguments must be "
                    "hashable. Pass arrays as torch tensors."
                )
        return TypeError(f"{_PREFIX}: an argument of {self.registry_name} is not hashable")

    def cache_info(self) -> BridgeCacheInfo:
        """Counters over this function's cache entries (for tests and diagnostics)."""
        entries = list(self._cache.values())
        return BridgeCacheInfo(
            entries=len(entries),
            compiled_entries=len(self._compiled),
            traces=sum(e.traces for e in entries),
            forward_calls=sum(e.forward_calls for e in entries),
            forward_with_vjp_calls=sum(e.forward_with_vjp_calls for e in entries),
            backward_calls=sum(e.backward_calls for e in entries),
        )


def _check_tensor_dtype(tensor: torch.Tensor, argument_name: str) -> None:
    dtype = tensor.dtype
    if dtype in _SUPPORTED_INPUT_DTYPES:
        return
    if dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{_PREFIX}: argument {argument_name} has dtype {dtype}; half-precision inputs are not "
            "supported (they would lose precision silently). Cast it, e.g. x.float(), or cast "
            "inside the JAX function."
        )
    raise TypeError(
        f"{_PREFIX}: argument {argument_name} has dtype {dtype}; supported are float32 and "
        "float64 (differentiable) and bool, uint8, int8, int16, int32, int64 (no gradient)"
    )


def register_static_type(cls: type) -> type:
    """Let instances of the frozen dataclass ``cls`` be static arguments under ``torch.compile``.

    Under compilation arguments cross ``torch.compiler.nonstrict_trace`` through torch's pytree,
    which knows scalars, strings and containers but not arbitrary classes. Registering ``cls``
    there (its fields become leaves, rebuilt into an equal instance on the other side) makes it
    pass; JAX's pytree is unaffected, so on the JAX side the instance stays one static leaf.
    Idempotent; returns ``cls`` (usable as a class decorator).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(
            f"{_PREFIX}.register_static_type: {cls!r} is not a dataclass; register other types "
            "with torch.utils._pytree.register_pytree_node"
        )
    if not cls.__dataclass_params__.frozen:
        raise TypeError(
            f"{_PREFIX}.register_static_type: {cls.__qualname__} must be a frozen dataclass "
            "(static arguments are hashed and must not change)"
        )
    with _ENTRY_REGISTRY_LOCK:
        if cls not in torch.utils._pytree.SUPPORTED_NODES:
            torch.utils._pytree.register_dataclass(cls)
    return cls


class _NamedTupleBox:
    """Carries a NamedTuple output out of the nonstrict-traced entry point.

    Dynamo fails to rebuild NamedTuples returned by a ``nonstrict_trace`` function (torch's
    pytree files them all under the key ``collections.namedtuple``, a lookup dynamo does not
    trace: a KeyError in ``tree_unflatten``). Outputs hold this box instead; its registered
    unflatten builds the original NamedTuple, so callers get the same output as in eager mode.
    """

    __slots__ = ("cls", "values")

    def __init__(self, cls: type, values: tuple):
        self.cls, self.values = cls, values


torch.utils._pytree.register_pytree_node(
    _NamedTupleBox,
    lambda box: (list(box.values), box.cls),
    lambda values, cls: cls(*values),
    serialized_type_name=f"{__name__}._NamedTupleBox",
)


def _pack_namedtuples(tree: Any) -> Any:
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return _NamedTupleBox(type(tree), tuple(_pack_namedtuples(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_pack_namedtuples(v) for v in tree)
    if isinstance(tree, dict):
        return type(tree)((k, _pack_namedtuples(v)) for k, v in tree.items())
    return tree


@dataclasses.dataclass(frozen=True)
class _NoneArgument:
    """Stands for a ``None`` argument while it crosses ``nonstrict_trace`` (which refuses None)."""


_NONE_ARGUMENT = register_static_type(_NoneArgument)()


def _restore_none(value: Any) -> Any:
    return None if isinstance(value, _NoneArgument) else value


@torch.compiler.nonstrict_trace
def _call_via_custom_ops(function_name: str, args: tuple, kwargs: dict) -> Any:
    """torch.compile entry point: dynamo does not trace into this function (it cannot trace JAX);
    AOTAutograd runs it on fake tensors, which records the spike_bridge::jax_* custom ops."""
    args = tuple(_restore_none(a) for a in args)
    kwargs = {k: _restore_none(v) for k, v in kwargs.items()}
    outputs = _FUNCTION_REGISTRY[function_name]._call_via_custom_ops(args, kwargs)
    return _pack_namedtuples(outputs)


def jax_function(
    fn: Callable | None = None, static_argnames: str | Iterable[str] = ()
) -> JaxFunction | Callable[[Callable], JaxFunction]:
    """Make the JAX function ``fn`` callable on torch tensors, with autograd and torch.compile.

    Args:
        fn: a JAX-traceable function. Its arguments are pytrees (tuple, list, dict, NamedTuple,
            any registered JAX pytree); its output is a pytree of arrays.
        static_argnames: parameters passed to ``fn`` unchanged and whole (must be hashable, must
            not hold tensors). Without it, every non-tensor *leaf* of the arguments is static.

    Returns:
        A :class:`JaxFunction`. Calling it with the same kinds of arguments as ``fn``, but
        ``torch.Tensor`` in place of arrays, returns ``fn``'s output pytree with torch tensors
        as leaves.

    Inputs: float32/float64 tensors are differentiable; bool/uint8/int8..int64 tensors are
    allowed and receive ``None`` gradients; float16/bfloat16/complex raise TypeError. All tensors
    must be on one device (cpu, or cuda with a CUDA-enabled jaxlib). Outputs keep the dtype JAX
    computes (float32 stays float32: the bridge never promotes).

    Under ``torch.compile`` static arguments pass through torch's pytree: scalars, strings and
    containers of them work as they are; register a frozen dataclass once with
    ``torch.utils._pytree.register_dataclass(cls)``.

    Usable as ``jax_function(fn)``, ``@jax_function`` or ``@jax_function(static_argnames=...)``.
    """
    if fn is None:
        return functools.partial(jax_function, static_argnames=static_argnames)
    return JaxFunction(fn, static_argnames)
