"""An HTTP transport whose requests can be cut off and held to a deadline, whatever upstream does.

Closing an httpx client does not wake a thread blocked reading a socket, and httpx's timeouts
are per socket operation: a server that sends a byte a second, in its headers or its body, keeps
a request alive for ever. This transport runs httpcore's connection pool over a network backend
of its own (httpcore's documented `network_backend` hook), which:

- bounds every socket operation of a request by the calling thread's `deadline()`, so the whole
  exchange (connect, TLS, headers and body) ends by then as a timeout;
- knows every connection's socket, so `abort()` (the daemon's SIGTERM) shuts them all down at
  once (the blocked read fails as a transport error) and refuses new ones.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import httpcore
import httpx

__all__ = ["StoppableTransport", "deadline"]

_local = threading.local()

_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProxyError, httpx.ProxyError),
)
"""httpcore's errors as the httpx ones callers catch; subclasses before their bases."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Requests made by this thread inside the block, bodies read included, end within
    `seconds` of its start (as an httpx timeout) on a StoppableTransport; others ignore it."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """The timeout for one socket operation: the caller's, cut to what the deadline leaves."""
    until: float | None = getattr(_local, "deadline", None)
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class StoppableTransport(httpx.BaseTransport):
    """An httpx transport with `abort()`, and `deadline()` enforced on every socket operation."""

    def __init__(self, max_connections: int, ca_bundle: str | None = None) -> None:
        self.ssl_context = (
            ssl.create_default_context(cafile=ca_bundle)
            if ca_bundle is not None
            else httpx.create_ssl_context()
        )
        self._network = _Network()
        self._pool = httpcore.ConnectionPool(
            ssl_context=self.ssl_context,
            max_connections=max_connections,
            network_backend=self._network,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(cast(Iterable[bytes], response.stream)),  # the sync pool's
            extensions=response.extensions,
        )

    def abort(self) -> None:
        """Cut every open connection and refuse new ones: blocked reads fail at once."""
        self._network.abort()

    def close(self) -> None:
        self._pool.close()


_CORE_ERRORS = tuple(core for core, _ in _ERRORS)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except _CORE_ERRORS as exc:
        mapped = next(ours for core, ours in _ERRORS if isinstance(exc, core))
        raise mapped(str(exc)) from exc


class _Body(httpx.SyncByteStream):
    """The response body, with httpcore's errors raised as httpx's."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _Network(httpcore.NetworkBackend):
    """httpcore's own sync backend, with every stream bounded by the deadline and cuttable."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
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
            raise httpcore.ConnectError("stopping: no new requests")
        stream = self._backend.connect_tcp(
            host,
            port,
            _bounded(timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return self.track(stream)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def track(self, stream: httpcore.NetworkStream) -> httpcore.NetworkStream:
        """Remember the stream's socket for `abort`; cut it at once if aborting already."""
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets = {s for s in self._sockets if s.fileno() != -1} | {sock}
            if self._aborted.is_set():
                _shut(sock)
        return _Stream(stream, self)

    def abort(self) -> None:
        with self._lock:
            self._aborted.set()
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _shut(sock)


class _Stream(httpcore.NetworkStream):
    """One connection: each operation waits no longer than the request's deadline allows."""

    def __init__(self, inner: httpcore.NetworkStream, network: _Network) -> None:
        self._inner = inner
        self._network = network

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(
            ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)
        )
        return self._network.track(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its connection
        sock.shutdown(socket.SHUT_RDWR)
