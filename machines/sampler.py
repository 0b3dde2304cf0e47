"""One deterministic DDIM sampler for analytic machines and wrapped networks alike (DESIGN §2)."""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from patchbank.atomic import atomic_write, read_torch

from .analytic import Denoiser
from .schedule import abar, eps_from_x0

StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], object]
"""Called after each step with ``(step, t, x_prev, x̂0)``."""


class StepRecorder:
    """A :data:`StepCallback` that keeps one record per step: ``step``, ``t``, ``P`` (for a machine with a
    scale schedule), ``seconds`` since the previous step's record and, given a ``backend``, its
    ``stats.summary()`` for that step (the statistics are reset after each record, and by :meth:`start`)."""

    def __init__(self, machine: Any = None, backend: Any = None) -> None:
        self.scales = getattr(machine, "scales", None)
        self.backend = backend
        self.records: list[dict] = []
        self.start()

    def start(self) -> None:
        """Start timing the next step now (and clear the backend's statistics)."""
        if self.backend is not None:
            self.backend.reset()
        self._last = time.perf_counter()

    def __call__(self, step: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> dict:
        rec: dict = {"step": step, "t": t, "seconds": time.perf_counter() - self._last}
        if self.scales is not None:
            rec["P"] = self.scales(t)
        if self.backend is not None:
            rec |= self.backend.stats.summary()
            self.backend.reset()
        self.records.append(rec)
        self._last = time.perf_counter()
        return rec


def ddim_grid(steps: int = 20) -> list[float]:
    """Visited times ``t_i = i/n`` for ``i = n … 0``: ``steps + 1`` values from 1 down to 0."""
    _check_steps(steps)
    return [ddim_time(step, steps) for step in range(steps + 1)]


def ddim_time(step: int, steps: int) -> float:
    """The time step ``step`` of ``steps`` starts at: ``(steps − step)/steps`` (step ``steps`` is t = 0)."""
    return (steps - step) / steps


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


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
    checkpoint: str | os.PathLike | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Deterministic DDIM from ``noise [B, C, H, W]`` at t = 1 to t = 0; the last step lands on x̂0.

    ``start``: the first step taken; a later one takes the noise as x at t = ``ddim_time(start, steps)`` (the
    paper's machine sampler skips the step at t = 1 this way).

    ``checkpoint``: a file that receives the state after every step (written atomically). A run
    that finds a checkpoint of the same run (same machine description, noise, labels and steps)
    resumes after its last finished step, so an hours-long exact sample killed at any point
    loses at most one step; a checkpoint of another run is an error. ``callback`` is called for
    the steps computed in this call only. The file is kept after the last step (delete it to
    sample again from scratch).
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a float tensor [B, C, H, W], got {getattr(noise, 'dtype', type(noise).__name__)}")
    if not torch.isfinite(noise).all():
        raise ValueError("the noise holds NaN or Inf; a sample from it would be NaN")
    x = noise
    _check_steps(steps)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < steps:
        raise ValueError(f"start must be an integer step in [0, {steps}), got {start!r}")
    first = start
    run = _run_id(machine, noise, labels, steps, start) if checkpoint is not None else None
    if checkpoint is not None and os.path.exists(checkpoint):
        first, x = _resume(Path(checkpoint), run, noise)  # type: ignore[arg-type]
    for step in tqdm(range(first, steps), disable=not progress, desc="DDIM", initial=first - start, total=steps - start):
        t, t_prev = ddim_time(step, steps), ddim_time(step + 1, steps)  # made step by step: any number of steps fits
        x0 = machine(x, t, labels)
        _check_finite(machine, x0, step, steps, t)
        eps = eps_from_x0(x, x0, t)
        # DDIM step: x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂.
        ab_prev = abar(t_prev)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps
        if checkpoint is not None:
            state = {"run": run, "done": step + 1, "x": x.detach().cpu()}
            atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
        if callback is not None:
            callback(step, t, x, x0)
    return x


def _check_finite(denoiser: Denoiser, x0: torch.Tensor, step: int, steps: int, t: float) -> None:
    """A denoiser's x̂0 ``[B, C, H, W]`` must be finite: NaN or Inf is an error naming the denoiser, the step and the
    samples (their places in the batch), not a NaN sample carried into every later result."""
    bad = ~torch.isfinite(x0.flatten(1)).all(1)
    if bad.any():
        where = bad.nonzero().flatten().tolist()
        raise FloatingPointError(f"{denoiser!r} returned NaN or Inf at step {step + 1} of {steps} (t = {t:g}), in "
                                 f"sample(s) {where[:8]}{' …' if len(where) > 8 else ''} of the batch")


def identity_of(denoiser: Denoiser) -> dict | str:
    """What identifies a denoiser's answers: its ``identity()`` where it has one (machines, wrapped
    networks), else its ``repr``."""
    return denoiser.identity() if hasattr(denoiser, "identity") else repr(denoiser)


def _run_id(machine: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None, steps: int, start: int = 0) -> dict:
    """What identifies a sampling run: the machine's ``identity()`` (its kind, schedule, data fingerprint,
    backend…; ``repr`` for a denoiser without one), a hash of the noise and labels, the steps, and a later
    ``start`` (absent for runs from t = 1, whose identity predates it)."""
    h = hashlib.sha256(noise.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return {"machine": identity_of(machine), "noise": h.hexdigest(), "shape": list(noise.shape), "steps": steps} | (
        {"start": start} if start else {})


def _resume(path: Path, run: dict, noise: torch.Tensor) -> tuple[int, torch.Tensor]:
    state = read_torch(path, "checkpoint")  # tensors and plain values only: loading it runs no code
    try:
        saved, done, x = state["run"], int(state["done"]), state["x"]
        if not isinstance(x, torch.Tensor) or list(x.shape) != list(noise.shape) or not 0 <= done <= run["steps"]:
            raise ValueError(f"a state of shape {list(getattr(x, 'shape', []))} after {done} steps")
    except Exception as err:  # a foreign file
        raise ValueError(f"checkpoint {path} is not a sampling checkpoint of this run ({err}); delete it to start again") from None
    if saved != run:
        diff = ", ".join(k for k in run if saved.get(k) != run[k])
        raise ValueError(f"checkpoint {path} belongs to another sampling run (differs in: {diff}); "
                         "delete it or choose another path")
    return done, x.to(noise.device, noise.dtype)
