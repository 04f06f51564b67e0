"""A sync pass: cursor -> filter -> pages -> store -> cursor, for one company at a time.

The cursor is the point up to which the mirror is known complete. It is advanced in one place,
`_finish_pass`, only after every page of the pass is committed, and never past the moment the
pass began: a row updated while the pass paged may have moved behind the walk, so the next pass
must look again from there.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, Protocol, TypeVar

import httpx

from sync.api import ContactsClient, Page
from sync.config import Settings
from sync.errors import (
    DatabaseError,
    PassInterrupted,
    SyncError,
    TransientUpstreamError,
    exit_code_for,
)
from sync.log import get_logger, redactor
from sync.paging import Bound, Fetch, PageStep, WalkStats, walk_pages
from sync.retry import RetryPolicy
from sync.rows import ContactRow, RowKey
from sync.store import Checkpoint, MirrorStore, PageWriter

__all__ = [
    "CompanyOutcome",
    "PassObserver",
    "PassReport",
    "ReconcileReport",
    "SyncEngine",
    "floor_to_second",
]

log = get_logger("sync.engine")
_updated_at = attrgetter("updated_at")
_Result = TypeVar("_Result")

INCREMENTAL = "incremental"
_RECONCILE_WALKS = 4
"""Incremental re-reads after a deletion scan before it gives up on being sure."""
BACKFILL = "backfill"
_MAX_TRANSACTION_S = 0.25
"""Longest a group of pages stays uncommitted: what a kill re-fetches, and how long other
writers of a SQLite file may wait for it."""
_NEXT_PAGE_WAIT_S = 0.02
"""How long a group waits for its next page (already requested) before it is committed."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def floor_to_second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


@dataclass
class PassReport:
    """What one pass did; logged as one event and kept as the company's last pass summary."""

    company_id: str
    mode: str
    filter_since: datetime | None
    resumed: bool
    cursor_before: datetime | None
    cursor_after: datetime | None = None
    pages: int = 0
    rows_fetched: int = 0
    upserted: int = 0
    quarantined: int = 0
    off_filter: int = 0
    """Rows stored although they do not match the filter sent (`updated_at` not after the
    `gt:` value, or another `client_id`): a sign that upstream changed its filter semantics."""
    requests: int = 0
    realignments: int = 0
    commits: int = 0
    """Transactions the pages took: fewer than pages when they arrived faster than stored."""
    retries: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_event(self) -> dict[str, Any]:
        fields = asdict(self)
        for name in ("filter_since", "cursor_before", "cursor_after"):
            moment = fields[name]
            fields[name] = moment.isoformat() if moment is not None else None
        return fields


@dataclass
class ReconcileReport:
    """What a deletion scan found; `certain` is False when it marked nothing to stay safe."""

    company_id: str
    scanned: int = 0
    requests: int = 0
    missing: int = 0
    marked: int = 0
    restored: int = 0
    certain: bool = True
    reason: str | None = None
    duration_s: float = 0.0


class PassObserver(Protocol):
    """Progress hooks for a display; the engine works the same without one."""

    def pass_started(self, company_id: str, mode: str, resumed: bool) -> None: ...

    def page_stored(self, company_id: str, pages: int, rows: int) -> None: ...

    def pass_finished(self, report: PassReport) -> None: ...


@dataclass(frozen=True)
class CompanyOutcome:
    company_id: str
    report: PassReport | None
    error: SyncError | None

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else exit_code_for(self.error)


