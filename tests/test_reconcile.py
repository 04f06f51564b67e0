"""Deletion scans: rows gone upstream are marked, live rows never are, even while upstream moves."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import engine_for, make_settings, mirror_rows, upstream_rows
from sqlalchemy import create_engine, text
from test_cli import cli, one_sentence, write_config

from sync.config import Settings
from sync.engine import ReconcileReport
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

pytestmark = pytest.mark.usefixtures("walk_concurrency")


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


def first_sync(settings: Settings, company: str = "1") -> None:
    with engine_for(settings) as engine:
        engine.sync_company(company)


def now_text() -> str:
    """The present as upstream writes `updated_at`, with milliseconds and Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def by_client(server: SandboxServer) -> tuple[int, list[int], list[int]]:
    """A client of company 1, the ids of its contacts and the ids of everyone else's."""
    items = server.data.snapshot("1")
    client = items[0]["client_id"]
    mine = sorted(item["id"] for item in items if item["client_id"] == client)
    others = sorted(item["id"] for item in items if item["client_id"] != client)
    return client, mine, others


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
        assert report.refused
        assert report.reason == "upstream listed no rows at all"
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


class TestBrokenRows:
    @pytest.mark.parametrize("deletes", ["soft", "hard"])
    def test_a_row_served_broken_is_never_marked(
        self, sandbox: SandboxServer, db_url: str, deletes: str
    ) -> None:
        """A live row upstream serves in a form that cannot be stored is quarantined, not marked."""
        settings = make_settings(sandbox, db_url, sync={"deletes": deletes})
        first_sync(settings)
        row = sandbox.data.get("1", 5)
        assert row is not None
        sandbox.data.delete("1", ids=[5])
        sandbox.data.put_raw("1", {**row, "updated_at": "yesterday"})
        gone = set(sandbox.data.delete("1", ids=[8, 9]))
        report = sync_then_reconcile(settings)
        assert (report.marked, report.missing) == (2, 2)
        live = mirror_rows(db_url)
        assert 5 in live
        assert gone.isdisjoint(live)

    @pytest.mark.parametrize(
        ("item", "marked"),
        [
            ({"name": "no id at all"}, 0),
            ("not an object", 0),
            ({"id": "abc", "updated_at": "2025-01-01T00:00:00Z"}, 0),
            ({"id": "8", "updated_at": "2025-01-01T00:00:00Z"}, 1),
            ({"id": 8.0, "updated_at": "2025-01-01T00:00:00Z"}, 1),
            ({"id": -8, "updated_at": "2025-01-01T00:00:00Z"}, 2),
            ({"id": 2**70, "updated_at": "2025-01-01T00:00:00Z"}, 2),
        ],
        ids=["no-id", "not-object", "word-id", "text-id", "float-id", "negative-id", "huge-id"],
    )
    def test_a_broken_item_protects_every_row_it_may_be(
        self, sandbox: SandboxServer, db_url: str, item: Any, marked: int
    ) -> None:
        """A broken item keeps the row its id names; one whose id cannot be read keeps them all."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        sandbox.data.delete("1", ids=[8, 9])
        sandbox.data.put_raw("1", item)
        report = sync_then_reconcile(settings)
        assert report.marked == marked
        assert len(deleted_ids(db_url)) == marked
        assert report.certain == (marked > 0)
        assert report.unreadable == (1 if marked == 0 else 0)


class TestScope:
    def test_rows_outside_the_client_filter_are_never_marked(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """With api.client_id set after mirroring, only that client's vanished rows are marked."""
        first_sync(make_settings(sandbox, db_url))
        client, mine, others = by_client(sandbox)
        gone = set(sandbox.data.delete("1", ids=mine[:2]))
        sandbox.data.delete("1", ids=others[:2])
        report = sync_then_reconcile(make_settings(sandbox, db_url, api={"client_id": client}))
        assert report.judged == len(mine)
        assert report.marked == 2
        assert deleted_ids(db_url) == gone
        assert set(others) <= set(mirror_rows(db_url))

    def test_another_companys_rows_are_never_marked(self, db_url: str) -> None:
        """A reconcile of one company leaves another company's rows alone, gone upstream or not."""
        data = SandboxData.generate(("1", "2"), 300, seed=5)
        with SandboxServer(data) as server:
            settings = make_settings(server, db_url, api={"companies": ["1", "2"]})
            only_in_2 = data.insert("2", count=50)
            first_sync(settings, "1")
            first_sync(settings, "2")
            data.delete("2", ids=only_in_2)
            gone = set(data.delete("1", count=3))
            report = sync_then_reconcile(settings)
        assert (report.judged, report.missing, report.marked) == (300, 3, 3)
        assert deleted_ids(db_url) == gone
        assert len(mirror_rows(db_url, "2")) == 350

    def test_a_row_moved_to_another_client_is_updated_not_marked(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """A mirrored row whose client changed upstream is live outside the filter: not marked."""
        client, mine, others = by_client(sandbox)
        other_client = sandbox.data.get("1", others[0])["client_id"]  # type: ignore[index]
        settings = make_settings(sandbox, db_url, api={"client_id": client})
        first_sync(settings)
        moved, gone = mine[0], mine[1]
        row = sandbox.data.get("1", moved)
        assert row is not None
        sandbox.data.delete("1", ids=[moved, gone])
        sandbox.data.put_raw("1", {**row, "client_id": other_client, "updated_at": now_text()})
        report = sync_then_reconcile(settings)
        assert report.marked == 1
        assert deleted_ids(db_url) == {gone}
        stored = mirror_rows(db_url, live_only=False)
        assert stored[moved]["client_id"] == other_client
        assert set(stored) == set(mine)


class TestMassDeletionGuard:
    def test_a_mass_deletion_is_refused_until_forced(
        self, sandbox: SandboxServer, db_url: str, tmp_path: Path, walk_concurrency: int
    ) -> None:
        """Past sync.max_delete_fraction nothing is marked, exit 8 says so, status shows it;
        --force marks."""
        config = write_config(
            tmp_path / "sync.toml",
            sandbox,
            db_url,
            api={"token": DEFAULT_TOKEN, "concurrency": walk_concurrency},
        )
        assert cli(config, "once").returncode == 0
        gone = set(sandbox.data.delete("1", count=300))
        refused = cli(config, "reconcile")
        assert refused.returncode == 8
        said = one_sentence(refused.stderr)
        assert "300 of 1,200 live rows (25%)" in said
        assert "sync.max_delete_fraction" in said
        assert "reconcile --force" in said
        assert deleted_ids(db_url) == set()
        status = json.loads(cli(config, "status", "--json").stdout)["companies"][0]
        assert status["last_reconcile"]["refused"] is True
        assert status["last_reconcile"]["missing"] == 300
        assert "reconcile --force" in " ".join(cli(config, "status").stdout.split())
        forced = cli(config, "reconcile", "--force")
        assert forced.returncode == 0, forced.stderr
        assert "300 marked deleted" in " ".join(forced.stdout.split())
        assert deleted_ids(db_url) == gone
        status = json.loads(cli(config, "status", "--json").stdout)["companies"][0]
        assert status["last_reconcile"]["refused"] is False
        assert status["last_reconcile"]["forced"] is True

    def test_the_fraction_is_configurable(self, sandbox: SandboxServer, db_url: str) -> None:
        """A share under sync.max_delete_fraction is marked; the same share over it is not."""
        strict = make_settings(sandbox, db_url, sync={"max_delete_fraction": 0.01})
        first_sync(strict)
        gone = set(sandbox.data.delete("1", count=24))
        assert sync_then_reconcile(strict).refused
        assert deleted_ids(db_url) == set()
        loose = make_settings(sandbox, db_url, sync={"max_delete_fraction": 0.02})
        report = sync_then_reconcile(loose)
        assert not report.refused
        assert deleted_ids(db_url) == gone


class TestBusyList:
    @pytest.mark.parametrize("order", ["id", "updated_asc", "updated_desc"])
    def test_a_list_that_never_stops_changing_still_marks_the_vanished_rows(
        self, db_url: str, order: str
    ) -> None:
        """Upstream changing before every request: reconcile ends within its walks and marks
        exactly the rows gone before it."""
        data = SandboxData.generate(("1",), 1500, seed=23)
        with SandboxServer(data, SandboxConfig(order=order)) as server:  # type: ignore[arg-type]
            settings = make_settings(server, db_url)
            first_sync(settings)
            gone = set(data.delete("1", count=6))
            server.mutate_on_request("1", every=1, updates=3, inserts=1)
            report = sync_then_reconcile(settings)
            server.stop_mutating()
        assert report.certain
        assert not report.refused
        assert report.walks <= 5
        assert deleted_ids(db_url) == gone


class TestReport:
    def test_rows_upstream_serves_older_are_kept_and_counted(
        self, sandbox: SandboxServer, db_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Rows upstream serves older than the mirror's are kept, and counted with example ids
        in the report, the status and the log."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        db = create_engine(db_url)
        with db.begin() as conn:
            conn.execute(
                text("UPDATE contacts SET updated_at = '2099-01-01 00:00:00.000000' WHERE id <= 6")
            )
        db.dispose()
        report = sync_then_reconcile(settings)
        assert report.older_upstream == 6
        assert report.older_examples == [1, 2, 3, 4, 5]
        assert report.marked == 0
        assert mirror_rows(db_url)[6]["updated_at"].startswith("2099-01-01")
        store = MirrorStore.open(db_url)
        try:
            last = store.status(["1"])[0].last_reconcile
        finally:
            store.close()
        assert last is not None
        assert last["older_upstream"] == 6
        assert "reconcile.older_upstream" in capsys.readouterr().out

    def test_scanned_counts_the_full_scan_only(self, sandbox: SandboxServer, db_url: str) -> None:
        """`scanned` is the rows the full scan listed, whatever the re-read walks read again."""
        settings = make_settings(sandbox, db_url)
        first_sync(settings)
        sandbox.data.delete("1", count=3)
        sandbox.data.update("1", count=40)
        report = sync_then_reconcile(settings)
        assert report.walks >= 2
        assert report.scanned == 1197
