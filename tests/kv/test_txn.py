"""POST /txn over HTTP, in-process on every backend: the answer's shape, the branch taken,
one revision for the whole branch, every way a body is refused (with nothing stored), the
bearer token and the metrics."""

from __future__ import annotations

from typing import Any

import pytest

from mapmg_data_engineer_takehome.state import STORE_KEY

from .conftest import Client, FakeClock, MakeClient
from .test_api import assert_error


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_795_000_000.0)


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    return await make_client(store=store_kind, clock=clock, max_txn_ops=4, max_key_bytes=16)


async def txn(client: Client, body: Any) -> Any:
    response = await client.post("/txn", json=body)
    assert response.status == 200, await response.text()
    return await response.json()


async def revision(client: Client) -> int:
    assert client.app is not None
    return int(await client.app[STORE_KEY].revision())


async def changes(client: Client, since: int) -> list[dict[str, Any]]:
    response = await client.get("/changes", params={"since": str(since), "timeout": "0"})
    assert response.status == 200
    return list((await response.json())["events"])


# --- answers ----------------------------------------------------------------------------------


async def test_the_issue_example_answers_as_the_issue_says(client: Client) -> None:
    await client.post("/mset", json={"items": [{"key": f"tmp/{i}", "val": "x"} for i in range(3)]})
    await client.post("/set", json={"key": "cfg/old", "val": "o"})
    await client.post("/set", json={"key": "cfg/mode", "val": "blue"})
    ver = (await (await client.post("/set", json={"key": "cfg/ver", "val": "44"})).json())["key"]
    assert ver == "cfg/ver"
    start = await revision(client)
    answer = await txn(
        client,
        {
            "compare": [
                {"key": "cfg/mode", "value": "blue"},
                {"key": "cfg/ver", "version": start - 1, "cmp": ">"},
                {"key": "cfg/lock", "exists": False},
            ],
            "success": [
                {"op": "set", "key": "cfg/mode", "val": "green", "ttl": 60},
                {"op": "delete", "key": "cfg/old"},
                {"op": "delete", "prefix": "tmp/"},
                {"op": "get", "key": "cfg/ver"},
            ],
            "failure": [{"op": "get", "key": "cfg/mode"}],
        },
    )
    assert answer == {
        "succeeded": True,
        "revision": start + 1,
        "failed": None,
        "results": [
            {"key": "cfg/mode", "version": start + 1},
            {"key": "cfg/old", "deleted": True},
            {"prefix": "tmp/", "deleted": 3},
            {"key": "cfg/ver", "val": "44", "version": start},
        ],
    }
    events = await changes(client, start)
    assert [(event["revision"], event["type"], event["key"]) for event in events] == [
        (start + 1, "set", "cfg/mode"),
        (start + 1, "delete", "cfg/old"),
        (start + 1, "delete", "tmp/0"),
        (start + 1, "delete", "tmp/1"),
        (start + 1, "delete", "tmp/2"),
    ]
    got = await client.get("/get/cfg%2Fmode")
    assert got.headers["ETag"] == f'"{start + 1}"' and "KV-Expires-At" in got.headers


async def test_a_failing_compare_runs_failure_and_names_itself(client: Client) -> None:
    await client.post("/set", json={"key": "a", "val": "1"})
    start = await revision(client)
    answer = await txn(
        client,
        {
            "compare": [
                {"key": "a", "value": "1"},
                {"key": "a", "value": "2", "cmp": "!="},
                {"key": "b", "exists": True},
            ],
            "success": [{"op": "set", "key": "a", "val": "won"}],
            "failure": [{"op": "get", "key": "a"}, {"op": "get", "key": "b"}],
        },
    )
    assert answer == {
        "succeeded": False,
        "revision": start,  # the failure branch only read
        "failed": 2,
        "results": [
            {"key": "a", "val": "1", "version": start},
            {"key": "b", "val": None, "version": None},
        ],
    }
    assert await revision(client) == start


async def test_every_list_may_be_left_out(client: Client) -> None:
    start = await revision(client)
    assert await txn(client, {}) == {
        "succeeded": True,
        "revision": start,
        "failed": None,
        "results": [],
    }
    assert (await txn(client, {"compare": [{"key": "x", "version": 0}]}))["succeeded"] is True


