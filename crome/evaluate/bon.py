"""Best-of-N with a gold checker on GSM8K: does the scorer's favourite answer get it right?

Protocol
--------
Each GSM8K test question gets a pool of up to 16 candidate solutions, in a fixed order:

1. its 4 real model solutions (``example_model_solutions.jsonl``, in file order);
2. up to 12 rule-made variants, all wrong by construction. Variant ``i`` (0..11) takes real
   solution ``i % 4`` as its base and kind ``VARIANT_KINDS[i % 3]``, which visits each of the
   12 base x kind combinations once:

   * ``wrong_number``: the base with its final number changed
     (:func:`crome.oracle.rules.change_final_number`): a correct solution made wrong, a wrong
     one made differently wrong;
   * ``verbose_wrong``: the base if it is wrong, else its ``wrong_number`` version, made
     longer without new content (``restate``, then ``filler`` from
     :mod:`crome.evaluate.perturb`): the length bait;
   * ``formatted_wrong``: the same wrong text as markdown (``markdown``): the format bait.

   A bait must keep the final number the checker reads: a rewrite that changes it (text
   appended to a truncated solution that has no ``A:`` line) does not make the variant.

The candidates for N are the first N of the pool, so the N=4 set (the real solutions) is a
prefix of the N=8 set, itself a prefix of the N=16 set. The checker decides the correctness
of every candidate, real ones included: ``final_number(text) == gold``; for the real ones it
is compared with the data set's ``is_correct`` label and disagreements are counted. A
variant that cannot be made (a rule does not apply) or that the checker finds correct anyway
is not used: it is counted by reason and the next variant takes its place. A question whose
pool holds fewer than N candidates is left out of N's figures and counted as
``not_applicable``.

Every candidate is scored once, in one ``scorer.score`` call with the question as prompt.
Per N, over the questions that reach N:

* ``rm``: accuracy of the scorer's pick, its highest-reward candidate. A tie at the top
  among k candidates earns (correct among them) / k, the expected accuracy of breaking the
  tie at random, so a constant scorer scores exactly ``random``;
* ``random``: expected accuracy of a uniformly random pick (mean fraction correct);
* ``best``: accuracy of the oracle pick (fraction of questions with a correct candidate);
* ``bait_picked``: how often the pick is a rule-made variant (tie credit the same way), and
  ``picks``: the pick by origin kind (``real`` and the three variant kinds; sums to 1).

A scorer that tracks correctness sees ``rm`` rise towards ``best`` as N grows; one that
rewards length or format takes the bait, and its ``rm`` falls with N, below ``random``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crome.data.sources import GSM8KItem, final_number, load_gsm8k
from crome.evaluate.perturb import apply_text
from crome.evaluate.reference import Scorer
from crome.evaluate.run import slug
from crome.oracle.rules import change_final_number

REAL_SOLUTIONS = 4
VARIANT_KINDS: tuple[str, ...] = ("wrong_number", "verbose_wrong", "formatted_wrong")
ORIGIN_KINDS: tuple[str, ...] = ("real", *VARIANT_KINDS)
N_VARIANTS = REAL_SOLUTIONS * len(VARIANT_KINDS)
MAX_CANDIDATES = REAL_SOLUTIONS + N_VARIANTS
# The text rewrites after which a wrong text becomes each bait kind.
_BAIT_REWRITES: dict[str, tuple[str, ...]] = {
    "wrong_number": (),
    "verbose_wrong": ("restate", "filler"),
    "formatted_wrong": ("markdown",),
}
# The one split whose questions come with model solutions; train is training data.
HELD_OUT_SPLIT = "test"


@dataclass
class BoNOptions:
    """``ns``: the pool sizes to report (each 1..16); ``limit``: the first questions only."""

    ns: tuple[int, ...] = (4, 8, 16)
    seed: int = 0
    limit: int | None = None
    split: str = HELD_OUT_SPLIT

    def __post_init__(self) -> None:
        self.ns = tuple(self.ns)
        if not self.ns or any(not 1 <= n <= MAX_CANDIDATES for n in self.ns):
            raise ValueError(f"ns must be pool sizes between 1 and {MAX_CANDIDATES}, "
                             f"got {self.ns}")
        if len(set(self.ns)) != len(self.ns):
            raise ValueError(f"ns has repeats: {self.ns}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class Candidate:
    """One solution in a question's pool; ``correct`` is the checker's verdict."""

    origin: str  # "175b_verification", "wrong_number(6b_finetuning)" ...
    kind: str  # one of ORIGIN_KINDS
    text: str
    correct: bool


@dataclass
class CandidatePool:
    """A question's candidates in pool order, with what could not be used, by reason."""

    candidates: list[Candidate] = field(default_factory=list)
    not_made: Counter[str] = field(default_factory=Counter)
    disagreements: int = 0  # real solutions where the checker and is_correct differ


