"""Comparator theories with the machines' signature ``machine(x, t, labels) → x̂0``.

* :class:`WienerMachine` — the linear Gaussian denoiser: the posterior mean under a Gaussian prior with
  the training set's mean ``μ`` and covariance ``Σ``. With ``x_t = a·x0 + σ·ε`` (``a = √ᾱ``, ``σ² = 1 − ᾱ``),
  ``E[x0 | x_t] = μ + a·Σ (a²Σ + σ²I)⁻¹ (x_t − a·μ)`` (the Gaussian conditional mean, i.e. the Wiener filter;
  among all linear denoisers it has the least mean squared error on any data with that μ and Σ). Computed through ``Σ = V diag(λ) Vᵀ``: ``x̂0 = μ + V diag(aλ/(a²λ + σ²)) Vᵀ (x_t − aμ)``.
* :class:`NearestNeighbourMachine` — the training image nearest to ``x_t / a``: the IS posterior's heaviest image
  (its zero-temperature limit), a memorisation baseline.

Both are class-conditional on request (statistics or images of the sample's label only).
"""

from __future__ import annotations

import torch

from patchbank.base import Bank
from patchbank.datasets import ImageData, to_model_range
from patchbank.memory import MemoryBank

from .schedule import alpha_sigma2

FULL_COVARIANCE_MAX = 4096
"""Largest C·H·W whose covariance is eigendecomposed whole (a 4,096² float64 matrix is 134 MB). Beyond it,
and whenever the images are fewer than C·H·W, the spectrum comes from the centred data's SVD ``[N, D]``
instead: exact as well (Σ has rank ≤ N − 1; directions outside the data's span have λ = 0)."""


class _Comparator:
    """Shared input checks and per-label grouping."""

    name = "comparator"

    def __init__(self, data: Bank | ImageData, conditional: bool = False) -> None:
        self.bank = data if isinstance(data, Bank) else MemoryBank(data)
        self.conditional = conditional
        self.shape = tuple(self.bank.data.shape)

    def _groups(self, x: torch.Tensor, labels: torch.Tensor | None) -> list[tuple[int | None, torch.Tensor]]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name} built for float images [B, {', '.join(map(str, self.shape))}], got {got}")
        if not self.conditional:
            return [(None, torch.arange(x.shape[0]))]
        if labels is None or labels.shape != (x.shape[0],):
            raise ValueError(f"a class-conditional {self.name} needs labels [B] = [{x.shape[0]}]")
        labels = labels.cpu()
        return [(int(y), torch.nonzero(labels == y).view(-1)) for y in labels.unique()]

    def _images(self, label: int | None) -> torch.Tensor:
        return to_model_range(self.bank.data.images[self.bank.image_ids(label)], torch.float64).flatten(1)

    def identity(self) -> dict:
        return {"kind": self.name, "conditional": self.conditional, "data": self.bank.fingerprint()}


class WienerMachine(_Comparator):
    """The Wiener filter (see the module docstring); ``x [B, C, H, W]`` → ``x̂0`` in ``x``'s dtype. The mean and
    spectrum of each label's images are computed once and kept (memory ``D²`` up to
    :data:`FULL_COVARIANCE_MAX`, else ``N·D``)."""

    name = "wiener"

    def __init__(self, data: Bank | ImageData, conditional: bool = False) -> None:
        super().__init__(data, conditional)
        self._stats: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def statistics(self, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(μ [D], eigenvalues λ [r], eigenvectors V [D, r])`` of the label's images (all for None), float64."""
        if label not in self._stats:
            x = self._images(label)
            mu = x.mean(0)
            centred = x - mu
            n, D = centred.shape
            if D <= FULL_COVARIANCE_MAX and n >= D:
                lam, V = torch.linalg.eigh(centred.T @ centred / n)
            else:
                _, sv, Vh = torch.linalg.svd(centred, full_matrices=False)
                lam, V = sv.pow(2) / n, Vh.T
            self._stats[label] = (mu, lam.clamp(min=0), V)
        return self._stats[label]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        a, s2 = alpha_sigma2(t)
        out = torch.empty_like(x)
        for label, idx in self._groups(x, labels):
            mu, lam, V = self.statistics(label)
            r = x[idx].flatten(1).to(torch.float64) - a * mu
            gain = a * lam / (a * a * lam + s2)
            out[idx] = (mu + ((r @ V) * gain) @ V.T).view(-1, *self.shape).to(x.dtype)
        return out


class NearestNeighbourMachine(_Comparator):
    """``x̂0`` = the training image nearest to ``x_t / a`` (of the sample's label when conditional)."""

    name = "nearest"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        a, _ = alpha_sigma2(t)
        out = torch.empty_like(x)
        for label, idx in self._groups(x, labels):
            train = self._images(label)
            nearest = torch.cdist(x[idx].flatten(1).to(torch.float64) / a, train).argmin(1)
            out[idx] = train[nearest].view(-1, *self.shape).to(x.dtype)
        return out


COMPARATORS = {"wiener": WienerMachine, "nearest": NearestNeighbourMachine}
"""The comparator theories by name (``patchbank evaluate --machines bbELS,wiener,nearest``)."""
