"""Every backend × grey and colour × unconditional and conditional × memory, Flat and IVF banks, bucket by
bucket against an unpruned exact sum, each within its own guarantee: per-pixel error ≤ 2ε for top-k
answers kept, ≤ the certified bound for summaries, within 4 reported standard errors for ≥ 90% of
sampled answers; exact answers to round-off. Plus batch invariance at the call and the bucket level."""

from __future__ import annotations

import pytest
import torch
from conftest import noised

from machines import BACKENDS, ExactBackend, ScoreMachine, alpha_sigma2, make_backend
from patchbank import BankSpec, BucketKey, ImageData, MemoryBank, PatchBank, dictionary_groups, load_npz, patches_at, resize_uint8

H = 10
T = 0.3
SPECS = {
    "exact": "exact",
    "topk": "topk:k=24:tol=1e-3",
    "tail": "tail:k=16:samples=512:min_ess=16",
    "summary": "summary:tol=1e-3:leaf_size=16",
    "auto": "auto:samples=256:max_samples=1024:se_tol=0.05:min_ess=16",
    "sharded": "sharded:shards=3:inner=topk:k=8:tol=1e-3",
}


def test_the_matrix_covers_every_backend():
    assert set(SPECS) == set(BACKENDS)


@pytest.fixture(scope="module")
def images(datasets_dir, mnist_at) -> dict[int, ImageData]:
    """40 MNIST (C = 1) and 40 CIFAR10 (C = 3) training images at 10×10."""
    cifar = load_npz(datasets_dir / "cifar10_train4000.npz").subset(40)
    colour = ImageData(resize_uint8(cifar.images, (H, H)), cifar.labels, "cifar10")
    return {1: mnist_at(40, resize=H), 3: colour}


@pytest.fixture(scope="module")
def banks(images, tmp_path_factory) -> dict:
    out = {}
    for C, data in images.items():
        out[C, "memory"] = MemoryBank(data, dedup=True)
        for index in ("Flat", "IVF4,Flat"):
            path = tmp_path_factory.mktemp("matrix") / f"c{C}-{index.replace(',', '_')}"
            out[C, index] = PatchBank.build(data, path, BankSpec(scales=[3], labels=True, index=index, leaf_size=64), progress=False)
    return out


def _buckets(bank, data: ImageData, conditional: bool):
    labels = [int(data.labels[0]), int(data.labels[1])] if conditional else [None]
    for label in labels:
        for key, locs in dictionary_groups(H, H, 3, "bbELS"):
            yield BucketKey("bbELS", 3, "zeros", key, label), locs


@pytest.mark.parametrize("where", ["memory", "Flat", "IVF4,Flat"])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("kind", list(SPECS))
def test_backend_answers_within_its_guarantee(images, banks, kind, C, conditional, where):
    data, bank = images[C], banks[C, where]
    if where != "memory":  # the index actually built: IVF wherever a bucket has ≥ 2·39 distinct patches to train it
        for b, _ in _buckets(bank, data, conditional):
            ivf = "IVF" in where and bank.unique_patches(b).patches.shape[0] // 39 >= 2
            assert bank.index(b).kind == ("ivf" if ivf else "flat"), b
        assert "IVF" not in where or bank.index(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))).kind == "ivf"
    a, s2 = alpha_sigma2(T)
    x = noised(data, T, 2, seed=C)
    exact = ExactBackend(prune=False)
    within, sampled = 0, 0
    for bucket, locs in _buckets(bank, data, conditional):
        q = patches_at(x, locs, 3, "zeros").flatten(0, 1)
        want = exact.posterior(bank, bucket, q, a, s2)
        backend = make_backend(SPECS[kind])
        if kind == "tail":
            est = backend.estimate(bank, bucket, q, a, s2)
            got, se, drawn = est.means, est.se, ~est.log_z.isnan()  # log Ẑ is NaN where the answer is exact
        elif kind == "auto":
            got, se, drawn = backend.sampled(bank, bucket, q, a, s2)  # the answers the policy keeps from its draws
            got = torch.where(drawn[:, None], got, want)
        else:
            got = backend.posterior(bank, bucket, q, a, s2)
        assert got.shape == want.shape == (q.shape[0], C)
        err = (got.double() - want).abs().amax(1)
        if kind == "exact":
            assert err.max() <= 1e-12
        elif kind in ("topk", "sharded"):
            eps = backend.stats.eps[-1].double()
            kept = eps <= backend.tol
            assert (err[kept] <= 2 * eps[kept] + 1e-12).all() and (err[~kept] <= 1e-12).all()
        elif kind == "summary":
            assert err.max() <= backend.tol + 1e-12 and err.max() <= backend.stats.summary()["error_bound"] + 1e-12
        else:
            within += int((err[drawn] <= 4 * se[drawn] + 1e-12).sum())
            sampled += int(drawn.sum())
            assert (err[~drawn] <= 1e-12).all()
    if kind in ("tail", "auto"):
        assert sampled > 0 and within >= 0.9 * sampled, (within, sampled)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("C", [1, 3])
def test_a_call_does_not_depend_on_its_batch(images, banks, kind, C):
    """``machine(x[:1]) == machine(x)[:1]`` for every backend, conditional, on the disk bank."""
    data = images[C]
    x = noised(data, T, 3, seed=7)
    labels = data.labels[:3].clone()
    machine = ScoreMachine(banks[C, "Flat"], "bbELS", 3, conditional=True, backend=SPECS[kind])
    whole = machine(x, T, labels)
    torch.testing.assert_close(machine(x[:1], T, labels[:1]), whole[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(machine(x[2:], T, labels[2:]), whole[2:], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def graph_banks(images, tmp_path_factory) -> dict:
    return {C: PatchBank.build(data, tmp_path_factory.mktemp("hnsw") / f"c{C}", BankSpec(scales=[3], index="HNSW8", leaf_size=64),
                               progress=False) for C, data in images.items()}


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("t", [0.05, 1.0])
def test_the_cluster_bound_is_rigorous_and_never_looser(images, banks, graph_banks, C, t):
    """Per pixel, for Flat, IVF and a graph index: the certificate with the cluster bound (``bound="best"``)
    still bounds the measured error by 2ε, is never above the index's own, and certifies the graph index."""
    data = images[C]
    a, s2 = alpha_sigma2(t)
    x = noised(data, t, 2, seed=5)
    hnsw = graph_banks[C]
    bucket = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))
    q = patches_at(x, bucket.locations(H, H), 3, "zeros").flatten(0, 1)
    want = ExactBackend(prune=False).posterior(banks[C, "memory"], bucket, q, a, s2)
    for bank in (banks[C, "Flat"], banks[C, "IVF4,Flat"], hnsw):
        eps = {}
        for bound in ("index", "best"):
            topk = make_backend(f"topk:k=8:tol=none:nprobe=1:bound={bound}")
            err = (topk.posterior(bank, bucket, q, a, s2) - want).abs().amax(1)
            eps[bound] = topk.stats.eps[-1]
            assert (err <= 2 * eps[bound] + 1e-12).all(), (bound, bank.index_spec)
        assert (eps["best"] <= eps["index"]).all()
        assert topk.stats.certified and topk.guarantee == "certified"
