"""A client for ``crome serve-rm`` (:mod:`crome.serve_rm`), and a TRL reward function on it.

``RewardClient`` calls the server's routes with retries: a connection error, a 503 (queue
full or shutting down; its ``Retry-After`` is honoured, capped) and a 504 (the request's
server-side timeout) are tried again with exponential backoff, since scoring is idempotent.
Any other 4xx or 5xx raises :class:`RewardServerError` at once, carrying the server's
``{"error": {"message", "field", "type"}}``.

``compare`` and ``compare_many`` ask a server that holds a pairwise preference model
(``POST /compare``) for its verdicts, as :class:`crome.evaluate.reference.Preference`
(``first`` is ``a``, ``second`` is ``b``); a server with a Bradley-Terry RM refuses them (400
``wrong_model``), as a PairPM server refuses ``score`` (``health()["pairwise"]`` says which).

``reward_fn(url)`` makes a function for TRL's ``GRPOTrainer(reward_funcs=[...])``: it takes
TRL's ``prompts`` and ``completions`` (strings, or chat message lists in TRL's conversational
format) and sends each run of identical consecutive prompts (a GRPO group, best-of-N
candidates) as one ``/score`` request, several requests at once so the server can batch them.

The client needs httpx only: it does not import the server (nor torch). The bearer token is
read from an environment variable, sent as ``Authorization: Bearer ...``, never logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import httpx

from crome.evaluate.reference import Preference  # no torch: a dataclass
from crome.oracle.openai import retry_after_seconds  # no torch: httpx and the stdlib

log = logging.getLogger("crome.client")

Message = dict[str, Any]
PromptInput = str | list[Message]
RETRYABLE_STATUS = (503, 504)


@dataclass
class ClientOptions:
    timeout_s: float = 120.0  # per HTTP attempt (the server's own default timeout is 60 s)
    retries: int = 5  # further attempts after the first, for retryable failures only
    backoff_s: float = 0.25  # the first wait; doubled on every retry
    max_backoff_s: float = 10.0  # cap on any wait, a server's Retry-After included
    token_env: str | None = "CROME_RM_TOKEN"  # the token's variable (as serve-rm's default)
    truncate: bool = True  # False: texts past the RM's max_length get a 400, not a cut

    def check(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 \
                or self.max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0; retries, backoff_s and max_backoff_s "
                             ">= 0")


class RewardServerError(RuntimeError):
    """The server refused a request (``status``, its ``message``, the ``field`` at fault and
    the error ``type``), or could not be reached (``status`` None)."""

    def __init__(self, url: str, message: str, status: int | None = None,
                 field: str | None = None, type_: str | None = None,
                 attempts: int = 1) -> None:
        self.url, self.message, self.status = url, message, status
        self.field, self.type, self.attempts = field, type_, attempts
        where = f" (field {field})" if field else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        what = f"HTTP {status}" if status is not None else "unreachable"
        super().__init__(f"{url}: {what}{tries}: {message}{where}")


def _error_of(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """The server's error message, field and type; any other body as (a cut of) text."""
    try:
        err = response.json()["error"]
        return str(err["message"]), err.get("field"), err.get("type")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        return (text[:300] or response.reason_phrase or "no body"), None, None


