"""``crome serve-rm``: a reward model behind HTTP, for RL loops and best-of-N services.

Routes (JSON in, JSON out; every error is ``{"error": {"message", "field", "type"}}``):

* ``POST /get_reward`` -- OpenRLHF's remote RM API: ``{"query": [text, ...]}`` ->
  ``{"rewards": [...], "scores": [...], "truncated": n}``. A query is fully templated text,
  scored as one sequence (:func:`encode_text`). OpenRLHF also sends ``prompts`` and
  ``labels``; they are accepted and ignored.
* ``POST /classify`` -- vLLM's classification API, which verl's reward loop calls:
  ``{"model": ..., "input": text | [text, ...]}`` -> vLLM's ``ClassificationResponse``.
* ``POST /score`` -- crome's own: ``{"prompt": text | messages, "answers": [...]}`` ->
  ``{"rewards": [...], "truncated": n}``, formatted as ``crome score`` formats a pair.
* ``POST /compare`` -- a pairwise preference model's (PairPM, :mod:`crome.pairwise`) verdict
  on two answers to one prompt, both orders averaged: ``{"prompt": text | messages, "a": ...,
  "b": ...}`` -> ``{"a": P(a ≻ b), "b": P(b ≻ a), "tie": P(tie), "consistent": bool,
  "truncated": 0 | 1}`` (the three probabilities sum to 1; ``consistent``: the two orders,
  read alone, name the same winner). Several pairs under one prompt (as ``/score`` takes
  several answers): ``{"prompt": ..., "pairs": [{"a": ..., "b": ...}, ...]}`` ->
  ``{"comparisons": [{"a", "b", "tie", "consistent"}, ...], "truncated": n}``. A pair's
  answers count as two of ``max_items``; ``truncated`` counts the comparisons cut.
* ``GET /health`` (never needs the token): ``{"status", "model", "max_length", "pairwise"}``;
  ``GET /metrics`` (Prometheus text format).

One model, one kind of question. A PairPM gives no reward to one answer: with one loaded,
``/get_reward``, ``/classify`` and ``/score`` answer 400 ``wrong_model``. A Bradley-Terry RM
has no tie and no order to average: ``/compare`` answers 400 ``wrong_model`` (its preference
is ``σ(r_a − r_b)`` of two ``/score`` rewards, which a client computes without a second
route that would look like a PairPM's verdict).

Dynamic batching: requests wait in one bounded asyncio queue; one collector takes up to
``max_batch`` sequences (or what came within ``max_wait_ms``) and scores them in one call of
:func:`crome.score.score_encoded` on a single worker thread (the model is not thread-safe).
That scorer gives a sequence the same reward whatever else shares its batch (see
``crome/score.py``), so a reward served here equals ``crome score``'s bit for bit
(``tests/test_serve_rm.py``). ``/compare`` goes through the same queue: a request's job is
its comparisons in both orders (:func:`crome.pairwise.encode_both_orders`), the collector
scores them with every other request's, and the route turns the two rows of logits of each
comparison into its verdict (:func:`crome.pairwise.preferences`), exactly as
:func:`crome.pairwise.compare_texts` does offline.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from crome.data.schema import RecordError, validate_messages
from crome.evaluate.reference import Preference
from crome.model import Encoded, RewardModel
from crome.pairwise import encode_both_orders, preferences
from crome.score import ScoreOptions, ScoreStats, score_encoded

log = logging.getLogger("crome.serve_rm")

ROUTES = ("/get_reward", "/classify", "/score", "/compare", "/health", "/metrics")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RETRY_AFTER_S = 1


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 128  # sequences per scorer call (several requests share one)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # requests waiting for a batch; more get 503 + Retry-After
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 512  # texts (queries, inputs, answers) per request
    max_chars: int = 200_000  # characters per text (a prompt's messages count together)
    timeout_s: float = 60.0  # per request, from arrival to its rewards (504 after)
    token_env: str = "CROME_RM_TOKEN"  # the bearer token's variable (never the token)
    batch_size: int = 64  # rows per forward pass inside a scorer call (ScoreOptions)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_items", "max_chars",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


# -- text -> tokens ---------------------------------------------------------------------

def encode_text(rm: RewardModel, text: str, add_special_tokens: bool = True) -> Encoded:
    """A fully templated text as one sequence: the tokenizer's single-sequence special tokens
    (``[CLS] text [SEP]``, a BOS, ...) as ``tokenizer(text)`` adds them, and, past the RM's
    ``max_length``, the *start* cut (as crome cuts a prompt first; a decoder's head reads the
    last token, so the answer's end is kept). A cut is flagged as ``prompt_truncated``."""
    f = rm.formatter
    enc = f.backend.encode(text, add_special_tokens=False)
    specials = f.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
    budget = max(f.max_length - specials, 0)
    truncated = len(enc.ids) > budget
    if truncated:
        enc.truncate(budget, direction="left")
    if add_special_tokens:
        enc = f.backend.post_process(enc, None, add_special_tokens=True)
    return Encoded(list(enc.ids), list(enc.type_ids) if f.uses_type_ids else None,
                   prompt_truncated=truncated)


def score_raw_texts(rm: RewardModel, texts: Sequence[str], options: ScoreOptions | None = None,
                    stats: ScoreStats | None = None,
                    add_special_tokens: bool = True) -> list[float]:
    """Rewards of fully templated texts (what ``/get_reward`` and ``/classify`` serve)."""
    encs = [encode_text(rm, t, add_special_tokens) for t in texts]
    if stats is not None:
        for e in encs:
            stats.truncation.add(e)
    return score_encoded(rm, encs, options, stats)


# -- security ---------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def resolve_token(options: ServeOptions) -> str | None:
    return os.environ.get(options.token_env) or None


def check_bind(host: str, token: str | None, token_env: str = "CROME_RM_TOKEN") -> None:
    """Refuse to expose the server beyond this machine without a bearer token."""
    if token is None and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without a token: set {token_env} "
                         f"(clients then send 'Authorization: Bearer <token>'), or keep "
                         f"--host 127.0.0.1")


