"""Walking offsets over a live, unordered list without losing rows, or failing loudly.

Each page is requested so that it overlaps the previous one, and is accepted only once it is
*aligned*: it contains an item already read, unchanged (the same id and updated_at, or for an
item that cannot be parsed the same JSON). On a server whose order is stable between requests,
unchanged rows keep their relative order whatever it orders by, so every unread unchanged row
lies after that anchor. When no anchor is found, rows shifted backwards by more than the
overlap: the walk steps back a page and looks again; the overlap widens after a shift and
narrows again while nothing moves, so a quiet list costs one row per page.

What a real server may do besides, and what the walk does about it:

- pages shorter than `limit` (a cap of the server's own, a page trimmed after filtering) are
  no end: the walk goes on from the last item served, and only an answer that brings nothing
  new (nothing but rows updated after the walk began) and no more than the overlap, or
  less than the pages this server has served, ends it: one request more than a walk that
  trusts a short page;
- a server that refuses offsets past some limit (400 naming `offset`) or serves earlier rows
  again for them stops the walk with OffsetLimitReached: three pages in a row that bring
  nothing new are a walk that makes no progress;
- rows read before that come back in another relative order are an order that is not stable
  between requests: where the order is by `updated_at` that is rows sharing one stamp, read
  exactly by `sync.ties`; anywhere else the walk fails with UnstableOrder;
- no walk loops: every page either brings new rows, or is one of at most two in a row that
  do not, or is a step back within a budget, so a walk makes at most three requests per page
  that brought rows, plus that budget, plus a bounded number per tie group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import takewhile
from time import perf_counter
from typing import Protocol

from sync.api import Page
from sync.errors import OffsetLimitReached, PagingUnstable, RequestRejected, UnstableOrder
from sync.prefetch import Prefetcher, Window
from sync.rows import RowKey
from sync.ties import (
    Bound,
    GroupEnd,
    OrderEvidence,
    find_group_end,
    group_bound,
    group_end_in,
    read_tie_group,
)

__all__ = ["Bound", "Fetch", "PageStep", "WalkStats", "walk_pages"]

_QUIET_PAGES_BEFORE_NARROWING = 5
_RESUME_ANCHORS = 16
"""Keys a checkpoint keeps: the page's last rows, where a resumed walk overlaps it. More only
cost time on every commit (they are saved with it); if all of them changed meanwhile, the
resumed walk steps back until it finds its place, as after any shift it cannot absorb."""
_STALLED_PAGES = 3
"""Pages in a row that bring nothing new before the walk calls it no progress."""


class Fetch(Protocol):
    """One page of the walked list; `bound` replaces its `updated_at` filter for one request."""

    def __call__(self, offset: int, limit: int, bound: Bound | None = None, /) -> Page: ...


@dataclass(frozen=True, slots=True)
class PageStep:
    """A fetched page, and where a resumed walk would go on from (after storing it)."""

    page: Page
    aligned: bool
    next_offset: int
    anchors: list[RowKey]
    last: bool
    next_ready: Callable[[float], bool]
    """Whether the following page arrives within the given seconds (0: has it arrived)."""
    aside: bool = False
    """Read on a tie group's list of its own: the walk's filter did not apply to it."""


@dataclass
class WalkStats:
    requests: int = 0
    realignments: int = 0
    discarded: int = 0
    shifts_absorbed: int = 0
    throttled: int = 0
    """Times the window was halved because the server rate-limited a request."""
    window: int = 1
    overlap: int = 1
    tie_groups: int = 0
    """Groups of rows sharing one updated_at read on a list of their own."""
    tie_requests: int = 0


@dataclass(frozen=True, slots=True)
class _Scan:
    """What one page holds relative to the page read before it."""

    anchor: int | None
    """The last position holding an item read before, unchanged."""
    anchor_was: int | None
    """Where that item stood in the page read before."""
    unseen: int
    """Items not read before: new rows, or rows changed since."""
    unseen_old: int
    """Of those, the ones not updated after the walk began: rows the walk must read."""
    tied_on: int
    """Rows sharing the stamp of the last row read before that are new, or stand past where
    the page read before ended: the tie group goes on past that boundary, in some order."""
    reordered: bool
    """Two unchanged rows with different stamps came back in the other order."""


def _never_ready(timeout: float) -> bool:
    return False


def _realignment_budget(aligned_pages: int, resumed_from: int, page: int) -> int:
    """How many step-backs a walk may make before it gives up (leaving the cursor alone).

    A resumed walk whose anchors all changed may step back all the way to offset 0.
    """
    return 10 + aligned_pages // 2 + math.ceil(resumed_from / max(1, page - 1))


class _Alignment:
    """What the walk has read, and how much the next page must overlap it to find it again."""

    def __init__(self, limit: int, start_offset: int, anchors: Sequence[RowKey]) -> None:
        self.history: dict[int, tuple[datetime, int]] = {
            contact_id: (stamp, index) for index, (contact_id, stamp) in enumerate(anchors)
        }
        self.broken: dict[bytes, int] = {}
        self._last_keys: list[RowKey] = list(anchors)
        self.prev_offset = start_offset - max(0, len(anchors) - 1)
        self.prev_end: int | None = start_offset if anchors else None
        self.last_valid_at: int | None = self.prev_end
        """Offset of the last parseable row read: where a resumed walk finds its anchors."""
        self.tail_stamp: datetime | None = anchors[-1][1] if anchors else None
        self.tail_run = sum(
            1 for _ in takewhile(lambda key: key[1] == self.tail_stamp, anchors[::-1])
        )
        """How many of the last rows read share `tail_stamp`: with two or more, a tie group
        ends the page, and answers in another order could hide a member past it among them."""
        self.overlap = 1
        self.aligned_pages = 0
        self.max_overlap = max(1, limit // 2)
        """Half a page as this server serves them: the rest of a page must be new rows."""
        self._quiet = 0

    @property
    def resume_offset(self) -> int:
        """Where the walk goes on: `overlap` items before the end of what it read."""
        return 0 if self.prev_end is None else max(0, self.prev_end - self.overlap + 1)

    @property
    def checkpoint_offset(self) -> int:
        """Where a resumed walk starts: no later than the last row its anchors hold."""
        if self.last_valid_at is None:
            return self.resume_offset
        return min(self.resume_offset, self.last_valid_at)

    @property
    def anchors(self) -> list[RowKey]:
        """What a checkpoint keeps to resume from: the last rows read, in page order."""
        return self._last_keys[-_RESUME_ANCHORS:]

    def scan(self, page: Page, offset: int, fresh_after: datetime | None) -> _Scan:
        """One pass over the page: its anchor, what it brings, whether order held."""
        read = self.history.get
        boundary = offset if self.prev_end is None else self.prev_end + 1
        tied_run = self.tail_run > 1
        broken = page.parsed.broken_items()
        tail = self.tail_stamp
        anchor = anchor_was = None
        unseen = tied = fresh = 0
        reordered = False
        last_index, last_stamp = -1, None
        for position, key in enumerate(page.parsed.keys):
            if key is None:
                was = self.broken.get(broken[position])
                if was is None:
                    unseen += 1
                else:
                    anchor, anchor_was = position, was
                continue
            seen = read(key[0])
            if key[1] == tail and (seen is None or (tied_run and offset + position >= boundary)):
                tied += 1
            if seen is None or seen[0] != key[1]:
                unseen += 1
                if fresh_after is not None and key[1] > fresh_after:
                    fresh += 1
                continue
            if seen[1] < last_index and seen[0] != last_stamp:
                reordered = True
            anchor, anchor_was = position, seen[1]
            last_index, last_stamp = seen[1], seen[0]
        return _Scan(anchor, anchor_was, unseen, unseen - fresh, tied, reordered)

    def reached_end(self, scan: _Scan) -> bool:
        """Whether the page's last row read before is the last row of the page before it: a
        short page of old rows that stops short of that (a trimmed answer, a step back) says
        nothing about where the list ends."""
        return self.prev_end is None or scan.anchor_was == self.prev_end - self.prev_offset

    def absorb(self, scan: _Scan, offset: int, stats: WalkStats) -> None:
        """An anchor found earlier than it stood means rows moved back: widen the overlap."""
        if scan.anchor is None or scan.anchor_was is None:
            return
        shift = scan.anchor - (self.prev_offset + scan.anchor_was - offset)
        if shift < 0:
            stats.shifts_absorbed += 1
            self.overlap = min(self.max_overlap, max(self.overlap, 1 - shift))
            self._quiet = 0

    def widen(self) -> None:
        self.overlap = min(self.max_overlap, self.overlap * 2)
        self._quiet = 0

    def accept(self, page: Page, offset: int) -> None:
        """Remember an aligned page; a long quiet spell narrows the overlap again."""
        self.aligned_pages += 1
        self._quiet += 1
        if self._quiet >= _QUIET_PAGES_BEFORE_NARROWING and self.overlap > 1:
            self.overlap = max(1, self.overlap // 2)
            self._quiet = 0
        keys = page.parsed.keys
        self.history = {key[0]: (key[1], i) for i, key in enumerate(keys) if key is not None}
        self.broken = {digest: i for i, digest in page.parsed.broken_items().items()}
        valid = [key for key in keys if key is not None]
        if valid:
            self._last_keys = valid
            tail = self.tail_stamp = valid[-1][1]
            self.tail_run = sum(1 for _ in takewhile(lambda key: key[1] == tail, valid[::-1]))
            last = next(i for i in range(len(keys) - 1, -1, -1) if keys[i] is not None)
            self.last_valid_at = offset + last
        if page.size:
            self.prev_offset = offset
            self.prev_end = offset + page.size - 1


class _Walk:
    """One walk's state: alignment, prefetching, what the server's pages look like."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        limit: int,
        concurrency: int,
        start_offset: int,
        anchors: Sequence[RowKey],
        stats: WalkStats,
        throttled: Callable[[], int] | None,
        fresh_after: datetime | None,
    ) -> None:
        self.fetch = fetch
        self.fresh_after = fresh_after
        self.limit = limit
        self.start_offset = start_offset
        self.stats = stats
        self.alignment = _Alignment(limit, start_offset, anchors)
        self.prefetcher = Prefetcher(lambda offset: fetch(offset, limit), concurrency, stats)
        self.prefetcher.restart_at(start_offset)
        self.window = Window(concurrency, throttled)
        self.order = OrderEvidence()
        self.resolved: set[datetime] = set()
        self.served = 0
        """The largest page this server has served in this walk: its page size, as learnt."""
        self.stalled = 0

    @property
    def page_size(self) -> int:
        return self.served or self.limit

    def take(self) -> tuple[int, Page]:
        try:
            offset, page = self.prefetcher.take(
                self.window.size, max(1, self.page_size - self.alignment.overlap)
            )
        except RequestRejected as exc:
            if any(failure.field == "offset" for failure in exc.failures):
                raise OffsetLimitReached(self.prefetcher.taking, "refused the offset") from exc
            raise
        self.stats.requests += 1
        self.window.check_throttling(self.stats)
        return offset, page

    def steps(self) -> Iterator[PageStep]:
        while True:
            offset, page = self.take()
            alignment = self.alignment
            scan = alignment.scan(page, offset, self.fresh_after)
            self.order.observe(page.parsed.keys)
            tail = alignment.tail_stamp
            direction = self.order.direction
            if scan.tied_on and direction and tail is not None and tail not in self.resolved:
                if (yield from self._read_tie_group(offset, page, tail)):
                    return
                continue
            if scan.reordered:
                raise UnstableOrder(
                    f"Upstream returned rows it had served before in another order at offset "
                    f"{offset}, so its order is not stable between requests and paging cannot "
                    "be exact; ask the provider to sort by a unique key (the cursor was not moved)."
                )
            aligned = (not alignment.history and not alignment.broken) or offset == 0
            if not aligned and scan.anchor is None:
                yield self._realign(offset, page)
                continue
            alignment.absorb(scan, offset, self.stats)
            last = (
                scan.unseen_old == 0
                and page.size < max(self.served, alignment.overlap + 1)
                and (page.size == 0 or alignment.reached_end(scan))
            )
            if last:
                self.prefetcher.discard()
            else:
                self._count_progress(scan, offset)
            yield from self._accept(offset, page, last)
            if last:
                return

    def _count_progress(self, scan: _Scan, offset: int) -> None:
        if scan.unseen:
            self.stalled = 0
            return
        self.stalled += 1
        if self.stalled >= _STALLED_PAGES:
            raise OffsetLimitReached(offset, "served only rows it had served before")

    def _realign(self, offset: int, page: Page) -> PageStep:
        """No anchor: rows moved back past the overlap. Step back a page and look again."""
        stats = self.stats
        stats.realignments += 1
        budget = _realignment_budget(
            self.alignment.aligned_pages, self.start_offset, self.page_size
        )
        if stats.realignments > budget:
            raise PagingUnstable(
                "Upstream rows moved between pages faster than paging could realign; "
                "run again when upstream is quieter (the cursor was not moved)."
            )
        self.alignment.widen()
        self.prefetcher.restart_at(max(0, offset - (self.page_size - 1)))
        self.window.size = 0
        return PageStep(
            page,
            False,
            self.alignment.checkpoint_offset,
            self.alignment.anchors,
            False,
            self.prefetcher.next_ready,
        )

    def _accept(self, offset: int, page: Page, last: bool) -> Iterator[PageStep]:
        alignment, prefetcher = self.alignment, self.prefetcher
        alignment.accept(page, offset)
        short = page.size < self.page_size  # than any page before it: judged before it counts
        if page.size > self.served:
            self.served = page.size
            alignment.max_overlap = max(1, page.size // 2)
        if not last:
            if short:
                self.window.size = 0  # probably the end: fetch only the page that proves it
            else:
                self.window.grow(prefetcher.fetch_s)
            end = alignment.prev_end
            if prefetcher.idle or (end is not None and prefetcher.upcoming > end):
                prefetcher.restart_at(alignment.resume_offset)
        self.stats.window, self.stats.overlap = self.window.size, alignment.overlap
        handed_over = perf_counter() - prefetcher.waited_s
        yield PageStep(
            page,
            True,
            alignment.checkpoint_offset,
            alignment.anchors,
            last,
            prefetcher.next_ready,
        )
        if not last:
            self.window.stored(perf_counter() - prefetcher.waited_s - handed_over)

    def _read_tie_group(
        self, offset: int, page: Page, stamp: datetime
    ) -> Generator[PageStep, None, bool]:
        """A group of rows sharing `stamp` goes on past the page read before: read it whole on
        a list of its own, then go on past its end in this list; True when the list ends there.

        Every page read meanwhile is stored with the checkpoint from before the group, so a
        walk killed in between reads the group again.
        """
        stats, alignment = self.stats, self.alignment
        direction = self.order.direction
        assert direction is not None
        self.prefetcher.discard()
        stats.tie_groups += 1
        before = alignment.checkpoint_offset, alignment.anchors

        def held(read: Page, aside: bool = False) -> PageStep:
            return PageStep(read, False, before[0], before[1], False, _never_ready, aside)

        yield held(page)
        bound = group_bound(stamp, direction)
        for read in read_tie_group(
            lambda at, limit: self.fetch(at, limit, bound), stamp, direction, limit=self.page_size
        ):
            stats.requests += 1
            stats.tie_requests += 1
            yield held(read, aside=True)
        self.resolved.add(stamp)
        inside = max(i for i, key in enumerate(page.parsed.keys) if key and key[1] == stamp)
        end = group_end_in(page, stamp, self.order.known)  # often this page shows it already
        for found in (
            ()
            if end is not None
            else find_group_end(
                self.fetch,
                stamp,
                self.order.known,
                known_inside=offset + inside,
                limit=self.page_size,
            )
        ):
            if isinstance(found, GroupEnd):
                end = found
            else:
                stats.requests += 1
                stats.tie_requests += 1
                yield held(found)
        assert end is not None
        stats.requests += 1
        stats.tie_requests += 1
        last = end.past is None
        yield from self._accept(end.offset, end.page, last)
        return last


def walk_pages(
    fetch: Fetch,
    *,
    limit: int,
    concurrency: int = 1,
    start_offset: int = 0,
    anchors: Sequence[RowKey] = (),
    stats: WalkStats | None = None,
    throttled: Callable[[], int] | None = None,
    fresh_after: datetime | None = None,
) -> Iterator[PageStep]:
    """Yield every page needed to read the whole (filtered) list once, in order.

    `fetch(offset, limit, bound)` returns the page at that offset. Resuming takes the
    `next_offset` and `anchors` of the last stored step. `throttled()`, if given, counts the
    requests the server has rate-limited so far (it may be called from any thread's results);
    the walk keeps fewer fetches in flight each time it grows. Raises PagingUnstable (or
    UnstableOrder) when the list moves faster than the walk can realign or its order is not
    stable, OffsetLimitReached when the server will not page further.

    `fresh_after` is when the walk began: rows updated later need not be read (they are the
    next pass's), so a short page that brings only such rows ends the walk too, instead of
    chasing a list that grows as fast as it is read.
    """
    if limit < 2:
        raise ValueError("limit must be at least 2: with one row a page, the overlap is all")
    walk = _Walk(
        fetch,
        limit=limit,
        concurrency=concurrency,
        start_offset=start_offset,
        anchors=anchors,
        stats=stats if stats is not None else WalkStats(),
        throttled=throttled,
        fresh_after=fresh_after,
    )
    try:
        yield from walk.steps()
    finally:
        walk.prefetcher.close()
