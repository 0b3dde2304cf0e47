"""Every shipped training config runs train → calibrate → evaluate, and a machine fits its network.

Each config in ``configs/`` is trained for a few iterations at a tiny size (its dataset, architecture,
padding and conditioning kept), calibrated on 2 seeds and evaluated on 2. A conditional network's
labels must reach the machines, a circular network must be paired with circular ELS, and every
mismatch between network, calibration, bank and machine is refused with an error naming both sides.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import experiment

from machines import noise_from_seeds, sample
from machines.comparators import make_comparator
from machines.metrics import pearson_r
from patchbank import BankSpec, PatchBank, load_dataset, to_model_range
from pipelines.ablation import AblationConfig, run_ablation
from pipelines.cli import main
from pipelines.evaluation import read_rows
from pipelines.jobs import CalibrateConfig, EvaluateConfig, run_calibrate, run_evaluate
from pipelines.pairing import paper_schedule_name
from pipelines.training import TrainConfig, load_network, train

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
CPU_CONFIGS = [p for p in CONFIGS if p.stem.endswith("_cpu")]


def _tiny(path: Path, out: Path, iters: int = 4) -> TrainConfig:
    """The config at ``path`` shrunk to seconds: its data, architecture, padding and conditioning kept."""
    cfg = TrainConfig.from_json(path)
    return replace(cfg, resize=12, n_train=60, width=8, blocks=2, widths=(4, 8, 16), iters=iters, batch=16,
                   checkpoint_every=2, device="cpu", out=str(out))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_has_the_papers_schedule(path):
    cfg = TrainConfig.from_json(path)
    assert cfg.out == f"outputs/{path.stem}"
    name = paper_schedule_name({"dataset": cfg.dataset, "arch": cfg.arch, "padding": cfg.padding, "conditional": cfg.conditional})
    assert name is not None, f"{path.name}: the paper calibrated no schedule for this network"
    assert {"resnet": "ResNet", "unet": "UNet"}[cfg.arch] in name and cfg.padding in name
    assert path.stem.endswith(("_cpu", "_paper"))
    if path.stem.endswith("_paper"):
        assert cfg.n_train is None and cfg.device == "auto"  # the full training set, on a GPU when there is one


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_config_smoke_train_calibrate_evaluate(path, tmp_path, datasets_env):
    cfg = _tiny(path, tmp_path / "train")
    model = str(train(cfg, progress=False))
    cal = run_calibrate(CalibrateConfig(model=model, candidates=[3, 5], seeds=[100, 101], steps=3, out=str(tmp_path / "cal")))
    kind = "ELS" if cfg.padding == "circular" else "bbELS"
    assert cal["network"]["machine"] == kind and cal["network"]["conditional"] == cfg.conditional
    assert cal["paper_schedule"]["name"] == paper_schedule_name(json.loads((tmp_path / "train" / "config.json").read_text()))
    report = run_evaluate(EvaluateConfig(model=model, calibration=str(tmp_path / "cal" / "calibration.json"), seeds=[0, 1],
                                         steps=6, batch=2, out=str(tmp_path / "eval")))
    assert report["seeds"] == 2 and report["config"]["machine"] == kind
    run = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert run["machine"]["kind"] == kind and run["machine"]["padding"] == cfg.padding
    assert run["machine"]["conditional"] == run["ideal"]["conditional"] == cfg.conditional
    for name in ("pairs.png", "scatter.png", "scale_curve.png", "per_seed.jsonl"):
        assert (tmp_path / "eval" / name).is_file(), name
    if cfg.conditional:  # the IS baseline ends on a training image of the seed's label: the label reached it
        data = load_dataset(cfg.dataset, resize=12, limit=60)
        classes = data.labels.unique().tolist()
        train_x = to_model_range(data.images, torch.float64).flatten(1)
        samples = torch.load(tmp_path / "eval" / "samples.pt")
        for seed in (0, 1):
            nearest = (train_x - samples[seed]["is"].double().flatten()).norm(dim=1).argmin()
            assert int(data.labels[nearest]) == classes[seed % len(classes)]


@pytest.mark.parametrize("path", [p for p in CPU_CONFIGS if "unet" in p.stem], ids=lambda p: p.stem)
def test_an_interrupted_unet_resumes_bit_identically(path, tmp_path, datasets_env):
    whole = load_network(train(_tiny(path, tmp_path / "whole", iters=5), progress=False))
    cfg = _tiny(path, tmp_path / "resumed", iters=5)
    train(cfg, stop_after=3, progress=False)
    resumed = load_network(train(cfg, progress=False))
    for (name, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def nets(tmp_path_factory, datasets_env):
    """Tiny trained networks: zero-padded MNIST, circular MNIST, conditional FashionMNIST; and a calibration of each."""
    root = tmp_path_factory.mktemp("nets")
    base = Path(__file__).parent.parent / "configs"
    made = {}
    for name, path in (("zeros", "mnist_resnet_cpu"), ("circular", "mnist_resnet_circular_cpu"), ("fashion", "fashion_resnet_cpu")):
        model = str(train(_tiny(base / f"{path}.json", root / name, iters=2), progress=False))
        run_calibrate(CalibrateConfig(model=model, candidates=[3], seeds=[0], steps=2, out=str(root / f"{name}-cal")))
        made[name] = (model, str(root / f"{name}-cal" / "calibration.json"))
    return made


def test_a_machine_of_the_other_padding_rule_is_refused(nets, tmp_path):
    with pytest.raises(ValueError, match=r"trained with zeros padding but the ELS machine assumes circular padding; use bbELS"):
        run_calibrate(CalibrateConfig(model=nets["zeros"][0], machine="ELS", candidates=[3], seeds=[0], steps=2, out=str(tmp_path)))
    with pytest.raises(ValueError, match=r"trained with circular padding but the bbELS machine assumes zeros padding; use ELS"):
        run_calibrate(CalibrateConfig(model=nets["circular"][0], machine="bbELS", candidates=[3], seeds=[0], steps=2, out=str(tmp_path)))
    with pytest.raises(ValueError, match=r"calibrates the ELS machine, not bbELS; evaluate with --machine ELS"):
        run_evaluate(EvaluateConfig(model=nets["circular"][0], calibration=nets["circular"][1], machine="bbELS", seeds=[0],
                                    steps=2, out=str(tmp_path / "e")))


def test_a_calibration_of_another_network_is_refused(nets, tmp_path):
    zeros, circular, fashion = nets["zeros"], nets["circular"], nets["fashion"]
    with pytest.raises(ValueError, match=r"calibrated for a network with padding = circular, but .*zeros/model.pt has padding = zeros"):
        run_evaluate(EvaluateConfig(model=zeros[0], calibration=circular[1], seeds=[0], steps=2, out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"calibrates the bbELS machine, not LS; evaluate with --machine bbELS"):
        run_evaluate(EvaluateConfig(model=zeros[0], calibration=zeros[1], machine="LS", seeds=[0], steps=2, out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"calibrated for a network trained on other data \(fashion_mnist.*than .*\(mnist"):
        run_evaluate(EvaluateConfig(model=zeros[0], calibration=fashion[1], seeds=[0], steps=2, out=str(tmp_path / "b")))
    other = str(Path(circular[0]).parent.parent / "zeros-again")  # same data and config, other weights
    retrained = str(train(_tiny(Path(__file__).parent.parent / "configs" / "mnist_resnet_cpu.json", Path(other), iters=3), progress=False))
    with pytest.raises(ValueError, match=r"was calibrated against the network .*zeros/model.pt \(weights [0-9a-f]{12}\), not "):
        run_evaluate(EvaluateConfig(model=retrained, calibration=zeros[1], seeds=[0], steps=2, out=str(tmp_path / "c")))
    # another network's scales on purpose (the paper's attention UNet at the ResNet's): only the weights may differ
    report = run_evaluate(EvaluateConfig(model=retrained, calibration=zeros[1], seeds=[0], steps=2, out=str(tmp_path / "c"),
                                         other_network=True))
    assert report["config"]["calibrated_on"] == zeros[0] and report["config"]["other_network"]
    with pytest.raises(ValueError, match=r"calibrated for a network trained on other data"):
        run_evaluate(EvaluateConfig(model=zeros[0], calibration=fashion[1], seeds=[0], steps=2, out=str(tmp_path / "d"),
                                    other_network=True))
    with pytest.raises(ValueError, match=r"padding = circular"):
        run_evaluate(EvaluateConfig(model=zeros[0], calibration=circular[1], seeds=[0], steps=2, out=str(tmp_path / "e"),
                                    other_network=True))


def test_a_machine_of_the_networks_first_images(nets, tmp_path, caplog, capsys):
    """``n_train = N``: the machine holds the first N of the network's training images and nothing else,
    recorded in the calibration; sizes the network's data cannot give are refused, naming both sides."""
    model, calibration = nets["fashion"]
    data = load_dataset("fashion_mnist", resize=12, limit=60)
    first = data.subset(30)
    main(["calibrate", "--model", model, "--candidates", "3", "--seeds", "0", "--steps", "2", "--n-train", "30",
          "--out", str(tmp_path / "c")])
    made = json.loads((tmp_path / "c" / "calibration.json").read_text())["network"]
    assert made["n_train"] == 30 and made["data"] == json.loads((Path(model).parent / "config.json").read_text())["fingerprint"]
    assert json.loads(Path(calibration).read_text())["network"]["n_train"] == 60  # the default: all the network's images
    report = run_evaluate(EvaluateConfig(model=model, calibration=str(tmp_path / "c" / "calibration.json"), seeds=[0, 1], steps=3,
                                         batch=2, n_train=30, comparators=["nearest"], out=str(tmp_path / "e")))
    assert report["seeds"] == 2
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["machine"]["data"] == run["ideal"]["data"] == first.fingerprint() != data.fingerprint()
    samples = torch.load(tmp_path / "e" / "samples.pt")
    train_x = to_model_range(data.images, torch.float64).flatten(1)
    for s in (0, 1):  # the nearest image comes from the machine's images, never from the images left out of it
        assert int((train_x - samples[s]["nearest"].double().flatten()).norm(dim=1).argmin()) < 30
    with caplog.at_level("WARNING", logger="pipelines.pairing"):  # the calibration with every image: used, with a warning
        run_evaluate(EvaluateConfig(model=model, calibration=calibration, seeds=[0], steps=2, n_train=30, out=str(tmp_path / "w")))
    assert "calibrated with 60 training images; this machine holds 30" in caplog.text
    with pytest.raises(ValueError, match=r"61 training images asked, but the network .* was trained on 60"):
        run_evaluate(EvaluateConfig(model=model, calibration=calibration, seeds=[0], steps=2, n_train=61, out=str(tmp_path / "x")))
    few = next(n for n in range(1, 60) if len(data.labels[:n].unique()) < len(data.labels.unique()) <= len(data.labels[:n + 1].unique()))
    with pytest.raises(ValueError, match=rf"the first {few} training images hold no image of label\(s\) \[\d+\]"):
        run_calibrate(CalibrateConfig(model=model, candidates=[3], seeds=[0], steps=2, n_train=few, out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match=r"n_train must be a number of images ≥ 1"):
        EvaluateConfig(model=model, calibration=calibration, n_train=0)
    PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], labels=True, index=None, leaf_size=64), progress=False)
    with pytest.raises(ValueError, match=r"holds other data .* than the first 30 of the images the network"):
        run_evaluate(EvaluateConfig(model=model, calibration=calibration, seeds=[0], steps=2, n_train=30, bank=str(tmp_path / "bank"),
                                    out=str(tmp_path / "x")))
    PatchBank.build(first, tmp_path / "bank30", BankSpec(scales=[3], labels=True, index=None, leaf_size=64), progress=False)
    run_evaluate(EvaluateConfig(model=model, calibration=str(tmp_path / "c" / "calibration.json"), seeds=[0], steps=2, n_train=30,
                                bank=str(tmp_path / "bank30"), out=str(tmp_path / "b")))


