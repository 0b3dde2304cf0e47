"""pipelines: jobs composed from machines and patchbank (sampling now; training, calibration, evaluation later)."""

from .sampling import SampleConfig, run_sample

__all__ = ["SampleConfig", "run_sample"]
