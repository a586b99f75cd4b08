"""The token endpoints over HTTP, in process, on every backend: each answer's shape, the secret
shown once and only its hash stored, rotation with and without grace, revocation,
GET /tokens/self, every 4xx with nothing stored, the refusals (no token: 401; not admin, or a
server without KV_AUTH_TOKEN: 403), the audit log and the metrics.

The store's tokens authenticate (i27-enforce), so a non-admin token's refusal is tested over
HTTP with a token made by POST /tokens."""

from __future__ import annotations

import io
import json
from typing import Any, Optional

import pytest

from mapmg_data_engineer_takehome.access import hash_secret
from mapmg_data_engineer_takehome.logs import configure_logging
from mapmg_data_engineer_takehome.routes import ENDPOINTS
from mapmg_data_engineer_takehome.rules import rfc3339
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.store.base import Token, TokenRule

from .conftest import Client, FakeClock, MakeClient, MakeSettings
from .test_api import assert_error

TOKEN = "b00tstrap-t0ken"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}
START = 1_795_000_000.0
# The API document's example: billing/ read and write, cfg/ read, for a day.
BILLING: dict[str, Any] = next(dict(e.example or {}) for e in ENDPOINTS if e.name == "create_token")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    return await make_client(store=store_kind, clock=clock, auth_token=TOKEN)


