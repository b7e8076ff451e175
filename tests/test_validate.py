"""The oracle's check of causal rewrites (crome.validate): requests and verdicts."""

from __future__ import annotations

import pytest

from crome.oracle.base import OracleResponse
from crome.rubrics import Attribute
from crome.validate import (
    NOT_MOVED,
    OTHER_CHANGES,
    PASSED,
    UNPARSEABLE,
    WRONG_DIRECTION,
    parse_verdict,
    rewrite_shown_first,
    validation_request,
    verdict_of,
)

ATTR = Attribute("correctness", "The facts and numbers are right.")


@pytest.mark.parametrize("text,direction,first,reason,better", [
    ("better: A\nother changes: no", "degrade", False, PASSED, "original"),
    ("better: B\nother changes: no", "degrade", True, PASSED, "original"),
    ("better: B\nother changes: no", "degrade", False, WRONG_DIRECTION, "rewrite"),
    ("better: A\nother changes: no", "upgrade", True, PASSED, "rewrite"),
    ("Better: **A**\nOther changes: NO", "upgrade", False, WRONG_DIRECTION, "original"),
    ("better: same\nother changes: no", "upgrade", True, NOT_MOVED, "same"),
    ("better: A\nother changes: yes", "degrade", False, OTHER_CHANGES, "original"),
    ("better: A", "degrade", False, UNPARSEABLE, "original"),
    ("I think the first one.", "degrade", False, UNPARSEABLE, None),
])
def test_verdicts(text, direction, first, reason, better):
    v = parse_verdict(text, direction, first)
    assert v.reason == reason and v.better == better
    assert v.passed == (reason == PASSED)


def test_other_changes_can_be_allowed():
    v = parse_verdict("better: A\nother changes: yes", "degrade", False,
                      reject_other_changes=False)
    assert v.passed and v.other_changes is True
    assert parse_verdict("better: A", "degrade", False, reject_other_changes=False).passed


def test_the_order_is_a_stable_coin_flip_per_task():
    flips = [rewrite_shown_first(f"task{i}", 0) for i in range(200)]
    assert 70 < sum(flips) < 130  # both orders are used
    assert flips == [rewrite_shown_first(f"task{i}", 0) for i in range(200)]


def test_the_request_shows_the_rewrite_where_the_task_says():
    for task_id in ("t1", "t2", "t3", "t4"):
        req = validation_request("Q?", "the original", "the rewrite", ATTR, "degrade", task_id)
        user = req.message_dicts[-1]["content"]
        a = user.split("<reply A>")[1].split("</reply A>")[0].strip()
        first = rewrite_shown_first(task_id, 0)
        assert a == ("the rewrite" if first else "the original")
        assert req.task_dict["rewrite_first"] == first
        assert req.sampling.temperature == 0.0 and "correctness" in user


def test_an_oracle_failure_is_no_verdict():
    assert verdict_of(OracleResponse(text=None, error="HTTP 500"), "degrade", True) is None
    assert verdict_of(OracleResponse(text="better: B\nother changes: no"), "degrade",
                      True).passed
