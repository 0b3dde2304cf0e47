"""Seed-parallel throughput of the executors, and the per-task overhead they add.

1. Throughput, seeds per hour, of ``patchbank sample``'s work (``pipelines.sampling.sample_seeds``,
   one seed per task) with the given backend on the first ``--n-train`` MNIST images (distinct-patch
   tables up to ``--materialise-max``, built by each worker; larger scales streamed), for
   ``serial`` (all seeds in one batch on torch's default threads), ``processes:2`` and ``ray`` with
   2 one-thread workers; each executor's samples are checked against the serial run.
2. Overhead per task: ``--tasks`` no-op tasks carrying the same shared payload (the machine and
   its bank), on ``processes:2`` and on a simulated multi-node Ray cluster
   (``ray.cluster_utils.Cluster`` with ``--nodes`` one-CPU nodes on this machine), less the time
   the tasks' work takes.
3. The expected wall time of ``--plan-seeds`` seeds on 4 and 16 nodes of ``--cores`` cores each:
   ``ceil(seeds / workers) · per_seed + seeds · overhead / workers + startup``, from the numbers above.

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_executors.py --n-train 10000 --seeds 4 --steps 10
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from machines import ScoreMachine, reference_schedule
from patchbank import MemoryBank, load_dataset
from pipelines.executors import ProcessExecutor, RayExecutor, SerialExecutor, chunks
from pipelines.sampling import _Sampling, sample_seeds


def noop(job: _Sampling, seed: int) -> int:
    """A task with no work but the shared payload's transfer (kept per worker after the first)."""
    return seed


def timed_map(executor, fn, job, items) -> tuple[float, dict]:
    got: dict = {}
    start = time.perf_counter()
    executor.map(fn, job, items, lambda item, r: got.__setitem__(tuple(item) if isinstance(item, list) else item, r), progress=False)
    return time.perf_counter() - start, got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.add_argument("--materialise-max", type=int, default=7,
                   help="distinct-patch tables up to this P (each worker builds its own: at 10,000 images all scales take ~14 GB)")
    p.add_argument("--batch", type=int, default=1, help="seeds per task on the parallel executors")
    p.add_argument("--serial-batch", type=int, default=None, help="seeds per batch on serial (default: all at once)")
    p.add_argument("--executors", default="serial,processes,ray", help="which to measure (serial always runs: the reference)")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-task overhead and the projection")
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--plan-seeds", type=int, default=100)
    p.add_argument("--cores", type=int, default=16)
    args = p.parse_args()

    data = load_dataset("mnist", resize=32, limit=args.n_train)

    def fresh() -> _Sampling:
        """A machine with nothing built yet: every executor's workers start from the images alone."""
        schedule = reference_schedule("MNIST_ResNet_zeros", "calibrated")
        machine = ScoreMachine(MemoryBank(data, materialise_max=args.materialise_max), "bbELS", scales=schedule, backend=args.backend)
        return _Sampling(machine, args.steps, tuple(data.shape), None)

    seeds = list(range(args.seeds))
    print(f"MNIST {args.n_train} images (bank in memory, tables built by each worker), 32x32, bbELS MNIST_ResNet_zeros, "
          f"backend {args.backend}, tables up to P={args.materialise_max}, {args.steps} steps, "
          f"{args.seeds} seeds, torch {torch.__version__}, {torch.get_num_threads()} threads by default")

    rows = []
    sb = args.serial_batch or len(seeds)
    serial_s, serial = timed_map(SerialExecutor(), sample_seeds, fresh(), chunks(seeds, sb))
    reference = torch.cat([serial[tuple(c)] for c in chunks(seeds, sb)])
    rows.append((f"serial ({sb} seed(s) per batch)", serial_s, 0.0))
    chosen = args.executors.split(",")
    for kind, name, ex in (("processes", f"processes:2 (1 thread each, {args.batch} seed(s) per task)", ProcessExecutor(2, threads=1)),
                           ("ray", f"ray, 2 workers (1 thread each, {args.batch} seed(s) per task)", RayExecutor(num_cpus=2))):
        if kind not in chosen:
            continue
        seconds, got = timed_map(ex, sample_seeds, fresh(), chunks(seeds, args.batch))
        mine = torch.cat([got[tuple(c)] for c in chunks(seeds, args.batch)])
        rows.append((name, seconds, float((mine - reference).abs().max())))
    print("\n| executor | wall s | seeds/hour | vs serial | max abs diff vs serial |\n|---|---:|---:|---:|---:|")
    for name, seconds, diff in rows:
        print(f"| {name} | {seconds:.1f} | {3600 * args.seeds / seconds:.1f} | {serial_s / seconds:.2f}x | {diff:.1e} |")
    print(f"peak memory: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB, "
          f"largest worker process {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.1f} GB")

    if args.no_overhead:
        return
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    per_seed = serial_s / args.seeds
    job = fresh()
    print(f"\nper-task overhead ({args.tasks} no-op tasks carrying the machine and its {args.n_train}-image bank):")
    over = {}
    start = time.perf_counter()
    ProcessExecutor(2, threads=1).map(noop, job, [0], lambda i, r: None, progress=False)
    startup_p = time.perf_counter() - start
    seconds, _ = timed_map(ProcessExecutor(2, threads=1), noop, job, list(range(args.tasks)))
    over["processes:2"] = (seconds - startup_p) / args.tasks
    print(f"  processes:2: start-up {startup_p:.1f} s (spawn, import, payload), then {1e3 * over['processes:2']:.2f} ms per task")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(cluster.address)
    start = time.perf_counter()
    ex.map(noop, job, list(range(args.nodes)), lambda i, r: None, progress=False)
    startup_r = time.perf_counter() - start
    seconds, _ = timed_map(ex, noop, job, list(range(args.tasks)))
    over["ray"] = seconds / args.tasks
    print(f"  ray, simulated cluster of {args.nodes} one-CPU nodes: first round {startup_r:.1f} s, "
          f"then {1e3 * over['ray']:.2f} ms per task (each map also puts the payload once)")
    ray.shutdown()
    cluster.shutdown()

    print(f"\nexpected wall time of {args.plan_seeds} seeds at {per_seed:.1f} s per seed per {torch.get_num_threads()}-thread worker "
          f"(this machine's serial rate), {args.cores} cores per node as {args.cores // 2} two-thread workers:")
    for nodes in (1, 4, 16):
        workers = nodes * (args.cores // 2)
        wall = math.ceil(args.plan_seeds / workers) * per_seed + args.plan_seeds * over["ray"] / workers + startup_r
        print(f"  {nodes:>2} node(s), {workers:>3} workers: {wall / 60:.1f} min ({3600 * args.plan_seeds / wall:.0f} seeds/hour)")


if __name__ == "__main__":
    main()
