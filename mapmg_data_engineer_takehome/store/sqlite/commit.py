"""The sqlite store's writes: each operation applied inside a group's transaction, and the
group committer that runs them (see GroupCommitter).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar, Union, cast

from ..base import (
    TOKEN_COLUMNS,
    ChangeType,
    Clock,
    Compare,
    Condition,
    DeletedKey,
    DeletedPrefix,
    Entry,
    GotKey,
    KeysRefused,
    Lease,
    LeaseNotFound,
    MayWrite,
    PreconditionFailed,
    SetKey,
    Token,
    TokenExists,
    TokenNotFound,
    TxnDelete,
    TxnGet,
    TxnOperation,
    TxnOutcome,
    TxnResult,
    TxnSet,
    condition_holds,
    expiry_of,
    first_failing,
    lease_expiry,
    leases_of,
    new_lease_id,
    token_of,
    token_row,
)
from ..notify import RevisionWake
from ..trim import TrimPolicy
from .schema import (
    CHUNK,
    COMPACT_REVISION,
    HISTORY_COUNTED,
    HISTORY_ROWS,
    LIVE,
    REVISION,
    TOKENS_GENERATION,
    WRITE_META,
    connect,
    meta_value,
    prefix_range,
    translate,
    write_transaction,
)

_GET_LIVE_VERSION = "SELECT version, expires_at FROM kv WHERE key = ?"
_GET_ENTRY = "SELECT val, version, expires_at FROM kv WHERE key = ?"
# A set names its lease, or none (which detaches the key from the one it had).
_SET = (
    "INSERT INTO kv (key, val, version, expires_at, lease) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,"
    " expires_at = excluded.expires_at, lease = excluded.lease"
)
_DELETE = "DELETE FROM kv WHERE key = ?"
# A leased key expires with its lease, all its keys at once (ExpireLeases), never alone.
_EXPIRED = "SELECT key FROM kv WHERE expires_at <= ? AND lease IS NULL ORDER BY expires_at LIMIT ?"
_LIVE_LEASE = "SELECT ttl, expires_at FROM leases WHERE id = ? AND expires_at > ?"
_LEASE_KEYS = "SELECT key FROM kv WHERE lease = ? ORDER BY key"
_RECORD_REMOVAL = "INSERT INTO changes (revision, key, type) VALUES (?, ?, ?)"


class _Transaction:
    """One group's write transaction: its connection, its clock reading, the revision (read
    once under the write lock and written back once, if any write took one: each write that
    changes something adds one to ``revision``) and the removals to record with it."""

    def __init__(self, conn: sqlite3.Connection, now_ms: float) -> None:
        self.conn = conn
        self.now_ms = now_ms
        self.first = meta_value(conn, REVISION)
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

    def live_entry(self, key: str) -> Optional[Entry]:
        row = self.conn.execute(_GET_ENTRY, (key,)).fetchone()
        if row is None or (row[2] is not None and row[2] <= self.now_ms):
            return None
        return Entry(*row)

    def check(self, key: str, condition: Optional[Condition]) -> Optional[int]:
        """The key's live version; PreconditionFailed when ``condition`` does not hold."""
        current = self.live_version(key)
        if not condition_holds(condition, current):
            raise PreconditionFailed(current)
        return current

    def live_lease(self, lease: str) -> Lease:
        """The lease, if live; else LeaseNotFound."""
        row = self.conn.execute(_LIVE_LEASE, (lease, self.now_ms)).fetchone()
        if row is None:
            raise LeaseNotFound(lease)
        return Lease(lease, row[0], row[1])

    def finish(self) -> None:
        if self.removals:
            self.conn.executemany(_RECORD_REMOVAL, self.removals)
        if self.revision != self.first:
            self.conn.execute(WRITE_META, (REVISION, self.revision))


# The operations below are plain classes with __slots__: one is made per write, and a frozen
# dataclass costs three times as much to make.


class SetOne:
    __slots__ = ("condition", "expires_at", "key", "lease", "val")

    def __init__(
        self,
        key: str,
        val: str,
        expires_at: Optional[int],
        condition: Optional[Condition],
        lease: Optional[str] = None,
    ) -> None:
        self.key, self.val, self.expires_at, self.condition = key, val, expires_at, condition
        self.lease = lease

    def apply(self, tx: _Transaction) -> Entry:
        if self.condition is not None:
            tx.check(self.key, self.condition)
        expires_at = self.expires_at
        if self.lease is not None:
            expires_at = tx.live_lease(self.lease).expires_at
        tx.revision += 1
        version = tx.revision
        tx.conn.execute(_SET, (self.key, self.val, version, expires_at, self.lease))
        return Entry(self.val, version, expires_at)


