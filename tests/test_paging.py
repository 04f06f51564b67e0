"""The offset walk over a list that changes between requests, checked against an in-memory list.

These pin the algorithm itself, fast and exhaustively; the end-to-end tests repeat the
scenarios over HTTP against the sandbox.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import wait_until

from sync.api import Page
from sync.errors import (
    OffsetLimitReached,
    PagingUnstable,
    RequestRejected,
    UnstableOrder,
    ValidationFailure,
)
from sync.paging import Bound, PageStep, WalkStats, walk_pages
from sync.rows import RowKey, parse_items

LIMIT = 100
BASE = datetime(2025, 1, 1, tzinfo=UTC)
BEGAN = BASE + timedelta(days=30)
"""When every walk here begins: LiveList stamps every change later."""


@dataclass
class LiveList:
    """A server-side list in one of three orders, mutated before every page it serves.

    Like real servers it can cap its pages (`cap`), refuse or clamp offsets past `max_offset`,
    and order rows that share one updated_at (`ties`) stably by id, by a hash of
    offset+limit (a database's top-N sort), or afresh on every request.
    """

    order: str
    size: int = 3000
    deletes: int = 0
    updates: int = 0
    inserts: int = 0
    seed: int = 1
    cap: int | None = None
    max_offset: int | None = None
    clamp: bool = False
    ties: str = "stable"
    tie_groups: tuple[int, ...] = ()
    """Sizes of groups of rows given one shared updated_at."""
    rows: dict[int, datetime] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)
    requests: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.rows = {
            i: BASE + timedelta(seconds=self._random.randint(0, 10**6), milliseconds=i % 1000)
            for i in range(1, self.size + 1)
        }
        ids = list(self.rows)
        self._random.shuffle(ids)
        for group in self.tie_groups:
            members, ids = ids[:group], ids[group:]
            stamp = self.rows[members[0]]
            for member in members:
                self.rows[member] = stamp
        self._clock = BEGAN
        self._next_id = self.size + 1
        self._lock = threading.Lock()

    def _tick(self) -> datetime:
        self._clock += timedelta(milliseconds=1)
        return self._clock

    def mutate(self) -> None:
        for _ in range(self.deletes):
            victim = self._random.choice(sorted(self.rows))
            del self.rows[victim]
            self.touched.add(victim)
        for _ in range(self.updates):
            changed = self._random.choice(sorted(self.rows))
            self.rows[changed] = self._tick()
            self.touched.add(changed)
        for _ in range(self.inserts):
            self.rows[self._next_id] = self._tick()
            self.touched.add(self._next_id)
            self._next_id += 1

    def ordered(self, bound: Bound | None = None, salt: int = 0) -> list[tuple[int, datetime]]:
        rows = list(self.rows.items())
        if bound is not None:
            op, at = bound
            rows = [(i, t) for i, t in rows if (t > at if op == "gt" else t < at)]
        if self.order == "id":
            return sorted(rows)
        if self.order == "bucket":  # a sort key many rows share, in no stable order within it
            shuffle = random.Random(self._random.random())
            return sorted(rows, key=lambda kv: (kv[0] % 7, shuffle.random()))
        if self.ties == "stable":
            tiebreak: Callable[[int], float] = float
        elif self.ties == "per_page":
            tiebreak = lambda i: random.Random(i * 7919 + salt).random()  # noqa: E731
        else:
            shuffle = random.Random(self._random.random())
            tiebreak = lambda i: shuffle.random()  # noqa: E731
        by_time = sorted(rows, key=lambda kv: (kv[1], tiebreak(kv[0])))
        if self.order == "updated_asc":
            return by_time
        return sorted(rows, key=lambda kv: (-kv[1].timestamp(), tiebreak(kv[0])))

    def fetch(self, offset: int, limit: int = LIMIT, bound: Bound | None = None) -> Page:
        with self._lock:  # prefetching calls this from several threads, like a real server
            self.requests += 1
            self.mutate()
            if self.max_offset is not None and offset > self.max_offset:
                if not self.clamp:
                    failure = ValidationFailure("offset", f"must be at most {self.max_offset}")
                    raise RequestRejected.invalid_data([failure])
                offset = self.max_offset
            served = min(limit, self.cap or limit)
            window = self.ordered(bound, offset + limit)[offset : offset + served]
        items = [{"id": i, "updated_at": t.isoformat()} for i, t in window]
        return Page(offset=offset, limit=limit, parsed=parse_items(items))


def _read_all(steps: list[PageStep]) -> set[int]:
    return {row.id for step in steps for row in step.page.parsed.rows}


ORDERS = ["id", "updated_asc", "updated_desc"]


class TestQuietList:
    def test_reads_every_row_once_per_overlap(self) -> None:
        """With nothing changing, every row is read and a page costs one row of overlap."""
        live = LiveList("id")
        steps = list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN))
        assert _read_all(steps) == set(live.rows)
        # 3000 rows at 99 new rows a page, the short page, then the page that proves the end:
        # only a page that brings nothing new does (a short one may be a cap or a trim).
        assert live.requests == 32
        assert all(step.aligned for step in steps)
        assert steps[-1].last

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_empty_list_takes_one_request(self, concurrency: int) -> None:
        """An empty result ends the walk at once."""
        live = LiveList("id", size=0)
        steps = list(
            walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency)
        )
        assert len(steps) == 1
        assert steps[0].last


class TestChangingList:
    @pytest.mark.parametrize("concurrency", [1, 4])
    @pytest.mark.parametrize("order", ORDERS)
    def test_no_untouched_row_is_lost(self, order: str, concurrency: int) -> None:
        """Rows deleted, updated and inserted between pages never cost an untouched row."""
        live = LiveList(order, deletes=1, updates=1, inserts=1)
        before = set(live.rows)
        steps = list(
            walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency)
        )
        assert before - live.touched <= _read_all(steps)

    @pytest.mark.parametrize("order", ORDERS)
    def test_survives_heavy_deletion(self, order: str) -> None:
        """Twenty deletions before every page shift rows back far past a one-row overlap."""
        live = LiveList(order, deletes=20)
        before = set(live.rows)
        stats = WalkStats()
        steps = list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN, stats=stats))
        assert before - live.touched <= _read_all(steps)
        assert stats.realignments + stats.shifts_absorbed > 0

    @pytest.mark.parametrize("order", ["id", "updated_asc"])
    def test_plain_offset_loop_loses_rows(self, order: str) -> None:
        """The same changes defeat `offset += limit`: the protection above is what saves rows."""
        live = LiveList(order, deletes=1, updates=1, inserts=1)
        before = set(live.rows)
        seen: set[int] = set()
        offset = 0
        while True:
            page = live.fetch(offset)
            seen |= {row.id for row in page.parsed.rows}
            if page.size < LIMIT:
                break
            offset += LIMIT
        assert before - live.touched - seen

    def test_gives_up_when_every_row_keeps_changing(self) -> None:
        """A list rewritten between every two pages cannot be walked: the walk says so."""
        live = LiveList("updated_asc", size=2000, updates=2000)
        with pytest.raises(PagingUnstable):
            list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN))


class TestResume:
    @pytest.mark.parametrize("order", ORDERS)
    def test_resumes_from_anchors_after_changes(self, order: str) -> None:
        """A walk resumed from a stored step finds its place again though rows moved meanwhile."""
        live = LiveList(order)
        before = set(live.rows)
        first = []
        for step in walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN):
            first.append(step)
            if len(first) == 12:
                break
        live.deletes, live.updates, live.inserts = 30, 5, 5
        live.mutate()
        live.deletes = live.updates = live.inserts = 0
        resumed_from = first[-1]
        rest = list(
            walk_pages(
                live.fetch,
                limit=LIMIT,
                fresh_after=BEGAN,
                start_offset=resumed_from.next_offset,
                anchors=resumed_from.anchors,
            )
        )
        assert before - live.touched <= _read_all(first) | _read_all(rest)
        assert rest[0].page.offset == resumed_from.next_offset > 0
        assert len(rest) < 31 - 12 + 5  # went on from page 12, with a few realigning pages


class InFlight:
    """Wraps a fetch: optional latency, and how many fetches run at once (at each start, at most).

    `phase` is set by the test's consumer (the number of steps it has received), so that a
    fetch's concurrency can be attributed to the moment of the walk when it started.
    """

    def __init__(self, fetch: Callable[..., Page], delay: float = 0.0) -> None:
        self._fetch = fetch
        self._delay = delay
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.phase = 0
        self.starts: list[tuple[int, int]] = []
        """(phase, fetches running including this one) for every fetch, in start order."""

    def __call__(self, offset: int, limit: int = LIMIT, bound: Bound | None = None) -> Page:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.starts.append((self.phase, self.running))
        try:
            if self._delay:
                time.sleep(self._delay)
            return self._fetch(offset, limit, bound)
        finally:
            with self._lock:
                self.running -= 1

    def peak_between(self, first_phase: int, stop_phase: int) -> int:
        """The most fetches running at the start of one that began in [first, stop) phases."""
        return max(
            (running for phase, running in self.starts if first_phase <= phase < stop_phase),
            default=0,
        )


def _walk(fetch: InFlight, **kwargs: Any) -> tuple[list[PageStep], list[int]]:
    """Consume a walk at once, moving `fetch.phase` along; the steps and `window` after each."""
    stats: WalkStats = kwargs.setdefault("stats", WalkStats())
    steps: list[PageStep] = []
    windows: list[int] = []
    for step in walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN, **kwargs):
        steps.append(step)
        windows.append(stats.window)
        fetch.phase = len(steps)
    return steps, windows


class TestPrefetchWindow:
    @pytest.mark.parametrize("changing", [False, True], ids=["quiet", "changing"])
    @pytest.mark.parametrize("concurrency", [1, 2, 4, 8])
    def test_fetches_in_flight_never_exceed_concurrency(
        self, concurrency: int, changing: bool
    ) -> None:
        """At most `concurrency` fetches run at once (1: never overlapping), discards included."""
        live = LiveList("id", size=1500, deletes=5 if changing else 0)
        before = set(live.rows)
        fetch = InFlight(live.fetch, delay=0.005)
        steps, _ = _walk(fetch, concurrency=concurrency)
        assert before - live.touched <= _read_all(steps)
        assert fetch.peak <= concurrency
        if concurrency == 1:
            assert fetch.peak == 1
        elif not changing:
            assert fetch.peak >= 2  # slow fetches, instant consumer: the bound is what held

    def test_window_grows_when_fetching_is_slower_than_storing(self) -> None:
        """Slow fetches and an instant consumer: several fetches run at once, the window > 1."""
        live = LiveList("id", size=1500)
        fetch = InFlight(live.fetch, delay=0.02)
        stats = WalkStats()
        steps, windows = _walk(fetch, concurrency=8, stats=stats)
        assert _read_all(steps) == set(live.rows)
        assert fetch.peak > 2
        assert windows[-3] > 2  # through the last full page; the short one then fetches alone
        assert windows[-2] == 0
        assert max(windows) >= 4

    def test_window_stays_small_when_storing_is_slower_than_fetching(self) -> None:
        """Instant fetches and a slow consumer: the window stays near 1, far below concurrency."""
        live = LiveList("id", size=1000)
        fetch = InFlight(live.fetch)
        stats = WalkStats()
        windows = []
        for step in walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=8, stats=stats):
            windows.append(stats.window)
            if not step.last:
                time.sleep(0.02)
        assert len(windows) == 12  # ten full pages, the short one, the one proving the end
        assert max(windows) <= 3
        assert fetch.peak <= 3
        wait_until(lambda: live.requests == stats.requests + stats.discarded, 2)
        assert stats.discarded <= 2


class TestThrottling:
    def test_429s_shrink_the_window_then_a_quiet_spell_grows_it_back(self) -> None:
        """429s counted while pages are fetched halve the window; quiet pages raise it again."""
        live = LiveList("id", size=5000)
        storm = {99 * page for page in range(14, 22)}  # these pages are rate-limited once each
        lock = threading.Lock()
        rate_limited = 0

        def fetch_page(offset: int, limit: int = LIMIT, bound: Bound | None = None) -> Page:
            nonlocal rate_limited
            if offset in storm:
                with lock:
                    rate_limited += 1
            return live.fetch(offset, limit, bound)

        fetch = InFlight(fetch_page, delay=0.02)
        stats = WalkStats()
        steps: list[PageStep] = []
        windows: list[int] = []
        throttles: list[int] = []  # stats.throttled after each step
        walk = walk_pages(
            fetch,
            limit=LIMIT,
            fresh_after=BEGAN,
            concurrency=8,
            stats=stats,
            throttled=lambda: rate_limited,
        )
        for step in walk:
            steps.append(step)
            windows.append(stats.window)
            throttles.append(stats.throttled)
            fetch.phase = len(steps)
        assert _read_all(steps) == set(live.rows)
        assert rate_limited == len(storm)
        assert 0 < stats.throttled <= len(storm)
        first = next(i for i, count in enumerate(throttles) if count)  # first halving
        last = throttles.index(stats.throttled)  # last halving
        throttled_window = windows[last]
        # Before: slow fetches and an instant consumer filled the window.
        assert max(windows[:first]) >= 4
        peak_before = fetch.peak_between(0, first)
        assert peak_before >= 4
        assert throttled_window <= max(windows[:first]) // 2
        # Once the fetches prefetched before the last 429 are drained (at most 8 pages),
        # fewer run at once: the window, plus the page being handed over that may still be
        # arriving, plus one as the ceiling rises by one per 8 quiet pages at most.
        assert max(windows[last : last + 8]) == throttled_window
        peak_after = fetch.peak_between(last + 9, last + 16)
        assert 0 < peak_after <= throttled_window + 2
        assert peak_after < peak_before
        # A long quiet spell lets the window grow back.
        assert len(windows) > last + 17
        assert max(windows[last + 16 :]) > throttled_window

    def test_no_throttling_without_429s(self) -> None:
        """A `throttled` counter that never grows leaves the window to the latency alone."""
        live = LiveList("id", size=1500)
        fetch = InFlight(live.fetch, delay=0.02)
        stats = WalkStats()
        steps, windows = _walk(fetch, concurrency=8, stats=stats, throttled=lambda: 3)
        assert _read_all(steps) == set(live.rows)
        assert stats.throttled == 0
        assert max(windows) >= 4


def _static_list(size: int, broken: set[int]) -> tuple[Callable[..., Page], set[int]]:
    """A list that never changes, whose items at `broken` positions cannot be parsed."""
    items = [
        {
            "id": i + 1,
            "updated_at": "not a time" if i in broken else (BASE + timedelta(i)).isoformat(),
        }
        for i in range(size)
    ]

    def fetch(offset: int, limit: int = LIMIT, bound: Bound | None = None) -> Page:
        window = items[offset : offset + limit]
        return Page(offset=offset, limit=LIMIT, parsed=parse_items(window))

    return fetch, {i + 1 for i in range(size) if i not in broken}


def _valid_ids(steps: list[PageStep]) -> set[int]:
    return {key[0] for step in steps for key in step.page.parsed.keys if key is not None}


# Scattered broken items, a run of 30 (a page ends in it), and one longer than a page.
BROKEN = (
    set(random.Random(7).sample(range(2000), 150)) | set(range(400, 430)) | set(range(900, 1050))
)


def _edit(live: LiveList, keys: list[RowKey]) -> None:
    """Update these rows upstream, as an edit between a kill and the resumed walk would."""
    for contact_id, _ in keys:
        live.rows[contact_id] += timedelta(seconds=1)
        live.touched.add(contact_id)


def _resume(
    live: LiveList, checkpoint: PageStep, concurrency: int, stats: WalkStats
) -> list[PageStep]:
    """The rest of a walk resumed from a step, as from a stored checkpoint."""
    return list(
        walk_pages(
            live.fetch,
            limit=LIMIT,
            fresh_after=BEGAN,
            concurrency=concurrency,
            start_offset=checkpoint.next_offset,
            anchors=checkpoint.anchors,
            stats=stats,
        )
    )


class TestAnchors:
    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_anchors_are_the_last_valid_keys_read(self, concurrency: int) -> None:
        """A step's anchors are the last valid keys of the last page that had any, in order, at
        most 16 of them, and its next offset is no later than the last of them."""
        fetch, valid = _static_list(2000, BROKEN)
        steps = list(walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency))
        assert _valid_ids(steps) == valid
        assert all(step.aligned for step in steps)
        anchors: list[RowKey] = []
        for step in steps:
            keys = step.page.parsed.keys
            valid_keys = [key for key in keys if key is not None]
            if valid_keys:
                anchors = valid_keys[-16:]
                last_valid = max(i for i, key in enumerate(keys) if key is not None)
                assert step.next_offset <= step.page.offset + last_valid
            assert step.anchors == anchors
        # The list holds every case: a broken tail, a page with no valid row at all.
        assert any(s.page.parsed.keys[-1] is None for s in steps)
        assert any(all(key is None for key in s.page.parsed.keys) for s in steps)

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_resuming_from_any_step_reads_every_remaining_row(self, concurrency: int) -> None:
        """A walk resumed from any step's `next_offset` and `anchors` reads the rest of the list."""
        fetch, valid = _static_list(2000, BROKEN)
        steps = list(walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN))
        for done, step in enumerate(steps[:-1], start=1):
            rest = list(
                walk_pages(
                    fetch,
                    limit=LIMIT,
                    fresh_after=BEGAN,
                    concurrency=concurrency,
                    start_offset=step.next_offset,
                    anchors=step.anchors,
                )
            )
            assert _valid_ids(steps[:done]) | _valid_ids(rest) == valid
            assert rest[0].page.offset == step.next_offset
            assert all(s.aligned for s in rest)  # nothing moved: it found its place at once
            assert min(s.page.offset for s in rest) == step.next_offset  # never went back

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_resume_finds_its_place_when_its_last_anchors_changed(self, concurrency: int) -> None:
        """With 15 of the 16 anchor rows updated meanwhile, the one left still places the walk."""
        live = LiveList("id")
        first = list(itertools.islice(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN), 20))
        checkpoint = first[-1]
        assert len(checkpoint.anchors) == 16
        _edit(live, checkpoint.anchors[1:])
        stats = WalkStats()
        rest = _resume(live, checkpoint, concurrency, stats)
        assert set(live.rows) == _read_all(first) | _read_all(rest)
        assert stats.realignments == 1  # one step back reaches the unchanged anchor

    def test_a_page_ending_in_broken_items_is_no_shift(self) -> None:
        """On a list that never moves, a broken tail widens no overlap and costs no request."""
        fetch, valid = _static_list(1000, set(range(90, 100)))  # page 1 ends in 10 broken items
        stats = WalkStats()
        steps = list(walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN, stats=stats))
        assert _valid_ids(steps) == valid
        assert stats.shifts_absorbed == 0
        assert stats.overlap == 1
        assert [step.page.offset for step in steps][:3] == [0, 99, 198]  # broken items anchor

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_resume_steps_back_to_the_start_when_every_anchor_changed(
        self, concurrency: int
    ) -> None:
        """A checkpoint far into the list whose 16 anchor rows all changed still resumes."""
        live = LiveList("id")
        first = list(itertools.islice(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN), 20))
        checkpoint = first[-1]
        _edit(live, checkpoint.anchors)  # a bulk edit of 16 neighbouring contacts
        rest = _resume(live, checkpoint, concurrency, WalkStats())
        assert set(live.rows) - live.touched <= _read_all(first) | _read_all(rest)


