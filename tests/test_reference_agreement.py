"""Every machine against the naive float64 reference (tests/reference.py) on tiny data, to ≤ 1e-10, with
chunks small enough that every posterior is accumulated over many chunks and query blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import noised
from reference import naive_machine

from machines import ExactBackend, ScoreMachine
from patchbank import to_model_range

PATCH_CASES = [("LS", "zeros"), ("LS", "circular"), ("ELS", "circular"), ("ELS", "zeros"), ("bbELS", "zeros")]
CASES = [("IS", None, None), ("ES", "circular", None)] + [(k, pad, P) for k, pad in PATCH_CASES for P in (1, 3, 5, 11)]


@pytest.mark.parametrize("kind,padding,P", CASES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("prune", [False, True])
def test_matches_naive_reference(tiny, kind, padding, P, C, conditional, prune):
    data = tiny(C)
    t = {None: 1.0, 1: 0.3, 3: 0.3, 5: 0.05, 11: 1.0}[P]
    x = noised(data, t, 2, seed=P or 0)
    labels = torch.tensor([1, 0])
    backend = ExactBackend(prune=prune, leaf_size=16, chunk_size=24, query_chunk=8)
    machine = ScoreMachine(data, kind, scales=P, padding=padding if kind != "IS" else None, conditional=conditional, backend=backend)
    got = machine(x, t, labels)
    images = to_model_range(data.images, torch.float64).numpy()
    ref = naive_machine(kind, images, data.labels.numpy(), x.numpy(), t, P, padding or "zeros",
                        labels.numpy() if conditional else None)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.from_numpy(ref), atol=1e-10, rtol=0), (got - torch.from_numpy(ref)).abs().max()
