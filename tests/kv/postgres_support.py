"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, started on a
free port, run by an unprivileged user (``postgres`` when the tests run as root, as PostgreSQL
refuses to run as root), and removed afterwards.

Needs PostgreSQL's server binaries (Debian: ``apt-get install postgresql``); without them the
tests that need it skip, and CI, which installs them, fails on any skip.
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
        self.run_as = self._unprivileged_prefix()
        if standby_of is None:
            self._initdb()
        else:
            self._base_backup(standby_of)

    def _unprivileged_prefix(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.root.chmod(0o700)
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]

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
        base = f"postgresql://{SUPERUSER}:{quote(PASSWORD, safe='')}@{self.host}:{self.port}"
        suffix = "&".join(f"{name}={quote(value, safe='')}" for name, value in query.items())
        return f"{base}/{database}" + (f"?{suffix}" if suffix else "")

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
