"""What only the PostgreSQL store promises, in process: its schema's versioning, its
secrets, and its answers when the database is wrong or gone."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import asyncpg
import pytest

from mapmg_data_engineer_takehome.settings import SettingsError, load_settings
from mapmg_data_engineer_takehome.store import StoreCorrupt, StoreUnavailable
from mapmg_data_engineer_takehome.store.base import (
    Compacted,
    CompareExists,
    CompareVersion,
    GotKey,
    LeaseNotFound,
    TxnGet,
    TxnSet,
    UnknownRevision,
)
from mapmg_data_engineer_takehome.store.postgres import (
    GET_MANY,
    READS_IN_FLIGHT_BEHIND_POOLER,
    TIMELINE_GAP,
    PostgresStore,
    redacted_url,
)
from mapmg_data_engineer_takehome.store.postgres.sql import TOKEN_BY_HASH

from ..conftest import hashed
from ..postgres_support import PASSWORD, PostgresCluster
from ..test_sqlite_store import (
    FIXTURES,
    RELEASE_2_LISTING,
    Written,
    assert_kept,
    assert_leases_work_after_the_upgrade,
    assert_tokens_work_after_the_upgrade,
)


async def execute(url: str, sql: str) -> None:
    """One statement on a connection of its own, as an operator's psql would run it."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_servers_opening_together_create_the_schema_once(postgres_url: str) -> None:
    import asyncio

    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(4)))
    try:
        await stores[0].set("k", "v")
        for store in stores:
            entry = await store.get("k")
            assert entry is not None and entry.val == "v"
    finally:
        for store in stores:
            await store.close()


async def test_compare_and_set_transactions_race_exactly_across_two_replicas(
    postgres_url: str,
) -> None:
    """Two stores (two replicas' pools) race: 8 clients each add 1 to one counter 25 times
    with a txn that compares its version, reading the current one from the failure branch
    and retrying; then 8 at once each try to create a key that does not exist. The counter
    ends exact, every success took its own revision, and exactly one creation wins."""
    stores = [await PostgresStore.open(postgres_url, pool_size=4) for _ in range(2)]
    try:
        revisions: list[int] = []

        async def add_one_25_times(store: PostgresStore) -> None:
            result = await store.txn([], [TxnGet("counter")], [])
            got = result.results[0]
            assert isinstance(got, GotKey)
            val, version = int(got.val or "0"), got.version or 0
            done = 0
            while done < 25:
                result = await store.txn(
                    [CompareVersion("counter", version)],
                    [TxnSet("counter", str(val + 1))],
                    [TxnGet("counter")],
                )
                if result.succeeded:
                    revisions.append(result.revision)
                    val, version, done = val + 1, result.revision, done + 1
                else:
                    got = result.results[0]
                    assert isinstance(got, GotKey) and got.val is not None
                    val, version = int(got.val), got.version or 0

        await asyncio.gather(*(add_one_25_times(stores[client % 2]) for client in range(8)))
        entry = await stores[1].get("counter")
        assert entry is not None and entry.val == "200"
        assert len(set(revisions)) == 200

        created = await asyncio.gather(
            *(
                stores[client % 2].txn(
                    [CompareExists("lock", False)], [TxnSet("lock", str(client))], []
                )
                for client in range(8)
            )
        )
        assert [result.succeeded for result in created].count(True) == 1
        assert await stores[0].count() == 2
    finally:
        for store in stores:
            await store.close()


