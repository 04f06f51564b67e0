"""Hostile and broken input: nothing lost, nothing leaked, a clear word for every failure.

Every case goes through real HTTP (the sandbox serves hostile items with `put_raw` and hostile
bodies with its faults) unless a server cannot produce it; then `httpx.MockTransport` stands in.

| area      | case                                  | outcome                                     |
|-----------|---------------------------------------|---------------------------------------------|
| body      | not JSON, not an array, truncated     | fails after retries: exit 5, cursor kept    |
| body      | wrong content type (HTML)             | fails after retries: exit 5, cursor kept    |
| body      | 50 MB (declared, or chunked)          | refused after <= 16 MiB read: exit 5        |
| row       | missing/zero/negative/too large id    | quarantined with its reason; status counts  |
| row       | id as a string, item not an object    | quarantined with its reason                 |
| row       | missing or invalid updated_at         | quarantined with its reason                 |
| row       | text not a string, NUL, surrogate     | quarantined with its reason                 |
| row       | offsets +14:00, -12:00, +05:45        | stored, normalised to UTC                   |
| row       | strings beyond documented lengths     | stored intact                               |
| row       | unknown fields                        | stored in `extra`                           |
| row       | nulls where values were expected      | stored as NULL                              |
| row       | NaN / Infinity in an unknown field    | stored as null in `extra` (both databases)  |
| row       | duplicate id in a page, across pages  | the newest version is stored                |
| filter    | updated_at not after the gt: value    | stored, counted as off_filter, warned       |
| filter    | another client_id than configured     | stored, counted as off_filter, warned       |
| property  | random pages of good and broken items | mirror == valid part; only SyncError raised |
| property  | arbitrary JSON items                  | parsed without raising                      |
| transport | http:// to a non-loopback host        | exit 2 before any request                   |
| transport | turning TLS verification off          | impossible: unknown key, exit 2             |
| transport | api.ca_bundle missing or not PEM      | exit 2 naming the key                       |
| transport | 302 to another host                   | not followed: exit 4, token never sent      |
| config    | missing file, bad TOML, unknown key,  | exit 2, one sentence: problem and fix       |
|           | wrong type, page_size 0/101, no       |                                             |
|           | companies, unreadable token_file      |                                             |
| config    | token in a file others may read       | warning on stderr, the run goes on (not for |
|           |                                       | the sandbox's published token)              |
| database  | PostgreSQL port closed                | exit 6, one sentence, no request sent       |
| database  | read-only database                    | exit 6, committed rows kept                 |
| database  | a contacts table that is not ours     | exit 6, that table untouched                |
| database  | disk full (SQLite max_page_count)     | exit 6, committed rows and cursor kept      |
| secrets   | upstream echoes the token; debug logs | not in output, files, status, metrics       |
| paging    | broken run at a page boundary;        | walked past; counted once in quarantine     |
|           | id-less broken item re-read           | (TestBrokenRuns)                            |
| row       | a quarantined id later served valid   | stored; its entry leaves the quarantine     |

Locks held by another process (exit 7) are covered in test_cli.py; a full disk is
reproduced by capping SQLite's max_page_count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from conftest import make_settings, mirror_rows, run_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from sqlalchemy import Engine, create_engine, event, text
from test_cli import SECRET, one_sentence, write_config

from sync.api import MAX_BODY_BYTES, ContactsClient
from sync.cli import main
from sync.config import Settings, load_settings
from sync.engine import SyncEngine
from sync.errors import SyncError
from sync.log import configure_logging
from sync.metrics import Metrics
from sync.retry import RetryPolicy
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer, UpdatedFilter
from sync.store import MirrorStore

pytestmark = pytest.mark.usefixtures("walk_concurrency")

T_OLD = "2020-01-01T00:00:00.000Z"


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Ran]]:
    """The console script's `main`, in this process (2.5 s of imports saved per call)."""

    def invoke(config: Path, *args: str) -> Ran:
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["contacts-sync", "--config", str(config), *args])
            for name in [n for n in os.environ if n.startswith("CONTACTS_SYNC_")]:
                patch.delenv(name)
            with pytest.raises(SystemExit) as exited:
                main()
        seen = capsys.readouterr()
        code = exited.value.code
        return Ran(code if isinstance(code, int) else 0, seen.out, seen.err)

    yield invoke
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)


