"""One registry of posterior backends: a spec string → a backend, for the API, the CLI, configs and ablations.

A spec is ``kind[:option=value…]`` in the grammar of :mod:`patchbank.specs` (a text option's value may hold colons:
``sharded:placement=ray:HOST:PORT``),
e.g. ``exact``, ``exact:dtype=float32``, ``topk:k=256:tol=1e-4``,
``topk:k=256:index=IVF256,Flat:nprobe=16``, ``auto:se_tol=0.005``, ``summary:tol=1e-3:leaf_size=256``.
A kind's options are its backend's own fields (``k``, ``tol``, …). The options of the exact
backend a kind falls back to are reached by name where the kind has no option of that name
(``auto:dtype=float32``: the fallback sums in float32) and always as ``exact.<option>``.
Values: integers, floats, ``none`` for an optional value, ``float32``/``float64`` for dtypes,
``1/0``, ``true/false`` for flags. ``patchbank backends`` lists every kind with its options.

A new backend touches its own module and one :func:`register` call below.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args, get_origin

import torch

from patchbank.specs import split_spec

from .auto import AutoBackend
from .base import Backend
from .exact import ExactBackend
from .shards import ShardedBackend
from .summary import SummaryBackend
from .tail import SampledTailBackend
from .topk import TopKBackend

_NESTED = "exact"  # the field holding the exact backend a kind falls back to


@dataclass(frozen=True)
class Option:
    """One option of a backend kind: its field, how a string becomes its value, its default."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    kind: str  # a readable type, for the listing

    def __call__(self, text: str) -> Any:
        try:
            return self.parse(text)
        except ValueError as err:
            raise ValueError(f"option {self.name}: {err}") from None


@dataclass(frozen=True)
class Entry:
    """A registered backend kind."""

    kind: str
    cls: type
    about: str
    options: dict[str, Option]
    nested: dict[str, Option]  # options of the exact fallback (empty for exact itself)

    @property
    def stats(self) -> type:
        """The backend's statistics class (the type of its ``stats`` field)."""
        return typing.get_type_hints(self.cls)["stats"]


BACKENDS: dict[str, Entry] = {}


def register(kind: str, cls: type, about: str) -> None:
    """Make ``cls`` (a dataclass backend) available as ``kind``; its simple fields become its options."""
    nested = _options(ExactBackend) if any(f.name == _NESTED for f in dataclasses.fields(cls)) else {}
    BACKENDS[kind] = Entry(kind, cls, about, _options(cls), nested)


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec: the kind and the options given (as values); ``text`` is the spec as written."""

    kind: str
    options: dict[str, Any]
    nested: dict[str, Any]
    text: str

    def build(self) -> Backend:
        """A fresh backend (its own statistics) for this spec."""
        entry = BACKENDS[self.kind]
        values = dict(self.options)
        if self.nested:  # the kind's own default fallback, with the options given
            default = next(f for f in dataclasses.fields(entry.cls) if f.name == _NESTED).default_factory()  # type: ignore[operator]
            values[_NESTED] = dataclasses.replace(default, **self.nested)
        return entry.cls(**values)

    def __str__(self) -> str:
        return self.text


def parse_backend(spec: str) -> BackendSpec:
    """Parse ``kind[:option=value…]``; unknown kinds, unknown options and bad values are errors naming them."""
    kind, items = split_spec(spec, "backend", text_option=_text_option)
    if kind not in BACKENDS:
        raise ValueError(f"backend spec {spec!r}: unknown kind {kind!r}; choose from {', '.join(BACKENDS)}")
    entry = BACKENDS[kind]
    own: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for name, value in items:
        target, option = _resolve(entry, name, own, nested)
        if option is None:
            valid = sorted(entry.options) + [f"{_NESTED}.{n}" for n in sorted(entry.nested)]
            raise ValueError(f"backend spec {spec!r}: {kind} has no option {name!r}; its options: {', '.join(valid)}")
        try:
            target[option.name] = option(value)
        except ValueError as err:
            raise ValueError(f"backend spec {spec!r}: {err}") from None
    parsed = BackendSpec(kind, own, nested, spec.strip())
    try:  # the backend's own checks, now, with the spec in the message
        parsed.build()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"backend spec {spec!r}: {err}") from None
    return parsed


def _text_option(kind: str, name: str) -> bool:
    """Whether a kind's option takes text (its value may then hold colons: ``placement=ray:10.0.0.1:6379``)."""
    entry = BACKENDS.get(kind)
    return entry is not None and getattr(entry.options.get(name), "kind", None) == "str"


