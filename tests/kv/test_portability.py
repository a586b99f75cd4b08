"""The default server runs on any system: what is POSIX-shaped has a portable path, tested here
on Linux by giving each code path what Windows would (a loop without signal handlers, a
Windows path)."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from mapmg_data_engineer_takehome.seed import seed_store
from mapmg_data_engineer_takehome.settings import SettingsError, load_settings
from mapmg_data_engineer_takehome.store import SqliteStore
from mapmg_data_engineer_takehome.store.sqlite import sqlite_uri
from mapmg_data_engineer_takehome.workers import stop_on_signals

from .conftest import value_of, write_input_db


@pytest.mark.parametrize(
    ("path", "uri"),
    [
        (
            PureWindowsPath(r"C:\Users\Ann\kv data\kv.sqlite3"),
            "file:///C:/Users/Ann/kv%20data/kv.sqlite3",
        ),
        (PureWindowsPath(r"D:\kv\input.db"), "file:///D:/kv/input.db"),
        (PurePosixPath("/srv/kv/kv.sqlite3"), "file:///srv/kv/kv.sqlite3"),
        (
            PurePosixPath("/srv/a ?#%b/ключ.db"),
            "file:///srv/a%20%3F%23%25b/%D0%BA%D0%BB%D1%8E%D1%87.db",
        ),
    ],
)
def test_sqlite_uris_are_built_the_portable_way(path: PureWindowsPath, uri: str) -> None:
    assert sqlite_uri(path) == uri


def test_sqlite_uri_query_parameters() -> None:
    assert (
        sqlite_uri(PureWindowsPath(r"C:\kv\input.db"), mode="ro", immutable="1")
        == "file:///C:/kv/input.db?mode=ro&immutable=1"
    )


async def test_files_whose_paths_need_escaping_open_and_seed(tmp_path: Path) -> None:
    directory = tmp_path / "a ?#%b"
    directory.mkdir()
    input_db = write_input_db(directory / "input.db", [("seeded", "yes")])
    store = SqliteStore(directory / "kv.sqlite3")
    try:
        report = await seed_store(store, input_db)
        await store.set("written", "too")
        assert report.rows_applied == 1
        assert (await value_of(store, "seeded"), await value_of(store, "written")) == ("yes", "too")
    finally:
        await store.close()
    assert sorted(path.name for path in directory.iterdir()) == ["input.db", "kv.sqlite3"]


class LoopWithoutSignalHandlers(asyncio.SelectorEventLoop):
    """What Windows' event loops do when asked for a signal handler."""

    def add_signal_handler(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError


@pytest.fixture
def restored_signal_handlers() -> Iterator[None]:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restored_signal_handlers")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signals_work_on_a_loop_without_add_signal_handler(signum: int) -> None:
    async def stopped_by_the_signal() -> None:
        stop = asyncio.Event()
        stop_on_signals(asyncio.get_running_loop(), stop)
        signal.raise_signal(signum)
        await asyncio.wait_for(stop.wait(), timeout=2)

    loop = LoopWithoutSignalHandlers()
    try:
        loop.run_until_complete(stopped_by_the_signal())
    finally:
        loop.close()


def test_several_workers_need_so_reuseport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    with pytest.raises(SettingsError, match=r"KV_WORKERS: 2 workers .* SO_REUSEPORT"):
        load_settings(["--workers", "2"])
    assert load_settings(["--workers", "1"]).worker_count == 1
