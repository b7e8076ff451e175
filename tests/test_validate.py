"""The oracle's check of causal rewrites (crome.validate): requests and verdicts."""

from __future__ import annotations

import json
import math

import pytest

from crome.oracle.base import OracleResponse
from crome.rubrics import Attribute
from crome.validate import (
    INCONSISTENT,
    NOT_MOVED,
    OTHER_CHANGES,
    PASSED,
    UNPARSEABLE,
    WRONG_DIRECTION,
    judge_requests,
    judge_verdict,
    parse_answer,
    rewrite_log_odds,
    validation_requests,
    verdict_of,
)

ATTR = Attribute("correctness", "The facts and numbers are right.")


def _ok(text: str) -> OracleResponse:
    return OracleResponse(text=text)


@pytest.mark.parametrize("first,second,direction,reason", [
    # (answer with the original as A, answer with the rewrite as A)
    ("better: A\nother changes: no", "better: B\nother changes: no", "degrade", PASSED),
    ("better: B\nother changes: no", "better: A\nother changes: no", "upgrade", PASSED),
    # a judge that always says "A" names different replies in the two orders
    ("better: A\nother changes: no", "better: A\nother changes: no", "degrade", INCONSISTENT),
    ("better: B\nother changes: no", "better: A\nother changes: no", "degrade", WRONG_DIRECTION),
    ("better: same\nother changes: no", "better: same\nother changes: no", "upgrade",
     NOT_MOVED),
    ("better: A\nother changes: yes", "better: B\nother changes: no", "degrade",
     OTHER_CHANGES),
    ("better: A", "better: B\nother changes: no", "degrade", UNPARSEABLE),
    ("I like the first.", "better: B\nother changes: no", "degrade", UNPARSEABLE),
    ("Better: **A**\nOther changes: NO", "BETTER: B\nother: no", "degrade", PASSED),
])
def test_verdicts_need_both_orders_to_agree(first, second, direction, reason):
    v = verdict_of([_ok(first), _ok(second)], direction)
    assert v is not None and v.reason == reason
    assert v.passed == (reason == PASSED)
    assert len(v.to_dict()["better"]) == 2


def test_other_changes_can_be_allowed():
    pair = [_ok("better: A\nother changes: yes"), _ok("better: B")]
    assert verdict_of(pair, "degrade", reject_other_changes=False).passed
    assert verdict_of(pair, "degrade").reason in (OTHER_CHANGES, UNPARSEABLE)


def test_answers_are_read_in_terms_of_original_and_rewrite():
    assert parse_answer("better: A", rewrite_first=True).better == "rewrite"
    assert parse_answer("better: A", rewrite_first=False).better == "original"
    assert parse_answer("better: same\nother changes: yes", True).other_changes is True


def test_the_two_requests_show_each_reply_first_once():
    reqs = validation_requests("Q?", "the original", "the rewrite", ATTR, "degrade")
    shown_a = [r.message_dicts[-1]["content"].split("<reply A>")[1].split("</reply A>")[0]
               .strip() for r in reqs]
    assert shown_a == ["the original", "the rewrite"]
    assert [r.task_dict["rewrite_first"] for r in reqs] == [False, True]
    for r in reqs:
        assert r.sampling.temperature == 0.0 and "correctness" in r.message_dicts[-1]["content"]


def test_an_oracle_failure_is_no_verdict():
    pair = [_ok("better: A\nother changes: no"), OracleResponse(text=None, error="HTTP 500")]
    assert verdict_of(pair, "degrade") is None


def _scores(a: float | None, b: float | None) -> OracleResponse:
    return OracleResponse(text=json.dumps({"A": a, "B": b}))


def test_the_judge_requests_score_the_letters_in_both_orders():
    reqs = judge_requests("Q?", "the original", "the rewrite", ATTR, "upgrade")
    shown_a = [r.message_dicts[-1]["content"].split("<reply A>")[1].split("</reply A>")[0]
               .strip() for r in reqs]
    assert shown_a == ["the original", "the rewrite"]
    for r in reqs:
        assert r.sampling.choices == ("A", "B") and r.sampling.max_tokens == 1
        assert r.task_dict["kind"] == "judge"
    # a request that scores choices has another cache key than one that generates
    assert reqs[0].key_material() != validation_requests(
        "Q?", "the original", "the rewrite", ATTR, "upgrade")[0].key_material()


def test_the_log_odds_are_read_in_terms_of_the_rewrite():
    # the rewrite is B first, then A: a judge that prefers the rewrite says B, then A
    odds = rewrite_log_odds([_scores(-2.0, -0.5), _scores(-0.1, -3.0)])
    assert odds == pytest.approx((1.5, 2.9))


@pytest.mark.parametrize("first,second,direction,margin,reason", [
    # (original as A, rewrite as A): log P(A), log P(B)
    (_scores(-2.0, -0.5), _scores(-0.1, -3.0), "upgrade", 0.5, PASSED),
    (_scores(-0.5, -2.0), _scores(-3.0, -0.1), "degrade", 0.5, PASSED),
    # a judge that always says A: the orders disagree about the rewrite
    (_scores(-0.1, -3.0), _scores(-0.1, -3.0), "upgrade", 0.5, INCONSISTENT),
    (_scores(-2.0, -0.5), _scores(-0.1, -3.0), "degrade", 0.5, WRONG_DIRECTION),
    # the right way in both orders, but by less than the margin on average
    (_scores(-0.8, -0.6), _scores(-0.6, -0.8), "upgrade", 0.5, NOT_MOVED),
    (_scores(-0.8, -0.6), _scores(-0.6, -0.8), "upgrade", 0.1, PASSED),
    # a served judge that listed neither letter among its top tokens
    (_scores(None, None), _scores(-0.1, -3.0), "upgrade", 0.5, UNPARSEABLE),
    # only one letter listed: the other is below every listed token
    (_scores(None, -0.2), _scores(-0.1, None), "upgrade", 0.5, PASSED),
])
def test_the_logprob_judge_passes_what_both_orders_name_beyond_the_margin(
        first, second, direction, margin, reason):
    v = judge_verdict([first, second], direction, margin)
    assert v is not None and v.reason == reason
    if reason != UNPARSEABLE:
        d = v.to_dict()
        assert d["judge"] == "logprob" and len(d["log_odds"]) == 2


def test_a_constant_position_bias_cancels_in_the_mean():
    # true log-odds 1.0 for the rewrite; the judge adds +2 to whichever reply is A
    bias, truth = 2.0, 1.0
    first = _scores(math.log(0.5), math.log(0.5) + truth - bias)   # rewrite is B
    second = _scores(math.log(0.5) + truth + bias, math.log(0.5))  # rewrite is A
    odds = rewrite_log_odds([first, second])
    assert sum(odds) / 2 == pytest.approx(truth)
    # the first order names the original: a bias larger than the signal is inconsistent
    assert judge_verdict([first, second], "upgrade", 0.5).reason == INCONSISTENT


def test_a_failed_judge_request_is_no_verdict():
    assert judge_verdict([_scores(-1, -2), OracleResponse(None, error="x")], "upgrade", 0) is None
    garbled = OracleResponse(text="not json")
    assert judge_verdict([garbled, garbled], "upgrade", 0).reason == UNPARSEABLE
