"""machines: the analytic score machines, their posterior backends and the DDIM sampler.

The backends wing, :mod:`machines.posterior`, holds every backend's statistics and helpers as well;
the registered backends (and their statistics) and the registry are re-exported here.
"""

from . import native, posterior
from .analytic import MACHINES, Denoiser, ScoreMachine
from .posterior import BACKENDS, REGISTERED, Backend, BackendSpec, describe_backends, make_backend, parse_backend
from .sampler import StepRecorder, ddim_grid, identity_of, noise_from_seeds, sample
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

globals().update(REGISTERED)  # every registered backend and its statistics

__all__ = [
    "BACKENDS",
    "MACHINES",
    "Backend",
    "BackendSpec",
    "Denoiser",
    "ScaleSchedule",
    "ScoreMachine",
    "StepRecorder",
    "abar",
    "alpha_sigma2",
    "ddim_grid",
    "describe_backends",
    "eps_from_x0",
    "identity_of",
    "native",
    "make_backend",
    "posterior",
    "noise_from_seeds",
    "parse_backend",
    "reference_schedule",
    "reference_schedules",
    "sample",
    "score_from_x0",
    "x0_from_eps",
    *REGISTERED,
]
