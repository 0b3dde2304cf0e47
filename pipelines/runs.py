"""What a job's output folder holds: typed configs from JSON (no key silently dropped) and one
record per resumable folder of the run it belongs to, so a re-run with other settings is refused."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Collection
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
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a value of the wrong type or range: name the file it came from
        raise type(err)(f"{where}: {err}") from None


Bound = tuple[float | None, float | None, str]
"""``(low, high, ends)``: a number's allowed interval, ``ends`` one of ``"[]"``, ``"[)"``, ``"(]"``, ``"()"``
(None: no limit on that side)."""


def check_fields(cfg: Any, bounds: dict[str, Bound] | None = None, choices: dict[str, Collection] | None = None,
                 where: str | None = None) -> None:
    """Check every field of a config dataclass against its type hint, then the ``bounds`` and ``choices`` given.

    Nothing is coerced: ``"false"`` is not a bool, ``1.0`` is not an int, ``True`` is not a number; a float
    field takes an int, and must be finite. A bound or choice on a list field applies to each element; None
    always passes them (where the hint allows it). The error names the config, the field and the value."""
    where = where or type(cfg).__name__
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _fits(value, hints[f.name]):
            raise TypeError(f"{where}: {f.name} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})")
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in (v for v in values if v is not None):
            if bounds and f.name in bounds and not _within(v, bounds[f.name]):
                low, high, ends = bounds[f.name]
                interval = f"{ends[0]}{'-inf' if low is None else low}, {'inf' if high is None else high}{ends[1]}"
                raise ValueError(f"{where}: {f.name} must lie in {interval}, got {value!r}")
            if choices and f.name in choices and v not in choices[f.name]:
                raise ValueError(f"{where}: {f.name} must be one of {', '.join(map(repr, choices[f.name]))}, got {v!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (bool, int, float, str, None, unions, lists, tuples, dicts), exactly."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    """A type hint in words: ``int | None`` → "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is tuple:
        if not args or args[-1] is Ellipsis or len(set(args)) > 1:
            return "a list"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null (None)", dict: "an object"}.get(hint, getattr(hint, "__name__", str(hint)))


def _within(value: float, bound: Bound) -> bool:
    low, high, ends = bound
    above = low is None or (value >= low if ends[0] == "[" else value > low)
    below = high is None or (value <= high if ends[1] == "]" else value < high)
    return above and below


def check_run_options(seeds: list[int], steps: int, backend: str, executor: str = "serial", batch: int | None = None) -> None:
    """What every sampling job needs right — seeds, steps, a valid backend and executor spec, a batch size —
    checked before anything is written."""
    if not seeds:
        raise ValueError("give at least one seed")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"seeds must be integers >= 0, got {bad[0]!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed is listed twice")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
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