class BurstList(LiveList):
    """A LiveList that, when asked, deletes its first `burst` rows before serving a page."""

    burst = 0

    def mutate(self) -> None:
        super().mutate()
        if self.burst:
            for contact_id, _ in self.ordered()[: self.burst]:
                del self.rows[contact_id]
                self.touched.add(contact_id)
            self.burst = 0


class TestMisalignedPrefetch:
    @pytest.mark.parametrize("concurrency", [4, 8])
    def test_misaligned_page_discards_the_prefetched_ones(self, concurrency: int) -> None:
        """A shift past the overlap discards running prefetches; the walk steps back, loses none."""
        live = BurstList("id", size=2000)
        before = set(live.rows)
        fetch = InFlight(live.fetch, delay=0.005)
        stats = WalkStats()
        steps = []
        for step in walk_pages(
            fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency, stats=stats
        ):
            steps.append(step)
            if len(steps) == 6:
                live.burst = 150  # rows move back by a page and a half under the walk
        assert before - live.touched <= _read_all(steps)
        assert stats.realignments >= 1
        assert stats.discarded >= 1
        # Every fetch started was either handed over or counted as discarded.
        wait_until(lambda: live.requests == stats.requests + stats.discarded, 2)
        assert fetch.peak <= concurrency
        for step, after in itertools.pairwise(steps):
            if not step.aligned:  # the prefetched pages past it never reach the consumer
                assert after.page.offset == max(0, step.page.offset - (LIMIT - 1))

    @pytest.mark.parametrize("concurrency", [4, 8])
    @pytest.mark.parametrize("order", ORDERS)
    def test_survives_heavy_deletion_with_prefetching(self, order: str, concurrency: int) -> None:
        """Twenty deletions per request and discarded prefetches never cost an untouched row."""
        live = LiveList(order, size=2000, deletes=20)
        before = set(live.rows)
        stats = WalkStats()
        steps = list(
            walk_pages(
                live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency, stats=stats
            )
        )
        assert before - live.touched <= _read_all(steps)
        assert stats.realignments + stats.shifts_absorbed > 0
        wait_until(lambda: live.requests == stats.requests + stats.discarded, 2)


