"""The data API over HTTP, in-process on every backend: versions and conditional writes,
expiry, listing by prefix, and batches."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any, Optional
from urllib.parse import quote

import pytest

from .conftest import Client, FakeClock, MakeClient
from .test_api import assert_error

ETAG = re.compile(r'"[0-9]+"')
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_795_000_000.0)  # 2026-11-18T11:06:40Z


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    return await make_client(store=store_kind, clock=clock)


async def set_key(
    client: Client, key: str, val: str, headers: Optional[dict[str, str]] = None, **extra: Any
) -> Any:
    return await client.post("/set", json={"key": key, "val": val, **extra}, headers=headers)


def version_of(response: Any) -> int:
    tag = response.headers["ETag"]
    assert ETAG.fullmatch(tag), tag
    return int(tag.strip('"'))


async def stored(client: Client, key: str) -> Optional[str]:
    response = await client.get("/get/" + quote(key, safe=""))
    if response.status == 404:
        return None
    assert response.status == 200
    return str((await response.json())["val"])


# --- versions and conditional writes --------------------------------------------------------


async def test_versions_are_etags_on_set_get_and_head(client: Client) -> None:
    first = await set_key(client, "k", "one")
    assert first.status == 200 and await first.json() == {"key": "k", "val": "one"}
    got = await client.get("/get/k")
    assert await got.json() == {"key": "k", "val": "one"}  # metadata only in headers
    assert version_of(got) == version_of(first)
    assert version_of(await client.head("/get/k")) == version_of(first)
    other = await set_key(client, "other", "x")
    second = await set_key(client, "k", "two")
    assert version_of(first) < version_of(other) < version_of(second)
    assert "KV-Expires-At" not in got.headers


async def test_if_match_writes_only_at_the_version_read(client: Client) -> None:
    version = version_of(await set_key(client, "k", "one"))
    stale = await set_key(client, "k", "lost", {"If-Match": f'"{version + 1}"'})
    await assert_error(stale, 412, "precondition_failed")
    assert version_of(stale) == version  # the current version, to retry from
    assert await stored(client, "k") == "one"
    fresh = await set_key(client, "k", "two", {"If-Match": f'"{version}"'})
    assert fresh.status == 200 and version_of(fresh) > version
    assert await stored(client, "k") == "two"


async def test_if_match_star_and_if_none_match_star(client: Client) -> None:
    absent = await set_key(client, "k", "v", {"If-Match": "*"})
    await assert_error(absent, 412, "precondition_failed")
    assert "ETag" not in absent.headers and await stored(client, "k") is None
    created = await set_key(client, "k", "v", {"If-None-Match": "*"})
    assert created.status == 200
    again = await set_key(client, "k", "w", {"If-None-Match": "*"})
    await assert_error(again, 412, "precondition_failed")
    assert version_of(again) == version_of(created)
    assert (await set_key(client, "k", "w", {"If-Match": "*"})).status == 200
    assert await stored(client, "k") == "w"


async def test_conditional_delete(client: Client) -> None:
    version = version_of(await set_key(client, "k", "v"))
    stale = await client.delete("/delete/k", headers={"If-Match": f'"{version - 1}"'})
    await assert_error(stale, 412, "precondition_failed")
    assert version_of(stale) == version and await stored(client, "k") == "v"
    fresh = await client.delete("/delete/k", headers={"If-Match": f'"{version}"'})
    assert fresh.status == 200 and await stored(client, "k") is None
    gone = await client.delete("/delete/k", headers={"If-Match": "*"})
    await assert_error(gone, 412, "precondition_failed")


@pytest.mark.parametrize(
    "headers",
    [
        {"If-Match": "12"},
        {"If-Match": 'W/"12"'},
        {"If-Match": '"twelve"'},
        {"If-Match": '"1", "2"'},
        {"If-Match": ""},
        {"If-None-Match": '"12"'},
        {"If-Match": "*", "If-None-Match": "nope"},
    ],
)
async def test_a_malformed_precondition_is_400_and_stores_nothing(
    client: Client, headers: dict[str, str]
) -> None:
    await assert_error(await set_key(client, "k", "v", headers), 400, "invalid_header")
    assert await stored(client, "k") is None


async def test_if_match_and_if_none_match_together_never_hold(client: Client) -> None:
    """Both must hold (RFC 9110): a key that exists, and does not."""
    both = {"If-Match": "*", "If-None-Match": "*"}
    absent = await set_key(client, "k", "v", both)
    await assert_error(absent, 412, "precondition_failed")
    assert "ETag" not in absent.headers and await stored(client, "k") is None
    version = version_of(await set_key(client, "k", "v"))
    present = await set_key(client, "k", "w", {**both, "If-Match": f'"{version}"'})
    await assert_error(present, 412, "precondition_failed")
    assert version_of(present) == version and await stored(client, "k") == "v"


async def test_delete_takes_if_match_only(client: Client) -> None:
    await set_key(client, "k", "v")
    response = await client.delete("/delete/k", headers={"If-None-Match": "*"})
    await assert_error(response, 400, "invalid_header")
    assert await stored(client, "k") == "v"


# --- expiry ---------------------------------------------------------------------------------


async def test_a_key_with_a_ttl_expires_at_once(client: Client, clock: FakeClock) -> None:
    written = await set_key(client, "k", "v", ttl=1.5)
    assert written.status == 200
    assert written.headers["KV-Expires-At"] == "2026-11-18T11:06:41.500Z"
    got = await client.get("/get/k")
    assert got.headers["KV-Expires-At"] == "2026-11-18T11:06:41.500Z"
    assert RFC3339_MS.fullmatch(got.headers["KV-Expires-At"])
    clock.advance(1.499)
    assert await stored(client, "k") == "v"
    clock.advance(0.001)
    await assert_error(await client.get("/get/k"), 404, "key_not_found")
    assert (await client.head("/get/k")).status == 404


async def test_a_set_without_ttl_removes_the_expiry(client: Client, clock: FakeClock) -> None:
    await set_key(client, "k", "v", ttl=10)
    again = await set_key(client, "k", "w")
    assert "KV-Expires-At" not in again.headers
    clock.advance(3600)
    assert await stored(client, "k") == "w"


async def test_a_null_ttl_means_no_expiry(client: Client) -> None:
    response = await set_key(client, "k", "v", ttl=None)
    assert response.status == 200 and "KV-Expires-At" not in response.headers


@pytest.mark.parametrize("ttl", [0, -1, 315_360_000.001, 1e300, "5", True, [5], {"seconds": 5}])
async def test_an_invalid_ttl_is_422_and_stores_nothing(client: Client, ttl: Any) -> None:
    message = await assert_error(await set_key(client, "k", "v", ttl=ttl), 422, "invalid_ttl")
    assert "'ttl'" in message
    assert await stored(client, "k") is None


async def test_the_longest_ttl_is_ten_years(client: Client) -> None:
    response = await set_key(client, "k", "v", ttl=315_360_000)
    assert response.headers["KV-Expires-At"] == "2036-11-15T11:06:40.000Z"


# --- listing --------------------------------------------------------------------------------


async def list_page(client: Client, **query: str) -> Any:
    response = await client.get("/keys", params=query)
    assert response.status == 200, await response.text()
    return await response.json()


async def list_all(client: Client, **query: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: Optional[str] = None
    while True:
        page = await list_page(client, **query, **({} if cursor is None else {"cursor": cursor}))
        assert set(page) == {"items", "cursor"}
        items += page["items"]
        cursor = page["cursor"]
        if cursor is None:
            return items


async def test_keys_lists_every_key_in_byte_order_with_versions(client: Client) -> None:
    keys = ["b", "a", "a/1", "a:2", "ключ", "😀", "Z"]
    versions = {key: version_of(await set_key(client, key, key * 2)) for key in keys}
    page = await list_page(client)
    assert page["cursor"] is None
    assert [item["key"] for item in page["items"]] == sorted(keys, key=str.encode)
    for item in page["items"]:
        assert item == {"key": item["key"], "version": versions[item["key"]], "expires_at": None}


async def test_keys_pages_through_a_prefix_with_the_cursor(client: Client) -> None:
    response = await client.post(
        "/mset",
        json={
            "items": [{"key": f"user:{n:03}", "val": str(n)} for n in range(25)]
            + [{"key": "other", "val": "x"}, {"key": "user", "val": "y"}]
        },
    )
    assert response.status == 200
    first = await list_page(client, prefix="user:", limit="10")
    assert len(first["items"]) == 10 and isinstance(first["cursor"], str)
    items = await list_all(client, prefix="user:", limit="10")
    assert [item["key"] for item in items] == [f"user:{n:03}" for n in range(25)]


async def test_keys_with_values_and_expiry(client: Client, clock: FakeClock) -> None:
    await set_key(client, "a", "1")
    await set_key(client, "b", "2", ttl=60)
    await set_key(client, "c", "3", ttl=1)
    clock.advance(1)
    items = (await list_page(client, values="true"))["items"]
    assert [(item["key"], item["val"]) for item in items] == [("a", "1"), ("b", "2")]
    assert items[0]["expires_at"] is None
    assert items[1]["expires_at"] == "2026-11-18T11:07:40.000Z"
    assert all("val" not in item for item in (await list_page(client, values="false"))["items"])


def cursor_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"values": "maybe"}, "values"),
        ({"cursor": "!!not base64!!"}, "cursor"),
        ({"cursor": cursor_of(b"\xff\xfe")}, "cursor"),
        ({"cursor": ""}, "cursor"),
        ({"prefx": "a"}, "prefx"),
    ],
)
async def test_a_wrong_parameter_is_422_naming_it(
    client: Client, query: dict[str, str], parameter: str
) -> None:
    response = await client.get("/keys", params=query)
    message = await assert_error(response, 422, "invalid_parameter")
    assert f"'{parameter}'" in message


async def test_a_repeated_parameter_is_422(client: Client) -> None:
    response = await client.get("/keys?limit=1&limit=2")
    assert "'limit'" in await assert_error(response, 422, "invalid_parameter")


# --- batches --------------------------------------------------------------------------------


async def test_mget_answers_in_request_order(client: Client, clock: FakeClock) -> None:
    await set_key(client, "a", "1")
    await set_key(client, "b", "2", ttl=1)
    clock.advance(1)
    response = await client.post("/mget", json={"keys": ["missing", "a", "b", "a"]})
    assert response.status == 200
    assert await response.json() == {
        "items": [
            {"key": "missing", "val": None},
            {"key": "a", "val": "1"},
            {"key": "b", "val": None},
            {"key": "a", "val": "1"},
        ]
    }


async def test_mset_writes_all_with_one_version(client: Client) -> None:
    response = await client.post(
        "/mset",
        json={"items": [{"key": "a", "val": "1"}, {"key": "b", "val": "2", "ttl": 30}]},
    )
    assert response.status == 200
    body = await response.json()
    assert body["count"] == 2
    assert version_of(await client.get("/get/a")) == body["version"]
    got = await client.get("/get/b")
    assert version_of(got) == body["version"] and "KV-Expires-At" in got.headers


@pytest.mark.parametrize(
    ("bad_item", "status", "code"),
    [
        ({"key": "d", "val": 4}, 422, "invalid_type"),
        ({"key": "", "val": "v"}, 422, "empty_key"),
        ({"key": "d"}, 422, "missing_field"),
        ({"key": "d", "val": "v", "ttl": 0}, 422, "invalid_ttl"),
        ({"key": "d", "value": "v"}, 422, "unknown_field"),
        ({"key": "d", "val": "v" * 2000}, 413, "value_too_large"),
        ({"key": "d" * 300, "val": "v"}, 422, "key_too_long"),
        ("not an item", 422, "invalid_type"),
    ],
)
async def test_an_invalid_item_fails_the_whole_batch_naming_its_index(
    make_client: MakeClient, store_kind: str, bad_item: Any, status: int, code: str
) -> None:
    client = await make_client(store=store_kind, max_value_bytes=1000, max_key_bytes=256)
    items = [{"key": name, "val": "v"} for name in ("a", "b", "c")] + [bad_item]
    message = await assert_error(await client.post("/mset", json={"items": items}), status, code)
    assert message.startswith("items[3]"), message
    assert (await list_page(client))["items"] == []


async def test_mdelete_counts_what_existed(client: Client) -> None:
    await client.post("/mset", json={"items": [{"key": k, "val": k} for k in "abc"]})
    response = await client.post("/mdelete", json={"keys": ["a", "c", "missing", "a"]})
    assert await response.json() == {"deleted": 2}
    assert [item["key"] for item in (await list_page(client))["items"]] == ["b"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/mget", {"keys": []}),
        ("/mget", {"keys": [str(n) for n in range(1001)]}),
        ("/mdelete", {"keys": []}),
        ("/mset", {"items": []}),
    ],
)
async def test_batch_sizes_are_bounded(client: Client, path: str, body: Any) -> None:
    await assert_error(await client.post(path, json=body), 422, "invalid_batch")


async def test_a_batch_of_ten_thousand_writes(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, max_body_bytes=1 << 20)
    items = [{"key": f"k{n}", "val": "v"} for n in range(10_000)]
    assert (await client.post("/mset", json={"items": items})).status == 200
    too_many = [*items, {"key": "one more", "val": "v"}]
    response = await client.post("/mset", data=json.dumps({"items": too_many}))
    await assert_error(response, 422, "invalid_batch")
    deleted = await client.post("/mdelete", json={"keys": [item["key"] for item in items]})
    assert await deleted.json() == {"deleted": 10_000}


@pytest.mark.parametrize(
    ("path", "body", "name"),
    [
        ("/mget", {"keys": ["ok", 5]}, "keys[1]"),
        ("/mdelete", {"keys": ["ok", "ok", None]}, "keys[2]"),
        ("/mget", {"keys": "a"}, "'keys'"),
    ],
)
async def test_a_bad_key_in_a_batch_is_named(
    client: Client, path: str, body: Any, name: str
) -> None:
    assert name in await assert_error(await client.post(path, json=body), 422, "invalid_type")


async def test_expired_rows_are_purged_in_the_background(
    make_client: MakeClient, store_kind: str
) -> None:
    from mapmg_data_engineer_takehome.state import STORE_KEY

    client = await make_client(store=store_kind, purge_interval=0.05)
    items = [{"key": f"k{n}", "val": "v", "ttl": 0.1} for n in range(500)]
    assert (
        await client.post("/mset", json={"items": [*items, {"key": "kept", "val": "v"}]})
    ).status == 200
    store = client.app[STORE_KEY]
    deadline = asyncio.get_running_loop().time() + 10
    while await store.count() > 1:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert await stored(client, "kept") == "v"


@pytest.mark.parametrize(
    "body", [{"key": "a\u0000b", "val": "v"}, {"key": "k", "val": "nul\u0000inside"}]
)
async def test_a_nul_character_is_refused_by_every_store(client: Client, body: Any) -> None:
    """PostgreSQL's text cannot hold U+0000: every store refuses it, so that all answer alike."""
    message = await assert_error(await client.post("/set", json=body), 422, "invalid_string")
    assert "NUL" in message
    assert (await list_page(client))["items"] == []
    await assert_error(await client.get("/get/a%00b"), 422, "invalid_string")
    response = await client.post("/mset", json={"items": [{"key": "ok", "val": "v"}, body]})
    assert (await assert_error(response, 422, "invalid_string")).startswith("items[1].")
