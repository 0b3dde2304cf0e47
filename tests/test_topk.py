"""The certified top-k backend against the exact backend on real MNIST banks."""

from __future__ import annotations

import pytest
import torch
from conftest import noised

from machines import ExactBackend, TopKBackend, alpha_sigma2
from machines.posterior import TopKStats
from patchbank import BankSpec, BucketKey, ImageData, MemoryBank, PatchBank, patches_at

TIMES = [0.05, 0.2, 0.5, 0.8, 1.0]


@pytest.fixture(scope="module")
def mnist(mnist_at) -> ImageData:
    return mnist_at(120)


@pytest.fixture(scope="module", params=["Flat", "IVF16,Flat"])
def bank(request, mnist, tmp_path_factory) -> PatchBank:
    path = tmp_path_factory.mktemp("topk") / request.param.replace(",", "_")
    return PatchBank.build(mnist, path, BankSpec(scales=[3, 5], rules=["bbELS"], index=request.param), progress=False)


def _queries(data: ImageData, key: BucketKey, t: float) -> torch.Tensor:
    x = noised(data, t, 2, seed=11)
    return patches_at(x, key.locations(data.shape[1], data.shape[2]), key.scale, key.padding).flatten(0, 1)


INTERIOR = BucketKey("bbELS", 5, "zeros", (2, 2, 2, 2))
EDGE = BucketKey("bbELS", 5, "zeros", (0, 2, 2, 2))  # the top row's strip: a small bucket


def found_kind(bank: PatchBank) -> str:
    return bank.index(INTERIOR).kind


def test_k_at_least_bucket_size_is_exact(bank, mnist):
    U = len(bank.unique_patches(EDGE).counts)
    q = _queries(mnist, EDGE, 0.3)
    a, s2 = alpha_sigma2(0.3)
    exact = ExactBackend().posterior(bank, EDGE, q, a, s2)
    topk = TopKBackend(k=U + 5, tol=float("inf"), nprobe=10**6, query_chunk=8)
    assert torch.allclose(topk.posterior(bank, EDGE, q, a, s2), exact, atol=1e-6, rtol=0)
    assert max(topk.stats.summary()["eps_max"], 0.0) < 1e-12


@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("k,nprobe", [(8, 1), (64, 4)])
def test_measured_error_never_exceeds_the_certificate(bank, mnist, t, k, nprobe):
    q = _queries(mnist, INTERIOR, t)
    a, s2 = alpha_sigma2(t)
    exact = ExactBackend().posterior(bank, INTERIOR, q, a, s2)
    topk = TopKBackend(k=k, tol=None, nprobe=nprobe)
    err = (topk.posterior(bank, INTERIOR, q, a, s2) - exact).abs().amax(1)
    eps = topk.stats.eps[0]
    assert topk.stats.certified
    assert (err <= 2 * eps + 1e-9).all(), f"certificate violated: max err/eps {(err / (2 * eps)).max()}"
    if t == 0.05 and k == 64 and found_kind(bank) == "flat":
        assert (eps < 1e-3).float().mean() > 0.5  # at late times the flat certificate is usually tight


@pytest.mark.parametrize("t", TIMES)
def test_fallback_bounds_every_pixel(bank, mnist, t):
    q = _queries(mnist, INTERIOR, t)
    a, s2 = alpha_sigma2(t)
    exact = ExactBackend().posterior(bank, INTERIOR, q, a, s2)
    topk = TopKBackend(k=32, tol=1e-4, nprobe=4)
    err = (topk.posterior(bank, INTERIOR, q, a, s2) - exact).abs().max()
    assert err <= 2e-4 + 1e-12