class DeleteOne:
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


class SetMany:
    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[tuple[str, str, Optional[int]]]) -> None:
        self.rows = rows  # key, val, expires_at

    def apply(self, tx: _Transaction) -> int:
        tx.revision += 1
        version = tx.revision
        # The last row for a key wins: one write (and one change) per key.
        last = {key: (val, expires_at) for key, val, expires_at in self.rows}
        tx.conn.executemany(
            _SET,
            ((key, val, version, expires_at, None) for key, (val, expires_at) in last.items()),
        )
        return version


def _remove(tx: _Transaction, keys: Sequence[str], kind: ChangeType) -> int:
    """Delete the rows of ``keys`` (live or expired, each once) in a new revision, recording
    each as a change of ``kind``; how many. No revision is taken when there are none."""
    if not keys:
        return 0
    tx.revision += 1
    _delete_rows(tx, keys, tx.revision, kind)
    return len(keys)


def _delete_rows(tx: _Transaction, keys: Sequence[str], revision: int, kind: ChangeType) -> None:
    """Delete the rows of ``keys`` (each once), recording each as a change of ``kind`` in
    ``revision``."""
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        tx.conn.execute(f"DELETE FROM kv WHERE key IN ({','.join('?' * len(chunk))})", chunk)
    tx.removals.extend((revision, key, kind) for key in keys)


class DeleteMany:
    __slots__ = ("keys",)

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys

    def apply(self, tx: _Transaction) -> int:
        live: list[str] = []
        unique = list(dict.fromkeys(self.keys))
        for start in range(0, len(unique), CHUNK):
            chunk = unique[start : start + CHUNK]
            marks = ",".join("?" * len(chunk))
            live += (
                key
                for (key,) in tx.conn.execute(
                    f"SELECT key FROM kv WHERE key IN ({marks}) AND {LIVE}", (*chunk, tx.now_ms)
                )
            )
        return _remove(tx, live, "delete")  # expired rows stay, for the purge to report


class Transact:
    """A transaction of POST /txn (see Store.txn): its compares and both branches, applied
    inside the group's transaction, so that the group's commit makes it atomic."""

    __slots__ = ("compares", "failure", "success")

    def __init__(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOperation],
        failure: Sequence[TxnOperation],
    ) -> None:
        self.compares, self.success, self.failure = compares, success, failure

    def apply(self, tx: _Transaction) -> TxnResult:
        failed = first_failing(self.compares, tx.live_entry)
        branch = self.success if failed is None else self.failure
        # Every lease the branch names is live, or nothing is written.
        leases = {lease: tx.live_lease(lease) for lease in leases_of(branch)}
        revision = tx.revision + 1  # taken only if the branch changes anything
        changed = False
        results: list[TxnOutcome] = []
        for operation in branch:
            if isinstance(operation, TxnGet):
                results.append(GotKey.of(operation.key, tx.live_entry(operation.key)))
            elif isinstance(operation, TxnSet):
                expires_at = expiry_of(operation.ttl, tx.now_ms / 1000)
                if operation.lease is not None:
                    expires_at = leases[operation.lease].expires_at
                # The trigger records the set's change and counts a new key.
                tx.conn.execute(
                    _SET, (operation.key, operation.val, revision, expires_at, operation.lease)
                )
                changed = True
                results.append(SetKey(operation.key, revision))
            elif isinstance(operation, TxnDelete):
                deleted = tx.live_version(operation.key) is not None
                if deleted:  # an expired row stays, for the purge to report
                    _delete_rows(tx, [operation.key], revision, "delete")
                    changed = True
                results.append(DeletedKey(operation.key, deleted))
            else:
                key_range, parameters = prefix_range(operation.prefix)
                live_keys = [
                    key
                    for (key,) in tx.conn.execute(
                        f"SELECT key FROM kv WHERE {LIVE}{key_range}", (tx.now_ms, *parameters)
                    )
                ]
                _delete_rows(tx, live_keys, revision, "delete")
                changed = changed or bool(live_keys)
                results.append(DeletedPrefix(operation.prefix, len(live_keys)))
        if changed:
            tx.revision = revision
        return TxnResult(failed is None, tx.revision, failed, results)


class Purge:
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def apply(self, tx: _Transaction) -> int:
        expired = [key for (key,) in tx.conn.execute(_EXPIRED, (tx.now_ms, self.limit))]
        return _remove(tx, expired, "expire")


