"""The mirror database: contacts upserts, cursor and checkpoint, per-company locks.

Every write is one transaction, and the cursor moves only after the rows it covers are committed.
What differs between SQLite and PostgreSQL lives behind `sync.backends.Backend`, so the engine
talks to `MirrorStore` alone and never learns the dialect.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Any, NamedTuple

from sqlalchemy import Connection, case, delete, func, inspect, or_, select, text, update
from sqlalchemy.sql.expression import ColumnElement, Executable

from sync.backends import Backend, open_backend
from sync.errors import DatabaseError
from sync.models import (
    VERSION_TABLE,
    CheckpointRecord,
    Contact,
    QuarantineEntry,
    SyncState,
    table_of,
)
from sync.rows import ContactRow, RejectedRow, RowKey

__all__ = [
    "Checkpoint",
    "CompanyState",
    "CompanyStatus",
    "MirrorStore",
    "MirrorVersion",
    "PageWriter",
]

_CONTACTS = table_of(Contact)
_STATE = table_of(SyncState)
_QUARANTINE = table_of(QuarantineEntry)
_CHECKPOINTS = table_of(CheckpointRecord)

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

    @classmethod
    def open(cls, url: str) -> MirrorStore:
        """Connect, create or upgrade the schema through Alembic, and return a ready store."""
        store = cls(open_backend(url))
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

    def read_state(self, company_id: str) -> CompanyState:
        with self._backend.read() as conn:
            row = conn.execute(select(_STATE).where(_STATE.c.company_id == company_id)).first()
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
    ) -> datetime | None:
        """Record a completed pass: the cursor never moves backwards, and the checkpoint goes.

        Returns the cursor now stored, the later of the stored one and `cursor`; None for
        `cursor` (a pass that saw no rows) records the success and keeps the stored cursor.
        """
        insert = self._backend.insert(_STATE)
        new = insert.excluded.cursor
        statement = (
            insert.values(
                company_id=company_id,
                cursor=None if cursor is None else _utc(cursor),
                last_success_at=_utc(at),
                last_pass=summary,
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
                },
            )
            .returning(_STATE.c.cursor)
        )
        with self._backend.write() as conn:
            self._backend.durable(conn)
            stored: datetime | None = conn.execute(statement).scalar_one()
            conn.execute(delete(_CHECKPOINTS).where(_CHECKPOINTS.c.company_id == company_id))
            self._still_locked(conn, company_id)
        return stored

    def record_failure(self, company_id: str, message: str, at: datetime) -> None:
        """Remember why the last pass failed; the cursor and any checkpoint stay as they were."""
        insert = self._backend.insert(_STATE)
        statement = insert.values(
            company_id=company_id, last_error=message, last_error_at=_utc(at)
        ).on_conflict_do_update(
            index_elements=["company_id"],
            set_={
                "last_error": insert.excluded.last_error,
                "last_error_at": insert.excluded.last_error_at,
            },
        )
        with self._backend.write() as conn:
            conn.execute(statement)

    def load_checkpoint(self, company_id: str) -> Checkpoint | None:
        with self._backend.read() as conn:
            row = conn.execute(
                select(_CHECKPOINTS).where(_CHECKPOINTS.c.company_id == company_id)
            ).first()
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
        if hard:
            return self._by_ids(company_id, ids, lambda batch: delete(_CONTACTS).where(mine, batch))
        statement = update(_CONTACTS).values(deleted_at=_utc(at))
        return self._by_ids(
            company_id,
            ids,
            lambda batch: statement.where(mine, batch, _CONTACTS.c.deleted_at.is_(None)),
        )

    def undelete(self, company_id: str, ids: Collection[int]) -> int:
        """Clear deleted_at on rows that turned out to exist upstream. Returns rows affected."""
        statement = update(_CONTACTS).values(deleted_at=None)
        return self._by_ids(
            company_id,
            ids,
            lambda batch: statement.where(
                _CONTACTS.c.company_id == company_id, batch, _CONTACTS.c.deleted_at.is_not(None)
            ),
        )

    def close(self) -> None:
        self._backend.engine.dispose()

    def _by_ids(
        self,
        company_id: str,
        ids: Collection[int],
        statement_for: Callable[[ColumnElement[bool]], Executable],
    ) -> int:
        """Run a statement over `ids` in batches, all in one transaction."""
        ordered = sorted(ids)
        affected = 0
        with self._backend.write() as conn:
            for start in range(0, len(ordered), _ID_BATCH):
                batch = _CONTACTS.c.id.in_(ordered[start : start + _ID_BATCH])
                affected += conn.execute(statement_for(batch)).rowcount
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
            if VERSION_TABLE in tables and _stored_revisions(conn) == [SCHEMA_HEAD]:
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


def _stored_revisions(conn: Connection) -> list[str]:
    query = text(f"SELECT version_num FROM {VERSION_TABLE}")  # noqa: S608 - a constant name
    return list(conn.execute(query).scalars())


SCHEMA_HEAD = "0004"
"""The newest migration's revision; a test keeps it equal to Alembic's head."""


def _utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given; pass an aware UTC one")
    return value.astimezone(UTC)
