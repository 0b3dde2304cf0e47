"""The agreement table: per row (one training config) train → calibrate → evaluate, then one table.

``row`` runs the three stages of one config through the ``patchbank`` CLI, in this process, each
resumable (a re-run continues where it stopped). It appends every invocation's command line and wall
time to ``outputs/<config>/stages.jsonl``. Calibration seeds and evaluation seeds must be disjoint:
the schedule is never tuned on the seeds it is judged on.

``table`` reads the finished rows and prints the markdown table (medians over seeds beside the
paper's), copying each row's figures into ``docs/figures/``. ``table --shipped`` makes it from the networks that
ship with the project (``pipelines/models/``), from the repository's files alone.

    python experiments/agreement.py row configs/mnist_unet_cpu.json --candidates 3 5 7 9 11 13 15 19 23 27 \\
        --cal-seeds 1000-1003 --eval-seeds 0-49
    python experiments/agreement.py row configs/mnist_resnet_cpu.json --candidates 3 5 7 9 11 13 15 \\
        --cal-seeds 1000-1004 --eval-seeds 0-29 --theories wiener,nearest --fit smoothed@0,0.1,0.2 pca_locality@0.5,1,2
    python experiments/agreement.py table mnist_resnet_cpu mnist_unet_cpu fashion_resnet_cpu
    python experiments/agreement.py table --shipped
    python experiments/agreement.py row configs/fashion_resnet_60k_cpu.json --n-train 1000 --candidates 3 5 7 9 11 13
    python experiments/agreement.py between fashion_resnet_60k_cpu fashion_resnet_60k_cpu@1000

``--fit`` calibrates a comparator's free parameter on the calibration seeds (its own stage, timed) and
evaluates the comparator with the value found.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import time
from pathlib import Path

from machines.comparators import named_spec
from patchbank.atomic import read_torch
from pipelines.cli import main as patchbank
from pipelines.cli import parse_seeds
from pipelines.training import TrainConfig

PAPER_R = {("mnist", "resnet"): 0.94, ("mnist", "unet"): 0.84, ("fashion_mnist", "resnet"): 0.90,
           ("fashion_mnist", "unet"): 0.91, ("cifar10", "resnet"): 0.90, ("cifar10", "unet"): 0.82,
           ("cifar10", "unet+attention"): 0.75}
"""The paper's median Pearson r, machine against network (the attention UNet's at the ResNet's scales; its IS
baseline there: 0.47)."""


def _suffix(n_train: int | str | None) -> str:
    """The stage folders' suffix of a row run against the first N training images (``calibrate_firstN``)."""
    return f"_first{n_train}" if n_train else ""


def _evaluated(name: str) -> tuple[str, str, Path]:
    """A table row's name, ``CONFIG`` or ``CONFIG@N``: its config name, stage-folder suffix and evaluation folder."""
    config, _, n_train = name.partition("@")
    return config, _suffix(n_train), Path("outputs") / config / f"evaluate{_suffix(n_train)}"


