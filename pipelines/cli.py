"""The ``patchbank`` command line: a thin shell over the Python API.

Each subcommand is one small function that turns its arguments into its config (:func:`config_from`: the
config's defaults, or ``--config FILE``, then every option given) and calls the API. Options left out keep the
config's value; specs (``--backend``, ``--executor``, comparators) share one grammar (:mod:`patchbank.specs`) and
are checked when parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from machines import MACHINES, describe_backends, parse_backend
from machines.comparators import COMPARATORS, comparator_kind, named_spec
from patchbank import BankSpec, PatchBank, ShardedBank, load_dataset, open_bank

from .ablation import AblationConfig, run_ablation
from .executors import check_executor, make_executor
from .jobs import CalibrateConfig, EvaluateConfig, ExplainConfig, run_calibrate, run_evaluate, run_explain_job
from .runs import config_from_dict, read_json
from .sampling import SampleConfig, run_sample
from .training import TrainConfig, train

C = TypeVar("C")
OMIT = argparse.SUPPRESS  # every option's default: an option left out keeps the config's value


# ---- argument types ------------------------------------------------------------------------------------------------
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


def _checked(check: Callable[[str], Any], errors: tuple[type[Exception], ...] = (ValueError,)) -> Callable[[str], str]:
    """An argument type that checks a spec now (an unknown kind or option is a usage error naming it)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except errors as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text.strip()
    parse.__name__ = check.__name__
    return parse


backend_spec = _checked(parse_backend)
executor_spec = _checked(check_executor, (ValueError, ImportError))


def count(text: str) -> int | None:
    """A count of images or pixels where 0 means all (None)."""
    value = int(text)
    return None if value == 0 else value


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


# ---- arguments → config ------------------------------------------------------------------------------------------
def config_from(cls: type[C], args: argparse.Namespace) -> C:
    """The config of a subcommand: ``--config FILE`` where given (else the class's defaults), with every option given
    on the command line in place of its field (options are named as the config's fields); built once, so its
    checks run on the values the job will use, before anything runs."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in vars(args)}  # type: ignore[arg-type]
    path = getattr(args, "config", None)
    if path is None:
        return cls(**given)
    if hasattr(cls, "from_json"):
        base = cls.from_json(path)  # type: ignore[attr-defined]
    else:
        base = config_from_dict(cls, read_json(path, f"{cls.__name__} file"), str(path))
    return dataclasses.replace(base, **given)


def defaults_of(cls: type) -> argparse.Namespace:
    """A config class's field defaults, without building (and checking) a config."""
    return argparse.Namespace(**{f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                                 for f in dataclasses.fields(cls)})


class _Options:
    """Adds a subcommand's options with help that shows the config's default (an option left out keeps it)."""

    def __init__(self, parser: argparse.ArgumentParser, defaults: Any = None) -> None:
        self.parser, self.defaults = parser, defaults

    def __call__(self, *flags: str, help: str = "", **kwargs: Any) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        shown = self.defaults is not None and getattr(self.defaults, dest, None) is not None
        if shown and kwargs.get("action") not in ("store_true", "store_false"):
            help = f"{help} (default: {_shown(getattr(self.defaults, dest))})".strip()
        self.parser.add_argument(*flags, default=OMIT, help=help, **kwargs)


def _shown(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) and value == list(range(value[0], value[-1] + 1)):
        return f"{value[0]}-{value[-1]}"
    return str(value)


EXECUTOR_HELP = "where seed batches run: serial, processes:N (local processes) or ray[:ADDRESS] (a Ray cluster; needs the 'ray' extra)"
BACKEND_HELP = "posterior backend spec, e.g. exact, auto, 'auto:se_tol=0.005', 'topk:k=256:tol=1e-4' (list: patchbank backends)"
DATA_HELP = "mnist, fashion_mnist, cifar10, celeba, two_image, random, an .npz or a folder"


def _data_options(opt: _Options) -> None:
    opt("--dataset", help=DATA_HELP)
    opt("--resize", type=count, help="resize to R×R (0 keeps the original size)")
    opt("--n-train", type=count, help="use the first N training images (0 = all)")


