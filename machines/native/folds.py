"""Folds: logits into running posterior sums in one pass, from a logits block or from keys in register tiles.

The exact backend's time per (query, entry) pair is the matrix product that makes the logits plus the softmax
work on them. With torch operations the second part is five passes over the block (maximum, subtract, clamp,
exponential, product with the values). :func:`fold_logits` does it in one C pass per row (``c/fold.c``):
running maximum, rescaling, a vectorised exponential, ``Σw`` and ``Σw·v``; rows whose block maximum lies more
than ``skip`` below the running maximum are skipped without an exponential. :func:`fold_moments` does the same
for the automatic policy's importance draws, adding the second moments its standard errors need.
:func:`fold_tiles` and :func:`moments_tiles` do both from keys laid out once (:func:`lay_out_keys`), making the
logits themselves in registers (``c/sweep.c``: a tile of 6 queries × 64 keys), so no logits block is written.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from .build import by_rows, check_arrays, declare, over_rows, require

_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_BLOCK = [_i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _f64]
for _name in ("fold_f32", "fold_f64"):
    declare(_name, _i64, _BLOCK)
for _name in ("moments_f32", "moments_f64"):
    declare(_name, None, _BLOCK[:-1] + [_ptr])
for _name in ("sweep_f32_par", "sweep_f64_par"):
    declare(_name, _i64, [ctypes.c_int] + [_i64] * 5 + [_ptr] * 7 + [_f64, ctypes.c_int])

TILE_WIDTH = 64  # entries per step of the register tile (4 vectors of 16 float32 or 2 × 4 vectors of 8 float64)
MIN_TILE_ROWS = 128
"""Fewest queries for which laying a block out (a transposed copy of its keys) pays: with fewer, a matrix product
then :func:`fold_logits` / :func:`fold_moments` is as fast or faster (docs/reference.md, "Register tiles").
bbELS border buckets and the policy's failing pixels are often that few."""


def fold_logits(logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, acc: torch.Tensor, skip: float,
                threads: int | None = None) -> int:
    """Fold a logits block into running sums, in place; returns the pairs whose exponential was skipped.

    logits: ``[R, M]`` float32/float64 CPU, unit column stride (overwritten with the weights); values_t:
    ``[V, M]`` contiguous, same dtype (the values, transposed); m: float64 ``[R]`` running maxima (finite: start at
    ``-1e300``); acc: float64 ``[R, V+1]`` contiguous running ``(Σw·v, Σw)`` relative to ``m``; skip: relative
    logits below ``−skip`` contribute nothing. Rows are split over ``threads`` threads (default:
    ``torch.get_num_threads()``, at least 64 rows each).
    """
    lib = _check_block("fold_logits", logits, values_t, m, acc=acc)
    R, M = logits.shape
    V = values_t.shape[0]
    fn = lib.fold_f32 if logits.dtype == torch.float32 else lib.fold_f64
    size, ld = logits.element_size(), logits.stride(0)

    def part(start: int, stop: int) -> int:
        return fn(stop - start, M, V, logits.data_ptr() + start * ld * size, ld, values_t.data_ptr(),
                  m.data_ptr() + 8 * start, acc.data_ptr() + 8 * start * (V + 1), skip)

    return sum(by_rows(part, R, M, threads))


def fold_moments(logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                 threads: int | None = None) -> None:
    """Fold a block of importance-draw logits into first and second moments, in place.

    logits: ``[R, M]`` float32/float64 CPU, unit column stride (overwritten with the weights); values_t: ``[C, M]``
    contiguous, same dtype; m: float64 ``[R]`` running maxima (finite: start at ``-1e300``); s1: float64
    ``[R, C+1]`` = ``(Σw·v, Σw)``; s2: float64 ``[R, 2C+1]`` = ``(Σw²·v, Σw²·v², Σw²)``, with ``w = e^(ℓ − m)``.
    Within a block the sums are taken in the logits' dtype (float32: relative error ~1e-6, for a statistical
    estimate), across blocks in float64. Rows are split over threads as in :func:`fold_logits`.
    """
    lib = _check_block("fold_moments", logits, values_t, m, s1=s1, s2=s2)
    R, M = logits.shape
    C = values_t.shape[0]
    fn = lib.moments_f32 if logits.dtype == torch.float32 else lib.moments_f64
    size, ld = logits.element_size(), logits.stride(0)

    def part(start: int, stop: int) -> int:
        fn(stop - start, M, C, logits.data_ptr() + start * ld * size, ld, values_t.data_ptr(), m.data_ptr() + 8 * start,
           s1.data_ptr() + 8 * start * (C + 1), s2.data_ptr() + 8 * start * (2 * C + 1))
        return 0

    by_rows(part, R, M, threads)


class TileKeys(NamedTuple):
    """A block of ``n`` dictionary entries laid out for the register-tile folds (:func:`fold_tiles`,
    :func:`moments_tiles`): keys transposed ``keys_t [D, W]``, logit biases ``bias [W]`` and values ``vals [C, W]``,
    padded to ``W``, a multiple of the tile width, with zeros and bias −1e30 (padding weighs nothing)."""

    keys_t: torch.Tensor
    bias: torch.Tensor
    vals: torch.Tensor
    n: int


