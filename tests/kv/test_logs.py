"""Logs: JSON lines with request ids, 5xx with tracebacks, and never a value, a key or the
token, even when a bug raises with all three in its frames and in its message."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from mapmg_data_engineer_takehome.errors import WITHHELD
from mapmg_data_engineer_takehome.logs import configure_logging
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.store import MemoryStore, StoreUnavailable
from mapmg_data_engineer_takehome.upkeep import keep_up
from mapmg_data_engineer_takehome.workers import log_loop_error

from .conftest import MakeClient, MakeSettings


@pytest.fixture
def log_stream(make_settings: MakeSettings) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(make_settings(log_format="json"), stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_access_log_has_request_id_route_and_no_key_or_value(
    make_client: MakeClient, log_stream: io.StringIO
) -> None:
    client = await make_client(access_log=True)
    secret_key, secret_val = "customer-4711", "hunter2-password"
    await client.post("/set", json={"key": secret_key, "val": secret_val})
    await client.get(f"/get/{secret_key}", headers={"X-Request-ID": "trace-me"})
    output = log_stream.getvalue()
    assert secret_key not in output and secret_val not in output
    access = [line for line in lines(log_stream) if line["event"] == "request"]
    assert len(access) == 2
    get_line = access[1]
    assert get_line["request_id"] == "trace-me"
    assert get_line["route"] == "/get/{key}"
    assert get_line["status"] == 200
    assert get_line["method"] == "GET"
    assert get_line["duration_ms"] >= 0


async def test_access_log_is_off_by_default(
    make_client: MakeClient, log_stream: io.StringIO
) -> None:
    client = await make_client()
    await client.get("/get/anything")
    assert not [line for line in lines(log_stream) if line["event"] == "request"]


async def test_a_5xx_is_logged_with_its_traceback_and_request_id(
    make_client: MakeClient, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()

    async def explode(key: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(client.app[STORE_KEY], "get", explode)
    response = await client.get("/get/k", headers={"X-Request-ID": "failing-one"})
    assert response.status == 500
    errors = [line for line in lines(log_stream) if line["event"] == "unhandled_error"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "failing-one"
    assert errors[0]["level"] == "error"
    assert "RuntimeError" in json.dumps(errors[0]["exception"])


async def test_startup_logs_the_seed_summary(
    make_client: MakeClient, log_stream: io.StringIO, tmp_path: Any
) -> None:
    from .conftest import write_input_db

    seed = write_input_db(tmp_path / "input.db", [("a", "1"), ("b", None), ("a", "2")])
    await make_client(input_db=seed)
    summary = next(line for line in lines(log_stream) if line["event"] == "seed_applied")
    assert summary["rows_read"] == 3
    assert summary["rows_applied"] == 2
    assert summary["skipped"]["null_val"] == 1
    assert "seconds" in summary


TOKEN = "SuperSecretTok3n"
KEY = "patient:42-distinctive"
VAL = "value-of-a-distinctive-kind"


def fail_with_the_data(key: str) -> None:
    raise RuntimeError(f"a bug that names {key}")


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_a_bug_logs_no_token_key_or_value(
    make_client: MakeClient,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    log_format: str,
) -> None:
    """Every frame of these tracebacks holds the token, the key or the value as a local, and
    their messages quote them too; the logs must still hold none of them."""
    stream = io.StringIO()
    configure_logging(make_settings(log_format=log_format), stream)
    client = await make_client(auth_token=TOKEN)
    store = client.app[STORE_KEY]

    async def broken_get(key: str) -> None:
        fail_with_the_data(key)

    async def broken_set(key: str, val: str, *conditions: object) -> None:
        raise KeyError(val)

    monkeypatch.setattr(store, "get", broken_get)
    monkeypatch.setattr(store, "set", broken_set)
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get(f"/get/{KEY}", headers=authorized)).status == 500
    response = await client.post("/set", json={"key": KEY, "val": VAL}, headers=authorized)
    assert response.status == 500
    # A callback failing on the event loop, with the key among its arguments.
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_error)
    try:
        loop.call_soon(fail_with_the_data, KEY)
        await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)

    output = stream.getvalue()
    for secret in (TOKEN, KEY, VAL):
        assert secret not in output
    # What an operator needs is kept: types, where they were raised, and the sentence.
    for needed in ("RuntimeError", "KeyError", "test_logs.py", "fail_with_the_data", WITHHELD):
        assert needed in output
    assert "event_loop_error" in output and "Exception in callback" in output


async def test_safe_messages_are_kept_in_tracebacks(
    make_client: MakeClient, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()

    async def broken(key: str) -> None:
        try:
            raise OSError(28, "No space left on device", "/data/kv.sqlite3")
        except OSError as error:
            raise StoreUnavailable("/data/kv.sqlite3: database or disk is full") from error

    monkeypatch.setattr(client.app[STORE_KEY], "get", broken)
    assert (await client.get("/get/k")).status == 503
    monkeypatch.setattr(client.app[STORE_KEY], "get", lambda key: 1 / 0)
    assert (await client.get("/get/k")).status == 500
    [unavailable] = [line for line in lines(log_stream) if line["event"] == "store_unavailable"]
    assert unavailable["reason"] == "/data/kv.sqlite3: database or disk is full"
    [bug] = [line for line in lines(log_stream) if line["event"] == "unhandled_error"]
    [link] = bug["exception"]
    assert link["exc_type"] == "ZeroDivisionError" and link["exc_value"] == WITHHELD
    assert {"filename", "lineno", "name"} == set(link["frames"][-1])
    assert link["frames"][-1]["name"] == "<lambda>"


async def test_a_bug_in_the_purge_is_logged_and_the_purge_goes_on(
    make_settings: MakeSettings, log_stream: io.StringIO
) -> None:
    """The background purge meets an exception that is no store failure (a bug): it is logged
    with its traceback, and the next sweep runs as before, rather than the task ending with an
    exception nobody retrieves."""
    sweeps = 0
    purged = asyncio.Event()

    class BuggyOnce(MemoryStore):
        async def purge_expired(self, limit: int) -> int:
            nonlocal sweeps
            sweeps += 1
            if sweeps == 1:
                raise RuntimeError("a bug in the purge")
            purged.set()
            return 0

    task = asyncio.ensure_future(
        keep_up(BuggyOnce(), make_settings(purge_interval=0.01, log_format="json"))
    )
    try:
        await asyncio.wait_for(purged.wait(), 5)
    finally:
        task.cancel()
    failed = [line for line in lines(log_stream) if line["event"] == "upkeep_failed"]
    assert len(failed) == 1 and failed[0]["exception"][0]["exc_type"] == "RuntimeError"
