"""Company state for monitoring: read from the mirror at scrape time, the same on every replica."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from conftest import engine_for, make_settings, run_pass
from structlog.testing import capture_logs

from sync.engine import BACKFILL
from sync.errors import CompanyLocked, DatabaseError, UpstreamUnavailable
from sync.metrics import Metrics
from sync.sandbox import SandboxServer
from sync.store import Checkpoint, CompanyHealth, MirrorStore

COMPANY = "1"


def scrape(metrics: Metrics) -> dict[tuple[str, str], float]:
    """Every sample of the registry by (name, company label)."""
    return {
        (sample.name, sample.labels.get("company", "")): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


@pytest.fixture
def mirror(db_url: str) -> Iterator[MirrorStore]:
    """The mirror as a replica that runs no pass of its own sees it."""
    store = MirrorStore.open(db_url)
    yield store
    store.close()


def watching(store: MirrorStore, clock: Callable[[], float] = time.time) -> Metrics:
    metrics = Metrics([COMPANY], interval_s=60)
    metrics.track_mirror(store.health, clock=clock)
    return metrics


class TestFreshness:
    def test_time_since_the_last_completed_pass_began_seen_by_another_replica(
        self, sandbox: SandboxServer, db_url: str, mirror: MirrorStore
    ) -> None:
        """Freshness counts from the start of the last completed pass, whichever process ran
        it; the cursor lag of the same quiet list is far larger."""
        settings = make_settings(sandbox, db_url)
        other = watching(mirror, clock=lambda: time.time() + 100)
        assert ("contacts_sync_freshness_seconds", COMPANY) not in scrape(other)
        began = time.time()
        report = run_pass(settings)
        ended = time.time()
        assert report.started_at is not None
        assert began - 0.01 <= report.started_at.timestamp() <= ended
        seen = scrape(watching(mirror, clock=lambda: time.time() + 100))
        freshness = seen["contacts_sync_freshness_seconds", COMPANY]
        assert 100 - 0.01 <= freshness <= 100 + (ended - began) + 1
        # The generated rows were last updated long before this pass: the cursor is old.
        assert seen["contacts_sync_cursor_lag_seconds", COMPANY] > freshness + 30
        assert seen["contacts_sync_last_success_timestamp_seconds", COMPANY] == pytest.approx(
            ended, abs=1
        )
        assert seen["contacts_sync_failures_in_row", COMPANY] == 0
        assert seen["contacts_sync_locked_out_seconds", COMPANY] == 0
        assert seen["contacts_sync_interval_seconds", COMPANY] == 60

    def test_a_resumed_pass_counts_from_the_start_of_the_pass_it_resumes(
        self, sandbox: SandboxServer, sqlite_url: str
    ) -> None:
        """A pass that finishes an interrupted one is as fresh as the interrupted one's start."""
        store = MirrorStore.open(sqlite_url)
        try:
            interrupted = Checkpoint(
                mode=BACKFILL,
                filter_since=None,
                next_offset=0,
                anchors=[],
                high_water=None,
                started_at=_now() - timedelta(hours=2),
                pages=0,
                rows=0,
            )
            store.write_page(COMPANY, [], [], interrupted, _now())
        finally:
            store.close()
        report = run_pass(make_settings(sandbox, sqlite_url))
        assert report.resumed
        assert report.started_at is not None
        assert _now() - report.started_at > timedelta(hours=2)


class TestFailuresAndLockOuts:
    def test_failures_in_a_row_count_failed_passes_until_one_completes(
        self, sandbox: SandboxServer, db_url: str, mirror: MirrorStore
    ) -> None:
        """Each failed pass adds one, a failed reconcile none; a completed pass resets it."""
        settings = make_settings(sandbox, db_url, retry={"max_attempts": 1})
        metrics = watching(mirror)
        sandbox.faults.fail_company(COMPANY, status=503)
        for _ in range(2):
            with pytest.raises(UpstreamUnavailable):
                run_pass(settings)
        with engine_for(settings) as engine, pytest.raises(UpstreamUnavailable):
            engine.reconcile_company(COMPANY)
        assert scrape(metrics)["contacts_sync_failures_in_row", COMPANY] == 2
        sandbox.faults.restore_company(COMPANY)
        run_pass(settings)
        assert scrape(watching(mirror))["contacts_sync_failures_in_row", COMPANY] == 0

    def test_locked_out_since_the_first_pass_that_found_the_lock_taken(
        self, sandbox: SandboxServer, db_url: str, mirror: MirrorStore
    ) -> None:
        """A pass that finds the company locked elsewhere starts the lock-out clock; later
        ones keep its start; the next completed pass stops it."""
        settings = make_settings(sandbox, db_url)
        holder = MirrorStore.open(db_url)
        try:
            with holder.company_lock(COMPANY):
                since = []
                for _ in range(2):
                    with pytest.raises(CompanyLocked):
                        run_pass(settings)
                    since.append(mirror.health([COMPANY])[0].locked_out_since)
        finally:
            holder.close()
        assert since[0] is not None
        assert since[1] == since[0]
        later = since[0].timestamp() + 600
        locked = scrape(watching(mirror, clock=lambda: later))
        assert locked["contacts_sync_locked_out_seconds", COMPANY] == pytest.approx(600)
        run_pass(settings)
        assert scrape(watching(mirror))["contacts_sync_locked_out_seconds", COMPANY] == 0


