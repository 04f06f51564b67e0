"""The mirror database: contacts upserts, cursor and checkpoint, per-company locks.

Every write is one transaction, and the cursor moves only after the rows it covers are committed.
What differs between SQLite and PostgreSQL lives behind `sync.backends.Backend`, so the engine
talks to `MirrorStore` alone and never learns the dialect.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from time import monotonic
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Text,
    bindparam,
    case,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.sql.expression import ColumnElement, Executable

from sync.backends import Backend, open_backend
from sync.errors import DatabaseError
from sync.history import follow_mirror, refresh_statistics, rows_before_statistics
from sync.models import (
    VERSION_TABLE,
    CheckpointRecord,
    Contact,
    QuarantineEntry,
    ScheduleEntry,
    SyncState,
    table_of,
)
from sync.rows import ContactRow, RejectedRow, RowKey

__all__ = [
    "Checkpoint",
    "CompanyHealth",
    "CompanyState",
    "CompanyStatus",
    "MirrorStore",
    "MirrorVersion",
    "PageWriter",
    "schema_head",
]

_CONTACTS = table_of(Contact)
_STATE = table_of(SyncState)
_QUARANTINE = table_of(QuarantineEntry)
_CHECKPOINTS = table_of(CheckpointRecord)
_SCHEDULE = table_of(ScheduleEntry)

_ID_BATCH = 500
"""Ids per statement in mark_deleted/undelete: far below either database's parameter limit."""


@dataclass(frozen=True)
class Checkpoint:
    """Where an unfinished pass stands; saved with each commit so a killed pass resumes."""

    mode: str
    filter_since: datetime | None
    next_offset: int
    anchors: list[RowKey]
    high_water: datetime | None
    started_at: datetime
    pages: int
    rows: int


@dataclass(frozen=True)
class CompanyState:
    company_id: str
    cursor: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None


@dataclass(frozen=True)
class CompanyHealth:
    """What monitoring reads of a company, the same whichever replica runs its passes."""

    company_id: str
    cursor: datetime | None
    last_success_at: datetime | None
    last_pass_started_at: datetime | None
    failures_in_row: int
    locked_out_since: datetime | None
    quarantined: int


@dataclass(frozen=True)
class CompanyStatus:
    company_id: str
    cursor: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    contacts: int
    deleted: int
    quarantined: int
    last_pass: dict[str, Any] | None = None
    """The last completed pass's summary (the `pass.finished` event), for `status --json`."""
    last_reconcile: dict[str, Any] | None = None
    """The last reconcile's summary (the `reconcile.finished` event), refusals included."""


class MirrorVersion(NamedTuple):
    """What reconcile needs of a mirror row: its version, its client and whether it is marked."""

    updated_at: datetime
    client_id: int | None
    deleted: bool