async def test_an_expired_key_is_missing_to_a_transaction(client: Client, clock: FakeClock) -> None:
    await client.post("/set", json={"key": "k", "val": "v", "ttl": 1})
    clock.advance(2)
    answer = await txn(
        client,
        {
            "compare": [{"key": "k", "exists": False}, {"key": "k", "version": 0}],
            "success": [{"op": "get", "key": "k"}, {"op": "delete", "key": "k"}],
        },
    )
    assert answer["results"] == [
        {"key": "k", "val": None, "version": None},
        {"key": "k", "deleted": False},
    ]


# --- refusals ---------------------------------------------------------------------------------


async def assert_refused(client: Client, body: Any, status: int, code: str) -> str:
    """``body`` is refused with ``status`` and ``code``, and the store's revision did not
    move; returns the message."""
    before = await revision(client)
    sent = body if isinstance(body, bytes) else None
    response = await client.post("/txn", data=sent, json=None if sent is not None else body)
    message = await assert_error(response, status, code)
    assert await revision(client) == before
    return message


SET_A = {"op": "set", "key": "a", "val": "1"}


@pytest.mark.parametrize(
    ("body", "status", "code", "said"),
    [
        (b'{"success": [', 400, "invalid_json", "not valid JSON"),
        (b"[]", 422, "invalid_body", "'compare', 'success' and 'failure'"),
        ({"succes": [SET_A]}, 422, "unknown_field", "'succes'"),
        ({"compare": {}}, 422, "invalid_type", "Field 'compare' must be an array"),
        # A lease with a ttl; tests/kv/test_leases.py has the rest of a set's lease.
        ({"success": [{**SET_A, "ttl": 5, "lease": "1"}]}, 422, "invalid_request", "not both"),
        ({"success": [{"key": "a"}]}, 422, "missing_field", "success[0].op: is required"),
        ({"success": [{"op": "put", "key": "a"}]}, 422, "invalid_type", "not 'put'"),
        ({"failure": [{"op": "set", "key": "a"}]}, 422, "missing_field", "failure[0].val:"),
        ({"success": [5]}, 422, "invalid_type", "success[0]: must be an object"),
        ({"success": [{**SET_A, "ttl": 0}]}, 422, "invalid_ttl", "success[0].ttl:"),
        ({"success": [{**SET_A, "key": ""}]}, 422, "empty_key", "success[0].key:"),
        ({"success": [{**SET_A, "val": 1}]}, 422, "invalid_type", "success[0].val:"),
        ({"compare": [{"key": "a"}]}, 422, "invalid_request", "exactly one of"),
        ({"compare": [{"key": "a", "version": 1, "exists": True}]}, 422, "invalid_request", ""),
        ({"compare": [{"key": "a", "value": "1", "cmp": "<"}]}, 422, "invalid_request", "= or !="),
        ({"compare": [{"key": "a", "exists": True, "cmp": "!="}]}, 422, "invalid_request", ""),
        ({"compare": [{"key": "a", "version": 1, "cmp": "<="}]}, 422, "invalid_type", "cmp:"),
        ({"compare": [{"key": "a", "version": -1}]}, 422, "invalid_type", "from 0"),
        ({"compare": [{"key": "a", "version": "1"}]}, 422, "invalid_type", "an integer"),
        ({"compare": [{"key": "a", "exists": 1}]}, 422, "invalid_type", "true or false"),
        ({"success": [{"op": "delete"}]}, 422, "invalid_request", "exactly one of 'key'"),
        ({"success": [{"op": "delete", "key": "a", "prefix": "a"}]}, 422, "invalid_request", ""),
        # Limits: KV_MAX_TXN_OPS is 4 here, KV_MAX_KEY_BYTES 16.
        ({"compare": [{"key": "a", "version": 0}] * 5}, 422, "invalid_batch", "at most 4"),
        ({"success": [{"op": "get", "key": "a"}] * 5}, 422, "invalid_batch", "'success'"),
        ({"failure": [{"op": "get", "key": "a"}] * 5}, 422, "invalid_batch", "'failure'"),
        ({"success": [{**SET_A, "key": "k" * 17}]}, 422, "key_too_long", "success[0].key:"),
        ({"compare": [{"key": "k" * 17, "exists": True}]}, 422, "key_too_long", "compare[0]"),
        ({"success": [{"op": "delete", "prefix": "p" * 17}]}, 422, "key_too_long", "prefix:"),
        ({"success": [{**SET_A, "key": "a\x00"}]}, 422, "invalid_string", "NUL"),
        ({"success": [{**SET_A, "val": "\x00"}]}, 422, "invalid_string", "success[0].val:"),
        ({"compare": [{"key": "a", "value": "\x00"}]}, 422, "invalid_string", "compare[0].value"),
        ({"success": [{"op": "delete", "prefix": "\x00"}]}, 422, "invalid_string", "prefix:"),
        (b'{"success": [{"op": "get", "key": "\\ud800"}]}', 422, "invalid_string", "surrogate"),
        # A key written twice in one branch, however it is written.
        ({"success": [SET_A, SET_A]}, 422, "invalid_request", '"a" is written twice'),
        ({"success": [SET_A, {"op": "delete", "key": "a"}]}, 422, "invalid_request", '"a"'),
        (
            {"failure": [{**SET_A, "key": "p/1"}, {"op": "delete", "prefix": "p/"}]},
            422,
            "invalid_request",
            'the prefix "p/" covers it; a transaction',
        ),
        (
            {"success": [{"op": "delete", "prefix": "p"}, {"op": "delete", "prefix": "p/x"}]},
            422,
            "invalid_request",
            '"p" and "p/x"',
        ),
        (
            {"success": [{"op": "delete", "prefix": ""}, {"op": "delete", "key": "zz"}]},
            422,
            "invalid_request",
            '"zz"',
        ),
        (
            {"success": [{"op": "delete", "prefix": "q"}, {"op": "delete", "prefix": "q"}]},
            422,
            "invalid_request",
            '"q" and "q"',
        ),
    ],
)
async def test_a_bad_body_is_refused_and_stores_nothing(
    client: Client, body: Any, status: int, code: str, said: str
) -> None:
    await client.post("/mset", json={"items": [{"key": "p/1", "val": "x"}, SET_A]})
    message = await assert_refused(client, body, status, code)
    assert said in message


