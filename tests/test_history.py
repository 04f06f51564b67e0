"""sync.history: contacts_history keeps every version the mirror saw, and never disagrees with it.

Every test runs on a SQLite file and on PostgreSQL. The store's writes are exercised directly
where a case needs exact timestamps, and through real passes against the sandbox otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    engine_for,
    install_failing_trigger,
    make_settings,
    mirror_rows,
    run_pass,
    upstream_rows,
)
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.exc import IntegrityError

from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import DatabaseError
from sync.models import Contact, ContactVersion, SyncState, table_of
from sync.rows import CONTACT_FIELDS, TEXT_FIELDS, ContactRow
from sync.sandbox import SandboxData, SandboxServer
from sync.store import MirrorStore

T0 = datetime(2025, 3, 4, 10, 0, 0, 123000, tzinfo=UTC)
_HISTORY = table_of(ContactVersion)
_MIRROR = table_of(Contact)
_VALUES = (*CONTACT_FIELDS, "extra")
README = Path(__file__).resolve().parent.parent / "README.md"


def _row(contact_id: int, updated_at: datetime = T0, **fields: Any) -> ContactRow:
    values: dict[str, Any] = dict.fromkeys(TEXT_FIELDS)
    values.update(created_at=None, client_id=None, extra=None)
    values.update(fields)
    return ContactRow(id=contact_id, updated_at=updated_at, **values)


@pytest.fixture
def raw(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def store(db_url: str, raw: Engine) -> Iterator[MirrorStore]:
    """A store keeping history for company 42, as a pass with sync.history on makes it."""
    opened = MirrorStore.open(db_url)
    opened.keep_history("42", on=True, at=T0)
    try:
        yield opened
    finally:
        opened.close()


def versions(raw: Engine, company_id: str = "42") -> dict[int, list[Any]]:
    """The company's history: per contact id, its versions in order."""
    with raw.connect() as conn:
        rows = conn.execute(
            select(_HISTORY)
            .where(_HISTORY.c.company_id == company_id)
            .order_by(_HISTORY.c.id, _HISTORY.c.version)
        ).all()
    out: dict[int, list[Any]] = {}
    for row in rows:
        out.setdefault(row.id, []).append(row)
    return out


def assert_agrees(raw: Engine, company_id: str = "42") -> None:
    """The invariant: a live mirror row is exactly its one open version; a deleted or removed
    one has none, and its last version was closed by the deletion; versions never overlap."""
    history = versions(raw, company_id)
    with raw.connect() as conn:
        mirror = {
            row.id: row
            for row in conn.execute(select(_MIRROR).where(_MIRROR.c.company_id == company_id))
        }
    for contact_id, row in mirror.items():
        own = history.get(contact_id, [])
        assert own, f"contact {contact_id} has no history"
        last = own[-1]
        if row.deleted_at is None:
            assert last.valid_to is None, f"contact {contact_id}: live but no open version"
            assert [getattr(last, n) for n in _VALUES] == [getattr(row, n) for n in _VALUES]
        else:
            assert last.valid_to is not None, f"contact {contact_id}: deleted but open"
            assert last.closed_by_deletion
    for contact_id, own in history.items():
        assert [v.version for v in own] == list(range(1, len(own) + 1))
        assert all(v.valid_to is not None for v in own[:-1]), f"{contact_id}: two open"
        for before, after in pairwise(own):
            assert before.valid_to <= after.valid_from, f"contact {contact_id} overlaps"
        if contact_id not in mirror:
            assert own[-1].valid_to is not None
            assert own[-1].closed_by_deletion


