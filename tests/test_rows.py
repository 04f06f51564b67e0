"""Upstream contact objects -> UTC-normalised rows, or rejections with a reason.

Items are the JSON shapes the list endpoint documents, plus the ways a real page can go wrong.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.rows import (
    TEXT_FIELDS,
    ContactRow,
    decode_usual_page,
    parse_items,
    parse_timestamp,
)

UPDATED = "2025-10-28T10:23:49.429Z"


def _item(**fields: Any) -> dict[str, Any]:
    """A minimal valid item with the given fields added or replaced."""
    return {"id": 1, "updated_at": UPDATED, **fields}


def _without(field: str) -> dict[str, Any]:
    item = _item()
    item.pop(field, None)
    return item


class TestParseTimestamp:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2025-10-28T10:23:49.429Z", datetime(2025, 10, 28, 10, 23, 49, 429000, tzinfo=UTC)),
            (
                "2025-10-28T12:23:49.429+02:00",
                datetime(2025, 10, 28, 10, 23, 49, 429000, tzinfo=UTC),
            ),
            ("2025-10-28T04:53:49-05:30", datetime(2025, 10, 28, 10, 23, 49, tzinfo=UTC)),
            ("2025-10-28T10:23:49+00:00", datetime(2025, 10, 28, 10, 23, 49, tzinfo=UTC)),
            ("2025-10-28T10:23:49.429", datetime(2025, 10, 28, 10, 23, 49, 429000, tzinfo=UTC)),
            ("2025-01-01T01:00:00+02:00", datetime(2024, 12, 31, 23, 0, tzinfo=UTC)),
        ],
        ids=["z-millis", "plus-two", "minus-five-thirty", "zero-offset", "naive", "across-year"],
    )
    def test_converts_to_utc(self, text: str, expected: datetime) -> None:
        """Any offset is converted to UTC, Z is UTC, a naive time is taken as UTC, ms are kept."""
        parsed = parse_timestamp(text)
        assert parsed == expected
        assert parsed.utcoffset() == timedelta(0)
        assert parsed.microsecond == expected.microsecond

    @pytest.mark.parametrize("value", ["yesterday", "", "2025-13-01T00:00:00Z", "28/10/2025"])
    def test_rejects_non_iso_strings(self, value: str) -> None:
        """A string that is not an ISO-8601 timestamp raises ValueError saying so."""
        with pytest.raises(ValueError, match="ISO-8601"):
            parse_timestamp(value)

    @pytest.mark.parametrize("value", [None, 1761646829, 1761646829.5, ["2025-01-01"]])
    def test_rejects_non_strings(self, value: object) -> None:
        """A value that is not a string raises ValueError saying so."""
        with pytest.raises(ValueError, match="not a string"):
            parse_timestamp(value)

    @pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
    def test_out_of_range_after_conversion(self, value: str) -> None:
        """A timestamp whose UTC instant is out of datetime's range raises ValueError."""
        with pytest.raises(ValueError, match=r"timestamp|range"):
            parse_timestamp(value)


FULL_ITEM = {
    "id": 17,
    "created_at": "2025-10-28T12:23:49.429+02:00",
    "updated_at": "2025-10-28T04:53:50.001-05:30",
    "client_id": 3,
    "email": "client@email.com",
    "name": "Client name",
    "surname": "Client surname",
    "role": "Client role",
    "notes": "Some notes about the client",
    "linkedin": "https://www.linkedin.com/in/example",
    "description": "A brief description of the client",
    "telephone": "123456789",
}

# (field, value, words the reason must contain)
REJECTIONS = [
    pytest.param("id", None, ("id", "missing"), id="id-none"),
    pytest.param("id", 0, ("id", "less than 1"), id="id-zero"),
    pytest.param("id", -4, ("id", "less than 1"), id="id-negative"),
    pytest.param("id", True, ("id", "not an integer"), id="id-bool"),
    pytest.param("id", "17", ("id", "not an integer"), id="id-string"),
    pytest.param("id", 17.0, ("id", "not an integer"), id="id-float"),
    pytest.param("updated_at", None, ("updated_at", "missing"), id="updated-none"),
    pytest.param("updated_at", "yesterday", ("updated_at", "ISO-8601"), id="updated-invalid"),
    pytest.param("updated_at", 1761646829, ("updated_at", "not a string"), id="updated-number"),
    pytest.param("created_at", "soon", ("created_at", "ISO-8601"), id="created-invalid"),
    pytest.param("created_at", 1761646829, ("created_at", "not a string"), id="created-number"),
    pytest.param("client_id", 0, ("client_id", "less than 1"), id="client-zero"),
    pytest.param("client_id", "3", ("client_id", "not an integer"), id="client-string"),
    pytest.param("client_id", False, ("client_id", "not an integer"), id="client-bool"),
    pytest.param("email", 42, ("email", "not a string"), id="email-number"),
    pytest.param("telephone", 123456789, ("telephone", "not a string"), id="telephone-number"),
    pytest.param("notes", ["a", "b"], ("notes", "not a string"), id="notes-list"),
]


