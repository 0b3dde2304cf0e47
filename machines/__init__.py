"""machines: the analytic score machines, their posterior backends and the DDIM sampler."""

from .analytic import MACHINES, Denoiser, ScoreMachine
from . import kernels
from .exact import ExactBackend, PairStats
from .policy import AutoBackend, PolicyStats
from .summary import ClusterMoments, SummaryBackend, SummaryStats
from .tail import SampledTailBackend, TailEstimate, TailStats
from .topk import TopKBackend, TopKStats
from .sampler import ddim_grid, noise_from_seeds, sample
from .schedule import (
    ScaleSchedule,
    abar,
    alpha_sigma2,
    eps_from_x0,
    reference_schedule,
    reference_schedules,
    score_from_x0,
    x0_from_eps,
)

__all__ = [
    "MACHINES",
    "AutoBackend",
    "PolicyStats",
    "Denoiser",
    "ExactBackend",
    "PairStats",
    "TailEstimate",
    "TailStats",
    "TopKBackend",
    "TopKStats",
    "SampledTailBackend",
    "ClusterMoments",
    "SummaryBackend",
    "SummaryStats",
    "ScaleSchedule",
    "ScoreMachine",
    "abar",
    "alpha_sigma2",
    "ddim_grid",
    "eps_from_x0",
    "kernels",
    "noise_from_seeds",
    "reference_schedule",
    "reference_schedules",
    "sample",
    "score_from_x0",
    "x0_from_eps",
]
