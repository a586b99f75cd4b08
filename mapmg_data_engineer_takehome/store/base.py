"""The Store protocol every backend implements, and the errors a store may raise."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, runtime_checkable

Row = tuple[str, str]


class StoreError(Exception):
    """Base class of the errors a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store cannot serve the operation now (disk full, read-only, locked)."""


class StoreCorrupt(StoreError):
    """The data file is damaged or belongs to something else; it is left untouched."""


class Store(Protocol):
    """An async key-value store of strings.

    Async so that a networked backend fits behind the same interface; local backends may
    complete without suspending.
    """

    name: str

    async def get(self, key: str) -> Optional[str]:
        """The value of ``key``, or None when it has none."""

    async def set(self, key: str, val: str) -> None:
        """Store ``val`` under ``key``; once this returns, the write is as durable as promised."""

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it had a value."""

    async def load(self, rows: Iterable[Row], fingerprint: str) -> int:
        """Apply ``rows`` in order (last wins) and remember ``fingerprint``, atomically.

        Returns how many rows were applied.
        """

    async def seed_fingerprint(self) -> Optional[str]:
        """The fingerprint passed to the last completed ``load``, if the store remembers one."""

    async def count(self) -> int:
        """How many keys have a value."""

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable when it does not."""

    async def close(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""


@dataclass(frozen=True)
class SqlSeed:
    """A seed that a SQLite-backed store can copy in one statement instead of row by row."""

    # The schema name the seed database is attached under; ``select`` reads from it.
    SCHEMA: ClassVar[str] = "seed"
    uri: str  # a URI of the seed database that SQLite can ATTACH
    select: str  # SELECT of (key, val) rows in the order to apply them
    functions: Mapping[str, Callable[..., Any]]  # SQL functions ``select`` calls


class SqlSeedRejected(StoreError):
    """The store's constraints refused a row of a SqlSeed; nothing of it was applied."""


@runtime_checkable
class SqlSeedLoader(Protocol):
    """A store that can take a whole SqlSeed inside SQLite, without a row passing through Python."""

    async def load_sql(self, seed: SqlSeed, fingerprint: str) -> int:
        """Like Store.load, for every row ``seed.select`` yields.

        Raises SqlSeedRejected, having applied nothing, when a row has a NULL or an empty key.
        """
