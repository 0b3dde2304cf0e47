"""The fused exact kernel: one pass over each logits block on the CPU.

The exact backend's time per (query, entry) pair is the matrix product that makes the logits
plus the softmax work on them. With torch operations the second part is five passes over the
block (maximum, subtract, clamp, exponential, product with the values) and costs more than the
product at P ≤ 9. :func:`fold` does it in one C pass per row (``machines/_fold.c``): running
maximum, rescaling, a vectorised exponential, ``Σw`` and ``Σw·v``; rows whose block maximum lies
more than ``skip`` below the running maximum are skipped without an exponential. :func:`moments`
does the same for the automatic policy's importance draws, adding the second moments its
standard errors need (``Σw²``, ``Σw²·v``, ``Σw²·v²``). :func:`fold_keys` and :func:`moments_keys` do the same
from a block of keys laid out once (:func:`prepare_keys`), making the logits themselves in registers (a tile of
6 queries × 64 keys), so no logits block is written to memory; :func:`sweep_tree` runs the exact backend's whole
pruned pass over a bucket's cluster tree that way. :func:`scan_tree` does it for provenance, and
runs the whole pruned sweep over a bucket's cluster tree, logits included: ``Σw``, ``Σw·ℓ`` (the
entropy) and a running list of each query's heaviest patches. :func:`box_scales` computes a patch machine's
posterior means at several patch sizes at once from box sums over product maps (what calibration compares).

Threads: the block kernels split a block's rows over Python threads. The register-tile kernels (:func:`sweep_tree`,
:func:`fold_keys`, :func:`moments_keys`) split them over OpenMP threads inside one C call where the compiler
supports OpenMP: the library then uses torch's own OpenMP runtime and pool (torch loaded ``libgomp.so.1`` first),
whose workers are still awake after torch's parallel operations. Threads of a second pool would compete with them
for the cores: on 2 cores, in a streamed bbELS step at P = 15, each call took 1.6× as long on two Python threads as
on one. Without OpenMP they use Python threads too.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``) for this
CPU (``-O3 -ffast-math -march=native``, and ``-fopenmp`` where it compiles) into ``$PATCHBANK_KERNEL_CACHE`` (default
``~/.cache/patchbank/kernels``), keyed by the source, the flags, the compiler and the CPU, and
written under a temporary name then renamed, so concurrent first uses are safe. No compiler means
no fused kernel: :func:`available` says so and :class:`~machines.posterior.exact.ExactBackend` uses torch
operations (``kernel="auto"``) or raises (``kernel="fused"``).
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from patchbank.geometry import check_scale

SOURCE = Path(__file__).with_name("_fold.c")
_SOURCE_TEXT = SOURCE.read_text()
"""The C source as it was when this module was imported: the library compiled later (on first use) is
always the one these bindings were written for, even if the file changes under a running job."""
FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC", "-shared"]
_MIN_ROWS_PER_THREAD = 64  # smaller blocks stay on one thread (threads cost more than they save there)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


def available() -> bool:
    """Whether the fused kernel is compiled (or compiles now) on this machine."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the fused kernel cannot be used here (``None`` when it can)."""
    _library()
    return _state.get("error")  # type: ignore[return-value]


def fold(logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, acc: torch.Tensor, skip: float,
         threads: int | None = None) -> int:
    """Fold a logits block into running sums, in place; returns the pairs whose exponential was skipped.

    logits: ``[R, M]`` float32/float64 CPU, unit column stride (overwritten with the weights);
    values_t: ``[V, M]`` contiguous, same dtype (the values, transposed); m: float64 ``[R]`` running
    maxima (finite: start at ``-1e300``); acc: float64 ``[R, V+1]`` contiguous running ``(Σw·v, Σw)``
    relative to ``m``; skip: relative logits below ``−skip`` contribute nothing. Rows are split over
    ``threads`` threads (default: ``torch.get_num_threads()``, at least 64 rows each).
    """
    lib = _block("fold", logits, values_t, m, acc=acc)
    R, M = logits.shape
    V = values_t.shape[0]
    fn = lib.fold_f32 if logits.dtype == torch.float32 else lib.fold_f64
    size, ld = logits.element_size(), logits.stride(0)

    def part(start: int, stop: int) -> int:
        return fn(stop - start, M, V, logits.data_ptr() + start * ld * size, ld, values_t.data_ptr(),
                  m.data_ptr() + 8 * start, acc.data_ptr() + 8 * start * (V + 1), skip)

    return sum(_by_rows(part, R, M, threads))


