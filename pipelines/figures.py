"""Figures for evaluation and calibration (matplotlib, written through a temporary name)."""

from __future__ import annotations

import math
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


def image_pairs(samples: dict[int, dict[str, torch.Tensor]], path: str | os.PathLike, n: int = 8,
                seeds: list[int] | None = None, captions: list[str] | None = None) -> None:
    """One row per theory — network / machine / IS, then any other theory evaluated — for the first ``n`` seeds
    (or the given ``seeds``, in order, each column captioned by ``captions`` when given)."""
    seeds = sorted(samples)[:n] if seeds is None else list(seeds)
    if captions is not None and len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions for {len(seeds)} seeds")
    names = ["network", "machine", "is"] + [k for k in samples[seeds[0]] if k not in ("network", "machine", "is")]
    rows = [torch.stack([samples[s][name] for s in seeds]) for name in names]
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=len(seeds), padding=2, pad_value=1.0).clamp(0, 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(seeds), 1.35 * len(names)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if grid.shape[0] == 1 else None)
    ax.set_yticks([grid.shape[1] * (i + 0.5) / len(names) for i in range(len(names))],
                  [{"is": "IS"}.get(name, name) for name in names])
    if captions is None:
        ax.set_xticks([])
    else:
        ax.set_xticks([grid.shape[2] * (i + 0.5) / len(seeds) for i in range(len(seeds))], captions, fontsize=7)
    _save(fig, path)


