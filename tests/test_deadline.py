"""A deadline per request: an upstream that trickles its answer, or asks for the request again
(408, 425), cannot keep a pass alive longer than the retry budget plus one timeout."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import pytest
from conftest import engine_for, make_settings, mirror_rows, upstream_rows
from test_cli import _env, one_sentence

from sync.config import Settings
from sync.errors import SyncError, UpstreamUnavailable, exit_code_for
from sync.sandbox import SandboxServer
from sync.store import MirrorStore

CURSOR = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TIMEOUT_S = 1.0
MAX_ELAPSED_S = 2.0
BOUND_S = MAX_ELAPSED_S + TIMEOUT_S
DRIP_S = 15.0
"""How long a connection trickles before it is dropped, so a client without a deadline fails
these tests instead of hanging them."""


class Trickler:
    """A loopback HTTP server that answers every request one byte every 0.2 s (for DRIP_S):
    after whole headers (`body`), or from the status line on (`headers`)."""

    def __init__(self, mode: str) -> None:
        self._mode = mode
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> Trickler:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                conn, _ = self._listener.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        headers = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99999\r\n"
        with conn, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            if self._mode == "body":
                conn.sendall(headers + b"\r\n")
                drip = b"[" + b" " * 99998
            else:
                drip = headers + b"X-Slow: " + b"a" * 99999
            ends = time.monotonic() + DRIP_S
            for byte in drip:
                if self._stop.wait(0.2) or time.monotonic() > ends:
                    return
                conn.sendall(bytes([byte]))


def _with_cursor(db_url: str) -> None:
    store = MirrorStore.open(db_url)
    try:
        store.advance_cursor("1", CURSOR, CURSOR)
    finally:
        store.close()


def _cursor(db_url: str) -> datetime | None:
    store = MirrorStore.open(db_url)
    try:
        return store.read_state("1").cursor
    finally:
        store.close()


def _settings_for(base_url: str, db_url: str) -> Settings:
    return Settings(
        api={
            "base_url": base_url,
            "token": "trickle-token",
            "companies": ["1"],
            "timeout_s": TIMEOUT_S,
        },
        database={"url": db_url},
        retry={"max_attempts": 10, "max_elapsed_s": MAX_ELAPSED_S},
    )


class TestTrickle:
    @pytest.mark.parametrize("mode", ["body", "headers"])
    def test_a_trickling_answer_fails_the_pass_within_the_bound(
        self, mode: str, db_url: str
    ) -> None:
        """A byte every 0.2 s, in the body or the headers, fails the pass (exit 5) within
        retry.max_elapsed_s plus one api.timeout_s, with the cursor where it was."""
        _with_cursor(db_url)
        with Trickler(mode) as server, engine_for(_settings_for(server.url, db_url)) as engine:
            began = time.monotonic()
            with pytest.raises(UpstreamUnavailable) as caught:
                engine.sync_company("1")
            took = time.monotonic() - began
        assert exit_code_for(caught.value) == 5
        assert "whole answer within 1 s" in caught.value.message
        assert took < BOUND_S + 0.5
        assert _cursor(db_url) == CURSOR

    def test_once_against_a_trickling_body_exits_5(self, sqlite_url: str, tmp_path: Path) -> None:
        """The command line ends too, with exit 5 and one sentence, the cursor unmoved."""
        _with_cursor(sqlite_url)
        with Trickler("body") as server:
            config = tmp_path / "sync.toml"
            config.write_text(
                f'[api]\nbase_url = "{server.url}"\ntoken = "trickle-token"\ncompanies = ["1"]\n'
                f"timeout_s = {TIMEOUT_S}\n"
                f'[database]\nurl = "{sqlite_url}"\n'
                f"[retry]\nmax_attempts = 10\nmax_elapsed_s = {MAX_ELAPSED_S}\n"
            )
            config.chmod(0o600)
            began = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "sync", "--config", str(config), "once"],
                capture_output=True,
                text=True,
                timeout=60,
                env=_env(),
                check=False,
            )
        assert done.returncode == 5, done.stderr
        assert time.monotonic() - began < BOUND_S + 6  # the bound, plus starting Python
        assert "raise api.timeout_s" in one_sentence(done.stderr)
        assert _cursor(sqlite_url) == CURSOR


class TestRetriedStatuses:
    @pytest.mark.parametrize("status", [408, 425])
    def test_408_and_425_are_retried_like_5xx(
        self, status: int, sandbox: SandboxServer, db_url: str
    ) -> None:
        """Upstream answering 408 or 425 for a while costs retries, not the pass."""
        settings = make_settings(sandbox, db_url, retry={"max_attempts": 20, "max_elapsed_s": 20})
        sandbox.faults.fail_company("1", status=status)
        restore = threading.Timer(0.8, sandbox.faults.restore_company, args=("1",))
        try:
            with engine_for(settings) as engine:
                restore.start()  # after opening the mirror, which may take longer than 0.8 s
                report = engine.sync_company("1")
        finally:
            restore.cancel()
        assert report.retries.get(str(status), 0) >= 1
        assert mirror_rows(db_url) == upstream_rows(sandbox)

    def test_a_lasting_408_fails_with_exit_5(self, sandbox: SandboxServer, db_url: str) -> None:
        """When the 408s outlast the retry budget, the pass fails as upstream unavailable."""
        settings = make_settings(sandbox, db_url, retry={"max_attempts": 3, "max_elapsed_s": 5})
        sandbox.faults.fail_company("1", status=408)
        with engine_for(settings) as engine, pytest.raises(SyncError) as caught:
            engine.sync_company("1")
        assert exit_code_for(caught.value) == 5
        assert len(sandbox.requests("1")) == 3
