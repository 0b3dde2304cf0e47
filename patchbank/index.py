"""Nearest-patch search: one result type for every index kind and for the exact oracle.

* :class:`Neighbours` — squared L2 distances and ids, ``[Q, k]``; missing results have
  distance ``+inf`` and id ``-1`` (faiss's convention).
* :func:`torch_search` — exact search by matrix product + top-k in chunks, on CPU or CUDA
  (the GPU path where faiss-gpu is absent).
* :class:`PatchIndex` — a FAISS index built from an ``index_factory`` string (``Flat``,
  ``IVF{n},Flat``, ``HNSW{m}``), with the metadata the certificate needs for IVF (centroids,
  list radii, list counts). FAISS is optional: importing this module never needs it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]


class Neighbours(NamedTuple):
    """Search result: squared L2 ``distances`` float ``[Q, k]`` (ascending) and ``ids`` long ``[Q, k]``."""

    distances: torch.Tensor
    ids: torch.Tensor


class SearchResult(NamedTuple):
    """Neighbours plus what the certificate needs: the index ``kind`` (flat: exact top-k; ivf:
    exact within the ``probed`` lists ``[Q, nprobe]`` described by ``ivf``; hnsw: heuristic), and
    ``scanned``, the (query, patch) distances the search computed (what a cost model charges it)."""

    neighbours: Neighbours
    kind: IndexKind
    probed: torch.Tensor | None = None
    ivf: IVFLists | None = None
    scanned: int = 0


def merge_neighbours(parts: list[Neighbours], k: int) -> Neighbours:
    """The k best of several partial results over disjoint shards (ids already global)."""
    d = torch.cat([p.distances for p in parts], 1)
    i = torch.cat([p.ids for p in parts], 1)
    k = min(k, d.shape[1])
    best, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return Neighbours(best, torch.gather(i, 1, pos))


def torch_search(queries: torch.Tensor, table: torch.Tensor, k: int, chunk: int = 65536) -> Neighbours:
    """Exact k-NN of ``queries [Q, D]`` in ``table [U, D]`` (same device) by matmul + top-k in chunks."""
    q = queries.to(torch.float32)
    qn = q.pow(2).sum(1, keepdim=True)
    parts = []
    for s in range(0, table.shape[0], chunk):
        block = table[s : s + chunk].to(q.device, torch.float32)
        d = (qn - 2 * q @ block.T + block.pow(2).sum(1)[None]).clamp_(min=0)
        kk = min(k, block.shape[0])
        best, pos = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        parts.append(Neighbours(best, pos + s))
        if len(parts) > 1:
            parts = [merge_neighbours(parts, k)]
    return _pad(parts[0], k)


def _pad(nb: Neighbours, k: int) -> Neighbours:
    missing = k - nb.ids.shape[1]
    if missing <= 0:
        return nb
    Q = nb.ids.shape[0]
    d = torch.cat([nb.distances, torch.full((Q, missing), torch.inf, device=nb.distances.device)], 1)
    i = torch.cat([nb.ids, torch.full((Q, missing), -1, dtype=torch.long, device=nb.ids.device)], 1)
    return Neighbours(d, i)


def require_faiss():
    """Import faiss or fail with the install command."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "this needs FAISS, which is not installed: pip install 'patchbank[cpu]' (faiss-cpu) or "
            "'patchbank[gpu]' (faiss-gpu; never both). The exact backend and the 'torch' index work without it."
        ) from err
    return faiss


def faiss_gpu_available() -> bool:
    try:
        faiss = require_faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def index_kind(spec: str) -> IndexKind:
    """The certificate class of an ``index_factory`` string (``Flat``, ``IVF…,Flat``, ``HNSW…``)."""
    if spec == "Flat":
        return "flat"
    if re.fullmatch(r"IVF\d+,Flat", spec):
        return "ivf"
    if re.fullmatch(r"HNSW\d+(,Flat)?", spec):
        return "hnsw"
    raise ValueError(f"unsupported index spec {spec!r}: use 'Flat', 'IVF<nlist>,Flat' or 'HNSW<M>'")


@dataclass
class IVFLists:
    """What the IVF certificate needs: ``centroids [nlist, D]``, ``radii [nlist]`` (max member
    distance to its centroid), ``counts [nlist]`` (members weighted by their patch counts)."""

    centroids: torch.Tensor
    radii: torch.Tensor
    counts: torch.Tensor


