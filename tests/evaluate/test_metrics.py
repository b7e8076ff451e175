import json
import math

import pytest

from crome.data.schema import PairRecord
from crome.evaluate.metrics import (
    MATH_PRM_WEIGHT,
    REWARDBENCH_SECTIONS,
    SubsetScore,
    format_bias,
    length_bias,
    length_controlled_accuracy,
    overall_accuracy,
    pair_outcomes,
    rewardbench_sections,
    rewardbench_weights,
    subset_accuracy,
    summarize,
)


def rec(rid: str, chosen: str = "good answer", rejected: str = "bad answer",
        subset: str = "s", label: str = "chosen") -> PairRecord:
    return PairRecord(id=rid, prompt="q?", chosen=chosen, rejected=rejected, label=label,
                      subset=subset)


def score(n: int, acc: float) -> SubsetScore:
    correct = round(n * acc)
    assert correct == n * acc, "pick counts that make the accuracy exact"
    return SubsetScore(n=n, correct=correct, ties=0, accuracy=correct / n)


# --- outcomes, ties, subsets -----------------------------------------------------------

def test_tie_counts_as_wrong_and_is_reported():
    records = [rec("win"), rec("tie"), rec("lose"), rec("neutral", label="tie")]
    outcomes = pair_outcomes(records, [2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 2.0])
    assert [o.outcome for o in outcomes] == ["correct", "tie", "wrong", "neutral"]
    assert [o.margin for o in outcomes] == [1.0, 0.0, -3.0, 3.0]
    # Three preference pairs, one correct: the tie is not half-right, nor left out.
    assert overall_accuracy(outcomes) == pytest.approx(1 / 3)
    (s,) = subset_accuracy(outcomes).values()
    assert (s.n, s.correct, s.ties) == (3, 1, 1)
    assert s.accuracy == pytest.approx(1 / 3)
    assert (s.neutral, s.neutral_mean_abs_margin) == (1, 3.0)


def test_constant_scorer_scores_zero_not_half():
    records = [rec(str(i)) for i in range(4)]
    outcomes = pair_outcomes(records, [0.5] * 4, [0.5] * 4)
    assert overall_accuracy(outcomes) == 0.0
    assert summarize(outcomes)["ties"] == 4


def test_neutral_margin_is_absolute():
    records = [rec("a", label="tie"), rec("b", label="tie")]
    outcomes = pair_outcomes(records, [0.0, 1.0], [2.0, 0.5])
    assert overall_accuracy(outcomes) is None  # no preference pair: nothing to be right on
    s = subset_accuracy(outcomes)["s"]
    assert s.n == 0 and s.accuracy is None
    assert s.neutral_mean_abs_margin == pytest.approx((2.0 + 0.5) / 2)


def test_lengths_and_subsets_are_recorded():
    records = [rec("a", chosen="x" * 7, rejected="y" * 3, subset="one"),
               rec("b", subset="two"), rec("c", subset="")]
    outcomes = pair_outcomes(records, [1, 1, 1], [0, 2, 0])
    assert (outcomes[0].len_chosen, outcomes[0].len_rejected) == (7, 3)
    scores = subset_accuracy(outcomes)
    assert list(scores) == ["one", "two", "(none)"]
    assert "all" not in scores
    assert scores["one"].accuracy == 1.0 and scores["two"].accuracy == 0.0
    assert outcomes[0].to_dict()["id"] == "a"


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="lengths differ"):
        pair_outcomes([rec("a")], [1.0], [])
    with pytest.raises(ValueError, match="'b'.*non-finite"):
        pair_outcomes([rec("a"), rec("b")], [1.0, math.nan], [0.0, 0.0])


# --- RewardBench sections --------------------------------------------------------------

def test_section_is_count_weighted_mean_of_subsets():
    scores = {"llmbar-natural": score(100, 0.25), "llmbar-adver-neighbor": score(134, 0.5)}
    sections = rewardbench_sections(scores)
    expected = (100 * 0.25 + 134 * 0.5) / 234
    assert sections == {"Chat Hard": pytest.approx(expected), "average": pytest.approx(expected)}
    # Not the unweighted mean of the two subsets.
    assert sections["Chat Hard"] != pytest.approx(0.375)


def test_section_weights_are_the_counts_present_not_official_ones():
    # A sample of LLMBar: 10 natural pairs all right, 30 neighbour pairs all wrong.
    scores = {"llmbar-natural": score(10, 1.0), "llmbar-adver-neighbor": score(30, 0.0)}
    assert rewardbench_sections(scores)["Chat Hard"] == pytest.approx(10 / 40)
    # Official counts (100 and 134) would have given 100 / 234.
    assert rewardbench_sections(scores)["Chat Hard"] != pytest.approx(100 / 234)


def test_math_prm_weighs_984_whatever_its_count():
    assert MATH_PRM_WEIGHT == 6 * 164
    scores = {"math-prm": score(447, 1.0), "hep-python": score(164, 0.0)}
    sections = rewardbench_sections(scores)
    assert sections["Reasoning"] == pytest.approx(984 / (984 + 164))
    small = {"math-prm": score(10, 1.0), "hep-python": score(164, 0.0)}
    assert rewardbench_weights(small) == {"math-prm": 984.0, "hep-python": 164.0}
    assert rewardbench_sections(small)["Reasoning"] == pytest.approx(984 / 1148)


