"""A full disk or a read-only data directory: writes get 503, reads and /health go on, nothing
is corrupted, and writes succeed again once the disk is back.

Needs root to mount a small tmpfs; skips elsewhere (CI runs as root and fails on skips).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e_support import MODULE, Response, Server, ServerPool, free_port, write_input_db


def _mount(directory: Path, *options: str) -> bool:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(directory)],
        capture_output=True,
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards."""
    directory = tmp_path / "disk"
    directory.mkdir()
    if os.geteuid() != 0 or not _mount(directory, "size=4m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill the disk with a file until only about ``leave_bytes`` are free."""
    filler = directory / "filler"
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave_bytes))
    return filler


def post(server: Server, key: str, val: str) -> Response:
    return server.request("POST", "/set", json.dumps({"key": key, "val": val}).encode())


def write_until_refused(server: Server) -> int:
    """POST ever more values until the store refuses one; how many were acknowledged."""
    for number in range(10_000):
        answer = post(server, f"fill-{number}", "x" * 4000)
        if answer.status != 200:
            assert answer.status == 503, answer.body
            assert answer.json()["error"] == "store_unavailable"
            return number
    raise AssertionError("the disk never filled up")


def test_a_full_disk_refuses_writes_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    data_path = small_disk / "kv.sqlite3"
    pool = ServerPool(tmp_path / "e2e")
    try:
        server = pool.start(env={"KV_DATA_PATH": str(data_path)})
        assert post(server, "before", "kept").status == 200
        filler = fill(small_disk, leave_bytes=256 * 1024)

        acknowledged = write_until_refused(server)
        assert server.request("GET", "/get/before").status == 200
        assert server.request("GET", "/health").status == 200
        if acknowledged:
            assert server.request("GET", f"/get/fill-{acknowledged - 1}").status == 200

        filler.unlink()
        assert post(server, "after", "written once space was back").status == 200
        for number in range(acknowledged):
            assert server.request("GET", f"/get/fill-{number}").status == 200
        assert server.stop() == 0
    finally:
        pool.close()
    check = sqlite3.connect(str(data_path))
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("SELECT val FROM kv WHERE key = 'after'").fetchone() is not None
    check.close()


def test_a_read_only_data_directory_stops_the_server_with_a_clear_message(
    small_disk: Path, tmp_path: Path
) -> None:
    """Remounting read-only under a running server is refused while its files are open,
    so this covers the start: a directory that is read-only then is named, not ignored."""
    data_path = small_disk / "kv.sqlite3"
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("KV_")},
        "KV_DATA_PATH": str(data_path),
        "KV_PORT": str(free_port()),
        "KV_INPUT_DB": str(write_input_db(tmp_path / "input.db", [("a", "1")])),
    }
    first = subprocess.Popen([sys.executable, "-m", MODULE], env=environment, cwd=tmp_path)
    created = _wait_for_file(data_path)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0 and created
    before = data_path.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        second = subprocess.run(
            [sys.executable, "-m", MODULE],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert second.returncode == 1
    assert str(data_path) in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert data_path.read_bytes() == before


def _wait_for_file(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            time.sleep(0.5)  # let it finish seeding and open the port
            return True
        time.sleep(0.05)
    return False


def test_a_seed_larger_than_the_disk_stops_the_server_with_one_line(
    small_disk: Path, tmp_path: Path
) -> None:
    """input.db holds more than the 4 MiB disk: one line naming the data file and the problem,
    exit status 1, no traceback."""
    data_path = small_disk / "kv.sqlite3"
    rows = ((f"key-{number}", "v" * 1000) for number in range(8000))  # about 8 MB
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("KV_")},
        "KV_DATA_PATH": str(data_path),
        "KV_PORT": str(free_port()),
        "KV_INPUT_DB": str(write_input_db(tmp_path / "input.db", rows)),
        "KV_LOG_FORMAT": "json",
    }
    result = subprocess.run(
        [sys.executable, "-m", MODULE],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and str(data_path) in result.stderr
    assert "full" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