class GrantLease:
    """A new lease (see Store.grant_lease); takes no revision."""

    __slots__ = ("ttl",)

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

    def apply(self, tx: _Transaction) -> Lease:
        lease = Lease(new_lease_id(), self.ttl, lease_expiry(self.ttl, tx.now_ms / 1000))
        tx.conn.execute(
            "INSERT INTO leases (id, ttl, expires_at) VALUES (?, ?, ?)",
            (lease.id, lease.ttl, lease.expires_at),
        )
        return lease


class KeepaliveLeases:
    """Renew each live lease of ``leases`` and its keys' expiry: updates of expires_at alone,
    which the triggers do not record, and no revision. Leases not live are skipped."""

    __slots__ = ("leases", "may_write")

    def __init__(self, leases: Sequence[str], may_write: Optional[MayWrite]) -> None:
        self.leases = leases
        self.may_write = may_write

    def apply(self, tx: _Transaction) -> list[Lease]:
        live = []
        for lease in self.leases:
            row = tx.conn.execute(_LIVE_LEASE, (lease, tx.now_ms)).fetchone()
            if row is not None:
                live.append((lease, row[0]))
        if self.may_write is not None:  # before the first write: a refusal writes nothing
            _judge(tx, [lease for lease, _ in live], self.may_write)
        renewed = []
        for lease, ttl in live:
            kept = Lease(lease, ttl, lease_expiry(ttl, tx.now_ms / 1000))
            renewal = (kept.expires_at, lease)
            tx.conn.execute("UPDATE leases SET expires_at = ? WHERE id = ?", renewal)
            tx.conn.execute("UPDATE kv SET expires_at = ? WHERE lease = ?", renewal)
            renewed.append(kept)
        return renewed


def _end_lease(tx: _Transaction, lease: str, kind: ChangeType) -> int:
    """Drop the lease and its keys, in one revision of ``kind`` changes if it had any."""
    keys = [key for (key,) in tx.conn.execute(_LEASE_KEYS, (lease,))]
    tx.conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
    return _remove(tx, keys, kind)


def _judge(tx: _Transaction, leases: Sequence[str], may_write: MayWrite) -> None:
    """KeysRefused unless ``may_write`` allows every key of ``leases``, as they are now."""
    keys = sorted(key for lease in leases for (key,) in tx.conn.execute(_LEASE_KEYS, (lease,)))
    if not may_write(keys):
        raise KeysRefused(keys)


class RevokeLease:
    __slots__ = ("lease", "may_write")

    def __init__(self, lease: str, may_write: Optional[MayWrite]) -> None:
        self.lease = lease
        self.may_write = may_write

    def apply(self, tx: _Transaction) -> int:
        tx.live_lease(self.lease)
        if self.may_write is not None:
            _judge(tx, [self.lease], self.may_write)
        return _end_lease(tx, self.lease, "delete")


class ExpireLeases:
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def apply(self, tx: _Transaction) -> int:
        expired = [
            lease
            for (lease,) in tx.conn.execute(
                "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id LIMIT ?",
                (tx.now_ms, self.limit),
            )
        ]
        for lease in expired:
            _end_lease(tx, lease, "expire")
        return len(expired)


# --- access tokens (see base.py): no revision, no change; every write but a touch moves the
# generation, in the same transaction.

_CREATE_TOKEN = (
    f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (name) DO NOTHING"
)
# The right-hand sides read the row as it was: the secret replaced becomes the previous one.
_ROTATE_TOKEN = (
    "UPDATE tokens SET previous_hash = CASE WHEN ? IS NULL THEN NULL ELSE secret_hash END,"
    " previous_until = ?, secret_hash = ? WHERE name = ?"
)
_READ_TOKEN = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE name = ?"
_NEXT_GENERATION = f"UPDATE meta SET value = value + 1 WHERE name = '{TOKENS_GENERATION}'"


class CreateToken:
    __slots__ = ("token",)

    def __init__(self, token: Token) -> None:
        self.token = token

    def apply(self, tx: _Transaction) -> None:
        if tx.conn.execute(_CREATE_TOKEN, token_row(self.token)).rowcount == 0:
            raise TokenExists(self.token.name)
        tx.conn.execute(_NEXT_GENERATION)


class RotateToken:
    __slots__ = ("name", "previous_until", "secret_hash")

    def __init__(self, name: str, secret_hash: str, previous_until: Optional[int]) -> None:
        self.name, self.secret_hash, self.previous_until = name, secret_hash, previous_until

    def apply(self, tx: _Transaction) -> Token:
        parameters = (self.previous_until, self.previous_until, self.secret_hash, self.name)
        if tx.conn.execute(_ROTATE_TOKEN, parameters).rowcount == 0:
            raise TokenNotFound(self.name)
        tx.conn.execute(_NEXT_GENERATION)
        return token_of(tx.conn.execute(_READ_TOKEN, (self.name,)).fetchone())


