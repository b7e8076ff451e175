"""Pairwise accuracy, RewardBench sections and length bias, computed from scores alone.

Everything here is a pure function of the records and the two rewards per record, so the
same numbers come out whatever model produced the scores (a trained RM, a reference scorer,
scores read back from disk), and a metric can be tested with hand-made numbers.

Conventions, each chosen because the common alternative hides a failure:

* A preference pair is correct only when ``r_chosen > r_rejected``. Exactly equal rewards
  are a *tie*: counted as wrong (a model that gives every answer the same reward must score
  0, not 50% or 100%) and reported separately, so a collapsed model is easy to see.
* Tie-labelled records (Crome's neutral pairs) have no right answer; they never enter an
  accuracy. What is reported for them is ``|r_1 - r_2|``, which a style-invariant model
  keeps small.
* Accuracies are fractions in [0, 1], never percentages, and ``None`` where nothing was
  counted (never a silent 0).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from scipy import stats

from crome.data.schema import PairRecord
from crome.evaluate.reference import markdown_features

Outcome = Literal["correct", "wrong", "tie", "neutral"]

# --- RewardBench -----------------------------------------------------------------------
# Subset-to-section mapping of RewardBench v1, as in allenai/reward-bench
# ``rewardbench/constants.py`` (``SUBSET_MAPPING``), used by ``calculate_scores_per_section``
# in ``rewardbench/utils.py``.
REWARDBENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": (
        "alpacaeval-easy",
        "alpacaeval-length",
        "alpacaeval-hard",
        "mt-bench-easy",
        "mt-bench-med",
    ),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": (
        "math-prm",
        "hep-cpp",
        "hep-go",
        "hep-java",
        "hep-js",
        "hep-python",
        "hep-rust",
    ),
}
# math-prm has 447 pairs but RewardBench weights it as 984 = 6 x 164, the size of its six
# HumanEvalPack code subsets, so that math and code each make up half of "Reasoning".
MATH_PRM_WEIGHT = 984
_SUBSET_TO_SECTION = {s: sec for sec, subs in REWARDBENCH_SECTIONS.items() for s in subs}

# Default length-ratio bin edges (len_chosen / len_rejected): symmetric in log space
# (0.5 = 1/2, 0.8 = 1/1.25), so "chosen twice as long" and "rejected twice as long" are
# mirror bins and the middle bin holds pairs within 25% of each other's length.
DEFAULT_LENGTH_RATIO_EDGES: tuple[float, ...] = (0.5, 0.8, 1.25, 2.0)


@dataclass(frozen=True)
class PairOutcome:
    """How one record fared under a scorer.

    ``margin`` is ``reward_chosen - reward_rejected``; for a neutral (tie-labelled) record
    the two sides have no order and only ``abs_margin`` means anything.
    """

    id: str
    subset: str
    label: str
    reward_chosen: float
    reward_rejected: float
    margin: float
    outcome: Outcome
    len_chosen: int
    len_rejected: int
    fmt_chosen: int = 0  # markdown features (crome.evaluate.reference.markdown_features)
    fmt_rejected: int = 0

    @property
    def abs_margin(self) -> float:
        return abs(self.margin)

    @property
    def is_preference(self) -> bool:
        return self.outcome != "neutral"

    def to_dict(self) -> dict[str, Any]:
        """A per-example log row (JSON-serialisable)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SubsetScore:
    """Counts for one group of records.

    ``n`` counts preference pairs only; ``accuracy = correct / n`` with ties counted as
    wrong, ``None`` when the group holds no preference pair. Neutral records are counted in
    ``neutral`` with their mean ``|margin|``.
    """

    n: int
    correct: int
    ties: int
    accuracy: float | None
    neutral: int = 0
    neutral_mean_abs_margin: float | None = None


