"""Throughput benchmarks: full loads, the bare-HTTP ceiling, latency hiding, incremental cost, RSS.

    python benchmarks/run.py              # cases 1-4 (the 1M-row RSS case needs --million)
    python benchmarks/run.py --quick      # smaller tables, one repeat: a smoke run in ~1 min
    python benchmarks/run.py --only 3     # one case (repeat --only for several)
    python benchmarks/run.py --million    # also case 5: peak RSS of a 1,000,000-row load

The sandbox serves from a process of its own, and every load runs in a fresh process too, so
the two never share a GIL and each load's peak RSS is its own (`ru_maxrss` of that process).
PostgreSQL cases use `--pg` (or `CONTACTS_SYNC_BENCH_PG`); each creates its own database and
drops it afterwards. Figures are medians over `--repeat` runs: the machine may be noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import psycopg

from sync.config import Settings
from sync.engine import SyncEngine
from sync.log import configure_logging
from sync.sandbox import SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

DEFAULT_PG = os.environ.get(
    "CONTACTS_SYNC_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
COMPANY = "1"
TOKEN = "sandbox-token"  # noqa: S105 - the sandbox's published token
PAGE = 100


# --------------------------------------------------------------------------- worker processes


def _sandbox_worker(contacts: int, latency_ms: float) -> None:
    """Serve generated contacts; stdin takes `update N`, `requests`, `clear`; stdout answers."""
    data = SandboxData.generate((COMPANY,), contacts, seed=7)
    config = SandboxConfig(latency_ms=latency_ms, request_log_size=2_000_000)
    with SandboxServer(data, config) as server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "update":
                changed = data.update(COMPANY, count=int(words[1]))
                answer: Any = len(changed)
            elif words[0] == "requests":
                answer = len(server.requests(COMPANY))
            elif words[0] == "clear":
                server.clear_requests()
                answer = 0
            else:
                answer = f"unknown command {words[0]!r}"
            print(json.dumps(answer), flush=True)


def _load_worker(base_url: str, db_url: str, concurrency: int, mode: str) -> None:
    """One pass (`full`: backfill; `incremental`: once) into db_url; prints its figures."""
    configure_logging("warning", "json")
    settings = Settings(
        api={
            "base_url": base_url,
            "token": TOKEN,
            "companies": [COMPANY],
            "concurrency": concurrency,
        },
        database={"url": db_url},
    )
    store = MirrorStore.open(db_url)
    engine = SyncEngine.from_settings(settings, store)
    try:
        started = time.perf_counter()
        report = engine.sync_company(COMPANY, backfill=mode == "full")
        wall = time.perf_counter() - started
    finally:
        engine.close()
        store.close()
    print(
        json.dumps(
            {
                "wall_s": wall,
                "rows": report.rows_fetched,
                "pages": report.pages,
                "walk_requests": report.requests,
                "peak_rss_mb": _peak_rss_mb(),
            }
        ),
        flush=True,
    )


def _ceiling_worker(base_url: str) -> None:
    """The bare loop: fetch and JSON-parse (orjson) every page in sequence, store nothing."""
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Company-Id": COMPANY}
    rows = offset = 0
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, headers=headers) as http:
        while True:
            response = http.get("/api/contacts", params={"limit": PAGE, "offset": offset})
            response.raise_for_status()
            items = orjson.loads(response.content)
            rows += len(items)
            offset += PAGE
            if len(items) < PAGE:
                break
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "rows": rows, "peak_rss_mb": _peak_rss_mb()}), flush=True)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- the driver side


class Sandbox:
    """The sandbox process, driven over its stdin and stdout."""

    def __init__(self, contacts: int, latency_ms: float) -> None:
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "sandbox", str(contacts), str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.base_url: str = self._read()["base_url"]

    def _read(self) -> Any:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox process exited before answering")
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@contextmanager
def sandbox(contacts: int, latency_ms: float = 0.0) -> Iterator[Sandbox]:
    server = Sandbox(contacts, latency_ms)
    try:
        yield server
    finally:
        server.close()


def _worker(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextmanager
def database(kind: str, pg_url: str) -> Iterator[str]:
    """A fresh, empty mirror database URL, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="contacts-sync-bench-") as directory:
            yield f"sqlite:///{directory}/mirror.db"
        return
    admin = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"contacts_sync_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load(server: Sandbox, db_url: str, concurrency: int, mode: str = "full") -> dict[str, Any]:
    server.ask("clear")
    result = _worker("load", server.base_url, db_url, str(concurrency), mode)
    result["requests"] = server.ask("requests")
    return result


def fresh_load(server: Sandbox, kind: str, pg_url: str, concurrency: int) -> dict[str, Any]:
    with database(kind, pg_url) as db_url:
        return load(server, db_url, concurrency)


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the runs' figures."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


@dataclass
class Options:
    rows: int
    latency_rows: int
    repeat: int
    concurrency: int
    pg_url: str
    databases: tuple[str, ...]


Table = list[list[str]]


