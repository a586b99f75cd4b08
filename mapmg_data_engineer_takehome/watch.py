"""GET /changes: the change feed over HTTP, as a long-poll (JSON) or a stream of Server-Sent
Events (``Accept: text/event-stream``).

Both read only through this process's ChangeFeed (feed.py), so that a change costs one query
per process however many watch, and the feed owns where each stream is. Whether the history can
answer is settled before anything is sent: a watcher too far behind, ahead of the store, or
holding a revision of another history, gets a 410, never a stream that stops.

A stream is written here rather than with aiohttp-sse: each event is encoded once for every
watcher (feed.Event.data), every event has an id that names its place (``17.2`` after the
second of revision 17's events, the bare ``17`` on its last), so that an EventSource cut at any
byte resumes from the last id it dispatched with nothing repeated or missed; heartbeats carry
the resume point, a batch goes out as fast as the watcher takes it, and a stream that has
caught up is written to by the feed, without a task of its own (see docs/design.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Optional

import structlog
from aiohttp import HttpVersion11, hdrs, web

from .access import require
from .errors import JSON_HEADERS, ApiError, safe_message
from .feed import Batch, ChangeFeed, Event, Position, Stream, StreamTransport
from .metrics import Metrics
from .models import ChangesQuery
from .protocol import chunk
from .rules import LAST_EVENT_ID, REVISION_DIGITS
from .state import FEED_KEY, METRICS_KEY, SETTINGS_KEY
from .store.base import Compacted, HistoryGone, StoreError, UnknownRevision
from .validation import parse_query

log = structlog.get_logger("kv.watch")

EVENT_STREAM = "text/event-stream"
STREAM_HEADERS = {
    hdrs.CONTENT_TYPE: EVENT_STREAM,
    hdrs.CACHE_CONTROL: "no-cache",
    # Proxies that buffer answers (nginx) pass this one through as it comes.
    "X-Accel-Buffering": "no",
}
# How long an EventSource waits before it reconnects, in ms: the stream's first line.
RECONNECT_MS = 1000
# An event's id: its revision, and its place among the revision's events when not the last.
_EVENT_ID = re.compile(f"({REVISION_DIGITS})(?:\\.([0-9]{{1,9}}))?")
# A stream's writes from its handler: about this many bytes each, the watcher's pace (a write
# waits while the connection holds its backlog) setting theirs.
STREAM_WRITE_BYTES = 64 * 1024


async def changes(request: web.Request) -> web.StreamResponse:
    """GET /changes: the changes after ``since``, as a long-poll answer or a stream."""
    query = parse_query(ChangesQuery, request.query)
    require(request, read_prefixes=(query.prefix,))  # long-poll and stream alike
    streaming = EVENT_STREAM in request.headers.get(hdrs.ACCEPT, "")
    feed = request.app[FEED_KEY]
    position = _last_event_id(request)
    if position is None:
        since = query.since if query.since is not None else await feed.revision_now()
        position = Position(since)
    try:
        if streaming:
            await feed.start()
            stream = feed.stream(query.prefix, position)
            first = await feed.read(stream, query.limit, current=True)
            return await _stream(request, feed, query, stream, first)
        if query.timeout > 0:
            await feed.start()
            first = await feed.changes(query.prefix, position, query.limit, current=True)
        else:  # a poll that does not wait reads the store itself: exact to the moment
            first = await feed.poll(query.prefix, position, query.limit)
        return await _long_poll(request, feed, query, first)
    except Compacted as compacted:
        raise ApiError(
            410,
            "compacted",
            f"The changes after {_event_id(position)} are no longer kept (the history is whole "
            f"above revision {compacted.compact_revision}). List the keys again (GET /keys), "
            "then watch from the listing's KV-Revision.",
            details={"compact_revision": compacted.compact_revision},
        ) from None
    except UnknownRevision as unknown:
        raise ApiError(
            410,
            "unknown_revision",
            f"Revision {position.revision} is not one of this store's history (its revision "
            f"is {unknown.revision}): it is from another store, or from a life of this one "
            "that a restart, a restore or a failover left behind. List the keys again "
            "(GET /keys), then watch from the listing's KV-Revision.",
            details={"revision": unknown.revision},
        ) from None


def _last_event_id(request: web.Request) -> Optional[Position]:
    """Where a reconnecting EventSource resumes: the last id it dispatched. It wins over
    ``since``."""
    value = request.headers.get(LAST_EVENT_ID)
    if value is None:
        return None
    matched = _EVENT_ID.fullmatch(value.strip())
    if matched is None:
        raise ApiError(
            400,
            "invalid_header",
            "Last-Event-ID must be an event id as a stream gives it: a revision (17), or a "
            "revision and a place in it (17.2).",
        )
    return Position(int(matched[1]), int(matched[2] or 0))


def _event_id(position: Position) -> str:
    return f"{position.revision}.{position.taken}" if position.taken else str(position.revision)


async def _long_poll(
    request: web.Request, feed: ChangeFeed, query: ChangesQuery, batch: Batch
) -> web.Response:
    """Answer at once when there are changes; else wait for one under the prefix, up to the
    timeout, and answer what there is then (a timeout is an answer without events)."""
    metrics = request.app[METRICS_KEY]
    if not batch.events and query.timeout > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.timeout
        if metrics is not None:
            metrics.watchers.labels("longpoll").inc()
        try:
            while not batch.events:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                woke = await feed.wait(query.prefix, batch.next, remaining)
                batch = await feed.changes(query.prefix, Position(batch.next), query.limit)
                if not woke:
                    break
        finally:
            if metrics is not None:
                metrics.watchers.labels("longpoll").dec()
    if metrics is not None and batch.events:
        metrics.observe_events_sent("longpoll", len(batch.events))
    body = b'{"events":[%s],"next":%d,"more":%s}' % (
        b",".join(event.data for event in batch.events),
        batch.next,
        b"true" if batch.more else b"false",
    )
    return web.Response(body=body, headers=JSON_HEADERS)


def event_stream(events: Sequence[Event], taken: int = 0) -> bytes:
    """Events (whole revisions but for the first, of which the watcher had ``taken``) as
    Server-Sent Events: each ``event: <type>`` with its JSON as ``data``."""
    return b"".join(event_pieces(events, taken, piece_bytes=0))


def event_pieces(events: Sequence[Event], taken: int = 0, piece_bytes: int = 0) -> Iterator[bytes]:
    """``event_stream``, in pieces of about ``piece_bytes`` (0: one), encoded as they are
    asked for. Each event's id names its place: the bare revision on a revision's last event
    (a watcher resuming from it has the whole revision), and ``<revision>.<n>`` on the n-th
    before it, under the stream's prefix (a watcher resuming from it has those n)."""
    parts: list[bytes] = []
    size = 0
    place = taken  # the events of the current revision before this one
    last = len(events) - 1
    for index, event in enumerate(events):
        place += 1
        if index == last or events[index + 1].revision != event.revision:
            part = b"event: %s\nid: %d\ndata: %s\n\n" % (
                event.type.encode(),
                event.revision,
                event.data,
            )
            place = 0
        else:
            part = b"event: %s\nid: %d.%d\ndata: %s\n\n" % (
                event.type.encode(),
                event.revision,
                place,
                event.data,
            )
        parts.append(part)
        size += len(part)
        if piece_bytes and size >= piece_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def progress(revision: int) -> bytes:
    """The heartbeat: nothing under the prefix up to ``revision``, where a watcher resumes."""
    return b'event: progress\nid: %d\ndata: {"revision":%d}\n\n' % (revision, revision)


