"""The alert rules and the Grafana dashboard in deploy/, judged by Prometheus's own tools.

promtool and prometheus come from Debian's `prometheus` package (`make unit` and `.ci/run`
install it): in CI these tests fail without it, elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_cli import SECRET, write_config
from test_daemon import DaemonProcess, free_port, scrape

from sync.sandbox import SandboxConfig, SandboxData, SandboxServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "contacts-sync.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PANEL_METRICS = {
    "Freshness": "contacts_sync_freshness_seconds",
    "Failed passes in a row": "contacts_sync_failures_in_row",
    "Passes by outcome": "contacts_sync_passes_total",
    "Rows": "contacts_sync_rows_fetched_total",
    "Pages": "contacts_sync_pages_fetched_total",
    "Pass duration": "contacts_sync_pass_duration_seconds_bucket",
    "Retries by reason": "contacts_sync_retries_total",
    "Request budget": "contacts_sync_request_budget_per_second",
    "Workers busy": "contacts_sync_workers_busy",
}
"""Panels the dashboard must have, each with a metric its queries must use; a new panel is a
new line here, and the tests below check its queries like every other's."""

PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself for every target, not served by the daemon."""

_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$company": ".*",
}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if IN_CI:
            pytest.fail(f"{name} must be installed in CI (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="module")
def prometheus() -> str:
    return _tool("prometheus")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's variables given example values."""
    queries = [target["expr"] for panel in _panels() for target in panel["targets"]]
    for query in queries:
        for variable in re.findall(r"\$\w+", query):
            assert variable in _GRAFANA_VARIABLES, f"no example value for {variable}"
    return [_with_examples(query) for query in queries]


