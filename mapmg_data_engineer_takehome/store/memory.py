"""The memory store: a dict. Fast, and everything in it is lost when the process exits."""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from typing import Callable, Optional

from .base import (
    PAGE_VALUE_CHARS,
    Clock,
    Condition,
    Entry,
    ListedKey,
    Page,
    PreconditionFailed,
    Seed,
    SetItem,
    condition_holds,
    expiry_of,
    prefix_upper_bound,
)


class MemoryStore:
    """A Store backed by a dict; it remembers no seed fingerprint, so every start reseeds.

    Listing keeps a sorted copy of the keys, rebuilt only after keys were added or removed.
    """

    name = "memory"

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._data: dict[str, Entry] = {}
        self._revision = 0
        self._sorted: Optional[list[str]] = []
        self.on_commit: Optional[Callable[[int], None]] = None

    def _committed(self) -> None:
        """Each write is its own commit here."""
        if self.on_commit is not None:
            self.on_commit(1)

    def _live(self, key: str) -> Optional[Entry]:
        entry = self._data.get(key)
        if entry is None or entry.expires_at is None:
            return entry
        return entry if entry.expires_at > self._clock() * 1000 else None

    def _put(self, key: str, entry: Entry) -> None:
        if key not in self._data:
            self._sorted = None
        self._data[key] = entry

    def _remove(self, key: str) -> Optional[Entry]:
        """Drop the key's row, expired or not; what it held while live, if it was."""
        live = self._live(key)
        if self._data.pop(key, None) is not None:
            self._sorted = None
        return live

    def _check(self, key: str, condition: Optional[Condition]) -> None:
        if condition is not None:
            live = self._live(key)
            current = None if live is None else live.version
            if not condition_holds(condition, current):
                raise PreconditionFailed(current)

    async def get(self, key: str) -> Optional[Entry]:
        return self._live(key)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, str]:
        found = {}
        for key in keys:
            entry = self._live(key)
            if entry is not None:
                found[key] = entry.val
        return found

    async def set(
        self,
        key: str,
        val: str,
        ttl: Optional[float] = None,
        condition: Optional[Condition] = None,
    ) -> Entry:
        self._check(key, condition)
        self._revision += 1
        entry = Entry(val, self._revision, expiry_of(ttl, self._clock()))
        self._put(key, entry)
        self._committed()
        return entry

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        self._check(key, condition)
        if self._remove(key) is None:
            return False
        self._revision += 1
        self._committed()
        return True

    async def set_many(self, items: Sequence[SetItem]) -> int:
        self._revision += 1
        now = self._clock()
        for item in items:
            self._put(item.key, Entry(item.val, self._revision, expiry_of(item.ttl, now)))
        self._committed()
        return self._revision

    async def delete_many(self, keys: Sequence[str]) -> int:
        deleted = sum(self._remove(key) is not None for key in keys)
        if deleted:
            self._revision += 1
            self._committed()
        return deleted

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        if self._sorted is None:
            self._sorted = sorted(self._data)
        keys = self._sorted
        bound = prefix_upper_bound(prefix)
        start = (
            bisect.bisect_right(keys, after)
            if after is not None and after >= prefix
            else bisect.bisect_left(keys, prefix)
        )
        page: list[ListedKey] = []
        value_chars = 0
        for position in range(start, len(keys)):
            key = keys[position]
            if bound is not None and key >= bound:
                break
            entry = self._live(key)
            if entry is None:
                continue
            if len(page) == limit or (values and value_chars > PAGE_VALUE_CHARS):
                return Page(page, more=True)
            page.append(
                ListedKey(key, entry.version, entry.expires_at, entry.val if values else None)
            )
            value_chars += len(entry.val)
        return Page(page, more=False)

    async def purge_expired(self, limit: int) -> int:
        now_ms = self._clock() * 1000
        expired = [
            key
            for key, entry in self._data.items()
            if entry.expires_at is not None and entry.expires_at <= now_ms
        ][:limit]
        for key in expired:
            self._remove(key)
        return len(expired)

    async def load(self, seed: Seed) -> Optional[int]:
        revision = self._revision + 1
        applied = 0
        for key, val in seed.rows():
            self._put(key, Entry(val, revision, None))
            applied += 1
        if applied:
            self._revision = revision
        return applied

    async def seed_fingerprint(self) -> Optional[str]:
        return None

    async def count(self) -> int:
        return len(self._data)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._sorted = []
