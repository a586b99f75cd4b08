"""What only the durable store promises: persistence, and leaving foreign files alone."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mapmg_data_engineer_takehome.models import MAX_BATCH_WRITES
from mapmg_data_engineer_takehome.store import SqliteStore, Store, StoreCorrupt, StoreUnavailable
from mapmg_data_engineer_takehome.store.base import (
    Change,
    Compacted,
    LeaseNotFound,
    SetItem,
    Token,
    TokenRule,
    UnknownRevision,
)
from mapmg_data_engineer_takehome.store.sqlite import SCHEMA_VERSION
from mapmg_data_engineer_takehome.store.sqlite.commit import SetOne
from mapmg_data_engineer_takehome.store.sqlite.store import TOKEN_BY_HASH

from .conftest import RowsSeed, hashed, value_of


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_data_survives_close_and_reopen(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "kv.sqlite3"
    store = SqliteStore(path, durability)
    await store.set("kept", "1")
    await store.set("gone", "2")
    await store.delete("gone")
    await store.load(RowsSeed(iter([("seeded", "3")]), "fp"))
    await store.create_token(Token("kept", hashed("one"), (TokenRule("", "read"),), True, 1))
    rotated = await store.rotate_token("kept", hashed("two"), 2)
    generation = await store.tokens_generation()
    await store.close()

    reopened = SqliteStore(path, durability)
    assert await value_of(reopened, "kept") == "1"
    assert await value_of(reopened, "gone") is None
    assert await value_of(reopened, "seeded") == "3"
    assert await reopened.seed_fingerprint() == "fp"
    assert list(await reopened.tokens()) == [rotated]
    assert await reopened.token_by_hash(hashed("one")) == rotated
    assert await reopened.tokens_generation() == generation
    await reopened.close()


async def test_a_token_is_found_by_either_hash_through_an_index(tmp_path: Path) -> None:
    """token_by_hash runs on every request whose secret a worker has not cached: two index
    searches, never a scan of the table, however many tokens there are."""
    store = SqliteStore(tmp_path / "kv.sqlite3")
    await store.close()
    conn = sqlite3.connect(str(tmp_path / "kv.sqlite3"))
    try:
        plan = [
            row[3]
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN {TOKEN_BY_HASH}", (hashed("a"), hashed("a"))
            )
        ]
    finally:
        conn.close()
    searches = [step for step in plan if step.startswith("SEARCH tokens USING")]
    assert len(searches) == 2 and not any(step.startswith("SCAN") for step in plan)
    assert any("(secret_hash=?)" in step for step in searches)
    assert any("(previous_hash=?)" in step for step in searches)


async def test_a_failed_group_of_reads_fails_each_of_its_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GETs are read in groups: when the group's query fails, every request in it gets the
    error (none waits forever), and the next group reads again."""
    store = SqliteStore(tmp_path / "kv.sqlite3")
    await store.set("k", "v")

    def broken(sql: str, parameters: object) -> list[object]:
        raise StoreUnavailable("the disk went away")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_read", broken)
        answers = await asyncio.gather(
            *(store.get(key) for key in ("k", "k", "other")), return_exceptions=True
        )
    assert [type(answer) for answer in answers] == [StoreUnavailable] * 3
    assert await value_of(store, "k") == "v"
    await store.close()


