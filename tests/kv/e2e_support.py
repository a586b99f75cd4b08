"""Run the real server as a subprocess and talk to it over HTTP: standard library only.

``ServerPool`` starts ``python -m mapmg_data_engineer_takehome`` with a hermetic environment
(no inherited ``KV_*`` or ``PORT``; JSON logs; data file, port and input.db given explicitly)
and kills whatever is still running when it is closed, so a failing assertion never leaves a
server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from . import machine_support

MODULE = "mapmg_data_engineer_takehome"
# The top level of this repository (tests/kv/ is two levels down).
REPO = Path(__file__).resolve().parents[2]
# Generous: CI runs a Docker build beside these tests, and two spawned workers each import
# the whole stack. A server that never comes up still fails, only later.
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 15.0
LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"
Result = TypeVar("Result")


# Turns of a loop that the finalizer's closes of dropped async generators may take: one
# generator's close drops the one it was reading, whose close is then scheduled in its turn
# (httpx's half dozen under httpx-sse's). Turns, not a time, which a loaded machine may spend
# before the last layer is closed.
FINALIZER_TURNS = 100


def run_in_own_loop(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """Run ``coroutine`` on a loop of its own, closed after (close_loop). Not asyncio.run():
    that replaces, and so drops unclosed, the loop pytest-asyncio keeps as this thread's
    current one, whose sockets then surface as ResourceWarnings in whichever later test the
    collector runs in (Python 3.9)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        close_loop(loop)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` once the async generators it ran are closed: those still alive, as
    asyncio.run does, and those already dropped, whose closes the loop's finalizer hook has
    scheduled on it. A close left pending is a 'never awaited' warning, which fails the test
    that happens to be running when it surfaces."""

    async def turns() -> None:
        for _ in range(FINALIZER_TURNS):
            await asyncio.sleep(0)

    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(turns())
    finally:
        loop.close()


def can_bind_ipv6_loopback() -> bool:
    """True when this machine can listen on ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK_V6, 0))
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port of this test's own, free on 127.0.0.1 (and on ::1 where it exists, since
    'localhost' binds both): see machine_support.claim_port."""
    with_v6 = can_bind_ipv6_loopback()

    def bindable(port: int) -> bool:
        families = [(socket.AF_INET, LOOPBACK_V4)] + (
            [(socket.AF_INET6, LOOPBACK_V6)] if with_v6 else []
        )
        for family, address in families:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((address, port))
                except OSError:
                    return False
        return True

    return machine_support.claim_port(bindable)


def accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something listens on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_input_db(path: Path, rows: Iterable[Sequence[Any]], wal: bool = False) -> Path:
    """An input.db with the brief's ``keys`` table holding ``rows`` in order."""
    conn = sqlite3.connect(str(path))
    try:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("create table keys(key text, val text)")
        conn.executemany("insert into keys(key, val) values (?, ?)", rows)
        conn.commit()
    finally:
        conn.close()
    return path


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[Mapping[str, str]] = None,
    host: str = LOOPBACK_V4,
    timeout: float = 5.0,
) -> Response:
    """One request on a fresh connection; http.client adds no Content-Type of its own."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        answer = conn.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        conn.close()


class Server:
    """One server subprocess; its stdout and stderr go to files in the pool's directory."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        stdout_path: Path,
        stderr_path: Path,
    ) -> None:
        self.process = process
        self.port = port
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def log_events(self) -> list[dict[str, Any]]:
        """Every stdout line parsed as JSON; a line that is not a JSON object fails."""
        events = []
        for line in self.stdout().splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                raise AssertionError(f"log line is not JSON: {line!r}") from None
            assert isinstance(event, dict), f"log line is not a JSON object: {line!r}"
            events.append(event)
        return events

    def listening_addresses(self) -> Optional[list[str]]:
        """The addresses of the "listening" log event, once it has been written."""
        for line in self.stdout().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if isinstance(event, dict) and event.get("event") == "listening":
                return [str(address) for address in event.get("addresses", [])]
        return None

    def describe(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"

    def wait_ready(self, timeout: float = READY_TIMEOUT, host: str = LOOPBACK_V4) -> None:
        """Return once GET /health answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise AssertionError(
                    f"server exited with {self.process.returncode} before it was ready\n"
                    + self.describe()
                )
            addresses = self.listening_addresses()
            if addresses is not None and not any(
                address.endswith(f":{self.port}") for address in addresses
            ):
                raise AssertionError(
                    f"server listens on {addresses}, not on port {self.port}\n" + self.describe()
                )
            try:
                if http_request(self.port, "GET", "/health", host=host, timeout=1.0).status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not ready on port {self.port} after {timeout} s\n" + self.describe()
                )
            time.sleep(0.05)

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        host: str = LOOPBACK_V4,
    ) -> Response:
        return http_request(self.port, method, path, body, headers, host)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status; fails (after killing it) if the process outlives ``timeout``."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"server still running {timeout} s later; killed\n" + self.describe()
            ) from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Send ``signum`` and return the exit status."""
        self.process.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the server and any workers (a crash of the whole service), and reap.

        Only while it has not been reaped: once it has, its pid, which names its process
        group, may already belong to another test's server (pids wrap at 32768 here).
        """
        if self.process.poll() is None:  # not reaped, so the pid is still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=EXIT_TIMEOUT)


class ServerPool:
    """Starts servers with cwd ``root`` and the data file ``root/data/kv.sqlite3``; kills all
    of them on ``close`` (call it from fixture teardown)."""

    def __init__(
        self, root: Path, python: str = sys.executable, launcher: Sequence[str] = ()
    ) -> None:
        self.root = root
        self.python = python  # the interpreter, so its environment, that runs the servers
        self.launcher = list(launcher)  # what runs it, such as ["ip", "netns", "exec", "ns"]
        self.data_path = root / "data" / "kv.sqlite3"
        self.servers: list[Server] = []
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def environment(
        self,
        port: Optional[int],
        input_db: Optional[Path],
        overrides: Optional[Mapping[str, Optional[str]]],
    ) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.upper().startswith("KV_") and name.upper() != "PORT"
        }
        env["KV_DATA_PATH"] = str(self.data_path)
        env["KV_LOG_FORMAT"] = "json"
        if port is not None:
            env["KV_PORT"] = str(port)
        if input_db is not None:
            env["KV_INPUT_DB"] = str(input_db)
        for name, value in (overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def spawn(
        self,
        *args: str,
        port: Optional[int] = None,
        input_db: Optional[Path] = None,
        env: Optional[Mapping[str, Optional[str]]] = None,
        module: str = MODULE,
    ) -> Server:
        """Start ``python -m module`` without waiting for it; ``env`` overrides (None removes
        a name)."""
        number = len(self.servers)
        stdout_path = self.root / "logs" / f"server-{number}.stdout"
        stderr_path = self.root / "logs" / f"server-{number}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [*self.launcher, self.python, "-m", module, *args],
                cwd=str(self.root),
                env=self.environment(port, input_db, env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # Its own process group, so that kill() takes its workers down with it.
                start_new_session=True,
            )
        server = Server(process, port or 0, stdout_path, stderr_path)
        self.servers.append(server)
        return server

    def start(
        self,
        *args: str,
        port: Optional[int] = None,
        input_db: Optional[Path] = None,
        env: Optional[Mapping[str, Optional[str]]] = None,
        module: str = MODULE,
        host: str = LOOPBACK_V4,
    ) -> Server:
        """Start a server on ``port`` (a free one by default) and wait until it answers on
        ``host``."""
        server = self.spawn(
            *args, port=port or free_port(), input_db=input_db, env=env, module=module
        )
        server.wait_ready(host=host)
        return server

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):  # keep killing the others
                server.kill()
