"""What differs between SQLite and PostgreSQL, behind one interface that only sync.store uses.

A Backend owns the engine and its transactions, the bulk contacts upsert, the per-company lock
and the translation of driver errors into DatabaseError; the SQL the two share stays in the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Table,
    Text,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    make_url,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError, StatementError
from sqlalchemy.pool import StaticPool

from sync.errors import CompanyLocked, DatabaseError
from sync.log import redactor
from sync.models import sqlite_timestamp, sqlite_timestamps
from sync.rows import ContactRow

if TYPE_CHECKING:
    import psycopg

__all__ = ["Backend", "open_backend"]

_Insert = TypeVar("_Insert", sqlite.Insert, postgresql.Insert)

_WRITE_OPTION = "contacts_sync_write"
"""Execution option that makes a SQLite transaction BEGIN IMMEDIATE: it waits, never deadlocks."""


def open_backend(url: str, *, connections: int = 5) -> Backend:
    """The backend for a database.url, with its engine created but not yet connected.

    `connections` is how many the pool keeps: the daemon's passes each hold a lock and a
    transaction at once. The URL's passwords are registered with the redactor first: driver
    errors may echo them.
    """
    for secret in database_secrets(url):
        redactor().add(secret)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise DatabaseError(
            "database.url is not a valid SQLAlchemy URL; "
            "use sqlite:///path/to/file.db or postgresql+psycopg://user@host/db."
        ) from None
    backend_type = _BACKENDS.get(parsed.get_backend_name())
    # A URL naming no driver ("postgresql://") means ours, whatever SQLAlchemy's default is.
    named = "+" in parsed.drivername
    if backend_type is None or (named and parsed.get_driver_name() not in backend_type.drivers):
        raise DatabaseError(
            f"database.url uses {parsed.drivername}, which contacts-sync does not support; "
            "use sqlite:///path/to/file.db or postgresql+psycopg://user@host/db."
        )
    return backend_type(parsed, connections)


def database_secrets(url: str) -> set[str]:
    """Every password a database.url holds: in the URL's user info or its `password=` query
    parameter (decoded), or in a libpq `key=value` string (quoted or not)."""
    secrets: set[str] = set()
    with contextlib.suppress(ValueError):  # urlsplit is lenient: a bad port is no obstacle
        parts = urlsplit(url)
        if parts.password:
            secrets.add(unquote(parts.password))
        secrets.update(parse_qs(parts.query).get("password", ()))
    if not url.startswith("sqlite"):  # psycopg takes a tenth of a second to import: not for SQLite
        secrets.update(_libpq_passwords(url))
    return {secret for secret in secrets if secret}


def _libpq_passwords(dsn: str) -> set[str]:
    """The password of a libpq `key=value` string (quoted or not); nothing for anything else."""
    import psycopg  # noqa: PLC0415 - see database_secrets
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    with contextlib.suppress(psycopg.ProgrammingError):
        in_dsn = conninfo_to_dict(dsn).get("password")
        if isinstance(in_dsn, str):
            return {in_dsn}
    return set()


class Backend(ABC):
    """One kind of database, as MirrorStore uses it.

    - `read()`, `write()`, `migration()`: one transaction each; driver errors become DatabaseError.
    - `insert(table)`: the dialect's INSERT, with on_conflict_do_update and excluded.
    - `upsert_contacts(conn, company_id, rows, synced_at)`: a whole page in one statement.
    - `durable(conn)`: the commit of this transaction (the cursor's) waits for the disk.
    - `lock(company_id)`: the per-company lock; `engine`, `name`, and `where` (URL, no password).
    """

    name: ClassVar[str]
    drivers: ClassVar[tuple[str, ...]]
    reachable_hint: ClassVar[str]

    def __init__(self, url: URL, connections: int = 5) -> None:
        self.url = url
        self.connections = connections
        shown = url.set(query={k: v for k, v in url.query.items() if k != "password"})
        self.where = shown.render_as_string(hide_password=True)
        self.engine = self._create_engine()
        self._inserts: dict[str, Any] = {}

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction."""
        with self._errors("read"), self._transaction(write=False) as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._errors("write to"), self._transaction(write=True) as conn:
            yield conn

    @contextmanager
    def migration(self) -> Iterator[Connection]:
        """The schema upgrade's transaction, which no other process's upgrade overlaps."""
        with self._errors("open"), self._transaction(write=True) as conn:
            self._before_migration(conn)
            yield conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        with self._write_turn() if write else nullcontext(), self.engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @abstractmethod
    def _create_engine(self) -> Engine: ...

    def _write_turn(self) -> AbstractContextManager[object]:
        """Held around each write transaction; nothing to hold where the database queues them."""
        return nullcontext()

    @abstractmethod
    def one_of(self, column: ColumnElement[str], name: str) -> ColumnElement[bool]:
        """`column` is one of the texts bound as `name` (given through `text_list`): one
        parameter, however many texts, so the statement's text is the same every time."""

    @abstractmethod
    def text_list(self, values: Sequence[str]) -> object:
        """The value to bind for a `one_of` parameter."""

    @abstractmethod
    def insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """The dialect's INSERT, which offers on_conflict_do_update and excluded."""

    @abstractmethod
    def upsert_contacts(
        self, conn: Connection, company_id: str, rows: Sequence[ContactRow], synced_at: datetime
    ) -> int:
        """One bulk statement for the page; returns rows inserted or updated."""

    @abstractmethod
    def lock(self, company_id: str) -> AbstractContextManager[Callable[[Connection], None]]:
        """Hold the company's lock; yields a check that raises DatabaseError if it was lost,
        given the connection of a write about to commit."""

    @abstractmethod
    def _before_migration(self, conn: Connection) -> None:
        """Serialise concurrent first starts inside the migration transaction."""

    @abstractmethod
    def durable(self, conn: Connection) -> None:
        """Make this transaction's commit wait until it, and every earlier one, is on disk."""

    @abstractmethod
    def _error_kind(self, exc: BaseException) -> str | None:
        """The cause the driver reports, if known: readonly, full, busy or unreachable."""

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Any database failure while `doing` ("open", "read", "write to") -> DatabaseError."""
        try:
            yield
        except SQLAlchemyError as exc:
            if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
                raise  # a value the driver never received: a bug of the caller's
            raise self._database_error(doing, exc) from exc

    def _database_error(self, doing: str, exc: Exception) -> DatabaseError:
        """One sentence naming the database (never its password: the redactor knows it) and
        what to do next."""
        cause = getattr(exc, "orig", None) or exc
        reason = _first_line(cause)
        kind = self._error_kind(cause)
        if kind == "readonly":
            return DatabaseError(
                f"The mirror database at {self.where} is read-only ({reason}); "
                "give contacts-sync write access to it or point database.url at a writable one."
            )
        if kind == "full":
            return DatabaseError(
                f"The mirror database at {self.where} is out of space ({reason}); "
                "free disk space for it, then run again."
            )
        if kind == "busy":
            return DatabaseError(
                f"Cannot {doing} the mirror database at {self.where}: {reason}; "
                "another program holds a long write lock on it; close that program and run again."
            )
        if kind == "unreachable" or doing == "open":
            return DatabaseError(
                f"Cannot {doing} the mirror database at {self.where}: {reason}; "
                f"check database.url and {self.reachable_hint}."
            )
        return DatabaseError(
            f"Cannot {doing} the mirror database at {self.where}: {reason}; "
            "check the database and its logs, then run again."
        )


_SQLITE_COLUMNS = 13
"""Bound per row: id, client_id, eight texts, created_at, updated_at, extra."""


@functools.lru_cache(maxsize=8)
def _sqlite_upsert(rows: int) -> str:
    """The SQLite upsert for `rows` rows; a pass uses two or three sizes at most.

    ?1 is the company and ?2 the sync time, bound once for the whole statement. The rest are
    bound column after column (all ids, then all client ids, ...), so that the parameters are
    the page's columns laid end to end, with no Python work per row.
    """
    values = []
    for row in range(rows):
        own = [f"?{3 + column * rows + row}" for column in range(_SQLITE_COLUMNS)]
        values.append(f"({', '.join(own[:12])}, ?2, {own[12]}, ?1)")
    return _SQLiteBackend._UPSERT.format(values=", ".join(values))


class _SQLiteBackend(Backend):
    name = "sqlite"
    drivers = ("pysqlite",)
    reachable_hint = "that the file and its directory are accessible"

    # A page is one statement with a VALUES row per contact, not executemany: the sqlite3
    # module releases the GIL around every statement step, and re-taking it once per row from
    # the threads parsing the next pages made storing several times slower. One step a page.
    _UPSERT = """
        INSERT INTO contacts (
            id, client_id, email, name, surname, role, notes, linkedin, description, telephone,
            created_at, updated_at, synced_at, extra, company_id)
        VALUES {values}
        ON CONFLICT (company_id, id) DO UPDATE SET
            client_id = excluded.client_id, email = excluded.email, name = excluded.name,
            surname = excluded.surname, role = excluded.role, notes = excluded.notes,
            linkedin = excluded.linkedin, description = excluded.description,
            telephone = excluded.telephone, created_at = excluded.created_at,
            updated_at = excluded.updated_at, synced_at = excluded.synced_at,
            extra = excluded.extra, deleted_at = NULL
        WHERE contacts.updated_at <= excluded.updated_at
    """
    _ROWS_PER_STATEMENT = 100
    """13 parameters a row: far below SQLite's limit of 32,766 per statement."""

    def _create_engine(self) -> Engine:
        path = self.url.database
        self._path = path if path and path != ":memory:" else None
        self._held: set[str] = set()
        self._held_guard = threading.Lock()
        self._writer = threading.RLock()
        if self._path is None:
            # One shared connection: each new connection to :memory: would be another database.
            engine = create_engine(
                self.url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
                json_serializer=_json_dumps,
            )
        else:
            _create_private_file(self._path, self.where)
            # Locks are named from the file itself, not the path string: a symlink, `./a.db`
            # and an absolute path to one file must share its locks.
            self._lock_base = os.path.realpath(self._path)
            engine = create_engine(
                self.url, pool_size=self.connections, json_serializer=_json_dumps
            )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    def _write_turn(self) -> AbstractContextManager[object]:
        """One writer at a time in this process: SQLite allows one anyway, and threads queued
        here take their turn at once, where SQLite's busy handler would poll with sleeps."""
        return self._writer

    def one_of(self, column: ColumnElement[str], name: str) -> ColumnElement[bool]:
        listed = func.json_each(bindparam(name, type_=Text())).table_valued("value")
        return column.in_(select(listed.c.value))

    def text_list(self, values: Sequence[str]) -> object:
        return json.dumps(list(values))

    def insert(self, table: Table) -> sqlite.Insert:
        return _cached_insert(self._inserts, table, sqlite.insert)

    def _before_migration(self, conn: Connection) -> None:
        """Nothing to do: the migration's BEGIN IMMEDIATE already excludes other writers."""

    def durable(self, conn: Connection) -> None:
        """Nothing to do: WAL with synchronous=NORMAL may lose a last commit, never reorder them."""

    def upsert_contacts(
        self, conn: Connection, company_id: str, rows: Sequence[ContactRow], synced_at: datetime
    ) -> int:
        synced = sqlite_timestamp(synced_at)
        written = 0
        for start in range(0, len(rows), self._ROWS_PER_STATEMENT):
            chunk = rows[start : start + self._ROWS_PER_STATEMENT]
            ids, updated, created, *plain, extras = zip(*chunk, strict=True)
            values: list[Any] = [company_id, synced, *ids]
            for column in plain:  # client_id, then the texts, as in ContactRow
                values += column
            values += sqlite_timestamps(created)
            values += sqlite_timestamps(updated)
            if extras.count(None) < len(extras):
                extras = tuple(None if extra is None else json.dumps(extra) for extra in extras)
            values += extras
            statement = _sqlite_upsert(len(chunk))
            written += conn.exec_driver_sql(statement, tuple(values)).rowcount
        return written

    @contextmanager
    def lock(self, company_id: str) -> Iterator[Callable[[Connection], None]]:
        # A lock held by this process (an open file, or a set entry) cannot be lost under it.
        if self._path is None:
            with self._held_guard:
                if company_id in self._held:
                    raise CompanyLocked(company_id)
                self._held.add(company_id)
            try:
                yield _still_held
            finally:
                with self._held_guard:
                    self._held.discard(company_id)
            return
        lock_path = f"{self._lock_base}.lock.{_digest(company_id).hex()[:16]}"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DatabaseError(
                f"Cannot create the lock file {lock_path} beside the mirror database: "
                f"{exc.strerror}; make its directory writable for contacts-sync."
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CompanyLocked(company_id) from None
            try:
                yield _still_held
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _error_kind(self, exc: BaseException) -> str | None:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith("SQLITE_READONLY"):
            return "readonly"
        if name.startswith("SQLITE_CANTOPEN"):
            return "unreachable"
        return {"SQLITE_FULL": "full", "SQLITE_BUSY": "busy", "SQLITE_LOCKED": "busy"}.get(name)


class _PostgresBackend(Backend):
    name = "postgresql"
    drivers = ("psycopg",)
    reachable_hint = "that the server is running and reachable"

    # The page travels as one JSON array of rows, each a ContactRow's fields in order (id,
    # updated_at, created_at, client_id, the texts, extra): orjson writes it in C, datetimes
    # included, and the server unpacks it, so a page is one statement and one round trip.
    _UPSERT = """
        INSERT INTO contacts (
            company_id, id, client_id, email, name, surname, role, notes, linkedin, description,
            telephone, created_at, updated_at, synced_at, extra)
        SELECT
            %(company_id)s, (r->>0)::bigint, (r->>3)::bigint, r->>4, r->>5, r->>6, r->>7, r->>8,
            r->>9, r->>10, r->>11, (r->>2)::timestamptz, (r->>1)::timestamptz, %(synced_at)s,
            NULLIF(r->12, 'null'::jsonb)
        FROM jsonb_array_elements(%(page)s::jsonb) AS r
        ON CONFLICT (company_id, id) DO UPDATE SET
            client_id = excluded.client_id, email = excluded.email, name = excluded.name,
            surname = excluded.surname, role = excluded.role, notes = excluded.notes,
            linkedin = excluded.linkedin, description = excluded.description,
            telephone = excluded.telephone, created_at = excluded.created_at,
            updated_at = excluded.updated_at, synced_at = excluded.synced_at,
            extra = excluded.extra, deleted_at = NULL
        WHERE contacts.updated_at <= excluded.updated_at
    """

    def _create_engine(self) -> Engine:
        defaults = {"connect_timeout": 10, "application_name": "contacts-sync"}
        engine = create_engine(
            self.url.set(drivername="postgresql+psycopg"),
            pool_size=self.connections,
            pool_pre_ping=True,
            json_serializer=_json_dumps,
            connect_args={k: v for k, v in defaults.items() if k not in self.url.query},
        )
        event.listen(engine, "connect", _postgres_on_connect)
        return engine

    def one_of(self, column: ColumnElement[str], name: str) -> ColumnElement[bool]:
        return column == any_(bindparam(name, type_=postgresql.ARRAY(Text())))

    def text_list(self, values: Sequence[str]) -> object:
        return list(values)

    def insert(self, table: Table) -> postgresql.Insert:
        return _cached_insert(self._inserts, table, postgresql.insert)

    def upsert_contacts(
        self, conn: Connection, company_id: str, rows: Sequence[ContactRow], synced_at: datetime
    ) -> int:
        _refuse_naive(rows)
        page = _page_json(rows)
        parameters = {"company_id": company_id, "synced_at": synced_at, "page": page}
        return conn.exec_driver_sql(self._UPSERT, parameters).rowcount

    @contextmanager
    def lock(self, company_id: str) -> Iterator[Callable[[Connection], None]]:
        key = int.from_bytes(_digest(company_id)[:8], "big", signed=True)
        with self._errors("open"):
            conn = self.engine.connect()
        try:
            with self._errors("open"):
                # Autocommit: holding the session-level lock leaves no transaction idle.
                conn.execution_options(isolation_level="AUTOCOMMIT")
                acquired, pid, started = conn.execute(_TAKE_LOCK, {"key": key}).one()
            if not acquired:
                raise CompanyLocked(company_id)
            try:
                yield _HeldLock(company_id, key, pid, started)
            finally:
                try:
                    conn.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                except SQLAlchemyError:
                    # The session is gone and its lock with it; never pool a connection in doubt.
                    conn.invalidate()
        finally:
            conn.close()

    def durable(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit = on")

    def _before_migration(self, conn: Connection) -> None:
        key = int.from_bytes(_digest("schema migration")[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def _error_kind(self, exc: BaseException) -> str | None:
        import psycopg  # noqa: PLC0415 - imported already: this backend's engine uses it

        if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
            return "unreachable"
        return {"25006": "readonly", "53100": "full"}.get(getattr(exc, "sqlstate", None) or "")


_BACKENDS: dict[str, type[Backend]] = {"sqlite": _SQLiteBackend, "postgresql": _PostgresBackend}


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Transactions are begun explicitly (below), so they cover reads and DDL too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    # Bulk loads dirty index pages all over the file: a bigger page cache and fewer, larger
    # WAL checkpoints (40 MB instead of 4 MB) halve the commit time; both are bounded.
    cursor.execute("PRAGMA cache_size = -16000")
    cursor.execute("PRAGMA wal_autocheckpoint = 10000")
    cursor.close()


def _postgres_on_connect(dbapi_connection: psycopg.Connection[Any], _record: object) -> None:
    # Like SQLite's synchronous=NORMAL: a page commit does not wait for its WAL flush. The commit
    # that moves the cursor does (`durable`), and WAL is flushed in order, so a crash can lose
    # only pages that no stored cursor covers yet, and the next pass fetches them again.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
    dbapi_connection.commit()


def _sqlite_on_begin(conn: Connection) -> None:
    # A write takes the write lock up front, so busy_timeout applies instead of a failed upgrade.
    immediate = conn.get_execution_options().get(_WRITE_OPTION)
    driver = cast(sqlite3.Connection, conn.connection.driver_connection)
    driver.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create_private_file(path: str, where: str) -> None:
    """Create the SQLite file readable by its owner only, before SQLite creates it 0644."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseError(
            f"Cannot create the mirror database at {where}: {exc.strerror}; "
            "check database.url and that its directory exists and is writable."
        ) from exc


def _digest(company_id: str) -> bytes:
    return hashlib.sha256(f"contacts-sync:{company_id}".encode()).digest()


_TAKE_LOCK = text(
    "SELECT pg_try_advisory_lock(:key), pid, backend_start FROM pg_stat_activity"
    " WHERE pid = pg_backend_pid()"
)
"""Take the lock and learn who holds it: the session's pid and start time, in one statement."""

_LOCK_HELD = text(
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = :key"
    " AND l.pid = :pid AND a.backend_start = :started"
)
"""Whether that session still holds that advisory lock (a bigint key shows as two oids)."""


@dataclass(frozen=True)
class _HeldLock:
    """The check that a session lock is still held, called from a transaction about to commit.

    A session lock lasts as long as its session, so a killed or restarted session is caught
    before the commit. The session is known by its pid and start time: a pid alone may have
    been reused by a new session, which could hold the same lock for another process.
    """

    company_id: str
    key: int
    pid: int
    started: datetime

    def __call__(self, write: Connection) -> None:
        held = write.scalar(_LOCK_HELD, {"key": self.key, "pid": self.pid, "started": self.started})
        if not held:
            raise DatabaseError(
                f"Lost the lock on company {self.company_id}: the database ended the session "
                "holding it, so another process may be syncing it; run again."
            )


def _still_held(_write: Connection) -> None:
    """A lock that cannot be lost while this process runs."""


def _refuse_naive(rows: Sequence[ContactRow]) -> None:
    for row in rows:
        for value in (row.updated_at, row.created_at):
            if value is not None and value.tzinfo is None:
                raise ValueError(f"naive datetime {value.isoformat()} given; pass an aware one")


def _cached_insert(
    cache: dict[str, Any], table: Table, make: Callable[[Table], _Insert]
) -> _Insert:
    """One INSERT per table, reused: statements are immutable (`.values()` copies), and its
    `excluded` alias, built on first use, costs more than the rest of a checkpoint write."""
    insert: _Insert | None = cache.get(table.name)
    if insert is None:
        insert = cache[table.name] = make(table)
    return insert


def _page_json(rows: Sequence[ContactRow]) -> str:
    """orjson, several times faster; json for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(rows, default=_row_array).decode()
    except TypeError:
        return json.dumps(list(rows), default=_json_default)


def _row_array(value: object) -> tuple[Any, ...]:
    """orjson writes tuples but not named ones: a ContactRow goes as a plain array."""
    if isinstance(value, ContactRow):
        return tuple(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")