async def test_a_group_whose_write_breaks_fails_each_of_its_writes_and_commits_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that raises what no store should (a bug) fails every write of its group,
    none of which is committed, instead of leaving their callers waiting; the next group
    commits."""
    store = SqliteStore(tmp_path / "kv.sqlite3")
    real_apply = SetOne.apply

    def apply(self: SetOne, tx: Any) -> Any:
        if self.key == "bad":
            raise RuntimeError("a bug")
        return real_apply(self, tx)

    with monkeypatch.context() as patched:
        patched.setattr(SetOne, "apply", apply)
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(store.set(key, "v") for key in ("a", "bad", "c")), return_exceptions=True
            ),
            timeout=10,
        )
    assert [type(answer) for answer in answers] == [RuntimeError] * 3
    assert await store.get_many(["a", "c"]) == {}
    await store.set("a", "after")
    assert await value_of(store, "a") == "after"
    await store.close()


async def test_data_directory_is_created(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a" / "b" / "kv.sqlite3")
    await store.set("k", "v")
    await store.close()
    assert (tmp_path / "a" / "b" / "kv.sqlite3").is_file()


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    path.write_bytes(b"my precious notes" * 100)
    with pytest.raises(StoreCorrupt, match=str(path)):
        SqliteStore(path)
    assert path.read_bytes() == b"my precious notes" * 100


def test_a_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    conn = sqlite3.connect(str(path))
    conn.execute("create table invoices(id integer primary key, total real)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match="did not create"):
        SqliteStore(path)
    assert path.read_bytes() == before


async def test_the_data_file_uses_wal_and_the_chosen_synchronous_level(tmp_path: Path) -> None:
    for durability, level in (("normal", 1), ("full", 2)):
        store = SqliteStore(tmp_path / f"{durability}.sqlite3", durability)
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
        await store.close()


def wal_size(path: Path) -> int:
    return os.path.getsize(f"{path}-wal")


@pytest.mark.slow  # 19,200 writes, seconds each run
@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_the_wal_stays_small_under_endless_writes_and_reads(
    tmp_path: Path, durability: str
) -> None:
    """SQLite rewinds the WAL only after a checkpoint that nothing interrupted; a read left
    open, or checkpoints racing the writes, make it grow without bound instead."""
    path = tmp_path / "kv.sqlite3"
    store = SqliteStore(path, durability)
    try:
        for round_number in range(300):
            await asyncio.gather(
                *(store.set(f"w:{(round_number * 64 + n) * 7919 % 50_000}", "x" * 40)
                  for n in range(64))
            )  # fmt: skip
            for n in range(20):
                await value_of(store, f"w:{n * 37}")
            await asyncio.sleep(0)  # a turn of the loop ends the reads' snapshot
        wal = wal_size(path)
        # 19,200 writes over 50,000 keys touch far more than 16 MiB of pages in all.
        assert wal < 16 * 1024 * 1024, f"WAL is {wal / 2**20:.0f} MiB"
    finally:
        await store.close()


FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASE_1_CONTENTS = {
    "seeded:1": "one",
    "seeded:2": "two",
    "overwritten": "by a client",
    "a/b?c#d %20 ключ 🔑": "välue\nwith newline",
    "empty value": "",
}


def assert_current_and_intact(path: Path) -> None:
    """The file is at this release's schema, and SQLite finds nothing wrong in it."""
    conn = sqlite3.connect(str(path))
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


async def test_a_file_of_release_1_is_upgraded_in_place_losing_nothing(tmp_path: Path) -> None:
    """tests/kv/fixtures/kv-schema-1.sqlite3 was written by release 1.0.0 (schema 1)."""
    path = tmp_path / "kv.sqlite3"
    shutil.copyfile(FIXTURES / "kv-schema-1.sqlite3", path)
    store = SqliteStore(path)
    try:
        page = await store.list_keys("", None, 100, values=True)
        assert {item.key: item.val for item in page.keys} == RELEASE_1_CONTENTS
        assert {(item.version, item.expires_at) for item in page.keys} == {(1, None)}
        assert await store.get("deleted") is None
        assert await store.seed_fingerprint() == (
            "550a18265d3d11a31c58eec88a4183a6cf5ac74c3b36bd628a9c83d6b73df423"
        )
        written = await store.set("new", "after the upgrade", ttl=60)
        # The first write of the store's new life, which began above the file's revision (1).
        assert written.version > 2 and written.expires_at is not None
    finally:
        await store.close()
    assert_current_and_intact(path)
    reopened = SqliteStore(path)  # already upgraded: opens as it is
    try:
        assert await value_of(reopened, "new") == "after the upgrade"
        assert await reopened.count() == len(RELEASE_1_CONTENTS) + 1
    finally:
        await reopened.close()


