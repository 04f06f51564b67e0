"""What the simulated upstream accepts and how it behaves, fixed when a server is built."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, get_args

from sync.sandbox.data import ORDERS, Order
from sync.sandbox.ordering import TIE_ORDERS, TieOrder
from sync.sandbox.ratelimit import RATE_HEADERS, RateHeaders

__all__ = ["CONTACTS_PATH", "DEFAULT_TOKEN", "HOST", "OFFSET_MODES", "OffsetMode", "SandboxConfig"]

OffsetMode = Literal["reject", "clamp"]
OFFSET_MODES: tuple[OffsetMode, ...] = get_args(OffsetMode)

HOST = "127.0.0.1"
DEFAULT_TOKEN = "sandbox-token"  # noqa: S105 - published, so that anyone can try the sandbox
"""Written out, not taken from sync.config (PUBLIC_SANDBOX_TOKEN, which must equal it): the
sandbox command should not pay for importing pydantic."""
CONTACTS_PATH = "/api/contacts"


@dataclass(frozen=True)
class SandboxConfig:
    """What the simulated upstream accepts and how it orders; data lives in `SandboxData`.

    The defaults are a well-behaved server; the other values of `page_cap`, `max_offset`
    and `tie_order` reproduce what real servers do and the documentation never says.
    """

    tokens: Collection[str] = (DEFAULT_TOKEN,)
    tokens_without_view: Collection[str] = ()
    """Valid tokens lacking `crm.view`: 403 for every company."""
    forbidden_companies: Collection[str] = ()
    """Companies every token gets 403 for."""
    accepted_versions: Collection[str] = ("2024-01",)
    require_version: bool = False
    company_header: str = "X-Company-Id"
    version_header: str = "X-Api-Version"
    order: Order = "id"
    latency_ms: float = 0.0
    request_log_size: int = 100_000
    page_cap: int | None = None
    """Serve at most this many items per page, whatever `limit` asks."""
    max_offset: int | None = None
    """The largest offset served; beyond it `offset_mode` decides."""
    offset_mode: OffsetMode = "reject"
    """Beyond `max_offset`: `reject` answers 400 `invalid_data` naming `offset`; `clamp`
    silently serves the page at `max_offset` instead."""
    tie_order: TieOrder = "stable"
    """How the updated_at orders serve rows sharing one updated_at: `stable` by id;
    `per_page` by a hash of (id, offset + limit), as a top-N sort without a tie-breaker does;
    `per_request` shuffled afresh on every request."""
    rate_limit: int | None = None
    """Serve at most this many requests per `rate_window_s` (all companies together); past it,
    429 with Retry-After until the window ends."""
    rate_window_s: float = 1.0
    rate_headers: RateHeaders = "both"
    """With `rate_limit`, the quota headers every answer carries (see `RateHeaders`)."""

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.tie_order not in TIE_ORDERS:
            raise ValueError(
                f"tie_order must be one of {', '.join(TIE_ORDERS)}, not {self.tie_order!r}"
            )
        if self.offset_mode not in OFFSET_MODES:
            raise ValueError(
                f"offset_mode must be one of {', '.join(OFFSET_MODES)}, not {self.offset_mode!r}"
            )
        if self.page_cap is not None and self.page_cap < 1:
            raise ValueError("page_cap must be >= 1")
        if self.max_offset is not None and self.max_offset < 0:
            raise ValueError("max_offset must be >= 0")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise ValueError("rate_limit must be >= 1")
        if self.rate_window_s <= 0:
            raise ValueError("rate_window_s must be > 0")
        if self.rate_headers not in RATE_HEADERS:
            raise ValueError(
                f"rate_headers must be one of {', '.join(RATE_HEADERS)}, not {self.rate_headers!r}"
            )
        if self.request_log_size < 1:
            raise ValueError("request_log_size must be >= 1")
