"""GET /export and POST /import over HTTP, in-process on every backend: the format, the
snapshot's revision, all-or-nothing imports, replace, limits and expiry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import orjson
import pytest

from mapmg_data_engineer_takehome.rules import parse_rfc3339, rfc3339

from .conftest import Client, FakeClock, MakeClient
from .postgres_support import PostgresCluster
from .test_api import assert_error
from .test_data_api import set_key, stored

NOW = 1_795_000_000.0  # 2026-11-18T11:06:40Z
AN_HOUR_ON = "2026-11-18T12:06:40.000Z"
AN_HOUR_AGO = "2026-11-18T10:06:40.000Z"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def client(make_client: MakeClient, store_kind: str, clock: FakeClock) -> Client:
    return await make_client(store=store_kind, clock=clock, purge_interval=3600)


def line(key: str, val: str, expires_at: Optional[str] = None) -> bytes:
    return orjson.dumps({"key": key, "val": val, "expires_at": expires_at}) + b"\n"


async def assert_refused(response: Any, status: int, code: str) -> dict[str, Any]:
    """An error answer with this status and code (and, for a line, where it is)."""
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert body["error"] == code and body["message"], body
    assert set(body) <= {"error", "message", "line", "field", "compact_revision"}, body
    return body


async def export(client: Client, **params: str) -> tuple[list[dict[str, Any]], int, bytes]:
    """The export's lines, its KV-Revision, and its bytes."""
    response = await client.get("/export", params=params)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/x-ndjson"
    body = await response.read()
    lines = [orjson.loads(text) for text in body.split(b"\n") if text]
    return lines, int(response.headers["KV-Revision"]), body


async def import_(client: Client, body: bytes, **params: str) -> Any:
    return await client.post("/import", data=body, params=params)


async def imported(client: Client, body: bytes, **params: str) -> dict[str, int]:
    response = await import_(client, body, **params)
    assert response.status == 200, await response.text()
    answer: dict[str, int] = await response.json()
    return answer


async def everything(client: Client) -> dict[str, str]:
    lines, _, _ = await export(client)
    return {item["key"]: item["val"] for item in lines}


# --- export ------------------------------------------------------------------------------------


async def test_an_export_is_every_live_key_in_order_with_its_expiry(
    client: Client, clock: FakeClock
) -> None:
    await set_key(client, "b", "2", ttl=3600)
    await set_key(client, "a", "1")
    await set_key(client, "gone", "x", ttl=1)
    response = await client.post("/mset", json={"items": [{"key": "é", "val": "3"}]})
    clock.advance(2)
    lines, revision, body = await export(client)
    assert lines == [
        {"key": "a", "val": "1", "expires_at": None},
        {"key": "b", "val": "2", "expires_at": AN_HOUR_ON},
        {"key": "é", "val": "3", "expires_at": None},
    ]
    assert revision == (await response.json())["version"]
    assert body.endswith(b"\n") and body.count(b"\n") == 3


async def test_an_export_of_a_prefix_and_of_an_empty_store(client: Client) -> None:
    listing = await client.get("/keys")
    assert await export(client) == ([], int(listing.headers["KV-Revision"]), b"")
    for key in ("a", "a/1", "a/2", "ab", "b"):
        await set_key(client, key, key)
    lines, _, _ = await export(client, prefix="a/")
    assert [item["key"] for item in lines] == ["a/1", "a/2"]


async def test_an_export_is_a_snapshot_whatever_is_written_while_it_is_read(
    client: Client,
) -> None:
    """Writes made between the export's first batch and its end are not in it."""
    await client.post(
        "/mset", json={"items": [{"key": f"k{n:05}", "val": "old"} for n in range(5000)]}
    )
    response = await client.get("/export")
    revision = int(response.headers["KV-Revision"])
    first = await response.content.readline()  # the export has begun: its snapshot is taken
    assert orjson.loads(first)["key"] == "k00000"
    await client.post(
        "/mset", json={"items": [{"key": f"k{n:05}", "val": "new"} for n in range(5000)]}
    )
    await set_key(client, "k99999", "added")
    rest = [orjson.loads(text) for text in (await response.read()).split(b"\n") if text]
    assert len(rest) == 4999 and {item["val"] for item in rest} == {"old"}
    assert int((await client.get("/export")).headers["KV-Revision"]) == revision + 2