def _network_options(opt: _Options) -> None:
    """The options calibration and evaluation share: the network, its seeds and how its machine is run."""
    opt("--config", help="a JSON file of the config's fields; options given here override it")
    opt("--model", help="a trained model.pt (its config.json names the training data), or the name of a shipped network")
    opt("--seeds", type=parse_seeds, help="seeds of the network's trajectories, e.g. 0-7")
    opt("--steps", type=int, help="DDIM steps")
    opt("--bank", help="a built bank of the network's training data (default: built in memory)")
    opt("--n-train", type=int, help="the machine holds only the first N of the network's training images (default: all; "
        "with --bank, a bank of exactly those N)")
    opt("--backend", type=backend_spec, help=BACKEND_HELP)
    opt("--clip", action="store_true", help="clip the network's x̂0 to the data range [-1, 1] at every step (off, as in the "
        "paper; an ε-predicting network's x̂0 near t = 1 multiplies its ε error by up to 80)")
    opt("--executor", type=executor_spec, help=EXECUTOR_HELP)
    opt("--batch", type=int, help="seeds per batch (each batch is kept when done; none: all at once, or one per task on a "
        "parallel executor)")
    opt("--out", help="output folder (resumable; refuses results of another run)")


# ---- the subcommands: each adds its options and runs its config ------------------------------------------------------
def _sample_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(SampleConfig))
    opt("--config", help="a JSON file of SampleConfig fields (e.g. a run's config.json); options given here override it")
    _data_options(opt)
    opt("--machine", help=f"one of {', '.join(MACHINES)}, or a comparator spec: {', '.join(COMPARATORS)} with options, "
        "e.g. smoothed:sigma=0.1 or pca_locality:threshold=0.05")
    opt("--schedule", help="reference scale schedule (see machines/data/scales.json)")
    opt("--reading", choices=["calibrated", "paper"], help="which reading of the reference schedule")
    opt("--scale", type=int, help="a constant patch scale P instead of the schedule")
    opt("--padding", choices=["zeros", "circular"], help="padding (default: the schedule's)")
    opt("--conditional", action="store_true", help="class-conditional machine")
    opt("--labels", type=parse_seeds, help="one label per seed (conditional), e.g. 0,1,2")
    opt("--seeds", type=parse_seeds, help="e.g. 0-7 or 3,5")
    opt("--steps", type=int, help="DDIM steps")
    opt("--bank", help="a built patch bank to sample from (instead of --dataset)")
    opt("--backend", type=backend_spec, help=BACKEND_HELP)
    opt("--executor", type=executor_spec, help=EXECUTOR_HELP)
    opt("--batch", type=int, help="seeds sampled together (none: all at once; one per task on a parallel executor)")
    opt("--out", help="output folder (an interrupted sample resumes from its checkpoint there)")


def _sample(args: argparse.Namespace) -> None:
    print(run_sample(config_from(SampleConfig, args)))


def _backends_options(p: argparse.ArgumentParser) -> None:
    pass


def _backends(args: argparse.Namespace) -> None:
    print(describe_backends())


def _explain_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(ExplainConfig))
    p.add_argument("sample", nargs="?", default=OMIT, help="the output folder of `patchbank sample` (its config.json and samples.pt)")
    opt("--model", help="instead of a sample folder: a trained model.pt, explained by its calibrated machine")
    opt("--calibration", help="with --model: the network's calibration.json (`patchbank calibrate`; default: a shipped "
        "network's own)")
    opt("--seeds", type=parse_seeds, help="with --model: the network's seeds, e.g. 0-3")
    opt("--steps", type=int, help="with --model: DDIM steps")
    opt("--bank", help="with --model: a built bank of the network's training data (default: in memory)")
    opt("--m", type=int, help="sources listed per pixel")
    opt("--at", type=int, nargs="+", help="steps to explain (default: the last five)")
    opt("--topk", type=backend_spec, help="certified provenance from the bank's index, a top-k spec such as topk:k=256 or "
        "topk:k=1024:index=Flat (pixels whose certificate fails are scanned exactly; default: exact everywhere)")
    opt("--tol", type=float, help="with --topk: largest certificate ε kept")
    opt("--listed-images", action="store_true", help="skip the exact per-image shares and rank images by their listed "
        "patches' shares (lower bounds): much faster where posteriors are broad; patches, shares, mass and entropy stay exact")
    opt("--out", help="output folder (default: the sample's folder; with --model, outputs/explain)")


def _explain(args: argparse.Namespace) -> None:
    print(run_explain_job(config_from(ExplainConfig, args)))


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="bank directory")
    p.add_argument("--dataset", default="mnist", help=DATA_HELP)
    p.add_argument("--resize", type=count, default=None, help="resize to R×R (0 keeps the original size)")
    p.add_argument("--n-train", type=count, default=None, help="use the first N training images (0 = all)")
    p.add_argument("--scales", type=int, nargs="+", required=True, help="odd patch sizes, e.g. 3 5 7")
    p.add_argument("--rules", nargs="+", default=["bbELS"], choices=["LS", "ELS", "bbELS"])
    p.add_argument("--label-buckets", action="store_true", help="also build per-label buckets (conditional machines)")
    p.add_argument("--index", default="Flat", help="FAISS index_factory string: Flat, IVF<n>,Flat, HNSW<M>; 'none' for no index")
    p.add_argument("--leaf-size", type=int, default=2048, help="cluster size for the exact backend's pruning")
    p.add_argument("--materialise-max", type=int, default=None,
                   help="store distinct-patch tables only for P up to this (larger scales are streamed from the images)")
    p.add_argument("--shards", type=int, default=None, help="build the bank in S contiguous parts of the images, one bank "
                   "each (serve it with --backend sharded:shards=S[:placement=ray])")
    p.add_argument("--executor", type=executor_spec, default="serial", help="where the shards are built: " + EXECUTOR_HELP)


