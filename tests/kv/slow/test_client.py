"""The Python client, both flavours, against live servers on both stores: every method, the
typed exceptions for each error the server gives, the retry rules (against a scripted server
that counts what it is sent), compare_and_set under contention, and a watch that resumes
across a server killed and restarted, and from inside a revision its stream was cut in, with
nothing missed or repeated."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

import httpx
import pytest

from mapmg_data_engineer_takehome.client import (
    AsyncClient,
    Client,
    Entry,
    Event,
    Forbidden,
    HistoryGone,
    Identity,
    Imported,
    InvalidRequest,
    KeyNotFound,
    PreconditionFailed,
    TokenExists,
    TokenNotFound,
    TokenRule,
    Unauthorized,
    Unavailable,
)

from ..e2e_support import Server, ServerPool, close_loop, free_port

ODD_KEYS = [".", "..", "a/b", "%2F", "?x=1", "#top", "two\nlines", "🔑 key", "sp ace", "\u2028"]
# The lines that make a Server-Sent Event a change of the feed.
CHANGE_FIELDS = frozenset({"event: set", "event: delete", "event: expire"})


class Blocking:
    """An AsyncClient called from blocking test code, on an event loop of its own: the same
    test then checks both flavours."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                return self.loop.run_until_complete(result)
            return self._iterate(result)

        return call

    def _iterate(self, results: AsyncGenerator[Any, None]) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self.loop.run_until_complete(results.__anext__())
                except StopAsyncIteration:
                    return
        finally:  # closed on the loop, which an abandoned async generator's finalizer is not
            self.loop.run_until_complete(results.aclose())


AnyClient = Union[Client, Blocking]
MakeClient = Callable[..., AnyClient]


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """Make clients of one flavour; all are closed at teardown."""
    loop = asyncio.new_event_loop()
    made: list[Union[Client, AsyncClient]] = []

    def make(url: str, **options: Any) -> AnyClient:
        if request.param == "sync":
            client = Client(url, **options)
            made.append(client)
            return client
        async_client = AsyncClient(url, **options)
        made.append(async_client)
        return Blocking(async_client, loop)

    try:
        yield make
    finally:
        for client in made:
            if isinstance(client, Client):
                client.close()
            else:
                loop.run_until_complete(client.close())
        close_loop(loop)  # httpx's generators under httpx-sse's are closed on it first


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    cluster = request.getfixturevalue("postgres_cluster")
    return {"KV_STORE": "postgres", "KV_POSTGRES_URL": cluster.url(cluster.create_database())}


@pytest.fixture
def server(servers: ServerPool, store_env: dict[str, str]) -> Server:
    return servers.start(env=store_env)


