"""The perturbation suite: named, seeded, meaning-preserving rewrites of evaluation pairs.

A *transformation* rewrites one text (``typos``, ``markdown``, ``math_format`` …); a
*perturbation* binds it to a target, written ``NAME@TARGET``:

* ``@prompt``: the prompt (its last user turn for a chat);
* ``@both``: both answers, with the same random draws (the same URL, the same filler), so a
  fair scorer keeps its ranking: what changes is style, not which answer is better;
* ``@rejected`` / ``@chosen``: one answer only. A length or format boost given to the
  rejected answer alone is the *bait* case: a scorer that rewards style takes it.

Every transformation is deterministic given ``(seed, perturbation, record id)``. One that
cannot apply to a text (no number to reformat, no code to comment, no punctuation) returns
``None``; the pair is then left out of that perturbation's figures and counted with the
reason, never silently dropped. Text inside code (fenced blocks, inline code) is never
touched by the surface transformations, since a typo in code changes what it does.

For each perturbation :func:`evaluate_perturbations` reports, on the pairs it applies to:
accuracy, accuracy of the same pairs unperturbed, the drop (clean - perturbed, positive is
worse), consistency (the fraction of pairs whose ranking did not flip) and the mean absolute
reward change of the rewritten answers, also in units of the scorer's reward standard
deviation (the causal audit's invariance).

A pairwise model (a :class:`crome.evaluate.reference.Comparer`) is evaluated the same way on
its verdicts (``scale`` "win probability" in the report, "reward" for a scorer): a pair's two
sides are ``P(chosen ≻ rejected)`` and ``P(rejected ≻ chosen)`` (both orders averaged), its
margin their difference; ``mean_abs_delta`` is the mean absolute change of a rewritten
answer's win probability against the other answer of its pair (for ``@rejected``,
``|P(rejected' ≻ chosen) − P(rejected ≻ chosen)|``), and ``reward_std`` the standard
deviation of the clean win probabilities. ``clean`` also gives the comparer's
``order_consistency`` (the share of clean pairs whose two orders, read alone, name the same
winner; not the ``consistency`` of a perturbation, the share of pairs that did not flip).
Each distinct comparison is run once (:class:`MemoComparer`), as each answer is scored once
for a scorer.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import re
import statistics
import string
import time
import tokenize
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from crome.augment import paraphrase_texts  # the oracle paraphrase: prompt and guards
from crome.data.schema import PairRecord, Prompt
from crome.evaluate.reference import (
    Comparer,
    Preference,
    Scorer,
    compare_pairs,
    is_comparer,
    markdown_features,
    score_pairs,
)

Target = Literal["prompt", "both", "chosen", "rejected"]
TARGETS: tuple[Target, ...] = ("prompt", "both", "chosen", "rejected")
ANSWERS: tuple[Target, ...] = ("both", "chosen", "rejected")
TextFn = Callable[[str, random.Random], "str | None"]

# --------------------------------------------------------------------------- code spans

_FENCED = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n`]*)\n(.*?)(?:^ {0,3}\1[ \t]*$|\Z)",
                     re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(`+)[^`\n]+?\1")


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of fenced blocks (an open fence runs to the end) and inline code."""
    spans = [(m.start(), m.end()) for m in _FENCED.finditer(text)]
    for m in _INLINE_CODE.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            spans.append((m.start(), m.end()))
    return spans


def _outside(spans: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return not any(a < end and start < b for a, b in spans)


# --------------------------------------------------------------------------- surface

def wrap_in_quotes(text: str, rng: random.Random) -> str | None:
    return f'"{text}"'


_PUNCT = re.compile(r"(?<=\w)([,.;:!?])(?=\s|$)")


def _list_number(text: str, end: int) -> bool:
    """Whether the line up to ``end`` is only a number: the "1" of a "1." list item."""
    start = text.rfind("\n", 0, end) + 1
    return text[start:end].strip().isdigit()


def spaces_around_punctuation(text: str, rng: random.Random) -> str | None:
    spans = _code_spans(text)
    hits = [m for m in _PUNCT.finditer(text) if _outside(spans, m.start(), m.end())
            and not _list_number(text, m.start())]
    if not hits:
        return None
    out, last = [], 0
    for m in hits:
        out += [text[last:m.start()], " ", m.group(1)]
        last = m.end()
    return "".join(out) + text[last:]


_DOMAINS = ("t.co", "bit.ly", "example.com", "tinyurl.com")
_HANDLES = ("alex", "sam_writes", "the_real_jo", "mika", "dev_chris", "lee.k")


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))


