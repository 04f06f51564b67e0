"""Fetches kept in flight ahead of the walk, and how many: the walk's concurrency.

The walk asks for pages in order; the prefetcher has the next ones requested already, at the
offsets the walk predicts, and hands them back in order. How many are in flight while a page
is stored adapts: the window doubles per full page (slow start) up to what the latency needs
to keep storing busy (fetch time over store time), so a fast server is not flooded with fetches
that only fight the storing thread for the GIL, and it halves whenever the server rate-limited
a request (429), growing back by one after a quiet spell. It never exceeds `concurrency`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from time import perf_counter
from typing import Protocol

from sync.api import Page

__all__ = ["Prefetcher", "Window"]

_QUIET_PAGES_BEFORE_SPEEDING_UP = 8
"""Pages without a 429 before a throttled walk allows one more fetch in flight."""
_SMOOTHING = 0.25
"""Weight of the newest sample in the moving averages of fetch and store times."""


class Counts(Protocol):
    """The walk's statistics that the prefetcher and window update."""

    discarded: int
    throttled: int


class Prefetcher:
    """Keeps fetches in flight at predicted offsets and hands them back in order.

    Until a fetch ahead is wanted, fetches run on the caller's thread, which waits for them
    anyway; the thread pool is made for the first fetch ahead (so a walk of a page or two, a
    quiet pass, starts no thread), and from then on every fetch goes through it. With
    concurrency 1 nothing is fetched ahead. `fetch_s` is a moving average of how long one fetch
    takes, the walk's first one (a cold connection, a cold server) left out.
    """

    def __init__(self, fetch: Callable[[int], Page], concurrency: int, stats: Counts) -> None:
        self._fetch = fetch
        self._stats = stats
        self._concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, Future[tuple[Page, float]]]] = deque()
        self._next_offset = 0
        self.taking = 0
        """The offset of the page being handed back, for errors that name it."""
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
            self._fetch_next(step, ahead=False)
        offset, future = self._pending.popleft()
        self.taking = offset
        while self._concurrency > 1 and len(self._pending) < window:
            self._fetch_next(step, ahead=True)
        page, seconds = future.result()
        self._timed += 1
        if self._timed > 1:
            self.fetch_s = _average(self.fetch_s, seconds)
        return offset, page

    def _fetch_next(self, step: int, *, ahead: bool) -> None:
        self._pending.append((self._next_offset, self._submit(self._next_offset, ahead=ahead)))
        self._next_offset += step

    def _timed_fetch(self, offset: int) -> tuple[Page, float]:
        started = perf_counter()
        page = self._fetch(offset)
        return page, perf_counter() - started

    def _submit(self, offset: int, *, ahead: bool) -> Future[tuple[Page, float]]:
        # Once there is a pool every fetch goes through it: fetches it still runs (discarded
        # ones included) plus one here would exceed `concurrency`.
        if ahead or self._pool is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._concurrency)
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
            self._pool.shutdown(wait=False, cancel_futures=True)


def _average(average: float | None, sample: float) -> float:
    return sample if average is None else average + _SMOOTHING * (sample - average)


class Window:
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
        self._full_pages = 0
        self.store_s: float | None = None

    def stored(self, seconds: float) -> None:
        self.store_s = _average(self.store_s, seconds)

    def check_throttling(self, stats: Counts) -> None:
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
        """After a full aligned page: double (slow start), up to what the latency needs.

        Not after the first: most lists of a fleet fit in a page or two, and a fetch ahead
        of the second would be a request past the end of each.
        """
        self._full_pages += 1
        if self._full_pages < 2:
            return
        target = self._ceiling
        if fetch_s is not None and self.store_s is not None:
            target = min(target, max(1, math.ceil(fetch_s / max(self.store_s, 1e-4))))
        self.size = min(target, max(1, self.size * 2))
