"""Walking offsets over a live, unordered list without losing rows.

Each page is requested so that it overlaps the previous one, and is accepted only once it is
*aligned*: it contains a row already read, unchanged (same id and updated_at). Unchanged rows
keep their relative order whatever the server orders by, so every unread unchanged row lies
after that anchor. When no anchor is found, rows shifted backwards by more than the overlap:
the walk steps back a page and looks again; the overlap widens after a shift and narrows again
while nothing moves, so a quiet list costs one row per page. Pages are prefetched concurrently
at predicted offsets; a misaligned page discards the prefetched ones.

How many are in flight while a page is stored adapts: the window doubles per full page (slow
start) up to what the latency needs to keep storing busy (fetch time over store time), so a
fast server is not flooded with fetches that only fight the storing thread for the GIL, and it
halves whenever the server rate-limited a request (429), growing back by one after a quiet
spell. It never exceeds `concurrency`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from time import perf_counter

from sync.api import Page
from sync.errors import PagingUnstable
from sync.rows import RowKey

__all__ = ["PageStep", "WalkStats", "walk_pages"]

_QUIET_PAGES_BEFORE_NARROWING = 5
_RESUME_ANCHORS = 16
"""Keys a checkpoint keeps: the page's last rows, where a resumed walk overlaps it. More only
cost time on every commit (they are saved with it); if all of them changed meanwhile, the
resumed walk steps back until it finds its place, as after any shift it cannot absorb."""
_QUIET_PAGES_BEFORE_SPEEDING_UP = 8
"""Pages without a 429 before a throttled walk allows one more fetch in flight."""
_SMOOTHING = 0.25
"""Weight of the newest sample in the moving averages of fetch and store times."""


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


def _anchor_position(keys: Sequence[RowKey | None], anchors: dict[int, datetime]) -> int | None:
    """The last position in the page holding an unchanged row read before, if any.

    Anchors map id -> updated_at: looking up an int and comparing one timestamp is several
    times cheaper than hashing (id, updated_at) pairs, and a quiet page is scanned whole.
    """
    read = anchors.get
    for position in range(len(keys) - 1, -1, -1):
        key = keys[position]
        if key is not None and read(key[0]) == key[1]:
            return position
    return None


def _realignment_budget(aligned_pages: int, resumed_from: int, limit: int) -> int:
    """How many step-backs a walk may make before it gives up (leaving the cursor alone).

    A resumed walk whose anchors all changed may step back all the way to offset 0.
    """
    return 10 + aligned_pages // 2 + math.ceil(resumed_from / max(1, limit - 1))


class _Alignment:
    """What the walk has read, and how much the next page must overlap it to find it again."""

    def __init__(self, limit: int, start_offset: int, anchors: Sequence[RowKey]) -> None:
        self.history: dict[int, datetime] = dict(anchors)
        self._last_keys: list[RowKey] = list(anchors)
        self.prev_end: int | None = start_offset if anchors else None
        self.last_anchor_at: int | None = start_offset if anchors else None
        """Offset of the last valid row read: the next page must start at or before it."""
        self.overlap = 1
        self.aligned_pages = 0
        self._max_overlap = max(1, limit // 2)
        self._quiet = 0

    @property
    def resume_offset(self) -> int:
        if self.prev_end is None:
            return 0
        start = self.prev_end - self.overlap + 1
        if self.last_anchor_at is not None:
            start = min(start, self.last_anchor_at)
        return max(0, start)

    @property
    def anchors(self) -> list[RowKey]:
        """What a checkpoint keeps to resume from: the last rows read, in page order."""
        return self._last_keys[-_RESUME_ANCHORS:]

    def locate(self, page: Page, offset: int, stats: WalkStats) -> bool:
        """Whether the page is aligned; a backward shift it absorbed widens the overlap."""
        if not self.history or offset == 0:
            return True
        position = _anchor_position(page.parsed.keys, self.history)
        if position is None:
            return False
        if self.last_anchor_at is not None:
            # The last anchor in the page is the last valid row read, wherever the page that
            # held it ended (after it, only broken items may have been served).
            shift = position - (self.last_anchor_at - offset)
            if shift < 0:
                stats.shifts_absorbed += 1
                self.overlap = min(self._max_overlap, max(self.overlap, 1 - shift))
                self._quiet = 0
        return True

    def widen(self) -> None:
        self.overlap = min(self._max_overlap, self.overlap * 2)
        self._quiet = 0

    def accept(self, page: Page, offset: int) -> None:
        """Remember an aligned page; a long quiet spell narrows the overlap again."""
        self.aligned_pages += 1
        self._quiet += 1
        if self._quiet >= _QUIET_PAGES_BEFORE_NARROWING and self.overlap > 1:
            self.overlap = max(1, self.overlap // 2)
            self._quiet = 0
        # Only valid rows can anchor: after a run of broken items at the end of a page, the
        # next page starts back at the last valid one; a page with none anchors nothing.
        keys = [k for k in page.parsed.keys if k is not None]
        self.history = dict(keys)
        self._last_keys = keys
        last_valid = next(
            (i for i in range(page.size - 1, -1, -1) if page.parsed.keys[i] is not None), None
        )
        if not last_valid:
            # No valid row past the page's first: anchoring there would never move on.
            self.history, self._last_keys, self.last_anchor_at = {}, [], None
        else:
            self.last_anchor_at = offset + last_valid
        self.prev_end = offset + page.size - 1


class _Prefetcher:
    """Keeps fetches in flight at predicted offsets and hands them back in order.

    With concurrency 1 there is no thread pool: each fetch runs when it is asked for.
    `fetch_s` is a moving average of how long one fetch takes, the walk's first one (a cold
    connection, a cold server) left out.
    """

    def __init__(self, fetch: Callable[[int], Page], concurrency: int, stats: WalkStats) -> None:
        self._fetch = fetch
        self._stats = stats
        self._pool = ThreadPoolExecutor(max_workers=concurrency) if concurrency > 1 else None
        self._pending: deque[tuple[int, Future[tuple[Page, float]]]] = deque()
        self._next_offset = 0
        self._timed = 0
        self.fetch_s: float | None = None
        self.waited_s = 0.0
        """Time the consumer spent in `next_ready`: waiting, not storing."""

    @property
    def idle(self) -> bool:
        return not self._pending

    def next_ready(self, timeout: float) -> bool:
        if not self._pending:
            return False
        future = self._pending[0][1]
        if future.done():
            return True
        started = perf_counter()
        try:
            future.exception(timeout=timeout)
        except FutureTimeout:
            return False
        finally:
            self.waited_s += perf_counter() - started
        return True

    @property
    def upcoming(self) -> int:
        """The offset of the next page it will hand back."""
        return self._pending[0][0] if self._pending else self._next_offset

    def restart_at(self, offset: int) -> None:
        self.discard()
        self._next_offset = offset

    def take(self, window: int, step: int) -> tuple[int, Page]:
        """The next page in order; `window` more fetches are in flight while it is stored.

        Without a pool (concurrency 1) nothing is fetched ahead: each fetch runs here.
        """
        if not self._pending:
            self._fetch_next(step)
        offset, future = self._pending.popleft()
        while self._pool is not None and len(self._pending) < window:
            self._fetch_next(step)
        page, seconds = future.result()
        self._timed += 1
        if self._timed > 1:
            self.fetch_s = _average(self.fetch_s, seconds)
        return offset, page

    def _fetch_next(self, step: int) -> None:
        self._pending.append((self._next_offset, self._submit(self._next_offset)))
        self._next_offset += step

    def _timed_fetch(self, offset: int) -> tuple[Page, float]:
        started = perf_counter()
        page = self._fetch(offset)
        return page, perf_counter() - started

    def _submit(self, offset: int) -> Future[tuple[Page, float]]:
        if self._pool is not None:
            return self._pool.submit(self._timed_fetch, offset)
        future: Future[tuple[Page, float]] = Future()
        try:
            future.set_result(self._timed_fetch(offset))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def discard(self) -> None:
        while self._pending:
            _, future = self._pending.popleft()
            if not future.cancel():
                self._stats.discarded += 1

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _average(average: float | None, sample: float) -> float:
    return sample if average is None else average + _SMOOTHING * (sample - average)


class _Window:
    """How many fetches to keep in flight: enough to hide their latency, fewer when throttled.

    `size` fetches run while the consumer stores a page; keeping it busy takes about fetch
    time / store time of them, and no more: at the end of the list every one of them is a
    request spent past the last page. `ceiling` is `concurrency`, halved by every 429 seen and
    raised by one again after each quiet spell.
    """

    def __init__(self, concurrency: int, throttled: Callable[[], int] | None) -> None:
        self.size = 0
        """Nothing ahead until a first full page shows that requests work."""
        self._concurrency = concurrency
        self._ceiling = concurrency
        self._throttled = throttled
        self._throttles_seen = throttled() if throttled is not None else 0
        self._quiet = 0
        self.store_s: float | None = None

    def stored(self, seconds: float) -> None:
        self.store_s = _average(self.store_s, seconds)

    def check_throttling(self, stats: WalkStats) -> None:
        """Halve the window if the server rate-limited a request since the last page."""
        if self._throttled is None:
            return
        seen = self._throttled()
        if seen > self._throttles_seen:
            self._throttles_seen = seen
            self._ceiling = min(self._ceiling, self.size) // 2  # 0: one request at a time
            self.size = min(self.size, self._ceiling)
            self._quiet = 0
            stats.throttled += 1
        elif self._ceiling < self._concurrency:
            self._quiet += 1
            if self._quiet >= _QUIET_PAGES_BEFORE_SPEEDING_UP:
                self._ceiling += 1
                self._quiet = 0

    def grow(self, fetch_s: float | None) -> None:
        """After a full aligned page: double (slow start), up to what the latency needs."""
        target = self._ceiling
        if fetch_s is not None and self.store_s is not None:
            target = min(target, max(1, math.ceil(fetch_s / max(self.store_s, 1e-4))))
        self.size = min(target, max(1, self.size * 2))


def walk_pages(
    fetch: Callable[[int], Page],
    *,
    limit: int,
    concurrency: int = 1,
    start_offset: int = 0,
    anchors: Sequence[RowKey] = (),
    stats: WalkStats | None = None,
    throttled: Callable[[], int] | None = None,
) -> Iterator[PageStep]:
    """Yield every page needed to read the whole (filtered) list once, in order.

    `fetch(offset)` returns the page at that offset. Resuming takes the `next_offset` and
    `anchors` of the last stored step. `throttled()`, if given, counts the requests the server
    has rate-limited so far (it may be called from any thread's results); the walk keeps fewer
    fetches in flight each time it grows. Raises PagingUnstable when the list moves faster
    than the walk can realign.
    """
    stats = stats if stats is not None else WalkStats()
    alignment = _Alignment(limit, start_offset, anchors)
    prefetcher = _Prefetcher(fetch, concurrency, stats)
    prefetcher.restart_at(start_offset)
    window = _Window(concurrency, throttled)
    try:
        while True:
            offset, page = prefetcher.take(window.size, limit - alignment.overlap)
            stats.requests += 1
            window.check_throttling(stats)
            if not alignment.locate(page, offset, stats):
                stats.realignments += 1
                budget = _realignment_budget(alignment.aligned_pages, start_offset, limit)
                if stats.realignments > budget:
                    raise PagingUnstable(
                        "Upstream rows moved between pages faster than paging could realign; "
                        "run again when upstream is quieter (the cursor was not moved)."
                    )
                alignment.widen()
                prefetcher.restart_at(max(0, offset - (limit - 1)))
                window.size = 0
                yield PageStep(
                    page,
                    False,
                    alignment.resume_offset,
                    alignment.anchors,
                    False,
                    prefetcher.next_ready,
                )
                continue
            alignment.accept(page, offset)
            last = page.size < limit
            if last:
                prefetcher.discard()
            else:
                window.grow(prefetcher.fetch_s)
                anchor_at = alignment.last_anchor_at
                if prefetcher.idle or (anchor_at is not None and prefetcher.upcoming > anchor_at):
                    prefetcher.restart_at(alignment.resume_offset)
            stats.window, stats.overlap = window.size, alignment.overlap
            handed_over = perf_counter() - prefetcher.waited_s
            yield PageStep(
                page, True, alignment.resume_offset, alignment.anchors, last, prefetcher.next_ready
            )
            if last:
                return
            window.stored(perf_counter() - prefetcher.waited_s - handed_over)
    finally:
        prefetcher.close()
