"""The certificate study: how many pixels each top-k configuration of the grid certifies, per k and (t, P).

At each time t (P from the run's schedule), random pixels of noised held-out images are answered by every top-k
entry of the grid, searching the bank that entry runs on (its FAISS index, or torch search of the in-memory
bank), for several k from one search (:meth:`machines.TopKBackend.certificates`). A pixel counts as certified
when its ε ≤ the entry's ``tol`` (1e-4 without one); pixels of buckets without a distinct-patch table (streamed
scales) count as not certified, as top-k sums them exactly.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from machines import ScaleSchedule, alpha_sigma2
from machines.posterior import serving
from machines.posterior.topk import TopKBackend
from patchbank import Bank, ImageData

from .concentration import noised_pixels


def certificate_study(entries: list[tuple[str, TopKBackend, Bank]], machine: str, times: list[float], schedule: ScaleSchedule,
                      held_out: ImageData, ks: list[int], pixels: int = 32, seed: int = 0, progress: bool = True) -> list[dict]:
    """One cell per (entry, t, k): ``certified`` (fraction of the ``pixels``), ``eps_median`` over the tabulated
    pixels, ``tabulated`` (pixels whose bucket has a distinct-patch table). ``entries``: (name, backend, its bank)."""
    if not entries:
        return []
    gen = torch.Generator().manual_seed(seed)
    bank0 = entries[0][2]
    cells = []
    for t in tqdm(times, desc="certificates", disable=not progress):
        a, s2 = alpha_sigma2(t)
        P = schedule(t)
        [(_, groups)] = noised_pixels(held_out, bank0.height, bank0.width, machine, t, [P], pixels, gen)
        for name, backend, bank in entries:
            eps: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
            for bucket, queries in groups:
                if serving(bank, bucket) == "table":
                    for k, e in backend.certificates(bank, bucket, queries, a, s2, ks).items():
                        eps[k].append(e)
            target = backend.tol if backend.tol is not None else 1e-4
            for k in ks:
                e = torch.cat(eps[k]) if eps[k] else torch.zeros(0, dtype=torch.float64)
                cells.append({"config": name, "t": t, "P": P, "k": k, "pixels": pixels, "tabulated": int(e.numel()),
                              "certified": float((e <= target).sum()) / pixels,
                              "eps_median": float(e.median()) if e.numel() else None})
    return cells
