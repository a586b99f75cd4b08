"""GET /changes over HTTP, in-process on every backend: long-polls and their edges, streams of
Server-Sent Events read by a real SSE client, the 410s, and list-then-watch."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any, Optional

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from mapmg_data_engineer_takehome.state import FEED_KEY, STORE_KEY
from mapmg_data_engineer_takehome.store.base import Changes, StoreUnavailable, UnknownRevision

from .conftest import Client, FakeClock, MakeClient
from .test_api import assert_error


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_795_000_000.0)  # 2026-11-18T11:06:40Z


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    # No background purge: the tests purge when they mean to, on their clock.
    return await make_client(store=store_kind, clock=clock, purge_interval=3600)


async def poll(client: Client, **params: Any) -> Any:
    response = await client.get("/changes", params={k: str(v) for k, v in params.items()})
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def write(client: Client, key: str, val: str = "v", **extra: Any) -> int:
    response = await client.post("/set", json={"key": key, "val": val, **extra})
    assert response.status == 200
    return int(response.headers["ETag"].strip('"'))


def event(revision: int, key: str, val: Optional[str] = None, kind: str = "set") -> Any:
    if kind != "set":
        return {"revision": revision, "type": kind, "key": key}
    return {"revision": revision, "type": "set", "key": key, "val": val, "expires_at": None}


async def assert_gone(response: Any, code: str) -> Any:
    """A 410: the error shape, with the revision a client needs to act on."""
    assert response.status == 410
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"] == code
    assert "List the keys again" in body["message"]
    return body


# --- long-poll ------------------------------------------------------------------------------


async def test_a_poll_that_does_not_wait_answers_what_there_is(client: Client) -> None:
    first = await write(client, "a", "1")
    answer = await poll(client, since=0, timeout=0)
    assert answer == {"events": [event(first, "a", "1")], "next": first, "more": False}
    assert await poll(client, since=first, timeout=0) == {
        "events": [],
        "next": first,
        "more": False,
    }


async def test_a_poll_answers_as_soon_as_a_change_commits(client: Client) -> None:
    start = await write(client, "before")
    waiting = asyncio.ensure_future(poll(client, since=start, timeout=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    began = time.monotonic()
    written = await write(client, "k", "new")
    answer = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - began < 1
    assert answer == {"events": [event(written, "k", "new")], "next": written, "more": False}


async def test_a_watchers_first_answer_holds_every_write_answered_before_it(
    client: Client,
) -> None:
    """The feed's tail reads the store at most every REFRESH_INTERVAL under a run of writes;
    a watcher that asks right after a write was answered must still get it: a long-poll that
    may wait answers never less than a poll of the store would. (A stream reads first as a
    long-poll does.)"""
    start = await write(client, "before")
    await poll(client, since=start, timeout=0.01)  # the feed runs: its tail answers from now
    history: list[Any] = []
    for number in range(20):
        written = await write(client, f"k{number}", str(number))
        history.append(event(written, f"k{number}", str(number)))
        answer = await poll(client, since=start, timeout=5)
        assert answer == {"events": history, "next": written, "more": False}, number


async def test_a_timeout_is_an_answer_without_events_and_next_moves_on(client: Client) -> None:
    start = await write(client, "cfg/a")
    began = time.monotonic()
    waiting = asyncio.ensure_future(poll(client, since=start, prefix="cfg/", timeout=0.5))
    await asyncio.sleep(0.1)
    other = await write(client, "other")  # not under the prefix: no event, but next moves
    answer = await waiting
    assert time.monotonic() - began >= 0.5
    assert answer == {"events": [], "next": other, "more": False}


async def test_a_limit_never_splits_a_revision_and_says_more(client: Client) -> None:
    items = [{"key": f"k{index}", "val": str(index)} for index in range(5)]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]
    last = await write(client, "last", "6")
    cut = await poll(client, since=0, limit=2, timeout=0)
    assert [item["key"] for item in cut["events"]] == [f"k{index}" for index in range(5)]
    assert cut["more"] is True and cut["next"] == batch
    rest = await poll(client, since=cut["next"], limit=2, timeout=0)
    assert rest == {"events": [event(last, "last", "6")], "next": last, "more": False}
    whole = await poll(client, since=0, limit=6, timeout=0)
    assert len(whole["events"]) == 6 and whole["more"] is False


async def test_a_resume_inside_a_revision_counts_the_limit_from_there(client: Client) -> None:
    """Last-Event-ID R.1, one of R's two events had: an answer of limit 2 is the rest of R and
    then the next revision, from the store (no wait) and from the feed's tail (a wait) alike;
    the events the watcher had count for nothing."""
    items = [{"key": "a", "val": "1"}, {"key": "a/1", "val": "2"}]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]
    last = await write(client, "a", "3")
    for timeout in ("0", "0.01"):
        response = await client.get(
            "/changes",
            params={"limit": "2", "timeout": timeout},
            headers={"Last-Event-ID": f"{batch}.1"},
        )
        assert await response.json() == {
            "events": [event(batch, "a/1", "2"), event(last, "a", "3")],
            "next": last,
            "more": False,
        }


async def test_a_resume_claiming_more_of_a_revision_than_its_prefix_has_is_the_whole_revision(
    client: Client, http: httpx.AsyncClient
) -> None:
    """Last-Event-ID R.1 on a prefix under which R has one event (an id of another prefix's
    stream): the watcher had all of R there. A long-poll of limit 1 answers one revision, not
    one event more for the claim, and a stream numbers the next revision from its start.
    (The feed model found both.)"""
    both = [{"key": "a", "val": "1"}, {"key": "a/1", "val": "2"}]
    first = (await (await client.post("/mset", json={"items": both})).json())["version"]
    items = [{"key": key, "val": "3"} for key in ("a", "a/1", "a/2")]
    second = (await (await client.post("/mset", json={"items": items})).json())["version"]
    third = await write(client, "a/3", "4")
    await write(client, "a/2", "5")
    for prefix, events in (
        ("a/", [event(second, "a/1", "3"), event(second, "a/2", "3")]),
        ("a/2", [event(second, "a/2", "3")]),  # none of the first revision's is under it
    ):
        for timeout in ("0", "0.01"):
            response = await client.get(
                "/changes",
                params={"prefix": prefix, "limit": "1", "timeout": timeout},
                headers={"Last-Event-ID": f"{first}.1"},
            )
            assert await response.json() == {"events": events, "next": second, "more": True}
    headers = {"Last-Event-ID": f"{first}.1"}
    _, received = await read_stream(http, client, 3, params={"prefix": "a/"}, headers=headers)
    assert [(sse.id, sse.json()["key"]) for sse in received] == [
        (f"{second}.1", "a/1"),
        (str(second), "a/2"),
        (str(third), "a/3"),
    ]


async def test_without_since_the_feed_starts_now(client: Client) -> None:
    now = await write(client, "old")
    assert await poll(client, timeout=0) == {"events": [], "next": now, "more": False}
    waiting = asyncio.ensure_future(poll(client, timeout=10))
    await asyncio.sleep(0.2)
    written = await write(client, "new")
    assert (await waiting)["events"] == [event(written, "new", "v")]


async def test_every_kind_of_change_as_the_feed_gives_it(client: Client, clock: FakeClock) -> None:
    start = await write(client, "start")
    expiring = await write(client, "soon", "x", ttl=1.5)
    items = [{"key": "b", "val": "2"}, {"key": "a", "val": "1"}]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]
    assert (await (await client.post("/mdelete", json={"keys": ["a", "b", "c"]})).json()) == {
        "deleted": 2
    }
    clock.advance(2)
    assert await client.app[STORE_KEY].purge_expired(10) == 1
    answer = await poll(client, since=start, timeout=0)
    assert answer["events"] == [
        {
            "revision": expiring,
            "type": "set",
            "key": "soon",
            "val": "x",
            "expires_at": "2026-11-18T11:06:41.500Z",
        },
        event(batch, "a", "1"),
        event(batch, "b", "2"),
        event(batch + 1, "a", kind="delete"),
        event(batch + 1, "b", kind="delete"),
        event(batch + 2, "soon", kind="expire"),
    ]
    assert answer["next"] == batch + 2


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ({"since": "-1"}, "since"),
        ({"since": "x"}, "since"),
        ({"since": "1.5"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"timeout": "-1"}, "timeout"),
        ({"timeout": "61"}, "timeout"),
        ({"timeout": "nan"}, "timeout"),
        ({"prefx": "a"}, "prefx"),
    ],
)
async def test_a_wrong_parameter_is_422_naming_it(
    client: Client, query: dict[str, str], parameter: str
) -> None:
    response = await client.get("/changes", params=query)
    assert f"'{parameter}'" in await assert_error(response, 422, "invalid_parameter")


async def test_a_repeated_parameter_is_422(client: Client) -> None:
    response = await client.get("/changes?since=1&since=2")
    assert "'since'" in await assert_error(response, 422, "invalid_parameter")


async def test_a_last_event_id_that_is_not_a_revision_is_400(client: Client) -> None:
    response = await client.get("/changes", headers={"Last-Event-ID": "abc"})
    assert "Last-Event-ID" in await assert_error(response, 400, "invalid_header")


async def test_a_since_the_history_no_longer_holds_is_410_compacted(client: Client) -> None:
    first, second, _ = [await write(client, f"k{index}") for index in range(3)]
    assert await client.app[STORE_KEY].trim_history(3600, 1, 100) == 2
    for params in ({"since": str(first), "timeout": "0"}, {"since": "0", "timeout": "5"}):
        body = await assert_gone(await client.get("/changes", params=params), "compacted")
        assert body["compact_revision"] == second
    assert len((await poll(client, since=second, timeout=0))["events"]) == 1


async def test_a_since_above_the_store_is_410_unknown_revision(client: Client) -> None:
    revision = await write(client, "a")
    for headers in ({}, {"Accept": "text/event-stream"}):
        response = await client.get("/changes", params={"since": "99"}, headers=headers)
        body = await assert_gone(response, "unknown_revision")
        assert body["revision"] == revision


async def test_a_listing_says_its_revision(client: Client) -> None:
    response = await client.get("/keys")
    before = int(response.headers["KV-Revision"])
    revision = await write(client, "a")
    assert revision == before + 1
    response = await client.get("/keys", params={"prefix": "none"})
    assert response.headers["KV-Revision"] == str(revision)


async def test_the_feed_needs_the_token(make_client: MakeClient) -> None:
    client = await make_client(store="memory", auth_token="s3cret")
    await assert_error(await client.get("/changes?timeout=0"), 401, "unauthorized")
    response = await client.get("/changes?timeout=0", headers={"Authorization": "Bearer s3cret"})
    assert response.status == 200


async def test_many_waiting_watchers_cost_one_read_per_change(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fan-out: 50 long-polls on 5 prefixes wait; one write wakes those of its prefix,
    with one read of the store for all of them."""
    start = await write(client, "start")
    store = client.app[STORE_KEY]
    reads: list[int] = []
    read = asyncio.Event()
    original = store.changes

    async def counted(prefix: str, since: int, limit: int) -> Changes:
        reads.append(since)
        read.set()
        return await original(prefix, since, limit)

    monkeypatch.setattr(store, "changes", counted)
    # The store's listener wakes the feed once when it begins (on PostgreSQL once its own
    # connection is made, which may take a while): that read is not one to count.
    await client.app[FEED_KEY].start()
    await asyncio.wait_for(read.wait(), 10)
    polls = [
        asyncio.ensure_future(poll(client, since=start, prefix=f"p{index % 5}/", timeout=1))
        for index in range(50)
    ]
    await asyncio.sleep(0.3)
    reads.clear()
    written = await write(client, "p1/key")
    await asyncio.sleep(0.3)
    assert reads == [start]  # the feed's refresh, once
    done = [task for task in polls if task.done()]
    assert len(done) == 10
    for task in done:
        assert (await task)["events"] == [event(written, "p1/key", "v")]
    for task in polls:
        if not task.done():
            assert (await task)["events"] == []  # timed out, untouched by the write
    assert reads == [start]


