"""The database password never leaves the process, in any URL or DSN form: not on stderr, in the
log (JSON or console), in `status`, nor in the mirror database itself."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy import create_engine, text
from test_cli import cli

from sync.log import SecretRedactor
from sync.sandbox import DEFAULT_TOKEN, SandboxServer

PASSWORD = "p@ss w'rd/DB-s3cr3t"
"""Characters that URLs and libpq strings must encode or quote, so each form differs."""


def written_forms(secret: str) -> set[str]:
    """How the secret could be spelt in output: as is, URL-encoded, libpq-escaped."""
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret), escaped}


def assert_nowhere(outputs: str) -> None:
    for form in written_forms(PASSWORD):
        assert form not in outputs, form


def write_config(path: Path, db_url: str, base_url: str, log_format: str = "json") -> Path:
    path.write_text(
        "\n".join(
            [
                "[api]",
                f"base_url = {json.dumps(base_url)}",
                f"token = {json.dumps(DEFAULT_TOKEN)}",
                'companies = ["1"]',
                "timeout_s = 5",
                "[database]",
                f"url = {json.dumps(db_url)}",
                "[retry]",
                "max_attempts = 2",
                "max_elapsed_s = 2",
                "[log]",
                'level = "debug"',
                f"format = {json.dumps(log_format)}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


ENCODED = quote(PASSWORD, safe="")
ENCODED_LOWER = re.sub("%[0-9A-F]{2}", lambda hex_digits: hex_digits[0].lower(), ENCODED)
LIBPQ_QUOTED = "'" + PASSWORD.replace("'", "\\'") + "'"
UNREACHABLE = {
    "user-info": f"postgresql+psycopg://sync:{ENCODED}@127.0.0.1:1/mirror",
    "query": f"postgresql+psycopg://sync@127.0.0.1:1/mirror?password={ENCODED}",
    "query-plus": f"postgresql+psycopg://sync@127.0.0.1:1/mirror?password={quote_plus(PASSWORD)}",
    "bad-port": f"postgresql+psycopg://sync:{ENCODED}@127.0.0.1:notaport/mirror",
    "libpq": f"host=127.0.0.1 port=1 dbname=mirror password={LIBPQ_QUOTED}",
    "lower-hex": f"postgresql+psycopg://sync:{ENCODED_LOWER}@127.0.0.1:1/mirror",
}
AGAINST_THE_SERVER = {
    "no-such-database": f"postgresql+psycopg://postgres:{ENCODED}@127.0.0.1:5432/no_such_db_x",
    "bad-option": f"postgresql+psycopg://postgres@127.0.0.1:5432/test?password={ENCODED}"
    "&sslmode=bogus",
    "unknown-option": f"postgresql+psycopg://postgres:{ENCODED}@127.0.0.1:5432/test?bogus=1",
}


class TestFailingDatabase:
    @pytest.mark.parametrize("db_url", UNREACHABLE.values(), ids=UNREACHABLE.keys())
    def test_an_unusable_url_shows_no_password(self, db_url: str, tmp_path: Path) -> None:
        """A database URL that cannot be used fails `once` and `status` naming database.url,
        without the password in stderr, in the JSON log lines, or in `status`."""
        config = write_config(tmp_path / "sync.toml", db_url, "http://127.0.0.1:9")
        runs = [cli(config, "once"), cli(config, "status", "--json")]
        assert all(run.returncode in (2, 6) for run in runs), [r.stderr for r in runs]
        assert all("database.url" in run.stderr for run in runs)
        assert_nowhere("".join(run.stdout + run.stderr for run in runs))

    @pytest.mark.postgres
    @pytest.mark.parametrize("db_url", AGAINST_THE_SERVER.values(), ids=AGAINST_THE_SERVER.keys())
    def test_a_server_refusing_the_url_shows_no_password(
        self, db_url: str, pg_admin_dsn: str, tmp_path: Path
    ) -> None:
        """The real PostgreSQL refusing a database name or an option: exit 6, no password."""
        config = write_config(tmp_path / "sync.toml", db_url, "http://127.0.0.1:9", "console")
        runs = [cli(config, "once"), cli(config, "status", "--json")]
        assert all(run.returncode == 6 for run in runs), [r.stderr for r in runs]
        assert_nowhere("".join(run.stdout + run.stderr for run in runs))


@pytest.mark.postgres
class TestRecordedFailure:
    @pytest.mark.parametrize("log_format", ["json", "console"])
    @pytest.mark.parametrize("where", ["user-info", "query"])
    def test_a_write_error_recorded_in_the_mirror_shows_no_password(
        self,
        where: str,
        log_format: str,
        pg_url: str,
        sandbox: SandboxServer,
        tmp_path: Path,
    ) -> None:
        """A pass failing on a write (the error names the database) records its sentence in
        sync_state and shows it in `status`: the password is in neither, nor in the log."""
        if where == "user-info":
            db_url = pg_url.replace("postgres@", f"postgres:{ENCODED}@", 1)
        else:
            db_url = f"{pg_url}?password={ENCODED}"
        config = write_config(tmp_path / "sync.toml", db_url, sandbox.base_url, log_format)
        assert cli(config, "status").returncode == 0  # creates the schema
        plain = create_engine(pg_url)
        try:
            with plain.begin() as conn:
                conn.execute(text(_REFUSE_INSERTS))
            runs = [cli(config, "once"), cli(config, "status", "--json"), cli(config, "status")]
            assert runs[0].returncode == 6, runs[0].stderr
            shown = json.loads(runs[1].stdout)["companies"][0]
            assert "Cannot write to the mirror database" in shown["last_error"]
            with plain.connect() as conn:
                stored = conn.execute(text("SELECT * FROM sync_state")).all()
        finally:
            plain.dispose()
        assert stored
        assert_nowhere("".join(run.stdout + run.stderr for run in runs) + repr(stored))


_REFUSE_INSERTS = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'contacts are read-only today'; END $$;
CREATE TRIGGER refuse BEFORE INSERT ON contacts FOR EACH ROW EXECUTE FUNCTION refuse();
"""


class TestRedactor:
    def test_every_written_form_of_a_secret_is_scrubbed(self) -> None:
        """Registered once, a secret is scrubbed as written in URLs, queries and libpq strings."""
        scrub = SecretRedactor([PASSWORD]).scrub
        for form in written_forms(PASSWORD) | {ENCODED_LOWER}:
            assert scrub(f"at postgresql://u:{form}@h/db: refused") == (
                "at postgresql://u:[redacted]@h/db: refused"
            )
