"""Deletion scans: rows gone upstream are marked, live rows never are, even while upstream moves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import make_settings, mirror_rows, upstream_rows
from sqlalchemy import create_engine, text

from sync.config import Settings
from sync.engine import ReconcileReport, SyncEngine
from sync.sandbox import SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

pytestmark = pytest.mark.usefixtures("walk_concurrency")


@contextmanager
def engine_for(settings: Settings) -> Iterator[SyncEngine]:
    store = MirrorStore.open(settings.database.url)
    engine = SyncEngine.from_settings(settings, store)
    try:
        yield engine
    finally:
        engine.close()
        store.close()


def sync_then_reconcile(settings: Settings) -> ReconcileReport:
    with engine_for(settings) as engine:
        return engine.reconcile_company("1")


def deleted_ids(db_url: str) -> set[int]:
    db = create_engine(db_url)
    try:
        with db.connect() as conn:
            query = text("SELECT id FROM contacts WHERE deleted_at IS NOT NULL")
            return set(conn.execute(query).scalars())
    finally:
        db.dispose()


def first_sync(settings: Settings) -> None:
    with engine_for(settings) as engine:
        engine.sync_company("1")


class TestReconcile:
    def test_marks_exactly_the_rows_deleted_upstream(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """Rows that vanished upstream get deleted_at; every other row stays live and exact."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        gone = set(sandbox.data.delete("1", count=7))
        report = sync_then_reconcile(settings)
        assert report.certain
        assert report.marked == 7
        assert deleted_ids(db_url) == gone
        assert mirror_rows(db_url) == upstream_rows(sandbox)

    def test_hard_deletes_remove_the_rows(self, sandbox: SandboxServer, db_url: str) -> None:
        """With sync.deletes = "hard" the vanished rows are removed from the mirror."""
        settings = make_settings(sandbox, db_url, sync={"deletes": "hard"})
        first_sync(settings)
        gone = set(sandbox.data.delete("1", count=4))
        report = sync_then_reconcile(settings)
        assert report.marked == 4
        assert gone.isdisjoint(mirror_rows(db_url, live_only=False))
        assert deleted_ids(db_url) == set()

    def test_a_row_back_upstream_is_live_again(self, sandbox: SandboxServer, db_url: str) -> None:
        """A row marked deleted that upstream lists again has its deleted_at cleared."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        db = create_engine(db_url)
        with db.begin() as conn:
            conn.execute(text("UPDATE contacts SET deleted_at = synced_at WHERE id IN (5, 6)"))
        db.dispose()
        report = sync_then_reconcile(settings)
        assert report.restored == 2
        assert deleted_ids(db_url) == set()

    def test_an_empty_listing_marks_nothing(self, sandbox: SandboxServer, db_url: str) -> None:
        """Upstream listing no rows at all is not trusted to mean that everything was deleted."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        sandbox.data.delete("1", ids=sandbox.data.ids("1"))
        report = sync_then_reconcile(settings)
        assert not report.certain
        assert report.marked == 0
        assert deleted_ids(db_url) == set()

    @pytest.mark.parametrize("order", ["id", "updated_asc", "updated_desc"])
    def test_never_marks_a_live_row_while_upstream_changes(self, db_url: str, order: str) -> None:
        """Inserts, updates and deletes during the scan never get a live row marked deleted."""
        data = SandboxData.generate(("1",), 1500, seed=17)
        with SandboxServer(data, SandboxConfig(order=order)) as server:  # type: ignore[arg-type]
            settings = make_settings(server, db_url)
            first_sync(settings)
            gone_before = set(data.delete("1", count=5))
            server.mutate_on_request("1", every=2, updates=2, inserts=1, deletes=1)
            report = sync_then_reconcile(settings)
            server.stop_mutating()
            assert deleted_ids(db_url).isdisjoint(data.ids("1"))
            assert report.marked == 0 or report.certain
            quiet = sync_then_reconcile(settings)
            assert quiet.certain
            assert gone_before <= deleted_ids(db_url)
            mirrored = set(mirror_rows(db_url, live_only=False))
            assert deleted_ids(db_url) == mirrored - data.ids("1")