async def test_a_lease_is_one_across_two_replicas(postgres_url: str) -> None:
    """Two stores (two replicas' pools) on one database, on its clock: a lease granted through
    one takes keys set through either, while 8 keepalives through the other race 8 sets; every
    key ends with the lease's latest expiry (a keepalive waits for a set that holds the lease,
    then moves its key too). It is revoked through the second, and the first sees it gone."""
    stores = [await PostgresStore.open(postgres_url, pool_size=4) for _ in range(2)]
    try:
        lease = await stores[0].grant_lease(30)
        await asyncio.gather(
            *(stores[1].set(f"svc/{index}", "up", lease=lease.id) for index in range(8)),
            *(stores[0].keepalive_lease(lease.id) for _ in range(8)),
        )
        held = await stores[1].lease_keys(lease.id)
        assert held.lease.expires_at >= lease.expires_at
        assert list(held.keys) == [f"svc/{index}" for index in range(8)]
        for index in range(8):
            entry = await stores[0].get(f"svc/{index}")
            assert entry is not None and entry.expires_at == held.lease.expires_at
        revision = await stores[0].revision()
        assert await stores[1].revoke_lease(lease.id) == 8
        with pytest.raises(LeaseNotFound):
            await stores[0].keepalive_lease(lease.id)
        changes = await stores[0].changes("svc/", revision, 100)
        assert {(event.revision, event.type) for event in changes.events} == {
            (revision + 1, "delete")
        }
        assert len(changes.events) == 8 and await stores[0].count() == 0
    finally:
        for store in stores:
            await store.close()


async def test_a_database_of_a_newer_schema_is_refused(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.close()
    await execute(postgres_url, "UPDATE kv_meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(StoreCorrupt, match="newer version"):
        await PostgresStore.open(postgres_url)


async def test_a_database_of_the_release_before_the_history_is_upgraded_in_place(
    postgres_cluster: PostgresCluster,
) -> None:
    """tests/kv/fixtures/kv-postgres-schema-1.sql is a pg_dump of a database written by the
    release before the change feed (schema 1), with the same writes as the sqlite fixture of
    schema 2 (see the fixtures' README): every key, version and expiry is kept, and the history
    starts empty, whole above the revision the database was at (8). The first connection's
    check then begins a life at the database's clock in microseconds, above it."""
    database = postgres_cluster.create_database()
    postgres_cluster.load(FIXTURES / "kv-postgres-schema-1.sql", database)
    url = postgres_cluster.url(database)
    store = await PostgresStore.open(url, clock=lambda: 1_800_000_100.0)
    try:
        page = await store.list_keys("", None, 100, values=True)
        assert page.revision > 1_000_000_000_000_000  # the life begun at the clock, past 8
        listing = [(item.key, item.val, item.version, item.expires_at) for item in page.keys]
        assert listing == RELEASE_2_LISTING
        assert await store.seed_fingerprint() == "schema-1-fixture-seed"
        assert await store.count() == len(RELEASE_2_LISTING)
        with pytest.raises(Compacted) as compacted:
            await store.changes("", 7, 100)
        assert compacted.value.compact_revision == 8
        await store.set("new", "after the upgrade")
        assert [event.key for event in (await store.changes("", 8, 100)).events] == ["new"]
        with pytest.raises(UnknownRevision):  # a number the new life skipped
            await store.changes("", 9, 100)
        assert (await store.history()).rows == 1
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT value FROM kv_meta WHERE name = 'schema_version'") == "6"
    finally:
        await conn.close()


async def written_in_database(url: str) -> Written:
    """What a fixture loaded into the database at ``url`` holds, before its upgrade."""
    conn = await asyncpg.connect(url)
    try:
        return Written(
            [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT key, val, version, expires_at FROM kv ORDER BY key"
                )
            ],
            [
                tuple(row)
                for row in await conn.fetch(
                    "SELECT revision, type, key, val, expires_at FROM kv_changes"
                    " ORDER BY revision, key"
                )
            ],
            int(await conn.fetchval("SELECT value FROM kv_meta WHERE name = 'compact_revision'")),
        )
    finally:
        await conn.close()


async def test_a_database_of_the_release_before_leases_is_upgraded_keeping_keys_and_history(
    postgres_cluster: PostgresCluster,
) -> None:
    """tests/kv/fixtures/kv-postgres-schema-4.sql is a pg_dump of a database written by the
    release before leases (schema 4), with the same writes as kv-schema-4.sqlite3: every key,
    version and expiry and the whole history (read from the database before the upgrade) are
    kept, and a lease then works on it."""
    database = postgres_cluster.create_database()
    postgres_cluster.load(FIXTURES / "kv-postgres-schema-4.sql", database)
    url = postgres_cluster.url(database)
    written = await written_in_database(url)
    # The fixture is what the README says.
    assert len(written.rows) == 8 and len(written.history) == 10
    store = await PostgresStore.open(url, clock=lambda: 1_800_000_100.0)
    try:
        await assert_kept(store, written)
        await assert_leases_work_after_the_upgrade(store, len(written.rows))
    finally:
        await store.close()


async def test_a_database_of_the_release_before_tokens_is_upgraded_keeping_keys_history_and_leases(
    postgres_cluster: PostgresCluster,
) -> None:
    """tests/kv/fixtures/kv-postgres-schema-5.sql is a pg_dump of a database written by the
    release before access tokens (schema 5), with the same writes as kv-schema-5.sqlite3:
    every key, version, expiry and lease and the whole history (read from the database
    before the upgrade) are kept, it has no token, and tokens then work on it."""
    database = postgres_cluster.create_database()
    postgres_cluster.load(FIXTURES / "kv-postgres-schema-5.sql", database)
    url = postgres_cluster.url(database)
    written = await written_in_database(url)
    conn = await asyncpg.connect(url)
    try:
        leases = await conn.fetch("SELECT id FROM kv_leases")
    finally:
        await conn.close()
    # The fixture is what the README says.
    assert len(written.rows) == 9 and len(written.history) == 11 and len(leases) == 1
    store = await PostgresStore.open(url, clock=lambda: 1_800_000_100.0)
    try:
        await assert_kept(store, written)
        await assert_tokens_work_after_the_upgrade(store, leases[0][0])
        assert await store.count() == len(written.rows)
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT value FROM kv_meta WHERE name = 'schema_version'") == "6"
    finally:
        await conn.close()


async def test_a_token_is_found_by_either_hash_through_an_index(postgres_url: str) -> None:
    """token_by_hash runs on every request whose secret a server has not cached: with scans
    ruled out, the planner still answers it (from the two hashes' indexes)."""
    store = await PostgresStore.open(postgres_url)
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0] for row in await conn.fetch(f"EXPLAIN {TOKEN_BY_HASH}", hashed("a"))
        )
    finally:
        await conn.close()
    assert "Seq Scan" not in plan
    assert "kv_tokens_secret_hash_key" in plan and "kv_tokens_previous" in plan


