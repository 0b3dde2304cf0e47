"""Exact posterior backend: streaming log-sum-exp over a dictionary, chunk by chunk (DESIGN §3).

For queries ``q`` and dictionary entries ``p`` (with values ``v`` and optional log counts ``c``)
the posterior mean is ``Σ_p softmax(ℓ)(p)·v(p)`` with ``ℓ(p) = −‖q − a·p‖²/(2s²) + c(p)``. The
``‖q‖²`` term cancels in the softmax, so each chunk's logits are one matrix product,
``(2a⟨q, p⟩ − a²‖p‖²)/(2s²) + c``, and the reduction keeps a running maximum per query
(flash-attention style): memory is bounded by ``query_chunk × chunk`` whatever the bucket size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from patchbank.geometry import BucketKey
from patchbank.memory import Chunk, MemoryBank


@dataclass
class ExactBackend:
    """Exact posterior means.

    ``chunk_size``: dictionary entries per chunk; ``query_chunk``: queries per block;
    ``dtype``: compute precision (float64 by default: late-time logits reach ~1e4, so float32
    loses ~1e-4 of relative weight accuracy there).
    """

    chunk_size: int = 16384
    query_chunk: int = 1024
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.query_chunk < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {self.chunk_size}, {self.query_chunk}")

    def posterior(self, bank: MemoryBank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float) -> torch.Tensor:
        """Posterior means ``[Q, V]`` of queries ``[Q, D]`` against one bucket of the bank."""
        return self.posterior_mean(queries, bank.stream(bucket, self.chunk_size, self.dtype, queries.device), a, s2)

    def posterior_mean(self, queries: torch.Tensor, chunks: Iterable[Chunk], a: float, s2: float) -> torch.Tensor:
        """queries ``[Q, D]`` and chunks of ``(keys [M, D], values [M, V], log_counts [M] | None)`` → ``[Q, V]``."""
        q = queries.to(self.dtype)
        state: _Running | None = None
        for chunk in chunks:
            if chunk.keys.shape[1] != q.shape[1]:
                raise ValueError(f"queries have dimension {q.shape[1]} but dictionary keys {chunk.keys.shape[1]}")
            state = state or _Running.empty(q.shape[0], chunk.values.shape[1], q.dtype, q.device)
            bias, values = _key_terms(chunk, a, s2, self.dtype)
            keys_t = chunk.keys.to(self.dtype).T
            for s in range(0, q.shape[0], self.query_chunk):
                rows = slice(s, s + self.query_chunk)
                logits = torch.addmm(bias, q[rows], keys_t, alpha=a / s2)  # [q, M]
                state.update(rows, logits, values)
        if state is None:
            raise ValueError("the dictionary is empty")
        return state.mean()


def _key_terms(chunk: Chunk, a: float, s2: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry logit bias ``−a²‖p‖²/(2s²) + c`` ``[1, M]`` and values with a ones column ``[M, V+1]``."""
    keys = chunk.keys.to(dtype)
    bias = keys.pow(2).sum(1).mul_(-(a * a) / (2 * s2))
    if chunk.log_counts is not None:
        bias = bias + chunk.log_counts.to(dtype)
    values = chunk.values.to(dtype)
    ones = torch.ones(values.shape[0], 1, dtype=dtype, device=values.device)
    return bias[None, :], torch.cat([values, ones], 1)


@dataclass
class _Running:
    """Online softmax state per query: running max ``m [Q]`` and weighted sums ``acc [Q, V+1]`` (last column Σw)."""

    m: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def empty(cls, Q: int, V: int, dtype: torch.dtype, device: torch.device) -> _Running:
        return cls(torch.full((Q,), -torch.inf, dtype=dtype, device=device), torch.zeros(Q, V + 1, dtype=dtype, device=device))

    def update(self, rows: slice, logits: torch.Tensor, values: torch.Tensor) -> None:
        m_old = self.m[rows]
        m_new = torch.maximum(m_old, logits.amax(1))
        # Rescale the old sums to the new maximum, then add this chunk's weights (logits reused in place).
        weights = logits.sub_(m_new[:, None]).exp_()
        self.acc[rows] = self.acc[rows] * torch.exp(m_old - m_new)[:, None] + weights @ values
        self.m[rows] = m_new

    def mean(self) -> torch.Tensor:
        return self.acc[:, :-1] / self.acc[:, -1:]
