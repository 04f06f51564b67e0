"""contacts_history (sync.history): every version of a contact, and sync_state.history_since.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_OPEN = sa.text("valid_to IS NULL")


def _upstream(name: str, column_type: sa.types.TypeEngine[Any]) -> sa.Column[Any]:
    return sa.Column(name, column_type, nullable=True, comment=f"Upstream {name} of this version.")


def upgrade() -> None:
    op.create_table(
        "contacts_history",
        sa.Column(
            "company_id", sa.Text(), nullable=False, comment="The company the contact was read for."
        ),
        sa.Column(
            "id",
            sa.BigInteger(),
            autoincrement=False,
            nullable=False,
            comment="Upstream contact id.",
        ),
        sa.Column(
            "version",
            sa.Integer(),
            autoincrement=False,
            nullable=False,
            comment="1 for the first version the mirror saw of this contact, then 2, 3, ...",
        ),
        _upstream("client_id", sa.BigInteger()),
        *(
            _upstream(name, sa.Text())
            for name in (
                "email",
                "name",
                "surname",
                "role",
                "notes",
                "linkedin",
                "description",
                "telephone",
            )
        ),
        sa.Column("created_at", _TIMESTAMP, nullable=True, comment="Upstream created_at, in UTC."),
        sa.Column(
            "updated_at",
            _TIMESTAMP,
            nullable=False,
            comment="Upstream updated_at of this version, in UTC.",
        ),
        sa.Column(
            "extra",
            _JSON,
            nullable=True,
            comment="Fields upstream added beyond the documented ones, as JSON.",
        ),
        sa.Column(
            "valid_from",
            _TIMESTAMP,
            nullable=False,
            comment="When this version began: its updated_at, or when the mirror saw the contact "
            "again if it came back after a deletion unchanged.",
        ),
        sa.Column(
            "valid_to",
            _TIMESTAMP,
            nullable=True,
            comment="When this version ended: the next version's updated_at, or when the "
            "deletion was found; null while it is the current one.",
        ),
        sa.Column(
            "closed_by_deletion",
            sa.Boolean(),
            nullable=False,
            comment="True when this version ended because the contact vanished upstream "
            "(reconcile marked or removed it).",
        ),
        sa.PrimaryKeyConstraint("company_id", "id", "version"),
        comment="Every version of every contact the mirror has seen while sync.history is on: "
        "the rows valid at a moment T are those with valid_from <= T and "
        "(valid_to IS NULL or valid_to > T).",
    )
    op.create_index(
        "ux_contacts_history_open",
        "contacts_history",
        ["company_id", "id"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    with op.batch_alter_table("sync_state") as batch:
        batch.add_column(
            sa.Column(
                "history_since",
                _TIMESTAMP,
                nullable=True,
                comment="When sync.history was switched on for this company and its history "
                "seeded from the mirror; null while it is off.",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("sync_state") as batch:
        batch.drop_column("history_since")
    op.drop_index("ux_contacts_history_open", table_name="contacts_history")
    op.drop_table("contacts_history")