def _preference(verdict: dict[str, Any], base_url: str) -> Preference:
    try:
        return Preference(first=float(verdict["a"]), second=float(verdict["b"]),
                          tie=float(verdict["tie"]), consistent=bool(verdict["consistent"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RewardServerError(base_url + "/compare",
                                f"not a verdict: {str(verdict)[:200]}") from exc


class RewardClient:
    """Synchronous client of one ``crome serve-rm`` server; thread-safe (one pooled
    ``httpx.Client``). Use it as a context manager, or call :meth:`close`.

    >>> with RewardClient("http://127.0.0.1:8000") as rm:
    ...     rm.score("What is 2+2?", ["4", "5"])
    """

    def __init__(self, base_url: str, options: ClientOptions | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.options = options or ClientOptions()
        self.options.check()
        self.base_url = base_url.rstrip("/")
        token = os.environ.get(self.options.token_env) if self.options.token_env else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=self.options.timeout_s, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- routes -------------------------------------------------------------------------

    def score(self, prompt: PromptInput, answers: Sequence[str]) -> list[float]:
        """Rewards of ``answers`` to ``prompt`` (text or chat messages), formatted as
        ``crome score`` formats a pair (``POST /score``)."""
        body = {"prompt": prompt, "answers": list(answers), "truncate": self.options.truncate}
        return self._rewards("/score", body, len(answers))

    def get_reward(self, queries: Sequence[str]) -> list[float]:
        """Rewards of fully templated texts, each scored as one sequence (``POST
        /get_reward``, OpenRLHF's API)."""
        body = {"query": list(queries), "truncate": self.options.truncate}
        return self._rewards("/get_reward", body, len(queries))

    def compare(self, prompt: PromptInput, a: str, b: str) -> Preference:
        """A pairwise model's verdict on answers ``a`` and ``b`` to ``prompt``, both orders
        averaged (``POST /compare``): ``first`` is P(a ≻ b), ``second`` P(b ≻ a)."""
        body = {"prompt": prompt, "a": a, "b": b, "truncate": self.options.truncate}
        return _preference(self._request("POST", "/compare", body).json(), self.base_url)

    def compare_many(self, prompt: PromptInput,
                     pairs: Sequence[tuple[str, str]]) -> list[Preference]:
        """Verdicts on several ``(a, b)`` pairs of answers to one ``prompt``, in order, in
        one request (``POST /compare`` with ``pairs``; each pair counts as two answers
        against the server's ``--max-items``)."""
        body = {"prompt": prompt, "pairs": [{"a": a, "b": b} for a, b in pairs],
                "truncate": self.options.truncate}
        url = self.base_url + "/compare"
        got = self._request("POST", "/compare", body).json()["comparisons"]
        if len(got) != len(pairs):
            raise RewardServerError(url, f"{len(got)} verdicts for {len(pairs)} pairs")
        return [_preference(v, self.base_url) for v in got]

    def health(self) -> dict[str, Any]:
        """``GET /health``: status, model name, max_length and whether the model is
        pairwise."""
        return self._request("GET", "/health").json()

    # -- the one request loop -----------------------------------------------------------

    def _rewards(self, route: str, body: dict[str, Any], n: int) -> list[float]:
        rewards = self._request("POST", route, body).json()["rewards"]
        if len(rewards) != n:
            raise RewardServerError(self.base_url + route,
                                    f"{len(rewards)} rewards for {n} inputs")
        return [float(r) for r in rewards]

    def _request(self, method: str, route: str, body: Any = None) -> httpx.Response:
        opts, url = self.options, self.base_url + route
        attempts = opts.retries + 1
        for attempt in range(1, attempts + 1):
            wait = min(opts.backoff_s * 2 ** (attempt - 1), opts.max_backoff_s)
            try:
                response = self._http.request(method, route, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out: try again
                if attempt == attempts:
                    raise RewardServerError(url, f"{type(exc).__name__}: {exc}",
                                            attempts=attempt) from exc
                reason = type(exc).__name__
            else:
                if response.is_success:
                    return response
                message, field, type_ = _error_of(response)
                if response.status_code not in RETRYABLE_STATUS or attempt == attempts:
                    raise RewardServerError(url, message, response.status_code, field, type_,
                                            attempts=attempt)
                reason = f"HTTP {response.status_code} ({message})"
                after = retry_after_seconds(response.headers.get("retry-after"))
                if after is not None:
                    wait = min(after, opts.max_backoff_s)
            log.warning("%s %s: %s; retry %d of %d in %.2f s", method, url, reason, attempt,
                        opts.retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises


# -- TRL ----------------------------------------------------------------------------------

def completion_text(completion: str | list[Message], index: int = 0) -> str:
    """A TRL completion as the answer's text: a string as it is; a conversational completion
    (``[{"role": "assistant", "content": ...}]``) as its one message's content."""
    if isinstance(completion, str):
        return completion
    if (isinstance(completion, list) and len(completion) == 1
            and isinstance(completion[0], dict)
            and isinstance(completion[0].get("content"), str)):
        return completion[0]["content"]
    raise ValueError(f"completions[{index}]: expected a string or a list of one message "
                     f"with string content, got {str(completion)[:200]}")


def group_runs(prompts: Sequence[Any], max_size: int) -> list[range]:
    """The index ranges of runs of equal consecutive prompts, each at most ``max_size``."""
    runs: list[range] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start] or i - start == max_size:
            runs.append(range(start, i))
            start = i
    return runs


@dataclass
class RewardFnOptions:
    max_answers: int = 512  # answers per /score request (serve-rm's --max-items default)
    concurrency: int = 8  # /score requests in flight at once (the server batches them)


def reward_fn(url: str = "http://127.0.0.1:8000", *,
              transport: httpx.BaseTransport | None = None,
              **options: Any) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=[reward_fn(url)])``.

    ``options``: fields of :class:`ClientOptions` (``timeout_s``, ``retries``, ``token_env``
    ...) and of :class:`RewardFnOptions` (``max_answers``, ``concurrency``).

    The function takes ``prompts`` and ``completions`` (TRL's keyword arguments; extra
    dataset columns are ignored) and returns one reward per completion, in order. Prompts
    are text or chat messages; completions are text or ``[{"role": "assistant", "content":
    ...}]``. A run of identical consecutive prompts (TRL lays out a prompt's
    ``num_generations`` completions side by side) is one ``/score`` request."""
    client_fields = set(ClientOptions.__dataclass_fields__)
    fn_fields = set(RewardFnOptions.__dataclass_fields__)
    unknown = sorted(set(options) - client_fields - fn_fields)
    if unknown:
        raise TypeError(f"reward_fn: unknown option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(client_fields | fn_fields))}")
    fopts = RewardFnOptions(**{k: v for k, v in options.items() if k in fn_fields})
    if fopts.max_answers < 1 or fopts.concurrency < 1:
        raise ValueError("max_answers and concurrency must be at least 1")
    copts = ClientOptions(**{k: v for k, v in options.items() if k in client_fields})
    client = RewardClient(url, copts, transport=transport)

    def crome_reward(prompts: Sequence[PromptInput], completions: Sequence[Any],
                     **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        answers = [completion_text(c, i) for i, c in enumerate(completions)]
        runs = group_runs(prompts, fopts.max_answers)

        def one(run: range) -> list[float]:
            return client.score(prompts[run.start], answers[run.start:run.stop])

        if len(runs) <= 1 or fopts.concurrency == 1:
            parts = [one(run) for run in runs]
        else:
            with ThreadPoolExecutor(min(fopts.concurrency, len(runs))) as pool:
                parts = list(pool.map(one, runs))
        return [r for part in parts for r in part]

    crome_reward.client = client  # type: ignore[attr-defined]  # to close it, or inspect
    return crome_reward
