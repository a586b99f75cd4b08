"""The sqlite store's file: its tables, pragmas and triggers, opening a connection, the
header check, the upgrades from each earlier schema, and where each opening's life begins.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path, PurePath
from urllib.parse import quote, urlencode

import structlog

from ..base import (
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    life_start,
    prefix_upper_bound,
)

log = structlog.get_logger("kv.store")

# Stamped into the file header so that a foreign SQLite file is recognised and left alone.
APPLICATION_ID = 0x4B565354  # "KVST"
SCHEMA_VERSION = 6
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
    " val TEXT NOT NULL, version INTEGER NOT NULL, expires_at INTEGER, lease TEXT) WITHOUT ROWID"
)
# The leases (see base.py): a leased key names its lease in kv.lease and carries its expiry.
_CREATE_LEASES = (
    "CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY NOT NULL, ttl REAL NOT NULL,"
    " expires_at INTEGER NOT NULL) WITHOUT ROWID"
)
# A lease's keys without a scan (keepalive, revoke, expiry); keys without a lease pay nothing.
_CREATE_LEASE_INDEX = "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL"
_CREATE_LEASE_EXPIRY_INDEX = "CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at)"
# Only keys that expire are in it: the purge finds them without a scan, and writes of keys
# without expiry pay nothing for it.
_CREATE_EXPIRY_INDEX = (
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL"
)
# The access tokens (see base.py): no keys, so no revision, no change, no export. A request
# with a secret not in a worker's cache looks its hash up in secret_hash's unique index, or in
# previous_hash's (only rotated tokens in their grace period have one).
_CREATE_TOKENS = (
    "CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY NOT NULL,"
    " secret_hash TEXT NOT NULL UNIQUE, previous_hash TEXT, previous_until INTEGER,"
    " rules TEXT NOT NULL, admin INTEGER NOT NULL, created_at INTEGER NOT NULL,"
    " expires_at INTEGER, last_used_at INTEGER) WITHOUT ROWID"
)
_CREATE_TOKENS_PREVIOUS_INDEX = (
    "CREATE INDEX IF NOT EXISTS tokens_previous ON tokens (previous_hash)"
    " WHERE previous_hash IS NOT NULL"
)
# Moved by every create, rotation and delete of a token: each worker's cache of tokens reads
# it to know when to read them again.
TOKENS_GENERATION = "tokens_generation"
_CREATE_META = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value NOT NULL) WITHOUT ROWID"
)
REVISION = "revision"
KEYS = "keys"
# The history (see the package docstring), in the feed's order: reading it is one range scan
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
COMPACT_REVISION = "compact_revision"
# The revisions each new life skipped (see the package docstring): none was given to a write
# here, and a watcher holding one is told it is not this store's.
_CREATE_GAPS = (
    "CREATE TABLE IF NOT EXISTS gaps (resumed_at INTEGER PRIMARY KEY, forked_at INTEGER NOT NULL)"
)

# The history's rows, counted by trim_history up to the revision in HISTORY_COUNTED: writes
# pay nothing to keep a count, and the rows above that revision are few to count.
HISTORY_ROWS = "history_rows"
HISTORY_COUNTED = "history_counted"
# Triggers on every connection that writes (TEMP triggers belong to their connection):
# - The number of keys, kept in meta as rows come and go, so that it is never counted.
#   Writes use an upsert, not INSERT OR REPLACE: an overwrite then fires no count trigger
#   (REPLACE's delete fires none either, and its insert would count the key twice).
# - A set's change, recorded with the row the set wrote (an upsert fires the insert trigger
#   or the update one); the same key twice in one revision keeps the later. Only an update of
#   the value or version is a set: a keepalive moving a leased key's expiry records nothing.
_RECORD_SET = (
    "INSERT OR REPLACE INTO changes (revision, key, type, val, expires_at)"
    " VALUES (NEW.version, NEW.key, 'set', NEW.val, NEW.expires_at)"
)
_TRIGGERS = (
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_added AFTER INSERT ON main.kv BEGIN"
    f" UPDATE meta SET value = value + 1 WHERE name = '{KEYS}'; {_RECORD_SET}; END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_updated AFTER UPDATE OF val, version ON main.kv"
    f" BEGIN"
    f" {_RECORD_SET}; END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS kv_key_removed AFTER DELETE ON main.kv BEGIN"
    f" UPDATE meta SET value = value - 1 WHERE name = '{KEYS}'; END",
)
SEED_FINGERPRINT = "seed_fingerprint"
_SCHEMA = (
    _CREATE_KV,
    _CREATE_EXPIRY_INDEX,
    _CREATE_META,
    _CREATE_CHANGES,
    _CREATE_MARKS,
    _CREATE_GAPS,
    _CREATE_LEASES,
    _CREATE_LEASE_INDEX,
    _CREATE_LEASE_EXPIRY_INDEX,
    _CREATE_TOKENS,
    _CREATE_TOKENS_PREVIOUS_INDEX,
    f"INSERT INTO meta (name, value) VALUES ('{REVISION}', 0), ('{KEYS}', 0),"
    f" ('{COMPACT_REVISION}', 0), ('{HISTORY_ROWS}', 0), ('{HISTORY_COUNTED}', 0),"
    f" ('{TOKENS_GENERATION}', 0)",
)
# From each schema version to the next, in place. Schema 1 (release 1.0.0) had neither
# versions nor expiry: its keys take revision 1, and never expire. Schema 2 had no history:
# it starts empty, complete above the revision the file was at. Schema 3 had no lives: its
# first opening here begins one. Schema 4 had no leases: its keys have none. Schema 5 had no
# access tokens: it has none, at generation 0.
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE kv ADD COLUMN expires_at INTEGER",
        _CREATE_EXPIRY_INDEX,
        f"INSERT OR REPLACE INTO meta (name, value) VALUES ('{REVISION}', 1)",
        f"INSERT OR REPLACE INTO meta (name, value) VALUES ('{KEYS}', (SELECT count(*) FROM kv))",
    ),
    2: (
        _CREATE_CHANGES,
        _CREATE_MARKS,
        f"INSERT OR REPLACE INTO meta (name, value) SELECT name, value FROM (SELECT"
        f" '{COMPACT_REVISION}' AS name, value FROM meta WHERE name = '{REVISION}' UNION ALL"
        f" SELECT '{HISTORY_COUNTED}', value FROM meta WHERE name = '{REVISION}' UNION ALL"
        f" SELECT '{HISTORY_ROWS}', 0)",
    ),
    3: (_CREATE_GAPS,),
    4: (
        "ALTER TABLE kv ADD COLUMN lease TEXT",
        _CREATE_LEASES,
        _CREATE_LEASE_INDEX,
        _CREATE_LEASE_EXPIRY_INDEX,
    ),
    5: (
        _CREATE_TOKENS,
        _CREATE_TOKENS_PREVIOUS_INDEX,
        f"INSERT OR REPLACE INTO meta (name, value) VALUES ('{TOKENS_GENERATION}', 0)",
    ),
}

READ_META = "SELECT value FROM meta WHERE name = ?"
WRITE_META = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)"
LIVE = "(expires_at IS NULL OR expires_at > ?)"
# Keys per statement in the batch reads and deletes: well under SQLite's 999 parameters,
# the smallest limit of the versions Python ships.
CHUNK = 500


def sqlite_uri(path: PurePath, **query: str) -> str:
    """A SQLite URI for the absolute ``path``, on any system: ``file:///srv/kv%20data/kv.db``,
    ``file:///C:/kv/kv.db``. What URIs reserve ('?', '#', '%', spaces) is percent-encoded."""
    location = path.as_posix()
    if not location.startswith("/"):  # a Windows drive, C:/kv, goes after the empty authority
        location = "/" + location
    uri = "file://" + quote(location, safe="/:")
    return f"{uri}?{urlencode(query)}" if query else uri


