"""The sandbox's own request budget, as an API gateway keeps one: N requests per window."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Literal, get_args

__all__ = ["RATE_HEADERS", "RateHeaders", "WindowLimit"]

RateHeaders = Literal["both", "ietf", "x", "none"]
"""Which quota headers every answer carries: `RateLimit-*` (IETF drafts, Reset in seconds to
wait), `X-RateLimit-*` (Reset as a Unix time, as GitHub sends it), both, or none."""
RATE_HEADERS: tuple[RateHeaders, ...] = get_args(RateHeaders)

Headers = tuple[tuple[str, str], ...]


class WindowLimit:
    """`limit` requests per fixed window of `window_s`, shared by every company and token.

    A window starts with the first request after the last one ended. Past the limit a request
    is not served: 429 with Retry-After, the whole seconds until the window ends.
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        headers: RateHeaders = "both",
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.headers = headers
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._window_ends = -math.inf
        self._used = 0

    def admit(self) -> tuple[bool, Headers]:
        """Whether this request is served, and the quota headers for its answer."""
        with self._lock:
            now = self._clock()
            if now >= self._window_ends:
                self._window_ends, self._used = now + self.window_s, 0
            admitted = self._used < self.limit
            self._used += admitted
            remaining, left = self.limit - self._used, self._window_ends - now
        reset = max(1, math.ceil(left))
        headers: list[tuple[str, str]] = []
        if self.headers in ("both", "ietf"):
            headers += [
                ("ratelimit-limit", str(self.limit)),
                ("ratelimit-remaining", str(remaining)),
                ("ratelimit-reset", str(reset)),
            ]
        if self.headers in ("both", "x"):
            headers += [
                ("x-ratelimit-limit", str(self.limit)),
                ("x-ratelimit-remaining", str(remaining)),
                ("x-ratelimit-reset", str(math.ceil(self._wall_clock() + left))),
            ]
        if not admitted:
            headers.append(("retry-after", str(reset)))
        return admitted, tuple(headers)
