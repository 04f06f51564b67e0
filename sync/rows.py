"""Upstream contact objects -> validated, UTC-normalised rows, or rejections with a reason.

Kept apart from the HTTP client so that the rules for a good row live in one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import Annotated, Any, NamedTuple, cast

import msgspec

__all__ = [
    "CONTACT_FIELDS",
    "TEXT_FIELDS",
    "ContactRow",
    "ParsedPage",
    "RejectedRow",
    "RowKey",
    "decode_usual_page",
    "parse_items",
    "parse_timestamp",
]

TEXT_FIELDS = (
    "email",
    "name",
    "surname",
    "role",
    "notes",
    "linkedin",
    "description",
    "telephone",
)
CONTACT_FIELDS = ("id", "created_at", "updated_at", "client_id", *TEXT_FIELDS)
_KNOWN = frozenset(CONTACT_FIELDS)
_MAX_BIGINT = 2**63 - 1
"""Ids are bigint in the mirror; a larger one could never be stored."""

RowKey = tuple[int, datetime]
"""(id, updated_at): equal keys mean the same, unchanged row; paging aligns on them."""


class ContactRow(NamedTuple):
    """A valid contact, times in UTC; a named tuple because pages build a hundred at a time."""

    id: int
    updated_at: datetime
    created_at: datetime | None
    client_id: int | None
    email: str | None
    name: str | None
    surname: str | None
    role: str | None
    notes: str | None
    linkedin: str | None
    description: str | None
    telephone: str | None
    extra: dict[str, Any] | None

    @property
    def key(self) -> RowKey:
        return (self.id, self.updated_at)


_new_row = partial(tuple.__new__, ContactRow)
"""`ContactRow._make` without its Python frame: pages build rows a hundred at a time."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """An item that cannot be stored; it goes to quarantine with its reason."""

    payload: Any
    reason: str
    contact_id: int | None

    @property
    def identity(self) -> bytes:
        """What was served, as a digest: the same broken item again has the same one."""
        text = repr(self.payload).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(text, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class ParsedPage:
    rows: list[ContactRow]
    rejected: list[RejectedRow]
    keys: list[RowKey | None]
    """One entry per item served, in order; None where the item was rejected."""

    def broken_items(self) -> dict[int, bytes]:
        """Positions of the items that could not be parsed -> their identities."""
        if not self.rejected:
            return {}
        positions = [i for i, key in enumerate(self.keys) if key is None]
        return {
            position: rejected.identity
            for position, rejected in zip(positions, self.rejected, strict=True)
        }


class _Invalid(ValueError):
    pass


def parse_timestamp(value: object) -> datetime:
    """An ISO-8601 timestamp with any offset (or none: taken as UTC) -> aware UTC datetime."""
    if not isinstance(value, str):
        raise _Invalid("is not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(f"is not an ISO-8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise _Invalid(f"is out of range in UTC: {value[:40]!r}") from None


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("is not an integer")
    if value < 1:
        raise _Invalid("is less than 1")
    if value > _MAX_BIGINT:
        raise _Invalid("is larger than a 64-bit integer")
    return value


def _field(name: str, check: Any, value: object) -> Any:
    try:
        return check(value)
    except _Invalid as exc:
        raise _Invalid(f"{name} {exc}") from None


def _text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{name} is not a string")
    if "\x00" in value:
        raise _Invalid(f"{name} contains a NUL character, which SQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{name} contains an unpaired UTF-16 surrogate") from None
    return value


def _parse_item(item: object) -> ContactRow:
    if not isinstance(item, dict):
        raise _Invalid("item is not a JSON object")
    if "id" not in item or item["id"] is None:
        raise _Invalid("id is missing")
    if "updated_at" not in item or item["updated_at"] is None:
        raise _Invalid("updated_at is missing")
    created = item.get("created_at")
    client_id = item.get("client_id")
    extra = {k: v for k, v in item.items() if k not in _KNOWN} or None
    return ContactRow(
        id=_field("id", _positive_int, item["id"]),
        updated_at=_field("updated_at", parse_timestamp, item["updated_at"]),
        created_at=None if created is None else _field("created_at", parse_timestamp, created),
        client_id=None if client_id is None else _field("client_id", _positive_int, client_id),
        email=_text("email", item.get("email")),
        name=_text("name", item.get("name")),
        surname=_text("surname", item.get("surname")),
        role=_text("role", item.get("role")),
        notes=_text("notes", item.get("notes")),
        linkedin=_text("linkedin", item.get("linkedin")),
        description=_text("description", item.get("description")),
        telephone=_text("telephone", item.get("telephone")),
        extra=extra,
    )


def _utc_or_none(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is UTC:
            return parsed
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _parse_well_formed(item: object) -> ContactRow | None:
    """The common, valid item in as few steps as possible; None leaves it to `_parse_item`.

    Parsing is on the hot path of every page, so exact type checks replace the per-field
    helpers here; anything unusual goes the careful way, which also words the reason.
    """
    if type(item) is not dict:
        return None
    get = item.get
    contact_id = get("id")
    stamp = get("updated_at")
    if type(contact_id) is not int or not 0 < contact_id <= _MAX_BIGINT or type(stamp) is not str:
        return None
    client_id = get("client_id")
    if client_id is not None and (type(client_id) is not int or not 0 < client_id <= _MAX_BIGINT):
        return None
    texts = tuple(map(get, TEXT_FIELDS))
    for value in texts:
        if value is not None and type(value) is not str:
            return None
    updated_at = _utc_or_none(stamp)
    if updated_at is None:
        return None
    created = get("created_at")
    created_at = None
    if created is not None:
        created_at = _utc_or_none(created) if type(created) is str else None
        if created_at is None:
            return None
    extra = None if item.keys() <= _KNOWN else {k: v for k, v in item.items() if k not in _KNOWN}
    return _new_row((contact_id, updated_at, created_at, client_id, *texts, extra))


def _raw_id(item: object) -> int | None:
    if isinstance(item, dict):
        value = item.get("id")
        # Only what a bigint column holds: a larger id is kept in the payload, not as a key.
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_BIGINT:
            return value
    return None


_Id = Annotated[int, msgspec.Meta(ge=1, le=_MAX_BIGINT)]
_UsualItem = msgspec.defstruct(
    "_UsualItem",
    [
        ("id", _Id),
        ("updated_at", str),
        ("created_at", str | None),
        ("client_id", _Id | None),
        *((name, str | None) for name in TEXT_FIELDS),
    ],
    forbid_unknown_fields=True,
)
"""An item with every documented field and no other, each of its usual type: in ContactRow's
order, so that a page's items transpose straight into its columns."""
_USUAL_PAGE = msgspec.json.Decoder(list[_UsualItem])  # type: ignore[valid-type]
_fromisoformat = datetime.fromisoformat
_tzinfo_of = attrgetter("tzinfo")


