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
  its row may stay until purge_expired removes it. Only the purge removes an expired row: a
  delete that finds one changes nothing, and the purge reports the key as expired.

The history, the same in every store: each commit that takes a revision records its changes
in the same transaction, one Change per key (a set, a delete, or an expiry the purge
removed), so that what the feed shows is committed and whatever committed is in it. The
history is complete above its compact revision: trim_history moves that up as it drops old
changes, and a bulk load (a seed or an import), not a stream of events, moves it to its own
revision.
A change carries no time: each pass of trim_history marks the revision it found with the time
it ran, and a change is old once a mark at or above its revision is (so it goes at most one
pass after it has aged).

A revision names one history, forever: the same number never stands for two different writes,
across restarts, restores, moves and failovers. Each life of a store (a memory store's start,
every opening of a sqlite file, a PostgreSQL server that restarted, was restored or failed over,
and every bulk load) begins at ``life_start``: above the revision it had, and at least the clock
in microseconds. Within a life the revision grows by one per commit, far slower than that clock,
so a life never reaches the numbers of a later one. The numbers a new life skips are a Gap: never
given to a write here, they answer UnknownRevision (a watcher holding one followed another
history), and a bulk load marks everything below its revision compacted (see check_since).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Literal,
    NamedTuple,
    Optional,
    Protocol,
    TypeVar,
    Union,
)

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
    keys after the last one match too. ``revision`` is the store's revision the page was read
    at: a watcher that starts there misses nothing the page does not show."""

    keys: Sequence[ListedKey]
    more: bool
    revision: int


class BulkRow(NamedTuple):
    """A row of a bulk load or an export: a key, its value, and its expiry (ms) or None."""

    key: str
    val: str
    expires_at: Optional[int] = None


# What a bulk load takes: a BulkRow, or a plain tuple of the same (a query's row, which costs
# nothing to make; a BulkRow of a million rows costs most of a second).
LoadRow = tuple[str, str, Optional[int]]


@dataclass(frozen=True)
class Loaded:
    """What a bulk load did: the rows it applied (a key's earlier rows included), the keys a
    replace removed, and the revision they took (the store's unchanged one when nothing
    changed)."""

    applied: int
    removed: int
    revision: int


class Snapshot(Protocol):
    """An export: the live keys under a prefix as of one revision, in key order, however long
    reading them takes."""

    revision: int

    def batches(self) -> AsyncIterator[Sequence[LoadRow]]:
        """The rows, a batch at a time; a batch holds about EXPORT_BATCH_CHARS of values."""


# An export's batch: at most about this many rows, and it stops once its values pass
# EXPORT_BATCH_CHARS, so that a batch of large values is a few MiB, not hundreds. The server
# turns a batch into lines between two turns of its loop: about a millisecond, so
# that the requests waiting meanwhile are not held up for long (bench/bulk.py).
EXPORT_BATCH_ROWS = 128
EXPORT_BATCH_CHARS = 1 << 20


# --- the history ------------------------------------------------------------------------------

ChangeType = Literal["set", "delete", "expire"]


class Change(NamedTuple):
    """One key's change in one revision: a set (with the value and expiry it set), a delete,
    or an expiry (the purge removed the key because its time ran out)."""

    revision: int
    type: ChangeType
    key: str
    val: Optional[str] = None
    expires_at: Optional[int] = None


class Gap(NamedTuple):
    """Revisions no write of this store was given: those above ``forked_at`` and below
    ``resumed_at``, skipped when a new life began at ``resumed_at`` (see the module
    docstring)."""

    forked_at: int
    resumed_at: int


def life_start(revision: int, now: float) -> int:
    """Where a new life of a store begins, its next write taking one more: at ``revision`` or
    above, and at least ``now`` (seconds since the epoch) in microseconds. The numbers in
    between, if any, are a Gap."""
    return max(revision, int(now * 1_000_000))


@dataclass(frozen=True)
class Changes:
    """An answer of ``Store.changes``: ``events`` in revision order (a revision's keys in
    UTF-8 byte order), never ending inside a revision. With ``more`` False, they are every
    change up to ``revision``, the store's revision when they were read; with ``more`` True,
    the limit, or their values' size, cut them short after their last revision.

    ``compact_revision`` and ``gaps`` (those ending above ``since``) are what check_since
    decided by, for a reader that keeps a copy of the history (the feed's tail) to decide as
    the store does."""

    events: Sequence[Change]
    revision: int
    more: bool
    compact_revision: int = 0
    gaps: Sequence[Gap] = ()


@dataclass(frozen=True)
class HistoryStats:
    """How much history a store keeps: its rows, and the revision above which it is whole."""

    rows: int
    compact_revision: int


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


# --- leases -----------------------------------------------------------------------------------
#
# A lease is a time to live that its holder renews (keepalive); a key set with a lease lives
# exactly as long as it. Every store keeps a leased key's expires_at equal to its lease's (a
# set with a lease copies it, a keepalive moves both without a revision), so that the rules of
# expiry above hold for leased keys unchanged: a read never sees a key of an expired lease. The
# ordinary purge leaves leased keys alone; expire_leases removes each expired lease with all of
# its keys in one revision of ``expire`` changes, and revoke_lease with ``delete`` changes.


@dataclass(frozen=True)
class Lease:
    """A lease: its id, its time to live in seconds, and its expiry (ms since the epoch)."""

    id: str
    ttl: float
    expires_at: int


@dataclass(frozen=True)
class LeaseKeys:
    """A live lease and its keys, in ascending order of their UTF-8 bytes."""

    lease: Lease
    keys: Sequence[str]


def lease_expiry(ttl: float, now: float) -> int:
    """A lease's expiry, in ms since the epoch, when it is granted or renewed at ``now``."""
    return round((now + ttl) * 1000)


# Whether the caller may write every one of a lease's keys (access.py's grant judges): asked
# by a keepalive or a revoke inside its transaction, with the keys the lease has at that
# moment, so that no key attached between a check and the write escapes the check.
MayWrite = Callable[[Sequence[str]], bool]


class KeysRefused(Exception):
    """A keepalive or revoke was declined: ``may_write`` refused the lease's keys, ``keys``
    (all of them, in order). Nothing was written. An answer, not a failure of the store."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__("the caller may not write every key of the lease")
        self.keys = keys


def the_one_renewed(lease: str, renewed: Sequence[Lease]) -> Lease:
    """keepalive_lease's answer from keepalive_leases': the lease, or LeaseNotFound."""
    if not renewed:
        raise LeaseNotFound(lease)
    return renewed[0]


def new_lease_id() -> str:
    """A lease's id: 16 random bytes in hex, which no client can guess."""
    return secrets.token_hex(16)


def leases_of(operations: Sequence[TxnOperation]) -> list[str]:
    """The leases the sets of a branch name, each once, in order."""
    return list(
        dict.fromkeys(
            operation.lease
            for operation in operations
            if isinstance(operation, TxnSet) and operation.lease is not None
        )
    )


# --- access tokens --------------------------------------------------------------------------
# Scoped access tokens (access.py judges requests by them; tokens.py manages them) are kept in
# the store, so that every worker and replica shares them: never a secret, only its SHA-256
# in hex (a secret is 256 random bits, which a fast hash protects as well as a slow one).
# They are no keys: no revision, no change event, no export. Times are ms since the epoch.

TokenAccess = Literal["read", "readwrite"]


@dataclass(frozen=True)
class TokenRule:
    """Access to every key that starts with ``prefix`` ("" covers every key)."""

    prefix: str
    access: TokenAccess


@dataclass(frozen=True)
class Token:
    """A token as stored. ``previous_hash`` is the secret a rotation replaced, which works
    until ``previous_until`` (a rotation's grace period); the caller judges both expiries."""

    name: str
    secret_hash: str
    rules: tuple[TokenRule, ...]
    admin: bool
    created_at: int
    expires_at: Optional[int] = None
    last_used_at: Optional[int] = None
    previous_hash: Optional[str] = None
    previous_until: Optional[int] = None


class TokenExists(Exception):
    """A token of that name exists already; nothing was written."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class TokenNotFound(Exception):
    """No token has that name; nothing was written."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def rules_json(rules: Sequence[TokenRule]) -> str:
    """A token's rules as the durable stores keep them: JSON text, a list of
    ``{"prefix", "access"}`` in the token's order."""
    return json.dumps([{"prefix": rule.prefix, "access": rule.access} for rule in rules])


def rules_of(text: str) -> tuple[TokenRule, ...]:
    """The rules that ``rules_json`` wrote."""
    return tuple(TokenRule(rule["prefix"], rule["access"]) for rule in json.loads(text))


# A token's columns in the durable stores, in the order of Token's fields (see token_of).
TOKEN_COLUMNS = (
    "name, secret_hash, rules, admin, created_at, expires_at, last_used_at, previous_hash,"
    " previous_until"
)


def token_of(row: Sequence[Any]) -> Token:
    """A Token from a row of TOKEN_COLUMNS."""
    name, secret_hash, rules, admin, *times = row
    return Token(name, secret_hash, rules_of(rules), bool(admin), *times)


def token_row(token: Token) -> tuple[Any, ...]:
    """The row of TOKEN_COLUMNS that stores ``token`` (token_of reads it back)."""
    return (
        token.name,
        token.secret_hash,
        rules_json(token.rules),
        token.admin,
        token.created_at,
        token.expires_at,
        token.last_used_at,
        token.previous_hash,
        token.previous_until,
    )


# --- transactions ---------------------------------------------------------------------------

CompareOperator = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True)
class CompareVersion:
    """Holds when the key's live version (0 when it has none) compares to ``version`` so."""

    key: str
    version: int
    cmp: CompareOperator = "="


@dataclass(frozen=True)
class CompareValue:
    """Holds when the key's live value equals ``value`` (``=``) or does not (``!=``); a key
    without one equals nothing."""

    key: str
    value: str
    cmp: Literal["=", "!="] = "="


@dataclass(frozen=True)
class CompareExists:
    """Holds when the key has a live value (``exists`` True) or has none (False)."""

    key: str
    exists: bool


Compare = Union[CompareVersion, CompareValue, CompareExists]


def compare_holds(compare: Compare, live: Optional[Entry]) -> bool:
    """Whether ``compare`` holds for a key that holds ``live`` (None: missing or expired)."""
    if isinstance(compare, CompareExists):
        return (live is not None) == compare.exists
    if isinstance(compare, CompareValue):
        equal = live is not None and live.val == compare.value
        return equal if compare.cmp == "=" else not equal
    version = 0 if live is None else live.version
    if compare.cmp == "=":
        return version == compare.version
    if compare.cmp == "!=":
        return version != compare.version
    if compare.cmp == "<":
        return version < compare.version
    return version > compare.version


def first_failing(
    compares: Sequence[Compare], live: Callable[[str], Optional[Entry]]
) -> Optional[int]:
    """The index of the first of ``compares`` that does not hold, ``live`` giving what each
    key holds; None when all hold."""
    for index, compare in enumerate(compares):
        if not compare_holds(compare, live(compare.key)):
            return index
    return None


@dataclass(frozen=True)
class TxnGet:
    key: str


@dataclass(frozen=True)
class TxnSet:
    """A set; with ``lease``, the key lives as long as that lease (never both with ``ttl``)."""

    key: str
    val: str
    ttl: Optional[float] = None
    lease: Optional[str] = None


@dataclass(frozen=True)
class TxnDelete:
    key: str


@dataclass(frozen=True)
class TxnDeletePrefix:
    """Every live key that starts with ``prefix``."""

    prefix: str


TxnOperation = Union[TxnGet, TxnSet, TxnDelete, TxnDeletePrefix]


@dataclass(frozen=True)
class GotKey:
    """A get's result: the key's live value and version, both None when it has none."""

    key: str
    val: Optional[str]
    version: Optional[int]

    @classmethod
    def of(cls, key: str, live: Optional[Entry]) -> GotKey:
        """What a get of ``key`` gives when it holds ``live`` (None: nothing live)."""
        return cls(key, None, None) if live is None else cls(key, live.val, live.version)


@dataclass(frozen=True)
class SetKey:
    """A set's result: the key's new version, the transaction's revision."""

    key: str
    version: int


@dataclass(frozen=True)
class DeletedKey:
    key: str
    deleted: bool


@dataclass(frozen=True)
class DeletedPrefix:
    prefix: str
    deleted: int


TxnOutcome = Union[GotKey, SetKey, DeletedKey, DeletedPrefix]


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did: whether every compare held (``failed``, the index of the first
    that did not, when not), the store's revision after it (the transaction's own when its
    branch changed anything), and one result per operation of the branch that ran."""

    succeeded: bool
    revision: int
    failed: Optional[int]
    results: Sequence[TxnOutcome]


# --- the history, store-neutral ----------------------------------------------------------------


def check_since(since: int, revision: int, compact_revision: int, gaps: Iterable[Gap] = ()) -> None:
    """What ``since`` means to a history at ``revision``, whole above ``compact_revision``,
    that skipped ``gaps``: nothing when it can answer the changes after it; Compacted when
    they are no longer kept; UnknownRevision when ``since`` is ahead of it, or one of the
    numbers a new life skipped (so never this history's). Every store, and the feed's tail,
    decide by this one function."""
    if since < compact_revision:
        raise Compacted(compact_revision)
    if since > revision or any(gap.forked_at < since < gap.resumed_at for gap in gaps):
        raise UnknownRevision(revision)


class _Revisioned(Protocol):
    @property
    def revision(self) -> int: ...


AnyChange = TypeVar("AnyChange", bound=_Revisioned)


def value_chars(change: Change) -> int:
    return 0 if change.val is None else len(change.val)


def take_changes(
    changes: Iterable[AnyChange],
    limit: int,
    size: Callable[[AnyChange], int] = value_chars,  # type: ignore[assignment]
) -> tuple[list[AnyChange], bool]:
    """The first of ``changes`` (in revision order): ``limit`` of them, or fewer once their
    ``size`` (their values' characters) passes PAGE_VALUE_CHARS, then the rest of the last
    one's revision; and whether any follow. Only what it takes is read from ``changes``, and
    one more."""
    events: list[AnyChange] = []
    taken = 0
    for change in changes:
        if (
            events
            and change.revision != events[-1].revision
            and (len(events) >= limit or taken > PAGE_VALUE_CHARS)
        ):
            return events, True
        events.append(change)
        taken += size(change)
    return events, False


# --- errors -----------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of the errors a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store cannot serve the operation now (disk full, read-only, locked)."""


class StoreCorrupt(StoreError):
    """The data file is damaged or belongs to something else; it is left untouched."""


class HistoryGone(Exception):
    """The changes asked for are not in the history: an answer (410), not a store failure."""


class Compacted(HistoryGone):
    """The changes after ``since`` were dropped: the history is whole above
    ``compact_revision`` only."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__("the history before this revision is gone")
        self.compact_revision = compact_revision


class UnknownRevision(HistoryGone):
    """``since`` is not a revision of this store's: above its revision (the store was
    replaced or restored), or in a Gap that a new life skipped."""

    def __init__(self, revision: int) -> None:
        super().__init__("the store has no such revision")
        self.revision = revision


class LeaseNotFound(Exception):
    """The lease named does not exist: never granted, revoked, or expired (even if the
    upkeep has not removed it yet). Nothing was written. An answer, not a failure of the
    store."""

    def __init__(self, lease: str) -> None:
        super().__init__("no such lease")
        self.lease = lease


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
# Told that the store's revision may have moved (see Store.listen).
Wake = Callable[[], None]


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
        lease: Optional[str] = None,
    ) -> Entry:
        """Store ``val`` under ``key`` (expiring after ``ttl`` seconds, or never, or with
        ``lease`` when its lease does: never both) if ``condition`` holds, else raise
        PreconditionFailed; LeaseNotFound when the lease is not live. Returns what the key now
        holds. Once this returns, the write is as durable as promised. A set without a lease
        detaches the key from any it had."""

    async def delete(self, key: str, condition: Optional[Condition] = None) -> bool:
        """Remove ``key`` if ``condition`` holds (else PreconditionFailed); True when it had a
        live value."""

    async def set_many(self, items: Sequence[SetItem]) -> int:
        """Set every item in one transaction, all or nothing, in order (the last item for a key
        wins); returns the revision they all share."""

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Remove every key in one transaction (one revision, if any had a live value);
        returns how many had a live value."""

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOperation],
        failure: Sequence[TxnOperation],
    ) -> TxnResult:
        """Evaluate ``compares`` in order, then run ``success`` if all hold, else ``failure``,
        in order (an operation sees what the earlier ones did), all in one transaction: one
        revision for every change of the branch, recorded in the history at it (none taken
        when the branch changes nothing). A missing or expired key compares as having no
        value and version 0. The caller refuses a branch that writes a key twice (a prefix
        delete writing the keys it covers). LeaseNotFound, with nothing written, when a set
        of the branch that runs names a lease that is not live."""

    async def grant_lease(self, ttl: float) -> Lease:
        """A new lease that expires ``ttl`` seconds from now; takes no revision."""

    async def keepalive_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> Lease:
        """Renew the lease, and its keys' expiry, to ``ttl`` seconds from now: no revision,
        no change. LeaseNotFound when it is not live; KeysRefused, with nothing written,
        when ``may_write`` refuses its keys."""

    async def keepalive_leases(
        self, leases: Sequence[str], may_write: Optional[MayWrite] = None
    ) -> list[Lease]:
        """Renew each live lease of ``leases`` (distinct ids) as keepalive_lease does, all in
        one transaction; the renewed ones, in the order asked. Those not live are left out.
        KeysRefused, with nothing written, when ``may_write`` refuses the keys of any."""

    async def lease_keys(self, lease: str) -> LeaseKeys:
        """The live lease and its keys; LeaseNotFound when it is not live."""

    async def revoke_lease(self, lease: str, may_write: Optional[MayWrite] = None) -> int:
        """Remove the live lease and its keys, in one revision of ``delete`` changes (none
        when it had no keys); how many keys. LeaseNotFound when it is not live; KeysRefused,
        with nothing written, when ``may_write`` refuses its keys."""

    async def expire_leases(self, limit: int) -> int:
        """Remove up to ``limit`` expired leases, in order of expiry then id, each with its
        keys in one revision of ``expire`` changes (none for a lease without keys); how many
        leases. Of several at
        once, one removes (and reports) a lease."""

    async def live_leases(self) -> int:
        """How many leases are live, for metrics."""

    async def create_token(self, token: Token) -> None:
        """Store a new token; TokenExists when its name is taken. Bumps the generation."""

    async def tokens(self) -> Sequence[Token]:
        """Every token, in ascending order of name."""

    async def token_by_hash(self, secret_hash: str) -> Optional[Token]:
        """The token whose secret, or whose previous secret, has this hash (whether it has
        expired or not: the caller judges); None when none has."""

    async def rotate_token(
        self, name: str, secret_hash: str, previous_until: Optional[int]
    ) -> Token:
        """Give the token a new secret; the one it replaces works until ``previous_until``
        (not at all when None). The token as it is now; TokenNotFound. Bumps the generation."""

    async def delete_token(self, name: str) -> bool:
        """Remove the token; whether there was one. Bumps the generation."""

    async def touch_tokens(self, used: Mapping[str, int]) -> None:
        """Record when each named token was last used (a batch, now and then: not a write
        per request), unless a later use is recorded already (another worker's or replica's
        batch). Names no longer there are skipped. Does not bump the generation."""

    async def tokens_generation(self) -> int:
        """A number that every create, rotation and delete of a token changes, so that a
        cache of tokens (every worker's and replica's) knows when to read them again."""

    async def list_keys(self, prefix: str, after: Optional[str], limit: int, values: bool) -> Page:
        """Up to ``limit`` live keys that start with ``prefix`` and sort after ``after`` (or
        from the first, when None), in ascending order of their UTF-8 bytes. With
        ``values``, the page stops early once its values pass PAGE_VALUE_CHARS."""

    async def purge_expired(self, limit: int) -> int:
        """Remove up to ``limit`` expired rows of keys without a lease (expire_leases takes
        the others), recording each as an ``expire`` change; how many were removed. One
        revision for them all, if any. Of several purges at once, one removes (and reports) a
        key."""

    async def revision(self) -> int:
        """The store's revision now."""

    async def changes(self, prefix: str, since: int, limit: int) -> Changes:
        """The changes to keys starting with ``prefix`` in revisions above ``since``, as
        take_changes cuts them, with the gaps ending above ``since``. Raises what check_since
        raises: Compacted when ``since`` is below the compact revision, UnknownRevision when
        it is not one of the store's (ahead of it, or in a gap)."""

    async def trim_history(self, max_age: float, max_rows: int, batch: int) -> int:
        """One small transaction of trimming: mark the store's revision with the time now (see
        the module docstring), then drop up to about ``batch`` of the oldest changes that are
        older than ``max_age`` seconds, are beyond the newest ``max_rows``, or are at or below
        the compact revision, whole revisions at a time, and move the compact revision up to
        the last one dropped; how many rows were dropped. When it dropped any, the listener is
        woken (see listen), so that the feed's tail learns the new compact revision."""

    async def history(self) -> HistoryStats:
        """The history's size and compact revision, for metrics."""

    async def listen(self, wake: Wake) -> None:
        """Call ``wake`` whenever the revision may have moved: once at the start, at once
        after this process's commits (and its trims), and soon after another process's
        commits. Runs until cancelled."""

    async def load(self, source: BulkSource, replace: Optional[str] = None) -> Optional[Loaded]:
        """Apply the source's rows in order (last wins, one revision for all, no changes
        recorded: the compact revision moves to the load's, which begins a life, at
        life_start above the store's) all at once or not at all: the
        seed and the import. With ``replace``, a prefix ("" for the whole store), the live and
        expired keys under it that the source lacks are removed in the same transaction.

        The rows are staged as they come (never all in memory, holding no lock that other
        writes wait for) and applied in one transaction at the end; a failure or a
        cancellation before then leaves the store as it was. With the source's fingerprint
        (a seed's), None, applying nothing, when the store already holds a seed of that
        fingerprint: checked inside the same transaction, so that of several servers
        starting at once, one applies it; else the fingerprint is remembered with the rows."""

    def export(self, prefix: str) -> AbstractAsyncContextManager[Snapshot]:
        """A consistent snapshot of the live keys under ``prefix``, open until the context
        ends: a write is wholly in it (its revision is at most the snapshot's) or wholly out."""

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


class BulkSource(Protocol):
    """The rows of a bulk load (``batches``) and a seed's fingerprint (None for an import).
    Every key and value is valid text without NUL, within the limits: the source checked it.
    A failure while ``batches`` runs (a bad line, a client gone) aborts the load. A store
    may take some sources faster (the sqlite store: store.sqlite.SqlSeedSource)."""

    @property
    def fingerprint(self) -> Optional[str]: ...

    def batches(self) -> AsyncIterator[Sequence[LoadRow]]:
        """The rows to apply, in order, a batch at a time; the last one for a key wins."""
