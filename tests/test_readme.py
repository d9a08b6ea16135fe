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
