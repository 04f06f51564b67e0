"""The retry policy for upstream requests, in one place.

Which failures are retried is decided by type: every `TransientUpstreamError` (408, 412, 425,
429, 5xx, timeouts, resets, malformed bodies; see `UpstreamError.from_response`) is, nothing
else is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from sync.errors import RequestAbandoned, TransientUpstreamError, UpstreamUnavailable

__all__ = ["RetryPolicy"]

T = TypeVar("T")
_ABANDON_CHECK_S = 0.05
"""How often a backoff looks whether its request was abandoned."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts and in elapsed time.

    A server's Retry-After wins over the computed backoff; when it would overrun the time
    budget the policy gives up at once instead of sleeping past it.
    """

    max_attempts: int
    max_elapsed_s: float
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 15.0
    on_retry: Callable[[TransientUpstreamError, float], None] | None = None
    sleep: Callable[[float], None] = time.sleep

    def call(
        self,
        operation: Callable[[], T],
        *,
        abandoned: threading.Event | None = None,
        retried: list[str] | None = None,
    ) -> T:
        """Run `operation`, retrying transient failures; when they run out, UpstreamUnavailable.

        Once `abandoned` is set (nobody waits for the answer any more: a walk ended before
        this prefetch came back) no further attempt is made and backoff ends at once. Each
        retry's reason is appended to `retried`, if given: the caller's own tally (a pass's,
        while other passes run beside it).
        """
        started = time.monotonic()
        try:
            return operation()  # nearly every request: no retry machinery to set up
        except TransientUpstreamError as first:
            return self._retry(operation, first, started, abandoned, retried)

    def _retry(
        self,
        operation: Callable[[], T],
        first: TransientUpstreamError,
        started: float,
        abandoned: threading.Event | None,
        retried: list[str] | None,
    ) -> T:
        """Go on after a first failure, which counts as attempt 1 of the budget."""
        failures = [first]

        def attempt() -> T:
            if failures:
                raise failures.pop()
            if abandoned is not None and abandoned.is_set():
                raise RequestAbandoned("(abandoned)")
            return operation()

        def pause(seconds: float) -> None:
            if abandoned is None:
                self.sleep(seconds)
                return
            deadline = time.monotonic() + seconds
            while not abandoned.is_set() and (left := deadline - time.monotonic()) > 0:
                self.sleep(min(left, _ABANDON_CHECK_S))

        backoff = wait_exponential_jitter(
            multiplier=self.initial_backoff_s, max=self.max_backoff_s, jitter=self.initial_backoff_s
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, TransientUpstreamError) and error.retry_after is not None:
                return error.retry_after
            return float(backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if not isinstance(error, TransientUpstreamError):
                return
            if retried is not None:
                retried.append(error.reason)
            if self.on_retry is not None:
                delay = state.next_action.sleep if state.next_action else 0.0
                self.on_retry(error, delay)

        spent = time.monotonic() - started
        retrying = Retrying(
            retry=retry_if_exception_type(TransientUpstreamError),
            stop=stop_after_attempt(self.max_attempts)
            | stop_before_delay(max(0.0, self.max_elapsed_s - spent)),
            wait=wait,
            before_sleep=before_sleep,
            sleep=pause,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except TransientUpstreamError as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            elapsed = time.monotonic() - started
            raise UpstreamUnavailable(
                f"{exc.message.rstrip('.')} "
                f"(gave up after {attempts} attempts in {elapsed:.1f} s).",
                status=exc.status,
                key=exc.key,
            ) from exc
