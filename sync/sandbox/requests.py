"""The sandbox's record of what it was asked and what it answered, for tests to inspect."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["RecordedRequest", "RequestLog"]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """What the sandbox saw and answered; headers other than company and version are not kept."""

    method: str
    path: str
    query: str
    """The raw query string, as encoded by the client (shows `%2B` versus `+`)."""
    params: dict[str, str]
    company: str | None
    version: str | None
    status: int
    items: int | None
    """Contacts in a 200 page; None for any other answer, faulty 200s included."""
    fault: str | None
    """The injected fault, `fail_company`, or `rate_limit` for a 429 past the sandbox's budget."""
    at: float = field(default_factory=time.monotonic)
    """When it arrived (`time.monotonic()`), to count requests per second."""


class RequestLog:
    """The most recent requests, oldest first, bounded so a long-running sandbox stays small."""

    def __init__(self, size: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._entries: deque[RecordedRequest] = deque(maxlen=size)

    def record(self, entry: RecordedRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    def requests(self, company: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [e for e in self._entries if company is None or e.company == company]

    def busiest_window(self, seconds: float = 1.0, company: str | None = None) -> int:
        """The most requests that arrived within any `seconds` (a half-open sliding window)."""
        moments = sorted(entry.at for entry in self.requests(company))
        busiest, first = 0, 0
        for last, moment in enumerate(moments):
            while moment - moments[first] >= seconds:
                first += 1
            busiest = max(busiest, last - first + 1)
        return busiest

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