def translate(error: sqlite3.Error, path: Path) -> StoreError:
    """Map SQLite's exceptions to the store's: transient conditions versus damage."""
    if isinstance(error, sqlite3.OperationalError):
        return StoreUnavailable(f"{path}: {error}")
    return StoreCorrupt(f"{path}: {error}")


def connect(path: Path, durability: str, bulk: bool = False) -> sqlite3.Connection:
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


def check_header(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as file:
        if file.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise StoreCorrupt(f"{path}: not a SQLite database; refusing to touch it")


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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


def prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        _upgrade(conn, path)
        return
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != 0 or has_tables:
        raise StoreCorrupt(
            f"{path}: a SQLite database that this server did not create; refusing to touch it"
        )
    with write_transaction(conn):
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
    with write_transaction(conn):
        # Read again under the write lock: another worker may have upgraded it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            for statement in _UPGRADES[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if version < SCHEMA_VERSION:
        log.info("store_upgraded", path=str(path), schema_from=version, schema_to=SCHEMA_VERSION)


def begin_life(conn: sqlite3.Connection, now: float) -> None:
    """Move the revision to where this opening's life begins (base.life_start), recording the
    numbers skipped: under the write lock, so that a worker opening the file meanwhile, or one
    already writing, never has its revisions skipped."""
    with write_transaction(conn):
        revision = meta_value(conn, REVISION)
        start = life_start(revision, now)
        if start > revision:
            conn.execute(
                "INSERT INTO gaps (resumed_at, forked_at) VALUES (?, ?)", (start, revision)
            )
            conn.execute(WRITE_META, (REVISION, start))


def prefix_range(prefix: str) -> tuple[str, tuple[str, ...]]:
    """SQL (to AND on) selecting the keys that start with ``prefix``, and its parameters."""
    if not prefix:
        return "", ()
    bound = prefix_upper_bound(prefix)
    if bound is None:
        return " AND key >= ?", (prefix,)
    return " AND key >= ? AND key < ?", (prefix, bound)


def meta_value(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(READ_META, (name,)).fetchone()[0])
