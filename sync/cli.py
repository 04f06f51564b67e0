"""The command line: each command parses, builds objects, calls one function, maps the exit code."""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sync.errors import (
    ConfigError,
    DeletionRefused,
    SyncError,
    exit_code_for,
    severity_rank,
    worst_exit_code,
)
from sync.log import configure_logging, get_logger, redactor

# Each command imports what it uses, where it uses it: `--help` and `status` must start in a
# blink, and SQLAlchemy, httpx, pydantic and rich alone take most of a second to import.
if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from sync.config import Settings
    from sync.engine import CompanyOutcome, PassObserver, ReconcileReport, SyncEngine
    from sync.sandbox import FaultKind, SandboxServer
    from sync.store import CompanyStatus

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's panels would double `--help`'s start-up
    help="Keep a local SQL mirror of the CRM's contacts list, incrementally and exactly.",
)


@functools.cache
def _console(*, stderr: bool = False) -> Console:
    """rich, for the commands that print tables or progress (not `--help`, not `once`)."""
    from rich.console import Console  # noqa: PLC0415 - see the imports above

    return Console(stderr=stderr)


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Config file (default ./sync.toml, or $CONTACTS_SYNC_CONFIG).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    ctx.obj = config


def _settings(ctx: typer.Context) -> Settings:
    from sync.config import config_warnings, load_settings  # noqa: PLC0415 - pydantic: not for --help

    settings = load_settings(ctx.obj)
    configure_logging(settings.log.level, settings.log.format)
    for warning in config_warnings(settings, ctx.obj):
        get_logger("sync.cli").warning("config.insecure", warning=warning)
    return settings


@contextmanager
def _engine(
    settings: Settings,
    observer: PassObserver | None = None,
    stop: threading.Event | None = None,
) -> Iterator[SyncEngine]:
    from sync.engine import SyncEngine  # noqa: PLC0415 - httpx and the rest: only for passes
    from sync.store import MirrorStore  # noqa: PLC0415 - SQLAlchemy: not for --help

    store = MirrorStore.open(settings.database.url)
    try:
        engine = SyncEngine.from_settings(settings, store, observer=observer, stop=stop)
        try:
            yield engine
        finally:
            engine.close()
    finally:
        store.close()


def _companies(settings: Settings, company: str | None) -> list[str]:
    if company is None:
        return list(settings.api.companies)
    if company not in settings.api.companies:
        raise ConfigError(
            f"Company {company} is not in api.companies; add it to the config "
            f"or pick one of {', '.join(settings.api.companies)}."
        )
    return [company]


def _finish(outcomes: Sequence[CompanyOutcome]) -> int:
    """Say what failed, worst first, one sentence per company; return the run's exit code."""
    failed = sorted(outcomes, key=lambda o: severity_rank(o.exit_code))
    for outcome in failed:
        if outcome.error is not None:
            _say_error(f"Company {outcome.company_id}: {outcome.error.message}")
    return worst_exit_code([o.exit_code for o in outcomes])


def _say_error(message: str) -> None:
    print(redactor().scrub(message), file=sys.stderr)


@app.command()
def run(ctx: typer.Context) -> int:
    """Run as a daemon: scheduled incremental passes until SIGTERM or SIGINT, then exit 0."""
    from sync.scheduler import serve  # noqa: PLC0415 - only this command needs it

    return serve(_settings(ctx))


@app.command()
def once(ctx: typer.Context) -> int:
    """Run one incremental pass for every configured company, then exit."""
    settings = _settings(ctx)
    with _engine(settings) as engine:
        return _finish(engine.sync_all(settings.api.companies, workers=settings.sync.workers))


@app.command()
def backfill(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(help="Load rows updated after this ISO-8601 time instead of all rows."),
    ] = None,
    company: Annotated[str | None, typer.Option(help="Only this company id.")] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an interrupted backfill's checkpoint.")
    ] = False,
) -> int:
    """Load everything, or everything since a time; resumable, never moves a cursor back."""
    from sync.progress import progress_for  # noqa: PLC0415 - rich's live display: this command's

    settings = _settings(ctx)
    since_at = _parse_since(since)
    companies = _companies(settings, company)
    with progress_for(_console(stderr=True)) as progress, _engine(settings, progress) as engine:
        outcomes = engine.sync_all(companies, backfill=True, since=since_at, restart=restart)
    return _finish(outcomes)


