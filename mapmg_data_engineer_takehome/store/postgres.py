"""The PostgreSQL store: any number of servers (stateless replicas) share one database.

The same contract as the sqlite store, kept by the database:
- One revision for the whole database, in ``kv_meta``, read and advanced under a row lock by
  every write transaction: versions order writes across keys and replicas, and a condition
  is checked in the same transaction as the write it guards.
- Expiry uses one clock, the database's (``clock_timestamp()``), so that replicas whose
  clocks disagree agree on what has expired.
- Every write is committed (``synchronous_commit`` is left as the database has it, on by
  default) before it is answered.

Round trips are the cost of a networked store, so requests are grouped as the sqlite store
groups its commits: the writes that arrive while a group is in flight go together into one
call of the ``kv_write`` function (one round trip, one transaction), and the GETs of one
event-loop turn into one ``WHERE key = ANY($1)`` query.

Every call waits at most ``timeout`` seconds for a connection and as long for its answer;
then, or when PostgreSQL is gone, the request is answered 503 (StoreUnavailable) and the
pool reconnects by itself once the database answers again.

The history is the table ``kv_changes``, written by each write in its own transaction. A
trigger on the revision's row NOTIFYs every server listening (see listen), as a hint: the
table is the truth, and a server that misses a notification finds the change within a second.

Behind a connection pooler in transaction mode (PgBouncer's ``pool_mode = transaction``, most
hosted poolers), each transaction may run on another server connection, so nothing may rely on
a session: with ``pooler="transaction"`` no prepared statement outlives its query
(asyncpg's ``statement_cache_size=0``), an export pages with queries rather than a cursor (as
it does everywhere), every lock, setting and temporary table is the transaction's own, and the
listener does not LISTEN through the pooler: it listens on ``listen_url`` (straight to the
database), or polls the revision every POLL_WITHOUT_LISTEN seconds. Since each query then
costs two round trips, GETs go in fewer, bigger groups (READS_IN_FLIGHT_BEHIND_POOLER).

Every connection is checked before its first use: it must reach a primary, and a server that
began a new life since the store last looked (a standby promoted, a point-in-time restore, a
restart, a restored copy of its files) first moves the revision to where the store's new life
begins, so that writes a lossy failover or a restore dropped never have their revision numbers
reused (see _CREATE_TIMELINES).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, Callable, Optional, TypeVar

import asyncpg
import structlog

from ..settings import PostgresPooler
from .base import (
    EXPORT_BATCH_CHARS,
    EXPORT_BATCH_ROWS,
    PAGE_VALUE_CHARS,
    BulkRow,
    BulkSource,
    Change,
    Changes,
    Clock,
    Condition,
    Entry,
    Gap,
    HistoryStats,
    IfAbsent,
    IfExists,
    IfVersion,
    ListedKey,
    Loaded,
    LoadRow,
    Page,
    PreconditionFailed,
    SetItem,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    Wake,
    check_since,
    life_start,
    prefix_upper_bound,
    trim_cut,
)

log = structlog.get_logger("kv.store")
Result = TypeVar("Result")

SCHEMA_VERSION = 4
# pg_advisory_xact_lock keys ("KVSC", "KVSE"): one server at a time creates or upgrades the
# schema, and one applies a seed while the others wait for it.
_SCHEMA_LOCK = 0x4B565343
_SEED_LOCK = 0x4B565345
# ("KVTH"): one server at a time trims the history; the others skip their turn.
_TRIM_LOCK = 0x4B565448
# The channel every write's commit notifies, with "<schema> <revision>" as the payload: servers
# of other stores in the same database ignore it.
CHANNEL = "kv_changes"
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
# The settings that say how PostgreSQL is reached (see the module docstring).
POOLER_SETTING = "KV_POSTGRES_POOLER"
# The listening connection's application_name, which pg_stat_activity shows.
LISTENER_NAME = "kv-listen"
# After the listening connection failed, the pause before the next try: the first, doubled on
# each failure up to the last, and the first again once a connection has listened (so that a
# few dropped connections in a process's life do not leave the others' commits waiting 5 s).
LISTEN_RETRY_FIRST = 0.25
LISTEN_RETRY_MAX = 5.0
# Milliseconds since the epoch by the database's clock, unless the caller passes its own
# (the tests' clock): every statement below takes it as a parameter that may be NULL.
_NOW = "coalesce({}::bigint, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)"

_WRITE_FUNCTION = """
CREATE OR REPLACE FUNCTION kv_write(
    p_kinds text[], p_keys text[], p_vals text[], p_ttls bigint[],
    p_conditions text[], p_versions bigint[], p_now bigint)
