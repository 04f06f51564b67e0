"""The local simulator of the upstream `GET /api/contacts`, for trying the product and for tests.

It follows `list-contacts-api.txt` closely (auth, headers, filters, the 400 body), serves pages
fast from cached ordered views, and lets a test inject faults and change data mid-pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import Literal, get_args
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sync.config import PUBLIC_SANDBOX_TOKEN
from sync.sandbox_data import ORDERS, Order, SandboxData, UpdatedFilter

__all__ = [
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "HOST",
    "Fault",
    "FaultKind",
    "Faults",
    "Mutator",
    "Order",
    "RecordedRequest",
    "RequestLog",
    "SandboxApi",
    "SandboxConfig",
    "SandboxData",
    "SandboxServer",
    "create_app",
    "serve_forever",
]

FaultKind = Literal[
    "412", "429", "500", "502", "503", "reset", "stall",
    "malformed", "truncated", "not_array", "wrong_content_type", "huge",
]  # fmt: skip
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

HOST = "127.0.0.1"
DEFAULT_TOKEN = PUBLIC_SANDBOX_TOKEN
CONTACTS_PATH = "/api/contacts"

_HUGE_SIZE = 50 * 1024 * 1024
_STREAM_CHUNK = 1024 * 1024
_PAUSE_STEP = 0.05
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:Z|[+-]\d{2}:\d{2})")
_INTEGER = re.compile(r"-?\d{1,18}")
_INVALID_DATA = "You provided invalid data. Check 'failures' for details."
_TIMESTAMP_RULE = (
    "must be YYYY-MM-DDTHH:MM:SS followed by Z or +HH:MM/-HH:MM, optionally prefixed by gt: or lt:"
)
_SAMPLE_ROW = (
    b'{"id":1,"created_at":"2025-10-28T10:23:49.429Z","updated_at":"2025-10-28T10:23:49.429Z",'
    b'"client_id":1,"email":"client@email.com","name":"Client name","surname":"Client surname",'
    b'"role":"Client role","notes":"Some notes about the client",'
    b'"linkedin":"https://www.linkedin.com/in/example",'
    b'"description":"A brief description of the client","telephone":"123456789"}'
)
_MAINTENANCE_PAGE = (
    b"<!DOCTYPE html><html><head><title>Maintenance</title></head>"
    b"<body><h1>We'll be right back</h1></body></html>"
)
_BAD_GATEWAY_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"
)
_STATUS_ERRORS = {
    401: ("unauthorized", "The token is not valid."),
    403: ("forbidden", "The token may not access this company."),
    412: ("precondition_failure", "The company is not available right now."),
    429: ("too_many_requests", "Too many requests; slow down and retry later."),
    500: ("internal_error", "Something went wrong on our side."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
}

_EXPECTED_RESET: ContextVar[bool] = ContextVar("sandbox_expected_reset", default=False)


class _ExpectedResetFilter(logging.Filter):
    """Hides uvicorn's error line for a connection the sandbox drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            _EXPECTED_RESET.get()
            and str(record.msg).startswith("ASGI callable returned without completing")
        )


_RESET_LOG_FILTER = _ExpectedResetFilter()


