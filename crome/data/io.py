"""Reading and writing pair records: JSONL (default), JSON, CSV, Parquet, and ``datasets``.

Every reader validates each record and either stops at the first bad one with an error that
names the file, line (or record number) and field, or, with ``skip_invalid``, skips it and
counts it in a :class:`ReadReport`. Rows may come in TRL's layouts and without ids
(:mod:`crome.data.formats` adapts them); the ids of what a read returns are unique, because
later stages key caches, scores and provenance on them. An id that repeats in another subset,
or a pair without id that repeats, is made unique and counted in the report; an id given twice
in the same (source, subset) is an error.

Columnar formats (CSV, Parquet, ``datasets``) cannot hold "a string or a list of messages" in
one column, so chat prompts are stored there as JSON text with ``prompt_is_chat = true`` and
the provenance as JSON text.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crome.data.formats import RowIds, adapt_row
from crome.data.schema import MAX_ANSWER_CHARS, PairRecord, RecordError, validate_record

FORMATS = ("jsonl", "json", "csv", "parquet")
log = logging.getLogger(__name__)


@dataclass
class ReadReport:
    """What a read kept, what it skipped (by field), which ids it made unique (by reason,
    ``renamed`` in all) and what it noticed on the way (``notes``, e.g. ignored columns)."""

    path: str = ""
    read: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    renamed: int = 0
    rename_reasons: Counter[str] = field(default_factory=Counter)
    rename_examples: list[str] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)

    def skip(self, err: RecordError) -> None:
        self.skipped += 1
        self.reasons[err.field or "record"] += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    def renames(self) -> str:
        """One line on the ids made unique, or "" when none were."""
        if not self.renamed:
            return ""
        why = ", ".join(f"{k}: {v}" for k, v in self.rename_reasons.most_common())
        return (f"{self.renamed} duplicate id{'s' if self.renamed != 1 else ''} made unique "
                f"({why}; e.g. {', '.join(self.rename_examples[:3])})")

    def summary(self) -> str:
        text = f"{self.path}: {self.read} records read"
        if self.skipped:
            why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
            text += f", {self.skipped} invalid skipped ({why})"
        if self.renamed:
            text += ", " + self.renames()
        if self.notes:
            text += "; notes (" + ", ".join(
                f"{k}: {v}" for k, v in self.notes.most_common()) + ")"
        return text


def detect_format(path: str | os.PathLike[str]) -> str:
    name = str(path).lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".ndjson", "jsonl"),
                        (".json", "json"), (".csv", "csv"), (".parquet", "parquet"),
                        (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise RecordError("cannot tell the format from the file name; use one of "
                      ".jsonl, .json, .csv, .parquet", path=str(path))


def _raw_rows(path: Path, fmt: str) -> Iterator[tuple[int, Any, RecordError | None]]:
    """Yield (line or record number, decoded object, decoding error).

    Rows of columnar formats come still in the columnar encoding: :func:`_validated` decodes
    them, so that a bad ``prompt_is_chat`` row is located and skippable like any other.
    """
    if fmt == "jsonl":
        opener = open_maybe_gz(path)
        with opener as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    yield lineno, None, RecordError(f"invalid UTF-8 at byte {e.start}")
                    continue
                try:
                    yield lineno, json.loads(text), None
                except json.JSONDecodeError as e:
                    yield lineno, None, RecordError(f"invalid JSON ({e.msg}, column {e.colno})")
    elif fmt == "json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise RecordError(f"invalid UTF-8 at byte {e.start}", path=str(path)) from None
        except json.JSONDecodeError as e:
            raise RecordError(f"invalid JSON ({e.msg})", path=str(path), line=e.lineno) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise RecordError("expected a JSON list of records", path=str(path))
        for i, obj in enumerate(data, start=1):
            yield i, obj, None
    elif fmt == "csv":
        csv.field_size_limit(sys.maxsize)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None:  # empty file; reading the header sets line_num
                    return
                start = reader.line_num + 1
                for obj in reader:
                    # A quoted field may span lines; name the line where the record starts.
                    yield start, obj, None
                    start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise RecordError(f"invalid UTF-8 at byte {e.start}", path=str(path)) from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, obj in enumerate(table.to_pylist(), start=1):
            yield i, obj, None
    else:  # pragma: no cover - detect_format guards this
        raise RecordError(f"unknown format {fmt!r}", path=str(path))


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def open_maybe_gz(path: Path):  # type: ignore[no-untyped-def]
    """The file's bytes, gunzipped when its name ends in ``.gz``."""
    if _is_gz(path):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _from_columns(obj: dict[str, Any]) -> dict[str, Any]:
    """Undo the columnar encoding of chat prompts and provenance."""
    obj = dict(obj)
    is_chat = obj.pop("prompt_is_chat", False)
    if isinstance(is_chat, str):
        is_chat = is_chat.strip().lower() in ("1", "true", "yes")
    if is_chat and isinstance(obj.get("prompt"), str):
        try:
            obj["prompt"] = json.loads(obj["prompt"])
        except json.JSONDecodeError:
            raise RecordError("prompt_is_chat is set but the prompt is not a JSON list",
                              field="prompt") from None
    prov = obj.get("provenance")
    if isinstance(prov, str):
        try:
            obj["provenance"] = json.loads(prov) if prov.strip() else {}
        except json.JSONDecodeError:
            raise RecordError("not valid JSON", field="provenance") from None
    return obj


