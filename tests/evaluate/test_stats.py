"""Paired bootstrap over units and seeds (crome.evaluate.stats) and the experiment's figures."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats as sps

from crome.evaluate.metrics import REWARDBENCH_SECTIONS, PairOutcome, summarize
from crome.evaluate.stats import (
    Figure,
    draw,
    paired_differences,
    replicates,
    spearman_statistic,
)
from crome.experiment import rewardbench_figures


def _linear(values: dict[str, np.ndarray], strata: np.ndarray | None = None) -> Figure:
    n = next(iter(values.values())).shape[1]
    return Figure("acc", values, weights=np.full(n, 1 / n), strata=strata)


def test_point_is_the_mean_over_seeds_of_the_mean_over_units():
    v = np.array([[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=float)
    f = _linear({"a": v})
    assert f.per_seed("a") == pytest.approx([0.75, 0.5, 1.0])
    assert f.point("a") == pytest.approx(0.75)


def test_linear_replicates_equal_the_figure_recomputed_on_each_draw():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 2, size=(3, 50)).astype(float)
    strata = np.repeat([0, 1], 25)
    f = _linear({"a": v}, strata)
    draws = draw(f, 3, 20, np.random.default_rng(2))
    reps = replicates(f, "a", draws)
    for b in range(20):
        by_hand = np.mean([v[s, draws.units[b]].mean() for s in draws.seeds[b]])
        assert reps[b] == pytest.approx(by_hand)


def test_stratified_draws_stay_inside_their_stratum():
    strata = np.array([0] * 5 + [1] * 30 + [2] * 2)
    f = _linear({"a": np.zeros((1, len(strata)))}, strata)
    draws = draw(f, 1, 50, np.random.default_rng(0))
    for b in range(50):
        assert (strata[draws.units[b]] == strata).all()


def test_an_arm_against_itself_has_a_zero_interval():
    v = np.random.default_rng(0).integers(0, 2, size=(3, 40)).astype(float)
    (d,) = paired_differences(_linear({"a": v, "b": v.copy()}), [("a", "b")], 200)
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.excludes_zero


def test_pairing_makes_a_consistent_small_gain_significant():
    # b is a plus one unit of 200 in every seed: unpaired noise would swamp 0.5 points,
    # the paired difference cannot be negative.
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, size=(3, 200)).astype(float)
    b = a.copy()
    for s in range(3):
        b[s, np.flatnonzero(a[s] == 0)[0]] = 1.0
    (d,) = paired_differences(_linear({"a": a, "b": b}), [("b", "a")], 500)
    assert d.diff == pytest.approx(1 / 200)
    assert d.low >= 0 and d.high > 0


def test_noise_between_seeds_widens_the_interval():
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2, size=200).astype(float)
    steady = np.stack([base] * 3)
    shaky = np.stack([np.where(rng.random(200) < 0.3, 1 - base, base) for _ in range(3)])
    narrow, = paired_differences(_linear({"x": steady, "ref": np.stack([base] * 3)}),
                                 [("x", "ref")], 500)
    wide, = paired_differences(_linear({"x": shaky, "ref": np.stack([base] * 3)}),
                               [("x", "ref")], 500)
    assert narrow.high - narrow.low == 0
    assert wide.high - wide.low > 0.05
    assert wide.low < wide.diff < wide.high


def test_spearman_statistic_matches_scipy_with_ties():
    rng = np.random.default_rng(5)
    v = np.column_stack([rng.normal(size=30), rng.normal(size=30),
                         rng.integers(1, 6, size=30), rng.integers(1, 6, size=30)])
    idx = rng.integers(0, 30, size=30)
    ours = spearman_statistic(v, idx)
    x = np.concatenate([v[idx, 0], v[idx, 1]])
    y = np.concatenate([v[idx, 2], v[idx, 3]])
    assert ours == pytest.approx(sps.spearmanr(x, y).statistic)


def test_figures_refuse_misaligned_arms():
    with pytest.raises(ValueError, match="different shapes"):
        _linear({"a": np.zeros((2, 5)), "b": np.zeros((2, 6))})


def test_rewardbench_figures_agree_with_crome_eval_sections():
    """The experiment's section figures (with strata and weights) give the numbers that
    ``crome eval`` reports for the same outcomes, including math-prm's fixed weight."""
    rng = random.Random(0)
    subsets = [s for subs in REWARDBENCH_SECTIONS.values() for s in subs]
    rows, outcomes = [], []
    for i in range(600):
        subset = subsets[i % len(subsets)]
        good = rng.random() < 0.3 + 0.5 * (subset in REWARDBENCH_SECTIONS["Safety"])
        o = PairOutcome(id=f"rb/{i}", subset=subset, label="chosen",
                        reward_chosen=1.0 if good else 0.0, reward_rejected=0.5,
                        margin=0.5 if good else -0.5, outcome="correct" if good else "wrong",
                        len_chosen=10, len_rejected=12)
        outcomes.append(o)
        rows.append(o.to_dict())
    expected = summarize(outcomes)["rewardbench"]
    figures = rewardbench_figures({("vanilla", 0): rows}, ["vanilla"], [0])
    got = {f.name.split(" (")[0].removeprefix("RewardBench "): f.point("vanilla")
           for f in figures}
    for section, value in expected["sections"].items():
        assert got[section] == pytest.approx(value)
    assert got["average"] == pytest.approx(expected["average"])
