"""Alembic environment: contacts-sync runs it from MirrorStore.open on an open connection.

The store passes that connection in `config.attributes["connection"]` and has already begun the
transaction, so the whole upgrade commits or rolls back as one. For a developer's
`alembic revision --autogenerate`, a `sqlalchemy.url` main option works instead.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext

from sync.models import VERSION_TABLE, UTCDateTime, metadata


def _render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | bool:
    """Revisions spell UTCDateTime as the plain column type it creates, so they never import it."""
    if kind == "type" and isinstance(item, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


_OPTIONS: dict[str, Any] = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,
    "render_as_batch": True,  # SQLite alters tables by copying them
    "render_item": _render_item,
    "compare_type": True,
}


def _run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True, **_OPTIONS
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    context.configure(connection=connection, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as own:
        _run_on(own)
    engine.dispose()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
