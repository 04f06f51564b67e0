"""Prometheus metrics for the daemon, on a registry of its own, served on loopback only.

Labels are company ids, pass outcomes and retry reasons: never a URL, a header or the token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sync.budget import RequestBudget
from sync.engine import PassReport
from sync.errors import ConfigError

__all__ = ["METRICS_HOST", "Metrics"]

METRICS_HOST = "127.0.0.1"
"""Metrics carry no secret but reveal company ids and activity: scrape them through the host."""

_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The daemon's metrics; a `PassObserver`, plus counters the scheduler bumps itself."""

    def __init__(self) -> None:
        self._retries: Callable[[], dict[str, int]] = dict
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._cursors: dict[str, datetime] = {}
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
        self.last_success = Gauge(
            "contacts_sync_last_success_timestamp_seconds",
            "Unix time of the company's last completed pass.",
            ["company"],
            registry=r,
        )
        r.register(_LiveCollector(self._cursor_snapshot, self._retry_snapshot))
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
        self.last_success.labels(company).set(time.time())
        if report.cursor_after is not None:
            with self._lock:
                self._cursors[company] = report.cursor_after

    def count(self, company: str, kind: str, outcome: str) -> None:
        self.passes.labels(company, kind, outcome).inc()

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

    def track_budget(self, budget: RequestBudget) -> None:
        """The process's request budget: requests sent, the rate allowed, time waited."""
        self.registry.register(_BudgetCollector(budget))

    def _retry_snapshot(self) -> dict[str, int]:
        return self._retries()

    def _cursor_snapshot(self) -> dict[str, datetime]:
        with self._lock:
            return dict(self._cursors)


class _LiveCollector(Collector):
    """Values computed at scrape time: cursor lag (it grows between passes) and retries."""

    def __init__(
        self,
        cursors: Callable[[], dict[str, datetime]],
        retries: Callable[[], dict[str, int]],
    ) -> None:
        self._cursors = cursors
        self._retries = retries

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "contacts_sync_cursor_lag_seconds",
            "Seconds between now and the company's cursor (how stale the mirror may be).",
            labels=["company"],
        )
        now = time.time()
        for company, cursor in sorted(self._cursors().items()):
            lag.add_metric([company], max(0.0, now - cursor.timestamp()))
        yield lag
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