async def ok(response: Any) -> Any:
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def create(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    return dict(await ok(await client.post("/tokens", json=body, headers=AUTHORIZED)))


async def stored(client: Client) -> dict[str, Token]:
    assert client.app is not None
    return {token.name: token for token in await client.app[STORE_KEY].tokens()}


def at(seconds_from_start: float) -> str:
    return rfc3339(round((START + seconds_from_start) * 1000))


# --- answers ----------------------------------------------------------------------------------


async def test_a_token_is_created_with_its_secret_shown_once_and_only_its_hash_stored(
    client: Client,
) -> None:
    created = await create(client, BILLING)
    secret = created.pop("secret")
    assert created == {
        "name": "billing",
        "rules": BILLING["rules"],
        "admin": False,
        "created_at": at(0),
        "expires_at": at(86400),
    }
    assert secret.startswith("kv_") and len(secret) == 3 + 43  # 256 bits, base64url
    token = (await stored(client))["billing"]
    assert token.secret_hash == hash_secret(secret) != secret
    assert token.rules == (TokenRule("billing/", "readwrite"), TokenRule("cfg/", "read"))
    assert (token.admin, token.expires_at) == (False, round((START + 86400) * 1000))

    listing = await client.get("/tokens", headers=AUTHORIZED)
    text = await listing.text()
    assert secret not in text and token.secret_hash not in text
    assert (await ok(listing)) == {
        "tokens": [{**created, "last_used_at": None}],
    }


async def test_tokens_are_listed_by_name_with_their_defaults(
    client: Client, clock: FakeClock
) -> None:
    await create(client, {"name": "zeta", "rules": [{"prefix": "", "access": "read"}]})
    clock.advance(5)
    await create(client, {"name": "Alpha.ops-1", "admin": True})
    listing = await ok(await client.get("/tokens", headers=AUTHORIZED))
    assert listing == {
        "tokens": [
            {
                "name": "Alpha.ops-1",
                "rules": [],
                "admin": True,
                "created_at": at(5),
                "expires_at": None,
                "last_used_at": None,
            },
            {
                "name": "zeta",
                "rules": [{"prefix": "", "access": "read"}],
                "admin": False,
                "created_at": at(0),
                "expires_at": None,
                "last_used_at": None,
            },
        ]
    }


async def test_a_taken_name_is_409_and_the_first_token_is_kept(client: Client) -> None:
    first = await create(client, BILLING)
    response = await client.post(
        "/tokens", json={**BILLING, "admin": True, "rules": []}, headers=AUTHORIZED
    )
    assert "billing" in await assert_error(response, 409, "token_exists")
    token = (await stored(client))["billing"]
    assert token.secret_hash == hash_secret(first["secret"]) and not token.admin


async def test_rotation_replaces_the_hash_and_the_old_secret_stops_at_once(
    client: Client, clock: FakeClock
) -> None:
    created = await create(client, BILLING)
    clock.advance(60)
    for body in (None, {}, {"grace": 0}):
        before = (await stored(client))["billing"].secret_hash
        response = await client.post("/tokens/billing/rotate", json=body, headers=AUTHORIZED)
        rotated = await ok(response)
        secret = rotated.pop("secret")
        assert secret.startswith("kv_") and secret != created["secret"]
        # The token is the same one: only its secret changed.
        assert rotated == {key: value for key, value in created.items() if key != "secret"}
        token = (await stored(client))["billing"]
        assert token.secret_hash == hash_secret(secret) != before
        assert (token.previous_hash, token.previous_until) == (None, None)


async def test_rotation_with_grace_keeps_the_old_hash_until_then(
    client: Client, clock: FakeClock
) -> None:
    created = await create(client, BILLING)
    clock.advance(10)
    rotated = await ok(
        await client.post("/tokens/billing/rotate", json={"grace": 3600}, headers=AUTHORIZED)
    )
    token = (await stored(client))["billing"]
    assert token.secret_hash == hash_secret(rotated["secret"])
    assert token.previous_hash == hash_secret(created["secret"])
    assert token.previous_until == round((START + 10 + 3600) * 1000)
    listing = await (await client.get("/tokens", headers=AUTHORIZED)).text()
    for secret in (created["secret"], rotated["secret"]):
        assert secret not in listing and hash_secret(secret) not in listing


async def test_a_revoked_token_is_gone_and_unknown_names_are_404(client: Client) -> None:
    await create(client, BILLING)
    await create(client, {"name": "other"})
    response = await client.delete("/tokens/billing", headers=AUTHORIZED)
    assert await ok(response) == {"name": "billing", "revoked": True}
    assert set(await stored(client)) == {"other"}
    for name in ("billing", "nobody", "bad%20name", "x" * 65):
        message = await assert_error(
            await client.delete(f"/tokens/{name}", headers=AUTHORIZED), 404, "token_not_found"
        )
        assert "GET /tokens" in message
        await assert_error(
            await client.post(f"/tokens/{name}/rotate", headers=AUTHORIZED),
            404,
            "token_not_found",
        )
    assert set(await stored(client)) == {"other"}


async def test_self_names_the_calling_token(
    client: Client, make_client: MakeClient, store_kind: str
) -> None:
    answer = await ok(await client.get("/tokens/self", headers=AUTHORIZED))
    assert answer == {
        "name": "KV_AUTH_TOKEN",
        "rules": [{"prefix": "", "access": "readwrite"}],
        "admin": True,
    }
    open_server = await make_client(store=store_kind)
    assert await ok(await open_server.get("/tokens/self")) == {
        "name": None,
        "rules": [{"prefix": "", "access": "readwrite"}],
        "admin": True,
    }
    dash = await create(client, {"name": "dash", "rules": [{"prefix": "cfg/", "access": "read"}]})
    scoped = {"Authorization": f"Bearer {dash['secret']}"}
    assert await ok(await client.get("/tokens/self", headers=scoped)) == {
        "name": "dash",
        "rules": [{"prefix": "cfg/", "access": "read"}],
        "admin": False,
    }


# --- refusals ---------------------------------------------------------------------------------

# Bodies of POST /tokens and the error each gets; none stores anything.
BAD_BODIES: list[tuple[Any, int, str]] = [
    (b"{", 400, "invalid_json"),
    ([], 422, "invalid_body"),
    ({}, 422, "missing_field"),
    ({"name": "a", "secret": "kv_mine"}, 422, "unknown_field"),
    ({"name": ""}, 422, "invalid_name"),
    ({"name": "x" * 65}, 422, "invalid_name"),
    ({"name": "a b"}, 422, "invalid_name"),
    ({"name": "a/b"}, 422, "invalid_name"),
    ({"name": "ünï"}, 422, "invalid_name"),
    ({"name": 5}, 422, "invalid_type"),
    ({"name": "a", "rules": {"prefix": ""}}, 422, "invalid_type"),
    ({"name": "a", "rules": [{"prefix": "a/"}]}, 422, "missing_field"),
    ({"name": "a", "rules": [{"prefix": "a/", "access": "write"}]}, 422, "invalid_type"),
    ({"name": "a", "rules": [{"prefix": "a/", "access": "read", "x": 1}]}, 422, "unknown_field"),
    ({"name": "a", "rules": [{"prefix": 1, "access": "read"}]}, 422, "invalid_type"),
    ({"name": "a", "rules": [{"prefix": "a\u0000", "access": "read"}]}, 422, "invalid_string"),
    ({"name": "a", "rules": [{"prefix": "k" * 4097, "access": "read"}]}, 422, "key_too_long"),
    ({"name": "a", "rules": [{"prefix": "p", "access": "read"}] * 101}, 422, "invalid_rules"),
    ({"name": "a", "admin": "yes"}, 422, "invalid_type"),
    ({"name": "a", "expires_in": 0}, 422, "invalid_seconds"),
    ({"name": "a", "expires_in": -1}, 422, "invalid_seconds"),
    ({"name": "a", "expires_in": 400_000_000}, 422, "invalid_seconds"),
    ({"name": "a", "expires_in": "1d"}, 422, "invalid_seconds"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
async def test_every_bad_body_is_a_clear_4xx_and_stores_nothing(
    client: Client, body: Any, status: int, code: str
) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = await client.post("/tokens", headers=AUTHORIZED, **kwargs)
    await assert_error(response, status, code)
    assert await stored(client) == {}


async def test_a_prefix_with_a_lone_surrogate_is_refused(client: Client) -> None:
    body = b'{"name": "a", "rules": [{"prefix": "\\ud800", "access": "read"}]}'
    response = await client.post("/tokens", data=body, headers=AUTHORIZED)
    await assert_error(response, 422, "invalid_string")
    assert await stored(client) == {}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"grace": -1}, "invalid_seconds"),
        ({"grace": 86401}, "invalid_seconds"),
        ({"grace": "1h"}, "invalid_seconds"),
        ({"ttl": 5}, "unknown_field"),
        ([], "invalid_body"),
    ],
)
async def test_a_bad_rotation_is_422_and_keeps_the_secret(
    client: Client, body: Any, code: str
) -> None:
    created = await create(client, BILLING)
    response = await client.post("/tokens/billing/rotate", json=body, headers=AUTHORIZED)
    await assert_error(response, 422, code)
    token = (await stored(client))["billing"]
    assert token.secret_hash == hash_secret(created["secret"]) and token.previous_hash is None


