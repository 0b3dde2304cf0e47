"""Comparator machines: the Wiener filter and the nearest training image."""

from __future__ import annotations

import pytest
import torch

from conftest import noised
from machines import ScoreMachine, alpha_sigma2, noise_from_seeds, sample
from machines.comparators import NearestNeighbourMachine, WienerMachine
from patchbank import ImageData, to_model_range


def _gaussian_images(n: int, seed: int = 0) -> tuple[ImageData, torch.Tensor, torch.Tensor]:
    """``n`` 1×2×2 images drawn from a correlated Gaussian (in model units), quantised to uint8; the Gaussian's μ, Σ."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    L = torch.tensor([[0.30, 0, 0, 0], [0.15, 0.20, 0, 0], [0.05, 0.10, 0.25, 0], [0.0, 0.05, 0.10, 0.15]], dtype=torch.float64)
    x = mu + torch.randn(n, 4, generator=g, dtype=torch.float64) @ L.T
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).view(n, 1, 2, 2)
    return ImageData(u8, torch.zeros(n, dtype=torch.long), "gaussian"), mu, L @ L.T


def test_wiener_on_gaussian_data_is_the_gaussian_posterior_mean():
    data, mu, cov = _gaussian_images(200_000)
    wiener = WienerMachine(data)
    g = torch.Generator().manual_seed(7)
    fresh = mu + torch.randn(3, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T  # new draws, noised
    for t in (0.1, 0.4, 0.8):
        a, s2 = alpha_sigma2(t)
        x = (a * fresh + s2**0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)).view(3, 1, 2, 2)
        analytic = mu + (a * cov @ torch.linalg.solve(a * a * cov + s2 * torch.eye(4, dtype=torch.float64), (x.flatten(1) - a * mu).T)).T
        got = wiener(x, t).flatten(1)
        assert (got - analytic).abs().max() < 5e-3  # empirical statistics of 200,000 quantised draws
        bayes = ScoreMachine(data, "IS")(x, t).flatten(1)  # the posterior mean by brute force over every draw
        assert (got - bayes).abs().max() < 2e-2


def test_wiener_spectrum_routes_agree_and_statistics_are_kept():
    data, _, _ = _gaussian_images(50)
    full = WienerMachine(data)
    mu, lam, V = full.statistics()
    x = to_model_range(data.images, torch.float64).flatten(1)
    torch.testing.assert_close((V * lam) @ V.T, torch.cov(x.T, correction=0), rtol=0, atol=1e-12)
    few = WienerMachine(ImageData(data.images[:3], data.labels[:3], "few"))  # N < D: the SVD route
    _, lam3, V3 = few.statistics()
    x3 = to_model_range(data.images[:3], torch.float64).flatten(1)
    torch.testing.assert_close((V3 * lam3) @ V3.T, torch.cov(x3.T, correction=0), rtol=0, atol=1e-12)
    assert full.statistics() is full.statistics()


def test_wiener_limits_and_conditioning(tiny):
    data = tiny(3)
    wiener = WienerMachine(data)
    x = noised(data, 0.5, 2, seed=1)
    mu = to_model_range(data.images, torch.float64).flatten(1).mean(0)
    _, lam, _ = wiener.statistics()
    for t in (0.6, 0.9, 1.0):  # the pull from the mean is at most a·λ_max/σ² of the way: all noise gives the mean
        a, s2 = alpha_sigma2(t)
        pull = (wiener(x, t).flatten(1) - mu).norm(dim=1)
        assert (pull <= a * float(lam.max()) / s2 * (x.flatten(1) - a * mu).norm(dim=1) + 1e-12).all()
    clean = to_model_range(data.images[:2], torch.float64)
    torch.testing.assert_close(wiener(alpha_sigma2(1e-4)[0] * clean, 1e-4), clean, rtol=0, atol=1e-3)  # no noise: the image
    cond = WienerMachine(data, conditional=True)
    labels = torch.tensor([0, 1])
    for b, y in enumerate(labels.tolist()):
        alone = WienerMachine(data.subset(indices=torch.nonzero(data.labels == y).view(-1)))
        torch.testing.assert_close(cond(x, 0.5, labels)[b], alone(x[b : b + 1], 0.5)[0], rtol=0, atol=1e-12)
    final = sample(wiener, noise_from_seeds([0], data.shape, torch.float64), steps=10)
    assert torch.isfinite(final).all()


def test_nearest_neighbour_is_the_heaviest_ideal_score_image(tiny):
    data = tiny(1)
    nn_machine = NearestNeighbourMachine(data)
    train = to_model_range(data.images, torch.float64).flatten(1)
    for t in (0.1, 0.5, 0.9):
        x = noised(data, t, 3, seed=2)
        a, s2 = alpha_sigma2(t)
        logw = -(x.flatten(1)[:, None, :] - a * train[None]).pow(2).sum(-1) / (2 * s2)  # the IS posterior's log weights
        torch.testing.assert_close(nn_machine(x, t).flatten(1), train[logw.argmax(1)], rtol=0, atol=0)
    labels = torch.tensor([1, 1, 0])
    got = NearestNeighbourMachine(data, conditional=True)(noised(data, 0.9, 3, seed=4), 0.9, labels).flatten(1)
    owners = [int(torch.nonzero((train == row).all(1))[0]) for row in got]
    assert [int(data.labels[i]) for i in owners] == labels.tolist()


def test_comparators_refuse_bad_input(tiny):
    data = tiny(1)
    for machine in (WienerMachine(data), NearestNeighbourMachine(data)):
        with pytest.raises(ValueError, match=r"built for float images \[B, 1, 7, 9\]"):
            machine(torch.zeros(1, 3, 7, 9, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="needs labels"):
        WienerMachine(data, conditional=True)(torch.zeros(2, 1, 7, 9, dtype=torch.float64), 0.5)
