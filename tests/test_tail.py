"""Head + sampled tail backend against the exact backend on a small real bank ."""

from __future__ import annotations

import pytest
import torch

from machines import ExactBackend, SampledTailBackend, alpha_sigma2
from patchbank import MemoryBank, to_model_range
from patchbank.geometry import BucketKey, patches_at


@pytest.fixture(scope="module")
def mnist(mnist_at):
    return mnist_at(60, resize=12)


@pytest.fixture(scope="module")
def bank(mnist):
    return MemoryBank(mnist, dedup=True)


def _queries(mnist, t: float, P: int = 3, n_img: int = 4, seed: int = 0) -> torch.Tensor:
    a, s2 = alpha_sigma2(t)
    x = to_model_range(mnist.images[-n_img:], torch.float64)  # images also in the bank; noise makes them queries
    xt = a * x + s2**0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    key = BucketKey("bbELS", P, "zeros", (P // 2,) * 4, None)
    return patches_at(xt, key.locations(12, 12), P, "zeros").flatten(0, 1), key


def test_head_covering_the_bucket_is_exact(bank, mnist):
    q, key = _queries(mnist, 0.4)
    a, s2 = alpha_sigma2(0.4)
    est = SampledTailBackend(k=10**6, samples=16).estimate(bank, key, q, a, s2)
    exact = ExactBackend().posterior(bank, key, q, a, s2)
    torch.testing.assert_close(est.means, exact, rtol=0, atol=1e-12)
    assert (est.se == 0).all()


@pytest.mark.parametrize("t", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("k,proposal", [(0, "count"), (16, "count")])
def test_errors_are_within_a_few_reported_standard_errors(bank, mnist, t, k, proposal):
    """The regime the sampled tail is for: broad posteriors, draws of training patches. (At late
    times a few unseen heavy patches make the sample SE optimistic — there the top-k certificate
    applies; a uniform proposal over distinct patches misses high-count patches the same way.)"""
    q, key = _queries(mnist, t)
    a, s2 = alpha_sigma2(t)
    backend = SampledTailBackend(k=k, samples=2048, proposal=proposal, seed=3)
    est = backend.estimate(bank, key, q, a, s2)
    exact = ExactBackend().posterior(bank, key, q, a, s2)
    err = (est.means - exact).abs().amax(1)
    sampled = est.se > 0  # the rest fell back to exact (low effective sample size)
    assert (err[~sampled] < 1e-12).all()
    assert backend.stats.fallback == (~sampled).sum()
    if sampled.any():
        assert (err[sampled] <= 4 * est.se[sampled] + 1e-12).double().mean() >= 0.9, (err / est.se.clamp_min(1e-300))[sampled]
    # deterministic given the seed, different for another seed
    again = SampledTailBackend(k=k, samples=2048, proposal=proposal, seed=3).estimate(bank, key, q, a, s2)
    assert torch.equal(again.means, est.means)
    other = SampledTailBackend(k=k, samples=2048, proposal=proposal, seed=4).estimate(bank, key, q, a, s2)
    assert not torch.equal(other.means[sampled], est.means[sampled]) or not sampled.any()


@pytest.mark.parametrize("proposal", ["count", "uniform"])
def test_tail_weight_estimate_is_unbiased_over_seeds(bank, mnist, proposal):
    t = 0.5
    q, key = _queries(mnist, t)
    q = q[::13]
    a, s2 = alpha_sigma2(t)
    table = bank.unique_patches(key)
    d2 = ((q[:, None, :] / a - table.patches.double()[None] / 255.0) ** 2).sum(-1)
    log_z = torch.logsumexp(-(a * a) * d2 / (2 * s2) + table.counts.double().log(), 1)
    backend = SampledTailBackend(k=4, samples=64, proposal=proposal, min_ess=None)
    ratios = torch.stack([(backend.estimate(bank, key, q, a, s2, seed=s).log_z - log_z).exp() for s in range(300)])
    mean, sem = ratios.mean(0), ratios.std(0) / 300**0.5
    assert ((mean - 1).abs() <= 4 * sem + 1e-9).all(), (mean, sem)
    assert (ratios.std(0) > 0).all()  # the estimate is random: the test is not vacuous


def test_bad_arguments():
    with pytest.raises(ValueError):
        SampledTailBackend(samples=0)
    with pytest.raises(ValueError):
        SampledTailBackend(proposal="magic")  # type: ignore[arg-type]
