"""The change feed's hub (feed.py) on its own: its tail answers exactly what the store answers,
its heartbeats name only revisions a stream has reached, and it ends a slow stream only when
the watcher has stopped taking what waits for it."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from mapmg_data_engineer_takehome.feed import Batch, ChangeFeed, Event, Position, Stream
from mapmg_data_engineer_takehome.store import MemoryStore
from mapmg_data_engineer_takehome.store.base import HistoryGone, SetItem, Store

from .conftest import FakeClock, OpenStore, RowsSeed
from .test_store_contract import BACKENDS

BACKLOG = 64 * 1024
HEARTBEAT = 10.0


class FakeTransport:
    """A connection whose watcher takes what the test says: ``waiting`` bytes wait for it."""

    def __init__(self) -> None:
        self.waiting = 0
        self.written: list[bytes] = []
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def set_write_buffer_limits(
        self, high: Optional[int] = None, low: Optional[int] = None
    ) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.waiting += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: what waits is what ``waiting`` says


class RecordingPusher:
    """What the feed hands a Pusher, written to the streams' fake transports as a real one
    writes (a stream whose backlog cannot take the events is handed back)."""

    def __init__(self) -> None:
        self.progress_sent: list[tuple[int, list[Stream]]] = []

    def events(self, events: Sequence[Event], streams: Collection[Stream]) -> list[Stream]:
        data = b"".join(event.data for event in events)
        full = []
        for stream in streams:
            transport = stream.transport
            assert transport is not None
            if transport.get_write_buffer_size() + len(data) > BACKLOG:
                full.append(stream)
            else:
                transport.write(data)
                stream.wrote(len(data), 0.0)
        return full

    def progress(self, revision: int, streams: Collection[Stream]) -> None:
        self.progress_sent.append((revision, list(streams)))


@pytest.fixture
async def feed() -> AsyncIterator[ChangeFeed]:
    hub = ChangeFeed(MemoryStore(FakeClock()), BACKLOG, HEARTBEAT, RecordingPusher())
    await hub.start()
    yield hub
    await hub.close()


def store_of(feed: ChangeFeed) -> Store:
    return feed._store


async def caught_up(feed: ChangeFeed) -> None:
    """Until the tail has refreshed to the store's revision and nothing more is pending (the
    feed's private state: a refresh runs in the background, a few ms after a commit)."""
    store = store_of(feed)
    for _ in range(2000):
        if (
            feed._refreshing is None
            and feed._next_refresh is None
            and not feed._stale
            and feed.revision == await store.revision()
        ):
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the feed's tail did not catch up with the store")


# --- the tail answers as the store does -------------------------------------------------------

Answer = Union[tuple[str, int], tuple[list[bytes], int, bool, int, int]]


async def answer(read: Any) -> Answer:
    """A read's outcome in comparable form: the 410 and what it carries, or the batch."""
    try:
        batch: Batch = await read
    except HistoryGone as gone:
        return (
            type(gone).__name__,
            getattr(gone, "compact_revision", getattr(gone, "revision", 0)),
        )
    return (
        [event.data for event in batch.events],
        batch.revision,
        batch.more,
        batch.next,
        batch.taken,
    )


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
async def test_the_tail_answers_exactly_as_the_store(
    kind: str, seed: int, tmp_path: Path, open_test_store: OpenStore
) -> None:
    """Under random writes (sets, batches, deletes, expiries, trims and an import), the tail's
    answer to random (prefix, since, limit), places inside a revision included, is the
    store's: the same events, cut at the same place, or the same 410."""
    rng = random.Random(seed)
    clock = FakeClock()
    store = await open_test_store(kind, tmp_path, clock)
    feed = ChangeFeed(store, BACKLOG, HEARTBEAT, RecordingPusher())
    keys = ["a", "a/1", "a/2", "b", "b/1", "c"]
    start = await store.revision()
    try:
        await feed.start()
        for step in range(60):
            roll = rng.random()
            if roll < 0.4:
                await store.set(
                    rng.choice(keys), "v" * rng.randint(0, 50), ttl=rng.choice([None, 1])
                )
            elif roll < 0.6:
                items = [SetItem(rng.choice(keys), str(step)) for _ in range(rng.randint(1, 5))]
                await store.set_many(items)
            elif roll < 0.75:
                await store.delete_many(rng.sample(keys, rng.randint(1, 3)))
            elif roll < 0.85:
                clock.advance(2)
                await store.purge_expired(100)
            elif roll < 0.95:
                await store.trim_history(3600, rng.randint(5, 30), 1000)
            elif step > 30:
                await store.load(RowsSeed([(key, "imported") for key in keys[:3]], None))
            await caught_up(feed)
            revision = await store.revision()
            compact = (await store.history()).compact_revision
            for _ in range(8):
                since = rng.choice(
                    [0, 1, start - 1, start, compact - 1, compact, revision, revision + 1]
                    + [rng.randint(max(compact - 3, 0), revision + 2) for _ in range(4)]
                )
                position = Position(since, rng.choice([0, 0, 1, 2]) if since else 0)
                prefix = rng.choice(["", "a", "a/", "b/", "z"])
                limit = rng.randint(1, 6)
                from_store = await answer(feed.poll(prefix, position, limit))
                from_tail = await answer(feed.changes(prefix, position, limit))
                assert from_tail == from_store, (step, prefix, position, limit)
    finally:
        await feed.close()
        await store.close()


# --- heartbeats and restarts ------------------------------------------------------------------


