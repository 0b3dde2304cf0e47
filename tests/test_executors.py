"""Executors: every item done exactly once, results equal to the serial run bit for bit, dead workers
replaced, finished work kept, a clear error without Ray; jobs (evaluate, calibrate, sample) on them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from machines import ScoreMachine
from patchbank import MemoryBank, random_images
from pipelines.calibration import calibrate
from pipelines.evaluation import evaluate
from pipelines.executors import ProcessExecutor, RayExecutor, SerialExecutor, check_executor, chunks, make_executor


def square(shared: int, item: int) -> int:
    return shared * item * item


def dies_once(marker: str, item: int) -> int:
    """Kills its worker process the first time it meets item 3 (the marker file records that it did)."""
    if item == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return item * 10


def always_dies(marker: str, item: int) -> int:
    if item == 3:
        os._exit(1)
    return item * 10


def raises(shared: None, item: int) -> int:
    if item == 2:
        raise ValueError("bad item 2")
    return item


def collect(executor, fn, shared, items) -> dict:
    got: dict = {}

    def done(item, result):
        assert item not in got, f"item {item} reported twice"
        got[item] = result

    executor.map(fn, shared, items, done, progress=False)
    return got


@pytest.mark.parametrize("spec", ["serial", "processes:2"])
def test_every_item_once(spec):
    assert collect(make_executor(spec), square, 3, list(range(7))) == {i: 3 * i * i for i in range(7)}


def test_dead_worker_is_replaced_and_its_item_rerun(tmp_path):
    got = collect(ProcessExecutor(2, threads=1), dies_once, str(tmp_path / "died"), list(range(6)))
    assert (tmp_path / "died").exists()  # the worker really died once
    assert got == {i: 10 * i for i in range(6)}


def test_worker_dying_every_time_fails_but_keeps_finished_items(tmp_path):
    got: dict = {}
    with pytest.raises(RuntimeError, match="died"):
        ProcessExecutor(1, threads=1, retries=1).map(always_dies, None, [0, 1, 2, 3, 4], lambda i, r: got.__setitem__(i, r),
                                                     progress=False)
    assert got == {0: 0, 1: 10, 2: 20}  # one worker, in order: everything before the fatal item is kept


@pytest.mark.parametrize("spec", ["serial", "processes:1"])
def test_an_exception_is_an_error_not_a_retry(spec):
    with pytest.raises(ValueError, match="bad item 2"):
        collect(make_executor(spec), raises, None, [0, 1, 2, 3])


def test_specs():
    assert make_executor("serial:threads=1") == SerialExecutor(1)
    assert make_executor("processes:3:threads=2") == ProcessExecutor(3, 2)
    assert make_executor("ray:10.0.0.1:6379:threads=2") == RayExecutor("10.0.0.1:6379", 2)
    for bad, why in [("processes:x", "number of processes"), ("serial:threads=0", ">= 1"), ("dask", "unknown executor"),
                     ("processes:0", "N >= 1")]:
        with pytest.raises(ValueError, match=why):
            make_executor(bad)
    assert chunks([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r"\[cpu,ray\]"):
        check_executor("ray")
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--executor", "ray"])


# ---- jobs on executors -----------------------------------------------------------------------------
def trio():
    bank = MemoryBank(random_images(20, (1, 8, 8), classes=2, seed=0))
    return ScoreMachine(bank, "LS", scales=3), ScoreMachine(bank, "bbELS", scales=5), ScoreMachine(bank, "IS")


def evaluated(folder: Path, executor: str, seeds=range(6), **kw) -> tuple[dict, dict]:
    net, machine, ideal = trio()
    evaluate(net, machine, ideal, list(seeds), (1, 8, 8), folder, steps=4, batch=2, progress=False, executor=executor, **kw)
    rows = {r["seed"]: r for r in map(json.loads, (folder / "per_seed.jsonl").read_text().splitlines())}
    return rows, torch.load(folder / "samples.pt")


def test_evaluate_on_processes_equals_serial_bit_for_bit(tmp_path):
    serial_rows, serial_samples = evaluated(tmp_path / "serial", "serial:threads=1")
    rows, samples = evaluated(tmp_path / "processes", "processes:2:threads=1")
    assert rows == serial_rows
    assert all(torch.equal(samples[s][k], serial_samples[s][k]) for s in serial_samples for k in ("network", "machine", "is"))


def test_interrupted_evaluation_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    whole, _ = evaluated(tmp_path / "whole", "serial")
    import pipelines.evaluation as ev

    real = ev.final_images
    calls = []

    def killed_after_two_batches(trio, seeds):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while its third batch runs
        calls.append(seeds)
        return real(trio, seeds)

    monkeypatch.setattr(ev, "final_images", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluated(tmp_path / "cut", "serial")
    kept = (tmp_path / "cut" / "per_seed.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in kept] == [0, 1, 2, 3]
    monkeypatch.setattr(ev, "final_images", real)
    resumed, _ = evaluated(tmp_path / "cut", "serial")
    assert resumed == whole
    assert len((tmp_path / "cut" / "per_seed.jsonl").read_text().splitlines()) == 6


def test_calibrate_on_processes_equals_serial_and_resumes(tmp_path):
    net, machine, _ = trio()
    bank = machine.bank
    args = (net, lambda P: ScoreMachine(bank, "bbELS", scales=P), [3, 5], list(range(4)), (1, 8, 8), 4)
    serial = calibrate(*args, progress=False, batch=1, executor="serial:threads=1", resume=tmp_path / "a")
    parallel = calibrate(*args, progress=False, batch=1, executor="processes:2:threads=1", resume=tmp_path / "b")
    assert parallel == serial
    again = calibrate(*args, progress=False, batch=1, executor=SerialExecutor(), resume=tmp_path / "a")  # all kept: no work
    assert again == serial
    with pytest.raises(ValueError, match="another run"):
        calibrate(net, lambda P: ScoreMachine(bank, "LS", scales=P), [3, 5], list(range(4)), (1, 8, 8), 4,
                  progress=False, resume=tmp_path / "a")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module is not importable on Ray workers
    yield ray
    ray.shutdown()


def test_ray_evaluation_equals_serial_bit_for_bit(ray_cluster, tmp_path):
    serial_rows, serial_samples = evaluated(tmp_path / "serial", "serial:threads=1", seeds=range(4))
    rows, samples = evaluated(tmp_path / "ray", "ray", seeds=range(4))
    assert rows == serial_rows
    assert all(torch.equal(samples[s][k], serial_samples[s][k]) for s in serial_samples for k in ("network", "machine", "is"))


def test_ray_task_whose_worker_dies_is_rerun(ray_cluster, tmp_path):
    got = collect(RayExecutor(), dies_once, str(tmp_path / "died"), list(range(6)))
    assert (tmp_path / "died").exists()
    assert got == {i: 10 * i for i in range(6)}


def test_ray_exception_is_an_error(ray_cluster):
    with pytest.raises(ValueError, match="bad item 2"):
        collect(RayExecutor(), raises, None, [0, 1, 2, 3])


def test_a_disk_bank_travels_as_its_path_and_is_checked_on_arrival(tmp_path):
    import pickle

    from patchbank import BankError, BankSpec, PatchBank

    path = tmp_path / "bank"
    bank = PatchBank.build(random_images(6, (1, 7, 7), seed=1), path, BankSpec(scales=[3], index=None), progress=False)
    payload = pickle.dumps(bank)
    assert len(payload) < 2000  # the path and fingerprint, not the tables
    again = pickle.loads(payload)
    assert again.fingerprint() == bank.fingerprint() and again.path == bank.path
    import shutil

    shutil.rmtree(path)
    PatchBank.build(random_images(6, (1, 7, 7), seed=2), path, BankSpec(scales=[3], index=None), progress=False)
    with pytest.raises(BankError, match="another bank"):
        pickle.loads(payload)
