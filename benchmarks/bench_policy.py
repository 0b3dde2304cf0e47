"""Automatic-policy benchmark: a full bbELS sample through :class:`machines.AutoBackend`.

Per step: seconds, the policy's choice and route fractions (sampled / exact), draws per bucket,
standard errors, sampling vs exact seconds, and — on ``--check-pixels`` random pixels of the
first seed, at the policy's own states — the measured error of x̂0 against the exact backend.
With ``--exact`` the exact machine also samples every seed and the Pearson r of the final
images is reported.

``--out DIR`` keeps every seed's result in DIR (policy final + per-step records; exact final),
and the exact samples checkpoint every step there: a re-run with the same options skips what is
done and resumes an interrupted exact sample, so the hours-long 60,000-image references can be
accumulated over several runs (``--exact-only`` computes just those). A folder written with other
options is refused.

    python benchmarks/bench_policy.py --n-train 0 --seeds 0-9 --check-pixels 16     # full MNIST
    python benchmarks/bench_policy.py --n-train 2000 --seeds 0-9 --exact --out outputs/policy2000
    python benchmarks/bench_policy.py --n-train 0 --seeds 0-9 --exact --out outputs/policy60k --exact-dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _results import EXACT_TAG, Results, run_seed, timed_sample  # benchmarks/ is the script's folder, hence on sys.path

from machines import AutoBackend, ExactBackend, ScoreMachine, StepRecorder, alpha_sigma2, noise_from_seeds, reference_schedule, sample
from machines.metrics import pearson_r
from patchbank import MemoryBank, load_dataset
from patchbank.geometry import BucketKey, boundary_class, patches_at
from pipelines.cli import parse_seeds


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
    ap.add_argument("--kernel", choices=["auto", "fused", "torch"], default="auto", help="exact backend kernel (fallback and reference)")
    ap.add_argument("--check-pixels", type=int, default=0, help="per step, exact check of this many pixels of the first seed")
    ap.add_argument("--exact", action="store_true", help="also sample every seed exactly and report Pearson r")
    ap.add_argument("--exact-only", action="store_true", help="only the exact samples (resumable with --out), no policy")
    ap.add_argument("--exact-dtype", choices=["float64", "float32"], default="float64", help="precision of the exact reference")
    ap.add_argument("--out", default=None, help="folder of per-seed results and exact checkpoints (resume on re-run)")
    ap.add_argument("--fallback-dtype", choices=["float64", "float32"], default="float64",
                    help="precision of the policy's exact fallback")
    ap.add_argument("--draw-dtype", choices=["float64", "float32"], default="float32",
                    help="precision of the draws' logits (float32, the default: about half the product's cost)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    bank = MemoryBank(data, dedup=True, materialise_max=args.materialise_max)
    schedule = reference_schedule(args.schedule)
    C, H, W = data.shape
    noise = noise_from_seeds(seeds, (C, H, W), torch.float64)
    out = Results(args.out, _tags(args, len(data))) if args.out else None
    exact = ExactBackend(kernel=args.kernel, dtype=getattr(torch, args.exact_dtype))
    start = time.perf_counter()  # one-off tables (distinct patches + clusters), as a bank build would
    for P in schedule.scales:
        if P <= args.materialise_max:
            ScoreMachine(bank, "bbELS", P)(noise[:1], 0.05)
    build_s = time.perf_counter() - start
    print(f"{len(data)} images {C}x{H}x{W}; tables for P <= {args.materialise_max}: {build_s:.1f} s", flush=True)

    fallback = ExactBackend(kernel=args.kernel, dtype=getattr(torch, args.fallback_dtype))
    policy = AutoBackend(samples=args.samples, max_samples=args.max_samples, se_tol=args.se_tol, min_ess=args.min_ess, exact=fallback,
                         draw_dtype=getattr(torch, args.draw_dtype), kernel=args.kernel)
    machine = ScoreMachine(bank, "bbELS", schedule, backend=policy)
    exact_machine = ScoreMachine(bank, "bbELS", schedule, backend=exact)
    gen = torch.Generator().manual_seed(1234)
    steps: list[dict] = []
    finals, refs, ref_seconds, done = {}, {}, [], []
    for n, seed in enumerate(seeds):
        x_in = [noise[n : n + 1]]
        if not args.exact_only:
            cached = out.load("policy", seed) if out else None
            if cached is not None:
                finals[seed] = cached["final"]
                steps += cached["steps"]
                print(f"seed {seed}: policy result read from {args.out}", flush=True)
            else:
                recorder = StepRecorder(machine, policy)

                def on_step(step: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> None:
                    rec = recorder(step, t, x, x0)  # the record kept in recorder.records
                    rec["seed"] = seed
                    if n == 0 and args.check_pixels:
                        pix = torch.stack([torch.randint(H, (args.check_pixels,), generator=gen),
                                           torch.randint(W, (args.check_pixels,), generator=gen)], 1)
                        ref = exact_pixels(bank, x_in[0], t, rec["P"], pix, exact)
                        err = (x0[0][:, pix[:, 0], pix[:, 1]].T.to(torch.float64) - ref).abs()
                        rec["check_error_max"] = float(err.max())
                        rec["check_error_median"] = float(err.median())
                    print(json.dumps(rec), flush=True)
                    x_in[0] = x
                    recorder.start()  # the exact check above is not the policy's time

                finals[seed] = sample(machine, noise[n : n + 1], args.steps, callback=on_step)
                seed_steps = recorder.records
                steps += seed_steps
                print(f"seed {seed}: {sum(r['seconds'] for r in seed_steps):.1f} s", flush=True)
                if out:
                    out.save("policy", seed, {"final": finals[seed], "steps": seed_steps})
        if args.exact or args.exact_only:
            cached = run_seed(out, "exact", seed,
                              lambda ckpt: timed_sample(exact_machine, noise[n : n + 1], args.steps, None, ckpt, progress=True))
            refs[seed] = cached["final"]
            if not cached["resumed"]:
                ref_seconds.append(cached["seconds"])
        done.append(seed)
    report: dict = {"images": len(data), "seeds": done, "build_s": build_s, "options": vars(args)}
    if finals:
        per_sample = [sum(s["seconds"] for s in steps if s["seed"] == sd) for sd in finals]  # step times exclude the checks
        report["seconds_per_sample_median"] = statistics.median(per_sample)
        report["per_step"] = steps
        print(f"policy: {report['seconds_per_sample_median']:.1f} s per sample (median over {len(per_sample)} seeds; "
              f"min {min(per_sample):.1f}, max {max(per_sample):.1f})")
        _table(steps)
    if ref_seconds:
        report["exact_seconds_per_sample"] = statistics.median(ref_seconds)
        print(f"exact: {report['exact_seconds_per_sample']:.1f} s per sample (median over {len(ref_seconds)} uninterrupted seeds)")
    both = [sd for sd in done if sd in finals and sd in refs]
    if both:
        final = torch.cat([finals[sd] for sd in both])
        ref = torch.cat([refs[sd] for sd in both])
        r = pearson_r(final, ref)
        report |= {"pearson_r": r.tolist(), "pearson_r_min": float(r.min()), "max_abs_diff": float((final - ref).abs().max())}
        print(f"Pearson r policy vs exact over {len(both)} seeds: min {report['pearson_r_min']:.6f}, "
              f"median {statistics.median(report['pearson_r']):.6f}; max |diff| {report['max_abs_diff']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _table(steps: list[dict]) -> None:
    by_step: dict[int, list[dict]] = {}
    for s in steps:
        by_step.setdefault(s["step"], []).append(s)
    print("step  t     P   s/step  choice   sampled  exact  lowESS highSE  SE max   sample_s exact_s  check_err_max")
    for k in sorted(by_step):
        rs = by_step[k]
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        chk = next((r.get("check_error_max") for r in rs if "check_error_max" in r), None)
        print(f"{k:4d}  {rs[0]['t']:.2f}  {rs[0]['P']:2d}  {med('seconds'):6.2f}  {rs[0]['choice']:7s}  {med('sampled_fraction'):6.3f}  "
              f"{med('exact_fraction'):5.3f}  {med('low_ess_fraction'):5.3f}  {med('high_se_fraction'):5.3f}  {max(r['se_max'] for r in rs):.1e}  "
              f"{med('sample_s'):7.2f}  {med('exact_s'):6.2f}  {'' if chk is None else f'{chk:.1e}'}")


def _tags(args: argparse.Namespace, images: int) -> dict[str, dict]:
    """What a stored policy / exact result must have been made with."""
    policy = ("dataset", "n_train", "resize", "schedule", "steps", "samples", "max_samples", "se_tol", "min_ess",
              "materialise_max", "fallback_dtype", "kernel")
    tags = {kind: {k: getattr(args, k) for k in keys} | {"images": images} for kind, keys in (("policy", policy), ("exact", EXACT_TAG))}
    if args.draw_dtype != "float64":  # results stored before the option existed were made with float64 draws
        tags["policy"]["draw_dtype"] = args.draw_dtype
    return tags


if __name__ == "__main__":
    main()
