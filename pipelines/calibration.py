"""Calibrate a machine's time-dependent patch scale P(t) to a network (the paper's procedure).

Along the network's own DDIM trajectory from each seed, at every visited t, compare the
network's ε̂ with each candidate machine's ε̂ (cosine similarity over the whole image); pick
the best P per seed and take the median over seeds (of the chosen candidates, so the result
is always a candidate). Writes the schedule as explicit (t, P) pairs plus the per-seed
choices and the similarity curves.

The same procedure fits a comparator theory's free parameter (the smoothed closed form's σ, PCA-locality's
mask threshold or temperature): the candidates are its values, and since those theories take one value for the whole
trajectory, :func:`best_constant` picks the value whose similarity, averaged over the visited times, has
the highest median over seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from machines import Denoiser, ScaleSchedule, ScoreMachine, eps_from_x0, identity_of, noise_from_seeds, sample
from patchbank.atomic import atomic_write, read_torch, write_json

from .executors import Executor, make_executor, pending
from .runs import claim_folder, seed_labels

MachineFactory = Callable[[int | float], Denoiser]
"""Builds the machine to calibrate at a constant scale P (or a comparator at one value of its free parameter)."""


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity over all C·H·W values: ``[B]``."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)


def calibrate(
    network: Denoiser,
    machine_at: MachineFactory,
    candidates: Sequence[int] | Sequence[float],
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = 20,
    labels: torch.Tensor | None = None,
    progress: bool = True,
    batch: int | None = None,
    executor: str | Executor | None = None,
    resume: str | os.PathLike | None = None,
    scales_at_once: bool = True,
) -> dict:
    """Returns ``{"schedule": [[t, P], …], "per_seed": {t: [P per seed]}, "similarity": {t: {P: [per seed]}}}``.

    Seeds are taken ``batch`` at a time (None: all at once) on ``executor`` (see
    :mod:`pipelines.executors`; a parallel one receives the network and the candidate machines once per
    worker, so ``machine_at`` is called here, and needs ``batch`` to split the seeds). With ``resume``, a
    folder, each finished batch is kept there (``similarity.pt``) and a re-run computes only the seeds
    not yet kept; a folder of another run (network, machines, grid or labels differ) is refused. Where the
    candidates are one patch machine at its candidate scales with an exact backend, every candidate at a visited
    time comes from one box-sum pass (:meth:`~machines.ScoreMachine.at_scales`; :func:`scale_family`), unless
    ``scales_at_once`` is False; the answers agree to float64 rounding either way."""
    seeds = list(seeds)
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"give one label per seed: {len(labels)} labels for {len(seeds)} seeds")
    label_of = dict(zip(seeds, labels.tolist())) if labels is not None else None
    shared = Candidates(network, {P: machine_at(P) for P in candidates}, steps, tuple(shape), label_of, scales_at_once)
    found: dict[int, tuple[list[float], torch.Tensor]] = {}
    kept = Path(resume) / "similarity.pt" if resume is not None else None
    if kept is not None and resume is not None:
        claim_folder(resume, {"network": identity_of(network), "machines": {str(P): identity_of(m) for P, m in shared.machines.items()},
                              "steps": steps, "shape": list(shape), "labels": label_of})
        found = read_torch(kept, "kept similarities") if kept.exists() else {}
        if not isinstance(found, dict) or not all(isinstance(v, tuple) and len(v) == 2 for v in found.values()):
            raise ValueError(f"kept similarities {kept} are not results by seed; delete it to calibrate those seeds again")

    def keep(chunk: list[int], result: tuple[list[float], torch.Tensor]) -> None:
        for i, seed in enumerate(chunk):
            found[seed] = (result[0], result[1][:, :, i].clone())
        if kept is not None:
            atomic_write(kept, lambda p: torch.save(found, p))

    todo = pending(seeds, batch or len(seeds), found)
    make_executor(executor).map(similarities, shared, todo, keep, desc="calibrate", progress=progress, size=len)
    times = found[seeds[0]][0]
    table = torch.stack([found[s][1] for s in seeds], 2)  # [T, candidates, seeds]
    schedule, per_seed, curves = [], {}, {}
    for j, t in enumerate(times):
        best = [candidates[i] for i in table[j].argmax(0).tolist()]
        schedule.append([t, sorted(best)[len(best) // 2]])
        per_seed[f"{t:.4f}"] = best
        curves[f"{t:.4f}"] = {str(P): table[j, i].tolist() for i, P in enumerate(candidates)}
    return {"schedule": sorted(schedule), "per_seed": per_seed, "similarity": curves,
            "candidates": list(candidates), "seeds": seeds, "steps": steps}


@dataclass
class Candidates:
    """What every calibration batch needs: the network, a machine per candidate P, the grid, the seeds' labels."""

    network: Denoiser
    machines: dict[int | float, Denoiser]
    steps: int
    shape: tuple[int, ...]
    label_of: dict[int, int] | None
    scales_at_once: bool = True  # every candidate P from one box-sum pass, where the candidates allow it


