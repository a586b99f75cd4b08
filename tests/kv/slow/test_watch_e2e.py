"""The change feed with real server processes: waking watchers across processes (workers on
the sqlite file, replicas on PostgreSQL), resuming a stream on another server after kill -9,
a held transaction that no watcher sees past, shutdown with streams open, a consumer that
reads nothing, and a quiet watcher outliving the history's retention."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from ..e2e_support import Server, ServerPool, run_in_own_loop
from ..postgres_support import PostgresCluster
from ..watch_support import Follower, client, poll, post, set_key

# Streams write a heartbeat this often, so that followers notice a stop soon.
QUICK = {"KV_CHANGES_HEARTBEAT": "0.5"}


@pytest.fixture
def database(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.url(postgres_cluster.create_database())


def on_postgres(url: str, **extra: str) -> dict[str, str]:
    return {"KV_STORE": "postgres", "KV_POSTGRES_URL": url, **QUICK, **extra}


def assert_whole(follower: Follower, written: list[int]) -> None:
    """The follower saw every revision ``written`` (one change each) once, in order."""
    assert follower.revisions() == written


def latency_of_writes(
    writer: Server, follower: Follower, count: int, written: list[int]
) -> list[float]:
    """Seconds from each write's answer to its event's arrival at the follower; each write's
    revision is appended to ``written``."""
    latencies = []
    for number in range(count):
        revision = set_key(writer, f"k{number}", "v")
        written.append(revision)
        acknowledged = time.monotonic()
        follower.wait_for(revision, timeout=5)
        index = follower.revisions().index(revision)
        latencies.append(max(0.0, follower.arrivals[index] - acknowledged))
        time.sleep(0.01)
    return latencies


# --- waking watchers across processes -------------------------------------------------------


def test_a_write_on_one_process_wakes_a_watcher_on_another_sharing_the_file(
    servers: ServerPool,
) -> None:
    """Two servers on one data file, as workers are: each notices the other's commits."""
    first = servers.start(env=QUICK)
    second = servers.start(env=QUICK)
    follower = Follower([second], since=0)
    follower.start()
    written: list[int] = []
    try:
        latencies = latency_of_writes(first, follower, 40, written)
        assert_whole(follower, written)
    finally:
        follower.stop()
    assert max(latencies) < 0.5, latencies


def test_workers_wake_each_others_watchers(servers: ServerPool) -> None:
    """With KV_WORKERS=2 the kernel spreads the connections: of 8 watchers, some are on the
    worker that does not take a given write, and every one of them sees every write."""
    server = servers.start(env={"KV_WORKERS": "2", **QUICK})
    followers = [Follower([server], since=0) for _ in range(8)]
    for follower in followers:
        follower.start()
    try:
        written = [set_key(server, f"k{number}", "v") for number in range(30)]
        for follower in followers:
            follower.wait_for(written[-1], timeout=10)
            assert_whole(follower, written)
    finally:
        for follower in followers:
            follower.stop()


def test_a_write_on_one_replica_wakes_a_watcher_on_another(
    servers: ServerPool, database: str, postgres_cluster: PostgresCluster
) -> None:
    first = servers.start(env=on_postgres(database))
    second = servers.start(env=on_postgres(database))
    follower = Follower([second], since=0)
    follower.start()
    written: list[int] = []
    try:
        latencies = latency_of_writes(first, follower, 30, written)
        # The listening connection killed: the next writes still arrive (the server listens
        # again, and reads the revision every second meanwhile), none lost.
        killed = postgres_cluster.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'kv-listen'",
            database=database.rsplit("/", 1)[1],
        )
        assert int(killed) == 1  # the watched replica's (a feed listens once it has a watcher)
        written += [set_key(first, f"k{number}", "v") for number in range(30, 40)]
        follower.wait_for(written[-1], timeout=10)
        assert_whole(follower, written)
    finally:
        follower.stop()
    assert max(latencies) < 0.5, latencies
    assert "event_loop_error" not in second.stdout()


