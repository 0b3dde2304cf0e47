"""Automatic posterior policy: shared importance draws first, exact work only where needed.

For one bucket call (all query pixels that share a dictionary) the policy

1. goes **exact** at once when the bucket has no more entries ``N`` than a round has draws (``N``:
   its distinct patches where it has a table, else its patches). Both an exact sum and a round of
   draws take one product per (query, entry), so their costs are in the ratio ``N : samples``
   whatever the number of queries. With the cost model on (``probe > 0``, the default) it also goes
   exact when ``N < SMALL_FACTOR × samples``: a first round that costs a quarter of the exact sum
   or more seldom pays;
1b. otherwise (cost model on) **plans** the route of the bucket at this noise level by a probe (the cost model):
   ``probe`` queries ``a·p + s·ε`` made from training patches ``p`` of the bucket (fixed draws of
   ``p`` and ``ε``, seeded by ``seed``, the bucket and the noise level) take one round of draws; each
   passes, or is projected to pass within the limit of step 3 (ESS and SE² scale with the draws),
   or not, giving the fraction ``f`` that the draws would answer and the mean draws ``d`` step 3
   would spend (its need for a probe that passes, the whole limit for one that would escalate and
   still fail, one round for one that would leave early). The probe queries are also summed exactly,
   giving ``V``, the (query, entry) pairs per query of the exact route (``N`` where the bucket is streamed;
   fewer where a distinct-patch table lets cluster pruning skip work, as at late times). The draws
   are kept only when ``plan_margin · draw_cost · d < f · V`` — what they save (the exact sums of the pixels they
   answer) exceeds what they cost by the margin (``draw_cost``: one draw's cost in exact (query, entry) pairs;
   gathering a patch and keeping two sums per draw make it above 1: measured 1.6–2.3, median 1.9,
   against the exact backend's register-tile kernels, and about 1.5 against its per-block product and fold;
   ``plan_margin``: the probe queries, training patches plus noise, project passes that the sampler's own pixels
   do not always reach, most in small edge buckets, so a bucket whose draws would only just pay is summed exactly).
   Otherwise every query of the
   bucket at this level goes to the exact route (step 4) without drawing. The plan is kept per
   (bucket, noise level) and depends on neither the queries nor the batch, so answers stay
   independent of the batch;
2. otherwise draws ``samples`` training patches uniformly from the bucket (the count proposal:
   a distinct patch is drawn with probability proportional to its count) — **one set of draws
   shared by every query**, so the logits are one matrix product, and no distinct-patch table or
   index is needed (any P, any bank size). Each query's posterior mean is the self-normalised
   estimate ``Σ_i e^{ℓ_i} v_i / Σ_i e^{ℓ_i}`` over the draws, with its delta-method standard error
   ``sqrt(Σ_i w̄_i² (v_i − μ̂)²)`` (``w̄`` the normalised weights, largest over channels) and
   effective sample size ``ESS = 1/Σ_i w̄_i²``;
3. **accepts** a query's sampled answer when ``ESS ≥ min_ess`` and ``SE ≤ se_tol``; queries that
   fail get ``growth``× more draws (added to the same running sums, still an i.i.d. sample) until
   they pass or ``max_samples`` draws (at most ``N/4``: more would cost about an exact sum; with the cost model
   on, at most ``V / draw_cost``, the exact pairs they would replace, where a table lets pruning make ``V`` small) are spent;
   a query whose ESS and SE, projected in proportion to the draws, would need more than 8× that
   limit leaves at once (it would fail at the limit too; each query's projection depends on its own
   draws only, so this keeps answers independent of the batch);
1c. where the plan of 1b is exact and a certified **top-k** backend is given, it plans by the same probe whether
   top-k should answer the bucket at this level first (its own exact fallback taking the pixels it cannot certify):
   the probe queries are searched and certified as top-k would answer them, and summed exactly, giving the
   fraction ``f`` top-k certifies, the distances its search computed per query ``S`` (the index's own count:
   every pair for Flat, the scanned lists for IVF, the visited nodes for HNSW) and the exact route's pairs per
   query ``V`` (pruning included). Top-k goes first when ``search_cost · S + k + clusters + (1 − f) · V < V``
   (``search_cost``: one searched pair's cost in exact pairs; ``k + clusters``: the certificate's distances and
   its cluster bound). A search that computes every pair (Flat, torch) has ``S = U``, the bucket's distinct
   patches; where ``search_cost · U + k + clusters ≥ V`` already, one query's search shows it and the probe
   searches nothing more. Kept per (bucket, noise level), like the draws' plan;
4. sends what remains to the certified **top-k** backend when one is given, the bucket has a distinct-patch
   table and (cost model on) the top-k plan of step 1c says it pays (it falls back to exact itself), else to
   the certified **cluster summaries** (:class:`~machines.posterior.summary.SummaryBackend`) when given and the
   bucket has clusters, else to the **exact** backend (the fused kernel on the CPU).

Broad posteriors (early and middle times: thousands of patches carry weight) pass at step 2 for
a few hundred milliseconds per bucket; concentrated posteriors (late times, stroke pixels)
fail the ESS test and are summed exactly, where cluster pruning makes the exact sum cheap. The
per-step statistics report which route each query took and the resulting error measure: the
standard error for sampled answers (statistical, not a bound), the certificate for top-k
answers, zero (to ``prune_tol``) for exact ones.

Draws are deterministic given ``seed``, the bucket and the noise level.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey

from .. import native
from .base import BackendBase, BackendStats, Guarantee, draw_seed, entry_bias, logits, serving
from .exact import ExactBackend, PairStats
from .sums import RunningSums
from .summary import SummaryBackend
from .topk import TopKBackend, TopKStats

EARLY_FACTOR = 8.0  # leave when the projected need exceeds this many times the limit (projections from few draws run high)
SMALL_FACTOR = 4  # buckets with fewer than this many times ``samples`` entries are summed exactly at once
PROBE_SEED = 0x9E3779B9  # offsets the probe's seed from the draws' (the probe draws its own patches and noise)
SEARCH_COST = 9.0
"""One (query, patch) distance of the top-k search in exact (query, entry) pairs, for the top-k plan. Measured by
``benchmarks/bench_search.py`` on the CIFAR10 interior bucket at P = 3 (892 k distinct patches, 1,800 queries, t = 0.05,
one run): a FAISS Flat distance costs 8.9× (k = 64) to 10.6× (k = 1,024) a pair of the exact backend's pruned float32
sweep; torch search 25–29×. IVF and HNSW distances are the same arithmetic as Flat's."""


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
class AutoBackend(BackendBase):
    """Shared importance draws with per-query acceptance, then certified top-k or exact for the rest.

    ``samples``: first-round draws per bucket call; ``growth``/``max_samples``: escalation for
    queries that fail (cumulative draws at most ``max_samples``); ``se_tol``: largest accepted
    standard error of a sampled x̂0 pixel (5e-3: at 1e-2, 2 of 10 full-MNIST samples and 1 of 4 on 200 images ended
    below Pearson r 0.999 against exact, where a few pixels near a fork of the deterministic sampler went the other
    way; at 5e-3 all of them reached r ≥ 0.9995, at 4–45% more time on full MNIST, FashionMNIST and CIFAR10 4k); ``min_ess``: smallest accepted effective sample size
    (guards the standard error, which is itself estimated from the draws); ``topk``: optional
    certified backend for the rest (used on buckets with distinct-patch tables); ``summary``: optional
    cluster summaries for the rest where there is no ``topk`` (same buckets); ``exact``: the exact
    backend, float32 by default (its sums are float64 across blocks; float32 logits change an exact
    x̂0 by ≤ 1e-5 on MNIST and the ablation's float32 references match float64 to r ≥ 1 − 1e-12,
    far inside what a statistical answer is allowed); ``chunk``: draws per matrix product (memory ``queries × chunk``); ``draw_dtype``: precision
    of the draws' logits (float32, the default, roughly halves the product's cost and changes the
    estimates by ~1e-6 — far below ``se_tol`` —; the running sums are float64 across blocks);
    ``kernel``: ``"auto"`` folds the draws' moments with the fused C kernel where it is available
    (CPU), ``"fused"`` requires it, ``"torch"`` uses torch operations. ``probe``: probe queries per
    (bucket, noise level) for the route plan (0: always draw first); ``draw_cost``: one draw's cost in
    exact (query, entry) pairs, for the plan (see the module docstring; None: 2.0 where the exact backend
    makes its logits in registers on the CPU, 1.5 where it folds blocks; a constant, so plans and answers never depend on
    timings). ``topk_k``: with no ``topk`` given, a certified top-k route of this k whose fallback is ``exact``
    (None: none); ``search_cost``: one searched (query, patch) distance in exact pairs, for the top-k plan;
    ``plan_margin``: how many times their cost the draws must be projected to save to be kept (module docstring, 1b;
    4 measured against 1 and 2 on whole samples: CIFAR10 4k 1.18× exact against 0.96×, full FashionMNIST 2.60× and
    3.36× against 2.10× and 2.88×, full MNIST 505 s against 517 s).
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
    left_early: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    need: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
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
        rest = torch.nonzero(~ok).view(-1)
        if rest.numel():
            q = queries[rest.to(queries.device)]
            if self.topk is not None and route == "table" and (not self.probe or self.topk_pays(bank, bucket, a, s2)):
                means[rest] = self._topk(bank, bucket, q, a, s2).cpu().to(means.dtype)
            elif self.summary is not None and route == "table":
                with self.stats.timer("summary_s"):
                    means[rest] = self.summary.posterior(bank, bucket, q, a, s2).cpu().to(means.dtype)
                self.stats.summaries += rest.numel()
            else:
                means[rest] = self._exact(bank, bucket, q, a, s2).cpu().to(means.dtype)
        return means.to(queries.device)

    def worth_drawing(self, bank: Bank, bucket: BucketKey, N: int, a: float, s2: float) -> bool:
        """The cost model's plan for a patch bucket of ``N`` entries at noise level ``(a, s²)``: whether drawing first is
        expected to cost less than summing every query exactly (kept per bucket and level; see the
        module docstring)."""
        plan = (bucket, a, s2)
        if plan not in self.plans:
            with self.stats.timer("probe_s"):
                q = self._probe_queries(bank, bucket, a, s2)
                limit = self.draw_limit(bank, bucket, N, a, s2, q)
                keep = self.stats
                self.stats = PolicyStats()  # the probe's draws are not the call's
                try:  # one round of draws; a probe that fails it is projected (ESS and SE² grow with the draws)
                    _, _, ok = self.sampled(bank, bucket, q, a, s2, limit=self.samples)
                    need = self.need.cpu()
                finally:
                    self.stats = keep
                # draws per probe as step 3 would spend them: up to its need where it passes, the whole limit
                # where it would escalate and still fail, one round where it would leave early
                passes = ok | (need <= limit)
                draws = torch.where(passes, need.clamp(min=self.samples),
                                    torch.where(need > EARLY_FACTOR * limit, float(self.samples), float(limit)))
                saves = float(passes.double().mean()) * self.exact_pairs(bank, bucket, a, s2, q)
                costs = self.cost_of_a_draw() * float(draws.double().mean())
                self.plans[plan] = self.plan_margin * costs < saves
        return self.plans[plan]

    def topk_pays(self, bank: Bank, bucket: BucketKey, a: float, s2: float) -> bool:
        """The cost model's top-k plan for a bucket with a distinct-patch table at noise level ``(a, s²)``: whether
        certified top-k (with its exact fallback) is expected to cost less than the exact route (kept per bucket
        and level; see the module docstring, step 1c). Depends on neither the queries nor the batch."""
        plan = (bucket, a, s2)
        if plan not in self.topk_plans:
            assert self.topk is not None
            with self.stats.timer("probe_s"):
                q = self._probe_queries(bank, bucket, a, s2)
                n = q.shape[0]
                V = self.exact_pairs(bank, bucket, a, s2, q)
                U = bank.unique_patches(bucket).patches.shape[0]
                overhead = min(self.topk.k, U) + (U / (self.topk.bound_leaf or bank.leaf_size) if self.topk.bound == "best" else 0)
                # A search that computes every pair (Flat, torch) costs search_cost·U per query whatever it certifies:
                # where that alone is above V, one query's search says so and the probe's searches are not needed.
                one = self.topk.nearest(bank, bucket, (q[:1] / a).to(torch.float32), 1)
                if one.kind == "flat" and self.search_cost * one.scanned + overhead >= V:
                    self.topk_plans[plan] = False
                    return False
                trial = replace(self.topk, stats=TopKStats(), exact=replace(self.topk.exact, stats=PairStats()),
                                _clusters=self.topk._clusters)
                trial.posterior(bank, bucket, q, a, s2)
                certified = 1 - trial.stats.fallback / n
                cost = self.search_cost * trial.stats.scanned / n + overhead + (1 - certified) * V
                self.topk_plans[plan] = cost < V
        return self.topk_plans[plan]

    def exact_pairs(self, bank: Bank, bucket: BucketKey, a: float, s2: float, probes: torch.Tensor | None = None) -> float:
        """``V``, the (query, entry) pairs per query the exact route computes at this bucket and noise level: the
        bucket's entries where it is streamed, else measured on the probe queries (pruning included; ``probes``:
        those queries where the caller has made them already). Kept per plan."""
        plan = (bucket, a, s2)
        if plan not in self.pairs:
            if serving(bank, bucket) != "table" or not (self.exact.prune and self.exact.dedup):
                self.pairs[plan] = float(bank.stream_size(bucket))
            else:
                exact = replace(self.exact, stats=PairStats())
                q = probes if probes is not None else self._probe_queries(bank, bucket, a, s2)
                exact.posterior(bank, bucket, q, a, s2)
                self.pairs[plan] = exact.stats.visited / q.shape[0]
        return self.pairs[plan]

    def _probe_queries(self, bank: Bank, bucket: BucketKey, a: float, s2: float) -> torch.Tensor:
        """The cost model's ``probe`` queries ``a·p + s·ε`` ``[probe, D]``: training patches ``p`` of the bucket and noise
        ``ε``, both drawn from a generator seeded by ``seed``, the bucket and the noise level."""
        gen = torch.Generator().manual_seed(draw_seed(self.seed + PROBE_SEED, bucket, a))
        p = bank.sample_patches(bucket, self.probe, gen, torch.float64).keys
        return a * p + s2**0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)

    def cost_of_a_draw(self) -> float:
        """One draw's cost in exact (query, entry) pairs for the plan: ``draw_cost``, or by default what was measured
        against the exact route this backend falls back to (2.0 against the register-tile kernels, 1.5 against blocks)."""
        if self.draw_cost is not None:
            return self.draw_cost
        return 2.0 if self.exact.tiles and self.exact.uses_fused("cpu") else 1.5

    def sampled(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared-draw estimates: means ``[Q, C]``, standard errors ``[Q]``, accepted mask ``[Q]`` (on the CPU;
        ``self.left_early [Q]`` marks the queries of this call that left before the limit and
        ``self.need [Q]`` the draws each is projected to need from its last round); ``limit``: most draws for queries
        that fail (default ``max_samples``, at most a quarter of the bucket's entries)."""
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
                self.stats.draws += m
            means, se, ess = state.estimate()
            ok = (ess >= self.min_ess) & (se <= self.se_tol)
            # ESS grows and SE² shrinks in proportion to the draws: a query whose projected need exceeds
            # 8× the limit would fail at the limit too, so it leaves now rather than after the rounds.
            need = drawn * torch.maximum(self.min_ess / ess.clamp(min=1e-300), (se / self.se_tol) ** 2)
            self.need = need
            hopeless = ~ok & ~stopped & (need > EARLY_FACTOR * limit) & (target < limit)
            self.stats.stopped_early += int(hopeless.sum())
            stopped |= hopeless
            rows = torch.nonzero(~ok & ~stopped).view(-1)
            if not rows.numel() or target >= limit:
                self.left_early = stopped.cpu()
                low = ess < self.min_ess
                self.stats.low_ess += int(low.sum())
                self.stats.high_se += int((~low & ~ok).sum())
                return means.cpu(), se.cpu(), ok.cpu()
            target = min(target * self.growth, limit)

    def _fold_draws(self, state: RunningSums, rows: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    a: float, s2: float) -> None:
        """Add draws ``keys [M, D]`` with centre values ``values [M, C]`` to the sums of queries ``q [R, D]`` (rows
        ``rows`` of the state), logits in the keys' dtype: in registers (:func:`machines.native.moments_tiles`), or a
        matrix product then :meth:`RunningSums.fold_moments` (the fused kernel where it is used, else torch)."""
        # ℓ = −‖q − a·p‖²/(2s²) up to a per-query constant (−‖q‖²/2s², which cancels).
        bias = entry_bias(keys.pow(2).sum(1), None, a, s2, keys.dtype)
        fused = self.uses_fused(q.device)
        if fused and self.exact.tiles and q.shape[0] >= native.MIN_TILE_ROWS:  # logits in registers
            qs = (q.to(keys.dtype) * (a / s2)).contiguous()
            state.moments_tiles(rows, qs, native.lay_out_keys(keys, bias, values, keys.dtype))
            return
        state.fold_moments(rows, logits(q.to(keys.dtype), keys, bias, a, s2), values, fused)

    def draw_limit(self, bank: Bank, bucket: BucketKey, N: int, a: float, s2: float, probes: torch.Tensor | None = None) -> int:
        """Most draws for a query that fails at this bucket and noise level: :meth:`_limit` of its ``N`` entries and, with
        the cost model on, no more than the exact pairs ``V`` it would replace (``V / draw_cost`` draws). A query that
        escalates past that has spent more than its exact sum, so it stops there and is summed exactly: it then costs at
        most about ``2·V``, where late, pruned buckets (``V`` a few % of ``N``) let it spend ``N / 4`` draws before. Kept
        per plan, like ``V``, so it depends on neither the queries nor the batch."""
        limit = self._limit(N)
        if self.probe and serving(bank, bucket) == "table":
            V = self.exact_pairs(bank, bucket, a, s2, probes)
            limit = max(self.samples, min(limit, int(V / self.cost_of_a_draw())))
        return limit

    def _limit(self, entries: int) -> int:
        """Most draws for failing queries: ``max_samples``, but no more than a quarter of the bucket's entries."""
        return max(self.samples, min(self.max_samples, entries // 4))

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
