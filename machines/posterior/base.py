"""What every posterior backend shares: the protocol, how a bucket is served, logits, draws, statistics.

A backend answers one question for a machine: the posterior means of the centre pixels
``[Q, C]`` (or of whole images ``[Q, C·H·W]``) of queries ``[Q, D]`` against one bucket of a bank,
at noise level ``(a, s²) = (√ᾱ, 1 − ᾱ)`` (DESIGN §3). Each entry ``p`` with log count ``c`` has the
logit ``ℓ(p) = −‖q − a·p‖²/(2s²) + c``; backends differ only in which entries they sum exactly,
which they estimate and how they bound or estimate the error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, ClassVar, Iterator, Literal, Protocol, TypeVar, runtime_checkable

import torch

from patchbank.base import Bank
from patchbank.geometry import IMAGE_RULES, BucketKey
from patchbank.index import SearchResult

Serving = Literal["image", "table", "stream"]
Guarantee = Literal["exact", "certified", "statistical", "heuristic"]


@runtime_checkable
class Backend(Protocol):
    """How a machine's posteriors are computed.

    ``posterior(bank, bucket, queries [Q, D], a, s2) → means [Q, V]``; ``stats``: what the calls
    since the last :meth:`reset` did (:class:`BackendStats`); ``guarantee``: what the answers
    promise — ``exact`` (to float round-off), ``certified`` (a per-pixel bound, reported as
    ``stats.summary()["error_bound"]``), ``statistical`` (a standard error, not a bound) or
    ``heuristic``; ``index``: the FAISS index the backend searches (a bank must have been built
    with it), or None.
    """

    index: str | None

    @property
    def stats(self) -> BackendStats: ...

    @property
    def guarantee(self) -> Guarantee: ...

    def posterior(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor: ...

    def reset(self) -> None: ...


def serving(bank: Bank, bucket: BucketKey) -> Serving:
    """How a bucket can be served: ``image`` (whole-image rules IS/ES), ``table`` (the bank has its
    distinct patches, clusters and perhaps an index) or ``stream`` (patches cut from the images only)."""
    if bucket.rule in IMAGE_RULES:
        return "image"
    return "table" if bank.materialised(bucket) else "stream"


@dataclass
class BackendStats:
    """Counters a backend accumulates until :meth:`reset`. Subclasses are dataclasses of counters,
    lists and seconds; :meth:`summary` turns them into one per-step record whose ``error_bound`` is
    the certified bound on ``|x̂0 − exact|`` over the answers since the reset (None: not certified)."""

    def reset(self) -> None:
        """Every field back to its default."""
        for f in fields(self):
            setattr(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to the field ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - start)

    def summary(self) -> dict:
        raise NotImplementedError


@dataclass
class FallbackStats(BackendStats):
    """What a backend with an exact fallback counts: the queries it was asked, how many of them were summed exactly
    instead of answered its own way, and the seconds of those exact sums."""

    queries: int = 0
    fallback: int = 0
    exact_s: float = 0.0


@dataclass
class CertifiedStats(FallbackStats):
    """… and for a certified backend, each query's certificate ε (neglected over retained weight; inf where it had
    none) and the largest ε among the answers kept: their x̂0 error is at most twice it."""

    eps: list[torch.Tensor] = field(default_factory=list)
    accepted_eps_max: float = 0.0

    def uncertified(self, n: int) -> None:
        """``n`` queries that had no certificate (no distinct-patch table to search): summed exactly."""
        self.queries += n
        self.fallback += n
        self.eps.append(torch.full((n,), torch.inf))

    def accept(self, eps: torch.Tensor, tol: float | None) -> torch.Tensor:
        """Record the certificates ``eps [Q]`` and say which answers are kept ``[Q]``: ε ≤ ``tol`` (None: all)."""
        self.eps.append(eps.cpu())
        keep = eps <= tol if tol is not None else torch.ones_like(eps, dtype=torch.bool)
        kept = eps[keep]
        if kept.numel():
            self.accepted_eps_max = max(self.accepted_eps_max, float(kept.max()))
        return keep


def fill_rest(means: torch.Tensor, keep: torch.Tensor, answer: Callable[[torch.Tensor], torch.Tensor],
              stats: FallbackStats | None = None) -> int:
    """The last step of every backend that answers some queries its own way: the rows of ``means [Q, V]`` not
    ``keep`` (bool ``[Q]``) are answered by ``answer(rows)`` — the indices of all of them, in one batched call —
    in place; with ``stats``, timed as its exact seconds and counted as fallback. Returns how many rows that was."""
    rows = torch.nonzero(~keep).view(-1)
    if rows.numel():
        if stats is None:
            means[rows.to(means.device)] = answer(rows).to(means.device, means.dtype)
        else:
            with stats.timer("exact_s"):
                means[rows.to(means.device)] = answer(rows).to(means.device, means.dtype)
            stats.fallback += rows.numel()
    return rows.numel()


B = TypeVar("B", bound="BackendBase")


class BackendBase:
    """Defaults of the :class:`Backend` protocol: no index, :meth:`reset` clears the statistics of this backend and
    of every backend it holds (its dataclass fields that are backends)."""

    index: str | None = None
    guarantee: ClassVar[Guarantee] = "exact"
    stats: BackendStats

    def __getstate__(self) -> dict:
        """Pickled without its caches of bank tables (private dict fields): a worker rebuilds what it uses."""
        return {k: ({} if k.startswith("_") and isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def inner_backends(self) -> dict[str, BackendBase]:
        """The backends this one holds, by field name (its fallback, its certified route, …)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), BackendBase)}

    def reset(self) -> None:
        """Clear the statistics (of this backend and of the backends it holds)."""
        self.stats.reset()
        for inner in self.inner_backends().values():
            inner.reset()

    def fresh(self: B) -> B:
        """A copy with the same settings and empty statistics (its inner backends' too) that shares this backend's
        caches of bank tables: for a trial whose counts are not this backend's (a cost model's probe)."""
        assert dataclasses.is_dataclass(self)
        copy = dataclasses.replace(self, stats=type(self.stats)(),
                                   **{name: inner.fresh() for name, inner in self.inner_backends().items()})
        for key, value in vars(self).items():
            if key.startswith("_") and isinstance(value, dict):
                setattr(copy, key, value)
        return copy


