"""Seeding from input.db: the row rules, the report, discovery, errors, read-only access and
the fingerprint rule; directly through ``seed_store`` and through the app's startup."""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapmg_data_engineer_takehome import seed
from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.seed import SeedError, SeedReport, find_input_db, seed_store
from mapmg_data_engineer_takehome.store import MemoryStore, SqliteStore, Store
from mapmg_data_engineer_takehome.store.sqlite import bulk as sqlite_bulk

from .conftest import MakeClient, MakeSettings, OpenStore, value_of, write_input_db

BRIEF_SCHEMA = "create table keys(key text, val text)"
# No declared type: no affinity, so integers and reals stay integers and reals.
UNTYPED_SCHEMA = "create table keys(key, val)"
NO_SKIPS = {"null_key": 0, "null_val": 0, "nul_character": 0, "not_utf8": 0, "empty_key": 0}


# --- helpers ---------------------------------------------------------------------------------


def write_input_sql(path: Path, statements: Sequence[str], schema: str = BRIEF_SCHEMA) -> Path:
    """An input.db made by raw SQL, for values Python cannot bind (invalid UTF-8 TEXT)."""
    conn = sqlite3.connect(str(path))
    try:
        conn.execute(schema)
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    return path


def skips(**counts: int) -> dict[str, int]:
    """The report's skipped mapping: zero for every reason not named."""
    return {**NO_SKIPS, **counts}


@pytest.fixture
async def store(
    store_kind: str, tmp_path: Path, open_test_store: OpenStore
) -> AsyncIterator[Store]:
    """An empty store of each backend, closed after the test."""
    opened = await open_test_store(store_kind, tmp_path / "data")
    yield opened
    await opened.close()


async def assert_contents(store: Store, expected: Mapping[str, str]) -> None:
    """The store holds exactly ``expected``: the same count, and each key's value."""
    assert {key: await value_of(store, key) for key in expected} == dict(expected)
    assert await store.count() == len(expected)


async def seeded(store: Store, path: Path, expected: Mapping[str, str]) -> SeedReport:
    """Seed ``store`` from ``path``, check the result is ``expected`` and return the report."""
    report = await seed_store(store, path)
    assert report.applied
    await assert_contents(store, expected)
    return report


async def get_json(client: TestClient[Any, Any], key: str) -> tuple[int, Any]:
    response = await client.get("/get/" + quote(key, safe=""))
    return response.status, await response.json()


async def assert_served(client: TestClient[Any, Any], expected: Mapping[str, str]) -> None:
    for key, val in expected.items():
        assert await get_json(client, key) == (200, {"key": key, "val": val})


async def assert_startup_fails(make_settings: MakeSettings, **overrides: Any) -> str:
    """Starting the app with these settings raises SeedError; returns its message.

    A TestClient is built by hand rather than with make_client: pytest-aiohttp's
    aiohttp_client forgets a client whose server failed to start, and its unclosed session
    then raises a ResourceWarning (an error here) when it is garbage collected.
    """
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(make_settings(**overrides))))
    try:
        with pytest.raises(SeedError) as info:
            await client.start_server()
    finally:
        await client.close()
    return str(info.value)


