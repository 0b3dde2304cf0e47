"""What one searched (query, patch) distance costs against one exact (query, entry) pair: the ``search_cost`` of the
automatic policy's top-k plan.

On one bbELS bucket of a bank (the interior one, the largest), for every pixel of noised held-out images: the seconds
per computed distance of a FAISS Flat search (k = 64 and k = 1,024; every pair is computed) and of the torch search,
against the seconds per visited pair of the exact backend's pruned float32 sweep (its pair counter), in one run.

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_search.py --dataset cifar10 --n-train 1000 --images 2 --t 0.05
"""

from __future__ import annotations

import argparse
import time

import torch

from machines import ExactBackend, alpha_sigma2
from patchbank import MemoryBank, load_dataset, patches_at, to_model_range
from patchbank.geometry import BucketKey
from patchbank.index import PatchIndex, torch_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--resize", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--t", type=float, default=0.05)
    ap.add_argument("--P", type=int, default=3)
    args = ap.parse_args()
    resize = args.resize or None
    data = load_dataset(args.dataset, resize=resize, limit=args.n_train)
    if args.dataset == "cifar10":  # no test split: hold out the last images
        test = data.subset(indices=torch.arange(len(data) - args.images, len(data)))
        data = data.subset(indices=torch.arange(len(data) - args.images))
    else:
        test = load_dataset(args.dataset, split="test", resize=resize, limit=args.images)
    C, H, W = data.shape
    P, r = args.P, args.P // 2
    bucket = BucketKey("bbELS", P, "zeros", (r, r, r, r), None)
    bank = MemoryBank(data, dedup=True)
    table = bank.unique_patches(bucket)
    keys = table.patches.to(torch.float32) / 255.0
    a, s2 = alpha_sigma2(args.t)
    g = torch.Generator().manual_seed(0)
    x0 = to_model_range(test.images, torch.float64)
    xt = a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    q = patches_at(xt, bucket.locations(H, W), P, "zeros").flatten(0, 1)
    Q, U = q.shape[0], keys.shape[0]
    print(f"{args.dataset}: {len(data)} images, bucket {bucket.dictionary} at P = {P}: {U:,} distinct patches × {Q:,} queries "
          f"(D = {keys.shape[1]}), t = {args.t}, torch {torch.get_num_threads()} threads")
    ExactBackend(dtype=torch.float32).posterior(bank, bucket, q[:8], a, s2)  # clusters built before the clock
    exact = ExactBackend(dtype=torch.float32)
    start = time.perf_counter()
    exact.posterior(bank, bucket, q, a, s2)
    exact_s = time.perf_counter() - start
    per_pair = exact_s / exact.stats.visited
    print(f"exact pruned sweep: {exact_s:.2f} s, {exact.stats.visited_fraction:.1%} of the pairs visited, "
          f"{1e9 * per_pair:.2f} ns per visited pair")
    qa = (q / a).to(torch.float32)
    rows = []
    try:
        index = PatchIndex.build(keys.numpy(), table.counts.numpy(), "Flat")
        for k in (64, 1024):
            start = time.perf_counter()
            _, _, scanned = index.search(qa, k)
            rows.append((f"FAISS Flat, k = {k}", time.perf_counter() - start, scanned))
    except ImportError:
        print("(faiss not installed: FAISS rows skipped)")
    for k in (64, 1024):
        start = time.perf_counter()
        torch_search(qa, keys, k)
        rows.append((f"torch search, k = {k}", time.perf_counter() - start, Q * U))
    print("\n| search | s | ns per distance | × an exact pair |\n|---|---:|---:|---:|")
    for name, seconds, scanned in rows:
        print(f"| {name} | {seconds:.2f} | {1e9 * seconds / scanned:.2f} | {seconds / scanned / per_pair:.1f} |")


if __name__ == "__main__":
    main()
