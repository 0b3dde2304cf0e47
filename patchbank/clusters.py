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

from .tables import UniquePatches

_BLOCK = 1 << 20  # rows projected at a time


class ClusteredPatches(NamedTuple):
    """Distinct patches grouped into clusters. ``U`` patches of dimension ``D`` in ``K`` clusters.

    patches: int16 ``[U, D]`` (units of 1/255, cluster ``k`` is rows ``offsets[k]:offsets[k+1]``);
    log_counts, sq_norms: float64 ``[U]`` (``‖p‖²`` in model units); offsets: long ``[K+1]``;
    centres: float64 ``[K, D]``; radii: float64 ``[K]``; max_log_count: float64 ``[K]``;
    order: long ``[U]``, row ``i`` here is row ``order[i]`` of the distinct-patch table.
    """

    patches: torch.Tensor
    log_counts: torch.Tensor
    sq_norms: torch.Tensor
    offsets: torch.Tensor
    centres: torch.Tensor
    radii: torch.Tensor
    max_log_count: torch.Tensor
    order: torch.Tensor

    @property
    def n_clusters(self) -> int:
        return self.centres.shape[0]


def cluster_patches(table: UniquePatches, leaf_size: int = 1024, sample: int = 65536) -> ClusteredPatches:
    """Group a bucket's distinct patches into clusters of at most ``leaf_size`` rows.

    Memory stays near the size of the int16 table: split directions are estimated from at most
    ``sample`` rows of a range, projections and cluster statistics are computed range by range.
    """
    if leaf_size < 1:
        raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    perm = torch.arange(table.patches.shape[0])
    bounds = _split(table.patches, perm, leaf_size, sample)
    patches = table.patches[perm]
    counts = table.counts[perm]
    offsets = torch.tensor([0] + [e for _, e in bounds])
    centres, radii, max_lc, sq_norms = [], [], [], []
    for s, e in bounds:
        values = patches[s:e].to(torch.float64) / 255.0
        centre = values.mean(0)
        centres.append(centre)
        radii.append((values - centre).norm(dim=1).max())
        max_lc.append(counts[s:e].max().to(torch.float64).log())
        sq_norms.append(values.pow(2).sum(1))
    return ClusteredPatches(
        patches, counts.to(torch.float64).log(), torch.cat(sq_norms), offsets,
        torch.stack(centres), torch.stack(radii), torch.stack(max_lc), perm,
    )


def _split(patches: torch.Tensor, perm: torch.Tensor, leaf_size: int, sample: int) -> list[tuple[int, int]]:
    """Reorder ``perm`` in place into leaves (median splits along each range's principal direction)."""
    todo, leaves = [(0, patches.shape[0])], []
    gen = torch.Generator().manual_seed(0)
    while todo:
        s, e = todo.pop()
        if e - s <= leaf_size:
            leaves.append((s, e))
            continue
        idx = perm[s:e]
        probe = idx if e - s <= sample else idx[torch.randperm(e - s, generator=gen)[:sample]]
        rows = patches[probe].to(torch.float32)
        mean = rows.mean(0)
        direction = _principal_direction(rows - mean, gen)
        proj = torch.cat([(patches[idx[i : i + _BLOCK]].to(torch.float32) - mean) @ direction for i in range(0, e - s, _BLOCK)])
        perm[s:e] = idx[torch.argsort(proj, stable=True)]
        mid = (s + e) // 2
        todo += [(mid, e), (s, mid)]
    return sorted(leaves)


def _principal_direction(centred: torch.Tensor, gen: torch.Generator, iters: int = 6) -> torch.Tensor:
    """Approximate top principal direction of centred rows ``[n, D]`` by power iteration: ``[D]``."""
    v = torch.randn(centred.shape[1], generator=gen)
    for _ in range(iters):
        v = centred.T @ (centred @ v)
        norm = v.norm()
        if norm == 0:
            return torch.eye(centred.shape[1])[0]
        v = v / norm
    return v
