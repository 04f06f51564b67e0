"""`contacts-sync demo`: the sandbox, a full load, some upstream changes, an incremental pass."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sync.config import Settings
from sync.engine import PassReport, SyncEngine
from sync.progress import progress_for
from sync.sandbox import DEFAULT_TOKEN, SandboxData, SandboxServer
from sync.store import CompanyStatus, MirrorStore

__all__ = ["run_demo"]

COMPANY = "1"


def _fresh_database(path: Path) -> str:
    """The demo always starts from an empty file, so that its story reads the same every time."""
    siblings = [*path.parent.glob(path.name + "-*"), *path.parent.glob(path.name + ".*")]
    for leftover in [path, *siblings]:
        leftover.unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _describe(report: PassReport, store: MirrorStore) -> str:
    """The pass's figures, and what the mirror holds after it: pages overlap by a row or more
    (that is how the walk notices rows moving), so rows read exceed the contacts stored."""
    (status,) = store.status([COMPANY])
    rate = report.rows_fetched / max(report.duration_s, 1e-3)
    return (
        f"{report.rows_fetched:,} rows read in {report.requests:,} "
        f"request{'s' if report.requests != 1 else ''} ({report.duration_s:.2f} s, {rate:,.0f} "
        f"rows/s); {status.contacts:,} contacts in the mirror, cursor "
        f"{report.cursor_after.isoformat() if report.cursor_after else '-'}"
    )


def run_demo(console: Console, database: Path, contacts: int) -> list[CompanyStatus]:
    """Run the whole story and return the final status rows for the caller to print."""
    data = SandboxData.generate((COMPANY,), contacts)
    with SandboxServer(data) as server:
        console.print(
            f"[bold]Sandbox[/] serving {contacts:,} contacts at {server.base_url} "
            f"(token {DEFAULT_TOKEN}, company {COMPANY})"
        )
        settings = Settings(
            api={
                "base_url": server.base_url,
                "token": DEFAULT_TOKEN,
                "companies": [COMPANY],
                "api_version": "2024-01",
            },
            database={"url": _fresh_database(database)},
        )
        store = MirrorStore.open(settings.database.url)
        try:
            with progress_for(console) as progress:
                engine = SyncEngine.from_settings(settings, store, observer=progress)
                try:
                    first = engine.sync_company(COMPANY)
                finally:
                    engine.close()
            console.print(f"[bold]Full load[/]: {_describe(first, store)}")
            updated = data.update(COMPANY, count=25)
            inserted = data.insert(COMPANY, count=5)
            console.print(
                f"[bold]Upstream changed[/]: {len(updated)} contacts updated, {len(inserted)} added"
            )
            engine = SyncEngine.from_settings(settings, store)
            try:
                second = engine.sync_company(COMPANY)
            finally:
                engine.close()
            console.print(f"[bold]Incremental pass[/]: {_describe(second, store)}")
            statuses = store.status([COMPANY])
        finally:
            store.close()
    console.print(f"Mirror written to {database}; query it with sqlite3 or any SQL tool.")
    return statuses
