"""Every way of feeding the project something wrong ends in an error that names the problem, or in a
documented rule, never in a silently wrong result: damaged banks, reused checkpoints and output folders,
unknown config keys, bad tensors, bad data files, half-written builds, and the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from machines import ScaleSchedule, ScoreMachine, TopKBackend, noise_from_seeds, sample
from patchbank import BankError, BankSpec, BucketKey, ImageData, MemoryBank, PatchBank, load_folder, load_npz, random_images
from patchbank.integrity import build_lock
from pipelines.ablation import AblationConfig
from pipelines.cli import main
from pipelines.evaluation import evaluate
from pipelines.training import TrainConfig

H = 12
INTERIOR3 = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))


@pytest.fixture(scope="module")
def data(mnist_at) -> ImageData:
    return mnist_at(40, resize=H)


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> PatchBank:
    return PatchBank.build(data, tmp_path_factory.mktemp("bad") / "bank", BankSpec(scales=[3], index="Flat"), progress=False)


def _copy(bank: PatchBank, to: Path) -> Path:
    shutil.copytree(bank.path, to)
    return to


def _chunks(array_dir: Path) -> list[Path]:
    return [f for f in sorted((array_dir / "c").rglob("*")) if f.is_file()]


def _error_line(capsys, argv: list[str], says: str) -> str:
    """Run the CLI; it must exit 2 with one ``patchbank <cmd>: error: …`` line naming the problem, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and says in err, err
    return err


# ---- silent wrong results ---------------------------------------------------------------------------
@pytest.mark.parametrize("array", ["patches", "cluster_order", "counts"])
def test_a_bank_missing_a_chunk_is_an_error_and_the_build_repairs_it(built, data, tmp_path, array):
    x = noise_from_seeds([0], (1, H, H), torch.float64)
    intact = sample(ScoreMachine(built, "bbELS", 3), x, steps=3)
    path = _copy(built, tmp_path / "bank")
    _chunks(path / "buckets" / "bbELS-P3-zeros-1_1_1_1-all" / array)[0].unlink()  # zarr would read zeros
    with pytest.raises(BankError, match=f"'{array}'.*re-run the same build"):
        sample(ScoreMachine(PatchBank.open(path), "bbELS", 3), x, steps=3)
    assert "bbELS-P3-zeros-1_1_1_1-all" in PatchBank.open(path).verify()
    repaired = PatchBank.build(data, path, BankSpec(scales=[3], index="Flat"), progress=False)
    assert repaired.verify() == {}
    torch.testing.assert_close(sample(ScoreMachine(repaired, "bbELS", 3), x, steps=3), intact, rtol=0, atol=0)


def test_a_damaged_index_file_or_data_is_an_error_and_rebuilt(built, data, tmp_path, capsys):
    path = _copy(built, tmp_path / "bank")
    index = path / "buckets" / "bbELS-P3-zeros-1_1_1_1-all" / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])  # truncated
    q = torch.zeros(2, 9)
    with pytest.raises(BankError, match="index.faiss"):
        PatchBank.open(path).search(INTERIOR3, q, 4, engine="faiss")
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(path)])
    assert exit_.value.code == 1 and "index.faiss" in capsys.readouterr().out
    PatchBank.build(data, path, BankSpec(scales=[3], index="Flat"), progress=False)
    main(["verify", str(path)])
    assert "intact" in capsys.readouterr().out


def test_a_checkpoint_of_another_run_is_refused(data, tmp_path):
    noise = noise_from_seeds([0], (1, H, H), torch.float64)
    ckpt = tmp_path / "run.ckpt"
    sample(ScoreMachine(data, "bbELS", 5), noise, steps=3, checkpoint=ckpt)
    other_data = ImageData(255 - data.images, data.labels)  # same size, other images
    for other in (ScoreMachine(data, "bbELS", 3), ScoreMachine(other_data, "bbELS", 5),
                  ScoreMachine(data, "bbELS", 5, backend="topk:k=8"), ScoreMachine(data, "bbELS", 5, conditional=True)):
        labels = torch.zeros(1, dtype=torch.long) if other.conditional else None
        with pytest.raises(ValueError, match=r"another sampling run \(differs in: machine"):
            sample(other, noise, steps=3, checkpoint=ckpt, labels=labels)
    sample(ScoreMachine(data, "bbELS", 5), noise, steps=3, checkpoint=ckpt)  # the same run: fine


