"""Patch geometry: padding, patch extraction, dictionary rules and bucket keys (DESIGN §3).

A patch of scale ``P = 2r + 1`` around pixel ``(i, j)`` is the ``C × P × P`` block of the
(zero- or circularly) padded image centred on it, flattened channel-major: vector index
``c·P² + u·P + v`` holds channel ``c`` at offset ``(u − r, v − r)``. ``P`` may exceed the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Padding = Literal["zeros", "circular"]
Rule = Literal["LS", "ELS", "bbELS"]
PADDINGS: tuple[str, ...] = ("zeros", "circular")


def check_scale(P: int) -> int:
    """Validate a patch scale: an odd integer ≥ 1. Returns ``r = P // 2``."""
    if isinstance(P, bool) or not isinstance(P, int) or P < 1 or P % 2 == 0:
        raise ValueError(f"patch scale P must be an odd integer >= 1, got {P!r}")
    return P // 2


def check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def pad_images(x: torch.Tensor, r: int, padding: Padding) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, C, H + 2r, W + 2r]``; circular padding wraps as often as needed."""
    check_padding(padding)
    if padding == "zeros":
        return F.pad(x, (r, r, r, r))
    H, W = x.shape[-2:]
    rows = torch.arange(-r, H + r, device=x.device) % H
    cols = torch.arange(-r, W + r, device=x.device) % W
    return x[..., rows[:, None], cols[None, :]]


def patches_at(x: torch.Tensor, locs: torch.Tensor, P: int, padding: Padding) -> torch.Tensor:
    """Patches of every image at the given pixels.

    x: ``[B, C, H, W]``; locs: long ``[L, 2]`` of ``(i, j)``. Returns ``[B, L, C·P·P]``.
    """
    r = check_scale(P)
    xp = pad_images(x, r, padding)
    offs = torch.arange(P, device=x.device)
    rows = (locs[:, 0:1].to(x.device) + offs)[:, :, None]  # [L, P, 1]
    cols = (locs[:, 1:2].to(x.device) + offs)[:, None, :]  # [L, 1, P]
    blocks = xp[:, :, rows, cols]  # [B, C, L, P, P]
    B, C, L = blocks.shape[:3]
    return blocks.permute(0, 2, 1, 3, 4).reshape(B, L, C * P * P)


def extract_patches(x: torch.Tensor, P: int, padding: Padding) -> torch.Tensor:
    """Every patch of every image: ``[B, C, H, W]`` → ``[B, H, W, C·P·P]``."""
    H, W = x.shape[-2:]
    return patches_at(x, all_locations(H, W, x.device), P, padding).reshape(x.shape[0], H, W, -1)


def centre_index(C: int, P: int) -> torch.Tensor:
    """Positions of the centre pixel's ``C`` channels inside a flattened patch: long ``[C]``."""
    r = P // 2
    return torch.arange(C) * P * P + r * P + r


def all_locations(H: int, W: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every pixel ``(i, j)`` in row-major order: long ``[H·W, 2]``."""
    i, j = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1)], 1)


def boundary_class(locs: torch.Tensor, H: int, W: int, P: int) -> torch.Tensor:
    """The zero-padding pattern a patch sees: ``(min(i,r), min(H−1−i,r), min(j,r), min(W−1−j,r))``.

    locs: long ``[L, 2]``. Returns long ``[L, 4]``. Two pixels share a bbELS dictionary iff
    their rows are equal (DESIGN §3): interior, edge strips and corner cells by one rule.
    """
    r = check_scale(P)
    i, j = locs[:, 0], locs[:, 1]
    return torch.stack([i.clamp(max=r), (H - 1 - i).clamp(max=r), j.clamp(max=r), (W - 1 - j).clamp(max=r)], 1)


# A rule maps pixels to their dictionary key (one row per pixel): pixels with equal keys share
# a dictionary, and the dictionary of a key holds the training patches at exactly those pixels.
KeyFn = Callable[[torch.Tensor, int, int, int], torch.Tensor]
RULE_KEYS: dict[str, KeyFn] = {
    "LS": lambda locs, H, W, P: locs,  # each pixel alone
    "ELS": lambda locs, H, W, P: locs[:, :0],  # one dictionary: every pixel
    "bbELS": boundary_class,  # pixels that see the same zero padding
}
RULE_PADDING: dict[str, Padding] = {"LS": "zeros", "ELS": "circular", "bbELS": "zeros"}
IMAGE_RULES: tuple[str, ...] = ("IS", "ES")  # rules whose dictionary entries are whole images, not patches


def dictionary_groups(H: int, W: int, P: int, rule: Rule) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Pixels grouped by dictionary key: ``[(key, locs long [L, 2])]``, keys in sorted order."""
    if rule not in RULE_KEYS:
        raise ValueError(f"unknown dictionary rule {rule!r}; choose from {sorted(RULE_KEYS)}")
    locs = all_locations(H, W)
    keys = RULE_KEYS[rule](locs, H, W, P)
    if keys.shape[1] == 0:
        return [((), locs)]
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return [(tuple(uniq[g].tolist()), locs[inverse == g]) for g in range(uniq.shape[0])]


@dataclass(frozen=True)
class BucketKey:
    """One dictionary: rule, scale ``P``, padding, dictionary key (from the rule), label (None = all).

    Image rules (``IS``, ``ES``) have ``scale=None`` and key ``()``: their entries are whole images.
    """

    rule: str
    scale: int | None
    padding: Padding
    dictionary: tuple[int, ...]
    label: int | None = None

    @property
    def size(self) -> int:
        """The patch size ``P`` of a patch rule's bucket (an error for a whole-image bucket, which has none)."""
        if self.scale is None:
            raise ValueError(f"a {self.rule} bucket holds whole images, not patches of one size")
        return self.scale

    def locations(self, H: int, W: int) -> torch.Tensor:
        """The pixels whose training patches form this dictionary: long ``[L, 2]``."""
        locs = all_locations(H, W)
        keys = RULE_KEYS[self.rule](locs, H, W, self.size)
        return locs[(keys == torch.tensor(self.dictionary, dtype=keys.dtype)).all(1)]
