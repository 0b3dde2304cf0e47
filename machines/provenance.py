"""Patch-mosaic provenance: which training patches a machine's posterior weighs at each pixel.

For an analytic machine at a state ``x [B, C, H, W]`` and time ``t``, every pixel's posterior is a
softmax over its dictionary's training patches (DESIGN §3). :func:`provenance` computes, exactly and
without touching the machine's backend (so a sample is never changed by explaining it), for each
pixel: the ``m`` heaviest individual training patches — their training image, the location of their
centre in that image, their label and weight share —, the total share those ``m`` hold, and the
posterior's entropy over individual patches (``exp`` of it: the effective number of sources).
:func:`explain` samples and records provenance at chosen steps; :func:`mosaic_statistics` gives the
numbers a paper quotes. Whole-image machines (IS) list training images; their location is the pixel's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from patchbank.base import gather_patches, model_units
from patchbank.datasets import to_model_range
from patchbank.geometry import BucketKey, dictionary_groups, patches_at

from .analytic import Denoiser, ScoreMachine
from .metrics import pearson_r
from .posterior import entry_bias, logits
from .posterior.base import serving
from .posterior.topk import TopKBackend
from .retrieval import cluster_scan, distinct_scan, retained_sources
from .sampler import sample
from .schedule import alpha_sigma2


@dataclass
class Provenance:
    """Per pixel of ``B`` images ``H × W``, the ``m`` heaviest training patches (heaviest first), all
    ``[B, H, W, m]``: ``image`` (training image index, −1 where fewer exist), ``row``/``col`` (the source
    patch's centre in that image), ``label``, ``share`` (posterior weight); ``[B, H, W]``: ``mass`` (their
    total share) and ``entropy`` (nats, over individual training patches); and the ``m`` heaviest training
    *images* by the total share of all their patches, ``images``/``image_share`` ``[B, H, W, m]`` (an image
    of identical patches carries its mass spread over many of them; with ``listed_images``, over the ``m``
    listed patches only, so each is a lower bound on the image's share). ``t``: the time it was taken at;
    ``scale``: the machine's patch size there."""

    t: float
    scale: int | None  # the patch size P the machine used at t (None: whole images)
    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    label: torch.Tensor
    share: torch.Tensor
    mass: torch.Tensor
    entropy: torch.Tensor
    images: torch.Tensor
    image_share: torch.Tensor
    mass_lower: torch.Tensor  # [B, H, W]: a certified lower bound on ``mass`` (equal to it where ``exact``)
    exact: torch.Tensor  # [B, H, W] bool: scanned exactly (False: read off a certified top-k posterior)
    agreement: torch.Tensor | None = None  # [B]: Pearson r of the machine's x̂0 with the sampled denoiser's (explain(along=…))
    listed_images: bool = False  # True: ``images``/``image_share`` sum the m listed patches only (lower bounds)

    @property
    def effective_sources(self) -> torch.Tensor:
        """``exp(entropy)``: the effective number of training patches a pixel draws on, ``[B, H, W]``."""
        return self.entropy.exp()


@torch.no_grad()
def provenance(machine: ScoreMachine, x: torch.Tensor, t: float, labels: torch.Tensor | None = None, m: int = 16,
               block: int = 4096, index: TopKBackend | None = None, tol: float = 1e-4, image_shares: bool = True) -> Provenance:
    """The provenance of ``machine``'s posteriors at state ``x [B, C, H, W]`` and time ``t`` (see the module
    docstring); ``block``: training patches per logits block (memory ``pixels × block``).

    Exact by default. With ``index`` (a :class:`~machines.posterior.topk.TopKBackend`: its ``k``, index
    and bound), pixels of buckets with a distinct-patch table are first explained from their ``k``
    retrieved patches, and kept where the certificate gives ``ε ≤ tol`` (``exact`` is False there:
    shares are of the retained posterior, each within a factor ``1 + ε`` of the true one, and
    ``mass_lower`` is certified); every other pixel is scanned exactly (:mod:`machines.retrieval`).

    ``image_shares=False``: skip the exact per-image shares (the costliest part where posteriors are broad);
    buckets with a distinct-patch table then go through the cluster tree, visiting only the clusters that
    can hold more than 1e-14 of a pixel's mass, and ``images``/``image_share`` sum the listed patches
    (lower bounds). Patches, shares, mass and entropy are exact either way."""
    if not isinstance(machine, ScoreMachine):
        raise TypeError(f"provenance explains analytic machines (ScoreMachine), not {type(machine).__name__}")
    if machine.kind == "ES":
        raise ValueError("provenance for ES (whole-image translates) is not implemented; use IS, LS, ELS or bbELS")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    machine.check_input(x, labels)
    a, s2 = alpha_sigma2(t)
    B, _, H, W = x.shape
    f64 = torch.float64
    fields = {name: torch.full((B, H, W, m), -1, dtype=torch.long) for name in ("image", "row", "col", "label", "images")}
    fields |= {name: torch.zeros(B, H, W, m, dtype=f64) for name in ("share", "image_share")}
    fields |= {name: torch.zeros(B, H, W, dtype=f64) for name in ("mass", "entropy", "mass_lower")}
    fields["exact"] = torch.ones(B, H, W, dtype=torch.bool)
    x = x.detach().to("cpu", f64)
    bank = machine.bank
    for label, idx in machine.label_groups(x, labels):
        ids = bank.image_ids(label)
        for key, locs, queries in _groups(machine, x[idx], label, t):
            top, entries, log_z, ent, img_top, img_pos, eps = _sources(bank, key, locs, ids, queries, a, s2, m, block, index, tol,
                                                                       image_shares)
            L = locs.shape[0]
            per = 1 if key.rule == "IS" else L  # entries per training image
            src = torch.where(entries >= 0, ids[(entries // per).clamp(min=0)], -1)
            share = (top - log_z[:, None]).exp()
            found = {"image": src, "label": torch.where(entries >= 0, bank.labels[src.clamp(min=0)], -1), "share": share,
                     "mass": share.sum(-1), "entropy": ent, "images": torch.where(img_pos >= 0, ids[img_pos.clamp(min=0)], -1),
                     "image_share": (img_top - log_z[:, None]).exp(), "exact": eps.isnan()}
            found["mass_lower"] = torch.where(found["exact"], found["mass"], found["mass"] / (1 + eps))
            if key.rule == "IS":  # one posterior per image, the same at every pixel; each pixel is its own source location
                found = {name: value.repeat_interleave(L, 0) for name, value in found.items()}
                found["row"], found["col"] = (locs[:, d].repeat(idx.numel())[:, None].expand(-1, m) for d in (0, 1))
            else:
                loc = (entries % L).clamp(min=0)
                found["row"], found["col"] = locs[loc, 0], locs[loc, 1]
            pix = (idx.repeat_interleave(L), locs[:, 0].repeat(idx.numel()), locs[:, 1].repeat(idx.numel()))
            for name, value in found.items():
                fields[name][pix] = value
    return Provenance(t, None if machine.scales is None else machine.scales(t), **fields, listed_images=not image_shares)


def explain(machine: ScoreMachine, noise: torch.Tensor, steps: int = 20, labels: torch.Tensor | None = None,
            at: list[int] | None = None, m: int = 16, along: Denoiser | None = None, index: TopKBackend | None = None,
            tol: float = 1e-4, image_shares: bool = True) -> tuple[torch.Tensor, dict[int, Provenance]]:
    """Sample from ``noise`` and take :func:`provenance` at the states of steps ``at`` (default the last
    five); returns the sample — the same as ``sample(machine, noise, steps, labels)`` — and ``{step: Provenance}``.

    ``along``: another denoiser (a trained network) to sample instead; the provenance is then ``machine``'s
    at *that* denoiser's states — for a network and its calibrated machine, the training patches the
    theory says the network's output is made of. The returned sample is ``along``'s. ``index``, ``tol``:
    certified provenance from the bank's index where it holds; ``image_shares``: exact per-image shares, or
    the listed patches' (see :func:`provenance`)."""
    at = list(range(max(0, steps - 5), steps)) if at is None else at
    states: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}
    current = [noise]

    def keep(step: int, t: float, x_prev: torch.Tensor, x0: torch.Tensor) -> None:
        if step in at:
            states[step] = (t, current[0], x0)
        current[0] = x_prev

    final = sample(machine if along is None else along, noise, steps, labels, callback=keep)
    found = {}
    for step, (t, x, x0) in sorted(states.items()):
        x = x.to(noise.dtype)
        found[step] = provenance(machine, x, t, labels, m, index=index, tol=tol, image_shares=image_shares)
        if along is not None:
            found[step].agreement = pearson_r(machine(x, t, labels), x0.to(x.dtype))
    return final, found


def memorisation(samples: torch.Tensor, p: Provenance, data) -> list[dict]:
    """Per image of ``samples [B, C, H, W]`` (in [-1, 1]): the RMS distance to its nearest training image (the
    memorisation check of the IS baseline) beside the RMS distance to its reassembled mosaic (each pixel
    replaced by its top source patch's centre). A sample far from every training image but close to its
    mosaic is new as a whole and made of training patches."""
    x = samples.detach().to("cpu", torch.float64).flatten(1)
    train = to_model_range(data.images, torch.float64).flatten(1)
    nearest = torch.cdist(x, train).min(1)
    mosaic = reassembled_mosaic(p, data).flatten(1)
    scale = x.shape[1] ** 0.5
    return [{"nearest_training_image": int(i), "nearest_training_rms": float(d) / scale,
             "mosaic_rms": float((x[b] - mosaic[b]).norm()) / scale}
            for b, (d, i) in enumerate(zip(nearest.values, nearest.indices))]


def reassembled_mosaic(p: Provenance, data) -> torch.Tensor:
    """Each pixel replaced by the centre value of its top source patch: ``[B, C, H, W]`` in [-1, 1]."""
    image, row, col = p.image[..., 0].clamp(min=0), p.row[..., 0], p.col[..., 0]
    return to_model_range(data.images[image, :, row, col], torch.float64).permute(0, 3, 1, 2)


def mosaic_statistics(p: Provenance, sample_labels: torch.Tensor | None = None) -> list[dict]:
    """Per image: distinct training images among the pixels' top sources, sizes of the 4-connected regions
    that share a top source image (largest first), the fraction of pixels whose top source holds ≥ 50% /
    ≥ 90% of the mass, and — given the samples' labels — whether every listed source has that label."""
    stats = []
    for b in range(p.image.shape[0]):
        top = p.images[b, :, :, 0]  # each pixel's top source image (by the total share of its patches)
        row = {"distinct_sources": int(top.unique().numel()), "regions": _region_sizes(top),
               "top_share_ge_0.5": float((p.image_share[b, :, :, 0] >= 0.5).double().mean()),
               "top_share_ge_0.9": float((p.image_share[b, :, :, 0] >= 0.9).double().mean()),
               "effective_sources_median": float(p.effective_sources[b].median())}
        if sample_labels is not None:
            row["sources_within_label"] = bool((p.label[b][p.share[b] > 0] == int(sample_labels[b])).all())
        stats.append(row)
    return stats


def _sources(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float, m: int,
             block: int, index: TopKBackend | None, tol: float, image_shares: bool = True) -> tuple[torch.Tensor, ...]:
    """:func:`_scan`'s results for every query, and each query's certificate ε (NaN where scanned exactly):
    from the retained posterior where ``index`` certifies it, else from the exact scan."""
    nan = torch.full((q.shape[0],), torch.nan, dtype=torch.float64)
    table = serving(bank, key) == "table"
    def scan(bank: Any, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float,
             m: int) -> tuple[torch.Tensor, ...]:  # through distinct patches and their clusters where the bank has them, else every patch
        if not table:
            return _scan(bank, key, locs, ids, q, a, s2, m, block)
        if image_shares:
            return distinct_scan(bank, key, locs, ids, q, a, s2, m, block)
        return cluster_scan(bank, key, locs, ids, q, a, s2, m)
    if index is None or not table:
        return (*scan(bank, key, locs, ids, q, a, s2, m), nan)
    ok, kept = retained_sources(bank, key, locs, ids, q, a, s2, m, index, tol)
    names = ("top", "entries", "log_z", "entropy", "img_top", "img_pos")
    if not ok.all():
        scanned = scan(bank, key, locs, ids, q[~ok], a, s2, m)
    out = []
    for i, name in enumerate(names):
        like = kept[name] if kept else scanned[i]
        value = torch.empty((q.shape[0], *like.shape[1:]), dtype=like.dtype)
        if kept:
            value[ok] = kept[name]
        if not ok.all():
            value[~ok] = scanned[i]
        out.append(value)
    if kept:
        nan[ok] = kept["eps"].double()
    return (*out, nan)


def _groups(machine: ScoreMachine, x: torch.Tensor, label: int | None, t: float):
    """``(bucket, pixels [L, 2], queries)`` for every dictionary the machine uses at ``x`` and ``t``: patch
    queries ``[b·L, D]`` image-major, or for IS every pixel and one whole-image query per image ``[b, C·H·W]``."""
    if machine.scales is None:  # every pixel shares its image's posterior
        pixels = torch.stack(torch.meshgrid(torch.arange(machine.height), torch.arange(machine.width), indexing="ij"), -1)
        yield BucketKey("IS", None, machine.padding, (), label), pixels.reshape(-1, 2), x.flatten(1)
        return
    P = machine.scales(t)
    for key, locs in dictionary_groups(machine.height, machine.width, P, machine.kind):  # type: ignore[arg-type]
        yield BucketKey(machine.kind, P, machine.padding, key, label), locs, patches_at(x, locs, P, machine.padding).flatten(0, 1)


def _scan(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float, m: int,
          block: int) -> tuple[torch.Tensor, ...]:
    """One pass over every (training image, location) entry of a bucket, image-major then location, in
    blocks of whole images: the ``m`` largest logits ``[Q, m]`` and their entry numbers (−1 where fewer
    exist), ``log Z [Q]``, the entropy ``[Q]`` (running max, Σe^(ℓ−max), Σe^(ℓ−max)·ℓ), and the ``m`` largest
    per-image log-sum-exps ``[Q, m]`` with their positions in ``ids``."""
    Q, f64 = q.shape[0], torch.float64
    run_max = torch.full((Q,), -torch.inf, dtype=f64)
    Z, S = torch.zeros(Q, dtype=f64), torch.zeros(Q, dtype=f64)
    top = torch.full((Q, m), -torch.inf, dtype=f64)
    entries = torch.full((Q, m), -1, dtype=torch.long)
    img_top, img_pos = top.clone(), entries.clone()
    per = 1 if key.rule == "IS" else locs.shape[0]
    table = None if key.rule == "IS" else bank.padded(key.scale, key.padding)
    step = max(1, block // per)
    for s in range(0, ids.numel(), step):
        img = ids[s : s + step]
        if table is None:
            keys = to_model_range(bank.data.images[img], f64).flatten(1)
        else:
            keys = model_units(gather_patches(table, img.repeat_interleave(per), locs.repeat(img.numel(), 1), key.size), f64, "cpu")
        ell = logits(q, keys, entry_bias(keys.pow(2).sum(1), None, a, s2, f64), a, s2)  # [Q, M]
        new_max = torch.maximum(run_max, ell.amax(1))
        scale = torch.where(torch.isfinite(run_max), (run_max - new_max).exp(), torch.zeros_like(new_max))
        w = (ell - new_max[:, None]).exp()
        Z, S, run_max = Z * scale + w.sum(1), S * scale + (w * ell).sum(1), new_max
        cand = torch.cat([top, ell], 1)
        numbers = torch.cat([entries, (s * per + torch.arange(ell.shape[1]))[None, :].expand(Q, -1)], 1)
        top, pos = cand.topk(m, 1)
        entries = torch.gather(numbers, 1, pos)
        per_image = ell.view(Q, img.numel(), per).logsumexp(2)  # each image's entries all lie in this block
        cand = torch.cat([img_top, per_image], 1)
        numbers = torch.cat([img_pos, (s + torch.arange(img.numel()))[None, :].expand(Q, -1)], 1)
        img_top, pos = cand.topk(m, 1)
        img_pos = torch.gather(numbers, 1, pos)
    log_z = run_max + Z.log()
    valid = torch.isfinite(top), torch.isfinite(img_top)
    return (top, torch.where(valid[0], entries, -1), log_z, log_z - S / Z, img_top, torch.where(valid[1], img_pos, -1))


def _region_sizes(top: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected regions of equal values in a ``[H, W]`` map, largest first."""
    H, W = top.shape
    seen = torch.zeros(H, W, dtype=torch.bool)
    sizes = []
    for i in range(H):
        for j in range(W):
            if seen[i, j]:
                continue
            value, stack, n = top[i, j], [(i, j)], 0
            seen[i, j] = True
            while stack:
                u, v = stack.pop()
                n += 1
                for du, dv in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    y, z = u + du, v + dv
                    if 0 <= y < H and 0 <= z < W and not seen[y, z] and top[y, z] == value:
                        seen[y, z] = True
                        stack.append((y, z))
            sizes.append(n)
    return sorted(sizes, reverse=True)
