"""Figures for evaluation and calibration (matplotlib, written through a temporary name)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from patchbank.atomic import atomic_write  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def image_pairs(samples: dict[int, dict[str, torch.Tensor]], path: str | os.PathLike, n: int = 8) -> None:
    """Rows network / machine / IS for the first ``n`` seeds."""
    seeds = sorted(samples)[:n]
    rows = [torch.stack([samples[s][name] for s in seeds]) for name in ("network", "machine", "is")]
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=len(seeds), padding=2, pad_value=1.0).clamp(0, 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(seeds), 4))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if grid.shape[0] == 1 else None)
    ax.set_yticks([grid.shape[1] * (i + 0.5) / 3 for i in range(3)], ["network", "machine", "IS"])
    ax.set_xticks([])
    _save(fig, path)


def agreement_scatter(rows: list[dict], path: str | os.PathLike) -> None:
    """Per seed: Pearson r of the machine vs of the IS baseline (both against the network)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter([r["is_r"] for r in rows], [r["machine_r"] for r in rows], s=12)
    ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
    ax.set(xlabel="IS vs network (Pearson r)", ylabel="machine vs network (Pearson r)", xlim=(-0.2, 1), ylim=(-0.2, 1))
    _save(fig, path)


def scale_curve(schedule: list[list[float]], path: str | os.PathLike, reference: list[list[float]] | None = None) -> None:
    """The calibrated P(t) (and optionally a reference schedule)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.step([t for t, _ in schedule], [P for _, P in schedule], where="mid", label="calibrated")
    if reference:
        ax.step([t for t, _ in reference], [P for _, P in reference], where="mid", ls="--", label="reference")
    ax.set(xlabel="t", ylabel="patch size P")
    ax.legend()
    _save(fig, path)
