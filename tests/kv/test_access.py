"""Authentication by the store's tokens and the 403s of their rules (access.py): a scoped token
works at once, is refused once revoked, expired or rotated out, and every refusal is counted
and logged without its secret."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any, Optional

import pytest

from mapmg_data_engineer_takehome.access import TOKENS_KEY, hash_secret, new_secret
from mapmg_data_engineer_takehome.logs import configure_logging
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.store.base import Store, Token, TokenRule

from .conftest import Client, FakeClock, MakeClient, MakeSettings
from .test_api import assert_error
from .test_metrics import sample

BOOTSTRAP = "b00tstrap-t0ken"
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}
NOW = 1_800_000_000.0


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def add_token(
    store: Store,
    name: str,
    rules: Sequence[tuple[str, str]] = (("", "readwrite"),),
    admin: bool = False,
    expires_at: Optional[float] = None,
) -> str:
    """Create a token through the store, as POST /tokens would; its secret. Times in s."""
    secret = new_secret()
    await store.create_token(
        Token(
            name,
            hash_secret(secret),
            tuple(TokenRule(prefix, access) for prefix, access in rules),  # type: ignore[arg-type]
            admin,
            int(NOW * 1000),
            None if expires_at is None else int(expires_at * 1000),
        )
    )
    return secret


@pytest.fixture
async def locked(make_client: MakeClient, store_kind: str) -> Client:
    return await make_client(
        store=store_kind, auth_token=BOOTSTRAP, clock=FakeClock(NOW), access_log=True
    )


def store_of(client: Client) -> Store:
    return client.app[STORE_KEY]


async def get_status(client: Client, key: str, secret: str) -> int:
    return (await client.get(f"/get/{key}", headers=bearer(secret))).status


async def test_a_scoped_token_reads_and_writes_what_its_rules_cover(locked: Client) -> None:
    store = store_of(locked)
    secret = await add_token(store, "billing", [("billing/", "readwrite"), ("cfg/", "read")])
    headers = bearer(secret)
    await store.set("cfg/mode", "blue")
    # A new token works at once: a cache miss reads the store.
    answer = await locked.get("/get/cfg/mode", headers=headers)
    assert answer.status == 200 and (await answer.json())["val"] == "blue"
    set_ok = await locked.post("/set", json={"key": "billing/1", "val": "x"}, headers=headers)
    assert set_ok.status == 200
    refused = await locked.post("/set", json={"key": "cfg/mode", "val": "x"}, headers=headers)
    message = await assert_error(refused, 403, "forbidden")
    assert '"cfg/mode"' in message
    assert (await store.get("cfg/mode")).val == "blue"  # type: ignore[union-attr]
    message = await assert_error(await locked.get("/get/other", headers=headers), 403, "forbidden")
    assert '"other"' in message
    await assert_error(await locked.get("/keys?prefix=cfg", headers=headers), 403, "forbidden")
    listed = await locked.get("/keys?prefix=cfg/", headers=headers)
    assert [item["key"] for item in (await listed.json())["items"]] == ["cfg/mode"]
    await assert_error(await locked.get("/config", headers=headers), 403, "forbidden")
    await assert_error(await locked.get("/metrics", headers=headers), 403, "forbidden")
    assert (await locked.get("/config", headers=ADMIN)).status == 200


async def test_an_admin_token_reads_config_and_metrics(locked: Client) -> None:
    secret = await add_token(store_of(locked), "ops", [("ops/", "read")], admin=True)
    assert (await locked.get("/config", headers=bearer(secret))).status == 200
    assert (await locked.get("/metrics", headers=bearer(secret))).status == 200
    await assert_error(await locked.get("/get/k", headers=bearer(secret)), 403, "forbidden")


async def test_a_deleted_token_is_refused_once_the_poll_sees_it(locked: Client) -> None:
    store = store_of(locked)
    secret = await add_token(store, "ci")
    assert await get_status(locked, "k", secret) == 404  # allowed; no such key
    assert await store.delete_token("ci")
    # Within 1 s, by the background poll (every 0.5 s), with nothing else asking.
    await asyncio.sleep(1.0)
    await assert_error(await locked.get("/get/k", headers=bearer(secret)), 401, "unauthorized")


async def test_an_unknown_secret_is_refused_as_a_wrong_token(locked: Client) -> None:
    await add_token(store_of(locked), "ci")
    for authorization in ("Bearer " + new_secret(), "Bearer ", "Basic x", "", "Bearer kv_"):
        answer = await locked.get("/get/k", headers={"Authorization": authorization})
        await assert_error(answer, 401, "unauthorized")
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_expired_token_is_refused_at_its_expiry(
    make_client: MakeClient, store_kind: str
) -> None:
    clock = FakeClock(NOW)
    client = await make_client(store=store_kind, auth_token=BOOTSTRAP, clock=clock)
    secret = await add_token(store_of(client), "ci", expires_at=NOW + 60)
    assert await get_status(client, "k", secret) == 404
    clock.advance(59.999)
    assert await get_status(client, "k", secret) == 404
    clock.advance(0.001)
    assert await get_status(client, "k", secret) == 401  # from the cache: no poll needed
    text = await (await client.get("/metrics", headers=ADMIN)).text()
    assert sample(text, "kv_auth_refusals_total", reason="expired") == 1


async def test_a_rotated_secret_works_until_its_grace_ends(locked: Client) -> None:
    store, clock = store_of(locked), locked.app[TOKENS_KEY]._clock
    assert isinstance(clock, FakeClock)
    old = await add_token(store, "ci")
    assert await get_status(locked, "k", old) == 404  # cached
    new = new_secret()
    await store.rotate_token("ci", hash_secret(new), int((NOW + 30) * 1000))
    await locked.app[TOKENS_KEY].poll()
    assert await get_status(locked, "k", new) == 404
    assert await get_status(locked, "k", old) == 404
    clock.advance(30)
    assert await get_status(locked, "k", old) == 401
    assert await get_status(locked, "k", new) == 404
    # Rotated again, without grace: the secret it replaces stops at once.
    newest = new_secret()
    await store.rotate_token("ci", hash_secret(newest), None)
    await locked.app[TOKENS_KEY].poll()
    assert await get_status(locked, "k", new) == 401
    assert await get_status(locked, "k", newest) == 404


async def test_a_rotation_without_grace_stops_the_cached_secret(locked: Client) -> None:
    store = store_of(locked)
    old = await add_token(store, "ci")
    assert await get_status(locked, "k", old) == 404
    await store.rotate_token("ci", hash_secret(new_secret()), None)
    await locked.app[TOKENS_KEY].poll()
    assert await get_status(locked, "k", old) == 401


async def test_last_use_is_written_now_and_then_not_per_request(locked: Client) -> None:
    store = store_of(locked)
    secret = await add_token(store, "ci")
    await add_token(store, "idle")
    writes: list[dict[str, int]] = []
    touch = store.touch_tokens

    async def counted_touch(used: Any) -> None:
        writes.append(dict(used))
        await touch(used)

    store.touch_tokens = counted_touch  # type: ignore[method-assign]
    for _ in range(5):
        await get_status(locked, "k", secret)
    assert writes == []
    await locked.app[TOKENS_KEY].touch()
    assert writes == [{"ci": int(NOW * 1000)}]
    used = {token.name: token.last_used_at for token in await store.tokens()}
    assert used == {"ci": int(NOW * 1000), "idle": None}
    await locked.app[TOKENS_KEY].touch()  # nothing used since: nothing written
    assert len(writes) == 1


async def test_a_failing_poll_is_logged_and_polling_goes_on(
    locked: Client, make_settings: MakeSettings
) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    store = store_of(locked)
    calls = 0
    generation = store.tokens_generation

    async def broken_generation() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return await generation()

    store.tokens_generation = broken_generation  # type: ignore[method-assign]
    secret = await add_token(store, "ci")
    assert await get_status(locked, "k", secret) == 404
    await store.delete_token("ci")
    await asyncio.sleep(1.2)  # the first poll fails; the next one sees the delete
    assert calls >= 2
    assert "tokens_poll_failed" in stream.getvalue() and "RuntimeError" in stream.getvalue()
    assert await get_status(locked, "k", secret) == 401


async def test_without_the_bootstrap_token_the_store_tokens_are_not_read(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    assert TOKENS_KEY not in client.app
    secret = await add_token(store_of(client), "ci", [("a/", "read")])
    response = await client.post("/set", json={"key": "b", "val": "v"}, headers=bearer(secret))
    assert response.status == 200  # an open server, as ever


async def test_refusals_are_counted_by_reason(locked: Client) -> None:
    store = store_of(locked)
    secret = await add_token(store, "ci", [("a/", "read")])
    await locked.get("/get/k")  # missing
    await locked.get("/get/k", headers=bearer(new_secret()))  # unknown
    await locked.get("/get/k", headers=bearer(secret))  # forbidden
    await locked.post("/set", json={"key": "a/1", "val": "v"}, headers=bearer(secret))
    await locked.get("/config", headers=bearer(secret))  # not_admin
    text = await (await locked.get("/metrics", headers=ADMIN)).text()
    counts = {
        reason: sample(text, "kv_auth_refusals_total", reason=reason)
        for reason in ("missing", "unknown", "forbidden", "not_admin")
    }
    assert counts == {"missing": 1, "unknown": 1, "forbidden": 2, "not_admin": 1}


async def test_the_access_log_names_the_token_never_its_secret_or_hash(
    make_client: MakeClient, make_settings: MakeSettings
) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    client = await make_client(auth_token=BOOTSTRAP, access_log=True)
    store = store_of(client)
    secret = await add_token(store, "billing", [("billing/", "readwrite")])
    await client.get("/get/billing/1", headers=bearer(secret))
    await client.get("/get/other", headers=bearer(secret))  # 403
    rotated = new_secret()
    await store.rotate_token("billing", hash_secret(rotated), None)
    await client.app[TOKENS_KEY].poll()
    await client.get("/get/billing/1", headers=bearer(secret))  # 401
    await client.get("/get/billing/1", headers=bearer(rotated))
    await client.get("/get/k", headers=ADMIN)
    await client.app[TOKENS_KEY].touch()
    output = stream.getvalue()
    assert output.count('"token": "billing"') == 3
    assert output.count('"token": "KV_AUTH_TOKEN"') == 1
    for secret_text in (secret, rotated, BOOTSTRAP):
        assert secret_text not in output
        assert hash_secret(secret_text) not in output


async def test_a_lookup_that_straddles_a_revocation_is_not_cached(locked: Client) -> None:
    """A store read begun before a delete that ends after the poll saw it: the request it
    answers may pass, but the token it read must not stay cached."""
    store = store_of(locked)
    secret = await add_token(store, "ci")
    look_up, release = store.token_by_hash, asyncio.Event()

    async def slow_look_up(secret_hash: str) -> Optional[Token]:
        token = await look_up(secret_hash)
        await release.wait()
        return token

    store.token_by_hash = slow_look_up  # type: ignore[method-assign]
    first = asyncio.ensure_future(get_status(locked, "k", secret))
    await asyncio.sleep(0.05)  # the request waits in the look-up
    assert await store.delete_token("ci")
    await locked.app[TOKENS_KEY].poll()
    release.set()
    assert await first == 404  # read before the delete
    assert await get_status(locked, "k", secret) == 401
