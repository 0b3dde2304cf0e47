"""Training data: real datasets (offline ``.npz`` copies or torchvision), image folders, synthetic sets.

Every loader returns an :class:`ImageData`: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``.
Model-range floats ([-1, 1]) come from :func:`to_model_range`; the paper's 28→32 resize of
MNIST/FashionMNIST from :func:`resize_uint8` (it stays uint8, so identical patches stay identical).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DATASETS_ENV = "PATCHBANK_DATASETS"
"""Environment variable naming a folder (or ``os.pathsep``-separated folders) of offline ``.npz`` copies."""

REAL_DATASETS: dict[str, str] = {
    "mnist": "mnist.npz",
    "fashion_mnist": "fashion_mnist.npz",
    "cifar10": "cifar10_train4000.npz",
    "celeba": "celeba.npz",
}
SYNTHETIC_DATASETS = ("two_image", "random")
Split = Literal["train", "test"]
Source = Literal["auto", "npz", "torchvision"]


@dataclass(frozen=True)
class ImageData:
    """A training set. ``images``: uint8 ``[N, C, H, W]`` (N ≥ 1); ``labels``: int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = "unnamed"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.images.shape[0] == 0:
            raise ValueError(f"dataset {self.name!r} holds no images")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] = [{self.images.shape[0]}], got {tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype} (see integer_labels)")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None = None, indices: torch.Tensor | None = None) -> ImageData:
        """The first ``n`` images, or the images at ``indices``."""
        if indices is None:
            indices = torch.arange(min(n if n is not None else len(self), len(self)))
        return ImageData(self.images[indices], self.labels[indices], self.name)

    def fingerprint(self) -> str:
        """SHA-256 of shape, images and labels: identifies the data a bank or machine was built for."""
        h = hashlib.sha256()
        h.update(repr(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[..., H, W]`` → float in [-1, 1] (``x / 127.5 - 1``)."""
    return images.to(dtype) / 127.5 - 1.0


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of uint8 ``[N, C, H, W]`` to ``[N, C, *size]``, rounded back to uint8."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` → ``[N, C, H, W]``."""
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"expected images shaped (N, H, W) or (N, H, W, C), got {x.shape}")


def dataset_dirs() -> list[Path]:
    """Folders searched for offline ``.npz`` copies: ``$PATCHBANK_DATASETS`` entries, in order."""
    return [Path(p) for p in os.environ.get(DATASETS_ENV, "").split(os.pathsep) if p]


def find_npz(name: str) -> Path | None:
    """The offline copy of a named dataset in :func:`dataset_dirs`, or None."""
    for d in dataset_dirs():
        p = d / REAL_DATASETS[name]
        if p.is_file():
            return p
    return None


def load_npz(path: str | os.PathLike, split: Split = "train", name: str | None = None) -> ImageData:
    """Arrays ``x_{split}`` (uint8 ``(N,H,W)`` or ``(N,H,W,C)``) and ``y_{split}`` of an ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            xk, yk = f"x_{split}", f"y_{split}"
            if xk not in z or yk not in z:
                raise KeyError(f"{path} has no {split} split (arrays {xk}, {yk}); it holds {sorted(z.files)}")
            x, y = z[xk], z[yk]
    except (OSError, ValueError, EOFError) as err:  # not an npz (zip) file, or a damaged one
        raise ValueError(f"{path} is not a readable .npz dataset ({err})") from None
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {xk} must be uint8 images, got {x.dtype}")
    images = _to_nchw(x)
    if y.shape != (images.shape[0],):
        raise ValueError(f"{path}: {yk} has shape {y.shape}, expected ({images.shape[0]},)")
    return ImageData(images, integer_labels(y, f"{path}: {yk}"), name or path.stem)


def integer_labels(labels, where: str = "labels") -> torch.Tensor:
    """Class labels as int64 ``[N]``. Integer arrays are taken as they are; float arrays only when every
    value is a whole number (``3.0`` → 3); fractional, NaN or non-numeric labels are an error."""
    y = np.asarray(labels)
    if y.dtype.kind in "iub":
        return torch.from_numpy(y.astype(np.int64))
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return torch.from_numpy(y.astype(np.int64))
    bad = y[~np.isfinite(y) | (y != np.round(y))][:3] if y.dtype.kind == "f" else y[:3]
    raise ValueError(f"{where} must be whole-number class labels, got {y.dtype} values such as {bad.tolist()}")


def load_torchvision(name: str, root: str | os.PathLike, split: Split = "train", download: bool = True) -> ImageData:
    """A real dataset through torchvision (downloads into ``root`` when ``download`` and online)."""
    import torchvision.datasets as tvd

    train = split == "train"
    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        ds = cls(str(root), train=train, download=download)
        return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64), name)
    if name == "cifar10":
        ds = tvd.CIFAR10(str(root), train=train, download=download)
        return ImageData(_to_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64), name)
    if name == "celeba":
        ds = tvd.CelebA(str(root), split="valid" if split == "test" else "train", target_type="identity", download=download)
        images = [torch.from_numpy(np.asarray(ds[i][0], dtype=np.uint8)) for i in range(len(ds))]
        return ImageData(_to_nchw(torch.stack(images).numpy()), ds.identity.view(-1).to(torch.int64), name)
    raise ValueError(f"torchvision has no loader here for {name!r}; choose from {sorted(REAL_DATASETS)}")


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale PNGs open as one of these


def _as_uint8(pic, mode: str, path: Path) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (``mode`` "L") or ``[H, W, 3]`` ("RGB"). 16-bit greyscale is scaled to 8 bits
    (v · 255 / 65535, rounded), never clipped; an alpha channel that is not fully opaque is refused, since
    dropping it would change the image; a float image is refused."""
    if pic.mode == "F":
        raise ValueError(f"{path}: a floating-point image (mode F); save it as 8- or 16-bit integers")
    if pic.mode in WIDE_MODES:
        wide = np.asarray(pic, dtype=np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"{path}: a 32-bit image with values in [{wide.min()}, {wide.max()}]; expected 8 or 16 bits")
        grey = np.rint(wide * (255 / 65535)).astype(np.uint8)
        return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=2)
    if pic.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (pic.mode == "P" and "transparency" in pic.info):
        rgba = pic.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            raise ValueError(f"{path}: has transparent pixels ({(alpha < 255).mean():.1%} of them; alpha channel); "
                             "flatten it onto a background first, so that no information is dropped silently")
        pic = rgba
    return np.asarray(pic.convert(mode), dtype=np.uint8)


