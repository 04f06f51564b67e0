"""The answers the sandbox sends, well-formed or faulty, and how they go on the wire."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import Send

from sync.sandbox.faults import Fault

__all__ = [
    "EXPECTED_RESET",
    "RESET_LOG_FILTER",
    "SAMPLE_ROW",
    "Reply",
    "distort",
    "error_reply",
    "fault_reply",
    "send_reply",
    "send_reset",
    "status_reply",
]

SAMPLE_ROW = (
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
    408: ("request_timeout", "The server timed out waiting for the request."),
    412: ("precondition_failure", "The company is not available right now."),
    425: (
        "too_early",
        "The server is unwilling to risk processing a request that might be replayed.",
    ),
    429: ("too_many_requests", "Too many requests; slow down and retry later."),
    500: ("internal_error", "Something went wrong on our side."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
}

EXPECTED_RESET: ContextVar[bool] = ContextVar("sandbox_expected_reset", default=False)


class _ExpectedResetFilter(logging.Filter):
    """Hides uvicorn's error line for a connection the sandbox drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            EXPECTED_RESET.get()
            and str(record.msg).startswith("ASGI callable returned without completing")
        )


RESET_LOG_FILTER = _ExpectedResetFilter()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    items: int | None = None


def error_reply(status: int, key: str, message: str, **headers: str) -> Reply:
    body = json.dumps({"key": key, "message": message}).encode()
    return Reply(status, body, headers=tuple(headers.items()))


def status_reply(status: int, retry_after: float | None) -> Reply:
    if status == 502:
        return Reply(502, _BAD_GATEWAY_PAGE, "text/html")
    key, message = _STATUS_ERRORS.get(status, ("error", f"Simulated failure {status}."))
    if status in (429, 503) and retry_after is not None:
        seconds = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
        return error_reply(status, key, message, **{"retry-after": seconds})
    return error_reply(status, key, message)


def fault_reply(fault: Fault) -> Reply:
    if fault.kind == "malformed":
        return Reply(200, b'[{"id":1,"email":"broken@example.com",]')
    if fault.kind == "wrong_content_type":
        return Reply(200, _MAINTENANCE_PAGE, "text/html; charset=utf-8")
    return status_reply(int(fault.kind), fault.retry_after)


def distort(reply: Reply, kind: str) -> Reply:
    """The body that would have been served, cut in half or wrapped in an object, as a 200."""
    if kind == "truncated":
        return Reply(200, reply.body[: max(1, len(reply.body) // 2)])
    return Reply(200, b'{"data":' + reply.body + b"}")


async def send_reply(send: Send, reply: Reply, *, length: int | None = None) -> None:
    """The whole reply; a `length` beyond its body promises more body to follow."""
    size = len(reply.body) if length is None else length
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(size).encode()),
        *((name.encode(), value.encode()) for name, value in reply.headers),
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send(
        {"type": "http.response.body", "body": reply.body, "more_body": size > len(reply.body)}
    )


async def send_reset(send: Send) -> None:
    """Headers promising more body than is sent, then a dropped connection: a transport error."""
    EXPECTED_RESET.set(True)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"65536")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send(
        {"type": "http.response.body", "body": b'[{"id":1,"created_at":"2025-', "more_body": True}
    )
