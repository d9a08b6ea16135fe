"""Tests of the Yin-Yang dataset (spike_bridge.data) and a tiny run of examples/yin_yang.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spike_bridge.data import YIN_YANG_CLASSES, YinYangDataset, yin_yang_class


def class_by_hand(x: float, y: float) -> int:
    """The published rule for r_small = 0.1, r_big = 0.5, written out independently."""
    to_left_eye = math.sqrt((x - 0.25) ** 2 + (y - 0.5) ** 2)
    to_right_eye = math.sqrt((x - 0.75) ** 2 + (y - 0.5) ** 2)
    if to_left_eye < 0.1 or to_right_eye < 0.1:
        return 2
    if to_right_eye <= 0.1:
        return 1
    if 0.1 < to_left_eye <= 0.25:
        return 1
    if y > 0.5 and to_right_eye > 0.25:
        return 1
    return 0


# (x, y, class) worked out on paper for r_small = 0.1, r_big = 0.5.
HAND_POINTS = [
    (0.25, 0.5, 2),    # left eye centre
    (0.75, 0.5, 2),    # right eye centre
    (0.25, 0.58, 2),   # 0.08 from the left eye centre
    (0.25, 0.65, 1),   # 0.15 from the left eye: its ring
    (0.05, 0.5, 1),    # 0.2 from the left eye: its ring
    (0.5, 0.5, 1),     # symbol centre: 0.25 from both eyes, the left ring includes its edge
    (0.75, 0.65, 0),   # 0.15 above the right eye: its ring
    (0.95, 0.5, 0),    # 0.2 right of the right eye: its ring
    (0.5, 0.9, 1),     # upper half, 0.47 from the right eye
    (0.5, 0.1, 0),     # lower half, 0.47 from both eyes
    (0.85, 0.8, 1),    # upper half, 0.32 from the right eye
    (0.15, 0.2, 0),    # lower left, 0.32 from the left eye
]


@pytest.mark.parametrize("x, y, label", HAND_POINTS)
def test_class_rule_on_hand_computed_points(x, y, label):
    assert class_by_hand(x, y) == label  # the independent formula agrees with the paper work
    assert int(yin_yang_class(x, y)) == label


@pytest.fixture(scope="module")
def train_seed0():
    return YinYangDataset("train", seed=0)


def test_splits_have_published_sizes_and_mirrored_inputs(train_seed0):
    sizes = {split: len(YinYangDataset(split, seed=0)) for split in ("validation", "test")}
    assert (len(train_seed0), sizes["validation"], sizes["test"]) == (5000, 1000, 1000)
    inputs, labels = train_seed0.inputs, train_seed0.labels
    assert inputs.shape == (5000, 4) and inputs.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2}
    assert torch.equal(inputs[:, 2:], 1 - inputs[:, :2])
    x, y = inputs[:, 0].double(), inputs[:, 1].double()
    assert ((x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25 + 1e-6).all()  # inside the symbol's disc
    sample, label = train_seed0[3]
    assert torch.equal(sample, inputs[3]) and label == labels[3]
    assert len(YIN_YANG_CLASSES) == 3


def test_every_label_follows_the_rule(train_seed0):
    xy = train_seed0.inputs[:, :2].double()  # float32 storage: compare away from class borders
    labels = [class_by_hand(float(x), float(y)) for x, y in xy]
    agree = torch.tensor(labels) == train_seed0.labels
    assert agree.float().mean() > 0.998, int((~agree).sum())


def test_classes_are_balanced(train_seed0):
    counts = torch.bincount(train_seed0.labels, minlength=3)
    # Each class has probability 1/3 per sample: binomial std about 33 for 5000 samples.
    assert (counts - 5000 / 3).abs().max() < 150, counts.tolist()


def test_deterministic_per_seed_and_distinct_across_seeds_and_splits(train_seed0):
    again = YinYangDataset("train", seed=0)
    assert torch.equal(again.inputs, train_seed0.inputs)
    assert torch.equal(again.labels, train_seed0.labels)
    other_seed = YinYangDataset("train", seed=1)
    assert not torch.equal(other_seed.inputs, train_seed0.inputs)
    test = YinYangDataset("test", seed=0)
    assert not torch.equal(test.inputs, train_seed0.inputs[:1000])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        YinYangDataset("valid")
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        YinYangDataset("train", seed=-1)
    with pytest.raises(ValueError, match="r_small < r_big / 2"):
        YinYangDataset("train", r_small=0.3)


def test_yin_yang_example_beats_chance(tmp_path, monkeypatch):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import yin_yang

    out = yin_yang.main([
        "--train-size", "1000", "--hidden", "30", "--epochs", "4", "--batch-size", "50",
        "--lr", "1e-2", "--quiet", "--out", str(tmp_path / "yy"),
    ])
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert len(metrics["history"]) == 4
    assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])
    assert 0.0 <= final["test_accuracy_ordinary"] <= 1.0
    assert final["test_accuracy"] > 0.55  # chance is 1/3; this run reached 0.73
    for name in ("learning_curves.png", "model.pt"):
        assert (out / name).is_file(), name
