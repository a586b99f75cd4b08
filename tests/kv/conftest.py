"""This suite's rules and shared fixtures: hermetic settings, an input.db builder and an
in-process client.

The rules apply to the modules in this directory only, never to test files copied into
tests/ beside it: without the dev extras these modules are skipped with one reason, and their
tests (not other people's) turn every warning into an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mapmg_data_engineer_takehome import seed
from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.settings import Settings
from mapmg_data_engineer_takehome.store import MemoryStore, SqliteStore, Store
from mapmg_data_engineer_takehome.store.base import BulkRow, Clock
from mapmg_data_engineer_takehome.store.postgres import PostgresStore

from . import machine_support
from .e2e_support import ServerPool
from .postgres_support import PgBouncer, PostgresCluster, pgbouncer_binary, server_binaries
from .watch_support import close_client

if TYPE_CHECKING:
    Client = TestClient[web.Request, web.Application]
else:  # aiohttp before 3.14 has no type parameters on TestClient
    Client = TestClient
MakeSettings = Callable[..., Settings]
MakeClient = Callable[..., Awaitable[Client]]

HERE = Path(__file__).resolve().parent
# Whole modules of slow tests: real processes, kill -9, slow clients, Docker builds, root.
SLOW = HERE / "slow"
# The template's python_files pattern, *test*.py, matches this very file: not a test module.
collect_ignore = ["conftest.py"]
# The dev extras this suite needs, by distribution and by the module it installs.
DEV_EXTRAS = {"hypothesis": "hypothesis", "pytest-aiohttp": "pytest_aiohttp"}
MISSING_DEV_EXTRAS = [
    distribution
    for distribution, module in DEV_EXTRAS.items()
    if importlib.util.find_spec(module) is None
]
NEEDS_DEV_EXTRAS = (
    f"install the dev extras: pip install -e '.[dev]' (missing: {', '.join(MISSING_DEV_EXTRAS)})"
)


class SkippedModule(pytest.Module):
    """A test module of this suite that cannot run here: it is reported skipped, not imported."""

    def collect(self) -> Iterable[pytest.Item]:
        pytest.skip(NEEDS_DEV_EXTRAS)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Optional[Any]:
    if MISSING_DEV_EXTRAS:
        return SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    # pytest-asyncio (installed by pytest-aiohttp) declares the asyncio options set in
    # pyproject.toml; without it, pytest would warn about them on every run, a grader's too.
    if importlib.util.find_spec("pytest_asyncio") is None:
        parser.addini("asyncio_mode", "unused: pytest-asyncio is not installed")
        parser.addini("asyncio_default_fixture_loop_scope", "unused: as asyncio_mode")


# Slow modules whose outcome depends on the Python that runs them: the grader's flow and the
# packaging (a fresh virtualenv of this Python), the server process (its event loop, signals
# and uvloop build) and the console scripts and client (httpx on this Python). CI runs them on
# every Python it tests, and the rest of the slow suite on one (.ci/run).
EVERY_PYTHON_MODULES = {
    "test_grader_flow.py",
    "test_e2e.py",
    "test_cli.py",
    "test_client.py",
    "test_locks.py",
    "test_lock_e2e.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every warning fails this suite's tests, which are the items under this directory; the
    ones under slow/ are marked slow (the top-level conftest.py deselects those by default),
    and also every_python where they depend on the Python version. The slow ones run last:
    the quick suite fails fast, and under pytest-xdist its long state machines start at once
    rather than behind the slow suite.

    A marker set here rather than a ``pytestmark`` in each module: under the template's
    ``python_functions = *test*``, pytest would warn that it cannot collect ``pytestmark``.
    """
    for item in items:
        if HERE not in item.path.parents:
            continue
        # Prepended, so that a test's own filterwarnings marks still take precedence.
        item.add_marker(pytest.mark.filterwarnings("error"), append=False)
        if SLOW in item.path.parents:
            item.add_marker(pytest.mark.slow)
        if item.path.name in EVERY_PYTHON_MODULES:
            item.add_marker(pytest.mark.every_python)
    items.sort(key=lambda item: SLOW in item.path.parents)  # stable: the rest keep their order