def test_an_evaluation_folder_of_another_run_is_refused(data, tmp_path):
    net, machine, ideal = ScoreMachine(data, "bbELS", 5), ScoreMachine(data, "bbELS", 3), ScoreMachine(data, "IS")
    out = tmp_path / "eval"
    evaluate(net, machine, ideal, [0], (1, H, H), out, steps=3, progress=False)
    with pytest.raises(ValueError, match="another run.*steps"):
        evaluate(net, machine, ideal, [0, 1], (1, H, H), out, steps=4, progress=False)
    with pytest.raises(ValueError, match="another run.*machine"):
        evaluate(net, ScoreMachine(data, "LS", 3), ideal, [0], (1, H, H), out, steps=3, progress=False)
    report = evaluate(net, machine, ideal, [0, 1], (1, H, H), out, steps=3, progress=False)  # more seeds, same run
    assert report["seeds"] == 2


def test_unknown_config_keys_are_errors_with_a_suggestion(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match="unknown TrainConfig key 'learning_rate'"):
        TrainConfig.from_json(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps({"emaa": 0.9}))
    with pytest.raises(ValueError, match="'emaa'; did you mean 'ema'"):
        TrainConfig.from_json(tmp_path / "train.json")
    (tmp_path / "ablate.json").write_text(json.dumps({"ablation": {"seedz": [5]}, "environment": {}}))
    with pytest.raises(ValueError, match="'seedz'; did you mean 'seeds'"):
        AblationConfig.from_json(tmp_path / "ablate.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        TrainConfig.from_json(tmp_path / "list.json")


@pytest.mark.parametrize("bad, error, says", [
    (torch.randint(-1, 2, (2, 1, H, H)), TypeError, "float tensor"),
    (np.zeros((2, 1, H, H)), TypeError, "torch.Tensor"),
    (torch.zeros(0, 1, H, H), ValueError, "batch of 0"),
    (torch.zeros(2, 1, H, H + 1), ValueError, "built for images"),
])
def test_bad_machine_inputs_are_errors(data, bad, error, says):
    with pytest.raises(error, match=says):
        ScoreMachine(data, "bbELS", 3)(bad, 0.5)  # type: ignore[arg-type]


def test_nan_and_inf_are_caught_where_they_enter(data):
    x = torch.zeros(2, 1, H, H, dtype=torch.float64)
    x[1, 0, 4, 7] = torch.nan
    for kind, P in (("bbELS", 3), ("IS", None)):
        with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \[1, 0, 4, 7\]\)"):
            ScoreMachine(data, kind, P)(x, 0.5)
    noise = noise_from_seeds([0], (1, H, H), torch.float64)
    noise[0, 0, 0, 0] = torch.inf
    with pytest.raises(ValueError, match="noise holds NaN or Inf"):
        sample(ScoreMachine(data, "bbELS", 3), noise, steps=2)


def test_labels_must_be_a_tensor_and_scales_odd_integers(data):
    x = torch.zeros(2, 1, H, H)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        ScoreMachine(data, "bbELS", 3, conditional=True)(x, 0.5, [0, 1])  # type: ignore[arg-type]
    for P in (3.0, True, 4, 0):
        with pytest.raises(ValueError, match="odd integer"):
            ScoreMachine(data, "bbELS", P)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="odd integer"):
        ScaleSchedule(((0.5, 2),))


@pytest.mark.parametrize("spec, says", [("topk:k=0", "k"), ("topk:tol=-1", "tol"), ("topk:tol=nan", "tol"),
                                        ("summary:tol=nan", "tol"), ("auto:se_tol=nan", "se_tol"), ("tail:min_ess=-1", "min_ess")])
def test_bad_backend_options_are_errors(spec, says, capsys):
    _error_line(capsys, ["sample", "--backend", spec], says)


# ---- data that would change on load ------------------------------------------------------------------
def test_labels_must_be_whole_numbers(tmp_path):
    x = np.zeros((3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "frac.npz", x_train=x, y_train=np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"frac.npz: y_train must be whole-number class labels.*0\.5"):
        load_npz(tmp_path / "frac.npz")
    np.savez(tmp_path / "whole.npz", x_train=x, y_train=np.array([0.0, 2.0, 1.0]))
    assert load_npz(tmp_path / "whole.npz").labels.tolist() == [0, 2, 1]  # the documented rule: whole floats convert
    np.savez(tmp_path / "float_images.npz", x_train=x.astype(np.float32), y_train=np.arange(3))
    with pytest.raises(ValueError, match="must be uint8"):
        load_npz(tmp_path / "float_images.npz")
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="noise.npz is not a readable .npz"):
        load_npz(tmp_path / "noise.npz")
    with pytest.raises(ValueError, match="holds no images"):
        ImageData(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


def test_a_folder_mixing_class_folders_and_loose_images_is_an_error(tmp_path):
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "cats" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="both class folders and loose images"):
        load_folder(tmp_path)


