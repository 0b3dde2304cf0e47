"""The pieces every backend and subcommand shares: the spec grammar, the running sums, the fallback helper, fresh
copies of a backend, the config built from the command line, and the native layer's CPU detection."""

from __future__ import annotations

import json
import math
import platform

import pytest
import torch

from machines import native
from machines.posterior import BACKENDS, REGISTERED, RunningSums, TopKBackend, fill_rest, merge_all, merge_bounded
from machines.posterior.base import CertifiedStats, FallbackStats
from patchbank.specs import split_spec
from pipelines.cli import build_parser, config_from
from pipelines.jobs import ExplainConfig
from pipelines.sampling import SampleConfig


def test_one_spec_grammar_splits_every_family():
    main = {"processes": "workers", "ray": "address"}.get
    text = lambda kind, name: name == "address"  # noqa: E731
    assert split_spec("exact", "backend") == ("exact", [])
    assert split_spec("topk:k=256:tol=1e-4", "backend") == ("topk", [("k", "256"), ("tol", "1e-4")])
    assert split_spec("processes:4:threads=1", "executor", main) == ("processes", [("workers", "4"), ("threads", "1")])
    assert split_spec("ray:10.0.0.1:6379", "executor", main, text) == ("ray", [("address", "10.0.0.1:6379")])
    assert split_spec("ray:address=h:1:threads=2", "executor", main, text) == ("ray", [("address", "h:1"), ("threads", "2")])
    for bad, why in (("", "no kind"), ("topk:k", "'k' is not option=value"), ("topk:k=1:k=2", "k given twice"),
                     ("serial:4", "'4' is not option=value")):
        with pytest.raises(ValueError, match=why):
            split_spec(bad, "backend" if "topk" in bad or not bad else "executor")


def _sums_over(logits: torch.Tensor, values: torch.Tensor, moments: bool = False) -> RunningSums:
    """Brute-force sums of ``logits [Q, M]`` over entries with ``values [M, V]``, relative to the maximum."""
    m = logits.amax(1)
    w = (logits - m[:, None]).exp()
    acc = torch.cat([w @ values, w.sum(1, keepdim=True)], 1)
    second = None
    if moments:
        second = torch.cat([(w * w) @ values, (w * w) @ (values * values), (w * w).sum(1, keepdim=True)], 1)
    return RunningSums(m, acc, second)


