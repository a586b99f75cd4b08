"""The sqlite store: one SQLite file in WAL mode, the default and durable backend.

Reads run on the event loop's thread, and those of one loop iteration share one read
transaction (see _begin_read_snapshot). Writes are committed in groups (_GroupCommitter):
with ``durability="normal"`` on the loop's thread, since a commit into the WAL takes
microseconds, less than a hop to a thread; with ``durability="full"`` on a writer thread,
since each commit waits for an fsync. SQLite checkpoints by itself, in the commit that takes
the WAL past 500 pages; that commit's thread then waits for the copy, and the next commit
rewinds the WAL, so the file stays a few MiB however long the writes go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Callable, Optional
from urllib.parse import quote, urlencode

import structlog

from .base import (
    Row,
    SqlSeed,
    SqlSeedRejected,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
)

log = structlog.get_logger("kv.store")

# Stamped into the file header so that a foreign SQLite file is recognised and left alone.
APPLICATION_ID = 0x4B565354  # "KVST"
SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

# Every setting explicit, none left to a library default by accident.
_PRAGMAS = (
    # Readers never block the writer and a commit appends to one file.
    "PRAGMA journal_mode = WAL",
    # Another process (a second worker) may hold the write lock for a moment.
    "PRAGMA busy_timeout = 5000",
    # 64 MiB of the file is read through a memory map, saving a copy per page read.
    "PRAGMA mmap_size = 67108864",
    # 16 MiB of page cache: the upper levels of the b-tree stay hot with millions of keys.
    "PRAGMA cache_size = -16384",
    "PRAGMA temp_store = MEMORY",
    # Checkpoint (copy the WAL into the file, then fsync) every 500 pages, in the commit that
    # crosses it. It stalls that commit's thread; measured with bench/run.py, 1000 pages
    # (SQLite's default) gave POST p99 1.54x the floor's, 500 gave 1.26x at 0.91x the rate,
    # 300 gave 1.19x at 0.87x, 8000 gave 2.86x.
    "PRAGMA wal_autocheckpoint = 500",
    # When the WAL rewinds, its file is cut back to 64 MiB rather than kept at its peak.
    "PRAGMA journal_size_limit = 67108864",
)
# NORMAL: a commit is in the WAL (the OS has it) before we answer, so it survives a crash or
# kill of this process; FULL: the WAL is fsynced at every commit, so it survives power loss.
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}

_SCHEMA = (
    # The constraints also make load_sql refuse rows its fast seed query got wrong.
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL CHECK (key <> ''),"
    " val TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
    " WITHOUT ROWID",
)
_GET = "SELECT val FROM kv WHERE key = ?"
_SET = "INSERT OR REPLACE INTO kv (key, val) VALUES (?, ?)"
_DELETE = "DELETE FROM kv WHERE key = ?"
_SEED_FINGERPRINT = "seed_fingerprint"
# How Python's sqlite3 reports TEXT that is not UTF-8 (the same words on 3.9 to 3.13).
_UNDECODABLE = "Could not decode to UTF-8"

Operation = tuple[str, str, Optional[str]]  # ("set", key, val) or ("delete", key, None)


def sqlite_uri(path: PurePath, **query: str) -> str:
    """A SQLite URI for the absolute ``path``, on any system: ``file:///srv/kv%20data/kv.db``,
    ``file:///C:/kv/kv.db``. What URIs reserve ('?', '#', '%', spaces) is percent-encoded."""
    location = path.as_posix()
    if not location.startswith("/"):  # a Windows drive, C:/kv, goes after the empty authority
        location = "/" + location
    uri = "file://" + quote(location, safe="/:")
    return f"{uri}?{urlencode(query)}" if query else uri


def _translate(error: sqlite3.Error, path: Path) -> StoreError:
    """Map SQLite's exceptions to the store's: transient conditions versus damage."""
    if isinstance(error, sqlite3.OperationalError):
        return StoreUnavailable(f"{path}: {error}")
    return StoreCorrupt(f"{path}: {error}")


def _connect(path: Path, durability: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the store begins and ends every one
    # itself, so none is left open to hide other workers' writes.
    # uri=True: load_sql ATTACHes the seed by a URI (read-only, immutable).
    conn = sqlite3.connect(sqlite_uri(path.resolve()), uri=True, isolation_level=None)
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[durability]}")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_header(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as file:
        if file.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise StoreCorrupt(f"{path}: not a SQLite database; refusing to touch it")


def _prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreCorrupt(f"{path}: written by a newer version (schema {version})")
        return
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != 0 or has_tables:
        raise StoreCorrupt(
            f"{path}: a SQLite database that this server did not create; refusing to touch it"
        )
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


