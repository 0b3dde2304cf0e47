"""The on-disk patch bank: build once per dataset, open many times (DESIGN §3–§4).

Layout of a bank directory::

    manifest.json              format version, dataset fingerprint, normalisation, build spec, buckets
    data.zarr/                 images uint8 [N, C, H, W], labels int64 [N]
    buckets/<id>/              one zarr group per bucket: distinct patches int16 [U, D] (1/255 units),
                               counts int64 [U], clusters (offsets, centres, radii, max_log_count),
                               IVF list metadata; and index.faiss when an index is built;
                               bucket.json (the bank's fingerprint and the bucket's key) and
                               checksums.json (every array and file of the bucket)

Every write goes to a temporary name and is renamed into place, buckets one by one, so a build
killed at any point resumes on re-run (finished buckets are kept) and ends with the same bank as
an uninterrupted build. A build holds a lock on its folder (a second build fails at once) and
validates its whole spec before writing anything. Opening checks the format version, the data
fingerprint (recomputed from the stored images) and, when the caller gives its data, that the
bank was built for it. Every stored array is checked against the checksum the build recorded
when it is first read (:mod:`patchbank.integrity`); :meth:`PatchBank.verify` checks all of them,
and re-running the build rebuilds whatever fails.

A bucket is bound to its bank: the manifest records the SHA-256 of each bucket's checksum table,
which covers the bucket's ``bucket.json`` (the bank's data fingerprint and the bucket's key), its
arrays and its index file. So a bucket copied from a bank of other data, two buckets swapped, an
index file taken from another bucket (with its checksum rewritten or not) or a deleted checksum
table is an error naming the bucket, never a silently wrong answer. Bucket keys read from the
manifest are checked, and bucket folders must lie inside the bank (no ``..``, no symlinks out).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import zarr
from tqdm.auto import tqdm

from .base import Bank
from .clusters import ClusteredPatches
from .datasets import ImageData
from .geometry import BucketKey
from .index import IVFLists, Neighbours, PatchIndex, SearchResult, faiss_gpu_available, index_kind, require_faiss
from .integrity import (
    CHECKSUMS,
    BankError,
    IntegrityError,
    build_lock,
    check_file,
    file_checksum,
    load_checked,
    read_checksums,
    verify_bucket,
)
from .layout import (  # noqa: F401  (BankSpec and bucket_id are part of this module's API)
    BINDING,
    FORMAT_VERSION,
    NORMALISATION,
    BankSpec,
    atomic_dir,
    binding_problem,
    bucket_id,
    check_key,
    check_resumable,
    check_tables_fit,
    full_disk_named,
    key_from_json,
    key_to_json,
    new_manifest,
    read_data,
    read_manifest,
    repair,
    timed,
    write_bucket,
    write_data,
    write_manifest,
)
from .memory import MemoryBank
from .tables import UniquePatches

log = logging.getLogger(__name__)


class PatchBank(Bank):
    """A bank on disk. Serves machines exactly like :class:`MemoryBank` (stream, distinct patches,
    clusters), from stored tables, plus nearest-patch search through per-bucket FAISS indices."""

    def __init__(self, path: Path, data: ImageData, manifest: dict) -> None:
        super().__init__(data, dedup=True)
        self._unique: dict[BucketKey, UniquePatches] = {}
        self.path = Path(path)
        self.manifest = manifest
        self.spec = BankSpec(**manifest["spec"])
        self.index_spec = self.spec.index
        self.leaf_size = self.spec.leaf_size
        self._fingerprint = manifest["fingerprint"]  # checked against the stored images on opening
        self._buckets = {bucket_id(BucketKey(**key_from_json(k))) for k in manifest["buckets"]}
        self._indices: dict[BucketKey, PatchIndex] = {}
        self._ivf: dict[BucketKey, IVFLists | None] = {}
        self._bound: set[str] = set()  # buckets whose binding to this bank was checked

    # ---- build -------------------------------------------------------------------------------
    @classmethod
    def build(cls, data: ImageData, path: str | os.PathLike, spec: BankSpec, progress: bool = True) -> PatchBank:
        """Build (or resume building) a bank for ``data`` at ``path``; returns the opened bank."""
        path = Path(path)
        if len(data) == 0:
            raise BankError("cannot build a bank of no images")
        if path.exists() and not path.is_dir():
            raise BankError(f"{path} is a file, not a folder for a bank")
        if path.is_dir() and any(p.name != ".build.lock" for p in path.iterdir()) and not (path / "manifest.json").exists():
            raise BankError(f"{path} is a non-empty folder that is not a patch bank; choose another path")
        manifest = new_manifest(data, spec, data.fingerprint())
        keys = spec.buckets(data)
        builder = MemoryBank(data, dedup=True)
        check_tables_fit(builder, keys, spec)
        with build_lock(path):
            old = read_manifest(path) if (path / "manifest.json").exists() else None
            if old is not None:
                check_resumable(old, manifest, path)
            repaired = repair(path, data, manifest["fingerprint"], keys, (old or {}).get("bucket_digests", {}))
            if old is not None and old.get("complete") and not repaired:  # nothing to build: the manifest (and build time) stay
                return cls.open(path)
            write_manifest(path / "manifest.json", {**manifest, "complete": False})
            if not (path / "data.zarr").exists():
                with full_disk_named(path, "data.zarr"):
                    atomic_dir(path / "data.zarr", lambda tmp: write_data(tmp, data))
            (path / "buckets").mkdir(exist_ok=True)
            start = time.perf_counter()
            for key in tqdm(keys, desc="building buckets", disable=not progress):
                target = path / "buckets" / bucket_id(key)
                if not target.exists():
                    with full_disk_named(path, f"bucket {target.name}"):
                        atomic_dir(target, lambda tmp: timed(tmp, write_bucket, builder, key, spec))
            manifest["build_seconds"] = round(time.perf_counter() - start, 2)
            manifest["buckets"] = [key_to_json(k) for k in keys]
            manifest["bucket_digests"] = {bucket_id(k): file_checksum(path / "buckets" / bucket_id(k) / CHECKSUMS) for k in keys}
            write_manifest(path / "manifest.json", {**manifest, "complete": True})
        return cls.open(path)

    def verify(self) -> dict[str, list[str]]:
        """Check every stored array and index file of every bucket against its checksum: the problems per
        bucket (an empty dict when the bank is intact). Re-running the build rebuilds the buckets listed."""
        problems = {}
        for entry in self.manifest["buckets"]:
            key = BucketKey(**key_from_json(entry))
            name = bucket_id(key)
            try:
                folder = self._bucket_dir(key)
            except BankError as err:
                problems[name] = [str(err)]
                continue
            found = verify_bucket(folder)
            if found:
                problems[name] = found
        return problems

    # ---- open --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, expect: ImageData | None = None) -> PatchBank:
        """Open a built bank; with ``expect``, fail unless it was built for exactly that data."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"no patch bank at {path}")
        manifest = read_manifest(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{path}: bank format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
        if not manifest.get("complete"):
            raise BankError(f"{path}: the build did not finish; re-run the same build to resume it")
        if manifest.get("normalisation") != NORMALISATION:
            raise BankError(f"{path}: bank normalisation {manifest.get('normalisation')!r} differs from {NORMALISATION!r}")
        data = read_data(path, manifest.get("dataset", "unnamed"))
        if data.fingerprint() != manifest["fingerprint"]:
            raise BankError(f"{path}: stored images/labels do not match the manifest fingerprint (corrupted data.zarr)")
        if expect is not None and expect.fingerprint() != manifest["fingerprint"]:
            raise BankError(
                f"{path} was built for other data ({manifest['dataset']}, {manifest['n_images']} images "
                f"{manifest['image_shape']}, fingerprint {manifest['fingerprint'][:12]}…), not for the "
                f"{len(expect)} images {list(expect.shape)} given"
            )
        return cls(path, data, manifest)

    def __reduce__(self):
        """Pickled as its path and fingerprint: a worker process reopens the bank read-only from the shared
        filesystem (nothing is rebuilt or copied) and fails if the bank there is not the same bank."""
        return _reopen, (str(self.path), self._fingerprint)

    def info(self) -> dict:
        """Summary of the manifest and per-scale sizes (patches, distinct, disk bytes, build seconds of its buckets)."""
        per_scale: dict[int, dict] = {}
        for entry in self.manifest["buckets"]:
            key = BucketKey(**key_from_json(entry))
            stats = self.manifest["bucket_stats"].get(bucket_id(key), {})
            s = per_scale.setdefault(key.scale, {"buckets": 0, "patches": 0, "distinct": 0, "bytes": 0, "seconds": 0.0})  # type: ignore[arg-type]
            s["buckets"] += 1
            for f in ("patches", "distinct", "bytes", "seconds"):
                s[f] += stats.get(f) or 0
            s["materialised"] = stats.get("materialised", True)
        return {k: self.manifest[k] for k in ("dataset", "n_images", "image_shape", "fingerprint", "spec", "build_seconds")} | {
            "scales": per_scale
        }

    # ---- serving -----------------------------------------------------------------------------
    def _bucket_dir(self, key: BucketKey) -> Path:
        """The folder of a bucket this bank was built with, checked (once) to belong to this bank: inside it, its
        checksum table the one the manifest recorded, and its ``bucket.json`` naming this bank's data and this key."""
        name = bucket_id(key)
        if name not in self._buckets:
            raise BankError(f"{self.path}: no bucket {name}; the bank was built with {self.manifest['spec']}")
        folder = self.path / "buckets" / name
        if name not in self._bound:
            problem = binding_problem(self.path, folder, key, self._fingerprint or "", self.manifest["bucket_digests"].get(name))
            if problem:
                raise BankError(f"{self.path}: bucket {name} {problem}; re-run the same build to repair it")
            self._bound.add(name)
        return folder

    def _group(self, key: BucketKey):
        folder = self._bucket_dir(key)
        try:
            return zarr.open_group(str(folder), mode="r")
        except Exception as err:  # zarr raises several types for missing/corrupt groups
            raise BankError(f"{self.path}: bucket {folder.name} is missing or corrupted ({err})") from err

    def _arrays(self, key: BucketKey, *names: str) -> list[torch.Tensor]:
        """Arrays of a bucket, each verified against the checksum the build recorded."""
        g = self._group(key)
        folder = self._bucket_dir(key)
        try:
            sums = read_checksums(folder)
            return [torch.from_numpy(load_checked(folder, g, n, sums)) for n in names]
        except IntegrityError as err:
            raise BankError(f"{self.path}: {err}; re-run the same build to repair it") from None

    def _statistics_file(self, label: int | None) -> Path | None:
        """Image statistics are stored with the bank, under ``statistics/``."""
        return self.path / "statistics" / f"{'all' if label is None else f'label{label}'}.pt"

    def materialised(self, key: BucketKey) -> bool:
        """Whether the build stored the bucket's distinct patches (P ≤ ``materialise_max``)."""
        self._group(key)  # a clear error for a bucket the bank was not built with
        return self.manifest["bucket_stats"].get(bucket_id(key), {}).get("materialised", True)

    def unique_patches(self, key: BucketKey) -> UniquePatches:
        """The stored distinct patches and counts of a bucket (read once, checked against the bucket's size)."""
        if key not in self._unique:
            if not self.materialised(key):
                raise BankError(f"{self.path}: bucket {bucket_id(key)} is not materialised (P > materialise_max = "
                                f"{self.spec.materialise_max}); it is served by streaming from the images")
            table = UniquePatches(*self._arrays(key, "patches", "counts"))
            expected = len(self.image_ids(key.label)) * key.locations(self.height, self.width).shape[0]
            if table.total != expected or table.patches.shape[1] != self.channels * key.scale**2:  # type: ignore[operator]
                raise BankError(f"{self.path}: bucket {bucket_id(key)} holds {table.total} patches, expected {expected} (corrupted)")
            self._unique[key] = self.hold(key, table)
        self.touch(key)
        return self._unique[key]

    def clustered(self, key: BucketKey, leaf_size: int = 2048) -> ClusteredPatches:
        """The stored clusters at the build's ``leaf_size``; other sizes are computed from the table (cached)."""
        if leaf_size != self.spec.leaf_size:
            return self._cluster(key, leaf_size)
        if (key, leaf_size) not in self._clustered:
            table = self.unique_patches(key)
            order, offsets, centres, radii, max_log_count = self._arrays(key, "cluster_order", "cluster_offsets", "cluster_centres",
                                                                         "cluster_radii", "cluster_max_log_count")
            patches = table.patches[order]
            values = patches.to(torch.float64) / 255.0
            self._clustered[(key, leaf_size)] = self.hold(key, ClusteredPatches(
                patches, table.counts[order].to(torch.float64).log(), values.pow(2).sum(1), offsets, centres, radii, max_log_count,
                order))
        self.touch(key)
        return self._clustered[(key, leaf_size)]

    def search(self, key: BucketKey, queries: torch.Tensor, k: int, nprobe: int = 8, engine: str = "auto") -> SearchResult:
        """Nearest distinct patches through the bucket's FAISS index (``engine='faiss'``), or exact
        torch search (``'torch'``; also what ``'auto'`` does without faiss, without an index, or for
        CUDA queries when faiss-gpu is absent)."""
        if engine not in ("auto", "faiss", "torch"):
            raise ValueError(f"engine must be 'auto', 'faiss' or 'torch', got {engine!r}")
        if not self.materialised(key):
            raise BankError(f"{self.path}: bucket {bucket_id(key)} is not materialised; it cannot be searched")
        has_index = self.manifest["bucket_stats"].get(bucket_id(key), {}).get("index") is not None
        use_faiss = engine == "faiss" or (engine == "auto" and has_index and _faiss_usable(queries))
        if not use_faiss:
            return self._torch_search(key, queries, k)
        index = self.index(key)
        on_gpu = queries.is_cuda and faiss_gpu_available()
        k_eff = min(k, 2048) if on_gpu else k  # FAISS GPU answers k ≤ 2048; the certificate covers the rest
        nb, probed, scanned = index.search(queries, k_eff, nprobe, use_gpu=on_gpu)
        nb = Neighbours(nb.distances.to(queries.device), nb.ids.to(queries.device))
        return SearchResult(nb, index.kind, probed, index.ivf, scanned)

    def index(self, key: BucketKey) -> PatchIndex:
        """The bucket's FAISS index (loaded once)."""
        if key not in self._indices:
            spec = self.manifest["bucket_stats"][bucket_id(key)].get("index")
            if spec is None:
                raise BankError(f"{self.path}: built without an index (spec index=None); rebuild with e.g. index='Flat'")
            ivf = IVFLists(*self._arrays(key, "ivf_centroids", "ivf_radii", "ivf_counts")) if index_kind(spec) == "ivf" else None
            folder = self._bucket_dir(key)
            try:
                index_file = check_file(folder, "index.faiss", read_checksums(folder))
            except IntegrityError as err:
                raise BankError(f"{self.path}: {err}; re-run the same build to repair it") from None
            self._indices[key] = PatchIndex.load(index_file, spec, ivf)
        return self._indices[key]


# ---- helpers ---------------------------------------------------------------------------------
def _reopen(path: str, fingerprint: str) -> PatchBank:
    bank = PatchBank.open(path)
    if bank.fingerprint() != fingerprint:
        raise BankError(f"{path} holds another bank (fingerprint {bank.fingerprint()[:12]}…) than the one sent to this "
                        f"worker ({fingerprint[:12]}…); is the path the same on every node?")
    return bank


def _faiss_usable(queries: torch.Tensor) -> bool:
    try:
        require_faiss()
    except ImportError:
        return False
    return not queries.is_cuda or faiss_gpu_available()
