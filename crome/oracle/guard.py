"""Check llama.cpp's native library in a child process before this process loads it.

A llama.cpp built for the wrong CPU does not raise: it kills the process (SIGILL) or hangs,
taking every stage that was running with it and printing nothing. So before the in-process
backend or ``crome serve`` loads a model, :func:`ensure_native` runs
``python -m crome.oracle.guard MODEL`` (load the model, generate a few tokens) and waits. A
crash or a hang there becomes one :class:`NativeLibraryError` line with the rebuild command.
A success is cached per (native libraries, model), so the check costs a few seconds once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from crome.oracle.build import REBUILD_COMMAND, package_dir
from crome.oracle.cache import crome_cache_dir

CHECK_TOKENS = 4
DEFAULT_TIMEOUT = 180.0  # a cold 1.1 GB load takes seconds; a hang is caught within this


class NativeLibraryError(OSError):
    """The native library crashed, hung or is missing; the message is one line."""


@dataclass
class NativeCheck:
    ok: bool
    reason: str = ""  # what failed, "" when ok
    system_info: str = ""  # llama_print_system_info() of the child
    text: str = ""  # what the model generated
    seconds: float = 0.0
    cached: bool = False

    @property
    def features(self) -> list[str]:
        """The CPU features the build uses, e.g. ``['AVX2', 'AVX512', 'FMA']``."""
        return features_of(self.system_info)


def features_of(system_info: str) -> list[str]:
    """``CPU : SSE3 = 1 | AVX2 = 1 | …`` → the names set to 1 (repeats dropped)."""
    found: list[str] = []
    for part in system_info.replace("|", "\n").splitlines():
        name, eq, value = part.rpartition(" = ")
        name = name.split(":")[-1].strip()
        if eq and value.strip() == "1" and name and name not in found:
            found.append(name)
    return found


def library_dir() -> Path | None:
    """Where ``llama_cpp`` loads ``libllama.so`` from (``$LLAMA_CPP_LIB_PATH`` first)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    pkg = package_dir()
    return pkg / "lib" if pkg is not None else None


def library_fingerprint(folder: Path) -> str:
    """SHA-256 over the shared libraries' names and bytes (a rebuild changes it)."""
    digest = hashlib.sha256()
    for lib in sorted(folder.glob("*.so*")):
        if lib.is_file():
            digest.update(lib.name.encode())
            digest.update(lib.read_bytes())
    return digest.hexdigest()


def _model_fingerprint(model: Path) -> str:
    st = model.stat()
    return f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def checks_path() -> Path:
    base = os.environ.get("CROME_CACHE_DIR")
    return (Path(base) if base else crome_cache_dir()) / "native-checks.json"


def _read_checks(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _signal_name(code: int) -> str:
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    what = {"SIGILL": "illegal instruction: built for a CPU feature this machine lacks",
            "SIGSEGV": "segmentation fault", "SIGBUS": "bus error",
            "SIGKILL": "killed, out of memory?", "SIGABRT": "aborted"}.get(name)
    return f"{name} ({what})" if what else name


def check_native(model: str | os.PathLike[str], timeout: float | None = None,
                 use_cache: bool = True, threads: int | None = None) -> NativeCheck:
    """Load ``model`` and generate a few tokens in a child process; never raises for a
    crash or a hang, it reports them."""
    model = Path(model)
    folder = library_dir()
    if folder is None:
        return NativeCheck(ok=False, reason="is not installed (no llama-cpp-python)")
    if not (folder / "libllama.so").is_file():
        return NativeCheck(ok=False, reason=f"is missing (no libllama.so in {folder})")
    key = hashlib.sha256(f"{library_fingerprint(folder)}|{_model_fingerprint(model)}"
                         .encode()).hexdigest()
    store = checks_path()
    if use_cache:
        hit = _read_checks(store).get(key)
        if isinstance(hit, dict) and hit.get("ok"):
            return NativeCheck(**{**hit, "cached": True})  # type: ignore[arg-type]
    timeout = timeout if timeout is not None else float(
        os.environ.get("CROME_NATIVE_CHECK_TIMEOUT", DEFAULT_TIMEOUT))
    cmd = [sys.executable, "-m", "crome.oracle.guard", str(model),
           "--threads", str(threads or os.cpu_count() or 1)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return NativeCheck(ok=False, reason=f"hung (no answer within {timeout:.0f} s)",
                           seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if proc.returncode < 0:
        return NativeCheck(ok=False, reason=f"crashed with {_signal_name(proc.returncode)}",
                           seconds=seconds)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return NativeCheck(ok=False, reason=f"failed (exit {proc.returncode}): {last[:200]}",
                           seconds=seconds)
    out = json.loads(lines[-1])
    result = NativeCheck(ok=True, system_info=out["system_info"], text=out["text"],
                         seconds=round(seconds, 2))
    if use_cache:
        checks = _read_checks(store)
        checks[key] = {k: v for k, v in asdict(result).items() if k != "cached"}
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(checks, indent=1))
        os.replace(tmp, store)
    return result


def ensure_native(model: str | os.PathLike[str], timeout: float | None = None) -> NativeCheck:
    """:func:`check_native`, raising :class:`NativeLibraryError` (one line) on failure."""
    result = check_native(model, timeout)
    if not result.ok:
        raise NativeLibraryError(
            f"llama.cpp check failed: the native library {result.reason} while loading "
            f"{Path(model).name} and generating {CHECK_TOKENS} tokens in a child process; "
            f"rebuild it for this CPU with: {REBUILD_COMMAND}")
    return result


def _child(model: str, threads: int) -> None:
    """The child's side: everything that touches the native library happens here."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=CHECK_TOKENS,
                                temperature=0.0)
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    print(json.dumps({"system_info": info, "text": out["choices"][0]["text"]}), flush=True)
    llm.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    _child(args.model, args.threads)