RELEASE_2_LISTING = [
    ("a/b?c#d %20 ключ 🔑", "välue\nwith newline", 3, None),
    ("batch/1", "x", 6, None),
    ("batch/2", "y", 6, None),
    ("empty value", "", 8, None),
    ("expires", "in 2027", 7, 1_831_536_000_000),
    ("overwritten", "by a client", 2, None),
    ("seeded:1", "one", 1, None),
    ("seeded:2", "two", 1, None),
]


async def test_a_file_of_the_release_before_the_history_is_upgraded_in_place(
    tmp_path: Path,
) -> None:
    """tests/kv/fixtures/kv-schema-2.sqlite3 has versions and expiry but no history: the
    upgrade keeps every key, version and expiry, and starts a history that is whole above the
    revision the file was at (8), so a watcher from before it is told to list again. Its
    opening here begins a life at the clock in microseconds, above 8."""
    path = tmp_path / "kv.sqlite3"
    shutil.copyfile(FIXTURES / "kv-schema-2.sqlite3", path)
    store = SqliteStore(path, clock=lambda: 1_800_000_100.0)
    life = 1_800_000_100_000_000
    try:
        page = await store.list_keys("", None, 100, values=True)
        assert page.revision == life
        listing = [(item.key, item.val, item.version, item.expires_at) for item in page.keys]
        assert listing == RELEASE_2_LISTING
        assert await store.seed_fingerprint() == "schema-2-fixture-seed"
        assert await store.count() == len(RELEASE_2_LISTING)
        with pytest.raises(Compacted) as compacted:
            await store.changes("", 7, 100)
        assert compacted.value.compact_revision == 8
        assert (await store.changes("", 8, 100)).events == []
        await store.set("new", "after the upgrade")
        assert await store.delete("deleted") is False
        changes = await store.changes("", 8, 100)
        assert changes.events == [Change(life + 1, "set", "new", "after the upgrade", None)]
        with pytest.raises(UnknownRevision):  # a number this life skipped
            await store.changes("", 9, 100)
        assert (await store.history()).rows == 1
    finally:
        await store.close()
    assert_current_and_intact(path)


class Written(NamedTuple):
    """What a fixture of an earlier release holds, read before its upgrade: its rows (key,
    value, version, expiry) in key order, its history in the feed's order, and the revision
    above which that history is whole."""

    rows: list[tuple[Any, ...]]
    history: list[tuple[Any, ...]]
    compact: int


def written_in_file(path: Path) -> Written:
    conn = sqlite3.connect(str(path))
    try:
        return Written(
            conn.execute("SELECT key, val, version, expires_at FROM kv ORDER BY key").fetchall(),
            conn.execute(
                "SELECT revision, type, key, val, expires_at FROM changes ORDER BY revision, key"
            ).fetchall(),
            int(
                conn.execute("SELECT value FROM meta WHERE name = 'compact_revision'").fetchone()[0]
            ),
        )
    finally:
        conn.close()


async def assert_kept(store: Store, written: Written) -> None:
    """The upgraded ``store`` lists every key of the fixture as it was, and its history."""
    page = await store.list_keys("", None, 100, values=True)
    assert [(i.key, i.val, i.version, i.expires_at) for i in page.keys] == written.rows
    changes = await store.changes("", written.compact, 1000)
    assert [tuple(change) for change in changes.events] == written.history


async def assert_leases_work_after_the_upgrade(store: Store, keys: int) -> None:
    """A store upgraded from the schema-4 fixture (``keys`` keys) remembers its seed, and a
    lease works on it: a key of the fixture set with one, then revoked."""
    assert await store.seed_fingerprint() == "schema-4-fixture-seed"
    lease = await store.grant_lease(60)
    entry = await store.set("txn/1", "leased now", lease=lease.id)
    assert entry.expires_at == lease.expires_at
    assert list((await store.lease_keys(lease.id)).keys) == ["txn/1"]
    assert await store.revoke_lease(lease.id) == 1
    with pytest.raises(LeaseNotFound):
        await store.keepalive_lease(lease.id)
    assert await store.count() == keys - 1


