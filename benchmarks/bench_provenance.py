"""What provenance adds to a sample: exact, exact without per-image shares, and certified (top-k from the
bank's index), same run.

One bbELS sample (``--steps`` DDIM steps, the ``--schedule``'s scales) over N training images; then the
provenance of its last ``--last`` steps with ``m`` sources per pixel: exactly (with exact per-image
shares), exactly without them (``image_shares=False``: through the cluster tree, images ranked by their
listed patches), and once per top-k spec (certified where ε ≤ ``--tol``, exact elsewhere). Prints the
sample's seconds, each provenance's seconds and its ratio to the sample, and the fraction of pixels
certified, per step and in all. The first provenance pass also builds each bucket's source map (kept
for the rest), so every variant is timed after one untimed warm-up pass.

    python benchmarks/bench_provenance.py --n-train 1000
    python benchmarks/bench_provenance.py --n-train 0 --no-exact --index topk:k=1024 --index-listed --backend auto \
        --once --threads 1 --materialise-max 5 --figure docs/figures/mnist60k_provenance.png        # full MNIST
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from machines import ScoreMachine, make_backend, noise_from_seeds, reference_schedule, sample
from machines.provenance import mosaic_statistics, provenance
from patchbank import MemoryBank, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=1000, help="0 = the whole training set")
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--schedule", default="MNIST_ResNet_zeros")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--last", type=int, default=5, help="provenance of the last N steps")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--backend", default="exact:dtype=float32", help="the sample's backend")
    ap.add_argument("--materialise-max", type=int, default=7)
    ap.add_argument("--no-exact", action="store_true", help="skip the exact provenance with per-image shares")
    ap.add_argument("--index", nargs="*", default=["topk:k=256", "topk:k=1024"], help="top-k backend specs")
    ap.add_argument("--index-listed", action="store_true",
                    help="top-k rows rank images by their listed patches (as the listed-images row) instead of exact "
                         "per-image shares: uncertified pixels then take the pruned cluster scan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--once", action="store_true",
                    help="one sample, timed with its table builds, and no provenance warm-up (each variant's time then "
                         "includes what it builds first: source maps, cluster trees); for banks where a sample takes minutes")
    ap.add_argument("--figure", default=None, help="also write the listed-images provenance figure of the last step here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    bank = MemoryBank(data, dedup=True, materialise_max=args.materialise_max)
    machine = ScoreMachine(bank, "bbELS", scales=reference_schedule(args.schedule), backend=args.backend)
    noise = noise_from_seeds([args.seed], data.shape, torch.float64)
    states: dict[int, tuple[float, torch.Tensor]] = {}
    current = [noise]

    def keep(step: int, t: float, x_prev: torch.Tensor, x0: torch.Tensor) -> None:
        if step >= args.steps - args.last:
            states[step] = (t, current[0])
        current[0] = x_prev

    start = time.perf_counter()
    final = sample(machine, noise, args.steps, callback=keep, progress=False)  # builds the tables the sample uses
    sample_s = time.perf_counter() - start
    if not args.once:
        start = time.perf_counter()
        sample(machine, noise, args.steps, progress=False)
        sample_s = time.perf_counter() - start
    print(f"# {len(data)} images {tuple(data.shape)}, bbELS {args.schedule}, seed {args.seed}, {args.steps} steps, "
          f"m = {args.m}, tol = {args.tol}, {torch.get_num_threads()} threads")
    print(f"sample: {sample_s:.1f} s" + (" (with its table builds)" if args.once else ""))
    rows = []
    if not args.once:
        start = time.perf_counter()
        for step, (t, x) in sorted(states.items()):  # warm-up: the buckets' source maps and cluster trees
            provenance(machine, x, t, m=args.m, image_shares=False)
        print(f"warm-up (source maps, cluster trees, one listed-images pass): {time.perf_counter() - start:.1f} s")
    variants = [("exact, listed images", None, False)] + ([] if args.no_exact else [("exact", None, True)])
    variants += [(spec + (", listed images" if args.index_listed else ""), spec, not args.index_listed) for spec in args.index]
    for name, spec, shares in variants:
        index = None if spec is None else make_backend(spec)
        seconds, certified = 0.0, []
        for step, (t, x) in sorted(states.items()):
            start = time.perf_counter()
            p = provenance(machine, x, t, m=args.m, index=index, tol=args.tol, image_shares=shares)
            seconds += time.perf_counter() - start
            certified.append(round(float((~p.exact).double().mean()), 4))
        row = {"provenance": name, "seconds": round(seconds, 2), "vs_sample": round(seconds / sample_s, 3),
               "certified_per_step": certified, "P": [machine.scales(states[s][0]) for s in sorted(states)]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.figure and not shares and spec is None:
            from pipelines.figures import provenance_figure

            provenance_figure(final, p, data, args.figure)
            stats = mosaic_statistics(p)[0]
            print(json.dumps({k: v for k, v in stats.items() if k != "regions"} | {"largest_regions": stats["regions"][:3]}))


if __name__ == "__main__":
    main()
