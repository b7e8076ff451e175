"""Reference scorers that are biased on purpose, and the protocol every scorer follows.

``LongerWins`` and ``MarkdownWins`` look only at surface features, never at the prompt.
They are yardsticks: on a data set where they score well, surface features predict the
label and a high accuracy says little; a robust reward model should beat them most where
they fail (LLMBar's adversarial sets punish exactly these shortcuts). They also let the
evaluation pipeline be run and tested end to end without a model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from crome.data.schema import PairRecord, Prompt


@runtime_checkable
class Scorer(Protocol):
    """Anything that gives each (prompt, answer) a scalar reward; higher is better.

    ``score`` takes parallel sequences and returns one float per answer. A scorer's rewards
    must not depend on how the answers are batched, so that one answer scores the same in
    every evaluation.
    """

    name: str

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class Preference:
    """A pairwise model's verdict on (first, second), both orders averaged:
    ``P(first ≻ second)``, ``P(second ≻ first)`` and ``P(tie)`` (they sum to 1).
    ``consistent``: the two orders, read on their own, name the same winner (or both a tie);
    a position-biased model prefers whichever answer comes first (or second) instead."""

    first: float
    second: float
    tie: float
    consistent: bool

    @property
    def margin(self) -> float:
        """``P(first ≻ second) − P(second ≻ first)``: > 0 where the first answer wins."""
        return self.first - self.second


@runtime_checkable
class Comparer(Protocol):
    """Anything that judges two answers to one prompt at once (a pairwise preference model,
    :class:`crome.pairwise.PairwiseScorer`): one :class:`Preference` per (prompt, first,
    second). It gives no reward to one answer, so evaluations that need one (best-of-N)
    rank candidates by comparisons instead (:mod:`crome.evaluate.bon`)."""

    name: str

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str],
                seconds: Sequence[str]) -> list[Preference]: ...


def is_comparer(scorer: object) -> bool:
    """Whether ``scorer`` compares pairs (a :class:`Comparer`) rather than scoring answers."""
    return callable(getattr(scorer, "compare", None))


def compare_pairs(comparer: Comparer, records: Sequence[PairRecord]) -> list[Preference]:
    """The comparer's verdict on (chosen, rejected) of every record, in order."""
    prefs = comparer.compare([r.prompt for r in records], [r.chosen for r in records],
                             [r.rejected for r in records])
    if len(prefs) != len(records):
        raise ValueError(f"comparer {comparer.name!r} returned {len(prefs)} verdicts for "
                         f"{len(records)} records")
    return prefs


def _check_lengths(prompts: Sequence[Prompt], answers: Sequence[str]) -> None:
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")


class LongerWins:
    """Reward = answer length in characters: the pure length bias."""

    name: str = "longer-wins"

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        _check_lengths(prompts, answers)
        return [float(len(a)) for a in answers]


# --- markdown --------------------------------------------------------------------------

MARKDOWN_FEATURES: tuple[str, ...] = (
    "heading", "bullet", "numbered", "bold", "italic", "code_fence", "table", "link")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+|$)")
_BULLET = re.compile(r"^[ \t]*[-*+][ \t]+(?=\S)")
_NUMBERED = re.compile(r"^[ \t]*\d{1,9}[.)][ \t]+(?=\S)")
_TABLE_DELIMITER = re.compile(
    r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]+(?:[ \t]+\"[^\"\n]*\")?\)|<(?:https?|ftp)://[^>\s]+>")
_BOLD = re.compile(r"(?<![\w*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?!\*?\w)"
                   r"|(?<![\w_])__(?=\S)(.+?)(?<=\S)__(?![\w_])")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])"
                     r"|(?<![\w_])_(?=[^\s_])([^_\n]+?)(?<=[^\s_])_(?![\w_])")


def _is_table_row(line: str) -> bool:
    return "|" in line and line.strip() not in ("", "|")


