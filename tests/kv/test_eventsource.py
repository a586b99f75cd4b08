"""GET /changes as a browser's EventSource reads it: a stream cut at any byte, and resumed
with the Last-Event-ID the browser would send, gives every change once (no repeat, no gap).

The parser here follows the WHATWG HTML standard's "Server-sent events" section (interpreting
an event stream, and dispatching) to the letter, rather than a client library's reading of
it: what matters is the last event ID string a browser holds at each byte, and that is set
only when an event is dispatched, by a blank line."""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from collections import Counter
from typing import Any, NamedTuple, Optional

import pytest

from mapmg_data_engineer_takehome.state import STORE_KEY

from .conftest import Client, FakeClock, MakeClient

CHANGE_TYPES = ("set", "delete", "expire")
_LINE_END = re.compile(r"\r\n|\r|\n")
_DIGITS = re.compile(r"[0-9]+")
# How long a stream's reconnection may take to bring what is missing (a gap shows as this).
RESUME_TIMEOUT = 5.0
RECONNECTIONS_AT_ONCE = 8


class MessageEvent(NamedTuple):
    """A dispatched event, as a browser's listener gets it."""

    type: str
    data: str
    last_event_id: str


class EventSourceState:
    """What an EventSource keeps across its connections: the last event ID string (sent as
    Last-Event-ID when it reconnects, unless empty) and the reconnection time."""

    def __init__(self) -> None:
        self.last_event_id = ""
        self.reconnection_ms: Optional[int] = None


class EventStreamParser:
    """One connection's event stream, interpreted as the standard says: UTF-8 decoded (a
    leading BOM dropped), lines ending in CRLF, LF or CR; ``event``, ``data``, ``id`` (ignored
    when it holds a NUL) and ``retry`` (ASCII digits only) fields, comment lines, others
    ignored. A blank line dispatches: the last event ID buffer becomes the source's last event
    ID string, then an event with empty data is dropped. A new connection gets a new parser
    (its buffers start empty); bytes after the last line end are never interpreted (a stream
    cut there drops them)."""

    def __init__(self, source: EventSourceState) -> None:
        self.source = source
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded, not yet ended by a line end
        self._first = True  # a BOM may start the stream
        self._after_cr = False  # the last line ended with CR: an LF next is part of it
        self._data = ""
        self._type = ""
        self._id = ""
        self.dispatched: list[MessageEvent] = []
        self.ids: list[str] = []  # the source's last event ID string after each dispatch

    def feed(self, data: bytes) -> list[MessageEvent]:
        """Interpret ``data``, the next bytes of the stream; the events it dispatched."""
        text = self._text + self._decoder.decode(data)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._after_cr and text:
            self._after_cr = False
            if text.startswith("\n"):
                text = text[1:]
        before = len(self.dispatched)
        start = 0
        for end in _LINE_END.finditer(text):
            self._line(text[start : end.start()])
            start = end.end()
        if start and text[start - 1] == "\r":
            self._after_cr = True
        self._text = text[start:]
        return self.dispatched[before:]

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return  # a comment
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._type = value
        elif field == "data":
            self._data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                self._id = value
        elif field == "retry" and _DIGITS.fullmatch(value):
            self.source.reconnection_ms = int(value)

    def _dispatch(self) -> None:
        self.source.last_event_id = self._id
        self.ids.append(self._id)
        if not self._data:
            self._data = self._type = ""
            return
        data = self._data[:-1] if self._data.endswith("\n") else self._data
        self.dispatched.append(MessageEvent(self._type or "message", data, self._id))
        self._data = self._type = ""


