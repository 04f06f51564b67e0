"""The process-wide request budget: its config, its arithmetic, and real traffic to the sandbox."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
from conftest import make_settings, mirror_rows, run_pass, upstream_rows, wait_until
from test_sandbox import _sandbox_command

from sync.budget import (
    MIN_RATE,
    MIN_RATE_UNLIMITED,
    PAUSE_WITHOUT_RETRY_AFTER_S,
    RECOVERY_S,
    RequestBudget,
    read_rate_limit,
    reset_seconds,
)
from sync.config import ConfigError, Settings, load_settings
from sync.engine import PassReport, SyncEngine
from sync.errors import PassInterrupted, RequestAbandoned, UpstreamUnavailable
from sync.sandbox import SandboxConfig, SandboxData, SandboxServer, WindowLimit
from sync.store import MirrorStore

NOW = 1_700_000_000.0
"""A Unix time for header arithmetic."""


class FakeClock:
    """A monotonic clock a test moves by hand: budgets are asked only when nothing is due."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _send(budget: RequestBudget, clock: FakeClock, count: int, every_s: float) -> int:
    """`count` requests, `every_s` apart (a little more than the budget's interval, so each
    is let through at once); the clock stays at the last one, whose ticket is returned."""
    for number in range(count):
        if number:
            clock.now += every_s
        with budget.turn():
            pass
    assert budget.waited_s == 0
    return budget.requests


