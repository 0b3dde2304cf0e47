from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

# One thread per process unless told otherwise: the suite's tensors are small, and its executor tests run
# worker processes (and a local Ray cluster) beside the main one, where 2-thread BLAS in every process on a
# 2-core machine oversubscribes the cores (measured: the whole suite 14:21 with 2 threads against 3:44 with
# one, on this machine with one other single-thread job running). Workers inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from patchbank import ImageData, load_npz, random_images, resize_uint8, to_model_range  # noqa: E402 (after the thread setting)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The offline dataset copies (``$PATCHBANK_DATASETS`` or the checkout's ``../shared/datasets``)."""
    for d in [*os.environ.get("PATCHBANK_DATASETS", "").split(os.pathsep), str(SHARED)]:
        if d and (Path(d) / "mnist.npz").is_file():
            return Path(d)
    if os.environ.get("CI"):  # in CI a missing dataset would turn broken tests into silent skips
        pytest.fail("offline dataset copies not found (set PATCHBANK_DATASETS): with $CI set this is an error")
    pytest.skip("offline dataset copies not found (set PATCHBANK_DATASETS)")


@pytest.fixture(scope="module")
def datasets_env(datasets_dir):
    """``$PATCHBANK_DATASETS`` pointed at the offline copies for a module (restored after it), so that
    datasets load by name (``load_dataset("mnist")``, the CLI, the ablation)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATCHBANK_DATASETS", str(datasets_dir))
        yield datasets_dir


@pytest.fixture(scope="session")
def mnist_at(datasets_dir):
    """``mnist_at(n, resize=None)``: the first ``n`` MNIST training images of the offline copy, resized to
    ``resize × resize`` when given (the same images ``load_dataset("mnist", resize=…, limit=n)`` gives)."""
    full = load_npz(datasets_dir / "mnist.npz")
    cache: dict[tuple[int, int | None], ImageData] = {}

    def make(n: int, resize: int | None = None) -> ImageData:
        if (n, resize) not in cache:
            data = full.subset(n)
            if resize is not None:
                data = ImageData(resize_uint8(data.images, (resize, resize)), data.labels, data.name)
            cache[(n, resize)] = data
        return cache[(n, resize)]

    return make


@pytest.fixture
def tiny() -> callable:
    """6 seeded random images of 7×9 with labels 0,1,0,1,0,1; C chosen by the caller."""

    def make(C: int = 1) -> ImageData:
        return random_images(6, (C, 7, 9), classes=2, seed=C)

    return make


def noised(data: ImageData, t: float, n: int, seed: int = 0) -> torch.Tensor:
    """x_t for the first n training images, float64: √ᾱ·x0 + √(1−ᾱ)·ε."""
    from machines import alpha_sigma2

    g = torch.Generator().manual_seed(seed)
    a, s2 = alpha_sigma2(t)
    x0 = to_model_range(data.images[:n], torch.float64)
    return a * x0 + s2**0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"1m"``) mounted at ``folder`` for a disk that fills; the test is skipped where one
    cannot be mounted (it needs root on Linux)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def put_shard(bank: Path, shard: str, other: Path) -> None:
    """Replace shard folder ``shard`` of the sharded bank at ``bank`` by the same-named shard of the bank at ``other``."""
    shutil.rmtree(bank / shard)
    shutil.copytree(other / shard, bank / shard)


def experiment(name: str) -> ModuleType:
    """The script ``experiments/<name>.py`` loaded as a module (the experiments folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
