"""The one pair record that every crome stage reads and writes, and its validation.

A record is a preference between two answers to the same prompt (``label="chosen"``: the
``chosen`` answer is better) or a tie (``label="tie"``: neither is better, as in Crome's
neutral augmentations). Derived records keep a ``provenance`` dict naming their parent and
how they were made, so nothing in a training set is of unknown origin.

Validation is strict and names the place of the fault (file, line, field) because records
come from user files and from LLM output; a traceback would tell the user nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]
Prompt = str | list[Message]
Label = Literal["chosen", "tie"]

LABELS: tuple[str, ...] = ("chosen", "tie")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
PROVENANCE_KEYS: tuple[str, ...] = (
    "stage",
    "recipe",
    "attribute",
    "direction",
    "oracle",
    "parent_id",
    "prompt_hash",
)
# Answers larger than this are refused rather than tokenised: a 10 MB "answer" is a broken
# export, not a preference, and it would stall tokenisation for minutes.
MAX_ANSWER_CHARS = 1_000_000


class RecordError(ValueError):
    """A record that breaks the schema; ``str()`` is a one-line message naming its place."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None,
                 field: str | None = None, unit: str = "line") -> None:
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        self.unit = unit
        super().__init__(self.__str__())

    def located(self, path: str, line: int | None, unit: str = "line") -> RecordError:
        return RecordError(self.message, path=path, line=line, field=self.field, unit=unit)

    def __str__(self) -> str:
        where = self.path or "<records>"
        if self.line is not None:
            where += f":{self.unit} {self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"


@dataclass
class PairRecord:
    """One preference (or tie) between two answers to one prompt."""

    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    label: Label = "chosen"
    source: str = ""
    subset: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def prompt_text(prompt: Prompt) -> str:
    """The prompt as plain text, for length counts, hashing and similarity."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_hash(prompt: Prompt) -> str:
    """A short stable hash of a prompt (text or messages): rubrics are keyed by it and
    derived pairs record it, so a rubric or a rewrite can be traced to its prompt."""
    material = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _check_str(data: dict[str, Any], name: str, *, required: bool = True,
               nonempty: bool = False) -> str:
    if name not in data or data[name] is None:
        if required:
            raise RecordError("missing", field=name)
        return ""
    value = data[name]
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {type(value).__name__}", field=name)
    if nonempty and not value.strip():
        raise RecordError("empty", field=name)
    return value


def parse_messages(value: Any, name: str,
                   roles: tuple[str, ...] | None = None) -> list[Message]:
    """``{role, content}`` messages (other keys dropped), each checked for its types and,
    when ``roles`` is given, for a known role; errors name the message and its field."""
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"expected a message object, got {type(m).__name__}", field=where)
        role, content = m.get("role"), m.get("content")
        if roles is not None and role not in roles:
            raise RecordError(f"role must be one of {', '.join(roles)}, got {role!r}",
                              field=f"{where}.role")
        if not isinstance(role, str):
            raise RecordError("role must be a string", field=f"{where}.role")
        if not isinstance(content, str):
            raise RecordError("content must be a string", field=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def validate_messages(messages: Any, name: str = "prompt") -> list[Message]:
    """Chat prompts: optional system message, then user/assistant turns ending with the user.

    The answer being scored is the next assistant turn, so the prompt must end on a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError("expected a non-empty list of messages", field=name)
    out = parse_messages(messages, name, ROLES)
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise RecordError("a chat prompt needs at least one user turn", field=name)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            idx = i + (len(out) - len(turns))
            raise RecordError(f"roles must alternate user/assistant starting with user; "
                              f"found {m['role']!r} where {expected!r} belongs",
                              field=f"{name}[{idx}].role")
    if turns[-1]["role"] != "user":
        raise RecordError("a chat prompt must end with a user turn", field=name)
    return out


def validate_record(data: Any, max_answer_chars: int = MAX_ANSWER_CHARS) -> PairRecord:
    """Build a :class:`PairRecord` from a decoded dict, or raise :class:`RecordError`."""
    if not isinstance(data, dict):
        raise RecordError(f"expected an object, got {type(data).__name__}")
    rid = data.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if rid is None:
        raise RecordError("missing", field="id")
    if not isinstance(rid, str) or not rid:
        raise RecordError("expected a non-empty string", field="id")
    if "prompt" not in data:
        raise RecordError("missing", field="prompt")
    prompt = data["prompt"]
    if isinstance(prompt, list):
        prompt = validate_messages(prompt)
    elif not isinstance(prompt, str):
        raise RecordError(f"expected a string or a list of messages, got "
                          f"{type(prompt).__name__}", field="prompt")
    elif not prompt.strip():
        raise RecordError("empty", field="prompt")
    chosen = _check_str(data, "chosen", nonempty=True)
    rejected = _check_str(data, "rejected", nonempty=True)
    for name, ans in (("chosen", chosen), ("rejected", rejected)):
        if len(ans) > max_answer_chars:
            raise RecordError(f"answer of {len(ans):,} characters exceeds the limit of "
                              f"{max_answer_chars:,}", field=name)
    label = data.get("label", "chosen")
    if label not in LABELS:
        raise RecordError(f"must be one of {', '.join(LABELS)}, got {label!r}", field="label")
    if label == "chosen" and chosen == rejected:
        raise RecordError("chosen and rejected are identical in a preference pair",
                          field="rejected")
    provenance = data.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise RecordError(f"expected an object, got {type(provenance).__name__}",
                          field="provenance")
    return PairRecord(
        id=rid,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        label=label,
        source=_check_str(data, "source", required=False),
        subset=_check_str(data, "subset", required=False),
        provenance=dict(provenance),
    )
