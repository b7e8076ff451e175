"""The crash guard: llama.cpp is tried in a child process before crome loads it.

The faults are real: a stand-in ``libllama.so`` whose constructor executes ``ud2`` (SIGILL,
what an instruction the CPU lacks does) or never returns, put in front of llama-cpp-python with
its own ``LLAMA_CPP_LIB_PATH``. Every command that loads the local oracle must turn that into
one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crome.oracle.guard import check_native, ensure_native, features_of, library_dir
from crome.oracle.llamacpp import packaged_model_path
from crome.rubrics import Rubric

pytestmark = pytest.mark.slow

SYSTEM_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
               "BMI2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
               "REPACK = 1 | ")


def _stand_in(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "standin.c"
    src.write_text("#include <unistd.h>\n"
                   f"__attribute__((constructor)) static void start(void) {{ {body} }}\n"
                   "int llama_stand_in(void) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-O0", str(src), "-o",
                    str(folder / "libllama.so")], check=True)
    return folder


@pytest.fixture(scope="module")
def sigill_lib(tmp_path_factory) -> Path:
    return _stand_in(tmp_path_factory.mktemp("sigill"), "__builtin_trap();")


@pytest.fixture(scope="module")
def hang_lib(tmp_path_factory) -> Path:
    return _stand_in(tmp_path_factory.mktemp("hang"), "for (;;) pause();")


@pytest.fixture(scope="module")
def model() -> Path:
    return packaged_model_path()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh check cache, so that nothing is answered from an earlier run."""
    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_features_of_reads_llama_system_info():
    assert features_of(SYSTEM_INFO) == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2",
                                        "AVX512", "AVX512_VNNI", "LLAMAFILE", "OPENMP",
                                        "REPACK"]
    assert features_of("") == []


def test_the_real_library_passes_and_the_result_is_cached(isolated, model):
    first = check_native(model)
    assert first.ok and not first.cached, first.reason
    assert "AVX2" in first.features and first.text
    again = check_native(model)
    assert again.ok and again.cached and again.system_info == first.system_info
    assert (isolated / "cache" / "native-checks.json").is_file()


def test_a_crashing_library_is_reported_not_fatal(isolated, model, sigill_lib, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(sigill_lib))
    assert library_dir() == sigill_lib
    result = check_native(model)  # the real library's cached success must not answer
    assert not result.ok and result.reason.startswith("crashed with SIGILL"), result.reason
    with pytest.raises(OSError, match=r"crashed with SIGILL.*crome build-llama --force"):
        ensure_native(model)
    stored = json.loads((isolated / "cache" / "native-checks.json").read_text()) \
        if (isolated / "cache" / "native-checks.json").exists() else {}
    assert all(v["ok"] for v in stored.values())  # failures are never cached


def test_a_hanging_library_is_stopped(isolated, model, hang_lib, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(hang_lib))
    result = check_native(model, timeout=3)
    assert not result.ok and result.reason == "hung (no answer within 3 s)"


def _crome(args: list[str], env_extra: dict[str, str], cwd: Path,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "crome.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text(json.dumps({"id": "p1", "prompt": "What is 2 + 2?", "chosen": "4.",
                                "rejected": "5."}) + "\n")
    return path


COMMANDS = {
    "rubrics": ["rubrics", "-d", "{pairs}", "--out", "rubrics.jsonl", "--oracle", "llamacpp"],
    "augment": ["augment", "-d", "{pairs}", "--recipe", "causal", "--rubrics",
                "rubrics.jsonl", "--out", "causal.jsonl", "--oracle", "llamacpp"],
    "eval-paraphrase": ["eval", "-d", "{pairs}", "--reference", "longer-wins", "--perturb",
                        "paraphrase@both", "--oracle", "llamacpp", "--out", "eval"],
    "serve": ["serve", "--port", "0"],
    "quickstart": ["quickstart", "--out", "qs", "--no-progress", "--oracle", "llamacpp"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_local_oracle_command_fails_in_one_line(command, sigill_lib, pair_file,
                                                      tmp_path):
    rubric = Rubric(prompt_hash="x", attributes=[], status="fallback", attempts=0,
                    oracle="none")
    (tmp_path / "rubrics.jsonl").write_text(json.dumps(rubric.to_dict()) + "\n")
    args = [a.replace("{pairs}", str(pair_file)) for a in COMMANDS[command]]
    proc = _crome(args, {"LLAMA_CPP_LIB_PATH": str(sigill_lib),
                         "CROME_CACHE_DIR": str(tmp_path / "cache")}, tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert err[-1].startswith("crome: error: llama.cpp check failed: the native library "
                              "crashed with SIGILL"), err
    assert err[-1].endswith("crome build-llama --force")
    assert sum(line.startswith("crome: error") for line in err) == 1


def test_auto_with_only_a_crashing_llama_cpp_raises_its_error(sigill_lib, tmp_path,
                                                              monkeypatch):
    """--oracle auto where transformers is not a candidate (bf16 emulated: stood in for, since
    a CPU's bf16 speed cannot be changed) and llama.cpp crashes: the guard's one-line error,
    not a pick."""
    import crome.score
    from crome.oracle.auto import cached_choice, choose
    from crome.oracle.guard import NativeLibraryError
    from crome.oracle.llamacpp import models_dir

    monkeypatch.setenv("CROME_MODELS", str(models_dir()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(sigill_lib))
    monkeypatch.setattr(crome.score, "bf16_speed",
                        lambda: crome.score.Bf16Speed(fp32_seconds=1.0, bf16_seconds=20.0))
    with pytest.raises(NativeLibraryError, match="SIGILL"):
        choose()
    assert cached_choice() is None  # nothing kept: the next run probes again