@dataclass(frozen=True)
class LengthBias:
    """Does the scorer prefer longer answers?

    Accuracy is split by which side of a preference pair is longer (in characters); pairs of
    equal length go to neither side and are counted in ``n_same_length``. An unbiased scorer
    does about as well on both sides; a length-biased one does well where the chosen answer
    is longer and badly where the rejected one is.

    ``spearman`` is the rank correlation of reward with answer length over every scored
    answer (chosen and rejected sides of all records, neutral ones included), ``None`` when
    it is undefined (fewer than 3 answers, or constant rewards or lengths).
    """

    n_chosen_longer: int
    accuracy_chosen_longer: float | None
    n_rejected_longer: int
    accuracy_rejected_longer: float | None
    n_same_length: int
    n_answers: int
    spearman: float | None


@dataclass(frozen=True)
class FormatBias:
    """Does the scorer prefer more formatted answers?

    As :class:`LengthBias`, with "more formatted" meaning more markdown features (headings,
    bullets, bold … counted by :func:`crome.evaluate.reference.markdown_features`). Most
    pairs of plain chat data have equal counts (usually none): ``n_same_format``.
    """

    n_chosen_more_formatted: int
    accuracy_chosen_more_formatted: float | None
    n_rejected_more_formatted: int
    accuracy_rejected_more_formatted: float | None
    n_same_format: int


@dataclass(frozen=True)
class LengthBin:
    """Preference pairs with ``lo <= len_chosen / len_rejected < hi`` (``None``: open end)."""

    lo: float | None
    hi: float | None
    n: int
    correct: int
    accuracy: float | None


@dataclass(frozen=True)
class LengthControlled:
    """Mean of per-bin accuracies over the non-empty length-ratio bins.

    Every length regime weighs the same however many pairs it holds, so a scorer cannot
    score well just because a data set happens to be dominated by pairs whose chosen answer
    is longer. ``None`` when there is no preference pair.
    """

    accuracy: float | None
    bins: list[LengthBin]


# --- outcomes --------------------------------------------------------------------------

def pair_outcomes(records: Sequence[PairRecord], chosen: Sequence[float],
                  rejected: Sequence[float]) -> list[PairOutcome]:
    """Judge each record from the rewards of its two answers.

    ``chosen[i]`` and ``rejected[i]`` are the rewards of ``records[i].chosen`` and
    ``records[i].rejected``. A non-finite reward is an error rather than a wrong answer:
    NaN compares false with everything and would otherwise pass as a plain miss.
    """
    if not len(records) == len(chosen) == len(rejected):
        raise ValueError(f"lengths differ: {len(records)} records, {len(chosen)} chosen "
                         f"rewards, {len(rejected)} rejected rewards")
    out: list[PairOutcome] = []
    for rec, rc_raw, rr_raw in zip(records, chosen, rejected):
        rc, rr = float(rc_raw), float(rr_raw)
        if not (math.isfinite(rc) and math.isfinite(rr)):
            raise ValueError(f"record {rec.id!r}: non-finite reward (chosen={rc}, "
                             f"rejected={rr})")
        outcome: Outcome
        if rec.label == "tie":
            outcome = "neutral"
        elif rc > rr:
            outcome = "correct"
        elif rc == rr:
            outcome = "tie"
        else:
            outcome = "wrong"
        out.append(PairOutcome(
            id=rec.id, subset=rec.subset, label=rec.label, reward_chosen=rc,
            reward_rejected=rr, margin=rc - rr, outcome=outcome,
            len_chosen=len(rec.chosen), len_rejected=len(rec.rejected),
            fmt_chosen=_format_count(rec.chosen), fmt_rejected=_format_count(rec.rejected)))
    return out


def _format_count(text: str) -> int:
    return sum(markdown_features(text).values())


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _tally(outcomes: Iterable[PairOutcome]) -> SubsetScore:
    n = correct = ties = neutral = 0
    abs_margin_sum = 0.0
    for o in outcomes:
        if o.outcome == "neutral":
            neutral += 1
            abs_margin_sum += o.abs_margin
            continue
        n += 1
        correct += o.outcome == "correct"
        ties += o.outcome == "tie"
    return SubsetScore(n=n, correct=correct, ties=ties, accuracy=_ratio(correct, n),
                       neutral=neutral,
                       neutral_mean_abs_margin=abs_margin_sum / neutral if neutral else None)


