"""Exact-vs-approximate ablations and the posterior-concentration study (issue 5).

One reference run (the exact backend on the deduplicated bank) fixes, for every seed, the DDIM
states ``x_i`` it visits and its denoised estimates ``x̂0_i``. Every configuration of the grid is
then measured twice:

* **free run** — its own DDIM trajectory from the same noise, timed, with the backend's per-step
  statistics (fallback fraction, certified ε, search/top-k/exact seconds) and the peak memory;
  its final samples are compared with the reference's (Pearson r, R², max |Δ|) and, when a
  trained network is given, with the network's (does the approximation change the science?);
* **teacher-forced** — its ``x̂0`` at the reference's states, so the measured per-step error
  ``max |x̂0 − x̂0_exact|`` is compared with what the certificate promises (2·ε of the answers
  it kept; rows of uncertified indices are flagged).

A grid entry is a string ``kind[:key=value…]``:

``exact``               exact backend on the deduplicated bank (pruning on)
``exact:prune=0``       exact, every (query, distinct patch) pair
``exact:dedup=0``       exact over every patch, no deduplication (and no pruning)
``topk:k=64``           top-k by exact k-NN (torch matmul + top-k; Flat certificate)
``topk:k=256:index=IVF64,Flat:nprobe=8``   through a FAISS index (a bank is built per index spec)
``topk:k=256:index=HNSW32``                graph index: ε reported, not certified
``topk:k=256:tol=1e-2`` fallback tolerance; ``tol=none`` keeps every top-k answer (no fallback)
``tail:k=64:samples=1024``  exact top-k head + importance-sampled tail (``proposal=count|uniform``,
                        ``min_ess=``; statistical, reported with its standard errors, uncertified)
``auto:samples=4096:se_tol=1e-2``  the automatic policy (:class:`machines.AutoBackend`): shared
                        draws, answers with SE ≤ ``se_tol`` and ESS ≥ ``min_ess`` kept, the rest exact
``summary:tol=1e-3:leaf=256``  cluster summaries (:class:`machines.SummaryBackend`): clusters of ``leaf``
                        distinct patches summarised or dropped where certified, the rest exact
``…:device=cuda``       run this configuration on the GPU
``…:dtype=float32``     exact sums (the exact row, or a configuration's exact fallback) in float32
                        (≈ 1.6× faster on CPU; its final samples match float64 to r ≥ 1 − 1e-12)

The posterior-concentration study measures, for noised held-out images at each (t, P), the
effective number of entries in every sampled pixel's posterior (exp of its entropy, over
distinct patches and over patches) and the number of distinct patches needed to hold
``1 − 10⁻³`` of its mass (DESIGN §6).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from machines import AutoBackend, ExactBackend, SampledTailBackend, ScaleSchedule, ScoreMachine, SummaryBackend, TopKBackend, noise_from_seeds, reference_schedule, sample
from machines.schedule import alpha_sigma2
from patchbank import BankError, BankSpec, ImageData, MemoryBank, PatchBank, load_dataset
from patchbank.atomic import atomic_write, write_json
from patchbank.geometry import BucketKey, dictionary_groups, patches_at
from patchbank.memory import IMAGE_RULES

from .metrics import pearson_r, r2
from .sampling import cycled_labels

DEFAULT_GRID = [
    "exact",
    "exact:dedup=0",
    "topk:k=16",
    "topk:k=64",
    "topk:k=256",
    "topk:k=1024",
    "topk:k=256:tol=1e-2",
    "topk:k=256:index=IVF64,Flat:nprobe=4",
    "topk:k=256:index=IVF64,Flat:nprobe=16",
    "topk:k=256:index=HNSW32",
    "tail:k=64:samples=1024",
]
BOUND_SLACK = 1e-9  # float64 round-off allowance when comparing measured errors with 2ε
FLOAT32_SLACK = 1e-3  # the same where the row or the reference sums in float32 (logits ~1e3 at small t, 1e-7 relative)


@dataclass
class AblationConfig:
    """Resolved options of an ablation run (written beside the results as ``config.json``)."""

    dataset: str = "mnist"
    resize: int | None = 32
    n_train: int | None = 1000
    split: str = "train"
    machine: str = "bbELS"
    conditional: bool = False
    schedule: str = "MNIST_ResNet_zeros"  # a reference schedule name ...
    reading: str = "calibrated"
    calibration: str | None = None  # ... or a calibration.json (pipelines.calibration)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 20
    grid: list[str] = field(default_factory=lambda: list(DEFAULT_GRID))
    banks: str = "outputs/banks"  # where per-index banks are built (and reused)
    materialise_max: int | None = None
    reference_batch: int | None = None  # seeds per exact-reference batch (None: all); 1 makes the reference resumable per seed
    reference_dtype: str = "float64"  # precision of the exact reference's sums (float32: ≈ 1.6× faster, for 60k runs)
    variant_batch: int | None = None  # seeds per batch of each configuration's run (None: all), each kept when done
    model: str | None = None  # a trained network (model.pt): machine-vs-network agreement per row
    teacher_forced: bool = True
    concentration: bool = True
    concentration_times: list[float] = field(default_factory=lambda: [0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85, 0.95])
    concentration_scales: list[int] | None = None  # default: the schedule's scales
    concentration_pixels: int = 32
    concentration_mass: float = 1e-3
    out: str = "outputs/ablate"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AblationConfig:
        values = json.loads(Path(path).read_text())
        values = values.get("ablation", values)  # a results' config.json holds {"ablation": …, "environment": …}
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Variant:
    """One grid entry, parsed: see the module docstring for the string form."""

    name: str
    kind: str  # exact | topk | tail | auto | summary
    k: int = 256
    samples: int = 1024  # tail draws per query; auto: first-round shared draws per bucket (default 4096)
    max_samples: int = 1 << 22  # auto: most draws per bucket
    se_tol: float = 1e-2  # auto: largest accepted standard error
    proposal: str = "count"
    min_ess: float | None = 32.0
    tol: float | None = 1e-4  # None: no fallback
    nprobe: int = 8
    index: str | None = None  # FAISS index_factory string; None = exact k-NN by torch
    dedup: bool = True
    prune: bool = True
    device: str = "cpu"
    leaf: int = 256  # summary: cluster size
    dtype: str = "float64"  # precision of the exact sums (exact row or fallback)

    @classmethod
    def parse(cls, text: str) -> Variant:
        kind, *items = text.split(":")
        if kind not in ("exact", "topk", "tail", "auto", "summary"):
            raise ValueError(f"grid entry {text!r}: the kind must be 'exact', 'topk', 'tail', 'auto' or 'summary'")
        values: dict = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"grid entry {text!r}: {item!r} is not key=value")
            if key in ("k", "nprobe", "samples", "max_samples", "leaf"):
                values[key] = int(value)
            elif key == "se_tol":
                values[key] = float(value)
            elif key == "min_ess":
                values[key] = None if value.lower() in ("none", "0") else float(value)
            elif key == "tol":
                values[key] = None if value.lower() in ("none", "inf") else float(value)
            elif key in ("dedup", "prune"):
                values[key] = value.lower() in ("1", "true", "yes", "on")
            elif key in ("index", "device", "proposal"):
                values[key] = value
            elif key == "dtype":
                if value not in ("float32", "float64"):
                    raise ValueError(f"grid entry {text!r}: dtype must be float32 or float64")
                values[key] = value
            else:
                raise ValueError(f"grid entry {text!r}: unknown option {key!r}")
        if kind == "exact" and values.keys() - {"dedup", "prune", "device", "dtype"}:
            raise ValueError(f"grid entry {text!r}: exact takes only dedup, prune, device and dtype")
        if kind != "exact" and not values.get("dedup", True):
            raise ValueError(f"grid entry {text!r}: {kind} works on distinct patches; dedup=0 applies to exact only")
        if kind == "tail" and values.keys() - {"k", "samples", "proposal", "min_ess", "index", "nprobe", "device", "dtype"}:
            raise ValueError(f"grid entry {text!r}: tail takes k, samples, proposal, min_ess, index, nprobe, device, dtype")
        if kind == "auto":
            if values.keys() - {"samples", "max_samples", "se_tol", "min_ess", "device", "dtype"}:
                raise ValueError(f"grid entry {text!r}: auto takes samples, max_samples, se_tol, min_ess, device, dtype")
            values.setdefault("samples", 4096)
            values.setdefault("min_ess", 64.0)
            if values["min_ess"] is None:
                raise ValueError(f"grid entry {text!r}: auto needs min_ess >= 1")
        elif values.keys() & {"max_samples", "se_tol"}:
            raise ValueError(f"grid entry {text!r}: max_samples and se_tol belong to auto")
        if kind == "summary":
            if values.keys() - {"tol", "leaf", "device", "dtype"}:
                raise ValueError(f"grid entry {text!r}: summary takes tol, leaf, device, dtype")
            values.setdefault("tol", 1e-3)
            if values["tol"] is None or not 0 < values["tol"] < 1:
                raise ValueError(f"grid entry {text!r}: summary needs 0 < tol < 1")
        elif "leaf" in values:
            raise ValueError(f"grid entry {text!r}: leaf belongs to summary")
        return cls(text, kind, **values)

    @property
    def certified(self) -> bool:
        if self.kind in ("tail", "auto"):
            return False
        return self.kind == "exact" or self.index is None or not self.index.upper().startswith("HNSW")


# ---- resources ----------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms;
    on CUDA also the peak allocated GPU memory."""

    def __init__(self, device: str = "cpu", interval: float = 0.02) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = self.base_mb = self.gpu_mb = 0.0

    def __enter__(self) -> PeakMemory:
        self.base_mb = self.peak_mb = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        if self.device.startswith("cuda"):
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: fall back to the process-lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    """Library versions, threads and devices: what a reader needs to re-run or compare timings."""
    import numpy
    import zarr

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
           "zarr": zarr.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import faiss  # type: ignore[import-not-found]

        env["faiss"] = faiss.__version__
        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        env["faiss"] = None
    return env


