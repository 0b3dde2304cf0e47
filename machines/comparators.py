"""Comparator theories with the machines' signature ``machine(x, t, labels) → x̂0``.

* :class:`WienerMachine` — the linear Gaussian denoiser: the posterior mean under a Gaussian prior with
  the training set's mean ``μ`` and covariance ``Σ``. With ``x_t = a·x0 + σ·ε`` (``a = √ᾱ``, ``σ² = 1 − ᾱ``),
  ``E[x0 | x_t] = μ + a·Σ (a²Σ + σ²I)⁻¹ (x_t − a·μ)`` (the Gaussian conditional mean, i.e. the Wiener filter;
  among all linear denoisers it has the least mean squared error on any data with that μ and Σ). Computed through
  ``Σ = V diag(λ) Vᵀ``: ``x̂0 = μ + V diag(aλ/(a²λ + σ²)) Vᵀ (x_t − aμ)``.
* :class:`NearestNeighbourMachine` — the training image nearest to ``x_t / a``: the IS posterior's heaviest image
  (its zero-temperature limit), a memorisation baseline. Found by an exact search over the whole images (the
  bank's indices are of patches).
* :class:`PCALocalityMachine` — the locality denoiser of Lukoianov, Yuan, Solomon & Sitzmann (*Locality in image
  diffusion models emerges from data statistics*, NeurIPS 2025): each output value ``m`` is the softmax-weighted
  mean of the training images' value ``m``, weighted by distances measured only over the pixels of ``m``'s
  locality mask, a mask read off the Wiener filter of the data's covariance (see the class).
* :class:`SmoothedClosedFormMachine` — the smoothed closed-form denoiser of Scarvelis, Borde & Solomon
  (*Closed-form diffusion models*, TMLR 2024): the ideal (closed-form) denoiser averaged over Gaussian
  perturbations of its input, ``E_ε[x̂0_IS(x_t + σε)]``.

All are class-conditional on request (statistics or images of the sample's label only). Every comparator has a
spec string like the backends' (``pca_locality:threshold=0.02:temperature=1``, ``smoothed:sigma=0.1:draws=8``),
turned into a machine by :func:`make_comparator`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from patchbank.base import Bank
from patchbank.datasets import ImageData, to_model_range
from patchbank.memory import MemoryBank
from patchbank.specs import split_spec

from .analytic import ScoreMachine
from .posterior import Backend
from .schedule import alpha_sigma2


class _Comparator:
    """Shared input checks and per-label grouping. ``PARAMETERS``: the options a spec string may set, with their
    types; ``CALIBRATED``: the free parameter that calibration fits by default (None: none; any numeric
    parameter can be fitted on request)."""

    name = "comparator"
    PARAMETERS: dict[str, type] = {}
    CALIBRATED: str | None = None
    TAKES_BACKEND = False  # whether its posteriors go through a posterior backend (given as ``backend=``)

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

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x̂0 [B, C, H, W]`` of ``x [B, C, H, W]`` at time ``t`` (each comparator its own way)."""
        raise NotImplementedError

    def _images(self, label: int | None) -> torch.Tensor:
        """The label's training images as float64 rows ``[N, D]`` in model units (converted once, kept)."""
        cache = self.__dict__.setdefault("_train", {})
        if label not in cache:
            cache[label] = to_model_range(self.bank.data.images[self.bank.image_ids(label)], torch.float64).flatten(1)
        return cache[label]

    def __getstate__(self) -> dict:
        """Pickled without the float copies of the images (a worker converts them again)."""
        return {k: ({} if k.startswith("_") and isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def parameters(self) -> dict[str, Any]:
        """The values of this comparator's :attr:`PARAMETERS`."""
        return {name: getattr(self, name) for name in self.PARAMETERS}

    def spec(self) -> str:
        """The spec string that makes this comparator again (:func:`make_comparator`)."""
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.parameters().items()])

    def identity(self) -> dict:
        return {"kind": self.name, "conditional": self.conditional, "data": self.bank.fingerprint(), **self.parameters()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()}, conditional={self.conditional}, images={len(self.bank)})"


