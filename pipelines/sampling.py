"""The main job: sample a few images from an analytic machine and save a PNG grid with its config."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchvision.utils import save_image

from machines import MACHINES, Denoiser, ScaleSchedule, ScoreMachine, identity_of, make_backend, noise_from_seeds, reference_schedule, sample
from machines.comparators import COMPARATORS, comparator_kind, make_comparator, parse_comparator
from machines.posterior.topk import TopKBackend
from patchbank import MemoryBank, load_dataset, open_bank
from patchbank.atomic import atomic_write, folder_lock, read_torch, write_json

from .executors import batch_for, make_executor, pending
from .runs import check_fields, check_run_options, claim_folder, config_from_dict, read_json, seed_labels

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Resolved options of one sampling run (written as ``config.json`` beside the grid)."""

    dataset: str = "mnist"
    resize: int | None = 32
    n_train: int | None = 300
    machine: str = "bbELS"  # IS, ES, LS, ELS, bbELS, or a comparator spec such as smoothed:sigma=0.1
    schedule: str = "MNIST_ResNet_zeros"
    reading: str = "calibrated"
    scale: int | None = None  # a constant P instead of the reference schedule
    padding: str | None = None
    conditional: bool = False
    labels: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    steps: int = 20
    bank: str | None = None  # a built PatchBank directory; its data replaces dataset/resize/n_train
    backend: str = "exact"  # a backend spec, e.g. "auto", "topk:k=256:tol=1e-4" (see `patchbank backends`)
    executor: str = "serial"  # serial, processes:N or ray[:ADDRESS] (see pipelines.executors)
    batch: int | None = None  # seeds sampled together (None: all at once, or one per task on a parallel executor)
    out: str = "outputs/sample"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and range and the options' consistency, checked before anything is written."""
        check_fields(self, {"resize": (1, None, "[)"), "n_train": (1, None, "[)"), "labels": (0, None, "[)")},
                     {"reading": ("calibrated", "paper"), "padding": ("zeros", "circular")})
        if not self.comparator and self.machine not in MACHINES:
            raise ValueError(f"unknown machine {self.machine!r}; choose from {', '.join(MACHINES)} or a comparator "
                             f"({', '.join(COMPARATORS)}, e.g. smoothed:sigma=0.1)")
        if self.comparator:
            parse_comparator(self.machine)  # an unknown option is an error now, before any work
            if self.scale is not None or self.padding is not None:
                raise ValueError(f"{self.machine} is a comparator theory: --scale and --padding do not apply to it")
        if self.machine in ("IS", "ES") and self.scale is not None:
            raise ValueError(f"{self.machine} compares whole images; --scale does not apply to it")
        if self.labels is not None and not self.conditional:
            raise ValueError("labels are given but the machine is not conditional; add --conditional (or drop --labels)")
        check_run_options(self.seeds, self.steps, self.backend, self.executor, self.batch)

    @property
    def comparator(self) -> bool:
        """Whether ``machine`` names a comparator theory (see :mod:`machines.comparators`)."""
        return comparator_kind(self.machine) is not None

    def scales(self) -> ScaleSchedule | None:
        if self.machine in ("IS", "ES") or self.comparator:
            return None
        if self.scale is not None:
            return ScaleSchedule.constant(self.scale)
        return reference_schedule(self.schedule, self.reading)  # type: ignore[arg-type]


def run_sample(cfg: SampleConfig) -> Path:
    """Sample ``len(cfg.seeds)`` images; writes ``samples.png``, ``samples.pt`` and ``config.json`` under ``cfg.out``.

    One batch of seeds on the serial executor checkpoints every step in ``cfg.out/sample.ckpt`` (removed
    once the results are written), so a killed run resumes when re-run with the same settings; other
    settings are refused while it is there. Several batches (``cfg.batch``, or a parallel
    ``cfg.executor``) are kept as each finishes in ``cfg.out/batches/`` and a re-run samples the rest."""
    cfg.check()
    with folder_lock(cfg.out):  # an --out under a file fails here, before any work; a second run into it fails at once
        return _run_sample(cfg)


