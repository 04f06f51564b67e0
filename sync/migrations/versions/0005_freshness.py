"""sync_state: when the last completed pass began, failures in a row, locked out since when.

What the freshness and alerting metrics read at scrape time, so that every replica reports the
same company state. A mirror upgraded here gets the start of its last completed pass from the
pass's own summary (its finish minus its duration), so freshness is right from the first scrape.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("sync_state") as batch:
        batch.add_column(
            sa.Column(
                "last_pass_started_at",
                _TIMESTAMP,
                nullable=True,
                comment="When the last completed pass began, in UTC: the mirror holds every "
                "change upstream made before it.",
            )
        )
        batch.add_column(
            sa.Column(
                "failures_in_row",
                sa.Integer(),
                nullable=False,
                server_default="0",
                comment="Passes failed since the last completed one, by any process "
                "(what alerting pages on).",
            )
        )
        batch.add_column(
            sa.Column(
                "locked_out_since",
                _TIMESTAMP,
                nullable=True,
                comment="When a pass first found the company locked by another process since "
                "the last completed pass; null when none did.",
            )
        )
    _fill_last_pass_started_at()


def downgrade() -> None:
    with op.batch_alter_table("sync_state") as batch:
        batch.drop_column("locked_out_since")
        batch.drop_column("failures_in_row")
        batch.drop_column("last_pass_started_at")


def _fill_last_pass_started_at() -> None:
    """Each company's last completed pass began `duration_s` before its recorded success."""
    state = sa.table(
        "sync_state",
        sa.column("company_id", sa.Text()),
        sa.column("last_success_at", _TIMESTAMP),
        sa.column("last_pass", sa.JSON()),
        sa.column("last_pass_started_at", _TIMESTAMP),
    )
    conn = op.get_bind()
    done = conn.execute(
        sa.select(state.c.company_id, state.c.last_success_at, state.c.last_pass).where(
            state.c.last_success_at.is_not(None)
        )
    ).all()
    for company_id, finished, stored in done:
        summary = json.loads(stored) if isinstance(stored, str) else stored
        duration = float((summary or {}).get("duration_s") or 0.0)
        conn.execute(
            sa.update(state)
            .where(state.c.company_id == company_id)
            .values(last_pass_started_at=finished - timedelta(seconds=duration))
        )
