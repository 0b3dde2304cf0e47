"""Where a bucket's distinct patches came from, and provenance read off them without visiting every patch.

Distinct-patch tables have forgotten which images their rows came from. :func:`source_map` recovers it
once per bucket (one integer-compare pass over the bucket's patches, then kept beside the bank): for
every distinct patch, the entries (training image position × L + location) it occurs at, and how
often it occurs in each image. Two exact-to-round-off routes use it:

* :func:`distinct_scan`: every distinct patch once (its count as a log weight), then exact per-image
  shares from the per-image counts — one sparse product.
* :func:`cluster_scan`: without per-image shares, through the bank's cluster tree as the pruned exact
  backend sums (DESIGN §3): a (query, cluster) pair is skipped when the cluster's bound puts all its
  patches together below ``PRUNE_TOL / U`` of the query's running maximum, so what is skipped is below
  ``PRUNE_TOL`` of the posterior's mass. The images' shares are then lower bounds from the listed patches.
* :func:`retained_sources`: certified provenance from the bank's index. The top-k backend retrieves
  the ``k`` nearest distinct patches and certifies ε, the weight left out over the weight retained
  (:meth:`~machines.posterior.topk.TopKBackend.retained`). Where ε ≤ ``tol`` the provenance is read off
  the retained posterior: shares ``w/Z_k`` (each true share lies in ``[w/(Z_k(1+ε)), w/Z_k]``), and
  the listed mass has the certified lower bound ``Σ w/(Z_k(1+ε))``.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from patchbank.geometry import BucketKey, pad_images, patches_at

from . import native
from .posterior import entry_bias, logits
from .posterior.exact import cluster_upper
from .posterior.topk import TopKBackend

NEGLIGIBLE = 1e-18
"""Share below which a distinct patch (all its copies) is left out of a query's per-image shares."""

PRUNE_TOL = 1e-14
"""Largest fraction of a query's posterior mass that :func:`cluster_scan` may skip."""

LEAF_SIZE = 2048
"""Cluster size of the tree :func:`cluster_scan` prunes with (the exact backend's, so both share one tree)."""

USE_KERNEL: bool | None = None
"""Whether :func:`cluster_scan` sweeps the cluster tree in C (:func:`machines.native.tree_provenance`: logits,
sums and the running top list in one call, 1.8–2.2× faster) and source maps use the C hash table; None: where
the kernels compile, else torch operations (the same sums, a merge of per-block top lists)."""

MERGE_EVERY = 1 << 22
"""Candidates :func:`cluster_scan` collects before merging them down to each query's ``m`` best (memory)."""


