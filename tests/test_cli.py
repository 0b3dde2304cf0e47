"""The command line end to end through ``main([...])``: build → info → verify → sample with every backend on
the built bank; train → calibrate → evaluate on a tiny model; what each prints and writes."""

from __future__ import annotations

import json

import pytest
import torch

from machines import BACKENDS
from pipelines.cli import main

H = 12
SPECS = {"exact": "exact", "topk": "topk:k=32:tol=1e-4", "tail": "tail:k=32:samples=512", "summary": "summary:leaf_size=32",
         "auto": "auto:samples=1024:se_tol=0.02", "sharded": "sharded:shards=2:inner=topk:k=32"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory, datasets_env) -> str:
    path = str(tmp_path_factory.mktemp("cli") / "bank")
    main(["build", path, "--dataset", "mnist", "--resize", str(H), "--n-train", "40", "--scales", "3", "5", "--index", "Flat",
          "--leaf-size", "64"])
    return path


def test_build_info_verify(bank, capsys):
    main(["info", bank])
    info = json.loads(capsys.readouterr().out)
    assert info["n_images"] == 40 and info["image_shape"] == [1, H, H] and set(info["scales"]) == {"3", "5"}
    assert info["spec"]["index"] == "Flat" and info["spec"]["leaf_size"] == 64
    main(["verify", bank])
    assert "intact" in capsys.readouterr().out


@pytest.mark.parametrize("kind", list(SPECS))
def test_sample_from_the_bank_with_every_backend(bank, kind, tmp_path, capsys):
    assert set(SPECS) == set(BACKENDS)

    def run(spec: str, out: str) -> dict:
        main(["sample", "--bank", bank, "--seeds", "0,3", "--steps", "5", "--scale", "5", "--backend", spec,
              "--out", str(tmp_path / out)])
        assert capsys.readouterr().out.strip().endswith("samples.png")
        return torch.load(tmp_path / out / "samples.pt")

    ref, got = run("exact", "exact"), run(SPECS[kind], kind)
    assert got["seeds"] == [0, 3] and got["samples"].shape == (2, 1, H, H)
    r = torch.corrcoef(torch.stack([got["samples"].flatten(), ref["samples"].flatten()]))[0, 1]
    assert r > 0.99
    record = json.loads((tmp_path / kind / "config.json").read_text())
    assert record["backend"] == SPECS[kind] and record["train_images"] == 40 and "error_bound" in record["backend_stats"]


def test_sample_on_processes_from_a_shared_bank(bank, tmp_path, capsys):
    """Seeds in batches on two worker processes (the disk bank reopened there, read-only) give the serial
    run's samples bit for bit at the same threads; a re-run finds every batch kept and samples nothing."""
    def run(executor: str, out: str) -> torch.Tensor:
        main(["sample", "--bank", bank, "--seeds", "0-2", "--steps", "4", "--scale", "3", "--executor", executor,
              "--batch", "1", "--out", str(tmp_path / out)])
        capsys.readouterr()
        return torch.load(tmp_path / out / "samples.pt")["samples"]

    serial, parallel = run("serial:threads=1", "serial"), run("processes:2:threads=1", "parallel")
    assert torch.equal(serial, parallel)
    kept = tmp_path / "parallel" / "batches" / "kept.pt"
    stamp = kept.stat().st_mtime_ns
    assert torch.equal(run("processes:2:threads=1", "parallel"), serial) and kept.stat().st_mtime_ns == stamp


