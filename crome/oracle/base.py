"""The oracle protocol: chat messages and sampling options in, text out, in batches.

Every backend (an OpenAI-compatible server, an in-process GGUF model, deterministic rules)
implements :class:`Oracle`. A backend never raises for one failed request: it returns an
:class:`OracleResponse` with ``text=None`` and an ``error`` naming why, so a stage can count
the failure and carry on (nothing is lost silently, and one bad call does not end a run of
thousands).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


@dataclass(frozen=True)
class Sampling:
    """Sampling options sent with a request; part of the cache key."""

    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Non-empty: nothing is generated; the reply's first token is scored instead and the
    # response's text is the JSON object {choice: log-probability} (see
    # :func:`choice_logprobs`). A judge reads its verdict this way in one forward pass.
    choices: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        if self.choices:
            d["choices"] = list(self.choices)
        else:  # cache keys made before the field existed stay valid
            del d["choices"]
        return d


@dataclass(frozen=True)
class OracleRequest:
    """One chat request.

    ``task`` carries the structured form of what the messages ask (kind, attribute,
    direction, the answer...). LLM backends ignore it and read the messages; the ``rules``
    backend reads only the task, because a rule needs the answer, not a prompt about it.
    """

    messages: tuple[tuple[str, str], ...]
    sampling: Sampling = Sampling()
    task: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, messages: Sequence[Message], sampling: Sampling | None = None,
             task: dict[str, Any] | None = None) -> OracleRequest:
        return cls(tuple((m["role"], m["content"]) for m in messages), sampling or Sampling(),
                   tuple(sorted((task or {}).items())))

    @property
    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def task_dict(self) -> dict[str, Any]:
        return dict(self.task)

    def key_material(self) -> str:
        """Canonical JSON of everything that decides the answer (backend and model aside)."""
        return json.dumps({"messages": self.message_dicts, "sampling": self.sampling.to_dict(),
                           "task": self.task_dict}, sort_keys=True, ensure_ascii=False)


@dataclass
class OracleResponse:
    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 1
    seconds: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    # The backend would answer every sample of this request the same way (a rule that does
    # not apply): the caller should not spend retries on it.
    final: bool = False

    @property
    def ok(self) -> bool:
        return self.text is not None


ResultCallback = Callable[[int, OracleResponse], None]


class Oracle(Protocol):
    """``backend`` and ``model`` name the oracle in provenance and in cache keys."""

    backend: str
    model: str

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        """Answer every request, in order. ``on_result(i, response)`` is called as each one
        finishes (possibly from a worker thread), so a cache can keep finished calls when
        the process dies in the middle of a batch."""
        ...

    def close(self) -> None: ...


def generate_in_order(one: Callable[[OracleRequest], OracleResponse],
                      requests: Sequence[OracleRequest],
                      on_result: ResultCallback | None = None) -> list[OracleResponse]:
    """``generate`` for backends that answer one request at a time."""
    out: list[OracleResponse] = []
    for i, req in enumerate(requests):
        out.append(one(req))
        if on_result:
            on_result(i, out[-1])
    return out


def choice_logprobs(response: OracleResponse) -> dict[str, float | None]:
    """The log-probability of each choice as the reply's first token, from the text of a
    response to a request with ``Sampling.choices``; ``None`` for a choice that a served model
    did not list among its top tokens (below all of them)."""
    data = json.loads(response.text or "")
    if not isinstance(data, dict):
        raise ValueError("a choice response is a JSON object of log-probabilities")
    return {str(k): None if v is None else float(v) for k, v in data.items()}


def logsumexp(values: Sequence[float]) -> float | None:
    """log Σ exp(v) over the values (several spellings of one choice), ``None`` if empty."""
    if not values:
        return None
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def oracle_name(oracle: Oracle) -> str:
    return f"{oracle.backend}:{oracle.model}" if oracle.model else oracle.backend
