"""Append-only JSONL outputs that a re-run continues (the oracle stages' outputs).

Rows are written one line at a time and flushed, so a process killed with ``kill -9`` leaves
every finished row on disk and at most one partial last line. Reopening the file drops that
partial line (counted in ``repaired_bytes``), reads the keys already written, and appends
after them: a re-run neither loses nor duplicates a row. A key is written once per run; a key
that a run chose to redo (``forget``) gets a new row, and the last row of a key is the one
that counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from crome.data.schema import RecordError


class ResumableJsonl:
    def __init__(self, path: str | os.PathLike[str], key: str = "id",
                 writable: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.writable = writable
        self.done: set[str] = set()
        self.repaired_bytes = 0
        self.written = 0
        self._rows: dict[str, dict[str, Any]] = {}
        self._fh: IO[str] | None = None

    def __enter__(self) -> ResumableJsonl:
        if self.path.exists():
            self._load()
        elif not self.writable:
            raise FileNotFoundError(f"{self.path}: no such file")
        if self.writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
        lines = data[:good].decode("utf-8").split("\n")[:-1]
        tail = data[good:]
        if tail.strip():
            try:  # a complete last row without its newline is still a row
                json.loads(tail)
                lines.append(tail.decode("utf-8"))
                good = len(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) and good == len(data) and self.writable:
                    good -= len(line.encode()) + 1
                    break  # a torn last row followed by a newline: drop it as well
                raise RecordError(f"invalid JSON: {e.msg}", path=str(self.path),
                                  line=n) from e
            if not isinstance(row, dict) or not isinstance(row.get(self.key), str):
                raise RecordError(f"row without a string '{self.key}'", path=str(self.path),
                                  line=n, field=self.key)
            # A later row for the same key supersedes an earlier one (see ``forget``).
            self.done.add(row[self.key])
            self._rows[row[self.key]] = row
        if not self.writable:
            return
        if good < len(data):
            self.repaired_bytes = len(data) - good
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        if good and not data[:good].endswith(b"\n"):
            with self.path.open("ab") as fh:
                fh.write(b"\n")

    def rows(self) -> list[dict[str, Any]]:
        """Rows present when the file was opened (the last one of each key)."""
        return list(self._rows.values())

    def forget(self, key: str) -> None:
        """Let ``key`` be written again: its new row will supersede the old one on the next
        read (used to retry a task that failed for a transient reason)."""
        self.done.discard(key)

    def write(self, row: dict[str, Any]) -> bool:
        """Append a row unless its key is already there; ``False`` when it was."""
        key = row[self.key]
        if key in self.done:
            return False
        assert self._fh is not None, "opened read-only"
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.done.add(key)
        self.written += 1
        return True
