"""Comparator machines: the Wiener filter, the nearest training image, PCA-locality and the smoothed closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noised

from machines import BACKENDS, ScoreMachine, alpha_sigma2, noise_from_seeds, sample
from machines.comparators import (
    COMPARATORS,
    NearestNeighbourMachine,
    PCALocalityMachine,
    SmoothedClosedFormMachine,
    WienerMachine,
    make_comparator,
    masked_posterior_means,
    parse_comparator,
)
from patchbank import ImageData, MemoryBank, to_model_range


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
    assert all(a is b for a, b in zip(full.statistics(), full.statistics()))  # computed once, kept


def test_image_statistics_are_stored_with_a_bank_on_disk(tiny, tmp_path, monkeypatch):
    from patchbank import BankSpec, PatchBank
    from patchbank import base as bank_base

    data = tiny(1)
    bank = PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], index=None), progress=False)
    first = WienerMachine(bank, conditional=True).statistics(1)
    assert (tmp_path / "bank" / "statistics" / "label1.pt").is_file()

    def recompute(x):
        raise AssertionError("the stored statistics should have been read")

    monkeypatch.setattr(bank_base, "image_statistics", recompute)
    again = WienerMachine(PatchBank.open(tmp_path / "bank"), conditional=True).statistics(1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.undo()
    (tmp_path / "bank" / "statistics" / "label1.pt").write_bytes(b"damaged")  # a damaged file is computed again
    for a, b in zip(first, WienerMachine(PatchBank.open(tmp_path / "bank"), conditional=True).statistics(1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


def _brute_pca(machine: PCALocalityMachine, x: torch.Tensor, t: float, train: torch.Tensor) -> torch.Tensor:
    """PCA-locality by its definition, one output value at a time: one softmax over all images ``[B, D]``."""
    a, s2 = alpha_sigma2(t)
    M = machine.mask(t).to(torch.float64)
    flat = x.flatten(1)
    out = torch.empty_like(flat)
    for m in range(flat.shape[1]):
        sq = (flat[:, None, :] - a * train[None]).pow(2) @ M[:, m]  # [B, N]
        out[:, m] = torch.softmax(-sq / (2 * s2 * machine.temperature), 1) @ train[:, m]
    return out


@pytest.mark.parametrize("C,normalise", [(1, "row"), (3, "symmetric")])
def test_pca_locality_is_one_global_softmax_per_value(tiny, C, normalise):
    data = tiny(C)
    train = to_model_range(data.images, torch.float64).flatten(1)
    for t, temperature in ((0.2, 1.0), (0.6, 0.5)):
        machine = PCALocalityMachine(data, threshold=0.05, temperature=temperature, normalise=normalise, chunk=4)  # 6 images: 2 chunks
        x = noised(data, t, 3, seed=5)
        mask = machine.mask(t)
        assert 0 < int(mask.sum()) < mask.numel()  # a real locality mask: neither empty nor full
        want = _brute_pca(machine, x, t, train)
        torch.testing.assert_close(machine(x, t).flatten(1), want, rtol=0, atol=1e-12)
    # The trap: averaging each chunk's own softmax is another estimator, and it is measurably off.
    a, s2 = alpha_sigma2(0.2)
    M = machine.mask(0.2).to(torch.float64)
    x = noised(data, 0.2, 3, seed=5).flatten(1)
    parts = [masked_posterior_means(x, train[s : s + 3], M, a, s2) for s in (0, 3)]
    assert (sum(parts) / 2 - masked_posterior_means(x, train, M, a, s2, chunk=3)).abs().max() > 1e-3


def test_pca_locality_with_a_full_mask_is_the_ideal_score(tiny):
    data = tiny(3)
    ideal = ScoreMachine(data, "IS")
    for normalise in PCALocalityMachine.NORMALISATIONS:
        full = PCALocalityMachine(data, threshold=0.0, normalise=normalise, chunk=5)
        for t in (0.1, 0.5, 0.9):
            x = noised(data, t, 4, seed=3)
            assert bool(full.mask(t).all())
            torch.testing.assert_close(full(x, t), ideal(x, t), rtol=0, atol=1e-12)


def test_pca_locality_is_local_and_conditional(tiny):
    data = tiny(1)
    machine = PCALocalityMachine(data, threshold=0.3, normalise="symmetric")
    t = 0.4
    x = noised(data, t, 2, seed=8)
    base = machine(x, t).flatten(1)
    mask = machine.mask(t)
    m = int(mask.sum(0).argmin())  # the value that sees the fewest others
    outside = ~mask[:, m]
    assert outside.any()
    moved = x.flatten(1).clone()
    moved[:, outside] += 0.7 * torch.randn(2, int(outside.sum()), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    after = machine(moved.view_as(x), t).flatten(1)
    torch.testing.assert_close(after[:, m], base[:, m], rtol=0, atol=1e-12)  # nothing outside its mask reaches it
    assert (after - base).abs().max() > 1e-6  # while values whose masks hold the moved pixels do move
    cond = PCALocalityMachine(data, conditional=True, threshold=0.3, normalise="symmetric")
    labels = torch.tensor([1, 0])
    got = cond(x, t, labels)
    for b, y in enumerate(labels.tolist()):
        alone = PCALocalityMachine(data.subset(indices=torch.nonzero(data.labels == y).view(-1)), threshold=0.3, normalise="symmetric")
        torch.testing.assert_close(got[b], alone(x[b : b + 1], t)[0], rtol=0, atol=1e-12)


def test_smoothed_closed_form_at_zero_is_the_closed_form_and_matches_its_expectation(tiny):
    data = tiny(1)
    x = noised(data, 0.5, 3, seed=2)
    torch.testing.assert_close(SmoothedClosedFormMachine(data, sigma=0.0)(x, 0.5), ScoreMachine(data, "IS")(x, 0.5), rtol=0, atol=0)
    # One-value images 0.8 and -0.4: E_ε[IS(x + σε)] by Gauss-Hermite quadrature against 20,000 draws.
    two = ImageData(torch.tensor([229, 76], dtype=torch.uint8).view(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), "two")
    ys = to_model_range(two.images, torch.float64).view(-1)
    sigma, t = 0.5, 0.3
    a, s2 = alpha_sigma2(t)
    machine = SmoothedClosedFormMachine(two, sigma=sigma, draws=20_000, seed=1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    for x0 in (-0.3, 0.5):
        z = torch.as_tensor(x0 + sigma * nodes)
        w = torch.softmax(-(z[:, None] - a * ys[None]).pow(2) / (2 * s2), 1) @ ys
        expected = float((torch.as_tensor(weights) * w).sum() / weights.sum())
        single = ScoreMachine(two, "IS")(machine.noise.view(-1, 1, 1, 1) * sigma + x0, t).view(-1)
        se = float(single.std() / len(single) ** 0.5)
        got = float(machine(torch.full((1, 1, 1, 1), x0, dtype=torch.float64), t))
        assert abs(got - expected) < 4 * se + 1e-12, (x0, got, expected, se)
        assert abs(got - float(ScoreMachine(two, "IS")(torch.full((1, 1, 1, 1), x0, dtype=torch.float64), t))) > 10 * se  # smoothing moves it


def test_smoothed_closed_form_through_every_backend_and_batch_independent(tiny):
    data = tiny(3)
    bank = MemoryBank(data, dedup=True)
    x = noised(data, 0.3, 3, seed=6)
    exact = SmoothedClosedFormMachine(bank, sigma=0.2, draws=4)(x, 0.3)
    for kind in BACKENDS:  # whole-image posteriors are exact under every backend (auto's in float32: ~1e-6)
        got = SmoothedClosedFormMachine(bank, sigma=0.2, draws=4, backend=kind)(x, 0.3)
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-5 if kind == "auto" else 1e-9, msg=f"backend {kind}")
    one = SmoothedClosedFormMachine(bank, sigma=0.2, draws=4)(x[1:2], 0.3)
    torch.testing.assert_close(one, exact[1:2], rtol=0, atol=1e-12)
    cond = SmoothedClosedFormMachine(bank, conditional=True, sigma=0.2, draws=4)
    labels = torch.tensor([0, 1, 1])
    final = sample(cond, noise_from_seeds([0, 1, 2], data.shape, torch.float64), steps=6, labels=labels)
    train = to_model_range(data.images, torch.float64).flatten(1)
    nearest = torch.cdist(final.flatten(1), train).argmin(1)  # late steps are nearly IS: each sample ends by an image of its label
    assert data.labels[nearest].tolist() == labels.tolist()


def test_comparator_specs_and_bad_parameters(tiny):
    data = tiny(1)
    assert parse_comparator("smoothed:sigma=0.25:draws=3") == ("smoothed", {"sigma": 0.25, "draws": 3})
    machine = make_comparator("pca_locality:threshold=0.1:normalise=symmetric", data)
    assert isinstance(machine, PCALocalityMachine) and machine.threshold == 0.1
    assert make_comparator(machine.spec(), data).identity() == machine.identity()
    assert make_comparator("smoothed", data).identity() != make_comparator("smoothed:sigma=0.2", data).identity()
    for spec, message in (("wiener2", "unknown comparator"), ("smoothed:alpha=1", "has no option 'alpha=1'"),
                          ("smoothed:draws=two", "draws must be a int"), ("pca_locality:threshold", "is not option=value")):
        with pytest.raises(ValueError, match=message):
            parse_comparator(spec)
    for make, message in ((lambda: PCALocalityMachine(data, threshold=1.5), "threshold must lie in"),
                          (lambda: PCALocalityMachine(data, temperature=0), "temperature must be > 0"),
                          (lambda: PCALocalityMachine(data, normalise="col"), "normalise must be one of"),
                          (lambda: SmoothedClosedFormMachine(data, sigma=-1), "sigma must be >= 0"),
                          (lambda: SmoothedClosedFormMachine(data, draws=0), "draws must be >= 1")):
        with pytest.raises(ValueError, match=message):
            make()
    for name, cls in COMPARATORS.items():
        machine = cls(data)
        with pytest.raises(ValueError, match=r"built for float images \[B, 1, 7, 9\]"):
            machine(torch.zeros(1, 1, 9, 7, dtype=torch.float64), 0.5)
        with pytest.raises(ValueError, match="needs labels"):
            cls(data, conditional=True)(torch.zeros(2, 1, 7, 9, dtype=torch.float64), 0.5)
        assert torch.isfinite(sample(machine, noise_from_seeds([0], data.shape, torch.float64), steps=4)).all(), name


def test_comparators_pickle_without_their_caches(tiny):
    import pickle

    data = tiny(1)
    x = noised(data, 0.4, 2, seed=3)
    for spec in ("nearest", "pca_locality:normalise=symmetric:threshold=0.2", "wiener"):
        machine = make_comparator(spec, data)
        before = machine(x, 0.4)
        sent = pickle.loads(pickle.dumps(machine))
        assert not sent.__dict__.get("_train") and not sent.__dict__.get("_masks", {})
        torch.testing.assert_close(sent(x, 0.4), before, rtol=0, atol=0)
