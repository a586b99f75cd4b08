"""A model check: hypothesis drives the whole API over HTTP against a dict, on every store.

The server is the real app, in-process, on a clock the machine moves. The model predicts every
answer: values, versions (the ETag), expiry, conditional writes, listings page by page, and
batches. A restart closes the app (store included) and opens a new one on the same data
file: the sqlite store must then still hold everything acknowledged, the memory store nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings, stateful
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import SecretStr
from yarl import URL

from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.settings import Settings, StoreKind

from .conftest import STORE_KINDS, FakeClock
from .postgres_support import PostgresCluster

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


@dataclass
class Held:
    """What the model says a key holds."""

    val: str
    version: int
    expires_at: Optional[int]


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
            data_path=Path(self.directory.name) / "kv.sqlite3",
            input_db=None,
            log_level="warning",
            log_format="json",
        )
        self.model: dict[str, Held] = {}
        self.revision = 0
        self.client: Optional[TestClient[Any, Any]] = None
        self.run(self.start())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def start(self) -> None:
        self.client = TestClient(TestServer(create_app(self.settings, clock=self.clock)))
        await self.client.start_server()

    def url(self, route: str, key: str = "") -> URL:
        assert self.client is not None
        encoded = quote(key, safe="").replace(".", "%2E")
        return URL(str(self.client.make_url("")).rstrip("/") + route + encoded, encoded=True)

    def request(self, method: str, url: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        async def send() -> tuple[int, Any, Any]:
            assert self.client is not None
            async with self.client.session.request(method, url, **kwargs) as response:
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
        assert answer_headers["ETag"] == f'"{self.revision}"'

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
            assert status == 404
            self.model.pop(key, None)
        else:
            assert (status, body) == (200, {"key": key, "deleted": True})
            del self.model[key]
            self.revision += 1

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
        for key in keys:
            self.model.pop(key, None)
        if deleted:
            self.revision += 1

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

    @rule(seconds=st.sampled_from([0.5, 1, 3]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def restart(self) -> None:
        assert self.client is not None
        self.run(self.client.close())
        if self.store == "memory":  # the memory store keeps nothing, not even its revision
            self.model.clear()
            self.revision = 0
        self.run(self.start())

    @precondition(lambda self: self.client is not None)
    @invariant()
    def healthy(self) -> None:
        status, _, _ = self.request("GET", self.url("/health"))
        assert status == 200

    def teardown(self) -> None:
        if self.client is not None:
            self.run(self.client.close())
        self.loop.close()
        self.directory.cleanup()


@pytest.mark.parametrize("store", STORE_KINDS)
def test_the_api_behaves_like_its_model(store: StoreKind, request: pytest.FixtureRequest) -> None:
    def postgres_url() -> Optional[str]:
        if store != "postgres":
            return None
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        return cluster.url(search_path=cluster.create_schema())

    # A factory, not the class: each example's machine gets its own database. (Hypothesis
    # takes any callable; its annotation says a class.)
    stateful.run_state_machine_as_test(
        lambda: KeyValueMachine(store, postgres_url),  # type: ignore[arg-type]
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None),
    )
