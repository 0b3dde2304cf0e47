"""Running an ablation: the exact reference, every grid configuration in resumable seed batches, the report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from machines import Backend, Denoiser, ScaleSchedule, ScoreMachine, StepRecorder, noise_from_seeds, sample
from machines.comparators import make_comparator
from machines.posterior.topk import TopKBackend
from patchbank import Bank, BankError, BankSpec, ImageData, MemoryBank, PatchBank, load_dataset
from patchbank.atomic import atomic_write, folder_lock, read_torch, write_json

from ..executors import SerialExecutor, batch_for, check_executor, chunks, make_executor
from ..pairing import check_machine_options
from ..runs import read_json
from ..sampling import cycled_labels
from ..shipped import resolve_model
from .certificate import certificate_study
from .concentration import concentration_study
from .config import (
    AblationConfig,
    Variant,
    comparator_of,
    concentration_key,
    held_out,
    part_key,
    reference_variant,
    schedule_of,
    slack,
    slug,
    variant_key,
    without_seeds,
)
from .report import best_configuration, exact_row, make_row, merge_steps, summary_markdown, write_csv
from .resources import PeakMemory, environment


def run_ablation(cfg: AblationConfig, progress: bool = True) -> dict:
    """Run every grid configuration against the exact reference; writes the report under ``cfg.out``.

    The exact reference's seed batches run on ``cfg.executor``; the configurations run here, one after
    another, as their seconds are what the ablation measures.

    Files: ``config.json`` (resolved config + environment; ``patchbank ablate --config`` re-runs
    it), ``rows.csv``, ``results.json`` (rows + per-step records), ``summary.md``,
    ``pareto.png``, ``fallback.png`` and, with the concentration study, ``concentration.json``
    and ``concentration.png``, and with the certificate study (``certificate_ks``), ``certificate.json``. Finished
    configurations are kept under ``variants/`` and skipped when the same run is repeated, so an interrupted ablation resumes.
    """
    cfg.check()
    check_executor(cfg.executor)
    variants = [Variant.parse(g) for g in cfg.grid]
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("the grid lists a configuration twice")
    theory = comparator_of(cfg)
    if theory is None and cfg.machine not in ("LS", "ELS", "bbELS"):
        from machines.comparators import COMPARATORS

        raise ValueError(f"unknown machine {cfg.machine!r}: ablate a patch machine (LS, ELS, bbELS) or a comparator "
                         f"({', '.join(COMPARATORS)})")
    if theory is not None and not theory[2]:
        other = [v.name for v in variants if v.kind != "exact"]
        if other:
            raise ValueError(f"the {theory[0]} comparator computes its posteriors itself, exactly, through no backend; "
                             f"its grid can hold exact entries only, not {', '.join(other)}")
    with folder_lock(cfg.out):  # a second ablation into the same folder fails at once
        return _run_ablation(cfg, variants, theory, progress)


def _run_ablation(cfg: AblationConfig, variants: list[Variant], theory: tuple[str, dict, bool] | None, progress: bool) -> dict:
    out = Path(cfg.out)
    data = load_dataset(cfg.dataset, split="test" if cfg.split == "test" else "train", resize=cfg.resize, limit=cfg.n_train)
    if cfg.model:
        _check_model(cfg, data)
    schedule = schedule_of(cfg)
    key: dict[str, Any] = {"ablation": asdict(cfg), "fingerprint": data.fingerprint()}
    write_json(out / "config.json", {"ablation": asdict(cfg), "environment": environment(), "fingerprint": key["fingerprint"]})
    done_dir = out / "variants"
    done_dir.mkdir(exist_ok=True)
    labels = cycled_labels(data.labels, len(cfg.seeds)) if cfg.conditional else None
    noise = noise_from_seeds(cfg.seeds, data.shape, torch.float64)
    memory_bank = MemoryBank(data, dedup=True, materialise_max=cfg.materialise_max)
    reference = _reference(cfg, memory_bank, schedule, noise, labels, out, key, progress)
    network_final = _network_final(cfg, noise, labels) if cfg.model else None
    rows, steps = [], {}
    for v in variants:
        f = done_dir / (slug(v.name) + ".json")
        result = json.loads(f.read_text()) if f.exists() else {}
        if result.get("key") != variant_key(key, v):
            result = _run_variant(cfg, v, data, memory_bank, schedule, noise, labels, reference, network_final, progress,
                                  done_dir / slug(v.name), key)
            write_json(f, {"key": variant_key(key, v), **result})
        rows.append(result["row"])
        steps[v.name] = result["steps"]
    exact = exact_row(rows)
    for r in rows:  # against the warm exact row when there is one (the reference run also pays one-off table builds)
        base = exact["seconds"] if exact else reference["seconds"]
        r["speedup_vs_exact"] = base / r["seconds"] if r["seconds"] else None
    report = {"config": asdict(cfg), "rows": rows, "steps": steps, "reference_seconds": reference["seconds"],
              "best": best_configuration(rows)}
    if cfg.concentration and theory is None:  # the study is of patch buckets: a comparator has none
        report["concentration"] = _concentration(cfg, memory_bank, schedule, key["fingerprint"], out, progress)
    if cfg.certificate_ks and theory is None:
        report["certificate"] = _certificates(cfg, variants, data, memory_bank, schedule, key["fingerprint"], out, progress)
    write_json(out / "results.json", report)
    write_csv(rows, out / "rows.csv")
    atomic_write(out / "summary.md", lambda p: Path(p).write_text(summary_markdown(report)))
    from ..figures import concentration_heatmap, fallback_curves, pareto_plot

    pareto_plot(rows, out / "pareto.png")
    fallback_curves(steps, out / "fallback.png")
    if "concentration" in report:
        concentration_heatmap(report["concentration"], out / "concentration.png")
    return report


def _concentration(cfg: AblationConfig, bank: Bank, schedule: ScaleSchedule, fingerprint: str, out: Path, progress: bool) -> list:
    """The concentration cells, kept in ``concentration.json`` across re-runs (they depend on neither grid nor seeds)."""
    ckey = concentration_key(cfg, schedule, fingerprint)
    f = out / "concentration.json"
    kept = json.loads(f.read_text()) if f.exists() else {}
    if kept.get("key") != ckey:
        kept = {"key": ckey, "cells": concentration_study(bank, cfg.machine, cfg.concentration_times, ckey["scales"], held_out(cfg),
                                                          cfg.concentration_pixels, cfg.concentration_mass, progress=progress)}
        write_json(f, kept)
    return kept["cells"]


def _certificates(cfg: AblationConfig, variants: list[Variant], data: ImageData, memory_bank: MemoryBank, schedule: ScaleSchedule,
                  fingerprint: str, out: Path, progress: bool) -> list:
    """The certificate study's cells for the grid's top-k entries, kept in ``certificate.json`` across re-runs."""
    entries: list[tuple[str, TopKBackend]] = []
    for v in variants:
        backend = v.backend()
        if isinstance(backend, TopKBackend):
            entries.append((v.name, backend))
    times = cfg.certificate_times or cfg.concentration_times
    ckey = {"fingerprint": fingerprint, "entries": [name for name, _ in entries], "ks": cfg.certificate_ks, "times": times,
            "schedule": schedule.to_json(), "pixels": cfg.concentration_pixels, "machine": cfg.machine,
            "materialise_max": cfg.materialise_max}
    f = out / "certificate.json"
    kept = json.loads(f.read_text()) if f.exists() else {}
    if kept.get("key") != ckey:
        banks = [(name, backend, _bank_for(cfg, backend, data, memory_bank, schedule, progress)) for name, backend in entries]
        kept = {"key": ckey, "cells": certificate_study(banks, cfg.machine, times, schedule, held_out(cfg), cfg.certificate_ks,
                                                        cfg.concentration_pixels, progress=progress)}
        write_json(f, kept)
    return kept["cells"]


def _machine(cfg: AblationConfig, bank: Bank, schedule: ScaleSchedule, backend: Backend) -> Denoiser:
    """The ablated machine with ``backend``: a patch machine on the schedule, or a comparator (the smoothed closed
    form's IS posteriors go through the backend; the other comparators compute theirs exactly without one)."""
    theory = comparator_of(cfg)
    if theory is None:
        return ScoreMachine(bank, cfg.machine, scales=schedule, conditional=cfg.conditional, backend=backend)  # type: ignore[arg-type]
    return make_comparator(cfg.machine, bank, cfg.conditional, backend)


def _reference(cfg, bank, schedule, noise, labels, out: Path, key: dict, progress: bool) -> dict:
    """The exact run: states x_i, estimates x̂0_i and final samples (cached in ``reference.pt``).

    Seeds are sampled in batches of ``cfg.reference_batch`` (default: all at once, the same batch
    as the exact row, so that row differs by exactly zero) and each seed is kept in
    ``reference/seed{n}.pt`` as soon as its batch is done (a sample depends only on its own seed,
    up to float round-off from the batch shape), so an interrupted reference — ~20–30 min per seed
    at 60,000 images — resumes with the seeds it finished, and adding seeds reuses them."""
    f = out / "reference.pt"
    ref_variant = reference_variant(cfg)
    ref_key = variant_key(key, ref_variant)
    if f.exists():
        ref = read_torch(f, "ablation reference")
        if isinstance(ref, dict) and ref.get("key") == ref_key:
            return ref
    machine = _machine(cfg, bank, schedule, ref_variant.backend())
    parts_dir = out / "reference"
    parts_dir.mkdir(exist_ok=True)
    parts: dict[int, dict] = {}
    keys = {}
    for n, seed in enumerate(cfg.seeds):
        keys[n] = {**without_seeds(ref_key), "seed": seed, "label": None if labels is None else int(labels[n])}
        pf = parts_dir / f"seed{seed}.pt"
        part = read_torch(pf, "reference seed") if pf.exists() else None
        if isinstance(part, dict) and part.get("key") == keys[n]:
            parts[n] = part
    missing = [n for n in range(len(cfg.seeds)) if n not in parts]
    step = cfg.reference_batch or batch_for(None, cfg.executor) or max(1, len(missing))

    def keep(batch: list[int], run: dict) -> None:
        for j, n in enumerate(batch):  # one file per seed; the batch's seconds shared out evenly
            part = {"key": keys[n], "final": run["final"][j : j + 1], "seconds": run["seconds"] / len(batch),
                    "inputs": [x[j : j + 1] for x in run["inputs"]], "x0": [x[j : j + 1] for x in run["x0"]]}
            atomic_write(parts_dir / f"seed{cfg.seeds[n]}.pt", lambda p: torch.save(part, p))
            parts[n] = part

    executor = make_executor(cfg.executor)
    job = _Reference(machine, noise, labels, cfg.steps, progress and isinstance(executor, SerialExecutor))
    executor.map(reference_batch, job, chunks(missing, step), keep, desc="exact reference", progress=progress, size=len)
    ordered = [parts[n] for n in range(len(cfg.seeds))]
    ref = {"key": ref_key, "final": torch.cat([p["final"] for p in ordered]), "seconds": sum(p["seconds"] for p in ordered),
           "inputs": [torch.cat([p["inputs"][i] for p in ordered]) for i in range(cfg.steps)],
           "x0": [torch.cat([p["x0"][i] for p in ordered]) for i in range(cfg.steps)]}
    atomic_write(f, lambda p: torch.save(ref, p))
    return ref


@dataclass
class _Reference:
    """What every batch of the exact reference needs: its machine, all seeds' noise and labels, the steps."""

    machine: Denoiser
    noise: torch.Tensor
    labels: torch.Tensor | None
    steps: int
    progress: bool = False


def reference_batch(job: _Reference, batch: list[int]) -> dict:
    """The exact run of the seeds at positions ``batch``: see :func:`_reference_run`."""
    idx = torch.tensor(batch)
    return _reference_run(job.machine, job.steps, job.noise[idx], None if job.labels is None else job.labels[idx], job.progress)


def _reference_run(machine: Denoiser, steps: int, noise: torch.Tensor, labels: torch.Tensor | None, progress: bool) -> dict:
    """Exact trajectories of a batch of seeds: the state each step was applied to, its x̂0, the final samples, seconds."""
    states, x0s = [], []

    def record(step, t, x, x0):
        x0s.append(x0.clone())
        states.append(x.clone())

    start = time.perf_counter()
    final = sample(machine, noise, steps, labels, callback=record, progress=progress)
    return {"inputs": [noise] + states[:-1], "x0": x0s, "final": final, "seconds": time.perf_counter() - start}


def _check_model(cfg: AblationConfig, data: ImageData) -> None:
    """The trained network must fit the ablation's machine: same data, padding rule and conditioning."""
    assert cfg.model is not None
    train_cfg = read_json(Path(resolve_model(cfg.model)).parent / "config.json", "the model's training config")
    check_machine_options(train_cfg, cfg.model, machine=cfg.machine, conditional=cfg.conditional,
                          fingerprint=data.fingerprint(), data_name=f"the ablation's data ({cfg.dataset}, {len(data)} images)")


def _network_final(cfg: AblationConfig, noise: torch.Tensor, labels) -> torch.Tensor:
    from ..training import load_network

    network = load_network(cfg.model, device="cpu")  # type: ignore[arg-type]
    return sample(network, noise.to(torch.float32), cfg.steps, labels).to(torch.float64)


def _bank_for(cfg: AblationConfig, backend: Backend, data: ImageData, memory_bank: MemoryBank, schedule: ScaleSchedule,
              progress: bool) -> Bank:
    """The in-memory bank, or — for a backend that searches a FAISS index — a bank with that index (built once, reused).
    A comparator's posteriors are over whole images, which no index serves: it always gets the in-memory bank."""
    if backend.index is None or comparator_of(cfg) is not None:
        return memory_bank
    path = Path(cfg.banks) / f"{data.name}-{data.fingerprint()[:12]}-{cfg.machine}-{slug(backend.index)}-m{cfg.materialise_max or 0}"
    spec = BankSpec(scales=sorted(set(schedule.scales)), rules=[cfg.machine], labels=cfg.conditional, index=backend.index,
                    materialise_max=cfg.materialise_max)
    if (path / "manifest.json").exists():
        try:
            return PatchBank.open(path, expect=data)
        except BankError:  # unfinished or other build: build resumes it, or says why it cannot
            pass
    return PatchBank.build(data, path, spec, progress=progress)


def _run_variant(cfg, v: Variant, data, memory_bank, schedule, noise, labels, reference, network_final, progress,
                 parts_dir: Path | None = None, key: dict | None = None) -> dict:
    """One configuration over all seeds, in seed batches of ``cfg.variant_batch`` (each kept under
    ``parts_dir`` when done); its row and merged per-step records."""
    backend = v.backend()
    machine = None

    def ready():  # built only when a seed batch has to be sampled: merging finished batches costs nothing
        nonlocal machine
        if machine is None:
            machine = _machine(cfg, _bank_for(cfg, backend, data, memory_bank, schedule, progress), schedule, backend)
            machine(noise[:1].to(v.device), 1.0, labels[:1].to(v.device) if labels is not None else None)  # warm caches untimed
        return machine

    n = len(cfg.seeds)
    size = cfg.variant_batch or n
    parts = []
    for s in range(0, n, size):  # seed batches, each kept as soon as it is done when parts_dir is given
        idx = list(range(s, min(n, s + size)))
        pkey = None if key is None else part_key(key, v, [cfg.seeds[i] for i in idx], None if labels is None else labels[idx].tolist())
        pf = None if parts_dir is None else parts_dir / f"seeds-{cfg.seeds[idx[0]]}-{cfg.seeds[idx[-1]]}.pt"
        part = read_torch(pf, "configuration's seed batch") if pf is not None and pf.exists() else None
        if not isinstance(part, dict) or part.get("key") != pkey:
            part = {"key": pkey, **_variant_batch(cfg, v, ready(), backend, noise[idx],
                                                  None if labels is None else labels[idx], reference, idx, progress)}
            if pf is not None:
                pf.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(pf, lambda p: torch.save(part, p))
        parts.append(part)
    steps = [merge_steps([p["steps"][i] for p in parts]) for i in range(len(parts[0]["steps"]))]
    mem = PeakMemory(v.device)
    mem.peak_mb, mem.base_mb = max(p["peak_mb"] for p in parts), min(p["base_mb"] for p in parts)
    mem.gpu_mb = max(p["gpu_mb"] for p in parts)
    row = make_row(v, backend, torch.cat([p["final"] for p in parts]), sum(p["seconds"] for p in parts), n, steps, mem,
                   reference["final"], network_final)
    return {"row": row, "steps": steps}


def _variant_batch(cfg, v: Variant, machine: Denoiser, backend: Backend, noise, labels, reference, idx: list[int],
                   progress) -> dict:
    """One batch of seeds (``idx`` into ``cfg.seeds``): the timed free run and the teacher-forced steps."""
    device = v.device
    dev_labels = labels.to(device) if labels is not None else None
    recorder = StepRecorder(machine, backend)
    with PeakMemory(device) as mem:
        recorder.start()
        start = time.perf_counter()
        final = sample(machine, noise.to(device), cfg.steps, dev_labels, callback=recorder, progress=progress)
        final = final.cpu().to(torch.float64)
        seconds = time.perf_counter() - start
    steps = recorder.records
    if cfg.teacher_forced:
        for i, rec in enumerate(steps):
            x0 = machine(reference["inputs"][i][idx].to(device), rec["t"], dev_labels).cpu().to(torch.float64)
            err = (x0 - reference["x0"][i][idx]).abs()
            rec["error_max"] = float(err.max())
            rec["error_mean"] = float(err.mean())
            forced = backend.stats.summary()
            backend.reset()
            if forced["error_bound"] is not None:  # the answers' certified bound (0 for exact) against the measured error
                rec["bound"] = forced["error_bound"]
                rec["within_bound"] = rec["error_max"] <= rec["bound"] + slack(cfg, backend)
            else:
                rec["se_max_teacher"] = forced.get("se_max")
    return {"final": final, "steps": steps, "seconds": seconds, "peak_mb": mem.peak_mb, "base_mb": mem.base_mb, "gpu_mb": mem.gpu_mb}