# ---- the ablation ---------------------------------------------------------------------------------
def run_ablation(cfg: AblationConfig, progress: bool = True) -> dict:
    """Run every grid configuration against the exact reference; writes the report under ``cfg.out``.

    Files: ``config.json`` (resolved config + environment; ``patchbank ablate --config`` re-runs
    it), ``rows.csv``, ``results.json`` (rows + per-step records), ``summary.md``,
    ``pareto.png``, ``fallback.png`` and, with the concentration study, ``concentration.json``
    and ``concentration.png``. Finished configurations are kept under ``variants/`` and skipped
    when the same run is repeated, so an interrupted ablation resumes.
    """
    variants = [Variant.parse(g) for g in cfg.grid]
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("the grid lists a configuration twice")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.dataset, split=cfg.split, resize=cfg.resize, limit=cfg.n_train)
    schedule = _schedule(cfg)
    key = {"ablation": asdict(cfg), "fingerprint": data.fingerprint()}
    write_json(out / "config.json", {"ablation": asdict(cfg), "environment": environment(), "fingerprint": key["fingerprint"]})
    done_dir = out / "variants"
    done_dir.mkdir(exist_ok=True)
    labels = _labels(cfg, data, len(cfg.seeds))
    noise = noise_from_seeds(cfg.seeds, data.shape, torch.float64)
    memory_bank = MemoryBank(data, dedup=True, materialise_max=cfg.materialise_max)
    reference = _reference(cfg, memory_bank, schedule, noise, labels, out, key, progress)
    network_final = _network_final(cfg, noise, labels) if cfg.model else None
    rows, steps = [], {}
    for v in variants:
        f = done_dir / (_slug(v.name) + ".json")
        result = json.loads(f.read_text()) if f.exists() else {}
        if result.get("key") != _variant_key(key, v):
            result = _run_variant(cfg, v, data, memory_bank, schedule, noise, labels, reference, network_final, progress,
                                  done_dir / _slug(v.name), key)
            write_json(f, {"key": _variant_key(key, v), **result})
        rows.append(result["row"])
        steps[v.name] = result["steps"]
    exact_row = _exact_row(rows)
    for r in rows:  # against the warm exact row when there is one (the reference run also pays one-off table builds)
        base = exact_row["seconds"] if exact_row else reference["seconds"]
        r["speedup_vs_exact"] = base / r["seconds"] if r["seconds"] else None
    report = {"config": asdict(cfg), "rows": rows, "steps": steps, "reference_seconds": reference["seconds"],
              "best": best_configuration(rows)}
    if cfg.concentration:
        ckey = _concentration_key(cfg, schedule, key["fingerprint"])
        f = out / "concentration.json"
        kept = json.loads(f.read_text()) if f.exists() else {}
        if kept.get("key") != ckey:  # the study depends on neither the grid nor the seeds: kept across re-runs
            kept = {"key": ckey, "cells": concentration_study(memory_bank, cfg.machine, cfg.concentration_times,
                                                              ckey["scales"], _held_out(cfg), cfg.concentration_pixels,
                                                              cfg.concentration_mass, progress=progress)}
            write_json(f, kept)
        report["concentration"] = kept["cells"]
    write_json(out / "results.json", report)
    _write_csv(rows, out / "rows.csv")
    atomic_write(out / "summary.md", lambda p: Path(p).write_text(summary_markdown(report)))
    from .figures import concentration_heatmap, fallback_curves, pareto_plot

    pareto_plot(rows, out / "pareto.png")
    fallback_curves(steps, out / "fallback.png")
    if cfg.concentration:
        concentration_heatmap(report["concentration"], out / "concentration.png")
    return report


