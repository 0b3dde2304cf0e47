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

import errno
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import zarr
from tqdm.auto import tqdm

from .atomic import DiskFullError, write_json
from .base import Bank
from .clusters import ClusteredPatches, cluster_patches
from .datasets import ImageData
from .geometry import IMAGE_RULES, RULE_PADDING, BucketKey, check_padding, check_scale, dictionary_groups
from .index import IVFLists, Neighbours, PatchIndex, SearchResult, faiss_gpu_available, index_kind, require_faiss
from .integrity import (CHECKSUMS, BankError, IntegrityError, build_lock, check_file, file_checksum, json_object, load_checked,
                        read_checksums, verify_bucket, write_checksums)
from .memory import MemoryBank
from .tables import UniquePatches

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: per-array checksums in every bucket; 3: buckets bound to their bank (bucket.json, digests)
BINDING = "bucket.json"
NORMALISATION = "x / 127.5 - 1 from uint8; patches stored as int16 2*u8 - 255 (units of 1/255), zero padding = 0"


@dataclass
class BankSpec:
    """What to build. ``rules``: dictionary rules (LS, ELS, bbELS); ``scales``: odd P values;
    ``labels``: also build one bucket per label (class-conditional machines); ``index``: a FAISS
    ``index_factory`` string (``Flat``, ``IVF<n>,Flat``, ``HNSW<M>``) or None for no index;
    ``leaf_size``: cluster size for the exact backend's pruning; ``materialise_max``: store
    distinct patches, clusters and indices only for P ≤ this (None: every scale). Larger
    scales are nearly all distinct and would not fit (CIFAR-10 or 60k MNIST at P = 15: tens of
    GB); their buckets are streamed from the stored images, exactly, without an index."""

    scales: list[int]
    rules: list[str] = field(default_factory=lambda: ["bbELS"])
    labels: bool = False
    index: str | None = "Flat"
    leaf_size: int = 2048
    materialise_max: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scales, (list, tuple)) or not self.scales:
            raise ValueError(f"scales must be a non-empty list of odd patch sizes, got {self.scales!r}")
        for P in self.scales:
            if isinstance(P, bool) or not isinstance(P, int) or P < 1 or P % 2 == 0:
                raise ValueError(f"every scale must be an odd integer >= 1, got {P!r}")
        if isinstance(self.leaf_size, bool) or not isinstance(self.leaf_size, int) or self.leaf_size < 1:
            raise ValueError(f"leaf_size must be an integer >= 1, got {self.leaf_size!r}")
        if self.materialise_max is not None and (isinstance(self.materialise_max, bool) or not isinstance(self.materialise_max, int)):
            raise ValueError(f"materialise_max must be an integer or None, got {self.materialise_max!r}")
        for rule in self.rules:
            if rule in IMAGE_RULES or rule not in RULE_PADDING:
                raise ValueError(f"a patch bank serves patch rules {sorted(RULE_PADDING)}, not {rule!r}")
        if self.index is not None:
            index_kind(self.index)

    def buckets(self, data: ImageData) -> list[BucketKey]:
        C, H, W = data.shape
        labels: list[int | None] = [None] + (sorted(int(y) for y in data.labels.unique()) if self.labels else [])
        return [
            BucketKey(rule, P, RULE_PADDING[rule], key, label)
            for rule in self.rules
            for P in self.scales
            for key, _ in dictionary_groups(H, W, P, rule)  # type: ignore[arg-type]
            for label in labels
        ]


