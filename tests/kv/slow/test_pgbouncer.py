"""Replicas behind PgBouncer, with real server processes: in transaction mode with
KV_POSTGRES_POOLER=transaction (watchers polling, or listening on KV_POSTGRES_LISTEN_URL
straight to the database), in session mode with the setting left alone, in transaction mode
without the setting, where what a user sees must name it, and in statement mode, which cannot
work and must say so at once.

In each working case two replicas start (the second used to fail with a duplicate prepared
statement) and serve several threads of SETs and GETs through both with no 5xx. Then, while
more load writes through one replica (A) and reads through the other (B), a long-poll on B is
woken by a write through A within WAKE_BOUND, every time: B writes nothing itself then, so
what wakes it is what it hears of A's writes (polling, or LISTEN), not its own commits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Optional

import pytest

from mapmg_data_engineer_takehome.store.postgres import LISTENER_NAME, POOLER_SETTING

from ..conftest import StartPgBouncer
from ..e2e_support import Response, Server, ServerPool, free_port, http_request
from ..postgres_support import PostgresCluster
from .test_postgres import assert_no_secret, on_postgres, set_value

# What the tests promise a watcher of one replica about another's write. Polling (no LISTEN
# through a transaction pooler) finds it within POLL_WITHOUT_LISTEN, 0.2 s; LISTEN at once. The
# rest is for two busy cores that also run the load, PgBouncer and PostgreSQL.
WAKE_BOUND = 1.0
WAKES = 5
LOAD_THREADS = 6
LOAD_SECONDS = 4.0
SETTING_NAMED = f"{POOLER_SETTING}=transaction"


class Load(threading.Thread):
    """SETs of its own keys through ``writers`` and GETs of them through ``readers``, each
    list in turn, until stopped, on kept-alive connections: how many answers of each status,
    every 5xx answer, and anything else wrong (a connection error, a GET that misses the value
    its SET was acknowledged for)."""

    def __init__(
        self, number: int, writers: list[Server], readers: list[Server], stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.number, self.writers, self.readers, self.stop = number, writers, readers, stop
        self.statuses: dict[int, int] = {}
        self.errors: list[Response] = []
        self.failures: list[str] = []

    def run(self) -> None:
        writers, readers = (
            [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for server in side]
            for side in (self.writers, self.readers)
        )
        try:
            count = 0
            while not self.stop.is_set():
                key, value = f"load/{self.number}/{count % 50}", str(count)
                body = json.dumps({"key": key, "val": value}).encode()
                writer = writers[count % len(writers)]
                reader = readers[(count + 1) % len(readers)]
                written = self.ask(writer, "POST", "/set", body)
                answer = self.ask(reader, "GET", f"/get/{key}")
                self.check(key, value, written, answer)
                count += 1
        finally:
            for connection in [*writers, *readers]:
                connection.close()

    def check(
        self, key: str, value: str, written: Optional[Response], read: Optional[Response]
    ) -> None:
        """A GET that answered (not a 5xx: those are errors) after a SET that was acknowledged
        must give its value."""
        if written is None or written.status != 200 or read is None or read.status >= 500:
            return
        if read.status != 200 or read.json()["val"] != value:
            self.failures.append(f"GET {key}: {read.status} {read.body!r}; SET {value} answered")

    def ask(
        self,
        connection: http.client.HTTPConnection,
        method: str,
        path: str,
        body: Optional[bytes] = None,
    ) -> Optional[Response]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            connection.request(method, path, body=body, headers=headers)
            reply = connection.getresponse()
            answer = Response(reply.status, reply.headers, reply.read())
        except (OSError, http.client.HTTPException) as error:
            self.failures.append(f"{method} {path}: {error!r}")
            connection.close()  # http.client reconnects on the next request
            return None
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        if answer.status >= 500:
            self.errors.append(answer)
        return answer


@contextlib.contextmanager
def loaded(writers: list[Server], readers: list[Server]) -> Iterator[list[Load]]:
    """LOAD_THREADS threads of load while the block runs; stopped and joined when it ends."""
    stop = threading.Event()
    threads = [Load(number, writers, readers, stop) for number in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def assert_served(loads: list[Load]) -> None:
    """Every request of the load answered 200, and there were enough to test something."""
    assert [failure for load in loads for failure in load.failures] == []
    assert [error.body for load in loads for error in load.errors] == []
    statuses: dict[int, int] = {}
    for load in loads:
        for status, count in load.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 100, statuses


def long_poll(server: Server, since: int, answers: list[tuple[float, Response]]) -> None:
    """A long-poll of the wake/ keys after ``since``: when it answered, and its answer."""
    path = f"/changes?prefix=wake/&since={since}&timeout=10"
    answer = http_request(server.port, "GET", path, timeout=15)
    answers.append((time.monotonic(), answer))


def wake_delays(writer: Server, watched: Server, times: int = WAKES) -> list[float]:
    """Seconds from a write through ``writer`` until a long-poll on ``watched``, parked before
    the write, answers with it; ``times`` times, one write at a time."""
    delays = []
    for number in range(times):
        since = json.loads(watched.request("GET", "/changes?prefix=wake/&timeout=0").body)["next"]
        answers: list[tuple[float, Response]] = []
        poll = threading.Thread(target=long_poll, args=(watched, since, answers), daemon=True)
        poll.start()
        time.sleep(0.3)  # for the long-poll to be parked, waiting
        sent = time.monotonic()
        assert set_value(writer, f"wake/{number}", str(number)).status == 200
        poll.join(timeout=15)
        assert answers, "the long-poll never answered"
        arrived, answer = answers[0]
        assert answer.status == 200, answer.body
        assert [event["key"] for event in answer.json()["events"]] == [f"wake/{number}"]
        delays.append(arrived - sent)
    return delays


def listeners(cluster: PostgresCluster, database: str) -> int:
    """How many connections to ``database`` are a replica's listening connection."""
    return int(
        cluster.psql(
            "SELECT count(*) FROM pg_stat_activity"
            f" WHERE application_name = '{LISTENER_NAME}' AND datname = '{database}'"
        )
    )


