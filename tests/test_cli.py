"""The command line as users run it: a real process, a real sandbox, exit codes and messages."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import mirror_rows, safe_rows, stored_pages, upstream_rows, wait_until

from sync.sandbox import SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

SECRET = "s3cr3t-T0KEN-4c7e1d"
Runner = Callable[..., subprocess.CompletedProcess[str]]


def write_config(
    path: Path, server: SandboxServer, db_url: str, **sections: dict[str, Any]
) -> Path:
    values: dict[str, dict[str, Any]] = {
        "api": {
            "base_url": server.base_url,
            "token": SECRET,
            "companies": ["1"],
            "api_version": "2024-01",
            "timeout_s": 5,
        },
        "database": {"url": db_url},
        "retry": {"max_attempts": 3, "max_elapsed_s": 5},
    }
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")}


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


@pytest.fixture
def server() -> Any:
    data = SandboxData.generate(("1", "2", "3"), 1200, seed=3)
    with SandboxServer(data, SandboxConfig(tokens=(SECRET,), forbidden_companies=("3",))) as srv:
        yield srv


def one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1]
    assert last.endswith("."), stderr
    return last


class TestOnceAndStatus:
    def test_once_mirrors_and_status_json_reports_it(
        self, server: SandboxServer, db_url: str, tmp_path: Path
    ) -> None:
        """`once` exits 0 after mirroring; `status --json` reports the contract's fields."""
        config = write_config(tmp_path / "sync.toml", server, db_url)
        done = cli(config, "once")
        assert done.returncode == 0, done.stderr
        assert mirror_rows(db_url) == upstream_rows(server)
        shown = json.loads(cli(config, "status", "--json").stdout)
        (company,) = shown["companies"]
        assert company["company_id"] == "1"
        assert company["contacts"] == 1200
        assert company["deleted"] == 0
        assert company["quarantined"] == 0
        assert company["last_error"] is None
        assert company["cursor"].endswith("Z")
        assert company["last_success_at"] is not None
        assert company["last_pass"]["rows_fetched"] >= 1200
        assert company["last_pass"]["off_filter"] == 0

    def test_status_tells_of_rows_outside_the_filter_sent(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """An upstream that ignored the filter shows in status: a count and a sentence."""
        config = write_config(tmp_path / "sync.toml", server, sqlite_url)
        assert cli(config, "once").returncode == 0
        old = {"id": 5000, "updated_at": "2020-01-01T00:00:00Z"}
        server.data.put_raw("1", old, unfiltered=True)
        assert cli(config, "once").returncode == 0
        shown = json.loads(cli(config, "status", "--json").stdout)
        assert shown["companies"][0]["last_pass"]["off_filter"] == 1
        table = " ".join(cli(config, "status").stdout.split())
        assert "the last pass stored 1 row that the filter it sent should have excluded" in table

    def test_status_table_lists_every_company(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """The human status lists each configured company, even one never synced."""
        config = write_config(
            tmp_path / "sync.toml", server, sqlite_url, api={"companies": ["1", "2"]}
        )
        shown = cli(config, "status")
        assert shown.returncode == 0
        assert "contacts-sync status" in shown.stdout
        assert "never" in shown.stdout


class TestExitCodes:
    def test_bad_token_exits_3_after_one_request(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """A rejected token exits 3 with one sentence, after a single request."""
        config = write_config(tmp_path / "sync.toml", server, sqlite_url, api={"token": "nope"})
        done = cli(config, "once")
        assert done.returncode == 3
        assert "token" in one_sentence(done.stderr)
        assert len(server.requests("1")) == 1

    def test_upstream_down_exits_5_and_keeps_the_cursor(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """Exhausted retries exit 5, say what to do, and leave the cursor where it was."""
        config = write_config(tmp_path / "sync.toml", server, sqlite_url)
        assert cli(config, "once").returncode == 0
        store = MirrorStore.open(sqlite_url)
        before = store.read_state("1").cursor
        server.data.update("1", count=20)
        server.faults.fail_company("1", status=503)
        done = cli(config, "once")
        assert done.returncode == 5
        assert "run again later" in one_sentence(done.stderr)
        assert store.read_state("1").cursor == before
        assert store.read_state("1").last_error is not None
        store.close()

    @pytest.mark.parametrize(
        ("section", "key", "value"),
        [("api", "page_size", 101), ("api", "colour", "blue"), ("sync", "interval", "soon")],
    )
    def test_bad_config_exits_2_naming_the_key(
        self,
        server: SandboxServer,
        sqlite_url: str,
        tmp_path: Path,
        section: str,
        key: str,
        value: object,
    ) -> None:
        """A wrong key, type or value exits 2 with a sentence naming the key."""
        config = write_config(tmp_path / "sync.toml", server, sqlite_url, **{section: {key: value}})
        done = cli(config, "once")
        assert done.returncode == 2
        assert f"{section}.{key}" in one_sentence(done.stderr)
        assert server.requests() == []

    def test_missing_config_file_exits_2(self, tmp_path: Path) -> None:
        """A config file that is named but absent exits 2."""
        done = cli(tmp_path / "absent.toml", "once")
        assert done.returncode == 2
        assert "does not exist" in one_sentence(done.stderr)

    def test_locked_company_exits_7(
        self, server: SandboxServer, db_url: str, tmp_path: Path
    ) -> None:
        """While another holder has the company's lock, `once` exits 7 without fetching."""
        config = write_config(tmp_path / "sync.toml", server, db_url)
        store = MirrorStore.open(db_url)
        try:
            with store.company_lock("1"):
                done = cli(config, "once")
        finally:
            store.close()
        assert done.returncode == 7
        assert "another process" in one_sentence(done.stderr)
        assert server.requests("1") == []


class TestManyCompanies:
    def test_a_broken_company_does_not_stop_the_others(
        self, server: SandboxServer, db_url: str, tmp_path: Path
    ) -> None:
        """With company 3 forbidden, 1 and 2 are mirrored; the exit code is 3; status shows all."""
        config = write_config(
            tmp_path / "sync.toml", server, db_url, api={"companies": ["1", "2", "3"]}
        )
        done = cli(config, "once")
        assert done.returncode == 3
        assert "Company 3" in done.stderr
        assert mirror_rows(db_url, "1") == upstream_rows(server, "1")
        assert mirror_rows(db_url, "2") == upstream_rows(server, "2")
        shown = json.loads(cli(config, "status", "--json").stdout)["companies"]
        by_id = {c["company_id"]: c for c in shown}
        assert by_id["1"]["contacts"] == by_id["2"]["contacts"] == 1200
        assert by_id["3"]["contacts"] == 0
        assert by_id["3"]["last_error"]
        assert by_id["3"]["cursor"] is None


class TestBackfillResume:
    def test_killed_backfill_resumes_from_its_checkpoint(self, db_url: str, tmp_path: Path) -> None:
        """SIGKILL half-way through a backfill: the rerun fetches under 60% of the pages again."""
        data = SandboxData.generate(("1",), 6000, seed=9)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=15)) as srv:
            config = write_config(tmp_path / "sync.toml", srv, db_url, api={"concurrency": 1})
            process = subprocess.Popen(
                [sys.executable, "-m", "sync", "--config", str(config), "backfill"],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(lambda: stored_pages(db_url) >= 30, 60, "30 stored pages")
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
            store = MirrorStore.open(db_url)
            assert store.read_state("1").cursor is None
            store.close()
            first_run = len(srv.requests("1"))
            srv.clear_requests()
            done = cli(config, "backfill")
            assert done.returncode == 0, done.stderr
            full = math_ceil_pages(6000)
            assert len(srv.requests("1")) < 0.6 * full
            assert first_run >= 30
            assert mirror_rows(db_url) == upstream_rows(srv)
            again = MirrorStore.open(db_url)
            assert again.read_state("1").cursor is not None
            assert again.load_checkpoint("1") is None
            again.close()


def math_ceil_pages(rows: int, limit: int = 100) -> int:
    """Pages a quiet full walk takes: 99 new rows a page after the first, then the short one."""
    return 1 + -(-(rows - limit + 1) // (limit - 1))


class TestSecrets:
    def test_token_appears_nowhere(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """At debug level, through retries and failures, the token is in no output or file."""
        config = write_config(
            tmp_path / "sync.toml",
            server,
            sqlite_url,
            api={"companies": ["1", "3"]},
            log={"level": "debug", "format": "json"},
        )
        for kind in ("429", "500", "reset", "malformed"):
            server.faults.add(kind)  # type: ignore[arg-type]
        outputs = [cli(config, "once"), cli(config, "status"), cli(config, "status", "--json")]
        assert outputs[0].returncode == 3
        text_seen = "".join(o.stdout + o.stderr for o in outputs)
        assert "upstream.retry" in text_seen
        assert SECRET not in text_seen
        for path in tmp_path.iterdir():
            if path.name != "sync.toml" and path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


class TestDaemon:
    def test_run_syncs_reconciles_and_stops_cleanly_on_sigterm(
        self, server: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """`run` passes at start-up, reconciles on schedule, and exits 0 soon after SIGTERM."""
        config = write_config(
            tmp_path / "sync.toml",
            server,
            sqlite_url,
            sync={"interval": "1h", "reconcile_interval": "1s"},
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "sync", "--config", str(config), "run"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: len(safe_rows(sqlite_url)) == 1200, timeout=30)
            gone = set(server.data.delete("1", count=3))
            wait_until(lambda: gone.isdisjoint(safe_rows(sqlite_url)), timeout=30)
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
        assert code == 0
        assert time.monotonic() - started < 10
        assert mirror_rows(sqlite_url) == upstream_rows(server)


class TestDemo:
    def test_the_demo_tells_the_story_and_leaves_a_mirror(self, tmp_path: Path) -> None:
        """`make demo`'s command: a full load, upstream changes, an incremental pass, status;
        the contacts it reports are the mirror's, not the rows read (pages overlap)."""
        database = tmp_path / "demo.db"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sync",
                "demo",
                "--database",
                str(database),
                "--contacts",
                "500",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        said = " ".join(done.stdout.split())  # rich wraps lines at the terminal's width
        assert "500 contacts in the mirror" in said
        assert "505 contacts in the mirror" in said  # 5 added upstream, then synced
        with sqlite3.connect(database) as conn:
            assert conn.execute("SELECT count(*) FROM contacts").fetchone() == (505,)
