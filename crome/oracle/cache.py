"""A SQLite cache in front of any oracle backend.

The key is the SHA-256 of backend, model, messages, sampling options and task, so a re-run
makes no oracle call and a killed run resumes from what was already answered. Only
successful answers are stored: a 500 or a timeout is retried on the next run, not replayed.
Each answer is committed as soon as it arrives (WAL journal), so ``kill -9`` loses at most
the calls that were still in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crome.oracle.base import Oracle, OracleRequest, OracleResponse, ResultCallback

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def crome_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/crome`` (``~/.cache/crome``): the folder of every crome cache."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crome"


def default_cache_path() -> Path:
    """``$CROME_CACHE`` or ``~/.cache/crome/oracle.sqlite3``."""
    env = os.environ.get("CROME_CACHE")
    if env:
        return Path(env)
    return crome_cache_dir() / "oracle.sqlite3"


def cache_key(backend: str, model: str, request: OracleRequest) -> str:
    material = json.dumps([backend, model, request.key_material()], ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # requests sent to the backend
    stored: int = 0
    failed: int = 0  # backend answered with an error (not stored)

    def summary(self) -> str:
        return (f"oracle cache: {self.hits} hits, {self.misses} calls "
                f"({self.stored} stored, {self.failed} failed)")


class OracleCache:
    """The table itself; thread-safe (one connection guarded by a lock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for key, resp in self._db.execute(
                        f"SELECT key, response FROM calls WHERE key IN ({marks})", chunk):
                    out[key] = resp
        return out

    def put(self, key: str, backend: str, model: str, request: OracleRequest,
            text: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?)",
                (key, backend, model, request.key_material(), text, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedOracle:
    """An :class:`Oracle` that answers from the cache and sends only misses to ``inner``."""

    def __init__(self, inner: Oracle, cache: OracleCache) -> None:
        self.inner = inner
        self.cache = cache
        self.backend = inner.backend
        self.model = inner.model
        self.stats = CacheStats()

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        keys = [cache_key(self.backend, self.model, r) for r in requests]
        found = self.cache.get_many(keys)
        out: list[OracleResponse | None] = [None] * len(requests)
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in found:
                out[i] = OracleResponse(text=found[key], cached=True, attempts=0)
                self.stats.hits += 1
                if on_result:
                    on_result(i, out[i])  # type: ignore[arg-type]
            else:
                missing.append(i)
        if missing:
            self.stats.misses += len(missing)

            def store(j: int, resp: OracleResponse) -> None:
                i = missing[j]
                if resp.ok:
                    self.cache.put(keys[i], self.backend, self.model, requests[i],
                                   resp.text)  # type: ignore[arg-type]
                    self.stats.stored += 1
                else:
                    self.stats.failed += 1
                if on_result:
                    on_result(i, resp)

            answers = self.inner.generate([requests[i] for i in missing], on_result=store)
            for j, resp in zip(missing, answers):
                out[j] = resp
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.inner.close()
        self.cache.close()
