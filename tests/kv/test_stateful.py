"""A model check: hypothesis drives the whole API over HTTP against a dict, on every store.

The server is the real app, in-process, on a clock the machine moves. The model predicts every
answer: values, versions (the ETag), expiry, conditional writes, transactions (random compares
and branches), leases (grant, keepalive, read, revoke, a set with one, their expiry by the
upkeep, which is a rule), listings page by page, batches, exports and imports (merge and
replace), and the history of changes. A restart closes
the app (store included) and opens a new one on the same data file: the sqlite store
must then still hold everything acknowledged, the memory store nothing. Each opening of a
store begins a new life, whose revisions start at the clock in microseconds or above (the
numbers skipped answer 410 unknown_revision), and so does each import.

Watchers list their prefix, then follow /changes, each poll on either of two servers that
share the store (two workers on the sqlite file, two replicas on the database; the memory
store has one): every answer must be the model's history under the prefix, cut as the API
cuts it, and the listing with the events applied must be the model's keys. The first watcher
follows after every step; the others fall behind until a rule polls them, and may find their
history compacted. The purge and the trimming of the history are rules too, so that expiry
events and compaction come when the model expects them.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings, stateful
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pydantic import SecretStr
from yarl import URL

from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.rules import rfc3339
from mapmg_data_engineer_takehome.settings import Settings, StoreKind
from mapmg_data_engineer_takehome.state import STORE_KEY

from .conftest import STORE_KINDS, TEST_POSTGRES_TIMEOUT, FakeClock, fresh_postgres_urls

# A small key space, so that rules collide on keys; dots and slashes test the path handling.
KEYS = st.sampled_from(["a", "b", "a/b", "ab", "..", "ключ", "with space", "%41", "\n"])
PREFIXES = st.sampled_from(["", "a", "a/", "k", "z"])
VALUES = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20
)
TTLS = st.sampled_from([None, None, 1, 2.5])
# What a conditional write asks for: none, If-Match on a version near the current ones, or *.
CONDITIONS = st.one_of(
    st.none(),
    st.tuples(st.just("If-Match"), st.integers(0, 3)),
    st.just(("If-Match", "*")),
    st.just(("If-None-Match", "*")),
)

# A compare of POST /txn: its kind, key, operator, and what it compares with: for a version,
# an offset from the key's own (or from 0), so that each operator goes both ways; for a value,
# None for the key's own value.
COMPARES = st.one_of(
    st.tuples(st.just("version"), KEYS, st.sampled_from(["=", "!=", "<", ">"]), st.integers(-1, 1)),
    st.tuples(st.just("value"), KEYS, st.sampled_from(["=", "!="]), st.one_of(st.none(), VALUES)),
    st.tuples(st.just("exists"), KEYS, st.just("="), st.booleans()),
)
# An operation of a branch: get, set, delete of a key, or delete of a prefix.
OPERATIONS = st.one_of(
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("set"), KEYS, VALUES, TTLS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("prefix"), PREFIXES),
)
BRANCHES = st.lists(OPERATIONS, max_size=4)

WATCHERS = st.integers(0, 2)
# A lease a rule names: one of those granted so far (live, revoked or expired), by its place,
# or one never granted.
LEASES = st.integers(0, 3)
UNKNOWN_LEASE = "0" * 32
LEASE_TTLS = st.sampled_from([1, 2.5, 5])


@dataclass
class Held:
    """What the model says a key holds (its row: expired until the purge removes it)."""

    val: str
    version: int
    expires_at: Optional[int]
    lease: Optional[str] = None  # a leased key's expiry is its lease's


@dataclass
class Watcher:
    """A client following a prefix: its position, and the keys it holds (version, value)."""

    prefix: str
    position: int
    mirror: dict[str, tuple[int, str]]


class KeyValueMachine(RuleBasedStateMachine):
    """The machine for one store; ``postgres_url`` is a fresh database for each example."""

    def __init__(self, store: StoreKind, postgres_url: Callable[[], Optional[str]]) -> None:
        super().__init__()
        self.store = store
        self.directory = tempfile.TemporaryDirectory(prefix="kv-stateful-")
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        url = postgres_url()
        self.settings = Settings(
            store=store,
            postgres_url=None if url is None else SecretStr(url),
            postgres_timeout=TEST_POSTGRES_TIMEOUT,
            data_path=Path(self.directory.name) / "kv.sqlite3",
            input_db=None,
            log_level="warning",
            log_format="json",
        )
        self.model: dict[str, Held] = {}
        self.revision = 0
        # (revision, type, key, val, expires_at), as /changes gives them.
        self.history: list[dict[str, Any]] = []
        self.compact_revision = 0
        # The revisions each new life skipped: (forked_at, resumed_at), both excluded.
        self.gaps: list[tuple[int, int]] = []
        self.watchers: dict[int, Watcher] = {}
        # Every lease granted (id: ttl, expiry in ms) until revoked or expired by the upkeep,
        # and every id granted, for the rules to name.
        self.leases: dict[str, tuple[float, int]] = {}
        self.lease_ids: list[str] = []
        self.steps = 0
        self.client: Optional[TestClient[Any, Any]] = None
        # Another server on the same store, for the watchers: none for the memory store.
        self.other: Optional[TestClient[Any, Any]] = None
        self.run(self.start())
        self.begin_life()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def start(self) -> None:
        # No background purge: the purge is a rule, so the model knows when it happens.
        self.app = create_app(self.settings, clock=self.clock, purge=False)
        self.client = TestClient(TestServer(self.app))
        await self.client.start_server()
        if self.store != "memory":
            other = create_app(self.settings, seed=False, purge=False, clock=self.clock)
            self.other = TestClient(TestServer(other))
            await self.other.start_server()

    async def stop(self) -> None:
        for client in (self.client, self.other):
            if client is not None:
                await client.close()

    def begin_life(self) -> None:
        """The store was opened: its revision is where its new life begins, at the clock in
        microseconds or above (PostgreSQL's is the database's, and begins a life only when
        the database server did, not when a replica did)."""
        status, _, answer = self.request("GET", self.url("/changes"), params={"timeout": "0"})
        assert status == 200
        start = answer["next"]
        if self.store == "postgres":
            assert start >= self.revision
        else:
            assert start == max(self.revision, int(self.clock.now * 1_000_000))
        if start > self.revision:
            self.gaps.append((self.revision, start))
        self.revision = start

    def url(self, route: str, key: str = "", other: bool = False) -> URL:
        client = self.other if other and self.other is not None else self.client
        assert client is not None
        encoded = quote(key, safe="").replace(".", "%2E")
        return URL(str(client.make_url("")).rstrip("/") + route + encoded, encoded=True)

    def request(self, method: str, url: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        async def send() -> tuple[int, Any, Any]:
            assert self.client is not None
            async with self.client.session.request(method, url, **kwargs) as response:
                if response.content_type == "application/x-ndjson":  # an export: its lines
                    body = await response.read()
                    lines = [orjson.loads(line) for line in body.split(b"\n") if line]
                    return response.status, response.headers, lines
                return response.status, response.headers, await response.json()

        return self.run(send())  # type: ignore[no-any-return]

    # --- the model -----------------------------------------------------------------------

    def live(self, key: str) -> Optional[Held]:
        held = self.model.get(key)
        if held is None or held.expires_at is None:
            return held
        return held if held.expires_at > self.clock.now * 1000 else None

    def expiry(self, ttl: Optional[float]) -> Optional[int]:
        return None if ttl is None else round((self.clock.now + ttl) * 1000)

    def record(self, kind: str, key: str, held: Optional[Held] = None) -> None:
        """A change of the current revision (self.revision)."""
        change: dict[str, Any] = {"revision": self.revision, "type": kind, "key": key}
        if held is not None:
            change["val"] = held.val
            change["expires_at"] = held.expires_at
        self.history.append(change)

    def precondition_headers(self, key: str, condition: Any) -> tuple[dict[str, str], bool]:
        """The headers for ``condition``, and whether the model says it holds."""
        if condition is None:
            return {}, True
        name, tag = condition
        live = self.live(key)
        if tag == "*":
            holds = live is not None if name == "If-Match" else live is None
            return {name: "*"}, holds
        # A version near the key's own, so that both outcomes happen.
        version = max(0, (live.version if live is not None else self.revision) - tag + 1)
        holds = live is not None and live.version == version
        return {name: f'"{version}"'}, holds

    # --- rules ---------------------------------------------------------------------------

    @rule(key=KEYS, val=VALUES, ttl=TTLS, condition=CONDITIONS)
    def set(self, key: str, val: str, ttl: Optional[float], condition: Any) -> None:
        headers, holds = self.precondition_headers(key, condition)
        body: dict[str, Any] = {"key": key, "val": val}
        if ttl is not None:
            body["ttl"] = ttl
        status, answer_headers, answer = self.request(
            "POST", self.url("/set"), json=body, headers=headers
        )
        if not holds:
            assert (status, answer["error"]) == (412, "precondition_failed")
            live = self.live(key)
            assert answer_headers.get("ETag") == (None if live is None else f'"{live.version}"')
            return
        assert (status, answer) == (200, {"key": key, "val": val})
        self.revision += 1
        self.model[key] = Held(val, self.revision, self.expiry(ttl))
        self.record("set", key, self.model[key])
        assert answer_headers["ETag"] == f'"{self.revision}"'

    # --- leases --------------------------------------------------------------------------

    def lease_named(self, index: int) -> str:
        return self.lease_ids[index] if index < len(self.lease_ids) else UNKNOWN_LEASE

    def live_lease(self, lease: str) -> Optional[tuple[float, int]]:
        found = self.leases.get(lease)
        return found if found is not None and found[1] > self.clock.now * 1000 else None

    def lease_keys(self, lease: str) -> list[str]:
        return sorted(key for key, held in self.model.items() if held.lease == lease)

    @staticmethod
    def lease_answer(lease: str, ttl: float, expires_at: int) -> dict[str, Any]:
        return {"id": lease, "ttl": ttl, "expires_at": rfc3339(expires_at)}

    @rule(ttl=LEASE_TTLS)
    def grant_lease(self, ttl: float) -> None:
        status, _, answer = self.request("POST", self.url("/leases"), json={"ttl": ttl})
        assert status == 200
        lease = answer["id"]
        assert lease not in self.lease_ids
        expires_at = round((self.clock.now + ttl) * 1000)
        assert answer == self.lease_answer(lease, ttl, expires_at)
        self.leases[lease] = (ttl, expires_at)
        self.lease_ids.append(lease)

    @rule(index=LEASES)
    def keepalive_lease(self, index: int) -> None:
        lease = self.lease_named(index)
        status, _, answer = self.request("POST", self.url(f"/leases/{lease}/keepalive"))
        live = self.live_lease(lease)
        if live is None:
            assert (status, answer["error"]) == (404, "lease_not_found")
            return
        expires_at = round((self.clock.now + live[0]) * 1000)
        assert (status, answer) == (200, self.lease_answer(lease, live[0], expires_at))
        self.leases[lease] = (live[0], expires_at)
        for key in self.lease_keys(lease):  # no revision, no change
            self.model[key].expires_at = expires_at

    @rule(index=LEASES)
    def read_lease(self, index: int) -> None:
        lease = self.lease_named(index)
        status, _, answer = self.request("GET", self.url(f"/leases/{lease}"))
        live = self.live_lease(lease)
        if live is None:
            assert (status, answer["error"]) == (404, "lease_not_found")
            return
        expected = {**self.lease_answer(lease, *live), "keys": self.lease_keys(lease)}
        assert (status, answer) == (200, expected)

    @rule(index=LEASES)
    def revoke_lease(self, index: int) -> None:
        lease = self.lease_named(index)
        status, _, answer = self.request("DELETE", self.url(f"/leases/{lease}"))
        if self.live_lease(lease) is None:
            assert (status, answer["error"]) == (404, "lease_not_found")
            return
        keys = self.lease_keys(lease)
        assert (status, answer) == (200, {"id": lease, "revoked": True, "deleted": len(keys)})
        del self.leases[lease]
        if keys:
            self.revision += 1
        for key in keys:
            del self.model[key]
            self.record("delete", key)

    @rule(key=KEYS, val=VALUES, index=LEASES)
    def set_with_lease(self, key: str, val: str, index: int) -> None:
        lease = self.lease_named(index)
        body = {"key": key, "val": val, "lease": lease}
        status, headers, answer = self.request("POST", self.url("/set"), json=body)
        live = self.live_lease(lease)
        if live is None:
            assert (status, answer["error"]) == (404, "lease_not_found")
            return
        assert (status, answer) == (200, {"key": key, "val": val})
        self.revision += 1
        self.model[key] = Held(val, self.revision, live[1], lease)
        self.record("set", key, self.model[key])
        assert headers["KV-Expires-At"] == rfc3339(live[1])

    @rule()
    def expire_leases(self) -> None:
        """The upkeep's removal of expired leases: each with its keys in one revision, in
        order of expiry, then id."""
        now_ms = self.clock.now * 1000
        expired = sorted((e, lease) for lease, (_, e) in self.leases.items() if e <= now_ms)
        store = self.app[STORE_KEY]
        assert self.run(store.expire_leases(100)) == len(expired)
        for _, lease in expired:
            del self.leases[lease]
            keys = self.lease_keys(lease)
            if keys:
                self.revision += 1
            for key in keys:
                del self.model[key]
                self.record("expire", key)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        status, headers, body = self.request("GET", self.url("/get/", key))
        live = self.live(key)
        if live is None:
            assert (status, body["error"]) == (404, "key_not_found")
            return
        assert (status, body) == (200, {"key": key, "val": live.val})
        assert headers["ETag"] == f'"{live.version}"'
        assert ("KV-Expires-At" in headers) == (live.expires_at is not None)

    @rule(key=KEYS, condition=CONDITIONS.filter(lambda c: c is None or c[0] == "If-Match"))
    def delete(self, key: str, condition: Any) -> None:
        headers, holds = self.precondition_headers(key, condition)
        status, _, body = self.request("DELETE", self.url("/delete/", key), headers=headers)
        live = self.live(key)
        if not holds:
            assert status == 412
        elif live is None:
            assert status == 404  # an expired row stays, for the purge to report
        else:
            assert (status, body) == (200, {"key": key, "deleted": True})
            del self.model[key]
            self.revision += 1
            self.record("delete", key)

    @rule(items=st.lists(st.tuples(KEYS, VALUES, TTLS), min_size=1, max_size=5))
    def mset(self, items: list[tuple[str, str, Optional[float]]]) -> None:
        body = [
            {"key": key, "val": val, **({} if ttl is None else {"ttl": ttl})}
            for key, val, ttl in items
        ]
        status, _, answer = self.request("POST", self.url("/mset"), json={"items": body})
        self.revision += 1
        assert (status, answer) == (200, {"count": len(items), "version": self.revision})
        for key, val, ttl in items:
            self.model[key] = Held(val, self.revision, self.expiry(ttl))
        for key in sorted({key for key, _, _ in items}):
            self.record("set", key, self.model[key])

    def txn_compare(self, drawn: tuple[Any, ...]) -> tuple[dict[str, Any], bool]:
        """A drawn compare as the body sends it, and whether the model says it holds."""
        kind, key, cmp, operand = drawn
        live = self.live(key)
        if kind == "version":
            current = 0 if live is None else live.version
            version = max(0, current + operand)
            holds = {
                "=": current == version,
                "!=": current != version,
                "<": current < version,
                ">": current > version,
            }[cmp]
            return {"key": key, "version": version, "cmp": cmp}, holds
        if kind == "value":
            value = operand if operand is not None else ("" if live is None else live.val)
            equal = live is not None and live.val == value
            return {"key": key, "value": value, "cmp": cmp}, equal == (cmp == "=")
        return {"key": key, "exists": operand}, (live is not None) == operand

    @staticmethod
    def txn_branch(drawn: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """A drawn branch as the body sends it, without the writes that would write a key a
        second time (the API refuses those: tests/kv/test_txn.py)."""
        branch: list[dict[str, Any]] = []
        keys: list[str] = []
        prefixes: list[str] = []
        for operation in drawn:
            if operation[0] == "get":
                branch.append({"op": "get", "key": operation[1]})
            elif operation[0] == "prefix":
                prefix = operation[1]
                if any(k.startswith(prefix) for k in keys) or any(
                    p.startswith(prefix) or prefix.startswith(p) for p in prefixes
                ):
                    continue
                prefixes.append(prefix)
                branch.append({"op": "delete", "prefix": prefix})
            else:
                key = operation[1]
                if key in keys or any(key.startswith(p) for p in prefixes):
                    continue
                keys.append(key)
                if operation[0] == "delete":
                    branch.append({"op": "delete", "key": key})
                else:
                    ttl = operation[3]
                    branch.append(
                        {"op": "set", "key": key, "val": operation[2]}
                        | ({} if ttl is None else {"ttl": ttl})
                    )
        return branch

    @rule(compares=st.lists(COMPARES, max_size=3), success=BRANCHES, failure=BRANCHES)
    def txn(
        self,
        compares: list[tuple[Any, ...]],
        success: list[tuple[Any, ...]],
        failure: list[tuple[Any, ...]],
    ) -> None:
        judged = [self.txn_compare(drawn) for drawn in compares]
        body = {
            "compare": [compare for compare, _ in judged],
            "success": self.txn_branch(success),
            "failure": self.txn_branch(failure),
        }
        status, _, answer = self.request("POST", self.url("/txn"), json=body)
        failed = next((index for index, (_, holds) in enumerate(judged) if not holds), None)
        revision = self.revision + 1  # the branch's, if it changes anything
        results: list[dict[str, Any]] = []
        changed: dict[str, Optional[Held]] = {}
        for operation in body["success"] if failed is None else body["failure"]:
            if operation["op"] == "get":
                live = self.live(operation["key"])
                results.append(
                    {
                        "key": operation["key"],
                        "val": None if live is None else live.val,
                        "version": None if live is None else live.version,
                    }
                )
            elif operation["op"] == "set":
                key = operation["key"]
                self.model[key] = changed[key] = Held(
                    operation["val"], revision, self.expiry(operation.get("ttl"))
                )
                results.append({"key": key, "version": revision})
            elif "key" in operation:
                key = operation["key"]
                deleted = self.live(key) is not None  # an expired row stays for the purge
                if deleted:
                    del self.model[key]
                    changed[key] = None
                results.append({"key": key, "deleted": deleted})
            else:
                prefix = operation["prefix"]
                gone = [k for k in self.model if k.startswith(prefix) and self.live(k) is not None]
                for key in gone:
                    del self.model[key]
                    changed[key] = None
                results.append({"prefix": prefix, "deleted": len(gone)})
        if changed:
            self.revision = revision
            for key in sorted(changed):
                held = changed[key]
                self.record("delete" if held is None else "set", key, held)
        expected = {
            "succeeded": failed is None,
            "revision": self.revision,
            "failed": failed,
            "results": results,
        }
        assert (status, answer) == (200, expected)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5))
    def mget(self, keys: list[str]) -> None:
        status, _, answer = self.request("POST", self.url("/mget"), json={"keys": keys})
        expected = []
        for key in keys:
            live = self.live(key)
            expected.append({"key": key, "val": None if live is None else live.val})
        assert (status, answer) == (200, {"items": expected})

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5))
    def mdelete(self, keys: list[str]) -> None:
        status, _, answer = self.request("POST", self.url("/mdelete"), json={"keys": keys})
        deleted = {key for key in keys if self.live(key) is not None}
        assert (status, answer) == (200, {"deleted": len(deleted)})
        if deleted:
            self.revision += 1
        for key in sorted(deleted):
            del self.model[key]
            self.record("delete", key)

    @rule(prefix=PREFIXES, limit=st.integers(1, 4), values=st.booleans())
    def list_keys(self, prefix: str, limit: int, values: bool) -> None:
        expected = []
        for key in sorted(self.model, key=str.encode):
            live = self.live(key)
            if live is not None and key.startswith(prefix):
                item: dict[str, Any] = {"key": key, "version": live.version}
                if values:
                    item["val"] = live.val
                expected.append(item)
        listed: list[dict[str, Any]] = []
        query = {"prefix": prefix, "limit": str(limit), "values": str(values).lower()}
        while True:
            status, _, page = self.request("GET", self.url("/keys"), params=query)
            assert status == 200
            assert len(page["items"]) <= limit
            for item in page["items"]:
                assert (item.pop("expires_at") is None) == (
                    self.model[item["key"]].expires_at is None
                )
            listed += page["items"]
            if page["cursor"] is None:
                break
            query["cursor"] = page["cursor"]
        assert listed == expected

    @rule(prefix=PREFIXES)
    def export(self, prefix: str) -> None:
        status, headers, lines = self.request("GET", self.url("/export"), params={"prefix": prefix})
        assert status == 200 and int(headers["KV-Revision"]) == self.revision
        expected = []
        for key in sorted(self.model, key=str.encode):
            live = self.live(key)
            if live is not None and key.startswith(prefix):
                expected.append({"key": key, "val": live.val, "expires_at": live.expires_at})
        for line in lines:
            line["expires_at"] = _milliseconds(line["expires_at"])
        assert lines == expected

    @rule(
        lines=st.lists(st.tuples(KEYS, VALUES, st.sampled_from([None, None, -1, 2])), max_size=5),
        prefix=PREFIXES,
        replace=st.booleans(),
    )
    def import_lines(
        self, lines: list[tuple[str, str, Optional[float]]], prefix: str, replace: bool
    ) -> None:
        """An import of lines under the prefix: ``expires`` seconds from now (past: skipped)."""
        lines = [line for line in lines if line[0].startswith(prefix)]
        now_ms = self.clock.now * 1000
        body = b"".join(
            orjson.dumps(
                {
                    "key": key,
                    "val": val,
                    "expires_at": None
                    if expires is None
                    else rfc3339(round(self.expiry(expires) or 0)),
                }
            )
            + b"\n"
            for key, val, expires in lines
        )
        params = {"prefix": prefix, "mode": "replace" if replace else "merge"}
        status, _, answer = self.request("POST", self.url("/import"), data=body, params=params)
        applied = [(key, val, self.expiry(e)) for key, val, e in lines if e is None or e > 0]
        revision = max(self.revision + 1, int(self.clock.now * 1_000_000))
        staged = {key: Held(val, revision, expiry) for key, val, expiry in applied}
        removed = [
            key for key in self.model if replace and key.startswith(prefix) and key not in staged
        ]
        if applied or removed:
            # An import begins a life too (above the revision and at the clock), all of it
            # below compacted.
            self.revision = max(self.revision + 1, int(self.clock.now * 1_000_000))
            for key in removed:
                del self.model[key]
            self.model.update(staged)
            # A bulk load, not events: the history is whole only above it (the rows below
            # stay until a trim drops them).
            self.compact_revision = self.revision
        expected = {"imported": len(applied), "skipped": len(lines) - len(applied)}
        assert (status, answer) == (200, {**expected, "revision": self.revision})
        assert now_ms == self.clock.now * 1000

    @rule(seconds=st.sampled_from([0.5, 1, 3]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def purge(self) -> None:
        assert self.client is not None
        now_ms = self.clock.now * 1000
        expired = sorted(
            key
            for key, held in self.model.items()
            if held.expires_at is not None
            and held.expires_at <= now_ms
            and held.lease is None  # a leased key goes with its lease (expire_leases)
        )
        store = self.app[STORE_KEY]
        assert self.run(store.purge_expired(100)) == len(expired)
        if expired:
            self.revision += 1
        for key in expired:
            del self.model[key]
            self.record("expire", key)

    @rule(max_rows=st.integers(0, 12))
    def trim_history(self, max_rows: int) -> None:
        """At most ``max_rows`` changes stay, the oldest whole revisions going first."""
        assert self.client is not None
        excess = len(self.history) - max_rows
        if excess > 0:
            self.compact_revision = max(self.compact_revision, self.history[excess - 1]["revision"])
        kept = [change for change in self.history if change["revision"] > self.compact_revision]
        store = self.app[STORE_KEY]
        assert self.run(store.trim_history(3600, max_rows, 1000)) == len(self.history) - len(kept)
        self.history = kept
        stats = self.run(store.history())
        assert (stats.rows, stats.compact_revision) == (len(kept), self.compact_revision)

    @initialize(prefixes=st.lists(PREFIXES, min_size=3, max_size=3))
    def start_the_watchers(self, prefixes: list[str]) -> None:
        for watcher, prefix in enumerate(prefixes):
            self.start_watching(watcher, prefix)

    @rule(watcher=WATCHERS, prefix=PREFIXES)
    def start_watching(self, watcher: int, prefix: str) -> None:
        """List the prefix, two keys a page, then watch from the first page's revision."""
        query = {"prefix": prefix, "limit": "2", "values": "true"}
        mirror: dict[str, tuple[int, str]] = {}
        position: Optional[int] = None
        while True:
            status, headers, page = self.request("GET", self.url("/keys"), params=query)
            assert status == 200
            if position is None:
                position = int(headers["KV-Revision"])
                assert position == self.revision
            mirror.update((item["key"], (item["version"], item["val"])) for item in page["items"])
            if page["cursor"] is None:
                break
            query["cursor"] = page["cursor"]
        self.watchers[watcher] = Watcher(prefix, position, mirror)

    @invariant()
    def the_first_watcher_keeps_up(self) -> None:
        """Watcher 0 follows every step, on the servers in turn."""
        if self.client is None:
            return
        if 0 not in self.watchers:
            self.start_watching(0, "")
        self.steps += 1
        self.poll_changes(0, 1000, other=self.steps % 2 == 1)

    @rule(watcher=WATCHERS, limit=st.integers(1, 4), other=st.booleans())
    def poll_changes(self, watcher: int, limit: int, other: bool) -> None:
        """Follow the changes from where the watcher is, on either server."""
        following = self.watchers.get(watcher)
        if following is None:
            return
        query = {
            "prefix": following.prefix,
            "since": str(following.position),
            "limit": str(limit),
            "timeout": "0",
        }
        status, _, answer = self.request("GET", self.url("/changes", other=other), params=query)
        if following.position < self.compact_revision:
            assert (status, answer["error"]) == (410, "compacted")
            assert answer["compact_revision"] == self.compact_revision
            del self.watchers[watcher]  # it lists again
            return
        if following.position > self.revision or any(
            forked < following.position < resumed for forked, resumed in self.gaps
        ):  # a revision of an earlier life, which this one never gave to a write
            assert (status, answer["error"]) == (410, "unknown_revision")
            del self.watchers[watcher]
            return
        assert status == 200, answer
        matching = [
            change
            for change in self.history
            if change["revision"] > following.position
            and change["key"].startswith(following.prefix)
        ]
        expected = matching[:limit]
        if expected:
            last = expected[-1]["revision"]
            expected += [c for c in matching[limit:] if c["revision"] == last]
        more = len(expected) < len(matching)
        events = answer["events"]
        for change in events:
            change["expires_at"] = _milliseconds(change.get("expires_at"))
            if change["type"] != "set":
                del change["expires_at"]
        assert events == expected
        assert answer["more"] == more
        assert answer["next"] == (expected[-1]["revision"] if more else self.revision)
        for change in events:
            held = following.mirror.get(change["key"])
            if held is not None and change["revision"] <= held[0]:
                continue
            if change["type"] == "set":
                following.mirror[change["key"]] = (change["revision"], change["val"])
            else:
                following.mirror.pop(change["key"], None)
        following.position = answer["next"]
        if not more:
            # Replayed on its listing, the events give the model's keys under the prefix:
            # its live keys exactly, and rows not yet purged at most.
            live = {
                key: (alive.version, alive.val)
                for key in self.model
                if key.startswith(following.prefix) and (alive := self.live(key)) is not None
            }
            assert {key: following.mirror.get(key) for key in live} == live
            for key, (version, _) in following.mirror.items():
                assert key in self.model and self.model[key].version == version

    @rule()
    def restart(self) -> None:
        self.run(self.stop())
        # A restart takes time: a life's revisions grow far slower than the clock in
        # microseconds, which a clock standing still through it would not be.
        self.clock.advance(1)
        if self.store == "memory":  # the memory store keeps nothing, not even its revision
            self.model.clear()
            self.revision = 0
            self.history.clear()
            self.compact_revision = 0
            self.gaps.clear()
            self.leases.clear()
        self.run(self.start())
        self.begin_life()

    @precondition(lambda self: self.client is not None)
    @invariant()
    def healthy(self) -> None:
        status, _, _ = self.request("GET", self.url("/health"))
        assert status == 200

    def teardown(self) -> None:
        self.run(self.stop())
        self.loop.close()
        self.directory.cleanup()


def _milliseconds(moment: Optional[str]) -> Optional[int]:
    """An RFC 3339 expiry as the model holds it, ms since the epoch."""
    if moment is None:
        return None
    parsed = datetime.strptime(moment, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return round(parsed.timestamp() * 1000)


@pytest.mark.parametrize("store", STORE_KINDS)
def test_the_api_behaves_like_its_model(store: StoreKind, request: pytest.FixtureRequest) -> None:
    postgres_url = fresh_postgres_urls(store, request)
    # The quick suite runs a few examples; the full one (--run-slow, as CI) ten times more.
    examples = 100 if request.config.getoption("--run-slow") else 10
    # A factory, not the class: each example's machine gets its own database. (Hypothesis
    # takes any callable; its annotation says a class.)
    stateful.run_state_machine_as_test(
        lambda: KeyValueMachine(store, postgres_url),  # type: ignore[arg-type]
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None),
    )
