"""The initial mirror schema: contacts (the contract's), sync_state, quarantine, checkpoints.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# DATETIME (naive UTC text) on SQLite, timestamptz on PostgreSQL: what sync.models.UTCDateTime uses.
_TIMESTAMP = sa.DateTime(timezone=True)
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("company_id", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("client_id", sa.BigInteger(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("surname", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("linkedin", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("telephone", sa.Text(), nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=True),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.Column("synced_at", _TIMESTAMP, nullable=False),
        sa.Column("deleted_at", _TIMESTAMP, nullable=True),
        sa.Column("extra", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("company_id", "id"),
    )
    op.create_index("ix_contacts_company_id_updated_at", "contacts", ["company_id", "updated_at"])
    op.create_table(
        "sync_state",
        sa.Column("company_id", sa.Text(), nullable=False),
        sa.Column("cursor", _TIMESTAMP, nullable=True),
        sa.Column("last_success_at", _TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", _TIMESTAMP, nullable=True),
        sa.Column("last_pass", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("company_id"),
    )
    op.create_table(
        "quarantine",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("company_id", sa.Text(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("seen_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_quarantine_company_id", "quarantine", ["company_id"])
    op.create_table(
        "checkpoints",
        sa.Column("company_id", sa.Text(), nullable=False),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column("filter_since", _TIMESTAMP, nullable=True),
        sa.Column("next_offset", sa.Integer(), nullable=False),
        sa.Column("anchors", _JSON, nullable=False),
        sa.Column("high_water", _TIMESTAMP, nullable=True),
        sa.Column("started_at", _TIMESTAMP, nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("company_id"),
    )


def downgrade() -> None:
    op.drop_table("checkpoints")
    op.drop_index("ix_quarantine_company_id", table_name="quarantine")
    op.drop_table("quarantine")
    op.drop_table("sync_state")
    op.drop_index("ix_contacts_company_id_updated_at", table_name="contacts")
    op.drop_table("contacts")
