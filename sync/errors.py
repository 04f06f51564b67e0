"""One error hierarchy for the whole product, and its mapping to the contract's exit codes.

Every message is one sentence a user can act on; none may contain the API token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sync.log import redactor

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AuthError",
    "CompanyLocked",
    "ConfigError",
    "DatabaseError",
    "DeletionRefused",
    "MalformedResponse",
    "OffsetLimitReached",
    "PagingUnstable",
    "PassInterrupted",
    "PreconditionFailed",
    "RateLimited",
    "RequestAbandoned",
    "RequestRejected",
    "ServerError",
    "SyncError",
    "TransientUpstreamError",
    "TransportFailure",
    "UnstableOrder",
    "UpstreamError",
    "UpstreamUnavailable",
    "ValidationFailure",
    "exit_code_for",
    "severity_rank",
    "worst_exit_code",
]


class SyncError(Exception):
    """Base of every error the product expects; `exit_code` is the contract's code for it."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        # Scrubbed at birth: upstream text echoed into a message may carry the token, and the
        # message travels to stderr, logs and the database's last_error.
        message = redactor().scrub(message)
        super().__init__(message)
        self.message = message


class ConfigError(SyncError):
    exit_code = 2


class DatabaseError(SyncError):
    exit_code = 6


class CompanyLocked(SyncError):
    exit_code = 7

    def __init__(self, company_id: str) -> None:
        super().__init__(
            f"Company {company_id} is being synced by another process; "
            "wait for it to finish or stop it, then run again."
        )
        self.company_id = company_id


class DeletionRefused(SyncError):
    """reconcile would have marked an implausible share of a company's rows, so it marked
    none: not a failure, but an outcome a person must look at before `--force`."""

    exit_code = 8


class PassInterrupted(SyncError):
    """A stop was requested; the pages stored so far are kept and the cursor is unchanged."""

    def __init__(self, company_id: str) -> None:
        super().__init__(
            f"The pass for company {company_id} was stopped on request; "
            "the next run resumes where it stopped."
        )
        self.company_id = company_id


class RequestAbandoned(SyncError):
    """A prefetched request whose walk ended before it came back: it stops retrying. Nobody
    waits for it, so no user ever reads this."""


@dataclass(frozen=True)
class ValidationFailure:
    field: str
    message: str


class UpstreamError(SyncError):
    """An answer from the contacts API that is not a page of contacts."""

    exit_code = 5

    def __init__(self, message: str, *, status: int | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key

    @classmethod
    def from_response(cls, response: httpx.Response) -> UpstreamError:
        """Map a non-200 response to the error type that decides whether it is retried."""
        status = response.status_code
        body = _json_or_none(response)
        fields = body if isinstance(body, dict) else {}
        key = _one_line(fields.get("key")) or None
        detail = _one_line(fields.get("message"))
        said = f" ({key}: {detail})" if key or detail else ""
        if status == 400:
            listed = fields.get("failures")
            failures = [
                ValidationFailure(_one_line(f.get("field")) or "?", _one_line(f.get("message")))
                for f in (listed if isinstance(listed, list) else [])
                if isinstance(f, dict)
            ]
            return RequestRejected.invalid_data(failures, key=key)
        if status == 401:
            return AuthError(
                f"The API rejected the token (401{said}); set a valid api.token or api.token_file.",
                status=status,
                key=key,
            )
        if status == 403:
            return AuthError(
                f"The token lacks permission for this company (403{said}); "
                "grant it crm.view or remove the company from api.companies.",
                status=status,
                key=key,
            )
        if status == 412:
            return PreconditionFailed(
                f"The API refused the company or version header (412{said}); "
                "check api.companies, api.company_header and api.api_version.",
                status=status,
                key=key,
            )
        if status == 429:
            return RateLimited(
                f"The API kept rate-limiting requests (429{said}); "
                "lower api.concurrency or run again later.",
                retry_after=_retry_after_seconds(response),
                status=status,
                key=key,
            )
        if status >= 500 or status in (408, 425):
            return ServerError(
                f"The API kept failing with {status}{said}; "
                "check the CRM's status and run again later.",
                retry_after=_retry_after_seconds(response),
                status=status,
                key=key,
            )
        return RequestRejected(
            f"The API rejected the request with {status}{said}; check api.base_url and the config.",
            status=status,
            key=key,
        )


class AuthError(UpstreamError):
    exit_code = 3


class RequestRejected(UpstreamError):
    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        key: str | None = None,
        failures: Sequence[ValidationFailure] = (),
    ) -> None:
        super().__init__(message, status=status, key=key)
        self.failures = tuple(failures)

    @classmethod
    def invalid_data(
        cls, failures: Sequence[ValidationFailure], *, key: str | None = None
    ) -> RequestRejected:
        listed = "; ".join(f"{f.field}: {f.message}" for f in failures) or "no details given"
        return cls(
            f"The API rejected the request as invalid ({listed}); "
            "check api.page_size, api.client_id and sync.initial_since.",
            status=400,
            key=key,
            failures=failures,
        )


