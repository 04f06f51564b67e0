"""Fleet scale: many companies, one or three `contacts-sync run` daemons, one mirror; a table.

    python benchmarks/fleet.py            # 1,000 companies x 100 contacts, 50 ms, interval 10 s
    python benchmarks/fleet.py --quick    # 100 companies, interval 5 s: a smoke run in 2-3 min
    python benchmarks/fleet.py --no-sqlite --companies 2000

Each figure is printed beside its target (issue #12) with PASS or MISS:
(a) a daemon mirrors every company of an empty mirror within 30 s; beside it, the fixed cost
    of one quiet pass (CPU and wall, measured in this process while the sandbox serves from
    another, so that only the engine's CPU counts);
(b) after one update in every company at one moment, all are mirrored within interval + 5 s;
(c) three replicas on one PostgreSQL mirror: a quiet sweep costs at most 1.1 requests per
    company per interval (and at least 0.9: fewer means passes fell behind), and (a) takes at
    most 70% of one replica's time;
(d) one of the three killed (SIGKILL): its companies are fresh again within one interval.

The daemons are real subprocesses with a config written here; progress is read from the mirror
(`sync_state` cursors, `contacts.updated_at`, `sync_schedule.claimed_by`) and requests from the
sandbox's log. Every PostgreSQL run creates its own database and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy import text

from sync.config import Settings
from sync.engine import SyncEngine
from sync.log import configure_logging
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

DEFAULT_PG = os.environ.get(
    "CONTACTS_SYNC_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POLL_S = 0.2
QUIET_SAMPLE = 200
"""Quiet passes timed in-process (each waits the upstream latency once)."""
SWEEP_INTERVALS = 3
"""Intervals over which the quiet sweep's requests are counted."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the sandbox process


def _serve_sandbox(conn: Connection, companies: int, contacts: int, latency_ms: float) -> None:
    """Serve every company; answer the benchmark's commands over `conn` until told to stop."""
    ids = [str(n) for n in range(1, companies + 1)]
    data = SandboxData.generate(ids, contacts, seed=12)
    config = SandboxConfig(latency_ms=latency_ms, request_log_size=2_000_000)
    with SandboxServer(data, config) as server:
        conn.send(server.base_url)
        while True:
            try:
                command, argument = conn.recv()
            except EOFError:
                return
            if command == "stop":
                conn.send(None)
                return
            conn.send(_answer(server, command, argument))


def _answer(server: SandboxServer, command: str, argument: Any) -> Any:
    if command == "update":
        for company in server.data.companies():
            server.data.update(company, count=argument)
        return len(server.data.companies())
    if command == "requests":
        log = server.requests()
        return {
            "requests": len(log),
            "companies": len({entry.company for entry in log}),
            "not_ok": sum(entry.status != 200 for entry in log),
            "with_rows": sum(bool(entry.items) for entry in log),
        }
    if command == "clear":
        server.clear_requests()
        return None
    return f"unknown command {command!r}"


