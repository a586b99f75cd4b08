"""The SqliteStore class: reads in the loop's shared snapshot, writes through the group
committer, the listener, and the bulk loads and exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import structlog

from .. import base
from ..reads import ReadGroups, Waiting, answer, fail
from ..trim import TrimPolicy
from .bulk import (
    BulkLoad,
    SqliteSnapshot,
    SqlSeedSource,
)
from .commit import (
    CreateToken,
    DeleteMany,
    DeleteOne,
    DeleteToken,
    ExpireLeases,
    GrantLease,
    GroupCommitter,
    KeepaliveLeases,
    Purge,
    RevokeLease,
    RotateToken,
    SetMany,
    SetOne,
    TouchTokens,
    Transact,
    TrimHistory,
)
from .schema import (
    CHUNK,
    COMPACT_REVISION,
    HISTORY_COUNTED,
    HISTORY_ROWS,
    KEYS,
    LIVE,
    READ_META,
    REVISION,
    SEED_FINGERPRINT,
    TOKENS_GENERATION,
    begin_life,
    check_header,
    connect,
    meta_value,
    prefix_range,
    prepare_schema,
    sqlite_uri,
    translate,
)

log = structlog.get_logger("kv.store")

# The GETs of one event-loop iteration, in one query: key IN (?, ?, ...) with as many marks as
# a power of two (a short list is padded with its first key), so a handful of statements serve
# every group size from SQLite's statement cache.
_GET_GROUP = {
    size: f"SELECT key, val, version, expires_at FROM kv WHERE key IN ({','.join('?' * size)})"
    for size in (1 << power for power in range(10))
}
_GET_GROUP_MAX = max(_GET_GROUP)

_GAPS_ABOVE = "SELECT forked_at, resumed_at FROM gaps WHERE resumed_at > ? ORDER BY resumed_at"

# A lookup in either hash's index (SQLite's OR of two indexes), never a scan.
TOKEN_BY_HASH = (
    f"SELECT {base.TOKEN_COLUMNS} FROM tokens WHERE secret_hash = ? OR previous_hash = ? LIMIT 1"
)

# How often a process looks for another's commits while it has watchers (see listen).
WATCH_POLL_INTERVAL = 0.005


class SqliteStore:
    """A Store in one SQLite file; see the package docstring for the threading and durability."""

    name = "sqlite"

    def __init__(
        self, path: Path, durability: str = "normal", clock: base.Clock = time.time
    ) -> None:
        self.path = path
        self.durability = durability
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        check_header(path)
        try:
            # Inspect before any pragma: switching a foreign file to WAL would modify it.
            inspector = sqlite3.connect(str(path), isolation_level=None)
            try:
                prepare_schema(inspector, path)
            finally:
                inspector.close()
            self._conn = connect(path, durability)
            begin_life(self._conn, clock())
        except sqlite3.Error as error:
            raise translate(error, path) from None
        # One cursor for every point read: a new one per get costs more than the lookup's
        # parsing.
        self._reader = self._conn.cursor()
        # The GETs waiting for this iteration's query.
        self._gets = ReadGroups(self._read_gets)
        self._committer = GroupCommitter(path, durability, self._conn, clock)
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
            raise translate(error, self.path) from None

    async def get(self, key: str) -> Optional[base.Entry]:
        """Joins the GETs of this event-loop iteration in one query (``_read_gets``).

        One query for many keys costs less CPU than a query per key: the sqlite3 module's
        per-statement work is paid once, and SQLite looks the keys up in order, so the
        b-tree pages they share stay in the CPU's caches (bench/results.md has the figures).
        """
        return await self._gets.join(key)

    def _read_gets(self, gets: Waiting) -> None:
        """One query for a group's keys, in this loop iteration's read snapshot (see _read),
        padded to a size of _GET_GROUP; answered before it returns."""
        keys = list(gets)
        found: dict[str, base.Entry] = {}
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
                found[key] = base.Entry(val, version, expires_at)
        except Exception as error:
            fail(gets, error)
        else:
            answer(gets, found)
        finally:
            self._gets.ended()

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        found: dict[str, str] = {}
        now_ms = self._clock() * 1000
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), CHUNK):
            chunk = unique[start : start + CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT key, val FROM kv WHERE key IN ({marks}) AND {LIVE}", (*chunk, now_ms)
            )
            found.update((str(key), str(val)) for key, val in rows)
        return found

    async def list_keys(
        self, prefix: str, after: Optional[str], limit: int, values: bool
    ) -> base.Page:
        """One range scan of the key's b-tree: O(log n) to the start, then the page."""
        conditions = [LIVE]
        parameters: list[object] = [self._clock() * 1000]
        if after is not None and after >= prefix:
            conditions.append("key > ?")
            parameters.append(after)
        else:
            conditions.append("key >= ?")
            parameters.append(prefix)
        bound = base.prefix_upper_bound(prefix)
        if bound is not None:
            conditions.append("key < ?")
            parameters.append(bound)
        columns = "key, version, expires_at, val" if values else "key, version, expires_at"
        sql = f"SELECT {columns} FROM kv WHERE {' AND '.join(conditions)} ORDER BY key LIMIT ?"
        parameters.append(limit + 1)
        keys: list[base.ListedKey] = []
        value_chars = 0
        more = False
        try:
            if not self._conn.in_transaction:
                self._begin_read_snapshot()
            revision = int(self._read(READ_META, (REVISION,))[0][0])  # the page's snapshot
            # Its own cursor, closed at the end: a page may stop early (see PAGE_VALUE_CHARS),
            # and an unfinished statement would keep its read lock.
            with contextlib.closing(self._conn.execute(sql, parameters)) as rows:
                for row in rows:
                    if len(keys) == limit or (values and value_chars > base.PAGE_VALUE_CHARS):
                        more = True
                        break
                    listed = base.ListedKey(*row)
                    if values:
                        value_chars += len(listed.val or "")
                    keys.append(listed)
        except sqlite3.Error as error:
            raise translate(error, self.path) from None
        return base.Page(keys, more=more, revision=revision)

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
        condition: Optional[base.Condition] = None,
        lease: Optional[str] = None,
    ) -> base.Entry:
        expires_at = None if ttl is None else base.expiry_of(ttl, self._clock())
        return await self._committer.submit(SetOne(key, val, expires_at, condition, lease))

    async def delete(self, key: str, condition: Optional[base.Condition] = None) -> bool:
        return await self._committer.submit(DeleteOne(key, condition))

    async def set_many(self, items: Sequence[base.SetItem]) -> int:
        now = self._clock()
        rows = [(item.key, item.val, base.expiry_of(item.ttl, now)) for item in items]
        return await self._committer.submit(SetMany(rows))

    async def delete_many(self, keys: Sequence[str]) -> int:
        return await self._committer.submit(DeleteMany(keys))

    async def txn(
        self,
        compares: Sequence[base.Compare],
        success: Sequence[base.TxnOperation],
        failure: Sequence[base.TxnOperation],
    ) -> base.TxnResult:
        return await self._committer.submit(Transact(compares, success, failure))

    async def purge_expired(self, limit: int) -> int:
        return await self._committer.submit(Purge(limit))

    async def grant_lease(self, ttl: float) -> base.Lease:
        return await self._committer.submit(GrantLease(ttl))

    async def keepalive_lease(
        self, lease: str, may_write: Optional[base.MayWrite] = None
    ) -> base.Lease:
        return base.the_one_renewed(lease, await self.keepalive_leases([lease], may_write))

    async def keepalive_leases(
        self, leases: Sequence[str], may_write: Optional[base.MayWrite] = None
    ) -> list[base.Lease]:
        return await self._committer.submit(KeepaliveLeases(leases, may_write))

    async def lease_keys(self, lease: str) -> base.LeaseKeys:
        now_ms = self._clock() * 1000
        found = self._read(
            "SELECT ttl, expires_at FROM leases WHERE id = ? AND expires_at > ?", (lease, now_ms)
        )
        if not found:
            raise base.LeaseNotFound(lease)
        keys = self._read("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
        return base.LeaseKeys(base.Lease(lease, *found[0]), [key for (key,) in keys])

    async def revoke_lease(self, lease: str, may_write: Optional[base.MayWrite] = None) -> int:
        return await self._committer.submit(RevokeLease(lease, may_write))

    async def expire_leases(self, limit: int) -> int:
        return await self._committer.submit(ExpireLeases(limit))

    async def live_leases(self) -> int:
        now_ms = self._clock() * 1000
        return int(self._read("SELECT count(*) FROM leases WHERE expires_at > ?", (now_ms,))[0][0])

    async def create_token(self, token: base.Token) -> None:
        await self._committer.submit(CreateToken(token))

    async def tokens(self) -> Sequence[base.Token]:
        rows = self._read(f"SELECT {base.TOKEN_COLUMNS} FROM tokens ORDER BY name", ())
        return [base.token_of(row) for row in rows]

    async def token_by_hash(self, secret_hash: str) -> Optional[base.Token]:
        rows = self._read(TOKEN_BY_HASH, (secret_hash, secret_hash))
        return base.token_of(rows[0]) if rows else None

    async def rotate_token(
        self, name: str, secret_hash: str, previous_until: Optional[int]
    ) -> base.Token:
        return await self._committer.submit(RotateToken(name, secret_hash, previous_until))

    async def delete_token(self, name: str) -> bool:
        return await self._committer.submit(DeleteToken(name))

    async def touch_tokens(self, used: Mapping[str, int]) -> None:
        if used:
            await self._committer.submit(TouchTokens(dict(used)))

    async def tokens_generation(self) -> int:
        return int(self._read(READ_META, (TOKENS_GENERATION,))[0][0])

    async def revision(self) -> int:
        return int(self._read(READ_META, (REVISION,))[0][0])

    async def changes(self, prefix: str, since: int, limit: int) -> base.Changes:
        """One range scan of the history's b-tree, in the loop's read snapshot, read only as
        far as take_changes takes it."""
        key_range, key_parameters = prefix_range(prefix)
        revision = await self.revision()  # begins the snapshot the scan below shares
        try:
            compact = int(self._read(READ_META, (COMPACT_REVISION,))[0][0])
            gaps = [base.Gap(*row) for row in self._read(_GAPS_ABOVE, (since,))]
            base.check_since(since, revision, compact, gaps)
            # Its own cursor, closed at the end: an unfinished statement keeps its read lock.
            with contextlib.closing(
                self._conn.execute(
                    "SELECT revision, type, key, val, expires_at FROM changes"
                    f" WHERE revision > ?{key_range} ORDER BY revision, key",
                    (since, *key_parameters),
                )
            ) as rows:
                events, more = base.take_changes((base.Change(*row) for row in rows), limit)
        except sqlite3.Error as error:
            raise translate(error, self.path) from None
        return base.Changes(events, revision, more, compact, gaps)

    async def trim_history(self, max_age: float, max_rows: int, batch: int) -> int:
        dropped = await self._committer.submit(TrimHistory(TrimPolicy(max_age, max_rows, batch)))
        if dropped:
            self._committer.revisions.poke()  # the feed's tail learns the compact revision
        return dropped

    async def history(self) -> base.HistoryStats:
        counted = int(self._read(READ_META, (HISTORY_ROWS,))[0][0])
        counted_through = int(self._read(READ_META, (HISTORY_COUNTED,))[0][0])
        above = self._read("SELECT count(*) FROM changes WHERE revision > ?", (counted_through,))
        compact = int(self._read(READ_META, (COMPACT_REVISION,))[0][0])
        return base.HistoryStats(counted + int(above[0][0]), compact)

    async def listen(self, wake: base.Wake) -> None:
        """This process's commits wake at once (the committer calls ``wake``); another
        process's (a worker's) are noticed by polling PRAGMA data_version, which changes when
        another connection commits, every WATCH_POLL_INTERVAL seconds on a connection of its
        own: a read of the WAL index, no I/O. Then the revision is read, and ``wake`` called
        only when it is one this process has not woken for: its own commits change
        data_version too."""
        with self._committer.revisions.listening(wake):
            try:
                poller = sqlite3.connect(
                    sqlite_uri(self.path.resolve()), uri=True, isolation_level=None
                )
            except sqlite3.Error as error:
                raise translate(error, self.path) from None
            try:
                await self._poll(poller, wake)
            finally:
                poller.close()

    async def _poll(self, poller: sqlite3.Connection, wake: base.Wake) -> None:
        """Wake once, then poll on ``poller`` until cancelled (see listen)."""
        wake()
        seen = None
        failing = False
        while True:
            try:
                version = poller.execute("PRAGMA data_version").fetchone()[0]
                if version != seen:
                    seen = version
                    self._committer.revisions.seen(meta_value(poller, REVISION))
                failing = False
            except sqlite3.Error as error:  # a passing lock, say: wake to be safe
                if not failing:  # said once, not every few ms while it lasts
                    log.warning("watch_poll_failed", reason=str(error))
                failing, seen = True, None
                wake()
            await asyncio.sleep(WATCH_POLL_INTERVAL)

    async def load(
        self, source: base.BulkSource, replace: Optional[str] = None
    ) -> Optional[base.Loaded]:
        """A seed's file is copied inside SQLite (ATTACH, then one INSERT ... SELECT); an
        import's rows are staged in a temporary table as they come, then copied the same way.
        Either way in one transaction on a connection of its own, on a thread, while the
        committer holds this process's other writes back (see GroupCommitter.run_alone)."""
        sql = source.as_sql() if isinstance(source, SqlSeedSource) else None
        try:
            bulk = BulkLoad(self.path, self.durability, replace, self._clock)
            apply: Callable[[], tuple[Optional[base.Loaded], int]]
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
            raise translate(error, self.path) from error

    @contextlib.asynccontextmanager
    async def export(self, prefix: str) -> AsyncIterator[SqliteSnapshot]:
        try:
            snapshot = SqliteSnapshot(self.path, prefix, self._clock() * 1000)
        except sqlite3.Error as error:
            raise translate(error, self.path) from None
        try:
            yield snapshot
        finally:
            snapshot.close()

    async def seed_fingerprint(self) -> Optional[str]:
        row = self._conn.execute(READ_META, (SEED_FINGERPRINT,)).fetchone()
        return None if row is None else str(row[0])

    async def count(self) -> int:
        return int(self._read(READ_META, (KEYS,))[0][0])

    async def ping(self) -> None:
        try:
            # Touches the file (a page of meta), not just the library.
            self._conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as error:
            raise translate(error, self.path) from None

    async def close(self) -> None:
        await self._committer.close()
        self._end_read_snapshot()
        self._closed = True
        with contextlib.suppress(sqlite3.Error):  # advisory only; closing must still happen
            self._conn.execute("PRAGMA optimize")
        self._conn.close()  # the last connection to close checkpoints and removes the WAL
