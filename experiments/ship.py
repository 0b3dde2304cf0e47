"""Ship a trained network with the project: copy a finished agreement row into ``pipelines/models/<name>/``.

    python experiments/ship.py mnist_resnet_cpu              # outputs/mnist_resnet_cpu → pipelines/models/mnist_resnet_cpu

Copies ``model.pt`` (re-read with ``weights_only=True`` first: it must hold tensors and plain values only),
``config.json``, ``losses.json``, the row's ``calibrate/calibration.json`` and its per-seed evaluation
(``evaluate/per_seed.jsonl`` as ``evaluation.jsonl``), and writes ``card.json``: the weights' SHA-256 (checked
whenever the network is loaded by name), the training minutes of the row's ``stages.jsonl``, how much the loss still
improved over its last fifth (:func:`pipelines.training.tail_improvement`) and whether that is a plateau, the row's
evaluation (median Pearson r, the peers' mean R², seeds, machine beats IS, and the settings it ran with) and the
commands that made it. Every file is written under a temporary name and renamed.

    python experiments/ship.py mnist_resnet_cpu --check 10   # re-evaluate seeds of the shipped row by name

``--check N`` evaluates the shipped network by name on the first N seeds of its shipped evaluation, with the
settings on its card, and prints the largest difference from the shipped per-seed numbers and from their median.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from patchbank.atomic import atomic_write, read_torch, write_json
from pipelines.evaluation import read_rows
from pipelines.jobs import EvaluateConfig, run_evaluate
from pipelines.shipped import MODELS
from pipelines.training import PLATEAU, tail_improvement

SETTINGS = ("machine", "backend", "steps", "batch", "n_train", "other_network", "clip")
"""The evaluation settings a card records: what a re-evaluation by name needs to give the same numbers."""


def ship(name: str, row: Path, out: Path = MODELS, n_train: int | None = None) -> Path:
    """The shipped folder of row ``row`` (an ``outputs/<config>`` folder of ``experiments/agreement.py row``).
    ``n_train``: ship the row's machine of its network's first N training images (``row --n-train N``: its
    ``calibrate_firstN/`` and ``evaluate_firstN/``)."""
    suffix = f"_first{n_train}" if n_train else ""
    calibrated, evaluated = row / f"calibrate{suffix}", row / f"evaluate{suffix}"
    files = {f: row / f for f in ("model.pt", "config.json", "losses.json")}
    files["calibration.json"] = calibrated / "calibration.json"
    if (evaluated / "per_seed.jsonl").is_file():
        files["evaluation.jsonl"] = evaluated / "per_seed.jsonl"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"row {row} is not finished: {', '.join(missing)} missing")
    read_torch(files["model.pt"], "trained model")  # refuses pickled code before anything is copied
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    for dest, src in files.items():
        atomic_write(target / dest, lambda tmp, src=src: shutil.copyfile(src, tmp))
    stages = [json.loads(line) for line in (row / "stages.jsonl").read_text().splitlines()] if (row / "stages.jsonl").exists() else []
    # this machine's stages (the training is shared by every machine of the row), named without the suffix
    stages = [{**r, "stage": r["stage"].removesuffix(suffix)} for r in stages
              if r["stage"] == "train" or (r["stage"].endswith(suffix) and r["stage"].removesuffix(suffix) in ("calibrate", "evaluate"))]
    earlier = json.loads((target / "card.json").read_text()) if (target / "card.json").is_file() else {}
    logged = {r["stage"] for r in stages}
    # a stage the row's log no longer holds (its outputs were removed and only a later stage ran again) keeps what
    # the earlier card recorded of it
    minutes = {s: round(sum(r["seconds"] for r in stages if r["stage"] == s) / 60, 1) if s in logged
               else earlier.get("minutes", {}).get(s, 0.0) for s in ("train", "calibrate", "evaluate")}
    commands = [c for c in earlier.get("commands", []) if c.split()[1:2] and c.split()[1] not in logged]
    commands += [r["command"] for r in stages]
    losses = json.loads(files["losses.json"].read_text())
    improvement = tail_improvement(losses)
    report = json.loads((evaluated / "report.json").read_text()) if (evaluated / "report.json").exists() else {}
    settings = report.get("config", {})
    card = {"name": name, "weights_sha256": hashlib.sha256((target / "model.pt").read_bytes()).hexdigest(),
            "train": json.loads(files["config.json"].read_text()), "minutes": minutes,
            "loss_tail_improvement": improvement, "plateaued": improvement is not None and improvement < PLATEAU,
            "evaluation": {k: report[k] for k in ("median_machine_r", "mean_machine_peer_r2", "median_machine_r2", "median_is_r",
                                                  "machine_beats_is", "seeds") if k in report}
                          | {k: settings[k] for k in SETTINGS if k in settings},
            "commands": commands}
    write_json(target / "card.json", card)
    return target


def check(name: str, first: int = 10, models: Path = MODELS, out: Path | None = None) -> dict:
    """Evaluate the shipped network ``name`` by name on the first ``first`` seeds of its shipped evaluation, with the
    settings on its card; returns the shipped and the new per-seed machine r of those seeds, their medians and the
    largest difference (``max_seed_diff``, ``median_diff``). ``out``: where the evaluation is written (default: a
    temporary folder, removed)."""
    folder = models / name
    rows = read_rows(folder / "evaluation.jsonl")
    if not rows:
        raise SystemExit(f"the shipped network {name} ships no per-seed evaluation ({folder / 'evaluation.jsonl'})")
    card = json.loads((folder / "card.json").read_text())
    settings = {k: card["evaluation"][k] for k in SETTINGS if k in card["evaluation"]}
    rows = sorted(rows, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows[:first]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvaluateConfig(model=name, seeds=seeds, out=str(out or Path(tmp) / "evaluate"), **settings)
        run_evaluate(cfg)
        new = {r["seed"]: r["machine_r"] for r in read_rows(Path(cfg.out) / "per_seed.jsonl")}
    shipped = {r["seed"]: r["machine_r"] for r in rows[:first]}
    return {"seeds": seeds, "shipped": shipped, "new": new,
            "max_seed_diff": max(abs(new[s] - shipped[s]) for s in seeds),
            "median_diff": abs(statistics.median(new.values()) - statistics.median(shipped.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the network's name (and its row's folder under outputs/, unless --row)")
    parser.add_argument("--row", default=None, help="the row's folder (default: outputs/NAME)")
    parser.add_argument("--n-train", type=int, default=None, metavar="N",
                        help="ship the row's machine of the first N training images (row --n-train N)")
    parser.add_argument("--check", type=int, default=None, metavar="N",
                        help="do not ship: re-evaluate the shipped network by name on the first N seeds of its evaluation")
    args = parser.parse_args()
    if args.check is not None:
        found = check(args.name, args.check)
        print(json.dumps({k: found[k] for k in ("seeds", "max_seed_diff", "median_diff")}))
        return
    print(ship(args.name, Path(args.row or Path("outputs") / args.name), n_train=args.n_train))


if __name__ == "__main__":
    main()
