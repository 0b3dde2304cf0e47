"""Values that would be silently coerced, and writers that would collide, end in errors naming the problem:
config fields of the wrong type or range, schedule entries, a network that returns NaN, 16-bit and
transparent images, two jobs writing one folder, a disk that fills, and workers that outlive their caller."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tmpfs
from PIL import Image

from machines import ScaleSchedule, ScoreMachine, noise_from_seeds, reference_schedule, sample
from patchbank import MemoryBank, load_folder, random_images
from patchbank.atomic import DiskFullError, FolderBusyError, atomic_write, folder_lock
from pipelines.ablation import AblationConfig
from pipelines.calibration import calibrate, schedule_from
from pipelines.cli import main
from pipelines.evaluation import evaluate
from pipelines.jobs import CalibrateConfig, EvaluateConfig
from pipelines.networks import NetworkDenoiser
from pipelines.sampling import SampleConfig
from pipelines.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _cli_error(capsys, argv: list[str], says: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and says in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- config values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, says", [
    ("conditional", "false", "conditional must be true or false"),
    ("ema", True, "ema must be a finite number"),
    ("ema", 1.0, "ema must lie in [0, 1)"),
    ("ema", -0.5, "ema must lie in [0, 1)"),
    ("lr", "fast", "lr must be a finite number"),
    ("lr", 0, "lr must lie in (0, inf)"),
    ("iters", 10.5, "iters must be an integer"),
    ("seed", 1.5, "seed must be an integer"),
    ("batch", 0, "batch must lie in [1, inf)"),
    ("widths", [8, 16], "widths must be a list of 3 integers"),
    ("padding", "reflect", "padding must be one of"),
])
def test_a_train_config_value_of_the_wrong_type_or_range_writes_nothing(tmp_path, capsys, field, value, says):
    out = tmp_path / "run"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"n_train": 20, "out": str(out), field: value}))
    err = _cli_error(capsys, ["train", "--config", str(config)], says)
    assert str(config) in err  # the file the value came from
    assert not out.exists()


def test_a_cli_override_out_of_range_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"n_train": 20, "out": str(out)}))
    _cli_error(capsys, ["train", "--config", str(config), "--iters", "0"], "iters must lie in [1, inf)")
    _cli_error(capsys, ["train", "--config", str(config), "--n-train", "-3"], "n_train must lie in [1, inf)")
    assert not out.exists()


@pytest.mark.parametrize("cls, values, says", [
    (AblationConfig, {"concentration": "no"}, "concentration must be true or false"),
    (AblationConfig, {"teacher_forced": 1}, "teacher_forced must be true or false"),
    (AblationConfig, {"concentration_mass": 2.0}, "concentration_mass must lie in (0, 1)"),
    (AblationConfig, {"concentration_times": [0.5, 1.5]}, "concentration_times must lie in (0, 1]"),
    (AblationConfig, {"concentration_scales": [4]}, "odd integer"),
    (AblationConfig, {"steps": "20"}, "steps must be an integer"),
    (AblationConfig, {"reference_dtype": "float16"}, "reference_dtype must be one of"),
    (SampleConfig, {"seeds": [0, 1.5]}, "seeds must be a list of integers"),
    (SampleConfig, {"conditional": "yes"}, "conditional must be true or false"),
    (SampleConfig, {"n_train": 0}, "n_train must lie in [1, inf)"),
    (CalibrateConfig, {"candidates": [3, "5"]}, "candidates must be"),
    (CalibrateConfig, {"per_scale": "false"}, "per_scale must be true or false"),
    (EvaluateConfig, {"other_network": "no"}, "other_network must be true or false"),
    (EvaluateConfig, {"steps": 2.0}, "steps must be an integer"),
])
def test_every_config_checks_types_and_ranges(cls, values, says):
    with pytest.raises((TypeError, ValueError), match=None) as err:
        cls(**values)
    assert says in str(err.value), str(err.value)


def test_an_ablation_config_file_names_itself_and_the_field(tmp_path, capsys):
    config = tmp_path / "ablate.json"
    config.write_text(json.dumps({"concentration": "no", "out": str(tmp_path / "ab")}))
    err = _cli_error(capsys, ["ablate", "--config", str(config)], "concentration must be true or false")
    assert str(config) in err and not (tmp_path / "ab").exists()


def test_valid_values_are_kept_as_given():
    cfg = TrainConfig(ema=0.999, lr=1, widths=[4, 8, 16], n_train=None, resize=None)  # an int for a float is a number
    assert cfg.ema == 0.999 and cfg.lr == 1
    assert AblationConfig(concentration=False, concentration_scales=[3, 5]).concentration is False


# ---- schedule files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("entries, says", [
    ([[0.1, 5.9]], "entry 0 [0.1, 5.9]: P must be an odd integer"),
    ([[0.1, True]], "P must be an odd integer >= 1, got True"),
    ([[0.1, "7"]], "P must be an odd integer >= 1, got '7'"),
    ([[0.1, 5], [0.2, 4]], "entry 1 [0.2, 4]"),
    ([[2.5, 5]], "t must be a number in [0, 1], got 2.5"),
    ([[float("nan"), 5]], "t must be a number in [0, 1], got nan"),
    ([[0.3, 5], [0.3, 7]], "entries 0 and 1 both give t = 0.3"),
    ([[0.3, 5, 1]], "must be a pair (t, P)"),
])
def test_schedule_entries_are_refused_naming_the_entry(entries, says):
    with pytest.raises(ValueError) as err:
        schedule_from({"schedule": entries}, "calibration cal.json")
    assert says in str(err.value) and "cal.json" in str(err.value), str(err.value)


def test_a_schedule_file_is_checked_entry_by_entry(tmp_path):
    good = {"calibrated_at_t": [0.5, 1.0], "schedules": {"mine": [3, 5]}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert reference_schedule("mine", path=tmp_path / "good.json").points == ((0.5, 3), (1.0, 5))
    bad = {"calibrated_at_t": [0.5, 1.0], "schedules": {"mine": [3, 5.9]}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json.*entry 1 \[1.0, 5.9\]"):
        reference_schedule("mine", path=tmp_path / "bad.json")
    assert ScaleSchedule(((np.float64(0.5), np.int64(3)),)).points == ((0.5, 3),)  # numpy scalars are numbers


# ---- a network returning NaN ------------------------------------------------------------------------------
class NaNLate(nn.Module):
    """An ε-network that returns zeros, and NaN from t < 0.5 on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return torch.where(t[:, None, None, None] < 0.5, torch.nan, 0.0) * torch.ones_like(x) + self.w


