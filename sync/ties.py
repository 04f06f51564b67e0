"""Rows that share one `updated_at`, on a server that orders by it without a tie-breaker.

Such a server may return a tie group's members in another order on every request (or for
every offset+limit, as a database's top-N sort does), so a group that straddles a page
boundary cannot be walked: a member may sit before the boundary in one answer and after it
in the next, and be read by neither. What stays fixed is where the group begins and ends:
every row before it has an earlier `updated_at` (later, in descending order), every row after
it a later one. So the group is read on a list of its own, filtered to start just before it
(`gt:` a whole second before, or `lt:` one after), where its size is known from the offsets
of those two transitions, and re-read with other offsets and limits until every member has
been seen; the walk then resumes past the group's end in its own list.

The argument for exactness assumes that the server's order is by `updated_at` (every answer
the walk saw was sorted by it) and that no row is *given* this `updated_at` while the group
is read, which holds for any group older than the pass: new stamps are later than the pass's
start. Members may be updated or deleted meanwhile; only those that stay must be seen. A group
that every answer sharing two or more of its members showed in one order is taken to be
stably ordered and is walked once, like any list; that is the one judgement from evidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Literal

from sync.api import Page
from sync.errors import PagingUnstable, UnstableOrder
from sync.rows import RowKey

__all__ = [
    "Bound",
    "Direction",
    "GroupEnd",
    "OrderEvidence",
    "find_group_end",
    "group_end_in",
    "read_tie_group",
]

Direction = Literal["asc", "desc"]
Bound = tuple[Literal["gt", "lt"], datetime]
"""An `updated_at` filter that replaces the pass's own for one request."""

_SECOND = timedelta(seconds=1)
_MAX_PROBES = 64
"""Requests the search for a group's end may make: a binary search over any real list."""
_MAX_ATTEMPTS = 3
"""Times a group is read afresh when rows around it moved while it was read."""

FetchAt = Callable[[int, int], Page]
"""fetch(offset, limit) on one list: the walk's own, or the group's."""


class OrderEvidence:
    """Which orders every answer so far was sorted by; only these can be tie-unstable."""

    def __init__(self) -> None:
        self.ascending = True
        self.descending = True

    @property
    def direction(self) -> Direction | None:
        """The `updated_at` order the walk has seen, if any fits (ascending first)."""
        if self.ascending:
            return "asc"
        return "desc" if self.descending else None

    @property
    def known(self) -> Direction | None:
        """The `updated_at` order, once answers have told the two apart."""
        if self.ascending != self.descending:
            return self.direction
        return None

    def observe(self, keys: Sequence[RowKey | None]) -> None:
        if not (self.ascending or self.descending):
            return
        stamps = [key[1] for key in keys if key is not None]
        pairs = list(pairwise(stamps))
        if self.ascending and any(a > b for a, b in pairs):
            self.ascending = False
        if self.descending and any(a < b for a, b in pairs):
            self.descending = False


def _beyond(stamp: datetime, direction: Direction | None = None) -> Callable[[datetime], bool]:
    """Whether a row lies past the group: a later stamp ascending, an earlier one descending.

    Where the order is not known yet (every row seen so far had the group's stamp), any other
    stamp found after one of the group's positions: its rows are contiguous.
    """
    if direction == "asc":
        return lambda other: other > stamp
    if direction == "desc":
        return lambda other: other < stamp
    return lambda other: other != stamp


def group_bound(stamp: datetime, direction: Direction) -> Bound:
    """A whole-second filter whose list starts shortly before the group, in either order."""
    whole = stamp.replace(microsecond=0)
    if direction == "asc":
        return "gt", whole - _SECOND if whole == stamp else whole
    return "lt", whole + _SECOND


@dataclass(frozen=True, slots=True)
class GroupEnd:
    """A page that shows where the group ends: its items before `past` are the group's (or
    before it), `past` and on come after it; `past` None when the list ends with the group."""

    offset: int
    page: Page
    past: int | None

    @property
    def end(self) -> int:
        """The position of the first row after the group (or of the list's end)."""
        return self.offset + (self.page.size if self.past is None else self.past)


