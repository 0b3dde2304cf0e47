"""pipelines: jobs composed from machines and patchbank: sampling, training, calibration, evaluation, figures."""

from machines.metrics import mse, pearson_r, r2

from .calibration import calibrate, schedule_from
from .evaluation import evaluate
from .jobs import CalibrateConfig, EvaluateConfig, run_calibrate, run_evaluate
from .networks import NetworkDenoiser, ResNet, UNet
from .sampling import SampleConfig, run_sample
from .training import TrainConfig, load_network, train

__all__ = [
    "CalibrateConfig",
    "EvaluateConfig",
    "NetworkDenoiser",
    "ResNet",
    "SampleConfig",
    "TrainConfig",
    "UNet",
    "calibrate",
    "evaluate",
    "load_network",
    "mse",
    "pearson_r",
    "r2",
    "run_calibrate",
    "run_evaluate",
    "run_sample",
    "schedule_from",
    "train",
]
