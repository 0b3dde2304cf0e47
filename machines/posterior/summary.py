"""Cluster summaries: whole clusters of patches as one term, with a certified error bound.

A bucket's distinct patches are grouped into clusters (:mod:`patchbank.clusters`: contiguous
ranges with a centre and a radius, the structure of an IVF list; stored in a :class:`PatchBank`).
For a cluster with count-weighted mean ``μ``, members ``p = μ + δ`` with counts ``n``, total count
``N`` and radius ``R = max‖δ‖``, a query's logit (running units, DESIGN §3) splits exactly as

    ℓ(p) = ℓ(μ) + x_p,   x_p = (a⟨r, δ⟩ − a²‖δ‖²/2)/s²,   r = q − a·μ,   |x_p| ≤ X = (a‖r‖R + a²R²/2)/s².

Expanding ``e^x = 1 + x + ρ(x)`` with ``0 ≤ ρ(x) ≤ x²e^{max(x,0)}/2`` and ``Σ n·δ = 0``, the
cluster's weight and centre-value sums are, with stored moments ``V = Σn‖δ‖²``, ``T = Σn·v``,
``G = Σn·v·δ`` and ``W = Σn·v·‖δ‖²`` (``v`` the centre pixel):

    Z = e^{ℓ(μ)}·(N − a²V/(2s²) + E_Z),                    0 ≤ E_Z ≤ N·B,
    S = e^{ℓ(μ)}·(T + (a⟨r, G⟩ − a²W/2)/s² + E_S),         |E_S| ≤ N·B,      B = X²e^X/2.

A **summarised** cluster contributes those two terms (first-order exact, second-order bounded:
one term per cluster, like the zeroth-order "count and centre-pixel sum" term but with a band
that shrinks as ``X²`` instead of ``X``). A cluster whose weight is provably negligible
(``N·e^{hi} ≤ tol/(4K)`` of a lower bound on the total, ``hi`` the largest member logit allowed
by the triangle inequality) is **dropped** and bounded as tail. Every other cluster is
**expanded** exactly (the exact backend's cluster visits, fused kernel included).

With values in [-1, 1], ``|x̂0 − exact| ≤ 2·(Σ_summarised e^{ℓ(μ)}N·B + Σ_dropped N·e^{hi}) / Ẑ``:
that bound is computed per query pixel and reported; a pixel whose bound exceeds ``tol`` is
recomputed exactly (only those, batched). A cluster is summarised when ``B ≤ tol/4``, so the
fallback is rare. Buckets without distinct-patch tables (whole-image rules, streamed scales)
are summed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from patchbank.base import Bank
from patchbank.clusters import ClusteredPatches
from patchbank.geometry import BucketKey, centre_index

from .base import BackendBase, FallbackStats, Guarantee, fill_rest, serving
from .exact import ExactBackend

_ROWS = 1 << 20  # patches per block when computing moments


class ClusterMoments(NamedTuple):
    """Count-weighted moments of ``K`` clusters of ``D``-dimensional patches with ``C`` centre values.

    counts ``[K]`` (N), means ``[K, D]`` (μ), radii ``[K]`` (max ‖p − μ‖), spread ``[K]`` (V),
    value_sums ``[K, C]`` (T), value_moments ``[K, C, D]`` (G), value_spread ``[K, C]`` (W),
    mean_dot_g ``[K, C]`` (⟨μ, G⟩), mean_sq ``[K]`` (‖μ‖²). All float64.
    """

    counts: torch.Tensor
    means: torch.Tensor
    radii: torch.Tensor
    spread: torch.Tensor
    value_sums: torch.Tensor
    value_moments: torch.Tensor
    value_spread: torch.Tensor
    mean_dot_g: torch.Tensor
    mean_sq: torch.Tensor


def cluster_moments(clusters: ClusteredPatches, centre: torch.Tensor) -> ClusterMoments:
    """The moments a summary needs, for clustered patches and centre coordinates ``centre [C]``."""
    K, D = clusters.n_clusters, clusters.patches.shape[1]
    C = centre.numel()
    sizes = clusters.offsets.diff()
    ids = torch.repeat_interleave(torch.arange(K), sizes)
    n = clusters.log_counts.exp()
    f64 = torch.float64
    N = torch.zeros(K, dtype=f64).index_add_(0, ids, n)
    first = torch.zeros(K, D, dtype=f64)
    for s in range(0, ids.numel(), _ROWS):
        p = clusters.patches[s : s + _ROWS].to(f64) / 255.0
        first.index_add_(0, ids[s : s + _ROWS], p * n[s : s + _ROWS, None])
    mu = first / N[:, None]
    radii, V = torch.zeros(K, dtype=f64), torch.zeros(K, dtype=f64)
    G, W = torch.zeros(K, C, D, dtype=f64), torch.zeros(K, C, dtype=f64)
    T = mu[:, centre] * N[:, None]
    for s in range(0, ids.numel(), _ROWS):
        i, w = ids[s : s + _ROWS], n[s : s + _ROWS]
        p = clusters.patches[s : s + _ROWS].to(f64) / 255.0
        delta = p - mu[i]
        sq = delta.pow(2).sum(1)
        radii.scatter_reduce_(0, i, sq.sqrt(), "amax")
        V.index_add_(0, i, w * sq)
        v = p[:, centre] * w[:, None]  # [B, C]
        G.index_add_(0, i, v[:, :, None] * delta[:, None, :])
        W.index_add_(0, i, v * sq[:, None])
    return ClusterMoments(N, mu, radii, V, T, G, W, torch.einsum("kd,kcd->kc", mu, G), mu.pow(2).sum(1))


@dataclass
class SummaryStats(FallbackStats):
    """Per-call statistics until :meth:`reset`: what happened to each (query, cluster) pair, bounds, seconds (fallback:
    the queries whose bound exceeded tol, recomputed exactly)."""

    exact_buckets: int = 0  # queries on buckets without clusters (summed exactly)
    pairs: int = 0  # (query, cluster) pairs on clustered buckets
    summarised: int = 0
    dropped: int = 0
    expanded: int = 0
    entries: int = 0  # (query, distinct patch) pairs that exist on clustered buckets
    expanded_entries: int = 0  # … of which were computed exactly
    bounds: list[torch.Tensor] = field(default_factory=list)
    summary_s: float = 0.0

    def summary(self) -> dict:
        b = torch.cat(self.bounds) if self.bounds else torch.zeros(0)
        p = self.pairs or 1
        return {
            "queries": self.queries,
            "summarised_fraction": self.summarised / p,
            "dropped_fraction": self.dropped / p,
            "expanded_fraction": self.expanded / p,
            "expanded_entries_fraction": self.expanded_entries / self.entries if self.entries else 0.0,
            "fallback_fraction": self.fallback / self.queries if self.queries else 0.0,
            "exact_bucket_fraction": self.exact_buckets / self.queries if self.queries else 0.0,
            "bound_median": float(b.median()) if b.numel() else 0.0,
            "bound_max": float(b.max()) if b.numel() else 0.0,
            "summary_s": round(self.summary_s, 4),
            "exact_s": round(self.exact_s, 4),
            "error_bound": float(b.max()) if b.numel() else 0.0,
        }


@dataclass
class SummaryBackend(BackendBase):
    """Posterior means with whole clusters summarised or dropped where provably safe, the rest exact.

    ``tol``: the largest certified error ``|x̂0 − exact|`` per pixel (values in [-1, 1]); pixels whose
    bound exceeds it are recomputed exactly. ``leaf_size``: cluster size (smaller clusters have
    smaller radii, so more of them can be summarised, at a per-cluster cost). ``exact``: the exact
    backend (expanded clusters, fallbacks, buckets without tables). ``query_chunk``: queries per
    block (memory about ten ``query_chunk × clusters`` float64 arrays).
    """

    tol: float = 1e-3
    leaf_size: int = 256
    exact: ExactBackend = field(default_factory=ExactBackend)
    query_chunk: int = 256
    stats: SummaryStats = field(default_factory=SummaryStats, repr=False)
    _moments: dict = field(default_factory=dict, repr=False)
    guarantee: ClassVar[Guarantee] = "certified"

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must lie in (0, 1), got {self.tol}")
        if self.leaf_size < 1 or self.query_chunk < 1:
            raise ValueError(f"leaf_size and query_chunk must be >= 1, got {self.leaf_size}, {self.query_chunk}")

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, C]`` of queries ``[Q, D]`` against one bucket."""
        self.stats.queries += queries.shape[0]
        if serving(bank, bucket) != "table":
            self.stats.exact_buckets += queries.shape[0]
            return self._exact(bank, bucket, queries, a, s2)
        with self.stats.timer("summary_s"):
            means, bound = self.summarised(bank, bucket, queries, a, s2)
        self.stats.bounds.append(bound[bound <= self.tol].cpu())
        fill_rest(means, ~(bound > self.tol), lambda rows: self.exact.posterior(bank, bucket, queries[rows], a, s2), self.stats)
        return means.to(queries.device)

    def summarised(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``[Q, C]`` and their certified error bounds ``[Q]`` (before any fallback), float64 CPU."""
        clusters = bank.clustered(bucket, self.leaf_size)
        centre = centre_index(bank.channels, bucket.scale)  # type: ignore[arg-type]
        key = (id(clusters), bucket)
        if key not in self._moments:
            self._moments = {k: v for k, v in self._moments.items() if k[1] != bucket}
            self._moments[key] = cluster_moments(clusters, centre)
        mo: ClusterMoments = self._moments[key]
        q = queries.detach().to("cpu", torch.float64)
        if q.shape[1] != mo.means.shape[1]:
            raise ValueError(f"queries have dimension {q.shape[1]} but the bucket's patches {mo.means.shape[1]}")
        parts = [self._block(q[s : s + self.query_chunk], clusters, mo, centre, a, s2) for s in range(0, q.shape[0], self.query_chunk)]
        return torch.cat([m for m, _ in parts]), torch.cat([b for _, b in parts])

    def _block(self, q: torch.Tensor, clusters: ClusteredPatches, mo: ClusterMoments, centre: torch.Tensor, a: float, s2: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`summarised` for one block of queries ``[Q, D]`` (memory ~10 × ``Q × K`` floats)."""
        Q, K = q.shape[0], mo.counts.numel()
        qn2 = q.pow(2).sum(1, keepdim=True)
        dot = q @ mo.means.T  # [Q, K]
        r2 = (qn2 - 2 * a * dot + a * a * mo.mean_sq).clamp_(min=0)  # ‖q − aμ‖²
        r = r2.sqrt()
        base = (2 * a * dot - a * a * mo.mean_sq) / (2 * s2)  # ℓ(μ), running units
        aR = a * mo.radii
        hi = (qn2 - (r - aR).clamp(min=0).pow(2)) / (2 * s2)  # every member's logit ≤ hi
        lo = (qn2 - (r + aR).pow(2)) / (2 * s2)  # … ≥ lo
        logN = mo.counts.log()
        X = (aR * r + 0.5 * aR * aR) / s2
        B = 0.5 * X * X * X.exp()
        floor = (logN + lo).amax(1, keepdim=True)  # log of a lower bound on the total weight
        drop = logN + hi < floor - math.log(4 * K / self.tol)
        summ = ~drop & (B <= self.tol / 4)
        expand = ~drop & ~summ

        expanded = self.exact.expand(q, clusters, expand, centre, a, s2).float64(q.device)
        m, acc = expanded.m, expanded.acc
        # Summaries: Ẑ_k = e^{ℓ(μ)}(N − a²V/2s²), Ŝ_k = e^{ℓ(μ)}(T + (a⟨r, G⟩ − a²W/2)/s²), bound term e^{ℓ(μ)}·N·B.
        masked = base.masked_fill(~summ, -math.inf)
        dropped = (logN + hi).masked_fill(~drop, -math.inf)  # log of each dropped cluster's largest weight
        shift = torch.maximum(torch.maximum(m, masked.amax(1)), dropped.amax(1))  # keeps e^{·−shift} ≤ 1
        e = (masked - shift[:, None]).exp()  # [Q, K], 0 where not summarised
        Zs = e @ (mo.counts - a * a * mo.spread / (2 * s2))
        rG = torch.einsum("qd,kcd->qkc", q, mo.value_moments) - a * mo.mean_dot_g  # ⟨r, G⟩ = ⟨q, G⟩ − a⟨μ, G⟩
        Ss = torch.einsum("qk,qkc->qc", e, mo.value_sums + (a * rG - 0.5 * a * a * mo.value_spread) / s2)
        err = torch.where(summ, e * mo.counts * B, 0.0).sum(1) + (dropped - shift[:, None]).exp().sum(1)
        rescale = (m - shift).exp()
        Z = acc[:, -1] * rescale + Zs
        S = acc[:, :-1] * rescale[:, None] + Ss
        bound = torch.where(Z > 0, 2 * err / Z, torch.full_like(Z, math.inf))
        st = self.stats
        st.pairs += Q * K
        st.summarised += int(summ.sum())
        st.dropped += int(drop.sum())
        st.expanded += int(expand.sum())
        sizes = clusters.offsets.diff().to(torch.float64)
        st.entries += Q * clusters.patches.shape[0]
        st.expanded_entries += int((expand.to(torch.float64) @ sizes).sum())
        return S / Z.clamp(min=1e-300)[:, None], bound

    def _exact(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        with self.stats.timer("exact_s"):
            return self.exact.posterior(bank, bucket, queries, a, s2)
