"""A failover of PostgreSQL under load, with hosts rather than ports: a primary and a
synchronous standby, each in a network namespace of its own, and two replicas of the service
in two more, on a URL that names both databases (target_session_attrs=read-write). The
primary is killed (-9, every process), the standby promoted a second later, and its
synchronous_standby_names cleared, as a failover manager does when no standby is left.

Writers and a compare-and-set counter run on both replicas throughout: no acknowledged write
is lost, nothing is answered 200 while there is no primary, both replicas write again soon
after the promotion, and no replica logs an error nobody retrieved."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from ..e2e_support import Server, ServerPool, free_port
from ..linearizability import LOST, Operation, check
from ..postgres_support import PASSWORD, SUPERUSER, PostgresCluster
from .test_postgres import JSON_HEADERS, hosts, hosts_and_postgres, on_postgres

# How soon after the promotion both replicas must write again: the bound after a
# crash; after a partition, the replicas' KV_POSTGRES_TIMEOUT (what a request on a silent
# connection waits) plus a connection.
RECOVERY_BOUND = 5.0
POSTGRES_TIMEOUT = 1.0
PARTITION_BOUND = POSTGRES_TIMEOUT + 1.0
# A worker's pause after an answer that leaves its outcome unknown: while there is no
# primary, every request is one, and each is a branch the checker must follow.
BACKOFF = 0.2


def replicated_pair(
    bindir: Path, namespaces: dict[str, str], addresses: dict[str, str], port: int
) -> tuple[PostgresCluster, PostgresCluster]:
    """A primary on host db1 whose commits wait for the standby on db2, which streams from
    it over the network."""
    primary = PostgresCluster(bindir, host=addresses["db1"], port=port)
    primary.run_as = ["ip", "netns", "exec", namespaces["db1"], *primary.run_as]
    replication = "host replication all 0.0.0.0/0 scram-sha-256\n"
    with (primary.data / "pg_hba.conf").open("a") as hba:
        hba.write(replication)
    with (primary.data / "postgresql.conf").open("a") as conf:
        conf.write("synchronous_standby_names = '*'\nwal_sender_timeout = 5s\n")
    primary.start()
    standby = PostgresCluster(bindir, host=addresses["db2"], port=port, standby_of=primary)
    standby.run_as = ["ip", "netns", "exec", namespaces["db2"], *standby.run_as]
    with (standby.data / "postgresql.auto.conf").open("a") as conf:  # over the network
        conf.write(
            f"primary_conninfo = 'host={addresses['db1']} port={port} user={SUPERUSER}"
            f" password={PASSWORD} application_name=standby'\n"
        )
    with (standby.data / "postgresql.conf").open("a") as conf:
        conf.write("synchronous_standby_names = '*'\n")  # as the primary's, until cleared
    standby.start()
    deadline = time.monotonic() + 30
    while primary.psql("SELECT sync_state FROM pg_stat_replication") != "sync":
        assert time.monotonic() < deadline, "the standby never became synchronous"
        time.sleep(0.1)
    return primary, standby


Answer = tuple[int, dict[str, str], bytes]


def request(
    server: Server,
    host: str,
    method: str,
    path: str,
    body: Optional[dict[str, str]] = None,
    headers: Optional[dict[str, str]] = None,
) -> Answer:
    """(status, headers, body), or (0, {}, b"") when the connection failed."""
    data = None if body is None else json.dumps(body).encode()
    try:
        answer = server.request(method, path, data, {**JSON_HEADERS, **(headers or {})}, host=host)
    except (OSError, http.client.HTTPException):
        return 0, {}, b""
    return answer.status, dict(answer.headers), answer.body


# An answer that says nothing of whether a write took effect: no answer (a refused or cut
# connection, a timeout), or 503 (the store could not tell: "maybe", as the docs say).
UNKNOWN = (0, 503)


@dataclass
class Load:
    """What the workers did: every request and its answer, as the checker takes them, and
    when each write was acknowledged."""

    history: list[Operation] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, op: Operation) -> None:
        self.history.append(op)  # one call: atomic across threads
        if op.kind != "read" and op.outcome not in (LOST, "failed", "absent"):
            self.acked_at.append(op.end)


class Client:
    """One replica, as the workers see it: each call a request, recorded with its answer."""

    def __init__(self, server: Server, host: str, load: Load) -> None:
        self.server, self.host, self.load = server, host, load

    def _send(self, key: str, kind: str, method: str, path: str, **fields: object) -> Answer:
        body = fields.pop("body", None)
        headers = fields.pop("headers", None)
        started = time.monotonic()
        answer = request(self.server, self.host, method, path, body, headers)  # type: ignore[arg-type]
        ended = time.monotonic()
        status, answer_headers, content = answer
        version = {name.lower(): v for name, v in answer_headers.items()}.get("etag")
        outcome: object
        if (status in UNKNOWN and not (kind == "read" and status == 0)) or status == 0:
            outcome = LOST
        elif kind == "read":
            outcome = (
                None
                if status == 404
                else (json.loads(content)["val"], int(str(version).strip('"')))
            )
        elif status == 412:
            outcome = "failed"
        elif kind == "delete":
            outcome = "absent" if status == 404 else "deleted"
        else:
            outcome = int(str(version).strip('"'))
        if status not in (0, 200, 404, 412, 503):
            self.load.errors.append(f"{method} {path}: {status} {content[:200]!r}")
        end = math.inf if outcome is LOST else ended
        self.load.record(Operation(key, kind, started, end, outcome=outcome, **fields))  # type: ignore[arg-type]
        return answer

    def get(self, key: str) -> Answer:
        return self._send(key, "read", "GET", "/get/" + quote(key, safe=""))

    def set(self, key: str, val: str, if_version: Optional[int] = None) -> Answer:
        body = {"key": key, "val": val}
        if if_version is None:
            return self._send(key, "write", "POST", "/set", value=val, body=body)
        return self._send(
            key, "cas", "POST", "/set", value=val, expected=if_version, body=body,
            headers={"If-Match": f'"{if_version}"'},
        )  # fmt: skip

    def create(self, key: str, val: str) -> Answer:
        return self._send(
            key, "create", "POST", "/set", value=val, body={"key": key, "val": val},
            headers={"If-None-Match": "*"},
        )  # fmt: skip

    def delete(self, key: str) -> Answer:
        return self._send(key, "delete", "DELETE", "/delete/" + quote(key, safe=""))


def write_keys(client: Client, name: str, stop: threading.Event) -> None:
    """Writes of its own keys, each read back now and then."""
    number = 0
    while not stop.is_set():
        key = f"{name}/k{number % 10}"
        status = client.set(key, f"{name}-{number}")[0]
        if number % 3 == 0:
            client.get(key)
        number += 1
        if status != 200:
            time.sleep(BACKOFF)


def increment(client: Client, stop: threading.Event) -> None:
    """Read the counter and write it plus one if it is still at the version read."""
    while not stop.is_set():
        status, headers, body = client.get("counter")
        if status == 200:
            version = int({k.lower(): v for k, v in headers.items()}["etag"].strip('"'))
            status = client.set("counter", str(int(json.loads(body)["val"]) + 1), version)[0]
        if status not in (200, 412):
            time.sleep(BACKOFF)


def watch(
    server: Server, host: str, since: int, events: list[tuple[int, str]], done: threading.Event
) -> None:
    """Follow /changes by long-polls from ``since``, through errors, until ``done`` is set
    and the feed has caught up: every (revision, key) it was given, in order."""
    while True:
        status, _, body = request(server, host, "GET", f"/changes?since={since}&timeout=1")
        if status != 200:
            time.sleep(BACKOFF)
            continue
        answer = json.loads(body)
        events.extend((event["revision"], event["key"]) for event in answer["events"])
        since = answer["next"]
        if done.is_set() and not answer["events"] and not answer["more"]:
            return


def lock_and_unlock(client: Client, name: str, stop: threading.Event) -> None:
    """Take a lock that both replicas contend for (a create), and give it back (a delete)."""
    while not stop.is_set():
        status = client.create("lock", name)[0]
        if status == 200:
            status = client.delete("lock")[0]
        time.sleep(0.01 if status in (200, 404, 412) else BACKOFF)


def sequence(val: str) -> int:
    """The writer's number in a value it wrote ("a1-17": 17)."""
    return int(val.rpartition("-")[2])