def stamp(seconds_ago: float = 0) -> str:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def contact(contact_id: Any, **fields: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": contact_id,
        "created_at": T_OLD,
        "updated_at": T_OLD,
        "client_id": 3,
        "email": f"c{contact_id}@example.com",
        "name": "Ana",
        "surname": "Pérez",
        "role": None,
        "notes": None,
        "linkedin": None,
        "description": None,
        "telephone": None,
    }
    item.update(fields)
    return {k: v for k, v in item.items() if v is not _DROP}


_DROP = object()


@pytest.fixture
def small() -> Iterator[SandboxServer]:
    """A sandbox with 25 generated contacts for company 1 (ids 1..25)."""
    with SandboxServer(SandboxData.generate(("1",), 25, seed=5)) as server:
        yield server


def state_of(db_url: str, company: str = "1") -> Any:
    store = MirrorStore.open(db_url)
    try:
        return store.status([company])[0]
    finally:
        store.close()


def quarantine_reasons(db_url: str) -> list[str]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT reason FROM quarantine"))]
    finally:
        engine.dispose()


def last_pass(db_url: str) -> dict[str, Any]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            value = conn.execute(text("SELECT last_pass FROM sync_state")).scalar_one()
    finally:
        engine.dispose()
    return json.loads(value) if isinstance(value, str) else dict(value)


# --- the sandbox's raw items ----------------------------------------------------------------


class TestSandboxRawItems:
    @pytest.mark.parametrize("order", ["id", "updated_asc", "updated_desc"])
    def test_a_raw_item_takes_its_place_in_every_order(self, order: str) -> None:
        """Served verbatim where its id and updated_at put it, and filtered like any row."""
        data = SandboxData.generate(("1",), 5, seed=1)
        rows = sorted(data.snapshot("1"), key=lambda r: (r["updated_at"], r["id"]))
        middle = datetime.fromisoformat(rows[2]["updated_at"]) + timedelta(microseconds=500)
        data.put_raw("1", {"id": 3, "odd": True}, updated_at=middle)
        data.put_raw(
            "1",
            b'{"id":9,"updated_at":NaN}',
            sort_id=9,
            updated_at=datetime(2000, 1, 1, tzinfo=UTC),
        )
        data.put_raw(
            "1", "stale", sort_id=10, updated_at=datetime(2000, 1, 1, tzinfo=UTC), unfiltered=True
        )
        items = data.page_items(
            "1",
            updated=None,
            client_id=None,
            order=order,  # type: ignore[arg-type]
            offset=0,
            limit=100,
        )
        served = json.loads(b"[" + b",".join(items).replace(b"NaN", b"null") + b"]")
        assert len(items) == 8
        if order == "id":
            assert [r if isinstance(r, str) else r["id"] for r in served] == [
                1,
                2,
                3,
                3,
                4,
                5,
                9,
                "stale",
            ]
        else:
            ascending = served if order == "updated_asc" else served[::-1]
            assert ascending[0:2] == [{"id": 9, "updated_at": None}, "stale"]
            assert ascending[5] == {"id": 3, "odd": True}
        since = UpdatedFilter("gt", datetime(2010, 1, 1, tzinfo=UTC))
        items = data.page_items(
            "1",
            updated=since,
            client_id=None,
            order=order,  # type: ignore[arg-type]
            offset=0,
            limit=100,
        )
        assert len(items) == 7
        assert b'"stale"' in items
        assert not any(b"NaN" in item for item in items)
        assert len(data.snapshot("1")) == 5


# --- upstream rows -------------------------------------------------------------------------

_QUARANTINED = [
    ("missing-id", contact(_DROP), "id is missing"),
    ("null-id", contact(None), "id is missing"),
    ("zero-id", contact(0), "id is less than 1"),
    ("negative-id", contact(-7), "id is less than 1"),
    ("id-over-2^63-1", contact(2**63), "id is larger than a 64-bit integer"),
    ("id-as-string", contact("101"), "id is not an integer"),
    ("id-as-bool", contact(True), "id is not an integer"),
    ("missing-updated_at", contact(102, updated_at=_DROP), "updated_at is missing"),
    ("invalid-updated_at", contact(103, updated_at="2025-13-45T99:00:00Z"), "updated_at is not"),
    ("updated_at-as-number", contact(104, updated_at=1735689600), "updated_at is not a string"),
    ("created_at-garbage", contact(105, created_at="yesterday"), "created_at is not"),
    ("client_id-negative", contact(106, client_id=-1), "client_id is less than 1"),
    ("email-as-number", contact(107, email=42), "email is not a string"),
    ("name-as-object", contact(108, name={"first": "A"}), "name is not a string"),
    ("nul-in-notes", contact(109, notes="a\x00b"), "NUL"),
    ("lone-surrogate", contact(110, surname="\ud800"), "surrogate"),
    ("item-is-a-string", "not a contact", "item is not a JSON object"),
    ("item-is-a-list", [1, 2], "item is not a JSON object"),
    ("item-is-null", None, "item is not a JSON object"),
]


