"""A patch bank's files: the build spec, the bucket names, the manifest, the bucket bindings, and the writers.

What :class:`~patchbank.bank.PatchBank` reads and builds with: the manifest and its checks, a bucket folder's
binding to its bank (``bucket.json`` and the digest of its checksum table), the temporary-name-then-rename
writers of the data and of each bucket, and the check that a build's tables fit in memory. The layout itself is
described in :mod:`patchbank.bank`.
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

import numpy as np
import torch
import zarr

from .atomic import DiskFullError, write_json
from .clusters import cluster_patches
from .datasets import ImageData
from .geometry import IMAGE_RULES, RULE_PADDING, BucketKey, check_padding, check_scale, dictionary_groups
from .index import PatchIndex, index_kind
from .integrity import (
    CHECKSUMS,
    BankError,
    IntegrityError,
    check_file,
    file_checksum,
    json_object,
    read_checksums,
    verify_bucket,
    write_checksums,
)
from .memory import MemoryBank

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


def new_manifest(data: ImageData, spec: BankSpec, fingerprint: str) -> dict:
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


def check_resumable(old: dict, new: dict, path: Path) -> None:
    for field_ in ("format_version", "fingerprint", "spec", "normalisation"):
        if old.get(field_) != new[field_]:
            raise BankError(
                f"{path} already holds a bank with a different {field_} ({old.get(field_)!r} vs {new[field_]!r}); "
                "choose another path or delete it"
            )


def read_manifest(path: Path) -> dict:
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
        check_key(entry, f)
    manifest.setdefault("bucket_digests", {})
    stats = {}
    for d in (path / "buckets").glob("*/stats.json") if (path / "buckets").is_dir() else []:
        stats[d.parent.name] = json_object(d)
        timing = d.with_name("timing.json")  # kept apart: everything else is identical between builds
        if timing.is_file():
            stats[d.parent.name] |= json_object(timing)
    manifest["bucket_stats"] = stats
    return manifest


def repair(path: Path, data: ImageData, fingerprint: str, keys: list[BucketKey], digests: dict[str, str]) -> bool:
    """Remove what a re-run must rebuild: unfinished (``*.tmp``), damaged and foreign buckets (not bound to this
    bank's data and key, or not the bucket the last manifest recorded in ``digests``), data.zarr not matching
    ``data``; returns whether anything is missing or was removed (else the bank is complete and intact)."""
    todo = False
    if (path / "data.zarr").exists():
        try:
            intact = read_data(path, data.name).fingerprint() == fingerprint
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
        elif target.is_dir() and (verify_bucket(target) or binding_problem(path, target, key, fingerprint, digests.get(target.name),
                                                                            need_digest=False)):
            shutil.rmtree(target)
        todo |= not target.is_dir()
    return todo


def binding_problem(bank: Path, folder: Path, key: BucketKey, fingerprint: str, digest: str | None,
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
    if bound.get("key") != key_to_json(key):
        other = bucket_id(BucketKey(**key_from_json(bound["key"]))) if isinstance(bound.get("key"), dict) else bound.get("key")
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


def check_key(entry: object, f: Path) -> None:
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


def write_manifest(path: Path, obj: dict) -> None:
    """A manifest, written atomically (without the build's per-bucket statistics)."""
    write_json(path, {k: v for k, v in obj.items() if k != "bucket_stats"})


def check_tables_fit(builder: MemoryBank, keys: list[BucketKey], spec: BankSpec) -> None:
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
                        f"materialise_max (--materialise-max) ={max(fits) if fits else 'a smaller P'} "
                        "(larger scales are then streamed from the images, exactly)")


@contextmanager
def full_disk_named(bank: Path, what: str) -> Iterator[None]:
    """A full disk while writing ``what`` of a bank is a :class:`DiskFullError` naming the bank and the part."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"no space left on the disk holding the bank {bank} (writing {what}): free some space and "
                            "re-run the same build; finished buckets are kept") from err


def atomic_dir(target: Path, write) -> None:
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


def write_data(tmp: Path, data: ImageData) -> None:
    g = zarr.open_group(str(tmp), mode="w")
    g.create_array("images", data=data.images.numpy(), chunks=(min(len(data), 1024), *data.shape))
    g.create_array("labels", data=data.labels.numpy())


def read_data(path: Path, name: str) -> ImageData:
    try:
        g = zarr.open_group(str(path / "data.zarr"), mode="r")
        images, labels = np.asarray(g["images"][:]), np.asarray(g["labels"][:])  # type: ignore[index]
    except Exception as err:
        raise BankError(f"{path}: data.zarr is missing or corrupted ({err})") from err
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), name)


def timed(tmp: Path, write, *args) -> None:
    """``write(tmp, *args)``, then the seconds it took into ``tmp/timing.json``."""
    start = time.perf_counter()
    write(tmp, *args)
    (tmp / "timing.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 3)}))


def write_bucket(tmp: Path, builder: MemoryBank, key: BucketKey, spec: BankSpec) -> None:
    binding = json.dumps({"bank": builder.fingerprint(), "key": key_to_json(key)})  # written after zarr's mode="w" wipes tmp
    if spec.materialise_max is not None and key.scale > spec.materialise_max:  # type: ignore[operator]
        g = zarr.open_group(str(tmp), mode="w")
        g.attrs["key"] = key_to_json(key)
        n = len(builder.image_ids(key.label)) * key.locations(builder.height, builder.width).shape[0]
        (tmp / "stats.json").write_text(json.dumps({"patches": n, "distinct": None, "index": None, "materialised": False, "bytes": 0}))
        (tmp / BINDING).write_text(binding)
        write_checksums(tmp, {}, [BINDING])
        return
    table = builder.unique_patches(key)
    builder.forget(key)  # keep the builder's memory bounded by one bucket
    g = zarr.open_group(str(tmp), mode="w")
    g.attrs["key"] = key_to_json(key)
    patches = table.patches.numpy()
    chunk_rows = max(1, (1 << 22) // max(1, patches.shape[1] * 2))
    g.create_array("patches", data=patches, chunks=(min(chunk_rows, len(patches)), patches.shape[1]))
    g.create_array("counts", data=table.counts.numpy(), chunks=(min(chunk_rows, len(patches)),))
    arrays = {"patches": patches, "counts": table.counts.numpy()}
    clusters = cluster_patches(table, spec.leaf_size)
    for name in ("order", "offsets", "centres", "radii", "max_log_count"):
        arrays[f"cluster_{name}"] = getattr(clusters, name).numpy()
        g.create_array(f"cluster_{name}", data=arrays[f"cluster_{name}"])
    stats: dict[str, int | str | None] = {"patches": table.total, "distinct": len(patches), "index": None}
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


def key_to_json(key: BucketKey) -> dict:
    d = asdict(key)
    d["dictionary"] = list(key.dictionary)
    return d


def key_from_json(d: dict) -> dict:
    return {**d, "dictionary": tuple(d["dictionary"])}