def test_the_ablation_refuses_a_network_that_does_not_fit_its_machine(nets, tmp_path):
    base = AblationConfig(dataset="fashion_mnist", resize=12, n_train=60, seeds=[0], steps=2, grid=["exact"], concentration=False,
                          teacher_forced=False, out=str(tmp_path / "abl"))
    with pytest.raises(ValueError, match=r"is a class-conditional network but the bbELS machine is an unconditional machine"):
        run_ablation(replace(base, model=nets["fashion"][0]), progress=False)
    with pytest.raises(ValueError, match=r"trained on other data \(mnist.*than the ablation's data \(fashion_mnist"):
        run_ablation(replace(base, model=nets["zeros"][0], conditional=True), progress=False)
    with pytest.raises(ValueError, match=r"trained with circular padding but the bbELS machine"):
        run_ablation(replace(base, dataset="mnist", model=nets["circular"][0]), progress=False)


def test_explain_a_network_through_its_calibrated_machine(nets, tmp_path, capsys):
    model, calibration = nets["fashion"]
    main(["explain", "--model", model, "--calibration", calibration, "--seeds", "0-1", "--steps", "3", "--at", "1", "2",
          "--m", "3", "--out", str(tmp_path / "x")])
    assert capsys.readouterr().out.strip().endswith("provenance.png")
    stats = json.loads((tmp_path / "x" / "statistics.json").read_text())
    assert stats["step"] == 2 and stats["P"] == 3 and set(stats["agreement_r"]) == {"1", "2"}
    assert all(-1 <= r <= 1 for rs in stats["agreement_r"].values() for r in rs)
    assert [s["seed"] for s in stats["images"]] == [0, 1] and all(s["sources_within_label"] for s in stats["images"])
    for name in ("provenance.pt", "provenance.png", "sources.png"):
        assert (tmp_path / "x" / name).is_file(), name
    with pytest.raises(SystemExit):  # another network's calibration: refused, naming both
        main(["explain", "--model", nets["zeros"][0], "--calibration", calibration, "--seeds", "0", "--out", str(tmp_path / "y")])
    assert "calibrated for a network trained on other data" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no --calibration for a network that does not ship one: the default path, named
        main(["explain", "--model", model, "--seeds", "0"])
    assert "calibration outputs/calibrate/calibration.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "--model", model, "--calibration", calibration])
    assert "--model needs --seeds" in capsys.readouterr().err