class TestUpstreamRows:
    @pytest.mark.parametrize(
        ("item", "reason"),
        [
            pytest.param(item, reason, id=f"{name}->quarantined")
            for name, item, reason in _QUARANTINED
        ],
    )
    def test_a_broken_row_is_quarantined_and_counted(
        self, small: SandboxServer, sqlite_url: str, item: object, reason: str
    ) -> None:
        """The broken row is quarantined with its reason, every other row is stored."""
        small.data.put_raw("1", item, sort_id=12, updated_at=datetime(2020, 1, 1, tzinfo=UTC))
        report = run_pass(make_settings(small, sqlite_url, api={"page_size": 10}))
        assert report.quarantined >= 1
        assert set(mirror_rows(sqlite_url)) == set(range(1, 26))
        reasons = quarantine_reasons(sqlite_url)
        assert reasons
        assert all(reason in r for r in reasons), reasons
        assert state_of(sqlite_url).quarantined == len(reasons)
        assert state_of(sqlite_url).cursor is not None

    def test_odd_but_valid_rows_are_stored_intact(self, small: SandboxServer, db_url: str) -> None:
        """Odd offsets, over-long strings, unknown fields, nulls and NaN are stored, not lost."""
        long = {"email": "e" * 140 + "@example.com", "name": "n" * 101, "surname": "s" * 101}
        long |= {"role": "r" * 76, "linkedin": "l" * 251, "telephone": "7" * 101}
        served = [
            contact(201, updated_at="2025-01-01T23:30:00.123+14:00"),
            contact(202, updated_at="2025-01-01T00:30:00.000-12:00"),
            contact(203, updated_at="2025-01-01T05:45:00.500+05:45", created_at=None),
            contact(204, **long, description="d" * 20_000),
            contact(205, plan="gold", tags=["a", "b"], nested={"x": [1, {"y": None}]}),
            {"id": 206, "updated_at": T_OLD},
            contact(207, client_id=None, email=None, name=None, surname=None),
            contact(209, big=123456789012345678901234567890, small=-(2**70)),
        ]
        for item in served:
            small.data.put_raw("1", item)
        small.data.put_raw(
            "1", b'{"id":208,"updated_at":"2020-01-01T00:00:00Z","score":NaN,"top":Infinity}'
        )
        report = run_pass(make_settings(small, db_url, api={"page_size": 10}))
        assert report.quarantined == 0
        rows = mirror_rows(db_url)
        assert len(rows) == 25 + 9
        assert rows[201]["updated_at"] == "2025-01-01T09:30:00.123+00:00"
        assert rows[202]["updated_at"] == "2025-01-01T12:30:00.000+00:00"
        assert rows[203]["updated_at"] == "2025-01-01T00:00:00.500+00:00"
        assert rows[203]["created_at"] is None
        assert {k: rows[204][k] for k in long} == long
        assert rows[204]["description"] == "d" * 20_000
        assert rows[205]["extra"] == {
            "plan": "gold",
            "tags": ["a", "b"],
            "nested": {"x": [1, {"y": None}]},
        }
        assert (rows[206]["email"], rows[206]["extra"]) == (None, None)
        assert (rows[207]["client_id"], rows[207]["name"]) == (None, None)
        assert rows[208]["extra"] == {"score": None, "top": None}
        assert rows[209]["extra"] == {"big": 123456789012345678901234567890, "small": -(2**70)}

    def test_duplicate_ids_keep_the_newest_within_and_across_pages(
        self, small: SandboxServer, sqlite_url: str
    ) -> None:
        """Three versions of one id, two in a page and one pages later: the newest is stored."""
        newest = contact(301, updated_at="2024-03-01T00:00:00.000Z", email="newest@example.com")
        small.data.put_raw("1", contact(301, updated_at="2024-01-01T00:00:00.000Z"), sort_id=2)
        small.data.put_raw("1", contact(301, updated_at="2024-02-01T00:00:00.000Z"), sort_id=2)
        small.data.put_raw("1", newest, sort_id=3)
        small.data.put_raw("1", contact(301, updated_at="2023-01-01T00:00:00.000Z"), sort_id=24)
        run_pass(make_settings(small, sqlite_url, api={"page_size": 5}))
        row = mirror_rows(sqlite_url)[301]
        assert (row["email"], row["updated_at"]) == (
            "newest@example.com",
            "2024-03-01T00:00:00.000+00:00",
        )