class SyncEngine:
    """Runs passes against one API client and one mirror store; holds no global state."""

    def __init__(
        self,
        settings: Settings,
        client: ContactsClient,
        store: MirrorStore,
        *,
        retries: Counter[str] | None = None,
        observer: PassObserver | None = None,
        clock: Callable[[], datetime] = utc_now,
        stop: threading.Event | None = None,
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._client = client
        self._store = store
        self._retries = retries if retries is not None else Counter()
        self._observer = observer
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: MirrorStore,
        *,
        observer: PassObserver | None = None,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> SyncEngine:
        """Wire a client with the configured retry policy; the token is registered for redaction.

        With `stop`, a retry's backoff ends as soon as it is set and the pass is interrupted.
        """
        token = settings.api.resolve_token()
        redactor().add(token)
        retries: Counter[str] = Counter()

        def count_retry(error: TransientUpstreamError, delay: float) -> None:
            retries[error.reason] += 1
            log.warning("upstream.retry", reason=error.reason, status=error.status, delay_s=delay)

        def pause(seconds: float) -> None:
            if stop is None:
                time.sleep(seconds)
            elif stop.wait(seconds):
                raise PassInterrupted("(stopping)")

        policy = RetryPolicy(
            max_attempts=settings.retry.max_attempts,
            max_elapsed_s=settings.retry.max_elapsed_s,
            on_retry=count_retry,
            sleep=pause,
        )
        client = ContactsClient(settings.api, token, policy, transport=transport)
        return cls(settings, client, store, retries=retries, observer=observer, stop=stop)

    @property
    def retries(self) -> dict[str, int]:
        """Retries by reason since this engine was made, for metrics."""
        return dict(self._retries)

    def close(self) -> None:
        self._client.close()

    def sync_all(
        self,
        companies: Sequence[str],
        *,
        backfill: bool = False,
        since: datetime | None = None,
        restart: bool = False,
    ) -> list[CompanyOutcome]:
        """One pass per company; a company that fails does not stop the others."""
        outcomes = []
        for company_id in companies:
            try:
                report = self.sync_company(
                    company_id, backfill=backfill, since=since, restart=restart
                )
            except SyncError as exc:
                outcomes.append(CompanyOutcome(company_id, None, exc))
            else:
                outcomes.append(CompanyOutcome(company_id, report, None))
        return outcomes

    def sync_company(
        self,
        company_id: str,
        *,
        backfill: bool = False,
        since: datetime | None = None,
        restart: bool = False,
    ) -> PassReport:
        """One complete pass under the company's lock; on failure the cursor stays where it was."""
        return self._under_lock(
            company_id,
            lambda: self._run_pass(company_id, backfill=backfill, since=since, restart=restart),
        )

    def reconcile_company(self, company_id: str) -> ReconcileReport:
        """Find rows that vanished upstream and mark them (or delete them, `sync.deletes`).

        A full scan is trusted for rows that did not change while it ran; rows changed since
        it began are then read again by incremental walks until two in a row agree. A scan
        that cannot be sure marks nothing and says why.
        """
        return self._under_lock(company_id, lambda: self._reconcile(company_id))

    def _under_lock(self, company_id: str, work: Callable[[], _Result]) -> _Result:
        """Run work as the company's only writer; a failure is recorded for `status`."""
        with self._store.company_lock(company_id):
            try:
                return work()
            except PassInterrupted:
                raise
            except SyncError as exc:
                self._record_failure(company_id, exc)
                raise

    def _reconcile(self, company_id: str) -> ReconcileReport:
        started = time.monotonic()
        report = ReconcileReport(company_id)
        scan_began = self._clock()
        deleted_before = self._store.deleted_ids(company_id)
        seen, scan_began = self._scan_ids(company_id, None, scan_began, report)
        since = floor_to_second(scan_began - timedelta(seconds=self._settings.sync.lookback_s))
        live = self._store.live_ids(company_id)
        back_again = deleted_before & seen
        self._store.undelete(company_id, back_again)
        report.restored = len(back_again)
        missing = live - seen
        if not seen and live:
            report.certain, report.reason = False, "upstream listed no rows at all"
        elif missing:
            previous: set[RowKey] | None = None
            for _ in range(_RECONCILE_WALKS):
                keys, _ = self._scan_keys(company_id, since, report)
                missing -= {contact_id for contact_id, _ in keys}
                if keys == previous:
                    break
                previous = keys
            else:
                report.certain, report.reason = False, "upstream kept changing during the scan"
        report.missing = len(missing)
        if report.certain and missing:
            hard = self._settings.sync.deletes == "hard"
            report.marked = self._store.mark_deleted(company_id, missing, self._clock(), hard=hard)
        report.duration_s = round(time.monotonic() - started, 3)
        log.info("reconcile.finished", **asdict(report))
        return report

    def _scan_ids(
        self, company_id: str, since: datetime | None, began: datetime, report: ReconcileReport
    ) -> tuple[set[int], datetime]:
        keys, server_began = self._scan_keys(company_id, since, report)
        if server_began is not None:
            began = min(began, server_began)
        return {contact_id for contact_id, _ in keys}, began

    def _scan_keys(
        self, company_id: str, since: datetime | None, report: ReconcileReport
    ) -> tuple[set[RowKey], datetime | None]:
        """Walk the (filtered) list, storing what it reads; the keys seen and the server's time."""
        api = self._settings.api
        stats = WalkStats()
        keys: set[RowKey] = set()
        server_began = None
        steps = walk_pages(
            self._fetcher(company_id, since),
            limit=api.page_size,
            concurrency=api.concurrency,
            stats=stats,
            fresh_after=self._clock(),
        )
        with self._store.page_writer(company_id) as writer:
            for step in steps:
                parsed = step.page.parsed
                if server_began is None:
                    server_began = step.page.server_time
                keys.update(key for key in parsed.keys if key is not None)
                writer.write(parsed.rows, parsed.rejected, None, self._clock())
                _commit_unless_more_ready(writer, step)
                if self._stop is not None and self._stop.is_set() and not step.last:
                    raise PassInterrupted(company_id)
        report.scanned += len(keys)
        report.requests += stats.requests
        return keys, server_began

    def _fetcher(self, company_id: str, since: datetime | None) -> Fetch:
        """The walk's fetch: the pass's `gt:` filter, or for one request the walk's own bound."""
        client = self._client

        def fetch(offset: int, limit: int, bound: Bound | None = None, /) -> Page:
            if bound is None:
                return client.fetch_page(
                    company_id, offset=offset, limit=limit, updated_after=since
                )
            op, moment = bound
            return client.fetch_page(
                company_id,
                offset=offset,
                limit=limit,
                updated_after=moment if op == "gt" else None,
                updated_before=moment if op == "lt" else None,
            )

        return fetch

    def _record_failure(self, company_id: str, exc: SyncError) -> None:
        log.error("pass.failed", company_id=company_id, error=exc.message, exit_code=exc.exit_code)
        try:
            self._store.record_failure(company_id, exc.message, self._clock())
        except DatabaseError:
            log.warning("pass.failure_not_recorded", company_id=company_id)

    def _run_pass(
        self, company_id: str, *, backfill: bool, since: datetime | None, restart: bool
    ) -> PassReport:
        started = time.monotonic()
        state = self._store.read_state(company_id)
        mode, filter_since = self._plan(state.cursor, backfill=backfill, since=since)
        checkpoint = self._store.load_checkpoint(company_id)
        if checkpoint is not None and (restart or not _resumable(checkpoint, mode, filter_since)):
            self._store.clear_checkpoint(company_id)
            checkpoint = None
        if checkpoint is not None:
            mode, filter_since = checkpoint.mode, checkpoint.filter_since
        report = PassReport(
            company_id=company_id,
            mode=mode,
            filter_since=filter_since,
            resumed=checkpoint is not None,
            cursor_before=state.cursor,
        )
        retries_before = Counter(self._retries)
        log.info(
            "pass.started",
            company_id=company_id,
            mode=mode,
            filter_since=filter_since.isoformat() if filter_since else None,
            resumed=report.resumed,
        )
        if self._observer is not None:
            self._observer.pass_started(company_id, mode, report.resumed)
        walked = self._walk(company_id, mode, filter_since, checkpoint, report)
        report.retries = dict(Counter(self._retries) - retries_before)
        report.duration_s = round(time.monotonic() - started, 3)
        report.cursor_after = self._finish_pass(company_id, walked, report)
        log.info("pass.finished", **report.as_event())
        if self._observer is not None:
            self._observer.pass_finished(report)
        return report

    def _plan(
        self, cursor: datetime | None, *, backfill: bool, since: datetime | None
    ) -> tuple[str, datetime | None]:
        """The pass's mode and its `gt:` filter (None: the whole list)."""
        if backfill:
            return BACKFILL, floor_to_second(since) if since is not None else None
        if cursor is not None:
            return INCREMENTAL, self._incremental_since(cursor)
        initial = self._settings.sync.initial_since
        return INCREMENTAL, floor_to_second(initial) if initial is not None else None

    def _incremental_since(self, cursor: datetime) -> datetime:
        """The filter an incremental pass sends: the cursor minus the lookback, whole seconds."""
        return floor_to_second(cursor - timedelta(seconds=self._settings.sync.lookback_s))

    def _covers_cursor(self, filter_since: datetime | None, cursor: datetime | None) -> bool:
        """Whether a pass with this filter read every row the next incremental pass would skip.

        A later filter (`backfill --since` after downtime) left rows between the two unread, so
        the cursor must stay where it is for the next pass to fetch them.
        """
        if filter_since is None or cursor is None:
            return True
        return filter_since <= self._incremental_since(cursor)

    def _walk(
        self,
        company_id: str,
        mode: str,
        filter_since: datetime | None,
        checkpoint: Checkpoint | None,
        report: PassReport,
    ) -> tuple[datetime | None, datetime]:
        """Page through the list; each commit saves the checkpoint that resumes after it."""
        api = self._settings.api
        pass_began = checkpoint.started_at if checkpoint else self._clock()
        high_water = checkpoint.high_water if checkpoint else None
        pages = checkpoint.pages if checkpoint else 0
        rows = checkpoint.rows if checkpoint else 0
        stats = WalkStats()
        off_seen: set[RowKey] = set()
        steps = walk_pages(
            self._fetcher(company_id, filter_since),
            limit=api.page_size,
            concurrency=api.concurrency,
            start_offset=checkpoint.next_offset if checkpoint else 0,
            anchors=checkpoint.anchors if checkpoint else (),
            stats=stats,
            throttled=lambda: self._retries["429"],
            fresh_after=pass_began,
        )
        with self._store.page_writer(company_id) as writer:
            for step in steps:
                page = step.page
                if checkpoint is None and report.pages == 0 and page.server_time is not None:
                    pass_began = min(pass_began, page.server_time)
                parsed = page.parsed
                if parsed.rows:
                    newest = max(map(_updated_at, parsed.rows))
                    high_water = newest if high_water is None else max(high_water, newest)
                pages += 1
                rows += len(parsed.rows)
                saved = Checkpoint(
                    mode=mode,
                    filter_since=filter_since,
                    next_offset=step.next_offset,
                    anchors=step.anchors,
                    high_water=high_water,
                    started_at=pass_began,
                    pages=pages,
                    rows=rows,
                )
                report.upserted += writer.write(parsed.rows, parsed.rejected, saved, self._clock())
                _commit_unless_more_ready(writer, step)
                report.pages += 1
                report.rows_fetched += len(parsed.rows)
                report.quarantined += len(parsed.rejected)
                off_filter = _off_filter(parsed.rows, filter_since, api.client_id) - off_seen
                if off_filter:
                    off_seen |= off_filter
                    report.off_filter += len(off_filter)
                    log.warning(
                        "rows.off_filter",
                        company_id=company_id,
                        count=len(off_filter),
                        filter_since=filter_since.isoformat() if filter_since else None,
                        client_id=api.client_id,
                        hint="upstream may have changed its filter semantics; the rows were stored",
                    )
                if parsed.rejected:
                    log.warning(
                        "rows.quarantined",
                        company_id=company_id,
                        count=len(parsed.rejected),
                        first_reason=parsed.rejected[0].reason,
                    )
                if self._observer is not None:
                    self._observer.page_stored(company_id, pages, rows)
                if self._stop is not None and self._stop.is_set() and not step.last:
                    raise PassInterrupted(company_id)  # the writer commits what was written
        report.commits = writer.commits
        report.requests = stats.requests
        report.realignments = stats.realignments
        return high_water, pass_began

    def _finish_pass(
        self, company_id: str, walked: tuple[datetime | None, datetime], report: PassReport
    ) -> datetime | None:
        """Advance the cursor: to the newest row seen, but never past the pass's start, and not
        at all when the pass's filter left rows after the cursor unread."""
        high_water, pass_began = walked
        target = None if high_water is None else min(high_water, pass_began)
        if target is not None and not self._covers_cursor(
            report.filter_since, report.cursor_before
        ):
            log.warning(
                "pass.cursor_kept",
                company_id=company_id,
                cursor=report.cursor_before.isoformat() if report.cursor_before else None,
                filter_since=report.filter_since.isoformat() if report.filter_since else None,
                hint="rows updated between the cursor and the filter were not read; "
                "the next incremental pass reads them",
            )
            target = None
        return self._store.advance_cursor(
            company_id, target, self._clock(), summary=report.as_event()
        )


def _commit_unless_more_ready(writer: PageWriter, step: PageStep) -> None:
    """Group pages into one commit while they keep coming, but never keep a transaction open
    while upstream is slow to answer, nor for longer than a moment."""
    if step.last or writer.open_s >= _MAX_TRANSACTION_S or not step.next_ready(_NEXT_PAGE_WAIT_S):
        writer.commit()


def _off_filter(
    rows: Sequence[ContactRow], filter_since: datetime | None, client_id: int | None
) -> set[RowKey]:
    """The rows the filter sent should have excluded (pages overlap: counted once by key)."""
    if filter_since is None and client_id is None:
        return set()
    return {
        row.key
        for row in rows
        if (filter_since is not None and row.updated_at <= filter_since)
        or (client_id is not None and row.client_id != client_id)
    }


def _resumable(checkpoint: Checkpoint, mode: str, filter_since: datetime | None) -> bool:
    """A checkpoint is taken up by a pass of the same kind, and an interrupted backfill by any."""
    if checkpoint.mode == BACKFILL and mode == INCREMENTAL:
        return True
    return checkpoint.mode == mode and checkpoint.filter_since == filter_since
