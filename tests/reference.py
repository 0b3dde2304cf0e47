"""An independent, naive float64 reference for every machine: explicit loops over pixels and dictionary entries.

Nothing here is shared with the engine: patches are cut pixel by pixel, dictionaries are
enumerated by their definitions in the paper (bbELS by comparing which patch offsets fall
outside the image), and each posterior is a plain log-sum-exp over a Python list.
"""

from __future__ import annotations

import math

import numpy as np


def abar(t: float) -> float:
    return math.cos(math.pi * t / 2.016) ** 2


def naive_patch(img: np.ndarray, i: int, j: int, P: int, padding: str) -> np.ndarray:
    """img (C, H, W) float64 → the C·P·P patch centred at (i, j), channel-major."""
    C, H, W = img.shape
    r = P // 2
    out = []
    for c in range(C):
        for u in range(-r, r + 1):
            for v in range(-r, r + 1):
                y, x = i + u, j + v
                if padding == "circular":
                    out.append(img[c, y % H, x % W])
                else:
                    out.append(img[c, y, x] if 0 <= y < H and 0 <= x < W else 0.0)
    return np.array(out)


def outside_offsets(i: int, j: int, H: int, W: int, P: int) -> frozenset:
    """The patch offsets that fall into the zero padding at pixel (i, j)."""
    r = P // 2
    return frozenset((u, v) for u in range(-r, r + 1) for v in range(-r, r + 1) if not (0 <= i + u < H and 0 <= j + v < W))


def posterior_mean(q: np.ndarray, entries: list[tuple[np.ndarray, np.ndarray]], t: float) -> np.ndarray:
    a = math.sqrt(abar(t))
    s2 = 1.0 - abar(t)
    logits = [-float(np.sum((q - a * p) ** 2)) / (2 * s2) for p, _ in entries]
    m = max(logits)
    w = [math.exp(l - m) for l in logits]
    return sum(wi * v for wi, (_, v) in zip(w, entries)) / sum(w)


def naive_machine(kind: str, images: np.ndarray, labels: np.ndarray, x: np.ndarray, t: float,
                  P: int | None = None, padding: str = "zeros", sample_labels: np.ndarray | None = None) -> np.ndarray:
    """images (N, C, H, W) float64 in [-1, 1]; x (B, C, H, W) → x̂0 (B, C, H, W)."""
    B, C, H, W = x.shape
    out = np.zeros_like(x)
    for b in range(B):
        pool = [images[n] for n in range(len(images)) if sample_labels is None or labels[n] == sample_labels[b]]
        if kind in ("IS", "ES"):
            shifts = [(dy, dx) for dy in range(H) for dx in range(W)] if kind == "ES" else [(0, 0)]
            entries = []
            for img in pool:
                for dy, dx in shifts:
                    rolled = np.roll(img, (dy, dx), axis=(1, 2))
                    entries.append((rolled.ravel(), rolled))
            out[b] = posterior_mean(x[b].ravel(), entries, t)
            continue
        cache = {(k, u, v): naive_patch(img, u, v, P, padding) for k, img in enumerate(pool) for u in range(H) for v in range(W)}
        for i in range(H):
            for j in range(W):
                q = naive_patch(x[b], i, j, P, padding)
                if kind == "LS":
                    locs = [(i, j)]
                elif kind == "ELS":
                    locs = [(u, v) for u in range(H) for v in range(W)]
                elif kind == "bbELS":
                    mine = outside_offsets(i, j, H, W, P)
                    locs = [(u, v) for u in range(H) for v in range(W) if outside_offsets(u, v, H, W, P) == mine]
                else:
                    raise ValueError(kind)
                entries = [(cache[(k, u, v)], pool[k][:, u, v]) for k in range(len(pool)) for (u, v) in locs]
                out[b, :, i, j] = posterior_mean(q, entries, t)
    return out