class DeleteToken:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def apply(self, tx: _Transaction) -> bool:
        if tx.conn.execute("DELETE FROM tokens WHERE name = ?", (self.name,)).rowcount == 0:
            return False
        tx.conn.execute(_NEXT_GENERATION)
        return True


class TouchTokens:
    """When tokens were last used (see Store.touch_tokens): the generation stays, since no
    cache needs to read them again for it."""

    __slots__ = ("used",)

    def __init__(self, used: Mapping[str, int]) -> None:
        self.used = used

    def apply(self, tx: _Transaction) -> None:
        tx.conn.executemany(
            "UPDATE tokens SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE name = ?",
            ((used_at, name) for name, used_at in self.used.items()),
        )


class TrimHistory:
    """One step of trimming the history (see Store.trim_history); takes no revision."""

    __slots__ = ("policy",)

    def __init__(self, policy: TrimPolicy) -> None:
        self.policy = policy

    def apply(self, tx: _Transaction) -> int:
        conn = tx.conn
        compact = meta_value(conn, COMPACT_REVISION)
        counted_through = meta_value(conn, HISTORY_COUNTED)
        # Every change up to tx.first is in the table (this group's own are not yet).
        rows = meta_value(conn, HISTORY_ROWS) + _count_changes_above(conn, counted_through)
        conn.execute(_MARK, (int(tx.now_ms), tx.first))
        policy = self.policy
        cutoff = policy.cutoff(tx.now_ms)
        aged = conn.execute(_AGED, (cutoff,)).fetchone()[0]
        conn.execute(_UNMARK, (cutoff,))
        oldest = [
            revision
            for (revision,) in conn.execute(
                "SELECT revision FROM changes ORDER BY revision, key LIMIT ?", (policy.batch,)
            )
        ]
        cut = policy.cut(oldest, compact, rows, aged)
        dropped = 0
        if policy.drops(oldest, cut):
            dropped = conn.execute("DELETE FROM changes WHERE revision <= ?", (cut,)).rowcount
        # A since below the compact revision is answered "compacted" before any gap counts.
        conn.execute("DELETE FROM gaps WHERE resumed_at <= ?", (cut,))
        conn.executemany(
            WRITE_META,
            (
                (COMPACT_REVISION, cut),
                (HISTORY_ROWS, rows - dropped),
                (HISTORY_COUNTED, tx.first),
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
_UPKEEP = (Purge, TrimHistory, ExpireLeases, TouchTokens)
# What an operation raises to decline, writing nothing: its future gets it, and the others of
# its group commit.
_DECLINED = (PreconditionFailed, LeaseNotFound, KeysRefused, TokenExists, TokenNotFound)
Result = TypeVar("Result", covariant=True)


class _Operation(Protocol[Result]):
    """A write, applied inside a group's transaction; raises PreconditionFailed to decline."""

    def apply(self, tx: _Transaction) -> Result: ...


class _Alone:
    """A bulk load waiting in the committer's queue (see GroupCommitter.run_alone)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], tuple[Any, int]]) -> None:
        self.run = run


class GroupCommitter:
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
        # Woken after each commit that took a revision (see SqliteStore.listen).
        self.revisions = RevisionWake()

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
                error = translate(error, self._path)
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
        self.revisions.moved(revision)

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
                except Exception as error:
                    # The group's transaction was rolled back: every write of it failed. An
                    # error that is no sqlite3.Error (a bug) reaches the callers too, which
                    # answer 500 and log it, rather than leaving them waiting for ever.
                    failure = (
                        translate(error, self._path) if isinstance(error, sqlite3.Error) else error
                    )
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                else:
                    self._committed(sum(not isinstance(op, _UPKEEP) for op in operations), revision)
                    for (_, future), result in zip(batch, results):
                        if future.done():
                            continue
                        if isinstance(result, _DECLINED):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
        finally:
            self._draining = None

    def _commit(self, operations: list[_Operation[Any]]) -> tuple[list[Any], int]:
        """One transaction for the whole group: one WAL append, at most one fsync. Returns
        each operation's result, and the revision after it."""
        if self._conn is None:  # the writer thread's own connection, made on that thread
            self._conn = connect(self._path, self._durability)
        results: list[Any] = []
        with write_transaction(self._conn) as conn:
            tx = _Transaction(conn, self._clock() * 1000)
            for operation in operations:
                try:
                    results.append(operation.apply(tx))
                except _DECLINED as declined:
                    results.append(declined)
            tx.finish()
        return results, tx.revision

    async def close(self) -> None:
        if self._draining is not None:
            await self._draining
        if self._executor is not None:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._executor.shutdown(wait=True)