def entry_bias(sq_norms: torch.Tensor, log_counts: torch.Tensor | None, a: float, s2: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-entry logit bias ``−a²‖p‖²/(2s²) + c``: ``[1, M]``."""
    bias = sq_norms.to(dtype) * (-(a * a) / (2 * s2))
    if log_counts is not None:
        bias = bias + log_counts.to(dtype)
    return bias[None, :]


def logits(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, a: float, s2: float) -> torch.Tensor:
    """``ℓ = (2a⟨q, p⟩ − a²‖p‖²)/(2s²) + c`` for queries ``[Q, D]`` and keys ``[M, D]`` with
    :func:`entry_bias` ``[1, M]``: ``[Q, M]``. The ``−‖q‖²/(2s²)`` term is left out: it cancels in the softmax."""
    return torch.addmm(bias, queries, keys.T, alpha=a / s2)


def distance_logits(d2: torch.Tensor, log_counts: torch.Tensor, a: float, s2: float) -> torch.Tensor:
    """``ℓ = −a²‖q/a − p‖²/(2s²) + c`` from exact squared distances ``d2`` between ``q/a`` and retrieved patches and
    their log counts (any shape, broadcast): the logits of a backend that sums the patches a search returned, whose
    certificates need the distances themselves (the full logit, ``−‖q‖²/(2s²)`` included)."""
    return -(a * a) * d2 / (2 * s2) + log_counts


def with_ones(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values with a ones column appended, so one matrix product gives Σw·v and Σw: ``[M, V+1]``."""
    values = values.to(dtype)
    return torch.cat([values, torch.ones(values.shape[0], 1, dtype=dtype, device=values.device)], 1)


def on_rows(rows: torch.Tensor | slice, fold, *state: torch.Tensor):
    """``fold(*parts)`` on the ``rows`` of running-state tensors (each ``[Q, …]``), in place; returns what ``fold``
    returns. A slice folds into views; index rows ``0, 1, …, Q−1`` fold into the tensors themselves; other rows
    fold into gathered copies, written back after."""
    if isinstance(rows, slice):
        return fold(*(t[rows] for t in state))
    if rows.numel() == state[0].shape[0] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
        return fold(*state)
    parts = [t[rows] for t in state]
    out = fold(*parts)
    for t, part in zip(state, parts):
        t[rows] = part
    return out


def draw_seed(seed: int, bucket: BucketKey, a: float) -> int:
    """A generator seed from the user's seed, the bucket and the noise level (stable across runs)."""
    text = f"{seed}|{bucket.rule}|{bucket.scale}|{bucket.padding}|{bucket.dictionary}|{bucket.label}|{a!r}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class NeighbourSearch:
    """How a backend asks the bank for a query's nearest distinct patches: ``nprobe`` IVF lists probed;
    ``engine`` ``auto`` | ``faiss`` | ``torch`` (see :meth:`patchbank.PatchBank.search`); ``index``: the
    FAISS ``index_factory`` string the bank must have been built with (None: whatever the bank offers —
    exact k-NN on a :class:`~patchbank.MemoryBank`)."""

    nprobe: int = 8
    engine: Literal["auto", "faiss", "torch"] = "auto"
    index: str | None = None

    def nearest(self, bank: Bank, bucket: BucketKey, queries: torch.Tensor, k: int) -> SearchResult:
        """The ``k`` nearest distinct patches of ``queries [Q, D]``; a bank without the asked-for index is an error."""
        if self.index is not None and bank.index_spec != self.index:
            raise ValueError(f"the backend searches a {self.index!r} index, but the bank has {bank.index_spec!r}; "
                             f"build one with `patchbank build … --index '{self.index}'` and pass it as the bank")
        return bank.search(bucket, queries, k, self.nprobe, self.engine)
