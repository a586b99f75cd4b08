"""One contract, run unchanged against every Store implementation: values, versions,
preconditions, expiry on a controllable clock, batches, ordered listing, seeding, the history
of changes, and bulk loads and exports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Optional

import pytest

from mapmg_data_engineer_takehome.store import MemoryStore, SqliteStore, Store
from mapmg_data_engineer_takehome.store.base import (
    EXPORT_BATCH_CHARS,
    PAGE_VALUE_CHARS,
    BulkRow,
    Change,
    Compacted,
    Compare,
    CompareExists,
    CompareValue,
    CompareVersion,
    DeletedKey,
    DeletedPrefix,
    Entry,
    GotKey,
    HistoryStats,
    IfAbsent,
    IfExists,
    IfVersion,
    KeysRefused,
    Lease,
    LeaseNotFound,
    Loaded,
    PreconditionFailed,
    SetItem,
    SetKey,
    Token,
    TokenExists,
    TokenNotFound,
    TokenRule,
    TxnDelete,
    TxnDeletePrefix,
    TxnGet,
    TxnResult,
    TxnSet,
    UnknownRevision,
    prefix_upper_bound,
)
from mapmg_data_engineer_takehome.store.postgres import PostgresStore

from .conftest import FakeClock, OpenStore, RowsSeed, SourceFailed, hashed, value_of

# The quick suite runs the contract on the default store; --run-slow, as CI does, on all.
BACKENDS = [
    "sqlite",
    pytest.param("memory", marks=pytest.mark.slow),
    pytest.param("sqlite-full", marks=pytest.mark.slow),
    pytest.param("postgres", marks=pytest.mark.slow),
    # PostgreSQL through PgBouncer in transaction mode, with the store's pooler="transaction".
    pytest.param("postgres-pgbouncer", marks=pytest.mark.slow),
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock, open_test_store: OpenStore
) -> AsyncIterator[Store]:
    opened = await open_test_store(request.param, tmp_path, clock)
    yield opened
    await opened.close()


async def listed(store: Store, prefix: str = "", limit: int = 1000) -> list[str]:
    """Every live key under ``prefix``, paging ``limit`` at a time."""
    keys: list[str] = []
    after: Optional[str] = None
    while True:
        page = await store.list_keys(prefix, after, limit, values=False)
        keys += [item.key for item in page.keys]
        if not page.more:
            return keys
        after = keys[-1]


# --- values ---------------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.get("missing") is None


async def test_set_then_get(store: Store) -> None:
    written = await store.set("k", "v")
    assert await store.get("k") == written == Entry("v", written.version, None)


async def test_set_overwrites(store: Store) -> None:
    await store.set("k", "one")
    await store.set("k", "two")
    assert await value_of(store, "k") == "two"
    assert await store.count() == 1


async def test_empty_value_is_a_value(store: Store) -> None:
    await store.set("k", "")
    assert await value_of(store, "k") == ""


async def test_delete_reports_whether_the_key_had_a_value(store: Store) -> None:
    await store.set("k", "v")
    assert await store.delete("k") is True
    assert await store.get("k") is None
    assert await store.delete("k") is False


async def test_count_follows_sets_and_deletes(store: Store) -> None:
    assert await store.count() == 0
    for index in range(5):
        await store.set(f"k{index}", "v")
    await store.delete("k0")
    assert await store.count() == 4


async def test_keys_are_exact_strings(store: Store) -> None:
    keys = ["a", "A", "a ", " a", "a\x7fb", "a\nb", "😀", "ß", "ss"]
    for index, key in enumerate(keys):
        await store.set(key, str(index))
    for index, key in enumerate(keys):
        assert await value_of(store, key) == str(index)


async def test_concurrent_writes_all_land(store: Store) -> None:
    await asyncio.gather(*(store.set(f"k{i}", f"v{i}") for i in range(200)))
    await asyncio.gather(*(store.delete(f"k{i}") for i in range(0, 200, 2)))
    assert await store.count() == 100
    assert await value_of(store, "k1") == "v1"
    assert await store.get("k2") is None


async def test_concurrent_reads_each_get_their_own_answer(store: Store, clock: FakeClock) -> None:
    """Reads that arrive together (stores may answer them in groups): more than a group's
    worth, the same key asked twice, keys that are missing or expired, and one reader that
    gives up without disturbing the others."""
    await store.set_many([SetItem(f"k{i}", f"v{i}") for i in range(0, 1200, 2)])
    await store.set("soon", "gone", ttl=1)
    clock.advance(2)
    keys = [f"k{i}" for i in range(1200)] + ["k0", "k0", "soon", "k1"]
    abandoned = asyncio.ensure_future(store.get("k2"))
    reads = [asyncio.ensure_future(store.get(key)) for key in keys]
    abandoned.cancel()
    entries = await asyncio.gather(*reads)
    values = [None if entry is None else entry.val for entry in entries]
    expected = [f"v{i}" if i % 2 == 0 else None for i in range(1200)] + ["v0", "v0", None, None]
    assert values == expected
    assert await value_of(store, "k2") == "v2"


async def test_ping_answers(store: Store) -> None:
    await store.ping()


# --- versions -------------------------------------------------------------------------------


async def test_every_write_takes_the_next_revision_on_any_key(store: Store) -> None:
    first = (await store.set("a", "1")).version
    assert (await store.set("b", "1")).version == first + 1
    assert (await store.set("a", "2")).version == first + 2
    assert await store.delete("b") is True  # a delete takes one too
    assert (await store.set("c", "1")).version == first + 4
    entry = await store.get("a")
    assert entry is not None and entry.version == first + 2


async def test_writes_that_change_nothing_take_no_revision(store: Store) -> None:
    first = (await store.set("a", "1")).version
    assert await store.delete("missing") is False
    assert await store.delete_many(["missing", "absent"]) == 0
    with pytest.raises(PreconditionFailed):
        await store.set("a", "x", condition=IfVersion(first + 100))
    assert (await store.set("b", "1")).version == first + 1


async def test_concurrent_writes_get_distinct_versions(store: Store) -> None:
    entries = await asyncio.gather(*(store.set(f"k{i % 7}", str(i)) for i in range(50)))
    versions = [entry.version for entry in entries]
    assert len(set(versions)) == 50
    assert sorted(versions) == versions  # applied in the order they were submitted


# --- preconditions --------------------------------------------------------------------------


async def test_if_version_writes_only_at_that_version(store: Store) -> None:
    version = (await store.set("k", "1")).version
    with pytest.raises(PreconditionFailed) as failed:
        await store.set("k", "2", condition=IfVersion(version - 1))
    assert failed.value.current == version
    assert await value_of(store, "k") == "1"
    updated = await store.set("k", "2", condition=IfVersion(version))
    assert updated.version > version and await value_of(store, "k") == "2"
    with pytest.raises(PreconditionFailed) as failed:
        await store.set("missing", "x", condition=IfVersion(version))
    assert failed.value.current is None
    assert await store.get("missing") is None


async def test_if_exists_and_if_absent(store: Store) -> None:
    with pytest.raises(PreconditionFailed):
        await store.set("k", "1", condition=IfExists())
    created = await store.set("k", "1", condition=IfAbsent())
    with pytest.raises(PreconditionFailed) as failed:
        await store.set("k", "2", condition=IfAbsent())
    assert failed.value.current == created.version
    await store.set("k", "3", condition=IfExists())
    assert await value_of(store, "k") == "3"


async def test_conditional_delete(store: Store) -> None:
    version = (await store.set("k", "1")).version
    with pytest.raises(PreconditionFailed) as failed:
        await store.delete("k", condition=IfVersion(version + 1))
    assert failed.value.current == version
    assert await value_of(store, "k") == "1"
    assert await store.delete("k", condition=IfVersion(version)) is True
    with pytest.raises(PreconditionFailed) as failed:
        await store.delete("k", condition=IfExists())
    assert failed.value.current is None


async def test_a_failed_precondition_does_not_fail_its_neighbours(store: Store) -> None:
    await store.set("taken", "1")
    results = await asyncio.gather(
        store.set("a", "1"),
        store.set("taken", "2", condition=IfAbsent()),
        store.set("b", "1"),
        return_exceptions=True,
    )
    assert isinstance(results[1], PreconditionFailed)
    assert isinstance(results[0], Entry) and isinstance(results[2], Entry)
    assert [await value_of(store, key) for key in ("a", "taken", "b")] == ["1", "1", "1"]


# --- expiry ---------------------------------------------------------------------------------


async def test_a_key_expires_at_once_everywhere(store: Store, clock: FakeClock) -> None:
    written = await store.set("k", "v", ttl=10)
    assert written.expires_at == round((clock.now + 10) * 1000)
    assert await store.get("k") == written
    clock.advance(9.999)
    assert await value_of(store, "k") == "v"
    clock.advance(0.001)
    assert await store.get("k") is None
    assert await store.get_many(["k"]) == {}
    assert await listed(store) == []
    with pytest.raises(PreconditionFailed) as failed:
        await store.set("k", "again", condition=IfExists())
    assert failed.value.current is None
    assert await store.delete("k") is False
    await store.set("k", "fresh", condition=IfAbsent())
    assert await value_of(store, "k") == "fresh"


async def test_a_set_without_ttl_removes_the_expiry(store: Store, clock: FakeClock) -> None:
    await store.set("k", "v", ttl=5)
    assert (await store.set("k", "w")).expires_at is None
    clock.advance(60)
    assert await value_of(store, "k") == "w"


async def test_purge_removes_expired_rows_in_batches(store: Store, clock: FakeClock) -> None:
    await store.set_many([SetItem(f"short{i}", "v", ttl=1) for i in range(25)])
    await store.set("long", "v", ttl=100)
    await store.set("forever", "v")
    assert await store.purge_expired(10) == 0
    clock.advance(2)
    assert await store.purge_expired(10) == 10
    assert await store.purge_expired(100) == 15
    assert await store.purge_expired(100) == 0
    assert await store.count() == 2
    assert await listed(store) == ["forever", "long"]


async def test_a_seed_clears_expiry(store: Store, clock: FakeClock) -> None:
    await store.set("k", "v", ttl=1)
    await store.load(RowsSeed(iter([("k", "seeded")]), "fp"))
    clock.advance(10)
    entry = await store.get("k")
    assert entry is not None and (entry.val, entry.expires_at) == ("seeded", None)


# --- batches --------------------------------------------------------------------------------


async def test_get_many_gives_only_live_values(store: Store, clock: FakeClock) -> None:
    await store.set("a", "1")
    await store.set("b", "2", ttl=1)
    await store.set("c", "")
    clock.advance(1)
    many = await store.get_many(["c", "missing", "a", "b", "a"])
    assert dict(many) == {"a": "1", "c": ""}


async def test_set_many_shares_one_revision_and_the_last_item_wins(
    store: Store, clock: FakeClock
) -> None:
    before = (await store.set("x", "0")).version
    revision = await store.set_many(
        [SetItem("a", "1"), SetItem("b", "2", ttl=5), SetItem("a", "3")]
    )
    assert revision == before + 1
    assert await store.get("a") == Entry("3", revision, None)
    assert await store.get("b") == Entry("2", revision, round((clock.now + 5) * 1000))


async def test_delete_many_counts_the_live_keys_it_removed(store: Store, clock: FakeClock) -> None:
    await store.set_many([SetItem("a", "1"), SetItem("b", "2"), SetItem("c", "3", ttl=1)])
    clock.advance(1)
    before = (await store.set("x", "0")).version
    assert await store.delete_many(["a", "a", "c", "missing", "b"]) == 2
    assert await listed(store) == ["x"]
    assert (await store.set("y", "0")).version == before + 2  # one revision for the batch


# --- listing --------------------------------------------------------------------------------

KEYS_IN_UTF8_ORDER = ["A", "B", "Z", "a", "a/b", "a:b", "ab", "ß", "ключ", "\ue000", "😀"]


async def test_keys_list_in_utf8_byte_order(store: Store) -> None:
    assert sorted(KEYS_IN_UTF8_ORDER, key=lambda key: key.encode()) == KEYS_IN_UTF8_ORDER
    for key in reversed(KEYS_IN_UTF8_ORDER):
        await store.set(key, key.upper())
    assert await listed(store) == KEYS_IN_UTF8_ORDER
    assert await listed(store, limit=1) == KEYS_IN_UTF8_ORDER
    assert await listed(store, limit=3) == KEYS_IN_UTF8_ORDER


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("a", ["a", "a/b", "a:b", "ab"]),
        ("a/", ["a/b"]),
        ("ab", ["ab"]),
        ("abc", []),
        ("", KEYS_IN_UTF8_ORDER),
        ("😀", ["😀"]),
        ("\ud7ff", []),
    ],
)
async def test_a_prefix_selects_exactly_its_keys(
    store: Store, prefix: str, expected: list[str]
) -> None:
    for key in KEYS_IN_UTF8_ORDER:
        await store.set(key, "v")
    assert await listed(store, prefix) == expected
    assert await listed(store, prefix, limit=1) == expected


async def test_a_page_carries_versions_expiry_and_values_when_asked(
    store: Store, clock: FakeClock
) -> None:
    a = await store.set("a", "1")
    b = await store.set("b", "2", ttl=30)
    page = await store.list_keys("", None, 10, values=False)
    assert [(item.key, item.version, item.expires_at, item.val) for item in page.keys] == [
        ("a", a.version, None, None),
        ("b", b.version, b.expires_at, None),
    ]
    assert page.more is False
    with_values = await store.list_keys("", None, 1, values=True)
    assert [(item.key, item.val) for item in with_values.keys] == [("a", "1")]
    assert with_values.more is True
    after = await store.list_keys("", "a", 1, values=True)
    assert [(item.key, item.val) for item in after.keys] == [("b", "2")]
    assert after.more is False


async def test_a_cursor_before_the_prefix_starts_at_the_prefix(store: Store) -> None:
    for key in ("a1", "b1", "b2", "c1"):
        await store.set(key, "v")
    page = await store.list_keys("b", "a9", 10, values=False)
    assert [item.key for item in page.keys] == ["b1", "b2"]
    page = await store.list_keys("b", "b1", 10, values=False)
    assert [item.key for item in page.keys] == ["b2"]
    page = await store.list_keys("b", "z", 10, values=False)
    assert list(page.keys) == [] and page.more is False


async def test_a_page_of_large_values_stops_early(store: Store) -> None:
    big = "x" * (PAGE_VALUE_CHARS // 4)
    await store.set_many([SetItem(f"k{i}", big) for i in range(8)])
    page = await store.list_keys("", None, 1000, values=True)
    assert page.more is True and 4 <= len(page.keys) < 8
    assert len(await listed(store)) == 8  # without values, one page


def test_prefix_upper_bounds() -> None:
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("\ud7ff") == "\ue000"


# --- seeding --------------------------------------------------------------------------------


async def test_load_applies_rows_in_order_last_wins(store: Store) -> None:
    await store.set("kept", "mine")
    await store.load(RowsSeed(iter([("a", "1"), ("b", "2"), ("a", "3")]), "fingerprint-1"))
    assert await value_of(store, "a") == "3"
    assert await value_of(store, "b") == "2"
    assert await value_of(store, "kept") == "mine"


async def test_seeded_keys_share_one_version(store: Store) -> None:
    before = (await store.set("x", "0")).version
    await store.load(RowsSeed(iter([("a", "1"), ("b", "2")]), "fp"))
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and b is not None
    assert a.version == b.version > before  # a load begins a life: at the clock or above
    assert (await store.set("c", "3")).version == a.version + 1


async def test_load_accepts_a_generator_of_many_rows(store: Store) -> None:
    await store.load(RowsSeed(((f"k{i}", f"v{i}") for i in range(10_000)), "many"))
    assert await store.count() == 10_000
    assert await value_of(store, "k9999") == "v9999"


async def test_fingerprint_is_remembered_only_by_durable_stores(store: Store) -> None:
    loaded = await store.load(RowsSeed(iter([("a", "1")]), "fp"))
    assert loaded is not None and loaded.applied == 1
    remembered = await store.seed_fingerprint()
    assert remembered == (None if isinstance(store, MemoryStore) else "fp")
    # A durable store takes the same seed once; the memory store, which forgets, every time.
    again = await store.load(RowsSeed(iter([("a", "2")]), "fp"))
    if isinstance(store, MemoryStore):
        assert again is not None and again.applied == 1
    else:
        assert again is None


async def test_the_key_count_follows_every_kind_of_write(store: Store, clock: FakeClock) -> None:
    """count() is kept as keys come and go (the metrics' kv_keys), never counted per call."""
    await store.load(RowsSeed(iter([("s1", "1"), ("s2", "2"), ("s1", "3")]), "fp"))
    assert await store.count() == 2
    await store.set("s1", "overwritten")  # an overwrite adds no key
    await store.set("a", "1", ttl=1)
    await store.set_many([SetItem("b", "1"), SetItem("c", "1"), SetItem("a", "2", ttl=1)])
    assert await store.count() == 5
    assert await store.delete_many(["b", "missing"]) == 1
    assert await store.delete("c") is True
    assert await store.count() == 3
    clock.advance(2)  # "a" expires: still a row until purged
    assert await store.count() == 3
    assert await store.purge_expired(10) == 1
    assert await store.count() == 2


# --- the history ----------------------------------------------------------------------------


async def all_changes(store: Store, since: int = 0, prefix: str = "") -> list[Change]:
    return list((await store.changes(prefix, since, 1000)).events)


async def test_each_write_records_its_changes_in_revision_order(
    store: Store, clock: FakeClock
) -> None:
    start = await store.revision()
    a = (await store.set("a", "1")).version
    b = await store.set("b", "2", ttl=30)
    assert await store.delete("a") is True
    batch = await store.set_many([SetItem("c", "3"), SetItem("b", "4"), SetItem("c", "5")])
    assert await store.delete_many(["c", "missing", "c"]) == 1
    # Writes that change nothing are not changes.
    assert await store.delete("missing") is False
    assert await store.delete_many(["missing"]) == 0
    with pytest.raises(PreconditionFailed):
        await store.set("b", "x", condition=IfAbsent())
    changes = await store.changes("", start, 1000)
    assert changes.events == [
        Change(a, "set", "a", "1", None),
        Change(b.version, "set", "b", "2", b.expires_at),
        Change(a + 2, "delete", "a"),
        Change(batch, "set", "b", "4", None),
        Change(batch, "set", "c", "5", None),
        Change(batch + 1, "delete", "c"),
    ]
    assert changes.revision == batch + 1 == await store.revision()
    assert changes.more is False
    assert (await store.changes("", batch + 1, 1000)).events == []


async def test_changes_under_a_prefix_are_only_its_keys(store: Store) -> None:
    for key in KEYS_IN_UTF8_ORDER:
        await store.set(key, "v")
    revision = await store.set_many([SetItem(key, "w") for key in reversed(KEYS_IN_UTF8_ORDER)])
    changes = await store.changes("a", 0, 1000)
    assert [(event.revision, event.key) for event in changes.events] == [
        *(
            (revision - 11 + KEYS_IN_UTF8_ORDER.index(key), key)
            for key in ("a", "a/b", "a:b", "ab")
        ),
        *((revision, key) for key in ("a", "a/b", "a:b", "ab")),
    ]
    assert changes.revision == revision
    # Within a revision, keys come in UTF-8 byte order, as listings give them.
    assert [event.key for event in await all_changes(store, revision - 1)] == KEYS_IN_UTF8_ORDER
    assert await all_changes(store, 0, "😀") == [
        Change(revision - 1, "set", "😀", "v"),
        Change(revision, "set", "😀", "w"),
    ]
    empty = await store.changes("nothing", 0, 1000)
    assert empty.events == [] and empty.revision == revision


async def test_a_limit_never_splits_a_revision(store: Store) -> None:
    before = (await store.set("first", "0")).version
    batch = await store.set_many([SetItem(f"k{index}", str(index)) for index in range(5)])
    after = (await store.set("last", "6")).version
    cut = await store.changes("", before, 2)
    assert [event.key for event in cut.events] == ["k0", "k1", "k2", "k3", "k4"]
    assert cut.more is True and {event.revision for event in cut.events} == {batch}
    assert (await store.changes("", before, 5)).more is True
    whole = await store.changes("", before, 6)
    assert len(whole.events) == 6 and whole.more is False and whole.revision == after
    # A cut at the last revision under the prefix is not "more".
    under_k = await store.changes("k", before, 1)
    assert len(under_k.events) == 5 and under_k.more is False
    resumed = await store.changes("", cut.events[-1].revision, 2)
    assert resumed.events == [Change(after, "set", "last", "6")] and resumed.more is False


async def test_an_answer_of_large_values_stops_early_at_a_revision(store: Store) -> None:
    big = "x" * (PAGE_VALUE_CHARS // 4)
    for index in range(6):
        await store.set_many([SetItem(f"k{index}a", big), SetItem(f"k{index}b", "small")])
    changes = await store.changes("", 0, 1000)
    assert changes.more is True and 8 <= len(changes.events) < 12
    assert len(changes.events) % 2 == 0  # whole revisions
    rest = await store.changes("", changes.events[-1].revision, 1000)
    assert len(changes.events) + len(rest.events) == 12 and rest.more is False


async def test_the_purge_reports_expired_keys_once_in_one_revision(
    store: Store, clock: FakeClock
) -> None:
    await store.set_many([SetItem(f"short{i}", "v", ttl=1) for i in range(4)])
    await store.set("forever", "v")
    clock.advance(2)
    # A delete of an expired key finds nothing: its row stays for the purge to report.
    revision = await store.revision()
    assert await store.delete("short0") is False
    assert await store.delete_many(["short1"]) == 0
    assert await store.revision() == revision
    assert await store.purge_expired(3) == 3
    assert await store.purge_expired(3) == 1
    assert await store.purge_expired(3) == 0
    assert await all_changes(store, revision) == [
        Change(revision + 1, "expire", "short0"),
        Change(revision + 1, "expire", "short1"),
        Change(revision + 1, "expire", "short2"),
        Change(revision + 2, "expire", "short3"),
    ]
    assert await store.revision() == revision + 2


async def test_two_purges_at_once_never_report_one_key_twice(
    store: Store, clock: FakeClock
) -> None:
    """Two handles on one store (two workers on the file, two replicas on the database)."""
    other = await second_handle(store, clock)
    try:
        await store.set_many([SetItem(f"k{i:03d}", "v", ttl=1) for i in range(120)])
        start = await store.revision()
        clock.advance(2)

        async def purge_all(handle: Store) -> int:
            purged = 0
            while removed := await handle.purge_expired(7):
                purged += removed
            return purged

        purged = await asyncio.gather(purge_all(store), purge_all(other))
        assert sum(purged) == 120
        expired = await all_changes(store, start)
        assert sorted(event.key for event in expired) == [f"k{i:03d}" for i in range(120)]
        assert {event.type for event in expired} == {"expire"}
    finally:
        if other is not store:
            await other.close()


async def second_handle(store: Store, clock: FakeClock) -> Store:
    """Another handle on the same data, as another process would open it (the memory store
    lives in one process: its own handle)."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path, store.durability, clock)
    if isinstance(store, PostgresStore):
        # As the first was opened: through the same pooler, with the same pooler setting.
        return await PostgresStore.open(store._url, clock=clock, pooler=store._pooler)
    return store


async def test_since_outside_the_history_is_refused(store: Store) -> None:
    await store.set("a", "1")
    revision = (await store.set("a", "2")).version
    assert len(await all_changes(store, 0)) == 2
    with pytest.raises(UnknownRevision) as unknown:
        await store.changes("", revision + 1, 10)
    assert unknown.value.revision == revision
    with pytest.raises(UnknownRevision):
        await store.changes("other", revision + 1, 10)
    with pytest.raises(Compacted) as compacted:
        await store.changes("", -1, 10)
    assert compacted.value.compact_revision == 0


async def test_a_seed_is_not_events_and_moves_the_compact_revision(store: Store) -> None:
    await store.set("before", "1")
    await store.load(RowsSeed(iter([("a", "1"), ("b", "2")]), "fp"))
    seeded = await store.revision()
    assert await store.history() == HistoryStats(rows=1, compact_revision=seeded)
    with pytest.raises(Compacted) as compacted:
        await store.changes("", seeded - 1, 10)
    assert compacted.value.compact_revision == seeded
    assert await all_changes(store, seeded) == []
    written = await store.set("after", "3")
    assert await all_changes(store, seeded) == [Change(written.version, "set", "after", "3")]


async def test_trimming_keeps_at_most_max_rows_whole_revisions_at_a_time(store: Store) -> None:
    start = await store.revision()  # this life's start; the revisions below count from it
    for index in range(6):
        await store.set(f"k{index}", "v")  # revisions 1 to 6
    await store.set_many([SetItem("x", "1"), SetItem("y", "2"), SetItem("z", "3")])  # 7
    await store.delete("k5")  # 8
    assert await store.history() == HistoryStats(rows=10, compact_revision=0)
    # 5 rows at most: revisions 1 to 5 go; in batches of 2 rows, one transaction at a time.
    assert await store.trim_history(3600, 5, batch=2) == 2
    assert await store.history() == HistoryStats(rows=8, compact_revision=start + 2)
    assert await store.trim_history(3600, 5, batch=2) == 2
    assert await store.trim_history(3600, 5, batch=2) == 1
    assert await store.trim_history(3600, 5, batch=2) == 0
    assert await store.history() == HistoryStats(rows=5, compact_revision=start + 5)
    # At most 3 rows: revision 7 has to go too, whole, which leaves 1.
    assert await store.trim_history(3600, 3, batch=100) == 4
    assert await store.history() == HistoryStats(rows=1, compact_revision=start + 7)
    with pytest.raises(Compacted):
        await store.changes("", start + 6, 10)
    # A delete just above the compact revision is there for a watcher from it.
    assert await all_changes(store, start + 7) == [Change(start + 8, "delete", "k5")]
    # Once the delete's own revision is the compact one, a watcher from it misses nothing.
    assert await store.trim_history(3600, 0, batch=100) == 1
    assert await store.history() == HistoryStats(rows=0, compact_revision=start + 8)
    assert await all_changes(store, start + 8) == []
    assert (await store.set("k6", "v")).version == start + 9
    assert await all_changes(store, start + 8) == [Change(start + 9, "set", "k6", "v")]


async def test_trimming_drops_what_is_older_than_the_retention(
    store: Store, clock: FakeClock
) -> None:
    """A change is old once a trimming pass that saw it is: each pass marks the revision."""
    start = await store.revision()  # this life's start; the revisions below count from it
    await store.set("old", "1")
    await store.set("old", "2")
    assert await store.trim_history(3600, 1000, batch=100) == 0  # marks revision 2, now
    clock.advance(100)
    await store.set("new", "3")
    assert await store.trim_history(150, 1000, batch=100) == 0  # marks revision 3
    clock.advance(10)
    assert await store.trim_history(105, 1000, batch=100) == 2  # revision 2 is 110 s old
    assert await store.history() == HistoryStats(rows=1, compact_revision=start + 2)
    assert await all_changes(store, start + 2) == [Change(start + 3, "set", "new", "3")]
    clock.advance(100)
    assert await store.trim_history(105, 1000, batch=100) == 1  # revision 3, 110 s old too
    assert await store.history() == HistoryStats(rows=0, compact_revision=start + 3)


async def test_a_page_says_the_revision_it_was_read_at(store: Store) -> None:
    assert (await store.list_keys("", None, 10, values=False)).revision == await store.revision()
    await store.set("a", "1")
    revision = (await store.set("b", "1")).version
    for values in (False, True):
        assert (await store.list_keys("", None, 1, values)).revision == revision
        assert (await store.list_keys("none", None, 1, values)).revision == revision


async def test_listening_hears_every_commit_that_takes_a_revision(store: Store) -> None:
    woken = asyncio.Event()
    listening = asyncio.ensure_future(store.listen(woken.set))
    try:
        await asyncio.wait_for(woken.wait(), 5)  # stores that poll wake once at first
        for write in (
            store.set("a", "1"),
            store.set_many([SetItem("b", "2")]),
            store.delete("a"),
            store.delete_many(["b"]),
        ):
            woken.clear()
            await write
            await asyncio.wait_for(woken.wait(), 5)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


# --- bulk loads and exports -------------------------------------------------------------------


async def exported(store: Store, prefix: str = "") -> tuple[list[BulkRow], int]:
    """The export's rows (as BulkRows, whatever tuples the store gives) and its revision."""
    async with store.export(prefix) as snapshot:
        rows = [BulkRow(*row) async for batch in snapshot.batches() for row in batch]
        return rows, snapshot.revision


async def test_an_import_keeps_expiry_takes_one_revision_and_counts_its_keys(
    store: Store, clock: FakeClock
) -> None:
    old = await store.set("old", "1")
    expires = int(clock() * 1000) + 60_000
    rows = [("a", "1", expires), ("b", "2", None), ("a", "3", expires + 1)]
    loaded = await store.load(RowsSeed(rows, fingerprint=None))
    assert loaded is not None and (loaded.applied, loaded.removed) == (3, 0)
    assert loaded.revision > old.version and await store.revision() == loaded.revision
    assert await store.get("a") == Entry("3", loaded.revision, expires + 1)
    assert await store.count() == 3
    assert await store.seed_fingerprint() is None  # an import is no seed
    clock.advance(61)
    assert await store.get("a") is None and await value_of(store, "b") == "2"


async def test_a_replace_removes_what_the_rows_lack_under_its_prefix_only(
    store: Store, clock: FakeClock
) -> None:
    for key in ("p/keep", "p/drop", "pq", "other"):
        await store.set(key, "old")
    await store.set("p/expired", "old", ttl=1)
    clock.advance(2)
    loaded = await store.load(RowsSeed([("p/keep", "new"), ("p/new", "new")], None), replace="p/")
    assert loaded is not None and (loaded.applied, loaded.removed) == (2, 2)
    assert await listed(store) == ["other", "p/keep", "p/new", "pq"]
    assert await store.count() == 4
    whole = await store.load(RowsSeed([], None), replace="")
    assert whole is not None and whole.removed == 4 and await listed(store) == []


async def test_a_load_that_changes_nothing_takes_no_revision(store: Store) -> None:
    written = (await store.set("k", "v")).version
    assert await store.load(RowsSeed([], None)) == Loaded(0, 0, written)
    assert await store.load(RowsSeed([], None), replace="none/") == Loaded(0, 0, written)
    assert await store.revision() == written
    await store.changes("", 0, 10)  # the history is untouched: still whole from 0


async def test_a_load_whose_rows_fail_stores_nothing(store: Store) -> None:
    before = await store.set("before", "1")
    rows = ((f"k{n:05}", "v") for n in range(10_000))
    with pytest.raises(SourceFailed):
        await store.load(RowsSeed(rows, None, batch=1000, fail_after=7), replace="")
    assert await listed(store) == ["before"]
    assert await store.revision() == before.version and await store.count() == 1
    # The store goes on: a load and a write after it apply.
    await store.load(RowsSeed([("after", "2")], None))
    await store.set("written", "3")
    assert await listed(store) == ["after", "before", "written"]


async def test_writes_and_reads_go_on_while_a_load_is_staged(store: Store) -> None:
    """Writes that commit before the load's end are overwritten by its rows (it applies
    last); the others are untouched."""
    staging = asyncio.Event()
    proceed = asyncio.Event()

    async def rows() -> AsyncIterator[list[BulkRow]]:
        yield [BulkRow("bulk/1", "loaded")]
        staging.set()
        await proceed.wait()
        yield [BulkRow("bulk/2", "loaded")]

    source = RowsSeed([], None)
    source.batches = rows  # type: ignore[method-assign]
    loading = asyncio.ensure_future(store.load(source))
    await staging.wait()
    written = await store.set("bulk/1", "written meanwhile")
    await store.set("other", "written meanwhile")
    assert await value_of(store, "bulk/1") == "written meanwhile"
    proceed.set()
    loaded = await loading
    assert loaded is not None and loaded.revision >= written.version + 2
    assert await value_of(store, "bulk/1") == "loaded"
    assert await value_of(store, "other") == "written meanwhile"


async def test_an_export_is_live_keys_in_order_at_one_revision(
    store: Store, clock: FakeClock
) -> None:
    await store.set("b", "2", ttl=100)
    await store.set("a", "1")
    await store.set("gone", "x", ttl=1)
    await store.set("p/x", "3")
    clock.advance(2)
    rows, revision = await exported(store)
    expires = (await store.get("b")).expires_at  # type: ignore[union-attr]
    assert rows == [BulkRow("a", "1"), BulkRow("b", "2", expires), BulkRow("p/x", "3")]
    assert revision == await store.revision()
    assert (await exported(store, "p/"))[0] == [BulkRow("p/x", "3")]
    assert await exported(store, "nothing/") == ([], revision)


async def test_an_export_is_one_snapshot_however_long_it_is_read(store: Store) -> None:
    written = await store.set_many([SetItem(f"k{n:05}", "old") for n in range(5000)])
    async with store.export("") as snapshot:
        batches = snapshot.batches()
        first = await batches.__anext__()
        await store.set_many([SetItem(f"k{n:05}", "new") for n in range(5000)])
        await store.delete("k04999")
        await store.set("k99999", "added")
        rest = [row async for batch in batches for row in batch]
    assert len(first) + len(rest) == 5000
    assert {val for _, val, _ in [*first, *rest]} == {"old"}
    assert snapshot.revision == written


async def test_an_export_batch_of_large_values_stops_early(store: Store) -> None:
    await store.set_many([SetItem(f"k{n}", "v" * 300_000) for n in range(20)])
    async with store.export("") as snapshot:
        batches = [[val for _, val, _ in batch] async for batch in snapshot.batches()]
    assert sum(len(batch) for batch in batches) == 20
    # Each stops at the value that takes it past the bound.
    assert max(sum(map(len, batch)) for batch in batches) < EXPORT_BATCH_CHARS + 300_000


# --- transactions ---------------------------------------------------------------------------


async def test_each_compare_kind_and_operator_on_a_live_key(store: Store) -> None:
    version = (await store.set("k", "v")).version
    expectations: list[tuple[Compare, bool]] = [
        (CompareVersion("k", version), True),
        (CompareVersion("k", version + 1), False),
        (CompareVersion("k", version, "!="), False),
        (CompareVersion("k", version + 1, "!="), True),
        (CompareVersion("k", version + 1, "<"), True),
        (CompareVersion("k", version, "<"), False),
        (CompareVersion("k", version - 1, ">"), True),
        (CompareVersion("k", version, ">"), False),
        (CompareValue("k", "v"), True),
        (CompareValue("k", "w"), False),
        (CompareValue("k", "v", "!="), False),
        (CompareValue("k", "w", "!="), True),
        (CompareExists("k", True), True),
        (CompareExists("k", False), False),
    ]
    for compare, holds in expectations:
        result = await store.txn([compare], [], [])
        assert (result.succeeded, result.failed) == (holds, None if holds else 0), compare
    assert await store.revision() == version  # a compare alone changes nothing


async def test_a_missing_or_expired_key_compares_as_version_0_without_value(
    store: Store, clock: FakeClock
) -> None:
    await store.set("expiring", "v", ttl=1)
    clock.advance(2)
    for key in ("missing", "expiring"):
        holding: list[Compare] = [
            CompareVersion(key, 0),
            CompareVersion(key, 1, "<"),
            CompareVersion(key, 5, "!="),
            CompareValue(key, "v", "!="),
            CompareValue(key, "", "!="),
            CompareExists(key, False),
        ]
        assert (await store.txn(holding, [], [])).succeeded, key
        failing: Compare
        for failing in (
            CompareVersion(key, 0, ">"),
            CompareValue(key, "v"),
            CompareValue(key, ""),
            CompareExists(key, True),
        ):
            assert (await store.txn([failing], [], [])).failed == 0, failing


async def test_the_failure_branch_runs_and_names_the_first_failing_compare(store: Store) -> None:
    version = (await store.set("a", "1")).version
    result = await store.txn(
        [CompareValue("a", "1"), CompareExists("b", True), CompareValue("a", "2")],
        [TxnSet("won", "yes")],
        [TxnGet("a"), TxnSet("lost", "yes")],
    )
    assert result == TxnResult(
        False, version + 1, 1, [GotKey("a", "1", version), SetKey("lost", version + 1)]
    )
    assert await store.get("won") is None
    assert await store.get("lost") == Entry("yes", version + 1, None)


async def test_a_branch_is_one_revision_and_its_operations_see_each_other(
    store: Store, clock: FakeClock
) -> None:
    await store.set_many([SetItem("tmp/1", "x"), SetItem("tmp/2", "y"), SetItem("old", "o")])
    await store.set("tmp/gone", "z", ttl=1)
    version = (await store.set("cfg", "blue")).version
    clock.advance(2)  # tmp/gone expired: not deleted, not counted, left for the purge
    result = await store.txn(
        [CompareValue("cfg", "blue"), CompareVersion("cfg", version - 1, ">")],
        [
            TxnGet("new"),
            TxnSet("new", "1", ttl=60),
            TxnGet("new"),
            TxnDelete("old"),
            TxnDelete("missing"),
            TxnDeletePrefix("tmp/"),
            TxnGet("tmp/1"),
            TxnSet("cfg", "green"),
        ],
        [],
    )
    revision = version + 1
    assert result == TxnResult(
        True,
        revision,
        None,
        [
            GotKey("new", None, None),
            SetKey("new", revision),
            GotKey("new", "1", revision),
            DeletedKey("old", True),
            DeletedKey("missing", False),
            DeletedPrefix("tmp/", 2),
            GotKey("tmp/1", None, None),
            SetKey("cfg", revision),
        ],
    )
    assert await store.revision() == revision
    assert await store.get("new") == Entry("1", revision, round((clock.now + 60) * 1000))
    assert await store.get("cfg") == Entry("green", revision, None)
    assert await all_changes(store, version) == [
        Change(revision, "set", "cfg", "green", None),
        Change(revision, "set", "new", "1", round((clock.now + 60) * 1000)),
        Change(revision, "delete", "old"),
        Change(revision, "delete", "tmp/1"),
        Change(revision, "delete", "tmp/2"),
    ]
    # The expired row stays for the purge, which reports it.
    assert await store.count() == 3  # cfg, new, tmp/gone
    assert await store.purge_expired(10) == 1
    assert (await all_changes(store, revision)) == [Change(revision + 1, "expire", "tmp/gone")]


async def test_a_transaction_that_changes_nothing_takes_no_revision(store: Store) -> None:
    version = (await store.set("a", "1")).version
    quiet = [
        ([], [TxnGet("a"), TxnDelete("missing"), TxnDeletePrefix("none/")], []),
        ([CompareExists("a", False)], [TxnSet("b", "1")], []),
        ([CompareExists("a", False)], [TxnSet("b", "1")], [TxnGet("b")]),
        ([], [], []),
    ]
    for compares, success, failure in quiet:
        result = await store.txn(compares, success, failure)  # type: ignore[arg-type]
        assert result.revision == version
    assert await store.revision() == version
    assert await all_changes(store, version) == []
    assert (await store.set("c", "1")).version == version + 1  # no number was skipped


async def test_a_transaction_keeps_the_key_count(store: Store) -> None:
    await store.set_many([SetItem("p/1", "1"), SetItem("p/2", "2"), SetItem("q", "3")])
    assert await store.count() == 3
    await store.txn([], [TxnSet("q", "4"), TxnSet("r", "5"), TxnDeletePrefix("p/")], [])
    assert await store.count() == 2
    await store.txn([], [TxnDelete("q"), TxnSet("s", "6")], [])
    assert await store.count() == 2
    assert await listed(store) == ["r", "s"]


async def test_transactions_submitted_together_let_exactly_one_compare_and_set_through(
    store: Store,
) -> None:
    """Transactions and single writes submitted together each take their own revision, in
    order, and compare-and-set on one key lets exactly one of several through."""
    start = (await store.set("n", "0")).version
    outcomes, _ = await asyncio.gather(
        asyncio.gather(
            *(
                store.txn([CompareVersion("n", start)], [TxnSet("n", str(i))], [TxnGet("n")])
                for i in range(5)
            )
        ),
        store.set("other", "x"),
    )
    assert [result.succeeded for result in outcomes].count(True) == 1
    assert await store.revision() == start + 2


# --- leases -----------------------------------------------------------------------------------


async def test_a_lease_is_granted_kept_alive_and_read_without_a_revision(
    store: Store, clock: FakeClock
) -> None:
    start = await store.revision()
    lease = await store.grant_lease(10)
    assert lease.ttl == 10 and lease.expires_at == round((clock.now + 10) * 1000)
    assert len(lease.id) == 32 and lease.id != (await store.grant_lease(10)).id
    written = await store.set("leased/b", "2", lease=lease.id)
    await store.set("leased/a", "1", lease=lease.id)
    await store.set("free", "3", ttl=100)
    assert written.expires_at == lease.expires_at
    revision = await store.revision()
    assert revision == start + 3
    clock.advance(6)
    renewed = await store.keepalive_lease(lease.id)
    assert renewed == Lease(lease.id, 10, round((clock.now + 10) * 1000))
    # The keepalive moved the keys' expiry with the lease's: no revision, no change, and the
    # sets' changes still say what they set.
    assert await store.revision() == revision
    assert await all_changes(store, start) == [
        Change(start + 1, "set", "leased/b", "2", lease.expires_at),
        Change(start + 2, "set", "leased/a", "1", lease.expires_at),
        Change(start + 3, "set", "free", "3", round((clock.now - 6 + 100) * 1000)),
    ]
    entry = await store.get("leased/b")
    assert entry == Entry("2", written.version, renewed.expires_at)
    info = await store.lease_keys(lease.id)
    assert info.lease == renewed and list(info.keys) == ["leased/a", "leased/b"]
    clock.advance(6)  # past the first expiry, not the renewed one
    assert await value_of(store, "leased/a") == "1"
    assert await listed(store, "leased/") == ["leased/a", "leased/b"]


async def test_a_revoked_lease_deletes_its_keys_in_one_revision(
    store: Store, clock: FakeClock
) -> None:
    lease = await store.grant_lease(10)
    empty = await store.grant_lease(10)
    for key in ("k/2", "k/1", "k/3"):
        await store.set(key, "v", lease=lease.id)
    await store.set("k/3", "detached")  # a set without the lease detaches the key
    revision = await store.revision()
    assert await store.revoke_lease(lease.id) == 2
    assert await all_changes(store, revision) == [
        Change(revision + 1, "delete", "k/1"),
        Change(revision + 1, "delete", "k/2"),
    ]
    assert await listed(store, "k/") == ["k/3"]
    assert await store.count() == 1
    assert await store.revoke_lease(empty.id) == 0  # no keys: no revision
    assert await store.revision() == revision + 1
    for gone in (lease.id, empty.id):
        with pytest.raises(LeaseNotFound):
            await store.revoke_lease(gone)
        with pytest.raises(LeaseNotFound):
            await store.keepalive_lease(gone)
        with pytest.raises(LeaseNotFound):
            await store.lease_keys(gone)


async def test_a_keepalive_or_revoke_judges_the_keys_its_lease_has_when_it_writes(
    store: Store, clock: FakeClock
) -> None:
    """What access control rests on (leases.py): a token that may write ``a/`` checked the
    lease when it had only ``a/1``; then ``b/1`` was set under it. The write itself must judge
    ``b/1`` too, and write nothing when refused."""
    judged: list[list[str]] = []

    def may_write_a(keys: Sequence[str]) -> bool:
        judged.append(list(keys))
        return all(key.startswith("a/") for key in keys)

    lease = await store.grant_lease(10)
    other = await store.grant_lease(10)
    await store.set("a/1", "v", lease=lease.id)
    await store.set("a/2", "v", lease=other.id)
    renewed = await store.keepalive_lease(lease.id, may_write_a)
    assert judged == [["a/1"]]
    await store.set("b/1", "v", lease=lease.id)
    revision = await store.revision()
    clock.advance(2)

    with pytest.raises(KeysRefused) as refused:
        await store.keepalive_lease(lease.id, may_write_a)
    assert list(refused.value.keys) == ["a/1", "b/1"]
    with pytest.raises(KeysRefused):  # one refused lease refuses the batch
        await store.keepalive_leases([other.id, lease.id], may_write_a)
    with pytest.raises(KeysRefused):
        await store.revoke_lease(lease.id, may_write_a)
    assert judged[1:] == [["a/1", "b/1"], ["a/1", "a/2", "b/1"], ["a/1", "b/1"]]
    # Nothing was renewed or removed.
    assert (await store.lease_keys(lease.id)).lease == renewed
    assert (await store.lease_keys(other.id)).lease == other
    assert (await store.get("b/1")) == Entry("v", revision, renewed.expires_at)
    assert await store.revision() == revision

    assert [found.id for found in await store.keepalive_leases([other.id], may_write_a)] == [
        other.id
    ]
    assert await store.revoke_lease(lease.id, lambda keys: True) == 2
    with pytest.raises(LeaseNotFound):  # a lease that is not live is not judged
        await store.revoke_lease(lease.id, may_write_a)
    assert judged[4:] == [["a/2"]]


async def test_an_expired_lease_takes_its_keys_in_one_revision_of_expiries(
    store: Store, clock: FakeClock
) -> None:
    lease = await store.grant_lease(5)
    other = await store.grant_lease(50)
    await store.set_many([SetItem("plain", "v", ttl=1)])
    for key in ("a", "c", "b"):
        await store.set(key, "v", lease=lease.id)
    await store.set("kept", "v", lease=other.id)
    assert await store.live_leases() == 2
    revision = await store.revision()
    clock.advance(5)
    # Expired at once everywhere, before any upkeep ran.
    assert await store.get("a") is None
    assert await store.get_many(["a", "b", "kept"]) == {"kept": "v"}
    assert await listed(store) == ["kept"]
    assert await store.live_leases() == 1
    with pytest.raises(LeaseNotFound):
        await store.keepalive_lease(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.lease_keys(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.set("late", "v", lease=lease.id)
    assert await store.revision() == revision
    # The ordinary purge leaves leased keys for the lease's own expiry.
    assert await store.purge_expired(100) == 1
    assert await store.expire_leases(100) == 1
    assert await store.expire_leases(100) == 0
    assert await all_changes(store, revision) == [
        Change(revision + 1, "expire", "plain"),
        Change(revision + 2, "expire", "a"),
        Change(revision + 2, "expire", "b"),
        Change(revision + 2, "expire", "c"),
    ]
    assert await store.count() == 1
    assert await value_of(store, "kept") == "v"


async def test_a_set_with_an_unknown_lease_writes_nothing(store: Store) -> None:
    await store.set("k", "before")
    revision = await store.revision()
    with pytest.raises(LeaseNotFound):
        await store.set("k", "after", lease="0" * 32)
    with pytest.raises(LeaseNotFound):
        await store.txn(
            [],
            [TxnDelete("k"), TxnSet("other", "v"), TxnSet("new", "v", lease="nope")],
            [],
        )
    assert await store.revision() == revision
    assert await value_of(store, "k") == "before"
    assert await store.get("other") is None
    assert await all_changes(store, revision) == []


async def test_a_transaction_sets_keys_with_a_lease(store: Store, clock: FakeClock) -> None:
    lease = await store.grant_lease(10)
    await store.set("detach", "v", lease=lease.id)
    result = await store.txn(
        [CompareExists("detach", True)],
        [TxnSet("t/1", "a", lease=lease.id), TxnSet("detach", "w")],
        # The failure branch names an unknown lease, but does not run.
        [TxnSet("t/2", "b", lease="unknown")],
    )
    assert result.succeeded
    assert (await store.get("t/1")) == Entry("a", result.revision, lease.expires_at)
    assert list((await store.lease_keys(lease.id)).keys) == ["t/1"]
    clock.advance(11)
    assert await store.expire_leases(10) == 1
    assert await listed(store) == ["detach"]


async def test_a_lease_is_one_on_every_handle(store: Store, clock: FakeClock) -> None:
    """Granted through one handle (another worker, another replica), kept alive and revoked
    through the other."""
    other = await second_handle(store, clock)
    try:
        lease = await store.grant_lease(10)
        await other.set("shared", "v", lease=lease.id)
        clock.advance(8)
        renewed = await other.keepalive_lease(lease.id)
        assert (await store.lease_keys(lease.id)).lease == renewed
        clock.advance(8)
        assert await value_of(store, "shared") == "v"
        revision = await store.revision()
        assert await other.revoke_lease(lease.id) == 1
        with pytest.raises(LeaseNotFound):
            await store.keepalive_lease(lease.id)
        assert await all_changes(store, revision) == [Change(revision + 1, "delete", "shared")]
    finally:
        if other is not store:
            await other.close()


async def test_a_set_with_a_lease_keeps_its_condition(store: Store) -> None:
    lease = await store.grant_lease(10)
    first = await store.set("k", "1", condition=IfAbsent(), lease=lease.id)
    revision = await store.revision()
    with pytest.raises(PreconditionFailed) as failed:
        await store.set("k", "2", condition=IfVersion(first.version + 1), lease=lease.id)
    assert failed.value.current == first.version
    with pytest.raises(PreconditionFailed):
        await store.set("k", "2", condition=IfAbsent(), lease=lease.id)
    assert await store.revision() == revision
    second = await store.set("k", "2", condition=IfVersion(first.version), lease=lease.id)
    assert second == Entry("2", revision + 1, lease.expires_at)


# --- access tokens --------------------------------------------------------------------------

# A token's times, ms since the epoch; the stores judge none of them (the caller does).
CREATED = 1_800_000_000_000


def a_token(
    name: str,
    secret: Optional[str] = None,
    rules: tuple[TokenRule, ...] = (TokenRule("", "read"),),
    admin: bool = False,
    expires_at: Optional[int] = None,
) -> Token:
    """A token as a store is given it: its secret (its name unless given) only as a hash."""
    return Token(name, hashed(secret or name), rules, admin, CREATED, expires_at)


async def test_tokens_list_in_name_order_and_are_found_by_their_secrets_hash(
    store: Store,
) -> None:
    made = [
        a_token(
            "b",
            rules=(TokenRule("billing/", "readwrite"), TokenRule("cfg/", "read")),
            expires_at=CREATED + 86_400_000,
        ),
        a_token("a", rules=(), admin=True),
        a_token("é/ключ 🔑", rules=(TokenRule("", "readwrite"),)),
        a_token("B"),
    ]
    for token in made:
        await store.create_token(token)
    # Code point order (UTF-8 byte order), as keys list.
    assert [token.name for token in await store.tokens()] == ["B", "a", "b", "é/ключ 🔑"]
    assert list(await store.tokens()) == sorted(made, key=lambda token: token.name)
    for token in made:
        assert await store.token_by_hash(token.secret_hash) == token
    assert await store.token_by_hash(hashed("unknown")) is None


async def test_a_taken_name_is_refused_and_nothing_is_written(store: Store) -> None:
    first = a_token("svc")
    await store.create_token(first)
    generation = await store.tokens_generation()
    with pytest.raises(TokenExists) as refused:
        await store.create_token(a_token("svc", "another secret", admin=True))
    assert refused.value.name == "svc"
    assert list(await store.tokens()) == [first]
    assert await store.token_by_hash(hashed("another secret")) is None
    assert await store.tokens_generation() == generation


async def test_a_rotation_keeps_the_replaced_secret_only_for_its_grace_period(
    store: Store,
) -> None:
    token = a_token("svc", "one")
    await store.create_token(token)
    until = CREATED + 60_000
    graced = await store.rotate_token("svc", hashed("two"), until)
    assert graced == dataclasses.replace(
        token, secret_hash=hashed("two"), previous_hash=hashed("one"), previous_until=until
    )
    assert list(await store.tokens()) == [graced]
    assert await store.token_by_hash(hashed("one")) == graced
    assert await store.token_by_hash(hashed("two")) == graced
    # Without a grace period the replaced secret stops at once, and so does the one before.
    abrupt = await store.rotate_token("svc", hashed("three"), None)
    assert abrupt == dataclasses.replace(token, secret_hash=hashed("three"))
    for gone in ("one", "two"):
        assert await store.token_by_hash(hashed(gone)) is None
    assert await store.token_by_hash(hashed("three")) == abrupt
    # A grace period keeps only the secret just replaced.
    again = await store.rotate_token("svc", hashed("four"), until)
    assert (again.previous_hash, again.previous_until) == (hashed("three"), until)
    generation = await store.tokens_generation()
    with pytest.raises(TokenNotFound) as missing:
        await store.rotate_token("missing", hashed("five"), None)
    assert missing.value.name == "missing"
    assert await store.token_by_hash(hashed("five")) is None
    assert list(await store.tokens()) == [again]
    assert await store.tokens_generation() == generation


async def test_a_deleted_token_takes_both_its_secrets_and_frees_its_name(store: Store) -> None:
    await store.create_token(a_token("svc", "one"))
    await store.rotate_token("svc", hashed("two"), CREATED + 60_000)
    await store.create_token(a_token("other"))
    assert await store.delete_token("svc") is True
    assert [token.name for token in await store.tokens()] == ["other"]
    for secret in ("one", "two"):
        assert await store.token_by_hash(hashed(secret)) is None
    assert await store.delete_token("svc") is False
    await store.create_token(a_token("svc", "three"))
    assert (await store.token_by_hash(hashed("three"))) == a_token("svc", "three")


async def test_a_touch_records_the_last_use_never_backwards_and_skips_names_no_longer_there(
    store: Store,
) -> None:
    await store.create_token(a_token("a"))
    await store.create_token(a_token("b"))
    await store.touch_tokens({"a": CREATED + 5, "gone": CREATED + 6})
    assert [(t.name, t.last_used_at) for t in await store.tokens()] == [
        ("a", CREATED + 5),
        ("b", None),
    ]
    await store.touch_tokens({"b": CREATED + 8, "a": CREATED + 7})
    await store.touch_tokens({})
    assert [(t.name, t.last_used_at) for t in await store.tokens()] == [
        ("a", CREATED + 7),
        ("b", CREATED + 8),
    ]
    assert (await store.token_by_hash(hashed("b"))) == dataclasses.replace(
        a_token("b"), last_used_at=CREATED + 8
    )
    # Workers and replicas touch on their own schedules: one whose batch is older than what
    # another wrote does not move the last use back.
    await store.touch_tokens({"a": CREATED + 6, "b": CREATED + 9})
    assert [(t.name, t.last_used_at) for t in await store.tokens()] == [
        ("a", CREATED + 7),
        ("b", CREATED + 9),
    ]


async def test_the_generation_moves_on_every_create_rotation_and_delete_only(
    store: Store,
) -> None:
    seen = [await store.tokens_generation()]

    async def moved() -> bool:
        seen.append(await store.tokens_generation())
        return seen[-1] != seen[-2]

    await store.create_token(a_token("a"))
    assert await moved()
    await store.rotate_token("a", hashed("new"), None)
    assert await moved()
    await store.rotate_token("a", hashed("newer"), CREATED)
    assert await moved()
    await store.touch_tokens({"a": CREATED})
    await store.set("k", "v")
    await store.delete_token("missing")
    with contextlib.suppress(TokenExists):
        await store.create_token(a_token("a"))
    with contextlib.suppress(TokenNotFound):
        await store.rotate_token("missing", hashed("x"), None)
    await store.tokens()
    await store.token_by_hash(hashed("newer"))
    assert not await moved()
    assert await store.delete_token("a") is True
    assert await moved()
    assert len(set(seen)) == len(seen) - 1  # never back to an earlier one


async def test_tokens_are_no_keys_no_revision_no_change_no_export_untouched_by_loads(
    store: Store,
) -> None:
    await store.set("k", "v")
    revision = await store.revision()
    await store.create_token(a_token("a", "one"))
    await store.create_token(a_token("b"))
    await store.rotate_token("a", hashed("two"), CREATED + 60_000)
    await store.touch_tokens({"b": CREATED})
    await store.delete_token("b")
    assert await store.revision() == revision
    assert await all_changes(store, revision - 1) == [Change(revision, "set", "k", "v")]
    assert await store.count() == 1 and await listed(store) == ["k"]
    assert await exported(store) == ([BulkRow("k", "v")], revision)
    kept = list(await store.tokens())
    # An import that replaces everything, and a seed: keys only.
    await store.load(RowsSeed([("imported", "1")], None), replace="")
    await store.load(RowsSeed([("seeded", "2")], "fp"))
    assert await listed(store) == ["imported", "seeded"]
    assert list(await store.tokens()) == kept
    assert await store.token_by_hash(hashed("one")) == kept[0]


async def test_a_refused_token_write_does_not_fail_its_neighbours(store: Store) -> None:
    """Submitted together (one group, in the sqlite store), each gets its own answer."""
    await store.create_token(a_token("taken"))
    answers = await asyncio.gather(
        store.create_token(a_token("taken", "again")),
        store.set("k", "v"),
        store.rotate_token("missing", hashed("x"), None),
        store.create_token(a_token("new")),
        return_exceptions=True,
    )
    assert isinstance(answers[0], TokenExists) and isinstance(answers[2], TokenNotFound)
    assert answers[1] == Entry("v", await store.revision(), None) and answers[3] is None
    assert [token.name for token in await store.tokens()] == ["new", "taken"]


async def test_tokens_are_one_on_every_handle_at_once(store: Store, clock: FakeClock) -> None:
    """Written through one handle (a worker on the same file, a replica on the same database),
    read through the other at once, the generation included."""
    other = await second_handle(store, clock)
    try:
        await store.create_token(a_token("svc", "one"))
        assert await other.tokens_generation() == await store.tokens_generation()
        assert await other.token_by_hash(hashed("one")) == a_token("svc", "one")
        rotated = await other.rotate_token("svc", hashed("two"), None)
        assert await store.tokens_generation() == await other.tokens_generation()
        assert await store.token_by_hash(hashed("one")) is None
        assert list(await store.tokens()) == [rotated]
        await other.touch_tokens({"svc": CREATED + 1})
        assert (await store.tokens())[0].last_used_at == CREATED + 1
        assert await store.delete_token("svc") is True
        assert await other.tokens() == [] and await other.token_by_hash(hashed("two")) is None
        assert await other.tokens_generation() == await store.tokens_generation()
    finally:
        if other is not store:
            await other.close()


async def test_of_creates_racing_on_two_handles_one_wins_the_other_gets_token_exists(
    store: Store, clock: FakeClock
) -> None:
    other = await second_handle(store, clock)
    try:
        for round in range(5):
            name = f"race-{round}"
            here, there = a_token(name, f"{name} here"), a_token(name, f"{name} there")
            answers = await asyncio.gather(
                store.create_token(here), other.create_token(there), return_exceptions=True
            )
            assert sorted(type(answer).__name__ for answer in answers) == [
                "NoneType",
                "TokenExists",
            ]
            winner, loser = (here, there) if answers[0] is None else (there, here)
            assert await other.token_by_hash(winner.secret_hash) == winner
            assert await store.token_by_hash(loser.secret_hash) is None
        assert len(await store.tokens()) == 5
    finally:
        if other is not store:
            await other.close()


async def test_a_token_survives_its_writers_close(store: Store, clock: FakeClock) -> None:
    """Written through a handle then closed (a worker or replica stopped), and read by one
    opened after (one started again: the schema checked, a new life begun)."""
    writer = await second_handle(store, clock)
    await writer.create_token(a_token("kept", rules=(TokenRule("p/", "readwrite"),)))
    rotated = await writer.rotate_token("kept", hashed("new"), CREATED + 1)
    generation = await writer.tokens_generation()
    if writer is not store:
        await writer.close()
    reopened = await second_handle(store, clock)
    try:
        assert list(await reopened.tokens()) == [rotated]
        assert await reopened.token_by_hash(hashed("kept")) == rotated
        assert await reopened.tokens_generation() == generation
    finally:
        if reopened is not store:
            await reopened.close()