def test_one_agreement_table_for_every_theory(nets, tmp_path, capsys):
    model, calibration = nets["fashion"]
    run = ["evaluate", "--model", model, "--calibration", calibration, "--seeds", "0-2", "--steps", "3", "--batch", "2",
           "--out", str(tmp_path / "e")]
    main(run)
    before = (tmp_path / "e" / "per_seed.jsonl").read_text().splitlines()
    main(run + ["--machines", "bbELS,IS,wiener,nearest"])  # theories added to the finished evaluation
    after = [json.loads(line) for line in (tmp_path / "e" / "per_seed.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k.startswith(("seed", "machine_", "is_"))} for r in after] == [json.loads(b) for b in before]
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    samples = torch.load(tmp_path / "e" / "samples.pt")
    assert set(samples[0]) == {"network", "machine", "is", "wiener", "nearest"}
    for name in ("machine", "is", "wiener", "nearest"):  # every theory against the same network on the same seeds
        r = sorted(float(pearson_r(samples[s][name][None], samples[s]["network"][None])[0]) for s in range(3))
        assert report[f"median_{name}_r"] == pytest.approx(r[1], abs=1e-6)
        assert f"median_{name}_r2" in report and f"median_{name}_mse" in report
    assert 0 <= report["machine_beats_wiener"] <= 1 and report["config"]["comparators"] == ["wiener", "nearest"]
    labels = {s: s % 10 for s in range(3)}  # a conditional comparator stays within the seed's label
    data = load_dataset("fashion_mnist", resize=12, limit=60)
    train_x = to_model_range(data.images, torch.float64).flatten(1)
    for s, y in labels.items():
        nearest = (train_x - samples[s]["nearest"].double().flatten()).norm(dim=1)
        assert float(nearest.min()) < 1e-5 and int(data.labels[nearest.argmin()]) == sorted(data.labels.unique().tolist())[y]
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", model, "--calibration", calibration, "--machines", "bbELS,pca", "--out", str(tmp_path / "f")])
    assert "theories are one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", model, "--calibration", calibration, "--machines", "smoothed:sigma=x", "--out", str(tmp_path / "f")])
    assert "sigma must be a float" in capsys.readouterr().err