@app.command()
def reconcile(
    ctx: typer.Context,
    company: Annotated[str | None, typer.Option(help="Only this company id.")] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Mark the missing rows even past sync.max_delete_fraction."),
    ] = False,
) -> int:
    """Scan every id upstream and mark the rows that vanished there (sync.deletes)."""
    from sync.engine import CompanyOutcome  # noqa: PLC0415 - httpx and the rest: only for passes

    settings = _settings(ctx)
    outcomes = []
    with _engine(settings) as engine:
        for company_id in _companies(settings, company):
            try:
                found = engine.reconcile_company(company_id, force=force)
            except SyncError as exc:
                outcomes.append(CompanyOutcome(company_id, None, exc))
                continue
            said = _reconciled(found, settings.sync.deletes)
            if found.refused:
                outcomes.append(CompanyOutcome(company_id, None, DeletionRefused(said)))
                continue
            outcomes.append(CompanyOutcome(company_id, None, None))
            _console().print(said)
    return _finish(outcomes)


def _reconciled(found: ReconcileReport, deletes: str) -> str:
    """One sentence: what the scan saw, what it did, and what to do when it did nothing."""
    if found.refused:
        return (
            f"Reconcile marked nothing: {found.reason}; check upstream, then run "
            "contacts-sync reconcile --force to mark them."
        )
    said = f"{found.scanned:,} rows upstream, {found.missing:,} of the mirror's missing from it"
    if found.older_upstream:
        examples = ", ".join(map(str, found.older_examples))
        said += (
            f", {found.older_upstream:,} served older than the mirror's copy (ids {examples}"
            f"{', ...' if found.older_upstream > len(found.older_examples) else ''}: upstream "
            "may be a restored backup or a lagging replica; the mirror kept its newer rows)"
        )
    said = f"Company {found.company_id}: {said}"
    if not found.certain:
        return f"{said}; marked nothing because {found.reason}, so run reconcile again later."
    verb = "deleted" if deletes == "hard" else "marked deleted"
    restored = f", {found.restored:,} back again" if found.restored else ""
    return f"{said}, {found.marked:,} {verb}{restored}."


def _parse_since(since: str | None) -> datetime | None:
    if since is None:
        return None
    from sync.rows import parse_timestamp  # noqa: PLC0415 - msgspec: only when --since is given

    try:
        return parse_timestamp(since)
    except ValueError:
        raise ConfigError(
            f"--since {since!r} is not an ISO-8601 time; write it like 2024-01-31T00:00:00Z."
        ) from None


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> int:
    """Show each company's cursor, last success, last error and row counts."""
    from sync.store import MirrorStore  # noqa: PLC0415 - SQLAlchemy: not for --help

    settings = _settings(ctx)
    store = MirrorStore.open(settings.database.url)
    try:
        rows = store.status(settings.api.companies)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"companies": [_status_json(r) for r in rows]}, indent=2))
    else:
        _console().print(_status_table(rows))
    return 0


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _status_json(row: CompanyStatus) -> dict[str, Any]:
    return {
        "company_id": row.company_id,
        "cursor": _iso(row.cursor),
        "last_success_at": _iso(row.last_success_at),
        "last_error": redactor().scrub(row.last_error),
        "last_error_at": _iso(row.last_error_at),
        "contacts": row.contacts,
        "deleted": row.deleted,
        "quarantined": row.quarantined,
        "last_pass": row.last_pass,
        "last_reconcile": row.last_reconcile,
    }


