"""Resumable JSONL: what a killed writer leaves behind is repaired, never duplicated."""

from __future__ import annotations

import json

import pytest

from crome.data.schema import RecordError
from crome.data.stream import ResumableJsonl


def test_write_then_resume_skips_done_keys(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResumableJsonl(path) as out:
        assert out.write({"id": "a", "v": 1})
        assert out.write({"id": "b", "v": 2})
        assert not out.write({"id": "a", "v": 3})  # a key is written once
    with ResumableJsonl(path) as out:
        assert out.done == {"a", "b"}
        assert [r["v"] for r in out.rows()] == [1, 2]
        out.write({"id": "c", "v": 3})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_torn_last_line_is_dropped_and_counted(tmp_path):
    path = tmp_path / "out.jsonl"
    good = json.dumps({"id": "a"}) + "\n"
    path.write_text(good + '{"id": "b", "text": "half a ro')
    with ResumableJsonl(path) as out:
        assert out.done == {"a"}
        assert out.repaired_bytes == len('{"id": "b", "text": "half a ro')
        out.write({"id": "b", "text": "whole"})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b"]


def test_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}))
    with ResumableJsonl(path) as out:
        assert out.done == {"a", "b"} and out.repaired_bytes == 0
        out.write({"id": "c"})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(RecordError, match=r"out.jsonl:line 2: invalid JSON"):
        ResumableJsonl(path).__enter__()


def test_row_without_key_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"name": "a"}\n')
    with pytest.raises(RecordError, match="field 'id'"):
        ResumableJsonl(path).__enter__()


def test_forget_lets_a_key_be_rewritten_and_the_last_row_wins(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResumableJsonl(path) as out:
        out.write({"id": "a", "status": "failed"})
    with ResumableJsonl(path) as out:
        assert not out.write({"id": "a", "status": "again"})
        out.forget("a")
        assert out.write({"id": "a", "status": "done"})
    with ResumableJsonl(path) as out:
        assert [r["status"] for r in out.rows()] == ["done"]
