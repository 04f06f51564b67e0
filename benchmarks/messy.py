"""What each messy upstream costs and how a pass ends against it: a table.

    python benchmarks/messy.py            # 2,000 contacts per case, SQLite
    python benchmarks/messy.py --contacts 10000

Every case runs a full load and then an incremental pass after 2% of the rows changed,
against the sandbox set to misbehave one way, and prints the outcome (exact, or the exit code
and sentence) and the requests upstream saw, beside the same list served well.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import SyncError
from sync.rows import parse_items
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    bulk_tie: int = 0


_PER_PAGE = {"order": "updated_asc", "tie_order": "per_page"}
_PER_REQUEST = {"order": "updated_desc", "tie_order": "per_request"}
CASES = (
    Case("well-behaved, by id", {}),
    Case("well-behaved, by updated_at", {"order": "updated_asc"}),
    Case("pages capped at 40", {"page_cap": 40}),
    Case("offsets refused past 1,000", {"max_offset": 1000, "offset_mode": "reject"}),
    Case("offsets clamped past 1,000", {"max_offset": 1000, "offset_mode": "clamp"}),
    Case("bulk tie, stable order", {"order": "updated_asc"}, bulk_tie=600),
    Case(
        "bulk tie, order per offset+limit", {"order": "updated_asc", "tie_order": "per_page"}, 600
    ),
    Case("bulk tie, order per request", {"order": "updated_desc", "tie_order": "per_request"}, 600),
)


def _settings(server: SandboxServer, url: str) -> Settings:
    return Settings(
        api={
            "base_url": server.base_url,
            "token": DEFAULT_TOKEN,
            "companies": ["1"],
            "api_version": "2024-01",
            "concurrency": 4,
        },
        database={"url": url},
        retry={"max_attempts": 3, "max_elapsed_s": 5},
    )


def _pass(settings: Settings) -> str:
    store = MirrorStore.open(settings.database.url)
    engine = SyncEngine.from_settings(settings, store)
    try:
        engine.sync_company("1")
    except SyncError as exc:
        return f"exit {exc.exit_code}: {exc.message[:70]}..."
    finally:
        engine.close()
        store.close()
    return "ok"


def _exact(server: SandboxServer, url: str) -> bool:
    store = MirrorStore.open(url)
    try:
        mirrored = store.versions("1", deleted=False)
    finally:
        store.close()
    upstream = {row.id: row.updated_at for row in parse_items(server.data.snapshot("1")).rows}
    return {i: version.updated_at for i, version in mirrored.items()} == upstream


def run_case(case: Case, contacts: int, folder: Path) -> list[str]:
    data = SandboxData.generate(("1",), contacts, seed=5)
    url = f"sqlite:///{folder / (case.name.replace(' ', '_') + '.db')}"
    with SandboxServer(data, SandboxConfig(**case.config)) as server:
        if case.bulk_tie:
            data.bulk_tie("1", case.bulk_tie)
        settings = _settings(server, url)
        first = _pass(settings)
        full = len(server.requests("1"))
        server.clear_requests()
        data.update("1", count=contacts // 50)
        if case.bulk_tie:
            data.bulk_tie("1", case.bulk_tie // 2)
        second = _pass(settings)
        incremental = len(server.requests("1"))
        outcome = "exact" if first == second == "ok" and _exact(server, url) else first
        if first == "ok" and second != "ok":
            outcome = f"incremental: {second}"
    return [case.name, outcome, str(full), str(incremental)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--contacts", type=int, default=2000)
    args = parser.parse_args(argv)
    rows = [["upstream", "outcome", "full load requests", "incremental requests"]]
    with tempfile.TemporaryDirectory() as folder:
        rows += [run_case(case, args.contacts, Path(folder)) for case in CASES]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