# Records without a subset are grouped under this name rather than under "".
NO_SUBSET = "(none)"


def subset_accuracy(outcomes: Iterable[PairOutcome]) -> dict[str, SubsetScore]:
    """Scores per subset, in order of first appearance (no "all" entry: see
    :func:`overall_accuracy`)."""
    groups: dict[str, list[PairOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.subset or NO_SUBSET, []).append(o)
    return {name: _tally(group) for name, group in groups.items()}


def overall_accuracy(outcomes: Iterable[PairOutcome]) -> float | None:
    """Accuracy over all preference pairs pooled (each pair weighs the same), ties wrong."""
    return _tally(outcomes).accuracy


# --- RewardBench sections --------------------------------------------------------------

def rewardbench_weights(scores: Mapping[str, SubsetScore]) -> dict[str, float]:
    """The weight each RewardBench subset present gets inside its section.

    RewardBench weights a subset by its *official* example count (``EXAMPLE_COUNTS``). Crome
    weights it by the number of pairs actually scored (``SubsetScore.n``), because it is
    often run on part of RewardBench (the LLMBar files, a sample): the official count of an
    absent or sampled subset would weigh examples that were never scored. On the full data
    the two agree, with one exception in reward-bench itself: its ``EXAMPLE_COUNTS`` has the
    xstest counts swapped (should-refuse 250, should-respond 154, where the filtered set has
    154 and 250), so Safety here can differ from the leaderboard by a fraction of a point.

    The one deliberate up-weighting is kept: ``math-prm`` weighs :data:`MATH_PRM_WEIGHT`
    (984) whatever its count, as in RewardBench. Subsets with no preference pair and subsets
    outside the mapping get no weight.
    """
    weights: dict[str, float] = {}
    for name, score in scores.items():
        if name not in _SUBSET_TO_SECTION or score.n == 0:
            continue
        weights[name] = float(MATH_PRM_WEIGHT if name == "math-prm" else score.n)
    return weights


def rewardbench_sections(scores: Mapping[str, SubsetScore]) -> dict[str, float] | None:
    """RewardBench section scores and their average, or ``None`` if no subset has a
    RewardBench name.

    A section's score is the weighted mean of its subsets' accuracies, with the weights of
    :func:`rewardbench_weights`. The keys are the sections present (in the order Chat, Chat
    Hard, Safety, Reasoning), so a missing key means a missing section, plus ``"average"``:
    the unweighted mean of the sections present. RewardBench's headline is the average of
    all four; an ``"average"`` over fewer sections is not comparable to it, and
    :func:`summarize` lists the missing ones. Fractions in [0, 1].
    """
    weights = rewardbench_weights(scores)
    if not weights:
        return None
    out: dict[str, float] = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in weights]
        if not present:
            continue
        total = sum(weights[s] for s in present)
        weighted = sum(weights[s] * (scores[s].accuracy or 0.0) for s in present)
        out[section] = weighted / total
    out["average"] = sum(out.values()) / len(out)
    return out


# --- length ----------------------------------------------------------------------------