class TestShortPages:
    @pytest.mark.parametrize("concurrency", [1, 4])
    @pytest.mark.parametrize("order", ORDERS)
    def test_a_capped_server_loses_no_row(self, order: str, concurrency: int) -> None:
        """A server serving 40 rows whatever `limit` asks, changing as it serves: no loss."""
        live = LiveList(order, cap=40, deletes=1, updates=1, inserts=1)
        before = set(live.rows)
        steps = list(
            walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency)
        )
        assert before - live.touched <= _read_all(steps)

    def test_a_quiet_capped_list_costs_a_request_per_cap(self) -> None:
        """39 new rows a page, and the page that proves the end: the cost README states."""
        live = LiveList("id", cap=40)
        steps = list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN))
        assert _read_all(steps) == set(live.rows)
        assert live.requests == math.ceil(3000 / 39) + 1

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_a_trimmed_page_is_not_the_end(self, concurrency: int) -> None:
        """Every third page served with only 30 of its rows: each is read past, none ends it."""
        live = LiveList("id")
        served = 0

        def trimming(offset: int, limit: int = LIMIT, bound: Bound | None = None) -> Page:
            nonlocal served
            served += 1
            return live.fetch(offset, 30 if served % 3 == 0 else limit, bound)

        steps = list(walk_pages(trimming, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency))
        assert _read_all(steps) == set(live.rows)