def _concentration_key(cfg: AblationConfig, schedule: ScaleSchedule, fingerprint: str) -> dict:
    fields = ("dataset", "resize", "n_train", "split", "machine", "concentration_times", "concentration_pixels",
              "concentration_mass")
    return {**{k: getattr(cfg, k) for k in fields}, "scales": cfg.concentration_scales or sorted(set(schedule.scales)),
            "fingerprint": fingerprint}


def _schedule(cfg: AblationConfig) -> ScaleSchedule:
    if cfg.calibration:
        from .calibration import schedule_from

        return schedule_from(json.loads(Path(cfg.calibration).read_text()))
    return reference_schedule(cfg.schedule, cfg.reading)  # type: ignore[arg-type]


def _labels(cfg: AblationConfig, data: ImageData, n: int) -> torch.Tensor | None:
    return cycled_labels(data.labels, n) if cfg.conditional else None


def _held_out(cfg: AblationConfig) -> ImageData:
    """Images for the concentration queries: the test split where there is one, else the training set."""
    try:
        return load_dataset(cfg.dataset, split="test", resize=cfg.resize, limit=max(64, cfg.concentration_pixels))
    except (ValueError, KeyError, FileNotFoundError):
        return load_dataset(cfg.dataset, split=cfg.split, resize=cfg.resize, limit=max(64, cfg.concentration_pixels))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def _variant_key(key: dict, v: Variant) -> dict:
    cfg = {k: val for k, val in key["ablation"].items() if k in ("dataset", "resize", "n_train", "split", "machine", "conditional",
                                                                   "schedule", "reading", "calibration", "seeds", "steps",
                                                                   "materialise_max", "model", "teacher_forced")}
    if key["ablation"].get("reference_dtype", "float64") != "float64":  # errors are measured against the reference
        cfg["reference_dtype"] = key["ablation"]["reference_dtype"]
    return {"config": cfg, "fingerprint": key["fingerprint"], "variant": v.name}


