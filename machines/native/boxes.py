"""A patch machine's posterior means at several scales at once, by box sums over product maps (``c/box.c``):
what calibration compares, one pass for every candidate scale."""

from __future__ import annotations

import ctypes

import torch

from patchbank.geometry import check_scale

from .build import check_arrays, declare, require

declare("box_scales", ctypes.c_int64, [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2
        + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_double] * 3 + [ctypes.c_void_p])

BOX_RULES = {"LS": 0, "ELS": 1, "bbELS": 2}


def box_scales(queries: torch.Tensor, images: torch.Tensor, scales: list[int] | tuple[int, ...], rule: str, padding: str,
               a: float, s2: float, skip: float = 60.0, threads: int | None = None) -> tuple[torch.Tensor, int]:
    """A patch machine's posterior means at several scales at once, by box sums over product maps .

    queries: float64 ``[B, C, H, W]`` (noisy images, model units); images: float64 ``[N, C, H, W]`` (the
    dictionary's training images); scales: odd patch sizes ``P``; rule: LS, ELS or bbELS; padding: zeros or
    circular (bbELS: zeros only). Each pair's log weight at radius ``r`` is the box sum of radius ``r`` of one
    product map per (training image, displacement), so the products are made once for every scale. Terms more
    than ``skip`` below a running maximum add nothing. Images are split over ``threads`` OpenMP threads (default
    ``torch.get_num_threads()``). Returns the means ``[len(scales), B, C, H, W]`` (float64) and the (pixel,
    patch, scale) pairs computed."""
    lib = require()
    if rule not in BOX_RULES:
        raise ValueError(f"box sums serve the patch rules {sorted(BOX_RULES)}, not {rule!r}")
    if padding not in ("zeros", "circular") or (rule == "bbELS" and padding != "zeros"):
        raise ValueError(f"{rule} cannot take {padding!r} padding here (bbELS: zeros; LS, ELS: zeros or circular)")
    if queries.dim() != 4 or images.dim() != 4 or queries.shape[1:] != images.shape[1:]:
        raise ValueError(f"queries [B, C, H, W] and images [N, C, H, W] must share C, H, W: got {list(queries.shape)} "
                         f"and {list(images.shape)}")
    B, C, H, W = queries.shape
    if not 1 <= C <= 4 or images.shape[0] == 0 or B == 0:
        raise ValueError(f"need 1 to 4 channels, at least one query and one image: got C={C}, B={B}, N={images.shape[0]}")
    check_arrays(("queries", queries, queries.shape, torch.float64), ("images", images, images.shape, torch.float64))
    if not scales:
        raise ValueError("give at least one patch scale")
    radii = torch.tensor([check_scale(int(P)) for P in scales], dtype=torch.int64)
    out = torch.empty(len(scales), B, C, H, W, dtype=torch.float64)
    n = max(1, threads or torch.get_num_threads())
    pairs = lib.box_scales(n, B, images.shape[0], C, H, W, queries.data_ptr(), images.data_ptr(), len(scales),
                           radii.data_ptr(), BOX_RULES[rule], int(padding == "circular"), a, s2, skip, out.data_ptr())
    if pairs < 0:
        raise MemoryError("the box-sum kernel could not allocate its running state")
    return out, int(pairs)

