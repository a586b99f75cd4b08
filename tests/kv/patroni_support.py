"""A throwaway Patroni cluster for the slow tests: one etcd and Patroni nodes, each with a
PostgreSQL of its own that Patroni bootstraps, on loopback and free ports, in one temporary
directory, run by the unprivileged ``postgres`` user when the tests run as root (Patroni and
PostgreSQL refuse root), and every process of it killed and the directory removed afterwards.

Needs Debian's ``patroni`` (3.0) and ``etcd-server`` (3.4) besides PostgreSQL's server
binaries; without them the tests that need it skip, and CI, which installs them, fails on any
skip. Patroni 3.0 speaks etcd's v3 API through etcd's own JSON gateway (``etcd3`` in its
configuration, no gRPC library needed), so etcd runs without its deprecated v2 API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .e2e_support import LOOPBACK_V4, accepts_connections, free_port
from .postgres_support import PASSWORD, SUPERUSER, connection_url, server_binaries

READY_TIMEOUT = 60.0
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "r3plic@tion:pw"


@dataclass(frozen=True)
class Timing:
    """Patroni's three clocks (``bootstrap.dcs``), in seconds."""

    # How long the leader's lock outlives its last renewal: a dead leader's lock is gone, and
    # a standby may take it, at most this long after the leader died.
    ttl: int = 30
    # The pause between two runs of each node's loop: the leader renews its lock once a loop.
    loop_wait: int = 10
    # How long a call to etcd or PostgreSQL is retried before the node gives up on it; a
    # leader that cannot renew its lock for this long demotes itself.
    retry_timeout: int = 10


def missing_tools() -> list[str]:
    """The Debian packages this module needs that are not installed."""
    missing = []
    if server_binaries() is None:
        missing.append("postgresql")
    if shutil.which("patroni") is None:
        missing.append("patroni")
    if shutil.which("etcd") is None:
        missing.append("etcd-server")
    return missing


