"""Certified provenance from the bank's index: the sources of a pixel without visiting every training patch.

Late in the reverse process a pixel's posterior sits on a few patches. The top-k backend retrieves the
``k`` nearest distinct patches and certifies ε, the weight left out over the weight retained
(:meth:`~machines.posterior.topk.TopKBackend.retained`). Where ε ≤ ``tol`` the provenance is read off
the retained posterior: shares ``w/Z_k`` (each true share lies in ``[w/(Z_k(1+ε)), w/Z_k]``), and the
listed mass has the certified lower bound ``Σ w/(Z_k(1+ε))``. Distinct patches have forgotten which
images they came from, so one pass over the bucket's patches (integer compares, no distances) finds
where the retained ones occur: the first ``m`` occurrences of each (the individual patches listed)
and how often each occurs in each image (the per-image shares). Pixels whose certificate fails go
through the exact scan.
"""

from __future__ import annotations

import numpy as np
import torch

from machines.posterior import entry_bias, logits
from machines.posterior.topk import TopKBackend
from patchbank.geometry import BucketKey, patches_at


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
    counts = bank.unique_patches(key).counts
    wanted = uid[uid >= 0].unique()
    first, per_image = occurrences(bank, key, locs, ids, wanted, m)
    slot = torch.full((int(wanted.max()) + 1,), -1, dtype=torch.long)
    slot[wanted] = torch.arange(wanted.numel())
    log_c = torch.where(uid >= 0, counts[uid.clamp(min=0)].double().log(), torch.zeros_like(logw))
    log_z = logw.logsumexp(1)
    p = (logw - log_z[:, None]).exp()
    entropy = -(p * torch.where(p > 0, logw - log_z[:, None] - log_c, torch.zeros_like(p))).sum(1)
    single = logw - log_c  # each copy's own log weight
    Q = rows.numel()
    top = torch.full((Q, m), -torch.inf, dtype=torch.float64)
    entries = torch.full((Q, m), -1, dtype=torch.long)
    order = single.argsort(1, descending=True)
    for r in range(Q):
        filled = 0
        for j in order[r].tolist():
            if uid[r, j] < 0 or filled == m:
                break
            got = first[slot[uid[r, j]]]
            take = got[got >= 0][: m - filled]
            top[r, filled : filled + take.numel()] = single[r, j]
            entries[r, filled : filled + take.numel()] = take
            filled += take.numel()
    # per-image shares Σ_u e^{single_u − log Z}·n_{u,image}: the sparse [images, S] counts times [S, Q] weights
    weights = torch.zeros(wanted.numel(), Q, dtype=torch.float64)
    valid = uid >= 0
    weights[slot[uid[valid]], torch.nonzero(valid)[:, 0]] = (single[valid] - log_z.repeat_interleave(valid.sum(1))).exp()
    img_top = torch.full((Q, m), -torch.inf, dtype=torch.float64)
    pos = torch.full((Q, m), -1, dtype=torch.long)
    n = min(m, ids.numel())
    for c in range(0, Q, 128):  # memory: images × 128
        shares = torch.sparse.mm(per_image, weights[:, c : c + 128]).T  # [b, images]
        value, where = shares.topk(n, 1)
        img_top[c : c + 128, :n] = torch.where(value > 0, value.log() + log_z[c : c + 128, None], -torch.inf)
        pos[c : c + 128, :n] = torch.where(value > 0, where, -1)
    return ok, {"top": top, "entries": torch.where(torch.isfinite(top), entries, -1), "log_z": log_z, "entropy": entropy,
                "img_top": img_top, "img_pos": pos, "eps": eps}