def _reference_variant(cfg: AblationConfig) -> Variant:
    """The exact backend of the reference run (named ``exact`` in float64, so older references stay valid)."""
    if cfg.reference_dtype not in ("float32", "float64"):
        raise ValueError(f"reference_dtype must be float32 or float64, not {cfg.reference_dtype!r}")
    return Variant("exact" if cfg.reference_dtype == "float64" else f"exact:dtype={cfg.reference_dtype}", "exact",
                   dtype=cfg.reference_dtype)


def _slack(cfg: AblationConfig, v: Variant) -> float:
    """Round-off allowed between a row's measured error and its bound."""
    return FLOAT32_SLACK if "float32" in (v.dtype, cfg.reference_dtype) else BOUND_SLACK


def _machine(cfg: AblationConfig, bank: MemoryBank, schedule: ScaleSchedule, backend) -> ScoreMachine:
    return ScoreMachine(bank, cfg.machine, scales=schedule, conditional=cfg.conditional, backend=backend)  # type: ignore[arg-type]


def _reference(cfg, bank, schedule, noise, labels, out: Path, key: dict, progress: bool) -> dict:
    """The exact run: states x_i, estimates x̂0_i and final samples (cached in ``reference.pt``).

    Seeds are sampled in batches of ``cfg.reference_batch`` (default: all at once, the same batch
    as the exact row, so that row differs by exactly zero) and each seed is kept in
    ``reference/seed{n}.pt`` as soon as its batch is done (a sample depends only on its own seed,
    up to float round-off from the batch shape), so an interrupted reference — ~20–30 min per seed
    at 60,000 images — resumes with the seeds it finished, and adding seeds reuses them."""
    f = out / "reference.pt"
    ref_variant = _reference_variant(cfg)
    ref_key = _variant_key(key, ref_variant)
    if f.exists():
        ref = torch.load(f, weights_only=False)
        if ref.get("key") == ref_key:
            return ref
    machine = _machine(cfg, bank, schedule, _backend(ref_variant))
    parts_dir = out / "reference"
    parts_dir.mkdir(exist_ok=True)
    parts: dict[int, dict] = {}
    keys = {}
    for n, seed in enumerate(cfg.seeds):
        keys[n] = {**_without_seeds(ref_key), "seed": seed,
                   "label": None if labels is None else int(labels[n])}
        pf = parts_dir / f"seed{seed}.pt"
        part = torch.load(pf, weights_only=False) if pf.exists() else None
        if part is not None and part.get("key") == keys[n]:
            parts[n] = part
    missing = [n for n in range(len(cfg.seeds)) if n not in parts]
    step = cfg.reference_batch or max(1, len(missing))
    for s in range(0, len(missing), step):
        idx = torch.tensor(missing[s : s + step])
        run = _reference_run(machine, cfg, noise[idx], None if labels is None else labels[idx], progress)
        for j, n in enumerate(idx.tolist()):  # one file per seed; the batch's seconds shared out evenly
            part = {"key": keys[n], "final": run["final"][j : j + 1], "seconds": run["seconds"] / len(idx),
                    "inputs": [x[j : j + 1] for x in run["inputs"]], "x0": [x[j : j + 1] for x in run["x0"]]}
            atomic_write(parts_dir / f"seed{cfg.seeds[n]}.pt", lambda p: torch.save(part, p))
            parts[n] = part
    parts = [parts[n] for n in range(len(cfg.seeds))]  # type: ignore[assignment]
    ref = {"key": ref_key, "final": torch.cat([p["final"] for p in parts]), "seconds": sum(p["seconds"] for p in parts),
           "inputs": [torch.cat([p["inputs"][i] for p in parts]) for i in range(cfg.steps)],
           "x0": [torch.cat([p["x0"][i] for p in parts]) for i in range(cfg.steps)]}
    atomic_write(f, lambda p: torch.save(ref, p))
    return ref


def _reference_run(machine: ScoreMachine, cfg, noise: torch.Tensor, labels: torch.Tensor | None, progress: bool) -> dict:
    """Exact trajectories of a batch of seeds: the state each step was applied to, its x̂0, the final samples, seconds."""
    states, x0s = [], []

    def record(step, t, x, x0):
        x0s.append(x0.clone())
        states.append(x.clone())

    start = time.perf_counter()
    final = sample(machine, noise, cfg.steps, labels, callback=record, progress=progress)
    return {"inputs": [noise] + states[:-1], "x0": x0s, "final": final, "seconds": time.perf_counter() - start}


def _network_final(cfg: AblationConfig, noise: torch.Tensor, labels) -> torch.Tensor:
    from .training import load_network

    network = load_network(cfg.model, device="cpu")  # type: ignore[arg-type]
    return sample(network, noise.to(torch.float32), cfg.steps, labels).to(torch.float64)


