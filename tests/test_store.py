"""MirrorStore against real databases: every test runs on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import os
import select as io_select
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import end_lock_sessions, install_failing_trigger
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, inspect, make_url, select, text

from sync.errors import CompanyLocked, DatabaseError
from sync.models import (
    VERSION_TABLE,
    Contact,
    metadata,
    sqlite_timestamp,
    sqlite_timestamps,
    table_of,
)
from sync.rows import TEXT_FIELDS, ContactRow, RejectedRow
from sync.store import Checkpoint, MirrorStore, MirrorVersion, schema_head

T0 = datetime(2025, 3, 4, 10, 0, 0, 123000, tzinfo=UTC)
CONTRACT_COLUMNS = [
    "company_id",
    "id",
    "client_id",
    "email",
    "name",
    "surname",
    "role",
    "notes",
    "linkedin",
    "description",
    "telephone",
    "created_at",
    "updated_at",
    "synced_at",
    "deleted_at",
    "extra",
]


def _row(contact_id: int, updated_at: datetime = T0, **fields: Any) -> ContactRow:
    values: dict[str, Any] = dict.fromkeys(TEXT_FIELDS)
    values.update(created_at=None, client_id=None, extra=None)
    values.update(fields)
    return ContactRow(id=contact_id, updated_at=updated_at, **values)


def _checkpoint(**changes: Any) -> Checkpoint:
    values: dict[str, Any] = {
        "mode": "backfill",
        "filter_since": None,
        "next_offset": 100,
        "anchors": [],
        "high_water": T0,
        "started_at": T0,
        "pages": 1,
        "rows": 100,
    }
    values.update(changes)
    return Checkpoint(**values)


@pytest.fixture
def store(db_url: str) -> Iterator[MirrorStore]:
    opened = MirrorStore.open(db_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def raw(db_url: str, store: MirrorStore) -> Iterator[Engine]:
    """A second, plain engine on the same database, to see what a reporting user would see."""
    engine = create_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _contacts(raw: Engine, company_id: str = "42") -> dict[int, Any]:
    table = table_of(Contact)
    with raw.connect() as conn:
        rows = conn.execute(select(table).where(table.c.company_id == company_id)).all()
    return {row.id: row for row in rows}


def _scalar(raw: Engine, sql: str) -> Any:
    with raw.connect() as conn:
        return conn.execute(text(sql)).scalar()


class TestSchema:
    def test_contacts_has_the_contract_columns_and_primary_key(self, raw: Engine) -> None:
        """contacts has exactly the contract's columns, in order, keyed by (company_id, id)."""
        inspector = inspect(raw)
        columns = inspector.get_columns("contacts")
        assert [c["name"] for c in columns] == CONTRACT_COLUMNS
        assert inspector.get_pk_constraint("contacts")["constrained_columns"] == [
            "company_id",
            "id",
        ]
        not_null = {c["name"] for c in columns if not c["nullable"]}
        assert not_null == {"company_id", "id", "updated_at", "synced_at"}
        indexed = [i["column_names"] for i in inspector.get_indexes("contacts")]
        assert ["company_id", "updated_at"] in indexed

    def test_column_types_suit_reporting(self, store: MirrorStore, raw: Engine) -> None:
        """Timestamps are timestamptz on PostgreSQL, text is unlimited, and extra is JSON(B)."""
        sql = (
            "SELECT column_name, upper(data_type) FROM information_schema.columns "
            "WHERE table_name = 'contacts'"
            if store.dialect == "postgresql"
            else "SELECT name, upper(type) FROM pragma_table_info('contacts')"
        )
        with raw.connect() as conn:
            types: dict[str, str] = dict(conn.execute(text(sql)).all())
        stamps = {types[c] for c in ("created_at", "updated_at", "synced_at", "deleted_at")}
        if store.dialect == "postgresql":
            assert stamps == {"TIMESTAMP WITH TIME ZONE"}
            assert types["extra"] == "JSONB"
        else:
            assert stamps == {"DATETIME"}
            assert types["extra"] == "JSON"
        assert types["id"] == types["client_id"] == "BIGINT"
        assert {types[c] for c in ("company_id", *TEXT_FIELDS)} == {"TEXT"}

    def test_schema_version_lives_in_its_own_table(self, raw: Engine) -> None:
        """Alembic's version table is contacts-sync's own, so a user's alembic_version is free."""
        version = _scalar(raw, "SELECT version_num FROM contacts_sync_schema_version")
        assert version == schema_head()
        assert "alembic_version" not in inspect(raw).get_table_names()

    def test_the_models_match_the_migrations(self, raw: Engine) -> None:
        """Autogenerate finds nothing to change, so the models and the revisions agree."""
        with raw.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            assert compare_metadata(context, metadata) == []

    def test_reopening_an_existing_database_changes_nothing(
        self, db_url: str, store: MirrorStore, raw: Engine
    ) -> None:
        """Opening a database already at head keeps its rows and its single version row."""
        store.write_page("42", [_row(1)], [], None, T0)
        MirrorStore.open(db_url).close()
        assert list(_contacts(raw)) == [1]
        assert _scalar(raw, "SELECT count(*) FROM contacts_sync_schema_version") == 1

    def test_a_contacts_table_not_ours_is_refused(self, db_url: str) -> None:
        """A contacts table without our version table means someone else's data: touch nothing."""
        engine = create_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE contacts (id integer PRIMARY KEY)"))
            with pytest.raises(DatabaseError, match="did not create") as caught:
                MirrorStore.open(db_url)
            assert "point database.url at another database or schema" in caught.value.message
            assert set(inspect(engine).get_table_names()) == {"contacts"}
        finally:
            engine.dispose()

    def test_sqlite_file_is_readable_by_its_owner_only(self, sqlite_url: str) -> None:
        """The mirror holds personal data, so SQLite creates it with mode 0600."""
        MirrorStore.open(sqlite_url).close()
        path = make_url(sqlite_url).database
        assert path is not None
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600

    def test_sqlite_runs_in_wal_mode(self, sqlite_url: str) -> None:
        """WAL lets status and reporting queries read while a pass writes."""
        MirrorStore.open(sqlite_url).close()
        engine = create_engine(sqlite_url)
        try:
            assert _scalar(engine, "PRAGMA journal_mode") == "wal"
        finally:
            engine.dispose()

    def test_an_unsupported_url_is_a_database_error(self) -> None:
        """A URL for another database names the supported ones instead of failing obscurely."""
        with pytest.raises(DatabaseError, match="sqlite:///"):
            MirrorStore.open("mysql://user@localhost/db")

    def test_an_unreachable_server_is_reported_without_its_password(self) -> None:
        """A failed connection says what to check and never shows the URL's password."""
        with pytest.raises(DatabaseError) as caught:
            MirrorStore.open("postgresql://sync:s3cret-pw@127.0.0.1:1/mirror")
        message = caught.value.message
        assert "s3cret-pw" not in message
        assert message.startswith("Cannot open the mirror database at postgresql://sync:***@")
        assert "check database.url" in message

    def test_a_missing_directory_is_a_database_error(self, tmp_path: Path) -> None:
        """A SQLite path in a missing directory names the problem and the setting to fix."""
        with pytest.raises(DatabaseError, match=r"check database\.url"):
            MirrorStore.open(f"sqlite:///{tmp_path / 'missing' / 'mirror.db'}")


