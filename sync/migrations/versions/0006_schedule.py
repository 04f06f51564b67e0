"""sync_schedule: when each company's next sync and reconcile are due, shared by replicas.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_schedule",
        sa.Column("company_id", sa.Text(), nullable=False, comment="The company the job is for."),
        sa.Column("job", sa.Text(), nullable=False, comment="The job: sync or reconcile."),
        sa.Column(
            "due_at",
            _TIMESTAMP,
            nullable=False,
            comment="When the job is next due, in UTC; a claim moves it an interval on.",
        ),
        sa.Column(
            "claimed_by",
            sa.Text(),
            nullable=True,
            comment="The daemon (host:pid) that last claimed the job.",
        ),
        sa.Column(
            "claimed_at", _TIMESTAMP, nullable=True, comment="When it last claimed it, in UTC."
        ),
        sa.PrimaryKeyConstraint("company_id", "job"),
        comment="contacts-sync's own: when each company's next sync and reconcile are due, "
        "shared by the daemons (replicas) that run them.",
    )
    op.create_index("ix_sync_schedule_due_at", "sync_schedule", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_sync_schedule_due_at", table_name="sync_schedule")
    op.drop_table("sync_schedule")
