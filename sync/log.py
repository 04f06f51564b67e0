"""structlog configuration, with the API token and the database password scrubbed from every event
and library log line.

JSON lines when stderr is not a terminal (journald, files), readable console output on one.
The standard library's loggers (httpx, uvicorn, alembic) go through the same processors.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    import structlog
    from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "SecretRedactor", "configure_logging", "get_logger"]

REDACTED = "[redacted]"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def _written_forms(secret: str) -> set[str]:
    """The secret as URLs, query strings and libpq strings may carry it: percent-encoded (either
    case of hex digits, spaces as %20 or +), and with libpq's backslash escapes."""
    encoded = {quote(secret, safe=""), quote_plus(secret), quote(secret)}
    lower = {_PERCENT.sub(lambda m: m.group(0).lower(), form) for form in encoded}
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    return {secret, escaped, *encoded, *lower}


class SecretRedactor:
    """Replaces every registered secret, in every written form, wherever it appears in an event,
    by a marker."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def forget(self) -> None:
        """Drop every registered secret: for a process that serves one config after another."""
        self._secrets = []

    def add(self, secret: str) -> None:
        if secret:
            forms = _written_forms(secret).union(self._secrets)
            self._secrets = sorted(forms, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if not self._secrets:
            return value
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return {k: self.scrub(v) for k, v in event_dict.items()}


_redactor = SecretRedactor()


def redactor() -> SecretRedactor:
    """The process-wide redactor; the CLI registers the token with it as soon as it is read."""
    return _redactor


def _drop_stdlib_noise(
    logger: WrappedLogger, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict.pop("_from_structlog", None)
    event_dict.pop("_record", None)
    return event_dict


def configure_logging(
    level: str = "info",
    output_format: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
) -> None:
    """Set up structlog and the standard library's logging to write one stream, scrubbed."""
    import structlog  # noqa: PLC0415 - it imports rich and asyncio: not for `--help`, `sandbox`

    stream = stream if stream is not None else sys.stderr
    as_json = output_format == "json" or (
        output_format == "auto" and not (hasattr(stream, "isatty") and stream.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redactor,
            _drop_stdlib_noise,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = _LEVELS[level]
    root.setLevel(numeric)
    for noisy in ("httpx", "httpcore", "uvicorn.access", "alembic"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    import structlog  # noqa: PLC0415 - see configure_logging

    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
