"""The systemd units in deploy/ as systemd itself judges them, and the shipped production config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from sync.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ("contacts-sync.service", "contacts-sync-backfill.service")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if IN_CI:
            pytest.fail("systemd-analyze must be installed in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def _analyze(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY
    )


class TestUnits:
    @pytest.mark.parametrize("unit", UNITS)
    def test_verify_finds_nothing_but_the_absent_binary(
        self, systemd_analyze: str, unit: str
    ) -> None:
        """`systemd-analyze verify` has no complaint except that the program is not installed."""
        done = _analyze(systemd_analyze, "verify", unit)
        complaints = [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if line.strip() and "/opt/contacts-sync/venv/bin/contacts-sync" not in line
        ]
        assert complaints == []

    @pytest.mark.parametrize("unit", UNITS)
    def test_security_exposure_is_at_most_2(self, systemd_analyze: str, unit: str) -> None:
        """`systemd-analyze security --offline=true` rates the unit 2.0 or lower."""
        done = _analyze(systemd_analyze, "security", "--offline=true", "--no-pager", unit)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert found is not None, done.stdout + done.stderr
        assert float(found.group(1)) <= 2.0

    def test_daemon_unit_speaks_notify_and_takes_the_token_as_a_credential(self) -> None:
        """Type=notify with a watchdog, restarts on failure, the token through LoadCredential=."""
        unit = (DEPLOY / "contacts-sync.service").read_text(encoding="utf-8")
        for line in (
            "Type=notify",
            "Restart=on-failure",
            "LoadCredential=token:/etc/contacts-sync/token",
            "Environment=CONTACTS_SYNC_API__TOKEN_FILE=%d/token",
            "StateDirectory=contacts-sync",
        ):
            assert line in unit.splitlines()
        assert re.search(r"^WatchdogSec=\d+", unit, re.MULTILINE)
        backfill = (DEPLOY / "contacts-sync-backfill.service").read_text(encoding="utf-8")
        assert "Type=oneshot" in backfill.splitlines()


class TestProductionConfig:
    def test_deploy_config_loads_for_postgresql_without_a_token(self) -> None:
        """deploy/sync.toml is valid, targets PostgreSQL and holds no token."""
        settings = load_settings(DEPLOY / "sync.toml")
        assert settings.database.url.startswith("postgresql+psycopg://")
        assert settings.api.token is None
        assert settings.api.token_file is None
        raw = tomllib.loads((DEPLOY / "sync.toml").read_text(encoding="utf-8"))
        assert "token" not in raw["api"]
