"""The lease endpoints over HTTP, in-process on every backend: each answer's shape, a set (alone
and in a transaction) naming a lease, keepalive, expiry by the upkeep and revocation as the
change feed shows them, every 4xx with nothing stored, the bearer token and the metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mapmg_data_engineer_takehome.rules import rfc3339
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.upkeep import PURGE_BATCH, in_batches

from .conftest import Client, FakeClock, MakeClient
from .test_api import assert_error

START = 1_795_000_000.0
UNKNOWN = "0123456789abcdef" * 2  # well-formed, never granted


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    return await make_client(store=store_kind, clock=clock)


async def ok(response: Any) -> Any:
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def grant(client: Client, ttl: float) -> dict[str, Any]:
    return dict(await ok(await client.post("/leases", json={"ttl": ttl})))


async def revision(client: Client) -> int:
    assert client.app is not None
    return int(await client.app[STORE_KEY].revision())


async def changes(client: Client, since: int) -> list[dict[str, Any]]:
    response = await client.get("/changes", params={"since": str(since), "timeout": "0"})
    return list((await ok(response))["events"])


async def upkeep(client: Client) -> None:
    """One pass of the upkeep's removal of expired leases and keys, as keep_up runs it."""
    assert client.app is not None
    store = client.app[STORE_KEY]
    await in_batches(lambda: store.expire_leases(PURGE_BATCH))
    await in_batches(lambda: store.purge_expired(PURGE_BATCH))


def expiry(seconds_from_start: float) -> str:
    return rfc3339(round((START + seconds_from_start) * 1000))


# --- answers ----------------------------------------------------------------------------------


async def test_a_lease_is_granted_kept_alive_read_and_revoked(
    client: Client, clock: FakeClock
) -> None:
    start = await revision(client)
    lease = await grant(client, 30)
    assert set(lease) == {"id", "ttl", "expires_at"}
    assert len(lease["id"]) == 32 and lease["ttl"] == 30 and lease["expires_at"] == expiry(30)
    assert await revision(client) == start  # a grant takes no revision
    for key in ("svc/b", "svc/a"):
        written = await client.post("/set", json={"key": key, "val": "up", "lease": lease["id"]})
        await ok(written)
        assert written.headers["KV-Expires-At"] == expiry(30)
    after_sets = await revision(client)
    clock.advance(20)
    renewed = await ok(await client.post(f"/leases/{lease['id']}/keepalive"))
    assert renewed == {"id": lease["id"], "ttl": 30, "expires_at": expiry(50)}
    assert await revision(client) == after_sets  # no revision, no event
    assert await changes(client, after_sets) == []
    got = await client.get("/get/svc/a")
    await ok(got)
    assert got.headers["KV-Expires-At"] == expiry(50)  # the lease's expiry, moved with it
    read = await ok(await client.get(f"/leases/{lease['id']}"))
    assert read == {**renewed, "keys": ["svc/a", "svc/b"]}
    clock.advance(20)  # past the first expiry: kept alive
    assert (await client.get("/get/svc/b")).status == 200
    revoked = await ok(await client.delete(f"/leases/{lease['id']}"))
    assert revoked == {"id": lease["id"], "revoked": True, "deleted": 2}
    assert await changes(client, after_sets) == [
        {"revision": after_sets + 1, "type": "delete", "key": "svc/a"},
        {"revision": after_sets + 1, "type": "delete", "key": "svc/b"},
    ]
    await assert_error(await client.get("/get/svc/a"), 404, "key_not_found")
    for gone in (
        client.post(f"/leases/{lease['id']}/keepalive"),
        client.get(f"/leases/{lease['id']}"),
        client.delete(f"/leases/{lease['id']}"),
    ):
        await assert_error(await gone, 404, "lease_not_found")


async def test_many_leases_are_kept_alive_in_one_request(client: Client, clock: FakeClock) -> None:
    """Those live are renewed with their keys, in the order asked, each once; an expired, a
    revoked, an unknown and a malformed id are named, not an error; no revision."""
    short, long, revoked, expired = [await grant(client, ttl) for ttl in (10, 30, 30, 5)]
    for lease, key in ((short, "svc/short"), (long, "svc/long")):
        await ok(await client.post("/set", json={"key": key, "val": "up", "lease": lease["id"]}))
    await ok(await client.delete(f"/leases/{revoked['id']}"))
    before = await revision(client)
    clock.advance(8)  # the 5 s lease has expired; the others are live
    asked = [long["id"], expired["id"], short["id"], revoked["id"], UNKNOWN, "x", long["id"]]
    answer = await ok(await client.post("/leases/keepalive", json={"ids": asked}))
    assert answer == {
        "leases": [
            {"id": long["id"], "ttl": 30, "expires_at": expiry(38)},
            {"id": short["id"], "ttl": 10, "expires_at": expiry(18)},
        ],
        "not_found": [expired["id"], revoked["id"], UNKNOWN, "x"],
    }
    assert await revision(client) == before and await changes(client, before) == []
    clock.advance(9)  # past the short lease's first expiry, before its renewed one
    got = await client.get("/get/svc/short")
    await ok(got)
    assert got.headers["KV-Expires-At"] == expiry(18)


