"""``crome doctor`` on the machine running the tests, and on what it must catch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crome.doctor import FAIL, OK, WARN, Check, DoctorOptions, check_data, exit_code

ROWS = ("python", "torch", "transformers", "threads", "bf16 autocast", "cpu",
        "llama.cpp build", "llama.cpp runs", "oracle model", "oracle auto", "backbone",
        "data folder",
        "data: hh-rlhf/helpful-base", "data: hh-rlhf/helpful-online", "data: llmbar",
        "data: xstest", "data: gsm8k", "data: rewardbench",
        "data: humaneval/HumanEval.jsonl.gz", "chromium", "disk")


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crome.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def _rows(stdout: str) -> dict[str, str]:
    """check name -> status, from the table's body lines (``│ name │ status │ …``)."""
    rows: dict[str, str] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 4 and cells[1] and cells[2] in (OK, WARN, FAIL):
            rows[cells[1]] = cells[2]
    return rows


@pytest.mark.slow
def test_doctor_passes_here_with_every_row():
    proc = _doctor()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = _rows(proc.stdout)
    missing = [r for r in ROWS if r not in rows]
    assert not missing, (missing, proc.stdout)
    assert rows["llama.cpp runs"] == OK and rows["oracle model"] == OK
    assert "the main job can run here" in proc.stdout


def test_a_missing_data_folder_fails_with_its_fix(tmp_path):
    proc = _doctor("--no-native-check", "--data-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    rows = _rows(proc.stdout)
    assert rows["data folder"] == FAIL
    assert "fail data folder: fix: --data-dir PATH" in proc.stdout


@pytest.mark.slow
def test_a_crashing_llama_cpp_fails_the_doctor(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "x.c").write_text("__attribute__((constructor)) static void s(void) "
                             "{ __builtin_trap(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(lib / "x.c"), "-o",
                    str(lib / "libllama.so")], check=True)
    proc = _doctor(env={"LLAMA_CPP_LIB_PATH": str(lib),
                        "CROME_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert _rows(proc.stdout)["llama.cpp runs"] == FAIL
    assert "fail llama.cpp runs: fix: crome build-llama --force" in proc.stdout
    assert "SIGILL" in proc.stdout


def test_data_rows_count_records(tmp_path):
    rows = {c.name: c for c in check_data(DoctorOptions())}
    assert rows["data folder"].status == OK
    assert rows["data: llmbar/Natural"].detail == "100 pairs"
    assert rows["data: rewardbench"].detail.startswith("2985 pairs")


def test_exit_code_counts_only_failures():
    assert exit_code([Check("a", OK, ""), Check("b", WARN, "", "fix")]) == 0
    assert exit_code([Check("a", OK, ""), Check("b", FAIL, "", "fix")]) == 1


def test_cli_module_runs_from_any_directory(tmp_path):
    """The doctor's data row resolves ../shared/data beside the checkout, not only the cwd."""
    proc = subprocess.run([sys.executable, "-m", "crome.cli", "doctor", "--no-native-check"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert _rows(proc.stdout)["data folder"] == OK
