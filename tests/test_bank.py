"""The on-disk patch bank: build, reopen, resume after interruption, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import noised

import patchbank.bank as bank_mod
from machines import ExactBackend, ScoreMachine
from patchbank import BankError, BankSpec, BucketKey, ImageData, MemoryBank, PatchBank
from patchbank.geometry import dictionary_groups


@pytest.fixture(scope="module")
def mnist_tiny(mnist_at) -> ImageData:
    return mnist_at(60)


@pytest.fixture(scope="module")
def built(mnist_tiny, tmp_path_factory) -> PatchBank:
    path = tmp_path_factory.mktemp("bank") / "mnist60"
    return PatchBank.build(mnist_tiny, path, BankSpec(scales=[3, 5], rules=["bbELS", "ELS"], labels=True, index="Flat"), progress=False)


def _tree(path) -> dict:
    """Every file of a bank except the build timings: name → bytes."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != "timing.json":
            data = f.read_bytes()
            if f.name == "manifest.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "build_seconds"}).encode()
            out[str(f.relative_to(path))] = data
    return out


def _first_chunk(array_dir):
    """The first chunk file of a zarr v3 array (under its ``c/`` folder)."""
    return next(f for f in sorted((array_dir / "c").rglob("*")) if f.is_file())


def test_bank_serves_the_same_posterior_as_memory(built, mnist_tiny):
    x = noised(mnist_tiny, 0.3, 2)
    for kind, P in [("bbELS", 5), ("ELS", 3)]:
        mem = ScoreMachine(mnist_tiny, kind, scales=P, backend=ExactBackend(prune=False))(x, 0.3)
        disk = ScoreMachine(PatchBank.open(built.path), kind, scales=P)(x, 0.3)
        assert torch.allclose(disk, mem, atol=1e-12, rtol=0)
    cond = ScoreMachine(built, "bbELS", scales=3, conditional=True)(x, 0.3, torch.tensor([3, 5]))
    ref = ScoreMachine(mnist_tiny, "bbELS", scales=3, conditional=True, backend=ExactBackend(prune=False))(x, 0.3, torch.tensor([3, 5]))
    assert torch.allclose(cond, ref, atol=1e-12, rtol=0)


def test_stream_size_counts_what_the_stream_yields(built, mnist_tiny):
    """Work sized by a bucket's entries (the policy's draw counts, the concentration study's query
    groups) uses the count the stream yields: distinct patches on a deduplicating bank (in memory
    or on disk), every patch without deduplication or beyond ``materialise_max``."""
    C, H, W = mnist_tiny.shape
    for P in (3, 5):
        interior = max(dictionary_groups(H, W, P, "bbELS"), key=lambda g: g[1].shape[0])[0]
        key = BucketKey("bbELS", P, "zeros", interior, None)
        banks = (built, MemoryBank(mnist_tiny, dedup=True), MemoryBank(mnist_tiny), MemoryBank(mnist_tiny, dedup=True, materialise_max=3))
        for bank in banks:
            streamed = sum(c.keys.shape[0] for c in bank.stream(key, 1000))
            assert bank.stream_size(key) == streamed <= bank.bucket_size(key)
        assert built.stream_size(key) < built.bucket_size(key)  # the dedup case is not the trivial one


def test_dedup_counts_and_info(built, mnist_tiny):
    info = built.info()
    assert info["n_images"] == 60 and set(info["scales"]) == {3, 5}
    timing = {d.parent.name: json.loads(d.read_text())["seconds"] for d in (built.path / "buckets").glob("*/timing.json")}
    for P, s in info["scales"].items():  # each scale's seconds: the sum of its buckets' (rounded to ms, so maybe 0)
        assert s["seconds"] == pytest.approx(sum(v for name, v in timing.items() if f"-P{P}-" in name)) and s["seconds"] >= 0
    interior = built.unique_patches(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)))
    assert interior.total == 60 * 26 * 26 and len(interior.counts) < interior.total
    mem = MemoryBank(mnist_tiny, dedup=True).unique_patches(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)))
    assert torch.equal(interior.patches, mem.patches) and torch.equal(interior.counts, mem.counts)


def test_interrupted_build_resumes_to_an_identical_bank(mnist_tiny, tmp_path, monkeypatch):
    spec = BankSpec(scales=[3], rules=["bbELS"], index="IVF4,Flat")
    whole = PatchBank.build(mnist_tiny, tmp_path / "whole", spec, progress=False)
    original = bank_mod.write_bucket
    calls = {"n": 0}

    def dying(tmp, builder, key, spec_):
        calls["n"] += 1
        if calls["n"] == 4:
            original(tmp, builder, key, spec_)  # half-written: the .tmp directory is left behind
            raise KeyboardInterrupt
        original(tmp, builder, key, spec_)

    monkeypatch.setattr(bank_mod, "write_bucket", dying)
    with pytest.raises(KeyboardInterrupt):
        PatchBank.build(mnist_tiny, tmp_path / "resumed", spec, progress=False)
    with pytest.raises(BankError, match="did not finish"):
        PatchBank.open(tmp_path / "resumed")
    monkeypatch.setattr(bank_mod, "write_bucket", original)
    resumed = PatchBank.build(mnist_tiny, tmp_path / "resumed", spec, progress=False)
    assert _tree(resumed.path) == _tree(whole.path)
    manifest = (whole.path / "manifest.json").read_bytes()  # building a finished bank again just opens it
    again = PatchBank.build(mnist_tiny, whole.path, spec, progress=False)
    assert (whole.path / "manifest.json").read_bytes() == manifest and again.info() == whole.info()
    shutil.rmtree(whole.path / "buckets" / "bbELS-P3-zeros-1_1_1_1-all")  # a lost bucket is rebuilt by the same build
    assert _tree(PatchBank.build(mnist_tiny, whole.path, spec, progress=False).path) == _tree(resumed.path)


