"""What keeps a bank honest: per-array checksums written with each bucket, and one build at a time.

Every array a bucket stores (and its FAISS index file) gets a SHA-256 over its dtype, shape and
bytes in ``checksums.json``, written inside the bucket's temporary directory before it is renamed
into place. A missing or damaged zarr chunk reads back as fill values (zeros) without any error
from zarr, so the checksum is what tells: each array is checked when it is first loaded, and
:func:`verify_bucket` checks all of them (``patchbank verify``, and every re-run of a build,
which rebuilds the buckets that fail).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ContextManager

import numpy as np
import zarr

from .atomic import folder_lock

CHECKSUMS = "checksums.json"
LOCK = ".build.lock"


class BankError(RuntimeError):
    """A bank that cannot be used as asked: missing, corrupted, built for other data, or being built."""


class IntegrityError(BankError):
    """An array or file that does not match what the build wrote (message names it)."""


def json_object(f: Path) -> dict:
    """A JSON object from a bank file; a :class:`BankError` naming the file when it is not one."""
    try:
        value = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BankError(f"{f} is corrupted ({err})") from err
    if not isinstance(value, dict):
        raise BankError(f"{f} is corrupted: a JSON object was expected, found {type(value).__name__}")
    return value


def array_checksum(values: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    values = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{values.dtype.str}|{values.shape}|".encode())
    h.update(values.tobytes())
    return h.hexdigest()


def file_checksum(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(bucket_dir: Path, arrays: dict[str, np.ndarray], files: list[str] = ()) -> None:  # type: ignore[assignment]
    """Record the checksums of the arrays just written (as the build holds them) and of ``files`` in the directory."""
    sums = {name: array_checksum(a) for name, a in arrays.items()}
    sums |= {name: file_checksum(bucket_dir / name) for name in files}
    (bucket_dir / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))


def read_checksums(bucket_dir: Path) -> dict[str, str]:
    """The recorded checksums of a bucket; an :class:`IntegrityError` when the file is missing or unreadable."""
    try:
        return json_object(bucket_dir / CHECKSUMS)
    except BankError as err:
        raise IntegrityError(f"{bucket_dir.name}: no readable checksum table ({err})") from None


def load_checked(bucket_dir: Path, group: zarr.Group, name: str, sums: dict[str, str]) -> np.ndarray:
    """Array ``name`` of a bucket's zarr group, verified against its recorded checksum."""
    if name not in sums:
        raise IntegrityError(f"{bucket_dir.name}: no checksum recorded for array {name!r}")
    try:
        values = np.asarray(group[name][:])  # type: ignore[index]  # zarr types a member as Array | Group
    except Exception as err:  # zarr raises several types for missing or damaged metadata
        raise IntegrityError(f"{bucket_dir.name}: array {name!r} is missing or corrupted ({err})") from err
    if array_checksum(values) != sums[name]:
        raise IntegrityError(f"{bucket_dir.name}: array {name!r} does not match its checksum (a chunk is missing or corrupted)")
    return values


def check_file(bucket_dir: Path, name: str, sums: dict[str, str]) -> Path:
    """A bucket's file (e.g. ``index.faiss``), verified against its recorded checksum."""
    path = bucket_dir / name
    if name not in sums:
        raise IntegrityError(f"{bucket_dir.name}: no checksum recorded for {name}")
    if not path.is_file() or file_checksum(path) != sums[name]:
        raise IntegrityError(f"{bucket_dir.name}: {name} is missing or does not match its checksum (truncated or damaged)")
    return path


def verify_bucket(bucket_dir: Path) -> list[str]:
    """Every problem with a stored bucket (empty when all its arrays and files match their checksums)."""
    try:
        sums = read_checksums(bucket_dir)
        group = zarr.open_group(str(bucket_dir), mode="r")
    except Exception as err:
        return [str(err)]
    problems = []
    for name in sorted(sums):
        try:
            if (bucket_dir / name).is_file():
                check_file(bucket_dir, name, sums)
            else:
                load_checked(bucket_dir, group, name, sums)
        except IntegrityError as err:
            problems.append(str(err))
    return problems


def build_lock(path: Path) -> ContextManager[None]:
    """Hold ``path/.build.lock`` (an ``fcntl`` lock with the holder's pid) while a build writes; a second
    build of the same folder fails at once with the holder's pid instead of interleaving writes."""
    return folder_lock(path, LOCK, "built", IntegrityError)