def _bank_for(cfg: AblationConfig, v: Variant, data: ImageData, memory_bank: MemoryBank, schedule: ScaleSchedule,
              progress: bool) -> MemoryBank:
    if v.kind == "exact" and not v.dedup:
        return MemoryBank(data, dedup=False)
    if v.index is None:
        return memory_bank
    path = Path(cfg.banks) / f"{data.name}-{data.fingerprint()[:12]}-{cfg.machine}-{_slug(v.index)}-m{cfg.materialise_max or 0}"
    spec = BankSpec(scales=sorted(set(schedule.scales)), rules=[cfg.machine], labels=cfg.conditional, index=v.index,
                    materialise_max=cfg.materialise_max)
    if (path / "manifest.json").exists():
        try:
            return PatchBank.open(path, expect=data)
        except BankError:  # unfinished or other build: build resumes it, or says why it cannot
            pass
    return PatchBank.build(data, path, spec, progress=progress)


def _backend(v: Variant):
    exact = ExactBackend(prune=v.prune and v.dedup, dtype=getattr(torch, v.dtype))
    if v.kind == "exact":
        return exact
    if v.kind == "auto":
        return AutoBackend(samples=v.samples, max_samples=max(v.samples, v.max_samples), se_tol=v.se_tol,
                           min_ess=v.min_ess, exact=exact)  # type: ignore[arg-type]
    if v.kind == "summary":
        return SummaryBackend(tol=v.tol, leaf_size=v.leaf, exact=exact)  # type: ignore[arg-type]
    if v.kind == "tail":
        return SampledTailBackend(k=v.k, samples=v.samples, proposal=v.proposal, min_ess=v.min_ess, nprobe=v.nprobe,  # type: ignore[arg-type]
                                  engine="auto" if v.index else "torch", exact=exact)
    return TopKBackend(k=v.k, tol=v.tol if v.tol is not None else math.inf, nprobe=v.nprobe,
                       engine="auto" if v.index else "torch", fallback=exact if v.tol is not None else None)


def _without_seeds(variant_key: dict) -> dict:
    """A configuration's key without the run's seed list: the base of the key of one seed (reference)
    or seed batch (configuration), so a run with more seeds — or one split over processes by seed —
    reuses every finished one."""
    return {**variant_key, "config": {k: val for k, val in variant_key["config"].items() if k != "seeds"}}


def _part_key(key: dict, v: Variant, seeds: list[int], labels: list | None) -> dict:
    """Key of one seed batch of a configuration: its own seeds (and labels), not the run's seed list."""
    return {**_without_seeds(_variant_key(key, v)), "seeds": seeds, "labels": labels}


def _run_variant(cfg, v: Variant, data, memory_bank, schedule, noise, labels, reference, network_final, progress,
                 parts_dir: Path | None = None, key: dict | None = None) -> dict:
    device = v.device
    machine = backend = None

    def ready():  # built only when a seed batch has to be sampled: merging finished batches costs nothing
        nonlocal machine, backend
        if machine is None:
            bank = _bank_for(cfg, v, data, memory_bank, schedule, progress)
            backend = _backend(v)
            machine = _machine(cfg, bank, schedule, backend)
            machine(noise[:1].to(device), 1.0, labels[:1].to(device) if labels is not None else None)  # warm caches untimed
        return machine, backend

    n = len(cfg.seeds)
    size = cfg.variant_batch or n
    parts = []
    for s in range(0, n, size):  # seed batches, each kept as soon as it is done when parts_dir is given
        idx = list(range(s, min(n, s + size)))
        part_key = None if key is None else _part_key(key, v, [cfg.seeds[i] for i in idx],
                                                      None if labels is None else labels[idx].tolist())
        pf = None if parts_dir is None else parts_dir / f"seeds-{cfg.seeds[idx[0]]}-{cfg.seeds[idx[-1]]}.pt"
        part = torch.load(pf, weights_only=False) if pf is not None and pf.exists() else None
        if part is None or part.get("key") != part_key:
            part = {"key": part_key, **_variant_batch(cfg, v, *ready(), schedule, noise[idx],
                                                      None if labels is None else labels[idx], reference, idx, progress)}
            if pf is not None:
                pf.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(pf, lambda p: torch.save(part, p))
        parts.append(part)
    final = torch.cat([p["final"] for p in parts])
    seconds = sum(p["seconds"] for p in parts)
    steps = [_merge_steps([p["steps"][i] for p in parts]) for i in range(len(parts[0]["steps"]))]
    mem = PeakMemory(device)
    mem.peak_mb, mem.base_mb = max(p["peak_mb"] for p in parts), min(p["base_mb"] for p in parts)
    mem.gpu_mb = max(p["gpu_mb"] for p in parts)
    ref_final = reference["final"]
    r = pearson_r(final, ref_final)
    row = {
        "config": v.name,
        "kind": v.kind,
        "index": v.index or ("flat (torch)" if v.kind != "exact" else "-"),
        "k": v.k if v.kind != "exact" else None,
        "samples": v.samples if v.kind in ("tail", "auto") else None,
        "nprobe": v.nprobe if v.index and v.index.upper().startswith("IVF") else None,
        "tol": v.tol if v.kind in ("topk", "summary") else None,
        "dedup": v.dedup,
        "device": device,
        "certified": v.certified,
        "seconds_per_sample": seconds / len(cfg.seeds),
        "seconds": seconds,
        "peak_rss_mb": round(mem.peak_mb, 1),
        "peak_rss_increase_mb": round(mem.peak_mb - mem.base_mb, 1),
        "peak_gpu_mb": round(mem.gpu_mb, 1) if device.startswith("cuda") else None,
        "pearson_r_median": statistics.median(r.tolist()),
        "pearson_r_min": float(r.min()),
        "r2_median": statistics.median(r2(final, ref_final).tolist()),
        "max_abs_diff": float((final - ref_final).abs().max()),
        "fallback_fraction": _mean([s.get("fallback_fraction") for s in steps]),
        "eps_median": _median([s.get("eps_median") for s in steps]),
        "eps_max": _max([s.get("eps_max") for s in steps]),
        "se_median": _median([s.get("se_median") for s in steps]),
        "search_s": sum(s.get("search_s", 0.0) for s in steps),
        "exact_s": sum(s.get("exact_s", 0.0) for s in steps) if v.kind != "exact" else seconds,
        "step_error_max": _max([s.get("error_max") for s in steps]),
        "within_bound": all(s.get("within_bound", True) for s in steps) if v.certified else None,
    }
    if network_final is not None:
        row["network_r_median"] = statistics.median(pearson_r(final, network_final).tolist())
        row["exact_network_r_median"] = statistics.median(pearson_r(ref_final, network_final).tolist())
    return {"row": row, "steps": steps}