def _short(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else None


def _status_table(rows: Sequence[CompanyStatus]) -> RenderableType:
    """A table that fits 80 columns; each company's last error follows it on a line of its own."""
    from rich import box  # noqa: PLC0415 - rich: only for the commands that print tables
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(
        title="contacts-sync status (UTC)", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    for column in ("company", "cursor", "last success"):
        table.add_column(column, no_wrap=True)
    for column in ("contacts", "deleted", "quarantined"):
        table.add_column(column, justify="right", no_wrap=True)
    errors = []
    for row in rows:
        table.add_row(
            row.company_id,
            _short(row.cursor) or "-",
            _short(row.last_success_at) or "never",
            f"{row.contacts:,}",
            f"{row.deleted:,}",
            f"{row.quarantined:,}",
        )
        if row.last_error:
            when = _short(row.last_error_at) or "?"
            errors.append(
                Text(f"company {row.company_id}, {when}: {redactor().scrub(row.last_error)}")
            )
        off_filter = (row.last_pass or {}).get("off_filter")
        if off_filter:
            errors.append(
                Text(
                    f"company {row.company_id}: the last pass stored {off_filter:,} "
                    f"row{'s' if off_filter != 1 else ''} that the filter it sent should have "
                    "excluded; upstream may have changed how it filters."
                )
            )
        errors.extend(Text(line) for line in _reconcile_notes(row))
    return Group(table, *errors)


def _reconcile_notes(row: CompanyStatus) -> list[str]:
    """What the last reconcile left for a person to look at: a refusal, unsure or older rows."""
    last = row.last_reconcile or {}
    notes = []
    if last.get("refused") or not last.get("certain", True):
        fix = "run contacts-sync reconcile --force" if last.get("refused") else "run it again"
        notes.append(
            f"company {row.company_id}: the last reconcile marked nothing because "
            f"{last.get('reason')}; check upstream, then {fix}."
        )
    older = last.get("older_upstream")
    if older:
        examples = ", ".join(map(str, last.get("older_examples", [])))
        notes.append(
            f"company {row.company_id}: the last reconcile found {older:,} "
            f"row{'s' if older != 1 else ''} upstream older than the mirror's (ids {examples}); "
            "upstream may be a restored backup or a lagging replica, the mirror kept its own."
        )
    return notes


@app.command("dbt-sources")
def dbt_sources(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="The dbt source name.")] = "contacts_sync",
) -> int:
    """Print a dbt sources.yml for the mirror: tables, column descriptions, key tests, freshness."""
    from sync.dbt import sources_yaml  # noqa: PLC0415 - only this command needs it (and PyYAML)

    settings = _settings(ctx)
    sys.stdout.write(sources_yaml(settings.database.url, settings.sync.interval, name))
    return 0


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=0, max=65535)] = 8787,
    contacts: Annotated[int, typer.Option(help="Generated contacts per company.", min=0)] = 1000,
    company: Annotated[
        list[str] | None, typer.Option(help="Company id to serve (repeatable; default 1).")
    ] = None,
    order: Annotated[
        str, typer.Option(help="Server order: id, updated_asc or updated_desc.")
    ] = "id",
    *,
    page_cap: Annotated[
        int | None, typer.Option(help="Serve at most N items per page, whatever limit asks.", min=1)
    ] = None,
    max_offset: Annotated[
        int | None, typer.Option(help="The largest offset served (see --offset-mode).", min=0)
    ] = None,
    offset_mode: Annotated[
        str,
        typer.Option(help="Past --max-offset: reject (400) or clamp (serve the page at it)."),
    ] = "reject",
    tie_order: Annotated[
        str,
        typer.Option(
            help="Rows sharing one updated_at, in the updated orders: stable (by id), "
            "per_page (by offset+limit) or per_request (shuffled every time)."
        ),
    ] = "stable",
    bulk_tie: Annotated[
        int, typer.Option(help="Give N generated rows of each company one updated_at.", min=0)
    ] = 0,
    latency_ms: Annotated[
        float, typer.Option(help="Added to every request, in milliseconds.", min=0)
    ] = 0.0,
    broken_run: Annotated[
        int, typer.Option(help="Serve N unparseable items in a row in each list.", min=0)
    ] = 0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="KIND or KIND:N: answer the first N requests (default 1) with this fault, "
            "e.g. short, trickle, 429, 503, reset, stall, malformed (repeatable)."
        ),
    ] = None,
    rate_limit: Annotated[
        int | None,
        typer.Option(
            help="Serve at most N requests per --rate-window (all companies together); "
            "past it answer 429 with Retry-After.",
            min=1,
        ),
    ] = None,
    rate_window: Annotated[
        float, typer.Option(help="The --rate-limit window, in seconds.", min=0.001)
    ] = 1.0,
    rate_headers: Annotated[
        str,
        typer.Option(
            help="With --rate-limit, the quota headers sent: both, ietf (RateLimit-*), "
            "x (X-RateLimit-*, Reset as a Unix time) or none."
        ),
    ] = "both",
) -> int:
    """Serve a local simulator of the upstream API until Ctrl-C."""
    from sync.sandbox import (  # noqa: PLC0415 - only this command needs the sandbox
        CONTACTS_PATH,
        DEFAULT_TOKEN,
        FAULT_KINDS,
        OFFSET_MODES,
        ORDERS,
        RATE_HEADERS,
        TIE_ORDERS,
        SandboxConfig,
        serve_forever,
    )

    configure_logging("warning", "console")
    if order not in ORDERS:
        raise _not_one_of("--order", order, ORDERS)
    if offset_mode not in OFFSET_MODES:
        raise _not_one_of("--offset-mode", offset_mode, OFFSET_MODES)
    if tie_order not in TIE_ORDERS:
        raise _not_one_of("--tie-order", tie_order, TIE_ORDERS)
    if rate_headers not in RATE_HEADERS:
        raise _not_one_of("--rate-headers", rate_headers, RATE_HEADERS)
    if bulk_tie and not 2 <= bulk_tie <= contacts:
        raise ConfigError(f"--bulk-tie {bulk_tie} must be from 2 to --contacts ({contacts}).")
    faults = [_fault(given, FAULT_KINDS) for given in fault or ()]
    config = SandboxConfig(
        order=order,
        page_cap=page_cap,
        max_offset=max_offset,
        offset_mode=offset_mode,
        tie_order=tie_order,
        latency_ms=latency_ms,
        rate_limit=rate_limit,
        rate_window_s=rate_window,
        rate_headers=rate_headers,
    )
    companies = company or ["1"]

    def announce(server: SandboxServer) -> None:
        _console().print(
            f"Sandbox serving {contacts:,} contacts per company at {server.base_url}"
            f"{CONTACTS_PATH} (token {DEFAULT_TOKEN}, companies {', '.join(companies)}, "
            f"order {order}, ties {tie_order}); Ctrl-C stops it."
        )

    serve_forever(
        port,
        contacts,
        companies,
        config=config,
        bulk_tie=bulk_tie,
        broken_run=broken_run,
        faults=faults,
        on_ready=announce,
    )
    return 0