class TestParseItems:
    def test_full_item(self) -> None:
        """A complete valid item becomes a ContactRow with every field and UTC times."""
        page = parse_items([FULL_ITEM])
        assert page.rejected == []
        assert page.rows == [
            ContactRow(
                id=17,
                updated_at=datetime(2025, 10, 28, 10, 23, 50, 1000, tzinfo=UTC),
                created_at=datetime(2025, 10, 28, 10, 23, 49, 429000, tzinfo=UTC),
                client_id=3,
                email="client@email.com",
                name="Client name",
                surname="Client surname",
                role="Client role",
                notes="Some notes about the client",
                linkedin="https://www.linkedin.com/in/example",
                description="A brief description of the client",
                telephone="123456789",
                extra=None,
            )
        ]
        row = page.rows[0]
        assert row.updated_at.utcoffset() == timedelta(0)
        assert row.created_at is not None
        assert row.created_at.utcoffset() == timedelta(0)
        assert page.keys == [(17, datetime(2025, 10, 28, 10, 23, 50, 1000, tzinfo=UTC))]

    def test_naive_and_z_times(self) -> None:
        """A naive updated_at is taken as UTC and a Z one is UTC, milliseconds kept."""
        page = parse_items(
            [
                _item(id=1, updated_at="2025-10-28T10:23:49.429"),
                _item(id=2, updated_at="2025-10-28T10:23:49.429Z"),
            ]
        )
        expected = datetime(2025, 10, 28, 10, 23, 49, 429000, tzinfo=UTC)
        assert [row.updated_at for row in page.rows] == [expected, expected]
        assert all(row.updated_at.utcoffset() == timedelta(0) for row in page.rows)

    def test_unknown_fields_go_to_extra(self) -> None:
        """Fields upstream adds later are kept in `extra`; the known ones are not."""
        item = {**FULL_ITEM, "company": "Acme", "tags": ["vip"], "score": None}
        (row,) = parse_items([item]).rows
        assert row.extra == {"company": "Acme", "tags": ["vip"], "score": None}
        assert row.email == "client@email.com"

    def test_no_unknown_fields_means_no_extra(self) -> None:
        """An item with only documented fields has no `extra`."""
        (row,) = parse_items([FULL_ITEM]).rows
        assert row.extra is None

    def test_nulls_in_optional_fields_are_kept(self) -> None:
        """Null optional fields, and absent ones, are stored as None without rejecting the item."""
        nulls = dict.fromkeys(("created_at", "client_id", *TEXT_FIELDS))
        page = parse_items([_item(id=1, **nulls), _item(id=2)])
        assert page.rejected == []
        for row in page.rows:
            assert row.created_at is None
            assert row.client_id is None
            assert all(getattr(row, name) is None for name in TEXT_FIELDS)
            assert row.extra is None

    @pytest.mark.parametrize("item", [[1, 2], "contact", 17, None, True])
    def test_rejects_non_objects(self, item: object) -> None:
        """An item that is not a JSON object is rejected with that reason."""
        page = parse_items([item])
        assert page.rows == []
        (rejected,) = page.rejected
        assert rejected.payload == item
        assert "not a JSON object" in rejected.reason
        assert rejected.contact_id is None
        assert page.keys == [None]

    @pytest.mark.parametrize("field", ["id", "updated_at"])
    def test_rejects_missing_required_field(self, field: str) -> None:
        """An item without id or updated_at is rejected with a reason naming the field."""
        item = _without(field)
        page = parse_items([item])
        assert page.rows == []
        (rejected,) = page.rejected
        assert rejected.reason == f"{field} is missing"
        assert rejected.payload == item

    @pytest.mark.parametrize(("field", "value", "words"), REJECTIONS)
    def test_rejects_bad_field(self, field: str, value: object, words: tuple[str, ...]) -> None:
        """An item with a bad field value is rejected, unchanged, with a reason naming the field."""
        item = {**FULL_ITEM, field: value}
        page = parse_items([item])
        assert page.rows == []
        (rejected,) = page.rejected
        assert rejected.payload == item
        assert rejected.reason.startswith(words[0] + " ")
        assert all(word in rejected.reason for word in words)
        assert page.keys == [None]

    def test_rejected_item_keeps_its_usable_id(self) -> None:
        """A rejected item with an integer id carries it; one without a usable id carries None."""
        page = parse_items(
            [
                _item(id=9, updated_at="soon"),
                _item(id="9", updated_at="soon"),
                _item(id=True),
            ]
        )
        assert [r.contact_id for r in page.rejected] == [9, None, None]

    def test_keys_follow_items_in_order(self) -> None:
        """`keys` has one entry per item, in order, with None where the item was rejected."""
        page = parse_items(
            [
                _item(id=3, updated_at="2025-01-01T00:00:03Z"),
                _item(id=0),
                "junk",
                _item(id=1, updated_at="2025-01-01T00:00:01Z"),
                _item(id=2, email=5),
            ]
        )
        assert page.keys == [
            (3, datetime(2025, 1, 1, 0, 0, 3, tzinfo=UTC)),
            None,
            None,
            (1, datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC)),
            None,
        ]
        assert [row.id for row in page.rows] == [3, 1]
        assert len(page.rejected) == 3

    @pytest.mark.parametrize("newest_first", [True, False])
    def test_duplicate_id_keeps_the_newest(self, newest_first: bool) -> None:
        """Two versions of one id in a page keep the newer updated_at, whichever comes first."""
        old = _item(id=5, updated_at="2025-01-01T00:00:00.100Z", name="old")
        new = _item(id=5, updated_at="2025-01-01T00:00:00.200Z", name="new")
        items = [new, old] if newest_first else [old, new]
        page = parse_items(items)
        (row,) = page.rows
        assert row.name == "new"
        assert row.updated_at == datetime(2025, 1, 1, 0, 0, 0, 200000, tzinfo=UTC)
        old_key = (5, datetime(2025, 1, 1, 0, 0, 0, 100000, tzinfo=UTC))
        new_key = (5, datetime(2025, 1, 1, 0, 0, 0, 200000, tzinfo=UTC))
        assert page.keys == ([new_key, old_key] if newest_first else [old_key, new_key])

    def test_long_strings_are_kept_intact(self) -> None:
        """Values longer than upstream's documented limits are kept whole."""
        long = {
            "email": "a" * 140 + "@example.com",
            "name": "n" * 101,
            "surname": "s" * 101,
            "role": "r" * 76,
            "linkedin": "https://www.linkedin.com/in/" + "x" * 250,
            "telephone": "9" * 101,
            "notes": "lorem ipsum " * 833 + "end.",
            "description": "d" * 100_000,
        }
        assert len(long["email"]) > 150
        assert len(long["notes"]) == 10_000
        (row,) = parse_items([_item(**long)]).rows
        for field, value in long.items():
            assert getattr(row, field) == value

    def test_unicode_is_kept_intact(self) -> None:
        """Non-ASCII text, emoji, combining marks and control characters pass through unchanged."""
        texts = {
            "name": "Zoë Åsa-Łucja",
            "surname": "李小龍",
            "notes": "met at 🦊 conf 👩🏽‍💻 — follow up\nnext week\t✓",
            "role": "e\u0301quipe",  # e + combining acute, not normalised to é
            "description": "مرحبا עולם",
        }
        (row,) = parse_items([_item(**texts)]).rows
        for field, value in texts.items():
            assert getattr(row, field) == value

    @pytest.mark.parametrize(
        ("item", "words"),
        [
            (_item(id=2**63), "64-bit"),
            (_item(client_id=2**64), "64-bit"),
            (_item(notes="a\x00b"), "NUL"),
            (_item(name="\ud800"), "surrogate"),
        ],
        ids=["huge-id", "huge-client", "nul", "lone-surrogate"],
    )
    def test_rejects_what_sql_cannot_store(self, item: dict[str, Any], words: str) -> None:
        """Values no SQL column can hold are quarantined instead of failing the page."""
        parsed = parse_items([item, _item(id=3)], careful=True)
        assert [r.id for r in parsed.rows] == [3]
        assert words in parsed.rejected[0].reason

    def test_careful_mode_keeps_valid_surrogate_pairs(self) -> None:
        """An emoji written as a JSON surrogate pair is a normal character and is kept."""
        parsed = parse_items([_item(name="smile \U0001f600")], careful=True)
        assert parsed.rows[0].name == "smile \U0001f600"

    def test_empty_page(self) -> None:
        """An empty page gives no rows, no rejections and no keys."""
        page = parse_items([])
        assert (page.rows, page.rejected, page.keys) == ([], [], [])

    @pytest.mark.parametrize("field", ["updated_at", "created_at"])
    def test_out_of_range_timestamp_is_rejected(self, field: str) -> None:
        """An item whose timestamp overflows when converted to UTC is rejected, not raised."""
        page = parse_items([_item(id=1, **{field: "0001-01-01T00:00:00+01:00"}), _item(id=2)])
        assert [row.id for row in page.rows] == [2]
        assert page.rejected[0].reason.startswith(field)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_never_raises_and_accounts_for_every_item(self, data: st.DataObject) -> None:
        """Any mix of valid and invalid items parses without raising and accounts for every item."""
        tagged = data.draw(st.lists(_tagged_items(), max_size=15))
        items = [item for _, item in tagged]
        page = parse_items(items)
        assert len(page.keys) == len(items)
        assert len(page.rejected) == sum(not valid for valid, _ in tagged)
        row_ids = [row.id for row in page.rows]
        for (valid, item), key in zip(tagged, page.keys, strict=True):
            assert (key is not None) == valid
            if valid:
                assert row_ids.count(item["id"]) == 1
        assert set(row_ids) == {item["id"] for valid, item in tagged if valid}
        assert all(r.reason.strip() for r in page.rejected)


