"""The peers' R² (analytic-diffusion-studio's and GoldDiff's ``calculate_r2_score``) against its definition."""

from __future__ import annotations

import torch

from machines.metrics import peer_r2, r2
from pipelines.evaluation import compare, summarise


def test_peer_r2_is_their_formula_per_sample():
    gen = torch.Generator().manual_seed(0)
    net = torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    ana = net + 0.3 * torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    D = 64
    for b in range(4):  # 1 − SS_res / (D · unbiased variance of the network's image), one sample at a time
        n, a = net[b].flatten().tolist(), ana[b].flatten().tolist()
        mean = sum(n) / D
        var = sum((v - mean) ** 2 for v in n) / (D - 1)
        want = 1 - sum((x - y) ** 2 for x, y in zip(a, n)) / (D * var)
        assert abs(float(peer_r2(ana[b : b + 1], net[b : b + 1])) - want) < 1e-12
    # the same quantity as ours up to Bessel's factor: 1 − peer = (1 − ours)·(D − 1)/D
    torch.testing.assert_close(1 - peer_r2(ana, net), (1 - r2(ana, net)) * (D - 1) / D, rtol=1e-12, atol=0)
    assert float(peer_r2(net, net).min()) == 1.0
    flat = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    assert float(peer_r2(flat + 0.5, flat)) == 1 - 0.25 * D / D  # a constant network image counts as variance 1


def test_the_evaluation_reports_the_peers_mean_beside_our_medians():
    gen = torch.Generator().manual_seed(1)
    net = torch.rand(5, 1, 6, 6, generator=gen, dtype=torch.float64)
    rows = compare(net, net + 0.1 * torch.randn(5, 1, 6, 6, generator=gen, dtype=torch.float64), torch.rand(5, 1, 6, 6, generator=gen))
    out = summarise(rows)
    assert abs(out["mean_machine_peer_r2"] - sum(r["machine_peer_r2"] for r in rows) / 5) < 1e-12
    assert "median_machine_r2" in out and "mean_is_peer_r2" in out and "mean_machine_r" not in out


def test_a_loss_curve_plateaus_when_its_last_fifth_stops_improving():
    from pipelines.training import PLATEAU, tail_improvement

    falling = [[i * 100, 1.0 / (1 + i)] for i in range(1, 41)]  # still falling by a fifth at the end
    flat = [[i * 100, 0.05 + 0.5 * 0.7**i] for i in range(1, 41)]  # converged to 0.05
    assert tail_improvement(falling) > 0.15 and tail_improvement(flat) < PLATEAU
    assert tail_improvement(falling[:3]) is None
    last = [loss for it, loss in flat if it > 3200]
    before = [loss for it, loss in flat if 2400 < it <= 3200]
    assert abs(tail_improvement(flat) - (1 - (sum(last) / len(last)) / (sum(before) / len(before)))) < 1e-15
