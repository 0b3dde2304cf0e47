"""Ship a trained network with the project: copy a finished agreement row into ``pipelines/models/<name>/``.

    python experiments/ship.py mnist_resnet_cpu              # outputs/mnist_resnet_cpu → pipelines/models/mnist_resnet_cpu

Copies ``model.pt`` (re-read with ``weights_only=True`` first: it must hold tensors and plain values only),
``config.json``, ``losses.json`` and the row's ``calibrate/calibration.json``, and writes ``card.json``: the
weights' SHA-256 (checked whenever the network is loaded by name), the training minutes of the row's
``stages.jsonl``, how much the loss still improved over its last fifth (:func:`pipelines.training.tail_improvement`)
and whether that is a plateau, the row's evaluation (median Pearson r, the peers' mean R², seeds, machine beats IS)
and the commands that made it. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from patchbank.atomic import atomic_write, read_torch, write_json
from pipelines.shipped import MODELS
from pipelines.training import PLATEAU, tail_improvement


def ship(name: str, row: Path, out: Path = MODELS) -> Path:
    """The shipped folder of row ``row`` (an ``outputs/<config>`` folder of ``experiments/agreement.py row``)."""
    files = {f: row / f for f in ("model.pt", "config.json", "losses.json")}
    files["calibration.json"] = row / "calibrate" / "calibration.json"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"row {row} is not finished: {', '.join(missing)} missing")
    read_torch(files["model.pt"], "trained model")  # refuses pickled code before anything is copied
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    for dest, src in files.items():
        atomic_write(target / dest, lambda tmp, src=src: shutil.copyfile(src, tmp))
    stages = [json.loads(line) for line in (row / "stages.jsonl").read_text().splitlines()] if (row / "stages.jsonl").exists() else []
    minutes = {s: round(sum(r["seconds"] for r in stages if r["stage"] == s) / 60, 1) for s in ("train", "calibrate", "evaluate")}
    losses = json.loads(files["losses.json"].read_text())
    improvement = tail_improvement(losses)
    report = json.loads((row / "evaluate" / "report.json").read_text()) if (row / "evaluate" / "report.json").exists() else {}
    card = {"name": name, "weights_sha256": hashlib.sha256((target / "model.pt").read_bytes()).hexdigest(),
            "train": json.loads(files["config.json"].read_text()), "minutes": minutes,
            "loss_tail_improvement": improvement, "plateaued": improvement is not None and improvement < PLATEAU,
            "evaluation": {k: report[k] for k in ("median_machine_r", "mean_machine_peer_r2", "median_machine_r2", "median_is_r",
                                                  "machine_beats_is", "seeds") if k in report},
            "commands": [r["command"] for r in stages]}
    write_json(target / "card.json", card)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the network's name (and its row's folder under outputs/, unless --row)")
    parser.add_argument("--row", default=None, help="the row's folder (default: outputs/NAME)")
    args = parser.parse_args()
    print(ship(args.name, Path(args.row or Path("outputs") / args.name)))


if __name__ == "__main__":
    main()
