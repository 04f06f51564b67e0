"""The daemon: APScheduler jobs that call the engine, signals, systemd and metrics wiring.

No sync logic here: a job is one engine call, and whatever it raises is logged, counted and
left to the next tick.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from sync.budget import RequestBudget
from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import CompanyLocked, PassInterrupted, SyncError
from sync.log import get_logger
from sync.metrics import Metrics
from sync.stoppable import StoppableTransport
from sync.store import MirrorStore
from sync.systemd import Notifier

__all__ = ["Daemon", "serve"]

log = get_logger("sync.daemon")

_JITTER_FRACTION = 0.05


def serve(settings: Settings) -> int:
    """`run`: open the mirror, wire engine, metrics and systemd, run until stopped; exit code 0.

    The engine's HTTP transport can be cut off, so a stop never waits for a slow upstream.
    """
    stop = threading.Event()
    ca_bundle = settings.api.ca_bundle  # the client's own TLS settings go with its transport
    transport = StoppableTransport(
        max_connections=max(4, settings.api.concurrency * 2),
        ca_bundle=str(ca_bundle) if ca_bundle is not None else None,
    )
    store = MirrorStore.open(settings.database.url)
    try:
        metrics = Metrics()
        budget = RequestBudget.from_settings(settings.api)  # the process's one budget
        engine = SyncEngine.from_settings(
            settings, store, observer=metrics, stop=stop, transport=transport, budget=budget
        )
        metrics.track_retries(lambda: engine.retries)
        metrics.track_budget(budget)
        try:
            if settings.metrics.port > 0:
                metrics.serve(settings.metrics.port)
            Daemon(settings, engine, stop, metrics=metrics, on_stop=transport.abort).run()
        finally:
            metrics.close()
            engine.close()
    finally:
        store.close()
    return 0


class Daemon:
    """Runs an incremental pass per company every `sync.interval` until stopped.

    The first signal cuts off in-flight requests and ends the running pass at once (nothing
    half-done is committed: pages commit whole, with their checkpoint, and the cursor moves
    only after a complete pass); the daemon then exits 0. A second signal kills at once.
    """

    def __init__(
        self,
        settings: Settings,
        engine: SyncEngine,
        stop: threading.Event,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._stop = stop
        self._metrics = metrics
        self._notifier = notifier if notifier is not None else Notifier()
        self._on_stop = on_stop
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
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
        for company_id in self._settings.api.companies:
            self._scheduler.add_job(
                self._sync_company,
                "interval",
                args=[company_id],
                seconds=interval,
                jitter=max(1, int(interval * _JITTER_FRACTION)),
                next_run_time=datetime.now(UTC),
                id=f"sync:{company_id}",
            )
        reconcile_every = self._settings.sync.reconcile_interval
        if reconcile_every is not None:
            for company_id in self._settings.api.companies:
                self._scheduler.add_job(
                    self._reconcile_company,
                    "interval",
                    args=[company_id],
                    seconds=reconcile_every,
                    jitter=max(1, int(reconcile_every * _JITTER_FRACTION)),
                    id=f"reconcile:{company_id}",
                )
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._scheduler.start()
        companies = list(self._settings.api.companies)
        log.info("daemon.started", companies=companies, interval_s=interval)
        self._notifier.ready(f"syncing {len(companies)} companies every {interval:g} s")
        self._wait_for_stop()
        self._notifier.stopping("stopping: finishing the current page")
        stopping = time.monotonic()
        self._scheduler.shutdown(wait=True)
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

    def _sync_company(self, company_id: str) -> None:
        self._guarded(company_id, "sync", self._engine.sync_company)

    def _reconcile_company(self, company_id: str) -> None:
        self._guarded(company_id, "reconcile", self._reconcile)

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