@dataclass(frozen=True)
class SandboxConfig:
    """What the simulated upstream accepts and how it orders; data lives in `SandboxData`."""

    tokens: Collection[str] = (DEFAULT_TOKEN,)
    tokens_without_view: Collection[str] = ()
    """Valid tokens lacking `crm.view`: 403 for every company."""
    forbidden_companies: Collection[str] = ()
    """Companies every token gets 403 for."""
    accepted_versions: Collection[str] = ("2024-01",)
    require_version: bool = False
    company_header: str = "X-Company-Id"
    version_header: str = "X-Api-Version"
    order: Order = "id"
    latency_ms: float = 0.0
    request_log_size: int = 100_000

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.request_log_size < 1:
            raise ValueError("request_log_size must be >= 1")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure; `company` None matches every company."""

    kind: FaultKind
    company: str | None = None
    retry_after: float | None = 0.0
    """Seconds for the Retry-After header of 429 and 503; None sends no header."""
    seconds: float = 5.0
    """How long a stall lasts before the normal answer."""
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


@dataclass(slots=True)
class _MutationPlan:
    every: int
    updates: int
    inserts: int
    deletes: int
    seen: int = 0


class Mutator:
    """Changes a company's rows before every `every`-th page it serves: offsets shift mid-pass."""

    def __init__(self, data: SandboxData) -> None:
        self._data = data
        self._lock = threading.Lock()
        self._plans: dict[str, _MutationPlan] = {}

    def start(
        self, company: str, every: int = 1, updates: int = 1, inserts: int = 0, deletes: int = 0
    ) -> None:
        if every < 1 or min(updates, inserts, deletes) < 0:
            raise ValueError("every must be >= 1 and the counts >= 0")
        with self._lock:
            self._plans[company] = _MutationPlan(every, updates, inserts, deletes)

    def stop(self, company: str | None = None) -> None:
        with self._lock:
            if company is None:
                self._plans.clear()
            else:
                self._plans.pop(company, None)

    def before_page(self, company: str) -> None:
        """Called for each valid page request; the lock keeps the sequence deterministic."""
        with self._lock:
            plan = self._plans.get(company)
            if plan is None:
                return
            plan.seen += 1
            if plan.seen % plan.every:
                return
            if plan.deletes:
                self._data.delete(company, count=plan.deletes)
            if plan.updates:
                self._data.update(company, count=plan.updates)
            if plan.inserts:
                self._data.insert(company, count=plan.inserts)


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    items: int | None = None


@dataclass(frozen=True, slots=True)
class _Query:
    limit: int
    offset: int
    client_id: int | None
    updated: UpdatedFilter | None


