"""The PostgresStore class: the pool and its calls, grouped GETs and writes, the history,
the listener, and the bulk loads and exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, Callable, Optional, TypeVar

import asyncpg
import structlog

from ...settings import PostgresPooler
from ..base import (
    PAGE_VALUE_CHARS,
    BulkRow,
    BulkSource,
    Change,
    Changes,
    Clock,
    Compare,
    Condition,
    DeletedKey,
    DeletedPrefix,
    Entry,
    Gap,
    GotKey,
    HistoryStats,
    IfAbsent,
    IfExists,
    IfVersion,
    KeysRefused,
    Lease,
    LeaseKeys,
    LeaseNotFound,
    ListedKey,
    Loaded,
    LoadRow,
    MayWrite,
    Page,
    PreconditionFailed,
    SetItem,
    SetKey,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    Token,
    TokenExists,
    TokenNotFound,
    TxnDelete,
    TxnGet,
    TxnOperation,
    TxnOutcome,
    TxnResult,
    TxnSet,
    Wake,
    check_since,
    condition_holds,
    first_failing,
    leases_of,
    life_start,
    new_lease_id,
    prefix_upper_bound,
    the_one_renewed,
    token_of,
    token_row,
)
from ..batches import BatchCut
from ..notify import RevisionWake
from ..reads import ReadGroups, Waiting, answer, fail
from ..trim import TrimPolicy
from .connect import (
    FAILURES,
    LOST_STATEMENT,
    WRITABLE,
    Connection,
    PrimaryCheck,
    ReadOnly,
    answerable,
    check_primary,
    connect_any_host,
    connect_options,
    describe,
    log_crash,
    redacted_url,
    retrieve,
    translate,
)
from .sql import (
    ANY_EXPIRED,
    ANY_EXPIRED_LEASE,
    APPLY_BULK,
    BULK_TABLE,
    CHANGES,
    CHANNEL,
    COUNT_KEYS,
    CREATE_TOKEN,
    DELETE_MANY,
    DELETE_PREFIX,
    DELETE_TOKEN,
    EXPIRED_LEASES,
    EXPORT_FETCH,
    EXPORT_PAGE,
    EXPORT_VALUE,
    GET_MANY,
    GRANT_LEASE,
    KEYS_OF_LEASES,
    LEASE_KEYS,
    LIVE,
    LIVE_LEASES,
    LOCK_LEASE,
    LOCK_REVISION,
    NEXT_TOKENS_GENERATION,
    NOW,
    PURGE,
    READ_META,
    READ_REVISION,
    REMOVE_LEASE_KEYS,
    REMOVE_OTHERS,
    RENEW_LEASES,
    RENEW_LEASES_KEYS,
    REVOKE_LEASE,
    ROTATE_TOKEN,
    SCHEMA,
    SCHEMA_LOCK,
    SCHEMA_VERSION,
    SEED_FINGERPRINT,
    SEED_LOCK,
    SET_MANY,
    TAKE_REVISION,
    TOKEN_BY_HASH,
    TOKENS,
    TOUCH_TOKENS,
    TRIM_LOCK,
    TXN_BEGIN,
    TXN_GET,
    TXN_SET,
    UPGRADES,
    WRITE,
    WRITE_META,
)

log = structlog.get_logger("kv.store")

Result = TypeVar("Result")

# How often a listening server reads the revision, in case a notification went missing.
WATCH_POLL_INTERVAL = 1.0
# How often a server that cannot LISTEN (behind a pooler in transaction mode, given no
# listen_url) reads the revision: other servers' writes reach its watchers within this.
POLL_WITHOUT_LISTEN = 0.2
# Read groups in flight at once behind a pooler in transaction mode, at most: there every
# query is parsed twice, in two round trips (nothing stays prepared), so the GETs that arrive
# while groups are in flight wait to go as one bigger group rather than each turn's own.
# Measured (bench/pooler.py, 5 rounds, through PgBouncer): 0.86x the direct GET rate and
# 74 µs of CPU per GET on the whole path, against 0.76x and 91 µs with no bound.
READS_IN_FLIGHT_BEHIND_POOLER = 2

# The listening connection's application_name, which pg_stat_activity shows.
LISTENER_NAME = "kv-listen"
# After the listening connection failed, the pause before the next try: the first, doubled on
# each failure up to the last, and the first again once a connection has listened (so that a
# few dropped connections in a process's life do not leave the others' commits waiting 5 s).
LISTEN_RETRY_FIRST = 0.25
LISTEN_RETRY_MAX = 5.0

_CONDITION_NAMES = {IfExists: "exists", IfAbsent: "absent", IfVersion: "version"}


class _Listening:
    """Whether one listening connection got as far as LISTEN."""

    __slots__ = ("worked",)

    def __init__(self) -> None:
        self.worked = False


class _Write:
    """One single-key write waiting for its group: a row of kv_write's arguments."""

    __slots__ = ("condition", "future", "key", "kind", "ttl_ms", "val")

    def __init__(
        self,
        kind: str,
        key: str,
        val: Optional[str],
        ttl_ms: Optional[int],
        condition: Optional[Condition],
    ) -> None:
        self.kind, self.key, self.val, self.ttl_ms = kind, key, val, ttl_ms
        self.condition = condition
        # Its answer: kv_write's row (outcome, new version, new expiry).
        self.future: asyncio.Future[tuple[str, Any, Any]] = (
            asyncio.get_running_loop().create_future()
        )


