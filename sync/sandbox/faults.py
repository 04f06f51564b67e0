"""Failures a test injects: one-off faults in a queue, per-company outages, added latency."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["FAULT_KINDS", "Fault", "FaultKind", "Faults"]

FaultKind = Literal[
    "408", "412", "425", "429", "500", "502", "503", "reset", "stall", "trickle",
    "malformed", "truncated", "short", "not_array", "wrong_content_type", "huge",
]  # fmt: skip
"""`short` serves the page without its second half of items (a trimmed page, not the end of
the list); `trickle` sends status and headers at once, then the body a byte per `seconds`."""
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

_HUGE_SIZE = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure; `company` None matches every company."""

    kind: FaultKind
    company: str | None = None
    retry_after: float | None = 0.0
    """Seconds for the Retry-After header of 429 and 503; None sends no header."""
    seconds: float = 5.0
    """How long a stall lasts before the normal answer; for a trickle, the pause per byte."""
    size: int = _HUGE_SIZE
    """Body size of a huge response, in bytes."""
    chunked: bool = False
    """Stream a huge body without Content-Length, so only counting bytes can cap it."""


@dataclass(slots=True)
class _Queued:
    fault: Fault
    remaining: int


class Faults:
    """Queued one-off faults, permanent per-company failures and added latency, all thread-safe."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Queued] = []
        self._failing: dict[str, int] = {}
        self.latency_ms = latency_ms
        """Added to every request with a non-blocking sleep; assign to change it live."""

    def add(
        self,
        kind: FaultKind,
        times: int = 1,
        *,
        company: str | None = None,
        retry_after: float | None = 0.0,
        seconds: float = 5.0,
        size: int = _HUGE_SIZE,
        chunked: bool = False,
    ) -> Fault:
        """Apply `kind` to the next `times` requests (of `company`, if given), in queue order."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if times < 1 or seconds < 0 or size < 2:
            raise ValueError("times must be >= 1, seconds >= 0 and size >= 2")
        fault = Fault(kind, company, retry_after, seconds, size, chunked)
        with self._lock:
            self._queue.append(_Queued(fault, times))
        return fault

    def fail_company(self, company: str, status: int = 412) -> None:
        """Answer every request for `company` with `status` until `restore_company`."""
        if not 400 <= status <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        with self._lock:
            self._failing[company] = status

    def restore_company(self, company: str) -> None:
        with self._lock:
            self._failing.pop(company, None)

    def pending(self) -> list[tuple[Fault, int]]:
        """Queued faults not yet used up, with how many requests each still applies to."""
        with self._lock:
            return [(queued.fault, queued.remaining) for queued in self._queue]

    def clear(self) -> None:
        """Drop queued faults and company failures; latency is left as set."""
        with self._lock:
            self._queue.clear()
            self._failing.clear()

    def company_failure(self, company: str | None) -> int | None:
        with self._lock:
            return None if company is None else self._failing.get(company)

    def take(self, company: str | None) -> Fault | None:
        """The first queued fault matching `company`, used up by this request."""
        with self._lock:
            for position, queued in enumerate(self._queue):
                if queued.fault.company in (None, company):
                    queued.remaining -= 1
                    if queued.remaining == 0:
                        del self._queue[position]
                    return queued.fault
        return None
