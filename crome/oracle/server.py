"""Start a llama.cpp OpenAI-compatible server on 127.0.0.1, and an oracle that owns one.

Two engines serve the same API:

* ``python``: llama-cpp-python's ``python -m llama_cpp.server`` (installed by
  ``crome build-llama``); it answers one request at a time.
* ``llama-server``: llama.cpp's own server, built from the same sdist with the same CPU flags
  by ``crome build-llama --server``: ``parallel`` slots share every decode step (continuous
  batching), and ``spec`` (e.g. ``ngram-simple``) drafts tokens from the context and verifies
  several per step, which suits rewrites that copy most of their input.

The tests, the benchmarks and ``crome serve`` start the packaged model (or any GGUF) this way;
:class:`ServedOracle` (the ``llamaserver`` oracle spec) starts one for its own lifetime and
sends requests ``parallel`` at a time.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from crome.oracle.base import OracleRequest, OracleResponse, ResultCallback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ENGINES = ("python", "llama-server")
SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")


class LlamaServer:
    """The server in a subprocess for the span of a ``with`` block.

    ``n_ctx`` is per request: the ``llama-server`` engine gets ``n_ctx × parallel`` tokens
    of KV cache, split evenly over its slots."""

    def __init__(self, model: str | Path | None = None, n_ctx: int = 4096,
                 n_threads: int = 2, alias: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, start_timeout: float = 180.0,
                 extra: Sequence[str] = (), engine: str = "python", parallel: int = 1,
                 spec: str = "", logprobs: bool = False) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        if spec and (engine != "llama-server" or spec not in SPEC_TYPES):
            raise ValueError(f"spec {spec!r}: the llama-server engine takes one of "
                             f"{', '.join(SPEC_TYPES)}")
        if engine == "python" and parallel != 1:
            raise ValueError("the python engine serves one request at a time (parallel=1); "
                             "slots need engine='llama-server'")
        if model is None:
            from crome.oracle.llamacpp import packaged_model_path

            model = packaged_model_path()
        self.model, self.start_timeout, self.engine = str(model), start_timeout, engine
        # GET /models lists the alias; without one it lists the model's full path.
        self.alias = alias or Path(model).stem
        self.port = port or free_port()
        self.base_url = f"http://{host}:{self.port}/v1"
        if engine == "python":
            # mlock would pin 1.1 GB. llama-cpp-python answers `logprobs` (the logprob judge
            # of crome.validate) only with logits for every prompt token, which cost a
            # vocabulary-sized projection per token and n_ctx × vocabulary floats: on request.
            # (llama-server returns log-probabilities without that cost.)
            self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", self.model,
                        "--model_alias", self.alias, "--host", host, "--port", str(self.port),
                        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
                        "--n_threads_batch", str(n_threads), "--use_mlock", "False",
                        "--logits_all", str(logprobs), *extra]
        else:
            from crome.oracle.build import server_binary

            binary = server_binary()
            if binary is None:
                raise FileNotFoundError("llama-server is not built for this machine: run "
                                        "`crome build-llama --server` (5-10 min on 2 cores)")
            self.cmd = [str(binary), "--model", self.model, "--alias", self.alias,
                        "--host", host, "--port", str(self.port),
                        "--ctx-size", str(n_ctx * parallel), "--threads", str(n_threads),
                        "--threads-batch", str(n_threads), "--parallel", str(parallel),
                        "--cont-batching", *(["--spec-type", spec] if spec else []), *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: the server logs a lot and would block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in __exit__

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def __enter__(self) -> Self:
        if self.engine == "python":
            from crome.oracle.guard import ensure_native

            ensure_native(self.model)  # a crash there is one line, not a dead server
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.__exit__()
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:"
                                   f"\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.__exit__()
                raise TimeoutError(f"llama.cpp server not up after {self.start_timeout:.0f} s:"
                                   f"\n{tail}")
            time.sleep(0.25)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


class ServedOracle:
    """An oracle over a llama.cpp server it starts (on a free loopback port) and stops: the
    ``llamaserver[:MODEL.gguf]`` spec. Requests go through :class:`OpenAIOracle`,
    ``parallel`` at a time, into as many server slots."""

    backend = "llamaserver"

    def __init__(self, server: LlamaServer, parallel: int, timeout: float = 600.0,
                 max_retries: int = 2) -> None:
        from crome.oracle.openai import OpenAIOptions, OpenAIOracle

        self.server = server.__enter__()
        try:
            self.client = OpenAIOracle(OpenAIOptions(
                base_url=server.base_url, model=server.alias, key_env="",
                concurrency=parallel, timeout=timeout, max_retries=max_retries))
        except BaseException:
            server.__exit__()
            raise
        self.model = Path(server.model).name

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        return self.client.generate(requests, on_result)

    def close(self) -> None:
        self.client.close()
        self.server.__exit__()
