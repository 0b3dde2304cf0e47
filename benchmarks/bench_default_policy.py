"""The automatic policy at its defaults against the exact backend it falls back to, on whole samples.

For each seed, in one run: a bbELS sample with ``ExactBackend(dtype=float32)`` and one with
``AutoBackend()`` (no arguments), from the same noise, on the first ``--n-train`` images of a
dataset with a reference schedule (used unconditionally, or with ``--conditional`` class-conditionally with
seed s given label s mod 10, as the agreement rows do); wall seconds of each, their ratio, the
Pearson r of the two final images and the policy's route fractions. Tables are built before the
clocks start (as a bank build would), for both alike. ``--backends`` measures other specs beside the default
``auto`` in the same run, from the same noise (for example ``auto:topk_k=1024``: the policy with a certified top-k
route, sent first where its cost model says it pays; ``auto:topk_k=1024:search_cost=0``: as if the search were
free, so top-k goes first wherever its certificate would save exact work).

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_default_policy.py --dataset cifar10 --n-train 4000 \\
        --schedule CIFAR10_ResNet_zeros_conditional --seeds 0
    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_default_policy.py --dataset cifar10 --n-train 4000 \\
        --schedule CIFAR10_ResNet_zeros_conditional --conditional --seeds 0-4
    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_default_policy.py --dataset fashion_mnist --n-train 0 \
        --calibration outputs/fashion_resnet_60k_cpu/calibrate/calibration.json --conditional --seeds 0-1
    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_default_policy.py --dataset cifar10 --n-train 4000 \
        --schedule CIFAR10_ResNet_zeros_conditional --seeds 0 --per-step --backends auto auto:topk_k=1024 \
        auto:topk_k=1024:search_cost=0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from machines import ExactBackend, ScoreMachine, StepRecorder, noise_from_seeds, reference_schedule, sample
from machines.metrics import pearson_r
from machines.posterior.registry import make_backend
from patchbank import BankSpec, MemoryBank, PatchBank, load_dataset
from pipelines.calibration import schedule_from
from pipelines.cli import parse_seeds
from pipelines.runs import read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--schedule", default="FashionMNIST_ResNet_zeros_conditional")
    ap.add_argument("--calibration", default=None, help="a calibration.json whose schedule is used instead of --schedule")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-step", action="store_true", help="also print each step's seconds and the policy's routes")
    ap.add_argument("--conditional", action="store_true", help="class-conditional machines, seed s with label s mod 10")
    ap.add_argument("--materialise-max", type=int, default=3, help="distinct-patch tables (and pruning) up to this P; larger P stream")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="backend specs measured against exact (default: auto)")
    ap.add_argument("--index", default=None, help="a FAISS index spec (e.g. Flat): a bank on disk with that index for the "
                    "tabulated scales, under outputs/banks/ (default: an in-memory bank, searched by torch)")
    args = ap.parse_args()
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    if args.calibration:
        schedule, args.schedule = schedule_from(read_json(args.calibration, "calibration")), args.calibration
    else:
        schedule = reference_schedule(args.schedule)
    if args.index:
        path = Path("outputs/banks") / f"{args.dataset}-{len(data)}-{args.resize or 0}-{args.index.replace(',', '_')}-P{args.materialise_max}"
        spec = BankSpec(scales=schedule.scales, rules=["bbELS"], labels=args.conditional, index=args.index,
                        materialise_max=args.materialise_max)
        bank = PatchBank.build(data, path, spec, progress=False)
    else:
        bank = MemoryBank(data, dedup=True, materialise_max=args.materialise_max)
    exact = ExactBackend(dtype=torch.float32)
    start = time.perf_counter()
    cond = args.conditional
    for P in sorted(P for P in set(schedule.scales) if P <= args.materialise_max):  # one-off tables, for both machines
        for label in range(10) if cond else [None]:
            ScoreMachine(bank, "bbELS", P, conditional=cond, backend=exact)(
                noise_from_seeds([0], data.shape), 0.05, None if label is None else torch.tensor([label]))
    print(f"{args.dataset}: {len(data)} images {list(data.shape)}, {args.schedule}, {args.steps} steps, "
          f"{'conditional' if cond else 'unconditional'}, tables up to P={args.materialise_max}; "
          f"tables {time.perf_counter() - start:.0f} s; torch {torch.get_num_threads()} threads")
    print("| seed | backend | exact float32 s | s | speed-up | Pearson r | sampled | top-k | exact | stopped early |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in parse_seeds(args.seeds):
        noise = noise_from_seeds([seed], data.shape)
        labels = torch.tensor([seed % 10]) if cond else None
        t0 = time.perf_counter()
        exact_machine = ScoreMachine(bank, "bbELS", schedule, conditional=cond, backend=exact)
        exact_steps = StepRecorder(exact_machine)
        ref = sample(exact_machine, noise, args.steps, labels, callback=exact_steps)
        exact_s = time.perf_counter() - t0
        runs = {}
        for spec in args.backends:
            policy = make_backend(spec)
            machine = ScoreMachine(bank, "bbELS", schedule, conditional=cond, backend=policy)
            recorder = StepRecorder(machine, policy)
            t0 = time.perf_counter()
            got = sample(machine, noise, args.steps, labels, callback=recorder)
            seconds = time.perf_counter() - t0
            runs[spec] = recorder.records
            q = sum(r["queries"] for r in recorder.records)
            frac = {k: sum(r.get(k, 0.0) * r["queries"] for r in recorder.records) / q
                    for k in ("sampled_fraction", "topk_fraction", "exact_fraction", "stopped_early_fraction")}
            r = float(pearson_r(got, ref)[0])
            print(f"| {seed} | `{spec}` | {exact_s:.0f} | {seconds:.0f} | {exact_s / seconds:.2f}x | {r:.5f} | {frac['sampled_fraction']:.1%} | "
                  f"{frac['topk_fraction']:.1%} | {frac['exact_fraction']:.1%} | {frac['stopped_early_fraction']:.1%} |", flush=True)
        if args.per_step:
            print("|   | t | P | exact s | " + " | ".join(f"`{spec}` s (sampled, top-k)" for spec in args.backends) + " |")
            for i, e in enumerate(exact_steps.records):
                cells = [f"{runs[spec][i]['seconds']:.2f} ({runs[spec][i].get('sampled_fraction', 0):.0%}, "
                         f"{runs[spec][i].get('topk_fraction', 0):.0%})" for spec in args.backends]
                print(f"|   | {e['t']:.2f} | {e['P']} | {e['seconds']:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
