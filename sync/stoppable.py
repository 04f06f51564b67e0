"""An HTTP transport whose in-flight requests can be cut off, so a stop never waits on upstream.

Closing an httpx client does not wake a thread blocked reading a socket; shutting the socket
down does. The daemon hands this transport to the client and calls `abort()` on SIGTERM: every
open connection is shut down (the blocked read fails at once as a transport error) and no new
request is sent, so the pass ends at its next stop check with nothing half-done committed.

The sockets are learnt from httpcore's documented `trace` request extension, which reports
each new connection's network stream: no private attribute of httpx or httpcore is touched.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

import httpx

__all__ = ["StoppableTransport"]

_CONNECTED = "connection.connect_tcp.complete"


class StoppableTransport(httpx.BaseTransport):
    """`httpx.HTTPTransport` with `abort()`: cut every connection and refuse new requests."""

    def __init__(self, max_connections: int, ca_bundle: str | None = None) -> None:
        self.ssl_context = (
            ssl.create_default_context(cafile=ca_bundle)
            if ca_bundle is not None
            else httpx.create_ssl_context()
        )
        self._http = httpx.HTTPTransport(
            verify=self.ssl_context, limits=httpx.Limits(max_connections=max_connections)
        )
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._aborted = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._aborted.is_set():
            raise httpx.ConnectError("stopping: no new requests", request=request)
        request.extensions = {**request.extensions, "trace": self._trace}
        return self._http.handle_request(request)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event != _CONNECTED:
            return
        sock = info["return_value"].get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sockets = {s for s in self._sockets if s.fileno() != -1} | {sock}
        if self._aborted.is_set():  # connected while aborting: cut it too
            _shut(sock)

    def abort(self) -> None:
        with self._lock:
            self._aborted.set()
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        self._http.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its connection
        sock.shutdown(socket.SHUT_RDWR)
