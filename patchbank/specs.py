"""One grammar for every spec string: posterior backends, comparator theories and executors.

A spec is ``kind[:value][:name=value…]``: a kind, then options as ``name=value``. Where a kind has a main option,
its value may stand alone right after the kind (``processes:4`` is ``processes:workers=4``, ``ray:HOST:PORT`` is
``ray:address=HOST:PORT``). A part without ``=`` after a text option belongs to that option's value, so values
may hold colons (``sharded:placement=ray:10.0.0.1:6379``). Each family turns the option texts into values of its
own types; this module only splits.
"""

from __future__ import annotations

from typing import Callable


def split_spec(text: str, family: str, main: Callable[[str], str | None] = lambda kind: None,
               text_option: Callable[[str, str], bool] = lambda kind, name: False) -> tuple[str, list[tuple[str, str]]]:
    """``"kind:a=1:b=x:y"`` → ``("kind", [("a", "1"), ("b", "x:y")])``, options in the order written.

    ``family`` names the kind of spec in errors (``backend``, ``comparator``, ``executor``); ``main(kind)``: the
    option a bare value right after the kind is for (None: none); ``text_option(kind, name)``: whether an option
    takes text, so that parts without ``=`` after it continue its value. A part that is none of these, or an
    option given twice, is an error naming the spec."""
    kind, *parts = [p.strip() for p in text.strip().split(":")]
    if not kind:
        raise ValueError(f"{family} spec {text!r}: no kind given")
    options: list[tuple[str, str]] = []
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if eq:
            options.append((name.strip(), value.strip()))
        elif options and text_option(kind, options[-1][0]):
            options[-1] = (options[-1][0], options[-1][1] + ":" + part)
        elif i == 0 and main(kind) is not None:
            options.append((main(kind), part))  # type: ignore[arg-type]
        else:
            raise ValueError(f"{family} spec {text!r}: {part!r} is not option=value")
    names = [name for name, _ in options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{family} spec {text!r}: {', '.join(twice)} given twice")
    return kind, options
