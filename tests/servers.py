"""Test helpers (not a test module): a real llama.cpp server and a fault-injecting proxy.

Test modules cannot import this by name (pytest runs with ``--import-mode=importlib`` and
``tests`` is not a package): they load it from its path under the module name
``crome_test_servers`` (see ``conftest.py``), so every user shares one copy.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

# The server itself is part of the package (benchmarks and users start it too).
from crome.oracle.server import LlamaServer, free_port  # noqa: F401

FAULTS = ("ok", "429", "500", "stall", "garbage", "bad_json")


def schedule(seed: int, n: int, rate: float = 0.5,
             kinds: Sequence[str] = ("429", "500", "stall", "garbage", "bad_json")) -> list[str]:
    """A seeded list of ``n`` outcomes: each a fault from ``kinds`` with probability ``rate``."""
    rng = random.Random(seed)
    return [rng.choice(list(kinds)) if rng.random() < rate else "ok" for _ in range(n)]


class FaultProxy:
    """An HTTP proxy to ``upstream`` (a base URL like ``http://host:port/v1``) that injects
    faults into ``POST .../chat/completions``.

    Each POST takes the next entry of ``faults`` ("ok" once they run out), unless its body
    contains a key of ``always``, which then decides its fault every time. ``injected``
    counts faults by kind, ``forwarded`` the requests passed on, ``bodies`` the POST bodies,
    ``auth`` the Authorization header of every request (None when absent).
    A ``stall`` waits ``stall_seconds`` (longer than the client's timeout) and answers 504.
    """

    def __init__(self, upstream: str, faults: Sequence[str] = (),
                 always: dict[str, str] | None = None, stall_seconds: float = 10.0) -> None:
        for f in [*faults, *(always or {}).values()]:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}")
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.faults, self.always = list(faults), dict(always or {})
        self.stall_seconds = stall_seconds
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}{parts.path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _choose(self, body: bytes) -> str:
        text = body.decode(errors="replace")
        with self._lock:
            try:
                self.bodies.append(json.loads(body))
            except ValueError:
                pass
            kind = next((k for s, k in self.always.items() if s in text), None)
            if kind is None:
                kind = self.faults.pop(0) if self.faults else "ok"
            if kind == "ok":
                self.forwarded += 1
            else:
                self.injected[kind] += 1
            return kind

    def _forward(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, bytes, str]:
        req = urllib.request.Request(self.upstream + path, data=body, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "application/json")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "application/json",
                       extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy._lock:
                    proxy.auth.append(self.headers.get("Authorization"))
                kind = "ok"
                if method == "POST" and self.path.endswith("/chat/completions"):
                    kind = proxy._choose(body or b"")
                try:
                    if kind == "429":
                        self._reply(429, b'{"error": "slow down"}', extra={"Retry-After": "1"})
                    elif kind == "500":
                        self._reply(500, b'{"error": "injected"}')
                    elif kind == "stall":
                        proxy._stop.wait(proxy.stall_seconds)
                        self.close_connection = True
                        self._reply(504, b'{"error": "stalled"}')
                    elif kind == "garbage":
                        self._reply(200, b"<html>not json at all", "text/html")
                    elif kind == "bad_json":
                        self._reply(200, b'{"object": "chat.completion", "choices": []}')
                    else:
                        headers = {k: v for k, v in self.headers.items()
                                   if k.lower() in ("content-type", "authorization")}
                        self._reply(*proxy._forward(method, self.path, body, headers))
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self) -> None:
                self._proxy("GET")

            def do_POST(self) -> None:
                self._proxy("POST")

        return Handler
