"""A model check of access control: hypothesis makes tokens with random rules (prefixes from a
small alphabet, so that they overlap; read or readwrite; some admin, some expiring) and sends
random requests across every endpoint with them, with the bootstrap token, with a wrong one
and with none; the server's status and the data it shows must be the model's, and after every
step the store must hold exactly the model's keys, so that a refused request is seen to have
changed nothing.

Tokens are created and deleted through the Store methods, as the /tokens endpoints would; a
deletion is seen by the next poll, which the machine runs itself (the 1 s of the background
poll is tests/kv/slow/test_revocation.py's).
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings, stateful
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule
from pydantic import SecretStr
from yarl import URL

from mapmg_data_engineer_takehome.access import TOKENS_KEY, hash_secret, new_secret
from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.rules import names_no_lease
from mapmg_data_engineer_takehome.settings import Settings, StoreKind
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.store.base import Token, TokenRule

from .conftest import STORE_KINDS, TEST_POSTGRES_TIMEOUT, FakeClock, fresh_postgres_urls

BOOTSTRAP = "b00tstrap-t0ken"
# Keys and prefixes from one small alphabet, so that rules, keys and prefixes overlap.
KEYS = st.sampled_from(["a", "ab", "a/b", "a/c", "b", "b/a", "c"])
PREFIXES = st.sampled_from(["", "a", "a/", "ab", "b", "b/", "c"])
VALUES = st.sampled_from(["1", "2", "x", "ключ"])
RULES = st.lists(
    st.tuples(PREFIXES, st.sampled_from(["read", "readwrite"])), min_size=1, max_size=3
)
# Seconds from the start to a token's expiry (none for never); the machine's clock moves.
EXPIRIES = st.sampled_from([None, None, None, -1, 5, 30])
TOKENS = st.lists(st.tuples(RULES, st.booleans(), EXPIRIES), min_size=1, max_size=4)
# Who sends a request: a token's index, the bootstrap token, a wrong secret, or nobody.
# Mostly tokens, whose rules are what this model is about.
WHO = st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, "bootstrap", "wrong", "none"])
# A branch operation of /txn: get, set or delete of a key, or delete of a prefix.
OPERATIONS = st.one_of(
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("set"), KEYS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("prefix"), PREFIXES),
)
# Short, so that a token covers all of a request now and then, and not all of it as often.
BRANCHES = st.lists(OPERATIONS, max_size=2)


@dataclass
class Held:
    """A token as the model knows it."""

    secret: str
    rules: list[tuple[str, str]]
    admin: bool
    expires_at: Optional[float]  # seconds, by the machine's clock
    deleted: bool = False


class Refused(Exception):
    """The model's answer is a refusal: its status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _without_double_writes(operations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The branch with every operation dropped that would write a key twice (a 422 of its
    own, which this model is not about)."""
    kept: list[tuple[str, str]] = []
    keys: list[str] = []
    prefixes: list[str] = []
    for kind, target in operations:
        if kind in ("set", "delete"):
            if target in keys or any(target.startswith(prefix) for prefix in prefixes):
                continue
            keys.append(target)
        elif kind == "prefix":
            if any(key.startswith(target) for key in keys) or any(
                target.startswith(prefix) or prefix.startswith(target) for prefix in prefixes
            ):
                continue
            prefixes.append(target)
        kept.append((kind, target))
    return kept


class AccessMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self, store: StoreKind, postgres_url: Callable[[], Optional[str]]) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="kv-access-")
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.start = self.clock.now
        url = postgres_url()
        self.settings = Settings(
            store=store,
            postgres_url=None if url is None else SecretStr(url),
            postgres_timeout=TEST_POSTGRES_TIMEOUT,
            data_path=Path(self.directory.name) / "kv.sqlite3",
            input_db=None,
            log_level="warning",
            auth_token=SecretStr(BOOTSTRAP),
        )
        self.model: dict[str, str] = {}
        self.tokens: list[Held] = []
        self.app = create_app(self.settings, clock=self.clock, purge=False)
        self.client: TestClient[Any, Any] = self.run(self.start_client())

    async def start_client(self) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(self.app))
        await client.start_server()
        return client

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.client.close())
        self.loop.close()
        self.directory.cleanup()

    # --- the model's judgement -------------------------------------------------------------

    def headers(self, who: Any) -> dict[str, str]:
        if who == "none":
            return {}
        if who == "bootstrap":
            secret = BOOTSTRAP
        elif who == "wrong":
            secret = new_secret()
        else:
            secret = self.tokens[who % len(self.tokens)].secret
        return {"Authorization": f"Bearer {secret}"}

    def grant(self, who: Any) -> Optional[Held]:
        """The token the request names (None for the bootstrap token); Refused(401) when it
        names no live one."""
        if who == "bootstrap":
            return None
        if who in ("none", "wrong"):
            raise Refused(401)
        held: Held = self.tokens[who % len(self.tokens)]
        if held.deleted or (held.expires_at is not None and self.clock.now >= held.expires_at):
            raise Refused(401)
        return held

    def judge(
        self,
        who: Any,
        read: Any = (),
        write: Any = (),
        read_prefixes: Any = (),
        write_prefixes: Any = (),
        admin: bool = False,
    ) -> None:
        """Refused(401 or 403) unless ``who`` may do all of it."""
        held = self.grant(who)
        if held is None:
            return
        if admin and not held.admin:
            raise Refused(403)

        def covers(target: str, access: str) -> bool:
            return any(
                target.startswith(prefix) and (granted == "readwrite" or access == "read")
                for prefix, granted in held.rules
            )

        needs = [(key, "read") for key in (*read, *read_prefixes)]
        needs += [(key, "readwrite") for key in (*write, *write_prefixes)]
        if not all(covers(target, access) for target, access in needs):
            raise Refused(403)

    def send(self, method: str, path: str, who: Any, **kwargs: Any) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            url = URL(str(self.client.make_url("")).rstrip("/") + path, encoded=True)
            headers = {**kwargs.pop("headers", {}), **self.headers(who)}
            async with self.client.session.request(
                method, url, headers=headers, **kwargs
            ) as response:
                body = await response.read()
                if response.content_type == "application/json" and body:
                    return response.status, orjson.loads(body)
                if response.content_type == "application/x-ndjson":
                    return response.status, [orjson.loads(line) for line in body.splitlines()]
                return response.status, body

        return self.run(go())  # type: ignore[no-any-return]

    def expect(self, answer: tuple[int, Any], judged: Callable[[], Any]) -> Any:
        """The server's answer is the model's: a refusal's status (and then the error's
        code), or 200 and what ``judged`` returns, which the caller compares further."""
        status, body = answer
        try:
            expected = judged()
        except Refused as refused:
            assert status == refused.status, (status, body)
            codes = {401: "unauthorized", 403: "forbidden", 404: "lease_not_found"}
            if isinstance(body, dict):
                assert body["error"] == codes[status]
            return None
        return status, body, expected

    @staticmethod
    def path_of(key: str) -> str:
        return quote(key, safe="")

    # --- tokens ----------------------------------------------------------------------------

    @initialize(tokens=TOKENS)
    def create_tokens(self, tokens: list[Any]) -> None:
        for rules, admin, expires_in in tokens:
            self.add_token(rules, admin, expires_in)

    def add_token(self, rules: list[tuple[str, str]], admin: bool, expires_in: Any) -> None:
        secret = new_secret()
        expires_at = None if expires_in is None else self.start + expires_in
        token = Token(
            f"t{len(self.tokens)}",
            hash_secret(secret),
            tuple(TokenRule(prefix, access) for prefix, access in rules),  # type: ignore[arg-type]
            admin,
            int(self.start * 1000),
            None if expires_at is None else int(expires_at * 1000),
        )
        self.run(self.app[STORE_KEY].create_token(token))
        self.tokens.append(Held(secret, rules, admin, expires_at))

    @rule(index=st.integers(0, 3))
    def delete_token(self, index: int) -> None:
        held = self.tokens[index % len(self.tokens)]
        name = f"t{self.tokens.index(held)}"
        assert self.run(self.app[STORE_KEY].delete_token(name)) is not held.deleted
        held.deleted = True
        self.run(self.app[TOKENS_KEY].poll())

    @rule(seconds=st.sampled_from([1, 10]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # --- single keys -----------------------------------------------------------------------

    @rule(who=WHO, key=KEYS, head=st.booleans())
    def get(self, who: Any, key: str, head: bool) -> None:
        answer = self.send("HEAD" if head else "GET", f"/get/{self.path_of(key)}", who)
        checked = self.expect(answer, lambda: self.judge(who, read=[key]))
        if checked is not None:
            status, body, _ = checked
            if key not in self.model:
                assert status == 404
            else:
                assert status == 200
                assert head or body == {"key": key, "val": self.model[key]}

    @rule(who=WHO, key=KEYS, val=VALUES)
    def set(self, who: Any, key: str, val: str) -> None:
        answer = self.send("POST", "/set", who, json={"key": key, "val": val})
        if self.expect(answer, lambda: self.judge(who, write=[key])) is not None:
            assert answer[0] == 200
            self.model[key] = val

    @rule(who=WHO, key=KEYS)
    def delete(self, who: Any, key: str) -> None:
        answer = self.send("DELETE", f"/delete/{self.path_of(key)}", who)
        if self.expect(answer, lambda: self.judge(who, write=[key])) is not None:
            assert answer[0] == (200 if key in self.model else 404)
            self.model.pop(key, None)

    # --- listings, exports and the change feed ---------------------------------------------

    def under(self, prefix: str) -> list[str]:
        return sorted(key for key in self.model if key.startswith(prefix))

    @rule(who=WHO, prefix=PREFIXES)
    def list_keys(self, who: Any, prefix: str) -> None:
        answer = self.send("GET", "/keys", who, params={"prefix": prefix, "values": "true"})
        if self.expect(answer, lambda: self.judge(who, read_prefixes=[prefix])) is not None:
            status, body = answer
            assert status == 200
            shown = [(item["key"], item["val"]) for item in body["items"]]
            assert shown == [(key, self.model[key]) for key in self.under(prefix)]

    @rule(who=WHO, prefix=PREFIXES)
    def export(self, who: Any, prefix: str) -> None:
        answer = self.send("GET", "/export", who, params={"prefix": prefix})
        if self.expect(answer, lambda: self.judge(who, read_prefixes=[prefix])) is not None:
            status, lines = answer
            assert status == 200
            shown = [(line["key"], line["val"]) for line in lines]
            assert shown == [(key, self.model[key]) for key in self.under(prefix)]

    @rule(who=WHO, prefix=PREFIXES, stream=st.booleans())
    def changes(self, who: Any, prefix: str, stream: bool) -> None:
        try:
            self.judge(who, read_prefixes=[prefix])
        except Refused as refused:
            # Refused before the first byte, stream or long-poll alike.
            headers = {"Accept": "text/event-stream"} if stream else {}
            answer = self.send("GET", "/changes", who, params={"prefix": prefix}, headers=headers)
            assert answer[0] == refused.status, answer
            return
        # Allowed: a poll that does not wait (a stream would not end).
        status, body = self.send("GET", "/changes", who, params={"prefix": prefix, "timeout": "0"})
        assert status == 200 and body["events"] == []

    # --- batches ---------------------------------------------------------------------------

    @rule(who=WHO, keys=st.lists(KEYS, min_size=1, max_size=4))
    def mget(self, who: Any, keys: list[str]) -> None:
        answer = self.send("POST", "/mget", who, json={"keys": keys})
        if self.expect(answer, lambda: self.judge(who, read=keys)) is not None:
            status, body = answer
            assert status == 200
            assert body["items"] == [{"key": key, "val": self.model.get(key)} for key in keys]

    @rule(who=WHO, items=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4))
    def mset(self, who: Any, items: list[tuple[str, str]]) -> None:
        body = {"items": [{"key": key, "val": val} for key, val in items]}
        answer = self.send("POST", "/mset", who, json=body)
        judged = lambda: self.judge(who, write=[key for key, _ in items])  # noqa: E731
        if self.expect(answer, judged) is not None:
            assert answer[0] == 200
            self.model.update(items)

    @rule(who=WHO, keys=st.lists(KEYS, min_size=1, max_size=4))
    def mdelete(self, who: Any, keys: list[str]) -> None:
        answer = self.send("POST", "/mdelete", who, json={"keys": keys})
        if self.expect(answer, lambda: self.judge(who, write=keys)) is not None:
            status, body = answer
            assert status == 200
            assert body["deleted"] == len({key for key in keys if key in self.model})
            for key in keys:
                self.model.pop(key, None)

    @rule(
        who=WHO,
        prefix=PREFIXES,
        replace=st.booleans(),
        lines=st.lists(st.tuples(KEYS, VALUES), max_size=4),
    )
    def import_(self, who: Any, prefix: str, replace: bool, lines: list[tuple[str, str]]) -> None:
        body = b"".join(
            orjson.dumps({"key": key, "val": val, "expires_at": None}) + b"\n" for key, val in lines
        )
        params = {"prefix": prefix, "mode": "replace" if replace else "merge"}
        answer = self.send("POST", "/import", who, params=params, data=body)

        def judged() -> Optional[int]:
            self.grant(who)  # 401 first
            if replace:
                self.judge(who, write_prefixes=[prefix])
            for key, _ in lines:  # each line in turn: the first bad one answers
                if not key.startswith(prefix):
                    return 422
                self.judge(who, write=[key])
            return 200

        checked = self.expect(answer, judged)
        if checked is None:
            return
        status, _, expected = checked
        assert status == expected, answer
        if status != 200:
            return
        if replace:
            for key in self.under(prefix):
                del self.model[key]
        self.model.update(lines)

    # --- transactions ----------------------------------------------------------------------

    @rule(
        who=WHO,
        compares=st.lists(st.tuples(KEYS, st.booleans()), max_size=1),
        success=BRANCHES,
        failure=BRANCHES,
    )
    def txn(
        self,
        who: Any,
        compares: list[tuple[str, bool]],
        success: list[tuple[str, str]],
        failure: list[tuple[str, str]],
    ) -> None:
        success, failure = _without_double_writes(success), _without_double_writes(failure)

        def operation(kind: str, target: str) -> dict[str, Any]:
            if kind == "prefix":
                return {"op": "delete", "prefix": target}
            if kind == "set":
                return {"op": "set", "key": target, "val": "t"}
            return {"op": kind, "key": target}

        body = {
            "compare": [{"key": key, "exists": exists} for key, exists in compares],
            "success": [operation(*op) for op in success],
            "failure": [operation(*op) for op in failure],
        }
        answer = self.send("POST", "/txn", who, json=body)
        branches = success + failure
        judged = lambda: self.judge(  # noqa: E731
            who,
            read=[key for key, _ in compares] + [t for kind, t in branches if kind == "get"],
            write=[t for kind, t in branches if kind in ("set", "delete")],
            write_prefixes=[t for kind, t in branches if kind == "prefix"],
        )
        checked = self.expect(answer, judged)
        if checked is None:
            return
        status, result, _ = checked
        assert status == 200, answer
        held = all((key in self.model) == exists for key, exists in compares)
        assert result["succeeded"] == held
        outcomes: list[tuple[str, Any]] = []
        for kind, target in success if held else failure:
            if kind == "get":
                outcomes.append((target, self.model.get(target)))
            elif kind == "set":
                self.model[target] = "t"
                outcomes.append((target, None))
            elif kind == "delete":
                outcomes.append((target, self.model.pop(target, None) is not None))
            else:
                gone = self.under(target)
                for key in gone:
                    del self.model[key]
                outcomes.append((target, len(gone)))
        shown = []
        for outcome in result["results"]:
            if "val" in outcome:
                shown.append((outcome["key"], outcome["val"]))
            elif "prefix" in outcome:
                shown.append((outcome["prefix"], outcome["deleted"]))
            elif "deleted" in outcome:
                shown.append((outcome["key"], outcome["deleted"]))
            else:
                shown.append((outcome["key"], None))
        assert shown == outcomes

    # --- leases ----------------------------------------------------------------------------

    @rule(target=leases, who=WHO)
    def grant_lease(self, who: Any) -> Any:
        status, body = self.send("POST", "/leases", who, json={"ttl": 3600})
        try:
            self.grant(who)  # any valid token may grant one
        except Refused as refused:
            assert status == refused.status
            return stateful.multiple()
        assert status == 200
        return str(body["id"])

    @rule(target=leases, keys=st.lists(KEYS, min_size=1, max_size=2))
    def leased_keys(self, keys: list[str]) -> str:
        """A lease with keys, granted and set by the bootstrap token, for others to use."""
        status, body = self.send("POST", "/leases", "bootstrap", json={"ttl": 3600})
        assert status == 200
        for key in keys:
            answer = self.send(
                "POST", "/set", "bootstrap", json={"key": key, "val": "l", "lease": body["id"]}
            )
            assert answer[0] == 200
            self.model[key] = "l"
        return str(body["id"])

    @rule(target=leases)
    def no_lease(self) -> str:
        return "0"  # no store could have made it

    def lease_keys(self, lease: str) -> Optional[list[str]]:
        """The lease's keys, as the bootstrap token reads them; None when there is no lease."""
        status, body = self.send("GET", f"/leases/{lease}", "bootstrap")
        return list(body["keys"]) if status == 200 else None

    @rule(who=WHO, lease=leases, key=KEYS)
    def set_with_lease(self, who: Any, lease: str, key: str) -> None:
        answer = self.send("POST", "/set", who, json={"key": key, "val": "l", "lease": lease})

        def judged() -> None:
            self.grant(who)
            if names_no_lease(lease):  # no store could have made it: 404 before all else
                raise Refused(404)
            self.judge(who, write=[key])

        if self.expect(answer, judged) is not None:
            if self.lease_keys(lease) is None:
                assert answer[0] == 404
                return
            assert answer[0] == 200
            self.model[key] = "l"

    @rule(who=WHO, lease=leases, action=st.sampled_from(["read", "keepalive", "revoke"]))
    def use_lease(self, who: Any, lease: str, action: str) -> None:
        keys = self.lease_keys(lease)
        method, path = {
            "read": ("GET", f"/leases/{lease}"),
            "keepalive": ("POST", f"/leases/{lease}/keepalive"),
            "revoke": ("DELETE", f"/leases/{lease}"),
        }[action]
        answer = self.send(method, path, who)

        def judged() -> None:
            self.grant(who)
            if keys is None:
                raise Refused(404)
            if action == "read":
                self.judge(who, read=keys)
            else:
                self.judge(who, write=keys)

        checked = self.expect(answer, judged)
        if checked is None:
            return
        status, body, _ = checked
        assert status == 200, answer
        assert keys is not None
        if action == "read":
            assert body["keys"] == keys
        if action == "revoke":
            for key in keys:
                self.model.pop(key, None)

    @rule(who=WHO, first=leases, second=leases)
    def keepalive_leases(self, who: Any, first: str, second: str) -> None:
        """POST /leases/keepalive is judged as each lease's own keepalive: write on the keys
        of every live lease it names; a lease that is not live is named, not refused."""
        asked = list(dict.fromkeys([first, second]))
        keys = {lease: self.lease_keys(lease) for lease in asked}
        answer = self.send("POST", "/leases/keepalive", who, json={"ids": asked})

        def judged() -> None:
            self.grant(who)
            for held in keys.values():
                if held is not None:
                    self.judge(who, write=held)

        checked = self.expect(answer, judged)
        if checked is None:
            return
        status, body, _ = checked
        assert status == 200, answer
        assert [lease["id"] for lease in body["leases"]] == [
            lease for lease in asked if keys[lease] is not None
        ]
        assert body["not_found"] == [lease for lease in asked if keys[lease] is None]

    # --- admin -----------------------------------------------------------------------------

    @rule(who=WHO, path=st.sampled_from(["/config", "/metrics"]))
    def admin_route(self, who: Any, path: str) -> None:
        answer = self.send("GET", path, who)
        if self.expect(answer, lambda: self.judge(who, admin=True)) is not None:
            assert answer[0] == 200

    # --- what the store holds --------------------------------------------------------------

    @invariant()
    def the_store_holds_the_models_keys(self) -> None:
        """Read from the store itself: a refused request changed nothing."""
        page = self.run(self.app[STORE_KEY].list_keys("", None, 100, True))
        assert {listed.key: listed.val for listed in page.keys} == self.model


@pytest.mark.parametrize("store", STORE_KINDS)
def test_access_behaves_like_its_model(store: StoreKind, request: pytest.FixtureRequest) -> None:
    postgres_url = fresh_postgres_urls(store, request)
    # The quick suite runs a hundred examples; the full one (--run-slow, as CI) twice as many.
    examples = 200 if request.config.getoption("--run-slow") else 100
    stateful.run_state_machine_as_test(
        lambda: AccessMachine(store, postgres_url),  # type: ignore[arg-type]
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None),
    )