RETURNS TABLE (outcome text, new_version bigint, new_expires_at bigint)
LANGUAGE plpgsql AS $$
-- A group of single-key writes, in order, in the caller's transaction: each 'set' or
-- 'delete' whose condition holds takes the next revision and records its change.
DECLARE
    now_ms bigint := coalesce(p_now, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    current_revision bigint;
    first_revision bigint;
    live bigint;
    expiry bigint;
    inserted boolean;
    added bigint := 0;  -- keys inserted less keys deleted, for the count in kv_meta
BEGIN
    SELECT m.value::bigint INTO current_revision FROM kv_meta m
     WHERE m.name = 'revision' FOR UPDATE;
    first_revision := current_revision;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        live := NULL;
        IF p_conditions[i] IS NOT NULL OR p_kinds[i] = 'delete' THEN
            SELECT k.version INTO live FROM kv k
             WHERE k.key = p_keys[i] AND (k.expires_at IS NULL OR k.expires_at > now_ms);
        END IF;
        IF (p_conditions[i] = 'version' AND live IS DISTINCT FROM p_versions[i])
           OR (p_conditions[i] = 'exists' AND live IS NULL)
           OR (p_conditions[i] = 'absent' AND live IS NOT NULL) THEN
            outcome := 'failed'; new_version := live; new_expires_at := NULL;
        ELSIF p_kinds[i] = 'set' THEN
            current_revision := current_revision + 1;
            expiry := CASE WHEN p_ttls[i] IS NULL THEN NULL ELSE now_ms + p_ttls[i] END;
            -- xmax is 0 on a row this statement inserted, not on one it updated.
            INSERT INTO kv (key, val, version, expires_at)
                 VALUES (p_keys[i], p_vals[i], current_revision, expiry)
            ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,
                                            expires_at = excluded.expires_at
            RETURNING (kv.xmax = 0) INTO inserted;
            IF inserted THEN added := added + 1; END IF;
            INSERT INTO kv_changes (revision, key, type, val, expires_at)
                 VALUES (current_revision, p_keys[i], 'set', p_vals[i], expiry);
            outcome := 'written'; new_version := current_revision; new_expires_at := expiry;
        ELSIF live IS NULL THEN  -- an expired row stays, for the purge to report
            outcome := 'absent'; new_version := NULL; new_expires_at := NULL;
        ELSE
            DELETE FROM kv k WHERE k.key = p_keys[i];
            added := added - 1;
            current_revision := current_revision + 1;
            INSERT INTO kv_changes (revision, key, type)
                 VALUES (current_revision, p_keys[i], 'delete');
            outcome := 'deleted'; new_version := current_revision; new_expires_at := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF current_revision <> first_revision THEN
        UPDATE kv_meta m SET value = current_revision::text WHERE m.name = 'revision';
    END IF;
    IF added <> 0 THEN
        UPDATE kv_meta m SET value = (m.value::bigint + added)::text WHERE m.name = 'keys';
    END IF;
END
$$
"""
# Every commit that moves the revision tells the listening servers (see listen).
_NOTIFY = (
    f"""CREATE OR REPLACE FUNCTION kv_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', current_schema() || ' ' || NEW.value);
    RETURN NULL;
END
$$""",
    "DROP TRIGGER IF EXISTS kv_revision_moved ON kv_meta",
    "CREATE TRIGGER kv_revision_moved AFTER UPDATE ON kv_meta FOR EACH ROW"
    " WHEN (NEW.name = 'revision') EXECUTE FUNCTION kv_notify()",
)
# How far the revision jumps at least when the store finds itself on a new timeline: past any
# revision the old timeline can have reached without this one, were the clocks wrong.
TIMELINE_GAP = 1_000_000_000
# Each new life of the store (base.py's life_start): a new PostgreSQL timeline (a standby
# promoted, or a point-in-time restore) or a server started anew (a restart, or a copy of its
# files put back), from the revision it had there (forked_at) to the one it went on from
# (resumed_at). With asynchronous replication the old timeline may have gone on past forked_at
# with writes that this one never got, and a restored copy lacks those made after it; watchers
# may have seen them: the revisions in between are never given to a write here, and a watcher
# holding one is told that it is not this store's (410 unknown_revision) rather than given
# other writes under it.
_CREATE_TIMELINES = (
    "CREATE TABLE IF NOT EXISTS kv_timelines (resumed_at bigint PRIMARY KEY,"
    " forked_at bigint NOT NULL, timeline text NOT NULL)"
)
# Whether the server can take writes (not a standby in recovery, not made read-only, as a
# failover manager fences an old primary); if so, the store is entered into its timeline
# first, under the revision's lock, before anything is written on it.
_CHECK_PRIMARY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION kv_check_primary() RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    here text;
    -- When the server started, as a number: text of a time would follow the session's zone.
    started text := extract(epoch FROM pg_postmaster_start_time())::text;
    recorded text;
    forked bigint;
    resumed bigint;
BEGIN
    IF pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' THEN
        RETURN false;
    END IF;
    BEGIN
        -- A WAL file's name begins with its timeline: here, that of the WAL written now.
        here := substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);
    EXCEPTION WHEN feature_not_supported OR insufficient_privilege THEN
        here := '';  -- a service that keeps its WAL functions from us: no timeline to follow
    END;
    IF (SELECT count(*) FROM kv_meta WHERE (name, value) IN
            (('timeline', here), ('server_started', started))) = 2 THEN
        RETURN true;
    END IF;
    SELECT value::bigint INTO forked FROM kv_meta WHERE name = 'revision' FOR UPDATE;
    IF (SELECT count(*) FROM kv_meta WHERE (name, value) IN
            (('timeline', here), ('server_started', started))) = 2 THEN
        RETURN true;  -- entered meanwhile, by another connection
    END IF;
    SELECT value INTO recorded FROM kv_meta WHERE name = 'timeline';
    resumed := greatest(forked, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    IF recorded IS DISTINCT FROM here AND recorded IS NOT NULL THEN
        resumed := greatest(resumed, forked + {TIMELINE_GAP});
    END IF;
    IF resumed > forked THEN
        INSERT INTO kv_timelines (resumed_at, forked_at, timeline) VALUES (resumed, forked, here);
        UPDATE kv_meta SET value = resumed::text WHERE name = 'revision';
    END IF;
    INSERT INTO kv_meta (name, value) VALUES ('timeline', here), ('server_started', started)
        ON CONFLICT (name) DO UPDATE SET value = excluded.value;
    RETURN true;
END
$$
"""
# One row per key and revision; the primary key's index is the feed's order.
_CREATE_CHANGES = (
    "CREATE TABLE IF NOT EXISTS kv_changes (revision bigint NOT NULL,"
    ' key text COLLATE "C" NOT NULL, type text NOT NULL, val text, expires_at bigint,'
    " PRIMARY KEY (revision, key))"
)
# The trimming's marks: at this time (ms), the store was at this revision (see base.py).
_CREATE_MARKS = (
    "CREATE TABLE IF NOT EXISTS kv_history_marks (at bigint PRIMARY KEY, revision bigint NOT NULL)"
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv_meta (name text PRIMARY KEY, value text NOT NULL)",
    # COLLATE "C": keys compare by their UTF-8 bytes, the order listings promise (and the
    # sqlite store's), whatever the database's own collation is.
    "CREATE TABLE IF NOT EXISTS kv (key text COLLATE \"C\" PRIMARY KEY CHECK (key <> ''),"
    " val text NOT NULL, version bigint NOT NULL, expires_at bigint)",
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL",
    _CREATE_CHANGES,
    _CREATE_MARKS,
    _CREATE_TIMELINES,
    _WRITE_FUNCTION,
    _CHECK_PRIMARY_FUNCTION,
    *_NOTIFY,
    "INSERT INTO kv_meta (name, value) VALUES ('revision', '0'), ('keys', '0'),"
    " ('compact_revision', '0'), ('history_rows', '0'), ('history_counted', '0')"
    " ON CONFLICT (name) DO NOTHING",
)
# From each schema version to the next, in place. Schema 1 had no history: it starts empty,
# whole above the revision the database was at. Schema 2 had no timelines: the server's is
# recorded, as on a new store, by the first check of a connection. Schema 3 did not notice a
# server started anew: its first check here begins a life.
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        _CREATE_CHANGES,
        _CREATE_MARKS,
        _WRITE_FUNCTION,
        *_NOTIFY,
        "INSERT INTO kv_meta (name, value) SELECT unnest(ARRAY['compact_revision',"
        " 'history_counted']), value FROM kv_meta WHERE name = 'revision'"
        " ON CONFLICT (name) DO NOTHING",
        "INSERT INTO kv_meta (name, value) VALUES ('history_rows', '0')"
        " ON CONFLICT (name) DO NOTHING",
    ),
    2: (_CREATE_TIMELINES, _CHECK_PRIMARY_FUNCTION),
    3: (_CHECK_PRIMARY_FUNCTION,),
}