@pytest.mark.parametrize(
    ("body", "code"),
    [({"ids": []}, "invalid_batch"), ({}, "missing_field"), ({"ids": "x"}, "invalid_type")],
)
async def test_a_bad_keepalive_of_many_is_refused(
    client: Client, body: dict[str, Any], code: str
) -> None:
    await assert_error(await client.post("/leases/keepalive", json=body), 422, code)


async def test_an_expired_lease_takes_its_keys_in_one_revision_of_expire_events(
    client: Client, clock: FakeClock
) -> None:
    lease = await grant(client, 5)
    other = await grant(client, 100)
    await ok(await client.post("/set", json={"key": "l/2", "val": "x", "lease": lease["id"]}))
    await ok(
        await client.post(
            "/txn",
            json={
                "success": [
                    {"op": "set", "key": "l/1", "val": "x", "lease": lease["id"]},
                    {"op": "set", "key": "l/3", "val": "x", "lease": other["id"]},
                ]
            },
        )
    )
    start = await revision(client)
    clock.advance(5)
    # Gone at once from every read, before the upkeep has run.
    await assert_error(await client.get("/get/l/1"), 404, "key_not_found")
    listing = await ok(await client.get("/keys", params={"prefix": "l/"}))
    assert [item["key"] for item in listing["items"]] == ["l/3"]
    keepalive = await client.post(f"/leases/{lease['id']}/keepalive")
    await assert_error(keepalive, 404, "lease_not_found")
    await upkeep(client)
    assert await changes(client, start) == [
        {"revision": start + 1, "type": "expire", "key": "l/1"},
        {"revision": start + 1, "type": "expire", "key": "l/2"},
    ]
    assert (await ok(await client.get(f"/leases/{other['id']}")))["keys"] == ["l/3"]


async def test_a_set_without_the_lease_detaches_the_key(client: Client, clock: FakeClock) -> None:
    lease = await grant(client, 5)
    await ok(await client.post("/set", json={"key": "k", "val": "1", "lease": lease["id"]}))
    detached = await client.post("/set", json={"key": "k", "val": "2"})
    await ok(detached)
    assert "KV-Expires-At" not in detached.headers
    assert (await ok(await client.get(f"/leases/{lease['id']}")))["keys"] == []
    revoked = await ok(await client.delete(f"/leases/{lease['id']}"))
    assert revoked["deleted"] == 0
    clock.advance(10)
    await upkeep(client)
    assert (await ok(await client.get("/get/k")))["val"] == "2"


# --- refusals: nothing stored -----------------------------------------------------------------


async def assert_refused(client: Client, response: Any, status: int, code: str) -> str:
    before = await revision(client)
    message = await assert_error(await response, status, code)
    assert await revision(client) == before
    return message


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"ttl": ', 400, "invalid_json"),
        ({}, 422, "missing_field"),
        ({"ttl": 0}, 422, "invalid_ttl"),
        ({"ttl": -1}, 422, "invalid_ttl"),
        ({"ttl": 315_360_001}, 422, "invalid_ttl"),
        ({"ttl": "5"}, 422, "invalid_ttl"),
        ({"ttl": 5, "keys": []}, 422, "unknown_field"),
        ([5], 422, "invalid_body"),
    ],
)
async def test_a_bad_grant_is_refused(client: Client, body: Any, status: int, code: str) -> None:
    sent = body if isinstance(body, bytes) else None
    response = client.post("/leases", data=sent, json=None if sent is not None else body)
    await assert_refused(client, response, status, code)
    assert client.app is not None
    assert await client.app[STORE_KEY].live_leases() == 0


@pytest.mark.parametrize("lease", [UNKNOWN, "not-a-lease", "%00", "A" * 32])
async def test_an_unknown_lease_is_404_on_every_endpoint(client: Client, lease: str) -> None:
    for response in (
        client.post(f"/leases/{lease}/keepalive"),
        client.get(f"/leases/{lease}"),
        client.delete(f"/leases/{lease}"),
    ):
        await assert_refused(client, response, 404, "lease_not_found")


