"""The ``patchbank`` command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from machines import MACHINES, describe_backends, parse_backend
from machines.comparators import COMPARATORS, comparator_kind, named_spec
from patchbank import BankSpec, PatchBank, ShardedBank, load_dataset, open_bank

from .ablation import AblationConfig, run_ablation
from .executors import check_executor, make_executor
from .jobs import CalibrateConfig, EvaluateConfig, run_calibrate, run_evaluate, run_explain_network
from .sampling import SampleConfig, run_explain, run_sample
from .training import TrainConfig, train


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``0-7`` (a range, both ends included), ``1,5,9`` or a mix such as ``0-3,8``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds must be non-negative integers like 0-7 or 1,5,9, not {text!r}") from None
        if last < first:
            raise argparse.ArgumentTypeError(f"empty seed range {part.strip()!r}: the end comes before the start")
        seeds += list(range(first, last + 1))
    return seeds


def backend_spec(text: str) -> str:
    """A backend spec, checked now (an unknown kind or option is a usage error naming it)."""
    try:
        return str(parse_backend(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def executor_spec(text: str) -> str:
    """An executor spec, checked now (Ray must be installed for ``ray``)."""
    try:
        return check_executor(text)
    except (ValueError, ImportError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def theory_list(text: str) -> tuple[str | None, list[str]]:
    """``bbELS,wiener,smoothed:sigma=0.1`` → the patch machine named (or None) and the comparator specs, in order
    (IS is implied); an unknown theory or comparator option is a usage error naming it."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "IS"]
    patch = [n for n in names if n in ("LS", "ELS", "bbELS")]
    unknown = [n for n in names if comparator_kind(n) is None and n not in ("LS", "ELS", "bbELS")]
    if unknown or len(patch) > 1:
        raise argparse.ArgumentTypeError(f"theories are one of LS, ELS, bbELS (the calibrated machine), IS and the comparators "
                                         f"{', '.join(COMPARATORS)} (with options, e.g. smoothed:sigma=0.1); got {text!r}")
    specs = [n for n in names if n not in patch]
    try:
        for spec in specs:
            named_spec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return (patch[0] if patch else None), specs