def _run_sample(cfg: SampleConfig) -> Path:
    out = Path(cfg.out)
    machine, noise, labels = machine_for(cfg)
    data = machine.bank.data
    backend = getattr(machine, "backend", None)  # a comparator that computes its posteriors itself has none
    log.info("%r: %d seeds, %d steps on %s", machine, len(cfg.seeds), cfg.steps, cfg.executor)
    start = time.perf_counter()
    batch = batch_for(cfg.batch, cfg.executor)
    if batch is None or batch >= len(cfg.seeds):
        x = sample(machine, noise, cfg.steps, labels, progress=True, checkpoint=out / "sample.ckpt")
        stats = backend.stats.summary() if backend is not None else None
    else:
        x, stats = _in_batches(machine, cfg, labels, batch, out / "batches"), None
    elapsed = time.perf_counter() - start
    atomic_write(out / "samples.png", lambda p: save_image((x + 1) / 2, p, nrow=min(8, len(cfg.seeds)), format="png"))
    atomic_write(out / "samples.pt", lambda p: torch.save({"samples": x, "seeds": cfg.seeds, "labels": labels}, p))
    record = {**asdict(cfg), "seconds": round(elapsed, 2), "train_images": len(data), "image_shape": list(data.shape),
              "backend_stats": stats}
    write_json(out / "config.json", record)
    (out / "sample.ckpt").unlink(missing_ok=True)
    return out / "samples.png"


@dataclass
class _Sampling:
    """What every sampling batch needs: the machine, the grid and each seed's label."""

    machine: Denoiser
    steps: int
    shape: tuple[int, ...]
    label_of: dict[int, int] | None


def sample_seeds(job: _Sampling, seeds: list[int]) -> torch.Tensor:
    """Final samples ``[B, C, H, W]`` of a seed batch."""
    return sample(job.machine, noise_from_seeds(seeds, job.shape), job.steps, seed_labels(job.label_of, seeds))


def _in_batches(machine: Denoiser, cfg: SampleConfig, labels: torch.Tensor | None, batch: int, folder: Path) -> torch.Tensor:
    """The seeds' samples in batches on ``cfg.executor``, each batch kept in ``folder/kept.pt`` as it finishes."""
    label_of = dict(zip(cfg.seeds, labels.tolist())) if labels is not None else None
    claim_folder(folder, {"machine": identity_of(machine), "steps": cfg.steps, "labels": label_of})
    kept_file = folder / "kept.pt"
    kept: dict[int, torch.Tensor] = read_torch(kept_file, "kept batches") if kept_file.exists() else {}
    if not isinstance(kept, dict) or not all(isinstance(s, int) and isinstance(x, torch.Tensor) for s, x in kept.items()):
        raise ValueError(f"kept batches {kept_file} are not samples by seed; delete it to sample them again")

    def keep(seeds: list[int], x: torch.Tensor) -> None:
        kept.update({s: x[i].clone() for i, s in enumerate(seeds)})
        atomic_write(kept_file, lambda p: torch.save(kept, p))

    todo = pending(cfg.seeds, batch, kept)
    job = _Sampling(machine, cfg.steps, tuple(machine.bank.data.shape), label_of)  # type: ignore[attr-defined]
    make_executor(cfg.executor).map(sample_seeds, job, todo, keep, desc="sample", size=len)
    return torch.stack([kept[s] for s in cfg.seeds])


def machine_for(cfg: SampleConfig) -> tuple[ScoreMachine, torch.Tensor, torch.Tensor | None]:
    """The machine a sampling config describes, with its seeds' noise ``[S, C, H, W]`` and labels (a comparator
    theory where ``cfg.machine`` is a comparator spec; the smoothed closed form gets ``cfg.backend``)."""
    bank = open_bank(cfg.bank) if cfg.bank else MemoryBank(load_dataset(cfg.dataset, resize=cfg.resize, limit=cfg.n_train))
    if cfg.comparator:
        theory = make_comparator(cfg.machine, bank, cfg.conditional, make_backend(cfg.backend))
        return theory, noise_from_seeds(cfg.seeds, bank.data.shape), _labels(cfg, bank.data.labels)  # type: ignore[return-value]
    machine = ScoreMachine(bank, cfg.machine, scales=cfg.scales(), padding=cfg.padding, conditional=cfg.conditional,  # type: ignore[arg-type]
                           backend=make_backend(cfg.backend))
    return machine, noise_from_seeds(cfg.seeds, bank.data.shape), _labels(cfg, bank.data.labels)


def provenance_index(spec: str | None) -> TopKBackend | None:
    """The top-k backend a certified provenance searches with, from a spec such as ``topk:k=256:index=Flat``."""
    if spec is None:
        return None
    backend = make_backend(spec)
    if not isinstance(backend, TopKBackend):
        raise ValueError(f"certified provenance needs a top-k backend spec (e.g. topk:k=256 or topk:k=256:index=Flat), got {spec!r}")
    return backend


