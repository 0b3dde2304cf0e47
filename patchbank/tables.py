"""Dictionary entries and distinct-patch tables: the values a bank hands to a posterior backend."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Chunk(NamedTuple):
    """Dictionary entries: ``keys [M, D]``, their ``values [M, V]``, optional ``log_counts [M]``."""

    keys: torch.Tensor
    values: torch.Tensor
    log_counts: torch.Tensor | None = None


class UniquePatches(NamedTuple):
    """A bucket's distinct patches, stored once: ``patches`` int16 ``[U, D]`` in units of 1/255
    (``2·u8 − 255``, so zero padding is exactly 0) and how often each occurs, ``counts`` int64 ``[U]``."""

    patches: torch.Tensor
    counts: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a 2-D array and their counts (rows compared as raw bytes)."""
    rows = np.ascontiguousarray(rows)
    void = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    uniq, first, counts = np.unique(void, return_index=True, return_counts=True)
    return rows[first], counts.astype(np.int64)


def merge_unique(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-chunk (distinct rows, counts) into one table with summed counts."""
    rows = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if len(parts) == 1:
        return rows, counts
    void = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    return rows[first], np.bincount(inverse.ravel(), weights=counts, minlength=len(first)).astype(np.int64)