def _to_columns(rec: PairRecord) -> dict[str, Any]:
    row = rec.to_dict()
    row["prompt_is_chat"] = rec.is_chat
    if rec.is_chat:
        row["prompt"] = json.dumps(rec.prompt, ensure_ascii=False)
    row["provenance"] = json.dumps(rec.provenance, ensure_ascii=False, sort_keys=True)
    return row


Prepare = Callable[[int, Any], Any]


def _validated(rows: Iterable[tuple[int, Any, RecordError | None]], where: str, unit: str, *,
               columnar: bool, prepare: Prepare | None, skip_invalid: bool,
               report: ReadReport, max_answer_chars: int) -> Iterator[PairRecord]:
    """The one validation loop of every reader: decode, adapt the layout, validate, and give
    each record a unique id (see :mod:`crome.data.formats`)."""
    ids = RowIds(renamed=report.rename_reasons, examples=report.rename_examples)
    for number, obj, err in rows:
        try:
            if err is not None:
                raise err
            if columnar:
                obj = _from_columns(obj)
            if prepare is not None:
                obj = prepare(number, obj)
            kind, base = ids.base(obj)
            obj = adapt_row(obj, report.notes)
            if isinstance(obj, dict):
                obj["id"] = base or "?"  # a hash id is made from the validated content
            rec = validate_record(obj, max_answer_chars=max_answer_chars)
            rec.id = ids.assign(rec, kind, base)
        except RecordError as e:
            located = e.located(where, number, unit)
            if not skip_invalid:
                raise located from None
            report.skip(located)
            continue
        report.renamed = sum(report.rename_reasons.values())
        report.read += 1
        yield rec
    if ids.renamed:
        log.warning("%s: %s", where, report.renames())


def iter_pairs(path: str | os.PathLike[str], *, skip_invalid: bool = False,
               report: ReadReport | None = None,
               max_answer_chars: int = MAX_ANSWER_CHARS,
               prepare: Prepare | None = None) -> Iterator[PairRecord]:
    """Stream validated records from ``path``; see the module docstring for errors.

    ``prepare(number, row)`` maps each decoded row before validation; adapters of foreign
    formats (RewardBench) use it to fill in ids and sources, and a :class:`RecordError` it
    raises is located and counted like any other.
    """
    p = Path(path)
    if not p.exists():
        raise RecordError("no such file", path=str(p))
    fmt = detect_format(p)
    report = report if report is not None else ReadReport()
    report.path = str(p)
    unit = "line" if fmt in ("jsonl", "csv") else "record"
    yield from _validated(_raw_rows(p, fmt), str(p), unit,
                          columnar=fmt in ("csv", "parquet"), prepare=prepare,
                          skip_invalid=skip_invalid, report=report,
                          max_answer_chars=max_answer_chars)


def read_pairs(path: str | os.PathLike[str], *, skip_invalid: bool = False,
               report: ReadReport | None = None,
               max_answer_chars: int = MAX_ANSWER_CHARS) -> list[PairRecord]:
    return list(iter_pairs(path, skip_invalid=skip_invalid, report=report,
                           max_answer_chars=max_answer_chars))


def write_pairs(records: Iterable[PairRecord], path: str | os.PathLike[str]) -> int:
    """Write records in the format named by the suffix; returns how many were written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = detect_format(p)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    if fmt == "jsonl":
        # A .jsonl.gz name must get gzip bytes, or the reader cannot open what was written.
        opener = gzip.open if _is_gz(p) else open
        with opener(tmp, "wt", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
                n += 1
    elif fmt == "json":
        rows = [rec.to_dict() for rec in records]
        n = len(rows)
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "csv":
        rows = [_to_columns(rec) for rec in records]
        n = len(rows)
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [_to_columns(rec) for rec in records]
        n = len(rows)
        pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema()), tmp)
    os.replace(tmp, p)
    return n


_COLUMNS = ("id", "prompt", "prompt_is_chat", "chosen", "rejected", "label", "source",
            "subset", "provenance")


def _arrow_schema():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.schema([(c, pa.bool_() if c == "prompt_is_chat" else pa.string())
                      for c in _COLUMNS])


def to_dataset(records: Iterable[PairRecord]):  # type: ignore[no-untyped-def]
    """Records as a Hugging Face ``datasets.Dataset`` (columnar encoding, see module doc)."""
    import datasets

    rows = [_to_columns(r) for r in records]
    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {c: [] for c in _COLUMNS})


def iter_dataset(ds: Any, *, skip_invalid: bool = False, report: ReadReport | None = None,
                 max_answer_chars: int = MAX_ANSWER_CHARS) -> Iterator[PairRecord]:
    """Stream validated records from a ``datasets.Dataset`` (or any iterable of row dicts),
    numbered from 1 and named ``report.path`` (default ``<dataset>``) in errors."""
    report = report if report is not None else ReadReport()
    report.path = report.path or "<dataset>"
    rows = ((i, row, None) for i, row in enumerate(ds, start=1))
    yield from _validated(rows, report.path, "record", columnar=True, prepare=None,
                          skip_invalid=skip_invalid, report=report,
                          max_answer_chars=max_answer_chars)


def from_dataset(ds: Any, *, skip_invalid: bool = False,
                 report: ReadReport | None = None) -> list[PairRecord]:
    """Validated records from a ``datasets.Dataset`` (either encoding of chat prompts, or
    any layout :mod:`crome.data.formats` knows)."""
    return list(iter_dataset(ds, skip_invalid=skip_invalid, report=report))
