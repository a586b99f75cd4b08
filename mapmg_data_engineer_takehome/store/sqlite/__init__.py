"""The sqlite store: one SQLite file in WAL mode, the default and durable backend.

Reads run on the event loop's thread, and those of one loop iteration share one read
transaction (see _begin_read_snapshot); their GETs are one query (see get). Writes are
committed in groups (GroupCommitter): with ``durability="normal"`` on the loop's thread,
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

from .bulk import SqlSeed, SqlSeedSource
from .schema import SCHEMA_VERSION, sqlite_uri
from .store import WATCH_POLL_INTERVAL, SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "WATCH_POLL_INTERVAL",
    "SqlSeed",
    "SqlSeedSource",
    "SqliteStore",
    "sqlite_uri",
]