async def test_on_a_new_timeline_the_revisions_the_old_one_may_have_used_are_never_reused(
    postgres_url: str,
) -> None:
    """A failover to a standby that lacked the last writes, as the store sees it, made by
    hand: the timeline it recorded is not the server's. A server that connects then moves the
    revision past any the old timeline can have reached before it writes; a watcher holding
    one of those revisions is told it is not the store's, and one from before the fork, or
    after it, reads on with nothing missed. tests/kv/slow/test_postgres_failover.py does it
    with a real promotion."""
    store = await PostgresStore.open(postgres_url)
    try:
        await store.set("before", "1")
        forked = await store.revision()
    finally:
        await store.close()
    await execute(postgres_url, "UPDATE kv_meta SET value = 'another' WHERE name = 'timeline'")
    stores = [await PostgresStore.open(postgres_url) for _ in range(2)]
    try:
        assert await stores[0].revision() == forked + TIMELINE_GAP  # once, not per server
        assert (await stores[1].set("after", "2")).version == forked + TIMELINE_GAP + 1
        for lost in (forked + 1, forked + TIMELINE_GAP - 1):
            with pytest.raises(UnknownRevision):
                await stores[0].changes("", lost, 100)
        for since in (forked, forked + TIMELINE_GAP):
            assert [event.key for event in (await stores[0].changes("", since, 100)).events] == [
                "after"
            ]
    finally:
        for store in stores:
            await store.close()


