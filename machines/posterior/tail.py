"""Head + importance-sampled tail posterior backend (DESIGN §6 (b)).

For one query and one bucket of distinct patches ``p_j`` with counts ``c_j`` (``n = Σ c_j``),
weights ``w_j = c_j·exp(ℓ_j)``, ``ℓ_j = −a²‖q/a − p_j‖²/(2s²)`` and centre pixels ``v_j``, the
posterior mean is ``μ = (S_H + S_T)/(Z_H + Z_T)`` where ``H`` is the head (the ``k`` nearest
distinct patches, summed exactly) and ``T`` the rest. The tail sums are estimated without bias
from ``m`` draws ``j_1 … j_m`` of a proposal ``π`` over the bucket:

* ``proposal="count"``: ``π_j = c_j/n`` (a uniformly drawn training patch), weight ``n·exp(ℓ_j)``;
* ``proposal="uniform"``: ``π_j = 1/U`` over distinct patches, weight ``U·c_j·exp(ℓ_j)``;

``Ẑ_T = mean_i 1[j_i ∉ H]·w_{j_i}/π_{j_i}`` and ``Ŝ_T`` likewise with ``v``. The returned mean is
the self-normalised ratio ``(S_H + Ŝ_T)/(Z_H + Ẑ_T)`` (consistent; its bias is O(1/m)), and its
standard error per query is the delta-method ``sqrt(var_i(y_i·(v_{j_i} − μ̂))/m)/(Z_H + Ẑ_T)``
(largest over channels). ``k = 0`` is pure importance sampling (no search). One set of draws
serves every query of a bucket call (each query's estimate is unbiased over seeds all the same),
so an answer depends on its own query only, never on the batch it came in; draws are
deterministic given ``seed``, the bucket and the noise level.

The standard error is itself estimated from the draws and means little when a few draws carry
all the tail weight (or none lands in the tail): a query whose draws have an effective sample
size ``ESS = (Σ y)²/Σ y²`` below ``min_ess`` is recomputed by the exact backend (like the top-k
fallback). At late times the head holds the posterior and the tail barely matters; at early
times the posterior is broad, the draws are well spread and the ESS is high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey, centre_index

from .base import BackendBase, FallbackStats, Guarantee, NeighbourSearch, distance_logits, draw_seed, fill_rest, serving
from .exact import ExactBackend


class TailEstimate(NamedTuple):
    """Means ``[Q, C]``, standard errors ``[Q]`` (0 where exact) and ``log Ẑ [Q]``, the log of the
    unbiased estimate of the bucket's total weight ``Σ_j c_j·exp(ℓ_j)`` (NaN where exact)."""

    means: torch.Tensor
    se: torch.Tensor
    log_z: torch.Tensor


@dataclass
class TailStats(FallbackStats):
    """Per-call statistics until :meth:`reset`: queries, standard errors, head mass, seconds."""

    exact_queries: int = 0
    se: list[torch.Tensor] = field(default_factory=list)
    head_mass: list[torch.Tensor] = field(default_factory=list)
    search_s: float = 0.0
    sample_s: float = 0.0

    def summary(self) -> dict:
        se = torch.cat(self.se) if self.se else torch.zeros(0)
        head = torch.cat(self.head_mass) if self.head_mass else torch.zeros(0)
        return {
            "queries": self.queries,
            "exact_fraction": self.exact_queries / self.queries if self.queries else 0.0,
            "fallback_fraction": self.fallback / self.queries if self.queries else 0.0,
            "se_median": float(se.median()) if se.numel() else 0.0,
            "se_max": float(se.max()) if se.numel() else 0.0,
            "head_mass_median": float(head.median()) if head.numel() else 0.0,
            "search_s": round(self.search_s, 4),
            "sample_s": round(self.sample_s, 4),
            "exact_s": round(self.exact_s, 4),
            "error_bound": None,
        }


