"""Compare-and-set by ``POST /txn`` is linearizable through kill -9: many clients, each on a
connection of its own, add one to a few keys with transactions that compare the version they
last saw (``{"exists": false}`` while the key is missing), get the key in the failure branch
and go on from what it read, and read the keys now and then. The server is killed (-9) at a
random moment: on sqlite it is restarted on the same data and port, and the load goes on; on
PostgreSQL one of two replicas of one database is killed, and its clients move to the other.
Every key is read at the end, and the whole history, the answers lost in the kill included,
must be linearizable (tests/kv/linearizability.py)."""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import pytest

from ..e2e_support import LOOPBACK_V4, Response, ServerPool
from ..linearizability import LOST, Operation, State, TxnFailed, check
from ..postgres_support import PostgresCluster
from .test_postgres import on_postgres

KEYS = ["k0", "k1", "k2"]
CLIENTS = 8
# A client reads a key it knows nothing of, and one it knows one time in so many.
READ_EVERY = 5
# A client's pause when its server refuses connections (it is down, or being restarted).
BACKOFF = 0.05
JSON_HEADERS = {"Content-Type": "application/json"}
# Transactions that must succeed on each side of the kill, and fail in all.
MINIMUM = 100
# The load runs until MINIMUM transactions succeeded, then on for a random time of up to
# KILL_WITHIN seconds before the kill; after the kill (the restart included, on sqlite), until
# MINIMUM more succeeded and at least LOAD_AFTER_THE_KILL seconds passed. Counts rather than
# fixed times, so that a slow machine tests as much as a fast one.
KILL_WITHIN = 1.0
LOAD_AFTER_THE_KILL = 2.0
# The most a side of the kill may take to reach MINIMUM.
LOAD_DEADLINE = 60.0


class NotSent(Exception):
    """The server refused the connection: the request never left, so it is no operation."""


@dataclass
class History:
    """Every request the clients made and its answer, as the checker takes them."""

    operations: list[Operation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, op: Operation) -> None:
        self.operations.append(op)  # one call: atomic across threads


