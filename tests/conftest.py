"""Shared fixtures: a fresh mirror database per test, on a real SQLite file or real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from sqlalchemy import Engine, create_engine, make_url, text

from sync.config import Settings
from sync.engine import PassReport, SyncEngine
from sync.log import redactor
from sync.rows import CONTACT_FIELDS, parse_items
from sync.sandbox import DEFAULT_TOKEN, SandboxData, SandboxServer
from sync.store import MirrorStore

PG_ADMIN_DSN = os.environ.get("CONTACTS_SYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    problem = _pg_available()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL must be up in CI: {problem}")
        pytest.skip(f"PostgreSQL is not reachable: {problem}")
    return PG_ADMIN_DSN


def _sqlalchemy_url(dsn: str, database: str) -> str:
    base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


@pytest.fixture
def pg_url(pg_admin_dsn: str) -> Iterator[str]:
    """A PostgreSQL database of its own for one test, dropped afterwards."""
    name = f"contacts_sync_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _sqlalchemy_url(pg_admin_dsn, name)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mirror.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on a real SQLite file and on a real PostgreSQL database."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Each test starts from structlog's defaults and a redactor that knows no token yet."""
    yield
    structlog.reset_defaults()
    redactor().forget()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """A sandbox API on a loopback port with 1,200 generated contacts for company 1."""
    data = SandboxData.generate(("1",), 1200, seed=11)
    with SandboxServer(data) as server:
        yield server


_walk_concurrency = 1
"""The api.concurrency make_settings gives unless told: set by the walk_concurrency fixture."""


@pytest.fixture(params=[1, 4], ids=["sequential", "concurrent"])
def walk_concurrency(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run a test with pages fetched one at a time, then again with fetches in flight while
    pages are stored: engine test modules take it for all their tests (`pytestmark`)."""
    global _walk_concurrency  # noqa: PLW0603 - make_settings is a plain function
    _walk_concurrency = request.param
    try:
        yield request.param
    finally:
        _walk_concurrency = 1


def make_settings(server: SandboxServer, db_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings pointing at `server` and `db_url`; `sections` override keys section by section.
    api.concurrency is the walk_concurrency fixture's when a test runs under it, else 1."""
    base: dict[str, dict[str, Any]] = {
        "api": {
            "base_url": server.base_url,
            "token": DEFAULT_TOKEN,
            "companies": ["1"],
            "api_version": "2024-01",
            "concurrency": _walk_concurrency,
            "timeout_s": 5,
        },
        "database": {"url": db_url},
        "retry": {"max_attempts": 5, "max_elapsed_s": 10},
        "sync": {"lookback_s": 300},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return Settings(**base)


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    return {
        name: value.astimezone(UTC).isoformat(timespec="milliseconds")
        if isinstance(value, datetime)
        else value
        for name, value in row.items()
    }


def upstream_rows(server: SandboxServer, company: str = "1") -> dict[int, dict[str, Any]]:
    """What upstream holds, parsed as the contract says the mirror must store it."""
    parsed = parse_items(server.data.snapshot(company))
    assert not parsed.rejected
    return {
        row.id: _normalise({name: getattr(row, name) for name in (*CONTACT_FIELDS, "extra")})
        for row in parsed.rows
    }


def mirror_rows(
    db_url: str, company: str = "1", *, live_only: bool = True
) -> dict[int, dict[str, Any]]:
    """What the mirror holds for `company`, read back with plain SQL."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            columns = ", ".join((*CONTACT_FIELDS, "extra", "deleted_at"))
            result = conn.execute(
                text(f"SELECT {columns} FROM contacts WHERE company_id = :c"),  # noqa: S608
                {"c": company},
            )
            rows = [dict(r._mapping) for r in result]
    finally:
        engine.dispose()
    out = {}
    for row in rows:
        deleted = row.pop("deleted_at")
        if live_only and deleted is not None:
            continue
        for name in ("created_at", "updated_at"):
            if isinstance(row[name], str):  # SQLite keeps UTC text
                row[name] = datetime.fromisoformat(row[name]).replace(tzinfo=UTC)
        if isinstance(row["extra"], str):
            row["extra"] = json.loads(row["extra"])
        out[row["id"]] = _normalise(row)
    return out


def wait_until(condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll until `condition` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def stored_pages(db_url: str, company: str = "1") -> int:
    """Pages an unfinished pass has committed (0 before the schema or a checkpoint exists)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            pages = conn.execute(
                text("SELECT pages FROM checkpoints WHERE company_id = :c"), {"c": company}
            ).scalar()
    except Exception:
        pages = None
    finally:
        engine.dispose()
    return int(pages or 0)


def safe_rows(db_url: str, company: str = "1") -> dict[int, Any]:
    """mirror_rows, or nothing while the database is still being created."""
    try:
        return mirror_rows(db_url, company)
    except Exception:
        return {}


def end_lock_sessions(admin_dsn: str, db_url: str) -> None:
    """What a database restart does to the sessions holding advisory locks in db_url."""
    database = make_url(db_url).database
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d"
            " ON d.oid = l.database WHERE l.locktype = 'advisory' AND d.datname = %s",
            (database,),
        ).fetchall()
    assert ended


@contextmanager
def engine_for(settings: Settings, observer: object = None) -> Iterator[SyncEngine]:
    """An engine on its own store, closed afterwards (with a display `observer`, if given)."""
    store = MirrorStore.open(settings.database.url)
    engine = SyncEngine.from_settings(settings, store, observer=observer)  # type: ignore[arg-type]
    try:
        yield engine
    finally:
        engine.close()
        store.close()


def run_pass(settings: Settings, **kwargs: object) -> PassReport:
    """One pass for company 1 (`backfill=True` etc. as keywords)."""
    with engine_for(settings) as engine:
        return engine.sync_company("1", **kwargs)  # type: ignore[arg-type]


def cursor_of(settings: Settings) -> object:
    store = MirrorStore.open(settings.database.url)
    try:
        return store.read_state("1").cursor
    finally:
        store.close()


def daemon_env(**extra: str) -> dict[str, str]:
    """This environment without contacts-sync settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")}
    env.update(extra)
    return env


class DaemonProcess:
    """One `contacts-sync run` process, its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sync", "--config", str(config), "run"],
            env=daemon_env(**env),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def stop(self, timeout: float = 15) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close()


def install_failing_trigger(raw: Engine, table: str, condition: str) -> None:
    """A real database error on demand: the trigger aborts the statement that fires it."""
    with raw.begin() as conn:
        if raw.dialect.name == "sqlite":
            conn.execute(
                text(
                    f"CREATE TRIGGER forced BEFORE INSERT ON {table} WHEN {condition} "
                    "BEGIN SELECT RAISE(ABORT, 'forced failure'); END"
                )
            )
            return
        conn.execute(
            text(
                "CREATE FUNCTION forced() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'forced failure'; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER forced BEFORE INSERT ON {table} FOR EACH ROW "
                f"WHEN ({condition}) EXECUTE FUNCTION forced()"
            )
        )
