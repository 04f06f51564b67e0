"""The daemon in production: prompt stops, failures it outlives, replicas, systemd and metrics."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import certifi
import httpx
import psycopg
import pytest
from conftest import (
    PG_ADMIN_DSN,
    DaemonProcess,
    daemon_env,
    mirror_rows,
    safe_rows,
    stored_pages,
    upstream_rows,
    wait_until,
)
from test_cli import SECRET, cli, write_config

from sync.sandbox import SandboxConfig, SandboxData, SandboxServer
from sync.stoppable import StoppableTransport
from sync.store import MirrorStore
from sync.systemd import Notifier


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode("utf-8"))


def sample(body: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text format, or None when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        if metric == name and all(part in label_text for part in wanted.split(",") if part):
            return float(value)
    return None


@pytest.mark.slow
class TestStop:
    @pytest.mark.parametrize("slow", ["stalled_request", "retry_backoff"])
    def test_sigterm_mid_pass_exits_0_fast_and_commits_whole_pages_only(
        self, sqlite_url: str, tmp_path: Path, daemons: list[DaemonProcess], slow: str
    ) -> None:
        """Mid-pass, upstream stalled or asking a long backoff: exit 0 within 10 s, pages whole."""
        data = SandboxData.generate(("1",), 2000, seed=5)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=60)) as srv:
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                sqlite_url,
                api={"concurrency": 2, "timeout_s": 60, "page_size": 50},
                retry={"max_attempts": 10, "max_elapsed_s": 300},
                sync={"interval": "1h"},
                log={"format": "json"},
            )
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(lambda: stored_pages(sqlite_url) >= 3, 30, "three pages stored")
            if slow == "stalled_request":
                srv.faults.add("stall", times=50, seconds=60)
            else:
                srv.faults.add("503", times=50, retry_after=60)
            time.sleep(0.5)  # the walk is now blocked on the slow upstream
            code, took = daemon.stop()
            print(f"stop took {took:.2f} s")  # the figure the issue asks for
            assert code == 0
            assert took < 10
            assert daemon.events("daemon.stopped")
            assert daemon.events("pass.interrupted")
            store = MirrorStore.open(sqlite_url)
            try:
                assert store.read_state("1").cursor is None
                checkpoint = store.load_checkpoint("1")
                assert checkpoint is not None
                stored = mirror_rows(sqlite_url)
                # Whole pages only: 50 rows, then 49 new per page (one row of overlap).
                assert len(stored) == 50 + 49 * (checkpoint.pages - 1)
                upstream = upstream_rows(srv)
                assert all(upstream[key] == row for key, row in stored.items())
            finally:
                store.close()
            srv.faults.clear()
            if slow == "retry_backoff":
                return  # resuming after a stop is the same in both cases; checked once
            done = subprocess.run(
                [sys.executable, "-m", "sync", "--config", str(config), "once"],
                env=daemon_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert mirror_rows(sqlite_url) == upstream_rows(srv)


@pytest.mark.slow
class TestFailuresAreOutlived:
    @pytest.mark.postgres
    def test_upstream_down_then_database_down_next_ticks_recover(
        self, pg_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """Upstream down, then the database down: failures are logged and counted; ticks recover."""
        data = SandboxData.generate(("1",), 800, seed=6)
        port = free_port()
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=20)) as srv:
            srv.faults.fail_company("1", status=503)
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                pg_url,
                retry={"max_attempts": 2, "max_elapsed_s": 2},
                sync={"interval": "1s"},
                metrics={"port": port},
                log={"format": "json"},
            )
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(
                lambda: (_metric(port, "contacts_sync_passes_total", outcome="failed") or 0) >= 2,
                30,
                "two failed passes counted",
            )
            assert daemon.events("pass.failed")
            assert daemon.process.poll() is None
            srv.faults.restore_company("1")
            wait_until(lambda: safe_rows(pg_url) == upstream_rows(srv), 30, "recovery")

            database = pg_url.rsplit("/", 1)[1]
            srv.data.update("1", count=300)
            srv.faults.latency_ms = 250  # passes now last a second or more
            wait_until(lambda: "1" in _mid_pass(daemon), 30, "a pass under way")
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
                # The database goes down: every session is cut and no new one is accepted.
                admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                try:
                    _terminate_sessions(admin, database)
                    failed = _metric(port, "contacts_sync_passes_total", outcome="failed") or 0
                    wait_until(
                        lambda: (
                            (_metric(port, "contacts_sync_passes_total", outcome="failed") or 0)
                            > failed
                            and (_metric(port, "contacts_sync_schedule_errors_total") or 0) >= 2
                        ),
                        30,
                        "the pass under way failed, and the next ticks could not claim",
                    )
                finally:
                    admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                    srv.faults.latency_ms = 20
            said = [e.get("error", "") for e in daemon.events("pass.will_retry_next_tick")]
            assert any("database" in sentence for sentence in said)
            assert any("database" in e.get("error", "") for e in daemon.events("pass.failed"))
            assert daemon.process.poll() is None
            wait_until(lambda: safe_rows(pg_url) == upstream_rows(srv), 30, "recovery after it")
            assert not daemon.events("pass.crashed")
            code, took = daemon.stop()
            assert code == 0
            assert took < 10
        store = MirrorStore.open(pg_url)
        try:
            assert store.read_state("1").last_success_at is not None
        finally:
            store.close()


def _terminate_sessions(admin: psycopg.Connection[Any], database: str) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )


def _metric(port: int, name: str, **labels: str) -> float | None:
    try:
        return sample(scrape(port), name, **labels)
    except OSError:
        return None


@pytest.mark.slow
class TestScaleOut:
    @pytest.mark.postgres
    def test_three_replicas_share_six_companies_and_survive_a_sigkill(
        self, pg_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """No company is ever synced by two replicas at once; a killed one's share is taken up."""
        companies = [str(n) for n in range(1, 7)]
        data = SandboxData.generate(tuple(companies), 300, seed=8)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,), latency_ms=80)) as srv:
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                pg_url,
                api={"companies": companies, "concurrency": 1},
                sync={"interval": "2s", "workers": 2},
                log={"format": "json"},
            )
            MirrorStore.open(pg_url).close()  # schema first, so start-ups do not queue on it
            for n in range(3):
                daemons.append(DaemonProcess(config, tmp_path / f"run{n}.log"))

            def all_synced() -> bool:
                done = {e["company_id"] for d in daemons for e in d.events("pass.finished")}
                return done == set(companies)

            wait_until(all_synced, 30, "every company synced once")
            for company in companies:  # passes that take a while, so one is caught mid-way
                srv.data.update(company, count=150)
            srv.faults.latency_ms = 300
            victim = daemons[0]
            wait_until(lambda: _mid_pass(victim), 20, "replica 0 mid-pass")
            killed_at = time.time()  # no other replica can take its locks before this
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            held = _mid_pass(victim)
            for company in companies:
                srv.data.update(company, count=5)
            changed_at = time.time()

            def survivors_cover_all() -> bool:
                # A pass that began after the last change (not one resumed from the killed
                # replica's checkpoint, which began before it) makes the mirror exact.
                done = {
                    company for d in daemons[1:] for company in _passes_begun_after(d, changed_at)
                }
                return done == set(companies)

            wait_until(survivors_cover_all, 30, "survivors sync every company")
            for daemon in daemons[1:]:
                code, _ = daemon.stop()
                assert code == 0
        assert held
        for company in companies:
            assert mirror_rows(pg_url, company) == upstream_rows(srv, company)
        _assert_never_twice_at_once(daemons, killed_at)
        assert all(d.events("pass.finished") for d in daemons[1:])  # the schedule is shared


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _passes_begun_after(daemon: DaemonProcess, moment: float) -> set[str]:
    """Companies for which this replica completed a pass that started after `moment`."""
    started: dict[str, float] = {}
    done: set[str] = set()
    for event in daemon.events():
        name, company = event.get("event"), event.get("company_id")
        if name == "pass.started" and not event.get("resumed"):
            started[company] = _when(event)
        elif name == "pass.finished" and started.get(company, 0.0) > moment:
            done.add(company)
    return done