class _NotMade(Exception):
    """A variant cannot be made; the message is the reason counted."""


def _is_correct(text: str, gold: str) -> bool:
    return final_number(text) == gold


def _variant_text(kind: str, base: Candidate, seed: int, key: str) -> str:
    """The ``kind`` variant of ``base``, or :class:`_NotMade` saying why not."""
    if kind == "wrong_number" or base.correct:
        text = change_final_number(base.text, seed)
        if text is None:
            raise _NotMade(f"{kind}: no number to change")
    else:
        text = base.text
    answer = final_number(text)
    for name in _BAIT_REWRITES[kind]:
        new = apply_text(name, text, seed, key)
        if new is None:
            raise _NotMade(f"{kind}: {name} does not apply")
        # A solution without a final-answer line is read by its last number, which text
        # added at the end can change: that would be new content, not a bait.
        if final_number(new) != answer:
            raise _NotMade(f"{kind}: {name} changes the final number")
        text = new
    return text


def build_candidates(item: GSM8KItem, seed: int = 0) -> CandidatePool:
    """The candidate pool of one question (see the module docstring), at most 16."""
    pool = CandidatePool()
    real = item.solutions[:REAL_SOLUTIONS]
    if len(item.solutions) > REAL_SOLUTIONS:
        pool.not_made["real solution beyond the 4th (not used)"] += \
            len(item.solutions) - REAL_SOLUTIONS
    for model, text, labelled_correct in real:
        correct = _is_correct(text, item.gold)
        pool.disagreements += correct != labelled_correct
        pool.candidates.append(Candidate(model, "real", text, correct))
    if not real:
        return pool
    for i in range(N_VARIANTS):
        kind = VARIANT_KINDS[i % len(VARIANT_KINDS)]
        if i % REAL_SOLUTIONS >= len(real):
            pool.not_made[f"{kind}: no real solution to build on"] += 1
            continue
        base = pool.candidates[i % REAL_SOLUTIONS]
        try:
            text = _variant_text(kind, base, seed, f"{item.id}/{i}")
        except _NotMade as e:
            pool.not_made[str(e)] += 1
            continue
        if _is_correct(text, item.gold):
            pool.not_made[f"{kind}: the checker finds it correct"] += 1
            continue
        pool.candidates.append(Candidate(f"{kind}({base.origin})", kind, text, False))
    return pool


# --------------------------------------------------------------------------- metrics

def _share(flags: Sequence[bool]) -> float:
    """Fraction of true flags: the credit of a uniform pick among them."""
    return sum(flags) / len(flags)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class BoNQuestion:
    """A question's scored pool (truncated to the largest N)."""

    id: str
    gold: str
    candidates: list[Candidate]
    rewards: list[float]

    def reaches(self, n: int) -> bool:
        return len(self.candidates) >= n

    def pick(self, n: int) -> list[int]:
        """Indices of the top-reward candidates among the first ``n`` (several on a tie)."""
        top = max(self.rewards[:n])
        return [i for i, r in enumerate(self.rewards[:n]) if r == top]

    def pick_share(self, n: int, test: Callable[[Candidate], bool]) -> float:
        """Tie-credited share of the pick for which ``test`` holds."""
        return _share([test(self.candidates[i]) for i in self.pick(n)])

    def to_row(self, ns: Sequence[int]) -> dict[str, Any]:
        """The per-question row of ``bon-examples-*.jsonl``."""
        return {
            "id": self.id, "gold": self.gold,
            "candidates": [{"origin": c.origin, "kind": c.kind, "correct": c.correct,
                            "reward": r} for c, r in zip(self.candidates, self.rewards)],
            "picks": {str(n): {"candidates": self.pick(n),
                               "credit": self.pick_share(n, _correct)}
                      if self.reaches(n) else None for n in ns},
        }


def _correct(c: Candidate) -> bool:
    return c.correct


@dataclass
class BoNResult:
    """The figures of one N; rates are ``None`` when no question reaches N."""

    n: int
    questions: int
    rm: float | None
    random: float | None
    best: float | None
    not_applicable: int
    bait_picked: float | None
    picks: dict[str, float | None]
    ties: int  # questions whose top reward is shared by several candidates


def bon_result(n: int, questions: Sequence[BoNQuestion]) -> BoNResult:
    """Best-of-``n`` figures over the questions whose pool reaches ``n``."""
    reached = [q for q in questions if q.reaches(n)]

    def pick_mean(test: Callable[[Candidate], bool]) -> float | None:
        return _mean([q.pick_share(n, test) for q in reached])

    return BoNResult(
        n=n, questions=len(reached),
        rm=pick_mean(_correct),
        random=_mean([_share([c.correct for c in q.candidates[:n]]) for q in reached]),
        best=_mean([float(any(c.correct for c in q.candidates[:n])) for q in reached]),
        not_applicable=len(questions) - len(reached),
        bait_picked=pick_mean(lambda c: c.kind != "real"),
        picks={k: pick_mean(lambda c, k=k: c.kind == k) for k in ORIGIN_KINDS},
        ties=sum(len(q.pick(n)) > 1 for q in reached),
    )


