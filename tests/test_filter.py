"""The ambiguity filter: P(label) from a baseline RM, τ, per-group counts."""

from __future__ import annotations

import math

import pytest

from crome.data.io import read_pairs, write_pairs
from crome.data.schema import PairRecord
from crome.filter import FilterOptions, filter_pairs, group_of, label_confidence
from crome.model import ModelOptions, RewardModel
from crome.score import score_pairs


def test_label_confidence():
    pref = PairRecord("a", "p", "x", "y")
    tie = PairRecord("b", "p", "x", "y", label="tie")
    assert label_confidence(pref, 0.0, 0.0) == pytest.approx(0.5)
    assert label_confidence(pref, 3.0, 0.0) == pytest.approx(1 / (1 + math.exp(-3)))
    assert label_confidence(pref, 0.0, 3.0) < 0.05  # the baseline gets it wrong
    assert label_confidence(tie, 1.0, 1.0) == pytest.approx(1.0)  # equal rewards: a sure tie
    assert label_confidence(tie, 5.0, 0.0) == label_confidence(tie, 0.0, 5.0) < 0.02


def test_group_of():
    rec = PairRecord("a", "p", "x", "y", provenance={"recipe": "causal",
                                                     "attribute": "correctness",
                                                     "direction": "degrade"})
    assert group_of(rec) == "causal/correctness/degrade"
    assert group_of(PairRecord("b", "p", "x", "y")) == "original"


@pytest.fixture(scope="module")
def tiny_rm(tiny_bert):
    return RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=64, seed=3))


def _augmented(helpers):
    recs = helpers.varied_pairs(16, seed=5)
    for i, r in enumerate(recs):
        r.provenance = {"recipe": "causal", "attribute": "a", "direction": "degrade"} \
            if i % 2 else {"recipe": "neutral", "direction": "irrelevant_query"}
        if i % 2 == 0:
            r.label = "tie"
    return recs


def test_filter_splits_by_tau_and_counts_per_group(tiny_rm, helpers):
    recs = _augmented(helpers)
    chosen, rejected = score_pairs(tiny_rm, recs)
    confs = [label_confidence(r, c, j) for r, c, j in zip(recs, chosen, rejected)]
    tau = sorted(confs)[len(confs) // 2]  # about half kept
    kept, dropped, report = filter_pairs(recs, tiny_rm, FilterOptions(tau=tau))
    assert len(kept) + len(dropped) == len(recs)
    assert {r.id for r in kept} == {r.id for r, c in zip(recs, confs) if c < tau}
    for r in kept:
        assert r.provenance["filter"]["p_label"] < tau + 1e-4
    d = report.to_dict()
    assert d["kept"] == len(kept) and d["dropped"] == len(dropped)
    assert sum(g["kept"] + g["dropped"] for g in d["groups"].values()) == len(recs)
    assert set(d["groups"]) == {"causal/a/degrade", "neutral/irrelevant_query"}


def test_tie_tau_is_separate(tiny_rm, helpers):
    recs = _augmented(helpers)
    kept, _, _ = filter_pairs(recs, tiny_rm, FilterOptions(tau=0.0, tie_tau=1.01))
    assert {r.label for r in kept} == {"tie"} and len(kept) == 8


def test_cli_filter(tiny_rm, helpers, tmp_path):
    recs = _augmented(helpers)
    src = tmp_path / "aug.jsonl"
    write_pairs(recs, src)
    rm_dir = tiny_rm.save(tmp_path / "rm")
    out = tmp_path / "kept.jsonl"
    proc = helpers.run_cli("filter", "-d", src, "--baseline", rm_dir, "--tau", "0.5",
                           "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = read_pairs(out)
    dropped = read_pairs(tmp_path / "kept.jsonl.dropped.jsonl")
    assert len(kept) + len(dropped) == len(recs)
    assert f"kept {len(kept)}, dropped {len(dropped)}" in proc.stdout


def test_a_pairwise_baseline_filters_by_its_own_probabilities(pair_offline, helpers):
    from crome.pairwise import compare_texts

    records = helpers.keyword_pairs(12, seed=3) + helpers.tie_pairs(6, seed=3)
    prefs = compare_texts(pair_offline, [r.prompt for r in records],
                          [r.chosen for r in records], [r.rejected for r in records])
    want = [p.tie if r.label == "tie" else p.first for r, p in zip(records, prefs)]
    tau = sorted(want)[len(want) // 2]  # about half kept
    kept, dropped, _ = filter_pairs(records, pair_offline, FilterOptions(tau=tau))
    assert {r.id for r in kept} == {r.id for r, w in zip(records, want) if w < tau}
    assert 0 < len(kept) < len(records) and len(kept) + len(dropped) == len(records)
    for r in kept:
        assert r.provenance["filter"]["p_label"] == round(want[records.index(r)], 4)
