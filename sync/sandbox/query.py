"""Reading a request: the bearer token and the query parameters, checked as documented."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sync.sandbox.data import UpdatedFilter

__all__ = ["INVALID_DATA", "Query", "bearer_token", "parse_query"]

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:Z|[+-]\d{2}:\d{2})")
_INTEGER = re.compile(r"-?\d{1,18}")
INVALID_DATA = "You provided invalid data. Check 'failures' for details."
_TIMESTAMP_RULE = (
    "must be YYYY-MM-DDTHH:MM:SS followed by Z or +HH:MM/-HH:MM, optionally prefixed by gt: or lt:"
)


@dataclass(frozen=True, slots=True)
class Query:
    limit: int
    offset: int
    client_id: int | None
    updated: UpdatedFilter | None


def bearer_token(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def parse_query(
    params: dict[str, str], *, max_offset: int | None = None
) -> Query | list[dict[str, str]]:
    """The validated query, or every failure in the documented `failures` shape.

    `max_offset` refuses larger offsets, as servers that bound deep paging do.
    """
    failures: list[dict[str, str]] = []
    limit = _integer(params, "limit", default=100, low=1, high=100, failures=failures)
    offset = _integer(params, "offset", default=0, low=0, high=None, failures=failures)
    if offset is not None and max_offset is not None and offset > max_offset:
        failures.append(
            {"field": "offset", "message": f"must be less than or equal to {max_offset}"}
        )
    client_id = _integer(params, "client_id", default=None, low=1, high=None, failures=failures)
    updated = None
    if "updated_at" in params:
        updated = _updated_filter(params["updated_at"])
        if updated is None:
            failures.append({"field": "updated_at", "message": _TIMESTAMP_RULE})
    if failures or limit is None or offset is None:
        return failures
    return Query(limit, offset, client_id, updated)


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