def agreement_scatter(rows: list[dict], path: str | os.PathLike) -> None:
    """Per seed: Pearson r of the machine vs of the IS baseline (both against the network)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter([r["is_r"] for r in rows], [r["machine_r"] for r in rows], s=12)
    ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
    ax.set(xlabel="IS vs network (Pearson r)", ylabel="machine vs network (Pearson r)", xlim=(-0.2, 1), ylim=(-0.2, 1))
    _save(fig, path)


def scale_curve(schedule: list[list[float]], path: str | os.PathLike, reference: list[list[float]] | None = None) -> None:
    """The calibrated P(t) (and optionally a reference schedule, e.g. the paper's, dashed)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.step([t for t, _ in schedule], [P for _, P in schedule], where="mid", label="calibrated")
    if reference:
        ax.step([t for t, _ in reference], [P for _, P in reference], where="mid", ls="--", label="paper")
    ax.set(xlabel="t", ylabel="patch size P")
    ax.legend()
    _save(fig, path)


def loss_curve(points: list[list[float]], path: str | os.PathLike, title: str = "") -> None:
    """A training run's mean loss per checkpoint interval, ``points`` ``[[iteration, loss], …]`` (log scale)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([i for i, _ in points], [v for _, v in points], lw=1)
    ax.set(xlabel="iteration", ylabel="mean ε loss", yscale="log", title=title)
    _save(fig, path)


def pareto_plot(rows: list[dict], path: str | os.PathLike) -> None:
    """Error vs time: seconds per sample against 1 − min Pearson r with exact (log), one point per config."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        err = max(1 - r["pearson_r_min"], 1e-12)
        marker = "o" if r["certified"] else "x"
        ax.scatter(r["seconds_per_sample"], err, marker=marker)
        ax.annotate(r["config"], (r["seconds_per_sample"], err), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1e-3, color="k", ls="--", lw=0.8, label="r = 0.999")
    ax.set(xscale="log", yscale="log", xlabel="seconds per sample", ylabel="1 − min r against exact (floor 1e-12)")
    ax.legend(fontsize=7)
    _save(fig, path)


def fallback_curves(steps: dict[str, list[dict]], path: str | os.PathLike) -> None:
    """Fraction of pixels recomputed exactly, per step, for every top-k configuration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in steps.items():
        if recs and "fallback_fraction" in recs[0]:
            ax.plot([r["t"] for r in recs], [r["fallback_fraction"] for r in recs], marker=".", label=name)
    ax.set(xlabel="t", ylabel="fallback fraction", ylim=(-0.02, 1.02))
    if ax.lines:  # a grid without top-k rows (exact only, or a comparator's) has no curves to name
        ax.legend(fontsize=6)
    _save(fig, path)


def concentration_heatmap(cells: list[dict], path: str | os.PathLike) -> None:
    """log10 of the distinct patches holding 1 − 10⁻³ of the posterior, over (t, P), with its fraction of the bucket."""
    ts = sorted({c["t"] for c in cells})
    Ps = sorted({c["P"] for c in cells})
    grid = torch.full((len(Ps), len(ts)), float("nan"))
    for c in cells:
        grid[Ps.index(c["P"]), ts.index(c["t"])] = torch.tensor(float(c["k_mass_median"])).log10()
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(ts), 1 + 0.5 * len(Ps)))
    im = ax.imshow(grid.numpy(), origin="lower", aspect="auto", cmap="viridis")
    for c in cells:
        frac = c["k_mass_median"] / max(c["entries_median"], 1)
        ax.text(ts.index(c["t"]), Ps.index(c["P"]), f"{frac:.0%}" if frac >= 0.01 else f"{frac:.1%}", ha="center", va="center",
                fontsize=6, color="w")
    ax.set_xticks(range(len(ts)), [f"{t:.2f}" for t in ts])
    ax.set_yticks(range(len(Ps)), [str(P) for P in Ps])
    ax.set(xlabel="t", ylabel="P", title="log10 k(0.999) (text: fraction of the bucket)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def provenance_figure(samples: torch.Tensor, prov, data, path: str | os.PathLike, n: int = 8, min_share: float = 0.01) -> None:
    """Rows per sample: the sample, its attribution map (each pixel coloured by its top source image; grey where
    that image holds less than ``min_share`` of the pixel's posterior, so no one image stands out), the
    reassembled mosaic (each pixel replaced by the centre of its top source patch) and the effective number of
    sources per pixel (log10 of ``exp(entropy)``), for the first ``n``. ``samples [B, C, H, W]`` in [-1, 1];
    ``prov``: a :class:`~machines.provenance.Provenance`; ``data``: the training :class:`~patchbank.ImageData`.
    Colour images are shown as RGB, grey ones in grey."""
    import numpy as np

    from machines.provenance import reassembled_mosaic

    B = min(n, samples.shape[0])
    mosaic = (reassembled_mosaic(prov, data) + 1) / 2  # [B, C, H, W] in [0, 1]
    fig, axes = plt.subplots(B, 4, figsize=(8, 2 * B), squeeze=False)
    sources = plt.get_cmap("tab20").copy()
    sources.set_bad("lightgrey")
    spread = prov.entropy.div(math.log(10)).clamp(min=0)  # log10 of the effective number of sources
    for b in range(B):
        _show(axes[b, 0], (samples[b].double() + 1) / 2)
        top = np.ma.masked_where((prov.image_share[b, :, :, 0] < min_share).numpy(), prov.images[b, :, :, 0].numpy() % 20)
        axes[b, 1].imshow(top, cmap=sources, vmin=0, vmax=19, interpolation="nearest")
        _show(axes[b, 2], mosaic[b])
        shown = axes[b, 3].imshow(spread[b].numpy(), cmap="viridis", vmin=0, vmax=max(1.0, float(spread.max())),
                                  interpolation="nearest")
        for ax in axes[b, 1], axes[b, 3]:
            ax.set_xticks([])
            ax.set_yticks([])
        if b == 0:
            for ax, title in zip(axes[b], ("sample", f"top source image\n(grey: < {min_share:.0%})", "reassembled mosaic",
                                           "log10 effective sources")):
                ax.set_title(title, fontsize=8)
    fig.colorbar(shown, ax=axes[:, 3].tolist(), fraction=0.05)
    _save(fig, path)


def _show(ax, picture: torch.Tensor) -> None:
    """A ``[C, H, W]`` picture in [0, 1]: grey for one channel, RGB for three."""
    shown = picture.clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray" if shown.shape[-1] == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def source_gallery(sample: torch.Tensor, prov, data, path: str | os.PathLike, b: int = 0, n: int = 8) -> list[dict]:
    """The sample ``b`` beside its ``n`` top source images (ranked by the pixels whose top source they are),
    each with the patches it lent outlined where they were taken (the top patch of every such pixel,
    ``prov.scale`` wide; whole-image machines outline the whole image). ``sample [C, H, W]`` in [-1, 1].
    Returns the gallery's rows: ``{"image", "label", "pixels"}``."""
    from matplotlib.patches import Rectangle

    top = prov.image[b, :, :, 0]
    ids, counts = top[top >= 0].unique(return_counts=True)
    order = counts.argsort(descending=True)[:n]
    rows = [{"image": int(ids[i]), "label": int(data.labels[ids[i]]), "pixels": int(counts[i])} for i in order]
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(1.6 * (len(rows) + 1), 2), squeeze=False)
    _show(axes[0, 0], (sample.double() + 1) / 2)
    axes[0, 0].set_title("sample", fontsize=8)
    H, W = top.shape
    for ax, row in zip(axes[0, 1:], rows):
        _show(ax, data.images[row["image"]].double() / 255.0)
        where = top == row["image"]
        centres = {(int(r), int(c)) for r, c in zip(prov.row[b, :, :, 0][where], prov.col[b, :, :, 0][where])}
        size = prov.scale or max(H, W)
        for r, c in sorted(centres) if prov.scale else [((H - 1) / 2, (W - 1) / 2)]:
            ax.add_patch(Rectangle((c - size / 2, r - size / 2), size, size, fill=False, lw=0.4, ec="tab:red", alpha=0.6))
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_title(f"#{row['image']} (label {row['label']})\n{row['pixels']} px", fontsize=7)
    _save(fig, path)
    return rows
