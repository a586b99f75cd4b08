"""One contract, run unchanged against every Store implementation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Callable

import pytest

from mapmg_data_engineer_takehome.store import MemoryStore, SqliteStore, Store

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "memory": lambda directory: MemoryStore(),
    "sqlite-normal": lambda directory: SqliteStore(directory / "kv.sqlite3", "normal"),
    "sqlite-full": lambda directory: SqliteStore(directory / "kv.sqlite3", "full"),
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = BACKENDS[request.param](tmp_path)
    yield opened
    await opened.close()


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.get("missing") is None


async def test_set_then_get(store: Store) -> None:
    await store.set("k", "v")
    assert await store.get("k") == "v"


async def test_set_overwrites(store: Store) -> None:
    await store.set("k", "one")
    await store.set("k", "two")
    assert await store.get("k") == "two"
    assert await store.count() == 1


async def test_empty_value_is_a_value(store: Store) -> None:
    await store.set("k", "")
    assert await store.get("k") == ""


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
    keys = ["a", "A", "a ", " a", "a\x00b", "😀", "ß", "ss"]
    for index, key in enumerate(keys):
        await store.set(key, str(index))
    for index, key in enumerate(keys):
        assert await store.get(key) == str(index)


async def test_load_applies_rows_in_order_last_wins(store: Store) -> None:
    await store.set("kept", "mine")
    await store.load(iter([("a", "1"), ("b", "2"), ("a", "3")]), "fingerprint-1")
    assert await store.get("a") == "3"
    assert await store.get("b") == "2"
    assert await store.get("kept") == "mine"


async def test_load_accepts_a_generator_of_many_rows(store: Store) -> None:
    await store.load(((f"k{i}", f"v{i}") for i in range(10_000)), "many")
    assert await store.count() == 10_000
    assert await store.get("k9999") == "v9999"


async def test_concurrent_writes_all_land(store: Store) -> None:
    await asyncio.gather(*(store.set(f"k{i}", f"v{i}") for i in range(200)))
    await asyncio.gather(*(store.delete(f"k{i}") for i in range(0, 200, 2)))
    assert await store.count() == 100
    assert await store.get("k1") == "v1"
    assert await store.get("k2") is None


async def test_ping_answers(store: Store) -> None:
    await store.ping()


async def test_fingerprint_is_remembered_only_by_durable_stores(store: Store) -> None:
    await store.load(iter([("a", "1")]), "fp")
    remembered = await store.seed_fingerprint()
    assert remembered == ("fp" if isinstance(store, SqliteStore) else None)
