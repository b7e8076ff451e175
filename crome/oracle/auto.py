"""``--oracle auto``: the local backend that a short probe measures fastest on this machine.

The candidates are llama.cpp in process (``llamacpp``, one request at a time) and
transformers in batches (``hf``, :mod:`crome.oracle.hf`). The probe sends both the same
rewrite-like requests (greedy, :data:`PROBE_TOKENS` new tokens each): llama.cpp
:data:`LLAMA_PROBE_REQUESTS` of them, transformers one batch of :data:`HF_PROBE_BATCH`, and
compares requests per hour. The pick, its figures and the reason are kept per machine and
build (CPU model and flags, torch, transformers, gguf and llama.cpp's library) in
``~/.cache/crome/oracle-auto.json``, so the probe runs once; ``crome doctor`` shows them.

transformers is probed only where bf16 is fast here (the timed matmul of
:func:`crome.score.bf16_speed`). Where PyTorch emulates bf16 it would run in fp32, which
measured slower than llama.cpp serial (README, "Oracle backends"), and its first use costs a
6 GB dequantisation: there ``auto`` is llama.cpp without probing, as before.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crome.oracle.base import Oracle, OracleRequest, Sampling
from crome.oracle.cache import crome_cache_dir

PROBE_TOKENS = 48
LLAMA_PROBE_REQUESTS = 2
HF_PROBE_BATCH = 16

# A fixed answer to rewrite: the probe needs no data folder.
_PROBE_ANSWER = (
    "To keep a sourdough starter healthy, feed it equal weights of flour and water once a day "
    "when it lives on the counter, or once a week when it is kept in the fridge. Discard most "
    "of it before each feeding so the yeast has fresh food. A starter that doubles within "
    "six to eight hours of a feeding is ready to bake with; a layer of grey liquid on top "
    "only means it is hungry, so pour it off and feed it.")
_PROBE_ASKS = ("introduce one factual mistake", "remove the most useful sentence",
               "make it answer a slightly different question", "add one missing detail",
               "make one instruction vaguer", "correct any mistake you find",
               "make it less specific", "make it more specific")


def probe_requests(n: int) -> list[OracleRequest]:
    """``n`` rewrite requests of the size crome sends (distinct, so no cache answers them)."""
    return [OracleRequest.make(
        [{"role": "system", "content": "You rewrite assistant replies for a data set. Output "
          "only the rewritten reply."},
         {"role": "user", "content": f"Rewrite this reply and {_PROBE_ASKS[i % 8]}, keeping "
          f"everything else the same (probe {i}).\n\n<reply>\n{_PROBE_ANSWER}\n</reply>"}],
        Sampling(temperature=0.0, max_tokens=PROBE_TOKENS)) for i in range(n)]


@dataclass
class AutoChoice:
    spec: str  # the picked backend: "llamacpp" or "hf"
    reason: str
    requests_per_hour: dict[str, float] = field(default_factory=dict)
    bf16_ratio: float = 0.0  # a bf16 matmul's time over fp32's on this CPU
    machine: str = ""
    probed_at: float = 0.0

    def summary(self) -> str:
        figures = ", ".join(f"{k} {v:,.0f} requests/h" for k, v in
                            self.requests_per_hour.items())
        return f"{self.spec} ({self.reason}{'; ' + figures if figures else ''})"


def machine_key() -> str:
    """CPU model and flags, torch, transformers, gguf (without it transformers cannot read
    the packaged GGUF, and the pick is llama.cpp by default) and the llama.cpp library: what
    the pick depends on."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    from crome.oracle.guard import library_dir, library_fingerprint

    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(dict.fromkeys(ln for ln in lines
                                      if ln.startswith(("model name", "flags"))))
    except OSError:
        cpu = platform.processor()
    lib = library_dir()
    llama = library_fingerprint(lib) if lib is not None and lib.is_dir() else "none"
    try:
        gguf = version("gguf")
    except PackageNotFoundError:
        gguf = "none"
    material = json.dumps([cpu, torch.__version__, transformers.__version__, gguf, llama])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def auto_cache_path() -> Path:
    return crome_cache_dir() / "oracle-auto.json"


def cached_choice(key: str | None = None) -> AutoChoice | None:
    """The pick made earlier on this machine and build, if any."""
    path = auto_cache_path()
    try:
        data = json.loads(path.read_text())
        entry = data[key or machine_key()]
        return AutoChoice(**entry)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(choice: AutoChoice) -> None:
    path = auto_cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[choice.machine] = asdict(choice)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def requests_per_hour(oracle: Oracle, requests: list[OracleRequest]) -> float:
    """Requests answered per hour by ``oracle.generate`` over ``requests`` (one call)."""
    t0 = time.perf_counter()
    out = oracle.generate(requests)
    seconds = time.perf_counter() - t0
    failed = [r.error for r in out if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} probe requests failed: {failed[0]}")
    return 3600 * len(requests) / seconds


def choose(threads: int | None = None, refresh: bool = False,
           progress: Any = None) -> AutoChoice:
    """The pick for this machine: cached, else probed now (about a minute; the first
    transformers probe also dequantises the model once)."""
    from crome.score import bf16_speed

    key = machine_key()
    if not refresh and (found := cached_choice(key)) is not None:
        return found
    say = progress or (lambda _msg: None)
    speed = bf16_speed()
    ratio = speed.ratio
    figures: dict[str, float] = {}
    notes: list[str] = []
    llama_error: Exception | None = None
    say("oracle auto: probing llama.cpp")
    try:
        from crome.oracle.llamacpp import LlamaCppOptions, LlamaCppOracle

        llama = LlamaCppOracle(LlamaCppOptions(n_threads=threads))
        try:
            llama.generate(probe_requests(1)[:1])  # load and warm up
            figures["llamacpp"] = requests_per_hour(llama, probe_requests(LLAMA_PROBE_REQUESTS))
        finally:
            llama.close()
    except Exception as exc:  # noqa: BLE001 -- not built, a crash in the guard: not a pick
        llama_error = exc
        notes.append(f"llama.cpp unavailable: {str(exc).splitlines()[0][:120]}")
    if speed.native:
        say("oracle auto: probing transformers (bf16, batched)")
        try:
            from crome.oracle.hf import HFOptions, HFOracle

            hf = HFOracle(HFOptions(batch_size=HF_PROBE_BATCH, dtype="bf16", threads=threads))
            try:
                hf.generate(probe_requests(1)[:1])
                figures["hf"] = requests_per_hour(hf, probe_requests(HF_PROBE_BATCH))
            finally:
                hf.close()
        except Exception as exc:  # noqa: BLE001 -- a missing model package, no memory
            notes.append(f"transformers unavailable: {str(exc).splitlines()[0][:120]}")
    else:
        notes.append(f"bf16 emulated (a bf16 matmul takes {ratio:.1f}x fp32): transformers "
                     f"not probed")
    if not figures and llama_error is not None and not speed.native:
        raise llama_error  # the only candidate: its own error (e.g. the crash guard's line)
    if not figures:
        raise OSError("--oracle auto: no local backend runs here ("
                           + "; ".join(notes) + "); pass --oracle openai:BASE_URL")
    spec = max(figures, key=figures.__getitem__)
    reason = "; ".join([f"fastest of {len(figures)} probed"] + notes) if len(figures) > 1 \
        else "; ".join(["the only one probed"] + notes)
    choice = AutoChoice(spec=spec, reason=reason, requests_per_hour=figures, bf16_ratio=ratio,
                        machine=key, probed_at=time.time())
    _store(choice)
    return choice
