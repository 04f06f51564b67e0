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
from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, Table, Text
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
    "Published",
    "QuarantineEntry",
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
    loaded_at: str | None = None
    """The column whose latest value says how fresh the relation is (dbt's `loaded_at_field`)."""


_CONTACTS = table_of(Contact)

PUBLISHED: tuple[Published, ...] = (
    Published("contacts", _CONTACTS, str(_CONTACTS.comment), loaded_at="synced_at"),
    Published(
        LIVE_VIEW,
        _CONTACTS,
        "The contacts that are live upstream (contacts where deleted_at is null): "
        "the rows most reports want.",
    ),
)
"""What the mirror publishes for reporting, in order; a new table joins by being listed here."""