async def test_a_file_of_the_release_before_leases_is_upgraded_keeping_keys_and_history(
    tmp_path: Path,
) -> None:
    """tests/kv/fixtures/kv-schema-4.sqlite3 was written by the release before leases (schema
    4; see the fixtures' README): the upgrade keeps every key, version and expiry and the whole
    history (read from the file before it), and its keys have no lease."""
    path = tmp_path / "kv.sqlite3"
    shutil.copyfile(FIXTURES / "kv-schema-4.sqlite3", path)
    written = written_in_file(path)
    # The fixture is what the README says.
    assert len(written.rows) == 8 and len(written.history) == 10
    store = SqliteStore(path, clock=lambda: 1_800_000_100.0)
    try:
        await assert_kept(store, written)
        await assert_leases_work_after_the_upgrade(store, len(written.rows))
    finally:
        await store.close()
    assert_current_and_intact(path)


async def assert_tokens_work_after_the_upgrade(store: Store, lease: str) -> None:
    """A store upgraded from the schema-5 fixture remembers its seed and keeps its lease
    (``lease``, with the key ``leased/1``, live at the tests' clock); it has no token, and
    tokens work on it."""
    assert await store.seed_fingerprint() == "schema-5-fixture-seed"
    kept = await store.lease_keys(lease)
    assert kept.lease.expires_at == 1_800_003_600_000 and list(kept.keys) == ["leased/1"]
    assert await store.tokens() == [] and await store.token_by_hash(hashed("kv_")) is None
    generation = await store.tokens_generation()
    token = Token("svc", hashed("one"), (TokenRule("", "read"),), False, 1_800_000_100_000)
    await store.create_token(token)
    assert list(await store.tokens()) == [token]
    assert await store.token_by_hash(hashed("one")) == token
    assert await store.tokens_generation() != generation
    assert await store.delete_token("svc") is True


async def test_a_file_of_the_release_before_tokens_is_upgraded_keeping_keys_history_and_leases(
    tmp_path: Path,
) -> None:
    """tests/kv/fixtures/kv-schema-5.sqlite3 was written by the release before access tokens
    (schema 5; see the fixtures' README): the upgrade keeps every key, version, expiry and
    lease, and the whole history (read from the file before it), and it has no token."""
    path = tmp_path / "kv.sqlite3"
    shutil.copyfile(FIXTURES / "kv-schema-5.sqlite3", path)
    written = written_in_file(path)
    conn = sqlite3.connect(str(path))
    try:
        leases = conn.execute("SELECT id FROM leases").fetchall()
    finally:
        conn.close()
    # The fixture is what the README says.
    assert len(written.rows) == 9 and len(written.history) == 11 and len(leases) == 1
    store = SqliteStore(path, clock=lambda: 1_800_000_100.0)
    try:
        await assert_kept(store, written)
        await assert_tokens_work_after_the_upgrade(store, leases[0][0])
        assert await store.count() == len(written.rows)
    finally:
        await store.close()
    assert_current_and_intact(path)


async def test_a_batch_records_one_change_per_key_in_key_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kv.sqlite3")
    try:
        items = [
            SetItem(f"k{index:05d}", str(index)) for index in reversed(range(MAX_BATCH_WRITES))
        ]
        revision = await store.set_many([*items, SetItem("k00000", "last")])
        await store.set("after", "1")
        changes = await store.changes("", revision - 1, 1)
        assert len(changes.events) == MAX_BATCH_WRITES and changes.more is True
        assert [event.key for event in changes.events] == sorted(item.key for item in items)
        assert changes.events[0] == Change(revision, "set", "k00000", "last", None)
    finally:
        await store.close()


def test_a_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    shutil.copyfile(FIXTURES / "kv-schema-1.sqlite3", path)
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match="newer version"):
        SqliteStore(path)
    assert path.read_bytes() == before
