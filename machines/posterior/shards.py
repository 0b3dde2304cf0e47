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

On a :class:`~patchbank.ShardedBank` (a bank built in contiguous parts of its images, one PatchBank each)
the shards are the bank's own, and ``placement`` says where each is opened and summed: ``local`` (here, one
after another) or ``ray`` / ``ray:ADDRESS`` (one Ray actor per shard, placed by Ray across the cluster's
nodes, each opening only its own shard, read-only, with its pruned cluster sweep or its own top-k and bound).
The caller merges exactly. An actor that dies is restarted by Ray and its part asked again; a call whose
shard cannot answer raises, and never returns a merge of the other shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from patchbank.bank import PatchBank
from patchbank.base import Bank
from patchbank.geometry import IMAGE_RULES, BucketKey, centre_index
from patchbank.index import Neighbours, merge_neighbours, torch_search
from patchbank.integrity import BankError
from patchbank.sharded import ShardedBank

from .base import BackendBase, CertifiedStats, Guarantee, distance_logits, fill_rest, serving
from .exact import ExactBackend
from .sums import RunningSums, merge_all, merge_bounded
from .topk import beyond_kth


def shard_sums(backend: ExactBackend, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, shard: int,
               shards: int, values: int) -> RunningSums:
    """Exact sums of ``queries [Q, D]`` over shard ``shard`` of ``shards`` of a bucket's stream (its chunks
    ``shard, shard + shards, …``); ``values``: V, the width of the bucket's values (C, or C·H·W for images)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must lie in [0, {shards}), got {shard}")
    chunks = bank.stream(bucket, backend.chunk_size, backend.dtype, queries.device, distinct=backend.dedup)
    state = backend.posterior_sums(queries, (c for i, c in enumerate(chunks) if i % shards == shard), a, s2)
    if state is None:
        return RunningSums.empty(queries.shape[0], values)
    return state.float64()


def bank_sums(exact: ExactBackend, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
              values: int) -> RunningSums:
    """Exact sums of ``queries [Q, D]`` over a whole bank's bucket (a shard's, as its own bank): its pruned cluster
    sweep where it has tables, else its stream; empty sums where the bank holds no image of the bucket's label."""
    if not holds_label(bank, bucket):
        return RunningSums.empty(queries.shape[0], values)
    if exact.prune and exact.dedup and serving(bank, bucket) == "table":
        centre = centre_index(bank.channels, bucket.scale).to(queries.device)  # type: ignore[arg-type]
        return exact.pruned_sums(queries, bank.clustered(bucket, exact.leaf_size), centre, a, s2).float64()
    return shard_sums(exact, bank, bucket, queries, a, s2, 0, 1, values)


def holds_label(bank: Bank, bucket: BucketKey) -> bool:
    """Whether a bank (a shard) holds any image of the bucket's label (every bank does for unlabelled buckets)."""
    return bucket.label is None or bool((bank.labels == bucket.label).any())


