"""Noise schedule, the x̂0 → ε̂ / score conversion, and patch-scale schedules (DESIGN §2)."""

from __future__ import annotations

import bisect
import json
import math
import numbers
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from patchbank.geometry import check_scale

COSINE_DENOM = 2.016  # the paper's "legacy cosine": abar(t) = cos²(π t / 2.016)


def abar(t: float) -> float:
    """Signal fraction ᾱ(t) = cos²(π·t/2.016); ᾱ(0) = 1, ᾱ(1) ≈ 1.55e-4."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"diffusion time t must lie in [0, 1], got {t}")
    return math.cos(math.pi * t / COSINE_DENOM) ** 2


def alpha_sigma2(t: float) -> tuple[float, float]:
    """``(a, s²) = (√ᾱ, 1 − ᾱ)`` at ``t > 0`` (at t = 0 the posterior is a delta)."""
    ab = abar(t)
    if ab >= 1.0:
        raise ValueError(f"the posterior is undefined at t = {t} (no noise); use t > 0")
    return math.sqrt(ab), 1.0 - ab


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, t: float) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ·x̂0)/√(1−ᾱ): the one place that turns a denoiser into a noise prediction."""
    a, s2 = alpha_sigma2(t)
    return (x - a * x0) / math.sqrt(s2)


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ: wraps a noise-predicting network as a denoiser."""
    a, s2 = alpha_sigma2(t)
    return (x - math.sqrt(s2) * eps) / a


def score_from_x0(x: torch.Tensor, x0: torch.Tensor, t: float) -> torch.Tensor:
    """∇ log p_t(x) = −ε̂/√(1−ᾱ)."""
    return -eps_from_x0(x, x0, t) / math.sqrt(alpha_sigma2(t)[1])


Reading = Literal["calibrated", "paper"]


@dataclass(frozen=True)
class ScaleSchedule:
    """Explicit ``(t, P)`` pairs; a visited ``t`` takes the P of the nearest listed time (ties: the earlier)."""

    points: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a scale schedule needs at least one (t, P) pair")
        points = [_point(i, entry) for i, entry in enumerate(self.points)]
        seen: dict[float, int] = {}
        for i, (t, P) in enumerate(points):
            if t in seen:
                raise ValueError(f"scale schedule entries {seen[t]} and {i} both give t = {t} (with P = "
                                 f"{points[seen[t]][1]} and {P}); list each time once")
            seen[t] = i
        object.__setattr__(self, "points", tuple(sorted(points)))

    @classmethod
    def constant(cls, P: int) -> ScaleSchedule:
        return cls(((0.0, P),))

    def __call__(self, t: float) -> int:
        ts = [p[0] for p in self.points]
        k = bisect.bisect_left(ts, t)
        near = [i for i in (k - 1, k) if 0 <= i < len(ts)]
        return self.points[min(near, key=lambda i: (abs(ts[i] - t), i))][1]

    @property
    def scales(self) -> list[int]:
        return sorted({P for _, P in self.points})

    def to_json(self) -> list[list[float | int]]:
        return [[t, P] for t, P in self.points]


def _point(i: int, entry: object) -> tuple[float, int]:
    """Schedule entry ``i`` as ``(t, P)``: t a number in [0, 1], P an odd integer ≥ 1, nothing coerced (P = 5.9,
    ``true`` or ``"7"`` and t = NaN or 2.5 are errors naming the entry)."""
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise ValueError(f"scale schedule entry {i} must be a pair (t, P), got {entry!r}")
    t, P = entry
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:  # NaN fails the range too
        raise ValueError(f"scale schedule entry {i} {list(entry)!r}: t must be a number in [0, 1], got {t!r}")
    if isinstance(P, bool) or not isinstance(P, numbers.Integral):
        raise ValueError(f"scale schedule entry {i} {list(entry)!r}: P must be an odd integer >= 1, got {P!r}")
    try:
        check_scale(int(P))
    except ValueError as err:
        raise ValueError(f"scale schedule entry {i} {list(entry)!r}: {err}") from None
    return float(t), int(P)


def reference_schedules(path: str | Path | None = None) -> dict:
    """The calibrated schedules from the paper's code (``scales.json``; shipped with the package)."""
    if path is None:
        return json.loads(resources.files("machines").joinpath("data/scales.json").read_text())
    return json.loads(Path(path).read_text())


def reference_schedule(name: str, reading: Reading = "calibrated", path: str | Path | None = None) -> ScaleSchedule:
    """A reference schedule as explicit ``(t, P)`` pairs.

    ``calibrated``: entry j at the time it was calibrated at, t = (j+1)/20.
    ``paper``: as the paper's sampler applied it, entry i at t = i/20 (entry 0 unused); the
    paper's machine never visited t = 1, so t = 1 takes the last entry.
    """
    ref = reference_schedules(path)
    if name not in ref["schedules"]:
        raise KeyError(f"no reference schedule {name!r}; available: {sorted(ref['schedules'])}")
    Ps = ref["schedules"][name]
    ts = ref["calibrated_at_t"]
    if reading not in ("calibrated", "paper"):
        raise ValueError(f"reading must be 'calibrated' or 'paper', got {reading!r}")
    if reading == "calibrated" and len(ts) != len(Ps):
        raise ValueError(f"schedule {name!r} of {path or 'scales.json'} lists {len(Ps)} scales for {len(ts)} times")
    n = len(Ps)
    points = zip(ts, Ps) if reading == "calibrated" else ((i / n, Ps[min(i, n - 1)]) for i in range(1, n + 1))
    try:
        return ScaleSchedule(tuple(points))
    except ValueError as err:
        raise ValueError(f"schedule {name!r} of {path or 'scales.json'}: {err}") from None
