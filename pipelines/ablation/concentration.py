"""The posterior-concentration study: how many entries carry a pixel's posterior, over (t, P) (DESIGN §6).

For noised held-out images at each (t, P), every sampled pixel against its own bucket: the
effective number of entries ``exp(H)`` (over distinct patches and over individual patches) and the
number of distinct patches holding ``1 − mass`` of the posterior. The logits are the engine's own
(:func:`machines.posterior.logits` over the bank's stream), so the study measures the posterior the
backends compute.
"""

from __future__ import annotations

import math
import statistics

import torch
from tqdm.auto import tqdm

from machines import alpha_sigma2
from machines.posterior import entry_bias, logits, serving
from patchbank import Bank, ImageData, to_model_range
from patchbank.geometry import RULE_PADDING, BucketKey, dictionary_groups, patches_at


@torch.no_grad()
def posterior_concentration(bank: Bank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float,
                            mass: float = 1e-3, chunk_size: int = 1 << 16, memory_mb: int = 2048) -> dict[str, torch.Tensor]:
    """Per query ``[Q, D]``: the effective number of entries (exp of the posterior's entropy) over
    the bucket's entries (distinct patches with counts on a deduplicating bank) and over individual
    patches, and the number of entries holding ``1 − mass`` of the posterior. Returns ``[Q]`` tensors
    and the bucket's entry count. Queries go in groups whose logits ``[group, entries]`` fit in
    ``memory_mb`` (a 60,000-image bucket holds up to ~6·10⁷ entries), each group streaming the bucket once."""
    q = queries.to(torch.float64)
    cap = bank.stream_size(bucket) if serving(bank, bucket) != "image" else chunk_size  # grown for images
    group = max(1, int(memory_mb * 2**20 // (8 * cap)))
    out: dict[str, list] = {"n_eff_distinct": [], "n_eff_patches": [], "k_mass": [], "entries": []}
    for g in range(0, q.shape[0], group):
        qg = q[g : g + group]
        ell = torch.empty(qg.shape[0], cap, dtype=torch.float64)
        lc = torch.empty(cap, dtype=torch.float64)
        n = 0
        for chunk in bank.stream(bucket, chunk_size, torch.float64):
            keys, m = chunk.keys, chunk.keys.shape[0]
            if n + m > ell.shape[1]:  # more entries than the estimate (whole-image rules): grow
                grow = max(m, ell.shape[1])
                ell = torch.cat([ell, torch.empty(ell.shape[0], grow, dtype=torch.float64)], 1)
                lc = torch.cat([lc, torch.empty(grow, dtype=torch.float64)])
            lc[n : n + m] = chunk.log_counts if chunk.log_counts is not None else 0.0
            ell[:, n : n + m] = logits(qg, keys, entry_bias(keys.pow(2).sum(1), chunk.log_counts, a, s2, torch.float64), a, s2)
            n += m
        for row in ell[:, :n]:  # one query at a time: O(entries) temporaries
            logp = row - torch.logsumexp(row, 0)
            p = logp.exp()
            H = -(p * logp).sum()  # over entries
            out["n_eff_distinct"].append(float(H.exp()))
            out["n_eff_patches"].append(float((H + (p * lc[:n]).sum()).exp()))  # each of c copies carries p/c
            out["k_mass"].append(min(n, entries_for_mass(logp, (1 - mass) * float(p.sum()))))
            out["entries"].append(n)
        del ell
    return {"n_eff_distinct": torch.tensor(out["n_eff_distinct"], dtype=torch.float64),
            "n_eff_patches": torch.tensor(out["n_eff_patches"], dtype=torch.float64),
            "k_mass": torch.tensor(out["k_mass"], dtype=torch.long), "entries": torch.tensor(out["entries"], dtype=torch.long)}


def entries_for_mass(logp: torch.Tensor, target: float, bins: int = 256, small: int = 1 << 14) -> int:
    """The fewest entries, largest first, whose probabilities ``exp(logp)`` ``[U]`` sum to ≥ ``target``
    (the same number a full descending sort and cumulative sum give), in O(U) per refinement: a
    histogram over log p finds the bin where the running mass crosses ``target``, and only that bin is
    refined (then sorted once it is small)."""
    above_n, above_m = 0, 0.0
    cand = logp
    while cand.numel() > small:
        lo, hi = float(cand.min()), float(cand.max())
        if not hi > lo:  # ties: every candidate carries the same mass
            need = math.ceil(max(0.0, target - above_m) / math.exp(hi) - 1e-9)
            return above_n + max(1, min(need, cand.numel()))
        edges = torch.linspace(lo, hi, bins + 1, dtype=cand.dtype)[1:-1]
        idx = torch.bucketize(cand, edges, right=True)  # bin 0 … bins-1, increasing log p
        cnt = torch.bincount(idx, minlength=bins).flip(0)  # from the top bin down
        m = torch.bincount(idx, weights=cand.exp(), minlength=bins).flip(0)
        cum = above_m + m.cumsum(0)
        j = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]), bins - 1)
        above_n += int(cnt[:j].sum())
        above_m += float(m[:j].sum())
        cand = cand[idx == bins - 1 - j]
    vals = cand.exp().sort(descending=True).values
    cum = above_m + vals.cumsum(0)
    return above_n + min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1, vals.numel())


