"""The memory store: a dict. Fast, and everything in it is lost when the process exits.

Each start is a new life of the store, whose revisions begin at the clock in microseconds
(base.life_start): a watcher holding a revision of an earlier life gets 410, never this
life's changes under its numbers."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Callable, Optional

from .base import (
    PAGE_VALUE_CHARS,
    BulkRow,
    BulkSource,
    Change,
    Changes,
    ChangeType,
    Clock,
    Compare,
    Condition,
    DeletedKey,
    DeletedPrefix,
    Entry,
    Gap,
    GotKey,
    HistoryStats,
    KeysRefused,
    Lease,
    LeaseKeys,
    LeaseNotFound,
    ListedKey,
    Loaded,
    MayWrite,
    Page,
    PreconditionFailed,
    SetItem,
    SetKey,
    Token,
    TokenExists,
    TokenNotFound,
    TxnDelete,
    TxnGet,
    TxnOperation,
    TxnOutcome,
    TxnResult,
    TxnSet,
    Wake,
    check_since,
    condition_holds,
    expiry_of,
    first_failing,
    lease_expiry,
    leases_of,
    life_start,
    new_lease_id,
    prefix_upper_bound,
    take_changes,
    the_one_renewed,
)
from .batches import batched
from .notify import RevisionWake
from .trim import TrimPolicy


class MemoryStore:
    """A Store backed by a dict; it remembers no seed fingerprint, so every start reseeds.

    Listing keeps a sorted copy of the keys, rebuilt only after keys were added or removed.
    The history is a list in revision order, with a parallel list of revisions to bisect; the
    trimming's marks are (ms, revision) pairs in time order.
    """

    name = "memory"

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._data: dict[str, Entry] = {}
        self._revision = life_start(0, clock())
        # Every revision below this life's start was never this store's (0 is "from the
        # beginning", which it is).
        self._gaps = [Gap(0, self._revision)] if self._revision > 1 else []
        self._sorted: Optional[list[str]] = []
        self._history: list[Change] = []
        self._history_revisions: list[int] = []
        self._marks: list[tuple[float, int]] = []
        self._compact_revision = 0
        self._revisions = RevisionWake()
        # The leases, and which lease each leased key has (a leased key's entry carries its
        # lease's expiry: see base.py).
        self._leases: dict[str, Lease] = {}
        self._lease_keys: dict[str, set[str]] = {}
        self._key_lease: dict[str, str] = {}
        self._tokens: dict[str, Token] = {}
        self._tokens_generation = 0
        self.on_commit: Optional[Callable[[int], None]] = None

    def _committed(self, writes: int = 1) -> None:
        """Each write is its own commit here (a purge's counts none)."""
        if writes and self.on_commit is not None:
            self.on_commit(writes)
        self._revisions.moved(self._revision)

    def _record(self, kind: ChangeType, key: str, entry: Optional[Entry] = None) -> None:
        """Record a change of the revision now being written (``self._revision``): a set's
        with the ``entry`` it wrote."""
        if entry is None:
            self._history.append(Change(self._revision, kind, key))
        else:
            self._history.append(Change(self._revision, kind, key, entry.val, entry.expires_at))
        self._history_revisions.append(self._revision)

    def _live(self, key: str) -> Optional[Entry]:
        entry = self._data.get(key)
        if entry is None or entry.expires_at is None:
            return entry
        return entry if entry.expires_at > self._clock() * 1000 else None

    def _put(self, key: str, entry: Entry, lease: Optional[str] = None) -> None:
        if key not in self._data:
            self._sorted = None
        self._data[key] = entry
        self._attach(key, lease)

    def _attach(self, key: str, lease: Optional[str]) -> None:
        """Tie ``key`` to ``lease``, or to none, detaching it from the one it had."""
        before = self._key_lease.pop(key, None)
        if before is not None:
            self._lease_keys[before].discard(key)
        if lease is not None:
            self._key_lease[key] = lease
            self._lease_keys[lease].add(key)

    def _remove(self, key: str) -> Optional[Entry]:
        """Drop the key's row, expired or not; what it held while live, if it was."""
        live = self._live(key)
        if self._data.pop(key, None) is not None:
            self._sorted = None
        self._attach(key, None)
        return live

    def _live_lease(self, lease: str) -> Lease:
        found = self._leases.get(lease)
        if found is None or found.expires_at <= self._clock() * 1000:
            raise LeaseNotFound(lease)
        return found

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
        lease: Optional[str] = None,
    ) -> Entry:
        self._check(key, condition)
        expires_at = expiry_of(ttl, self._clock())
        if lease is not None:
            expires_at = self._live_lease(lease).expires_at
        self._revision += 1
        entry = Entry(val, self._revision, expires_at)
        self._put(key, entry, lease)
        self._record("set", key, entry)
        self._committed()
        return entry

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        self._check(key, condition)
        if self._live(key) is None:  # an expired row stays for the purge to report
            return False
        self._remove(key)
        self._revision += 1
        self._record("delete", key)
        self._committed()
        return True

    async def set_many(self, items: Sequence[SetItem]) -> int:
        self._revision += 1
        now = self._clock()
        last = {item.key: item for item in items}
        for key in sorted(last):
            item = last[key]
            entry = Entry(item.val, self._revision, expiry_of(item.ttl, now))
            self._put(key, entry)
            self._record("set", key, entry)
        self._committed()
        return self._revision

    async def delete_many(self, keys: Sequence[str]) -> int:
        live = sorted(key for key in set(keys) if self._live(key) is not None)
        if not live:
            return 0
        self._revision += 1
        for key in live:
            self._remove(key)
            self._record("delete", key)
        self._committed()
        return len(live)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOperation],
        failure: Sequence[TxnOperation],
    ) -> TxnResult:
        failed = first_failing(compares, self._live)
        branch = success if failed is None else failure
        # Every lease the branch names is live, or nothing is written.
        leases = {lease: self._live_lease(lease) for lease in leases_of(branch)}
        revision = self._revision + 1  # taken only if the branch changes anything
        now = self._clock()
        changed: list[tuple[str, Optional[Entry]]] = []  # (key, what a set wrote)
        results: list[TxnOutcome] = []
        for operation in branch:
            if isinstance(operation, TxnGet):
                results.append(GotKey.of(operation.key, self._live(operation.key)))
            elif isinstance(operation, TxnSet):
                expires_at = expiry_of(operation.ttl, now)
                if operation.lease is not None:
                    expires_at = leases[operation.lease].expires_at
                entry = Entry(operation.val, revision, expires_at)
                self._put(operation.key, entry, operation.lease)
                changed.append((operation.key, entry))
                results.append(SetKey(operation.key, revision))
            elif isinstance(operation, TxnDelete):
                deleted = self._live(operation.key) is not None
                if deleted:  # an expired row stays, for the purge to report
                    self._remove(operation.key)
                    changed.append((operation.key, None))
                results.append(DeletedKey(operation.key, deleted))
            else:
                live_keys = [
                    key for key in self._keys_under(operation.prefix) if self._live(key) is not None
                ]
                for key in live_keys:
                    self._remove(key)
                    changed.append((key, None))
                results.append(DeletedPrefix(operation.prefix, len(live_keys)))
        if changed:
            self._revision = revision
            for key, written in sorted(changed, key=lambda change: change[0]):  # the feed's order
                self._record("delete" if written is None else "set", key, written)
            self._committed()
        return TxnResult(failed is None, self._revision, failed, results)

    def _keys_under(self, prefix: str) -> list[str]:
        """The stored keys (expired ones too) under ``prefix``, in order."""
        if self._sorted is None:
            self._sorted = sorted(self._data)
        keys = self._sorted
        bound = prefix_upper_bound(prefix)
        start = bisect.bisect_left(keys, prefix)
        end = len(keys) if bound is None else bisect.bisect_left(keys, bound, start)
        return keys[start:end]

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
                return Page(page, more=True, revision=self._revision)
            page.append(
                ListedKey(key, entry.version, entry.expires_at, entry.val if values else None)
            )
            value_chars += len(entry.val)
        return Page(page, more=False, revision=self._revision)

    async def purge_expired(self, limit: int) -> int:
        now_ms = self._clock() * 1000
        expired = [
            key
            for key, entry in self._data.items()
            if entry.expires_at is not None
            and entry.expires_at <= now_ms
            and key not in self._key_lease  # expire_leases removes these, a lease at a time
        ][:limit]
        if not expired:
            return 0
        self._revision += 1
        for key in sorted(expired):
            self._remove(key)
            self._record("expire", key)
        self._committed(0)
        return len(expired)

    async def grant_lease(self, ttl: float) -> Lease:
        lease = Lease(new_lease_id(), ttl, lease_expiry(ttl, self._clock()))
        self._leases[lease.id] = lease
        self._lease_keys[lease.id] = set()
        return lease

    async def keepalive_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> Lease:
        return the_one_renewed(lease, await self.keepalive_leases([lease], may_write))

    async def keepalive_leases(
        self, leases: Sequence[str], may_write: Optional[MayWrite] = None
    ) -> list[Lease]:
        now = self._clock()
        live = []
        for lease in leases:
            try:
                live.append(self._live_lease(lease))
            except LeaseNotFound:
                continue
        if may_write is not None:
            self._judge([key for found in live for key in self._lease_keys[found.id]], may_write)
        renewed = []
        for found in live:
            kept = Lease(found.id, found.ttl, lease_expiry(found.ttl, now))
            self._leases[found.id] = kept
            for key in self._lease_keys[found.id]:
                self._data[key] = self._data[key]._replace(expires_at=kept.expires_at)
            renewed.append(kept)
        return renewed

    async def lease_keys(self, lease: str) -> LeaseKeys:
        return LeaseKeys(self._live_lease(lease), sorted(self._lease_keys[lease]))

    async def revoke_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> int:
        self._live_lease(lease)
        if may_write is not None:
            self._judge(self._lease_keys[lease], may_write)
        return self._end_lease(lease, "delete")

    @staticmethod
    def _judge(keys: Iterable[str], may_write: MayWrite) -> None:
        ordered = sorted(keys)
        if not may_write(ordered):
            raise KeysRefused(ordered)

    def _end_lease(self, lease: str, kind: ChangeType) -> int:
        """Drop the lease and its keys, in one revision of ``kind`` changes if it had any."""
        keys = sorted(self._lease_keys[lease])
        for key in keys:
            self._remove(key)
        del self._leases[lease], self._lease_keys[lease]
        if keys:
            self._revision += 1
            for key in keys:
                self._record(kind, key)
            self._committed(0 if kind == "expire" else 1)
        return len(keys)

    async def expire_leases(self, limit: int) -> int:
        now_ms = self._clock() * 1000
        # In the order every store takes them: by expiry, then id.
        expired = sorted(
            (lease.expires_at, lease.id)
            for lease in self._leases.values()
            if lease.expires_at <= now_ms
        )[:limit]
        for _, lease_id in expired:
            self._end_lease(lease_id, "expire")
        return len(expired)

    async def live_leases(self) -> int:
        now_ms = self._clock() * 1000
        return sum(lease.expires_at > now_ms for lease in self._leases.values())

    async def create_token(self, token: Token) -> None:
        if token.name in self._tokens:
            raise TokenExists(token.name)
        self._tokens[token.name] = token
        self._tokens_generation += 1

    async def tokens(self) -> Sequence[Token]:
        return [self._tokens[name] for name in sorted(self._tokens)]

    async def token_by_hash(self, secret_hash: str) -> Optional[Token]:
        return next(
            (
                token
                for token in self._tokens.values()
                if secret_hash in (token.secret_hash, token.previous_hash)
            ),
            None,
        )

    async def rotate_token(
        self, name: str, secret_hash: str, previous_until: Optional[int]
    ) -> Token:
        token = self._tokens.get(name)
        if token is None:
            raise TokenNotFound(name)
        rotated = dataclasses.replace(
            token,
            secret_hash=secret_hash,
            previous_hash=None if previous_until is None else token.secret_hash,
            previous_until=previous_until,
        )
        self._tokens[name] = rotated
        self._tokens_generation += 1
        return rotated

    async def delete_token(self, name: str) -> bool:
        if self._tokens.pop(name, None) is None:
            return False
        self._tokens_generation += 1
        return True

    async def touch_tokens(self, used: Mapping[str, int]) -> None:
        for name, used_at in used.items():
            token = self._tokens.get(name)
            if token is not None and (token.last_used_at or 0) < used_at:
                self._tokens[name] = dataclasses.replace(token, last_used_at=used_at)

    async def tokens_generation(self) -> int:
        return self._tokens_generation

    async def revision(self) -> int:
        return self._revision

    async def changes(self, prefix: str, since: int, limit: int) -> Changes:
        gaps = [gap for gap in self._gaps if gap.resumed_at > since]
        check_since(since, self._revision, self._compact_revision, gaps)
        start = bisect.bisect_right(self._history_revisions, since)
        matching = (
            self._history[index]
            for index in range(start, len(self._history))
            if self._history[index].key.startswith(prefix)
        )
        events, more = take_changes(matching, limit)
        return Changes(events, self._revision, more, self._compact_revision, gaps)

    async def trim_history(self, max_age: float, max_rows: int, batch: int) -> int:
        policy = TrimPolicy(max_age, max_rows, batch)
        now_ms = self._clock() * 1000
        self._marks.append((now_ms, self._revision))
        cutoff = policy.cutoff(now_ms)
        aged = [mark for mark in self._marks if mark[0] <= cutoff]
        if aged:
            del self._marks[: len(aged) - 1]
        oldest = self._history_revisions[:batch]
        cut = policy.cut(
            oldest, self._compact_revision, len(self._history), aged[-1][1] if aged else None
        )
        self._compact_revision = cut
        # A since below the compact revision is answered "compacted" before any gap counts.
        self._gaps = [gap for gap in self._gaps if gap.resumed_at > cut]
        dropped = bisect.bisect_right(self._history_revisions, cut)
        del self._history[:dropped], self._history_revisions[:dropped]
        if dropped:
            self._revisions.poke()  # the feed's tail learns the compact revision as it moved
        return dropped

    async def history(self) -> HistoryStats:
        return HistoryStats(len(self._history), self._compact_revision)

    async def listen(self, wake: Wake) -> None:
        # No other process shares this store: its own commits are all there is to hear.
        with self._revisions.listening(wake):
            wake()
            await asyncio.Event().wait()

    async def load(self, source: BulkSource, replace: Optional[str] = None) -> Optional[Loaded]:
        # Staged in a dict of their own (last wins), then applied without a pause in between,
        # so that no other write comes between the first key applied and the last.
        staged: dict[str, tuple[str, Optional[int]]] = {}
        applied = 0
        async for batch in source.batches():
            for key, val, expires_at in batch:
                staged[key] = (val, expires_at)
            applied += len(batch)
        removed = []
        if replace is not None:
            removed = [key for key in self._keys_under(replace) if key not in staged]
        if not applied and not removed:
            return Loaded(0, 0, self._revision)
        self._revision = life_start(self._revision + 1, self._clock())
        for key in removed:
            self._remove(key)
        data, revision = self._data, self._revision
        for key, (val, expires_at) in staged.items():
            data[key] = Entry(val, revision, expires_at)
            if key in self._key_lease:  # a loaded row has no lease
                self._attach(key, None)
        self._sorted = None
        self._compact_revision = self._revision  # a bulk load, not events: watchers list again
        self._committed()
        return Loaded(applied, len(removed), self._revision)

    @contextlib.asynccontextmanager
    async def export(self, prefix: str) -> AsyncIterator[_Snapshot]:
        # The entries are immutable tuples: the snapshot holds references, not copies.
        now_ms = self._clock() * 1000
        rows = []
        for key in self._keys_under(prefix):
            entry = self._data[key]
            if entry.expires_at is None or entry.expires_at > now_ms:
                rows.append(BulkRow(key, entry.val, entry.expires_at))
        yield _Snapshot(self._revision, rows)

    async def seed_fingerprint(self) -> Optional[str]:
        return None

    async def count(self) -> int:
        return len(self._data)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._sorted = []


class _Snapshot:
    """The rows an export read at once, handed out a batch at a time."""

    def __init__(self, revision: int, rows: list[BulkRow]) -> None:
        self.revision = revision
        self._rows = rows

    async def batches(self) -> AsyncIterator[list[BulkRow]]:
        for batch in batched(self._rows):
            yield batch
