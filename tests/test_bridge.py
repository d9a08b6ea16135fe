"""Tests of spike_bridge.bridge: JAX functions called on torch tensors, with autograd."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.utils._pytree
from torch.utils.data import DataLoader, TensorDataset

from spike_bridge import bridge
from spike_bridge.bridge import DOUBLE_BACKWARD_MESSAGE, jax_function


def float64_tensor(*shape: int, seed: int = 0, requires_grad: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64)
    return tensor.requires_grad_(requires_grad)


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """An independent copy (through numpy) for reference computations."""
    return jnp.asarray(tensor.detach().numpy())


# --------------------------------------------------------------------------------------------
# Functions under test (x: f64[...] unless stated)
# --------------------------------------------------------------------------------------------


def sin_times_square(x):
    return jnp.sin(x) * x**2


def tanh_matmul(a, b):
    """a: [m, k], b: [k, n] -> [m, n]."""
    return jnp.tanh(a @ b)


def leaky_rnn(weights, inputs, state):
    """lax.scan over time.

    weights: [h, h], inputs: [t, h], state: [h] -> (final state [h], all states [t, h]).
    """

    def step(carry, x_t):
        new = 0.9 * carry + jnp.tanh(weights @ carry + x_t)
        return new, new

    return jax.lax.scan(step, state, inputs)


class Moments(NamedTuple):
    mean: jax.Array
    spread: jax.Array


def pytree_in_and_out(params, batch):
    """params: {'w': [k], 'b': []}, batch: Moments of [n, k] -> {'y': [n], 'moments': Moments}."""
    y = batch.mean @ params["w"] + params["b"]
    return {"y": y, "moments": Moments(jnp.mean(y), jnp.sum(batch.spread**2) * params["b"])}


def gather_scaled(x, indices, power, mode):
    """x: [n] float, indices: [m] int, power: static int, mode: static str -> [m]."""
    picked = x[indices] ** power
    return picked if mode == "plain" else jnp.cumsum(picked)


# --------------------------------------------------------------------------------------------
# gradcheck in float64
# --------------------------------------------------------------------------------------------


def test_gradcheck_elementwise():
    bridged = jax_function(sin_times_square)
    assert torch.autograd.gradcheck(bridged, (float64_tensor(7),))


def test_gradcheck_matmul():
    bridged = jax_function(tanh_matmul)
    assert torch.autograd.gradcheck(bridged, (float64_tensor(3, 4), float64_tensor(4, 2, seed=1)))


def test_gradcheck_scan_loop():
    bridged = jax_function(leaky_rnn)
    weights = (float64_tensor(3, 3) * 0.5).detach().requires_grad_()
    inputs, state = float64_tensor(5, 3, seed=1), float64_tensor(3, seed=2)
    assert torch.autograd.gradcheck(bridged, (weights, inputs, state))


def test_gradcheck_pytree_inputs_and_outputs():
    bridged = jax_function(pytree_in_and_out)

    def flat(w, b, mean, spread):
        out = bridged({"w": w, "b": b}, Moments(mean, spread))
        assert isinstance(out["moments"], Moments)
        return out["y"], out["moments"].mean, out["moments"].spread

    inputs = (float64_tensor(3), float64_tensor(seed=1), float64_tensor(4, 3, seed=2),
              float64_tensor(2, seed=3))
    assert torch.autograd.gradcheck(flat, inputs)


def test_gradcheck_int_and_static_arguments():
    bridged = jax_function(gather_scaled, static_argnames=("mode",))
    indices = torch.tensor([4, 0, 2, 2])
    for mode in ("plain", "cumulative"):
        assert torch.autograd.gradcheck(
            lambda x: bridged(x, indices, 3, mode=mode), (float64_tensor(5),)
        )
    x = float64_tensor(5)
    bridged(x, indices, 2, mode="plain").sum().backward()
    expected = torch.zeros(5, dtype=torch.float64)
    expected.index_add_(0, indices, 2 * x.detach()[indices])
    torch.testing.assert_close(x.grad, expected)


def test_gradcheck_through_custom_op_path():
    bridged = jax_function(tanh_matmul)

    def through_ops(a, b):
        return bridged._call_via_custom_ops((a, b), {})

    assert torch.autograd.gradcheck(
        through_ops, (float64_tensor(3, 4), float64_tensor(4, 2, seed=1))
    )


# --------------------------------------------------------------------------------------------
# Results, zero copy, caching
# --------------------------------------------------------------------------------------------


def test_results_equal_direct_jax_call():
    """The no-grad path runs the same XLA program as jax.jit: bit-identical. The gradient path
    runs the forward inside jax.vjp (a differently fused program): equal to rounding."""
    cases = [
        (tanh_matmul, (float64_tensor(3, 4), float64_tensor(4, 2, seed=1))),
        (
            leaky_rnn,
            (float64_tensor(3, 3), float64_tensor(5, 3, seed=1), float64_tensor(3, seed=2)),
        ),
    ]
    for function, tensors in cases:
        with jax.enable_x64(True):  # float64 as the bridge computes (whatever the global flag)
            expected = jax.tree_util.tree_leaves(jax.jit(function)(*map(to_jax, tensors)))
        bridged = jax_function(function)
        with torch.no_grad():
            plain = jax.tree_util.tree_leaves(bridged(*tensors))
        with_grad = jax.tree_util.tree_leaves(bridged(*tensors))
        for expected_leaf, plain_leaf, grad_leaf in zip(expected, plain, with_grad):
            np.testing.assert_array_equal(plain_leaf.numpy(), np.asarray(expected_leaf))
            np.testing.assert_allclose(
                grad_leaf.detach().numpy(), np.asarray(expected_leaf), rtol=1e-14, atol=1e-15
            )


def test_conversions_are_zero_copy_on_cpu():
    tensor = torch.arange(12.0).reshape(3, 4)
    array = bridge._cpu_tensor_to_jax(tensor, jax.devices("cpu")[0])
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    result = jnp.cos(array)
    back = bridge._cpu_jax_to_tensor(result)
    assert back.data_ptr() == result.unsafe_buffer_pointer()
    np.testing.assert_array_equal(back.numpy(), np.asarray(jnp.cos(jnp.asarray(tensor.numpy()))))


def test_bridge_shares_memory_with_jax_both_ways(monkeypatch):
    """Spy on the conversions of a bridged call: the arrays JAX receives are the input tensors'
    memory, and the output tensors are the memory of the arrays JAX returned."""
    to_jax_calls, to_torch_calls = [], []
    original_to_jax, original_to_torch = bridge._cpu_tensor_to_jax, bridge._cpu_jax_to_tensor

    def spy_to_jax(tensor, device):
        array = original_to_jax(tensor, device)
        to_jax_calls.append((tensor.data_ptr(), array.unsafe_buffer_pointer()))
        return array

    def spy_to_torch(array):
        tensor = original_to_torch(array)
        to_torch_calls.append((array.unsafe_buffer_pointer(), tensor.data_ptr()))
        return tensor

    monkeypatch.setattr(bridge, "_cpu_tensor_to_jax", spy_to_jax)
    monkeypatch.setattr(bridge, "_cpu_jax_to_tensor", spy_to_torch)
    bridged = jax_function(tanh_matmul)  # its cache entry picks up the spies
    a, b = float64_tensor(3, 4), float64_tensor(4, 2, seed=1)
    out = bridged(a, b)
    out.sum().backward()
    # the zero-copy path computes the right gradient: d/da sum tanh(a b) = (1 - tanh^2) b^T
    torch.testing.assert_close(a.grad, (1 - out.detach() ** 2) @ b.detach().T)
    assert len(to_jax_calls) == 3 and len(to_torch_calls) == 3  # 2 inputs + 1 cotangent; 1 + 2
    assert all(source == target for source, target in to_jax_calls + to_torch_calls)
    assert any(target == out.data_ptr() for _, target in to_torch_calls)


def test_non_contiguous_inputs_are_made_contiguous():
    bridged = jax_function(tanh_matmul)
    a_t = float64_tensor(4, 3)
    a = a_t.t()  # [3, 4], not contiguous
    assert not a.is_contiguous()
    b = float64_tensor(4, 2, seed=1)
    torch.testing.assert_close(bridged(a, b), torch.tanh(a @ b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(bridged, (a, b))
    # A view at an odd storage offset is contiguous but misaligned for XLA, which copies it.
    storage = float64_tensor(13)
    offset_view = storage[1:]
    torch.testing.assert_close(
        jax_function(sin_times_square)(offset_view), torch.sin(offset_view) * offset_view**2
    )


def test_no_grad_path_keeps_no_residuals():
    bridged = jax_function(sin_times_square)
    x = float64_tensor(5)
    with torch.no_grad():
        y = bridged(x)
    assert y.grad_fn is None and not y.requires_grad
    y_plain = bridged(x.detach())  # grad enabled, but no input requires grad
    assert y_plain.grad_fn is None
    info = bridged.cache_info()
    assert info.forward_calls == 2 and info.forward_with_vjp_calls == 0
    y_grad = bridged(x)
    assert y_grad.grad_fn is not None
    assert bridged.cache_info().forward_with_vjp_calls == 1
    torch.testing.assert_close(y, y_grad.detach(), rtol=0, atol=0)


def test_residuals_are_freed_by_backward_unless_the_graph_is_retained():
    bridged = jax_function(sin_times_square)
    x = float64_tensor(4)
    y = bridged(x).sum()
    node = y.grad_fn.next_functions[0][0]  # the bridge's autograd node (its ctx)
    assert node.residuals
    y.backward(retain_graph=True)
    assert node.residuals
    first_grad = x.grad.clone()
    y.backward()
    assert node.residuals is None
    torch.testing.assert_close(x.grad, 2 * first_grad)


def test_same_signature_compiles_once():
    traces = []

    def counted(x, w):
        traces.append(1)  # runs only while JAX traces
        return jnp.tanh(x * w).sum(axis=-1)

    bridged = jax_function(counted)
    x, w = torch.randn(10, 3), torch.randn(3, requires_grad=True)
    with torch.no_grad():
        for _ in range(100):
            bridged(x, w)
    assert len(traces) == 1
    for _ in range(100):
        bridged(x, w).sum().backward()
    assert len(traces) == 2  # the forward-with-VJP function is a second jitted function
    expected = 100 * ((1 - torch.tanh(x * w.detach()) ** 2) * x).sum(0)
    # every backward ran and accumulated (float32 sums of 100 terms)
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-4)
    info = bridged.cache_info()
    assert (info.entries, info.forward_calls, info.forward_with_vjp_calls, info.backward_calls) == (
        1, 100, 100, 100,
    )
    bridged(torch.randn(11, 3), w)  # a new shape is a new cache entry
    assert bridged.cache_info().entries == 2


def test_static_values_are_part_of_the_cache_key():
    bridged = jax_function(lambda x, scale: x * scale)
    x = torch.ones(3)
    assert bridged(x, 2).tolist() == [2.0, 2.0, 2.0]
    assert bridged(x, 3).tolist() == [3.0, 3.0, 3.0]
    assert bridged(x, 2.0).dtype == torch.float32  # 2 and 2.0 are different keys
    assert bridged.cache_info().entries == 3


def _memory_maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_only_recently_used_entries_keep_compiled_programs(monkeypatch):
    """A process that meets ever new static values (or shapes) keeps at most
    COMPILED_ENTRIES_PER_FUNCTION entries' programs per function: the others are freed (with
    the memory maps of their machine code) and compile again when called."""
    monkeypatch.setattr(bridge, "COMPILED_ENTRIES_PER_FUNCTION", 3)
    traces = []

    def scaled(x, scale):
        traces.append(scale)
        return jnp.sin(x) * scale

    bridged = jax_function(scaled, static_argnames="scale")
    x = torch.linspace(0.0, 1.0, 5, dtype=torch.float64, requires_grad=True)
    for scale in range(1, 7):
        bridged(x, scale).sum().backward()
    info = bridged.cache_info()
    assert (info.entries, info.compiled_entries) == (6, 3)
    traced = len(traces)
    x.grad = None
    bridged(x, 1).sum().backward()  # released: compiles again, same values
    assert len(traces) > traced
    torch.testing.assert_close(x.grad, torch.cos(x.detach()))
    bridged(x, 6).sum().backward()  # still compiled
    assert bridged.cache_info().compiled_entries == 3


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_new_static_values_do_not_pile_up_memory_maps(monkeypatch):
    """Compiled code lives in memory maps (vm.max_map_count, 65,530 by default, is a hard
    limit: a long training run used to die there); with a bound the count stays flat."""

    def maps_after_new_programs(limit: int, count: int = 40) -> int:
        monkeypatch.setattr(bridge, "COMPILED_ENTRIES_PER_FUNCTION", limit)
        bridged = jax_function(lambda x, scale: jnp.cumsum(jnp.sin(x) * scale),
                               static_argnames="scale")
        x = torch.ones(7)
        with torch.no_grad():
            bridged(x, 0.5)
            start = _memory_maps()
            for scale in range(count):
                bridged(x, scale)
        return _memory_maps() - start

    unbounded = maps_after_new_programs(limit=10_000)
    bounded = maps_after_new_programs(limit=2)
    assert unbounded > 100  # each program maps its code
    assert bounded < unbounded / 4


def test_decorator_forms_and_keyword_static_arguments():
    @jax_function
    def add(x, y):
        return x + y

    @jax_function(static_argnames="axes")
    def total(x, *, axes):
        return jnp.sum(x, axis=axes)

    x = torch.ones(2, 3, 4)
    assert add(x, x).sum().item() == 48.0
    assert total(x, axes=(0, 2)).tolist() == [8.0, 8.0, 8.0]
    assert total.__name__ == "total"


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtype_is_preserved_forward_and_backward(dtype):
    bridged = jax_function(lambda x, w: jnp.sin(x) * 2.0 + w @ w)  # Python scalars stay weak
    x = torch.randn(4, dtype=dtype, requires_grad=True)
    w = torch.randn(4, dtype=dtype, requires_grad=True)
    y = bridged(x, w)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()))


def test_output_dtype_is_what_jax_computes():
    bridged = jax_function(lambda x: (x.astype(jnp.float64), (x > 0), jnp.argmax(x)))
    x = torch.randn(5, requires_grad=True)
    wide, positive, index = bridged(x)
    assert (wide.dtype, positive.dtype, index.dtype) == (torch.float64, torch.bool, torch.int64)
    assert wide.requires_grad and not positive.requires_grad and not index.requires_grad
    (3 * wide).sum().backward()  # the bool/int outputs get float0 cotangents inside JAX
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.full((5,), 3.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_raise_naming_the_argument(dtype):
    bridged = jax_function(tanh_matmul)
    with pytest.raises(TypeError, match=r"argument 'b' has dtype torch\.(float16|bfloat16)"):
        bridged(torch.ones(2, 2), torch.ones(2, 2, dtype=dtype))


def test_complex_inputs_raise():
    with pytest.raises(TypeError, match="argument 'x' has dtype torch.complex64"):
        jax_function(sin_times_square)(torch.ones(2, dtype=torch.complex64))


# --------------------------------------------------------------------------------------------
# Gradients of unused outputs, aliasing, in-place edits, double backward
# --------------------------------------------------------------------------------------------


def two_outputs(x):
    return jnp.sin(x), jnp.exp(x)


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_unused_outputs_get_zero_cotangents(path):
    bridged = jax_function(two_outputs)
    x = float64_tensor(4)
    call = bridged if path == "eager" else lambda t: bridged._call_via_custom_ops((t,), {})
    sine, _ = call(x)
    (grad_only_sine,) = torch.autograd.grad(sine.sum(), x)
    torch.testing.assert_close(grad_only_sine, torch.cos(x.detach()))
    _, exponential = call(x)
    (grad_only_exp,) = torch.autograd.grad(exponential.sum(), x)
    torch.testing.assert_close(grad_only_exp, torch.exp(x.detach()))


def test_duplicate_outputs_do_not_share_memory():
    first, second = jax_function(lambda x: (x * 2, x * 2))(torch.ones(3))
    first.add_(1)
    assert second.tolist() == [2.0, 2.0, 2.0]


def test_in_place_edit_of_output_before_backward_raises():
    bridged = jax_function(jnp.exp)  # the VJP reuses the output
    y = bridged(float64_tensor(3))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_double_backward_raises_clear_error(path):
    bridged = jax_function(sin_times_square)
    call = bridged if path == "eager" else lambda t: bridged._call_via_custom_ops((t,), {})
    x = float64_tensor(3)
    (grad,) = torch.autograd.grad(call(x).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.cos(x) * x**2 + 2 * x * torch.sin(x))
    with pytest.raises(RuntimeError, match="double backward through a JAX function"):
        torch.autograd.grad(grad.sum(), x)
    assert "spike_bridge.bridge" in DOUBLE_BACKWARD_MESSAGE


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_tensors_on_different_devices_raise():
    bridged = jax_function(tanh_matmul)
    with pytest.raises(ValueError, match=r"argument 'a' is on cpu and argument 'b' is on meta"):
        bridged(torch.ones(2, 2), torch.ones(2, 2, device="meta"))


def test_unsupported_device_raises():
    with pytest.raises(ValueError, match="'meta' devices are not supported"):
        jax_function(sin_times_square)(torch.ones(2, device="meta"))


def test_unhashable_static_argument_raises_naming_it():
    bridged = jax_function(pytree_in_and_out)
    params = {"w": torch.ones(3), "b": np.float32(1.0) * np.ones(1)}  # an ndarray leaf
    batch = Moments(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(TypeError, match=r"argument 'params\['b'\]' is a numpy\.ndarray"):
        bridged(params, batch)


def test_static_argnames_must_not_hold_tensors_and_must_exist():
    bridged = jax_function(gather_scaled, static_argnames=("mode",))
    with pytest.raises(TypeError, match="argument 'mode' is named in static_argnames"):
        bridged(torch.ones(3), torch.tensor([0]), 1, mode=(torch.ones(1),))
    with pytest.raises(ValueError, match="'nope', which is not a parameter"):
        jax_function(gather_scaled, static_argnames=("nope",))


def test_call_without_tensors_raises():
    with pytest.raises(ValueError, match="without any torch.Tensor argument"):
        jax_function(sin_times_square)(1.0)


# --------------------------------------------------------------------------------------------
# torch.compile and the custom ops
# --------------------------------------------------------------------------------------------


class BridgedRegressor(torch.nn.Module):
    """Linear layer, then a bridged JAX function with an int input and a dict output."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3, dtype=torch.float64)
        self.readout = torch.nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))
        self.head = jax_function(self.jax_head, static_argnames=("sharpness",))

    @staticmethod
    def jax_head(hidden, readout, counts, sharpness):
        scores = jnp.tanh(sharpness * hidden) @ readout
        return {"scores": scores * counts, "active": jnp.sum(hidden > 0)}

    def forward(self, x, counts):
        out = self.head(self.linear(x), self.readout, counts, sharpness=2.0)
        return out["scores"].square().mean(), out["active"]


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_fullgraph_matches_eager(backend):
    """aot_eager runs dynamo + AOTAutograd (our fake kernels and autograd registration);
    inductor (the default backend) also compiles the torch code around the custom ops."""
    torch.manual_seed(0)
    model = BridgedRegressor()
    x = torch.randn(6, 4, dtype=torch.float64)
    counts = torch.arange(6)

    eager_loss, eager_active = model(x, counts)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    compiled_loss, compiled_active = compiled(x, counts)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=1e-12)
    assert compiled_active.item() == eager_active.item()
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        inference_loss, _ = compiled(x, counts)
    torch.testing.assert_close(inference_loss, eager_loss.detach(), rtol=1e-12, atol=1e-12)
    info = model.head.cache_info()
    assert info.forward_calls >= 1 and info.forward_with_vjp_calls >= 2


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A frozen-dataclass static argument, as jax_kernels' neuron models are."""

    factor: float


