"""The mirror's tables as SQLModel classes; Alembic compares migrations against this metadata.

`contacts` is the contract's reporting schema; the other tables are contacts-sync's own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import Field, SQLModel

__all__ = [
    "VERSION_TABLE",
    "CheckpointRecord",
    "Contact",
    "ContactVersion",
    "QuarantineEntry",
    "ScheduleEntry",
    "SyncState",
    "UTCDateTime",
    "metadata",
    "sqlite_timestamp",
    "sqlite_timestamps",
    "table_of",
]

VERSION_TABLE = "contacts_sync_schema_version"
"""Alembic's version table, named so that it never collides with a user's own Alembic."""

metadata = SQLModel.metadata


_SQLITE_FORMAT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def sqlite_timestamp(value: datetime) -> str:
    """The text UTCDateTime stores on SQLite, `YYYY-MM-DD HH:MM:SS.ffffff` in UTC.

    The same format SQLAlchemy's SQLite DateTime writes, built fast for the bulk upsert.
    """
    if value.tzinfo is not UTC:
        value = _as_utc(value)
    return _SQLITE_FORMAT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def sqlite_timestamps(values: Sequence[datetime | None]) -> list[str | None]:
    """`sqlite_timestamp` of each (None stays None), a page's column at a time.

    orjson writes UTC datetimes in C, `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, and a few replacements
    over the whole column make that the SQLite text: several times faster than formatting
    them one by one, which was a fifth of the Python time of storing a page.
    """
    if not {value.tzinfo for value in values if value is not None} <= {UTC}:
        return [None if value is None else sqlite_timestamp(value) for value in values]
    written = _WHOLE_SECONDS.sub(b".000000", orjson.dumps(values, option=orjson.OPT_UTC_Z))
    texts: list[str | None] = orjson.loads(written.replace(b"T", b" ").replace(b"Z", b""))
    return texts


_WHOLE_SECONDS = re.compile(rb"Z(?<=:\d\dZ)")
"""orjson leaves out a zero fraction: `...:SSZ` is whole seconds. (Z first: the regex engine
then jumps from Z to Z; with the lookbehind first it tries every position.)"""


def _as_utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given; the mirror stores aware UTC")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL, naive UTC text on SQLite; aware UTC in and out."""

    # On SQLite, DateTime is sortable text, so reporting SQL can compare it with a date string.
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _json() -> TypeEngine[Any]:
    """JSON text on SQLite, JSONB on PostgreSQL; Python None is SQL NULL, not JSON null."""
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def _text() -> Any:
    return Field(default=None, sa_column=Column(Text, nullable=True))


def _timestamp(*, nullable: bool) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    return Field(sa_column=Column(UTCDateTime, nullable=False))


class Contact(SQLModel, table=True):
    """One upstream contact; `deleted_at` is set by reconcile when it vanished upstream."""

    __tablename__ = "contacts"
    __table_args__ = (Index("ix_contacts_company_id_updated_at", "company_id", "updated_at"),)

    company_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    client_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    email: str | None = _text()
    name: str | None = _text()
    surname: str | None = _text()
    role: str | None = _text()
    notes: str | None = _text()
    linkedin: str | None = _text()
    description: str | None = _text()
    telephone: str | None = _text()
    created_at: datetime | None = _timestamp(nullable=True)
    updated_at: datetime = _timestamp(nullable=False)
    synced_at: datetime = _timestamp(nullable=False)
    deleted_at: datetime | None = _timestamp(nullable=True)
    extra: dict[str, Any] | None = Field(default=None, sa_column=Column(_json(), nullable=True))


class SyncState(SQLModel, table=True):
    """Per company: the cursor (advanced only after a whole pass is committed) and last outcome."""

    __tablename__ = "sync_state"

    company_id: str = Field(sa_column=Column(Text, primary_key=True))
    cursor: datetime | None = _timestamp(nullable=True)
    last_success_at: datetime | None = _timestamp(nullable=True)
    last_error: str | None = _text()
    last_error_at: datetime | None = _timestamp(nullable=True)
    last_pass: dict[str, Any] | None = Field(default=None, sa_column=Column(_json(), nullable=True))
    last_reconcile: dict[str, Any] | None = Field(
        default=None, sa_column=Column(_json(), nullable=True)
    )
    history_since: datetime | None = Field(
        default=None,
        sa_column=Column(
            UTCDateTime,
            nullable=True,
            comment="When sync.history was switched on for this company and its history seeded "
            "from the mirror; null while it is off.",
        ),
    )
    last_pass_started_at: datetime | None = _timestamp(nullable=True)
    """When the last completed pass began: the mirror holds every change made before it."""
    failures_in_row: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    """Passes failed since the last completed one, by any process: what alerting pages on."""
    locked_out_since: datetime | None = _timestamp(nullable=True)
    """When a pass first found the company locked by another process, since the last
    completed pass; null when none did."""


class QuarantineEntry(SQLModel, table=True):
    """An upstream item that could not be stored, kept with its reason for `status`."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_company_id", "company_id"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    company_id: str = Field(sa_column=Column(Text, nullable=False))
    contact_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    seen_at: datetime = _timestamp(nullable=False)


class CheckpointRecord(SQLModel, table=True):
    """Where an unfinished pass stands, so a killed backfill resumes instead of restarting."""

    __tablename__ = "checkpoints"

    company_id: str = Field(sa_column=Column(Text, primary_key=True))
    mode: str = Field(sa_column=Column(Text, nullable=False))
    filter_since: datetime | None = _timestamp(nullable=True)
    next_offset: int = Field(sa_column=Column(Integer, nullable=False))
    anchors: list[Any] = Field(sa_column=Column(_json(), nullable=False))
    high_water: datetime | None = _timestamp(nullable=True)
    started_at: datetime = _timestamp(nullable=False)
    pages: int = Field(sa_column=Column(Integer, nullable=False))
    rows: int = Field(sa_column=Column(Integer, nullable=False))
    updated_at: datetime = _timestamp(nullable=False)


class ScheduleEntry(SQLModel, table=True):
    """When a company's next job is due; replicas claim due entries, so each runs once."""

    __tablename__ = "sync_schedule"
    __table_args__ = (Index("ix_sync_schedule_due_at", "due_at"),)

    company_id: str = Field(sa_column=Column(Text, primary_key=True))
    job: str = Field(sa_column=Column(Text, primary_key=True))
    due_at: datetime = _timestamp(nullable=False)
    claimed_by: str | None = _text()
    claimed_at: datetime | None = _timestamp(nullable=True)


def _described(column_type: Any, comment: str, *, nullable: bool = True, **options: Any) -> Any:
    return Field(
        default=None, sa_column=Column(column_type, nullable=nullable, comment=comment, **options)
    )


class ContactVersion(SQLModel, table=True):
    """One version of a contact as the mirror saw it, with `sync.history` on.

    A version is known by its `updated_at`: the next one closes it (`valid_to`), and so does a
    deletion (`closed_by_deletion`). At most one version per contact is open (a partial unique
    index), and it always equals the contact's live mirror row.
    """

    __tablename__ = "contacts_history"
    __table_args__ = (
        Index(
            "ux_contacts_history_open",
            "company_id",
            "id",
            unique=True,
            sqlite_where=text("valid_to IS NULL"),
            postgresql_where=text("valid_to IS NULL"),
        ),
        {
            "comment": "Every version of every contact the mirror has seen while sync.history "
            "is on: the rows valid at a moment T are those with valid_from <= T and "
            "(valid_to IS NULL or valid_to > T)."
        },
    )

    company_id: str = Field(
        sa_column=Column(Text, primary_key=True, comment="The company the contact was read for.")
    )
    id: int = Field(
        sa_column=Column(
            BigInteger, primary_key=True, autoincrement=False, comment="Upstream contact id."
        )
    )
    version: int = Field(
        sa_column=Column(
            Integer,
            primary_key=True,
            autoincrement=False,
            comment="1 for the first version the mirror saw of this contact, then 2, 3, ...",
        )
    )
    client_id: int | None = _described(BigInteger, "Upstream client_id of this version.")
    email: str | None = _described(Text, "Upstream email of this version.")
    name: str | None = _described(Text, "Upstream name of this version.")
    surname: str | None = _described(Text, "Upstream surname of this version.")
    role: str | None = _described(Text, "Upstream role of this version.")
    notes: str | None = _described(Text, "Upstream notes of this version.")
    linkedin: str | None = _described(Text, "Upstream linkedin of this version.")
    description: str | None = _described(Text, "Upstream description of this version.")
    telephone: str | None = _described(Text, "Upstream telephone of this version.")
    created_at: datetime | None = _described(UTCDateTime, "Upstream created_at, in UTC.")
    updated_at: datetime = _described(
        UTCDateTime, "Upstream updated_at of this version, in UTC.", nullable=False
    )
    extra: dict[str, Any] | None = _described(
        _json(), "Fields upstream added beyond the documented ones, as JSON."
    )
    valid_from: datetime = _described(
        UTCDateTime,
        "When this version began: its updated_at, or when the mirror saw the contact again "
        "if it came back after a deletion unchanged.",
        nullable=False,
    )
    valid_to: datetime | None = _described(
        UTCDateTime,
        "When this version ended: the next version's updated_at, or when the deletion was "
        "found; null while it is the current one.",
    )
    closed_by_deletion: bool = Field(
        default=False,
        sa_column=Column(
            Boolean,
            nullable=False,
            comment="True when this version ended because the contact vanished upstream "
            "(reconcile marked or removed it).",
        ),
    )


def table_of(model: type[SQLModel]) -> Table:
    """The Core table behind a model: the store writes through Core, never the ORM."""
    return metadata.tables[str(model.__tablename__)]
