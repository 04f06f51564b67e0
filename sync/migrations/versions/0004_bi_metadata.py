"""BI metadata: comments on every table and column (PostgreSQL), and the contacts_live view.

BI tools (Metabase, Superset, DBeaver) show PostgreSQL's comments beside each table and column.
The comments here are a copy of those in sync.models, which is where they are written: a test
compares the models with a database at head, comments included, so the two cannot drift. A later
table gets its comments from `comment=` in its own `create_table`, which emits `COMMENT ON` on
PostgreSQL by itself. SQLite keeps no comments.

`contacts_live` is contacts without the rows deleted upstream. A later migration that rebuilds
contacts on SQLite (batch mode copies the table, drops it and renames the copy) must drop the
view first and create it again after: with the view in place SQLite stops the rebuild with
"error in view contacts_live".

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMMENTS: dict[str, tuple[str, dict[str, str]]] = {
    "contacts": (
        (
            "The CRM's contacts as contacts-sync last read them, one row per company and contact "
            "id; rows deleted upstream stay, with deleted_at set."
        ),
        {
            "company_id": "The company the row was read for (api.companies).",
            "id": "The contact's id upstream, unique within its company.",
            "client_id": "The upstream client the contact belongs to.",
            "email": "Email address, as upstream holds it.",
            "name": "First name, as upstream holds it.",
            "surname": "Last name, as upstream holds it.",
            "role": "Role or job title, as upstream holds it.",
            "notes": "Free-text notes, as upstream holds them.",
            "linkedin": "LinkedIn profile address, as upstream holds it.",
            "description": "Free-text description, as upstream holds it.",
            "telephone": "Telephone number, as upstream holds it.",
            "created_at": "When the contact was created upstream, in UTC.",
            "updated_at": "When the contact last changed upstream, in UTC, milliseconds kept.",
            "synced_at": (
                "When contacts-sync last wrote the row, in UTC; every pass rewrites its company's "
                "newest rows, so the latest synced_at is when the mirror last synced."
            ),
            "deleted_at": (
                "When reconcile found the contact gone upstream, in UTC; null while it is live."
            ),
            "extra": "Fields upstream sent that have no column here, as a JSON object.",
        },
    ),
    "sync_state": (
        (
            "Per company: how far the mirror is known complete, and how its last pass and "
            "reconcile went."
        ),
        {
            "company_id": "The company these facts are about.",
            "cursor": (
                "The mirror holds every row updated up to this time (UTC); the next pass reads "
                "from it, minus sync.lookback_s."
            ),
            "last_success_at": "When the last pass completed, in UTC.",
            "last_error": (
                "Why the last pass failed and what to do, or null when the last pass completed."
            ),
            "last_error_at": "When that pass failed, in UTC.",
            "last_pass": (
                "The last completed pass's summary (mode, pages, rows, requests, retries, "
                "duration, off_filter), as JSON."
            ),
            "last_reconcile": (
                "The last reconcile's summary (scanned, missing, marked, refused, reason), as JSON."
            ),
        },
    ),
    "quarantine": (
        (
            "Upstream items that could not be stored, with the reason; an entry leaves when "
            "upstream serves its id valid."
        ),
        {
            "id": "Entry number.",
            "company_id": "The company the item was read for.",
            "contact_id": "The contact id the item names, when readable.",
            "reason": "Why the item could not be stored.",
            "payload": "The item as upstream sent it, as JSON.",
            "seen_at": "When the item was last read, in UTC.",
        },
    ),
    "checkpoints": (
        "Where each company's unfinished pass resumes; removed when the pass completes.",
        {
            "company_id": "The company whose pass this is.",
            "mode": "The pass's mode: incremental or backfill.",
            "filter_since": (
                "The updated_at the pass reads after (gt:), in UTC; null for a full load."
            ),
            "next_offset": "The offset the pass resumes at.",
            "anchors": (
                "Ids and updated_at of the last rows committed, to realign on resume, as JSON."
            ),
            "high_water": "The newest updated_at the pass has read, in UTC.",
            "started_at": "When the pass began, in UTC.",
            "pages": "Pages the pass has committed.",
            "rows": "Rows the pass has committed.",
            "updated_at": "When the checkpoint was written, in UTC.",
        },
    ),
}

_LIVE_VIEW = "contacts_live"
_LIVE_VIEW_COMMENT = (
    "The contacts that are live upstream (contacts where deleted_at is null): the rows most "
    "reports want."
)
_LIVE_COLUMNS = _COMMENTS["contacts"][1]


def upgrade() -> None:
    live = f"SELECT {', '.join(_LIVE_COLUMNS)} FROM contacts WHERE deleted_at IS NULL"  # noqa: S608
    op.execute(f"CREATE VIEW {_LIVE_VIEW} AS {live}")
    if op.get_bind().dialect.name != "postgresql":
        return
    comments = []
    for table, (comment, column_comments) in _COMMENTS.items():
        comments.append(("TABLE", table, comment))
        comments.extend(
            ("COLUMN", f"{table}.{name}", text) for name, text in column_comments.items()
        )
    comments.append(("VIEW", _LIVE_VIEW, _LIVE_VIEW_COMMENT))
    comments.extend(
        ("COLUMN", f"{_LIVE_VIEW}.{name}", text) for name, text in _LIVE_COLUMNS.items()
    )
    _comment_on(comments)


def downgrade() -> None:
    op.execute(f"DROP VIEW {_LIVE_VIEW}")
    if op.get_bind().dialect.name != "postgresql":
        return
    comments: list[tuple[str, str, str | None]] = []
    for table, (_, column_comments) in _COMMENTS.items():
        comments.append(("TABLE", table, None))
        comments.extend(("COLUMN", f"{table}.{name}", None) for name in column_comments)
    _comment_on(comments)


def _comment_on(comments: Sequence[tuple[str, str, str | None]]) -> None:
    """Each (kind, target, comment) as `COMMENT ON`, the target quoted and the comment a
    literal (no bind parameters there), all in one DO block: one round trip, not fifty."""
    dialect = op.get_bind().dialect
    statements = []
    for kind, target, comment in comments:
        name = ".".join(dialect.identifier_preparer.quote(part) for part in target.split("."))
        literal = "NULL"
        if comment is not None:
            literal = str(
                sa.literal(comment).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            )
        statements.append(f"COMMENT ON {kind} {name} IS {literal};")
    block = "DO $comments$ BEGIN " + " ".join(statements) + " END $comments$"
    # text() reads ":word" as a bind parameter; an escaped colon is a plain one.
    op.execute(sa.text(block.replace(":", "\\:")))
