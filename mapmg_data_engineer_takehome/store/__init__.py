"""Storage backends behind one async interface; ``open_store`` picks one from the settings."""

from __future__ import annotations

from ..settings import Settings
from .base import Row, Store, StoreCorrupt, StoreError, StoreUnavailable
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


def open_store(settings: Settings) -> Store:
    """The backend the settings name, opened and ready."""
    if settings.store == "memory":
        return MemoryStore()
    return SqliteStore(settings.data_path, settings.durability)
