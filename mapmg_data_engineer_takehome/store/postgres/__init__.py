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

from .connect import POOLER_SETTING, describe, redacted_url
from .sql import CHANNEL, GET_MANY, SCHEMA_VERSION, TIMELINE_GAP
from .store import (
    LISTEN_RETRY_FIRST,
    LISTEN_RETRY_MAX,
    LISTENER_NAME,
    POLL_WITHOUT_LISTEN,
    READS_IN_FLIGHT_BEHIND_POOLER,
    WATCH_POLL_INTERVAL,
    PostgresStore,
)

__all__ = [
    "CHANNEL",
    "GET_MANY",
    "LISTENER_NAME",
    "LISTEN_RETRY_FIRST",
    "LISTEN_RETRY_MAX",
    "POLL_WITHOUT_LISTEN",
    "POOLER_SETTING",
    "READS_IN_FLIGHT_BEHIND_POOLER",
    "SCHEMA_VERSION",
    "TIMELINE_GAP",
    "WATCH_POLL_INTERVAL",
    "PostgresStore",
    "describe",
    "redacted_url",
]