# (PgBouncer's pool_mode, KV_POSTGRES_POOLER, LISTEN straight to the database, listening
# connections the database sees once one replica has watchers)
WORKING = {
    "transaction-polling": ("transaction", "transaction", False, 0),
    "transaction-listen-url": ("transaction", "transaction", True, 1),
    "session": ("session", None, False, 1),
}


@pytest.mark.parametrize("case", list(WORKING))
def test_two_replicas_behind_pgbouncer_serve_load_and_wake_each_other_within_a_second(
    case: str,
    servers: ServerPool,
    postgres_cluster: PostgresCluster,
    pgbouncers: StartPgBouncer,
) -> None:
    """Both replicas start and serve; B's watchers hear of A's writes within WAKE_BOUND; and
    the database sees a listening connection only where one should be: none when polling
    through a transaction pooler, B's (straight, or held through the session pooler) else."""
    pool_mode, pooler, listen_direct, listening = WORKING[case]
    bouncer = pgbouncers(pool_mode)
    database = postgres_cluster.create_database()
    settings: dict[str, Optional[str]] = {"KV_POSTGRES_POOLER": pooler}
    if listen_direct:
        settings["KV_POSTGRES_LISTEN_URL"] = postgres_cluster.url(database)
    env = {**on_postgres(bouncer.url(database)), **settings}
    first, second = servers.start(env=env), servers.start(env=env)  # the second starts too
    with loaded([first, second], [first, second]) as loads:
        time.sleep(LOAD_SECONDS)
    assert_served(loads)
    with loaded([first], [second]) as loads:  # second writes nothing now
        delays = wake_delays(first, second)
    assert_served(loads)
    assert all(delay < WAKE_BOUND for delay in delays), delays
    assert listeners(postgres_cluster, database) == listening
    for replica in (first, second):
        assert replica.stop() == 0
        assert_no_secret(replica)