class WienerMachine(_Comparator):
    """The Wiener filter (see the module docstring); ``x [B, C, H, W]`` → ``x̂0`` in ``x``'s dtype. The mean and
    spectrum of each label's images are computed once by the bank and kept (memory ``D²`` up to
    :data:`~patchbank.base.FULL_COVARIANCE_MAX`, else ``N·D``), on disk beside a built bank's buckets."""

    name = "wiener"

    def statistics(self, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(μ [D], eigenvalues λ [r], eigenvectors V [D, r])`` of the label's images (all for None), float64: the
        bank's :meth:`~patchbank.base.Bank.image_statistics` (computed once; stored with a bank on disk)."""
        found = self.bank.image_statistics(label)
        return found.mu, found.lam, found.V

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


class PCALocalityMachine(_Comparator):
    """The PCA-locality denoiser (Lukoianov et al. 2025): an ideal denoiser whose distances are local, with the
    locality read off the data's covariance. ``x [B, C, H, W]`` → ``x̂0`` in ``x``'s dtype.

    With the Wiener filter of the training set's covariance ``Σ = V diag(λ) Vᵀ`` at time ``t``,
    ``A_t = V diag(g) Vᵀ`` with gains ``g = a²λ / (a²λ + σ²)`` (``a = √ᾱ``, ``σ² = 1 − ᾱ``), normalised
    (``normalise="row"``, the authors') row by row by its diagonal, ``Â[n, m] = A_t[n, m] / A_t[n, n]`` (a
    diagonal below 1e-6 counts as 1), the binary mask is ``M[n, m] = 1{|Â[n, m]| ≥ τ · max|Â|}`` (``τ`` =
    ``threshold``): column ``m`` lists the values that output value ``m`` compares (over all channels and
    pixels, flattened channel-major). ``normalise="symmetric"`` uses ``|A[n, m]| / √(A[n, n]·A[m, m])`` instead,
    a correlation bounded by 1, so ``τ`` is an absolute level: on data with near-constant pixels (MNIST's
    border) the row-normalised maximum is set by those pixels and the row masks shrink to a few values,
    often without the pixel itself. Then

        x̂0[m] = Σ_i softmax_i( −Σ_n M[n, m] (x_t[n] − a·y_i[n])² / (2σ²T) ) · y_i[m]

    over the training images ``y_i`` (of the sample's label when conditional), ``T`` = ``temperature``. This is
    the analytical denoiser of the paper's method section; the mask's normalisation and binarisation follow the
    authors' public implementation (threshold 0.02 and temperature 1 are its defaults). With ``threshold=0``
    the mask is full and the machine is exactly IS (``temperature=1``); the authors' code instead weights
    distances by the real-valued ``Â`` at threshold 0, a case not offered here.

    The softmax runs over *all* images at once: images stream in chunks of ``chunk`` through a running
    maximum and running sums per output value (a log-sum-exp merge), never as an average of per-chunk softmaxes
    (which is another, wrong, estimator). Cost per call: ``B·N·D²`` multiply-adds for ``D = C·H·W`` (dense mask
    products); memory ``B·chunk·D`` plus the ``D × D`` mask of each visited (label, t), kept.

    Its entries are whole images, as for IS, which the engine's posterior backends always sum exactly, so the
    machine is exact and takes no backend.
    """

    name = "pca_locality"
    PARAMETERS = {"threshold": float, "temperature": float, "normalise": str}
    CALIBRATED = "threshold"  # the mask's extent, as P is the patch machines'; the temperature can be fitted instead
    NORMALISATIONS = ("row", "symmetric")

    def __init__(self, data: Bank | ImageData, conditional: bool = False, threshold: float = 0.02, temperature: float = 1.0,
                 normalise: str = "row", chunk: int = 256) -> None:
        super().__init__(data, conditional)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (a fraction of the largest normalised filter entry), got {threshold}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if normalise not in self.NORMALISATIONS:
            raise ValueError(f"normalise must be one of {self.NORMALISATIONS}, got {normalise!r}")
        self.threshold, self.temperature, self.normalise, self.chunk = float(threshold), float(temperature), normalise, chunk
        self.wiener = WienerMachine(self.bank, conditional)
        self._masks: dict[tuple[int | None, float], torch.Tensor] = {}

    def mask(self, t: float, label: int | None = None) -> torch.Tensor:
        """The binary locality mask at time ``t``: bool ``[D, D]``, column ``m`` = the values output ``m`` compares."""
        a, s2 = alpha_sigma2(t)
        key = (label, a)
        if key not in self._masks:
            _, lam, V = self.wiener.statistics(label)
            gain = a * a * lam / (a * a * lam + s2)
            A = (V * gain) @ V.T
            diag = A.diagonal().clone()
            if self.normalise == "row":
                diag[diag.abs() < 1e-6] = 1.0  # as the authors: a (near-)constant value's row is left unnormalised
                norm = (A / diag[:, None]).abs()
                self._masks[key] = norm >= self.threshold * norm.max()
            else:
                root = diag.clamp(min=1e-300).sqrt()
                self._masks[key] = (A / root[:, None] / root[None, :]).abs() >= self.threshold
        return self._masks[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        a, s2 = alpha_sigma2(t)
        out = torch.empty_like(x)
        for label, idx in self._groups(x, labels):
            M = self.mask(t, label).to(torch.float64)
            means = masked_posterior_means(x[idx].flatten(1).to(torch.float64), self._images(label), M, a, s2 * self.temperature,
                                           self.chunk)
            out[idx] = means.view(-1, *self.shape).to(x.dtype)
        return out


def masked_posterior_means(x: torch.Tensor, train: torch.Tensor, mask: torch.Tensor, a: float, s2: float,
                           chunk: int = 256) -> torch.Tensor:
    """``x̂[b, m] = Σ_i softmax_i(−Σ_n mask[n, m](x[b, n] − a·y_i[n])²/(2s²)) · y_i[m]`` for queries ``x [B, D]``,
    images ``train [N, D]`` and a mask ``[D, D]`` (float, one column per output value): ``[B, D]``, float64.

    One softmax over all ``N`` images per ``(b, m)``: images come ``chunk`` at a time, each chunk's logits are
    folded into a running maximum and running sums rescaled to it (exact log-sum-exp merging)."""
    B, D = x.shape
    if train.shape[1] != D or mask.shape != (D, D):
        raise ValueError(f"queries [B, {D}] need images [N, {D}] and a mask [{D}, {D}], got {tuple(train.shape)} and {tuple(mask.shape)}")
    x = x.to(torch.float64)
    mask = mask.to(torch.float64)
    x_sq = (x * x) @ mask  # [B, D]
    top = torch.full((B, D), -math.inf, dtype=torch.float64)
    num = torch.zeros(B, D, dtype=torch.float64)
    den = torch.zeros(B, D, dtype=torch.float64)
    for s in range(0, train.shape[0], chunk):
        y = train[s : s + chunk].to(torch.float64)  # [k, D]
        cross = ((x[:, None, :] * y[None]).reshape(-1, D) @ mask).view(B, -1, D)  # Σ_n mask[n,m]·x[b,n]·y_i[n]
        dist = x_sq[:, None, :] - 2 * a * cross + (a * a) * ((y * y) @ mask)[None]  # [B, k, D]
        logits = dist.mul_(-1.0 / (2 * s2))
        new_top = torch.maximum(top, logits.amax(1))
        weights = logits.sub_(new_top[:, None, :]).exp_()
        rescale = torch.exp(top - new_top)
        num = num * rescale + (weights * y[None]).sum(1)
        den = den * rescale + weights.sum(1)
        top = new_top
    return num / den


class SmoothedClosedFormMachine(_Comparator):
    """The smoothed closed-form denoiser (Scarvelis, Borde & Solomon 2024, the σ-CFDM): the closed-form (ideal,
    IS) denoiser averaged over Gaussian perturbations of its input,

        x̂0_σ(x_t, t) = E_{ε ~ N(0, I)}[ x̂0_IS(x_t + σ·ε, t) ] ≈ (1/K) Σ_k x̂0_IS(x_t + σ·ε_k, t),

    the paper's smoothed score (the closed-form score's softmax weights evaluated at perturbed inputs) in
    this engine's x̂0 form, with ``σ`` (``sigma``) in the units of ``x_t``. The expectation is estimated with
    ``draws`` = K fixed draws ``ε_k`` from ``seed``, shared by every sample and every step (as the authors fix
    the noise for a whole trajectory), so the machine is a deterministic function of ``(x_t, t)`` and a sample
    never depends on its batch. ``sigma=0`` is exactly IS. The IS posteriors go through ``backend`` (a
    backend or spec; whole-image posteriors are summed exactly by every backend).
    """

    name = "smoothed"
    PARAMETERS = {"sigma": float, "draws": int, "seed": int}
    CALIBRATED = "sigma"
    TAKES_BACKEND = True

    def __init__(self, data: Bank | ImageData, conditional: bool = False, sigma: float = 0.1, draws: int = 8, seed: int = 0,
                 backend: Backend | str | None = None) -> None:
        super().__init__(data, conditional)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.sigma, self.draws, self.seed = float(sigma), int(draws), int(seed)
        self.ideal = ScoreMachine(self.bank, "IS", conditional=conditional, backend=backend)
        g = torch.Generator().manual_seed(self.seed)
        self.noise = torch.randn(self.draws, *self.shape, generator=g, dtype=torch.float64)  # [K, C, H, W]

    @property
    def backend(self) -> Backend:
        """The backend its IS posteriors go through."""
        return self.ideal.backend

    def identity(self) -> dict:
        return {**super().identity(), "backend": repr(self.backend)}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._groups(x, labels)  # shape and label checks
        if self.sigma == 0:
            return self.ideal(x, t, labels)
        B = x.shape[0]
        moved = (x.to(torch.float64)[None] + self.sigma * self.noise[:, None]).reshape(self.draws * B, *self.shape)
        repeated = labels.repeat(self.draws) if labels is not None and self.conditional else None
        return self.ideal(moved, t, repeated).view(self.draws, B, *self.shape).mean(0).to(x.dtype)


COMPARATORS: dict[str, type[_Comparator]] = {"wiener": WienerMachine, "nearest": NearestNeighbourMachine,
                                             "pca_locality": PCALocalityMachine, "smoothed": SmoothedClosedFormMachine}
"""The comparator theories by name (``patchbank evaluate --machines bbELS,wiener,nearest,pca_locality,smoothed``)."""


def parse_comparator(spec: str) -> tuple[str, dict[str, Any]]:
    """``"smoothed:sigma=0.1:draws=8"`` → ``("smoothed", {"sigma": 0.1, "draws": 8})``; an unknown name or option, or a
    value of the wrong type, is an error naming it."""
    name, parts = split_spec(spec, "comparator")
    if name not in COMPARATORS:
        raise ValueError(f"unknown comparator {name!r}; choose from {', '.join(COMPARATORS)}")
    allowed = COMPARATORS[name].PARAMETERS
    options: dict[str, Any] = {}
    for key, value in parts:
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"comparator {name} has no option {key + '=' + value!r} (options: {known}; write them as name=value)")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"comparator {name}: {key} must be a {allowed[key].__name__}, got {value!r}") from None
    return name, options


