"""The oracle's check of causal rewrites (crome.validate): requests and verdicts."""

from __future__ import annotations

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
    parse_answer,
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
