"""The ablation tool on a small real bank: exact rows have zero error, a top-k row that
retrieves whole buckets has zero error, certified rows stay within their bounds, runs resume, and
the concentration study agrees with a brute-force computation over undeduplicated patches."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from machines import alpha_sigma2
from patchbank import MemoryBank, to_model_range
from patchbank.geometry import BucketKey, patches_at
from pipelines.ablation import AblationConfig, Variant, entries_for_mass, posterior_concentration, run_ablation
from pipelines.ablation import run as ablation
from pipelines.ablation.config import BOUND_SLACK
from pipelines.cli import build_parser, config_from

GRID = [
    "exact",
    "exact:dedup=0",
    "topk:k=100000",  # more than any bucket holds: the whole posterior
    "topk:k=8:tol=none",  # truncated, no fallback: a real, certified error
    "topk:k=8:index=IVF4,Flat:nprobe=1:tol=none",
    "topk:k=8:index=Flat:tol=1e-3",
    "tail:k=8:samples=256",  # statistical: reported, not certified
    "auto:samples=512:max_samples=2048:se_tol=0.05",  # the automatic policy: statistical too
    "summary:tol=1e-3:leaf_size=16",  # cluster summaries: certified
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, datasets_env):
    root = tmp_path_factory.mktemp("ablate")
    (root / "calibration.json").write_text(json.dumps({"schedule": [[0.25, 3], [0.5, 5], [1.0, 5]]}))
    cfg = AblationConfig(dataset="mnist", resize=12, n_train=40, seeds=[0, 1], steps=4, grid=GRID,
                         calibration=str(root / "calibration.json"), banks=str(root / "banks"), out=str(root / "out"),
                         concentration_times=[0.1, 0.9], concentration_scales=[3], concentration_pixels=6,
                         certificate_ks=[2, 100000], certificate_times=[0.1, 0.6])
    return cfg, run_ablation(cfg, progress=False)


def test_every_report_file_is_written(small_run):
    cfg, report = small_run
    out = Path(cfg.out)
    for name in ("config.json", "rows.csv", "results.json", "summary.md", "pareto.png", "fallback.png",
                 "concentration.json", "concentration.png"):
        assert (out / name).is_file(), name
    assert [r["config"] for r in report["rows"]] == GRID
    assert len(report["steps"]["exact"]) == cfg.steps
    env = json.loads((out / "config.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1


def test_the_certificate_study_counts_what_each_top_k_entry_certifies(small_run):
    """One cell per top-k entry × t × k, P from the schedule, kept in certificate.json and tabulated in summary.md. With k
    above every bucket's size every pixel is certified; fewer retrieved patches never certify more pixels."""
    cfg, report = small_run
    cells = report["certificate"]
    entries = [g for g in GRID if g.startswith("topk")]
    assert [(c["config"], c["t"], c["P"], c["k"]) for c in cells] == [(e, t, P, k) for t, P in ((0.1, 3), (0.6, 5))
                                                                      for e in entries for k in (2, 100000)]
    assert json.loads((Path(cfg.out) / "certificate.json").read_text())["cells"] == cells
    by = {(c["config"], c["t"], c["k"]): c for c in cells}
    for e in entries:
        for t in (0.1, 0.6):
            whole, two = by[e, t, 100000], by[e, t, 2]
            assert whole["certified"] == 1.0 and whole["tabulated"] == two["tabulated"] == cfg.concentration_pixels
            assert two["certified"] <= whole["certified"]
    assert by["topk:k=8:tol=none", 0.6, 2]["certified"] < 1  # at t = 0.6 two patches never hold all but 1e-4
    summary = (Path(cfg.out) / "summary.md").read_text()
    assert "Certificate study" in summary and "| `topk:k=8:tol=none` | 0.60 | 5 | " in summary