def test_every_method_round_trips_on_a_live_server(server: Server, make_client: MakeClient) -> None:
    kv = make_client(url(server))
    assert kv.health()["status"] == "ok"
    version = kv.set("user:1", "Ada")
    assert kv.get("user:1") == Entry("user:1", "Ada", version, None)
    before = datetime.now(timezone.utc)
    version = kv.set("session", "s", ttl=60)
    entry = kv.get("session")
    assert entry.version == version and entry.expires_at is not None
    assert before + timedelta(seconds=59) < entry.expires_at < before + timedelta(seconds=62)
    assert entry.to_json()["expires_at"].endswith("Z")

    for key in ODD_KEYS:
        kv.set(key, f"value of {key}")
    assert kv.mget([*ODD_KEYS, "absent"]) == {
        **{key: f"value of {key}" for key in ODD_KEYS},
        "absent": None,
    }

    batch = kv.mset({f"page/{n:02}": str(n) for n in range(25)}, ttl=3600)
    listed = list(kv.keys("page/", page_size=7))  # four pages
    assert [entry.key for entry in listed] == [f"page/{n:02}" for n in range(25)]
    assert {entry.version for entry in listed} == {batch}
    assert all(entry.val is None and entry.expires_at is not None for entry in listed)
    with_values = list(kv.keys("page/", values=True, page_size=10))
    assert [entry.val for entry in with_values] == [str(n) for n in range(25)]
    everything = list(kv.keys())
    assert sorted(entry.key for entry in everything) == sorted(
        ["user:1", "session", *ODD_KEYS, *(f"page/{n:02}" for n in range(25))]
    )

    many = [f"many/{n}" for n in range(2500)]  # more than one /mget takes
    kv.mset({key: key for key in many})
    assert kv.mget(many) == {key: key for key in many}
    assert kv.mdelete([*many, "never"]) == 2500

    kv.delete("user:1")
    with pytest.raises(KeyNotFound):
        kv.get("user:1")
    assert kv.mdelete([f"page/{n:02}" for n in range(25)]) == 25

    last = kv.set("last", "x")
    backup = io.BytesIO()
    progress: list[int] = []
    assert kv.export(backup, progress=progress.append) == last  # its revision
    exported = [json.loads(line) for line in backup.getvalue().splitlines()]
    assert [line["key"] for line in exported] == sorted(
        ["session", "last", *ODD_KEYS], key=lambda key: key.encode()
    )
    assert progress and progress[-1] == len(backup.getvalue())
    kv.set("after", "x")

    kv.mdelete(ODD_KEYS)
    sent: list[int] = []
    backup.seek(0)
    imported = kv.import_(backup, replace=True, progress=sent.append)
    assert isinstance(imported, Imported)
    assert (imported.imported, imported.skipped) == (len(ODD_KEYS) + 2, 0)
    assert sent[-1] == len(backup.getvalue())
    assert kv.mget(["after", *ODD_KEYS]) == {
        "after": None,  # replace: not in the file
        **{key: f"value of {key}" for key in ODD_KEYS},
    }
    partial = io.BytesIO(b'{"key": "p/1", "val": "1"}\n')
    assert kv.import_(partial, replace=True, prefix="p/").imported == 1
    assert kv.get("p/1").val == "1" and kv.get("session").val == "s"


def test_conditional_writes(server: Server, make_client: MakeClient) -> None:
    kv = make_client(url(server))
    first = kv.set("lock", "a", create=True)
    with pytest.raises(PreconditionFailed) as failed:
        kv.set("lock", "b", create=True)
    assert failed.value.current_version == first and failed.value.status == 412
    second = kv.set("lock", "b", if_version=first)
    with pytest.raises(PreconditionFailed) as failed:
        kv.set("lock", "c", if_version=first)
    assert failed.value.current_version == second
    with pytest.raises(PreconditionFailed) as failed:
        kv.delete("lock", if_version=first)
    assert failed.value.current_version == second
    kv.delete("lock", if_version=second)
    with pytest.raises(PreconditionFailed) as failed:
        kv.set("lock", "d", if_version=second)
    assert failed.value.current_version is None  # absent: no version to give
    with pytest.raises(KeyNotFound):
        kv.delete("lock")


def test_every_error_the_server_gives_is_a_typed_exception(
    servers: ServerPool, make_client: MakeClient
) -> None:
    server = servers.start(env={"KV_AUTH_TOKEN": "s3cret", "KV_MAX_VALUE_BYTES": "100"})
    kv = make_client(url(server), token="s3cret")
    refusals: list[tuple[Callable[[], Any], str]] = [
        (lambda: kv.set("k", "v", ttl=-1), "invalid_ttl"),
        (lambda: kv.set("", "v"), "empty_key"),
        (lambda: kv.set("k" * 5000, "v"), "key_too_long"),
        (lambda: kv.set("k", "v" * 101), "value_too_large"),
        (lambda: kv.set("k", "\ud800"), "invalid_string"),
        (lambda: kv.mset({}), "invalid_batch"),
        (lambda: kv.import_(io.BytesIO(b'{"key": "k"}\n')), "invalid_line"),
        (lambda: list(kv.keys(page_size=5000)), "invalid_parameter"),
    ]
    for call, code in refusals:
        with pytest.raises(InvalidRequest) as refused:
            call()
        assert refused.value.code == code, refused.value.message
        assert refused.value.message and "\n" not in refused.value.message
    with pytest.raises(KeyNotFound) as missing:
        kv.get("absent")
    assert (missing.value.status, missing.value.code) == (404, "key_not_found")
    with pytest.raises(Unauthorized):
        make_client(url(server)).get("k")
    with pytest.raises(Unauthorized):
        make_client(url(server), token="wrong").set("k", "v")

    kv.import_(io.BytesIO(b'{"key": "k", "val": "v"}\n'))  # moves the compact revision
    with pytest.raises(HistoryGone) as gone:
        next(iter(kv.watch(since=0)))
    assert gone.value.code == "compacted"

    server.kill()
    calls: list[Callable[[], Any]] = [lambda: kv.get("k"), lambda: kv.set("k", "v"), kv.health]
    for call in calls:
        with pytest.raises(Unavailable) as down:
            call()
        assert str(server.port) in down.value.message and down.value.status is None