async def _stream(
    request: web.Request, feed: ChangeFeed, query: ChangesQuery, stream: Stream, batch: Batch
) -> web.StreamResponse:
    """Stream the changes until the watcher leaves, the server stops, or the history moves
    past the stream (then the watcher reconnects, and is told to list again).

    Caught up with the feed's tail, the stream parks on the feed, which writes to it from
    then on (see StreamPusher); behind it, its handler reads and writes for itself, as fast as
    the watcher takes what it writes."""
    heartbeat = request.app[SETTINGS_KEY].changes_heartbeat
    metrics = request.app[METRICS_KEY]
    response = web.StreamResponse(headers=STREAM_HEADERS)
    # Chunked, as every HTTP/1.1 answer without a length is, but said so: the feed writes
    # its chunks to the transport itself (protocol.chunk). HTTP/1.0 has no chunks: such a
    # stream never parks.
    parks = request.version >= HttpVersion11
    if parks:
        response.enable_chunked_encoding()
    await response.prepare(request)
    feed.watch(stream, request.transport)
    if metrics is not None:
        metrics.watchers.labels("sse").inc()
    loop = asyncio.get_running_loop()

    async def send(chunk: bytes) -> None:
        await response.write(chunk)  # waits while the connection holds its backlog
        stream.wrote(len(chunk), loop.time())

    async def send_batch(batch: Batch, opening: bytes = b"") -> None:
        for piece in event_pieces(batch.events, batch.taken, STREAM_WRITE_BYTES):
            await send(opening + piece)
            opening = b""
        if metrics is not None and batch.events:
            metrics.observe_events_sent("sse", len(batch.events))

    try:
        # The first write says where the stream is, events or not: a watcher that came
        # without since resumes from there. The retry field goes with the first event's, not
        # in a block of its own: some clients take a block without data for an event.
        opening = b"retry: %d\n" % RECONNECT_MS
        if batch.events:
            await send_batch(batch, opening)
        else:
            await send(opening + progress(stream.position.revision))
        while not feed.closed and not stream.gone:
            if not batch.more:
                if parks and feed.can_follow(stream):
                    if not await feed.follow(stream):
                        break
                else:
                    idle = loop.time() - stream.last_write
                    if idle >= heartbeat:
                        await send(progress(stream.position.revision))
                        continue
                    revision = stream.position.revision
                    await feed.wait(query.prefix, revision, heartbeat - idle, stream)
                    if feed.closed or stream.gone:
                        break
            batch = await feed.read(stream, query.limit)
            if batch.events:
                await send_batch(batch)
    except ConnectionResetError:
        pass  # the watcher left
    except HistoryGone:
        log.info("watch_stream_compacted")  # its reconnection is told to list again
    except StoreError as error:
        log.warning("watch_stream_failed", reason=safe_message(error))
    finally:
        feed.unwatch(stream)
        if metrics is not None:
            metrics.watchers.labels("sse").dec()
    return response


