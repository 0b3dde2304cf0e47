"""Exact posterior backend: streaming log-sum-exp over a dictionary, chunk by chunk (DESIGN §3).

For queries ``q`` and dictionary entries ``p`` (with values ``v`` and optional log counts ``c``)
the posterior mean is ``Σ_p softmax(ℓ)(p)·v(p)`` with ``ℓ(p) = −‖q − a·p‖²/(2s²) + c(p)``. The
``‖q‖²`` term cancels in the softmax, so each chunk's logits are one matrix product,
``(2a⟨q, p⟩ − a²‖p‖²)/(2s²) + c``, and the reduction keeps a running maximum per query
(flash-attention style): memory is bounded by ``query_chunk × chunk`` whatever the bucket size.

**Pruning** (``prune=True``, patch buckets): the bucket's distinct patches are grouped into
clusters with centre ``c`` and radius ``R`` (:mod:`patchbank.clusters`). For every member,
``ℓ(p) ≤ u = −max(0, ‖q − a·c‖ − a·R)²/(2s²) + max c``. A (query, cluster) pair is skipped
when ``u < m − T`` with ``m`` the query's running maximum (a lower bound of the final one) and
``T = ln(U/tol)``: all skipped weight together is at most ``tol`` times the retained weight, so
the result is exact to ``tol`` (default 1e-16, float64 round-off). Each query first visits its
most promising cluster, so ``m`` is near its final value before the sweep.

**Fused kernel** (``kernel="auto"`` or ``"fused"``, CPU): each ``query_chunk × chunk_size`` logits
block, made by one matrix product while it sits in cache, is folded into the sums by one C pass
per row (:mod:`machines.native`) instead of five torch passes; a row's block is skipped without
exponentials when its maximum lies more than ``ln(1e10/prune_tol)`` below the running maximum
(each skipped weight < ``prune_tol``·1e-10 of the largest, so up to 1e10 entries change the
result by < ``prune_tol``). Sums are kept in float64 whatever ``dtype``. A pruned pass runs as one C
sweep over the cluster tree (:func:`~machines.native.tree_sums`): the logits are made in
registers from the int16 patches and folded at once, so no logits block is written and no Python runs per
cluster (docs/performance.md, "The exact pass as one C sweep"); a streamed block's
logits are made in registers the same way (:func:`~machines.native.fold_tiles`). On CUDA, or without
a C compiler under ``"auto"``, the same blocks go through torch operations.

**Every patch** (``dedup=False``): the bucket is streamed with every repetition of each patch
(no distinct-patch table, no pruning): the reference that deduplication is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch

from patchbank.base import Bank
from patchbank.clusters import ClusteredPatches
from patchbank.geometry import BucketKey, centre_index
from patchbank.tables import Chunk

from .. import native
from .base import BackendBase, BackendStats, entry_bias, logits, serving
from .sums import RunningSums

BOUNDS_BYTES = 256 << 20
"""Memory for one slice of queries' cluster bounds ``[Q, K]`` in a pruned pass: a bucket of K clusters takes its
queries in slices of ``BOUNDS_BYTES / (24 K)``, so a large batch against a large bank stays in bounded memory."""


@dataclass
class PairStats(BackendStats):
    """How many (query, dictionary entry) pairs were computed, out of how many there are, and the seconds."""

    visited: int = 0
    total: int = 0
    skipped: int = 0  # visited pairs whose exponential the fused kernel skipped (provably negligible)
    exact_s: float = 0.0

    @property
    def visited_fraction(self) -> float:
        return self.visited / self.total if self.total else 1.0

    def summary(self) -> dict:
        return {"visited_fraction": self.visited_fraction, "skipped_fraction": self.skipped / self.visited if self.visited else 0.0,
                "exact_s": round(self.exact_s, 4), "error_bound": 0.0}


@dataclass
class ExactBackend(BackendBase):
    """Exact posterior means.

    ``chunk_size``: dictionary entries per chunk; ``query_chunk``: queries per block;
    ``dtype``: compute precision (float64 by default: late-time logits reach ~1e4, so float32
    loses ~1e-4 of relative weight accuracy there). ``prune``: skip clusters of ``leaf_size``
    distinct patches whose total weight is provably below ``prune_tol`` of the retained weight
    (patch buckets only; whole-image buckets are always streamed). ``kernel``: ``"fused"`` (the C
    fold of :mod:`machines.native`; an error where it cannot be compiled), ``"torch"`` (torch
    operations) or ``"auto"`` (fused for CPU queries when available, else torch). ``dedup``:
    sum over distinct patches with log counts where the bank tabulates them (False: every patch,
    every repetition, no pruning). ``tiles``: with the fused kernel, make the logits in registers and fold them at
    once — a pruned pass as one C sweep over the cluster tree (:func:`machines.native.tree_sums`), a streamed block
    through :func:`~machines.native.fold_tiles`; False: a matrix product per block (per cluster), then
    :func:`~machines.native.fold_logits` (the same sums); None (the default): where the CPU has the wide vectors the
    tiles are written for (:func:`machines.native.wide_vectors`). ``stats`` counts the (query, entry) pairs computed against
    those that exist.
    """

    chunk_size: int = 4096
    query_chunk: int = 256
    dtype: torch.dtype = torch.float64
    prune: bool = True
    leaf_size: int = 2048
    prune_tol: float = 1e-16
    kernel: Literal["auto", "fused", "torch"] = "auto"
    dedup: bool = True
    tiles: bool | None = None
    stats: PairStats = field(default_factory=PairStats, repr=False)

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.query_chunk < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {self.chunk_size}, {self.query_chunk}")
        if not 0 < self.prune_tol < 1:
            raise ValueError(f"prune_tol must lie in (0, 1), got {self.prune_tol}")
        native.check_option(self.kernel)

    def uses_fused(self, device: torch.device | str) -> bool:
        """Whether queries on ``device`` go through the fused kernel."""
        return native.use_fused(self.kernel, device)

    def uses_tiles(self, device: torch.device | str) -> bool:
        """Whether queries on ``device`` make their logits in register tiles (see ``tiles``)."""
        return self.uses_fused(device) and (self.tiles if self.tiles is not None else native.wide_vectors())

    @property
    def skip(self) -> float:
        """How far below a query's running maximum a block row lies before the fused fold skips it: ``ln(1e10/prune_tol)``
        (each skipped weight < ``prune_tol``·1e-10 of the largest)."""
        return math.log(1e10 / self.prune_tol)

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, V]`` of queries ``[Q, D]`` against one bucket of the bank."""
        with self.stats.timer("exact_s"):
            if self.prune and self.dedup and serving(bank, bucket) == "table":
                centre = centre_index(bank.channels, bucket.scale).to(queries.device)  # type: ignore[arg-type]
                return self._pruned(queries, bank.clustered(bucket, self.leaf_size), centre, a, s2)
            chunks = bank.stream(bucket, self.chunk_size, self.dtype, queries.device, distinct=self.dedup)
            return self.posterior_mean(queries, chunks, a, s2)

    def posterior_mean(self, queries: torch.Tensor, chunks: Iterable[Chunk], a: float, s2: float) -> torch.Tensor:
        """queries ``[Q, D]`` and chunks of ``(keys [M, D], values [M, V], log_counts [M] | None)`` → ``[Q, V]``."""
        state = self.posterior_sums(queries, chunks, a, s2)
        if state is None:
            raise ValueError("the dictionary is empty")
        return state.mean()

    def posterior_sums(self, queries: torch.Tensor, chunks: Iterable[Chunk], a: float, s2: float) -> RunningSums | None:
        """The running sums over ``chunks`` (None when there are none), which merge exactly with sums over other
        entries."""
        q = queries.to(self.dtype)
        state: RunningSums | None = None
        for chunk in chunks:
            if chunk.keys.shape[1] != q.shape[1]:
                raise ValueError(f"queries have dimension {q.shape[1]} but dictionary keys {chunk.keys.shape[1]}")
            state = state or self.running(q.shape[0], chunk.values.shape[1], q.device)
            self.stats.total += q.shape[0] * chunk.keys.shape[0]
            keys = chunk.keys.to(self.dtype)
            bias = entry_bias(keys.pow(2).sum(1), chunk.log_counts, a, s2, self.dtype)
            self._accumulate(state, torch.arange(q.shape[0], device=q.device), q, keys, bias, chunk.values, a, s2)
        return state

    def _accumulate(self, state: RunningSums, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                    bias: torch.Tensor, values: torch.Tensor, a: float, s2: float) -> None:
        """Fold one chunk (keys ``[M, D]``, bias ``[1, M]``, values ``[M, V]``) into the running sums of the
        query ``rows`` (in blocks of ``query_chunk``)."""
        self.stats.visited += rows.numel() * keys.shape[0]
        contiguous = rows.numel() > 0 and int(rows[-1] - rows[0]) == rows.numel() - 1
        fused = self.uses_fused(q.device)
        if rows.numel() >= native.MIN_TILE_ROWS and self.uses_tiles(q.device):  # logits in registers
            qs = (q[rows] * (a / s2)).contiguous()
            self.stats.skipped += state.fold_tiles(rows, qs, native.lay_out_keys(keys, bias, values, self.dtype), self.skip)
            return
        values = RunningSums.block_values(values, self.dtype, fused)
        for s in range(0, rows.numel(), self.query_chunk):
            block: torch.Tensor | slice = rows[s : s + self.query_chunk]
            if contiguous:  # a slice: no gathered copy of the queries
                start = int(rows[s])
                block = slice(start, start + min(self.query_chunk, rows.numel() - s))
            self.stats.skipped += state.fold(block, logits(q[block], keys, bias, a, s2), values, self.skip if fused else None)

    def running(self, Q: int, V: int, device: torch.device) -> RunningSums:
        """Empty sums for ``Q`` queries and ``V`` values, as this backend folds them (float64 for the fused kernel,
        else in its dtype); :meth:`visit` adds clusters to them."""
        return RunningSums.empty(Q, V, torch.float64 if self.uses_fused(device) else self.dtype, device)

    def _pruned(self, queries: torch.Tensor, clusters: ClusteredPatches, centre: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Exact-to-``prune_tol`` posterior means of the ``centre`` coordinates ``[C]`` over a clustered bucket."""
        return self.pruned_sums(queries, clusters, centre, a, s2).mean()

    def pruned_sums(self, queries: torch.Tensor, clusters: ClusteredPatches, centre: torch.Tensor, a: float,
                    s2: float) -> RunningSums:
        """The running sums of a pruned pass over the ``centre`` coordinates ``[C]``, exact to ``prune_tol`` of this
        bucket's weight (so of any merge that includes it)."""
        if queries.shape[1] != clusters.patches.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the bucket's patches {clusters.patches.shape[1]}")
        step = max(1, BOUNDS_BYTES // (3 * 8 * clusters.n_clusters))  # the [Q, K] bounds (and their copies) of one slice
        if queries.shape[0] > step:  # each query's sweep is its own: slices give the same answers
            parts = [self.pruned_sums(queries[s : s + step], clusters, centre, a, s2) for s in range(0, queries.shape[0], step)]
            return RunningSums(torch.cat([p.m for p in parts]), torch.cat([p.acc for p in parts]))
        dev, dt = queries.device, self.dtype
        q = queries.to(dt)
        upper = cluster_upper(q, clusters, a, s2)
        state = self.running(q.shape[0], centre.numel(), dev)
        self.stats.total += q.shape[0] * clusters.patches.shape[0]
        threshold = math.log(clusters.patches.shape[0] / self.prune_tol)
        first = upper.argmax(1)
        if self.uses_tiles(dev):  # the whole sweep in one C call, logits made in registers
            qs = (queries.to(torch.float64) * (a / s2 / 255.0)).to(dt).contiguous()
            visited, skipped = native.tree_sums(qs, clusters, -(a * a) / (2 * s2), upper.to(torch.float64).T.contiguous(),
                                                  first.contiguous(), threshold, centre.to(torch.int64).contiguous(),
                                                  state.m, state.acc, self.skip)
            self.stats.visited += visited
            self.stats.skipped += skipped
            return state
        for k in torch.unique(first).tolist():
            self.visit(state, torch.nonzero(first == k).view(-1), q, clusters, k, centre, a, s2)
        for k in range(clusters.n_clusters):
            rows = torch.nonzero((upper[:, k] >= state.m - threshold) & (first != k)).view(-1)
            if rows.numel():
                self.visit(state, rows, q, clusters, k, centre, a, s2)
        return state

    def expand(self, queries: torch.Tensor, clusters: ClusteredPatches, chosen: torch.Tensor, centre: torch.Tensor, a: float,
               s2: float) -> RunningSums:
        """The exact sums of queries ``[Q, D]`` over the clusters each has ``chosen`` (bool ``[Q, K]``), nothing else:
        what a backend that answers the other clusters its own way adds to."""
        q = queries.to(self.dtype)
        state = self.running(q.shape[0], centre.numel(), q.device)
        for k in torch.nonzero(chosen.any(0)).view(-1).tolist():
            self.visit(state, torch.nonzero(chosen[:, k]).view(-1), q, clusters, k, centre, a, s2)
        return state

    def visit(self, state: RunningSums, rows: torch.Tensor, q: torch.Tensor, clusters: ClusteredPatches, k: int,
              centre: torch.Tensor, a: float, s2: float) -> None:
        """Fold cluster ``k`` exactly into the running sums of the query ``rows`` (queries ``q [Q, D]`` in
        this backend's dtype; values: the ``centre`` coordinates ``[C]`` of each member)."""
        s, e = clusters.offsets[k].item(), clusters.offsets[k + 1].item()
        keys = clusters.patches[s:e].to(q.device, self.dtype).div_(255.0)
        bias = entry_bias(clusters.sq_norms[s:e].to(q.device), clusters.log_counts[s:e].to(q.device), a, s2, self.dtype)
        self._accumulate(state, rows, q, keys, bias, keys[:, centre], a, s2)


def cluster_upper(q: torch.Tensor, clusters: ClusteredPatches, a: float, s2: float) -> torch.Tensor:
    """Upper bound on every member's logit (counts included), per query and cluster ``[Q, K]``, in the
    running units (without the −‖q‖²/2s² term): ``(‖q‖² − max(0, ‖q − a·c‖ − a·R)²)/(2s²) + max c``, for
    queries ``q [Q, D]`` in their own dtype and device."""
    dev, dt = q.device, q.dtype
    gap = (torch.cdist(q, a * clusters.centres.to(dev, dt)) - a * clusters.radii.to(dev, dt)).clamp_(min=0)
    return gap.pow_(2).sub_(q.pow(2).sum(1, keepdim=True)).div_(-2 * s2).add_(clusters.max_log_count.to(dev, dt))
