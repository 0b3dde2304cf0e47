"""A bank in shards served by Ray actors on a local multi-node cluster (``ray.cluster_utils.Cluster``, one CPU
per node): the merged sums equal the single-bank exact sums to 1e-12 (grey, RGB, conditional), top-k shards
stay within their merged certificate, a
killed shard actor is replaced and answers the same, a shard from another bank is refused, and a call never
returns a partial merge."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import noised, put_shard

from machines import ScoreMachine, make_backend
from patchbank import BankError, BankSpec, PatchBank, ShardedBank, random_images

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")
pytestmark = pytest.mark.slow
NODES = 3
SPEC = BankSpec(scales=[3, 5], index=None, labels=True, leaf_size=64)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(NODES - 1):
        made.add_node(num_cpus=1)
    ray.init(address=made.address, include_dashboard=False, log_to_driver=False)
    yield made
    ray.shutdown()
    made.shutdown()


@pytest.fixture(scope="module")
def data():
    return {C: random_images(45, (C, 8, 8), classes=3, seed=C) for C in (1, 3)}


@pytest.fixture(scope="module")
def banks(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-shards")
    return {C: (PatchBank.build(d, root / f"whole{C}", SPEC, progress=False), ShardedBank.build(d, root / f"sharded{C}", SPEC, NODES))
            for C, d in data.items()}


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("inner", ["exact", "topk"])
def test_sharded_actors_equal_the_single_bank(cluster, banks, data, C, conditional, inner):
    whole, sharded = banks[C]
    x = noised(data[C], 0.3, 2, seed=C)
    labels = data[C].labels[:2].clone() if conditional else None
    backend = make_backend(f"sharded:shards={NODES}:placement=ray:inner={inner}:k=8")
    for P in (3, 5):
        backend.reset()
        got = ScoreMachine(sharded, "bbELS", scales=P, conditional=conditional, backend=backend)(x, 0.3, labels)
        want = ScoreMachine(whole, "bbELS", scales=P, conditional=conditional)(x, 0.3, labels)
        bound = backend.stats.summary()["error_bound"]  # 0 for exact sums; top-k: its certificate, 2·max accepted ε
        assert (got - want).abs().max() <= bound + 1e-12
        assert inner == "topk" or bound == 0
    nodes = {ray.get(actor.node.remote()) for actor in backend._servers[str(sharded.path)]}
    assert len(nodes) == NODES  # one shard per node
    assert backend.stats.shard_compute_s > 0


def test_ray_placement_equals_local_placement(cluster, banks, data):
    _, sharded = banks[1]
    x = noised(data[1], 0.5, 3, seed=9)
    here = ScoreMachine(sharded, "bbELS", scales=3, backend=f"sharded:shards={NODES}")(x, 0.5)
    there = ScoreMachine(sharded, "bbELS", scales=3, backend=f"sharded:shards={NODES}:placement=ray")(x, 0.5)
    assert torch.equal(here, there)  # the same sums in the same order: bit for bit


def test_a_killed_shard_actor_is_replaced_with_the_same_answer(cluster, banks, data):
    whole, sharded = banks[1]
    x = noised(data[1], 0.3, 2, seed=4)
    backend = make_backend(f"sharded:shards={NODES}:placement=ray")
    machine = ScoreMachine(sharded, "bbELS", scales=3, backend=backend)
    first = machine(x, 0.3)
    actor = backend._servers[str(sharded.path)][1]
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    time.sleep(0.5)
    torch.testing.assert_close(machine(x, 0.3), first, rtol=0, atol=0)
    assert ray.get(actor.pid.remote()) > 0  # the same handle, a new process


def test_a_shard_from_another_bank_is_refused(cluster, banks, tmp_path):
    _, one = banks[1]
    _, other = banks[3]
    copy = Path(shutil.copytree(one.path, tmp_path / "copy"))
    put_shard(copy, "shard-01", other.path)
    with pytest.raises(BankError, match="shard-01 is not the shard this bank was built with"):
        ShardedBank.open(copy)


def test_a_shard_that_cannot_answer_fails_the_call_never_a_partial_merge(cluster, banks, data, tmp_path):
    _, sharded = banks[1]
    copy = Path(shutil.copytree(sharded.path, tmp_path / "copy"))
    opened = ShardedBank.open(copy)  # intact when opened
    put_shard(copy, "shard-02", banks[3][1].path)  # replaced behind the caller's back
    machine = ScoreMachine(opened, "bbELS", scales=3, backend=f"sharded:shards={NODES}:placement=ray")
    with pytest.raises(RuntimeError, match="no partial merge"):
        machine(noised(data[1], 0.3, 1), 0.3)


def test_shards_are_built_on_the_cluster_and_equal_a_build_here(cluster, banks, data, tmp_path):
    from pipelines.executors import RayExecutor

    executor = RayExecutor()
    built = ShardedBank.build(data[1], tmp_path / "on-ray", SPEC, NODES,
                              lambda fn, job, items, done: executor.map(fn, job, items, done, progress=False))
    assert built.record["shards"] == banks[1][1].record["shards"]  # the same shards, fingerprints and digests