def case_full_load(opts: Options) -> Table:
    """(1) full load at 0 ms into each database, and (2) the bare-HTTP ceiling beside it."""
    table: Table = [["case", "rows/s", "wall s", "peak RSS MB", "requests", "of ceiling"]]
    with sandbox(opts.rows) as server:
        # Rounds of ceiling, then each database: a machine whose speed drifts (a busy
        # neighbour) slows all of them alike, so the ratios hold.
        ceilings: list[dict[str, Any]] = []
        loads: dict[str, list[dict[str, Any]]] = {kind: [] for kind in opts.databases}
        for _ in range(opts.repeat):
            ceilings.append(_worker("ceiling", server.base_url))
            for kind in opts.databases:
                loads[kind].append(fresh_load(server, kind, opts.pg_url, opts.concurrency))
        ceiling = median_of(ceilings)
        ceiling_rate = ceiling["rows"] / ceiling["wall_s"]
        table.append(
            [
                f"(2) bare httpx loop, {opts.rows:,} rows, 0 ms",
                f"{ceiling_rate:,.0f}",
                f"{ceiling['wall_s']:.2f}",
                f"{ceiling['peak_rss_mb']:.0f}",
                f"{math.ceil(opts.rows / PAGE + 1 / PAGE)}",
                "100%",
            ]
        )
        for kind in opts.databases:
            result = median_of(loads[kind])
            rate = opts.rows / result["wall_s"]
            table.append(
                [
                    f"(1) full load, {kind}, concurrency {opts.concurrency}",
                    f"{rate:,.0f}",
                    f"{result['wall_s']:.2f}",
                    f"{result['peak_rss_mb']:.0f}",
                    f"{result['requests']:.0f}",
                    f"{rate / ceiling_rate:.0%}",
                ]
            )
    return table


def case_latency(opts: Options) -> Table:
    """(3) full load at 50 ms latency, next to the sequential minimum (pages x 50 ms)."""
    latency_ms = 50.0
    table: Table = [["case", "rows/s", "wall s", "requests", "sequential min s", "of minimum"]]
    pages = opts.latency_rows // PAGE + 1
    minimum = pages * latency_ms / 1000
    with sandbox(opts.latency_rows, latency_ms) as server:
        for concurrency in (1, 4, 8):
            runs = [
                fresh_load(server, "sqlite", opts.pg_url, concurrency) for _ in range(opts.repeat)
            ]
            result = median_of(runs)
            table.append(
                [
                    f"(3) {opts.latency_rows:,} rows, 50 ms, sqlite, concurrency {concurrency}",
                    f"{opts.latency_rows / result['wall_s']:,.0f}",
                    f"{result['wall_s']:.2f}",
                    f"{result['requests']:.0f}",
                    f"{minimum:.2f}",
                    f"{result['wall_s'] / minimum:.0%}",
                ]
            )
    return table


def case_incremental(opts: Options) -> Table:
    """(4) an incremental pass after 1% of the rows changed upstream."""
    changed = max(1, opts.rows // 100)
    table: Table = [["case", "rows read", "wall s", "requests"]]
    for kind in opts.databases:
        runs = []
        for _ in range(opts.repeat):
            with sandbox(opts.rows) as server, database(kind, opts.pg_url) as db_url:
                load(server, db_url, opts.concurrency)
                server.ask(f"update {changed}")
                runs.append(load(server, db_url, opts.concurrency, mode="incremental"))
        result = median_of(runs)
        table.append(
            [
                f"(4) incremental after {changed:,} of {opts.rows:,} changed, {kind}",
                f"{result['rows']:.0f}",
                f"{result['wall_s']:.3f}",
                f"{result['requests']:.0f}",
            ]
        )
    return table


def case_memory(opts: Options, big: int) -> Table:
    """(5) peak RSS of a full load of `big` rows next to one of `opts.rows` rows."""
    table: Table = [["case", "rows/s", "wall s", "peak RSS MB", "requests"]]
    for rows in (opts.rows, big):
        with sandbox(rows) as server:
            result = fresh_load(server, "sqlite", opts.pg_url, opts.concurrency)
        table.append(
            [
                f"(5) full load, {rows:,} rows, sqlite",
                f"{rows / result['wall_s']:,.0f}",
                f"{result['wall_s']:.1f}",
                f"{result['peak_rss_mb']:.1f}",
                f"{result['requests']:.0f}",
            ]
        )
    return table


def print_table(title: str, table: Table) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print(f"\n{title}")
    for position, row in enumerate(table):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells))
        if position == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small tables, one repeat")
    parser.add_argument("--only", type=int, action="append", choices=range(1, 6), default=None)
    parser.add_argument("--million", action="store_true", help="run case 5 (a few minutes)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="for cases 1, 4 and 5")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL URL of an admin database")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _run_worker(args.worker)
    opts = Options(
        rows=10_000 if args.quick else 100_000,
        latency_rows=5_000 if args.quick else 20_000,
        repeat=args.repeat or (1 if args.quick else 3),
        concurrency=args.concurrency,
        pg_url=args.pg,
        databases=("sqlite",) if args.no_pg else ("sqlite", "postgresql"),
    )
    cases = set(args.only or ([1, 2, 3, 4, 5] if args.million else [1, 2, 3, 4]))
    started = time.perf_counter()
    if cases & {1, 2}:
        print_table(
            "Full load at 0 ms latency, next to the bare-HTTP ceiling", case_full_load(opts)
        )
    if 3 in cases:
        print_table("Full load at 50 ms latency", case_latency(opts))
    if 4 in cases:
        print_table("Incremental pass after 1% changed", case_incremental(opts))
    if 5 in cases:
        big = 100_000 if args.quick else 1_000_000
        print_table("Peak RSS does not grow with the table", case_memory(opts, big))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


def _run_worker(args: Sequence[str]) -> int:
    kind, *rest = args
    if kind == "sandbox":
        _sandbox_worker(int(rest[0]), float(rest[1]))
    elif kind == "load":
        _load_worker(rest[0], rest[1], int(rest[2]), rest[3])
    elif kind == "ceiling":
        _ceiling_worker(rest[0])
    else:
        raise SystemExit(f"unknown worker {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
