"""The change feed's hub: this process's copy of the store's newest changes, shared by every
watcher it serves.

The store's history is the truth; the hub holds its tail. Whenever the store may have moved
(``Store.listen`` says so: this process's commits at once, other workers' and replicas' soon
after), one refresh reads the changes after the hub's revision, for every watcher at once, and
wakes the watchers whose prefix they touch. A watcher whose position is in the tail reads it
from memory; one behind it (resuming, or slower than the rest) reads the store, a page at a
time, until it is in the tail again. So a change costs one query per process, however many
watch.

Each change is encoded once, as the JSON object the API sends (``Event.data``).

The tail answers exactly what the store would: what a ``since`` means (kept, compacted, in a
gap a new life of the store skipped, or ahead) is decided by the store's own check_since, on
the compact revision and gaps that each refresh brings. A refresh that finds the tail's
revision gone from the store (a failover to a copy that lacked it, an import) begins the tail
again, and every stream on it reads on from the store, which tells it to list again.

The hub owns every stream's position (``Stream.position``): only its reads move it. Streams
take the fast way once they have caught up with the tail: they park on the hub (``follow``),
and each refresh hands its events to the ``Pusher`` once per prefix for all the parked streams
of that prefix, which writes them to their connections there and then. A thousand streams so
cost one encoding and a thousand writes per refresh, not a thousand tasks woken to read and
write the same bytes. A parked stream whose connection cannot take the new events within its
backlog goes back to its handler, which writes them as the watcher takes them (flow control).
A stream behind the tail, a long-poll, and a stream on a connection that cannot take direct
writes wait instead (``wait``) and read for themselves.

The hub also sweeps its streams: it ends the wait of one whose connection is gone, closes one
whose watcher has taken nothing of what waits for it for a heartbeat interval (``_stalled``: so
that no consumer that stopped reading makes the server hold its backlog for ever, while one
that is merely slower than the writers is never cut off), and has the Pusher write a heartbeat
to a parked one that has been idle for the heartbeat interval.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

import orjson
import structlog

from .errors import safe_message
from .models import MAX_EVENTS
from .protocol import unsent_bytes
from .rules import rfc3339
from .store.base import (
    Change,
    Changes,
    Gap,
    HistoryGone,
    Store,
    StoreError,
    check_since,
    take_changes,
)

log = structlog.get_logger("kv.feed")

# Changes read by one refresh query; a refresh goes on until it has them all.
REFRESH_LIMIT = 1000
# The tail's size, in bytes of encoded events: past it, the oldest revisions are dropped.
TAIL_BYTES = 8 * 1024 * 1024
# After a refresh failed (the store is unavailable), the pause before the next try.
REFRESH_RETRY = 0.5
# Between the starts of two refreshes, at least: under a stream of writes the changes of that
# time go out together, one write to each stream instead of one per change (a write to a
# socket is most of a stream's cost: bench/results.md). After a quiet spell, a change is read
# at once.
REFRESH_INTERVAL = 0.02
# Between two sweeps of the open streams, at most.
SWEEP_INTERVAL = 1.0


class Event(NamedTuple):
    """A change as /changes sends it: ``data`` is its JSON object, ``chars`` its value's
    characters (what the store sizes an answer by: take_changes)."""

    revision: int
    type: str
    key: str
    data: bytes
    chars: int


def value_chars(event: Event) -> int:
    return event.chars


def encode(change: Change) -> Event:
    body: dict[str, object] = {"revision": change.revision, "type": change.type, "key": change.key}
    if change.type == "set":
        body["val"] = change.val
        body["expires_at"] = None if change.expires_at is None else rfc3339(change.expires_at)
    chars = 0 if change.val is None else len(change.val)
    return Event(change.revision, change.type, change.key, orjson.dumps(body), chars)


class Position(NamedTuple):
    """Where a watcher is: every change under its prefix up to ``revision``; or, with
    ``taken`` above 0, those before ``revision`` and the first ``taken`` of its own (a stream
    cut inside a revision resumes there: an event's id says so, as 17.2)."""

    revision: int
    taken: int = 0

    @property
    def since(self) -> int:
        """The revision to read the history after, from here."""
        return self.revision - 1 if self.taken else self.revision


@dataclass(frozen=True)
class Batch:
    """Events for a watcher, as Store.changes answers: with ``more`` False, every change under
    its prefix up to ``revision``. ``next`` is where the watcher goes on from (``revision``,
    or the last event's when the answer was cut short); ``taken`` how many of the first
    revision's events the watcher had before these."""

    events: Sequence[Event]
    revision: int
    more: bool
    next: int
    taken: int = 0


def encode_all(changes: Changes) -> Batch:
    events = [encode(change) for change in changes.events]
    return _batch(events, changes.revision, changes.more)


def _batch(events: Sequence[Event], revision: int, more: bool) -> Batch:
    return Batch(events, revision, more, events[-1].revision if more else revision)


def _to_read(position: Position, limit: int) -> int:
    """How many events to read after ``position.since`` for an answer of ``limit`` events: the
    ``taken`` events of ``position.revision`` that the watcher had come first, and _from drops
    them. They count up to MAX_EVENTS: a place deep inside a bigger revision (read whole
    anyway) may then get fewer than ``limit`` events, with ``more``, rather than a client's
    claim of one making a read reach far past it."""
    return limit + min(position.taken, MAX_EVENTS)


def _from(position: Position, batch: Batch, limit: int) -> Batch:
    """``batch`` (read after ``position.since``, ``_to_read`` events of it) without the events
    the watcher had, and no more than ``limit`` events after them but to finish a revision.

    A watcher's claim to have had ``taken`` events of ``position.revision`` may be more than
    the revision has under its prefix (an id of another prefix's stream, say): what it had
    is then the whole revision, the read's extra events must not stretch the answer past
    ``limit``, and the next revision's events are numbered from its start."""
    events = batch.events
    taken = 0
    while (
        taken < position.taken
        and taken < len(events)
        and events[taken].revision == position.revision
    ):
        taken += 1
    rest, more, after = events[taken:], batch.more, batch.next
    if len(rest) > limit:
        end = limit
        while end < len(rest) and rest[end].revision == rest[end - 1].revision:
            end += 1  # a revision is never split
        if end < len(rest):
            rest, more, after = rest[:end], True, rest[end - 1].revision
    within = bool(rest) and rest[0].revision == position.revision
    return Batch(rest, batch.revision, more, after, taken if within else 0)


class StreamTransport(Protocol):
    """What the feed needs of a stream's connection: asyncio's transport methods (uvloop's
    transports have them without deriving from asyncio's classes)."""

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...

    def set_write_buffer_limits(
        self, high: Optional[int] = None, low: Optional[int] = None
    ) -> None: ...

    def abort(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class Stream:
    """A stream open on the feed: its connection and prefix, where it is (``position``, which
    only the feed moves), what it has written (bytes, and when last: the loop's clock), how
    much of that its watcher has taken and since when (for ``ChangeFeed._stalled``), and the
    wait it is in, parked or not."""

    __slots__ = (
        "future",
        "gone",
        "last_write",
        "passed",
        "passing_at",
        "position",
        "prefix",
        "transport",
        "written",
    )

    def __init__(self, prefix: str, position: Position) -> None:
        self.transport: Optional[StreamTransport] = None
        self.prefix = prefix
        self.position = position
        self.last_write = 0.0
        self.written = 0
        self.passed = 0  # of ``written``, what the transport had passed on at the last sweep
        self.passing_at = 0.0  # when that last grew
        self.future: Optional[asyncio.Future[bool]] = None
        self.gone = False  # the connection closed: the stream ends

    def wrote(self, size: int, now: float) -> None:
        """``size`` bytes went to the transport at ``now``."""
        self.written += size
        self.last_write = now


class Pusher(Protocol):
    """Writes to parked streams, there and then (it must not wait)."""

    def events(self, events: Sequence[Event], streams: Collection[Stream]) -> list[Stream]:
        """Send ``events`` (whole revisions, under the streams' prefix) to every stream that
        can take them within its backlog; the others, sent nothing, are returned."""

    def progress(self, revision: int, streams: Collection[Stream]) -> None:
        """Send a heartbeat: nothing under the streams' prefix up to ``revision``."""


class ChangeFeed:
    """The hub (see the module docstring). It starts with its first watcher. ``backlog`` is
    the most bytes a stream may leave unread; ``heartbeat`` the most seconds a parked one
    stays silent; ``pusher`` writes to parked streams."""

    def __init__(self, store: Store, backlog: int, heartbeat: float, pusher: Pusher) -> None:
        self._store = store
        self.backlog = backlog
        self.heartbeat = heartbeat
        self._pusher = pusher
        self._streams: set[Stream] = set()
        self._parked: dict[str, set[Stream]] = {}  # by prefix; each at the tail's revision
        self._sweeping: Optional[asyncio.Task[None]] = None
        # The tail: every change in revisions above ``floor`` up to ``revision``, and what the
        # store's last answer said of its history (see check_since).
        self.floor = 0
        self.revision = 0
        self._compact_revision = 0
        self._gaps: list[Gap] = []  # those ending above the floor, in order
        self._events: list[Event] = []
        self._revisions: list[int] = []  # the events' revisions, to bisect
        self._bytes = 0
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}
        self._started: Optional[asyncio.Future[None]] = None
        # The tail holds what it says: floor and revision are set, and the last refresh did
        # not fail. A store that failed may come back without revisions the tail holds (a
        # failover to a standby that lacked them): until a refresh succeeds, ask the store.
        self._ready = False
        self._listening: Optional[asyncio.Task[None]] = None
        self._refreshing: Optional[asyncio.Task[None]] = None
        self._next_refresh: Optional[asyncio.TimerHandle] = None
        self._last_refresh = float("-inf")  # when the last one started (the loop's clock)
        self._stale = False
        # Wakes (news from the store) so far, and how many of them the tail has read: a read
        # that must be current waits until it has read those before it (caught_up).
        self._wakes = 0
        self._read_through = 0
        self._refreshed: Optional[asyncio.Future[bool]] = None  # the running refresh's end
        self.closed = False

    # --- reading ----------------------------------------------------------------------------

    async def revision_now(self) -> int:
        """The store's revision now: where a watcher that gives none begins."""
        return await self._store.revision()

    async def poll(self, prefix: str, position: Position, limit: int) -> Batch:
        """What the store answers now, exact to the moment (a long-poll that does not wait)."""
        since, count = position.since, _to_read(position, limit)
        changes = await self._store.changes(prefix, since, count)
        return _from(position, encode_all(changes), limit)

    async def changes(
        self, prefix: str, position: Position, limit: int, current: bool = False
    ) -> Batch:
        """What Store.changes answers after ``position``, from the tail when it holds it;
        raises what Store.changes raises (HistoryGone, StoreError): the tail decides by the
        same check_since, on what the store last told it. ``current``: first bring the tail
        up to what the store has told of (caught_up), as a watcher's first read does."""
        if current:
            await self.caught_up()
        since = position.since
        if not self._ready or not self.floor <= since <= self.revision:
            return await self.poll(prefix, position, limit)
        check_since(since, self.revision, self._compact_revision, self._gaps)
        start = bisect.bisect_right(self._revisions, since)
        matching = (
            self._events[index]
            for index in range(start, len(self._events))
            if self._events[index].key.startswith(prefix)
        )
        events, more = take_changes(matching, _to_read(position, limit), value_chars)
        return _from(position, _batch(events, self.revision, more), limit)

    async def read(self, stream: Stream, limit: int, current: bool = False) -> Batch:
        """The events after ``stream``'s position (see ``changes``), which moves past them."""
        batch = await self.changes(stream.prefix, stream.position, limit, current)
        stream.position = Position(batch.next)
        return batch

    async def wait(
        self, prefix: str, since: int, timeout: float, stream: Optional[Stream] = None
    ) -> bool:
        """Wait until there may be a change under ``prefix`` above ``since``: True then,
        False after ``timeout`` seconds, when the feed closes, or when the ``stream``'s
        connection is gone."""
        await self.start()
        if self.closed or (stream is not None and stream.gone):
            return False
        if since < self.floor or self._holds_change(prefix, since):
            return True  # the caller reads it now (from the store, when below the tail)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(prefix, set())
        waiters.add(future)
        timer = loop.call_later(timeout, _resolve, future, False)
        if stream is not None:
            stream.future = future
        try:
            return await future
        finally:
            if stream is not None:
                stream.future = None
            timer.cancel()
            waiters.discard(future)
            if not waiters and self._waiters.get(prefix) is waiters:
                del self._waiters[prefix]

    def _holds_change(self, prefix: str, since: int) -> bool:
        start = bisect.bisect_right(self._revisions, since)
        return any(event.key.startswith(prefix) for event in self._events[start:])

    # --- keeping the tail -------------------------------------------------------------------

    async def start(self) -> None:
        """Begin listening to the store, once; the tail begins at its revision now."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                self.floor = self.revision = await self._store.revision()
            except BaseException as error:
                # The next watcher tries again; those waiting on this start get its failure.
                started, self._started = self._started, None
                if isinstance(error, asyncio.CancelledError):
                    started.cancel()
                else:
                    started.set_exception(error)
                    started.exception()  # retrieved here, whoever else awaits it
                raise
            self._ready = True
            self._listening = asyncio.ensure_future(self._listen())
            self._sweeping = asyncio.ensure_future(self._sweep())
            self._started.set_result(None)
        await asyncio.shield(self._started)

    async def _listen(self) -> None:
        while True:
            try:
                await self._store.listen(self._wake)
            except Exception as error:  # StoreError, or a bug: listen again, and say so
                _log_failure("watch_listen_failed", error)
            await asyncio.sleep(REFRESH_RETRY)

    # --- the streams ------------------------------------------------------------------------

    def stream(self, prefix: str, position: Position) -> Stream:
        """A stream of ``prefix``'s changes after ``position``, not yet on a connection: its
        first ``read`` may still be a 410, before anything is sent."""
        return Stream(prefix, position)

    def watch(self, stream: Stream, transport: Optional[StreamTransport]) -> None:
        """Put ``stream`` on ``transport`` (its response has begun), under the feed's sweeps:
        at most ``backlog`` bytes wait for the watcher before its writer waits for it."""
        stream.transport = transport
        if transport is not None:
            transport.set_write_buffer_limits(high=self.backlog)
        stream.passing_at = asyncio.get_running_loop().time()
        self._streams.add(stream)

    def unwatch(self, stream: Stream) -> None:
        self._streams.discard(stream)

    def can_follow(self, stream: Stream) -> bool:
        """Whether ``stream`` has every change up to the tail's revision, and may park."""
        return self._ready and not self.closed and stream.position == (self.revision, 0)

    async def follow(self, stream: Stream) -> bool:
        """Park ``stream`` (see can_follow): the Pusher writes to it from now on. Returns
        False when the stream is to end (the feed closes, its connection is gone), True when
        its handler is to read on from ``stream.position`` (the tail began again, or the
        connection could not take the new events within its backlog)."""
        parked = self._parked.setdefault(stream.prefix, set())
        parked.add(stream)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        stream.future = future
        try:
            return await future
        finally:
            stream.future = None
            parked.discard(stream)
            if not parked and self._parked.get(stream.prefix) is parked:
                del self._parked[stream.prefix]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.heartbeat / 2))
            try:
                self._sweep_once()
            except Exception as error:  # a bug: the next sweep tries again, and it is said
                _log_failure("watch_sweep_failed", error)

    def _sweep_once(self) -> None:
        """End the waits of streams whose connection is gone, close those whose watcher has
        stopped taking what waits for it, and have the Pusher write a heartbeat to parked ones
        idle for its interval (a parked stream has every change up to the tail's revision)."""
        now = asyncio.get_running_loop().time()
        due: list[Stream] = []
        for stream in list(self._streams):
            transport = stream.transport
            if transport is None or transport.is_closing():
                stream.gone = True
                if stream.future is not None:
                    _resolve(stream.future, False)
            elif self._stalled(stream, transport, now):
                log.info(
                    "watcher_too_slow",
                    waiting=unsent_bytes(transport),
                    stalled_for=round(now - stream.passing_at, 1),
                )
                transport.abort()  # its writer, waiting to drain, fails and ends
            elif now - stream.last_write >= self.heartbeat and self._is_parked(stream):
                due.append(stream)
        if due:
            self._pusher.progress(self.revision, due)

    def _stalled(self, stream: Stream, transport: StreamTransport, now: float) -> bool:
        """Whether ``stream``'s watcher has taken none of the bytes waiting for it (in this
        process or in the kernel: protocol.unsent_bytes) for a heartbeat interval: the one
        rule that ends a slow stream. One that takes anything goes on, however slowly; what
        waits for it here is bounded by its backlog, since its writers wait for it past
        that."""
        waiting = unsent_bytes(transport)
        passed = stream.written - waiting
        if not waiting or passed > stream.passed:
            stream.passed, stream.passing_at = passed, now
            return False
        return now - stream.passing_at >= self.heartbeat

    def _is_parked(self, stream: Stream) -> bool:
        return stream in self._parked.get(stream.prefix, ())

    def _unpark(self, stream: Stream, position: Position) -> None:
        """Hand ``stream`` back to its handler, to read on from ``position``."""
        parked = self._parked.get(stream.prefix)
        if parked is not None:
            parked.discard(stream)
        stream.position = position
        if stream.future is not None:
            _resolve(stream.future, True)

    def _push(self, new: Sequence[Event], before: int) -> None:
        """Hand the new events (the tail was at ``before``) to the parked streams, once per
        prefix; a stream that cannot take them within its backlog reads them for itself."""
        full: list[Stream] = []
        for prefix, streams in self._parked.items():
            matching = new if not prefix else [e for e in new if e.key.startswith(prefix)]
            if matching and streams:
                full += self._pusher.events(matching, streams)
        for stream in full:
            self._unpark(stream, Position(before))

    # --- keeping the tail -------------------------------------------------------------------

    async def caught_up(self) -> None:
        """Return once the tail has read every change the store had told of when this was
        called: each write this process acknowledged before, and each other replica's it had
        heard of. So a watcher's first answer holds the writes that were answered before it
        asked, however quickly it asked, and never less than a read of the store just before
        it. The refresh starts at once rather than when the throttle allows, and one serves
        every reader waiting. If it fails, the tail is not ready, and the reader asks the
        store."""
        target = self._wakes
        while self._read_through < target and self._ready and not self.closed:
            if self._refreshing is None:
                if self._next_refresh is not None:
                    self._next_refresh.cancel()
                self._start_refresh()
            if self._refreshed is None:
                self._refreshed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._refreshed)

    def _wake(self) -> None:
        """The store may have moved (its listener's call): see _schedule_refresh."""
        self._wakes += 1
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        """Refresh, once at a time and at most every REFRESH_INTERVAL (a wake meanwhile
        makes the next one read)."""
        self._stale = True
        if self._refreshing is not None or self._next_refresh is not None or self.closed:
            return
        loop = asyncio.get_running_loop()
        delay = self._last_refresh + REFRESH_INTERVAL - loop.time()
        if delay > 0:
            self._next_refresh = loop.call_later(delay, self._start_refresh)
        else:
            self._start_refresh()

    def _start_refresh(self) -> None:
        self._next_refresh = None
        self._last_refresh = asyncio.get_running_loop().time()
        self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """Read what changed after the tail's revision, once (more next time, if there is)."""
        self._stale = False
        wakes = self._wakes
        try:
            try:
                changes = await self._store.changes("", self.revision, REFRESH_LIMIT)
            except HistoryGone:
                # A seed or an import compacted the history past the tail, or the store was
                # replaced: begin again at its revision. Watchers behind it learn that they
                # must list again (410) when they next read.
                self._restart(await self._store.revision())
                self._read_through = wakes
            else:
                self._append(changes)
                if not changes.more:
                    self._read_through = wakes
            self._refresh_ended()
        except Exception as error:  # StoreError, or a bug: the next wake tries again
            self._ready = False
            self._refresh_ended()
            _log_failure("watch_refresh_failed", error)
            await asyncio.sleep(REFRESH_RETRY)
            self._stale = True
        finally:
            self._refreshing = None
        if self._stale and not self.closed:
            self._schedule_refresh()

    def _refresh_ended(self) -> None:
        """Tell the readers waiting on this refresh (caught_up) that it is over."""
        if self._refreshed is not None:
            _resolve(self._refreshed, True)
            self._refreshed = None

    def _append(self, changes: Changes) -> None:
        self._ready = True
        self._compact_revision = changes.compact_revision
        newest = self._gaps[-1].resumed_at if self._gaps else self.floor
        self._gaps += (gap for gap in changes.gaps if gap.resumed_at > newest)
        new = [encode(change) for change in changes.events]
        self._events += new
        self._revisions += (event.revision for event in new)
        self._bytes += sum(len(event.data) for event in new)
        before = self.revision
        self.revision = new[-1].revision if changes.more else changes.revision
        if changes.more:
            self._stale = True
        self._drop_oldest()
        if new:
            self._push(new, before)
            self._notify(new)

    def _drop_oldest(self) -> None:
        """Keep the tail within TAIL_BYTES, dropping whole revisions; the newest stays, even
        alone above the bound."""
        if self._bytes <= TAIL_BYTES:
            return
        newest = bisect.bisect_left(self._revisions, self._revisions[-1])
        dropped, freed = 0, 0
        while self._bytes - freed > TAIL_BYTES and dropped < newest:
            freed += len(self._events[dropped].data)
            dropped += 1
        if not dropped:
            return
        dropped = bisect.bisect_right(self._revisions, self._revisions[dropped - 1])
        self.floor = self._revisions[dropped - 1]
        self._bytes -= sum(len(event.data) for event in self._events[:dropped])
        del self._events[:dropped], self._revisions[:dropped]
        self._gaps = [gap for gap in self._gaps if gap.resumed_at > self.floor]

    def _restart(self, revision: int) -> None:
        """Begin the tail again at ``revision``: every waiter reads, and every parked stream
        reads on from where it was, from the store (which may tell it to list again). They
        are unparked at once: a sweep in the same turn must not take them for streams at the
        new revision."""
        reached = Position(self.revision)
        for stream in [stream for streams in self._parked.values() for stream in streams]:
            self._unpark(stream, reached)
        self._events, self._revisions, self._bytes = [], [], 0
        self.floor = self.revision = revision
        self._compact_revision, self._gaps = 0, []
        self._ready = True
        for waiters in self._waiters.values():
            for future in waiters:
                _resolve(future, True)

    def _notify(self, new: Sequence[Event]) -> None:
        for prefix, waiters in self._waiters.items():
            if waiters and any(event.key.startswith(prefix) for event in new):
                for future in waiters:
                    _resolve(future, True)

    async def close(self) -> None:
        """Stop listening and release every waiter: long-polls answer, and streams end at
        once, those still writing to a watcher too (their connections are closed)."""
        if self.closed:
            return
        self.closed = True
        for waiters in self._waiters.values():
            for future in waiters:
                _resolve(future, False)
        for stream in self._streams:
            if stream.future is not None:
                _resolve(stream.future, False)
            transport = stream.transport
            if transport is not None and transport.get_write_buffer_size():
                transport.abort()
        if self._next_refresh is not None:
            self._next_refresh.cancel()
        self._refresh_ended()  # its readers read the store, or find the feed closed
        for task in (self._listening, self._refreshing, self._sweeping):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _log_failure(event: str, error: Exception) -> None:
    """A store that cannot answer is a warning; anything else is a bug, with its traceback."""
    if isinstance(error, StoreError):
        log.warning(event, reason=safe_message(error))
    else:
        log.error(event, exc_info=error)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