# nonstrict_trace passes arguments through torch's pytree; a dataclass must be registered there.
torch.utils._pytree.register_dataclass(Scaling)


def test_torch_compile_with_a_frozen_dataclass_static_argument():
    bridged = jax_function(
        lambda x, scaling: jnp.tanh(x) * scaling.factor, static_argnames="scaling"
    )

    def loss(x, scaling):
        return bridged(x, scaling=scaling).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = float64_tensor(4)
    for factor in (2.0, 3.0):  # a new static value recompiles
        (eager_grad,) = torch.autograd.grad(loss(x, Scaling(factor)), x)
        (compiled_grad,) = torch.autograd.grad(compiled(x, Scaling(factor)), x)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-12)


def test_custom_op_path_equals_eager_path():
    bridged = jax_function(pytree_in_and_out)
    params = {"w": float64_tensor(3), "b": float64_tensor(seed=1)}
    batch = Moments(float64_tensor(4, 3, seed=2), float64_tensor(2, seed=3))
    eager = bridged(params, batch)
    via_ops = bridged._call_via_custom_ops((params, batch), {})
    leaves = [params["w"], params["b"], batch.mean, batch.spread]
    leaf_pairs = zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(via_ops))
    for eager_leaf, op_leaf in leaf_pairs:
        assert torch.equal(eager_leaf, op_leaf)
    eager_grads = torch.autograd.grad(eager["y"].sum() + eager["moments"].spread, leaves)
    op_grads = torch.autograd.grad(via_ops["y"].sum() + via_ops["moments"].spread, leaves)
    for eager_grad, op_grad in zip(eager_grads, op_grads):
        assert torch.equal(eager_grad, op_grad)


