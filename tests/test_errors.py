"""The error hierarchy: which upstream answer becomes which error, and the contract's exit codes.

Responses are real `httpx.Response` objects as the client receives them; nothing is mocked.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from sync.errors import (
    AuthError,
    ConfigError,
    PreconditionFailed,
    RateLimited,
    RequestRejected,
    ServerError,
    TransientUpstreamError,
    UpstreamError,
    ValidationFailure,
    exit_code_for,
    worst_exit_code,
)

REQUEST = httpx.Request("GET", "http://127.0.0.1/api/contacts")

INVALID_DATA = {
    "key": "invalid_data",
    "message": "You provided invalid data. Check 'failures' for details.",
    "failures": [
        {"field": "limit", "message": "must be less than or equal to 100"},
        {"field": "updated_at", "message": "must be an ISO 8601 date"},
    ],
}


def _from(status: int, *, headers: dict[str, str] | None = None, **body: Any) -> UpstreamError:
    """The error for a response with this status, headers and body (json=... or content=...)."""
    response = httpx.Response(status, headers=headers, request=REQUEST, **body)
    return UpstreamError.from_response(response)


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _assert_one_actionable_sentence(message: str) -> None:
    assert message[:1].isupper(), message
    assert message.endswith("."), message
    assert "\n" not in message, message
    assert ". " not in message, message  # one sentence: no full stop before the end
    assert re.search(r"; [a-z][^;]*\.$", message), message  # ends in "; <instruction>."


class TestFromResponse:
    def test_invalid_data_is_rejected_with_its_failures(self) -> None:
        """A 400 with failures is RequestRejected (exit 4) carrying them and naming the fields."""
        error = _from(400, json=INVALID_DATA)
        assert type(error) is RequestRejected
        assert error.exit_code == 4
        assert error.status == 400
        assert error.key == "invalid_data"
        assert error.failures == (
            ValidationFailure("limit", "must be less than or equal to 100"),
            ValidationFailure("updated_at", "must be an ISO 8601 date"),
        )
        assert "limit" in error.message
        assert "updated_at" in error.message
        assert not isinstance(error, TransientUpstreamError)

    def test_invalid_data_without_failures(self) -> None:
        """A 400 with no failures list is still RequestRejected, with no failures."""
        error = _from(400, json={"key": "invalid_data", "message": "nope"})
        assert type(error) is RequestRejected
        assert error.failures == ()
        assert error.exit_code == 4

    @pytest.mark.parametrize("failures", [5, 2.5, True])
    def test_invalid_data_with_malformed_failures(self, failures: object) -> None:
        """A 400 whose failures field is not a list still maps to RequestRejected."""
        error = _from(400, json={"key": "invalid_data", "failures": failures})
        assert type(error) is RequestRejected
        assert error.exit_code == 4

    @pytest.mark.parametrize("status", [401, 403])
    def test_auth_failures(self, status: int) -> None:
        """401 and 403 are AuthError (exit 3), not retried."""
        error = _from(status, json={"key": "unauthorized", "message": "token expired"})
        assert type(error) is AuthError
        assert error.exit_code == 3
        assert error.status == status
        assert error.key == "unauthorized"
        assert not isinstance(error, TransientUpstreamError)

    def test_precondition_failure_is_transient(self) -> None:
        """412 is PreconditionFailed: retried, and exit 5 once retries run out."""
        error = _from(412, json={"key": "precondition_failure", "message": "unknown company"})
        assert type(error) is PreconditionFailed
        assert isinstance(error, TransientUpstreamError)
        assert error.exit_code == 5
        assert error.key == "precondition_failure"

    def test_rate_limit_with_retry_after_seconds(self) -> None:
        """429 is RateLimited, with Retry-After seconds as retry_after."""
        error = _from(429, headers={"Retry-After": "120"}, json={"key": "too_many_requests"})
        assert type(error) is RateLimited
        assert isinstance(error, TransientUpstreamError)
        assert error.exit_code == 5
        assert error.retry_after == 120.0

    def test_rate_limit_with_retry_after_http_date(self) -> None:
        """A Retry-After HTTP-date becomes the seconds from now until then."""
        when = datetime.now(UTC) + timedelta(seconds=90)
        error = _from(429, headers={"Retry-After": _http_date(when)})
        assert isinstance(error, RateLimited)
        assert error.retry_after is not None
        assert 80.0 <= error.retry_after <= 90.0

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (_http_date(datetime(2000, 1, 1, tzinfo=UTC)), 0.0),
            ("-5", 0.0),
            ("0", 0.0),
            ("1.5", 1.5),
            ("soon", None),
        ],
        ids=["past-date", "negative", "zero", "fraction", "garbage"],
    )
    def test_retry_after_edge_values(self, value: str, expected: float | None) -> None:
        """A past or negative Retry-After means no wait; an unreadable one is ignored."""
        error = _from(429, headers={"Retry-After": value})
        assert isinstance(error, RateLimited)
        assert error.retry_after == expected

    def test_rate_limit_without_retry_after(self) -> None:
        """A 429 without Retry-After leaves the wait to the backoff policy."""
        error = _from(429)
        assert isinstance(error, RateLimited)
        assert error.retry_after is None

    @pytest.mark.parametrize(
        "value",
        ["Sat Nov  6 08:49:37 2100", "Sat, 06 Nov 2100 08:49:37 -0000"],
        ids=["asctime", "minus-zero-zone"],
    )
    def test_retry_after_date_without_zone(self, value: str) -> None:
        """A Retry-After date in asctime form (no zone, meaning GMT) is honoured."""
        error = _from(429, headers={"Retry-After": value})
        assert isinstance(error, RateLimited)
        assert error.retry_after is not None
        assert error.retry_after > 0

    @pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425])
    def test_server_errors_are_transient(self, status: int) -> None:
        """5xx, 408 and 425 are ServerError: retried, and exit 5 once retries run out."""
        error = _from(status, json={"key": "internal", "message": "boom"})
        assert type(error) is ServerError
        assert isinstance(error, TransientUpstreamError)
        assert error.exit_code == 5
        assert error.status == status
        assert str(status) in error.message

    def test_server_error_honours_retry_after(self) -> None:
        """A 503 with Retry-After carries the hint."""
        error = _from(503, headers={"Retry-After": "7"}, text="down for maintenance")
        assert isinstance(error, ServerError)
        assert error.retry_after == 7.0

    @pytest.mark.parametrize("status", [404, 405, 418])
    def test_other_client_errors_are_rejected(self, status: int) -> None:
        """Any other 4xx is RequestRejected (exit 4), not retried."""
        error = _from(status, json={"key": "not_found", "message": "no such route"})
        assert type(error) is RequestRejected
        assert error.exit_code == 4
        assert error.status == status
        assert str(status) in error.message
        assert not isinstance(error, TransientUpstreamError)

    @pytest.mark.parametrize(
        ("status", "expected"),
        [
            (400, RequestRejected),
            (401, AuthError),
            (403, AuthError),
            (404, RequestRejected),
            (412, PreconditionFailed),
            (429, RateLimited),
            (500, ServerError),
            (502, ServerError),
            (503, ServerError),
        ],
    )
    @pytest.mark.parametrize(
        "body",
        [
            b"<html><body>Bad Gateway</body></html>",
            b"",
            b"\xff\xfe not utf-8",
            b'{"key": "truncated',
            b"[1, 2, 3]",
        ],
        ids=["html", "empty", "binary", "broken-json", "json-list"],
    )
    def test_body_that_is_not_an_error_object_still_maps_by_status(
        self, status: int, expected: type[UpstreamError], body: bytes
    ) -> None:
        """An error body that is not a JSON error object maps by status alone."""
        error = _from(status, content=body, headers={"Content-Type": "text/html"})
        assert type(error) is expected
        assert error.status == status
        assert error.key is None
        _assert_one_actionable_sentence(error.message)

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (400, INVALID_DATA),
            (400, {"key": "invalid_data"}),
            (401, {"key": "unauthorized", "message": "token expired"}),
            (403, {"key": "forbidden", "message": "missing crm.view"}),
            (404, {"key": "not_found"}),
            (412, {"key": "precondition_failure", "message": "unknown company"}),
            (418, {"message": "short and stout"}),
            (429, {"key": "too_many_requests"}),
            (500, {"key": "internal", "message": "boom"}),
            (502, {}),
            (503, {"message": "maintenance"}),
        ],
    )
    def test_message_is_one_actionable_sentence(self, status: int, body: dict[str, Any]) -> None:
        """Each message is one sentence ending in a period, with a `; <what to do>` instruction."""
        error = _from(status, json=body)
        _assert_one_actionable_sentence(error.message)
        assert str(error) == error.message

    def test_message_includes_upstream_key_and_detail(self) -> None:
        """The upstream key and message are quoted in the error so the user sees the cause."""
        error = _from(403, json={"key": "forbidden", "message": "missing crm.view"})
        assert "forbidden" in error.message
        assert "missing crm.view" in error.message

    def test_upstream_newlines_do_not_break_the_sentence(self) -> None:
        """Line breaks in an upstream message do not make the error span several lines."""
        error = _from(401, json={"key": "unauthorized", "message": "token expired\nsee portal"})
        assert "\n" not in error.message
        assert "\r" not in error.message


class TestExitCodeFor:
    @pytest.mark.parametrize("error", [Exception("boom"), ValueError("x"), KeyError("k")])
    def test_unknown_errors_are_internal(self, error: Exception) -> None:
        """Any exception outside the hierarchy is an internal error, exit 1."""
        assert exit_code_for(error) == 1

    @pytest.mark.parametrize(
        ("status", "code"),
        [(400, 4), (401, 3), (403, 3), (404, 4), (412, 5), (429, 5), (500, 5)],
    )
    def test_upstream_errors_use_their_class_code(self, status: int, code: int) -> None:
        """An error from a response exits with its class's contract code."""
        assert exit_code_for(_from(status)) == code

    def test_config_error_is_2(self) -> None:
        """A configuration error exits with 2."""
        assert exit_code_for(ConfigError("Config key x (bad); fix it.")) == 2


SEVERITY = [1, 6, 2, 3, 4, 5, 7, 8, 0]  # the most severe first, as errors.py documents


class TestWorstExitCode:
    @pytest.mark.parametrize(
        ("worse", "better"),
        [(SEVERITY[i], SEVERITY[j]) for i in range(9) for j in range(i + 1, 9)],
    )
    def test_more_severe_code_wins(self, worse: int, better: int) -> None:
        """Of two codes, the one earlier in 1 > 6 > 2 > 3 > 4 > 5 > 7 > 8 > 0 wins, either way."""
        assert worst_exit_code([worse, better]) == worse
        assert worst_exit_code([better, worse]) == worse

    def test_picks_from_many(self) -> None:
        """Among many companies' codes, the most severe one is the run's code."""
        assert worst_exit_code([0, 7, 5, 0, 4, 7]) == 4
        assert worst_exit_code([7, 0, 7]) == 7
        assert worst_exit_code([0, 5, 3, 6, 2]) == 6

    def test_all_ok(self) -> None:
        """Codes that are all 0 give 0."""
        assert worst_exit_code([0, 0, 0]) == 0

    def test_empty_is_ok(self) -> None:
        """No codes at all (no companies) give 0."""
        assert worst_exit_code([]) == 0