def _mid_pass(daemon: DaemonProcess) -> set[str]:
    """Companies whose pass this replica started and has not ended."""
    open_: set[str] = set()
    for event in daemon.events():
        name, company = event.get("event"), event.get("company_id")
        if name == "pass.started":
            open_.add(company)
        elif name in ("pass.finished", "pass.failed", "pass.interrupted"):
            open_.discard(company)
    return open_


def _assert_never_twice_at_once(daemons: list[DaemonProcess], killed_at: float) -> None:
    """Per company, replicas' pass intervals never overlap (the killed one's ends at SIGKILL)."""
    spans: dict[str, list[tuple[float, float, int]]] = {}
    for index, daemon in enumerate(daemons):
        started: dict[str, float] = {}
        for event in daemon.events():
            name, company = event.get("event"), event.get("company_id")
            if name == "pass.started":
                started[company] = _when(event)
            elif (
                name in ("pass.finished", "pass.failed", "pass.interrupted") and company in started
            ):
                spans.setdefault(company, []).append((started.pop(company), _when(event), index))
        for company, began in started.items():
            spans.setdefault(company, []).append((began, killed_at, index))
    for company, intervals in spans.items():
        intervals.sort()
        for (_, end, who), (begin, _, other) in itertools.pairwise(intervals):
            assert begin >= end or who == other, f"company {company} synced twice at once"


