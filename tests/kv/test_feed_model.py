"""A model check of the change feed through every path a watcher can take, across a store's
lives: hypothesis writes (sets, batches, deletes, expiries, imports that merge or replace,
compaction), restarts the store in every way it can be restarted (the same data again, a
memory store's new life, a copy of the sqlite file put back, a move to a fresh store by export
and import), and reads the feed from random places, those handed out by earlier lives and
other stores included, three ways: a long-poll that does not wait (the store), a long-poll that
may (the feed's tail), and a stream of Server-Sent Events resumed with Last-Event-ID.

The model keeps the whole history of the store it stands for, and predicts each answer: the
exact slice of it (cut as the API cuts it, each event with its id), or the 410 that the
history's compact revision and the gaps its lives left call for. Every answer is compared as a
log, in order, so that a repeat or a gap shows.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings, stateful
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from pydantic import SecretStr
from yarl import URL

from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.rules import rfc3339
from mapmg_data_engineer_takehome.settings import Settings, StoreKind
from mapmg_data_engineer_takehome.state import FEED_KEY, STORE_KEY

from .conftest import STORE_KINDS, TEST_POSTGRES_TIMEOUT, FakeClock, fresh_postgres_urls
from .test_feed import caught_up

KEYS = st.sampled_from(["a", "a/1", "a/2", "b", "b/1"])
PREFIXES = st.sampled_from(["", "a", "a/", "b/", "z"])
VALUES = st.sampled_from(["", "v", "w" * 30, "ключ"])
TTLS = st.sampled_from([None, None, 1, 3])
MICROSECONDS = 1_000_000


@dataclass
class History:
    """What the model says a store holds: its keys (value, version, expiry in ms), its
    revision, its changes above the compact revision, and the gaps its lives left."""

    keys: dict[str, tuple[str, int, Optional[int]]] = field(default_factory=dict)
    revision: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)
    compact_revision: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)

    def copy(self) -> History:
        return replace(self, keys=dict(self.keys), changes=list(self.changes), gaps=list(self.gaps))

    def begin_life(self, start: int) -> None:
        assert start >= self.revision
        if start > self.revision:
            self.gaps.append((self.revision, start))
        self.revision = start

    def refusal(self, since: int) -> Optional[tuple[str, int]]:
        """The 410 a read after ``since`` gets, and the revision it carries; None for 200."""
        if since < self.compact_revision:
            return "compacted", self.compact_revision
        if since > self.revision or any(low < since < high for low, high in self.gaps):
            return "unknown_revision", self.revision
        return None

    def after(self, prefix: str, revision: int, taken: int) -> list[dict[str, Any]]:
        """Every change under ``prefix`` after the place (revision, taken), each with its id."""
        since = revision - 1 if taken else revision
        matching = [
            c for c in self.changes if c["revision"] > since and c["key"].startswith(prefix)
        ]
        with_ids = []
        for index, change in enumerate(matching):
            place = sum(1 for c in matching[:index] if c["revision"] == change["revision"]) + 1
            last = (
                index == len(matching) - 1 or matching[index + 1]["revision"] != change["revision"]
            )
            ident = str(change["revision"]) if last else f"{change['revision']}.{place}"
            with_ids.append({**change, "id": ident})
        if taken:
            skip = 0
            while skip < min(taken, len(with_ids)) and with_ids[skip]["revision"] == revision:
                skip += 1
            return with_ids[skip:]
        return with_ids


class FeedMachine(RuleBasedStateMachine):
    """The machine for one kind of store; ``new_postgres_url`` gives a fresh store each call."""

    def __init__(self, kind: StoreKind, new_postgres_url: Callable[[], Optional[str]]) -> None:
        super().__init__()
        self.kind = kind
        self.new_postgres_url = new_postgres_url
        self.directory = Path(tempfile.mkdtemp(prefix="kv-feed-model-"))
        self.loop = asyncio.new_event_loop()
        # Near the real time (a PostgreSQL store's lives begin at the database's clock), on a
        # whole second, so that every expiry in ms is exact.
        self.clock = FakeClock(float(int(time.time())))
        self.stores = 0
        self.settings = self.fresh_settings()
        self.model = History()
        self.saved: Optional[tuple[History, Path]] = None  # a copy of the sqlite file
        # Every place any life of any store handed out, as (revision, taken).
        self.places: set[tuple[int, int]] = {(0, 0)}
        self.client: Optional[TestClient[Any, Any]] = None
        self.start()
        self.model.begin_life(self.observed_revision())

    # --- running the app -------------------------------------------------------------------

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def fresh_settings(self) -> Settings:
        """The settings of a new, empty store."""
        self.stores += 1
        url = self.new_postgres_url()
        return Settings(
            store=self.kind,
            postgres_url=None if url is None else SecretStr(url),
            postgres_timeout=TEST_POSTGRES_TIMEOUT,
            data_path=self.directory / f"store-{self.stores}" / "kv.sqlite3",
            input_db=None,
            log_level="warning",
            log_format="json",
        )

    def start(self) -> None:
        async def start() -> None:
            self.app = create_app(self.settings, clock=self.clock, purge=False)
            self.client = TestClient(TestServer(self.app))
            await self.client.start_server()

        self.run(start())

    def stop(self) -> None:
        assert self.client is not None
        self.run(self.client.close())
        self.client = None
        # Time passes: a life's revisions grow far slower than the clock in microseconds,
        # which a clock standing still over a restart would not be.
        self.clock.advance(1)

    def url(self, route: str) -> URL:
        assert self.client is not None
        return URL(str(self.client.make_url(route)))

    def request(self, method: str, route: str, **kwargs: Any) -> tuple[int, Any]:
        async def send() -> tuple[int, Any]:
            assert self.client is not None
            async with self.client.session.request(method, self.url(route), **kwargs) as answer:
                body = await answer.read()
                if answer.content_type == "application/x-ndjson":
                    return answer.status, body
                return answer.status, orjson.loads(body)

        return self.run(send())  # type: ignore[no-any-return]

    def observed_revision(self) -> int:
        status, answer = self.request("GET", "/changes", params={"timeout": "0"})
        assert status == 200
        return int(answer["next"])

    def now_us(self) -> int:
        return int(self.clock.now * MICROSECONDS)

    # --- writes ------------------------------------------------------------------------------

    def record(self, kind: str, key: str) -> None:
        change: dict[str, Any] = {"revision": self.model.revision, "type": kind, "key": key}
        if kind == "set":
            val, _, expires_at = self.model.keys[key]
            change["val"] = val
            change["expires_at"] = None if expires_at is None else rfc3339(expires_at)
        self.model.changes.append(change)
        self.places.add((self.model.revision, 0))

    def live(self, key: str) -> bool:
        held = self.model.keys.get(key)
        return held is not None and (held[2] is None or held[2] > self.clock.now * 1000)

    def expiry(self, ttl: Optional[float]) -> Optional[int]:
        return None if ttl is None else round((self.clock.now + ttl) * 1000)

    @rule(key=KEYS, val=VALUES, ttl=TTLS)
    def set(self, key: str, val: str, ttl: Optional[float]) -> None:
        body: dict[str, Any] = {"key": key, "val": val, **({} if ttl is None else {"ttl": ttl})}
        assert self.request("POST", "/set", json=body)[0] == 200
        self.model.revision += 1
        self.model.keys[key] = (val, self.model.revision, self.expiry(ttl))
        self.record("set", key)  # a row that had expired is replaced: it gets no expire event

    @rule(items=st.lists(st.tuples(KEYS, VALUES, TTLS), min_size=1, max_size=4))
    def mset(self, items: list[tuple[str, str, Optional[float]]]) -> None:
        body = [{"key": k, "val": v, **({} if t is None else {"ttl": t})} for k, v, t in items]
        assert self.request("POST", "/mset", json={"items": body})[0] == 200
        self.model.revision += 1
        for key, val, ttl in items:
            self.model.keys[key] = (val, self.model.revision, self.expiry(ttl))
        for key in sorted({key for key, _, _ in items}):
            self.record("set", key)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3))
    def mdelete(self, keys: list[str]) -> None:
        deleted = sorted({key for key in keys if self.live(key)})
        status, answer = self.request("POST", "/mdelete", json={"keys": keys})
        assert (status, answer) == (200, {"deleted": len(deleted)})
        if deleted:
            self.model.revision += 1
        for key in deleted:
            del self.model.keys[key]
            self.record("delete", key)

    @rule(seconds=st.sampled_from([1, 2, 4]))
    def expire(self, seconds: float) -> None:
        """Time passes and the purge runs: the keys whose time ran out go, one revision."""
        self.clock.advance(seconds)
        now_ms = self.clock.now * 1000
        expired = sorted(
            k for k, (_, _, e) in self.model.keys.items() if e is not None and e <= now_ms
        )
        assert self.run(self.app[STORE_KEY].purge_expired(100)) == len(expired)
        if expired:
            self.model.revision += 1
        for key in expired:
            del self.model.keys[key]
            self.record("expire", key)

    @rule(
        lines=st.lists(st.tuples(KEYS, VALUES, st.sampled_from([None, 5])), max_size=4),
        replace=st.booleans(),
    )
    def import_lines(self, lines: list[tuple[str, str, Optional[float]]], replace: bool) -> None:
        self.import_rows([(k, v, self.expiry(t)) for k, v, t in lines], replace)

    def import_rows(self, rows: list[tuple[str, str, Optional[int]]], replace: bool) -> None:
        body = b"".join(
            orjson.dumps({"key": k, "val": v, "expires_at": None if e is None else rfc3339(e)})
            + b"\n"
            for k, v, e in rows
        )
        params = {"mode": "replace" if replace else "merge"}
        status, answer = self.request("POST", "/import", data=body, params=params)
        assert status == 200, answer
        now_ms = round(self.clock.now * 1000)  # as the import reads the clock
        skipped = [row for row in rows if row[2] is not None and row[2] <= now_ms]
        rows = [row for row in rows if row not in skipped]  # a line already expired is skipped
        assert (answer["imported"], answer["skipped"]) == (len(rows), len(skipped))
        removed = [k for k in self.model.keys if replace and k not in {r[0] for r in rows}]
        if rows or removed:
            # A bulk load begins a life: above the revision, at the clock or above; what is
            # below it is compacted (a load is not events).
            self.model.revision = max(self.model.revision + 1, self.now_us())
            self.model.compact_revision = self.model.revision
            for key in removed:
                del self.model.keys[key]
            for key, val, expires_at in rows:
                self.model.keys[key] = (val, self.model.revision, expires_at)
            self.places.add((self.model.revision, 0))
        assert answer["revision"] == self.model.revision

    @rule(max_rows=st.integers(0, 6))
    def compact(self, max_rows: int) -> None:
        """The history keeps at most ``max_rows`` changes, the oldest whole revisions first."""
        changes = self.model.changes
        if len(changes) > max_rows:
            cut = changes[len(changes) - max_rows - 1]["revision"]
            self.model.compact_revision = max(self.model.compact_revision, cut)
        kept = [c for c in changes if c["revision"] > self.model.compact_revision]
        dropped = self.run(self.app[STORE_KEY].trim_history(3600, max_rows, 1000))
        assert dropped == len(changes) - len(kept)
        self.model.changes = kept

    # --- lives -------------------------------------------------------------------------------

    @precondition(lambda self: self.kind != "memory")
    @rule()
    def restart(self) -> None:
        """The same data again: a watcher loses nothing it could resume from."""
        self.stop()
        self.start()
        start = self.observed_revision()
        if self.kind == "postgres":  # a replica's start is no new life of the database
            assert start == self.model.revision
        else:  # every opening of the file begins one
            assert start == max(self.model.revision, self.now_us())
        self.model.begin_life(start)

    @precondition(lambda self: self.kind == "memory")
    @rule()
    def restart_memory(self) -> None:
        """A memory store keeps nothing: its new life begins at the clock."""
        self.stop()
        self.start()
        self.model = History()
        self.model.begin_life(self.observed_revision())
        assert self.model.revision == self.now_us()

    @precondition(lambda self: self.kind == "sqlite")
    @rule()
    def copy_the_file(self) -> None:
        """A backup of the data file, made while the server is stopped."""
        self.stop()
        saved = self.directory / f"copy-{self.stores}.sqlite3"
        shutil.copyfile(self.settings.data_path, saved)
        self.saved = (self.model.copy(), saved)
        self.start()
        self.model.begin_life(self.observed_revision())

    @precondition(lambda self: self.kind == "sqlite" and self.saved is not None)
    @rule()
    def put_the_copy_back(self) -> None:
        """The backup restored: what was written after it is gone, and the revisions it was
        given must never name other writes."""
        assert self.saved is not None
        model, saved = self.saved
        self.stop()
        shutil.copyfile(saved, self.settings.data_path)
        self.start()
        self.model = model.copy()
        start = self.observed_revision()
        assert start == max(self.model.revision, self.now_us())
        self.model.begin_life(start)

    @rule()
    def move_to_a_fresh_store(self) -> None:
        """The documented move: an export of the whole store, imported with mode=replace
        into a fresh one (nothing else passed), which serves from then on."""
        status, body = self.request("GET", "/export")
        assert status == 200
        rows = []
        for line in body.splitlines():
            item = orjson.loads(line)
            rows.append((item["key"], item["val"], self.model.keys[item["key"]][2]))
        self.stop()
        self.settings = self.fresh_settings()
        self.saved = None
        self.start()
        self.model = History()
        self.model.begin_life(self.observed_revision())
        if self.kind != "postgres":
            assert self.model.revision == self.now_us()
        self.import_rows(rows, replace=True)

    # --- reads -------------------------------------------------------------------------------

    def place(self, data: st.DataObject, prefix: str) -> tuple[int, int]:
        """A place to read from: one handed out by this or an earlier life (or store), one
        inside a revision of this history, or a number near the edges."""
        revision = self.model.revision
        candidates = [
            *sorted(self.places),
            (revision + 1, 0),
            (self.model.compact_revision, 0),
            (max(self.model.compact_revision - 1, 0), 0),
            *((low + 1, 0) for low, high in self.model.gaps if high - low > 1),
        ]
        chosen = data.draw(st.sampled_from(candidates))
        inside = self.model.after(prefix, chosen[0] - 1, 0) if chosen[0] > 0 else []
        within = [c for c in inside if c["revision"] == chosen[0]]
        if len(within) > 1 and data.draw(st.booleans()):
            return chosen[0], data.draw(st.integers(1, len(within) - 1))
        return chosen

    def expect(self, prefix: str, place: tuple[int, int]) -> Any:
        revision, taken = place
        return self.model.refusal(revision - 1 if taken else revision), self.model.after(
            prefix, revision, taken
        )

    def tail_caught_up(self) -> None:
        """Until the feed's tail has read what the store has (writes, and the compact revision
        a trim moved): it follows the store a refresh behind, a few ms in this process. A read
        that reaches it earlier gets the tail's answer of a moment before, which is exact as
        of then (every change once), but which the model, of the store now, does not predict."""
        self.run(self.app[FEED_KEY].start())
        self.run(caught_up(self.app[FEED_KEY]))

    def assert_gone(self, status: int, answer: Any, refusal: tuple[str, int]) -> None:
        code, carried = refusal
        assert status == 410, (status, answer, refusal)
        assert answer["error"] == code, answer
        field_name = "compact_revision" if code == "compacted" else "revision"
        assert answer[field_name] == carried

    @rule(data=st.data(), prefix=PREFIXES, limit=st.integers(1, 4), wait=st.booleans())
    def long_poll(self, data: st.DataObject, prefix: str, limit: int, wait: bool) -> None:
        """A long-poll: with timeout 0 the store answers; with a timeout, the feed's tail
        (once it has caught up with the store, so that the answer is predictable)."""
        revision, taken = self.place(data, prefix)
        refusal, events = self.expect(prefix, (revision, taken))
        if wait:
            self.tail_caught_up()
        params = {"prefix": prefix, "limit": str(limit), "timeout": "0.01" if wait else "0"}
        headers = {"Last-Event-ID": f"{revision}.{taken}"} if taken else {}
        if not taken:
            params["since"] = str(revision)
        status, answer = self.request("GET", "/changes", params=params, headers=headers)
        if refusal is not None:
            self.assert_gone(status, answer, refusal)
            return
        assert status == 200, answer
        cut = events[:limit]
        if cut:
            cut += [c for c in events[limit:] if c["revision"] == cut[-1]["revision"]]
        more = len(cut) < len(events)
        assert answer["events"] == [{k: v for k, v in c.items() if k != "id"} for c in cut]
        assert answer["more"] == more
        assert answer["next"] == (cut[-1]["revision"] if more else self.model.revision)

    @rule(data=st.data(), prefix=PREFIXES, limit=st.integers(1, 4))
    def stream(self, data: st.DataObject, prefix: str, limit: int) -> None:
        """A stream of Server-Sent Events resumed from a place with Last-Event-ID, as an
        EventSource does: every change after it, each once, each with its id, then quiet."""
        revision, taken = self.place(data, prefix)
        refusal, events = self.expect(prefix, (revision, taken))
        ident = f"{revision}.{taken}" if taken else str(revision)
        headers = {"Accept": "text/event-stream", "Last-Event-ID": ident}
        self.tail_caught_up()
        params = {"prefix": prefix, "limit": str(limit)}
        status, received = self.run(self.read_stream(params, headers, len(events)))
        if refusal is not None:
            self.assert_gone(status, received, refusal)
            return
        assert status == 200
        changes = [event for event in received if event["event"] != "progress"]
        assert changes == [
            {"event": c["type"], "id": c["id"], "data": {k: v for k, v in c.items() if k != "id"}}
            for c in events
        ]
        if not events:  # it opens by saying where it is
            assert received[0] == {
                "event": "progress",
                "id": str(self.model.revision),
                "data": {"revision": self.model.revision},
            }
        for change in events:
            self.places.add(_place(change["id"]))

    async def read_stream(
        self, params: dict[str, str], headers: dict[str, str], count: int
    ) -> tuple[int, Any]:
        """The stream's first ``count`` change events (or its opening progress event), and
        whatever else comes within a moment after them: nothing should."""
        assert self.client is not None
        async with self.client.session.get(
            self.url("/changes"), params=params, headers=headers
        ) as answer:
            if answer.status != 200:
                return answer.status, orjson.loads(await answer.read())
            received: list[dict[str, Any]] = []
            fields: dict[str, Any] = {}
            wanted = max(count, 1)
            while True:
                try:
                    line = await asyncio.wait_for(
                        answer.content.readline(), 5 if len(received) < wanted else 0.05
                    )
                except asyncio.TimeoutError:
                    assert len(received) >= wanted, received
                    return answer.status, received
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition(": ")
                    if name in ("event", "id", "data"):
                        fields[name] = orjson.loads(value) if name == "data" else value
                    continue
                if fields:
                    received.append(fields)
                    fields = {}

    def teardown(self) -> None:
        if self.client is not None:
            self.run(self.client.close())
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _place(ident: str) -> tuple[int, int]:
    revision, _, taken = ident.partition(".")
    return int(revision), int(taken or 0)


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_the_feed_answers_every_read_as_its_model_across_lives(
    kind: StoreKind, request: pytest.FixtureRequest
) -> None:
    new_postgres_url = fresh_postgres_urls(kind, request)
    # The quick suite runs a few examples; the full one (--run-slow, as CI) more.
    examples = 60 if request.config.getoption("--run-slow") else 8
    stateful.run_state_machine_as_test(
        lambda: FeedMachine(kind, new_postgres_url),  # type: ignore[arg-type]
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None),
    )