# ---- half-written state ----------------------------------------------------------------------------
def test_a_bad_spec_writes_nothing(data, tmp_path):
    for kw in ({"scales": [4]}, {"scales": [3], "leaf_size": 0}, {"scales": []}, {"scales": [3.0]}):
        with pytest.raises(ValueError):
            PatchBank.build(data, tmp_path / "bank", BankSpec(**kw), progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "bank").exists()
    PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], index=None), progress=False)  # the corrected run works


def test_builds_refuse_foreign_folders_and_a_second_builder(data, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(BankError, match="not a patch bank"):
        PatchBank.build(data, tmp_path / "notes", BankSpec(scales=[3]), progress=False)
    with build_lock(tmp_path / "bank"):
        with pytest.raises(BankError, match="being built by another process"):
            PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], index=None), progress=False)
    PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], index=None), progress=False)


def test_damaged_bank_files_are_errors_naming_them(built, tmp_path):
    path = _copy(built, tmp_path / "bank")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BankError, match="manifest.json is corrupted: a JSON object"):
        PatchBank.open(path)
    (path / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "fingerprint"}))
    with pytest.raises(BankError, match="lacks fingerprint"):
        PatchBank.open(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    stats = path / "buckets" / "bbELS-P3-zeros-1_1_1_1-all" / "stats.json"
    stats.write_text("{garbage")
    with pytest.raises(BankError, match="stats.json is corrupted"):
        PatchBank.open(path)
    stats.unlink()
    (stats.with_name("timing.json")).write_text("7")
    stats.write_text("{}")
    with pytest.raises(BankError, match="timing.json is corrupted"):
        PatchBank.open(path)


# ---- the command line ------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys, datasets_env):
    _error_line(capsys, ["sample", "--seeds", "5-1"], "empty seed range")
    _error_line(capsys, ["sample", "--seeds", "-1"], "non-negative integers")
    _error_line(capsys, ["sample", "--machine", "IS", "--scale", "3"], "--scale does not apply")
    _error_line(capsys, ["sample", "--labels", "0,1"], "add --conditional")
    (tmp_path / "file").write_text("x")
    _error_line(capsys, ["sample", "--out", str(tmp_path / "file" / "out"), "--n-train", "5"], "file")
    _error_line(capsys, ["info", str(tmp_path / "nowhere")], "no patch bank")
    _error_line(capsys, ["evaluate", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "ev")], "no trained model")
    assert not (tmp_path / "ev").exists()
    _error_line(capsys, ["evaluate", "--batch", "0", "--out", str(tmp_path / "ev")], "batch must be >= 1")
    assert not (tmp_path / "ev").exists()
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    _error_line(capsys, ["calibrate", "--model", str(tmp_path / "bad.pt")], "not a readable trained model")
    _error_line(capsys, ["sample", "--dataset", str(tmp_path / "none.npz")], "no such dataset file")
    _error_line(capsys, ["build", str(tmp_path / "b"), "--scales", "4"], "odd integer")
    _error_line(capsys, ["build", str(tmp_path / "b"), "--scales", "3", "--leaf-size", "0"], "leaf_size")
    assert not (tmp_path / "b").exists()


def test_an_interrupted_cli_sample_resumes(tmp_path, monkeypatch, datasets_env):
    argv = ["sample", "--n-train", "20", "--resize", str(H), "--seeds", "0-1", "--steps", "4", "--scale", "3"]
    main(argv + ["--out", str(tmp_path / "whole")])
    calls = {"n": 0}
    real = ScoreMachine.__call__

    def dies_after_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ScoreMachine, "__call__", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "sample.ckpt").is_file()
    monkeypatch.setattr(ScoreMachine, "__call__", real)
    main(argv + ["--out", str(tmp_path / "cut")])
    whole = torch.load(tmp_path / "whole" / "samples.pt")["samples"]
    torch.testing.assert_close(torch.load(tmp_path / "cut" / "samples.pt")["samples"], whole, rtol=0, atol=0)
    assert not (tmp_path / "cut" / "sample.ckpt").exists()


@pytest.mark.parametrize("command", ["train", "calibrate", "evaluate", "info", "verify", "sample", "ablate"])
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "options:" in text and (command in ("info", "verify") or "default" in text)
    assert "bank directory" in text if command in ("info", "verify") else True


def test_top_k_needs_a_positive_k():
    with pytest.raises(ValueError, match="k"):
        TopKBackend(k=0)
    assert MemoryBank(random_images(4, (1, 5, 5))).height == 5