def _build(args: argparse.Namespace) -> None:
    index = None if args.index.lower() == "none" else args.index
    spec = BankSpec(scales=args.scales, rules=args.rules, labels=args.label_buckets, index=index, leaf_size=args.leaf_size,
                    materialise_max=args.materialise_max)
    data = load_dataset(args.dataset, resize=args.resize, limit=args.n_train)
    if args.shards is None:
        if args.executor != "serial":
            raise ValueError("--executor builds the shards of a sharded bank; give --shards S")
        bank: PatchBank | ShardedBank = PatchBank.build(data, args.out, spec)
    else:
        executor = make_executor(args.executor)
        bank = ShardedBank.build(data, args.out, spec, args.shards, lambda fn, job, items, done: executor.map(
            fn, job, items, done, desc="building shards"))
    print(json.dumps(bank.info(), indent=1))


def _bank_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("bank", help="bank directory")


def _info(args: argparse.Namespace) -> None:
    print(json.dumps(open_bank(args.bank).info(), indent=1))


def _verify(args: argparse.Namespace) -> None:
    problems = open_bank(args.bank).verify()
    for bucket, found in problems.items():
        print(f"{bucket}: {'; '.join(found)}")
    print(f"{args.bank}: {'intact' if not problems else f'{len(problems)} damaged bucket(s); re-run its build to repair them'}")
    if problems:
        raise SystemExit(1)


def _train_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(TrainConfig))
    opt("--config", help="a JSON file of TrainConfig fields (see configs/); unknown keys are errors")
    opt("--iters", type=int, help="training iterations")
    opt("--n-train", type=count, help="first N training images (0 = all)")
    opt("--device", help="cpu, cuda or auto")
    opt("--out", help="output folder: checkpoint, model.pt, config.json")


def _train(args: argparse.Namespace) -> None:
    print(train(config_from(TrainConfig, args)))


def _calibrate_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(CalibrateConfig))
    _network_options(opt)
    opt("--machine", help="LS, ELS or bbELS: the machine whose P(t) is calibrated (default: the network's rule, bbELS for "
        "zero padding, ELS for circular); or a comparator spec whose free parameter is fitted: smoothed (sigma), "
        "pca_locality (threshold; see --parameter), with its other options, e.g. pca_locality:normalise=symmetric")
    opt("--candidates", type=number, nargs="+", help="patch sizes P to choose from (or, for a comparator, values of its parameter)")
    opt("--parameter", help="for a comparator: the parameter to fit (default: smoothed's sigma, pca_locality's threshold; "
        "e.g. temperature)")
    opt("--per-scale", action="store_true", help="one exact pass per candidate P (default: every candidate from one box-sum "
        "pass where the backend is exact; the same answers to float64 rounding)")


def _calibrate(args: argparse.Namespace) -> None:
    result = run_calibrate(config_from(CalibrateConfig, args))
    print(json.dumps(result["parameter"]) if "parameter" in result else json.dumps(result["schedule"]))


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(EvaluateConfig))
    _network_options(opt)
    opt("--calibration", help="the calibration.json whose schedule the machine uses (default: a shipped network's own, "
        "else outputs/calibrate/calibration.json)")
    opt("--machine", choices=["LS", "ELS", "bbELS"], help="the calibrated machine (default: the calibration's)")
    p.add_argument("--machines", type=theory_list, default=OMIT, dest="theories",
                   help="every theory to compare with the network on the same seeds, e.g. bbELS,wiener,nearest,pca_locality,"
                        "smoothed:sigma=0.1 (the patch machine is the calibrated one, IS always runs; comparators: "
                        f"{', '.join(COMPARATORS)}, each with its options; NAME=SPEC names a variant, e.g. "
                        "pca_sym=pca_locality:normalise=symmetric)")
    opt("--other-network", action="store_true", help="the calibration was made against another network of the same data, "
        "padding and conditioning (e.g. an attention UNet at the ResNet's calibrated scales, as the paper does); only the "
        "weights may differ")