async def test_after_a_failed_refresh_the_feed_asks_the_store_until_one_succeeds(
    client: Client, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feed's tail is this process's copy of the store's history, good only while the
    store answers: a store that failed over to a standby may lack the last revisions the
    tail holds. Once a refresh has failed, a watcher's first answer comes from the store
    (here a 410: the revision is not the store's), not from the tail."""
    revision = await write(client, "start")
    feed = client.app[FEED_KEY]
    await feed.start()
    deadline = time.monotonic() + 10
    while feed.revision != revision:
        assert time.monotonic() < deadline, "the feed never caught up"
        await asyncio.sleep(0.01)
    refresh_failed = asyncio.Event()

    async def failed_over(prefix: str, since: int, limit: int) -> Changes:
        if prefix == "":  # the feed's refresh
            refresh_failed.set()
            raise StoreUnavailable("the database went away")
        raise UnknownRevision(revision - 1)

    monkeypatch.setattr(client.app[STORE_KEY], "changes", failed_over)
    await write(client, "meanwhile")  # wakes a refresh
    await asyncio.wait_for(refresh_failed.wait(), 10)
    response = await http.get(
        str(client.make_url("/changes")),
        params={"prefix": "p/"},
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(revision)},
    )
    assert response.status_code == 410
    assert response.json()["error"] == "unknown_revision"


# --- streams --------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as session:
        yield session


async def read_stream(
    http: httpx.AsyncClient,
    client: Client,
    count: int,
    params: Optional[dict[str, str]] = None,
    headers: Optional[dict[str, str]] = None,
    during: Any = None,
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """The first ``count`` events of a stream; ``during`` (a coroutine) runs once it is open."""
    received: list[ServerSentEvent] = []
    url = str(client.make_url("/changes"))
    async with aconnect_sse(http, "GET", url, params=params, headers=dict(headers or {})) as source:
        task = None if during is None else asyncio.ensure_future(during)
        async for sse in source.aiter_sse():
            received.append(sse)
            if len(received) == count:
                break
        if task is not None:
            await task
        return source.response, received


def as_tuples(events: list[ServerSentEvent]) -> list[tuple[str, str, Any]]:
    return [(sse.event, sse.id, sse.json()) for sse in events]


async def test_a_stream_is_server_sent_events_that_a_real_client_reads(
    client: Client, http: httpx.AsyncClient
) -> None:
    first = await write(client, "a", "1")
    items = [{"key": "c", "val": "3"}, {"key": "b", "val": "2"}]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]

    async def later() -> None:
        await asyncio.sleep(0.2)
        await client.delete("/delete/a")

    response, received = await read_stream(http, client, 4, params={"since": "0"}, during=later())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert received[0].retry == 1000
    assert [(sse.event, sse.json()) for sse in received] == [
        ("set", event(first, "a", "1")),
        ("set", event(batch, "b", "2")),
        ("set", event(batch, "c", "3")),
        ("delete", event(batch + 1, "a", kind="delete")),
    ]
    # Each event's id, where the client would resume: inside a batch, its place in it.
    assert [sse.id for sse in received] == [str(first), f"{batch}.1", str(batch), str(batch + 1)]


async def test_the_stream_on_the_wire(client: Client, http: httpx.AsyncClient) -> None:
    first = await write(client, "a", "1")
    items = [{"key": "c", "val": "3"}, {"key": "b", "val": "2", "ttl": 60}]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]
    url = str(client.make_url("/changes"))
    text = ""
    headers = {"Accept": "text/event-stream"}
    async with http.stream("GET", url, params={"since": "0"}, headers=headers) as response:
        async for chunk in response.aiter_text():
            text += chunk
            if text.count("\n\n") == 3:
                break
    assert text == (
        "retry: 1000\n"
        f"event: set\nid: {first}\n"
        f'data: {{"revision":{first},"type":"set","key":"a","val":"1","expires_at":null}}\n\n'
        f"event: set\nid: {batch}.1\n"
        f'data: {{"revision":{batch},"type":"set","key":"b","val":"2",'
        '"expires_at":"2026-11-18T11:07:40.000Z"}\n\n'
        f"event: set\nid: {batch}\n"
        f'data: {{"revision":{batch},"type":"set","key":"c","val":"3","expires_at":null}}\n\n'
    )