def test_running_sums_fold_and_merge_to_the_whole():
    """Blocks folded in (torch or native), or parts merged in any order, give the sums over every entry."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen, dtype=torch.float64) * 40
    values = torch.rand(300, 2, generator=gen, dtype=torch.float64) * 2 - 1
    whole = _sums_over(logits, values, moments=True)
    parts = [_sums_over(logits[:, s : s + 100], values[s : s + 100], moments=True) for s in (0, 100, 200)]
    for order in (parts, parts[::-1]):
        merged = merge_all(order)
        torch.testing.assert_close(merged.mean(), whole.mean(), rtol=0, atol=1e-12)
        for got, want in zip(merged.estimate(), whole.estimate()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    fused = [True, False] if native.available() else [False]
    for native_fold in fused:
        state = RunningSums.empty(5, 2)
        for s in range(0, 300, 64):
            block = RunningSums.block_values(values[s : s + 64], torch.float64, native_fold)
            state.fold(slice(0, 5), logits[:, s : s + 64].clone(), block, 60.0 if native_fold else None)
        torch.testing.assert_close(state.mean(), whole.mean(), rtol=0, atol=1e-12)
    empty = RunningSums.empty(5, 2)
    torch.testing.assert_close(empty.merge(whole).mean(), whole.mean(), rtol=0, atol=0)  # no entries add nothing
    with pytest.raises(ValueError, match="hold no dictionary entries"):
        empty.mean()
    with pytest.raises(ValueError, match="no second moments"):
        _sums_over(logits, values).estimate()


def test_merged_bounds_are_rescaled_to_the_common_maximum():
    """Each part's bound is relative to its own maximum; merged, they add relative to the merged one."""
    a = RunningSums(torch.tensor([0.0]), torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    b = RunningSums(torch.tensor([math.log(4.0)]), torch.tensor([[3.0, 1.0]], dtype=torch.float64))
    merged, bound = merge_bounded([(a, torch.tensor([0.5])), (b, torch.tensor([2.0]))])
    assert float(merged.m) == pytest.approx(math.log(4.0))
    assert float(bound) == pytest.approx(0.5 / 4 + 2.0)


def test_fill_rest_answers_only_the_rest_in_one_call_and_counts_it():
    means = torch.zeros(6, 2, dtype=torch.float64)
    keep = torch.tensor([True, False, True, False, False, True])
    asked = []

    def exact(rows: torch.Tensor) -> torch.Tensor:
        asked.append(rows.tolist())
        return torch.ones(rows.numel(), 2, dtype=torch.float32)

    stats = FallbackStats()
    assert fill_rest(means, keep, exact, stats) == 3
    assert asked == [[1, 3, 4]] and stats.fallback == 3 and stats.exact_s >= 0
    assert means[keep].abs().sum() == 0 and (means[~keep] == 1).all() and means.dtype == torch.float64
    assert fill_rest(means, torch.ones(6, dtype=torch.bool), exact) == 0 and len(asked) == 1


def test_certified_stats_keep_what_is_within_tolerance():
    stats = CertifiedStats()
    keep = stats.accept(torch.tensor([1e-6, 1e-3, float("nan"), 5e-5]), 1e-4)
    assert keep.tolist() == [True, False, False, True] and stats.accepted_eps_max == pytest.approx(5e-5)
    stats.uncertified(2)
    assert (stats.queries, stats.fallback) == (2, 2) and torch.isinf(stats.eps[-1]).all()


def test_a_fresh_backend_shares_caches_not_counts():
    """A trial copy (a cost model's probe) starts with empty statistics, its inner backends too, and shares the
    caches of bank tables; reset walks every backend a backend holds."""
    topk = TopKBackend(k=8)
    topk.stats.queries, topk.exact.stats.visited = 5, 7
    topk._clusters["x"] = "cached"
    trial = topk.fresh()
    assert trial.stats.queries == 0 and trial.exact.stats.visited == 0 and trial.exact is not topk.exact
    assert trial._clusters is topk._clusters and (trial.k, trial.tol) == (topk.k, topk.tol)
    topk.reset()
    assert topk.stats.queries == 0 and topk.exact.stats.visited == 0


def test_every_registered_backend_and_its_statistics_are_exported():
    import machines
    import machines.posterior as posterior

    for entry in BACKENDS.values():
        for cls in (entry.cls, entry.stats):
            assert REGISTERED[cls.__name__] is cls
            assert getattr(posterior, cls.__name__) is cls and getattr(machines, cls.__name__) is cls


def test_a_subcommand_config_is_the_file_then_the_options_given(tmp_path):
    """Options left out keep the file's (or the defaults') values; options given replace them; the result is
    checked once, as the job will use it."""
    (tmp_path / "s.json").write_text(json.dumps({"dataset": "random", "n_train": 20, "steps": 3, "seeds": [4, 5]}))
    cfg = config_from(SampleConfig, build_parser().parse_args(["sample", "--config", str(tmp_path / "s.json"), "--steps", "7"]))
    assert (cfg.dataset, cfg.n_train, cfg.steps, cfg.seeds) == ("random", 20, 7, [4, 5])
    assert config_from(SampleConfig, build_parser().parse_args(["sample", "--n-train", "0"])).n_train is None  # 0: all
    assert config_from(SampleConfig, build_parser().parse_args(["sample"])) == SampleConfig()
    with pytest.raises(ValueError, match="steps"):
        config_from(SampleConfig, build_parser().parse_args(["sample", "--steps", "0"]))
    explain = config_from(ExplainConfig, build_parser().parse_args(["explain", "runs/s", "--m", "4", "--topk", "topk:k=64"]))
    assert (explain.sample, explain.m, explain.topk) == ("runs/s", 4, "topk:k=64")
    for argv, why in ((["explain"], "either a sample folder or --model"), (["explain", "s", "--model", "m.pt"], "not both"),
                      (["explain", "--model", "m.pt"], "needs --seeds"), (["explain", "s", "--seeds", "0"], "explain a network")):
        with pytest.raises(ValueError, match=why):
            config_from(ExplainConfig, build_parser().parse_args(argv))


@pytest.mark.skipif(platform.system() != "Linux", reason="CPU flags are read from /proc/cpuinfo")
def test_the_native_layer_reads_this_cpus_features():
    flags = native.cpu_flags()
    assert "fpu" in flags or "fp" in flags or platform.machine() not in ("x86_64", "AMD64")
    if native.available():
        assert native.peak_gflops(0.05) > 0
