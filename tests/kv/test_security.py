"""Authentication and size limits: nobody in without the token, nothing unbounded."""

from __future__ import annotations

import io
from typing import Any

import pytest

from mapmg_data_engineer_takehome.logs import configure_logging
from mapmg_data_engineer_takehome.settings import SettingsError, load_settings

from .conftest import Client, MakeClient, MakeSettings
from .test_api import assert_error, put

TOKEN = "s3cr3t-t0ken-value"
GOOD = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def locked(make_client: MakeClient, store_kind: str) -> Client:
    return await make_client(store=store_kind, auth_token=TOKEN, access_log=True)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/get/k"), ("POST", "/set"), ("DELETE", "/delete/k"), ("GET", "/config"),
     ("GET", "/keys"), ("POST", "/mget"), ("POST", "/mset"), ("POST", "/mdelete"),
     ("GET", "/nowhere")],
)  # fmt: skip
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"bearer {TOKEN}", TOKEN, f"Bearer {TOKEN}x", ""]
)
async def test_every_route_but_health_needs_the_token(
    locked: Client, method: str, path: str, authorization: Any
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await locked.request(method, path, json={"key": "k", "val": "v"}, headers=headers)
    await assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in await response.text()
    assert (await locked.get("/get/k", headers=GOOD)).status == 404  # nothing was stored


async def test_the_right_token_opens_every_route(locked: Client) -> None:
    assert (await locked.post("/set", json={"key": "k", "val": "v"}, headers=GOOD)).status == 200
    assert await (await locked.get("/get/k", headers=GOOD)).json() == {"key": "k", "val": "v"}
    assert (await locked.delete("/delete/k", headers=GOOD)).status == 200


async def test_health_needs_no_token(locked: Client) -> None:
    assert (await locked.get("/health")).status == 200


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/ui/", "/ui/app.js", "/ui/style.css"])
async def test_the_pages_need_no_token_and_carry_no_data(locked: Client, path: str) -> None:
    """A browser opens a page without a token; the page then asks for it. So the pages are
    public, and hold nothing but themselves."""
    assert (
        await locked.post("/set", json={"key": "k", "val": "v4lue"}, headers=GOOD)
    ).status == 200
    response = await locked.get(path)
    assert response.status == 200
    body = await response.text()
    assert TOKEN not in body and "v4lue" not in body


async def test_the_redirects_to_the_key_browser_are_public(locked: Client) -> None:
    for path, headers in (("/ui", {}), ("/", {"Accept": "text/html"})):
        response = await locked.get(path, headers=headers, allow_redirects=False)
        assert response.status == 302 and response.headers["Location"] == "/ui/"


async def test_the_token_is_not_in_config_nor_logs(
    make_client: MakeClient, make_settings: MakeSettings
) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    client = await make_client(auth_token=TOKEN, access_log=True)
    config = await (await client.get("/config", headers=GOOD)).json()
    assert config["auth_token"] == "**********"
    assert TOKEN not in str(config)
    await client.get("/get/k", headers={"Authorization": "Bearer wrong"})
    await client.get("/get/k", headers=GOOD)
    assert '"request"' in stream.getvalue()  # the access lines were written
    assert TOKEN not in stream.getvalue()


def test_an_empty_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_AUTH_TOKEN", " ")
    with pytest.raises(SettingsError, match="KV_AUTH_TOKEN"):
        load_settings([])


# --- limits ---------------------------------------------------------------------------------


async def test_keys_up_to_the_limit_in_bytes_of_utf8(client: Client) -> None:
    await put(client, "k" * 4096, "v")
    await put(client, "é" * 2048, "v")  # 2 bytes each: exactly 4096
    response = await client.post("/set", json={"key": "é" * 2049, "val": "v"})
    message = await assert_error(response, 422, "key_too_long")
    assert "4096" in message
    await assert_error(await client.post("/set", json={"key": "k" * 4097, "val": "v"}),
                       422, "key_too_long")  # fmt: skip
    await assert_error(await client.get("/get/" + "k" * 4097), 422, "key_too_long")
    await assert_error(await client.delete("/delete/" + "k" * 4097), 422, "key_too_long")
    assert (await client.get("/get/" + "k" * 4096)).status == 200


async def test_values_over_the_limit_are_413_and_not_stored(
    make_client: MakeClient, store_kind: str
) -> None:
    client = await make_client(store=store_kind, max_value_bytes=100, max_key_bytes=10)
    await put(client, "k", "v" * 100)
    response = await client.post("/set", json={"key": "k", "val": "ü" * 51})  # 102 bytes
    await assert_error(response, 413, "value_too_large")
    assert (await (await client.get("/get/k")).json())["val"] == "v" * 100
    await assert_error(await client.post("/set", json={"key": "k" * 11, "val": "v"}),
                       422, "key_too_long")  # fmt: skip


async def test_the_default_limits_admit_a_value_near_one_mebibyte(client: Client) -> None:
    value = "x" * (1024 * 1024 - 100)  # the 1 MiB body limit binds first
    await put(client, "big", value)
    assert len((await (await client.get("/get/big")).json())["val"]) == len(value)