class PostgresStore:
    """A Store in a PostgreSQL database; open it with ``await PostgresStore.open(...)``."""

    name = "postgres"

    def __init__(
        self,
        pool: asyncpg.Pool,
        url: str,
        timeout: float,
        clock: Optional[Clock] = None,
        pooler: PostgresPooler = "none",
        listen_url: Optional[str] = None,
    ) -> None:
        self._pool = pool
        self._url = url
        self._timeout = timeout
        self._clock = clock
        self._pooler = pooler
        self._connect_options = connect_options(pooler)
        # Where to LISTEN: never through a pooler in transaction mode (None: poll instead).
        self._listen_url = listen_url or (None if pooler == "transaction" else url)
        self._reads = ReadGroups(
            self._start_read, READS_IN_FLIGHT_BEHIND_POOLER if pooler == "transaction" else None
        )
        self._writes: list[_Write] = []
        self._draining: Optional[asyncio.Task[None]] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_commit: Optional[Callable[[int], None]] = None
        self._revisions = RevisionWake()

    # --- opening ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        pool_size: int = 10,
        timeout: float = 2.0,
        startup_wait: float = 30.0,
        clock: Optional[Clock] = None,
        pooler: PostgresPooler = "none",
        listen_url: Optional[str] = None,
    ) -> PostgresStore:
        """Connect (retrying with backoff for up to ``startup_wait`` seconds, logging each
        failed attempt), create or upgrade the schema, and return the store. ``pooler`` and
        ``listen_url``: see the package docstring.

        ``clock`` replaces the database's for expiry: for tests only, since replicas would
        then disagree on what has expired.
        """
        deadline = time.monotonic() + startup_wait
        delay, attempt = 0.25, 0
        check = PrimaryCheck()
        while True:
            attempt += 1
            try:
                pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=pool_size,
                    connect=connect_any_host,
                    init=check,
                    connection_class=Connection,
                    timeout=timeout,  # to connect
                    command_timeout=timeout,
                    **connect_options(pooler),
                )
                break
            except (*FAILURES, ValueError) as error:
                if isinstance(error, ValueError):  # a malformed URL: no retry will mend it
                    raise StoreUnavailable(f"{redacted_url(url)}: {describe(error)}") from None
                if getattr(error, "sqlstate", None) in LOST_STATEMENT:  # nor will it mend this
                    raise translate(error) from None
                if time.monotonic() + delay > deadline:
                    if isinstance(error, ReadOnly):
                        raise StoreUnavailable(
                            f"PostgreSQL at {redacted_url(url)} is read-only, not a primary "
                            f"(a standby in recovery?), after {startup_wait:g} s "
                            f"({attempt} attempts)"
                        ) from None
                    raise StoreUnavailable(
                        f"PostgreSQL at {redacted_url(url)} did not answer within "
                        f"{startup_wait:g} s ({attempt} attempts); last: {describe(error)}"
                    ) from None
                log.warning(
                    "postgres_unreachable",
                    attempt=attempt,
                    retry_in=round(delay, 2),
                    reason=describe(error),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        store = cls(pool, url, timeout, clock, pooler, listen_url)
        try:
            await store._prepare_schema()
        except BaseException:
            await pool.close()
            raise
        check.schema_ready = True
        return store

    async def _prepare_schema(self) -> None:
        """Create the schema, or upgrade it, once: replicas that start together wait for the
        one holding the lock, then find it done."""
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                    exists = await conn.fetchval("SELECT to_regclass('kv_meta') IS NOT NULL")
                    version = (
                        int(await conn.fetchval(READ_META, "schema_version") or 0) if exists else 0
                    )
                    if version > SCHEMA_VERSION:
                        raise StoreCorrupt(
                            f"{redacted_url(self._url)}: written by a newer version "
                            f"(schema {version})"
                        )
                    if version == 0:
                        for statement in SCHEMA:
                            await conn.execute(statement)
                    for step in range(max(version, 1), SCHEMA_VERSION):
                        for statement in UPGRADES[step]:
                            await conn.execute(statement)
                    if version != SCHEMA_VERSION:
                        await conn.execute(WRITE_META, "schema_version", str(SCHEMA_VERSION))
                        log.info("store_schema", schema_from=version, schema_to=SCHEMA_VERSION)
                    # This connection was made before the schema was there to check with.
                    await check_primary(conn)
            except FAILURES as error:
                raise translate(error) from None

    # --- calls ----------------------------------------------------------------------------

    def _now(self) -> Optional[int]:
        return None if self._clock is None else round(self._clock() * 1000)

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one statement, within the timeout, a connection and the answer together."""
        return await self._use(lambda conn: conn.fetch(query, *args))

    async def _use(
        self, work: Callable[[Any], Awaitable[Result]], transaction: bool = False
    ) -> Result:
        """``work`` on a pooled connection (in a transaction if asked), a connection and the
        answer within the timeout. A connection that failed, that found itself on a read-only
        server, or whose answer did not come in time is closed, never returned to the pool: a
        server cut off by a partition never answers, not even a reset, and the next
        connection goes through the URL's hosts again, to wherever the primary now is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except FAILURES as error:
            raise await self._failed(error) from None
        run = asyncio.ensure_future(self._run(conn, work, transaction))
        try:
            await asyncio.wait({run}, timeout=max(deadline - loop.time(), 0))
        except BaseException:  # the request was cancelled (its client left) mid-query
            self._abandon(conn, run)
            raise
        if not run.done():
            self._abandon(conn, run)
            raise await self._failed(asyncio.TimeoutError()) from None
        try:
            result = run.result()
        except FAILURES as error:
            failure = await self._failed(error)
            await self._give_back(conn, close=isinstance(failure, StoreUnavailable))
            raise failure from None
        except BaseException:
            await self._give_back(conn)
            raise
        await self._give_back(conn)
        return result

    async def _give_back(self, conn: Any, close: bool = False) -> None:
        """Return ``conn`` to the pool, closed first when it failed. A connection that the
        server ended under a call is one asyncpg has already taken back: its proxy then
        raises InterfaceError for either, and there is nothing left to do."""
        with contextlib.suppress(asyncpg.InterfaceError):
            if close:
                conn.terminate()
            await self._pool.release(conn)

    @staticmethod
    async def _run(
        conn: Any, work: Callable[[Any], Awaitable[Result]], transaction: bool
    ) -> Result:
        if not transaction:
            return await work(conn)
        async with conn.transaction():
            return await work(conn)

    def _abandon(self, conn: Any, run: asyncio.Future[Any]) -> None:
        """Close ``conn`` under a call still running on it (which then fails at once) and
        give it back to the pool once that call has ended, its outcome retrieved."""
        with contextlib.suppress(asyncpg.InterfaceError):  # already taken back: closed
            conn.terminate()

        def ended(run: asyncio.Future[Any]) -> None:
            retrieve(run)
            self._spawn(self._give_back(conn))

        run.add_done_callback(ended)

    async def _failed(self, error: BaseException) -> StoreError:
        failure = translate(error)
        if isinstance(failure, StoreUnavailable):
            # The database went away, or the primary moved: drop every idle connection now,
            # rather than failing one request on each of them.
            await self._pool.expire_connections()
        return failure

    # --- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Optional[Entry]:
        """Joins the GETs of this event-loop turn in one query."""
        return await self._within(self._reads.join(key))

    async def _within(self, future: asyncio.Future[Result]) -> Result:
        """The answer of a grouped call, or StoreUnavailable after the timeout: a request
        waiting behind a group in flight must not wait for two timeouts."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(
                f"PostgreSQL did not answer within {self._timeout:g} s"
            ) from None
        finally:
            if not future.done():  # answered without it (a timeout, a cancellation)
                future.add_done_callback(retrieve)

    def _start_read(self, reads: Waiting) -> None:
        self._spawn(self._read(reads))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_crash)

    async def _read(self, reads: Waiting) -> None:
        try:
            rows = await self._fetch(GET_MANY, list(reads), self._now())
        except Exception as error:
            fail(reads, answerable(error))
            return
        finally:
            self._reads.ended()
        answer(reads, {row[0]: Entry(row[1], row[2], row[3]) for row in rows})

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        rows = await self._fetch(GET_MANY, list(dict.fromkeys(keys)), self._now())
        return {row[0]: row[1] for row in rows}

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        """One range scan of the primary key's index: O(log n) to the start, then the page."""
        parameters: list[Any] = [limit + 1, self._now()]
        conditions = [LIVE]
        if after is not None and after >= prefix:
            parameters.append(after)
            conditions.append(f"key > ${len(parameters)}")
        else:
            parameters.append(prefix)
            conditions.append(f"key >= ${len(parameters)}")
        bound = prefix_upper_bound(prefix)
        if bound is not None:
            parameters.append(bound)
            conditions.append(f"key < ${len(parameters)}")
        where = " AND ".join(conditions)
        if not values:
            rows = await self._fetch(
                _with_revision(
                    f"SELECT key, version, expires_at FROM kv WHERE {where} ORDER BY key LIMIT $1"
                ),
                *parameters,
            )
            keys = [ListedKey(row[1], row[2], row[3]) for row in rows[:limit] if row[1] is not None]
            return Page(keys, more=len(rows) > limit, revision=rows[0][0])
        # A page stops once its values pass PAGE_VALUE_CHARS: the values beyond are never
        # sent, however many the limit allows.
        parameters.append(PAGE_VALUE_CHARS)
        rows = await self._fetch(
            _with_revision(
                f"""SELECT key, version, expires_at, CASE WHEN before <= ${len(parameters)}
                       THEN val END AS val, before <= ${len(parameters)} AS within FROM (
                    SELECT key, version, expires_at, val, coalesce(sum(length(val)) OVER
                           (ORDER BY key ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                           AS before
                      FROM kv WHERE {where} ORDER BY key LIMIT $1) page"""
            ),
            *parameters,
        )
        page: list[ListedKey] = []
        for row in rows:
            if row[1] is None:  # the page is empty
                break
            if len(page) == limit or not row[5]:
                return Page(page, more=True, revision=row[0])
            page.append(ListedKey(row[1], row[2], row[3], row[4]))
        return Page(page, more=False, revision=rows[0][0])

    # --- writes ---------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        val: str,
        ttl: Optional[float] = None,
        condition: Optional[Condition] = None,
        lease: Optional[str] = None,
    ) -> Entry:
        if lease is not None:
            return await self._set_leased(key, val, condition, lease)
        ttl_ms = None if ttl is None else round(ttl * 1000)
        outcome, version, expires_at = await self._submit(
            _Write("set", key, val, ttl_ms, condition)
        )
        if outcome == "failed":
            raise PreconditionFailed(version)
        return Entry(val, version, expires_at)

    async def _set_leased(
        self, key: str, val: str, condition: Optional[Condition], lease: str
    ) -> Entry:
        """A set with a lease: a transaction of its own (not the grouped kv_write), which
        takes the revision's lock, then checks the condition and the lease."""

        async def write(conn: Any) -> Entry:
            current, now_ms = await conn.fetchrow(TXN_BEGIN, self._now())
            row = await conn.fetchrow(TXN_GET, key, now_ms)
            live = None if row is None else int(row[1])
            if not condition_holds(condition, live):
                raise PreconditionFailed(live)
            expires_at = await _live_lease(conn, lease, now_ms)
            revision = current + 1
            await conn.execute(TXN_SET, key, val, revision, expires_at, lease)
            await conn.execute(TAKE_REVISION)
            return Entry(val, revision, expires_at)

        entry = await self._in_transaction(write)
        if self.on_commit is not None:
            self.on_commit(1)
        self._revisions.moved(entry.version)
        return entry

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        outcome, version, _ = await self._submit(_Write("delete", key, None, None, condition))
        if outcome == "failed":
            raise PreconditionFailed(version)
        return outcome == "deleted"

    async def _submit(self, write: _Write) -> tuple[str, Any, Any]:
        self._writes.append(write)
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
            self._draining.add_done_callback(log_crash)
        # A 503 for a write that then commits is a "maybe"; a 200 is only ever a commit.
        return await self._within(write.future)

    async def _drain(self) -> None:
        """Send the waiting writes as one group; those arriving meanwhile go in the next."""
        try:
            while self._writes:
                group, self._writes = self._writes, []
                try:
                    rows = await self._fetch(
                        WRITE,
                        [write.kind for write in group],
                        [write.key for write in group],
                        [write.val for write in group],
                        [write.ttl_ms for write in group],
                        [_condition_name(write.condition) for write in group],
                        [_condition_version(write.condition) for write in group],
                        self._now(),
                    )
                except Exception as error:  # every waiting write gets an answer
                    failure = answerable(error)
                    for write in group:
                        if not write.future.done():
                            write.future.set_exception(failure)
                    continue
                if self.on_commit is not None:
                    self.on_commit(len(group))
                moved = [row[1] for row in rows if row[0] in ("written", "deleted")]
                if moved:
                    self._revisions.moved(max(moved))
                for write, row in zip(group, rows):
                    if not write.future.done():
                        write.future.set_result((row[0], row[1], row[2]))
        finally:
            self._draining = None

    async def _in_transaction(self, work: Callable[[Any], Awaitable[Result]]) -> Result:
        """``work`` on a pooled connection in a transaction, all within the timeout."""
        return await self._use(work, transaction=True)

    async def set_many(self, items: Sequence[SetItem]) -> int:
        # One row per key, the last item's: a statement may not touch a row twice.
        last = list({item.key: item for item in items}.values())
        ttls = [None if item.ttl is None else round(item.ttl * 1000) for item in last]

        async def write(conn: Any) -> int:
            # Taking the revision first takes its lock, as every write does.
            revision = int(await conn.fetchval(TAKE_REVISION))
            await conn.execute(
                SET_MANY,
                [item.key for item in last],
                [item.val for item in last],
                ttls,
                revision,
                self._now(),
            )
            return revision

        revision = await self._in_transaction(write)
        if self.on_commit is not None:
            self.on_commit(1)
        self._revisions.moved(revision)
        return revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOperation],
        failure: Sequence[TxnOperation],
    ) -> TxnResult:
        """One database transaction, which takes the revision's lock before it reads: every
        write of every replica takes it first, so none comes between the compares and the
        branch, on keys that do not exist as on those that do."""

        changes_taken = False

        async def transact(conn: Any) -> TxnResult:
            current, now_ms = await conn.fetchrow(TXN_BEGIN, self._now())
            revision = current + 1  # taken only if the branch changes anything
            keys = list(dict.fromkeys(compare.key for compare in compares))
            rows = await conn.fetch(GET_MANY, keys, now_ms) if keys else []
            held = {row[0]: Entry(row[1], row[2], row[3]) for row in rows}
            failed = first_failing(compares, held.get)
            branch = success if failed is None else failure
            # Every lease the branch names is live (and held FOR SHARE), or nothing is written.
            leases = {lease: await _live_lease(conn, lease, now_ms) for lease in leases_of(branch)}
            changed = False
            results: list[TxnOutcome] = []
            for operation in branch:
                if isinstance(operation, TxnGet):
                    row = await conn.fetchrow(TXN_GET, operation.key, now_ms)
                    live = None if row is None else Entry(row[0], row[1], row[2])
                    results.append(GotKey.of(operation.key, live))
                elif isinstance(operation, TxnSet):
                    expires_at = (
                        None if operation.ttl is None else now_ms + round(operation.ttl * 1000)
                    )
                    if operation.lease is not None:
                        expires_at = leases[operation.lease]
                    await conn.execute(
                        TXN_SET,
                        operation.key,
                        operation.val,
                        revision,
                        expires_at,
                        operation.lease,
                    )
                    changed = True
                    results.append(SetKey(operation.key, revision))
                elif isinstance(operation, TxnDelete):
                    deleted = await conn.fetchval(DELETE_MANY, [operation.key], now_ms, revision)
                    changed = changed or deleted > 0
                    results.append(DeletedKey(operation.key, deleted > 0))
                else:
                    deleted = await conn.fetchval(
                        DELETE_PREFIX,
                        operation.prefix,
                        now_ms,
                        revision,
                        prefix_upper_bound(operation.prefix),
                    )
                    changed = changed or deleted > 0
                    results.append(DeletedPrefix(operation.prefix, int(deleted)))
            if changed:
                await conn.execute(TAKE_REVISION)
            nonlocal changes_taken
            changes_taken = changed
            return TxnResult(failed is None, revision if changed else current, failed, results)

        result = await self._in_transaction(transact)
        if self.on_commit is not None:
            self.on_commit(1)
        if changes_taken:
            self._revisions.moved(result.revision)
        return result

    async def _remove(self, statement: str, first: Any) -> int:
        """Run a _remove statement in a new revision, taken only if it removed anything.
        The revision's lock is taken first, as every write takes it."""

        revision = 0

        async def remove(conn: Any) -> int:
            nonlocal revision
            revision = int(await conn.fetchval(LOCK_REVISION)) + 1
            removed = int(await conn.fetchval(statement, first, self._now(), revision))
            if removed:
                await conn.execute(TAKE_REVISION)
            return removed

        removed = await self._in_transaction(remove)
        if removed:
            self._revisions.moved(revision)
        return removed

    async def delete_many(self, keys: Sequence[str]) -> int:
        deleted = await self._remove(DELETE_MANY, list(dict.fromkeys(keys)))
        if deleted and self.on_commit is not None:
            self.on_commit(1)
        return deleted

    async def purge_expired(self, limit: int) -> int:
        # Most sweeps find nothing: they ask without taking the revision's lock.
        if not (await self._fetch(ANY_EXPIRED, self._now()))[0][0]:
            return 0
        return await self._remove(PURGE, limit)

    # --- leases ---------------------------------------------------------------------------
    # Judged by the database's clock (NOW), as every write here is, so that replicas agree.

    async def grant_lease(self, ttl: float) -> Lease:
        lease = new_lease_id()
        rows = await self._fetch(GRANT_LEASE, lease, ttl, self._now())
        return Lease(lease, ttl, int(rows[0][0]))

    async def keepalive_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> Lease:
        return the_one_renewed(lease, await self.keepalive_leases([lease], may_write))

    async def keepalive_leases(
        self, leases: Sequence[str], may_write: Optional[MayWrite] = None
    ) -> list[Lease]:
        async def renew(conn: Any) -> list[Lease]:
            # The update holds the leases' rows, which a set under a lease reads FOR SHARE:
            # their keys cannot change before the commit, nor before the judgement.
            rows = await conn.fetch(RENEW_LEASES, list(leases), self._now())
            if rows and may_write is not None:
                await _judge(conn, [row[0] for row in rows], may_write)  # raising: rolled back
            if rows:
                ids, expiries = zip(*((row[0], row[2]) for row in rows))
                await conn.execute(RENEW_LEASES_KEYS, list(ids), list(expiries))
            renewed = {row[0]: Lease(row[0], float(row[1]), int(row[2])) for row in rows}
            return [renewed[lease] for lease in leases if lease in renewed]

        return await self._in_transaction(renew)

    async def lease_keys(self, lease: str) -> LeaseKeys:
        rows = await self._fetch(LEASE_KEYS, lease, self._now())
        if not rows:
            raise LeaseNotFound(lease)
        ttl, expires_at, keys = rows[0]
        return LeaseKeys(Lease(lease, float(ttl), int(expires_at)), list(keys))

    async def revoke_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> int:
        revision = 0

        async def revoke(conn: Any) -> int:
            nonlocal revision
            revision = int(await conn.fetchval(LOCK_REVISION)) + 1
            # The delete holds the lease's row, as a keepalive's update does.
            if await conn.fetchval(REVOKE_LEASE, lease, self._now()) is None:
                raise LeaseNotFound(lease)
            if may_write is not None:
                await _judge(conn, [lease], may_write)  # raising: rolled back
            return await _remove_lease(conn, lease, revision, "delete")

        removed = await self._in_transaction(revoke)
        if removed:
            if self.on_commit is not None:
                self.on_commit(1)
            self._revisions.moved(revision)
        return removed

    async def expire_leases(self, limit: int) -> int:
        # Most sweeps find nothing: they ask without taking the revision's lock.
        if not (await self._fetch(ANY_EXPIRED_LEASE, self._now()))[0][0]:
            return 0
        revision = 0

        async def expire(conn: Any) -> int:
            nonlocal revision
            revision = int(await conn.fetchval(LOCK_REVISION))
            expired = [row[0] for row in await conn.fetch(EXPIRED_LEASES, self._now(), limit)]
            for lease in expired:  # a revision for each lease that had keys
                if await _remove_lease(conn, lease, revision + 1, "expire"):
                    revision += 1
            return len(expired)

        expired = await self._in_transaction(expire)
        if expired:
            self._revisions.moved(revision)
        return expired

    async def live_leases(self) -> int:
        return int((await self._fetch(LIVE_LEASES, self._now()))[0][0])

    # --- access tokens (see base.py): one table that every replica shares -----------------

    async def create_token(self, token: Token) -> None:
        async def create(conn: Any) -> None:
            created = await conn.fetchval(CREATE_TOKEN, *token_row(token))
            if created is None:  # the name was taken, perhaps by another replica just now
                raise TokenExists(token.name)
            await conn.execute(NEXT_TOKENS_GENERATION)

        await self._in_transaction(create)

    async def tokens(self) -> Sequence[Token]:
        return [token_of(row) for row in await self._fetch(TOKENS)]

    async def token_by_hash(self, secret_hash: str) -> Optional[Token]:
        rows = await self._fetch(TOKEN_BY_HASH, secret_hash)
        return token_of(rows[0]) if rows else None

    async def rotate_token(
        self, name: str, secret_hash: str, previous_until: Optional[int]
    ) -> Token:
        async def rotate(conn: Any) -> Token:
            row = await conn.fetchrow(ROTATE_TOKEN, name, secret_hash, previous_until)
            if row is None:
                raise TokenNotFound(name)
            await conn.execute(NEXT_TOKENS_GENERATION)
            return token_of(row)

        return await self._in_transaction(rotate)

    async def delete_token(self, name: str) -> bool:
        async def delete(conn: Any) -> bool:
            if await conn.fetchval(DELETE_TOKEN, name) is None:
                return False
            await conn.execute(NEXT_TOKENS_GENERATION)
            return True

        return await self._in_transaction(delete)

    async def touch_tokens(self, used: Mapping[str, int]) -> None:
        if not used:
            return
        names = sorted(used)  # replicas touching the same tokens lock them in one order
        await self._fetch(TOUCH_TOKENS, names, [used[name] for name in names])

    async def tokens_generation(self) -> int:
        return int((await self._fetch(READ_META, "tokens_generation"))[0][0])

    # --- the history ----------------------------------------------------------------------

    async def revision(self) -> int:
        return int((await self._fetch(READ_REVISION))[0][0])

    async def changes(self, prefix: str, since: int, limit: int) -> Changes:
        rows = await self._fetch(
            CHANGES, since, prefix, prefix_upper_bound(prefix), limit, PAGE_VALUE_CHARS
        )
        revision, compact_revision, more, forked, resumed = rows[0][:5]
        gaps = [Gap(*gap) for gap in zip(forked or (), resumed or ())]
        check_since(since, revision, compact_revision, gaps)
        events = [Change(*row[5:]) for row in rows if row[5] is not None]
        return Changes(events, revision, more, compact_revision, gaps)

    async def trim_history(self, max_age: float, max_rows: int, batch: int) -> int:
        """One transaction, under a lock that the other servers' trims skip rather than wait
        for. The rows are counted up to a revision read first: every change up to it has
        committed (revisions commit in order), so none is counted twice."""

        policy = TrimPolicy(max_age, max_rows, batch)

        async def trim(conn: Any) -> int:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", TRIM_LOCK):
                return 0
            revision = int(await conn.fetchval(READ_REVISION))
            meta = dict(
                await conn.fetch(
                    "SELECT name, value::bigint FROM kv_meta WHERE name = ANY($1::text[])",
                    ["compact_revision", "history_rows", "history_counted"],
                )
            )
            rows = meta["history_rows"] + int(
                await conn.fetchval(
                    "SELECT count(*) FROM kv_changes WHERE revision > $1 AND revision <= $2",
                    meta["history_counted"],
                    revision,
                )
            )
            now_ms = await conn.fetchval(f"SELECT {NOW.format('$1::bigint')}", self._now())
            cutoff = round(policy.cutoff(now_ms))
            await conn.execute(
                "INSERT INTO kv_history_marks (at, revision) VALUES ($1, $2)"
                " ON CONFLICT (at) DO UPDATE SET revision = excluded.revision",
                now_ms,
                revision,
            )
            aged = await conn.fetchval(
                "SELECT max(revision) FROM kv_history_marks WHERE at <= $1", cutoff
            )
            await conn.execute(
                "DELETE FROM kv_history_marks WHERE at <"
                " (SELECT max(at) FROM kv_history_marks WHERE at <= $1)",
                cutoff,
            )
            oldest = [
                row[0]
                for row in await conn.fetch(
                    "SELECT revision FROM kv_changes ORDER BY revision, key LIMIT $1", batch
                )
            ]
            cut = policy.cut(oldest, meta["compact_revision"], rows, aged)
            dropped = 0
            if policy.drops(oldest, cut):
                status = await conn.execute("DELETE FROM kv_changes WHERE revision <= $1", cut)
                dropped = int(status.split()[-1])
            # A since below the compact revision is answered "compacted" before any gap counts.
            await conn.execute("DELETE FROM kv_timelines WHERE resumed_at <= $1", cut)
            # greatest: a seed may have moved the compact revision meanwhile.
            await conn.execute(
                "UPDATE kv_meta SET value = greatest(value::bigint, $1)::text"
                " WHERE name = 'compact_revision'",
                cut,
            )
            await conn.executemany(
                WRITE_META,
                [("history_rows", str(rows - dropped)), ("history_counted", str(revision))],
            )
            return dropped

        dropped = await self._in_transaction(trim)
        if dropped:
            self._revisions.poke()  # this process's feed learns the compact revision it moved
        return dropped

    async def history(self) -> HistoryStats:
        rows = await self._fetch(
            """WITH meta AS (
                   SELECT max(value::bigint) FILTER (WHERE name = 'history_rows') AS counted,
                          max(value::bigint) FILTER (WHERE name = 'history_counted') AS through,
                          max(value::bigint) FILTER (WHERE name = 'compact_revision') AS compact
                     FROM kv_meta)
               SELECT meta.counted + (SELECT count(*) FROM kv_changes
                                       WHERE revision > meta.through), meta.compact
                 FROM meta"""
        )
        return HistoryStats(int(rows[0][0]), int(rows[0][1]))

    async def listen(self, wake: Wake) -> None:
        """This process's commits wake at once; every server's (this one's too) are NOTIFYed
        on a connection of its own, outside the pool, which also reads the revision every
        WATCH_POLL_INTERVAL seconds in case a notification was lost; either wakes only for a
        revision this process has not woken for. When that connection drops it is made
        again, and ``wake`` called, since changes may have come meanwhile."""
        with self._revisions.listening(wake):
            if self._listen_url is None:
                await self._poll(wake)
            else:
                await self._listen(wake)

    async def _listen(self, wake: Wake) -> None:
        """Listen on connections made one after the other, until cancelled (see listen)."""
        delay = LISTEN_RETRY_FIRST
        while True:
            listening = _Listening()
            try:
                await self._listen_once(wake, listening)
            except FAILURES as error:
                if listening.worked:  # a connection that worked: the next try is soon
                    delay = LISTEN_RETRY_FIRST
                log.warning("watch_connection_lost", reason=describe(error), retry_in=delay)
            wake()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    async def _poll(self, wake: Wake) -> None:
        """Where LISTEN cannot work (a pooler in transaction mode hands each transaction to
        any server connection, and notifications to whoever holds one then): read the
        revision every POLL_WITHOUT_LISTEN seconds, through the pool."""
        wake()
        while True:
            try:
                revision = int((await self._fetch(READ_REVISION))[0][0])
            except StoreError:
                wake()  # changes may come meanwhile; the feed finds the store down itself
            else:
                self._revisions.seen(revision)
            await asyncio.sleep(POLL_WITHOUT_LISTEN)

    async def _listen_once(self, wake: Wake, listening: _Listening) -> None:
        """LISTEN and poll until the connection fails (raising what it raised); ``listening``
        is told once LISTEN has taken effect."""
        assert self._listen_url is not None
        conn = await connect_any_host(
            self._listen_url,
            timeout=self._timeout,
            server_settings={"application_name": LISTENER_NAME},
            **self._connect_options,
        )
        try:
            schema = await conn.fetchval("SELECT current_schema()", timeout=self._timeout)

            def notified(*args: Any) -> None:
                notified_schema, _, revision = str(args[-1]).rpartition(" ")
                # A write to this store, not another's (nor anyone else's notification).
                if notified_schema == schema and revision.isdigit():
                    self._revisions.moved(int(revision))

            await conn.add_listener(CHANNEL, notified)
            listening.worked = True
            wake()  # whatever committed before LISTEN took effect
            while True:
                revision = int(await conn.fetchval(READ_REVISION, timeout=self._timeout))
                self._revisions.seen(revision)
                await asyncio.sleep(WATCH_POLL_INTERVAL)
        finally:
            await conn.close(timeout=self._timeout)

    # --- bulk loads (the seed, imports) and exports ---------------------------------------

    async def load(self, source: BulkSource, replace: Optional[str] = None) -> Optional[Loaded]:
        """Stream the rows into a temporary table (COPY, never all of them in memory), then
        apply them in one statement, last row for a key winning; all in one transaction on a
        connection of its own. The revision's lock, which every write waits for, is taken
        only once the rows are in; a seed first takes a lock that servers starting together
        wait on."""
        conn = await self._connect_alone()
        try:
            await check_primary(conn)  # as the pool checks its own
            async with conn.transaction():
                if source.fingerprint is not None:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", SEED_LOCK)
                    if await conn.fetchval(READ_META, SEED_FINGERPRINT) == source.fingerprint:
                        return None
                # Enough memory to sort a large load for DISTINCT ON without spilling to disk.
                await conn.execute("SET LOCAL work_mem = '256MB'")
                await conn.execute(
                    f"CREATE TEMP TABLE {BULK_TABLE} (ordinal bigint,"
                    ' key text COLLATE "C", val text, expires_at bigint) ON COMMIT DROP'
                )
                status = await conn.copy_records_to_table(
                    BULK_TABLE,
                    records=_numbered(source.batches()),
                    columns=["ordinal", "key", "val", "expires_at"],
                )
                applied = int(status.split()[-1])
                first = int(await conn.fetchval(LOCK_REVISION))
                now_ms = await conn.fetchval(f"SELECT {NOW.format('$1::bigint')}", self._now())
                revision = life_start(first + 1, now_ms / 1000)
                inserted = int((await conn.execute(APPLY_BULK, revision)).split()[-1])
                removed = 0
                if replace is not None:
                    status = await conn.execute(
                        REMOVE_OTHERS, revision, replace, prefix_upper_bound(replace)
                    )
                    removed = int(status.split()[-1])
                if applied or removed:
                    await conn.execute(WRITE_META, "revision", str(revision))
                    await conn.execute(COUNT_KEYS.format(inserted - removed))
                    # A bulk load, not events: watchers from before it list again.
                    await conn.execute(WRITE_META, "compact_revision", str(revision))
                else:
                    revision = first
                if source.fingerprint is not None:
                    await conn.execute(WRITE_META, SEED_FINGERPRINT, source.fingerprint)
            if applied or removed:
                self._revisions.moved(revision)
                if self.on_commit is not None:
                    self.on_commit(1)
            return Loaded(applied, removed, revision)
        except _SourceFailed as failed:
            raise failed.error from None
        except FAILURES as error:
            raise translate(error) from None
        finally:
            await conn.close()

    async def _connect_alone(self) -> Any:
        """A connection of its own, outside the pool, for a load or an export: without the
        requests' timeout once connected, since those take their time."""
        try:
            return await connect_any_host(self._url, timeout=self._timeout, **self._connect_options)
        except FAILURES as error:
            raise translate(error) from None

    @contextlib.asynccontextmanager
    async def export(self, prefix: str) -> AsyncIterator[_PostgresSnapshot]:
        conn = await self._connect_alone()
        try:
            try:
                await check_primary(conn)  # as the pool checks its own
                transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                await transaction.start()
                revision = int(await conn.fetchval(READ_REVISION))  # the snapshot's first read
                now_ms = await conn.fetchval(f"SELECT {NOW.format('$1::bigint')}", self._now())
            except FAILURES as error:
                raise translate(error) from None
            yield _PostgresSnapshot(conn, revision, now_ms, prefix)
        finally:
            await conn.close()  # ends the transaction too

    async def seed_fingerprint(self) -> Optional[str]:
        rows = await self._fetch(READ_META, SEED_FINGERPRINT)
        return None if not rows else str(rows[0][0])

    # --- the rest -----------------------------------------------------------------------

    async def count(self) -> int:
        return int((await self._fetch(READ_META, "keys"))[0][0])

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a connection reaches a primary that can write."""
        rows = await self._fetch(WRITABLE)
        if not rows[0][0]:
            # Its connection found a standby (or a fenced primary): the next ones go through
            # the URL's hosts again.
            await self._pool.expire_connections()
            raise StoreUnavailable("PostgreSQL is read-only: no primary to write to")

    async def close(self) -> None:
        if self._draining is not None:
            await self._draining
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pool.close()


def _with_revision(page: str) -> str:
    """``page``'s rows in key order, each after the revision read in the same statement (its
    snapshot); one row of NULLs after it when the page is empty."""
    return f"""SELECT meta.value::bigint, page.* FROM kv_meta meta
                LEFT JOIN LATERAL ({page}) page ON true
               WHERE meta.name = 'revision' ORDER BY page.key"""


class _SourceFailed(Exception):
    """The rows of a load failed (a bad line, a client gone): not PostgreSQL's doing."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _numbered(
    batches: AsyncIterator[Sequence[LoadRow]],
) -> AsyncIterator[tuple[int, str, str, Optional[int]]]:
    ordinal = 0
    try:
        async for batch in batches:
            for key, val, expires_at in batch:
                yield ordinal, key, val, expires_at
                ordinal += 1
    except Exception as error:
        raise _SourceFailed(error) from error