# --- strategies for the property test -------------------------------------------------------

_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
_moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1))


@st.composite
def _timestamps(draw: st.DrawFn) -> str:
    moment = draw(_moments)
    style = draw(st.sampled_from(["offset", "z", "naive"]))
    spec = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    if style == "naive":
        return moment.isoformat(timespec=spec)
    if style == "z":
        return moment.isoformat(timespec=spec) + "Z"
    return moment.replace(tzinfo=draw(_offsets)).isoformat(timespec=spec)


_json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
_optional_text = st.none() | st.text(max_size=40)

_valid_items = st.fixed_dictionaries(
    {"id": st.integers(min_value=1, max_value=30), "updated_at": _timestamps()},
    optional={
        "created_at": st.none() | _timestamps(),
        "client_id": st.none() | st.integers(min_value=1, max_value=10**9),
        **dict.fromkeys(TEXT_FIELDS, _optional_text),
        # fields upstream might add later
        "company": _json_scalars,
        "tags": st.lists(_json_scalars, max_size=3),
    },
)

# Each corruption makes an otherwise valid item invalid: (field, bad values; absent = drop it).
_ABSENT = object()
_CORRUPTIONS: list[tuple[str, list[object]]] = [
    ("id", [_ABSENT, None, 0, -1, True, False, "7", 7.0, [7]]),
    ("updated_at", [_ABSENT, None, "soon", "", 1761646829, "2025-02-30T00:00:00Z", {}]),
    ("created_at", ["soon", 0, "2025-01-01T25:00:00"]),
    ("client_id", [0, -3, "3", True, 2.5]),
    *[(name, [0, 1.5, True, ["x"], {"a": 1}]) for name in TEXT_FIELDS],
]


