"""Calibration and evaluation jobs: typed configs → files, the same functions the CLI calls.

The machine's bank is the network's own training set (read from the model's
``config.json``: dataset, resize, n_train), or a built bank given with ``bank``. ``n_train = N``
gives the machine only the first N of those images (how much of the network's data the theory needs
to predict it); a bank must then hold exactly those N. The machine
follows the network (see :mod:`pipelines.pairing`): by default bbELS for a zero-padded network and
circular ELS for a circularly padded one, conditional when the network is; a calibration records
the network it was calibrated against, and evaluating another network with it is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from machines import Denoiser, ScoreMachine, noise_from_seeds, reference_schedule
from machines.comparators import COMPARATORS, comparator_kind, make_comparator, named_spec, parse_comparator
from patchbank import Bank, ImageData, MemoryBank, load_dataset, open_bank
from patchbank.atomic import folder_lock, read_torch, write_json

from .calibration import best_constant, calibrate, schedule_from, write_calibration
from .evaluation import evaluate, read_rows
from .executors import batch_for
from .figures import agreement_scatter, image_pairs, scale_curve
from .networks import NetworkDenoiser
from .pairing import RULE_PADDING, calibration_record, check_calibration, machine_for, paper_schedule_name
from .runs import check_fields, check_run_options, read_json, seed_labels
from .shipped import calibration_for, resolve_model
from .training import load_network

log = logging.getLogger(__name__)

PATCH_CANDIDATES = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]


@dataclass
class CalibrateConfig:
    """``machine``: a patch machine (LS, ELS, bbELS; None: the network's rule), whose P(t) is calibrated over the
    ``candidates`` patch sizes, or a comparator spec with a free parameter (``smoothed``, ``pca_locality:normalise=symmetric``),
    whose ``parameter`` (default: σ, the mask threshold) is fitted over the ``candidates`` values, which must then be given."""

    model: str = "outputs/train/model.pt"
    machine: str | None = None  # None: the network's rule (bbELS for zero padding, ELS for circular)
    candidates: list[int] | list[float] = field(default_factory=lambda: list(PATCH_CANDIDATES))
    parameter: str | None = None  # a comparator's parameter to fit (None: its default, e.g. sigma, threshold)
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    steps: int = 20
    bank: str | None = None
    backend: str = "exact"  # a backend spec (see `patchbank backends`); every candidate machine gets its own
    executor: str = "serial"  # serial, processes:N or ray[:ADDRESS] (see pipelines.executors)
    batch: int | None = None  # seeds per batch (None: all at once, or one per task on a parallel executor)
    out: str = "outputs/calibrate"
    n_train: int | None = None  # the machine's bank: the first N of the network's training images (None: all)
    per_scale: bool = False  # one pass per candidate P, not every P from one box-sum pass
    clip: bool = False  # the network's x̂0 clipped to the data range [-1, 1] at every step (see NetworkDenoiser)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and the options' consistency, checked before anything is written."""
        check_fields(self)
        comparator = self.machine is not None and comparator_kind(self.machine) is not None
        if comparator:
            name, _ = parse_comparator(self.machine)  # type: ignore[arg-type]
            cls = COMPARATORS[name]
            numeric = [p for p, kind in cls.PARAMETERS.items() if kind is float]
            if self.parameter is None and cls.CALIBRATED is None:
                raise ValueError(f"the {name} comparator has no free parameter to calibrate")
            if self.parameter is not None and self.parameter not in numeric:
                raise ValueError(f"the {name} comparator cannot fit {self.parameter!r}; its parameters: {', '.join(numeric) or 'none'}")
            if list(self.candidates) == PATCH_CANDIDATES:
                raise ValueError(f"give the values of {self.parameter or cls.CALIBRATED} to try as candidates (the default "
                                 "candidates are patch sizes)")
        elif self.parameter is not None:
            raise ValueError("--parameter is for comparators; a patch machine's calibration fits its patch size P(t)")
        _check_job(None if comparator else self.machine, self.seeds, self.steps, self.backend, self.executor, self.batch,
                   self.n_train)
        if not self.candidates:
            raise ValueError("give at least one candidate patch size (or parameter value)")


@dataclass
class EvaluateConfig:
    model: str = "outputs/train/model.pt"
    calibration: str | None = None  # None: a shipped network's own, else outputs/calibrate/calibration.json
    machine: str | None = None  # None: the calibration's machine
    seeds: list[int] = field(default_factory=lambda: list(range(100)))
    steps: int = 20
    bank: str | None = None
    backend: str = "exact"  # a backend spec for the calibrated machine (the IS baseline is always exact)
    executor: str = "serial"  # serial, processes:N or ray[:ADDRESS] (see pipelines.executors)
    batch: int = 10
    comparators: list[str] = field(default_factory=list)  # more theories on the same seeds, as specs: wiener, smoothed:sigma=0.1
    out: str = "outputs/evaluate"
    other_network: bool = False  # the calibration belongs to another network of the same data, padding and conditioning
    n_train: int | None = None  # the machine's bank: the first N of the network's training images (None: all)
    clip: bool = False  # the network's x̂0 clipped to the data range [-1, 1] at every step (see NetworkDenoiser)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and the options' consistency, checked before anything is written."""
        check_fields(self)
        _check_job(self.machine, self.seeds, self.steps, self.backend, self.executor, self.batch, self.n_train)
        names = [named_spec(spec)[0] for spec in self.comparators]  # unknown names and options are errors
        if len(set(names)) != len(names):
            raise ValueError("a comparator is listed twice (each theory is one column of the table; name variants, "
                             "e.g. pca_sym=pca_locality:normalise=symmetric)")


def _check_job(machine: str | None, seeds: list[int], steps: int, backend: str, executor: str, batch: int | None,
               n_train: int | None = None) -> None:
    """The options every calibration or evaluation needs right, checked before anything is written."""
    if machine is not None and machine not in RULE_PADDING:
        raise ValueError(f"machine must be a patch machine (LS, ELS, bbELS), got {machine!r}")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
        raise ValueError(f"n_train must be a number of images ≥ 1 (None: all the network's training images), got {n_train!r}")
    check_run_options(seeds, steps, backend, executor, batch)


TABLES_UP_TO = 3
"""Calibration and evaluation keep distinct-patch tables (and their clusters) for P ≤ 3 only and stream
larger scales from the images: a conditional run touches each (label, P) table for a few steps, and
under the bank's table budget the tables of eight candidate scales evict each other every step (docs/reference.md,
"Calibration"). Answers are the same either way."""


def _setup(model: str, bank_path: str | None, tables_up_to: int | None = None, n_train: int | None = None,
           clip: bool = False):
    """The network (``clip``: its x̂0 clipped to [-1, 1]), the bank of its training set (``n_train``: of its first N
    images only), and its training config. ``tables_up_to``: largest P with distinct-patch tables in a bank built
    here (None: every P; provenance needs them)."""
    model = resolve_model(model)
    network = load_network(model)
    network.clip = clip
    train_cfg = read_json(Path(model).parent / "config.json", "the model's training config")
    data = None
    if bank_path is None or n_train is not None:
        data = _training_images(train_cfg, model, n_train)
    bank: Bank
    if bank_path:
        bank = open_bank(bank_path)
        want, what = (data.fingerprint(), f"the first {len(data)} of the images") if data is not None else \
            (train_cfg["fingerprint"], "the images")
        if bank.data.fingerprint() != want:
            raise ValueError(f"bank {bank_path} holds other data ({bank.data.name}, {len(bank)} images, fingerprint "
                             f"{bank.data.fingerprint()[:12]}) than {what} the network {model} was trained on ({train_cfg['dataset']}, "
                             f"{train_cfg.get('train_images', '?')} images, fingerprint {want[:12]})")
    else:
        assert data is not None
        bank = MemoryBank(data, materialise_max=tables_up_to)
    return network, bank, train_cfg


def _training_images(train_cfg: dict, model: str, n_train: int | None) -> ImageData:
    """The network's training images (``n_train``: the first N of them), checked to be the data it was
    trained on; with a conditional network, every label it was trained on must keep images."""
    data = load_dataset(train_cfg["dataset"], resize=train_cfg["resize"], limit=train_cfg["n_train"])
    if n_train is None:
        return data
    if data.fingerprint() != train_cfg["fingerprint"]:
        raise ValueError(f"{train_cfg['dataset']} as loaded here (fingerprint {data.fingerprint()[:12]}) is not the data the "
                         f"network {model} was trained on (fingerprint {str(train_cfg['fingerprint'])[:12]}); a subset "
                         "of its first images cannot be taken")
    if n_train > len(data):
        raise ValueError(f"{n_train} training images asked, but the network {model} was trained on {len(data)}")
    part = data.subset(n_train)
    if train_cfg.get("conditional"):
        missing = sorted(set(data.labels.unique().tolist()) - set(part.labels.unique().tolist()))
        if missing:
            raise ValueError(f"the first {n_train} training images hold no image of label(s) {missing}, which the "
                             f"conditional network {model} was trained on; give a larger n_train")
    return part


def _labels_of(train_cfg: dict, seeds: list[int], bank: Bank) -> dict[int, int] | None:
    if not train_cfg["conditional"]:
        return None
    classes = bank.labels.unique().tolist()
    return {s: int(classes[s % len(classes)]) for s in seeds}


def run_calibrate(cfg: CalibrateConfig) -> dict:
    """Calibrate (or resume) the machine to the network; writes ``calibration.json`` and ``scale_curve.png`` under
    ``cfg.out`` (locked while it runs: a second run into the same folder fails at once)."""
    cfg.check()
    setup = _setup(cfg.model, cfg.bank, TABLES_UP_TO, cfg.n_train, cfg.clip)  # a bad model or bank fails before anything is written
    comparator = cfg.machine is not None and comparator_kind(cfg.machine) is not None
    with folder_lock(cfg.out):
        return (_calibrate_comparator if comparator else _calibrate_machine)(cfg, *setup)


def _calibrate_machine(cfg: CalibrateConfig, network: NetworkDenoiser, bank: Bank, train_cfg: dict) -> dict:
    kind = machine_for(train_cfg, cfg.machine, cfg.model)
    labels_of = _labels_of(train_cfg, cfg.seeds, bank)
    labels = seed_labels(labels_of, cfg.seeds)
    cond = bool(train_cfg["conditional"])
    result = calibrate(network, lambda P: ScoreMachine(bank, kind, scales=P, conditional=cond, backend=cfg.backend),  # type: ignore[arg-type]
                       cfg.candidates, cfg.seeds, bank.data.shape, cfg.steps, labels, batch=batch_for(cfg.batch, cfg.executor),
                       executor=cfg.executor, resume=Path(cfg.out) / "seeds", scales_at_once=not cfg.per_scale)
    result["config"] = {**asdict(cfg), "machine": kind}
    result["network"] = calibration_record(cfg.model, network.identity()["weights"], train_cfg, kind, len(bank))
    out = Path(cfg.out)
    paper = paper_schedule(train_cfg)
    if paper is not None:
        result["paper_schedule"] = paper
    write_calibration(result, out / "calibration.json")
    scale_curve(result["schedule"], out / "scale_curve.png", paper["schedule"] if paper else None)
    return result


def _calibrate_comparator(cfg: CalibrateConfig, network: NetworkDenoiser, bank: Bank, train_cfg: dict) -> dict:
    """Fit a comparator's free parameter to the network: the candidate values' ε̂ similarity along the network's
    trajectories (per time, as for P), and the one value the comparator keeps (:func:`best_constant`)."""
    name, options = parse_comparator(cfg.machine)  # type: ignore[arg-type]
    parameter = cfg.parameter or COMPARATORS[name].CALIBRATED
    labels_of = _labels_of(train_cfg, cfg.seeds, bank)
    cond = bool(train_cfg["conditional"])
    result = calibrate(network, lambda v: make_comparator(name, bank, cond, cfg.backend, **{**options, parameter: v}),  # type: ignore[misc]
                       cfg.candidates, cfg.seeds, bank.data.shape, cfg.steps, seed_labels(labels_of, cfg.seeds),
                       batch=batch_for(cfg.batch, cfg.executor), executor=cfg.executor, resume=Path(cfg.out) / "seeds")
    best, scores = best_constant(result)
    chosen = make_comparator(name, bank, cond, cfg.backend, **{**options, parameter: best})  # type: ignore[misc]
    result["parameter"] = {"name": parameter, "value": best, "spec": chosen.spec(), "median_mean_similarity": scores}
    result["config"] = asdict(cfg)
    result["network"] = calibration_record(cfg.model, network.identity()["weights"], train_cfg, name, len(bank))
    write_calibration(result, Path(cfg.out) / "calibration.json")
    return result


def calibrated(model: str, calibration: str, machine: str | None = None, bank: str | None = None, backend: str = "exact",
               other_network: bool = False, tables_up_to: int | None = TABLES_UP_TO, n_train: int | None = None,
               clip: bool = False):
    """A trained network and its calibrated machine: ``(network, machine, train_cfg)``, the calibration checked
    to belong to this network (see :mod:`pipelines.pairing`; ``other_network``: to a network of the same data,
    padding and conditioning); ``machine`` defaults to the calibration's. ``n_train``: the machine holds the
    first N training images only (a calibration made with another number is used with a warning). ``clip``: the
    network's x̂0 clipped to [-1, 1] at every step."""
    network, patches, train_cfg = _setup(model, bank, tables_up_to, n_train, clip)
    found = read_json(calibration, "calibration")
    made_for = found.get("network", {}).get("machine") or found.get("config", {}).get("machine")
    kind = machine or made_for or machine_for(train_cfg, None, model)
    check_calibration(found, calibration, model, network.identity()["weights"], train_cfg, kind, other_network, len(patches))
    machine_for(train_cfg, kind, model)
    cond = bool(train_cfg["conditional"])
    schedule = schedule_from(found, f"calibration {calibration}")
    return network, ScoreMachine(patches, kind, scales=schedule, conditional=cond, backend=backend), train_cfg  # type: ignore[arg-type]


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate (or resume) the network against its calibrated machine, IS and the comparators; writes the report,
    per-seed rows, samples and figures under ``cfg.out`` (locked while it runs: a second run into it fails at once)."""
    cfg.check()
    calibration = calibration_for(cfg.model, cfg.calibration)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model), calibration=calibration)
    found = calibrated(cfg.model, calibration, cfg.machine, cfg.bank, cfg.backend, cfg.other_network, n_train=cfg.n_train,
                       clip=cfg.clip)
    with folder_lock(cfg.out, reentrant=True):  # evaluate() takes the same lock
        return _run_evaluate(cfg, *found)


def _run_evaluate(cfg: EvaluateConfig, network: NetworkDenoiser, machine: ScoreMachine, train_cfg: dict) -> dict:
    assert cfg.calibration is not None
    found = read_json(cfg.calibration, "calibration")
    calibrated_on = found.get("network", {}).get("model")
    if bool(found.get("config", {}).get("clip", False)) != cfg.clip:
        log.warning("%s was calibrated with the network's x̂0 %s; this evaluation %s it", cfg.calibration,
                    "clipped" if not cfg.clip else "unclipped", "clips" if cfg.clip else "does not clip")
    bank, kind, schedule, cond = machine.bank, machine.kind, machine.scales, machine.conditional
    assert schedule is not None, "a calibrated machine follows its schedule"
    ideal = ScoreMachine(bank, "IS", conditional=cond)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"evaluate": {**asdict(cfg), "machine": kind}, "train": train_cfg})
    paper = paper_schedule(train_cfg)
    others: dict[str, Denoiser] = {name: make_comparator(spec, bank, cond) for name, spec in map(named_spec, cfg.comparators)}
    report = evaluate(network, machine, ideal, cfg.seeds, bank.data.shape, out, cfg.steps, _labels_of(train_cfg, cfg.seeds, bank),
                      cfg.batch, executor=cfg.executor, others=others, config={**asdict(cfg), "machine": kind, "schedule": schedule.to_json(),
                                                                "paper_schedule": paper, "calibrated_on": calibrated_on})
    samples = read_torch(out / "samples.pt", "evaluation samples")
    image_pairs(samples, out / "pairs.png")
    agreement_scatter(read_rows(out / "per_seed.jsonl"), out / "scatter.png")
    scale_curve(schedule.to_json(), out / "scale_curve.png", paper["schedule"] if paper else None)
    return report


def paper_schedule(train_cfg: dict) -> dict | None:
    """``{"name", "schedule": [[t, P], …]}``: the paper's calibrated schedule for a network like this one, or None."""
    name = paper_schedule_name(train_cfg)
    return None if name is None else {"name": name, "schedule": reference_schedule(name).to_json()}


def run_explain_network(model: str, calibration: str, seeds: list[int], steps: int = 20, m: int = 16,
                        at: list[int] | None = None, out: str = "outputs/explain", bank: str | None = None,
                        index: str | None = None, tol: float = 1e-4, image_shares: bool = True) -> Path:
    """Which training data a trained network's output came from, by its calibrated machine: samples the
    network from ``seeds``, and at steps ``at`` (default the last five) takes the machine's exact
    provenance at the network's own states, with the Pearson r of the machine's x̂0 against the
    network's there (how far the explanation can be trusted). Writes what ``patchbank explain`` writes
    for a machine's sample; returns the path of ``provenance.png``. ``index``, ``tol``: certified
    provenance, and ``image_shares`` (see :func:`pipelines.sampling.run_explain`)."""
    from machines.provenance import explain

    from .sampling import provenance_index, write_explanation

    check_run_options(seeds, steps, "exact", "serial", None)
    network, machine, train_cfg = calibrated(model, calibration, bank=bank, tables_up_to=None)  # provenance reads tables
    labels = seed_labels(_labels_of(train_cfg, seeds, machine.bank), seeds)
    noise = noise_from_seeds(seeds, machine.bank.data.shape, torch.float64)
    final, found = explain(machine, noise, steps, labels, at, m, along=network, index=provenance_index(index), tol=tol,
                           image_shares=image_shares)
    agreement = {str(s): p.agreement.tolist() for s, p in found.items() if p.agreement is not None}
    return write_explanation(Path(out), seeds, final, found, machine, labels, m,
                             extra={"network": model, "calibration": calibration, "agreement_r": agreement})


@dataclass
class ExplainConfig:
    """Which training patches made each pixel: of a ``patchbank sample`` run (``sample``: its folder), or of a trained
    network's samples through its calibrated machine (``model`` with ``calibration`` and ``seeds``). ``m``: sources
    listed per pixel; ``at``: steps explained (None: the last five); ``topk``: a top-k backend spec for certified
    provenance where its certificate gives ``ε ≤ tol`` (None: exact everywhere); ``listed_images``: rank images by
    their listed patches' shares (lower bounds) instead of exact per-image shares; ``out``: the output folder (None:
    the sample's folder, or ``outputs/explain`` for a network)."""

    sample: str | None = None
    model: str | None = None
    calibration: str | None = None
    seeds: list[int] | None = None
    steps: int = 20
    bank: str | None = None
    m: int = 16
    at: list[int] | None = None
    topk: str | None = None
    tol: float = 1e-4
    listed_images: bool = False
    out: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and range, and that exactly one of a sample folder and a network is explained."""
        check_fields(self, {"steps": (1, None, "[)"), "m": (1, None, "[)"), "at": (0, None, "[)"), "tol": (0, None, "()"),
                            "seeds": (0, None, "[)")})
        if (self.sample is None) == (self.model is None):
            raise ValueError("give either a sample folder or --model (with --calibration and --seeds), not both or neither")
        if self.model is not None and self.seeds is None:
            raise ValueError("--model needs --seeds (and --calibration, the network's calibration.json, unless it ships)")
        if self.sample is not None and (self.calibration, self.seeds, self.bank) != (None, None, None):
            raise ValueError("--calibration, --seeds and --bank explain a network (--model); a sample folder has its own")


def run_explain_job(cfg: ExplainConfig) -> Path:
    """:func:`~pipelines.sampling.run_explain` of a sample folder or :func:`run_explain_network` of a network, as the
    config says; the path of ``provenance.png``."""
    cfg.check()
    if cfg.sample is not None:
        from .sampling import run_explain

        return run_explain(cfg.sample, cfg.m, cfg.at, cfg.out, cfg.topk, cfg.tol, not cfg.listed_images)
    assert cfg.model is not None and cfg.seeds is not None
    calibration = calibration_for(cfg.model, cfg.calibration)
    return run_explain_network(cfg.model, calibration, cfg.seeds, cfg.steps, cfg.m, cfg.at, cfg.out or "outputs/explain",
                               cfg.bank, cfg.topk, cfg.tol, not cfg.listed_images)