def append_url(text: str, rng: random.Random) -> str | None:
    return f"{text} https://{rng.choice(_DOMAINS)}/{_token(rng, 8)}"


def append_handle(text: str, rng: random.Random) -> str | None:
    return f"{text} @{rng.choice(_HANDLES)}{rng.randrange(10, 100)}"


_TYPO_WORD = re.compile(r"[A-Za-z]{4,}")
TYPO_RATE = 0.05


def typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str | None:
    """Swap, substitute, insert or delete one inner letter in ``rate`` of the words of
    four letters or more (at least one word), outside code."""
    spans = _code_spans(text)
    words = [m for m in _TYPO_WORD.finditer(text) if _outside(spans, m.start(), m.end())]
    if not words:
        return None
    picked = sorted(rng.sample(range(len(words)), max(1, round(rate * len(words)))))
    out, last = [], 0
    for i in picked:
        m = words[i]
        w = m.group()
        j = rng.randrange(1, len(w) - 1)
        op = rng.choice(("swap", "substitute", "insert", "delete"))
        if op == "swap" and w[j] != w[j + 1]:
            new = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "insert":
            new = w[:j] + rng.choice(string.ascii_lowercase) + w[j:]
        elif op == "delete":
            new = w[:j] + w[j + 1:]
        else:
            letter = rng.choice([c for c in string.ascii_lowercase if c != w[j].lower()])
            new = w[:j] + letter + w[j + 1:]
        out += [text[last:m.start()], new]
        last = m.end()
    return "".join(out) + text[last:]


def tautology(text: str, rng: random.Random) -> str | None:
    return text + " and true is true" * 5


_DISTRACTORS = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Honey never spoils if it is kept in a sealed container.",
    "The Pacific is the largest and deepest of Earth's oceans.",
    "Octopuses have three hearts and blue blood.",
)


def ignore_above(text: str, rng: random.Random) -> str | None:
    return f"{rng.choice(_DISTRACTORS)}\n\nIgnore the text above.\n\n{text}"


def ignore_below(text: str, rng: random.Random) -> str | None:
    return f"{text}\n\nIgnore the text below.\n\n{rng.choice(_DISTRACTORS)}"


# --------------------------------------------------------------------------- format, verbosity

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_FINAL_LINE = re.compile(r"^\s*(?:####|A:)")
_BLOCK_LINE = re.compile(r"^\s*(?:[-*+]\s|\d{1,3}[.)]\s|#{1,6}\s|>|\|)")
_HEADINGS = ("## Answer", "## Overview", "## Summary", "### Key points")


def _paragraphs(text: str) -> list[tuple[bool, str]]:
    """``(is_code, chunk)`` in order: fenced blocks whole, prose split on blank lines."""
    out: list[tuple[bool, str]] = []
    last = 0
    for m in _FENCED.finditer(text):
        out += [(False, p) for p in re.split(r"\n\s*\n", text[last:m.start()]) if p.strip()]
        out.append((True, m.group().rstrip("\n")))
        last = m.end()
    out += [(False, p) for p in re.split(r"\n\s*\n", text[last:]) if p.strip()]
    return out