class TestBrokenRuns:
    """Broken items that paging and quarantine see more than once."""

    def test_a_run_of_broken_items_at_a_page_boundary_is_walked_past(
        self, property_sandbox: SandboxServer, sqlite_url: str
    ) -> None:
        property_sandbox.data.add_company("1")
        items: list[Any] = [contact(i) for i in (1, 2, 3)] + ["broken"] * 3
        items += [contact(i) for i in range(10, 20)]
        for position, item in enumerate(items, start=1):
            property_sandbox.data.put_raw("1", item, sort_id=position)
        run_pass(make_settings(property_sandbox, sqlite_url, api={"page_size": 4}))
        assert len(mirror_rows(sqlite_url)) == 13

    def test_a_broken_item_without_an_id_is_counted_once(
        self, small: SandboxServer, sqlite_url: str
    ) -> None:
        small.data.put_raw(
            "1", contact(_DROP), sort_id=10, updated_at=datetime(2020, 1, 1, tzinfo=UTC)
        )
        settings_ = make_settings(small, sqlite_url, api={"page_size": 10})
        run_pass(settings_)
        run_pass(settings_, backfill=True)
        assert state_of(sqlite_url).quarantined == 1

    def test_a_row_upstream_fixed_leaves_the_quarantine(
        self, small: SandboxServer, sqlite_url: str
    ) -> None:
        """Once upstream serves a quarantined id valid again, it is stored and no longer
        counted as quarantined; a broken item without an id stays."""
        old = datetime(2020, 1, 1, tzinfo=UTC)
        small.data.put_raw("1", contact(103, updated_at="soon"), sort_id=12, updated_at=old)
        small.data.put_raw("1", contact(_DROP), sort_id=13, updated_at=old)
        settings_ = make_settings(small, sqlite_url, api={"page_size": 10})
        run_pass(settings_)
        assert state_of(sqlite_url).quarantined == 2
        small.data.clear_raw("1")
        small.data.put_raw("1", contact(103), sort_id=12)
        small.data.put_raw("1", contact(_DROP), sort_id=13, updated_at=old)
        run_pass(settings_, backfill=True)
        assert 103 in mirror_rows(sqlite_url)
        assert state_of(sqlite_url).quarantined == 1


# --- rows that the filter sent should have excluded ----------------------------------------


