"""Lock safety end to end, with real processes: `kv lock` keeps 8 processes' read, sleep and
write of one file apart; a holder stopped past its lease's TTL loses the lock to another
within the TTL plus 2 s, and its fenced write is then refused; `kv lock` whose lock is lost
stops its command and exits 6; a holder killed with kill -9 frees the lock within the TTL
plus 2 s."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from ..e2e_support import Server, ServerPool

KV = str(Path(sys.executable).with_name("kv"))
TTL = 2
# What a lock may take to pass on once its holder stops renewing: the TTL, then the purge
# that removes the holder's key (KV_PURGE_INTERVAL, 1 s) and the waiter's wake-up.
HANDOVER = TTL + 2

# Reads a number, sleeps, writes it plus one: two of these at once lose an increment. Each
# also logs the number it read, so that the history shows a lost or a repeated one.
INCREMENT = """#!/bin/sh
n=$(cat counter)
echo "$n" >> history
sleep 0.01
echo $((n + 1)) > counter
"""

# A holder in Python: takes the lock, says so, waits for a line on stdin, then tries a write
# fenced by its token and says whether it succeeded and whether it knew the lock was lost.
HOLDER = """
import sys, time
from mapmg_data_engineer_takehome.client import Client

with Client(sys.argv[1]) as kv:
    lock = kv.lock("counter", ttl=float(sys.argv[2]))
    lock.acquire()
    print("held", lock.token, flush=True)
    sys.stdin.readline()
    fenced = kv.txn(
        compare=[lock.fence],
        success=[{"op": "set", "key": "written-by", "val": "the paused holder"}],
    )
    time.sleep(0.2)
    print("fenced", fenced.succeeded, "lost", lock.lost, flush=True)
    lock.release()
"""


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def server(servers: ServerPool) -> Server:
    return servers.start()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, each in a session of its own: killed with their children at
    teardown, whatever the outcome."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def spawn(
    started: list[subprocess.Popen[bytes]],
    server: Server,
    cwd: Path,
    *argv: str,
    stdin: Optional[int] = None,
    stdout: Optional[int] = None,
) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KV_")}
    env["KV_URL"] = url(server)
    process = subprocess.Popen(
        list(argv), cwd=str(cwd), env=env, start_new_session=True, stdin=stdin, stdout=stdout
    )
    started.append(process)
    return process


def kv_lock(
    started: list[subprocess.Popen[bytes]],
    server: Server,
    cwd: Path,
    *command: str,
    stdout: Optional[int] = None,
) -> subprocess.Popen[bytes]:
    """``kv lock counter --ttl TTL -- command``, started."""
    argv = [KV, "lock", "counter", "--ttl", str(TTL), "--", *command]
    return spawn(started, server, cwd, *argv, stdout=stdout)


def owners(server: Server, cwd: Path) -> list[str]:
    listed = subprocess.run(
        [KV, "--url", url(server), "ls", "counter/"], cwd=str(cwd), capture_output=True, check=True
    )
    return listed.stdout.decode().split()


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_eight_processes_increment_a_file_400_times_under_kv_lock(
    server: Server, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    (tmp_path / "increment").write_text(INCREMENT)
    (tmp_path / "increment").chmod(0o755)
    (tmp_path / "counter").write_text("0\n")
    loop = f'for i in $(seq 50); do "{KV}" lock counter -- ./increment || exit $?; done'
    loops = [spawn(started, server, tmp_path, "sh", "-c", loop) for _ in range(8)]
    statuses = [process.wait(timeout=600) for process in loops]
    assert statuses == [0] * 8
    assert (tmp_path / "history").read_text().split() == [str(n) for n in range(400)]
    assert (tmp_path / "counter").read_text().strip() == "400"
    assert owners(server, tmp_path) == [], "a released lock leaves no key"


def test_a_paused_holder_loses_the_lock_and_its_fenced_write_is_refused(
    server: Server, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    holder = spawn(
        started,
        server,
        tmp_path,
        sys.executable,
        "-c",
        HOLDER,
        url(server),
        str(TTL),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    said, token = holder.stdout.readline().split()
    assert said == b"held"

    os.kill(holder.pid, signal.SIGSTOP)
    paused = time.time()
    # The command says when it began, under the lock: the handover is measured to there,
    # not to the exit of the contender's process.
    command = ("sh", "-c", 'echo "$KV_LOCK_TOKEN $(date +%s.%N)"')
    contender = kv_lock(started, server, tmp_path, *command, stdout=subprocess.PIPE)
    out, _ = contender.communicate(timeout=30)
    assert contender.returncode == 0
    new_token, began = out.split()
    took = float(began) - paused
    assert int(new_token) > int(token), "a new owner's fencing token is greater"
    assert took <= HANDOVER, f"the lock passed on {took:.1f} s after its holder stopped"

    os.kill(holder.pid, signal.SIGCONT)
    holder.stdin.write(b"go\n")
    holder.stdin.flush()
    assert holder.stdout.readline().split() == [b"fenced", b"False", b"lost", b"True"]
    assert holder.wait(timeout=10) == 0
    assert (
        subprocess.run(
            [KV, "--url", url(server), "get", "written-by"], capture_output=True
        ).returncode
        == 1
    ), "the fenced write was refused"


def test_kv_lock_stops_its_command_and_exits_6_when_the_lock_is_lost(
    server: Server, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    command = "trap 'echo terminated > signalled; exit 143' TERM; touch held; sleep 60 & wait"
    holder = spawn(
        started,
        server,
        tmp_path,
        KV,
        "lock",
        "counter",
        "--ttl",
        str(TTL),
        "--",
        "sh",
        "-c",
        command,
    )
    wait_for(lambda: (tmp_path / "held").exists())
    os.kill(holder.pid, signal.SIGSTOP)  # kv itself; its command runs on
    taken = subprocess.run(
        [KV, "--url", url(server), "lock", "counter", "--ttl", str(TTL), "--", "true"],
        timeout=30,
    )
    assert taken.returncode == 0
    assert not (tmp_path / "signalled").exists()
    os.kill(holder.pid, signal.SIGCONT)
    continued = time.monotonic()
    assert holder.wait(timeout=10) == 6
    assert time.monotonic() - continued < 2, "the loss was not noticed at once"
    assert (tmp_path / "signalled").read_text().strip() == "terminated"


def test_a_holder_killed_with_kill_9_frees_the_lock_within_the_ttl_and_2_s(
    server: Server, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    holder = kv_lock(started, server, tmp_path, "sh", "-c", "touch held; sleep 60")
    wait_for(lambda: (tmp_path / "held").exists())
    waiter = kv_lock(started, server, tmp_path, "touch", "took")
    wait_for(lambda: len(owners(server, tmp_path)) == 2)
    assert not (tmp_path / "took").exists()
    holder.kill()
    killed = time.time()
    assert waiter.wait(timeout=30) == 0
    took = (tmp_path / "took").stat().st_mtime - killed  # touched under the lock
    assert took <= HANDOVER, f"the lock passed on {took:.1f} s after its holder was killed"