# -- errors and metrics -----------------------------------------------------------------

class ApiError(Exception):
    """An error the client is told about: status, one-line message, the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 reason: str = "invalid", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.reason, self.headers = reason, headers or {}


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


def _labels(**kv: str) -> str:
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
           for k, v in kv.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}" if kv else ""


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    """The counters behind ``/metrics``, in Prometheus' text format (version 0.0.4), written
    here: ``prometheus_client`` is not a crome dependency. Updated on the event loop only."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.sequences = 0
        self.comparisons = 0
        self.truncated = 0
        self.shared_tokens = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, str(status))] += 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self, queue_depth: int) -> str:
        p = "crome_rm_"
        out = [f"# HELP {p}requests_total HTTP requests by route and status.",
               f"# TYPE {p}requests_total counter"]
        out += [f"{p}requests_total{_labels(route=r, status=s)} {n}"
                for (r, s), n in sorted(self.requests.items())]
        out += [f"# HELP {p}errors_total Failed requests by route and reason.",
                f"# TYPE {p}errors_total counter"]
        out += [f"{p}errors_total{_labels(route=r, reason=why)} {n}"
                for (r, why), n in sorted(self.errors.items())]
        out += [f"# HELP {p}truncated_inputs_total Sequences cut to the model's max_length.",
                f"# TYPE {p}truncated_inputs_total counter",
                f"{p}truncated_inputs_total {self.truncated}",
                f"# HELP {p}sequences_total Sequences scored.",
                f"# TYPE {p}sequences_total counter",
                f"{p}sequences_total {self.sequences}",
                f"# HELP {p}comparisons_total Comparisons scored (two sequences each).",
                f"# TYPE {p}comparisons_total counter",
                f"{p}comparisons_total {self.comparisons}",
                (f"# HELP {p}shared_prompt_tokens_total Prompt tokens read once for "
                 "several answers (decoder prefix sharing)."),
                f"# TYPE {p}shared_prompt_tokens_total counter",
                f"{p}shared_prompt_tokens_total {self.shared_tokens}",
                f"# HELP {p}queue_depth Requests waiting for a batch.",
                f"# TYPE {p}queue_depth gauge",
                f"{p}queue_depth {queue_depth}"]
        out += self._histogram(f"{p}batch_size", "Sequences per scorer call.", [({}, self.batch)])
        out += self._histogram(f"{p}request_latency_seconds", "Request latency by route.",
                               [({"route": r}, h) for r, h in sorted(self.latency.items())])
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(name: str, help_: str, series: list[tuple[dict[str, str], Histogram]]
                   ) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for labels, h in series:
            for b, n in zip(h.buckets, h.counts):
                out.append(f"{name}_bucket{_labels(**labels, le=_num(b))} {n}")
            out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {h.count}")
            out.append(f"{name}_sum{_labels(**labels)} {_num(h.sum)}")
            out.append(f"{name}_count{_labels(**labels)} {h.count}")
        return out