def test_the_parser_reads_as_the_standard_says() -> None:
    source = EventSourceState()
    parser = EventStreamParser(source)
    stream = (
        b"\xef\xbb\xbfretry: 1500\r\n: a comment\r\nid: 1\r\ndata: a\r\ndata:b\r\n\r"
        b"event: x\rid: 2\x00\rdata\r\r"  # an id with a NUL is ignored; "data" alone is empty
        b"id: 3\n\n"  # no data: not dispatched, but the last event ID moves
        b"data: \xc3\xa9\nevent:\n\n"  # an empty event type is "message"
        b"id: 4\ndata: cut"  # never ended: never dispatched
    )
    events = [
        event for byte in range(len(stream)) for event in parser.feed(stream[byte : byte + 1])
    ]
    assert events == [
        MessageEvent("message", "a\nb", "1"),
        MessageEvent("x", "", "1"),
        MessageEvent("message", "\u00e9", "3"),
    ]
    assert source.last_event_id == "3" and source.reconnection_ms == 1500
    # A CR, then an LF in the next piece: one line end, not a blank line that dispatches.
    cr_lf = EventStreamParser(EventSourceState())
    assert cr_lf.feed(b"id: 5\r\ndata: y\r") == []
    assert cr_lf.feed(b"\n") == []
    assert cr_lf.feed(b"\r\n") == [MessageEvent("message", "y", "5")]


# --- a stream cut at every byte -------------------------------------------------------------

Change = tuple[str, str, Optional[str], int]  # type, key, value, revision


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    # Purges when the test says; heartbeats soon, so that a stream's end is a progress event.
    return await make_client(
        store=store_kind, clock=clock, purge_interval=3600, changes_heartbeat=0.2
    )


async def write_history(client: Client, clock: FakeClock) -> tuple[int, list[Change]]:
    """Every kind of change, revisions of one event and of several, under the prefix ``p/``
    and outside it; the revision before them, and the changes (a revision's in key order)."""
    store = client.app[STORE_KEY]
    start = await store.revision()
    changes: list[Change] = []

    async def post(path: str, body: Any) -> int:
        response = await client.post(path, json=body)
        assert response.status == 200, await response.text()
        return await store.revision()

    revision = await post("/set", {"key": "p/a", "val": "1", "ttl": 5})
    changes.append(("set", "p/a", "1", revision))
    revision = await post("/set", {"key": "q/t", "val": "2", "ttl": 5})
    changes.append(("set", "q/t", "2", revision))
    # Three events in one revision, and a value of several bytes a character, CR and LF.
    items = [{"key": "p/d", "val": "\u00e9\u2713\r\n"}, {"key": "p/b", "val": "b"}]
    items.append({"key": "p/c", "val": "c"})
    revision = await post("/mset", {"items": items})
    changes += [("set", item["key"], item["val"], revision) for item in items]
    # Keys inside and outside the prefix in one revision.
    items = [{"key": key, "val": key} for key in ("q/x", "p/f", "p/e", "q/y")]
    revision = await post("/mset", {"items": items})
    changes += [("set", item["key"], item["val"], revision) for item in items]
    response = await client.delete("/delete/p/b")
    assert response.status == 200, await response.text()
    changes.append(("delete", "p/b", None, await store.revision()))
    clock.advance(10)
    assert await store.purge_expired(100) == 2
    revision = await store.revision()
    changes += [("expire", "p/a", None, revision), ("expire", "q/t", None, revision)]
    revision = await post("/mdelete", {"keys": ["p/c", "q/x", "p/e", "absent"]})
    changes += [("delete", key, None, revision) for key in ("p/c", "q/x", "p/e")]
    # The last revision outside the prefix: its stream ends on a progress event past its own.
    revision = await post("/set", {"key": "q/z", "val": "z"})
    changes.append(("set", "q/z", "z", revision))
    return start, sorted(changes, key=lambda change: (change[3], change[1]))


def as_changes(events: list[MessageEvent]) -> list[Change]:
    """The change events, as a log; progress events are not changes."""
    log = []
    for event in events:
        if event.type in CHANGE_TYPES:
            data = json.loads(event.data)
            assert data["type"] == event.type
            log.append((event.type, data["key"], data.get("val"), data["revision"]))
    return log