def moments(logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
            threads: int | None = None) -> None:
    """Fold a block of importance-draw logits into first and second moments, in place.

    logits: ``[R, M]`` float32/float64 CPU, unit column stride (overwritten with the weights);
    values_t: ``[C, M]`` contiguous, same dtype; m: float64 ``[R]`` running maxima (finite: start at
    ``-1e300``); s1: float64 ``[R, C+1]`` = ``(Σw·v, Σw)``; s2: float64 ``[R, 2C+1]`` =
    ``(Σw²·v, Σw²·v², Σw²)``, with ``w = e^(ℓ − m)``. Within a block the sums are taken in the
    logits' dtype (float32: relative error ~1e-6, for a statistical estimate), across blocks in
    float64. Rows are split over threads as in :func:`fold`.
    """
    lib = _block("moments", logits, values_t, m, s1=s1, s2=s2)
    R, M = logits.shape
    C = values_t.shape[0]
    fn = lib.moments_f32 if logits.dtype == torch.float32 else lib.moments_f64
    size, ld = logits.element_size(), logits.stride(0)

    def part(start: int, stop: int) -> int:
        fn(stop - start, M, C, logits.data_ptr() + start * ld * size, ld, values_t.data_ptr(), m.data_ptr() + 8 * start,
           s1.data_ptr() + 8 * start * (C + 1), s2.data_ptr() + 8 * start * (2 * C + 1))
        return 0

    _by_rows(part, R, M, threads)


