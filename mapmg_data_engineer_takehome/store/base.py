"""The Store protocol every backend implements, its typed operations, and the errors a store may
raise.

Versions and expiry, the same in every store:
- The store keeps one revision, an integer that grows by one with every committed write that
  changes something (a set, a delete of a live key, a batch, a seed), on any key and from any
  process. A key's version is the revision of the write that last changed it; the keys of one
  batch or seed share its revision. A write whose precondition fails, or a delete that finds
  nothing, commits nothing and takes no revision.
- A key may have an expiry, an absolute time in milliseconds since the Unix epoch (UTC). From
  that moment it reads as absent everywhere (reads, lists, batches, preconditions), although
  its row may stay until purge_expired removes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Protocol, Union

Row = tuple[str, str]

# The longest expiry a write may ask for: ten years, in seconds.
MAX_TTL_SECONDS = 315_360_000
# A page of a listing with values stops early once its values pass this many characters
# (a page of 1000 values of 1 MiB each would otherwise be a GiB in memory).
PAGE_VALUE_CHARS = 4 * 1024 * 1024


class Entry(NamedTuple):
    """What a key holds: its value, its version, and its expiry (ms since the epoch) or None.

    A NamedTuple, built straight from a database row: GET builds one per request.
    """

    val: str
    version: int
    expires_at: Optional[int]


class ListedKey(NamedTuple):
    """One key of a listing; ``val`` is None unless the listing asked for values."""

    key: str
    version: int
    expires_at: Optional[int]
    val: Optional[str] = None


@dataclass(frozen=True)
class Page:
    """A page of a listing, in ascending order of the keys' UTF-8 bytes; ``more`` is True when
    keys after the last one match too."""

    keys: Sequence[ListedKey]
    more: bool


# --- preconditions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IfVersion:
    """Write only if the key exists at this version (If-Match: "<version>")."""

    version: int


@dataclass(frozen=True)
class IfExists:
    """Write only if the key exists (If-Match: *)."""


@dataclass(frozen=True)
class IfAbsent:
    """Write only if the key does not exist (If-None-Match: *)."""


Condition = Union[IfVersion, IfExists, IfAbsent]


def condition_holds(condition: Optional[Condition], current: Optional[int]) -> bool:
    """Whether ``condition`` holds for a key whose live version is ``current`` (None: absent)."""
    if condition is None:
        return True
    if isinstance(condition, IfAbsent):
        return current is None
    if isinstance(condition, IfExists):
        return current is not None
    return current == condition.version


# --- write operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class SetItem:
    """One key to set: its value and, optionally, a time to live in seconds."""

    key: str
    val: str
    ttl: Optional[float] = None


def expiry_of(ttl: Optional[float], now: float) -> Optional[int]:
    """The absolute expiry, in ms since the epoch, of a write made at ``now`` (seconds)."""
    return None if ttl is None else round((now + ttl) * 1000)


# --- errors -----------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of the errors a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store cannot serve the operation now (disk full, read-only, locked)."""


class StoreCorrupt(StoreError):
    """The data file is damaged or belongs to something else; it is left untouched."""


class PreconditionFailed(Exception):
    """A conditional write's condition did not hold; nothing was written. An answer, not a
    failure of the store.

    ``current`` is the key's live version, or None when it does not exist.
    """

    def __init__(self, current: Optional[int]) -> None:
        super().__init__("the precondition does not hold")
        self.current = current


# --- the protocol -----------------------------------------------------------------------------

Clock = Callable[[], float]  # seconds since the epoch, as time.time


class Store(Protocol):
    """An async key-value store of strings, with versions, expiry and ordered listing.

    Async so that a networked backend fits behind the same interface; local backends may
    complete without suspending.
    """

    name: str
    # Told how many writes each commit held, once it has committed (for metrics).
    on_commit: Optional[Callable[[int], None]]

    async def get(self, key: str) -> Optional[Entry]:
        """What ``key`` holds, or None when it has no live value."""

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        """The live values of those of ``keys`` that have one."""

    async def set(
        self,
        key: str,
        val: str,
        ttl: Optional[float] = None,
        condition: Optional[Condition] = None,
    ) -> Entry:
        """Store ``val`` under ``key`` (expiring after ``ttl`` seconds, or never) if
        ``condition`` holds, else raise PreconditionFailed; returns what the key now holds.
        Once this returns, the write is as durable as promised."""

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        """Remove ``key`` if ``condition`` holds (else PreconditionFailed); True when it had a
        live value."""

    async def set_many(self, items: Sequence[SetItem]) -> int:
        """Set every item in one transaction, all or nothing, in order (the last item for a key
        wins); returns the revision they all share."""

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Remove every key in one transaction (one revision, if any had a live value);
        returns how many had a live value."""

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        """Up to ``limit`` live keys that start with ``prefix`` and sort after ``after`` (or
        from the first, when None), in ascending order of their UTF-8 bytes. With
        ``values``, the page stops early once its values pass PAGE_VALUE_CHARS."""

    async def purge_expired(self, limit: int) -> int:
        """Remove up to ``limit`` expired rows; how many were removed. Takes no revision."""

    async def load(self, seed: Seed) -> Optional[int]:
        """Apply the seed's rows in order (last wins, no expiry, one revision for all) and
        remember its fingerprint, atomically; how many rows were applied. None, applying
        nothing, when the store already holds a seed of that fingerprint: checked inside the
        same transaction, so that of several servers starting at once, one applies it."""

    async def seed_fingerprint(self) -> Optional[str]:
        """The fingerprint of the last seed applied, if the store remembers one."""

    async def count(self) -> int:
        """How many keys the store holds (expired ones not yet purged included): kept as
        keys come and go, never counted row by row, so that a scrape can ask."""

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable when it does not."""

    async def close(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""


def prefix_upper_bound(prefix: str) -> Optional[str]:
    """The least string above every string that starts with ``prefix``, or None when there is
    none (an empty prefix, or one of only the highest code point).

    Code point order is UTF-8 byte order, so ``prefix <= key < bound`` selects the prefix's
    keys with one range scan of an index on the key.
    """
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not text: skip to the next character
        following = 0xE000
    return stripped[:-1] + chr(following)


@dataclass(frozen=True)
class SqlSeed:
    """A seed's rows as SQL over its SQLite file, for a store that can ATTACH it and copy the
    rows without one passing through Python."""

    # The schema name the seed database is attached under; the queries read from it.
    SCHEMA: ClassVar[str] = "seed"
    uri: str  # a URI of the seed database that SQLite can ATTACH
    # SELECT (key, val) of every row in the order to apply them, NULL (or an empty key) where
    # a row is skipped: a store applies it with constraints that ignore those rows.
    select: str
    # The same, exact where ``select`` has a blind spot (see seed._text_of), at a cost.
    exact_select: str
    # SELECT count(*) of the rows ``select`` gets wrong; when it is not 0, use exact_select.
    misses: str
    functions: Mapping[str, Callable[..., Any]]  # SQL functions the queries call


class Seed(Protocol):
    """An input.db to apply: what every store can take (``rows``), what a SQLite store can
    take faster (``as_sql``), and its fingerprint. Either way, every key and value is valid
    text without NUL: a store cannot take invalid text from a seed."""

    fingerprint: str

    def rows(self) -> Iterable[Row]:
        """The rows to apply, in order; the last one for a key wins."""

    def as_sql(self) -> Optional[SqlSeed]:
        """The same rows as SQL over a SQLite file, or None when there is no such file."""