def _split_name(text: str) -> tuple[str | None, str]:
    """``"NAME=SPEC"`` → ``(NAME, SPEC)``; a spec without a name → ``(None, spec)`` (a ``=`` after a ``:`` is an option's)."""
    head, eq, rest = text.strip().partition("=")
    return (head, rest) if eq and ":" not in head else (None, text.strip())


def comparator_kind(text: str) -> str | None:
    """The comparator a ``[NAME=]SPEC`` string names (``"pca_sym=pca_locality:…"`` → ``"pca_locality"``), or None
    where it names none (a patch machine such as ``bbELS``, or an unknown name). Options are not checked."""
    kind = _split_name(text)[1].split(":")[0]
    return kind if kind in COMPARATORS else None


def named_spec(text: str) -> tuple[str, str]:
    """``"pca_sym=pca_locality:normalise=symmetric"`` → ``("pca_sym", "pca_locality:normalise=symmetric")``; a spec
    without a name (``"smoothed:sigma=0.1"``) is named by its comparator (``"smoothed"``). Names let one table hold
    two variants of a theory; a name is letters, digits and underscores."""
    name, spec = _split_name(text)
    if name is not None and not name.replace("_", "").isalnum():
        raise ValueError(f"a theory's name is letters, digits and underscores, got {name!r}")
    kind, _ = parse_comparator(spec)
    return name or kind, spec


def make_comparator(spec: str, data: Bank | ImageData, conditional: bool = False, backend: Backend | str | None = None,
                    **extra: Any) -> _Comparator:
    """The comparator a spec string names, over ``data``. ``backend`` goes to a comparator whose posteriors go through
    one (:attr:`~_Comparator.TAKES_BACKEND`) and is not used by the others; ``extra``: further constructor arguments."""
    name, options = parse_comparator(spec)
    cls = COMPARATORS[name]
    if cls.TAKES_BACKEND:
        extra["backend"] = backend
    return cls(data, conditional=conditional, **options, **extra)
