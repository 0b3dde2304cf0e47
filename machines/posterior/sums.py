"""The one running-sum type of every backend: online log-sum-exp sums per query, folded and merged exactly.

For queries against entries with logits ``ℓ`` and values ``v``, :class:`RunningSums` keeps per query a running
maximum ``m`` and, relative to ``e^m``, ``acc = (Σw·v, Σw)`` with ``w = e^(ℓ − m)`` — and, for the policy's
importance draws, the second moments ``(Σw²·v, Σw²·v², Σw²)`` its standard errors need. Blocks of logits fold
in (torch operations or the native kernels), and two sums over disjoint entries merge into the sums over both
(each rescaled to the common maximum), so a bucket split into shards, clusters or draws sums to the whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

from .. import native
from .base import on_rows, with_ones

EMPTY = -1e300
"""The running maximum before any entry: finite, as the native kernels need (−inf in float32)."""


@dataclass
class RunningSums:
    """Sums over some entries per query: ``m [Q]`` (:data:`EMPTY` where none), ``acc [Q, V+1]`` = ``(Σw·v, Σw)``
    relative to ``e^m`` and, where kept, ``second [Q, 2V+1]`` = ``(Σw²·v, Σw²·v², Σw²)`` relative to ``e^(2m)``."""

    m: torch.Tensor
    acc: torch.Tensor
    second: torch.Tensor | None = None

    @classmethod
    def empty(cls, Q: int, V: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
              moments: bool = False) -> RunningSums:
        """The sums of ``Q`` queries over no entry, ``V`` values each (with second moments where ``moments``)."""
        second = torch.zeros(Q, 2 * V + 1, dtype=dtype, device=device) if moments else None
        start = EMPTY if dtype == torch.float64 else -torch.inf
        return cls(torch.full((Q,), start, dtype=dtype, device=device), torch.zeros(Q, V + 1, dtype=dtype, device=device), second)

    @property
    def is_empty(self) -> torch.Tensor:
        """Which queries hold no entry ``[Q]``."""
        return self.m <= EMPTY

    def scale_to(self, m: torch.Tensor) -> torch.Tensor:
        """``e^(self.m − m)`` per query ``[Q]`` for a maximum ``m ≥ self.m`` (0 where these sums are empty)."""
        return torch.where(self.is_empty, torch.zeros_like(self.m), torch.exp(self.m - m))

    def float64(self, device: torch.device | str = "cpu") -> RunningSums:
        """These sums in float64 on ``device`` (a float32 maximum of −inf becomes :data:`EMPTY`)."""
        m = self.m.to(device, torch.float64).clamp(min=EMPTY)
        second = self.second.to(device, torch.float64) if self.second is not None else None
        return RunningSums(m, self.acc.to(device, torch.float64), second)

    def merge(self, other: RunningSums) -> RunningSums:
        """The sums over both sets of entries (exact: each side rescaled to the common maximum)."""
        m = torch.maximum(self.m, other.m)
        left, right = self.scale_to(m), other.scale_to(m)
        second = None
        if self.second is not None and other.second is not None:
            second = self.second * (left * left)[:, None] + other.second * (right * right)[:, None]
        return RunningSums(m, self.acc * left[:, None] + other.acc * right[:, None], second)

    def mean(self) -> torch.Tensor:
        """The posterior mean ``[Q, V]`` (an error where a query holds no entry)."""
        if bool(self.is_empty.any()):
            raise ValueError("the summed parts hold no dictionary entries")
        return self.acc[:, :-1] / self.acc[:, -1:]

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For sums over importance draws: means ``[Q, V]``, delta-method standard errors ``[Q]`` (largest over the
        values) and effective sample sizes ``[Q]``."""
        if self.second is None:
            raise ValueError("these sums keep no second moments")
        V = self.acc.shape[1] - 1
        Z = self.acc[:, V:]
        mu = self.acc[:, :V] / Z
        w2v, w2vv, w2 = self.second[:, :V], self.second[:, V : 2 * V], self.second[:, 2 * V :]
        var = (w2vv - 2 * mu * w2v + mu * mu * w2) / (Z * Z)
        return mu, var.clamp(min=0).sqrt().amax(1), (Z[:, 0] * Z[:, 0]) / w2[:, 0]

    # ---- folding blocks of entries in ------------------------------------------------------------------------
    @staticmethod
    def block_values(values: torch.Tensor, dtype: torch.dtype, fused: bool) -> torch.Tensor:
        """A block's values ``[M, V]`` as :meth:`fold` takes them: transposed ``[V, M]`` for the native fold, with a
        ones column ``[M, V+1]`` for torch operations."""
        return values.to(dtype).T.contiguous() if fused else with_ones(values, dtype)

    def fold(self, rows: torch.Tensor | slice, logits: torch.Tensor, values: torch.Tensor, skip: float | None) -> int:
        """Fold a logits block ``[R, M]`` of the query ``rows`` (values from :meth:`block_values`) in, in place: with
        the native fold where ``skip`` is given (rows more than ``skip`` below the running maximum skipped), else
        torch operations. Returns the pairs whose exponential was skipped. ``logits`` is overwritten."""
        if skip is not None:
            return on_rows(rows, lambda m, acc: native.fold_logits(logits, values, m, acc, skip), self.m, self.acc)
        m_old = self.m[rows]
        m_new = torch.maximum(m_old, logits.amax(1))
        # Weights relative to the new maximum (logits reused in place). Relative logits below half of log(smallest
        # normal) are raised to it (weights 1.5e-154 in float64, 1.1e-19 in float32, each far below round-off of
        # the max term 1): otherwise late-time weights and their products with the values go subnormal, which
        # doubles the cost.
        floor = 0.5 * math.log(torch.finfo(logits.dtype).tiny)
        weights = logits.sub_(m_new[:, None]).clamp_(min=floor).exp_()
        scale = torch.exp((m_old - m_new).clamp_(min=floor))
        self.acc[rows] = self.acc[rows] * scale[:, None] + weights @ values
        self.m[rows] = m_new
        return 0

    def fold_tiles(self, rows: torch.Tensor, qs: torch.Tensor, keys: native.TileKeys, skip: float) -> int:
        """Fold laid-out keys in for the query ``rows`` (``qs``: those queries scaled by ``a/s²``), logits made in
        registers; returns the pairs whose exponential was skipped."""
        return on_rows(rows, lambda m, acc: native.fold_tiles(qs, keys, m, acc, skip), self.m, self.acc)

    def fold_moments(self, rows: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, fused: bool) -> None:
        """Fold a block of draws' logits ``[R, M]`` (values ``[M, V]``) into the sums and second moments of the query
        ``rows``: the native fold where ``fused``, else torch operations in float64."""
        assert self.second is not None
        if fused:
            values_t = values.to(logits.dtype).T.contiguous()
            on_rows(rows, lambda m, t1, t2: native.fold_moments(logits, values_t, m, t1, t2), self.m, self.acc, self.second)
            return
        values = values.to(torch.float64)
        block = logits.to(torch.float64)
        m_old = self.m[rows]
        m_new = torch.maximum(m_old, block.amax(1))
        w = block.sub_(m_new[:, None]).exp_()
        v1 = with_ones(values, values.dtype)
        v2 = with_ones(torch.cat([values, values * values], 1), values.dtype)
        scale = torch.exp(m_old - m_new)  # 0 on the first block (m_old = EMPTY)
        self.acc[rows] = self.acc[rows] * scale[:, None] + w @ v1
        self.second[rows] = self.second[rows] * (scale * scale)[:, None] + (w * w) @ v2
        self.m[rows] = m_new

    def moments_tiles(self, rows: torch.Tensor, qs: torch.Tensor, keys: native.TileKeys) -> None:
        """:meth:`fold_moments` from laid-out draws, logits made in registers."""
        assert self.second is not None
        on_rows(rows, lambda m, t1, t2: native.moments_tiles(qs, keys, m, t1, t2), self.m, self.acc, self.second)


def merge_all(parts: list[RunningSums]) -> RunningSums:
    """The merge of any number of parts (order does not matter beyond round-off)."""
    if not parts:
        raise ValueError("nothing to merge")
    return reduce(RunningSums.merge, parts)


def merge_bounded(found: list[tuple[RunningSums, torch.Tensor]]) -> tuple[RunningSums, torch.Tensor]:
    """Parts' sums with each part's bound on the weight it left out (relative to its own maximum): the merged
    sums and the merged bound, the bounds rescaled to the common maximum and added."""
    merged = merge_all([p for p, _ in found])
    return merged, sum((b * p.scale_to(merged.m) for p, b in found), torch.zeros_like(merged.m))
