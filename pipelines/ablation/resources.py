"""What a run costs and where it ran: peak memory while a block runs, library versions and devices."""

from __future__ import annotations

import os
import platform
import threading

import torch


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms;
    on CUDA also the peak allocated GPU memory."""

    def __init__(self, device: str = "cpu", interval: float = 0.02) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = self.base_mb = self.gpu_mb = 0.0

    def __enter__(self) -> PeakMemory:
        self.base_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if self.device.startswith("cuda"):
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: fall back to the process-lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    """Library versions, threads and devices: what a reader needs to re-run or compare timings."""
    import numpy
    import zarr

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
           "zarr": zarr.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import faiss

        env["faiss"] = faiss.__version__
        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        env["faiss"] = None
    return env

