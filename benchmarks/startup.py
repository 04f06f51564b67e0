"""Start-up time of the commands people and cron jobs start most, process start to exit.

    python benchmarks/startup.py                      # 10 runs of each command
    python benchmarks/startup.py --runs 20 --before /tmp/old
        # also an older version's code (a checkout's directory, e.g. from `git worktree add`),
        # in the same rounds, so that both meet the same machine

`--help`; `status` on a one-company SQLite mirror; `once` on the same mirror with the sandbox
running and nothing changed upstream (the first run fills the mirror and is not counted);
`sandbox` until it announces its URL. Each runs as the console script beside this Python, in a
fresh process, one of each command per round, so that the machine's drift spreads over all.
The README records the figures from before the commands imported only what they use. cpu is
user + sys, steadier than wall time on a shared
machine (the sandbox's includes its shutdown).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCRIPT = str(Path(sys.executable).with_name("contacts-sync"))
TOKEN = "sandbox-token"  # noqa: S105 - the sandbox's published token
COMMANDS = ("--help", "status", "once", "sandbox")
TARGET_S = {"--help": 0.3, "status": 0.3, "once": 0.5, "sandbox": 0.3}


def _env(code: Path | None) -> dict[str, str]:
    """The environment that runs `code` (a directory holding a `sync` package) if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTACTS_SYNC_")}
    return env if code is None else {**env, "PYTHONPATH": str(code)}


def _sandbox_ready_s(env: dict[str, str], *extra: str) -> tuple[float, subprocess.Popen[str], str]:
    """Start `contacts-sync sandbox --port 0`; seconds until it announced its URL, the process
    (still serving) and the URL."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [SCRIPT, "sandbox", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "500"},  # one line, never wrapped
    )
    assert process.stdout is not None
    while True:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        if not line:
            process.kill()
            raise SystemExit("the sandbox command did not announce its URL")
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found:
            return time.perf_counter() - started, process, found.group()


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _quiet_mirror() -> Iterator[Path]:
    """A running sandbox and a config whose SQLite mirror already holds all of it."""
    _, sandbox, url = _sandbox_ready_s(_env(None), "--contacts", "200")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            config = Path(scratch, "sync.toml")
            config.write_text(
                f'[api]\nbase_url = "{url}"\ntoken = "{TOKEN}"\ncompanies = ["1"]\n'
                f'[database]\nurl = "sqlite:///{scratch}/mirror.db"\n'
                '[log]\nlevel = "warning"\n'
            )
            _run(_env(None), config, "once")
            yield config
    finally:
        _stop(sandbox)


def _run(env: dict[str, str], config: Path, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [SCRIPT, "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"contacts-sync {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return took


def _measure(env: dict[str, str], config: Path, command: str) -> float:
    if command == "sandbox":
        took, process, _ = _sandbox_ready_s(env)
        _stop(process)
        return took
    return _run(env, config, command)


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command")
    parser.add_argument("--before", type=Path, help="an older version's code, measured too")
    given = parser.parse_args()
    versions = {"now": _env(None)}
    if given.before is not None:
        versions["before"] = _env(given.before)
    walls = {(v, c): list[float]() for v in versions for c in COMMANDS}
    cpus = {(v, c): list[float]() for v in versions for c in COMMANDS}
    with _quiet_mirror() as config:
        for _ in range(given.runs):
            for (version, command), taken in walls.items():
                used = _children_cpu_s()
                taken.append(_measure(versions[version], config, command))
                cpus[version, command].append(_children_cpu_s() - used)
    median: Callable[[list[float]], float] = statistics.median
    print(f"contacts-sync start-up, wall seconds, median of {given.runs} runs\n")
    print("| command  | before | target |  now   | now min | cpu before | cpu now |")
    print("|----------|--------|--------|--------|---------|------------|---------|")
    for command in COMMANDS:
        now = walls["now", command]
        if given.before is None:
            before, cpu_before = "     -", "         -"
        else:
            before = f"{median(walls['before', command]):6.3f}"
            cpu_before = f"{median(cpus['before', command]):10.3f}"
        print(
            f"| {command:<8} | {before} | {TARGET_S[command]:6.2f} | {median(now):6.3f} "
            f"| {min(now):7.3f} | {cpu_before} | {median(cpus['now', command]):7.3f} |"
        )


if __name__ == "__main__":
    main()
