"""Many scales at once: one box-sum pass against one exact pass per scale, on the same queries, in the same run.

Calibration evaluates every candidate patch size P at every visited time on the same noisy images.
The box pass (``native.box_scales``) makes each pair's inner product at every P as a box sum of one product map
per (training image, displacement), so all candidates cost one pass. Per time, the script prints:
``at_once_s``, ``ScoreMachine.at_scales`` at its default (what calibration runs: P ≥ ``BOX_MIN_SCALE`` in one box
pass, smaller P through the exact backend); ``box_s``, every candidate in the box pass; ``per_scale_s``, the exact
backend (float64 by default, pruned, over distinct patches where tables exist) once per P, as a calibration
without the box pass would, and each P's time; the ratio per-scale / at-once; the largest difference between the
answers; the box pass's (pixel, patch, scale) pairs and nanoseconds per pair. Per-scale tables and clusters are
built once before timing (an untimed call per P), as a calibration builds them once per run.

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_scales.py --n-train 1000
    python benchmarks/bench_scales.py --n-train 100 --times 0.5 --queries 1   # quick
"""

from __future__ import annotations

import argparse
import time

import torch

from machines import ExactBackend, ScoreMachine, alpha_sigma2, native
from patchbank import MemoryBank, load_dataset, to_model_range
from pipelines.jobs import PATCH_CANDIDATES, TABLES_UP_TO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=1000, help="training images (0: all)")
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--machine", default="bbELS", choices=["LS", "ELS", "bbELS"])
    ap.add_argument("--padding", default=None, help="zeros or circular (default: the machine's)")
    ap.add_argument("--scales", nargs="+", type=int, default=PATCH_CANDIDATES, help="the candidate patch sizes")
    ap.add_argument("--times", nargs="+", type=float, default=[0.05, 0.35, 0.65, 0.95])
    ap.add_argument("--queries", type=int, default=2, help="noisy images per call (a calibration batch's seeds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="the per-scale exact backend's")
    ap.add_argument("--tables-up-to", type=int, default=TABLES_UP_TO,
                    help="largest P with distinct-patch tables (default: calibration's; -1: every P)")
    ap.add_argument("--box-each", action="store_true", help="also time a box pass for each scale alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the compiled kernels are unavailable: {native.unavailable_reason()}")

    data = load_dataset(args.dataset, resize=args.resize, limit=args.n_train or None)
    held = load_dataset(args.dataset, resize=args.resize, limit=len(data) + args.queries)
    x0 = to_model_range(held.images[len(data):], torch.float64)  # images just past the bank: never in it
    if x0.shape[0] < args.queries:
        raise SystemExit(f"{args.dataset} has no {args.queries} images beyond the first {len(data)}")
    bank = MemoryBank(data, materialise_max=None if args.tables_up_to < 0 else args.tables_up_to)
    backend = ExactBackend(dtype=getattr(torch, args.dtype))
    machine = ScoreMachine(bank, args.machine, scales=args.scales[0], padding=args.padding, backend=backend)
    start = time.perf_counter()
    for P in args.scales:  # per-scale tables and clusters, built once (not timed)
        ScoreMachine(bank, args.machine, scales=P, padding=args.padding, backend=backend)(x0[:1], 1.0)
    print(f"# {args.machine} ({machine.padding}), {len(data)} {args.dataset} images {tuple(data.shape)}, {args.queries} "
          f"queries, scales {args.scales}, {torch.get_num_threads()} threads; per-scale exact {args.dtype}, "
          f"tables up to P = {bank.materialise_max if bank.materialise_max is not None else 'any'}, "
          f"tables built in {time.perf_counter() - start:.1f} s")
    print(f"{'t':>5} {'at_once_s':>9} {'box_s':>7} {'per_scale_s':>11} {'ratio':>6} {'max|Δ|':>8} {'pairs':>9} {'ns/pair':>7}"
          f"  per scale (s)")
    totals = [0.0, 0.0, 0.0]
    for t in args.times:
        a, s2 = alpha_sigma2(t)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = a * x0 + s2**0.5 * noise
        start = time.perf_counter()
        together = machine.at_scales(x, t, args.scales)  # the default: P >= BOX_MIN_SCALE in one box pass, the rest per scale
        together_s = time.perf_counter() - start
        start = time.perf_counter()
        images = to_model_range(bank.data.images, torch.float64).contiguous()
        box, pairs = native.box_scales(x.contiguous(), images, args.scales, args.machine, machine.padding, a, s2)
        box_s = time.perf_counter() - start
        per, per_s = [], []
        for P in args.scales:
            start = time.perf_counter()
            per.append(machine.at_scales(x, t, [P], method="per_scale")[0])
            per_s.append(time.perf_counter() - start)
        per = torch.stack(per)
        diff = max(float((box - per).abs().max()), float((together - per).abs().max()))
        for i, v in enumerate((together_s, box_s, sum(per_s))):
            totals[i] += v
        print(f"{t:5.2f} {together_s:9.2f} {box_s:7.2f} {sum(per_s):11.2f} {sum(per_s) / together_s:6.1f} {diff:8.1e} "
              f"{pairs:9.2e} {box_s / pairs * 1e9:7.2f}  {' '.join(f'{s:.2f}' for s in per_s)}", flush=True)
        if args.box_each:
            alone = []
            for P in args.scales:
                start = time.perf_counter()
                native.box_scales(x.contiguous(), images, [P], args.machine, machine.padding, a, s2)
                alone.append(time.perf_counter() - start)
            print(f"{'':>5} box pass per scale alone (s): {' '.join(f'{s:.2f}' for s in alone)}", flush=True)
    print(f"{'all':>5} {totals[0]:9.2f} {totals[1]:7.2f} {totals[2]:11.2f} {totals[2] / totals[0]:6.1f}")


if __name__ == "__main__":
    main()
