"""An in-memory bank: training images held as uint8, each bucket served as a stream of chunks.

The stream is what the exact posterior backend consumes. Patches are cut from the stored images
on demand, so memory is bounded by the chunk size, never by the number of patches.
"""

from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .datasets import ImageData, to_model_range
from .geometry import BucketKey, centre_index, check_padding, check_scale, pad_images, patches_at

log = logging.getLogger(__name__)


IMAGE_RULES = ("IS", "ES")


class Chunk(NamedTuple):
    """Dictionary entries: ``keys [M, D]``, their ``values [M, V]``, optional ``log_counts [M]``."""

    keys: torch.Tensor
    values: torch.Tensor
    log_counts: torch.Tensor | None = None


class UniquePatches(NamedTuple):
    """A bucket's distinct patches, stored once: ``patches`` int16 ``[U, D]`` in units of 1/255
    (``2·u8 − 255``, so zero padding is exactly 0) and how often each occurs, ``counts`` int64 ``[U]``."""

    patches: torch.Tensor
    counts: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class MemoryBank:
    """Training images in memory; geometry exposed as ``channels``, ``height``, ``width``.

    With ``dedup=True`` each patch bucket is served as its distinct patches with log counts
    (identical uint8 patches are exactly identical, so the posterior is unchanged). The
    distinct-patch tables are built on first use and kept (see :meth:`unique_patches`); scales
    above ``materialise_max`` never get one (their patches are streamed from the images).
    """

    def __init__(self, data: ImageData, dedup: bool = False, dedup_chunk: int = 1 << 20,
                 materialise_max: int | None = None) -> None:
        self.data = data
        self.materialise_max = materialise_max
        self.channels, self.height, self.width = data.shape
        self.labels = data.labels
        self.dedup = dedup
        self.dedup_chunk = dedup_chunk
        self._unique: dict[BucketKey, UniquePatches] = {}
        self._clustered: dict[tuple[BucketKey, int], object] = {}
        self._search_tables: dict[tuple[BucketKey, str], torch.Tensor] = {}
        self._padded_cache: tuple[tuple[int, str], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def image_ids(self, label: int | None) -> torch.Tensor:
        """Indices of the training images in a label's dictionary (all images for None)."""
        if label is None:
            return torch.arange(len(self.data))
        ids = torch.nonzero(self.labels == label).view(-1)
        if ids.numel() == 0:
            raise ValueError(f"no training image has label {label}; labels present: {self.labels.unique().tolist()}")
        return ids

    def _images(self, ids: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return to_model_range(self.data.images[ids], dtype).to(device)

    def stream(
        self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Iterator[Chunk]:
        """A bucket's entries in chunks: patches for LS/ELS/bbELS, whole images for IS, translates for ES."""
        if key.rule in IMAGE_RULES:
            return self.image_stream(key.label, chunk_size, key.rule == "ES", dtype, device)
        return self.patch_stream(key, chunk_size, dtype, device)

    def patch_stream(
        self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Iterator[Chunk]:
        """The bucket's patches in chunks of ≤ ``chunk_size``: keys ``[M, C·P·P]``, centre pixels ``[M, C]``."""
        check_scale(key.scale)
        check_padding(key.padding)
        if self._streams_distinct(key):
            yield from self._unique_stream(key, chunk_size, dtype, device)
            return
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        n_img = max(1, chunk_size // locs.shape[0])
        n_loc = min(chunk_size, locs.shape[0])
        table = self._padded(key.scale, key.padding)  # type: ignore[arg-type]  # int16, units of 1/255
        P, C = int(key.scale), self.channels  # type: ignore[arg-type]
        centre = centre_index(C, P).to(device)
        box = _rectangle(locs) if locs.shape[0] <= chunk_size else None
        if box is not None:  # every rule's dictionaries are rectangles of pixels: strided views, no index arithmetic
            i0, j0, h, w = box
            for s in range(0, ids.numel(), n_img):
                x = table[ids[s : s + n_img], :, i0 : i0 + h + P - 1, j0 : j0 + w + P - 1]
                view = x.unfold(2, P, 1).unfold(3, P, 1)  # [n, C, h, w, P, P]
                keys = _model_units(view.permute(0, 2, 3, 1, 4, 5).reshape(-1, C * P * P), dtype, device)
                yield Chunk(keys, keys[:, centre])
            return
        for s in range(0, ids.numel(), n_img):
            img = ids[s : s + n_img]
            for l0 in range(0, locs.shape[0], n_loc):
                sub = locs[l0 : l0 + n_loc]  # every (image, pixel) pair of the block, image-major
                pairs = _gather(table, img.repeat_interleave(sub.shape[0]), sub.repeat(img.numel(), 1), P)
                keys = _model_units(pairs, dtype, device)
                yield Chunk(keys, keys[:, centre])

    def bucket_size(self, key: BucketKey) -> int:
        """Number of training patches in a patch bucket (with repetitions): images × locations."""
        return self.image_ids(key.label).numel() * key.locations(self.height, self.width).shape[0]

    def stream_size(self, key: BucketKey) -> int:
        """Number of entries :meth:`patch_stream` yields for a patch bucket: its distinct patches
        where a deduplicating bank has them tabulated, else :meth:`bucket_size`."""
        if self._streams_distinct(key):
            return int(self.unique_patches(key).patches.shape[0])
        return self.bucket_size(key)

    def _streams_distinct(self, key: BucketKey) -> bool:
        return self.dedup and self.materialised(key)

    def sample_patches(
        self, key: BucketKey, m: int, generator: torch.Generator, dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Chunk:
        """``m`` training patches of a patch bucket drawn uniformly with replacement (no distinct-patch
        table needed): keys ``[m, C·P·P]`` and centre pixels ``[m, C]`` in model units.

        A uniform draw over the bucket's (image, location) pairs is a draw of a distinct patch with
        probability proportional to its count.
        """
        if key.rule in IMAGE_RULES:
            raise ValueError(f"{key.rule} buckets hold whole images, not patches")
        if m < 1:
            raise ValueError(f"need m >= 1 draws, got {m}")
        P = int(key.scale)  # type: ignore[arg-type]
        check_scale(P)
        check_padding(key.padding)
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        img = ids[torch.randint(ids.numel(), (m,), generator=generator)]
        loc = locs[torch.randint(locs.shape[0], (m,), generator=generator)]
        keys = _model_units(_gather(self._padded(P, key.padding), img, loc, P), dtype, device)
        return Chunk(keys, keys[:, centre_index(self.channels, P).to(keys.device)])

    def _padded(self, P: int, padding: str) -> torch.Tensor:
        """The training images as int16 ``2·u8 − 255`` (zero padding is exact 0), padded by ``P // 2``;
        only the latest (P, padding) is kept."""
        if self._padded_cache is None or self._padded_cache[0] != (P, padding):
            x = self.data.images.to(torch.int16).mul_(2).sub_(255)
            self._padded_cache = ((P, padding), pad_images(x, P // 2, padding).contiguous())  # type: ignore[arg-type]
        return self._padded_cache[1]

    def materialised(self, key: BucketKey) -> bool:
        """Whether the bucket's distinct patches can be served: in memory they are built on demand, for
        every patch scale up to ``materialise_max`` (None: all); larger scales are streamed from the images."""
        return key.rule not in IMAGE_RULES and (self.materialise_max is None or key.scale <= self.materialise_max)

    def unique_patches(self, key: BucketKey) -> UniquePatches:
        """The bucket's distinct patches and their counts (built once, then cached)."""
        if not self.materialised(key):
            raise ValueError(f"bucket {key} has no distinct-patch table (materialise_max={self.materialise_max}); "
                             "its patches are streamed from the images")
        if key not in self._unique:
            self._unique[key] = self._build_unique(key)
        return self._unique[key]

    def clustered(self, key: BucketKey, leaf_size: int = 1024):
        """The bucket's distinct patches grouped into clusters with centres and radii (built once, cached).

        Returns a :class:`patchbank.clusters.ClusteredPatches`.
        """
        from .clusters import cluster_patches

        if (key, leaf_size) not in self._clustered:
            self._clustered[(key, leaf_size)] = cluster_patches(self.unique_patches(key), leaf_size)
        return self._clustered[(key, leaf_size)]

    def search(self, key: BucketKey, queries: torch.Tensor, k: int, nprobe: int = 8, engine: str = "auto"):
        """The ``k`` distinct patches nearest to ``queries [Q, D]`` (model units) in a bucket.

        Returns a :class:`patchbank.index.SearchResult`. An in-memory bank searches exactly with
        torch (matmul + top-k, on the queries' device); :class:`PatchBank` adds FAISS indices.
        """
        from .index import SearchResult, torch_search

        if engine not in ("auto", "torch"):
            raise ValueError(f"an in-memory bank searches with torch only, not {engine!r}; build a PatchBank for FAISS")
        cache = (key, str(queries.device))
        if cache not in self._search_tables:
            self._search_tables[cache] = self.unique_patches(key).patches.to(queries.device, torch.float32) / 255.0
        return SearchResult(torch_search(queries, self._search_tables[cache], k), "flat")

    def _build_unique(self, key: BucketKey) -> UniquePatches:
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        per = max(1, self.dedup_chunk // locs.shape[0])
        parts = []
        for s in tqdm(range(0, ids.numel(), per), desc=f"dedup P={key.scale} {key.dictionary}", leave=False,
                      disable=ids.numel() <= per):
            x = self.data.images[ids[s : s + per]].to(torch.int16).mul_(2).sub_(255)
            parts.append(_unique_rows(patches_at(x, locs, key.scale, key.padding).flatten(0, 1).numpy()))
        rows, counts = _merge_unique(parts)
        log.info("bucket %s: %d patches, %d distinct (%.1f%%)", key, counts.sum(), len(rows), 100 * len(rows) / counts.sum())
        return UniquePatches(torch.from_numpy(rows), torch.from_numpy(counts))

    def _unique_stream(self, key: BucketKey, chunk_size: int, dtype: torch.dtype, device: torch.device | str) -> Iterator[Chunk]:
        table = self.unique_patches(key)
        centre = centre_index(self.channels, key.scale).to(device)
        for s in range(0, table.patches.shape[0], chunk_size):
            keys = _model_units(table.patches[s : s + chunk_size], dtype, device)
            log_counts = table.counts[s : s + chunk_size].to(device=device, dtype=dtype).log_()
            yield Chunk(keys, keys[:, centre], log_counts)

    def image_stream(
        self,
        label: int | None,
        chunk_size: int,
        translates: bool = False,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Iterator[Chunk]:
        """Whole images (or, with ``translates``, all H·W circular translates of each) as keys and values ``[M, C·H·W]``."""
        H, W = self.height, self.width
        ids = self.image_ids(label)
        shifts = _shift_index(H, W, translates).to(device)  # [S, H·W]
        n_img = max(1, chunk_size // shifts.shape[0])
        n_shift = min(chunk_size, shifts.shape[0])
        for s in range(0, ids.numel(), n_img):
            x = self._images(ids[s : s + n_img], dtype, device).flatten(2)  # [n, C, H·W]
            for s0 in range(0, shifts.shape[0], n_shift):
                rolled = x[:, :, shifts[s0 : s0 + n_shift]]  # [n, C, S, H·W]
                flat = rolled.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * H * W)
                yield Chunk(flat, flat)


def _gather(table: torch.Tensor, img: torch.Tensor, loc: torch.Tensor, P: int) -> torch.Tensor:
    """Patches of a padded image table ``[N, C, H+P−1, W+P−1]`` for paired ``img [M]`` and pixels
    ``loc [M, 2]``: ``[M, C·P·P]`` in the table's dtype (channel-major, like :func:`patches_at`)."""
    off = torch.arange(P)
    rows = loc[:, 0, None, None] + off[None, :, None]  # [M, P, 1]
    cols = loc[:, 1, None, None] + off[None, None, :]  # [M, 1, P]
    patches = table[img[:, None, None], :, rows, cols]  # [M, P, P, C]
    return patches.permute(0, 3, 1, 2).reshape(img.numel(), -1)


def _model_units(rows: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """int16 patch rows in units of 1/255 (``2·u8 − 255``) → model units in ``dtype`` on ``device``."""
    return rows.to(device=device, dtype=dtype).div_(255.0)


def _rectangle(locs: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(i0, j0, h, w)`` when the pixels ``[L, 2]`` are exactly a rectangle in row-major order, else None."""
    i0, j0 = int(locs[:, 0].min()), int(locs[:, 1].min())
    h, w = int(locs[:, 0].max()) - i0 + 1, int(locs[:, 1].max()) - j0 + 1
    if h * w != locs.shape[0]:
        return None
    i, j = torch.meshgrid(torch.arange(i0, i0 + h), torch.arange(j0, j0 + w), indexing="ij")
    return (i0, j0, h, w) if torch.equal(locs, torch.stack([i.reshape(-1), j.reshape(-1)], 1)) else None


def _shift_index(H: int, W: int, translates: bool) -> torch.Tensor:
    """Row ``s`` maps pixel ``p`` of the image shifted by ``s = (dy, dx)`` to its source pixel: long ``[S, H·W]``."""
    i = torch.arange(H)[:, None]
    j = torch.arange(W)[None, :]
    if not translates:
        return (i * W + j).reshape(1, -1)
    dy = torch.arange(H)[:, None, None, None]
    dx = torch.arange(W)[None, :, None, None]
    return (((i - dy) % H) * W + (j - dx) % W).reshape(H * W, H * W)


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a 2-D array and their counts (rows compared as raw bytes)."""
    rows = np.ascontiguousarray(rows)
    void = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    uniq, first, counts = np.unique(void, return_index=True, return_counts=True)
    return rows[first], counts.astype(np.int64)


def _merge_unique(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-chunk (distinct rows, counts) into one table with summed counts."""
    rows = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if len(parts) == 1:
        return rows, counts
    void = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    return rows[first], np.bincount(inverse.ravel(), weights=counts, minlength=len(first)).astype(np.int64)
