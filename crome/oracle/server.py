"""Start llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``) on 127.0.0.1.

For the ``openai`` backend without a remote endpoint: the tests, the benchmarks and
``crome serve`` start the packaged model (or any GGUF) this way and point the backend at
``server.base_url``.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """The server in a subprocess for the span of a ``with`` block."""

    def __init__(self, model: str | Path | None = None, n_ctx: int = 4096,
                 n_threads: int = 2, alias: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, start_timeout: float = 180.0,
                 extra: Sequence[str] = ()) -> None:
        if model is None:
            from crome.oracle.llamacpp import packaged_model_path

            model = packaged_model_path()
        self.model, self.start_timeout = str(model), start_timeout
        # GET /models lists the alias; without one it lists the model's full path.
        self.alias = alias or Path(model).stem
        self.port = port or free_port()
        self.base_url = f"http://{host}:{self.port}/v1"
        # mlock would pin 1.1 GB; logits for every prompt token cost a vocabulary-sized
        # projection per token and nothing here reads them.
        self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", self.model,
                    "--model_alias", self.alias, "--host", host, "--port", str(self.port),
                    "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
                    "--n_threads_batch", str(n_threads), "--use_mlock", "False",
                    "--logits_all", "False", *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: the server logs a lot and would block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in __exit__

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def __enter__(self) -> Self:
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
