"""The README's "Quick start" example is run as a test."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"

SEQUENTIAL = """\
net = nn.Sequential(
    BinnedLatencyEncoder(n_bins=1, T=2.0),
    ThetaLinear(784, 100), ThetaLinear(100, 100), ThetaLinear(100, 10),
    FirstSpikeTime(),
)"""


def section(title: str) -> str:
    """The text of the README section ``## title`` (up to the next ``## `` heading)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text,
                      flags=re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)


def test_quick_start_example_runs():
    blocks = python_blocks(section("Quick start"))
    assert blocks, "the Quick start section has no ```python code block"
    code = "\n".join(blocks)
    assert SEQUENTIAL in code
    for needed in ("first_spike_cross_entropy", "torch.optim", ".backward()", ".step()"):
        assert needed in code

    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, f"{README}:Quick start", "exec"), namespace)

    net, loss = namespace["net"], namespace["loss"]
    assert [type(m).__name__ for m in net] == [
        "BinnedLatencyEncoder", "ThetaLinear", "ThetaLinear", "ThetaLinear", "FirstSpikeTime"
    ]
    first_times = namespace["first_times"]
    assert first_times.shape == (namespace["images"].shape[0], 10)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    for layer in net[1:4]:
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        assert ((0 <= layer.initial_state) & (layer.initial_state <= 6.0)).all()
    assert re.search(r"loss \d+\.\d{3}, accuracy \d\.\d\d", output.getvalue())


def _run_block(title: str, index: int = 0) -> dict:
    blocks = python_blocks(section(title))
    assert len(blocks) > index, f"the {title} section has no ```python code block {index}"
    namespace = {"__name__": "__readme__"}
    exec(compile(blocks[index], f"{README}:{title}", "exec"), namespace)
    return namespace


def test_kernels_example_runs():
    """The block asserts its buffers sufficed; here: shapes, finite non-zero gradients, and the
    vmapped weight sets agree with separate calls."""
    import jax
    import numpy as np

    ns = _run_block("Kernels")
    out, grad, many, w = ns["out"], ns["grad"], ns["many"], ns["w"]
    assert out.spike_times.shape == (32, 10, 4) and out.filled_times.shape == (32, 10, 4)
    assert grad.shape == w.shape and np.isfinite(np.asarray(grad)).all()
    assert np.abs(np.asarray(grad)).max() > 0
    assert int(np.asarray(out.spike_count).sum()) > 0  # the layer is not silent
    np.testing.assert_allclose(np.asarray(many.filled_times[0]), np.asarray(out.filled_times),
                               rtol=1e-6)
    doubled = jax.jit(ns["layer"])(2 * w, ns["x0"], ns["x"])
    np.testing.assert_allclose(np.asarray(many.filled_times[1]),
                               np.asarray(doubled.filled_times), rtol=1e-6)


def test_bridge_example_runs():
    """The block's gradients equal those of the same rollout written in torch."""
    torch.manual_seed(0)
    ns = _run_block("Bridge")
    params, out = ns["params"], ns["out"]
    assert out["final"].shape == (8,) and out["trajectory"].shape == (20, 8)
    w = params["w"].detach().clone().requires_grad_()
    b = params["b"].detach().clone().requires_grad_()
    x = ns["x0"]
    for _ in range(20):
        x = torch.tanh(w @ x + b)
    # float32, 20 tanh steps of a random 8x8 map: rounding differences grow along the way
    torch.testing.assert_close(x.detach(), out["final"].detach(), rtol=1e-3, atol=1e-4)
    x.square().sum().backward()
    assert w.grad.abs().max() > 0
    torch.testing.assert_close(params["w"].grad, w.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(params["b"].grad, b.grad, rtol=1e-3, atol=1e-3)


def test_training_with_the_library_example_runs():
    blocks = python_blocks(section("Training with the library"))
    assert blocks, "the section has no ```python code block"
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile("\n".join(blocks), f"{README}:Training", "exec"), namespace)
    net, metrics, hidden = namespace["net"], namespace["metrics"], namespace["hidden"]
    assert hidden.times.shape == (32, 100, net[1].max_spikes)
    assert set(metrics["activity_per_layer"]) == {"1", "2"}
    assert 0.0 <= metrics["accuracy_ordinary"] <= metrics["samples"] == 32
    decayed = namespace["optimizer"].param_groups[0]["params"]
    assert {id(p) for p in decayed} == {id(net[1].weight), id(net[2].weight)}
