"""Where a network's samples leave the data range [-1, 1], step by step.

    python experiments/sample_range.py outputs/cifar10_resnet_cpu/model.pt --seeds 0-29
    python experiments/sample_range.py mnist_resnet_cpu --seeds 0-29 --json outputs/range_mnist.json

An ε-predicting network denoises through x̂0 = (x − √(1−ᾱ)·ε̂)/√ᾱ, which multiplies its error in ε̂ by
√(1−ᾱ)/√ᾱ: about 80 at t = 1 (ᾱ = 1.55e-4), 11 at t = 0.95, 1 at t = 0.5. For every DDIM step this prints that
factor, the fraction of the network's x̂0 values outside [-1, 1] and their largest magnitude, and then, for the final
samples, the fraction of values with |x| > 1 and > 1.1 and the median |x|, under four samplers from the same noise:

* ``plain``: the project's sampler (and the paper's network sampler): DDIM from t = 1, nothing clipped;
* ``clip first``: x̂0 clipped to [-1, 1] at the first step (t = 1) only;
* ``from 0.95``: the first step skipped (the noise taken as x at t = 0.95, as the paper's machine sampler starts);
* ``clip``: x̂0 clipped at every step (``--clip`` of calibrate and evaluate).

Conditional networks get label ``seed mod 10``, as in the evaluations.

It also measures the network's denoising error per time on its first 512 training images (one noise draw each):
the ε-MSE the training loss sees, the x̂0-MSE it implies (their ratio is the squared gain), and the x̂0-MSE of the
images' mean (per label when conditional), which a posterior mean beats at every t and equals as t → 1. A network
whose x̂0-MSE at high t lies far above the mean image's is what sends samples out of range.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from machines.sampler import ddim_grid, noise_from_seeds, sample
from machines.schedule import alpha_sigma2, eps_from_x0
from patchbank import load_dataset, to_model_range
from pipelines.cli import parse_seeds
from pipelines.runs import read_json
from pipelines.shipped import resolve_model
from pipelines.training import load_network

SAMPLERS = ("plain", "clip first", "from 0.95", "clip")


class Watched:
    """The network as one of :data:`SAMPLERS` sees it: each call records ``(t, fraction of x̂0 outside [-1, 1],
    max |x̂0|)`` and clamps x̂0 where the sampler clips (every step, or the first only)."""

    def __init__(self, network, sampler: str) -> None:
        self.network, self.sampler, self.record = network, sampler, []
        self.conditional = network.conditional

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.network(x, t, labels)
        self.record.append((t, float((x0.abs() > 1).float().mean()), float(x0.abs().max())))
        if self.sampler == "clip" or (self.sampler == "clip first" and len(self.record) == 1):
            x0 = x0.clamp(-1.0, 1.0)
        return x0


def trajectory(network, noise: torch.Tensor, labels: torch.Tensor | None, sampler: str, steps: int = 20):
    """Final samples ``[B, C, H, W]`` of the project's DDIM sampler under ``sampler`` and, per step, ``(t,
    fraction of x̂0 outside [-1, 1], max |x̂0|)``."""
    watched = Watched(network, sampler)
    x = sample(watched, noise.clone(), steps, labels, start=1 if sampler == "from 0.95" else 0)
    return x, watched.record


@torch.no_grad()
def error_by_time(network, train_cfg: dict, n: int = 512, steps: int = 20, seed: int = 0) -> dict:
    """Per visited t > 0: the network's ε-MSE and x̂0-MSE on its first ``n`` training images, and the x̂0-MSE of
    the mean image (per label when conditional)."""
    data = load_dataset(train_cfg["dataset"], resize=train_cfg["resize"], limit=train_cfg["n_train"]).subset(n)
    x0 = to_model_range(data.images)
    labels = data.labels if network.conditional else None
    if labels is None:
        mean = x0.mean(0, keepdim=True).expand_as(x0)
    else:
        mean = torch.stack([x0[labels == c].mean(0) for c in labels.tolist()])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in ddim_grid(steps)[:-1]:
        a, s2 = alpha_sigma2(t)
        eps = torch.randn(x0.shape, generator=gen)
        xt = a * x0 + math.sqrt(s2) * eps
        x0_hat = torch.cat([network(xt[i:i + 128], t, None if labels is None else labels[i:i + 128]) for i in range(0, n, 128)])
        rows.append({"t": t, "eps_mse": float((eps_from_x0(xt, x0_hat, t) - eps).pow(2).mean()),
                     "x0_mse": float((x0_hat - x0).pow(2).mean())})
    return {"images": n, "mean_image_x0_mse": float((mean - x0).pow(2).mean()), "by_time": rows}


def final_stats(x: torch.Tensor) -> dict:
    """Medians over samples of the fraction of values beyond 1 and 1.1 in magnitude, and the median |x|."""
    flat = x.abs().flatten(1)
    return {"beyond_1": statistics.median((flat > 1).float().mean(1).tolist()),
            "beyond_1.1": statistics.median((flat > 1.1).float().mean(1).tolist()),
            "median_abs": float(flat.median())}


def measure(model: str, seeds: list[int], steps: int = 20) -> dict:
    network = load_network(model, device="cpu")
    train_cfg = read_json(Path(resolve_model(model)).parent / "config.json", "the model's training config")
    shape = train_cfg["image_shape"]
    noise = noise_from_seeds(seeds, shape)
    labels = torch.tensor([s % 10 for s in seeds]) if network.conditional else None
    out: dict = {"model": model, "seeds": len(seeds), "steps": {}, "final": {}, "error": error_by_time(network, train_cfg)}
    for sampler in SAMPLERS:
        x, record = trajectory(network, noise, labels, sampler, steps)
        out["final"][sampler] = final_stats(x)
        if sampler == "plain":
            out["steps"] = [{"t": t, "gain": math.sqrt(alpha_sigma2(t)[1] / alpha_sigma2(t)[0] ** 2),
                             "x0_beyond_1": f, "x0_max_abs": m} for t, f, m in record]
    return out


def markdown(found: dict) -> str:
    lines = ["| t | ε̂ error gain √(1−ᾱ)/√ᾱ | x̂0 values beyond ±1 | largest x̂0 magnitude |", "|---:|---:|---:|---:|"]
    lines += [f"| {s['t']:.2f} | {s['gain']:.1f} | {s['x0_beyond_1']:.3f} | {s['x0_max_abs']:.2f} |" for s in found["steps"]]
    err = found["error"]
    lines += ["", f"Denoising error on {err['images']} training images (the mean image's x̂0-MSE: "
              f"{err['mean_image_x0_mse']:.3f}):", "", "| t | ε-MSE | x̂0-MSE |", "|---:|---:|---:|"]
    lines += [f"| {r['t']:.2f} | {r['eps_mse']:.5f} | {r['x0_mse']:.3f} |" for r in err["by_time"]]
    lines += ["", "| sampler | final values beyond ±1 | beyond ±1.1 | median magnitude |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['beyond_1']:.3f} | {v['beyond_1.1']:.3f} | {v['median_abs']:.3f} |" for k, v in found["final"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained model.pt or a shipped network's name")
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(30)))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    found = measure(args.model, args.seeds, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))
    print(markdown(found))


if __name__ == "__main__":
    main()
