"""Foreign row layouts turned into crome's record layout, and the ids of what is read.

Public preference sets do not share crome's layout. :func:`adapt_row` maps one decoded row to
the native layout (``id, prompt, chosen, rejected, label, source, subset, provenance``), so
that the one validation loop of the readers (:func:`crome.data.io._validated`) handles every
file, ``datasets.Dataset`` and ``hf:`` set the same way. It understands TRL's four preference
layouts:

- standard, explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings (crome's own layout);
- standard, implicit prompt: ``chosen`` and ``rejected`` hold prompt and answer in one string.
  An hh-rlhf transcript (``"\\n\\nHuman: … \\n\\nAssistant: …"``) is parsed into chat turns;
  any other text is split where the two strings first differ, backing off one space, as TRL's
  ``extract_prompt`` does;
- conversational, explicit prompt: ``prompt`` (messages, or a string taken as one user turn),
  and ``chosen``/``rejected`` message lists whose one assistant message after the prompt is the
  answer; a list that repeats the prompt first (UltraFeedback-binarized) has it stripped;
- conversational, implicit prompt: the common leading messages of ``chosen`` and ``rejected``
  are the prompt.

Nothing is guessed beyond that: an answer list with more than one turn after the prompt, or
whose answer is not an assistant turn, is a :class:`RecordError` naming the field, because
scoring only the last turn of a longer exchange would score something the raters did not
judge. Known extra columns (models, scores) go into ``provenance``; unknown ones are dropped
and counted in the read's notes.

Ids are optional because nearly no public set has one (:class:`RowIds`): a given ``id`` is
kept, else ``<prompt_id>/<k>`` (the k-th row with that ``prompt_id``, counting from 0), else
``h:`` and 16 hex digits of the sha256 of the pair's content. Later stages key caches and
scores on ids, so an id already taken in the read is made unique in a stable way (``@subset``
for a given id repeated in another subset, then ``#2``, ``#3`` …) and counted; a given id
repeated within one (source, subset) is still an error, since that is a broken file rather
than two sets sharing a numbering (RewardBench's id 3692 is in two subsets).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from crome.data.schema import (
    Message,
    PairRecord,
    RecordError,
    parse_messages,
    validate_messages,
)

NATIVE_KEYS: tuple[str, ...] = ("id", "prompt", "chosen", "rejected", "label", "source",
                                "subset", "provenance")
# Columns of public sets worth keeping: they go into provenance under the same name.
PROVENANCE_COLUMNS: tuple[str, ...] = ("chosen_model", "rejected_model", "score_chosen",
                                       "score_rejected")
# Columns understood and deliberately not kept: prompt_id makes the id; UltraFeedback's
# ``messages`` repeats ``chosen``; ``prompt_is_chat`` is crome's columnar encoding.
USED_COLUMNS: tuple[str, ...] = ("prompt_id", "messages", "prompt_is_chat")
# Optional columns that columnar sources (Parquet, datasets) fill with None where a row has
# no value; None there means "not given", not "given as null".
_OPTIONAL = ("label", "source", "subset", "provenance")
HASH_PREFIX = "h:"


# --------------------------------------------------------------------------- hh-rlhf text

# Only a marker after a blank line starts a turn: "Human:" inside an answer (quoted, or a
# model imagining the user's reply) is part of that answer, as the raters saw it.
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_turns(transcript: str) -> tuple[list[Message], set[int]]:
    """Chat turns of a transcript, with consecutive same-role turns merged.

    Returns the turns and the indices of those that absorbed a merge. Merging, rather than
    skipping, keeps pairs whose answer merely contains a stray ``\\n\\nAssistant:``.
    """
    head, *rest = HH_TURN.split(transcript)
    if head.strip():
        raise ValueError("text before the first turn")
    turns: list[Message] = []
    merged: set[int] = set()
    for name, content in zip(rest[::2], rest[1::2]):
        role, content = _HH_ROLES[name], content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n\n".join(c for c in (turns[-1]["content"], content) if c)
            merged.add(len(turns) - 1)
        else:
            turns.append({"role": role, "content": content})
    return turns, merged


class TranscriptError(ValueError):
    """An hh-rlhf transcript pair that cannot be split; ``reason`` is the skip reason that
    the hh-rlhf loader counts, ``field`` the side it concerns."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def hh_pair(chosen: str, rejected: str,
            notes: Counter[str]) -> tuple[list[Message], str, str]:
    """(prompt turns, chosen answer, rejected answer) of two hh-rlhf transcripts.

    The transcripts must share every turn but the last, which must be the assistant's.
    ``notes`` counts the repairs (merged turns, empty prompt turns) of a pair that is kept.
    """
    parsed = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            parsed.append((name, *hh_turns(text)))
        except (ValueError, KeyError, TypeError):
            raise TranscriptError("unparseable transcript", name) from None
    for name, turns, _ in parsed:
        if not turns or turns[0]["role"] != "user":
            raise TranscriptError("transcript does not start with a Human turn", name)
    for name, turns, _ in parsed:
        if turns[-1]["role"] != "assistant":
            raise TranscriptError("transcript ends with a Human turn", name)
    (_, c_turns, c_merged), (_, r_turns, r_merged) = parsed
    if c_turns[:-1] != r_turns[:-1]:
        raise TranscriptError("chosen and rejected prompts differ", "prompt")
    sides = ((c_turns, c_merged), (r_turns, r_merged))
    if any(i < len(t) - 1 for t, m in sides for i in m):
        notes["merged consecutive same-role turns in the prompt"] += 1
    if any(len(t) - 1 in m for t, m in sides):
        notes["merged consecutive assistant turns in an answer"] += 1
    if any(not m["content"] for m in c_turns[:-1]):
        notes["empty turn kept in the prompt"] += 1
    return c_turns[:-1], c_turns[-1]["content"], r_turns[-1]["content"]


