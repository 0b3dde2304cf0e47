"""Per-seed benchmark results kept in a folder, tagged with the options that produced them.

A long benchmark (hours at 60,000 images) writes each seed's result as soon as it is done
(atomically) and skips it on a re-run; a folder written with other options is refused rather
than mixed. Shared by ``bench_policy.py`` and ``bench_topk.py``, so one folder of exact
references serves both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchbank.atomic import atomic_write


class Results:
    """``DIR/<kind>-seed<n>.pt`` files; ``tags[kind]`` must match what is stored."""

    def __init__(self, folder: str | Path, tags: dict[str, dict]) -> None:
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tags = tags

    def path(self, kind: str, seed: int) -> Path:
        return self.dir / f"{kind}-seed{seed}.pt"

    def checkpoint(self, kind: str, seed: int) -> Path:
        """Where an unfinished sample of this kind and seed keeps its state (see ``sample``)."""
        return self.path(kind, seed).with_suffix(".ckpt")

    def load(self, kind: str, seed: int) -> dict | None:
        """The stored result, None if there is none; SystemExit if it was made with other options."""
        path = self.path(kind, seed)
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=False)
        if saved.get("tag") != self.tags[kind]:
            raise SystemExit(f"{path} was written with other options ({saved.get('tag')}), "
                             f"not {self.tags[kind]}; use another folder")
        return saved

    def save(self, kind: str, seed: int, result: dict) -> None:
        atomic_write(self.path(kind, seed), lambda tmp: torch.save(result | {"tag": self.tags[kind]}, tmp))