def run_explain(sample_dir: str | os.PathLike, m: int = 16, at: list[int] | None = None, out: str | os.PathLike | None = None,
                index: str | None = None, tol: float = 1e-4, image_shares: bool = True) -> Path:
    """Provenance of a ``patchbank sample`` run: re-samples it from its ``config.json`` (checked to give the
    stored samples back), takes :func:`~machines.provenance.provenance` at steps ``at`` (default the last
    five) and writes ``provenance.pt``, ``statistics.json`` and ``provenance.png`` under ``out`` (default the
    sample's folder). ``index``: a top-k backend spec for certified provenance where its certificate gives
    ``ε ≤ tol`` (exact elsewhere). ``image_shares=False``: images ranked by their listed patches' shares
    (lower bounds), much faster where posteriors are broad."""
    from machines.provenance import explain

    folder = Path(sample_dir)
    saved = read_json(folder / "config.json", "sample config")
    cfg = config_from_dict(SampleConfig, {k: v for k, v in saved.items() if k in SampleConfig.__dataclass_fields__},
                           str(folder / "config.json"))
    stored = read_torch(folder / "samples.pt", "samples")
    machine, noise, labels = machine_for(cfg)
    if cfg.comparator:
        raise ValueError(f"provenance is of the patch machines and IS, not of the comparator {cfg.machine}")
    if machine.kind == "ES":
        raise ValueError("provenance for ES is not implemented")
    final, found = explain(machine, noise, cfg.steps, labels, at, m, index=provenance_index(index), tol=tol,
                           image_shares=image_shares)
    if not torch.allclose(final, stored["samples"], rtol=0, atol=1e-6):
        raise ValueError(f"{folder}: re-sampling from its config.json does not give the stored samples back "
                         "(the data, bank or code changed); sample again, then explain")
    return write_explanation(Path(out) if out is not None else folder, cfg.seeds, final, found, machine, labels, m)


def write_explanation(out: Path, seeds: list[int], final: torch.Tensor, found: dict, machine: ScoreMachine,
                      labels: torch.Tensor | None, m: int, extra: dict | None = None) -> Path:
    """Write an explanation: ``provenance.pt`` (every step's :class:`~machines.provenance.Provenance`),
    ``statistics.json`` (mosaic statistics and the memorisation check of the last step, per seed, with
    ``extra``), ``provenance.png`` (sample / attribution map / reassembled mosaic) and ``sources.png`` (the
    first seed's top source images with their patches outlined). Returns the path of ``provenance.png``."""
    from machines.provenance import memorisation, mosaic_statistics

    from .figures import provenance_figure, source_gallery

    out.mkdir(parents=True, exist_ok=True)
    last = max(found)
    data = machine.bank.data
    per_image = [{"seed": seed, **stats, **check} for seed, stats, check in
                 zip(seeds, mosaic_statistics(found[last], labels), memorisation(final, found[last], data))]
    atomic_write(out / "provenance.pt", lambda p: torch.save({"seeds": seeds, "steps": {s: vars(v) for s, v in found.items()}}, p))
    provenance_figure(final, found[last], data, out / "provenance.png")
    gallery = source_gallery(final[0], found[last], data, out / "sources.png")
    certified = {str(s): float((~p.exact).double().mean()) for s, p in found.items()}
    write_json(out / "statistics.json", {"step": last, "t": found[last].t, "P": found[last].scale, "m": m, "certified_fraction": certified,
                                         "image_shares": "listed patches (lower bounds)" if found[last].listed_images else "exact",
                                         "machine": repr(machine), **(extra or {}), "images": per_image,
                                         "first_seed_sources": gallery})
    return out / "provenance.png"


def cycled_labels(train_labels: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` labels cycling through the classes present in ``train_labels`` (sample i gets class i mod #classes)."""
    classes = train_labels.unique()
    return classes[torch.arange(n) % len(classes)]


def _labels(cfg: SampleConfig, train_labels: torch.Tensor) -> torch.Tensor | None:
    if not cfg.conditional:
        return None
    if cfg.labels is None:
        return cycled_labels(train_labels, len(cfg.seeds))
    if len(cfg.labels) != len(cfg.seeds):
        raise ValueError(f"give one label per seed: {len(cfg.labels)} labels for {len(cfg.seeds)} seeds")
    return torch.tensor(cfg.labels)