class Sandbox:
    """The sandbox in a process of its own, so that its CPU is neither counted nor contended
    for by the benchmark's engine (the GIL)."""

    def __init__(self, companies: int, contacts: int, latency_ms: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_sandbox,
            args=(child, companies, contacts, latency_ms),
            name="fleet-sandbox",
            daemon=True,
        )
        self._process.start()
        child.close()
        if not self._conn.poll(300):
            raise RuntimeError("the sandbox process did not start within 300 s")
        self.base_url: str = self._conn.recv()

    def ask(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        if not self._conn.poll(120):
            raise RuntimeError(f"the sandbox did not answer {command!r} within 120 s")
        return self._conn.recv()

    def close(self) -> None:
        with suppress(OSError, EOFError, RuntimeError):
            self.ask("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


@contextmanager
def sandbox(companies: int, contacts: int, latency_ms: float) -> Iterator[Sandbox]:
    server = Sandbox(companies, contacts, latency_ms)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- daemons and mirror


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("contacts-sync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sync"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")}


@dataclass(frozen=True)
class Options:
    companies: int
    contacts: int
    latency_ms: float
    interval: float
    workers: int | None
    pg_url: str
    folder: Path

    @property
    def company_ids(self) -> list[str]:
        return [str(n) for n in range(1, self.companies + 1)]


def write_config(opts: Options, base_url: str, db_url: str, name: str) -> Path:
    sync: dict[str, Any] = {"interval": f"{opts.interval:g}s"}
    if opts.workers is not None:
        sync["workers"] = opts.workers
    sections: dict[str, dict[str, Any]] = {
        "api": {
            "base_url": base_url,
            "token": DEFAULT_TOKEN,
            "companies": opts.company_ids,
            "api_version": "2024-01",
            "concurrency": 4,
            "timeout_s": 30,
        },
        "database": {"url": db_url},
        "sync": sync,
        "log": {"level": "warning", "format": "json"},
    }
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    path = opts.folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


class Daemon:
    """One `contacts-sync run` process; its log (warnings and up) in a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [*_cli(), "--config", str(config), "run"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    @property
    def owner(self) -> str:
        """How the daemon names itself in `sync_schedule.claimed_by`."""
        return f"{socket.gethostname()}:{self.process.pid}"

    def cpu_s(self) -> float:
        """User plus system CPU seconds so far (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"daemon {self.process.pid} exited with {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_events(self) -> Counter[str]:
        """Events the daemon logged (warnings and up), by name."""
        found: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = str(json.loads(line).get("event", "?"))
            except ValueError:
                event = "(not json)"
            # APScheduler's messages carry times: keep what stays the same from one to the next.
            found[event.split(" (")[0][:60]] += 1
        return found

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM; the exit code, or "hung" (then killed) when it took longer than `timeout`."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return str(self.process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            return "hung"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


class Mirror:
    """Read-only progress queries against the mirror the daemons write."""

    def __init__(self, url: str) -> None:
        self._engine = sqlalchemy.create_engine(url, pool_size=1)

    def _one(self, sql: str, **params: Any) -> Any:
        with self._engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def synced(self) -> int:
        """Companies with a cursor: a complete pass is behind them."""
        return int(self._one("SELECT count(*) FROM sync_state WHERE cursor IS NOT NULL"))

    def newest(self) -> Any:
        """The newest `updated_at` in the mirror, as stored (text on SQLite), for `arrived`."""
        return self._one("SELECT max(updated_at) FROM contacts")

    def arrived(self, mark: Any, companies: Sequence[str] | None = None) -> int:
        """Companies with a row newer than `mark` (of `companies`, or of all)."""
        sql = "SELECT count(DISTINCT company_id) FROM contacts WHERE updated_at > :mark"
        if companies is None:
            return int(self._one(sql, mark=mark))
        if not companies:
            return 0
        with self._engine.connect() as conn:
            statement = text(sql + " AND company_id IN :companies").bindparams(
                sqlalchemy.bindparam("companies", expanding=True)
            )
            found = conn.execute(statement, {"mark": mark, "companies": companies}).scalar()
            return int(found or 0)

    def claimed_by(self) -> dict[str, list[str]]:
        """Each replica's companies: those it claimed last."""
        owners: dict[str, list[str]] = {}
        with self._engine.connect() as conn:
            rows = conn.execute(
                text("SELECT claimed_by, company_id FROM sync_schedule WHERE job = 'sync'")
            )
            for owner, company in rows:
                owners.setdefault(owner or "", []).append(company)
        return owners

    def due_in(self, owner: str) -> float:
        """Seconds from now until the last company `owner` claimed is due again (PostgreSQL)."""
        seconds = self._one(
            "SELECT extract(epoch FROM max(due_at) - now()) FROM sync_schedule "
            "WHERE claimed_by = :owner AND job = 'sync'",
            owner=owner,
        )
        return float(seconds or 0)

    def close(self) -> None:
        self._engine.dispose()


@contextmanager
def database(kind: str, pg_url: str, folder: Path, name: str) -> Iterator[str]:
    """A fresh mirror with its schema in place, removed afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{folder / name}.db"
        MirrorStore.open(url).close()
        yield url
        return
    admin = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    db = f"bench_fleet_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        url = f"{pg_url.rsplit('/', 1)[0]}/{db}"
        # Schema first, so that replicas starting together do not queue on the migration.
        MirrorStore.open(url).close()
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def wait_for(
    done: Callable[[], bool], timeout: float, what: str, daemons: Sequence[Daemon]
) -> float:
    """Poll until done; the seconds it took (to within POLL_S)."""
    started = time.perf_counter()
    while not done():
        for daemon in daemons:
            daemon.check_alive()
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the measurements


@dataclass
class Fleet:
    """The daemons of one scenario, all closed (killed if need be) on exit."""

    opts: Options
    config: Path
    name: str
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, count: int) -> None:
        for _ in range(count):
            n = len(self.daemons)
            self.daemons.append(Daemon(self.config, self.opts.folder / f"{self.name}-{n}.log"))

    @property
    def alive(self) -> list[Daemon]:
        return [d for d in self.daemons if d.process.poll() is None]

    def stop(self) -> list[str]:
        return [d.stop() for d in self.alive]

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()

    def log_summary(self) -> str:
        events: Counter[str] = Counter()
        for daemon in self.daemons:
            events += daemon.log_events()
        return "; ".join(f"{name} x{count}" for name, count in events.most_common(5)) or "none"


@dataclass
class Table:
    title: str
    rows: list[list[str]] = field(default_factory=lambda: [["case", "measured", "target", ""]])
    notes: list[str] = field(default_factory=list)

    def add(self, case: str, measured: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        self.rows.append([case, measured, target, verdict])

    def print(self) -> None:
        widths = [max(len(row[i]) for row in self.rows) for i in range(len(self.rows[0]))]
        print(f"\n{self.title}")
        for position, row in enumerate(self.rows):
            cells = [
                cell.ljust(w) if i in (0, 3) else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            print("  " + "  ".join(cells).rstrip())
            if position == 0:
                print("  " + "  ".join("-" * w for w in widths))
        for note in self.notes:
            print(f"  {note}")
        sys.stdout.flush()


@dataclass(frozen=True)
class Mirrored:
    launch_s: float
    """From launching the daemons until every company has a cursor."""
    first_s: float
    """From launching them until the first company has one: start-up and a pass."""


def mirror_everything(
    fleet: Fleet, mirror: Mirror, server: Sandbox, *, replicas: int, table: Table, label: str
) -> Mirrored:
    """(a): start the replicas on the empty mirror; how long until every company has a cursor."""
    n = fleet.opts.companies
    server.ask("clear")
    started = time.perf_counter()
    fleet.start(replicas)
    first = wait_for(lambda: mirror.synced() > 0, 120, "a first company", fleet.alive)
    wait_for(lambda: mirror.synced() >= n, 600, "every company mirrored", fleet.alive)
    took = Mirrored(launch_s=time.perf_counter() - started, first_s=first)
    seen = server.ask("requests")
    table.add(
        f"{label} every company mirrored, from launch",
        f"{took.launch_s:.1f} s",
        "<= 30 s" if replicas == 1 else "",
        took.launch_s <= 30 if replicas == 1 else None,
    )
    table.add(f"{label} ... first company mirrored (start-up and a pass)", f"{took.first_s:.1f} s")
    table.add(f"{label} ... from the first company to the last", f"{first_and_last(took):.1f} s")
    table.add(f"{label} ... requests per company", f"{seen['requests'] / n:.2f}")
    return took


def first_and_last(mirrored: Mirrored) -> float:
    return mirrored.launch_s - mirrored.first_s


def update_everywhere(
    fleet: Fleet, mirror: Mirror, server: Sandbox, table: Table, label: str
) -> None:
    """(b): one update in every company at one moment; seconds until all are mirrored."""
    opts = fleet.opts
    mark = mirror.newest()
    started = time.perf_counter()
    server.ask("update", 1)
    wait_for(
        lambda: mirror.arrived(mark) >= opts.companies,
        3 * opts.interval + 60,
        "every update mirrored",
        fleet.alive,
    )
    took = time.perf_counter() - started
    target = opts.interval + 5
    table.add(
        f"{label} update in every company -> last one mirrored",
        f"{took:.1f} s",
        f"<= {target:g} s",
        took <= target,
    )


def quiet_pass_cost(opts: Options, base_url: str, db_url: str, table: Table, label: str) -> None:
    """The engine's fixed cost of a pass that finds nothing, in this process (no daemon runs)."""
    sample = opts.company_ids[: min(opts.companies, QUIET_SAMPLE)]
    warm_up, timed = sample[:5], sample[5:]
    settings = Settings(
        api={
            "base_url": base_url,
            "token": DEFAULT_TOKEN,
            "companies": sample,
            "api_version": "2024-01",
            "concurrency": 4,
        },
        database={"url": db_url},
    )
    store = MirrorStore.open(db_url)
    engine = SyncEngine.from_settings(settings, store)
    requests = rows = 0
    try:
        for company in warm_up:  # connections, prepared statements, first-use imports
            engine.sync_company(company)
        cpu, wall = time.process_time(), time.perf_counter()
        for company in timed:
            report = engine.sync_company(company)
            requests += report.requests
            rows += report.rows_fetched
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        engine.close()
        store.close()
    passes = len(timed)
    table.add(
        f"{label} quiet pass, CPU (mean of {passes})",
        f"{cpu / passes * 1000:.1f} ms",
    )
    table.add(
        f"{label} quiet pass, wall ({opts.latency_ms:g} ms upstream)",
        f"{wall / passes * 1000:.0f} ms",
    )
    table.add(
        f"{label} quiet pass, requests / rows read",
        f"{requests / passes:.2f} / {rows / passes:.2f}",
    )


def one_daemon(opts: Options, server: Sandbox, kind: str, table: Table) -> Mirrored:
    """(a) and (b) with one daemon; returns (a)'s times."""
    with ExitStack() as stack:
        db_url = stack.enter_context(database(kind, opts.pg_url, opts.folder, f"{kind}-one"))
        mirror = Mirror(db_url)
        stack.callback(mirror.close)
        config = write_config(opts, server.base_url, db_url, f"{kind}-one")
        fleet = Fleet(opts, config, f"{kind}-one")
        stack.callback(fleet.close)
        took = mirror_everything(fleet, mirror, server, replicas=1, table=table, label="(a)")
        codes = fleet.stop()
        # Nothing changed since each company's pass: every one is quiet now.
        quiet_pass_cost(opts, server.base_url, db_url, table, "(a)")
        fleet.start(1)
        time.sleep(opts.interval)  # the restart's catch-up sweep, then the steady state
        update_everywhere(fleet, mirror, server, table, "(b)")
        codes += fleet.stop()
        table.add(
            "    exit codes on SIGTERM, after (a) and after (b)",
            " ".join(codes),
            "0 0",
            codes == ["0", "0"],
        )
        table.notes.append(f"daemon log, warnings and up: {fleet.log_summary()}")
    return took


def three_replicas(opts: Options, server: Sandbox, one: Mirrored, table: Table) -> None:
    """(c) and (d): three replicas on one PostgreSQL mirror."""
    n = opts.companies
    with ExitStack() as stack:
        db_url = stack.enter_context(database("postgresql", opts.pg_url, opts.folder, "three"))
        mirror = Mirror(db_url)
        stack.callback(mirror.close)
        config = write_config(opts, server.base_url, db_url, "three")
        fleet = Fleet(opts, config, "three")
        stack.callback(fleet.close)
        three = mirror_everything(fleet, mirror, server, replicas=3, table=table, label="(c)")
        share = three.launch_s / one.launch_s
        table.add("(c) from launch, of the one-daemon time", f"{share:.0%}", "<= 70%", share <= 0.7)
        spread = first_and_last(three) / max(first_and_last(one), 1e-9)
        table.add("(c) first to last company, of the one-daemon time", f"{spread:.0%}")

        per_interval = quiet_sweep(fleet, server, table, "(c) quiet sweep")
        table.add(
            f"(c) quiet sweep, requests per company per interval ({SWEEP_INTERVALS} intervals)",
            f"{per_interval:.2f}",
            "<= 1.1",
            per_interval <= 1.1,
        )
        # A quiet pass is one request, so fewer than one a company means passes fell behind.
        table.add(
            "(c) ... so each company is passed once an interval (a quiet pass: one request)",
            f"{per_interval:.2f}",
            ">= 0.9",
            per_interval >= 0.9,
        )
        owners = mirror.claimed_by()
        shares = sorted((len(owners.get(d.owner, [])) for d in fleet.daemons), reverse=True)
        table.add("(c) companies last claimed by each replica", " / ".join(map(str, shares)))

        mark = mirror.newest()
        victim = fleet.daemons[0]
        victim.kill()
        killed = time.perf_counter()
        orphans = mirror.claimed_by().get(victim.owner, [])
        due_in = mirror.due_in(victim.owner)
        server.ask("update", 1)
        orphans_took: float | None = None

        def all_arrived() -> bool:
            nonlocal orphans_took
            if orphans_took is None and mirror.arrived(mark, orphans) >= len(orphans):
                orphans_took = time.perf_counter() - killed
            return mirror.arrived(mark) >= n

        all_took = wait_for(all_arrived, 3 * opts.interval + 60, "every update", fleet.alive)
        assert orphans_took is not None
        table.add(
            f"(d) SIGKILL one; its {len(orphans)} companies updated and mirrored again",
            f"{orphans_took:.1f} s",
            f"<= {opts.interval:g} s",
            orphans_took <= opts.interval,
        )
        table.add("(d) ... the last of them due again after the kill", f"{due_in:.1f} s")
        table.add(
            "(d) ... every company updated and mirrored again",
            f"{all_took:.1f} s",
            f"<= {opts.interval + 5:g} s",
            all_took <= opts.interval + 5,
        )
        # Rows changed within sync.lookback_s are read again by every pass: not a quiet sweep.
        after = quiet_sweep(fleet, server, table, "(d) sweep, survivors", judged=False)
        table.add(
            "(d) sweep within lookback_s of a change, requests per company per interval",
            f"{after:.2f}",
        )
        codes = fleet.stop()
        table.add(
            "    survivors' exit codes on SIGTERM",
            " ".join(codes),
            "0 0",
            codes == ["0", "0"],
        )
        table.notes.append(f"daemon logs, warnings and up: {fleet.log_summary()}")


def quiet_sweep(
    fleet: Fleet, server: Sandbox, table: Table, label: str, *, judged: bool = True
) -> float:
    """Requests upstream sees per company per interval over a few intervals, and the daemons'
    CPU meanwhile; `judged`: whether every company must have been asked."""
    opts = fleet.opts
    daemons = fleet.alive
    server.ask("clear")
    cpu_before = sum(d.cpu_s() for d in daemons)
    time.sleep(SWEEP_INTERVALS * opts.interval)
    seen = server.ask("requests")
    cpu = sum(d.cpu_s() for d in daemons) - cpu_before
    table.add(
        f"{label}, companies asked / answers not 200",
        f"{seen['companies']:,} / {seen['not_ok']}",
        f"{opts.companies:,} / 0" if judged else "",
        seen["companies"] == opts.companies and seen["not_ok"] == 0 if judged else None,
    )
    table.add(
        f"{label}, requests that found rows",
        f"{seen['with_rows'] / max(seen['requests'], 1):.0%}",
    )
    if seen["requests"]:
        table.add(
            f"{label}, daemons' CPU per request",
            f"{cpu / seen['requests'] * 1000:.1f} ms",
        )
    table.add(
        f"{label}, daemons' CPU",
        f"{cpu / (SWEEP_INTERVALS * opts.interval):.0%} of a core",
    )
    return float(seen["requests"]) / opts.companies / SWEEP_INTERVALS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="100 companies, interval 5 s")
    parser.add_argument("--companies", type=int, default=None, help="default 1000 (quick 100)")
    parser.add_argument("--contacts", type=int, default=100, help="per company")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="upstream latency")
    parser.add_argument("--interval", type=float, default=None, help="s; default 10 (quick 5)")
    parser.add_argument("--workers", type=int, default=None, help="sync.workers (default 8)")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL URL of an admin database")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--logs", default=None, help="keep the daemons' logs in this folder")
    args = parser.parse_args(argv)
    configure_logging("warning", "json")
    started = time.perf_counter()
    with ExitStack() as stack:
        if args.logs is not None:
            folder = Path(args.logs)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        opts = Options(
            companies=args.companies or (100 if args.quick else 1000),
            contacts=args.contacts,
            latency_ms=args.latency_ms,
            interval=args.interval or (5.0 if args.quick else 10.0),
            workers=args.workers,
            pg_url=args.pg,
            folder=folder,
        )
        print(
            f"{opts.companies:,} companies x {opts.contacts:,} contacts, "
            f"{opts.latency_ms:g} ms upstream, sync.interval {opts.interval:g} s, "
            f"sync.workers {opts.workers or 'default'}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at start"
        )
        # A fresh sandbox per scenario: rows changed within sync.lookback_s are read again by
        # every pass, so one scenario's updates would make the next one's passes not quiet.
        if not args.no_pg:
            with sandbox(opts.companies, opts.contacts, opts.latency_ms) as server:
                table = Table("PostgreSQL, one daemon")
                one = one_daemon(opts, server, "postgresql", table)
                table.print()
            with sandbox(opts.companies, opts.contacts, opts.latency_ms) as server:
                table = Table("PostgreSQL, three replicas sharing the mirror")
                three_replicas(opts, server, one, table)
                table.print()
        if not args.no_sqlite:
            with sandbox(opts.companies, opts.contacts, opts.latency_ms) as server:
                table = Table("SQLite, one daemon")
                one_daemon(opts, server, "sqlite", table)
                table.print()
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