class TestOffFilterRows:
    def test_rows_older_than_the_filter_are_stored_counted_and_warned(
        self, small: SandboxServer, sqlite_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An upstream ignoring `gt:` sends old rows: stored, counted, one warning per page."""
        settings = make_settings(small, sqlite_url, sync={"lookback_s": 0})
        run_pass(settings)
        small.data.update("1", [5])
        small.data.put_raw("1", contact(401), unfiltered=True)
        configure_logging("info", "json")
        report = run_pass(settings)
        assert report.off_filter == 1
        assert 401 in mirror_rows(sqlite_url)
        assert last_pass(sqlite_url)["off_filter"] == 1
        warned = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [w["count"] for w in warned if w.get("event") == "rows.off_filter"] == [1]

    def test_rows_of_another_client_are_stored_counted_and_warned(
        self, small: SandboxServer, sqlite_url: str
    ) -> None:
        """With api.client_id set, a row of another client is stored but counted."""
        small.data.put_raw("1", contact(402, client_id=999_999), unfiltered=True)
        report = run_pass(make_settings(small, sqlite_url, api={"client_id": 3}))
        assert report.off_filter == 1
        assert mirror_rows(sqlite_url)[402]["client_id"] == 999_999

    def test_a_faithful_upstream_counts_nothing(
        self, small: SandboxServer, sqlite_url: str
    ) -> None:
        settings = make_settings(small, sqlite_url, api={"client_id": 3}, sync={"lookback_s": 0})
        assert run_pass(settings).off_filter == 0
        small.data.update("1", count=5)
        assert run_pass(settings).off_filter == 0


# --- broken bodies -------------------------------------------------------------------------

_BODIES = ["malformed", "not_array", "truncated", "wrong_content_type", "huge", "huge-chunked"]


class TestBrokenBodies:
    @pytest.mark.parametrize(
        "kind", [pytest.param(k, id=f"{k}->exit5-cursor-kept") for k in _BODIES]
    )
    def test_a_broken_body_fails_the_pass_and_keeps_the_cursor(
        self,
        run: Callable[..., Ran],
        small: SandboxServer,
        sqlite_url: str,
        tmp_path: Path,
        kind: str,
    ) -> None:
        """After retries the pass exits 5 with one sentence; the cursor and rows stay."""
        db_url = sqlite_url
        config = write_config(
            tmp_path / "sync.toml",
            small,
            db_url,
            api={"token": DEFAULT_TOKEN},
            retry={"max_attempts": 2},
        )
        assert run(config, "once").returncode == 0
        before = state_of(db_url)
        small.data.update("1", count=3)
        fault = kind.removesuffix("-chunked")
        small.faults.add(fault, times=2, chunked=kind.endswith("chunked"))  # type: ignore[arg-type]
        done = run(config, "once")
        assert done.returncode == 5
        assert "Company 1:" in one_sentence(done.stderr)
        after = state_of(db_url)
        assert after.cursor == before.cursor
        assert after.contacts == 25
        assert after.last_error

    def test_the_size_cap_stops_reading_early(self) -> None:
        """A 50 MB chunked body is abandoned once 16 MiB have been read, in well under 1 s."""
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            yield b"["
            chunk = b'{"id":1,"updated_at":"2020-01-01T00:00:00Z"},' * 20_000
            while sent < 50_000_000:
                sent += len(chunk)
                yield chunk

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers={"content-type": "application/json"}, content=body())

        client = _mock_client(handler)
        with pytest.raises(SyncError, match="larger than 16 MiB"):
            client.fetch_page("1", offset=0, limit=100, updated_after=None)
        assert MAX_BODY_BYTES < sent <= MAX_BODY_BYTES + 1_000_000


def _mock_client(handler: Any, max_attempts: int = 1) -> ContactsClient:
    settings = Settings(api={"companies": ["1"], "token": "t"})
    policy = RetryPolicy(max_attempts=max_attempts, max_elapsed_s=5, initial_backoff_s=0.01)
    return ContactsClient(settings.api, "t", policy, transport=httpx.MockTransport(handler))


# --- property: random pages ----------------------------------------------------------------

_STAMPS = ["2024-01-01T00:00:00.000Z", "2024-06-01T12:00:00.500+05:45", "2025-01-01T00:00:00-12:00"]
_valid_item = st.builds(
    lambda i, s: {"id": i, "updated_at": _STAMPS[s], "email": f"{i}-{s}@example.com"},
    st.integers(1, 12),
    st.integers(0, len(_STAMPS) - 1),
)
_broken_item = st.sampled_from(
    [
        {"updated_at": _STAMPS[0]},
        {"id": -1, "updated_at": _STAMPS[0]},
        {"id": 5, "updated_at": "soon"},
        {"id": 6, "updated_at": _STAMPS[1], "name": 7},
        "x",
        None,
    ]
)
_pages = st.lists(st.one_of(_valid_item, _valid_item, _valid_item, _broken_item), max_size=25)


class TestRandomPages:
    _served = 0

    @settings(
        max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(items=_pages)
    def test_the_mirror_is_the_valid_part_of_what_was_served(
        self, items: list[Any], property_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """Through real HTTP in pages of 4, the mirror holds the newest valid version of each id."""
        TestRandomPages._served += 1
        company = f"p{TestRandomPages._served}"
        property_sandbox.data.add_company(company)
        for position, item in enumerate(items, start=1):
            property_sandbox.data.put_raw(company, item, sort_id=position)
        url = f"sqlite:///{tmp_path / (company + '.db')}"
        settings_ = make_settings(
            property_sandbox, url, api={"companies": [company], "page_size": 4}
        )
        store = MirrorStore.open(url)
        engine = SyncEngine.from_settings(settings_, store)
        failed: SyncError | None = None
        try:
            engine.sync_company(company)
        except SyncError as exc:
            failed = exc
        finally:
            cursor = store.status([company])[0].cursor
            engine.close()
            store.close()
        if failed is not None:
            # Whatever paging cannot align on must end the pass cleanly, the cursor unmoved.
            assert failed.exit_code == 5
            assert cursor is None
            return
        expected = _newest_valid(items)
        stored = mirror_rows(url, company)
        assert {i: (r["email"], r["updated_at"]) for i, r in stored.items()} == expected

    @settings(max_examples=25, deadline=None)
    @given(
        items=st.lists(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(
                        st.sampled_from(["id", "updated_at", "email", "x"]), inner, max_size=4
                    )
                ),
                max_leaves=6,
            ),
            max_size=8,
        )
    )
    def test_arbitrary_json_items_never_escape_unhandled(self, items: list[Any]) -> None:
        """Any JSON items (over a mock transport): the page parses, nothing raises."""
        body = json.dumps(items).encode()

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers={"content-type": "application/json"}, content=body)

        page = _mock_client(handler).fetch_page("1", offset=0, limit=100, updated_after=None)
        assert page.size == len(items)
        assert len(page.parsed.rejected) + len({r.id for r in page.parsed.rows}) <= len(items)


def _newest_valid(items: list[Any]) -> dict[int, tuple[str, str]]:
    newest: dict[int, tuple[datetime, str]] = {}
    for item in items:
        if not isinstance(item, dict) or set(item) != {"id", "updated_at", "email"}:
            continue
        moment = datetime.fromisoformat(item["updated_at"]).astimezone(UTC)
        if item["id"] not in newest or newest[item["id"]][0] <= moment:
            newest[item["id"]] = (moment, item["email"])
    return {
        i: (email, moment.isoformat(timespec="milliseconds"))
        for i, (moment, email) in newest.items()
    }


@pytest.fixture
def property_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData.generate((), 0)) as server:
        yield server


# --- transport -----------------------------------------------------------------------------


class TestTransport:
    def test_plain_http_to_a_remote_host_is_refused_before_any_request(
        self, run: Callable[..., Ran], tmp_path: Path
    ) -> None:
        config = tmp_path / "sync.toml"
        config.write_text(
            '[api]\nbase_url = "http://crm.example.com"\ntoken_file = "/nonexistent"\n'
            'companies = ["1"]\n'
        )
        done = run(config, "once")
        assert done.returncode == 2
        sentence = one_sentence(done.stderr)
        assert "api.base_url" in sentence
        assert "allow_insecure_http" in sentence

    @pytest.mark.parametrize("key", ["verify", "insecure", "verify_tls"])
    def test_tls_verification_cannot_be_turned_off(
        self, run: Callable[..., Ran], tmp_path: Path, key: str
    ) -> None:
        config = tmp_path / "sync.toml"
        config.write_text(f'[api]\ntoken = "x"\ncompanies = ["1"]\n{key} = false\n')
        done = run(config, "once")
        assert done.returncode == 2
        assert f"api.{key} (unknown key)" in one_sentence(done.stderr)

    @pytest.mark.parametrize(
        ("content", "said"),
        [(None, "cannot read"), ("not a certificate\n", "no PEM")],
        ids=["missing", "not-pem"],
    )
    def test_a_bad_ca_bundle_exits_2(
        self, run: Callable[..., Ran], tmp_path: Path, content: str | None, said: str
    ) -> None:
        bundle = tmp_path / "ca.pem"
        if content is not None:
            bundle.write_text(content)
        config = tmp_path / "sync.toml"
        config.write_text(f'[api]\ntoken = "x"\ncompanies = ["1"]\nca_bundle = "{bundle}"\n')
        done = run(config, "once")
        assert done.returncode == 2
        sentence = one_sentence(done.stderr)
        assert "api.ca_bundle" in sentence
        assert said in sentence

    def test_the_ca_bundle_reaches_the_tls_layer(self, tmp_path: Path) -> None:
        """The client trusts exactly the bundle's CAs, and verification stays on."""
        pem = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        bundle = tmp_path / "ca.pem"
        bundle.write_text(pem[pem.index("-----BEGIN CERTIFICATE-----") : pem.index(end) + len(end)])
        settings_ = Settings(
            api={
                "companies": ["1"],
                "token": "t",
                "base_url": "https://crm.example.com",
                "ca_bundle": str(bundle),
            }
        )
        client = ContactsClient(settings_.api, "t", RetryPolicy(max_attempts=1, max_elapsed_s=1))
        try:
            pool = client._http._transport._pool  # type: ignore[attr-defined]
            context = pool._ssl_context
            assert context.verify_mode == ssl.CERT_REQUIRED
            assert context.check_hostname
            assert len(context.get_ca_certs()) == 1
        finally:
            client.close()

    def test_a_redirect_is_not_followed_and_the_token_stays_home(
        self, run: Callable[..., Ran], small: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """A 302 to another host exits 4; the other host sees no request, let alone the token."""
        with _Trap() as trap, _Redirector(trap.url) as redirector:
            config = write_config(
                tmp_path / "sync.toml", small, sqlite_url, api={"base_url": redirector.url}
            )
            done = run(config, "once")
        assert done.returncode == 4
        assert "redirect" in one_sentence(done.stderr)
        assert redirector.hits >= 1
        assert trap.received == b""


class _Listener:
    """A bare TCP server on loopback, for answers the sandbox must not give."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class _Trap(_Listener):
    received = b""

    def handle(self, conn: socket.socket) -> None:
        self.received += conn.recv(65536)


class _Redirector(_Listener):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.hits = 0

    def handle(self, conn: socket.socket) -> None:
        conn.recv(65536)
        self.hits += 1
        conn.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: {self.target}/api/contacts\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )


# --- configuration -------------------------------------------------------------------------

_CONFIGS = [
    ("missing-file", None, "does not exist"),
    ("toml-syntax", "[api\ntoken = 1\n", "not valid TOML"),
    (
        "unknown-key",
        '[api]\ntoken = "x"\ncompanies = ["1"]\ncolour = "red"\n',
        "api.colour (unknown key)",
    ),
    ("wrong-type", '[api]\ntoken = "x"\ncompanies = ["1"]\npage_size = "many"\n', "api.page_size"),
    ("page_size-0", '[api]\ntoken = "x"\ncompanies = ["1"]\npage_size = 0\n', "api.page_size"),
    ("page_size-101", '[api]\ntoken = "x"\ncompanies = ["1"]\npage_size = 101\n', "api.page_size"),
    ("no-companies", '[api]\ntoken = "x"\ncompanies = []\n', "api.companies"),
    (
        "unreadable-token_file",
        '[api]\ntoken_file = "/nonexistent/t"\ncompanies = ["1"]\n',
        "api.token_file",
    ),
]


class TestConfiguration:
    @pytest.mark.parametrize(
        ("content", "said"), [pytest.param(c, s, id=f"{n}->exit2") for n, c, s in _CONFIGS]
    )
    def test_a_config_problem_exits_2_with_one_sentence(
        self, run: Callable[..., Ran], tmp_path: Path, content: str | None, said: str
    ) -> None:
        config = tmp_path / "sync.toml"
        if content is not None:
            config.write_text(content + f'[database]\nurl = "sqlite:///{tmp_path / "m.db"}"\n')
        done = run(config, "once")
        assert done.returncode == 2
        sentence = one_sentence(done.stderr)
        assert said in sentence
        assert len(sentence.split(". ")) == 1, sentence
        assert re.search(r"\b(fix|create|set|give|use)\b", sentence), sentence
        assert "Traceback" not in done.stderr

    def test_a_token_in_a_file_others_may_read_is_warned_about(
        self, run: Callable[..., Ran], small: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        config = write_config(tmp_path / "sync.toml", small, sqlite_url, api={"token": SECRET})
        small.api.config = SandboxConfig(tokens=(SECRET,))
        config.chmod(0o644)
        done = run(config, "once")
        assert "chmod 600" in done.stderr
        assert SECRET not in done.stderr
        config.chmod(0o600)
        assert "chmod 600" not in run(config, "once").stderr
        token_file = tmp_path / "token"
        token_file.write_text(SECRET)
        token_file.chmod(0o644)
        config = write_config(
            tmp_path / "sync.toml", small, sqlite_url, api={"token_file": str(token_file)}
        )
        config.write_text(config.read_text().replace(f'token = "{SECRET}"\n', ""))
        done = run(config, "once")
        assert done.returncode == 0
        assert f"chmod 600 {token_file}" in done.stderr

    def test_the_sandbox_token_is_not_warned_about(
        self, run: Callable[..., Ran], small: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        config = write_config(
            tmp_path / "sync.toml", small, sqlite_url, api={"token": DEFAULT_TOKEN}
        )
        config.chmod(0o644)
        done = run(config, "once")
        assert done.returncode == 0
        assert "chmod" not in done.stderr


# --- database ------------------------------------------------------------------------------


class TestDatabase:
    def test_an_unreachable_postgresql_exits_6(
        self, run: Callable[..., Ran], small: SandboxServer, tmp_path: Path
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"postgresql+psycopg://postgres:pw-9x@127.0.0.1:{port}/test"
        config = write_config(tmp_path / "sync.toml", small, url, api={"token": DEFAULT_TOKEN})
        done = run(config, "once")
        assert done.returncode == 6
        sentence = one_sentence(done.stderr)
        assert "database.url" in sentence
        assert "pw-9x" not in done.stderr
        assert small.requests() == []

    @pytest.mark.postgres
    def test_a_read_only_database_exits_6_and_keeps_what_was_committed(
        self, run: Callable[..., Ran], small: SandboxServer, pg_url: str, tmp_path: Path
    ) -> None:
        config = write_config(tmp_path / "sync.toml", small, pg_url, api={"token": DEFAULT_TOKEN})
        assert run(config, "once").returncode == 0
        before = mirror_rows(pg_url)
        engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                name = conn.execute(text("SELECT current_database()")).scalar_one()
                conn.execute(
                    text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
                )
        finally:
            engine.dispose()
        small.data.update("1", count=3)
        done = run(config, "once")
        assert done.returncode == 6
        assert "read-only" in one_sentence(done.stderr)
        assert mirror_rows(pg_url) == before

    def test_a_full_disk_exits_6_and_keeps_what_was_committed(
        self, run: Callable[..., Ran], small: SandboxServer, sqlite_url: str, tmp_path: Path
    ) -> None:
        """SQLite capped at its current size (max_page_count) stands in for a full disk."""
        config = write_config(
            tmp_path / "sync.toml", small, sqlite_url, api={"token": DEFAULT_TOKEN}
        )
        assert run(config, "once").returncode == 0
        before, cursor = mirror_rows(sqlite_url), state_of(sqlite_url).cursor
        small.data.insert("1", count=400)

        def cap(dbapi_connection: Any, record: Any) -> None:
            pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        event.listen(Engine, "connect", cap)
        try:
            done = run(config, "once")
        finally:
            event.remove(Engine, "connect", cap)
        assert done.returncode == 6
        assert "out of space" in one_sentence(done.stderr)
        assert mirror_rows(sqlite_url) == before
        assert state_of(sqlite_url).cursor == cursor

    def test_a_contacts_table_not_ours_exits_6_untouched(
        self, run: Callable[..., Ran], small: SandboxServer, db_url: str, tmp_path: Path
    ) -> None:
        engine = create_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE contacts (who TEXT)"))
                conn.execute(text("INSERT INTO contacts VALUES ('theirs')"))
        finally:
            engine.dispose()
        config = write_config(tmp_path / "sync.toml", small, db_url, api={"token": DEFAULT_TOKEN})
        done = run(config, "once")
        assert done.returncode == 6
        one_sentence(done.stderr)
        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT who FROM contacts")).all() == [("theirs",)]
        finally:
            engine.dispose()


# --- secrets -------------------------------------------------------------------------------


class TestSecrets:
    def test_the_token_is_nowhere_even_when_upstream_echoes_it(
        self, run: Callable[..., Ran], sqlite_url: str, tmp_path: Path
    ) -> None:
        """An upstream quoting the token back in its errors: still not in output, DB or status."""
        data = SandboxData.generate(("1", "2"), 30, seed=2)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as server, _Echo(SECRET) as echo:
            config = write_config(
                tmp_path / "sync.toml",
                server,
                sqlite_url,
                api={"companies": ["1", "2"]},
                log={"level": "debug", "format": "json"},
            )
            server.faults.add("malformed", company="1")
            outputs = [run(config, "once")]
            echoed = write_config(
                tmp_path / "echo.toml", server, sqlite_url, api={"base_url": echo.url}
            )
            outputs += [run(echoed, "once"), run(config, "status"), run(config, "status", "--json")]
            server.faults.add("500", times=2)
            exposition = _metrics_after_a_pass(config)
        assert outputs[0].returncode == 0
        assert outputs[1].returncode == 3
        assert "[redacted]" in outputs[1].stderr
        seen = "".join(o.stdout + o.stderr for o in outputs)
        assert SECRET not in seen
        for path in tmp_path.iterdir():
            if path.suffix != ".toml" and path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
        assert "contacts_sync_retries" in exposition
        assert SECRET not in exposition


def _metrics_after_a_pass(config: Path) -> str:
    """The metrics exposition after a failing pass with retries, as a scrape would see it."""
    metrics = Metrics()
    settings_ = load_settings(config)
    store = MirrorStore.open(settings_.database.url)
    engine = SyncEngine.from_settings(settings_, store, observer=metrics)
    metrics.track_retries(lambda: engine.retries)
    try:
        for outcome in engine.sync_all(settings_.api.companies):
            metrics.count(outcome.company_id, "sync", "ok" if outcome.error is None else "failed")
    finally:
        engine.close()
        store.close()
    return generate_latest(metrics.registry).decode()


class _Echo(_Listener):
    """Answers 401 with the request's own Authorization header in the message."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def handle(self, conn: socket.socket) -> None:
        request = conn.recv(65536).decode("latin-1")
        auth = next(
            (line for line in request.split("\r\n") if line.lower().startswith("authorization")),
            "",
        )
        body = json.dumps({"key": "unauthorized", "message": f"bad {auth}"}).encode()
        head = (
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + body)
