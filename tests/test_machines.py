"""Numerics and the paper's properties of the exact machines."""

from __future__ import annotations

import pytest
import torch
from conftest import noised

from machines import ExactBackend, ScoreMachine, noise_from_seeds, sample
from patchbank import BucketKey, ImageData, MemoryBank, dictionary_groups, to_model_range, two_image


@pytest.mark.parametrize("kind,P", [("IS", None), ("ES", None), ("LS", 3), ("ELS", 3), ("bbELS", 5)])
def test_chunk_size_invariance(tiny, kind, P):
    data = tiny(3)
    x = noised(data, 0.2, 3)
    outs = [
        ScoreMachine(data, kind, scales=P, backend=ExactBackend(chunk_size=c, query_chunk=q, prune=False))(x, 0.2)
        for c, q in [(1, 1), (7, 5), (10**9, 10**9)]
    ]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], atol=1e-12, rtol=0)


def test_batch_invariance_of_samples(tiny):
    machine = ScoreMachine(tiny(1), "bbELS", scales=3)
    seeds = [3, 1, 4, 1]
    batch = sample(machine, noise_from_seeds(seeds, (1, 7, 9), torch.float64), steps=6)
    for i, s in enumerate(seeds):
        alone = sample(machine, noise_from_seeds([s], (1, 7, 9), torch.float64), steps=6)
        assert torch.allclose(batch[i], alone[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind,P", [("IS", None), ("ELS", 3), ("bbELS", 3)])
def test_no_underflow_for_distant_queries_at_late_times(tiny, kind, P):
    """A near query and a far one share a batch at t = 0.05: per-query maxima keep both finite and exact."""
    data = tiny(1)
    near = noised(data, 0.05, 1)
    far = 25.0 * torch.randn(1, 1, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    machine = ScoreMachine(data, kind, scales=P)
    both = machine(torch.cat([near, far]), 0.05)
    assert torch.isfinite(both).all()
    assert torch.allclose(both[0], machine(near, 0.05)[0], atol=1e-12, rtol=0)
    assert torch.allclose(both[1], machine(far, 0.05)[0], atol=1e-12, rtol=0)
    assert both.abs().max() <= 1.0 + 1e-12  # a convex combination of pixels in [-1, 1]


@pytest.mark.parametrize("kind", ["ELS", "ES"])
def test_circular_machines_are_translation_equivariant(tiny, kind):
    data = tiny(3)
    machine = ScoreMachine(data, kind, scales=3 if kind == "ELS" else None)
    x = noised(data, 0.4, 2)
    shift = (2, 5)
    lhs = machine(torch.roll(x, shift, dims=(2, 3)), 0.4)
    rhs = torch.roll(machine(x, 0.4), shift, dims=(2, 3))
    assert torch.allclose(lhs, rhs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,padding", [("LS", "zeros"), ("ELS", "circular"), ("bbELS", "zeros")])
def test_locality_output_ignores_pixels_outside_the_patch(tiny, kind, padding):
    data = tiny(1)
    machine = ScoreMachine(data, kind, scales=3, padding=padding)
    x = noised(data, 0.3, 1)
    y = x.clone()
    y[..., 5, :] = torch.randn_like(y[..., 5, :])  # row 5 changes; the 3×3 Ω of rows 0..3 never covers it
    fx, fy = machine(x, 0.3), machine(y, 0.3)
    assert torch.allclose(fx[..., :4, :], fy[..., :4, :], atol=1e-12, rtol=0)
    assert not torch.allclose(fx[..., 4:, :], fy[..., 4:, :])  # rows whose patch changed do move


def test_bbels_corner_uses_only_the_same_corner():
    pixels = torch.randint(0, 256, (8, 1, 9, 9), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = ImageData(pixels, torch.zeros(8, dtype=torch.long))
    P = 5
    corner = [g for key, g in dictionary_groups(9, 9, P, "bbELS") if (0, 0) in map(tuple, g.tolist())][0]
    assert corner.tolist() == [[0, 0]]
    assert BucketKey("bbELS", P, "zeros", (0, 2, 0, 2)).locations(9, 9).tolist() == [[0, 0]]
    x = noised(data, 0.3, 2)
    machine = ScoreMachine(data, "bbELS", scales=P)
    base = machine(x, 0.3)[..., 0, 0]
    other = data.images.clone()
    other[..., 3:, :] = 255 - other[..., 3:, :]  # every pixel outside the corner's 5×5 patch (rows/cols 0..2)
    other[..., :3, 3:] = 255 - other[..., :3, 3:]
    moved = ScoreMachine(ImageData(other, data.labels), "bbELS", scales=P)(x, 0.3)[..., 0, 0]
    assert torch.allclose(base, moved, atol=1e-12, rtol=0)
    inside = data.images.clone()
    inside[..., 1, 1] = 255 - inside[..., 1, 1]
    assert not torch.allclose(base, ScoreMachine(ImageData(inside, data.labels), "bbELS", scales=P)(x, 0.3)[..., 0, 0])


def _distance_to_set(x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """x [B, D], candidates [M, D] → min L∞ distance per sample [B]."""
    return (x[:, None, :] - candidates[None, :, :]).abs().amax(-1).amin(1)


def test_is_sampling_memorises(tiny):
    data = tiny(1)
    x = sample(ScoreMachine(data, "IS"), noise_from_seeds(range(5), (1, 7, 9), torch.float64), steps=20)
    train = to_model_range(data.images, torch.float64).flatten(1)
    assert _distance_to_set(x.flatten(1), train).max() < 1e-3


def test_es_sampling_ends_on_a_translate(tiny):
    data = tiny(1)
    x = sample(ScoreMachine(data, "ES"), noise_from_seeds(range(5), (1, 7, 9), torch.float64), steps=20)
    bank = MemoryBank(data)
    translates = torch.cat([c.keys for c in bank.image_stream(None, 10**6, translates=True)])
    assert translates.shape[0] == 6 * 7 * 9
    assert _distance_to_set(x.flatten(1), translates).max() < 1e-3
    train = to_model_range(data.images, torch.float64).flatten(1)
    assert _distance_to_set(x.flatten(1), train).max() > 0.1  # not merely memorised untranslated images


def _locally_consistent(x: torch.Tensor) -> torch.Tensor:
    """Per image: every pixel equals the majority of its circular 3×3 neighbourhood. x [B, 1, H, W] of ±1."""
    neigh = sum(torch.roll(x, (u, v), dims=(2, 3)) for u in (-1, 0, 1) for v in (-1, 0, 1))
    return (torch.sign(neigh) == x).flatten(1).all(1)


def test_two_image_example_reaches_locally_consistent_patch_mosaics():
    """Paper Thm: circular ELS on {black, white} generates ±1 images whose 3×3 majority equals the centre.

    DESIGN §7: this holds in the continuous-time limit, so it is tested on the fixed point of
    ``x ← x̂0(x, 1e-3)`` started from the 20-step sample (reached in a few iterations).
    """
    machine = ScoreMachine(two_image(10), "ELS", scales=3)
    x = sample(machine, noise_from_seeds(range(12), (1, 10, 10), torch.float64), steps=20)
    assert torch.allclose(x.abs(), torch.ones_like(x), atol=1e-6)
    for _ in range(10):
        nxt = machine(x, 1e-3)
        if torch.equal(nxt, x):
            break
        x = nxt
    assert torch.equal(machine(x, 1e-3), x), "no fixed point within 10 iterations"
    assert torch.allclose(x.abs(), torch.ones_like(x), atol=1e-9)
    assert _locally_consistent(torch.sign(x)).all()
    mixed = (x.flatten(1).amax(1) > 0) & (x.flatten(1).amin(1) < 0)
    assert mixed.any(), "every sample reproduced a training image; the example should create new mosaics"


def test_conditional_machine_uses_only_its_label(tiny):
    data = tiny(1)
    x = noised(data, 0.05, 1)  # image 0, label 0
    only_zero = ImageData(data.images[data.labels == 0], data.labels[data.labels == 0])
    for kind, P in [("IS", None), ("bbELS", 3)]:
        cond = ScoreMachine(data, kind, scales=P, conditional=True)(x, 0.05, torch.tensor([0]))
        ref = ScoreMachine(only_zero, kind, scales=P)(x, 0.05)
        assert torch.allclose(cond, ref, atol=1e-12, rtol=0)


def test_bad_inputs_fail_clearly(tiny):
    data = tiny(1)
    with pytest.raises(ValueError, match="odd"):
        ScoreMachine(data, "ELS", scales=4)
    with pytest.raises(ValueError, match="unknown machine"):
        ScoreMachine(data, "XYZ")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero padding"):
        ScoreMachine(data, "bbELS", scales=3, padding="circular")
    with pytest.raises(ValueError, match="takes no patch scale"):
        ScoreMachine(data, "IS", scales=3)
    machine = ScoreMachine(data, "LS", scales=3, conditional=True)
    with pytest.raises(ValueError, match=r"images \[B, 1, 7, 9\]"):
        machine(torch.zeros(1, 1, 9, 7), 0.5, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs labels"):
        machine(torch.zeros(1, 1, 7, 9), 0.5)
    with pytest.raises(ValueError, match="no training image has label 7"):
        machine(torch.zeros(1, 1, 7, 9), 0.5, torch.tensor([7]))
    with pytest.raises(ValueError, match="t > 0"):
        machine(torch.zeros(1, 1, 7, 9), 0.0, torch.tensor([0]))


@pytest.fixture(scope="module")
def mnist_small(mnist_at) -> ImageData:
    return mnist_at(150)


@pytest.mark.parametrize("kind,P", [("bbELS", 3), ("bbELS", 7), ("ELS", 5), ("LS", 3)])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_pruning_and_dedup_are_exact_on_real_data(mnist_small, kind, P, t):
    """Distinct patches with log counts, and cluster pruning, leave the posterior unchanged (float64 round-off)."""
    x = noised(mnist_small, t, 2, seed=7)
    dense = ScoreMachine(mnist_small, kind, scales=P, backend=ExactBackend(prune=False))(x, t)
    dedup = ScoreMachine(MemoryBank(mnist_small, dedup=True), kind, scales=P, backend=ExactBackend(prune=False))(x, t)
    backend = ExactBackend(prune=True, leaf_size=64)
    pruned = ScoreMachine(mnist_small, kind, scales=P, backend=backend)(x, t)
    assert torch.allclose(dedup, dense, atol=1e-12, rtol=0)
    assert torch.allclose(pruned, dense, atol=1e-12, rtol=0)
    if t == 0.05 and kind != "LS":
        assert backend.stats.visited_fraction < 0.5, "pruning skipped almost nothing where the posterior is concentrated"


def test_mnist_background_patches_collapse(mnist_small):
    bank = MemoryBank(mnist_small, dedup=True)
    table = bank.unique_patches(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)))
    assert table.total == 150 * 26 * 26
    assert len(table.counts) < 0.5 * table.total  # MNIST's black background is one patch
    zero = (table.patches == -255).all(1)  # the all-black patch, in units of 1/255
    assert zero.sum() == 1 and table.counts[zero].item() > 0.3 * table.total