async def read_until(
    client: Client,
    params: dict[str, str],
    source: EventSourceState,
    changes: int,
    revision: int,
) -> tuple[bytes, EventStreamParser]:
    """Connect as ``source``, an EventSource, does (with its last event ID string as
    Last-Event-ID, unless it is empty) and read until ``changes`` change events have been
    dispatched, or a progress event says the stream has everything up to ``revision``; the
    body read (after chunked decoding) and the connection's parser."""
    headers = {"Accept": "text/event-stream"}
    if source.last_event_id:
        headers["Last-Event-ID"] = source.last_event_id
    parser = EventStreamParser(source)
    body = b""

    async def read() -> None:
        nonlocal body
        async with client.get("/changes", params=params, headers=headers) as response:
            assert response.status == 200, await response.text()
            taken = 0
            async for data in response.content.iter_any():
                body += data
                for event in parser.feed(data):
                    taken += event.type in CHANGE_TYPES
                    if taken >= changes:
                        return
                    if event.type == "progress" and json.loads(event.data)["revision"] >= revision:
                        return

    await asyncio.wait_for(read(), RESUME_TIMEOUT)
    return body, parser


def with_ids(events: list[MessageEvent]) -> list[tuple[Change, str]]:
    """The change events, each with the last event ID string it was dispatched with."""
    changes = as_changes(events)
    ids = [event.last_event_id for event in events if event.type in CHANGE_TYPES]
    return list(zip(changes, ids))


@pytest.mark.parametrize("prefix", ["", "p/"], ids=["whole-store", "prefix"])
async def test_a_stream_cut_at_any_byte_resumes_from_the_browsers_last_event_id(
    client: Client, clock: FakeClock, prefix: str
) -> None:
    """Read the stream once; then, for every byte, reconnect from where a browser cut there
    would be. What it dispatched before the cut and after it is every change once, in order;
    each change comes with the id it had in the first reading; and the last event ID string
    the browser holds never goes back (an empty one would replay from ``since``)."""
    start, written = await write_history(client, clock)
    expected = [change for change in written if change[1].startswith(prefix)]
    final = written[-1][3]
    events_per_revision = Counter(change[3] for change in expected)
    assert len(events_per_revision) >= 5 and max(events_per_revision.values()) >= 3
    params = {"since": str(start), "prefix": prefix}
    body, whole = await read_until(client, params, EventSourceState(), len(expected) + 1, final)
    assert as_changes(whole.dispatched) == expected
    assert whole.dispatched[-1].type == "progress"  # the stream had everything, and said so
    assert whole.source.reconnection_ms == 1000
    expected_ids = with_ids(whole.dispatched)
    # The ids in the order the stream gave them: a browser's last event ID moves along these.
    order: dict[str, int] = {"": -1}
    for event_id in whole.ids:
        order.setdefault(event_id, len(order))

    # Where a browser would be after each byte: its last event ID string, and the events it
    # has dispatched (parsing byte by byte is parsing each prefix: the parser streams).
    source = EventSourceState()
    parser = EventStreamParser(source)
    cuts = [(0, "", 0)]
    taken = 0
    for cut in range(1, len(body) + 1):
        taken += sum(event.type in CHANGE_TYPES for event in parser.feed(body[cut - 1 : cut]))
        cuts.append((cut, source.last_event_id, taken))
    assert parser.dispatched == whole.dispatched

    async def resume(cut: int, last_event_id: str, taken: int) -> None:
        before = expected_ids[:taken]
        browser = EventSourceState()
        browser.last_event_id = last_event_id
        _, resumed = await read_until(client, params, browser, len(expected) - len(before), final)
        assert before + with_ids(resumed.dispatched) == expected_ids, (cut, last_event_id)
        held = [order[last_event_id]] + [order.get(event_id, -2) for event_id in resumed.ids]
        assert held == sorted(held) and min(held[1:], default=0) >= 0, (cut, resumed.ids)

    # A few reconnections at a time: each is a real request, on a connection of its own.
    for first in range(0, len(cuts), RECONNECTIONS_AT_ONCE):
        batch = cuts[first : first + RECONNECTIONS_AT_ONCE]
        await asyncio.gather(*(resume(*cut) for cut in batch))