def test_tokens_are_created_listed_rotated_and_revoked(
    servers: ServerPool, store_env: dict[str, str], make_client: MakeClient
) -> None:
    server = servers.start(env={"KV_AUTH_TOKEN": "s3cret", **store_env})
    kv = make_client(url(server), token="s3cret")
    assert kv.whoami() == Identity("KV_AUTH_TOKEN", (TokenRule("", "readwrite"),), True)
    rules = (TokenRule("cfg/", "read"), TokenRule("ci/", "readwrite"))
    created = kv.create_token("ci", [("cfg/", "read"), rules[1]], expires_in=3600)
    assert (created.name, created.rules, created.admin) == ("ci", rules, False)
    assert created.secret is not None and created.secret.startswith("kv_")
    assert created.expires_at is not None
    assert created.expires_at - created.created_at == timedelta(hours=1)
    assert created.created_at.tzinfo is not None and created.last_used_at is None
    admin = kv.create_token("ops", admin=True)
    assert (admin.rules, admin.admin, admin.expires_at) == ((), True, None)

    listed = kv.tokens()
    assert [token.name for token in listed] == ["ci", "ops"]
    assert listed[0] == created.__class__(**{**vars(created), "secret": None})
    assert all(token.secret is None for token in listed)
    assert listed[0].to_json()["rules"] == [rule.to_json() for rule in rules]

    with pytest.raises(TokenExists) as taken:
        kv.create_token("ci")
    assert (taken.value.status, taken.value.code) == (409, "token_exists")
    rotated = kv.rotate_token("ci", grace=60)
    assert rotated.secret is not None and rotated.secret != created.secret
    assert rotated.created_at == created.created_at and rotated.rules == rules
    assert kv.rotate_token("ci").secret not in (None, created.secret, rotated.secret)
    assert kv.revoke_token("ci") is None
    for gone in (lambda: kv.revoke_token("ci"), lambda: kv.rotate_token("ci")):
        with pytest.raises(TokenNotFound) as missing:
            gone()
        assert (missing.value.status, missing.value.code) == (404, "token_not_found")
    assert [token.name for token in kv.tokens()] == ["ops"]
    with pytest.raises(InvalidRequest) as invalid:
        kv.create_token("a b")
    assert invalid.value.code == "invalid_name"
    with pytest.raises(Unauthorized):
        make_client(url(server)).tokens()

    open_server = servers.start(env=store_env)
    anyone = make_client(url(open_server))
    assert anyone.whoami() == Identity(None, (TokenRule("", "readwrite"),), True)
    with pytest.raises(Forbidden) as refused:
        anyone.create_token("ci")
    assert refused.value.code == "forbidden" and "KV_AUTH_TOKEN" in refused.value.message


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass  # not every request on stderr: a failing test shows its own output


