"""The sandbox's record of what it was asked and what it answered, for tests to inspect."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