class _GroupCommitter:
    """Commits writes in groups: each commit takes every write that arrived before it began.

    durability="normal": the commit runs on the event loop's thread, scheduled behind the
    handlers already queued, so the writes of one loop iteration share a transaction.
    durability="full": the commit (and its fsync) runs on a writer thread with its own
    connection, and the writes arriving meanwhile wait for the next one.
    A write is answered only when its group has committed.
    """

    def __init__(self, path: Path, durability: str, loop_conn: sqlite3.Connection) -> None:
        self._path = path
        self._durability = durability
        self._conn: Optional[sqlite3.Connection] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        if durability == "full":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-commit")
        else:
            self._conn = loop_conn
        self._pending: list[tuple[Operation, asyncio.Future[Optional[bool]]]] = []
        self._draining: Optional[asyncio.Task[None]] = None

    async def submit(self, operation: Operation) -> Optional[bool]:
        future: asyncio.Future[Optional[bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((operation, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                operations = [operation for operation, _ in batch]
                try:
                    if self._executor is None:
                        results = self._commit(operations)
                    else:
                        results = await loop.run_in_executor(
                            self._executor, self._commit, operations
                        )
                except sqlite3.Error as error:
                    failure = _translate(error, self._path)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                else:
                    for (_, future), result in zip(batch, results):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._draining = None

    def _commit(self, operations: list[Operation]) -> list[Optional[bool]]:
        """One transaction for the whole group: one WAL append, at most one fsync."""
        if self._conn is None:  # the writer thread's own connection, made on that thread
            self._conn = _connect(self._path, self._durability)
        conn = self._conn
        results: list[Optional[bool]] = []
        if conn.in_transaction:  # the loop's shared read snapshot; writes need a fresh one
            conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for kind, key, val in operations:
                if kind == "set":
                    conn.execute(_SET, (key, val))
                    results.append(None)
                else:
                    results.append(conn.execute(_DELETE, (key,)).rowcount > 0)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def close(self) -> None:
        if self._draining is not None:
            await self._draining
        if self._executor is not None:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._executor.shutdown(wait=True)


class SqliteStore:
    """A Store in one SQLite file; see the module docstring for the threading and durability."""

    name = "sqlite"

    def __init__(self, path: Path, durability: str = "normal") -> None:
        self.path = path
        self.durability = durability
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_header(path)
        try:
            # Inspect before any pragma: switching a foreign file to WAL would modify it.
            inspector = sqlite3.connect(str(path), isolation_level=None)
            try:
                _prepare_schema(inspector, path)
            finally:
                inspector.close()
            self._conn = _connect(path, durability)
        except sqlite3.Error as error:
            raise _translate(error, path) from None
        # One cursor for every read: a new one per get costs more than the lookup's parsing.
        self._reader = self._conn.cursor()
        self._committer = _GroupCommitter(path, durability, self._conn)
        self._closed = False

    async def get(self, key: str) -> Optional[str]:
        try:
            if not self._conn.in_transaction:
                self._begin_read_snapshot()
            # fetchall, not fetchone: it steps the statement to its end, and a statement
            # left open would keep its read lock past COMMIT, which stops SQLite from ever
            # rewinding the WAL (the file then grows without bound under writes).
            rows = self._reader.execute(_GET, (key,)).fetchall()
        except sqlite3.Error as error:
            if _UNDECODABLE in str(error):
                # Only a seed can store such bytes (see seed.fast_rows_sql): no client ever
                # wrote them, so the key is treated as the skipped row it should have been.
                log.warning("undecodable_value_skipped", path=str(self.path))
                return None
            raise _translate(error, self.path) from None
        return rows[0][0] if rows else None

    def _begin_read_snapshot(self) -> None:
        """Open a read transaction that the reads of this event-loop iteration share.

        Beginning and ending a read transaction takes SQLite's WAL locks (fcntl calls on
        the -shm file): sharing one per iteration took GET from 13,200 to 15,000 req/s. The
        snapshot is still fresh for every request: it begins after the loop read the
        requests it serves, and ends before the handlers of the next poll run, so a write
        acknowledged anywhere (another worker included) is seen by any request sent after.
        """
        self._conn.execute("BEGIN")
        asyncio.get_running_loop().call_soon(self._end_read_snapshot)

    def _end_read_snapshot(self) -> None:
        if not self._closed and self._conn.in_transaction:  # a commit may have ended it
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("COMMIT")

    async def set(self, key: str, val: str) -> None:
        await self._committer.submit(("set", key, val))

    async def delete(self, key: str) -> bool:
        return bool(await self._committer.submit(("delete", key, None)))

    async def load(self, rows: Iterable[Row], fingerprint: str) -> int:
        return self._load(lambda conn: conn.executemany(_SET, rows).rowcount, fingerprint)

    async def load_sql(self, seed: SqlSeed, fingerprint: str) -> int:
        """Copy the seed inside SQLite: ATTACH it, then one INSERT ... SELECT."""
        conn = self._conn
        for name, function in seed.functions.items():
            conn.create_function(name, 1, function, deterministic=True)
        try:
            conn.execute(f"ATTACH DATABASE ? AS {SqlSeed.SCHEMA}", (seed.uri,))
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        try:
            insert = f"INSERT OR REPLACE INTO kv (key, val) {seed.select}"
            return self._load(lambda conn: conn.execute(insert).rowcount, fingerprint)
        except StoreCorrupt as error:
            if isinstance(error.__cause__, sqlite3.IntegrityError):
                raise SqlSeedRejected(str(error)) from None
            raise
        finally:
            conn.execute(f"DETACH DATABASE {SqlSeed.SCHEMA}")

    def _load(self, apply: Callable[[sqlite3.Connection], int], fingerprint: str) -> int:
        """Run ``apply`` and record the fingerprint in one transaction, then checkpoint."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                applied = apply(conn)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                    (_SEED_FINGERPRINT, fingerprint),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            # Move the seed from the WAL into the file now, before the port opens, rather
            # than in whichever request's commit crosses the auto-checkpoint threshold.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error
        return applied

    async def seed_fingerprint(self) -> Optional[str]:
        row = self._conn.execute(
            "SELECT value FROM meta WHERE name = ?", (_SEED_FINGERPRINT,)
        ).fetchone()
        return None if row is None else row[0]

    async def count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM kv").fetchone()[0]  # type: ignore[no-any-return]

    async def ping(self) -> None:
        try:
            # Touches the file (a page of meta), not just the library.
            self._conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None

    async def close(self) -> None:
        await self._committer.close()
        self._end_read_snapshot()
        self._closed = True
        with contextlib.suppress(sqlite3.Error):  # advisory only; closing must still happen
            self._conn.execute("PRAGMA optimize")
        self._conn.close()  # the last connection to close checkpoints and removes the WAL
