"""What BI tools see in the mirror: the contacts_live view, and PostgreSQL comments that say what
each table and column means, written once in sync.models."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from conftest import make_settings, mirror_rows, run_pass

from sync.dbt import loaded_at_query
from sync.models import LIVE_VIEW, PUBLISHED, metadata
from sync.sandbox import SandboxData, SandboxServer
from sync.store import MirrorStore

BEFORE_BI = "0002"


@pytest.fixture
def small_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData.generate(("1",), 30, seed=9)) as server:
        yield server


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "sync:migrations")
    config.set_main_option("sqlalchemy.url", url)
    return config


def _comments(url: str, relation: str) -> tuple[str | None, dict[str, str | None]]:
    """The relation's comment and its columns' comments, as PostgreSQL holds them."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            comment = conn.execute(
                sa.text("SELECT obj_description(CAST(:r AS regclass), 'pg_class')"), {"r": relation}
            ).scalar_one()
            columns = sa.inspect(conn).get_columns(relation)
    finally:
        engine.dispose()
    return comment, {column["name"]: column.get("comment") for column in columns}


def _views(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).get_view_names()
    finally:
        engine.dispose()


class TestLiveView:
    def test_it_holds_the_live_rows_with_every_column(
        self, db_url: str, small_sandbox: SandboxServer
    ) -> None:
        """contacts_live is contacts less the rows reconcile marked deleted, column for column."""
        run_pass(make_settings(small_sandbox, db_url))
        store = MirrorStore.open(db_url)
        try:
            assert store.mark_deleted("1", [3, 7], datetime.now(UTC), hard=False) == 2
        finally:
            store.close()
        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as conn:
                live = conn.execute(sa.text(f"SELECT * FROM {LIVE_VIEW}")).mappings().all()  # noqa: S608
        finally:
            engine.dispose()
        expected = mirror_rows(db_url)
        assert len(expected) == 28
        assert sorted(row["id"] for row in live) == sorted(expected)
        assert list(live[0]) == [column.name for column in metadata.tables["contacts"].columns]


@pytest.mark.postgres
class TestComments:
    def test_postgres_holds_the_models_comments(self, pg_url: str) -> None:
        """Every table and published view, and each of their columns, carries its comment
        from sync.models, where BI tools read it."""
        MirrorStore.open(pg_url).close()
        for table in metadata.tables.values():
            assert _comments(pg_url, table.name) == (
                table.comment,
                {column.name: column.comment for column in table.columns},
            )
        for published in PUBLISHED:
            comment, columns = _comments(pg_url, published.name)
            assert comment == published.comment
            assert columns == {column.name: column.comment for column in published.table.columns}


class TestDowngrade:
    def test_downgrade_removes_the_view_and_comments_and_upgrade_restores_them(
        self, db_url: str, small_sandbox: SandboxServer
    ) -> None:
        """Going back to the revision before BI metadata drops the view (and on PostgreSQL the
        comments) and keeps the rows; opening the mirror again brings both back."""
        run_pass(make_settings(small_sandbox, db_url))
        command.downgrade(_alembic(db_url), BEFORE_BI)
        assert _views(db_url) == []
        if db_url.startswith("postgresql"):
            comment, columns = _comments(db_url, "contacts")
            assert comment is None
            assert set(columns.values()) == {None}
        assert len(mirror_rows(db_url)) == 30

        MirrorStore.open(db_url).close()
        assert _views(db_url) == [LIVE_VIEW]
        if db_url.startswith("postgresql"):
            assert _comments(db_url, "contacts")[0] == metadata.tables["contacts"].comment


class TestFreshnessQuery:
    def test_a_pass_with_nothing_new_moves_the_freshness_dbt_reads(
        self, db_url: str, small_sandbox: SandboxServer
    ) -> None:
        """A quiet pass writes no row, but it completes: the time dbt's freshness reads (the
        start of the stalest company's last pass) follows the passes on a quiet list too."""
        settings = make_settings(small_sandbox, db_url)
        run_pass(settings)
        first = _loaded_at(db_url)
        assert run_pass(settings).upserted == 0
        assert _loaded_at(db_url) > first


def _loaded_at(url: str) -> datetime:
    schema = "main" if url.startswith("sqlite") else "public"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            latest = conn.execute(sa.text(loaded_at_query(schema))).scalar_one()
    finally:
        engine.dispose()
    return datetime.fromisoformat(latest) if isinstance(latest, str) else latest
