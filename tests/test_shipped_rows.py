"""Every shipped network reproduces its shipped row by name: ``patchbank evaluate --model NAME`` on the row's
first seeds, with the settings on its card, gives the shipped per-seed Pearson r and their median to 1e-6."""

from __future__ import annotations

import pytest
from conftest import experiment

from pipelines.shipped import MODELS, shipped

FIRST = 10
"""Seeds re-evaluated per shipped row: one batch of the row's evaluation (about a minute on one core)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in shipped() if (MODELS / n / "evaluation.jsonl").is_file()])
def test_a_shipped_row_is_reproduced_by_name(name, datasets_env, tmp_path):
    found = experiment("ship").check(name, FIRST, out=tmp_path / "evaluate")
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


def test_the_table_of_shipped_networks_is_made_from_their_files():
    """``agreement.py table --shipped`` recomputes every shipped row's medians from its per-seed evaluation: they are
    the numbers on its card, and each row names its network and whether its training plateaued."""
    import json

    agreement = experiment("agreement")
    text = agreement.table([], None, from_shipped=True)
    for name in shipped():
        card = json.loads((MODELS / name / "card.json").read_text())
        row = agreement.shipped_summary(name)
        assert row["seeds"] == card["evaluation"]["seeds"], name
        for key in ("median_machine_r", "mean_machine_peer_r2", "median_is_r", "machine_beats_is"):
            assert row[key] == pytest.approx(card["evaluation"][key], abs=1e-12), (name, key)
        assert f"{row['median_machine_r']:.3f}" in text and f"`{name}` loss improvement" in text
    with pytest.raises(SystemExit, match="not a shipped network"):
        agreement.shipped_summary("no_such_net")
