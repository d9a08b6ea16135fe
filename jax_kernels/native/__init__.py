"""CPU kernels in C++ through XLA's FFI, compiled on first use.

XLA's CPU backend runs an event scan over a whole batch as about ten passes over the
``[batch, neurons]`` arrays per event (one per carried array; it does not fuse them into one
loop), each far from the cache. The kernels here do the same arithmetic sample by sample with
the sample's neurons in the L1 cache (``theta_scan.cc``), on XLA's intra-op thread pool. The same
file holds the theta convolution's event loop (:mod:`jax_kernels.conv`), where an event touches
only the ``C_out k^2`` neurons it reaches.

The library is built with the system's C++ compiler (``$CXX``, else ``g++`` or ``c++``) the
first time it is needed, against the FFI headers of the installed ``jaxlib``, and kept in
``$JAX_KERNELS_CACHE`` (default ``~/.cache/jax_kernels``), one file per source, ``jaxlib`` version
and CPU. Without a compiler the callers fall back on their pure-JAX scans (with one warning).
``JAX_KERNELS_NATIVE=0`` turns the kernels off; they are only used where JAX's default backend is
the CPU (device arrays of other platforms use the pure-JAX scans).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import jax
import jaxlib

try:  # POSIX: a file lock serialises concurrent builds
    import fcntl
except ImportError:  # e.g. Windows: no native kernel (the pure-JAX scan runs)
    fcntl = None

_SOURCE = Path(__file__).with_name("theta_scan.cc")
#: ``-fno-math-errno -fno-trapping-math`` let the compiler vectorise the neuron loops (``sqrt``
#: and selects); neither changes a result. No ``-ffast-math``: sums keep their order.
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17",
          "-shared", "-fPIC")
_TARGETS = {
    ("forward", "float32"): "ThetaScanForwardF32",
    ("forward", "float64"): "ThetaScanForwardF64",
    ("backward", "float32"): "ThetaScanBackwardF32",
    ("backward", "float64"): "ThetaScanBackwardF64",
    ("conv_forward", "float32"): "ThetaConvForwardF32",
    ("conv_forward", "float64"): "ThetaConvForwardF64",
    ("conv_backward", "float32"): "ThetaConvBackwardF32",
    ("conv_backward", "float64"): "ThetaConvBackwardF64",
}


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build(compiler: str) -> Path:
    """Compile the kernels (once per source, jaxlib and CPU; concurrent processes wait)."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), " ".join(_FLAGS).encode(), compiler.encode(),
        _cpu_signature().encode(),
    ])).hexdigest()[:16]
    cache = Path(os.environ.get("JAX_KERNELS_CACHE", Path.home() / ".cache" / "jax_kernels"))
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"theta_scan-{key}.so"
    if library.exists():
        return library
    with open(cache / f"theta_scan-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # built by another process meanwhile
            return library
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            built = Path(scratch) / library.name
            subprocess.run(
                [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)],
                check=True, capture_output=True, text=True, timeout=600,
            )
            os.replace(built, library)  # atomic: others see a whole file or none
    return library


_REGISTRATION_LOCK = threading.Lock()


def _registered() -> bool:
    """Build, load and register the kernels once per process; False where that is impossible."""
    with _REGISTRATION_LOCK:  # traced from several threads: register once
        return _register()


@functools.lru_cache(maxsize=None)
def _register() -> bool:
    if os.environ.get("JAX_KERNELS_NATIVE", "1") == "0" or fcntl is None:
        return False
    compiler = _compiler()
    if compiler is None:
        warnings.warn("jax_kernels: no C++ compiler found; the theta layer uses its pure-JAX "
                      "scan on CPU (slower). Install g++ to get the native kernel.", stacklevel=2)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"jax_kernels: building the native theta kernel failed ({detail}); the "
                      "theta layer uses its pure-JAX scan on CPU (slower).", stacklevel=2)
        return False
    for symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(
            f"jax_kernels_{symbol}", jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return True


def available() -> bool:
    """Whether traced computations should call the native kernels: JAX's default backend is the
    CPU and the library is (or can be) built."""
    return jax.default_backend() == "cpu" and _registered()


def target(direction: str, dtype) -> str:
    """The FFI target name of a kernel (``direction``: ``"forward"`` or ``"backward"`` of the
    theta layer's scan, ``"conv_forward"`` or ``"conv_backward"`` of the theta convolution),
    registered with XLA."""
    if not _registered():
        raise RuntimeError("jax_kernels.native: the kernels are not available (see the warning "
                           "above, or JAX_KERNELS_NATIVE=0)")
    return f"jax_kernels_{_TARGETS[direction, jax.numpy.dtype(dtype).name]}"
