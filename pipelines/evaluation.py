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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from machines import Denoiser, identity_of, noise_from_seeds, sample
from machines.metrics import mse, pearson_r, peer_r2, r2
from patchbank.atomic import atomic_write, folder_lock, read_torch, write_json

from .executors import Executor, make_executor, pending
from .runs import claim_folder, seed_labels


def metrics(name: str, x: torch.Tensor, network: torch.Tensor) -> list[dict]:
    """Per sample of ``x [B, C, H, W]`` against the network's images: ``<name>_r`` (Pearson), ``<name>_r2`` (R²,
    network as reference), ``<name>_peer_r2`` (the R² of analytic-diffusion-studio and GoldDiff,
    :func:`~machines.metrics.peer_r2`) and ``<name>_mse``."""
    return [{f"{name}_r": float(r), f"{name}_r2": float(q), f"{name}_peer_r2": float(p), f"{name}_mse": float(e)}
            for r, q, p, e in zip(pearson_r(x, network), r2(x, network), peer_r2(x, network), mse(x, network))]


def compare(network: torch.Tensor, machine: torch.Tensor, ideal: torch.Tensor) -> list[dict]:
    """Per-sample :func:`metrics` of final images ``[B, C, H, W]``: the machine and IS against the network."""
    return [{**m, **i} for m, i in zip(metrics("machine", machine, network), metrics("is", ideal, network))]


def summarise(rows: list[dict]) -> dict:
    """Medians over seeds, the means of the peers' R² (what they tabulate), and the fraction of seeds where the machine
    beats IS and each other theory (by Pearson r)."""
    keys = [k for k in rows[0] if k != "seed" and all(k in r for r in rows)]  # theories measured on every seed
    out = {f"median_{k}": statistics.median(r[k] for r in rows) for k in keys}
    out |= {f"mean_{k}": statistics.fmean(r[k] for r in rows) for k in keys if k.endswith("_peer_r2")}
    out["machine_beats_is"] = sum(r["machine_r"] > r["is_r"] for r in rows) / len(rows)
    for name in sorted({k[: -len("_r")] for k in keys if k.endswith("_r")} - {"machine", "is"}):
        out[f"machine_beats_{name}"] = sum(r["machine_r"] > r[f"{name}_r"] for r in rows) / len(rows)
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
    others: dict[str, Denoiser] | None = None,
) -> dict:
    """Evaluate (or resume) over ``seeds``; writes ``per_seed.jsonl``, ``samples.pt``, ``report.json``
    (the summary, with ``config`` under the key ``config`` when given).

    Seeds run in batches of ``batch`` (``seeds`` in order), on ``executor`` (``serial``, ``processes:N``,
    ``ray[:ADDRESS]``; see :mod:`pipelines.executors`), which receives the three denoisers once per
    worker. Each finished batch is written here as it arrives, so a killed job or worker loses only the
    batches in flight; a re-run computes only the seeds not yet written. ``others``: more theories by name
    (comparators such as the Wiener filter), sampled from the same noise and compared with the stored
    network images the same way; each is kept under ``theories/<name>/`` (its own run record), so a
    theory can be added to a finished evaluation without sampling the network or machine again. The folder is
    locked while it runs: a second evaluation into it fails at once."""
    with folder_lock(out, reentrant=True):  # run_evaluate holds it already
        return _evaluate(network, machine, ideal, seeds, shape, Path(out), steps, labels_of, batch, progress, config,
                         executor, others)