class PageWriter:
    """One pass's pages, written into an open transaction that `commit()` ends.

    Committing is most of what a page costs on SQLite (every index page it touched is written
    out again), so the engine commits a group of pages at once: when the next page has not
    arrived yet, when the transaction has been open for a while, and at the end. It is never
    left open while waiting on upstream. Each commit saves the checkpoint of its last page
    with it, so a killed pass resumes right after what was committed.
    """

    def __init__(self, store: MirrorStore, company_id: str) -> None:
        self._store = store
        self._company_id = company_id
        self._transaction: ExitStack | None = None
        self._conn: Connection | None = None
        self._checkpoint: tuple[Checkpoint, datetime] | None = None
        self._opened = 0.0
        self._quarantined: set[int] | None = None
        """Ids this company has in quarantine, read once a pass: a valid version clears them."""
        self.commits = 0

    @property
    def open_s(self) -> float:
        """How long the current transaction has been open; 0 when none is."""
        return 0.0 if self._transaction is None else monotonic() - self._opened

    def write(
        self,
        rows: Sequence[ContactRow],
        rejected: Sequence[RejectedRow],
        checkpoint: Checkpoint | None,
        synced_at: datetime,
    ) -> int:
        """Add a page to the open transaction; returns the rows inserted or changed."""
        synced_at = _utc(synced_at)
        if self._conn is None:
            self._transaction = ExitStack()
            self._conn = self._transaction.enter_context(self._store._backend.write())
            self._opened = monotonic()
        if checkpoint is not None:
            self._checkpoint = (checkpoint, synced_at)
        try:
            if self._quarantined is None:
                self._quarantined = self._store._quarantined_ids(self._conn, self._company_id)
            return self._store._write_rows(
                self._conn,
                self._company_id,
                rows,
                rejected,
                synced_at,
                quarantined=self._quarantined,
            )
        except BaseException as exc:
            self._abort(exc)
            raise

    def commit(self) -> None:
        """Commit what was written, with the checkpoint of the last page that had one."""
        transaction, conn, pending = self._transaction, self._conn, self._checkpoint
        if transaction is None or conn is None:
            return
        self._transaction = self._conn = self._checkpoint = None
        with transaction:
            if pending is not None:
                self._store._save_checkpoint(conn, self._company_id, *pending)
        self.commits += 1

    def rollback(self) -> None:
        """Drop what was written since the last commit."""
        self._abort(_RolledBack())

    def _abort(self, exc: BaseException) -> None:
        """End the open transaction with `exc` thrown into it: it rolls back, and a driver
        error comes out as the DatabaseError the backend makes of it."""
        transaction = self._transaction
        self._transaction = self._conn = self._checkpoint = self._quarantined = None
        if transaction is not None:
            transaction.__exit__(type(exc), exc, exc.__traceback__)


class _RolledBack(Exception):
    """Thrown into an open transaction to end it with a rollback."""


