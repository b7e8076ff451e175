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

Comparers
---------
A pairwise model (:class:`crome.evaluate.reference.Comparer`, a PairPM) gives no reward to
one answer: it picks by comparisons, with each method of ``BoNOptions.selection`` (default
both, the first is the headline):

* ``knockout`` (RLHFlow's best-of-N with a ``pair-pm``): the first N candidates in pool order
  are paired off round by round, (0, 1), (2, 3) …, an odd one out (the last) going through
  on a bye; the winner of a match is the one with the larger ``P(≻ other)``, both orders
  averaged, and an exact tie goes to the earlier candidate. N − 1 comparisons, one pick.
* ``round-robin``: every unordered pair of the first N compared once; a candidate's Copeland
  score is its wins minus its losses, where a comparison won is one whose most likely outcome
  is that candidate winning (a verdict of tie, or an exact tie, counts 0 to both). The pick
  is the top Copeland score; several at the top are credited as a reward tie is (the
  expected accuracy of a random break among them). N(N − 1)/2 comparisons.

In every comparison the earlier candidate of the pool is the first answer. Each distinct
pair of a question is compared once, whichever methods and Ns need it, and comparisons are
batched: one ``compare`` call for all the round-robin pairs of all questions, then one per
knockout round (all questions and Ns at once) for the matches not already compared (calls
of at most ``COMPARE_CHUNK`` comparisons each).

The cost is reported per N and method as ``calls`` (over the questions that reach N) and
``calls_per_question``: reward calls for a scorer (N per question, one per candidate),
comparisons for a comparer (N − 1 knockout, N(N − 1)/2 round-robin), each comparison costing
a PairPM two forward passes of the prompt and both answers.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crome.data.sources import GSM8KItem, final_number, load_gsm8k
from crome.evaluate.perturb import apply_text
from crome.evaluate.reference import Comparer, Preference, Scorer, is_comparer
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
# How a pick is made: by reward (a scorer), by comparisons (a comparer).
REWARD = "reward"
KNOCKOUT = "knockout"
ROUND_ROBIN = "round-robin"
COMPARER_SELECTIONS: tuple[str, ...] = (KNOCKOUT, ROUND_ROBIN)
# The most comparisons sent in one ``compare`` call: the round-robin of a whole split
# (120 pairs a question at N=16) would otherwise be encoded all at once.
COMPARE_CHUNK = 8192


@dataclass
class BoNOptions:
    """``ns``: the pool sizes to report (each 1..16); ``limit``: the first questions only;
    ``selection``: how a comparer picks, the methods of :data:`COMPARER_SELECTIONS` to run,
    the first the headline (a scorer always picks by reward)."""

    ns: tuple[int, ...] = (4, 8, 16)
    seed: int = 0
    limit: int | None = None
    split: str = HELD_OUT_SPLIT
    selection: tuple[str, ...] = COMPARER_SELECTIONS

    def __post_init__(self) -> None:
        self.ns = tuple(self.ns)
        self.selection = (self.selection,) if isinstance(self.selection, str) \
            else tuple(self.selection)
        unknown = [m for m in self.selection if m not in COMPARER_SELECTIONS]
        if not self.selection or unknown or len(set(self.selection)) != len(self.selection):
            raise ValueError(f"selection must be distinct methods among "
                             f"{', '.join(COMPARER_SELECTIONS)}, got {self.selection}")
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
class Selection:
    """A comparer's pick among the first N candidates: the candidates it names (several on a
    Copeland tie at the top), the comparisons it took and, round-robin, every candidate's
    Copeland score (wins − losses)."""

    candidates: list[int]
    comparisons: int
    copeland: list[int] | None = None


@dataclass
class BoNQuestion:
    """A question's pool (truncated to the largest N) with a scorer's ``rewards``, or a
    comparer's ``selections`` (method -> N -> :class:`Selection`)."""

    id: str
    gold: str
    candidates: list[Candidate]
    rewards: list[float] | None = None
    selections: dict[str, dict[int, Selection]] = field(default_factory=dict)

    def reaches(self, n: int) -> bool:
        return len(self.candidates) >= n

    def _method(self, method: str | None) -> str:
        """``None``: the headline method (reward for a scorer, the first one of a comparer)."""
        if method is not None:
            return method
        return REWARD if self.rewards is not None else next(iter(self.selections), REWARD)

    def pick(self, n: int, method: str | None = None) -> list[int]:
        """Indices of the picked candidates among the first ``n`` (several on a tie): the
        top-reward ones for a scorer, the method's pick for a comparer."""
        method = self._method(method)
        if method != REWARD:
            return self.selections[method][n].candidates
        if self.rewards is None:
            raise ValueError(f"question {self.id}: no rewards (a comparer's pool); name one "
                             f"of the methods {', '.join(self.selections)}")
        top = max(self.rewards[:n])
        return [i for i, r in enumerate(self.rewards[:n]) if r == top]

    def calls(self, n: int, method: str | None = None) -> int:
        """What the pick among the first ``n`` cost: ``n`` reward calls, or the comparisons
        of the method."""
        method = self._method(method)
        return n if method == REWARD else self.selections[method][n].comparisons

    def pick_share(self, n: int, test: Callable[[Candidate], bool],
                   method: str | None = None) -> float:
        """Tie-credited share of the pick for which ``test`` holds."""
        return _share([test(self.candidates[i]) for i in self.pick(n, method)])

    def _picks(self, ns: Sequence[int], method: str) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for n in ns:
            if not self.reaches(n):
                out[str(n)] = None
                continue
            entry: dict[str, Any] = {"candidates": self.pick(n, method),
                                     "credit": self.pick_share(n, _correct, method)}
            if method != REWARD:
                sel = self.selections[method][n]
                entry["comparisons"] = sel.comparisons
                if sel.copeland is not None:
                    entry["copeland"] = sel.copeland
            out[str(n)] = entry
        return out

    def to_row(self, ns: Sequence[int], methods: Sequence[str] = (REWARD,)) -> dict[str, Any]:
        """The per-question row of ``bon-examples-*.jsonl``: ``picks`` by the headline
        method, and for a comparer ``methods``, the picks of every method."""
        cands = [{"origin": c.origin, "kind": c.kind, "correct": c.correct}
                 for c in self.candidates]
        if self.rewards is not None:
            for cand, r in zip(cands, self.rewards):
                cand["reward"] = r
        row = {"id": self.id, "gold": self.gold, "candidates": cands,
               "picks": self._picks(ns, methods[0])}
        if tuple(methods) != (REWARD,):
            row["methods"] = {m: self._picks(ns, m) for m in methods}
        return row


def _correct(c: Candidate) -> bool:
    return c.correct


@dataclass
class BoNResult:
    """The figures of one N and selection method; rates are ``None`` when no question
    reaches N. ``calls``: what the picks cost over the questions that reach N, reward calls
    for a scorer (N per question), comparisons for a comparer."""

    n: int
    questions: int
    rm: float | None
    random: float | None
    best: float | None
    not_applicable: int
    bait_picked: float | None
    picks: dict[str, float | None]
    ties: int  # questions whose pick is shared by several candidates (a tie at the top)
    method: str = REWARD
    calls: int = 0
    calls_per_question: float | None = None


def bon_result(n: int, questions: Sequence[BoNQuestion], method: str = REWARD) -> BoNResult:
    """Best-of-``n`` figures of one selection method over the questions whose pool reaches
    ``n``."""
    reached = [q for q in questions if q.reaches(n)]

    def pick_mean(test: Callable[[Candidate], bool]) -> float | None:
        return _mean([q.pick_share(n, test, method) for q in reached])

    calls = sum(q.calls(n, method) for q in reached)
    return BoNResult(
        n=n, questions=len(reached),
        rm=pick_mean(_correct),
        random=_mean([_share([c.correct for c in q.candidates[:n]]) for q in reached]),
        best=_mean([float(any(c.correct for c in q.candidates[:n])) for q in reached]),
        not_applicable=len(questions) - len(reached),
        bait_picked=pick_mean(lambda c: c.kind != "real"),
        picks={k: pick_mean(lambda c, k=k: c.kind == k) for k in ORIGIN_KINDS},
        ties=sum(len(q.pick(n, method)) > 1 for q in reached),
        method=method, calls=calls, calls_per_question=calls / len(reached) if reached else None,
    )


@dataclass
class BoNReport:
    """``results``: the headline method's figures per N; ``methods``: every method's
    (``reward`` alone for a scorer). ``call`` names the unit of the costs (``reward`` or
    ``comparison``); ``calls_run``: how many were run in all (answers scored, or distinct
    comparisons, shared between methods and Ns); ``order_consistency``: for a comparer, the
    share of those comparisons whose two orders named the same winner."""

    scorer: str
    source: str
    seed: int
    results: list[BoNResult]
    checker_disagreements: int
    variants_not_made: Counter[str]
    questions: list[BoNQuestion] = field(repr=False)
    questions_without_solutions: int = 0
    skipped_at_load: dict[str, int] = field(default_factory=dict)
    methods: dict[str, list[BoNResult]] = field(default_factory=dict)
    call: str = REWARD
    calls_run: int = 0
    order_consistency: float | None = None

    def _methods(self) -> dict[str, list[BoNResult]]:
        return self.methods or {REWARD: self.results}

    def to_dict(self) -> dict[str, Any]:
        out = {"scorer": self.scorer, "source": self.source, "seed": self.seed,
               "results": [asdict(r) for r in self.results],
               "checker_disagreements": self.checker_disagreements,
               "variants_not_made": dict(self.variants_not_made.most_common()),
               "questions_without_solutions": self.questions_without_solutions,
               "skipped_at_load": self.skipped_at_load,
               "selection": list(self._methods()),
               "methods": {m: [asdict(r) for r in rs] for m, rs in self._methods().items()},
               "call": self.call, "calls_run": self.calls_run}
        if self.call != REWARD:
            out["order_consistency"] = self.order_consistency
        return out

    def example_rows(self) -> list[dict[str, Any]]:
        ns = [r.n for r in self.results]
        methods = list(self._methods())
        return [q.to_row(ns, methods) for q in self.questions]

    def summary(self) -> str:
        """One line per N (and method, for a comparer), e.g.
        ``N=4: rm 41.2% random 35.0% best 62.0% (200 questions)``."""
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        lines = [f"best-of-N on {self.source}, scorer {self.scorer}, seed {self.seed}"]
        for method, results in self._methods().items():
            for r in results:
                na = f", {r.not_applicable} not applicable" if r.not_applicable else ""
                label = "" if method == REWARD else f" {method}"
                cost = "" if method == REWARD or r.calls_per_question is None else \
                    f"; {r.calls_per_question:g} comparisons per question"
                lines.append(f"N={r.n}{label}: rm {pct(r.rm)} random {pct(r.random)} best "
                             f"{pct(r.best)} ({r.questions} questions{na}); "
                             f"bait picked {pct(r.bait_picked)}{cost}")
        if self.call != REWARD:
            lines.append(f"comparisons run: {self.calls_run} (each pair once); consistent "
                         f"in both orders: {pct(self.order_consistency)}")
        lines.append(f"checker disagreements: {self.checker_disagreements}; variants not "
                     f"made: {sum(self.variants_not_made.values())}" + "".join(
                         f"\n  {reason}: {k}" for reason, k
                         in self.variants_not_made.most_common()))
        return "\n".join(lines)


# --------------------------------------------------------------------------- selection

def _score_pools(scorer: Scorer, prompts: Sequence[str],
                 pools: Sequence[list[Candidate]]) -> list[list[float]]:
    """Every candidate's reward, in one ``scorer.score`` call."""
    answers = [c.text for cands in pools for c in cands]
    rewards = [float(r) for r in scorer.score(
        [p for p, cands in zip(prompts, pools) for _ in cands], answers)] if answers else []
    if len(rewards) != len(answers):
        raise ValueError(f"scorer {scorer.name!r} returned {len(rewards)} rewards for "
                         f"{len(answers)} answers")
    if any(math.isnan(r) for r in rewards):
        raise ValueError(f"scorer {scorer.name!r} returned NaN rewards")
    out, start = [], 0
    for cands in pools:
        out.append(rewards[start:start + len(cands)])
        start += len(cands)
    return out


class PairVerdicts:
    """A comparer's verdicts on pairs of a question's candidates, keyed ``(question, i, j)``
    with ``i < j``: the earlier candidate is always the first answer. Each pair is compared
    once; :meth:`fetch` runs the missing ones of a batch in one ``compare`` call (one per
    :data:`COMPARE_CHUNK` comparisons)."""

    def __init__(self, comparer: Comparer, prompts: Sequence[str],
                 pools: Sequence[Sequence[Candidate]]) -> None:
        self.comparer, self.prompts, self.pools = comparer, prompts, pools
        self.verdicts: dict[tuple[int, int, int], Preference] = {}

    def fetch(self, pairs: Iterable[tuple[int, int, int]]) -> None:
        todo = [k for k in dict.fromkeys(pairs) if k not in self.verdicts]
        if not todo:
            return
        if any(i >= j for _, i, j in todo):
            raise ValueError("pairs are (question, earlier, later)")
        for start in range(0, len(todo), COMPARE_CHUNK):
            chunk = todo[start:start + COMPARE_CHUNK]
            prefs = self.comparer.compare([self.prompts[q] for q, _, _ in chunk],
                                          [self.pools[q][i].text for q, i, _ in chunk],
                                          [self.pools[q][j].text for q, _, j in chunk])
            if len(prefs) != len(chunk):
                raise ValueError(f"comparer {self.comparer.name!r} returned {len(prefs)} "
                                 f"verdicts for {len(chunk)} comparisons")
            if any(math.isnan(p.first) or math.isnan(p.second) or math.isnan(p.tie)
                   for p in prefs):
                raise ValueError(f"comparer {self.comparer.name!r} returned NaN probabilities")
            self.verdicts.update(zip(chunk, prefs))

    def first_wins(self, q: int, i: int, j: int) -> bool:
        """The knockout rule: ``P(i ≻ j) ≥ P(j ≻ i)``, an exact tie going to ``i``."""
        p = self.verdicts[q, i, j]
        return p.first >= p.second

    def outcome(self, q: int, i: int, j: int) -> int:
        """The round-robin rule: +1 when ``i`` winning is the most likely outcome, −1 when
        ``j`` winning is, 0 for a verdict of tie or an exact tie."""
        p = self.verdicts[q, i, j]
        if p.first > max(p.second, p.tie):
            return 1
        if p.second > max(p.first, p.tie):
            return -1
        return 0

    def consistency(self) -> float | None:
        return _mean([float(p.consistent) for p in self.verdicts.values()])


def knockout(verdicts: PairVerdicts, tournaments: Sequence[tuple[int, int]],
             ) -> dict[tuple[int, int], int]:
    """The winner of the knockout among the first ``n`` candidates of question ``q``, for
    every ``(q, n)`` of ``tournaments``; all are played in lockstep, one batch per round."""
    alive = {t: list(range(t[1])) for t in tournaments}
    while playing := {t: v for t, v in alive.items() if len(v) > 1}:
        verdicts.fetch((q, a, b) for (q, _), v in playing.items()
                       for a, b in zip(v[::2], v[1::2]))
        for (q, n), v in playing.items():
            winners = [a if verdicts.first_wins(q, a, b) else b
                       for a, b in zip(v[::2], v[1::2])]
            alive[q, n] = winners + v[len(v) - len(v) % 2:]  # the odd one out: a bye
    return {t: v[0] for t, v in alive.items()}


def copeland(verdicts: PairVerdicts, q: int, n: int) -> list[int]:
    """Wins − losses of each of the first ``n`` candidates of question ``q``, every pair
    compared (:meth:`PairVerdicts.fetch` them first)."""
    scores = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            o = verdicts.outcome(q, i, j)
            scores[i] += o
            scores[j] -= o
    return scores


def select_by_comparison(verdicts: PairVerdicts, questions: Sequence[BoNQuestion],
                         ns: Sequence[int], methods: Sequence[str]) -> None:
    """Fill in each question's :class:`Selection` per method and N it reaches (see the
    module docstring): the round-robin pairs of all questions first, in one batch, then the
    knockout rounds, whose matches the round-robin may already have compared."""
    reached = [(q, [n for n in ns if question.reaches(n)])
               for q, question in enumerate(questions)]
    if ROUND_ROBIN in methods:
        verdicts.fetch((q, i, j) for q, sizes in reached if sizes
                       for i in range(max(sizes)) for j in range(i + 1, max(sizes)))
        for q, sizes in reached:
            for n in sizes:
                scores = copeland(verdicts, q, n)
                top = max(scores)
                questions[q].selections.setdefault(ROUND_ROBIN, {})[n] = Selection(
                    [i for i, s in enumerate(scores) if s == top], n * (n - 1) // 2, scores)
    if KNOCKOUT in methods:
        winners = knockout(verdicts, [(q, n) for q, sizes in reached for n in sizes])
        for (q, n), w in winners.items():
            questions[q].selections.setdefault(KNOCKOUT, {})[n] = Selection([w], n - 1)
    # the methods in the order asked, the first the headline
    for question in questions:
        question.selections = {m: question.selections.get(m, {}) for m in methods}


def best_of_n(scorer: Scorer | Comparer, items: Sequence[GSM8KItem],
              options: BoNOptions | None = None) -> BoNReport:
    """Build every question's pool, score it in one call (a scorer) or compare its
    candidates (a comparer, by each method of ``options.selection``) and compute the figures
    per N."""
    options = options or BoNOptions()
    source = getattr(items, "name", f"gsm8k/{options.split}")
    items = list(items)[:options.limit] if options.limit is not None else list(items)
    max_n = max(options.ns)
    pools = [build_candidates(item, options.seed) for item in items]
    used = [pool.candidates[:max_n] for pool in pools]
    prompts = [item.question for item in items]
    consistency = None
    if is_comparer(scorer):
        questions = [BoNQuestion(item.id, item.gold, cands) for item, cands in zip(items, used)]
        verdicts = PairVerdicts(scorer, prompts, used)  # type: ignore[arg-type]
        select_by_comparison(verdicts, questions, options.ns, options.selection)
        methods, call = options.selection, "comparison"
        calls_run, consistency = len(verdicts.verdicts), verdicts.consistency()
    else:
        rewards = _score_pools(scorer, prompts, used)  # type: ignore[arg-type]
        questions = [BoNQuestion(item.id, item.gold, cands, r)
                     for item, cands, r in zip(items, used, rewards)]
        methods, call, calls_run = (REWARD,), REWARD, sum(map(len, used))
    by_method = {m: [bon_result(n, questions, m) for n in options.ns] for m in methods}
    not_made: Counter[str] = Counter()
    for pool in pools:
        not_made.update(pool.not_made)
    return BoNReport(
        scorer=scorer.name, source=source,
        seed=options.seed, results=by_method[methods[0]],
        checker_disagreements=sum(p.disagreements for p in pools),
        variants_not_made=not_made, questions=questions,
        questions_without_solutions=sum(not item.solutions for item in items),
        methods=by_method, call=call, calls_run=calls_run,
        order_consistency=consistency)


def run_bon(scorer: Scorer | Comparer, options: BoNOptions | None = None,
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