class _PostgresSnapshot:
    """An export's REPEATABLE READ transaction, read a page at a time (EXPORT_PAGE)."""

    def __init__(self, conn: Any, revision: int, now_ms: int, prefix: str) -> None:
        self._conn = conn
        self.revision = revision
        self._now_ms = now_ms
        self._prefix = prefix

    async def batches(self) -> AsyncIterator[list[BulkRow]]:
        cut: BatchCut[BulkRow] = BatchCut()
        after, started = self._prefix, False
        bound = prefix_upper_bound(self._prefix)
        while True:
            try:
                rows = await self._conn.fetch(
                    EXPORT_PAGE, self._now_ms, after, bound, EXPORT_FETCH, started
                )
            except FAILURES as error:
                raise translate(error) from None
            if not rows:
                break
            after, started = rows[-1][0], True
            for key, val, expires_at in rows:
                if val is None:  # too long to come with its row
                    try:
                        val = await self._conn.fetchval(EXPORT_VALUE, key)
                    except FAILURES as error:
                        raise translate(error) from None
                if (full := cut.add(BulkRow(key, val, expires_at), len(val))) is not None:
                    yield full
        if (rest := cut.rest()) is not None:
            yield rest


async def _live_lease(conn: Any, lease: str, now_ms: int) -> int:
    """The live lease's expiry, its row held FOR SHARE until the commit; else LeaseNotFound."""
    expires_at = await conn.fetchval(LOCK_LEASE, lease, now_ms)
    if expires_at is None:
        raise LeaseNotFound(lease)
    return int(expires_at)


async def _judge(conn: Any, leases: list[str], may_write: MayWrite) -> None:
    """KeysRefused unless ``may_write`` allows every key of ``leases``, as they are now."""
    keys = [row[0] for row in await conn.fetch(KEYS_OF_LEASES, leases)]
    if not may_write(keys):
        raise KeysRefused(keys)


async def _remove_lease(conn: Any, lease: str, revision: int, kind: str) -> int:
    """Drop the lease and its keys in ``revision`` (taken when it had any); how many keys."""
    removed = int(await conn.fetchval(REMOVE_LEASE_KEYS, lease, revision, kind))
    if removed:
        await conn.execute(TAKE_REVISION)
    return removed


def _condition_name(condition: Optional[Condition]) -> Optional[str]:
    return None if condition is None else _CONDITION_NAMES[type(condition)]


def _condition_version(condition: Optional[Condition]) -> Optional[int]:
    return condition.version if isinstance(condition, IfVersion) else None