def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = float(stats.spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def length_bias(outcomes: Sequence[PairOutcome]) -> LengthBias:
    """Accuracy split by which answer is longer, and reward-length rank correlation."""
    chosen_longer = [o for o in outcomes if o.is_preference and o.len_chosen > o.len_rejected]
    rejected_longer = [o for o in outcomes
                       if o.is_preference and o.len_rejected > o.len_chosen]
    same = sum(1 for o in outcomes if o.is_preference and o.len_chosen == o.len_rejected)
    lengths = [float(v) for o in outcomes for v in (o.len_chosen, o.len_rejected)]
    rewards = [r for o in outcomes for r in (o.reward_chosen, o.reward_rejected)]
    return LengthBias(
        n_chosen_longer=len(chosen_longer),
        accuracy_chosen_longer=_tally(chosen_longer).accuracy,
        n_rejected_longer=len(rejected_longer),
        accuracy_rejected_longer=_tally(rejected_longer).accuracy,
        n_same_length=same,
        n_answers=len(lengths),
        spearman=_spearman(lengths, rewards),
    )


def format_bias(outcomes: Sequence[PairOutcome]) -> FormatBias:
    """Accuracy split by which answer of a preference pair carries more markdown."""
    prefs = [o for o in outcomes if o.is_preference]
    chosen_more = [o for o in prefs if o.fmt_chosen > o.fmt_rejected]
    rejected_more = [o for o in prefs if o.fmt_rejected > o.fmt_chosen]
    return FormatBias(
        n_chosen_more_formatted=len(chosen_more),
        accuracy_chosen_more_formatted=_tally(chosen_more).accuracy,
        n_rejected_more_formatted=len(rejected_more),
        accuracy_rejected_more_formatted=_tally(rejected_more).accuracy,
        n_same_format=len(prefs) - len(chosen_more) - len(rejected_more),
    )


def length_controlled_accuracy(
        outcomes: Iterable[PairOutcome],
        edges: Sequence[float] = DEFAULT_LENGTH_RATIO_EDGES) -> LengthControlled:
    """Accuracy averaged over fixed bins of the length ratio ``len_chosen / len_rejected``.

    ``edges`` are the inner bin boundaries as length ratios (k edges make k + 1 bins; the
    default makes 5). The bins are fixed rather than quantiles so that numbers from two data
    sets or two models are taken over the same length regimes. Binning by ratio is binning
    by log ratio, since the log is monotone. An empty answer counts as one character.
    """
    cuts = [float(e) for e in edges]
    if any(e <= 0 or not math.isfinite(e) for e in cuts) or \
            any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"edges must be finite, positive and strictly increasing: {cuts}")
    counts = [[0, 0] for _ in range(len(cuts) + 1)]
    for o in outcomes:
        if not o.is_preference:
            continue
        ratio = max(o.len_chosen, 1) / max(o.len_rejected, 1)
        cell = counts[bisect.bisect_right(cuts, ratio)]
        cell[0] += 1
        cell[1] += o.outcome == "correct"
    bounds: list[float | None] = [None, *cuts, None]
    bins = [LengthBin(lo=bounds[i], hi=bounds[i + 1], n=n, correct=c, accuracy=_ratio(c, n))
            for i, (n, c) in enumerate(counts)]
    accs = [b.accuracy for b in bins if b.accuracy is not None]
    return LengthControlled(accuracy=sum(accs) / len(accs) if accs else None, bins=bins)


# --- summary ---------------------------------------------------------------------------

def summarize(outcomes: Sequence[PairOutcome]) -> dict[str, Any]:
    """Every metric above in one JSON-serialisable dict (for reports and result files).

    ``rewardbench`` is ``None`` unless some subset carries a RewardBench name; otherwise it
    holds the section scores, their ``average``, and which sections are ``present`` and
    ``missing``.
    """
    total = _tally(outcomes)
    per_subset = subset_accuracy(outcomes)
    sections = rewardbench_sections(per_subset)
    rewardbench: dict[str, Any] | None = None
    if sections is not None:
        average = sections.pop("average")
        rewardbench = {
            "sections": sections,
            "average": average,
            "present": list(sections),
            "missing": [s for s in REWARDBENCH_SECTIONS if s not in sections],
            "weights": rewardbench_weights(per_subset),
        }
    lc = length_controlled_accuracy(outcomes)
    return {
        "n_records": len(outcomes),
        "n_pairs": total.n,
        "accuracy": total.accuracy,
        "correct": total.correct,
        "ties": total.ties,
        "neutral": {"n": total.neutral, "mean_abs_margin": total.neutral_mean_abs_margin},
        "subsets": {name: dataclasses.asdict(s) for name, s in per_subset.items()},
        "rewardbench": rewardbench,
        "length_bias": dataclasses.asdict(length_bias(outcomes)),
        "format_bias": dataclasses.asdict(format_bias(outcomes)),
        "length_controlled": {"accuracy": lc.accuracy,
                              "bins": [dataclasses.asdict(b) for b in lc.bins]},
    }
