"""The mirror's tables as SQLModel classes; Alembic compares migrations against this metadata.

`contacts` is the contract's reporting schema; the other tables are contacts-sync's own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
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
    "LIVE_VIEW",
    "PUBLISHED",
    "VERSION_TABLE",
    "CheckpointRecord",
    "Contact",
    "ContactVersion",
    "Published",
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


def _text(comment: str) -> Any:
    return Field(default=None, sa_column=Column(Text, nullable=True, comment=comment))


def _timestamp(comment: str, *, nullable: bool) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime, nullable=True, comment=comment))
    return Field(sa_column=Column(UTCDateTime, nullable=False, comment=comment))


def _json_column(comment: str, *, nullable: bool = True) -> Any:
    column = Column(_json(), nullable=nullable, comment=comment)
    return Field(sa_column=column) if not nullable else Field(default=None, sa_column=column)


class Contact(SQLModel, table=True):
    """One upstream contact; `deleted_at` is set by reconcile when it vanished upstream."""

    __tablename__ = "contacts"
    __table_args__ = (
        Index("ix_contacts_company_id_updated_at", "company_id", "updated_at"),
        {
            "comment": "The CRM's contacts as contacts-sync last read them, one row per company "
            "and contact id; rows deleted upstream stay, with deleted_at set."
        },
    )

    company_id: str = Field(
        sa_column=Column(
            Text, primary_key=True, comment="The company the row was read for (api.companies)."
        )
    )
    id: int = Field(
        sa_column=Column(
            BigInteger,
            primary_key=True,
            autoincrement=False,
            comment="The contact's id upstream, unique within its company.",
        )
    )
    client_id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger, nullable=True, comment="The upstream client the contact belongs to."
        ),
    )
    email: str | None = _text("Email address, as upstream holds it.")
    name: str | None = _text("First name, as upstream holds it.")
    surname: str | None = _text("Last name, as upstream holds it.")
    role: str | None = _text("Role or job title, as upstream holds it.")
    notes: str | None = _text("Free-text notes, as upstream holds them.")
    linkedin: str | None = _text("LinkedIn profile address, as upstream holds it.")
    description: str | None = _text("Free-text description, as upstream holds it.")
    telephone: str | None = _text("Telephone number, as upstream holds it.")
    created_at: datetime | None = _timestamp(
        "When the contact was created upstream, in UTC.", nullable=True
    )
    updated_at: datetime = _timestamp(
        "When the contact last changed upstream, in UTC, milliseconds kept.", nullable=False
    )
    synced_at: datetime = _timestamp(
        "When contacts-sync last wrote the row, in UTC; every pass rewrites its company's "
        "newest rows, so the latest synced_at is when the mirror last synced.",
        nullable=False,
    )
    deleted_at: datetime | None = _timestamp(
        "When reconcile found the contact gone upstream, in UTC; null while it is live.",
        nullable=True,
    )
    extra: dict[str, Any] | None = _json_column(
        "Fields upstream sent that have no column here, as a JSON object."
    )


class SyncState(SQLModel, table=True):
    """Per company: the cursor (advanced only after a whole pass is committed) and last outcome."""

    __tablename__ = "sync_state"
    __table_args__ = {
        "comment": "Per company: how far the mirror is known complete, and how its last "
        "pass and reconcile went."
    }

    company_id: str = Field(
        sa_column=Column(Text, primary_key=True, comment="The company these facts are about.")
    )
    cursor: datetime | None = _timestamp(
        "The mirror holds every row updated up to this time (UTC); the next pass reads from "
        "it, minus sync.lookback_s.",
        nullable=True,
    )
    last_success_at: datetime | None = _timestamp(
        "When the last pass completed, in UTC.", nullable=True
    )
    last_error: str | None = _text(
        "Why the last pass failed and what to do, or null when the last pass completed."
    )
    last_error_at: datetime | None = _timestamp("When that pass failed, in UTC.", nullable=True)
    last_pass: dict[str, Any] | None = _json_column(
        "The last completed pass's summary (mode, pages, rows, requests, retries, duration, "
        "off_filter), as JSON."
    )
    last_reconcile: dict[str, Any] | None = _json_column(
        "The last reconcile's summary (scanned, missing, marked, refused, reason), as JSON."
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
    last_pass_started_at: datetime | None = _timestamp(
        "When the last completed pass began, in UTC: the mirror holds every change upstream "
        "made before it.",
        nullable=True,
    )
    failures_in_row: int = Field(
        default=0,
        sa_column=Column(
            Integer,
            nullable=False,
            server_default=text("0"),
            comment="Passes failed since the last completed one, by any process "
            "(what alerting pages on).",
        ),
    )
    locked_out_since: datetime | None = _timestamp(
        "When a pass first found the company locked by another process since the last "
        "completed pass; null when none did.",
        nullable=True,
    )


class QuarantineEntry(SQLModel, table=True):
    """An upstream item that could not be stored, kept with its reason for `status`."""

    __tablename__ = "quarantine"
    __table_args__ = (
        Index("ix_quarantine_company_id", "company_id"),
        {
            "comment": "Upstream items that could not be stored, with the reason; an entry "
            "leaves when upstream serves its id valid."
        },
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
            comment="Entry number.",
        ),
    )
    company_id: str = Field(
        sa_column=Column(Text, nullable=False, comment="The company the item was read for.")
    )
    contact_id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger, nullable=True, comment="The contact id the item names, when readable."
        ),
    )
    reason: str = Field(
        sa_column=Column(Text, nullable=False, comment="Why the item could not be stored.")
    )
    payload: str = Field(
        sa_column=Column(Text, nullable=False, comment="The item as upstream sent it, as JSON.")
    )
    seen_at: datetime = _timestamp("When the item was last read, in UTC.", nullable=False)


class CheckpointRecord(SQLModel, table=True):
    """Where an unfinished pass stands, so a killed backfill resumes instead of restarting."""

    __tablename__ = "checkpoints"
    __table_args__ = {
        "comment": "Where each company's unfinished pass resumes; removed when the pass completes."
    }

    company_id: str = Field(
        sa_column=Column(Text, primary_key=True, comment="The company whose pass this is.")
    )
    mode: str = Field(
        sa_column=Column(Text, nullable=False, comment="The pass's mode: incremental or backfill.")
    )
    filter_since: datetime | None = _timestamp(
        "The updated_at the pass reads after (gt:), in UTC; null for a full load.",
        nullable=True,
    )
    next_offset: int = Field(
        sa_column=Column(Integer, nullable=False, comment="The offset the pass resumes at.")
    )
    anchors: list[Any] = _json_column(
        "Ids and updated_at of the last rows committed, to realign on resume, as JSON.",
        nullable=False,
    )
    high_water: datetime | None = _timestamp(
        "The newest updated_at the pass has read, in UTC.", nullable=True
    )
    started_at: datetime = _timestamp("When the pass began, in UTC.", nullable=False)
    pages: int = Field(
        sa_column=Column(Integer, nullable=False, comment="Pages the pass has committed.")
    )
    rows: int = Field(
        sa_column=Column(Integer, nullable=False, comment="Rows the pass has committed.")
    )
    updated_at: datetime = _timestamp("When the checkpoint was written, in UTC.", nullable=False)


SCHEDULE_COMMENT = (
    "contacts-sync's own: when each company's next sync and reconcile are due, shared by the "
    "daemons (replicas) that run them."
)


class ScheduleEntry(SQLModel, table=True):
    """When a company's next job is due; replicas claim due entries, so each runs once."""

    __tablename__ = "sync_schedule"
    __table_args__ = (
        Index("ix_sync_schedule_due_at", "due_at"),
        {"comment": SCHEDULE_COMMENT},
    )

    company_id: str = Field(
        sa_column=Column(Text, primary_key=True, comment="The company the job is for.")
    )
    job: str = Field(
        sa_column=Column(Text, primary_key=True, comment="The job: sync or reconcile.")
    )
    due_at: datetime = _timestamp(
        "When the job is next due, in UTC; a claim moves it an interval on.", nullable=False
    )
    claimed_by: str | None = _text("The daemon (host:pid) that last claimed the job.")
    claimed_at: datetime | None = _timestamp("When it last claimed it, in UTC.", nullable=True)


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


LIVE_VIEW = "contacts_live"
"""The view of the contacts not deleted upstream (`deleted_at IS NULL`), on both databases."""


@dataclass(frozen=True)
class Published:
    """A table or view that BI tools and `dbt-sources` show, described by its model's comments.

    A view shares its table's columns, so `table` gives the columns, their comments and the
    primary key, and `comment` says what the relation itself holds.
    """

    name: str
    table: Table
    comment: str
    fresh_by_passes: bool = False
    """Whether dbt's freshness applies: the start of the stalest company's last completed pass."""


_CONTACTS = table_of(Contact)

_HISTORY = table_of(ContactVersion)

PUBLISHED: tuple[Published, ...] = (
    Published("contacts", _CONTACTS, str(_CONTACTS.comment), fresh_by_passes=True),
    Published(
        LIVE_VIEW,
        _CONTACTS,
        "The contacts that are live upstream (contacts where deleted_at is null): "
        "the rows most reports want.",
    ),
    Published("contacts_history", _HISTORY, str(_HISTORY.comment)),
)
"""What the mirror publishes for reporting, in order; a new table joins by being listed here."""