async def test_a_stream_without_since_begins_by_saying_where_it_is(
    client: Client, http: httpx.AsyncClient
) -> None:
    now = await write(client, "a")
    _, received = await read_stream(http, client, 1)
    assert as_tuples(received) == [("progress", str(now), {"revision": now})]


async def test_an_idle_stream_sends_progress_that_moves_its_resume_point(
    make_client: MakeClient, store_kind: str, http: httpx.AsyncClient
) -> None:
    client = await make_client(store=store_kind, changes_heartbeat=0.3)
    start = await write(client, "cfg/a")

    async def elsewhere() -> None:
        await asyncio.sleep(0.1)
        await write(client, "other")

    began = time.monotonic()
    _, received = await read_stream(
        http, client, 3, params={"prefix": "cfg/", "since": str(start)}, during=elsewhere()
    )
    assert [sse.event for sse in received] == ["progress"] * 3
    assert received[0].id == str(start)
    assert received[1].id == received[2].id == str(start + 1)  # past the write elsewhere
    assert 0.5 <= time.monotonic() - began < 3


async def test_last_event_id_wins_over_since(client: Client, http: httpx.AsyncClient) -> None:
    _, second, third = [await write(client, key) for key in ("a", "b", "c")]
    _, received = await read_stream(
        http, client, 1, params={"since": "0"}, headers={"Last-Event-ID": str(second)}
    )
    assert as_tuples(received) == [("set", str(third), event(third, "c", "v"))]


