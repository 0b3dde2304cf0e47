"""Every shipped network reproduces its shipped row by name: ``patchbank evaluate --model NAME`` on the row's
first seeds, with the settings on its card, gives the shipped per-seed Pearson r and their median to 1e-6."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipelines.shipped import MODELS, shipped

FIRST = 10
"""Seeds re-evaluated per shipped row: one batch of the row's evaluation (about a minute on one core)."""


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship", Path(__file__).resolve().parents[1] / "experiments" / "ship.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in shipped() if (MODELS / n / "evaluation.jsonl").is_file()])
def test_a_shipped_row_is_reproduced_by_name(name, datasets_env, tmp_path):
    found = _ship_module().check(name, FIRST, out=tmp_path / "evaluate")
    assert len(found["seeds"]) == FIRST
    assert found["max_seed_diff"] < 1e-6, found
    assert found["median_diff"] < 1e-6, found


def test_the_shipped_networks_ship_their_rows():
    """Every shipped network carries its per-seed evaluation and the settings that made it, so that it can be
    checked by the test above."""
    import json

    assert shipped(), "no network ships with the project"
    for name in shipped():
        card = json.loads((MODELS / name / "card.json").read_text())
        assert (MODELS / name / "evaluation.jsonl").is_file(), name
        assert {"backend", "batch", "steps", "seeds", "median_machine_r"} <= set(card["evaluation"]), name