def _fault(given: str, kinds: Sequence[FaultKind]) -> tuple[FaultKind, int]:
    """`--fault KIND` or `KIND:N` as (kind, times)."""
    name, _, times = given.partition(":")
    if name not in kinds:
        raise _not_one_of("--fault", name, kinds)
    if times and not (times.isdigit() and int(times) >= 1):
        raise ConfigError(f"--fault {given}: N must be a whole number from 1; use KIND:N.")
    return next(kind for kind in kinds if kind == name), int(times or 1)


def _not_one_of(flag: str, value: str, allowed: Sequence[str]) -> ConfigError:
    return ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}; pick one of them.")


@app.command()
def demo(
    database: Annotated[Path, typer.Option(help="SQLite file to write (replaced).")] = Path(
        "demo.db"
    ),
    contacts: Annotated[int, typer.Option(help="Contacts in the sandbox.", min=1)] = 20_000,
) -> int:
    """Start the sandbox, mirror it into a local SQLite file, change it, sync again, show status."""
    from sync.demo import run_demo  # noqa: PLC0415 - only this command needs it

    configure_logging("warning", "console")
    _console().print(_status_table(run_demo(_console(), database, contacts)))
    return 0


def main() -> None:
    """Console-script entry point: runs a command and exits with the contract's code."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _say_error("Interrupted; run the same command again to resume where it stopped.")
        code = 130
    except typer.TyperException as exc:  # a usage error, from the click that typer bundles
        exc.show()  # type: ignore[attr-defined]  # all of them are that click's ClickException
        code = 2
    except SyncError as exc:
        _say_error(exc.message)
        code = exit_code_for(exc)
    except KeyboardInterrupt:
        _say_error("Interrupted; run the same command again to resume where it stopped.")
        code = 130
    except Exception:
        get_logger("sync.cli").exception("internal_error")
        _say_error(
            'contacts-sync hit an internal error; rerun with log.level = "debug" '
            "and report the log above."
        )
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