def number(text: str) -> int | float:
    """A calibration candidate: an int where the text is one (patch sizes), else a float (a comparator's parameter)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a candidate must be a number, got {text!r}") from None


EXECUTOR_HELP = "where seed batches run: serial, processes:N (local processes) or ray[:ADDRESS] (a Ray cluster; needs the 'ray' extra)"
BACKEND_HELP = "posterior backend spec, e.g. exact, auto, 'auto:se_tol=0.005', 'topk:k=256:tol=1e-4' (list: patchbank backends)"


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its --help shows every option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchbank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress, and show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    d = SampleConfig()
    s = sub.add_parser("sample", help="sample images from an analytic machine and save a PNG grid")
    s.add_argument("--dataset", default=d.dataset, help="mnist, fashion_mnist, cifar10, celeba, two_image, random, an .npz or a folder")
    s.add_argument("--resize", type=int, default=d.resize, help="resize to R×R (0 keeps the original size)")
    s.add_argument("--n-train", type=int, default=d.n_train, help="use the first N training images (0 = all)")
    s.add_argument("--machine", default=d.machine, help=f"one of {', '.join(MACHINES)}, or a comparator spec: "
                   f"{', '.join(COMPARATORS)} with options, e.g. smoothed:sigma=0.1 or pca_locality:threshold=0.05")
    s.add_argument("--schedule", default=d.schedule, help="reference scale schedule (see machines/data/scales.json)")
    s.add_argument("--reading", default=d.reading, choices=["calibrated", "paper"])
    s.add_argument("--scale", type=int, default=None, help="a constant patch scale P instead of the schedule")
    s.add_argument("--padding", default=None, choices=["zeros", "circular"])
    s.add_argument("--conditional", action="store_true")
    s.add_argument("--labels", type=parse_seeds, default=None, help="one label per seed (conditional), e.g. 0,1,2")
    s.add_argument("--seeds", type=parse_seeds, default=d.seeds, help="e.g. 0-7 or 3,5")
    s.add_argument("--steps", type=int, default=d.steps, help="DDIM steps")
    s.add_argument("--bank", default=None, help="a built patch bank to sample from (instead of --dataset)")
    s.add_argument("--backend", type=backend_spec, default=d.backend, help=BACKEND_HELP)
    s.add_argument("--executor", type=executor_spec, default=d.executor, help=EXECUTOR_HELP)
    s.add_argument("--batch", type=int, default=None, help="seeds sampled together (default: all at once; one per task on a parallel executor)")
    s.add_argument("--out", default=d.out, help="output folder (an interrupted sample resumes from its checkpoint there)")

    sub.add_parser("backends", help="list the posterior backends with their options and defaults")

    x = sub.add_parser("explain", help="which training patches made each pixel: of a `patchbank sample` run, or of a "
                       "trained network's samples through its calibrated machine")
    x.add_argument("sample", nargs="?", default=None, help="the output folder of `patchbank sample` (its config.json and samples.pt)")
    x.add_argument("--model", default=None, help="instead of a sample folder: a trained model.pt, explained by its calibrated machine")
    x.add_argument("--calibration", default=None, help="with --model: the network's calibration.json (`patchbank calibrate`)")
    x.add_argument("--seeds", type=parse_seeds, default=None, help="with --model: the network's seeds, e.g. 0-3")
    x.add_argument("--steps", type=int, default=20, help="with --model: DDIM steps")
    x.add_argument("--bank", default=None, help="with --model: a built bank of the network's training data (default: in memory)")
    x.add_argument("--m", type=int, default=16, help="sources listed per pixel")
    x.add_argument("--at", type=int, nargs="+", default=None, help="steps to explain (default: the last five)")
    x.add_argument("--index", type=backend_spec, default=None,
                   help="certified provenance from the bank's index, a top-k spec such as topk:k=256 or topk:k=1024:index=Flat "
                        "(pixels whose certificate fails are scanned exactly; default: exact everywhere)")
    x.add_argument("--tol", type=float, default=1e-4, help="with --index: largest certificate ε kept")
    x.add_argument("--listed-images", action="store_true",
                   help="skip the exact per-image shares and rank images by their listed patches' shares (lower bounds): "
                        "much faster where posteriors are broad; patches, shares, mass and entropy stay exact")
    x.add_argument("--out", default=None, help="output folder (default: the sample's folder; with --model, outputs/explain)")

    b = sub.add_parser("build", help="build (or resume building) a patch bank on disk")
    b.add_argument("out", help="bank directory")
    b.add_argument("--dataset", default="mnist")
    b.add_argument("--resize", type=int, default=0, help="resize to R×R (0 keeps the original size)")
    b.add_argument("--n-train", type=int, default=0, help="use the first N training images (0 = all)")
    b.add_argument("--scales", type=int, nargs="+", required=True, help="odd patch sizes, e.g. 3 5 7")
    b.add_argument("--rules", nargs="+", default=["bbELS"], choices=["LS", "ELS", "bbELS"])
    b.add_argument("--labels", action="store_true", help="also build per-label buckets (conditional machines)")
    b.add_argument("--index", default="Flat", help="FAISS index_factory string: Flat, IVF<n>,Flat, HNSW<M>; 'none' for no index")
    b.add_argument("--leaf-size", type=int, default=2048, help="cluster size for the exact backend's pruning")
    b.add_argument("--materialise-max", type=int, default=None,
                   help="store distinct-patch tables only for P up to this (larger scales are streamed from the images)")
    b.add_argument("--shards", type=int, default=None, help="build the bank in S contiguous parts of the images, one bank "
                   "each (serve it with --backend sharded:shards=S[:placement=ray])")
    b.add_argument("--executor", type=executor_spec, default="serial", help="where the shards are built: " + EXECUTOR_HELP)

    i = sub.add_parser("info", help="describe a built patch bank: data, spec, per-scale sizes and build times")
    i.add_argument("bank", help="bank directory")

    v = sub.add_parser("verify", help="check every stored array of a bank against its checksum (exit 1 if any fails)")
    v.add_argument("bank", help="bank directory")

    dt = TrainConfig()
    tr = sub.add_parser("train", help="train (or resume) an eps-predicting ResNet/UNet")
    tr.add_argument("--config", default=None, help="a JSON file of TrainConfig fields (see configs/); unknown keys are errors")
    tr.add_argument("--iters", type=int, default=None, help=f"training iterations; None keeps the config's (TrainConfig: {dt.iters})")
    tr.add_argument("--n-train", type=int, default=None, help=f"first N training images; None keeps the config's (TrainConfig: {dt.n_train})")
    tr.add_argument("--device", default=None, help=f"cpu, cuda or auto; None keeps the config's (TrainConfig: {dt.device})")
    tr.add_argument("--out", default=None, help=f"output folder: checkpoint, model.pt, config.json; None keeps the config's (TrainConfig: {dt.out})")

    c = sub.add_parser("calibrate", help="calibrate a machine's P(t) (or a comparator's free parameter) to a trained network")
    dc = CalibrateConfig()
    c.add_argument("--model", default=dc.model, help="a trained model.pt (its config.json names the training data)")
    c.add_argument("--machine", default=dc.machine,
                   help="LS, ELS or bbELS: the machine whose P(t) is calibrated (default: the network's rule, bbELS for zero "
                        "padding, ELS for circular); or a comparator spec whose free parameter is fitted: smoothed (sigma), "
                        "pca_locality (threshold; see --parameter), with its other options, e.g. pca_locality:normalise=symmetric")
    c.add_argument("--candidates", type=number, nargs="+", default=dc.candidates,
                   help="patch sizes P to choose from (or, for a comparator, values of its parameter)")
    c.add_argument("--parameter", default=dc.parameter,
                   help="for a comparator: the parameter to fit (default: smoothed's sigma, pca_locality's threshold; "
                        "e.g. temperature)")
    c.add_argument("--seeds", type=parse_seeds, default=dc.seeds, help="seeds of the network trajectories, e.g. 0-7")
    c.add_argument("--steps", type=int, default=dc.steps, help="DDIM steps")
    c.add_argument("--bank", default=None, help="a built bank of the network's training data (default: built in memory)")
    c.add_argument("--backend", type=backend_spec, default=dc.backend, help=BACKEND_HELP)
    c.add_argument("--executor", type=executor_spec, default=dc.executor, help=EXECUTOR_HELP)
    c.add_argument("--batch", type=int, default=None, help="seeds per batch (default: all at once; one per task on a parallel executor)")
    c.add_argument("--out", default=dc.out, help="output folder: calibration.json, scale_curve.png")
    c.add_argument("--dictionary", type=int, default=None,
                   help="the machine's dictionary: the first N of the network's training images (default: all of them; "
                        "with --bank, a bank of exactly those N)")
    c.add_argument("--per-scale", action="store_true",
                   help="one exact pass per candidate P (default: every candidate from one box-sum pass where the backend is "
                        "exact; the same answers to float64 rounding)")

    e = sub.add_parser("evaluate", help="theory vs network agreement of a calibrated machine (with the IS baseline)")
    de = EvaluateConfig()
    e.add_argument("--model", default=de.model, help="a trained model.pt (its config.json names the training data)")
    e.add_argument("--calibration", default=de.calibration, help="the calibration.json whose schedule the machine uses")
    e.add_argument("--machine", default=de.machine, choices=["LS", "ELS", "bbELS"], help="the calibrated machine (default: the calibration's)")
    e.add_argument("--machines", type=theory_list, default=None,
                   help="every theory to compare with the network on the same seeds, e.g. bbELS,wiener,nearest,pca_locality,"
                        "smoothed:sigma=0.1 (the patch machine is the calibrated one, IS always runs; comparators: "
                        f"{', '.join(COMPARATORS)}, each with its options; NAME=SPEC names a variant, e.g. "
                        "pca_sym=pca_locality:normalise=symmetric)")
    e.add_argument("--seeds", type=parse_seeds, default=de.seeds, help="seeds, e.g. 0-99")
    e.add_argument("--steps", type=int, default=de.steps, help="DDIM steps")
    e.add_argument("--bank", default=None, help="a built bank of the network's training data (default: built in memory)")
    e.add_argument("--backend", type=backend_spec, default=de.backend, help=BACKEND_HELP)
    e.add_argument("--executor", type=executor_spec, default=de.executor, help=EXECUTOR_HELP)
    e.add_argument("--batch", type=int, default=de.batch, help="seeds per batch (each batch is kept when done)")
    e.add_argument("--out", default=de.out, help="output folder (resumable; refuses results of another run)")
    e.add_argument("--dictionary", type=int, default=None,
                   help="the machine's dictionary: the first N of the network's training images (default: all of them; "
                        "with --bank, a bank of exactly those N)")
    e.add_argument("--other-network", action="store_true",
                   help="the calibration was made against another network of the same data, padding and conditioning "
                        "(e.g. an attention UNet at the ResNet's calibrated scales, as the paper does); only the weights may differ")
    ab = sub.add_parser("ablate", help="exact-vs-approximate ablation grid and the posterior-concentration study")
    da = AblationConfig()
    ab.add_argument("--config", default=None, help="a JSON of AblationConfig fields, e.g. a previous run's config.json (re-runs it)")
    ab.add_argument("--dataset", default=None, help=f"default {da.dataset}")
    ab.add_argument("--resize", type=int, default=None, help=f"default {da.resize} (0 keeps the original size)")
    ab.add_argument("--n-train", type=int, default=None, help=f"default {da.n_train} (0 = all)")
    ab.add_argument("--machine", default=None, help=f"LS, ELS or bbELS (default {da.machine}), or a comparator spec such as "
                    "smoothed:sigma=0.1 (its IS posteriors go through the grid's backends) or pca_locality (exact entries only)")
    ab.add_argument("--conditional", action="store_true", default=None)
    ab.add_argument("--schedule", default=None, help=f"reference scale schedule, default {da.schedule}")
    ab.add_argument("--calibration", default=None, help="a calibration.json to use as the schedule instead")
    ab.add_argument("--seeds", type=parse_seeds, default=None, help="default 0-1")
    ab.add_argument("--steps", type=int, default=None)
    ab.add_argument("--grid", nargs="+", default=None,
                    help="backend specs (optionally with :device=cuda), e.g. exact topk:k=64 'topk:k=256:index=IVF64,Flat:nprobe=8'")
    ab.add_argument("--banks", default=None, help=f"where per-index banks are built and reused (default {da.banks})")
    ab.add_argument("--materialise-max", type=int, default=None)
    ab.add_argument("--reference-batch", type=int, default=None,
                    help="seeds per exact-reference batch (default all); 1 keeps each seed as it finishes (resumable)")
    ab.add_argument("--reference-dtype", choices=["float64", "float32"], default=None,
                    help="precision of the exact reference (default float64; float32 is ~1.6x faster and matches it to r >= 1 - 1e-12)")
    ab.add_argument("--variant-batch", type=int, default=None,
                    help="seeds per batch of each configuration's run (default all); each batch is kept when done (resumable)")
    ab.add_argument("--model", default=None, help="a trained model.pt: also report machine-vs-network agreement")
    ab.add_argument("--executor", type=executor_spec, default=None, help="where the exact reference's seed batches run (default serial): "
                    "serial, processes:N or ray[:ADDRESS]")
    ab.add_argument("--no-teacher-forced", dest="teacher_forced", action="store_false", default=None)
    ab.add_argument("--no-concentration", dest="concentration", action="store_false", default=None)
    ab.add_argument("--concentration-times", type=float, nargs="+", default=None)
    ab.add_argument("--concentration-scales", type=int, nargs="+", default=None)
    ab.add_argument("--concentration-pixels", type=int, default=None, help="pixels per (t, P) of both studies")
    ab.add_argument("--certificate-ks", type=int, nargs="+", default=None,
                    help="the certificate study: pixels each top-k entry certifies at these k (default: no study)")
    ab.add_argument("--certificate-times", type=float, nargs="+", default=None, help="its times (default: --concentration-times)")
    ab.add_argument("--out", default=None, help=f"default {da.out}")
    return parser


def _ablation_config(args: argparse.Namespace) -> AblationConfig:
    cfg = AblationConfig.from_json(args.config) if args.config else AblationConfig()
    for f in fields(AblationConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, (value or None) if f.name in ("resize", "n_train", "materialise_max", "reference_batch", "variant_batch") else value)
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Run one command. A user error (bad option, missing file, a bank or folder that does not fit) is one
    line ``patchbank <command>: error: …`` and exit status 2; ``--verbose`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _run(args)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError, ArithmeticError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk outside atomic_write
            message = (f"no space left on the disk holding {err.filename or 'the output'}: free some space and re-run; "
                       "finished work is kept")
        print(f"patchbank {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "sample":
        values = {f.name: getattr(args, f.name) for f in fields(SampleConfig)}
        values["resize"] = values["resize"] or None
        values["n_train"] = values["n_train"] or None
        print(run_sample(SampleConfig(**values)))
    elif args.command == "backends":
        print(describe_backends())
    elif args.command == "explain":
        if (args.sample is None) == (args.model is None):
            raise ValueError("give either a sample folder or --model (with --calibration and --seeds), not both or neither")
        if args.model is None:
            print(run_explain(args.sample, args.m, args.at, args.out, args.index, args.tol, not args.listed_images))
        elif args.calibration is None or args.seeds is None:
            raise ValueError("--model needs --calibration (the network's calibration.json) and --seeds")
        else:
            print(run_explain_network(args.model, args.calibration, args.seeds, args.steps, args.m, args.at,
                                      args.out or "outputs/explain", args.bank, args.index, args.tol, not args.listed_images))
    elif args.command == "build":
        index = None if args.index.lower() == "none" else args.index
        spec = BankSpec(scales=args.scales, rules=args.rules, labels=args.labels, index=index, leaf_size=args.leaf_size,
                        materialise_max=args.materialise_max)
        data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
        if args.shards is None:
            if args.executor != "serial":
                raise ValueError("--executor builds the shards of a sharded bank; give --shards S")
            bank: PatchBank | ShardedBank = PatchBank.build(data, args.out, spec)
        else:
            executor = make_executor(args.executor)
            bank = ShardedBank.build(data, args.out, spec, args.shards, lambda fn, job, items, done: executor.map(
                fn, job, items, done, desc="building shards"))
        print(json.dumps(bank.info(), indent=1))
    elif args.command == "info":
        print(json.dumps(open_bank(args.bank).info(), indent=1))
    elif args.command == "verify":
        problems = open_bank(args.bank).verify()
        for bucket, found in problems.items():
            print(f"{bucket}: {'; '.join(found)}")
        print(f"{args.bank}: {'intact' if not problems else f'{len(problems)} damaged bucket(s); re-run its build to repair them'}")
        if problems:
            raise SystemExit(1)
    elif args.command == "train":
        cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig()
        for name in ("iters", "n_train", "device", "out"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        print(train(cfg))
    elif args.command == "calibrate":
        result = run_calibrate(CalibrateConfig(**{f.name: getattr(args, f.name) for f in fields(CalibrateConfig)}))
        print(json.dumps(result["parameter"]) if "parameter" in result else json.dumps(result["schedule"]))
    elif args.command == "evaluate":
        values = {f.name: getattr(args, f.name) for f in fields(EvaluateConfig) if f.name != "comparators"}
        patch, values["comparators"] = args.machines or (None, [])
        if patch is not None and args.machine is not None and patch != args.machine:
            raise ValueError(f"--machines names {patch} but --machine {args.machine}")
        values["machine"] = values["machine"] or patch
        report = run_evaluate(EvaluateConfig(**values))
        print(json.dumps(report, indent=1))
    elif args.command == "ablate":
        report = run_ablation(_ablation_config(args))
        print((Path(report["config"]["out"]) / "summary.md").read_text())


if __name__ == "__main__":
    main()
