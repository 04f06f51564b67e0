"""What sync.history costs: full loads and incremental passes with history off and on, a table.

    python benchmarks/history.py            # 100,000 rows, SQLite and PostgreSQL, 3 rounds
    python benchmarks/history.py --quick    # 10,000 rows, one round: a smoke run
    python benchmarks/history.py --no-pg    # SQLite only

Each round, for each database, loads the sandbox's rows into a fresh mirror with history off and
then on (alternating, so a machine whose speed drifts slows both alike), changes 1% of the rows
upstream and runs an incremental pass into each mirror. The sandbox and every load run in
processes of their own, as in `run.py`, whose functions this reuses. Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime

from run import DEFAULT_PG, TOKEN, Table, database, print_table, sandbox

from sync.config import Settings
from sync.engine import SyncEngine
from sync.log import configure_logging
from sync.store import MirrorStore

COMPANY = "1"
_KEEP_HISTORY_CALLS = 1000


def _load_worker(base_url: str, db_url: str, history: str, mode: str) -> None:
    """One pass (`full`: backfill; `incremental`: once) into db_url; prints its figures."""
    configure_logging("warning", "json")
    settings = Settings(
        api={"base_url": base_url, "token": TOKEN, "companies": [COMPANY], "concurrency": 4},
        database={"url": db_url},
        sync={"history": history == "on"},
    )
    store = MirrorStore.open(db_url)
    engine = SyncEngine.from_settings(settings, store)
    try:
        started = time.perf_counter()
        report = engine.sync_company(COMPANY, backfill=mode == "full")
        wall = time.perf_counter() - started
        began = time.perf_counter()
        for _ in range(_KEEP_HISTORY_CALLS):
            store.keep_history(COMPANY, on=history == "on", at=datetime.now(UTC))
        check_ms = (time.perf_counter() - began) / _KEEP_HISTORY_CALLS * 1000
    finally:
        engine.close()
        store.close()
    print(json.dumps({"wall_s": wall, "rows": report.rows_fetched, "check_ms": check_ms}))


def _worker(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def measure(rows: int, rounds: int, kinds: Sequence[str], pg_url: str) -> Table:
    changed = max(1, rows // 100)
    figures: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with sandbox(rows) as server:
        for _ in range(rounds):
            for kind in kinds:
                with ExitStack() as stack:
                    mirrors = {
                        history: stack.enter_context(database(kind, pg_url))
                        for history in ("off", "on")
                    }
                    for history, db_url in mirrors.items():
                        figures.setdefault((kind, history, "full"), []).append(
                            _worker("load", server.base_url, db_url, history, "full")
                        )
                    server.ask(f"update {changed}")
                    for history, db_url in mirrors.items():
                        figures.setdefault((kind, history, "incremental"), []).append(
                            _worker("load", server.base_url, db_url, history, "incremental")
                        )
    table: Table = [["case", "history", "rows read", "wall s", "rows/s", "vs off", "check ms"]]
    for kind in kinds:
        for mode in ("full", "incremental"):
            off_wall = statistics.median(run["wall_s"] for run in figures[(kind, "off", mode)])
            for history in ("off", "on"):
                runs = figures[(kind, history, mode)]
                wall = statistics.median(run["wall_s"] for run in runs)
                read = statistics.median(run["rows"] for run in runs)
                check = statistics.median(run["check_ms"] for run in runs)
                label = (
                    f"full load of {rows:,}"
                    if mode == "full"
                    else f"incremental after {changed:,} changed"
                )
                table.append(
                    [
                        f"{label}, {kind}",
                        history,
                        f"{read:,.0f}",
                        f"{wall:.3f}",
                        f"{read / wall:,.0f}",
                        f"{wall / off_wall:.2f}x",
                        f"{check:.3f}",
                    ]
                )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10,000 rows, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL URL of an admin database")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _load_worker(*args.worker[1:])
        return 0
    rows = 10_000 if args.quick else 100_000
    rounds = args.rounds or (1 if args.quick else 3)
    kinds = ("sqlite",) if args.no_pg else ("sqlite", "postgresql")
    started = time.perf_counter()
    print_table(
        "sync.history off and on (medians; check ms: the per-pass history switch check)",
        measure(rows, rounds, kinds, args.pg),
    )
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
