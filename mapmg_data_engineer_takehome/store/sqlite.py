"""The sqlite store: one SQLite file in WAL mode, the default and durable backend.

Reads run on the event loop's thread, and those of one loop iteration share one read
transaction (see _begin_read_snapshot); their GETs are one query (see get). Writes are
committed in groups (_GroupCommitter): with ``durability="normal"`` on the loop's thread,
since a commit into the WAL takes microseconds, less than a hop to a thread; with
``durability="full"`` on a writer thread, since each commit waits for an fsync. SQLite
checkpoints by itself, in the commit that takes the WAL past 500 pages; that commit's
thread then waits for the copy, and the next commit rewinds the WAL, so the file stays a
few MiB however long the writes go on.

The history is the table ``changes``, written in each write's transaction: a set's change by
a trigger on ``kv`` (inside the set's own statement, the cheapest way measured: see
bench/results.md), a delete's or an expiry's by the writer (_Transaction.record).

Every opening of the file begins a new life of the store (see base.py): a copy put back in its
place cannot tell that it is one, so the revision moves to the clock in microseconds each time,
and the numbers skipped are recorded in ``gaps``. A plain restart skips only numbers nobody was
given; a restored copy skips those its lost writes were given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Callable, Optional, Protocol, TypeVar, Union, cast
from urllib.parse import quote, urlencode

import structlog

from .base import (
    EXPORT_BATCH_CHARS,
    EXPORT_BATCH_ROWS,
    PAGE_VALUE_CHARS,
    BulkSource,
    Change,
    Changes,
    ChangeType,
    Clock,
    Condition,
    Entry,
    Gap,
    HistoryStats,
    ListedKey,
    Loaded,
    LoadRow,
    Page,
    PreconditionFailed,
    SetItem,
    SqlSeed,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    Wake,
    check_since,
    condition_holds,
    expiry_of,
    life_start,
    prefix_upper_bound,
    take_changes,
    trim_cut,
)

log = structlog.get_logger("kv.store")

# Stamped into the file header so that a foreign SQLite file is recognised and left alone.
APPLICATION_ID = 0x4B565354  # "KVST"
SCHEMA_VERSION = 4
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
    # crosses it. It stalls that commit's thread, so the interval trades POST's p99 against
    # its rate; bench/results.md has the measurements that chose 500.
    "PRAGMA wal_autocheckpoint = 500",
    # When the WAL rewinds, its file is cut back to 64 MiB rather than kept at its peak.
    "PRAGMA journal_size_limit = 67108864",
)
# NORMAL: a commit is in the WAL (the OS has it) before we answer, so it survives a crash or
# kill of this process; FULL: the WAL is fsynced at every commit, so it survives power loss.
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}

_CREATE_KV = (
    # The constraints also make the seed skip the rows its rules skip (see _BULK_INSERT).
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL CHECK (key <> ''),"
    " val TEXT NOT NULL, version INTEGER NOT NULL, expires_at INTEGER) WITHOUT ROWID"
)
# Only keys that expire are in it: the purge finds them without a scan, and writes of keys
# without expiry pay nothing for it.
_CREATE_EXPIRY_INDEX = (
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL"
)
_CREATE_META = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value NOT NULL) WITHOUT ROWID"
)
_REVISION = "revision"
_KEYS = "keys"
# The history (see the module docstring), in the feed's order: reading it is one range scan
# of its b-tree, and recording a change one insert.
_CREATE_CHANGES = (
    "CREATE TABLE IF NOT EXISTS changes (revision INTEGER NOT NULL, key TEXT NOT NULL,"
    " type TEXT NOT NULL, val TEXT, expires_at INTEGER, PRIMARY KEY (revision, key))"
    " WITHOUT ROWID"
)
# The trimming's marks: at this time (ms), the store was at this revision (see base.py).
_CREATE_MARKS = (
    "CREATE TABLE IF NOT EXISTS history_marks (at INTEGER PRIMARY KEY, revision INTEGER NOT NULL)"
)
_COMPACT_REVISION = "compact_revision"
# The revisions each new life skipped (see the module docstring): none was given to a write
# here, and a watcher holding one is told it is not this store's.
_CREATE_GAPS = (
    "CREATE TABLE IF NOT EXISTS gaps (resumed_at INTEGER PRIMARY KEY, forked_at INTEGER NOT NULL)"
)
_GAPS_ABOVE = "SELECT forked_at, resumed_at FROM gaps WHERE resumed_at > ? ORDER BY resumed_at"
# The history's rows, counted by trim_history up to the revision in _HISTORY_COUNTED: writes
# pay nothing to keep a count, and the rows above that revision are few to count.
_HISTORY_ROWS = "history_rows"
_HISTORY_COUNTED = "history_counted"
# Triggers on every connection that writes (TEMP triggers belong to their connection):
# - The number of keys, kept in meta as rows come and go, so that it is never counted.
#   Writes use an upsert, not INSERT OR REPLACE: an overwrite then fires no count trigger
#   (REPLACE's delete fires none either, and its insert would count the key twice).
# - A set's change, recorded with the row the set wrote (an upsert fires the insert trigger
#   or the update one); the same key twice in one revision keeps the later.
_RECORD_SET = (
    "INSERT OR REPLACE INTO changes (revision, key, type, val, expires_at)"
    " VALUES (NEW.version, NEW.key, 'set', NEW.val, NEW.expires_at)"
)
_TRIGGERS = (
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_added AFTER INSERT ON main.kv BEGIN"
    f" UPDATE meta SET value = value + 1 WHERE name = '{_KEYS}'; {_RECORD_SET}; END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_updated AFTER UPDATE ON main.kv BEGIN"
    f" {_RECORD_SET}; END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_removed AFTER DELETE ON main.kv BEGIN"
    f" UPDATE meta SET value = value - 1 WHERE name = '{_KEYS}'; END",
)
_SEED_FINGERPRINT = "seed_fingerprint"
_SCHEMA = (
    _CREATE_KV,
    _CREATE_EXPIRY_INDEX,
    _CREATE_META,
    _CREATE_CHANGES,
    _CREATE_MARKS,
    _CREATE_GAPS,
    f"INSERT INTO meta (name, value) VALUES ('{_REVISION}', 0), ('{_KEYS}', 0),"
    f" ('{_COMPACT_REVISION}', 0), ('{_HISTORY_ROWS}', 0), ('{_HISTORY_COUNTED}', 0)",
)
# From each schema version to the next, in place. Schema 1 (release 1.0.0) had neither
# versions nor expiry: its keys take revision 1, and never expire. Schema 2 had no history:
# it starts empty, complete above the revision the file was at. Schema 3 had no lives: its
# first opening here begins one.
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE kv ADD COLUMN expires_at INTEGER",
        _CREATE_EXPIRY_INDEX,
        f"INSERT OR REPLACE INTO meta (name, value) VALUES ('{_REVISION}', 1)",
        f"INSERT OR REPLACE INTO meta (name, value) VALUES ('{_KEYS}', (SELECT count(*) FROM kv))",
    ),
    2: (
        _CREATE_CHANGES,
        _CREATE_MARKS,
        f"INSERT OR REPLACE INTO meta (name, value) SELECT name, value FROM (SELECT"
        f" '{_COMPACT_REVISION}' AS name, value FROM meta WHERE name = '{_REVISION}' UNION ALL"
        f" SELECT '{_HISTORY_COUNTED}', value FROM meta WHERE name = '{_REVISION}' UNION ALL"
        f" SELECT '{_HISTORY_ROWS}', 0)",
    ),
    3: (_CREATE_GAPS,),
}
# The GETs of one event-loop iteration, in one query: key IN (?, ?, ...) with as many marks as
# a power of two (a short list is padded with its first key), so a handful of statements serve
# every group size from SQLite's statement cache.
_GET_GROUP = {
    size: f"SELECT key, val, version, expires_at FROM kv WHERE key IN ({','.join('?' * size)})"
    for size in (1 << power for power in range(10))
}
_GET_GROUP_MAX = max(_GET_GROUP)
_GET_LIVE_VERSION = "SELECT version, expires_at FROM kv WHERE key = ?"
_SET = (
    "INSERT INTO kv (key, val, version, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (key)"
    " DO UPDATE SET val = excluded.val, version = excluded.version,"
    " expires_at = excluded.expires_at"
)
_DELETE = "DELETE FROM kv WHERE key = ?"
_EXPIRED = "SELECT key FROM kv WHERE expires_at <= ? ORDER BY expires_at LIMIT ?"
_RECORD_REMOVAL = "INSERT INTO changes (revision, key, type) VALUES (?, ?, ?)"
# How often a process looks for another's commits while it has watchers (see listen).
WATCH_POLL_INTERVAL = 0.005
_READ_META = "SELECT value FROM meta WHERE name = ?"
_WRITE_META = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
# Keys per statement in the batch reads and deletes: well under SQLite's 999 parameters,
# the smallest limit of the versions Python ships.
_CHUNK = 500


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


def _connect(path: Path, durability: str, bulk: bool = False) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the store begins and ends every one
    # itself, so none is left open to hide other workers' writes.
    # uri=True: a bulk load ATTACHes the seed by a URI (read-only, immutable).
    conn = sqlite3.connect(
        sqlite_uri(path.resolve()), uri=True, isolation_level=None, check_same_thread=not bulk
    )
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[durability]}")
        if bulk:
            # Its staged rows go to a file (SQLite's, in its temporary directory, unlinked as
            # it is made: a crash leaves nothing), not to memory: an import may be a GiB.
            conn.execute("PRAGMA temp_store = FILE")
            return conn  # and no triggers: a bulk load records no changes, and counts once
        for statement in _TRIGGERS:
            conn.execute(statement)
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


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The one way this store writes: BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any
    exception. IMMEDIATE takes the write lock at once, so that a transaction that read
    (a precondition, the revision) cannot find the file changed under it by another worker."""
    if conn.in_transaction:  # the loop's shared read snapshot; a write needs a fresh one
        conn.execute("COMMIT")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        _upgrade(conn, path)
        return
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != 0 or has_tables:
        raise StoreCorrupt(
            f"{path}: a SQLite database that this server did not create; refusing to touch it"
        )
    with _transaction(conn):
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a data file of an earlier schema up to this one, in one transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreCorrupt(f"{path}: written by a newer version (schema {version})")
    if version == SCHEMA_VERSION:
        return
    with _transaction(conn):
        # Read again under the write lock: another worker may have upgraded it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            for statement in _UPGRADES[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if version < SCHEMA_VERSION:
        log.info("store_upgraded", path=str(path), schema_from=version, schema_to=SCHEMA_VERSION)


