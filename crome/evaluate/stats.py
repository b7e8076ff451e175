"""Paired bootstrap confidence intervals over evaluation units and training seeds.

An experiment trains every arm with the same seeds and scores every arm on the same units
(held-out pairs, GSM8K questions). A difference between two arms is then estimated as in
paired designs: each bootstrap replicate draws the seeds (with replacement) and the units
(with replacement, within strata when the figure weights strata, as RewardBench sections
weight subsets), applies the *same* draw to both arms, and recomputes each arm's figure as
the mean over the drawn seeds. The 2.5 and 97.5 percentiles of the replicate differences
are the 95% interval. Drawing seeds captures training noise; drawing units captures the
finite evaluation set. With one seed only the units are drawn, and the interval says so by
being narrower than it should be: run three or more.

A figure is either *linear* (a weighted sum of per-unit values: accuracies, section scores,
mean perturbation drops, best-of-N pick rates; replicates are a matrix product) or any
statistic of the drawn units (the Spearman correlation of reward with length), computed
replicate by replicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# stat(values of one arm and seed: (n_units, k), drawn unit indices) -> figure
Statistic = Callable[[np.ndarray, np.ndarray], float]


@dataclass
class Figure:
    """One figure of an experiment: per-arm, per-seed values of the same units.

    ``values[arm]`` has shape ``(seeds, units)`` for a linear figure (one value per unit,
    combined with ``weights``) or ``(seeds, units, k)`` for a custom ``statistic``. Units
    are aligned across arms (the same held-out pair in the same column). ``strata`` groups
    units that are drawn separately (one int per unit; all zero when not stratified).
    """

    name: str
    values: dict[str, np.ndarray]
    weights: np.ndarray | None = None  # linear: per-unit weights summing to 1
    strata: np.ndarray | None = None
    statistic: Statistic | None = None
    n_units: int = field(init=False)
    scale: float = 100.0  # points for rates; 1 for correlations

    def __post_init__(self) -> None:
        shapes = {v.shape[:2] for v in self.values.values()}
        if len(shapes) != 1:
            raise ValueError(f"figure {self.name!r}: arms have different shapes {shapes}")
        (_, self.n_units), = shapes
        if (self.weights is None) == (self.statistic is None):
            raise ValueError(f"figure {self.name!r}: give weights or a statistic")

    def point(self, arm: str) -> float:
        """The figure of ``arm``: the mean over seeds of the figure on all units."""
        every = np.arange(self.n_units)
        return float(np.mean([self._one(v, every) for v in self.values[arm]]))

    def per_seed(self, arm: str) -> list[float]:
        every = np.arange(self.n_units)
        return [self._one(v, every) for v in self.values[arm]]

    def _one(self, v: np.ndarray, idx: np.ndarray) -> float:
        if self.statistic is not None:
            return self.statistic(v, idx)
        assert self.weights is not None
        return float(np.sum(v[idx] * self.weights[idx]) * self.n_units / len(idx))


@dataclass
class Draws:
    """Bootstrap draws shared by every arm of a figure: seeds and units per replicate."""

    seeds: np.ndarray  # (B, S) seed indices
    units: np.ndarray  # (B, n) unit indices, stratified when the figure is


def draw(figure: Figure, n_seeds: int, replicates: int, rng: np.random.Generator) -> Draws:
    n = figure.n_units
    seeds = rng.integers(0, n_seeds, size=(replicates, n_seeds))
    strata = figure.strata if figure.strata is not None else np.zeros(n, dtype=int)
    units = np.empty((replicates, n), dtype=np.int64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        picks = rng.integers(0, len(members), size=(replicates, len(members)))
        units[:, members] = members[picks]
    return Draws(seeds, units)


def replicates(figure: Figure, arm: str, draws: Draws) -> np.ndarray:
    """The figure of ``arm`` under each replicate's draw: shape ``(B,)``."""
    values = figure.values[arm]
    n_rep, n_seeds = draws.seeds.shape
    if figure.statistic is None:
        assert figure.weights is not None
        # counts[b, i]: how often unit i was drawn in replicate b; the figure on the draw is
        # sum_i counts * w_i * v_i (the draw keeps each stratum's size, so weights hold).
        counts = np.zeros((n_rep, figure.n_units))
        np.add.at(counts, (np.arange(n_rep)[:, None], draws.units), 1.0)
        per_seed = counts @ (values * figure.weights).T  # (B, S)
    else:
        per_seed = np.array([[figure.statistic(values[s], draws.units[b])
                              for s in range(n_seeds)] for b in range(n_rep)])
    picked = np.take_along_axis(per_seed, draws.seeds, axis=1)
    return picked.mean(axis=1)


@dataclass
class Difference:
    """``arm − reference`` on one figure: point estimate and paired bootstrap 95% CI."""

    figure: str
    arm: str
    reference: str
    diff: float
    low: float
    high: float
    replicates: int
    seeds: int
    units: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "arm": self.arm, "reference": self.reference,
                "diff": self.diff, "ci95": [self.low, self.high],
                "replicates": self.replicates, "seeds": self.seeds, "units": self.units}


def paired_differences(figure: Figure, pairs: Sequence[tuple[str, str]], replicates_n: int = 1000,
                       seed: int = 0) -> list[Difference]:
    """``arm − reference`` for each ``(arm, reference)`` in ``pairs``, each with a paired
    bootstrap 95% CI from one shared set of draws (so the intervals are comparable)."""
    if not pairs:
        return []
    n_seeds = next(iter(figure.values.values())).shape[0]
    rng = np.random.default_rng(seed)
    draws = draw(figure, n_seeds, replicates_n, rng)
    cache: dict[str, np.ndarray] = {}

    def reps(arm: str) -> np.ndarray:
        if arm not in cache:
            cache[arm] = replicates(figure, arm, draws)
        return cache[arm]

    out = []
    for arm, ref in pairs:
        delta = reps(arm) - reps(ref)
        low, high = np.percentile(delta, [2.5, 97.5])
        out.append(Difference(figure.name, arm, ref, figure.point(arm) - figure.point(ref),
                              float(low), float(high), replicates_n, n_seeds,
                              figure.n_units))
    return out


def spearman_statistic(values: np.ndarray, idx: np.ndarray) -> float:
    """Spearman correlation of reward with length over the drawn pairs' answers.

    ``values[:, 0:2]`` are the rewards of the two answers, ``values[:, 2:4]`` their lengths.
    """
    v = values[idx]
    rewards = np.concatenate([v[:, 0], v[:, 1]])
    lengths = np.concatenate([v[:, 2], v[:, 3]])
    return _pearson(_ranks(rewards), _ranks(lengths))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    # Positions where a new value starts; every run of equal values gets its mean position.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends - 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom else 0.0


def format_value(value: float, scale: float) -> str:
    """A figure as shown in tables: points with one decimal, a correlation with two."""
    return f"{value:+.2f}" if scale == 1.0 else f"{scale * value:.1f}"


def format_difference(diff: float, low: float, high: float, scale: float) -> str:
    """``+1.2 [-0.3, +2.8]``: a difference and its 95% CI, on the figure's scale."""
    if scale == 1.0:
        return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{scale * diff:+.1f} [{scale * low:+.1f}, {scale * high:+.1f}]"
