"""The benchmark scripts, where their plumbing or arithmetic can break unseen: bench_policy.py and bench_topk.py
end to end on 100 MNIST images and 3 DDIM steps (resume, refusal of foreign folders, one folder of exact
references serving both), bench_peer.py against the paper's module, bench_proposals.py's efficiencies
against a direct computation, and bench_search.py's per-distance costs. Their numbers are reported in the README and docs/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *args: str, datasets: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PATCHBANK_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--n-train", "100", "--steps", "3", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_exact_references_shared_and_resumed(datasets_dir: Path, tmp_path: Path) -> None:
    refs, topk, bank = tmp_path / "refs", tmp_path / "topk", tmp_path / "bank"
    common = ("--seeds", "0-1", "--json")
    policy = run("bench_policy.py", *common, str(tmp_path / "p.json"), "--exact", "--out", str(refs), datasets=datasets_dir)
    assert policy.returncode == 0, policy.stderr
    stored = torch.load(refs / "exact-seed1.pt", weights_only=False)
    assert [s["step"] for s in stored["steps"]] == [0, 1, 2] and not stored["resumed"]

    # top-k against the policy run's references: its own exact pass is skipped
    args = (*common, str(tmp_path / "t.json"), "--index", "Flat", "--materialise-max", "7", "--bank", str(bank), "--out", str(topk))
    first = run("bench_topk.py", *args, "--exact-from", str(refs), datasets=datasets_dir)
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "t.json").read_text())
    assert "exact:" not in first.stdout and sorted(p.name for p in topk.iterdir()) == ["topk-seed0.pt", "topk-seed1.pt"]
    assert report["pearson_r_min"] > 0.999999 and report["max_abs_diff"] < 1e-6  # certified top-k + exact fallback
    assert [r["step"] for r in report["per_step"]] == [0, 1, 2] and all("exact_step_s" in r for r in report["per_step"])

    # the same top-k answers as an exact pass of its own; a re-run reads what is stored
    (topk / "topk-seed1.pt").unlink()
    again = run("bench_topk.py", *args, datasets=datasets_dir)
    assert again.returncode == 0, again.stderr
    assert "seed 0: topk result read" in again.stdout and "seed 1: topk " in again.stdout
    own = torch.load(topk / "exact-seed0.pt", weights_only=False)["final"]
    assert torch.allclose(own, torch.load(refs / "exact-seed0.pt", weights_only=False)["final"], atol=1e-9)
    assert json.loads((tmp_path / "t.json").read_text())["pearson_r_min"] > 0.999999

    # references made with other options are refused, naming the file
    other = run("bench_topk.py", *args, "--exact-from", str(refs), "--exact-dtype", "float32", datasets=datasets_dir)
    assert other.returncode != 0 and "exact-seed0.pt was written with other options" in other.stderr


def test_one_step_agrees_with_the_papers_code(datasets_dir: Path) -> None:
    """bench_peer.py: patchbank's exact bbELS step equals the paper's own module on the same inputs (float32 peer)."""
    env = os.environ | {"PATCHBANK_DATASETS": str(datasets_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peer.py"), "--n-train", "30", "--scales", "3", "5",
                          "--repeat", "1", "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["3"], ["5"])]
    exact = [r for r in rows if r[1] == "exact"]
    assert len(exact) == 4 and len([r for r in rows if r[1] == "paper"]) == 2
    for r in exact:  # P, "exact", dtype, seconds, × peer, r peer, r exact, max|Δ|, visited, GFLOP/s, of peak
        assert float(r[5]) > 0.999999 and float(r[7]) < 1e-4
        assert 0 < float(r[9]) and 0 < float(r[8]) <= 1


def test_proposal_efficiencies_match_a_direct_computation() -> None:
    """bench_proposals.py's ε = 1/Σπ²/q: for the shared draws (q ∝ counts) against π from a plain softmax over
    every patch with repetitions, and every proposal's ε within (0, 1]."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_proposals import PROPOSALS, efficiencies

    from machines import alpha_sigma2
    from patchbank import MemoryBank
    from patchbank.datasets import random_images, to_model_range
    from patchbank.geometry import BucketKey, patches_at

    data = random_images(40, (1, 8, 8), seed=5)
    data.images.copy_(data.images // 128 * 255)  # black and white: many repeated patches, so counts matter
    bank = MemoryBank(data)
    key = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))
    clusters = bank.clustered(key, 16)
    a, s2 = alpha_sigma2(0.5)
    locs = key.locations(8, 8)[:5]
    x = to_model_range(data.images[:2], torch.float64) * a + torch.randn(2, 1, 8, 8, dtype=torch.float64) * s2**0.5
    q = patches_at(x, locs, 3, "zeros").reshape(-1, 9)
    eff = efficiencies(q, clusters, a, s2)
    every = patches_at(to_model_range(data.images, torch.float64), key.locations(8, 8), 3, "zeros").reshape(-1, 9)
    pi = torch.softmax(-torch.cdist(q, a * every) ** 2 / (2 * s2), 1)  # [Q, N·L], every repetition its own entry
    uniques, inverse = torch.unique(every, dim=0, return_inverse=True)
    pi_u = torch.zeros(q.shape[0], uniques.shape[0], dtype=torch.float64).index_add_(1, inverse, pi)
    counts = torch.bincount(inverse).double()
    direct = 1 / (pi_u**2 / (counts / counts.sum())).sum(1)
    torch.testing.assert_close(eff["counts"], direct, atol=1e-10, rtol=1e-8)
    for p in PROPOSALS:
        assert ((eff[p] > 0) & (eff[p] <= 1 + 1e-9)).all(), p


def test_search_cost_is_measured_per_computed_distance(datasets_dir: Path) -> None:
    """bench_search.py: the exact sweep's seconds per visited pair and each search's seconds per distance, in one run,
    on held-out pixels; every ratio is a positive number."""
    env = os.environ | {"PATCHBANK_DATASETS": str(datasets_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), "--dataset", "mnist", "--resize", "16",
                          "--n-train", "60", "--images", "1", "--t", "0.1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "% of the pairs visited" in out.stdout
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| FAISS") or line.startswith("| torch")]
    assert [r[0].strip() for r in rows] == ["FAISS Flat, k = 64", "FAISS Flat, k = 1024", "torch search, k = 64", "torch search, k = 1024"]
    assert all(float(r[3]) > 0 for r in rows)