def test_comparator_parameters_are_calibrated_and_evaluated_by_spec(nets, tmp_path, capsys):
    model, calibration = nets["fashion"]
    main(["calibrate", "--model", model, "--machine", "smoothed:draws=2", "--candidates", "0", "0.3", "--seeds", "1000-1001",
          "--steps", "3", "--out", str(tmp_path / "c")])
    printed = json.loads(capsys.readouterr().out)
    found = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert printed == found["parameter"] and found["parameter"]["name"] == "sigma"
    scores = found["parameter"]["median_mean_similarity"]
    assert set(scores) == {"0", "0.3"} and found["parameter"]["value"] == max((0, 0.3), key=lambda c: scores[str(c)])
    assert found["parameter"]["spec"] == f"smoothed:sigma={float(found['parameter']['value'])}:draws=2:seed=0"
    assert found["network"]["machine"] == "smoothed" and found["network"]["conditional"]
    for t, by_value in found["similarity"].items():  # the ε̂ cosines behind the choice, one per seed
        assert all(len(v) == 2 and all(-1 <= c <= 1 for c in v) for v in by_value.values())
    spec = found["parameter"]["spec"]
    run = ["evaluate", "--model", model, "--calibration", calibration, "--seeds", "0-1", "--steps", "3", "--batch", "2",
           "--machines", f"bbELS,pca_locality:threshold=0.1,pca_sym=pca_locality:normalise=symmetric,{spec}", "--out", str(tmp_path / "e")]
    main(run)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["config"]["comparators"] == ["pca_locality:threshold=0.1", "pca_sym=pca_locality:normalise=symmetric", spec]
    samples = torch.load(tmp_path / "e" / "samples.pt")
    assert not torch.equal(samples[0]["pca_sym"], samples[0]["pca_locality"])  # two variants, two columns
    for name in ("pca_locality", "pca_sym", "smoothed"):
        assert -1 <= report[f"median_{name}_r"] <= 1 and 0 <= report[f"machine_beats_{name}"] <= 1
    theory = json.loads((tmp_path / "e" / "theories" / "smoothed" / "run.json").read_text())
    assert theory["theory"]["sigma"] == float(found["parameter"]["value"]) and theory["theory"]["draws"] == 2
    with pytest.raises(SystemExit):  # the same column with another σ is another theory: refused, not mixed in
        main(run[:-4] + ["--machines", "smoothed:sigma=0.7:draws=2", "--out", str(tmp_path / "e")])
    assert "holds results of another run (differs in: theory)" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "e" / "theories" / "smoothed")  # its record gone: its results no longer count, it runs again
    main(run[:-4] + ["--machines", "smoothed:sigma=5:draws=2", "--out", str(tmp_path / "e")])
    again = torch.load(tmp_path / "e" / "samples.pt")
    data = load_dataset("fashion_mnist", resize=12, limit=60)
    theory = make_comparator("smoothed:sigma=5:draws=2", data, conditional=True)
    expect = sample(theory, noise_from_seeds([0, 1], data.shape, torch.float64), 3, data.labels.unique()[:2])
    torch.testing.assert_close(torch.stack([again[s]["smoothed"] for s in (0, 1)]), expect.float(), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "e" / "theories" / "smoothed" / "run.json").read_text())["theory"]["sigma"] == 5
    capsys.readouterr()
    for bad, message in (("smoothed,smoothed:sigma=0.2", "a comparator is listed twice"), ("p-s=smoothed", "letters, digits")):
        with pytest.raises(SystemExit):
            main(run[:-4] + ["--machines", bad, "--out", str(tmp_path / "g")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", model, "--machine", "wiener", "--candidates", "1", "--out", str(tmp_path / "w")])
    assert "no free parameter to calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", model, "--machine", "smoothed", "--out", str(tmp_path / "w")])
    assert "give the values of sigma to try as candidates" in capsys.readouterr().err
    for argv, message in ((["--machine", "smoothed", "--parameter", "draws"], "cannot fit 'draws'"),
                          (["--machine", "bbELS", "--parameter", "sigma"], "--parameter is for comparators")):
        with pytest.raises(SystemExit):
            main(["calibrate", "--model", model, *argv, "--candidates", "1", "--out", str(tmp_path / "w")])
        assert message in capsys.readouterr().err
    main(["calibrate", "--model", model, "--machine", "pca_locality", "--parameter", "temperature", "--candidates", "0.5", "2",
          "--seeds", "1000", "--steps", "2", "--out", str(tmp_path / "t")])
    assert json.loads(capsys.readouterr().out)["name"] == "temperature"