_LIVE = f"(expires_at IS NULL OR expires_at > {_NOW.format('$2')})"
_GET_MANY = f"SELECT key, val, version, expires_at FROM kv WHERE key = ANY($1::text[]) AND {_LIVE}"
_WRITE = "SELECT outcome, new_version, new_expires_at FROM kv_write($1, $2, $3, $4, $5, $6, $7)"
_TAKE_REVISION = (
    "UPDATE kv_meta SET value = (value::bigint + 1)::text WHERE name = 'revision'"
    " RETURNING value::bigint"
)
# Each statement that adds or removes rows moves the key count in kv_meta by as many.
_COUNT_KEYS = "UPDATE kv_meta SET value = (value::bigint + ({}))::text WHERE name = 'keys'"
_SET_MANY = f"""
WITH clock AS (SELECT {_NOW.format("$5")} AS now_ms),
items AS (
    SELECT k, v, CASE WHEN t IS NULL THEN NULL ELSE clock.now_ms + t END AS e
      FROM unnest($1::text[], $2::text[], $3::bigint[]) AS item(k, v, t), clock),
written AS (
    INSERT INTO kv (key, val, version, expires_at) SELECT k, v, $4, e FROM items
    ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,
                                    expires_at = excluded.expires_at
    RETURNING (kv.xmax = 0) AS inserted),
recorded AS (
    INSERT INTO kv_changes (revision, key, type, val, expires_at)
    SELECT $4, k, 'set', v, e FROM items)
{_COUNT_KEYS.format("SELECT count(*) FILTER (WHERE inserted) FROM written")}
"""


def _remove(where: str, kind: str) -> str:
    """A statement deleting the rows ``where`` selects ($2 is the time, for expiry), recording
    each as a change of ``kind`` in revision $3, and answering how many went."""
    return f"""
WITH gone AS (DELETE FROM kv WHERE {where} RETURNING key),
recorded AS (INSERT INTO kv_changes (revision, key, type) SELECT $3, key, '{kind}' FROM gone),
counted AS ({_COUNT_KEYS.format("-(SELECT count(*) FROM gone)")})
SELECT count(*) FROM gone
"""