def group_end_in(page: Page, stamp: datetime, direction: Direction | None) -> GroupEnd | None:
    """The page as a GroupEnd, if it shows a row past the group after one of the group's."""
    keys = page.parsed.keys
    inside = _first_at(keys, stamp)
    if inside is None:
        return None
    past = _first_beyond(keys[inside:], _beyond(stamp, direction))
    return None if past is None else GroupEnd(page.offset, page, inside + past)


def find_group_end(
    fetch: FetchAt,
    stamp: datetime,
    direction: Direction | None,
    *,
    known_inside: int,
    limit: int,
) -> Iterator[Page | GroupEnd]:
    """Search a list for the position where the group ends; yields every page it reads and,
    last, the one that shows the end.

    `known_inside` is a position the group held in some answer, so the end lies after it. The
    search gallops forward and halves back, so even a group of thousands costs a few requests;
    it relies only on the stamps an answer shows, never on which members it shows. Rows may
    move while it searches: each answer is believed over what earlier ones said, and where the
    order is known a page of rows before the group sends the search forward.
    """
    beyond = _beyond(stamp, direction)
    low, high = known_inside + 1, None  # the end is in [low, high]
    jump = 0
    for _ in range(_MAX_PROBES):
        probe = low - 1 + jump if high is None else max(0, (low + high) // 2 - 1)
        page = fetch(probe, limit)
        keys = page.parsed.keys
        first = _first_beyond(keys, beyond)
        if first:  # rows of the group (or before it, if it is gone) and then rows past it
            yield GroupEnd(probe, page, first)
            return
        if first is None and page.size == 1 and keys[0] is not None and keys[0][1] == stamp:
            yield GroupEnd(probe, page, None)  # a lone member after the rest: the list's end
            return
        yield page
        if first is None and page.size:
            low = probe + page.size
            if high is not None and high < low:
                high = None
            jump = max(limit - 1, 2 * jump) if high is None else 0
        else:
            high = probe
            if low > high:
                low = max(0, high - limit + 1)
    raise PagingUnstable(
        f"Could not find where the rows updated at {stamp.isoformat()} end while upstream kept "
        "moving them; run again when upstream is quieter (the cursor was not moved)."
    )


def _first_beyond(keys: Sequence[RowKey | None], beyond: Callable[[datetime], bool]) -> int | None:
    for position, key in enumerate(keys):
        if key is not None and beyond(key[1]):
            return position
    return None


def read_tie_group(
    fetch: FetchAt, stamp: datetime, direction: Direction, *, limit: int
) -> Iterator[Page]:
    """Read every member of the group on its own list (a `group_bound` filter), yielding each
    page read; raises UnstableOrder when they cannot all be seen within a bounded budget.

    The group's size is the distance between its two transitions: its start from the list's
    first page, its end found by `find_group_end`, the start confirmed again after that (rows
    before the group can only leave it, so an unchanged start means nothing moved meanwhile).
    Only members seen from the moment the end was found count: they are all members at that
    moment, so seeing as many as the size means seeing every one, and members that left
    meanwhile can never stand in for one that stayed unseen.
    """
    beyond = _beyond(stamp)
    for _ in range(_MAX_ATTEMPTS):
        located = yield from _find_group_start(fetch, stamp, direction, limit=limit)
        if located is None:
            return  # the group left this list whole: every member of it changed
        start, first = located
        if _first_beyond(first.parsed.keys[start - first.offset :], beyond) is not None:
            return  # the whole group came in one answer
        end = None
        for found in find_group_end(fetch, stamp, None, known_inside=start, limit=limit):
            if isinstance(found, GroupEnd):
                end = found
            else:
                yield found
        if end is None:  # pragma: no cover - find_group_end ends with a GroupEnd or raises
            continue
        yield end.page
        orders = _Orders(stamp)
        orders.add(end.page)
        members = _members(end.page, stamp, end.offset, start, end.end)
        again = fetch(max(0, start - 1), 2)
        yield again
        if _first_at(again.parsed.keys, stamp) != min(start, 1):
            continue  # rows before the group moved: measure again
        members |= _members(again, stamp, max(0, start - 1), start, end.end)
        size = end.end - start
        done = yield from _collect(
            fetch, stamp, start=start, size=size, members=members, orders=orders, limit=limit
        )
        if done:
            return
    raise UnstableOrder(
        f"Upstream returned the rows updated at {stamp.isoformat()} in a different order on "
        "each request and they could not all be read; run again later, and ask the provider "
        "to sort by a unique key as well (the cursor was not moved)."
    )


def _find_group_start(
    fetch: FetchAt, stamp: datetime, direction: Direction, *, limit: int
) -> Generator[Page, None, tuple[int, Page] | None]:
    """Read the group's list from its start to the group's first row, yielding the pages
    read; that row's position and page, or None when the group has left the list."""
    offset = 0
    for _ in range(_MAX_PROBES):
        page = fetch(offset, limit)
        yield page
        found = _first_at(page.parsed.keys, stamp)
        if found is not None:
            return offset + found, page
        stamps = [key[1] for key in page.parsed.keys if key is not None]
        if not page.size or any(
            other > stamp if direction == "asc" else other < stamp for other in stamps
        ):
            return None
        offset += max(1, page.size - 1)  # more rows in the second before it than a page holds
    raise PagingUnstable(
        f"Could not find where the rows updated at {stamp.isoformat()} begin; run again when "
        "upstream is quieter (the cursor was not moved)."
    )


class _Orders:
    """The group's members in the order each answer gave them, and whether two disagreed."""

    def __init__(self, stamp: datetime) -> None:
        self._stamp = stamp
        self._answers: list[dict[int, int]] = []
        self.compared = False
        """Two answers have shown two or more members in common."""
        self.shuffled = False
        """Two answers have shown members in common in another relative order."""

    def add(self, page: Page) -> None:
        ranks = {
            key[0]: rank
            for rank, key in enumerate(page.parsed.keys)
            if key is not None and key[1] == self._stamp
        }
        for earlier in self._answers:
            common = sorted(
                (member for member in ranks if member in earlier), key=ranks.__getitem__
            )
            if len(common) > 1:
                self.compared = True
                before = [earlier[member] for member in common]
                if any(a > b for a, b in pairwise(before)):
                    self.shuffled = True
        self._answers.append(ranks)


def _collect(
    fetch: FetchAt,
    stamp: datetime,
    *,
    start: int,
    size: int,
    members: set[_Member],
    orders: _Orders,
    limit: int,
) -> Generator[Page, None, bool]:
    """Sweep the group's positions, with another page width each time, until every member
    has been seen; whether that was achieved.

    A server whose order depends on offset+limit shows another order for each width, one that
    shuffles per request a fresh one every time; each sweep then sees about two thirds of the
    members still missing, so sweeps as many as a few times log(size) bound the search. A
    server that kept the group in one order across every answer that shared members is walked
    once, like any stable list: windows overlap by a quarter page, so members leaving the
    group meanwhile cannot make one that stays slip between two of them.
    """
    sweeps = 4 + 2 * math.ceil(math.log(size + 1))
    requests = 0
    for sweep in range(sweeps):
        width = max(2, limit - sweep)
        margin = min(limit // 2, 2 * requests)  # rows before it may leave: the group moves
        offset = max(0, start - margin)
        while offset < start + size + margin:
            if len(members) >= size:
                return True
            page = fetch(offset, width)
            requests += 1
            yield page
            members |= _members(page, stamp, offset, start, start + size)
            orders.add(page)
            if page.size < 2:
                break  # the list ends here
            offset += max(1, page.size - 1 - page.size // 4)
        if len(members) >= size or (orders.compared and not orders.shuffled):
            return True
    return False


def _first_at(keys: Sequence[RowKey | None], stamp: datetime) -> int | None:
    for position, key in enumerate(keys):
        if key is not None and key[1] == stamp:
            return position
    return None


_Member = int | tuple[str, int]
"""A member's id, or ("unparseable", position) for an item that holds a place in the group."""


def _members(page: Page, stamp: datetime, at: int, start: int, end: int) -> set[_Member]:
    """The group's members in a page read at offset `at`: its rows with the group's stamp,
    and the places unparseable items hold among the group's positions."""
    found: set[_Member] = {
        key[0] for key in page.parsed.keys if key is not None and key[1] == stamp
    }
    for position, key in enumerate(page.parsed.keys):
        if key is None and start <= at + position < end:
            found.add(("unparseable", at + position))
    return found
