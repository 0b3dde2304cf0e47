"""Cluster summaries: moments against brute force, certified bounds against exact."""

from __future__ import annotations

import pytest
import torch

from machines import ExactBackend, ScoreMachine, SummaryBackend, alpha_sigma2
from machines.posterior import cluster_moments
from patchbank import MemoryBank, to_model_range
from patchbank.geometry import BucketKey, centre_index, patches_at

H = 16


@pytest.fixture(scope="module")
def mnist(mnist_at):
    return mnist_at(150, resize=H)


@pytest.fixture(scope="module")
def bank(mnist):
    return MemoryBank(mnist, dedup=True)


def _queries(mnist, bucket: BucketKey, t: float, seed: int = 0):
    a, s2 = alpha_sigma2(t)
    x = to_model_range(mnist.images[-4:], torch.float64)
    xt = a * x + s2**0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return patches_at(xt, bucket.locations(H, H), bucket.scale, "zeros").flatten(0, 1), a, s2


def test_cluster_moments_equal_brute_force(bank):
    bucket = BucketKey("ELS", 3, "zeros", (), None)
    clusters = bank.clustered(bucket, 64)
    centre = centre_index(1, 3)
    mo = cluster_moments(clusters, centre)
    for k in (0, clusters.n_clusters // 2, clusters.n_clusters - 1):
        s, e = clusters.offsets[k].item(), clusters.offsets[k + 1].item()
        p = clusters.patches[s:e].double() / 255
        n = clusters.log_counts[s:e].exp()
        mu = (n[:, None] * p).sum(0) / n.sum()
        d = p - mu
        v = p[:, centre]
        torch.testing.assert_close(mo.counts[k], n.sum())
        torch.testing.assert_close(mo.means[k], mu)
        torch.testing.assert_close(mo.radii[k], d.norm(dim=1).max())
        torch.testing.assert_close(mo.spread[k], (n * d.pow(2).sum(1)).sum())
        torch.testing.assert_close(mo.value_moments[k], ((n[:, None] * v).T @ d))
        torch.testing.assert_close(mo.value_spread[k], (n[:, None] * v * d.pow(2).sum(1, keepdim=True)).sum(0))
        torch.testing.assert_close((n[:, None] * d).sum(0), torch.zeros_like(mu), atol=1e-9, rtol=0)  # Σn·δ = 0


@pytest.mark.parametrize("P,key", [(3, None), (5, (2, 2, 0, 2))])
def test_measured_error_never_exceeds_the_certified_bound(mnist, bank, P, key):
    """Every pixel at every t: |summarised − exact| ≤ its bound; summaries, drops and expansions all occur."""
    bucket = BucketKey("bbELS", P, "zeros", key or (P // 2,) * 4, None)
    backend = SummaryBackend(tol=1e-2, leaf_size=32, query_chunk=400)  # two query blocks
    seen = {"summarised": 0, "dropped": 0}
    for t in (1.0, 0.95, 0.8, 0.6, 0.3, 0.1, 0.05):
        q, a, s2 = _queries(mnist, bucket, t)
        exact = ExactBackend(prune=False, kernel="torch").posterior(bank, bucket, q, a, s2)
        backend.stats.reset()
        means, bound = backend.summarised(bank, bucket, q, a, s2)
        err = (means - exact).abs().amax(1)
        assert (err <= bound + 1e-12).all(), (t, (err - bound).max())
        st = backend.stats
        assert st.summarised + st.dropped + st.expanded == st.pairs == q.shape[0] * bank.clustered(bucket, 32).n_clusters
        seen["summarised"] += st.summarised
        seen["dropped"] += st.dropped
        if t == 1.0:
            assert st.summarised > 0.5 * st.pairs  # at the highest noise most clusters are one term each
    assert seen["summarised"] and seen["dropped"]


def test_backend_answers_within_tol_with_exact_fallback(mnist, bank):
    bucket = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1), None)
    for tol in (1e-2, 1e-4):
        backend = SummaryBackend(tol=tol, leaf_size=32)
        for t in (1.0, 0.7, 0.2):
            q, a, s2 = _queries(mnist, bucket, t, seed=3)
            exact = ExactBackend(prune=False).posterior(bank, bucket, q, a, s2)
            out = backend.posterior(bank, bucket, q, a, s2)
            assert (out - exact).abs().max() <= tol
            assert backend.stats.bounds[-1].max() <= tol


def test_pixels_whose_bound_exceeds_tol_are_recomputed_exactly(mnist, bank, monkeypatch):
    bucket = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1), None)
    q, a, s2 = _queries(mnist, bucket, 0.5)
    backend = SummaryBackend(tol=1e-3, leaf_size=32)
    honest = backend.summarised(bank, bucket, q, a, s2)

    def spoiled(*args):  # every third pixel: a wrong answer with a bound above tol
        means, bound = honest[0].clone(), honest[1].clone()
        means[::3] += 0.5
        bound[::3] = 2e-3
        return means, bound

    monkeypatch.setattr(backend, "summarised", spoiled)
    out = backend.posterior(bank, bucket, q, a, s2)
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)
    assert (out - exact).abs().max() <= 1e-3
    assert backend.stats.fallback == len(range(0, q.shape[0], 3))


def test_streamed_and_image_buckets_are_exact(mnist):
    bank = MemoryBank(mnist, dedup=True, materialise_max=3)
    x = to_model_range(mnist.images[:1], torch.float64)
    for kind, P in (("bbELS", 5), ("IS", None)):
        backend = SummaryBackend()
        out = ScoreMachine(bank, kind, scales=P, backend=backend)(x, 0.9)
        ref = ScoreMachine(bank, kind, scales=P, backend=ExactBackend())(x, 0.9)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        assert backend.stats.exact_buckets == backend.stats.queries > 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="tol"):
        SummaryBackend(tol=0)
    with pytest.raises(ValueError, match="leaf_size"):
        SummaryBackend(leaf_size=0)
    with pytest.raises(ValueError, match="query_chunk"):
        SummaryBackend(query_chunk=0)