def _merge_top(found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Q: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest values per query from candidate triples (query ``[n]``, value ``[n]``, patch ``[n]``): values
    ``[Q, m]`` (−inf where fewer) and their patches ``[Q, m]`` (−1 where fewer), by one sort by (query, value)."""
    who, value, patch = (torch.cat([f[i] for f in found]) for i in range(3))
    by = torch.argsort(value, descending=True, stable=True)
    by = by[torch.argsort(who[by], stable=True)]
    who, value, patch = who[by], value[by], patch[by]
    rank = torch.arange(who.numel()) - torch.searchsorted(who, who)
    keep = rank < m
    top = torch.full((Q, m), -torch.inf, dtype=torch.float64)
    best = torch.full((Q, m), -1, dtype=torch.long)
    top[who[keep], rank[keep]] = value[keep]
    best[who[keep], rank[keep]] = patch[keep]
    return top, best


class SourceMap(NamedTuple):
    """Where each of a bucket's ``U`` distinct patches occurs among its ``N`` entries (entry ``e`` is
    training image position ``e // L`` × location ``e % L``): ``order [N]`` (entry numbers grouped by
    distinct patch, ascending within each), ``offsets [U+1]`` (patch ``u``'s entries are
    ``order[offsets[u]:offsets[u+1]]``), and per patch its images with their occurrence counts, as CSR:
    ``image_offsets [U+1]``, ``image_pos [nnz]`` (positions in the bucket's image list), ``image_count [nnz]``."""

    order: torch.Tensor
    offsets: torch.Tensor
    image_offsets: torch.Tensor
    image_pos: torch.Tensor
    image_count: torch.Tensor

    def first(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        """The first ``m`` entries of distinct patches ``rows [...]``: ``[..., m]`` (−1 where fewer)."""
        start = self.offsets[rows][..., None] + torch.arange(m)
        inside = start < self.offsets[rows + 1][..., None]
        return torch.where(inside, self.order[start.clamp(max=self.order.numel() - 1)], -1)

    def per_image(self, rows: torch.Tensor, n_images: int) -> torch.Tensor:
        """Occurrence counts of distinct patches ``rows [S]`` per image, sparse ``[n_images, S]`` (float64)."""
        lo, hi = self.image_offsets[rows], self.image_offsets[rows + 1]
        size = hi - lo
        col = torch.repeat_interleave(torch.arange(rows.numel()), size)
        at = torch.repeat_interleave(lo - torch.cumsum(size, 0) + size, size) + torch.arange(int(size.sum()))
        return torch.sparse_coo_tensor(torch.stack([self.image_pos[at], col]), self.image_count[at].double(),
                                       (n_images, rows.numel()), check_invariants=False)


_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def source_map(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, block: int = 1 << 20) -> SourceMap:
    """The bucket's :class:`SourceMap` (built once per bank and bucket, then kept while the bank lives): one
    pass over the patches of images ``ids`` at pixels ``locs [L, 2]``, each matched to its row of the
    distinct-patch table as integers (a hash, then every hash match checked value by value: through the C
    hash table of :class:`~machines.native.RowTable`, else sorted hashes). Memory ``~3·N``
    integers. A table that does not match the images is an error naming the bucket."""
    cache = _MAPS.setdefault(bank, {})
    if key in cache:
        return cache[key]
    table = bank.unique_patches(key)  # int16 units 2·u8 − 255
    U, L = table.patches.shape[0], locs.shape[0]
    if native.available() if USE_KERNEL is None else USE_KERNEL:  # the windows are read in place from the padded images
        rows = native.RowTable(table.patches)
        lookup = lambda x: rows.find_windows(pad_images(x, key.size // 2, key.padding), locs, key.size)  # noqa: E731
    else:
        hashes = _SortedHashes(table.patches.numpy(), f"bucket {key}")
        lookup = lambda x: hashes.find(patches_at(x, locs, key.size, key.padding).flatten(0, 1))  # noqa: E731
    inverse = torch.empty(ids.numel() * L, dtype=torch.int64)
    step = max(1, block // L)
    for s in tqdm(range(0, ids.numel(), step), desc=f"sources P={key.scale} {key.dictionary}", leave=False,
                  disable=ids.numel() <= 4 * step):
        x = bank.data.images[ids[s : s + step]].to(torch.int16).mul_(2).sub_(255)
        which, missing = lookup(x)
        if missing:
            raise ValueError(f"bucket {key}: the bank's distinct-patch table does not hold every patch of its images "
                             "(a table built for other data?)")
        inverse[s * L : s * L + which.numel()] = which
    counts = torch.bincount(inverse, minlength=U)
    if not torch.equal(counts, table.counts):
        raise ValueError(f"bucket {key}: the distinct-patch table's counts do not match its images (a table built for other data?)")
    order = native.counting_order(inverse, counts)  # the stable sort (torch's without the C kernels)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    # per patch, its images: runs of equal (patch, image) along ``order`` (images ascend within a patch)
    code = inverse[order].mul_(ids.numel()).add_(order // L)
    start = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), code[1:] != code[:-1]])).view(-1)
    run = torch.diff(torch.cat([start, torch.tensor([code.numel()])]))
    patch_of_run = code[start] // ids.numel()
    image_offsets = torch.cat([counts.new_zeros(1), torch.bincount(patch_of_run, minlength=U).cumsum(0)])
    found = SourceMap(order, offsets, image_offsets, code[start] % ids.numel(), run)
    cache[key] = found
    return found


class _SortedHashes:
    """The table lookup of :func:`source_map` without the C kernels: rows' 64-bit hashes, sorted, searched in
    ascending order of the queries' hashes (the binary searches stay in cache), every hit checked."""

    def __init__(self, rows: np.ndarray, name: str) -> None:
        self.rows = rows
        self.mix = np.random.default_rng(0).integers(1, 2**62, size=(rows.shape[1],), dtype=np.int64) | 1
        hashes = rows.astype(np.int64) @ self.mix  # wraps modulo 2^64: fine for a hash
        self.by_hash = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.by_hash]
        if np.any(self.sorted[1:] == self.sorted[:-1]):
            raise RuntimeError(f"two distinct patches of {name} share a hash")  # 2^-64 per pair: never seen

    def find(self, queries: torch.Tensor) -> tuple[torch.Tensor, int]:
        q = queries.numpy()
        h = q.astype(np.int64) @ self.mix
        by = np.argsort(h)
        at = np.empty_like(by)
        at[by] = np.searchsorted(self.sorted, h[by]).clip(max=self.rows.shape[0] - 1)
        which = self.by_hash[at]
        ok = (self.sorted[at] == h) & (q == self.rows[which]).all(1)
        return torch.from_numpy(np.where(ok, which, -1)), int((~ok).sum())


def forget_sources(bank) -> None:
    """Drop the source maps kept for ``bank`` (they hold ~3 integers per patch of every bucket explained)."""
    _MAPS.pop(bank, None)


def image_top(sources: SourceMap, n_images: int, rows: torch.Tensor, patch: torch.Tensor, share: torch.Tensor, Q: int, m: int,
              log_z: torch.Tensor, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` heaviest images per query from per-copy shares: ``share [T]`` of one copy of distinct patch
    ``patch [T]`` for query ``rows [T]`` (relative to ``exp(log_z)``); returns log weights ``[Q, m]`` (−inf where
    fewer) and image positions ``[Q, m]`` (−1 where fewer): the patches' sparse per-image counts ``[images, S]``
    times the shares ``[S, chunk]``, ``chunk`` queries at a time."""
    top = torch.full((Q, m), -torch.inf, dtype=torch.float64)
    pos = torch.full((Q, m), -1, dtype=torch.long)
    n = min(m, n_images)
    if patch.numel() == 0:
        return top, pos
    wanted, slot = patch.unique(return_inverse=True)
    weights = torch.zeros(wanted.numel(), Q, dtype=torch.float64)
    weights.index_put_((slot, rows), share, accumulate=True)
    counts = sources.per_image(wanted, n_images)
    for c in range(0, Q, chunk):
        value, where = torch.sparse.mm(counts, weights[:, c : c + chunk]).T.topk(n, 1)  # [b, n]
        top[c : c + chunk, :n] = torch.where(value > 0, value.log() + log_z[c : c + chunk, None], -torch.inf)
        pos[c : c + chunk, :n] = torch.where(value > 0, where, -1)
    return top, pos


def listed_copies(sources: SourceMap, best: torch.Tensor, single: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` heaviest individual patches from the heaviest distinct ones: ``best [Q, k]`` distinct
    patches (−1 where none) with each copy's log weight ``single [Q, k]`` → log weights and entry numbers
    ``[Q, m]`` (−inf / −1 where fewer). Copies of one distinct patch are listed in entry order."""
    copies = sources.first(best.clamp(min=0), m)  # [Q, k, m]
    weight = torch.where((copies >= 0) & (best >= 0)[..., None], single[..., None], -torch.inf).flatten(1)
    n = min(m, weight.shape[1])
    top = torch.full((best.shape[0], m), -torch.inf, dtype=torch.float64)
    entries = torch.full((best.shape[0], m), -1, dtype=torch.long)
    value, pick = weight.topk(n, 1)  # ties are copies of one patch (or exactly equal weights)
    top[:, :n] = value
    entries[:, :n] = torch.where(torch.isfinite(value), torch.gather(copies.flatten(1), 1, pick), -1)
    return top, entries


def listed_images(top: torch.Tensor, entries: torch.Tensor, L: int, log_z: torch.Tensor, m: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bounds on the images' shares from the listed patches alone: the ``m`` listed individual patches
    (log weights ``top [Q, m]``, entry numbers ``entries [Q, m]``, −1 where none; ``L`` entries per image) summed
    per image, heaviest image first: log weights ``[Q, m]`` and image positions ``[Q, m]``. An image's true
    share is at least its listed one, and at most that plus the mass not listed."""
    image = torch.where(entries >= 0, entries // L, -1)
    same = image[:, :, None] == image[:, None, :]  # [Q, m, m]
    weight = torch.where(same & (image >= 0)[:, None, :], (top - log_z[:, None]).exp()[:, None, :], 0.0).sum(2)
    first = ~torch.tril(same, -1).any(2) & (image >= 0)  # one row per image: its first listed patch
    value, pick = torch.where(first, weight, -1.0).topk(m, 1)
    keep = value > 0
    return (torch.where(keep, value.clamp(min=1e-300).log() + log_z[:, None], -torch.inf),
            torch.where(keep, torch.gather(image, 1, pick), -1))


def retained_sources(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float,
                     m: int, backend: TopKBackend, tol: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """For queries ``q [Q, D]`` of one bucket (pixels ``locs [L, 2]``, training images ``ids``): which are
    certified (``ε ≤ tol``) ``[Q]``, and for those rows the same quantities as the exact scan — top ``m``
    individual log weights and their entry numbers (image position × L + location), log Z, entropy, the
    top ``m`` per-image log weights and image positions — plus ``eps``. All retained-posterior values."""
    uid, logw, eps = backend.retained(bank, key, q, a, s2)
    ok = eps <= tol
    rows = torch.nonzero(ok).view(-1)
    if rows.numel() == 0:
        return ok, {}
    uid, logw, eps = uid[rows].cpu(), logw[rows].cpu(), eps[rows].cpu()
    sources = source_map(bank, key, locs, ids)
    counts = bank.unique_patches(key).counts
    valid = uid >= 0
    log_c = torch.where(valid, counts[uid.clamp(min=0)].double().log(), torch.zeros_like(logw))
    log_z = logw.logsumexp(1)
    p = (logw - log_z[:, None]).exp()
    entropy = -(p * torch.where(p > 0, logw - log_z[:, None] - log_c, torch.zeros_like(p))).sum(1)
    single = logw - log_c  # each copy's own log weight
    top, entries = listed_copies(sources, torch.where(valid, uid, -1), single, m)
    at = torch.nonzero(valid)
    img_top, img_pos = image_top(sources, ids.numel(), at[:, 0], uid[valid], (single[valid] - log_z[at[:, 0]]).exp(),
                                 rows.numel(), m, log_z)
    return ok, {"top": top, "entries": entries, "log_z": log_z, "entropy": entropy, "img_top": img_top, "img_pos": img_pos,
                "eps": eps}


def cluster_scan(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float, m: int,
                 leaf_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """The sources of queries ``q [Q, D]`` without per-image shares, through the bucket's distinct patches and
    cluster tree: the ``m`` heaviest individual patches (log weights and entry numbers ``[Q, m]``), ``log Z [Q]``,
    entropy ``[Q]``, and the images of the listed patches with their listed shares (lower bounds on their
    shares, :func:`listed_images`; log weights and positions in ``ids`` ``[Q, m]``). Exact but for at most
    ``PRUNE_TOL`` of each query's mass, skipped in clusters that provably hold no more. ``leaf_size``: the
    cluster tree's leaf size (None: ``LEAF_SIZE``, the exact backend's, so both use one tree)."""
    f64 = torch.float64
    tree = bank.clustered(key, leaf_size or LEAF_SIZE)
    sources = source_map(bank, key, locs, ids)
    U, Q, K = tree.patches.shape[0], q.shape[0], tree.n_clusters
    q = q.to(f64)
    upper = cluster_upper(q, tree, a, s2)  # bound on every member's log weight, counts included [Q, K]

    def block(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, slice]:  # each copy's log weight [r, n]
        s, e = int(tree.offsets[k]), int(tree.offsets[k + 1])
        keys = tree.patches[s:e].to(f64) / 255.0
        return logits(q[rows], keys, entry_bias(tree.sq_norms[s:e], None, a, s2, f64), a, s2), tree.log_counts[s:e], slice(s, e)

    fused = native.available() if USE_KERNEL is None else USE_KERNEL
    run_max = torch.full((Q,), -1e300 if fused else -torch.inf, dtype=f64)
    Z, S = torch.zeros(Q, dtype=f64), torch.zeros(Q, dtype=f64)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per visit: rows, their block's top m, its patches
    held = [0]
    top = torch.full((Q, m), -1e300, dtype=f64)  # the fused kernel's running top m (finite start) and their patches
    best = torch.full((Q, m), -1, dtype=torch.long)
    skip = math.log(1e10 / PRUNE_TOL)  # fused: up to 1e10 terms each < PRUNE_TOL·1e-10 of the maximum left out

    def visit_torch(rows: torch.Tensor, k: int) -> None:
        ell, log_c, span = block(rows, k)
        weighted = ell + log_c
        old = run_max[rows]
        new = torch.maximum(old, weighted.amax(1))
        scale = torch.where(torch.isfinite(old), (old - new).exp(), torch.zeros_like(new))
        w = (weighted - new[:, None]).exp()
        Z[rows], S[rows], run_max[rows] = Z[rows] * scale + w.sum(1), S[rows] * scale + (w * ell).sum(1), new
        block_top, block_pos = ell.topk(min(m, ell.shape[1]), 1)
        found.append((rows[:, None].expand(-1, block_top.shape[1]).reshape(-1), block_top.reshape(-1),
                      tree.order[span][block_pos].reshape(-1)))
        held[0] += block_top.numel()
        if held[0] > MERGE_EVERY:  # memory: keep each query's m best so far, not every visit's
            merged = _merge_top(found, Q, m)
            keep = torch.isfinite(merged[0])
            found[:] = [(torch.nonzero(keep)[:, 0], merged[0][keep], merged[1][keep])]
            held[0] = int(keep.sum())

    threshold = math.log(U / PRUNE_TOL)
    first = upper.argmax(1)  # each query's most promising cluster first: its running maximum is then near final
    if fused:  # the same sweep in one C call, logits included
        native.tree_provenance((q * (a / s2 / 255.0)).contiguous(), tree, -(a * a) / (2 * s2), upper.T.contiguous(), first.contiguous(),
                          threshold, run_max, Z, S, top, best, skip)
        top = torch.where(top > -1e299, top, -torch.inf)
    else:
        for k in torch.unique(first).tolist():
            visit_torch(torch.nonzero(first == k).view(-1), k)
        for k in range(K):
            rows = torch.nonzero((upper[:, k] >= run_max - threshold) & (first != k)).view(-1)
            if rows.numel():
                visit_torch(rows, k)
        top, best = _merge_top(found, Q, m)
    log_z = run_max + Z.log()
    entropy = log_z - S / Z
    top_ind, entries = listed_copies(sources, best, top, m)
    return top_ind, entries, log_z, entropy, *listed_images(top_ind, entries, locs.shape[0], log_z, m)


def distinct_scan(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float, m: int,
                  block: int = 4096) -> tuple[torch.Tensor, ...]:
    """The exact scan's results (see :func:`machines.provenance._scan`) through the bucket's distinct patches:
    logits once per distinct patch (its count as a log weight) instead of once per occurrence; the heaviest
    placed in their images and per-image shares as one sparse product with the bucket's per-image counts
    (:func:`source_map`). Exact: the same softmax, grouped by value. ``block``: distinct patches per logits block."""
    f64 = torch.float64
    table = bank.unique_patches(key)
    sources = source_map(bank, key, locs, ids)
    U, Q = table.patches.shape[0], q.shape[0]
    log_c = table.counts.to(f64).log()
    run_max = torch.full((Q,), -torch.inf, dtype=f64)
    Z, S = torch.zeros(Q, dtype=f64), torch.zeros(Q, dtype=f64)
    top = torch.full((Q, m), -torch.inf, dtype=f64)
    best = torch.full((Q, m), -1, dtype=torch.long)  # distinct patch numbers, heaviest copy first
    step = max(1, block)

    def single(s: int, rows: slice = slice(None)) -> torch.Tensor:  # each copy's own log weight [Q, b]
        keys = table.patches[s : s + step].to(f64) / 255.0
        return logits(q[rows], keys, entry_bias(keys.pow(2).sum(1), None, a, s2, f64), a, s2)

    for s in range(0, U, step):
        ell = single(s)
        weighted = ell + log_c[s : s + step]
        new_max = torch.maximum(run_max, weighted.amax(1))
        scale = torch.where(torch.isfinite(run_max), (run_max - new_max).exp(), torch.zeros_like(new_max))
        w = (weighted - new_max[:, None]).exp()
        Z, S, run_max = Z * scale + w.sum(1), S * scale + (w * ell).sum(1), new_max
        block_top, block_pos = ell.topk(min(m, ell.shape[1]), 1)  # the block's best first, then merged: a small cat
        top, pos = torch.cat([top, block_top], 1).topk(m, 1)
        best = torch.gather(torch.cat([best, s + block_pos], 1), 1, pos)
    log_z = run_max + Z.log()
    entropy = log_z - S / Z
    top_ind, entries = listed_copies(sources, best, top, m)
    img_top = torch.full((Q, m), -torch.inf, dtype=f64)
    img_pos = torch.full((Q, m), -1, dtype=torch.long)
    n = min(m, ids.numel())
    per_image = sources.per_image(torch.arange(U), ids.numel()).coalesce()
    chunk = max(1, min(128, (1 << 24) // max(U, 1)))  # queries at a time: memory U × chunk weights
    image_of, patch_of = per_image.indices()
    tally, counts = per_image.values(), table.counts.to(f64)
    for c in range(0, Q, chunk):  # per-image shares: the sparse [images, U] counts times the [U, b] shares
        rows = slice(c, c + chunk)
        w = torch.cat([(single(s, rows) - log_z[rows, None]).exp() for s in range(0, U, step)], 1).T
        # patches whose copies together carry < NEGLIGIBLE of every query's mass are left out of the product:
        # all of them together move an image's share by at most U·NEGLIGIBLE
        live = (w.amax(1) * counts >= NEGLIGIBLE)[patch_of]
        part = torch.sparse_coo_tensor(torch.stack([image_of[live], patch_of[live]]), tally[live], per_image.shape,
                                       check_invariants=False)
        value, where = torch.sparse.mm(part, w).T.topk(n, 1)
        img_top[rows, :n] = torch.where(value > 0, value.log() + log_z[rows, None], -torch.inf)
        img_pos[rows, :n] = torch.where(value > 0, where, -1)
    return top_ind, entries, log_z, entropy, img_top, img_pos
