"""A bank that was tampered with, or used in a way it was not built for, gives an error naming the bucket or
file, or a correct answer; never a silently wrong one. Each case is repaired by re-running the same build.

Cases: a bucket copied from a bank of other data, two buckets swapped, an index file taken from another
bucket (with and without its checksum rewritten), a deleted checksum table, manifest keys and bucket folders
that point outside the bank, another format version, a read-only bank, two builds racing and a killed build
opened before it finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import noised

from machines import ScoreMachine, noise_from_seeds, sample
from patchbank import BankError, BankSpec, BucketKey, ImageData, PatchBank, random_images
from patchbank.integrity import CHECKSUMS, file_checksum

H = 12
SPEC = BankSpec(scales=[3], index="Flat")
INTERIOR = BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))
EDGE = BucketKey("bbELS", 3, "zeros", (0, 1, 1, 1))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(mnist_at) -> ImageData:
    return mnist_at(40, resize=H)


@pytest.fixture(scope="module")
def pristine(data, tmp_path_factory) -> PatchBank:
    return PatchBank.build(data, tmp_path_factory.mktemp("tamper") / "bank", SPEC, progress=False)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> PatchBank:
    """A bank of the same spec and image shape built on other images."""
    return PatchBank.build(random_images(40, (1, H, H), seed=7), tmp_path_factory.mktemp("other") / "bank", SPEC, progress=False)


@pytest.fixture
def bank(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine bank to tamper with."""
    return Path(shutil.copytree(pristine.path, tmp_path / "bank", symlinks=True))


def _bucket(bank: Path, key: BucketKey) -> Path:
    from patchbank import bucket_id

    return bank / "buckets" / bucket_id(key)


def _answers(bank: PatchBank, data: ImageData) -> torch.Tensor:
    """The exact bbELS x̂0 of two noised training images at t = 0.3 (reads every bucket at P = 3)."""
    return ScoreMachine(bank, "bbELS", scales=3)(noised(data, 0.3, 2), 0.3)


def _refused_then_repaired(bank: Path, data: ImageData, pristine: PatchBank, says: str) -> None:
    """Serving the tampered bank is an error naming ``says``; verify lists it; the same build repairs the bank."""
    with pytest.raises(BankError, match=says):
        _answers(PatchBank.open(bank), data)
    assert any(says in " ".join(p) for p in PatchBank.open(bank).verify().values())
    repaired = PatchBank.build(data, bank, SPEC, progress=False)
    assert repaired.verify() == {}
    assert torch.equal(_answers(repaired, data), _answers(pristine, data))


def test_a_bucket_copied_from_a_bank_of_other_data_is_refused(bank, other, data, pristine):
    shutil.rmtree(_bucket(bank, INTERIOR))
    shutil.copytree(_bucket(other.path, INTERIOR), _bucket(bank, INTERIOR))  # self-consistent, wrong bank
    _refused_then_repaired(bank, data, pristine, "was built for other data")


def test_two_swapped_buckets_are_refused(bank, data, pristine):
    a, b = _bucket(bank, INTERIOR), _bucket(bank, EDGE)
    os.rename(a, a.with_name("swap"))
    os.rename(b, a)
    os.rename(a.with_name("swap"), b)
    _refused_then_repaired(bank, data, pristine, "buckets swapped or renamed")


