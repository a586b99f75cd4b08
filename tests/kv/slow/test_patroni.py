"""A failover under Patroni, as docs/high-availability.md recommends running PostgreSQL: one
etcd and two Patroni nodes in synchronous mode on loopback, bootstrapped by Patroni, and two
replicas of the service (real processes) on one URL naming both nodes' servers
(target_session_attrs=read-write).

Writers and a compare-and-set counter run on both replicas, and a follower of the change feed
on each; then the leader's node dies (its Patroni killed -9, then its postmaster, whose
children exit when they see it gone), and the surviving Patroni promotes its standby by itself
once the dead leader's lock expires. No acknowledged write is lost, nothing is acknowledged
while no server can write, both replicas write again soon after the promotion, each follower
holds every change once, and neither replica logs an error nobody retrieved."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ..e2e_support import Server, ServerPool
from ..linearizability import LOST, check
from ..patroni_support import (
    PatroniCluster,
    PatroniNode,
    Timing,
    alive,
    missing_tools,
    patroni_cluster,
)
from ..watch_support import Follower
from .test_postgres import on_postgres
from .test_postgres_failover import Client, Load, increment, request, version_of, write_keys

# Patroni's clocks, short for a test. A dead leader's lock lasts `ttl` after its last
# renewal, so the promotion comes 4.5 to 5.5 s after the kill here (etcd revokes expired
# leases every half second). Patroni's rule for safe values: loop_wait + 2 * retry_timeout
# <= ttl. (Patroni 3.0.2 takes them as given; later releases raise ttl to 20 at least.)
TIMING = Timing(
    # The shortest ttl the rule allows with the two values below.
    ttl=5,
    # The leader renews its lock every second (the least Patroni documents): its lock outlives
    # it by 4 to 5 s.
    loop_wait=1,
    # A leader that cannot reach etcd or its server within this demotes itself: a failover
    # nobody caused. On a busy 2-core machine a call can stall for a second; two leave a
    # margin without lengthening ttl much.
    retry_timeout=2,
)
# How soon after the promotion both replicas must write again (the bound).
RECOVERY_BOUND = 10.0
# What a replica's request waits on a silent connection (as in test_postgres_failover.py).
POSTGRES_TIMEOUT = 1.0
# How long the surviving node may take to be promoted: ttl, a loop, and slack for a busy
# machine; a failure here is Patroni's, and the message shows its log.
PROMOTION_TIMEOUT = 30.0


def changes_since(server: Server, since: int) -> list[dict[str, Any]]:
    """Every change after ``since`` as the store holds it, by polls: the history the
    followers' logs must equal."""
    events: list[dict[str, Any]] = []
    while True:
        status, _, body = request(
            server, "127.0.0.1", "GET", f"/changes?since={since}&timeout=0&limit=1000"
        )
        assert status == 200, body
        answer = json.loads(body)
        events += answer["events"]
        since = answer["next"]
        if not answer["more"]:
            return events


def wait_for_promotion(survivor: PatroniNode, cluster: PatroniCluster) -> tuple[float, float]:
    """Poll the survivor's REST API (its role is the server's own pg_is_in_recovery) until it
    runs a primary: (the start of the last poll that found it a standby, the end of the first
    that found it a primary). The promotion happened between the two."""
    last_standby = time.monotonic()
    deadline = last_standby + PROMOTION_TIMEOUT
    while True:
        asked = time.monotonic()
        role = survivor.api("/patroni", timeout=0.5)[1].get("role")
        if role in ("master", "primary"):
            return last_standby, time.monotonic()
        if role == "replica":
            last_standby = asked
        assert time.monotonic() < deadline, "no promotion\n" + cluster.describe()
        time.sleep(0.02)


def probe(client: Client, name: str, first_write: dict[str, float], stop: threading.Event) -> None:
    """Write until a write is acknowledged: when its answer came, in ``first_write``."""
    number = 0
    while not stop.is_set():
        status = client.set(f"probe/{name}", str(number))[0]
        if status == 200:
            first_write[name] = time.monotonic()
            return
        number += 1
        time.sleep(0.02)


