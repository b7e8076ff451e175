"""The causal audit: is a reward model moved by what matters, and only by that?

* **Sensitivity**, per quality attribute: on causal pairs (an answer and its rewrite along
  one attribute, from ``crome augment --recipe causal``, or the exact ``rules`` oracle, or
  RRM's off-prompt answers), how often the reward falls when the attribute is degraded (and
  rises when it is upgraded), and by how much: ``delta = r(rewrite) - r(original)``.
* **Invariance**, per neutral transformation: the mean ``|Δreward|`` under the
  meaning-preserving rewrites of :mod:`crome.evaluate.perturb` applied to both answers or
  to the prompt (the bait perturbations, which change one answer's style, are left out).

Both are given in units of the reward's standard deviation over the clean answers of the
held-out set (or, without one, over the causal pairs' answers), so RMs whose rewards have
different scales compare: a robust RM has large sensitivities and small invariances. Any
scorer works, including any Hugging Face sequence-classification RM loaded with
:meth:`crome.model.RewardModel.load`.

A pairwise model (a :class:`crome.evaluate.reference.Comparer`, a PairPM) gives no reward to
one answer, so the audit reads its verdict on the probe pair itself, both orders averaged
(``scale`` "win probability" in the report, "reward" for a scorer):

* sensitivity: ``delta = P(rewrite ≻ original) − P(original ≻ rewrite)`` takes the place of
  ``r(rewrite) − r(original)``, in [−1, 1]; "fell" (``drop_rate``) means the original is
  the more likely winner, ``delta < 0``: the comparer's own decision between the two
  answers, whatever mass it puts on a tie (a threshold of 0.5 on ``P(original ≻ rewrite)``
  would count 0.45 against 0.05, with 0.5 on a tie, as no decision). How often the tie is
  the most likely outcome is given apart (``tie_rate``), with the share of probes whose two
  orders agree (``order_consistency``);
* invariance: the mean absolute change of a rewritten answer's win probability against the
  other answer of its pair (:mod:`crome.evaluate.perturb`);
* both in units of the standard deviation of the comparer's clean win probabilities
  (``P(chosen ≻ rejected)`` and ``P(rejected ≻ chosen)`` of the held-out pairs; without them,
  those of the probe pairs), the spread of its verdicts, as a reward's std is the spread of
  a reward; the raw figures (``mean_delta``, ``mean_abs_delta``) are in probability units.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crome.data.schema import PairRecord
from crome.evaluate.perturb import (
    DEFAULT_SUITE,
    MemoComparer,
    MemoScorer,
    PerturbOptions,
    PerturbReport,
    evaluate_perturbations,
    memoize,
)
from crome.evaluate.reference import Comparer, Scorer

# Invariance uses the neutral perturbations of the default suite: those that leave both
# answers' content alone (not the one-sided bait).
NEUTRAL_SUITE: tuple[str, ...] = tuple(
    p for p in DEFAULT_SUITE if not p.endswith(("@rejected", "@chosen")))
RRM_ATTRIBUTE = "relevance (off-prompt answer)"


@dataclass
class AuditOptions:
    perturbations: tuple[str, ...] = NEUTRAL_SUITE
    seed: int = 0
    max_attributes: int = 8  # the most frequent attribute names; the rest pooled as "other"


@dataclass
class CausalProbe:
    """One causal pair seen as (original answer, rewrite) along ``attribute``."""

    id: str
    attribute: str
    direction: str  # degrade | upgrade
    prompt: Any
    original: str
    rewrite: str


def causal_probes(records: Sequence[PairRecord]) -> tuple[list[CausalProbe], Counter[str]]:
    """The causal pairs among ``records`` (causal and RRM recipes), and what was not one."""
    probes: list[CausalProbe] = []
    skipped: Counter[str] = Counter()
    for r in records:
        prov = r.provenance or {}
        recipe, direction = prov.get("recipe"), prov.get("direction")
        if r.label != "chosen":
            skipped["tie-labelled pair"] += 1
        elif recipe == "causal" and direction in ("degrade", "upgrade"):
            attribute = str(prov.get("attribute") or "unnamed").strip().lower()
            original, rewrite = (r.chosen, r.rejected) if direction == "degrade" else \
                (r.rejected, r.chosen)
            probes.append(CausalProbe(r.id, attribute, direction, r.prompt, original, rewrite))
        elif recipe == "rrm" and direction in ("chosen_vs_off", "rejected_vs_off"):
            probes.append(CausalProbe(r.id, RRM_ATTRIBUTE, "degrade", r.prompt, r.chosen,
                                      r.rejected))
        else:
            skipped["not a causal or RRM pair (no provenance recipe)"] += 1
    return probes, skipped


@dataclass
class AuditReport:
    scorer: str
    reward_std: float | None  # a comparer: the std of its clean win probabilities
    std_from: str
    sensitivity: list[dict[str, Any]]
    invariance: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    scale: str = "reward"  # or "win probability" (a comparer)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def table(self) -> str:
        fell = "reward fell" if self.scale == "reward" else "original won"
        lines = [f"{self.scorer}: {self.scale} std {self.reward_std:.3g} ({self.std_from})"
                 if self.reward_std else f"{self.scorer}: {self.scale} std undefined",
                 f"| attribute | direction | n | {fell} | mean Δ (std) |",
                 "|---|---|---:|---:|---:|"]
        for s in self.sensitivity:
            lines.append(f"| {s['attribute']} | {s['direction']} | {s['n']} | "
                         f"{100 * s['drop_rate']:.1f}% | {_fmt(s['mean_delta_std'])} |")
        lines += ["| neutral transformation | | n | | mean abs Δ (std) |",
                  "|---|---|---:|---|---:|"]
        for v in self.invariance:
            size = v["mean_abs_delta_std"]
            lines.append(f"| {v['transformation']} | | {v['n']} | | "
                         f"{'–' if size is None else f'{size:.2f}'} |")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _group(probes: Sequence[CausalProbe], keep: int) -> dict[tuple[str, str], list[int]]:
    counts = Counter(p.attribute for p in probes)
    top = {a for a, _ in counts.most_common(keep)}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(probes):
        name = p.attribute if p.attribute in top else "other"
        groups.setdefault((name, p.direction), []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def probe_deltas(scorer: MemoScorer | MemoComparer, probes: Sequence[CausalProbe],
                 ) -> tuple[list[float], list[float], list[dict[str, bool]]]:
    """``delta`` of every probe (``r(rewrite) − r(original)``, or for a comparer
    ``P(rewrite ≻ original) − P(original ≻ rewrite)``), the values whose spread is the
    fallback std (the rewards of both answers, or both win probabilities), and for a
    comparer each probe's ``tie`` (a tie the most likely outcome) and ``consistent`` flags."""
    prompts = [p.prompt for p in probes]
    if isinstance(scorer, MemoComparer):
        prefs = scorer.compare(prompts, [p.original for p in probes],
                               [p.rewrite for p in probes])
        flags = [{"tie": v.tie > max(v.first, v.second), "consistent": v.consistent}
                 for v in prefs]
        return ([v.second - v.first for v in prefs], [v.first for v in prefs]
                + [v.second for v in prefs], flags)
    originals = scorer.score(prompts, [p.original for p in probes])
    rewrites = scorer.score(prompts, [p.rewrite for p in probes])
    return [r - o for o, r in zip(originals, rewrites)], originals + rewrites, []