async def test_a_stream_of_a_prefix_ids_the_last_event_of_its_own(
    client: Client, http: httpx.AsyncClient
) -> None:
    items = [{"key": key, "val": "1"} for key in ("a/1", "b/1", "a/2", "c")]
    batch = (await (await client.post("/mset", json={"items": items})).json())["version"]
    _, received = await read_stream(http, client, 2, params={"since": "0", "prefix": "a/"})
    assert [(sse.id, sse.json()["key"]) for sse in received] == [
        (f"{batch}.1", "a/1"),
        (str(batch), "a/2"),
    ]


async def test_closing_the_server_ends_streams_and_polls_at_once(
    client: Client, http: httpx.AsyncClient
) -> None:
    start = await write(client, "a")
    waiting = asyncio.ensure_future(poll(client, since=start, timeout=30))
    url = str(client.make_url("/changes"))
    async with aconnect_sse(http, "GET", url) as source:
        events = source.aiter_sse()
        assert (await events.__anext__()).event == "progress"
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await client.app[FEED_KEY].close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(events.__anext__(), 2)
    assert (await asyncio.wait_for(waiting, 2)) == {"events": [], "next": start, "more": False}
    assert time.monotonic() - began < 1


# --- list, then watch -----------------------------------------------------------------------


async def test_list_then_watch_converges_under_concurrent_writes(client: Client) -> None:
    """docs/api.md's loop: list every page, then watch from the first page's KV-Revision,
    applying an event to a key only when it is newer than the version the listing gave."""
    keys = [f"k{index:02d}" for index in range(30)]
    generator = random.Random(20261130)
    for key in keys:
        await write(client, key, "initial")
    writing = True

    async def writer() -> None:
        nonlocal writing
        for step in range(300):
            choice = generator.random()
            key = generator.choice(keys)
            if choice < 0.5:
                await write(client, key, f"v{step}")
            elif choice < 0.7:
                await client.delete(f"/delete/{key}")
            elif choice < 0.85:
                items = [{"key": k, "val": f"b{step}"} for k in generator.sample(keys, 3)]
                await client.post("/mset", json={"items": items})
            else:
                await client.post("/mdelete", json={"keys": generator.sample(keys, 3)})
            await asyncio.sleep(0)
        writing = False

    task = asyncio.ensure_future(writer())
    # List, a few keys a page, while the writes go on.
    mirror: dict[str, tuple[int, str]] = {}
    query = {"limit": "4", "values": "true"}
    since: Optional[int] = None
    while True:
        response = await client.get("/keys", params=query)
        since = int(response.headers["KV-Revision"]) if since is None else since
        page = await response.json()
        for item in page["items"]:
            mirror[item["key"]] = (item["version"], item["val"])
        if page["cursor"] is None:
            break
        query["cursor"] = page["cursor"]
        await asyncio.sleep(0.01)
    # Then watch from the first page's revision.
    while True:
        answer = await poll(client, since=since, timeout=0.2)
        for change in answer["events"]:
            held = mirror.get(change["key"])
            if held is not None and change["revision"] <= held[0]:
                continue  # the listing already had this key at a later version
            if change["type"] == "set":
                mirror[change["key"]] = (change["revision"], change["val"])
            else:
                mirror.pop(change["key"], None)
        since = answer["next"]
        if not writing and not answer["events"] and not answer["more"]:
            break
    await task
    final = await (await client.get("/keys", params={"values": "true", "limit": "1000"})).json()
    assert mirror == {item["key"]: (item["version"], item["val"]) for item in final["items"]}
