"""The HTTP contract, driven in-process against the real app on every backend."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from .conftest import Client, MakeClient

# Text every store can hold: every code point but the surrogates, and NUL (see docs/api.md, Errors).
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))


async def assert_error(response: Any, status: int, code: str) -> str:
    """The one error shape: JSON with exactly error and message; returns the message."""
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


def key_url(client: Client, route: str, key: str) -> URL:
    """An absolute URL for ``route`` + key, percent-encoding every reserved byte and dot.

    Dots are encoded too so that the keys "." and ".." are not removed as dot-segments;
    ``encoded=True`` stops yarl from normalising the path on the client side.
    """
    encoded = quote(key, safe="").replace(".", "%2E")
    return URL(str(client.make_url("")).rstrip("/") + route + encoded, encoded=True)


async def put(client: Client, key: str, val: str) -> None:
    response = await client.post("/set", json={"key": key, "val": val})
    assert response.status == 200
    assert await response.json() == {"key": key, "val": val}


# --- /set and /get -------------------------------------------------------------------------


async def test_set_then_get_returns_exactly_key_and_val(client: Client) -> None:
    await put(client, "greeting", "hello")
    response = await client.get("/get/greeting")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"key": "greeting", "val": "hello"}


async def test_set_overwrites(client: Client) -> None:
    await put(client, "k", "one")
    await put(client, "k", "two")
    assert await (await client.get("/get/k")).json() == {"key": "k", "val": "two"}


async def test_get_missing_key_is_404_json(client: Client) -> None:
    await assert_error(await client.get("/get/absent"), 404, "key_not_found")


async def test_set_reads_json_whatever_the_content_type(client: Client) -> None:
    body = b'{"key": "form", "val": "posted"}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = await client.post("/set", data=body, headers=headers)
        assert response.status == 200, content_type
    assert (await (await client.get("/get/form")).json())["val"] == "posted"


async def test_head_get_answers_status_without_body(client: Client) -> None:
    await put(client, "h", "v")
    present = await client.head("/get/h")
    assert present.status == 200
    assert await present.read() == b""
    assert (await client.head("/get/nope")).status == 404


@pytest.mark.parametrize(
    "key",
    [
        "a/b",
        "with space",
        "100%",
        "what?",
        "#hash",
        "quote\"'",
        "back\\slash",
        "new\nline",
        "tab\there",
        "emoji 😀",
        "..",
        ".",
        "a//b",
        "/leading",
        "trailing/",
        "plus+sign",
        "%2F-literally",
        "ünïcödé ключ 鍵",
    ],
)
async def test_awkward_keys_round_trip(client: Client, key: str) -> None:
    await put(client, key, "v:" + key)
    response = await client.session.get(key_url(client, "/get/", key))
    assert await response.json() == {"key": key, "val": "v:" + key}


async def test_unencoded_slash_belongs_to_the_key(client: Client) -> None:
    await put(client, "a/b/c", "deep")
    assert (await (await client.get("/get/a/b/c")).json())["key"] == "a/b/c"
    await assert_error(await client.get("/get/a"), 404, "key_not_found")


async def test_query_string_is_not_part_of_the_key(client: Client) -> None:
    await put(client, "q", "v")
    assert (await (await client.get("/get/q?verbose=1")).json())["key"] == "q"


async def test_key_with_invalid_percent_utf8_is_400(client: Client) -> None:
    await assert_error(await client.get("/get/%FF%FE"), 400, "invalid_key")


@settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=TEXT.filter(bool), val=TEXT)
async def test_any_string_round_trips(client: Client, key: str, val: str) -> None:
    await put(client, key, val)
    response = await client.session.get(key_url(client, "/get/", key))
    assert response.status == 200
    assert await response.json() == {"key": key, "val": val}


# --- /delete --------------------------------------------------------------------------------


async def test_delete_removes_then_404s(client: Client) -> None:
    await put(client, "gone/soon", "v")
    response = await client.delete("/delete/" + quote("gone/soon", safe=""))
    assert response.status == 200
    assert await response.json() == {"key": "gone/soon", "deleted": True}
    await assert_error(await client.get("/get/gone%2Fsoon"), 404, "key_not_found")
    await assert_error(await client.delete("/delete/gone%2Fsoon"), 404, "key_not_found")


# --- bad input ------------------------------------------------------------------------------


async def assert_rejected(client: Client, body: bytes, status: int, code: str) -> str:
    """The body is refused with the given error, and nothing was stored."""
    before = await client.get("/get/k")
    message = await assert_error(await client.post("/set", data=body), status, code)
    after = await client.get("/get/k")
    assert (before.status, await before.read()) == (after.status, await after.read())
    return message


async def test_malformed_json_is_400_saying_where(client: Client) -> None:
    message = await assert_rejected(client, b'{"key": "k", "val": }', 400, "invalid_json")
    assert "line 1 column 21" in message


async def test_non_utf8_body_is_400(client: Client) -> None:
    await assert_rejected(client, b'{"key": "k", "val": "\xff"}', 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ([], "invalid_body", "object"),
        ("just a string", "invalid_body", "object"),
        (42, "invalid_body", "object"),
        ({"val": "v"}, "missing_field", "'key'"),
        ({"key": "k"}, "missing_field", "'val'"),
        ({"key": "k", "val": "v", "expires": 5}, "unknown_field", "'expires'"),
        ({"key": "k", "val": None}, "invalid_type", "'val'"),
        ({"key": None, "val": "v"}, "invalid_type", "'key'"),
        ({"key": 1, "val": "v"}, "invalid_type", "'key'"),
        ({"key": "k", "val": 1.5}, "invalid_type", "'val'"),
        ({"key": "k", "val": True}, "invalid_type", "'val'"),
        ({"key": "k", "val": ["v"]}, "invalid_type", "'val'"),
        ({"key": "k", "val": {"v": 1}}, "invalid_type", "'val'"),
        ({"key": "", "val": "v"}, "empty_key", "'key'"),
    ],
)
async def test_invalid_bodies_are_422_naming_the_field(
    client: Client, body: Any, code: str, field: str
) -> None:
    message = await assert_rejected(client, json.dumps(body).encode(), 422, code)
    assert field in message


async def test_value_instead_of_val_gets_a_hint(client: Client) -> None:
    message = await assert_rejected(client, b'{"key": "k", "value": "v"}', 422, "unknown_field")
    assert "'value'" in message and "Did you mean 'val'?" in message


async def test_lone_surrogate_is_422(client: Client) -> None:
    await assert_rejected(client, b'{"key": "k", "val": "\\ud800"}', 422, "invalid_string")


async def test_body_over_the_limit_is_413(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, max_body_bytes=1000)
    big = json.dumps({"key": "k", "val": "x" * 2000}).encode()
    message = await assert_rejected(client, big, 413, "body_too_large")
    assert "1000" in message


async def test_body_over_the_limit_without_content_length_is_413(
    make_client: MakeClient,
) -> None:
    client = await make_client(max_body_bytes=1000)

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 500

    await assert_error(await client.post("/set", data=chunks()), 413, "body_too_large")


async def test_body_at_the_limit_is_accepted(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=1000)
    prefix = b'{"key": "k", "val": "'
    body = prefix + b"x" * (1000 - len(prefix) - 2) + b'"}'
    assert len(body) == 1000
    assert (await client.post("/set", data=body)).status == 200


# --- routing errors -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/get", "/get/", "/set/extra"])
async def test_unknown_routes_are_404_json(client: Client, path: str) -> None:
    await assert_error(await client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/set", "POST"),
        ("PUT", "/set", "POST"),
        ("POST", "/get/k", "GET"),
        ("GET", "/delete/k", "DELETE"),
        ("POST", "/health", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    client: Client, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path)
    await assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["Allow"]


async def test_unexpected_failure_is_500_json_without_internals(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapmg_data_engineer_takehome.state import STORE_KEY

    store = client.app[STORE_KEY]

    async def explode(key: str) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(store, "get", explode)
    response = await client.get("/get/k")
    message = await assert_error(response, 500, "internal_error")
    assert "secret" not in message and "Traceback" not in await response.text()
    assert response.headers["X-Request-ID"]


# --- request ids ----------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    echoed = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = await client.get("/get/missing")
    assert len(generated.headers["X-Request-ID"]) >= 16
    other = await client.get("/get/missing")
    assert other.headers["X-Request-ID"] != generated.headers["X-Request-ID"]


async def test_unprintable_request_id_is_replaced(client: Client) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert response.headers["X-Request-ID"] != "x" * 500


# --- /health and /config --------------------------------------------------------------------


async def test_health_is_ok_while_the_store_answers(client: Client, store_kind: str) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "store": store_kind}


async def test_health_is_503_when_the_store_does_not_answer(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapmg_data_engineer_takehome.state import STORE_KEY
    from mapmg_data_engineer_takehome.store import StoreUnavailable

    async def down() -> None:
        raise StoreUnavailable("disk I/O error")

    monkeypatch.setattr(client.app[STORE_KEY], "ping", down)
    await assert_error(await client.get("/health"), 503, "store_unavailable")


async def test_config_shows_effective_settings(make_client: MakeClient, tmp_path: Any) -> None:
    from .conftest import write_input_db

    input_db = write_input_db(tmp_path / "seed.db", [("a", "1")])
    client = await make_client(input_db=input_db, max_body_bytes=4096)
    config = await (await client.get("/config")).json()
    assert config["store"] == "sqlite"
    assert config["durability"] == "normal"
    assert config["max_body_bytes"] == 4096
    assert config["port"] == 8000
    assert config["input_db_used"] == str(input_db)
    assert config["data_path"].endswith("kv.sqlite3")


async def test_config_without_seed_says_none(client: Client) -> None:
    assert (await (await client.get("/config")).json())["input_db_used"] is None


async def test_store_failure_on_write_is_503(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapmg_data_engineer_takehome.state import STORE_KEY
    from mapmg_data_engineer_takehome.store import StoreUnavailable

    async def full(*args: object) -> None:
        raise StoreUnavailable("database or disk is full")

    monkeypatch.setattr(client.app[STORE_KEY], "set", full)
    response = await client.post("/set", json={"key": "k", "val": "v"})
    await assert_error(response, 503, "store_unavailable")
