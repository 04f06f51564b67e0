"""Prometheus metrics for the daemon, on a registry of its own, served on loopback only.

Counters are this process's own; company state (freshness, failures in a row, lock-outs,
quarantine) is read from the mirror at scrape time, so every replica reports the same.
Labels are company ids, pass outcomes and retry reasons: never a URL, a header or the token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sync.budget import RequestBudget
from sync.engine import PassReport
from sync.errors import ConfigError, DatabaseError
from sync.log import get_logger
from sync.store import CompanyHealth

__all__ = ["METRICS_HOST", "Metrics"]

METRICS_HOST = "127.0.0.1"
"""Metrics carry no secret but reveal company ids and activity: scrape them through the host."""

_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_MIRROR_READ_EVERY_S = 1.0
"""Scrapes closer together than this share one read of the mirror."""

log = get_logger("sync.metrics")

ReadHealth = Callable[[Sequence[str]], list[CompanyHealth]]


class Metrics:
    """The daemon's metrics; a `PassObserver`, plus counters the scheduler bumps itself."""

    def __init__(self, companies: Sequence[str] = (), *, interval_s: float | None = None) -> None:
        """`companies` start every per-company counter at 0 (an `increase()` then sees their
        first step) and are the ones read from the mirror; `interval_s` is `sync.interval`."""
        self._retries: Callable[[], dict[str, int]] = dict
        self._companies = tuple(companies)
        self._mirror: _MirrorCollector | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rows_upserted = Counter(
            "contacts_sync_rows_upserted",
            "Rows inserted or changed in the mirror.",
            ["company"],
            registry=r,
        )
        self.rows_fetched = Counter(
            "contacts_sync_rows_fetched", "Valid rows read from upstream.", ["company"], registry=r
        )
        self.pages_fetched = Counter(
            "contacts_sync_pages_fetched",
            "Pages read from upstream and stored.",
            ["company"],
            registry=r,
        )
        self.rows_quarantined = Counter(
            "contacts_sync_rows_quarantined",
            "Rows that could not be stored and went to the quarantine table.",
            ["company"],
            registry=r,
        )
        self.passes = Counter(
            "contacts_sync_passes",
            "Scheduled jobs by kind (sync, reconcile) and outcome (ok, failed, skipped: locked "
            "elsewhere, interrupted: stopped on request, refused: a reconcile that would have "
            "marked more than sync.max_delete_fraction).",
            ["company", "kind", "outcome"],
            registry=r,
        )
        self.reconcile_refused = Counter(
            "contacts_sync_reconcile_refused",
            "Reconciles that marked nothing because they would have marked more than "
            "sync.max_delete_fraction of the company's rows; run reconcile --force after a look.",
            ["company"],
            registry=r,
        )
        self.pass_duration = Histogram(
            "contacts_sync_pass_duration_seconds",
            "Duration of completed incremental passes.",
            ["company"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        interval = Gauge(
            "contacts_sync_interval_seconds",
            "The configured sync.interval: alert rules scale their staleness threshold by it.",
            ["company"],
            registry=r,
        )
        self.workers_busy = Gauge(
            "contacts_sync_workers_busy",
            "Daemon workers running a company's job now (at most sync.workers).",
            registry=r,
        )
        self.schedule_errors = Counter(
            "contacts_sync_schedule_errors",
            "Ticks that could not claim due companies from the mirror's schedule (the database "
            "was unreachable): no pass starts until it is back.",
            registry=r,
        )
        for company in self._companies:
            for counter in (
                self.rows_upserted,
                self.rows_fetched,
                self.pages_fetched,
                self.rows_quarantined,
                self.reconcile_refused,
            ):
                counter.labels(company)
            if interval_s is not None:
                interval.labels(company).set(interval_s)
        r.register(_RetryCollector(self._retry_snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # PassObserver
    def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
        """Nothing to count yet; pages are counted from the report."""

    def page_stored(self, company_id: str, pages: int, rows: int) -> None:
        """Counted once per pass from its report, so an interrupted pass counts nothing twice."""

    def pass_finished(self, report: PassReport) -> None:
        company = report.company_id
        self.rows_upserted.labels(company).inc(report.upserted)
        self.rows_fetched.labels(company).inc(report.rows_fetched)
        self.pages_fetched.labels(company).inc(report.pages)
        self.rows_quarantined.labels(company).inc(report.quarantined)
        self.pass_duration.labels(company).observe(report.duration_s)

    def count(self, company: str, kind: str, outcome: str) -> None:
        """Count a finished job; the next scrape reads the mirror again, so the company state
        served is never older than the jobs counted."""
        self.passes.labels(company, kind, outcome).inc()
        if self._mirror is not None:
            self._mirror.read_again()

    def serve(self, port: int) -> None:
        """Serve /metrics on METRICS_HOST:port in a background thread until `close()`."""
        try:
            self._server, self._thread = start_http_server(
                port, addr=METRICS_HOST, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"Config key metrics.port: cannot listen on {METRICS_HOST}:{port} "
                f"({exc.strerror or exc}); pick a free port, or 0 to turn metrics off."
            ) from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def track_retries(self, retries: Callable[[], dict[str, int]]) -> None:
        """Where retries by reason are read at scrape time (the engine counts them)."""
        self._retries = retries

    def track_mirror(self, read: ReadHealth, *, clock: Callable[[], float] = time.time) -> None:
        """Where company state is read at scrape time: `MirrorStore.health`, for the companies
        given to the constructor."""
        self._mirror = _MirrorCollector(self._companies, read, clock)
        self.registry.register(self._mirror)

    def track_budget(self, budget: RequestBudget) -> None:
        """The process's request budget: requests sent, the rate allowed, time waited."""
        self.registry.register(_BudgetCollector(budget))

    def _retry_snapshot(self) -> dict[str, int]:
        return self._retries()


class _MirrorCollector(Collector):
    """Company state from the mirror, read at most once a second whatever the scrapes, and
    again after each job this process ran.

    While the mirror cannot be read, the last reading is served and its ages keep growing, so
    a stale mirror still alerts; nothing is served before a first reading.
    """

    def __init__(
        self, companies: Sequence[str], read: ReadHealth, clock: Callable[[], float]
    ) -> None:
        self._companies = companies
        self._read = read
        self._clock = clock
        self._lock = threading.Lock()
        self._health: list[CompanyHealth] = []
        self._read_at: float | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self._families([], 0.0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._families(self._reading(), self._clock())

    def read_again(self) -> None:
        """The next scrape reads the mirror, however recent the last reading."""
        with self._lock:
            self._read_at = None

    def _reading(self) -> list[CompanyHealth]:
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= _MIRROR_READ_EVERY_S:
                self._read_at = now
                try:
                    self._health = self._read(self._companies)
                except DatabaseError as exc:
                    log.warning("metrics.mirror_unreadable", error=exc.message)
            return self._health

    @staticmethod
    def _families(health: list[CompanyHealth], now: float) -> Iterator[GaugeMetricFamily]:
        def family(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["company"])

        freshness = family(
            "contacts_sync_freshness_seconds",
            "Seconds since the company's last completed pass began: the mirror holds every "
            "change made upstream before then. Alert on this.",
        )
        success = family(
            "contacts_sync_last_success_timestamp_seconds",
            "Unix time the company's last completed pass ended.",
        )
        lag = family(
            "contacts_sync_cursor_lag_seconds",
            "Seconds between now and the company's cursor (the newest updated_at read, capped "
            "at the pass's start): it also grows while the list is quiet and the mirror fresh, "
            "so alert on contacts_sync_freshness_seconds instead.",
        )
        failures = family(
            "contacts_sync_failures_in_row",
            "Passes of the company that failed since its last completed one, by any process.",
        )
        locked = family(
            "contacts_sync_locked_out_seconds",
            "Seconds since a pass first found the company locked by another process with no "
            "pass completed since; 0 when none did.",
        )
        quarantined = family(
            "contacts_sync_quarantined_rows",
            "Rows of the company now in the quarantine table (upstream items it cannot store).",
        )
        for row in sorted(health, key=lambda row: row.company_id):
            labels = [row.company_id]
            if row.last_pass_started_at is not None:
                freshness.add_metric(labels, max(0.0, now - row.last_pass_started_at.timestamp()))
            if row.last_success_at is not None:
                success.add_metric(labels, row.last_success_at.timestamp())
            if row.cursor is not None:
                lag.add_metric(labels, max(0.0, now - row.cursor.timestamp()))
            failures.add_metric(labels, row.failures_in_row)
            since = row.locked_out_since
            locked.add_metric(labels, 0.0 if since is None else max(0.0, now - since.timestamp()))
            quarantined.add_metric(labels, row.quarantined)
        yield from (freshness, success, lag, failures, locked, quarantined)


class _RetryCollector(Collector):
    """Retries by reason, read at scrape time from the engine, which counts them."""

    def __init__(self, retries: Callable[[], dict[str, int]]) -> None:
        self._retries = retries

    def collect(self) -> Iterator[CounterMetricFamily]:
        retries = CounterMetricFamily(
            "contacts_sync_retries",
            "Upstream requests retried, by reason (status code or failure kind).",
            labels=["reason"],
        )
        for reason, count in sorted(self._retries().items()):
            retries.add_metric([reason], count)
        yield retries


class _BudgetCollector(Collector):
    """The request budget's figures, read at scrape time."""

    def __init__(self, budget: RequestBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "contacts_sync_requests",
            "Requests sent upstream by the process: every attempt, retries included.",
            value=self._budget.requests,
        )
        yield GaugeMetricFamily(
            "contacts_sync_request_budget_per_second",
            "Requests per second allowed now: api.max_requests_per_s, or lower after a 429 or "
            "by the server's rate-limit headers; 0 while paused, +Inf when nothing limits.",
            value=self._budget.allowed_rate(),
        )
        yield CounterMetricFamily(
            "contacts_sync_request_budget_wait_seconds",
            "Seconds requests spent waiting for the request budget, added up.",
            value=self._budget.waited_s,
        )