def audit(scorer: Scorer | Comparer, causal: Sequence[PairRecord],
          neutral_sets: Sequence[Any] = (),
          options: AuditOptions | None = None,
          output_dir: str | os.PathLike[str] | None = None,
          perturbed: PerturbReport | None = None) -> AuditReport:
    """Sensitivity on ``causal`` pairs, invariance on ``neutral_sets``
    (:class:`crome.evaluate.run.EvalSet`, held-out); writes ``audit-<scorer>.json``.

    ``perturbed``: the scorer's perturbation-suite report on held-out sets, when one was
    already computed; its neutral (not one-sided) perturbations then give the invariance,
    and ``neutral_sets`` is not needed.
    """
    from crome.evaluate.run import slug

    opts = options or AuditOptions()
    memo = memoize(scorer)
    scale = "win probability" if isinstance(memo, MemoComparer) else "reward"
    probes, skipped = causal_probes(causal)
    if perturbed is None and neutral_sets:
        perturbed = evaluate_perturbations(memo, neutral_sets,
                                           PerturbOptions(opts.perturbations, opts.seed))
    if perturbed is not None and perturbed.scale != scale:
        raise ValueError(f"the perturbation report of {perturbed.scorer!r} is on the "
                         f"{perturbed.scale} scale, {scorer.name!r} on the {scale} one")
    invariance: list[dict[str, Any]] = []
    std, std_from = None, "no answers"
    what = "answers" if scale == "reward" else "pairs"
    if perturbed is not None:
        std, std_from = perturbed.reward_std, f"clean {what} of {', '.join(perturbed.sets)}"
        invariance = [{"transformation": t.id, "n": t.n, "not_applicable": t.not_applicable,
                       "mean_abs_delta": t.mean_abs_delta,
                       "mean_abs_delta_std": t.mean_abs_delta_std}
                      for t in perturbed.transformations if not t.bait]
    all_deltas, values, flags = probe_deltas(memo, probes)
    if std is None and len(probes) > 1:
        std, std_from = statistics.pstdev(values), f"{what} of the causal pairs"
    sensitivity = []
    for (attribute, direction), idx in _group(probes, opts.max_attributes).items():
        deltas = [all_deltas[i] for i in idx]
        mean = sum(deltas) / len(deltas)
        entry = {
            "attribute": attribute, "direction": direction, "n": len(idx),
            "drop_rate": sum(d < 0 for d in deltas) / len(deltas),
            "expected_rate": sum((d < 0) if direction == "degrade" else (d > 0)
                                 for d in deltas) / len(deltas),
            "mean_delta": mean, "mean_delta_std": mean / std if std else None}
        if flags:
            entry["tie_rate"] = sum(flags[i]["tie"] for i in idx) / len(idx)
            entry["order_consistency"] = sum(flags[i]["consistent"] for i in idx) / len(idx)
        sensitivity.append(entry)
    report = AuditReport(scorer=scorer.name, reward_std=std, std_from=std_from,
                         sensitivity=sensitivity, invariance=invariance, skipped=dict(skipped),
                         sets=perturbed.sets if perturbed is not None else [], scale=scale)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"audit-{slug(scorer.name)}.json").write_text(
            json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return report


def rules_probe_pairs(work_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None
                      = None, limit: int = 100, seed: int = 0) -> tuple[list[PairRecord],
                                                                         list[str]]:
    """Causal pairs made without an LLM, on held-out data only, for an audit anywhere:

    * *correctness*: GSM8K test solutions whose final number the ``rules`` oracle changed
      (the exact intervention of :mod:`crome.oracle.rules`), through ``crome augment``;
    * *relevance*: RRM pairs on held-out helpful-base (the answer to another, unrelated
      prompt must score lower).

    Both go through the augmentation stage (files in ``work_dir``, resumable); returns the
    pairs and the stage summaries.
    """
    from crome.augment import AugmentOptions, augment
    from crome.data.io import read_pairs
    from crome.data.sources import load_named
    from crome.oracle import OracleOptions, make_oracle
    from crome.rubrics import RubricOptions, make_rubrics, read_rubrics

    work = Path(work_dir)
    data = Path(data_dir) if data_dir is not None else None
    gsm = load_named("gsm8k", data, limit).records
    hb = load_named("hh-rlhf/helpful-base", data, limit).records
    oracle = make_oracle(OracleOptions(spec="rules", cache="off"))
    log = [make_rubrics(gsm, oracle, work / "gsm8k-rubrics.jsonl", RubricOptions()).summary()]
    log.append(augment(gsm, work / "gsm8k-correctness.jsonl",
                       AugmentOptions(recipe="causal", seed=seed, attributes_per_pair=1,
                                      directions=("degrade",), candidates=1),
                       oracle=oracle, rubrics=read_rubrics(work / "gsm8k-rubrics.jsonl"),
                       ).summary())
    log.append(augment(hb, work / "helpful-base-rrm.jsonl",
                       AugmentOptions(recipe="rrm", seed=seed)).summary())
    pairs = read_pairs(work / "gsm8k-correctness.jsonl") + read_pairs(
        work / "helpful-base-rrm.jsonl")
    return pairs, log
