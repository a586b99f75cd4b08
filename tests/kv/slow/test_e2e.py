"""End-to-end: the real ``python -m mapmg_data_engineer_takehome`` process, a real HTTP client.

Every server runs as a subprocess with a hermetic environment (see ``e2e_support``) and is
killed on teardown whatever the outcome of the test.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from mapmg_data_engineer_takehome.settings import Settings, env_name
from mapmg_data_engineer_takehome.store import SqliteStore

from ..conftest import RowsSeed
from ..e2e_support import (
    LOOPBACK_V4,
    LOOPBACK_V6,
    Server,
    ServerPool,
    accepts_connections,
    can_bind_ipv6_loopback,
    free_port,
    run_in_own_loop,
    sha256_of,
    write_input_db,
)

JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One unseeded server for the tests that only read and write unrelated keys."""
    pool = ServerPool(tmp_path_factory.mktemp("e2e-shared"))
    try:
        yield pool.start()
    finally:
        pool.close()


# --- small clients --------------------------------------------------------------------------


def url(server: Server, path: str, host: str = LOOPBACK_V4) -> str:
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{server.port}{path}"


def urllib_call(
    server: Server, method: str, path: str, body: Optional[bytes] = None, host: str = LOOPBACK_V4
) -> tuple[int, str, bytes]:
    """(status, content type, body) through urllib.request, 4xx/5xx included."""
    request = urllib.request.Request(
        url(server, path, host), data=body, method=method, headers=JSON_HEADERS if body else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers.get("Content-Type", ""), error.read()


def set_value(server: Server, key: str, val: str, host: str = LOOPBACK_V4) -> None:
    body = json.dumps({"key": key, "val": val}).encode()
    answer = server.request("POST", "/set", body, JSON_HEADERS, host=host)
    assert answer.status == 200, answer.body
    assert answer.json() == {"key": key, "val": val}


def get_value(server: Server, key: str, host: str = LOOPBACK_V4) -> Optional[str]:
    """The value served for ``key``; None on 404."""
    answer = server.request("GET", "/get/" + quote(key, safe=""), host=host)
    if answer.status == 404:
        return None
    assert answer.status == 200, answer.body
    document = answer.json()
    assert document == {"key": key, "val": document["val"]}
    assert isinstance(document["val"], str)
    return document["val"]


def delete_value(server: Server, key: str) -> None:
    answer = server.request("DELETE", "/delete/" + quote(key, safe=""))
    assert answer.status == 200, answer.body


def assert_store(server: Server, expected: dict[str, Optional[str]]) -> None:
    """Each key serves its expected value; None means 404."""
    actual = {key: get_value(server, key) for key in expected}
    assert actual == expected


# --- serving --------------------------------------------------------------------------------


def test_serves_set_then_get_and_404_for_a_missing_key(shared_server: Server) -> None:
    key, val = "e2e/serves ключ?#%", 'välue with "quotes" and\nnewline'
    body = json.dumps({"key": key, "val": val}).encode()

    status, content_type, answer = urllib_call(shared_server, "POST", "/set", body)
    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(answer) == {"key": key, "val": val}

    status, content_type, answer = urllib_call(shared_server, "GET", "/get/" + quote(key, safe=""))
    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(answer) == {"key": key, "val": val}

    overwrite = json.dumps({"key": key, "val": "second"}).encode()
    assert urllib_call(shared_server, "POST", "/set", overwrite)[0] == 200
    assert json.loads(urllib_call(shared_server, "GET", "/get/" + quote(key, safe=""))[2]) == {
        "key": key,
        "val": "second",
    }

    status, content_type, answer = urllib_call(shared_server, "GET", "/get/e2e-never-set")
    assert status == 404
    assert content_type.startswith("application/json")
    assert "error" in json.loads(answer)


def test_default_bind_is_loopback_v4_and_v6(shared_server: Server) -> None:
    config = shared_server.request("GET", "/config").json()
    assert config["host"] == "localhost"  # the premise: no KV_HOST reached the process

    set_value(shared_server, "e2e-bind", "over v4", host=LOOPBACK_V4)
    assert get_value(shared_server, "e2e-bind", host=LOOPBACK_V4) == "over v4"
    if can_bind_ipv6_loopback():
        assert shared_server.request("GET", "/health", host=LOOPBACK_V6).status == 200
        assert get_value(shared_server, "e2e-bind", host=LOOPBACK_V6) == "over v4"
        status, _, _ = urllib_call(shared_server, "GET", "/health", host=LOOPBACK_V6)
        assert status == 200
    # Loopback only, not every interface: 127.0.0.2 is loopback too on Linux, so a wildcard
    # bind would answer there.
    assert not accepts_connections("127.0.0.2", shared_server.port)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Content-Type": "application/x-www-form-urlencoded"}],
    ids=["no-content-type", "curl-d-form-type"],
)
def test_post_without_json_content_type(shared_server: Server, headers: dict[str, str]) -> None:
    key = f"e2e-curl-{len(headers)}"
    body = json.dumps({"key": key, "val": "from curl"}).encode()
    conn = http.client.HTTPConnection(LOOPBACK_V4, shared_server.port, timeout=5)
    try:
        conn.putrequest("POST", "/set", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        status, payload = answer.status, answer.read()
    finally:
        conn.close()
    assert status == 200, payload
    assert json.loads(payload) == {"key": key, "val": "from curl"}
    assert get_value(shared_server, key) == "from curl"


# --- lifecycle ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero_promptly_with_json_logs(
    servers: ServerPool, signum: signal.Signals
) -> None:
    server = servers.start()
    set_value(server, "k", "v")
    # An idle keep-alive connection, as a browser or a pooled client leaves open.
    idle = http.client.HTTPConnection(LOOPBACK_V4, server.port, timeout=5)
    try:
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        started = time.monotonic()
        status = server.stop(signum, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        idle.close()

    assert status == 0, server.describe()
    assert elapsed < 4, f"took {elapsed:.1f} s to exit"
    events = [event["event"] for event in server.log_events()]  # every line is a JSON object
    assert "listening" in events
    assert "stopped" in events
    assert events.index("listening") < events.index("stopped")
    assert events[-1] == "stopped"
    listening = next(e for e in server.log_events() if e["event"] == "listening")
    assert any(str(server.port) in address for address in listening["addresses"])
    assert server.stderr() == ""


def test_restart_keeps_data_including_overwrite_and_delete(servers: ServerPool) -> None:
    first = servers.start()
    for key in ("kept", "overwritten", "deleted"):
        set_value(first, key, "original")
    set_value(first, "overwritten", "new")
    delete_value(first, "deleted")
    assert first.stop() == 0

    second = servers.start()
    assert_store(second, {"kept": "original", "overwritten": "new", "deleted": None})
    assert second.stop() == 0


class Writer(threading.Thread):
    """Sequential POSTs of increasing integers to its own keys until the server dies: one
    /set per key, or with ``batch`` one /mset of all its keys."""

    def __init__(self, port: int, keys: list[str], deadline: float, batch: bool = False) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.keys = keys
        self.deadline = deadline
        self.batch = batch
        self.attempted: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.connection_error: Optional[BaseException] = None
        self.unexpected: Optional[str] = None

    def run(self) -> None:
        conn = http.client.HTTPConnection(LOOPBACK_V4, self.port, timeout=5)
        number = 0
        try:
            while time.monotonic() < self.deadline:
                requests: list[tuple[str, object, list[str]]] = (
                    [
                        (
                            "/mset",
                            {"items": [{"key": k, "val": str(number)} for k in self.keys]},
                            self.keys,
                        )
                    ]
                    if self.batch
                    else [("/set", {"key": k, "val": str(number)}, [k]) for k in self.keys]
                )
                for path, document, written in requests:
                    for key in written:
                        self.attempted[key] = number
                    conn.request("POST", path, body=json.dumps(document).encode())
                    answer = conn.getresponse()
                    payload = answer.read()
                    if answer.status != 200:
                        self.unexpected = f"status {answer.status}: {payload!r}"
                        return
                    for key in written:
                        self.acked[key] = number
                number += 1
            self.unexpected = "the server was never killed"
        except (OSError, http.client.HTTPException) as error:
            self.connection_error = error
        except BaseException as error:
            self.unexpected = repr(error)
        finally:
            conn.close()


@pytest.mark.parametrize("durability", ["normal", "full"])
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("attempt", range(3))
def test_kill_9_loses_no_acknowledged_write(
    servers: ServerPool, durability: str, workers: str, attempt: int
) -> None:
    """Concurrent writers (half of them batches), a kill -9 of the whole service at a random
    moment, a restart: every key holds its last acknowledged value or a later one that was in
    flight."""
    env = {"KV_DURABILITY": durability, "KV_WORKERS": workers}
    server = servers.start(env=env)
    writers = [
        Writer(
            server.port,
            [f"w{thread}-k{index}" for index in range(3)],
            time.monotonic() + 20,
            batch=thread % 2 == 1,
        )
        for thread in range(8)
    ]
    for writer in writers:
        writer.start()
    time.sleep(random.uniform(0.5, 1.5))
    all_running = all(writer.is_alive() for writer in writers)
    server.kill()
    for writer in writers:
        writer.join(timeout=10)

    assert all_running, [writer.unexpected for writer in writers]
    assert [writer.unexpected for writer in writers] == [None] * len(writers)
    assert all(writer.connection_error is not None for writer in writers)
    acknowledged = sum(len(writer.acked) for writer in writers)
    total_acks = sum(sum(value + 1 for value in writer.acked.values()) for writer in writers)
    assert acknowledged == 3 * len(writers) and total_acks >= 80, "too few writes to test"

    restarted = servers.start(env=env)
    problems = []
    for writer in writers:
        for key in writer.keys:
            value = get_value(restarted, key)
            acked = writer.acked.get(key)
            attempted = writer.attempted[key]
            if value is None:
                if acked is not None:
                    problems.append(f"{key}: lost; acknowledged {acked}")
                continue
            if not (acked if acked is not None else 0) <= int(value) <= attempted:
                problems.append(f"{key}: {value}; acknowledged {acked}, attempted {attempted}")
    assert problems == []
    assert restarted.stop() == 0


# --- seeding --------------------------------------------------------------------------------


def test_input_db_is_never_modified(servers: ServerPool, tmp_path: Path) -> None:
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    # WAL mode in the header: a careless reader would create -wal and -shm beside it.
    input_db = write_input_db(seed_dir / "input.db", [("s1", "v1"), ("s2", "v2")], wal=True)
    assert os.listdir(seed_dir) == ["input.db"]
    digest = sha256_of(input_db)

    first = servers.start(input_db=input_db)
    assert get_value(first, "s1") == "v1"
    set_value(first, "s1", "overwritten")
    set_value(first, "new", "value")
    delete_value(first, "s2")
    assert first.stop() == 0
    assert sha256_of(input_db) == digest
    assert os.listdir(seed_dir) == ["input.db"]

    second = servers.start(input_db=input_db)
    assert_store(second, {"s1": "overwritten", "s2": None, "new": "value"})
    set_value(second, "s1", "again")
    second.kill()
    assert sha256_of(input_db) == digest
    assert os.listdir(seed_dir) == ["input.db"]


def test_seed_is_served_writes_survive_restart_and_a_changed_seed_applies_on_top(
    servers: ServerPool, tmp_path: Path
) -> None:
    input_db = write_input_db(tmp_path / "input.db", [("s1", "v1"), ("s2", "v2"), ("s3", "v3")])

    first = servers.start(input_db=input_db)
    assert_store(first, {"s1": "v1", "s2": "v2", "s3": "v3"})
    set_value(first, "s1", "mine")
    delete_value(first, "s2")
    set_value(first, "u1", "user")
    assert first.stop() == 0

    # The same input.db again: the writes made since are not undone by reseeding.
    second = servers.start(input_db=input_db)
    expected: dict[str, Optional[str]] = {"s1": "mine", "s2": None, "s3": "v3", "u1": "user"}
    assert_store(second, expected)
    assert second.stop() == 0

    # A changed input.db is applied on top of what the store holds.
    input_db.unlink()
    write_input_db(input_db, [("s3", "v3-new"), ("s4", "v4")])
    third = servers.start(input_db=input_db)
    assert_store(third, {**expected, "s3": "v3-new", "s4": "v4"})
    assert third.stop() == 0


# --- startup errors -------------------------------------------------------------------------


def assert_failed_before_listening(server: Server) -> int:
    status = server.wait_exit()
    assert status != 0, server.describe()
    assert "listening" not in [event.get("event") for event in server.log_events()]
    return status


@pytest.mark.parametrize("configured", [True, False], ids=["KV_INPUT_DB", "cwd-input.db"])
def test_input_db_that_is_not_sqlite_fails_with_one_line(
    servers: ServerPool, configured: bool
) -> None:
    bad = servers.root / "input.db"
    bad.write_bytes(b"this is not a database\n" * 10)
    server = servers.spawn(port=free_port(), input_db=bad if configured else None)
    assert_failed_before_listening(server)
    lines = server.stderr().splitlines()
    assert len(lines) == 1, server.stderr()
    assert str(bad) in lines[0] or str(bad.resolve()) in lines[0]
    assert not accepts_connections(LOOPBACK_V4, server.port)


def test_configured_input_db_that_does_not_exist_fails(servers: ServerPool) -> None:
    missing = servers.root / "nowhere" / "input.db"
    server = servers.spawn(port=free_port(), input_db=missing)
    assert_failed_before_listening(server)
    assert str(missing) in server.stderr()


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [((), {"KV_PORT": "notaport"}, "KV_PORT"), (("--port", "0"), {}, "--port")],
    ids=["KV_PORT=notaport", "--port=0"],
)
def test_invalid_setting_exits_2_naming_it_without_binding(
    servers: ServerPool, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    # A valid port elsewhere in the environment must not be used instead of the bad one.
    guard = free_port()
    overrides = {"KV_PORT": str(guard), "PORT": str(guard), **env}
    server = servers.spawn(*args, env=overrides)
    ever_bound = False
    deadline = time.monotonic() + 15
    while server.running and time.monotonic() < deadline:
        ever_bound = ever_bound or accepts_connections(LOOPBACK_V4, guard, timeout=0.2)
        time.sleep(0.01)
    assert server.wait_exit() == 2, server.describe()
    assert named in server.stderr()
    assert not ever_bound
    assert "listening" not in server.stdout()


def test_help_lists_a_flag_for_every_setting(servers: ServerPool) -> None:
    server = servers.spawn("--help", env={"COLUMNS": "100"})
    assert server.wait_exit() == 0, server.describe()
    text = server.stdout()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text, name
        assert env_name(name) in text, name
    assert "KV_" in text


# --- configuration sources ------------------------------------------------------------------


def test_flag_wins_over_environment(servers: ServerPool) -> None:
    from_env, from_flag = free_port(), free_port()
    while from_flag == from_env:
        from_flag = free_port()
    server = servers.start("--port", str(from_flag), port=from_flag, env={"KV_PORT": str(from_env)})
    assert server.request("GET", "/health").status == 200
    assert not accepts_connections(LOOPBACK_V4, from_env)
    assert server.stop() == 0


def test_plain_port_is_honoured_when_kv_port_is_unset(servers: ServerPool) -> None:
    port = free_port()
    server = servers.start(port=port, env={"KV_PORT": None, "PORT": str(port)})
    assert server.request("GET", "/config").json()["port"] == port
    assert server.stop() == 0


# --- workers --------------------------------------------------------------------------------


def test_workers_share_the_port_and_the_store_and_seed_once(
    servers: ServerPool, tmp_path: Path
) -> None:
    seed = write_input_db(tmp_path / "input.db", [("seeded", "yes")])
    server = servers.start(input_db=seed, env={"KV_WORKERS": "2", "KV_ACCESS_LOG": "true"})
    deadline = time.monotonic() + 15  # /health answered once one worker listened
    while [event["event"] for event in server.log_events()].count("listening") < 2:
        assert time.monotonic() < deadline, server.describe()
        time.sleep(0.05)
    for number in range(40):
        # Every request is a new connection, which the kernel hands to either worker: a
        # read right after an acknowledged write often lands on the other one.
        set_value(server, f"k{number}", f"v{number}")
        assert get_value(server, f"k{number}") == f"v{number}"
    assert get_value(server, "seeded") == "yes"
    events = server.log_events()
    assert {event["worker"] for event in events if event["event"] == "request"} == {1, 2}
    assert [event["event"] for event in events].count("seed_applied") == 1
    assert server.stop() == 0


def test_the_memory_store_refuses_more_than_one_worker(servers: ServerPool) -> None:
    server = servers.spawn(env={"KV_WORKERS": "2", "KV_STORE": "memory"})
    assert server.wait_exit() == 2
    assert "KV_WORKERS" in server.stderr()


def test_workers_stop_when_their_supervisor_is_killed(servers: ServerPool) -> None:
    server = servers.start(env={"KV_WORKERS": "2"})
    server.process.kill()  # the supervisor alone, not its process group
    server.process.wait()
    deadline = time.monotonic() + 10
    while accepts_connections(LOOPBACK_V4, server.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not accepts_connections(LOOPBACK_V4, server.port)


# --- malformed HTTP -------------------------------------------------------------------------


def raw_exchange(server: Server, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are and parse the one response (the server closes after errors)."""
    with socket.create_connection((LOOPBACK_V4, server.port), timeout=5) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /get/k HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"POST /set HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ],
    ids=["bad-method", "header-too-long", "bad-content-length"],
)
def test_unparseable_http_gets_a_json_400(shared_server: Server, request_bytes: bytes) -> None:
    status, headers, body = raw_exchange(shared_server, request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    document = json.loads(body)
    assert set(document) == {"error", "message"}
    assert document["error"] == "bad_request"
    assert "aaaa" not in document["message"]  # the offending bytes are not echoed


def test_a_long_key_fits_in_the_request_line(shared_server: Server) -> None:
    key = "ключ/" * 450  # 4,050 bytes of UTF-8, 12,150 characters percent-encoded
    set_value(shared_server, key, "long")
    assert get_value(shared_server, key) == "long"


# --- a damaged or foreign data file ------------------------------------------------------------


def _foreign_database(path: Path) -> None:
    with sqlite3.connect(str(path)) as conn:
        conn.execute("create table invoices(id integer primary key, total real)")
    conn.close()


def _truncated_store(path: Path) -> None:
    """One of our own data files, with everything after its first page cut off."""

    async def fill() -> None:
        store = SqliteStore(path)
        await store.load(
            RowsSeed(((f"k{number}", "x" * 500) for number in range(200)), "fingerprint")
        )
        await store.close()

    run_in_own_loop(fill())
    path.write_bytes(path.read_bytes()[:4096] + b"\x13" * 8192)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"these are my notes, not a database\n" * 50),
        _foreign_database,
        _truncated_store,
    ],
    ids=["not-sqlite", "foreign-sqlite", "truncated"],
)
def test_a_damaged_or_foreign_data_file_is_refused_untouched(
    servers: ServerPool, damage: Callable[[Path], None]
) -> None:
    data_path = servers.root / "data" / "kv.sqlite3"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    damage(data_path)
    before = data_path.read_bytes()
    server = servers.spawn(port=free_port())
    assert server.wait_exit() == 1
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and str(data_path) in lines[0], server.stderr()
    assert data_path.read_bytes() == before
    assert sorted(path.name for path in data_path.parent.iterdir()) == ["kv.sqlite3"]
