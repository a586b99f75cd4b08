"""A failover of PostgreSQL under load, with hosts rather than ports: a primary and a
synchronous standby, each in a network namespace of its own, and two replicas of the service
in two more, on a URL that names both databases (target_session_attrs=read-write). The
primary is killed (-9, every process), the standby promoted a second later, and its
synchronous_standby_names cleared, as a failover manager does when no standby is left.

Writers and a compare-and-set counter run on both replicas throughout: no acknowledged write
is lost, nothing is answered 200 while there is no primary, both replicas write again soon
after the promotion, and no replica logs an error nobody retrieved.

With an asynchronous standby instead, which lacks the last writes when it is promoted, the
watchers that saw them are told so (410), and no revision is given to two writes; a replica
that slept through the failover, and so never saw them, answers 410 for their revisions
from its memory too."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from mapmg_data_engineer_takehome.client import Client as KvClient
from mapmg_data_engineer_takehome.client import KVError
from mapmg_data_engineer_takehome.store.postgres import TIMELINE_GAP

from ..e2e_support import Server, ServerPool, free_port
from ..linearizability import LOST, Operation, check
from ..postgres_support import PASSWORD, SUPERUSER, PostgresCluster, connection_url
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
    bindir: Path,
    namespaces: dict[str, str],
    addresses: dict[str, str],
    port: int,
    synchronous: bool = True,
) -> tuple[PostgresCluster, PostgresCluster]:
    """A primary on host db1 and a standby on db2, which streams from it over the network;
    ``synchronous``: the primary's commits wait for the standby."""
    primary = PostgresCluster(bindir, host=addresses["db1"], port=port)
    primary.run_as = ["ip", "netns", "exec", namespaces["db1"], *primary.run_as]
    replication = "host replication all 0.0.0.0/0 scram-sha-256\n"
    with (primary.data / "pg_hba.conf").open("a") as hba:
        hba.write(replication)
    waits_for = "'*'" if synchronous else "''"
    with (primary.data / "postgresql.conf").open("a") as conf:
        conf.write(f"synchronous_standby_names = {waits_for}\nwal_sender_timeout = 5s\n")
    primary.start()
    standby = PostgresCluster(bindir, host=addresses["db2"], port=port, standby_of=primary)
    standby.run_as = ["ip", "netns", "exec", namespaces["db2"], *standby.run_as]
    with (standby.data / "postgresql.auto.conf").open("a") as conf:  # over the network
        conf.write(
            f"primary_conninfo = 'host={addresses['db1']} port={port} user={SUPERUSER}"
            f" password={PASSWORD} application_name=standby'\n"
        )
    with (standby.data / "postgresql.conf").open("a") as conf:
        # As the primary's, until a failover manager clears it.
        conf.write(f"synchronous_standby_names = {waits_for}\n")
    standby.start()
    deadline = time.monotonic() + 30
    state = "sync" if synchronous else "async"
    while primary.psql("SELECT sync_state FROM pg_stat_replication") != state:
        assert time.monotonic() < deadline, f"the standby never streamed ({state})"
        time.sleep(0.1)
    return primary, standby


def url_of_both(addresses: dict[str, str], port: int, database: str) -> str:
    """The URL the replicas are given: both databases, the one that can write taken."""
    hosts = f"{addresses['db1']}:{port},{addresses['db2']}:{port}"
    return connection_url(hosts, database, target_session_attrs="read-write")


def start_replica(pool: ServerPool, address: str, port: int, url: str) -> Server:
    return pool.start(
        "--host",
        address,
        port=port,
        env=on_postgres(url, KV_POSTGRES_TIMEOUT=str(POSTGRES_TIMEOUT)),
        host=address,
    )


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Deployment:
    """A primary (db1) and its standby (db2), and a replica of the service on each of hosts
    a and b, on the URL of both databases: each host a network namespace of its own."""

    namespaces: dict[str, str]
    addresses: dict[str, str]
    primary: PostgresCluster
    standby: PostgresCluster
    database: str
    replicas: dict[str, Server]


