"""A model check: hypothesis drives set, get, delete and restarts over HTTP against a dict.

The server is the real app on the sqlite store, in-process; a restart closes it (store
included) and opens a new one on the same data file, so everything acknowledged must still
be there, and nothing else.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from yarl import URL

from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.settings import Settings

# A small key space, so that rules collide on keys; dots and slashes test the path handling.
KEYS = st.sampled_from(["a", "b", "a/b", "..", "ключ", "with space", "%41", "\n"])
VALUES = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20)


class KeyValueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="kv-stateful-")
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(
            data_path=Path(self.directory.name) / "kv.sqlite3",
            input_db=None,
            log_level="warning",
            log_format="json",
        )
        self.model: dict[str, str] = {}
        self.client: Optional[TestClient[Any, Any]] = None
        self.run(self.start())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def start(self) -> None:
        self.client = TestClient(TestServer(create_app(self.settings)))
        await self.client.start_server()

    def url(self, route: str, key: str) -> URL:
        assert self.client is not None
        encoded = quote(key, safe="").replace(".", "%2E")
        return URL(str(self.client.make_url("")).rstrip("/") + route + encoded, encoded=True)

    async def request(self, method: str, url: Any, **kwargs: Any) -> tuple[int, Any]:
        assert self.client is not None
        async with self.client.session.request(method, url, **kwargs) as response:
            return response.status, await response.json()

    @rule(key=KEYS, val=VALUES)
    def set(self, key: str, val: str) -> None:
        assert self.client is not None
        status, body = self.run(
            self.request("POST", self.client.make_url("/set"), json={"key": key, "val": val})
        )
        assert (status, body) == (200, {"key": key, "val": val})
        self.model[key] = val

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        status, body = self.run(self.request("GET", self.url("/get/", key)))
        if key in self.model:
            assert (status, body) == (200, {"key": key, "val": self.model[key]})
        else:
            assert (status, body["error"]) == (404, "key_not_found")

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        status, body = self.run(self.request("DELETE", self.url("/delete/", key)))
        if key in self.model:
            assert (status, body) == (200, {"key": key, "deleted": True})
            del self.model[key]
        else:
            assert status == 404

    @rule()
    def restart(self) -> None:
        assert self.client is not None
        self.run(self.client.close())
        self.run(self.start())

    @precondition(lambda self: self.client is not None)
    @invariant()
    def healthy(self) -> None:
        assert self.client is not None
        status, _ = self.run(self.request("GET", self.client.make_url("/health")))
        assert status == 200

    def teardown(self) -> None:
        if self.client is not None:
            self.run(self.client.close())
        self.loop.close()
        self.directory.cleanup()


KeyValueMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
TestKeyValueModel = KeyValueMachine.TestCase
