"""The sandbox upstream, exercised over real HTTP on loopback as the product's client sees it."""

from __future__ import annotations

import itertools
import json
import logging
import re
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from sync.rows import CONTACT_FIELDS, TEXT_FIELDS, parse_timestamp
from sync.sandbox import (
    DEFAULT_TOKEN,
    FAULT_KINDS,
    MAX_LENGTHS,
    ORDERS,
    TIE_ORDERS,
    Mutator,
    Order,
    SandboxConfig,
    SandboxData,
    SandboxServer,
    TieOrder,
    serve_forever,
)

CONTACTS = 450
VIEWER_TOKEN = "viewer-without-crm-view"
RENDERED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}(Z|[+-]\d{2}:\d{2})")
_company_ids = itertools.count(100)
_TLS = ssl.create_default_context()
"""Loaded once: every httpx client would otherwise spend ~60 ms reading the CA bundle."""


@pytest.fixture(scope="module")
def data() -> SandboxData:
    return SandboxData.generate(("1", "2"), CONTACTS, seed=7)


@pytest.fixture(scope="module")
def server(data: SandboxData) -> Iterator[SandboxServer]:
    config = SandboxConfig(tokens_without_view=(VIEWER_TOKEN,), forbidden_companies=("9",))
    with SandboxServer(data, config) as running:
        yield running


@pytest.fixture(autouse=True)
def _reset_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Faults, mutators and the request log never leak from one test into the next."""
    yield
    if "server" in request.fixturenames:
        running: SandboxServer = request.getfixturevalue("server")
        running.faults.clear()
        running.faults.latency_ms = 0
        running.stop_mutating()
        running.clear_requests()


@pytest.fixture(scope="module")
def client(server: SandboxServer) -> Iterator[httpx.Client]:
    """Authorised for company 1 on the shared server; other headers are passed per request."""
    with httpx.Client(
        base_url=server.base_url, headers=server.headers("1"), timeout=5, verify=_TLS
    ) as http:
        yield http


@pytest.fixture(scope="module")
def anonymous() -> Iterator[httpx.Client]:
    """No default headers or base URL, for auth cases and other servers."""
    with httpx.Client(timeout=5, verify=_TLS) as http:
        yield http


@pytest.fixture
def company(data: SandboxData) -> str:
    """A company of its own, so a test may change its rows freely."""
    name = str(next(_company_ids))
    data.add_company(name, 300)
    return name


def _utc(item: dict[str, Any], name: str = "updated_at") -> datetime:
    return parse_timestamp(item[name])


def _page_all(
    http: httpx.Client, company: str = "1", limit: int = 100, **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    offset = 0
    while True:
        response = http.get(
            "/api/contacts",
            params={"limit": limit, "offset": offset, **params},
            headers={"X-Company-Id": company},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page)
        if len(page) < limit:
            return items
        offset += limit


def _failures(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 400
    body = response.json()
    assert body["key"] == "invalid_data"
    assert body["message"] == "You provided invalid data. Check 'failures' for details."
    return {failure["field"]: failure["message"] for failure in body["failures"]}


class TestSandboxData:
    def test_same_seed_and_clock_give_the_same_rows(self) -> None:
        """Generation is deterministic given the seed and the clock's anchor."""
        frozen = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        first = SandboxData.generate(("1", "2"), 200, seed=3, clock=lambda: frozen)
        second = SandboxData.generate(("1", "2"), 200, seed=3, clock=lambda: frozen)
        other = SandboxData.generate(("1",), 200, seed=4, clock=lambda: frozen)
        assert first.snapshot("1") == second.snapshot("1")
        assert first.snapshot("2") == second.snapshot("2")
        assert first.snapshot("1") != other.snapshot("1")
        assert first.snapshot("1") != first.snapshot("2")

    def test_rows_are_dense_valid_and_settled(self, data: SandboxData) -> None:
        """Ids are 1..n, client ids 1..20, created <= updated, all over a minute old."""
        rows = data.snapshot("1")
        assert [row["id"] for row in rows] == list(range(1, CONTACTS + 1))
        assert all(list(row) == list(CONTACT_FIELDS) for row in rows)
        assert {row["client_id"] for row in rows} <= set(range(1, 21))
        settled = datetime.now(UTC) - timedelta(minutes=1)
        assert all(_utc(row, "created_at") <= _utc(row) <= settled for row in rows)
        oldest = min(_utc(row, "created_at") for row in rows)
        assert settled - oldest > timedelta(days=600)

    def test_timestamps_have_milliseconds_and_mixed_offsets(self, data: SandboxData) -> None:
        """Stamps render with 3 fractional digits, mostly as Z but some with other offsets."""
        rows = data.snapshot("1")
        stamps = [row[name] for row in rows for name in ("created_at", "updated_at")]
        assert all(RENDERED.fullmatch(stamp) for stamp in stamps)
        suffixes = Counter(stamp[23:] for stamp in stamps)
        assert suffixes["Z"] > len(stamps) / 2
        assert {"+02:00", "-05:30"} <= set(suffixes)
        assert any(not stamp.endswith(".000Z") for stamp in stamps)
        assert any(".000" in row["updated_at"] for row in rows)

    def test_non_utc_rendering_is_the_same_instant(self) -> None:
        """A row rendered at +02:00 shows the wall time two hours ahead of UTC."""
        frozen = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        rows = SandboxData.generate(("1",), 200, clock=lambda: frozen).snapshot("1")
        shifted = next(row for row in rows if row["updated_at"].endswith("+02:00"))
        local = datetime.fromisoformat(shifted["updated_at"])
        assert local.utcoffset() == timedelta(hours=2)
        assert _utc(shifted).hour == (local.hour - 2) % 24

    def test_ties_include_a_group_wider_than_a_page(self, data: SandboxData) -> None:
        """Some rows share one updated_at exactly; one group is larger than 100 rows."""
        sizes = Counter(_utc(row) for row in data.snapshot("1"))
        assert max(sizes.values()) >= 150
        assert sum(1 for size in sizes.values() if 2 <= size < 150) >= 3

    def test_strings_reach_the_documented_limits(self, data: SandboxData) -> None:
        """Some values sit exactly at each documented maximum and none go beyond it."""
        rows = data.snapshot("1")
        for name, limit in MAX_LENGTHS.items():
            lengths = [len(row[name]) for row in rows if row[name] is not None]
            assert max(lengths) == limit, name

    def test_text_has_unicode_and_nulls(self, data: SandboxData) -> None:
        """Accents, CJK and emoji appear, and every text field is sometimes null."""
        rows = data.snapshot("1")
        text = "".join(str(row[name]) for row in rows for name in TEXT_FIELDS)
        assert "é" in text
        assert "田" in text
        assert "🚀" in text
        for name in TEXT_FIELDS:
            assert any(row[name] is None for row in rows), name

    def test_update_stamps_strictly_later_with_a_change(self) -> None:
        """Updates take the sandbox clock, strictly increasing even when time stands still."""
        frozen = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        data = SandboxData.generate(("1",), 50, clock=lambda: frozen)
        before = {row["id"]: row for row in data.snapshot("1")}
        updated = data.update("1", count=3)
        assert len(updated) == 3
        stamps = sorted(_utc(data.get("1", contact_id) or {}) for contact_id in updated)
        assert stamps == [
            frozen,
            frozen + timedelta(milliseconds=1),
            frozen + timedelta(milliseconds=2),
        ]
        for contact_id in updated:
            after = data.get("1", contact_id)
            assert after is not None
            changed = {k for k in CONTACT_FIELDS if after[k] != before[contact_id][k]}
            assert changed - {"updated_at"}, contact_id

    def test_update_with_same_stamp_makes_a_tie(self) -> None:
        """`same_stamp` gives every updated row one shared updated_at."""
        data = SandboxData.generate(("1",), 50)
        updated = data.update("1", [3, 4, 5], same_stamp=True)
        assert len({_utc(data.get("1", i) or {}) for i in updated}) == 1

    def test_insert_and_late_commit(self) -> None:
        """Inserts get new ids; an explicit past updated_at is kept as given."""
        data = SandboxData.generate(("1",), 20)
        late = datetime(2024, 3, 1, 8, 30, 0, 123456, tzinfo=UTC)
        assert data.insert("1", 2) == [21, 22]
        assert data.insert("1", updated_at=late) == [23]
        row = data.get("1", 23)
        assert row is not None
        assert _utc(row) == late.replace(microsecond=123000)

    def test_delete_and_unknown_ids(self) -> None:
        """Deleted rows vanish; asking for a missing id is an error, not a silent no-op."""
        data = SandboxData.generate(("1",), 20)
        assert data.delete("1", [2, 3]) == [2, 3]
        assert data.ids("1") == set(range(1, 21)) - {2, 3}
        with pytest.raises(KeyError):
            data.update("1", [3])
        assert data.insert("1") == [21]

    def test_touched_since_reports_changes_after_the_mark(self) -> None:
        """Ids updated, inserted or deleted after the mark are reported, earlier ones not."""
        data = SandboxData.generate(("1", "2"), 30)
        data.update("1", [1])
        mark = data.mark()
        data.update("1", [2])
        data.delete("1", [3])
        inserted = data.insert("1")
        data.update("2", [4])
        assert data.touched_since("1", mark) == {2, 3, *inserted}
        assert data.touched_since("2", mark) == {4}

    def test_bulk_tie_gives_existing_rows_one_new_stamp(self) -> None:
        """`bulk_tie` makes a tie group of exactly `count` existing rows, later than every other."""
        data = SandboxData.generate(("1",), 2000, seed=4)
        tied = data.bulk_tie("1", 1500)
        rows = {row["id"]: row for row in data.snapshot("1")}
        assert len(set(tied)) == 1500
        assert set(tied) <= set(range(1, 2001))
        (stamp,) = {_utc(rows[i]) for i in tied}
        assert all(_utc(row) < stamp for i, row in rows.items() if i not in set(tied))
        with pytest.raises(ValueError, match="count >= 2"):
            data.bulk_tie("1", 1)


