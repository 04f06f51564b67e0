"""ContactsClient: builds `GET /api/contacts` requests, turns answers into pages or typed errors."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson

from sync import __version__
from sync.budget import RequestBudget
from sync.config import ApiSettings
from sync.errors import (
    MalformedResponse,
    RateLimited,
    RequestRejected,
    TransportFailure,
    UpstreamError,
)
from sync.retry import RetryPolicy
from sync.rows import ParsedPage, decode_usual_page, parse_items
from sync.stoppable import StoppableTransport, deadline

__all__ = ["MAX_BODY_BYTES", "ContactsClient", "Page", "format_filter_time"]

MAX_BODY_BYTES = 16 * 1024 * 1024
"""A 100-row page is a few hundred KiB at most; anything far larger is refused, not buffered."""

CONTACTS_PATH = "/api/contacts"
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
"""JSON escapes for NUL or a surrogate: only then are a page's strings checked one by one."""
_DIGITS_AS_ZERO = bytes(48 if byte in b"0123456789" else 32 for byte in range(256))
"""Every digit to `0`, anything else to a space: a run of 20 zeros is then a 20-digit number."""
_TWENTY_DIGITS = b"0" * 20


def format_filter_time(moment: datetime) -> str:
    """The documented filter format: UTC, whole seconds, `Z` (so no `+` ever needs encoding)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Page:
    offset: int
    limit: int
    parsed: ParsedPage
    date: str | None = None
    """The response's Date header, parsed only when asked for (`server_time`)."""

    @property
    def server_time(self) -> datetime | None:
        """The upstream clock when it answered, used to bound the cursor."""
        if not self.date:
            return None
        try:
            return parsedate_to_datetime(self.date).astimezone(UTC)
        except (TypeError, ValueError):
            return None

    @property
    def size(self) -> int:
        """How many items were served, valid or not; fewer than `limit` ends a pass."""
        return len(self.parsed.keys)