def test_exact_rows_and_whole_bucket_topk_have_zero_error(small_run):
    rows = {r["config"]: r for r in small_run[1]["rows"]}
    assert rows["exact"]["step_error_max"] == 0 and rows["exact"]["max_abs_diff"] == 0
    for name in ("exact:dedup=0", "topk:k=100000"):
        assert rows[name]["step_error_max"] < 1e-12, name
        assert rows[name]["max_abs_diff"] < 1e-10 and rows[name]["pearson_r_min"] > 1 - 1e-12, name
    assert rows["topk:k=100000"]["eps_max"] == 0 and rows["topk:k=100000"]["fallback_fraction"] == 0


def test_certified_rows_stay_within_their_bounds(small_run):
    cfg, report = small_run
    for r in report["rows"]:
        if r["guarantee"] == "statistical":
            assert not r["certified"] and r["within_bound"] is None and r["se_median"] is not None
            assert r["pearson_r_min"] > 0.99, r["config"]
            continue
        assert r["certified"] and r["within_bound"], r["config"]
        for s in report["steps"][r["config"]]:
            assert s["error_max"] <= s["bound"] + BOUND_SLACK
    truncated = next(r for r in report["rows"] if r["config"] == "topk:k=8:tol=none")
    assert truncated["step_error_max"] > 1e-6  # the measurement is not vacuous: truncation does change x̂0
    assert truncated["fallback_fraction"] == 0
    per_step = [s["certified_fraction"] for s in report["steps"]["topk:k=8:tol=none"]]
    assert truncated["certified_fraction"] == pytest.approx(sum(per_step) / len(per_step)) and 0 <= min(per_step)
    assert all(r["certified_fraction"] is None for r in report["rows"] if r["kind"] != "topk")
    summary = (Path(cfg.out) / "summary.md").read_text()
    table = summary[summary.index("Pixels certified by top-k per step"):]
    assert "| `topk:k=8:tol=none` | " + " | ".join(f"{f:.3f}" for f in per_step) + " |" in table


def test_rerun_resumes_from_finished_configurations(small_run, monkeypatch):
    cfg, report = small_run

    def fail(*a, **k):
        raise AssertionError("a finished configuration was recomputed")

    monkeypatch.setattr(ablation, "_run_variant", fail)
    monkeypatch.setattr(ablation, "sample", fail)  # the reference run is cached too
    again = run_ablation(AblationConfig.from_json(Path(cfg.out) / "config.json"), progress=False)
    assert [r["pearson_r_min"] for r in again["rows"]] == [r["pearson_r_min"] for r in report["rows"]]


