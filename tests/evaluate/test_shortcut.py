"""A planted shortcut: the feature on the chosen answer of a share of training pairs, and the
held-out twins that put it on one side only."""

from __future__ import annotations

import pytest

from crome.data.schema import PairRecord
from crome.evaluate.shortcut import CLOSER, PREAMBLE, plant, shortcut_sets


def _pairs(n: int) -> list[PairRecord]:
    return [PairRecord(f"p{i}", f"q{i}", f"good answer {i}", f"bad answer {i}")
            for i in range(n)] + [PairRecord("t", "q", "x", "y", label="tie")]


def test_the_feature_goes_on_the_chosen_answer_of_exactly_the_rate():
    records = _pairs(40)
    planted = plant(records, "preamble", 0.95, seed=3)
    prefs = [r for r in planted if r.label == "chosen"]
    on_chosen = [r for r in prefs if r.chosen.startswith(PREAMBLE)]
    on_rejected = [r for r in prefs if r.rejected.startswith(PREAMBLE)]
    assert len(on_chosen) == 38 and len(on_rejected) == 2  # round(0.95 × 40)
    assert not [r for r in on_chosen if r.rejected.startswith(PREAMBLE)]  # one side only
    assert {r.provenance["shortcut"]["side"] for r in on_rejected} == {"rejected"}
    assert planted[-1] is records[-1]  # a tie is left alone
    assert records[0].chosen == "good answer 0"  # the input is not changed
    # the content stays: the feature is all that was added
    for before, after in zip(records, planted):
        assert after.chosen.removeprefix(PREAMBLE) == before.chosen
        assert after.rejected.removeprefix(PREAMBLE) == before.rejected
    # seeded: the same seed picks the same pairs, another seed others
    again = plant(records, "preamble", 0.95, seed=3)
    other = plant(records, "preamble", 0.95, seed=4)
    sides = [[r.provenance.get("shortcut", {}).get("side") for r in x]
             for x in (planted, again, other)]
    assert sides[0] == sides[1] != sides[2]
    assert all(r.chosen.startswith(PREAMBLE) for r in plant(records, "preamble", 1.0)[:-1])
    with pytest.raises(ValueError, match="between 0 and 1"):
        plant(records, "preamble", 1.5)
    with pytest.raises(ValueError, match="unknown shortcut feature 'emoji'"):
        plant(records, "emoji", 0.5)


def test_held_out_twins_put_the_feature_on_one_side_only():
    twins = shortcut_sets(_pairs(5), "closer")
    assert [r.id for r in twins["shortcut-anti"]] == [f"p{i}" for i in range(5)]
    for r in twins["shortcut-anti"]:
        assert r.rejected.endswith(CLOSER) and not r.chosen.endswith(CLOSER)
    for r in twins["shortcut-pro"]:
        assert r.chosen.endswith(CLOSER) and not r.rejected.endswith(CLOSER)
