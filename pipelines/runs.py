"""What a job's output folder holds: typed configs from JSON (no key silently dropped) and one
record per resumable folder of the run it belongs to, so a re-run with other settings is refused."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from machines import parse_backend
from patchbank.atomic import write_json

from .executors import check_executor

T = TypeVar("T")
RUN_FILE = "run.json"


def config_from_dict(cls: type[T], values: dict, where: str = "config") -> T:
    """A config dataclass from a dict; an unknown key is an error naming it and the closest valid one."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: a JSON object of {cls.__name__} fields was expected, found {type(values).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"{where}: unknown {cls.__name__} key {key!r}{hint}")
    return cls(**values)


def check_run_options(seeds: list[int], steps: int, backend: str, executor: str = "serial", batch: int | None = None) -> None:
    """What every sampling job needs right — seeds, steps, a valid backend and executor spec, a batch size —
    checked before anything is written."""
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed is listed twice")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    parse_backend(backend)
    check_executor(executor)


def seed_labels(label_of: dict[int, int] | None, seeds: list[int]) -> torch.Tensor | None:
    """The labels ``[B]`` of a seed batch from a job's seed → label map (None: unconditional)."""
    return torch.tensor([label_of[s] for s in seeds]) if label_of else None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """JSON from a file; a missing or unreadable file is an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not readable JSON ({err})") from None


def differences(old: dict, new: dict) -> list[str]:
    """The top-level keys whose values differ between two records."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def claim_folder(folder: str | os.PathLike, record: dict) -> None:
    """Record in ``folder/run.json`` what run a resumable folder holds, or check that this run is that run.

    A folder written by a run with other settings is refused with the settings that differ named
    (its results would otherwise be mixed into this run's, silently)."""
    f = Path(folder) / RUN_FILE
    record = json.loads(json.dumps(record))  # as it reads back (tuples as lists)
    if f.exists():
        old = read_json(f, "run record")
        diff = differences(old if isinstance(old, dict) else {}, record)
        if diff:
            raise ValueError(f"{folder} holds results of another run (differs in: {', '.join(diff)}); "
                             "use another --out or delete it")
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(f, record)
