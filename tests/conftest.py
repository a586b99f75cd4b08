"""Shared fixtures: hermetic settings, an input.db builder and an in-process client."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mapmg_data_engineer_takehome import seed
from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.settings import Settings

if TYPE_CHECKING:
    Client = TestClient[web.Request, web.Application]
else:  # aiohttp before 3.14 has no type parameters on TestClient
    Client = TestClient
MakeSettings = Callable[..., Settings]
MakeClient = Callable[..., Awaitable[Client]]


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


@pytest.fixture
def make_settings(tmp_path: Path) -> MakeSettings:
    """Settings with the data file in this test's directory; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_path": tmp_path / "data" / "kv.sqlite3",
            "log_format": "json",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(params=["sqlite", "memory"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run the test once per backend."""
    return str(request.param)


@pytest.fixture
def make_client(aiohttp_client: Any, make_settings: MakeSettings) -> MakeClient:
    """Start the real app in-process from settings overrides and return a test client."""

    async def make(settings: Optional[Settings] = None, **overrides: Any) -> Client:
        app: web.Application = create_app(settings or make_settings(**overrides))
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str) -> Client:
    """A client of an unseeded app, once per backend."""
    return await make_client(store=store_kind)
