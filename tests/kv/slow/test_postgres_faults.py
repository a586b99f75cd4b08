"""The PostgreSQL store when its database is not the primary it should be, or stops answering:
a standby is never taken for the primary, a read-only server is left for the URL's other
hosts, a server that hangs (as one cut off by a partition does) costs a request its timeout
and no more, the store then reaches the next host of its URL, and no failure is left behind
as an exception nobody retrieved."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import structlog.testing

from mapmg_data_engineer_takehome.store import StoreUnavailable
from mapmg_data_engineer_takehome.store.postgres import PostgresStore

from ..e2e_support import ServerPool
from ..postgres_support import PostgresCluster, server_binaries

TIMEOUT = 1.0  # the store's KV_POSTGRES_TIMEOUT in these tests


def new_cluster(**options: Any) -> PostgresCluster:
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return PostgresCluster(bindir, **options)


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, since the test stops it (SIGSTOP) or makes it
    read-only."""
    made = new_cluster()
    try:
        made.start()
        yield made
    finally:
        made.remove()


@pytest.fixture
async def lost_exceptions() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler ("Future exception was never
    retrieved", "Task exception was never retrieved"): every one is a bug. So is a
    background task of the store that ended by an exception (it logs store_task_failed)."""
    loop = asyncio.get_running_loop()
    contexts: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: contexts.append(context))
    with structlog.testing.capture_logs() as logs:
        yield contexts
    loop.set_exception_handler(previous)
    assert [entry for entry in logs if entry["event"] == "store_task_failed"] == []


def assert_none_lost(contexts: list[dict[str, Any]]) -> None:
    gc.collect()  # a future is reported when it is collected
    assert [context.get("message") for context in contexts] == []


@pytest.fixture
async def store(cluster: PostgresCluster) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(cluster.url(), timeout=TIMEOUT, startup_wait=5)
    try:
        yield opened
    finally:
        await opened.close()


async def admin(cluster: PostgresCluster, sql: str) -> None:
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute("SET default_transaction_read_only = off")  # the admin may write
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_read_only_server_answers_unavailable_and_is_left_for_the_next_connection(
    cluster: PostgresCluster, store: PostgresStore, lost_exceptions: list[dict[str, Any]]
) -> None:
    """The primary made read-only, as a failover manager fences one: writes and /health's
    ping are StoreUnavailable (503), never a 500, and once it is writable again (or the URL's
    hosts lead elsewhere) the store writes, without a restart."""
    await store.set("k", "1")
    await admin(cluster, "ALTER DATABASE postgres SET default_transaction_read_only = on")
    # New sessions are read-only; the store's pooled ones go when they fail.
    await admin(
        cluster,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    for _ in range(3):  # the dropped connections, then read-only new ones
        with pytest.raises(StoreUnavailable):
            await store.set("k", "2")
    with pytest.raises(StoreUnavailable, match="read-only"):
        await store.set("k", "2")
    with pytest.raises(StoreUnavailable, match="read-only"):
        await store.ping()
    with pytest.raises(StoreUnavailable, match="read-only"):
        # Nor a read: a server that is not the primary may be an old one, behind the new.
        await store.get("k")

    await admin(cluster, "ALTER DATABASE postgres RESET default_transaction_read_only")
    for _ in range(3):  # a pooled read-only session or two, dropped as they are found
        try:
            await store.ping()
            break
        except StoreUnavailable:
            continue
    else:
        pytest.fail("still read-only")
    assert (await store.set("k", "3")).version > 1
    assert_none_lost(lost_exceptions)


async def test_a_server_that_hangs_costs_a_request_its_timeout_and_leaves_no_error_behind(
    cluster: PostgresCluster, store: PostgresStore, lost_exceptions: list[dict[str, Any]]
) -> None:
    """Every process of the server stopped: connections stay open, nothing answers. Reads,
    writes (grouped ones too) and batches all answer StoreUnavailable within the timeout;
    the connections they were on are closed, not pooled; once the server answers again, the
    store does, at once."""
    await store.set("k", "1")
    cluster.freeze()
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(store.set(f"k{n}", "v") for n in range(10)),
            *(store.get(f"k{n}") for n in range(10)),
            store.delete_many(["k1", "k2"]),
            store.list_keys("", None, 10, values=False),
            store.ping(),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    finally:
        cluster.thaw()
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert elapsed < TIMEOUT + 1.0
    assert (await store.set("k", "2")).val == "2"
    entry = await store.get("k")
    assert entry is not None and entry.val == "2"
    await asyncio.sleep(0.2)  # the abandoned calls end on their closed connections
    assert_none_lost(lost_exceptions)


async def test_the_next_host_is_reached_when_the_first_hangs(
    lost_exceptions: list[dict[str, Any]],
) -> None:
    """A URL of two hosts, the first one frozen as a partition leaves it: the store reaches
    the second within its timeout and a connect, rather than spending every attempt's whole
    timeout on the first (as connecting to the hosts one after the other would)."""
    first, second = new_cluster(), new_cluster()
    try:
        second.start()  # with the store's schema, as a standby has it, then down
        await (await PostgresStore.open(second.url(), timeout=TIMEOUT, startup_wait=5)).close()
        second.stop()
        first.start()
        url = first.url(target_session_attrs="read-write").replace(
            f"{first.host}:{first.port}",
            f"{first.host}:{first.port},{second.host}:{second.port}",
        )
        store = await PostgresStore.open(url, timeout=TIMEOUT, startup_wait=5)
        try:
            await store.set("k", "on the first")  # the second is not up yet
            second.start()
            first.freeze()
            frozen = time.monotonic()
            while True:
                try:
                    await store.set("k", "on the second")
                    break
                except StoreUnavailable:
                    assert time.monotonic() - frozen < 3 * TIMEOUT + 2, "never reached"
            assert time.monotonic() - frozen < 2 * TIMEOUT + 1
            entry = await store.get("k")
            assert entry is not None and entry.val == "on the second"
        finally:
            first.thaw()
            await store.close()
    finally:
        first.remove()
        second.remove()
    assert_none_lost(lost_exceptions)


async def test_a_standby_alone_is_never_taken_for_the_primary(
    postgres_cluster: PostgresCluster, servers: ServerPool
) -> None:
    """Pointed only at a standby of a store's database (its tables and all), the server does
    not open its port: it retries until KV_POSTGRES_STARTUP_WAIT, then exits 1, naming the
    server read-only."""
    database = postgres_cluster.create_database()
    await (await PostgresStore.open(postgres_cluster.url(database))).close()
    standby = new_cluster(standby_of=postgres_cluster)
    try:
        standby.start()
        server = servers.spawn(
            env={
                "KV_STORE": "postgres",
                "KV_POSTGRES_URL": standby.url(database),
                "KV_POSTGRES_STARTUP_WAIT": "2",
            }
        )
        status = server.wait_exit(30)
        assert status == 1, server.describe()
        assert "read-only" in server.stdout() + server.stderr()
        assert "listening" not in server.stdout()
    finally:
        standby.remove()