class TestAuthAndHeaders:
    def test_missing_token_is_401(self, server: SandboxServer, anonymous: httpx.Client) -> None:
        """No Authorization header is a 401 with the `unauthorized` key."""
        response = anonymous.get(server.contacts_url, headers={"X-Company-Id": "1"})
        assert response.status_code == 401
        assert response.json()["key"] == "unauthorized"

    def test_unknown_token_is_401(self, server: SandboxServer, anonymous: httpx.Client) -> None:
        """A token the upstream does not know is a 401."""
        response = anonymous.get(server.contacts_url, headers=server.headers("1", token="nope"))
        assert response.status_code == 401
        assert set(response.json()) == {"key", "message"}

    def test_token_without_view_is_403(
        self, server: SandboxServer, anonymous: httpx.Client
    ) -> None:
        """A valid token lacking crm.view is a 403 for any company."""
        response = anonymous.get(
            server.contacts_url, headers=server.headers("1", token=VIEWER_TOKEN)
        )
        assert response.status_code == 403
        assert response.json()["key"] == "forbidden"

    def test_forbidden_company_is_403(self, client: httpx.Client) -> None:
        """A company the token may not access is a 403."""
        response = client.get("/api/contacts", headers={"X-Company-Id": "9"})
        assert response.status_code == 403
        assert response.json()["key"] == "forbidden"

    @pytest.mark.parametrize(
        "headers",
        [{"X-Company-Id": ""}, {"X-Company-Id": "404"}, {"X-Api-Version": "1999-01"}],
        ids=["empty-company", "unknown-company", "unknown-version"],
    )
    def test_precondition_failures_are_412(
        self, server: SandboxServer, headers: dict[str, str], anonymous: httpx.Client
    ) -> None:
        """A missing or unknown company, or an unknown version, is a 412."""
        response = anonymous.get(server.contacts_url, headers={**server.headers("1"), **headers})
        assert response.status_code == 412
        assert response.json()["key"] == "precondition_failure"

    def test_missing_company_header_is_412(
        self, server: SandboxServer, anonymous: httpx.Client
    ) -> None:
        """Without the company header at all the answer is a 412."""
        headers = {"Authorization": server.headers()["Authorization"]}
        assert anonymous.get(server.contacts_url, headers=headers).status_code == 412

    def test_accepted_version_and_missing_version_pass(self, client: httpx.Client) -> None:
        """A known version passes, and so does none when it is not required."""
        assert client.get("/api/contacts", headers={"X-Api-Version": "2024-01"}).status_code == 200
        assert client.get("/api/contacts").status_code == 200

    def test_configured_header_names_and_required_version(self, data: SandboxData) -> None:
        """Header names come from the config; a required version must be sent."""
        config = SandboxConfig(
            company_header="X-Tenant", version_header="X-Version", require_version=True
        )
        with SandboxServer(data, config) as strict, httpx.Client(verify=_TLS) as http:
            headers = strict.headers("1")
            assert "X-Tenant" in headers
            assert http.get(strict.contacts_url, headers=headers).status_code == 412
            versioned = {**headers, "X-Version": "2024-01"}
            assert http.get(strict.contacts_url, headers=versioned).status_code == 200
            legacy = {
                "X-Company-Id": "1",
                "X-Version": "2024-01",
                "Authorization": headers["Authorization"],
            }
            assert http.get(strict.contacts_url, headers=legacy).status_code == 412


