"""A bank built in contiguous parts of its images (``ShardedBank``): the sharded backend's merge of its shards
equals the whole bank's exact posterior; building is resumable shard by shard and runs on an executor; a
shard that is not the one recorded is refused; the caller holds no images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import noised, put_shard

from machines import ScoreMachine, make_backend
from patchbank import BankError, BankSpec, PatchBank, ShardedBank, open_bank, random_images
from pipelines.cli import main
from pipelines.executors import make_executor

SPEC = BankSpec(scales=[3], rules=["bbELS", "ELS"], index=None, labels=True, leaf_size=32)


@pytest.fixture(scope="module")
def data():
    return random_images(30, (1, 7, 9), classes=3, seed=5)


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return PatchBank.build(data, root / "whole", SPEC, progress=False), ShardedBank.build(data, root / "sharded", SPEC, 3)


@pytest.mark.parametrize("machine", ["bbELS", "ELS", "IS"])
@pytest.mark.parametrize("conditional", [False, True])
def test_the_merge_of_the_shards_is_the_whole_banks_posterior(built, data, machine, conditional):
    whole, sharded = built
    scales = None if machine == "IS" else 3
    x = noised(data, 0.3, 3, seed=2)
    labels = data.labels[:3].clone() if conditional else None
    got = ScoreMachine(sharded, machine, scales=scales, conditional=conditional, backend="sharded:shards=3")(x, 0.3, labels)
    want = ScoreMachine(whole, machine, scales=scales, conditional=conditional)(x, 0.3, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_caller_holds_no_images_and_other_backends_are_refused(built, data):
    _, sharded = built
    assert sharded.fingerprint() == data.fingerprint() and torch.equal(sharded.labels, data.labels)
    with pytest.raises(BankError, match="images live on its shards"):
        _ = sharded.data.images
    with pytest.raises(BankError, match="sum them with the sharded backend"):
        ScoreMachine(sharded, "bbELS", scales=3)(noised(data, 0.3, 1), 0.3)
    with pytest.raises(ValueError, match="has 3"):
        ScoreMachine(sharded, "bbELS", scales=3, backend="sharded:shards=2")(noised(data, 0.3, 1), 0.3)
    with pytest.raises(ValueError, match="serves a sharded bank"):
        ScoreMachine(built[0], "bbELS", scales=3, backend="sharded:shards=3:placement=ray")(noised(data, 0.3, 1), 0.3)
    assert make_backend("sharded:shards=4:placement=ray:10.0.0.1:6379").placement == "ray:10.0.0.1:6379"


def test_an_interrupted_build_resumes_shard_by_shard(data, tmp_path, built):
    def dies_after_one(fn, job, items, done):
        done(items[0], fn(job, items[0]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ShardedBank.build(data, tmp_path / "b", SPEC, 3, dies_after_one)
    with pytest.raises(BankError, match="did not finish"):
        ShardedBank.open(tmp_path / "b")
    executor = make_executor("processes:2")
    resumed = ShardedBank.build(data, tmp_path / "b", SPEC, 3, lambda fn, job, items, done: executor.map(fn, job, items, done, progress=False))
    assert resumed.record == built[1].record
    with pytest.raises(BankError, match="other data or settings"):
        ShardedBank.build(data, tmp_path / "b", SPEC, 2)


def test_a_shard_that_is_not_the_one_recorded_is_refused(built, data, tmp_path):
    _, sharded = built
    other = ShardedBank.build(random_images(30, (1, 7, 9), classes=3, seed=6), tmp_path / "other", SPEC, 3)
    copy = Path(shutil.copytree(sharded.path, tmp_path / "copy"))
    put_shard(copy, "shard-01", other.path)
    with pytest.raises(BankError, match="shard-01 is not the shard this bank was built with"):
        ShardedBank.open(copy)
    record = json.loads((copy / "shards.json").read_text())
    record["shards"][0]["name"] = "../whole"
    (copy / "shards.json").write_text(json.dumps(record))
    with pytest.raises(BankError, match="is not a shard folder"):
        ShardedBank.open(copy)


def test_the_cli_builds_verifies_and_samples_a_sharded_bank(tmp_path, capsys):
    bank = tmp_path / "b"
    main(["build", str(bank), "--dataset", "random", "--n-train", "12", "--scales", "3", "--index", "none", "--shards", "2",
          "--executor", "processes:2"])
    assert isinstance(open_bank(bank), ShardedBank)
    main(["verify", str(bank)])
    assert "intact" in capsys.readouterr().out
    main(["sample", "--bank", str(bank), "--scale", "3", "--seeds", "0-1", "--steps", "2", "--backend", "sharded:shards=2",
          "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.png").is_file()


def test_a_pass_asks_every_shard_once_whatever_its_buckets_and_labels(built, data):
    _, sharded = built
    backend = make_backend("sharded:shards=3")
    x = noised(data, 0.3, 4, seed=3)
    labels = data.labels[:4].clone()
    assert labels.unique().numel() > 1
    machine = ScoreMachine(sharded, "bbELS", scales=3, conditional=True, backend=backend)
    got = machine(x, 0.3, labels)
    assert backend.stats.round_trips == 1  # 9 buckets × several labels, one request to each shard
    one_by_one = torch.stack([machine(x[i : i + 1], 0.3, labels[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(got, one_by_one, rtol=0, atol=1e-14)
