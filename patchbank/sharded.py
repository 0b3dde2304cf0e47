"""A bank in shards: contiguous parts of the training images, each a complete :class:`PatchBank` of its own.

Layout of a sharded bank directory::

    shards.json        format, the whole data's fingerprint, shape and labels' count, the build spec, and per
                       shard: its folder, image range [lo, hi), data fingerprint and manifest digest
                       (:func:`manifest_digest`: every bucket's checksum table, through the manifest)
    shard-00/ …        one PatchBank per shard (images lo..hi−1 of the data), built and resumable on its own

A posterior over the whole bank is the exact merge of every shard's partial sums (running maximum, Σw,
Σw·v; :mod:`machines.posterior.shards`), so a shard can live on another machine: a worker opens its own
shard read-only and never the others. :class:`ShardedBank` is what the caller holds: the geometry, the
labels and the shards' identities, no images. Opening it checks every shard against ``shards.json``
(its data fingerprint and manifest digest), so a shard from another bank is refused naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

from .atomic import write_json
from .bank import BankSpec, PatchBank
from .base import Bank
from .datasets import ImageData
from .integrity import BankError, json_object

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = 1


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous image ranges ``[lo, hi)`` covering ``0..n−1``, sizes differing by at most one."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= n:
        raise ValueError(f"shards must be an integer in [1, {n}] (the number of images), got {shards!r}")
    return [(j * n // shards, (j + 1) * n // shards) for j in range(shards)]


def shard_name(j: int) -> str:
    return f"shard-{j:02d}"


@dataclass(frozen=True)
class ShardJob:
    """What building one shard needs (sent to a worker once): the data, the bank's folder, the spec, the ranges."""

    data: ImageData
    path: str
    spec: BankSpec
    ranges: tuple[tuple[int, int], ...]


def build_shard(job: ShardJob, j: int) -> dict:
    """Build (or resume) shard ``j``: a PatchBank of images ``lo..hi−1``; returns its entry of ``shards.json``."""
    lo, hi = job.ranges[j]
    part = job.data.subset(indices=torch.arange(lo, hi))
    folder = Path(job.path) / shard_name(j)
    PatchBank.build(part, folder, job.spec, progress=False)
    return {"name": shard_name(j), "range": [lo, hi], "fingerprint": part.fingerprint(), "digest": manifest_digest(folder)}


def manifest_digest(folder: Path) -> str:
    """SHA-256 of a shard's manifest without its build time: the same for every build of the same shard (the
    manifest names the data's fingerprint, the spec and every bucket's checksum table)."""
    manifest = {k: v for k, v in json_object(folder / "manifest.json").items() if k != "build_seconds"}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


MapShards = Callable[[Callable[[ShardJob, int], dict], ShardJob, Sequence[int], Callable[[int, dict], None]], None]
"""Runs ``fn(job, j)`` for every shard index and calls ``done(j, entry)`` here as each finishes (an executor's map)."""


