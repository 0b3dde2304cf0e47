"""Top-k posterior backend with a certificate and an exact fallback (DESIGN §3, "Top-k with a certificate").

``‖q − a·p‖² = a²‖q/a − p‖²``, so the bank's nearest distinct patches to ``q/a`` carry the
highest weights (up to their counts). Their exact distances are recomputed in float64, the
softmax is taken over them with log counts, and the weight left out is bounded:

* **flat** (exact k-NN): every other patch lies at distance ≥ d_k, so the neglected weight is at
  most ``(n_bucket − Σ counts retrieved)·exp(−a²·d_k²/(2s²))`` (d_k lowered by a float32 slack);
* **ivf**: within the probed lists the same bound; each unprobed list ℓ (centroid c, radius R,
  n_ℓ patches with counts) adds ``n_ℓ·exp(−a²·max(0, ‖q/a − c‖ − R)²/(2s²))``. Queries whose
  certificate fails are searched again with 4× the lists (up to ``max_nprobe``, by default all of
  them, where the search is Flat's), and keep the better certificate: on colour data the heavy
  patches of a query often sit in lists its first ``nprobe`` did not reach;
* **hnsw**: the flat formula, but not rigorous (graph search may miss closer patches): reported
  as uncertified;
* **clusters** (every index kind, ``bound="best"``, the default): the bank's cluster tree — many
  small clusters of distinct patches with centre ``c``, radius ``R`` and total count ``n_c`` —
  bounds every patch not retrieved: ``Σ_c (n_c − r_c)·exp(−a²·max(0, ‖q/a − c‖ − R)²/(2s²))`` with
  ``r_c`` the counts retrieved from cluster ``c``. It needs nothing from the search but the ids it
  returned, so it is rigorous for graph indices too, and a query inside one of an IVF list's
  large balls is usually far outside most of the small ones. The certificate is the smaller of
  the two bounds.

ε = neglected / retained weight; the error on x̂0 is at most ``2ε·max|p| ≤ 2ε``. Queries with
ε > ``tol`` are recomputed by the exact backend (only those, batched). Buckets without a
distinct-patch table (whole-image rules, streamed scales) are summed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from patchbank.base import Bank
from patchbank.geometry import BucketKey, centre_index
from patchbank.index import Neighbours, SearchResult

from .base import BackendBase, CertifiedStats, Guarantee, NeighbourSearch, distance_logits, fill_rest, serving
from .exact import ExactBackend

FLOAT32_SLACK = 1e-5  # relative error allowance on float32 index distances


@dataclass
class TopKStats(CertifiedStats):
    """Per-call statistics, accumulated until :meth:`reset`: queries, fallbacks, ε values, seconds."""

    certified: bool = True
    search_s: float = 0.0
    topk_s: float = 0.0
    bound_s: float = 0.0  # of topk_s: the cluster bound
    within_tol: int = 0  # queries whose ε ≤ the backend's tol (1e-4 when it keeps every answer)
    reprobed: int = 0  # query searches repeated with more IVF lists (a query may count once per round)
    scanned: int = 0  # (query, patch) distances the searches computed (SearchResult.scanned)

    def summary(self) -> dict:
        eps = torch.cat(self.eps) if self.eps else torch.zeros(0)
        return {
            "queries": self.queries,
            "fallback_fraction": self.fallback / self.queries if self.queries else 0.0,
            "eps_median": float(eps.median()) if eps.numel() else 0.0,
            "eps_max": float(eps.max()) if eps.numel() else 0.0,
            "accepted_eps_max": self.accepted_eps_max,
            "certified_fraction": self.within_tol / self.queries if self.queries and self.certified else 0.0,
            "certified": self.certified,
            "reprobed_fraction": self.reprobed / self.queries if self.queries else 0.0,
            "scanned_per_query": self.scanned / self.queries if self.queries else 0.0,
            "search_s": round(self.search_s, 4),
            "topk_s": round(self.topk_s, 4),
            "bound_s": round(self.bound_s, 4),
            "exact_s": round(self.exact_s, 4),
            "error_bound": 2 * self.accepted_eps_max if self.certified else None,
        }


@dataclass
class TopKBackend(NeighbourSearch, BackendBase):
    """Posterior means from the ``k`` nearest distinct patches, certified, with exact fallback.

    ``tol``: largest accepted ε (neglected/retained weight); queries above it are recomputed by
    ``exact`` (``tol=None``: keep every top-k answer and only report ε); ``nprobe``, ``engine``,
    ``index``: how the bank is searched (:class:`~machines.posterior.base.NeighbourSearch`); ``bound``:
    ``best`` (the smaller of the index's bound and the cluster bound) or ``index`` (the index's alone);
    ``bound_leaf``: cluster size of the cluster bound (None: the bank's stored clusters); ``max_nprobe``: IVF
    lists a query whose certificate fails is searched with at most, 4× more per round (None: every list;
    ``nprobe``: never again); ``query_chunk``: queries gathered at a time (memory ``query_chunk × k × D``). ``exact`` also serves the buckets
    without a distinct-patch table.
    """

    k: int = 256
    tol: float | None = 1e-4
    bound: Literal["best", "index"] = "best"
    bound_leaf: int | None = None
    max_nprobe: int | None = None
    exact: ExactBackend = field(default_factory=ExactBackend)
    query_chunk: int = 256
    stats: TopKStats = field(default_factory=TopKStats, repr=False)
    _clusters: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.bound not in ("best", "index"):
            raise ValueError(f"bound must be 'best' or 'index', got {self.bound!r}")
        if self.max_nprobe is not None and self.max_nprobe < self.nprobe:
            raise ValueError(f"max_nprobe must be >= nprobe ({self.nprobe}), got {self.max_nprobe}")
        if self.bound_leaf is not None and self.bound_leaf < 1:
            raise ValueError(f"bound_leaf must be >= 1, got {self.bound_leaf}")
        if self.k < 1 or self.nprobe < 1 or self.query_chunk < 1:
            raise ValueError(f"need k, nprobe and query_chunk >= 1, got {self.k}, {self.nprobe}, {self.query_chunk}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0 (or None: no fallback), got {self.tol}")

    @property
    def guarantee(self) -> Guarantee:  # type: ignore[override]
        """Certified; through a graph index (HNSW), whose search may miss closer patches, only with the cluster bound."""
        graph = self.index is not None and self.index.upper().startswith("HNSW")
        return "heuristic" if graph and self.bound == "index" else "certified"

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, C]`` of the centre pixels for queries ``[Q, D]`` against one bucket."""
        route = serving(bank, bucket)
        if route == "image":
            return self.exact.posterior(bank, bucket, queries, a, s2)
        if route == "stream":  # no distinct patches, no index at this scale: exact for all
            with self.stats.timer("exact_s"):
                means = self.exact.posterior(bank, bucket, queries, a, s2)
            self.stats.uncertified(queries.shape[0])
            return means
        q = queries.to(torch.float64)
        k = min(self.k, bank.unique_patches(bucket).patches.shape[0])  # more than the bucket holds is the bucket
        means, eps, kind = self._search(bank, bucket, q, a, s2, k, lambda found, rows: self._truncated(bank, bucket, rows, found, a, s2),
                                        self.stats)
        self.stats.queries += q.shape[0]
        self.stats.certified &= kind != "hnsw" or self.bound == "best"
        self.stats.within_tol += int((eps <= (self.tol if self.tol is not None else 1e-4)).sum())
        keep = self.stats.accept(eps, self.tol)
        fill_rest(means, keep, lambda rows: self.exact.posterior(bank, bucket, q[rows], a, s2), self.stats)
        return means

    def _truncated(self, bank: Bank, bucket: BucketKey, q: torch.Tensor, found: SearchResult, a: float, s2: float,
                   stats: TopKStats | None = None):
        """Softmax over the retrieved patches and its certificate ε, query block by block (the cluster bound's seconds
        go to ``stats``, by default this backend's)."""
        centre = centre_index(bank.channels, bucket.scale).to(q.device)  # type: ignore[arg-type]
        means, eps = [], []
        for cand, logits, bound in self._blocks(bank, bucket, q, found, a, s2, stats if stats is not None else self.stats):
            m = logits.amax(1, keepdim=True)
            w = (logits - m).exp()
            Z = w.sum(1)
            means.append((w[..., None] * cand[..., centre]).sum(1) / Z[:, None])
            eps.append(bound / Z)
        return torch.cat(means), torch.cat(eps)

    def retained(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The truncated posterior itself, for callers that need more than its mean (provenance): for queries
        ``[Q, D]`` against a bucket with a distinct-patch table, the ``k`` retrieved distinct patches ``ids
        [Q, k]`` (−1 where fewer exist), their log weights ``log count − a²‖q/a − p‖²/(2s²)`` ``[Q, k]``
        (−inf where invalid) and the certificate ``ε [Q]`` (neglected over retained weight)."""
        q = queries.to(torch.float64)
        k = min(self.k, bank.unique_patches(bucket).patches.shape[0])

        def truncated(found: SearchResult, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logw, eps = [], []
            for _, logits, bound in self._blocks(bank, bucket, rows, found, a, s2, self.stats):
                m = logits.amax(1)
                logw.append(logits)
                eps.append(bound / (logits - m[:, None]).exp().sum(1))
            return found.neighbours.ids.to(rows.device), torch.cat(logw), torch.cat(eps)

        *kept, _ = self._search(bank, bucket, q, a, s2, k, truncated, self.stats)
        return tuple(kept)

    def certificates(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                     ks: list[int], stats: TopKStats | None = None) -> dict[int, torch.Tensor]:
        """The certificate ``ε [Q]`` each ``k`` of ``ks`` would give queries ``[Q, D]`` against a bucket with a
        distinct-patch table, from one search at the largest ``k``: the ``k`` nearest are the first ``k`` of the
        largest search's (exactly for Flat, and for IVF within the same probed lists), so each ``k`` costs its
        bound but no search of its own. Through an IVF index, queries above the tolerance are still searched again
        with more lists at their own ``k``, as :meth:`posterior` does. The backend's statistics are left alone; the
        seconds of the search, the bounds and the re-probes go to ``stats`` when given."""
        if serving(bank, bucket) != "table":
            raise ValueError(f"bucket {bucket} has no distinct-patch table: it has no top-k certificate")
        if not ks or min(ks) < 1:
            raise ValueError(f"need k >= 1, got {ks}")
        q = queries.to(torch.float64)
        U = bank.unique_patches(bucket).patches.shape[0]
        top = min(max(ks), U)
        stats = stats if stats is not None else TopKStats()
        with stats.timer("search_s"):
            found = self.nearest(bank, bucket, (q / a).to(torch.float32), top)
        stats.scanned += found.scanned
        out = {}
        for k in ks:
            kk = min(k, U)
            first = found._replace(neighbours=Neighbours(*(x[:, :kk] for x in found.neighbours)))
            *_, eps, _ = self._search(bank, bucket, q, a, s2, kk,
                                      lambda f, rows: self._truncated(bank, bucket, rows, f, a, s2, stats), stats, found=first)
            out[k] = eps.cpu()
        return out

    def _search(self, bank: Bank, bucket: BucketKey, q: torch.Tensor, a: float, s2: float, k: int, truncated,
                stats: TopKStats, found: SearchResult | None = None) -> tuple:
        """Search the ``k`` nearest distinct patches of ``q [Q, D]`` (or take ``found``, a search already made) and
        take ``truncated(found, q)`` — tensors with a first dimension ``Q``, the last the certificate ε —; through
        an IVF index, queries whose ε exceeds the tolerance are searched again with 4× the lists (up to
        ``max_nprobe``) and keep the better answer. Returns ``truncated``'s tensors and the index kind."""
        if found is None:
            with stats.timer("search_s"):
                found = self.nearest(bank, bucket, (q / a).to(torch.float32), k)
            stats.scanned += found.scanned
        with stats.timer("topk_s"):
            out = list(truncated(found, q))
        if found.kind != "ivf":
            return (*out, found.kind)
        target = self.tol if self.tol is not None else 1e-4
        nprobe, limit = self.nprobe, found.ivf.counts.numel()  # type: ignore[union-attr]
        limit = limit if self.max_nprobe is None else min(limit, self.max_nprobe)
        while nprobe < limit:
            rows = torch.nonzero(out[-1] > target).view(-1)
            if rows.numel() == 0:
                break
            nprobe = min(limit, 4 * nprobe)
            stats.reprobed += rows.numel()
            with stats.timer("search_s"):
                again = bank.search(bucket, (q[rows] / a).to(torch.float32), k, nprobe, self.engine)
            stats.scanned += again.scanned
            with stats.timer("topk_s"):
                new = truncated(again, q[rows])
            better = new[-1] < out[-1][rows]
            for old, value in zip(out, new):
                old[rows[better]] = value[better].to(old.dtype)
        return (*out, found.kind)

    def _blocks(self, bank: Bank, bucket: BucketKey, q: torch.Tensor, found: SearchResult, a: float, s2: float, stats: TopKStats):
        """Per block of ``query_chunk`` queries: the retrieved patches ``[b, k, D]`` (model units / a), their log
        weights ``[b, k]`` and the bound on the weight left out relative to ``exp(max log weight)`` ``[b]``."""
        table = bank.unique_patches(bucket)
        total = float(table.total)
        tree = self._tree(bank, bucket, q.device) if self.bound == "best" else None
        for s in range(0, q.shape[0], self.query_chunk):
            rows = slice(s, s + self.query_chunk)
            ids = found.neighbours.ids[rows].to(q.device)
            valid = ids >= 0
            safe = ids.clamp(min=0).cpu()
            cand = (table.patches[safe].to(q.device, torch.float64) / 255.0)  # [b, k, D]
            counts = table.counts[safe].to(q.device, torch.float64) * valid
            d2 = (q[rows, None, :] / a - cand).pow(2).sum(-1)  # exact, float64
            logits = torch.where(valid, distance_logits(d2, counts.clamp(min=1).log(), a, s2), -torch.inf)
            m = logits.amax(1)
            bound = self._neglected(found, rows, q[rows] / a, d2, valid, counts, total, a, s2, m)
            if tree is not None:
                with stats.timer("bound_s"):
                    bound = torch.minimum(bound, _cluster_bound(tree, ids, counts, q[rows] / a, a, s2, m))
            yield cand, logits, bound

    def _tree(self, bank: Bank, bucket: BucketKey, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The cluster bound's data for a bucket (cached): each distinct patch's cluster ``[U]``, cluster
        centres ``[K, D]``, radii ``[K]`` and total counts ``[K]``, float64 on ``device``."""
        clusters = bank.clustered(bucket, self.bound_leaf or bank.leaf_size)
        key = (id(clusters), bucket, str(device))
        if key not in self._clusters:
            self._clusters = {k: v for k, v in self._clusters.items() if k[1] != bucket}
            member = torch.repeat_interleave(torch.arange(clusters.n_clusters), clusters.offsets.diff())
            cluster_of = torch.empty_like(member)
            cluster_of[clusters.order] = member
            n = torch.zeros(clusters.n_clusters, dtype=torch.float64).index_add_(0, member, clusters.log_counts.exp())
            self._clusters[key] = tuple(t.to(device) for t in (cluster_of, clusters.centres, clusters.radii, n))
        return self._clusters[key]

    def _neglected(self, found: SearchResult, rows: slice, qa: torch.Tensor, d2: torch.Tensor, valid: torch.Tensor,
                   counts: torch.Tensor, total: float, a: float, s2: float, m: torch.Tensor) -> torch.Tensor:
        """Upper bound on the weight of every patch not retrieved, relative to ``exp(m)``: ``[b]``."""
        full = valid.all(1)  # fewer than k results: everything searchable was returned
        beyond = beyond_kth(qa, torch.where(valid, d2, torch.zeros_like(d2)).amax(1), a, s2, m)
        retrieved = counts.sum(1)
        if found.kind != "ivf":
            rest = (total - retrieved).clamp(min=0)
            return torch.where(full, rest * beyond, torch.zeros_like(m))
        assert found.ivf is not None and found.probed is not None, "an IVF search says which lists it probed"
        ivf, probed = found.ivf, found.probed[rows].to(qa.device)
        list_counts = ivf.counts.to(qa.device)
        in_probed = list_counts[probed].sum(1)
        inner = torch.where(full, (in_probed - retrieved).clamp(min=0) * beyond, torch.zeros_like(m))
        dist = torch.cdist(qa, ivf.centroids.to(qa.device))
        lower = (dist - ivf.radii.to(qa.device) * (1 + FLOAT32_SLACK) - FLOAT32_SLACK).clamp(min=0)
        outer = list_counts[None, :] * torch.exp(-(a * a) * lower.pow(2) / (2 * s2) - m[:, None])
        outer = outer.scatter(1, probed, 0.0)  # probed lists are covered by the inner bound
        return inner + outer.sum(1)


def beyond_kth(qa: torch.Tensor, dk2: torch.Tensor, a: float, s2: float, m: torch.Tensor) -> torch.Tensor:
    """Largest weight, relative to ``exp(m)``, of a patch at least as far from ``q/a`` as the k-th retrieved one
    (squared distance ``dk2 [b]``, lowered by the float32 search's slack): ``[b]``. Multiplied by the count of
    the patches not retrieved, it bounds their weight (the flat bound)."""
    dk2 = (dk2 - FLOAT32_SLACK * (qa.pow(2).sum(1) + dk2 + 1.0)).clamp(min=0)
    return torch.exp(-(a * a) * dk2 / (2 * s2) - m)


def _cluster_bound(tree: tuple[torch.Tensor, ...], ids: torch.Tensor, counts: torch.Tensor, qa: torch.Tensor, a: float, s2: float,
                   m: torch.Tensor) -> torch.Tensor:
    """Upper bound on the weight of every patch not retrieved, relative to ``exp(m)``, through the bank's
    clusters: ``Σ_c (n_c − r_c)·exp(−a²·max(0, ‖q/a − c‖ − R_c)²/(2s²))``: ``[b]``. ``ids``/``counts`` ``[b, k]``
    are the retrieved distinct patches and their counts (0 where invalid)."""
    cluster_of, centres, radii, n = tree
    retrieved = torch.zeros(qa.shape[0], centres.shape[0], dtype=torch.float64, device=qa.device)
    retrieved.scatter_add_(1, cluster_of[ids.clamp(min=0)], counts)
    qn, cn = qa.pow(2).sum(1, keepdim=True), centres.pow(2).sum(1)[None, :]
    d2 = (qn + cn - 2 * qa @ centres.T - 1e-12 * (qn + cn)).clamp_(min=0)  # ‖q/a − c‖², lowered by its float64 round-off
    lower = (d2.sqrt_() - radii).clamp_(min=0)
    rest = (n[None, :] - retrieved).clamp_(min=0)
    return (rest * torch.exp(-(a * a) * lower.pow(2) / (2 * s2) - m[:, None])).sum(1)
