"""The process-wide request budget: how fast the requests of every company may go upstream.

One `RequestBudget` per process, shared by every client and thread. It paces requests as a
token bucket (GCRA: `api.max_requests_per_s`, at most `api.burst` at once after a quiet spell)
whose rate only upstream can lower: a 429 pauses every request until its Retry-After moment
and halves the rate, which then climbs back; `RateLimit-*` and `X-RateLimit-*` headers spread
what is left of the server's quota over the time until it resets. Written here rather than
taken from a rate-limiting library: the rate changes while running, and a wait must end at
once on a stop or when nobody wants the request any more, which none of them offers.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from sync.config import ApiSettings
from sync.errors import PassInterrupted, RequestAbandoned, UpstreamUnavailable
from sync.log import get_logger

__all__ = ["RateLimitHint", "RequestBudget", "read_rate_limit", "reset_seconds"]

log = get_logger("sync.budget")

PAUSE_WITHOUT_RETRY_AFTER_S = 1.0
"""How long every request waits after a 429 that names no Retry-After."""
MIN_RATE = 1.0
"""The lowest rate a 429 leaves a configured budget: requests per second."""
MIN_RATE_UNLIMITED = 10.0
"""The lowest rate a 429 leaves when no budget is configured: the server's limit is unknown
then, and the rate sent in the last second (a few requests between backoffs) says little."""
RECOVERY_S = 30.0
"""After a 429's pause, the rate climbs back in a straight line over this many seconds."""
LOW_SHARE = 0.5
"""Headers slow requests down once no more than this share of the server's quota is left."""
_CHECK_S = 0.05
"""How often a wait looks whether its request was abandoned or the process is stopping."""
_EPSILON = 1e-9
"""A bucket this close to a whole token holds one: rounding must not keep a request waiting."""
_EPOCH_S = 1e9
"""A Reset header this large is a Unix time: nobody asks for a wait of 31 years."""
_EPOCH_MS = 1e12
"""A Reset header this large is a Unix time in milliseconds."""

