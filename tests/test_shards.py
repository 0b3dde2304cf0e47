"""A bank sharded over workers or devices: exact sums merge into the single-process posterior, top-k lists
merge into the global top-k, and the merged certificate bounds the measured error."""

from __future__ import annotations

import pytest
import torch
from conftest import noised

from machines import ScoreMachine, alpha_sigma2, make_backend
from machines.posterior import ExactBackend, ShardedBackend
from patchbank import BucketKey, MemoryBank, dictionary_groups, patches_at, random_images


@pytest.fixture(scope="module")
def bank():
    return MemoryBank(random_images(40, (1, 10, 10), classes=2, seed=4), dedup=True)


@pytest.mark.parametrize("kind, P", [("bbELS", 3), ("ELS", 5), ("LS", 3), ("IS", None)])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_exact_machine_equals_unsharded(bank, kind, P, shards):
    exact = ScoreMachine(bank, kind, scales=P, backend=ExactBackend(prune=False))
    sharded = ScoreMachine(bank, kind, scales=P, backend=ShardedBackend(shards=shards, devices="cpu,cpu"))
    x = noised(bank.data, 0.3, 3, seed=1)
    for t in (0.9, 0.3, 0.05):
        torch.testing.assert_close(sharded(x, t), exact(x, t), rtol=0, atol=1e-12)
    assert sharded.backend.stats.summary()["error_bound"] == 0.0


def buckets(bank, x, P):
    return [(BucketKey("bbELS", P, "zeros", key, None), patches_at(x, locs, P, "zeros").flatten(0, 1))
            for key, locs in dictionary_groups(10, 10, P, "bbELS")]


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_topk_certificate_bounds_the_error(bank, shards):
    """Every answer kept (tol huge): each query's error against exact is at most 2ε (values in [−1, 1])."""
    backend = ShardedBackend(shards=shards, inner="topk", k=8, tol=1e300)
    exact = ExactBackend(prune=False)
    checked = 0
    for t in (0.05, 0.15, 0.4):
        a, s2 = alpha_sigma2(t)
        x = noised(bank.data, t, 2, seed=2)
        for bucket, q in buckets(bank, x, 3):
            backend.reset()
            got = backend.posterior(bank, bucket, q, a, s2)
            eps = torch.cat(backend.stats.eps)
            err = (got - exact.posterior(bank, bucket, q, a, s2)).abs().amax(1)
            assert (err <= 2 * eps + 1e-9).all(), float((err - 2 * eps).max())
            checked += int((eps < 1e-3).sum())
    assert checked > 0  # some answers are certified tightly, so the bound was tested where it bites


def test_sharded_topk_lists_merge_into_the_global_topk(bank):
    a, s2 = alpha_sigma2(0.2)
    x = noised(bank.data, 0.2, 2)
    bucket, q = buckets(bank, x, 3)[4]  # an interior bucket
    whole = bank.search(bucket, (q / a).float(), 8).neighbours
    for shards in (2, 3):
        merged = ShardedBackend(shards=shards, inner="topk", k=8).neighbours(bank, bucket, q, a)
        torch.testing.assert_close(merged.distances, whole.distances, rtol=1e-5, atol=1e-5)


def test_sharded_topk_machine_within_its_bound(bank):
    exact = ScoreMachine(bank, "bbELS", scales=3, backend=ExactBackend(prune=False))
    sharded = ScoreMachine(bank, "bbELS", scales=3, backend=make_backend("sharded:shards=3:inner=topk:k=16:tol=1e-4"))
    x = noised(bank.data, 0.1, 3, seed=3)
    got, want = sharded(x, 0.1), exact(x, 0.1)
    bound = sharded.backend.stats.summary()["error_bound"]
    assert bound is not None and bound <= 2e-4
    assert (got - want).abs().max() <= bound + 1e-12
    assert sharded.backend.guarantee == "certified"


def test_bad_sharded_options():
    for spec, why in [("sharded:shards=0", "shards"), ("sharded:inner=tail", "inner"), ("sharded:devices=", "device")]:
        with pytest.raises(ValueError, match=why):
            make_backend(spec)