def concentration_study(bank: Bank, machine: str, times: list[float], scales: list[int], held_out: ImageData,
                        pixels: int = 32, mass: float = 1e-3, seed: int = 0, progress: bool = True) -> list[dict]:
    """For every (t, P): medians over ``pixels`` random pixels of noised held-out images (each
    pixel against its own bucket under ``machine``'s rule) of :func:`posterior_concentration`."""
    gen = torch.Generator().manual_seed(seed)
    cells = []
    for t in tqdm(times, desc="concentration", disable=not progress):
        a, s2 = alpha_sigma2(t)
        for P, groups in noised_pixels(held_out, bank.height, bank.width, machine, t, scales, pixels, gen):
            results: dict[str, list] = {}
            for bucket, queries in groups:
                res = posterior_concentration(bank, bucket, queries, a, s2, mass)
                for name, v in res.items():
                    results.setdefault(name, []).extend(v.tolist())
            cells.append({"t": t, "P": P, "pixels": pixels, "mass": mass,
                          **{f"{name}_median": statistics.median(v) for name, v in results.items()}})
    return cells


def noised_pixels(held_out: ImageData, H: int, W: int, machine: str, t: float, scales: list[int], pixels: int,
                  gen: torch.Generator) -> list[tuple[int, list[tuple[BucketKey, torch.Tensor]]]]:
    """``pixels`` random pixels of held-out images noised to level ``t`` (drawn from ``gen``), and for each P of
    ``scales`` their queries grouped by bucket under ``machine``'s rule: ``[(P, [(bucket, queries [q, D]), …]), …]``."""
    a, s2 = alpha_sigma2(t)
    x0 = to_model_range(held_out.images, torch.float64)
    padding = RULE_PADDING[machine]
    img = torch.randint(len(x0), (pixels,), generator=gen)
    pix = torch.stack([torch.randint(H, (pixels,), generator=gen), torch.randint(W, (pixels,), generator=gen)], 1)
    xt = a * x0[img] + math.sqrt(s2) * torch.randn(x0[img].shape, generator=gen, dtype=torch.float64)
    out = []
    for P in scales:
        groups = []
        for key, locs in dictionary_groups(H, W, P, machine):  # type: ignore[arg-type]
            member = (pix[:, None, :] == locs[None, :, :]).all(-1)  # [pixels, L]
            rows = torch.nonzero(member.any(1)).view(-1)
            if rows.numel():
                queries = torch.stack([patches_at(xt[i : i + 1], pix[i : i + 1], P, padding)[0, 0] for i in rows.tolist()])
                groups.append((BucketKey(machine, P, padding, key, None), queries.flatten(1)))
        out.append((P, groups))
    return out
