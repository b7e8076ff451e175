"""``crome eval``: score held-out pairs with any scorer and write per-example and summary files.

A scorer is anything with ``name`` and ``score(prompts, answers)``: a trained RM
(:class:`crome.score.RewardModelScorer`) or a reference scorer that shows bias; or a pairwise
model with ``compare(prompts, firsts, seconds)`` (:class:`crome.pairwise.PairwiseScorer`). Results are
per eval set (``helpful-base``, ``llmbar`` …) with subsets inside; ``headline`` rows pool the
subsets people quote (e.g. the four LLMBar Adversarial files, 319 pairs).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crome.data.schema import PairRecord
from crome.data.sources import LLMBAR_ADVERSARIAL, SOURCES, load_named
from crome.evaluate.metrics import (
    PairOutcome,
    overall_accuracy,
    pair_outcomes,
    summarize,
)
from crome.evaluate.reference import (
    Comparer,
    Scorer,
    compare_pairs,
    is_comparer,
    score_pairs,
)

# The held-out sets of the quickstart (../shared/data/README.md: never used for training).
HELD_OUT = ("hh-rlhf/helpful-base", "hh-rlhf/harmless-base", "ultrafeedback/eval", "llmbar",
            "xstest")

# Rows of the headline table: (label, eval set, subsets pooled or None for all).
HEADLINE_ROWS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("helpful-base", "hh-rlhf/helpful-base", None),
    ("harmless-base", "hh-rlhf/harmless-base", None),
    ("UltraFeedback eval", "ultrafeedback/eval", None),
    ("LLMBar Natural", "llmbar", ("llmbar-natural",)),
    ("LLMBar Adversarial", "llmbar", LLMBAR_ADVERSARIAL),
    ("LLMBar Processed", "llmbar", ("llmbar-processed-mtbench", "llmbar-processed-llmeval2",
                                     "llmbar-processed-faireval")),
    ("XSTest should-respond", "xstest", ("xstest-should-respond",)),
    ("XSTest should-refuse", "xstest", ("xstest-should-refuse",)),
    ("XSTest all", "xstest", None),
)


@dataclass
class EvalSet:
    name: str
    records: list[PairRecord]
    skipped: dict[str, int] = field(default_factory=dict)


def load_eval_sets(names: Sequence[str], data_dir: str | os.PathLike[str] | None = None,
                   limit: int | None = None) -> list[EvalSet]:
    """Eval sets by source name (see ``crome.data.sources.SOURCES``) or by file path.

    ``limit`` keeps the first N pairs *of each subset*, so a quick look at LLMBar still sees
    its adversarial files and not only the first one.
    """
    sets = []
    for name in names:
        res = load_named(name, data_dir=Path(data_dir) if data_dir else None)
        label = name if name in SOURCES else res.name
        records = res.records
        if limit is not None:
            taken: Counter[str] = Counter()
            records = []
            for r in res.records:
                if taken[r.subset] < limit:
                    taken[r.subset] += 1
                    records.append(r)
        sets.append(EvalSet(label, records, dict(res.skipped)))
    return sets


def evaluate_scorer(scorer: Scorer | Comparer, sets: Sequence[EvalSet],
                    output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Score every set; returns (and writes) ``{set: summary}`` plus headline rows. A
    pairwise model (a ``Comparer``) is judged on P(chosen ≻ rejected) vs P(rejected ≻
    chosen), both orders averaged; each set's summary adds its ``consistency``."""
    results: dict[str, Any] = {"scorer": scorer.name, "sets": {}}
    outcomes_by_set: dict[str, list[PairOutcome]] = {}
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for es in sets:
        consistency = None
        if is_comparer(scorer):
            prefs = compare_pairs(scorer, es.records)  # type: ignore[arg-type]
            chosen, rejected = [p.first for p in prefs], [p.second for p in prefs]
            consistency = sum(p.consistent for p in prefs) / len(prefs) if prefs else None
        else:
            chosen, rejected = score_pairs(scorer, es.records)
        outcomes = pair_outcomes(es.records, chosen, rejected)
        outcomes_by_set[es.name] = outcomes
        summary = summarize(outcomes)
        if is_comparer(scorer):  # the two orders name the same winner (position bias: not)
            summary["consistency"] = consistency
        summary["skipped_at_load"] = es.skipped
        results["sets"][es.name] = summary
        if out is not None:
            path = out / f"examples-{slug(scorer.name)}-{slug(es.name)}.jsonl"
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(o.to_dict()) + "\n" for o in outcomes)
    results["headline"] = headline(outcomes_by_set)
    if out is not None:
        (out / f"results-{slug(scorer.name)}.json").write_text(
            json.dumps(results, indent=2, allow_nan=False) + "\n")
    return results


def headline(outcomes_by_set: Mapping[str, Sequence[PairOutcome]]) -> dict[str, dict[str, Any]]:
    """Pooled accuracy of the headline rows whose set was evaluated."""
    rows: dict[str, dict[str, Any]] = {}
    for label, set_name, subsets in HEADLINE_ROWS:
        outcomes = outcomes_by_set.get(set_name)
        if outcomes is None:
            continue
        chosen = [o for o in outcomes if subsets is None or o.subset in subsets]
        if chosen:
            rows[label] = {"n": sum(o.is_preference for o in chosen),
                           "accuracy": overall_accuracy(chosen),
                           "ties": sum(o.outcome == "tie" for o in chosen)}
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def results_table(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{row: {scorer: value}}``: accuracy rows (ties wrong), then bias figures."""
    rows: dict[str, dict[str, Any]] = {}
    for scorer, res in results.items():
        for label, cell in res["headline"].items():
            rows.setdefault(f"{label} (n={cell['n']})", {})[scorer] = cell["accuracy"]
        for set_name, summ in res["sets"].items():
            rb = summ.get("rewardbench")
            if rb:
                for section, value in rb["sections"].items():
                    rows.setdefault(f"RewardBench {section} (partial: {set_name})",
                                    {})[scorer] = value
        for set_name, summ in res["sets"].items():
            if summ.get("consistency") is not None:  # pairwise models
                rows.setdefault(f"{set_name}: consistency of the two orders",
                                {})[scorer] = summ["consistency"]
        hb = res["sets"].get("hh-rlhf/helpful-base")
        if hb:
            lb = hb["length_bias"]
            rows.setdefault("helpful-base: acc. where rejected is longer", {})[scorer] = \
                lb["accuracy_rejected_longer"]
            rows.setdefault("helpful-base: Spearman(reward, length)", {})[scorer] = \
                lb["spearman"]
    return rows


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    scorers = list(dict.fromkeys(s for row in table.values() for s in row))
    lines = ["| held-out set | " + " | ".join(scorers) + " |",
             "|---|" + "---:|" * len(scorers)]
    for label, row in table.items():
        cells = []
        for s in scorers:
            v = row.get(s)
            if v is None:
                cells.append("–")
            elif "Spearman" in label:
                cells.append(f"{v:+.2f}")
            else:
                cells.append(f"{100 * v:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
