"""The ambiguity filter (Crome step 4): keep the augmented pairs a baseline RM finds hard.

A baseline RM trained on the original pairs scores every augmented pair. For a preference
pair, the baseline's confidence in the label is ``P = σ(r_chosen − r_rejected)``; for a tie,
``P = 1 − |2σ(r_1 − r_2) − 1|`` (1 when the two rewards are equal, 0 when it is certain one
answer is better). A pair is kept when ``P < τ``: the baseline gets it wrong or is unsure, so
the pair teaches the new RM something. Pairs the baseline already ranks confidently carry
little signal and are dropped (written to ``<output>.dropped.jsonl``, counted per recipe,
attribute and direction).

A pairwise baseline (``crome.pairwise``) gives its confidence directly: ``P(chosen ≻
rejected)`` for a preference pair and ``P(tie)`` for a tie, both orders averaged.
"""

from __future__ import annotations

import math
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
    tie_tau: float | None = None  # the same for ties; None = tau
    batch_size: int = 64


@dataclass
class FilterReport:
    tau: float
    tie_tau: float
    baseline: str
    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        groups = sorted(set(self.kept) | set(self.dropped))
        return {"tau": self.tau, "tie_tau": self.tie_tau, "baseline": self.baseline,
                "kept": sum(self.kept.values()), "dropped": sum(self.dropped.values()),
                "groups": {g: {"kept": self.kept[g], "dropped": self.dropped[g]}
                           for g in groups}}

    def summary(self) -> str:
        d = self.to_dict()
        lines = [f"filter (τ={self.tau}, ties τ={self.tie_tau}, baseline {self.baseline}): "
                 f"kept {d['kept']}, dropped {d['dropped']}"]
        for g, c in d["groups"].items():
            lines.append(f"  {g}: kept {c['kept']}, dropped {c['dropped']}")
        return "\n".join(lines)


def group_of(rec: PairRecord) -> str:
    """``recipe/attribute/direction`` from provenance (``original`` for a source pair)."""
    prov = rec.provenance
    parts = [prov.get("recipe") or "original", prov.get("attribute") or "",
             prov.get("direction") or ""]
    return "/".join(p for p in parts if p)


def label_confidence(rec: PairRecord, chosen: float, rejected: float) -> float:
    margin = chosen - rejected
    if rec.label == "tie":  # 1 − |2σ(m) − 1| = 1 − tanh(|m| / 2), symmetric in the two answers
        return 1.0 - math.tanh(abs(margin) / 2.0)
    return 1.0 / (1.0 + math.exp(-margin))


def filter_pairs(records: Sequence[PairRecord], baseline: RewardModel,
                 options: FilterOptions | None = None, baseline_name: str = "baseline"
                 ) -> tuple[list[PairRecord], list[PairRecord], FilterReport]:
    """Split ``records`` into (kept, dropped); kept records carry their score in
    ``provenance["filter"]``."""
    opts = options or FilterOptions()
    tie_tau = opts.tau if opts.tie_tau is None else opts.tie_tau
    report = FilterReport(tau=opts.tau, tie_tau=tie_tau, baseline=baseline_name)
    score_opts = ScoreOptions(batch_size=opts.batch_size)
    if baseline.pairwise:  # its own probabilities: P(chosen ≻ rejected), or P(tie) for a tie
        from crome.pairwise import compare_texts

        prefs = compare_texts(baseline, [r.prompt for r in records],
                              [r.chosen for r in records], [r.rejected for r in records],
                              score_opts)
        chosen, rejected = [p.first for p in prefs], [p.second for p in prefs]
        confidence = [p.tie if rec.label == "tie" else p.first
                      for rec, p in zip(records, prefs)]
    else:
        chosen, rejected = score_pairs(baseline, records, score_opts)
        confidence = [label_confidence(rec, c, r)
                      for rec, c, r in zip(records, chosen, rejected)]
    kept: list[PairRecord] = []
    dropped: list[PairRecord] = []
    for rec, c, r, conf in zip(records, chosen, rejected, confidence):
        rec.provenance = {**rec.provenance, "filter": {
            "p_label": round(conf, 4), "margin": round(c - r, 4), "baseline": baseline_name}}
        keep = conf < (tie_tau if rec.label == "tie" else opts.tau)
        (kept if keep else dropped).append(rec)
        (report.kept if keep else report.dropped)[group_of(rec)] += 1
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
