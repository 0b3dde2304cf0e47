"""Edge values give a correct answer or an error naming them (t at and just outside [0, 1], 0, 1 or a huge number
of steps, P = 1, P larger than the image, schedules listed out of order, labels outside the trained range), and
requests too large for memory are streamed or refused with an estimate before anything is allocated (tables
of full MNIST at every scale, a huge batch)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import noised
from reference import naive_machine

import machines.analytic as analytic
import machines.posterior.exact as exact
from machines import ScaleSchedule, ScoreMachine, noise_from_seeds, sample
from patchbank import BankError, BankSpec, BucketKey, MemoryBank, PatchBank, load_npz, random_images, to_model_range
from pipelines.networks import NetworkDenoiser
from pipelines.training import TrainConfig, build_network


def reference_machine(data, kind: str, P: int, x: torch.Tensor, t: float) -> torch.Tensor:
    """The independent float64 loop implementation (tests/reference.py) on ``data``."""
    images = to_model_range(data.images, torch.float64).numpy()
    return torch.from_numpy(naive_machine(kind, images, data.labels.numpy(), x.double().numpy(), t, P))


@pytest.fixture(scope="module")
def data():
    return random_images(12, (1, 6, 7), classes=2, seed=3)


@pytest.mark.parametrize("t, says", [(0.0, "undefined at t = 0.0"), (-1e-12, "must lie in [0, 1]"), (1 + 1e-12, "must lie in [0, 1]"),
                                     (float("nan"), "must lie in [0, 1]")])
def test_times_at_zero_and_outside_the_unit_interval_are_errors(data, t, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        ScoreMachine(data, "bbELS", scales=3)(noised(data, 0.5, 1), t)


def test_t_equal_to_one_is_the_mean_of_the_dictionary(data):
    """At t = 1 the signal fraction is ᾱ ≈ 1.6e-4: the posterior is nearly flat, x̂0 close to each pixel's mean value."""
    x = torch.randn(2, *data.shape, dtype=torch.float64)
    got = ScoreMachine(data, "bbELS", scales=3)(x, 1.0)
    torch.testing.assert_close(got, reference_machine(data, "bbELS", 3, x, 1.0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("P", [1, 7, 13, 15])
def test_p_one_and_p_larger_than_the_image_agree_with_the_reference(data, P):
    x = noised(data, 0.4, 2, seed=1)
    got = ScoreMachine(data, "bbELS", scales=P)(x, 0.4)
    torch.testing.assert_close(got, reference_machine(data, "bbELS", P, x, 0.4), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_steps_that_are_not_a_positive_integer_are_errors(data, steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(ScoreMachine(data, "bbELS", scales=3), noise_from_seeds([0], data.shape), steps)


def test_one_step_lands_on_the_first_denoised_image(data):
    machine = ScoreMachine(data, "bbELS", scales=3)
    noise = noise_from_seeds([0], data.shape, torch.float64)
    torch.testing.assert_close(sample(machine, noise, 1), machine(noise, 1.0))


class Stop(Exception):
    pass


def test_a_huge_number_of_steps_allocates_nothing_per_step(data):
    """The grid is made step by step: 10¹² steps start at once (the first two times visited are exact)."""
    machine = ScoreMachine(data, "bbELS", scales=3)
    seen: list[float] = []

    def counting(x, t, labels=None):
        seen.append(t)
        if len(seen) == 2:
            raise Stop
        return machine(x, t, labels)

    with pytest.raises(Stop):
        sample(counting, noise_from_seeds([0], data.shape), 10**12)
    assert seen == [1.0, (10**12 - 1) / 10**12]


def test_a_schedule_listed_out_of_order_is_read_by_time(data):
    ordered = ScaleSchedule(((0.2, 3), (0.6, 5), (0.9, 7)))
    shuffled = ScaleSchedule(((0.9, 7), (0.2, 3), (0.6, 5)))
    assert shuffled == ordered and [shuffled(t) for t in (0.1, 0.5, 1.0)] == [3, 5, 7]


def test_labels_outside_the_trained_range_are_errors(data):
    with pytest.raises(ValueError, match="no training image has label 5"):
        ScoreMachine(data, "bbELS", scales=3, conditional=True)(noised(data, 0.5, 1), 0.5, torch.tensor([5]))
    net = build_network(TrainConfig(width=4, blocks=1, conditional=True), 1, 2)
    wrapped = NetworkDenoiser(net.eval(), "outputs/cond/model.pt")
    with pytest.raises(ValueError, match=r"network outputs/cond/model.pt was trained on labels 0..1; label 2 is outside"):
        wrapped(torch.zeros(2, 1, 8, 8), 0.5, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="label -1 is outside"):
        wrapped(torch.zeros(1, 1, 8, 8), 0.5, torch.tensor([-1]))


# ---- memory ---------------------------------------------------------------------------------------------
def test_a_table_over_the_memory_budget_is_streamed_with_the_same_answers(data, caplog):
    key = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))
    x = noised(data, 0.3, 2)
    roomy = MemoryBank(data, dedup=True)
    tight = MemoryBank(data, dedup=True, table_max_bytes=roomy.table_bytes(key) - 1)
    assert roomy.materialised(key)
    with caplog.at_level(logging.WARNING):
        got = ScoreMachine(tight, "bbELS", scales=3)(x, 0.3)
    assert not tight.materialised(key) and key not in tight._unique
    assert f"could take up to {tight.table_bytes(key) / 1e9:.1f} GB" in caplog.text and caplog.text.count(str(key)) == 1
    torch.testing.assert_close(got, ScoreMachine(roomy, "bbELS", scales=3)(x, 0.3), rtol=1e-12, atol=1e-12)


def test_tables_of_full_mnist_at_every_scale_are_refused_before_any_allocation(datasets_dir, tmp_path, monkeypatch):
    import patchbank.memory

    monkeypatch.setattr(patchbank.memory, "half_the_memory", lambda: 12 << 30)  # this machine's 24 GB, wherever it runs
    full = load_npz(datasets_dir / "mnist.npz")  # 60,000 images, 28×28
    bank = MemoryBank(full, dedup=True, table_max_bytes=12 << 30)  # half of a 24 GB machine
    interior = BucketKey("bbELS", 19, "zeros", (9, 9, 9, 9))
    assert bank.table_bytes(interior) > 12 << 30 and not bank.materialised(interior)  # streamed instead
    assert bank.materialised(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)))
    with pytest.raises(BankError, match=r"could take .* GB to build, over the .* GB this machine allows.*materialise_max"):
        PatchBank.build(full, tmp_path / "bank", BankSpec(scales=[3, 19], index=None), progress=False)
    assert not (tmp_path / "bank").exists()  # refused before anything was written


def test_a_huge_batch_is_taken_in_slices_with_the_same_answers(data, monkeypatch):
    machine = ScoreMachine(MemoryBank(data, dedup=True), "bbELS", scales=3)
    x = noised(data, 0.3, 5, seed=2)
    whole = machine(x, 0.3)
    assert machine.batch_limit(0.3) >= 5
    monkeypatch.setattr(analytic, "QUERY_BYTES", 2 * 8 * 6 * 7 * 9 * 2)  # two samples per pass
    assert machine.batch_limit(0.3) == 2
    monkeypatch.setattr(exact, "BOUNDS_BYTES", 24 * 3 * 5)  # and the cluster bounds of a few queries at a time
    torch.testing.assert_close(machine(x, 0.3), whole, rtol=0, atol=1e-14)
    full = ScoreMachine(MemoryBank(random_images(4, (1, 32, 32), seed=0)), "bbELS", scales=19)
    monkeypatch.setattr(analytic, "QUERY_BYTES", 1 << 30)
    assert full.batch_limit(0.5) == (1 << 30) // (2 * 8 * 32 * 32 * 361)  # 181 samples of 32×32 at P = 19 per pass