def test_full_reasoning_is_half_math_half_code():
    # The full data: six code subsets of 164 and math-prm's 447, weighted as 984.
    hep_correct = {"hep-cpp": 82, "hep-go": 100, "hep-java": 120, "hep-js": 130,
                   "hep-python": 150, "hep-rust": 164}
    scores = {name: SubsetScore(n=164, correct=c, ties=0, accuracy=c / 164)
              for name, c in hep_correct.items()}
    scores["math-prm"] = SubsetScore(n=447, correct=134, ties=0, accuracy=134 / 447)
    code = sum(hep_correct.values()) / (6 * 164)
    expected = 0.5 * (134 / 447) + 0.5 * code
    assert rewardbench_sections(scores)["Reasoning"] == pytest.approx(expected)
    # Weighting math-prm by its own 447 pairs would give a different number.
    assert expected != pytest.approx((134 + sum(hep_correct.values())) / (447 + 984))


def test_sections_present_average_and_ignored_subsets():
    scores = {
        "alpacaeval-easy": score(100, 0.9),
        "mt-bench-med": score(40, 0.5),
        "xstest-should-respond": score(250, 0.8),
        "helpful-base": score(500, 0.0),  # not a RewardBench subset: no effect
        "donotanswer": SubsetScore(n=0, correct=0, ties=0, accuracy=None, neutral=3),
    }
    sections = rewardbench_sections(scores)
    chat = (100 * 0.9 + 40 * 0.5) / 140
    assert list(sections) == ["Chat", "Safety", "average"]
    assert sections["Chat"] == pytest.approx(chat)
    assert sections["Safety"] == pytest.approx(0.8)
    assert sections["average"] == pytest.approx((chat + 0.8) / 2)
    assert "donotanswer" not in rewardbench_weights(scores)


def test_no_rewardbench_subsets_gives_none():
    assert rewardbench_sections({"helpful-base": score(10, 0.5)}) is None
    assert rewardbench_sections({}) is None


def test_section_mapping_covers_the_23_subsets_once():
    names = [s for subs in REWARDBENCH_SECTIONS.values() for s in subs]
    assert len(names) == len(set(names)) == 23
    assert list(REWARDBENCH_SECTIONS) == ["Chat", "Chat Hard", "Safety", "Reasoning"]


# --- length bias -----------------------------------------------------------------------

def _length_pairs() -> list[PairRecord]:
    return [
        rec("c1", chosen="a" * 40, rejected="b" * 10),   # chosen longer
        rec("c2", chosen="a" * 30, rejected="b" * 20),   # chosen longer
        rec("r1", chosen="a" * 10, rejected="b" * 50),   # rejected longer
        rec("r2", chosen="a" * 15, rejected="b" * 25),   # rejected longer
        rec("r3", chosen="a" * 5, rejected="b" * 60),    # rejected longer
        rec("e1", chosen="a" * 12, rejected="b" * 12),   # same length
    ]


def _scores_by_length(records, sign=1.0):
    return ([sign * len(r.chosen) for r in records], [sign * len(r.rejected) for r in records])


def test_length_bias_split_for_a_length_scorer():
    records = _length_pairs()
    outcomes = pair_outcomes(records, *_scores_by_length(records))
    lb = length_bias(outcomes)
    assert (lb.n_chosen_longer, lb.n_rejected_longer, lb.n_same_length) == (2, 3, 1)
    assert lb.accuracy_chosen_longer == 1.0
    assert lb.accuracy_rejected_longer == 0.0
    assert lb.n_answers == 12
    assert lb.spearman == pytest.approx(1.0)


def test_spearman_sign_follows_the_bias():
    records = _length_pairs()
    shorter = length_bias(pair_outcomes(records, *_scores_by_length(records, sign=-1.0)))
    assert shorter.spearman == pytest.approx(-1.0)
    assert shorter.accuracy_rejected_longer == 1.0 and shorter.accuracy_chosen_longer == 0.0
    # Rewards that mostly but not perfectly follow length: positive, below one.
    chosen, rejected = _scores_by_length(records)
    rejected[2] = 0.0  # the 50-character rejected answer now scores lowest
    rho = length_bias(pair_outcomes(records, chosen, rejected)).spearman
    assert 0 < rho < 1


