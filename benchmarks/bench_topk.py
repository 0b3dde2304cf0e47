"""Patch-bank benchmark (issue 3): build a bank, then sample bbELS with the exact and top-k backends.

Reports build time and disk size per scale; per-step time of both backends; the top-k
fallback fraction and ε per step; the Pearson r between top-k and exact final samples.

    python benchmarks/bench_topk.py --n-train 2000 --seeds 0-9
    python benchmarks/bench_topk.py --n-train 0 --index "IVF4096,Flat"     # full MNIST (memory!)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from machines import ExactBackend, ScoreMachine, TopKBackend, noise_from_seeds, reference_schedule, sample
from patchbank import BankSpec, PatchBank, load_dataset
from pipelines.metrics import pearson_r


def timed_sample(machine: ScoreMachine, noise: torch.Tensor, steps: int, backend) -> tuple[torch.Tensor, list[dict]]:
    """A DDIM sample plus one record per step: t, P, seconds and (top-k) the backend's statistics."""
    records: list[dict] = []
    last = [time.perf_counter()]

    def on_step(step: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        rec = {"step": step, "t": round(t, 3), "P": machine.scales(t), "seconds": round(now - last[0], 3)}  # type: ignore[misc]
        if isinstance(backend, TopKBackend):
            rec |= backend.stats.summary()
            backend.stats.reset()
        records.append(rec)
        last[0] = now

    x = sample(machine, noise, steps, callback=on_step)
    return x, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=2000, help="0 = all")
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--schedule", default="MNIST_ResNet_zeros")
    ap.add_argument("--index", default="IVF256,Flat")
    ap.add_argument("--materialise-max", type=int, default=9, help="index/materialise scales up to this P (0 = all)")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bank", default=None, help="bank directory (default: outputs/banks/<dataset>-<n>-<index>)")
    ap.add_argument("--skip-exact", action="store_true", help="time the top-k backend only (no Pearson r)")
    ap.add_argument("--json", default=None, help="write the full report here")
    args = ap.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    schedule = reference_schedule(args.schedule)
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    path = Path(args.bank or f"outputs/banks/{args.dataset}-{len(data)}-{args.resize}-{args.index.replace(',', '_')}-m{args.materialise_max}")
    start = time.perf_counter()
    spec = BankSpec(scales=schedule.scales, rules=["bbELS"], index=args.index, materialise_max=args.materialise_max or None)
    bank = PatchBank.build(data, path, spec)
    info = bank.info()
    print(f"# bank {path}: {len(data)} images {list(data.shape)}, built in {time.perf_counter() - start:.1f} s (this run)")
    print(f"{'P':>3} {'buckets':>7} {'patches':>10} {'distinct':>10} {'MB':>8}")
    for P, s in sorted(info["scales"].items()):
        distinct = s["distinct"] if s["materialised"] else "streamed"
        print(f"{P:3d} {s['buckets']:7d} {s['patches']:10d} {distinct:>10} {s['bytes'] / 1e6:8.1f}")
    noise = noise_from_seeds(seeds, data.shape, torch.float64)
    topk = TopKBackend(k=args.k, tol=args.tol, nprobe=args.nprobe)
    x_topk, rec_topk = timed_sample(ScoreMachine(bank, "bbELS", scales=schedule, backend=topk), noise, args.steps, topk)
    report = {"args": vars(args), "bank": info, "topk_steps": rec_topk, "topk_seconds": sum(r["seconds"] for r in rec_topk)}
    if not args.skip_exact:
        exact = ExactBackend()
        x_exact, rec_exact = timed_sample(ScoreMachine(bank, "bbELS", scales=schedule, backend=exact), noise, args.steps, exact)
        r = pearson_r(x_topk, x_exact)
        report |= {"exact_steps": rec_exact, "exact_seconds": sum(r_["seconds"] for r_ in rec_exact),
                   "pearson_r": r.tolist(), "pearson_r_median": statistics.median(r.tolist()), "pearson_r_min": r.min().item()}
    print(f"\n# {len(seeds)} seeds, {args.steps} steps, k={args.k}, tol={args.tol}, nprobe={args.nprobe}, index {args.index}")
    print(f"{'t':>5} {'P':>3} {'topk_s':>8} {'fallback':>8} {'eps_med':>9} {'exact_s':>8}")
    for i, rt in enumerate(rec_topk):
        ex = report.get("exact_steps", [{}] * len(rec_topk))[i].get("seconds", float("nan"))
        print(f"{rt['t']:5.2f} {rt['P']:3d} {rt['seconds']:8.2f} {rt['fallback_fraction']:8.3f} {rt['eps_median']:9.2e} {ex:8.2f}")
    print(f"whole sample: top-k {report['topk_seconds']:.1f} s" + (
        f", exact {report['exact_seconds']:.1f} s; Pearson r top-k vs exact: median {report['pearson_r_median']:.6f}, "
        f"min {report['pearson_r_min']:.6f}" if "exact_seconds" in report else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
