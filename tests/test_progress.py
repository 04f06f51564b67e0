"""Progress for people: a live display on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import json

from conftest import make_settings
from rich.console import Console

from sync.engine import SyncEngine
from sync.log import configure_logging
from sync.progress import LoggedProgress, TerminalProgress, progress_for
from sync.sandbox import SandboxServer
from sync.store import MirrorStore


def _backfill(sandbox: SandboxServer, db_url: str, observer: object) -> None:
    settings = make_settings(sandbox, db_url)
    store = MirrorStore.open(db_url)
    engine = SyncEngine.from_settings(settings, store, observer=observer)  # type: ignore[arg-type]
    try:
        engine.sync_company("1", backfill=True)
    finally:
        engine.close()
        store.close()


class TestProgress:
    def test_terminal_shows_pages_rows_rate_and_time(
        self, sandbox: SandboxServer, sqlite_url: str
    ) -> None:
        """On a terminal the display shows the company, pages, rows, rows/s and elapsed time."""
        screen = io.StringIO()
        console = Console(file=screen, force_terminal=True, width=120)
        with progress_for(console) as progress:
            assert isinstance(progress, TerminalProgress)
            _backfill(sandbox, sqlite_url, progress)
        shown = screen.getvalue()
        assert "company 1 (backfill)" in shown
        assert "14 pages" in shown  # 1,200 rows: 13 pages and the one that proves the end
        assert "rows/s" in shown
        assert "0:00:0" in shown

    def test_off_a_terminal_progress_is_logged(
        self, sandbox: SandboxServer, sqlite_url: str
    ) -> None:
        """Without a terminal, progress arrives as pass.progress log events."""
        logs = io.StringIO()
        configure_logging("info", "json", stream=logs)
        progress = progress_for(Console(file=io.StringIO()))
        assert isinstance(progress, LoggedProgress)
        with progress:
            _backfill(sandbox, sqlite_url, progress)
        events = [json.loads(line) for line in logs.getvalue().splitlines()]
        reported = [e for e in events if e["event"] == "pass.progress"]
        assert reported
        assert reported[0]["pages"] == 1
        assert reported[0]["company_id"] == "1"
