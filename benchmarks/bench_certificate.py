"""How often the top-k certificate certifies: the fraction of pixels with ε ≤ 1e-4 (neglected over retained
weight), per index, k, bound and (t, P), with what that fraction allows a top-k route to save.

Queries are every pixel of noised held-out (test) images, each against its own bbELS bucket; top-k without
fallback. Every k's ε comes from one search at the largest k (``TopKBackend.certificates``: the k nearest are
the first k of the largest search's). IVF rows come twice: searched once with ``--nprobe`` lists (``probe
once``), and with the queries whose ε > 1e-4 searched again with 4× the lists per round up to every list
(``probe again``, the backend's default). ``--schedule`` takes each t's P from a reference schedule (its
calibrated reading, as the sampler applies it) instead of ``--scales``.

Beside each fraction f: the seconds of the search (once, at the largest k) and of an exact step over the same
pixels (fused kernel, pruning, float32 as the policy's fallback), and ``1/(1 − f)``, the most any top-k route
can gain over exact at that (t, P) when the uncertified pixels are summed exactly, even with a free search and
assuming every pixel's exact sum costs the same.

    python benchmarks/bench_certificate.py --dataset cifar10 --n-train 1000 --images 2 --times 0.05 0.2 --scales 3
    python benchmarks/bench_certificate.py --dataset mnist --resize 32 --n-train 1000 --images 1 \
        --schedule MNIST_ResNet_zeros --times 0.05 0.1 0.2 0.3 --indices Flat IVF64,Flat IVF256,Flat --ks 64 256 1024 2048
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from machines import ExactBackend, TopKBackend, alpha_sigma2, reference_schedule
from machines.posterior import TopKStats
from machines.posterior.base import entry_bias, logits
from patchbank import BankSpec, PatchBank, dictionary_groups, load_dataset, patches_at, to_model_range
from patchbank.geometry import BucketKey


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--resize", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--images", type=int, default=2, help="held-out images whose every pixel is a query")
    ap.add_argument("--times", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--scales", type=int, nargs="+", default=[3], help="P at every t (without --schedule)")
    ap.add_argument("--schedule", default=None, help="reference schedule giving each t its P (e.g. MNIST_ResNet_zeros)")
    ap.add_argument("--indices", nargs="+", default=["Flat", "IVF64,Flat"])
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--bounds", nargs="+", default=["index", "best"], help="certificate bounds to measure")
    ap.add_argument("--banks", default="outputs/banks-certificate")
    ap.add_argument("--json", default=None)
    ap.add_argument("--exact-eps", action="store_true",
                    help="also the exact ε of each pixel's k nearest (no bound): the most any certificate of them can certify")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    resize = args.resize or None
    data = load_dataset(args.dataset, resize=resize, limit=args.n_train)
    test = load_dataset(args.dataset, split="test", resize=resize, limit=args.images) if args.dataset != "cifar10" else \
        load_dataset(args.dataset, resize=resize).subset(indices=torch.arange(len(data), len(data) + args.images))
    C, H, W = data.shape
    if args.schedule:
        schedule = reference_schedule(args.schedule)
        points = [(t, schedule(t)) for t in args.times]
    else:
        points = [(t, P) for t in args.times for P in args.scales]
    rows = []
    for spec in args.indices:
        scales = sorted({P for _, P in points})
        path = Path(args.banks) / f"{args.dataset}-{len(data)}-{resize or 0}-{spec.replace(',', '_')}-P{'_'.join(map(str, scales))}"
        start = time.perf_counter()
        bank = PatchBank.build(data, path, BankSpec(scales=scales, index=spec), progress=False)
        print(f"# bank {spec}: {time.perf_counter() - start:.1f} s", flush=True)
        for t, P in points:
            a, s2 = alpha_sigma2(t)
            g = torch.Generator().manual_seed(0)
            x0 = to_model_range(test.images, torch.float64)
            xt = a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            groups = [(BucketKey("bbELS", P, "zeros", key, None), patches_at(xt, locs, P, "zeros").flatten(0, 1))
                      for key, locs in dictionary_groups(H, W, P, "bbELS")]
            for bucket, q in groups:  # the cluster trees and tables, built once per bank, before the clock
                ExactBackend(dtype=torch.float32).posterior(bank, bucket, q[:1], a, s2)
            start = time.perf_counter()
            for bucket, q in groups:
                ExactBackend(dtype=torch.float32).posterior(bank, bucket, q, a, s2)
            exact_s = time.perf_counter() - start
            if args.exact_eps and spec == args.indices[0]:
                start = time.perf_counter()
                per_bucket = [exact_eps(bank, bucket, q, a, s2, args.ks) for bucket, q in groups]
                seconds = time.perf_counter() - start
                for k in args.ks:
                    row = _row(args, data, "exact ε", "", t, P, k, "none", torch.cat([e[k] for e in per_bucket]),
                               {"certificates_s": round(seconds, 3), "exact_s": round(exact_s, 3)})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            probes = [("once", args.nprobe), ("again", None)] if spec.upper().startswith("IVF") else [("", None)]
            for bound, (probe, max_nprobe) in ((b, p) for b in args.bounds for p in probes):
                topk = TopKBackend(tol=None, nprobe=args.nprobe, bound=bound, max_nprobe=max_nprobe)
                eps: dict[int, list[torch.Tensor]] = {k: [] for k in args.ks}
                spent = TopKStats()
                start = time.perf_counter()
                for bucket, q in groups:
                    for k, e in topk.certificates(bank, bucket, q, a, s2, args.ks, stats=spent).items():
                        eps[k].append(e)
                seconds = time.perf_counter() - start
                # the first search alone, at the largest k, timed apart (certificates() also re-probes per k)
                start = time.perf_counter()
                for bucket, q in groups:
                    topk.nearest(bank, bucket, (q / a).to(torch.float32), max(args.ks))
                search_s = time.perf_counter() - start
                for k in args.ks:
                    row = _row(args, data, spec, probe, t, P, k, bound, torch.cat(eps[k]), {
                        "search_s": round(search_s, 3), "certificates_s": round(seconds, 3), "bound_s": round(spent.bound_s, 3),
                        "searches_s": round(spent.search_s, 3), "exact_s": round(exact_s, 3)})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| index | probe | t | P | k | bound | median ε | certified | top-k at most × exact | search s (k max) | "
          "every k s (searches, bounds) | exact s |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['probe'] or '–'} | {r['t']} | {r['P']} | {r['k']} | {r['bound']} | {r['eps_median']:.1e} | "
              f"{100 * r['certified']:.1f}% | {r['speedup_bound']:.2f} | {r.get('search_s', 0):.2f} | "
              f"{r['certificates_s']:.2f} ({r.get('searches_s', 0):.2f}, {r.get('bound_s', 0):.2f}) | {r['exact_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _row(args, data, index: str, probe: str, t: float, P: int, k: int, bound: str, e: torch.Tensor, seconds: dict) -> dict:
    f = float((e <= 1e-4).double().mean())
    return {"dataset": args.dataset, "n_train": len(data), "index": index, "probe": probe, "t": t, "P": P, "k": k,
            "bound": bound, "pixels": int(e.numel()), "eps_median": float(e.median()), "certified": f,
            "speedup_bound": 1 / (1 - f) if f < 1 else float("inf")} | seconds


def exact_eps(bank: PatchBank, bucket: BucketKey, queries: torch.Tensor, a: float, s2: float, ks: list[int],
              chunk: int = 8) -> dict[int, torch.Tensor]:
    """The exact ε ``[Q]`` of each query's k nearest distinct patches, for every k of ``ks``: the weight of every other
    patch of the bucket (counts included) over theirs, in float64 from the whole posterior. A rigorous certificate of the
    k nearest bounds this from above, so the fraction with ε ≤ 1e-4 is the most any certificate of them can certify."""
    table = bank.unique_patches(bucket)
    keys = table.patches.to(torch.float64) / 255
    log_counts = table.counts.to(torch.float64).log()
    bias = entry_bias(keys.pow(2).sum(1), log_counts, a, s2, torch.float64)
    kmax = min(max(ks), keys.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for q in queries.to(torch.float64).split(chunk):
        logit = logits(q, keys, bias, a, s2)  # [c, U], up to a constant per query
        nearest = (logit - log_counts).topk(kmax, dim=1).indices  # the least distance has the largest logit without counts
        w = (logit - logit.amax(1, keepdim=True)).exp_()
        total = w.sum(1)
        retained = w.gather(1, nearest).cumsum(1)  # nearest first
        for k in ks:
            kept = retained[:, min(k, kmax) - 1]
            out[k].append((total - kept).clamp(min=0) / kept)
    return {k: torch.cat(v) for k, v in out.items()}


if __name__ == "__main__":
    main()