def test_watchers_follow_through_a_database_restart(
    servers: ServerPool, database: str, postgres_cluster: PostgresCluster
) -> None:
    first = servers.start(env=on_postgres(database))
    second = servers.start(env=on_postgres(database))
    follower = Follower([second, first], since=0)
    follower.start()
    try:
        for number in range(10):
            set_key(first, f"before{number}", "v")
        postgres_cluster.restart()
        acknowledged = 10
        deadline = time.monotonic() + 30
        while acknowledged < 20:
            assert time.monotonic() < deadline, "writes did not come back after the restart"
            try:
                answer = post(first, "/set", {"key": f"after{acknowledged}", "val": "v"})
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 200:
                acknowledged += 1
            else:
                time.sleep(0.2)
        revision = int(answer.headers["ETag"].strip('"')) if answer is not None else 0
        follower.wait_for(revision, timeout=20)
        assert follower.revisions() == sorted(set(follower.revisions()))  # none twice
        # None missed: each key was written once, in a revision of its own, so the keys'
        # versions are every revision that committed (whether or not its answer arrived).
        listing = (
            client().get(f"http://127.0.0.1:{first.port}/keys", params={"limit": "1000"}).json()
        )
        assert follower.revisions() == sorted(item["version"] for item in listing["items"])
    finally:
        follower.stop()


# --- resuming after a crash -----------------------------------------------------------------


def test_a_stream_resumes_on_another_process_after_kill_9_missing_nothing(
    servers: ServerPool,
) -> None:
    streaming = servers.start(env=QUICK)
    other = servers.start(env=QUICK)
    follower = Follower([streaming, other], since=0)
    follower.start()
    written: list[int] = []

    def write(count: int) -> None:
        for number in range(count):
            written.append(set_key(other, f"k{len(written)}", f"v{number}"))

    try:
        write(100)
        follower.wait_for(written[-1])
        assert follower.connections == 1
        writer = threading.Thread(target=write, args=(200,))
        writer.start()
        time.sleep(0.1)
        streaming.kill()  # mid-stream, writes going on
        writer.join()
        follower.wait_for(written[-1])
        assert follower.connections == 2
        assert follower.revisions() == written  # nothing missed, nothing twice, in order
    finally:
        follower.stop()
    # The history survives the restart of the killed server.
    restarted = servers.start(env=QUICK)
    answer = poll(restarted, since=0, timeout=0)
    assert [change["revision"] for change in answer.json()["events"]] == written


# --- revision order is commit order ---------------------------------------------------------