class TestOffsetLimits:
    @pytest.mark.parametrize("concurrency", [1, 4])
    @pytest.mark.parametrize("clamp", [False, True], ids=["refused", "clamped"])
    def test_a_walk_past_the_offset_limit_fails_naming_it(
        self, clamp: bool, concurrency: int
    ) -> None:
        """A server that will not page past offset 1000 fails the walk within a few requests."""
        live = LiveList("id", max_offset=1000, clamp=clamp)
        with pytest.raises(OffsetLimitReached) as caught:
            list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency))
        assert "offset" in caught.value.message
        assert caught.value.exit_code == 4
        assert live.requests <= math.ceil(1000 / 99) + 4 + concurrency


class TestTies:
    @pytest.mark.parametrize("concurrency", [1, 4])
    @pytest.mark.parametrize("ties", ["per_page", "per_request", "stable"])
    @pytest.mark.parametrize("order", ["updated_asc", "updated_desc"])
    def test_tie_groups_are_read_whole(self, order: str, ties: str, concurrency: int) -> None:
        """Groups of 700 and 150 rows sharing a stamp, and eighty of 2 to 5, in any tie order:
        every row (small groups straddle page boundaries too, at any point of their order)."""
        live = LiveList(order, ties=ties, tie_groups=(700, 150, *(2, 3, 4, 5) * 20))
        stats = WalkStats()
        steps = list(
            walk_pages(
                live.fetch, limit=LIMIT, fresh_after=BEGAN, concurrency=concurrency, stats=stats
            )
        )
        assert _read_all(steps) == set(live.rows)
        assert stats.tie_groups >= 2  # the two groups larger than a page always straddle one

    @pytest.mark.parametrize("ties", ["stable", "per_page", "per_request"])
    @pytest.mark.parametrize("order", ["updated_asc", "updated_desc"])
    def test_tie_groups_changing_as_they_are_read(self, order: str, ties: str) -> None:
        """Rows deleted, updated and inserted before every request, members of a 400-row tie
        group among them: every untouched row is read, or, where the group is shuffled
        between requests while members keep leaving it, the walk fails loudly; never a loss."""
        live = LiveList(order, ties=ties, tie_groups=(400,), deletes=1, updates=1, inserts=1)
        before = set(live.rows)
        try:
            steps = list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN))
        except UnstableOrder:
            assert ties != "stable"  # a member left a shuffled group before it was seen
            return
        assert before - live.touched <= _read_all(steps)

    @pytest.mark.parametrize("ties", ["per_page", "per_request"])
    def test_a_walk_killed_while_reading_a_group_resumes_exact(self, ties: str) -> None:
        """Pages read for a tie group carry the checkpoint from before it: a walk stopped
        halfway through the group and resumed from the last step reads every row."""
        live = LiveList("updated_asc", ties=ties, tie_groups=(700,))
        first: list[PageStep] = []
        for step in walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN):
            first.append(step)
            if sum(s.aside for s in first) == 3:
                break
        stopped = first[-1]
        assert stopped.aside
        before = next(step for step in reversed(first) if step.aligned)
        assert (stopped.next_offset, stopped.anchors) == (before.next_offset, before.anchors)
        rest = list(
            walk_pages(
                live.fetch,
                limit=LIMIT,
                fresh_after=BEGAN,
                start_offset=stopped.next_offset,
                anchors=stopped.anchors,
            )
        )
        assert _read_all(first) | _read_all(rest) == set(live.rows)
        assert any(step.aside for step in rest)  # the group was read again, whole

    @pytest.mark.parametrize("ties", ["per_page", "per_request"])
    def test_a_plain_walk_loses_tie_members(self, ties: str) -> None:
        """`offset += limit` over the same server misses members: the case above is real."""
        live = LiveList("updated_asc", ties=ties, tie_groups=(700,))
        seen = {
            row.id for offset in range(0, 3000, LIMIT) for row in live.fetch(offset).parsed.rows
        }
        assert set(live.rows) - seen

    def test_an_unstable_order_by_another_key_fails_loudly(self) -> None:
        """A server sorting by a key many rows share, in no stable order: no silent loss."""
        live = LiveList("bucket")
        with pytest.raises(PagingUnstable):
            list(walk_pages(live.fetch, limit=LIMIT, fresh_after=BEGAN))