def test_patroni_fails_over_under_load_and_loses_no_acknowledged_write(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs Debian packages {', '.join(missing)} (apt-get install ...)")
    with patroni_cluster(["node1", "node2"], TIMING) as cluster:
        pool = ServerPool(tmp_path / "replicas")
        followers: list[Follower] = []
        try:
            leader = cluster.wait_until_synchronous()
            [survivor] = [node for node in cluster.nodes.values() if node is not leader]
            cluster.psql(leader, "CREATE DATABASE kv")
            env = on_postgres(
                cluster.url("kv"),
                KV_POSTGRES_TIMEOUT=str(POSTGRES_TIMEOUT),
                # A stream's heartbeat: the followers notice their stop within it.
                KV_CHANGES_HEARTBEAT="0.5",
            )
            replicas = {name: pool.start(env=env) for name in ("a", "b")}
            load, stop = Load(), threading.Event()
            clients = {name: Client(replicas[name], "127.0.0.1", load) for name in replicas}
            status, headers, _ = clients["a"].set("counter", "0")
            assert status == 200
            load.history.clear()  # the counter's start is the checker's initial state
            start = version_of(headers)
            initial = {"counter": ("0", start)}
            # A follower starting on each replica, moving to the other when a stream fails.
            followers = [
                Follower([replicas["a"], replicas["b"]], since=start),
                Follower([replicas["b"], replicas["a"]], since=start),
            ]
            # No lock (create and delete) as in test_postgres_failover.py: each create
            # answered 503 through a 5 s outage may take effect at any later moment, and the
            # checker cannot follow so many branches of one key in time.
            workers = [
                threading.Thread(target=work, args=args)
                for name, client in clients.items()
                for work, args in (
                    (write_keys, (client, f"{name}1", stop)),
                    (write_keys, (client, f"{name}2", stop)),
                    (increment, (client, stop)),
                )
            ]
            for thread in [*followers, *workers]:
                thread.start()
            first_write: dict[str, float] = {}
            probes: list[threading.Thread] = []
            try:
                time.sleep(1)  # the load on the first primary: hundreds of writes
                assert cluster.leader() is leader, "a failover before the kill\n" + (
                    cluster.describe()
                )
                assert leader.patroni is not None
                leader.patroni.kill()  # SIGKILL
                server = leader.kill_postmaster()  # SIGKILL
                killed = time.monotonic()
                assert server, "the leader's server was not running"
                # Its children see the postmaster die and exit by themselves (within a tenth
                # of a second here); until then one of them could still commit a write.
                deadline = killed + 10
                while any(alive(pid) for pid in server):
                    assert time.monotonic() < deadline, "the old server's processes live on"
                    time.sleep(0.005)
                gone = time.monotonic()  # from here on nothing can commit
                probes += [
                    threading.Thread(target=probe, args=(client, name, first_write, stop))
                    for name, client in clients.items()
                ]
                for thread in probes:
                    thread.start()
                last_standby, promoted = wait_for_promotion(survivor, cluster)
                for thread in probes:
                    thread.join(timeout=RECOVERY_BOUND + 5)
                time.sleep(1)  # the load goes on, on the new primary
            finally:
                stop.set()  # the probes too, if they still run
                for thread in [*workers, *probes]:
                    thread.join(timeout=30)

            acknowledged = [op for op in load.history if isinstance(op.outcome, int)]
            # From the last sight of a standby: at most the time since the promotion.
            recovered = {name: at - last_standby for name, at in sorted(first_write.items())}
            writing = ", ".join(f"{name} {after:.2f} s" for name, after in recovered.items())
            print(  # the figures docs/high-availability.md quotes (pytest -s shows them)
                f"patroni failover: promoted {last_standby - killed:.2f} to"
                f" {promoted - killed:.2f} s after the kill; first write after it: {writing};"
                f" {len(acknowledged)} writes acknowledged,"
                f" {sum(op.outcome is LOST for op in load.history)} answers of unknown outcome"
            )
            assert load.errors == []
            assert set(recovered) == {"a", "b"}, f"{recovered}\n{cluster.describe()}"
            assert max(recovered.values()) < RECOVERY_BOUND, recovered
            # Nothing acknowledged while no server could write: no write sent after the kill
            # was answered before the survivor was last seen a standby.
            assert [
                op for op in load.acknowledged_writes() if gone < op.start and op.end < last_standby
            ] == []
            assert len(acknowledged) >= 100, "too few writes to test"
            assert not [op for op in load.history[-50:] if op.outcome is LOST], "still failing"

            # A last read of every key, then: nothing acknowledged is lost, every answer is
            # one a single copy could have given, the counter holds every acknowledged
            # increment (all of it linearizability).
            final: dict[str, tuple[str, int]] = {}
            for key in sorted({op.key for op in load.history}):
                status, headers, body = clients["b"].get(key)
                assert status in (200, 404), body
                if status == 200:
                    final[key] = (json.loads(body)["val"], version_of(headers))
            assert check(load.history, initial) == []
            for op in acknowledged:  # each key at that write's version, or at a later one
                assert isinstance(op.outcome, int)
                value, version = final.get(op.key, (None, 0))
                assert version > op.outcome or (version, value) == (op.outcome, op.value), op

            # The feed: the store's history holds every acknowledged write, with its value,
            # at its version; each follower got exactly that history, once, in order, and
            # applying it as a log to the start gives the store's final listing.
            history = changes_since(replicas["a"], start)
            assert history == changes_since(replicas["b"], start)
            in_history = {(event["revision"], event["key"], event.get("val")) for event in history}
            missed = [op for op in acknowledged if (op.outcome, op.key, op.value) not in in_history]
            assert missed == [], "acknowledged writes missing from the change feed"
            status, _, body = request(replicas["a"], "127.0.0.1", "GET", "/keys?values=true")
            assert status == 200, body
            listing = {item["key"]: item["val"] for item in json.loads(body)["items"]}
            for follower in followers:
                if history:
                    follower.wait_for(history[-1]["revision"], timeout=30)
                follower.stop()
                print(f"a follower opened {follower.connections} stream(s)")
                assert follower.changes == history, (
                    f"refused {follower.refusals}; {len(follower.changes)} changes,"
                    f" {len(history)} in the store"
                )
                state = {"counter": "0"}
                for event in follower.changes:
                    if event["type"] == "set":
                        state[event["key"]] = event["val"]
                    else:
                        state.pop(event["key"], None)
                assert state == listing
            for replica in replicas.values():
                log = replica.stdout()
                failures = [
                    line
                    for line in log.splitlines()
                    if "store_task_failed" in line or "event_loop_error" in line
                ]
                assert failures == [], "\n".join(failures)
                assert "never retrieved" not in log + replica.stderr()
        finally:
            for follower in followers:
                if follower.is_alive():
                    follower.stop()
            pool.close()
