"""How well could per-query proposals follow each pixel's posterior? Importance-sampling efficiency, computed exactly.

The automatic policy draws patches shared by all queries of a bucket, in proportion to their counts. Where a
pixel's posterior holds a small share of the bucket, those draws have a small effective sample size, and the
pixel falls back to an exact pass. A per-query proposal draws instead from a distribution shaped like that
pixel's posterior, for example clusters of the bank's tree in proportion to a cheap estimate of each
cluster's weight for that query, then patches within the cluster in proportion to their counts.

For a proposal q over the bucket's distinct patches and the exact posterior π (both per query), m draws have an
expected effective sample size of m·ε with ε = 1 / Σ_i π_i²/q_i (ε = 1 when q = π). This script computes π
exactly (every distinct patch, float64) for pixels of the largest bbELS bucket of noised held-out images, and
prints per time the median and 10th percentile of ε over the pixels and the share of pixels whose 4,096 draws
would reach an effective sample size of 64 (the policy's first round and its threshold), for:

* ``counts``: the policy's shared draws, q_i = c_i / N;
* ``centre``: clusters in proportion to n_c·e^ℓ(centre), then members by counts;
* ``bound``: clusters in proportion to n_c·e^(upper bound on a member's logit), the bound that pruning uses;
* ``mixed``: 0.8·centre + 0.2·counts (a defensive mixture: never worse than 5× counts);
* ``oracle``: clusters in proportion to their exact posterior mass, then members by counts: what a perfect
  estimate of each cluster's mass would give, at that leaf size.

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_proposals.py --n-train 10000 --scales 5 9 --times 0.35 0.5 0.65 0.8
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from machines import alpha_sigma2
from machines.posterior.exact import cluster_upper
from patchbank import MemoryBank, load_dataset, to_model_range
from patchbank.geometry import BucketKey, dictionary_groups, patches_at

PROPOSALS = ("counts", "centre", "bound", "mixed", "oracle")


def efficiencies(q: torch.Tensor, clusters, a: float, s2: float, group: int = 8) -> dict[str, torch.Tensor]:
    """Per query ``[Q]``, each proposal's ε = 1 / Σ π²/q for queries ``q [Q, D]`` (float64, model units), ``group``
    queries at a time (each holds a few ``[group, U]`` float64 arrays)."""
    parts = [_efficiencies(q[s : s + group], clusters, a, s2) for s in range(0, q.shape[0], group)]
    return {p: torch.cat([part[p] for part in parts]) for p in PROPOSALS}


def _efficiencies(q: torch.Tensor, clusters, a: float, s2: float, chunk: int = 1 << 18) -> dict[str, torch.Tensor]:
    Q = q.shape[0]
    U = clusters.patches.shape[0]
    logit = torch.empty(Q, U, dtype=torch.float64)
    for s in range(0, U, chunk):  # ℓ + log c without the −‖q‖²/2s² term, which every entry of a row shares
        p = clusters.patches[s : s + chunk].to(torch.float64) / 255
        logit[:, s : s + chunk] = (2 * a * q @ p.T - a * a * clusters.sq_norms[s : s + chunk]) / (2 * s2) + clusters.log_counts[s : s + chunk]
    log_pi = logit - torch.logsumexp(logit, 1, keepdim=True)
    offsets = clusters.offsets
    sizes = offsets[1:] - offsets[:-1]
    cluster_of = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # [U]
    log_c = clusters.log_counts
    log_n = _segment_logsumexp(log_c[None, :], cluster_of, sizes.numel())[0]  # log n_c: the cluster's count
    log_within = log_c - log_n[cluster_of]  # log (c_i / n_c)
    log_total = torch.logsumexp(log_c, 0)

    def eps(log_q: torch.Tensor) -> torch.Tensor:  # 1 / Σ π²/q, in logs
        return torch.exp(-torch.logsumexp(2 * log_pi - log_q, 1))

    def by_clusters(log_rho: torch.Tensor) -> torch.Tensor:  # [Q, K] unnormalised → per-patch log q
        log_rho = log_rho - torch.logsumexp(log_rho, 1, keepdim=True)
        return log_rho[:, cluster_of] + log_within

    centre_logit = (2 * a * q @ clusters.centres.T - a * a * (clusters.centres**2).sum(1)) / (2 * s2)
    log_counts_q = (log_c - log_total).expand(Q, U)
    log_centre = by_clusters(centre_logit + log_n)
    upper = cluster_upper(q, clusters, a, s2) - clusters.max_log_count  # bound on a member's logit, per (query, cluster)
    out = {
        "counts": eps(log_counts_q),
        "centre": eps(log_centre),
        "bound": eps(by_clusters(upper + log_n)),
        "mixed": eps(torch.logaddexp(log_centre + math.log(0.8), log_counts_q + math.log(0.2))),
        "oracle": eps(by_clusters(_segment_logsumexp(log_pi, cluster_of, sizes.numel()))),
    }
    return out


def _segment_logsumexp(x: torch.Tensor, cluster_of: torch.Tensor, K: int) -> torch.Tensor:
    """``[R, U]`` → ``[R, K]``: log-sum-exp over each cluster's columns (``cluster_of [U]``: a column's cluster)."""
    top = x.max(1, keepdim=True).values
    sums = torch.zeros(x.shape[0], K, dtype=x.dtype).index_add_(1, cluster_of, torch.exp(x - top))
    return torch.log(sums) + top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--scales", nargs="+", type=int, default=[5, 9])
    ap.add_argument("--times", nargs="+", type=float, default=[0.35, 0.5, 0.65, 0.8])
    ap.add_argument("--images", type=int, default=8, help="held-out images (noised at each time)")
    ap.add_argument("--pixels", type=int, default=8, help="pixels of the bucket per image")
    ap.add_argument("--leaf-sizes", nargs="+", type=int, default=[2048, 256])
    ap.add_argument("--draws", type=int, default=4096, help="draws per query for the 'ESS ≥ 64' share")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, resize=32, limit=args.n_train)
    held = load_dataset(args.dataset, resize=32, limit=args.n_train + args.images)
    x0 = to_model_range(held.images[args.n_train :], torch.float64)
    bank = MemoryBank(data)
    gen = torch.Generator().manual_seed(0)
    print(f"# {args.dataset}, {len(data)} images, largest bbELS bucket, {args.images}×{args.pixels} pixels, "
          f"ε = 1/Σπ²/q: median, 10th percentile, share of pixels with {args.draws}·ε ≥ 64")
    print(f"{'P':>3} {'leaf':>5} {'t':>5} {'distinct':>9} " + " ".join(f"{p + ' (med p10 ok)':>20}" for p in PROPOSALS))
    for P in args.scales:
        key_locs = max(dictionary_groups(32, 32, P, "bbELS"), key=lambda g: g[1].shape[0])
        key = BucketKey("bbELS", P, "zeros", key_locs[0])
        locs = key_locs[1][torch.randperm(key_locs[1].shape[0], generator=gen)[: args.pixels]]
        for leaf in args.leaf_sizes:
            start = time.perf_counter()
            clusters = bank.clustered(key, leaf)
            build = time.perf_counter() - start
            for t in args.times:
                a, s2 = alpha_sigma2(t)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                q = patches_at(a * x0 + math.sqrt(s2) * noise, locs, P, "zeros").reshape(-1, P * P)  # [images·pixels, D]
                eff = efficiencies(q, clusters, a, s2)
                cells = " ".join(f"{float(e.median()):7.1e} {float(e.quantile(0.1)):7.1e} {float((e * args.draws >= 64).double().mean()):4.0%}"
                                 for e in (eff[p] for p in PROPOSALS))
                print(f"{P:3d} {leaf:5d} {t:5.2f} {clusters.patches.shape[0]:9d} {cells}", flush=True)
            print(f"# P = {P}, leaf {leaf}: {clusters.n_clusters} clusters, built in {build:.1f} s", flush=True)


if __name__ == "__main__":
    main()
