"""The ambiguity filter: P(label) from a baseline RM, τ, per-group counts."""

from __future__ import annotations

import math

import pytest

from crome.data.io import read_pairs, write_pairs
from crome.data.schema import PairRecord
from crome.filter import (
    FilterOptions,
    FilterReport,
    filter_pairs,
    group_of,
    label_confidence,
    rewrite_length_ratio,
)
from crome.model import ModelOptions, RewardModel
from crome.score import score_pairs


def test_label_confidence():
    pref = PairRecord("a", "p", "x", "y")
    tie = PairRecord("b", "p", "x", "y", label="tie")
    assert label_confidence(pref, 0.0, 0.0) == pytest.approx(0.5)
    assert label_confidence(pref, 3.0, 0.0) == pytest.approx(1 / (1 + math.exp(-3)))
    assert label_confidence(pref, 0.0, 3.0) < 0.05  # the baseline gets it wrong
    # a tie: the probability of the answer the baseline favours, in the same unit
    assert label_confidence(tie, 1.0, 1.0) == pytest.approx(0.5)  # equal rewards: a tie
    assert label_confidence(tie, 3.0, 0.0) == label_confidence(tie, 0.0, 3.0) \
        == pytest.approx(1 / (1 + math.exp(-3)))


def test_both_thresholds_are_probabilities_of_one_answer_beating_the_other():
    with pytest.raises(ValueError, match="tie_tau"):
        FilterOptions(tie_tau=0.4)  # below 0.5 every tie would be kept
    with pytest.raises(ValueError, match="tau is a probability"):
        FilterOptions(tau=1.5)
    from crome.filter import is_kept

    pref = PairRecord("a", "p", "x", "y")
    tie = PairRecord("b", "p", "x", "y", label="tie")
    opts = FilterOptions(tau=0.9, tie_tau=0.6)
    assert is_kept(pref, 0.89, opts) and not is_kept(pref, 0.9, opts)
    # a tie is kept where the baseline still prefers one answer (margin >= logit(0.6) = 0.405)
    assert is_kept(tie, label_confidence(tie, 0.41, 0.0), opts)
    assert not is_kept(tie, label_confidence(tie, 0.40, 0.0), opts)
    assert is_kept(tie, label_confidence(tie, 0.0, 0.41), opts)


def _causal(direction: str, chosen: str, rejected: str) -> PairRecord:
    return PairRecord(f"{direction}-{len(chosen)}-{len(rejected)}", "p", chosen, rejected,
                      provenance={"recipe": "causal", "attribute": "a",
                                  "direction": direction})


def test_the_report_gives_keep_rates_and_the_length_of_kept_rewrites_per_direction():
    # a degrade rewrites the chosen answer into the rejected one, an upgrade the reverse
    assert rewrite_length_ratio(_causal("degrade", "x" * 100, "y" * 50)) == 0.5
    assert rewrite_length_ratio(_causal("upgrade", "x" * 150, "y" * 100)) == 1.5
    assert rewrite_length_ratio(PairRecord("o", "p", "x", "y")) is None
    report = FilterReport(tau=0.95, tie_tau=0.6, baseline="b")
    report.add(_causal("upgrade", "x" * 150, "y" * 100), keep=True)
    report.add(_causal("upgrade", "x" * 300, "y" * 100), keep=True)
    report.add(_causal("upgrade", "x" * 90, "y" * 100), keep=True)
    report.add(_causal("upgrade", "x" * 10, "y" * 100), keep=False)
    report.add(_causal("degrade", "x" * 100, "y" * 80), keep=True)
    d = report.to_dict()
    assert d["groups"]["causal/a/upgrade"] == {"kept": 3, "dropped": 1, "keep_rate": 0.75}
    up = d["rewrite_lengths"]["upgrade"]
    assert up["kept"] == {"pairs": 3, "median_length_ratio": 1.5, "chosen_longer": 0.667}
    assert up["dropped"]["pairs"] == 1 and up["dropped"]["chosen_longer"] == 0.0
    assert d["rewrite_lengths"]["degrade"]["kept"]["median_length_ratio"] == 0.8
    text = report.summary()
    assert "causal/a/upgrade: kept 3, dropped 1 (75% kept)" in text
    assert "kept upgrade rewrites: median length 1.50× their source answer; chosen answer " \
           "longer in 67%" in text


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
    prefs = sorted(c for r, c in zip(recs, confs) if r.label != "tie")
    ties = sorted(c for r, c in zip(recs, confs) if r.label == "tie")
    tau, tie_tau = prefs[len(prefs) // 2], ties[len(ties) // 2]  # about half of each kept
    kept, dropped, report = filter_pairs(recs, tiny_rm, FilterOptions(tau=tau, tie_tau=tie_tau))
    assert len(kept) + len(dropped) == len(recs)
    assert {r.id for r in kept} == {r.id for r, c in zip(recs, confs)
                                    if (c >= tie_tau if r.label == "tie" else c < tau)}
    assert 0 < sum(r.label == "tie" for r in kept) < len(ties)
    for r in kept:
        if r.label == "tie":
            assert r.provenance["filter"]["p_favoured"] > tie_tau - 1e-4
        else:
            assert r.provenance["filter"]["p_label"] < tau + 1e-4
    d = report.to_dict()
    assert d["kept"] == len(kept) and d["dropped"] == len(dropped)
    assert sum(g["kept"] + g["dropped"] for g in d["groups"].values()) == len(recs)
    assert set(d["groups"]) == {"causal/a/degrade", "neutral/irrelevant_query"}


def test_tie_tau_is_separate(tiny_rm, helpers):
    recs = _augmented(helpers)
    kept, _, _ = filter_pairs(recs, tiny_rm, FilterOptions(tau=0.0, tie_tau=0.5))
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
    want = [max(p.first, p.second) if r.label == "tie" else p.first
            for r, p in zip(records, prefs)]
    tau = sorted(w for r, w in zip(records, want) if r.label != "tie")[6]  # about half kept
    tie_tau = max(0.5, sorted(w for r, w in zip(records, want) if r.label == "tie")[3])
    kept, dropped, _ = filter_pairs(records, pair_offline,
                                    FilterOptions(tau=tau, tie_tau=tie_tau))
    assert {r.id for r in kept} == {r.id for r, w in zip(records, want)
                                    if (w >= tie_tau if r.label == "tie" else w < tau)}
    assert 0 < len(kept) < len(records) and len(kept) + len(dropped) == len(records)
    for r in kept:
        name = "p_favoured" if r.label == "tie" else "p_label"
        assert r.provenance["filter"][name] == round(want[records.index(r)], 4)
