"""Pass progress for people: a rich display on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sync.engine import PassReport
from sync.log import get_logger

__all__ = ["LoggedProgress", "TerminalProgress", "progress_for"]

log = get_logger("sync.progress")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} rows/s", style="cyan")


class TerminalProgress:
    """One live line per company: pages, rows, rows/s and elapsed time."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("company {task.fields[company]} ({task.fields[mode]})"),
            TextColumn("{task.fields[pages]:,} pages"),
            TextColumn("{task.completed:,.0f} rows"),
            _RateColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
        label = f"{mode}, resumed" if resumed else mode
        self._tasks[company_id] = self._progress.add_task(
            "", total=None, company=company_id, mode=label, pages=0
        )

    def page_stored(self, company_id: str, pages: int, rows: int) -> None:
        self._progress.update(self._tasks[company_id], completed=rows, pages=pages)

    def pass_finished(self, report: PassReport) -> None:
        task = self._tasks.get(report.company_id)
        if task is not None:
            self._progress.update(task, total=self._progress.tasks[task].completed)


class LoggedProgress:
    """Off a terminal: a progress event at most every `every_s` seconds per company."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._began: dict[str, float] = {}

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
        now = time.monotonic()
        self._began[company_id] = now
        self._last[company_id] = now - self._every_s  # the first page is reported at once

    def page_stored(self, company_id: str, pages: int, rows: int) -> None:
        now = time.monotonic()
        if now - self._last.get(company_id, 0.0) < self._every_s:
            return
        self._last[company_id] = now
        elapsed = now - self._began.get(company_id, now)
        log.info(
            "pass.progress",
            company_id=company_id,
            pages=pages,
            rows=rows,
            rows_per_s=round(rows / elapsed) if elapsed > 0 else None,
            elapsed_s=round(elapsed, 1),
        )

    def pass_finished(self, report: PassReport) -> None:
        return None


def progress_for(console: Console) -> TerminalProgress | LoggedProgress:
    return TerminalProgress(console) if console.is_terminal else LoggedProgress()
