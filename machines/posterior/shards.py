"""Posterior sums over parts of a bucket, and their exact merge (DESIGN §4, "posterior sums merge exactly").

A bucket's entries can be split into shards — chunks of its stream taken round robin, one shard per
worker, process or device — and each shard summed on its own: a running maximum logit ``m [Q]`` and
``acc [Q, V+1]`` = ``(Σw·v, Σw)`` with ``w = e^(ℓ − m)``. Two such partial results combine by
log-sum-exp arithmetic into the partial result over both, so the merge of all shards is the
posterior over the whole bucket, equal to a single pass up to float64 round-off of the reordered sums.

:class:`ShardedBackend` serves machines this way, each shard on its own device:

* ``inner="exact"``: every shard sums its chunks exactly; the merge is the exact posterior;
* ``inner="topk"``: the bucket's distinct patches are cut into ``shards`` contiguous ranges. Each
  shard finds its ``k`` nearest patches exactly (torch k-NN on its device), sums them exactly and
  bounds the rest of its range: every patch it did not return lies at least as far as its k-th,
  so the rest weighs at most ``(n_shard − retrieved)·exp(−a²·d_k²/(2s²))``. Sums merge as above,
  bounds add (each rescaled to the common maximum), and ε = Σ bounds / Σ retained weight is the
  same certificate as an unsharded top-k — never looser, since each shard's k-th distance is at
  least the merged list's. Queries with ε > ``tol`` are summed exactly, sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Literal

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey, centre_index
from patchbank.index import Neighbours, merge_neighbours, torch_search

from .base import BackendBase, BackendStats, Guarantee, serving
from .exact import ExactBackend
from .topk import beyond_kth


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


@dataclass
class ShardedStats(BackendStats):
    """Queries, exact fallbacks, top-k certificates (ε per query) and seconds, until :meth:`reset`."""

    queries: int = 0
    fallback: int = 0
    eps: list[torch.Tensor] = field(default_factory=list)
    accepted_eps_max: float = 0.0
    shard_s: float = 0.0
    merge_s: float = 0.0
    exact_s: float = 0.0
    exact_only: bool = True

    def summary(self) -> dict:
        eps = torch.cat(self.eps) if self.eps else torch.zeros(0)
        return {"queries": self.queries, "fallback_fraction": self.fallback / self.queries if self.queries else 0.0,
                "eps_median": float(eps.median()) if eps.numel() else 0.0, "eps_max": float(eps.max()) if eps.numel() else 0.0,
                "shard_s": round(self.shard_s, 4), "merge_s": round(self.merge_s, 4), "exact_s": round(self.exact_s, 4),
                "error_bound": 0.0 if self.exact_only else 2 * self.accepted_eps_max}


@dataclass
class ShardedBackend(BackendBase):
    """A bucket split into ``shards`` parts, each summed on its own device, merged exactly.

    ``inner``: ``exact`` (every entry of every shard) or ``topk`` (each shard's ``k`` nearest distinct
    patches, certified; queries with ε > ``tol`` summed exactly); ``devices``: comma-separated devices,
    shard j on the j-th modulo their number (``cuda:0,cuda:1``: one shard per GPU); ``exact``: the
    backend each shard's exact sums use (float64 by default; its pruning does not apply to shards).
    """

    shards: int = 2
    inner: Literal["exact", "topk"] = "exact"
    k: int = 256
    tol: float = 1e-4
    devices: str = "cpu"
    exact: ExactBackend = field(default_factory=ExactBackend)
    stats: ShardedStats = field(default_factory=ShardedStats, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.shards < 1 or self.k < 1:
            raise ValueError(f"need shards and k >= 1, got {self.shards}, {self.k}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.inner not in ("exact", "topk"):
            raise ValueError(f"inner must be 'exact' or 'topk', got {self.inner!r}")
        self.device_list = [torch.device(d.strip()) for d in self.devices.split(",") if d.strip()]
        if not self.device_list:
            raise ValueError("devices must name at least one device")

    @property
    def guarantee(self) -> Guarantee:  # type: ignore[override]
        return "exact" if self.inner == "exact" else "certified"

    def device_of(self, shard: int) -> torch.device:
        return self.device_list[shard % len(self.device_list)]

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, V]`` of queries ``[Q, D]`` against one bucket, shard by shard."""
        self.stats.queries += queries.shape[0]
        if self.inner == "exact" or serving(bank, bucket) != "table":
            if self.inner == "topk":  # no distinct-patch table to search: exact, counted as fallback
                self.stats.fallback += queries.shape[0]
                self.stats.eps.append(torch.full((queries.shape[0],), torch.inf))
            with self.stats.timer("exact_s"):
                return self.exact_sums(bank, bucket, queries, a, s2).mean().to(queries.dtype)
        self.stats.exact_only = False
        sums, bound = self.topk_sums(bank, bucket, queries, a, s2)
        means = sums.mean()
        eps = bound / sums.acc[:, -1]
        self.stats.eps.append(eps)
        redo = torch.nonzero(~(eps <= self.tol)).view(-1)
        kept = eps[eps <= self.tol]
        if kept.numel():
            self.stats.accepted_eps_max = max(self.stats.accepted_eps_max, float(kept.max()))
        if redo.numel():
            with self.stats.timer("exact_s"):
                means[redo] = self.exact_sums(bank, bucket, queries[redo], a, s2).mean()
            self.stats.fallback += redo.numel()
        return means.to(queries.dtype)

    def exact_sums(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> PartialSums:
        """Every shard's exact sums, on its device, merged (:func:`shard_sums`, :func:`merge_all`)."""
        V = queries.shape[1] if serving(bank, bucket) == "image" else bank.channels
        with self.stats.timer("shard_s"):  # every shard launched before any result is fetched (devices overlap)
            parts = [shard_sums(self.exact, bank, bucket, queries.to(self.device_of(j)), a, s2, j, self.shards, V)
                     for j in range(self.shards)]
        with self.stats.timer("merge_s"):
            return merge_all([PartialSums(p.m.cpu(), p.acc.cpu()) for p in parts])

    def topk_sums(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> tuple[PartialSums, torch.Tensor]:
        """The merged sums over every shard's k nearest patches ``(m [Q], acc [Q, C+1])`` and the merged
        bound ``[Q]`` on the weight of all the others, relative to ``e^m``."""
        with self.stats.timer("shard_s"):  # every shard launched before any result is fetched (devices overlap)
            found = [self._shard_topk(bank, bucket, queries, a, s2, j) for j in range(self.shards)]
        with self.stats.timer("merge_s"):
            parts = [PartialSums(p.m.cpu(), p.acc.cpu()) for p, _ in found]
            bounds = [b.cpu() for _, b in found]
            merged = merge_all(parts)
            scale = [torch.exp(torch.where(torch.isfinite(p.m), p.m - merged.m, -torch.inf)) for p in parts]
            return merged, sum(b * c for b, c in zip(bounds, scale))

    def neighbours(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float) -> Neighbours:
        """The ``k`` nearest distinct patches of ``queries/a`` over all shards (ids into the bucket's table):
        each shard's list, merged by :func:`~patchbank.index.merge_neighbours`."""
        parts = []
        for j in range(self.shards):
            table, search, offset, _ = self._table(bank, bucket, j)
            found = torch_search((queries.to(table.device, torch.float64) / a).float(), search, min(self.k, max(1, table.shape[0])))
            parts.append(Neighbours(found.distances.cpu(), torch.where(found.ids >= 0, found.ids + offset, -1).cpu()))
        return merge_neighbours(parts, self.k)

    def _table(self, bank: Bank, bucket: BucketKey, shard: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Shard ``shard``'s range of the bucket's distinct patches on its device: the stored patches ``[U_j, D]``
        (int16, units of 1/255), their float32 search copy (model units), the range's first id and its
        counts ``[U_j]`` (cached for one bucket at a time)."""
        key = (bucket, shard)
        if key not in self._tables:
            self._tables = {k: v for k, v in self._tables.items() if k[0] == bucket}
            table = bank.unique_patches(bucket)
            U = table.patches.shape[0]
            lo, hi = shard * U // self.shards, (shard + 1) * U // self.shards
            device = self.device_of(shard)
            patches = table.patches[lo:hi].to(device)
            self._tables[key] = (patches, patches.float() / 255.0, lo, table.counts[lo:hi].to(device))
        return self._tables[key]

    def _shard_topk(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, shard: int):
        keys, search, _, counts = self._table(bank, bucket, shard)
        Q = queries.shape[0]
        if keys.shape[0] == 0:
            empty = PartialSums(torch.full((Q,), -torch.inf, dtype=torch.float64), torch.zeros(Q, bank.channels + 1, dtype=torch.float64))
            return empty, torch.zeros(Q, dtype=torch.float64)
        qa = queries.to(keys.device, torch.float64) / a
        found = torch_search(qa.float(), search, min(self.k, keys.shape[0]))
        ids = found.ids
        cand = keys[ids].double() / 255.0  # [Q, k, D], exact in float64 (every id valid: k ≤ the shard's size)
        c = counts[ids].double()
        d2 = (qa[:, None, :] - cand).pow(2).sum(-1)  # exact, float64
        logit = -(a * a) * d2 / (2 * s2) + c.log()
        m = logit.amax(1)
        w = (logit - m[:, None]).exp()
        centre = centre_index(bank.channels, bucket.scale).to(keys.device)  # type: ignore[arg-type]
        acc = torch.cat([(w[..., None] * cand[..., centre]).sum(1), w.sum(1, keepdim=True)], 1)
        rest = (counts.double().sum() - c.sum(1)).clamp(min=0)
        return PartialSums(m, acc), rest * beyond_kth(qa, d2.amax(1), a, s2, m)
