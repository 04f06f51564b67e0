"""A sync pass: cursor -> filter -> pages -> store -> cursor, for one company at a time.

The cursor is the point up to which the mirror is known complete. It is advanced in one place,
`_finish_pass`, only after every page of the pass is committed, and never past the moment the
pass began: a row updated while the pass paged may have moved behind the walk, so the next pass
must look again from there.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, Protocol, TypeVar

import httpx

from sync.api import ContactsClient, Page
from sync.budget import RequestBudget
from sync.config import Settings
from sync.errors import (
    CompanyLocked,
    DatabaseError,
    PassInterrupted,
    SyncError,
    TransientUpstreamError,
    exit_code_for,
)
from sync.log import get_logger, redactor
from sync.paging import Bound, Fetch, PageStep, WalkStats, walk_pages
from sync.retry import RetryPolicy
from sync.rows import ContactRow, ParsedPage, RejectedRow, RowKey
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
_REREAD_WALKS = 4
"""Most incremental re-reads after a deletion's full scan: each one bounded, so the whole is."""
_EXAMPLES = 5
"""Example ids a reconcile names for rows upstream served older than the mirror's."""
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
    started_at: datetime | None = None
    """When the pass began (a resumed pass: when the pass it resumes began); the mirror holds
    every change made upstream before then once it completes."""
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
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["retries"] = dict(self.retries)
        for name in ("filter_since", "cursor_before", "cursor_after", "started_at"):
            moment = fields[name]
            fields[name] = moment.isoformat() if moment is not None else None
        return fields