def test_agreement_table_names_a_row_whose_outputs_are_missing(tmp_path, monkeypatch):
    """The agreement table refuses a row whose outputs are gone or unfinished, naming the row and the missing file."""
    agreement = experiment("agreement")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"row gone_row: outputs/gone_row/config.json is missing"):
        agreement.table(["gone_row"], None)
    (tmp_path / "outputs" / "half_row" / "evaluate_first100").mkdir(parents=True)
    (tmp_path / "outputs" / "half_row" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"row half_row@100: outputs/half_row/evaluate_first100/config.json is missing.*--n-train 100"):
        agreement.table(["half_row@100"], None)


def test_a_shipped_network_is_loaded_by_name_and_checked_against_its_card(nets, tmp_path, monkeypatch):
    """A row shipped by experiments/ship.py evaluates by name, with its own calibration, to the same numbers as its
    files; a damaged model.pt is refused; an unknown name lists what ships."""
    import pipelines.shipped as shipped_mod

    ship = experiment("ship")
    model, calibration = nets["zeros"]
    row = tmp_path / "row"
    (row / "calibrate").mkdir(parents=True)
    for f in ("model.pt", "config.json", "losses.json"):
        shutil.copyfile(Path(model).parent / f, row / f)
    shutil.copyfile(calibration, row / "calibrate" / "calibration.json")
    run_evaluate(EvaluateConfig(model=model, calibration=calibration, seeds=[0, 1], steps=2, batch=1, out=str(row / "evaluate")))
    models = tmp_path / "models"
    monkeypatch.setattr(shipped_mod, "MODELS", models)
    folder = ship.ship("tiny_mnist", row, models)
    card = json.loads((folder / "card.json").read_text())
    assert card["weights_sha256"] and "plateaued" in card and shipped_mod.shipped() == ["tiny_mnist"]
    assert card["evaluation"]["steps"] == 2 and card["evaluation"]["batch"] == 1 and card["evaluation"]["seeds"] == 2
    assert [r["seed"] for r in read_rows(folder / "evaluation.jsonl")] == [0, 1]
    found = ship.check("tiny_mnist", 2, models)  # by name, with the card's settings: the shipped per-seed numbers
    assert found["seeds"] == [0, 1] and found["max_seed_diff"] < 1e-6 and found["median_diff"] < 1e-6
    rows = read_rows(folder / "evaluation.jsonl")
    rows[1]["machine_r"] += 1e-3  # a shipped number the network does not give is found
    (folder / "evaluation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ship.check("tiny_mnist", 2, models)["max_seed_diff"] == pytest.approx(1e-3, rel=1e-3)
    by_name = run_evaluate(EvaluateConfig(model="tiny_mnist", seeds=[0], steps=2, batch=1, out=str(tmp_path / "a")))
    by_file = run_evaluate(EvaluateConfig(model=model, calibration=calibration, seeds=[0], steps=2, batch=1, out=str(tmp_path / "b")))
    assert by_name["median_machine_r"] == by_file["median_machine_r"]
    with pytest.raises(FileNotFoundError, match=r"no shipped network of that name \(shipped: tiny_mnist\)"):
        shipped_mod.resolve_model("no_such_net")
    data = bytearray((folder / "model.pt").read_bytes())
    data[-1] ^= 1
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its card"):
        shipped_mod.resolve_model("tiny_mnist")


def test_clipping_the_networks_x0_changes_the_network_only(nets, tmp_path, caplog):
    """``clip``: the network's x̂0 is clamped to [-1, 1] at every step, so its final sample (the last x̂0) lies in the
    data range; the machines' samples are the same to the bit, since their x̂0 are posterior means of training pixels
    and lie in the range already. The run records the clipping, and a calibration made without it is named."""
    model, calibration = nets["zeros"]
    plain = EvaluateConfig(model=model, calibration=calibration, seeds=[0, 1], steps=3, batch=2, out=str(tmp_path / "plain"))
    run_evaluate(plain)
    with caplog.at_level("WARNING", logger="pipelines.jobs"):
        run_evaluate(replace(plain, clip=True, out=str(tmp_path / "clip")))
    assert "calibrated with the network's x̂0 unclipped; this evaluation clips it" in caplog.text
    a, b = (torch.load(tmp_path / d / "samples.pt") for d in ("plain", "clip"))
    assert max(float(a[s]["network"].abs().max()) for s in (0, 1)) > 1.0  # a 2-iteration network leaves the range
    for s in (0, 1):
        assert float(b[s]["network"].abs().max()) <= 1.0
        assert torch.equal(a[s]["machine"], b[s]["machine"]) and torch.equal(a[s]["is"], b[s]["is"])
    run = json.loads((tmp_path / "clip" / "run.json").read_text())
    assert run["network"]["clip"] is True and "clip" not in json.loads((tmp_path / "plain" / "run.json").read_text())["network"]


def test_the_range_study_samples_with_the_projects_sampler(nets):
    """``experiments/sample_range.py``: its plain sampler is the project's sampler, its clipping sampler is the
    network with ``clip``, the sampler from 0.95 skips the first step, and every step's x̂0 range is recorded."""
    study = experiment("sample_range")
    network = load_network(nets["zeros"][0], device="cpu")
    noise = noise_from_seeds([0, 1], (1, 32, 32))
    plain, record = study.trajectory(network, noise, None, "plain", steps=4)
    assert torch.equal(plain, sample(network, noise, 4)) and [t for t, _, _ in record] == [1.0, 0.75, 0.5, 0.25]
    network.clip = True
    clipped, _ = study.trajectory(load_network(nets["zeros"][0], device="cpu"), noise, None, "clip", steps=4)
    assert torch.equal(clipped, sample(network, noise, 4)) and float(clipped.abs().max()) <= 1.0
    _, later = study.trajectory(load_network(nets["zeros"][0], device="cpu"), noise, None, "from 0.95", steps=4)
    assert [t for t, _, _ in later] == [0.75, 0.5, 0.25]
    assert all(0 <= f <= 1 and m >= 0 for _, f, m in record)
