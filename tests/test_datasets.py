from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from patchbank import ImageData, load_dataset, load_folder, load_npz, resize_uint8, to_model_range, two_image
from patchbank.datasets import load_torchvision


def test_npz_canonical_facts(datasets_dir):
    mnist = load_npz(datasets_dir / "mnist.npz")
    assert mnist.images.shape == (60000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels[:5].tolist() == [5, 0, 4, 1, 9]
    fashion = load_npz(datasets_dir / "fashion_mnist.npz", "test")
    assert fashion.images.shape == (10000, 1, 28, 28)
    cifar = load_npz(datasets_dir / "cifar10_train4000.npz")
    assert cifar.images.shape == (4000, 3, 32, 32)
    assert cifar.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_named_dataset_found_through_environment(datasets_dir, monkeypatch):
    monkeypatch.setenv("PATCHBANK_DATASETS", str(datasets_dir))
    data = load_dataset("fashion_mnist", resize=32, limit=10)
    assert data.images.shape == (10, 1, 32, 32) and data.labels[:5].tolist() == [9, 0, 0, 3, 0]
    with pytest.raises(KeyError, match="no test split"):
        load_dataset("cifar10", split="test", source="npz")


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes())


def test_torchvision_and_npz_give_identical_arrays(datasets_dir, tmp_path):
    """torchvision's MNIST reader over IDX files written from the npz returns the same arrays."""
    with np.load(datasets_dir / "mnist.npz") as z:
        arrays = {k: z[k][:200] for k in z.files}
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[f"x_{split}"])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[f"y_{split}"])
    via_tv = load_torchvision("mnist", tmp_path, "train", download=False)
    via_npz = load_npz(datasets_dir / "mnist.npz").subset(200)
    assert torch.equal(via_tv.images, via_npz.images) and torch.equal(via_tv.labels, via_npz.labels)
    assert via_tv.fingerprint() == via_npz.fingerprint()


def test_offline_without_copy_names_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHBANK_DATASETS", str(tmp_path))
    monkeypatch.setenv("PATCHBANK_DOWNLOADS", str(tmp_path / "dl"))
    import patchbank.datasets as ds

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(ds, "load_torchvision", offline)
    with pytest.raises(RuntimeError, match="PATCHBANK_DATASETS.*Alternatives"):
        load_dataset("mnist")


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'"):
        load_dataset("mnsit")
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 4), np.uint8), y_train=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "labels.npz", x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="y_train has shape"):
        load_npz(tmp_path / "labels.npz")
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "nowhere")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pics = {}
    for cls in ["cat", "dog"]:
        (tmp_path / cls).mkdir()
        for k in range(2):
            arr = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{k}.png")
            pics[(cls, k)] = arr
    data = load_dataset(str(tmp_path))
    assert data.images.shape == (4, 3, 5, 6) and data.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(data.images[2].permute(1, 2, 0).numpy(), pics[("dog", 0)])


def test_synthetic_and_transforms():
    data = two_image(10)
    x = to_model_range(data.images)
    assert x[0].eq(-1).all() and x[1].eq(1).all() and data.labels.tolist() == [0, 1]
    up = resize_uint8(torch.full((1, 1, 28, 28), 200, dtype=torch.uint8), (32, 32))
    assert up.shape == (1, 1, 32, 32) and up.eq(200).all()
