"""What the simulated upstream accepts and how it behaves, fixed when a server is built."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sync.config import PUBLIC_SANDBOX_TOKEN
from sync.sandbox.data import ORDERS, Order

__all__ = ["CONTACTS_PATH", "DEFAULT_TOKEN", "HOST", "SandboxConfig"]

HOST = "127.0.0.1"
DEFAULT_TOKEN = PUBLIC_SANDBOX_TOKEN
CONTACTS_PATH = "/api/contacts"


@dataclass(frozen=True)
class SandboxConfig:
    """What the simulated upstream accepts and how it orders; data lives in `SandboxData`."""

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

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.request_log_size < 1:
            raise ValueError("request_log_size must be >= 1")