class MirrorStore:
    """The mirror database, as the engine uses it.

    - `open(url)`: connect and bring the schema to head; `close()` when done.
    - `company_lock(company)`: hold it for a whole pass; raises CompanyLocked if taken elsewhere.
    - `read_state(company)`: the cursor to filter from; `load_checkpoint(company)` to resume.
    - `write_page(company, rows, rejected, checkpoint, synced_at)`: one page, one transaction;
      `page_writer(company)`: a pass's pages, committed in groups.
    - `advance_cursor(...)` after a complete pass, `record_failure(...)` after a failed one.
    - `versions`, `mark_deleted`, `undelete`, `record_reconcile`: reconcile; `status`: the
      status command.

    Every database problem surfaces as DatabaseError with a sentence saying what to do.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock_checks: dict[str, Callable[[Connection], None]] = {}
        """Per company whose lock this store holds: raises if it was lost (see `_still_locked`)."""
        # Every pass runs these, a quiet one little else: built once, they are only executed.
        company = bindparam("company_id", type_=Text())
        self._select_state = select(_STATE).where(_STATE.c.company_id == company)
        self._select_checkpoint = select(_CHECKPOINTS).where(_CHECKPOINTS.c.company_id == company)
        self._drop_checkpoint = delete(_CHECKPOINTS).where(_CHECKPOINTS.c.company_id == company)
        self._advance = _advance_statement(backend)
        self._due = (
            select(_SCHEDULE.c.company_id, _SCHEDULE.c.job, _SCHEDULE.c.due_at)
            .where(
                _SCHEDULE.c.due_at <= bindparam("now", type_=_SCHEDULE.c.due_at.type),
                backend.one_of(_SCHEDULE.c.job, "jobs"),
                backend.one_of(_SCHEDULE.c.company_id, "companies"),
            )
            .order_by(_SCHEDULE.c.due_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
        self._move_due = (
            update(_SCHEDULE)
            .where(
                _SCHEDULE.c.company_id == bindparam("company"),
                _SCHEDULE.c.job == bindparam("kind"),
            )
            .values(
                due_at=bindparam("due", type_=_SCHEDULE.c.due_at.type),
                claimed_by=bindparam("owner"),
                claimed_at=bindparam("at", type_=_SCHEDULE.c.claimed_at.type),
            )
        )
        self._history: set[str] = set()
        """Companies whose writes also keep contacts_history (see `keep_history`)."""
        self._history_checked: dict[str, bool] = {}
        """Per company, the `sync.history` setting the mirror was last found or made to match."""
        self._rows_before_statistics: float | None = None
        """Rows to write with history on before the next ANALYZE; None: ask the database."""

    @classmethod
    def open(cls, url: str, *, connections: int = 5) -> MirrorStore:
        """Connect, create or upgrade the schema through Alembic, and return a ready store
        (`connections`: how many the pool keeps)."""
        store = cls(open_backend(url, connections=connections))
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def dialect(self) -> str:
        """Which database this is: "sqlite" or "postgresql"."""
        return self._backend.name

    def write_page(
        self,
        company_id: str,
        rows: Sequence[ContactRow],
        rejected: Sequence[RejectedRow],
        checkpoint: Checkpoint | None,
        synced_at: datetime,
    ) -> int:
        """Upsert a page, quarantine its rejects and save the checkpoint, all or nothing.

        Returns how many rows were inserted or changed; a row older than the stored one is skipped.
        """
        with self.page_writer(company_id) as writer:
            return writer.write(rows, rejected, checkpoint, synced_at)

    @contextmanager
    def page_writer(self, company_id: str) -> Iterator[PageWriter]:
        """Pages of one pass, committed in groups; see PageWriter.

        Leaving the block commits what was written, unless a database error or an interrupt
        (not an upstream failure: pages already fetched are worth keeping) ended it.
        """
        writer = PageWriter(self, company_id)
        try:
            yield writer
        except DatabaseError:
            writer.rollback()
            raise
        except Exception:
            writer.commit()
            raise
        except BaseException:
            writer.rollback()
            raise
        writer.commit()

    def _write_rows(
        self,
        conn: Connection,
        company_id: str,
        rows: Sequence[ContactRow],
        rejected: Sequence[RejectedRow],
        synced_at: datetime,
        *,
        quarantined: set[int],
    ) -> int:
        """Upsert the rows and quarantine the rejects; `quarantined` (the company's quarantined
        ids) is kept up to date: an id served valid again leaves the quarantine."""
        written = 0
        if rows:
            written = self._backend.upsert_contacts(conn, company_id, rows, synced_at)
            if company_id in self._history:
                ids = [row.id for row in rows]
                for start in range(0, len(ids), _ID_BATCH):
                    follow_mirror(conn, company_id, ids[start : start + _ID_BATCH], synced_at)
                if self._rows_before_statistics is None:
                    self._rows_before_statistics = rows_before_statistics(conn)
                self._rows_before_statistics -= len(ids)
                if self._rows_before_statistics <= 0:
                    refresh_statistics(conn)
                    self._rows_before_statistics = None
            if quarantined:
                fixed = quarantined.intersection(row.id for row in rows)
                fixed.difference_update(item.contact_id for item in rejected)
                if fixed:
                    conn.execute(
                        delete(_QUARANTINE).where(
                            _QUARANTINE.c.company_id == company_id,
                            _QUARANTINE.c.contact_id.in_(sorted(fixed)),
                        )
                    )
                    quarantined.difference_update(fixed)
        if rejected:
            self._quarantine(conn, company_id, rejected, synced_at)
            quarantined.update(item.contact_id for item in rejected if item.contact_id is not None)
        return written

    def _quarantined_ids(self, conn: Connection, company_id: str) -> set[int]:
        ids = conn.execute(
            select(_QUARANTINE.c.contact_id).where(
                _QUARANTINE.c.company_id == company_id, _QUARANTINE.c.contact_id.is_not(None)
            )
        ).scalars()
        return set(ids)

    def _quarantine(
        self,
        conn: Connection,
        company_id: str,
        rejected: Sequence[RejectedRow],
        seen_at: datetime,
    ) -> None:
        """Keep one entry per bad row: by its id, or by its exact JSON when it has none.

        A bad row is read again by page overlaps, lookback windows and reruns; it must not
        be counted again each time.
        """
        entries = {
            (item.contact_id, json.dumps(item.payload, default=str)): item.reason
            for item in rejected
        }
        ids = sorted({contact_id for contact_id, _ in entries if contact_id is not None})
        anonymous = sorted({payload for contact_id, payload in entries if contact_id is None})
        mine = _QUARANTINE.c.company_id == company_id
        if ids:
            conn.execute(delete(_QUARANTINE).where(mine, _QUARANTINE.c.contact_id.in_(ids)))
        if anonymous:
            conn.execute(
                delete(_QUARANTINE).where(
                    mine,
                    _QUARANTINE.c.contact_id.is_(None),
                    _QUARANTINE.c.payload.in_(anonymous),
                )
            )
        conn.execute(
            _QUARANTINE.insert(),
            [
                {
                    "company_id": company_id,
                    "contact_id": contact_id,
                    "reason": reason,
                    "payload": payload,
                    "seen_at": seen_at,
                }
                for (contact_id, payload), reason in entries.items()
            ],
        )

    def keep_history(self, company_id: str, *, on: bool, at: datetime) -> None:
        """Whether this store's writes for the company keep contacts_history (`sync.history`).

        Called under the company's lock before a pass or a reconcile. The first time it is on,
        the history is seeded from the mirror (one open version per live row, a closed one per
        deleted row), or caught up with it if it was on before; switching off leaves the table
        alone. Costs one read when nothing changes.
        """
        if self._history_checked.get(company_id) == on:
            return  # this process saw it switched so already: nothing to read on each pass
        if on:
            self._history.add(company_id)
        else:
            self._history.discard(company_id)
        with self._backend.read() as conn:
            since = conn.execute(
                select(_STATE.c.history_since).where(_STATE.c.company_id == company_id)
            ).scalar()
        if on == (since is not None):
            self._history_checked[company_id] = on
            return
        insert = self._backend.insert(_STATE)
        statement = insert.values(
            company_id=company_id, history_since=_utc(at) if on else None
        ).on_conflict_do_update(
            index_elements=["company_id"],
            set_={"history_since": insert.excluded.history_since},
        )
        with self._backend.write() as conn:
            if on:
                follow_mirror(conn, company_id, None, _utc(at), gone=True)
                if self.dialect == "postgresql":
                    refresh_statistics(conn)
            conn.execute(statement)
            self._still_locked(conn, company_id)
        self._history_checked[company_id] = on

    def read_state(self, company_id: str) -> CompanyState:
        with self._backend.read() as conn:
            return self._state(conn, company_id)

    def pass_state(self, company_id: str) -> tuple[CompanyState, Checkpoint | None]:
        """What a pass starts from, its state and its checkpoint, in one transaction."""
        with self._backend.read() as conn:
            return self._state(conn, company_id), self._checkpoint(conn, company_id)

    def _state(self, conn: Connection, company_id: str) -> CompanyState:
        row = conn.execute(self._select_state, {"company_id": company_id}).first()
        if row is None:
            return CompanyState(company_id, None, None, None, None)
        return CompanyState(
            company_id, row.cursor, row.last_success_at, row.last_error, row.last_error_at
        )

    def advance_cursor(
        self,
        company_id: str,
        cursor: datetime | None,
        at: datetime,
        summary: dict[str, Any] | None = None,
        *,
        started_at: datetime | None = None,
    ) -> datetime | None:
        """Record a completed pass: the cursor never moves backwards, and the checkpoint goes.

        Returns the cursor now stored, the later of the stored one and `cursor`; None for
        `cursor` (a pass that saw no rows) records the success and keeps the stored cursor.
        `started_at` is when the pass began (`at` when not given); the failures in a row and
        the lock-out are over.
        """
        parameters = {
            "company_id": company_id,
            "cursor": None if cursor is None else _utc(cursor),
            "last_success_at": _utc(at),
            "last_pass": summary,
            "last_pass_started_at": _utc(started_at or at),
        }
        with self._backend.write() as conn:
            self._backend.durable(conn)
            stored: datetime | None = conn.execute(self._advance, parameters).scalar_one()
            conn.execute(self._drop_checkpoint, parameters)
            self._still_locked(conn, company_id)
        return stored

    def record_failure(
        self, company_id: str, message: str, at: datetime, *, failed_pass: bool = True
    ) -> None:
        """Remember why the last job failed; the cursor and any checkpoint stay as they were.

        A failed pass (`failed_pass`; not a reconcile) adds one to the failures in a row.
        """
        insert = self._backend.insert(_STATE)
        failures = _STATE.c.failures_in_row + 1 if failed_pass else _STATE.c.failures_in_row
        statement = insert.values(
            company_id=company_id,
            last_error=message,
            last_error_at=_utc(at),
            failures_in_row=1 if failed_pass else 0,
        ).on_conflict_do_update(
            index_elements=["company_id"],
            set_={
                "last_error": insert.excluded.last_error,
                "last_error_at": insert.excluded.last_error_at,
                "failures_in_row": failures,
            },
        )
        with self._backend.write() as conn:
            conn.execute(statement)

    def record_locked_out(self, company_id: str, at: datetime) -> None:
        """Remember when a pass first found the company locked by another process; the next
        completed pass forgets it."""
        insert = self._backend.insert(_STATE)
        statement = insert.values(
            company_id=company_id, locked_out_since=_utc(at)
        ).on_conflict_do_update(
            index_elements=["company_id"],
            set_={
                "locked_out_since": func.coalesce(
                    _STATE.c.locked_out_since, insert.excluded.locked_out_since
                )
            },
        )
        with self._backend.write() as conn:
            conn.execute(statement)

    def health(self, companies: Sequence[str]) -> list[CompanyHealth]:
        """What monitoring needs of each of `companies` that has a state row, in one query."""
        quarantined = (
            select(func.count())
            .where(_QUARANTINE.c.company_id == _STATE.c.company_id)
            .scalar_subquery()
        )
        query = select(
            _STATE.c.company_id,
            _STATE.c.cursor,
            _STATE.c.last_success_at,
            _STATE.c.last_pass_started_at,
            _STATE.c.failures_in_row,
            _STATE.c.locked_out_since,
            quarantined,
        ).where(_STATE.c.company_id.in_(list(companies)))
        with self._backend.read() as conn:
            return [CompanyHealth(*row) for row in conn.execute(query)]

    def load_checkpoint(self, company_id: str) -> Checkpoint | None:
        with self._backend.read() as conn:
            return self._checkpoint(conn, company_id)

    def _checkpoint(self, conn: Connection, company_id: str) -> Checkpoint | None:
        row = conn.execute(self._select_checkpoint, {"company_id": company_id}).first()
        if row is None:
            return None
        return Checkpoint(
            mode=row.mode,
            filter_since=row.filter_since,
            next_offset=row.next_offset,
            anchors=[(int(i), datetime.fromisoformat(t).astimezone(UTC)) for i, t in row.anchors],
            high_water=row.high_water,
            started_at=row.started_at,
            pages=row.pages,
            rows=row.rows,
        )

    def clear_checkpoint(self, company_id: str) -> None:
        with self._backend.write() as conn:
            conn.execute(delete(_CHECKPOINTS).where(_CHECKPOINTS.c.company_id == company_id))

    @contextmanager
    def company_lock(self, company_id: str) -> Iterator[None]:
        """Exclusive right to sync one company, across processes (and machines on PostgreSQL).

        Raises CompanyLocked at once if another holder has it; it dies with its process. While
        it is held, moving the cursor and marking deletions first check that it still is.
        """
        with self._backend.lock(company_id) as still_held:
            self._lock_checks[company_id] = still_held
            try:
                yield
            finally:
                del self._lock_checks[company_id]

    def _still_locked(self, conn: Connection, company_id: str) -> None:
        """Before a write that only the lock holder may make commits: a PostgreSQL session
        that held the lock and was ended (a restart, a terminated backend) let go of it."""
        check = self._lock_checks.get(company_id)
        if check is not None:
            check(conn)

    def status(self, companies: Sequence[str]) -> list[CompanyStatus]:
        """The configured companies first, even with no rows yet, then any others in the db."""
        is_live = _CONTACTS.c.deleted_at.is_(None)
        with self._backend.read() as conn:
            counts = {
                row.company_id: (row.live, row.deleted)
                for row in conn.execute(
                    select(
                        _CONTACTS.c.company_id,
                        func.count().filter(is_live).label("live"),
                        func.count().filter(~is_live).label("deleted"),
                    ).group_by(_CONTACTS.c.company_id)
                )
            }
            quarantined: dict[str, int] = dict(
                conn.execute(
                    select(_QUARANTINE.c.company_id, func.count()).group_by(
                        _QUARANTINE.c.company_id
                    )
                ).all()
            )
            states = {row.company_id: row for row in conn.execute(select(_STATE))}
        others = sorted((counts.keys() | quarantined.keys() | states.keys()) - set(companies))
        result = []
        for company in [*companies, *others]:
            state = states.get(company)
            live, deleted = counts.get(company, (0, 0))
            result.append(
                CompanyStatus(
                    company_id=company,
                    cursor=state.cursor if state else None,
                    last_success_at=state.last_success_at if state else None,
                    last_error=state.last_error if state else None,
                    last_error_at=state.last_error_at if state else None,
                    contacts=live,
                    deleted=deleted,
                    quarantined=quarantined.get(company, 0),
                    last_pass=state.last_pass if state else None,
                    last_reconcile=state.last_reconcile if state else None,
                )
            )
        return result

    def versions(self, company_id: str, *, deleted: bool | None = None) -> dict[int, MirrorVersion]:
        """The company's rows as reconcile judges them, by id: all, or only the deleted
        (`deleted=True`) or live (`deleted=False`) ones. The one query behind `live_ids`."""
        query = select(
            _CONTACTS.c.id,
            _CONTACTS.c.updated_at,
            _CONTACTS.c.client_id,
            _CONTACTS.c.deleted_at.is_not(None),
        ).where(_CONTACTS.c.company_id == company_id)
        if deleted is not None:
            is_deleted = _CONTACTS.c.deleted_at.is_not(None)
            query = query.where(is_deleted if deleted else ~is_deleted)
        with self._backend.read() as conn:
            return {
                contact_id: MirrorVersion(updated_at, client_id, bool(gone))
                for contact_id, updated_at, client_id, gone in conn.execute(query)
            }

    def live_ids(self, company_id: str) -> set[int]:
        """Ids of the company's rows not marked deleted."""
        return set(self.versions(company_id, deleted=False))

    def record_reconcile(self, company_id: str, summary: dict[str, Any]) -> None:
        """Keep the last reconcile's summary for `status`; nothing else of the state changes."""
        insert = self._backend.insert(_STATE)
        statement = insert.values(company_id=company_id, last_reconcile=summary)
        with self._backend.write() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["company_id"],
                    set_={"last_reconcile": insert.excluded.last_reconcile},
                )
            )

    def mark_deleted(
        self, company_id: str, ids: Collection[int], at: datetime, *, hard: bool
    ) -> int:
        """Soft: set deleted_at on live rows; hard: delete the rows. Returns rows affected."""
        mine = _CONTACTS.c.company_id == company_id
        at = _utc(at)
        if hard:
            return self._by_ids(
                company_id, ids, lambda batch: delete(_CONTACTS).where(mine, batch), at, gone=True
            )
        statement = update(_CONTACTS).values(deleted_at=at)
        return self._by_ids(
            company_id,
            ids,
            lambda batch: statement.where(mine, batch, _CONTACTS.c.deleted_at.is_(None)),
            at,
        )

    def undelete(self, company_id: str, ids: Collection[int], at: datetime | None = None) -> int:
        """Clear deleted_at on rows that turned out to exist upstream, seen again `at` (now by
        default; with history on, a row back unchanged opens its new version then).
        Returns rows affected."""
        statement = update(_CONTACTS).values(deleted_at=None)
        return self._by_ids(
            company_id,
            ids,
            lambda batch: statement.where(
                _CONTACTS.c.company_id == company_id, batch, _CONTACTS.c.deleted_at.is_not(None)
            ),
            datetime.now(UTC) if at is None else _utc(at),
        )

    def add_to_schedule(self, first_due: dict[str, datetime], companies: Sequence[str]) -> None:
        """Make each company's jobs known to the schedule: a job new to it is first due at
        `first_due[job]`; one already there (another replica's, or from before a restart) keeps
        its due time."""
        entries = [
            {"company_id": company, "job": job, "due_at": _utc(at)}
            for job, at in first_due.items()
            for company in companies
        ]
        if not entries:
            return
        statement = self._backend.insert(_SCHEDULE).on_conflict_do_nothing(
            index_elements=["company_id", "job"]
        )
        with self._backend.write() as conn:
            conn.execute(statement, entries)

    def claim_due(
        self,
        every_s: dict[str, float],
        companies: Sequence[str],
        *,
        limit: int,
        owner: str,
        now: datetime,
        busy: Collection[str] = (),
    ) -> list[tuple[str, str]]:
        """Claim up to `limit` due (company, job) entries of `companies`, the longest-due first,
        and move each one's due time an interval on from when it was due (from now, when it is
        more than an interval late), so no other replica claims it meanwhile.

        `every_s` gives the jobs to claim and their intervals; `busy` companies (running here)
        are left for later. Entries another replica is claiming at the same moment are skipped,
        not waited for (SKIP LOCKED on PostgreSQL; SQLite serialises writers anyway).
        """
        if limit <= 0 or not companies:
            return []
        now = _utc(now)
        # The statement's text never changes, so it is compiled and parsed once: the companies
        # travel as one parameter, and busy ones are skipped here, not in SQL.
        parameters = {
            "companies": self._backend.text_list(companies),
            "jobs": self._backend.text_list(list(every_s)),
            "now": now,
            "limit": limit + len(busy),
        }
        with self._backend.write() as conn:
            claimed: list[tuple[str, str]] = []
            moves = []
            for row in conn.execute(self._due, parameters):
                # A company's sync and reconcile never run at once: the later one waits its turn.
                if row.company_id in busy or any(c == row.company_id for c, _ in claimed):
                    continue
                every = timedelta(seconds=every_s[row.job])
                due = row.due_at + every
                moves.append(
                    {
                        "company": row.company_id,
                        "kind": row.job,
                        "due": due if due > now else now + every,
                        "owner": owner,
                        "at": now,
                    }
                )
                claimed.append((row.company_id, row.job))
                if len(claimed) == limit:
                    break
            if moves:
                conn.execute(self._move_due, moves)
        return claimed

    def close(self) -> None:
        self._backend.engine.dispose()

    def _by_ids(
        self,
        company_id: str,
        ids: Collection[int],
        statement_for: Callable[[ColumnElement[bool]], Executable],
        at: datetime,
        *,
        gone: bool = False,
    ) -> int:
        """Run a statement over `ids` in batches, all in one transaction, the history (if
        kept) following each batch; `gone`: the statement removes rows."""
        ordered = sorted(ids)
        affected = 0
        history = company_id in self._history
        with self._backend.write() as conn:
            for start in range(0, len(ordered), _ID_BATCH):
                batch_ids = ordered[start : start + _ID_BATCH]
                affected += conn.execute(statement_for(_CONTACTS.c.id.in_(batch_ids))).rowcount
                if history:
                    follow_mirror(conn, company_id, batch_ids, at, gone=gone)
            self._still_locked(conn, company_id)
        return affected

    def _save_checkpoint(
        self, conn: Connection, company_id: str, checkpoint: Checkpoint, at: datetime
    ) -> None:
        values = {
            "mode": checkpoint.mode,
            "filter_since": checkpoint.filter_since,
            "next_offset": checkpoint.next_offset,
            "anchors": [[i, _utc(t).isoformat()] for i, t in checkpoint.anchors],
            "high_water": checkpoint.high_water,
            "started_at": checkpoint.started_at,
            "pages": checkpoint.pages,
            "rows": checkpoint.rows,
            "updated_at": at,
        }
        insert = self._backend.insert(_CHECKPOINTS)
        conn.execute(
            insert.values(company_id=company_id, **values).on_conflict_do_update(
                index_elements=["company_id"],
                set_={name: insert.excluded[name] for name in values},
            )
        )

    def _migrate(self) -> None:
        """Bring the schema to head in one transaction, refusing a `contacts` table not ours."""
        with self._backend.migration() as conn:
            tables = set(inspect(conn).get_table_names())
            if "contacts" in tables and VERSION_TABLE not in tables:
                raise DatabaseError(
                    f"The database at {self._backend.where} has a table named contacts that "
                    "contacts-sync did not create; "
                    "point database.url at another database or schema."
                )
            if VERSION_TABLE in tables and _stored_revisions(conn) == [schema_head()]:
                return
            # Alembic is imported only when there is something to upgrade: it is a large share
            # of every command's start-up, and a database is at head nearly every time.
            from alembic import command  # noqa: PLC0415
            from alembic.config import Config  # noqa: PLC0415
            from alembic.util.exc import CommandError  # noqa: PLC0415

            config = Config()
            config.set_main_option("script_location", "sync:migrations")
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise DatabaseError(
                    f"Cannot migrate the mirror database at {self._backend.where}: "
                    f"{str(exc).splitlines()[0]}; if a newer contacts-sync upgraded it, "
                    "upgrade contacts-sync too, or point database.url at another database."
                ) from exc