class TestConfig:
    def test_defaults_set_no_limit_and_no_burst(self) -> None:
        """Unset, the budget limits nothing (429s and headers aside) and bursts one at a time."""
        settings = Settings(api={"companies": ["1"]})
        assert (settings.api.max_requests_per_s, settings.api.burst) == (0, 1)
        assert RequestBudget.from_settings(settings.api).allowed_rate() == math.inf
        limited = Settings(api={"companies": ["1"], "max_requests_per_s": 20, "burst": 3})
        assert RequestBudget.from_settings(limited.api).allowed_rate() == 20

    @pytest.mark.parametrize(
        ("line", "key"),
        [
            ("max_requests_per_s = -1", "api.max_requests_per_s"),
            ("max_requests_per_s = nan", "api.max_requests_per_s"),
            ("max_requests_per_s = inf", "api.max_requests_per_s"),
            ('max_requests_per_s = "fast"', "api.max_requests_per_s"),
            ("burst = 0", "api.burst"),
            ("burst = 2.5", "api.burst"),
        ],
    )
    def test_impossible_values_are_config_errors_naming_the_key(
        self, tmp_path: Path, line: str, key: str
    ) -> None:
        """A negative, infinite or non-numeric rate, or a burst under 1, exits 2 naming it."""
        path = tmp_path / "sync.toml"
        path.write_text(f'[api]\ncompanies = ["1"]\n{line}\n', encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert caught.value.exit_code == 2
        assert f"Config key {key} (" in caught.value.message


class TestHeaders:
    def test_ietf_headers_give_seconds_to_wait(self) -> None:
        """RateLimit-Limit/-Remaining/-Reset: the reset is a number of seconds."""
        hint = read_rate_limit(
            {
                "ratelimit-limit": "100, 100;w=60",
                "ratelimit-remaining": "7",
                "ratelimit-reset": "3",
            },
            NOW,
        )
        assert hint is not None
        assert (hint.limit, hint.remaining, hint.reset_s) == (100, 7, 3)

    @pytest.mark.parametrize(
        "headers",
        [
            {"ratelimit": "limit=100, remaining=7, reset=3"},
            {"ratelimit": '"default";r=7;t=3', "ratelimit-policy": '"default";q=100;w=60'},
        ],
        ids=["draft-07", "draft-08"],
    )
    def test_the_combined_header_is_read_in_both_drafts(self, headers: dict[str, str]) -> None:
        """`RateLimit: limit=, remaining=, reset=` and `RateLimit: r=;t=` with its policy's q."""
        hint = read_rate_limit(headers, NOW)
        assert hint is not None
        assert (hint.limit, hint.remaining, hint.reset_s) == (100, 7, 3)

    @pytest.mark.parametrize(
        ("reset", "seconds"),
        [("30", 30), (str(int(NOW) + 30), 30), (str(int(NOW * 1000) + 30_000), 30), ("0", 0)],
        ids=["seconds", "unix-time", "unix-milliseconds", "now"],
    )
    def test_x_ratelimit_reset_is_a_unix_time_when_that_large(
        self, reset: str, seconds: float
    ) -> None:
        """X-RateLimit-Reset of 10^9 or more is a Unix time (10^12 or more, in milliseconds);
        anything smaller is already seconds to wait."""
        hint = read_rate_limit(
            {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset},
            NOW,
        )
        assert hint is not None
        assert hint.reset_s == pytest.approx(seconds)
        assert reset_seconds(NOW - 5, NOW) == 0  # a reset moment already past: no wait

    def test_ietf_headers_win_and_absent_or_partial_ones_say_nothing(self) -> None:
        """With both sets the IETF one is read; a Remaining without a Reset is no hint."""
        both = {
            "ratelimit-remaining": "5",
            "ratelimit-reset": "2",
            "x-ratelimit-remaining": "50",
            "x-ratelimit-reset": str(int(NOW) + 20),
        }
        hint = read_rate_limit(both, NOW)
        assert hint is not None
        assert (hint.remaining, hint.reset_s) == (5, 2)
        assert read_rate_limit({}, NOW) is None
        assert read_rate_limit({"x-ratelimit-remaining": "3"}, NOW) is None
        assert read_rate_limit({"ratelimit-remaining": "soon", "ratelimit-reset": "1"}, NOW) is None


class TestArithmetic:
    def test_a_429_pauses_halves_the_rate_and_it_climbs_back(self) -> None:
        """At 20/s, a 429 with Retry-After 2 pauses everything 2 s, then allows half the rate it
        was sending at, climbing back in a straight line to 20/s over RECOVERY_S."""
        clock = FakeClock()
        budget = RequestBudget(20, clock=clock)
        sent = _send(budget, clock, 20, 0.051)
        budget.rate_limited(2, ticket=sent)
        drop = clock.now
        assert budget.allowed_rate() == 0
        clock.now = drop + 2
        assert budget.allowed_rate() == pytest.approx(10)
        clock.now = drop + 2 + RECOVERY_S / 2
        assert budget.allowed_rate() == pytest.approx(15)
        clock.now = drop + 2 + RECOVERY_S
        assert budget.allowed_rate() == 20

    def test_the_429s_of_requests_sent_before_a_drop_do_not_halve_it_again(self) -> None:
        """Requests in flight together all meet the limit: their 429s lengthen the pause but
        halve the rate once; a request sent after the drop halves it again."""
        clock = FakeClock()
        budget = RequestBudget(40, clock=clock)
        sent = _send(budget, clock, 40, 0.0251)
        budget.rate_limited(0.5, ticket=sent)
        budget.rate_limited(None, ticket=sent)  # no Retry-After: PAUSE_WITHOUT_RETRY_AFTER_S
        clock.now += PAUSE_WITHOUT_RETRY_AFTER_S - 0.01
        assert budget.allowed_rate() == 0
        clock.now += 0.01
        assert budget.allowed_rate() == pytest.approx(20)
        later = _send(budget, clock, 1, 0)
        clock.now += 0.5
        budget.rate_limited(0, ticket=later)
        assert budget.allowed_rate() == MIN_RATE  # one request in the last second: 0.5, floored

    def test_without_a_budget_a_429_lowers_to_the_rate_sent_then_lifts_the_limit(self) -> None:
        """Unlimited, a 429 allows half the rate sent in the last second (at least
        MIN_RATE_UNLIMITED), back up to that rate over RECOVERY_S, then no limit again."""
        clock = FakeClock()
        budget = RequestBudget(clock=clock)
        sent = _send(budget, clock, 100, 0.0101)
        budget.rate_limited(0, ticket=sent)
        assert budget.allowed_rate() == pytest.approx(50, rel=1e-3)
        clock.now += RECOVERY_S / 2
        assert budget.allowed_rate() == pytest.approx(75, rel=1e-3)
        clock.now += RECOVERY_S / 2
        assert budget.allowed_rate() == math.inf
        few = _send(budget, clock, 3, 0.3)
        budget.rate_limited(0, ticket=few)
        assert budget.allowed_rate() == MIN_RATE_UNLIMITED

    def test_quota_headers_spread_what_is_left_and_wait_when_it_is_gone(self) -> None:
        """Above half the quota nothing changes; at or below it, what is left (less the
        requests let through after the one answered) is spread over the time to the reset;
        with nothing left, every request waits for the reset."""
        clock = FakeClock()
        budget = RequestBudget(clock=clock, wall_clock=lambda: NOW)
        answered = _send(budget, clock, 5, 0)
        quota = {"ratelimit-limit": "20", "ratelimit-reset": "2"}
        budget.observe({**quota, "ratelimit-remaining": "11"}, ticket=answered)
        assert budget.allowed_rate() == math.inf
        budget.observe({**quota, "ratelimit-remaining": "8"}, ticket=answered)
        assert budget.allowed_rate() == 4
        clock.now += 2
        assert budget.allowed_rate() == math.inf  # spread over the 2 s: the quota is whole
        with budget.turn() as older, budget.turn() as newer:
            budget.observe({**quota, "ratelimit-remaining": "8"}, ticket=newer)
            assert budget.allowed_rate() == 3.5  # one sent before it is still in flight
            budget.observe({**quota, "ratelimit-remaining": "8"}, ticket=older)
            assert budget.allowed_rate() == 3.5  # one was sent after it
        budget.observe(
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 3)},
            ticket=newer,
        )
        assert budget.allowed_rate() == 0
        clock.now += 3
        assert budget.allowed_rate() == math.inf  # the quota is whole again
        budget.observe({"x-ratelimit-remaining": "30", "x-ratelimit-reset": "10"}, ticket=newer)
        assert budget.allowed_rate() == 3  # no limit sent: what is left is always spread

    def test_a_turn_past_the_retry_budget_fails_at_once(self) -> None:
        """A request whose turn would come after its retry budget ends fails at once (exit 5)
        instead of waiting for nothing; it takes no turn from the others."""
        clock = FakeClock()
        budget = RequestBudget(10, clock=clock)
        sent = _send(budget, clock, 1, 0)
        budget.rate_limited(30, ticket=sent)
        late = budget.turn(give_up_at=clock.now + 10)
        with pytest.raises(UpstreamUnavailable, match=r"retry\.max_elapsed_s") as caught, late:
            pass
        assert caught.value.exit_code == 5
        clock.now += 30
        with budget.turn(give_up_at=clock.now + 10) as ticket:
            assert ticket == 2
        assert budget.requests == 2

    def test_an_abandoned_wait_ends_at_once_and_gives_its_turn_back(self) -> None:
        """A request nobody waits for any more stops waiting, and the next one takes its turn."""
        budget = RequestBudget(0.1)
        with budget.turn():
            pass
        abandoned = threading.Event()
        threading.Timer(0.1, abandoned.set).start()
        with pytest.raises(RequestAbandoned), budget.turn(abandoned=abandoned):
            pass
        assert budget.requests == 1
        soon = budget.turn(give_up_at=time.monotonic() + 1)
        with pytest.raises(UpstreamUnavailable, match=r"\b10 s more"), soon:  # not 20 s
            pass


