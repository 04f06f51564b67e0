"""ContactsClient against the sandbox: what goes on the wire, and which failures are retried."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from sync.api import ContactsClient
from sync.config import ApiSettings
from sync.errors import (
    AuthError,
    RequestAbandoned,
    TransientUpstreamError,
    UpstreamUnavailable,
)
from sync.retry import RetryPolicy
from sync.sandbox import DEFAULT_TOKEN, SandboxConfig, SandboxData, SandboxServer


def client_for(
    server: SandboxServer, *, slept: list[float] | None = None, **api: object
) -> ContactsClient:
    settings = ApiSettings(base_url=server.base_url, companies=["1"], **api)  # type: ignore[arg-type]
    policy = RetryPolicy(
        max_attempts=4,
        max_elapsed_s=30,
        sleep=slept.append if slept is not None else (lambda _: None),
    )
    return ContactsClient(settings, DEFAULT_TOKEN, policy)


class TestRequests:
    def test_filter_is_whole_utc_seconds_with_z(self, sandbox: SandboxServer) -> None:
        """updated_after travels as gt:YYYY-MM-DDTHH:MM:SSZ in UTC, whatever offset it had."""
        with client_for(sandbox) as client:
            moment = datetime.fromisoformat("2025-03-01T12:30:45.987+02:00")
            client.fetch_page("1", offset=0, limit=10, updated_after=moment)
        (sent,) = sandbox.requests()
        assert sent.params["updated_at"] == "gt:2025-03-01T10:30:45Z"
        assert "+" not in sent.query
        assert sent.params["limit"] == "10"
        assert sent.params["offset"] == "0"

    def test_headers_have_configurable_names_and_version_only_when_set(self) -> None:
        """Company and version headers use the configured names; no version unless configured."""
        config = SandboxConfig(company_header="X-Tenant", version_header="X-Version")
        with SandboxServer(SandboxData.generate(("7",), 5), config) as server:
            plain = client_for(server, company_header="X-Tenant", version_header="X-Version")
            with plain:
                assert plain.fetch_page("7", offset=0, limit=100, updated_after=None).size == 5
            versioned = client_for(
                server, company_header="X-Tenant", version_header="X-Version", api_version="2024-01"
            )
            with versioned:
                versioned.fetch_page("7", offset=0, limit=100, updated_after=None)
            first, second = server.requests()
        assert (first.company, first.version) == ("7", None)
        assert (second.company, second.version) == ("7", "2024-01")

    def test_client_id_filters_the_list(self, sandbox: SandboxServer) -> None:
        """With api.client_id set, the filter is sent and only that client's rows come back."""
        with client_for(sandbox, client_id=3) as client:
            page = client.fetch_page("1", offset=0, limit=100, updated_after=None)
        assert sandbox.requests()[0].params["client_id"] == "3"
        assert page.parsed.rows
        assert {row.client_id for row in page.parsed.rows} == {3}

    def test_server_time_comes_from_the_date_header(self, sandbox: SandboxServer) -> None:
        """The page carries the upstream clock, which bounds the cursor."""
        with client_for(sandbox) as client:
            page = client.fetch_page("1", offset=0, limit=1, updated_after=None)
        assert page.server_time is not None
        assert abs((page.server_time - datetime.now(UTC)).total_seconds()) < 5


class TestRetries:
    def test_retry_after_is_honoured(self, sandbox: SandboxServer) -> None:
        """A 429's Retry-After is the wait before the next attempt."""
        sandbox.faults.add("429", retry_after=7)
        slept: list[float] = []
        with client_for(sandbox, slept=slept) as client:
            client.fetch_page("1", offset=0, limit=10, updated_after=None)
        assert slept == [7.0]
        assert [r.status for r in sandbox.requests()] == [429, 200]

    def test_backoff_grows_between_attempts(self, sandbox: SandboxServer) -> None:
        """Without Retry-After, waits grow exponentially (with jitter) until the budget ends."""
        sandbox.faults.fail_company("1", status=500)
        slept: list[float] = []
        with client_for(sandbox, slept=slept) as client, pytest.raises(UpstreamUnavailable):
            client.fetch_page("1", offset=0, limit=10, updated_after=None)
        assert len(slept) == 3
        assert slept[0] < slept[2]
        assert len(sandbox.requests()) == 4

    def test_an_abandoned_request_stops_retrying_at_once(self, sandbox: SandboxServer) -> None:
        """A request whose walk ended (a prefetch past the last page) gives up in its backoff:
        finishing a pass never waits for it or its retries."""
        sandbox.faults.fail_company("1", status=503)
        abandoned = threading.Event()
        threading.Timer(0.3, abandoned.set).start()
        settings = ApiSettings(base_url=sandbox.base_url, companies=["1"], timeout_s=5)
        policy = RetryPolicy(max_attempts=10, max_elapsed_s=60, initial_backoff_s=5)
        started = time.monotonic()
        with (
            ContactsClient(settings, DEFAULT_TOKEN, policy) as client,
            pytest.raises(RequestAbandoned),
        ):
            client.fetch_page("1", offset=0, limit=10, updated_after=None, abandoned=abandoned)
        assert time.monotonic() - started < 2
        assert len(sandbox.requests()) == 1

    def test_a_stalled_answer_times_out_and_is_retried(self, sandbox: SandboxServer) -> None:
        """The read timeout is always set: a stall becomes a retried network failure."""
        sandbox.faults.add("stall", seconds=3)
        retried: list[str] = []
        settings = ApiSettings(base_url=sandbox.base_url, companies=["1"], timeout_s=0.5)
        policy = RetryPolicy(
            max_attempts=3,
            max_elapsed_s=30,
            on_retry=lambda error, _: retried.append(error.reason),
            sleep=lambda _: None,
        )
        with ContactsClient(settings, DEFAULT_TOKEN, policy) as client:
            page = client.fetch_page("1", offset=0, limit=10, updated_after=None)
        assert page.size == 10
        assert retried == ["network"]

    def test_a_body_that_is_not_utf8_is_malformed_and_retried(self, sandbox: SandboxServer) -> None:
        """Bytes that are not UTF-8 inside a string make the page malformed JSON, retried."""
        sandbox.data.put_raw(
            "1", b'{"id": 5000, "updated_at": "2020-01-01T00:00:00Z", "name": "\xff"}'
        )
        with (
            client_for(sandbox) as client,
            pytest.raises(UpstreamUnavailable, match="not valid JSON"),
        ):
            client.fetch_page("1", offset=1150, limit=100, updated_after=None)
        assert len(sandbox.requests()) == 4

    def test_auth_errors_are_not_retried(self, sandbox: SandboxServer) -> None:
        """A 401 is raised on the first answer."""
        settings = ApiSettings(base_url=sandbox.base_url, companies=["1"])
        policy = RetryPolicy(max_attempts=5, max_elapsed_s=30, sleep=lambda _: None)
        with ContactsClient(settings, "wrong", policy) as client, pytest.raises(AuthError):
            client.fetch_page("1", offset=0, limit=10, updated_after=None)
        assert len(sandbox.requests()) == 1
        assert not issubclass(AuthError, TransientUpstreamError)
