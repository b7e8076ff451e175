"""The ``crome`` command, run as users run it: ``python -m crome.cli …`` in a subprocess."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crome.data.io import write_pairs
from crome.data.schema import PairRecord
from crome.data.sources import SOURCES
from crome.model import ModelOptions, RewardModel
from crome.score import score_pairs

HERE = Path(__file__).parent
BAD = HERE / "data" / "bad"
CASES = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))["cases"]


def _materialise():
    """``materialise`` from tests/data/test_io.py (test modules are not a package)."""
    spec = importlib.util.spec_from_file_location("_crome_test_io", HERE / "data" / "test_io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.materialise


materialise = _materialise()


def expected_error_line(case: dict, path: Path) -> str:
    field = f"field '{case['field']}': " if case["field"] else ""
    return f"crome: error: {path}:line {case['line']}: {field}"


def assert_one_line_error(proc, case: dict, path: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(expected_error_line(case, path)), lines[0]
    assert case["message"] in lines[0]
    if case["field"] is None:
        assert "field '" not in lines[0]
    assert len(lines[0]) < 400  # the 10 MB answer is not echoed


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    return {c["file"]: materialise(c, tmp) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_validate_bad_file_is_one_line_and_exit_2(case, bad_files, helpers, tmp_path):
    path = bad_files[case["file"]]
    proc = helpers.run_cli("validate", path, cwd=tmp_path)
    assert_one_line_error(proc, case, path)
    assert proc.stdout == ""


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_validate_skip_invalid_reports_one_skipped(case, bad_files, helpers, tmp_path):
    path = bad_files[case["file"]]
    proc = helpers.run_cli("validate", path, "--skip-invalid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    reason = case["field"] or "record"
    assert lines[0] == (f"{path}: {case['good']} records read, 1 invalid skipped "
                        f"({reason}: 1)")
    assert lines[1].startswith(f"  skipped: {path}:line {case['line']}: ")
    assert len(lines) == 2


def _train_bad_args(path: Path, tmp_path: Path) -> list[str]:
    # A backbone that does not exist: had the model been loaded before the data was read,
    # the error would name the backbone and not the data file.
    return ["train", "--data", str(path), "--backbone", str(tmp_path / "no-such-model"),
            "--out", str(tmp_path / "run"), "--no-progress"]


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_train_stops_on_bad_data_before_loading_a_model(case, bad_files, tmp_path, capfd):
    """In process (one import of torch for all nine files); the two subprocess runs below
    check the same thing as users run it."""
    from crome.cli import main

    path = bad_files[case["file"]]
    code = main(_train_bad_args(path, tmp_path))
    captured = capfd.readouterr()

    class Proc:
        returncode = code
        stdout = captured.out
        stderr = captured.err

    assert_one_line_error(Proc, case, path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["huge_answer.jsonl", "wrong_roles.jsonl"])
def test_train_stops_on_bad_data_in_a_subprocess(name, bad_files, helpers, tmp_path):
    case = next(c for c in CASES if c["file"] == name)
    path = bad_files[name]
    proc = helpers.run_cli(*_train_bad_args(path, tmp_path), cwd=tmp_path)
    assert_one_line_error(proc, case, path)
    assert not (tmp_path / "run").exists()


def test_train_skip_invalid_trains_on_the_good_records(tiny_bert, helpers, tmp_path):
    case = next(c for c in CASES if c["file"] == "truncated_json.jsonl")
    path = BAD / case["file"]
    out = tmp_path / "run"
    proc = helpers.run_cli("train", "--data", path, "--skip-invalid", "--backbone", tiny_bert,
                           "--out", out, "--max-length", "32", "--batch-size", "2",
                           "--no-bf16", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "truncated_json: 2 pairs, 1 skipped (record: 1)" in proc.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["pairs"] == 2 and summary["steps"] == 1
    assert (out / "crome.json").exists()


def test_unknown_data_is_one_line_and_exit_2(helpers, tmp_path):
    proc = helpers.run_cli("validate", tmp_path / "nope.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"crome: error: {tmp_path / 'nope.jsonl'}: "
                                        f"no such file"]
    proc = helpers.run_cli("train", "--data", "nope.jsonl", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert "'nope.jsonl' is neither a known source" in proc.stderr


def test_empty_data_is_one_line_and_exit_2(helpers, tmp_path):
    (tmp_path / "EMPTY.jsonl").write_text("", encoding="utf-8")
    out = tmp_path / "eval"
    proc = helpers.run_cli("eval", "--reference", "longer-wins", "--data", "EMPTY.jsonl",
                           "--out", out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["crome: error: EMPTY.jsonl: no records"]
    assert not (out / "results.json").exists()
    proc = helpers.run_cli("export", "EMPTY.jsonl", tmp_path / "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["crome: error: EMPTY.jsonl: no records"]


def test_trl_file_without_ids_is_read_and_hub_errors_are_one_line(helpers, tmp_path):
    rows = [{"prompt": "hi", "chosen": "hello there", "rejected": "go away"},
            {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
             "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B"}]}]
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = helpers.run_cli("export", "trl.jsonl", tmp_path / "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trl: 2 pairs" in proc.stderr
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"][:2] for r in written] == ["h:", "h:"]
    assert written[1]["prompt"] == [{"role": "user", "content": "Q?"}]
    proc = helpers.run_cli("export", "hf:nobody/no-such-set", tmp_path / "hub.jsonl",
                           cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("crome: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("crome: error: hf:nobody/no-such-set: cannot load it from the "
                                "Hugging Face Hub")


def test_sources_lists_every_name(helpers, tmp_path):
    proc = helpers.run_cli("sources", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == list(SOURCES)
    assert proc.stderr == ""


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_bert, tmp_path_factory) -> Path:
    rm = RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=64, seed=1))
    return rm.save(tmp_path_factory.mktemp("cli-rm") / "rm")


@pytest.mark.parametrize("suffix", [".jsonl"])  # Parquet: tests/test_score.py, in process
def test_score_end_to_end(tiny_rm_dir, helpers, tmp_path, suffix):
    records = helpers.varied_pairs(12, seed=21)[::-1]
    src = tmp_path / "pairs.jsonl"
    write_pairs(records, src)
    out = tmp_path / f"scores{suffix}"
    proc = helpers.run_cli("score", src, out, "--model", tiny_rm_dir, "--batch-size", "8",
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 24 answers" in proc.stdout
    assert f"{src}: 12 records read" in proc.stderr
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    chosen, rejected = score_pairs(RewardModel.load(tiny_rm_dir), records)
    assert [r["reward_chosen"] for r in rows] == chosen
    assert [r["reward_rejected"] for r in rows] == rejected


def test_eval_with_a_reference_scorer_and_a_model(tiny_rm_dir, helpers, tmp_path):
    # longer-wins is right on 3 of 4 preference pairs; the tie pair has no right answer
    records = [
        PairRecord(id="a", prompt="q1", chosen="a long good answer", rejected="short",
                   subset="x"),
        PairRecord(id="b", prompt="q2", chosen="a longer right answer", rejected="no",
                   subset="x"),
        PairRecord(id="c", prompt="q3", chosen="yes", rejected="a long wrong answer",
                   subset="y"),
        PairRecord(id="d", prompt="q4", chosen="the longest of the answers", rejected="meh",
                   subset="y"),
        PairRecord(id="e", prompt="q5", chosen="same", rejected="same", label="tie",
                   subset="y"),
    ]
    data = tmp_path / "small.jsonl"
    write_pairs(records, data)
    out = tmp_path / "eval"
    proc = helpers.run_cli("eval", "--reference", "longer-wins", "--model", tiny_rm_dir,
                           "--data", data, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"longer-wins", tiny_rm_dir.name}
    ref = results["longer-wins"]["sets"]["small"]
    assert (ref["n_records"], ref["n_pairs"], ref["correct"]) == (5, 4, 3)
    assert ref["accuracy"] == pytest.approx(0.75)
    assert ref["subsets"]["x"]["accuracy"] == 1.0
    assert (out / "results-longer-wins.json").exists()
    examples = (out / "examples-longer-wins-small.jsonl").read_text().splitlines()
    assert len(examples) == 5
    model_set = results[tiny_rm_dir.name]["sets"]["small"]
    assert model_set["n_pairs"] == 4
    assert (out / f"examples-{tiny_rm_dir.name}-small.jsonl").exists()



def test_eval_without_a_scorer_is_a_usage_error(helpers, tmp_path):
    data = tmp_path / "p.jsonl"
    write_pairs([PairRecord(id="a", prompt="q", chosen="x", rejected="y")], data)
    proc = helpers.run_cli("eval", "--data", data, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "give --model and/or --reference" in proc.stderr
    assert proc.returncode == 2


def test_unknown_option_is_a_usage_error(helpers, tmp_path):
    proc = helpers.run_cli("validate", "x.jsonl", "--bogus", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "No such option" in proc.stderr
    assert proc.returncode == 2


def test_no_arguments_shows_help_without_a_traceback(helpers, tmp_path):
    proc = helpers.run_cli(cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "Usage" in proc.stdout + proc.stderr
    assert proc.returncode in (0, 2)


def test_help_exits_0(helpers, tmp_path):
    proc = helpers.run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    for command in ("sources", "validate", "train", "score", "eval"):
        assert command in proc.stdout


def test_an_unknown_judge_is_a_usage_error(helpers, tmp_path):
    data = tmp_path / "p.jsonl"
    write_pairs([PairRecord(id="a", prompt="q", chosen="x", rejected="y")], data)
    proc = helpers.run_cli("augment", "-d", data, "--out", tmp_path / "o.jsonl", "--rubrics",
                           tmp_path / "r.jsonl", "--judge", "vibes", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "logprob, generate" in proc.stderr and proc.returncode == 2