def test_a_network_returning_nan_is_named_with_its_step(tmp_path):
    data = random_images(8, (1, 6, 6), seed=1)
    net = NetworkDenoiser(NaNLate(), "outputs/nan/model.pt")
    noise = noise_from_seeds([0, 1], data.shape, torch.float64)
    with pytest.raises(FloatingPointError, match=r"network outputs/nan/model.pt returned NaN or Inf at step 12 of 20 "
                                                 r"\(t = 0.45\), in sample\(s\) \[0, 1\]"):
        sample(net, noise, 20)
    bank = MemoryBank(data)
    with pytest.raises(FloatingPointError, match="network outputs/nan/model.pt"):  # not the machine's input check
        calibrate(net, lambda P: ScoreMachine(bank, "bbELS", scales=P), [3], [0], data.shape, steps=4, progress=False)
    ideal = ScoreMachine(bank, "IS")
    with pytest.raises(FloatingPointError, match="network outputs/nan/model.pt"):
        evaluate(net, ScoreMachine(bank, "bbELS", scales=3), ideal, [0, 1], data.shape, tmp_path / "ev", steps=4, progress=False)
    assert not (tmp_path / "ev" / "report.json").exists()


# ---- images ---------------------------------------------------------------------------------------------
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(wide).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    got = load_folder(tmp_path).images[0, 0].numpy()
    assert np.array_equal(got, np.rint(wide.astype(np.int64) * 255 / 65535).astype(np.uint8))
    assert (got == 255).mean() < 0.05  # clipping made nearly every pixel 255


