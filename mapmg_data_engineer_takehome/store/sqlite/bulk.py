"""The sqlite store's bulk loads (an import staged in a temporary table, a seed's file
attached and copied inside SQLite) and its export snapshots.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol, runtime_checkable

import structlog

from ..base import (
    Clock,
    Loaded,
    LoadRow,
    life_start,
)
from ..batches import batched
from .schema import (
    COMPACT_REVISION,
    KEYS,
    LIVE,
    READ_META,
    REVISION,
    SEED_FINGERPRINT,
    WRITE_META,
    connect,
    meta_value,
    prefix_range,
    sqlite_uri,
    translate,
    write_transaction,
)

log = structlog.get_logger("kv.store")


@dataclass(frozen=True)
class SqlSeed:
    """A seed's rows as SQL over its SQLite file, for a store that can ATTACH it and copy the
    rows without one passing through Python."""

    # The schema name the seed database is attached under; the queries read from it.
    SCHEMA: ClassVar[str] = "seed"
    uri: str  # a URI of the seed database that SQLite can ATTACH
    # SELECT (key, val, expires_at) of every row in the order to apply them, key or val NULL
    # (or an empty key) where a row is skipped: a store applies it with constraints that
    # ignore those rows.
    select: str
    # The same, exact where ``select`` has a blind spot (see seed._text_of), at a cost.
    exact_select: str
    # SELECT count(*) of the rows ``select`` gets wrong; when it is not 0, use exact_select.
    misses: str
    functions: Mapping[str, Callable[..., Any]]  # SQL functions the queries call


@runtime_checkable
class SqlSeedSource(Protocol):
    """A BulkSource that the sqlite store can take faster than by its batches: its rows as SQL
    over a SQLite file (a seed's input.db), which the store ATTACHes and copies itself. The
    store checks for it at its load; other stores take the batches."""

    def as_sql(self) -> Optional[SqlSeed]:
        """The same rows as SQL over a SQLite file, or None when there is no such file."""


class _FastSeedMissed(Exception):
    """The fast seed query got a row wrong: roll back, and use the exact one."""


# A bulk load's rows, in the order to apply them, each as (key, val, expires_at): rows whose
# key or val is NULL, or whose key is empty, are the ones the seed skips; the table's
# constraints refuse them, and OR IGNORE makes a refused row a skipped one. A key seen again
# takes the later row (the upsert), as a key already in the store does.
_BULK_INSERT = (
    "INSERT OR IGNORE INTO kv (key, val, expires_at, version) SELECT *, ? FROM ({select})"
    " WHERE true ON CONFLICT (key) DO UPDATE SET"
    " val = excluded.val, version = excluded.version, expires_at = excluded.expires_at,"
    " lease = NULL"  # a loaded row has no lease
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


class BulkLoad:
    """A bulk load on a connection of its own: an import's rows staged in a temporary table
    as they arrive, or a seed's file attached; then applied in one transaction by
    ``apply_staged`` or ``apply_seed``, which run on a thread (the committer runs them between
    its groups: see run_alone) and close the connection when they are done."""

    def __init__(self, path: Path, durability: str, replace: Optional[str], clock: Clock) -> None:
        self.path = path
        self.replace = replace
        self.clock = clock
        self.conn = connect(path, durability, bulk=True)
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
        with write_transaction(conn):
            if fingerprint is not None:
                row = conn.execute(READ_META, (SEED_FINGERPRINT,)).fetchone()
                if row is not None and row[0] == fingerprint:
                    return None, meta_value(conn, REVISION)
            first = meta_value(conn, REVISION)
            revision = life_start(first + 1, self.clock())
            applied = conn.execute(_BULK_INSERT.format(select=select), (revision,)).rowcount
            if misses is not None and misses():
                raise _FastSeedMissed  # rolls the insert back
            removed = 0
            if self.replace is not None:
                # Every key the load wrote has its revision; the others under the prefix go.
                where, parameters = prefix_range(self.replace)
                removed = conn.execute(
                    f"DELETE FROM kv WHERE version <> ?{where}", (revision, *parameters)
                ).rowcount
            if applied or removed:
                conn.execute(WRITE_META, (REVISION, revision))
                # A bulk load, not events: watchers from before it list again.
                conn.execute(WRITE_META, (COMPACT_REVISION, revision))
                conn.execute(
                    WRITE_META, (KEYS, conn.execute("SELECT count(*) FROM kv").fetchone()[0])
                )
            else:
                revision = first
            if fingerprint is not None:
                conn.execute(WRITE_META, (SEED_FINGERPRINT, fingerprint))
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


class SqliteSnapshot:
    """An export's read transaction on a connection of its own, read a batch at a time on
    the event loop's thread (a batch is a millisecond or so: requests wait no longer)."""

    def __init__(self, path: Path, prefix: str, now_ms: float) -> None:
        self._path = path
        self._conn = sqlite3.connect(sqlite_uri(path.resolve()), uri=True, isolation_level=None)
        try:
            self._conn.execute("PRAGMA mmap_size = 67108864")
            self._conn.execute("BEGIN")
            self.revision = meta_value(self._conn, REVISION)  # the snapshot begins with this read
            where, parameters = prefix_range(prefix)
            self._rows = self._conn.execute(
                f"SELECT key, CASE WHEN length(val) <= {_EXPORT_INLINE_CHARS} THEN val END,"
                f" expires_at FROM kv WHERE {LIVE}{where} ORDER BY key",
                (now_ms, *parameters),
            )
        except BaseException:
            self._conn.close()
            raise

    async def batches(self) -> AsyncIterator[list[LoadRow]]:
        for batch in batched(self._rows_with_values()):
            yield batch

    def _rows_with_values(self) -> Iterator[LoadRow]:
        """The query's rows as they come (a tuple each, no object of ours), but for the long
        values, read on their own."""
        try:
            for rows in iter(partial(self._rows.fetchmany, _EXPORT_FETCH), []):
                for row in rows:
                    if row[1] is None:
                        row = (
                            row[0],
                            self._conn.execute(_EXPORT_VALUE, (row[0],)).fetchone()[0],
                            row[2],
                        )
                    yield row
        except sqlite3.Error as error:
            raise translate(error, self._path) from None

    def close(self) -> None:
        self._conn.close()  # ends the read transaction: the WAL can be rewound again