def test_sample_a_comparator_theory(bank, tmp_path, capsys):
    """``patchbank sample --machine SPEC`` samples a comparator from the bank's images: the same images as the
    Python API, from the same seeds; options a patch machine takes, or a bad spec, are refused."""
    from machines import noise_from_seeds, sample
    from machines.comparators import make_comparator
    from patchbank import PatchBank

    for spec in ("smoothed:sigma=0.2:draws=2", "pca_locality:normalise=symmetric:threshold=0.1", "wiener"):
        out = tmp_path / spec.split(":")[0]
        main(["sample", "--bank", bank, "--machine", spec, "--seeds", "0,3", "--steps", "4", "--out", str(out)])
        assert capsys.readouterr().out.strip().endswith("samples.png")
        got = torch.load(out / "samples.pt")["samples"]
        theory = make_comparator(spec, PatchBank.open(bank))
        torch.testing.assert_close(got, sample(theory, noise_from_seeds([0, 3], (1, H, H)), 4), rtol=0, atol=1e-6)
    for argv, message in ((["--machine", "smoothed", "--scale", "3"], "--scale and --padding do not apply"),
                          (["--machine", "smoothed:beta=2"], "has no option 'beta=2'"),
                          (["--machine", "foo"], "unknown machine 'foo'")):
        with pytest.raises(SystemExit):
            main(["sample", "--bank", bank, "--out", str(tmp_path / "bad"), *argv])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_calibrate_evaluate_through_the_cli(tmp_path, datasets_env, capsys):
    cfg = {"dataset": "mnist", "resize": H, "n_train": 40, "width": 8, "blocks": 2, "iters": 4, "batch": 16,
           "checkpoint_every": 2, "device": "cpu", "out": str(tmp_path / "train")}
    (tmp_path / "train.json").write_text(json.dumps(cfg))
    main(["train", "--config", str(tmp_path / "train.json")])
    model = capsys.readouterr().out.strip().splitlines()[-1]
    assert model.endswith("model.pt")
    main(["calibrate", "--model", model, "--candidates", "3", "5", "--seeds", "0-1", "--steps", "3",
          "--backend", "summary:leaf_size=16", "--out", str(tmp_path / "cal")])
    schedule = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert schedule == json.loads((tmp_path / "cal" / "calibration.json").read_text())["schedule"]
    assert len(schedule) == 3 and {P for _, P in schedule} <= {3, 5}
    main(["evaluate", "--model", model, "--calibration", str(tmp_path / "cal" / "calibration.json"), "--seeds", "0-2",
          "--steps", "3", "--batch", "2", "--backend", "topk:k=16", "--out", str(tmp_path / "eval")])
    report = json.loads(capsys.readouterr().out)
    assert report["seeds"] == 3 and report["config"]["backend"] == "topk:k=16"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "per_seed.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    assert report["median_machine_r"] == pytest.approx(sorted(r["machine_r"] for r in rows)[1])


def test_explain_a_sample_run(bank, tmp_path, capsys):
    main(["sample", "--bank", bank, "--seeds", "0-1", "--steps", "4", "--scale", "3", "--out", str(tmp_path / "s")])
    main(["explain", str(tmp_path / "s"), "--m", "4", "--at", "2", "3"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("provenance.png")
    stats = json.loads((tmp_path / "s" / "statistics.json").read_text())
    assert stats["step"] == 3 and stats["m"] == 4 and len(stats["images"]) == 2
    assert all(sum(s["regions"]) == H * H for s in stats["images"])
    saved = torch.load(tmp_path / "s" / "provenance.pt")
    assert sorted(saved["steps"]) == [2, 3] and saved["steps"][3]["image"].shape == (2, H, H, 4)
    assert stats["certified_fraction"] == {"2": 0.0, "3": 0.0}  # exact by default
    main(["explain", str(tmp_path / "s"), "--m", "4", "--at", "3", "--topk", "topk:k=64:index=Flat", "--tol", "1e-3",
          "--out", str(tmp_path / "cert")])  # certified from the bank's FAISS index where it holds
    certified = json.loads((tmp_path / "cert" / "statistics.json").read_text())["certified_fraction"]["3"]
    assert 0 < certified <= 1
    main(["explain", str(tmp_path / "s"), "--m", "4", "--at", "3", "--listed-images", "--out", str(tmp_path / "listed")])
    listed = torch.load(tmp_path / "listed" / "provenance.pt")["steps"][3]
    assert listed["listed_images"] and json.loads((tmp_path / "listed" / "statistics.json").read_text())["image_shares"].startswith("listed")
    for name in ("share", "mass", "entropy"):  # the same patches and shares; only the images' shares are lower bounds
        torch.testing.assert_close(listed[name], saved["steps"][3][name], rtol=0, atol=1e-9)
    assert (listed["image_share"][..., 0] <= saved["steps"][3]["image_share"][..., 0] + 1e-12).all()
    with pytest.raises(SystemExit):
        main(["explain", str(tmp_path / "s"), "--topk", "exact"])
    assert "needs a top-k backend spec" in capsys.readouterr().err
    samples = torch.load(tmp_path / "s" / "samples.pt")
    samples["samples"] += 0.5  # a sample its config does not reproduce is refused, not explained
    torch.save(samples, tmp_path / "s" / "samples.pt")
    with pytest.raises(SystemExit):
        main(["explain", str(tmp_path / "s")])
    assert "does not give the stored samples back" in capsys.readouterr().err