async def test_a_connection_that_closes_under_a_call_is_unavailable_not_a_crash(
    postgres_url: str,
) -> None:
    """The server ends a pooled connection after it was handed out and before its query runs
    (a failover manager's restart, a pooler): asyncpg takes the connection back under its
    proxy, whose query, terminate and release then raise InterfaceError. The call is
    StoreUnavailable (a 503), not an exception that escapes the store, and the store goes on."""
    store = await PostgresStore.open(postgres_url, timeout=2.0)
    try:

        async def ended_under_the_call(conn: Any) -> Any:
            await execute(postgres_url, f"SELECT pg_terminate_backend({conn.get_server_pid()})")
            await asyncio.sleep(0.2)  # asyncpg reads the server's goodbye and lets go
            return await conn.fetchval("SELECT 1")

        with pytest.raises(StoreUnavailable):
            await store._use(ended_under_the_call)
        assert (await store.set("after", "1")).val == "1"
    finally:
        await store.close()


async def test_behind_a_pooler_gets_of_many_turns_go_in_few_groups_each_answered(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With pooler="transaction" (here straight to PostgreSQL, which that mode also works
    on), at most READS_IN_FLIGHT_BEHIND_POOLER read groups are in flight: the GETs of the
    turns meanwhile wait, and go as one group when one ends. GETs spread over 50 turns, some
    of them for the same key or a missing one, each get their own answer, in fewer groups."""
    store = await PostgresStore.open(postgres_url, pooler="transaction")
    try:
        await asyncio.gather(*(store.set(f"k{n}", f"v{n}") for n in range(100)))
        in_flight, peak, groups = 0, 0, 0
        fetch = store._fetch

        async def counted(query: str, *args: Any) -> Any:
            nonlocal in_flight, peak, groups
            if query != GET_MANY:
                return await fetch(query, *args)
            groups += 1
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await fetch(query, *args)
            finally:
                in_flight -= 1

        monkeypatch.setattr(store, "_fetch", counted)

        async def get_after(turns: int, key: str) -> Optional[str]:
            for _ in range(turns):
                await asyncio.sleep(0)
            entry = await store.get(key)
            return None if entry is None else entry.val

        keys = [f"k{n % 120}" for n in range(300)]  # k100 to k119 are missing
        answers = await asyncio.gather(*(get_after(n % 50, key) for n, key in enumerate(keys)))
        assert answers == [f"v{key[1:]}" if int(key[1:]) < 100 else None for key in keys]
        assert peak == READS_IN_FLIGHT_BEHIND_POOLER
        assert groups < 50
    finally:
        await store.close()


async def test_a_wrong_password_is_named_without_it(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.url().replace("s3cret", "wrong")
    with pytest.raises(StoreUnavailable) as failed:
        await PostgresStore.open(url, startup_wait=0.5)
    assert "***@" in str(failed.value) and "wrong" not in str(failed.value)


def test_urls_are_shown_without_their_password() -> None:
    assert redacted_url("postgresql://kv:s%40cret@db:5432/kv?sslmode=require") == (
        "postgresql://kv:***@db:5432/kv?sslmode=require"
    )
    assert redacted_url("postgresql://db/kv") == "postgresql://db/kv"
    assert PASSWORD not in redacted_url(f"postgresql://kv:{PASSWORD}@db/kv")


def test_the_postgres_store_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="KV_POSTGRES_URL"):
        load_settings(["--store", "postgres"])
    monkeypatch.setenv("KV_POSTGRES_URL", "postgresql://kv:hidden@db/kv")
    settings = load_settings(["--store", "postgres", "--workers", "2"])
    assert settings.public_view()["postgres_url"] == "**********"
