"""Read input.db (read-only, streamed) and hand its rows to ``Store.load``, the bulk load an
import goes through too.

The rules, applied in rowid order with the last row for a key winning:
- NULL key or val: skipped ("null_key", "null_val");
- a key or val holding a NUL character (U+0000), which PostgreSQL's text cannot hold, and
  which requests are refused too: skipped ("nul_character");
- BLOB: used as text when it is valid UTF-8, skipped otherwise ("not_utf8");
- INTEGER or REAL: SQLite's own text form (``CAST(x AS TEXT)``);
- empty key: skipped ("empty_key"), since no request can name it.

input.db is never written. Without a -wal or -journal file beside it, it is opened with
``immutable=1``, which takes no locks and creates no files. With one (a writer is active, or
one crashed), the file and its sidecar are copied to a private temporary directory and read
there, so that SQLite can finish or roll back the transaction without touching the original.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import structlog

from . import rules
from .errors import StartupError
from .store.base import LoadRow, Store
from .store.sqlite import SqlSeed, sqlite_uri

log = structlog.get_logger("kv.seed")

INPUT_DB_NAME = "input.db"
# input.db beside the package directory: the repo's top level under `pip install -e .`.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECAR_SUFFIXES = ("-wal", "-journal")
# Part of the fingerprint: a change to the rules above reapplies an unchanged input.db.
RULES_VERSION = b"seed-rules-1\x00"
_CHUNK = 1 << 20
# Rows per batch handed to a store that takes them from Python (see SeedFile.batches).
_BATCH_ROWS = 1_000


def _has_nul(column: str) -> str:
    """SQL: whether a column's bytes hold a NUL (U+0000), which PostgreSQL's text refuses."""
    return f"instr(CAST({column} AS BLOB), X'00')"


def _text_of(column: str, exact: bool = True) -> str:
    """SQL for the text a column contributes under the rules; NULL when the row is skipped.

    SQLite stores TEXT without checking its UTF-8, so text is validated too, but cheaply:
    printable ASCII passes as it is, and anything else goes through kv_utf8 (rules.text_of,
    Python's strict decoder), which refuses a NUL too. The test has two halves because
    SQLite's own UTF-8 reading is lenient: a value holding a continuation byte has fewer
    characters than bytes, and one holding a lone lead byte reads as a control character,
    outside the GLOB's printable range. A NUL needs no test of its own: SQLite's length()
    counts the characters before the first one, fewer than the bytes.

    Not ``exact``, the GLOB is left out: half the cost, and right for every value but
    TEXT that is not UTF-8 yet has as many characters as bytes by SQLite's count (its stray
    bytes are lone lead or continuation bytes, as in X'FF61'). See SqlSeed.misses.
    """
    printable = f"AND NOT {column} GLOB '*[^ -~]*' " if exact else ""
    return (
        f"CASE typeof({column}) "
        f"WHEN 'text' THEN CASE WHEN length({column}) = length(CAST({column} AS BLOB)) "
        f"{printable}THEN {column} ELSE kv_utf8(CAST({column} AS BLOB)) END "
        f"WHEN 'blob' THEN kv_utf8({column}) "
        f"WHEN 'null' THEN NULL "
        f"ELSE CAST({column} AS TEXT) END"
    )


def table_sql(schema: str, exact: bool) -> str:
    """One (key, val, expires_at) per row of ``{schema}.keys`` in rowid order, as a bulk load
    takes them (none expires), key or val NULL (or an empty key) where the row is skipped:
    each value is evaluated once, with no subquery."""
    return (
        f"SELECT {_text_of('key', exact)}, {_text_of('val', exact)}, NULL FROM {schema}.keys "
        "ORDER BY rowid"
    )


def misses_sql(schema: str) -> str:
    """How many rows table_sql without ``exact`` would get wrong: its one blind spot."""

    def missed(column: str) -> str:
        return (
            f"(typeof({column}) = 'text' AND length({column}) = length(CAST({column} AS BLOB)) "
            f"AND {column} GLOB '*[^ -~]*' AND kv_utf8(CAST({column} AS BLOB)) IS NULL)"
        )

    return f"SELECT count(*) FROM {schema}.keys WHERE {missed('key')} OR {missed('val')}"


# Why rows were skipped: only asked when some were, since it reads the whole file again.
_SKIPS_SQL = f"""
SELECT total(key IS NULL),
       total(key IS NOT NULL AND val IS NULL),
       total(key IS NOT NULL AND val IS NOT NULL AND (nul_key OR nul_val)),
       total(key IS NOT NULL AND val IS NOT NULL AND NOT (nul_key OR nul_val)
             AND coalesce(k <> '', 1) AND (k IS NULL OR v IS NULL)),
       total(key IS NOT NULL AND val IS NOT NULL AND NOT (nul_key OR nul_val) AND k = '')
