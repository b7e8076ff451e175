"""The ``rules`` backend: deterministic interventions, no LLM.

It reads the structured ``task`` of a request, not its messages. It knows one exact causal
intervention: **degrading correctness by changing the final number** of an answer (a GSM8K
solution's ``#### 18`` becomes another number, and the same number at the end of the last
reasoning line with it). Nothing else about the answer changes, which is what a causal
rewrite should be and what an LLM only approximates. Everything else (upgrades, other
attributes, answers with no number) is answered with an error saying the rule does not
apply, so the stage counts it instead of inventing a rewrite.

Rubric requests get :data:`crome.rubrics.FALLBACK_ATTRIBUTES` as JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict

from crome.oracle.base import (
    OracleRequest,
    OracleResponse,
    ResultCallback,
    generate_in_order,
)

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")
CORRECTNESS_WORDS = ("correct", "accura", "factual", "truth", "final answer", "math")


def applies_to(attribute: str) -> bool:
    name = attribute.lower()
    return any(w in name for w in CORRECTNESS_WORDS)


def change_final_number(answer: str, seed: int = 0) -> str | None:
    """Replace the final number of ``answer`` (every standalone occurrence of it on the last
    two non-empty lines) with a different, deterministic one; ``None`` without a number."""
    lines = answer.split("\n")
    content = [i for i, ln in enumerate(lines) if ln.strip()]
    if not content:
        return None
    tail = content[-2:]
    matches = [m for i in tail for m in _NUMBER.finditer(lines[i])]
    if not matches:
        return None
    old = matches[-1].group()
    digest = hashlib.sha256(f"{seed}\0{answer}".encode()).digest()
    value = float(old.replace(",", ""))
    delta = 1 + digest[0] % 9
    if value >= 20 and digest[1] % 2:
        delta *= 10
    new_value = value + delta if digest[2] % 2 or value - delta < 0 else value - delta
    decimals = len(old.split(".")[1]) if "." in old else 0
    new = f"{new_value:.{decimals}f}"
    if "," in old:
        whole, _, frac = new.partition(".")
        new = f"{int(whole):,}" + (f".{frac}" if frac else "")
    # not the integer part of a decimal ("1" in "1.6") nor part of a longer number
    pattern = re.compile(r"(?<![\w.])" + re.escape(old) + r"(?![\w]|\.\d)")
    for i in tail:
        lines[i] = pattern.sub(new, lines[i])
    return "\n".join(lines)


class RulesOracle:
    backend = "rules"
    model = "v1"

    def _one(self, req: OracleRequest) -> OracleResponse:
        from crome.rubrics import FALLBACK_ATTRIBUTES

        task = req.task_dict
        kind = task.get("kind")
        if kind == "rubric":
            return OracleResponse(text=json.dumps([asdict(a) for a in FALLBACK_ATTRIBUTES]))
        if kind != "rewrite":
            return OracleResponse(text=None, error=f"rules: unknown task kind {kind!r}",
                                  final=True)
        attribute, direction = str(task.get("attribute", "")), task.get("direction")
        if direction != "degrade" or not applies_to(attribute):
            return OracleResponse(text=None, error=f"rules: no exact rule to {direction} "
                                                   f"'{attribute}'", final=True)
        new = change_final_number(str(task.get("answer", "")), req.sampling.seed or 0)
        if new is None:
            return OracleResponse(text=None, error="rules: the answer has no number",
                                  final=True)
        return OracleResponse(text=new)

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        return generate_in_order(self._one, requests, on_result)

    def close(self) -> None:
        pass
