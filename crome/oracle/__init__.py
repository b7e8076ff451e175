"""Oracle backends behind one protocol, chosen by a URI-like spec, with a SQLite cache.

Specs (``--oracle``):

* ``auto`` — the packaged model on the local backend that a short probe measured fastest on
  this machine, ``llamacpp`` or ``hf`` (the default; see :mod:`crome.oracle.auto`).
* ``llamacpp`` — the packaged Qwen2.5-Coder-1.5B-Instruct GGUF, in-process (the default);
  ``llamacpp:/path/to/model.gguf`` for another GGUF file.
* ``llamaserver`` — the same model behind llama.cpp's own server, started on loopback for the
  oracle's lifetime (``crome build-llama --server`` builds it): ``concurrency`` requests share
  each decode step, and n-gram speculative decoding (``server_spec``) drafts from the context;
  ``llamaserver:/path/to/model.gguf`` for another GGUF file.
* ``openai:http://127.0.0.1:8080/v1`` — any OpenAI-compatible server (vLLM, llama.cpp
  server, Ollama, OpenAI, Gemini's OpenAI endpoint); ``--oracle-model`` names the model and
  the key is read from the environment variable named by ``--oracle-key-env``.
* ``hf`` — the packaged model (dequantised once into a Hugging Face folder) or ``hf:PATH``
  (any causal-LM folder) in transformers, in length-bucketed batches of ``batch_size``
  requests, bf16 where this machine's bf16 is fast (see :mod:`crome.oracle.hf`).
* ``rules`` — deterministic interventions, no LLM (see :mod:`crome.oracle.rules`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from crome.oracle.base import (
    Oracle,
    OracleRequest,
    OracleResponse,
    Sampling,
    oracle_name,
)
from crome.oracle.cache import CachedOracle, CacheStats, OracleCache, default_cache_path

BACKENDS = ("auto", "llamacpp", "llamaserver", "hf", "openai", "rules")


@dataclass
class OracleOptions:
    spec: str = "auto"
    model: str = ""  # openai: the served model's name ("" = the server's first model)
    key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 4
    threads: int | None = None  # llamacpp: CPU threads (None = all cores)
    n_ctx: int = 4096
    lookup_tokens: int = 0  # llamacpp: prompt-lookup speculative decoding (0 = off)
    server_spec: str = "ngram-simple"  # llamaserver: --spec-type ("" = off)
    batch_size: int = 16  # hf: requests generated together
    dtype: str = "auto"  # hf: auto (bf16 where it is fast here), bf16 or fp32
    cache: str | None = None  # SQLite file; None = $CROME_CACHE or ~/.cache/crome/…; "off"


def make_backend(options: OracleOptions) -> Oracle:
    backend, _, rest = options.spec.partition(":")
    if backend == "auto":
        from crome.oracle.auto import choose

        if rest:
            raise ValueError("--oracle auto takes no model: it picks a backend for the "
                             "packaged one (llamacpp:MODEL.gguf or hf:FOLDER for another)")
        picked = choose(threads=options.threads,
                        progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(f"oracle auto: {picked.summary()}", file=sys.stderr, flush=True)
        return make_backend(replace(options, spec=picked.spec))
    if backend == "rules":
        from crome.oracle.rules import RulesOracle

        return RulesOracle()
    if backend == "llamacpp":
        from crome.oracle.llamacpp import LlamaCppOptions, LlamaCppOracle

        return LlamaCppOracle(LlamaCppOptions(model_path=rest or None, n_ctx=options.n_ctx,
                                              n_threads=options.threads,
                                              lookup_tokens=options.lookup_tokens))
    if backend == "llamaserver":
        from crome.oracle.server import LlamaServer, ServedOracle

        server = LlamaServer(model=rest or None, n_ctx=options.n_ctx,
                             n_threads=options.threads or os.cpu_count() or 1,
                             engine="llama-server", parallel=options.concurrency,
                             spec=options.server_spec)
        return ServedOracle(server, parallel=options.concurrency, timeout=options.timeout,
                            max_retries=options.max_retries)
    if backend == "hf":
        from crome.oracle.hf import HFOptions, HFOracle

        return HFOracle(HFOptions(model=rest or None, batch_size=options.batch_size,
                                  dtype=options.dtype, threads=options.threads))
    if backend == "openai":
        from crome.oracle.openai import OpenAIOptions, OpenAIOracle

        if not rest:
            raise ValueError("--oracle openai needs a base URL: openai:http://HOST:PORT/v1")
        return OpenAIOracle(OpenAIOptions(base_url=rest, model=options.model,
                                          key_env=options.key_env,
                                          concurrency=options.concurrency,
                                          timeout=options.timeout,
                                          max_retries=options.max_retries))
    raise ValueError(f"unknown oracle {options.spec!r}; use one of: auto, rules, llamacpp"
                     f"[:MODEL.gguf], llamaserver[:MODEL.gguf], hf[:FOLDER], openai:BASE_URL")


def make_oracle(options: OracleOptions | None = None) -> Oracle:
    """The backend behind its cache (unless ``cache="off"``)."""
    opts = options or OracleOptions()
    inner = make_backend(opts)
    if opts.cache == "off":
        return inner
    return CachedOracle(inner, OracleCache(Path(opts.cache) if opts.cache
                                           else default_cache_path()))


__all__ = ["BACKENDS", "CacheStats", "CachedOracle", "Oracle", "OracleCache", "OracleOptions",
           "OracleRequest", "OracleResponse", "Sampling", "make_backend", "make_oracle",
           "oracle_name"]
