"""Many scales at once: the box-sum pass (``native.box_scales``, ``ScoreMachine.at_scales``) against the naive
float64 machines and the exact backend, its pair count against the dictionaries' sizes, equivariance and locality,
and calibration through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import naive_machine

from machines import ScoreMachine, alpha_sigma2, native
from patchbank.datasets import random_images, to_model_range
from patchbank.geometry import dictionary_groups
from pipelines.calibration import calibrate, scale_family

pytestmark = pytest.mark.skipif(not native.available(), reason="the compiled kernels are unavailable")

RULES = [("bbELS", "zeros"), ("ELS", "circular"), ("ELS", "zeros"), ("LS", "zeros"), ("LS", "circular")]


def _queries(shape: tuple[int, ...], n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,padding", RULES)
@pytest.mark.parametrize("shape", [(1, 6, 9), (2, 9, 5)])
def test_box_scales_match_the_naive_machines(kind, padding, shape):
    """Non-square images, two channels, 11 images (not a whole number of vector lanes), patches up to wider than
    the image (a circular patch then wraps more than once), an early and a late time."""
    data = random_images(11, shape, seed=1)
    images = to_model_range(data.images, torch.float64).numpy()
    x = _queries(shape)
    machine = ScoreMachine(data, kind, 1, padding=padding)
    scales = [1, 3, 7, 13]
    for t in (0.1, 0.7):
        out = machine.at_scales(x, t, scales, method="box")
        for k, P in enumerate(scales):
            ref = naive_machine(kind, images, data.labels.numpy(), x.numpy(), t, P, padding)
            np.testing.assert_allclose(out[k].numpy(), ref, atol=1e-10, rtol=0)


def test_box_scales_equal_the_exact_backend_per_scale_on_colour_with_labels():
    """RGB, a class-conditional machine (each query against its own label's images), late and early times (late
    logits reach ~1e4, so the running maxima must be right), 1 and 3 threads."""
    data = random_images(21, (3, 8, 7), classes=3, seed=2)
    x = _queries((3, 8, 7), n=4, seed=5)
    labels = torch.tensor([0, 2, 0, 1])
    machine = ScoreMachine(data, "bbELS", 1, conditional=True)
    scales = [1, 3, 5, 9]
    for t in (0.01, 0.3, 0.95):
        box = machine.at_scales(x, t, scales, labels, method="box")
        per = machine.at_scales(x, t, scales, labels, method="per_scale")
        torch.testing.assert_close(box, per, atol=1e-9, rtol=0)
    a, s2 = alpha_sigma2(0.2)
    images = to_model_range(data.images, torch.float64).contiguous()
    one, _ = native.box_scales(x, images, scales, "ELS", "circular", a, s2, threads=1)
    three, _ = native.box_scales(x, images, scales, "ELS", "circular", a, s2, threads=3)
    torch.testing.assert_close(one, three, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,padding", RULES)
def test_box_scales_count_every_dictionary_pair_once(kind, padding):
    """The pass visits exactly the (pixel, training patch) pairs of every pixel's dictionary at every scale:
    queries × images × Σ over dictionaries of (pixels sharing it)²."""
    H, W, N, B = 7, 10, 9, 2
    data = random_images(N, (1, H, W), seed=4)
    a, s2 = alpha_sigma2(0.5)
    scales = [1, 3, 5, 9, 15]
    _, pairs = native.box_scales(_queries((1, H, W), B), to_model_range(data.images, torch.float64).contiguous(),
                                  scales, kind, padding, a, s2)
    expected = sum(B * N * locs.shape[0] ** 2 for P in scales for _, locs in dictionary_groups(H, W, P, kind))
    assert pairs == expected


def test_circular_els_at_every_scale_is_translation_equivariant():
    data = random_images(10, (1, 9, 8), seed=6)
    machine = ScoreMachine(data, "ELS", 3)
    x = _queries((1, 9, 8))
    out = machine.at_scales(x, 0.4, [3, 5, 11])
    shifted = machine.at_scales(torch.roll(x, (2, -3), (2, 3)), 0.4, [3, 5, 11])
    torch.testing.assert_close(shifted, torch.roll(out, (2, -3), (3, 4)), atol=1e-12, rtol=0)


def test_a_pixel_at_scale_p_sees_only_its_p_by_p_window():
    data = random_images(10, (1, 12, 12), seed=7)
    machine = ScoreMachine(data, "bbELS", 3)
    x = _queries((1, 12, 12), n=1)
    y = x.clone()
    y[..., 9:, 9:] += 1.5  # far from pixel (2, 2) at P = 3 and 5 (radius ≤ 2), inside its P = 15 window
    before, after = machine.at_scales(x, 0.5, [3, 5, 15]), machine.at_scales(y, 0.5, [3, 5, 15])
    torch.testing.assert_close(after[:2, 0, :, :5, :5], before[:2, 0, :, :5, :5], atol=1e-13, rtol=0)
    assert (after[2, 0, :, :5, :5] - before[2, 0, :, :5, :5]).abs().max() > 1e-6


def test_per_scale_route_is_the_machine_at_each_scale_and_auto_falls_back_to_it():
    data = random_images(8, (1, 6, 6), seed=8)
    x = _queries((1, 6, 6))
    topk = ScoreMachine(data, "bbELS", 3, backend="topk:k=16")
    assert topk.box_reason() is not None and "TopKBackend" in topk.box_reason()
    out = topk.at_scales(x, 0.3, [3, 5])
    for k, P in enumerate([3, 5]):
        torch.testing.assert_close(out[k], ScoreMachine(data, "bbELS", P, backend="topk:k=16")(x, 0.3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="box pass cannot serve"):
        topk.at_scales(x, 0.3, [3], method="box")


def test_at_scales_refuses_bad_input():
    data = random_images(8, (1, 6, 6), seed=8)
    machine = ScoreMachine(data, "bbELS", 3)
    x = _queries((1, 6, 6))
    with pytest.raises(ValueError, match="odd integer"):
        machine.at_scales(x, 0.3, [3, 4])
    with pytest.raises(ValueError, match="at least one patch scale"):
        machine.at_scales(x, 0.3, [])
    with pytest.raises(ValueError, match="unknown method"):
        machine.at_scales(x, 0.3, [3], method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built for images"):
        machine.at_scales(x[:, :, :5], 0.3, [3])
    with pytest.raises(ValueError, match="whole images"):
        ScoreMachine(data, "IS").at_scales(x, 0.3, [3])
    assert "4 channels" in ScoreMachine(random_images(8, (5, 6, 6)), "bbELS", 3).box_reason()
    a, s2 = alpha_sigma2(0.3)
    images = to_model_range(data.images, torch.float64).contiguous()
    with pytest.raises(ValueError, match="share C, H, W"):
        native.box_scales(x[:, :, :5].contiguous(), images, [3], "bbELS", "zeros", a, s2)
    with pytest.raises(ValueError, match="zeros only|cannot take"):
        native.box_scales(x, images, [3], "bbELS", "circular", a, s2)
    with pytest.raises(ValueError, match="patch rules"):
        native.box_scales(x, images, [3], "ES", "circular", a, s2)
    with pytest.raises(ValueError, match="contiguous CPU torch.float64"):
        native.box_scales(x.float(), images, [3], "bbELS", "zeros", a, s2)


def test_calibration_takes_one_box_pass_per_step_and_agrees_with_per_scale(monkeypatch):
    data = random_images(12, (1, 7, 9), seed=9)
    truth = ScoreMachine(data, "bbELS", scales=5)
    candidates = [1, 3, 5, 7]
    calls = []
    real = native.box_scales

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "box_scales", counted)
    family = lambda P: ScoreMachine(data, "bbELS", scales=P)  # noqa: E731
    assert scale_family({P: family(P) for P in candidates}) is not None
    together = calibrate(truth, family, candidates, [0, 1], (1, 7, 9), steps=3, progress=False)
    assert calls == [[5, 7]] * 3  # one pass per visited time, every candidate from BOX_MIN_SCALE = 5 up in it
    alone = calibrate(truth, family, candidates, [0, 1], (1, 7, 9), steps=3, progress=False, scales_at_once=False)
    assert len(calls) == 3  # one exact pass per candidate instead
    assert scale_family({P: ScoreMachine(data, "bbELS", scales=P, backend="exact:kernel=torch") for P in candidates}) is None
    assert together["schedule"] == alone["schedule"] == [[t, 5] for t, _ in together["schedule"]]
    for t, sims in together["similarity"].items():
        for P in candidates:
            np.testing.assert_allclose(sims[str(P)], alone["similarity"][t][str(P)], atol=1e-9)
    assert scale_family({3: family(3), 5: ScoreMachine(data, "ELS", scales=5)}) is None  # different rules
    assert scale_family({3: family(5)}) is None  # keyed by another scale than its own