def decode_usual_page(body: bytes) -> ParsedPage | None:
    """The usual page straight from the response body; None when anything in it is unusual
    (a missing or unknown field, a type or value out of the ordinary, a time without an
    offset), which leaves the page to `parse_items`, the path that also says what is wrong.

    msgspec checks the shape and types while it decodes, in C: a third less time than decoding
    to dicts and checking them in Python, on the path of every page.
    """
    try:
        items = _USUAL_PAGE.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError):  # the latter: bytes that are not UTF-8
        return None
    if not items:
        return None
    ids, stamps, created_stamps, client_ids, *texts = zip(*map(_as_tuple, items), strict=True)
    updated = _utc_column(stamps)
    created = _utc_column_with_nulls(created_stamps)
    if updated is None or created is None:
        return None
    rows = list(
        map(_new_row, zip(ids, updated, created, client_ids, *texts, repeat(None), strict=False))
    )
    keys: list[RowKey | None] = list(zip(ids, updated, strict=True))
    if len(set(ids)) != len(ids):
        rows = list(_newest_by_id(rows).values())
    return ParsedPage(rows=rows, rejected=[], keys=keys)


_as_tuple = msgspec.structs.astuple


def _utc_column_with_nulls(stamps: Sequence[str | None]) -> list[datetime | None] | None:
    if None not in stamps:
        return cast("list[datetime | None] | None", _utc_column(cast("Sequence[str]", stamps)))
    present = [stamp for stamp in stamps if stamp is not None]
    parsed = _utc_column(present) if present else []
    if parsed is None:
        return None
    found = iter(parsed)
    return [None if stamp is None else next(found) for stamp in stamps]


def _utc_column(stamps: Sequence[str]) -> list[datetime] | None:
    """ISO-8601 strings with an offset -> aware UTC datetimes; None if any is not one."""
    try:
        parsed = list(map(_fromisoformat, stamps))
    except ValueError:
        return None
    zones = set(map(_tzinfo_of, parsed))
    if zones == {UTC}:
        return parsed
    if None in zones:
        return None
    try:
        return [moment if moment.tzinfo is UTC else moment.astimezone(UTC) for moment in parsed]
    except OverflowError:
        return None


def _newest_by_id(rows: Sequence[ContactRow]) -> dict[int, ContactRow]:
    newest: dict[int, ContactRow] = {}
    for row in rows:
        seen = newest.get(row.id)
        if seen is None or seen.updated_at <= row.updated_at:
            newest[row.id] = row
    return newest


def parse_items(items: Sequence[object], *, careful: bool = False) -> ParsedPage:
    """Validate a page's items one by one, with the reason for every item rejected; a
    duplicate id within the page keeps its newest version.

    `careful` also checks every string for what SQL text cannot hold (NUL, lone surrogates);
    the client asks for it when the raw body contains such escapes.
    """
    fast = _parse_item if careful else _parse_well_formed
    newest: dict[int, ContactRow] = {}
    rejected: list[RejectedRow] = []
    keys: list[RowKey | None] = []
    for item in items:
        try:
            row = fast(item) or _parse_item(item)
        except _Invalid as exc:
            rejected.append(RejectedRow(payload=item, reason=str(exc), contact_id=_raw_id(item)))
            keys.append(None)
            continue
        keys.append(row.key)
        seen = newest.get(row.id)
        if seen is None or seen.updated_at <= row.updated_at:
            newest[row.id] = row
    return ParsedPage(rows=list(newest.values()), rejected=rejected, keys=keys)
