"""One rich progress bar (count, elapsed, ETA, a free text field) for every long stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StageProgress:
    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True) -> None:
        self.bar: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"))
        self.task = self.bar.add_task(label, total=total, completed=done, info="")
        self.bar.start()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self.bar is not None:
            fields = {"info": info} if info is not None else {}
            self.bar.update(self.task, advance=n, **fields)

    def update(self, done: int, total: int | None = None, info: str | None = None) -> None:
        if self.bar is not None:
            fields: dict[str, Any] = {"info": info} if info is not None else {}
            if total is not None:
                fields["total"] = total
            self.bar.update(self.task, completed=done, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_callback(label: str, enabled: bool
                      ) -> tuple[StageProgress, Callable[[int, int], None]]:
    """A bar and the ``(done, total)`` callback that the stages accept."""
    bar = StageProgress(label, 0, enabled=enabled)
    return bar, lambda done, total: bar.update(done, total)
