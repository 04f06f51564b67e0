"""`contacts-sync dbt-sources`: a sources.yml that describes the mirror a real pass filled, and
that dbt itself accepts (when `make dbt` could install it into .venv-dbt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from conftest import make_settings, run_pass

from sync.dbt import key_text, loaded_at_query, sources
from sync.models import PUBLISHED
from sync.sandbox import SandboxData, SandboxServer

DBT_VENV = Path(__file__).resolve().parent.parent / ".venv-dbt"
DBT = DBT_VENV / "bin" / "dbt"
DBT_INSTALLED = (DBT_VENV / ".installed").exists()
"""`make dbt` marks a finished install; `make test` tries it and goes on when it fails."""


@pytest.fixture
def small_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData.generate(("1",), 40, seed=5)) as server:
        yield server


def dbt_sources_text(config: Path, *args: str) -> str:
    """What the real command prints."""
    result = subprocess.run(
        [sys.executable, "-m", "sync", "--config", str(config), "dbt-sources", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def dbt_sources(config: Path, *args: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(dbt_sources_text(config, *args))
    return document


def write_config(path: Path, server: SandboxServer, db_url: str, interval: str) -> Path:
    path.write_text(
        f'[api]\nbase_url = "{server.base_url}"\ncompanies = ["1"]\n'
        f'[database]\nurl = "{db_url}"\n[sync]\ninterval = "{interval}"\n',
        encoding="utf-8",
    )
    return path


def database_columns(db_url: str, relation: str) -> dict[str, str]:
    """The relation's columns and their types, as the database itself reports them."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                rows = conn.exec_driver_sql(f"PRAGMA table_info({relation})").all()
                return {row.name: row.type.lower() for row in rows}
            rows = conn.execute(
                sa.text(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = :r ORDER BY ordinal_position"
                ),
                {"r": relation},
            ).all()
            return {row.column_name: row.data_type for row in rows}
    finally:
        engine.dispose()


