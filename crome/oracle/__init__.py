"""Oracle backends behind one protocol, chosen by a URI-like spec, with a SQLite cache.

Specs (``--oracle``):

* ``llamacpp`` — the packaged Qwen2.5-Coder-1.5B-Instruct GGUF, in-process (the default);
  ``llamacpp:/path/to/model.gguf`` for another GGUF file.
* ``llamaserver`` — the same model behind llama.cpp's own server, started on loopback for the
  oracle's lifetime (``crome build-llama --server`` builds it): ``concurrency`` requests share
  each decode step, and n-gram speculative decoding (``server_spec``) drafts from the context;
  ``llamaserver:/path/to/model.gguf`` for another GGUF file.
* ``openai:http://127.0.0.1:8080/v1`` — any OpenAI-compatible server (vLLM, llama.cpp
  server, Ollama, OpenAI, Gemini's OpenAI endpoint); ``--oracle-model`` names the model and
  the key is read from the environment variable named by ``--oracle-key-env``.
* ``rules`` — deterministic interventions, no LLM (see :mod:`crome.oracle.rules`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from crome.oracle.base import (
    Oracle,
    OracleRequest,
    OracleResponse,
    Sampling,
    oracle_name,
)
from crome.oracle.cache import CachedOracle, CacheStats, OracleCache, default_cache_path

BACKENDS = ("llamacpp", "llamaserver", "openai", "rules")


@dataclass
class OracleOptions:
    spec: str = "llamacpp"
    model: str = ""  # openai: the served model's name ("" = the server's first model)
    key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 4
    threads: int | None = None  # llamacpp: CPU threads (None = all cores)
    n_ctx: int = 4096
    lookup_tokens: int = 0  # llamacpp: prompt-lookup speculative decoding (0 = off)
    server_spec: str = "ngram-simple"  # llamaserver: --spec-type ("" = off)
    cache: str | None = None  # SQLite file; None = $CROME_CACHE or ~/.cache/crome/…; "off"


def make_backend(options: OracleOptions) -> Oracle:
    backend, _, rest = options.spec.partition(":")
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
    if backend == "openai":
        from crome.oracle.openai import OpenAIOptions, OpenAIOracle

        if not rest:
            raise ValueError("--oracle openai needs a base URL: openai:http://HOST:PORT/v1")
        return OpenAIOracle(OpenAIOptions(base_url=rest, model=options.model,
                                          key_env=options.key_env,
                                          concurrency=options.concurrency,
                                          timeout=options.timeout,
                                          max_retries=options.max_retries))
    raise ValueError(f"unknown oracle {options.spec!r}; use one of: rules, llamacpp"
                     f"[:MODEL.gguf], llamaserver[:MODEL.gguf], openai:BASE_URL")


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