def _begin_life(conn: sqlite3.Connection, now: float) -> None:
    """Move the revision to where this opening's life begins (base.life_start), recording the
    numbers skipped: under the write lock, so that a worker opening the file meanwhile, or one
    already writing, never has its revisions skipped."""
    with _transaction(conn):
        revision = _meta(conn, _REVISION)
        start = life_start(revision, now)
        if start > revision:
            conn.execute(
                "INSERT INTO gaps (resumed_at, forked_at) VALUES (?, ?)", (start, revision)
            )
            conn.execute(_WRITE_META, (_REVISION, start))


def _key_range(prefix: str) -> tuple[str, tuple[str, ...]]:
    """SQL (to AND on) selecting the keys that start with ``prefix``, and its parameters."""
    if not prefix:
        return "", ()
    bound = prefix_upper_bound(prefix)
    if bound is None:
        return " AND key >= ?", (prefix,)
    return " AND key >= ? AND key < ?", (prefix, bound)


def _meta(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(_READ_META, (name,)).fetchone()[0])


class _Transaction:
    """One group's write transaction: its connection, its clock reading, the revision (read
    once under the write lock and written back once, if any write took one: each write that
    changes something adds one to ``revision``) and the removals to record with it."""

    def __init__(self, conn: sqlite3.Connection, now_ms: float) -> None:
        self.conn = conn
        self.now_ms = now_ms
        self.first = _meta(conn, _REVISION)
        self.revision = self.first
        self.removals: list[tuple[int, str, ChangeType]] = []

    def record(self, kind: ChangeType, key: str) -> None:
        """A key's delete or expiry in the current revision (the trigger records sets)."""
        self.removals.append((self.revision, key, kind))

    def live_version(self, key: str) -> Optional[int]:
        row = self.conn.execute(_GET_LIVE_VERSION, (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= self.now_ms):
            return None
        return int(row[0])

    def check(self, key: str, condition: Optional[Condition]) -> Optional[int]:
        """The key's live version; PreconditionFailed when ``condition`` does not hold."""
        current = self.live_version(key)
        if not condition_holds(condition, current):
            raise PreconditionFailed(current)
        return current

    def finish(self) -> None:
        if self.removals:
            self.conn.executemany(_RECORD_REMOVAL, self.removals)
        if self.revision != self.first:
            self.conn.execute(_WRITE_META, (_REVISION, self.revision))


# The operations below are plain classes with __slots__: one is made per write, and a frozen
# dataclass costs three times as much to make.


class _SetOne:
    __slots__ = ("condition", "expires_at", "key", "val")

    def __init__(
        self, key: str, val: str, expires_at: Optional[int], condition: Optional[Condition]
    ) -> None:
        self.key, self.val, self.expires_at, self.condition = key, val, expires_at, condition

    def apply(self, tx: _Transaction) -> Entry:
        if self.condition is not None:
            tx.check(self.key, self.condition)
        tx.revision += 1
        version = tx.revision
        tx.conn.execute(_SET, (self.key, self.val, version, self.expires_at))
        return Entry(self.val, version, self.expires_at)


class _DeleteOne:
    __slots__ = ("condition", "key")

    def __init__(self, key: str, condition: Optional[Condition]) -> None:
        self.key, self.condition = key, condition

    def apply(self, tx: _Transaction) -> bool:
        if tx.check(self.key, self.condition) is None:
            return False  # an expired row stays, for the purge to report
        tx.conn.execute(_DELETE, (self.key,))
        tx.revision += 1
        tx.record("delete", self.key)
        return True


class _SetMany:
    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[tuple[str, str, Optional[int]]]) -> None:
        self.rows = rows  # key, val, expires_at

    def apply(self, tx: _Transaction) -> int:
        tx.revision += 1
        version = tx.revision
        # The last row for a key wins: one write (and one change) per key.
        last = {key: (val, expires_at) for key, val, expires_at in self.rows}
        tx.conn.executemany(
            _SET, ((key, val, version, expires_at) for key, (val, expires_at) in last.items())
        )
        return version