class TestSourcesFile:
    def test_it_describes_the_mirror_a_pass_filled(
        self, db_url: str, small_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """Each published table and view is in the file with the database's own columns and
        types, each described, its key tested, and freshness on contacts from the passes."""
        run_pass(make_settings(small_sandbox, db_url))
        config = write_config(tmp_path / "sync.toml", small_sandbox, db_url, "5m")
        document = dbt_sources(config)

        assert document["version"] == 2
        (source,) = document["sources"]
        assert source["name"] == "contacts_sync"
        if db_url.startswith("sqlite"):
            assert (source.get("database"), source["schema"]) == (None, "main")
        else:
            assert (source["database"], source["schema"]) == (
                sa.make_url(db_url).database,
                "public",
            )
        tables = {table["name"]: table for table in source["tables"]}
        assert list(tables) == [published.name for published in PUBLISHED]
        assert {"contacts", "contacts_live"} <= set(tables)
        for published in PUBLISHED:
            table = tables[published.name]
            assert table["description"] == published.comment
            listed = {column["name"]: column["data_type"] for column in table["columns"]}
            assert listed == database_columns(db_url, published.name)
            assert all(column["description"] for column in table["columns"])
            key = list(published.table.primary_key.columns)
            tested = {c["name"]: c["data_tests"] for c in table["columns"] if "data_tests" in c}
            assert tested == {column.name: ["not_null"] for column in key}
            assert table["data_tests"] == [{"unique": {"column_name": key_text(key)}}]
        assert tables["contacts"]["loaded_at_query"] == loaded_at_query(source["schema"])
        assert tables["contacts"]["freshness"] == {
            "warn_after": {"count": 10, "period": "minute"},
            "error_after": {"count": 20, "period": "minute"},
        }
        assert "freshness" not in tables["contacts_live"]

    def test_the_name_option_names_the_source(
        self, sqlite_url: str, small_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """--name sets the source name models refer to; the relations stay the same."""
        config = write_config(tmp_path / "sync.toml", small_sandbox, sqlite_url, "1h")
        (source,) = dbt_sources(config, "--name", "crm")["sources"]
        assert source["name"] == "crm"
        assert source["tables"][0]["freshness"]["warn_after"] == {"count": 2, "period": "hour"}


class TestDerivedSettings:
    @pytest.mark.parametrize(
        ("interval_s", "warn", "error"),
        [
            (300, (10, "minute"), (20, "minute")),
            (90, (3, "minute"), (6, "minute")),
            (1800, (1, "hour"), (2, "hour")),
            (10, (1, "minute"), (1, "minute")),
        ],
    )
    def test_freshness_is_two_and_four_intervals(
        self, interval_s: float, warn: tuple[int, str], error: tuple[int, str]
    ) -> None:
        """warn_after is two sync intervals, error_after four, in whole minutes rounded up."""
        contacts = sources("sqlite:///m.db", interval_s)["sources"][0]["tables"][0]
        freshness = contacts["freshness"]
        assert (freshness["warn_after"]["count"], freshness["warn_after"]["period"]) == warn
        assert (freshness["error_after"]["count"], freshness["error_after"]["period"]) == error

    @pytest.mark.parametrize(
        ("url", "database", "schema"),
        [
            ("postgresql+psycopg://reporter:s3cret-pw@db.internal/crm", "crm", "public"),
            ("postgresql+psycopg://u@h/crm?options=-csearch_path%3Dmirror", "crm", "mirror"),
            (
                "postgresql+psycopg://u@h/crm?options=-c%20search_path%3D%22%24user%22,sync",
                "crm",
                "sync",
            ),
        ],
    )
    def test_postgres_location_comes_from_the_url(
        self, url: str, database: str, schema: str
    ) -> None:
        """The database is the URL's; the schema the first of a search_path in its options,
        else public; neither host, user nor password appears."""
        (source,) = sources(url, 300)["sources"]
        assert (source["database"], source["schema"]) == (database, schema)
        assert set(source) == {"name", "description", "database", "schema", "tables"}
        written = json.dumps(source)
        assert not [part for part in ("s3cret-pw", "reporter", "db.internal") if part in written]

    def test_every_published_column_is_described(self) -> None:
        """A relation joins the file with its model's comments, so none may lack one."""
        for published in PUBLISHED:
            assert published.comment
            assert all(column.comment for column in published.table.columns), published.name

    @pytest.mark.parametrize(
        ("columns", "keys"),
        [
            (
                [sa.Column("company_id", sa.Text), sa.Column("id", sa.BigInteger)],
                [("1:2", 3), ("1", 23), ("12", 3), ("1", 2), ("1:", 23)],
            ),
            (
                [sa.Column("a", sa.Text), sa.Column("b", sa.Text), sa.Column("n", sa.Integer)],
                [("x:y", "z", 1), ("x", "y:z", 1), ("x", "y", 1), ("1:x", "", 1), ("1", "x:", 1)],
            ),
        ],
    )
    def test_the_key_text_tells_keys_apart(
        self, sqlite_url: str, columns: list[sa.Column[Any]], keys: list[tuple[Any, ...]]
    ) -> None:
        """The text the uniqueness test compares differs between keys that a plain join of
        their columns would merge (two text columns), so the test fails only on a repeated key."""
        names = [column.name for column in columns]
        row = ", ".join(f":{name} AS {name}" for name in names)
        query = sa.text(f"SELECT {key_text(columns)} FROM (SELECT {row})")  # noqa: S608
        engine = sa.create_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                texts = [
                    conn.execute(query, dict(zip(names, key, strict=True))).scalar_one()
                    for key in keys
                ]
        finally:
            engine.dispose()
        assert len(set(texts)) == len(keys)


def _dbt(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CONTACTS_SYNC_", "DBT_"))},
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
    }
    return subprocess.run(
        [str(DBT), *args, "--project-dir", str(project), "--profiles-dir", str(project)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=project,
    )


def _dbt_project(project: Path, db_url: str, sources_yml: str) -> None:
    url = sa.make_url(db_url)
    (project / "models").mkdir(parents=True)
    (project / "models" / "sources.yml").write_text(sources_yml, encoding="utf-8")
    (project / "dbt_project.yml").write_text(
        "name: mirror_check\nversion: '1.0'\nconfig-version: 2\nprofile: mirror\n"
        "flags:\n  send_anonymous_usage_stats: false\n",
        encoding="utf-8",
    )
    profile = {
        "mirror": {
            "target": "test",
            "outputs": {
                "test": {
                    "type": "postgres",
                    "host": url.host or "127.0.0.1",
                    "port": url.port or 5432,
                    "user": url.username or "postgres",
                    "password": url.password or "",
                    "dbname": url.database,
                    "schema": "public",
                    "threads": 1,
                }
            },
        }
    }
    (project / "profiles.yml").write_text(yaml.safe_dump(profile), encoding="utf-8")


def _freshness_result(project: Path) -> dict[str, Any]:
    results = json.loads((project / "target" / "sources.json").read_text(encoding="utf-8"))
    (result,) = results["results"]
    assert result["unique_id"] == "source.mirror_check.contacts_sync.contacts"
    return dict(result)


def _last_pass_began(db_url: str) -> datetime:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            latest: datetime = conn.execute(
                sa.text("SELECT min(last_pass_started_at) FROM sync_state")
            ).scalar_one()
    finally:
        engine.dispose()
    return latest


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.skipif(not DBT_INSTALLED, reason="dbt is not installed here (make dbt)")
class TestWithDbt:
    def test_dbt_checks_freshness_and_keys_of_a_synced_mirror(
        self, pg_url: str, small_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """dbt reads the file: freshness of the freshly synced mirror passes, measured on the
        last pass's start with the thresholds of a 1 m interval; every key test passes."""
        run_pass(make_settings(small_sandbox, pg_url))
        config = write_config(tmp_path / "sync.toml", small_sandbox, pg_url, "1m")
        project = tmp_path / "dbt"
        _dbt_project(project, pg_url, dbt_sources_text(config))

        fresh = _dbt(project, "source", "freshness")
        assert fresh.returncode == 0, fresh.stdout
        assert "deprecat" not in fresh.stdout.lower(), fresh.stdout
        result = _freshness_result(project)
        assert result["status"] == "pass"
        assert datetime.fromisoformat(result["max_loaded_at"]) == _last_pass_began(pg_url)
        assert result["criteria"]["warn_after"] == {"count": 2, "period": "minute"}
        assert result["criteria"]["error_after"] == {"count": 4, "period": "minute"}

        tested = _dbt(project, "test", "--select", "source:*")
        assert tested.returncode == 0, tested.stdout
        # Per relation: not_null on each key column, and the key's uniqueness.
        expected = sum(len(p.table.primary_key.columns) + 1 for p in PUBLISHED)
        assert f"PASS={expected}" in tested.stdout, tested.stdout