@pytest.mark.parametrize("rewrite", [False, True], ids=["as_is", "checksum_rewritten"])
def test_an_index_file_from_another_bucket_is_refused(bank, data, pristine, rewrite):
    target = _bucket(bank, INTERIOR)
    shutil.copy(_bucket(bank, EDGE) / "index.faiss", target / "index.faiss")
    if rewrite:  # the attacker also rewrites the bucket's checksum of the file
        sums = json.loads((target / CHECKSUMS).read_text())
        sums["index.faiss"] = file_checksum(target / "index.faiss")
        (target / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
    says = "checksum table other than the one the build recorded" if rewrite else "index.faiss is missing or does not match"
    with pytest.raises(BankError, match=says):
        PatchBank.open(bank).index(INTERIOR)
    assert any(says in " ".join(p) for p in PatchBank.open(bank).verify().values())
    repaired = PatchBank.build(data, bank, SPEC, progress=False)
    assert repaired.verify() == {} and file_checksum(target / "index.faiss") == file_checksum(_bucket(pristine.path, INTERIOR) / "index.faiss")


def test_a_deleted_checksum_table_is_refused(bank, data, pristine):
    (_bucket(bank, INTERIOR) / CHECKSUMS).unlink()
    _refused_then_repaired(bank, data, pristine, "has no checksum table")


def test_a_bucket_folder_that_is_a_symlink_out_of_the_bank_is_refused(bank, other, data, pristine):
    shutil.rmtree(_bucket(bank, INTERIOR))
    _bucket(bank, INTERIOR).symlink_to(_bucket(other.path, INTERIOR), target_is_directory=True)
    _refused_then_repaired(bank, data, pristine, "lies outside the bank")
    assert _bucket(other.path, INTERIOR).is_dir()  # the repair removed the link, not what it pointed to


@pytest.mark.parametrize("field, value", [("rule", "../../elsewhere"), ("scale", "3/../../x"), ("dictionary", ["..", "x"]),
                                          ("label", "/etc")])
def test_manifest_keys_that_would_lead_outside_the_bank_are_refused(bank, field, value):
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest["buckets"][0][field] = value
    (bank / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="is not a bucket key"):
        PatchBank.open(bank)


def test_another_format_version_is_refused(bank):
    manifest = json.loads((bank / "manifest.json").read_text())
    (bank / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(BankError, match="bank format 2, this code reads 3"):
        PatchBank.open(bank)


@pytest.fixture
def read_only(pristine, tmp_path):
    """A copy of the bank on a filesystem mounted read-only (needs the right to mount: root on Linux)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(pristine.path, mount / "bank")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount / "bank"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_bank_samples(read_only, pristine, data):
    with pytest.raises(OSError):
        (read_only / "probe").write_text("x")  # it really is read-only
    noise = noise_from_seeds([0, 1], data.shape)
    got = sample(ScoreMachine(PatchBank.open(read_only, expect=data), "bbELS", scales=3), noise, 3)
    assert torch.equal(got, sample(ScoreMachine(pristine, "bbELS", scales=3), noise, 3))
    from machines.comparators import make_comparator

    wiener = make_comparator("wiener", PatchBank.open(read_only), False)  # its image statistics cannot be stored: computed
    assert torch.isfinite(wiener(noised(data, 0.5, 1), 0.5)).all()


BUILD = textwrap.dedent("""
    import sys
    from patchbank import BankSpec, PatchBank, load_npz, resize_uint8, ImageData
    full = load_npz(sys.argv[2]).subset(int(sys.argv[3]))
    data = ImageData(resize_uint8(full.images, (16, 16)), full.labels, full.name)
    try:
        PatchBank.build(data, sys.argv[1], BankSpec(scales=[3, 5], index="Flat"), progress=False)
        print("built")
    except Exception as err:
        print("refused:", err)
""")


def _build(folder: Path, datasets_dir: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", BUILD, str(folder), str(datasets_dir / "mnist.npz"), str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_builds_racing_end_in_one_intact_bank(tmp_path, datasets_dir):
    first, second = _build(tmp_path / "bank", datasets_dir, 200), _build(tmp_path / "bank", datasets_dir, 200)
    said = sorted(p.communicate(timeout=300)[0].strip() for p in (first, second))
    assert "built" in said, said
    assert all(s == "built" or "being built by another process" in s for s in said), said
    assert PatchBank.open(tmp_path / "bank").verify() == {}


def test_a_killed_build_is_not_used_and_resumes_to_the_same_bank(tmp_path, datasets_dir):
    build = _build(tmp_path / "bank", datasets_dir, 400)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "bank" / "buckets").glob("*-P5-*")):  # killed half way: some P = 5 buckets done
        assert time.monotonic() < deadline and build.poll() is None, build.communicate()
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    with pytest.raises(BankError, match="did not finish"):
        PatchBank.open(tmp_path / "bank")
    assert _build(tmp_path / "bank", datasets_dir, 400).communicate(timeout=300)[0].strip() == "built"
    assert _build(tmp_path / "whole", datasets_dir, 400).communicate(timeout=300)[0].strip() == "built"
    resumed, whole = PatchBank.open(tmp_path / "bank"), PatchBank.open(tmp_path / "whole")
    assert resumed.verify() == {} and resumed.manifest["bucket_digests"] == whole.manifest["bucket_digests"]
