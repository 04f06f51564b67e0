"""A dbt `sources.yml` for the mirror, written from the models' own comments (`PUBLISHED`).

Every published relation is described the same way: its comment, its columns with their comments
and types, `not_null` on the primary key, a uniqueness test on the whole key, and (for
`contacts`) freshness from the passes (`loaded_at_query`). Nothing here names a table, so a
table listed in `PUBLISHED` appears too.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
from sqlalchemy import Column, make_url
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.types import String

from sync.errors import ConfigError
from sync.models import PUBLISHED, Published

__all__ = ["SOURCE_NAME", "freshness", "key_text", "sources", "sources_yaml"]

SOURCE_NAME = "contacts_sync"
"""The dbt source name unless told otherwise, as in `{{ source('contacts_sync', 'contacts') }}`."""

WARN_AFTER_INTERVALS = 2
"""One scheduled pass missed: worth a look."""
ERROR_AFTER_INTERVALS = 4
"""Three passes missed in a row: the daemon is down or every pass fails."""

_HEADER = (
    "# A dbt sources file for the contacts-sync mirror, written by `contacts-sync dbt-sources`.\n"
    "# Write it again after upgrading contacts-sync or changing database.url or sync.interval.\n"
)


def sources_yaml(database_url: str, interval_s: float, source_name: str = SOURCE_NAME) -> str:
    """The text of `sources.yml` for the mirror at `database_url`, synced every `interval_s`."""
    document = sources(database_url, interval_s, source_name)
    return _HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def sources(database_url: str, interval_s: float, source_name: str = SOURCE_NAME) -> dict[str, Any]:
    """The `sources.yml` document: one source holding every relation in `PUBLISHED`."""
    url = _parse(database_url)
    dialect = url.get_dialect()()
    location = _location(url)
    source: dict[str, Any] = {
        "name": source_name,
        "description": "The contacts-sync mirror of the CRM's contacts list (GET /api/contacts).",
        **location,
        "tables": [
            _relation(published, dialect, interval_s, location["schema"]) for published in PUBLISHED
        ],
    }
    return {"version": 2, "sources": [source]}


def freshness(interval_s: float) -> dict[str, dict[str, Any]]:
    """dbt's freshness thresholds for a mirror synced every `interval_s` seconds."""
    return {
        "warn_after": _period(interval_s * WARN_AFTER_INTERVALS),
        "error_after": _period(interval_s * ERROR_AFTER_INTERVALS),
    }


def _period(seconds: float) -> dict[str, Any]:
    """Whole minutes, rounded up (dbt counts in integers), or hours when they divide evenly."""
    minutes = max(1, math.ceil(seconds / 60))
    if minutes % 60 == 0:
        return {"count": minutes // 60, "period": "hour"}
    return {"count": minutes, "period": "minute"}


def _parse(database_url: str) -> URL:
    try:
        return make_url(database_url)
    except (ArgumentError, ValueError):
        raise ConfigError(
            "Config key database.url is not a valid SQLAlchemy URL; "
            "use sqlite:///path/to/file.db or postgresql+psycopg://user@host/db."
        ) from None


_SEARCH_PATH = re.compile(r"search_path\s*=\s*([^\s]+)")


def _location(url: URL) -> dict[str, str]:
    """Where dbt finds the relations: SQLite's main database, or PostgreSQL's database and the
    schema the mirror's tables go to (the first of a `search_path` in the URL's `options`)."""
    if url.get_backend_name() == "sqlite":
        return {"schema": "main"}
    location = {"database": url.database} if url.database else {}
    schema = "public"
    options = url.query.get("options", ())
    for option in (options,) if isinstance(options, str) else options:
        found = _SEARCH_PATH.search(option)
        if found:
            schemas = [name.strip().strip('"') for name in found.group(1).split(",")]
            schema = next((name for name in schemas if name and name != "$user"), schema)
    return {**location, "schema": schema}


def loaded_at_query(schema: str) -> str:
    """When the mirror was last known complete for every company: the start of the stalest
    company's last completed pass. Not `max(synced_at)`: a quiet pass writes no row."""
    return f"select min(last_pass_started_at) from {schema}.sync_state"  # noqa: S608 - ours


def _relation(
    published: Published, dialect: Dialect, interval_s: float, schema: str
) -> dict[str, Any]:
    key = list(published.table.primary_key.columns)
    relation: dict[str, Any] = {"name": published.name, "description": published.comment}
    if published.fresh_by_passes:
        relation["loaded_at_query"] = loaded_at_query(schema)
        relation["freshness"] = freshness(interval_s)
    relation["columns"] = [
        _column(column, dialect, in_key=column in key, sole_key=len(key) == 1)
        for column in published.table.columns
    ]
    if len(key) > 1:
        relation["data_tests"] = [{"unique": {"column_name": key_text(key)}}]
    return relation


def _column(
    column: Column[Any], dialect: Dialect, *, in_key: bool, sole_key: bool
) -> dict[str, Any]:
    described: dict[str, Any] = {
        "name": column.name,
        "description": column.comment or "",
        "data_type": column.type.compile(dialect=dialect).lower(),
    }
    if in_key:
        described["data_tests"] = ["not_null", "unique"] if sole_key else ["not_null"]
    return described


def key_text(key: list[Column[Any]]) -> str:
    """SQL for one text value per key, for dbt's single-column `unique` test (plain dbt-core has
    no test for a combination of columns): the key's columns joined by `:`, each but the last
    after its length, so that no two different keys ever join to the same text."""
    parts: list[str] = []
    for position, column in enumerate(key):
        text = column.name if isinstance(column.type, String) else f"cast({column.name} as text)"
        if position < len(key) - 1:
            parts.extend((f"length({text})", "':'", text, "':'"))
        else:
            parts.append(text)
    return " || ".join(parts)
