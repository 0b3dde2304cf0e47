"""How often the top-k certificate certifies: the fraction of pixels with ε ≤ 1e-4 (neglected over retained
weight), for Flat and IVF indices, several k, the index's own bound and the cluster bound, at given (t, P).

Queries are every pixel of noised held-out (test) images, each against its own bbELS bucket; top-k without
fallback; ε from the same search. IVF rows come twice: searched once with ``--nprobe`` lists (``probe
once``), and with the queries whose ε > 1e-4 searched again with 4× the lists per round up to every list
(``probe again``, the backend's default). Also the seconds of the search, of the cluster bound, and of an exact
step over the same pixels (fused kernel, pruning) for comparison.

    python benchmarks/bench_certificate.py --dataset cifar10 --n-train 1000 --images 2 --times 0.05 0.2 --scales 3
    python benchmarks/bench_certificate.py --dataset mnist --resize 32 --n-train 1000 --images 2 --times 0.05 --scales 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from machines import ExactBackend, TopKBackend, alpha_sigma2
from patchbank import BankSpec, PatchBank, dictionary_groups, load_dataset, patches_at, to_model_range
from patchbank.geometry import BucketKey


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--resize", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--images", type=int, default=2, help="held-out images whose every pixel is a query")
    ap.add_argument("--times", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--scales", type=int, nargs="+", default=[3])
    ap.add_argument("--indices", nargs="+", default=["Flat", "IVF64,Flat"])
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--bounds", nargs="+", default=["index", "best"], help="certificate bounds to measure")
    ap.add_argument("--banks", default="outputs/banks-certificate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    resize = args.resize or None
    data = load_dataset(args.dataset, resize=resize, limit=args.n_train)
    test = load_dataset(args.dataset, split="test", resize=resize, limit=args.images) if args.dataset != "cifar10" else \
        load_dataset(args.dataset, resize=resize).subset(indices=torch.arange(len(data), len(data) + args.images))
    C, H, W = data.shape
    rows = []
    for spec in args.indices:
        path = Path(args.banks) / f"{args.dataset}-{len(data)}-{resize or 0}-{spec.replace(',', '_')}"
        start = time.perf_counter()
        bank = PatchBank.build(data, path, BankSpec(scales=sorted(set(args.scales)), index=spec), progress=False)
        print(f"# bank {spec}: {time.perf_counter() - start:.1f} s", flush=True)
        for t in args.times:
            a, s2 = alpha_sigma2(t)
            g = torch.Generator().manual_seed(0)
            x0 = to_model_range(test.images, torch.float64)
            xt = a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            for P in args.scales:
                groups = [(BucketKey("bbELS", P, "zeros", key, None), patches_at(xt, locs, P, "zeros").flatten(0, 1))
                          for key, locs in dictionary_groups(H, W, P, "bbELS")]
                start = time.perf_counter()
                for bucket, q in groups:
                    ExactBackend().posterior(bank, bucket, q, a, s2)
                exact_s = time.perf_counter() - start
                for k in args.ks:
                    probes = [("once", args.nprobe), ("again", None)] if spec.upper().startswith("IVF") else [("", None)]
                    for bound, (probe, max_nprobe) in ((b, p) for b in args.bounds for p in probes):
                        topk = TopKBackend(k=k, tol=None, nprobe=args.nprobe, bound=bound, max_nprobe=max_nprobe)
                        start = time.perf_counter()
                        for bucket, q in groups:
                            topk.posterior(bank, bucket, q, a, s2)
                        seconds = time.perf_counter() - start
                        eps = torch.cat(topk.stats.eps)
                        row = {"index": spec, "probe": probe, "t": t, "P": P, "k": k, "bound": bound, "pixels": int(eps.numel()),
                               "reprobed_fraction": round(topk.stats.summary()["reprobed_fraction"], 3),
                               "eps_median": float(eps.median()), "certified": float((eps <= 1e-4).double().mean()),
                               "search_s": round(topk.stats.search_s, 3), "bound_s": round(topk.stats.bound_s, 3),
                               "topk_s": round(seconds, 3), "exact_s": round(exact_s, 3)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print("\n| index | probe | t | P | k | bound | median ε | certified | top-k s (search, cluster bound) | exact s |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['probe']} | {r['t']} | {r['P']} | {r['k']} | {r['bound']} | {r['eps_median']:.1e} | {100 * r['certified']:.1f}% | "
              f"{r['topk_s']:.2f} ({r['search_s']:.2f}, {r['bound_s']:.2f}) | {r['exact_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