def similarities(job: Candidates, seeds: list[int]) -> tuple[list[float], torch.Tensor]:
    """Along the network's trajectories from ``seeds``: the visited times and each candidate's ε̂ cosine
    similarity to the network's, ``[T, candidates, len(seeds)]``."""
    noise = noise_from_seeds(seeds, job.shape, torch.float64)
    labels = seed_labels(job.label_of, seeds)
    visited: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    state = {"x": noise}

    def remember(step: int, t: float, x_prev: torch.Tensor, x0: torch.Tensor) -> None:
        visited.append((t, state["x"], x0))  # x_t the network saw at t, and its x̂0
        state["x"] = x_prev

    sample(job.network, noise, job.steps, labels, callback=remember)
    family = scale_family(job.machines) if job.scales_at_once else None
    rows = []
    for t, x, net_x0 in visited:
        net_eps = eps_from_x0(x, net_x0, t)
        if family is not None:  # every candidate P from one box-sum pass
            outs = list(family.at_scales(x, t, [int(P) for P in job.machines], labels))
        else:
            outs = [m(x, t, labels) for m in job.machines.values()]
        rows.append(torch.stack([cosine(eps_from_x0(x, out, t), net_eps) for out in outs]))
    return [t for t, _, _ in visited], torch.stack(rows)


def scale_family(machines: dict[int | float, Denoiser]) -> ScoreMachine | None:
    """One of the candidates, when they are the same patch machine at the constant scales they are keyed by and
    :meth:`~machines.ScoreMachine.at_scales` gives all of them in one box-sum pass (an exact backend, the
    compiled kernels); else None, and each candidate runs on its own. The answers agree either way (to float64
    rounding), so a calibration's result does not depend on which route it took."""
    first = next(iter(machines.values()), None)
    if not isinstance(first, ScoreMachine) or first.box_reason() is not None:
        return None
    same = {k: v for k, v in first.identity().items() if k != "scales"}
    for P, m in machines.items():
        if not isinstance(m, ScoreMachine) or m.scales is None or m.scales.points != ((0.0, P),):
            return None
        if {k: v for k, v in m.identity().items() if k != "scales"} != same:
            return None
    return first


def best_constant(result: dict) -> tuple[float, dict[str, float]]:
    """The candidate of a :func:`calibrate` result with the highest median over seeds of its ε̂ cosine similarity
    averaged over the visited times, and that score for every candidate (``{str(candidate): score}``)."""
    curves = result["similarity"]
    scores = {}
    for c in result["candidates"]:
        per_seed = torch.tensor([curves[t][str(c)] for t in curves], dtype=torch.float64).mean(0)  # [seeds]
        scores[str(c)] = float(per_seed.median())
    best = max(result["candidates"], key=lambda c: scores[str(c)])
    return best, scores


def schedule_from(result: dict, where: str = "calibration") -> ScaleSchedule:
    """The calibrated schedule of a :func:`calibrate` result (or its JSON file's contents, ``where`` naming the file
    in errors): every entry checked by :class:`~machines.ScaleSchedule`, nothing coerced."""
    points = result.get("schedule") if isinstance(result, dict) else None
    if not isinstance(points, list):
        raise ValueError(f"{where}: the schedule must be a list of [t, P] pairs, got {points!r}")
    try:
        return ScaleSchedule(tuple(tuple(p) if isinstance(p, list) else p for p in points))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def write_calibration(result: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
