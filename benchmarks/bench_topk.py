"""Patch-bank benchmark: build a bank, then sample bbELS with the exact and top-k backends.

Reports build time and disk size per scale; per-step time of both backends; the top-k
fallback fraction and ε per step; the Pearson r between top-k and exact final samples. Each
seed is sampled on its own (one image per DDIM run, as a user draws one sample).

``--out DIR`` keeps each seed's top-k result (final image + per-step records) and exact result
there as soon as it is done, and an unfinished sample checkpoints every step: a re-run with the
same options skips what is done and resumes, so a 60,000-image run can be spread over several
sessions; a folder written with other options is refused. ``--exact-from DIR`` takes the exact
references from another such folder instead of sampling them (``bench_policy.py --out`` writes
the same ``exact-seed<n>.pt`` files; the data, schedule, steps and ``--exact-dtype`` must match).

    python benchmarks/bench_topk.py --n-train 2000 --seeds 0-9
    python benchmarks/bench_topk.py --n-train 0 --materialise-max 3 --fallback-dtype float32 \\
        --out outputs/topk60k --exact-from outputs/policy60k --exact-dtype float32     # full MNIST
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _results import EXACT_TAG, Results, run_seed, timed_sample  # benchmarks/ is the script's folder, hence on sys.path

from machines import ExactBackend, ScoreMachine, TopKBackend, noise_from_seeds, reference_schedule
from machines.metrics import pearson_r
from patchbank import BankSpec, PatchBank, load_dataset
from pipelines.cli import parse_seeds

TOPK_TAG = ("dataset", "n_train", "resize", "schedule", "steps", "index", "materialise_max", "k", "tol", "nprobe",
            "fallback_dtype", "kernel")


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
    ap.add_argument("--kernel", choices=["auto", "fused", "torch"], default="auto", help="exact backend kernel")
    ap.add_argument("--fallback-dtype", choices=["float64", "float32"], default="float64",
                    help="precision of the top-k backend's exact fallback")
    ap.add_argument("--exact-dtype", choices=["float64", "float32"], default="float64", help="precision of the exact reference")
    ap.add_argument("--bank", default=None, help="bank directory (default: outputs/banks/<dataset>-<n>-<index>)")
    ap.add_argument("--out", default=None, help="folder of per-seed results and checkpoints (resume on re-run)")
    ap.add_argument("--exact-from", default=None, help="folder holding the exact references (exact-seed<n>.pt)")
    ap.add_argument("--skip-exact", action="store_true", help="time the top-k backend only (no Pearson r)")
    ap.add_argument("--json", default=None, help="write the full report here")
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    schedule = reference_schedule(args.schedule)
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    tags = {kind: {k: getattr(args, k) for k in keys} | {"images": len(data)} for kind, keys in (("topk", TOPK_TAG), ("exact", EXACT_TAG))}
    out = Results(args.out, tags) if args.out else None
    refs = Results(args.exact_from, tags) if args.exact_from else out

    path = Path(args.bank or f"outputs/banks/{args.dataset}-{len(data)}-{args.resize}-{args.index.replace(',', '_')}-m{args.materialise_max}")
    start = time.perf_counter()
    spec = BankSpec(scales=schedule.scales, rules=["bbELS"], index=args.index, materialise_max=args.materialise_max or None)
    bank = PatchBank.build(data, path, spec)
    info = bank.info()
    print(f"# bank {path}: {len(data)} images {list(data.shape)}, built in {time.perf_counter() - start:.1f} s (this run)")
    print(f"{'P':>3} {'buckets':>7} {'patches':>10} {'distinct':>10} {'MB':>8} {'build_s':>8}")
    for P, s in sorted(info["scales"].items()):
        distinct = s["distinct"] if s["materialised"] else "streamed"
        print(f"{P:3d} {s['buckets']:7d} {s['patches']:10d} {distinct:>10} {s['bytes'] / 1e6:8.1f} {s.get('seconds', 0):8.1f}", flush=True)

    noise = noise_from_seeds(seeds, data.shape, torch.float64)
    fallback = ExactBackend(kernel=args.kernel, dtype=getattr(torch, args.fallback_dtype))
    topk = TopKBackend(k=args.k, tol=args.tol, nprobe=args.nprobe, exact=fallback)
    topk_machine = ScoreMachine(bank, "bbELS", scales=schedule, backend=topk)
    exact = ExactBackend(kernel=args.kernel, dtype=getattr(torch, args.exact_dtype))
    exact_machine = ScoreMachine(bank, "bbELS", scales=schedule, backend=exact)
    results: dict[str, dict[int, dict]] = {"topk": {}, "exact": {}}
    for n, seed in enumerate(seeds):
        x = noise[n : n + 1]
        results["topk"][seed] = run_seed(out, "topk", seed, lambda ckpt: timed_sample(topk_machine, x, args.steps, topk, ckpt))
        if args.skip_exact:
            continue
        if args.exact_from:
            ref = refs.load("exact", seed)  # type: ignore[union-attr]
            if ref is None:
                raise SystemExit(f"no exact reference for seed {seed} in {args.exact_from}: compute it there first "
                                 f"(bench_policy.py --exact-only --out {args.exact_from} ...) or drop --exact-from")
            results["exact"][seed] = ref
        else:
            results["exact"][seed] = run_seed(out, "exact", seed, lambda ckpt: timed_sample(exact_machine, x, args.steps, None, ckpt))

    report: dict = {"args": vars(args), "bank": info, "seeds": seeds}
    _whole(report, "topk", results["topk"])
    _whole(report, "exact", results["exact"])
    if results["exact"]:
        final = torch.cat([results["topk"][sd]["final"] for sd in seeds])
        ref = torch.cat([results["exact"][sd]["final"] for sd in seeds])
        r = pearson_r(final, ref)
        report |= {"pearson_r": r.tolist(), "pearson_r_median": statistics.median(r.tolist()), "pearson_r_min": r.min().item(),
                   "max_abs_diff": float((final - ref).abs().max())}
    per_step = _per_step(results)
    report["per_step"] = per_step
    print(f"\n# {len(seeds)} seeds, {args.steps} steps, k={args.k}, tol={args.tol}, nprobe={args.nprobe}, index {args.index}; "
          "medians over seeds")
    print(f"{'step':>4} {'t':>5} {'P':>3} {'topk_s':>8} {'fallback':>8} {'eps_med':>9} {'search_s':>8} {'fb_exact_s':>10} {'exact_s':>8}")
    for r_ in per_step:
        print(f"{r_['step']:4d} {r_['t']:5.2f} {r_['P']:3d} {r_['topk_step_s']:8.2f} {r_['fallback_fraction']:8.3f} "
              f"{r_['eps_median']:9.2e} {r_['search_s']:8.2f} {r_['fallback_exact_s']:10.2f} {r_.get('exact_step_s', float('nan')):8.2f}")
    line = f"whole sample (median over seeds): top-k {report['topk_seconds']:.1f} s"
    if "exact_seconds" in report:
        line += f", exact {report['exact_seconds']:.1f} s"
    if "pearson_r_min" in report:
        line += (f"; Pearson r top-k vs exact over {len(seeds)} seeds: median {report['pearson_r_median']:.6f}, "
                 f"min {report['pearson_r_min']:.6f}, max |diff| {report['max_abs_diff']:.2e}")
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _whole(report: dict, kind: str, results: dict[int, dict]) -> None:
    """Median whole-sample seconds over the seeds sampled without interruption."""
    seconds = [r["seconds"] for r in results.values() if not r.get("resumed")]
    if seconds:
        report[f"{kind}_seconds"] = statistics.median(seconds)
        report[f"{kind}_seconds_all"] = seconds


def _per_step(results: dict[str, dict[int, dict]]) -> list[dict]:
    """Per step: medians over seeds of the top-k seconds, fallback fraction, ε and search seconds, and of the
    exact seconds where the references recorded them."""
    rows: dict[int, dict] = {}
    for kind in ("topk", "exact"):
        by_step: dict[int, list[dict]] = {}
        for res in results[kind].values():
            for rec in res.get("steps", []):
                by_step.setdefault(rec["step"], []).append(rec)
        for step, recs in by_step.items():
            row = rows.setdefault(step, {"step": step, "t": recs[0]["t"], "P": recs[0]["P"]})
            row[f"{kind}_step_s"] = statistics.median(r["seconds"] for r in recs)
            if kind == "topk":
                for key in ("fallback_fraction", "eps_median", "search_s", "exact_s"):
                    row["fallback_exact_s" if key == "exact_s" else key] = statistics.median(r.get(key, float("nan")) for r in recs)
                row["eps_max"] = max(r.get("eps_max", float("nan")) for r in recs)
    return [rows[k] for k in sorted(rows) if "topk_step_s" in rows[k]]


if __name__ == "__main__":
    main()
