"""Many companies: passes in parallel on one daemon, fairly, and replicas sharing one schedule."""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, make_settings, mirror_rows, upstream_rows, wait_until
from test_cli import SECRET, write_config
from test_daemon import _assert_never_twice_at_once

from sync.engine import SyncEngine
from sync.sandbox import SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

pytestmark = pytest.mark.slow


def _spans(daemon: DaemonProcess) -> list[tuple[float, float, str]]:
    """(start, end, company) of every pass this daemon ended."""
    started: dict[str, float] = {}
    spans = []
    for event in daemon.events():
        name, company = event.get("event"), event.get("company_id")
        moment = datetime.fromisoformat(event["timestamp"]).timestamp()
        if name == "pass.started":
            started[company] = moment
        elif name in ("pass.finished", "pass.failed") and company in started:
            spans.append((started.pop(company), moment, company))
    return spans


def _most_at_once(spans: list[tuple[float, float, str]]) -> int:
    edges = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _finished(daemons: list[DaemonProcess]) -> set[str]:
    return {e["company_id"] for d in daemons for e in d.events("pass.finished")}


class TestParallelCompanies:
    def test_once_runs_companies_at_once(self, sqlite_url: str) -> None:
        """`once` (sync_all with workers) overlaps the companies' passes; each is exact."""
        companies = [str(n) for n in range(1, 5)]
        data = SandboxData.generate(tuple(companies), 150, seed=3)
        with SandboxServer(data, SandboxConfig(latency_ms=150)) as server:
            settings = make_settings(server, sqlite_url, api={"companies": companies})
            store = MirrorStore.open(sqlite_url)
            engine = SyncEngine.from_settings(settings, store)
            try:
                began = time.monotonic()
                outcomes = engine.sync_all(companies, workers=4)
                wall = time.monotonic() - began
            finally:
                engine.close()
                store.close()
            assert [o.company_id for o in outcomes] == companies
            assert all(o.error is None and o.report is not None for o in outcomes)
            busy = sum(o.report.duration_s for o in outcomes if o.report is not None)
            assert busy > 2 * wall  # one after another, the passes would sum to the wall time
            for company in companies:
                assert mirror_rows(sqlite_url, company) == upstream_rows(server, company)

    def test_a_daemon_syncs_companies_in_parallel_on_sqlite(
        self, sqlite_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """Up to sync.workers passes run at once on one SQLite file, none fails on its lock."""
        companies = [str(n) for n in range(1, 9)]
        data = SandboxData.generate(tuple(companies), 250, seed=5)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=80)) as srv:
            config = _config(tmp_path, srv, sqlite_url, companies, workers=4, interval="1s")
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(lambda: _finished([daemon]) == set(companies), 60, "every company synced")
            for company in companies:
                srv.data.update(company, count=20)

            def exact() -> bool:
                return all(mirror_rows(sqlite_url, c) == upstream_rows(srv, c) for c in companies)

            wait_until(exact, 30, "the updates mirrored")
            code, _ = daemon.stop()
        assert code == 0
        assert not daemon.events("pass.failed")
        assert 2 <= _most_at_once(_spans(daemon)) <= 4

    def test_a_failing_company_holds_one_worker_only(
        self, sqlite_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """A company that upstream answers 412 for ever keeps one worker retrying; the others
        are synced every interval meanwhile."""
        companies = [str(n) for n in range(1, 5)]
        data = SandboxData.generate(tuple(companies), 50, seed=9)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as srv:
            srv.faults.fail_company("1", status=412)
            config = _config(
                tmp_path,
                srv,
                sqlite_url,
                companies,
                workers=2,
                interval="1s",
                retry={"max_attempts": 100, "max_elapsed_s": 8},
            )
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(lambda: len(daemon.events("pass.failed")) >= 1, 30, "company 1 gives up")
            daemon.stop()
        spans = _spans(daemon)
        failing = [(start, end) for start, end, company in spans if company == "1"]
        start, end = failing[0]
        assert end - start > 5  # it kept its worker, retrying
        for company in companies[1:]:
            during = sorted(s for s, _, c in spans if c == company and start <= s <= end)
            assert len(during) >= 3
            assert max(b - a for a, b in itertools.pairwise(during)) < 2.5


class TestReplicas:
    @pytest.mark.postgres
    def test_replicas_share_one_schedule(
        self, pg_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """Two replicas on one PostgreSQL mirror run each company once per interval between
        them (a quiet pass is one request), both take a share, and never one company twice
        at once."""
        companies = [str(n) for n in range(1, 9)]
        data = SandboxData.generate(tuple(companies), 60, seed=12)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=20)) as srv:
            config = _config(tmp_path, srv, pg_url, companies, workers=2, interval="1s")
            MirrorStore.open(pg_url).close()  # schema first, so start-ups do not queue on it
            for n in range(2):
                daemons.append(DaemonProcess(config, tmp_path / f"run{n}.log"))
            wait_until(lambda: _finished(daemons) == set(companies), 60, "every company synced")
            time.sleep(2.5)  # the first sweep's passes, which read the lists, are over
            before, began = len(srv.requests()), time.monotonic()
            time.sleep(5)
            requests, seconds = len(srv.requests()) - before, time.monotonic() - began
            for daemon in daemons:
                code, _ = daemon.stop()
                assert code == 0
        # Each company once a second between the two: about 8 requests a second, where two
        # replicas each keeping their own schedule would make 16.
        assert requests <= 1.1 * len(companies) * (seconds + 1)
        assert all(d.events("pass.finished") for d in daemons)
        _assert_never_twice_at_once(daemons, time.time())


def _config(
    tmp_path: Path,
    server: SandboxServer,
    db_url: str,
    companies: list[str],
    *,
    workers: int,
    interval: str,
    **sections: dict[str, Any],
) -> Path:
    return write_config(
        tmp_path / "sync.toml",
        server,
        db_url,
        api={"companies": companies, "concurrency": 1},
        sync={"interval": interval, "workers": workers},
        log={"format": "json"},
        **sections,
    )
