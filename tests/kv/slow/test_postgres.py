"""The PostgreSQL store with real server processes: replicas sharing one database, seeding
once, faults of a replica and of the database, startup without it, and hosts that share
nothing but a network (network namespaces, when run as root)."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from ..e2e_support import LOOPBACK_V4, Response, Server, ServerPool, free_port, write_input_db
from ..postgres_support import PASSWORD, PostgresCluster, server_binaries, wait_until_down

JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def database(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh database of the test cluster, which every replica of a test shares."""
    return postgres_cluster.url(postgres_cluster.create_database())


def on_postgres(url: str, **extra: str) -> dict[str, Optional[str]]:
    return {"KV_STORE": "postgres", "KV_POSTGRES_URL": url, **extra}


def set_value(server: Server, key: str, val: str, **headers: str) -> Response:
    body = json.dumps({"key": key, "val": val}).encode()
    return server.request("POST", "/set", body, {**JSON_HEADERS, **headers})


def get_value(server: Server, key: str, host: str = LOOPBACK_V4) -> Optional[str]:
    answer = server.request("GET", "/get/" + quote(key, safe=""), host=host)
    if answer.status == 404:
        return None
    assert answer.status == 200, answer.body
    return str(json.loads(answer.body)["val"])


def assert_no_secret(server: Server) -> None:
    output = server.stdout() + server.stderr()
    assert PASSWORD not in output and quote(PASSWORD, safe="") not in output


# --- replicas -------------------------------------------------------------------------------


def test_a_write_acknowledged_by_one_replica_is_read_from_the_other_at_once(
    servers: ServerPool, database: str
) -> None:
    first = servers.start(env=on_postgres(database))
    second = servers.start(env=on_postgres(database))
    for number in range(40):
        writer, reader = (first, second) if number % 2 else (second, first)
        assert set_value(writer, f"k{number}", f"v{number}").status == 200
        assert get_value(reader, f"k{number}") == f"v{number}"
    config = json.loads(first.request("GET", "/config").body)
    assert config["store"] == "postgres" and config["postgres_url"] == "**********"
    for server in (first, second):
        assert server.stop() == 0
        assert_no_secret(server)