def kill_9(cluster: PostgresCluster) -> None:
    """Every process of the server at once, as when its machine dies."""
    for pid in cluster.processes():
        os.kill(pid, signal.SIGKILL)


def set_link(namespace: str, state: str) -> None:
    """Bring the namespace's network interface up or down: down, its packets are dropped,
    and its TCP connections stay open with nobody answering, as across a partition."""
    links = subprocess.run(
        ["ip", "-n", namespace, "-o", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            subprocess.run(["ip", "-n", namespace, "link", "set", name, state], check=True)


def revision(cluster: PostgresCluster, database: str) -> str:
    return cluster.psql("SELECT value FROM kv_meta WHERE name = 'revision'", database)


@pytest.mark.parametrize("fault", ["kill -9", "partition"])
def test_a_failover_under_load_loses_no_acknowledged_write(tmp_path: Path, fault: str) -> None:
    """kill -9: every process of the primary killed. partition: its network cut instead
    (it lives on, its connections open and silent), and, as a failover manager's fencing
    does, made read-only before it comes back: it takes no write of ours after the cut."""
    bindir = hosts_and_postgres()
    with hosts(["db1", "db2", "a", "b"]) as (namespaces, addresses):
        port = free_port()
        primary, standby = replicated_pair(bindir, namespaces, addresses, port)
        pools = {
            name: ServerPool(tmp_path / name, launcher=["ip", "netns", "exec", namespaces[name]])
            for name in ("a", "b")
        }
        try:
            database = primary.create_database()
            url = (
                f"postgresql://{SUPERUSER}:{quote(PASSWORD, safe='')}@"
                f"{addresses['db1']}:{port},{addresses['db2']}:{port}/{database}"
                "?target_session_attrs=read-write"
            )
            service_port = free_port()
            replicas = {
                name: pools[name].start(
                    "--host",
                    addresses[name],
                    port=service_port,
                    env=on_postgres(url, KV_POSTGRES_TIMEOUT=str(POSTGRES_TIMEOUT)),
                    host=addresses[name],
                )
                for name in ("a", "b")
            }
            load, stop = Load(), threading.Event()
            clients = {name: Client(replicas[name], addresses[name], load) for name in replicas}
            status, headers, _ = clients["a"].set("counter", "0")
            assert status == 200
            load.history.clear()  # the counter's start is the checker's initial state
            etag = {name.lower(): value for name, value in headers.items()}["etag"]
            initial = {"counter": ("0", int(etag.strip('"')))}
            workers = [
                threading.Thread(target=work, args=args)
                for name, client in clients.items()
                for work, args in (
                    (write_keys, (client, f"{name}1", stop)),
                    (write_keys, (client, f"{name}2", stop)),
                    (increment, (client, stop)),
                    (lock_and_unlock, (client, name, stop)),
                )
            ]
            # A watcher on each replica, from the counter's start on.
            watched: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
            caught_up = threading.Event()
            watchers = [
                threading.Thread(
                    target=watch,
                    args=(
                        replicas[name],
                        addresses[name],
                        initial["counter"][1],
                        events,
                        caught_up,
                    ),
                )
                for name, events in watched.items()
            ]
            for worker in [*workers, *watchers]:
                worker.start()
            try:
                time.sleep(2)
                killed = time.monotonic()
                if fault == "kill -9":
                    kill_9(primary)
                else:
                    set_link(namespaces["db1"], "down")
                    # Its own socket still works: fenced, as Patroni's leader demotes itself
                    # once it cannot renew its lock.
                    primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
                    primary.psql("SELECT pg_reload_conf()")
                    fenced_at = revision(primary, database)
                time.sleep(1)
                promoting = time.monotonic()
                standby.pg_ctl("-w", "promote")
                standby.psql("ALTER SYSTEM SET synchronous_standby_names = ''")
                standby.psql("SELECT pg_reload_conf()")
                promoted = time.monotonic()
                # Both replicas write again soon: a write of each, from here on.
                recovered: dict[str, float] = {}
                while len(recovered) < 2 and time.monotonic() < promoted + 30:
                    for name in ("a", "b"):
                        if (
                            name not in recovered
                            and request(
                                replicas[name],
                                addresses[name],
                                "POST",
                                "/set",
                                {"key": f"probe/{name}", "val": "x"},
                            )[0]
                            == 200
                        ):
                            recovered[name] = time.monotonic() - promoted
                    time.sleep(0.02)
                if fault == "partition":
                    set_link(namespaces["db1"], "up")  # back, fenced
                time.sleep(1)
            finally:
                stop.set()
                for worker in workers:
                    worker.join(timeout=30)

            # The writes that committed: each answered with its new version.
            acknowledged = [op for op in load.history if isinstance(op.outcome, int)]
            print(  # the figures docs/high-availability.md quotes (pytest -s shows them)
                f"failover: recovered {recovered} s after the promotion;"
                f" {len(acknowledged)} writes acknowledged,"
                f" {sum(op.outcome is LOST for op in load.history)} answers lost"
            )
            assert load.errors == []
            if fault == "partition":
                assert revision(primary, database) == fenced_at, "the old primary took writes"
            assert not [op for op in load.history[-50:] if op.outcome is LOST], "still failing"
            assert set(recovered) == {"a", "b"}, recovered
            bound = RECOVERY_BOUND if fault == "kill -9" else PARTITION_BOUND
            assert max(recovered.values()) < bound, recovered
            # Nothing acknowledged while no primary existed (a margin for answers in flight).
            assert [at for at in load.acked_at if killed + 0.2 < at < promoting] == []
            assert len(acknowledged) >= 100, "too few writes to test"
            # Nothing acknowledged is lost, every answer is one a single copy could have
            # given, and the counter holds every acknowledged increment: all of it is
            # linearizability, with a last read of every key after the load.
            reader = clients["b"]
            for key in sorted({op.key for op in load.history}):
                reader.get(key)
            assert check(load.history, initial) == []
            # Every acknowledged write, once, in revision order, on both replicas' feeds.
            caught_up.set()
            for watcher in watchers:
                watcher.join(timeout=30)
            written = {(op.outcome, op.key) for op in acknowledged}
            for name, events in watched.items():
                revisions = [revision for revision, _ in events]
                assert revisions == sorted(revisions), name
                assert len(events) == len(set(events)), f"{name}: an event twice"
                assert written - set(events) == set(), f"{name}: acknowledged writes missed"
            for replica in replicas.values():
                assert "event_loop_error" not in replica.stdout(), replica.stdout()[-3000:]
                assert "never retrieved" not in replica.stdout() + replica.stderr()
        finally:
            for pool in pools.values():
                pool.close()
            primary.remove()
            standby.remove()