@contextmanager
def _engines(
    server: SandboxServer, tmp_path: Path, companies: list[str], budget: RequestBudget
) -> Iterator[list[tuple[str, Settings, SyncEngine]]]:
    """One engine per company, each on its own SQLite file, all sharing one budget."""
    with ExitStack() as stack:
        engines = []
        for company in companies:
            url = f"sqlite:///{tmp_path / f'mirror-{company}.db'}"
            settings = make_settings(
                server,
                url,
                api={"companies": [company], "concurrency": 4},
                retry={"max_attempts": 6, "max_elapsed_s": 30},
            )
            store = MirrorStore.open(url)
            stack.callback(store.close)
            engine = SyncEngine.from_settings(settings, store, budget=budget)
            stack.callback(engine.close)
            engines.append((company, settings, engine))
        yield engines


def _in_threads(jobs: list[Callable[[], object]]) -> list[object]:
    """Run the jobs at once, each on its own thread; what each returned or raised."""
    results: list[object] = [None] * len(jobs)

    def run(index: int) -> None:
        try:
            results[index] = jobs[index]()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


class TestAgainstTheSandbox:
    def test_no_second_upstream_sees_more_than_the_rate_plus_the_burst(
        self, tmp_path: Path
    ) -> None:
        """Three companies at once, four requests in flight each, some retried: every attempt
        waits its turn, so no second at upstream sees more than 25 + 3 requests."""
        companies = ["1", "2", "3"]
        data = SandboxData.generate(companies, 1000, seed=21)
        budget = RequestBudget(25, burst=3)
        with SandboxServer(data) as server:
            server.faults.add("500", times=2)
            with _engines(server, tmp_path, companies, budget) as engines:
                results = _in_threads([partial(e.sync_company, c) for c, _, e in engines])
            seen = server.requests()
            busiest = server.api.log.busiest_window(1.0)
            for company, settings, _ in engines:
                assert mirror_rows(settings.database.url, company) == upstream_rows(server, company)
        assert all(isinstance(result, PassReport) for result in results)
        assert sum(r.status == 500 for r in seen) == 2
        assert budget.requests == len(seen) > 25 + 3
        assert 20 <= busiest <= 25 + 3  # and the budget is used, not starved

    def test_a_429_for_one_company_pauses_another_running_at_the_same_time(
        self, tmp_path: Path
    ) -> None:
        """Company 2 is paging when company 1's first request gets a 429 with Retry-After 1:
        company 2 sends nothing more until that second is over, then goes on, slower."""
        data = SandboxData.generate(("1", "2"), 1000, seed=22)
        budget = RequestBudget(40)
        with SandboxServer(data) as server:
            with _engines(server, tmp_path, ["1", "2"], budget) as engines:
                (one, _, first), (two, settings, second) = engines
                server.faults.add("429", company="1", retry_after=1)
                paging = threading.Thread(target=second.sync_company, args=(two,))
                paging.start()
                wait_until(lambda: len(server.requests("2")) >= 3, 10, "company 2 paging")
                first.sync_company(one)
                paging.join(timeout=30)
            (limited,) = [r for r in server.requests("1") if r.status == 429]
            others = [r.at - limited.at for r in server.requests("2")]
            assert mirror_rows(settings.database.url, "2") == upstream_rows(server, "2")
        # Requests let through just before the 429 came back may arrive just after it.
        assert not [gap for gap in others if 0.1 < gap < 0.95]
        assert [gap for gap in others if gap >= 1]
        assert budget.allowed_rate() < 40

    @pytest.mark.parametrize("headers", ["ietf", "x"])
    def test_quota_headers_slow_the_process_before_any_429(
        self, tmp_path: Path, headers: str
    ) -> None:
        """A server allowing 20 requests a second and saying so in its headers (RateLimit-*,
        or X-RateLimit-* with a Unix-time reset) never has to answer 429 to two companies
        syncing at once with no budget configured."""
        config = SandboxConfig(rate_limit=20, rate_headers=headers)  # type: ignore[arg-type]
        data = SandboxData.generate(("1", "2"), 1000, seed=23)
        budget = RequestBudget()
        with SandboxServer(data, config) as server:
            with _engines(server, tmp_path, ["1", "2"], budget) as engines:
                results = _in_threads([partial(e.sync_company, c) for c, _, e in engines])
            seen = server.requests()
        assert all(isinstance(result, PassReport) for result in results)
        assert len(seen) > 20
        assert [r.status for r in seen if r.status != 200] == []

    def test_a_stop_during_a_wait_for_budget_returns_promptly(self, tmp_path: Path) -> None:
        """A pass whose next request waits 20 s for its turn is interrupted as soon as the stop
        is set, without sending it."""
        data = SandboxData.generate(("1",), 500, seed=24)
        stop = threading.Event()
        with SandboxServer(data) as server:
            settings = make_settings(
                server,
                f"sqlite:///{tmp_path / 'mirror.db'}",
                api={"max_requests_per_s": 0.05},
                retry={"max_elapsed_s": 60},
            )
            store = MirrorStore.open(settings.database.url)
            budget = RequestBudget.from_settings(settings.api)
            engine = SyncEngine.from_settings(settings, store, stop=stop, budget=budget)
            try:
                outcome = _in_threads_after(
                    lambda: engine.sync_company("1"),
                    lambda: wait_until(lambda: budget.waiting == 1, 10, "a wait for budget"),
                    stop.set,
                )
            finally:
                engine.close()
                store.close()
            assert len(server.requests()) == 1
        assert isinstance(outcome, PassInterrupted)

    def test_a_wait_for_budget_is_not_part_of_the_request_timeout(self, tmp_path: Path) -> None:
        """At 3 requests a second each page waits a third of a second for its turn, longer
        than api.timeout_s (0.2 s): no request times out."""
        data = SandboxData.generate(("1",), 250, seed=26)
        with SandboxServer(data) as server:
            settings = make_settings(
                server,
                f"sqlite:///{tmp_path / 'mirror.db'}",
                api={"max_requests_per_s": 3, "timeout_s": 0.2},
            )
            report = run_pass(settings)
            seen = server.requests()
        assert len(seen) == report.requests >= 3
        # Spaced by the budget; arrival times at the server carry a few ms of loopback jitter.
        assert seen[-1].at - seen[0].at >= (len(seen) - 1) / 3 - 0.05
        assert report.retries == {}
        assert mirror_rows(settings.database.url) == upstream_rows(server)