def _calls(name: str = "billing") -> list[tuple[str, str, Optional[dict[str, Any]]]]:
    """Every admin endpoint: (method, path, body)."""
    return [
        ("POST", "/tokens", BILLING),
        ("GET", "/tokens", None),
        ("POST", f"/tokens/{name}/rotate", {}),
        ("DELETE", f"/tokens/{name}", None),
    ]


async def test_no_token_is_401_everywhere(client: Client) -> None:
    await create(client, BILLING)
    for method, path, body in [*_calls(), ("GET", "/tokens/self", None)]:
        for headers in ({}, {"Authorization": "Bearer kv_wrong"}):
            response = await client.request(method, path, json=body, headers=headers)
            await assert_error(response, 401, "unauthorized")
    assert list(await stored(client)) == ["billing"]


async def test_a_server_without_kv_auth_token_refuses_tokens_with_403(
    make_client: MakeClient, store_kind: str
) -> None:
    open_server = await make_client(store=store_kind)
    for method, path, body in _calls():
        response = await open_server.request(method, path, json=body)
        message = await assert_error(response, 403, "forbidden")
        assert "KV_AUTH_TOKEN" in message
    assert open_server.app is not None
    assert await open_server.app[STORE_KEY].tokens() == []


async def test_a_token_that_is_not_admin_is_refused_with_403_and_nothing_changes(
    client: Client,
) -> None:
    created = await create(client, BILLING)
    # Even a token that may read and write every key is not an admin.
    everything = await create(
        client, {"name": "everything", "rules": [{"prefix": "", "access": "readwrite"}]}
    )
    headers = {"Authorization": f"Bearer {everything['secret']}"}
    for method, path, body in _calls():
        response = await client.request(method, path, json=body, headers=headers)
        assert "admin" in await assert_error(response, 403, "forbidden")
    tokens = await stored(client)
    assert sorted(tokens) == ["billing", "everything"]
    assert tokens["billing"].secret_hash == hash_secret(created["secret"])
    # An admin token of the store may: it creates, lists, rotates and revokes.
    ops = await create(client, {"name": "ops", "admin": True})
    admin = {"Authorization": f"Bearer {ops['secret']}"}
    await ok(await client.delete("/tokens/billing", headers=admin))  # for its POST /tokens
    for method, path, body in _calls():
        await ok(await client.request(method, path, json=body, headers=admin))
    assert sorted(await stored(client)) == ["everything", "ops"]


# --- audit and metrics ------------------------------------------------------------------------


async def test_audit_events_name_the_token_and_the_actor_never_a_secret(
    make_client: MakeClient, make_settings: MakeSettings, store_kind: str, clock: FakeClock
) -> None:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    client = await make_client(store=store_kind, clock=clock, auth_token=TOKEN, access_log=True)
    created = await create(client, BILLING)
    rotated = await ok(
        await client.post("/tokens/billing/rotate", json={"grace": 60}, headers=AUTHORIZED)
    )
    ops = await create(client, {"name": "ops", "admin": True})
    await ok(
        await client.delete("/tokens/billing", headers={"Authorization": f"Bearer {ops['secret']}"})
    )
    await client.delete("/tokens/billing", headers=AUTHORIZED)  # 404: no event

    output = stream.getvalue()
    audit = [
        line
        for line in map(json.loads, output.splitlines())
        if line.get("logger") == "kv.audit" or str(line.get("event")).startswith("token_")
    ]
    assert [(line["event"], line["token"], line["by"]) for line in audit] == [
        ("token_created", "billing", "KV_AUTH_TOKEN"),
        ("token_rotated", "billing", "KV_AUTH_TOKEN"),
        ("token_created", "ops", "KV_AUTH_TOKEN"),
        ("token_revoked", "billing", "ops"),
    ]
    for secret in (created["secret"], rotated["secret"], ops["secret"], TOKEN, "billing/", "cfg/"):
        assert secret not in output.replace('"token": "billing"', "")
        assert hash_secret(secret) not in output

    metrics = await (await client.get("/metrics", headers=AUTHORIZED)).text()
    for event, count in (("created", 2), ("rotated", 1), ("revoked", 1)):
        assert f'kv_tokens_total{{event="{event}"}} {count}.0' in metrics
