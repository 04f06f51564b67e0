"""How the updated_at orders serve rows that share one updated_at (a tie group).

A database sorting by updated_at alone leaves a tie group in whatever order its plan yields:
the same for one query, possibly another for a different LIMIT, or different every time.
The cached view keeps ties in id order; only the groups a page touches are reordered.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

__all__ = ["TIE_ORDERS", "TieIndex", "TieOrder"]

TieOrder = Literal["stable", "per_page", "per_request"]
TIE_ORDERS: tuple[TieOrder, ...] = get_args(TieOrder)

_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TieIndex:
    """Where the tie groups of one ordered view begin and end, and the ids they hold."""

    starts: list[int]
    ends: list[int]
    """`ends[k]` is one past the last position of the group starting at `starts[k]`."""
    ids: list[int]
    """The id of the item at each position of the view, to key `per_page` orders."""

    @classmethod
    def of(cls, stamps: Sequence[datetime], ids: list[int]) -> TieIndex:
        """The runs of two or more equal stamps in a view's `stamps`, one per position."""
        starts: list[int] = []
        ends: list[int] = []
        start = 0
        for position in range(1, len(stamps) + 1):
            if position == len(stamps) or stamps[position] != stamps[start]:
                if position - start > 1:
                    starts.append(start)
                    ends.append(position)
                start = position
        return cls(starts, ends, ids)

    def page(
        self,
        items: list[bytes],
        offset: int,
        limit: int,
        tie_order: TieOrder,
        rng: random.Random,
    ) -> list[bytes]:
        """`items[offset:offset + limit]` with each tie group it touches ordered as `tie_order`."""
        end = offset + limit
        page = items[offset:end]
        if tie_order == "stable":
            return page
        group = max(0, bisect_right(self.starts, offset) - 1)
        while group < len(self.starts) and self.starts[group] < end:
            start, stop = self.starts[group], self.ends[group]
            group += 1
            if stop <= offset:
                continue
            positions = list(range(start, stop))
            if tie_order == "per_page":
                positions.sort(key=lambda position: _mix(self.ids[position], end))
            else:
                rng.shuffle(positions)
            for position in range(max(start, offset), min(stop, end)):
                page[position - offset] = items[positions[position - start]]
        return page


def _mix(contact_id: int, top: int) -> int:
    """A well-spread 64-bit hash of (id, offset+limit): splitmix64's finaliser."""
    value = (contact_id * 0x9E3779B97F4A7C15 + top * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)