def is_hh_transcript(text: Any) -> bool:
    """Whether ``text`` is an hh-rlhf style transcript (it begins with a ``Human:`` turn)."""
    return isinstance(text, str) and text.lstrip().startswith("Human:")


# --------------------------------------------------------------------------- layouts

def extract_prompt(chosen: str, rejected: str) -> str:
    """The common beginning of two strings, backing off one space, as TRL's
    ``extract_prompt`` does: ``"The sky is blue."``/``"The sky is green."`` give the prompt
    ``"The sky is"`` and the answers ``" blue."``/``" green."``."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n]


def _messages(value: Any, name: str) -> list[Message]:
    """A list of ``{role, content}`` messages (other keys dropped); roles are checked where the
    list is used, since a prompt and an answer allow different ones."""
    return parse_messages(value, name)


def _same(a: list[Message], b: list[Message]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
        for x, y in zip(a, b))


def _answer(messages: list[Message], start: int, name: str) -> str:
    """The content of the one assistant message ``messages[start:]``."""
    rest = messages[start:]
    if not rest:
        raise RecordError("no answer after the prompt", field=name)
    if len(rest) > 1:
        raise RecordError(f"{len(rest)} messages after the prompt; expected one assistant "
                          f"answer", field=name)
    if rest[0]["role"] != "assistant":
        raise RecordError(f"the answer must be an assistant message, got {rest[0]['role']!r}",
                          field=f"{name}[{start}].role")
    return rest[0]["content"]


def _explicit_answer(value: Any, prompt: list[Message], name: str) -> Any:
    """The answer of a conversational side under an explicit prompt: the list's one message
    after the prompt, where the list repeats the prompt first, else its only message."""
    if not isinstance(value, list):
        return value  # a string answer, or a wrong type that validate_record names
    messages = _messages(value, name)
    start = len(prompt) if _same(messages[:len(prompt)], prompt) else 0
    return _answer(messages, start, name)


def _implicit(row: dict[str, Any], notes: Counter[str]) -> None:
    """Split the prompt off ``chosen`` and ``rejected`` in place (no ``prompt`` column)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RecordError("missing", field=name)
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = 0
        while n < min(len(c), len(r)) - 1 and _same(c[n:n + 1], r[n:n + 1]):
            n += 1
        if n == 0:
            raise RecordError("missing, and chosen and rejected share no leading messages to "
                              "take it from", field="prompt")
        row["prompt"] = c[:n]
        row["chosen"], row["rejected"] = _answer(c, n, "chosen"), _answer(r, n, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if is_hh_transcript(chosen) or is_hh_transcript(rejected):
            texts = ["\n\n" + t.lstrip() if is_hh_transcript(t) else t
                     for t in (chosen, rejected)]
            try:
                prompt, row["chosen"], row["rejected"] = hh_pair(texts[0], texts[1], notes)
            except TranscriptError as e:
                raise RecordError(e.reason, field=e.field) from None
            row["prompt"] = prompt
            return
        prompt = extract_prompt(chosen, rejected)
        if not prompt.strip():
            raise RecordError("missing, and chosen and rejected do not begin with a common "
                              "prompt", field="prompt")
        row["prompt"] = prompt
        row["chosen"], row["rejected"] = chosen[len(prompt):], rejected[len(prompt):]
    else:
        kinds = {type(chosen).__name__, type(rejected).__name__}
        raise RecordError(f"missing, and chosen and rejected are not both strings or both "
                          f"message lists ({' and '.join(sorted(kinds))})", field="prompt")


def adapt_row(obj: Any, notes: Counter[str]) -> Any:
    """``obj`` in the native layout (see the module doc); the id is left as it is.

    Rows already in the native layout come back unchanged but for dropped unknown columns;
    a row that is not an object comes back as it is, for :func:`validate_record` to name.
    """
    if not isinstance(obj, dict):
        return obj
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.items():
        if key in NATIVE_KEYS:
            if not (value is None and key in _OPTIONAL):
                row[key] = value
        elif key in PROVENANCE_COLUMNS:
            if value is not None:
                extra[key] = value
        elif key not in USED_COLUMNS:
            notes[f"unknown column {key!r} ignored"] += 1
    prompt = row.get("prompt")
    if prompt is None:
        _implicit(row, notes)
    elif isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        if isinstance(prompt, list):
            turns = validate_messages(prompt)
        elif isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        else:
            turns = []  # a wrong type that validate_record names
        row["chosen"] = _explicit_answer(row.get("chosen"), turns, "chosen")
        row["rejected"] = _explicit_answer(row.get("rejected"), turns, "rejected")
    if extra:
        provenance = row.get("provenance", {})
        if isinstance(provenance, dict):  # else validate_record names it
            row["provenance"] = {**provenance,
                                 **{k: v for k, v in extra.items() if k not in provenance}}
    return row


# --------------------------------------------------------------------------- ids

def content_id(rec: PairRecord) -> str:
    """``h:`` and 16 hex digits of the sha256 of the canonical JSON of prompt, chosen and
    rejected: the same pair gets the same id in any file and at any position."""
    material = json.dumps([rec.prompt, rec.chosen, rec.rejected], ensure_ascii=False,
                          sort_keys=True, separators=(",", ":"))
    return HASH_PREFIX + hashlib.sha256(material.encode()).hexdigest()[:16]


def _id_value(value: Any, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise RecordError("expected an integer or a non-empty string", field=name)
    return value


class RowIds:
    """The ids of one read: given, from ``prompt_id``, or from the content; each unique.

    Call :meth:`base` on each decoded row (in file order, before validation, so that the
    position among the rows of a ``prompt_id`` does not depend on which rows are valid) and
    :meth:`assign` on the validated record. Renaming is deterministic given the file.
    """

    def __init__(self, renamed: Counter[str] | None = None,
                 examples: list[str] | None = None) -> None:
        # Renames by reason and the first few as "old -> new"; pass a report's to fill it.
        self.renamed: Counter[str] = renamed if renamed is not None else Counter()
        self.examples: list[str] = examples if examples is not None else []
        self._used: set[str] = set()
        self._given: set[tuple[str, str, str]] = set()
        self._positions: Counter[str] = Counter()
        self._next: dict[str, int] = {}

    def base(self, obj: Any) -> tuple[str, str]:
        """(kind, id before deduplication); kind is ``given``, ``prompt_id`` or ``hash``
        (whose id is only known after validation, so it comes back empty)."""
        if not isinstance(obj, dict):
            return "hash", ""
        if obj.get("id") is not None:
            return "given", _id_value(obj["id"], "id")
        if obj.get("prompt_id") is not None:
            pid = _id_value(obj["prompt_id"], "prompt_id")
            position = self._positions[pid]
            self._positions[pid] += 1
            return "prompt_id", f"{pid}/{position}"
        return "hash", ""

    def assign(self, rec: PairRecord, kind: str, base: str) -> str:
        """The record's final id; a given id repeated in the same (source, subset) raises."""
        if kind == "hash":
            base = content_id(rec)
        if kind == "given":
            key = (rec.source, rec.subset, base)
            if key in self._given:
                where = f" in subset {rec.subset!r}" if rec.subset else ""
                raise RecordError(f"duplicate id {base!r}{where}", field="id")
            self._given.add(key)
        rid = base
        if rid in self._used:
            if kind == "given":
                tag = rec.subset or rec.source
                reason = "id repeated in another subset"
                rid = self._free(f"{base}@{tag}" if tag else base)
            elif kind == "hash":
                reason = "identical pair without an id"
                rid = self._free(base)
            else:
                reason = "derived id already taken"
                rid = self._free(base)
            self.renamed[reason] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{base} -> {rid}")
        self._used.add(rid)
        return rid

    def _free(self, candidate: str) -> str:
        if candidate not in self._used:
            return candidate
        k = self._next.get(candidate, 2)
        while f"{candidate}#{k}" in self._used:
            k += 1
        self._next[candidate] = k + 1
        return f"{candidate}#{k}"