def hold_sqlite_write(path: Path, held: threading.Event, release: threading.Event) -> None:
    """A writer that takes the next revision and holds its transaction open until told."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("BEGIN IMMEDIATE")
        revision = int(conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
        conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision + 1,))
        conn.execute(
            "INSERT INTO kv (key, val, version) VALUES ('held', 'v', ?)"
            " ON CONFLICT (key) DO UPDATE SET val = 'v', version = excluded.version",
            (revision + 1,),
        )
        conn.execute(
            "INSERT INTO changes (revision, key, type, val) VALUES (?, 'held', 'set', 'v')",
            (revision + 1,),
        )
        held.set()
        release.wait(10)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_no_watcher_sees_past_a_write_still_committing_sqlite(servers: ServerPool) -> None:
    writer_server = servers.start(env=QUICK)
    watched = servers.start(env=QUICK)
    start = set_key(writer_server, "first", "v")
    follower = Follower([watched], since=start)
    follower.start()
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_sqlite_write, args=(servers.data_path, held, release))
    holder.start()
    try:
        assert held.wait(5)
        # A write behind the held one waits for the write lock; it will take the next revision.
        later: list[int] = []
        waiting = threading.Thread(
            target=lambda: later.append(set_key(writer_server, "later", "v"))
        )
        waiting.start()
        time.sleep(1.0)
        assert follower.revisions() == []  # nothing past the held write is visible
        release.set()
        waiting.join(10)
        follower.wait_for(later[0])
        assert follower.revisions() == [start + 1, start + 2] == [start + 1, later[0]]
    finally:
        release.set()
        holder.join(10)
        follower.stop()


def test_no_watcher_sees_past_a_write_still_committing_postgres(
    servers: ServerPool, database: str
) -> None:
    """PostgreSQL's revision is a row lock held to commit: a write that takes the next
    revision blocks every later one, so no revision commits before an earlier one."""
    env = on_postgres(database, KV_POSTGRES_TIMEOUT="10")
    writer_server = servers.start(env=env)
    watched = servers.start(env=env)
    start = set_key(writer_server, "first", "v")
    follower = Follower([watched], since=start)
    follower.start()
    later: list[int] = []

    async def hold() -> None:
        conn = await asyncpg.connect(database)
        try:
            async with conn.transaction():
                await conn.fetch(
                    "SELECT * FROM kv_write(ARRAY['set'], ARRAY['held'], ARRAY['v'],"
                    " ARRAY[NULL]::bigint[], ARRAY[NULL], ARRAY[NULL]::bigint[], NULL)"
                )
                waiting = threading.Thread(
                    target=lambda: later.append(set_key(writer_server, "later", "v"))
                )
                waiting.start()
                await asyncio.sleep(1.0)
                assert follower.revisions() == []
            waiting.join(10)
        finally:
            await conn.close()

    try:
        run_in_own_loop(hold())
        follower.wait_for(later[0])
        assert follower.revisions() == [start + 1, start + 2] == [start + 1, later[0]]
    finally:
        follower.stop()


# --- stream hygiene -------------------------------------------------------------------------


def watchers_connected(server: Server) -> dict[str, float]:
    """kv_watchers by transport, from the server's metrics."""
    metrics = client().get(f"http://127.0.0.1:{server.port}/metrics").text
    found = re.findall(r'^kv_watchers\{transport="(\w+)"\} (\S+)$', metrics, re.MULTILINE)
    return {transport: float(value) for transport, value in found}


def test_a_shutdown_with_streams_and_polls_open_takes_well_under_its_timeout(
    servers: ServerPool,
) -> None:
    server = servers.start()  # the default heartbeat (15 s) and shutdown timeout (5 s)
    followers = [Follower([server]) for _ in range(10)]
    for follower in followers:
        follower.start()
    answers: list[int] = []
    polls = [
        threading.Thread(target=lambda: answers.append(poll(server, timeout=60).status_code))
        for _ in range(10)
    ]
    for thread in polls:
        thread.start()
    deadline = time.monotonic() + 10
    while watchers_connected(server) != {"sse": 10, "longpoll": 10}:
        assert time.monotonic() < deadline, watchers_connected(server)
        time.sleep(0.05)
    began = time.monotonic()
    assert server.stop() == 0
    # Under a second here; the bound leaves a loaded machine room, and is half of what the
    # streams would take if they held the shutdown up to its timeout.
    assert time.monotonic() - began < 2.5
    for thread in polls:
        thread.join(5)
    assert answers == [200] * 10  # each long-poll answered, without events
    for follower in followers:
        follower.stop()


