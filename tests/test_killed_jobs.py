"""Jobs killed with SIGKILL part way (``evaluate``, ``calibrate``, ``sample --executor processes:2``) resume when
re-run and end bit for bit where an uninterrupted run ends; no worker outlives its killed caller; and a disk
that fills during a build, a sample or an evaluation is a one-line error, after which the re-run (once space is
freed) equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tmpfs

from patchbank import PatchBank
from patchbank.atomic import read_torch
from pipelines.jobs import CalibrateConfig, run_calibrate
from pipelines.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def network(datasets_env, tmp_path_factory) -> tuple[str, str]:
    """A tiny trained MNIST ResNet and its calibration: ``(model.pt, calibration.json)``."""
    root = tmp_path_factory.mktemp("killed")
    model = str(train(TrainConfig(resize=12, n_train=60, width=8, blocks=2, iters=4, batch=16, checkpoint_every=2, device="cpu",
                                  out=str(root / "train")), progress=False))
    run_calibrate(CalibrateConfig(model=model, candidates=[3, 5], seeds=[100, 101], steps=3, out=str(root / "cal")))
    return model, str(root / "cal" / "calibration.json")


def _cli(args: list[str], datasets_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATCHBANK_DATASETS": str(datasets_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(args: list[str], datasets_dir: Path) -> None:
    proc = _cli(args, datasets_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_when(proc: subprocess.Popen, ready: Path, children: bool = False) -> list[int]:
    """SIGKILL ``proc`` as soon as ``ready`` exists (its first kept result); returns the pids of its child
    processes at that moment when ``children``."""
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the job kept nothing in time"
        time.sleep(0.02)
    kids = _children(proc.pid) if children else []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kids


def test_a_killed_evaluation_resumes_bit_for_bit(network, datasets_dir, tmp_path):
    model, calibration = network
    args = ["evaluate", "--model", model, "--calibration", calibration, "--seeds", "0-7", "--batch", "1", "--steps", "6"]
    _run([*args, "--out", str(tmp_path / "whole")], datasets_dir)
    _kill_when(_cli([*args, "--out", str(tmp_path / "killed")], datasets_dir), tmp_path / "killed" / "per_seed.jsonl")
    assert not (tmp_path / "killed" / "report.json").exists()
    _run([*args, "--out", str(tmp_path / "killed")], datasets_dir)
    rows = [(tmp_path / d / "per_seed.jsonl").read_text() for d in ("whole", "killed")]
    assert rows[0] == rows[1]
    a, b = (read_torch(tmp_path / d / "samples.pt") for d in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[s][n], b[s][n]) for s in a for n in a[s])


def test_a_killed_calibration_resumes_bit_for_bit(network, datasets_dir, tmp_path):
    model, _ = network
    args = ["calibrate", "--model", model, "--candidates", "3", "5", "--seeds", "0-5", "--batch", "1", "--steps", "6"]
    _run([*args, "--out", str(tmp_path / "whole")], datasets_dir)
    _kill_when(_cli([*args, "--out", str(tmp_path / "killed")], datasets_dir), tmp_path / "killed" / "seeds" / "similarity.pt")
    assert not (tmp_path / "killed" / "calibration.json").exists()
    _run([*args, "--out", str(tmp_path / "killed")], datasets_dir)
    a, b = (json.loads((tmp_path / d / "calibration.json").read_text()) for d in ("whole", "killed"))
    assert (a["schedule"], a["similarity"], a["per_seed"]) == (b["schedule"], b["similarity"], b["per_seed"])


def test_a_killed_parallel_sample_resumes_bit_for_bit_and_leaves_no_workers(datasets_dir, tmp_path):
    args = ["sample", "--n-train", "60", "--resize", "12", "--seeds", "0-7", "--steps", "6", "--scale", "3",
            "--executor", "processes:2"]
    _run([*args, "--out", str(tmp_path / "whole")], datasets_dir)
    caller = _cli([*args, "--out", str(tmp_path / "killed")], datasets_dir)
    workers = _kill_when(caller, tmp_path / "killed" / "batches" / "kept.pt", children=True)
    assert workers, "no worker processes were seen"
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "workers outlived their killed caller"
    _run([*args, "--out", str(tmp_path / "killed")], datasets_dir)
    a, b = (read_torch(tmp_path / d / "samples.pt")["samples"] for d in ("whole", "killed"))
    assert torch.equal(a, b)


# ---- a disk that fills --------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount one: root on Linux; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


def _fill_all_but(disk: Path, keep: int) -> Path:
    """Leave about ``keep`` bytes free on ``disk``; returns the filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - keep))
    return filler


def _one_line_error(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]  # after the progress bars


def test_a_build_on_a_full_disk_fails_clearly_and_resumes_once_freed(small_disk, datasets_dir, tmp_path):
    args = ["build", "--dataset", "mnist", "--n-train", "60", "--resize", "12", "--scales", "3", "5", "--index", "Flat"]
    filler = _fill_all_but(small_disk, 300_000)  # room for part of the bank only
    err = _one_line_error(_cli([*args, str(small_disk / "bank")], datasets_dir))
    assert err.startswith("patchbank build: error: no space left on the disk holding the bank"), err
    filler.unlink()
    _run([*args, str(small_disk / "bank")], datasets_dir)
    _run([*args, str(tmp_path / "whole")], datasets_dir)
    resumed, whole = PatchBank.open(small_disk / "bank"), PatchBank.open(tmp_path / "whole")
    assert resumed.verify() == {} and resumed.manifest["bucket_digests"] == whole.manifest["bucket_digests"]


def test_an_evaluation_on_a_full_disk_fails_clearly_and_resumes_once_freed(network, small_disk, datasets_dir, tmp_path):
    model, calibration = network
    args = ["evaluate", "--model", model, "--calibration", calibration, "--seeds", "0-3", "--batch", "1", "--steps", "4"]
    out = small_disk / "ev"
    _run([*args, "--seeds", "0", "--out", str(out)], datasets_dir)  # the folder and its first seed exist
    filler = _fill_all_but(small_disk, 0)
    err = _one_line_error(_cli([*args, "--out", str(out)], datasets_dir))
    assert "no space left on the disk holding" in err, err
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    filler.unlink()
    _run([*args, "--out", str(out)], datasets_dir)
    _run([*args, "--out", str(tmp_path / "whole")], datasets_dir)
    assert (out / "per_seed.jsonl").read_text() == (tmp_path / "whole" / "per_seed.jsonl").read_text()