def bucket_id(key: BucketKey) -> str:
    """A file-system name for a bucket, e.g. ``bbELS-P5-zeros-0_2_2_2-all``."""
    dictionary = "_".join(map(str, key.dictionary)) or "any"
    label = "all" if key.label is None else f"y{key.label}"
    return f"{key.rule}-P{key.scale}-{key.padding}-{dictionary}-{label}"


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
        self._buckets = {bucket_id(BucketKey(**_key_from_json(k))) for k in manifest["buckets"]}
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
        manifest = _new_manifest(data, spec, data.fingerprint())
        keys = spec.buckets(data)
        builder = MemoryBank(data, dedup=True)
        _check_tables_fit(builder, keys, spec)
        with build_lock(path):
            old = _read_manifest(path) if (path / "manifest.json").exists() else None
            if old is not None:
                _check_resumable(old, manifest, path)
            repaired = _repair(path, data, manifest["fingerprint"], keys, (old or {}).get("bucket_digests", {}))
            if old is not None and old.get("complete") and not repaired:  # nothing to build: the manifest (and build time) stay
                return cls.open(path)
            _write_json(path / "manifest.json", {**manifest, "complete": False})
            if not (path / "data.zarr").exists():
                with _full_disk_named(path, "data.zarr"):
                    _atomic_dir(path / "data.zarr", lambda tmp: _write_data(tmp, data))
            (path / "buckets").mkdir(exist_ok=True)
            start = time.perf_counter()
            for key in tqdm(keys, desc="building buckets", disable=not progress):
                target = path / "buckets" / bucket_id(key)
                if not target.exists():
                    with _full_disk_named(path, f"bucket {target.name}"):
                        _atomic_dir(target, lambda tmp: _timed(tmp, _write_bucket, builder, key, spec))
            manifest["build_seconds"] = round(time.perf_counter() - start, 2)
            manifest["buckets"] = [_key_to_json(k) for k in keys]
            manifest["bucket_digests"] = {bucket_id(k): file_checksum(path / "buckets" / bucket_id(k) / CHECKSUMS) for k in keys}
            _write_json(path / "manifest.json", {**manifest, "complete": True})
        return cls.open(path)

    def verify(self) -> dict[str, list[str]]:
        """Check every stored array and index file of every bucket against its checksum: the problems per
        bucket (an empty dict when the bank is intact). Re-running the build rebuilds the buckets listed."""
        problems = {}
        for entry in self.manifest["buckets"]:
            key = BucketKey(**_key_from_json(entry))
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
        manifest = _read_manifest(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{path}: bank format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
        if not manifest.get("complete"):
            raise BankError(f"{path}: the build did not finish; re-run the same build to resume it")
        if manifest.get("normalisation") != NORMALISATION:
            raise BankError(f"{path}: bank normalisation {manifest.get('normalisation')!r} differs from {NORMALISATION!r}")
        data = _read_data(path, manifest.get("dataset", "unnamed"))
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
            key = BucketKey(**_key_from_json(entry))
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
            problem = _binding_problem(self.path, folder, key, self._fingerprint, self.manifest["bucket_digests"].get(name))
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
            order, *rest = self._arrays(key, "cluster_order", "cluster_offsets", "cluster_centres", "cluster_radii",
                                        "cluster_max_log_count")
            patches = table.patches[order]
            values = patches.to(torch.float64) / 255.0
            self._clustered[(key, leaf_size)] = self.hold(key, ClusteredPatches(
                patches, table.counts[order].to(torch.float64).log(), values.pow(2).sum(1), *rest, order))
        self.touch(key)
        return self._clustered[(key, leaf_size)]  # type: ignore[return-value]

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


def _new_manifest(data: ImageData, spec: BankSpec, fingerprint: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": data.name,
        "n_images": len(data),
        "image_shape": list(data.shape),
        "fingerprint": fingerprint,
        "normalisation": NORMALISATION,
        "spec": asdict(spec),
        "buckets": [],
        "bucket_stats": {},
    }


def _check_resumable(old: dict, new: dict, path: Path) -> None:
    for field_ in ("format_version", "fingerprint", "spec", "normalisation"):
        if old.get(field_) != new[field_]:
            raise BankError(
                f"{path} already holds a bank with a different {field_} ({old.get(field_)!r} vs {new[field_]!r}); "
                "choose another path or delete it"
            )


def _read_manifest(path: Path) -> dict:
    f = path / "manifest.json"
    if not f.is_file():
        raise BankError(f"{path} is not a patch bank (no manifest.json)")
    manifest = json_object(f)
    missing = [k for k in ("format_version", "fingerprint", "spec", "buckets") if k not in manifest]
    if missing:
        raise BankError(f"{f} is corrupted: it lacks {', '.join(missing)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        return manifest  # refused by the caller, naming both versions
    if not isinstance(manifest["buckets"], list) or not isinstance(manifest.get("bucket_digests", {}), dict):
        raise BankError(f"{f} is corrupted: its buckets are not a list of keys")
    for entry in manifest["buckets"]:
        _check_key(entry, f)
    manifest.setdefault("bucket_digests", {})
    stats = {}
    for d in (path / "buckets").glob("*/stats.json") if (path / "buckets").is_dir() else []:
        stats[d.parent.name] = json_object(d)
        timing = d.with_name("timing.json")  # kept apart: everything else is identical between builds
        if timing.is_file():
            stats[d.parent.name] |= json_object(timing)
    manifest["bucket_stats"] = stats
    return manifest


def _repair(path: Path, data: ImageData, fingerprint: str, keys: list[BucketKey], digests: dict[str, str]) -> bool:
    """Remove what a re-run must rebuild: unfinished (``*.tmp``), damaged and foreign buckets (not bound to this
    bank's data and key, or not the bucket the last manifest recorded in ``digests``), data.zarr not matching
    ``data``; returns whether anything is missing or was removed (else the bank is complete and intact)."""
    todo = False
    if (path / "data.zarr").exists():
        try:
            intact = _read_data(path, data.name).fingerprint() == fingerprint
        except BankError:
            intact = False
        if not intact:
            shutil.rmtree(path / "data.zarr")
    todo |= not (path / "data.zarr").exists()
    buckets = path / "buckets"
    for stale in buckets.glob("*.tmp") if buckets.is_dir() else []:
        shutil.rmtree(stale)
    for key in keys:
        target = buckets / bucket_id(key)
        if target.is_symlink():
            target.unlink()
        elif target.is_dir() and (verify_bucket(target) or _binding_problem(path, target, key, fingerprint, digests.get(target.name),
                                                                            need_digest=False)):
            shutil.rmtree(target)
        todo |= not target.is_dir()
    return todo


def _binding_problem(bank: Path, folder: Path, key: BucketKey, fingerprint: str, digest: str | None,
                     need_digest: bool = True) -> str | None:
    """What is wrong with a bucket folder as ``key``'s bucket of the bank with data ``fingerprint`` (None: nothing):
    outside the bank or a symlink, no checksum table, a table other than the manifest's ``digest``, or a
    ``bucket.json`` naming other data or another key. ``need_digest=False`` (an unfinished build): no digest to check."""
    if folder.is_symlink() or folder.resolve().parent != (bank / "buckets").resolve() or \
            (bank / "buckets").resolve().parent != bank.resolve():
        return "lies outside the bank (a symlink); only folders inside the bank are read"
    if not folder.is_dir():
        return "is missing"
    if not (folder / CHECKSUMS).is_file():
        return f"has no checksum table ({CHECKSUMS} deleted)"
    try:
        bound = json_object(folder / BINDING)
    except BankError:
        return f"has no readable {BINDING} (it was not built for this bank)"
    if bound.get("bank") != fingerprint:
        return (f"was built for other data (fingerprint {str(bound.get('bank'))[:12]}…, this bank's {fingerprint[:12]}…): "
                "copied from another bank")
    if bound.get("key") != _key_to_json(key):
        other = bucket_id(BucketKey(**_key_from_json(bound["key"]))) if isinstance(bound.get("key"), dict) else bound.get("key")
        return f"holds bucket {other} (buckets swapped or renamed)"
    if digest is None and need_digest:
        return "is not recorded in the manifest"
    if digest is not None and file_checksum(folder / CHECKSUMS) != digest:
        return f"has a checksum table other than the one the build recorded in manifest.json ({CHECKSUMS} rewritten)"
    try:
        check_file(folder, BINDING, read_checksums(folder))
    except IntegrityError as err:
        return f"is damaged ({err})"
    return None


def _check_key(entry: object, f: Path) -> None:
    """A bucket key read from a manifest: known rule and padding, odd scale, integer dictionary and label (so the
    folder name it makes cannot leave the bank)."""
    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    try:
        if not isinstance(entry, dict) or set(entry) != {"rule", "scale", "padding", "dictionary", "label"}:
            raise ValueError("not the fields of a key")
        check_scale(entry["scale"])
        check_padding(entry["padding"])
        if entry["rule"] not in RULE_PADDING or not isinstance(entry["dictionary"], list) \
                or not all(map(integer, entry["dictionary"])) or not (entry["label"] is None or integer(entry["label"])):
            raise ValueError("not a rule, dictionary and label")
    except ValueError:
        raise BankError(f"{f} is corrupted: {entry!r} is not a bucket key") from None


def _write_json(path: Path, obj: dict) -> None:
    write_json(path, {k: v for k, v in obj.items() if k != "bucket_stats"})


def _check_tables_fit(builder: MemoryBank, keys: list[BucketKey], spec: BankSpec) -> None:
    """Refuse, before anything is written, a build whose distinct-patch tables could not be built in memory (a
    bucket's :meth:`~MemoryBank.table_bytes` over the builder's ``table_max_bytes``), naming the largest scale that fits."""
    tabled = [k for k in keys if spec.materialise_max is None or k.scale <= spec.materialise_max]  # type: ignore[operator]
    limit = builder.table_max_bytes
    over = [k for k in tabled if limit is not None and builder.table_bytes(k) > limit]
    if over:
        worst = max(over, key=builder.table_bytes)
        fits = [P for P in spec.scales if all(builder.table_bytes(k) <= limit for k in keys if k.scale == P)]  # type: ignore[operator]
        raise BankError(f"the distinct-patch table of bucket {bucket_id(worst)} could take {builder.table_bytes(worst) / 1e9:.1f} GB "
                        f"to build, over the {limit / 1e9:.1f} GB this machine allows (half its memory); build with "  # type: ignore[operator]
                        f"materialise_max (--materialise-max) ={max(fits) if fits else 'a smaller P'} (larger scales are then streamed from the images, exactly)")


@contextmanager
def _full_disk_named(bank: Path, what: str) -> Iterator[None]:
    """A full disk while writing ``what`` of a bank is a :class:`DiskFullError` naming the bank and the part."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"no space left on the disk holding the bank {bank} (writing {what}): free some space and "
                            "re-run the same build; finished buckets are kept") from err


def _atomic_dir(target: Path, write) -> None:
    """Write a directory under ``<target>.tmp`` and rename it into place."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a re-run would remove it anyway; now, a full disk gets its space back
        raise


def _write_data(tmp: Path, data: ImageData) -> None:
    g = zarr.open_group(str(tmp), mode="w")
    g.create_array("images", data=data.images.numpy(), chunks=(min(len(data), 1024), *data.shape))
    g.create_array("labels", data=data.labels.numpy())


def _read_data(path: Path, name: str) -> ImageData:
    try:
        g = zarr.open_group(str(path / "data.zarr"), mode="r")
        images, labels = g["images"][:], g["labels"][:]
    except Exception as err:
        raise BankError(f"{path}: data.zarr is missing or corrupted ({err})") from err
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), name)


