"""Readers and writers: the bad-input corpus in ``bad/`` and round trips through every format."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from crome.data import (
    PairRecord,
    ReadReport,
    RecordError,
    from_dataset,
    read_pairs,
    to_dataset,
    write_pairs,
)

BAD = Path(__file__).parent / "bad"
CASES = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))["cases"]


def materialise(case: dict, tmp_path: Path) -> Path:
    """The corpus file of ``case``; templates are expanded into ``tmp_path``."""
    expand = case.get("expand")
    if expand is None:
        return BAD / case["file"]
    text = (BAD / expand["template"]).read_text(encoding="utf-8")
    path = tmp_path / case["file"]
    path.write_text(text.replace(expand["placeholder"], expand["char"] * expand["count"]),
                    encoding="utf-8")
    return path


def test_corpus_lists_every_file():
    listed = {c.get("expand", {}).get("template", c["file"]) for c in CASES}
    on_disk = {p.name for p in BAD.iterdir() if p.name != "EXPECTED.json"}
    assert listed == on_disk


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_record_is_named_by_file_line_and_field(case, tmp_path):
    path = materialise(case, tmp_path)
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    err = info.value
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"{path}:line {case['line']}: ")
    assert (err.path, err.line, err.field) == (str(path), case["line"], case["field"])
    if case["field"] is None:
        assert "field '" not in text
    else:
        assert f"field '{case['field']}'" in text
    assert case["message"] in text
    assert len(text) < 300  # the 10 MB answer must not end up in the message


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_skip_invalid_skips_exactly_the_bad_record(case, tmp_path):
    path = materialise(case, tmp_path)
    report = ReadReport()
    records = read_pairs(path, skip_invalid=True, report=report)
    assert len(records) == report.read == case["good"]
    assert report.skipped == 1
    assert report.reasons == {case["field"] or "record": 1}
    assert report.examples[0].startswith(f"{path}:line {case['line']}: ")
    assert len({r.id for r in records}) == len(records)


def sample_records() -> list[PairRecord]:
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime, please."},
        {"role": "assistant", "content": "Which range?"},
        {"role": "user", "content": "Below 10, \"quoted\", with, commas\nand a newline."},
    ]
    return [
        PairRecord(id="plain", prompt="What is 2+2?", chosen="4", rejected="5",
                   source="unit", subset="math", provenance={"stage": "source"}),
        PairRecord(id="chat", prompt=chat, chosen="7 — «prime»", rejected="8\n\n(even)",
                   source="unit", subset="chat",
                   provenance={"stage": "augment", "recipe": "causal", "attribute":
                               "correctness", "direction": "degrade", "parent_id": "plain",
                               "oracle": {"backend": "rules", "temperature": 0.0}}),
        PairRecord(id="tie", prompt="Unrelated question?", chosen="Answer A, long.",
                   rejected="Answer A, long.", label="tie", provenance={}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet"])
def test_round_trip_through_files(tmp_path, suffix):
    records = sample_records()
    path = tmp_path / f"pairs{suffix}"
    assert write_pairs(records, path) == len(records)
    assert read_pairs(path) == records
    assert not list(tmp_path.glob("*.tmp"))


def test_jsonl_gz_is_written_compressed(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    write_pairs(sample_records(), path)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        assert json.loads(fh.readline())["id"] == "plain"


def test_round_trip_through_datasets():
    records = sample_records()
    ds = to_dataset(records)
    assert ds.features["prompt"].dtype == "string"  # chat prompts as JSON text
    assert ds["prompt_is_chat"] == [False, True, False]
    assert from_dataset(ds) == records


def test_from_dataset_locates_and_skips_a_bad_row():
    ds = to_dataset(sample_records()).map(
        lambda row: {"chosen": "" if row["id"] == "chat" else row["chosen"]})
    with pytest.raises(RecordError, match=r"^<dataset>:record 2: field 'chosen': empty$"):
        from_dataset(ds)
    report = ReadReport(path="<dataset>")
    assert [r.id for r in from_dataset(ds, skip_invalid=True, report=report)] == ["plain", "tie"]
    assert report.reasons == {"chosen": 1}


def write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def csv_row(rid: str, **kw: str) -> dict[str, str]:
    row = {"id": rid, "prompt": "Q?", "prompt_is_chat": "false", "chosen": "good",
           "rejected": "bad", "label": "chosen", "source": "", "subset": "", "provenance": ""}
    row.update(kw)
    return row


def test_csv_bad_chat_prompt_is_located_and_skippable(tmp_path):
    # Before the fix the columnar decoding ran outside the per-record error handling: the
    # error named no line and skip_invalid could not skip it.
    path = tmp_path / "pairs.csv"
    write_csv(path, [csv_row("a"), csv_row("b", prompt="not json", prompt_is_chat="true"),
                     csv_row("c")])
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    assert (info.value.line, info.value.field) == (3, "prompt")
    report = ReadReport()
    assert [r.id for r in read_pairs(path, skip_invalid=True, report=report)] == ["a", "c"]
    assert report.reasons == {"prompt": 1}


def test_csv_error_names_the_line_where_a_multiline_record_starts(tmp_path):
    path = tmp_path / "pairs.csv"
    write_csv(path, [csv_row("a", chosen="line one\nline two\nline three"),
                     csv_row("b", chosen="first\nsecond", rejected="")])
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    # header is line 1, record "a" lines 2-4, record "b" lines 5-6
    assert (info.value.line, info.value.field) == (5, "rejected")


def test_csv_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    write_csv(path, [csv_row("a"), csv_row("b")], encoding="utf-8-sig")
    assert [r.id for r in read_pairs(path)] == ["a", "b"]


def test_json_error_names_record_number(tmp_path):
    path = tmp_path / "pairs.json"
    rows = [r.to_dict() for r in sample_records()]
    rows[1]["label"] = "rejected"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(RecordError, match=r"pairs\.json:record 2: field 'label': must be one"):
        read_pairs(path)