def _evaluate(args: argparse.Namespace) -> None:
    if "theories" in vars(args):  # --machines: the calibrated patch machine and the comparators beside it
        patch, args.comparators = args.theories
        if patch is not None and "machine" in vars(args) and patch != args.machine:
            raise ValueError(f"--machines names {patch} but --machine {args.machine}")
        if patch is not None:
            args.machine = patch
    print(json.dumps(run_evaluate(config_from(EvaluateConfig, args)), indent=1))


def _ablate_options(p: argparse.ArgumentParser) -> None:
    opt = _Options(p, defaults_of(AblationConfig))
    opt("--config", help="a JSON of AblationConfig fields, e.g. a previous run's config.json (re-runs it)")
    _data_options(opt)
    opt("--machine", help="LS, ELS or bbELS, or a comparator spec such as smoothed:sigma=0.1 (its IS posteriors go through "
        "the grid's backends) or pca_locality (exact entries only)")
    opt("--conditional", action="store_true", help="class-conditional machine")
    opt("--schedule", help="reference scale schedule")
    opt("--calibration", help="a calibration.json to use as the schedule instead")
    opt("--seeds", type=parse_seeds, help="seeds")
    opt("--steps", type=int, help="DDIM steps")
    opt("--grid", nargs="+", help="backend specs (optionally with :device=cuda), e.g. exact topk:k=64 "
        "'topk:k=256:index=IVF64,Flat:nprobe=8'")
    opt("--banks", help="where per-index banks are built and reused")
    opt("--materialise-max", type=count, help="store distinct-patch tables only for P up to this (0: every scale)")
    opt("--reference-batch", type=count, help="seeds per exact-reference batch (0: all); 1 keeps each seed as it finishes")
    opt("--reference-dtype", choices=["float64", "float32"], help="precision of the exact reference (float32 is ~1.6x "
        "faster and matches it to r >= 1 - 1e-12)")
    opt("--variant-batch", type=count, help="seeds per batch of each configuration's run (0: all); each batch is kept when done")
    opt("--model", help="a trained model.pt: also report machine-vs-network agreement")
    opt("--executor", type=executor_spec, help="where the exact reference's seed batches run: " + EXECUTOR_HELP)
    opt("--no-teacher-forced", dest="teacher_forced", action="store_false", help="skip the teacher-forced comparison")
    opt("--no-concentration", dest="concentration", action="store_false", help="skip the posterior-concentration study")
    opt("--concentration-times", type=float, nargs="+", help="times of the concentration study")
    opt("--concentration-scales", type=int, nargs="+", help="patch sizes of the concentration study")
    opt("--concentration-pixels", type=int, help="pixels per (t, P) of both studies")
    opt("--certificate-ks", type=int, nargs="+", help="the certificate study: pixels each top-k entry certifies at these k")
    opt("--certificate-times", type=float, nargs="+", help="its times (default: the concentration times)")
    opt("--out", help="output folder")


def _ablate(args: argparse.Namespace) -> None:
    report = run_ablation(config_from(AblationConfig, args))
    print((Path(report["config"]["out"]) / "summary.md").read_text())


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "sample": ("sample images from an analytic machine and save a PNG grid", _sample_options, _sample),
    "backends": ("list the posterior backends with their options and defaults", _backends_options, _backends),
    "explain": ("which training patches made each pixel: of a `patchbank sample` run, or of a trained network's samples "
                "through its calibrated machine", _explain_options, _explain),
    "build": ("build (or resume building) a patch bank on disk", _build_options, _build),
    "info": ("describe a built patch bank: data, spec, per-scale sizes and build times", _bank_options, _info),
    "verify": ("check every stored array of a bank against its checksum (exit 1 if any fails)", _bank_options, _verify),
    "train": ("train (or resume) an eps-predicting ResNet/UNet", _train_options, _train),
    "calibrate": ("calibrate a machine's P(t) (or a comparator's free parameter) to a trained network", _calibrate_options,
                  _calibrate),
    "evaluate": ("theory vs network agreement of a calibrated machine (with the IS baseline)", _evaluate_options, _evaluate),
    "ablate": ("exact-vs-approximate ablation grid and the posterior-concentration study", _ablate_options, _ablate),
}
"""Every subcommand: its one-line help, the function adding its options and the function running it."""


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its --help shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchbank", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress, and show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, (about, add_options, _) in COMMANDS.items():
        add_options(sub.add_parser(name, help=about))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command. A user error (bad option, missing file, a bank or folder that does not fit) is one
    line ``patchbank <command>: error: …`` and exit status 2; ``--verbose`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command][2](args)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError, ArithmeticError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk outside atomic_write
            message = (f"no space left on the disk holding {err.filename or 'the output'}: free some space and re-run; "
                       "finished work is kept")
        print(f"patchbank {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