class SandboxApi:
    """The endpoint as a raw ASGI app, with the switches a test flips while it serves."""

    def __init__(self, data: SandboxData, config: SandboxConfig | None = None) -> None:
        self.data = data
        self.config = config or SandboxConfig()
        self.faults = Faults(self.config.latency_ms)
        self.log = RequestLog(self.config.request_log_size)
        self.mutator = Mutator(data)
        self.closing = threading.Event()
        """Set while the server stops, to cut stalls and streams short."""
        self._company_header = self.config.company_header.lower()
        self._version_header = self.config.version_header.lower()

    def starlette(self) -> Starlette:
        app = Starlette(
            routes=[Route(CONTACTS_PATH, self)],
            exception_handlers={404: self._not_found},
        )
        app.router.redirect_slashes = False
        app.state.sandbox = self
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        query = scope["query_string"].decode("latin-1")
        params = dict(parse_qsl(query, keep_blank_values=True))
        company = headers.get(self._company_header)
        if self.faults.latency_ms > 0:
            await self._pause(self.faults.latency_ms / 1000)
        failing = self.faults.company_failure(company)
        fault = None if failing is not None else self.faults.take(company)
        label = "fail_company" if failing is not None else fault.kind if fault else None
        streamed = fault is not None and fault.kind in ("reset", "huge")
        reply = None
        if not streamed:
            reply = await self._reply(
                scope["method"], headers, params, company, failing=failing, fault=fault
            )
        # Recorded before answering, so a client holding the response always finds its entry.
        self.log.record(
            RecordedRequest(
                method=scope["method"],
                path=scope["path"],
                query=query,
                params=params,
                company=company,
                version=headers.get(self._version_header),
                status=200 if reply is None else reply.status,
                items=reply.items if reply is not None and label in (None, "stall") else None,
                fault=label,
            )
        )
        if reply is not None:
            await _send_reply(send, reply)
        elif fault is not None and fault.kind == "reset":
            await _send_reset(send)
        elif fault is not None:
            await self._send_huge(send, fault)

    async def _reply(
        self,
        method: str,
        headers: dict[str, str],
        params: dict[str, str],
        company: str | None,
        *,
        failing: int | None,
        fault: Fault | None,
    ) -> _Reply:
        if failing is not None:
            return _status_reply(failing, None)
        if fault is None:
            return self._answer(method, headers, params, company)
        if fault.kind == "stall":
            await self._pause(fault.seconds)
            return self._answer(method, headers, params, company)
        if fault.kind in ("truncated", "not_array"):
            return _distort(self._answer(method, headers, params, company), fault.kind)
        return _fault_reply(fault)

    def _answer(
        self, method: str, headers: dict[str, str], params: dict[str, str], company: str | None
    ) -> _Reply:
        """The documented behaviour: 401, 403, 412 and 400 checks, then a page."""
        config = self.config
        if method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", "Only GET is allowed.", allow="GET")
        token = _bearer_token(headers.get("authorization"))
        if token is None:
            return _error(401, "unauthorized", "Send Authorization: Bearer <token>.")
        if token not in config.tokens and token not in config.tokens_without_view:
            return _error(401, "unauthorized", "The token is not valid.")
        if token in config.tokens_without_view:
            return _error(403, "forbidden", "The token lacks the crm.view permission.")
        if not company:
            return _error(
                412, "precondition_failure", f"The {config.company_header} header is required."
            )
        if company in config.forbidden_companies:
            return _error(403, "forbidden", f"The token may not access company {company[:40]}.")
        if not self.data.has_company(company):
            return _error(412, "precondition_failure", f"Company {company[:40]} does not exist.")
        version = headers.get(self._version_header)
        if version is None and config.require_version:
            return _error(
                412, "precondition_failure", f"The {config.version_header} header is required."
            )
        if version is not None and version not in config.accepted_versions:
            return _error(
                412, "precondition_failure", f"API version {version[:40]!r} is not supported."
            )
        query = _parse_query(params)
        if isinstance(query, list):
            body = {"key": "invalid_data", "message": _INVALID_DATA, "failures": query}
            return _Reply(400, json.dumps(body).encode())
        self.mutator.before_page(company)
        page, count = self.data.page(
            company,
            updated=query.updated,
            client_id=query.client_id,
            order=config.order,
            offset=query.offset,
            limit=query.limit,
        )
        return _Reply(200, page, items=count)

    async def _pause(self, seconds: float) -> None:
        """Sleep without blocking other requests, cut short when the server stops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.closing.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _PAUSE_STEP))

    async def _send_huge(self, send: Send, fault: Fault) -> None:
        """A valid JSON array of exactly `fault.size` bytes, streamed in 1 MiB chunks."""
        unit = b"," + _SAMPLE_ROW
        head = b"[" + _SAMPLE_ROW if fault.size >= len(_SAMPLE_ROW) + 2 else b"["
        copies, padding = divmod(fault.size - len(head) - 1, len(unit))
        headers = [(b"content-type", b"application/json")]
        if not fault.chunked:
            headers.append((b"content-length", str(fault.size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": head, "more_body": True})
        per_chunk = max(1, _STREAM_CHUNK // len(unit))
        block = unit * per_chunk
        while copies >= per_chunk:
            if self.closing.is_set():
                _EXPECTED_RESET.set(True)
                return
            await send({"type": "http.response.body", "body": block, "more_body": True})
            await asyncio.sleep(0)
            copies -= per_chunk
        tail = unit * copies + b" " * padding + b"]"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        self.log.record(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                params=dict(request.query_params),
                company=request.headers.get(self._company_header),
                version=request.headers.get(self._version_header),
                status=404,
                items=None,
                fault=None,
            )
        )
        body = {"key": "not_found", "message": f"No route for {request.url.path[:80]}."}
        return Response(json.dumps(body), status_code=404, media_type="application/json")


def create_app(data: SandboxData, config: SandboxConfig | None = None) -> Starlette:
    """The sandbox as a Starlette app; its `SandboxApi` is at `app.state.sandbox`."""
    return SandboxApi(data, config).starlette()


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
        logging.getLogger("uvicorn.error").addFilter(_RESET_LOG_FILTER)
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
    on_ready: Callable[[SandboxServer], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve generated data until SIGINT or SIGTERM (or `stop` is set), then return cleanly.

    `on_ready` gets the running server, e.g. to print its URL; nothing is printed here.
    """
    config = config or SandboxConfig()
    if order is not None:
        config = replace(config, order=order)
    stopping = stop or threading.Event()
    data = SandboxData.generate(companies, contacts, seed)
    with _set_on_signals(stopping), SandboxServer(data, config, port=port) as server:
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