def anonymous_rss_mib(pid: int) -> float:
    """The process's resident memory that is not a mapped file (SQLite's memory map)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_a_consumer_that_reads_nothing_is_cut_off_without_growing_the_server(
    servers: ServerPool,
) -> None:
    """Three rounds of 50 MB of events: the first with one watcher that keeps up, so that the
    server's caches (its page cache, the feed's tail) fill; the second the same, to see what
    the server grows by anyway; the third with a second watcher that reads nothing. The server
    holds at most KV_CHANGES_BACKLOG for that one, then closes its stream: it grows by about
    what it grew by in the second round, not by the 50 MB written."""
    server = servers.start(env={"KV_CHANGES_BACKLOG": str(256 * 1024), **QUICK})
    follower = Follower([server], since=0)  # a watcher that keeps up, unaffected
    follower.start()
    value = "x" * 200_000
    written: list[int] = []

    def write_round() -> float:
        """50 MB of events; the server's growth over them, once it has swept twice."""
        before = anonymous_rss_mib(server.process.pid)
        for _ in range(250):
            written.append(set_key(server, f"big{len(written)}", value))
        follower.wait_for(written[-1], timeout=60)
        time.sleep(2.5)
        return anonymous_rss_mib(server.process.pid) - before

    stalled = socket.create_connection(("127.0.0.1", server.port))
    try:
        write_round()
        anyway = write_round()
        stalled.sendall(b"GET /changes HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        time.sleep(0.5)
        with_stalled = write_round()
        assert with_stalled < anyway + 10, (with_stalled, anyway)
        # The stalled stream was closed: reading it now ends, short of 50 MB (what the
        # kernel's buffers at both ends took, and the backlog).
        stalled.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        assert received < 30 * 1024 * 1024
        assert_whole(follower, written)
    finally:
        stalled.close()
        follower.stop()
    assert "watcher_too_slow" in server.stdout()


def test_a_quiet_watcher_outlives_the_retention_by_following_next_and_progress(
    servers: ServerPool,
) -> None:
    """The history keeps one second; a watcher of a prefix nobody writes follows next (and
    a stream's progress ids) and is never told to list again, while one that stays put is."""
    server = servers.start(
        env={"KV_CHANGES_RETENTION": "1", "KV_PURGE_INTERVAL": "0.1", "KV_CHANGES_HEARTBEAT": "0.3"}
    )
    stream = Follower([server], prefix="quiet/", since=0)
    stream.start()
    stale = set_key(server, "busy/0", "v") - 1
    following = stale
    try:
        deadline = time.monotonic() + 3
        number = 0
        while time.monotonic() < deadline:
            set_key(server, f"busy/{number}", "v")
            number += 1
            answer = poll(server, prefix="quiet/", since=following, timeout=0.1)
            assert answer.status_code == 200, answer.text
            assert answer.json()["events"] == []
            following = answer.json()["next"]
        assert following > stale + 10
        gone = poll(server, prefix="quiet/", since=stale, timeout=0)
        assert gone.status_code == 410 and gone.json()["error"] == "compacted"
        # The stream's resume point moved with its progress events: a reconnection from it
        # is not refused.
        assert stream.last_id is not None and stream.last_id > stale + 10
        resumed = poll(server, prefix="quiet/", since=stream.last_id, timeout=0)
        assert resumed.status_code == 200, resumed.text
        assert stream.refusals == []
    finally:
        stream.stop()


def test_a_long_poll_and_a_stream_outlive_the_client_timeout(servers: ServerPool) -> None:
    """KV_CLIENT_TIMEOUT bounds how long a request takes to arrive, not how long its answer
    may wait or stream: a GET has arrived once its handler runs."""
    server = servers.start(env={"KV_CLIENT_TIMEOUT": "1", "KV_CHANGES_HEARTBEAT": "0.3"})
    started = time.monotonic()
    answer = poll(server, timeout=3)
    assert answer.status_code == 200, answer.text
    assert answer.json()["events"] == [] and time.monotonic() - started >= 3
    progress = 0
    with httpx.stream(
        "GET",
        f"http://127.0.0.1:{server.port}/changes",
        headers={"Accept": "text/event-stream"},
        timeout=5,
    ) as stream:
        deadline = time.monotonic() + 3
        for line in stream.iter_lines():
            progress += line == "event: progress"
            if time.monotonic() > deadline:
                break
    assert progress >= 8  # about one every 0.3 s for 3 s, on one connection
