"""An in-memory bank: training images held as uint8, distinct-patch tables built on first use."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from tqdm.auto import tqdm

from .base import Bank, half_the_memory
from .clusters import ClusteredPatches
from .datasets import ImageData
from .geometry import IMAGE_RULES, BucketKey, patches_at
from .index import SearchResult
from .tables import UniquePatches, merge_unique, unique_rows

log = logging.getLogger(__name__)


class MemoryBank(Bank):
    """Training images in memory; geometry exposed as ``channels``, ``height``, ``width``.

    With ``dedup=True`` each patch bucket is served as its distinct patches with log counts
    (identical uint8 patches are exactly identical, so the posterior is unchanged). The
    distinct-patch tables are built on first use and kept within ``cache_bytes`` (``"auto"``: half the
    machine's memory; None: no limit; least recently used buckets dropped first, see :class:`Bank`);
    scales above ``materialise_max`` never get one (their patches are streamed from the images), nor does
    a bucket whose table could take more than ``table_max_bytes`` to build (``"auto"``: half the machine's
    memory; None: no limit; see :meth:`table_bytes`).
    Nearest-patch search is exact (torch matmul + top-k); :class:`~patchbank.bank.PatchBank`
    adds FAISS indices.
    """

    def __init__(self, data: ImageData, dedup: bool = False, dedup_chunk: int = 1 << 20,
                 materialise_max: int | None = None, cache_bytes: int | None | Literal["auto"] = "auto",
                 table_max_bytes: int | None | Literal["auto"] = "auto") -> None:
        super().__init__(data, dedup)
        if cache_bytes != "auto":
            if cache_bytes is not None and cache_bytes < 0:
                raise ValueError(f"cache_bytes must be >= 0 (or None: no limit), got {cache_bytes}")
            self.cache_bytes = cache_bytes
        self.materialise_max = materialise_max
        self.table_max_bytes = half_the_memory() if table_max_bytes == "auto" else table_max_bytes
        self.dedup_chunk = dedup_chunk
        self._unique: dict[BucketKey, UniquePatches] = {}
        self._too_big: set[BucketKey] = set()  # buckets streamed because their table would not fit (warned once)

    def materialised(self, key: BucketKey) -> bool:
        """Whether the bucket's distinct patches can be served: in memory they are built on demand, for
        every patch scale up to ``materialise_max`` (None: all) whose table fits ``table_max_bytes``
        (:meth:`table_bytes`, an upper bound, checked before anything is allocated); other buckets are
        streamed from the images, with the same answers."""
        if key.rule in IMAGE_RULES or (self.materialise_max is not None and key.scale > self.materialise_max):  # type: ignore[operator]
            return False
        if key in self._unique or self.table_max_bytes is None:
            return True
        need = self.table_bytes(key)
        if need <= self.table_max_bytes:
            return True
        if key not in self._too_big:
            self._too_big.add(key)
            log.warning("bucket %s: its distinct-patch table and clusters could take up to %.1f GB, over the bank's "
                        "%.1f GB (table_max_bytes); its patches are streamed from the images instead (exact, slower)",
                        key, need / 1e9, self.table_max_bytes / 1e9)
        return False

    def table_bytes(self, key: BucketKey) -> int:
        """An upper bound on the memory a bucket's distinct-patch table takes while it is built and clustered: three
        int16 copies of every patch of the bucket (the per-block tables and their merge, then the clusters' order)."""
        return 3 * self.bucket_size(key) * self.channels * int(key.scale) ** 2 * 2  # type: ignore[arg-type]

    def unique_patches(self, key: BucketKey) -> UniquePatches:
        """The bucket's distinct patches and their counts (built once, then cached)."""
        if not self.materialised(key):
            why = (f"its table could take {self.table_bytes(key) / 1e9:.1f} GB, over table_max_bytes = "
                   f"{self.table_max_bytes / 1e9:.1f} GB"  # type: ignore[operator]
                   if key in self._too_big else f"materialise_max={self.materialise_max}")
            raise ValueError(f"bucket {key} has no distinct-patch table ({why}); its patches are streamed from the images")
        if key not in self._unique:
            self._unique[key] = self.hold(key, self.build_unique(key))
        self.touch(key)
        return self._unique[key]

    def clustered(self, key: BucketKey, leaf_size: int = 1024) -> ClusteredPatches:
        """The bucket's distinct patches grouped into clusters with centres and radii (built once, cached)."""
        return self._cluster(key, leaf_size)

    def search(self, key: BucketKey, queries: torch.Tensor, k: int, nprobe: int = 8, engine: str = "auto") -> SearchResult:
        """The ``k`` distinct patches nearest to ``queries [Q, D]``, exactly, with torch on the queries' device."""
        if engine not in ("auto", "torch"):
            raise ValueError(f"an in-memory bank searches with torch only, not {engine!r}; build a PatchBank for FAISS")
        return self._torch_search(key, queries, k)

    def build_unique(self, key: BucketKey) -> UniquePatches:
        """Deduplicate a bucket's patches, image block by image block (memory ~``dedup_chunk`` patches)."""
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        per = max(1, self.dedup_chunk // locs.shape[0])
        parts = []
        for s in tqdm(range(0, ids.numel(), per), desc=f"dedup P={key.scale} {key.dictionary}", leave=False,
                      disable=ids.numel() <= per):
            x = self.data.images[ids[s : s + per]].to(torch.int16).mul_(2).sub_(255)
            parts.append(unique_rows(patches_at(x, locs, key.scale, key.padding).flatten(0, 1).numpy()))  # type: ignore[arg-type]
        rows, counts = merge_unique(parts)
        log.info("bucket %s: %d patches, %d distinct (%.1f%%)", key, counts.sum(), len(rows), 100 * len(rows) / counts.sum())
        return UniquePatches(torch.from_numpy(rows), torch.from_numpy(counts))