def test_transparent_images_are_refused_and_opaque_alpha_is_kept(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((6, 6, 1), 255, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_folder(tmp_path).images[0].permute(1, 2, 0).numpy(), rgb)  # no information in alpha
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a.png: has transparent pixels"):
        load_folder(tmp_path)


# ---- two writers, one folder --------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from patchbank.atomic import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds (as a running sample or evaluation would)."""
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc.pid
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_busy_folder_fails_at_once(held, capsys, tmp_path):
    folder, pid = held
    err = _cli_error(capsys, ["sample", "--dataset", "random", "--n-train", "8", "--seeds", "0", "--steps", "2",
                              "--scale", "3", "--out", str(folder)], f"being written to by another process (pid {pid})")
    data = random_images(8, (1, 6, 6), seed=1)
    bank = MemoryBank(data)
    machine = ScoreMachine(bank, "bbELS", scales=3)
    with pytest.raises(FolderBusyError, match=f"pid {pid}"):
        evaluate(machine, machine, machine, [0], data.shape, folder, steps=2, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"], err  # nothing of either run was written


def test_the_lock_goes_with_its_holder(held, tmp_path):
    folder, pid = held
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    with folder_lock(folder, reentrant=True):  # a killed holder leaves the file but not the lock
        with folder_lock(folder, reentrant=True):  # a job inside a job may take it again
            with pytest.raises(FolderBusyError):  # but nothing else, in this process or another
                with folder_lock(folder):
                    pass


def test_temporary_names_are_unique_per_writer_and_removed_on_failure(tmp_path):
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write(tmp_path / "a.json", write)
    atomic_write(tmp_path / "a.json", write)
    assert seen[0] != seen[1] and seen[0].suffix == ".json" and str(os.getpid()) in seen[0].name

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("writer broke")

    with pytest.raises(RuntimeError, match="writer broke"):
        atomic_write(tmp_path / "b.pt", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ---- a full disk -----------------------------------------------------------------------------------------
def test_a_full_disk_is_named_whatever_the_writer_says(tmp_path, monkeypatch):
    def enospc(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"no space left on the disk holding .*samples.pt"):
        atomic_write(tmp_path / "samples.pt", enospc)
    assert not list(tmp_path.iterdir())

    def torch_says(tmp: Path) -> None:
        raise RuntimeError("basic_ios::clear: iostream error")

    import patchbank.atomic as atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 0)
    with pytest.raises(DiskFullError, match="report.json"):
        atomic_write(tmp_path / "report.json", torch_says)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match="basic_ios"):  # with space left it is some other failure: kept as it is
        atomic_write(tmp_path / "report.json", torch_says)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount one: root on Linux; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * (2 << 20))
        except OSError:
            pass
    return filler


def test_torch_writes_on_a_full_disk_are_named_and_leave_nothing(small_disk):
    _fill(small_disk)
    with pytest.raises(DiskFullError, match=r"no space left on the disk holding .*x.pt"):  # torch says "enforce fail"
        atomic_write(small_disk / "x.pt", lambda p: torch.save({"x": torch.zeros(5000)}, p))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_sample_on_a_full_disk_names_the_file_and_resumes_once_freed(small_disk, tmp_path, capsys):
    args = ["sample", "--dataset", "random", "--n-train", "8", "--seeds", "0-1", "--steps", "3", "--scale", "3"]
    filler = _fill(small_disk)
    _cli_error(capsys, [*args, "--out", str(small_disk / "out")], "no space left on the disk holding")
    assert not [p for p in (small_disk / "out").iterdir() if ".tmp" in p.name]  # no half-written file left
    filler.unlink()
    main([*args, "--out", str(small_disk / "out")])
    main([*args, "--out", str(tmp_path / "plain")])
    got = torch.load(small_disk / "out" / "samples.pt")["samples"]
    assert torch.equal(got, torch.load(tmp_path / "plain" / "samples.pt")["samples"])


# ---- workers end with their caller --------------------------------------------------------------------------
CALLER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pipelines.executors import ProcessExecutor

    def wait(folder, item):
        Path(folder, f"worker-{os.getpid()}").touch()
        time.sleep(120)

    if __name__ == "__main__":
        ProcessExecutor(2, threads=1).map(wait, sys.argv[1], [0, 1], lambda item, result: None, progress=False)
""")


def test_killing_the_caller_of_a_process_executor_ends_its_workers(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    caller = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("worker-*"))) < 2:
        assert time.monotonic() < deadline and caller.poll() is None, "the workers did not start"
        time.sleep(0.2)
    workers = [int(p.name.removeprefix("worker-")) for p in tmp_path.glob("worker-*")]
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their killed caller"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
