"""Crash-safe writes: write under a temporary name, then rename into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``: a killed job never leaves a half-written file.

    The temporary name keeps the suffix (``name.tmp.png``), so writers that infer a format from it work.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))
