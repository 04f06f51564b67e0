"""The offset walk over a list that changes between requests, checked against an in-memory list.

These pin the algorithm itself, fast and exhaustively; the end-to-end tests repeat the
scenarios over HTTP against the sandbox.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from sync.api import Page
from sync.errors import PagingUnstable
from sync.paging import PageStep, WalkStats, walk_pages
from sync.rows import parse_items

LIMIT = 100
BASE = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class LiveList:
    """A server-side list in one of three orders, mutated before every page it serves."""

    order: str
    size: int = 3000
    deletes: int = 0
    updates: int = 0
    inserts: int = 0
    seed: int = 1
    rows: dict[int, datetime] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)
    requests: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.rows = {
            i: BASE + timedelta(seconds=self._random.randint(0, 10**6))
            for i in range(1, self.size + 1)
        }
        self._clock = BASE + timedelta(days=30)
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

    def ordered(self) -> list[tuple[int, datetime]]:
        if self.order == "id":
            return sorted(self.rows.items())
        by_time = sorted(self.rows.items(), key=lambda kv: (kv[1], kv[0]))
        return by_time if self.order == "updated_asc" else by_time[::-1]

    def fetch(self, offset: int) -> Page:
        with self._lock:  # prefetching calls this from several threads, like a real server
            self.requests += 1
            self.mutate()
            window = self.ordered()[offset : offset + LIMIT]
        items = [{"id": i, "updated_at": t.isoformat()} for i, t in window]
        return Page(offset=offset, limit=LIMIT, parsed=parse_items(items), server_time=None)


def _read_all(steps: list[PageStep]) -> set[int]:
    return {row.id for step in steps for row in step.page.parsed.rows}


ORDERS = ["id", "updated_asc", "updated_desc"]


class TestQuietList:
    def test_reads_every_row_once_per_overlap(self) -> None:
        """With nothing changing, every row is read and a page costs one row of overlap."""
        live = LiveList("id")
        steps = list(walk_pages(live.fetch, limit=LIMIT))
        assert _read_all(steps) == set(live.rows)
        assert live.requests == 31  # 3000 rows at 99 new rows a page, then the short page
        assert all(step.aligned for step in steps)
        assert steps[-1].last

    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_empty_list_takes_one_request(self, concurrency: int) -> None:
        """An empty result ends the walk at once."""
        live = LiveList("id", size=0)
        steps = list(walk_pages(live.fetch, limit=LIMIT, concurrency=concurrency))
        assert len(steps) == 1
        assert steps[0].last


class TestChangingList:
    @pytest.mark.parametrize("concurrency", [1, 4])
    @pytest.mark.parametrize("order", ORDERS)
    def test_no_untouched_row_is_lost(self, order: str, concurrency: int) -> None:
        """Rows deleted, updated and inserted between pages never cost an untouched row."""
        live = LiveList(order, deletes=1, updates=1, inserts=1)
        before = set(live.rows)
        steps = list(walk_pages(live.fetch, limit=LIMIT, concurrency=concurrency))
        assert before - live.touched <= _read_all(steps)

    @pytest.mark.parametrize("order", ORDERS)
    def test_survives_heavy_deletion(self, order: str) -> None:
        """Twenty deletions before every page shift rows back far past a one-row overlap."""
        live = LiveList(order, deletes=20)
        before = set(live.rows)
        stats = WalkStats()
        steps = list(walk_pages(live.fetch, limit=LIMIT, stats=stats))
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
            list(walk_pages(live.fetch, limit=LIMIT))


class TestResume:
    @pytest.mark.parametrize("order", ORDERS)
    def test_resumes_from_anchors_after_changes(self, order: str) -> None:
        """A walk resumed from a stored step finds its place again though rows moved meanwhile."""
        live = LiveList(order)
        before = set(live.rows)
        first = []
        for step in walk_pages(live.fetch, limit=LIMIT):
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
                start_offset=resumed_from.next_offset,
                anchors=resumed_from.anchors,
            )
        )
        assert before - live.touched <= _read_all(first) | _read_all(rest)
        assert rest[0].page.offset == resumed_from.next_offset > 0
        assert len(rest) < 31 - 12 + 5  # went on from page 12, with a few realigning pages