# Expired rows stay, for the purge to report.
_DELETE_MANY = _remove(f"key = ANY($1::text[]) AND {_LIVE}", "delete")
_PURGE = _remove(
    f"""key IN (SELECT key FROM kv WHERE expires_at <= {_NOW.format("$2")}
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)""",
    "expire",
)
_ANY_EXPIRED = f"SELECT EXISTS (SELECT 1 FROM kv WHERE expires_at <= {_NOW.format('$1')})"
_READ_REVISION = "SELECT value::bigint FROM kv_meta WHERE name = 'revision'"
# The changes above $1 under the prefix [$2, $3), as take_changes cuts them ($4 of them, fewer
# once their values pass $5 characters, then the rest of the last one's revision), whether any
# follow, the revision and compact revision they were read at, and the gaps that new lives
# skipped above $1 (see _CREATE_TIMELINES): one statement, so one snapshot, in which they are
# every change up to that revision.
_UNDER_PREFIX = "c.key >= $2 AND ($3::text IS NULL OR c.key < $3)"
_CHANGES = f"""
WITH meta AS (
    SELECT max(value::bigint) FILTER (WHERE name = 'revision') AS revision,
           max(value::bigint) FILTER (WHERE name = 'compact_revision') AS compact_revision
      FROM kv_meta),
first AS (
    SELECT c.revision, c.key, c.type, c.val, c.expires_at FROM kv_changes c
     WHERE c.revision > $1 AND {_UNDER_PREFIX} ORDER BY c.revision, c.key LIMIT $4),
head AS (
    SELECT revision, key, type, val, expires_at FROM (
        SELECT *, sum(coalesce(length(val), 0)) OVER (ORDER BY revision
                  RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_chars
          FROM first) sized
     WHERE coalesce(earlier_chars, 0) <= $5),
cut AS (SELECT revision, key FROM head ORDER BY revision DESC, key DESC LIMIT 1),
tail AS (
    SELECT c.revision, c.key, c.type, c.val, c.expires_at FROM kv_changes c, cut
     WHERE c.revision = cut.revision AND c.key > cut.key AND {_UNDER_PREFIX}),
more AS (
    SELECT EXISTS (SELECT 1 FROM kv_changes c, cut
                    WHERE c.revision > cut.revision AND {_UNDER_PREFIX}) AS more),
gaps AS (
    SELECT array_agg(t.forked_at ORDER BY t.resumed_at) AS forked,
           array_agg(t.resumed_at ORDER BY t.resumed_at) AS resumed
      FROM kv_timelines t WHERE t.resumed_at > $1)
SELECT meta.revision, meta.compact_revision, more.more, gaps.forked, gaps.resumed,
       events.revision, events.type, events.key, events.val, events.expires_at
  FROM meta CROSS JOIN more CROSS JOIN gaps
  LEFT JOIN (SELECT * FROM head UNION ALL SELECT * FROM tail) events ON true
 ORDER BY events.revision, events.key
"""
_LOCK_REVISION = "SELECT value FROM kv_meta WHERE name = 'revision' FOR UPDATE"
_READ_META = "SELECT value FROM kv_meta WHERE name = $1"
_WRITE_META = (
    "INSERT INTO kv_meta (name, value) VALUES ($1, $2)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_SEED_FINGERPRINT = "seed_fingerprint"
_BULK_TABLE = "kv_bulk"
# The last row for each key: keys already stored are updated, the others inserted. Not one
# INSERT ... ON CONFLICT, whose speculative insertion costs more for a large load (see
# bench/results.md); no other write can come between, since the load holds the revision's
# lock (taken just before it).
_APPLY_BULK = f"""
WITH latest AS (
    SELECT DISTINCT ON (key) key, val, expires_at FROM {_BULK_TABLE} ORDER BY key, ordinal DESC),
updated AS (
    UPDATE kv SET val = latest.val, version = $1, expires_at = latest.expires_at
      FROM latest WHERE kv.key = latest.key RETURNING kv.key)
INSERT INTO kv (key, val, version, expires_at)
SELECT key, val, $1, expires_at FROM latest WHERE key NOT IN (SELECT key FROM updated)
"""
# A replace: every key the load wrote has its revision ($1); the others under the prefix go.
_REMOVE_OTHERS = (
    "DELETE FROM kv WHERE version <> $1 AND key >= $2 AND ($3::text IS NULL OR key < $3)"
)
# An export's rows: values up to this many characters come with their row; longer ones are
# read one at a time in the same snapshot, so that a page of _EXPORT_FETCH rows holds at most
# about 16 MiB whatever the values are. A page is the live keys after the last one read ($2,
# with $5 false for the first page, which starts at the prefix itself), in the export's
# REPEATABLE READ snapshot: pages rather than a cursor, whose named statement a pooler in
# transaction mode could leave on a server connection that another client then uses.
_EXPORT_INLINE_CHARS = 16_384
_EXPORT_PAGE = f"""
SELECT key, CASE WHEN length(val) <= {_EXPORT_INLINE_CHARS} THEN val END, expires_at FROM kv
 WHERE (expires_at IS NULL OR expires_at > $1) AND (key > $2 OR (NOT $5 AND key = $2))
   AND ($3::text IS NULL OR key < $3)
 ORDER BY key LIMIT $4
"""
_EXPORT_VALUE = "SELECT val FROM kv WHERE key = $1"
# Rows per page of an export: several batches' worth.
_EXPORT_FETCH = 1024
_CONDITION_NAMES = {IfExists: "exists", IfAbsent: "absent", IfVersion: "version"}
# SQLSTATE classes that mean "not now" rather than "a bug": connection exceptions,
# insufficient resources, operator intervention (a shutdown, a restart), system errors.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# A write on a server in recovery (a standby) or in a read-only session: not the primary,
# which a failover may have moved; the next connection goes through the URL's hosts again.
_READ_ONLY_TRANSACTION = "25006"
# A prepared statement that is not on this server connection (invalid_sql_statement_name), or
# one of another client's already is (duplicate_prepared_statement): the session changed
# under the connection, as a pooler in transaction mode does.
_LOST_STATEMENT = ("26000", "42P05")
# Whether a connection can write: a standby is in recovery; a primary may also be made
# read-only (default_transaction_read_only), as a failover manager does to fence it.
_WRITABLE = "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"
_CHECK_PRIMARY = "SELECT kv_check_primary()"


def redacted_url(url: str) -> str:
    """``url`` with its password replaced, for messages: postgresql://kv:***@db:5432/kv.

    Cut at the last "@" rather than parsed: a password that was not percent-encoded (a "/"
    or "@" in it) must not slip through a parser's idea of where the host begins.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{location}"


def describe(error: BaseException) -> str:
    """What went wrong, in words that never hold the URL's password (asyncpg's messages
    name the host and port, and the server's quote the SQL, which holds no data)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    return f"{name}: {detail}" if detail else name


def _translate(error: BaseException) -> StoreError:
    if isinstance(error, asyncpg.PostgresError):
        state = getattr(error, "sqlstate", "") or ""
        if state == _READ_ONLY_TRANSACTION:
            return StoreUnavailable(f"PostgreSQL is read-only (a standby?): {describe(error)}")
        if state in _LOST_STATEMENT:
            # The hint first, in words without a quote: a log line keeps a message only up to
            # its first quote (errors.safe_message), and asyncpg's quotes the statement's name.
            return StoreUnavailable(
                f"PostgreSQL: {type(error).__name__} (SQLSTATE {state}): a connection pooler in "
                f"transaction mode (PgBouncer with pool_mode = transaction) in between? Set "
                f"{POOLER_SETTING}=transaction. {describe(error)}"
            )
        if state[:2] not in _UNAVAILABLE_CLASSES:
            return StoreError(f"PostgreSQL: {describe(error)}")
    if isinstance(error, _ReadOnly):
        return StoreUnavailable(f"PostgreSQL: {error}")
    return StoreUnavailable(f"PostgreSQL: {describe(error)}")


def _answerable(error: Exception) -> StoreError:
    """What the requests waiting on a grouped call that failed are told: its StoreError, or
    for anything else (a bug, or a failure of asyncpg's that _use does not know) a 503 at once,
    rather than the timeout; the unknown is logged with its traceback."""
    if isinstance(error, StoreError):
        return error
    log.error("store_call_failed", exc_info=error)
    return StoreUnavailable(f"PostgreSQL: {describe(error)}")


def _log_crash(task: asyncio.Future[Any]) -> None:
    """A background task of the store ended by an exception: a bug (its failures are the
    requests' to answer), logged with its traceback rather than left for asyncio to find."""
    if not task.cancelled() and task.exception() is not None:
        log.error("store_task_failed", exc_info=task.exception())


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen: for futures whose waiter has already
    answered (a 503 after the timeout), so that asyncio does not report it as lost."""
    if not future.cancelled():
        future.exception()


class _ReadOnly(Exception):
    """The server reached cannot write: a standby, or a primary made read-only."""

    def __init__(self) -> None:
        super().__init__("the server is read-only (in recovery: a standby?)")


# What a failed call to PostgreSQL can raise besides its own errors: no host of the URL is
# what its target_session_attrs asks for; the connection's protocol is in a state it cannot
# use (asyncpg's InternalClientError, as when the server ended the session while it was
# idle); the server is not a primary.
_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.InternalClientError,
    _ReadOnly,
)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, whose close ends it whatever the server does. The pool closes
    the connections expire_connections() outdated in tasks of its own that nobody awaits;
    on a server that hangs that close times out, asyncpg aborts the connection, and the
    error it raises would be one nobody retrieves."""

    async def close(self, *, timeout: Optional[float] = None) -> None:
        try:
            await super().close(timeout=timeout)
        except _FAILURES:
            self.terminate()  # already aborted by asyncpg; this only makes sure


class _PrimaryCheck:
    """The pool's check of each connection it makes (its ``init``), before any use: the
    server must be a primary, and once the schema is there, kv_check_primary also enters the
    store into the server's timeline. Every connection to a newly promoted standby is a new
    one, so nothing is written there before the revision has jumped past the old timeline's
    (see _CREATE_TIMELINES)."""

    def __init__(self) -> None:
        self.schema_ready = False

    async def __call__(self, conn: Any) -> None:
        await _check_primary(conn, _CHECK_PRIMARY if self.schema_ready else _WRITABLE)


async def _check_primary(conn: Any, query: str = _CHECK_PRIMARY) -> None:
    if not await conn.fetchval(query):
        raise _ReadOnly


def _host_urls(url: str) -> list[str]:
    """One URL per host of a multi-host URL (postgresql://u:p@a:5432,b:5432/kv?...), in its
    order; the URL alone when it names one host (or gives its hosts another way)."""
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")  # the password may hold an unencoded "@"; hosts never do
    credentials, hosts_and_path = rest[: at + 1], rest[at + 1 :]
    end = len(hosts_and_path)
    for delimiter in "/?":
        found = hosts_and_path.find(delimiter)
        if found != -1:
            end = min(end, found)
    hosts, path = hosts_and_path[:end].split(","), hosts_and_path[end:]
    if not separator or len(hosts) < 2:
        return [url]
    return [f"{scheme}://{credentials}{host}{path}" for host in hosts]


async def _connect_any_host(url: str, **options: Any) -> asyncpg.Connection:
    """The pool's connect: every host of the URL at once, each within the connect timeout,
    the first usable one taken (one that its target_session_attrs accepts). asyncpg's own
    tries them one after the other within one timeout for all, so an old primary that a
    partition made hang, listed first, would take every attempt's whole time, and the new
    primary after it would never be reached."""
    urls = _host_urls(url)
    if len(urls) == 1:
        return await asyncpg.connect(url, **options)
    attempts = [asyncio.ensure_future(asyncpg.connect(host, **options)) for host in urls]
    chosen: Optional[asyncio.Future[Any]] = None
    try:
        pending = set(attempts)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in attempts:  # in the URL's order, among those done together
                if attempt in done and not attempt.cancelled() and attempt.exception() is None:
                    chosen = attempt
                    return attempt.result()
        # None could be used: the first host's failure, as asyncpg would report it.
        raise next(error for error in map(_failure_of, attempts) if error is not None)
    finally:
        for attempt in attempts:
            if attempt is not chosen:
                attempt.cancel()
                attempt.add_done_callback(_close_unused)


def _connect_options(pooler: PostgresPooler) -> dict[str, Any]:
    """asyncpg's options for every connection: behind a pooler in transaction mode, no
    statement is kept prepared past its own query."""
    return {"statement_cache_size": 0} if pooler == "transaction" else {}


def _failure_of(attempt: asyncio.Future[Any]) -> Optional[BaseException]:
    return asyncio.CancelledError() if attempt.cancelled() else attempt.exception()


def _close_unused(attempt: asyncio.Future[Any]) -> None:
    """A connection that lost the race (or that nobody waited for): closed at once."""
    if attempt.cancelled():
        return
    if attempt.exception() is None:
        attempt.result().terminate()


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
        future: asyncio.Future[Any],
    ) -> None:
        self.kind, self.key, self.val, self.ttl_ms = kind, key, val, ttl_ms
        self.condition, self.future = condition, future


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
        self._connect_options = _connect_options(pooler)
        # Where to LISTEN: never through a pooler in transaction mode (None: poll instead).
        self._listen_url = listen_url or (None if pooler == "transaction" else url)
        self._reads: dict[str, list[asyncio.Future[Optional[Entry]]]] = {}
        self._reads_scheduled = False
        self._reads_in_flight = 0
        self._max_reads_in_flight = (
            READS_IN_FLIGHT_BEHIND_POOLER if pooler == "transaction" else None
        )
        self._writes: list[_Write] = []
        self._draining: Optional[asyncio.Task[None]] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_commit: Optional[Callable[[int], None]] = None
        self._wake: Optional[Wake] = None
        # The newest revision this process has woken its listener for.
        self._known_revision = 0

    def _moved(self, revision: int) -> None:
        """The store is at ``revision``: wake the listener if that is news."""
        if revision > self._known_revision:
            self._known_revision = revision
            if self._wake is not None:
                self._wake()

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
        ``listen_url``: see the module docstring.

        ``clock`` replaces the database's for expiry: for tests only, since replicas would
        then disagree on what has expired.
        """
        deadline = time.monotonic() + startup_wait
        delay, attempt = 0.25, 0
        check = _PrimaryCheck()
        while True:
            attempt += 1
            try:
                pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=pool_size,
                    connect=_connect_any_host,
                    init=check,
                    connection_class=_Connection,
                    timeout=timeout,  # to connect
                    command_timeout=timeout,
                    **_connect_options(pooler),
                )
                break
            except (*_FAILURES, ValueError) as error:
                if isinstance(error, ValueError):  # a malformed URL: no retry will mend it
                    raise StoreUnavailable(f"{redacted_url(url)}: {describe(error)}") from None
                if getattr(error, "sqlstate", None) in _LOST_STATEMENT:  # nor will it mend this
                    raise _translate(error) from None
                if time.monotonic() + delay > deadline:
                    if isinstance(error, _ReadOnly):
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
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    exists = await conn.fetchval("SELECT to_regclass('kv_meta') IS NOT NULL")
                    version = (
                        int(await conn.fetchval(_READ_META, "schema_version") or 0) if exists else 0
                    )
                    if version > SCHEMA_VERSION:
                        raise StoreCorrupt(
                            f"{redacted_url(self._url)}: written by a newer version "
                            f"(schema {version})"
                        )
                    if version == 0:
                        for statement in _SCHEMA:
                            await conn.execute(statement)
                    for step in range(max(version, 1), SCHEMA_VERSION):
                        for statement in _UPGRADES[step]:
                            await conn.execute(statement)
                    if version != SCHEMA_VERSION:
                        await conn.execute(_WRITE_META, "schema_version", str(SCHEMA_VERSION))
                        log.info("store_schema", schema_from=version, schema_to=SCHEMA_VERSION)
                    # This connection was made before the schema was there to check with.
                    await _check_primary(conn)
            except _FAILURES as error:
                raise _translate(error) from None

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
        except _FAILURES as error:
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
        except _FAILURES as error:
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
            _retrieve(run)
            self._spawn(self._give_back(conn))

        run.add_done_callback(ended)

    async def _failed(self, error: BaseException) -> StoreError:
        failure = _translate(error)
        if isinstance(failure, StoreUnavailable):
            # The database went away, or the primary moved: drop every idle connection now,
            # rather than failing one request on each of them.
            await self._pool.expire_connections()
        return failure

    # --- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Optional[Entry]:
        """Joins the GETs of this event-loop turn in one query."""
        future: asyncio.Future[Optional[Entry]] = asyncio.get_running_loop().create_future()
        waiting = self._reads.get(key)
        if waiting is None:
            self._reads[key] = [future]
        else:
            waiting.append(future)
        self._schedule_reads()
        return await self._within(future)

    def _schedule_reads(self) -> None:
        """Start a group at the end of this turn, unless one is to start already or as many
        are in flight as may be (then the first of them to end starts it)."""
        if self._reads_scheduled or (
            self._max_reads_in_flight is not None
            and self._reads_in_flight >= self._max_reads_in_flight
        ):
            return
        self._reads_scheduled = True
        asyncio.get_running_loop().call_soon(self._start_reads)

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
                future.add_done_callback(_retrieve)

    def _start_reads(self) -> None:
        reads, self._reads = self._reads, {}
        self._reads_scheduled = False
        self._reads_in_flight += 1
        self._spawn(self._read(reads))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)

    async def _read(self, reads: Mapping[str, list[asyncio.Future[Optional[Entry]]]]) -> None:
        try:
            rows = await self._fetch(_GET_MANY, list(reads), self._now())
        except Exception as error:  # every waiting request gets an answer
            failure = _answerable(error)
            for futures in reads.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(failure)
            return
        finally:
            self._reads_in_flight -= 1
            if self._reads:  # GETs that waited for a group to end
                self._schedule_reads()
        found = {row[0]: Entry(row[1], row[2], row[3]) for row in rows}
        for key, futures in reads.items():
            entry = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(entry)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        rows = await self._fetch(_GET_MANY, list(dict.fromkeys(keys)), self._now())
        return {row[0]: row[1] for row in rows}

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        """One range scan of the primary key's index: O(log n) to the start, then the page."""
        parameters: list[Any] = [limit + 1, self._now()]
        conditions = [_LIVE]
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
    ) -> Entry:
        ttl_ms = None if ttl is None else round(ttl * 1000)
        outcome, version, expires_at = await self._submit("set", key, val, ttl_ms, condition)
        if outcome == "failed":
            raise PreconditionFailed(version)
        return Entry(val, version, expires_at)

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        outcome, version, _ = await self._submit("delete", key, None, None, condition)
        if outcome == "failed":
            raise PreconditionFailed(version)
        return outcome == "deleted"

    async def _submit(
        self,
        kind: str,
        key: str,
        val: Optional[str],
        ttl_ms: Optional[int],
        condition: Optional[Condition],
    ) -> tuple[str, Any, Any]:
        future: asyncio.Future[tuple[str, Any, Any]] = asyncio.get_running_loop().create_future()
        self._writes.append(_Write(kind, key, val, ttl_ms, condition, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
            self._draining.add_done_callback(_log_crash)
        # A 503 for a write that then commits is a "maybe"; a 200 is only ever a commit.
        return await self._within(future)

    async def _drain(self) -> None:
        """Send the waiting writes as one group; those arriving meanwhile go in the next."""
        try:
            while self._writes:
                group, self._writes = self._writes, []
                try:
                    rows = await self._fetch(
                        _WRITE,
                        [write.kind for write in group],
                        [write.key for write in group],
                        [write.val for write in group],
                        [write.ttl_ms for write in group],
                        [_condition_name(write.condition) for write in group],
                        [_condition_version(write.condition) for write in group],
                        self._now(),
                    )
                except Exception as error:  # every waiting write gets an answer
                    failure = _answerable(error)
                    for write in group:
                        if not write.future.done():
                            write.future.set_exception(failure)
                    continue
                if self.on_commit is not None:
                    self.on_commit(len(group))
                moved = [row[1] for row in rows if row[0] in ("written", "deleted")]
                if moved:
                    self._moved(max(moved))
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
            revision = int(await conn.fetchval(_TAKE_REVISION))
            await conn.execute(
                _SET_MANY,
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
        self._moved(revision)
        return revision

    async def _remove(self, statement: str, first: Any) -> int:
        """Run a _remove statement in a new revision, taken only if it removed anything.
        The revision's lock is taken first, as every write takes it."""

        revision = 0

        async def remove(conn: Any) -> int:
            nonlocal revision
            revision = int(await conn.fetchval(_LOCK_REVISION)) + 1
            removed = int(await conn.fetchval(statement, first, self._now(), revision))
            if removed:
                await conn.execute(_TAKE_REVISION)
            return removed

        removed = await self._in_transaction(remove)
        if removed:
            self._moved(revision)
        return removed

    async def delete_many(self, keys: Sequence[str]) -> int:
        deleted = await self._remove(_DELETE_MANY, list(dict.fromkeys(keys)))
        if deleted and self.on_commit is not None:
            self.on_commit(1)
        return deleted

    async def purge_expired(self, limit: int) -> int:
        # Most sweeps find nothing: they ask without taking the revision's lock.
        if not (await self._fetch(_ANY_EXPIRED, self._now()))[0][0]:
            return 0
        return await self._remove(_PURGE, limit)

    # --- the history ----------------------------------------------------------------------

    async def revision(self) -> int:
        return int((await self._fetch(_READ_REVISION))[0][0])

    async def changes(self, prefix: str, since: int, limit: int) -> Changes:
        rows = await self._fetch(
            _CHANGES, since, prefix, prefix_upper_bound(prefix), limit, PAGE_VALUE_CHARS
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

        async def trim(conn: Any) -> int:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _TRIM_LOCK):
                return 0
            revision = int(await conn.fetchval(_READ_REVISION))
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
            now_ms = await conn.fetchval(f"SELECT {_NOW.format('$1::bigint')}", self._now())
            cutoff = round(now_ms - max_age * 1000)
            await conn.execute(
                "INSERT INTO kv_history_marks (at, revision) VALUES ($1, $2)"
                " ON CONFLICT (at) DO UPDATE SET revision = excluded.revision",
                now_ms,
                revision,
            )
            aged = await conn.fetchval(
                "SELECT max(revision) FROM kv_history_marks WHERE at <= $1", cutoff
            )
            # The newest mark at or before the cutoff decides; the older ones are needed no more.
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
            cut = trim_cut(oldest, meta["compact_revision"], rows - max_rows, aged or 0)
            dropped = 0
            if oldest and oldest[0] <= cut:
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
                _WRITE_META,
                [("history_rows", str(rows - dropped)), ("history_counted", str(revision))],
            )
            return dropped

        dropped = await self._in_transaction(trim)
        if dropped and self._wake is not None:
            self._wake()  # this process's feed learns the compact revision it moved
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
        self._wake = wake
        if self._listen_url is None:
            try:
                await self._poll(wake)
            finally:
                self._wake = None
            return
        delay = LISTEN_RETRY_FIRST
        try:
            while True:
                listening = _Listening()
                try:
                    await self._listen_once(wake, listening)
                except _FAILURES as error:
                    if listening.worked:  # a connection that worked: the next try is soon
                        delay = LISTEN_RETRY_FIRST
                    log.warning("watch_connection_lost", reason=describe(error), retry_in=delay)
                wake()
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX)
        finally:
            self._wake = None

    async def _poll(self, wake: Wake) -> None:
        """Where LISTEN cannot work (a pooler in transaction mode hands each transaction to
        any server connection, and notifications to whoever holds one then): read the
        revision every POLL_WITHOUT_LISTEN seconds, through the pool."""
        wake()
        while True:
            try:
                revision = int((await self._fetch(_READ_REVISION))[0][0])
            except StoreError:
                wake()  # changes may come meanwhile; the feed finds the store down itself
            else:
                if revision != self._known_revision:  # newer, or the database was restored
                    self._known_revision = revision
                    wake()
            await asyncio.sleep(POLL_WITHOUT_LISTEN)

    async def _listen_once(self, wake: Wake, listening: _Listening) -> None:
        """LISTEN and poll until the connection fails (raising what it raised); ``listening``
        is told once LISTEN has taken effect."""
        assert self._listen_url is not None
        conn = await _connect_any_host(
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
                    self._moved(int(revision))

            await conn.add_listener(CHANNEL, notified)
            listening.worked = True
            wake()  # whatever committed before LISTEN took effect
            while True:
                revision = int(await conn.fetchval(_READ_REVISION, timeout=self._timeout))
                if revision != self._known_revision:  # newer, or the database was restored
                    self._known_revision = revision
                    wake()
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
        try:
            # Its own connection, without the requests' timeout: a load takes its time.
            conn = await _connect_any_host(
                self._url, timeout=self._timeout, **self._connect_options
            )
        except _FAILURES as error:
            raise _translate(error) from None
        try:
            await _check_primary(conn)  # as the pool checks its own
            async with conn.transaction():
                if source.fingerprint is not None:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _SEED_LOCK)
                    if await conn.fetchval(_READ_META, _SEED_FINGERPRINT) == source.fingerprint:
                        return None
                # Enough memory to sort a large load for DISTINCT ON without spilling to disk.
                await conn.execute("SET LOCAL work_mem = '256MB'")
                await conn.execute(
                    f"CREATE TEMP TABLE {_BULK_TABLE} (ordinal bigint,"
                    ' key text COLLATE "C", val text, expires_at bigint) ON COMMIT DROP'
                )
                status = await conn.copy_records_to_table(
                    _BULK_TABLE,
                    records=_numbered(source.batches()),
                    columns=["ordinal", "key", "val", "expires_at"],
                )
                applied = int(status.split()[-1])
                first = int(await conn.fetchval(_LOCK_REVISION))
                now_ms = await conn.fetchval(f"SELECT {_NOW.format('$1::bigint')}", self._now())
                revision = life_start(first + 1, now_ms / 1000)
                inserted = int((await conn.execute(_APPLY_BULK, revision)).split()[-1])
                removed = 0
                if replace is not None:
                    status = await conn.execute(
                        _REMOVE_OTHERS, revision, replace, prefix_upper_bound(replace)
                    )
                    removed = int(status.split()[-1])
                if applied or removed:
                    await conn.execute(_WRITE_META, "revision", str(revision))
                    await conn.execute(_COUNT_KEYS.format(inserted - removed))
                    # A bulk load, not events: watchers from before it list again.
                    await conn.execute(_WRITE_META, "compact_revision", str(revision))
                else:
                    revision = first
                if source.fingerprint is not None:
                    await conn.execute(_WRITE_META, _SEED_FINGERPRINT, source.fingerprint)
            if applied or removed:
                self._moved(revision)
                if self.on_commit is not None:
                    self.on_commit(1)
            return Loaded(applied, removed, revision)
        except _SourceFailed as failed:
            raise failed.error from None
        except _FAILURES as error:
            raise _translate(error) from None
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def export(self, prefix: str) -> AsyncIterator[_PostgresSnapshot]:
        try:
            conn = await _connect_any_host(
                self._url, timeout=self._timeout, **self._connect_options
            )
        except _FAILURES as error:
            raise _translate(error) from None
        try:
            try:
                await _check_primary(conn)  # as the pool checks its own
                transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                await transaction.start()
                revision = int(await conn.fetchval(_READ_REVISION))  # the snapshot's first read
                now_ms = await conn.fetchval(f"SELECT {_NOW.format('$1::bigint')}", self._now())
            except _FAILURES as error:
                raise _translate(error) from None
            yield _PostgresSnapshot(conn, revision, now_ms, prefix)
        finally:
            await conn.close()  # ends the transaction too

    async def seed_fingerprint(self) -> Optional[str]:
        rows = await self._fetch(_READ_META, _SEED_FINGERPRINT)
        return None if not rows else str(rows[0][0])

    # --- the rest -----------------------------------------------------------------------

    async def count(self) -> int:
        return int((await self._fetch(_READ_META, "keys"))[0][0])

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a connection reaches a primary that can write."""
        rows = await self._fetch(_WRITABLE)
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
    """An export's REPEATABLE READ transaction, read a page at a time (_EXPORT_PAGE)."""

    def __init__(self, conn: Any, revision: int, now_ms: int, prefix: str) -> None:
        self._conn = conn
        self.revision = revision
        self._now_ms = now_ms
        self._prefix = prefix

    async def batches(self) -> AsyncIterator[list[BulkRow]]:
        batch: list[BulkRow] = []
        chars = 0
        after, started = self._prefix, False
        bound = prefix_upper_bound(self._prefix)
        while True:
            try:
                rows = await self._conn.fetch(
                    _EXPORT_PAGE, self._now_ms, after, bound, _EXPORT_FETCH, started
                )
            except _FAILURES as error:
                raise _translate(error) from None
            if not rows:
                break
            after, started = rows[-1][0], True
            for key, val, expires_at in rows:
                if val is None:  # too long to come with its row
                    try:
                        val = await self._conn.fetchval(_EXPORT_VALUE, key)
                    except _FAILURES as error:
                        raise _translate(error) from None
                batch.append(BulkRow(key, val, expires_at))
                chars += len(val)
                if len(batch) == EXPORT_BATCH_ROWS or chars >= EXPORT_BATCH_CHARS:
                    yield batch
                    batch, chars = [], 0
        if batch:
            yield batch


def _condition_name(condition: Optional[Condition]) -> Optional[str]:
    return None if condition is None else _CONDITION_NAMES[type(condition)]


def _condition_version(condition: Optional[Condition]) -> Optional[int]:
    return condition.version if isinstance(condition, IfVersion) else None
