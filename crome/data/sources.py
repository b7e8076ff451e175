"""Adapters from the public data sets to :class:`PairRecord`s, and where those sets live.

Each adapter turns one public format into pair records and returns a :class:`SourceResult`
that counts, by reason, every input it could not turn into a record (``skipped``) and every
repair it made on the way (``notes``): evaluation numbers are only comparable when one can see
what was left out. Records pass through :func:`validate_record`, so an adapter cannot emit
something that the readers would refuse.

Text is kept as the source wrote it, with two exceptions that remove artefacts of the source
rather than content: hh-rlhf turns lose the blank around the ``Human:``/``Assistant:``
markers, and XSTest completions lose the leading space that Llama-2's tokenizer put in front of
every answer (a give-away of which model wrote which side). LLMBar answers are kept verbatim
because some are code whose first line's indentation matters.

Two sources are training data rather than benchmarks: UltraFeedback, binarized as in TRL
(``ultrafeedback/train`` and its held-out twin ``ultrafeedback/eval``), and the ranked
sibling replies of OpenAssistant's oasst1 (``oasst1``), whose prompts are the conversation
from the root of the message tree down to the replies' parent. Both keep text verbatim.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from crome.data.formats import TranscriptError, hh_pair
from crome.data.io import ReadReport, iter_pairs
from crome.data.schema import Message, PairRecord, RecordError, validate_record

DATA_SUBDIRS: tuple[str, ...] = ("hh-rlhf", "llmbar", "xstest", "gsm8k")
DATA_ENV = "CROME_DATA"
DATA_LAYOUT = """\
  hh-rlhf/<subset>/test.jsonl.gz   subset: helpful-base, harmless-base, helpful-online,
                                   helpful-rejection-sampled (anthropics/hh-rlhf)
  llmbar/*.json                    the 8 files of princeton-nlp/LLMBar Dataset/
  xstest/*.csv                     xstest_prompts.csv and xstest_v2_completions_*.csv
                                   (paul-rottger/exaggerated-safety)
  gsm8k/*.jsonl                    train, test and example_model_solutions
                                   (openai/grade-school-math)
  rewardbench/filtered.jsonl.gz    RewardBench's filtered set (only for the source
                                   `rewardbench`)
  ultrafeedback/{train,eval}.jsonl.gz
                                   UltraFeedback binarized as trl-lib/ultrafeedback_binarized
                                   (only for the sources `ultrafeedback/train`, `/eval`)
  oasst1/en-validation.jsonl.gz    OpenAssistant oasst1 messages, one a line (only for the
                                   source `oasst1`)"""

HH_SUBSETS: tuple[str, ...] = (
    "helpful-base",
    "harmless-base",
    "helpful-online",
    "helpful-rejection-sampled",
)
# File stem -> subset name; RewardBench's names where RewardBench has the subset.
LLMBAR_FILES: dict[str, str] = {
    "Natural": "llmbar-natural",
    "Adversarial_Neighbor": "llmbar-adver-neighbor",
    "Adversarial_GPTInst": "llmbar-adver-GPTInst",
    "Adversarial_GPTOut": "llmbar-adver-GPTOut",
    "Adversarial_Manual": "llmbar-adver-manual",
    "Processed_MT-Bench": "llmbar-processed-mtbench",
    "Processed_LLMEval_2": "llmbar-processed-llmeval2",
    "Processed_FairEval": "llmbar-processed-faireval",
}
LLMBAR_ADVERSARIAL: tuple[str, ...] = (
    "llmbar-adver-neighbor",
    "llmbar-adver-GPTInst",
    "llmbar-adver-GPTOut",
    "llmbar-adver-manual",
)
ULTRAFEEDBACK_SPLITS: tuple[str, ...] = ("train", "eval")
OASST1_FILE = "en-validation.jsonl.gz"
XSTEST_SUBSETS: dict[str, str] = {"safe": "xstest-should-respond",
                                  "unsafe": "xstest-should-refuse"}
_COMPLIANCE, _REFUSAL = "1_full_compliance", "2_full_refusal"

_SOURCE_PROVENANCE = {"stage": "source"}


class DataDirError(ValueError):
    """The data folder is missing or incomplete; the message says what to put where."""


def _data_dir_error(problem: str) -> DataDirError:
    return DataDirError(
        f"{problem}\nPut the public data in one folder laid out as\n{DATA_LAYOUT}\n"
        f"and point crome at it with --data-dir PATH or {DATA_ENV}=PATH "
        f"(without either, crome looks for ../shared/data beside the current directory "
        f"and beside its checkout).")


def _missing_subdirs(path: Path, require: Iterable[str]) -> list[str]:
    return [name for name in require if not (path / name).is_dir()]


def resolve_data_dir(option: str | os.PathLike[str] | None = None, *,
                     require: Iterable[str] = DATA_SUBDIRS) -> Path:
    """The data folder: ``option``, else ``$CROME_DATA``, else ``../shared/data`` beside the
    current directory, else beside the repository checkout.

    A folder named explicitly (option or environment) must be right: falling back to another
    one would evaluate on data the user did not ask for. The two defaults are tried in turn.
    ``require`` names the sub-folders the caller needs, so that a folder holding only the sets
    one command reads is enough for that command.
    """
    require = tuple(require)
    explicit = [(option, "--data-dir"), (os.environ.get(DATA_ENV) or None, DATA_ENV)]
    for value, origin in explicit:
        if value is None or str(value) == "":
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise _data_dir_error(f"data folder {path} (from {origin}) does not exist.")
        missing = _missing_subdirs(path, require)
        if missing:
            raise _data_dir_error(f"data folder {path} (from {origin}) lacks "
                                  f"{', '.join(m + '/' for m in missing)}.")
        return path
    # sources.py sits at <checkout>/crome/data/, so parents[2] is the checkout.
    defaults = [Path.cwd().parent / "shared" / "data",
                Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    for path in defaults:
        if path.is_dir() and not _missing_subdirs(path, require):
            return path
    tried = ", ".join(str(p) for p in dict.fromkeys(defaults))
    raise _data_dir_error(f"no data folder given and none with "
                          f"{', '.join(r + '/' for r in require)} at the defaults ({tried}).")


def _data_file(data_dir: Path | None, *parts: str) -> Path:
    """A file of the data folder, or a :class:`DataDirError` saying which one is missing."""
    root = resolve_data_dir(data_dir, require=parts[:1])
    path = root.joinpath(*parts)
    if not path.is_file():
        raise _data_dir_error(f"{path} is missing.")
    return path


@dataclass
class SourceResult:
    """The records an adapter made, and a count of what it skipped or repaired, by reason."""

    name: str
    records: list[PairRecord] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.name}: {len(self.records)} pairs"
        if self.skipped:
            text += f", {sum(self.skipped.values())} skipped (" + ", ".join(
                f"{k}: {v}" for k, v in self.skipped.most_common()) + ")"
        if self.notes:
            text += "; notes (" + ", ".join(
                f"{k}: {v}" for k, v in self.notes.most_common()) + ")"
        return text


def _fill(result: SourceResult, rows: Iterable[dict[str, Any] | str],
          limit: int | None) -> SourceResult:
    """Validate candidate records into ``result``; a ``str`` row is a skip reason.

    Stops before reading past the ``limit``-th record, so a limited run only counts skips
    among the rows it actually looked at.
    """
    if limit is not None and limit <= 0:
        return result
    for row in rows:
        if isinstance(row, str):
            result.skipped[row] += 1
            continue
        try:
            result.records.append(validate_record(row))
        except RecordError as e:
            result.skipped[f"{e.field or 'record'}: {e.message}"] += 1
        if limit is not None and len(result.records) >= limit:
            break
    return result


def _pair(rid: str, prompt: str | list[Message], chosen: Any, rejected: Any, *, source: str,
          subset: str, **provenance: Any) -> dict[str, Any]:
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "label": "chosen", "source": source, "subset": subset,
            "provenance": {**_SOURCE_PROVENANCE, **provenance}}


# --------------------------------------------------------------------------- hh-rlhf

def _hh_rows(path: Path, subset: str, notes: Counter[str]) -> Iterator[dict[str, Any] | str]:
    # The transcript parser lives in formats.py: files in the Hub's hh-rlhf layout
    # (chosen/rejected transcripts, no prompt) are read with the same one.
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            try:
                obj = json.loads(line)
                prompt, chosen, rejected = hh_pair(obj["chosen"], obj["rejected"], notes)
            except TranscriptError as e:
                yield e.reason
                continue
            except (ValueError, KeyError, TypeError):
                yield "unparseable transcript"
                continue
            yield _pair(f"hh-rlhf/{subset}/{index:06d}", prompt, chosen, rejected,
                        source="hh-rlhf", subset=subset)


def load_hh_rlhf(subset: str, data_dir: Path | None = None,
                 limit: int | None = None) -> SourceResult:
    """Anthropic hh-rlhf test pairs as chat records; ids carry the 0-based line index."""
    if subset not in HH_SUBSETS:
        raise ValueError(f"unknown hh-rlhf subset {subset!r}; known: {', '.join(HH_SUBSETS)}")
    path = _data_file(data_dir, "hh-rlhf", subset, "test.jsonl.gz")
    result = SourceResult(name=f"hh-rlhf/{subset}")
    return _fill(result, _hh_rows(path, subset, result.notes), limit)


# --------------------------------------------------------------------------- LLMBar

def _llmbar_rows(path: Path, stem: str) -> Iterator[dict[str, Any] | str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for index, obj in enumerate(data):
        label = obj.get("label") if isinstance(obj, dict) else None
        if isinstance(label, bool) or label not in (1, 2):
            yield "label is not 1 or 2"
            continue
        better, worse = ("output_1", "output_2") if label == 1 else ("output_2", "output_1")
        yield _pair(f"llmbar/{stem}/{index:06d}", obj.get("input"), obj.get(better),
                    obj.get(worse), source="llmbar", subset=LLMBAR_FILES[stem])


def load_llmbar(files: list[str] | None = None, data_dir: Path | None = None,
                limit: int | None = None) -> SourceResult:
    """LLMBar pairs (all 8 files, or the named file stems); ``label`` names the better output."""
    stems = [f.removesuffix(".json") for f in files] if files else list(LLMBAR_FILES)
    unknown = [s for s in stems if s not in LLMBAR_FILES]
    if unknown:
        raise ValueError(f"unknown LLMBar file(s) {', '.join(unknown)}; "
                         f"known: {', '.join(LLMBAR_FILES)}")
    paths = [_data_file(data_dir, "llmbar", f"{s}.json") for s in stems]
    name = "+".join(f"llmbar/{s}" for s in stems) if files else "llmbar"
    rows = itertools.chain.from_iterable(_llmbar_rows(p, s) for p, s in zip(paths, stems))
    return _fill(SourceResult(name=name), rows, limit)


# --------------------------------------------------------------------------- XSTest

def _xstest_rows(root: Path, notes: Counter[str]) -> Iterator[dict[str, Any] | str]:
    with open(root / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        prompts = list(csv.DictReader(fh))
    # Completion ids are "v2-<prompt id>"; per prompt id, (model, row) in file-name order.
    completions: dict[str, list[tuple[str, dict[str, str]]]] = {}
    known = {p["id"] for p in prompts}
    for path in sorted(root.glob("xstest_v2_completions_*.csv")):
        model = path.stem.removeprefix("xstest_v2_completions_")
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                pid = row["id"].removeprefix("v2-")
                if pid not in known:
                    notes["completion with an unknown prompt id ignored"] += 1
                    continue
                completions.setdefault(pid, []).append((model, row))
    if not completions:
        raise _data_dir_error(f"{root} holds no xstest_v2_completions_*.csv files.")
    for p in prompts:
        subset = XSTEST_SUBSETS.get(p["label"])
        if subset is None:
            yield "prompt label is not safe or unsafe"
            continue
        want = (_COMPLIANCE, _REFUSAL) if p["label"] == "safe" else (_REFUSAL, _COMPLIANCE)
        found = [next(((m, r) for m, r in completions.get(p["id"], [])
                       if r["final_label"] == kind), None) for kind in want]
        if None in found:
            missing = " and ".join(k for k, f in zip(want, found) if f is None)
            yield f"{p['label']} prompt without a {missing} completion"
            continue
        (c_model, c_row), (r_model, r_row) = found  # type: ignore[misc]
        if c_row["prompt"] != r_row["prompt"]:
            yield "completions answer different prompt texts"
            continue
        # The completions answer the text in their own files; where xstest_prompts.csv says
        # otherwise (prompt 195), that text is what the answers were written for.
        if c_row["prompt"].strip() != p["prompt"].strip():
            notes["prompt text differs from xstest_prompts.csv (completions' text used)"] += 1
        yield _pair(f"xstest/{p['id']}", c_row["prompt"].strip(),
                    c_row["completion"].strip(), r_row["completion"].strip(),
                    source="xstest", subset=subset,
                    chosen_model=c_model, rejected_model=r_model)


def load_xstest(data_dir: Path | None = None, limit: int | None = None) -> SourceResult:
    """One pair per XSTest prompt: for a safe prompt the full compliance is chosen over the
    full refusal, for an unsafe prompt the reverse; each side is the first completion of its
    kind in file-name order of the model files."""
    root = _data_file(data_dir, "xstest", "xstest_prompts.csv").parent
    result = SourceResult(name="xstest")
    return _fill(result, _xstest_rows(root, result.notes), limit)


# --------------------------------------------------------------------------- GSM8K

@dataclass
class GSM8KItem:
    """A GSM8K question with its gold number and, for the test split, real model solutions."""

    id: str
    question: str
    answer: str
    gold: str
    solutions: list[tuple[str, str, bool]] = field(default_factory=list)


class GSM8KItems(list[GSM8KItem]):
    """A list of items that also counts what could not be used, as :class:`SourceResult` does."""

    def __init__(self, items: Iterable[GSM8KItem] = (), name: str = "gsm8k") -> None:
        super().__init__(items)
        self.name = name
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# Markers of a final answer, most explicit first. "A: <n>" ends each solution in GSM8K's
# example_model_solutions.jsonl; with it the checker agrees with all 5,276 is_correct labels.
_FINAL_MARKERS = (
    re.compile(r"####[ \t]*(.*)"),
    re.compile(r"^A:[ \t]*(.*)", re.MULTILINE),
    re.compile(r"[Tt]he (?:final )?answer is\s*:?\s*(.*)"),
    re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"),
)


def _canonical_number(text: str) -> str:
    """``1,234.50`` -> ``1234.5``, so that numbers written differently compare equal."""
    number = text.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("", "-0") else number


def final_number(text: str) -> str | None:
    """The final numeric answer of a solution, canonical (no commas, no trailing zeros).

    Takes the first number after the last ``####``, else after the last ``A:`` line, else
    after the last "The answer is", else inside the last ``\\boxed{}``, else the last number
    of the text; ``None`` when there is no number at all.
    """
    for marker in _FINAL_MARKERS:
        matches = list(marker.finditer(text))
        if matches:
            number = _NUMBER.search(matches[-1].group(1).replace("$", ""))
            if number:
                return _canonical_number(number.group())
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


def _read_jsonl(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_gsm8k(split: str = "test", data_dir: Path | None = None,
               limit: int | None = None) -> GSM8KItems:
    """GSM8K questions of ``split`` (``train``, ``test``, ``test_socratic``); test items carry
    the 4 model solutions of ``example_model_solutions.jsonl``, matched by question text."""
    path = _data_file(data_dir, "gsm8k", f"{split}.jsonl")
    items = GSM8KItems(name=f"gsm8k/{split}")
    for index, obj in enumerate(_read_jsonl(path)):
        if "####" not in obj["answer"]:
            items.skipped["answer without a #### final number"] += 1
            continue
        items.append(GSM8KItem(id=f"gsm8k/{split}/{index:06d}", question=obj["question"],
                               answer=obj["answer"], gold=final_number(obj["answer"]) or ""))
    if split == "test":
        by_question = {item.question: item for item in items}
        for obj in _read_jsonl(path.with_name("example_model_solutions.jsonl")):
            item = by_question.get(obj["question"])
            if item is None:
                items.skipped["solutions whose question is not in the split"] += 1
                continue
            if item.solutions:
                items.skipped["second set of solutions for a question"] += 1
                continue
            for model, sol in obj.items():
                if isinstance(sol, dict) and "solution" in sol:
                    item.solutions.append((model, sol["solution"], bool(sol["is_correct"])))
        unmatched = sum(not item.solutions for item in items)
        if unmatched:
            items.notes["question without model solutions"] = unmatched
    if limit is not None:
        del items[max(limit, 0):]
    return items


def gsm8k_pairs(items: Iterable[GSM8KItem], limit: int | None = None) -> SourceResult:
    """Every correct x incorrect combination of each question's model solutions."""
    def rows() -> Iterator[dict[str, Any] | str]:
        for item in items:
            good = [(m, s) for m, s, ok in item.solutions if ok]
            bad = [(m, s) for m, s, ok in item.solutions if not ok]
            if not item.solutions:
                yield "question without model solutions"
            elif not good:
                yield "question without a correct solution"
            elif not bad:
                yield "question without an incorrect solution"
            for (cm, cs), (rm, rs) in itertools.product(good, bad):
                yield _pair(f"{item.id}/{cm}-over-{rm}", item.question, cs, rs,
                            source="gsm8k", subset="gsm8k",
                            chosen_model=cm, rejected_model=rm)

    return _fill(SourceResult(name="gsm8k"), rows(), limit)


def _load_gsm8k_test_pairs(data_dir: Path | None = None,
                           limit: int | None = None) -> SourceResult:
    items = load_gsm8k("test", data_dir)
    result = gsm8k_pairs(items, limit)
    result.skipped.update(items.skipped)
    result.notes.update(items.notes)
    return result


# --------------------------------------------------------------------------- RewardBench

def _rewardbench_row(number: int, obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj  # validate_record names the problem
    rid = obj.get("id")
    if rid is None:
        rid = number
    elif isinstance(rid, bool) or not isinstance(rid, int | str) or rid == "":
        raise RecordError("expected an integer or a non-empty string", field="id")
    return {**obj, "id": f"rewardbench/{rid}", "source": "rewardbench",
            "provenance": dict(_SOURCE_PROVENANCE)}


def load_rewardbench(path: str | os.PathLike[str], limit: int | None = None, *,
                     name: str | None = None) -> SourceResult:
    """A RewardBench-format file (``prompt, chosen, rejected, subset`` and maybe ``id``,
    ``chosen_model``, ``rejected_model``, which go into provenance); ids are
    ``rewardbench/<id>``, and rows without an id are numbered by their line or record number.

    An id repeated in another subset is made unique as ``rewardbench/<id>@<subset>`` and
    noted (the official set has id 3692 in ``donotanswer`` and ``hep-python``). An invalid
    row, or an id repeated within a subset, raises :class:`RecordError` naming file, row and
    field: a benchmark with holes is no benchmark. So does a file without records.
    """
    report = ReadReport()
    result = SourceResult(name=name or f"rewardbench:{Path(path).name}")
    result.records = list(itertools.islice(
        iter_pairs(path, prepare=_rewardbench_row, report=report), limit))
    if not result.records and (limit is None or limit > 0):
        raise RecordError("no records", path=str(path))
    _note_report(result, report)
    return result


def _load_rewardbench_source(data_dir: Path | None = None,
                             limit: int | None = None) -> SourceResult:
    path = _data_file(data_dir, "rewardbench", "filtered.jsonl.gz")
    return load_rewardbench(path, limit, name="rewardbench")


# --------------------------------------------------------------------------- UltraFeedback

ULTRAFEEDBACK_EQUAL = "equal GPT-4 scores kept as a preference (as TRL's binarized set)"


def _score(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(0-based line index, object)`` per non-blank line of a gzipped JSONL file; a line
    that is not a JSON object gives its skip reason (a ``str``) instead."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield index, "unparseable JSON line"
                continue
            yield index, obj if isinstance(obj, dict) else "line is not a JSON object"


def _ultrafeedback_rows(path: Path, split: str) -> Iterator[dict[str, Any] | str]:
    for index, obj in _json_lines(path):
        if isinstance(obj, str):  # the line's skip reason
            yield obj
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(obj.get(k), str)]
        if missing:
            yield f"{missing[0]} missing or not text"
            continue
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            yield "metadata missing or not an object"
            continue
        chosen_score, rejected_score = _score(meta.get("score_chosen")), _score(
            meta.get("score_rejected"))
        if chosen_score is None or rejected_score is None:
            yield "metadata without numeric score_chosen and score_rejected"
            continue
        if chosen_score < rejected_score:
            yield "chosen scored below rejected"
            continue
        yield _pair(f"ultrafeedback/{split}/{index:06d}", obj["prompt"], obj["chosen"],
                    obj["rejected"], source="ultrafeedback", subset=f"ultrafeedback-{split}",
                    source_index=obj.get("source_index"), score_chosen=chosen_score,
                    score_rejected=rejected_score)


def load_ultrafeedback(split: str, data_dir: Path | None = None,
                       limit: int | None = None) -> SourceResult:
    """UltraFeedback pairs binarized as in TRL (``prompt``, ``chosen``, ``rejected`` texts,
    ``source_index``, ``metadata.score_chosen`` / ``score_rejected``); ids carry the 0-based
    line index, provenance the source index and both GPT-4 scores.

    A pair whose two scores are equal is kept as a preference, as TRL's binarized set keeps
    it, and counted in ``notes``; a pair whose chosen side scored lower is skipped.
    """
    if split not in ULTRAFEEDBACK_SPLITS:
        raise ValueError(f"unknown UltraFeedback split {split!r}; "
                         f"known: {', '.join(ULTRAFEEDBACK_SPLITS)}")
    path = _data_file(data_dir, "ultrafeedback", f"{split}.jsonl.gz")
    result = _fill(SourceResult(name=f"ultrafeedback/{split}"),
                   _ultrafeedback_rows(path, split), limit)
    # counted on the records kept, so a tie that failed validation is not noted as kept
    equal = sum(r.provenance["score_chosen"] == r.provenance["score_rejected"]
                for r in result.records)
    if equal:
        result.notes[ULTRAFEEDBACK_EQUAL] = equal
    return result


# --------------------------------------------------------------------------- oasst1

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_rank(value: Any) -> int | None:
    """A sibling rank as an int (``1.0`` from a float column counts), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _oasst_prompt(parent_id: str,
                  messages: dict[str, dict[str, Any]]) -> list[Message] | str:
    """The conversation from the root down to ``parent_id``, or why there is none."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: Any = parent_id
    while current is not None:
        if current in seen:
            return "prompt chain loops"
        seen.add(current)
        message = messages.get(current)
        if message is None:
            return "prompt chain has a missing message"
        chain.append(message)
        current = message.get("parent_id")
    chain.reverse()
    if any(m.get("deleted") is True or m.get("review_result") is False for m in chain):
        return "prompt holds a deleted or review-failed message"
    roles = [_OASST_ROLES.get(m.get("role")) for m in chain]  # type: ignore[arg-type]
    if roles[0] != "user":
        return "conversation does not start with a user turn"
    if roles[-1] != "user":
        return "last prompt turn is not the user's"
    if None in roles or any(a == b for a, b in itertools.pairwise(roles)):
        return "conversation turns do not alternate user/assistant"
    return [{"role": role, "content": m.get("text")} for role, m in zip(roles, chain)]


def _oasst1_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    messages: dict[str, dict[str, Any]] = {}
    ranked: dict[str, list[dict[str, Any]]] = {}  # parent id -> ranked assistant replies
    for _, obj in _json_lines(path):
        if isinstance(obj, str):  # the line's skip reason
            yield obj
            continue
        mid = obj.get("message_id")
        if not isinstance(mid, str) or not mid:
            yield "message without a message_id"
            continue
        if mid in messages:
            yield "message_id repeated (first kept)"
            continue
        messages[mid] = obj
        parent = obj.get("parent_id")
        if (obj.get("role") == "assistant" and isinstance(parent, str)
                and _oasst_rank(obj.get("rank")) is not None):
            ranked.setdefault(parent, []).append(obj)
    for parent, replies in ranked.items():
        usable = []
        for reply in replies:
            if reply.get("deleted") is True:
                yield "ranked reply deleted"
            elif reply.get("review_result") is False:
                yield "ranked reply failed review"
            else:
                usable.append(reply)
        if len(usable) < 2:
            continue
        prompt = _oasst_prompt(parent, messages)
        if isinstance(prompt, str):
            yield prompt
            continue
        usable.sort(key=lambda m: _oasst_rank(m["rank"]))  # stable: file order within a rank
        for better, worse in itertools.combinations(usable, 2):
            b_rank, w_rank = _oasst_rank(better["rank"]), _oasst_rank(worse["rank"])
            if b_rank == w_rank:
                yield "sibling replies with equal ranks"
                continue
            yield _pair(f"oasst1/{parent}/{better['message_id']}-over-{worse['message_id']}",
                        prompt, better.get("text"), worse.get("text"),
                        source="oasst1", subset="oasst1", chosen_rank=b_rank,
                        rejected_rank=w_rank, message_tree_id=better.get("message_tree_id"))


def load_oasst1(data_dir: Path | None = None, limit: int | None = None) -> SourceResult:
    """Human preference pairs from oasst1's ranked sibling replies (``oasst1/en-validation``).

    For each parent message, its assistant replies with an integer ``rank`` (0 = best) give
    every combination of two siblings with different ranks, the lower rank chosen. The
    prompt is the conversation from the tree's root down to the parent, ``prompter`` turns
    as ``user``; ids are ``oasst1/<parent>/<chosen>-over-<rejected>`` (message ids).

    Left out, and counted: a ranked reply that is deleted, or whose ``review_result`` is
    ``False`` (dropped although oasst1 ranked it: a reply that failed human review is no
    reliable "better" or "worse" answer; ``None``, not yet reviewed, is kept), once per
    reply; a prompt whose chain misses a message, holds a deleted or review-failed message,
    does not start or end with a user turn or does not alternate, once per parent that had
    two usable replies; two siblings of equal rank, once per such pair. Text is verbatim.
    """
    path = _data_file(data_dir, "oasst1", OASST1_FILE)
    return _fill(SourceResult(name="oasst1"), _oasst1_rows(path), limit)


# --------------------------------------------------------------------------- registry

SOURCES: dict[str, Callable[..., SourceResult]] = {
    **{f"hh-rlhf/{s}": partial(load_hh_rlhf, s) for s in HH_SUBSETS},
    "llmbar": load_llmbar,
    **{f"llmbar/{stem}": partial(load_llmbar, [stem]) for stem in LLMBAR_FILES},
    "xstest": load_xstest,
    "gsm8k": _load_gsm8k_test_pairs,
    "rewardbench": _load_rewardbench_source,
    **{f"ultrafeedback/{s}": partial(load_ultrafeedback, s) for s in ULTRAFEEDBACK_SPLITS},
    "oasst1": load_oasst1,
}


def load_source(name: str, data_dir: Path | None = None,
                limit: int | None = None) -> SourceResult:
    """Pairs of a public source by its registry name (see :data:`SOURCES`)."""
    loader = SOURCES.get(name)
    if loader is None:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return loader(data_dir=data_dir, limit=limit)


def _note_report(result: SourceResult, report: ReadReport) -> None:
    """Carry a read's skips (by field), id renames and notes into ``result``."""
    result.skipped.update(report.reasons)
    for reason, n in report.rename_reasons.items():
        result.notes[f"duplicate id made unique ({reason})"] += n
    result.notes.update(report.notes)


def load_named(name: str, data_dir: Path | None = None, limit: int | None = None,
               skip_invalid: bool = False) -> SourceResult:
    """A registry source (``hh-rlhf/helpful-base``), a pair file (``my.jsonl``, any layout
    :mod:`crome.data.formats` knows) or a ``datasets`` set (``hf:ORG/NAME[:SPLIT]``,
    ``hf:/path/to/saved[:SPLIT]``, see :mod:`crome.data.hub`): one way in for every command
    that takes ``--data``.

    User input without a single record is an error naming it: evaluating or training on
    nothing would still write results, and an empty table looks like a finished run.
    """
    if name in SOURCES:
        return load_source(name, data_dir=data_dir, limit=limit)
    report = ReadReport()
    if name.startswith("hf:"):
        from crome.data.hub import hub_label, iter_hub_pairs

        records = iter_hub_pairs(name, skip_invalid=skip_invalid, report=report)
        result = SourceResult(name=hub_label(name))
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(f"{name!r} is neither a known source ({', '.join(SOURCES)}), "
                             f"nor an existing file, nor hf:ORG/NAME")
        records = iter_pairs(path, skip_invalid=skip_invalid, report=report)
        result = SourceResult(name=path.stem)
    for rec in records:
        if limit is not None and len(result.records) >= limit:
            break
        result.records.append(rec)
    if not result.records and (limit is None or limit > 0):
        what = (f"no valid records ({report.skipped} invalid skipped)" if report.skipped
                else "no records")
        raise RecordError(what, path=report.path or name)
    _note_report(result, report)
    return result
