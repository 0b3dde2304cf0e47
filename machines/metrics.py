"""Agreement between two sets of final images (DESIGN §2): pure functions, per sample."""

from __future__ import annotations

import torch


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation over all C·H·W values (what the paper's tables call "r²"): ``[B]``."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)


def r2(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient of determination ``1 − SS_res/SS_tot`` with ``ref`` as reference: ``[B]``."""
    pred, ref = pred.flatten(1).double(), ref.flatten(1).double()
    ss_res = (pred - ref).pow(2).sum(1)
    ss_tot = (ref - ref.mean(1, keepdim=True)).pow(2).sum(1)
    return 1 - ss_res / ss_tot.clamp(min=1e-300)


def peer_r2(analytic: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
    """Per-sample R² as analytic-diffusion-studio and GoldDiff report it (their ``calculate_r2_score(analytic,
    network)``, whose mean over samples they tabulate): ``1 − Σ(analytic − network)² / (D·var(network))`` over the
    ``D = C·H·W`` values, ``var`` with Bessel's correction (so ``SS_tot`` is ``D/(D−1)`` times :func:`r2`'s), and
    a network image of zero variance counted as variance 1: ``[B]``."""
    a, n = analytic.flatten(1).double(), network.flatten(1).double()
    var = n.var(1)
    var = torch.where(var == 0, torch.ones_like(var), var)
    return 1 - (a - n).pow(2).sum(1) / (var * n.shape[1])


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference: ``[B]``."""
    return (a.flatten(1).double() - b.flatten(1).double()).pow(2).mean(1)
