"""Exact-vs-approximate ablations and the posterior-concentration study.

One reference run (the exact backend on the deduplicated bank) fixes, for every seed, the DDIM
states ``x_i`` it visits and its denoised estimates ``x̂0_i``. Every configuration of the grid is
then measured twice:

* **free run** — its own DDIM trajectory from the same noise, timed, with the backend's per-step
  statistics (fallback fraction, certified ε, search/top-k/exact seconds) and the peak memory;
  its final samples are compared with the reference's (Pearson r, R², max |Δ|) and, when a
  trained network is given, with the network's (does the approximation change the science?);
* **teacher-forced** — its ``x̂0`` at the reference's states, so the measured per-step error
  ``max |x̂0 − x̂0_exact|`` is compared with what the backend certifies (its ``error_bound``;
  statistical and heuristic backends report standard errors instead).

A grid entry is a backend spec of the registry (``exact``, ``exact:dedup=0``, ``topk:k=64``,
``topk:k=256:index=IVF64,Flat:nprobe=8``, ``tail:k=64:samples=1024``, ``auto:se_tol=0.005``,
``summary:tol=1e-3:leaf_size=256``, ``…:dtype=float32`` for float32 exact sums; ``patchbank
backends`` lists them all), optionally with ``:device=cuda``. A backend that names an ``index``
runs on a bank built with that FAISS index (under ``banks``, built once and reused).

Modules: :mod:`.config` (the run's config, grid entries and result keys), :mod:`.run` (reference,
configurations, report files), :mod:`.report` (rows, markdown, CSV), :mod:`.resources` (memory,
environment), :mod:`.concentration` (the study).
"""

from .concentration import concentration_study, entries_for_mass, posterior_concentration
from .config import DEFAULT_GRID, AblationConfig, Variant
from .report import best_configuration, summary_markdown
from .resources import PeakMemory, environment
from .run import run_ablation

__all__ = [
    "DEFAULT_GRID",
    "AblationConfig",
    "PeakMemory",
    "Variant",
    "best_configuration",
    "concentration_study",
    "entries_for_mass",
    "environment",
    "posterior_concentration",
    "run_ablation",
    "summary_markdown",
]
