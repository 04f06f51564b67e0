"""The request budget under load: what upstream sees when several companies sync at once.

    python benchmarks/budget.py                  # 4 companies x 2,000 contacts, SQLite
    python benchmarks/budget.py --companies 6 --contacts 3000

Every case runs a full pass of each company at the same time, each on a thread of its own
with its own SQLite file (api.concurrency 4), all sharing one process budget. The sandbox
serves from a process of its own, so its clock is not held up by the client's threads (they
share no GIL). The table has the requests upstream saw, the 429s among them, how long the
passes took, and the most requests any one second at upstream saw (a sliding window).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync.budget import RequestBudget
from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import SyncError
from sync.log import configure_logging
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore


@dataclass(frozen=True)
class Case:
    name: str
    api: dict[str, Any]
    server: dict[str, Any] = field(default_factory=dict)
    target: str = ""


CASES = (
    Case("budget 20/s, burst 1", {"max_requests_per_s": 20}, target="<= 22"),
    Case("budget 20/s, burst 5", {"max_requests_per_s": 20, "burst": 5}, target="<= 25"),
    Case("budget 50/s, burst 1", {"max_requests_per_s": 50}, target="<= 51"),
    Case("no budget", {}),
    Case(
        "no budget; server allows 20/s, says so in RateLimit-*",
        {},
        {"rate_limit": 20, "rate_headers": "ietf"},
        "no 429",
    ),
    Case(
        "no budget; server allows 20/s, says so in X-RateLimit-*",
        {},
        {"rate_limit": 20, "rate_headers": "x"},
        "no 429",
    ),
    Case(
        "no budget; server allows 20/s, no headers", {}, {"rate_limit": 20, "rate_headers": "none"}
    ),
    Case(
        "budget 19/s; server allows 20/s, no headers",
        {"max_requests_per_s": 19},
        {"rate_limit": 20, "rate_headers": "none"},
        "no 429",
    ),
)


def _settings(base_url: str, url: str, company: str, api: dict[str, Any]) -> Settings:
    return Settings(
        api={
            "base_url": base_url,
            "token": DEFAULT_TOKEN,
            "companies": [company],
            "concurrency": 4,
            **api,
        },
        database={"url": url},
        retry={"max_attempts": 10, "max_elapsed_s": 60},
    )


def serve(companies: list[str], contacts: int, config: dict[str, Any]) -> None:
    """The sandbox process: prints its URL, then answers `report` on stdin with what it saw."""
    data = SandboxData.generate(companies, contacts, seed=9)
    with SandboxServer(data, SandboxConfig(**config)) as server:
        print(json.dumps(server.base_url), flush=True)
        for _ in sys.stdin:
            seen = server.requests()
            report = {
                "requests": len(seen),
                "limited": sum(r.status == 429 for r in seen),
                "busiest": server.api.log.busiest_window(1.0),
            }
            print(json.dumps(report), flush=True)


def run_case(case: Case, companies: list[str], contacts: int, folder: Path) -> list[str]:
    command = [sys.executable, __file__, "--serve", json.dumps(case.server)]
    command += ["--companies", str(len(companies)), "--contacts", str(contacts)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as sandbox:
        assert sandbox.stdin is not None
        assert sandbox.stdout is not None
        base_url = json.loads(sandbox.stdout.readline())
        wall, failures = _sync_at_once(base_url, case, companies, folder)
        sandbox.stdin.write("report\n")
        sandbox.stdin.flush()
        seen = json.loads(sandbox.stdout.readline())
        sandbox.stdin.close()
    return [
        case.name,
        "; ".join(failures) or "ok",
        str(seen["requests"]),
        str(seen["limited"]),
        f"{wall:.1f}",
        str(seen["busiest"]),
        case.target,
    ]


def _sync_at_once(
    base_url: str, case: Case, companies: list[str], folder: Path
) -> tuple[float, list[str]]:
    """A full pass of every company at once, sharing one budget; seconds taken, failures."""
    settings = {
        company: _settings(base_url, f"sqlite:///{folder / f'{company}.db'}", company, case.api)
        for company in companies
    }
    budget = RequestBudget.from_settings(settings[companies[0]].api)
    stores = {company: MirrorStore.open(s.database.url) for company, s in settings.items()}
    engines = {
        company: SyncEngine.from_settings(s, stores[company], budget=budget)
        for company, s in settings.items()
    }
    failures: list[str] = []

    def sync(company: str) -> None:
        try:
            engines[company].sync_company(company, backfill=True)
        except SyncError as exc:
            failures.append(f"{company}: exit {exc.exit_code}")

    threads = [threading.Thread(target=sync, args=(company,)) for company in companies]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for company in companies:
        engines[company].close()
        stores[company].close()
    return wall, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--companies", type=int, default=4)
    parser.add_argument("--contacts", type=int, default=2000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging("error", "console")
    companies = [str(number) for number in range(1, args.companies + 1)]
    if args.serve is not None:
        serve(companies, args.contacts, json.loads(args.serve))
        return 0
    rows = [["case", "outcome", "requests", "429s", "seconds", "busiest second", "target"]]
    with tempfile.TemporaryDirectory() as folder:
        for number, case in enumerate(CASES):
            case_folder = Path(folder) / str(number)
            case_folder.mkdir()
            rows.append(run_case(case, companies, args.contacts, case_folder))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
