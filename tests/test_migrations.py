"""Alembic owns the schema: a mirror made by an older revision opens at head with its data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import mirror_rows

from sync.errors import DatabaseError
from sync.models import VERSION_TABLE, metadata
from sync.store import MirrorStore, schema_head

FIRST = "0001"

# The tables as revision 0001 made them, written out here so that later models cannot change
# what this test inserts.
_V1 = sa.MetaData()
_CONTACTS_V1 = sa.Table(
    "contacts",
    _V1,
    sa.Column("company_id", sa.Text),
    sa.Column("id", sa.BigInteger),
    sa.Column("client_id", sa.BigInteger),
    sa.Column("email", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("synced_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    sa.Column("extra", sa.JSON),
)
_STATE_V1 = sa.Table(
    "sync_state",
    _V1,
    sa.Column("company_id", sa.Text),
    sa.Column("cursor", sa.DateTime(timezone=True)),
    sa.Column("last_success_at", sa.DateTime(timezone=True)),
)
CURSOR = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "sync:migrations")
    config.set_main_option("sqlalchemy.url", url)
    return config


def _at(moment: datetime, dialect: str) -> datetime:
    """What the 0001 columns hold: naive UTC on SQLite, aware on PostgreSQL."""
    return moment.replace(tzinfo=None) if dialect == "sqlite" else moment


def _create_at_first_revision(url: str) -> None:
    command.upgrade(_alembic(url), FIRST)
    engine = sa.create_engine(url)
    dialect = engine.dialect.name
    try:
        with engine.begin() as conn:
            conn.execute(
                _CONTACTS_V1.insert(),
                [
                    {
                        "company_id": "7",
                        "id": n,
                        "client_id": 3,
                        "email": f"c{n}@example.com",
                        "name": f"Name {n}",
                        "created_at": _at(CURSOR, dialect),
                        "updated_at": _at(CURSOR, dialect),
                        "synced_at": _at(CURSOR, dialect),
                        "deleted_at": _at(CURSOR, dialect) if n == 3 else None,
                        "extra": {"tier": n} if n == 1 else None,
                    }
                    for n in (1, 2, 3)
                ],
            )
            conn.execute(
                _STATE_V1.insert(),
                {
                    "company_id": "7",
                    "cursor": _at(CURSOR, dialect),
                    "last_success_at": _at(CURSOR, dialect),
                },
            )
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


class TestUpgradeFromFirstRevision:
    def test_a_0001_mirror_opens_at_head_with_its_rows_and_cursor(self, db_url: str) -> None:
        """Opening a mirror made at 0001 upgrades it to head and keeps rows, deletions, cursor."""
        _create_at_first_revision(db_url)
        assert _revision(db_url) == FIRST
        store = MirrorStore.open(db_url)
        try:
            state = store.read_state("7")
            status = store.status(["7"])[0]
        finally:
            store.close()
        head = ScriptDirectory.from_config(_alembic(db_url)).get_current_head()
        assert _revision(db_url) == head
        assert state.cursor == CURSOR
        assert (status.contacts, status.deleted) == (2, 1)
        rows = mirror_rows(db_url, "7", live_only=False)
        assert sorted(rows) == [1, 2, 3]
        assert rows[1]["email"] == "c1@example.com"
        assert rows[1]["extra"] == {"tier": 1}
        assert rows[2]["updated_at"] == "2025-03-01T12:00:00.123+00:00"

    def test_the_store_knows_the_head_revision(self, sqlite_url: str) -> None:
        """The store skips Alembic when the database is at schema_head(), so it must be the head."""
        head = ScriptDirectory.from_config(_alembic(sqlite_url)).get_current_head()
        assert head == schema_head()

    def test_a_mirror_from_a_newer_version_is_refused(self, sqlite_url: str) -> None:
        """A schema revision this version does not know is a database error, not a crash."""
        MirrorStore.open(sqlite_url).close()
        engine = sa.create_engine(sqlite_url)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))  # noqa: S608
        engine.dispose()
        with pytest.raises(DatabaseError, match="upgrade contacts-sync"):
            MirrorStore.open(sqlite_url)

    def test_head_matches_the_models(self, db_url: str) -> None:
        """After the migrations, the database has exactly the tables and columns of the models."""
        MirrorStore.open(db_url).close()
        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as conn:
                context = MigrationContext.configure(
                    conn, opts={"version_table": VERSION_TABLE, "compare_type": False}
                )
                differences = compare_metadata(context, metadata)
        finally:
            engine.dispose()
        assert differences == []