def test_memory_bank_torch_search_and_reopened_bank_agree(bank, mnist):
    q = _queries(mnist, INTERIOR, 0.2)
    a, s2 = alpha_sigma2(0.2)
    outs = [
        TopKBackend(k=16, tol=None, engine=engine).posterior(b, INTERIOR, q, a, s2)
        for b, engine in [(bank, "auto"), (PatchBank.open(bank.path), "auto"), (bank, "torch"), (MemoryBank(mnist), "torch")]
    ]
    if bank.index(INTERIOR).kind == "flat":  # exact search: every engine finds the same neighbours
        for o in outs[2:]:
            assert torch.allclose(o, outs[0], atol=1e-9, rtol=0)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[2], outs[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_torch_search_matches_cpu(mnist):
    bank = MemoryBank(mnist)
    q = _queries(mnist, INTERIOR, 0.2)
    a, s2 = alpha_sigma2(0.2)
    cpu = TopKBackend(k=16, tol=1e-4).posterior(bank, INTERIOR, q, a, s2)
    gpu = TopKBackend(k=16, tol=1e-4).posterior(bank, INTERIOR, q.cuda(), a, s2)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-9, rtol=0)


def test_the_ivf_bank_really_is_ivf_and_its_certificate_can_be_tight(bank, mnist):
    """An IVF spec builds an IVF index on the big bucket (never a silent Flat), and its certificate is not
    vacuous: probing every list it equals the Flat bound, tight for most pixels at a late time."""
    spec = bank.spec.index
    assert found_kind(bank) == ("ivf" if spec.startswith("IVF") else "flat")
    q = _queries(mnist, INTERIOR, 0.05)
    a, s2 = alpha_sigma2(0.05)
    nlist = bank.index(INTERIOR).index.nlist if found_kind(bank) == "ivf" else 1
    topk = TopKBackend(k=64, tol=None, nprobe=nlist)
    topk.posterior(bank, INTERIOR, q, a, s2)
    eps = topk.stats.eps[0]
    assert (eps < 1e-3).float().mean() > 0.5 and eps.median() < 1e-3
    if found_kind(bank) == "ivf":
        flat = TopKBackend(k=64, tol=None, engine="torch")
        flat.posterior(bank, INTERIOR, q, a, s2)
        same = (eps - flat.stats.eps[0]).abs() <= 1e-3 * flat.stats.eps[0].abs() + 1e-12  # up to float32 distance ties
        assert same.float().mean() > 0.98


def test_failing_ivf_queries_are_searched_again_with_more_lists(bank, mnist):
    """Queries whose IVF certificate fails are searched with 4× the lists per round: they certify at least
    what one list does and, probing up to every list, what Flat certifies; the answers stay within 2ε."""
    if found_kind(bank) != "ivf":
        pytest.skip("re-probing is for IVF indices")
    q = _queries(mnist, INTERIOR, 0.05)
    a, s2 = alpha_sigma2(0.05)
    exact = ExactBackend().posterior(bank, INTERIOR, q, a, s2)
    runs = {}
    for name, backend in {"once": TopKBackend(k=64, tol=None, nprobe=1, max_nprobe=1),
                          "again": TopKBackend(k=64, tol=None, nprobe=1),
                          "flat": TopKBackend(k=64, tol=None, engine="torch")}.items():
        err = (backend.posterior(bank, INTERIOR, q, a, s2) - exact).abs().amax(1)
        eps = backend.stats.eps[0]
        assert (err <= 2 * eps + 1e-9).all(), name
        runs[name] = ((eps <= 1e-4).float().mean(), backend.stats.summary()["reprobed_fraction"])
    assert runs["once"][1] == 0 and runs["again"][1] > 0
    assert runs["again"][0] >= runs["once"][0] and runs["again"][0] >= 0.98 * runs["flat"][0] > 0.3
    with pytest.raises(ValueError, match="max_nprobe"):
        TopKBackend(nprobe=8, max_nprobe=4)


