"""Theory vs network: run the network, the calibrated machine and the IS baseline from the same
noise on the same grid, and compare final images per seed (DESIGN §2 agreement metrics).

Results are appended seed batch by seed batch (``per_seed.jsonl`` and ``samples.pt``, each
written through a temporary name), so an interrupted evaluation resumes where it stopped. The
folder's ``run.json`` records which network, machine, baseline and steps its results belong to
(their identities: weights hash, schedule, data fingerprint, backend); a re-run with any of them
changed is refused instead of mixing old results into the new report.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import torch

from machines import Denoiser, identity_of, noise_from_seeds, sample
from patchbank.atomic import atomic_write, write_json

from .executors import Executor, make_executor, pending
from .metrics import mse, pearson_r, r2
from .runs import claim_folder, seed_labels


def compare(network: torch.Tensor, machine: torch.Tensor, ideal: torch.Tensor) -> list[dict]:
    """Per-sample metrics of final images ``[B, C, H, W]``: machine and IS against the network."""
    rows = zip(pearson_r(machine, network), r2(machine, network), mse(machine, network),
               pearson_r(ideal, network), r2(ideal, network), mse(ideal, network))
    keys = ("machine_r", "machine_r2", "machine_mse", "is_r", "is_r2", "is_mse")
    return [{k: float(v) for k, v in zip(keys, row)} for row in rows]


def summarise(rows: list[dict]) -> dict:
    """Medians over seeds and the fraction of seeds where the machine beats IS (by Pearson r)."""
    out = {f"median_{k}": statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"}
    out["machine_beats_is"] = sum(r["machine_r"] > r["is_r"] for r in rows) / len(rows)
    out["seeds"] = len(rows)
    return out


def evaluate(
    network: Denoiser,
    machine: Denoiser,
    ideal: Denoiser,
    seeds: Sequence[int],
    shape: Sequence[int],
    out: str | os.PathLike,
    steps: int = 20,
    labels_of: dict[int, int] | None = None,
    batch: int = 10,
    progress: bool = True,
    config: dict | None = None,
    executor: str | Executor | None = None,
) -> dict:
    """Evaluate (or resume) over ``seeds``; writes ``per_seed.jsonl``, ``samples.pt``, ``report.json``
    (the summary, with ``config`` under the key ``config`` when given).

    Seeds run in batches of ``batch`` (``seeds`` in order), on ``executor`` (``serial``, ``processes:N``,
    ``ray[:ADDRESS]``; see :mod:`pipelines.executors`), which receives the three denoisers once per
    worker. Each finished batch is written here as it arrives, so a killed job or worker loses only the
    batches in flight; a re-run computes only the seeds not yet written."""
    out = Path(out)
    claim_folder(out, {"network": identity_of(network), "machine": identity_of(machine), "ideal": identity_of(ideal),
                       "steps": steps, "shape": list(shape), "conditional": labels_of is not None})
    rows = read_rows(out / "per_seed.jsonl")
    samples = torch.load(out / "samples.pt") if (out / "samples.pt").exists() else {}
    todo = pending(seeds, batch, {r["seed"] for r in rows})

    def keep(chunk: list[int], finals: dict[str, torch.Tensor]) -> None:
        for seed, row in zip(chunk, compare(finals["network"], finals["machine"], finals["is"])):
            rows.append({"seed": seed, **row})
        for i, seed in enumerate(chunk):
            samples[seed] = {name: x[i].float() for name, x in finals.items()}
        atomic_write(out / "samples.pt", lambda p: torch.save(samples, p))
        atomic_write(out / "per_seed.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    shared = Trio(network, machine, ideal, steps, tuple(shape), labels_of)
    make_executor(executor).map(final_images, shared, todo, keep, desc="evaluate", progress=progress, size=len)
    order = {s: i for i, s in enumerate(seeds)}
    rows = sorted((r for r in rows if r["seed"] in order), key=lambda r: order[r["seed"]])
    report = summarise(rows)
    if config is not None:
        report["config"] = config
    write_json(out / "report.json", report)
    return report


@dataclass
class Trio:
    """What every evaluation batch needs: the network, the machine and the IS baseline, and the run's grid."""

    network: Denoiser
    machine: Denoiser
    ideal: Denoiser
    steps: int
    shape: tuple[int, ...]
    labels_of: dict[int, int] | None


def final_images(trio: Trio, seeds: list[int]) -> dict[str, torch.Tensor]:
    """The three final images of a seed batch from the same noise: ``{"network", "machine", "is"}`` → ``[B, C, H, W]``."""
    noise = noise_from_seeds(seeds, trio.shape, torch.float64)
    labels = seed_labels(trio.labels_of, seeds)
    return {name: sample(d, noise, trio.steps, labels)
            for name, d in (("network", trio.network), ("machine", trio.machine), ("is", trio.ideal))}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
