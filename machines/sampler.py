"""One deterministic DDIM sampler for analytic machines and wrapped networks alike (DESIGN §2)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .analytic import Denoiser
from .schedule import abar, eps_from_x0

StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]
"""Called after each step with ``(step, t, x_prev, x̂0)``."""


def ddim_grid(steps: int = 20) -> list[float]:
    """Visited times ``t_i = i/n`` for ``i = n … 0``: ``steps + 1`` values from 1 down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps, -1, -1)]


def noise_from_seeds(
    seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal ``[len(seeds), *shape]``; sample ``i`` depends only on ``seeds[i]`` (one generator each)."""
    gens = (torch.Generator().manual_seed(int(s)) for s in seeds)
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in gens]).to(dtype).to(device)


@torch.no_grad()
def sample(
    machine: Denoiser,
    noise: torch.Tensor,
    steps: int = 20,
    labels: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM from ``noise [B, C, H, W]`` at t = 1 to t = 0; the last step lands on x̂0."""
    x = noise
    grid = ddim_grid(steps)
    for step, (t, t_prev) in enumerate(tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc="DDIM")):
        x0 = machine(x, t, labels)
        eps = eps_from_x0(x, x0, t)
        # DDIM step: x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂.
        ab_prev = abar(t_prev)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps
        if callback is not None:
            callback(step, t, x, x0)
    return x
