"""The sandbox's contacts: deterministic generation, thread-safe mutations, and served pages.

Kept apart from the HTTP side so that tests can drive and inspect the data directly, and so
that the page cache (the reason the sandbox is fast) lives next to the data it must track.
"""

from __future__ import annotations

import json
import random
import threading
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, timezone
from itertools import permutations
from json.encoder import encode_basestring as _quote
from typing import Any, Literal, TypeVar

from sync.rows import TEXT_FIELDS
from sync.sandbox.ordering import TieIndex, TieOrder

__all__ = ["CLIENT_IDS", "MAX_LENGTHS", "ORDERS", "Order", "SandboxData", "UpdatedFilter"]

Order = Literal["id", "updated_asc", "updated_desc"]
ORDERS: tuple[Order, ...] = ("id", "updated_asc", "updated_desc")

MAX_LENGTHS = {
    "email": 150,
    "name": 100,
    "surname": 100,
    "role": 75,
    "linkedin": 250,
    "telephone": 100,
}
"""The documented string limits; the generator puts some values exactly at them."""

CLIENT_IDS = range(1, 21)
_T = TypeVar("_T")

_MS = timedelta(milliseconds=1)
_DAY = timedelta(days=1)
_HISTORY_MS = 730 * 86_400_000
_SETTLE = timedelta(minutes=1)
_BIG_TIE = 150
_MAX_CACHED_VIEWS = 64

_RENDER_ZONES = tuple(
    timezone(timedelta(minutes=m)) for m in (120, -330, 345, -180, 540, 0, 840, -720, 60)
)
"""Offsets some rows are rendered in; 0 renders as `+00:00`, unlike the usual `Z`."""

_FIRST_NAMES = (
    "Ana", "José", "Zoë", "François", "Łukasz", "Søren", "Chloé", "Miguel", "Mei", "Hiroshi",
    "Olga", "Ngozi", "Aarav", "Émilie", "Jürgen", "María José", "Δημήτρης", "Иван", "محمد",
    "王芳", "佐藤 花子", "지민", "Renée 🌸", "Siobhán", "Þóra", "Nguyễn Văn", "Jean-Luc",
)  # fmt: skip
_SURNAMES = (
    "García", "Müller", "Nguyễn", "O'Connor", "Kowalski", "Ødegård", "田中", "김", "Smith-Jones",
    "van der Berg", "D'Angelo", "Šimková", "Çelik", "Papadopoulos", "Fernández López",
    "Ibáñez", "山田", "Schröder", "Lefèvre", "Ó Briain", "Wójcik 🚀", "Андреев",
)  # fmt: skip
_ROLES = (
    "CTO", "Head of Sales", "Ingénieure système", "営業部長", "Product Owner 🚀",
    "Account Executive", "Directora de Compras", "Geschäftsführer", "Buyer", "Intern",
)  # fmt: skip
_NOTES = (
    'Met at the "Expo" fair.\nPrefers email.',
    "Backslash \\ and tab\there; path C:\\temp\\new",
    "Emoji 🎉👍 and CJK 你好世界",
    "Call after 17:00 CET; <b>not</b> HTML",
    "Renewal due Q3 — discount 15%",
    "",
    "Línea uno\r\nLínea dos",
    "Unicode escapes look like \\u00e9 but are literal",
)
_DESCRIPTIONS = (
    "A brief description of the client.",
    "Mid-size distributor of industrial parts, three sites in the EU.",
    "長期的な取引先。年二回の訪問。",
    "Startup 🚀 scaling fast; watch the budget cycle.",
    'Family business since 1952. Quote: "quality first".',
)
_DOMAINS = ("example.com", "example.org", "correo.example.es", "bücher.example")
_PHONE_FORMATS = (
    "+34 6## ### ###", "(555) 01#-####", "+81-3-####-####", "0### ######",
    "+1 ###.###.#### ext. ##",
)  # fmt: skip

_TEXT_KEYS = tuple((f',"{name}":', name) for name in TEXT_FIELDS)