# Under pytest-xdist, tests run at once, and each holds a share of the machine while it runs
# (its fixtures' set-up included), so that a step timed against a deadline can have the machine
# whole (machine_support.py). The grader-flow module's tests take it whole for their timed
# step, and so hold no share, which that step would wait on.
TAKE_THE_MACHINE_WHOLE = {"test_grader_flow.py"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if (
        "PYTEST_XDIST_WORKER" not in os.environ
        or HERE not in item.path.parents
        or item.path.name in TAKE_THE_MACHINE_WHOLE
    ):
        yield
        return
    with machine_support.shared():
        yield


@pytest.fixture(autouse=True)
def watch_client() -> Iterator[None]:
    """watch_support's shared HTTP client (followers', and some tests' own requests), closed
    after each test with its connections."""
    yield
    close_client()


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a developer's input.db, environment or data directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seed, "PACKAGE_PARENT", tmp_path / "package-parent")
    for name in (
        "PORT",
        "KV_ENV_FILE",
        *(f"KV_{field.upper()}" for field in Settings.model_fields),
    ):
        monkeypatch.delenv(name, raising=False)


def hashed(secret: str) -> str:
    """A token's secret as the stores keep it (see store/base.py): its SHA-256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


class FakeClock:
    """A store's clock that moves only when told: expiry without waiting."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RowsSeed:
    """A bulk load of given rows, with no SQLite file behind it: (key, val) pairs or BulkRows,
    in batches of ``batch``. With a fingerprint, a seed's; without, an import's. With
    ``fail_after``, the rows fail after that many batches (a bad line, a client gone)."""

    def __init__(
        self,
        rows: Iterable[Sequence[Any]],
        fingerprint: Optional[str] = "fingerprint",
        batch: int = 1000,
        fail_after: Optional[int] = None,
    ) -> None:
        self._rows = rows
        self.fingerprint = fingerprint
        self._batch = batch
        self._fail_after = fail_after

    async def batches(self) -> AsyncIterator[list[BulkRow]]:
        batch: list[BulkRow] = []
        sent = 0
        for row in self._rows:
            batch.append(BulkRow(*row))
            if len(batch) == self._batch:
                if sent == self._fail_after:
                    raise SourceFailed
                yield batch
                sent += 1
                batch = []
                await asyncio.sleep(0)  # as a request's body arrives: other requests run
        if sent == self._fail_after:
            raise SourceFailed
        if batch:
            yield batch

    def as_sql(self) -> None:
        return None


class SourceFailed(Exception):
    """What a RowsSeed raises when told to fail."""


async def value_of(store: Store, key: str) -> Optional[str]:
    """The key's live value, or None."""
    entry = await store.get(key)
    return None if entry is None else entry.val


def write_input_db(path: Path, rows: Iterable[Sequence[Any]], wal: bool = False) -> Path:
    """An input.db with the brief's table and ``rows`` inserted in order."""
    conn = sqlite3.connect(str(path))
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("create table keys(key text, val text)")
    conn.executemany("insert into keys(key, val) values (?, ?)", rows)
    conn.commit()
    conn.close()
    return path


# KV_POSTGRES_TIMEOUT for the tests of a server in this process, which expect answers, not
# the 503 of a slow database: a CI run with a Docker build beside them once kept PostgreSQL
# from answering a model test within the default 2 s. The timeout itself is tested in
# test_postgres_faults.py, with processes of their own.
TEST_POSTGRES_TIMEOUT = 30.0


@pytest.fixture
def make_settings(tmp_path: Path, request: pytest.FixtureRequest) -> MakeSettings:
    """Settings with the data file in this test's directory; keyword arguments override.
    With ``store="postgres"`` and no URL, a fresh schema of the test cluster is used."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_path": tmp_path / "data" / "kv.sqlite3",
            "log_format": "json",
        }
        values.update(overrides)
        if values.get("store") == "postgres":
            values.setdefault("postgres_timeout", TEST_POSTGRES_TIMEOUT)
            if "postgres_url" not in values:
                values["postgres_url"] = request.getfixturevalue("postgres_url")
        return Settings(**values)

    return make


# The quick suite runs on the default store; --run-slow, as CI does, on every store: the memory
# store's runs would double it, and PostgreSQL's need its server and a cluster to start.
STORE_KINDS = [
    "sqlite",
    pytest.param("memory", marks=pytest.mark.slow),
    pytest.param("postgres", marks=pytest.mark.slow),
]


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run the test once per backend."""
    return str(request.param)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the whole run (see postgres_support.py)."""
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh, empty schema of the test cluster: a store of its own."""
    return postgres_cluster.url(search_path=postgres_cluster.create_schema())


def fresh_postgres_urls(kind: str, request: pytest.FixtureRequest) -> Callable[[], Optional[str]]:
    """For a state machine run on store ``kind``: a function that gives each example a fresh
    schema's URL for "postgres", and None for any other kind (whose machine needs none). The
    cluster is only asked for, and so started, when a postgres example runs."""

    def new_url() -> Optional[str]:
        if kind != "postgres":
            return None
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        return cluster.url(search_path=cluster.create_schema())

    return new_url


StartPgBouncer = Callable[..., PgBouncer]


@pytest.fixture
def pgbouncers(postgres_cluster: PostgresCluster) -> Iterator[StartPgBouncer]:
    """Start PgBouncers (``pool_mode`` "transaction", "session" or "statement", and PgBouncer's
    keyword arguments) in front of the test cluster; every one is stopped and removed at
    teardown, whether the test passed or not."""
    if pgbouncer_binary() is None:
        pytest.skip("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
    started: list[PgBouncer] = []

    def start(pool_mode: str = "transaction", **options: Any) -> PgBouncer:
        bouncer = PgBouncer(postgres_cluster, pool_mode, **options)
        started.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield start
    finally:
        for bouncer in started:
            bouncer.remove()


@pytest.fixture(scope="session")
def pgbouncer_transaction(postgres_cluster: PostgresCluster) -> Iterator[PgBouncer]:
    """One PgBouncer in transaction mode in front of the test cluster, for the whole run."""
    if pgbouncer_binary() is None:
        pytest.skip("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
    bouncer = PgBouncer(postgres_cluster, "transaction")
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.remove()


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def open_test_store(request: pytest.FixtureRequest) -> OpenStore:
    """Open a store of a kind ("memory", "sqlite", "sqlite-full", "postgres",
    "postgres-pgbouncer") in a directory, on a clock; each call to it for postgres gets a fresh
    schema, and for postgres-pgbouncer a fresh database reached through PgBouncer in
    transaction mode (which refuses a search_path), opened with pooler="transaction"."""

    async def open_store(kind: str, directory: Path, clock: Optional[Clock] = None) -> Store:
        if kind == "memory":
            return MemoryStore(clock or time.time)
        if kind == "postgres":
            cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
            url = cluster.url(search_path=cluster.create_schema())
            return await PostgresStore.open(url, clock=clock)
        if kind == "postgres-pgbouncer":
            bouncer: PgBouncer = request.getfixturevalue("pgbouncer_transaction")
            url = bouncer.url(bouncer.cluster.create_database())
            return await PostgresStore.open(url, clock=clock, pooler="transaction")
        durability = "full" if kind == "sqlite-full" else "normal"
        return SqliteStore(directory / "kv.sqlite3", durability, clock or time.time)

    return open_store


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerPool]:
    """Start servers (real processes) in this test's directory; every one is killed at
    teardown."""
    pool = ServerPool(tmp_path / "e2e")
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def make_client(aiohttp_client: Any, make_settings: MakeSettings) -> MakeClient:
    """Start the real app in-process from settings overrides and return a test client."""

    async def make(
        settings: Optional[Settings] = None, clock: Optional[FakeClock] = None, **overrides: Any
    ) -> Client:
        app: web.Application = create_app(settings or make_settings(**overrides), clock=clock)
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str) -> Client:
    """A client of an unseeded app, once per backend."""
    return await make_client(store=store_kind)
