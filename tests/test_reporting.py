"""The README's reporting queries run unchanged on both mirrors and give the same answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from sqlalchemy import create_engine, text

from sync.engine import SyncEngine
from sync.sandbox import SandboxData, SandboxServer
from sync.store import MirrorStore

pytestmark = pytest.mark.usefixtures("walk_concurrency")

README = Path(__file__).resolve().parent.parent / "README.md"


def reporting_queries() -> list[str]:
    """Every statement of the SQL blocks under the README's Reporting heading, before its
    subsections (History has its own test, `test_history.py`)."""
    section = README.read_text(encoding="utf-8").split("## Reporting", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in statements if any(not ln.startswith("--") for ln in s.splitlines())]


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData.generate(("1", "2"), 300, seed=21)) as server:
        yield server


def _answers(server: SandboxServer, db_url: str) -> list[list[tuple[Any, ...]]]:
    settings = make_settings(server, db_url, api={"companies": ["1", "2"]})
    store = MirrorStore.open(db_url)
    engine = SyncEngine.from_settings(settings, store)
    try:
        for outcome in engine.sync_all(["1", "2"]):
            assert outcome.error is None
    finally:
        engine.close()
        store.close()
    db = create_engine(db_url)
    try:
        with db.connect() as conn:
            return [
                [tuple(_plain(v) for v in row) for row in conn.execute(text(query))]
                for query in reporting_queries()
            ]
    finally:
        db.dispose()


def _plain(value: Any) -> Any:
    """Timestamps compare as their date and time whatever the driver returns them as."""
    text_value = value.isoformat(sep=" ") if hasattr(value, "isoformat") else value
    return text_value[:19] if isinstance(text_value, str) and text_value[:2] == "20" else value


class TestReportingQueries:
    def test_readme_has_queries(self) -> None:
        """The README shows at least four reporting queries."""
        assert len(reporting_queries()) >= 4

    @pytest.mark.postgres
    def test_same_answers_on_sqlite_and_postgresql(
        self, upstream: SandboxServer, sqlite_url: str, pg_url: str
    ) -> None:
        """Each query runs on both databases and returns the same, non-empty rows."""
        on_sqlite = _answers(upstream, sqlite_url)
        on_postgres = _answers(upstream, pg_url)
        assert all(on_sqlite), "every query should return rows for this data"
        assert on_sqlite[:-1] == on_postgres[:-1]  # the last one shows sync times, which differ
        per_client = on_sqlite[0]
        assert sum(count for _, count in per_client) == 600
