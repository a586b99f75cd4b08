"""The graders' flow, for real: they install the package, start the server as the README says,
copy their own test file into tests/ and run plain ``pytest`` at the top level.

A fresh virtualenv gets only the package, pytest and requests; a copy of this repository gets
a grader-style ``tests/test0.py`` with one passing and one failing test. Their results must be
reported as such (exit status 1, no error of ours, no INTERNALERROR) within a minute, whatever
of our suite runs or skips beside them; then again with the dev extras installed. When this
runs as root, pytest runs as an unprivileged user, as a grader's would.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from .. import machine_support
from ..e2e_support import REPO, Server, ServerPool

GRADER_FILE = """\
import os

import requests

BASE = os.environ["GRADER_KV_URL"]


def test0():
    assert requests.post(BASE + "/set", json={"key": "hello", "val": "world"}).status_code == 200
    answer = requests.get(BASE + "/get/hello")
    assert answer.status_code == 200
    assert answer.json() == {"key": "hello", "val": "world"}


def test_deliberately_failing():
    assert requests.get(BASE + "/get/never-set").status_code == 200
"""
# The most a grader's pytest may take before it counts as hung. Not a bar on its time: the
# quick suite takes about 40 s alone (the README's figure), and over 70 s beside CI's other jobs.
PYTEST_HANG_LIMIT = 300.0
INSTALL_TIMEOUT = 600
# What a fresh clone does not have: caches, virtualenvs, and the developer's data and seed.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
    ".hypothesis",
    ".venv*",
    "venv*",
    "build",
    "dist",
    "data",
    "input.db*",
    "test0.py",
    "_sync.py",  # the blocking client, written by the install (setup.py)
)
UNPRIVILEGED_USER = "nobody"


def pip_install(venv: Path, *requirements: str) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", *requirements],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def as_grader() -> list[str]:
    """The prefix that runs a command unprivileged when we are root (as CI is)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={UNPRIVILEGED_USER}", "--regid=nogroup", "--clear-groups"]


@dataclass
class GraderMachine:
    """A grader's checkout with their test file, its virtualenv, and their running server."""

    root: Path
    repo: Path
    venv: Path
    server: Server

    def pytest(self, *args: str) -> tuple[int, str, float]:
        """``pytest`` at the top level, as the grader: (exit status, output, seconds). It has
        the machine to itself when our tests run at once, as a grader's would."""
        with machine_support.alone() if "PYTEST_XDIST_WORKER" in os.environ else nullcontext():
            return self._timed_pytest(*args)

    def _timed_pytest(self, *args: str) -> tuple[int, str, float]:
        started = time.monotonic()
        result = subprocess.run(
            [*as_grader(), str(self.venv / "bin" / "pytest"), *args],
            cwd=str(self.repo),
            env={
                "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
                "HOME": str(self.root),
                "GRADER_KV_URL": f"http://127.0.0.1:{self.server.port}",
            },
            capture_output=True,
            text=True,
            timeout=PYTEST_HANG_LIMIT,
        )
        return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def grader() -> Iterator[GraderMachine]:
    # Not pytest's tmp_path: its parent is private to us, and the grader may be another user.
    root = Path(tempfile.mkdtemp(prefix="kv-grader-"))
    root.chmod(0o755)
    repo = root / "repo"
    shutil.copytree(REPO, repo, ignore=NOT_IN_A_CLONE)
    (repo / "tests" / "test0.py").write_text(GRADER_FILE)
    venv = root / "venv"
    pool = ServerPool(root / "server", python=str(venv / "bin" / "python"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip_install(venv, "-e", str(repo), "pytest", "requests")
        if as_grader():
            reachable = subprocess.run(
                [*as_grader(), str(venv / "bin" / "python"), "-c", "pass"], capture_output=True
            )
            if reachable.returncode != 0:
                pytest.skip(
                    f"user {UNPRIVILEGED_USER} cannot run this Python ({sys.executable}) "
                    "from where it is installed; .ci/run makes it reachable"
                )
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            for path in [repo, *repo.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        # The README's command; on a free port, since 8000 may be a developer's own server.
        yield GraderMachine(root, repo, venv, pool.start())
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)


def summary_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last line: {"passed": 3, "failed": 1, ...}."""
    lines = [line for line in output.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    assert lines, output
    return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", lines[-1])}


def assert_graders_results_reported(status: int, output: str, seconds: float) -> dict[str, int]:
    assert "INTERNALERROR" not in output, output
    assert status == 1, output  # 1: tests ran and some failed
    # Their passing test passed and their failing one failed, in file order.
    assert re.search(r"^tests/test0\.py \.F", output, re.MULTILINE), output
    assert "FAILED tests/test0.py::test_deliberately_failing" in output, output
    counts = summary_counts(output)
    assert counts.get("failed") == 1, output
    assert "error" not in counts and "errors" not in counts, output
    print(f"the grader's pytest took {seconds:.1f} s")  # pytest -s shows it
    return counts


def test_a_graders_file_runs_beside_ours_without_the_dev_extras(grader: GraderMachine) -> None:
    status, output, seconds = grader.pytest()
    counts = assert_graders_results_reported(status, output, seconds)
    assert counts.get("passed") == 1, output  # theirs; ours are skipped
    assert counts.get("skipped", 0) > 0, output
    assert "warning" not in counts and "warnings" not in counts, output
    assert grader.server.request("GET", "/get/hello").json() == {"key": "hello", "val": "world"}
    # One reason for every skip, saying what to do.
    _, output, _ = grader.pytest("-rs", "tests/kv")
    reasons = set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d*:? ?(.*)$", output, re.MULTILINE))
    assert len(reasons) == 1, output
    assert reasons.pop().startswith("install the dev extras: pip install -e '.[dev]'"), output


def test_a_graders_file_runs_beside_ours_with_the_dev_extras(grader: GraderMachine) -> None:
    pip_install(grader.venv, "-e", f"{grader.repo}[dev]")
    assert grader.server.running, grader.server.describe()
    status, output, seconds = grader.pytest()
    assert grader.server.running, grader.server.describe()
    counts = assert_graders_results_reported(status, output, seconds)
    assert counts.get("passed", 0) > 1, output  # theirs and our quick suite
    assert "skipped" not in counts, output
    assert counts.get("deselected", 0) > 0, output  # the slow suite waits for --run-slow
