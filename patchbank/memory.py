"""An in-memory bank: training images held as uint8, each bucket served as a stream of chunks.

The stream is what the exact posterior backend consumes. Patches are cut from the stored images
on demand, so memory is bounded by the chunk size, never by the number of patches.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from .datasets import ImageData, to_model_range
from .geometry import BucketKey, check_padding, check_scale, patches_at


IMAGE_RULES = ("IS", "ES")


class Chunk(NamedTuple):
    """Dictionary entries: ``keys [M, D]``, their ``values [M, V]``, optional ``log_counts [M]``."""

    keys: torch.Tensor
    values: torch.Tensor
    log_counts: torch.Tensor | None = None


class MemoryBank:
    """Training images in memory; geometry exposed as ``channels``, ``height``, ``width``."""

    def __init__(self, data: ImageData) -> None:
        self.data = data
        self.channels, self.height, self.width = data.shape
        self.labels = data.labels

    def __len__(self) -> int:
        return len(self.data)

    def image_ids(self, label: int | None) -> torch.Tensor:
        """Indices of the training images in a label's dictionary (all images for None)."""
        if label is None:
            return torch.arange(len(self.data))
        ids = torch.nonzero(self.labels == label).view(-1)
        if ids.numel() == 0:
            raise ValueError(f"no training image has label {label}; labels present: {self.labels.unique().tolist()}")
        return ids

    def _images(self, ids: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return to_model_range(self.data.images[ids], dtype).to(device)

    def stream(
        self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Iterator[Chunk]:
        """A bucket's entries in chunks: patches for LS/ELS/bbELS, whole images for IS, translates for ES."""
        if key.rule in IMAGE_RULES:
            return self.image_stream(key.label, chunk_size, key.rule == "ES", dtype, device)
        return self.patch_stream(key, chunk_size, dtype, device)

    def patch_stream(
        self, key: BucketKey, chunk_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Iterator[Chunk]:
        """The bucket's patches in chunks of ≤ ``chunk_size``: keys ``[M, C·P·P]``, centre pixels ``[M, C]``."""
        check_scale(key.scale)
        check_padding(key.padding)
        locs = key.locations(self.height, self.width)
        ids = self.image_ids(key.label)
        n_img = max(1, chunk_size // locs.shape[0])
        n_loc = min(chunk_size, locs.shape[0])
        for s in range(0, ids.numel(), n_img):
            x = self._images(ids[s : s + n_img], dtype, device)
            for l0 in range(0, locs.shape[0], n_loc):
                sub = locs[l0 : l0 + n_loc]
                keys = patches_at(x, sub, key.scale, key.padding).reshape(-1, x.shape[1] * key.scale**2)
                values = x[:, :, sub[:, 0], sub[:, 1]].permute(0, 2, 1).reshape(-1, x.shape[1])
                yield Chunk(keys, values)

    def image_stream(
        self,
        label: int | None,
        chunk_size: int,
        translates: bool = False,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Iterator[Chunk]:
        """Whole images (or, with ``translates``, all H·W circular translates of each) as keys and values ``[M, C·H·W]``."""
        H, W = self.height, self.width
        ids = self.image_ids(label)
        shifts = _shift_index(H, W, translates).to(device)  # [S, H·W]
        n_img = max(1, chunk_size // shifts.shape[0])
        n_shift = min(chunk_size, shifts.shape[0])
        for s in range(0, ids.numel(), n_img):
            x = self._images(ids[s : s + n_img], dtype, device).flatten(2)  # [n, C, H·W]
            for s0 in range(0, shifts.shape[0], n_shift):
                rolled = x[:, :, shifts[s0 : s0 + n_shift]]  # [n, C, S, H·W]
                flat = rolled.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * H * W)
                yield Chunk(flat, flat)


def _shift_index(H: int, W: int, translates: bool) -> torch.Tensor:
    """Row ``s`` maps pixel ``p`` of the image shifted by ``s = (dy, dx)`` to its source pixel: long ``[S, H·W]``."""
    i = torch.arange(H)[:, None]
    j = torch.arange(W)[None, :]
    if not translates:
        return (i * W + j).reshape(1, -1)
    dy = torch.arange(H)[:, None, None, None]
    dx = torch.arange(W)[None, :, None, None]
    return (((i - dy) % H) * W + (j - dx) % W).reshape(H * W, H * W)