@dataclass
class SampledTailBackend(NeighbourSearch, BackendBase):
    """Posterior means from an exact top-``k`` head plus ``samples`` importance-sampled tail draws.

    ``proposal``: ``count`` (uniform over training patches) or ``uniform`` (over distinct
    patches). ``exact``: the backend for buckets without distinct patches (not materialised) and
    whole-image rules, and for queries whose tail draws have an effective sample size below
    ``min_ess`` (None: keep every sampled answer). ``engine``/``nprobe``/``index``: how the head is
    searched (:class:`~machines.posterior.base.NeighbourSearch`). Memory: ``query_chunk × (k + samples) × D``.
    """

    k: int = 64
    samples: int = 1024
    proposal: Literal["count", "uniform"] = "count"
    seed: int = 0
    min_ess: float | None = 32.0
    exact: ExactBackend = field(default_factory=ExactBackend)
    query_chunk: int = 128
    stats: TailStats = field(default_factory=TailStats, repr=False)
    guarantee: ClassVar[Guarantee] = "statistical"

    def __post_init__(self) -> None:
        if self.k < 0 or self.samples < 1:
            raise ValueError(f"need k >= 0 and samples >= 1, got k={self.k}, samples={self.samples}")
        if self.min_ess is not None and not self.min_ess > 0:
            raise ValueError(f"min_ess must be > 0 (or None: keep every sampled answer), got {self.min_ess}")
        if self.proposal not in ("count", "uniform"):
            raise ValueError(f"proposal must be 'count' or 'uniform', got {self.proposal!r}")

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, C]`` of queries ``[Q, D]`` against one bucket."""
        return self.estimate(bank, bucket, queries, a, s2).means

    def estimate(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                 seed: int | None = None) -> TailEstimate:
        """The estimate with its standard errors; ``seed`` overrides the backend's."""
        Q = queries.shape[0]
        self.stats.queries += Q
        if serving(bank, bucket) != "table":
            with self.stats.timer("exact_s"):
                means = self.exact.posterior(bank, bucket, queries, a, s2)
            self.stats.exact_queries += Q
            se = torch.zeros(Q, dtype=torch.float64)
            self.stats.se.append(se)
            return TailEstimate(means, se, torch.full((Q,), torch.nan, dtype=torch.float64))
        table = bank.unique_patches(bucket)
        U = table.patches.shape[0]
        k = min(self.k, U)
        q = queries.to(torch.float64)
        dev = q.device
        with self.stats.timer("search_s"):
            head = self.nearest(bank, bucket, (q / a).to(torch.float32), k).neighbours.ids if k else None
        with self.stats.timer("sample_s"):
            gen = torch.Generator().manual_seed(draw_seed(self.seed if seed is None else seed, bucket, a))
            counts = table.counts.to(torch.float64)
            n = float(counts.sum())
            if self.proposal == "count":
                draws = torch.multinomial(counts, self.samples, replacement=True, generator=gen)
                log_scale = torch.full((U,), math.log(n), dtype=torch.float64)  # log(c_j / π_j) with π_j = c_j / n
            else:
                draws = torch.randint(U, (self.samples,), generator=gen)
                log_scale = counts.log() + math.log(U)
            centre = centre_index(bank.channels, bucket.scale)  # type: ignore[arg-type]
            cand = table.patches[draws].to(torch.float64) / 255.0  # the shared draws [m, D], gathered once
            parts = [self._block(table.patches, counts, centre, q[s : s + self.query_chunk],
                                 head[s : s + self.query_chunk].cpu() if head is not None else None,
                                 draws, cand, log_scale[draws], a, s2)
                     for s in range(0, Q, self.query_chunk)]
        means, se, head_mass, log_z, ess = (torch.cat(x) for x in zip(*parts))
        if self.min_ess is not None and k < U:
            keep = ~(ess < self.min_ess)
            fill_rest(means, keep, lambda rows: self.exact.posterior(bank, bucket, q[rows], a, s2), self.stats)
            se[~keep] = 0.0
            log_z[~keep] = torch.nan
        self.stats.se.append(se)
        self.stats.head_mass.append(head_mass)
        return TailEstimate(means.to(dev), se, log_z)

    def _block(self, patches, counts, centre, q, head, draws, cand, log_scale, a, s2):
        """One block of queries ``q [b, D]`` (heads ``[b, k]``) against the shared draws ``draws [m]`` (patches
        ``cand [m, D]``, ``log_scale [m]`` = log(c_j/π_j))."""
        qa = q.cpu() / a
        lw = distance_logits((qa[:, None, :] - cand[None]).pow(2).sum(-1), log_scale[None], a, s2)  # log(w_j / π_j), [b, m]
        if head is not None:
            valid = head >= 0
            hid = head.clamp(min=0)
            hp = patches[hid].to(torch.float64) / 255.0  # [b, k, D]
            lh = torch.where(valid, distance_logits((qa[:, None, :] - hp).pow(2).sum(-1), counts[hid].log(), a, s2), -torch.inf)
            in_head = (draws[None, :, None] == torch.where(valid, head, -1)[:, None, :]).any(-1)
            lw = lw.masked_fill(in_head, -torch.inf)
        else:
            lh = torch.full((q.shape[0], 1), -torch.inf, dtype=torch.float64)
            hp = torch.zeros(q.shape[0], 1, patches.shape[1], dtype=torch.float64)
        m_draws = draws.shape[0]
        M = torch.maximum(lh.amax(1), lw.amax(1) - math.log(m_draws))[:, None]  # [b, 1]
        wh = (lh - M).exp()
        y = (lw - M).exp()  # per-draw unbiased tail contribution, times m
        vh, vt = hp[..., centre], cand[None, :, centre]  # [b, k, C], [1, m, C]
        Z = wh.sum(1) + y.mean(1)  # [b]
        S = (wh[..., None] * vh).sum(1) + (y[..., None] * vt).mean(1)
        mu = S / Z[:, None]
        r = y[..., None] * (vt - mu[:, None, :])  # [b, m, C]
        se = (r.var(1, correction=1) / m_draws).sqrt().amax(1) / Z if m_draws > 1 else torch.full_like(Z, torch.inf)
        ess = y.sum(1).pow(2) / y.pow(2).sum(1)  # NaN (→ fallback) when no draw lands in the tail
        return mu, se, wh.sum(1) / Z, Z.log() + M[:, 0], ess.nan_to_num(0.0)