class UpstreamUnavailable(UpstreamError):
    """The API could not be used even after the retry budget was spent."""

    exit_code = 5


class TransientUpstreamError(UpstreamUnavailable):
    """A failure worth retrying; `retry_after` is the server's own hint, in seconds."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message, status=status, key=key)
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        """A short label for logs and metrics: which kind of failure was retried."""
        return _REASONS.get(type(self), "other")


class PreconditionFailed(TransientUpstreamError):
    pass


class RateLimited(TransientUpstreamError):
    pass


class ServerError(TransientUpstreamError):
    """5xx, and 408 (Request Timeout) and 425 (Too Early), which ask for the request again."""

    @property
    def reason(self) -> str:
        return "5xx" if self.status is None or self.status >= 500 else str(self.status)


class TransportFailure(TransientUpstreamError):
    """Timeouts, refused or reset connections: nothing usable came back."""


class MalformedResponse(TransientUpstreamError):
    """A 200 whose body is not a JSON array of objects."""


class PagingUnstable(UpstreamUnavailable):
    """Paging could not be exact: rows moved between offsets faster than it could realign on
    them, or the walk stopped making progress; the cursor stays where it was."""


class UnstableOrder(PagingUnstable):
    """Upstream served rows read before in another relative order: its order is not stable
    between requests, so an offset walk over that region cannot be trusted."""


class OffsetLimitReached(RequestRejected):
    """Upstream will not page past some offset: it refuses it (400) or serves earlier rows."""

    def __init__(self, offset: int, what: str) -> None:
        super().__init__(
            f"Upstream {what} at offset {offset}, so the list cannot be read past it; narrow "
            "what one pass reads (api.client_id, or backfill --since in steps) or ask the "
            "provider to lift the limit (the cursor was not moved).",
            status=400,
        )
        self.offset = offset


_REASONS: dict[type[TransientUpstreamError], str] = {
    PreconditionFailed: "412",
    RateLimited: "429",
    ServerError: "5xx",
    TransportFailure: "network",
    MalformedResponse: "malformed",
}


# Which failure outranks which when several companies fail: the one needing attention first.
_SEVERITY = (1, 6, 2, 3, 4, 5, 7, 8, 0)


def severity_rank(code: int) -> int:
    """0 for the most severe exit code; used to order and pick among several failures."""
    return _SEVERITY.index(code)


def worst_exit_code(codes: Sequence[int]) -> int:
    """The exit code of a multi-company run: the most severe of the companies' codes."""
    return min(codes, key=severity_rank, default=0)


def exit_code_for(error: BaseException) -> int:
    """The contract's exit code for any error that reaches the command line."""
    if isinstance(error, SyncError):
        return error.exit_code
    return 1


def _one_line(value: object, limit: int = 200) -> str:
    """Upstream text made safe for a one-sentence message: no control characters, bounded."""
    if value is None:
        return ""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds; the HTTP-date form is honoured too."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
