"""sync.toml plus CONTACTS_SYNC_<SECTION>__<KEY> environment overrides -> validated Settings.

Nothing is read at import time: `load_settings(path)` is the only entry point, called by the CLI.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from sync.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "PUBLIC_SANDBOX_TOKEN",
    "ApiSettings",
    "DatabaseSettings",
    "Settings",
    "SyncSettings",
    "config_warnings",
    "load_settings",
    "parse_duration",
]

DEFAULT_CONFIG_PATH = Path("sync.toml")
ENV_PREFIX = "CONTACTS_SYNC_"
CONFIG_PATH_ENV = "CONTACTS_SYNC_CONFIG"
PUBLIC_SANDBOX_TOKEN = "sandbox-token"  # noqa: S105 - published with the sandbox, not a secret
"""The sandbox's token: a config file holding only it may be readable by anyone."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "90s", "5m", "1h" or "1h30m"."""
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration such as 90s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise ValueError("expected seconds or a duration such as 90s, 5m or 1h")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError("expected seconds or a duration such as 90s, 5m or 1h")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be a finite duration longer than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiSettings(_Section):
    # Declared first so that the base_url check below can see it.
    allow_insecure_http: bool = False
    base_url: str = "http://127.0.0.1:8787"
    token: SecretStr | None = None
    token_file: Path | None = None
    companies: list[str] = Field(default_factory=list)
    company_header: str = Field(default="X-Company-Id", min_length=1)
    version_header: str = Field(default="X-Api-Version", min_length=1)
    api_version: str | None = None
    client_id: int | None = Field(default=None, ge=1)
    page_size: int = Field(default=100, ge=2, le=100)
    """At least 2: pages overlap by a row, so one row a page would never move on."""
    concurrency: int = Field(default=4, ge=1, le=32)
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_requests_per_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """Requests per second upstream for the whole process, every company and retry counted;
    0 sets no limit of its own (429s and rate-limit headers still slow it down)."""
    burst: int = Field(default=1, ge=1, le=1000)
    """How many requests may go at once after a quiet spell, within max_requests_per_s."""
    ca_bundle: Path | None = None
    """PEM file of CA certificates to trust instead of the default ones; never "no checks"."""

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_loads(cls, path: Path | None) -> Path | None:
        """Read now, so a wrong path fails the run at start-up (exit 2), not at the first page."""
        if path is None:
            return None
        try:
            ssl.create_default_context(cafile=str(path))
        except ssl.SSLError:  # before OSError, of which it is a subclass
            raise ValueError(f"{path} holds no PEM CA certificate; give a PEM bundle") from None
        except OSError as exc:
            raise ValueError(
                f"cannot read {path} ({exc.strerror or exc}); give a readable PEM file"
            ) from None
        return path

    @field_validator("companies")
    @classmethod
    def _companies_are_distinct_ids(cls, companies: list[str]) -> list[str]:
        if not companies:
            raise ValueError("list at least one company id")
        if any(not c.strip() for c in companies):
            raise ValueError("company ids must not be blank")
        if len(set(companies)) != len(companies):
            raise ValueError("company ids must be distinct")
        return companies

    @field_validator("base_url")
    @classmethod
    def _url_is_safe(cls, url: str, info: ValidationInfo) -> str:
        """Plain http only to loopback, judged from the URL alone before anything is sent."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        insecure_ok = bool(info.data.get("allow_insecure_http"))
        if parts.scheme == "http" and not insecure_ok and not _is_loopback_host(parts.hostname):
            raise ValueError(
                "plain http to a non-loopback host is refused; use https "
                "or set api.allow_insecure_http = true"
            )
        return url.rstrip("/")

    def resolve_token(self) -> str:
        """The bearer token from api.token, else api.token_file; read only when it is needed."""
        if self.token is not None and self.token.get_secret_value().strip():
            return self.token.get_secret_value().strip()
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"Config key api.token_file: cannot read {self.token_file} "
                    f"({exc.strerror}); fix the path or its permissions."
                ) from None
            if not token:
                raise ConfigError(
                    f"Config key api.token_file: {self.token_file} is empty; "
                    "put the API token in it."
                )
            return token
        raise ConfigError(
            "Config key api.token is not set; set api.token, api.token_file "
            "or CONTACTS_SYNC_API__TOKEN."
        )


class DatabaseSettings(_Section):
    url: str = Field(default="sqlite:///contacts.db", min_length=1)


class SyncSettings(_Section):
    interval: Duration = 300.0
    reconcile_interval: Duration | None = None
    lookback_s: float = Field(default=300.0, ge=0)
    initial_since: datetime | None = None
    deletes: Literal["soft", "hard"] = "soft"
    history: bool = False
    """Keep every version of every contact in contacts_history (see the README, History)."""
    max_delete_fraction: float = Field(default=0.2, gt=0, le=1)
    """The largest share of a company's live rows one reconcile marks without --force."""
    workers: int = Field(default=8, ge=1, le=256)
    """Companies synced at once (`run` and `once`); each pass waits on upstream most of the time."""

    @field_validator("initial_since")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class RetrySettings(_Section):
    max_attempts: int = Field(default=6, ge=1, le=100)
    max_elapsed_s: float = Field(default=120.0, gt=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class MetricsSettings(_Section):
    port: int = Field(default=0, ge=0, le=65535)


class Settings(BaseSettings):
    """The whole configuration; env overrides the file, key by key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    api: ApiSettings = Field(default_factory=ApiSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment wins over them.
        return (env_settings, init_settings)


def config_path_from_env(explicit: Path | None) -> tuple[Path, bool]:
    """The config file to read, and whether the user named it (then it must exist)."""
    if explicit is not None:
        return explicit, True
    from_env = os.environ.get(CONFIG_PATH_ENV)
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(path: Path | None = None) -> Settings:
    """Read, merge and validate the configuration; any problem is a ConfigError naming the key."""
    file_path, named = config_path_from_env(path)
    data: dict[str, Any] = {}
    if file_path.exists():
        try:
            data = tomllib.loads(file_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"Config file {file_path} is not valid TOML ({exc}); fix the syntax."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"Config file {file_path} cannot be read ({exc}); fix its permissions."
            ) from None
    elif named:
        raise ConfigError(
            f"Config file {file_path} does not exist; create it (see the README) "
            "or pass --config with the right path."
        )
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file_path)) from None
    except SettingsError as exc:
        raise ConfigError(
            f"A CONTACTS_SYNC_* environment variable is not valid JSON ({exc}); "
            'quote lists like \'["1", "2"]\'.'
        ) from None


def config_warnings(settings: Settings, path: Path | None = None) -> list[str]:
    """Sentences about risky but working setups: a token in a file that others may read.

    The sandbox's published token is exempt, so the repository's own `sync.toml` stays quiet.
    """
    warnings: list[str] = []
    file_path, _ = config_path_from_env(path)
    token = settings.api.token
    secret_in_file = _token_in_file(file_path) not in ("", PUBLIC_SANDBOX_TOKEN)
    if secret_in_file and _readable_by_others(file_path):
        warnings.append(
            f"Config file {file_path} holds api.token and others may read it; "
            f"run chmod 600 {file_path} or move the token to api.token_file."
        )
    token_file = settings.api.token_file
    no_token = token is None or not token.get_secret_value().strip()
    if no_token and token_file is not None and _readable_by_others(token_file):
        warnings.append(
            f"Token file {token_file} may be read by others; run chmod 600 {token_file}."
        )
    return warnings


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _token_in_file(path: Path) -> str:
    """The api.token the file itself (not the environment) sets, or ""."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    api = data.get("api")
    value = api.get("token") if isinstance(api, dict) else None
    return value.strip() if isinstance(value, str) else ""


def _describe(exc: ValidationError, file_path: Path) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"] if not isinstance(p, int)) or "(top level)"
        reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        reason = reason.removeprefix("Value error, ")
        problems.append(f"{key} ({reason})")
    listed = "; ".join(problems)
    noun = "key" if len(problems) == 1 else "keys"
    return f"Config {noun} {listed}: fix this in {file_path} or the CONTACTS_SYNC_* environment."
