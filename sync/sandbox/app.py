"""The endpoint as an ASGI app: checks a request as documented, then answers it or a fault."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from sync.sandbox.config import CONTACTS_PATH, SandboxConfig
from sync.sandbox.data import SandboxData
from sync.sandbox.faults import Fault, Faults
from sync.sandbox.mutator import Mutator
from sync.sandbox.query import INVALID_DATA, bearer_token, parse_query
from sync.sandbox.ratelimit import WindowLimit
from sync.sandbox.replies import (
    EXPECTED_RESET,
    SAMPLE_ROW,
    Reply,
    distort,
    error_reply,
    fault_reply,
    send_reply,
    send_reset,
    status_reply,
)
from sync.sandbox.requests import RecordedRequest, RequestLog

__all__ = ["SandboxApi", "create_app"]

_STREAM_CHUNK = 1024 * 1024
_PAUSE_STEP = 0.05


class SandboxApi:
    """The endpoint as a raw ASGI app, with the switches a test flips while it serves."""

    def __init__(self, data: SandboxData, config: SandboxConfig | None = None) -> None:
        self.data = data
        self.config = config or SandboxConfig()
        self.faults = Faults(self.config.latency_ms)
        self.log = RequestLog(self.config.request_log_size)
        self.mutator = Mutator(data)
        self.limit = None
        if self.config.rate_limit is not None:
            self.limit = WindowLimit(
                self.config.rate_limit, self.config.rate_window_s, self.config.rate_headers
            )
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
        send = self._dated(send)
        arrived = time.monotonic()
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        query = scope["query_string"].decode("latin-1")
        params = dict(parse_qsl(query, keep_blank_values=True))
        company = headers.get(self._company_header)
        admitted, quota = (True, ()) if self.limit is None else self.limit.admit()
        if self.faults.latency_ms > 0:
            await self._pause(self.faults.latency_ms / 1000)
        failing = self.faults.company_failure(company) if admitted else None
        fault = None if failing is not None or not admitted else self.faults.take(company)
        label: str | None = fault.kind if fault else None
        if failing is not None:
            label = "fail_company"
        streamed = fault is not None and fault.kind in ("reset", "huge")
        reply = None
        if not admitted:
            label, reply = "rate_limit", status_reply(429, None)
        elif not streamed:
            reply = await self._reply(
                scope["method"], headers, params, company, failing=failing, fault=fault
            )
        if reply is not None and quota:
            reply = replace(reply, headers=reply.headers + quota)
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
                items=reply.items
                if reply is not None and label in (None, "stall", "short")
                else None,
                fault=label,
                at=arrived,
            )
        )
        if reply is not None and fault is not None and fault.kind == "trickle":
            await self._send_trickle(send, receive, reply, fault.seconds)
        elif reply is not None:
            await send_reply(send, reply)
        elif fault is not None and fault.kind == "reset":
            await send_reset(send)
        elif fault is not None:
            await self._send_huge(send, fault)

    def _dated(self, send: Send) -> Send:
        """Every answer's Date header reads the sandbox clock, the one its rows are stamped
        by: a real server's two agree, and a test that moves the clock moves both."""

        async def dated(message: Message) -> None:
            if message["type"] == "http.response.start":
                moment = formatdate(self.data.now().timestamp(), usegmt=True)
                message = {**message, "headers": [*message["headers"], (b"date", moment.encode())]}
            await send(message)

        return dated

    async def _reply(
        self,
        method: str,
        headers: dict[str, str],
        params: dict[str, str],
        company: str | None,
        *,
        failing: int | None,
        fault: Fault | None,
    ) -> Reply:
        if failing is not None:
            return status_reply(failing, None)
        if fault is None:
            return self._answer(method, headers, params, company)
        if fault.kind == "stall":
            await self._pause(fault.seconds)
            return self._answer(method, headers, params, company)
        if fault.kind in ("short", "trickle"):
            return self._answer(method, headers, params, company, short=fault.kind == "short")
        if fault.kind in ("truncated", "not_array"):
            return distort(self._answer(method, headers, params, company), fault.kind)
        return fault_reply(fault)

    def _answer(
        self,
        method: str,
        headers: dict[str, str],
        params: dict[str, str],
        company: str | None,
        *,
        short: bool = False,
    ) -> Reply:
        """The documented behaviour: 401, 403, 412 and 400 checks, then a page.

        `short` drops the page's second half of items, as a server trimming its answer does.
        """
        allowed = self._allowed_company(method, headers, company)
        if isinstance(allowed, Reply):
            return allowed
        config = self.config
        rejecting = config.max_offset if config.offset_mode == "reject" else None
        query = parse_query(params, max_offset=rejecting)
        if isinstance(query, list):
            body = {"key": "invalid_data", "message": INVALID_DATA, "failures": query}
            return Reply(400, json.dumps(body).encode())
        offset, limit = query.offset, query.limit
        if config.max_offset is not None:
            offset = min(offset, config.max_offset)
        if config.page_cap is not None:
            limit = min(limit, config.page_cap)
        self.mutator.before_page(allowed)
        items = self.data.page_items(
            allowed,
            updated=query.updated,
            client_id=query.client_id,
            order=config.order,
            offset=offset,
            limit=limit,
            tie_order=config.tie_order,
        )
        if short:
            items = items[: (len(items) + 1) // 2]
        return Reply(200, b"[" + b",".join(items) + b"]", items=len(items))

    def _allowed_company(
        self, method: str, headers: dict[str, str], company: str | None
    ) -> str | Reply:
        """The company when method, token, company and version pass; else the refusal."""
        config = self.config
        if method not in ("GET", "HEAD"):
            return error_reply(405, "method_not_allowed", "Only GET is allowed.", allow="GET")
        token = bearer_token(headers.get("authorization"))
        if token is None:
            return error_reply(401, "unauthorized", "Send Authorization: Bearer <token>.")
        if token not in config.tokens and token not in config.tokens_without_view:
            return error_reply(401, "unauthorized", "The token is not valid.")
        if token in config.tokens_without_view:
            return error_reply(403, "forbidden", "The token lacks the crm.view permission.")
        if not company:
            return error_reply(
                412, "precondition_failure", f"The {config.company_header} header is required."
            )
        if company in config.forbidden_companies:
            return error_reply(
                403, "forbidden", f"The token may not access company {company[:40]}."
            )
        if not self.data.has_company(company):
            return error_reply(
                412, "precondition_failure", f"Company {company[:40]} does not exist."
            )
        version = headers.get(self._version_header)
        if version is None and config.require_version:
            return error_reply(
                412, "precondition_failure", f"The {config.version_header} header is required."
            )
        if version is not None and version not in config.accepted_versions:
            return error_reply(
                412, "precondition_failure", f"API version {version[:40]!r} is not supported."
            )
        return company

    async def _pause(self, seconds: float, gone: asyncio.Event | None = None) -> None:
        """Sleep without blocking other requests, cut short when the server stops (or `gone`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.closing.is_set() and not (gone is not None and gone.is_set()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _PAUSE_STEP))

    async def _send_trickle(self, send: Send, receive: Receive, reply: Reply, pause: float) -> None:
        """Status and headers at once, then the body a byte per `pause` seconds.

        It stops when the server stops or the client hangs up, leaving the body unfinished.
        """
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await send_reply(send, replace(reply, body=reply.body[:1]), length=len(reply.body))
            for index in range(1, len(reply.body)):
                await self._pause(pause, gone)
                if self.closing.is_set() or gone.is_set():
                    EXPECTED_RESET.set(True)
                    return
                await send(
                    {
                        "type": "http.response.body",
                        "body": reply.body[index : index + 1],
                        "more_body": index < len(reply.body) - 1,
                    }
                )
        finally:
            watcher.cancel()

    async def _send_huge(self, send: Send, fault: Fault) -> None:
        """A valid JSON array of exactly `fault.size` bytes, streamed in 1 MiB chunks."""
        unit = b"," + SAMPLE_ROW
        head = b"[" + SAMPLE_ROW if fault.size >= len(SAMPLE_ROW) + 2 else b"["
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
                EXPECTED_RESET.set(True)
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
