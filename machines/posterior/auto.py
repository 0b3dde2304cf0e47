"""Automatic posterior policy: shared importance draws first, exact work only where needed.

For one bucket call (all query pixels that share a dictionary) the policy draws training patches of the bucket
— one set of draws shared by every query, so the logits are one matrix product — and accepts a query's
self-normalised estimate where its effective sample size reaches ``min_ess`` and its delta-method standard error
is at most ``se_tol``; queries that fail get ``growth``× more draws up to a limit, and leave early where their
projected need is far beyond it. What the draws do not answer goes to certified top-k, the cluster summaries or
the exact backend. Where the bucket is small, or the cost model of :mod:`~machines.posterior.planner` finds
that drawing would not pay at this noise level, the queries go straight to the other routes. Draws are
deterministic given ``seed``, the bucket and the noise level, and no answer depends on the batch. The rule step
by step, and the measurements behind its defaults, are in docs/reference.md ("Automatic policy").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey

from .. import native
from .base import BackendBase, BackendStats, Guarantee, draw_seed, entry_bias, fill_rest, logits, serving
from .exact import ExactBackend
from .planner import EARLY_FACTOR, SEARCH_COST, SMALL_FACTOR, CostModel
from .summary import SummaryBackend
from .sums import RunningSums
from .topk import TopKBackend


class Draws(NamedTuple):
    """What a bucket call's shared draws gave its queries (CPU): means ``[Q, C]``, standard errors ``[Q]``, whether
    each is accepted ``[Q]``, the draws each is projected to need from its last round ``[Q]`` and whether it left
    before the limit ``[Q]``."""

    means: torch.Tensor
    se: torch.Tensor
    ok: torch.Tensor
    need: torch.Tensor
    left_early: torch.Tensor


@dataclass
class PolicyStats(BackendStats):
    """Per-call statistics until :meth:`reset`: which route each query took, errors, seconds."""

    queries: int = 0
    sampled: int = 0
    topk: int = 0
    exact: int = 0
    summaries: int = 0  # queries answered by the cluster summaries
    planned_exact: int = 0  # … of the exact ones, sent there by the probe's plan without drawing
    planned_topk: int = 0  # … of the top-k ones, sent there first by the probe's plan (no draws)
    low_ess: int = 0  # queries that left the draws with ESS < min_ess
    high_se: int = 0  # … with enough ESS but SE > se_tol
    stopped_early: int = 0  # … of which left the draws before the limit: their projected need was beyond it
    draws: int = 0  # Σ over buckets of the draws made (each shared by that bucket's queries)
    buckets: int = 0
    se: list[torch.Tensor] = field(default_factory=list)
    sample_s: float = 0.0
    topk_s: float = 0.0
    exact_s: float = 0.0
    summary_s: float = 0.0
    probe_s: float = 0.0  # the cost model's probes (once per bucket and noise level)

    @property
    def choice(self) -> str:
        """The route most queries took: ``sampled``, ``topk`` or ``exact`` (``mixed`` if none holds 90%)."""
        if not self.queries:
            return "none"
        route, n = max((("sampled", self.sampled), ("topk", self.topk), ("exact", self.exact), ("summary", self.summaries)),
                       key=lambda r: r[1])
        return route if n >= 0.9 * self.queries else "mixed"

    def summary(self) -> dict:
        se = torch.cat(self.se) if self.se else torch.zeros(0)
        q = self.queries or 1
        return {
            "queries": self.queries,
            "choice": self.choice,
            "sampled_fraction": self.sampled / q,
            "topk_fraction": self.topk / q,
            "exact_fraction": self.exact / q,
            "summary_fraction": self.summaries / q,
            "planned_exact_fraction": self.planned_exact / q,  # routed to exact by the cost model, no draws made
            "planned_topk_fraction": self.planned_topk / q,  # routed to top-k first by the cost model, no draws made
            "fallback_fraction": (self.topk + self.exact + self.summaries) / q,  # answered by other than the draws
            "low_ess_fraction": self.low_ess / q,
            "high_se_fraction": self.high_se / q,
            "stopped_early_fraction": self.stopped_early / q,
            "draws_per_bucket": self.draws / self.buckets if self.buckets else 0.0,
            "se_median": float(se.median()) if se.numel() else 0.0,
            "se_max": float(se.max()) if se.numel() else 0.0,
            "sample_s": round(self.sample_s, 4),
            "topk_s": round(self.topk_s, 4),
            "exact_s": round(self.exact_s, 4),
            "summary_s": round(self.summary_s, 4),
            "probe_s": round(self.probe_s, 4),
            "error_bound": None,
        }


@dataclass
class AutoBackend(CostModel, BackendBase):
    """Shared importance draws with per-query acceptance, then certified top-k or exact for the rest.

    ``samples``: first-round draws per bucket call; ``growth``/``max_samples``: escalation for queries that fail
    (cumulative draws at most ``max_samples``); ``se_tol``: largest accepted standard error of a sampled x̂0 pixel;
    ``min_ess``: smallest accepted effective sample size (guards the standard error, itself estimated from the
    draws); ``topk``: optional certified backend for the rest (buckets with distinct-patch tables); ``summary``:
    optional cluster summaries for the rest where there is no ``topk``; ``exact``: the exact backend, float32 by
    default (sums float64 across blocks); ``chunk``: draws per matrix product (memory ``queries × chunk``);
    ``draw_dtype``: precision of the draws' logits (running sums float64 across blocks); ``kernel``: ``"auto"``
    folds the draws' moments with the fused C kernel where available (CPU), ``"fused"`` requires it, ``"torch"``
    uses torch operations. The cost model (:class:`~machines.posterior.planner.CostModel`): ``probe``: probe
    queries per (bucket, noise level) (0: always draw first); ``draw_cost``: one draw's cost in exact (query,
    entry) pairs (None: 2.0 where the exact backend makes its logits in registers on the CPU, else 1.5; a
    constant, so plans and answers never depend on timings); ``topk_k``: with no ``topk`` given, a certified
    top-k route of this k whose fallback is ``exact`` (None: none); ``search_cost``: one searched (query, patch)
    distance in exact pairs; ``plan_margin``: how many times their cost the draws must be projected to save to be
    kept. How each default was chosen is in docs/reference.md ("Automatic policy").
    """

    samples: int = 4096
    growth: int = 4
    max_samples: int = 1 << 22
    se_tol: float = 5e-3
    min_ess: float = 64.0
    seed: int = 0
    topk: TopKBackend | None = None
    summary: SummaryBackend | None = None
    exact: ExactBackend = field(default_factory=lambda: ExactBackend(dtype=torch.float32))
    chunk: int = 8192
    draw_dtype: torch.dtype = torch.float32
    kernel: Literal["auto", "fused", "torch"] = "auto"
    probe: int = 32
    draw_cost: float | None = None
    topk_k: int | None = None
    search_cost: float = SEARCH_COST
    plan_margin: float = 4.0
    stats: PolicyStats = field(default_factory=PolicyStats, repr=False)
    plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (bucket, a, s²) → draw first?
    topk_plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (bucket, a, s²) → top-k first?
    pairs: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (bucket, a, s²) → exact pairs per query
    guarantee: ClassVar[Guarantee] = "statistical"

    def __post_init__(self) -> None:
        if self.samples < 2 or self.max_samples < self.samples or self.growth < 2:
            raise ValueError(f"need 2 <= samples <= max_samples and growth >= 2, got samples={self.samples}, "
                             f"max_samples={self.max_samples}, growth={self.growth}")
        if not self.se_tol > 0 or self.min_ess < 1:
            raise ValueError(f"need se_tol > 0 and min_ess >= 1, got {self.se_tol}, {self.min_ess}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.probe < 0 or not (self.draw_cost is None or self.draw_cost > 0):
            raise ValueError(f"need probe >= 0 and draw_cost > 0, got probe={self.probe}, draw_cost={self.draw_cost}")
        if self.draw_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"draw_dtype must be torch.float32 or torch.float64, got {self.draw_dtype}")
        if not self.plan_margin > 0:
            raise ValueError(f"plan_margin must be > 0, got {self.plan_margin}")
        if not self.search_cost >= 0 or (self.topk_k is not None and self.topk_k < 1):
            raise ValueError(f"need search_cost >= 0 and topk_k >= 1, got {self.search_cost}, {self.topk_k}")
        native.check_option(self.kernel)
        if self.topk is None and self.topk_k is not None:
            self.topk = TopKBackend(k=self.topk_k, exact=self.exact)

    def uses_fused(self, device: torch.device | str) -> bool:
        """Whether the draws' moments on ``device`` are folded by the fused kernel."""
        return native.use_fused(self.kernel, device)

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, C]`` of queries ``[Q, D]`` against one bucket."""
        Q = queries.shape[0]
        self.stats.queries += Q
        self.stats.buckets += 1
        route = serving(bank, bucket)
        if route == "image":
            return self._exact(bank, bucket, queries, a, s2)
        N = bank.stream_size(bucket)
        if N <= self.samples:
            return self._exact(bank, bucket, queries, a, s2)
        if self.probe and (N < SMALL_FACTOR * self.samples or not self.worth_drawing(bank, bucket, N, a, s2)):
            if self.topk is not None and route == "table" and self.topk_pays(bank, bucket, a, s2):
                self.stats.planned_topk += Q
                return self._topk(bank, bucket, queries, a, s2)
            self.stats.planned_exact += Q
            return self._exact(bank, bucket, queries, a, s2)
        with self.stats.timer("sample_s"):
            means, se, ok = self.sampled(bank, bucket, queries, a, s2, limit=self.draw_limit(bank, bucket, N, a, s2))
        self.stats.sampled += int(ok.sum())
        self.stats.se.append(se[ok].cpu())
        fill_rest(means, ok, lambda rows: self._rest(bank, bucket, queries[rows.to(queries.device)], a, s2, route))
        return means.to(queries.device)

    def _rest(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, route: str) -> torch.Tensor:
        """The queries the draws did not answer: certified top-k where it is given and pays, else the cluster
        summaries where given, else exact."""
        if self.topk is not None and route == "table" and (not self.probe or self.topk_pays(bank, bucket, a, s2)):
            return self._topk(bank, bucket, queries, a, s2)
        if self.summary is not None and route == "table":
            with self.stats.timer("summary_s"):
                means = self.summary.posterior(bank, bucket, queries, a, s2)
            self.stats.summaries += queries.shape[0]
            return means
        return self._exact(bank, bucket, queries, a, s2)

    def sampled(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared-draw estimates: means ``[Q, C]``, standard errors ``[Q]``, accepted mask ``[Q]`` (on the CPU); the
        first three of :meth:`draw`."""
        drawn = self.draw(bank, bucket, queries, a, s2, limit)
        return drawn.means, drawn.se, drawn.ok

    def draw(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, limit: int | None = None,
             stats: PolicyStats | None = None) -> Draws:
        """The shared draws of one bucket call (:class:`Draws`); ``limit``: most draws for queries that fail (default
        ``max_samples``, at most a quarter of the bucket's entries); ``stats``: where the draws are counted (by
        default this backend's statistics)."""
        stats = self.stats if stats is None else stats
        if limit is None:
            limit = self._limit(bank.stream_size(bucket))
        gen = torch.Generator().manual_seed(draw_seed(self.seed, bucket, a))
        q = queries.to(self.draw_dtype)
        state = RunningSums.empty(q.shape[0], bank.channels, device=q.device, moments=True)
        rows = torch.arange(q.shape[0], device=q.device)
        drawn, target = 0, self.samples
        stopped = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        while True:
            while drawn < target:
                m = min(self.chunk, target - drawn)
                draws = bank.sample_patches(bucket, m, gen, self.draw_dtype, q.device)
                self._fold_draws(state, rows, q[rows], draws.keys, draws.values, a, s2)
                drawn += m
                stats.draws += m
            means, se, ess = state.estimate()
            ok = (ess >= self.min_ess) & (se <= self.se_tol)
            # ESS grows and SE² shrinks in proportion to the draws: a query whose projected need exceeds
            # 8× the limit would fail at the limit too, so it leaves now rather than after the rounds.
            need = drawn * torch.maximum(self.min_ess / ess.clamp(min=1e-300), (se / self.se_tol) ** 2)
            hopeless = ~ok & ~stopped & (need > EARLY_FACTOR * limit) & (target < limit)
            stats.stopped_early += int(hopeless.sum())
            stopped |= hopeless
            rows = torch.nonzero(~ok & ~stopped).view(-1)
            if not rows.numel() or target >= limit:
                low = ess < self.min_ess
                stats.low_ess += int(low.sum())
                stats.high_se += int((~low & ~ok).sum())
                return Draws(means.cpu(), se.cpu(), ok.cpu(), need.cpu(), stopped.cpu())
            target = min(target * self.growth, limit)

    def _fold_draws(self, state: RunningSums, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    a: float, s2: float) -> None:
        """Add draws ``keys [M, D]`` with centre values ``values [M, C]`` to the sums of queries ``q [R, D]`` (rows
        ``rows`` of the state), logits in the keys' dtype: in registers (:func:`machines.native.moments_tiles`), or a
        matrix product then :meth:`RunningSums.fold_moments` (the fused kernel where it is used, else torch)."""
        # ℓ = −‖q − a·p‖²/(2s²) up to a per-query constant (−‖q‖²/2s², which cancels).
        bias = entry_bias(keys.pow(2).sum(1), None, a, s2, keys.dtype)
        fused = self.uses_fused(q.device)
        if fused and q.shape[0] >= native.MIN_TILE_ROWS and self.exact.uses_tiles(q.device):  # logits in registers
            qs = (q.to(keys.dtype) * (a / s2)).contiguous()
            state.moments_tiles(rows, qs, native.lay_out_keys(keys, bias, values, keys.dtype))
            return
        state.fold_moments(rows, logits(q.to(keys.dtype), keys, bias, a, s2), values, fused)

    def _topk(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        assert self.topk is not None
        with self.stats.timer("topk_s"):
            means = self.topk.posterior(bank, bucket, queries, a, s2)
        self.stats.topk += queries.shape[0]
        return means

    def _exact(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        with self.stats.timer("exact_s"):
            means = self.exact.posterior(bank, bucket, queries, a, s2)
        self.stats.exact += queries.shape[0]
        return means