def _variant_batch(cfg, v: Variant, machine, backend, schedule, noise, labels, reference, idx: list[int], progress) -> dict:
    """One batch of seeds (``idx`` into ``cfg.seeds``): the timed free run and the teacher-forced steps."""
    device = v.device
    dev_noise = noise.to(device)
    dev_labels = labels.to(device) if labels is not None else None
    steps: list[dict] = []
    last = [time.perf_counter()]

    def on_step(step, t, x, x0):
        now = time.perf_counter()
        rec = {"step": step, "t": t, "P": schedule(t), "seconds": now - last[0]}
        if v.kind != "exact":
            rec |= backend.stats.summary()
            backend.stats.reset()
        steps.append(rec)
        last[0] = time.perf_counter()

    if v.kind != "exact":
        backend.stats.reset()
    with PeakMemory(device) as mem:
        last[0] = time.perf_counter()
        start = time.perf_counter()
        final = sample(machine, dev_noise, cfg.steps, dev_labels, callback=on_step, progress=progress).cpu().to(torch.float64)
        seconds = time.perf_counter() - start
    if cfg.teacher_forced:
        for i, rec in enumerate(steps):
            x0 = machine(reference["inputs"][i][idx].to(device), rec["t"], dev_labels).cpu().to(torch.float64)
            err = (x0 - reference["x0"][i][idx]).abs()
            rec["error_max"] = float(err.max())
            rec["error_mean"] = float(err.mean())
            if isinstance(backend, TopKBackend):
                rec["bound"] = 2 * backend.stats.accepted_eps_max
                rec["within_bound"] = rec["error_max"] <= rec["bound"] + _slack(cfg, v)
                backend.stats.reset()
            elif isinstance(backend, SummaryBackend):
                rec["bound"] = backend.stats.summary()["bound_max"]
                rec["within_bound"] = rec["error_max"] <= rec["bound"] + _slack(cfg, v)
                backend.stats.reset()
            elif isinstance(backend, (SampledTailBackend, AutoBackend)):
                rec["se_max_teacher"] = backend.stats.summary()["se_max"]
                backend.stats.reset()
            else:
                rec["bound"] = 0.0
                rec["within_bound"] = rec["error_max"] <= _slack(cfg, v)
    return {"final": final, "steps": steps, "seconds": seconds, "peak_mb": mem.peak_mb, "base_mb": mem.base_mb, "gpu_mb": mem.gpu_mb}


def _merge_steps(recs: list[dict]) -> dict:
    """One step's records from several seed batches as one: times and counts add up, maxima stay maxima,
    fractions and medians are averaged over batches, flags must hold in all."""
    if len(recs) == 1:
        return recs[0]
    out: dict = {}
    for k in recs[0]:
        vals = [r[k] for r in recs if k in r]
        if k in ("step", "t", "P") or not all(isinstance(x, (int, float)) for x in vals):
            out[k] = vals[0] if k != "choice" or len(set(vals)) == 1 else "mixed"
        elif isinstance(vals[0], bool):
            out[k] = all(vals)
        elif k in ("seconds", "queries") or k.endswith("_s"):
            out[k] = sum(vals)
        elif k.endswith("_max") or k in ("bound", "se_max_teacher"):
            out[k] = max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


def _clean(xs):
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def _mean(xs):
    xs = _clean(xs)
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = _clean(xs)
    return statistics.median(xs) if xs else None