@pytest.mark.parametrize("lease", [UNKNOWN, "nope", "\x00", ""])
async def test_a_set_naming_no_live_lease_is_404_and_writes_nothing(
    client: Client, clock: FakeClock, lease: str
) -> None:
    await ok(await client.post("/set", json={"key": "k", "val": "before"}))
    body = {"key": "k", "val": "after", "lease": lease}
    message = await assert_refused(client, client.post("/set", json=body), 404, "lease_not_found")
    assert lease not in message or not lease
    txn = {
        "success": [
            {"op": "delete", "key": "k"},
            {"op": "set", "key": "new", "val": "v", "lease": lease},
        ]
    }
    await assert_refused(client, client.post("/txn", json=txn), 404, "lease_not_found")
    assert (await ok(await client.get("/get/k")))["val"] == "before"
    await assert_error(await client.get("/get/new"), 404, "key_not_found")


async def test_an_expired_lease_is_404_to_a_set(client: Client, clock: FakeClock) -> None:
    lease = await grant(client, 1)
    clock.advance(1)
    body = {"key": "k", "val": "v", "lease": lease["id"]}
    await assert_refused(client, client.post("/set", json=body), 404, "lease_not_found")
    txn = {"success": [{"op": "set", "key": "k", "val": "v", "lease": lease["id"]}]}
    await assert_refused(client, client.post("/txn", json=txn), 404, "lease_not_found")


async def test_a_failure_branch_not_taken_may_name_an_unknown_lease(client: Client) -> None:
    answer = await ok(
        await client.post(
            "/txn",
            json={
                "success": [{"op": "set", "key": "k", "val": "v"}],
                "failure": [{"op": "set", "key": "k", "val": "v", "lease": UNKNOWN}],
            },
        )
    )
    assert answer["succeeded"] is True


@pytest.mark.parametrize(
    ("body", "status", "code", "said"),
    [
        ({"key": "k", "val": "v", "ttl": 5, "lease": UNKNOWN}, 422, "invalid_request", "not both"),
        ({"key": "k", "val": "v", "lease": 5}, 422, "invalid_type", "Field 'lease'"),
        ({"key": "k", "val": "v", "lease": "a" * 65}, 422, "invalid_type", "at most 64"),
    ],
)
async def test_a_bad_lease_field_is_refused(
    client: Client, body: Any, status: int, code: str, said: str
) -> None:
    response = client.post("/set", json=body)
    assert said in await assert_refused(client, response, status, code)


async def test_mset_takes_no_lease(client: Client) -> None:
    lease = await grant(client, 5)
    body = {"items": [{"key": "k", "val": "v", "lease": lease["id"]}]}
    await assert_refused(client, client.post("/mset", json=body), 422, "unknown_field")


# --- the token and the metrics ----------------------------------------------------------------


async def test_every_lease_endpoint_needs_the_bearer_token(
    make_client: MakeClient, store_kind: str
) -> None:
    client = await make_client(store=store_kind, auth_token="s3cret-token")
    authorized = {"Authorization": "Bearer s3cret-token"}
    lease = await ok(await client.post("/leases", json={"ttl": 5}, headers=authorized))
    for response in (
        client.post("/leases", json={"ttl": 5}),
        client.post(f"/leases/{lease['id']}/keepalive"),
        client.get(f"/leases/{lease['id']}"),
        client.delete(f"/leases/{lease['id']}"),
    ):
        await assert_error(await response, 401, "unauthorized")
    assert client.app is not None
    assert await client.app[STORE_KEY].live_leases() == 1
    await ok(await client.get(f"/leases/{lease['id']}", headers=authorized))


async def test_leases_are_counted_without_ids_or_keys(
    make_client: MakeClient, store_kind: str, clock: FakeClock
) -> None:
    # The app's own upkeep, every 10 ms, expires the lease and counts it.
    client = await make_client(store=store_kind, clock=clock, purge_interval=0.01)
    first = await grant(client, 5)
    second = await grant(client, 50)
    await grant(client, 50)
    await ok(
        await client.post("/set", json={"key": "secret-key", "val": "v", "lease": first["id"]})
    )
    await ok(await client.delete(f"/leases/{second['id']}"))
    clock.advance(10)
    text = ""
    for _ in range(200):
        text = await (await client.get("/metrics")).text()
        if 'kv_leases_total{event="expired"} 1.0' in text:
            break
        await asyncio.sleep(0.01)
    assert 'kv_leases_total{event="granted"} 3.0' in text
    assert 'kv_leases_total{event="revoked"} 1.0' in text
    assert 'kv_leases_total{event="expired"} 1.0' in text
    assert "kv_leases_live 1.0" in text
    assert "secret-key" not in text
    for lease in (first, second):
        assert lease["id"] not in text