class TestNoLoop:
    def test_a_run_of_broken_items_longer_than_a_page_is_walked_past(self) -> None:
        """200 unparseable items in a row: they anchor pages by their content, so the shift
        check stays on and the walk goes on past them."""
        fetch, valid = _static_list(2000, set(range(500, 700)))
        stats = WalkStats()
        steps = list(walk_pages(fetch, limit=LIMIT, fresh_after=BEGAN, stats=stats))
        assert _valid_ids(steps) == valid
        assert all(step.aligned for step in steps)
        assert stats.realignments == 0

    def test_a_page_size_of_one_is_refused(self) -> None:
        """With one row a page the overlap leaves nothing new to read: no walk starts."""
        live = LiveList("id")
        with pytest.raises(ValueError, match="limit"):
            list(walk_pages(live.fetch, limit=1, fresh_after=BEGAN))
        assert live.requests == 0

    def test_finishing_does_not_wait_for_fetches_past_the_end(self) -> None:
        """Prefetched requests past the last page that never answer do not hold the walk."""
        live = LiveList("id", size=250)
        release = threading.Event()

        def hanging_past_the_end(
            offset: int, limit: int = LIMIT, bound: Bound | None = None
        ) -> Page:
            if offset >= 300:
                release.wait(20)
            return live.fetch(offset, limit, bound)

        started = time.monotonic()
        steps = list(
            walk_pages(hanging_past_the_end, limit=LIMIT, fresh_after=BEGAN, concurrency=4)
        )
        elapsed = time.monotonic() - started
        release.set()
        assert _read_all(steps) == set(live.rows)
        assert elapsed < 5
