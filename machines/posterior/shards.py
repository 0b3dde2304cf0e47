"""Posterior sums over parts of a bucket, and their exact merge (DESIGN §4, "posterior sums merge exactly").

A bucket's entries can be split into shards — chunks of its stream taken round robin, one shard per
worker, process or device — and each shard summed on its own: a running maximum logit ``m [Q]`` and
``acc [Q, V+1]`` = ``(Σw·v, Σw)`` with ``w = e^(ℓ − m)``. Two such partial results combine by
log-sum-exp arithmetic into the partial result over both, so the merge of all shards is the
posterior over the whole bucket, equal to a single pass up to float64 round-off of the reordered sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey

from .exact import ExactBackend


@dataclass
class PartialSums:
    """Sums over part of a bucket, float64: ``m [Q]`` (−inf where the part is empty) and ``acc [Q, V+1]`` relative to it."""

    m: torch.Tensor
    acc: torch.Tensor

    def merge(self, other: PartialSums) -> PartialSums:
        """The sums over both parts (exact: each side rescaled to the common maximum)."""
        m = torch.maximum(self.m, other.m)
        left = torch.exp(torch.where(torch.isfinite(self.m), self.m - m, -torch.inf))[:, None]
        right = torch.exp(torch.where(torch.isfinite(other.m), other.m - m, -torch.inf))[:, None]
        return PartialSums(m, self.acc * left + other.acc * right)

    def mean(self) -> torch.Tensor:
        """The posterior mean ``[Q, V]`` (an error where no part held an entry)."""
        if not torch.isfinite(self.m).all():
            raise ValueError("the merged parts hold no dictionary entries")
        return self.acc[:, :-1] / self.acc[:, -1:]


def shard_sums(backend: ExactBackend, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, shard: int,
               shards: int, values: int) -> PartialSums:
    """Exact sums of ``queries [Q, D]`` over shard ``shard`` of ``shards`` of a bucket's stream (its chunks
    ``shard, shard + shards, …``); ``values``: V, the width of the bucket's values (C, or C·H·W for images)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must lie in [0, {shards}), got {shard}")
    chunks = bank.stream(bucket, backend.chunk_size, backend.dtype, queries.device, distinct=backend.dedup)
    state = backend.posterior_sums(queries, (c for i, c in enumerate(chunks) if i % shards == shard), a, s2)
    if state is None:
        Q = queries.shape[0]
        return PartialSums(torch.full((Q,), -torch.inf, dtype=torch.float64), torch.zeros(Q, values + 1, dtype=torch.float64))
    m = state.m.to(torch.float64)
    return PartialSums(torch.where(m <= -1e300, -torch.inf, m), state.acc.to(torch.float64))


def merge_all(parts: list[PartialSums]) -> PartialSums:
    """The merge of any number of parts (order does not matter beyond round-off)."""
    if not parts:
        raise ValueError("nothing to merge")
    return reduce(PartialSums.merge, parts)
