"""The Store protocol every backend implements, and the errors a store may raise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Protocol

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

    async def load(self, rows: Iterable[Row], fingerprint: str) -> None:
        """Apply ``rows`` in order (last wins) and remember ``fingerprint``, atomically."""

    async def seed_fingerprint(self) -> Optional[str]:
        """The fingerprint passed to the last completed ``load``, if the store remembers one."""

    async def count(self) -> int:
        """How many keys have a value."""

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable when it does not."""

    async def close(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""
