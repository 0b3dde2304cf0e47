"""Automatic-policy benchmark (issue 6): a full bbELS sample through :class:`machines.AutoBackend`.

Per step: seconds, the policy's choice and route fractions (sampled / exact), draws per bucket,
standard errors, sampling vs exact seconds, and — on ``--check-pixels`` random pixels of the
first seed, at the policy's own states — the measured error of x̂0 against the exact backend.
With ``--exact`` the exact machine also samples every seed and the Pearson r of the final
images is reported (feasible on a few thousand images; the 60,000-image exact sample costs
hours per seed on 2 cores).

    python benchmarks/bench_policy.py --n-train 0 --seeds 0-9 --check-pixels 16     # full MNIST
    python benchmarks/bench_policy.py --n-train 2000 --seeds 0-9 --exact            # r against exact
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from machines import AutoBackend, ExactBackend, ScoreMachine, alpha_sigma2, noise_from_seeds, reference_schedule, sample
from patchbank import MemoryBank, load_dataset
from patchbank.geometry import BucketKey, boundary_class, patches_at
from pipelines.metrics import pearson_r


def exact_pixels(bank: MemoryBank, x: torch.Tensor, t: float, P: int, pixels: torch.Tensor, exact: ExactBackend) -> torch.Tensor:
    """Exact bbELS x̂0 of one image ``x [1, C, H, W]`` at the given pixels ``[n, 2]``: ``[n, C]``."""
    a, s2 = alpha_sigma2(t)
    keys = boundary_class(pixels, bank.height, bank.width, P)
    out = []
    for (i, j), key in zip(pixels.tolist(), keys.tolist()):
        q = patches_at(x, torch.tensor([[i, j]]), P, "zeros")[0]
        out.append(exact.posterior(bank, BucketKey("bbELS", P, "zeros", tuple(key)), q, a, s2)[0])
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=2000, help="0 = all")
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--schedule", default="MNIST_ResNet_zeros")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--max-samples", type=int, default=1 << 22)
    ap.add_argument("--se-tol", type=float, default=1e-2)
    ap.add_argument("--min-ess", type=float, default=64.0)
    ap.add_argument("--materialise-max", type=int, default=3, help="distinct-patch tables (and pruning) up to this P")
    ap.add_argument("--check-pixels", type=int, default=0, help="per step, exact check of this many pixels of the first seed")
    ap.add_argument("--exact", action="store_true", help="also sample every seed exactly and report Pearson r")
    ap.add_argument("--exact-cache", default=None, help="file for the exact finals (read if present, else written)")
    ap.add_argument("--fallback-dtype", choices=["float64", "float32"], default="float64",
                    help="precision of the policy's exact fallback (the reference is always float64)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    bank = MemoryBank(data, dedup=True, materialise_max=args.materialise_max)
    schedule = reference_schedule(args.schedule)
    C, H, W = data.shape
    noise = noise_from_seeds(seeds, (C, H, W), torch.float64)
    exact = ExactBackend()
    start = time.perf_counter()  # one-off tables (distinct patches + clusters), as a bank build would
    for P in schedule.scales:
        if P <= args.materialise_max:
            ScoreMachine(bank, "bbELS", P)(noise[:1], 0.05)
    build_s = time.perf_counter() - start
    print(f"{len(data)} images {C}x{H}x{W}; tables for P <= {args.materialise_max}: {build_s:.1f} s", flush=True)

    fallback = ExactBackend(dtype=getattr(torch, args.fallback_dtype))
    policy = AutoBackend(samples=args.samples, max_samples=args.max_samples, se_tol=args.se_tol, min_ess=args.min_ess, exact=fallback)
    machine = ScoreMachine(bank, "bbELS", schedule, backend=policy)
    gen = torch.Generator().manual_seed(1234)
    steps: list[dict] = []
    finals = []
    total = 0.0
    for n, seed in enumerate(seeds):
        x_in = [noise[n : n + 1]]
        last = [time.perf_counter()]

        def on_step(step: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
            now = time.perf_counter()
            rec = {"seed": seed, "step": step, "t": round(t, 3), "P": schedule(t), "seconds": round(now - last[0], 3)}
            rec |= policy.stats.summary()
            policy.stats.reset()
            if n == 0 and args.check_pixels:
                pix = torch.stack([torch.randint(H, (args.check_pixels,), generator=gen),
                                   torch.randint(W, (args.check_pixels,), generator=gen)], 1)
                ref = exact_pixels(bank, x_in[0], t, rec["P"], pix, exact)
                err = (x0[0][:, pix[:, 0], pix[:, 1]].T.to(torch.float64) - ref).abs()
                rec["check_error_max"] = float(err.max())
                rec["check_error_median"] = float(err.median())
            steps.append(rec)
            print(json.dumps(rec), flush=True)
            x_in[0] = x
            last[0] = time.perf_counter()

        t0 = time.perf_counter()
        finals.append(sample(machine, noise[n : n + 1], args.steps, callback=on_step))
        seconds = time.perf_counter() - t0
        total += seconds
        print(f"seed {seed}: {seconds:.1f} s (includes exact checks)" if n == 0 and args.check_pixels else f"seed {seed}: {seconds:.1f} s",
              flush=True)
    final = torch.cat(finals)
    per_sample = [sum(s["seconds"] for s in steps if s["seed"] == sd) for sd in seeds]  # step times exclude the checks
    report = {
        "images": len(data), "seeds": seeds, "build_s": build_s,
        "policy": {"fallback_dtype": args.fallback_dtype, "samples": args.samples, "max_samples": args.max_samples, "se_tol": args.se_tol, "min_ess": args.min_ess,
                   "materialise_max": args.materialise_max},
        "seconds_per_sample_median": statistics.median(per_sample),
        "per_step": [{k: v for k, v in s.items()} for s in steps],
    }
    if args.exact:
        cached = torch.load(args.exact_cache) if args.exact_cache and os.path.exists(args.exact_cache) else None
        if cached is not None and cached["seeds"] == seeds and cached["images"] == len(data):
            ref, report["exact_seconds_per_sample"] = cached["final"], cached["seconds_per_sample"]
        else:
            t0 = time.perf_counter()
            ref = sample(ScoreMachine(bank, "bbELS", schedule, backend=exact), noise)
            report["exact_seconds_per_sample"] = (time.perf_counter() - t0) / len(seeds)
            if args.exact_cache:
                torch.save({"seeds": seeds, "images": len(data), "final": ref,
                            "seconds_per_sample": report["exact_seconds_per_sample"]}, args.exact_cache)
        r = pearson_r(final, ref)
        report["pearson_r"] = r.tolist()
        report["pearson_r_min"] = float(r.min())
        report["max_abs_diff"] = float((final - ref).abs().max())
    print(f"policy: {report['seconds_per_sample_median']:.1f} s per sample (median over {len(seeds)} seeds; min {min(per_sample):.1f}, "
          f"max {max(per_sample):.1f})")
    by_step: dict[int, list[dict]] = {}
    for s in steps:
        by_step.setdefault(s["step"], []).append(s)
    print("step  t     P   s/step  choice   sampled  exact  lowESS highSE  SE max   sample_s exact_s  check_err_max")
    for k in sorted(by_step):
        rs = by_step[k]
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        chk = next((r.get("check_error_max") for r in rs if "check_error_max" in r), None)
        print(f"{k:4d}  {rs[0]['t']:.2f}  {rs[0]['P']:2d}  {med('seconds'):6.2f}  {rs[0]['choice']:7s}  {med('sampled_fraction'):6.3f}  "
              f"{med('exact_fraction'):5.3f}  {med('low_ess_fraction'):5.3f}  {med('high_se_fraction'):5.3f}  {max(r['se_max'] for r in rs):.1e}  {med('sample_s'):7.2f}  {med('exact_s'):6.2f}  "
              f"{'' if chk is None else f'{chk:.1e}'}")
    if args.exact:
        print(f"exact: {report['exact_seconds_per_sample']:.1f} s per sample; Pearson r policy vs exact: min {report['pearson_r_min']:.6f}, "
              f"median {statistics.median(report['pearson_r']):.6f}; max |diff| {report['max_abs_diff']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