def scan_tree(qs: torch.Tensor, tree, coef: float, upper_t: torch.Tensor, first: torch.Tensor, threshold: float,
              m: torch.Tensor, Z: torch.Tensor, S: torch.Tensor, top: torch.Tensor, top_id: torch.Tensor, skip: float,
              threads: int | None = None) -> int:
    """A whole provenance sweep over a bucket's cluster tree, in place; returns the (query, patch) pairs computed.

    qs: float64 ``[R, D]``, the queries scaled by ``a/(s²·255)``; tree: a
    :class:`~patchbank.clusters.ClusteredPatches` (its int16 patches, squared norms, log counts, order and
    offsets); each member's log weight is ``ℓ = coef·‖p‖² + ⟨qs, p⟩`` (``coef = −a²/(2s²)``). upper_t: float64
    ``[K, R]``, a bound on every member's ``ℓ + log count`` per cluster and query; first: int64 ``[R]``, the
    cluster each query visits first. Then every cluster is visited by the queries whose bound is at least
    their running maximum less ``threshold``. State, in place: m, Z, S float64 ``[R]`` (running maximum of
    ``ℓ + log count``, finite: start at ``-1e300``; ``Σw`` and ``Σw·ℓ`` with ``w = e^(ℓ + log count − m)``), top
    float64 ``[R, K]`` (the ``K`` largest ``ℓ`` so far, descending; start at ``-1e300``) and top_id int64
    ``[R, K]`` (their distinct-patch ids, the tree's ``order``; start at −1); terms more than ``skip`` below the
    maximum add nothing. Queries split over threads as in :func:`fold`, each thread sweeping the tree for its
    own."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    R, D = qs.shape
    NC, K = tree.n_clusters, top.shape[1]
    checks = (("qs", qs, (R, D), torch.float64), ("patches", tree.patches, (tree.patches.shape[0], D), torch.int16),
              ("sq_norms", tree.sq_norms, (tree.patches.shape[0],), torch.float64),
              ("log_counts", tree.log_counts, (tree.patches.shape[0],), torch.float64),
              ("order", tree.order, (tree.patches.shape[0],), torch.int64), ("offsets", tree.offsets, (NC + 1,), torch.int64),
              ("upper_t", upper_t, (NC, R), torch.float64), ("first", first, (R,), torch.int64),
              ("m", m, (R,), torch.float64), ("Z", Z, (R,), torch.float64), ("S", S, (R,), torch.float64),
              ("top", top, (R, K), torch.float64), ("top_id", top_id, (R, K), torch.int64))
    _check_arrays(*checks)

    def part(start: int, stop: int) -> int:
        done = lib.scan_tree(stop - start, D, NC, qs.data_ptr() + 8 * start * D, tree.patches.data_ptr(), tree.sq_norms.data_ptr(),
                             coef, tree.log_counts.data_ptr(), tree.order.data_ptr(), tree.offsets.data_ptr(),
                             upper_t.data_ptr() + 8 * start, R, first.data_ptr() + 8 * start, threshold, K,
                             m.data_ptr() + 8 * start, Z.data_ptr() + 8 * start, S.data_ptr() + 8 * start,
                             top.data_ptr() + 8 * start * K, top_id.data_ptr() + 8 * start * K, skip)
        if done < 0:
            raise MemoryError("scan_tree could not allocate its work buffers")
        return done

    return sum(_by_rows(part, R, tree.patches.shape[0], threads))


def sweep_tree(qs: torch.Tensor, tree, coef: float, upper_t: torch.Tensor, first: torch.Tensor, threshold: float,
               centre: torch.Tensor, m: torch.Tensor, acc: torch.Tensor, skip: float, threads: int | None = None) -> tuple[int, int]:
    """The exact backend's whole pruned sweep over a bucket's cluster tree, in place; returns the (query, patch)
    pairs computed and how many of them had their exponential skipped.

    qs: float32 or float64 ``[R, D]``, the queries scaled by ``a/(s²·255)`` (the precision of the logits); tree:
    a :class:`~patchbank.clusters.ClusteredPatches`; each member's logit is ``ℓ = coef·‖p‖² + log count + ⟨qs, p⟩``
    (``coef = −a²/(2s²)``, ``p`` the int16 patch). upper_t: float64 ``[K, R]``, a bound on every member's ``ℓ`` per
    cluster and query; first: int64 ``[R]``, the cluster each query visits first; then every cluster is visited
    by the queries whose bound is at least their running maximum less ``threshold``. centre: int64 ``[C]``, the
    coordinates whose values (``/255``) are averaged. State, in place: m float64 ``[R]`` (running maximum, finite:
    start at ``-1e300``) and acc float64 ``[R, C+1]`` (``Σw·v``, ``Σw`` relative to it); a row of a visit whose
    maximum lies more than ``skip`` below the running maximum adds nothing. The logits are made in registers and
    folded at once: no block is written to memory and no Python runs per cluster. Queries split over threads
    (:func:`_over_rows`), each thread sweeping the tree for its own."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    if qs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sweep_tree needs float32 or float64 queries, got {qs.dtype}")
    R, D = qs.shape
    NC, C, U = tree.n_clusters, centre.numel(), tree.patches.shape[0]
    _check_arrays(("qs", qs, (R, D), qs.dtype), ("patches", tree.patches, (U, D), torch.int16),
                  ("sq_norms", tree.sq_norms, (U,), torch.float64), ("log_counts", tree.log_counts, (U,), torch.float64),
                  ("offsets", tree.offsets, (NC + 1,), torch.int64), ("upper_t", upper_t, (NC, R), torch.float64),
                  ("first", first, (R,), torch.int64), ("centre", centre, (C,), torch.int64), ("m", m, (R,), torch.float64),
                  ("acc", acc, (R, C + 1), torch.float64))
    if C and (int(centre.min()) < 0 or int(centre.max()) >= D):
        raise ValueError(f"centre coordinates must lie in [0, {D})")
    fn, size = (lib.sweep_f32_tree, 4) if qs.dtype == torch.float32 else (lib.sweep_f64_tree, 8)

    def call(n: int, start: int, stop: int) -> tuple[int, int]:
        skipped = ctypes.c_int64(0)
        done = fn(n, stop - start, D, NC, qs.data_ptr() + size * start * D, tree.patches.data_ptr(), tree.sq_norms.data_ptr(), coef,
                  tree.log_counts.data_ptr(), centre.data_ptr(), C, tree.offsets.data_ptr(), upper_t.data_ptr() + 8 * start, R,
                  first.data_ptr() + 8 * start, threshold, m.data_ptr() + 8 * start, acc.data_ptr() + 8 * start * (C + 1), skip,
                  ctypes.byref(skipped))
        if done < 0:
            raise MemoryError("sweep_tree could not allocate its work buffers")
        return done, skipped.value

    parts = _over_rows(lib, call, R, U, threads)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