class TestQueryValidation:
    def test_400_lists_every_failure_in_the_documented_shape(self, client: httpx.Client) -> None:
        """All invalid parameters are reported together under `failures`."""
        response = client.get(
            "/api/contacts",
            params={"limit": "0", "offset": "-1", "client_id": "x", "updated_at": "yesterday"},
        )
        assert set(response.json()) == {"key", "message", "failures"}
        assert set(_failures(response)) == {"limit", "offset", "client_id", "updated_at"}

    @pytest.mark.parametrize("limit", ["0", "101", "-5", "ten", "", "1.5"])
    def test_limit_outside_1_to_100_is_rejected(self, client: httpx.Client, limit: str) -> None:
        """`limit` must be an integer from 1 to 100."""
        assert "limit" in _failures(client.get("/api/contacts", params={"limit": limit}))

    @pytest.mark.parametrize("params", [{"offset": "-1"}, {"offset": "a"}, {"client_id": "0"}])
    def test_offset_and_client_id_bounds(
        self, client: httpx.Client, params: dict[str, str]
    ) -> None:
        """`offset` must be >= 0 and `client_id` >= 1."""
        assert set(_failures(client.get("/api/contacts", params=params))) == set(params)

    def test_limit_defaults_to_100(self, client: httpx.Client) -> None:
        """Without `limit` a page holds 100 items."""
        assert len(client.get("/api/contacts").json()) == 100

    @pytest.mark.parametrize(
        "value",
        [
            "gt:2024-01-01T20:00:00.000Z",
            "2024-01-01T20:00:00",
            "2024-01-01T20:00Z",
            "gt:2024-13-01T20:00:00Z",
            "gt:2024-01-01t20:00:00z",
            "gt:",
            "eq:2024-01-01T20:00:00Z",
            "2024-01-01",
        ],
    )
    def test_bad_timestamps_are_rejected(self, client: httpx.Client, value: str) -> None:
        """Only whole-second ISO 8601 with Z or an offset is accepted, as documented."""
        response = client.get("/api/contacts", params={"updated_at": value})
        assert _failures(response) == {"updated_at": _failures(response)["updated_at"]}

    def test_raw_plus_decodes_to_a_space_and_is_rejected(self, client: httpx.Client) -> None:
        """A raw `+` in the query string becomes a space upstream, so the value is invalid."""
        raw = client.get("/api/contacts?updated_at=gt:2024-01-01T20:00:00+02:00")
        assert "updated_at" in _failures(raw)
        encoded = client.get("/api/contacts?updated_at=gt:2024-01-01T20:00:00%2B02:00")
        assert encoded.status_code == 200
        assert (
            client.get(
                "/api/contacts", params={"updated_at": "gt:2024-01-01T20:00:00+02:00"}
            ).status_code
            == 200
        )


