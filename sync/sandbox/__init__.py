"""The local simulator of the upstream `GET /api/contacts`, for trying the product and for tests.

It follows `list-contacts-api.txt` closely (auth, headers, filters, the 400 body), serves pages
fast from cached ordered views, and lets a test inject faults and change data mid-pass.
"""

from sync.sandbox.app import SandboxApi, create_app
from sync.sandbox.config import (
    CONTACTS_PATH,
    DEFAULT_TOKEN,
    HOST,
    OFFSET_MODES,
    OffsetMode,
    SandboxConfig,
)
from sync.sandbox.data import (
    CLIENT_IDS,
    MAX_LENGTHS,
    ORDERS,
    Order,
    SandboxData,
    UpdatedFilter,
)
from sync.sandbox.faults import FAULT_KINDS, Fault, FaultKind, Faults
from sync.sandbox.mutator import Mutator
from sync.sandbox.ordering import TIE_ORDERS, TieOrder
from sync.sandbox.ratelimit import RATE_HEADERS, RateHeaders, WindowLimit
from sync.sandbox.requests import RecordedRequest, RequestLog
from sync.sandbox.server import SandboxServer, serve_forever

__all__ = [
    "CLIENT_IDS",
    "CONTACTS_PATH",
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "HOST",
    "MAX_LENGTHS",
    "OFFSET_MODES",
    "ORDERS",
    "RATE_HEADERS",
    "TIE_ORDERS",
    "Fault",
    "FaultKind",
    "Faults",
    "Mutator",
    "OffsetMode",
    "Order",
    "RateHeaders",
    "RecordedRequest",
    "RequestLog",
    "SandboxApi",
    "SandboxConfig",
    "SandboxData",
    "SandboxServer",
    "TieOrder",
    "UpdatedFilter",
    "WindowLimit",
    "create_app",
    "serve_forever",
]