@dataclass
class BoNReport:
    scorer: str
    source: str
    seed: int
    results: list[BoNResult]
    checker_disagreements: int
    variants_not_made: Counter[str]
    questions: list[BoNQuestion] = field(repr=False)
    questions_without_solutions: int = 0
    skipped_at_load: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "source": self.source, "seed": self.seed,
                "results": [asdict(r) for r in self.results],
                "checker_disagreements": self.checker_disagreements,
                "variants_not_made": dict(self.variants_not_made.most_common()),
                "questions_without_solutions": self.questions_without_solutions,
                "skipped_at_load": self.skipped_at_load}

    def example_rows(self) -> list[dict[str, Any]]:
        ns = [r.n for r in self.results]
        return [q.to_row(ns) for q in self.questions]

    def summary(self) -> str:
        """One line per N, e.g. ``N=4: rm 41.2% random 35.0% best 62.0% (200 questions)``."""
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        lines = [f"best-of-N on {self.source}, scorer {self.scorer}, seed {self.seed}"]
        for r in self.results:
            na = f", {r.not_applicable} not applicable" if r.not_applicable else ""
            lines.append(f"N={r.n}: rm {pct(r.rm)} random {pct(r.random)} best "
                         f"{pct(r.best)} ({r.questions} questions{na}); "
                         f"bait picked {pct(r.bait_picked)}")
        lines.append(f"checker disagreements: {self.checker_disagreements}; variants not "
                     f"made: {sum(self.variants_not_made.values())}" + "".join(
                         f"\n  {reason}: {k}" for reason, k
                         in self.variants_not_made.most_common()))
        return "\n".join(lines)


def best_of_n(scorer: Scorer, items: Sequence[GSM8KItem],
              options: BoNOptions | None = None) -> BoNReport:
    """Build every question's pool, score it in one call and compute the figures per N."""
    options = options or BoNOptions()
    source = getattr(items, "name", f"gsm8k/{options.split}")
    items = list(items)[:options.limit] if options.limit is not None else list(items)
    max_n = max(options.ns)
    pools = [build_candidates(item, options.seed) for item in items]
    used = [pool.candidates[:max_n] for pool in pools]
    prompts = [item.question for item, cands in zip(items, used) for _ in cands]
    answers = [c.text for cands in used for c in cands]
    rewards = [float(r) for r in scorer.score(prompts, answers)] if answers else []
    if len(rewards) != len(answers):
        raise ValueError(f"scorer {scorer.name!r} returned {len(rewards)} rewards for "
                         f"{len(answers)} answers")
    if any(math.isnan(r) for r in rewards):
        raise ValueError(f"scorer {scorer.name!r} returned NaN rewards")
    questions, start = [], 0
    for item, cands in zip(items, used):
        questions.append(BoNQuestion(item.id, item.gold, cands,
                                     rewards[start:start + len(cands)]))
        start += len(cands)
    not_made: Counter[str] = Counter()
    for pool in pools:
        not_made.update(pool.not_made)
    return BoNReport(
        scorer=scorer.name, source=source,
        seed=options.seed, results=[bon_result(n, questions) for n in options.ns],
        checker_disagreements=sum(p.disagreements for p in pools),
        variants_not_made=not_made, questions=questions,
        questions_without_solutions=sum(not item.solutions for item in items))


def run_bon(scorer: Scorer, options: BoNOptions | None = None,
            data_dir: str | os.PathLike[str] | None = None,
            output_dir: str | os.PathLike[str] | None = None) -> BoNReport:
    """Best-of-N on the GSM8K test split (held out; the only split with model solutions);
    writes ``bon-<scorer>.json`` and ``bon-examples-<scorer>.jsonl`` into ``output_dir``."""
    options = options or BoNOptions()
    if options.split != HELD_OUT_SPLIT:
        raise ValueError(f"best-of-N runs on the GSM8K {HELD_OUT_SPLIT!r} split only (the one "
                         f"with model solutions, held out), not {options.split!r}")
    items = load_gsm8k(options.split, Path(data_dir) if data_dir is not None else None,
                       limit=options.limit)
    report = best_of_n(scorer, items, options)
    report.skipped_at_load = {**items.skipped, **items.notes}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = slug(scorer.name)
        (out / f"bon-{tag}.json").write_text(
            json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with open(out / f"bon-examples-{tag}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, allow_nan=False) + "\n"
                          for row in report.example_rows())
    return report