def listing(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def snapshot(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` with the sha256 of its bytes."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
        for entry in sorted(directory.iterdir())
    }


# --- the row rules ---------------------------------------------------------------------------


async def test_duplicates_apply_in_rowid_order_last_wins(store: Store, tmp_path: Path) -> None:
    path = write_input_db(
        tmp_path / "input.db", [("a", "1"), ("b", "x"), ("a", "2"), ("c", "y"), ("a", "3")]
    )
    report = await seeded(store, path, {"a": "3", "b": "x", "c": "y"})
    assert (report.rows_read, report.rows_applied, report.skipped) == (5, 5, NO_SKIPS)


async def test_rowid_order_not_insertion_or_index_order(store: Store, tmp_path: Path) -> None:
    # Inserted with descending rowids, beside a wide column that makes SQLite prefer to scan
    # the covering index (in val order) when a query does not ask for rowid order.
    path = write_input_sql(
        tmp_path / "input.db",
        [
            "create index keys_by_val on keys(val, key)",
            "insert into keys(rowid, key, val, pad) values (3, 'k', 'a-rowid-3', zeroblob(5000))",
            "insert into keys(rowid, key, val, pad) values (2, 'k', 'z-rowid-2', zeroblob(5000))",
            "insert into keys(rowid, key, val, pad) values (1, 'k', 'm-rowid-1', zeroblob(5000))",
        ],
        schema="create table keys(key text, val text, pad blob)",
    )
    with sqlite3.connect(str(path)) as conn:
        assert (
            conn.execute("select val from keys").fetchall()
            != conn.execute("select val from keys order by rowid").fetchall()
        )
    conn.close()
    await seeded(store, path, {"k": "a-rowid-3"})


async def test_null_key_or_val_rows_are_skipped_and_counted(store: Store, tmp_path: Path) -> None:
    path = write_input_db(
        tmp_path / "input.db",
        [
            ("keep", "1"),
            (None, "orphan"),
            ("no-val", None),
            (None, None),  # counted once, as a NULL key
            ("keep", None),  # does not erase the earlier value
            ("other", "2"),
        ],
    )
    report = await seeded(store, path, {"keep": "1", "other": "2"})
    assert report.skipped == skips(null_key=2, null_val=2)
    assert (report.rows_read, report.rows_applied) == (6, 2)


async def test_utf8_blobs_are_text_and_other_blobs_are_skipped(
    store: Store, tmp_path: Path
) -> None:
    path = write_input_db(
        tmp_path / "input.db",
        [
            (b"caf\xc3\xa9", "blob key"),
            ("blob val", "\u043a\u043b\u044e\u0447 \U0001f511".encode()),
            (b"both", b"blobs"),
            ("empty blob val", b""),
            (b"\xff\xfe", "bad blob key"),
            ("bad blob val", b"\x80abc"),
            (b"\xc3", b"\xc3"),  # truncated sequence in both: one row, counted once
            ("text", "plain"),
        ],
    )
    with sqlite3.connect(str(path)) as conn:  # the blobs really are stored as BLOB
        types = conn.execute("select count(*) from keys where typeof(key) = 'blob'").fetchone()
    conn.close()
    assert types == (4,)
    report = await seeded(
        store,
        path,
        {
            "caf\u00e9": "blob key",
            "blob val": "\u043a\u043b\u044e\u0447 \U0001f511",
            "both": "blobs",
            "empty blob val": "",
            "text": "plain",
        },
    )
    assert report.skipped == skips(not_utf8=3)
    assert (report.rows_read, report.rows_applied) == (8, 5)
    assert await value_of(store, "bad blob val") is None


async def test_invalid_utf8_text_is_skipped_and_the_rest_loads(
    store: Store, tmp_path: Path
) -> None:
    """SQLite keeps TEXT it never validated; such rows are skipped and the rest loads."""
    path = write_input_sql(
        tmp_path / "input.db",
        [
            "insert into keys values ('first', 'v1')",
            "insert into keys values ('bad val', CAST(X'FF61' AS TEXT))",
            "insert into keys values (CAST(X'C328' AS TEXT), 'bad key')",
            "insert into keys values ('first', 'v2')",
            "insert into keys values (X'626C6F62', X'6F6B')",  # UTF-8 blobs: 'blob' -> 'ok'
            "insert into keys values ('blob bad', X'FF')",  # counted by the tally
            "insert into keys values ('', CAST(X'FF61' AS TEXT))",  # empty key, counted once
            "insert into keys values (NULL, CAST(X'FF61' AS TEXT))",  # NULL key, counted once
            "insert into keys values ('null val', NULL)",
            "insert into keys values ('last', 'v3')",
        ],
        schema=UNTYPED_SCHEMA,
    )
    with sqlite3.connect(str(path)) as conn:
        conn.execute("insert into keys values (7, 2.5)")  # numbers beside it
    conn.close()
    report = await seeded(store, path, {"first": "v2", "blob": "ok", "last": "v3", "7": "2.5"})
    assert report.skipped == skips(not_utf8=3, empty_key=1, null_key=1, null_val=1)
    assert (report.rows_read, report.rows_applied) == (11, 5)
    assert sum(report.skipped.values()) + report.rows_applied == report.rows_read


async def test_invalid_utf8_text_is_skipped_in_the_app(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    path = write_input_sql(
        tmp_path / "input.db",
        [
            "insert into keys values ('good', 'one')",
            "insert into keys values ('bad', CAST(X'FF61' AS TEXT))",
            "insert into keys values ('good too', 'two')",
        ],
    )
    client = await make_client(input_db=path, store=store_kind)
    await assert_served(client, {"good": "one", "good too": "two"})
    status, body = await get_json(client, "bad")
    assert (status, body["error"]) == (404, "key_not_found")


@pytest.mark.parametrize(
    ("schema", "expected_types"),
    [(UNTYPED_SCHEMA, ("integer", "real")), (BRIEF_SCHEMA, ("text", "text"))],
    ids=["stored-as-numbers", "text-affinity"],
)
async def test_numbers_become_their_sqlite_text(
    store: Store, tmp_path: Path, schema: str, expected_types: tuple[str, str]
) -> None:
    path = write_input_sql(
        tmp_path / "input.db",
        [
            "insert into keys values (42, 1.5)",
            "insert into keys values (1.5, 42)",
            "insert into keys values ('neg', -7)",
            "insert into keys values ('round', 100.0)",
            "insert into keys values ('tiny', 0.1)",
            "insert into keys values ('huge', 1e300)",
            "insert into keys values (9223372036854775807, 'max')",
        ],
        schema=schema,
    )
    with sqlite3.connect(str(path)) as conn:
        types = conn.execute("select typeof(key), typeof(val) from keys limit 1").fetchone()
    conn.close()
    assert types == expected_types
    report = await seeded(
        store,
        path,
        {
            "42": "1.5",
            "1.5": "42",
            "neg": "-7",
            "round": "100.0",
            "tiny": "0.1",
            "huge": "1.0e+300",
            "9223372036854775807": "max",
        },
    )
    assert (report.rows_read, report.rows_applied, report.skipped) == (7, 7, NO_SKIPS)


async def test_empty_key_is_skipped_and_counted(store: Store, tmp_path: Path) -> None:
    path = write_input_db(
        tmp_path / "input.db",
        [("", "text key"), (b"", "blob key"), ("", None), (" ", "space is a key")],
    )
    report = await seeded(store, path, {" ": "space is a key"})
    assert report.skipped == skips(empty_key=2, null_val=1)
    assert (report.rows_read, report.rows_applied) == (4, 1)
    assert await value_of(store, "") is None


async def test_report_counts_every_rule_at_once(store: Store, tmp_path: Path) -> None:
    path = write_input_db(
        tmp_path / "input.db",
        [
            ("a", "1"),
            (None, "x"),
            ("b", None),
            (b"\xff", "x"),
            ("", "x"),
            ("a", "2"),
            (3, 4.0),
            (b"c", b"3"),
        ],
    )
    report = await seeded(store, path, {"a": "2", "3": "4.0", "c": "3"})
    assert report.path == str(path)
    assert report.skipped == skips(null_key=1, null_val=1, not_utf8=1, empty_key=1)
    assert (report.rows_read, report.rows_applied) == (8, 4)


async def test_empty_keys_table_seeds_nothing(store: Store, tmp_path: Path) -> None:
    report = await seeded(store, write_input_db(tmp_path / "input.db", []), {})
    assert (report.rows_read, report.rows_applied, report.skipped) == (0, 0, NO_SKIPS)


async def test_rules_apply_through_the_app(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    path = write_input_db(
        tmp_path / "input.db",
        [
            ("dup", "old"),
            (None, "x"),
            ("nv", None),
            (b"caf\xc3\xa9", b"\xe2\x82\xac"),
            ("badblob", b"\xff"),
            ("", "empty"),
            ("dup", "new"),
            ("slash/key?#", "ok"),
        ],
    )
    client = await make_client(input_db=path, store=store_kind)
    await assert_served(client, {"dup": "new", "caf\u00e9": "\u20ac", "slash/key?#": "ok"})
    for missing in ("nv", "badblob"):
        status, body = await get_json(client, missing)
        assert (status, body["error"]) == (404, "key_not_found")


# --- unusable input ------------------------------------------------------------------------


def _no_keys_table(path: Path) -> None:
    write_input_sql(path, [], schema="create table other(key text, val text)")


def _no_val_column(path: Path) -> None:
    write_input_sql(
        path,
        ["insert into keys values ('k', 'v')"],
        schema=("create table keys(key text, value text)"),
    )


def _no_tables(path: Path) -> None:
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA user_version = 1")  # a valid, non-empty database with no tables
    conn.close()
    assert path.read_bytes().startswith(b"SQLite format 3\x00")


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(1).getrandbits(8 * 4096).to_bytes(4096, "little"))


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _header_then_garbage(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + b"\xab" * 8192)


def _damaged_pages(path: Path) -> None:
    """A real keys table whose data pages were overwritten: the damage shows up mid-read."""
    write_input_db(path, [(f"key:{i}", "v" * 100) for i in range(2000)])
    data = bytearray(path.read_bytes())
    data[3 * 4096 :] = b"\xab" * (len(data) - 3 * 4096)
    path.write_bytes(bytes(data))


UNUSABLE: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-keys-table": (_no_keys_table, "keys"),
    "no-val-column": (_no_val_column, "val"),
    "no-tables": (_no_tables, "keys"),
    "random-bytes": (_random_bytes, "not a SQLite database"),
    "empty-file": (_empty_file, "not a SQLite database"),
    "header-then-garbage": (_header_then_garbage, "not a usable SQLite database"),
    "damaged-pages": (_damaged_pages, "not a usable SQLite database"),
}


@pytest.mark.parametrize("kind", list(UNUSABLE))
async def test_unusable_input_db_raises_seed_error(store: Store, tmp_path: Path, kind: str) -> None:
    make, phrase = UNUSABLE[kind]
    path = tmp_path / "in" / "input.db"
    path.parent.mkdir()
    make(path)
    before = snapshot(path.parent)
    with pytest.raises(SeedError) as info:
        await seed_store(store, path)
    assert str(path) in str(info.value)
    assert phrase in str(info.value)
    assert await store.count() == 0
    assert await store.seed_fingerprint() is None
    assert snapshot(path.parent) == before


@pytest.mark.parametrize("kind", list(UNUSABLE))
async def test_unusable_input_db_stops_the_app(
    make_settings: MakeSettings, store_kind: str, tmp_path: Path, kind: str
) -> None:
    make, _ = UNUSABLE[kind]
    path = tmp_path / "bad input.db"
    make(path)
    message = await assert_startup_fails(make_settings, input_db=path, store=store_kind)
    assert str(path) in message


async def test_configured_path_that_does_not_exist(store: Store, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "input.db"
    with pytest.raises(SeedError, match="does not exist") as info:
        find_input_db(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SeedError, match="cannot be read") as info:
        await seed_store(store, missing)
    assert str(missing) in str(info.value)


async def test_configured_directory_is_not_an_input_db(tmp_path: Path) -> None:
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(SeedError, match="does not exist"):
        find_input_db(tmp_path / "a-dir")


async def test_configured_path_that_does_not_exist_stops_the_app(
    make_settings: MakeSettings, store_kind: str, tmp_path: Path
) -> None:
    # A default input.db is present: a configured path must not fall back to it.
    write_input_db(tmp_path / "input.db", [("k", "v")])
    missing = tmp_path / "missing.db"
    message = await assert_startup_fails(make_settings, input_db=missing, store=store_kind)
    assert str(missing) in message


# --- finding input.db ----------------------------------------------------------------------


async def test_no_input_db_anywhere(make_client: MakeClient, store_kind: str, store: Store) -> None:
    assert find_input_db(None) is None
    report = await seed_store(store, None)
    assert (report.path, report.applied, report.rows_read) == (None, False, 0)
    client = await make_client(store=store_kind)
    assert (await client.get("/health")).status == 200
    assert (await (await client.get("/config")).json())["input_db_used"] is None
    status, body = await get_json(client, "anything")
    assert (status, body["error"]) == (404, "key_not_found")


async def test_input_db_in_the_working_directory_is_found(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    write_input_db(tmp_path / "input.db", [("from", "cwd")])
    assert find_input_db(None) == (tmp_path / "input.db").resolve()
    client = await make_client(store=store_kind)
    await assert_served(client, {"from": "cwd"})


async def test_input_db_beside_the_package_is_found(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    parent = tmp_path / "package-parent"
    assert parent == seed.PACKAGE_PARENT
    parent.mkdir()
    write_input_db(parent / "input.db", [("from", "package parent")])
    assert find_input_db(None) == (parent / "input.db").resolve()
    client = await make_client(store=store_kind)
    await assert_served(client, {"from": "package parent"})


async def test_working_directory_wins_over_package_parent(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    parent = tmp_path / "package-parent"
    parent.mkdir()
    write_input_db(parent / "input.db", [("from", "package parent")])
    write_input_db(tmp_path / "input.db", [("from", "cwd")])
    assert find_input_db(None) == (tmp_path / "input.db").resolve()
    client = await make_client(store=store_kind)
    await assert_served(client, {"from": "cwd"})


async def test_configured_path_wins_over_defaults(
    make_client: MakeClient, store_kind: str, tmp_path: Path
) -> None:
    write_input_db(tmp_path / "input.db", [("from", "cwd")])
    (tmp_path / "elsewhere").mkdir()
    write_input_db(tmp_path / "elsewhere" / "seed.db", [("from", "configured")])
    assert find_input_db(Path("elsewhere/seed.db")) == Path("elsewhere/seed.db")
    client = await make_client(input_db=Path("elsewhere/seed.db"), store=store_kind)
    await assert_served(client, {"from": "configured"})


# --- input.db is never modified --------------------------------------------------------------

Scenario = Callable[[Path], AbstractContextManager[dict[str, str]]]


@contextmanager
def _rollback_journal_idle(path: Path) -> Iterator[dict[str, str]]:
    write_input_db(path, [("a", "1"), ("b", "2")])
    yield {"a": "1", "b": "2"}


@contextmanager
def _wal_idle(path: Path) -> Iterator[dict[str, str]]:
    write_input_db(path, [("a", "1"), ("b", "2")], wal=True)
    with sqlite3.connect(str(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    assert not Path(f"{path}-wal").exists()
    yield {"a": "1", "b": "2"}


@contextmanager
def _wal_live_writer(path: Path) -> Iterator[dict[str, str]]:
    """Committed rows that live only in the -wal file of a writer that is still open."""
    write_input_db(path, [("a", "1"), ("b", "2")], wal=True)
    writer = sqlite3.connect(str(path), isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("BEGIN")
        writer.execute("insert into keys values ('c', '3'), ('a', 'from wal')")
        writer.execute("COMMIT")
        assert Path(f"{path}-wal").stat().st_size > 0
        yield {"a": "from wal", "b": "2", "c": "3"}
    finally:
        writer.close()


def _journal_writer(begin: str, spill: bool) -> Scenario:
    @contextmanager
    def scenario(path: Path) -> Iterator[dict[str, str]]:
        """A writer in rollback-journal mode holding an uncommitted transaction."""
        committed = {f"key:{i}": "committed" for i in range(500)}
        write_input_db(path, committed.items())
        before = path.read_bytes()
        writer = sqlite3.connect(str(path), isolation_level=None)
        try:
            if spill:  # a tiny cache makes SQLite write uncommitted pages into the file
                writer.execute("PRAGMA cache_size = 2")
            writer.execute(f"BEGIN {begin}")
            writer.executemany(
                "insert into keys values (?, ?)",
                [(f"new:{i}", "uncommitted") for i in range(3000 if spill else 1)],
            )
            writer.execute("update keys set val = 'uncommitted'")
            assert Path(f"{path}-journal").exists()
            assert (path.read_bytes() != before) is spill
            yield committed
        finally:
            writer.close()

    return scenario


@contextmanager
def _crashed_writer(path: Path) -> Iterator[dict[str, str]]:
    """The file and hot journal a writer leaves when it dies mid-transaction."""
    work = path.parent / "crashing"
    work.mkdir()
    with _journal_writer("EXCLUSIVE", spill=True)(work / "input.db") as committed:
        shutil.copyfile(work / "input.db", path)
        shutil.copyfile(work / "input.db-journal", f"{path}-journal")
    shutil.rmtree(work)
    yield committed


SCENARIOS: dict[str, Scenario] = {
    "rollback-journal-idle": _rollback_journal_idle,
    "wal-idle": _wal_idle,
    "wal-live-writer": _wal_live_writer,
    "journal-exclusive-writer": _journal_writer("EXCLUSIVE", spill=False),
    "journal-immediate-writer": _journal_writer("IMMEDIATE", spill=False),
    "journal-writer-spilled": _journal_writer("EXCLUSIVE", spill=True),
    "journal-crashed-writer": _crashed_writer,
}


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory for this test, to see that seeding leaves nothing behind."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_input_db_is_never_modified(
    store: Store, tmp_path: Path, private_tmp: Path, name: str
) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    path = directory / "input.db"
    with SCENARIOS[name](path) as committed:
        before = snapshot(directory)
        await seeded(store, path, committed)
        assert snapshot(directory) == before
        # A second look at an unchanged file (skipped by the sqlite store) is just as clean.
        await seed_store(store, path)
        await assert_contents(store, committed)
        assert snapshot(directory) == before
    assert listing(private_tmp) == []
    if name != "journal-crashed-writer":
        # Once the writer is gone nothing but input.db remains.
        assert listing(directory) == ["input.db"]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_input_db_is_never_modified_by_the_app(
    make_client: MakeClient, store_kind: str, tmp_path: Path, private_tmp: Path, name: str
) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    path = directory / "input.db"
    with SCENARIOS[name](path) as committed:
        before = snapshot(directory)
        client = await make_client(input_db=path, store=store_kind)
        await assert_served(client, dict(list(committed.items())[:5]))
        await client.close()
        assert snapshot(directory) == before
    assert listing(private_tmp) == []


async def test_seeding_creates_no_files_beside_a_relative_path(
    store: Store, tmp_path: Path
) -> None:
    # A relative path, in a directory whose name needs URI quoting.
    directory = tmp_path / "odd dir?#%"
    directory.mkdir()
    write_input_db(directory / "input.db", [("k", "v")])
    before = snapshot(directory)
    await seeded(store, Path("odd dir?#%") / "input.db", {"k": "v"})
    assert snapshot(directory) == before


# --- the fingerprint rule --------------------------------------------------------------------


async def _change_after_seed(store: Store) -> None:
    await store.set("written", "by a client")
    await store.set("a", "overwritten by a client")
    assert await store.delete("b")


AFTER_CHANGES = {"a": "overwritten by a client", "c": "3", "written": "by a client"}


async def test_sqlite_store_skips_an_unchanged_seed(tmp_path: Path) -> None:
    path = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", "2"), ("c", "3")])
    data = tmp_path / "data"
    store = SqliteStore(data / "kv.sqlite3")
    try:
        first = await seeded(store, path, {"a": "1", "b": "2", "c": "3"})
        assert first.rows_applied == 3
        fingerprint = await store.seed_fingerprint()
        assert fingerprint is not None
        await _change_after_seed(store)
        second = await seed_store(store, path)
        assert not second.applied
        assert (second.rows_read, second.rows_applied) == (0, 0)
        await assert_contents(store, AFTER_CHANGES)
        assert await store.seed_fingerprint() == fingerprint
    finally:
        await store.close()
    # As after a restart: a new store on the same file.
    store = SqliteStore(data / "kv.sqlite3")
    try:
        assert not (await seed_store(store, path)).applied
        await assert_contents(store, AFTER_CHANGES)
    finally:
        await store.close()


async def test_sqlite_store_applies_a_changed_seed_on_top(tmp_path: Path) -> None:
    path = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", "2"), ("c", "3")])
    store = SqliteStore(tmp_path / "data" / "kv.sqlite3")
    try:
        await seed_store(store, path)
        fingerprint = await store.seed_fingerprint()
        await _change_after_seed(store)
        with sqlite3.connect(str(path)) as conn:
            conn.execute("insert into keys values ('d', '4')")
            conn.execute("insert into keys values ('c', 'changed')")
        conn.close()
        report = await seed_store(store, path)
        assert report.applied
        assert (report.rows_read, report.rows_applied) == (5, 5)
        await assert_contents(
            store, {"a": "1", "b": "2", "c": "changed", "d": "4", "written": "by a client"}
        )
        assert await store.seed_fingerprint() not in (None, fingerprint)
        assert not (await seed_store(store, path)).applied
    finally:
        await store.close()


async def test_a_different_file_with_the_same_rows_is_the_same_seed(tmp_path: Path) -> None:
    """The fingerprint is of the bytes: an identical copy elsewhere does not reseed."""
    path = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", "2"), ("c", "3")])
    copy = tmp_path / "copy.db"
    shutil.copyfile(path, copy)
    store = SqliteStore(tmp_path / "data" / "kv.sqlite3")
    try:
        await seed_store(store, path)
        await _change_after_seed(store)
        assert not (await seed_store(store, copy)).applied
        await assert_contents(store, AFTER_CHANGES)
    finally:
        await store.close()


async def test_memory_store_applies_every_seed(tmp_path: Path) -> None:
    path = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", "2"), ("c", "3")])
    store = MemoryStore()
    await seeded(store, path, {"a": "1", "b": "2", "c": "3"})
    await _change_after_seed(store)
    report = await seed_store(store, path)
    assert report.applied and report.rows_applied == 3
    await assert_contents(store, {"a": "1", "b": "2", "c": "3", "written": "by a client"})


async def test_restarted_app_keeps_writes_made_since_the_seed(
    make_client: MakeClient, tmp_path: Path
) -> None:
    path = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", "2"), ("c", "3")])
    client = await make_client(input_db=path)
    await assert_served(client, {"a": "1", "b": "2", "c": "3"})
    assert (await client.post("/set", json={"key": "a", "val": "client"})).status == 200
    assert (await client.post("/set", json={"key": "new", "val": "client"})).status == 200
    assert (await client.delete("/delete/b")).status == 200
    await client.close()

    client = await make_client(input_db=path)
    await assert_served(client, {"a": "client", "new": "client", "c": "3"})
    assert (await get_json(client, "b"))[0] == 404
    await client.close()

    with sqlite3.connect(str(path)) as conn:
        conn.execute("insert into keys values ('d', '4')")
    conn.close()
    client = await make_client(input_db=path)
    await assert_served(client, {"a": "1", "b": "2", "c": "3", "d": "4", "new": "client"})


# --- property --------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
KEYS = st.one_of(st.sampled_from(["k", "K", "k ", "\u043a\u043b\u044e\u0447"]), TEXT.filter(bool))
ROWS = st.lists(st.tuples(KEYS, TEXT), max_size=40)


# The fixtures this test uses (store_kind, and the autouse hermetic one) hold nothing an
# example changes; every example builds its input.db and store in a fresh directory.
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=ROWS)
async def test_seeded_store_equals_rows_applied_in_order(
    store_kind: str, open_test_store: OpenStore, rows: list[tuple[str, str]]
) -> None:
    expected: dict[str, str] = {}
    for key, val in rows:
        expected[key] = val
    with tempfile.TemporaryDirectory() as directory:
        path = write_input_db(Path(directory) / "input.db", rows)
        store = await open_test_store(store_kind, Path(directory) / "data")
        try:
            report = await seeded(store, path, expected)
            assert (report.rows_read, report.rows_applied) == (len(rows), len(rows))
        finally:
            await store.close()


def test_surrogate_free_text_round_trips_through_sqlite() -> None:
    """The property's premise: SQLite text holds any surrogate-free string without NUL."""
    value = "a\x7fb\U0010ffff\ufffe"
    conn = sqlite3.connect(":memory:")
    try:
        assert conn.execute("select ?", (value,)).fetchone() == (value,)
    finally:
        conn.close()


@pytest.mark.parametrize("cores", [1, 2])
async def test_text_that_is_not_utf8_is_skipped_however_it_hides(
    store: Store, tmp_path: Path, cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lone lead or continuation bytes in TEXT have as many characters as bytes by SQLite's
    count, which the sqlite store's fast seed query cannot see: with two cores it finds out
    on a second thread and applies the exact rules instead, with one it applies them from
    the start. No store ever holds such text."""
    monkeypatch.setattr(sqlite_bulk, "_cores", lambda: cores)
    path = write_input_sql(
        tmp_path / "input.db",
        [
            "insert into keys values ('good', 'one')",
            "insert into keys values ('stray lead byte', CAST(X'FF61' AS TEXT))",
            "insert into keys values (CAST(X'8061' AS TEXT), 'stray continuation byte key')",
            "insert into keys values ('later', 'two')",
        ],
    )
    report = await seeded(store, path, {"good": "one", "later": "two"})
    assert report.skipped == skips(not_utf8=2)
    assert (report.rows_read, report.rows_applied) == (4, 2)


async def test_a_nul_character_skips_the_row(store: Store, tmp_path: Path) -> None:
    """PostgreSQL's text cannot hold U+0000, and requests with it are refused: every store
    skips such rows alike."""
    path = write_input_db(
        tmp_path / "input.db",
        [("a\x00b", "key with NUL"), ("val", "with\x00NUL"), (b"blob\x00", "x"), ("ok", "v")],
    )
    report = await seeded(store, path, {"ok": "v"})
    assert report.skipped == skips(nul_character=3)
