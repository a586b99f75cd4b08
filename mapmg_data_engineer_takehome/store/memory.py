"""The memory store: a dict. Fast, and everything in it is lost when the process exits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from .base import Row


class MemoryStore:
    """A Store backed by a dict; it remembers no seed fingerprint, so every start reseeds."""

    name = "memory"

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    async def get(self, key: str) -> Optional[str]:
        return self._data.get(key)

    async def set(self, key: str, val: str) -> None:
        self._data[key] = val

    async def delete(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    async def load(self, rows: Iterable[Row], fingerprint: str) -> int:
        applied = 0
        data = self._data
        for key, val in rows:
            data[key] = val
            applied += 1
        return applied

    async def seed_fingerprint(self) -> Optional[str]:
        return None

    async def count(self) -> int:
        return len(self._data)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