class Keys(NamedTuple):
    """A block of ``n`` dictionary entries laid out for the register-tile kernels (:func:`fold_keys`,
    :func:`moments_keys`): keys transposed ``keys_t [D, W]``, logit biases ``bias [W]`` and values ``vals [C, W]``,
    padded to ``W``, a multiple of the tile width, with zeros and bias −1e30 (padding weighs nothing)."""

    keys_t: torch.Tensor
    bias: torch.Tensor
    vals: torch.Tensor
    n: int


TILE_WIDTH = 64  # entries per step of the register tile (4 vectors of 16 float32 or 2 × 4 vectors of 8 float64)
MIN_TILE_ROWS = 128
"""Fewest queries for which laying a block out (a transposed copy of its keys) pays: with fewer, a matrix product
then :func:`fold` / :func:`moments` is as fast or faster. Measured on 4,096 keys, 2 threads, tile against product
and fold: at D = 225, 40 queries 1.8 against 0.9 ms, 64 2.8 against 2.0, 146 2.6 against 2.6, 324 5.0 against
6.4; at D = 49, 64 queries 0.55 against 0.41 ms, 146 1.1 against 2.2. bbELS border buckets and the policy's
failing pixels are often that few."""


def prepare_keys(keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> Keys:
    """Lay out ``keys [M, D]``, ``bias [M]`` and ``values [M, C]`` for :func:`fold_keys` / :func:`moments_keys` in
    ``dtype`` (float32 or float64): once per block, shared by every query and thread."""
    M, D = keys.shape
    W = -(-max(M, 1) // TILE_WIDTH) * TILE_WIDTH
    keys_t = torch.zeros(D, W, dtype=dtype)
    keys_t[:, :M] = keys.T
    padded = torch.full((W,), -1e30, dtype=dtype)
    padded[:M] = bias.reshape(-1)
    vals = torch.zeros(values.shape[1], W, dtype=dtype)
    vals[:, :M] = values.T
    return Keys(keys_t, padded, vals, M)


def fold_keys(qs: torch.Tensor, keys: Keys, m: torch.Tensor, acc: torch.Tensor, skip: float, threads: int | None = None) -> int:
    """:func:`fold` with the logits made in registers: ``ℓ = bias + ⟨qs, key⟩`` for queries ``qs [R, D]`` (scaled by
    ``a/s²``, in the keys' dtype) against prepared keys, folded at once into ``m [R]`` and ``acc [R, C+1]`` (float64,
    in place) as :func:`fold` does; no logits block is written to memory. Returns the pairs whose exponential was
    skipped."""
    lib = _keys_block(qs, keys, m, acc=acc)
    return _run_keys(lib, qs, keys, m, acc, None, skip, 0, threads)


def moments_keys(qs: torch.Tensor, keys: Keys, m: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                 threads: int | None = None) -> None:
    """:func:`moments` with the logits made in registers (as :func:`fold_keys`): first and second moments of the
    draws ``keys`` for queries ``qs [R, D]``, into ``m [R]``, ``s1 [R, C+1]`` and ``s2 [R, 2C+1]`` (float64, in
    place)."""
    lib = _keys_block(qs, keys, m, s1=s1, s2=s2)
    floor = 80.0 if qs.dtype == torch.float32 else 700.0
    _run_keys(lib, qs, keys, m, s1, s2, floor, 1, threads)


def _keys_block(qs: torch.Tensor, keys: Keys, m: torch.Tensor, **sums: torch.Tensor) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    R, D = qs.shape
    C, W = keys.vals.shape
    if qs.dtype not in (torch.float32, torch.float64) or keys.keys_t.dtype != qs.dtype:
        raise TypeError(f"the queries and keys must share a float32 or float64 dtype, got {qs.dtype}, {keys.keys_t.dtype}")
    if keys.keys_t.shape != (D, W) or not keys.keys_t.is_contiguous() or W % TILE_WIDTH or keys.bias.shape != (W,) \
            or not 0 <= keys.n <= W:
        raise ValueError(f"keys must be laid out by prepare_keys for dimension {D}, got keys_t {list(keys.keys_t.shape)}")
    width = {"acc": C + 1, "s1": C + 1, "s2": 2 * C + 1}
    _check_arrays(("qs", qs, (R, D), qs.dtype), ("m", m, (R,), torch.float64),
                  *((k, t, (R, width[k]), torch.float64) for k, t in sums.items()))
    return lib


def _run_keys(lib, qs, keys: Keys, m, sums, sums2, skip: float, mode: int, threads: int | None) -> int:
    """Run a register-tile block kernel (mode 0: fold, 1: moments) over the queries' rows (see :func:`_over_rows`)."""
    C, W = keys.vals.shape
    R, D = qs.shape
    size = qs.element_size()
    fn = lib.sweep_f32_par if qs.dtype == torch.float32 else lib.sweep_f64_par

    def call(n: int, start: int, stop: int) -> int:
        done = fn(n, stop - start, D, keys.n, W, C, qs.data_ptr() + size * start * D, keys.keys_t.data_ptr(), keys.bias.data_ptr(),
                  keys.vals.data_ptr(), m.data_ptr() + 8 * start, sums.data_ptr() + 8 * start * (C + 1),
                  sums2.data_ptr() + 8 * start * (2 * C + 1) if sums2 is not None else None, skip, mode)
        if done < 0:
            raise MemoryError("the register-tile kernel could not allocate its work buffer")
        return done

    return sum(_over_rows(lib, call, R, keys.n, threads))


BOX_RULES = {"LS": 0, "ELS": 1, "bbELS": 2}


def box_scales(queries: torch.Tensor, images: torch.Tensor, scales: list[int] | tuple[int, ...], rule: str, padding: str,
               a: float, s2: float, skip: float = 60.0, threads: int | None = None) -> tuple[torch.Tensor, int]:
    """A patch machine's posterior means at several scales at once, by box sums over product maps (``_fold.c``).

    queries: float64 ``[B, C, H, W]`` (noisy images, model units); images: float64 ``[N, C, H, W]`` (the
    dictionary's training images); scales: odd patch sizes ``P``; rule: LS, ELS or bbELS; padding: zeros or
    circular (bbELS: zeros only). Each pair's log weight at radius ``r`` is the box sum of radius ``r`` of one
    product map per (training image, displacement), so the products are made once for every scale. Terms more
    than ``skip`` below a running maximum add nothing. Images are split over ``threads`` OpenMP threads (default
    ``torch.get_num_threads()``). Returns the means ``[len(scales), B, C, H, W]`` (float64) and the (pixel,
    patch, scale) pairs computed."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    if rule not in BOX_RULES:
        raise ValueError(f"box sums serve the patch rules {sorted(BOX_RULES)}, not {rule!r}")
    if padding not in ("zeros", "circular") or (rule == "bbELS" and padding != "zeros"):
        raise ValueError(f"{rule} cannot take {padding!r} padding here (bbELS: zeros; LS, ELS: zeros or circular)")
    if queries.dim() != 4 or images.dim() != 4 or queries.shape[1:] != images.shape[1:]:
        raise ValueError(f"queries [B, C, H, W] and images [N, C, H, W] must share C, H, W: got {list(queries.shape)} "
                         f"and {list(images.shape)}")
    B, C, H, W = queries.shape
    if not 1 <= C <= 4 or images.shape[0] == 0 or B == 0:
        raise ValueError(f"need 1 to 4 channels, at least one query and one image: got C={C}, B={B}, N={images.shape[0]}")
    _check_arrays(("queries", queries, queries.shape, torch.float64), ("images", images, images.shape, torch.float64))
    if not scales:
        raise ValueError("give at least one patch scale")
    radii = torch.tensor([check_scale(int(P)) for P in scales], dtype=torch.int64)
    out = torch.empty(len(scales), B, C, H, W, dtype=torch.float64)
    n = max(1, threads or torch.get_num_threads())
    pairs = lib.box_scales(n, B, images.shape[0], C, H, W, queries.data_ptr(), images.data_ptr(), len(scales),
                           radii.data_ptr(), BOX_RULES[rule], int(padding == "circular"), a, s2, skip, out.data_ptr())
    if pairs < 0:
        raise MemoryError("the box-sum kernel could not allocate its running state")
    return out, int(pairs)


def peak_gflops(seconds: float = 0.3) -> float:
    """This machine's float32 multiply-add peak on one core, measured (GFLOP/s): 12 independent 16-lane
    multiply-add chains in C for about ``seconds``, the best of three runs. Benchmarks report the fraction of it
    the exact backend reaches (the arithmetic floor of an exact pass)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    n, best = 1 << 20, 0.0
    while True:  # grow the run until it takes a measurable time
        start = time.perf_counter()
        lib.peak_f32(n)
        took = time.perf_counter() - start
        if took > seconds / 10:
            break
        n *= 4
    n = max(1, int(n * seconds / took))
    for _ in range(3):
        start = time.perf_counter()
        lib.peak_f32(n)
        best = max(best, 384 * n / (time.perf_counter() - start) / 1e9)
    return best


class RowTable:
    """Which row of a table of distinct int16 rows ``[U, D]`` other rows equal: a hash table built once (C),
    probed by :meth:`find`. Every hit is compared value by value, so a match is never wrong. Raises
    ``ValueError`` if two table rows are equal, ``RuntimeError`` without the compiled kernels."""

    def __init__(self, rows: torch.Tensor) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
        if rows.dtype != torch.int16 or rows.dim() != 2 or rows.device.type != "cpu":
            raise ValueError(f"rows must be a CPU int16 [U, D] table, got {rows.dtype} {list(rows.shape)}")
        self.lib, self.rows = lib, rows.contiguous()
        self.slots = torch.full((1 << max(4, (2 * rows.shape[0]).bit_length()),), -1, dtype=torch.int64)
        if lib.match_build(rows.shape[0], rows.shape[1], self.rows.data_ptr(), self.slots.numel(), self.slots.data_ptr()):
            raise ValueError("the table has two equal rows")

    def find(self, queries: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each of ``queries`` (int16 ``[N, D]``)'s table row (int64 ``[N]``, −1 where none is equal), and how many
        found none."""
        if queries.dtype != torch.int16 or queries.dim() != 2 or queries.shape[1] != self.rows.shape[1]:
            raise ValueError(f"queries must be int16 [N, {self.rows.shape[1]}], got {queries.dtype} {list(queries.shape)}")
        queries = queries.contiguous()
        out = torch.empty(queries.shape[0], dtype=torch.int64)
        missing = self.lib.match_find(self.rows.shape[1], self.rows.data_ptr(), self.slots.numel(), self.slots.data_ptr(),
                                      queries.shape[0], queries.data_ptr(), out.data_ptr())
        return out, int(missing)

    def find_windows(self, padded: torch.Tensor, corners: torch.Tensor, P: int) -> tuple[torch.Tensor, int]:
        """:meth:`find` for the ``P×P`` windows of padded images ``padded`` (int16 ``[B, C, Hp, Wp]``) at top-left
        ``corners`` (long ``[L, 2]``), flattened ``(c, row, col)``: table rows ``[B·L]`` image-major, −1 where
        none, without making the windows in memory."""
        B, C, Hp, Wp = padded.shape
        if padded.dtype != torch.int16 or C * P * P != self.rows.shape[1]:
            raise ValueError(f"padded must be int16 [B, C, Hp, Wp] with C·P·P = {self.rows.shape[1]}, got {padded.dtype} "
                             f"{list(padded.shape)} and P = {P}")
        corners = corners.to(torch.int64).contiguous()
        if corners.numel() and (int(corners.min()) < 0 or int(corners[:, 0].max()) + P > Hp or int(corners[:, 1].max()) + P > Wp):
            raise ValueError("every window must lie inside the padded images")
        padded = padded.contiguous()
        out = torch.empty(B * corners.shape[0], dtype=torch.int64)
        buf = torch.empty(32 * C * P * P, dtype=torch.int16)
        missing = self.lib.match_windows(self.rows.data_ptr(), self.slots.numel(), self.slots.data_ptr(), B, C, Hp, Wp,
                                         padded.data_ptr(), corners.shape[0], corners.data_ptr(), P, buf.data_ptr(),
                                         out.data_ptr())
        return out, int(missing)


def counting_order(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The stable sort order of int64 ``keys [N]`` in ``[0, K)`` whose occurrences are ``counts [K]``: one
    counting-sort pass (C) instead of a comparison sort; ``torch.argsort(keys, stable=True)`` without the
    compiled kernels."""
    lib = _library()
    if lib is None:
        return torch.argsort(keys, stable=True)
    keys = keys.contiguous()
    if keys.dtype != torch.int64 or counts.dtype != torch.int64 or int(counts.sum()) != keys.numel():
        raise ValueError("counting_order needs int64 keys and int64 counts that sum to the number of keys")
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= counts.numel()):
        raise ValueError(f"keys must lie in [0, {counts.numel()})")
    cursor = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    order = torch.empty_like(keys)
    lib.counting_order(keys.numel(), keys.data_ptr(), cursor.data_ptr(), order.data_ptr())
    return order


def check_option(kernel: str) -> None:
    """Validate a backend's ``kernel`` option (``auto`` | ``fused`` | ``torch``); ``fused`` must be available."""
    if kernel not in ("auto", "fused", "torch"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'torch', got {kernel!r}")
    if kernel == "fused" and not available():
        raise RuntimeError(f"kernel='fused' but the fused kernel is unavailable: {unavailable_reason()}")


def use_fused(kernel: str, device: torch.device | str) -> bool:
    """Whether a backend with this ``kernel`` option folds blocks on ``device`` with the C kernels."""
    if torch.device(device).type != "cpu" or kernel == "torch":
        return False
    return kernel == "fused" or available()


def _block(name: str, logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, **sums: torch.Tensor) -> ctypes.CDLL:
    """Check a block's arguments (``sums``: float64 running sums ``[R, width]``); the loaded library."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    R, M = logits.shape
    V = values_t.shape[0]
    if logits.dtype not in (torch.float32, torch.float64) or values_t.dtype != logits.dtype:
        raise TypeError(f"{name} needs float32 or float64 logits and values of the same dtype, got {logits.dtype}, {values_t.dtype}")
    if logits.device.type != "cpu" or (M > 1 and logits.stride(1) != 1):
        raise ValueError(f"{name} needs a CPU logits block with contiguous rows")
    if values_t.shape[1] != M or not values_t.is_contiguous():
        raise ValueError(f"values_t must be contiguous [V, {M}], got {tuple(values_t.shape)}")
    width = {"acc": V + 1, "s1": V + 1, "s2": 2 * V + 1}
    for key, t, shape in (("m", m, (R,)), *((k, t, (R, width[k])) for k, t in sums.items())):
        if t.dtype != torch.float64 or t.shape != shape or not t.is_contiguous():
            raise ValueError(f"{key} must be contiguous float64 {list(shape)}, got {t.dtype} {list(t.shape)}")
    return lib


def _threads(R: int, threads: int | None) -> int:
    """Threads for ``R`` rows: ``threads``, or by default ``torch.get_num_threads()`` with at least 64 rows each."""
    return max(1, min(threads, R) if threads else min(torch.get_num_threads(), R // _MIN_ROWS_PER_THREAD))


def _over_rows(lib: ctypes.CDLL, call, R: int, M: int, threads: int | None) -> list:
    """``call(n, start, stop)`` of a register-tile kernel over ``R`` rows: one call whose rows split over ``n`` OpenMP
    threads (torch's pool) where the library has OpenMP, else row ranges on Python threads, one thread each."""
    if R == 0 or M == 0:
        return []
    n = _threads(R, threads)
    if n > 1 and lib.kernels_openmp():
        return [call(n, 0, R)]
    return _by_rows(lambda start, stop: call(1, start, stop), R, M, threads)


def _check_arrays(*checks: tuple[str, torch.Tensor, tuple, torch.dtype]) -> None:
    """Each ``(name, tensor, shape, dtype)`` must be a contiguous CPU tensor of that shape and dtype (else ValueError)."""
    for key, t, shape, dtype in checks:
        if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{key} must be contiguous CPU {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")


def _by_rows(part, R: int, M: int, threads: int | None) -> list[int]:
    """``part(start, stop)`` over row ranges: one call, or split over threads (at least 64 rows each by default)."""
    if R == 0 or M == 0:
        return [0]
    threads = _threads(R, threads)
    if threads == 1:
        return [part(0, R)]
    step = -(-R // threads)
    return [f.result() for f in [_pool(threads).submit(part, s, min(R, s + step)) for s in range(0, R, step)]]


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _state.get("pool")
    if pool is None or pool._max_workers < threads:  # type: ignore[attr-defined]
        pool = _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="patchbank-fold")
    return pool  # type: ignore[return-value]


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load(_compile())
                _state["error"] = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"] = None
                _state["error"] = str(exc)
                log.warning("fused exact kernel unavailable, using torch operations: %s", exc)
        return _state["lib"]  # type: ignore[return-value]


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
    target = cache / f"fold-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".fold-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-x", "c", "-", "-o", tmp, "-lm"], input=_SOURCE_TEXT, capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    args = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
    for fn in (lib.fold_f32, lib.fold_f64):
        fn.restype, fn.argtypes = ctypes.c_int64, args
    for fn in (lib.moments_f32, lib.moments_f64):
        fn.restype, fn.argtypes = None, args[:-1] + [ctypes.c_void_p]
    lib.scan_tree.restype = ctypes.c_int64
    lib.scan_tree.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] + [ctypes.c_void_p] * 4 + \
        [ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_double]
    for fn in (lib.sweep_f32_par, lib.sweep_f64_par):
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 7 + [ctypes.c_double, ctypes.c_int]
    for fn in (lib.sweep_f32_tree, lib.sweep_f64_tree):
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] + \
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_double] + \
            [ctypes.c_void_p] * 2 + [ctypes.c_double, ctypes.c_void_p]
    lib.kernels_openmp.restype, lib.kernels_openmp.argtypes = ctypes.c_int, []
    lib.box_scales.restype = ctypes.c_int64
    lib.box_scales.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p] + \
        [ctypes.c_int64] * 2 + [ctypes.c_double] * 3 + [ctypes.c_void_p]
    lib.peak_f32.restype, lib.peak_f32.argtypes = ctypes.c_float, [ctypes.c_int64]
    lib.match_build.restype = lib.match_find.restype = ctypes.c_int64
    lib.match_build.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.match_find.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p]
    lib.match_windows.restype = ctypes.c_int64
    lib.match_windows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4 + \
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.counting_order.restype = None
    lib.counting_order.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _cpu() -> str:
    """This CPU's model and feature flags (``-march=native`` code is only valid on the same kind of CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