def test_the_compare_and_set_race_across_two_replicas_comes_out_exact(
    servers: ServerPool, database: str
) -> None:
    replicas = [servers.start(env=on_postgres(database)) for _ in range(2)]
    assert set_value(replicas[0], "counter", "0").status == 200
    clients, increments = 8, 20
    failures: list[str] = []
    conflicts = [0]

    def increment(number: int) -> None:
        try:
            for attempt in range(increments):
                while True:
                    # Read from one replica, write through the other.
                    reader = replicas[(number + attempt) % 2]
                    writer = replicas[(number + attempt + 1) % 2]
                    answer = reader.request("GET", "/get/counter")
                    value = int(json.loads(answer.body)["val"])
                    written = set_value(
                        writer, "counter", str(value + 1), **{"If-Match": answer.headers["ETag"]}
                    )
                    if written.status == 200:
                        break
                    assert written.status == 412, written.body
                    conflicts[0] += 1
        except Exception as error:  # reported by the main thread
            failures.append(repr(error))

    threads = [threading.Thread(target=increment, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not failures, failures
    assert get_value(replicas[1], "counter") == str(clients * increments)
    assert conflicts[0] > 0


def test_replicas_starting_together_seed_once_and_open_after_it(
    servers: ServerPool, database: str, tmp_path: Path
) -> None:
    seed = write_input_db(tmp_path / "input.db", [(f"seeded:{n}", str(n)) for n in range(20_000)])
    replicas = [
        servers.spawn(port=free_port(), input_db=seed, env=on_postgres(database)) for _ in range(3)
    ]
    for replica in replicas:
        replica.wait_ready()
    events = [replica.log_events() for replica in replicas]
    applied = [[event for event in log if event["event"] == "seed_applied"] for log in events]
    assert sorted(len(found) for found in applied) == [0, 0, 1]
    [applied_event] = [found[0] for found in applied if found]
    assert applied_event["rows_applied"] == 20_000
    # The others waited for it: each found the seed's fingerprint committed (seed_unchanged)
    # before it opened its port.
    for log in events:
        names = [event["event"] for event in log]
        seeded = names.index("seed_applied" if "seed_applied" in names else "seed_unchanged")
        assert seeded < names.index("listening"), names
    for replica in replicas:
        assert get_value(replica, "seeded:19999") == "19999"


# --- faults ---------------------------------------------------------------------------------


class TolerantWriter(threading.Thread):
    """Sequential writes of increasing numbers to its own keys, carrying on through errors:
    what was acknowledged, and the highest number attempted."""

    def __init__(self, server: Server, keys: list[str], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.server, self.keys, self.stop = server, keys, stop
        self.acked: dict[str, int] = {}
        self.attempted: dict[str, int] = {}
        self.statuses: dict[int, int] = {}

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            for key in self.keys:
                self.attempted[key] = number
                try:
                    status = set_value(self.server, key, str(number)).status
                except (OSError, http.client.HTTPException):
                    status = 0
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    self.acked[key] = number
            number += 1


def check_writes(writers: list[TolerantWriter], reader: Server) -> list[str]:
    """Every key holds its last acknowledged number, or a later one that was attempted."""
    problems = []
    for writer in writers:
        for key in writer.keys:
            value = get_value(reader, key)
            acked, attempted = writer.acked.get(key), writer.attempted.get(key, -1)
            if value is None:
                if acked is not None:
                    problems.append(f"{key}: lost; acknowledged {acked}")
            elif not (acked if acked is not None else 0) <= int(value) <= attempted:
                problems.append(f"{key}: {value}; acknowledged {acked}, attempted {attempted}")
    return problems


def test_kill_9_of_a_replica_loses_no_acknowledged_write(
    servers: ServerPool, database: str
) -> None:
    victim = servers.start(env=on_postgres(database))
    survivor = servers.start(env=on_postgres(database))
    stop = threading.Event()
    writers = [TolerantWriter(victim, [f"w{n}-k{i}" for i in range(3)], stop) for n in range(8)]
    for writer in writers:
        writer.start()
    time.sleep(random.uniform(1.0, 2.0))
    victim.kill()
    stop.set()
    for writer in writers:
        writer.join(timeout=10)
    assert sum(len(writer.acked) for writer in writers) == 24, "too few writes to test"
    assert check_writes(writers, survivor) == []


def poll_health(server: Server, stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        try:
            seen.append(server.request("GET", "/health").status)
        except (OSError, http.client.HTTPException):
            seen.append(0)
        time.sleep(0.05)


def test_a_database_restart_under_load_loses_nothing_acknowledged(
    servers: ServerPool, postgres_cluster: PostgresCluster, database: str
) -> None:
    replica = servers.start(env=on_postgres(database))
    stop, health_stop = threading.Event(), threading.Event()
    writers = [TolerantWriter(replica, [f"w{n}-k{i}" for i in range(3)], stop) for n in range(8)]
    health: list[int] = []
    poller = threading.Thread(target=poll_health, args=(replica, health_stop, health))
    for thread in [*writers, poller]:
        thread.start()
    time.sleep(1.0)
    postgres_cluster.stop("fast")
    time.sleep(1.5)  # an outage long enough to be seen
    postgres_cluster.start()
    recovered_by = time.monotonic() + 5
    while time.monotonic() < recovered_by and replica.request("GET", "/health").status != 200:
        time.sleep(0.1)
    time.sleep(1.0)  # writes after the recovery
    stop.set()
    health_stop.set()
    for thread in [*writers, poller]:
        thread.join(timeout=15)
    assert replica.running, "the replica must ride the outage out, not exit"
    assert 503 in health and health[-1] == 200, health
    statuses = {status for writer in writers for status in writer.statuses}
    assert statuses <= {200, 503}, statuses  # a failed write is a 503, never a 200 or a hang
    assert 503 in statuses
    assert check_writes(writers, replica) == []
    assert_no_secret(replica)


def test_a_database_gone_while_serving_gets_prompt_503s_and_comes_back(
    servers: ServerPool, postgres_cluster: PostgresCluster, database: str
) -> None:
    replica = servers.start(env=on_postgres(database))
    assert set_value(replica, "before", "v").status == 200
    postgres_cluster.stop("immediate")
    wait_until_down(postgres_cluster)
    try:
        for method, path, body in (
            ("GET", "/health", None),
            ("GET", "/get/before", None),
            ("POST", "/set", json.dumps({"key": "during", "val": "v"}).encode()),
            ("GET", "/keys", None),
        ):
            started = time.monotonic()
            answer = replica.request(method, path, body)
            assert time.monotonic() - started < 2.5, (method, path)
            assert answer.status == 503, (method, path, answer.body)
            assert json.loads(answer.body)["error"] == "store_unavailable"
    finally:
        postgres_cluster.start()
    started = time.monotonic()
    while replica.request("GET", "/health").status != 200:
        assert time.monotonic() - started < 5, "the pool did not recover within 5 s"
        time.sleep(0.1)
    assert set_value(replica, "after", "v").status == 200
    assert get_value(replica, "before") == "v" and get_value(replica, "during") is None


def test_an_unreachable_database_at_startup_is_retried_then_exit_1(servers: ServerPool) -> None:
    url = f"postgresql://kv:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/kv"
    server = servers.spawn(port=free_port(), env=on_postgres(url, KV_POSTGRES_STARTUP_WAIT="2"))
    assert server.wait_exit(timeout=20) == 1
    attempts = [event for event in server.log_events() if event["event"] == "postgres_unreachable"]
    assert len(attempts) >= 2
    assert [event["attempt"] for event in attempts] == list(range(1, len(attempts) + 1))
    stderr = server.stderr().strip()
    assert len(stderr.splitlines()) == 1 and "did not answer within 2 s" in stderr
    assert "kv:***@127.0.0.1" in stderr
    assert_no_secret(server)


# --- across hosts ---------------------------------------------------------------------------

# Every test that makes hosts claims a number of its own for its /24 and its bridge, so that
# tests at once (xdist's workers, a developer's run beside CI's) never route to each other's
# bridges. The claim is an flock, which the kernel drops if the test's process dies.
NETWORK_CLAIMS = Path(tempfile.gettempdir()) / "kv-test-networks"
NETWORKS = 250


@contextlib.contextmanager
def claimed_network() -> Iterator[int]:
    """A number below NETWORKS that no other test on this machine holds until we leave."""
    NETWORK_CLAIMS.mkdir(exist_ok=True)
    for number in range(NETWORKS):
        with open(NETWORK_CLAIMS / f"{number}.lock", "w") as claim:
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield number
            return
    raise RuntimeError(f"all {NETWORKS} test networks are in use")


@contextlib.contextmanager
def hosts(names: list[str]) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """One network namespace per name, each joined by a veth pair to a bridge that this
    namespace (the test's) is on too: ({name: namespace}, {name: address})."""
    with claimed_network() as number:
        network, bridge = f"10.77.{number}", f"kvbr{number}"
        namespaces = {name: f"{bridge}-{name}" for name in names}
        addresses = {name: f"{network}.{index + 1}" for index, name in enumerate(names)}

        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True)

        def remove() -> None:
            for namespace in namespaces.values():
                subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True)

        remove()  # what a test killed while it held this number left behind
        try:
            ip("link", "add", bridge, "type", "bridge")
            ip("addr", "add", f"{network}.254/24", "dev", bridge)
            ip("link", "set", bridge, "up")
            for index, name in enumerate(names):
                namespace = namespaces[name]
                outside, inside = f"{bridge}o{index}", f"{bridge}i{index}"
                ip("netns", "add", namespace)
                ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                ip("link", "set", outside, "master", bridge)
                ip("link", "set", outside, "up")
                ip("link", "set", inside, "netns", namespace)
                ip("-n", namespace, "addr", "add", f"{addresses[name]}/24", "dev", inside)
                ip("-n", namespace, "link", "set", inside, "up")
                ip("-n", namespace, "link", "set", "lo", "up")
            yield namespaces, addresses
        finally:
            remove()


def hosts_and_postgres() -> Path:
    """PostgreSQL's server binaries, for a test of hosts in network namespaces; it skips
    without them, or without root and iproute2 (CI has all three)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return bindir


def test_replicas_on_other_hosts_share_nothing_but_the_network(tmp_path: Path) -> None:
    bindir = hosts_and_postgres()
    with hosts(["db", "a", "b"]) as (namespaces, addresses):
        cluster = PostgresCluster(bindir, host=addresses["db"])
        cluster.run_as = ["ip", "netns", "exec", namespaces["db"], *cluster.run_as]
        pools = {
            name: ServerPool(tmp_path / name, launcher=["ip", "netns", "exec", namespaces[name]])
            for name in ("a", "b")
        }
        try:
            cluster.start()
            url = cluster.url(cluster.create_database())
            port = free_port()
            a, b = (
                pools[name].start(
                    "--host", addresses[name], port=port, env=on_postgres(url), host=addresses[name]
                )
                for name in ("a", "b")
            )
            for number in range(20):
                body = json.dumps({"key": f"k{number}", "val": f"v{number}"}).encode()
                written = a.request("POST", "/set", body, JSON_HEADERS, host=addresses["a"])
                assert written.status == 200, written.body
                assert get_value(b, f"k{number}", host=addresses["b"]) == f"v{number}"
        finally:
            for pool in pools.values():
                pool.close()
            cluster.remove()
