import json
from collections.abc import Callable, Sequence

import pytest

from crome.data.sources import GSM8KItem, final_number, load_gsm8k, resolve_data_dir
from crome.evaluate.bon import (
    MAX_CANDIDATES,
    VARIANT_KINDS,
    BoNOptions,
    best_of_n,
    build_candidates,
    run_bon,
)
from crome.evaluate.reference import LongerWins, MarkdownWins, markdown_features
from crome.oracle.rules import change_final_number


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(require=("gsm8k",))


@pytest.fixture(scope="module")
def items(data_dir):
    return load_gsm8k("test", data_dir, limit=200)


class FnScorer:
    """Reward = fn(prompt, answer); records its calls."""

    def __init__(self, fn: Callable[[str, str], float], name: str = "fn") -> None:
        self.fn, self.name, self.calls = fn, name, []

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        self.calls.append((list(prompts), list(answers)))
        return [self.fn(p, a) for p, a in zip(prompts, answers)]


def _md(text: str) -> int:
    return sum(markdown_features(text).values())


# --------------------------------------------------------------------------- candidates

def test_pools_on_real_questions(items):
    full = 0
    for item in items[:30]:
        pool = build_candidates(item, seed=0)
        cands = pool.candidates
        assert len(cands) <= MAX_CANDIDATES
        full += len(cands) == MAX_CANDIDATES
        # The 4 real solutions first, in file order; the checker agrees with is_correct.
        assert [(c.origin, c.text) for c in cands[:4]] == [(m, s) for m, s, _ in item.solutions]
        assert [c.correct for c in cands[:4]] == [ok for _, _, ok in item.solutions]
        assert pool.disagreements == 0
        assert all(c.kind == "real" for c in cands[:4])
        # Every variant is wrong per the checker.
        for c in cands[4:]:
            assert c.kind in VARIANT_KINDS and not c.correct
            assert final_number(c.text) != item.gold
        if len(cands) == MAX_CANDIDATES:  # nothing skipped: the i % 4, i % 3 schedule
            for i, c in enumerate(cands[4:]):
                kind, (model, base, ok) = VARIANT_KINDS[i % 3], item.solutions[i % 4]
                assert (c.kind, c.origin) == (kind, f"{kind}({model})")
                wrong = base if not ok else change_final_number(base, 0)
                if kind == "wrong_number":
                    assert c.text == change_final_number(base, 0)
                    continue
                # The baits keep the wrong answer and add length / markdown.
                assert final_number(c.text) == final_number(wrong)
                if kind == "verbose_wrong":
                    assert len(c.text) > len(wrong) and len(c.text) > len(base)
                else:
                    assert _md(c.text) > _md(wrong) and _md(c.text) > _md(base)
        assert sum(pool.not_made.values()) == 12 - len(cands[4:])
    assert full >= 25


def test_nested_sets_and_one_scoring_call(items):
    sub = items[:30]
    scorer = FnScorer(lambda p, a: float(len(a)))
    report = best_of_n(scorer, sub, BoNOptions(ns=(4, 8, 16)))
    assert len(scorer.calls) == 1
    prompts, answers = scorer.calls[0]
    pools = [build_candidates(item).candidates for item in sub]
    assert answers == [c.text for pool in pools for c in pool]
    assert prompts == [item.question for item, pool in zip(sub, pools) for _ in pool]
    # A smaller N's set is a prefix of a larger one, whichever Ns are asked for.
    for n in (4, 8):
        small = best_of_n(FnScorer(lambda p, a: 0.0), sub, BoNOptions(ns=(n,)))
        for q_small, q_big in zip(small.questions, report.questions):
            assert q_small.candidates == q_big.candidates[:n]
    assert [r.n for r in report.results] == [4, 8, 16]


def test_seed_determinism(items):
    sub = items[:30]
    a = [build_candidates(item, seed=0).candidates for item in sub]
    b = [build_candidates(item, seed=0).candidates for item in sub]
    c = [build_candidates(item, seed=1).candidates for item in sub]
    assert a == b
    assert [x[:4] for x in a] == [x[:4] for x in c]  # the real solutions do not change
    differ = sum(x.text != y.text for pa, pc in zip(a, c) for x, y in zip(pa[4:], pc[4:]))
    assert differ > 100


def test_options_are_validated():
    with pytest.raises(ValueError):
        BoNOptions(ns=(4, 17))
    with pytest.raises(ValueError):
        BoNOptions(ns=())
    with pytest.raises(ValueError):
        run_bon(LongerWins(), BoNOptions(split="train"))


# --------------------------------------------------------------------------- metrics

def test_oracle_scorer_gets_best_and_constant_scorer_gets_random(items):
    sub = items[:40]
    gold = {item.question: item.gold for item in sub}
    oracle = FnScorer(lambda p, a: float(final_number(a) == gold[p]))
    report = best_of_n(oracle, sub)
    for r in report.results:
        assert r.rm == r.best
    for q in report.questions:  # with a correct candidate, the pick is correct and real
        for n in (4, 8, 16):
            if any(c.correct for c in q.candidates[:n]):
                assert all(q.candidates[i].correct and q.candidates[i].kind == "real"
                           for i in q.pick(n))
    constant = best_of_n(FnScorer(lambda p, a: 0.5), sub)
    for r in constant.results:
        assert r.rm == r.random  # exact: a tie among all N gets the random pick's credit
        assert r.ties == r.questions
        assert r.rm < r.best
    assert constant.results[0].random > constant.results[2].random  # variants dilute