async def test_a_value_with_any_characters_exports_as_json(client: Client) -> None:
    awkward = 'line\nbreak "quoted" \\ tab\t \x01 🔑 \u2028'
    await set_key(client, "a/b?c#d %20", awkward)
    lines, _, _ = await export(client)
    assert lines == [{"key": "a/b?c#d %20", "val": awkward, "expires_at": None}]


# --- import ------------------------------------------------------------------------------------


async def another_client(
    make_client: MakeClient, store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Client:
    """A client of another store of the same kind."""
    where: dict[str, Any] = {"data_path": tmp_path / "other" / "kv.sqlite3"}
    if store_kind == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        where = {"postgres_url": cluster.url(search_path=cluster.create_schema())}
    return await make_client(store=store_kind, clock=FakeClock(NOW), purge_interval=3600, **where)


async def test_an_export_imports_into_an_empty_store_as_it_was(
    make_client: MakeClient,
    client: Client,
    store_kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    await set_key(client, "a", "1")
    await set_key(client, "b", "2", ttl=3600)
    await set_key(client, "a/b?c#d\n🔑", "odd")
    _, _, body = await export(client)
    other = await another_client(make_client, store_kind, tmp_path, request)
    answer = await imported(other, body)
    assert answer == {"imported": 3, "skipped": 0, "revision": answer["revision"]}
    assert (await export(other))[2] == body
    got = await other.get("/get/b")
    assert got.headers["ETag"] == f'"{answer["revision"]}"'
    assert got.headers["KV-Expires-At"] == AN_HOUR_ON


async def test_the_last_line_for_a_key_wins_and_all_take_one_revision(client: Client) -> None:
    before = await set_key(client, "kept", "mine")
    body = line("a", "1") + line("b", "2") + line("a", "3")
    answer = await imported(client, body)
    assert answer == {
        "imported": 3,
        "skipped": 0,
        "revision": int(before.headers["ETag"][1:-1]) + 1,
    }
    assert await everything(client) == {"a": "3", "b": "2", "kept": "mine"}
    for key in ("a", "b"):
        assert (await client.get(f"/get/{key}")).headers["ETag"] == f'"{answer["revision"]}"'


async def test_expired_lines_are_skipped_and_counted(client: Client) -> None:
    body = line("old", "x", AN_HOUR_AGO) + line("new", "y", AN_HOUR_ON) + line("plain", "z")
    assert (await imported(client, body))["skipped"] == 1
    assert await everything(client) == {"new": "y", "plain": "z"}


async def test_expiry_in_any_rfc3339_form_and_a_last_line_without_newline(
    client: Client,
) -> None:
    body = (
        line("offset", "1", "2026-11-18T13:06:40.000+01:00")
        + b"\n"  # a blank line is nothing
        + line("no-fraction", "2", "2026-11-18T12:06:40Z")
        + line("nanos", "3", "2026-11-18T12:06:40.123456789z").rstrip(b"\n")
    )
    assert (await imported(client, body))["imported"] == 3
    lines, _, _ = await export(client)
    assert {item["key"]: item["expires_at"] for item in lines} == {
        "offset": "2026-11-18T12:06:40.000Z",
        "no-fraction": "2026-11-18T12:06:40.000Z",
        "nanos": "2026-11-18T12:06:40.123Z",
    }


def test_rfc3339_parsing() -> None:
    assert parse_rfc3339("1970-01-01T00:00:00Z") == 0
    assert parse_rfc3339("1970-01-01T01:00:00.5+01:00") == 500
    assert parse_rfc3339("1969-12-31T23:00:00-01:00") == 0
    for wrong in ("2026-02-30T00:00:00Z", "2026-11-18 12:00:00Z", "2026-11-18T12:00:00", "soon"):
        assert parse_rfc3339(wrong) is None


def test_rfc3339_writes_what_it_reads_with_four_digits_of_year() -> None:
    for text in (
        "1970-01-01T00:00:00.000Z",
        "2026-11-18T12:06:40.123Z",
        "9999-12-31T23:59:59.999Z",
        "0999-12-31T23:59:59.999Z",  # RFC 3339's year has four digits, also before 1000
        "0001-01-01T00:00:00.000Z",
    ):
        milliseconds = parse_rfc3339(text)
        assert milliseconds is not None and rfc3339(milliseconds) == text


async def test_an_empty_import_changes_nothing(client: Client) -> None:
    written = await set_key(client, "a", "1")
    answer = await imported(client, b"")
    assert answer == {"imported": 0, "skipped": 0, "revision": int(written.headers["ETag"][1:-1])}
    assert await everything(client) == {"a": "1"}


BAD_LINES = [
    (b"{not json\n", None, "is not JSON"),
    (b"[1, 2]\n", None, "is not a JSON object"),
    (b'{"key": "k"}\n', "val", "is missing"),
    (b'{"val": "v"}\n', "key", "is missing"),
    (b'{"key": "k", "val": "v", "ttl": 5}\n', "ttl", "is not a field"),
    (b'{"key": 5, "val": "v"}\n', "key", "must be a string"),
    (b'{"key": "k", "val": null}\n', "val", "must be a string"),
    (b'{"key": "", "val": "v"}\n', "key", "is empty"),
    (b'{"key": "k\\u0000", "val": "v"}\n', "key", "NUL"),
    (b'{"key": "k", "val": "\\ud800"}\n', "val", "surrogate"),
    (b'{"key": "k", "val": "v", "expires_at": 5}\n', "expires_at", "RFC 3339"),
    (b'{"key": "k", "val": "v", "expires_at": "tomorrow"}\n', "expires_at", "RFC 3339"),
    (b'{"key": "k", "val": "v", "expires_at": "2040-01-01T00:00:00Z"}\n', "expires_at", "ten"),
    (b'{"key": "' + b"k" * 300 + b'", "val": "v"}\n', "key", "longer than 256"),
    (b'{"key": "k", "val": "' + b"v" * 1001 + b'"}\n', "val", "longer than 1000"),
    (b"\xff\xfe\n", None, "is not JSON"),
]


@pytest.mark.parametrize(("bad", "field", "problem"), BAD_LINES)
async def test_a_bad_line_after_good_ones_stores_nothing(
    make_client: MakeClient,
    store_kind: str,
    clock: FakeClock,
    bad: bytes,
    field: Optional[str],
    problem: str,
) -> None:
    client = await make_client(
        store=store_kind, clock=clock, max_key_bytes=256, max_value_bytes=1000
    )
    await set_key(client, "before", "1")
    body = b"".join(line(f"good/{n:05}", "v") for n in range(2500)) + bad + line("after", "2")
    answer = await assert_refused(await import_(client, body), 422, "invalid_line")
    assert answer["line"] == 2501 and answer.get("field") == field, answer
    assert answer["message"].startswith("Line 2501") and problem in answer["message"], answer
    assert await everything(client) == {"before": "1"}


async def test_a_key_outside_the_prefix_is_a_bad_line(client: Client) -> None:
    response = await import_(client, line("a/1", "v") + line("b/1", "v"), prefix="a/")
    assert (await assert_refused(response, 422, "invalid_line"))["line"] == 2
    assert await everything(client) == {}


async def test_replace_leaves_exactly_the_files_keys_under_the_prefix(
    client: Client, clock: FakeClock
) -> None:
    for key in ("a/keep", "a/drop", "ab", "b/other"):
        await set_key(client, key, "old")
    await set_key(client, "a/expired", "old", ttl=1)
    clock.advance(2)
    body = line("a/keep", "new") + line("a/added", "new") + line("a/skipped", "x", AN_HOUR_AGO)
    answer = await imported(client, body, mode="replace", prefix="a/")
    assert (answer["imported"], answer["skipped"]) == (2, 1)
    assert await everything(client) == {
        "a/keep": "new",
        "a/added": "new",
        "ab": "old",
        "b/other": "old",
    }


async def test_replace_without_a_prefix_replaces_the_whole_store(client: Client) -> None:
    for key in ("a", "b", "c"):
        await set_key(client, key, "old")
    await imported(client, line("b", "new"), mode="replace")
    assert await everything(client) == {"b": "new"}
    empty = await imported(client, b"", mode="replace")
    assert empty["imported"] == 0 and await everything(client) == {}
    assert (await client.get("/health")).status == 200


async def test_merge_leaves_the_other_keys(client: Client) -> None:
    await set_key(client, "a", "old")
    await set_key(client, "b", "old")
    await imported(client, line("b", "new"), mode="merge")
    assert await everything(client) == {"a": "old", "b": "new"}


async def test_an_unknown_mode_or_parameter_is_422(client: Client) -> None:
    await assert_error(await import_(client, b"", mode="upsert"), 422, "invalid_parameter")
    await assert_error(await client.get("/export", params={"limit": "5"}), 422, "invalid_parameter")


async def test_a_body_past_the_import_limit_is_413_and_stores_nothing(
    make_client: MakeClient, store_kind: str
) -> None:
    client = await make_client(store=store_kind, max_import_bytes=10_000)
    body = b"".join(line(f"k{n:04}", "v" * 20) for n in range(400))
    assert len(body) > 10_000
    await assert_error(await import_(client, body), 413, "body_too_large")

    async def chunked() -> Any:  # no Content-Length: found out while reading
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = await client.post("/import", data=chunked())
    await assert_error(response, 413, "body_too_large")
    assert await everything(client) == {}
    # Its own limit, not KV_MAX_BODY_BYTES: a body larger than that is fine below it.
    small = await make_client(store=store_kind, max_body_bytes=1000)
    assert (await imported(small, body[: body.index(b"\n", 5000) + 1]))["imported"] == 80


async def test_a_line_longer_than_any_valid_one_is_refused_before_it_ends(
    make_client: MakeClient, store_kind: str
) -> None:
    client = await make_client(store=store_kind, max_key_bytes=10, max_value_bytes=100)

    async def endless() -> Any:
        yield line("ok", "v")
        yield b'{"key": "k", "val": "'
        for _ in range(1000):
            yield b"v" * 1000

    response = await client.post("/import", data=endless())
    assert (await assert_refused(response, 422, "invalid_line"))["line"] == 2
    assert await everything(client) == {}


async def test_writes_go_on_while_an_import_arrives(client: Client) -> None:
    """The import's rows are staged as they come: other writes are not held back, and the
    import's own keys win over writes made before it ends."""
    written = asyncio.Event()

    async def slowly() -> Any:
        for n in range(20):
            yield line(f"bulk/{n}", "imported")
            await asyncio.sleep(0.01)
            if n == 10:
                await written.wait()

    importing = asyncio.ensure_future(client.post("/import", data=slowly()))
    await asyncio.sleep(0.05)
    assert (await set_key(client, "bulk/15", "written meanwhile")).status == 200
    assert (await set_key(client, "other", "written meanwhile")).status == 200
    written.set()
    response = await importing
    assert response.status == 200
    assert await stored(client, "bulk/15") == "imported"
    assert await stored(client, "other") == "written meanwhile"


async def test_an_import_compacts_the_feed_for_watchers_from_before_it(client: Client) -> None:
    await set_key(client, "a", "1")
    before = await set_key(client, "b", "1")
    since = int(before.headers["ETag"][1:-1]) - 1
    answer = await imported(client, line("c", "1"))
    gone = await client.get("/changes", params={"since": str(since), "timeout": "0"})
    refused = await assert_refused(gone, 410, "compacted")
    assert refused["compact_revision"] == answer["revision"]
    after = await client.get("/changes", params={"since": str(answer["revision"]), "timeout": "0"})
    assert after.status == 200 and (await after.json())["events"] == []


async def test_the_routes_need_the_token(make_client: MakeClient) -> None:
    client = await make_client(auth_token="secret-token")
    await assert_error(await client.get("/export"), 401, "unauthorized")
    await assert_error(await import_(client, line("a", "1")), 401, "unauthorized")
    headers = {"Authorization": "Bearer secret-token"}
    response = await client.post("/import", data=line("a", "1"), headers=headers)
    assert response.status == 200
    exported = await client.get("/export", headers=headers)
    assert await exported.read() == line("a", "1")