class TestWritePage:
    def test_inserts_then_updates(self, store: MirrorStore, raw: Engine) -> None:
        """New ids are inserted, a newer version replaces the stored row, and both are counted."""
        later = T0 + timedelta(minutes=5)
        assert store.write_page("42", [_row(1, email="a@x"), _row(2)], [], None, T0) == 2
        assert store.write_page("42", [_row(1, later, email="b@x")], [], None, later) == 1
        stored = _contacts(raw)
        assert (stored[1].email, stored[1].updated_at, stored[1].synced_at) == ("b@x", later, later)
        assert stored[2].synced_at == T0

    def test_an_older_version_never_replaces_a_newer_one(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A row served late with an older updated_at is skipped and not counted."""
        newer = T0 + timedelta(seconds=1)
        store.write_page("42", [_row(1, newer, email="new")], [], None, T0)
        assert store.write_page("42", [_row(1, T0, email="old")], [], None, newer) == 0
        stored = _contacts(raw)[1]
        assert (stored.email, stored.updated_at, stored.synced_at) == ("new", newer, T0)

    def test_an_equal_version_is_rewritten_idempotently(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Re-reading a row with the same updated_at rewrites it to the same values."""
        row = _row(1, email="same", extra={"k": 1})
        store.write_page("42", [row], [], None, T0)
        first = _contacts(raw)[1]
        assert store.write_page("42", [row], [], None, T0 + timedelta(hours=1)) == 1
        again = _contacts(raw)[1]
        assert {**again._asdict(), "synced_at": None} == {**first._asdict(), "synced_at": None}
        assert again.synced_at == T0 + timedelta(hours=1)

    def test_offset_timestamps_come_back_as_the_same_utc_instant(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Any UTC offset is stored as the same instant, with its milliseconds, and read as UTC."""
        india = timezone(timedelta(hours=5, minutes=30))
        updated = datetime(2025, 3, 4, 10, 0, 0, 987000, tzinfo=india)
        created = datetime(2024, 12, 31, 20, 0, 0, 1000, tzinfo=timezone(timedelta(hours=-5)))
        store.write_page("42", [_row(1, updated, created_at=created)], [], None, T0)
        stored = _contacts(raw)[1]
        assert stored.updated_at == datetime(2025, 3, 4, 4, 30, 0, 987000, tzinfo=UTC)
        assert stored.created_at == datetime(2025, 1, 1, 1, 0, 0, 1000, tzinfo=UTC)
        assert stored.updated_at.tzinfo == UTC
        assert stored.created_at.tzinfo == UTC

    def test_reporting_sql_compares_timestamps_with_date_strings(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Plain SQL like updated_at >= '2025-03-04' selects by UTC time on both databases."""
        store.write_page("42", [_row(1, T0), _row(2, T0 - timedelta(days=1))], [], None, T0)
        sql = "SELECT id FROM contacts WHERE updated_at >= '2025-03-04' ORDER BY id"
        with raw.connect() as conn:
            assert conn.execute(text(sql)).scalars().all() == [1]
        if store.dialect == "sqlite":
            stored = _scalar(raw, "SELECT updated_at FROM contacts WHERE id = 1")
            assert stored == "2025-03-04 10:00:00.123000"

    def test_long_and_unicode_text_is_kept_intact(self, store: MirrorStore, raw: Engine) -> None:
        """Every text field keeps values far beyond upstream's limits, in any script, verbatim."""
        values: dict[str, Any] = {
            field: f"{field} ünïcødé 名前 🙂 \"quoted\" 'single' back\\slash\nline " * 40
            for field in TEXT_FIELDS
        }
        store.write_page("42", [_row(1, client_id=7, **values)], [], None, T0)
        stored = _contacts(raw)[1]
        assert {field: getattr(stored, field) for field in TEXT_FIELDS} == values
        assert stored.client_id == 7

    def test_extra_json_round_trips_and_none_is_sql_null(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Fields upstream adds later come back as the same JSON; no extra is SQL NULL."""
        extra = {"tags": ["a", "ü"], "score": 1.5, "nested": {"n": None, "ok": True}}
        store.write_page("42", [_row(1, extra=extra), _row(2)], [], None, T0)
        stored = _contacts(raw)
        assert stored[1].extra == extra
        assert _scalar(raw, "SELECT count(*) FROM contacts WHERE extra IS NULL") == 1

    def test_a_newer_version_revives_a_deleted_row(self, store: MirrorStore, raw: Engine) -> None:
        """A row marked deleted that upstream serves again, changed, is live again."""
        store.write_page("42", [_row(1)], [], None, T0)
        store.mark_deleted("42", {1}, T0, hard=False)
        store.write_page("42", [_row(1, T0 + timedelta(seconds=1))], [], None, T0)
        assert _contacts(raw)[1].deleted_at is None

    def test_rejected_items_are_quarantined_with_their_payload(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A bad item is kept with its reason and its JSON, and status counts it."""
        bad = RejectedRow(payload={"id": 9, "updated_at": "yesterday"}, reason="bad", contact_id=9)
        store.write_page(
            "42", [_row(1)], [bad, RejectedRow("junk", "not an object", None)], None, T0
        )
        with raw.connect() as conn:
            rows = conn.execute(
                text("SELECT contact_id, reason, payload FROM quarantine ORDER BY id")
            ).all()
        assert [(r.contact_id, r.reason, json.loads(r.payload)) for r in rows] == [
            (9, "bad", {"id": 9, "updated_at": "yesterday"}),
            (None, "not an object", "junk"),
        ]
        assert store.status(["42"])[0].quarantined == 2

    def test_a_bad_row_read_again_replaces_its_entry(self, store: MirrorStore) -> None:
        """Re-reading the same bad row (lookback, a rerun) does not count it twice."""
        bad = RejectedRow(payload={"id": 9}, reason="updated_at is missing", contact_id=9)
        store.write_page("42", [], [bad], None, T0)
        store.write_page("42", [], [bad], None, T0)
        assert store.status(["42"])[0].quarantined == 1

    def test_an_id_served_valid_again_leaves_the_quarantine(self, store: MirrorStore) -> None:
        """A valid version of a quarantined id clears its entry, within one group of pages
        too; one served broken and valid in the same page stays quarantined."""
        bad = RejectedRow(payload={"id": 9}, reason="updated_at is missing", contact_id=9)
        other = RejectedRow(payload={"id": 8}, reason="updated_at is missing", contact_id=8)
        store.write_page("42", [], [bad, other], None, T0)
        store.write_page("42", [_row(8)], [other], None, T0)
        assert store.status(["42"])[0].quarantined == 2
        with store.page_writer("42") as writer:
            writer.write([_row(9)], [], None, T0)
            writer.write([], [bad], None, T0)
            writer.write([_row(9, T0 + timedelta(seconds=1))], [], None, T0)
        assert store.status(["42"])[0].quarantined == 1
        store.write_page("43", [_row(8)], [], None, T0)  # another company's id 8
        assert store.status(["42"])[0].quarantined == 1
        store.write_page("42", [_row(8)], [], None, T0)
        assert store.status(["42"])[0].quarantined == 0

    def test_naive_timestamps_are_refused(self, store: MirrorStore) -> None:
        """A timestamp without an offset is ambiguous, so it is a programming error."""
        with pytest.raises(ValueError, match="naive"):
            store.write_page("42", [_row(1, datetime(2025, 1, 1))], [], None, T0)

    @pytest.mark.parametrize(
        ("table", "condition"),
        [("contacts", "NEW.id = 50"), ("checkpoints", "TRUE")],
        ids=["failing-row", "failing-checkpoint"],
    )
    def test_a_failure_leaves_nothing_of_the_page(
        self, store: MirrorStore, raw: Engine, table: str, condition: str
    ) -> None:
        """If any statement of a page fails, no row, reject or checkpoint of it is kept."""
        install_failing_trigger(raw, table, condition)
        rows = [_row(i) for i in range(1, 101)]
        rejected = [RejectedRow({"id": 0}, "id is less than 1", None)]
        with pytest.raises(DatabaseError, match="forced failure"):
            store.write_page("42", rows, rejected, _checkpoint(), T0)
        assert _contacts(raw) == {}
        assert store.load_checkpoint("42") is None
        assert store.status(["42"])[0].quarantined == 0


class TestCursor:
    def test_an_unknown_company_has_no_state(self, store: MirrorStore) -> None:
        """A company never synced starts with no cursor and no outcome."""
        state = store.read_state("new")
        assert (state.cursor, state.last_success_at, state.last_error) == (None, None, None)

    def test_the_cursor_never_moves_backwards(self, store: MirrorStore) -> None:
        """An earlier cursor is ignored, while the success time is still recorded."""
        later = T0 + timedelta(hours=1)
        assert store.advance_cursor("42", later, T0) == later
        assert store.advance_cursor("42", T0, later) == later
        state = store.read_state("42")
        assert (state.cursor, state.last_success_at) == (later, later)
        latest = later + timedelta(seconds=1)
        assert store.advance_cursor("42", latest, later) == latest

    def test_a_pass_without_rows_keeps_the_cursor(self, store: MirrorStore) -> None:
        """No cursor (nothing seen) records the success and keeps the stored cursor, if any."""
        assert store.advance_cursor("new", None, T0) is None
        assert store.read_state("new").last_success_at == T0
        store.advance_cursor("42", T0, T0)
        later = T0 + timedelta(hours=1)
        assert store.advance_cursor("42", None, later) == T0
        state = store.read_state("42")
        assert (state.cursor, state.last_success_at) == (T0, later)

    def test_advancing_clears_the_checkpoint_and_the_last_error(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A completed pass drops its checkpoint and the previous failure, and keeps a summary."""
        store.record_failure("42", "upstream down", T0)
        store.write_page("42", [_row(1)], [], _checkpoint(), T0)
        store.advance_cursor("42", T0, T0, {"rows": 1, "at": T0})
        state = store.read_state("42")
        assert (state.last_error, state.last_error_at) == (None, None)
        assert store.load_checkpoint("42") is None
        summary = _scalar(raw, "SELECT last_pass FROM sync_state")
        assert (json.loads(summary) if isinstance(summary, str) else summary) == {
            "rows": 1,
            "at": T0.isoformat(),
        }

    def test_a_failure_leaves_cursor_and_checkpoint(self, store: MirrorStore) -> None:
        """A failed pass records why and when, and resumes from where it stood."""
        store.advance_cursor("42", T0, T0)
        store.write_page("42", [], [], _checkpoint(next_offset=300), T0)
        failed_at = T0 + timedelta(minutes=1)
        store.record_failure("42", "The API kept failing with 503.", failed_at)
        state = store.read_state("42")
        assert (state.cursor, state.last_success_at) == (T0, T0)
        assert (state.last_error, state.last_error_at) == (
            "The API kept failing with 503.",
            failed_at,
        )
        checkpoint = store.load_checkpoint("42")
        assert checkpoint is not None
        assert checkpoint.next_offset == 300


class TestCheckpoint:
    def test_round_trip_with_anchors(self, store: MirrorStore) -> None:
        """A checkpoint comes back equal, its anchors as (id, UTC updated_at) pairs."""
        plus_two = timezone(timedelta(hours=2))
        saved = _checkpoint(
            mode="incremental",
            filter_since=T0 - timedelta(minutes=5),
            anchors=[(7, T0), (8, datetime(2025, 3, 4, 12, 0, 0, 5000, tzinfo=plus_two))],
            high_water=T0 + timedelta(seconds=3),
            pages=4,
            rows=321,
        )
        store.write_page("42", [], [], saved, T0)
        loaded = store.load_checkpoint("42")
        assert loaded == saved
        assert loaded is not None
        assert loaded.anchors[1] == (8, datetime(2025, 3, 4, 10, 0, 0, 5000, tzinfo=UTC))
        assert all(at.tzinfo == UTC for _, at in loaded.anchors)

    def test_each_page_replaces_the_checkpoint_of_its_company_only(
        self, store: MirrorStore
    ) -> None:
        """The newest page's checkpoint wins, and companies keep their own."""
        store.write_page("42", [], [], _checkpoint(next_offset=100), T0)
        store.write_page("7", [], [], _checkpoint(next_offset=900, high_water=None), T0)
        store.write_page("42", [], [], _checkpoint(next_offset=200), T0)
        offsets = {c: saved.next_offset for c in ("42", "7") if (saved := store.load_checkpoint(c))}
        assert offsets == {"42": 200, "7": 900}
        store.clear_checkpoint("42")
        assert store.load_checkpoint("42") is None
        assert store.load_checkpoint("7") is not None


class TestPageWriter:
    def test_pages_become_visible_together_at_commit(self, store: MirrorStore, raw: Engine) -> None:
        """Grouped pages are one transaction: nothing shows before commit, all of it after."""
        with store.page_writer("42") as writer:
            writer.write([_row(1), _row(2)], [], _checkpoint(next_offset=100, pages=1), T0)
            writer.write([_row(3)], [], _checkpoint(next_offset=199, pages=2), T0)
            assert writer.open_s > 0
            assert _contacts(raw) == {}
            assert store.load_checkpoint("42") is None
            writer.commit()
            assert writer.open_s == 0
            assert set(_contacts(raw)) == {1, 2, 3}
            saved = store.load_checkpoint("42")
            assert saved is not None
            assert (saved.next_offset, saved.pages) == (199, 2)  # the group's last page

    def test_an_upstream_failure_keeps_what_was_written(self, store: MirrorStore) -> None:
        """Pages fetched before upstream failed are committed with their checkpoint."""
        with pytest.raises(RuntimeError):
            _write_group_then(store, RuntimeError("upstream gave up"))
        assert store.live_ids("42") == {1, 2}
        saved = store.load_checkpoint("42")
        assert saved is not None
        assert saved.next_offset == 199

    @pytest.mark.parametrize("error", [DatabaseError("lost"), KeyboardInterrupt()])
    def test_a_database_error_or_an_interrupt_rolls_back(
        self, store: MirrorStore, error: BaseException
    ) -> None:
        """A group that cannot be trusted to be whole is dropped, checkpoint and all."""
        with pytest.raises(type(error)):
            _write_group_then(store, error)
        assert store.live_ids("42") == {1}
        saved = store.load_checkpoint("42")
        assert saved is not None
        assert saved.next_offset == 100

    def test_a_failing_statement_drops_the_open_group_only(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A driver error comes out as DatabaseError; earlier commits stay, the group goes."""
        install_failing_trigger(raw, "contacts", "NEW.id = 50")
        with pytest.raises(DatabaseError, match="forced failure"):
            _write_group_then(store, None, [_row(50)])
        assert set(_contacts(raw)) == {1}
        saved = store.load_checkpoint("42")
        assert saved is not None
        assert saved.next_offset == 100

    def test_a_page_larger_than_one_statement_is_stored_whole(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """More rows than one statement carries (page sizes are not ours to choose) all land."""
        rows = [_row(i, email=f"{i}@example.com") for i in range(1, 251)]
        assert store.write_page("42", rows, [], None, T0) == 250
        stored = _contacts(raw)
        assert len(stored) == 250
        assert stored[250].email == "250@example.com"

    def test_every_field_of_every_row_lands_in_its_own_place(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A page is bound column by column: each row reads back with its own values, times in
        any zone or precision (whole seconds, microseconds) as the same UTC instant."""
        zones = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
        rows = [
            _row(
                i,
                (T0 + timedelta(days=i, microseconds=i * 7919 if i % 4 else 0)).astimezone(
                    zones[i % 3]
                ),
                created_at=None if i % 5 == 0 else datetime(2000 + i, 1, 2, 3, 4, 5, tzinfo=UTC),
                client_id=None if i % 7 == 0 else 1000 + i,
                extra=None if i % 3 else {"n": i},
                **{field: f"{field}-{i}" for field in TEXT_FIELDS},
            )
            for i in range(1, 61)
        ]
        assert store.write_page("42", rows, [], None, T0) == 60
        stored = _contacts(raw)
        for row in rows:
            got = stored[row.id]
            assert got.updated_at == row.updated_at
            assert got.created_at == row.created_at
            assert (got.client_id, got.extra) == (row.client_id, row.extra)
            assert {field: getattr(got, field) for field in TEXT_FIELDS} == {
                field: getattr(row, field) for field in TEXT_FIELDS
            }
        if store.dialect == "sqlite":
            with raw.connect() as conn:
                texts = dict(conn.execute(text("SELECT id, updated_at FROM contacts")).all())
            assert texts == {row.id: sqlite_timestamp(row.updated_at) for row in rows}


def _write_group_then(
    store: MirrorStore, error: BaseException | None, last: list[ContactRow] | None = None
) -> None:
    """Commit page 1, write page 2 (and `last`) into an open group, then raise `error`."""
    with store.page_writer("42") as writer:
        writer.write([_row(1)], [], _checkpoint(next_offset=100), T0)
        writer.commit()
        writer.write([_row(2)], [], _checkpoint(next_offset=199), T0)
        if last is not None:
            writer.write(last, [], _checkpoint(next_offset=298), T0)
        if error is not None:
            raise error


_HOLDER = """
import sys, time
from sync.errors import CompanyLocked
from sync.store import MirrorStore
store = MirrorStore.open(sys.argv[1])
try:
    with store.company_lock("42"):
        print("held", flush=True)
except CompanyLocked:
    print("refused", flush=True)
sys.stdin.readline()
with store.company_lock("42"):
    print("held", flush=True)
    time.sleep(120)
"""


def _read_line(child: subprocess.Popen[str], timeout: float = 30) -> str:
    assert child.stdout is not None
    ready, _, _ = io_select.select([child.stdout], [], [], timeout)
    assert ready, "the child process did not answer in time"
    return child.stdout.readline().strip()


def _acquire_within(store: MirrorStore, company_id: str, seconds: float) -> None:
    """PostgreSQL ends a dead client's session, and its locks, a moment after the socket closes."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with store.company_lock(company_id):
                return
        except CompanyLocked:
            assert time.monotonic() < deadline, "the dead holder's lock was never freed"
            time.sleep(0.1)


class TestCompanyLock:
    def test_a_second_holder_in_the_same_process_is_refused(
        self, db_url: str, store: MirrorStore
    ) -> None:
        """Neither the same store nor another store on the database can take a held lock."""
        other = MirrorStore.open(db_url)
        try:
            with store.company_lock("42"):
                with pytest.raises(CompanyLocked):
                    store.company_lock("42").__enter__()
                with pytest.raises(CompanyLocked), other.company_lock("42"):
                    pass
                with other.company_lock("7"):
                    pass
            with other.company_lock("42"):
                pass
        finally:
            other.close()

    def test_the_lock_is_released_when_the_holder_fails(self, store: MirrorStore) -> None:
        """An exception inside the locked block still frees the company."""
        with pytest.raises(RuntimeError), store.company_lock("42"):
            raise RuntimeError("pass failed")
        with store.company_lock("42"):
            pass

    def test_another_process_is_excluded_until_it_dies(
        self, db_url: str, store: MirrorStore
    ) -> None:
        """Processes exclude each other both ways, and kill -9 of the holder frees the lock."""
        with subprocess.Popen(
            [sys.executable, "-c", _HOLDER, db_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                with store.company_lock("42"):
                    assert _read_line(child) == "refused"
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                assert _read_line(child) == "held"
                with pytest.raises(CompanyLocked), store.company_lock("42"):
                    pass
                child.kill()
                child.wait()
                _acquire_within(store, "42", seconds=10)
            finally:
                child.kill()

    def test_every_path_to_one_sqlite_file_shares_its_locks(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A symlink, a relative path and an absolute one to the same file exclude each other:
        in this process, and for `once` in another (exit 7)."""
        (tmp_path / "real").mkdir()
        real = tmp_path / "real" / "mirror.db"
        (tmp_path / "link.db").symlink_to(real)
        monkeypatch.chdir(tmp_path)
        holder = MirrorStore.open(f"sqlite:///{real}")
        others = [
            MirrorStore.open(url) for url in ("sqlite:///link.db", "sqlite:///./real/mirror.db")
        ]
        try:
            with holder.company_lock("1"):
                for other in others:
                    with pytest.raises(CompanyLocked), other.company_lock("1"):
                        pass
                config = tmp_path / "sync.toml"
                config.write_text(
                    '[api]\nbase_url = "http://127.0.0.1:9"\ntoken = "sandbox-token"\n'
                    'companies = ["1"]\n[database]\nurl = "sqlite:///link.db"\n'
                )
                done = subprocess.run(
                    [sys.executable, "-m", "sync", "--config", str(config), "once"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                    env={k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")},
                )
                assert done.returncode == 7, done.stderr
            for other in others:
                with other.company_lock("1"):
                    pass
        finally:
            holder.close()
            for other in others:
                other.close()

    def test_in_memory_sqlite_locks_within_the_process(self) -> None:
        """An in-memory mirror still excludes a second holder of the same company."""
        memory = MirrorStore.open("sqlite://")
        try:
            with memory.company_lock("42"), pytest.raises(CompanyLocked):
                memory.company_lock("42").__enter__()
            with memory.company_lock("42"):
                pass
        finally:
            memory.close()

    @pytest.mark.postgres
    def test_a_lost_lock_moves_no_cursor_and_marks_nothing(
        self, pg_url: str, pg_admin_dsn: str
    ) -> None:
        """If the session holding the lock is ended (a restart, a killed backend), another
        process may take the lock: the cursor and deletion marks then refuse to commit."""
        store, other = MirrorStore.open(pg_url), MirrorStore.open(pg_url)
        store.write_page("42", [_row(1)], [], None, T0)
        try:
            with store.company_lock("42"):
                store.advance_cursor("42", T0, T0)  # held: goes through
                end_lock_sessions(pg_admin_dsn, pg_url)
                with other.company_lock("42"):  # someone else can have it now
                    pass
                later = T0 + timedelta(hours=1)
                with pytest.raises(DatabaseError, match="Lost the lock on company 42"):
                    store.advance_cursor("42", later, later)
                with pytest.raises(DatabaseError, match="Lost the lock"):
                    store.mark_deleted("42", {1}, later, hard=False)
            assert store.read_state("42").cursor == T0
            assert store.status(["42"])[0].deleted == 0
            with store.company_lock("42"):  # a new pass takes the lock afresh
                store.advance_cursor("42", T0 + timedelta(hours=1), T0)
        finally:
            store.close()
            other.close()

    @pytest.mark.postgres
    @pytest.mark.parametrize("changed", ["started", "pid"])
    def test_a_session_that_is_not_the_holder_does_not_pass_the_check(
        self, pg_url: str, changed: str
    ) -> None:
        """The check knows the holding session by pid and start time: a session with the same
        pid but another start (a reused pid) does not count as holding the lock."""
        store = MirrorStore.open(pg_url)
        store.write_page("42", [_row(1)], [], None, T0)
        try:
            with store.company_lock("42"):
                held: Any = store._lock_checks["42"]
                store.advance_cursor("42", T0, T0)  # the real holder passes
                if changed == "started":
                    other = replace(held, started=held.started - timedelta(microseconds=1))
                else:
                    other = replace(held, pid=held.pid + 1)
                store._lock_checks["42"] = other
                later = T0 + timedelta(hours=1)
                with pytest.raises(DatabaseError, match="Lost the lock on company 42"):
                    store.advance_cursor("42", later, later)
                with pytest.raises(DatabaseError, match="Lost the lock"):
                    store.mark_deleted("42", {1}, later, hard=False)
                store._lock_checks["42"] = held
            assert store.read_state("42").cursor == T0
            assert store.status(["42"])[0].deleted == 0
        finally:
            store.close()


class TestReconcile:
    def test_soft_delete_marks_only_the_given_live_rows(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Soft deletion stamps deleted_at once, and live_ids stops listing those rows."""
        store.write_page("42", [_row(i) for i in (1, 2, 3)], [], None, T0)
        store.write_page("7", [_row(1)], [], None, T0)
        gone = T0 + timedelta(hours=1)
        assert store.mark_deleted("42", {1, 2, 99}, gone, hard=False) == 2
        assert store.mark_deleted("42", {1}, gone + timedelta(hours=1), hard=False) == 0
        assert store.live_ids("42") == {3}
        assert store.live_ids("7") == {1}
        assert _contacts(raw)[1].deleted_at == gone

    def test_hard_delete_removes_the_rows(self, store: MirrorStore, raw: Engine) -> None:
        """Hard deletion removes the rows themselves, of that company only."""
        store.write_page("42", [_row(i) for i in (1, 2, 3)], [], None, T0)
        store.write_page("7", [_row(1)], [], None, T0)
        assert store.mark_deleted("42", {1, 3}, T0, hard=True) == 2
        assert list(_contacts(raw)) == [2]
        assert list(_contacts(raw, "7")) == [1]

    def test_undelete_clears_deleted_at(self, store: MirrorStore) -> None:
        """A row found upstream again is live again; live rows are not counted."""
        store.write_page("42", [_row(i) for i in (1, 2)], [], None, T0)
        store.mark_deleted("42", {1}, T0, hard=False)
        assert store.undelete("42", {1, 2}) == 1
        assert store.live_ids("42") == {1, 2}

    def test_versions_are_one_view_of_live_and_deleted_rows(self, store: MirrorStore) -> None:
        """versions() gives each row's updated_at, client and mark, all or filtered by the mark."""
        later = T0 + timedelta(hours=1)
        store.write_page("42", [_row(1, client_id=3), _row(2, later), _row(3)], [], None, T0)
        store.write_page("7", [_row(9)], [], None, T0)
        store.mark_deleted("42", {3}, T0, hard=False)
        assert store.versions("42") == {
            1: MirrorVersion(T0, 3, False),
            2: MirrorVersion(later, None, False),
            3: MirrorVersion(T0, None, True),
        }
        assert set(store.versions("42", deleted=True)) == {3}
        assert set(store.versions("42", deleted=False)) == store.live_ids("42") == {1, 2}

    def test_the_last_reconcile_is_kept_for_status(self, store: MirrorStore) -> None:
        """record_reconcile keeps the summary and leaves the cursor and the last pass alone."""
        store.advance_cursor("42", T0, T0, summary={"pages": 1})
        store.record_reconcile("42", {"refused": True, "missing": 9})
        status = store.status(["42"])[0]
        assert status.last_reconcile == {"refused": True, "missing": 9}
        assert (status.cursor, status.last_pass) == (T0, {"pages": 1})

    def test_large_id_sets_are_handled_in_batches(self, store: MirrorStore) -> None:
        """Thousands of ids, beyond one statement's parameters, are all marked in one call."""
        for page in range(12):
            store.write_page("42", [_row(page * 100 + i) for i in range(1, 101)], [], None, T0)
        assert store.mark_deleted("42", set(range(1, 1201)), T0, hard=False) == 1200
        assert store.live_ids("42") == set()
        assert store.undelete("42", set(range(1, 1201))) == 1200


class TestStatus:
    def test_counts_and_order(self, store: MirrorStore) -> None:
        """Configured companies come first, in order, even empty; others found follow, sorted."""
        store.write_page("a", [_row(1), _row(2), _row(3)], [], None, T0)
        store.mark_deleted("a", {3}, T0, hard=False)
        store.write_page("z", [_row(1)], [], None, T0)
        store.write_page("m", [], [RejectedRow({}, "id is missing", None)], None, T0)
        store.advance_cursor("a", T0, T0)
        store.record_failure("b", "The API rejected the token.", T0)
        rows = store.status(["b", "a", "empty"])
        assert [
            (s.company_id, s.contacts, s.deleted, s.quarantined, s.cursor, s.last_error)
            for s in rows
        ] == [
            ("b", 0, 0, 0, None, "The API rejected the token."),
            ("a", 2, 1, 0, T0, None),
            ("empty", 0, 0, 0, None, None),
            ("m", 0, 0, 1, None, None),
            ("z", 1, 0, 0, None, None),
        ]
        assert rows[1].last_success_at == T0
        assert rows[0].last_error_at == T0


class TestDatabaseErrors:
    def test_a_read_only_database_says_so(self, pg_url: str) -> None:
        """A write refused as read-only names that cause and how to fix it."""
        MirrorStore.open(pg_url).close()
        name = make_url(pg_url).database
        engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(
                    text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
                )
        finally:
            engine.dispose()
        store = MirrorStore.open(pg_url)
        try:
            with pytest.raises(DatabaseError, match="is read-only") as caught:
                store.write_page("42", [_row(1)], [], None, T0)
            assert "give contacts-sync write access" in caught.value.message
        finally:
            store.close()


_utc_moments = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
_zoned_moments = st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m))),
)


class TestSqliteTimestampText:
    """The SQLite upsert writes a page's times a column at a time; the text must be exactly
    what one-at-a-time formatting gives, or text comparisons in the mirror would go wrong."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.none() | _utc_moments | st.builds(lambda m: m.replace(microsecond=0), _utc_moments)
        )
    )
    def test_a_utc_column_matches_one_at_a_time(self, values: list[datetime | None]) -> None:
        expected = [None if value is None else sqlite_timestamp(value) for value in values]
        assert sqlite_timestamps(values) == expected

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.none() | _utc_moments | _zoned_moments, min_size=1))
    def test_any_zone_is_written_as_utc(self, values: list[datetime | None]) -> None:
        expected = [None if value is None else sqlite_timestamp(value) for value in values]
        assert sqlite_timestamps(values) == expected

    def test_a_naive_time_is_refused(self) -> None:
        with pytest.raises(ValueError, match="naive"):
            sqlite_timestamps([T0, datetime(2025, 1, 1)])