def _max(xs):
    xs = _clean(xs)
    return max(xs) if xs else None


def _exact_row(rows: list[dict]) -> dict | None:
    """The grid's `exact` row (the speed-up baseline), if it has one."""
    return next((r for r in rows if r["config"] == "exact"), None)


def best_configuration(rows: list[dict], min_r: float = 0.999) -> dict | None:
    """The fastest row whose final samples keep Pearson r ≥ ``min_r`` (minimum over seeds) with exact."""
    ok = [r for r in rows if r["pearson_r_min"] >= min_r]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["seconds"])
    exact = _exact_row(rows)
    return {"config": best["config"], "seconds_per_sample": best["seconds_per_sample"], "pearson_r_min": best["pearson_r_min"],
            "speedup_vs_exact": best.get("speedup_vs_exact"), "baseline": "exact row" if exact else "reference run"}


def _write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def summary_markdown(report: dict) -> str:
    """A markdown table of the rows (and the concentration cells) for a README or a paper."""
    cfg = report["config"]
    base = ("× exact is against the warm `exact` row." if _exact_row(report["rows"]) else
            "no `exact` row: × exact is against the reference run's seconds.")
    lines = [f"Ablation: {cfg['machine']} on {cfg['dataset']} ({cfg['n_train'] or 'all'} images, resize {cfg['resize']}), "
             f"schedule {cfg['calibration'] or cfg['schedule']}, {len(cfg['seeds'])} seeds × {cfg['steps']} steps; "
             f"exact reference {report['reference_seconds'] / len(cfg['seeds']):.1f} s/sample (cold: includes building tables); " + base, "",
             "| config | s/sample | × exact | r min | max abs Δ | fallback | ε median | step err max | within bound | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(
            f"| `{r['config']}` | {r['seconds_per_sample']:.2f} | {r['speedup_vs_exact'] or 0:.2f} | {r['pearson_r_min']:.6f} | "
            f"{r['max_abs_diff']:.1e} | {_fmt(r['fallback_fraction'], '.3f')} | {_fmt(r['eps_median'], '.1e')} | "
            f"{_fmt(r['step_error_max'], '.1e')} | {_bound_text(r)} | "
            f"{r['peak_rss_mb']:.0f} |")
    best = report.get("best")
    lines += ["", f"Fastest configuration with r ≥ 0.999 against exact: `{best['config']}`, "
                  f"{best['seconds_per_sample']:.2f} s/sample, ×{_fmt(best['speedup_vs_exact'], '.2f')} vs the {best['baseline']}."
              if best else "No configuration kept r ≥ 0.999 against exact."]
    if "network_r_median" in report["rows"][0]:
        lines += ["", "Machine-vs-network median r per config: " + ", ".join(
            f"`{r['config']}` {r['network_r_median']:.4f}" for r in report["rows"])]
    if report.get("concentration"):
        lines += ["", "Posterior concentration (median over pixels): distinct patches holding 1 − 10⁻³ of the mass / bucket distinct "
                      "entries; effective number exp(H).", "", "| t | P | k(0.999) | of | exp(H) distinct | exp(H) patches |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in report["concentration"]:
            lines.append(f"| {c['t']:.2f} | {c['P']} | {c['k_mass_median']:.0f} | {c['entries_median']:.0f} | "
                         f"{c['n_eff_distinct_median']:.1f} | {c['n_eff_patches_median']:.1f} |")
    return "\n".join(lines) + "\n"


def _bound_text(r: dict) -> str:
    if r["kind"] in ("tail", "auto"):
        return f"statistical (SE median {_fmt(r.get('se_median'), '.1e')})"
    return "uncertified" if r["within_bound"] is None else str(r["within_bound"])


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


# ---- posterior concentration -------------------------------------------------------------------
@torch.no_grad()
def posterior_concentration(bank: MemoryBank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                            mass: float = 1e-3, chunk_size: int = 1 << 16, memory_mb: int = 2048) -> dict[str, torch.Tensor]:
    """Per query ``[Q, D]``: the effective number of entries (exp of the posterior's entropy) over
    the bucket's entries (distinct patches with counts on a deduplicating bank) and over individual
    patches, and the number of entries holding ``1 − mass`` of the posterior. Returns ``[Q]`` tensors
    and the bucket's entry count. Queries go in groups whose logits ``[group, entries]`` fit in
    ``memory_mb`` (a 60,000-image bucket holds up to ~6·10⁷ entries), each group streaming the bucket once."""
    q = queries.to(torch.float64)
    cap = bank.stream_size(bucket) if bucket.rule not in IMAGE_RULES else chunk_size  # grown for images
    group = max(1, int(memory_mb * 2**20 // (8 * cap)))
    out: dict[str, list] = {"n_eff_distinct": [], "n_eff_patches": [], "k_mass": [], "entries": []}
    for g in range(0, q.shape[0], group):
        qg = q[g : g + group]
        ell = torch.empty(qg.shape[0], cap, dtype=torch.float64)
        lc = torch.empty(cap, dtype=torch.float64)
        n = 0
        for chunk in bank.stream(bucket, chunk_size, torch.float64):
            keys, m = chunk.keys, chunk.keys.shape[0]
            if n + m > ell.shape[1]:  # more entries than the estimate (whole-image rules): grow
                grow = max(m, ell.shape[1])
                ell = torch.cat([ell, torch.empty(ell.shape[0], grow, dtype=torch.float64)], 1)
                lc = torch.cat([lc, torch.empty(grow, dtype=torch.float64)])
            lc[n : n + m] = chunk.log_counts if chunk.log_counts is not None else 0.0
            ell[:, n : n + m] = ((2 * a) * qg @ keys.T - (a * a) * keys.pow(2).sum(1)) / (2 * s2) + lc[n : n + m]
            n += m
        for row in ell[:, :n]:  # one query at a time: O(entries) temporaries
            logp = row - torch.logsumexp(row, 0)
            p = logp.exp()
            H = -(p * logp).sum()  # over entries
            out["n_eff_distinct"].append(float(H.exp()))
            out["n_eff_patches"].append(float((H + (p * lc[:n]).sum()).exp()))  # each of c copies carries p/c
            out["k_mass"].append(min(n, entries_for_mass(logp, (1 - mass) * float(p.sum()))))
            out["entries"].append(n)
        del ell
    return {"n_eff_distinct": torch.tensor(out["n_eff_distinct"], dtype=torch.float64),
            "n_eff_patches": torch.tensor(out["n_eff_patches"], dtype=torch.float64),
            "k_mass": torch.tensor(out["k_mass"], dtype=torch.long), "entries": torch.tensor(out["entries"], dtype=torch.long)}


def entries_for_mass(logp: torch.Tensor, target: float, bins: int = 256, small: int = 1 << 14) -> int:
    """The fewest entries, largest first, whose probabilities ``exp(logp)`` ``[U]`` sum to ≥ ``target``
    (the same number a full descending sort and cumulative sum give), in O(U) per refinement: a
    histogram over log p finds the bin where the running mass crosses ``target``, and only that bin is
    refined (then sorted once it is small)."""
    above_n, above_m = 0, 0.0
    cand = logp
    while cand.numel() > small:
        lo, hi = float(cand.min()), float(cand.max())
        if not hi > lo:  # ties: every candidate carries the same mass
            need = math.ceil(max(0.0, target - above_m) / math.exp(hi) - 1e-9)
            return above_n + max(1, min(need, cand.numel()))
        edges = torch.linspace(lo, hi, bins + 1, dtype=cand.dtype)[1:-1]
        idx = torch.bucketize(cand, edges, right=True)  # bin 0 … bins-1, increasing log p
        cnt = torch.bincount(idx, minlength=bins).flip(0)  # from the top bin down
        m = torch.bincount(idx, weights=cand.exp(), minlength=bins).flip(0)
        cum = above_m + m.cumsum(0)
        j = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]), bins - 1)
        above_n += int(cnt[:j].sum())
        above_m += float(m[:j].sum())
        cand = cand[idx == bins - 1 - j]
    vals = cand.exp().sort(descending=True).values
    cum = above_m + vals.cumsum(0)
    return above_n + min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1, vals.numel())