def _remove(tx: _Transaction, keys: Sequence[str], kind: ChangeType) -> None:
    """Delete the rows of ``keys`` (live or expired, each once) in a new revision, recording
    each as a change of ``kind``."""
    tx.revision += 1
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        tx.conn.execute(f"DELETE FROM kv WHERE key IN ({','.join('?' * len(chunk))})", chunk)
    for key in keys:
        tx.record(kind, key)


class _DeleteMany:
    __slots__ = ("keys",)

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys

    def apply(self, tx: _Transaction) -> int:
        live: list[str] = []
        unique = list(dict.fromkeys(self.keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            live += (
                key
                for (key,) in tx.conn.execute(
                    f"SELECT key FROM kv WHERE key IN ({marks}) AND {_LIVE}", (*chunk, tx.now_ms)
                )
            )
        if live:  # expired rows stay, for the purge to report
            _remove(tx, live, "delete")
        return len(live)


class _Purge:
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def apply(self, tx: _Transaction) -> int:
        expired = [key for (key,) in tx.conn.execute(_EXPIRED, (tx.now_ms, self.limit))]
        if expired:
            _remove(tx, expired, "expire")
        return len(expired)


class _TrimHistory:
    """One step of trimming the history (see Store.trim_history); takes no revision."""

    __slots__ = ("batch", "max_age", "max_rows")

    def __init__(self, max_age: float, max_rows: int, batch: int) -> None:
        self.max_age, self.max_rows, self.batch = max_age, max_rows, batch

    def apply(self, tx: _Transaction) -> int:
        conn = tx.conn
        compact = _meta(conn, _COMPACT_REVISION)
        counted_through = _meta(conn, _HISTORY_COUNTED)
        # Every change up to tx.first is in the table (this group's own are not yet).
        rows = _meta(conn, _HISTORY_ROWS) + _count_changes_above(conn, counted_through)
        conn.execute(_MARK, (int(tx.now_ms), tx.first))
        cutoff = tx.now_ms - self.max_age * 1000
        aged = conn.execute(_AGED, (cutoff,)).fetchone()[0]
        # The newest mark at or before the cutoff decides; the older ones are needed no more.
        conn.execute(_UNMARK, (cutoff,))
        oldest = [
            revision
            for (revision,) in conn.execute(
                "SELECT revision FROM changes ORDER BY revision, key LIMIT ?", (self.batch,)
            )
        ]
        cut = trim_cut(oldest, compact, rows - self.max_rows, aged or 0)
        dropped = 0
        if oldest and oldest[0] <= cut:
            dropped = conn.execute("DELETE FROM changes WHERE revision <= ?", (cut,)).rowcount
        # A since below the compact revision is answered "compacted" before any gap counts.
        conn.execute("DELETE FROM gaps WHERE resumed_at <= ?", (cut,))
        conn.executemany(
            _WRITE_META,
            (
                (_COMPACT_REVISION, cut),
                (_HISTORY_ROWS, rows - dropped),
                (_HISTORY_COUNTED, tx.first),
            ),
        )
        return int(dropped)


def _count_changes_above(conn: sqlite3.Connection, revision: int) -> int:
    return int(
        conn.execute("SELECT count(*) FROM changes WHERE revision > ?", (revision,)).fetchone()[0]
    )


_MARK = "INSERT OR REPLACE INTO history_marks (at, revision) VALUES (?, ?)"
_AGED = "SELECT max(revision) FROM history_marks WHERE at <= ?"
_UNMARK = "DELETE FROM history_marks WHERE at < (SELECT max(at) FROM history_marks WHERE at <= ?)"


# Operations that are the store's upkeep, not a client's write: metrics count no write for them.
_UPKEEP = (_Purge, _TrimHistory)
Result = TypeVar("Result", covariant=True)


class _Operation(Protocol[Result]):
    """A write, applied inside a group's transaction; raises PreconditionFailed to decline."""

    def apply(self, tx: _Transaction) -> Result: ...


class _Alone:
    """A bulk load waiting in the committer's queue (see _GroupCommitter.run_alone)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], tuple[Any, int]]) -> None:
        self.run = run


class _GroupCommitter:
    """Commits writes in groups: each commit takes every write that arrived before it began.

    durability="normal": the commit runs on the event loop's thread, scheduled behind the
    handlers already queued, so the writes of one loop iteration share a transaction.
    durability="full": the commit (and its fsync) runs on a writer thread with its own
    connection, and the writes arriving meanwhile wait for the next one.
    A write is answered only when its group has committed. A write whose precondition fails
    is answered with PreconditionFailed and does not hold back the others of its group.
    """

    def __init__(
        self, path: Path, durability: str, loop_conn: sqlite3.Connection, clock: Clock
    ) -> None:
        self._path = path
        self._durability = durability
        self._clock = clock
        self._conn: Optional[sqlite3.Connection] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        if durability == "full":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-commit")
        else:
            self._conn = loop_conn
        self._pending: list[tuple[Union[_Operation[Any], _Alone], asyncio.Future[Any]]] = []
        self._draining: Optional[asyncio.Task[None]] = None
        self._alone_queued = 0  # bulk loads in _pending
        self.on_commit: Optional[Callable[[int], None]] = None
        # Told after each commit that took a revision (see SqliteStore.listen).
        self.wake: Optional[Wake] = None
        # The newest revision this process has woken its listener for.
        self.known_revision = 0

    async def submit(self, operation: _Operation[Result]) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((operation, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def run_alone(self, run: Callable[[], tuple[Result, int]]) -> Result:
        """Run ``run`` (a bulk load: it commits on a connection of its own and returns its
        result and the store's revision after it) on a thread, between two groups: this
        process's writes that arrive meanwhile wait for it, and its reads go on. Once
        queued, it runs to its end, even if the caller stops waiting."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((_Alone(run), future))
        self._alone_queued += 1
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def _run_alone(self, alone: _Alone, future: asyncio.Future[Any]) -> None:
        try:
            result, revision = await asyncio.get_running_loop().run_in_executor(None, alone.run)
        except Exception as error:
            if isinstance(error, sqlite3.Error):
                error = _translate(error, self._path)
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a caller gone no longer awaits it
            return
        self._committed(1, revision)
        if not future.done():
            future.set_result(result)

    def _committed(self, writes: int, revision: int) -> None:
        if self.on_commit is not None:
            self.on_commit(writes)
        if revision > self.known_revision:
            self.known_revision = revision
            if self.wake is not None:
                self.wake()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self._alone_queued:  # a group ends before a bulk load
                    first, future = self._pending[0]
                    if isinstance(first, _Alone):
                        del self._pending[0]
                        self._alone_queued -= 1
                        await self._run_alone(first, future)
                        continue
                    cut = next(
                        index
                        for index, (operation, _) in enumerate(self._pending)
                        if isinstance(operation, _Alone)
                    )
                    batch, self._pending = self._pending[:cut], self._pending[cut:]
                else:
                    batch, self._pending = self._pending, []
                operations = cast("list[_Operation[Any]]", [operation for operation, _ in batch])
                try:
                    if self._executor is None:
                        results, revision = self._commit(operations)
                    else:
                        results, revision = await loop.run_in_executor(
                            self._executor, self._commit, operations
                        )
                except sqlite3.Error as error:
                    failure = _translate(error, self._path)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                else:
                    self._committed(sum(not isinstance(op, _UPKEEP) for op in operations), revision)
                    for (_, future), result in zip(batch, results):
                        if future.done():
                            continue
                        if isinstance(result, PreconditionFailed):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
        finally:
            self._draining = None

    def _commit(self, operations: list[_Operation[Any]]) -> tuple[list[Any], int]:
        """One transaction for the whole group: one WAL append, at most one fsync. Returns
        each operation's result, and the revision after it."""
        if self._conn is None:  # the writer thread's own connection, made on that thread
            self._conn = _connect(self._path, self._durability)
        results: list[Any] = []
        with _transaction(self._conn) as conn:
            tx = _Transaction(conn, self._clock() * 1000)
            for operation in operations:
                try:
                    results.append(operation.apply(tx))
                except PreconditionFailed as failed:
                    results.append(failed)
            tx.finish()
        return results, tx.revision

    async def close(self) -> None:
        if self._draining is not None:
            await self._draining
        if self._executor is not None:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._executor.shutdown(wait=True)


class _FastSeedMissed(Exception):
    """The fast seed query got a row wrong: roll back, and use the exact one."""


# A bulk load's rows, in the order to apply them, each as (key, val, expires_at): rows whose
# key or val is NULL, or whose key is empty, are the ones the seed skips; the table's
# constraints refuse them, and OR IGNORE makes a refused row a skipped one. A key seen again
# takes the later row (the upsert), as a key already in the store does.
_BULK_INSERT = (
    "INSERT OR IGNORE INTO kv (key, val, expires_at, version) SELECT *, ? FROM ({select})"
    " WHERE true ON CONFLICT (key) DO UPDATE SET"
    " val = excluded.val, version = excluded.version, expires_at = excluded.expires_at"
)
# An import's rows, staged in the bulk load's own temporary table, in the order they came.
_CREATE_STAGED = (
    "CREATE TEMP TABLE staged (key TEXT NOT NULL, val TEXT NOT NULL, expires_at INTEGER)"
)
_STAGE = "INSERT INTO temp.staged (key, val, expires_at) VALUES (?, ?, ?)"
_STAGED = "SELECT key, val, expires_at FROM temp.staged ORDER BY rowid"


def _cores() -> int:
    """The CPUs this process may run on (its affinity, as taskset or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _count_misses(sql: SqlSeed) -> int:
    """The rows the fast seed query gets wrong, counted on a connection of this thread."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for name, function in sql.functions.items():
            conn.create_function(name, 1, function, deterministic=True)
        conn.execute(f"ATTACH DATABASE ? AS {SqlSeed.SCHEMA}", (sql.uri,))
        return int(conn.execute(sql.misses).fetchone()[0])
    finally:
        conn.close()


class _BulkLoad:
    """A bulk load on a connection of its own: an import's rows staged in a temporary table
    as they arrive, or a seed's file attached; then applied in one transaction by
    ``apply_staged`` or ``apply_seed``, which run on a thread (the committer runs them between
    its groups: see run_alone) and close the connection when they are done."""

    def __init__(self, path: Path, durability: str, replace: Optional[str], clock: Clock) -> None:
        self.path = path
        self.replace = replace
        self.clock = clock
        self.conn = _connect(path, durability, bulk=True)
        self._staging = False

    def stage(self, rows: Sequence[LoadRow]) -> None:
        if not self._staging:
            # One transaction for all the staging: it writes the temporary database only,
            # so it holds no lock on the store's file (a commit per batch cost three times
            # the rest of an import).
            self.conn.execute("BEGIN")
            self.conn.execute(_CREATE_STAGED)
            self._staging = True
        self.conn.executemany(_STAGE, rows)

    def apply_staged(self, fingerprint: Optional[str]) -> tuple[Optional[Loaded], int]:
        try:
            if self._staging:
                self.conn.execute("COMMIT")
            else:  # an empty import: a replace still removes
                self.conn.execute(_CREATE_STAGED)
            return self._apply(_STAGED, fingerprint)
        finally:
            self.conn.close()

    def apply_seed(self, sql: SqlSeed, fingerprint: str) -> tuple[Optional[Loaded], int]:
        """With a second core, the fast query and, on a thread meanwhile, the count of rows
        it gets wrong; when that is not 0 (input.db holds such text), the insert is rolled
        back and done again with the exact query. With one core (a container with one CPU),
        the exact query alone: the count would take that core from the insert, and costs
        more than the exact query's extra test (bench/results.md)."""
        conn = self.conn
        try:
            for name, function in sql.functions.items():
                conn.create_function(name, 1, function, deterministic=True)
            conn.execute(f"ATTACH DATABASE ? AS {SqlSeed.SCHEMA}", (sql.uri,))
            if _cores() < 2:
                return self._apply(sql.exact_select, fingerprint)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-seed-check") as pool:
                misses = pool.submit(_count_misses, sql)
                try:
                    return self._apply(sql.select, fingerprint, misses.result)
                except _FastSeedMissed:
                    log.info("seed_exact_rules", reason="text the fast query gets wrong")
            return self._apply(sql.exact_select, fingerprint)
        finally:
            conn.close()

    def _apply(
        self,
        select: str,
        fingerprint: Optional[str],
        misses: Optional[Callable[[], int]] = None,
    ) -> tuple[Optional[Loaded], int]:
        """One transaction: the fingerprint check, the rows with the next revision, the
        replace's removals, the count of keys, and the fingerprint. Returns what it did (None
        when the store already held this seed), and the store's revision after it."""
        conn = self.conn
        with _transaction(conn):
            if fingerprint is not None:
                row = conn.execute(_READ_META, (_SEED_FINGERPRINT,)).fetchone()
                if row is not None and row[0] == fingerprint:
                    return None, _meta(conn, _REVISION)
            first = _meta(conn, _REVISION)
            revision = life_start(first + 1, self.clock())
            applied = conn.execute(_BULK_INSERT.format(select=select), (revision,)).rowcount
            if misses is not None and misses():
                raise _FastSeedMissed  # rolls the insert back
            removed = 0
            if self.replace is not None:
                # Every key the load wrote has its revision; the others under the prefix go.
                where, parameters = _key_range(self.replace)
                removed = conn.execute(
                    f"DELETE FROM kv WHERE version <> ?{where}", (revision, *parameters)
                ).rowcount
            if applied or removed:
                conn.execute(_WRITE_META, (_REVISION, revision))
                # A bulk load, not events: watchers from before it list again.
                conn.execute(_WRITE_META, (_COMPACT_REVISION, revision))
                conn.execute(
                    _WRITE_META, (_KEYS, conn.execute("SELECT count(*) FROM kv").fetchone()[0])
                )
            else:
                revision = first
            if fingerprint is not None:
                conn.execute(_WRITE_META, (_SEED_FINGERPRINT, fingerprint))
        if applied or removed:
            # Move the load from the WAL into the file now: a seed's before the port opens,
            # rather than in whichever request's commit crosses the checkpoint threshold.
            # An import's without waiting for readers (an export's): the next one finishes.
            mode = "TRUNCATE" if fingerprint is not None else "PASSIVE"
            conn.execute(f"PRAGMA wal_checkpoint({mode})")
        return Loaded(applied, removed, revision), revision

    def close(self) -> None:
        self.conn.close()


# An export's rows: values up to this many characters come with their row; longer ones are
# read one at a time in the same snapshot, so that a fetch of _EXPORT_FETCH rows holds at
# most 2 MiB of values, whatever they are.
_EXPORT_INLINE_CHARS = 16_384
_EXPORT_FETCH = 128
_EXPORT_VALUE = "SELECT val FROM kv WHERE key = ?"


class _SqliteSnapshot:
    """An export's read transaction on a connection of its own, read a batch at a time on
    the event loop's thread (a batch is a millisecond or so: requests wait no longer)."""

    def __init__(self, path: Path, prefix: str, now_ms: float) -> None:
        self._path = path
        self._conn = sqlite3.connect(sqlite_uri(path.resolve()), uri=True, isolation_level=None)
        try:
            self._conn.execute("PRAGMA mmap_size = 67108864")
            self._conn.execute("BEGIN")
            self.revision = _meta(self._conn, _REVISION)  # the snapshot begins with this read
            where, parameters = _key_range(prefix)
            self._rows = self._conn.execute(
                f"SELECT key, CASE WHEN length(val) <= {_EXPORT_INLINE_CHARS} THEN val END,"
                f" expires_at FROM kv WHERE {_LIVE}{where} ORDER BY key",
                (now_ms, *parameters),
            )
        except BaseException:
            self._conn.close()
            raise

    async def batches(self) -> AsyncIterator[list[LoadRow]]:
        pending: list[Any] = []  # rows read but not yet in a batch
        while True:
            batch: list[LoadRow] = []
            chars = 0
            try:
                # The query's rows as they come (a tuple each, no object of ours), but for
                # the long values, read on their own; a batch ends at the row that takes its
                # values past EXPORT_BATCH_CHARS.
                while len(batch) < EXPORT_BATCH_ROWS and chars < EXPORT_BATCH_CHARS:
                    rows, pending = pending or self._rows.fetchmany(_EXPORT_FETCH), []
                    if not rows:
                        break
                    for position, (key, val, expires_at) in enumerate(rows):
                        if val is None:
                            val = self._conn.execute(_EXPORT_VALUE, (key,)).fetchone()[0]
                            rows[position] = (key, val, expires_at)
                        chars += len(val)
                        if chars >= EXPORT_BATCH_CHARS:
                            rows, pending = rows[: position + 1], rows[position + 1 :]
                            break
                    batch += rows
            except sqlite3.Error as error:
                raise _translate(error, self._path) from None
            if not batch:
                return
            yield batch

    def close(self) -> None:
        self._conn.close()  # ends the read transaction: the WAL can be rewound again


class SqliteStore:
    """A Store in one SQLite file; see the module docstring for the threading and durability."""

    name = "sqlite"

    def __init__(self, path: Path, durability: str = "normal", clock: Clock = time.time) -> None:
        self.path = path
        self.durability = durability
        self._clock = clock
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
            _begin_life(self._conn, clock())
        except sqlite3.Error as error:
            raise _translate(error, path) from None
        # One cursor for every point read: a new one per get costs more than the lookup's
        # parsing.
        self._reader = self._conn.cursor()
        # The GETs waiting for this iteration's query: key -> the futures of its requests.
        self._gets: dict[str, list[asyncio.Future[Optional[Entry]]]] = {}
        self._committer = _GroupCommitter(path, durability, self._conn, clock)
        self._closed = False

    @property
    def on_commit(self) -> Optional[Callable[[int], None]]:
        return self._committer.on_commit

    @on_commit.setter
    def on_commit(self, callback: Optional[Callable[[int], None]]) -> None:
        self._committer.on_commit = callback

    def _read(self, sql: str, parameters: Sequence[object]) -> list[Any]:
        """All rows of one query, in this loop iteration's read snapshot."""
        try:
            if not self._conn.in_transaction:
                self._begin_read_snapshot()
            # fetchall, not fetchone: it steps the statement to its end, and a statement
            # left open would keep its read lock past COMMIT, which stops SQLite from ever
            # rewinding the WAL (the file then grows without bound under writes).
            return self._reader.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None

    async def get(self, key: str) -> Optional[Entry]:
        """Joins the GETs of this event-loop iteration in one query (``_read_gets``).

        One query for many keys costs less CPU than a query per key: the sqlite3 module's
        per-statement work is paid once, and SQLite looks the keys up in order, so the
        b-tree pages they share stay in the CPU's caches (bench/results.md has the figures).
        """
        future: asyncio.Future[Optional[Entry]] = asyncio.get_running_loop().create_future()
        waiting = self._gets.get(key)
        if waiting is not None:
            waiting.append(future)
        else:
            self._gets[key] = [future]
            if len(self._gets) == 1:
                asyncio.get_running_loop().call_soon(self._read_gets)
        return await future

    def _read_gets(self) -> None:
        gets, self._gets = self._gets, {}
        keys = list(gets)
        found: dict[str, Entry] = {}
        try:
            rows: list[Any] = []
            for start in range(0, len(keys), _GET_GROUP_MAX):
                group = keys[start : start + _GET_GROUP_MAX]
                size = 1 << (len(group) - 1).bit_length()
                group += [group[0]] * (size - len(group))
                rows += self._read(_GET_GROUP[size], group)
            now_ms: Optional[float] = None
            for key, val, version, expires_at in rows:
                # The clock is read only when a key expires: most reads never pay for it.
                if expires_at is not None:
                    if now_ms is None:
                        now_ms = self._clock() * 1000
                    if expires_at <= now_ms:
                        continue
                found[key] = Entry(val, version, expires_at)
        except Exception as error:  # every waiting request gets it, or they would wait forever
            for futures in gets.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            return
        for key, futures in gets.items():
            entry = found.get(key)
            for future in futures:
                if not future.done():  # its request may have been cancelled meanwhile
                    future.set_result(entry)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        found: dict[str, str] = {}
        now_ms = self._clock() * 1000
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT key, val FROM kv WHERE key IN ({marks}) AND {_LIVE}", (*chunk, now_ms)
            )
            found.update((str(key), str(val)) for key, val in rows)
        return found

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        """One range scan of the key's b-tree: O(log n) to the start, then the page."""
        conditions = [_LIVE]
        parameters: list[object] = [self._clock() * 1000]
        if after is not None and after >= prefix:
            conditions.append("key > ?")
            parameters.append(after)
        else:
            conditions.append("key >= ?")
            parameters.append(prefix)
        bound = prefix_upper_bound(prefix)
        if bound is not None:
            conditions.append("key < ?")
            parameters.append(bound)
        columns = "key, version, expires_at, val" if values else "key, version, expires_at"
        sql = f"SELECT {columns} FROM kv WHERE {' AND '.join(conditions)} ORDER BY key LIMIT ?"
        parameters.append(limit + 1)
        keys: list[ListedKey] = []
        value_chars = 0
        more = False
        try:
            if not self._conn.in_transaction:
                self._begin_read_snapshot()
            revision = int(self._read(_READ_META, (_REVISION,))[0][0])  # the page's snapshot
            # Its own cursor, closed at the end: a page may stop early (see PAGE_VALUE_CHARS),
            # and an unfinished statement would keep its read lock.
            with contextlib.closing(self._conn.execute(sql, parameters)) as rows:
                for row in rows:
                    if len(keys) == limit or (values and value_chars > PAGE_VALUE_CHARS):
                        more = True
                        break
                    listed = ListedKey(*row)
                    if values:
                        value_chars += len(listed.val or "")
                    keys.append(listed)
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        return Page(keys, more=more, revision=revision)

    def _begin_read_snapshot(self) -> None:
        """Open a read transaction that the reads of this event-loop iteration share.

        Beginning and ending a read transaction takes SQLite's WAL locks (fcntl calls on
        the -shm file), which were most of a read's cost. The snapshot is still fresh for
        every request: it begins after the loop read the requests it serves, and ends before
        the handlers of the next poll run, so a write acknowledged anywhere (another worker
        included) is seen by any request sent after.
        """
        self._conn.execute("BEGIN")
        asyncio.get_running_loop().call_soon(self._end_read_snapshot)

    def _end_read_snapshot(self) -> None:
        if not self._closed and self._conn.in_transaction:  # a commit may have ended it
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("COMMIT")

    async def set(
        self,
        key: str,
        val: str,
        ttl: Optional[float] = None,
        condition: Optional[Condition] = None,
    ) -> Entry:
        expires_at = None if ttl is None else expiry_of(ttl, self._clock())
        return await self._committer.submit(_SetOne(key, val, expires_at, condition))

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        return await self._committer.submit(_DeleteOne(key, condition))

    async def set_many(self, items: Sequence[SetItem]) -> int:
        now = self._clock()
        rows = [(item.key, item.val, expiry_of(item.ttl, now)) for item in items]
        return await self._committer.submit(_SetMany(rows))

    async def delete_many(self, keys: Sequence[str]) -> int:
        return await self._committer.submit(_DeleteMany(keys))

    async def purge_expired(self, limit: int) -> int:
        return await self._committer.submit(_Purge(limit))

    async def revision(self) -> int:
        return int(self._read(_READ_META, (_REVISION,))[0][0])

    async def changes(self, prefix: str, since: int, limit: int) -> Changes:
        """One range scan of the history's b-tree, in the loop's read snapshot, read only as
        far as take_changes takes it."""
        key_range, key_parameters = _key_range(prefix)
        revision = await self.revision()  # begins the snapshot the scan below shares
        try:
            compact = int(self._read(_READ_META, (_COMPACT_REVISION,))[0][0])
            gaps = [Gap(*row) for row in self._read(_GAPS_ABOVE, (since,))]
            check_since(since, revision, compact, gaps)
            # Its own cursor, closed at the end: an unfinished statement keeps its read lock.
            with contextlib.closing(
                self._conn.execute(
                    "SELECT revision, type, key, val, expires_at FROM changes"
                    f" WHERE revision > ?{key_range} ORDER BY revision, key",
                    (since, *key_parameters),
                )
            ) as rows:
                events, more = take_changes((Change(*row) for row in rows), limit)
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        return Changes(events, revision, more, compact, gaps)

    async def trim_history(self, max_age: float, max_rows: int, batch: int) -> int:
        dropped = await self._committer.submit(_TrimHistory(max_age, max_rows, batch))
        if dropped and self._committer.wake is not None:
            self._committer.wake()  # the feed's tail learns the compact revision it moved
        return dropped

    async def history(self) -> HistoryStats:
        counted = int(self._read(_READ_META, (_HISTORY_ROWS,))[0][0])
        counted_through = int(self._read(_READ_META, (_HISTORY_COUNTED,))[0][0])
        above = self._read("SELECT count(*) FROM changes WHERE revision > ?", (counted_through,))
        compact = int(self._read(_READ_META, (_COMPACT_REVISION,))[0][0])
        return HistoryStats(counted + int(above[0][0]), compact)

    async def listen(self, wake: Wake) -> None:
        """This process's commits wake at once (the committer calls ``wake``); another
        process's (a worker's) are noticed by polling PRAGMA data_version, which changes when
        another connection commits, every WATCH_POLL_INTERVAL seconds on a connection of its
        own: a read of the WAL index, no I/O. Then the revision is read, and ``wake`` called
        only when it is one this process has not woken for: its own commits change
        data_version too."""
        self._committer.wake = wake
        try:
            poller = sqlite3.connect(
                sqlite_uri(self.path.resolve()), uri=True, isolation_level=None
            )
        except sqlite3.Error as error:
            self._committer.wake = None
            raise _translate(error, self.path) from None
        try:
            wake()
            seen = None
            failing = False
            while True:
                try:
                    version = poller.execute("PRAGMA data_version").fetchone()[0]
                    if version != seen:
                        seen = version
                        revision = _meta(poller, _REVISION)
                        if revision != self._committer.known_revision:  # or restored
                            self._committer.known_revision = revision
                            wake()
                    failing = False
                except sqlite3.Error as error:  # a passing lock, say: wake to be safe
                    if not failing:  # said once, not every few ms while it lasts
                        log.warning("watch_poll_failed", reason=str(error))
                    failing, seen = True, None
                    wake()
                await asyncio.sleep(WATCH_POLL_INTERVAL)
        finally:
            self._committer.wake = None
            poller.close()

    async def load(self, source: BulkSource, replace: Optional[str] = None) -> Optional[Loaded]:
        """A seed's file is copied inside SQLite (ATTACH, then one INSERT ... SELECT); an
        import's rows are staged in a temporary table as they come, then copied the same way.
        Either way in one transaction on a connection of its own, on a thread, while the
        committer holds this process's other writes back (see _GroupCommitter.run_alone)."""
        sql = source.as_sql()
        try:
            bulk = _BulkLoad(self.path, self.durability, replace, self._clock)
            apply: Callable[[], tuple[Optional[Loaded], int]]
            if sql is not None:
                assert source.fingerprint is not None  # a seed's file has one
                apply = partial(bulk.apply_seed, sql, source.fingerprint)
            else:
                try:
                    async for batch in source.batches():
                        bulk.stage(batch)
                except BaseException:
                    bulk.close()
                    raise
                apply = partial(bulk.apply_staged, source.fingerprint)
            return await self._committer.run_alone(apply)
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error

    @contextlib.asynccontextmanager
    async def export(self, prefix: str) -> AsyncIterator[_SqliteSnapshot]:
        try:
            snapshot = _SqliteSnapshot(self.path, prefix, self._clock() * 1000)
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        try:
            yield snapshot
        finally:
            snapshot.close()

    async def seed_fingerprint(self) -> Optional[str]:
        row = self._conn.execute(_READ_META, (_SEED_FINGERPRINT,)).fetchone()
        return None if row is None else str(row[0])

    async def count(self) -> int:
        return int(self._read(_READ_META, (_KEYS,))[0][0])

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
