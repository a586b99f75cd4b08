"""Read input.db (read-only, streamed) and hand its rows to ``Store.load``.

The rules, applied in rowid order with the last row for a key winning:
- NULL key or val: skipped ("null_key", "null_val");
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import structlog

from .errors import StartupError
from .store.base import Row, Store

log = structlog.get_logger("kv.seed")

INPUT_DB_NAME = "input.db"
# input.db beside the package directory: the repo's top level under `pip install -e .`.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECAR_SUFFIXES = ("-wal", "-journal")
# Part of the fingerprint: a change to the rules above reapplies an unchanged input.db.
RULES_VERSION = b"seed-rules-1\x00"
_CHUNK = 1 << 20


def _text_of(column: str) -> str:
    """SQL for the text a column contributes under the rules; NULL when the row is skipped."""
    return (
        f"CASE typeof({column}) WHEN 'text' THEN {column} "
        f"WHEN 'blob' THEN kv_utf8({column}) WHEN 'null' THEN NULL "
        f"ELSE CAST({column} AS TEXT) END"
    )


_TALLY_SQL = f"""
SELECT count(*),
       total(key IS NULL),
       total(key IS NOT NULL AND val IS NULL),
       total(key IS NOT NULL AND val IS NOT NULL AND (k IS NULL OR v IS NULL)),
       total(k = '' AND v IS NOT NULL)
FROM (SELECT key, val, {_text_of("key")} AS k, {_text_of("val")} AS v FROM keys)
"""
_ROWS_SQL = f"""
SELECT k, v FROM (SELECT {_text_of("key")} AS k, {_text_of("val")} AS v FROM keys ORDER BY rowid)
WHERE k IS NOT NULL AND k <> '' AND v IS NOT NULL
"""
# The slow path, for a TEXT value that is not valid UTF-8 (which SQLite stores as given), runs
# _ROWS_SQL with text as bytes and Python decides row by row. Only rows the tally counted as
# applied arrive, so a row it already counted as skipped is not counted a second time.


class SeedError(StartupError):
    """input.db is missing, not a SQLite database, or lacks the keys table."""


class _UndecodableText(Exception):
    """A TEXT value is not valid UTF-8; the caller retries on the slow path."""


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


def _utf8_or_none(blob: bytes) -> Optional[str]:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return None


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
    """An open, validated input.db: its fingerprint, its tally and its rows."""

    def __init__(self, path: Path, conn: sqlite3.Connection, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._conn = conn

    def tally(self) -> SeedReport:
        rows_read, null_key, null_val, not_utf8, empty_key = (
            int(number) for number in self._conn.execute(_TALLY_SQL).fetchone()
        )
        skipped = {"null_key": null_key, "null_val": null_val, "not_utf8": not_utf8}
        skipped["empty_key"] = empty_key
        return SeedReport(
            path=str(self.path),
            applied=True,
            rows_read=rows_read,
            rows_applied=rows_read - sum(skipped.values()),
            skipped=skipped,
        )

    def rows(self) -> Iterator[Row]:
        """The rows to load, decoded by SQLite; raises _UndecodableText on invalid UTF-8 TEXT."""
        cursor = self._conn.execute(_ROWS_SQL)
        try:
            yield from cursor
        except sqlite3.OperationalError as error:
            if "decode" in str(error).lower():
                raise _UndecodableText() from None
            raise

    def rows_decoded_in_python(self, undecodable: list[int]) -> Iterator[Row]:
        """The rows to load, for a file with invalid UTF-8 TEXT; counts such rows in place."""
        self._conn.text_factory = bytes
        try:
            for raw_key, raw_val in self._conn.execute(_ROWS_SQL):
                key = _utf8_or_none(raw_key)
                val = _utf8_or_none(raw_val)
                if key is None or val is None:
                    undecodable[0] += 1
                else:
                    yield key, val
        finally:
            self._conn.text_factory = str


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
        if sidecars:
            private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kv-seed-")))
            readable = private / INPUT_DB_NAME
            _copy_and_hash(path, readable, digest)
            for sidecar in sidecars:
                _copy_and_hash(sidecar, Path(f"{readable}{sidecar.name[len(path.name) :]}"), digest)
            uri = f"file:{quote(str(readable))}"
        else:
            _hash_into(path, digest)
            uri = f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        stack.callback(conn.close)
        conn.create_function("kv_utf8", 1, _utf8_or_none, deterministic=True)
        try:
            conn.execute("SELECT key, val FROM keys ORDER BY rowid LIMIT 0").fetchall()
        except sqlite3.OperationalError as error:
            raise SeedError(
                f"{path}: has no table 'keys' with columns 'key' and 'val' ({error})"
            ) from None
        except sqlite3.DatabaseError as error:
            raise SeedError(f"{path}: not a usable SQLite database ({error})") from None
        yield SeedFile(path, conn, digest.hexdigest())


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
        if await store.seed_fingerprint() == seed.fingerprint:
            report = SeedReport(path=str(path), applied=False)
        else:
            try:
                report = seed.tally()  # reads every row: a damaged page shows up here
            except sqlite3.DatabaseError as error:
                raise SeedError(f"{path}: not a usable SQLite database ({error})") from None
            try:
                await store.load(seed.rows(), seed.fingerprint)
            except _UndecodableText:
                undecodable = [0]
                await store.load(seed.rows_decoded_in_python(undecodable), seed.fingerprint)
                report.skipped["not_utf8"] += undecodable[0]
                report.rows_applied -= undecodable[0]
    report.seconds = round(time.perf_counter() - started, 3)
    if report.applied:
        log.info("seed_applied", **vars(report))
    else:
        log.info("seed_unchanged", path=report.path, seconds=report.seconds)
    return report