def _bearer_token(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _parse_query(params: dict[str, str]) -> _Query | list[dict[str, str]]:
    """The validated query, or every failure in the documented `failures` shape."""
    failures: list[dict[str, str]] = []
    limit = _integer(params, "limit", default=100, low=1, high=100, failures=failures)
    offset = _integer(params, "offset", default=0, low=0, high=None, failures=failures)
    client_id = _integer(params, "client_id", default=None, low=1, high=None, failures=failures)
    updated = None
    if "updated_at" in params:
        updated = _updated_filter(params["updated_at"])
        if updated is None:
            failures.append({"field": "updated_at", "message": _TIMESTAMP_RULE})
    if failures or limit is None or offset is None:
        return failures
    return _Query(limit, offset, client_id, updated)


def _integer(
    params: dict[str, str],
    name: str,
    *,
    default: int | None,
    low: int,
    high: int | None,
    failures: list[dict[str, str]],
) -> int | None:
    raw = params.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        failures.append({"field": name, "message": "must be an integer"})
        return None
    value = int(raw)
    if high is not None and not low <= value <= high:
        failures.append({"field": name, "message": f"must be between {low} and {high}"})
    elif value < low:
        failures.append({"field": name, "message": f"must be greater than or equal to {low}"})
    return value


def _updated_filter(raw: str) -> UpdatedFilter | None:
    """`gt:<ts>`, `lt:<ts>` or `<ts>`, whole seconds with `Z` or an offset; else None."""
    op: Literal["gt", "lt", "on"] = "on"
    text = raw
    if raw.startswith("gt:"):
        op, text = "gt", raw[3:]
    elif raw.startswith("lt:"):
        op, text = "lt", raw[3:]
    if not _TIMESTAMP.fullmatch(text):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return UpdatedFilter(op, moment.astimezone(UTC))


def _error(status: int, key: str, message: str, **headers: str) -> _Reply:
    body = json.dumps({"key": key, "message": message}).encode()
    return _Reply(status, body, headers=tuple(headers.items()))


def _status_reply(status: int, retry_after: float | None) -> _Reply:
    if status == 502:
        return _Reply(502, _BAD_GATEWAY_PAGE, "text/html")
    key, message = _STATUS_ERRORS.get(status, ("error", f"Simulated failure {status}."))
    if status in (429, 503) and retry_after is not None:
        seconds = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
        return _error(status, key, message, **{"retry-after": seconds})
    return _error(status, key, message)


def _fault_reply(fault: Fault) -> _Reply:
    if fault.kind == "malformed":
        return _Reply(200, b'[{"id":1,"email":"broken@example.com",]')
    if fault.kind == "wrong_content_type":
        return _Reply(200, _MAINTENANCE_PAGE, "text/html; charset=utf-8")
    return _status_reply(int(fault.kind), fault.retry_after)


def _distort(reply: _Reply, kind: str) -> _Reply:
    """The body that would have been served, cut in half or wrapped in an object, as a 200."""
    if kind == "truncated":
        return _Reply(200, reply.body[: max(1, len(reply.body) // 2)])
    return _Reply(200, b'{"data":' + reply.body + b"}")


async def _send_reply(send: Send, reply: _Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
        *((name.encode(), value.encode()) for name, value in reply.headers),
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _send_reset(send: Send) -> None:
    """Headers promising more body than is sent, then a dropped connection: a transport error."""
    _EXPECTED_RESET.set(True)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"65536")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send(
        {"type": "http.response.body", "body": b'[{"id":1,"created_at":"2025-', "more_body": True}
    )
