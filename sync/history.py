"""contacts_history: set-based statements that bring contacts' history in line with the mirror.

One rule serves every writer. After the mirror changes some rows (a page's upsert, reconcile's
marks and un-marks, a hard delete, history being switched on), `follow_mirror` runs in the
same transaction and, for those rows:

- closes an open version whose mirror row has a newer `updated_at` (at that `updated_at`), is
  marked deleted (at `deleted_at`, `closed_by_deletion`) or is gone (at `at`, the same);
- corrects an open version whose mirror row has the same `updated_at` but other fields: a
  version is known by its `updated_at`, and the mirror keeps the last read of it;
- opens a version for a live mirror row that has none (a deleted row that has no version at
  all gets a closed one: that is seeding).

So the open version always equals the live mirror row, whatever order pages arrive in: a re-read
or an older version (which the upsert refuses) changes no mirror row and adds nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Executable,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    null,
    or_,
    select,
    update,
)

from sync.models import Contact, ContactVersion, UTCDateTime, table_of
from sync.rows import TEXT_FIELDS

__all__ = ["follow_mirror", "refresh_statistics", "rows_before_statistics"]

_MIRROR = table_of(Contact)
_HISTORY = table_of(ContactVersion)
_FIELDS = ("client_id", *TEXT_FIELDS, "created_at", "extra")
"""What a version holds besides its key and `updated_at`."""
_FIRST_STATISTICS = 1000.0


def follow_mirror(
    conn: Connection,
    company_id: str,
    ids: Sequence[int] | None,
    at: datetime,
    *,
    gone: bool = False,
) -> None:
    """Make the history of `ids` (all the company's contacts for None) agree with the mirror.

    `at` is when this is seen: the end of a version whose row is gone, and the start of one
    that came back unchanged after a deletion. `gone`: rows may have left the mirror (a hard
    delete, or history switched back on), which costs one more statement.
    """
    parameters: dict[str, object] = {"company": company_id, "at": at}
    if ids is not None:
        parameters["ids"] = list(ids)
    if ids is not None and conn.dialect.name == "postgresql":
        # A page's rows are found by index probes, about a hundred. Scanning the company's
        # whole table (to hash it) looks cheaper to the planner below some tens of thousands
        # of rows, and costs that much for every page of a load: quadratic. For the rest of
        # this transaction (page writes, which need no scans), the planner probes instead.
        conn.exec_driver_sql(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off;"
            " SET LOCAL enable_mergejoin = off"
        )
    for statement in _statements(by_ids=ids is not None, gone=gone):
        conn.execute(statement, parameters)


@functools.cache
def _statements(*, by_ids: bool, gone: bool) -> tuple[Executable, ...]:
    """Built once: SQLAlchemy then caches each one's SQL per dialect."""
    at = bindparam("at", type_=UTCDateTime())
    ids: BindParameter[object] | None = bindparam("ids", expanding=True) if by_ids else None
    closing = [_close_changed(ids)]
    if gone:
        closing.append(_close_gone(ids, at))
    return (*closing, _correct_same_version(ids), _open(ids, at))


def _scope(table: object, ids: BindParameter[object] | None) -> ColumnElement[bool]:
    columns = table.c  # type: ignore[attr-defined]
    mine = columns.company_id == bindparam("company")
    return mine if ids is None else and_(mine, columns.id.in_(ids))


def _same_contact() -> ColumnElement[bool]:
    return and_(_MIRROR.c.company_id == _HISTORY.c.company_id, _MIRROR.c.id == _HISTORY.c.id)


def _close_changed(ids: BindParameter[object] | None) -> Executable:
    """Open versions whose mirror row moved on (a newer version) or was marked deleted."""
    marked = _MIRROR.c.deleted_at.is_not(None)
    return (
        update(_HISTORY)
        .where(
            _same_contact(),
            _scope(_HISTORY, ids),
            _HISTORY.c.valid_to.is_(None),
            or_(marked, _MIRROR.c.updated_at > _HISTORY.c.updated_at),
        )
        .values(
            valid_to=case(
                (~marked, _MIRROR.c.updated_at),
                (_MIRROR.c.deleted_at > _HISTORY.c.valid_from, _MIRROR.c.deleted_at),
                else_=_HISTORY.c.valid_from,  # a server clock ahead of ours: never end earlier
            ),
            closed_by_deletion=marked,
        )
    )


def _close_gone(ids: BindParameter[object] | None, at: BindParameter[datetime]) -> Executable:
    """Open versions of contacts no longer in the mirror (hard deletes)."""
    in_mirror = exists().where(_same_contact())
    return (
        update(_HISTORY)
        .where(_scope(_HISTORY, ids), _HISTORY.c.valid_to.is_(None), ~in_mirror)
        .values(
            valid_to=case((at > _HISTORY.c.valid_from, at), else_=_HISTORY.c.valid_from),
            closed_by_deletion=True,
        )
    )


def _correct_same_version(ids: BindParameter[object] | None) -> Executable:
    """Open versions whose live mirror row has the same updated_at but other fields."""
    return (
        update(_HISTORY)
        .where(
            _same_contact(),
            _scope(_HISTORY, ids),
            _HISTORY.c.valid_to.is_(None),
            _MIRROR.c.deleted_at.is_(None),
            _MIRROR.c.updated_at == _HISTORY.c.updated_at,
            or_(*(_HISTORY.c[name].is_distinct_from(_MIRROR.c[name]) for name in _FIELDS)),
        )
        .values({name: _MIRROR.c[name] for name in _FIELDS})
    )


def _open(ids: BindParameter[object] | None, at: BindParameter[datetime]) -> Executable:
    """A version for each live mirror row without an open one; a closed one for a deleted row
    that has no version at all (seeding)."""
    earlier = (
        select(
            _HISTORY.c.company_id,
            _HISTORY.c.id,
            func.max(_HISTORY.c.version).label("version"),
            func.max(_HISTORY.c.valid_to).label("last_to"),
        )
        .where(_scope(_HISTORY, ids))
        .group_by(_HISTORY.c.company_id, _HISTORY.c.id)
        .subquery("earlier")
    )
    updated, deleted, last_to = _MIRROR.c.updated_at, _MIRROR.c.deleted_at, earlier.c.last_to
    has_open = exists().where(_same_contact(), _HISTORY.c.valid_to.is_(None))
    rows = (
        select(
            _MIRROR.c.company_id,
            _MIRROR.c.id,
            func.coalesce(earlier.c.version, 0) + 1,
            *(_MIRROR.c[name] for name in _FIELDS),
            updated,
            # Back after a deletion with a version older than that deletion: it begins when seen.
            case(
                (or_(last_to.is_(None), updated >= last_to), updated),
                (at > last_to, at),
                else_=last_to,
            ),
            case((deleted.is_(None), null()), (deleted > updated, deleted), else_=updated),
            deleted.is_not(None),
        )
        .select_from(
            _MIRROR.outerjoin(
                earlier,
                and_(earlier.c.company_id == _MIRROR.c.company_id, earlier.c.id == _MIRROR.c.id),
            )
        )
        .where(_scope(_MIRROR, ids), ~has_open, or_(deleted.is_(None), earlier.c.id.is_(None)))
    )
    names = [
        "company_id",
        "id",
        "version",
        *_FIELDS,
        "updated_at",
        "valid_from",
        "valid_to",
        "closed_by_deletion",
    ]
    return insert(_HISTORY).from_select(names, rows)


def rows_before_statistics(conn: Connection) -> float:
    """How many more rows may be written with history on before `refresh_statistics` is due:
    as many as the planner believes contacts_history holds (at least 1,000), so it runs when
    the table doubled since its last ANALYZE. Never on SQLite."""
    if conn.dialect.name != "postgresql":
        return math.inf
    believed = conn.exec_driver_sql(
        "SELECT reltuples FROM pg_class WHERE oid = 'contacts_history'::regclass"
    ).scalar()
    return max(_FIRST_STATISTICS, float(believed or 0))


def refresh_statistics(conn: Connection) -> None:
    """Let PostgreSQL's planner know how big the two tables are now.

    A table that grew since its last ANALYZE (a first load) looks nearly empty to the planner,
    which may then scan the whole company for every page (see `follow_mirror`); autovacuum
    catches up only about a minute later.
    """
    conn.exec_driver_sql("ANALYZE contacts, contacts_history")
