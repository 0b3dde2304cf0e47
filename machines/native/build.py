"""Building and loading the native library, with run-time CPU detection; one argument check; row threads.

The C sources under ``machines/native/c/`` (:data:`SOURCES`: ``common.h`` first, then one file per kernel
family) are compiled as one translation unit on first use with the system C compiler (``$CC``, else ``cc``)
for this CPU (``-O3 -ffast-math -march=native``, and ``-fopenmp`` where it compiles) into
``$PATCHBANK_KERNEL_CACHE`` (default ``~/.cache/patchbank/kernels``), keyed by the sources, the flags, the
compiler and the CPU's model and feature flags, and written under a temporary name then renamed, so
concurrent first uses are safe. No compiler means no native kernels: :func:`available` says so once in
the log and the backends use torch operations (``kernel="auto"``) or raise (``kernel="fused"``).

Each Python module of the layer declares the C signatures it calls (:func:`declare`); a new kernel is one
C file listed in :data:`SOURCES` plus its module's declarations.

Threads: the block folds split a block's rows over Python threads (:func:`by_rows`). The register-tile
kernels split them over OpenMP threads inside one C call where the library has OpenMP (:func:`over_rows`):
it then uses torch's own OpenMP runtime and pool, whose workers are already awake after torch's parallel
operations; without OpenMP they use Python threads too.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import torch

FOLDER = Path(__file__).with_name("c")
SOURCES = ("common.h", "rows.c", "fold.c", "sweep.c", "provenance.c", "match.c", "peak.c", "box.c")
"""The C files compiled together, in this order (the kernel files after the shared header)."""
_SOURCE_TEXT = "".join(f"#line 1 \"{name}\"\n" + (FOLDER / name).read_text() for name in SOURCES)
"""The sources as they were when this module was imported: the library compiled later (on first use) is always
the one these bindings were written for, even if the files change under a running job."""
FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC", "-shared", "-Wno-psabi"]
MIN_ROWS_PER_THREAD = 64  # smaller blocks stay on one thread (threads cost more than they save there)

Kernel = Literal["auto", "fused", "torch"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, Any] = {}
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {}


def declare(name: str, restype: Any, argtypes: list[Any]) -> None:
    """Declare the C signature of the library function ``name`` (applied when the library loads)."""
    _SIGNATURES[name] = (restype, argtypes)
    lib = _state.get("lib")
    if lib is not None:
        _bind(lib, name)


def available() -> bool:
    """Whether the native library is compiled (or compiles now) on this machine."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why the native library cannot be used here (``None`` when it can)."""
    library()
    return _state.get("error")


def require() -> ctypes.CDLL:
    """The loaded library, or a ``RuntimeError`` saying why there is none."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library (compiled on first use), or None where it cannot be built (logged once)."""
    with _lock:
        if "lib" not in _state:
            try:
                lib = ctypes.CDLL(str(_compile()))
                for name in _SIGNATURES:
                    _bind(lib, name)
                _state["lib"], _state["error"] = lib, None
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"], _state["error"] = None, str(exc)
                log.warning("native kernels unavailable, using torch operations: %s", exc)
        return _state["lib"]


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read): what a kernel family checks
    at run time before it is dispatched to."""
    return frozenset(_cpu().partition("flags")[2].replace(":", " ").split())


def wide_vectors() -> bool:
    """Whether this CPU has 512-bit vectors (AVX-512F), which the register-tile kernels are written for: 24 chains of
    16 float32 lanes. Without them the compiler splits each vector in two and the tiles spill registers, so callers
    keep a matrix product then the block fold there (docs/performance.md, "The sweep on a CPU without AVX-512").
    Says so once in the log."""
    wide = "avx512f" in cpu_flags()
    if not wide and not _state.get("said_narrow"):
        _state["said_narrow"] = True
        log.info("this CPU has no AVX-512: the register-tile kernels are off by default, the block folds run instead")
    return wide


def check_option(kernel: str) -> None:
    """Validate a backend's ``kernel`` option (``auto`` | ``fused`` | ``torch``); ``fused`` must be available."""
    if kernel not in ("auto", "fused", "torch"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'torch', got {kernel!r}")
    if kernel == "fused" and not available():
        raise RuntimeError(f"kernel='fused' but the fused kernel is unavailable: {unavailable_reason()}")


def use_fused(kernel: str, device: torch.device | str) -> bool:
    """Whether a backend with this ``kernel`` option folds blocks on ``device`` with the native kernels."""
    if torch.device(device).type != "cpu" or kernel == "torch":
        return False
    return kernel == "fused" or available()


def check_arrays(*checks: tuple[str, torch.Tensor, tuple, torch.dtype]) -> None:
    """The one argument check of every entry point: each ``(name, tensor, shape, dtype)`` must be a contiguous
    CPU tensor of that shape and dtype (else ``ValueError`` naming it)."""
    for key, t, shape, dtype in checks:
        if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{key} must be contiguous CPU {dtype} {list(shape)}, got {t.dtype} {list(t.shape)} "
                             f"on {t.device.type}")


def threads_for(R: int, threads: int | None) -> int:
    """Threads for ``R`` rows: ``threads``, or by default ``torch.get_num_threads()`` with at least 64 rows each."""
    return max(1, min(threads, R) if threads else min(torch.get_num_threads(), R // MIN_ROWS_PER_THREAD))


def by_rows(part: Callable[[int, int], Any], R: int, M: int, threads: int | None) -> list:
    """``part(start, stop)`` over row ranges: one call, or split over Python threads (at least 64 rows each by
    default)."""
    if R == 0 or M == 0:
        return [0]
    n = threads_for(R, threads)
    if n == 1:
        return [part(0, R)]
    step = -(-R // n)
    return [f.result() for f in [_pool(n).submit(part, s, min(R, s + step)) for s in range(0, R, step)]]


def over_rows(call: Callable[[int, int, int], Any], R: int, M: int, threads: int | None) -> list:
    """``call(n, start, stop)`` of a register-tile kernel over ``R`` rows: one call whose rows split over ``n``
    OpenMP threads (torch's pool) where the library has OpenMP, else row ranges on Python threads, one each."""
    if R == 0 or M == 0:
        return []
    n = threads_for(R, threads)
    if n > 1 and require().kernels_openmp():
        return [call(n, 0, R)]
    return by_rows(lambda start, stop: call(1, start, stop), R, M, threads)


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _state.get("pool")
    if pool is None or pool._max_workers < threads:
        pool = _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="patchbank-fold")
    return pool


def _bind(lib: ctypes.CDLL, name: str) -> None:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = _SIGNATURES[name]


def _compile() -> Path:
    """The compiled library: with OpenMP (the register-tile kernels' threads share torch's pool) where the compiler
    supports it, else without (their threads are then Python's)."""
    try:
        return _compile_with(FLAGS + ["-fopenmp"])
    except RuntimeError as err:
        log.info("compiling the kernels with OpenMP failed, compiling without: %s", err)
        return _compile_with(FLAGS)


def _compile_with(flags: list[str]) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH; set $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([_SOURCE_TEXT, *flags, cc, version, platform.machine(), _cpu()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PATCHBANK_KERNEL_CACHE", Path.home() / ".cache" / "patchbank" / "kernels"))
    target = cache / f"native-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".native-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-x", "c", "-", "-o", tmp, "-lm"], input=_SOURCE_TEXT, capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {FOLDER} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu() -> str:
    """This CPU's model and feature flags (``-march=native`` code is only valid on the same kind of CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
