"""Crash-safe writes (a temporary name, then rename; one writer per folder at a time) and reads that cannot run code."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

NEARLY_FULL = 1 << 20
"""Free bytes under which a failed write is taken for a full disk: a write fails for want of space only once the
disk's last free block is taken, and some writers (torch's) report it without the errno (``basic_ios::clear``,
``enforce fail … unexpected pos``)."""


class DiskFullError(OSError):
    """A write failed because the disk holding the file is full (or the quota is spent)."""


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``: a killed job never leaves a half-written file.

    The temporary name is unique to this writer (``name.tmp-<pid>-<random>.png``), so two writers never write
    into one temporary file, and keeps the suffix, so writers that infer a format from it work. A failed write
    removes its temporary file; a full disk is a :class:`DiskFullError` naming the file and the free space."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, (OSError, RuntimeError)) and disk_full(err, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"no space left on the disk holding {path} (writing it failed with {free_bytes(path.parent)} "
                                "bytes free): free some space and re-run; finished work is kept") from err
        raise


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write's error means the disk is full: ENOSPC or EDQUOT, or another writer's error while
    fewer than :data:`NEARLY_FULL` bytes are free."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return free_bytes(folder) < NEARLY_FULL


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the disk holding ``folder`` (-1 if it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def write_json(path: str | os.PathLike, obj: object) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


@contextmanager
def folder_lock(path: str | os.PathLike, name: str = ".lock", doing: str = "written to",
                error: type[Exception] = FolderBusyError, reentrant: bool = False) -> Iterator[None]:
    """Hold ``path/name`` (an ``fcntl`` lock with the holder's pid) while a job writes the folder; a second job
    on the same folder fails at once with ``error`` (:class:`FolderBusyError`) naming the holder's pid instead of
    interleaving its writes. The lock goes with the process that holds it, killed or not (the file stays).
    ``reentrant``: where this process holds it already through a reentrant call (a job inside a job), go on."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = str((path / name).resolve())
    if reentrant and key in _HELD:  # this process holds it already (a job inside a job)
        yield
        return
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise error(f"{path} is being {doing} by another process (pid {holder}); wait for it to "
                                  "finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        if reentrant:
            _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)


_HELD: set[str] = set()  # the lock files this process holds through reentrant calls


def read_torch(path: str | os.PathLike, what: str = "file") -> Any:
    """A file written by ``torch.save``, loaded with ``weights_only=True``: tensors and plain values only (dicts,
    lists, tuples, strings, numbers, None), so that loading it can never run code. A file holding anything else
    is refused, as is a truncated or foreign one: a ``ValueError`` naming ``what`` and the file (missing:
    ``FileNotFoundError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled object (weights_only refuses its GLOBAL), truncated, garbage, another format
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line]
        if isinstance(err, pickle.UnpicklingError) and named:
            raise ValueError(f"{what} {path} holds objects other than tensors and plain values ({named[0][:200]}); refused, "
                             "since loading it could run code (delete it, or re-create it with this version)") from None
        told = [line for line in lines if not line.startswith(("Weights only load failed", "Check the doc", "Please file"))]
        reason = (told or lines or [""])[-1]
        raise ValueError(f"{what} {path} is unreadable ({type(err).__name__}: {reason[:200]}); delete it to start again") from None
