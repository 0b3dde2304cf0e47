"""Cluster-summary benchmark: what summaries certify, and what they cost, per t.

For one bbELS bucket (the interior pixels of noised held-out-like training digits), per noise
level: the fraction of (query, cluster) pairs summarised / dropped / expanded, the fraction of
(query, distinct patch) pairs still computed exactly, the measured max |x̂0 − exact| against
the exact backend, the median and max certified bound, and the seconds of the summary backend
(before any fallback) vs the exact backend (fused kernel, pruning on) on the same queries.

    python benchmarks/bench_summary.py --n-train 1000 --scales 3 5 --leaf 64 256 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from machines import ExactBackend, SummaryBackend, alpha_sigma2
from patchbank import MemoryBank, load_dataset, to_model_range
from patchbank.geometry import BucketKey, patches_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--scales", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--leaf", nargs="+", type=int, default=[256])
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--times", nargs="+", type=float, default=[1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.1, 0.05])
    ap.add_argument("--images", type=int, default=8, help="noised training images whose interior pixels are the queries")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    bank = MemoryBank(data, dedup=True)
    _, H, W = data.shape
    x = to_model_range(data.images[-args.images :], torch.float64)
    print(f"# {len(data)} images, tol {args.tol}; errors and bounds are max over pixels of |x̂0 − exact|")
    print(f"{'P':>2} {'leaf':>5} {'t':>5} {'Q':>5} {'summ':>6} {'drop':>6} {'expand':>6} {'exact pairs':>11} "
          f"{'err max':>8} {'bound med':>9} {'bound max':>9} {'violations':>10} {'summary_s':>9} {'exact_s':>8}")
    for P in args.scales:
        bucket = BucketKey("bbELS", P, "zeros", (P // 2,) * 4, None)
        exact = ExactBackend()
        for leaf in args.leaf:
            backend = SummaryBackend(tol=args.tol, leaf_size=leaf)
            bank.clustered(bucket, leaf)  # one-off, as a bank build would
            for t in args.times:
                a, s2 = alpha_sigma2(t)
                g = torch.Generator().manual_seed(0)
                xt = a * x + s2**0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
                q = patches_at(xt, bucket.locations(H, W), P, "zeros").flatten(0, 1)
                start = time.perf_counter()
                ref = exact.posterior(bank, bucket, q, a, s2)
                exact_s = time.perf_counter() - start
                backend.stats.reset()
                backend.summarised(bank, bucket, q[:1], a, s2)  # moments, once per bucket
                backend.stats.reset()
                start = time.perf_counter()
                means, bound = backend.summarised(bank, bucket, q, a, s2)
                summary_s = time.perf_counter() - start
                err = (means - ref).abs().amax(1)
                st = backend.stats.summary()
                print(f"{P:2d} {leaf:5d} {t:5.2f} {q.shape[0]:5d} {st['summarised_fraction']:6.3f} {st['dropped_fraction']:6.3f} "
                      f"{st['expanded_fraction']:6.3f} {st['expanded_entries_fraction']:11.3f} {float(err.max()):8.1e} "
                      f"{float(bound.median()):9.1e} {float(bound.max()):9.1e} {int((err > bound + 1e-12).sum()):10d} "
                      f"{summary_s:9.2f} {exact_s:8.2f}", flush=True)


if __name__ == "__main__":
    main()
