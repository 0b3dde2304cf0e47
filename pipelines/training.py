"""Train an ε-predicting CNN diffusion model, crash-safe and exactly resumable.

Loss: MSE between ε and ε̂(√ᾱ·x0 + √(1−ᾱ)·ε, t) with t ~ U[0, 1); AdamW (no weight decay);
the learning rate decays by ``gamma`` per iteration (the paper's code: 0.999965). Batches,
times and noise come from one seeded generator whose state is checkpointed with the model,
optimiser and scheduler, so a run resumed from its checkpoint ends in the same weights as an
uninterrupted one. The loss curve (mean loss per checkpoint interval) is checkpointed too and written
as ``losses.json`` and ``loss.png`` beside the model: how far training got is evidence when a network
and its machine disagree.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from machines.schedule import COSINE_DENOM
from patchbank import ImageData, load_dataset, to_model_range
from patchbank.atomic import atomic_write, folder_lock, read_torch, write_json

from .networks import ARCHITECTURES, NetworkDenoiser
from .runs import check_fields, config_from_dict, differences, read_json
from .shipped import resolve_model

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Resolved options of a training run (written as ``config.json`` beside the checkpoint)."""

    dataset: str = "mnist"
    resize: int | None = 32
    n_train: int | None = 1000
    arch: str = "resnet"
    width: int = 64
    blocks: int = 6  # ResNet: receptive field 2·blocks + 5
    widths: tuple[int, int, int] = (32, 64, 128)  # UNet
    attention: bool = False  # UNet: self-attention at the lowest resolution
    padding: str = "zeros"
    conditional: bool = False
    iters: int = 4000
    batch: int = 128
    lr: float = 1e-4
    gamma: float = 0.999965
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none); model.pt holds the average
    ema_warmup: bool = False  # decay min(ema, (1 + n)/(10 + n)) at update n, so the average forgets the initial weights
    seed: int = 0
    checkpoint_every: int = 200
    device: str = "auto"
    out: str = "outputs/train"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field's type and range, checked before anything is written (also after the CLI overrides fields)."""
        check_fields(self, {"resize": (1, None, "[)"), "n_train": (1, None, "[)"), "width": (1, None, "[)"),
                            "blocks": (1, None, "[)"), "widths": (1, None, "[)"), "iters": (1, None, "[)"),
                            "batch": (1, None, "[)"), "lr": (0, None, "()"), "gamma": (0, 1, "(]"), "ema": (0, 1, "[)"),
                            "seed": (0, None, "[)"), "checkpoint_every": (1, None, "[)")},
                     {"arch": sorted(ARCHITECTURES), "padding": ("zeros", "circular")})
        if self.attention and self.arch != "unet":
            raise ValueError(f"attention is an option of the UNet, not of the {self.arch}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        values = read_json(path, "train config")
        if isinstance(values, dict) and "widths" in values:
            values["widths"] = tuple(values["widths"])
        return config_from_dict(cls, values, str(path))


def build_network(cfg: TrainConfig, channels: int, num_classes: int | None) -> nn.Module:
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose from {sorted(ARCHITECTURES)}")
    if cfg.attention and cfg.arch != "unet":
        raise ValueError(f"attention is an option of the UNet, not of the {cfg.arch}")
    if cfg.arch == "resnet":
        return ARCHITECTURES["resnet"](channels, cfg.width, cfg.blocks, cfg.padding, num_classes)
    return ARCHITECTURES["unet"](channels, cfg.widths, cfg.padding, num_classes, attention=cfg.attention)


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def load_training_data(cfg: TrainConfig) -> ImageData:
    return load_dataset(cfg.dataset, resize=cfg.resize, limit=cfg.n_train)


def train(cfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> Path:
    """Train (or resume) to ``cfg.iters`` iterations; returns the path of ``model.pt``.

    ``stop_after`` ends the run early after that many iterations of this call (a checkpoint is
    written first), which simulates an interruption.
    """
    cfg.check()
    with folder_lock(cfg.out):  # a second training into the same folder fails at once
        return _train(cfg, stop_after, progress)


def _train(cfg: TrainConfig, stop_after: int | None, progress: bool) -> Path:
    out = Path(cfg.out)
    data = load_training_data(cfg)
    device = resolve_device(cfg.device)
    x_all = to_model_range(data.images).to(device)
    labels_all = data.labels.to(device)
    num_classes = int(data.labels.max()) + 1 if cfg.conditional else None
    torch.manual_seed(cfg.seed)
    net = build_network(cfg, data.shape[0], num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = _ema_copy(net) if cfg.ema > 0 else None
    curve = LossCurve()
    start = _resume(out / "checkpoint.pt", cfg, net, opt, sched, gen, ema, curve)
    write_json(out / "config.json", {**asdict(cfg), "train_images": len(data), "image_shape": list(data.shape),
                                      "num_classes": num_classes, "fingerprint": data.fingerprint()})
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc="train", disable=not progress)
    done = 0
    for it in bar:
        idx = torch.randint(len(data), (cfg.batch,), generator=gen)
        t = torch.rand(cfg.batch, generator=gen)
        eps = torch.randn((cfg.batch, *data.shape), generator=gen)
        loss = _step(net, opt, sched, x_all[idx.to(device)], t.to(device), eps.to(device),
                     labels_all[idx.to(device)] if num_classes else None)
        if ema is not None:
            _ema_update(ema, net, ema_decay(cfg, it + 1))
        done += 1
        curve.add(loss)
        boundary = (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iters
        if boundary:
            curve.close(it + 1)
            write_json(out / "losses.json", curve.points)
        if boundary or (stop_after is not None and done >= stop_after):
            _save_checkpoint(out / "checkpoint.pt", cfg, net, opt, sched, gen, it + 1, ema, curve)
            bar.set_postfix(loss=f"{loss:.4f}")
        if stop_after is not None and done >= stop_after:
            return out / "checkpoint.pt"
    final = ema if ema is not None else net
    if curve.points:
        from .figures import loss_curve

        loss_curve(curve.points, out / "loss.png", cfg.out)
    atomic_write(out / "model.pt", lambda p: torch.save({"state_dict": final.state_dict(), "config": asdict(cfg), "num_classes": num_classes,
                  "channels": data.shape[0]}, p))
    return out / "model.pt"


def _step(net: nn.Module, opt, sched, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor | None) -> float:
    abar = torch.cos(math.pi * t / COSINE_DENOM).pow(2)[:, None, None, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    loss = (net(xt, t, labels) - eps).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def _ema_copy(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def ema_decay(cfg: TrainConfig, n: int) -> float:
    """The EMA's decay at update ``n`` (1, 2, …): ``cfg.ema``, or with ``ema_warmup`` ``min(ema, (1 + n)/(10 + n))``.
    Without the warm-up the average keeps a share ``ema**n`` of the randomly initialised weights: 2.7% after
    3,600 updates at 0.999, which measured doubled a CIFAR10 ResNet's ε error at t = 1 (docs/results.md)."""
    return min(cfg.ema, (1 + n) / (10 + n)) if cfg.ema_warmup else cfg.ema


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1.0 - decay)


@dataclass
class LossCurve:
    """Mean training loss per checkpoint interval: ``points`` ``[[iteration, mean loss], …]``, and the running sum
    and count of the interval in progress (checkpointed, so an interrupted run's curve is the uninterrupted one's).
    A run resumed from a checkpoint written before curves were kept starts its curve there."""

    points: list = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def add(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def close(self, iteration: int) -> None:
        if self.count:
            self.points.append([iteration, self.total / self.count])
        self.total, self.count = 0.0, 0


PLATEAU = 0.01
"""A loss curve has plateaued when its last fifth improves on the fifth before it by less than this fraction."""


def tail_improvement(points: list, tail: float = 0.2) -> float | None:
    """How much a loss curve ``[[iteration, mean loss], …]`` still improved at the end: ``1 − L_last / L_before``,
    ``L_last`` the mean loss over the last ``tail`` of the iterations and ``L_before`` over the ``tail`` before
    them (per-interval means, so the noise of single batches averages out). None with too few points to say.
    Below :data:`PLATEAU`, the training has plateaued by the project's criterion."""
    if len(points) < 4:
        return None
    end = points[-1][0]
    last = [loss for it, loss in points if it > end * (1 - tail)]
    before = [loss for it, loss in points if end * (1 - 2 * tail) < it <= end * (1 - tail)]
    if not last or not before:
        return None
    return 1 - (sum(last) / len(last)) / (sum(before) / len(before))


def _resume(path: Path, cfg: TrainConfig, net, opt, sched, gen: torch.Generator, ema: nn.Module | None = None,
            curve: LossCurve | None = None) -> int:
    if not path.exists():
        return 0
    ckpt = read_torch(path, "training checkpoint")  # tensors and plain values only: loading it runs no code
    if not isinstance(ckpt, dict) or not {"config", "net", "opt", "sched", "gen", "iteration"} <= set(ckpt):
        raise ValueError(f"training checkpoint {path} is not one (it lacks the model, optimiser or iteration); delete it "
                         "to train from the start")
    saved = {k: v for k, v in {**asdict(TrainConfig()), **ckpt["config"]}.items()  # a field added since: its default
             if k not in ("iters", "checkpoint_every", "device")}
    now = {k: v for k, v in asdict(cfg).items() if k not in ("iters", "checkpoint_every", "device")}
    if saved != now:
        raise ValueError(f"{path} was written by a different run configuration (differs in: {', '.join(differences(saved, now))}); "
                         "use another --out or delete it")
    net.load_state_dict(ckpt["net"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    gen.set_state(ckpt["gen"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if curve is not None and "losses" in ckpt:
        vars(curve).update(ckpt["losses"])
    log.info("resuming %s at iteration %d", path, ckpt["iteration"])
    return int(ckpt["iteration"])


def _save_checkpoint(path: Path, cfg: TrainConfig, net, opt, sched, gen: torch.Generator, iteration: int,
                     ema: nn.Module | None = None, curve: LossCurve | None = None) -> None:
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "iteration": iteration, "config": asdict(cfg)}
    if curve is not None:
        state["losses"] = asdict(curve)
    if ema is not None:
        state["ema"] = ema.state_dict()
    atomic_write(path, lambda p: torch.save(state, p))


def load_network(path: str | os.PathLike, device: str = "auto") -> NetworkDenoiser:
    """A trained ``model.pt`` (or a shipped network's name, :mod:`pipelines.shipped`) as a denoiser with the
    machines' call signature; a missing or unreadable file is an error naming it."""
    path = resolve_model(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no trained model at {path} (train one with `patchbank train`)")
    try:
        ckpt = read_torch(path, "trained model")  # tensors and plain values only: loading it runs no code
    except ValueError as err:
        raise ValueError(f"{path} is not a readable trained model: {err}") from None
    try:
        values: dict[str, Any] = {k: (tuple(v) if k == "widths" else v) for k, v in ckpt["config"].items()}
        cfg = TrainConfig(**values)
        net = build_network(cfg, ckpt["channels"], ckpt["num_classes"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as err:  # truncated pickle, a file of something else, a mismatched state dict
        raise ValueError(f"{path} is not a readable trained model ({type(err).__name__}: {err})") from None
    return NetworkDenoiser(net.to(resolve_device(device)).eval(), str(path))
