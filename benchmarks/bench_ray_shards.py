"""A sharded bank's step on a simulated Ray cluster: each shard's own compute, the merge and transport overhead,
and a projection of the measured throughput to ImageNet-64.

1. Builds (or reuses) a bank of the first ``--n-train`` MNIST images (all of them by default) in ``--shards``
   contiguous parts at ``--bank`` (scale ``--P``, no index) and, with ``--whole``, the same images as one bank.
2. Starts a local ``ray.cluster_utils.Cluster`` of ``--nodes`` one-CPU nodes and runs one bbELS step at
   ``--t`` on ``--images`` noised test images through ``sharded:placement=ray`` (one actor per shard, placed one
   per node), after a warm-up call that opens every shard. Prints per call: the caller's wall time, each shard's
   own seconds (the slowest is what a parallel call waits for), the merge's seconds, the round trips (one per
   machine pass: every bucket in one request to each shard), and the overhead = wall − slowest shard
   (transport, scheduling, merge), as a fraction of the slowest shard's compute.
   The same step with ``placement=local`` (every shard here, one after another) and, with ``--whole``, the
   exact backend on the whole bank give the answers to compare (max |Δ|) and the shards' total work.
3. Per-shard throughput in (query, distinct patch) pairs per second, and the ImageNet-64 projection of
   ``docs/scaling.md`` from it (``--project``).

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_ray_shards.py --shards 4 --nodes 4 --P 5 --whole
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from machines import ScoreMachine, alpha_sigma2, make_backend
from patchbank import BankSpec, PatchBank, ShardedBank, load_dataset, to_model_range


def noised_test(n: int, t: float, resize: int) -> torch.Tensor:
    test = load_dataset("mnist", split="test", resize=resize, limit=n)
    a, s2 = alpha_sigma2(t)
    g = torch.Generator().manual_seed(0)
    x0 = to_model_range(test.images, torch.float64)
    return a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)


def timed(machine: ScoreMachine, x: torch.Tensor, t: float) -> tuple[torch.Tensor, float, dict]:
    machine.backend.reset()
    start = time.perf_counter()
    out = machine(x, t)
    return out, time.perf_counter() - start, machine.backend.stats.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=0, help="first N MNIST images (0: all 60,000)")
    p.add_argument("--resize", type=int, default=32)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--P", type=int, default=5)
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bank", default=None, help="where the sharded bank is built (default outputs/bench_shards/...)")
    p.add_argument("--whole", action="store_true", help="also build the unsharded bank and time the exact backend on it")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    data = load_dataset("mnist", resize=args.resize, limit=args.n_train or None)
    spec = BankSpec(scales=[args.P], index=None)
    root = Path(args.bank or f"outputs/bench_shards/mnist{len(data)}-P{args.P}")
    start = time.perf_counter()
    sharded = ShardedBank.build(data, root / f"s{args.shards}", spec, args.shards)
    print(f"sharded bank: {len(data)} images in {args.shards} shards, ready in {time.perf_counter() - start:.1f} s")
    x = noised_test(args.images, args.t, args.resize)
    result: dict = {"images": len(data), "shards": args.shards, "nodes": args.nodes, "P": args.P, "t": args.t,
                    "queries": x.shape[0] * x.shape[2] * x.shape[3]}

    local = ScoreMachine(sharded, "bbELS", scales=args.P, backend=f"sharded:shards={args.shards}")
    timed(local, x, args.t)  # opens the shards and builds their clusters
    here, here_s, here_stats = timed(local, x, args.t)
    result["local"] = {"seconds": here_s, **here_stats}
    print(f"placement=local: {here_s:.2f} s (shards' own {here_stats['shard_compute_s']:.2f} s, merge {here_stats['merge_s']:.4f} s)")
    del local  # its shards' tables: the Ray actors hold their own
    gc.collect()
    if args.whole:
        whole = PatchBank.build(data, root / "whole", spec, progress=False)
        exact = ScoreMachine(whole, "bbELS", scales=args.P)
        timed(exact, x, args.t)
        ref, ref_s, ref_stats = timed(exact, x, args.t)
        result["whole"] = {"seconds": ref_s, "max_abs_diff_local": float((here - ref).abs().max()), **ref_stats}
        print(f"exact on the whole bank: {ref_s:.2f} s; sharded local against it: max |Δ| {result['whole']['max_abs_diff_local']:.2e}")
        del exact, whole
        gc.collect()

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        backend = make_backend(f"sharded:shards={args.shards}:placement=ray")
        remote = ScoreMachine(sharded, "bbELS", scales=args.P, backend=backend)
        timed(remote, x, args.t)  # actors start and open their shards
        nodes = {ray.get(a.node.remote()) for a in backend._servers[str(sharded.path)]}
        calls = []
        for _ in range(args.repeats):
            there, wall, stats = timed(remote, x, args.t)
            overhead = wall - stats["shard_slowest_s"]
            calls.append({"seconds": wall, "overhead_s": overhead, "overhead_fraction": overhead / stats["shard_slowest_s"], **stats})
            print(f"placement=ray on {len(nodes)} nodes: {wall:.2f} s; shards' own {stats['shard_compute_s']:.2f} s in all, slowest "
                  f"{stats['shard_slowest_s']:.2f} s; merge {stats['merge_s']:.4f} s; overhead {overhead:.3f} s = "
                  f"{100 * overhead / stats['shard_slowest_s']:.1f}% of the slowest shard; {stats['round_trips']} round trip(s); "
                  f"max |Δ| vs local {float((there - here).abs().max()):.1e}")
        result["ray"] = calls
        result["actor_nodes"] = len(nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
    info = [s.get("scales", {}).get(args.P, {}) for s in sharded.info()["shards"]]
    distinct = sum(i.get("distinct") or i.get("patches") or 0 for i in info)
    result["pairs_all"] = result["queries"] * distinct
    best = min(calls, key=lambda c: c["shard_compute_s"])
    result["pairs_visited"] = best["shard_pairs"]
    result["visited_pairs_per_s_per_shard"] = best["shard_pairs"] / best["shard_compute_s"]
    print(f"{result['pairs_all']:.3g} (query, distinct patch) pairs in the step, {best['shard_pairs']:.3g} visited after "
          f"pruning ({100 * best['shard_pairs'] / result['pairs_all']:.1f}%): {result['visited_pairs_per_s_per_shard']:.3g} "
          "visited pairs/s per one-CPU shard")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
