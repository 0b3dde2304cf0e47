"""The bank protocol: what every bank serves to the machines, and the streams cut from its images.

A bank holds training images (uint8) and serves each bucket (DESIGN §3) in the forms a posterior
backend asks for:

* :meth:`Bank.stream` — every entry in chunks (patches cut from the images on demand, or the
  bucket's distinct patches with log counts where the bank has them), memory bounded by the chunk;
* :meth:`Bank.sample_patches` — patches drawn uniformly, straight from the images;
* :meth:`Bank.unique_patches` / :meth:`Bank.clustered` — the distinct-patch table and its
  clusters, where :meth:`Bank.materialised` says there is one;
* :meth:`Bank.search` — the nearest distinct patches of a query;
* :meth:`Bank.image_statistics` — the mean and covariance spectrum of its images (per label), computed once
  (and, for a bank on disk, stored with it).

:class:`~patchbank.memory.MemoryBank` (tables built in memory on first use) and
:class:`~patchbank.bank.PatchBank` (tables and FAISS indices read from disk) are the two
implementations. They share the image streams below and implement the table methods each its
own way.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .clusters import ClusteredPatches, cluster_patches
from .datasets import ImageData, to_model_range
from .geometry import IMAGE_RULES, BucketKey, centre_index, check_padding, check_scale, pad_images
from .index import SearchResult, torch_search
from .tables import Chunk, UniquePatches

log = logging.getLogger(__name__)

FULL_COVARIANCE_MAX = 4096
"""Largest D = C·H·W whose covariance is eigendecomposed whole (a 4,096² float64 matrix is 134 MB). Beyond it,
and whenever the images are fewer than D, the spectrum comes from the centred data's thin SVD instead, exact
as well (Σ has rank ≤ N − 1; directions outside the data's span have λ = 0), in memory ``N·D``: at D = 12,288
(64×64 RGB) and N = 30,000 that is 2.9 GB."""


@dataclass
class ImageStatistics:
    """Mean ``mu [D]``, covariance eigenvalues ``lam [r]`` and eigenvectors ``V [D, r]`` (``Σ = V diag(λ) Vᵀ``) of
    flattened images in model units, float64."""

    mu: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor

    def save(self, path: Path, fingerprint: str) -> None:
        from .atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save({"fingerprint": fingerprint, "mu": self.mu, "lam": self.lam, "V": self.V}, p))

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> ImageStatistics | None:
        """The statistics stored at ``path`` for these images, or None (none stored, another data set's, unreadable)."""
        if not path.exists():
            return None
        from .atomic import read_torch

        try:
            found = read_torch(path, "image statistics")
            if found.get("fingerprint") != fingerprint:
                return None
            return cls(found["mu"], found["lam"], found["V"])
        except Exception as err:  # a damaged or foreign file is computed again, not trusted
            log.warning("ignoring unreadable image statistics %s (%s)", path, err)
            return None


def image_statistics(x: torch.Tensor) -> ImageStatistics:
    """Mean and covariance spectrum (``1/N`` normalisation) of rows ``x [N, D]``; see :data:`FULL_COVARIANCE_MAX`."""
    x = x.to(torch.float64)
    mu = x.mean(0)
    centred = x - mu
    n, D = centred.shape
    if D <= FULL_COVARIANCE_MAX and n >= D:
        lam, V = torch.linalg.eigh(centred.T @ centred / n)
    else:
        _, sv, Vh = torch.linalg.svd(centred, full_matrices=False)
        lam, V = sv.pow(2) / n, Vh.T
    return ImageStatistics(mu, lam.clamp(min=0), V)


def default_cache_bytes() -> int:
    """What a bank keeps of its tables by default: ``$PATCHBANK_CACHE_GB`` gigabytes where set, else half of
    this machine's physical memory."""
    if os.environ.get("PATCHBANK_CACHE_GB"):
        try:
            gigabytes = float(os.environ["PATCHBANK_CACHE_GB"])
        except ValueError:
            raise ValueError(f"PATCHBANK_CACHE_GB must be a number of gigabytes, got {os.environ['PATCHBANK_CACHE_GB']!r}") from None
        if not gigabytes >= 0:
            raise ValueError(f"PATCHBANK_CACHE_GB must be >= 0, got {gigabytes}")
        return int(gigabytes * 1e9)
    return half_the_memory()


def half_the_memory() -> int:
    """Half of this machine's physical memory in bytes (8 GB where the system does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (e.g. Windows): 8 GB
        return 8 << 30


def _nbytes(value) -> int:
    """Bytes held by a tensor or a tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.numel()
    return sum(_nbytes(v) for v in value if isinstance(v, torch.Tensor))


class Bank(ABC):
    """Training images and the buckets cut from them; geometry exposed as ``channels``, ``height``, ``width``.

    ``dedup``: stream a patch bucket as its distinct patches with log counts wherever the bank
    has them tabulated (identical uint8 patches are exactly identical, so the posterior is unchanged).

    Tables a bank builds or reads on demand (distinct patches, clusters, search tables) are kept per
    bucket within ``cache_bytes`` (default half the machine's memory; None: no limit): beyond it the
    least recently used buckets' tables are dropped, and built or read again when asked for. Answers
    do not change, only time: at large P (colour data, D in the hundreds) nearly every patch is
    distinct, and keeping every scale's table would exhaust memory (a calibration visits many P).
    """

    index_spec: str | None = None  # the FAISS index_factory string its buckets were indexed with (None: no index)
    leaf_size: int = 2048  # the cluster size the bank keeps (PatchBank: its build's; MemoryBank: built on demand)

    def __init__(self, data: ImageData, dedup: bool) -> None:
        self.data = data
        self.dedup = dedup
        self.channels, self.height, self.width = data.shape
        self.labels = data.labels
        self._clustered: dict[tuple[BucketKey, int], ClusteredPatches] = {}
        self._search_tables: dict[tuple[BucketKey, str], torch.Tensor] = {}
        self._padded_cache: tuple[tuple[int, str], torch.Tensor] | None = None
        self._fingerprint: str | None = None
        self._statistics: dict[int | None, ImageStatistics] = {}
        self.cache_bytes: int | None = default_cache_bytes()
        self._held: OrderedDict[BucketKey, int] = OrderedDict()  # bytes of tables kept per bucket, least recent first

    def __len__(self) -> int:
        return len(self.data)

    def __getstate__(self) -> dict:
        """Pickled without the tables built on demand (a worker process builds its own as it needs them:
        cheaper than sending gigabytes of tables through a pipe, and bounded by what that worker uses)."""
        state = dict(self.__dict__)
        for name in ("_unique", "_clustered", "_search_tables", "_statistics"):
            if name in state:
                state[name] = {}
        state["_held"] = OrderedDict()
        state["_padded_cache"] = None
        return state

    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of the bank's images and labels (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        return self._fingerprint

    # ---- what each implementation provides ----------------------------------------------------
    @abstractmethod
    def materialised(self, key: BucketKey) -> bool:
        """Whether the bucket has a distinct-patch table (and clusters, and perhaps an index)."""

    @abstractmethod
    def unique_patches(self, key: BucketKey) -> UniquePatches:
        """The bucket's distinct patches and their counts."""

    @abstractmethod
    def clustered(self, key: BucketKey, leaf_size: int) -> ClusteredPatches:
        """The bucket's distinct patches grouped into clusters of at most ``leaf_size`` with centres and radii."""

    @abstractmethod
    def search(self, key: BucketKey, queries: torch.Tensor, k: int, nprobe: int = 8, engine: str = "auto") -> SearchResult:
        """The ``k`` distinct patches nearest to ``queries [Q, D]`` (model units) in a bucket."""

    def _statistics_file(self, label: int | None) -> Path | None:
        """Where a bank keeps a label's :class:`ImageStatistics` between runs (None: in memory only)."""
        return None

    # ---- shared by both implementations ------------------------------------------------------
    def image_statistics(self, label: int | None = None) -> ImageStatistics:
        """The mean and covariance spectrum of the label's training images (all for None), float64, in model
        units: computed once (:func:`image_statistics`), kept, and stored with a bank on disk."""
        if label not in self._statistics:
            path = self._statistics_file(label)
            stats = ImageStatistics.load(path, self.fingerprint()) if path is not None else None
            if stats is None:
                stats = image_statistics(to_model_range(self.data.images[self.image_ids(label)], torch.float64).flatten(1))
                if path is not None:
                    try:
                        stats.save(path, self.fingerprint())
                    except (OSError, RuntimeError) as err:  # a read-only bank still answers (torch's writer raises
                        # RuntimeError where it cannot open the file); it computes again next time
                        log.warning("could not store image statistics at %s (%s)", path, err)
            self._statistics[label] = stats
        return self._statistics[label]

    def image_ids(self, label: int | None) -> torch.Tensor:
        """Indices of the training images in a label's dictionary (all images for None)."""
        if label is None:
            return torch.arange(len(self.data))
        ids = torch.nonzero(self.labels == label).view(-1)
        if ids.numel() == 0:
            raise ValueError(f"no training image has label {label}; labels present: {self.labels.unique().tolist()}")
        return ids

    def stream(self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
               distinct: bool = True) -> Iterator[Chunk]:
        """A bucket's entries in chunks: patches for LS/ELS/bbELS, whole images for IS, translates for ES.

        ``distinct=False`` streams every patch with its repetitions even where distinct patches are tabulated."""
        if key.rule in IMAGE_RULES:
            return self.image_stream(key.label, chunk_size, key.rule == "ES", dtype, device)
        return self.patch_stream(key, chunk_size, dtype, device, distinct)

    def patch_stream(self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu", distinct: bool = True) -> Iterator[Chunk]:
        """The bucket's patches in chunks of ≤ ``chunk_size``: keys ``[M, C·P·P]``, centre pixels ``[M, C]``."""
        check_scale(key.scale)  # type: ignore[arg-type]
        check_padding(key.padding)
        if distinct and self.streams_distinct(key):
            yield from self._unique_stream(key, chunk_size, dtype, device)
            return
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        n_img = max(1, chunk_size // locs.shape[0])
        n_loc = min(chunk_size, locs.shape[0])
        table = self.padded(key.scale, key.padding)  # type: ignore[arg-type]  # int16, units of 1/255
        P, C = int(key.scale), self.channels  # type: ignore[arg-type]
        centre = centre_index(C, P).to(device)
        box = _rectangle(locs) if locs.shape[0] <= chunk_size else None
        if box is not None:  # every rule's dictionaries are rectangles of pixels: strided views, no index arithmetic
            i0, j0, h, w = box
            for s in range(0, ids.numel(), n_img):
                x = table[ids[s : s + n_img], :, i0 : i0 + h + P - 1, j0 : j0 + w + P - 1]
                view = x.unfold(2, P, 1).unfold(3, P, 1)  # [n, C, h, w, P, P]
                keys = model_units(view.permute(0, 2, 3, 1, 4, 5).reshape(-1, C * P * P), dtype, device)
                yield Chunk(keys, keys[:, centre])
            return
        for s in range(0, ids.numel(), n_img):
            img = ids[s : s + n_img]
            for l0 in range(0, locs.shape[0], n_loc):
                sub = locs[l0 : l0 + n_loc]  # every (image, pixel) pair of the block, image-major
                pairs = gather_patches(table, img.repeat_interleave(sub.shape[0]), sub.repeat(img.numel(), 1), P)
                keys = model_units(pairs, dtype, device)
                yield Chunk(keys, keys[:, centre])

    def bucket_size(self, key: BucketKey) -> int:
        """Number of training patches in a patch bucket (with repetitions): images × locations."""
        return self.image_ids(key.label).numel() * key.locations(self.height, self.width).shape[0]

    def streams_distinct(self, key: BucketKey) -> bool:
        """Whether :meth:`patch_stream` serves this bucket as its distinct patches with log counts."""
        return self.dedup and self.materialised(key)

    def stream_size(self, key: BucketKey) -> int:
        """Number of entries :meth:`patch_stream` yields for a patch bucket: its distinct patches
        where a deduplicating bank has them tabulated, else :meth:`bucket_size`."""
        if self.streams_distinct(key):
            return int(self.unique_patches(key).patches.shape[0])
        return self.bucket_size(key)

    def sample_patches(self, key: BucketKey, m: int, generator: torch.Generator, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> Chunk:
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
        keys = model_units(gather_patches(self.padded(P, key.padding), img, loc, P), dtype, device)
        return Chunk(keys, keys[:, centre_index(self.channels, P).to(keys.device)])

    def padded(self, P: int, padding: str) -> torch.Tensor:
        """The training images as int16 ``2·u8 − 255`` (zero padding is exact 0), padded by ``P // 2``:
        ``[N, C, H+P−1, W+P−1]``; only the latest (P, padding) is kept."""
        if self._padded_cache is None or self._padded_cache[0] != (P, padding):
            x = self.data.images.to(torch.int16).mul_(2).sub_(255)
            self._padded_cache = ((P, padding), pad_images(x, P // 2, padding).contiguous())  # type: ignore[arg-type]
        return self._padded_cache[1]

    def image_stream(self, label: int | None, chunk_size: int, translates: bool = False, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> Iterator[Chunk]:
        """Whole images (or, with ``translates``, all H·W circular translates of each) as keys and values ``[M, C·H·W]``."""
        H, W = self.height, self.width
        ids = self.image_ids(label)
        shifts = _shift_index(H, W, translates).to(device)  # [S, H·W]
        n_img = max(1, chunk_size // shifts.shape[0])
        n_shift = min(chunk_size, shifts.shape[0])
        for s in range(0, ids.numel(), n_img):
            x = to_model_range(self.data.images[ids[s : s + n_img]], dtype).to(device).flatten(2)  # [n, C, H·W]
            for s0 in range(0, shifts.shape[0], n_shift):
                rolled = x[:, :, shifts[s0 : s0 + n_shift]]  # [n, C, S, H·W]
                flat = rolled.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * H * W)
                yield Chunk(flat, flat)

    def _cluster(self, key: BucketKey, leaf_size: int) -> ClusteredPatches:
        """Clusters computed from the distinct-patch table (built once per ``leaf_size``, cached)."""
        if (key, leaf_size) not in self._clustered:
            self._clustered[(key, leaf_size)] = self.hold(key, cluster_patches(self.unique_patches(key), leaf_size))
        self.touch(key)
        return self._clustered[(key, leaf_size)]

    def hold(self, key: BucketKey, value):
        """Count a table just built or read for ``key`` against ``cache_bytes``, dropping the least recently used
        other buckets' tables while the bank holds more; returns ``value``."""
        self._held[key] = self._held.get(key, 0) + _nbytes(value)
        self._held.move_to_end(key)
        while self.cache_bytes is not None and sum(self._held.values()) > self.cache_bytes and len(self._held) > 1:
            oldest = next(iter(self._held))
            if oldest == key:
                break
            log.info("bank tables over %.1f GB: dropping bucket %s's", self.cache_bytes / 1e9, oldest)
            self.forget(oldest)
        return value

    def touch(self, key: BucketKey) -> None:
        """Mark ``key``'s tables as the most recently used."""
        if key in self._held:
            self._held.move_to_end(key)

    def forget(self, key: BucketKey) -> None:
        """Drop every table kept for a bucket (its distinct patches, clusters and search tables)."""
        getattr(self, "_unique", {}).pop(key, None)
        caches: tuple[dict, ...] = (self._clustered, self._search_tables)
        for cache in caches:
            for name in [name for name in cache if name[0] == key]:
                del cache[name]
        self._held.pop(key, None)

    def _torch_search(self, key: BucketKey, queries: torch.Tensor, k: int) -> SearchResult:
        """Exact k-NN over the distinct-patch table by torch matmul + top-k, on the queries' device."""
        cache = (key, str(queries.device))
        if cache not in self._search_tables:
            self._search_tables[cache] = self.hold(key, self.unique_patches(key).patches.to(queries.device, torch.float32) / 255.0)
        self.touch(key)
        table = self._search_tables[cache]
        return SearchResult(torch_search(queries, table, k), "flat", scanned=queries.shape[0] * table.shape[0])

    def _unique_stream(self, key: BucketKey, chunk_size: int, dtype: torch.dtype, device: torch.device | str) -> Iterator[Chunk]:
        table = self.unique_patches(key)
        centre = centre_index(self.channels, key.scale).to(device)  # type: ignore[arg-type]
        for s in range(0, table.patches.shape[0], chunk_size):
            keys = model_units(table.patches[s : s + chunk_size], dtype, device)
            log_counts = table.counts[s : s + chunk_size].to(device=device, dtype=dtype).log_()
            yield Chunk(keys, keys[:, centre], log_counts)


def gather_patches(table: torch.Tensor, img: torch.Tensor, loc: torch.Tensor, P: int) -> torch.Tensor:
    """Patches of a padded image table ``[N, C, H+P−1, W+P−1]`` for paired ``img [M]`` and pixels
    ``loc [M, 2]``: ``[M, C·P·P]`` in the table's dtype (channel-major, like :func:`patches_at`).

    The table is viewed (no copy) as ``[N, H, W, C, P, P]``, every patch at its pixel, and the ``M``
    patches are one indexing of that view's first three dimensions: 3–9× faster than indexing the
    ``C·P·P`` pixels one by one, which dominated the policy's draws on streamed buckets."""
    N, C, Hp, Wp = table.shape
    sN, sC, sH, sW = table.stride()
    windows = table.as_strided((N, Hp - P + 1, Wp - P + 1, C, P, P), (sN, sH, sW, sC, sH, sW))
    return windows[img, loc[:, 0], loc[:, 1]].reshape(img.numel(), C * P * P)


def model_units(rows: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
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