_LEADING_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)")
_PARAMETER = re.compile(r"\b(limit|remaining|reset|q|r|t)\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RateLimitHint:
    """What a response said of the server's quota."""

    limit: float | None
    remaining: float
    reset_s: float
    """Seconds from now until the quota is whole again."""


def reset_seconds(value: float, now: float) -> float:
    """Seconds to wait from a Reset header: a Unix time (in seconds, or milliseconds past
    10^12) when it is 10^9 or more, else already a number of seconds; `now` is Unix time."""
    if value >= _EPOCH_MS:
        value = value / 1000 - now
    elif value >= _EPOCH_S:
        value -= now
    return max(0.0, value)


def read_rate_limit(headers: Mapping[str, str], now: float) -> RateLimitHint | None:
    """The quota a response announces: `RateLimit-Limit/-Remaining/-Reset` (IETF drafts), the
    combined `RateLimit` header (with `RateLimit-Policy`), or `X-RateLimit-*`, in that order."""
    remaining, reset = _leading(headers.get("ratelimit-remaining")), None
    if remaining is not None:
        reset = _leading(headers.get("ratelimit-reset"))
    if remaining is not None and reset is not None:
        limit = _leading(headers.get("ratelimit-limit"))
        return RateLimitHint(limit, remaining, reset_seconds(reset, now))
    combined = _parameters(headers.get("ratelimit"))
    remaining = combined.get("remaining", combined.get("r"))
    reset = combined.get("reset", combined.get("t"))
    if remaining is not None and reset is not None:
        limit = combined.get("limit", _parameters(headers.get("ratelimit-policy")).get("q"))
        return RateLimitHint(limit, remaining, reset_seconds(reset, now))
    remaining = _leading(headers.get("x-ratelimit-remaining"))
    reset = _leading(headers.get("x-ratelimit-reset"))
    if remaining is not None and reset is not None:
        limit = _leading(headers.get("x-ratelimit-limit"))
        return RateLimitHint(limit, remaining, reset_seconds(reset, now))
    return None


def _leading(value: str | None) -> float | None:
    """The number a header value starts with (`RateLimit-Limit: 100, 100;w=60` is 100)."""
    found = _LEADING_NUMBER.match(value) if value else None
    return float(found.group(1)) if found else None


def _parameters(value: str | None) -> dict[str, float]:
    if not value:
        return {}
    return {name.lower(): float(number) for name, number in _PARAMETER.findall(value)}


class RequestBudget:
    """Paces every upstream request of the process; thread-safe.

    Requests queue first come, first served; the one at the head waits until the bucket
    holds a token (it refills at the rate allowed at that moment, up to `burst`) and no pause
    is on. The rate allowed is the lowest of: the configured one (none: unlimited), the one a
    429 left while it climbs back, and the one the headers ask for until the quota resets.
    """

    def __init__(
        self,
        max_per_s: float | None = None,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if burst < 1 or (max_per_s is not None and not 0 < max_per_s < math.inf):
            raise ValueError("max_per_s must be a positive number (or None) and burst >= 1")
        self._configured = max_per_s if max_per_s is not None else math.inf
        self._burst = burst
        self._clock = clock
        self._wall_clock = wall_clock
        self._turns = threading.Condition()
        self._queue: deque[object] = deque()
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._paused_until = -math.inf
        self._lowered: float | None = None
        self._ceiling = math.inf
        self._recover_from = -math.inf
        self._dropped_after = 0
        """Requests let through when the rate last halved: the 429s they meet halve it no more."""
        self._spread: float | None = None
        self._spread_until = -math.inf
        self._sent: deque[float] = deque()
        self._requests = 0
        self._in_flight: set[int] = set()
        self._first_sent = -math.inf
        self._waited_s = 0.0

    @classmethod
    def from_settings(cls, api: ApiSettings) -> RequestBudget:
        """`api.max_requests_per_s` (0: no limit of its own) and `api.burst`."""
        return cls(api.max_requests_per_s or None, api.burst)

    @property
    def requests(self) -> int:
        """Requests let through since the budget was made: every attempt, retries included."""
        with self._turns:
            return self._requests

    @property
    def waited_s(self) -> float:
        """Seconds requests spent waiting for the budget, added up over all of them."""
        with self._turns:
            return self._waited_s

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn now."""
        with self._turns:
            return len(self._queue)

    def allowed_rate(self) -> float:
        """Requests per second allowed now: 0 while paused, infinite when nothing limits."""
        with self._turns:
            now = self._clock()
            return 0.0 if now < self._paused_until else self._rate(now)

    @contextlib.contextmanager
    def turn(
        self,
        *,
        give_up_at: float | None = None,
        abandoned: threading.Event | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[int]:
        """Wait for the request's turn (`_acquire`); the block is the request, in flight until
        it ends. Yields the request's ticket, which `observe` and `rate_limited` take back."""
        ticket = self._acquire(give_up_at=give_up_at, abandoned=abandoned, stop=stop)
        try:
            yield ticket
        finally:
            with self._turns:
                self._in_flight.discard(ticket)

    def _acquire(
        self,
        *,
        give_up_at: float | None = None,
        abandoned: threading.Event | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Wait for the request's turn; returns its ticket: the number of requests let through
        so far, itself included.

        Raises PassInterrupted once `stop` is set and RequestAbandoned once `abandoned` is,
        within _CHECK_S; UpstreamUnavailable, without waiting for it, once its turn cannot
        come before `give_up_at` (the end of the request's retry budget).
        """
        turn = object()
        with self._turns:
            asked = self._clock()
            self._queue.append(turn)
            try:
                while True:
                    _check(abandoned, stop)
                    now = self._clock()
                    head = self._queue[0] is turn
                    due = self._next_free(now) if head else max(now, self._paused_until)
                    if give_up_at is not None and due > give_up_at:
                        raise UpstreamUnavailable(
                            "Upstream's rate limit and api.max_requests_per_s would hold a "
                            f"request {due - now:.0f} s more, past retry.max_elapsed_s; run "
                            "again later or raise retry.max_elapsed_s."
                        )
                    if head and due <= now:
                        return self._let_through(now, asked)
                    # Woken early by every request let through and every change of rate.
                    self._turns.wait(min(due - now, _CHECK_S) if head else _CHECK_S)
            finally:
                self._queue.remove(turn)
                self._turns.notify_all()

    def rate_limited(self, retry_after: float | None, *, ticket: int) -> None:
        """A 429: every request waits until its Retry-After moment, and the rate halves.

        The rate halves from the one the process was sending at (`_sending_rate`; at most
        the allowed one), never below MIN_RATE (MIN_RATE_UNLIMITED without a budget), and only
        once for the requests let through before the last halving (all sent at the old rate,
        `ticket` says which). It then
        climbs back to the configured rate (unlimited: to the rate that drew the 429, then no
        limit) over RECOVERY_S.
        """
        pause = retry_after if retry_after is not None else PAUSE_WITHOUT_RETRY_AFTER_S
        with self._turns:
            now = self._clock()
            self._paused_until = max(self._paused_until, now + pause)
            if ticket <= self._dropped_after:
                self._recover_from = max(self._recover_from, self._paused_until)
                return
            unlimited = self._configured == math.inf
            floor = MIN_RATE_UNLIMITED if unlimited else MIN_RATE
            sending = self._sending_rate(now)
            drawn = min(self._rate(now), sending)
            self._lowered = max(floor, drawn / 2)
            self._ceiling = max(self._lowered, drawn) if unlimited else self._configured
            self._recover_from = self._paused_until
            self._dropped_after = self._requests
            # One request at the end of the pause, then the lowered rate: no burst after it.
            self._tokens, self._refilled_at = 1.0, self._paused_until
            self._turns.notify_all()
            lowered, until = self._lowered, self._paused_until - now
        log.info("budget.rate_limited", pause_s=round(until, 3), rate_per_s=round(lowered, 2))

    def observe(self, headers: Mapping[str, str], *, ticket: int) -> None:
        """Slow down before a 429 comes, from the quota headers of request `ticket`'s answer.

        What is left is the quota remaining less the requests the server may not have
        counted yet: those let through after this one, and those before it still in flight.
        At or below LOW_SHARE of the limit, it is spread over the time until the quota resets;
        with nothing left, every request waits for the reset.
        """
        hint = read_rate_limit(headers, self._wall_clock())
        if hint is None:
            return
        with self._turns:
            now = self._clock()
            uncounted = self._requests - ticket + sum(1 for t in self._in_flight if t < ticket)
            left = hint.remaining - uncounted
            if left < 1:
                self._paused_until = max(self._paused_until, now + hint.reset_s)
                self._spread = None
            elif hint.reset_s > 0 and (hint.limit is None or left <= hint.limit * LOW_SHARE):
                self._spread = left / hint.reset_s
                self._spread_until = now + hint.reset_s
            else:
                self._spread = None
            self._turns.notify_all()

    def _rate(self, moment: float) -> float:
        """The rate allowed at `moment`, pause aside."""
        rate = self._configured
        climbed = (moment - self._recover_from) / RECOVERY_S
        if self._lowered is not None and climbed < 1:
            step = (self._ceiling - self._lowered) * max(0.0, climbed)
            rate = min(rate, self._lowered + step)
        if self._spread is not None and moment < self._spread_until:
            rate = min(rate, self._spread)
        return rate

    def _sending_rate(self, now: float) -> float:
        """Requests per second over the last second, or since the first request when that is
        more recent (but over at least a tenth of a second)."""
        span = min(1.0, max(0.1, now - self._first_sent))
        return sum(1 for moment in self._sent if moment >= now - span) / span

    def _let_through(self, now: float, asked: float) -> int:
        self._tokens = self._tokens_at(now, self._rate(now)) - 1
        self._refilled_at = now
        if not self._requests:
            self._first_sent = now
        self._requests += 1
        self._in_flight.add(self._requests)
        self._waited_s += now - asked
        self._sent.append(now)
        while self._sent and self._sent[0] <= now - 1:
            self._sent.popleft()
        return self._requests

    def _next_free(self, now: float) -> float:
        """When the head of the queue may go: no pause on, and a token in the bucket."""
        start = max(now, self._paused_until)
        rate = self._rate(start)
        missing = 1 - self._tokens_at(start, rate)
        return start if missing <= _EPSILON else start + missing / rate

    def _tokens_at(self, moment: float, rate: float) -> float:
        """The bucket at `moment`, refilled since the last request at `rate`, up to the burst."""
        if rate == math.inf:
            return float(self._burst)
        refill = max(0.0, moment - self._refilled_at) * rate
        return min(float(self._burst), self._tokens + refill)


def _check(abandoned: threading.Event | None, stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise PassInterrupted("(stopping)")
    if abandoned is not None and abandoned.is_set():
        raise RequestAbandoned("(abandoned)")