def run_as_postgres(root: Path) -> tuple[list[str], Optional[pwd.struct_passwd]]:
    """The command prefix that drops root for the ``postgres`` user (none when not root), and
    that user, who is given ``root``."""
    if os.geteuid() != 0:
        return [], None
    user = pwd.getpwnam("postgres")
    os.chown(root, user.pw_uid, user.pw_gid)
    root.chmod(0o700)
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return prefix, user


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL process (and not another that took its pid since)."""
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "postgres"
    except OSError:
        return False


def postgres_pids() -> list[int]:
    """Every PostgreSQL process of this machine."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(ValueError):
            if is_postgres(int(entry.name)):
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_9(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


class Daemon:
    """A long-running process of the cluster, in a session of its own, its output in a file."""

    def __init__(self, command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL its session and reap it; only while it is not reaped, as its pid, which
        names its process group, may name another process's afterwards."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


class PatroniNode:
    """One member: a Patroni, and the PostgreSQL it runs in ``data``."""

    def __init__(self, name: str, root: Path, etcd_host: str, timing: Timing) -> None:
        self.name = name
        self.root = root
        self.data = root / "data"
        self.pg_port = free_port()
        self.api_port = free_port()
        self.config = root / "patroni.json"
        self.patroni: Optional[Daemon] = None
        self.orphans: list[int] = []  # the children of a postmaster killed alone
        bindir = server_binaries()
        assert bindir is not None
        self.bindir = bindir
        # JSON is YAML, so the configuration needs no YAML writer.
        self.config.write_text(json.dumps(self._configuration(etcd_host, timing), indent=2))

    def _configuration(self, etcd_host: str, timing: Timing) -> dict[str, Any]:
        loopback = LOOPBACK_V4
        return {
            "scope": "kv",
            "name": self.name,
            "restapi": {
                "listen": f"{loopback}:{self.api_port}",
                "connect_address": f"{loopback}:{self.api_port}",
            },
            "etcd3": {"host": etcd_host, "protocol": "http"},
            "bootstrap": {
                # Written to etcd by the node that bootstraps the cluster; every node runs
                # by it from then on.
                "dcs": {
                    "ttl": timing.ttl,
                    "loop_wait": timing.loop_wait,
                    "retry_timeout": timing.retry_timeout,
                    # The leader's commits wait for one standby, which Patroni names in
                    # synchronous_standby_names; only that standby may be promoted. Not
                    # strict: with the standby gone, the leader writes alone again.
                    "synchronous_mode": True,
                    "synchronous_mode_strict": False,
                    "postgresql": {
                        "use_pg_rewind": False,
                        "use_slots": True,
                        "parameters": {"max_connections": 300},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{loopback}:{self.pg_port}",
                "connect_address": f"{loopback}:{self.pg_port}",
                "data_dir": str(self.data),
                "bin_dir": str(self.bindir),
                "pgpass": str(self.root / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": PASSWORD},
                    "replication": {
                        "username": REPLICATION_USER,
                        "password": REPLICATION_PASSWORD,
                    },
                },
                "parameters": {
                    "unix_socket_directories": str(self.root),
                    # The tests' writes need not survive this machine's power loss; the
                    # server's commits, and the standby's acknowledgements, are still
                    # synchronous as far as the server knows.
                    "fsync": "off",
                    "full_page_writes": "off",
                    # The server's own log, with times to the millisecond.
                    "logging_collector": "on",
                    "log_directory": str(self.root / "log"),
                    "log_filename": "postgresql.log",
                    "log_line_prefix": "%m [%p] ",
                },
                "pg_hba": [
                    "local all all trust",
                    f"host all all {loopback}/32 scram-sha-256",
                    f"host replication {REPLICATION_USER} {loopback}/32 scram-sha-256",
                ],
            },
            # No /dev/watchdog here; a real deployment wants one (it fences a hung leader).
            "watchdog": {"mode": "off"},
        }

    def start(self, run_as: list[str]) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.root),
        }
        self.patroni = Daemon(
            [*run_as, "patroni", str(self.config)], self.root / "patroni.log", self.root, env
        )

    def api(self, path: str, timeout: float = 1.0) -> tuple[int, dict[str, Any]]:
        """GET ``path`` of the node's REST API: (status, JSON body); (0, {}) without answer."""
        connection = http.client.HTTPConnection(LOOPBACK_V4, self.api_port, timeout=timeout)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            body = answer.read()
            return answer.status, json.loads(body) if body else {}
        except (OSError, http.client.HTTPException, ValueError):
            return 0, {}
        finally:
            connection.close()

    def postmaster(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def postgres_processes(self) -> list[int]:
        """The postmaster's pid and its children's, if it runs. Patroni starts it in a
        session of its own, so killing Patroni's leaves it running."""
        postmaster = self.postmaster()
        if postmaster is None or not alive(postmaster):
            # One still starting has no postmaster.pid yet: found by its command line.
            postmaster = next(
                (pid for pid in postgres_pids() if str(self.data) in command_line(pid)), None
            )
        if postmaster is None:
            return []
        return [postmaster, *children_of(postmaster)]

    def kill_postmaster(self) -> list[int]:
        """SIGKILL the postmaster alone; its children notice its death and exit by
        themselves (each checks for it while it waits). The pids of all of them."""
        processes = self.postgres_processes()
        if processes:
            kill_9(processes[:1])
            self.orphans += processes[1:]
        return processes

    def kill_postgres(self) -> list[int]:
        """SIGKILL the postmaster and every child of it, and what is left of the children of
        a postmaster killed before; the pids."""
        processes = self.postgres_processes()
        processes += [pid for pid in self.orphans if alive(pid) and is_postgres(pid)]
        kill_9(processes)
        return processes

    def server_log(self) -> str:
        path = self.root / "log" / "postgresql.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self) -> str:
        patroni = self.patroni.output()[-4000:] if self.patroni else ""
        return f"--- {self.name}: patroni\n{patroni}\n--- postgres\n{self.server_log()[-4000:]}"


class PatroniCluster:
    """An etcd and Patroni nodes; ``close`` kills every process and removes every file."""

    def __init__(self, names: Sequence[str], timing: Timing) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kv-patroni-"))
        self.run_as, user = run_as_postgres(self.root)
        self.etcd_client_port, self.etcd_peer_port = free_port(), free_port()
        self.etcd_url = f"http://{LOOPBACK_V4}:{self.etcd_client_port}"
        self.etcd: Optional[Daemon] = None
        self.nodes: dict[str, PatroniNode] = {}
        for name in names:
            directory = self.root / name
            directory.mkdir(mode=0o700)
            (directory / "log").mkdir(mode=0o700)
            self.nodes[name] = PatroniNode(
                name, directory, f"{LOOPBACK_V4}:{self.etcd_client_port}", timing
            )
        if user is not None:
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> None:
        """etcd, then every node at once: the first to take the cluster's initialize key
        bootstraps it, and the others copy it (pg_basebackup) and stream from it."""
        peer = f"http://{LOOPBACK_V4}:{self.etcd_peer_port}"
        data = self.root / "etcd"
        self.etcd = Daemon(
            [
                *self.run_as, "etcd", "--name", "etcd1", "--data-dir", str(data),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd1={peer}", "--initial-cluster-state", "new",
                "--log-level", "warn", "--logger", "zap",
            ],
            self.root / "etcd.log",
            self.root,
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)},
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while not accepts_connections(LOOPBACK_V4, self.etcd_client_port):
            assert self.etcd.running(), self.etcd.output()
            assert time.monotonic() < deadline, "etcd never listened\n" + self.etcd.output()
            time.sleep(0.05)
        for node in self.nodes.values():
            node.start(self.run_as)

    def leader(self) -> Optional[PatroniNode]:
        """The node whose REST API says it holds the leader lock and runs a primary."""
        for node in self.nodes.values():
            if node.api("/primary")[0] == 200:
                return node
        return None

    def wait_until_synchronous(self, timeout: float = READY_TIMEOUT) -> PatroniNode:
        """Until a leader runs and another node is its synchronous standby, both as Patroni
        sees it (the standby named in etcd, so that it alone may be promoted) and as the
        server does (pg_stat_replication says 'sync'); the leader."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None:
                members = leader.api("/cluster")[1].get("members", [])
                with contextlib.suppress(RuntimeError):
                    if any(
                        member.get("role") == "sync_standby" for member in members
                    ) and "sync" in self.psql(leader, "SELECT sync_state FROM pg_stat_replication"):
                        return leader
            for node in self.nodes.values():
                assert node.patroni is not None and node.patroni.running(), node.describe()
            assert time.monotonic() < deadline, "no synchronous pair\n" + self.describe()
            time.sleep(0.1)

    def psql(self, node: PatroniNode, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` on ``node``'s server through its socket; its output (tuples only)."""
        result = subprocess.run(
            [
                *self.run_as, str(node.bindir / "psql"), "-h", str(node.root),
                "-p", str(node.pg_port), "-U", SUPERUSER, "-d", database, "-Atqc", sql,
            ],
            capture_output=True, text=True, timeout=30, cwd=str(node.root),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {node.name}:\n{result.stderr}")
        return result.stdout.strip()

    def url(self, database: str) -> str:
        """The URL the service is given: every node, the one that can write taken."""
        hosts = ",".join(f"{LOOPBACK_V4}:{node.pg_port}" for node in self.nodes.values())
        return connection_url(hosts, database, target_session_attrs="read-write")

    def describe(self) -> str:
        etcd = self.etcd.output()[-2000:] if self.etcd else ""
        return "\n".join([*(node.describe() for node in self.nodes.values()), "--- etcd", etcd])

    def close(self) -> None:
        """Kill every process: each Patroni first (so that none starts a server again), then
        each server and its children, then etcd; and remove the directory."""
        killed: list[int] = []
        for node in self.nodes.values():
            if node.patroni is not None:
                with contextlib.suppress(Exception):  # keep killing the others
                    node.patroni.kill()
        for node in self.nodes.values():
            killed += node.kill_postgres()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.kill()
        wait_until_gone(killed)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def patroni_cluster(names: Sequence[str], timing: Timing) -> Iterator[PatroniCluster]:
    """A started cluster of ``names``, stopped and removed on the way out, however it ends."""
    cluster = PatroniCluster(names, timing)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