@pytest.mark.parametrize("max_nprobe", [1, None])
def test_certificates_for_several_k_equal_one_search_per_k(bank, mnist, max_nprobe):
    """``certificates`` reads every k's ε from one search at the largest k; each equals what a search at that k gives,
    IVF lists probed again included, and a call records no statistics."""
    q = _queries(mnist, INTERIOR, 0.1)
    a, s2 = alpha_sigma2(0.1)
    ks = [4, 16, 64]
    topk = TopKBackend(tol=None, nprobe=1, max_nprobe=max_nprobe)
    spent = TopKStats()
    many = topk.certificates(bank, INTERIOR, q, a, s2, ks, stats=spent)
    assert topk.stats.queries == 0 and topk.stats.scanned == 0 and sorted(many) == ks
    assert spent.scanned >= q.shape[0] and spent.search_s > 0 and spent.bound_s > 0  # what it spent, where asked
    for k in ks:
        one = TopKBackend(k=k, tol=None, nprobe=1, max_nprobe=max_nprobe)
        one.posterior(bank, INTERIOR, q, a, s2)
        same = (many[k] - one.stats.eps[0]).abs() <= 1e-9 * one.stats.eps[0].abs() + 1e-12
        assert same.float().mean() > 0.99, k  # up to float32 distance ties at the k-th place
    assert (many[4] >= many[64] - 1e-12).float().mean() > 0.99  # more retrieved, less left out
    with pytest.raises(ValueError, match="k >= 1"):
        topk.certificates(bank, INTERIOR, q, a, s2, [0, 4])


def _violations(bank, q, a, s2, exact, **options) -> float:
    """Fraction of pixels whose measured error exceeds twice the certificate."""
    topk = TopKBackend(k=8, tol=None, nprobe=1, max_nprobe=1, **options)
    err = (topk.posterior(bank, INTERIOR, q, a, s2) - exact).abs().amax(1)
    return float((err > 2 * topk.stats.eps[0] + 1e-9).double().mean())


@pytest.mark.parametrize("t", [0.1, 0.2])
def test_the_rigour_check_catches_a_planted_wrong_bound(bank, mnist, monkeypatch, t):
    """The per-pixel check ``error ≤ 2ε`` has teeth: the true bounds pass it, and bounds with a planted mistake fail it —
    a cluster bound that forgets the radius (centre distance alone), an IVF bound that forgets the unprobed lists, a
    flat bound that forgets the patches not retrieved. A loose flat bound (every patch not retrieved at distance
    0) passes it, and the tightness check catches it. (Where
    the posterior is broad, as at t = 0.5, even a wrong bound exceeds 1 and no error can exceed it: the check bites where
    a bound claims to be tight.)"""
    from machines.posterior import topk as module

    q = _queries(mnist, INTERIOR, t)
    a, s2 = alpha_sigma2(t)
    exact = ExactBackend().posterior(bank, INTERIOR, q, a, s2)
    assert _violations(bank, q, a, s2, exact) == 0 and _violations(bank, q, a, s2, exact, bound="index") == 0

    true_cluster, true_neglected = module._cluster_bound, TopKBackend._neglected
    no_radius = lambda tree, *rest: true_cluster((*tree[:2], torch.zeros_like(tree[2]), tree[3]), *rest)  # noqa: E731
    monkeypatch.setattr(module, "_cluster_bound", no_radius)
    assert _violations(bank, q, a, s2, exact, bound="best") > 0
    monkeypatch.setattr(module, "_cluster_bound", true_cluster)

    def forgetful(self, found, rows, qa, d2, valid, counts, total, a, s2, m):
        if found.kind == "ivf":  # the probed lists only
            return true_neglected(self, found._replace(kind="flat"), rows, qa, d2, valid, counts,
                                  float(found.ivf.counts[found.probed[rows]].sum(1).max()), a, s2, m)
        return true_neglected(self, found, rows, qa, d2, valid, counts, float(counts.sum(1).max()), a, s2, m)

    monkeypatch.setattr(TopKBackend, "_neglected", forgetful)
    assert _violations(bank, q, a, s2, exact, bound="index") > 0
    monkeypatch.setattr(TopKBackend, "_neglected", true_neglected)

    def certified_at_late_time() -> float:  # the tightness check of the test above, on the Flat formula
        late = _queries(mnist, INTERIOR, 0.05)
        topk = TopKBackend(k=64, tol=None, engine="torch", bound="index")
        topk.posterior(bank, INTERIOR, late, *alpha_sigma2(0.05))
        return float((topk.stats.eps[0] < 1e-3).double().mean())

    assert certified_at_late_time() > 0.5
    true_beyond = module.beyond_kth  # loose: every patch not retrieved weighed as if at distance 0
    monkeypatch.setattr(module, "beyond_kth", lambda qa, dk2, a, s2, m: true_beyond(qa, torch.zeros_like(dk2), a, s2, m))
    assert _violations(bank, q, a, s2, exact, bound="index") == 0  # loose is still rigorous …
    assert certified_at_late_time() < 0.5  # … and the tightness check catches it


