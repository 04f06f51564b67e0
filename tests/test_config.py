"""Configuration: sync.toml plus CONTACTS_SYNC_* overrides -> validated Settings, or ConfigError.

Every file is a real TOML file in the test's own directory; the environment is cleared of
CONTACTS_SYNC_* variables before each test so that nothing leaks in from the shell or CI.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sync.config import ApiSettings, Settings, load_settings, parse_duration
from sync.errors import ConfigError, exit_code_for

TOKEN = "tok-7f3a9c1e-NEVER-PRINT-ME"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees no CONTACTS_SYNC_* variable it did not set itself."""
    for name in list(os.environ):
        if name.upper().startswith("CONTACTS_SYNC_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "sync.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(tmp_path: Path, text: str) -> Settings:
    return load_settings(_write(tmp_path, text))


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value


class TestLoadSettings:
    def test_reads_the_named_file(self, tmp_path: Path) -> None:
        """Values in the named TOML file end up in the settings, sections and all."""
        settings = _load(
            tmp_path,
            '[api]\ncompanies = ["42", "7"]\npage_size = 50\n'
            '[database]\nurl = "sqlite:///elsewhere.db"\n'
            '[sync]\ndeletes = "hard"\n',
        )
        assert settings.api.companies == ["42", "7"]
        assert settings.api.page_size == 50
        assert settings.database.url == "sqlite:///elsewhere.db"
        assert settings.sync.deletes == "hard"

    def test_env_overrides_the_file_key_by_key(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An env variable replaces its one key; the section's other keys keep the file's values."""
        path = _write(
            tmp_path,
            '[api]\ncompanies = ["42"]\npage_size = 50\ntimeout_s = 10\n'
            "[retry]\nmax_attempts = 3\nmax_elapsed_s = 30\n",
        )
        monkeypatch.setenv("CONTACTS_SYNC_API__PAGE_SIZE", "20")
        monkeypatch.setenv("CONTACTS_SYNC_RETRY__MAX_ATTEMPTS", "9")
        settings = load_settings(path)
        assert settings.api.page_size == 20
        assert settings.api.timeout_s == 10.0
        assert settings.api.companies == ["42"]
        assert settings.retry.max_attempts == 9
        assert settings.retry.max_elapsed_s == 30.0

    def test_env_sets_keys_absent_from_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An env variable for a key or section the file does not mention is applied too."""
        path = _write(tmp_path, '[api]\ncompanies = ["42"]\n')
        monkeypatch.setenv("CONTACTS_SYNC_SYNC__INTERVAL", "5m")
        monkeypatch.setenv("CONTACTS_SYNC_DATABASE__URL", "sqlite:///from-env.db")
        monkeypatch.setenv("CONTACTS_SYNC_API__COMPANIES", '["1", "2"]')
        settings = load_settings(path)
        assert settings.sync.interval == 300.0
        assert settings.database.url == "sqlite:///from-env.db"
        assert settings.api.companies == ["1", "2"]

    def test_config_env_selects_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """CONTACTS_SYNC_CONFIG names the file read when no path is passed."""
        monkeypatch.chdir(tmp_path)
        _write(tmp_path, "[api]\npage_size = 11\n")
        chosen = _write(tmp_path, "[api]\npage_size = 22\n", name="chosen.toml")
        monkeypatch.setenv("CONTACTS_SYNC_CONFIG", str(chosen))
        assert load_settings().api.page_size == 22

    def test_explicit_path_beats_config_env(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A path passed in (--config) wins over CONTACTS_SYNC_CONFIG."""
        from_env = _write(tmp_path, "[api]\npage_size = 22\n", name="env.toml")
        explicit = _write(tmp_path, "[api]\npage_size = 33\n", name="explicit.toml")
        monkeypatch.setenv("CONTACTS_SYNC_CONFIG", str(from_env))
        assert load_settings(explicit).api.page_size == 33

    def test_explicit_missing_file_is_an_error(self, tmp_path: Path) -> None:
        """A file named with --config that does not exist is a ConfigError naming the file."""
        with pytest.raises(ConfigError, match=r"nowhere\.toml"):
            load_settings(tmp_path / "nowhere.toml")

    def test_missing_file_named_by_env_is_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file named by CONTACTS_SYNC_CONFIG that does not exist is a ConfigError."""
        monkeypatch.setenv("CONTACTS_SYNC_CONFIG", str(tmp_path / "absent.toml"))
        with pytest.raises(ConfigError, match=r"absent\.toml"):
            load_settings()

    def test_missing_default_file_is_not_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without ./sync.toml and without a named file, the defaults (plus env) are used."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("CONTACTS_SYNC_API__PAGE_SIZE", "20")
        settings = load_settings()
        assert settings.api.page_size == 20
        assert settings.database.url == "sqlite:///contacts.db"

    def test_default_file_is_read_from_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a named file, ./sync.toml is read when it exists."""
        monkeypatch.chdir(tmp_path)
        _write(tmp_path, "[api]\npage_size = 44\n")
        assert load_settings().api.page_size == 44

    def test_toml_syntax_error(self, tmp_path: Path) -> None:
        """A file that is not valid TOML is a ConfigError that says so."""
        error = _error(tmp_path, '[api\npage_size = "50\n')
        assert "not valid TOML" in str(error)

    def test_config_error_exits_with_2(self, tmp_path: Path) -> None:
        """A configuration problem maps to the contract's exit code 2."""
        error = _error(tmp_path, "[api]\npage_size = 0\n")
        assert error.exit_code == 2
        assert exit_code_for(error) == 2

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ("[api]\nfoo = 1\n", "api.foo"),
            ('[sync]\nintervall = "5m"\n', "sync.intervall"),
            ("[bogus]\nx = 1\n", "bogus"),
            ("stray = true\n", "stray"),
        ],
    )
    def test_unknown_key_in_file(self, tmp_path: Path, text: str, key: str) -> None:
        """An unknown key or section in the file is a ConfigError naming it."""
        error = _error(tmp_path, text)
        assert key in str(error)
        assert "unknown key" in str(error)

    def test_unknown_key_in_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An env variable for an unknown key of a known section is a ConfigError naming it."""
        path = _write(tmp_path, '[api]\ncompanies = ["42"]\n')
        monkeypatch.setenv("CONTACTS_SYNC_API__FOO", "1")
        with pytest.raises(ConfigError, match=r"api\.foo"):
            load_settings(path)

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ('[api]\npage_size = "many"\n', "api.page_size"),
            ('[api]\ncompanies = "42"\n', "api.companies"),
            ("[api]\ncompanies = [42]\n", "api.companies"),
            ("[api]\ntoken = 12345\n", "api.token"),
            ('[sync]\nlookback_s = "long"\n', "sync.lookback_s"),
            ("[metrics]\nport = [9100]\n", "metrics.port"),
            ("api = 1\n", "api"),
        ],
    )
    def test_wrong_type_in_file(self, tmp_path: Path, text: str, key: str) -> None:
        """A value of the wrong type is a ConfigError naming its key."""
        assert key in str(_error(tmp_path, text))

    def test_wrong_type_in_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An env value that does not parse as the key's type is a ConfigError naming the key."""
        path = _write(tmp_path, '[api]\ncompanies = ["42"]\n')
        monkeypatch.setenv("CONTACTS_SYNC_API__PAGE_SIZE", "twenty")
        with pytest.raises(ConfigError, match=r"api\.page_size"):
            load_settings(path)

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("CONTACTS_SYNC_API__COMPANIES", '["42", '),
            ("CONTACTS_SYNC_API", '{"page_size": 20,'),
        ],
    )
    def test_malformed_json_in_env(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        """An env value that should be JSON but is malformed is a ConfigError naming the key."""
        path = _write(tmp_path, '[api]\ncompanies = ["42"]\n')
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match="api"):
            load_settings(path)

    @pytest.mark.parametrize("page_size", [0, 1, 101, -1])
    def test_page_size_out_of_range(self, tmp_path: Path, page_size: int) -> None:
        """api.page_size outside 2..100 is a ConfigError naming the key."""
        error = _error(tmp_path, f"[api]\npage_size = {page_size}\n")
        assert "api.page_size" in str(error)

    @pytest.mark.parametrize("page_size", [2, 100])
    def test_page_size_bounds_are_allowed(self, tmp_path: Path, page_size: int) -> None:
        """api.page_size of exactly 2 or 100 is accepted (pages overlap by a row: 1 is not)."""
        assert _load(tmp_path, f"[api]\npage_size = {page_size}\n").api.page_size == page_size

    @pytest.mark.parametrize(
        "companies",
        ["[]", '["42", "42"]', '["42", " "]'],
        ids=["empty", "duplicate", "blank"],
    )
    def test_bad_company_list(self, tmp_path: Path, companies: str) -> None:
        """An empty, duplicated or blank company list is a ConfigError naming api.companies."""
        error = _error(tmp_path, f"[api]\ncompanies = {companies}\n")
        assert "api.companies" in str(error)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [('"90s"', 90.0), ('"5m"', 300.0), ('"1h"', 3600.0), ('"1h30m"', 5400.0), ("45", 45.0)],
    )
    def test_intervals_accept_durations(self, tmp_path: Path, value: str, seconds: float) -> None:
        """sync.interval and sync.reconcile_interval take seconds or 90s/5m/1h-style durations."""
        settings = _load(tmp_path, f"[sync]\ninterval = {value}\nreconcile_interval = {value}\n")
        assert settings.sync.interval == seconds
        assert settings.sync.reconcile_interval == seconds

    @pytest.mark.parametrize("value", ['"0s"', '"-5"', '"soon"', "true", "0", "-5"])
    def test_invalid_interval(self, tmp_path: Path, value: str) -> None:
        """An interval that is not a positive duration is a ConfigError naming sync.interval."""
        assert "sync.interval" in str(_error(tmp_path, f"[sync]\ninterval = {value}\n"))

    def test_negative_lookback(self, tmp_path: Path) -> None:
        """A negative sync.lookback_s is a ConfigError naming the key."""
        assert "sync.lookback_s" in str(_error(tmp_path, "[sync]\nlookback_s = -1\n"))

    def test_zero_lookback_is_allowed(self, tmp_path: Path) -> None:
        """A lookback of zero seconds is accepted."""
        assert _load(tmp_path, "[sync]\nlookback_s = 0\n").sync.lookback_s == 0.0

    @pytest.mark.parametrize("mode", ["soft", "hard"])
    def test_delete_modes(self, tmp_path: Path, mode: str) -> None:
        """sync.deletes accepts soft and hard."""
        assert _load(tmp_path, f'[sync]\ndeletes = "{mode}"\n').sync.deletes == mode

    @pytest.mark.parametrize("mode", ["purge", "SOFT", ""])
    def test_other_delete_modes_are_refused(self, tmp_path: Path, mode: str) -> None:
        """A sync.deletes other than soft or hard is a ConfigError naming the key."""
        assert "sync.deletes" in str(_error(tmp_path, f'[sync]\ndeletes = "{mode}"\n'))

    @pytest.mark.parametrize("value", ["0.05", "1", "1.0"])
    def test_max_delete_fraction(self, tmp_path: Path, value: str) -> None:
        """sync.max_delete_fraction accepts a share in (0, 1]; 0.2 when unset."""
        assert _load(tmp_path, "").sync.max_delete_fraction == 0.2
        loaded = _load(tmp_path, f"[sync]\nmax_delete_fraction = {value}\n")
        assert loaded.sync.max_delete_fraction == float(value)

    @pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan", '"most"', "[]"])
    def test_impossible_max_delete_fraction(self, tmp_path: Path, value: str) -> None:
        """A sync.max_delete_fraction outside (0, 1] or not a number is a ConfigError naming it."""
        error = _error(tmp_path, f"[sync]\nmax_delete_fraction = {value}\n")
        assert "sync.max_delete_fraction" in str(error)

    @pytest.mark.parametrize(
        "url",
        [
            "http://crm.example.com",
            "http://10.0.0.5:8080",
            "http://127.0.0.1.example.com",
            "http://localhost@crm.example.com",
        ],
    )
    def test_plain_http_to_remote_host_is_refused(self, tmp_path: Path, url: str) -> None:
        """Plain http to a host that is not loopback is a ConfigError naming api.base_url."""
        error = _error(tmp_path, f'[api]\nbase_url = "{url}"\n')
        assert "api.base_url" in str(error)
        assert "allow_insecure_http" in str(error)

    def test_allow_insecure_http_permits_remote_http(self, tmp_path: Path) -> None:
        """With api.allow_insecure_http, plain http to a remote host is accepted."""
        settings = _load(
            tmp_path, '[api]\nbase_url = "http://crm.example.com"\nallow_insecure_http = true\n'
        )
        assert settings.api.base_url == "http://crm.example.com"

    def test_allow_insecure_http_from_env(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """allow_insecure_http set in the environment also permits a remote http URL in the file."""
        path = _write(tmp_path, '[api]\nbase_url = "http://crm.example.com"\n')
        monkeypatch.setenv("CONTACTS_SYNC_API__ALLOW_INSECURE_HTTP", "true")
        assert load_settings(path).api.base_url == "http://crm.example.com"

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "http://localhost:8080",
            "https://crm.example.com",
            "https://10.0.0.5:8443",
        ],
    )
    def test_loopback_http_and_any_https_are_allowed(self, tmp_path: Path, url: str) -> None:
        """Plain http to loopback (IPv4, IPv6, localhost) and https to any host are accepted."""
        assert _load(tmp_path, f'[api]\nbase_url = "{url}"\n').api.base_url == url

    @pytest.mark.parametrize("url", ["ftp://crm.example.com", "crm.example.com", "https://"])
    def test_base_url_must_be_http_with_a_host(self, tmp_path: Path, url: str) -> None:
        """A base_url without an http(s) scheme or a host is a ConfigError naming the key."""
        assert "api.base_url" in str(_error(tmp_path, f'[api]\nbase_url = "{url}"\n'))

    def test_trailing_slash_is_stripped(self, tmp_path: Path) -> None:
        """A trailing slash on api.base_url is removed."""
        settings = _load(tmp_path, '[api]\nbase_url = "https://crm.example.com/v1/"\n')
        assert settings.api.base_url == "https://crm.example.com/v1"

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("2025-03-01T12:00:00", datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
            ('"2025-03-01T12:00:00"', datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
            ("2025-03-01T12:00:00+02:00", datetime(2025, 3, 1, 10, 0, tzinfo=UTC)),
            ('"2025-03-01T12:00:00-05:30"', datetime(2025, 3, 1, 17, 30, tzinfo=UTC)),
            ('"2025-03-01T12:00:00Z"', datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        ],
        ids=["toml-naive", "string-naive", "toml-offset", "string-offset", "string-z"],
    )
    def test_initial_since_is_utc(self, tmp_path: Path, value: str, expected: datetime) -> None:
        """sync.initial_since without an offset is taken as UTC; with one it is converted to UTC."""
        since = _load(tmp_path, f"[sync]\ninitial_since = {value}\n").sync.initial_since
        assert since == expected
        assert since is not None
        assert since.utcoffset() == timedelta(0)

    def test_error_never_contains_the_token(self, tmp_path: Path) -> None:
        """A ConfigError about another key does not repeat the token set in the file."""
        error = _error(tmp_path, f'[api]\ntoken = "{TOKEN}"\nfoo = "bar"\npage_size = 0\n')
        assert "api.foo" in str(error)
        assert TOKEN not in str(error)
        assert TOKEN not in error.message

    def test_error_never_contains_the_env_token(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A ConfigError does not repeat a token given through the environment."""
        path = _write(tmp_path, "[api]\nfoo = 1\n")
        monkeypatch.setenv("CONTACTS_SYNC_API__TOKEN", TOKEN)
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert "api.foo" in str(caught.value)
        assert TOKEN not in str(caught.value)

    def test_env_token_is_resolved(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """CONTACTS_SYNC_API__TOKEN provides the bearer token."""
        path = _write(tmp_path, '[api]\ncompanies = ["42"]\n')
        monkeypatch.setenv("CONTACTS_SYNC_API__TOKEN", TOKEN)
        assert load_settings(path).api.resolve_token() == TOKEN

    def test_settings_do_not_show_the_token(self, tmp_path: Path) -> None:
        """The settings' repr masks the token."""
        settings = _load(tmp_path, f'[api]\ntoken = "{TOKEN}"\n')
        assert TOKEN not in repr(settings)
        assert TOKEN not in str(settings)


class TestParseDuration:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("90s", 90.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1h30m", 5400.0),
            ("1H", 3600.0),
            (" 5m ", 300.0),
            ("120", 120.0),
            (45, 45.0),
            (2.5, 2.5),
        ],
    )
    def test_valid_durations(self, value: object, seconds: float) -> None:
        """Seconds or s/m/h strings, combined or not, become a number of seconds."""
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize(
        "value",
        ["0s", "-5", "soon", True, False, "", "5x", "1h-30m", "m", 0, -5, None, [60]],
    )
    def test_invalid_durations(self, value: object) -> None:
        """Zero, negative, unparseable, boolean or non-scalar values raise ValueError."""
        with pytest.raises(ValueError, match=r"duration|zero"):
            parse_duration(value)

    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_durations(self, value: float) -> None:
        """NaN and infinity are not durations."""
        with pytest.raises(ValueError, match=r"duration|zero|finite"):
            parse_duration(value)


class TestResolveToken:
    def test_token_wins_over_token_file(self, tmp_path: Path) -> None:
        """When both are set, api.token is used and the file is not read."""
        token_file = _write(tmp_path, "from-the-file\n", name="token")
        api = ApiSettings(token=TOKEN, token_file=token_file)
        assert api.resolve_token() == TOKEN

    def test_token_file_is_read_and_stripped(self, tmp_path: Path) -> None:
        """api.token_file's content, without surrounding whitespace, is the token."""
        token_file = _write(tmp_path, f"  {TOKEN}\n\n", name="token")
        assert ApiSettings(token_file=token_file).resolve_token() == TOKEN

    def test_token_file_from_config(self, tmp_path: Path) -> None:
        """api.token_file given in sync.toml is read when the token is needed."""
        token_file = _write(tmp_path, f"{TOKEN}\n", name="token")
        settings = _load(tmp_path, f"[api]\ntoken_file = {str(token_file)!r}\n")
        assert settings.api.resolve_token() == TOKEN

    @pytest.mark.parametrize("kind", ["missing", "directory"])
    def test_unreadable_token_file(self, tmp_path: Path, kind: str) -> None:
        """A token_file that cannot be read is a ConfigError naming api.token_file."""
        token_file = tmp_path / "token"
        if kind == "directory":
            token_file.mkdir()
        with pytest.raises(ConfigError, match=r"api\.token_file") as caught:
            ApiSettings(token_file=token_file).resolve_token()
        assert caught.value.exit_code == 2

    def test_empty_token_file(self, tmp_path: Path) -> None:
        """A token_file holding only whitespace is a ConfigError naming api.token_file."""
        token_file = _write(tmp_path, " \n\n", name="token")
        with pytest.raises(ConfigError, match=r"api\.token_file"):
            ApiSettings(token_file=token_file).resolve_token()

    def test_neither_token_nor_file(self) -> None:
        """With no token and no token_file, resolving is a ConfigError naming api.token."""
        with pytest.raises(ConfigError, match=r"api\.token\b") as caught:
            ApiSettings().resolve_token()
        assert caught.value.exit_code == 2

    def test_blank_token_falls_back_to_the_file(self, tmp_path: Path) -> None:
        """A whitespace-only api.token counts as unset, so token_file is used."""
        token_file = _write(tmp_path, TOKEN, name="token")
        assert ApiSettings(token="  ", token_file=token_file).resolve_token() == TOKEN

    def test_token_file_is_not_read_at_load(self, tmp_path: Path) -> None:
        """A missing token_file does not fail loading; only resolving the token fails."""
        settings = _load(tmp_path, f"[api]\ntoken_file = {str(tmp_path / 'absent')!r}\n")
        with pytest.raises(ConfigError, match=r"api\.token_file"):
            settings.api.resolve_token()