@pytest.mark.slow
class TestSystemdNotify:
    def test_ready_watchdog_and_stopping_reach_the_notify_socket(
        self, sandbox: SandboxServer, sqlite_url: str, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """With NOTIFY_SOCKET and WATCHDOG_USEC set, `run` sends READY=1, WATCHDOG=1, STOPPING=1."""
        folder = tempfile.mkdtemp(prefix="cs-notify-")  # short: AF_UNIX paths are <= 107 bytes
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(path)
            listener.settimeout(20)
            config = write_config(
                tmp_path / "sync.toml",
                sandbox,
                sqlite_url,
                api={"token": "sandbox-token"},
                sync={"interval": "1h"},
                log={"format": "json"},
            )
            daemon = DaemonProcess(
                config, tmp_path / "run.log", NOTIFY_SOCKET=path, WATCHDOG_USEC="200000"
            )
            daemons.append(daemon)
            messages: list[str] = []
            while not any("WATCHDOG=1" in m for m in messages[1:]) or len(messages) < 4:
                messages.append(listener.recv(4096).decode())
            code, took = daemon.stop()
            while not any("STOPPING=1" in m for m in messages):
                messages.append(listener.recv(4096).decode())
        os.unlink(path)
        os.rmdir(folder)
        assert code == 0
        assert took < 10
        assert messages[0].splitlines()[0] == "READY=1"
        assert "STATUS=" in messages[0]
        assert sum(m == "WATCHDOG=1" for m in messages) >= 2
        assert messages.index(next(m for m in messages if "STOPPING=1" in m)) > 0


@pytest.mark.slow
class TestMetrics:
    def test_metrics_after_a_pass_and_no_token_in_them(
        self, tmp_path: Path, sqlite_url: str, daemons: list[DaemonProcess]
    ) -> None:
        """After a pass with retries, /metrics has rows, pages, retries, duration, lag, and the
        request budget's figures (every request upstream saw, the rate the 429 lowered, time
        waited); no token."""
        data = SandboxData.generate(("1", "2"), 500, seed=4)
        port = free_port()
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as srv:
            srv.faults.add("500", times=2, company="1")
            srv.faults.add("429", times=1, company="1")
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                sqlite_url,
                api={"companies": ["1", "2"], "max_requests_per_s": 40, "concurrency": 4},
                retry={"max_attempts": 6},
                sync={"interval": "1h"},
                metrics={"port": port},
                log={"format": "json"},
            )
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(
                lambda: _metric(port, "contacts_sync_passes_total", company="2", outcome="ok") == 1,
                30,
                "both passes counted",
            )
            wait_until(
                lambda: _metric(port, "contacts_sync_passes_total", company="1", outcome="ok") == 1,
                30,
                "both passes counted",
            )
            body = scrape(port)
            sent = len(srv.requests())
            code, _ = daemon.stop()
        assert code == 0
        assert SECRET not in body
        assert sample(body, "contacts_sync_requests_total") == sent
        assert 0 < (sample(body, "contacts_sync_request_budget_per_second") or 0) < 40
        assert (sample(body, "contacts_sync_request_budget_wait_seconds_total") or 0) > 0
        for company in ("1", "2"):
            assert (sample(body, "contacts_sync_rows_upserted_total", company=company) or 0) >= 500
            assert (sample(body, "contacts_sync_pages_fetched_total", company=company) or 0) >= 5
            assert sample(body, "contacts_sync_rows_quarantined_total", company=company) == 0
            assert sample(body, "contacts_sync_pass_duration_seconds_count", company=company) == 1
            success = sample(body, "contacts_sync_last_success_timestamp_seconds", company=company)
            assert (success or 0) > time.time() - 60
            lag = sample(body, "contacts_sync_cursor_lag_seconds", company=company)
            assert lag is not None
            assert lag >= 0
        assert sample(body, "contacts_sync_retries_total", reason="5xx") == 2
        assert sample(body, "contacts_sync_retries_total", reason="429") == 1

    def test_a_refused_reconcile_is_counted_by_company(
        self, tmp_path: Path, sqlite_url: str, daemons: list[DaemonProcess]
    ) -> None:
        """A reconcile the mass-deletion guard stops counts as refused, by company, and marks
        nothing."""
        data = SandboxData.generate(("1",), 500, seed=6)
        port = free_port()
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as srv:
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                sqlite_url,
                sync={"interval": "1h", "reconcile_interval": "1s"},
                metrics={"port": port},
                log={"format": "json"},
            )
            assert cli(config, "once").returncode == 0
            data.delete("1", count=200)
            daemon = DaemonProcess(config, tmp_path / "run.log")
            daemons.append(daemon)
            wait_until(
                lambda: (
                    (_metric(port, "contacts_sync_reconcile_refused_total", company="1") or 0) >= 1
                ),
                30,
                "a refused reconcile counted",
            )
            body = scrape(port)
            code, _ = daemon.stop()
        assert code == 0
        refused = sample(
            body, "contacts_sync_passes_total", company="1", kind="reconcile", outcome="refused"
        )
        assert (refused or 0) >= 1
        assert daemon.events("reconcile.refused")
        assert len(mirror_rows(sqlite_url)) == 500


