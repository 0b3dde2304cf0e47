"""Time one exact machine step.

One query image (a noised MNIST test digit), ELS and bbELS, several P and t, on N training
images. Prints one row per configuration: build time of the distinct-patch tables (dedup),
then the median step time over ``--repeat`` runs.

    python benchmarks/bench_exact.py --n-train 1000 --scales 3 7 11
    python benchmarks/bench_exact.py --n-train 0 --scales 3 7 --times 0.05 0.35   # full 60k
    python benchmarks/bench_exact.py --kernel torch fused --dedup off --prune off   # fused kernel vs torch ops
    python benchmarks/bench_exact.py --resize 32 --machines bbELS --prune on --kernel blocks fused   # C sweep vs blocks

``--kernel blocks`` is the fused kernel with the pruned pass visiting one cluster at a time (a matrix product
per block, then the C fold) instead of the one-call C sweep over the cluster tree (``fused``, ``auto``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from machines import ExactBackend, ScoreMachine, alpha_sigma2
from patchbank import MemoryBank, load_dataset, to_model_range


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=1000, help="0 = the whole training set")
    ap.add_argument("--resize", type=int, default=0, help="0 keeps 28x28")
    ap.add_argument("--machines", nargs="+", default=["ELS", "bbELS"])
    ap.add_argument("--scales", nargs="+", type=int, default=[3, 7, 11])
    ap.add_argument("--times", nargs="+", type=float, default=[0.05, 0.35, 0.65, 0.95])
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--dedup", choices=["on", "off", "both"], default="both")
    ap.add_argument("--prune", choices=["on", "off", "both"], default="both")
    ap.add_argument("--leaf-size", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=ExactBackend.chunk_size)
    ap.add_argument("--query-chunk", type=int, default=ExactBackend.query_chunk)
    ap.add_argument("--kernel", nargs="+", choices=["auto", "fused", "torch", "blocks"], default=["auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, resize=args.resize or None, limit=args.n_train or None)
    test = load_dataset(args.dataset, split="test", resize=args.resize or None, limit=1)
    x0 = to_model_range(test.images, torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print(f"# {len(data)} training images {tuple(data.shape)}, 1 query, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'machine':7} {'P':>3} {'dedup':>5} {'prune':>5} {'kernel':>6} {'t':>5} {'build_s':>8} {'step_s':>8} {'visited':>8} {'no_exp':>7}")
    choice = {"on": [True], "off": [False], "both": [False, True]}
    configs = [(d, p) for p in choice[args.prune] for d in choice[args.dedup] if not (p and not d)]  # pruning implies dedup
    for (dedup, prune), kernel in itertools.product(configs, args.kernel):
        backend = ExactBackend(chunk_size=args.chunk_size, dtype=getattr(torch, args.dtype), prune=prune,
                               leaf_size=args.leaf_size, kernel="fused" if kernel == "blocks" else kernel,
                               query_chunk=args.query_chunk, tiles=kernel != "blocks")
        for kind in args.machines:
            for P in args.scales:
                bank = MemoryBank(data, dedup=dedup)
                machine = ScoreMachine(bank, kind, scales=P, backend=backend)
                start = time.perf_counter()
                if dedup:
                    machine(x0, 0.5)  # builds (and caches) the distinct-patch tables and clusters
                build = time.perf_counter() - start
                for t in args.times:
                    a, s2 = alpha_sigma2(t)
                    x = a * x0 + s2**0.5 * noise
                    runs = []
                    backend.stats.reset()
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        machine(x, t)
                        runs.append(time.perf_counter() - start)
                    visited = backend.stats.visited_fraction
                    no_exp = backend.stats.skipped / max(1, backend.stats.visited)  # pairs the fused kernel skipped
                    print(f"{kind:7} {P:3d} {str(dedup):>5} {str(prune):>5} {kernel:>6} {t:5.2f} {build:8.2f} "
                          f"{statistics.median(runs):8.3f} {visited:8.3f} {no_exp:7.3f}", flush=True)


if __name__ == "__main__":
    main()