class LocalHTTPServer:
    """An HTTP server on a free port of 127.0.0.1, its requests handled in threads."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Scripted:
    """An HTTP server that answers from a script, a status a request, and counts requests."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[str] = []
        scripted = self

        class Handler(QuietHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                scripted.requests.append(f"{self.command} {self.path}")
                status = scripted.statuses.pop(0) if scripted.statuses else 200
                body: dict[str, Any] = {"key": "k", "val": "v"}
                if status != 200:
                    body = {"error": "store_unavailable", "message": "The store is down."}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"7"')
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = handle_one

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list[int]], Scripted]]:
    made: list[Scripted] = []

    def make(statuses: list[int]) -> Scripted:
        made.append(Scripted(statuses))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_blind_write_is_sent_once_and_a_conditional_or_a_read_again(
    make_client: MakeClient, scripted: Callable[[list[int]], Scripted]
) -> None:
    blind: list[Callable[[AnyClient], Any]] = [
        lambda kv: kv.set("k", "v"),
        lambda kv: kv.delete("k"),
        lambda kv: kv.mset({"k": "v"}),
        lambda kv: kv.mdelete(["k"]),
        lambda kv: kv.create_token("ci"),
        lambda kv: kv.rotate_token("ci"),
    ]
    for write in blind:
        server = scripted([503, 503])
        with pytest.raises(Unavailable) as refused:
            write(make_client(server.url, retries=3))
        assert refused.value.status == 503
        assert len(server.requests) == 1, server.requests

    safe: list[Callable[[AnyClient], Any]] = [
        lambda kv: kv.set("k", "v", if_version=3),
        lambda kv: kv.set("k", "v", create=True),
        lambda kv: kv.delete("k", if_version=3),
        lambda kv: kv.get("k"),
        lambda kv: kv.revoke_token("ci"),
    ]
    for call in safe:
        server = scripted([503, 503])
        call(make_client(server.url, retries=3))
        assert len(server.requests) == 3, server.requests

    server = scripted([503] * 5)
    with pytest.raises(Unavailable):
        make_client(server.url, retries=2).get("k")
    assert len(server.requests) == 3  # the first try and two retries

    # A refused connection: a read tries again, and gives up with Unavailable.
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable):
        make_client(closed, retries=2).get("k")
    assert time.monotonic() - started < 5


def test_compare_and_set_keeps_a_counter_exact_under_16_clients(
    server: Server, make_client: MakeClient
) -> None:
    rounds = 10
    clients = [make_client(url(server)) for _ in range(16)]

    def increment(val: Optional[str]) -> str:
        return str(int(val or 0) + 1)

    first = clients[0]
    if isinstance(first, Blocking):
        # The async flavour: all 16 on one loop, as an asyncio service runs them.
        async def one(kv: AsyncClient) -> None:
            for _ in range(rounds):
                await kv.compare_and_set("counter", increment)

        async def all_of_them(async_clients: list[AsyncClient]) -> None:
            await asyncio.gather(*(one(kv) for kv in async_clients))

        first.loop.run_until_complete(
            all_of_them([kv.client for kv in clients if isinstance(kv, Blocking)])
        )
    else:

        def one_thread(kv: AnyClient) -> None:
            for _ in range(rounds):
                kv.compare_and_set("counter", increment)

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            for done in [pool.submit(one_thread, kv) for kv in clients]:
                done.result()
    assert clients[0].get("counter").val == str(16 * rounds)


def test_a_watch_resumes_across_a_restart_with_nothing_missed_or_repeated(
    servers: ServerPool, store_env: dict[str, str], make_client: MakeClient
) -> None:
    port = free_port()
    server = servers.start(port=port, env=store_env)
    writer = Client(url(server))
    watcher = make_client(url(server))
    seen: list[Event] = []
    start = writer.set("other", "not watched")
    events = watcher.watch("w/", since=start)

    def write(numbers: range) -> None:
        for number in numbers:
            if number % 10 == 9:
                writer.mset({f"w/{number}a": "x", f"w/{number}b": "y"})
            else:
                writer.set(f"w/{number}", str(number))

    def read(count: int) -> None:
        while len(seen) < count:
            seen.append(next(events))

    try:
        write(range(20))
        read(22)  # two mset's of two
        server.kill()  # kill -9, mid-stream
        server = servers.start(port=port, env=store_env)
        write(range(20, 40))
        read(44)
        server.stop()  # a clean shutdown ends the stream
        server = servers.start(port=port, env=store_env)
        writer.delete("w/0")
        read(45)
    finally:
        events.close()
        writer.close()
    expected_keys = []
    for number in range(40):
        if number % 10 == 9:
            expected_keys += [f"w/{number}a", f"w/{number}b"]
        else:
            expected_keys.append(f"w/{number}")
    assert [event.key for event in seen] == [*expected_keys, "w/0"]
    assert [event.type for event in seen] == ["set"] * 44 + ["delete"]
    revisions = [event.revision for event in seen]
    assert revisions == sorted(revisions)
    assert len(set(revisions)) == 41  # two per batch, one for every other write