class TestVersionsFromPages:
    def test_a_newer_version_closes_the_open_one_at_its_updated_at(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A change ends the stored version where the next begins: at the new updated_at."""
        later = T0 + timedelta(minutes=5)
        store.write_page("42", [_row(1, email="a@x"), _row(2)], [], None, T0)
        store.write_page("42", [_row(1, later, email="b@x")], [], None, later)
        history = versions(raw)
        assert [(v.email, v.valid_from, v.valid_to) for v in history[1]] == [
            ("a@x", T0, later),
            ("b@x", later, None),
        ]
        assert not history[1][0].closed_by_deletion
        assert len(history[2]) == 1
        assert_agrees(raw)

    def test_re_reads_and_older_versions_add_nothing(self, store: MirrorStore, raw: Engine) -> None:
        """A page read again, or an older version after a newer one, leaves the history as is."""
        later = T0 + timedelta(minutes=5)
        page = [_row(n, later, email=f"{n}@x") for n in range(1, 6)]
        store.write_page("42", page, [], None, later)
        store.write_page("42", page, [], None, later + timedelta(seconds=1))
        store.write_page("42", [_row(1, T0, email="old@x")], [], None, later)
        history = versions(raw)
        assert [len(own) for own in history.values()] == [1] * 5
        assert history[1][0].email == "1@x"
        assert_agrees(raw)

    def test_the_same_updated_at_with_other_fields_corrects_the_open_version(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A version is known by its updated_at: fields served differently under it replace the
        open version's, as they replace the mirror's, and no version is added."""
        store.write_page("42", [_row(1, email="first@x", extra={"a": 1})], [], None, T0)
        store.write_page("42", [_row(1, email="second@x", extra={"a": 2})], [], None, T0)
        (only,) = versions(raw)[1]
        assert (only.email, only.extra, only.valid_from) == ("second@x", {"a": 2}, T0)
        assert_agrees(raw)

    def test_a_page_over_several_statements_keeps_every_version(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """History follows pages of any size, not only the usual 100 rows."""
        store.write_page("42", [_row(n) for n in range(1, 1202)], [], None, T0)
        assert len(versions(raw)) == 1201
        assert_agrees(raw)

    def test_with_history_off_nothing_is_written(self, db_url: str, raw: Engine) -> None:
        """The default: the mirror is written, contacts_history stays empty."""
        store = MirrorStore.open(db_url)
        try:
            store.write_page("42", [_row(1)], [], None, T0)
        finally:
            store.close()
        assert versions(raw) == {}
        assert set(mirror_rows(str(raw.url), "42")) == {1}


class TestDeletions:
    def test_a_soft_deletion_closes_and_a_return_opens_a_new_version(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Marking ends the open version at the deletion; a row seen again unchanged opens a
        new version from when it was seen, one seen with a newer version from that version."""
        gone, back, newer = (
            T0 + timedelta(hours=1),
            T0 + timedelta(hours=2),
            T0 + timedelta(hours=3),
        )
        store.write_page("42", [_row(1), _row(2)], [], None, T0)
        store.mark_deleted("42", [1, 2], gone, hard=False)
        history = versions(raw)
        assert [(v.valid_to, v.closed_by_deletion) for v in history[1]] == [(gone, True)]
        assert_agrees(raw)
        store.undelete("42", [1], back)
        store.write_page("42", [_row(2, newer, email="new@x")], [], None, newer)
        history = versions(raw)
        assert [(v.valid_from, v.valid_to) for v in history[1]] == [(T0, gone), (back, None)]
        assert [(v.valid_from, v.valid_to, v.email) for v in history[2]] == [
            (T0, gone, None),
            (newer, None, "new@x"),
        ]
        assert_agrees(raw)

    def test_marking_twice_or_undeleting_a_live_row_changes_nothing(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """Reconcile's repeated marks and un-marks are as idempotent as the pages."""
        store.write_page("42", [_row(1), _row(2)], [], None, T0)
        store.undelete("42", [1, 2], T0 + timedelta(hours=1))
        store.mark_deleted("42", [1], T0 + timedelta(hours=1), hard=False)
        store.mark_deleted("42", [1], T0 + timedelta(hours=2), hard=False)
        history = versions(raw)
        assert [(len(history[1]), len(history[2]))] == [(1, 1)]
        assert history[1][0].valid_to == T0 + timedelta(hours=1)

    def test_a_hard_delete_closes_the_version(self, store: MirrorStore, raw: Engine) -> None:
        """A removed row keeps its history, ended by the deletion."""
        gone = T0 + timedelta(hours=1)
        store.write_page("42", [_row(1), _row(2)], [], None, T0)
        store.mark_deleted("42", [1], gone, hard=True)
        history = versions(raw)
        assert [(v.valid_to, v.closed_by_deletion) for v in history[1]] == [(gone, True)]
        assert history[2][0].valid_to is None
        assert_agrees(raw)

    def test_a_server_clock_ahead_never_ends_a_version_before_it_began(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """A deletion found 'before' the version's updated_at ends it where it began."""
        ahead = T0 + timedelta(hours=1)
        store.write_page("42", [_row(1, ahead)], [], None, T0)
        store.mark_deleted("42", [1], T0, hard=False)
        (only,) = versions(raw)[1]
        assert only.valid_from == only.valid_to == ahead


class TestSchema:
    def test_two_open_versions_of_one_contact_are_refused(
        self, store: MirrorStore, raw: Engine
    ) -> None:
        """The partial unique index enforces one open version per contact in the database."""
        store.write_page("42", [_row(1)], [], None, T0)
        second = {
            "company_id": "42",
            "id": 1,
            "version": 2,
            "updated_at": T0,
            "valid_from": T0 + timedelta(seconds=1),
            "closed_by_deletion": False,
        }
        with pytest.raises(IntegrityError), raw.begin() as conn:
            conn.execute(insert(_HISTORY), second)
        with raw.begin() as conn:
            conn.execute(insert(_HISTORY), {**second, "valid_to": T0 + timedelta(seconds=2)})

    def test_the_table_and_every_column_say_what_they_mean(self) -> None:
        """Comments travel with the schema (PostgreSQL COMMENT ON, documentation)."""
        assert _HISTORY.comment
        assert all(column.comment for column in _HISTORY.columns)
        assert table_of(SyncState).c.history_since.comment

    def test_history_is_off_by_default_and_a_setting_turns_it_on(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """sync.history is a boolean key of SyncSettings, false unless set."""
        assert make_settings(sandbox, db_url).sync.history is False
        assert make_settings(sandbox, db_url, sync={"history": True}).sync.history is True


def _with_history(settings: Settings, on: bool = True) -> Settings:
    return settings.model_copy(update={"sync": settings.sync.model_copy(update={"history": on})})


@pytest.fixture
def upstream() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData.generate(("1",), 150, seed=5)) as server:
        yield server


class TestPasses:
    def test_versions_open_and_close_across_passes(
        self, upstream: SandboxServer, db_url: str, raw: Engine
    ) -> None:
        """Each pass adds the versions it read; re-reads (lookback, a backfill) add none."""
        settings = _with_history(make_settings(upstream, db_url))
        run_pass(settings)
        changed = upstream.data.update("1", count=4)
        added = upstream.data.insert("1", 2)
        run_pass(settings)
        run_pass(settings, backfill=True)
        history = versions(raw, "1")
        assert len(history) == 152
        assert {cid for cid, own in history.items() if len(own) == 2} == set(changed)
        assert all(len(history[cid]) == 1 for cid in added)
        open_now = {cid: own[-1] for cid, own in history.items()}
        assert {cid: v.email for cid, v in open_now.items()} == {
            cid: row["email"] for cid, row in upstream_rows(upstream).items()
        }
        assert_agrees(raw, "1")

    def test_reconcile_closes_and_a_return_reopens(
        self, upstream: SandboxServer, db_url: str, raw: Engine
    ) -> None:
        """A contact that vanished is closed by deletion; one wrongly marked and seen again by
        reconcile gets a new open version; with deletes = "hard" the version is closed too."""
        settings = _with_history(make_settings(upstream, db_url))
        run_pass(settings)
        gone = upstream.data.delete("1", count=2)
        store = MirrorStore.open(db_url)
        try:
            store.keep_history("1", on=True, at=T0)
            store.mark_deleted("1", [150], datetime.now(UTC), hard=False)
        finally:
            store.close()
        with_reconcile(settings)
        history = versions(raw, "1")
        assert all(history[cid][-1].closed_by_deletion for cid in gone)
        assert [v.closed_by_deletion for v in history[150]] == [True, False]
        assert history[150][1].valid_from >= history[150][0].valid_to
        assert_agrees(raw, "1")
        hard = settings.model_copy(
            update={"sync": settings.sync.model_copy(update={"deletes": "hard"})}
        )
        removed = upstream.data.delete("1", count=1)
        with_reconcile(hard)
        assert removed[0] not in mirror_rows(db_url, live_only=False)
        assert versions(raw, "1")[removed[0]][-1].closed_by_deletion
        assert_agrees(raw, "1")

    def test_switching_on_seeds_once_and_switching_off_leaves_the_table(
        self, upstream: SandboxServer, db_url: str, raw: Engine
    ) -> None:
        """The first pass with history on seeds it from the mirror (deleted rows closed); off
        leaves it alone; on again catches up with what changed meanwhile."""
        off = make_settings(upstream, db_url)
        run_pass(off)
        upstream.data.delete("1", [7])
        with_reconcile(off)
        run_pass(_with_history(off))
        seeded = versions(raw, "1")
        assert len(seeded) == 150
        assert all(len(own) == 1 for own in seeded.values())
        assert seeded[7][0].closed_by_deletion
        assert all(own[0].valid_from == own[0].updated_at for own in seeded.values())
        assert_agrees(raw, "1")
        run_pass(_with_history(off))
        assert versions(raw, "1") == seeded
        changed = upstream.data.update("1", [1, 2])
        run_pass(off)
        assert versions(raw, "1") == seeded
        run_pass(_with_history(off))
        caught_up = versions(raw, "1")
        assert {cid for cid, own in caught_up.items() if len(own) == 2} == set(changed)
        assert_agrees(raw, "1")

    def test_a_pass_failing_mid_way_leaves_mirror_and_history_agreeing(
        self, upstream: SandboxServer, db_url: str, raw: Engine
    ) -> None:
        """A page rolled back leaves no history row; the rerun completes both."""
        settings = _with_history(make_settings(upstream, db_url))
        MirrorStore.open(db_url).close()
        install_failing_trigger(raw, "contacts_history", "NEW.id = 120")
        with pytest.raises(DatabaseError, match="forced failure"):
            run_pass(settings, backfill=True)
        stored = mirror_rows(db_url)
        assert 120 not in stored
        assert set(versions(raw, "1")) == set(stored)
        assert_agrees(raw, "1")
        on_table = " ON contacts_history" if raw.dialect.name == "postgresql" else ""
        with raw.begin() as conn:
            conn.execute(text(f"DROP TRIGGER forced{on_table}"))
        run_pass(settings, backfill=True)
        assert len(versions(raw, "1")) == 150
        assert_agrees(raw, "1")


def with_reconcile(settings: Settings) -> None:
    with engine_for(settings) as engine:
        engine.reconcile_company("1", force=True)


def history_queries() -> list[str]:
    """The statements of the SQL blocks in the README's History subsection, verbatim."""
    section = README.read_text(encoding="utf-8").split("\n### History\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)
    return [s.strip() for block in blocks for s in block.split(";") if s.strip()]


class _Clock:
    """One settable 'now' for the sandbox's stamps and the engine's sync and deletion times."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _moment(day: str) -> datetime:
    return datetime.fromisoformat(f"2025-{day}").replace(tzinfo=UTC)


def _change_email(data: SandboxData, contact_id: int) -> None:
    """Updates change one random field: update until the email is the one that changed."""

    def email() -> Any:
        return (data.get("1", contact_id) or {}).get("email")

    before = email()
    data.update("1", [contact_id])
    while email() == before:
        data.update("1", [contact_id])


def _emails(server: SandboxServer) -> dict[int, Any]:
    return {contact_id: row["email"] for contact_id, row in upstream_rows(server).items()}


class TestAsOfQueries:
    def test_the_readme_documents_the_three_queries(self) -> None:
        """State at a moment, what changed in a period, how often a field changes."""
        assert len(history_queries()) == 3

    def test_the_readme_queries_answer_from_a_history_built_by_passes(self, db_url: str) -> None:
        """Passes, a reconcile, a wrong mark undone and upstream changes at known moments in
        2025; each README query, run verbatim, gives what happened upstream."""
        clock = _Clock(_moment("01-01T00:00"))
        data = SandboxData.generate(("1",), 40, seed=3, clock=clock)
        emails = []
        with SandboxServer(data) as server:
            settings = _with_history(make_settings(server, db_url))
            store = MirrorStore.open(db_url)
            engine = SyncEngine.from_settings(settings, store, clock=clock)
            try:

                def sync_at(moment: str) -> None:
                    clock.at = _moment(moment)
                    engine.sync_company("1")
                    emails.append(_emails(server))

                sync_at("01-01T01:00")
                clock.at = _moment("02-10T12:00")
                _change_email(data, 1)
                data.update("1", [2, 3])
                (added,) = data.insert("1")
                sync_at("02-10T13:00")
                data.delete("1", [5])
                clock.at = _moment("02-20T12:00")
                engine.reconcile_company("1")
                store.mark_deleted("1", [6], _moment("02-22T12:00"), hard=False)
                clock.at = _moment("02-25T12:00")
                engine.reconcile_company("1")
                on_march_1 = _emails(server)
                clock.at = _moment("03-10T12:00")
                _change_email(data, 1)
                data.update("1", [4])
                sync_at("03-10T13:00")
            finally:
                engine.close()
                store.close()
        db = create_engine(db_url)
        try:
            with db.connect() as conn:
                state, changes, email_changes = (
                    conn.execute(text(query)).all() for query in history_queries()
                )
        finally:
            db.dispose()
        assert {row.id: row.email for row in state} == on_march_1
        assert {row.id: row.version for row in state if row.version > 1} == {1: 2, 2: 2, 3: 2, 6: 2}
        assert sorted((row.id, row.version, row.kind) for row in changes) == [
            (1, 2, "changed"),
            (2, 2, "changed"),
            (3, 2, "changed"),
            (5, 1, "deleted"),
            (6, 1, "deleted"),
            (6, 2, "restored"),
            (added, 1, "added"),
        ]
        moments = [_as_utc(row.happened_at) for row in changes]
        assert moments == sorted(moments)
        assert moments[-3:] == [_moment(d) for d in ("02-20T12:00", "02-22T12:00", "02-25T12:00")]
        expected: dict[int, int] = {}
        for before, after in pairwise(emails):
            for contact_id in before.keys() & after.keys():
                if before[contact_id] != after[contact_id]:
                    expected[contact_id] = expected.get(contact_id, 0) + 1
        assert expected[1] == 2
        assert {row.id: row.email_changes for row in email_changes} == expected
        assert email_changes[0].id == 1


def _as_utc(value: datetime | str) -> datetime:
    """SQLite hands timestamps back as their UTC text, PostgreSQL as aware datetimes."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value.astimezone(UTC)