def test_mismatched_and_corrupted_banks_fail_clearly(built, mnist_tiny, tmp_path):
    other = ImageData(255 - mnist_tiny.images, mnist_tiny.labels)
    with pytest.raises(BankError, match="built for other data"):
        PatchBank.open(built.path, expect=other)
    PatchBank.open(built.path, expect=mnist_tiny)
    with pytest.raises(BankError, match="different fingerprint"):
        PatchBank.build(other, built.path, BankSpec(scales=[3, 5], rules=["bbELS", "ELS"], labels=True), progress=False)
    with pytest.raises(BankError, match="no manifest"):
        PatchBank.open(tmp_path)
    with pytest.raises(BankError, match="no patch bank"):
        PatchBank.open(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(built.path, broken)
    _first_chunk(broken / "buckets" / "bbELS-P3-zeros-1_1_1_1-all" / "counts").write_bytes(b"garbage")
    with pytest.raises(BankError, match="corrupted"):
        PatchBank.open(broken).unique_patches(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)))
    with pytest.raises(BankError, match="no bucket"):
        PatchBank.open(broken).unique_patches(BucketKey("LS", 3, "zeros", (0, 0)))
    _first_chunk(broken / "data.zarr" / "images").write_bytes(b"garbage")
    with pytest.raises(BankError, match="data.zarr"):
        PatchBank.open(broken)


def test_large_scales_can_stay_unmaterialised(mnist_tiny, tmp_path):
    """Buckets above materialise_max store no patches and are served exactly by streaming."""
    from machines import TopKBackend

    bank = PatchBank.build(mnist_tiny, tmp_path / "b", BankSpec(scales=[3, 7], index="Flat", materialise_max=3), progress=False)
    info = bank.info()["scales"]
    assert info[3]["materialised"] and not info[7]["materialised"] and info[7]["bytes"] == 0
    key = BucketKey("bbELS", 7, "zeros", (3, 3, 3, 3))
    assert not bank.materialised(key)
    with pytest.raises(BankError, match="not materialised"):
        bank.unique_patches(key)
    x = noised(mnist_tiny, 0.4, 2)
    ref = ScoreMachine(mnist_tiny, "bbELS", scales=7, backend=ExactBackend(prune=False))(x, 0.4)
    backend = TopKBackend(k=16)
    assert torch.allclose(ScoreMachine(bank, "bbELS", scales=7)(x, 0.4), ref, atol=1e-12, rtol=0)
    assert torch.allclose(ScoreMachine(bank, "bbELS", scales=7, backend=backend)(x, 0.4), ref, atol=1e-12, rtol=0)
    assert backend.stats.fallback == backend.stats.queries == 2 * 28 * 28


def test_tables_beyond_the_memory_budget_are_dropped_least_recent_first_and_answers_do_not_change(mnist_at):
    from machines import ExactBackend, alpha_sigma2
    from patchbank import BucketKey, MemoryBank, patches_at

    data = mnist_at(40, 12)
    keys = [BucketKey("bbELS", P, "zeros", (P // 2,) * 4) for P in (3, 5, 7)]
    free, tight = MemoryBank(data, dedup=True, cache_bytes=None), MemoryBank(data, dedup=True, cache_bytes=1)
    a, s2 = alpha_sigma2(0.3)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(2):  # a calibration's pattern: every scale in turn, again and again
        for key in keys:
            q = patches_at(x, key.locations(12, 12), key.scale, "zeros").flatten(0, 1)
            assert torch.equal(ExactBackend().posterior(tight, key, q, a, s2), ExactBackend().posterior(free, key, q, a, s2))
            assert list(tight._held) == [key]  # a budget smaller than one bucket keeps only the bucket in use
    assert set(free._held) == set(keys) and free.cache_bytes is None
    one = sum(free._held.values()) // 2
    middle = MemoryBank(data, dedup=True, cache_bytes=one)
    for key in keys:
        middle.clustered(key, 16)
    held = list(middle._held)
    assert held[-1] == keys[-1] and keys[0] not in held and sum(middle._held.values()) <= max(one, middle._held[keys[-1]])
    assert not any(k[0] == keys[0] for k in middle._clustered) and keys[0] not in middle._unique
    with pytest.raises(ValueError, match="cache_bytes"):
        MemoryBank(data, cache_bytes=-1)


def test_the_table_budget_can_be_set_for_a_whole_run(mnist_at, monkeypatch):
    from patchbank import MemoryBank

    monkeypatch.setenv("PATCHBANK_CACHE_GB", "1.5")
    assert MemoryBank(mnist_at(4)).cache_bytes == 1_500_000_000
    monkeypatch.setenv("PATCHBANK_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="PATCHBANK_CACHE_GB"):
        MemoryBank(mnist_at(4))
