"""Storage backends behind one async interface; ``open_store`` picks one from the settings."""

from __future__ import annotations

import time

from ..settings import Settings
from .base import Clock, Row, Store, StoreCorrupt, StoreError, StoreUnavailable
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "MemoryStore",
    "Row",
    "SqliteStore",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]


def open_store(settings: Settings, clock: Clock = time.time) -> Store:
    """The backend the settings name, opened and ready; ``clock`` tells expiry's time."""
    if settings.store == "memory":
        return MemoryStore(clock)
    return SqliteStore(settings.data_path, settings.durability, clock)