class Incrementer(threading.Thread):
    """One client on a keep-alive connection of its own, adding one to random keys until
    ``stop``. ``ports``: its server's, then the others'; when its server refuses connections
    it moves to the next (with one port, it waits for its server to come back)."""

    def __init__(
        self, ports: Sequence[int], history: History, stop: threading.Event, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.ports = list(ports)
        self.history, self.stop = history, stop
        self.random = random.Random(seed)
        self.known: dict[str, State] = {}  # each key's state when this client last saw it
        self.conn: Optional[http.client.HTTPConnection] = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                key = self.random.choice(KEYS)
                try:
                    if key not in self.known or self.random.randrange(READ_EVERY) == 0:
                        self.read(key)
                    if key in self.known:
                        self.increment(key)
                except NotSent:
                    self.ports.append(self.ports.pop(0))
                    time.sleep(BACKOFF)
        except BaseException as error:  # reported by the test
            self.history.errors.append(repr(error))
        finally:
            if self.conn is not None:
                self.conn.close()

    def read(self, key: str) -> None:
        started, ended, answer = self.send("GET", "/get/" + quote(key, safe=""))
        outcome: object = LOST
        if answer is not None and answer.status == 404:
            outcome = self.known[key] = None
        elif answer is not None and answer.status == 200:
            version = int(answer.headers["ETag"].strip('"'))
            outcome = self.known[key] = (answer.json()["val"], version)
        self.history.record(Operation(key, "read", started, ended, outcome=outcome))

    def increment(self, key: str) -> None:
        """A txn that sets the key to its value plus one if its version is still the one this
        client saw, and gets it if not: either way the client then knows its state."""
        state = self.known.pop(key)  # unknown again, unless the answer tells
        value = "1" if state is None else str(int(state[0]) + 1)
        compare: dict[str, Any] = (
            {"key": key, "exists": False} if state is None else {"key": key, "version": state[1]}
        )
        branches = {
            "success": [{"op": "set", "key": key, "val": value}],
            "failure": [{"op": "get", "key": key}],
        }
        started, ended, answer = self.send("POST", "/txn", {"compare": [compare], **branches})
        outcome: object = LOST
        if answer is not None and answer.status == 200:
            result = answer.json()
            got = result["results"][0]
            if result["succeeded"]:
                outcome = got["version"]
                self.known[key] = (value, got["version"])
            else:
                self.known[key] = None if got["val"] is None else (got["val"], got["version"])
                outcome = TxnFailed(self.known[key])
        expected = 0 if state is None else state[1]  # a missing key's version compares as 0
        self.history.record(Operation(key, "txn", started, ended, value, expected, outcome))

    def send(
        self, method: str, path: str, body: Optional[dict[str, Any]] = None
    ) -> tuple[float, float, Optional[Response]]:
        """When the request was sent, when its answer came, and the answer: math.inf and
        None when it never came (the connection is then dropped, and the next request opens
        another); math.inf when it was a 503 (the store could not tell), as the checker
        takes a lost answer."""
        if self.conn is None:
            conn = http.client.HTTPConnection(LOOPBACK_V4, self.ports[0], timeout=5)
            try:
                conn.connect()
            except OSError:
                conn.close()
                raise NotSent from None
            self.conn = conn
        data = None if body is None else json.dumps(body).encode()
        started = time.monotonic()
        try:
            self.conn.request(method, path, data, JSON_HEADERS if data else {})
            reply = self.conn.getresponse()
            answer = Response(reply.status, reply.headers, reply.read())
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            return started, math.inf, None
        ended = time.monotonic()
        assert answer.status in (200, 404, 503), f"{method} {path}: {answer.status} {answer.body!r}"
        return started, math.inf if answer.status == 503 else ended, answer


def tally(operations: Sequence[Operation]) -> Counter[str]:
    """How many reads, and transactions that succeeded ("ok"), failed or were lost."""
    return Counter(
        "read"
        if op.kind == "read"
        else "lost"
        if op.outcome is LOST
        else "failed"
        if isinstance(op.outcome, TxnFailed)
        else "ok"
        for op in operations
    )


def run_clients(
    ports_of: Sequence[Sequence[int]], history: History
) -> tuple[threading.Event, list[Incrementer]]:
    """CLIENTS clients, started, the n-th on ``ports_of[n % len(ports_of)]``; set the event
    to stop them."""
    stop = threading.Event()
    clients = [
        Incrementer(ports_of[number % len(ports_of)], history, stop, seed=number)
        for number in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    return stop, clients


def succeeded(history: History, since: float) -> int:
    """How many transactions that started at ``since`` or later succeeded."""
    return sum(
        1
        for op in list(history.operations)
        if op.start >= since
        and op.kind == "txn"
        and op.outcome is not LOST
        and not isinstance(op.outcome, TxnFailed)
    )


def load_until(history: History, since: float, at_least: float) -> None:
    """Let the clients run until MINIMUM transactions that started at ``since`` or later
    succeeded, and until ``at_least`` (the monotonic clock)."""
    deadline = time.monotonic() + LOAD_DEADLINE
    while succeeded(history, since) < MINIMUM or time.monotonic() < at_least:
        assert time.monotonic() < deadline, f"too slow to test: {tally(history.operations)}"
        assert history.errors == []
        time.sleep(0.05)


def stop_and_read_every_key(
    stop: threading.Event, clients: list[Incrementer], history: History, port: int
) -> None:
    stop.set()
    for client in clients:
        client.join(timeout=15)
    assert not any(client.is_alive() for client in clients)
    reader = Incrementer([port], history, stop, seed=0)
    try:
        for key in KEYS:
            reader.read(key)
    finally:
        if reader.conn is not None:
            reader.conn.close()
    assert [op.outcome is LOST for op in history.operations[-len(KEYS) :]] == [False] * len(KEYS)


def judge(history: History, killed: float) -> None:
    """No client met an error, enough happened on both sides of the kill to test something,
    and the whole history is linearizable from keys that were all missing."""
    assert history.errors == []
    before = tally([op for op in history.operations if op.start < killed])
    after = tally([op for op in history.operations if op.start >= killed])
    started = time.monotonic()
    problems = check(history.operations)
    counts = f"before the kill {dict(before)}, after it {dict(after)}"
    print(f"{counts}; judged in {time.monotonic() - started:.1f} s")  # pytest -s shows it
    assert before["ok"] >= MINIMUM and after["ok"] >= MINIMUM, f"too few to test: {counts}"
    assert before["failed"] + after["failed"] >= MINIMUM, f"too little contention: {counts}"
    assert before["lost"] + after["lost"] >= 1, f"no answer was lost in the kill: {counts}"
    assert problems == [], f"{counts}; the first problems: {problems[:5]}"


def test_txn_compare_and_set_is_linearizable_through_kill_9_of_the_server(
    servers: ServerPool,
) -> None:
    """sqlite, two worker processes on one file: the whole service killed at a random
    moment, restarted on the same data and port while its clients keep trying."""
    env = {"KV_WORKERS": "2"}
    server = servers.start(env=env)
    history = History()
    began = time.monotonic()
    stop, clients = run_clients([[server.port]], history)
    load_until(history, began, began)
    time.sleep(random.uniform(0.0, KILL_WITHIN))  # a random moment after
    killed = time.monotonic()
    server.kill()
    restarted = servers.start(port=server.port, env=env)
    load_until(history, killed, killed + LOAD_AFTER_THE_KILL)
    stop_and_read_every_key(stop, clients, history, restarted.port)
    judge(history, killed)
    assert restarted.stop() == 0


@pytest.fixture
def database(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh database of the test cluster, which both replicas share."""
    return postgres_cluster.url(postgres_cluster.create_database())


def test_txn_compare_and_set_is_linearizable_through_kill_9_of_a_postgres_replica(
    servers: ServerPool, database: str
) -> None:
    """Two replicas of one database, half of the clients on each: one replica killed at a
    random moment, its clients moving to the other, whose clients go on throughout."""
    replicas = [servers.start(env=on_postgres(database)) for _ in range(2)]
    ports = [replica.port for replica in replicas]
    history = History()
    began = time.monotonic()
    stop, clients = run_clients([ports, ports[::-1]], history)
    load_until(history, began, began)
    time.sleep(random.uniform(0.0, KILL_WITHIN))  # a random moment after
    killed = time.monotonic()
    replicas[0].kill()
    load_until(history, killed, killed + LOAD_AFTER_THE_KILL)
    stop_and_read_every_key(stop, clients, history, ports[1])
    judge(history, killed)
    assert all(client.ports[0] == ports[1] for client in clients)  # all moved
    assert replicas[1].stop() == 0