@contextlib.contextmanager
def two_replicas(tmp_path: Path, synchronous: bool = True) -> Iterator[Deployment]:
    """A Deployment, torn down at the end whatever happened (its replicas SIGKILLed, which
    ends a stopped process too)."""
    bindir = hosts_and_postgres()
    with hosts(["db1", "db2", "a", "b"]) as (namespaces, addresses):
        port = free_port()
        primary, standby = replicated_pair(
            bindir, namespaces, addresses, port, synchronous=synchronous
        )
        pools = {
            name: ServerPool(tmp_path / name, launcher=["ip", "netns", "exec", namespaces[name]])
            for name in ("a", "b")
        }
        try:
            database = primary.create_database()
            url = url_of_both(addresses, port, database)
            service_port = free_port()
            replicas = {
                name: start_replica(pools[name], addresses[name], service_port, url)
                for name in ("a", "b")
            }
            yield Deployment(namespaces, addresses, primary, standby, database, replicas)
        finally:
            for pool in pools.values():
                pool.close()
            primary.remove()
            standby.remove()


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
    """What the workers did: every request and its answer, as the checker takes them."""

    history: list[Operation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, op: Operation) -> None:
        self.history.append(op)  # one call: atomic across threads

    def acknowledged_writes(self) -> list[Operation]:
        return [
            op
            for op in self.history
            if op.kind != "read" and op.outcome not in (LOST, "failed", "absent")
        ]


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
    with two_replicas(tmp_path) as deployment:
        namespaces, addresses = deployment.namespaces, deployment.addresses
        primary, standby = deployment.primary, deployment.standby
        database, replicas = deployment.database, deployment.replicas
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
            if fault == "kill -9":
                kill_9(primary)
            else:
                set_link(namespaces["db1"], "down")
            killed = time.monotonic()  # the fault in place: from here nothing commits
            if fault == "partition":
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
        # Nothing acknowledged while no primary existed: no write sent after the fault was
        # answered before the promotion (one sent before it may have committed then, and
        # been answered late, on a busy machine).
        assert [
            op for op in load.acknowledged_writes() if killed < op.start and op.end < promoting
        ] == []
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


def test_a_failover_that_lost_writes_makes_their_watchers_list_again_and_reuses_no_revision(
    tmp_path: Path,
) -> None:
    """Asynchronous replication: the standby, cut off from the primary, lacks the last
    writes, acknowledged and watched, when the primary dies and the standby is promoted.
    A watcher past them, resuming by long-poll or by SSE, and one that followed a stream
    through the failover, are told 410 unknown_revision (list again). The new primary's
    writes, more of them than were lost, take revisions above every one the watchers saw:
    one from before the lost writes reads on with no gap, and what it reads, applied to its
    listing, gives the store's final listing."""
    bindir = hosts_and_postgres()
    with hosts(["db1", "db2", "a"]) as (namespaces, addresses):
        port = free_port()
        primary, standby = replicated_pair(bindir, namespaces, addresses, port, synchronous=False)
        pool = ServerPool(tmp_path / "a", launcher=["ip", "netns", "exec", namespaces["a"]])
        try:
            database = primary.create_database()
            host = addresses["a"]
            replica = start_replica(pool, host, free_port(), url_of_both(addresses, port, database))

            def write(key: str, val: str) -> int:
                return request(replica, host, "POST", "/set", {"key": key, "val": val})[0]

            for number in range(20):
                assert write(f"k{number}", "kept") == 200
            deadline = time.monotonic() + 30
            while revision(standby, database) != revision(primary, database):
                assert time.monotonic() < deadline, "the standby never caught up"
                time.sleep(0.05)
            status, headers, body = request(replica, host, "GET", "/keys?values=true")
            assert status == 200
            listed_at = int({name.lower(): v for name, v in headers.items()}["kv-revision"])
            listing = {item["key"]: item["val"] for item in json.loads(body)["items"]}

            # A stream from the listing on, through the failover, by the Python client.
            streamed: list[int] = []
            stream_ended: list[BaseException] = []

            def follow() -> None:
                with KvClient(f"http://{host}:{replica.port}") as kv:
                    try:
                        for event in kv.watch(since=listed_at, reconnect_for=30):
                            streamed.append(event.revision)
                    except KVError as error:
                        stream_ended.append(error)

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()

            set_link(namespaces["db2"], "down")  # the standby hears no more
            lost = 20
            for number in range(lost):
                assert write(f"k{number}", "lost") == 200  # acknowledged: replication is async
            status, _, body = request(replica, host, "GET", f"/changes?since={listed_at}&timeout=0")
            last_seen = json.loads(body)["next"]
            assert last_seen == listed_at + lost
            deadline = time.monotonic() + 10
            while streamed[-1:] != [last_seen]:
                assert time.monotonic() < deadline, streamed
                time.sleep(0.05)

            kill_9(primary)
            # Promoted while still cut off: the dead primary's kernel would otherwise send
            # the standby what its sockets still held, and the standby could end up with some
            # of the writes after all.
            standby.pg_ctl("-w", "promote")
            set_link(namespaces["db2"], "up")
            deadline = time.monotonic() + 30
            while write("probe", "x") != 200:
                assert time.monotonic() < deadline, "no write after the promotion"
                time.sleep(0.05)
            # More writes than were lost: numbered on from the standby's revision, they would
            # pass the watchers' positions, and give other writes the numbers they saw.
            for number in range(2 * lost):
                assert write(f"n{number}", "new") == 200

            # Past the lost writes: told so, by long-poll and by SSE, before any stream starts.
            for headers in ({}, {"Accept": "text/event-stream", "Last-Event-ID": str(last_seen)}):
                status, _, body = request(
                    replica, host, "GET", f"/changes?since={last_seen}&timeout=0", headers=headers
                )
                assert status == 410, body
                assert json.loads(body)["error"] == "unknown_revision"
            follower.join(timeout=30)
            assert not follower.is_alive(), "the stream went on past the failover"
            assert [getattr(error, "code", None) for error in stream_ended] == ["unknown_revision"]
            assert streamed == list(range(listed_at + 1, last_seen + 1))  # nothing after them

            # From before them: every change since, none under a revision the watchers saw,
            # and the listing with them applied is the store's.
            events: list[dict[str, str]] = []
            since = listed_at
            while True:
                status, _, body = request(replica, host, "GET", f"/changes?since={since}&timeout=0")
                assert status == 200, body
                answer = json.loads(body)
                events += answer["events"]
                since = answer["next"]
                if not answer["more"]:
                    break
            first_new = min(int(event["revision"]) for event in events)
            assert first_new > last_seen
            for event in events:
                if event["type"] == "set":
                    listing[event["key"]] = event["val"]
                else:
                    listing.pop(event["key"], None)
            status, _, body = request(replica, host, "GET", "/keys?values=true&limit=1000")
            final = {item["key"]: item["val"] for item in json.loads(body)["items"]}
            assert listing == final
            assert [final[f"k{number}"] for number in range(lost)] == ["kept"] * lost
            print(  # the figure docs/high-availability.md quotes (pytest -s shows it)
                f"asynchronous failover: {lost} acknowledged writes lost; the revision went"
                f" from {last_seen} (the old primary's) to {first_new}"
            )
            assert "event_loop_error" not in replica.stdout(), replica.stdout()[-3000:]
        finally:
            pool.close()
            primary.remove()
            standby.remove()


