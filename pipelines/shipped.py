"""Trained networks that ship with the project, loaded by name (``patchbank evaluate --model mnist_resnet_cpu``).

Each lives in ``pipelines/models/<name>/``: ``model.pt`` (tensors and plain values only, read with
``weights_only=True``: loading it runs no code), the ``config.json`` it was trained with, its loss curve
(``losses.json``), its ``calibration.json`` and ``card.json`` (the weights' SHA-256, how long it trained, whether
its loss curve plateaued, and the command that made it). Anywhere a model path is taken, a shipped network's
name is taken too; a file of that name wins. A shipped file whose hash differs from its card is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .runs import read_json

MODELS = Path(__file__).with_name("models")
"""Where the shipped networks live."""


def shipped() -> list[str]:
    """The names of the shipped networks."""
    return sorted(p.name for p in MODELS.iterdir() if (p / "model.pt").is_file()) if MODELS.is_dir() else []


def resolve_model(model: str | os.PathLike) -> str:
    """The ``model.pt`` a model argument names: the file itself where it exists, else the shipped network of that
    name (checked against its card), else an error naming what ships."""
    path = Path(model)
    if path.is_file() or path.suffix == ".pt" or os.sep in str(model):
        return str(path)
    folder = MODELS / str(model)
    if not (folder / "model.pt").is_file():
        names = ", ".join(shipped()) or "none"
        raise FileNotFoundError(f"no trained model at {model} and no shipped network of that name (shipped: {names}); "
                                "train one with `patchbank train`")
    card = read_json(folder / "card.json", f"the card of the shipped network {model}")
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    if digest != card.get("weights_sha256"):
        raise ValueError(f"the shipped network {model}'s model.pt does not match its card (sha256 {digest[:12]} against "
                         f"{str(card.get('weights_sha256'))[:12]}): the file is damaged; restore it from the repository")
    return str(folder / "model.pt")


def calibration_for(model: str | os.PathLike, calibration: str | os.PathLike | None) -> str:
    """The calibration a job of ``model`` uses: ``calibration`` where given, else the one a shipped network ships
    with, else ``outputs/calibrate/calibration.json`` (where ``patchbank calibrate`` writes by default)."""
    if calibration is not None:
        return str(calibration)
    folder = Path(resolve_model(model)).parent
    if folder.parent == MODELS and (folder / "calibration.json").is_file():
        return str(folder / "calibration.json")
    return "outputs/calibrate/calibration.json"