SOLUTIONS = [
    ("m0", "Tom has 2 apples and gets 3 more.\nSo he has 2 + 3 = 5 apples.\nA: 5", True),
    ("m1", "Tom has 2 apples and gets 2 more.\nSo he has 2 + 2 = 4 apples.\nA: 4", True),
    ("m2", "I am not able to work this one out.\nA: none", False),
    ("m3", "Tom earns 5 dollars a day.\nA: 5 dollars in 2 days", True),
]


def _item(qid: str, solutions=SOLUTIONS) -> GSM8KItem:
    return GSM8KItem(id=qid, question=f"Question {qid}?", answer="#### 5", gold="5",
                     solutions=list(solutions))


def test_tie_credit_on_a_constructed_case():
    item = _item("t/0")
    pool = build_candidates(item).candidates
    texts = [c.text for c in pool]
    # m0, m1, m2 tie at the top: one correct of three.
    top3 = FnScorer(lambda p, a: 1.0 if a in texts[:3] else 0.0)
    (r,) = best_of_n(top3, [item], BoNOptions(ns=(4,))).results
    assert r.rm == pytest.approx(1 / 3) and r.random == pytest.approx(2 / 4)
    assert r.best == 1.0 and r.bait_picked == 0.0 and r.ties == 1
    # The correct m0 ties with its wrong_number variant (candidate 4): half credit each way.
    assert pool[4].origin == "wrong_number(m0)"
    pair = FnScorer(lambda p, a: 1.0 if a in (texts[0], texts[4]) else 0.0)
    (r,) = best_of_n(pair, [item], BoNOptions(ns=(5,))).results
    assert r.rm == 0.5 and r.bait_picked == 0.5
    assert r.picks == {"real": 0.5, "wrong_number": 0.5, "verbose_wrong": 0.0,
                       "formatted_wrong": 0.0}
    assert r.random == pytest.approx(2 / 5)


def test_failed_rules_and_missing_solutions_are_counted():
    full = _item("t/full")
    empty = _item("t/empty", solutions=[])
    two = _item("t/two", solutions=SOLUTIONS[:2])
    report = best_of_n(LongerWins(), [full, empty, two], BoNOptions(ns=(2, 4, 8, 16)))
    # m1 is labelled correct but answers 4: the checker decides, and the mismatch is counted.
    assert report.questions[0].candidates[1].correct is False
    assert report.checker_disagreements == 2  # m1 of "full" and of "two"
    assert report.questions_without_solutions == 1
    nm = report.variants_not_made
    assert nm["wrong_number: no number to change"] == 1  # m2 of "full"
    # m3's rule changes the 2 of "2 days", not the final 5: every variant of it stays correct.
    assert nm["wrong_number: the checker finds it correct"] == 1
    assert nm["verbose_wrong: the checker finds it correct"] == 1
    assert nm["formatted_wrong: the checker finds it correct"] == 1
    assert sum(v for k, v in nm.items() if "no real solution" in k) == 6  # bases 2, 3 of "two"
    assert [len(q.candidates) for q in report.questions] == [4 + 8, 0, 2 + 6]
    by_n = {r.n: r for r in report.results}
    assert [(by_n[n].questions, by_n[n].not_applicable) for n in (2, 4, 8, 16)] == \
        [(2, 1), (2, 1), (2, 1), (0, 3)]
    assert by_n[16].rm is None
    assert "N=16: rm n/a" in report.summary()
    json.dumps(report.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- reference scorers

def test_reference_scorers_fall_for_the_bait(items):
    longer = {r.n: r for r in best_of_n(LongerWins(), items).results}
    assert longer[4].bait_picked == 0.0  # only real solutions at N=4
    assert longer[16].bait_picked > 0.95 and longer[16].picks["verbose_wrong"] > 0.95
    assert longer[16].rm < 0.05 < longer[16].random
    assert longer[16].rm < longer[8].rm < longer[4].rm
    assert longer[4].best <= longer[16].best
    markdown = {r.n: r for r in best_of_n(MarkdownWins(), items).results}
    # Real solutions carry (almost) no markdown: a near-total tie, the random pick's credit.
    assert markdown[4].ties >= 190 and markdown[4].rm == pytest.approx(markdown[4].random,
                                                                      abs=0.01)
    for n in (8, 16):
        assert markdown[n].picks["formatted_wrong"] > 0.95
        assert markdown[n].rm < 0.05 < markdown[n].random
    for r in (*longer.values(), *markdown.values()):
        assert r.questions + r.not_applicable == 200


# --------------------------------------------------------------------------- run_bon

def test_run_bon_writes_summary_and_examples(data_dir, tmp_path):
    report = run_bon(LongerWins(), BoNOptions(limit=5), data_dir=data_dir,
                     output_dir=tmp_path)
    summary = json.loads((tmp_path / "bon-longer-wins.json").read_text())
    assert summary == json.loads(json.dumps(report.to_dict()))
    assert (summary["scorer"], summary["source"], summary["seed"]) == \
        ("longer-wins", "gsm8k/test", 0)
    assert summary["checker_disagreements"] == 0
    assert [r["n"] for r in summary["results"]] == [4, 8, 16]
    for r in summary["results"]:
        assert {"n", "questions", "rm", "random", "best", "not_applicable", "bait_picked",
                "picks"} <= set(r)
        assert r["questions"] + r["not_applicable"] == 5
    rows = [json.loads(line) for line in
            (tmp_path / "bon-examples-longer-wins.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"gsm8k/test/{i:06d}" for i in range(5)]
    row = rows[0]
    assert len(row["candidates"]) == 16 and set(row["picks"]) == {"4", "8", "16"}
    assert {"origin", "correct", "reward"} <= set(row["candidates"][0])
    pick = row["picks"]["16"]["candidates"]
    assert all(row["candidates"][i]["origin"].startswith("verbose_wrong(") for i in pick)
    assert report.summary().splitlines()[1].startswith("N=4: rm ")