class ShardServer:
    """One shard of a :class:`~patchbank.ShardedBank`, opened read-only where it runs (a Ray actor, or here):
    answers a bucket's exact sums or its top-k sums and bound, with the seconds it spent."""

    def __init__(self, path: str, fingerprint: str, exact: ExactBackend, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.bank = PatchBank.open(path)
        if self.bank.fingerprint() != fingerprint:
            raise BankError(f"{path} holds another shard (data fingerprint {self.bank.fingerprint()[:12]}…) than the sharded "
                            f"bank recorded ({fingerprint[:12]}…)")
        self.exact = exact

    def sums(self, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, values: int) -> tuple[RunningSums, float, int]:
        """The shard's exact sums, its seconds and the (query, entry) pairs it visited."""
        start, before = time.perf_counter(), self.exact.stats.visited
        part = bank_sums(self.exact, self.bank, bucket, queries, a, s2, values)
        return part, time.perf_counter() - start, self.exact.stats.visited - before

    def sums_many(self, requests: list[tuple[BucketKey, torch.Tensor, int]], a: float,
                  s2: float) -> tuple[list[RunningSums], float, int]:
        """:meth:`sums` for every ``(bucket, queries, values)`` of a pass, in one call (one round trip)."""
        start, before = time.perf_counter(), self.exact.stats.visited
        parts = [bank_sums(self.exact, self.bank, bucket, queries, a, s2, values) for bucket, queries, values in requests]
        return parts, time.perf_counter() - start, self.exact.stats.visited - before

    def topk(self, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
             k: int) -> tuple[RunningSums, torch.Tensor, float, int]:
        """The shard's top-k sums and bound on the rest, its seconds and the pairs it computed."""
        start = time.perf_counter()
        Q = queries.shape[0]
        if not holds_label(self.bank, bucket):
            return RunningSums.empty(Q, self.bank.channels), torch.zeros(Q, dtype=torch.float64), time.perf_counter() - start, 0
        table = self.bank.unique_patches(bucket)
        keys = table.patches
        part, bound = range_topk(keys, keys.float() / 255.0, table.counts, queries, a, s2, k, bucket, self.bank.channels)
        return part, bound, time.perf_counter() - start, Q * keys.shape[0]

    def answer(self, method: str, packed: tuple, *args: Any) -> Any:
        """``method(*packed, *args)``: one entry for every request, its first arguments packed in one object (which
        Ray sends once to each node)."""
        if method not in ("sums", "sums_many", "topk"):
            raise ValueError(f"a shard server answers sums, sums_many or topk, not {method!r}")
        return getattr(self, method)(*packed, *args)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this server runs on (where it runs as an actor)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def range_topk(keys: torch.Tensor, search: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor, a: float, s2: float,
               k: int, bucket: BucketKey, channels: int) -> tuple[RunningSums, torch.Tensor]:
    """A range of a bucket's distinct patches (``keys [U, D]`` int16, their float32 ``search`` copy, ``counts``): its
    ``k`` nearest patches summed exactly, and the bound on the weight of the rest, relative to ``e^m``."""
    Q = queries.shape[0]
    if keys.shape[0] == 0:
        return RunningSums.empty(Q, channels), torch.zeros(Q, dtype=torch.float64)
    qa = queries.to(keys.device, torch.float64) / a
    found = torch_search(qa.float(), search, min(k, keys.shape[0]))
    ids = found.ids
    cand = keys[ids].double() / 255.0  # [Q, k, D], exact in float64 (every id valid: k ≤ the range's size)
    c = counts[ids].double()
    d2 = (qa[:, None, :] - cand).pow(2).sum(-1)  # exact, float64
    logit = distance_logits(d2, c.log(), a, s2)
    m = logit.amax(1)
    w = (logit - m[:, None]).exp()
    centre = centre_index(channels, bucket.scale).to(keys.device)  # type: ignore[arg-type]
    acc = torch.cat([(w[..., None] * cand[..., centre]).sum(1), w.sum(1, keepdim=True)], 1)
    rest = (counts.double().sum() - c.sum(1)).clamp(min=0)
    return RunningSums(m, acc), rest * beyond_kth(qa, d2.amax(1), a, s2, m)


@dataclass
class ShardedStats(CertifiedStats):
    """Queries, exact fallbacks, top-k certificates (ε per query) and seconds, until :meth:`reset`."""

    shard_s: float = 0.0
    merge_s: float = 0.0
    shard_compute_s: float = 0.0  # seconds the shards of a sharded bank spent on their own sums (all shards together)
    shard_slowest_s: float = 0.0  # per call, the slowest shard's seconds, summed over calls (what a parallel call waits for)
    shard_pairs: int = 0  # (query, entry) pairs the shards computed (after their pruning)
    round_trips: int = 0  # calls to the shards (each one request to every shard)
    exact_only: bool = True

    def summary(self) -> dict:
        eps = torch.cat(self.eps) if self.eps else torch.zeros(0)
        return {"queries": self.queries, "fallback_fraction": self.fallback / self.queries if self.queries else 0.0,
                "eps_median": float(eps.median()) if eps.numel() else 0.0, "eps_max": float(eps.max()) if eps.numel() else 0.0,
                "shard_s": round(self.shard_s, 4), "merge_s": round(self.merge_s, 4), "exact_s": round(self.exact_s, 4),
                "shard_compute_s": round(self.shard_compute_s, 4), "shard_slowest_s": round(self.shard_slowest_s, 4),
                "shard_pairs": self.shard_pairs, "round_trips": self.round_trips,
                "error_bound": 0.0 if self.exact_only else 2 * self.accepted_eps_max}


@dataclass
class ShardedBackend(BackendBase):
    """A bucket split into ``shards`` parts, each summed on its own device, merged exactly.

    ``inner``: ``exact`` (every entry of every shard) or ``topk`` (each shard's ``k`` nearest distinct
    patches, certified; queries with ε > ``tol`` summed exactly); ``devices``: comma-separated devices,
    shard j on the j-th modulo their number (``cuda:0,cuda:1``: one shard per GPU); ``exact``: the
    backend each shard's exact sums use (float64 by default; its pruning does not apply to the stream's round-robin
    shards, and does to a sharded bank's). On a :class:`~patchbank.ShardedBank` the shards are the bank's
    (``shards`` must be their number), summed where ``placement`` says: ``local`` or
    ``ray[:ADDRESS]`` (one actor per shard, ``actor_cpus`` CPUs and torch threads each).
    """

    shards: int = 2
    inner: Literal["exact", "topk"] = "exact"
    k: int = 256
    tol: float = 1e-4
    devices: str = "cpu"
    placement: str = "local"
    actor_cpus: int = 1
    exact: ExactBackend = field(default_factory=ExactBackend)
    stats: ShardedStats = field(default_factory=ShardedStats, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)
    _servers: dict = field(default_factory=dict, repr=False)  # a sharded bank's path → its shard servers (or actors)

    def __post_init__(self) -> None:
        if self.shards < 1 or self.k < 1 or self.actor_cpus < 1:
            raise ValueError(f"need shards, k and actor_cpus >= 1, got {self.shards}, {self.k}, {self.actor_cpus}")
        kind, _, address = self.placement.partition(":")
        if kind not in ("local", "ray") or (kind == "local" and address):
            raise ValueError(f"placement must be local, ray or ray:ADDRESS, got {self.placement!r}")
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

    def __getstate__(self) -> dict:
        """Pickled without shard servers, actors or tables (a worker opens its own)."""
        return {**self.__dict__, "_tables": {}, "_servers": {}}

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, V]`` of queries ``[Q, D]`` against one bucket, shard by shard."""
        if isinstance(bank, ShardedBank):
            return self._on_shards(bank, bucket, queries, a, s2)
        if self.placement != "local":
            raise ValueError(f"placement={self.placement} serves a sharded bank (ShardedBank.build / `patchbank build --shards`); "
                             f"{type(bank).__name__} is not one")
        if self.inner == "exact" or serving(bank, bucket) != "table":
            if self.inner == "topk":  # no distinct-patch table to search: exact, counted as fallback
                self.stats.uncertified(queries.shape[0])
            else:
                self.stats.queries += queries.shape[0]
            with self.stats.timer("exact_s"):
                return self.exact_sums(bank, bucket, queries, a, s2).mean().to(queries.dtype)
        self.stats.queries += queries.shape[0]
        self.stats.exact_only = False
        sums, bound = self.topk_sums(bank, bucket, queries, a, s2)
        return self._certified(sums, bound, queries, lambda redo: self.exact_sums(bank, bucket, redo, a, s2))

    def _certified(self, sums: RunningSums, bound: torch.Tensor, queries: torch.Tensor,
                   exact_of: Callable[[torch.Tensor], RunningSums]) -> torch.Tensor:
        """The means of merged top-k ``sums`` where their certificate ε = ``bound`` / Σw is within ``tol``; the other
        queries' from ``exact_of(their queries)``."""
        means = sums.mean()
        keep = self.stats.accept(bound / sums.acc[:, -1], self.tol)
        fill_rest(means, keep, lambda rows: exact_of(queries[rows]).mean(), self.stats)
        return means.to(queries.dtype)

    def posterior_many(self, bank: Bank, requests: list[tuple[BucketKey, torch.Tensor]], a: float, s2: float) -> list[torch.Tensor]:
        """:meth:`posterior` for every ``(bucket, queries)`` of a machine's pass. On a sharded bank's exact sums every
        shard answers all of them in one round trip (one call per shard, not one per bucket and label); otherwise
        one :meth:`posterior` each."""
        if not isinstance(bank, ShardedBank) or self.inner != "exact":
            return [self.posterior(bank, bucket, queries, a, s2) for bucket, queries in requests]
        with self.stats.timer("exact_s"):
            asks = [(bucket, queries.detach().to("cpu", torch.float64).contiguous(),
                     queries.shape[1] if bucket.rule in IMAGE_RULES else bank.channels) for bucket, queries in requests]
            self.stats.queries += sum(q.shape[0] for _, q, _ in asks)
            per_shard = self._call(bank, "sums_many", asks, a, s2)  # [shard][request]
            with self.stats.timer("merge_s"):
                return [merge_all([parts[i] for parts in per_shard]).mean().to(queries.dtype)
                        for i, (_, queries) in enumerate(requests)]

    # ---- a sharded bank's shards, here or as Ray actors -------------------------------------------------
    def _on_shards(self, bank: ShardedBank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        self.stats.queries += queries.shape[0]
        image = bucket.rule in IMAGE_RULES
        V = queries.shape[1] if image else bank.channels
        if self.inner == "exact" or image:
            with self.stats.timer("exact_s"):
                return self._bank_exact(bank, bucket, queries, a, s2, V).mean().to(queries.dtype)
        self.stats.exact_only = False
        found = self._call(bank, "topk", bucket, queries, a, s2, self.k)
        with self.stats.timer("merge_s"):
            sums, bound = merge_bounded(found)
        return self._certified(sums, bound, queries, lambda redo: self._bank_exact(bank, bucket, redo, a, s2, V))

    def _bank_exact(self, bank: ShardedBank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, V: int) -> RunningSums:
        parts = self._call(bank, "sums", bucket, queries, a, s2, V)
        with self.stats.timer("merge_s"):
            return merge_all(parts)

    def _call(self, bank: ShardedBank, method: str, first: Any, *args: Any) -> list:
        """Every shard's answer to ``method(first, *args)`` (``first``: a bucket's queries, or a pass's requests), without
        the seconds and pairs each spent, which go to the statistics; an error where any shard cannot answer, never the
        other shards' answers alone. One round trip per shard."""
        servers = self._servers_of(bank)
        if isinstance(first, BucketKey):  # a bucket and its queries
            first, args = (first, args[0].detach().to("cpu", torch.float64).contiguous()), args[1:]
        else:
            first = (first,)
        self.stats.round_trips += 1
        with self.stats.timer("shard_s"):
            if self.placement == "local":
                answers = [server.answer(method, first, *args) for server in servers]
            else:
                import ray

                ref = ray.put(first)  # the queries travel once to each node's object store
                try:
                    answers = ray.get([actor.answer.remote(method, ref, *args) for actor in servers])
                except ray.exceptions.RayError as err:
                    raise RuntimeError(f"a shard of {bank.path} could not answer ({type(err).__name__}: "
                                       f"{str(err).strip().splitlines()[-1][:300]}); no partial merge is returned") from None
        self.stats.shard_compute_s += sum(answer[-2] for answer in answers)
        self.stats.shard_slowest_s += max(answer[-2] for answer in answers)
        self.stats.shard_pairs += sum(answer[-1] for answer in answers)
        return [answer[0] if len(answer) == 3 else answer[:2] for answer in answers]

    def _servers_of(self, bank: ShardedBank) -> list:
        """The shard servers of a sharded bank (opened once): here, or one Ray actor per shard."""
        if self.shards != len(bank.shards):
            raise ValueError(f"the backend asks for {self.shards} shards, but the sharded bank {bank.path} has {len(bank.shards)}")
        key = str(bank.path)
        if key not in self._servers:
            if self.placement == "local":
                self._servers[key] = [ShardServer(str(bank.shard_path(j)), s["fingerprint"], self.exact)
                                      for j, s in enumerate(bank.shards)]
            else:
                self._servers[key] = self._actors(bank)
        return self._servers[key]

    def _actors(self, bank: ShardedBank) -> list:
        try:
            import ray
        except ImportError as err:
            raise ImportError("placement=ray needs Ray: pip install -e '.[cpu,ray]' (the 'ray' extra)") from err
        address = self.placement.partition(":")[2] or None
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        server = ray.remote(num_cpus=self.actor_cpus, max_restarts=3, max_task_retries=3)(ShardServer)
        return [server.remote(str(bank.shard_path(j).resolve()), s["fingerprint"], self.exact, self.actor_cpus)
                for j, s in enumerate(bank.shards)]

    def exact_sums(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> RunningSums:
        """Every shard's exact sums, on its device, merged (:func:`shard_sums`, :func:`merge_all`)."""
        V = queries.shape[1] if serving(bank, bucket) == "image" else bank.channels
        with self.stats.timer("shard_s"):  # every shard launched before any result is fetched (devices overlap)
            parts = [shard_sums(self.exact, bank, bucket, queries.to(self.device_of(j)), a, s2, j, self.shards, V)
                     for j in range(self.shards)]
        with self.stats.timer("merge_s"):
            return merge_all([p.float64() for p in parts])

    def topk_sums(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> tuple[RunningSums, torch.Tensor]:
        """The merged sums over every shard's k nearest patches ``(m [Q], acc [Q, C+1])`` and the merged
        bound ``[Q]`` on the weight of all the others, relative to ``e^m``."""
        with self.stats.timer("shard_s"):  # every shard launched before any result is fetched (devices overlap)
            found = [self._shard_topk(bank, bucket, queries, a, s2, j) for j in range(self.shards)]
        with self.stats.timer("merge_s"):
            return merge_bounded([(p.float64(), b.cpu()) for p, b in found])

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
        return range_topk(keys, search, counts, queries, a, s2, self.k, bucket, bank.channels)
