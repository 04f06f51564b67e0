"""The daemon: APScheduler jobs that call the engine, and signal handling. No sync logic here."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from sync.config import Settings
from sync.engine import SyncEngine
from sync.errors import CompanyLocked, PassInterrupted, SyncError
from sync.log import get_logger

__all__ = ["Daemon"]

log = get_logger("sync.daemon")

_JITTER_FRACTION = 0.05


class Daemon:
    """Runs an incremental pass per company every `sync.interval` until stopped.

    The first signal asks the running pass to stop after its current page (nothing half-done
    is committed: the cursor rules hold) and the daemon exits 0; a second one kills at once.
    """

    def __init__(self, settings: Settings, engine: SyncEngine, stop: threading.Event) -> None:
        self._settings = settings
        self._engine = engine
        self._stop = stop
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """First signal: stop gracefully; the default action is restored for a second one."""
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self._stop.set()

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
        log.info(
            "daemon.started", companies=list(self._settings.api.companies), interval_s=interval
        )
        self._stop.wait()
        self._scheduler.shutdown(wait=True)
        log.info("daemon.stopped")

    def _sync_company(self, company_id: str) -> None:
        self._guarded(company_id, self._engine.sync_company)

    def _reconcile_company(self, company_id: str) -> None:
        self._guarded(company_id, self._engine.reconcile_company)

    def _guarded(self, company_id: str, job: Callable[[str], object]) -> None:
        """Run a job; whatever it raises is logged and the next tick tries again."""
        if self._stop.is_set():
            return
        try:
            job(company_id)
        except CompanyLocked:
            log.info("pass.skipped", company_id=company_id, reason="locked by another process")
        except PassInterrupted:
            log.info("pass.interrupted", company_id=company_id)
        except SyncError as exc:
            log.warning("pass.will_retry_next_tick", company_id=company_id, error=exc.message)