@st.composite
def _invalid_items(draw: st.DrawFn) -> object:
    if draw(st.booleans()):
        return draw(_json_scalars | st.lists(_json_scalars, max_size=3))
    item = dict(draw(_valid_items))
    field, bad_values = draw(st.sampled_from(_CORRUPTIONS))
    bad = draw(st.sampled_from(bad_values))
    if bad is _ABSENT:
        item.pop(field, None)
    else:
        item[field] = bad
    return item


def _tagged_items() -> st.SearchStrategy[tuple[bool, Any]]:
    return _valid_items.map(lambda item: (True, item)) | _invalid_items().map(
        lambda item: (False, item)
    )


_FULL = {
    "id": 1,
    "created_at": "2024-01-02T03:04:05.678Z",
    "updated_at": UPDATED,
    "client_id": 7,
    **dict.fromkeys(TEXT_FIELDS, "x"),
}
_ODD_VALUES = st.sampled_from(
    [
        None,
        0,
        -1,
        2**63,
        True,
        1.5,
        "",
        "x",
        "2025-10-28T10:23:49",
        "2025-10-28T12:23:49.429+02:00",
        "2025-10-28",
        "not a time",
        "\x00",
        [],
        {},
    ]
)


@st.composite
def _pages(draw: st.DrawFn) -> list[object]:
    """Pages of full items, ids clashing now and then, some fields replaced, dropped or added."""
    items: list[object] = []
    for _ in range(draw(st.integers(1, 8))):
        item: dict[str, Any] = dict(
            _FULL,
            id=draw(st.integers(1, 6)),
            updated_at=draw(_timestamps()),
            created_at=draw(st.none() | _timestamps()),
        )
        for name in draw(st.lists(st.sampled_from(sorted(_FULL)), max_size=2)):
            if draw(st.booleans()):
                item[name] = draw(_ODD_VALUES)
            else:
                item.pop(name, None)
        if draw(st.integers(0, 9)) == 0:
            item["added_later"] = draw(_ODD_VALUES)
        items.append(item if draw(st.integers(0, 19)) else draw(_ODD_VALUES))
    return items


