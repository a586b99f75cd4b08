"""GET /changes: the change feed over HTTP, as a long-poll (JSON) or a stream of Server-Sent
Events (``Accept: text/event-stream``).

Both read through this process's ChangeFeed (feed.py), so that a change costs one query per
process however many watch. Whether the history can answer is settled before anything is
sent: a watcher too far behind, or ahead of the store, gets a 410, never a stream that stops.

A stream is written here rather than with aiohttp-sse: each event is encoded once for every
watcher (feed.Event.data), a revision's events go out in one write, its id is on its last event
only, heartbeats carry the resume point, and a stream that has caught up is written to by the
feed, without a task of its own (see docs/design.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Sequence
from typing import Optional

import structlog
from aiohttp import HttpVersion11, hdrs, web

from .errors import JSON_HEADERS, ApiError, safe_message
from .feed import Batch, ChangeFeed, Event, Stream, encode_all
from .metrics import Metrics
from .models import ChangesQuery, parse_query
from .protocol import chunk
from .state import FEED_KEY, METRICS_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import Compacted, HistoryGone, StoreError, UnknownRevision

log = structlog.get_logger("kv.watch")

EVENT_STREAM = "text/event-stream"
LAST_EVENT_ID = "Last-Event-ID"
STREAM_HEADERS = {
    hdrs.CONTENT_TYPE: EVENT_STREAM,
    hdrs.CACHE_CONTROL: "no-cache",
    # Proxies that buffer answers (nginx) pass this one through as it comes.
    "X-Accel-Buffering": "no",
}
# How long an EventSource waits before it reconnects, in ms: the stream's first line.
RECONNECT_MS = 1000
_REVISION_ID = re.compile(r"[0-9]{1,18}")


async def changes(request: web.Request) -> web.StreamResponse:
    """GET /changes: the changes after ``since``, as a long-poll answer or a stream."""
    query = parse_query(ChangesQuery, request.query)
    streaming = EVENT_STREAM in request.headers.get(hdrs.ACCEPT, "")
    since = _last_event_id(request)
    if since is None:
        since = query.since
    store = request.app[STORE_KEY]
    feed = request.app[FEED_KEY]
    if since is None:
        since = await store.revision()
    try:
        if streaming or query.timeout > 0:
            await feed.start()
            first = await feed.changes(query.prefix, since, query.limit)
        else:  # a poll that does not wait reads the store itself: exact to the moment
            first = encode_all(await store.changes(query.prefix, since, query.limit))
        if streaming:
            return await _stream(request, feed, query, first)
        return await _long_poll(request, feed, query, first)
    except Compacted as compacted:
        raise ApiError(
            410,
            "compacted",
            f"The changes after revision {since} are no longer kept (the history is whole "
            f"above revision {compacted.compact_revision}). List the keys again (GET /keys), "
            "then watch from the listing's KV-Revision.",
            details={"compact_revision": compacted.compact_revision},
        ) from None
    except UnknownRevision as unknown:
        raise ApiError(
            410,
            "unknown_revision",
            f"Revision {since} is not one of this store's (its revision is "
            f"{unknown.revision}): the store was replaced or restored, or failed over to a "
            "copy that did not have it. List the keys again (GET /keys), then watch from the "
            "listing's KV-Revision.",
            details={"revision": unknown.revision},
        ) from None


def _last_event_id(request: web.Request) -> Optional[int]:
    """Where a reconnecting EventSource resumes: the last id it saw. It wins over ``since``."""
    value = request.headers.get(LAST_EVENT_ID)
    if value is None:
        return None
    if not _REVISION_ID.fullmatch(value.strip()):
        raise ApiError(
            400, "invalid_header", "Last-Event-ID must be a revision, as a stream's id gives it."
        )
    return int(value)


def _next(batch: Batch) -> int:
    """Where the watcher goes on from: the store's revision, or the last event's when the
    answer was cut short."""
    return batch.events[-1].revision if batch.more else batch.revision


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
                woke = await feed.wait(query.prefix, batch.revision, remaining)
                batch = await feed.changes(query.prefix, batch.revision, query.limit)
                if not woke:
                    break
        finally:
            if metrics is not None:
                metrics.watchers.labels("longpoll").dec()
    if metrics is not None and batch.events:
        metrics.observe_events_sent("longpoll", len(batch.events))
    body = b'{"events":[%s],"next":%d,"more":%s}' % (
        b",".join(event.data for event in batch.events),
        _next(batch),
        b"true" if batch.more else b"false",
    )
    return web.Response(body=body, headers=JSON_HEADERS)


def event_stream(events: Sequence[Event]) -> bytes:
    """Events as Server-Sent Events: each ``event: <type>`` with its JSON as ``data``, and
    ``id: <revision>`` on the last event of each revision only, so that a watcher resuming
    from the last id it saw never lands inside a batch."""
    parts = []
    last = len(events) - 1
    for index, event in enumerate(events):
        if index == last or events[index + 1].revision != event.revision:
            parts.append(
                b"event: %s\nid: %d\ndata: %s\n\n"
                % (event.type.encode(), event.revision, event.data)
            )
        else:
            parts.append(b"event: %s\ndata: %s\n\n" % (event.type.encode(), event.data))
    return b"".join(parts)


def progress(revision: int) -> bytes:
    """The heartbeat: nothing under the prefix up to ``revision``, where a watcher resumes."""
    return b'event: progress\nid: %d\ndata: {"revision":%d}\n\n' % (revision, revision)


async def _stream(
    request: web.Request, feed: ChangeFeed, query: ChangesQuery, batch: Batch
) -> web.StreamResponse:
    """Stream the changes until the watcher leaves, the server stops, or the history moves
    past the stream (then the watcher reconnects, and is told to list again).

    Caught up with the feed's tail, the stream parks on the feed, which writes to it from
    then on (see StreamPusher); behind it, its handler reads and writes for itself."""
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
    position = _next(batch)
    stream = feed.watch(request.transport, query.prefix, position)
    if metrics is not None:
        metrics.watchers.labels("sse").inc()
    loop = asyncio.get_running_loop()

    async def send(chunk: bytes, events: int = 0) -> None:
        await response.write(chunk)
        stream.last_write = loop.time()
        if metrics is not None and events:
            metrics.observe_events_sent("sse", events)

    try:
        # The first write says where the stream is, events or not: a watcher that came
        # without since resumes from there. The retry field goes with the first event's, not
        # in a block of its own: some clients take a block without data for an event.
        opening = event_stream(batch.events) if batch.events else progress(position)
        await send(b"retry: %d\n%s" % (RECONNECT_MS, opening), len(batch.events))
        while not feed.closed and not stream.gone:
            if not batch.more:
                stream.position = position
                if parks and feed.can_follow(stream):
                    if not await feed.follow(stream):
                        break
                    position = stream.position
                else:
                    idle = loop.time() - stream.last_write
                    if idle >= heartbeat:
                        await send(progress(position))
                        continue
                    await feed.wait(query.prefix, position, heartbeat - idle, stream)
                    if feed.closed or stream.gone:
                        break
            batch = await feed.changes(query.prefix, position, query.limit)
            if batch.events:
                await send(event_stream(batch.events), len(batch.events))
            position = _next(batch)
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
    then a chunk to each stream's transport, without waiting; a stream that has left more
    than its backlog unread is closed (it resumes from its last id)."""

    def __init__(self, backlog: int, metrics: Optional[Metrics]) -> None:
        self._backlog = backlog
        self._metrics = metrics

    def events(self, events: Sequence[Event], streams: Collection[Stream]) -> None:
        self._write(chunk(event_stream(events)), streams)
        if self._metrics is not None:
            self._metrics.observe_events_sent("sse", len(events) * len(streams))

    def progress(self, revision: int, streams: Collection[Stream]) -> None:
        self._write(chunk(progress(revision)), streams)

    def _write(self, data: bytes, streams: Collection[Stream]) -> None:
        for stream in streams:
            transport = stream.transport
            if transport is None or transport.is_closing():
                continue
            transport.write(data)
            if transport.get_write_buffer_size() > self._backlog:
                log.info("watcher_too_slow", backlog=transport.get_write_buffer_size())
                transport.abort()