def _with_examples(query: str) -> str:
    for variable, example in sorted(_GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        query = query.replace(variable, example)
    return query


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, numbers,
    label matchers, ranges, grouping clauses, function names and keywords are taken out."""
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    query = re.sub(r"\b\d[\w.]*", " ", query)  # numbers and durations (0.95, 1e3, 1h30m)
    query = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", query)
    query = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", query)
    names = set()
    for found in re.finditer(r"[A-Za-z_:][\w:]*", query):
        if query[found.end() :].lstrip().startswith("("):
            continue  # a function
        if found.group() not in _KEYWORDS:
            names.add(found.group())
    return names


def served_names(exposition: str) -> set[str]:
    """The series names a /metrics page serves, counting families that have no sample yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


class TestMetricNames:
    def test_the_name_parser_finds_selectors_only(self) -> None:
        """Functions, grouping labels, matchers, ranges and keywords are not metric names."""
        query = (
            'histogram_quantile(0.95, sum by (company, le) (rate(a_bucket{company=~"x|y"}[5m])))'
            " / on (company) group_left (reason) b > bool 2 * c offset 1h or vector(1)"
        )
        assert metric_names(query) == {"a_bucket", "b", "c"}


class TestAlertRules:
    def test_promtool_unit_tests_pass(self, promtool: str) -> None:
        """alerts_test.yml (every rule firing and not firing) passes `promtool test rules`."""
        done = _run(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_every_rule_is_tested_firing_and_not_firing(self) -> None:
        """Each alert has a case where it fires and one where it does not; each says what to
        do, with a severity."""
        cases = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
        checks = [check for case in cases for check in case["alert_rule_test"]]
        for rule in _rules():
            name = rule["alert"]
            mine = [check["exp_alerts"] for check in checks if check["alertname"] == name]
            assert any(mine), f"{name} is never tested firing"
            assert not all(mine), f"{name} is never tested not firing"
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])

    def test_rules_use_only_what_the_daemon_serves_or_prometheus_makes(
        self, served: set[str]
    ) -> None:
        """Every metric an alert reads is served by `contacts-sync run` (or is `up`)."""
        used = set().union(*(metric_names(rule["expr"]) for rule in _rules()))
        assert used - served - PROMETHEUS_OWN == set()
        assert "contacts_sync_reconcile_refused_total" in used


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names a running daemon serves on /metrics after its first pass."""
    folder = tmp_path_factory.mktemp("served")
    port = free_port()
    data = SandboxData.generate(("1",), 150, seed=3)
    with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as srv:
        config = write_config(
            folder / "sync.toml",
            srv,
            f"sqlite:///{folder / 'mirror.db'}",
            sync={"interval": "1h"},
            metrics={"port": port},
            log={"format": "json"},
        )
        daemon = DaemonProcess(config, folder / "run.log")
        try:
            wait_until(lambda: bool(daemon.events("pass.finished")), 30, "the first pass")
            page = scrape(port)
            code, _ = daemon.stop()
        finally:
            daemon.close()
    assert code == 0
    return served_names(page)


class TestDashboard:
    def test_every_query_is_valid_promql(self, promtool: str, tmp_path: Path) -> None:
        """Every expression of the dashboard passes `promtool check rules` as a recording rule."""
        queries = _dashboard_queries()
        rules = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {"record": f"dashboard:query_{n}", "expr": query}
                        for n, query in enumerate(queries)
                    ],
                }
            ]
        }
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump(rules), encoding="utf-8")
        done = _run(promtool, "check", "rules", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{len(queries)} rules found" in done.stdout

    def test_every_metric_it_shows_is_served(self, served: set[str]) -> None:
        """Every metric a query or the company variable reads is served by the daemon."""
        used = set().union(*map(metric_names, _dashboard_queries()))
        for variable in _dashboard()["templating"]["list"]:
            if variable["type"] == "query":
                used.update(re.findall(r"label_values\((\w+)", variable["definition"]))
        assert used - served - PROMETHEUS_OWN == set()

    def test_the_panels_an_operator_looks_for_are_there(self) -> None:
        """Freshness per company, rows, pages, retries by reason, pass durations, failures;
        panel ids are unique, as Grafana needs."""
        panels = {panel["title"]: panel for panel in _panels()}
        for title, metric in PANEL_METRICS.items():
            assert title in panels, f"no panel {title!r}"
            queries = [_with_examples(target["expr"]) for target in panels[title]["targets"]]
            assert metric in set().union(*map(metric_names, queries)), title
        ids = [panel["id"] for panel in _dashboard()["panels"]]
        assert len(ids) == len(set(ids))


class _Prometheus:
    """A Prometheus server on loopback, scraping one daemon with the deployed rules."""

    def __init__(self, binary: str, folder: Path, target_port: int) -> None:
        rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"  # the deployed rules, without the wait
        (folder / "alerts.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
        every = "500ms"
        config = {
            "global": {
                "scrape_interval": every,
                "scrape_timeout": every,
                "evaluation_interval": every,
            },
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {
                    "job_name": "contacts-sync",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port = free_port()
        self._log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def api(self, path: str, **query: str) -> Any:
        parameters = urllib.parse.urlencode(query)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/api/v1/{path}?{parameters}", timeout=5
        ) as answer:
            return json.loads(answer.read())["data"]

    def firing(self) -> dict[str, list[dict[str, str]]]:
        """The labels of each firing alert, by alert name; nothing while it cannot answer."""
        try:
            alerts = self.api("alerts")["alerts"]
        except OSError:
            return {}
        found: dict[str, list[dict[str, str]]] = {}
        for alert in alerts:
            if alert["state"] == "firing":
                found.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return found

    def has(self, query: str) -> bool:
        try:
            return bool(self.api("query", query=query)["result"])
        except OSError:
            return False

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.mark.slow
class TestPrometheusEndToEnd:
    def test_passes_failing_upstream_fire_the_alert(
        self, prometheus: str, tmp_path: Path, sqlite_url: str
    ) -> None:
        """A real Prometheus with the deployed rules scrapes `contacts-sync run`; upstream
        failing every request fires ContactsSyncPassesFailing for that company."""
        began = time.monotonic()
        port = free_port()
        data = SandboxData.generate(("1",), 150, seed=9)
        with SandboxServer(data, SandboxConfig(tokens=(SECRET,))) as srv:
            config = write_config(
                tmp_path / "sync.toml",
                srv,
                sqlite_url,
                retry={"max_attempts": 1, "max_elapsed_s": 1},
                sync={"interval": "1s"},
                metrics={"port": port},
                log={"format": "json"},
            )
            server = _Prometheus(prometheus, tmp_path, port)
            daemon = DaemonProcess(config, tmp_path / "run.log")
            try:
                wait_until(
                    lambda: server.has('contacts_sync_freshness_seconds{company="1"}'),
                    30,
                    "Prometheus scraping a completed pass",
                )
                # Until the daemon listened, ContactsSyncDaemonDown fired: it clears now.
                wait_until(lambda: server.firing() == {}, 30, "no alert firing")
                srv.faults.fail_company("1", status=503)
                wait_until(lambda: "ContactsSyncPassesFailing" in server.firing(), 30, "the alert")
                fired = server.firing()
            finally:
                daemon.close()
                server.close()
        assert fired.keys() == {"ContactsSyncPassesFailing"}
        assert [labels["company"] for labels in fired["ContactsSyncPassesFailing"]] == ["1"]
        assert daemon.events("pass.failed")
        print(f"end-to-end alerting took {time.monotonic() - began:.1f} s")