class TestQuarantineAndCounters:
    def test_quarantined_rows_are_the_mirrors_and_counters_start_at_zero(
        self, sandbox: SandboxServer, db_url: str, mirror: MirrorStore
    ) -> None:
        """The quarantine gauge counts the table's rows (a re-read adds none); every
        per-company counter is served from the start, at 0."""
        metrics = watching(mirror)
        seen = scrape(metrics)
        for counter in (
            "contacts_sync_reconcile_refused_total",
            "contacts_sync_rows_quarantined_total",
            "contacts_sync_rows_upserted_total",
        ):
            assert seen[counter, COMPANY] == 0
        for contact_id in (900_001, 900_002):
            sandbox.data.put_raw(COMPANY, {"id": contact_id, "updated_at": "not a time"})
        settings = make_settings(sandbox, db_url)
        run_pass(settings)
        run_pass(settings)
        assert scrape(watching(mirror))["contacts_sync_quarantined_rows", COMPANY] == 2


class TestMirrorReads:
    def test_one_read_a_second_and_the_last_reading_kept_while_unreadable(
        self, sandbox: SandboxServer, sqlite_url: str
    ) -> None:
        """Scrapes within a second share a read unless a job ran since; while the mirror
        cannot be read the last reading is served with its ages still growing."""
        run_pass(make_settings(sandbox, sqlite_url))
        store = MirrorStore.open(sqlite_url)
        reads: list[Sequence[str]] = []
        broken = [False]

        def read(companies: Sequence[str]) -> list[CompanyHealth]:
            reads.append(companies)
            if broken[0]:
                raise DatabaseError("The mirror database is unreachable; start it.")
            return store.health(companies)

        now = [time.time()]
        metrics = Metrics([COMPANY])
        metrics.track_mirror(read, clock=lambda: now[0])
        try:
            first = scrape(metrics)["contacts_sync_freshness_seconds", COMPANY]
            scrape(metrics)
            assert reads == [(COMPANY,)]
            metrics.count(COMPANY, "sync", "ok")  # a job of this process: read again
            scrape(metrics)
            assert len(reads) == 2
            broken[0] = True
            time.sleep(1)  # one read a second
            now[0] += 3600
            with capture_logs() as logged:
                later = scrape(metrics)
        finally:
            store.close()
        assert len(reads) == 3
        assert [event["event"] for event in logged] == ["metrics.mirror_unreadable"]
        assert later["contacts_sync_freshness_seconds", COMPANY] == pytest.approx(
            first + 3600, abs=1
        )


class TestMigration:
    def test_an_upgraded_mirror_knows_when_its_last_pass_began(self, db_url: str) -> None:
        """Upgrading a 0002 mirror sets each company's last pass start to its last success
        minus the pass's duration."""
        config = Config()
        config.set_main_option("script_location", "sync:migrations")
        config.set_main_option("sqlalchemy.url", db_url)
        command.upgrade(config, "0002")
        finished = datetime(2025, 3, 1, 12, 0, 30, tzinfo=UTC)
        state = sa.table(
            "sync_state",
            sa.column("company_id", sa.Text()),
            sa.column("last_success_at", sa.DateTime(timezone=True)),
            sa.column("last_pass", sa.JSON()),
        )
        engine = sa.create_engine(db_url)
        stored = finished.replace(tzinfo=None) if engine.dialect.name == "sqlite" else finished
        try:
            with engine.begin() as conn:
                conn.execute(
                    state.insert(),
                    [
                        {
                            "company_id": "7",
                            "last_success_at": stored,
                            "last_pass": {"duration_s": 12.5},
                        },
                        {"company_id": "8", "last_success_at": None, "last_pass": None},
                    ],
                )
        finally:
            engine.dispose()
        store = MirrorStore.open(db_url)
        try:
            health = {row.company_id: row for row in store.health(["7", "8"])}
        finally:
            store.close()
        assert health["7"].last_pass_started_at == finished - timedelta(seconds=12.5)
        assert health["7"].failures_in_row == 0
        assert health["8"].last_pass_started_at is None


def _now() -> datetime:
    return datetime.now(UTC)