class ShardedBank(Bank):
    """The caller's view of a sharded bank: geometry, labels and the shards' identities (no images, no tables).

    Machines on it need a backend that sums shard by shard (``sharded``, whose ``placement`` says where the
    shards are opened: here, or as Ray actors). Every patch-serving method is an error naming that."""

    def __init__(self, path: Path, record: dict, labels: torch.Tensor) -> None:
        self.path = Path(path)
        self.record = record
        super().__init__(_NoImages(tuple(record["image_shape"]), labels, record.get("dataset", "unnamed"), record["fingerprint"]),  # type: ignore[arg-type]
                         dedup=True)
        self._fingerprint = record["fingerprint"]
        self.spec = BankSpec(**record["spec"])
        self.index_spec, self.leaf_size = self.spec.index, self.spec.leaf_size

    @property
    def shards(self) -> list[dict]:
        """Every shard's entry: ``name``, ``range`` [lo, hi), data ``fingerprint``, manifest ``digest``."""
        return self.record["shards"]

    def shard_path(self, j: int) -> Path:
        return self.path / self.shards[j]["name"]

    # ---- build and open ----------------------------------------------------------------------
    @classmethod
    def build(cls, data: ImageData, path: str | os.PathLike, spec: BankSpec, shards: int,
              map_shards: MapShards | None = None) -> ShardedBank:
        """Build (or resume) a bank of ``data`` in ``shards`` contiguous parts at ``path``, one PatchBank each,
        through ``map_shards`` (default: here, one after another; an executor's ``map`` runs them on its workers,
        which must see ``path``). Each shard resumes on its own; ``shards.json`` is written when all are done."""
        path = Path(path)
        ranges = tuple(shard_ranges(len(data), shards))
        record: dict[str, Any] = {"format": SHARDS_FORMAT, "dataset": data.name, "n_images": len(data), "image_shape": list(data.shape),
                  "fingerprint": data.fingerprint(), "spec": asdict(spec), "complete": False,
                  "shards": [{"name": shard_name(j), "range": list(r)} for j, r in enumerate(ranges)]}
        if path.exists() and not path.is_dir():
            raise BankError(f"{path} is a file, not a folder for a bank")
        if (path / SHARDS_FILE).exists():
            old = json_object(path / SHARDS_FILE)
            diff = [k for k in ("format", "fingerprint", "spec", "n_images") if old.get(k) != record[k]]
            if diff or [s["range"] for s in old.get("shards", [])] != [s["range"] for s in record["shards"]]:
                raise BankError(f"{path} holds a sharded bank of other data or settings (differs in: "
                                f"{', '.join(diff) or 'shards'}); choose another path or delete it")
        elif path.is_dir() and any(path.iterdir()):
            raise BankError(f"{path} is a non-empty folder that is not a sharded bank; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / SHARDS_FILE, record)
        entries: dict[int, dict] = {}
        job = ShardJob(data, str(path), spec, ranges)
        if map_shards is None:
            for j in range(len(ranges)):
                entries[j] = build_shard(job, j)
        else:
            map_shards(build_shard, job, list(range(len(ranges))), lambda j, entry: entries.__setitem__(j, entry))
        record["shards"] = [entries[j] for j in range(len(ranges))]
        record["complete"] = True
        write_json(path / SHARDS_FILE, record)
        return cls.open(path, expect=data)

    @classmethod
    def open(cls, path: str | os.PathLike, expect: ImageData | None = None) -> ShardedBank:
        """Open a built sharded bank: ``shards.json`` and every shard's manifest and labels (no images); a shard
        whose manifest or data is not the one recorded is an error naming it. ``expect``: the data it must be of."""
        path = Path(path)
        if not (path / SHARDS_FILE).is_file():
            raise BankError(f"{path} is not a sharded bank (no {SHARDS_FILE})")
        record = json_object(path / SHARDS_FILE)
        if record.get("format") != SHARDS_FORMAT:
            raise BankError(f"{path}: sharded bank format {record.get('format')}, this code reads {SHARDS_FORMAT}")
        if not record.get("complete"):
            raise BankError(f"{path}: the build did not finish; re-run the same build to resume it")
        if expect is not None and expect.fingerprint() != record["fingerprint"]:
            raise BankError(f"{path} was built for other data (fingerprint {record['fingerprint'][:12]}…), not for the "
                            f"{len(expect)} images given")
        labels = []
        for entry in record["shards"]:
            folder = path / entry["name"]
            if not isinstance(entry.get("name"), str) or "/" in entry["name"] or entry["name"].startswith("."):
                raise BankError(f"{path / SHARDS_FILE} is corrupted: {entry.get('name')!r} is not a shard folder")
            check_shard(folder, entry)
            labels.append(_labels_of(folder))
        joined = torch.cat(labels)
        if joined.numel() != record["n_images"]:
            raise BankError(f"{path}: the shards hold {joined.numel()} images, {SHARDS_FILE} says {record['n_images']}")
        return cls(path, record, joined)

    def identity(self) -> dict:
        return {"sharded_bank": self._fingerprint, "shards": [s["fingerprint"] for s in self.shards]}

    def info(self) -> dict:
        """The record of ``shards.json`` with each shard's :meth:`PatchBank.info` (its per-scale sizes and build times)."""
        return {**{k: v for k, v in self.record.items() if k != "shards"},
                "shards": [{**s, **PatchBank.open(self.shard_path(j)).info()} for j, s in enumerate(self.shards)]}

    def verify(self) -> dict[str, list[str]]:
        """Every shard's :meth:`PatchBank.verify`, the bucket names prefixed with the shard's."""
        return {f"{s['name']}/{bucket}": found for j, s in enumerate(self.shards)
                for bucket, found in PatchBank.open(self.shard_path(j)).verify().items()}

    def __reduce__(self):
        return _reopen, (str(self.path), self._fingerprint)

    # ---- nothing is served here -----------------------------------------------------------------
    def _elsewhere(self, *args, **kwargs):
        raise BankError(f"{self.path} is a sharded bank: its patches live on its shards; sum them with the sharded backend "
                        "(backend='sharded', placement=local or ray)")

    materialised = unique_patches = clustered = search = stream = sample_patches = padded = image_stream = _elsewhere
    image_statistics = _elsewhere


def open_bank(path: str | os.PathLike, expect: ImageData | None = None) -> PatchBank | ShardedBank:
    """A built bank at ``path``: a :class:`ShardedBank` where it holds ``shards.json``, else a :class:`PatchBank`."""
    if (Path(path) / SHARDS_FILE).is_file():
        return ShardedBank.open(path, expect)
    return PatchBank.open(path, expect)


def check_shard(folder: Path, entry: dict) -> None:
    """A shard's folder must hold the bank ``shards.json`` recorded: its manifest's digest and data fingerprint."""
    manifest = folder / "manifest.json"
    if folder.is_symlink() or not manifest.is_file():
        raise BankError(f"{folder}: shard {entry.get('name')} is missing (or a symlink); re-run the same build")
    if manifest_digest(folder) != entry.get("digest") or json_object(manifest).get("fingerprint") != entry.get("fingerprint"):
        raise BankError(f"{folder}: shard {entry.get('name')} is not the shard this bank was built with (another bank's, or "
                        "rebuilt with other data); re-run the same build to repair it")


def _labels_of(folder: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.asarray(zarr.open_group(str(folder / "data.zarr"), mode="r")["labels"][:]))  # type: ignore[index]
    except Exception as err:
        raise BankError(f"{folder}: the shard's labels are missing or corrupted ({err})") from err


def _reopen(path: str, fingerprint: str) -> ShardedBank:
    bank = ShardedBank.open(path)
    if bank.fingerprint() != fingerprint:
        raise BankError(f"{path} holds another sharded bank than the one sent to this worker")
    return bank


class _NoImages:
    """The data of a sharded bank as its caller sees it: shape, labels, name and fingerprint, but no images."""

    def __init__(self, shape: tuple[int, int, int], labels: torch.Tensor, name: str, fingerprint: str) -> None:
        self.shape, self.labels, self.name, self._fingerprint = shape, labels, name, fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def images(self) -> torch.Tensor:
        raise BankError("a sharded bank's images live on its shards")