def test_format_bias_split_for_a_markdown_scorer():
    from crome.evaluate.reference import MarkdownWins

    records = [rec("plain-wins", chosen="Plain words.", rejected="## Title\n- **bold** point"),
               rec("fmt-wins", chosen="- one\n- two", rejected="just text"),
               rec("same", chosen="a", rejected="b"),
               rec("neutral", chosen="- x", rejected="y", label="tie")]
    scorer = MarkdownWins()
    outcomes = pair_outcomes(records, scorer.score(["q"] * 4, [r.chosen for r in records]),
                             scorer.score(["q"] * 4, [r.rejected for r in records]))
    assert [(o.fmt_chosen, o.fmt_rejected) for o in outcomes] == [(0, 3), (2, 0), (0, 0),
                                                                   (1, 0)]
    fb = format_bias(outcomes)
    assert (fb.n_chosen_more_formatted, fb.n_rejected_more_formatted, fb.n_same_format) == \
        (1, 1, 1)  # the tie-labelled record is no preference
    assert fb.accuracy_chosen_more_formatted == 1.0
    assert fb.accuracy_rejected_more_formatted == 0.0
    assert summarize(outcomes)["format_bias"]["n_same_format"] == 1


def test_spearman_undefined_cases():
    one = pair_outcomes([rec("a", chosen="aaa", rejected="b")], [1.0], [0.0])
    assert length_bias(one).spearman is None  # two answers only
    records = _length_pairs()
    flat = pair_outcomes(records, [1.0] * 6, [1.0] * 6)
    assert length_bias(flat).spearman is None  # constant rewards
    assert length_bias([]).accuracy_chosen_longer is None


def test_length_controlled_accuracy_bins():
    records = [
        rec("much-shorter", chosen="a" * 10, rejected="b" * 40),   # ratio 0.25: bin 0
        rec("shorter", chosen="a" * 7, rejected="b" * 10),         # 0.7: bin 1
        rec("similar-1", chosen="a" * 10, rejected="b" * 10),      # 1.0: bin 2
        rec("similar-2", chosen="a" * 11, rejected="b" * 10),      # 1.1: bin 2
        rec("edge", chosen="a" * 20, rejected="b" * 10),           # exactly 2.0: bin 4
        rec("much-longer", chosen="a" * 50, rejected="b" * 10),    # 5.0: bin 4
        rec("neutral", chosen="a" * 50, rejected="b" * 10, label="tie"),  # not counted
    ]
    chosen = [0, 1, 1, 0, 1, 1, 0]
    rejected = [1, 0, 0, 1, 0, 0, 0]
    lc = length_controlled_accuracy(pair_outcomes(records, chosen, rejected))
    assert [b.n for b in lc.bins] == [1, 1, 2, 0, 2]
    assert [b.accuracy for b in lc.bins] == [0.0, 1.0, 0.5, None, 1.0]
    assert (lc.bins[0].lo, lc.bins[0].hi) == (None, 0.5)
    assert (lc.bins[4].lo, lc.bins[4].hi) == (2.0, None)
    # Mean over the four non-empty bins, not the pooled 4/6.
    assert lc.accuracy == pytest.approx((0 + 1 + 0.5 + 1) / 4)


def test_length_controlled_edges():
    records = [rec("a", chosen="a" * 3, rejected="b" * 1)]
    outcomes = pair_outcomes(records, [1.0], [0.0])
    lc = length_controlled_accuracy(outcomes, edges=[1.0])
    assert [b.n for b in lc.bins] == [0, 1]
    assert length_controlled_accuracy([]).accuracy is None
    for bad in ([2.0, 1.0], [0.0, 1.0], [1.0, math.inf]):
        with pytest.raises(ValueError, match="edges"):
            length_controlled_accuracy(outcomes, edges=bad)


# --- summary ---------------------------------------------------------------------------

def test_summarize_is_json_and_names_missing_sections():
    records = [
        rec("n1", chosen="a" * 30, rejected="b" * 10, subset="llmbar-natural"),
        rec("n2", chosen="a" * 10, rejected="b" * 30, subset="llmbar-natural"),
        rec("m1", subset="math-prm"),
        rec("h1", subset="helpful-base"),
        rec("t1", subset="helpful-base", label="tie"),
    ]
    outcomes = pair_outcomes(records, [3, 1, 1, 1, 0], [1, 3, 1, 0, 4])
    summary = summarize(outcomes)
    text = json.dumps(summary, allow_nan=False)  # no NaN or inf sneaks in
    back = json.loads(text)
    assert back["n_records"] == 5 and back["n_pairs"] == 4
    assert back["accuracy"] == pytest.approx(2 / 4)
    assert back["ties"] == 1
    assert back["neutral"] == {"n": 1, "mean_abs_margin": 4.0}
    assert set(back["subsets"]) == {"llmbar-natural", "math-prm", "helpful-base"}
    rb = back["rewardbench"]
    assert rb["present"] == ["Chat Hard", "Reasoning"]
    assert rb["missing"] == ["Chat", "Safety"]
    assert rb["sections"] == {"Chat Hard": 0.5, "Reasoning": 0.0}
    assert rb["average"] == pytest.approx(0.25)
    assert rb["weights"]["math-prm"] == 984
    assert back["length_bias"]["n_chosen_longer"] == 3  # n1, m1, h1 ("good answer" is longer)
    assert len(back["length_controlled"]["bins"]) == 5


def test_summarize_without_rewardbench_names():
    outcomes = pair_outcomes([rec("a", subset="helpful-base")], [1.0], [0.0])
    assert summarize(outcomes)["rewardbench"] is None
