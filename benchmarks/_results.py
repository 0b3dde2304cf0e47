"""Per-seed benchmark results kept in a folder, tagged with the options that produced them, and
the timed, resumable per-seed sampling that fills it.

A long benchmark (hours at 60,000 images) writes each seed's result as soon as it is done
(atomically) and skips it on a re-run; a folder written with other options is refused rather
than mixed. Shared by ``bench_policy.py`` and ``bench_topk.py``, so one folder of exact
references serves both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from machines import ScoreMachine, StepRecorder, sample
from patchbank.atomic import atomic_write, read_torch

EXACT_TAG = ("dataset", "n_train", "resize", "schedule", "steps", "exact_dtype")  # the options an exact reference depends on


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
        saved = read_torch(path, "stored result")
        if not isinstance(saved, dict) or saved.get("tag") != self.tags[kind]:
            raise SystemExit(f"{path} was written with other options ({saved.get('tag')}), "
                             f"not {self.tags[kind]}; use another folder")
        return saved

    def save(self, kind: str, seed: int, result: dict) -> None:
        atomic_write(self.path(kind, seed), lambda tmp: torch.save(result | {"tag": self.tags[kind]}, tmp))


def timed_sample(machine: ScoreMachine, noise: torch.Tensor, steps: int, backend=None, checkpoint: Path | None = None,
                 progress: bool | None = None) -> tuple[torch.Tensor, list[dict]]:
    """A DDIM sample plus one record per step computed here (:class:`machines.StepRecorder`: step, t, P,
    seconds and, with ``backend``, its statistics for that step). A sample resumed from ``checkpoint``
    has records for the steps it computed only."""
    recorder = StepRecorder(machine, backend)
    x = sample(machine, noise, steps, callback=recorder, checkpoint=checkpoint,
               progress=checkpoint is not None if progress is None else progress)
    return x, recorder.records


def run_seed(out: Results | None, kind: str, seed: int, run: Callable[[Path | None], tuple[torch.Tensor, list[dict]]]) -> dict:
    """The stored result of ``kind`` for ``seed``, or else ``run(checkpoint)``'s (final, step records),
    timed, stored in ``out`` (when given) and its checkpoint removed: ``final``, ``seconds``,
    ``resumed`` (whether it continued an interrupted sample) and ``steps``."""
    cached = out.load(kind, seed) if out else None
    if cached is not None:
        print(f"seed {seed}: {kind} result read from {out.dir}", flush=True)  # type: ignore[union-attr]
        return cached
    ckpt = out.checkpoint(kind, seed) if out else None
    resumed = ckpt is not None and ckpt.exists()
    start = time.perf_counter()
    final, steps = run(ckpt)
    result = {"final": final, "seconds": time.perf_counter() - start, "resumed": resumed, "steps": steps}
    if out:
        out.save(kind, seed, result)
        ckpt.unlink()  # type: ignore[union-attr]
    print(f"seed {seed}: {kind} {result['seconds']:.1f} s{' (resumed)' if resumed else ''}", flush=True)
    return result