async def _disconnected(request: Request) -> bool:
    """Returns once the client has gone: after its body, the next ASGI message a request
    receives is ``http.disconnect`` (a blocking receive: ``Request.is_disconnected`` does not
    see it through the HTTP middleware)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    return True


# -- dynamic batching -------------------------------------------------------------------

@dataclass
class _Job:
    encs: list[Encoded]
    future: asyncio.Future[list[Any]]  # a reward per sequence, or a PairPM's three logits
    comparisons: int = 0  # a /compare job: its encs are comparisons, in both orders


class Batcher:
    """One bounded asyncio queue of requests; one collector coroutine forms batches and runs
    each on a single worker thread, then resolves every request's future with its slice."""

    def __init__(self, rm: RewardModel, options: ServeOptions, metrics: Metrics) -> None:
        self.rm, self.options, self.metrics = rm, options, metrics
        self.score_options = ScoreOptions(batch_size=options.batch_size)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=options.max_queue)
        self._arrival = asyncio.Event()
        self._carry: _Job | None = None  # taken from the queue, did not fit the last batch
        self._queued_sequences = 0
        self._closing = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crome-rm-model")
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, encs: list[Encoded], comparisons: int = 0) -> asyncio.Future[list[Any]]:
        if self._closing:
            raise ApiError(503, "the server is shutting down", reason="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        job = _Job(encs, asyncio.get_running_loop().create_future(), comparisons)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(503, f"queue full ({self.options.max_queue} requests waiting); "
                           f"retry later", reason="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        self._queued_sequences += len(encs)
        self._arrival.set()
        return job.future

    async def close(self) -> None:
        """Refuse new requests, score every queued one, then stop the worker thread."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def _pop(self) -> _Job | None:
        while not self.queue.empty():
            job = self.queue.get_nowait()
            self._queued_sequences -= len(job.encs)
            if not job.future.done():  # timed out while waiting: nobody wants it
                return job
        return None

    async def _first(self) -> _Job | None:
        while True:
            job, self._carry = self._carry, None
            job = job if job is not None and not job.future.done() else self._pop()
            if job is not None or self._closing:
                return job
            self._arrival.clear()
            await self._arrival.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.options.max_wait_ms / 1000
        while True:
            first = await self._first()
            if first is None:
                return  # closing and nothing left
            # Let the queue fill for up to max_wait (jobs wait *in* the queue, so a full
            # queue means 503 rather than unbounded memory).
            deadline = loop.time() + max_wait
            while (not self._closing
                   and self._queued_sequences + len(first.encs) < self.options.max_batch
                   and (left := deadline - loop.time()) > 0):
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except TimeoutError:
                    break
            batch, n = [first], len(first.encs)
            while (job := self._pop()) is not None:
                if n + len(job.encs) > self.options.max_batch:
                    self._carry = job
                    break
                batch.append(job)
                n += len(job.encs)
            batch = [job for job in batch if not job.future.done()]  # timed out meanwhile
            if batch:
                await self._score(batch, loop)

    async def _score(self, batch: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        encs = [e for job in batch for e in job.encs]
        stats = ScoreStats()
        try:
            scores = await loop.run_in_executor(self._worker, score_encoded, self.rm, encs,
                                                self.score_options, stats)
        except Exception as exc:  # every waiting request hears of it
            log.exception("scoring a batch of %d sequences failed", len(encs))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.metrics.batch.observe(len(encs))
        self.metrics.sequences += len(encs)
        self.metrics.comparisons += sum(job.comparisons for job in batch)
        self.metrics.shared_tokens += stats.shared_tokens
        i = 0
        for job in batch:
            part, i = scores[i:i + len(job.encs)], i + len(job.encs)
            if not job.future.done():
                job.future.set_result(part)


# -- request bodies ---------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GetRewardRequest(_Strict):
    query: list[str] = Field(min_length=1)
    prompts: list[Any] | None = None  # OpenRLHF sends them; not used
    labels: list[Any] | None = None  # OpenRLHF sends them; not used
    truncate: bool = True


class ClassifyRequest(_Strict):
    model: str | None = None  # not checked: verl sends its own path for the model
    input: list[str] = Field(min_length=1)
    use_activation: bool | None = None  # vLLM's name ...
    activation: bool | None = None  # ... and its name before 0.11.2, which verl sends
    add_special_tokens: bool = True
    user: str | None = None
    truncate: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ScoreRequest(_Strict):
    prompt: Any  # text or chat messages, checked by crome's record schema
    answers: list[str] = Field(min_length=1)
    truncate: bool = True


class ComparePair(_Strict):
    a: str
    b: str


class CompareRequest(_Strict):
    """One pair (``a`` and ``b``) or several (``pairs``), under one prompt."""

    prompt: Any  # as ScoreRequest's
    a: str | None = None
    b: str | None = None
    pairs: list[ComparePair] | None = Field(default=None, min_length=1)
    truncate: bool = True

    def texts(self) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """The first and second answers, and the fields that name each pair's two; a
        request with both forms, or with half a pair, is refused (400)."""
        if self.pairs is not None:
            for name in ("a", "b"):
                if getattr(self, name) is not None:
                    raise ApiError(400, "send either a and b, or pairs, not both", name)
            return ([p.a for p in self.pairs], [p.b for p in self.pairs],
                    [(f"pairs[{i}].a", f"pairs[{i}].b") for i in range(len(self.pairs))])
        for name in ("a", "b"):
            if getattr(self, name) is None:
                raise ApiError(400, "Field required (or send pairs)", name)
        return [self.a], [self.b], [("a", "b")]  # type: ignore[list-item]


def verdict(p: Preference) -> dict[str, Any]:
    """A comparison as ``/compare`` answers it (``first`` is ``a``, ``second`` is ``b``)."""
    return {"a": p.first, "b": p.second, "tie": p.tie, "consistent": p.consistent}


def _field(loc: Sequence[Any]) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def parse_body(model: type[_Strict], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        e = errors[0]
        message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more errors)"
        raise ApiError(400, message, _field(e["loc"])) from None


def _check_prompt(prompt: Any, options: ServeOptions) -> Any:
    """A request's prompt, text or chat messages, checked by crome's record schema and
    against ``max_chars`` (its messages' contents count together)."""
    try:
        if isinstance(prompt, list):
            prompt = validate_messages(prompt, "prompt")
        elif not isinstance(prompt, str):
            raise RecordError(f"expected a string or a list of messages, got "
                              f"{type(prompt).__name__}", field="prompt")
        elif not prompt.strip():
            raise RecordError("empty", field="prompt")
    except RecordError as exc:
        raise ApiError(400, exc.message, exc.field) from None
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    if chars > options.max_chars:
        raise ApiError(413, f"{chars:,} characters exceed the limit of "
                       f"{options.max_chars:,}", "prompt", reason="too_long")
    return prompt


def _check_sizes(texts: Sequence[str], name: str, options: ServeOptions) -> None:
    if len(texts) > options.max_items:
        raise ApiError(413, f"{len(texts)} items exceed the limit of {options.max_items} per "
                       f"request", name, reason="too_many_items")
    for i, t in enumerate(texts):
        if len(t) > options.max_chars:
            raise ApiError(413, f"{len(t):,} characters exceed the limit of "
                           f"{options.max_chars:,}", f"{name}[{i}]", reason="too_long")


def _check_truncation(encs: Sequence[Encoded], name: str | None, truncate: bool,
                      max_length: int) -> int:
    """How many of ``encs`` were cut; with ``truncate`` off, a 400 naming the first
    (``name[i]``; ``name`` None: the request holds one item, and no field is named)."""
    cut = [i for i, e in enumerate(encs) if e.prompt_truncated or e.answer_truncated]
    if cut and not truncate:
        raise ApiError(400, f"longer than the model's max_length of {max_length} tokens "
                       f"(send \"truncate\": true to cut it)",
                       f"{name}[{cut[0]}]" if name is not None else None,
                       reason="too_many_tokens")
    return len(cut)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# -- the app ----------------------------------------------------------------------------

def create_app(rm: RewardModel, options: ServeOptions | None = None,
               name: str = "reward-model", token: str | None = None) -> FastAPI:
    """The FastAPI app. ``token``: when set, every route but ``/health`` needs
    ``Authorization: Bearer <token>``."""
    opts = options or ServeOptions()
    opts.check()
    metrics = Metrics()
    expected = f"Bearer {token}".encode() if token else None
    config = getattr(rm.model, "config", None)
    label = (getattr(config, "id2label", None) or {}).get(0)
    max_length = rm.formatter.max_length
    pairwise = rm.pairwise
    encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="crome-rm-encode")
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        batcher = Batcher(rm, opts, metrics)
        batcher.start()
        state["batcher"] = batcher
        try:
            yield
        finally:  # uvicorn has let the requests in flight finish; score what is queued
            await batcher.close()
            encoder.shutdown(wait=True)

    app = FastAPI(title="crome reward model", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "field": exc.field,
                                       "type": exc.reason}},
                            status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        path = request.url.path
        route = path if path in ROUTES else "other"
        try:
            if expected is not None and path != "/health":
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise ApiError(401, "missing or wrong bearer token", "Authorization",
                                   reason="unauthorized",
                                   headers={"WWW-Authenticate": "Bearer"})
            response = await call_next(request)
        except ApiError as exc:
            response = error_response(exc)
            metrics.errors[(route, exc.reason)] += 1
        except ClientDisconnect:  # gone while sending its body: nobody to answer, no fault
            response = error_response(ApiError(499, "client disconnected",
                                               reason="disconnected"))
            metrics.errors[(route, "disconnected")] += 1
        except Exception:  # one bad request must not stop the server
            log.exception("%s failed", path)
            response = error_response(ApiError(500, "internal error", reason="internal"))
            metrics.errors[(route, "internal")] += 1
        metrics.request(route, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        path = request.url.path
        metrics.errors[(path if path in ROUTES else "other", exc.reason)] += 1
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        metrics.errors[(path if path in ROUTES else "other", "http")] += 1
        return error_response(ApiError(exc.status_code, str(exc.detail), reason="http"))

    async def read_json(request: Request) -> Any:
        limit = opts.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:  # refused before a byte of the body is read
            if not length.isdigit():
                raise ApiError(400, "bad Content-Length header", "Content-Length")
            if int(length) > limit:
                raise ApiError(413, f"body of {int(length):,} bytes exceeds the limit of "
                               f"{limit:,}", reason="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies: counted as they come
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body exceeds the limit of {limit:,} bytes",
                               reason="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"malformed JSON: {exc}", reason="bad_json") from None

    def require_model(pairwise_model: bool) -> None:
        """Refuse, before the body is read, a route this kind of model cannot answer."""
        if pairwise and not pairwise_model:
            raise ApiError(400, "this server's model is a pairwise preference model: it gives "
                           "no reward to one answer; compare two with POST /compare",
                           reason="wrong_model")
        if pairwise_model and not pairwise:
            raise ApiError(400, "this server's model is a Bradley-Terry reward model: it "
                           "scores answers one at a time (POST /score; P(a ≻ b) = "
                           "σ(r_a − r_b)); /compare needs a pairwise model",
                           reason="wrong_model")

    async def rewards(encs: list[Encoded], start: float, request: Request,
                      comparisons: int = 0) -> list[Any]:
        """The rewards of a request's sequences (a PairPM's: three logits per sequence), or
        an error when it times out or its client leaves first; either way its job is
        cancelled, and the collector skips a cancelled job that is still queued (nobody
        would read its rewards)."""
        future = state["batcher"].submit(encs, comparisons)
        gone = asyncio.ensure_future(_disconnected(request))
        left = opts.timeout_s - (time.perf_counter() - start)
        try:
            await asyncio.wait({future, gone}, timeout=max(left, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future.done():
            return future.result()
        future.cancel()
        if gone.done() and not gone.cancelled():
            raise ClientDisconnect()
        raise ApiError(504, f"no rewards within {opts.timeout_s:g} s", reason="timeout",
                       headers={"Retry-After": str(RETRY_AFTER_S)})

    async def encode(fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(encoder, fn, *args)

    def encode_texts(texts: list[str], special: bool) -> list[Encoded]:
        return [encode_text(rm, t, special) for t in texts]

    async def score_texts_request(texts: list[str], name: str, truncate: bool, special: bool,
                                  start: float, request: Request,
                                  ) -> tuple[list[float], list[Encoded], int]:
        _check_sizes(texts, name, opts)
        encs = await encode(encode_texts, texts, special)
        cut = _check_truncation(encs, name, truncate, max_length)
        metrics.truncated += cut
        return await rewards(encs, start, request), encs, cut

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        start = time.perf_counter()
        require_model(pairwise_model=False)
        body = parse_body(GetRewardRequest, await read_json(request))
        scores, _, cut = await score_texts_request(body.query, "query", body.truncate, True,
                                                   start, request)
        return JSONResponse({"rewards": scores, "scores": scores, "truncated": cut})

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        start = time.perf_counter()
        require_model(pairwise_model=False)
        body = parse_body(ClassifyRequest, await read_json(request))
        if (body.activation is not None and body.use_activation is not None
                and body.activation != body.use_activation):
            raise ApiError(400, "activation and use_activation disagree", "use_activation")
        act = body.use_activation if body.use_activation is not None else body.activation
        scores, encs, cut = await score_texts_request(body.input, "input", body.truncate,
                                                      body.add_special_tokens, start, request)
        # vLLM's response (vllm/entrypoints/pooling/classify/protocol.py and serving.py):
        # ClassificationData(index, label=id2label.get(argmax), probs, num_classes=len(probs))
        # in ClassificationResponse(id="classify-...", object="list", created, model, data,
        # usage). probs is the head's output after the pooler's activation: PoolerClassify
        # (vllm/model_executor/layers/pooler/activations.py) is a sigmoid for num_labels < 2.
        # use_activation=False ("activation" before vLLM 0.11.2) skips it, so probs is
        # [raw reward]: what verl's reward loop sends ("activation": False) and reads as
        # data[-1]["probs"][-1] (verl/experimental/reward_loop/reward_loop.py,
        # compute_score_disrm). As in vLLM, leaving both unset applies the sigmoid.
        probs = [s if act is False else _sigmoid(s) for s in scores]
        tokens = sum(len(e) for e in encs)
        return JSONResponse({
            "id": f"classify-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()), "model": name,
            "data": [{"index": i, "label": label, "probs": [p], "num_classes": 1}
                     for i, p in enumerate(probs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None},
            "truncated": cut})

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        start = time.perf_counter()
        require_model(pairwise_model=False)
        body = parse_body(ScoreRequest, await read_json(request))
        prompt = _check_prompt(body.prompt, opts)
        _check_sizes(body.answers, "answers", opts)
        encs = await encode(rm.formatter.encode_many, [prompt] * len(body.answers),
                            body.answers)
        cut = _check_truncation(encs, "answers", body.truncate, max_length)
        metrics.truncated += cut
        return JSONResponse({"rewards": await rewards(encs, start, request),
                             "truncated": cut})

    @app.post("/compare")
    async def compare(request: Request) -> JSONResponse:
        start = time.perf_counter()
        require_model(pairwise_model=True)
        body = parse_body(CompareRequest, await read_json(request))
        prompt = _check_prompt(body.prompt, opts)
        firsts, seconds, fields = body.texts()
        n = len(firsts)
        if 2 * n > opts.max_items:  # two answers a pair, as /score counts answers
            raise ApiError(413, f"{n} pairs ({2 * n} answers) exceed the limit of "
                           f"{opts.max_items} answers per request",
                           "pairs" if body.pairs is not None else None,
                           reason="too_many_items")
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            for text, field in ((a, fields[i][0]), (b, fields[i][1])):
                if len(text) > opts.max_chars:
                    raise ApiError(413, f"{len(text):,} characters exceed the limit of "
                                   f"{opts.max_chars:,}", field, reason="too_long")
        # (prompt, a, b) of every pair, then (prompt, b, a): compare_texts' layout. An answer
        # is cut the same in either order, so the first n tell what was cut.
        encs = await encode(encode_both_orders, rm, [prompt] * n, firsts, seconds)
        cut = _check_truncation(encs[:n], "pairs" if body.pairs is not None else None,
                                body.truncate, max_length)
        metrics.truncated += 2 * cut  # sequences, both orders
        rows = await rewards(encs, start, request, comparisons=n)
        verdicts = [verdict(p) for p in preferences(rows[:n], rows[n:])]
        if body.pairs is None:
            return JSONResponse({**verdicts[0], "truncated": cut})
        return JSONResponse({"comparisons": verdicts, "truncated": cut})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name, "max_length": max_length,
                             "pairwise": pairwise})

    @app.get("/metrics")
    async def metrics_route() -> PlainTextResponse:
        batcher = state.get("batcher")
        return PlainTextResponse(metrics.render(batcher.depth if batcher else 0),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.state.metrics = metrics
    return app


# -- running it -------------------------------------------------------------------------

def _uvicorn_config(app: Any, options: ServeOptions, log_level: str):  # type: ignore[no-untyped-def]
    import uvicorn

    # Graceful shutdown: uvicorn stops accepting, waits (at most a request's timeout) for the
    # requests in flight, then the lifespan's end scores whatever is still queued.
    return uvicorn.Config(app, host=options.host, port=options.port, log_level=log_level,
                          lifespan="on", timeout_graceful_shutdown=int(options.timeout_s) + 5,
                          server_header=False)


class RewardServer:
    """The server on a background thread for the span of a ``with`` block (tests,
    notebooks); the same checks as ``crome serve-rm``. ``port=0`` picks a free port."""

    def __init__(self, rm: RewardModel, options: ServeOptions | None = None,
                 name: str = "reward-model", log_level: str = "warning",
                 start_timeout: float = 30.0) -> None:
        import uvicorn

        self.options = options or ServeOptions()
        token = resolve_token(self.options)
        check_bind(self.options.host, token, self.options.token_env)
        self.app = create_app(rm, self.options, name, token)
        self.server = uvicorn.Server(_uvicorn_config(self.app, self.options, log_level))
        self.start_timeout = start_timeout
        self.thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.server.run, name="crome-rm-server",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("the reward server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.options.host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=self.options.timeout_s + 10)


def serve_rm(model_dir: str | os.PathLike[str], options: ServeOptions | None = None) -> None:
    """``crome serve-rm``: load the RM and serve it until SIGINT/SIGTERM (graceful)."""
    import uvicorn

    opts = options or ServeOptions()
    opts.check()
    token = resolve_token(opts)
    check_bind(opts.host, token, opts.token_env)  # before the model loads: fail fast
    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: not a model directory")
    rm = RewardModel.load(model_dir)
    name = Path(model_dir).resolve().name
    app = create_app(rm, opts, name, token)
    auth = f"bearer token from ${opts.token_env}" if token else "no token (local only)"
    kind = ", pairwise: POST /compare" if rm.pairwise else ""
    print(f"crome serve-rm: {name} (max_length {rm.formatter.max_length}{kind}) on "
          f"http://{opts.host}:{opts.port}; auth: {auth}; max_batch {opts.max_batch}, "
          f"max_wait_ms {opts.max_wait_ms:g}", flush=True)
    uvicorn.Server(_uvicorn_config(app, opts, "info")).run()