class PatchIndex:
    """A FAISS index over one bucket's distinct patches (float32 vectors in model units)."""

    def __init__(self, index, spec: str, ivf: IVFLists | None = None) -> None:
        self.index, self.spec, self.kind, self.ivf = index, spec, index_kind(spec), ivf
        self._gpu = None
        self._list_sizes: torch.Tensor | None = None  # IVF list lengths, for a GPU search's distance count

    @classmethod
    def build(cls, vectors: np.ndarray, counts: np.ndarray, spec: str, seed: int = 0) -> PatchIndex:
        """vectors float32 ``[U, D]``, counts ``[U]``. IVF nlist is capped so every list can train."""
        faiss = require_faiss()
        kind = index_kind(spec)
        U, D = vectors.shape
        if kind == "ivf":
            nlist = min(int(spec[3:].split(",")[0]), U // 39)  # FAISS wants ≥ 39 training points per list
            spec = f"IVF{nlist},Flat" if nlist >= 2 else "Flat"
            kind = index_kind(spec)
        index = faiss.index_factory(D, spec)
        if kind == "ivf":
            index.cp.seed = seed
            index.train(vectors)
        index.add(vectors)
        ivf = _ivf_lists(index, vectors, counts) if kind == "ivf" else None
        return cls(index, spec, ivf)

    def save(self, path: Path) -> None:
        faiss = require_faiss()
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, spec: str, ivf: IVFLists | None) -> PatchIndex:
        faiss = require_faiss()
        return cls(faiss.read_index(str(path)), spec, ivf)

    def search(self, queries: torch.Tensor, k: int, nprobe: int = 8, use_gpu: bool = False
               ) -> tuple[Neighbours, torch.Tensor | None, int]:
        """k-NN of ``queries [Q, D]``; for IVF also the probed lists ``[Q, nprobe]`` (else None); and the
        (query, patch) distances computed: FAISS's own count for IVF and HNSW on the CPU (list members scanned,
        graph nodes visited), every pair for Flat, the probed lists' members on a GPU."""
        faiss = require_faiss()
        xq = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        index = self._device_index(use_gpu)
        probed = None
        counter = {"ivf": faiss.cvar.indexIVF_stats, "hnsw": faiss.cvar.hnsw_stats}.get(self.kind)
        before = counter.ndis if counter is not None else 0
        if self.kind == "ivf":
            nprobe = min(nprobe, self.index.nlist)
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            _, lists = self.index.quantizer.search(xq, nprobe)
            probed = torch.from_numpy(lists)
            D, I = index.search(xq, k, params=params)
        else:
            D, I = index.search(xq, k)
        if counter is not None and index is self.index:
            scanned = int(counter.ndis - before)
        elif self.kind == "ivf":  # a GPU copy keeps no counts: the probed lists' members
            if self._list_sizes is None:
                self._list_sizes = torch.tensor([self.index.invlists.list_size(j) for j in range(self.index.nlist)])
            scanned = int(self._list_sizes[probed].sum())
        else:
            scanned = xq.shape[0] * self.index.ntotal
        return Neighbours(torch.from_numpy(D), torch.from_numpy(I).to(torch.long)), probed, scanned

    def _device_index(self, use_gpu: bool):
        if not use_gpu or self.kind == "hnsw" or not faiss_gpu_available():
            return self.index
        if self._gpu is None:  # FAISS GPU: k ≤ 2048 per search (the backend caps k and lets the certificate decide)
            faiss = require_faiss()
            self._res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._res, 0, self.index)
        return self._gpu


def _ivf_lists(index, vectors: np.ndarray, counts: np.ndarray) -> IVFLists:
    """Centroids, radii and weighted counts of an IVF index's lists (members assigned by its quantizer)."""
    nlist = index.nlist
    centroids = index.quantizer.reconstruct_n(0, nlist)
    d2, assign = index.quantizer.search(vectors, 1)
    assign = assign[:, 0]
    dist = np.sqrt(((vectors.astype(np.float64) - centroids[assign].astype(np.float64)) ** 2).sum(1))
    radii = np.zeros(nlist)
    np.maximum.at(radii, assign, dist)
    list_counts = np.bincount(assign, weights=counts.astype(np.float64), minlength=nlist)
    return IVFLists(torch.from_numpy(centroids.astype(np.float64)), torch.from_numpy(radii), torch.from_numpy(list_counts))