FROM (SELECT key, val, {_text_of("key")} AS k, {_text_of("val")} AS v,
             coalesce({_has_nul("key")}, 0) > 0 AS nul_key,
             coalesce({_has_nul("val")}, 0) > 0 AS nul_val FROM keys)
"""
SKIP_REASONS = ("null_key", "null_val", "nul_character", "not_utf8", "empty_key")


# The SQL functions the queries above call, registered on whichever connection runs them:
# kv_utf8 is the wire rules' own test of text (valid UTF-8 without NUL).
SQL_FUNCTIONS: dict[str, Callable[[bytes], Optional[str]]] = {"kv_utf8": rules.text_of}


class SeedError(StartupError):
    """input.db is missing, not a SQLite database, or lacks the keys table."""


@dataclass
class SeedReport:
    """What seeding did, for the startup log."""

    path: Optional[str]
    applied: bool
    rows_read: int = 0
    rows_applied: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def find_input_db(configured: Optional[Path]) -> Optional[Path]:
    """The input.db to seed from: the configured one (which must exist), else a default."""
    if configured is not None:
        if not configured.is_file():
            raise SeedError(f"{configured}: the configured input database does not exist")
        return configured
    for candidate in (Path(INPUT_DB_NAME), PACKAGE_PARENT / INPUT_DB_NAME):
        if candidate.is_file():
            return candidate.resolve()
    return None


def register_functions(conn: sqlite3.Connection) -> None:
    """Make the SQL functions the seed queries call available on ``conn``."""
    for name, function in SQL_FUNCTIONS.items():
        conn.create_function(name, 1, function, deterministic=True)


def _copy_and_hash(source: Path, target: Path, digest: hashlib._Hash) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        for chunk in iter(lambda: reader.read(_CHUNK), b""):
            digest.update(chunk)
            writer.write(chunk)


def _hash_into(source: Path, digest: hashlib._Hash) -> None:
    with source.open("rb") as reader:
        for chunk in iter(lambda: reader.read(_CHUNK), b""):
            digest.update(chunk)


class SeedFile:
    """An open, validated input.db: the BulkSource a store applies, and what the report needs."""

    def __init__(self, path: Path, conn: sqlite3.Connection, uri: str, fingerprint: str) -> None:
        self.path = path
        self.uri = uri
        self.fingerprint = fingerprint
        self._conn = conn

    def row_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM keys").fetchone()[0])

    def skips(self) -> dict[str, int]:
        """Rows skipped, by reason."""
        counts = self._conn.execute(_SKIPS_SQL).fetchone()
        return {reason: int(count) for reason, count in zip(SKIP_REASONS, counts)}

    async def batches(self) -> AsyncIterator[list[LoadRow]]:
        """The rows to apply, in order, each key and value valid text without NUL, as the
        query gives them: a row costs no Python object of its own (a third of the time of a
        memory or PostgreSQL store's seed, which take them from here)."""
        cursor = self._conn.execute(table_sql("main", exact=True))
        while True:
            rows = cursor.fetchmany(_BATCH_ROWS)
            if not rows:
                return
            # Skipped rows are filtered here: in SQL, a subquery's WHERE would evaluate the
            # checks of every value twice, which costs more than this.
            yield [row for row in rows if row[0] and row[1] is not None]

    def as_sql(self) -> SqlSeed:
        """The same rows, for a store that can attach a SQLite file and copy them itself."""
        schema = SqlSeed.SCHEMA
        return SqlSeed(
            uri=self.uri,
            select=table_sql(schema, exact=False),
            exact_select=table_sql(schema, exact=True),
            misses=misses_sql(schema),
            functions=SQL_FUNCTIONS,
        )


@contextmanager
def open_seed(path: Path) -> Iterator[SeedFile]:
    """Open ``path`` read-only without leaving anything beside it; SeedError if it is unusable."""
    try:
        with path.open("rb") as file:
            magic = file.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise SeedError(f"{path}: cannot be read ({error.strerror})") from None
    if magic != SQLITE_MAGIC:
        raise SeedError(f"{path}: not a SQLite database")
    digest = hashlib.sha256(RULES_VERSION)
    sidecars = [
        Path(f"{path}{suffix}") for suffix in SIDECAR_SUFFIXES if Path(f"{path}{suffix}").is_file()
    ]
    with ExitStack() as stack:
        try:
            if sidecars:
                private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kv-seed-")))
                readable = private / INPUT_DB_NAME
                _copy_and_hash(path, readable, digest)
                for sidecar in sidecars:
                    copy = Path(f"{readable}{sidecar.name[len(path.name) :]}")
                    _copy_and_hash(sidecar, copy, digest)
                # The private copy is opened read-write so that SQLite can recover it.
                uri = sqlite_uri(readable.resolve())
            else:
                _hash_into(path, digest)
                uri = sqlite_uri(path.resolve(), mode="ro", immutable="1")
        except OSError as error:  # a full temporary directory, say
            where = "" if error.filename is None else f" {error.filename}:"
            raise SeedError(f"{path}: cannot be read safely ({where} {error.strerror})") from None
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        stack.callback(conn.close)
        register_functions(conn)
        try:
            conn.execute("SELECT key, val FROM keys ORDER BY rowid LIMIT 0").fetchall()
        except sqlite3.OperationalError as error:
            raise SeedError(
                f"{path}: has no table 'keys' with columns 'key' and 'val' ({error})"
            ) from None
        except sqlite3.DatabaseError as error:
            raise SeedError(f"{path}: not a usable SQLite database ({error})") from None
        yield SeedFile(path, conn, uri, digest.hexdigest())


async def seed_store(store: Store, path: Optional[Path]) -> SeedReport:
    """Apply input.db to ``store`` unless the store already holds this exact seed."""
    started = time.perf_counter()
    if path is None:
        log.warning(
            "seed_not_found",
            message="no input.db in the working directory or beside the package; "
            "starting without a seed",
        )
        return SeedReport(path=None, applied=False)
    with open_seed(path) as seed:
        rows_applied = None
        if await store.seed_fingerprint() != seed.fingerprint:  # the store checks it again
            try:
                # Counting reads every page of the table: a damaged input.db is named here,
                # before the store could take its error for one of its own file.
                rows_read = seed.row_count()
                loaded = await store.load(seed)
                rows_applied = None if loaded is None else loaded.applied
                if rows_applied is not None and rows_applied != rows_read:
                    skipped = seed.skips()
                else:
                    skipped = dict.fromkeys(SKIP_REASONS, 0)
            except sqlite3.DatabaseError as error:
                raise SeedError(f"{path}: not a usable SQLite database ({error})") from None
        if rows_applied is None:
            report = SeedReport(path=str(path), applied=False)
        else:
            report = SeedReport(str(path), True, rows_read, rows_applied, skipped)
    report.seconds = round(time.perf_counter() - started, 3)
    if report.applied:
        log.info("seed_applied", **vars(report))
    else:
        log.info("seed_unchanged", path=report.path, seconds=report.seconds)
    return report