async def parked_stream(feed: ChangeFeed, prefix: str = "") -> tuple[Stream, asyncio.Task[bool]]:
    stream = feed.stream(prefix, Position(feed.revision))
    feed.watch(stream, FakeTransport())
    assert feed.can_follow(stream)
    following = asyncio.ensure_future(feed.follow(stream))
    await asyncio.sleep(0)  # parked
    assert feed._is_parked(stream)
    return stream, following


async def test_a_heartbeat_after_the_tail_began_again_names_no_revision_the_stream_lacks(
    feed: ChangeFeed,
) -> None:
    """An import restarts the tail in the same loop turn as a sweep: the stream, parked at the
    old revision, must not be sent a heartbeat naming the new one (it would resume from it and
    never learn to list again)."""
    stream, following = await parked_stream(feed)
    reached = feed.revision
    stream.last_write = -HEARTBEAT  # due for a heartbeat
    pusher = feed._pusher
    assert isinstance(pusher, RecordingPusher)
    feed._restart(reached + 1000)  # what a refresh does when the history moved past the tail
    feed._sweep_once()  # the same turn
    assert all(stream not in streams for _, streams in pusher.progress_sent)
    assert await following is True  # its handler reads on, from where it was
    assert stream.position == Position(reached)


async def test_a_parked_stream_is_sent_a_heartbeat_with_the_tails_revision(
    feed: ChangeFeed,
) -> None:
    stream, following = await parked_stream(feed)
    stream.last_write = -HEARTBEAT
    feed._sweep_once()
    pusher = feed._pusher
    assert isinstance(pusher, RecordingPusher)
    assert pusher.progress_sent == [(feed.revision, [stream])]
    following.cancel()


# --- slow streams -----------------------------------------------------------------------------


async def test_a_parked_stream_that_cannot_take_new_events_reads_them_itself(
    feed: ChangeFeed,
) -> None:
    """Its connection holds most of its backlog: the new events are not written to it; its
    handler is woken to read them from where it was, at the watcher's pace."""
    keeping_up, following_too = await parked_stream(feed)
    behind, following = await parked_stream(feed)
    assert isinstance(behind.transport, FakeTransport)
    behind.transport.waiting = BACKLOG - 10
    before = feed.revision
    written = await store_of(feed).set("k", "v" * 100)
    assert await asyncio.wait_for(following, 5) is True
    assert behind.position == Position(before) and behind.transport.written == []
    assert isinstance(keeping_up.transport, FakeTransport)
    assert len(keeping_up.transport.written) == 1 and feed._is_parked(keeping_up)
    batch = await feed.read(behind, 100)
    assert [event.revision for event in batch.events] == [written.version]
    assert behind.position == Position(written.version)
    following_too.cancel()


def test_only_a_watcher_that_takes_nothing_for_a_heartbeat_is_cut_off() -> None:
    """A stream is ended when its watcher has taken none of the bytes waiting for it for a
    heartbeat interval, however much waits; one that takes a little at a time never is."""
    feed = ChangeFeed(MemoryStore(FakeClock()), BACKLOG, HEARTBEAT, RecordingPusher())
    slow, stalled = Stream("", Position(0)), Stream("", Position(0))
    for stream in (slow, stalled):
        transport = FakeTransport()
        transport.write(b"x" * BACKLOG)
        stream.transport = transport
        stream.wrote(BACKLOG, 0.0)
    now = 0.0
    for _ in range(100):  # 100 heartbeats' time
        now += HEARTBEAT / 2
        assert isinstance(slow.transport, FakeTransport)
        slow.transport.waiting -= 100  # takes 100 bytes a sweep...
        slow.transport.write(b"x" * 100)  # ... and its writer refills what it took
        slow.wrote(100, now)
        assert not feed._stalled(slow, slow.transport, now)
    assert isinstance(stalled.transport, FakeTransport)
    assert not feed._stalled(stalled, stalled.transport, 0.0)
    assert not feed._stalled(stalled, stalled.transport, HEARTBEAT - 0.1)
    assert feed._stalled(stalled, stalled.transport, HEARTBEAT)
    stalled.transport.waiting = 0  # it took everything after all: not stalled, nothing waits
    assert not feed._stalled(stalled, stalled.transport, 2 * HEARTBEAT)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kernel's send queue is asked of Linux only"
)
async def test_a_reader_that_takes_a_little_at_a_time_is_not_taken_for_one_that_stopped() -> None:
    """A real connection whose reader takes 300 KB between sweeps: the kernel holds megabytes
    for it and asks the transport for more only once much of that is free, so the
    transport's own buffer stands still for several sweeps; what the kernel still holds
    moves, and the stream is not ended. Once the reader stops, it is, a heartbeat after the
    last it took."""
    listener = socket.create_server(("127.0.0.1", 0))
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, *listener.getsockname()
    )
    peer, _ = listener.accept()
    try:
        feed = ChangeFeed(MemoryStore(FakeClock()), BACKLOG, HEARTBEAT, RecordingPusher())
        stream = feed.stream("", Position(0))
        stream.transport = transport
        size = 10_000_000
        transport.write(b"x" * size)
        stream.wrote(size, 0.0)
        await asyncio.sleep(0.2)
        buffered, now = [], 0.0
        for _ in range(6):
            taken = 0
            while taken < 300_000:
                taken += len(peer.recv(300_000 - taken))
            await asyncio.sleep(0.1)
            buffered.append(transport.get_write_buffer_size())
            now += HEARTBEAT * 0.75
            assert not feed._stalled(stream, transport, now)
        assert len(set(buffered)) < len(buffered)  # the transport's buffer stood still
        last_taken = stream.passing_at
        assert not feed._stalled(stream, transport, last_taken + HEARTBEAT - 0.1)
        assert feed._stalled(stream, transport, last_taken + HEARTBEAT)
    finally:
        transport.abort()
        peer.close()
        listener.close()
