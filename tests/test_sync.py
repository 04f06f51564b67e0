"""The sync engine end to end: real HTTP to the sandbox, real SQLite and PostgreSQL mirrors."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import (
    cursor_of,
    end_lock_sessions,
    engine_for,
    make_settings,
    mirror_rows,
    run_pass,
    stored_pages,
    upstream_rows,
    wait_until,
)

from sync.api import ContactsClient
from sync.engine import PassReport, SyncEngine
from sync.errors import AuthError, DatabaseError, RequestRejected, UpstreamUnavailable
from sync.retry import RetryPolicy
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer
from sync.store import MirrorStore

pytestmark = pytest.mark.usefixtures("walk_concurrency")


class TestFullLoad:
    def test_mirror_equals_upstream_field_for_field(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """A first pass mirrors every row with exactly the upstream values, times in UTC."""
        settings = make_settings(sandbox, db_url)
        report = run_pass(settings)
        assert mirror_rows(db_url) == upstream_rows(sandbox)
        assert report.rows_fetched >= 1200
        assert report.cursor_after is not None

    def test_cursor_is_newest_row_seen(self, sandbox: SandboxServer, db_url: str) -> None:
        """After a complete pass the cursor is the newest updated_at the pass read, when that
        is within the lookback of the pass's start."""
        newest = datetime.now(UTC).replace(microsecond=250000) - timedelta(minutes=2)
        sandbox.data.insert("1", updated_at=newest)
        settings = make_settings(sandbox, db_url)
        run_pass(settings)
        assert cursor_of(settings) == newest

    def test_a_quiet_list_costs_one_request(self, sandbox: SandboxServer, db_url: str) -> None:
        """When the newest row is older than the lookback, the cursor is the pass's start minus
        the lookback: the next pass's window holds no row, and one empty page proves it."""
        settings = make_settings(sandbox, db_url)
        began = datetime.now(UTC).replace(microsecond=0)
        first = run_pass(settings)
        assert first.cursor_after is not None
        assert began - timedelta(seconds=301) <= first.cursor_after <= datetime.now(UTC)
        newest = max(
            datetime.fromisoformat(r["updated_at"]) for r in upstream_rows(sandbox).values()
        )
        assert first.cursor_after > newest + timedelta(hours=1)
        quiet = run_pass(settings)
        assert (quiet.requests, quiet.rows_fetched) == (1, 0)
        sandbox.data.update("1", count=3)
        before = len(sandbox.requests())
        run_pass(settings)
        assert mirror_rows(db_url) == upstream_rows(sandbox)
        # The three rows, and the page that proves the end: nothing fetched ahead of a short page.
        assert len(sandbox.requests()) - before == 2

    def test_a_late_commit_behind_a_quiet_cursor_is_still_read(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """A row committed after a quiet pass with a stamp before that pass's cursor (the
        pass's start minus the lookback) is read by the next pass: its window reaches back
        twice the lookback from that start."""
        settings = make_settings(sandbox, db_url)
        began = datetime.now(UTC)
        first = run_pass(settings)
        assert first.cursor_after is not None
        late = began - timedelta(seconds=450)  # before the cursor, within twice the lookback
        assert late < first.cursor_after
        (row,) = sandbox.data.insert("1", updated_at=late)
        run_pass(settings)
        assert mirror_rows(db_url)[row] == upstream_rows(sandbox)[row]


class TestCursorBound:
    def test_the_server_clock_bounds_the_cursor_when_ours_runs_ahead(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """A row stamped in upstream's future cannot carry the cursor past upstream's Date."""
        sandbox.data.insert("1", updated_at=datetime.now(UTC) + timedelta(days=1))
        settings = make_settings(sandbox, db_url)
        store = MirrorStore.open(db_url)
        client = ContactsClient(settings.api, DEFAULT_TOKEN, RetryPolicy(3, 10))
        ahead = SyncEngine(
            settings, client, store, clock=lambda: datetime.now(UTC) + timedelta(days=2)
        )
        try:
            report = ahead.sync_company("1")
        finally:
            ahead.close()
            store.close()
        assert report.cursor_after is not None
        assert report.cursor_after <= datetime.now(UTC)


class TestIncremental:
    def test_fetches_only_changed_rows(self, sandbox: SandboxServer, db_url: str) -> None:
        """A pass after 150 upstream changes asks for those rows plus at most three pages more:
        two prefetched past the end at most, and the page that proves the end."""
        settings = make_settings(sandbox, db_url)
        run_pass(settings)
        sandbox.data.update("1", count=150)
        sandbox.clear_requests()
        report = run_pass(settings)
        requests = sandbox.requests("1")
        assert len(requests) <= math.ceil(150 / 100) + 3
        assert sum(r.items for r in requests) <= 150 + 200
        assert all(r.params["updated_at"].startswith("gt:") for r in requests)
        assert report.rows_fetched >= 150
        assert mirror_rows(db_url) == upstream_rows(sandbox)

    def test_filter_is_cursor_minus_lookback_floored(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """The next filter is gt: floor-to-second(cursor - lookback), in UTC with Z."""
        settings = make_settings(sandbox, db_url, sync={"lookback_s": 90})
        run_pass(settings)
        cursor = cursor_of(settings)
        sandbox.clear_requests()
        run_pass(settings)
        expected = (cursor - timedelta(seconds=90)).replace(microsecond=0)  # type: ignore[operator]
        sent = sandbox.requests("1")[0].params["updated_at"]
        assert sent == "gt:" + expected.strftime("%Y-%m-%dT%H:%M:%SZ")

    def test_rows_tied_across_a_page_boundary_are_kept(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """150 rows sharing one updated_at, split over two pages, all reach the mirror."""
        settings = make_settings(sandbox, db_url)
        run_pass(settings)
        tied = sandbox.data.update("1", count=150, same_stamp=True)
        run_pass(settings)
        mirrored = mirror_rows(db_url)
        upstream = upstream_rows(sandbox)
        assert all(mirrored[i] == upstream[i] for i in tied)

    def test_rows_committed_late_within_lookback_are_kept(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """A row that appears upstream with an updated_at before the cursor is still read."""
        settings = make_settings(sandbox, db_url, sync={"lookback_s": 120})
        run_pass(settings)
        cursor = cursor_of(settings)
        (late,) = sandbox.data.insert("1", updated_at=cursor - timedelta(seconds=100))  # type: ignore[operator]
        run_pass(settings)
        assert mirror_rows(db_url)[late] == upstream_rows(sandbox)[late]


class TestBackfillSince:
    """`backfill --since TS` after a downtime: rows updated between the cursor and TS exist
    upstream but were not read, so the cursor must not move past them."""

    def test_a_later_since_keeps_the_cursor_and_the_next_pass_reads_the_gap(
        self, db_url: str
    ) -> None:
        """A backfill from yesterday after a week down leaves the cursor where it was, so the
        next incremental pass fetches the rows updated in the gap, and the mirror is exact."""
        now = datetime.now(UTC)
        clock = [now - timedelta(days=7)]
        data = SandboxData.generate(("1",), 300, seed=4, clock=lambda: clock[0])
        with SandboxServer(data) as server:
            settings = make_settings(server, db_url)
            run_pass(settings)
            cursor = cursor_of(settings)
            assert cursor is not None
            clock[0] = now - timedelta(days=3)
            gap = server.data.update("1", range(1, 21))
            clock[0] = now - timedelta(hours=1)
            recent = server.data.update("1", range(21, 41))
            report = run_pass(settings, backfill=True, since=now - timedelta(days=1))
            assert report.cursor_after == cursor
            assert cursor_of(settings) == cursor
            mirrored = mirror_rows(db_url)
            upstream = upstream_rows(server)
            assert all(mirrored[i] == upstream[i] for i in recent)
            assert all(mirrored[i] != upstream[i] for i in gap)
            run_pass(settings)
            assert mirror_rows(db_url) == upstream_rows(server)
            assert cursor_of(settings) > now - timedelta(hours=2)  # type: ignore[operator]

    def test_a_since_before_the_cursor_window_advances_the_cursor(self, db_url: str) -> None:
        """A backfill whose filter covers cursor minus lookback read everything after the
        cursor, so it moves the cursor to the newest row, as an incremental pass would."""
        now = datetime.now(UTC)
        clock = [now - timedelta(days=7)]
        data = SandboxData.generate(("1",), 300, seed=4, clock=lambda: clock[0])
        with SandboxServer(data) as server:
            settings = make_settings(server, db_url)
            run_pass(settings)
            cursor = cursor_of(settings)
            clock[0] = now - timedelta(hours=1)
            (changed,) = server.data.update("1", count=1)
            since = cursor - timedelta(seconds=301)  # type: ignore[operator]
            run_pass(settings, backfill=True, since=since)
            newest = datetime.fromisoformat(upstream_rows(server)[changed]["updated_at"])
            # The server's Date (whole seconds, its frozen clock) bounds the cursor.
            assert cursor_of(settings) == newest.replace(microsecond=0)
            assert mirror_rows(db_url) == upstream_rows(server)

    def test_a_company_without_cursor_gets_one_from_a_backfill_since(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """With no cursor yet there is nothing to leave unread behind it: the cursor is set."""
        settings = make_settings(sandbox, db_url)
        report = run_pass(settings, backfill=True, since=datetime.now(UTC) - timedelta(days=400))
        assert report.cursor_after is not None
        assert cursor_of(settings) == report.cursor_after


class TestFailures:
    def test_failed_pass_keeps_cursor_and_rerun_resumes_exact(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """Upstream dying mid-pass leaves the cursor alone; the next pass resumes and ends exact."""
        settings = make_settings(sandbox, db_url, retry={"max_attempts": 2, "max_elapsed_s": 2})

        class BreakAfterThreePages:
            def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
                pass

            def page_stored(self, company_id: str, pages: int, rows: int) -> None:
                if pages == 3:
                    sandbox.faults.fail_company("1", status=503)

            def pass_finished(self, report: PassReport) -> None:
                pass

        with (
            engine_for(settings, BreakAfterThreePages()) as engine,
            pytest.raises(UpstreamUnavailable),
        ):
            engine.sync_company("1")
        assert cursor_of(settings) is None
        assert 0 < len(mirror_rows(db_url)) < 1200
        sandbox.faults.restore_company("1")
        sandbox.clear_requests()
        report = run_pass(settings)
        assert report.resumed
        assert len(sandbox.requests("1")) < 13  # the rest of the list, and the page ending it
        assert mirror_rows(db_url) == upstream_rows(sandbox)

    @pytest.mark.postgres
    def test_a_pass_that_lost_its_lock_does_not_move_the_cursor(
        self, sandbox: SandboxServer, pg_url: str, pg_admin_dsn: str
    ) -> None:
        """The database ends the session holding the company's lock mid-pass (a restart, a
        killed backend): the pass fails with a database error before moving the cursor, says
        why in status, and the next pass ends exact."""

        class EndTheLockSession:
            def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
                pass

            def page_stored(self, company_id: str, pages: int, rows: int) -> None:
                if pages == 2:
                    end_lock_sessions(pg_admin_dsn, pg_url)

            def pass_finished(self, report: PassReport) -> None:
                pass

        settings = make_settings(sandbox, pg_url)
        with (
            engine_for(settings, EndTheLockSession()) as engine,
            pytest.raises(DatabaseError, match="Lost the lock on company 1"),
        ):
            engine.sync_company("1")
        assert cursor_of(settings) is None
        store = MirrorStore.open(pg_url)
        try:
            assert "Lost the lock" in (store.status(["1"])[0].last_error or "")
        finally:
            store.close()
        run_pass(settings)
        assert cursor_of(settings) is not None
        assert mirror_rows(pg_url) == upstream_rows(sandbox)

    def test_bursts_of_transient_faults_are_survived(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """412, 429, 5xx, resets and malformed bodies, a burst per page, are all retried."""
        bursts = [("412", 2), ("429", 2), ("500", 1), ("502", 1), ("503", 1), ("reset", 2)]
        bursts += [("malformed", 1), ("truncated", 1), ("not_array", 1)]
        sandbox.faults.add("412")

        class BurstPerPage:
            def pass_started(self, company_id: str, mode: str, resumed: bool) -> None:
                pass

            def page_stored(self, company_id: str, pages: int, rows: int) -> None:
                if bursts:
                    kind, times = bursts.pop(0)
                    sandbox.faults.add(kind, times=times)  # type: ignore[arg-type]

            def pass_finished(self, report: PassReport) -> None:
                pass

        settings = make_settings(
            sandbox,
            db_url,
            retry={"max_attempts": 8, "max_elapsed_s": 60},
        )
        with engine_for(settings, BurstPerPage()) as engine:
            report = engine.sync_company("1")
        assert not bursts
        assert mirror_rows(db_url) == upstream_rows(sandbox)
        assert {"412", "429", "5xx", "network", "malformed"} <= set(report.retries)

    def test_exhausted_retries_fail_with_cursor_unchanged(
        self, sandbox: SandboxServer, db_url: str
    ) -> None:
        """When retries run out the pass fails as UpstreamUnavailable and the cursor stays put."""
        settings = make_settings(sandbox, db_url, retry={"max_attempts": 3, "max_elapsed_s": 5})
        run_pass(settings)
        before = cursor_of(settings)
        sandbox.data.update("1", count=10)
        sandbox.faults.fail_company("1", status=503)
        sandbox.clear_requests()
        with pytest.raises(UpstreamUnavailable) as caught:
            run_pass(settings)
        assert caught.value.exit_code == 5
        assert len(sandbox.requests("1")) == 3
        assert cursor_of(settings) == before

    @pytest.mark.parametrize(
        ("config", "token", "error"),
        [
            (SandboxConfig(), "wrong-token", AuthError),
            (
                SandboxConfig(tokens=("no-view-token",), tokens_without_view=("no-view-token",)),
                "no-view-token",
                AuthError,
            ),
        ],
        ids=["401", "403"],
    )
    def test_auth_failures_are_not_retried(
        self, db_url: str, config: SandboxConfig, token: str, error: type[Exception]
    ) -> None:
        """401 and 403 end the pass on the first answer with exit code 3."""
        with SandboxServer(SandboxData.generate(("1",), 50), config) as server:
            settings = make_settings(server, db_url, api={"token": token})
            with pytest.raises(error) as caught:
                run_pass(settings)
            assert len(server.requests()) == 1
        assert caught.value.exit_code == 3  # type: ignore[attr-defined]

    def test_bad_request_is_not_retried(self, sandbox: SandboxServer, db_url: str) -> None:
        """A 400 ends the pass on the first answer with exit code 4."""
        sandbox.faults.fail_company("1", status=400)
        with pytest.raises(RequestRejected) as caught:
            run_pass(make_settings(sandbox, db_url))
        assert len(sandbox.requests("1")) == 1
        assert caught.value.exit_code == 4


class TestChangingUpstream:
    @pytest.mark.parametrize("order", ["id", "updated_asc", "updated_desc"])
    def test_untouched_rows_survive_a_mutating_pass(self, db_url: str, order: str) -> None:
        """Rows changing while a pass pages never cost an untouched row; one more pass is exact."""
        data = SandboxData.generate(("1",), 1500, seed=5)
        with SandboxServer(data, SandboxConfig(order=order)) as server:  # type: ignore[arg-type]
            settings = make_settings(server, db_url)
            mark = data.mark()
            before = upstream_rows(server)
            server.mutate_on_request("1", every=1, updates=1, inserts=1, deletes=1)
            run_pass(settings)
            server.stop_mutating()
            touched = data.touched_since("1", mark)
            mirrored = mirror_rows(db_url)
            for contact_id in set(before) - touched:
                assert mirrored.get(contact_id) == before[contact_id]
            run_pass(settings)
            upstream = upstream_rows(server)
            mirrored = mirror_rows(db_url)
            assert {i: mirrored.get(i) for i in upstream} == upstream

    @pytest.mark.parametrize("order", ["id", "updated_asc"])
    def test_plain_offset_loop_loses_rows_in_the_same_scenario(self, order: str) -> None:
        """`offset += limit` over the same mutating sandbox misses untouched rows."""
        data = SandboxData.generate(("1",), 1500, seed=5)
        with SandboxServer(data, SandboxConfig(order=order)) as server:  # type: ignore[arg-type]
            before = upstream_rows(server)
            mark = data.mark()
            server.mutate_on_request("1", every=1, updates=1, inserts=1, deletes=1)
            seen: set[int] = set()
            with httpx.Client(base_url=server.base_url, headers=server.headers()) as http:
                offset = 0
                while True:
                    page = http.get("/api/contacts", params={"limit": 100, "offset": offset})
                    items = page.json()
                    seen |= {item["id"] for item in items}
                    if len(items) < 100:
                        break
                    offset += 100
            untouched = set(before) - data.touched_since("1", mark)
            assert untouched - seen


class TestGroupedCommits:
    def test_pages_that_arrive_while_storing_share_a_commit(
        self, sandbox: SandboxServer, db_url: str, walk_concurrency: int
    ) -> None:
        """Prefetched pages are committed in groups; one at a time, each page is its own."""
        settings = make_settings(sandbox, db_url)
        report = run_pass(settings, backfill=True)
        assert mirror_rows(db_url) == upstream_rows(sandbox)
        if walk_concurrency == 1:
            assert report.commits == report.pages
        else:
            assert 1 <= report.commits < report.pages

    def test_while_upstream_stalls_every_fetched_page_is_committed(self, db_url: str) -> None:
        """No transaction waits on upstream: stored pages are visible and whole, the database
        free for other writers, and the pass completes once upstream answers again."""
        data = SandboxData.generate(("1",), 2000, seed=5)
        with SandboxServer(data, SandboxConfig(latency_ms=40)) as server:
            settings = make_settings(
                server, db_url, api={"concurrency": 4, "page_size": 50, "timeout_s": 30}
            )
            reports: list[PassReport] = []
            worker = threading.Thread(target=lambda: reports.append(run_pass(settings)))
            worker.start()
            try:
                wait_until(lambda: stored_pages(db_url) >= 3, 30, "three pages stored")
                server.faults.add("stall", times=100, seconds=3)
                time.sleep(0.6)  # pages in flight land; the walk now waits on the stall
                pages = stored_pages(db_url)
                # Whole pages only, with their checkpoint: 50 rows, then 49 new per page.
                assert len(mirror_rows(db_url)) == 50 + 49 * (pages - 1)
                if db_url.startswith("sqlite"):
                    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0)
                    try:
                        other.execute("BEGIN IMMEDIATE")  # fails at once if a writer held on
                        other.execute("ROLLBACK")
                    finally:
                        other.close()
            finally:
                server.faults.clear()
                worker.join(60)
            assert reports
            assert reports[0].cursor_after is not None
            assert mirror_rows(db_url) == upstream_rows(server)