@dataclass(frozen=True, slots=True)
class UpdatedFilter:
    """The `updated_at` query filter: after, before, or on the UTC calendar date of `at`."""

    op: Literal["gt", "lt", "on"]
    at: datetime

    def bounds(self) -> tuple[datetime | None, datetime | None, bool]:
        """(low, high, low_inclusive): the half-open or open range of matching instants."""
        if self.op == "gt":
            return self.at, None, False
        if self.op == "lt":
            return None, self.at, False
        day = datetime.combine(self.at.astimezone(UTC).date(), time(), UTC)
        return day, day + _DAY, True


@dataclass(slots=True)
class _Contact:
    id: int
    created_at: datetime
    updated_at: datetime
    client_id: int
    text: dict[str, str | None]
    zone: timezone | None
    """The offset the row's timestamps are rendered in; None renders `Z`."""
    rendered: bytes = b""

    def render(self) -> None:
        """The served JSON object, keys in `CONTACT_FIELDS` order, built by hand for speed."""
        created = _render_timestamp(self.created_at, self.zone)
        updated = _render_timestamp(self.updated_at, self.zone)
        parts = [
            f'{{"id":{self.id},"created_at":"{created}","updated_at":"{updated}",'
            f'"client_id":{self.client_id}'
        ]
        for key, name in _TEXT_KEYS:
            value = self.text[name]
            parts.append(key)
            parts.append("null" if value is None else _quote(value))
        parts.append("}")
        self.rendered = "".join(parts).encode()


@dataclass(frozen=True, slots=True)
class _RawItem:
    """An item served verbatim (hostile-input tests); it sorts and filters as its keys say."""

    sort_id: int
    updated_at: datetime
    client_id: object
    unfiltered: bool
    seq: int
    rendered: bytes

    def matches(
        self, low: datetime | None, high: datetime | None, inclusive: bool, client_id: int | None
    ) -> bool:
        if self.unfiltered:
            return True
        after = low is None or low < self.updated_at or (inclusive and low == self.updated_at)
        before = high is None or self.updated_at < high
        return after and before and (client_id is None or self.client_id == client_id)


@dataclass(frozen=True, slots=True)
class _View:
    """One filtered, ordered list as rendered rows; `ties` is built once a tie order needs it."""

    items: list[bytes]
    ties: TieIndex | None


@dataclass(slots=True)
class _Company:
    rng: random.Random
    rows: dict[int, _Contact]
    """Always in ascending id order: ids are only ever appended, never reused."""
    stamps: list[tuple[datetime, int]]
    """(updated_at, id) of every live row, sorted: the updated_at orders and range filters."""
    next_id: int
    touched: dict[int, int] = field(default_factory=dict)
    views: dict[tuple[UpdatedFilter | None, int | None, Order], _View] = field(default_factory=dict)
    """Each filtered, ordered list served so far; cleared on any change."""
    raw: list[_RawItem] = field(default_factory=list)
    """Items put with `put_raw`, served among the generated rows; not part of `snapshot`."""