def test_a_search_counts_the_distances_it_computed(bank, mnist):
    """``SearchResult.scanned``: every (query, patch) pair for Flat and for torch search; for IVF, FAISS's count, which is
    the probed lists' members — all of them when every list is probed."""
    q = _queries(mnist, INTERIOR, 0.1)[:40]
    a, _ = alpha_sigma2(0.1)
    qa = (q / a).float()
    U = bank.unique_patches(INTERIOR).patches.shape[0]
    assert bank.search(INTERIOR, qa, 8, engine="torch").scanned == 40 * U
    if found_kind(bank) == "flat":
        assert bank.search(INTERIOR, qa, 8).scanned == 40 * U
        return
    index = bank.index(INTERIOR).index
    sizes = torch.tensor([index.invlists.list_size(j) for j in range(index.nlist)])
    one = bank.search(INTERIOR, qa, 8, nprobe=1)
    assert one.scanned == int(sizes[one.probed].sum()) < 40 * U
    assert bank.search(INTERIOR, qa, 8, nprobe=index.nlist).scanned == 40 * U
    topk = TopKBackend(k=8, tol=None, nprobe=1, max_nprobe=1)
    topk.posterior(bank, INTERIOR, q, a, alpha_sigma2(0.1)[1])
    assert topk.stats.summary()["scanned_per_query"] == one.scanned / 40


def test_the_exact_eps_bounds_every_certificate_from_below(bank, mnist):
    """bench_certificate.py's exact ε of the k nearest (the most any certificate of them can certify) equals a brute force
    over every patch with its repetitions, and no certificate, Flat or IVF, claims less than it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_certificate import exact_eps

    from patchbank import to_model_range

    t, ks = 0.1, [4, 16, 64]
    q = _queries(mnist, INTERIOR, t)[::7]
    a, s2 = alpha_sigma2(t)
    exact = exact_eps(bank, INTERIOR, q, a, s2, ks, chunk=5)
    every = patches_at(to_model_range(mnist.images, torch.float64), INTERIOR.locations(*mnist.shape[1:]), 5,
                       "zeros").flatten(0, 1)  # [N·L, D], every repetition its own entry
    uniques, inverse = torch.unique(every, dim=0, return_inverse=True)
    for k in ks:
        brute = []
        for x in q / a:
            nearest = (x - uniques).pow(2).sum(1).argsort()[:k]
            logit = -(a * a / (2 * s2)) * (x - every).pow(2).sum(1)
            w = (logit - logit.max()).exp()
            kept = torch.isin(inverse, nearest)
            brute.append(w[~kept].sum() / w[kept].sum())
        torch.testing.assert_close(exact[k], torch.stack(brute), rtol=1e-6, atol=1e-12)
    certified = TopKBackend(tol=None, nprobe=1).certificates(bank, INTERIOR, q, a, s2, ks)
    for k in ks:
        assert (certified[k] >= exact[k] * (1 - 1e-6) - 1e-12).all(), k
    assert (exact[4] >= exact[16]).all() and (exact[16] >= exact[64]).all()  # more retrieved, less left out
    assert (exact[64] < certified[64]).any()  # the certificate is a bound, not the exact value