def _advance_statement(backend: Backend) -> Executable:
    """Record a completed pass; the stored cursor becomes the later of it and the new one."""
    insert = backend.insert(_STATE)
    new = insert.excluded.cursor
    return (
        insert.values(
            company_id=bindparam("company_id", type_=Text()),
            cursor=bindparam("cursor", type_=_STATE.c.cursor.type),
            last_success_at=bindparam("last_success_at", type_=_STATE.c.last_success_at.type),
            last_pass=bindparam("last_pass", type_=_STATE.c.last_pass.type),
            last_pass_started_at=bindparam(
                "last_pass_started_at", type_=_STATE.c.last_pass_started_at.type
            ),
            failures_in_row=0,
            locked_out_since=None,
        )
        .on_conflict_do_update(
            index_elements=["company_id"],
            set_={
                "cursor": case(
                    (or_(_STATE.c.cursor.is_(None), _STATE.c.cursor < new), new),
                    else_=_STATE.c.cursor,
                ),
                "last_success_at": insert.excluded.last_success_at,
                "last_error": None,
                "last_error_at": None,
                "last_pass": insert.excluded.last_pass,
                "last_pass_started_at": insert.excluded.last_pass_started_at,
                "failures_in_row": 0,
                "locked_out_since": None,
            },
        )
        .returning(_STATE.c.cursor)
    )