class TestNotifier:
    def test_abstract_socket_and_watchdog_meant_for_another_process(self) -> None:
        """`@name` reaches the abstract namespace; a WATCHDOG_PID of another process is ignored."""
        name = f"cs-notify-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind("\0" + name)
            listener.settimeout(5)
            notifier = Notifier(
                {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
            )
            assert notifier.enabled
            assert notifier.watchdog_interval_s is None
            notifier.ready("up")
            assert listener.recv(4096) == b"READY=1\nSTATUS=up"
        mine = Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        assert mine.watchdog_interval_s == 2.0
        assert not mine.enabled
        mine.watchdog()  # no socket: nothing happens


class TestStoppableTransport:
    def test_abort_wakes_a_request_blocked_on_a_silent_server(self) -> None:
        """A read blocked on a server that never answers fails within a second of abort()."""
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            transport = StoppableTransport(max_connections=2)
            client = httpx.Client(transport=transport, timeout=30)
            outcome: list[BaseException] = []

            def request() -> None:
                try:
                    client.get(f"http://127.0.0.1:{port}/")
                except httpx.TransportError as exc:
                    outcome.append(exc)

            worker = threading.Thread(target=request)
            worker.start()
            accepted, _ = server.accept()
            with accepted:
                time.sleep(0.2)
                began = time.monotonic()
                transport.abort()
                worker.join(timeout=5)
                took = time.monotonic() - began
            with pytest.raises(httpx.ConnectError):
                client.get(f"http://127.0.0.1:{port}/")
            client.close()
        assert not worker.is_alive()
        assert outcome
        assert took < 1

    def test_tls_goes_through_its_context(self, tmp_path: Path) -> None:
        """A server with a certificate no default CA signed is refused; with that certificate
        as `ca_bundle`, the same server is reached."""
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )
        server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_side.load_cert_chain(cert, key)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            url = f"https://127.0.0.1:{listener.getsockname()[1]}/"

            def serve() -> None:
                for _ in range(2):
                    conn, _ = listener.accept()
                    with (
                        contextlib.suppress(ssl.SSLError, OSError),
                        server_side.wrap_socket(conn, server_side=True) as tls,
                    ):
                        tls.recv(4096)
                        tls.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    conn.close()

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            with (
                httpx.Client(transport=StoppableTransport(2)) as client,
                pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
            ):
                client.get(url)
            with httpx.Client(transport=StoppableTransport(2, ca_bundle=str(cert))) as client:
                assert client.get(url).status_code == 204
            server.join(timeout=5)

    def test_certificates_are_still_verified(self) -> None:
        """The daemon's transport verifies certificates and host names like the client's own."""
        for transport in (StoppableTransport(2), StoppableTransport(2, ca_bundle=certifi.where())):
            context = transport.ssl_context
            assert context.verify_mode == ssl.CERT_REQUIRED
            assert context.check_hostname
            transport.close()


@pytest.mark.slow
class TestMetricsPort:
    def test_a_taken_metrics_port_exits_2_naming_the_key(
        self, sandbox: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """When the metrics port is taken, `run` exits 2 with a sentence naming metrics.port."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config = write_config(
                tmp_path / "sync.toml",
                sandbox,
                sqlite_url,
                api={"token": "sandbox-token"},
                metrics={"port": taken.getsockname()[1]},
            )
            done = subprocess.run(
                [sys.executable, "-m", "sync", "--config", str(config), "run"],
                env=daemon_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        assert done.returncode == 2
        assert "metrics.port" in done.stderr.strip().splitlines()[-1]
