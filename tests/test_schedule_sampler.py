from __future__ import annotations

import math

import pytest
import torch

from machines import (
    ScaleSchedule,
    abar,
    ddim_grid,
    eps_from_x0,
    noise_from_seeds,
    reference_schedule,
    reference_schedules,
    sample,
    score_from_x0,
    x0_from_eps,
)


def test_legacy_cosine_schedule():
    assert abar(0.0) == 1.0
    assert abar(1.0) == pytest.approx(1.55e-4, rel=0.01)
    assert all(abar(a) > abar(b) for a, b in zip(ddim_grid(20)[1:], ddim_grid(20)))  # decreasing in t


def test_eps_score_round_trip():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = eps_from_x0(x, x0, 0.3)
    assert torch.allclose(x0_from_eps(x, eps, 0.3), x0)
    assert torch.allclose(score_from_x0(x, x0, 0.3), -eps / math.sqrt(1 - abar(0.3)))


def test_reference_schedule_readings():
    ref = reference_schedules()
    Ps = ref["schedules"]["MNIST_ResNet_zeros"]
    cal = reference_schedule("MNIST_ResNet_zeros", "calibrated")
    paper = reference_schedule("MNIST_ResNet_zeros", "paper")
    for j, P in enumerate(Ps):
        assert cal((j + 1) / 20) == P
    for i in range(1, 20):
        assert paper(i / 20) == Ps[i]  # one step earlier than calibrated; entry 0 unused
    assert paper(1.0) == Ps[-1]
    with pytest.raises(KeyError, match="available"):
        reference_schedule("nope")


def test_scale_schedule_lookup():
    s = ScaleSchedule(((0.5, 7), (0.1, 3)))
    assert s.points == ((0.1, 3), (0.5, 7)) and s.scales == [3, 7]
    assert s(0.0) == 3 and s(0.29) == 3 and s(0.31) == 7 and s(1.0) == 7 and s(0.3) == 3
    with pytest.raises(ValueError, match="odd"):
        ScaleSchedule(((0.1, 2),))


class Recorder:
    """A denoiser that records the visited times and returns a fixed image."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target, self.times = target, []

    def __call__(self, x, t, labels=None):
        self.times.append(t)
        return self.target.expand_as(x)


def test_ddim_visits_the_grid_and_lands_on_x0():
    target = torch.linspace(-1, 1, 16, dtype=torch.float64).view(1, 1, 4, 4)
    rec = Recorder(target)
    steps_seen = []
    x = sample(rec, noise_from_seeds([0, 1], (1, 4, 4), torch.float64), steps=5, callback=lambda i, t, x, x0: steps_seen.append((i, t)))
    assert rec.times == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert steps_seen == list(enumerate(rec.times))
    assert torch.equal(x, target.expand_as(x))


def test_noise_depends_only_on_its_seed():
    a = noise_from_seeds([5, 6, 7], (2, 3, 3))
    b = noise_from_seeds([7], (2, 3, 3))
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_agreement_metrics():
    from machines.metrics import mse, pearson_r, r2

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(pearson_r(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(pearson_r(a, -a), -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(r2(a, a), torch.ones(3, dtype=torch.float64)) and torch.equal(mse(a, a), torch.zeros(3, dtype=torch.float64))
    b = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64)
    ref = torch.corrcoef(torch.stack([a[0].flatten(), b[0].flatten()]))[0, 1]
    assert torch.isclose(pearson_r(a, b)[0], ref)
    assert r2(b, a)[0] < 1 and torch.isclose(mse(a, b)[0], ((a[0] - b[0]) ** 2).mean())


def test_a_sample_started_later_continues_the_trajectory(tiny, tmp_path):
    """``start = k`` takes the noise as x at t = ddim_time(k): started on the state an uninterrupted run reached
    after k steps, it ends where that run ends, bit for bit; a checkpoint of a run from t = 1 is not resumed by it."""
    from machines import ScoreMachine
    from patchbank import MemoryBank

    machine = ScoreMachine(MemoryBank(tiny()), "bbELS", scales=3)
    noise = noise_from_seeds([0, 1], (1, 7, 9), torch.float64)
    states, ts = {}, []
    ref = sample(machine, noise, steps=6, callback=lambda i, t, x, x0: states.setdefault(i, x.clone()))
    later = sample(machine, states[1], steps=6, start=2, callback=lambda i, t, x, x0: ts.append(t))
    assert torch.equal(later, ref) and ts == [4 / 6, 3 / 6, 2 / 6, 1 / 6]
    sample(machine, noise, steps=6, checkpoint=tmp_path / "run.pt")
    with pytest.raises(ValueError, match="another sampling run.*start"):
        sample(machine, noise, steps=6, start=1, checkpoint=tmp_path / "run.pt")
    for bad in (-1, 6, 1.0, True):
        with pytest.raises(ValueError, match="start must be an integer step"):
            sample(machine, noise, steps=6, start=bad)


def test_checkpointed_sample_resumes_after_an_interruption(tiny, tmp_path):
    """A sample killed after step k and re-run from its checkpoint equals an uninterrupted one, bit for bit."""
    from machines import ScoreMachine
    from patchbank import MemoryBank

    machine = ScoreMachine(MemoryBank(tiny()), "bbELS", scales=3)
    noise = noise_from_seeds([0, 1], (1, 7, 9), torch.float64)
    ref = sample(machine, noise, steps=6)
    ckpt = tmp_path / "run.pt"

    def stop_after_3(step, t, x, x0):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(machine, noise, steps=6, callback=stop_after_3, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["done"] == 3
    seen = []
    out = sample(machine, noise, steps=6, callback=lambda i, t, x, x0: seen.append(i), checkpoint=ckpt)
    assert seen == [3, 4, 5] and torch.equal(out, ref)
    assert torch.equal(sample(machine, noise, steps=6, checkpoint=ckpt), ref)  # finished: nothing left to compute
    with pytest.raises(ValueError, match="another sampling run.*noise"):
        sample(machine, noise_from_seeds([2, 3], (1, 7, 9), torch.float64), steps=6, checkpoint=ckpt)
    with pytest.raises(ValueError, match="steps"):
        sample(machine, noise, steps=5, checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        sample(machine, noise, steps=6, checkpoint=ckpt)
