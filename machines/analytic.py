"""The analytic score machines IS, ES, LS, ELS and bbELS (Kamb & Ganguli 2025; DESIGN §3).

Every machine has one call signature, ``machine(x, t, labels) → x̂0``, shared with wrapped
networks. The machines differ only in their dictionary rule (data in
:mod:`patchbank.geometry`), never in code paths:

====== ========= ==============================================================
IS     —         the N training images (one posterior per image)
ES     circular  all N·H·W circular translates of the training images
LS     zeros     the N patches at exactly the same pixel
ELS    circular  every circularly wrapped patch of every image, any pixel
bbELS  zeros     every patch whose visible zero padding matches the pixel's
====== ========= ==============================================================
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

import torch

from patchbank.base import Bank
from patchbank.datasets import ImageData, to_model_range
from patchbank.geometry import IMAGE_RULES, RULE_PADDING, BucketKey, Padding, check_padding, check_scale, dictionary_groups, patches_at
from patchbank.memory import MemoryBank

from . import native
from .posterior import Backend, make_backend
from .posterior.exact import ExactBackend
from .schedule import ScaleSchedule, alpha_sigma2

MachineKind = Literal["IS", "ES", "LS", "ELS", "bbELS"]
ScalesMethod = Literal["auto", "box", "per_scale"]
BOX_MIN_SCALE = 5
"""The smallest P that :meth:`ScoreMachine.at_scales` sends to the box pass by default. Below it a pair's exact inner
product (C·P² multiply-adds, over distinct patches with pruning where tables exist) costs less than the box pass's
work per pair: on 1,000 MNIST images (2 queries, 2 threads) the exact backend takes 0.0 and 0.1–0.4 s at P = 1 and
3 where the box pass alone takes 3.5–4.0 and 2.8–3.4 s (docs/performance.md, "Many scales at once")."""
MACHINES: tuple[str, ...] = ("IS", "ES", "LS", "ELS", "bbELS")


class Denoiser(Protocol):
    """Anything the sampler can drive: ``x [B, C, H, W]``, time ``t``, labels ``[B]`` → ``x̂0 [B, C, H, W]``."""

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor: ...


QUERY_BYTES = 1 << 30
"""Memory for the query patches of one pass of a machine (see :meth:`ScoreMachine.batch_limit`)."""


class ScoreMachine:
    """An analytic machine over a bank of training images.

    ``kind``: IS, ES, LS, ELS or bbELS. ``scales``: a :class:`ScaleSchedule` or a constant odd P
    (patch machines only). ``padding``: defaults to the rule's (zeros for LS/bbELS, circular for
    ELS). ``conditional``: restrict every dictionary to training images of the sample's label.
    ``backend``: how posteriors are computed — a backend or a spec string such as ``"auto"`` or
    ``"topk:k=256"`` (see :mod:`machines.posterior`; default ``"exact"``).
    """

    def __init__(
        self,
        bank: Bank | ImageData,
        kind: MachineKind,
        scales: ScaleSchedule | int | None = None,
        padding: Padding | None = None,
        conditional: bool = False,
        backend: Backend | str | None = None,
    ) -> None:
        if kind not in MACHINES:
            raise ValueError(f"unknown machine {kind!r}; choose from {MACHINES}")
        self.bank = bank if isinstance(bank, Bank) else MemoryBank(bank)
        self.kind = kind
        self.conditional = conditional
        self.backend = make_backend("exact" if backend is None else backend)
        self.channels, self.height, self.width = self.bank.channels, self.bank.height, self.bank.width
        self.padding: Padding = padding or ("circular" if kind == "ES" else RULE_PADDING.get(kind, "zeros"))
        check_padding(self.padding)
        if kind == "bbELS" and self.padding != "zeros":
            raise ValueError("bbELS is defined by zero padding; use ELS for circular padding")
        if kind in IMAGE_RULES:
            if scales is not None:
                raise ValueError(f"{kind} compares whole images; it takes no patch scale")
            self.scales = None
        else:
            if scales is None:
                raise ValueError(f"{kind} needs a patch scale: an odd int or a ScaleSchedule")
            self.scales = scales if isinstance(scales, ScaleSchedule) else ScaleSchedule.constant(scales)  # checks P

    def __repr__(self) -> str:
        return (
            f"ScoreMachine({self.kind}, padding={self.padding}, conditional={self.conditional}, "
            f"images={len(self.bank)}x{self.channels}x{self.height}x{self.width})"
        )

    def identity(self) -> dict:
        """Everything that changes this machine's answers (a sampling checkpoint's run id uses it): the
        kind, padding, conditioning, scale schedule, the data's fingerprint and the backend with its options."""
        return {"kind": self.kind, "padding": self.padding, "conditional": self.conditional,
                "scales": None if self.scales is None else self.scales.to_json(), "data": self.bank.fingerprint(),
                "backend": repr(self.backend)}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior-mean denoiser: float ``x [B, C, H, W]`` at time ``t`` → ``x̂0 [B, C, H, W]`` in ``x``'s dtype.

        Inputs that are not float tensors of the machine's image shape, hold NaN or Inf, or come
        without the labels a conditional machine needs are errors naming the problem."""
        self.check_input(x, labels)
        a, s2 = alpha_sigma2(t)
        out = torch.empty_like(x)
        for chunk in torch.arange(x.shape[0]).split(self.batch_limit(t)):  # a sample's answer is the same in any batch
            requests, places = [], []
            for label, idx in self._label_groups(chunk.numel(), None if labels is None else labels[chunk]):
                rows = chunk[idx]
                for bucket, locs, queries in self._requests(x[rows], label, None if self.scales is None else self.scales(t)):
                    requests.append((bucket, queries))
                    places.append((rows, locs))
            for (rows, locs), answer in zip(places, self._posteriors(requests, a, s2)):
                self._place(out, rows, locs, answer)
        return out

    def _place(self, out: torch.Tensor, rows: torch.Tensor | slice, locs: torch.Tensor | None, answer: torch.Tensor) -> None:
        """Write a bucket's posterior means ``answer`` (``[b·L, C]``, or ``[b, C·H·W]`` for whole images) into the
        samples ``rows`` of ``out [B, C, H, W]`` at the pixels ``locs [L, 2]`` it serves (None: every pixel)."""
        b = out[rows].shape[0]
        if locs is None:
            out[rows] = answer.view(b, *out.shape[1:]).to(out.dtype)
        elif isinstance(rows, slice):
            out[rows, :, locs[:, 0], locs[:, 1]] = answer.view(b, -1, self.channels).permute(0, 2, 1).to(out.dtype)
        else:
            out[rows[:, None], :, locs[:, 0], locs[:, 1]] = answer.view(b, -1, self.channels).to(out.dtype)

    def _requests(self, x: torch.Tensor, label: int | None,
                  P: int | None) -> list[tuple[BucketKey, torch.Tensor | None, torch.Tensor]]:
        """What the samples ``x [b, C, H, W]`` of one label ask of the backend at patch size ``P`` (None: whole images):
        per bucket, the pixels it serves (``locs [L, 2]``; None for whole images) and the queries ``[b·L, C·P·P]``
        (``[b, C·H·W]`` for whole images)."""
        if P is None:
            return [(BucketKey(self.kind, None, self.padding, (), label), None, x.flatten(1))]
        return [(BucketKey(self.kind, P, self.padding, key, label), locs, patches_at(x, locs, P, self.padding).flatten(0, 1))
                for key, locs in dictionary_groups(self.height, self.width, P, self.kind)]  # type: ignore[arg-type]

    def _posteriors(self, requests: list[tuple[BucketKey, torch.Tensor]], a: float, s2: float) -> list[torch.Tensor]:
        """The backend's posterior means for every ``(bucket, queries)`` of a pass: in one call where the backend
        takes them together (``posterior_many``: a sharded bank's shards answer all in one round trip), else one
        call per bucket."""
        many = getattr(self.backend, "posterior_many", None)
        if many is not None:
            return many(self.bank, requests, a, s2)
        return [self.backend.posterior(self.bank, bucket, queries, a, s2) for bucket, queries in requests]

    def batch_limit(self, t: float) -> int:
        """The most samples one pass takes at time ``t``: their queries (float64 patches ``[b·H·W, C·P·P]`` or, for
        IS and ES, images ``[b, C·H·W]``, and one copy) within :data:`QUERY_BYTES`; a larger batch is taken in
        slices of this many."""
        per_query = self.channels * (self.height * self.width if self.scales is None else self.scales(t) ** 2)
        queries = 1 if self.scales is None else self.height * self.width
        return max(1, QUERY_BYTES // (2 * 8 * queries * per_query))

    def check_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Refuse inputs this machine cannot take, naming the problem: ``x`` must be finite float images
        ``[B, C, H, W]`` of the bank's shape, and ``labels [B]`` are needed exactly when the machine is conditional."""
        expected = (self.channels, self.height, self.width)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, {', '.join(map(str, expected))}], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (images in [-1, 1]), got {x.dtype}; convert it with .double() or to_model_range")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.kind} machine built for images [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x holds no images (batch of 0)")
        if not torch.isfinite(x).all():
            bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
            raise ValueError(f"x holds NaN or Inf (first at index {bad})")
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor [B], got {type(labels).__name__}")
        if self.conditional and labels is None:
            raise ValueError("a class-conditional machine needs labels [B]")
        if self.conditional and labels.shape != (x.shape[0],):  # type: ignore[union-attr]
            raise ValueError(f"labels must be [B] = [{x.shape[0]}], got {tuple(labels.shape)}")  # type: ignore[union-attr]

    def label_groups(self, x: torch.Tensor, labels: torch.Tensor | None) -> list[tuple[int | None, torch.Tensor]]:
        """The images of ``x [B, C, H, W]`` that share a dictionary, after :meth:`check_input`: ``(label, indices)``
        per group — one group of every image (label None) for an unconditional machine, one per label present
        otherwise."""
        self.check_input(x, labels)
        return self._label_groups(x.shape[0], labels)

    def _label_groups(self, B: int, labels: torch.Tensor | None) -> list[tuple[int | None, torch.Tensor]]:
        if not self.conditional:
            return [(None, torch.arange(B))]
        labels = labels.cpu()  # type: ignore[union-attr]
        return [(int(y), torch.nonzero(labels == y).view(-1)) for y in labels.unique()]

    @torch.no_grad()
    def at_scales(self, x: torch.Tensor, t: float, scales: Sequence[int], labels: torch.Tensor | None = None,
                  method: ScalesMethod = "auto") -> torch.Tensor:
        """This machine's x̂0 at each of several constant patch sizes, for the same inputs: float ``x [B, C, H, W]``
        at time ``t`` → ``[len(scales), B, C, H, W]`` in ``x``'s dtype (what calibration compares, one candidate P
        per row).

        ``method="box"`` computes every scale in one pass (:func:`machines.native.box_scales`): each
        pair's inner product at every patch size is a box sum of one product map per (training image,
        displacement), so a large patch costs what a small one does. Its posteriors are exact, in float64.
        ``"per_scale"`` runs the machine's backend once per P. ``"auto"`` (the default) sends the scales from
        :data:`BOX_MIN_SCALE` up to one box pass where it gives this machine's answers (an exact backend on CPU
        inputs, at most 4 channels, the compiled kernels; :meth:`box_reason` says why not) and the rest through
        the backend, one pass each. The schedule the machine was built with plays no part."""
        self.check_input(x, labels)
        if self.scales is None:
            raise ValueError(f"{self.kind} compares whole images; it has no patch scales to evaluate")
        scales = [int(P) for P in scales]
        for P in scales:
            check_scale(P)
        if not scales:
            raise ValueError("give at least one patch scale")
        if method not in ("auto", "box", "per_scale"):
            raise ValueError(f"unknown method {method!r}; choose auto, box or per_scale")
        reason = self.box_reason(x)
        if method == "box" and reason is not None:
            raise ValueError(f"the box pass cannot serve this machine: {reason}")
        if method == "box":
            boxed = list(range(len(scales)))
        elif method == "auto" and reason is None:
            boxed = [k for k, P in enumerate(scales) if P >= BOX_MIN_SCALE]
        else:
            boxed = []
        a, s2 = alpha_sigma2(t)
        out = torch.empty((len(scales), *x.shape), dtype=x.dtype, device=x.device)
        for label, idx in self._label_groups(x.shape[0], labels):
            if boxed:
                images = to_model_range(self.bank.data.images[self.bank.image_ids(label)], torch.float64).contiguous()
                means, _ = native.box_scales(x[idx].to(torch.float64).contiguous(), images, [scales[k] for k in boxed],
                                              self.kind, self.padding, a, s2)
                for j, k in enumerate(boxed):
                    out[k, idx] = means[j].to(x.dtype)
            for k, P in enumerate(scales):
                if k not in boxed:
                    out[k, idx] = self._denoise_at(x[idx], label, a, s2, P).to(x.dtype)
        return out

    def box_reason(self, x: torch.Tensor | None = None) -> str | None:
        """Why :meth:`at_scales` cannot take the box pass for this machine (and inputs ``x``), or None when it can."""
        if self.scales is None:
            return f"{self.kind} compares whole images"
        if not isinstance(self.backend, ExactBackend) or self.backend.kernel == "torch":
            torch_ops = '(kernel=torch)' if isinstance(self.backend, ExactBackend) else ''
            return f"its backend is {type(self.backend).__name__}{torch_ops}, not the exact backend with compiled kernels"
        if x is not None and x.device.type != "cpu":
            return f"the inputs are on {x.device}, and the box pass runs on the CPU"
        if self.channels > 4:
            return f"the box pass takes at most 4 channels, the images have {self.channels}"
        if not native.available():
            return f"the kernels do not compile here: {native.unavailable_reason()}"
        return None

    def _denoise_at(self, x: torch.Tensor, label: int | None, a: float, s2: float, P: int) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        requests = self._requests(x, label, P)
        for (_, locs, _), answer in zip(requests, self._posteriors([(b, q) for b, _, q in requests], a, s2)):
            self._place(out, slice(None), locs, answer)
        return out
