"""The ``openai`` backend: any OpenAI-compatible chat-completions server.

Works with vLLM, the llama.cpp server, Ollama and OpenAI itself. Requests run on a bounded
thread pool over one ``httpx.Client``. Each request is retried with exponential backoff and
full jitter on 429, 408, 5xx, timeouts, connection errors and bodies that are not a chat
completion (non-JSON, or no ``choices[0].message.content`` string); ``Retry-After`` is
honoured up to ``backoff_max``. Other 4xx answers are not retried. A request that still
fails comes back as ``OracleResponse(text=None, error=...)``: nothing is raised for it.

The API key is read only from the environment variable named by ``key_env`` and is sent
only as ``Authorization: Bearer``; it never appears in ``repr``, logs or error texts.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import httpx

from crome.oracle.base import OracleRequest, OracleResponse, ResultCallback, logsumexp

RETRY_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class OpenAIOptions:
    base_url: str
    model: str = ""
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``None`` when the header is absent or unreadable; never negative."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _Failure(Exception):
    """One failed attempt: a short reason, whether to retry, and the server's Retry-After."""

    def __init__(self, reason: str, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.retry_after = retry_after


# top log-probabilities asked for with Sampling.choices: the choices' tokens must be among them
TOP_LOGPROBS = 20


def _choice_text(data: Any, choices: Sequence[str]) -> str:
    """The JSON {choice: log-probability} of a one-token completion's top log-probabilities.

    A choice's log-probability is the log-sum-exp over the listed tokens that spell it, with or
    without surrounding spaces; ``null`` where none was listed."""
    try:
        top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        listed = [(str(t["token"]).strip(), float(t["logprob"])) for t in top]
    except (KeyError, IndexError, TypeError, ValueError):
        raise _Failure("no choices[0].logprobs.content[0].top_logprobs "
                       "(the server does not return log-probabilities)", retry=False) from None
    return json.dumps({c: logsumexp([lp for tok, lp in listed if tok == c]) for c in choices})


def _parse_completion(body: bytes, choices: Sequence[str] = ()) -> tuple[str, dict[str, int]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Failure("non-JSON body", retry=True) from None
    if choices:
        return _choice_text(data, choices), {}
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Failure("no choices[0].message.content", retry=True) from None
    if not isinstance(text, str):
        raise _Failure("no choices[0].message.content", retry=True)
    usage = data.get("usage")
    counts = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)} \
        if isinstance(usage, dict) else {}
    return text, counts


class OpenAIOracle:
    """An :class:`~crome.oracle.base.Oracle` over ``POST {base_url}/chat/completions``."""

    backend = "openai"

    def __init__(self, options: OpenAIOptions) -> None:
        if options.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if options.max_retries < 0:
            raise ValueError("max_retries must be non-negative")
        self.options = options
        self.base_url = options.base_url.rstrip("/")
        key = os.environ.get(options.key_env) if options.key_env else None
        # Name-mangled and never formatted: repr, str and error texts cannot show the key.
        self.__headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.__secret = key or ""
        self._has_key = bool(key)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self._client = httpx.Client(
            timeout=httpx.Timeout(options.timeout),
            limits=httpx.Limits(max_connections=options.concurrency,
                                max_keepalive_connections=options.concurrency))
        self.model = options.model or self._discover_model()

    def __repr__(self) -> str:
        return (f"OpenAIOracle(base_url={self.base_url!r}, model={self.model!r}, "
                f"key_env={self.options.key_env!r}, key={'set' if self._has_key else 'unset'}, "
                f"concurrency={self.options.concurrency})")

    __str__ = __repr__

    def _scrub(self, text: str) -> str:
        return text.replace(self.__secret, "***") if self.__secret else text

    def _discover_model(self) -> str:
        """The first id that ``GET {base_url}/models`` lists, or ``"default"``."""
        try:
            r = self._client.get(f"{self.base_url}/models", headers=self.__headers,
                                 timeout=min(self.options.timeout, 30.0))
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
            return model if isinstance(model, str) and model else "default"
        except (httpx.HTTPError, ValueError, LookupError, TypeError):
            return "default"

    def _payload(self, request: OracleRequest) -> dict[str, Any]:
        s = request.sampling
        payload: dict[str, Any] = {"model": self.model, "messages": request.message_dicts,
                                   "temperature": s.temperature, "max_tokens": s.max_tokens,
                                   "top_p": s.top_p}
        if s.seed is not None:
            payload["seed"] = s.seed
        if s.stop:
            payload["stop"] = list(s.stop)
        if s.choices:
            payload.update(max_tokens=1, temperature=0.0, logprobs=True,
                           top_logprobs=TOP_LOGPROBS)
        return payload

    def _attempt(self, payload: dict[str, Any],
                 choices: Sequence[str] = ()) -> tuple[str, dict[str, int]]:
        try:
            r = self._client.post(f"{self.base_url}/chat/completions", json=payload,
                                  headers=self.__headers)
        except httpx.TimeoutException:
            raise _Failure("timeout", retry=True) from None
        except httpx.UnsupportedProtocol:
            raise _Failure("bad base_url (no http:// or https://)", retry=False) from None
        except httpx.RequestError as exc:  # connection, protocol or content-decoding errors
            raise _Failure(f"connection error ({type(exc).__name__})", retry=True) from None
        if not 200 <= r.status_code < 300:
            code = r.status_code
            retry = code in RETRY_STATUS or code >= 500
            raise _Failure(f"http {code}", retry=retry,
                           retry_after=retry_after_seconds(r.headers.get("retry-after")))
        return _parse_completion(r.content, choices)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        o = self.options
        if retry_after is not None:
            return min(retry_after, o.backoff_max)
        with self._rng_lock:
            return self._rng.uniform(0.0, min(o.backoff_max, o.backoff_base * 2 ** attempt))

    def _one(self, request: OracleRequest) -> OracleResponse:
        start = time.monotonic()
        payload = self._payload(request)
        attempts = 0
        reason = "no attempt"
        for attempt in range(self.options.max_retries + 1):
            attempts += 1
            try:
                text, usage = self._attempt(payload, request.sampling.choices)
            except _Failure as f:
                reason = f.reason
                if not f.retry or attempt == self.options.max_retries:
                    break
                time.sleep(self._delay(attempt, f.retry_after))
                continue
            except Exception as exc:  # noqa: BLE001 -- a bug or library error: no retry, no raise
                reason = f"unexpected {type(exc).__name__}"
                break
            return OracleResponse(text=text, attempts=attempts,
                                  seconds=time.monotonic() - start, usage=usage)
        plural = "attempt" if attempts == 1 else "attempts"
        return OracleResponse(text=None, error=self._scrub(f"{reason} after {attempts} {plural}"),
                              attempts=attempts, seconds=time.monotonic() - start)

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        out: list[OracleResponse | None] = [None] * len(requests)
        if not requests:
            return []
        workers = min(self.options.concurrency, len(requests))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-oracle")
        try:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for fut in as_completed(futures):
                i = futures[fut]
                out[i] = fut.result()
                if on_result:
                    on_result(i, out[i])  # type: ignore[arg-type]
        finally:
            # If on_result raised, drop the requests that have not started yet.
            pool.shutdown(wait=True, cancel_futures=True)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