def lay_out_keys(keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> TileKeys:
    """Lay out ``keys [M, D]``, ``bias [M]`` and ``values [M, C]`` for :func:`fold_tiles` / :func:`moments_tiles`
    in ``dtype`` (float32 or float64): once per block, shared by every query and thread."""
    M, D = keys.shape
    W = -(-max(M, 1) // TILE_WIDTH) * TILE_WIDTH
    keys_t = torch.zeros(D, W, dtype=dtype)
    keys_t[:, :M] = keys.T
    padded = torch.full((W,), -1e30, dtype=dtype)
    padded[:M] = bias.reshape(-1)
    vals = torch.zeros(values.shape[1], W, dtype=dtype)
    vals[:, :M] = values.T
    return TileKeys(keys_t, padded, vals, M)


def fold_tiles(qs: torch.Tensor, keys: TileKeys, m: torch.Tensor, acc: torch.Tensor, skip: float,
               threads: int | None = None) -> int:
    """:func:`fold_logits` with the logits made in registers: ``ℓ = bias + ⟨qs, key⟩`` for queries ``qs [R, D]``
    (scaled by ``a/s²``, in the keys' dtype) against laid-out keys, folded at once into ``m [R]`` and
    ``acc [R, C+1]`` (float64, in place); no logits block is written to memory. Returns the pairs whose
    exponential was skipped."""
    _check_tiles(qs, keys, m, acc=acc)
    return _run_tiles(qs, keys, m, acc, None, skip, 0, threads)


def moments_tiles(qs: torch.Tensor, keys: TileKeys, m: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                  threads: int | None = None) -> None:
    """:func:`fold_moments` with the logits made in registers (as :func:`fold_tiles`): first and second moments of
    the draws ``keys`` for queries ``qs [R, D]``, into ``m [R]``, ``s1 [R, C+1]`` and ``s2 [R, 2C+1]`` (float64,
    in place)."""
    _check_tiles(qs, keys, m, s1=s1, s2=s2)
    floor = 80.0 if qs.dtype == torch.float32 else 700.0
    _run_tiles(qs, keys, m, s1, s2, floor, 1, threads)


_WIDTH = {"acc": lambda C: C + 1, "s1": lambda C: C + 1, "s2": lambda C: 2 * C + 1}


def _check_block(name: str, logits: torch.Tensor, values_t: torch.Tensor, m: torch.Tensor,
                 **sums: torch.Tensor) -> ctypes.CDLL:
    """A logits block's arguments (``sums``: float64 running sums ``[R, width]``); the loaded library."""
    lib = require()
    R, M = logits.shape
    V = values_t.shape[0]
    if logits.dtype not in (torch.float32, torch.float64) or values_t.dtype != logits.dtype:
        raise TypeError(f"{name} needs float32 or float64 logits and values of the same dtype, got {logits.dtype}, "
                        f"{values_t.dtype}")
    if logits.device.type != "cpu" or (M > 1 and logits.stride(1) != 1):
        raise ValueError(f"{name} needs a CPU logits block with contiguous rows")
    check_arrays(("values_t", values_t, (V, M), logits.dtype), ("m", m, (R,), torch.float64),
                 *((k, t, (R, _WIDTH[k](V)), torch.float64) for k, t in sums.items()))
    return lib


def _check_tiles(qs: torch.Tensor, keys: TileKeys, m: torch.Tensor, **sums: torch.Tensor) -> None:
    R, D = qs.shape
    C, W = keys.vals.shape
    if qs.dtype not in (torch.float32, torch.float64) or keys.keys_t.dtype != qs.dtype:
        raise TypeError(f"the queries and keys must share a float32 or float64 dtype, got {qs.dtype}, {keys.keys_t.dtype}")
    if keys.keys_t.shape != (D, W) or W % TILE_WIDTH or not 0 <= keys.n <= W:
        raise ValueError(f"keys must be laid out by lay_out_keys for dimension {D}, got keys_t {list(keys.keys_t.shape)}")
    check_arrays(("qs", qs, (R, D), qs.dtype), ("keys_t", keys.keys_t, (D, W), qs.dtype), ("bias", keys.bias, (W,), qs.dtype),
                 ("m", m, (R,), torch.float64), *((k, t, (R, _WIDTH[k](C)), torch.float64) for k, t in sums.items()))


def _run_tiles(qs: torch.Tensor, keys: TileKeys, m: torch.Tensor, sums: torch.Tensor, sums2: torch.Tensor | None,
               skip: float, mode: int, threads: int | None) -> int:
    """Run a register-tile block kernel (mode 0: fold, 1: moments) over the queries' rows (see ``over_rows``)."""
    lib = require()
    C, W = keys.vals.shape
    R, D = qs.shape
    size = qs.element_size()
    fn = lib.sweep_f32_par if qs.dtype == torch.float32 else lib.sweep_f64_par

    def call(n: int, start: int, stop: int) -> int:
        done = fn(n, stop - start, D, keys.n, W, C, qs.data_ptr() + size * start * D, keys.keys_t.data_ptr(),
                  keys.bias.data_ptr(), keys.vals.data_ptr(), m.data_ptr() + 8 * start, sums.data_ptr() + 8 * start * (C + 1),
                  sums2.data_ptr() + 8 * start * (2 * C + 1) if sums2 is not None else None, skip, mode)
        if done < 0:
            raise MemoryError("the register-tile kernel could not allocate its work buffer")
        return done

    return sum(over_rows(call, R, keys.n, threads))