class StreamPusher:
    """Writes to the streams parked on the feed: one encoding of the events for all of them,
    then a chunk to each stream's transport, without waiting. A stream whose transport cannot
    take the events within its backlog is sent nothing, and handed back (its handler writes
    them at the watcher's pace)."""

    def __init__(self, backlog: int, metrics: Optional[Metrics]) -> None:
        self._backlog = backlog
        self._metrics = metrics

    def events(self, events: Sequence[Event], streams: Collection[Stream]) -> list[Stream]:
        # What the events take, but for their framing: enough to tell who can take them
        # before encoding them (none can, when they alone pass the backlog).
        size = sum(len(event.data) for event in events)
        full: list[Stream] = []
        taking: list[tuple[Stream, StreamTransport]] = []
        for stream in streams:
            transport = stream.transport
            if transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size() + size > self._backlog:
                full.append(stream)
            else:
                taking.append((stream, transport))
        if taking:
            data = chunk(event_stream(events))
            now = asyncio.get_running_loop().time()
            for stream, transport in taking:
                transport.write(data)
                stream.wrote(len(data), now)
        if self._metrics is not None:
            self._metrics.observe_events_sent("sse", len(events) * len(taking))
        return full

    def progress(self, revision: int, streams: Collection[Stream]) -> None:
        data = chunk(progress(revision))
        now = asyncio.get_running_loop().time()
        for stream in streams:
            transport = stream.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
                stream.wrote(len(data), now)
