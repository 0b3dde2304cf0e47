"""The ``patchbank`` command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from .sampling import SampleConfig, run_sample


def _seeds(text: str) -> list[int]:
    """``0-7`` or ``1,5,9``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchbank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    d = SampleConfig()
    s = sub.add_parser("sample", help="sample images from an analytic machine and save a PNG grid")
    s.add_argument("--dataset", default=d.dataset, help="mnist, fashion_mnist, cifar10, celeba, two_image, random, an .npz or a folder")
    s.add_argument("--resize", type=int, default=d.resize, help="resize to R×R (0 keeps the original size)")
    s.add_argument("--n-train", type=int, default=d.n_train, help="use the first N training images (0 = all)")
    s.add_argument("--machine", default=d.machine, choices=["IS", "ES", "LS", "ELS", "bbELS"])
    s.add_argument("--schedule", default=d.schedule, help="reference scale schedule (see machines/data/scales.json)")
    s.add_argument("--reading", default=d.reading, choices=["calibrated", "paper"])
    s.add_argument("--scale", type=int, default=None, help="a constant patch scale P instead of the schedule")
    s.add_argument("--padding", default=None, choices=["zeros", "circular"])
    s.add_argument("--conditional", action="store_true")
    s.add_argument("--labels", type=_seeds, default=None, help="one label per seed (conditional), e.g. 0,1,2")
    s.add_argument("--seeds", type=_seeds, default=d.seeds, help="e.g. 0-7 or 3,5")
    s.add_argument("--steps", type=int, default=d.steps)
    s.add_argument("--chunk-size", type=int, default=d.chunk_size)
    s.add_argument("--out", default=d.out)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "sample":
        values = {f.name: getattr(args, f.name) for f in fields(SampleConfig)}
        values["resize"] = values["resize"] or None
        values["n_train"] = values["n_train"] or None
        print(run_sample(SampleConfig(**values)))


if __name__ == "__main__":
    main()
