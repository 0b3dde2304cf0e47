"""No file the project reads can run code, and no damaged file is half-used.

Every loader meets a planted pickle whose loading would create a marker file (as an attacker's would run a
command): models, training checkpoints, sampling checkpoints, kept batches, evaluation samples, calibration
similarities, ablation references and their seed parts, bank image statistics, benchmark results. Each is
refused (or, for a cache, ignored and recomputed) and the marker never appears. Truncated and garbage files
are refused with the file named."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from machines import ScoreMachine, noise_from_seeds, sample
from patchbank import MemoryBank, random_images
from patchbank.atomic import read_torch
from patchbank.base import ImageStatistics
from pipelines.ablation import AblationConfig, run_ablation
from pipelines.calibration import calibrate
from pipelines.evaluation import evaluate
from pipelines.sampling import SampleConfig, run_explain, run_sample
from pipelines.training import TrainConfig, load_network, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


class Plant:
    """Unpickling this creates ``marker`` (what a hostile file would do with a shell command instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def plant(tmp_path):
    """``plant(path)`` writes a torch file at ``path`` whose loading (without ``weights_only``) creates a marker;
    the test fails if the marker ever appears."""
    marker = tmp_path / "code-ran"

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": Plant(marker), "run": Plant(marker), "key": Plant(marker)}, path)
        assert not marker.exists()
        return path

    yield make
    assert not marker.exists(), "loading a planted file ran its code"


REFUSED = "holds objects other than tensors and plain values"


def _data():
    return random_images(8, (1, 6, 6), seed=1)


def test_a_planted_model_file_is_refused(plant, tmp_path):
    with pytest.raises(ValueError, match=REFUSED):
        load_network(plant(tmp_path / "model.pt"))


def test_a_planted_training_checkpoint_is_refused(plant, tmp_path):
    out = tmp_path / "train"
    plant(out / "checkpoint.pt")
    cfg = TrainConfig(dataset="random", resize=None, n_train=8, width=4, blocks=1, iters=2, batch=4, device="cpu", out=str(out))
    with pytest.raises(ValueError, match=f"training checkpoint .*{REFUSED}"):
        train(cfg, progress=False)


def test_a_planted_sampling_checkpoint_is_refused(plant, tmp_path):
    machine = ScoreMachine(MemoryBank(_data()), "bbELS", scales=3)
    with pytest.raises(ValueError, match=f"checkpoint .*sample.ckpt {REFUSED}"):
        sample(machine, noise_from_seeds([0], (1, 6, 6)), 3, checkpoint=plant(tmp_path / "sample.ckpt"))


def test_planted_kept_batches_are_refused(plant, tmp_path):
    out = tmp_path / "s"
    plant(out / "batches" / "kept.pt")
    cfg = SampleConfig(dataset="random", n_train=8, resize=None, scale=3, seeds=[0, 1], steps=2, batch=1, out=str(out))
    with pytest.raises(ValueError, match=f"kept batches .*{REFUSED}"):
        run_sample(cfg)


def test_planted_samples_are_refused_by_explain(plant, tmp_path):
    out = tmp_path / "s"
    run_sample(SampleConfig(dataset="random", n_train=8, resize=None, scale=3, seeds=[0], steps=2, out=str(out)))
    plant(out / "samples.pt")
    with pytest.raises(ValueError, match=f"samples .*{REFUSED}"):
        run_explain(out)


def test_planted_evaluation_samples_are_refused(plant, tmp_path):
    machine = ScoreMachine(MemoryBank(_data()), "bbELS", scales=3)
    plant(tmp_path / "ev" / "samples.pt")
    with pytest.raises(ValueError, match=f"evaluation samples .*{REFUSED}"):
        evaluate(machine, machine, machine, [0], (1, 6, 6), tmp_path / "ev", steps=2, progress=False)


def test_planted_calibration_similarities_are_refused(plant, tmp_path):
    bank = MemoryBank(_data())
    net = ScoreMachine(bank, "IS")
    plant(tmp_path / "cal" / "similarity.pt")
    with pytest.raises(ValueError, match=f"kept similarities .*{REFUSED}"):
        calibrate(net, lambda P: ScoreMachine(bank, "bbELS", scales=P), [3], [0], (1, 6, 6), steps=2, progress=False,
                  resume=tmp_path / "cal")


@pytest.mark.parametrize("planted", ["reference.pt", "reference/seed0.pt"])
def test_planted_ablation_references_are_refused(plant, tmp_path, planted):
    out = tmp_path / "ab"
    plant(out / planted)
    cfg = AblationConfig(dataset="random", resize=None, n_train=8, seeds=[0], steps=2, grid=["exact"], concentration=False,
                         schedule="MNIST_ResNet_zeros", banks=str(tmp_path / "banks"), out=str(out))
    with pytest.raises(ValueError, match=REFUSED):
        run_ablation(cfg, progress=False)


def test_planted_image_statistics_are_ignored_and_recomputed(plant, tmp_path, caplog):
    path = plant(tmp_path / "statistics" / "images.pt")
    assert ImageStatistics.load(path, "fingerprint") is None
    assert REFUSED in caplog.text


def test_a_planted_benchmark_result_is_refused(plant, tmp_path):
    from _results import Results

    results = Results(tmp_path / "bench", {"exact": {"n": 1}})
    plant(results.path("exact", 0))
    with pytest.raises(ValueError, match=REFUSED):
        results.load("exact", 0)


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", "half"])
def test_truncated_and_garbage_files_are_refused_naming_them(tmp_path, content):
    path = tmp_path / "samples.pt"
    if content == "half":
        torch.save({"x": torch.zeros(1000)}, path)
        content = path.read_bytes()[:700]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"evaluation samples {path} is unreadable"):
        read_torch(path, "evaluation samples")