class ContactsClient:
    """One company-agnostic HTTP client; thread-safe, so pages may be fetched concurrently."""

    def __init__(
        self,
        settings: ApiSettings,
        token: str,
        retry: RetryPolicy,
        *,
        transport: httpx.BaseTransport | None = None,
        budget: RequestBudget | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """`budget` paces every attempt (none: no pacing); `stop` ends a wait for it at once."""
        self._settings = settings
        self._retry = retry
        self._budget = budget
        self._stop = stop
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": f"contacts-sync/{__version__}",
        }
        if settings.api_version:
            headers[settings.version_header] = settings.api_version
        timeout = httpx.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s))
        if transport is None:
            ca_bundle = settings.ca_bundle
            transport = StoppableTransport(
                max_connections=max(4, settings.concurrency * 2),
                ca_bundle=str(ca_bundle) if ca_bundle is not None else None,
            )
        self._http = httpx.Client(
            base_url=settings.base_url,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )
        # Every request goes to one URL with a fresh query: given as one string, httpx parses
        # it once instead of three times (base join, params merge), a third of building it.
        self._contacts_url = str(self._http.base_url).rstrip("/") + CONTACTS_PATH

    def __enter__(self) -> ContactsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def fetch_page(
        self,
        company_id: str,
        *,
        offset: int,
        limit: int,
        updated_after: datetime | None,
        updated_before: datetime | None = None,
        abandoned: threading.Event | None = None,
        retried: list[str] | None = None,
    ) -> Page:
        """One page, retried per the policy; raises a typed error when it cannot be had.
        Once `abandoned` is set, retrying stops: nobody waits for the page any more. Retry
        reasons are appended to `retried`, if given.

        The endpoint takes one `updated_at` filter: `gt:` (after) or `lt:` (before).
        """
        params: dict[str, str | int] = {"limit": limit, "offset": offset}
        if updated_after is not None and updated_before is not None:
            raise ValueError("the endpoint takes one updated_at filter, not two")
        if updated_after is not None:
            params["updated_at"] = f"gt:{format_filter_time(updated_after)}"
        elif updated_before is not None:
            params["updated_at"] = f"lt:{format_filter_time(updated_before)}"
        if self._settings.client_id is not None:
            params["client_id"] = self._settings.client_id
        headers = {self._settings.company_header: company_id}
        give_up_at = time.monotonic() + self._retry.max_elapsed_s

        def attempt() -> Page:
            # Waited for before the deadline starts: queueing for the budget is not upstream
            # being slow, so it never counts against api.timeout_s.
            if self._budget is None:
                return self._get_page(params, headers, offset, limit, 0)
            turn = self._budget.turn(give_up_at=give_up_at, abandoned=abandoned, stop=self._stop)
            with turn as ticket:
                return self._get_page(params, headers, offset, limit, ticket)

        return self._retry.call(attempt, abandoned=abandoned, retried=retried)

    def _get_page(
        self,
        params: dict[str, str | int],
        headers: dict[str, str],
        offset: int,
        limit: int,
        ticket: int,
    ) -> Page:
        # httpx's timeouts are per socket read, which a trickling server resets for ever: the
        # deadline bounds the whole answer, headers and body, so a pass always ends.
        try:
            url = f"{self._contacts_url}?{urlencode(params)}"
            with (
                deadline(self._settings.timeout_s),
                self._http.stream("GET", url, headers=headers) as resp,
            ):
                if self._budget is not None:
                    self._budget.observe(resp.headers, ticket=ticket)
                if resp.status_code != 200:
                    resp.read()
                    error = _non_200_error(resp)
                    if isinstance(error, RateLimited) and self._budget is not None:
                        self._budget.rate_limited(error.retry_after, ticket=ticket)
                    raise error
                body = _read_capped(resp)
                _require_json(resp)
                date = resp.headers.get("date")
        except httpx.TimeoutException:
            raise TransportFailure(
                f"The API did not send its whole answer within {self._settings.timeout_s:g} s; "
                "check the network or raise api.timeout_s."
            ) from None
        except httpx.TransportError as exc:
            raise TransportFailure(
                f"The connection to the API failed ({type(exc).__name__}); "
                "check api.base_url and the network."
            ) from None
        careful = _UNSTORABLE_ESCAPE.search(body) is not None
        parsed = None if careful else decode_usual_page(body)
        if parsed is None:
            parsed = parse_items(_decode_items(body), careful=careful)
        return Page(offset=offset, limit=limit, parsed=parsed, date=date)


def _finite(value: Any) -> Any:
    """NaN and +-Infinity become null, as JavaScript's JSON.stringify writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _non_200_error(response: httpx.Response) -> UpstreamError:
    if response.is_redirect:
        return RequestRejected(
            f"The API answered with a redirect ({response.status_code}), which is never "
            "followed so the token cannot leak; set api.base_url to the final address.",
            status=response.status_code,
        )
    return UpstreamError.from_response(response)


def _read_capped(response: httpx.Response) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise MalformedResponse(_too_large())
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_bytes():
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            raise MalformedResponse(_too_large())
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> str:
    return (
        f"The API sent a page larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; "
        "check api.base_url points at the contacts API."
    )


def _require_json(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise MalformedResponse(
            f"The API answered 200 with content type {media or 'none'} instead of JSON; "
            "check api.base_url points at the contacts API."
        )


def _decode_items(body: bytes) -> list[Any]:
    try:
        items = _loads(body)
    except ValueError:
        raise MalformedResponse(
            "The API answered 200 with a body that is not valid JSON; "
            "run again later, and report it upstream if it persists."
        ) from None
    if not isinstance(items, list):
        raise MalformedResponse(
            f"The API answered 200 with a JSON {type(items).__name__} instead of a list; "
            "check api.base_url points at the contacts API."
        )
    return items


def _loads(body: bytes) -> Any:
    """orjson for speed; the standard library wherever the two could differ.

    orjson reads integers of 20 digits or more as floats and refuses NaN, Infinity and lone
    surrogates, all of which the rows' validation must see as json.loads gives them; NaN and
    Infinity, which no JSON column can hold (PostgreSQL refuses them), then become null.
    """
    # A translated copy and a substring search: ten times faster than a regex for \d{20}.
    if _TWENTY_DIGITS not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return _finite(json.loads(body))
