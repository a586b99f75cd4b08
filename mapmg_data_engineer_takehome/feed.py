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

Streams (``Stream``) take the fast way once they have caught up with the tail: they park on
the hub (``follow``), and each refresh hands its events to the ``Pusher`` once per prefix for
all the parked streams of that prefix, which writes them to their connections there and then.
A thousand streams so cost one encoding and a thousand writes per refresh, not a thousand tasks
woken to read and write the same bytes. A stream behind the tail, a long-poll, and a stream on
a connection that cannot take direct writes wait instead (``wait``) and read for themselves.

The hub also sweeps its streams: it ends the wait of one whose connection is gone, closes one
whose watcher has left more than its backlog unread (so that no slow consumer makes the server
hold more than that for it), and has the Pusher write a heartbeat to a parked one that has been
idle for the heartbeat interval.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import orjson
import structlog

from .errors import safe_message
from .models import rfc3339
from .store.base import Change, Changes, HistoryGone, Store, StoreError, take_changes

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
    """A change as /changes sends it: ``data`` is its JSON object."""

    revision: int
    type: str
    key: str
    data: bytes


def encoded_size(event: Event) -> int:
    return len(event.data)


def encode(change: Change) -> Event:
    body: dict[str, object] = {"revision": change.revision, "type": change.type, "key": change.key}
    if change.type == "set":
        body["val"] = change.val
        body["expires_at"] = None if change.expires_at is None else rfc3339(change.expires_at)
    return Event(change.revision, change.type, change.key, orjson.dumps(body))


@dataclass(frozen=True)
class Batch:
    """Events for a watcher, as Store.changes answers: with ``more`` False, every change under
    its prefix up to ``revision``."""

    events: Sequence[Event]
    revision: int
    more: bool


def encode_all(changes: Changes) -> Batch:
    return Batch([encode(change) for change in changes.events], changes.revision, changes.more)


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


class Stream:
    """A stream open on the feed: its connection and prefix, where it is (``position``, the
    revision up to which it has every change under its prefix), when it last wrote (the
    loop's clock), and the wait it is in, parked or not."""

    __slots__ = ("future", "gone", "last_write", "position", "prefix", "transport")

    def __init__(self, transport: Optional[StreamTransport], prefix: str, position: int) -> None:
        self.transport = transport
        self.prefix = prefix
        self.position = position
        self.last_write = 0.0
        self.future: Optional[asyncio.Future[bool]] = None
        self.gone = False  # the connection closed: the stream ends


class Pusher(Protocol):
    """Writes to parked streams, there and then (it must not wait)."""

    def events(self, events: Sequence[Event], streams: Collection[Stream]) -> None:
        """Send ``events`` (whole revisions, under the streams' prefix) to every stream."""

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
        # The tail: every change in revisions above ``floor`` up to ``revision``.
        self.floor = 0
        self.revision = 0
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
        self.closed = False

    # --- reading ----------------------------------------------------------------------------

    async def changes(self, prefix: str, since: int, limit: int) -> Batch:
        """What Store.changes answers, from the tail when it holds ``since``; raises what
        Store.changes raises (HistoryGone, StoreError) when it has to ask the store."""
        if not self._ready or not self.floor <= since <= self.revision:
            return encode_all(await self._store.changes(prefix, since, limit))
        start = bisect.bisect_right(self._revisions, since)
        matching = (
            self._events[index]
            for index in range(start, len(self._events))
            if self._events[index].key.startswith(prefix)
        )
        # Sized by their encoding: about the values' characters, as the store sizes them.
        events, more = take_changes(matching, limit, encoded_size)
        return Batch(events, self.revision, more)

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

    def watch(self, transport: Optional[StreamTransport], prefix: str, position: int) -> Stream:
        """Register a stream on ``transport``: it may leave at most ``backlog`` bytes unread,
        which its transport may buffer without pausing the writer."""
        stream = Stream(transport, prefix, position)
        if transport is not None:
            transport.set_write_buffer_limits(high=self.backlog)
        self._streams.add(stream)
        return stream

    def unwatch(self, stream: Stream) -> None:
        self._streams.discard(stream)

    def can_follow(self, stream: Stream) -> bool:
        """Whether ``stream`` has every change up to the tail's revision, and may park."""
        return self._ready and not self.closed and stream.position == self.revision

    async def follow(self, stream: Stream) -> bool:
        """Park ``stream`` (see can_follow): the Pusher writes to it from now on. Returns
        False when the stream is to end (the feed closes, its connection is gone), True when
        its handler is to read on from ``stream.position`` (the tail began again)."""
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
        """End the waits of streams whose connection is gone, close those past their
        backlog, and have the Pusher write a heartbeat to parked ones idle for its interval."""
        now = asyncio.get_running_loop().time()
        due: list[Stream] = []
        for stream in list(self._streams):
            transport = stream.transport
            if transport is None or transport.is_closing():
                stream.gone = True
                if stream.future is not None:
                    _resolve(stream.future, False)
            elif transport.get_write_buffer_size() > self.backlog:
                log.info("watcher_too_slow", backlog=transport.get_write_buffer_size())
                transport.abort()  # its writer, waiting to drain, fails and ends
            elif now - stream.last_write >= self.heartbeat and self._is_parked(stream):
                due.append(stream)
        if due:
            self._pusher.progress(self.revision, due)
            for stream in due:
                stream.last_write = now

    def _is_parked(self, stream: Stream) -> bool:
        return stream in self._parked.get(stream.prefix, ())

    def _push(self, new: Sequence[Event]) -> None:
        """Hand the new events to the parked streams, once per prefix."""
        now = asyncio.get_running_loop().time()
        for prefix, streams in self._parked.items():
            matching = new if not prefix else [e for e in new if e.key.startswith(prefix)]
            if matching and streams:
                self._pusher.events(matching, streams)
                for stream in streams:
                    stream.last_write = now

    # --- keeping the tail -------------------------------------------------------------------

    def _wake(self) -> None:
        """The store may have moved: refresh, once at a time and at most every
        REFRESH_INTERVAL (a wake meanwhile makes the next one read)."""
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
        try:
            try:
                changes = await self._store.changes("", self.revision, REFRESH_LIMIT)
            except HistoryGone:
                # A seed or an import compacted the history past the tail, or the store was
                # replaced: begin again at its revision. Watchers behind it learn that they
                # must list again (410) when they next read.
                self._restart(await self._store.revision())
            else:
                self._append(changes)
        except Exception as error:  # StoreError, or a bug: the next wake tries again
            self._ready = False
            _log_failure("watch_refresh_failed", error)
            await asyncio.sleep(REFRESH_RETRY)
            self._stale = True
        finally:
            self._refreshing = None
        if self._stale and not self.closed:
            self._wake()

    def _append(self, changes: Changes) -> None:
        self._ready = True
        new = [encode(change) for change in changes.events]
        self._events += new
        self._revisions += (event.revision for event in new)
        self._bytes += sum(len(event.data) for event in new)
        self.revision = new[-1].revision if changes.more else changes.revision
        if changes.more:
            self._stale = True
        self._drop_oldest()
        if new:
            self._push(new)
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

    def _restart(self, revision: int) -> None:
        """Begin the tail again at ``revision``: every waiter reads, and every parked stream
        reads on from where it was, from the store (which may tell it to list again)."""
        for streams in self._parked.values():
            for stream in streams:
                stream.position = self.revision
                if stream.future is not None:
                    _resolve(stream.future, True)
        self._events, self._revisions, self._bytes = [], [], 0
        self.floor = self.revision = revision
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
