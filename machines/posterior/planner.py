"""The automatic policy's planner: per bucket and noise level, which route pays, decided by a probe and a cost model.

A plan depends on neither the queries nor the batch, only on the bucket, the noise level and the backend's
settings (the probe's patches and noise are seeded by them), so answers stay independent of the batch. What it
decides, and the measurements behind its constants, are in docs/reference.md ("Automatic policy").
:class:`CostModel` holds the planning; :class:`~machines.posterior.auto.AutoBackend` executes the plan.
"""

from __future__ import annotations

from typing import Any

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey

from .base import draw_seed, serving
from .exact import ExactBackend
from .topk import TopKBackend

EARLY_FACTOR = 8.0  # leave when the projected need exceeds this many times the limit (projections from few draws run high)
SMALL_FACTOR = 4  # buckets with fewer than this many times ``samples`` entries are summed exactly at once
PROBE_SEED = 0x9E3779B9  # offsets the probe's seed from the draws' (the probe draws its own patches and noise)
SEARCH_COST = 9.0
"""One (query, patch) distance of the top-k search in exact (query, entry) pairs, for the top-k plan (measured by
``benchmarks/bench_search.py``; docs/reference.md)."""


class CostModel:
    """The planning half of the automatic policy: whether a bucket's queries draw first (:meth:`worth_drawing`),
    whether certified top-k goes first where they do not (:meth:`topk_pays`), the exact route's cost per query
    (:meth:`exact_pairs`) and the most draws a failing query may spend (:meth:`draw_limit`). Plans are kept per
    ``(bucket, a, s²)`` in the policy's ``plans``, ``topk_plans`` and ``pairs``."""

    samples: int
    max_samples: int
    probe: int
    seed: int
    draw_cost: float | None
    search_cost: float
    plan_margin: float
    exact: ExactBackend
    topk: TopKBackend | None
    stats: Any
    plans: dict
    topk_plans: dict
    pairs: dict

    def draw(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, limit: int | None = None,
             stats: Any = None) -> Any:
        raise NotImplementedError

    def worth_drawing(self, bank: Bank, bucket: BucketKey, N: int, a: float, s2: float) -> bool:
        """The cost model's plan for a patch bucket of ``N`` entries at noise level ``(a, s²)``: whether drawing first is
        expected to cost less than summing every query exactly (kept per bucket and level; see the
        module docstring)."""
        plan = (bucket, a, s2)
        if plan not in self.plans:
            with self.stats.timer("probe_s"):
                q = self._probe_queries(bank, bucket, a, s2)
                limit = self.draw_limit(bank, bucket, N, a, s2, q)
                # one round of draws, counted apart from the call's; a probe that fails it is projected (ESS and SE²
                # grow with the draws)
                drawn = self.draw(bank, bucket, q, a, s2, limit=self.samples, stats=type(self.stats)())
                ok, need = drawn.ok, drawn.need
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
                trial = self.topk.fresh()
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
                exact = self.exact.fresh()
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
        return 2.0 if self.exact.uses_tiles("cpu") else 1.5

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
