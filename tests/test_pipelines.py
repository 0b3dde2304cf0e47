"""Networks, training resume, calibration and evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from machines import ScaleSchedule, ScoreMachine, ddim_grid, eps_from_x0, noise_from_seeds, sample
from machines.metrics import pearson_r
from pipelines.calibration import calibrate
from pipelines.networks import NetworkDenoiser, ResNet, UNet
from pipelines.training import TrainConfig, _ema_update, ema_decay, load_network, train


class MachineAsEpsNet(nn.Module):
    """An analytic machine dressed as an ε-predicting network (all times in a batch equal)."""

    def __init__(self, machine: ScoreMachine) -> None:
        super().__init__()
        self.machine = machine
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, labels=None):
        tt = float(t[0])
        return eps_from_x0(x, self.machine(x, tt, labels), tt)


def test_network_wrapper_gives_the_machine_trajectory(tiny):
    machine = ScoreMachine(tiny(1), "bbELS", scales=3)
    noise = noise_from_seeds([0, 1], (1, 7, 9), torch.float64)
    direct = sample(machine, noise, steps=8)
    wrapped = sample(NetworkDenoiser(MachineAsEpsNet(machine)), noise, steps=8)
    assert torch.allclose(direct, wrapped, atol=1e-9, rtol=0)


def test_calibration_recovers_a_known_schedule(tiny):
    data = tiny(1)
    truth = ScaleSchedule(((0.25, 1), (0.5, 3), (0.75, 5), (1.0, 7)))
    network = ScoreMachine(data, "bbELS", scales=truth)
    result = calibrate(network, lambda P: ScoreMachine(data, "bbELS", scales=P), [1, 3, 5, 7], [0, 1, 2], (1, 7, 9), steps=4, progress=False)
    assert result["schedule"] == [[t, truth(t)] for t in (0.25, 0.5, 0.75, 1.0)]
    assert all(max(sims[str(P)]) > 1 - 1e-12 for t, sims in result["similarity"].items() for P in [truth(float(t))])


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_networks_shapes_and_locality(padding):
    torch.manual_seed(0)
    net = ResNet(1, 8, 2, padding)
    assert net.receptive_field == 9
    x = torch.randn(2, 1, 16, 16)
    y = x.clone()
    y[..., 10:12, :] = 0  # rows 10, 11 change; rows 0..5 are > 4 rows away, even around the torus
    t = torch.full((2,), 0.5)
    assert torch.allclose(net(x, t)[..., :6, :], net(y, t)[..., :6, :], atol=1e-6)
    assert not torch.allclose(net(x, t)[..., 7:, :], net(y, t)[..., 7:, :], atol=1e-6)
    unet = UNet(3, (4, 8, 16), padding, num_classes=10)
    x3 = torch.randn(2, 3, 16, 16)
    out = unet(x3, t, torch.tensor([1, 2]))
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(unet(x3, t, torch.tensor([3, 2]))[0], out[0], atol=1e-6)  # the label reaches the output
    torch.testing.assert_close(unet(x3, t, torch.tensor([3, 2]))[1], out[1])  # … of its own sample only
    if padding == "circular":  # two 2× poolings: equivariant to circular shifts by multiples of 4
        shifted = unet(torch.roll(x3, (4, 8), (2, 3)), t, torch.tensor([1, 2]))
        torch.testing.assert_close(shifted, torch.roll(out, (4, 8), (2, 3)), rtol=0, atol=1e-5)


def _tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(dataset="random", resize=None, n_train=None, width=8, blocks=2, iters=6, batch=8,
                checkpoint_every=2, lr=1e-3, device="cpu", out=str(tmp_path))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("ema,warmup", [(0.0, False), (0.9, False), (0.9, True)])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, ema, warmup):
    whole = load_network(train(_tiny_config(tmp_path / "whole", ema=ema, ema_warmup=warmup), progress=False))
    cfg = _tiny_config(tmp_path / "resumed", ema=ema, ema_warmup=warmup)
    train(cfg, stop_after=3, progress=False)  # interrupted mid-way (not on a checkpoint boundary)
    resumed = load_network(train(cfg, progress=False))
    for (name, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name
    curve = json.loads((tmp_path / "whole" / "losses.json").read_text())  # one mean per checkpoint interval
    assert [i for i, _ in curve] == [2, 4, 6] and all(math.isfinite(v) and v > 0 for _, v in curve)
    assert json.loads((tmp_path / "resumed" / "losses.json").read_text()) == curve  # the interruption split an interval
    assert (tmp_path / "whole" / "loss.png").is_file()
    with pytest.raises(ValueError, match=r"different run configuration \(differs in: lr\)"):
        train(_tiny_config(tmp_path / "resumed", lr=5e-3, ema=ema, ema_warmup=warmup), progress=False)
    with pytest.raises(ValueError, match=r"differs in: blocks, width"):
        train(_tiny_config(tmp_path / "resumed", width=16, blocks=3, ema=ema, ema_warmup=warmup), progress=False)


def test_the_ema_warm_up_forgets_the_initial_weights(tmp_path):
    """The share of the initial weights left in the average after n updates is the product of the decays: 0.999**n
    without the warm-up (2.7% after 3,600), under 1e-6 with it; the warm-up never decays slower than ``ema``."""
    plain, warm = (_tiny_config(tmp_path, ema=0.999, ema_warmup=w) for w in (False, True))
    left = {cfg.ema_warmup: math.prod(ema_decay(cfg, n) for n in range(1, 3601)) for cfg in (plain, warm)}
    assert left[False] == pytest.approx(0.999 ** 3600) and left[False] > 0.02
    assert left[True] < 1e-6
    assert all(ema_decay(warm, n) <= 0.999 for n in range(1, 20000)) and ema_decay(warm, 20000) == 0.999
    net = nn.Linear(2, 2)  # one update of an EMA that starts at the initial weights moves it (1 − decay) of the way
    ema_net = nn.Linear(2, 2)
    ema_net.load_state_dict(net.state_dict())
    with torch.no_grad():
        net.weight.add_(1.0)
    _ema_update(ema_net, net, ema_decay(warm, 1))
    assert torch.allclose(ema_net.weight, net.weight - ema_decay(warm, 1))


@pytest.mark.slow
def test_train_calibrate_evaluate_end_to_end(tmp_path, datasets_dir, monkeypatch):
    from pipelines.jobs import CalibrateConfig, EvaluateConfig, run_calibrate, run_evaluate

    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    cfg = _tiny_config(tmp_path / "train", dataset="mnist", resize=12, n_train=40, iters=4, batch=16)
    model = train(cfg, progress=False)
    cal = run_calibrate(CalibrateConfig(model=str(model), candidates=[3, 5], seeds=[0, 1], steps=3, backend="summary:leaf_size=16",
                                        out=str(tmp_path / "cal")))
    assert [P for _, P in cal["schedule"]] and all(P in (3, 5) for _, P in cal["schedule"])
    report = run_evaluate(EvaluateConfig(model=str(model), calibration=str(tmp_path / "cal" / "calibration.json"),
                                         seeds=[0, 1, 2], steps=3, batch=2, backend="topk:k=16", out=str(tmp_path / "eval")))
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["config"]["backend"] == "topk:k=16"
    for name in ("report.json", "per_seed.jsonl", "samples.pt", "pairs.png", "scatter.png", "scale_curve.png", "config.json"):
        assert (tmp_path / "eval" / name).is_file(), name
    samples = torch.load(tmp_path / "eval" / "samples.pt")
    machine_r = [float(pearson_r(samples[s]["machine"][None], samples[s]["network"][None])[0]) for s in (0, 1, 2)]
    is_r = [float(pearson_r(samples[s]["is"][None], samples[s]["network"][None])[0]) for s in (0, 1, 2)]
    assert report["seeds"] == 3 and report["median_machine_r"] == pytest.approx(sorted(machine_r)[1], abs=1e-6)
    assert report["median_is_r"] == pytest.approx(sorted(is_r)[1], abs=1e-6)
    assert report["machine_beats_is"] == pytest.approx(sum(m > i for m, i in zip(machine_r, is_r)) / 3)
    # the calibrated schedule: one P per visited time, each the candidate most similar on the median seed
    assert [t for t, _ in cal["schedule"]] == sorted(ddim_grid(3)[:-1])
    for t, P in cal["schedule"]:
        best = cal["per_seed"][f"{t:.4f}"]
        assert P == sorted(best)[len(best) // 2] and all(
            max(cal["similarity"][f"{t:.4f}"], key=lambda c: cal["similarity"][f"{t:.4f}"][c][i]) == str(b) for i, b in enumerate(best))
    # Resume: a second run with more seeds computes only the new one.
    rows_before = (tmp_path / "eval" / "per_seed.jsonl").read_text().splitlines()
    report = run_evaluate(EvaluateConfig(model=str(model), calibration=str(tmp_path / "cal" / "calibration.json"),
                                         seeds=[0, 1, 2, 3], steps=3, batch=2, backend="topk:k=16", out=str(tmp_path / "eval")))
    rows_after = (tmp_path / "eval" / "per_seed.jsonl").read_text().splitlines()
    assert rows_after[:3] == rows_before and len(rows_after) == 4 and report["seeds"] == 4


def test_attention_unet_is_global_where_the_convolutions_are_local():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    t = torch.full((1,), 0.5)
    far = x.clone()
    far[..., 60:, 60:] += 1.0  # 56+ pixels from the top-left corner: outside every convolution's reach
    for attention in (False, True):
        net = UNet(3, (8, 16, 32), "zeros", num_classes=10, attention=attention)
        out, moved = net(x, t, torch.tensor([3])), net(far, t, torch.tensor([3]))
        assert out.shape == (1, 3, 64, 64)
        reached = not torch.allclose(out[..., :8, :8], moved[..., :8, :8], atol=1e-7)
        assert reached == attention  # only attention carries the far change to the corner
    circular = UNet(3, (8, 16, 32), "circular", attention=True)  # attention has no positional code: still shift-equivariant
    torch.testing.assert_close(circular(torch.roll(x, (4, 8), (2, 3)), t), torch.roll(circular(x, t), (4, 8), (2, 3)), rtol=0, atol=1e-5)
    zeros = UNet(3, (8, 16, 32), "zeros", attention=True)  # with zero padding the borders place every pixel: not equivariant
    assert not torch.allclose(zeros(torch.roll(x, (4, 8), (2, 3)), t), torch.roll(zeros(x, t), (4, 8), (2, 3)), atol=1e-3)
    with pytest.raises(ValueError, match="attention is an option of the UNet"):
        from pipelines.training import build_network
        build_network(TrainConfig(arch="resnet", attention=True), 3, None)


def test_colour_figures_show_colour(tmp_path):
    """[-1, 1] → RGB with no channel mix-up: pure red, green and blue images come out red, green and blue,
    in the rows network / machine / IS; provenance figures show a training image's colours too."""
    import matplotlib.image as mpimg

    from pipelines.figures import image_pairs

    def pure(channel: int) -> torch.Tensor:
        x = -torch.ones(3, 8, 8)
        x[channel] = 1.0
        return x

    image_pairs({0: {"network": pure(0), "machine": pure(1), "is": pure(2)}}, tmp_path / "pairs.png")
    png = torch.from_numpy(mpimg.imread(tmp_path / "pairs.png"))[..., :3]
    rows = {}
    for c, name in enumerate(("red", "green", "blue")):
        want = torch.zeros(3)
        want[c] = 1.0
        hit = ((png - want).abs().amax(-1) < 0.05).nonzero()
        assert hit.shape[0] > 20, name
        rows[name] = hit[:, 0].double().mean()
    assert rows["red"] < rows["green"] < rows["blue"]  # network above machine above IS
    from machines import ScoreMachine
    from machines.provenance import explain
    from patchbank import ImageData
    from pipelines.figures import source_gallery

    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0, 0], images[1, 2] = 255, 255  # a red and a blue training image
    data = ImageData(images, torch.tensor([0, 1]), "rgb")
    final, found = explain(ScoreMachine(data, "IS"), noise_from_seeds([0], (3, 8, 8), torch.float64), steps=10, at=[9], m=1)
    rows = source_gallery(final[0], found[9], data, tmp_path / "sources.png")
    png = torch.from_numpy(mpimg.imread(tmp_path / "sources.png"))[..., :3]
    colour = torch.tensor([1.0, 0, 0]) if rows[0]["image"] == 0 else torch.tensor([0, 0, 1.0])
    assert ((png - colour).abs().amax(-1) < 0.05).sum() > 100  # the sample and its source, in the source's colour