def test_reference_resumes_seed_by_seed(small_run, monkeypatch, tmp_path):
    """An interrupted reference keeps its finished seeds: only the missing seed is sampled again."""
    cfg, report = small_run
    out = tmp_path / "out"  # a copy: the module's shared run stays whole for the other tests
    shutil.copytree(cfg.out, out)
    cfg = AblationConfig.from_json(Path(cfg.out) / "config.json")
    cfg.out = str(out)
    before = torch.load(out / "reference.pt", weights_only=False)
    (out / "reference.pt").unlink()
    (out / "reference" / f"seed{cfg.seeds[1]}.pt").unlink()
    calls = []
    real = ablation._reference_run

    def counted(machine, c, noise, labels, progress):
        calls.append(noise.shape[0])
        return real(machine, c, noise, labels, progress)

    monkeypatch.setattr(ablation, "_reference_run", counted)
    monkeypatch.setattr(ablation, "_run_variant", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    run_ablation(cfg, progress=False)
    assert calls == [1]
    after = torch.load(out / "reference.pt", weights_only=False)
    for a, b in zip([after["final"]] + after["inputs"] + after["x0"], [before["final"]] + before["inputs"] + before["x0"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # the recomputed seed ran alone: round-off at most


def test_reference_on_worker_processes(small_run, monkeypatch, tmp_path):
    """The exact reference's seeds on two worker processes give the serial reference (round-off at most: other
    threads), and the finished configurations are kept: the executor is not part of what a result depends on."""
    cfg, _ = small_run
    out = tmp_path / "out"
    shutil.copytree(cfg.out, out)
    cfg = AblationConfig.from_json(Path(cfg.out) / "config.json")
    cfg.out, cfg.executor = str(out), "processes:2"
    before = torch.load(out / "reference.pt", weights_only=False)
    shutil.rmtree(out / "reference")
    (out / "reference.pt").unlink()
    monkeypatch.setattr(ablation, "_run_variant", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    run_ablation(cfg, progress=False)
    assert sorted(p.name for p in (out / "reference").iterdir()) == [f"seed{s}.pt" for s in sorted(cfg.seeds)]
    after = torch.load(out / "reference.pt", weights_only=False)
    for a, b in zip([after["final"]] + after["inputs"] + after["x0"], [before["final"]] + before["inputs"] + before["x0"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_configurations_resume_seed_batch_by_batch(tmp_path, datasets_dir, monkeypatch):
    """With variant_batch=1 an interrupted configuration keeps its finished seeds; the resumed
    result equals an uninterrupted run of the same batches."""
    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    (tmp_path / "calibration.json").write_text(json.dumps({"schedule": [[0.5, 3], [1.0, 5]]}))
    grid = ["exact", "topk:k=8:tol=none"]

    def config(out: str) -> AblationConfig:
        return AblationConfig(dataset="mnist", resize=12, n_train=30, seeds=[0, 1], steps=3, grid=grid, reference_batch=1,
                              variant_batch=1, calibration=str(tmp_path / "calibration.json"), banks=str(tmp_path / "banks"),
                              out=str(tmp_path / out), concentration=False)

    whole = run_ablation(config("whole"), progress=False)
    real, calls = ablation._variant_batch, []

    def flaky(cfg, v, *args):
        calls.append((v.name, args[-2]))
        if v.name == grid[1] and args[-2] == [1]:
            raise KeyboardInterrupt  # killed during the second seed of the second configuration
        return real(cfg, v, *args)

    monkeypatch.setattr(ablation, "_variant_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(config("cut"), progress=False)
    assert calls == [("exact", [0]), ("exact", [1]), (grid[1], [0]), (grid[1], [1])]
    calls.clear()
    monkeypatch.setattr(ablation, "_variant_batch", lambda cfg, v, *args: calls.append((v.name, args[-2])) or real(cfg, v, *args))
    resumed = run_ablation(config("cut"), progress=False)
    assert calls == [(grid[1], [1])]  # the exact row and seed 0 of top-k were kept
    for a, b in zip(whole["rows"], resumed["rows"]):
        for k in ("pearson_r_min", "max_abs_diff", "step_error_max", "fallback_fraction", "eps_max"):
            assert a[k] == b[k], (a["config"], k)
    assert len(resumed["steps"][grid[1]]) == 3 and resumed["steps"][grid[1]][0]["queries"] == 2 * 144


def test_a_run_split_by_seed_is_reused_by_the_whole_run(tmp_path, datasets_dir, monkeypatch):
    """Seeds run as separate processes (one per seed, same ``out``) are merged by the run over all
    seeds without sampling again, and equal a run over all seeds from scratch; the concentration
    study, which depends on neither seeds nor grid, is computed once."""
    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    (tmp_path / "calibration.json").write_text(json.dumps({"schedule": [[0.5, 3], [1.0, 5]]}))

    def config(out: str, seeds: list[int]) -> AblationConfig:
        return AblationConfig(dataset="mnist", resize=12, n_train=30, seeds=seeds, steps=3, grid=["topk:k=8"],
                              reference_batch=1, variant_batch=1, calibration=str(tmp_path / "calibration.json"),
                              banks=str(tmp_path / "banks"), out=str(tmp_path / out), concentration_times=[0.5],
                              concentration_scales=[3], concentration_pixels=4)

    whole = run_ablation(config("whole", [0, 1]), progress=False)
    for seed in (0, 1):
        run_ablation(config("split", [seed]), progress=False)

    def fail(*a, **k):
        raise AssertionError("recomputed")

    for name in ("_reference_run", "_variant_batch", "_bank_for", "concentration_study"):
        monkeypatch.setattr(ablation, name, fail)
    merged = run_ablation(config("split", [0, 1]), progress=False)
    for k in ("pearson_r_min", "max_abs_diff", "step_error_max", "eps_max"):
        assert merged["rows"][0][k] == pytest.approx(whole["rows"][0][k], rel=1e-9, abs=1e-12), k
    assert merged["concentration"] == whole["concentration"]
    assert len(merged["steps"]["topk:k=8"]) == 3 and merged["steps"]["topk:k=8"][0]["queries"] == 2 * 144
    # no exact row: the speed-up is taken against the reference run's seconds, and the summary says so
    assert merged["best"]["config"] == "topk:k=8" and merged["best"]["baseline"] == "reference run"
    assert merged["best"]["speedup_vs_exact"] == pytest.approx(merged["reference_seconds"] / merged["rows"][0]["seconds"])
    assert "vs the reference run" in (tmp_path / "split" / "summary.md").read_text()


def test_float32_reference_and_rows(tmp_path, datasets_dir, monkeypatch):
    """A float32 reference (the affordable one at 60k): a float32 exact row equals it exactly, the
    float64 exact row and certified rows are within round-off of it, and a float64 reference is a
    different reference (not reused)."""
    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    (tmp_path / "calibration.json").write_text(json.dumps({"schedule": [[0.5, 3], [1.0, 5]]}))
    grid = ["exact:dtype=float32", "exact", "topk:k=8:index=Flat:tol=1e-3:dtype=float32"]

    def config(dtype: str) -> AblationConfig:
        return AblationConfig(dataset="mnist", resize=12, n_train=30, seeds=[0, 1], steps=3, grid=grid, reference_dtype=dtype,
                              calibration=str(tmp_path / "calibration.json"), banks=str(tmp_path / "banks"),
                              out=str(tmp_path / "out"), concentration=False)

    rep32 = run_ablation(config("float32"), progress=False)
    rows = {r["config"]: r for r in rep32["rows"]}
    assert rows["exact:dtype=float32"]["max_abs_diff"] == 0 and rows["exact:dtype=float32"]["step_error_max"] == 0
    assert 0 < rows["exact"]["max_abs_diff"] < 1e-4 and rows["exact"]["pearson_r_min"] > 1 - 1e-9
    assert all(r["within_bound"] for r in rep32["rows"])
    ref32 = torch.load(tmp_path / "out" / "reference.pt", weights_only=False)
    rep64 = run_ablation(config("float64"), progress=False)
    ref64 = torch.load(tmp_path / "out" / "reference.pt", weights_only=False)
    assert ref64["key"] != ref32["key"] and 0 < (ref64["final"] - ref32["final"]).abs().max() < 1e-4
    rows64 = {r["config"]: r for r in rep64["rows"]}
    assert rows64["exact"]["max_abs_diff"] == 0 and rows64["exact:dtype=float32"]["max_abs_diff"] > 0
    with pytest.raises(ValueError, match="reference_dtype"):
        run_ablation(config("float16"), progress=False)


def test_comparators_are_ablated_too(tmp_path, datasets_dir, monkeypatch):
    """A comparator theory in the ablation tool: the smoothed closed form's IS posteriors go through each grid
    backend (exact under every one, auto's in float32), a comparator that takes no backend accepts exact entries
    only, and no concentration study is made (it is of patch buckets)."""
    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    grid = ["exact", "topk:k=8", "auto"]
    cfg = AblationConfig(dataset="mnist", resize=12, n_train=30, seeds=[0, 1], steps=3, grid=grid, machine="smoothed:sigma=0.2:draws=2",
                         banks=str(tmp_path / "banks"), out=str(tmp_path / "out"))
    report = run_ablation(cfg, progress=False)
    rows = {r["config"]: r for r in report["rows"]}
    assert rows["exact"]["max_abs_diff"] == 0 and rows["topk:k=8"]["max_abs_diff"] == 0 and rows["topk:k=8"]["step_error_max"] == 0
    assert 0 < rows["auto"]["max_abs_diff"] < 1e-4 and rows["auto"]["pearson_r_min"] > 1 - 1e-9
    assert "concentration" not in report and not (tmp_path / "out" / "concentration.json").exists()
    pca = AblationConfig(dataset="mnist", resize=12, n_train=30, seeds=[0], steps=3, grid=["exact"], machine="pca_locality",
                         out=str(tmp_path / "pca"))
    assert run_ablation(pca, progress=False)["rows"][0]["max_abs_diff"] == 0
    with pytest.raises(ValueError, match="computes its posteriors itself, exactly, through no backend; .* not topk:k=8"):
        run_ablation(AblationConfig(**{**asdict(pca), "grid": ["exact", "topk:k=8"]}), progress=False)


def test_concentration_dedup_invariance_and_brute_force(mnist_at):
    data = mnist_at(30, resize=12)
    key = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1), None)  # interior pixels
    locs = key.locations(12, 12)
    x = to_model_range(data.images[:3], torch.float64)
    for t in (0.1, 0.6):
        a, s2 = alpha_sigma2(t)
        xt = a * x + s2**0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        q = patches_at(xt, locs[:4], 3, "zeros").flatten(0, 1)
        dedup = posterior_concentration(MemoryBank(data, dedup=True), key, q, a, s2)
        raw = posterior_concentration(MemoryBank(data, dedup=False), key, q, a, s2)
        # per-patch entropy is invariant to storing identical patches once with a count
        torch.testing.assert_close(dedup["n_eff_patches"], raw["n_eff_patches"], rtol=1e-9, atol=0)
        assert (dedup["entries"] < raw["entries"]).all() and (dedup["k_mass"] <= raw["k_mass"]).all()
        # brute force over every patch
        patches = patches_at(to_model_range(data.images, torch.float64), locs, 3, "zeros").flatten(0, 1)
        logits = -((q[:, None, :] - a * patches[None]) ** 2).sum(-1) / (2 * s2)
        p = logits.softmax(1)
        n_eff = torch.exp(-(p * p.clamp_min(1e-300).log()).sum(1))
        torch.testing.assert_close(raw["n_eff_patches"], n_eff, rtol=1e-9, atol=0)
        k = [(int((ps.sort(descending=True).values.cumsum(0) < 1 - 1e-3).sum()) + 1) for ps in p]
        assert raw["k_mass"].tolist() == k
        assert (dedup["n_eff_distinct"] >= 1).all() and (dedup["k_mass"] <= dedup["entries"]).all()
        one_by_one = posterior_concentration(MemoryBank(data, dedup=False), key, q, a, s2, memory_mb=0)  # groups of 1
        for name in raw:
            torch.testing.assert_close(one_by_one[name], raw[name], rtol=1e-12, atol=0)


def test_concentration_over_whole_images(mnist_at):
    """IS buckets (whole images, no patch-location count to size the logits) agree with a brute-force softmax."""
    data = mnist_at(30, resize=12)
    x = to_model_range(data.images, torch.float64).flatten(1)
    a, s2 = alpha_sigma2(0.3)
    q = a * x[:3] + s2**0.5 * torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = posterior_concentration(MemoryBank(data, dedup=False), BucketKey("IS", None, "zeros", (), None), q, a, s2,
                                  chunk_size=7)
    p = (-((q[:, None] - a * x[None]) ** 2).sum(-1) / (2 * s2)).softmax(1)
    torch.testing.assert_close(got["n_eff_patches"], torch.exp(-(p * p.clamp_min(1e-300).log()).sum(1)), rtol=1e-9, atol=0)
    assert got["entries"].tolist() == [30] * 3


def test_entries_for_mass_equals_a_full_sort():
    """The histogram refinement gives the count a descending sort + cumulative sum gives, on
    posteriors from flat to sharply peaked and with ties (identical probabilities)."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(50_000, generator=gen, dtype=torch.float64) * w for w in (1e-6, 0.1, 3.0, 40.0)]
    cases += [torch.zeros(30_001, dtype=torch.float64),  # uniform: ties everywhere (30,001: no exact boundary hit)
              torch.cat([torch.full((20_000,), 2.0), torch.full((20_000,), -1.0)]).double(),
              torch.randint(0, 5, (40_000,), generator=gen).double() * 0.7]
    for ell in cases:
        logp = ell - torch.logsumexp(ell, 0)
        p = logp.exp()
        for mass in (1e-3, 0.3):
            target = (1 - mass) * float(p.sum())
            cum = p.sort(descending=True).values.cumsum(0)
            want = min(int((cum < target).sum()) + 1, p.numel())
            assert entries_for_mass(logp, target, bins=16, small=64) == want
            assert entries_for_mass(logp, target) == want


def test_grid_entries_are_backend_specs_with_a_device():
    v = Variant.parse("topk:k=64:index=IVF64,Flat:nprobe=4:tol=none:device=cpu")
    b = v.backend()
    assert (v.kind, v.device, b.k, b.index, b.nprobe, b.tol, b.guarantee) == ("topk", "cpu", 64, "IVF64,Flat", 4, None, "certified")
    assert Variant.parse("topk:index=HNSW32").backend().guarantee == "certified"  # through the cluster bound
    assert Variant.parse("topk:index=HNSW32:bound=index").backend().guarantee == "heuristic"
    assert Variant.parse("exact:dedup=0").backend().dedup is False
    assert Variant.parse("auto:dtype=float32").backend().exact.dtype == torch.float32
    assert Variant.parse("summary:leaf_size=64:device=cuda").device == "cuda"
    assert v.backend() is not b  # each configuration gets its own backend (and statistics)
    for bad in ("fast", "topk:k", "topk:foo=1", "exact:k=3", "tail:tol=1e-3", "auto:k=3", "auto:min_ess=none",
                "summary:tol=none", "topk:leaf=8", "exact:dtype=float16"):
        with pytest.raises(ValueError, match="grid entry"):
            Variant.parse(bad)


def test_cli_overrides_a_saved_config(tmp_path):
    saved = AblationConfig(n_train=77, seeds=[3], out=str(tmp_path / "a"))
    (tmp_path / "config.json").write_text(json.dumps({"ablation": asdict(saved), "environment": {}}))
    args = build_parser().parse_args(["ablate", "--config", str(tmp_path / "config.json"), "--steps", "5", "--n-train", "0",
                                      "--grid", "exact", "topk:k=16"])
    cfg = config_from(AblationConfig, args)
    assert (cfg.steps, cfg.n_train, cfg.seeds, cfg.grid, cfg.out) == (5, None, [3], ["exact", "topk:k=16"], str(tmp_path / "a"))
    with_study = config_from(AblationConfig, build_parser().parse_args(["ablate", "--certificate-ks", "64", "2048",
                                                                         "--certificate-times", "0.05"]))
    assert (with_study.certificate_ks, with_study.certificate_times) == ([64, 2048], [0.05])
    assert AblationConfig().certificate_ks == []  # no study unless asked
    with pytest.raises(ValueError, match=r"certificate_ks must lie in \[1, inf\)"):
        run_ablation(AblationConfig(certificate_ks=[0], out=str(tmp_path / "b")), progress=False)