class TestFilters:
    @pytest.fixture
    def rows(self, data: SandboxData) -> list[dict[str, Any]]:
        return data.snapshot("1")

    def _median(self, rows: list[dict[str, Any]]) -> datetime:
        stamps = sorted(_utc(row) for row in rows)
        return stamps[len(stamps) // 2].replace(microsecond=0)

    def test_gt_returns_rows_strictly_after(
        self, client: httpx.Client, rows: list[dict[str, Any]]
    ) -> None:
        """`gt:<ts>` lists exactly the rows updated after the instant."""
        cut = self._median(rows)
        served = _page_all(client, updated_at=f"gt:{cut:%Y-%m-%dT%H:%M:%S}Z")
        assert {r["id"] for r in served} == {r["id"] for r in rows if _utc(r) > cut}

    def test_lt_returns_rows_strictly_before(
        self, client: httpx.Client, rows: list[dict[str, Any]]
    ) -> None:
        """`lt:<ts>` lists exactly the rows updated before the instant."""
        cut = self._median(rows)
        served = _page_all(client, updated_at=f"lt:{cut:%Y-%m-%dT%H:%M:%S}Z")
        assert {r["id"] for r in served} == {r["id"] for r in rows if _utc(r) < cut}

    def test_offset_timestamp_is_the_same_instant(
        self, client: httpx.Client, rows: list[dict[str, Any]]
    ) -> None:
        """`gt:` with +02:00 selects the same rows as the equivalent Z instant."""
        cut = self._median(rows)
        local = cut.astimezone(timezone(timedelta(hours=2)))
        as_utc = _page_all(client, updated_at=f"gt:{cut:%Y-%m-%dT%H:%M:%S}Z")
        as_local = _page_all(client, updated_at=f"gt:{local.isoformat()}")
        assert as_local == as_utc

    def test_plain_timestamp_selects_its_utc_date(
        self, client: httpx.Client, rows: list[dict[str, Any]]
    ) -> None:
        """A plain `<ts>` lists the rows updated on the UTC date of that instant."""
        day = _utc(rows[0]).date()
        next_morning_at_plus_two = f"{day + timedelta(days=1):%Y-%m-%d}T01:30:00+02:00"
        served = _page_all(client, updated_at=next_morning_at_plus_two)
        expected = {r["id"] for r in rows if _utc(r).date() == day}
        assert {r["id"] for r in served} == expected
        assert 1 in expected

    def test_client_id_filters_and_combines(
        self, client: httpx.Client, rows: list[dict[str, Any]]
    ) -> None:
        """`client_id` narrows the list, alone or with an updated_at filter."""
        cut = self._median(rows)
        served = _page_all(client, client_id=5, updated_at=f"gt:{cut:%Y-%m-%dT%H:%M:%S}Z")
        expected = {r["id"] for r in rows if r["client_id"] == 5 and _utc(r) > cut}
        assert {r["id"] for r in served} == expected
        assert expected


class TestPaging:
    def test_paging_returns_every_row_once_exactly_as_stored(
        self, client: httpx.Client, data: SandboxData
    ) -> None:
        """With nothing changing, offsets walk the whole list once, field for field."""
        assert _page_all(client, limit=37) == data.snapshot("1")

    def test_response_is_json_with_a_date_header(self, client: httpx.Client) -> None:
        """A page is application/json and carries uvicorn's Date header."""
        response = client.get("/api/contacts", params={"limit": 2})
        assert response.headers["content-type"] == "application/json"
        assert "date" in response.headers
        assert response.content.startswith(b"[{")
        assert response.content.endswith(b"}]")

    def test_offset_past_the_end_is_an_empty_page(self, client: httpx.Client) -> None:
        """Past the last row the page is `[]`, which ends a pass."""
        response = client.get("/api/contacts", params={"offset": 10_000})
        assert response.status_code == 200
        assert response.content == b"[]"


@pytest.fixture(scope="module", params=ORDERS)
def ordered_server(request: pytest.FixtureRequest, data: SandboxData) -> Iterator[SandboxServer]:
    with SandboxServer(data, SandboxConfig(order=request.param)) as running:
        yield running


class TestOrders:
    def test_pages_follow_the_configured_order(self, ordered_server: SandboxServer) -> None:
        """Each order serves every row once, ties broken by id, desc the reverse of asc."""
        with httpx.Client(
            base_url=ordered_server.base_url, headers=ordered_server.headers(), verify=_TLS
        ) as http:
            served = _page_all(http)
        keys = [(_utc(row), row["id"]) for row in served]
        order: Order = ordered_server.config.order
        if order == "id":
            expected = sorted(keys, key=lambda key: key[1])
        else:
            expected = sorted(keys, reverse=order == "updated_desc")
        assert keys == expected
        assert len(keys) == CONTACTS

    @pytest.mark.parametrize("ordered_server", ["updated_asc", "updated_desc"], indirect=True)
    def test_big_tie_straddles_a_page_boundary(self, ordered_server: SandboxServer) -> None:
        """In updated order the 150-row tie spans two 100-row pages."""
        with httpx.Client(
            base_url=ordered_server.base_url, headers=ordered_server.headers(), verify=_TLS
        ) as http:
            pages = [
                http.get("/api/contacts", params={"offset": offset}).json()
                for offset in range(0, CONTACTS, 100)
            ]
        stamp, size = Counter(_utc(r) for page in pages for r in page).most_common(1)[0]
        holding = [n for n, page in enumerate(pages) if any(_utc(r) == stamp for r in page)]
        assert size >= 150
        assert len(holding) >= 2


@contextmanager
def _serving(data: SandboxData, **config: Any) -> Iterator[tuple[SandboxServer, httpx.Client]]:
    """A server of its own with `config`, and a client authorised for company 1."""
    with (
        SandboxServer(data, SandboxConfig(**config)) as running,
        httpx.Client(
            base_url=running.base_url, headers=running.headers(), timeout=5, verify=_TLS
        ) as http,
    ):
        yield running, http


def _ids(page: list[dict[str, Any]]) -> list[int]:
    return [row["id"] for row in page]


class TestPageCap:
    def test_page_cap_bounds_every_page_whatever_limit_asks(self, data: SandboxData) -> None:
        """With page_cap 40 a page holds at most 40 rows and the next offset continues there."""
        with _serving(data, page_cap=40) as (running, http):
            first = http.get("/api/contacts", params={"limit": 100}).json()
            small = http.get("/api/contacts", params={"limit": 25}).json()
            next_page = http.get("/api/contacts", params={"limit": 100, "offset": 40}).json()
            walked = _page_all(http, limit=40)
            assert [r.items for r in running.requests()][:3] == [40, 25, 40]
        assert _ids(first) == list(range(1, 41))
        assert _ids(small) == list(range(1, 26))
        assert _ids(next_page) == list(range(41, 81))
        assert walked == data.snapshot("1")


class TestMaxOffset:
    def test_reject_answers_the_documented_400_naming_offset(self, data: SandboxData) -> None:
        """Past max_offset the answer is 400 invalid_data naming `offset`; at it, a page."""
        with _serving(data, max_offset=200) as (_, http):
            at_limit = http.get("/api/contacts", params={"offset": 200})
            beyond = http.get("/api/contacts", params={"offset": 201})
        assert _ids(at_limit.json()) == list(range(201, 301))
        assert beyond.status_code == 400
        assert beyond.json() == {
            "key": "invalid_data",
            "message": "You provided invalid data. Check 'failures' for details.",
            "failures": [{"field": "offset", "message": "must be less than or equal to 200"}],
        }

    def test_clamp_serves_the_page_at_max_offset_for_any_larger_offset(
        self, data: SandboxData
    ) -> None:
        """In clamp mode every offset past max_offset silently gets the page at max_offset."""
        with _serving(data, max_offset=200, offset_mode="clamp") as (_, http):
            pages = {
                offset: http.get("/api/contacts", params={"offset": offset, "limit": 50})
                for offset in (199, 200, 201, 449, 10_000)
            }
        assert {response.status_code for response in pages.values()} == {200}
        assert _ids(pages[200].json()) == list(range(201, 251))
        assert pages[201].content == pages[449].content == pages[10_000].content
        assert pages[201].content == pages[200].content
        assert pages[199].content != pages[200].content


TIED_CONTACTS = 3000


@pytest.fixture(scope="module")
def tied() -> tuple[SandboxData, set[int], set[int]]:
    """3,000 rows: a bulk edit tied 2,500 of them, then a later one tied 30 others."""
    data = SandboxData.generate(("1",), TIED_CONTACTS, seed=5)
    big = set(data.bulk_tie("1", 2500))
    small = set(sorted(data.ids("1") - big)[:30])
    data.update("1", small, same_stamp=True)
    return data, small, big


def _expected_order(data: SandboxData, order: Order) -> list[dict[str, Any]]:
    """Every row in `order`, ties by id: what the stable tie order serves."""
    rows = sorted(data.snapshot("1"), key=lambda row: (_utc(row), row["id"]))
    return rows[::-1] if order == "updated_desc" else rows


class TestTieOrders:
    @pytest.mark.parametrize("order", ["updated_asc", "updated_desc"])
    @pytest.mark.parametrize("tie_order", TIE_ORDERS)
    def test_only_ties_move_and_each_page_serves_a_row_once(
        self, tied: tuple[SandboxData, set[int], set[int]], order: Order, tie_order: TieOrder
    ) -> None:
        """Untied rows keep their place; a tie position holds a member of that tie, never twice."""
        data, _, _ = tied
        expected = _expected_order(data, order)
        sizes = Counter(_utc(row) for row in expected)
        served: list[dict[str, Any]] = []
        with _serving(data, order=order, tie_order=tie_order) as (_, http):
            for offset in range(0, TIED_CONTACTS, 100):
                page = http.get("/api/contacts", params={"offset": offset}).json()
                assert len(set(_ids(page))) == len(page) == 100
                for position, row in enumerate(page, start=offset):
                    wanted = expected[position]
                    if sizes[_utc(wanted)] == 1:
                        assert row == wanted
                    else:
                        assert _utc(row) == _utc(wanted)
                served.extend(page)
        assert (served == expected) is (tie_order == "stable")

    def test_per_page_repeats_a_window_but_reorders_another(
        self, tied: tuple[SandboxData, set[int], set[int]]
    ) -> None:
        """per_page serves one offset+limit identically, and another offset+limit differently."""
        data, _, big = tied
        with _serving(data, order="updated_desc", tie_order="per_page") as (_, http):

            def ids(offset: int, limit: int) -> list[int]:
                params = {"offset": offset, "limit": limit}
                return _ids(http.get("/api/contacts", params=params).json())

            window = ids(100, 100)
            assert ids(100, 100) == window
            assert set(window) <= big
            assert ids(150, 50) == window[50:]
            assert ids(100, 50) != window[:50]
            assert ids(100, 50) == ids(100, 50)

    def test_per_request_shuffles_a_tie_afresh_on_every_request(
        self, tied: tuple[SandboxData, set[int], set[int]]
    ) -> None:
        """Two identical per_request requests order a tie differently, each member once."""
        data, small, _ = tied
        with _serving(data, order="updated_desc", tie_order="per_request") as (_, http):
            first, second = (_ids(http.get("/api/contacts").json()) for _ in range(2))
        assert sorted(first[:30]) == sorted(second[:30]) == sorted(small)
        assert first[:30] != second[:30]
        assert first[30:] != second[30:]

    def test_id_order_ignores_the_tie_order(self, data: SandboxData) -> None:
        """The id order has no ties to reorder, so per_request serves it exactly as stable."""
        with _serving(data, tie_order="per_request") as (_, http):
            assert _page_all(http) == data.snapshot("1")


class TestFaults:
    @pytest.mark.parametrize("kind", ["408", "412", "425", "500", "503"])
    def test_status_faults_answer_json_errors(
        self, server: SandboxServer, client: httpx.Client, kind: str
    ) -> None:
        """Status faults answer their code with a JSON error, once, then normal service resumes."""
        server.faults.add(kind)  # type: ignore[arg-type]
        response = client.get("/api/contacts")
        assert response.status_code == int(kind)
        assert response.json()["key"]
        assert client.get("/api/contacts").status_code == 200

    @pytest.mark.parametrize(("kind", "key"), [("408", "request_timeout"), ("425", "too_early")])
    def test_408_and_425_are_json_errors(
        self, server: SandboxServer, client: httpx.Client, kind: str, key: str
    ) -> None:
        """408 and 425 answer their status with a JSON body of key and message."""
        server.faults.add(kind)  # type: ignore[arg-type]
        response = client.get("/api/contacts")
        assert response.status_code == int(kind)
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"key", "message"}
        assert response.json()["key"] == key

    @pytest.mark.parametrize(("limit", "kept"), [(10, 5), (5, 3), (1, 1)])
    def test_short_page_drops_its_second_half(
        self, server: SandboxServer, client: httpx.Client, limit: int, kept: int
    ) -> None:
        """`short` serves the first half of the real page, never an empty one, just once."""
        whole = client.get("/api/contacts", params={"limit": limit, "offset": 20}).json()
        server.faults.add("short")
        short = client.get("/api/contacts", params={"limit": limit, "offset": 20})
        assert short.status_code == 200
        assert short.json() == whole[:kept]
        assert server.requests()[-1].items == kept
        assert server.requests()[-1].fault == "short"
        assert client.get("/api/contacts", params={"limit": limit, "offset": 20}).json() == whole

    def test_trickle_sends_headers_at_once_then_a_byte_at_a_time(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """`trickle` answers 200 with the full Content-Length at once, then dribbles the body."""
        whole = client.get("/api/contacts", params={"limit": 3}).content
        server.faults.add("trickle", seconds=0.2)
        started = time.monotonic()
        received = b""
        with client.stream("GET", "/api/contacts", params={"limit": 3}) as response:
            assert time.monotonic() - started < 0.15
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == len(whole)
            for chunk in response.iter_raw():
                received += chunk
                if time.monotonic() - started > 0.7:
                    break
        assert whole.startswith(received)
        assert 2 <= len(received) <= 6
        assert client.get("/api/contacts", params={"limit": 3}).content == whole
        assert server.requests()[1].fault == "trickle"

    def test_429_carries_retry_after(self, server: SandboxServer, client: httpx.Client) -> None:
        """429 sends Retry-After, 0 by default or as configured."""
        server.faults.add("429")
        server.faults.add("429", retry_after=2)
        first, second = client.get("/api/contacts"), client.get("/api/contacts")
        assert (first.status_code, first.headers["retry-after"]) == (429, "0")
        assert (second.status_code, second.headers["retry-after"]) == (429, "2")

    def test_502_is_an_html_gateway_page(self, server: SandboxServer, client: httpx.Client) -> None:
        """A 502 looks like a load balancer's page, not the API's JSON."""
        server.faults.add("502")
        response = client.get("/api/contacts")
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")

    def test_reset_is_a_transport_error_and_logs_nothing(
        self, server: SandboxServer, client: httpx.Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A reset breaks the connection mid-body; the client sees a transport error."""
        server.faults.add("reset")
        with caplog.at_level(logging.WARNING), pytest.raises(httpx.TransportError):
            client.get("/api/contacts")
        assert client.get("/api/contacts").status_code == 200
        assert not [r for r in caplog.records if r.name.startswith("uvicorn")]

    def test_stall_trips_a_client_timeout_without_blocking_others(
        self, server: SandboxServer, anonymous: httpx.Client
    ) -> None:
        """A stalled answer times the client out while other requests are served at once."""
        server.faults.add("stall", company="2", seconds=0.8)
        errors: list[BaseException] = []

        def stalled() -> None:
            try:
                anonymous.get(server.contacts_url, headers=server.headers("2"), timeout=0.3)
            except httpx.ReadTimeout as exc:
                errors.append(exc)

        worker = threading.Thread(target=stalled)
        worker.start()
        time.sleep(0.05)
        started = time.monotonic()
        assert anonymous.get(server.contacts_url, headers=server.headers("1")).status_code == 200
        assert time.monotonic() - started < 0.5
        worker.join()
        assert len(errors) == 1
        while not server.requests("2"):
            time.sleep(0.02)
        assert server.requests("2")[0].fault == "stall"

    def test_malformed_body_is_not_json(self, server: SandboxServer, client: httpx.Client) -> None:
        """`malformed` is a 200 whose body does not parse."""
        server.faults.add("malformed")
        response = client.get("/api/contacts")
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            response.json()

    def test_truncated_body_is_a_cut_page(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """`truncated` is a complete 200 message holding the first half of the real page."""
        whole = client.get("/api/contacts", params={"limit": 5}).content
        server.faults.add("truncated")
        response = client.get("/api/contacts", params={"limit": 5})
        assert response.status_code == 200
        assert whole.startswith(response.content)
        assert len(response.content) == len(whole) // 2
        with pytest.raises(json.JSONDecodeError):
            response.json()

    def test_not_array_is_an_object(self, server: SandboxServer, client: httpx.Client) -> None:
        """`not_array` wraps the page in a JSON object."""
        server.faults.add("not_array")
        body = client.get("/api/contacts", params={"limit": 3}).json()
        assert isinstance(body, dict)
        assert len(body["data"]) == 3

    def test_wrong_content_type_is_html(self, server: SandboxServer, client: httpx.Client) -> None:
        """`wrong_content_type` is a 200 HTML page."""
        server.faults.add("wrong_content_type")
        response = client.get("/api/contacts")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")

    def test_huge_declares_50_mb_and_streams(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """`huge` announces 50 MB; a capped client can stop reading early."""
        server.faults.add("huge")
        with client.stream("GET", "/api/contacts") as response:
            assert int(response.headers["content-length"]) == 50 * 1024 * 1024
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > 2 * 1024 * 1024:
                    break
        assert client.get("/api/contacts").status_code == 200

    @pytest.mark.parametrize("chunked", [False, True])
    def test_huge_body_has_exactly_the_size_asked(
        self, server: SandboxServer, client: httpx.Client, chunked: bool
    ) -> None:
        """A sized `huge` body is valid JSON of exactly `size` bytes, chunked when asked."""
        server.faults.add("huge", size=3_000_001, chunked=chunked)
        response = client.get("/api/contacts")
        assert len(response.content) == 3_000_001
        assert ("content-length" not in response.headers) is chunked
        assert isinstance(response.json(), list)

    def test_faults_can_target_one_company_and_repeat(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """A company-scoped fault skips other companies and applies `times` times."""
        server.faults.add("500", times=2, company="2")
        assert client.get("/api/contacts").status_code == 200
        statuses = [
            client.get("/api/contacts", headers={"X-Company-Id": "2"}).status_code for _ in range(3)
        ]
        assert statuses == [500, 500, 200]
        assert server.faults.pending() == []

    def test_fail_company_is_permanent_until_restored(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """A failing company answers the status every time until restored."""
        server.faults.fail_company("2", status=412)
        second = {"X-Company-Id": "2"}
        assert [client.get("/api/contacts", headers=second).status_code for _ in range(3)] == [
            412
        ] * 3
        assert client.get("/api/contacts").status_code == 200
        server.faults.restore_company("2")
        assert client.get("/api/contacts", headers=second).status_code == 200

    def test_latency_delays_without_serialising(
        self, server: SandboxServer, anonymous: httpx.Client
    ) -> None:
        """Added latency slows each request but concurrent requests overlap."""
        server.faults.latency_ms = 250
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=anonymous.get,
                args=(server.contacts_url,),
                kwargs={"headers": server.headers()},
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 0.75
        assert [r.status for r in server.requests()] == [200] * 4

    def test_unknown_fault_kind_is_refused(self, server: SandboxServer) -> None:
        """Only the documented fault kinds can be queued."""
        with pytest.raises(ValueError, match="unknown fault"):
            server.faults.add("teapot")  # type: ignore[arg-type]
        assert "huge" in FAULT_KINDS


class TestMutator:
    def test_mutation_happens_before_the_page(
        self, server: SandboxServer, client: httpx.Client, data: SandboxData, company: str
    ) -> None:
        """With every=1 the first page already reflects the change."""
        mark = data.mark()
        server.mutate_on_request(company, deletes=1, updates=0)
        page = client.get(
            "/api/contacts", params={"limit": 100}, headers={"X-Company-Id": company}
        ).json()
        (deleted,) = data.touched_since(company, mark)
        assert deleted not in {row["id"] for row in page}
        assert len(page) == 100

    def test_offsets_shift_under_a_paging_client(
        self, server: SandboxServer, client: httpx.Client, data: SandboxData, company: str
    ) -> None:
        """Deleting while a client pages by offset makes it skip rows that never changed."""
        before = data.ids(company)
        mark = data.mark()
        server.mutate_on_request(company, every=1, updates=0, deletes=3)
        seen = {row["id"] for row in _page_all(client, company=company, limit=50)}
        server.stop_mutating()
        untouched = before - data.touched_since(company, mark)
        assert untouched - seen

    def test_every_counts_valid_page_requests(
        self, server: SandboxServer, client: httpx.Client, data: SandboxData, company: str
    ) -> None:
        """every=2 mutates on the 2nd and 4th valid requests; invalid ones do not count."""
        headers = {"X-Company-Id": company}
        server.mutate_on_request(company, every=2, updates=1, inserts=1)
        touched = []
        for params in ({}, {"limit": "0"}, {}, {}, {}):
            mark = data.mark()
            client.get("/api/contacts", params=params, headers=headers)
            touched.append(len(data.touched_since(company, mark)))
        assert touched == [0, 0, 2, 0, 2]
        server.stop_mutating(company)
        mark = data.mark()
        client.get("/api/contacts", headers=headers)
        assert data.touched_since(company, mark) == set()

    def test_mutations_are_deterministic(self) -> None:
        """The same seed, clock and request sequence give the same data."""
        frozen = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
        snapshots = []
        for _ in range(2):
            data = SandboxData.generate(("1",), 100, seed=11, clock=lambda: frozen)
            mutator = Mutator(data)
            mutator.start("1", every=1, updates=2, inserts=1, deletes=1)
            for _ in range(5):
                mutator.before_page("1")
            snapshots.append(data.snapshot("1"))
        assert snapshots[0] == snapshots[1]


class TestRequestLog:
    def test_requests_are_recorded_without_the_token(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """Each request is logged with query, company, status and item count, never the token."""
        client.get(
            "/api/contacts", params={"limit": 7, "updated_at": "gt:2024-01-01T20:00:00+02:00"}
        )
        client.get("/api/contacts", params={"limit": 0}, headers={"X-Company-Id": "2"})
        first, second = server.requests()
        assert (first.method, first.path, first.company, first.status, first.items) == (
            "GET",
            "/api/contacts",
            "1",
            200,
            7,
        )
        assert first.params == {"limit": "7", "updated_at": "gt:2024-01-01T20:00:00+02:00"}
        assert "%2B02%3A00" in first.query
        assert (second.company, second.status, second.items) == ("2", 400, None)
        assert server.requests("2") == [second]
        token = server.headers()["Authorization"].split()[1]
        assert token not in repr(server.requests())

    def test_faulted_and_unknown_paths_are_recorded(
        self, server: SandboxServer, client: httpx.Client
    ) -> None:
        """Fault answers name their fault; unknown paths are logged as 404s."""
        server.faults.add("503")
        client.get("/api/contacts")
        assert client.get("/api/other").status_code == 404
        faulted, missing = server.requests()
        assert (faulted.status, faulted.fault, faulted.items) == (503, "503", None)
        assert (missing.path, missing.status) == ("/api/other", 404)
        server.clear_requests()
        assert server.requests() == []


class TestServerLifecycle:
    def test_starts_fast_on_a_free_port_and_stops_cleanly(self, anonymous: httpx.Client) -> None:
        """Port 0 picks a free port; start is quick and stop leaves no thread behind."""
        data = SandboxData.generate(("1",), 10)
        started = time.monotonic()
        with SandboxServer(data) as running:
            assert time.monotonic() - started < 1
            assert running.port > 0
            assert running.base_url == f"http://127.0.0.1:{running.port}"
            assert anonymous.get(running.contacts_url, headers=running.headers()).status_code == 200
        assert f"sandbox-server-{running.port}" not in {t.name for t in threading.enumerate()}
        running.stop()

    def test_restart_serves_on_the_same_port(self, anonymous: httpx.Client) -> None:
        """After stop the port refuses connections; start serves there again."""
        with SandboxServer(SandboxData.generate(("1",), 10)) as running:
            port = running.port
            running.stop()
            with pytest.raises(httpx.ConnectError):
                anonymous.get(running.contacts_url, headers=running.headers())
            running.start()
            assert running.port == port
            assert anonymous.get(running.contacts_url, headers=running.headers()).status_code == 200

    def test_stop_cuts_a_trickle_short(self, anonymous: httpx.Client) -> None:
        """Stopping ends a trickling body at once; the client sees an incomplete response."""
        running = SandboxServer(SandboxData.generate(("1",), 10)).start()
        running.faults.add("trickle", seconds=30)
        errors: list[Exception] = []

        def fetch() -> None:
            try:
                anonymous.get(running.contacts_url, headers=running.headers(), timeout=10)
            except httpx.HTTPError as exc:
                errors.append(exc)

        worker = threading.Thread(target=fetch)
        worker.start()
        time.sleep(0.2)
        started = time.monotonic()
        running.stop()
        worker.join()
        assert time.monotonic() - started < 2
        assert len(errors) == 1

    def test_stop_cuts_a_stall_short(self, anonymous: httpx.Client) -> None:
        """Stopping does not wait for a long stall to finish."""
        running = SandboxServer(SandboxData.generate(("1",), 10)).start()
        running.faults.add("stall", seconds=30)
        worker = threading.Thread(
            target=lambda: anonymous.get(
                running.contacts_url, headers=running.headers(), timeout=10
            )
        )
        worker.start()
        time.sleep(0.1)
        started = time.monotonic()
        running.stop()
        worker.join()
        assert time.monotonic() - started < 2

    def test_serve_forever_returns_when_told_to_stop(self) -> None:
        """`serve_forever` serves generated data and returns cleanly on its stop event."""
        stop = threading.Event()
        ready: list[SandboxServer] = []

        def on_ready(running: SandboxServer) -> None:
            ready.append(running)
            stop.set()

        serve_forever(
            0, contacts=5, companies=("1", "7"), order="updated_desc", on_ready=on_ready, stop=stop
        )
        (running,) = ready
        assert running.data.companies() == ["1", "7"]
        assert running.config.order == "updated_desc"
        assert f"sandbox-server-{running.port}" not in {t.name for t in threading.enumerate()}


@contextmanager
def _sandbox_command(*args: str) -> Iterator[httpx.Client]:
    """`contacts-sync sandbox --port 0 ARGS` as a process; a client for the URL it announces."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sync", "sandbox", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        announced = ""
        deadline = time.monotonic() + 30
        while not (found := re.search(r"http://127\.0\.0\.1:\d+", announced)):
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            assert time.monotonic() < deadline, "the sandbox command did not announce its URL"
            if ready:
                line = process.stdout.readline()
                assert line, process.communicate()[1]
                announced += line
        token = {"Authorization": f"Bearer {DEFAULT_TOKEN}", "X-Company-Id": "1"}
        with httpx.Client(base_url=found.group(), headers=token, timeout=5, verify=_TLS) as http:
            yield http
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
class TestCommand:
    def test_flags_cap_pages_tie_rows_shuffle_ties_and_add_latency(self) -> None:
        """--page-cap, --bulk-tie, --tie-order per_request and --latency-ms shape what is served."""
        with _sandbox_command(
            "--contacts", "300", "--order", "updated_asc", "--page-cap", "40",
            "--bulk-tie", "120", "--tie-order", "per_request", "--latency-ms", "150",
        ) as http:  # fmt: skip
            started = time.monotonic()
            first = http.get("/api/contacts", params={"offset": 200, "limit": 100}).json()
            assert time.monotonic() - started >= 0.15
            second = http.get("/api/contacts", params={"offset": 200, "limit": 100}).json()
            before = http.get("/api/contacts", params={"offset": 140}).json()
        assert len(first) == len(second) == len(before) == 40
        (stamp,) = {_utc(row) for row in first + second}
        assert all(_utc(row) < stamp for row in before)
        assert _ids(first) != _ids(second)

    @pytest.mark.parametrize("mode", ["reject", "clamp"])
    def test_max_offset_flags_reject_or_clamp(self, mode: str) -> None:
        """--max-offset with --offset-mode reject answers 400 past it; clamp serves its page."""
        with _sandbox_command(
            "--contacts", "300", "--order", "updated_desc", "--tie-order", "per_page",
            "--max-offset", "100", "--offset-mode", mode,
        ) as http:  # fmt: skip
            at_limit = http.get("/api/contacts", params={"offset": 100})
            beyond = http.get("/api/contacts", params={"offset": 150})
        assert len(at_limit.json()) == 100
        if mode == "reject":
            assert _failures(beyond) == {"offset": "must be less than or equal to 100"}
        else:
            assert beyond.content == at_limit.content

    def test_an_unknown_tie_order_is_a_usage_error(self) -> None:
        """A value outside the documented choices exits 2 with one sentence naming the flag."""
        result = subprocess.run(
            [sys.executable, "-m", "sync", "sandbox", "--tie-order", "sometimes"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert (
            "--tie-order 'sometimes' is not one of stable, per_page, per_request" in result.stderr
        )

    def test_fault_and_broken_run_flags(self) -> None:
        """--fault KIND:N answers the first N requests with that fault, and --broken-run serves
        that many unparseable items in a row among the rows."""
        with _sandbox_command(
            "--contacts", "100", "--fault", "503:2", "--fault", "short", "--broken-run", "30",
        ) as http:  # fmt: skip
            statuses = [http.get("/api/contacts").status_code for _ in range(2)]
            trimmed = http.get("/api/contacts").json()
            whole = http.get("/api/contacts", params={"limit": 100}).json()
        assert statuses == [503, 503]
        assert len(trimmed) == 50
        broken = [item for item in whole if str(item["id"]).startswith("broken-")]
        assert len(broken) == 30
        assert whole.index(broken[0]) + 30 == whole.index(broken[-1]) + 1

    def test_an_unknown_fault_is_a_usage_error(self) -> None:
        """A fault that does not exist exits 2 with one sentence naming the flag."""
        result = subprocess.run(
            [sys.executable, "-m", "sync", "sandbox", "--fault", "gremlins:3"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert "--fault 'gremlins' is not one of" in result.stderr