class SandboxData:
    """Per-company live contacts behind one lock; every change bumps a version for `mark()`."""

    def __init__(self, *, seed: int = 7, clock: Callable[[], datetime] | None = None) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._clock = clock or _utc_now
        self._companies: dict[str, _Company] = {}
        self._version = 0
        self._anchor = _whole_second(self._clock()) - _SETTLE
        self._last_stamp = self._anchor
        self._shuffler = random.Random()
        """Unseeded on purpose: the `per_request` tie order differs from run to run."""

    @classmethod
    def generate(
        cls,
        companies: Sequence[str] = ("1",),
        contacts: int = 1000,
        seed: int = 7,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> SandboxData:
        """Contacts 1..`contacts` per company; the same seed gives the same rows, bar the clock."""
        data = cls(seed=seed, clock=clock)
        for company in companies:
            data.add_company(company, contacts)
        return data

    def add_company(self, company: str, contacts: int = 0) -> None:
        """A new company with generated rows; its data depends on the seed and its id only."""
        rng = random.Random(f"{self._seed}:{company}")
        rows = _generate_rows(rng, contacts, self._anchor)
        with self._lock:
            if company in self._companies:
                raise ValueError(f"company {company} already exists")
            self._companies[company] = _Company(
                rng=rng,
                rows={row.id: row for row in rows},
                stamps=sorted((row.updated_at, row.id) for row in rows),
                next_id=contacts + 1,
            )

    def companies(self) -> list[str]:
        with self._lock:
            return list(self._companies)

    def has_company(self, company: str) -> bool:
        with self._lock:
            return company in self._companies

    def ids(self, company: str) -> set[int]:
        with self._lock:
            return set(self._company(company).rows)

    def get(self, company: str, contact_id: int) -> dict[str, Any] | None:
        """One contact exactly as served, or None when it does not exist."""
        with self._lock:
            row = self._company(company).rows.get(contact_id)
            rendered = None if row is None else row.rendered
        return None if rendered is None else _decode(rendered)

    def snapshot(self, company: str) -> list[dict[str, Any]]:
        """Every live contact exactly as served, by id."""
        with self._lock:
            rendered = [row.rendered for row in self._company(company).rows.values()]
        return [_decode(item) for item in rendered]

    def mark(self) -> int:
        """The current version; pass it to `touched_since` later."""
        with self._lock:
            return self._version

    def touched_since(self, company: str, mark: int) -> set[int]:
        """Ids updated, inserted or deleted after `mark` was taken."""
        with self._lock:
            touched = self._company(company).touched
            return {contact_id for contact_id, version in touched.items() if version > mark}

    def update(
        self,
        company: str,
        ids: Iterable[int] | None = None,
        count: int = 1,
        *,
        same_stamp: bool = False,
    ) -> list[int]:
        """Give `ids` (or `count` random rows) a fresh clock stamp and one changed field.

        Each row gets its own strictly later stamp unless `same_stamp` makes them one tie.
        """
        with self._lock:
            state = self._company(company)
            chosen = _choose(state, company, ids, count)
            version = self._bump(state)
            shared = self._tick() if same_stamp else None
            for contact_id in chosen:
                row = state.rows[contact_id]
                _unindex(state, row)
                row.updated_at = shared if shared is not None else self._tick()
                _change_field(state.rng, row, version)
                row.render()
                _index(state, row)
                state.touched[contact_id] = version
            return chosen

    def bulk_tie(self, company: str, count: int) -> list[int]:
        """A bulk edit: `count` random existing rows get one shared new updated_at (a tie group).

        Each row also changes a field, as `update` does; for a tie of new rows (a bulk import)
        use `insert(company, count, updated_at=...)`. Returns the ids, ascending.
        """
        if count < 2:
            raise ValueError("a tie group needs count >= 2")
        return sorted(self.update(company, count=count, same_stamp=True))

    def insert(self, company: str, count: int = 1, updated_at: datetime | None = None) -> list[int]:
        """Add `count` rows with new ids; a past `updated_at` simulates a row committed late."""
        if updated_at is not None and updated_at.tzinfo is None:
            raise ValueError("updated_at must be timezone-aware")
        with self._lock:
            state = self._company(company)
            version = self._bump(state)
            added: list[int] = []
            for _ in range(count):
                stamp = self._tick() if updated_at is None else _to_ms(updated_at)
                row = _make_contact(state.rng, state.next_id, stamp, stamp)
                row.render()
                state.next_id += 1
                state.rows[row.id] = row
                _index(state, row)
                state.touched[row.id] = version
                added.append(row.id)
            return added

    def delete(self, company: str, ids: Iterable[int] | None = None, count: int = 1) -> list[int]:
        """Remove `ids` (or `count` random rows); the endpoint simply stops listing them."""
        with self._lock:
            state = self._company(company)
            chosen = _choose(state, company, ids, count)
            version = self._bump(state)
            for contact_id in chosen:
                _unindex(state, state.rows.pop(contact_id))
                state.touched[contact_id] = version
            return chosen

    def put_raw(
        self,
        company: str,
        item: object,
        *,
        sort_id: int | None = None,
        updated_at: datetime | None = None,
        unfiltered: bool = False,
    ) -> int:
        """Serve `item` as it is (any JSON value, or `bytes` sent verbatim) in the company's list.

        It takes the place a contact with `sort_id` and `updated_at` would have in every server
        order and filter: by default its own `id` (else a fresh id) and its own `updated_at`
        (else the sandbox clock). `unfiltered` serves it whatever the filters say, as an
        upstream that ignores them would. Raw items are left out of `snapshot` and `ids`.
        Returns the id it sorts by.
        """
        rendered = item if isinstance(item, bytes) else json.dumps(item).encode()
        fields = item if isinstance(item, dict) else {}
        with self._lock:
            state = self._company(company)
            if sort_id is None:
                own = fields.get("id")
                own_ok = isinstance(own, int) and not isinstance(own, bool) and own > 0
                sort_id = own if own_ok and isinstance(own, int) else state.next_id
            state.next_id = max(state.next_id, sort_id + 1)
            stamp = updated_at if updated_at is not None else _parsed_stamp(fields)
            self._bump(state)
            state.raw.append(
                _RawItem(
                    sort_id=sort_id,
                    updated_at=stamp if stamp is not None else self._tick(),
                    client_id=fields.get("client_id"),
                    unfiltered=unfiltered,
                    seq=len(state.raw) + 1,
                    rendered=rendered,
                )
            )
            return sort_id

    def clear_raw(self, company: str) -> None:
        """Stop serving the company's raw items."""
        with self._lock:
            state = self._company(company)
            state.raw.clear()
            self._bump(state)

    def page_items(
        self,
        company: str,
        *,
        updated: UpdatedFilter | None,
        client_id: int | None,
        order: Order,
        offset: int,
        limit: int,
        tie_order: TieOrder = "stable",
    ) -> list[bytes]:
        """The rendered items of one page; `tie_order` applies to the updated_at orders only."""
        reorder = order != "id" and tie_order != "stable"
        with self._lock:
            state = self._company(company)
            key = (updated, client_id, order)
            view = state.views.get(key)
            if view is None or (reorder and view.ties is None):
                if len(state.views) >= _MAX_CACHED_VIEWS:
                    state.views.clear()
                view = _build_view(state, updated, client_id, order, with_ties=reorder)
                state.views[key] = view
            if view.ties is None or not reorder:
                return view.items[offset : offset + limit]
            return view.ties.page(view.items, offset, limit, tie_order, self._shuffler)

    def _company(self, company: str) -> _Company:
        try:
            return self._companies[company]
        except KeyError:
            raise KeyError(f"unknown company {company!r}") from None

    def _bump(self, state: _Company) -> int:
        self._version += 1
        state.views.clear()
        return self._version

    def now(self) -> datetime:
        """The sandbox clock, as a server's Date header tells it."""
        return self._clock()

    def _tick(self) -> datetime:
        """The sandbox clock: wall time to the millisecond, strictly later than the last stamp."""
        stamp = max(_to_ms(self._clock()), self._last_stamp + _MS)
        self._last_stamp = stamp
        return stamp


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _to_ms(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _whole_second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _decode(rendered: bytes) -> dict[str, Any]:
    item: dict[str, Any] = json.loads(rendered)
    return item


def _render_timestamp(moment: datetime, zone: timezone | None) -> str:
    """`2025-10-28T10:23:49.429Z`, or the same instant as `...12:23:49.429+02:00`."""
    if zone is None:
        return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
    return moment.astimezone(zone).isoformat(timespec="milliseconds")


def _choose(state: _Company, company: str, ids: Iterable[int] | None, count: int) -> list[int]:
    if ids is None:
        live = list(state.rows)
        return sorted(state.rng.sample(live, min(count, len(live))))
    chosen = list(dict.fromkeys(ids))
    missing = [contact_id for contact_id in chosen if contact_id not in state.rows]
    if missing:
        raise KeyError(f"company {company} has no contacts {missing}")
    return chosen


def _index(state: _Company, row: _Contact) -> None:
    key = (row.updated_at, row.id)
    state.stamps.insert(bisect_left(state.stamps, key), key)


def _unindex(state: _Company, row: _Contact) -> None:
    del state.stamps[bisect_left(state.stamps, (row.updated_at, row.id))]


def _build_view(
    state: _Company,
    updated: UpdatedFilter | None,
    client_id: int | None,
    order: Order,
    *,
    with_ties: bool,
) -> _View:
    low, high, low_inclusive = updated.bounds() if updated else (None, None, False)
    if order == "id":
        rows: Iterable[_Contact] = (
            row
            for row in state.rows.values()
            if (low is None or low < row.updated_at or (low_inclusive and low == row.updated_at))
            and (high is None or row.updated_at < high)
        )
    else:
        stamps = state.stamps
        start = 0
        if low is not None:
            find = bisect_left if low_inclusive else bisect_right
            start = find(stamps, low, key=_stamp_of)
        end = len(stamps) if high is None else bisect_left(stamps, high, key=_stamp_of)
        rows = (state.rows[contact_id] for _, contact_id in stamps[start:end])
    chosen = [row for row in rows if client_id is None or row.client_id == client_id]
    if not state.raw and not with_ties:
        if order == "updated_desc":
            chosen.reverse()
        return _View([row.rendered for row in chosen], None)
    if state.raw:
        entries = _with_raw(state, chosen, (low, high, low_inclusive), client_id, order)
    else:
        entries = [(row.updated_at, row.id, row.rendered) for row in chosen]
    if order == "updated_desc":
        entries.reverse()
    items = [rendered for _, _, rendered in entries]
    ties = None
    if with_ties:
        ties = TieIndex.of([stamp for stamp, _, _ in entries], [i for _, i, _ in entries])
    return _View(items, ties)


def _with_raw(
    state: _Company,
    rows: list[_Contact],
    bounds: tuple[datetime | None, datetime | None, bool],
    client_id: int | None,
    order: Order,
) -> list[tuple[datetime, int, bytes]]:
    """The ascending view with the matching raw items merged in where their keys place them."""
    low, high, inclusive = bounds
    entries: list[tuple[tuple[Any, ...], tuple[datetime, int, bytes]]] = []
    for row in rows:
        key = (row.id, 0) if order == "id" else (row.updated_at, row.id, 0)
        entries.append((key, (row.updated_at, row.id, row.rendered)))
    for raw in state.raw:
        if raw.matches(low, high, inclusive, client_id):
            key = (
                (raw.sort_id, raw.seq) if order == "id" else (raw.updated_at, raw.sort_id, raw.seq)
            )
            entries.append((key, (raw.updated_at, raw.sort_id, raw.rendered)))
    entries.sort(key=lambda entry: entry[0])
    return [entry for _, entry in entries]


def _parsed_stamp(fields: dict[Any, Any]) -> datetime | None:
    value = fields.get("updated_at")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        return None


def _stamp_of(key: tuple[datetime, int]) -> datetime:
    return key[0]


def _generate_rows(rng: random.Random, count: int, anchor: datetime) -> list[_Contact]:
    """Rows spread over two years before `anchor`, with ties, whole seconds and late edits."""
    rows: list[_Contact] = []
    for contact_id in range(1, count + 1):
        created_back = int(rng.random() * _HISTORY_MS)
        created = anchor - created_back * _MS
        updated_back = int(rng.random() * (created_back + 1))
        updated = created if rng.random() < 0.2 else anchor - updated_back * _MS
        if rng.random() < 0.1:
            updated = updated.replace(microsecond=0)
            created = min(created, updated)
        rows.append(_make_contact(rng, contact_id, created, updated))
    _make_ties(rng, rows)
    for row in rows:
        row.render()
    return rows


def _make_ties(rng: random.Random, rows: list[_Contact]) -> None:
    """Give groups of rows one shared updated_at; the big groups straddle a 100-row page."""
    big = max(1, len(rows) // 1000) if len(rows) >= 2 * _BIG_TIE else 0
    sizes = [_BIG_TIE] * big + [rng.randint(2, 6) for _ in range(len(rows) // 40)]
    shuffled = rows[:]
    rng.shuffle(shuffled)
    start = 0
    for size in sizes:
        group = shuffled[start : start + size]
        start += size
        if not group:
            break
        stamp = group[0].updated_at
        for row in group:
            row.updated_at = stamp
            row.created_at = min(row.created_at, stamp)


def _make_contact(
    rng: random.Random, contact_id: int, created: datetime, updated: datetime
) -> _Contact:
    """An unrendered contact; every 50th is at the documented string limits."""
    if contact_id % 50 == 7:
        text = _text_at_limits(rng, contact_id)
    else:
        text = _fresh_text(rng, contact_id)
        if rng.random() < 0.3:
            for name in TEXT_FIELDS:
                if rng.random() < 0.25:
                    text[name] = None
    zone = _pick(rng, _RENDER_ZONES) if rng.random() < 0.3 else None
    return _Contact(contact_id, created, updated, _pick(rng, CLIENT_IDS), text, zone)


def _fresh_text(rng: random.Random, contact_id: int) -> dict[str, str | None]:
    """Plausible, mostly non-ASCII values for every text field."""
    first, last = _pick(rng, _FIRST_NAMES), _pick(rng, _SURNAMES)
    template, digits = _pick(rng, _PHONE_TEMPLATES)
    return {
        "email": f"{_SLUGS[first]}.{_SLUGS[last]}.{contact_id}@{_pick(rng, _DOMAINS)}",
        "name": first,
        "surname": last,
        "role": _pick(rng, _ROLES),
        "notes": _pick(rng, _NOTES),
        "linkedin": f"https://www.linkedin.com/in/{_SLUGS[last]}-{contact_id}",
        "description": _pick(rng, _DESCRIPTION_VARIANTS),
        "telephone": template.format(*f"{int(rng.random() * 10**digits):0{digits}d}"),
    }


def _text_at_limits(rng: random.Random, contact_id: int) -> dict[str, str | None]:
    """Every limited field exactly at its documented maximum length, in characters."""
    text = _fresh_text(rng, contact_id)
    email_head, email_tail = f"long.{contact_id}.", "@example.com"
    email_fill = MAX_LENGTHS["email"] - len(email_head) - len(email_tail)
    linkedin_head = "https://www.linkedin.com/in/"
    linkedin_fill = MAX_LENGTHS["linkedin"] - len(linkedin_head)
    text.update(
        email=email_head + "a" * email_fill + email_tail,
        name=_fill("Ñandú 名前 ", MAX_LENGTHS["name"]),
        surname=_fill("Øster-Łódź 山田 ", MAX_LENGTHS["surname"]),
        role=_fill("Directeur Général · 営業 ", MAX_LENGTHS["role"]),
        linkedin=linkedin_head + _fill(f"{contact_id}-long-profile-", linkedin_fill),
        telephone=_fill("+34 600 000 000 ext. 1234 ", MAX_LENGTHS["telephone"]),
    )
    return text


def _pick(rng: random.Random, pool: Sequence[_T]) -> _T:
    """`rng.choice`, several times faster; generating 100,000 rows makes millions of picks."""
    return pool[int(rng.random() * len(pool))]


def _fill(pattern: str, length: int) -> str:
    return (pattern * (length // len(pattern) + 1))[:length]


def _ascii_slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = "-".join("".join(c for c in word if c.isalnum()) for word in folded.lower().split())
    return slug.strip("-") or "contact"


def _change_field(rng: random.Random, row: _Contact, version: int) -> None:
    """One visible change, so a mirror that missed the update differs from upstream."""
    name = _pick(rng, ("client_id", *TEXT_FIELDS))
    if name == "client_id":
        row.client_id = _pick(rng, [c for c in CLIENT_IDS if c != row.client_id])
        return
    value = _fresh_text(rng, row.id)[name]
    if value == row.text[name]:
        value = f"{name} v{version}"
    row.text[name] = value


_SLUGS = {name: _ascii_slug(name) for name in (*_FIRST_NAMES, *_SURNAMES)}
_PHONE_TEMPLATES = tuple((p.replace("#", "{}"), p.count("#")) for p in _PHONE_FORMATS)
_DESCRIPTION_VARIANTS = tuple(
    " ".join(parts) for size in (1, 2, 3) for parts in permutations(_DESCRIPTIONS, size)
)
