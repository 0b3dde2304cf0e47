"""Calibrate a machine's time-dependent patch scale P(t) to a network (the paper's procedure).

Along the network's own DDIM trajectory from each seed, at every visited t, compare the
network's ε̂ with each candidate machine's ε̂ (cosine similarity over the whole image); pick
the best P per seed and take the median over seeds (of the chosen candidates, so the result
is always a candidate). Writes the schedule as explicit (t, P) pairs plus the per-seed
choices and the similarity curves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from patchbank.atomic import write_json
from machines import Denoiser, ScaleSchedule, eps_from_x0, noise_from_seeds, sample

MachineFactory = Callable[[int], Denoiser]
"""Builds the machine to calibrate at a constant scale P."""


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity over all C·H·W values: ``[B]``."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)


def calibrate(
    network: Denoiser,
    machine_at: MachineFactory,
    candidates: Sequence[int],
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = 20,
    labels: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Returns ``{"schedule": [[t, P], …], "per_seed": {t: [P per seed]}, "similarity": {t: {P: [per seed]}}}``."""
    noise = noise_from_seeds(seeds, shape, torch.float64)
    machines = {P: machine_at(P) for P in candidates}
    visited: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    state = {"x": noise}

    def remember(step: int, t: float, x_prev: torch.Tensor, x0: torch.Tensor) -> None:
        visited.append((t, state["x"], x0))  # x_t the network saw at t, and its x̂0
        state["x"] = x_prev

    sample(network, noise, steps, labels, callback=remember)
    schedule, per_seed, curves = [], {}, {}
    for t, x, net_x0 in tqdm(visited, desc="calibrate", disable=not progress):
        net_eps = eps_from_x0(x, net_x0, t)
        sims = {P: cosine(eps_from_x0(x, m(x, t, labels), t), net_eps) for P, m in machines.items()}
        table = torch.stack([sims[P] for P in candidates])  # [candidates, seeds]
        best = [candidates[i] for i in table.argmax(0).tolist()]
        schedule.append([t, sorted(best)[len(best) // 2]])
        per_seed[f"{t:.4f}"] = best
        curves[f"{t:.4f}"] = {str(P): sims[P].tolist() for P in candidates}
    return {"schedule": sorted(schedule), "per_seed": per_seed, "similarity": curves,
            "candidates": list(candidates), "seeds": list(seeds), "steps": steps}


def schedule_from(result: dict) -> ScaleSchedule:
    """The calibrated schedule of a :func:`calibrate` result (or its JSON file's contents)."""
    return ScaleSchedule(tuple((float(t), int(P)) for t, P in result["schedule"]))


def write_calibration(result: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