def _stored_revisions(conn: Connection) -> list[str]:
    query = text(f"SELECT version_num FROM {VERSION_TABLE}")  # noqa: S608 - a constant name
    return list(conn.execute(query).scalars())


_MIGRATIONS = Path(__file__).with_name("migrations") / "versions"


@functools.cache
def schema_head() -> str | None:
    """The newest migration's revision, the one no other revises, read from the files' source:
    Alembic would import them, and itself, a large share of start-up. None when there is no
    single head; Alembic then says what is wrong."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in _MIGRATIONS.glob("*.py"):
        assigned = _literals(path)
        revision, down = assigned.get("revision"), assigned.get("down_revision")
        if not isinstance(revision, str):
            return None  # a file written unlike the others: Alembic must judge it
        revisions.add(revision)
        revised.update([down] if isinstance(down, str) else down or ())
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else None


def _literals(path: Path) -> dict[str, Any]:
    """The constants a module assigns at its top level (`revision: str = "0002"`), by name."""
    found: dict[str, Any] = {}
    for statement in ast.parse(path.read_bytes()).body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name):
            with contextlib.suppress(ValueError):  # not a literal: no revision is written so
                found[target.id] = ast.literal_eval(value)
    return found


def _utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given; pass an aware UTC one")
    return value.astimezone(UTC)
