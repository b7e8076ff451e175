"""The ambiguity filter (Crome step 4): keep the augmented pairs a baseline RM finds hard.

A baseline RM trained on the original pairs scores every augmented pair, and both thresholds
are stated in one unit: the probability the baseline gives one answer of beating the other,
``σ(r_1 − r_2)``.

* A **preference** pair is kept when the baseline's probability of its label,
  ``P = σ(r_chosen − r_rejected)``, is below ``tau``: the baseline gets it wrong or is unsure.
* A **tie** is kept when the baseline favours one of its answers with probability at least
  ``tie_tau``, ``max(σ(m), σ(−m)) ≥ tie_tau``: the label says neither is better, and the
  baseline disagrees. At ``tie_tau = 0.6`` that is a margin of ``|m| ≥ 0.405``.

Pairs the baseline already gets right carry little signal and are dropped (written to
``<output>.dropped.jsonl``). The report counts kept and dropped pairs per recipe, attribute and
direction, and, for the causal rewrites of each direction, the length of the rewrite against
the answer it was made from: upgrades that grow the answer would teach "longer wins" again.

A pairwise baseline (``crome.pairwise``) gives its probabilities directly: ``P(chosen ≻
rejected)`` for a preference pair, and for a tie the larger of ``P(first ≻ second)`` and
``P(second ≻ first)``, both orders averaged.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crome.data.io import write_pairs
from crome.data.schema import PairRecord
from crome.model import RewardModel
from crome.score import ScoreOptions, score_pairs


@dataclass
class FilterOptions:
    tau: float = 0.95  # keep preference pairs with P(label) < tau
    tie_tau: float = 0.6  # keep ties where the baseline favours an answer with P >= tie_tau
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau is a probability, got {self.tau}")
        if not 0.5 <= self.tie_tau <= 1.0:
            raise ValueError(f"tie_tau is the probability of the favoured answer, between 0.5 "
                             f"and 1, got {self.tie_tau}")


@dataclass
class FilterReport:
    tau: float
    tie_tau: float
    baseline: str
    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    # causal direction -> (rewrite length / source answer length, chosen longer?) per pair
    lengths: dict[str, dict[str, list[tuple[float, bool]]]] = field(default_factory=dict)

    def add(self, rec: PairRecord, keep: bool) -> None:
        (self.kept if keep else self.dropped)[group_of(rec)] += 1
        ratio = rewrite_length_ratio(rec)
        if ratio is not None:
            by_fate = self.lengths.setdefault(rec.provenance["direction"],
                                              {"kept": [], "dropped": []})
            by_fate["kept" if keep else "dropped"].append(
                (ratio, len(rec.chosen) > len(rec.rejected)))

    def length_table(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """Per direction and fate: pairs, the median rewrite/source length ratio and the
        share of pairs whose chosen answer is the longer one."""
        def stats(rows: list[tuple[float, bool]]) -> dict[str, float | int | None]:
            return {"pairs": len(rows),
                    "median_length_ratio": round(statistics.median(r for r, _ in rows), 3)
                    if rows else None,
                    "chosen_longer": round(sum(c for _, c in rows) / len(rows), 3)
                    if rows else None}
        return {d: {fate: stats(rows) for fate, rows in fates.items()}
                for d, fates in sorted(self.lengths.items())}

    def to_dict(self) -> dict[str, Any]:
        groups = sorted(set(self.kept) | set(self.dropped))
        return {"tau": self.tau, "tie_tau": self.tie_tau, "baseline": self.baseline,
                "kept": sum(self.kept.values()), "dropped": sum(self.dropped.values()),
                "groups": {g: {"kept": self.kept[g], "dropped": self.dropped[g],
                               "keep_rate": round(self.kept[g]
                                                  / (self.kept[g] + self.dropped[g]), 3)}
                           for g in groups},
                "rewrite_lengths": self.length_table()}

    def summary(self) -> str:
        d = self.to_dict()
        lines = [f"filter (preferences kept at P(label) < {self.tau}, ties kept where one "
                 f"answer has P ≥ {self.tie_tau}; baseline {self.baseline}): "
                 f"kept {d['kept']}, dropped {d['dropped']}"]
        for g, c in d["groups"].items():
            lines.append(f"  {g}: kept {c['kept']}, dropped {c['dropped']} "
                         f"({100 * c['keep_rate']:.0f}% kept)")
        for direction, fates in d["rewrite_lengths"].items():
            kept = fates["kept"]
            if kept["pairs"]:
                lines.append(f"  kept {direction} rewrites: median length "
                             f"{kept['median_length_ratio']:.2f}× their source answer; chosen "
                             f"answer longer in {100 * kept['chosen_longer']:.0f}%")
        return "\n".join(lines)


def group_of(rec: PairRecord) -> str:
    """``recipe/attribute/direction`` from provenance (``original`` for a source pair)."""
    prov = rec.provenance
    parts = [prov.get("recipe") or "original", prov.get("attribute") or "",
             prov.get("direction") or ""]
    return "/".join(p for p in parts if p)


def rewrite_length_ratio(rec: PairRecord) -> float | None:
    """A causal rewrite's length over the answer it was made from (``None`` for other pairs):
    a degrade rewrites the chosen answer into the rejected one, an upgrade the rejected one
    into the chosen one."""
    direction = rec.provenance.get("direction")
    if rec.provenance.get("recipe") != "causal" or direction not in ("degrade", "upgrade"):
        return None
    rewrite, source = ((rec.rejected, rec.chosen) if direction == "degrade"
                       else (rec.chosen, rec.rejected))
    return len(rewrite) / max(len(source), 1)


def label_confidence(rec: PairRecord, chosen: float, rejected: float) -> float:
    """The baseline's probability in the filter's unit: of the label for a preference
    (``σ(m)``), of the answer it favours for a tie (``max(σ(m), σ(−m))``)."""
    margin = chosen - rejected
    if rec.label == "tie":
        margin = abs(margin)
    return 1.0 / (1.0 + math.exp(-margin))


def is_kept(rec: PairRecord, probability: float, options: FilterOptions) -> bool:
    """A preference the baseline is unsure of or gets wrong; a tie it does not see as one."""
    if rec.label == "tie":
        return probability >= options.tie_tau
    return probability < options.tau


def filter_pairs(records: Sequence[PairRecord], baseline: RewardModel,
                 options: FilterOptions | None = None, baseline_name: str = "baseline"
                 ) -> tuple[list[PairRecord], list[PairRecord], FilterReport]:
    """Split ``records`` into (kept, dropped); kept records carry their score in
    ``provenance["filter"]``."""
    opts = options or FilterOptions()
    report = FilterReport(tau=opts.tau, tie_tau=opts.tie_tau, baseline=baseline_name)
    score_opts = ScoreOptions(batch_size=opts.batch_size)
    if baseline.pairwise:  # its own probabilities of "first better" and "second better"
        from crome.pairwise import compare_texts

        prefs = compare_texts(baseline, [r.prompt for r in records],
                              [r.chosen for r in records], [r.rejected for r in records],
                              score_opts)
        chosen, rejected = [p.first for p in prefs], [p.second for p in prefs]
        confidence = [max(p.first, p.second) if rec.label == "tie" else p.first
                      for rec, p in zip(records, prefs)]
    else:
        chosen, rejected = score_pairs(baseline, records, score_opts)
        confidence = [label_confidence(rec, c, r)
                      for rec, c, r in zip(records, chosen, rejected)]
    kept: list[PairRecord] = []
    dropped: list[PairRecord] = []
    for rec, c, r, conf in zip(records, chosen, rejected, confidence):
        # a tie's probability is that of the answer the baseline favours
        name = "p_favoured" if rec.label == "tie" else "p_label"
        rec.provenance = {**rec.provenance, "filter": {
            name: round(conf, 4), "margin": round(c - r, 4), "baseline": baseline_name}}
        keep = is_kept(rec, conf, opts)
        (kept if keep else dropped).append(rec)
        report.add(rec, keep)
    return kept, dropped, report


def dropped_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.name + ".dropped.jsonl")


def filter_file(records: Sequence[PairRecord], baseline_dir: str | Path, output: str | Path,
                options: FilterOptions | None = None) -> FilterReport:
    rm = RewardModel.load(baseline_dir)
    kept, dropped, report = filter_pairs(records, rm, options, Path(baseline_dir).name)
    write_pairs(kept, output)
    write_pairs(dropped, dropped_path(output))
    return report