class CuttingProxy:
    """Passes GET /changes streams through to ``upstream`` block by block, and ends the n-th
    stream after ``cuts[n]`` change events (the streams after the last cut go on). Records
    each request's Last-Event-ID and path."""

    def __init__(self, upstream: str, cuts: list[int]) -> None:
        self.cuts = cuts
        self.requests: list[tuple[Optional[str], str]] = []
        proxy = self

        class Handler(QuietHandler):
            # HTTP/1.0: the body ends when the connection does, which is how a stream is cut.
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                last_event_id = self.headers.get("Last-Event-ID")
                proxy.requests.append((last_event_id, self.path))
                cut = proxy.cuts.pop(0) if proxy.cuts else None
                headers = {"Accept": self.headers.get("Accept", "")}
                if last_event_id is not None:
                    headers["Last-Event-ID"] = last_event_id
                # The last stream ends when its watcher leaves, or with the server.
                with contextlib.suppress(httpx.TransportError, OSError):
                    self.forward(upstream + self.path, headers, cut)

            def forward(self, target: str, headers: dict[str, str], cut: Optional[int]) -> None:
                timeout = httpx.Timeout(10.0, read=None)
                with httpx.stream("GET", target, headers=headers, timeout=timeout) as answer:
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers["Content-Type"])
                    self.end_headers()
                    changes = 0
                    block: list[str] = []
                    for line in answer.iter_lines():
                        block.append(line)
                        if line:
                            continue
                        self.wfile.write("\n".join(block).encode() + b"\n")
                        self.wfile.flush()
                        changes += any(field in CHANGE_FIELDS for field in block)
                        block = []
                        if cut is not None and changes >= cut:
                            return

        self.http = LocalHTTPServer(Handler)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()


def test_a_watch_cut_inside_a_revision_resumes_after_the_last_event_it_delivered(
    server: Server, make_client: MakeClient
) -> None:
    writer = Client(url(server))
    # The first stream ends after the batch's first event, the second after one more.
    proxy = CuttingProxy(url(server), cuts=[1, 1])
    watcher = make_client(proxy.url)
    try:
        since = writer.set("m/gone", "0")
        batch = writer.mset({"m/a": "1", "m/b": "2", "m/c": "3"})
        writer.delete("m/gone")
        writer.set("m/a", "4")
        writer.set("m/end", "5")  # read up to: a missed or repeated event is in the log
        log: list[tuple[int, str, str, Optional[str]]] = []
        mirror = {"m/gone": "0"}
        events = watcher.watch("m/", since=since)
        try:
            for event in events:
                log.append((event.revision, event.type, event.key, event.val))
                if event.type == "set":
                    assert event.val is not None
                    mirror[event.key] = event.val
                else:
                    del mirror[event.key]  # a delete applied twice fails here
                if event.key == "m/end":
                    break
        finally:
            events.close()
        history = server.request("GET", f"/changes?prefix=m%2F&since={since}&timeout=0").json()
        assert log == [
            (event["revision"], event["type"], event["key"], event.get("val"))
            for event in history["events"]
        ]
        assert [key for _, _, key, _ in log] == ["m/a", "m/b", "m/c", "m/gone", "m/a", "m/end"]
        assert mirror == {entry.key: entry.val for entry in writer.keys("m/", values=True)}
        # Each reconnection named the last event delivered: inside the batch's revision.
        assert [last_event_id for last_event_id, _ in proxy.requests[:3]] == [
            None,
            f"{batch}.1",
            f"{batch}.2",
        ]
        assert f"since={since}" in proxy.requests[0][1]
        assert "since=" not in proxy.requests[1][1]
    finally:
        proxy.close()
        writer.close()