async def test_what_is_not_written_twice_is_accepted(client: Client) -> None:
    """Reads of written keys, a key beside a prefix, and prefixes that do not nest."""
    answer = await txn(
        client,
        {
            "success": [
                {"op": "set", "key": "p", "val": "1"},
                {"op": "get", "key": "p"},
                {"op": "delete", "prefix": "p/"},
                {"op": "delete", "prefix": "q/"},
            ],
            "failure": [SET_A],  # each branch is judged on its own
        },
    )
    assert answer["succeeded"] is True and len(answer["results"]) == 4


async def test_a_value_over_its_limit_is_413(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, max_value_bytes=10)
    message = await assert_refused(
        client, {"success": [{**SET_A, "val": "v" * 11}]}, 413, "value_too_large"
    )
    assert message.startswith("success[0].val:")
    await assert_refused(client, {"compare": [{"key": "a", "value": "v" * 11}]}, 413,
                         "value_too_large")  # fmt: skip


async def test_a_body_over_the_limit_is_413(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, max_body_bytes=100)
    await assert_refused(client, {"success": [{**SET_A, "val": "v" * 100}]}, 413, "body_too_large")


# --- the token and the metrics ----------------------------------------------------------------


async def test_the_bearer_token_is_needed(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, auth_token="s3cret-token")
    before = await revision(client)
    response = await client.post("/txn", json={"success": [SET_A]})
    await assert_error(response, 401, "unauthorized")
    assert await revision(client) == before
    allowed = await client.post(
        "/txn", json={"success": [SET_A]}, headers={"Authorization": "Bearer s3cret-token"}
    )
    assert allowed.status == 200
    assert await revision(client) == before + 1


async def test_transactions_are_counted_by_outcome_without_keys(client: Client) -> None:
    await txn(client, {"compare": [{"key": "secret-key", "exists": True}]})
    await txn(client, {"compare": [{"key": "secret-key", "exists": False}]})
    await txn(client, {"success": [{"op": "set", "key": "secret-key", "val": "v"}]})
    text = await (await client.get("/metrics")).text()
    assert 'kv_transactions_total{outcome="succeeded"} 2.0' in text
    assert 'kv_transactions_total{outcome="failed"} 1.0' in text
    assert "secret-key" not in text
