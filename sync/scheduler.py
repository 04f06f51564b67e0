"""The daemon: APScheduler's clock, a pool of workers, signals, systemd and metrics wiring.

No sync logic here: a job is one engine call, and whatever it raises is logged, counted and
left to the company's next turn. When a company is due lives in the mirror (`sync_schedule`),
so replicas sharing a PostgreSQL mirror claim each due company once between them.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor as SchedulerExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from sync.budget import RequestBudget
from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import CompanyLocked, DatabaseError, PassInterrupted, SyncError
from sync.log import get_logger
from sync.metrics import Metrics
from sync.stoppable import StoppableTransport
from sync.store import MirrorStore
from sync.systemd import Notifier

__all__ = ["Daemon", "serve"]

log = get_logger("sync.daemon")

_AHEAD_SHARE = 4
"""A claim takes `sync.workers // 4` jobs more than there are free workers, queued here."""
SYNC = "sync"
RECONCILE = "reconcile"
_MAX_TICK_S = 1.0
"""How often the schedule is looked at when no worker has just finished (a finishing worker
looks at once): the most a due company waits beyond its due time while workers are free."""


def serve(settings: Settings) -> int:
    """`run`: open the mirror, wire engine, metrics and systemd, run until stopped; exit code 0.

    The engine's HTTP transport can be cut off, so a stop never waits for a slow upstream.
    """
    stop = threading.Event()
    workers = settings.sync.workers
    ca_bundle = settings.api.ca_bundle  # the client's own TLS settings go with its transport
    transport = StoppableTransport(
        max_connections=max(4, settings.api.concurrency * 2) * workers,
        ca_bundle=str(ca_bundle) if ca_bundle is not None else None,
    )
    # Each running pass holds its lock's connection and a transaction's; one more for claims.
    store = MirrorStore.open(settings.database.url, connections=2 * workers + 1)
    try:
        metrics = Metrics(settings.api.companies, interval_s=settings.sync.interval)
        budget = RequestBudget.from_settings(settings.api)  # the process's one budget
        engine = SyncEngine.from_settings(
            settings, store, observer=metrics, stop=stop, transport=transport, budget=budget
        )
        metrics.track_retries(lambda: engine.retries)
        metrics.track_mirror(store.health)
        metrics.track_budget(budget)
        try:
            if settings.metrics.port > 0:
                metrics.serve(settings.metrics.port)
            daemon = Daemon(settings, engine, store, stop, metrics=metrics, on_stop=transport.abort)
            daemon.run()
        finally:
            metrics.close()
            engine.close()
    finally:
        store.close()
    return 0


class Daemon:
    """Runs each company's incremental pass every `sync.interval` (and its reconcile every
    `sync.reconcile_interval`), up to `sync.workers` companies at once, until stopped.

    APScheduler is the clock: every tick it claims due companies from the mirror's schedule
    for the free workers, and a worker that finishes claims the next one itself. A claim moves
    the company's due time a whole interval on, so a replica killed mid-pass leaves its
    companies due again one interval later, for any replica to take.

    The first signal cuts off in-flight requests and ends the running passes at once (nothing
    half-done is committed: pages commit whole, with their checkpoint, and the cursor moves
    only after a complete pass); the daemon then exits 0. A second signal kills at once.
    """

    def __init__(
        self,
        settings: Settings,
        engine: SyncEngine,
        store: MirrorStore,
        stop: threading.Event,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._stop = stop
        self._metrics = metrics
        self._notifier = notifier if notifier is not None else Notifier()
        self._on_stop = on_stop
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._companies = list(settings.api.companies)
        sync = settings.sync
        self._every = {SYNC: sync.interval}
        if sync.reconcile_interval is not None:
            self._every[RECONCILE] = sync.reconcile_interval
        self._workers = ThreadPoolExecutor(sync.workers, thread_name_prefix="contacts-sync-pass")
        self._capacity = sync.workers
        self._running: set[str] = set()
        """Companies with a job on a worker now; claims skip them."""
        self._queued: deque[tuple[str, str]] = deque()
        """Claimed jobs waiting for a worker, in claim order."""
        self._claiming = threading.Lock()
        self._scheduler = BackgroundScheduler(
            executors={"default": SchedulerExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """First signal: stop gracefully; the default action is restored for a second one."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self._stop.set()
        if self._on_stop is not None:
            self._on_stop()
        log.info("daemon.stopping", signal=signal.Signals(signum).name)

    def run(self) -> None:
        interval = self._settings.sync.interval
        now = datetime.now(UTC)
        first_due = {SYNC: now}
        if RECONCILE in self._every:
            first_due[RECONCILE] = datetime.fromtimestamp(
                now.timestamp() + self._every[RECONCILE], UTC
            )
        self._store.add_to_schedule(first_due, self._companies)
        self._scheduler.add_job(
            self._claim_and_start,
            "interval",
            seconds=min(_MAX_TICK_S, interval / 10),
            next_run_time=now,
            id="claim",
        )
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._scheduler.start()
        workers = self._capacity
        log.info(
            "daemon.started",
            companies=len(self._companies),
            interval_s=interval,
            workers=workers,
            owner=self._owner,
        )
        self._notifier.ready(
            f"syncing {len(self._companies)} companies every {interval:g} s, {workers} at once"
        )
        self._wait_for_stop()
        self._notifier.stopping("stopping: finishing the current pages")
        stopping = time.monotonic()
        self._scheduler.shutdown(wait=True)
        self._workers.shutdown(wait=True)
        log.info("daemon.stopped", stop_s=round(time.monotonic() - stopping, 3))

    def _wait_for_stop(self) -> None:
        """Block until stopped, pinging systemd's watchdog while the scheduler is alive."""
        every = self._notifier.watchdog_interval_s
        if every is None:
            self._stop.wait()
            return
        self._notifier.watchdog()
        while not self._stop.wait(every):
            if self._scheduler.running:
                self._notifier.watchdog()

    def _claim_and_start(self, *, wait: bool = False) -> None:
        """Start due jobs on the free workers, claiming from the schedule when none are queued.

        A claim takes a few ahead (a quarter of `sync.workers` more than there are free
        workers), so a worker that finishes often starts the next job without a round trip,
        while other replicas still find due companies to claim. The tick
        gives up at once while a worker claims (`wait` False); a finishing worker waits.
        """
        if not self._claiming.acquire(blocking=wait):
            return
        try:
            free = self._capacity - len(self._running)
            if self._stop.is_set() or free <= 0:
                return
            if len(self._queued) < free:
                self._claim(free + self._capacity // _AHEAD_SHARE - len(self._queued))
            while free > 0 and self._queued:
                company_id, job = self._queued.popleft()
                self._running.add(company_id)
                self._workers.submit(self._run_job, company_id, job)
                free -= 1
        finally:
            self._claiming.release()
        if self._metrics is not None:
            self._metrics.workers_busy.set(len(self._running))

    def _claim(self, wanted: int) -> None:
        busy = self._running | {company for company, _ in self._queued}
        try:
            claimed = self._store.claim_due(
                self._every,
                self._companies,
                limit=wanted,
                owner=self._owner,
                now=datetime.now(UTC),
                busy=busy,
            )
        except DatabaseError as exc:
            log.warning("schedule.claim_failed", error=exc.message)
            if self._metrics is not None:
                self._metrics.schedule_errors.inc()
            return
        self._queued.extend(claimed)

    def _run_job(self, company_id: str, job: str) -> None:
        try:
            if job == RECONCILE:
                self._guarded(company_id, job, self._reconcile)
            else:
                self._guarded(company_id, job, self._engine.sync_company)
        finally:
            with self._claiming:
                self._running.discard(company_id)
        self._claim_and_start(wait=True)

    def _reconcile(self, company_id: str) -> str:
        """A reconcile job; one the mass-deletion guard stopped is a "refused" outcome."""
        report = self._engine.reconcile_company(company_id)
        if not report.refused:
            return "ok"
        if self._metrics is not None:
            self._metrics.reconcile_refused.labels(company_id).inc()
        return "refused"

    def _guarded(self, company_id: str, kind: str, job: Callable[[str], object]) -> None:
        """Run a job; whatever it raises is logged and counted, and the next tick tries again.

        A job may name its own outcome by returning it (a string); otherwise it is "ok".
        """
        if self._stop.is_set():
            return
        outcome = "ok"
        try:
            result = job(company_id)
            if isinstance(result, str):
                outcome = result
        except CompanyLocked:
            outcome = "skipped"
            log.info("pass.skipped", company_id=company_id, reason="locked by another process")
        except PassInterrupted:
            outcome = "interrupted"
            log.info("pass.interrupted", company_id=company_id)
        except SyncError as exc:
            if self._stop.is_set():
                outcome = "interrupted"
                log.info("pass.interrupted", company_id=company_id)
            else:
                outcome = "failed"
                log.warning("pass.will_retry_next_tick", company_id=company_id, error=exc.message)
        except Exception:
            outcome = "failed"
            log.exception("pass.crashed", company_id=company_id)
        if self._metrics is not None:
            self._metrics.count(company_id, kind, outcome)
