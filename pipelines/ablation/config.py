"""What an ablation run is: its config, its grid entries, and the keys its resumable results are filed under."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from machines import Backend, BackendSpec, ScaleSchedule, parse_backend, reference_schedule
from machines.posterior.exact import ExactBackend
from patchbank import ImageData, load_dataset
from patchbank.geometry import check_scale

from ..runs import check_fields, config_from_dict, read_json

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
    executor: str = "serial"  # where the exact reference's seed batches run: serial, processes:N, ray[:ADDRESS]
    model: str | None = None  # a trained network (model.pt): machine-vs-network agreement per row
    teacher_forced: bool = True
    concentration: bool = True
    concentration_times: list[float] = field(default_factory=lambda: [0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85, 0.95])
    concentration_scales: list[int] | None = None  # default: the schedule's scales
    concentration_pixels: int = 32
    concentration_mass: float = 1e-3
    certificate_ks: list[int] = field(default_factory=list)  # the certificate study's k values (empty: no study)
    certificate_times: list[float] | None = None  # its times, P from the schedule (default: concentration_times)
    out: str = "outputs/ablate"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and range, checked before anything is written (also after the CLI overrides fields)."""
        times = (0, 1, "(]")
        check_fields(self, {"resize": (1, None, "[)"), "n_train": (1, None, "[)"), "seeds": (0, None, "[)"),
                            "steps": (1, None, "[)"), "materialise_max": (0, None, "[)"), "reference_batch": (1, None, "[)"),
                            "variant_batch": (1, None, "[)"), "concentration_times": times, "concentration_scales": (1, None, "[)"),
                            "concentration_pixels": (1, None, "[)"), "concentration_mass": (0, 1, "()"),
                            "certificate_ks": (1, None, "[)"), "certificate_times": times},
                     {"split": ("train", "test"), "reading": ("calibrated", "paper"), "reference_dtype": ("float64", "float32")})
        for P in self.concentration_scales or []:
            check_scale(P)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AblationConfig:
        values = read_json(path, "ablation config")
        if isinstance(values, dict) and "ablation" in values:  # a results' config.json: {"ablation": …, "environment": …}
            values = values["ablation"]
        return config_from_dict(cls, values, str(path))


@dataclass(frozen=True)
class Variant:
    """One grid entry: a backend spec (:mod:`machines.posterior.registry`), optionally with ``:device=…``
    (where the configuration runs; default cpu). ``name`` is the entry as written."""

    name: str
    spec: BackendSpec
    device: str = "cpu"

    @classmethod
    def parse(cls, text: str) -> Variant:
        items = text.split(":")
        device = [i.partition("=")[2] for i in items if i.startswith("device=")]
        spec = ":".join(i for i in items if not i.startswith("device="))
        try:
            return cls(text, parse_backend(spec), device[-1] if device else "cpu")
        except ValueError as err:
            raise ValueError(f"grid entry {text!r}: {err}") from None

    @property
    def kind(self) -> str:
        return self.spec.kind

    def backend(self) -> Backend:
        """A fresh backend for this entry."""
        return self.spec.build()


def comparator_of(cfg: AblationConfig) -> tuple[str, dict, bool] | None:
    """For an ablation of a comparator theory (``machine`` a comparator spec such as ``smoothed:sigma=0.1``):
    its name, options and whether its posteriors go through the grid's backends; None for a patch machine."""
    from machines.comparators import COMPARATORS, comparator_kind, parse_comparator

    if comparator_kind(cfg.machine) is None:
        return None
    name, options = parse_comparator(cfg.machine)
    return name, options, COMPARATORS[name].TAKES_BACKEND


def exact_part(backend: Backend) -> ExactBackend:
    """The exact sums a backend's answers rest on: the backend itself, or its exact fallback."""
    return backend if isinstance(backend, ExactBackend) else backend.exact  # type: ignore[attr-defined]


def reference_variant(cfg: AblationConfig) -> Variant:
    """The exact backend of the reference run (named ``exact`` in float64, so older references stay valid)."""
    if cfg.reference_dtype not in ("float32", "float64"):
        raise ValueError(f"reference_dtype must be float32 or float64, not {cfg.reference_dtype!r}")
    return Variant.parse("exact" if cfg.reference_dtype == "float64" else f"exact:dtype={cfg.reference_dtype}")


def slack(cfg: AblationConfig, backend: Backend) -> float:
    """Round-off allowed between a row's measured error and its bound."""
    float32 = exact_part(backend).dtype == torch.float32 or cfg.reference_dtype == "float32"
    return FLOAT32_SLACK if float32 else BOUND_SLACK


def schedule_of(cfg: AblationConfig) -> ScaleSchedule:
    """The run's scale schedule: its calibration file, else the named reference schedule."""
    if cfg.calibration:
        from ..calibration import schedule_from

        return schedule_from(read_json(cfg.calibration, "calibration"), f"calibration {cfg.calibration}")
    return reference_schedule(cfg.schedule, cfg.reading)  # type: ignore[arg-type]


def held_out(cfg: AblationConfig) -> ImageData:
    """Images for the concentration queries: the test split where there is one, else the training set."""
    try:
        return load_dataset(cfg.dataset, split="test", resize=cfg.resize, limit=max(64, cfg.concentration_pixels))
    except (ValueError, KeyError, FileNotFoundError):
        return load_dataset(cfg.dataset, split="test" if cfg.split == "test" else "train", resize=cfg.resize, limit=max(64, cfg.concentration_pixels))


def slug(name: str) -> str:
    """A file name for a grid entry."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


# ---- keys of resumable results ----------------------------------------------------------------
_KEY_FIELDS = ("dataset", "resize", "n_train", "split", "machine", "conditional", "schedule", "reading", "calibration",
               "seeds", "steps", "materialise_max", "model", "teacher_forced")


def variant_key(key: dict, v: Variant) -> dict:
    """What a configuration's stored result depends on: the run's data and schedule, the entry, the reference precision."""
    cfg = {k: val for k, val in key["ablation"].items() if k in _KEY_FIELDS}
    if key["ablation"].get("reference_dtype", "float64") != "float64":  # errors are measured against the reference
        cfg["reference_dtype"] = key["ablation"]["reference_dtype"]
    return {"config": cfg, "fingerprint": key["fingerprint"], "variant": v.name}


def without_seeds(key: dict) -> dict:
    """A configuration's key without the run's seed list: the base of the key of one seed (reference)
    or seed batch (configuration), so a run with more seeds — or one split over processes by seed —
    reuses every finished one."""
    return {**key, "config": {k: val for k, val in key["config"].items() if k != "seeds"}}


def part_key(key: dict, v: Variant, seeds: list[int], labels: list | None) -> dict:
    """Key of one seed batch of a configuration: its own seeds (and labels), not the run's seed list."""
    return {**without_seeds(variant_key(key, v)), "seeds": seeds, "labels": labels}


def concentration_key(cfg: AblationConfig, schedule: ScaleSchedule, fingerprint: str) -> dict:
    """What the concentration study depends on (neither the grid nor the seeds)."""
    fields = ("dataset", "resize", "n_train", "split", "machine", "concentration_times", "concentration_pixels",
              "concentration_mass")
    return {**{k: getattr(cfg, k) for k in fields}, "scales": cfg.concentration_scales or sorted(set(schedule.scales)),
            "fingerprint": fingerprint}
