"""Foreign layouts (TRL's four, UltraFeedback-binarized, hh-rlhf transcripts), optional ids,
duplicate ids, ``hf:`` sets and empty input: what a new user's data looks like."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crome.data import (
    PairRecord,
    ReadReport,
    RecordError,
    content_id,
    extract_prompt,
    from_dataset,
    load_named,
    load_rewardbench,
    read_pairs,
    write_pairs,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


HASH_ID = re.compile(r"^h:[0-9a-f]{16}$")

# --------------------------------------------------------------------- TRL's four layouts

TRL_LAYOUTS = {
    "standard-explicit": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        ("The sky is", " blue.", " green.")),
    "standard-implicit": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ("The sky is", " blue.", " green.")),
    "conversational-explicit": (
        {"prompt": [user("What color is the sky?")],
         "chosen": [bot("It is blue.")], "rejected": [bot("It is green.")]},
        ([user("What color is the sky?")], "It is blue.", "It is green.")),
    "conversational-implicit": (
        {"chosen": [user("What color is the sky?"), bot("It is blue.")],
         "rejected": [user("What color is the sky?"), bot("It is green.")]},
        ([user("What color is the sky?")], "It is blue.", "It is green.")),
}


@pytest.mark.parametrize("layout", list(TRL_LAYOUTS))
def test_trl_layout_from_jsonl(tmp_path, layout):
    row, (prompt, chosen, rejected) = TRL_LAYOUTS[layout]
    other = {"prompt": "hi", "chosen": "hello there", "rejected": "go away"}
    path = write_jsonl(tmp_path / "trl.jsonl", [row, other])
    report = ReadReport()
    records = read_pairs(path, report=report)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        (prompt, chosen, rejected), ("hi", "hello there", "go away")]
    assert all(HASH_ID.match(r.id) for r in records)
    assert (report.read, report.skipped, report.renamed) == (2, 0, 0)
    assert all(r.label == "chosen" and r.provenance == {} for r in records)


def test_the_issue_example_is_read_by_every_entry_point(tmp_path):
    row = {"prompt": "hi", "chosen": "hello there", "rejected": "go away"}
    path = write_jsonl(tmp_path / "mine.jsonl", [row])
    (rec,) = load_named(str(path)).records
    assert (rec.prompt, rec.chosen, rec.rejected) == ("hi", "hello there", "go away")
    assert rec.id == content_id(rec)
    # the same rows from CSV and Parquet (one code path for every reader)
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("prompt,chosen,rejected\nhi,hello there,go away\n", encoding="utf-8")
    pq_path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([row]), pq_path)
    assert read_pairs(csv_path) == read_pairs(pq_path) == [rec]


def test_extract_prompt_backs_off_one_space_like_trl():
    assert extract_prompt("The sky is blue.", "The sky is green.") == "The sky is"
    assert extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == "Q: 2+2? A:"
    assert extract_prompt("abc", "xyz") == ""


def test_conversational_explicit_with_a_system_prompt_and_history(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello."),
              user("Bye?")]
    row = {"prompt": prompt, "chosen": prompt + [bot("Bye!")], "rejected": [bot("No.")]}
    (rec,) = read_pairs(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert (rec.prompt, rec.chosen, rec.rejected) == (prompt, "Bye!", "No.")


# --------------------------------------------------------------------- UltraFeedback-binarized

def ultrafeedback_row(i: int, prompt_id: str) -> dict:
    prompt = f"Question number {i}?"
    chosen = [user(prompt), bot(f"A careful answer {i}.")]
    rejected = [user(prompt), bot(f"A sloppy answer {i}.")]
    return {"prompt": prompt, "prompt_id": prompt_id, "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": 8.5, "score_rejected": 3.0}


def test_ultrafeedback_binarized_shape(tmp_path):
    rows = [ultrafeedback_row(0, "9f0e"), ultrafeedback_row(1, "77ab")]
    report = ReadReport()
    records = read_pairs(write_jsonl(tmp_path / "uf.jsonl", rows), report=report)
    first = records[0]
    assert [r.id for r in records] == ["9f0e/0", "77ab/0"]
    # the prompt repeated at the head of chosen/rejected is stripped off
    assert (first.prompt, first.chosen, first.rejected) == (
        "Question number 0?", "A careful answer 0.", "A sloppy answer 0.")
    assert first.provenance == {"score_chosen": 8.5, "score_rejected": 3.0}
    assert not report.notes  # prompt_id and messages are understood, not "unknown"


def test_prompt_id_ids_count_rows_per_prompt_in_file_order(tmp_path):
    rows = [ultrafeedback_row(0, "a"), ultrafeedback_row(1, "b"), ultrafeedback_row(2, "a"),
            ultrafeedback_row(3, "a")]
    rows[2]["chosen"][1]["role"] = "user"  # invalid, skipped: keeps its position
    report = ReadReport()
    records = read_pairs(write_jsonl(tmp_path / "uf.jsonl", rows), skip_invalid=True,
                         report=report)
    assert [r.id for r in records] == ["a/0", "b/0", "a/2"]
    assert report.reasons == {"chosen[1].role": 1}


def test_known_columns_go_to_provenance_and_unknown_ones_are_counted(tmp_path):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_model": "m1",
             "rejected_model": "m2", "source_file": "x", "lang": "en"},
            {"prompt": "Q2", "chosen": "a", "rejected": "b", "lang": "de",
             "provenance": {"stage": "source", "chosen_model": "kept"},
             "chosen_model": "ignored"}]
    report = ReadReport()
    records = read_pairs(write_jsonl(tmp_path / "x.jsonl", rows), report=report)
    assert records[0].provenance == {"chosen_model": "m1", "rejected_model": "m2"}
    assert records[1].provenance == {"stage": "source", "chosen_model": "kept"}
    assert report.notes == {"unknown column 'lang' ignored": 2,
                            "unknown column 'source_file' ignored": 1}
    assert "unknown column 'lang' ignored: 2" in report.summary()


# --------------------------------------------------------------------- hh-rlhf transcripts

def test_hh_rlhf_hub_transcripts_become_chat_turns(tmp_path):
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?"
                       "\n\nAssistant: 4",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?"
                         "\n\nAssistant: 5"},
            {"chosen": "Human: List?\n\nAssistant: one\n\nAssistant: two",
             "rejected": "Human: List?\n\nAssistant: none"}]
    report = ReadReport()
    first, second = read_pairs(write_jsonl(tmp_path / "hh.jsonl", rows), report=report)
    assert first.prompt == [user("Hi"), bot("Hello!"), user("What is 2+2?")]
    assert (first.chosen, first.rejected) == ("4", "5")
    assert (second.prompt, second.chosen) == ([user("List?")], "one\n\ntwo")
    assert report.notes == {"merged consecutive assistant turns in an answer": 1}


@pytest.mark.parametrize("chosen, rejected, field, message", [
    ("\n\nHuman: A?\n\nAssistant: x", "\n\nHuman: B?\n\nAssistant: y", "prompt",
     "chosen and rejected prompts differ"),
    ("\n\nHuman: A?\n\nAssistant: x", "\n\nHuman: A?\n\nAssistant: y\n\nHuman: z",
     "rejected", "transcript ends with a Human turn"),
])
def test_bad_hh_transcript_names_line_and_field(tmp_path, chosen, rejected, field, message):
    good = {"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    assert (info.value.line, info.value.field) == (2, field)
    assert message in str(info.value)


# --------------------------------------------------------------------- bad conversational rows

PROMPT = [user("Q?")]


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": PROMPT, "chosen": [bot("a"), user("more?"), bot("b")], "rejected": [bot("c")]},
     "chosen", "3 messages after the prompt"),
    ({"prompt": PROMPT, "chosen": [bot("a")], "rejected": PROMPT + [user("c")]},
     "rejected[1].role", "must be an assistant message"),
    ({"chosen": [user("Q?"), bot("a")], "rejected": [user("Other?"), bot("b")]},
     "prompt", "share no leading messages"),
    ({"chosen": [user("Q?"), bot("a"), user("x"), bot("y")],
      "rejected": [user("Q?"), bot("a"), user("z"), bot("w")]},
     "chosen", "2 messages after the prompt"),
    ({"chosen": "Good answer.", "rejected": "Bad answer."}, "prompt", "common prompt"),
    ({"chosen": [user("Q?"), bot("a")], "rejected": "b"}, "prompt", "both message lists"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": ["x"]}],
      "rejected": [bot("b")]}, "chosen[0].content", "content must be a string"),
])
def test_bad_conversational_row_names_line_and_field(tmp_path, row, field, message):
    good = {"prompt": PROMPT, "chosen": [bot("fine")], "rejected": [bot("worse")]}
    path = write_jsonl(tmp_path / "conv.jsonl", [good, good | {"chosen": [bot("ok")]}, row])
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:line 3: field '{field}': ")
    assert message in str(err)
    report = ReadReport()
    assert len(read_pairs(path, skip_invalid=True, report=report)) == 2
    assert report.reasons == {field: 1}


# --------------------------------------------------------------------- ids

def test_hash_ids_are_stable_across_reads_and_reordering(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(5)]
    first = {r.prompt: r.id for r in read_pairs(write_jsonl(tmp_path / "a.jsonl", rows))}
    again = {r.prompt: r.id for r in read_pairs(tmp_path / "a.jsonl")}
    shuffled = rows[3:] + rows[:3]
    moved = {r.prompt: r.id for r in read_pairs(write_jsonl(tmp_path / "b.jsonl",
                                                            shuffled))}
    assert first == again == moved
    assert len(set(first.values())) == 5 and all(HASH_ID.match(i) for i in first.values())
    # the id depends on the pair's content, not on label, source or subset
    rows[0] |= {"subset": "other", "source": "elsewhere"}
    changed = {r.prompt: r.id for r in read_pairs(write_jsonl(tmp_path / "c.jsonl", rows))}
    assert changed == first
    rows[1]["chosen"] += "!"
    edited = {r.prompt: r.id for r in read_pairs(write_jsonl(tmp_path / "d.jsonl", rows))}
    assert edited["Q1"] != first["Q1"] and edited["Q2"] == first["Q2"]


def test_identical_pairs_without_ids_get_suffixes_and_a_warning(tmp_path, caplog):
    same = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    rows = [same, {"prompt": "R", "chosen": "a", "rejected": "b"}, same, same]
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="crome.data.io"):
        records = read_pairs(write_jsonl(tmp_path / "dup.jsonl", rows), report=report)
    base = records[0].id
    assert [r.id for r in records] == [base, records[1].id, f"{base}#2", f"{base}#3"]
    assert report.renamed == 2
    assert report.rename_reasons == {"identical pair without an id": 2}
    assert "2 duplicate ids made unique" in report.summary()
    assert "2 duplicate ids made unique" in caplog.text and "dup.jsonl" in caplog.text


def test_given_id_repeated_in_another_subset_is_renamed_and_counted(tmp_path, caplog):
    rows = [{"id": 7, "prompt": "P", "chosen": "a", "rejected": "b", "subset": "alpha"},
            {"id": "7", "prompt": "P2", "chosen": "c", "rejected": "d", "subset": "beta"},
            {"id": 8, "prompt": "P3", "chosen": "e", "rejected": "f", "subset": "beta"},
            {"id": 7, "prompt": "P4", "chosen": "g", "rejected": "h", "subset": "gamma"}]
    path = write_jsonl(tmp_path / "subsets.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="crome.data.io"):
        result = load_named(str(path))
    assert [r.id for r in result.records] == ["7", "7@beta", "8", "7@gamma"]
    assert result.notes == {"duplicate id made unique (id repeated in another subset)": 2}
    assert "duplicate id made unique" in result.summary()
    assert "7 -> 7@beta" in caplog.text
    # deterministic: the same file gives the same ids
    assert [r.id for r in read_pairs(path)] == ["7", "7@beta", "8", "7@gamma"]


def test_given_id_repeated_within_a_subset_is_still_an_error(tmp_path):
    rows = [{"id": "x", "prompt": "P", "chosen": "a", "rejected": "b", "subset": "s1"},
            {"id": "x", "prompt": "P2", "chosen": "c", "rejected": "d", "subset": "s2"},
            {"id": "x", "prompt": "P3", "chosen": "e", "rejected": "f", "subset": "s1"}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(RecordError) as info:
        read_pairs(path)
    assert (info.value.line, info.value.field) == (3, "id")
    assert "duplicate id 'x' in subset 's1'" in str(info.value)


def test_given_ids_beat_derived_ones_and_all_stay_unique(tmp_path):
    rows = [{"id": "q/0", "prompt": "P", "chosen": "a", "rejected": "b"},
            {"prompt_id": "q", "prompt": "P2", "chosen": "c", "rejected": "d"},
            {"prompt": "P3", "chosen": "e", "rejected": "f"}]
    report = ReadReport()
    records = read_pairs(write_jsonl(tmp_path / "mixed.jsonl", rows), report=report)
    assert [r.id for r in records][:2] == ["q/0", "q/0#2"]
    assert HASH_ID.match(records[2].id)
    assert report.rename_reasons == {"derived id already taken": 1}


@pytest.mark.parametrize("bad, field", [({"id": True}, "id"), ({"id": ""}, "id"),
                                        ({"prompt_id": ["x"]}, "prompt_id")])
def test_unusable_id_values_are_errors(tmp_path, bad, field):
    row = {"prompt": "P", "chosen": "a", "rejected": "b"} | bad
    with pytest.raises(RecordError) as info:
        read_pairs(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert (info.value.line, info.value.field) == (1, field)


# --------------------------------------------------------------------- the native layout

def test_native_records_round_trip_unchanged_in_every_format(tmp_path):
    records = [PairRecord(id="n1", prompt=[user("Hi"), bot("Yo"), user("Q?")], chosen="A",
                          rejected="B", source="s", subset="x",
                          provenance={"stage": "augment", "parent_id": "p"}),
               PairRecord(id="n2", prompt="Plain?", chosen="C", rejected="C", label="tie")]
    for suffix in (".jsonl", ".csv", ".parquet", ".json"):
        path = tmp_path / f"native{suffix}"
        write_pairs(records, path)
        report = ReadReport()
        assert read_pairs(path, report=report) == records
        assert not report.notes and not report.renamed


def test_datasets_rows_in_trl_layout(tmp_path):
    import datasets

    # the second row has no prompt, prompt_id or scores: datasets fills in None there
    rows = [ultrafeedback_row(0, "p"), TRL_LAYOUTS["conversational-implicit"][0]]
    records = from_dataset(datasets.Dataset.from_list(rows))
    assert [r.chosen for r in records] == ["A careful answer 0.", "It is blue."]
    assert records[0].id == "p/0" and HASH_ID.match(records[1].id)
    assert records[1].prompt == [user("What color is the sky?")]
    assert records[1].provenance == {}


# --------------------------------------------------------------------- hf:

@pytest.fixture
def uf_rows() -> list[dict]:
    return [ultrafeedback_row(i, f"p{i}") for i in range(3)]


def test_hf_save_to_disk_dataset_and_datasetdict(tmp_path, uf_rows):
    import datasets

    ds = datasets.Dataset.from_list(uf_rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds.select([2])}).save_to_disk(
        str(tmp_path / "dd"))
    one = load_named(f"hf:{tmp_path / 'one'}")
    assert [r.id for r in one.records] == ["p0/0", "p1/0", "p2/0"]
    assert one.records[0].chosen == "A careful answer 0."
    assert one.name == "one"
    test = load_named(f"hf:{tmp_path / 'dd'}:test_prefs")
    assert [r.id for r in test.records] == ["p2/0"] and test.name == "dd:test_prefs"
    assert len(load_named(f"hf:{tmp_path / 'dd'}:train_prefs", limit=2).records) == 2
    with pytest.raises(ValueError, match=r"a DatasetDict with splits train_prefs, test_prefs; "
                                         r"name one as hf:.*dd:SPLIT"):
        load_named(f"hf:{tmp_path / 'dd'}")
    with pytest.raises(ValueError, match="no split 'test'; it has train_prefs, test_prefs"):
        load_named(f"hf:{tmp_path / 'dd'}:test")


def test_hf_parquet_file_and_bad_row_location(tmp_path, uf_rows):
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(uf_rows), path)
    result = load_named(f"hf:{path}")
    assert [r.id for r in result.records] == ["p0/0", "p1/0", "p2/0"]
    assert result.records[1].provenance == {"score_chosen": 8.5, "score_rejected": 3.0}
    uf_rows[1]["rejected"] = uf_rows[1]["rejected"] + [user("and?")]
    pq.write_table(pa.Table.from_pylist(uf_rows), path)
    with pytest.raises(RecordError) as info:
        load_named(f"hf:{path}")
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "rejected")


def test_hf_bad_row_in_a_saved_dataset_names_the_set_and_record(tmp_path, uf_rows):
    import datasets

    uf_rows[2]["chosen"] = [user("Question number 2?"), user("hm")]
    datasets.Dataset.from_list(uf_rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(RecordError) as info:
        load_named(f"hf:{tmp_path / 'bad'}")
    assert str(info.value).startswith(f"hf:{tmp_path / 'bad'}:record 3: field 'chosen[1].role'")
    result = load_named(f"hf:{tmp_path / 'bad'}", skip_invalid=True)
    assert len(result.records) == 2 and result.skipped == {"chosen[1].role": 1}


def test_hf_hub_failure_is_one_line_naming_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        load_named("hf:nobody/no-such-set:test")
    message = str(info.value)
    assert message.startswith("hf:nobody/no-such-set:test: cannot load it from the Hugging "
                              "Face Hub (")
    assert "\n" not in message and "HF_HUB_OFFLINE=0" in message
    with pytest.raises(ValueError, match=r"^hf:/no/such/folder: no such file or folder$"):
        load_named("hf:/no/such/folder")


# --------------------------------------------------------------------- empty input

def test_empty_user_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("EMPTY.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"^EMPTY\.jsonl: no records$"):
        load_named("EMPTY.jsonl")
    assert read_pairs("EMPTY.jsonl") == []  # internal stages may write and read nothing
    assert load_named("EMPTY.jsonl", limit=0).records == []
    write_jsonl(Path("bad.jsonl"), [{"prompt": "P", "chosen": "a"}, {"prompt": "Q"}])
    with pytest.raises(RecordError, match=r"^bad\.jsonl: no valid records \(2 invalid "
                                          r"skipped\)$"):
        load_named("bad.jsonl", skip_invalid=True)
    Path("empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(RecordError, match="empty.csv: no records"):
        load_named("empty.csv")
    Path("rb.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(RecordError, match=r"^rb\.jsonl: no records$"):
        load_rewardbench("rb.jsonl")
