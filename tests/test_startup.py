"""Start-up: each command imports only what it uses, and an up-to-date mirror opens without
Alembic. Checked in the `sys.modules` of a real process, never by timing it."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sync.store
from sync.config import PUBLIC_SANDBOX_TOKEN
from sync.sandbox import DEFAULT_TOKEN, SandboxServer
from sync.store import MirrorStore, schema_head

_PROBE = """
import json, sys
out = sys.argv[1]
sys.argv = ["contacts-sync", *sys.argv[2:]]
from sync.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as written:
    json.dump({"code": code, "modules": sorted(sys.modules)}, written)
"""
"""Runs the console script's main() with the given arguments, then writes its exit code and
every module the process imported to the file named first."""

HEAVY = {
    "alembic",
    "apscheduler",
    "httpx",
    "msgspec",
    "prometheus_client",
    "psycopg",
    "pydantic",
    "pydantic_settings",
    "rich",
    "sqlalchemy",
    "sqlmodel",
    "starlette",
    "structlog",
    "tenacity",
    "uvicorn",
}
"""Libraries that take tens of milliseconds or more to import."""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")}


def _probe(tmp_path: Path, *args: str) -> tuple[int, set[str]]:
    """Run a command in a fresh process: its exit code and the top-level packages it imported."""
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    found = json.loads(out.read_text())
    return found["code"], {name.split(".")[0] for name in found["modules"]}


def _config(tmp_path: Path, server: SandboxServer | None = None) -> Path:
    """A config with a SQLite mirror already at the newest schema."""
    url = f"sqlite:///{tmp_path / 'mirror.db'}"
    MirrorStore.open(url).close()
    base_url = server.base_url if server is not None else "http://127.0.0.1:9"
    config = tmp_path / "sync.toml"
    config.write_text(
        f'[api]\nbase_url = "{base_url}"\ntoken = "{DEFAULT_TOKEN}"\ncompanies = ["1"]\n'
        f'[database]\nurl = "{url}"\n[log]\nlevel = "warning"\n'
    )
    return config


class TestLazyImports:
    def test_help_imports_none_of_the_libraries(self, tmp_path: Path) -> None:
        """`--help` imports typer alone: none of the libraries the commands use."""
        code, imported = _probe(tmp_path, "--help")
        assert code == 0
        assert imported & HEAVY == set()

    def test_status_reads_the_mirror_without_alembic_or_http(self, tmp_path: Path) -> None:
        """`status` on a mirror at the newest schema imports neither Alembic nor what passes
        use (httpx, tenacity), nor PostgreSQL's driver for a SQLite mirror."""
        code, imported = _probe(tmp_path, "--config", str(_config(tmp_path)), "status")
        assert code == 0
        assert "sqlalchemy" in imported
        assert imported & {"alembic", "httpx", "tenacity", "psycopg", "starlette"} == set()

    def test_once_on_an_up_to_date_mirror_skips_alembic(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """`once` opens a mirror at the newest schema without Alembic, and a SQLite one
        without psycopg; nor does it load the daemon's scheduler, metrics or the sandbox."""
        config = _config(tmp_path, sandbox)
        code, imported = _probe(tmp_path, "--config", str(config), "once")
        assert code == 0
        assert sandbox.requests("1")
        assert "httpx" in imported
        assert imported & {"alembic", "psycopg", "apscheduler", "prometheus_client"} == set()
        assert imported & {"starlette", "uvicorn"} == set()

    def test_sandbox_needs_no_database_nor_settings(self, tmp_path: Path) -> None:
        """`sandbox` serves without SQLAlchemy, pydantic-settings or httpx."""
        out = tmp_path / "modules.json"
        process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, str(out), "sandbox", "--port", "0", "--contacts", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**_env(), "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready
            assert "Sandbox serving" in process.stdout.readline()
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        imported = {name.split(".")[0] for name in json.loads(out.read_text())["modules"]}
        assert {"starlette", "uvicorn"} <= imported
        assert imported & {"sqlalchemy", "pydantic_settings", "httpx", "alembic"} == set()

    def test_the_sandbox_token_is_the_one_config_knows_as_public(self) -> None:
        """The sandbox writes its token out to spare the import of sync.config: the two agree."""
        assert DEFAULT_TOKEN == PUBLIC_SANDBOX_TOKEN


@pytest.fixture
def migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the migration files that schema_head() reads instead of the package's."""
    copy = tmp_path / "versions"
    shutil.copytree(Path(sync.store.__file__).with_name("migrations") / "versions", copy)
    monkeypatch.setattr(sync.store, "_MIGRATIONS", copy)
    schema_head.cache_clear()
    yield copy
    schema_head.cache_clear()


def _revision(path: Path, revision: str, down: object) -> None:
    path.write_text(
        f'"""A later change."""\n\nrevision: str = {revision!r}\n'
        f"down_revision: str | tuple[str, ...] | None = {down!r}\n"
    )


class TestSchemaHead:
    def test_a_new_migration_file_is_the_head_at_once(self, migrations: Path) -> None:
        """The head is read from the files: a revision added on top becomes it, whatever its
        file is called."""
        current = schema_head()
        assert current is not None
        _revision(migrations / "0099_later.py", "abc123", current)
        schema_head.cache_clear()
        assert schema_head() == "abc123"

    def test_two_heads_leave_the_judgement_to_alembic(self, migrations: Path) -> None:
        """Two revisions on the same parent are no single head: None, so Alembic runs."""
        current = schema_head()
        _revision(migrations / "0098_one.py", "one", current)
        _revision(migrations / "0099_two.py", "two", current)
        schema_head.cache_clear()
        assert schema_head() is None
        _revision(migrations / "0100_merge.py", "merged", ("one", "two"))
        schema_head.cache_clear()
        assert schema_head() == "merged"


class TestUsageErrors:
    def test_an_unknown_command_exits_2_with_a_hint(self, tmp_path: Path) -> None:
        """A usage error exits 2 and says where the help is, without a traceback."""
        done = subprocess.run(
            [sys.executable, "-m", "sync", "nonsense"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
            check=False,
        )
        assert done.returncode == 2
        assert "No such command 'nonsense'" in done.stderr
        assert "--help' for help" in done.stderr
        assert "Traceback" not in done.stderr
