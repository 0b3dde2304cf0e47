"""The CNN diffusion models the theory describes, and the wrapper that makes them machines.

Both networks predict ε from ``(x_t, t[, label])``; no normalisation layer touches the
convolutional path (it would leak non-local information); the time (and label) embedding is
added per block as a per-channel bias. ``padding`` is ``zeros`` or ``circular``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from machines.schedule import x0_from_eps

Padding = Literal["zeros", "circular"]


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times ``t [B]`` in [0, 1]: ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], 1)


class Conditioning(nn.Module):
    """Time (and optional class) embedding → one vector ``[B, dim]`` shared by the blocks."""

    def __init__(self, dim: int, num_classes: int | None) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes, dim) if num_classes else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(sinusoidal(t, self.dim))
        if self.classes is not None:
            if labels is None:
                raise ValueError("a class-conditional network needs labels [B]")
            emb = emb + self.classes(labels)
        return emb


def conv3(cin: int, cout: int, padding: Padding) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding)


class ResNet(nn.Module):
    """Up-projection conv, ``blocks`` residual 3×3 conv blocks at ``width`` channels (ReLU), down-projection
    conv: receptive field ``2·blocks + 5`` pixels (the paper's minimal ResNet; paper: width 256, blocks 6–8)."""

    def __init__(self, channels: int = 1, width: int = 256, blocks: int = 6, padding: Padding = "zeros",
                 num_classes: int | None = None, emb_dim: int = 128) -> None:
        super().__init__()
        self.channels, self.padding, self.num_classes = channels, padding, num_classes
        self.cond = Conditioning(emb_dim, num_classes)
        self.up = conv3(channels, width, padding)
        self.convs = nn.ModuleList(conv3(width, width, padding) for _ in range(blocks))
        self.biases = nn.ModuleList(nn.Linear(emb_dim, width) for _ in range(blocks))
        self.down = conv3(width, channels, padding)

    @property
    def receptive_field(self) -> int:
        return 2 * len(self.convs) + 5

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.cond(t, labels)
        h = self.up(x)
        for conv, bias in zip(self.convs, self.biases):
            h = h + F.relu(conv(h) + bias(emb)[:, :, None, None])
        return self.down(h)


class ResBlock(nn.Module):
    """Two 3×3 convs with ReLU, the embedding added between them, and a 1×1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, emb_dim: int, padding: Padding) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv3(cin, cout, padding), conv3(cout, cout, padding)
        self.bias = nn.Linear(emb_dim, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x) + self.bias(emb)[:, :, None, None])
        return self.skip(x) + F.relu(self.conv2(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, with a residual (DDPM's CIFAR10 model
    places it at the low-resolution stage). Pre-normalised by GroupNorm inside the attention branch only:
    every pixel sees every other one, which is what separates it from the local machines."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, width), width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        seq = self.norm(h).flatten(2).transpose(1, 2)  # [B, H·W, C]
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return h + out.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """Three scales (``widths``, paper: 64/128/256) of residual blocks; max-pool down, transposed-conv
    up, skip concatenation. Image sides must be divisible by 4. ``attention``: self-attention after the
    lowest-resolution block (and a second one before leaving it), as in DDPM's CIFAR10 model."""

    def __init__(self, channels: int = 1, widths: tuple[int, int, int] = (64, 128, 256), padding: Padding = "zeros",
                 num_classes: int | None = None, emb_dim: int = 128, attention: bool = False) -> None:
        super().__init__()
        self.channels, self.padding, self.num_classes = channels, padding, num_classes
        w1, w2, w3 = widths
        self.cond = Conditioning(emb_dim, num_classes)
        self.inp = conv3(channels, w1, padding)
        self.enc1, self.enc2 = ResBlock(w1, w1, emb_dim, padding), ResBlock(w1, w2, emb_dim, padding)
        self.mid = ResBlock(w2, w3, emb_dim, padding)
        self.attention = nn.Sequential(SelfAttention(w3), SelfAttention(w3)) if attention else None
        self.up2, self.dec2 = nn.ConvTranspose2d(w3, w2, 2, stride=2), ResBlock(2 * w2, w2, emb_dim, padding)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 2, stride=2), ResBlock(2 * w1, w1, emb_dim, padding)
        self.out = conv3(w1, channels, padding)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"UNet needs image sides divisible by 4, got {tuple(x.shape[-2:])}")
        emb = self.cond(t, labels)
        h1 = self.enc1(self.inp(x), emb)
        h2 = self.enc2(F.max_pool2d(h1, 2), emb)
        h3 = self.mid(F.max_pool2d(h2, 2), emb)
        if self.attention is not None:
            h3 = self.attention(h3)
        d2 = self.dec2(torch.cat([self.up2(h3), h2], 1), emb)
        d1 = self.dec1(torch.cat([self.up1(d2), h1], 1), emb)
        return self.out(d1)


ARCHITECTURES = {"resnet": ResNet, "unet": UNet}


class NetworkDenoiser:
    """A trained ε-predictor with the machines' signature ``(x, t, labels) → x̂0``.

    ``clip``: clamp x̂0 to the data range [-1, 1] (DDPM's ``clip_denoised``). x̂0 = (x − √(1−ᾱ)·ε̂)/√ᾱ multiplies
    the network's error in ε̂ by √(1−ᾱ)/√ᾱ, about 80 at t = 1, so an ε-predictor's x̂0 at the first step can lie far
    outside the data; the machines' x̂0 are posterior means of training pixels and lie in the range already, so
    clipping changes the network only. Off by default, as in the paper's sampler."""

    def __init__(self, net: nn.Module, name: str | None = None, clip: bool = False) -> None:
        self.net = net
        self.name = name  # where it was loaded from (errors name it); not part of its identity
        self.conditional = getattr(net, "num_classes", None) is not None
        self.clip = clip

    def __repr__(self) -> str:
        return f"network {self.name}" if self.name else f"network {type(self.net).__name__}"

    def identity(self) -> dict:
        """What changes this denoiser's answers: the architecture and a hash of its weights."""
        h = hashlib.sha256()
        for name, value in self.net.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        found = {"network": repr(self.net), "weights": h.hexdigest()}
        return found | {"clip": True} if self.clip else found

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional and labels is not None:
            n = cast(int, self.net.num_classes)
            outside = labels[(labels < 0) | (labels >= n)] if labels.numel() else labels
            if outside.numel():
                raise ValueError(f"{self!r} was trained on labels 0..{n - 1}; label {int(outside[0])} is outside them")
        p = next(self.net.parameters())
        times = torch.full((x.shape[0],), t, device=p.device)
        eps = self.net(x.to(p.device, p.dtype), times, labels.to(p.device) if self.conditional and labels is not None else None)
        x0 = x0_from_eps(x, eps.to(x.device, x.dtype), t)
        return x0.clamp_(-1.0, 1.0) if self.clip else x0
