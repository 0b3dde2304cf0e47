"""Spatially coherent clusters of a bucket's distinct patches, with centres and radii.

A bucket's distinct patches are reordered so that each cluster is a contiguous range, by
recursive median splits along each range's principal direction (a balanced PCA tree whose
leaves hold at most ``leaf_size`` patches). Each cluster records its centre ``c`` and radius
``R = max ‖p − c‖``: by the triangle inequality every member satisfies
``‖q − a·p‖ ≥ ‖q − a·c‖ − a·R``, which lets a posterior backend skip whole clusters whose
weights are provably negligible (an IVF list with radii, built without k-means).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .memory import UniquePatches


class ClusteredPatches(NamedTuple):
    """Distinct patches grouped into clusters. ``U`` patches of dimension ``D`` in ``K`` clusters.

    patches: int16 ``[U, D]`` (units of 1/255, cluster ``k`` is rows ``offsets[k]:offsets[k+1]``);
    log_counts, sq_norms: float64 ``[U]`` (``‖p‖²`` in model units); offsets: long ``[K+1]``;
    centres: float64 ``[K, D]``; radii: float64 ``[K]``; max_log_count: float64 ``[K]``.
    """

    patches: torch.Tensor
    log_counts: torch.Tensor
    sq_norms: torch.Tensor
    offsets: torch.Tensor
    centres: torch.Tensor
    radii: torch.Tensor
    max_log_count: torch.Tensor

    @property
    def n_clusters(self) -> int:
        return self.centres.shape[0]


def cluster_patches(table: UniquePatches, leaf_size: int = 1024, power_iters: int = 6) -> ClusteredPatches:
    """Group a bucket's distinct patches into clusters of at most ``leaf_size`` rows."""
    if leaf_size < 1:
        raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    x = table.patches.to(torch.float32)
    perm = torch.arange(x.shape[0])
    bounds = _split(x, perm, leaf_size, power_iters)
    patches = table.patches[perm]
    values = patches.to(torch.float64) / 255.0
    log_counts = table.counts[perm].to(torch.float64).log()
    offsets = torch.tensor([0] + [e for _, e in bounds])
    centres = torch.stack([values[s:e].mean(0) for s, e in bounds])
    radii = torch.stack([(values[s:e] - centres[k]).norm(dim=1).max() for k, (s, e) in enumerate(bounds)])
    max_lc = torch.stack([log_counts[s:e].max() for s, e in bounds])
    return ClusteredPatches(patches, log_counts, values.pow(2).sum(1), offsets, centres, radii, max_lc)


def _split(x: torch.Tensor, perm: torch.Tensor, leaf_size: int, power_iters: int) -> list[tuple[int, int]]:
    """Reorder ``perm`` in place into leaves; returns the leaves' ``(start, end)`` in order."""
    todo, leaves = [(0, x.shape[0])], []
    gen = torch.Generator().manual_seed(0)
    while todo:
        s, e = todo.pop()
        if e - s <= leaf_size:
            leaves.append((s, e))
            continue
        seg = x[perm[s:e]]
        proj = (seg - seg.mean(0)) @ _principal_direction(seg, power_iters, gen)
        perm[s:e] = perm[s:e][torch.argsort(proj, stable=True)]
        mid = (s + e) // 2
        todo += [(mid, e), (s, mid)]
    return sorted(leaves)


def _principal_direction(seg: torch.Tensor, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Approximate top principal direction of ``seg [n, D]`` by power iteration: ``[D]``."""
    centred = seg - seg.mean(0)
    v = torch.randn(seg.shape[1], generator=gen)
    for _ in range(iters):
        v = centred.T @ (centred @ v)
        norm = v.norm()
        if norm == 0:
            return torch.eye(seg.shape[1])[0]
        v = v / norm
    return v