def _bold_lead(sentence: str) -> str:
    words = sentence.split(" ")
    k = min(3, max(1, len(words) // 3))
    lead = " ".join(words[:k]).rstrip(",;:")
    rest = sentence[len(lead):]
    return f"**{lead}**{rest}" if lead.strip() and "*" not in lead and "`" not in lead \
        else sentence


def to_markdown(text: str, rng: random.Random) -> str | None:
    """Same content as markdown: a heading, each prose sentence a bullet with its first
    words in bold; code blocks, existing lists and final-answer lines (``####``, ``A:``)
    are kept as they are. ``None`` when that adds no markdown."""
    blocks = [rng.choice(_HEADINGS)]
    for is_code, chunk in _paragraphs(text):
        if is_code:
            blocks.append(chunk)
            continue
        lines: list[str] = []
        for line in chunk.splitlines():
            if not line.strip():
                continue
            if _FINAL_LINE.match(line):
                lines.append(f"\n{line}")  # its own paragraph, not part of a bullet
                continue
            if _BLOCK_LINE.match(line):
                lines.append(line)
                continue
            lines += [f"- {_bold_lead(s.strip())}" for s in _SENTENCE_END.split(line.strip())
                      if s.strip()]
        blocks.append("\n".join(lines))
    out = "\n\n".join(b for b in blocks if b)
    before = sum(markdown_features(text).values())
    return out if sum(markdown_features(out).values()) > before else None


_OPENERS = ("Great question! ", "Sure, I'd be happy to help with that. ",
            "That's a really interesting question. ", "Absolutely! ")
_HEDGES = (" Of course, this can vary depending on the situation.",
           " That said, every case is a little different.",
           " It is worth keeping in mind that there are many perspectives on this.")
_CLOSERS = ("I hope this helps! Let me know if you have any other questions.",
            "Feel free to ask if anything is unclear.",
            "I hope this answers your question.")


def add_filler(text: str, rng: random.Random) -> str | None:
    """A content-free opener, a hedge after the first line when it is prose, and a
    closing line."""
    opener, hedge, closer = rng.choice(_OPENERS), rng.choice(_HEDGES), rng.choice(_CLOSERS)
    head, sep, tail = text.strip().partition("\n")
    if head.lstrip().startswith(("```", "~~~")) or _FINAL_LINE.match(head) \
            or _BLOCK_LINE.match(head):
        hedge = ""
    elif not head.rstrip().endswith((".", "!", "?", ":")):
        head = head.rstrip() + "."
    return f"{opener}{head}{hedge}{sep}{tail}\n\n{closer}"


_CONNECTIVES = ("In other words:", "To put it another way:", "To sum up:")


def restate(text: str, rng: random.Random) -> str | None:
    """Longer by repetition: up to three of the answer's prose sentences restated at the
    end after a connective ("In other words, …"). ``None`` without prose."""
    sentences: list[str] = []
    for is_code, chunk in _paragraphs(text):
        if is_code:
            continue
        for line in chunk.splitlines():
            if line.strip() and not _FINAL_LINE.match(line):
                sentences += [s.strip() for s in _SENTENCE_END.split(line.strip())
                              if len(s.split()) >= 3]
    if not sentences:
        return None
    again = " ".join(s if s.endswith((".", "!", "?")) else s + "." for s in sentences[:3])
    return f"{text.rstrip()}\n\n{rng.choice(_CONNECTIVES)} {again}"


# --------------------------------------------------------------------------- domain: math

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_MATH_FORMATS: dict[str, re.Pattern[str]] = {
    "hashes": re.compile(rf"####[ \t]*({_NUM})"),
    "sentence": re.compile(rf"[Tt]he (?:final )?answer is:?[ \t]*({_NUM})\.?"),
    "boxed": re.compile(rf"\\boxed\{{({_NUM})\}}"),
    "a_line": re.compile(rf"(?m)^A:[ \t]*({_NUM})\.?"),
}
_RENDER = {"hashes": "#### {n}", "sentence": "The answer is {n}.", "boxed": "\\boxed{{{n}}}"}


def swap_math_format(text: str, rng: random.Random) -> str | None:
    """The last final-answer marker in another of the three formats (``#### 18``,
    ``The answer is 18.``, ``\\boxed{18}``; GSM8K's ``A: 18`` is read too)."""
    found = [(m.start(), kind, m) for kind, rx in _MATH_FORMATS.items()
             for m in rx.finditer(text)]
    if not found:
        return None
    _, kind, m = max(found, key=lambda t: t[0])
    new_kind = rng.choice([k for k in _RENDER if k != kind])
    number = m.group(1).replace("$", "")
    return text[:m.start()] + _RENDER[new_kind].format(n=number) + text[m.end():]


# --------------------------------------------------------------------------- domain: code

_C_LIKE = {"c", "cpp", "c++", "java", "javascript", "js", "ts", "typescript", "go", "rust",
           "csharp", "cs", "kotlin", "swift"}
_ADDED_COMMENTS = ("Note: the next line is part of the solution.",
                   "Continue with the steps below.", "This part handles the main logic.")
_COMMENT_BEFORE = re.compile(r"^(\s*)(def |class |for |while |if |return\b|function |"
                             r"const |let |int |public |fn )")


def _python_comments(code: str) -> list[tuple[int, int]] | None:
    """(line index, column) of every ``#`` comment, or ``None`` if the code does not
    tokenise as Python."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return [(t.start[0] - 1, t.start[1]) for t in toks if t.type == tokenize.COMMENT]


def _strip_code(code: str, lang: str) -> str | None:
    lines = code.split("\n")
    if lang in _C_LIKE:
        hits = [(i, lines[i].index("//")) for i in range(len(lines))
                if lines[i].lstrip().startswith("//")]
    else:
        hits = _python_comments(code)
        if hits is None:
            return None
    if not hits:
        return None
    drop = set()
    for i, col in hits:
        kept = lines[i][:col].rstrip()
        if kept:
            lines[i] = kept
        else:
            drop.add(i)
    return "\n".join(ln for i, ln in enumerate(lines) if i not in drop)


def _comment_code(code: str, lang: str, rng: random.Random) -> str | None:
    mark = "//" if lang in _C_LIKE else "#"
    lines = code.split("\n")
    out: list[str] = []
    added = 0
    for line in lines:
        m = _COMMENT_BEFORE.match(line)
        if m and added < 5:
            out.append(f"{m.group(1)}{mark} {rng.choice(_ADDED_COMMENTS)}")
            added += 1
        out.append(line)
    return "\n".join(out) if added else None


def _looks_like_python(text: str) -> bool:
    if "\n" not in text.strip() or not re.search(r"^\s*(def |return |import |for )", text,
                                                  re.MULTILINE):
        return False
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def _map_code(text: str, edit: Callable[[str, str], str | None]) -> str | None:
    """Apply ``edit(code, lang)`` to every fenced block (or to the whole answer when it is
    bare Python, as HumanEval completions are); ``None`` if no block changed."""
    blocks = list(_FENCED.finditer(text))
    if not blocks:
        return edit(text, "python") if _looks_like_python(text) else None
    out, last, changed = [], 0, False
    for m in blocks:
        lang = m.group(2).strip().lower() or "python"
        new = edit(m.group(3).rstrip("\n"), lang)
        if new is None:
            continue
        changed = True
        out += [text[last:m.start(3)], new, "\n"]
        last = m.start(3) + len(m.group(3).rstrip("\n")) + 1
    return "".join(out) + text[last:] if changed else None


def strip_code_comments(text: str, rng: random.Random) -> str | None:
    return _map_code(text, _strip_code)


def add_code_comments(text: str, rng: random.Random) -> str | None:
    return _map_code(text, lambda code, lang: _comment_code(code, lang, rng))


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Transformation:
    """A named text rewrite; ``fn`` is ``None`` for the oracle-based ones."""

    name: str
    kind: Literal["surface", "format", "domain", "oracle"]
    description: str
    fn: TextFn | None
    targets: tuple[Target, ...] = TARGETS
    needs: str = ""  # what a text must have for the rewrite to apply


TRANSFORMATIONS: dict[str, Transformation] = {t.name: t for t in (
    Transformation("quotes", "surface", "wraps the text in double quotes", wrap_in_quotes),
    Transformation("punct_spaces", "surface", "puts a space before each punctuation mark "
                   "that ends a word ('word , word .')", spaces_around_punctuation,
                   needs="punctuation outside code"),
    Transformation("url", "surface", "appends a random short URL", append_url),
    Transformation("handle", "surface", "appends a random @handle", append_handle),
    Transformation("typos", "surface", f"character typos (swap, substitute, insert or delete a "
                   f"letter) in {TYPO_RATE:.0%} of the words, outside code", typos,
                   needs="a word of 4+ letters outside code"),
    Transformation("tautology", "surface", "appends 'and true is true' five times "
                   "(StressTest)", tautology),
    Transformation("ignore_above", "surface", "an unrelated sentence, then 'Ignore the text "
                   "above.', before the text", ignore_above),
    Transformation("ignore_below", "surface", "after the text, 'Ignore the text below.' and "
                   "an unrelated sentence", ignore_below),
    Transformation("markdown", "format", "the same content as markdown: a heading, one "
                   "bullet per sentence, bold lead words", to_markdown, ANSWERS,
                   needs="prose that markdown can add to"),
    Transformation("filler", "format", "content-free opener, hedge and closing line "
                   "('Great question! … I hope this helps!')", add_filler, ANSWERS),
    Transformation("restate", "format", "longer by restating up to three of its sentences "
                   "('In other words: …')", restate, ANSWERS,
                   needs="a prose sentence of 3+ words"),
    Transformation("math_format", "domain", "final answer written another way "
                   "('#### 18' / 'The answer is 18.' / '\\boxed{18}')", swap_math_format,
                   ANSWERS, needs="a final-answer marker (####, The answer is, \\boxed, A:)"),
    Transformation("code_comments_strip", "domain", "removes the comments from code",
                   strip_code_comments, ANSWERS, needs="code with comments"),
    Transformation("code_comments_add", "domain", "adds content-free comments to code",
                   add_code_comments, ANSWERS, needs="code with a def/for/if/return line"),
    Transformation("paraphrase", "oracle", "a paraphrase by the oracle LLM, checked to be "
                   "neither a copy nor a runaway (cached)", None, ANSWERS,
                   needs="an oracle paraphrase that passes the guards"),
)}

# What `--perturb default` runs: every non-oracle transformation at least once, the surface
# ones on both answers (ranking must hold), and the style boosts also on the rejected answer
# alone (the bait).
DEFAULT_SUITE: tuple[str, ...] = (
    "quotes@both", "punct_spaces@both", "url@both", "handle@both", "typos@both",
    "typos@prompt", "tautology@both", "ignore_above@both", "ignore_below@prompt",
    "markdown@both", "markdown@rejected", "filler@rejected", "restate@rejected",
    "math_format@both", "code_comments_strip@both", "code_comments_add@both",
)


@dataclass(frozen=True)
class Perturbation:
    """A transformation bound to a target: ``typos@both``."""

    transformation: Transformation
    target: Target

    @property
    def id(self) -> str:
        return f"{self.transformation.name}@{self.target}"

    @property
    def bait(self) -> bool:
        """A style change to one answer only: the ranking may legitimately suffer."""
        return self.target in ("chosen", "rejected")


def parse_perturbations(specs: Iterable[str], with_oracle: bool = False) -> list[Perturbation]:
    """``default``, ``all``, ``NAME`` (its first target: ``both`` where allowed) or
    ``NAME@TARGET``, in order, without repeats. ``all`` includes the oracle ones only when
    ``with_oracle``."""
    out: dict[str, Perturbation] = {}
    for spec in specs:
        spec = spec.strip()
        if spec == "default":
            items = list(DEFAULT_SUITE)
        elif spec == "all":
            items = [f"{t.name}@{tg}" for t in TRANSFORMATIONS.values() for tg in t.targets
                     if t.fn is not None or with_oracle]
        else:
            items = [spec]
        for item in items:
            name, _, target = item.partition("@")
            t = TRANSFORMATIONS.get(name)
            if t is None:
                raise ValueError(f"unknown transformation {name!r}; known: "
                                 f"{', '.join(TRANSFORMATIONS)} (or 'default', 'all')")
            target = target or ("both" if "both" in t.targets else t.targets[0])
            if target not in t.targets:
                raise ValueError(f"{name} applies to {', '.join(t.targets)}, not {target!r}")
            p = Perturbation(t, target)  # type: ignore[arg-type]
            out.setdefault(p.id, p)
    return list(out.values())


def rng_for(seed: int, perturbation_id: str, key: str) -> random.Random:
    """The random stream of one perturbation on one record: the same for both of its sides."""
    digest = hashlib.sha256(f"{seed}\0{perturbation_id}\0{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def apply_text(name: str, text: str, seed: int = 0, key: str = "") -> str | None:
    """One transformation on one text, seeded by ``(seed, name, key)``; ``None`` when it
    does not apply or leaves the text unchanged."""
    t = TRANSFORMATIONS[name]
    if t.fn is None:
        raise ValueError(f"{name} needs an oracle: use perturb_records(..., oracle=...)")
    new = t.fn(text, rng_for(seed, name, key))
    return new if new is not None and new != text else None


# --------------------------------------------------------------------------- applying

@dataclass
class PerturbedSet:
    """The pairs one perturbation applies to (ids kept) and what it could not apply to."""

    perturbation: Perturbation
    records: list[PairRecord]
    index: list[int]  # position of each perturbed pair in the input
    not_applicable: Counter[str] = field(default_factory=Counter)


def _rewrite_prompt(prompt: Prompt, rewrite: Callable[[str], str | None]) -> Prompt | None:
    if isinstance(prompt, str):
        return rewrite(prompt)
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        return None
    new = rewrite(prompt[users[-1]]["content"])
    if new is None:
        return None
    messages = [dict(m) for m in prompt]
    messages[users[-1]]["content"] = new
    return messages


def perturb_records(records: Sequence[PairRecord], perturbation: Perturbation, seed: int = 0,
                    paraphrases: dict[str, str] | None = None) -> PerturbedSet:
    """Apply ``perturbation`` to every record it fits; the rest are counted with why.

    ``paraphrases`` (from :func:`paraphrase_texts`) is the oracle's output, required for
    the ``paraphrase`` transformation.
    """
    t, target = perturbation.transformation, perturbation.target
    if t.fn is None and paraphrases is None:
        raise ValueError(f"{perturbation.id} needs an oracle (--oracle)")
    out = PerturbedSet(perturbation, [], [])
    for i, rec in enumerate(records):
        def rewrite(text: str, rec: PairRecord = rec) -> str | None:
            if t.fn is None:
                new = (paraphrases or {}).get(text)
            else:
                new = t.fn(text, rng_for(seed, perturbation.id, rec.id))
            return new if new is not None and new != text else None

        prompt, chosen, rejected = rec.prompt, rec.chosen, rec.rejected
        if target == "prompt":
            prompt = _rewrite_prompt(rec.prompt, rewrite)  # type: ignore[assignment]
        if target in ("both", "chosen"):
            chosen = rewrite(rec.chosen)  # type: ignore[assignment]
        if target in ("both", "rejected"):
            rejected = rewrite(rec.rejected)  # type: ignore[assignment]
        if prompt is None or chosen is None or rejected is None:
            out.not_applicable[f"needs {t.needs or 'a text it can change'}"] += 1
            continue
        out.records.append(replace(rec, prompt=prompt, chosen=chosen, rejected=rejected,
                                   provenance={**rec.provenance,
                                               "perturbation": perturbation.id}))
        out.index.append(i)
    return out


# --------------------------------------------------------------------------- evaluating

def _prompt_key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


class MemoScorer:
    """A scorer that scores each distinct (prompt, answer) once and times itself: a
    perturbation of the rejected answer re-scores only that answer."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.name = scorer.name
        self.memo: dict[tuple[str, str], float] = {}
        self.seconds = 0.0
        self.scored = 0

    @staticmethod
    def _key(prompt: Prompt, answer: str) -> tuple[str, str]:
        return (_prompt_key(prompt), answer)

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        keys = [self._key(p, a) for p, a in zip(prompts, answers, strict=True)]
        todo = {k: (p, a) for k, p, a in zip(keys, prompts, answers) if k not in self.memo}
        if todo:
            start = time.perf_counter()
            rewards = self.scorer.score([p for p, _ in todo.values()],
                                        [a for _, a in todo.values()])
            self.seconds += time.perf_counter() - start
            self.scored += len(todo)
            self.memo.update(zip(todo, map(float, rewards)))
        return [self.memo[k] for k in keys]


class MemoComparer:
    """A comparer that runs each distinct (prompt, first, second) comparison once and times
    itself: the comparer's counterpart of :class:`MemoScorer`."""

    def __init__(self, comparer: Comparer) -> None:
        self.comparer = comparer
        self.name = comparer.name
        self.memo: dict[tuple[str, str, str], Preference] = {}
        self.seconds = 0.0
        self.compared = 0

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str],
                seconds: Sequence[str]) -> list[Preference]:
        keys = [(_prompt_key(p), a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        todo = {k: (p, a, b) for k, p, a, b in zip(keys, prompts, firsts, seconds)
                if k not in self.memo}
        if todo:
            start = time.perf_counter()
            prefs = self.comparer.compare(*(list(x) for x in zip(*todo.values())))
            self.seconds += time.perf_counter() - start
            if len(prefs) != len(todo):
                raise ValueError(f"comparer {self.name!r} returned {len(prefs)} verdicts for "
                                 f"{len(todo)} comparisons")
            self.compared += len(todo)
            self.memo.update(zip(todo, prefs))
        return [self.memo[k] for k in keys]


def memoize(scorer: Scorer | Comparer) -> MemoScorer | MemoComparer:
    """``scorer`` behind its memo (:class:`MemoScorer` or :class:`MemoComparer`), or itself
    when it is one already."""
    if isinstance(scorer, (MemoScorer, MemoComparer)):
        return scorer
    if is_comparer(scorer):
        return MemoComparer(scorer)  # type: ignore[arg-type]
    return MemoScorer(scorer)  # type: ignore[arg-type]


@dataclass
class PerturbOptions:
    perturbations: tuple[str, ...] = ("default",)
    seed: int = 0


@dataclass
class PerturbationResult:
    """One perturbation's figures, on the preference pairs it applies to (``n``)."""

    id: str
    name: str
    target: str
    kind: str
    description: str
    bait: bool
    n: int
    not_applicable: int
    reasons: dict[str, int]
    accuracy: float | None
    clean_accuracy: float | None
    drop: float | None  # clean - perturbed, a fraction; positive = worse
    consistency: float | None  # pairs whose ranking (sign of the margin) did not flip
    # mean |reward change| of the rewritten answers (a comparer: of their win probability)
    mean_abs_delta: float | None
    mean_abs_delta_std: float | None  # the same in units of the clean rewards' std
    by_set: dict[str, dict[str, Any]]
    # oracle ones: texts whose paraphrase the guards rejected, by reason (a pair with such
    # a text is counted once in ``not_applicable``)
    oracle_rejections: dict[str, int] = field(default_factory=dict)


@dataclass
class PerturbReport:
    scorer: str
    seed: int
    sets: list[str]
    clean: dict[str, Any]
    reward_std: float | None
    transformations: list[PerturbationResult]
    seconds: dict[str, float]
    excluded_ties: int = 0
    scale: str = "reward"  # what a side's value is: "reward", or "win probability"

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "seed": self.seed, "sets": self.sets,
                "clean": self.clean, "scale": self.scale, "reward_std": self.reward_std,
                "excluded_ties": self.excluded_ties, "seconds": self.seconds,
                "transformations": [vars(t) for t in self.transformations]}

    def table(self) -> str:
        """A markdown table: accuracy, drop (points) and consistency per perturbation."""
        consistent = "" if self.clean.get("order_consistency") is None else \
            f", consistent in both orders {_pct(self.clean['order_consistency'])}"
        lines = [(f"{self.scorer}: clean accuracy {_pct(self.clean['accuracy'])} on "
                  f"{self.clean['n']} pairs ({', '.join(self.sets)}){consistent}"),
                 "| perturbation | n | n/a | accuracy | drop (pts) | consistency |",
                 "|---|---:|---:|---:|---:|---:|"]
        for t in self.transformations:
            drop = "–" if t.drop is None else f"{100 * t.drop:+.1f}"
            lines.append(f"| {t.id} | {t.n} | {t.not_applicable} | {_pct(t.accuracy)} | "
                         f"{drop} | {_pct(t.consistency)} |")
        return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pair_sides(scorer: Scorer | Comparer, records: Sequence[PairRecord],
               ) -> tuple[list[float], list[float]]:
    """The values of the chosen and the rejected side of every pair, whose difference is the
    pair's margin: rewards for a scorer (both sides in one call), ``P(chosen ≻ rejected)``
    and ``P(rejected ≻ chosen)`` for a comparer."""
    if is_comparer(scorer):
        return score_pairs(scorer, records)
    prompts = [r.prompt for r in records]
    both = scorer.score(prompts + prompts, [r.chosen for r in records]  # type: ignore[union-attr]
                        + [r.rejected for r in records])
    return both[:len(records)], both[len(records):]


def evaluate_perturbations(scorer: Scorer | Comparer, sets: Sequence[Any],
                           options: PerturbOptions | None = None, oracle: Any = None,
                           output_dir: str | os.PathLike[str] | None = None) -> PerturbReport:
    """Score (or compare) the clean pairs of ``sets`` (:class:`crome.evaluate.run.EvalSet`)
    and every perturbation of them; write ``perturb-<scorer>.json`` (and per-pair rows) when
    ``output_dir`` is given."""
    from crome.evaluate.run import slug

    opts = options or PerturbOptions()
    perturbations = parse_perturbations(opts.perturbations, with_oracle=oracle is not None)
    memo = memoize(scorer)
    records: list[PairRecord] = []
    set_of: list[str] = []
    excluded = 0
    for es in sets:
        for r in es.records:
            if r.label == "tie":
                excluded += 1
                continue
            records.append(r)
            set_of.append(es.name)
    start = time.perf_counter()
    clean_c, clean_r = pair_sides(memo, records)
    clean_margin = [c - r for c, r in zip(clean_c, clean_r)]
    rewards = clean_c + clean_r
    std = statistics.pstdev(rewards) if len(rewards) > 1 else None
    paraphrases: dict[str, str] | None = None
    para_reasons: Counter[str] = Counter()
    oracle_seconds = transform_seconds = 0.0
    if any(p.transformation.fn is None for p in perturbations):
        t0 = time.perf_counter()
        texts = [getattr(r, side) for r in records for side in ("chosen", "rejected")]
        paraphrases, para_reasons = paraphrase_texts(texts, oracle, opts.seed)
        oracle_seconds = time.perf_counter() - t0
    results: list[PerturbationResult] = []
    rows: list[dict[str, Any]] = []
    for p in perturbations:
        t0 = time.perf_counter()
        ps = perturb_records(records, p, opts.seed, paraphrases)
        transform_seconds += time.perf_counter() - t0
        pc, pr = pair_sides(memo, ps.records)
        deltas: list[float] = []
        flips = correct = clean_correct = 0
        per_set: dict[str, list[int]] = {}
        for k, i in enumerate(ps.index):
            margin = pc[k] - pr[k]
            flipped = _sign(margin) != _sign(clean_margin[i])
            flips += flipped
            correct += margin > 0
            clean_correct += clean_margin[i] > 0
            cell = per_set.setdefault(set_of[i], [0, 0, 0])
            cell[0] += 1
            cell[1] += margin > 0
            cell[2] += clean_margin[i] > 0
            if p.target in ("prompt", "both", "chosen"):
                deltas.append(abs(pc[k] - clean_c[i]))
            if p.target in ("prompt", "both", "rejected"):
                deltas.append(abs(pr[k] - clean_r[i]))
            rows.append({"id": records[i].id, "set": set_of[i], "perturbation": p.id,
                         "margin_clean": clean_margin[i], "margin": margin,
                         "flipped": flipped})
        n = len(ps.index)
        acc = correct / n if n else None
        clean_acc = clean_correct / n if n else None
        mad = _mean(deltas)
        results.append(PerturbationResult(
            id=p.id, name=p.transformation.name, target=p.target, kind=p.transformation.kind,
            description=p.transformation.description, bait=p.bait, n=n,
            not_applicable=sum(ps.not_applicable.values()), reasons=dict(ps.not_applicable),
            accuracy=acc, clean_accuracy=clean_acc,
            drop=None if acc is None or clean_acc is None else clean_acc - acc,
            consistency=1 - flips / n if n else None, mean_abs_delta=mad,
            mean_abs_delta_std=mad / std if mad is not None and std else None,
            by_set={s: {"n": c[0], "accuracy": c[1] / c[0], "clean_accuracy": c[2] / c[0]}
                    for s, c in per_set.items()},
            oracle_rejections=dict(para_reasons) if p.transformation.fn is None else {}))
    total = time.perf_counter() - start
    clean: dict[str, Any] = {"n": len(records),
                             "accuracy": _mean([float(m > 0) for m in clean_margin])}
    seconds: dict[str, float] = {
        "total": round(total, 3), "scoring": round(memo.seconds, 3),
        "transformations": round(transform_seconds, 3), "oracle": round(oracle_seconds, 3)}
    if isinstance(memo, MemoComparer):
        clean["order_consistency"] = _mean([float(p.consistent)
                                      for p in compare_pairs(memo, records)])  # memo hits
        seconds["comparisons_run"] = memo.compared
    else:
        seconds["answers_scored"] = memo.scored
    report = PerturbReport(
        scorer=scorer.name, seed=opts.seed, sets=[es.name for es in sets], clean=clean,
        reward_std=std, transformations=results, excluded_ties=excluded, seconds=seconds,
        scale="win probability" if isinstance(memo, MemoComparer) else "reward")
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = slug(scorer.name)
        (out / f"perturb-{tag}.json").write_text(
            json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
        with open(out / f"perturb-examples-{tag}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return report


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