def markdown_features(text: str) -> Counter[str]:
    """Count the markdown features of an answer, by kind (the keys of MARKDOWN_FEATURES).

    Block features are counted once per block (a fenced code block, a table) or per line
    (a heading, a list item); inline ones per span. Text inside code (fenced or inline) is
    not searched, so ``# comment`` in a Python block is no heading and ``*args`` no
    italics. A fence left open runs to the end of the answer, as in CommonMark. This is a
    counter of what an answer *looks like*, not a full CommonMark parser: setext headings,
    indented code blocks and reference-style links are not counted.
    """
    counts: Counter[str] = Counter({k: 0 for k in MARKDOWN_FEATURES})
    lines = text.splitlines()
    prose: list[str] = []
    fence: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                    and not line.strip()[len(m.group(1)):].strip():
                fence = None
            i += 1
            continue
        if m:
            fence = m.group(1)
            counts["code_fence"] += 1
            i += 1
            continue
        if _is_table_row(line) and i + 1 < len(lines) and "|" in lines[i + 1] \
                and _TABLE_DELIMITER.match(lines[i + 1]):
            counts["table"] += 1
            prose.append(line)
            i += 2
            while i < len(lines) and _is_table_row(lines[i]):
                prose.append(lines[i])
                i += 1
            continue
        if _THEMATIC_BREAK.match(line):
            i += 1
            continue
        if (h := _HEADING.match(line)):
            counts["heading"] += 1
            line = line[h.end():]
        elif (b := _BULLET.match(line)):
            counts["bullet"] += 1
            line = line[b.end():]
        elif (n := _NUMBERED.match(line)):
            counts["numbered"] += 1
            line = line[n.end():]
        prose.append(line)
        i += 1
    for line in prose:
        line = _INLINE_CODE.sub(" ", line)
        line, k = _LINK.subn(lambda m: m.group(1) or " ", line)
        counts["link"] += k
        # Bold first, replaced by its inner text, so "**bold *and italic***" counts both.
        while True:
            line, k = _BOLD.subn(lambda m: m.group(1) or m.group(2), line)
            if not k:
                break
            counts["bold"] += k
        counts["italic"] += len(_ITALIC.findall(line))
    return counts


class MarkdownWins:
    """Reward = number of markdown features in the answer: the pure formatting bias.

    Equal counts give equal rewards, which :mod:`crome.evaluate.metrics` scores as ties
    (wrong); nothing breaks them, so the scorer gets no credit for pairs it cannot tell
    apart.
    """

    name: str = "markdown-wins"

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        _check_lengths(prompts, answers)
        return [float(sum(markdown_features(a).values())) for a in answers]


# --- registry --------------------------------------------------------------------------

REFERENCE_SCORERS: dict[str, type[Scorer]] = {
    LongerWins.name: LongerWins,
    MarkdownWins.name: MarkdownWins,
}


def get_reference_scorer(name: str) -> Scorer:
    """A new instance of the reference scorer called ``name``."""
    try:
        return REFERENCE_SCORERS[name]()
    except KeyError:
        known = ", ".join(sorted(REFERENCE_SCORERS))
        raise ValueError(f"unknown reference scorer {name!r}; known: {known}") from None


def score_pairs(scorer: Scorer | Comparer, records: Sequence[PairRecord],
                ) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and the rejected answers of ``records``, in order, ready for
    :func:`crome.evaluate.metrics.pair_outcomes`. For a :class:`Comparer`, the two "rewards"
    of a pair are ``P(chosen ≻ rejected)`` and ``P(rejected ≻ chosen)``: the pair is right
    where the first is larger, as it is for rewards."""
    if is_comparer(scorer):
        prefs = compare_pairs(scorer, records)  # type: ignore[arg-type]
        return [p.first for p in prefs], [p.second for p in prefs]
    prompts = [r.prompt for r in records]
    chosen = scorer.score(prompts, [r.chosen for r in records])
    rejected = scorer.score(prompts, [r.rejected for r in records])
    if len(chosen) != len(records) or len(rejected) != len(records):
        raise ValueError(f"scorer {scorer.name!r} returned {len(chosen)} and {len(rejected)} "
                         f"rewards for {len(records)} records")
    return chosen, rejected