def test_opcheck_passes_on_the_custom_ops():
    bridged = jax_function(gather_scaled, static_argnames=("mode",))
    x, indices = float64_tensor(5), torch.tensor([4, 0, 2])
    bridged(x, indices, 2, mode="cumulative").sum().backward()  # builds and runs the entry
    entry, tensors = bridged._entry_and_tensors((x, indices, 2), {"mode": "cumulative"})
    ops = torch.ops.spike_bridge
    torch.library.opcheck(ops.jax_forward_with_residuals.default, (tensors, entry.name))
    torch.library.opcheck(ops.jax_forward.default, ([x.detach(), indices], entry.name))
    outputs_and_residuals = ops.jax_forward_with_residuals(
        [x.detach(), indices], entry.name
    )
    residuals = outputs_and_residuals[len(entry.output_specs):]
    # The backward op's own backward raises by design (no double backward), so its autograd
    # and AOT tests do not apply.
    torch.library.opcheck(
        ops.jax_backward.default,
        (residuals, [torch.ones(3, dtype=torch.float64)], entry.name),
        test_utils=("test_schema", "test_faketensor"),
    )


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------


def test_dataloader_workers_feed_a_bridged_function():
    """Workers run pure torch (TensorDataset, default collate); JAX stays in this process.
    forkserver workers are forked from a fresh server process, never from this multithreaded one."""
    bridged = jax_function(lambda x, y: jnp.mean((jnp.tanh(x) - y) ** 2, axis=-1))
    inputs = float64_tensor(40, 5, requires_grad=False)
    targets = float64_tensor(40, 5, seed=1, requires_grad=False)
    loader = DataLoader(
        TensorDataset(inputs, targets), batch_size=8, num_workers=2,
        multiprocessing_context="forkserver",
    )
    losses = torch.cat([bridged(x, y) for x, y in loader])
    torch.testing.assert_close(losses, torch.mean((torch.tanh(inputs) - targets) ** 2, dim=-1))
