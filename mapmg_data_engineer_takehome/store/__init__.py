"""Storage backends behind one async interface; ``open_store`` picks one from the settings.

base.py is the protocol, store-neutral; memory.py, sqlite/ and postgres/ implement it. What
more than one backend needs is written once beside them: reads.py (a loop turn's GETs as one
group), notify.py (waking the listener for a new revision), batches.py (the batch cut of
imports and exports) and trim.py (the history's trimming policy).
"""

from __future__ import annotations

import time
from typing import Optional

from ..settings import Settings
from .base import Clock, Store, StoreCorrupt, StoreError, StoreUnavailable
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]


async def open_store(settings: Settings, clock: Optional[Clock] = None) -> Store:
    """The backend the settings name, opened and ready. ``clock`` tells expiry's time, by
    default the machine's (PostgreSQL's own, for the postgres store)."""
    if settings.store == "memory":
        return MemoryStore(clock or time.time)
    if settings.store == "postgres":
        # Imported here: asyncpg's import is a cost that the other stores' start need not pay.
        from .postgres import PostgresStore

        assert settings.postgres_url is not None  # the settings make sure of it
        return await PostgresStore.open(
            settings.postgres_url.get_secret_value(),
            pool_size=settings.postgres_pool_size,
            timeout=settings.postgres_timeout,
            startup_wait=settings.postgres_startup_wait,
            clock=clock,
            pooler=settings.postgres_pooler,
            listen_url=(
                None
                if settings.postgres_listen_url is None
                else settings.postgres_listen_url.get_secret_value()
            ),
        )
    return SqliteStore(settings.data_path, settings.durability, clock or time.time)
