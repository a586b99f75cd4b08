"""What only the PostgreSQL store promises, in process: its schema's versioning, its
secrets, and its answers when the database is wrong or gone."""

from __future__ import annotations

import asyncpg
import pytest

from mapmg_data_engineer_takehome.settings import SettingsError, load_settings
from mapmg_data_engineer_takehome.store import StoreCorrupt, StoreUnavailable
from mapmg_data_engineer_takehome.store.postgres import PostgresStore, redacted_url

from ..postgres_support import PASSWORD, PostgresCluster


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


async def test_a_database_of_a_newer_schema_is_refused(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("UPDATE kv_meta SET value = '99' WHERE name = 'schema_version'")
    finally:
        await conn.close()
    with pytest.raises(StoreCorrupt, match="newer version"):
        await PostgresStore.open(postgres_url)


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