@dataclass
class ReconcileReport:
    """What a deletion scan found and did; logged as one event and kept for `status`.

    `certain` is False when it marked nothing because it could not be sure; `refused` when it
    marked nothing because it would have marked more than `sync.max_delete_fraction`.
    """

    company_id: str
    scanned: int = 0
    """Distinct rows the full scan listed (the re-read walks are not counted)."""
    requests: int = 0
    walks: int = 0
    """Walks made: the full scan and its re-reads."""
    judged: int = 0
    """Live mirror rows the scan could have seen: the company's, of `api.client_id` if set."""
    missing: int = 0
    marked: int = 0
    restored: int = 0
    unreadable: int = 0
    """Items served whose id could not be read: any of them may be a missing row."""
    older_upstream: int = 0
    """Rows upstream served older than the mirror's copy (a restored backup, a lagging
    replica): the mirror keeps its newer version."""
    older_examples: list[int] = field(default_factory=list)
    certain: bool = True
    refused: bool = False
    forced: bool = False
    reason: str | None = None
    duration_s: float = 0.0

    def as_event(self) -> dict[str, Any]:
        return asdict(self)


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
        unfiltered: ContactsClient | None = None,
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._client = client
        self._unfiltered = unfiltered
        """A client without `api.client_id`, when it is set: reconcile looks for moved rows."""
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
        clock: Callable[[], datetime] = utc_now,
        budget: RequestBudget | None = None,
    ) -> SyncEngine:
        """Wire a client with the configured retry policy; the token is registered for redaction.

        With `stop`, a retry's backoff or a wait for the request budget ends as soon as it is
        set and the pass is interrupted. `clock` is this side's time: sync and deletion times,
        and a pass's start. `budget` is the process's, shared with every other engine it runs;
        without one, this engine makes its own from the settings.
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
        if budget is None:
            budget = RequestBudget.from_settings(settings.api)
        client = ContactsClient(
            settings.api, token, policy, transport=transport, budget=budget, stop=stop
        )
        unfiltered = None
        if settings.api.client_id is not None:
            every_client = settings.api.model_copy(update={"client_id": None})
            unfiltered = ContactsClient(
                every_client, token, policy, transport=transport, budget=budget, stop=stop
            )
        return cls(
            settings,
            client,
            store,
            retries=retries,
            observer=observer,
            clock=clock,
            stop=stop,
            unfiltered=unfiltered,
        )

    @property
    def retries(self) -> dict[str, int]:
        """Retries by reason since this engine was made, for metrics."""
        return dict(self._retries)

    def close(self) -> None:
        self._client.close()
        if self._unfiltered is not None:
            self._unfiltered.close()

    def sync_all(
        self,
        companies: Sequence[str],
        *,
        backfill: bool = False,
        since: datetime | None = None,
        restart: bool = False,
        workers: int = 1,
    ) -> list[CompanyOutcome]:
        """One pass per company, `workers` at a time; one that fails does not stop the others."""

        def one(company_id: str) -> CompanyOutcome:
            try:
                report = self.sync_company(
                    company_id, backfill=backfill, since=since, restart=restart
                )
            except SyncError as exc:
                return CompanyOutcome(company_id, None, exc)
            return CompanyOutcome(company_id, report, None)

        if workers <= 1 or len(companies) <= 1:
            return [one(company_id) for company_id in companies]
        with ThreadPoolExecutor(min(workers, len(companies)), "contacts-sync-pass") as pool:
            return list(pool.map(one, companies))

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

    def reconcile_company(self, company_id: str, *, force: bool = False) -> ReconcileReport:
        """Find rows that vanished upstream and mark them (or delete them, `sync.deletes`).

        `force` marks them even past `sync.max_delete_fraction`; see `_reconcile` for which
        rows count as vanished.
        """
        return self._under_lock(
            company_id, lambda: self._reconcile(company_id, force=force), is_pass=False
        )

    def _under_lock(
        self, company_id: str, work: Callable[[], _Result], *, is_pass: bool = True
    ) -> _Result:
        """Run work as the company's only writer; a failure is recorded for `status`, and a
        lock held elsewhere for alerting (a lock held for long means a stuck process)."""
        with ExitStack() as held:
            try:
                held.enter_context(self._store.company_lock(company_id))
            except CompanyLocked:
                self._record_locked_out(company_id)
                raise
            try:
                self._store.keep_history(
                    company_id, on=self._settings.sync.history, at=self._clock()
                )
                return work()
            except PassInterrupted:
                raise
            except SyncError as exc:
                self._record_failure(company_id, exc, is_pass=is_pass)
                raise

    def _reconcile(self, company_id: str, *, force: bool) -> ReconcileReport:
        """Mark the judged rows that are proven gone: absent from the full scan and every re-read.

        The proof, for a live mirror row R that upstream still holds: if R existed unchanged
        through the full scan, the scan saw it (the paging guarantee). Otherwise R changed
        during it, so its `updated_at` is now later than the scan's start (the earlier of our
        clock and the server's), and every re-read walk (`gt: start - lookback_s`) lists it;
        the first one it stays unchanged through sees it. So R is missed by all of them only if
        it changed during every one. Assumption: no live row changes during each of up to five
        consecutive walks; the re-reads stop as soon as nothing is missing or two in a row list
        the same rows. With `api.client_id` set, a row moved to another client is live but
        outside the filter; every change bumps `updated_at`, so the re-reads are made without
        the client filter, from the oldest missing row's mirrored `updated_at`.

        Never marked: rows of another client than `api.client_id`, ids that upstream served
        broken (quarantined), and anything at all when an item's id cannot be read.
        """
        started = time.monotonic()
        report = ReconcileReport(company_id, forced=force)
        client_id = self._settings.api.client_id
        lookback = timedelta(seconds=self._settings.sync.lookback_s)
        deleted_before = set(self._store.versions(company_id, deleted=True))
        scan_began = self._clock()
        full = self._scan_keys(company_id, None, report)
        report.scanned = len(full.newest)
        if full.server_began is not None:
            scan_began = min(scan_began, full.server_began)
        mirror = self._store.versions(company_id)
        judged = {
            contact_id
            for contact_id, version in mirror.items()
            if not version.deleted and (client_id is None or version.client_id == client_id)
        }
        report.judged = len(judged)
        seen = full
        missing = judged - full.present
        if missing:
            oldest = [scan_began]
            if client_id is not None:
                oldest += (mirror[contact_id].updated_at for contact_id in missing)
            since = floor_to_second(min(oldest) - lookback)
            previous: set[RowKey] | None = None
            for _ in range(_REREAD_WALKS):
                walk = self._scan_keys(company_id, since, report, unfiltered=True, keep=missing)
                seen = seen.merged(walk)
                missing -= walk.present
                if not missing or walk.keys == previous:
                    break
                previous = walk.keys
        back_again = deleted_before & seen.present
        self._store.undelete(company_id, back_again, self._clock())
        report.restored = len(back_again)
        report.missing = len(missing)
        report.unreadable = len(seen.unreadable)
        older = sorted(
            contact_id
            for contact_id, newest in seen.newest.items()
            if contact_id in mirror and mirror[contact_id].updated_at > newest
        )
        report.older_upstream = len(older)
        report.older_examples = older[:_EXAMPLES]
        if missing:
            self._judge(report, missing, any_listed=bool(full.present), force=force)
        if report.certain and not report.refused and missing:
            hard = self._settings.sync.deletes == "hard"
            report.marked = self._store.mark_deleted(company_id, missing, self._clock(), hard=hard)
        report.duration_s = round(time.monotonic() - started, 3)
        self._store.record_reconcile(company_id, report.as_event())
        if report.older_upstream:
            log.warning(
                "reconcile.older_upstream",
                company_id=company_id,
                count=report.older_upstream,
                example_ids=report.older_examples,
                hint="upstream served older versions than the mirror's; the mirror kept its own",
            )
        if report.refused:
            log.warning("reconcile.refused", company_id=company_id, reason=report.reason)
        log.info("reconcile.finished", **report.as_event())
        return report

    def _judge(
        self, report: ReconcileReport, missing: set[int], *, any_listed: bool, force: bool
    ) -> None:
        """Whether the missing rows may be marked: an unsure scan never, an implausible one
        only with `force`; `report.reason` says why not."""
        if report.unreadable:
            report.certain = False
            report.reason = (
                f"upstream served {report.unreadable:,} item"
                f"{'s' if report.unreadable != 1 else ''} whose id cannot be read, "
                "and any of them may be a missing row"
            )
            return
        fraction = self._settings.sync.max_delete_fraction
        share = len(missing) / max(report.judged, 1)
        if not any_listed:
            reason = "upstream listed no rows at all"
        elif share > fraction:
            reason = (
                f"{len(missing):,} of {report.judged:,} live rows ({share:.0%}) are missing, "
                f"more than sync.max_delete_fraction ({fraction:g}) allows"
            )
        else:
            return
        report.reason = reason
        report.refused = not force

    def _scan_keys(
        self,
        company_id: str,
        since: datetime | None,
        report: ReconcileReport,
        *,
        unfiltered: bool = False,
        keep: Collection[int] = (),
    ) -> _Seen:
        """Walk the list, storing what it reads; what it saw and the server's time.

        `unfiltered` walks without `api.client_id` (when set), storing only rows of that
        client or in `keep`: other clients' rows are not the mirror's.
        """
        api = self._settings.api
        stats = WalkStats()
        seen = _Seen()
        client = self._unfiltered if unfiltered and self._unfiltered is not None else self._client
        only = api.client_id if client is not self._client else None
        steps = self._walk_steps(
            client, company_id, since, [], stats=stats, fresh_after=self._clock()
        )
        with self._store.page_writer(company_id) as writer, closing(steps):
            for step in steps:
                parsed = step.page.parsed
                if seen.server_began is None:
                    seen.server_began = step.page.server_time
                seen.add(parsed)
                rows, rejected = _ours(parsed, only, keep)
                if rows or rejected:
                    writer.write(rows, rejected, None, self._clock())
                _commit_unless_more_ready(writer, step)
                if self._stop is not None and self._stop.is_set() and not step.last:
                    raise PassInterrupted(company_id)
        report.walks += 1
        report.requests += stats.requests
        return seen

    def _walk_steps(
        self,
        client: ContactsClient,
        company_id: str,
        since: datetime | None,
        retried: list[str],
        **walk: Any,
    ) -> Generator[PageStep]:
        """`walk_pages` over the company's list; when it ends (or is closed) the requests it
        left in flight stop retrying."""
        api = self._settings.api
        walk_over = threading.Event()
        try:
            yield from walk_pages(
                self._fetcher(client, company_id, since, walk_over, retried),
                limit=api.page_size,
                concurrency=api.concurrency,
                **walk,
            )
        finally:
            walk_over.set()

    def _fetcher(
        self,
        client: ContactsClient,
        company_id: str,
        since: datetime | None,
        walk_over: threading.Event,
        retried: list[str],
    ) -> Fetch:
        """The walk's fetch: the pass's `gt:` filter, or for one request the walk's own bound.

        Requests still retrying when `walk_over` is set (prefetched past the end, or when
        the walk failed or stopped) give up, so finishing never waits for them.
        """

        def fetch(offset: int, limit: int, bound: Bound | None = None, /) -> Page:
            after, before = since, None
            if bound is not None:
                op, moment = bound
                after, before = (moment, None) if op == "gt" else (None, moment)
            return client.fetch_page(
                company_id,
                offset=offset,
                limit=limit,
                updated_after=after,
                updated_before=before,
                abandoned=walk_over,
                retried=retried,
            )

        return fetch

    def _record_failure(self, company_id: str, exc: SyncError, *, is_pass: bool) -> None:
        log.error("pass.failed", company_id=company_id, error=exc.message, exit_code=exc.exit_code)
        try:
            self._store.record_failure(company_id, exc.message, self._clock(), failed_pass=is_pass)
        except DatabaseError:
            log.warning("pass.failure_not_recorded", company_id=company_id)

    def _record_locked_out(self, company_id: str) -> None:
        try:
            self._store.record_locked_out(company_id, self._clock())
        except DatabaseError:
            log.warning("pass.lock_out_not_recorded", company_id=company_id)

    def _run_pass(
        self, company_id: str, *, backfill: bool, since: datetime | None, restart: bool
    ) -> PassReport:
        started = time.monotonic()
        began = self._clock()
        state, checkpoint = self._store.pass_state(company_id)
        mode, filter_since = self._plan(state.cursor, backfill=backfill, since=since)
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
            started_at=began if checkpoint is None else min(began, checkpoint.started_at),
        )
        log.info(
            "pass.started",
            company_id=company_id,
            mode=mode,
            filter_since=filter_since.isoformat() if filter_since else None,
            resumed=report.resumed,
        )
        if self._observer is not None:
            self._observer.pass_started(company_id, mode, report.resumed)
        retried: list[str] = []
        walked = self._walk(company_id, mode, filter_since, checkpoint, report, retried=retried)
        report.retries = dict(Counter(retried))
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
        *,
        retried: list[str],
    ) -> tuple[datetime | None, datetime]:
        """Page through the list; each commit saves the checkpoint that resumes after it."""
        api = self._settings.api
        pass_began = checkpoint.started_at if checkpoint else self._clock()
        high_water = checkpoint.high_water if checkpoint else None
        pages = checkpoint.pages if checkpoint else 0
        rows = checkpoint.rows if checkpoint else 0
        stats = WalkStats()
        off_seen: set[RowKey] = set()
        steps = self._walk_steps(
            self._client,
            company_id,
            filter_since,
            retried,
            start_offset=checkpoint.next_offset if checkpoint else 0,
            anchors=checkpoint.anchors if checkpoint else (),
            stats=stats,
            throttled=lambda: self._retries["429"],
            fresh_after=pass_began,
        )
        with self._store.page_writer(company_id) as writer, closing(steps):
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
                if parsed.rows or parsed.rejected or not step.last:
                    # The empty page that ends a walk has nothing to store, and the cursor's
                    # commit drops the checkpoint: a quiet pass writes once.
                    report.upserted += writer.write(
                        parsed.rows, parsed.rejected, saved, self._clock()
                    )
                _commit_unless_more_ready(writer, step)
                report.pages += 1
                report.rows_fetched += len(parsed.rows)
                report.quarantined += len(parsed.rejected)
                off_filter = set()
                if not step.aside:  # a tie group's own list has a filter of its own
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
        """Advance the cursor: to the newest row seen, or to the pass's start minus the lookback
        when that is later (a quiet list), never past the pass's start; and not at all when
        the pass's filter left rows after the cursor unread.

        Taking the pass's start on a quiet list lets the next pass's window hold no row, so it
        is one request; rows committed late are still re-read up to twice the lookback behind
        the start (the server's clock, which stamps them).
        """
        high_water, pass_began = walked
        settled = pass_began - timedelta(seconds=self._settings.sync.lookback_s)
        target = None if high_water is None else min(max(high_water, settled), pass_began)
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
            company_id,
            target,
            self._clock(),
            summary=report.as_event(),
            started_at=report.started_at,
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


@dataclass
class _Seen:
    """What reconcile's walks saw: every key, the newest version and the ids served broken."""

    keys: set[RowKey] = field(default_factory=set)
    newest: dict[int, datetime] = field(default_factory=dict)
    """The newest `updated_at` served per valid id."""
    broken: set[int] = field(default_factory=set)
    """Ids of items served in a form that cannot be stored: live, so never marked."""
    unreadable: set[str] = field(default_factory=set)
    """Items served whose id cannot be read, as JSON: a page overlap reads one twice."""
    server_began: datetime | None = None

    @property
    def present(self) -> set[int]:
        """Ids upstream holds, stored or not."""
        return self.newest.keys() | self.broken

    def add(self, parsed: ParsedPage) -> None:
        newest = self.newest
        for key in parsed.keys:
            if key is None:
                continue
            self.keys.add(key)
            contact_id, updated_at = key
            known = newest.get(contact_id)
            if known is None or known < updated_at:
                newest[contact_id] = updated_at
        for item in parsed.rejected:
            named = _readable_id(item)
            if named is None:
                self.unreadable.add(json.dumps(item.payload, sort_keys=True, default=str))
            elif named > 0:
                self.broken.add(named)

    def merged(self, other: _Seen) -> _Seen:
        newest = dict(self.newest)
        for contact_id, updated_at in other.newest.items():
            if newest.get(contact_id, updated_at) <= updated_at:
                newest[contact_id] = updated_at
        return _Seen(
            keys=self.keys | other.keys,
            newest=newest,
            broken=self.broken | other.broken,
            unreadable=self.unreadable | other.unreadable,
            server_began=self.server_began,
        )


_MAX_ID = 2**63 - 1
"""The largest id a mirror row can have (bigint)."""


def _readable_id(item: RejectedRow) -> int | None:
    """The id a broken item names, read leniently (`"12"`, `12.0`); 0 when it names one no
    mirror row can have (below 1, beyond 64 bits); None when it names none at all."""
    if item.contact_id is not None:
        return max(item.contact_id, 0)
    payload = item.payload
    value = payload.get("id") if isinstance(payload, dict) else None
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= _MAX_ID else 0


def _ours(
    parsed: ParsedPage, client_id: int | None, keep: Collection[int]
) -> tuple[Sequence[ContactRow], Sequence[RejectedRow]]:
    """What of a page the mirror stores: all of it, or with `client_id`, only that client's
    rows and the ids in `keep` (rows the mirror already has)."""
    if client_id is None:
        return parsed.rows, parsed.rejected
    rows = [row for row in parsed.rows if row.client_id == client_id or row.id in keep]
    rejected = [item for item in parsed.rejected if item.contact_id in keep]
    return rows, rejected