def run_row(config: str, candidates: list[int], cal_seeds: str, eval_seeds: str, backend: str, batch: int,
            theories: str | None = None, fitted: list[str] | None = None, calibration_from: str | None = None,
            executor: str | None = None, n_train: int | None = None) -> None:
    """``fitted``: comparators whose free parameter is calibrated first, as ``SPEC@v1,v2,…`` (e.g.
    ``smoothed:draws=8@0,0.05,0.1``), on the same calibration seeds; the evaluation then runs them with the
    value found, beside ``theories``. ``calibration_from``: another row's name whose calibrated schedule this
    network is evaluated with (``--other-network``; the paper's attention UNet at the ResNet's scales):
    no calibration stage. ``executor``: where the calibration's and evaluation's seeds run (e.g. ``processes:2``,
    one seed per task; see :mod:`pipelines.executors`); None: here, serially. ``n_train``: the machines hold
    only the network's first N training images, calibrated and evaluated into ``calibrate_firstN/`` and
    ``evaluate_firstN/`` beside those of all its images (the table's row ``NAME@N``)."""
    cfg = TrainConfig.from_json(config)
    root = Path(cfg.out)
    if set(parse_seeds(cal_seeds)) & set(parse_seeds(eval_seeds)):
        raise SystemExit("calibration and evaluation seeds overlap: calibrate on seeds the evaluation never sees")
    model = str(root / "model.pt")
    stages = [("train", ["train", "--config", config])]
    suffix, restrict = _suffix(n_train), (["--n-train", str(n_train)] if n_train else [])
    calibration = root / f"calibrate{suffix}" / "calibration.json"
    if calibration_from is None:
        stages.append((f"calibrate{suffix}", ["calibrate", "--model", model, "--candidates", *map(str, candidates), "--seeds", cal_seeds,
                                              "--backend", backend, "--batch", "1", "--out", str(calibration.parent), *restrict]))
    else:
        calibration = Path("outputs") / calibration_from / "calibrate" / "calibration.json"
        if not calibration.exists():
            raise SystemExit(f"{calibration} does not exist: run the row {calibration_from} first")
    fits = []
    for item in fitted or []:
        named, _, values = item.partition("@")
        name, spec = named_spec(named)
        folder = root / f"calibrate_{name}"
        fits.append((name, folder / "calibration.json"))
        stages.append((f"calibrate {name}", ["calibrate", "--model", model, "--machine", spec, "--candidates", *values.split(","),
                                             "--seeds", cal_seeds, "--batch", "1", "--out", str(folder)]))
    evaluate = ["evaluate", "--model", model, "--calibration", str(calibration), "--seeds", eval_seeds,
                "--backend", backend, "--batch", str(batch), "--out", str(root / f"evaluate{suffix}"), *restrict]
    if calibration_from is not None:
        evaluate.append("--other-network")
    for name, argv in stages + [(f"evaluate{suffix}", evaluate)]:
        if name.startswith("evaluate"):
            found = [f"{name}={json.loads(f.read_text())['parameter']['spec']}" for name, f in fits]
            names = ",".join([t for t in (theories or "").split(",") if t] + found)
            argv = argv + (["--machines", names] if names else [])
        if executor is not None and name != "train":
            argv = argv + ["--executor", executor]
        start = time.perf_counter()
        try:
            patchbank(argv)
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
        record = {"stage": name, "command": "patchbank " + shlex.join(argv), "seconds": round(time.perf_counter() - start, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "stages.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _network_fields(train_cfg: dict, cal: dict) -> dict:
    """A row's fields read from its network's training config and its calibration: what the network is, the machine,
    the calibrated and the paper's schedules, and the paper's r for it."""
    paper = (cal.get("paper_schedule") or {}).get("schedule")
    arch = train_cfg["arch"] + ("+attention" if train_cfg.get("attention") else "")
    return {"dataset": train_cfg["dataset"], "arch": train_cfg["arch"], "padding": train_cfg["padding"],
            "conditional": train_cfg["conditional"], "train_images": train_cfg.get("train_images"),
            "machine": cal["network"]["machine"] if "network" in cal else cal["config"]["machine"],
            "schedule": [P for _, P in cal["schedule"]], "paper_schedule": [P for _, P in paper] if paper else None,
            "attention": bool(train_cfg.get("attention")), "paper_r": PAPER_R.get((train_cfg["dataset"], arch)),
            "calibration_seeds": len(cal["seeds"])}


def row_summary(name: str, figures: Path | None = None) -> dict:
    """One finished row: its config, stage times (summed over invocations), schedules and medians. ``NAME@N``: the
    row's network against its first N training images (``row --n-train N``)."""
    config, suffix, evaluated = _evaluated(name)
    root = evaluated.parent
    missing = [f for f in (root / "config.json", evaluated / "config.json", evaluated / "report.json") if not f.exists()]
    if missing:  # a row whose outputs were removed, or that never finished: say which and how to make it
        raise SystemExit(f"row {name}: {missing[0]} is missing; make it with `python experiments/agreement.py row "
                         f"configs/{config}.json …`{' --n-train ' + name.partition('@')[2] if suffix else ''}")
    train_cfg = json.loads((root / "config.json").read_text())
    report = json.loads((evaluated / "report.json").read_text())
    cal_path = Path(json.loads((evaluated / "config.json").read_text())["evaluate"]["calibration"])
    cal = json.loads(cal_path.read_text())
    seconds: dict[str, float] = {}
    for line in (root / "stages.jsonl").read_text().splitlines() if (root / "stages.jsonl").exists() else []:
        r = json.loads(line)
        stage = r["stage"] if r["stage"] == "train" else r["stage"].removesuffix(suffix) if r["stage"].endswith(suffix) else None
        if stage in ("train", "calibrate", "evaluate"):  # the network's training and these images' stages
            seconds[stage] = seconds.get(stage, 0.0) + r["seconds"]
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for fig in ("pairs", "scatter", "scale_curve"):
            shutil.copyfile(evaluated / f"{fig}.png", figures / f"{config}{suffix}_{fig}.png")
    return {"name": name, "folder": config, **_network_fields(train_cfg, cal),
            "n_train": report.get("config", {}).get("n_train") or train_cfg.get("train_images"),
            "seconds": seconds, "calibration": str(cal_path),
            "borrowed": None if str(cal_path).startswith(f"outputs/{config}/") else str(cal_path),
            "comparators": report.get("config", {}).get("comparators", []), **report}


def shipped_summary(name: str) -> dict:
    """A shipped network's row (``pipelines/models/<name>/``) in :func:`row_summary`'s form, from the repository's files
    alone: the card (training config, minutes, evaluation settings), the shipped calibration, and the medians
    recomputed from the shipped per-seed evaluation (:func:`pipelines.evaluation.summarise`)."""
    from pipelines.evaluation import read_rows, summarise
    from pipelines.shipped import MODELS, shipped

    folder = MODELS / name
    if name not in shipped() or not (folder / "evaluation.jsonl").is_file():
        raise SystemExit(f"{name} is not a shipped network with an evaluation (shipped: {', '.join(shipped()) or 'none'})")
    card = json.loads((folder / "card.json").read_text())
    cal = json.loads((folder / "calibration.json").read_text())
    train_cfg, settings = card["train"], card["evaluation"]
    return {"name": name, "folder": name, **_network_fields(train_cfg, cal),
            "n_train": settings.get("n_train") or train_cfg.get("train_images"),
            "seconds": {s: 60 * m for s, m in card["minutes"].items()}, "calibration": str(folder / "calibration.json"),
            "borrowed": "another network's calibration" if settings.get("other_network") else None,
            "comparators": [],
            "plateaued": card["plateaued"], "loss_tail_improvement": card["loss_tail_improvement"],
            **summarise(read_rows(folder / "evaluation.jsonl"))}


def agree_and_part(name: str, figures: Path, n: int = 4) -> str:
    """The ``n`` seeds where a row's machine agrees best with its network and the ``n`` where they part most,
    as one figure (network / machine / IS / …, each column captioned with seed and r); returns its path."""
    from pipelines.evaluation import read_rows
    from pipelines.figures import image_pairs

    root = Path("outputs") / name / "evaluate"
    rows = sorted(read_rows(root / "per_seed.jsonl"), key=lambda r: -r["machine_r"])
    chosen = rows[:n] + rows[-n:]
    samples = read_torch(root / "samples.pt", "evaluation samples")
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"{name}_agree_part.png"
    image_pairs(samples, path, seeds=[r["seed"] for r in chosen],
                captions=[f"{r['seed']}: r {r['machine_r']:.2f}" for r in chosen])
    return str(path)


def between(first: str, second: str) -> str:
    """How much two rows' outputs differ, theory by theory, on their common seeds (e.g. one network's machine on all its
    training images and on its first N, ``ROW`` and ``ROW@N``): the median and smallest Pearson r between
    the two rows' final images, as a markdown table."""
    from machines.metrics import pearson_r

    a, b = (read_torch(_evaluated(n)[2] / "samples.pt", "evaluation samples") for n in (first, second))
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit(f"{first} and {second} share no evaluated seed")
    lines = [f"| theory | r between {first} and {second}: median | smallest |", "|---|---:|---:|"]
    for theory in [k for k in a[seeds[0]] if k in b[seeds[0]]]:
        rs = sorted(float(pearson_r(a[s][theory][None], b[s][theory][None])[0]) for s in seeds)
        lines.append(f"| {theory} | {statistics.median(rs):.4f} | {rs[0]:.4f} |")
    return "\n".join(lines + ["", f"({len(seeds)} seeds)"])


def _peer(r: dict) -> str:
    """The mean over seeds of the peers' R² (analytic-diffusion-studio, GoldDiff), where the evaluation has it."""
    return f"{r['mean_machine_peer_r2']:.3f}" if "mean_machine_peer_r2" in r else "–"


def table(names: list[str], figures: Path | None, from_shipped: bool = False) -> str:
    """The markdown table of finished rows (``outputs/<name>/``), or with ``from_shipped`` of the shipped networks
    (every one where ``names`` is empty), read from the repository's files only."""
    if from_shipped:
        from pipelines.shipped import shipped

        rows = [shipped_summary(n) for n in names or shipped()]
    else:
        rows = [row_summary(n, figures) for n in names]
    head = ("| network | machine | images | seeds | r (paper) | R² | peers' R² | MSE | IS r | beats IS | train / cal / eval min |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        net = f"{r['dataset']} {r['arch']}{'+attention' if r['attention'] else ''} {r['padding']}{' cond.' if r['conditional'] else ''}"
        net = f"`{r['name']}`: {net}" if from_shipped else net
        mins = " / ".join(f"{r['seconds'].get(s, float('nan')) / 60:.0f}" for s in ("train", "calibrate", "evaluate"))
        paper = f" ({r['paper_r']:.2f})" if r["paper_r"] is not None else ""
        images = r["train_images"] if r["n_train"] == r["train_images"] else f"{r['train_images']} (machine: first {r['n_train']})"
        lines.append(f"| {net} | {r['machine']} | {images} | {r['seeds']} | {r['median_machine_r']:.3f}{paper} | "
                     f"{r['median_machine_r2']:.3f} | {_peer(r)} | {r['median_machine_mse']:.4f} | {r['median_is_r']:.3f} | "
                     f"{r['machine_beats_is']:.0%} | {mins} |")
    theories = sorted({k[len("median_"):-len("_r")] for r in rows for k in r
                       if k.startswith("median_") and k.endswith("_r") and k not in ("median_machine_r", "median_is_r")})
    if theories:
        lines += ["", "| network | machine r / R² | " + " | ".join(f"{t} r / R² (machine beats it)" for t in theories) + " |",
                  "|---|---:|" + "---:|" * len(theories)]
        for r in rows:
            cells = [f"{r[f'median_{t}_r']:.3f} / {r[f'median_{t}_r2']:.3f} ({r[f'machine_beats_{t}']:.0%})"
                     if f"median_{t}_r" in r else "—" for t in theories]
            lines.append(f"| {r['name']} | {r['median_machine_r']:.3f} / {r['median_machine_r2']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        borrowed = f" (from {r['borrowed']})" if r["borrowed"] else ""
        lines.append(f"* `{r['name']}` schedule (t = 0.05 … 1){borrowed}: {r['schedule']}; paper: {r['paper_schedule']}")
        if r.get("loss_tail_improvement") is not None:
            lines.append(f"* `{r['name']}` loss improvement over the last fifth of training: {r['loss_tail_improvement']:.1%} "
                         f"({'plateaued' if r['plateaued'] else 'not plateaued'} by the 1% criterion)")
        if r["comparators"]:
            lines.append(f"* `{r['name']}` comparators: " + ", ".join(f"`{c}`" for c in r["comparators"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("row", help="train → calibrate → evaluate one config (resumable)")
    r.add_argument("config")
    r.add_argument("--candidates", type=int, nargs="+", default=None, help="P candidates (needed unless --calibration-from)")
    r.add_argument("--cal-seeds", default="1000-1003")
    r.add_argument("--eval-seeds", default="0-99")
    r.add_argument("--backend", default="exact:dtype=float32")
    r.add_argument("--batch", type=int, default=10)
    r.add_argument("--calibration-from", default=None, metavar="ROW",
                   help="evaluate at another row's calibrated scales (outputs/ROW/calibrate), with no calibration stage")
    r.add_argument("--theories", default=None, help="comparator theories evaluated beside the machine, e.g. wiener,nearest")
    r.add_argument("--executor", default=None, help="where calibration and evaluation seeds run, e.g. processes:2 (default: serially)")
    r.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="the machines hold only the network's first N training images (table row NAME@N)")
    r.add_argument("--fit", nargs="+", default=None, metavar="SPEC@VALUES",
                   help="comparators whose free parameter is calibrated first, [NAME=]SPEC@VALUES, e.g. smoothed@0,0.05,0.1 "
                        "pca_locality@0.5,1,2 pca_sym=pca_locality:normalise=symmetric@0.5,1,2")
    x = sub.add_parser("extremes", help="a row's seeds where machine and network agree best and part most, as a figure")
    x.add_argument("name", help="config name (folder under outputs/)")
    x.add_argument("--n", type=int, default=4)
    x.add_argument("--figures", default="docs/figures")
    t = sub.add_parser("table", help="the markdown table of finished rows")
    t.add_argument("names", nargs="*", help="config names (folders under outputs/); NAME@N: against its first N training images")
    t.add_argument("--figures", default="docs/figures", help="copy each row's figures here ('' for none)")
    t.add_argument("--shipped", action="store_true",
                   help="the rows of the shipped networks (pipelines/models/NAME; all of them where no name is given)")
    w = sub.add_parser("between", help="how far two rows' outputs differ per theory, e.g. ROW against ROW@N")
    w.add_argument("first")
    w.add_argument("second")
    args = parser.parse_args()
    if args.command == "row":
        if not args.candidates and not args.calibration_from:
            parser.error("row needs --candidates (or --calibration-from another row)")
        run_row(args.config, args.candidates, args.cal_seeds, args.eval_seeds, args.backend, args.batch, args.theories, args.fit,
                args.calibration_from, args.executor, args.n_train)
    elif args.command == "between":
        print(between(args.first, args.second))
    elif args.command == "extremes":
        print(agree_and_part(args.name, Path(args.figures), args.n))
    else:
        if not args.names and not args.shipped:
            parser.error("table needs row names (or --shipped)")
        print(table(args.names, Path(args.figures) if args.figures and not args.shipped else None, args.shipped))


if __name__ == "__main__":
    main()
