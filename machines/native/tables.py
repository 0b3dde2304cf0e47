"""Table lookups in C for provenance's source maps: which stored row other rows equal (:class:`RowTable`), and a
counting sort (:func:`counting_order`)."""

from __future__ import annotations

import ctypes

import torch

from .build import declare, library, require

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
declare("match_build", _i64, [_i64, _i64, _ptr, _i64, _ptr])
declare("match_find", _i64, [_i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr])
declare("match_windows", _i64, [_ptr, _i64, _ptr] + [_i64] * 4 + [_ptr, _i64, _ptr, _i64, _ptr, _ptr])
declare("counting_order", None, [_i64, _ptr, _ptr, _ptr])


class RowTable:
    """Which row of a table of distinct int16 rows ``[U, D]`` other rows equal: a hash table built once (C),
    probed by :meth:`find`. Every hit is compared value by value, so a match is never wrong. Raises
    ``ValueError`` if two table rows are equal, ``RuntimeError`` without the compiled kernels."""

    def __init__(self, rows: torch.Tensor) -> None:
        lib = require()
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
    lib = library()
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