def occurrences(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, wanted: torch.Tensor, m: int,
                block: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the distinct patches ``wanted [S]`` (row numbers of the bucket's table) occur among the bucket's
    entries (images ``ids`` × pixels ``locs``, image-major): their first ``m`` entry numbers ``[S, m]`` (−1
    where fewer) and their occurrence counts per image ``[S, len(ids)]`` (float64). One pass over the
    patches, compared as integers (a hash, then every hash match checked value by value); the counts are a
    sparse ``[len(ids), S]`` tensor (image-major)."""
    rows = bank.unique_patches(key).patches[wanted].numpy().astype(np.int64)  # int16 units 2·u8 − 255
    rng = np.random.default_rng(0)
    mix = rng.integers(1, 2**62, size=(rows.shape[1],), dtype=np.int64) | 1
    hashes = rows @ mix  # wraps modulo 2^64: fine for a hash
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    if np.any(sorted_hashes[1:] == sorted_hashes[:-1]):
        raise RuntimeError("two wanted patches share a hash; retry with another mix")  # never seen: 2^-64 per pair
    L, S = locs.shape[0], wanted.numel()
    first = torch.full((S, m), -1, dtype=torch.long)
    filled = torch.zeros(S, dtype=torch.long)
    codes, tallies = [], []
    step = max(1, block // L)
    for s in range(0, ids.numel(), step):
        x = bank.data.images[ids[s : s + step]].to(torch.int16).mul_(2).sub_(255)
        patches = patches_at(x, locs, key.scale, key.padding).flatten(0, 1).numpy().astype(np.int64)  # [b·L, D]
        h = patches @ mix
        at = np.searchsorted(sorted_hashes, h).clip(max=S - 1)
        hit = np.nonzero(sorted_hashes[at] == h)[0]
        which = order[at[hit]]
        same = (patches[hit] == rows[which]).all(1)  # a hash match is checked value by value
        hit, which = torch.from_numpy(hit[same]), torch.from_numpy(which[same])
        entry = s * L + hit
        code, tally = ((s + hit // L) * S + which).unique(return_counts=True)  # (image position, patch) pairs
        codes.append(code)
        tallies.append(tally)
        if (filled < m).any():
            keep = filled[which] < m
            which, entry = which[keep], entry[keep]
            by = torch.argsort(which, stable=True)
            which, entry = which[by], entry[by]
            start = torch.searchsorted(which, which, right=False)
            rank = torch.arange(which.numel()) - start + filled[which]
            fits = rank < m
            first[which[fits], rank[fits]] = entry[fits]
            filled += torch.bincount(which[fits], minlength=S)
    code, inverse = torch.cat(codes).unique(return_inverse=True)
    tally = torch.zeros(code.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(tallies).double())
    per_image = torch.sparse_coo_tensor(torch.stack([code // S, code % S]), tally, (ids.numel(), S), check_invariants=False).coalesce()
    return first, per_image


NEGLIGIBLE = 1e-18
"""Share below which a distinct patch (all its copies) is left out of the per-image shares."""


def distinct_scan(bank, key: BucketKey, locs: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, a: float, s2: float, m: int,
                  block: int) -> tuple[torch.Tensor, ...]:
    """The exact scan's results (see :func:`pipelines.provenance._scan`) through the bucket's distinct patches:
    logits once per distinct patch (its count as a log weight) instead of once per occurrence, then one
    integer-compare pass to place the heaviest ones in their images and to count every distinct patch per
    image (a sparse ``[images, U]`` matrix, so per-image shares are one sparse product). Exact: the same
    softmax, grouped by value."""
    f64 = torch.float64
    table = bank.unique_patches(key)
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
    first, per_image = occurrences(bank, key, locs, ids, torch.arange(U), m)
    # the m heaviest individual patches: copies of the m nearest distinct patches, in order
    copies = first[best.clamp(min=0)]  # [Q, m, m] entry numbers (−1 where a patch has fewer copies)
    weight = top[:, :, None].expand(-1, -1, m)
    flat_w = torch.where(copies >= 0, weight, -torch.inf).flatten(1)
    top_ind, pick = flat_w.topk(m, 1)  # stable enough: equal weights are copies of one patch
    entries = torch.where(torch.isfinite(top_ind), torch.gather(copies.flatten(1), 1, pick), -1)
    img_top = torch.full((Q, m), -torch.inf, dtype=f64)
    img_pos = torch.full((Q, m), -1, dtype=torch.long)
    n = min(m, ids.numel())
    chunk = max(1, min(128, (1 << 24) // max(U, 1)))  # queries at a time: memory U × chunk weights
    image_of, patch_of = per_image.indices()
    tally, counts = per_image.values(), table.counts.to(f64)
    for c in range(0, Q, chunk):  # per-image shares: the sparse [images, U] counts times the [U, b] shares
        rows = slice(c, c + chunk)
        w = torch.cat([(single(s, rows) - log_z[rows, None]).exp() for s in range(0, U, step)], 1).T
        # patches whose copies together carry < 1e-18 of every query's mass are left out of the product:
        # all of them together move an image's share by at most U·1e-18
        live = (w.amax(1) * counts >= NEGLIGIBLE)[patch_of]
        part = torch.sparse_coo_tensor(torch.stack([image_of[live], patch_of[live]]), tally[live], per_image.shape,
                                       check_invariants=False)
        value, where = torch.sparse.mm(part, w).T.topk(n, 1)
        img_top[rows, :n] = torch.where(value > 0, value.log() + log_z[rows, None], -torch.inf)
        img_pos[rows, :n] = torch.where(value > 0, where, -1)
    return top_ind, entries, log_z, entropy, img_top, img_pos
