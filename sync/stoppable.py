"""An HTTP transport whose in-flight requests can be cut off, so a stop never waits on upstream.

Closing an httpx client does not wake a thread blocked reading a socket; shutting the socket
down does. The daemon hands this transport to the client and calls `abort()` on SIGTERM: every
open connection is shut down (the blocked read fails at once as a transport error) and no new
one is opened, so the pass ends at its next stop check with nothing half-done committed.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["StoppableTransport"]


class _TrackingBackend(httpcore.SyncBackend):
    """The standard socket backend, remembering its sockets so they can be shut down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._aborted = threading.Event()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if self._aborted.is_set():
            raise httpcore.ConnectError("stopping: no new connections")
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        sock = stream.get_extra_info("socket")
        with self._lock:
            if isinstance(sock, socket.socket):
                self._sockets = {s for s in self._sockets if s.fileno() != -1} | {sock}
        if self._aborted.is_set():
            stream.close()
            raise httpcore.ConnectError("stopping: no new connections")
        return stream

    def abort(self) -> None:
        with self._lock:
            self._aborted.set()
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by its connection
                sock.shutdown(socket.SHUT_RDWR)


class StoppableTransport(httpx.HTTPTransport):
    """`httpx.HTTPTransport` with `abort()`: cut every connection and refuse new ones."""

    def __init__(self, max_connections: int, ca_bundle: str | None = None) -> None:
        super().__init__(limits=httpx.Limits(max_connections=max_connections))
        self._backend = _TrackingBackend()
        # httpx builds its pool with the default backend and offers no parameter for another.
        self._pool = httpcore.ConnectionPool(
            ssl_context=(
                ssl.create_default_context(cafile=ca_bundle)
                if ca_bundle is not None
                else httpx.create_ssl_context()
            ),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=self._backend,
        )

    def abort(self) -> None:
        self._backend.abort()