def make_backend(spec: str | Backend) -> Backend:
    """A backend from a spec string (a backend object is returned as it is)."""
    return parse_backend(spec).build() if isinstance(spec, str) else spec


def describe_backends() -> str:
    """Every registered kind with its options and their defaults (what ``patchbank backends`` prints)."""
    lines = []
    for entry in BACKENDS.values():
        lines.append(f"{entry.kind}: {entry.about}")
        for opt in entry.options.values():
            lines.append(f"    {opt.name}={_show(opt.default)}  ({opt.kind})")
        if entry.nested:
            lines.append(f"    {_NESTED}.<option>: options of exact for its fallback sums "
                         f"({', '.join(sorted(entry.nested))}; by name where {entry.kind} has no option of that name)")
    return "\n".join(lines)


def _resolve(entry: Entry, name: str, own: dict, nested: dict) -> tuple[dict, Option | None]:
    """The dict a named option's value goes in (the kind's own, or its exact fallback's) and the option."""
    if name.startswith(_NESTED + "."):
        return nested, entry.nested.get(name[len(_NESTED) + 1 :])
    if name in entry.options:
        return own, entry.options[name]
    return nested, entry.nested.get(name)


def _options(cls: type) -> dict[str, Option]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        parse = _parser(hints[f.name])
        if parse is None:  # statistics, nested backends: not settable from a string
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        out[f.name] = Option(f.name, parse[0], default, parse[1])
    return out


def _parser(tp: Any) -> tuple[Callable[[str], Any], str] | None:
    """A string parser and a readable type name for a field type, or None when a string cannot set it."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp):
        inner = _parser(args[0]) if len(args) == 1 else None
        if inner is None:
            return None
        return (lambda s: None if s.lower() == "none" else inner[0](s)), f"{inner[1]} or none"
    if get_origin(tp) is Literal:
        choices = [str(c) for c in get_args(tp)]
        return (lambda s: _choice(s, choices)), "|".join(choices)
    if tp is bool:
        return _flag, "flag"
    if tp is int:
        return _int, "int"
    if tp is float:
        return float, "float"
    if tp is str:
        return str, "str"
    if tp is torch.dtype:
        return (lambda s: getattr(torch, _choice(s, ["float32", "float64"]))), "float32|float64"
    return None


def _choice(s: str, choices: list[str]) -> str:
    if s not in choices:
        raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
    return s


def _flag(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{s!r} is not a flag (1/0, true/false)")


def _int(s: str) -> int:
    value = float(s)
    if value != int(value):
        raise ValueError(f"{s!r} is not an integer")
    return int(value)


def _show(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return "none" if value is None else str(value)


register("exact", ExactBackend, "every entry summed exactly (streaming log-sum-exp; clusters pruned to prune_tol)")
register("topk", TopKBackend, "the k nearest distinct patches, certified bound on the rest, exact where it exceeds tol")
register("tail", SampledTailBackend, "exact top-k head + importance-sampled tail (statistical: standard errors)")
register("summary", SummaryBackend, "whole clusters summarised or dropped where a per-pixel bound certifies it, the rest exact")
register("sharded", ShardedBackend, "the bucket split over shards (one per device), each summed exactly or top-k certified, merged exactly")
register("auto", AutoBackend, "shared importance draws per bucket, accepted per pixel by SE and ESS, the rest exact")