def load_folder(path: str | os.PathLike, mode: Literal["L", "RGB"] | None = None) -> ImageData:
    """Images of a folder: ``root/<class>/*.png`` (labels = sorted class folders) or ``root/*.png`` (labels 0).

    16-bit greyscale images are scaled to 8 bits; images with transparent pixels are refused (see :func:`_as_uint8`)."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in exts]
    if classes and loose:
        raise ValueError(f"{root} holds both class folders and loose images (e.g. {loose[0].name}); "
                         "put every image in a class folder, or none")
    groups = [(i, sorted(d.iterdir())) for i, d in enumerate(classes)] or [(0, sorted(root.iterdir()))]
    files = [(lab, f) for lab, fs in groups for f in fs if f.suffix.lower() in exts]
    if not files:
        raise ValueError(f"{root} holds no images ({', '.join(sorted(exts))})")
    pics = [Image.open(f) for _, f in files]
    mode = mode or ("L" if all(p.mode in GREY_MODES for p in pics) else "RGB")
    arrays = [_as_uint8(p, mode, f) for p, (_, f) in zip(pics, files)]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{root}: images differ in size {sorted(sizes)}; resize them first")
    return ImageData(_to_nchw(np.stack(arrays)), torch.tensor([lab for lab, _ in files]), root.name)


def two_image(height: int = 10, width: int | None = None) -> ImageData:
    """The paper's two-image example: one all-black (label 0) and one all-white (label 1) image."""
    width = width or height
    images = torch.stack([torch.zeros(1, height, width), torch.full((1, height, width), 255.0)])
    return ImageData(images.to(torch.uint8), torch.tensor([0, 1]), "two_image")


def random_images(n: int = 16, shape: tuple[int, int, int] = (1, 8, 8), classes: int = 2, seed: int = 0) -> ImageData:
    """Seeded uniform uint8 noise images with labels ``i % classes``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % classes, "random")


def load_dataset(
    name: str,
    split: Split = "train",
    source: Source = "auto",
    root: str | os.PathLike | None = None,
    resize: tuple[int, int] | int | None = None,
    limit: int | None = None,
) -> ImageData:
    """Load a dataset by name or path.

    ``name``: ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeba`` (offline ``.npz`` from
    ``$PATCHBANK_DATASETS`` first when ``source='auto'``, else torchvision into ``root``);
    ``two_image`` or ``random`` (synthetic); a path to an ``.npz`` file or an image folder.
    ``resize`` (e.g. 32, the paper's MNIST setting) resizes bilinearly and stays uint8;
    ``limit`` keeps the first ``limit`` images.
    """
    data = _load_unresized(name, split, source, root)
    if limit is not None:  # before resizing: resizing is per image, and the rest would be thrown away
        data = data.subset(limit)
    if resize is not None:
        size = (resize, resize) if isinstance(resize, int) else tuple(resize)
        data = ImageData(resize_uint8(data.images, size), data.labels, data.name)  # type: ignore[arg-type]
    return data


def _load_unresized(name: str, split: Split, source: Source, root: str | os.PathLike | None) -> ImageData:
    if name == "two_image":
        return two_image()
    if name == "random":
        return random_images()
    if name in REAL_DATASETS:
        return _load_real(name, split, source, root)
    path = Path(name)
    if path.suffix == ".npz":
        return load_npz(path, split)
    if path.is_dir():
        return load_folder(path)
    if path.exists():
        raise ValueError(f"{path} is neither an .npz file nor an image folder")
    raise ValueError(
        f"unknown dataset {name!r}: use one of {sorted(REAL_DATASETS) + list(SYNTHETIC_DATASETS)}, "
        "a path to an .npz file, or an image folder"
    )


def _load_real(name: str, split: Split, source: Source, root: str | os.PathLike | None) -> ImageData:
    if source in ("auto", "npz"):
        path = find_npz(name)
        if path is not None:
            return load_npz(path, split, name)
        if source == "npz":
            raise FileNotFoundError(
                f"no offline copy {REAL_DATASETS[name]} in ${DATASETS_ENV} ({dataset_dirs() or 'unset'})"
            )
    root = Path(root) if root else Path(os.environ.get("PATCHBANK_DOWNLOADS") or Path.home() / ".cache" / "patchbank")
    try:
        return load_torchvision(name, root, split)
    except (RuntimeError, urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not load {name!r}: no offline copy {REAL_DATASETS[name]} in ${DATASETS_ENV} "
            f"({dataset_dirs() or 'unset'}) and torchvision failed ({err}). Alternatives: set "
            f"{DATASETS_ENV} to a folder holding {REAL_DATASETS[name]}, pass a path to an .npz file or "
            f"image folder, or use a synthetic set ({', '.join(SYNTHETIC_DATASETS)})."
        ) from err