def _in_threads_after(
    job: Callable[[], object], ready: Callable[[], None], then: Callable[[], None]
) -> object:
    """Start `job` on a thread, wait for `ready`, call `then`; what the job returned or raised
    (it must end within 5 s of `then`)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(job())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    ready()
    then()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the job did not end within 5 s of the stop"
    return result[0]


class TestSandboxRateLimit:
    def test_past_its_budget_the_sandbox_answers_429_with_retry_after(self) -> None:
        """Three requests a window: each answer counts down the quota in both header sets; the
        fourth is a 429 with Retry-After, logged as `rate_limit`; a new window serves again."""
        config = SandboxConfig(rate_limit=3)
        with (
            SandboxServer(SandboxData.generate(("1",), 10), config) as server,
            httpx.Client(base_url=server.base_url, headers=server.headers()) as http,
        ):
            asked_at = time.time()
            answers = [http.get("/api/contacts") for _ in range(4)]
            wait_until(lambda: http.get("/api/contacts").status_code == 200, 5, "a new window")
            log = server.requests()
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert {a.headers["ratelimit-limit"] for a in answers} == {"3"}
        assert answers[3].headers["retry-after"] == "1"
        assert 0 < int(answers[3].headers["x-ratelimit-reset"]) - asked_at <= 3  # a Unix time
        assert "retry-after" not in answers[0].headers
        assert [entry.fault for entry in log[:4]] == [None, None, None, "rate_limit"]
        assert log[-1].status == 200

    def test_windows_and_headers_as_configured(self) -> None:
        """A window admits `limit` requests; `rate_headers` picks which header set is sent."""
        clock = FakeClock()
        limit = WindowLimit(2, 1.0, "ietf", clock=clock, wall_clock=lambda: NOW)
        assert [limit.admit()[0] for _ in range(3)] == [True, True, False]
        clock.now += 1
        admitted, headers = limit.admit()
        assert admitted
        assert {name for name, _ in headers} == {
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-reset",
        }
        assert WindowLimit(2, 1.0, "none").admit() == (True, ())
        with pytest.raises(ValueError, match="rate_headers"):
            SandboxConfig(rate_limit=2, rate_headers="some")  # type: ignore[arg-type]

    @pytest.mark.slow
    def test_the_command_takes_the_rate_limit_flags(self) -> None:
        """`sandbox --rate-limit 2 --rate-headers x`: the third request of a second is a 429,
        and the answers carry X-RateLimit-* only."""
        with _sandbox_command(
            "--contacts", "10", "--rate-limit", "2", "--rate-headers", "x"
        ) as http:
            answers = [http.get("/api/contacts") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["1", "0", "0"]
        assert "ratelimit-remaining" not in answers[0].headers

    def test_the_request_log_counts_the_busiest_second(self) -> None:
        """busiest_window slides over arrival times: the most requests within any second."""
        with (
            SandboxServer(SandboxData.generate(("1",), 10)) as server,
            httpx.Client(base_url=server.base_url, headers=server.headers()) as http,
        ):
            for _ in range(5):
                http.get("/api/contacts")
            assert server.api.log.busiest_window(1.0) == 5
            assert server.api.log.busiest_window(1e-9) == 1