def test_pairs_of_chosen_seeds_in_the_order_given(tmp_path):
    """The agree/part figure: chosen seeds, in the order given, each column its caption; red seed first."""
    import matplotlib.image as mpimg

    from pipelines.figures import image_pairs

    def flat(channel: int) -> dict[str, torch.Tensor]:
        x = -torch.ones(3, 8, 8)
        x[channel] = 1.0
        return {"network": x, "machine": x, "is": x}

    samples = {0: flat(2), 1: flat(1), 2: flat(0)}
    image_pairs(samples, tmp_path / "p.png", seeds=[2, 0], captions=["2: r 0.99", "0: r 0.10"])
    png = torch.from_numpy(mpimg.imread(tmp_path / "p.png"))[..., :3]
    red = ((png - torch.tensor([1.0, 0, 0])).abs().amax(-1) < 0.05).nonzero()[:, 1].double().mean()
    blue = ((png - torch.tensor([0, 0, 1.0])).abs().amax(-1) < 0.05).nonzero()[:, 1].double().mean()
    assert red < blue and not ((png - torch.tensor([0, 1.0, 0])).abs().amax(-1) < 0.05).any()  # seed 1 left out
    with pytest.raises(ValueError, match="1 captions for 2 seeds"):
        image_pairs(samples, tmp_path / "q.png", seeds=[2, 0], captions=["x"])
