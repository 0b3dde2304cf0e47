from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from patchbank import ImageData, random_images

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The offline dataset copies (``$PATCHBANK_DATASETS`` or the checkout's ``../shared/datasets``)."""
    for d in [*os.environ.get("PATCHBANK_DATASETS", "").split(os.pathsep), str(SHARED)]:
        if d and (Path(d) / "mnist.npz").is_file():
            return Path(d)
    pytest.skip("offline dataset copies not found (set PATCHBANK_DATASETS)")


@pytest.fixture
def tiny() -> callable:
    """6 seeded random images of 7×9 with labels 0,1,0,1,0,1; C chosen by the caller."""

    def make(C: int = 1) -> ImageData:
        return random_images(6, (C, 7, 9), classes=2, seed=C)

    return make


def noised(data: ImageData, t: float, n: int, seed: int = 0) -> torch.Tensor:
    """x_t for the first n training images, float64: √ᾱ·x0 + √(1−ᾱ)·ε."""
    from machines import alpha_sigma2

    g = torch.Generator().manual_seed(seed)
    a, s2 = alpha_sigma2(t)
    x0 = data.images[:n].double() / 127.5 - 1
    return a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