def _timed(tmp: Path, write, *args) -> None:
    """``write(tmp, *args)``, then the seconds it took into ``tmp/timing.json``."""
    start = time.perf_counter()
    write(tmp, *args)
    (tmp / "timing.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 3)}))


def _write_bucket(tmp: Path, builder: MemoryBank, key: BucketKey, spec: BankSpec) -> None:
    binding = json.dumps({"bank": builder.fingerprint(), "key": _key_to_json(key)})  # written after zarr's mode="w" wipes tmp
    if spec.materialise_max is not None and key.scale > spec.materialise_max:  # type: ignore[operator]
        g = zarr.open_group(str(tmp), mode="w")
        g.attrs["key"] = _key_to_json(key)
        n = len(builder.image_ids(key.label)) * key.locations(builder.height, builder.width).shape[0]
        (tmp / "stats.json").write_text(json.dumps({"patches": n, "distinct": None, "index": None, "materialised": False, "bytes": 0}))
        (tmp / BINDING).write_text(binding)
        write_checksums(tmp, {}, [BINDING])
        return
    table = builder.unique_patches(key)
    builder.forget(key)  # keep the builder's memory bounded by one bucket
    g = zarr.open_group(str(tmp), mode="w")
    g.attrs["key"] = _key_to_json(key)
    patches = table.patches.numpy()
    chunk_rows = max(1, (1 << 22) // max(1, patches.shape[1] * 2))
    g.create_array("patches", data=patches, chunks=(min(chunk_rows, len(patches)), patches.shape[1]))
    g.create_array("counts", data=table.counts.numpy(), chunks=(min(chunk_rows, len(patches)),))
    arrays = {"patches": patches, "counts": table.counts.numpy()}
    clusters = cluster_patches(table, spec.leaf_size)
    for name in ("order", "offsets", "centres", "radii", "max_log_count"):
        arrays[f"cluster_{name}"] = getattr(clusters, name).numpy()
        g.create_array(f"cluster_{name}", data=arrays[f"cluster_{name}"])
    stats = {"patches": table.total, "distinct": len(patches), "index": None}
    files = [BINDING]
    if spec.index is not None:
        vectors = (table.patches.to(torch.float32) / 255.0).numpy()
        index = PatchIndex.build(vectors, table.counts.numpy(), spec.index)
        index.save(tmp / "index.faiss")
        files.append("index.faiss")
        stats["index"] = index.spec
        if index.ivf is not None:
            for name in ("centroids", "radii", "counts"):
                arrays[f"ivf_{name}"] = getattr(index.ivf, name).numpy()
                g.create_array(f"ivf_{name}", data=arrays[f"ivf_{name}"])
    (tmp / BINDING).write_text(binding)
    write_checksums(tmp, arrays, files)
    stats["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    (tmp / "stats.json").write_text(json.dumps(stats))


def _key_to_json(key: BucketKey) -> dict:
    d = asdict(key)
    d["dictionary"] = list(key.dictionary)
    return d


def _key_from_json(d: dict) -> dict:
    return {**d, "dictionary": tuple(d["dictionary"])}
