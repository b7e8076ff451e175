"""The robustness evaluations with a pairwise model (a Comparer): best-of-N by knockout and
round-robin (Copeland), perturbations and the causal audit on win probabilities. Fake
comparers pin the selection arithmetic; a tiny real PairPM runs each evaluation end to end."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence

import pytest

from crome.data.schema import PairRecord
from crome.data.sources import GSM8KItem, load_gsm8k, resolve_data_dir
from crome.evaluate.audit import AuditOptions, audit
from crome.evaluate.bon import (
    KNOCKOUT,
    REWARD,
    ROUND_ROBIN,
    BoNOptions,
    best_of_n,
    build_candidates,
    run_bon,
)
from crome.evaluate.perturb import PerturbOptions, evaluate_perturbations
from crome.evaluate.reference import LongerWins, Preference, compare_pairs
from crome.evaluate.run import EvalSet
from crome.pairwise import PairwiseScorer


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(require=("gsm8k", "llmbar"))


@pytest.fixture(scope="module")
def items(data_dir):
    return load_gsm8k("test", data_dir, limit=30)


class FnComparer:
    """A deterministic fake: ``fn(first, second) -> (P(first ≻ second), P(second ≻ first),
    P(tie))``; records every call."""

    def __init__(self, fn: Callable[[str, str], tuple[float, float, float]],
                 name: str = "fake-pm", consistent: Callable[[str, str], bool] | None = None,
                 ) -> None:
        self.fn, self.name, self.consistent = fn, name, consistent
        self.calls: list[tuple[list, list[str], list[str]]] = []

    def compare(self, prompts: Sequence, firsts: Sequence[str],
                seconds: Sequence[str]) -> list[Preference]:
        self.calls.append((list(prompts), list(firsts), list(seconds)))
        out = []
        for a, b in zip(firsts, seconds, strict=True):
            p1, p2, tie = self.fn(a, b)
            ok = True if self.consistent is None else self.consistent(a, b)
            out.append(Preference(first=p1, second=p2, tie=tie, consistent=ok))
        return out

    @property
    def comparisons(self) -> int:
        return sum(len(f) for _, f, _ in self.calls)


def by_rank(rank: Callable[[str], float]) -> Callable[[str, str], tuple[float, float, float]]:
    """The higher rank wins with probability 0.9; equal ranks an exact tie."""
    def fn(a: str, b: str) -> tuple[float, float, float]:
        ra, rb = rank(a), rank(b)
        return (0.9, 0.05, 0.05) if ra > rb else (0.05, 0.9, 0.05) if rb > ra \
            else (0.45, 0.45, 0.1)
    return fn


def random_rank(seed: int = 0) -> Callable[[str], float]:
    """A hidden, distinct quality per text (a strict total order)."""
    memo: dict[str, float] = {}
    rng = random.Random(seed)
    return lambda text: memo.setdefault(text, rng.random())


# --------------------------------------------------------------------------- best-of-N

def test_knockout_and_round_robin_find_the_best_at_their_cost(items):
    rank = random_rank()
    pm = FnComparer(by_rank(rank))
    report = best_of_n(pm, items, BoNOptions(ns=(2, 4, 8, 16)))
    assert list(report.methods) == [KNOCKOUT, ROUND_ROBIN] and report.call == "comparison"
    assert report.results == report.methods[KNOCKOUT]  # the first method is the headline
    for q in report.questions:
        texts = [c.text for c in q.candidates]
        for n in (2, 4, 8, 16):
            if not q.reaches(n):
                continue
            best = max(range(n), key=lambda i: rank(texts[i]))
            assert q.pick(n, KNOCKOUT) == [best]
            assert q.pick(n, ROUND_ROBIN) == [best]
            assert q.pick(n) == [best]
            sel = q.selections[ROUND_ROBIN][n]
            # a strict order: Copeland scores n−1, n−3, …, −(n−1), by rank
            order = sorted(range(n), key=lambda i: rank(texts[i]), reverse=True)
            assert [sel.copeland[i] for i in order] == list(range(n - 1, -n, -2))
            assert q.selections[KNOCKOUT][n].comparisons == n - 1
            assert sel.comparisons == n * (n - 1) // 2
    for method, cost in ((KNOCKOUT, lambda n: n - 1),
                         (ROUND_ROBIN, lambda n: n * (n - 1) // 2)):
        for r in report.methods[method]:
            assert r.method == method and r.ties == 0
            assert r.calls == cost(r.n) * r.questions
            assert r.calls_per_question == cost(r.n)
    # Each pair compared once, the earlier candidate first: round-robin's one batch over all
    # questions serves the knockout too.
    assert len(pm.calls) == 1
    pools = {q.id: [c.text for c in q.candidates] for q in report.questions}
    by_prompt = {item.question: pools[item.id] for item in items}
    seen = set()
    for prompt, a, b in zip(*pm.calls[0]):
        pool = by_prompt[prompt]
        assert pool.index(a) < pool.index(b)
        seen.add((prompt, a, b))
    # the pairs among the largest N each question reaches (a pool of 15 is compared as 8)
    largest = [max(n for n in (2, 4, 8, 16) if q.reaches(n)) for q in report.questions]
    assert len(seen) == report.calls_run == sum(n * (n - 1) // 2 for n in largest)
    assert any(len(q.candidates) != n for q, n in zip(report.questions, largest))


def test_knockout_alone_runs_one_batch_per_round_and_shares_matches_between_ns(items):
    pm = FnComparer(by_rank(random_rank(1)))
    report = best_of_n(pm, items, BoNOptions(ns=(4, 8, 16), selection=KNOCKOUT))
    assert list(report.methods) == [KNOCKOUT]
    assert len(pm.calls) == 4  # log2(16) rounds, every question and N in each
    # The brackets of 4 and 8 are the first quarters and halves of the one of 16.
    assert report.calls_run == pm.comparisons == sum(
        max((n for n in (4, 8, 16) if q.reaches(n)), default=1) - 1
        for q in report.questions)
    rows = report.example_rows()
    assert set(rows[0]["methods"]) == {KNOCKOUT} and rows[0]["picks"]["16"]["comparisons"] == 15


def test_a_pure_position_bias_picks_the_first_candidate(items):
    """A comparer that always prefers whichever answer comes first: the earlier candidate is
    always shown first, so both methods pick candidate 0, the knockout by winning every
    match and the round-robin with Copeland scores n−1, n−3, …"""
    pm = FnComparer(lambda a, b: (0.6, 0.3, 0.1), consistent=lambda a, b: False)
    report = best_of_n(pm, items, BoNOptions(ns=(4, 16)))
    for method in (KNOCKOUT, ROUND_ROBIN):
        by_n = {r.n: r for r in report.methods[method]}
        assert by_n[16].bait_picked == 0.0 and by_n[16].picks["real"] == 1.0
        reached = [q for q in report.questions if q.reaches(16)]
        assert by_n[16].rm == pytest.approx(
            sum(q.candidates[0].correct for q in reached) / len(reached))
    q = report.questions[0]
    assert q.selections[ROUND_ROBIN][4].copeland == [3, 1, -1, -3]
    assert report.order_consistency == 0.0
    assert "consistent in both orders: 0.0%" in report.summary()


def test_ties_go_to_the_earlier_candidate_in_a_knockout_and_are_credited_in_round_robin(
        items):
    # An exact tie everywhere (and a verdict of tie, P(tie) the largest): the knockout keeps
    # the earlier candidate; the round-robin sees all Copeland scores 0 and credits the
    # random pick, as a constant reward does.
    for fn in (lambda a, b: (0.4, 0.4, 0.2), lambda a, b: (0.3, 0.1, 0.6)):
        report = best_of_n(FnComparer(fn), items, BoNOptions(ns=(4, 8)))
        constant = best_of_n(LongerWins(), items, BoNOptions(ns=(4, 8)))
        for rr, ko, bt in zip(report.methods[ROUND_ROBIN], report.methods[KNOCKOUT],
                              constant.results):
            assert rr.rm == rr.random == bt.random
            assert rr.ties == rr.questions
            assert ko.ties == 0 and ko.bait_picked == 0.0
        assert all(q.pick(8, KNOCKOUT) == [0] for q in report.questions)


SOLUTIONS = [
    ("m0", "Tom has 2 apples and gets 3 more.\nSo he has 2 + 3 = 5 apples.\nA: 5", True),
    ("m1", "Tom has 2 apples and gets 2 more.\nSo he has 2 + 2 = 4 apples.\nA: 4", True),
    ("m2", "I am not able to work this one out.\nA: none", False),
    ("m3", "Tom had 5 apples in the end.\nA: 5", True),
]


def test_a_copeland_tie_at_the_top_is_credited_and_the_knockout_differs():
    item = GSM8KItem(id="c/0", question="How many apples?", answer="#### 5", gold="5",
                     solutions=list(SOLUTIONS))
    texts = [c.text for c in build_candidates(item).candidates[:4]]
    assert [c.correct for c in build_candidates(item).candidates[:4]] == \
        [True, False, False, True]
    # A cycle m0 ≻ m1 ≻ m2 ≻ m0, and all three beat m3: Copeland 1, 1, 1, −3.
    beats = {(0, 1), (1, 2), (2, 0), (0, 3), (1, 3), (2, 3)}

    def fn(a: str, b: str) -> tuple[float, float, float]:
        i, j = texts.index(a), texts.index(b)
        return (0.7, 0.2, 0.1) if (i, j) in beats else (0.2, 0.7, 0.1)

    report = best_of_n(FnComparer(fn), [item], BoNOptions(ns=(4,)))
    (rr,), (ko,) = report.methods[ROUND_ROBIN], report.methods[KNOCKOUT]
    q = report.questions[0]
    assert q.selections[ROUND_ROBIN][4].copeland == [1, 1, 1, -3]
    assert q.pick(4, ROUND_ROBIN) == [0, 1, 2]
    assert rr.rm == pytest.approx(1 / 3) and rr.ties == 1 and rr.random == 0.5
    # knockout: m0 beats m1, m2 beats m3, then m2 beats m0: a wrong pick
    assert q.pick(4, KNOCKOUT) == [2] and ko.rm == 0.0 and ko.ties == 0
    row = report.example_rows()[0]
    assert row["picks"]["4"] == {"candidates": [2], "credit": 0.0, "comparisons": 3}
    assert row["methods"][ROUND_ROBIN]["4"] == {
        "candidates": [0, 1, 2], "credit": pytest.approx(1 / 3), "comparisons": 6,
        "copeland": [1, 1, 1, -3]}
    # a bye: with 3 candidates the third goes straight to the final
    report3 = best_of_n(FnComparer(fn), [item], BoNOptions(ns=(3,), selection=KNOCKOUT))
    assert report3.questions[0].pick(3) == [2]  # m0 beats m1, then m2 beats m0


def test_large_batches_are_sent_in_chunks(items, monkeypatch):
    from crome.evaluate import bon

    monkeypatch.setattr(bon, "COMPARE_CHUNK", 100)
    pm = FnComparer(by_rank(random_rank(2)))
    chunked = best_of_n(pm, items[:10], BoNOptions(ns=(4, 8), selection=ROUND_ROBIN))
    assert [len(f) for _, f, _ in pm.calls] == [100] * 2 + [80]  # 10 x 28 pairs
    whole = best_of_n(FnComparer(by_rank(random_rank(2))), items[:10],
                      BoNOptions(ns=(4, 8), selection=ROUND_ROBIN))
    assert chunked.to_dict() == whole.to_dict()


def test_selection_options_are_validated():
    assert BoNOptions(selection="round-robin").selection == (ROUND_ROBIN,)
    with pytest.raises(ValueError, match="selection"):
        BoNOptions(selection=("swiss",))
    with pytest.raises(ValueError, match="selection"):
        BoNOptions(selection=(KNOCKOUT, KNOCKOUT))
    with pytest.raises(ValueError, match="NaN"):
        best_of_n(FnComparer(lambda a, b: (math.nan, 0.5, 0.5)),
                  [GSM8KItem(id="x", question="q", answer="", gold="5",
                             solutions=list(SOLUTIONS))])


def test_a_scorer_keeps_its_shape_and_reports_n_reward_calls(items):
    report = best_of_n(LongerWins(), items, BoNOptions(ns=(4, 16)))
    assert list(report.methods) == [REWARD] and report.call == "reward"
    assert report.calls_run == sum(len(q.candidates) for q in report.questions)
    for r in report.results:
        assert r.method == REWARD and r.calls == r.n * r.questions
    d = report.to_dict()
    assert d["selection"] == [REWARD] and d["methods"][REWARD] == d["results"]
    assert "order_consistency" not in d
    row = report.example_rows()[0]
    assert set(row) == {"id", "gold", "candidates", "picks"}
    assert set(row["picks"]["4"]) == {"candidates", "credit"}
    assert "reward" in row["candidates"][0]
    assert report.summary().splitlines()[1].startswith("N=4: rm ")


# --------------------------------------------------------------------------- perturbations

def share(a: str, b: str) -> tuple[float, float, float]:
    """Longer wins, softly: P(first ≻ second) = |first| / (|first| + |second|)."""
    return len(a) / (len(a) + len(b)), len(b) / (len(a) + len(b)), 0.0


def test_perturbations_of_a_comparer_are_read_on_win_probabilities():
    records = [PairRecord(id=f"r{i}", prompt="Say something.", chosen="a" * (20 + 10 * i),
                          rejected="b" * 20) for i in range(4)]
    pm = FnComparer(share, consistent=lambda a, b: len(a) != len(b))
    report = evaluate_perturbations(pm, [EvalSet("toy", records)],
                                    PerturbOptions(("quotes@rejected",)))
    assert report.scale == "win probability"
    # r0 is an exact tie (20 vs 20): wrong, and inconsistent
    assert report.clean == {"n": 4, "accuracy": 0.75, "order_consistency": 0.75}
    clean = [share(r.chosen, r.rejected) for r in records]
    values = [p for c in clean for p in c[:2]]
    mean = sum(values) / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 8)
    assert report.reward_std == pytest.approx(std)
    (t,) = report.transformations
    # the rejected answer gets two quote characters: its win probability rises
    after = [share(r.chosen, f'"{r.rejected}"') for r in records]
    deltas = [abs(a[1] - c[1]) for a, c in zip(after, clean)]
    assert t.mean_abs_delta == pytest.approx(sum(deltas) / 4)
    assert t.mean_abs_delta_std == pytest.approx(sum(deltas) / 4 / std)
    assert t.accuracy == 0.75 and t.drop == 0.0
    # each distinct comparison once: the 4 clean ones (the consistency check is a memo hit)
    # and the 4 perturbed ones
    assert pm.comparisons == report.seconds["comparisons_run"] == 8
    assert "answers_scored" not in report.seconds
    assert "consistent in both orders 75.0" in report.table()


def test_audit_of_a_comparer_reads_the_probe_verdict():
    def causal(rid: str, direction: str, chosen: str, rejected: str) -> PairRecord:
        return PairRecord(id=rid, prompt="q", chosen=chosen, rejected=rejected,
                          provenance={"recipe": "causal", "attribute": "completeness",
                                      "direction": direction})

    pairs = [causal(f"d{i}", "degrade", "x" * 30, "x" * 20) for i in range(3)]
    pairs += [causal(f"u{i}", "upgrade", "x" * 30, "x" * 20) for i in range(2)]
    neutral = [EvalSet("n", [PairRecord(id=f"n{i}", prompt="p", chosen="y" * (10 + 10 * i),
                                        rejected="y" * 10) for i in range(4)])]
    pm = FnComparer(share)
    report = audit(pm, pairs, neutral, AuditOptions(perturbations=("quotes@both",)))
    assert report.scale == "win probability"
    sens = {s["direction"]: s for s in report.sensitivity}
    # degrade: original 30, rewrite 20: P(rewrite ≻ original) − P(original ≻ rewrite) = −0.2
    assert sens["degrade"]["mean_delta"] == pytest.approx(-0.2)
    assert sens["degrade"]["drop_rate"] == 1.0 and sens["degrade"]["expected_rate"] == 1.0
    assert sens["upgrade"]["mean_delta"] == pytest.approx(0.2)
    assert sens["upgrade"]["expected_rate"] == 1.0
    assert sens["degrade"]["tie_rate"] == 0.0 and sens["degrade"]["order_consistency"] == 1.0
    assert report.reward_std == pytest.approx(
        evaluate_perturbations(FnComparer(share), neutral,
                               PerturbOptions(("quotes@both",))).reward_std)
    assert sens["degrade"]["mean_delta_std"] == pytest.approx(-0.2 / report.reward_std)
    assert report.invariance[0]["mean_abs_delta"] > 0
    assert "win probability std" in report.table() and "original won" in report.table()
    # a scorer's perturbation report is on another scale
    scorer_report = evaluate_perturbations(LongerWins(), neutral, PerturbOptions(("quotes@both",)))
    with pytest.raises(ValueError, match="scale"):
        audit(pm, pairs, perturbed=scorer_report)


# --------------------------------------------------------------------------- a real PairPM

@pytest.fixture(scope="module")
def pairpm(tiny_bert, helpers):
    rm = helpers.perturbed_rm(tiny_bert, max_length=96, pairwise=True)
    assert rm.pairwise
    return rm


def finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_a_tiny_pairpm_runs_best_of_n(pairpm, data_dir, tmp_path):
    scorer = PairwiseScorer(pairpm, name="tiny-pm")
    report = run_bon(scorer, BoNOptions(ns=(2, 4), limit=3), data_dir=data_dir,
                     output_dir=tmp_path)
    assert scorer.comparisons == report.calls_run == 3 * 6  # every pair of 4, once
    saved = json.loads((tmp_path / "bon-tiny-pm.json").read_text())
    assert saved["selection"] == [KNOCKOUT, ROUND_ROBIN] and saved["call"] == "comparison"
    assert 0 <= saved["order_consistency"] <= 1
    for method in saved["selection"]:
        for r in saved["methods"][method]:
            assert r["questions"] == 3 and finite(r["rm"]) and 0 <= r["rm"] <= 1
    assert [r["calls_per_question"] for r in saved["methods"][KNOCKOUT]] == [1, 3]
    assert [r["calls_per_question"] for r in saved["methods"][ROUND_ROBIN]] == [1, 6]
    assert saved["results"] == saved["methods"][KNOCKOUT]
    rows = [json.loads(line) for line in
            (tmp_path / "bon-examples-tiny-pm.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(finite(float(r["picks"]["4"]["credit"])) for r in rows)


def test_a_tiny_pairpm_runs_perturbations_and_the_audit(pairpm, helpers):
    records = helpers.varied_pairs(6, seed=3, chat_every=0)
    sets = [EvalSet("toy", records)]
    scorer = PairwiseScorer(pairpm, name="tiny-pm")
    report = evaluate_perturbations(scorer, sets, PerturbOptions(("quotes@both",
                                                                  "filler@rejected")))
    assert report.scale == "win probability" and finite(report.reward_std)
    assert 0 <= report.clean["order_consistency"] <= 1 and finite(report.clean["accuracy"])
    assert report.seconds["comparisons_run"] == scorer.comparisons == 6 * 3
    for t in report.transformations:
        assert t.n == 6 and finite(t.accuracy) and finite(t.mean_abs_delta)
        assert finite(t.mean_abs_delta_std) and 0 <= t.consistency <= 1
    clean = compare_pairs(PairwiseScorer(pairpm), records)
    assert report.clean["accuracy"] == sum(p.margin > 0 for p in clean) / 6
    probes = [PairRecord(id=f"d{i}", prompt=r.prompt, chosen=r.chosen,
                         rejected=" ".join(r.chosen.split()[:2]),
                         provenance={"recipe": "causal", "attribute": "completeness",
                                     "direction": "degrade"})
              for i, r in enumerate(records)]
    result = audit(PairwiseScorer(pairpm, name="tiny-pm"), probes, perturbed=report)
    (sens,) = result.sensitivity
    assert sens["n"] == 6 and finite(sens["mean_delta"]) and finite(sens["mean_delta_std"])
    assert -1 <= sens["mean_delta"] <= 1 and 0 <= sens["tie_rate"] <= 1
    assert [v["transformation"] for v in result.invariance] == ["quotes@both"]
    json.dumps(result.to_dict(), allow_nan=False)
    json.dumps(report.to_dict(), allow_nan=False)