def concentration_study(bank: MemoryBank, machine: str, times: list[float], scales: list[int], held_out: ImageData,
                        pixels: int = 32, mass: float = 1e-3, seed: int = 0, progress: bool = True) -> list[dict]:
    """For every (t, P): medians over ``pixels`` random pixels of noised held-out images (each
    pixel against its own bucket under ``machine``'s rule) of :func:`posterior_concentration`."""
    gen = torch.Generator().manual_seed(seed)
    H, W = bank.height, bank.width
    x0 = (held_out.images.to(torch.float64) / 127.5 - 1)
    cells = []
    for t in tqdm(times, desc="concentration", disable=not progress):
        a, s2 = alpha_sigma2(t)
        img = torch.randint(len(x0), (pixels,), generator=gen)
        pix = torch.stack([torch.randint(H, (pixels,), generator=gen), torch.randint(W, (pixels,), generator=gen)], 1)
        xt = a * x0[img] + math.sqrt(s2) * torch.randn(x0[img].shape, generator=gen, dtype=torch.float64)
        for P in scales:
            results: dict[str, list] = {}
            padding = "circular" if machine == "ELS" else "zeros"
            for key, locs in dictionary_groups(H, W, P, machine):  # type: ignore[arg-type]
                member = (pix[:, None, :] == locs[None, :, :]).all(-1)  # [pixels, L]
                rows = torch.nonzero(member.any(1)).view(-1)
                if rows.numel() == 0:
                    continue
                queries = torch.stack([patches_at(xt[i : i + 1], pix[i : i + 1], P, padding)[0, 0] for i in rows.tolist()])
                res = posterior_concentration(bank, BucketKey(machine, P, padding, key, None), queries.flatten(1), a, s2, mass)
                for name, v in res.items():
                    results.setdefault(name, []).extend(v.tolist())
            cells.append({"t": t, "P": P, "pixels": pixels, "mass": mass,
                          **{f"{name}_median": statistics.median(v) for name, v in results.items()}})
    return cells
