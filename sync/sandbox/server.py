"""The sandbox on loopback in a background thread, and as a foreground process until a signal."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType, TracebackType

import uvicorn

from sync.sandbox.app import SandboxApi
from sync.sandbox.config import CONTACTS_PATH, HOST, SandboxConfig
from sync.sandbox.data import Order, SandboxData
from sync.sandbox.faults import FaultKind
from sync.sandbox.replies import RESET_LOG_FILTER
from sync.sandbox.requests import RecordedRequest

__all__ = ["SandboxServer", "serve_forever"]


class SandboxServer:
    """The sandbox on 127.0.0.1 in a background thread: `with SandboxServer() as server: ...`.

    Port 0 picks a free port; after `stop()`, `start()` serves again on the same port.
    """

    def __init__(
        self,
        data: SandboxData | None = None,
        config: SandboxConfig | None = None,
        *,
        port: int = 0,
    ) -> None:
        self.data = data if data is not None else SandboxData.generate()
        self.config = config or SandboxConfig()
        self.api = SandboxApi(self.data, self.config)
        self.faults = self.api.faults
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def contacts_url(self) -> str:
        return self.base_url + CONTACTS_PATH

    def headers(self, company: str = "1", token: str | None = None) -> dict[str, str]:
        """Request headers that pass auth for `company` (with the first configured token)."""
        token = token if token is not None else next(iter(self.config.tokens))
        return {"Authorization": f"Bearer {token}", self.config.company_header: company}

    def requests(self, company: str | None = None) -> list[RecordedRequest]:
        return self.api.log.requests(company)

    def clear_requests(self) -> None:
        self.api.log.clear()

    def mutate_on_request(
        self, company: str, every: int = 1, updates: int = 1, inserts: int = 0, deletes: int = 0
    ) -> None:
        """Before every `every`-th valid page request of `company`, change its data."""
        self.api.mutator.start(company, every, updates, inserts, deletes)

    def stop_mutating(self, company: str | None = None) -> None:
        self.api.mutator.stop(company)

    def start(self) -> SandboxServer:
        """Bind, serve in a thread and return once requests are accepted."""
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        logging.getLogger("uvicorn.error").addFilter(RESET_LOG_FILTER)
        # IPPROTO_TCP, not 0: asyncio only disables Nagle on sockets that say they are TCP,
        # and without that every keep-alive response waits ~40 ms for a delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((HOST, self.port))
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self.api.closing.clear()
        config = uvicorn.Config(
            self.api.starlette(),
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            date_header=False,  # the app sends its own, from the sandbox clock
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [listener]},
            name=f"sandbox-server-{self.port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                listener.close()
                raise RuntimeError(f"the sandbox server did not start on port {self.port}")
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        """Idempotent: cuts stalls and streams short, then waits for the server thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.api.closing.set()
        server.should_exit = True
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(
    port: int = 8000,
    contacts: int = 1000,
    companies: Sequence[str] = ("1",),
    order: Order | None = None,
    *,
    seed: int = 7,
    config: SandboxConfig | None = None,
    bulk_tie: int = 0,
    broken_run: int = 0,
    faults: Sequence[tuple[FaultKind, int]] = (),
    on_ready: Callable[[SandboxServer], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve generated data until SIGINT or SIGTERM (or `stop` is set), then return cleanly.

    `on_ready` gets the running server, e.g. to print its URL; nothing is printed here.
    `bulk_tie` gives that many generated rows of each company one shared updated_at;
    `broken_run` serves that many unparseable items in a row after the middle id;
    `faults` (kind, times) are queued for the first requests.
    """
    config = config or SandboxConfig()
    if order is not None:
        config = replace(config, order=order)
    stopping = stop or threading.Event()
    data = SandboxData.generate(companies, contacts, seed)
    for company in companies:
        if bulk_tie:
            data.bulk_tie(company, bulk_tie)
        for number in range(broken_run):
            item = {"id": f"broken-{number}", "updated_at": "not a time"}
            data.put_raw(company, item, sort_id=max(1, contacts // 2))
    with _set_on_signals(stopping), SandboxServer(data, config, port=port) as server:
        for kind, times in faults:
            server.faults.add(kind, times)
        if on_ready is not None:
            on_ready(server)
        while not stopping.wait(0.5):
            pass


@contextmanager
def _set_on_signals(event: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `event` instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