def test_a_sampling_checkpoint_of_the_wrong_shape_is_refused(tmp_path):
    machine = ScoreMachine(MemoryBank(_data()), "bbELS", scales=3)
    noise = noise_from_seeds([0], (1, 6, 6))
    ckpt = tmp_path / "sample.ckpt"
    sample(machine, noise, 3, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "x": state["x"][..., :3]}, ckpt)
    with pytest.raises(ValueError, match="not a sampling checkpoint of this run"):
        sample(machine, noise, 3, checkpoint=ckpt)


def test_damaged_evaluation_rows_are_refused(tmp_path):
    machine = ScoreMachine(MemoryBank(_data()), "bbELS", scales=3)
    evaluate(machine, machine, machine, [0, 1], (1, 6, 6), tmp_path / "ev", steps=2, batch=1, progress=False)
    rows = tmp_path / "ev" / "per_seed.jsonl"
    rows.write_text(rows.read_text()[:-10])
    with pytest.raises(ValueError, match="per_seed.jsonl is damaged"):
        evaluate(machine, machine, machine, [0, 1, 2], (1, 6, 6), tmp_path / "ev", steps=2, batch=1, progress=False)
    rows.write_text(json.dumps({"seed": 0, "machine_r": 1.0}) + "\n" + json.dumps({"seed": 5}) + "\n")
    with pytest.raises(ValueError, match="do not hold the seeds of per_seed.jsonl"):
        evaluate(machine, machine, machine, [0, 1, 2], (1, 6, 6), tmp_path / "ev", steps=2, batch=1, progress=False)
    os.remove(tmp_path / "ev" / "samples.pt")
    with pytest.raises(ValueError, match="samples.pt is missing"):
        evaluate(machine, machine, machine, [0, 1, 2], (1, 6, 6), tmp_path / "ev", steps=2, batch=1, progress=False)


GARBAGE = [b"", b"\x00\x01garbage\xff", b"PK\x03\x04truncated zip"]


@pytest.mark.parametrize("content", GARBAGE, ids=["empty", "garbage", "truncated_zip"])
def test_garbage_resume_files_are_refused_naming_them(tmp_path, content):
    """``sample.ckpt``, ``kept.pt``, ``similarity.pt``, ``samples.pt`` and ``run.json`` holding garbage: each job
    refuses with the file named, and writes nothing of its own over it."""
    data = _data()
    bank = MemoryBank(data)
    machine = ScoreMachine(bank, "bbELS", scales=3)
    noise = noise_from_seeds([0], (1, 6, 6))
    cases = [
        (tmp_path / "a" / "sample.ckpt", lambda f: sample(machine, noise, 3, checkpoint=f)),
        (tmp_path / "b" / "batches" / "kept.pt", lambda f: run_sample(SampleConfig(
            dataset="random", n_train=8, resize=None, scale=3, seeds=[0, 1], steps=2, batch=1, out=str(tmp_path / "b")))),
        (tmp_path / "c" / "similarity.pt", lambda f: calibrate(ScoreMachine(bank, "IS"), lambda P: ScoreMachine(bank, "bbELS", scales=P),
                                                               [3], [0], (1, 6, 6), steps=2, progress=False, resume=f.parent)),
        (tmp_path / "d" / "samples.pt", lambda f: evaluate(machine, machine, machine, [0], (1, 6, 6), f.parent, steps=2, progress=False)),
        (tmp_path / "e" / "run.json", lambda f: evaluate(machine, machine, machine, [0], (1, 6, 6), f.parent, steps=2, progress=False)),
    ]
    for path, run in cases:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        with pytest.raises(ValueError) as err:
            run(path)
        assert str(path) in str(err.value), str(err.value)
        assert path.read_bytes() == content  # not overwritten