@st.composite
def _usual_pages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Pages the typed decoder should take: every field, well typed, times with offsets."""
    aware = _timestamps().filter(lambda stamp: stamp.endswith("Z") or stamp[-6] in "+-")
    return draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.integers(1, 6),
                    "updated_at": aware,
                    "created_at": st.none() | aware,
                    "client_id": st.none() | st.integers(1, 2**63 - 1),
                    **dict.fromkeys(TEXT_FIELDS, _optional_text),
                }
            ),
            min_size=1,
            max_size=8,
        )
    )


class TestUsualPageFastPath:
    def test_an_ordinary_page_takes_it(self) -> None:
        """Full, well-typed items (any offsets, null texts and created_at) are decoded typed."""
        items = [
            dict(_FULL, id=1),
            dict(_FULL, id=2, updated_at="2025-10-28T12:23:49.429+02:00", created_at=None),
            dict(_FULL, id=3, email=None, client_id=None),
        ]
        usual = decode_usual_page(json.dumps(items).encode())
        assert usual is not None
        assert repr(usual) == repr(parse_items(items))
        assert {row.updated_at.tzinfo for row in usual.rows} == {UTC}

    @pytest.mark.parametrize(
        "change",
        [
            {"added_later": 1},
            {"id": True},
            {"id": 2**63},
            {"id": 7.0},
            {"client_id": 0},
            {"email": 5},
            {"updated_at": "2025-10-28T10:23:49"},
            {"created_at": "2025-10-28"},
        ],
        ids=["extra", "bool", "huge", "float", "zero", "number", "naive", "date"],
    )
    def test_anything_unusual_is_left_to_the_item_path(self, change: dict[str, Any]) -> None:
        """An unknown field, an odd type or value, a time without an offset: not decoded here."""
        items = [dict(_FULL, id=1), {**_FULL, "id": 2, **change}]
        assert decode_usual_page(json.dumps(items).encode()) is None

    def test_a_missing_field_is_left_to_the_item_path(self) -> None:
        item = dict(_FULL)
        del item["telephone"]
        assert decode_usual_page(json.dumps([item]).encode()) is None

    @settings(max_examples=400, deadline=None)
    @given(_pages())
    def test_it_agrees_with_the_item_by_item_path(self, items: list[object]) -> None:
        """Whenever the typed decoder takes a page, it gives exactly what item by item does."""
        body = json.dumps(items).encode()
        usual = decode_usual_page(body)
        if usual is not None:
            # repr, not ==: aware datetimes in other zones compare equal to their UTC instant.
            assert repr(usual) == repr(parse_items(json.loads(body)))

    @settings(max_examples=300, deadline=None)
    @given(_usual_pages())
    def test_a_usual_page_is_taken_and_agrees(self, items: list[dict[str, Any]]) -> None:
        """Well-formed pages do take the typed decoder, and it matches item by item exactly."""
        body = json.dumps(items).encode()
        usual = decode_usual_page(body)
        assert usual is not None
        assert repr(usual) == repr(parse_items(json.loads(body)))