def version_of(headers: dict[str, str]) -> int:
    """The version an answer's ETag names: the revision of the write."""
    return int({name.lower(): value for name, value in headers.items()}["etag"].strip('"'))


def test_a_replica_asleep_through_a_lossy_failover_answers_410_for_the_lost_revisions_from_its_tail(
    tmp_path: Path,
) -> None:
    """The issue's case 4. Two replicas, A and B, on one URL; a primary and an asynchronous
    standby. B sees five writes, then is stopped (SIGSTOP), the standby cut off, and three
    writes through A acknowledged by the primary alone; the primary dies, the standby is
    promoted, B goes on, and two writes follow. B never saw the lost writes, so the tail of
    the history that its feed keeps in memory reaches, once it has read the new primary's,
    from before the fork to after it, across the revisions the promotion skipped. For a since
    among them, every way in answers 410 unknown_revision on both replicas: a poll of the
    store, a long-poll and a resuming SSE stream, which B answers from that tail. From the
    fork, both replicas answer the two new writes and nothing else."""
    with two_replicas(tmp_path, synchronous=False) as deployment:
        namespaces, addresses = deployment.namespaces, deployment.addresses
        primary, standby = deployment.primary, deployment.standby
        database, replicas = deployment.database, deployment.replicas
        b_group = replicas["b"].process.pid  # its session: SIGSTOP takes every process

        def get(name: str, path: str, headers: Optional[dict[str, str]] = None) -> Answer:
            return request(replicas[name], addresses[name], "GET", path, headers=headers)

        def write(key: str, headers: Optional[dict[str, str]] = None) -> Answer:
            body = {"key": key, "val": key}
            return request(replicas["a"], addresses["a"], "POST", "/set", body, headers)

        def read(name: str, since: int, until: int) -> list[tuple[int, str]]:
            """The changes after ``since`` up to ``until``, by long-polls of ``name``."""
            events: list[tuple[int, str]] = []
            deadline = time.monotonic() + 30
            while since < until:
                assert time.monotonic() < deadline, (name, events)
                status, _, body = get(name, f"/changes?since={since}&timeout=5")
                assert status == 200, body
                answer = json.loads(body)
                events += [(event["revision"], event["key"]) for event in answer["events"]]
                since = answer["next"]
            return events

        # Both replicas' feeds begin, below every write: a long-poll that waits starts a
        # replica's tail.
        start = max(json.loads(get(name, "/changes?timeout=0.1")[2])["next"] for name in "ab")
        kept = []
        for number in range(5):
            status, headers, body = write(f"kept{number}")
            assert status == 200, body
            kept.append(version_of(headers))
        fork = kept[-1]
        deadline = time.monotonic() + 30
        while revision(standby, database) != str(fork):
            assert time.monotonic() < deadline, "the standby never caught up"
            time.sleep(0.05)
        assert read("b", start, fork) == [(v, f"kept{n}") for n, v in enumerate(kept)]

        os.killpg(b_group, signal.SIGSTOP)
        set_link(namespaces["db2"], "down")  # the standby hears no more
        lost = []
        for number in range(3):
            status, headers, body = write(f"lost{number}")
            assert status == 200, body  # acknowledged: replication is async
            lost.append(version_of(headers))
        assert lost == [fork + 1, fork + 2, fork + 3]
        assert read("a", fork, lost[-1]) == [(v, f"lost{n}") for n, v in enumerate(lost)]
        kill_9(primary)
        # Promoted while still cut off, as in the test above.
        standby.pg_ctl("-w", "promote")
        set_link(namespaces["db2"], "up")
        os.killpg(b_group, signal.SIGCONT)

        for name in replicas:
            deadline = time.monotonic() + 30
            while get(name, "/health")[0] != 200:
                assert time.monotonic() < deadline, f"{name}: no primary after the promotion"
                time.sleep(0.05)
        new = []
        for number in range(2):
            # A create, so that a retry of a write that took effect unseen adds nothing.
            key, deadline = f"new{number}", time.monotonic() + 30
            status, headers, body = write(key, {"If-None-Match": "*"})
            while status in UNKNOWN:
                assert time.monotonic() < deadline, f"{key}: {status} {body!r}"
                time.sleep(BACKOFF)
                status, headers, body = write(key, {"If-None-Match": "*"})
            if status == 412:  # an earlier try took effect
                status, headers, body = get("a", f"/get/{key}")
            assert status == 200, body
            new.append(version_of(headers))
        assert new[0] > fork + TIMELINE_GAP and new[1] == new[0] + 1
        gone = lost[-1]
        after_fork = [(v, f"new{n}") for n, v in enumerate(new)]
        # B learns of A's writes from PostgreSQL's notifications (or its listener's reconnect,
        # or its poll), which may come after A's answer: a feed answers every change of
        # another replica it has heard of (docs/api.md). Long-polls of each replica from the
        # fork, applied as a log, reach the second write with nothing else; from then on
        # each answer below is exact.
        for name in replicas:
            assert read(name, fork, new[1]) == after_fork, name

        def unknown(answer: Answer) -> bool:
            """A 410 unknown_revision in JSON: no stream began."""
            status, headers, body = answer
            media = {name.lower(): value for name, value in headers.items()}.get("content-type")
            return (
                status == 410
                and str(media).startswith("application/json")
                and json.loads(body)["error"] == "unknown_revision"
            )

        def from_fork(answer: Answer) -> bool:
            status, _, body = answer
            if status != 200:
                return False
            events = json.loads(body)
            found = [(event["revision"], event["key"]) for event in events["events"]]
            return found == after_fork and events["next"] == new[1] and not events["more"]

        resume_at_gone = {"Accept": "text/event-stream", "Last-Event-ID": str(gone)}
        for name in replicas:
            for timeout in (0, 1):
                answer = get(name, f"/changes?since={gone}&timeout={timeout}")
                assert unknown(answer), (name, timeout, answer)
                answer = get(name, f"/changes?since={fork}&timeout={timeout}")
                assert from_fork(answer), (name, timeout, answer)
            answer = get(name, "/changes", resume_at_gone)
            assert unknown(answer), (name, "sse", answer)

        # The same of B with the new primary frozen: a read of the store would wait
        # KV_POSTGRES_TIMEOUT and answer 503, so whatever is not a 503 is B's tail's answer.
        # The tail is trusted until a refresh of it fails, a KV_POSTGRES_TIMEOUT after the
        # freeze at the soonest. A 503 means that it was not trusted then (the first
        # refresh after B went on can fail, on a connection to the dead primary; the next
        # is half a second later), and the check is made again.
        frozen: list[Answer] = []  # every answer B gave with the new primary frozen

        def from_tail(path: str, headers: Optional[dict[str, str]] = None) -> Answer:
            deadline = time.monotonic() + 30
            while True:
                standby.freeze()
                try:
                    frozen.append(get("b", path, headers))
                finally:
                    standby.thaw()
                if frozen[-1][0] not in UNKNOWN:
                    return frozen[-1]
                assert time.monotonic() < deadline, "B's tail never answered"
                time.sleep(1)

        assert unknown(from_tail(f"/changes?since={gone}&timeout=1"))
        assert unknown(from_tail("/changes", resume_at_gone))
        assert from_fork(from_tail(f"/changes?since={fork}&timeout=1"))
        print(  # the figures docs/high-availability.md quotes (pytest -s shows them)
            f"asleep through a failover: forked at {fork}, lost up to {gone}, new from"
            f" {new[0]}; B's answers with it frozen: {[answer[0] for answer in frozen]}"
        )
        for replica in replicas.values():
            assert "event_loop_error" not in replica.stdout(), replica.stdout()[-3000:]
            assert "never retrieved" not in replica.stdout() + replica.stderr()
