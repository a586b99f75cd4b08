"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, started on a
free port, run by an unprivileged user (``postgres`` when the tests run as root, as PostgreSQL
refuses to run as root), and removed afterwards; and PgBouncer in front of one, run the same way.

Needs PostgreSQL's server binaries (Debian: ``apt-get install postgresql``), and PgBouncer for
the pooler's tests (``apt-get install pgbouncer``); without them the tests that need them
skip, and CI, which installs them, fails on any skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from .e2e_support import accepts_connections, free_port

SUPERUSER = "kv_admin"
# A password with characters a URL must escape: the tests check that it never leaks.
PASSWORD = "s3cret/p@ss:word"
READY_TIMEOUT = 60.0


def server_binaries() -> Optional[Path]:
    """The directory of initdb and pg_ctl: Debian's versioned one, else PATH's."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("pg_ctl")
    return None if found is None else Path(found).parent


def pgbouncer_binary() -> Optional[Path]:
    """PgBouncer's executable: PATH's, else Debian's (in /usr/sbin, which a user's PATH lacks)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    return None if found is None else Path(found)


def connection_url(hosts: str, database: str, **query: str) -> str:
    """The test user's URL for ``database`` at ``hosts`` ("host:port", or several of them
    joined by commas, which libpq tries in turn), with ``query`` parameters."""
    base = f"postgresql://{SUPERUSER}:{quote(PASSWORD, safe='')}@{hosts}"
    suffix = "&".join(f"{name}={quote(value, safe='')}" for name, value in query.items())
    return f"{base}/{database}" + (f"?{suffix}" if suffix else "")


def unprivileged_prefix(root: Path) -> list[str]:
    """What runs a command as ``postgres`` when the tests run as root (PostgreSQL and PgBouncer
    both refuse to run as root), with ``root`` made that user's; nothing otherwise."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam("postgres")
    os.chown(root, user.pw_uid, user.pw_gid)
    root.chmod(0o700)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


class PostgresCluster:
    """One cluster: ``start``, ``stop``, ``restart``, ``url``, ``create_schema``."""

    def __init__(
        self,
        bindir: Path,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        durable: bool = False,
        standby_of: Optional[PostgresCluster] = None,
    ) -> None:
        """A new cluster; with ``standby_of``, a streaming standby of that (running) one,
        made from its base backup: read-only, in recovery, until promoted."""
        self.bindir = bindir
        self.host = host
        self.port = port or free_port()
        self.durable = durable  # fsync on, as a real server's: for benchmarks
        self.root = Path(tempfile.mkdtemp(prefix="kv-postgres-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.run_as = unprivileged_prefix(self.root)
        if standby_of is None:
            self._initdb()
        else:
            self._base_backup(standby_of)

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.run_as, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.root),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def _initdb(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD)
        if self.run_as:
            user = pwd.getpwnam("postgres")
            os.chown(password_file, user.pw_uid, user.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={password_file}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nmax_connections = 300\n"
            )
            if not self.durable:
                # The tests' writes need not survive this machine's power loss; the server's
                # commits are still synchronous as far as the server knows.
                conf.write("fsync = off\nfull_page_writes = off\n")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")

    def _base_backup(self, primary: PostgresCluster) -> None:
        self._run(
            str(self.bindir / "pg_basebackup"), "-h", str(primary.root), "-p", str(primary.port),
            "-U", SUPERUSER, "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:  # the last setting wins
            conf.write(
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
            )

    def processes(self) -> list[int]:
        """The postmaster's pid and its children's."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
                if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP): its connections stay open and its
        port accepts, but nothing answers, as with a server cut off by a partition."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def pg_ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args)

    def start(self) -> None:
        self.pg_ctl("-w", "-t", str(int(READY_TIMEOUT)), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "restart")

    def url(self, database: str = "postgres", **query: str) -> str:
        return connection_url(f"{self.host}:{self.port}", database, **query)

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = self._run(
            str(self.bindir / "psql"), "-h", str(self.root), "-p", str(self.port),
            "-U", SUPERUSER, "-d", database, "-Atqc", sql,
        )  # fmt: skip
        return result.stdout.strip()

    def load(self, script: Path, database: str) -> None:
        """Run the SQL script (a pg_dump) in ``database``, stopping at its first error."""
        self._run(
            str(self.bindir / "psql"), "-h", str(self.root), "-p", str(self.port),
            "-U", SUPERUSER, "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(script),
        )  # fmt: skip

    def create_database(self) -> str:
        """A new, empty database; its name."""
        name = f"kv_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def create_schema(self) -> str:
        """A new, empty schema in the ``postgres`` database: a cheaper fresh start than a
        database. A URL with ``search_path`` set to it puts the store's tables there."""
        name = f"kv_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE SCHEMA {name}")
        return name

    def remove(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a frozen server could not stop
            self.thaw()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until_down(cluster: PostgresCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((cluster.host, cluster.port), timeout=0.5):
                pass
        except OSError:
            return
        time.sleep(0.1)


class PgBouncer:
    """PgBouncer in front of a running cluster: ``start``, ``url``, ``stop``, ``remove``.

    It listens on a free loopback port; clients authenticate with the cluster's user and
    password (scram-sha-256, the password in a userlist file), and any database name reaches
    the cluster's database of that name (``*`` in ``[databases]``). PgBouncer refuses startup
    parameters it does not know, ``search_path`` among them: a store of its own through it is
    a database of its own (``cluster.create_database()``), not a schema.
    """

    def __init__(
        self,
        cluster: PostgresCluster,
        pool_mode: str = "transaction",
        pool_size: int = 20,
        server_idle_timeout: int = 5,
    ) -> None:
        """``pool_size`` server connections at most per database; a server connection idle
        for ``server_idle_timeout`` seconds is closed (a suite that makes a database per test
        would otherwise keep every old database's connections and run out of the cluster's)."""
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
        self.binary = binary
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.host = "127.0.0.1"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kv-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        self.config = self.root / "pgbouncer.ini"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.run_as = unprivileged_prefix(self.root)
        userlist = self.root / "userlist.txt"
        userlist.write_text(f'"{SUPERUSER}" "{PASSWORD}"\n')
        self.config.write_text(
            "[databases]\n"
            f"* = host={cluster.host} port={cluster.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
            f"max_client_conn = 2000\nserver_idle_timeout = {server_idle_timeout}\n"
            f"logfile = {self.log}\nlog_connections = 0\nlog_disconnections = 0\n"
        )
        if self.run_as:
            user = pwd.getpwnam("postgres")
            for path in (userlist, self.config):
                os.chown(path, user.pw_uid, user.pw_gid)
                path.chmod(0o600)

    def start(self) -> None:
        """Start it and return once its port accepts connections."""
        self.process = subprocess.Popen(
            [*self.run_as, str(self.binary), str(self.config)],
            cwd=str(self.root),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if accepts_connections(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer not listening after {READY_TIMEOUT} s")
            time.sleep(0.02)

    def url(self, database: str = "postgres", **query: str) -> str:
        """The cluster's URL for ``database``, through PgBouncer."""
        return connection_url(f"{self.host}:{self.port}", database, **query)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """An immediate shutdown (SIGTERM; SIGKILL if it lingers): clients are cut off."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def remove(self) -> None:
        """Stop it, whatever state it is in, and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
