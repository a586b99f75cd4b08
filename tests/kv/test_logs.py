"""Logs: JSON lines with request ids, 5xx with tracebacks, and never a value (nor a key)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from mapmg_data_engineer_takehome.logs import configure_logging
from mapmg_data_engineer_takehome.state import STORE_KEY

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