def test_without_the_setting_a_second_replica_fails_to_start_naming_it(
    servers: ServerPool, postgres_cluster: PostgresCluster, pgbouncers: StartPgBouncer
) -> None:
    """KV_POSTGRES_POOLER left at none through PgBouncer in transaction mode: the first replica
    starts, and the second finds the first's prepared statement on the server connection
    PgBouncer hands it (DuplicatePreparedStatementError): it exits at once, not after the
    30 s of retries a database that does not answer gets, saying which setting to set in its
    error output and its log."""
    bouncer = pgbouncers("transaction")
    # No upkeep pass each second: the first replica is then idle when the second starts, so
    # that PgBouncer hands the second the server connection the first prepared on, rather
    # than, on a busy machine, a new one while the first's is in a transaction.
    env = on_postgres(bouncer.url(postgres_cluster.create_database()), KV_PURGE_INTERVAL="3600")
    first = servers.start(env=env)
    second = servers.spawn(port=free_port(), env=env)
    started = time.monotonic()
    assert second.wait_exit() == 1
    assert time.monotonic() - started < 10
    assert SETTING_NAMED in second.stderr()
    [failed] = [event for event in second.log_events() if event["event"] == "startup_failed"]
    assert "DuplicatePreparedStatementError" in failed["reason"], failed
    assert SETTING_NAMED in failed["reason"]
    assert first.running
    assert_no_secret(second)


def test_without_the_setting_a_replica_under_load_logs_its_503s_naming_it(
    servers: ServerPool, postgres_cluster: PostgresCluster, pgbouncers: StartPgBouncer
) -> None:
    """One replica, KV_POSTGRES_POOLER left at none, through PgBouncer in transaction mode:
    under concurrent requests its statements go missing (prepared on one server connection,
    run on another), and those requests answer 503 store_unavailable, with the answer's
    generic message (a 503 hides the store's internals); the log says why, naming the
    setting, once for each."""
    bouncer = pgbouncers("transaction")
    replica = servers.start(env=on_postgres(bouncer.url(postgres_cluster.create_database())))
    with loaded([replica], [replica]) as loads:
        time.sleep(LOAD_SECONDS)
    assert [failure for load in loads for failure in load.failures] == []
    errors = [error for load in loads for error in load.errors]
    assert errors, "no request failed: the pooler was not in the way?"
    for error in errors:
        assert error.status == 503, error.body
        assert error.json()["error"] == "store_unavailable"
    unavailable = [e for e in replica.log_events() if e["event"] == "store_unavailable"]
    assert len(unavailable) == len(errors)
    for event in unavailable:
        assert SETTING_NAMED in event["reason"], event
    assert_no_secret(replica)


@pytest.mark.parametrize("pooler", ["transaction", "none"])
def test_statement_pooling_fails_a_start_at_once_saying_why(
    pooler: str, servers: ServerPool, postgres_cluster: PostgresCluster, pgbouncers: StartPgBouncer
) -> None:
    """PgBouncer's pool_mode = statement refuses transactions of more than one statement, and
    every write of the store is one: whatever KV_POSTGRES_POOLER says, the replica exits at
    once (not after the 30 s of retries a database that does not answer gets) with
    PgBouncer's reason."""
    bouncer = pgbouncers("statement")
    env = on_postgres(bouncer.url(postgres_cluster.create_database()), KV_POSTGRES_POOLER=pooler)
    replica = servers.spawn(port=free_port(), env=env)
    started = time.monotonic()
    assert replica.wait_exit() == 1
    assert time.monotonic() - started < 10
    assert "transaction blocks not allowed in statement pooling mode" in replica.stderr()
    assert_no_secret(replica)