def _evaluate(network: Denoiser, machine: Denoiser, ideal: Denoiser, seeds: Sequence[int], shape: Sequence[int], out: Path,
              steps: int, labels_of: dict[int, int] | None, batch: int, progress: bool, config: dict | None,
              executor: str | Executor | None, others: dict[str, Denoiser] | None) -> dict:
    claim_folder(out, {"network": identity_of(network), "machine": identity_of(machine), "ideal": identity_of(ideal),
                       "steps": steps, "shape": list(shape), "conditional": labels_of is not None})
    rows = read_rows(out / "per_seed.jsonl")
    samples = _kept_samples(out / "samples.pt", {r["seed"] for r in rows})
    todo = pending(seeds, batch, {r["seed"] for r in rows})

    def save() -> None:
        atomic_write(out / "samples.pt", lambda p: torch.save(samples, p))
        atomic_write(out / "per_seed.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def keep(chunk: list[int], finals: dict[str, torch.Tensor]) -> None:
        for seed, row in zip(chunk, compare(finals["network"], finals["machine"], finals["is"])):
            rows.append({"seed": seed, **row})
        for i, seed in enumerate(chunk):
            samples[seed] = {name: x[i].float() for name, x in finals.items()}
        save()

    shared = Trio(network, machine, ideal, steps, tuple(shape), labels_of)
    make_executor(executor).map(final_images, shared, todo, keep, desc="evaluate", progress=progress, size=len)
    by_seed = {r["seed"]: r for r in rows}
    for name, theory in (others or {}).items():
        if name in ("network", "machine", "is"):
            raise ValueError(f"{name!r} is taken; name the theory otherwise")
        if not (out / "theories" / name / "run.json").exists():  # a new theory here: no earlier results count as its
            for row in by_seed.values():
                for key in [k for k in row if k in (f"{name}_r", f"{name}_r2", f"{name}_peer_r2", f"{name}_mse")]:
                    del row[key]
            for kept in samples.values():
                kept.pop(name, None)
        claim_folder(out / "theories" / name, {"theory": identity_of(theory), "steps": steps, "shape": list(shape),
                                                "conditional": labels_of is not None})

        def add(chunk: list[int], finals: torch.Tensor, name: str = name) -> None:
            reference = torch.stack([samples[seed]["network"] for seed in chunk]).to(finals.dtype)
            for i, (seed, row) in enumerate(zip(chunk, metrics(name, finals, reference))):
                by_seed[seed].update(row)
                samples[seed][name] = finals[i].float()
            save()

        missing = pending(seeds, batch, {s for s, r in by_seed.items() if f"{name}_r" in r})
        one = Trio(theory, theory, theory, steps, tuple(shape), labels_of)
        make_executor(executor).map(theory_images, one, missing, add, desc=f"evaluate {name}", progress=progress, size=len)
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


def theory_images(job: Trio, seeds: list[int]) -> torch.Tensor:
    """One theory's final images of a seed batch (the theory in ``job.machine``): ``[B, C, H, W]``."""
    noise = noise_from_seeds(seeds, job.shape, torch.float64)
    return sample(job.machine, noise, job.steps, seed_labels(job.labels_of, seeds))


def read_rows(path: Path) -> list[dict]:
    """The per-seed rows of ``per_seed.jsonl`` (none if there is no file); a damaged line is an error naming the file."""
    if not path.exists():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); delete it and samples.pt to evaluate again") from None
    if not all(isinstance(r, dict) and isinstance(r.get("seed"), int) for r in rows):
        raise ValueError(f"{path} holds rows without a seed; delete it and samples.pt to evaluate again")
    return rows


def _kept_samples(path: Path, seeds: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The final images kept in ``samples.pt`` (``{seed: {name: [C, H, W]}}``), which must hold every seed of the
    rows; a damaged, foreign or incomplete file is an error naming it."""
    if not path.exists():
        if seeds:
            raise ValueError(f"{path} is missing but {path.parent / 'per_seed.jsonl'} lists {len(seeds)} seed(s); delete "
                             "the folder's results to evaluate again")
        return {}
    samples = read_torch(path, "evaluation samples")
    if not isinstance(samples, dict) or not all(isinstance(v, dict) for v in samples.values()) or not seeds <= set(samples):
        raise ValueError(f"evaluation samples {path} do not hold the seeds of per_seed.jsonl; delete both to evaluate again")
    return samples
