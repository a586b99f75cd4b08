"""Prometheus metrics at /metrics: what each counts, that no key or value is ever a label,
that recording in bulk adds up like prometheus-client's own, and that the token guards them."""

from __future__ import annotations

import asyncio
import re
from typing import Optional

import pytest

from mapmg_data_engineer_takehome.metrics import DURATION_BUCKETS, add_observations
from mapmg_data_engineer_takehome.state import STORE_KEY
from mapmg_data_engineer_takehome.store import StoreUnavailable

from .conftest import Client, MakeClient, write_input_db
from .test_api import assert_error

KEY, VAL = "patient:42-in-a-label?", "a value never in metrics"


async def scrape(client: Client, **headers: str) -> str:
    answer = await client.get("/metrics", headers=headers)
    assert answer.status == 200
    assert answer.content_type == "text/plain"
    return await answer.text()


def sample(text: str, name: str, **labels: str) -> Optional[float]:
    """The value of one sample, or None."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


async def test_requests_are_counted_and_timed_by_route_never_by_key(client: Client) -> None:
    for _ in range(3):
        assert (await client.post("/set", json={"key": KEY, "val": VAL})).status == 200
    await client.get("/get/" + "k-missing")
    text = await scrape(client)
    assert sample(text, "kv_requests_total", route="/set", method="POST", status="200") == 3
    assert sample(text, "kv_requests_total", route="/get/{key}", method="GET", status="404") == 1
    assert sample(text, "kv_request_duration_seconds_count", route="/set") == 3
    assert sample(text, "kv_request_duration_seconds_bucket", route="/set", le="+Inf") == 3
    assert "patient" not in text and VAL not in text and "k-missing" not in text


async def test_the_key_count_and_commits(client: Client) -> None:
    await asyncio.gather(
        *(client.post("/set", json={"key": f"k{n}", "val": "v"}) for n in range(20))
    )
    await client.delete("/delete/k0")
    text = await scrape(client)
    assert sample(text, "kv_keys") == 19
    assert sample(text, "kv_commit_group_writes_sum") == 21
    commits = sample(text, "kv_commit_group_writes_count")
    assert commits is not None and 1 <= commits <= 21


async def test_store_errors_by_kind(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(*args: object) -> None:
        raise StoreUnavailable("database or disk is full")

    monkeypatch.setattr(client.app[STORE_KEY], "set", full)
    await assert_error(
        await client.post("/set", json={"key": "k", "val": "v"}), 503, "store_unavailable"
    )
    text = await scrape(client)
    assert sample(text, "kv_store_errors_total", kind="unavailable") == 1


async def test_seed_rows(make_client: MakeClient, store_kind: str, tmp_path: object) -> None:
    from pathlib import Path

    seed = write_input_db(Path(str(tmp_path)) / "input.db", [("a", "1"), ("b", None), ("a", "2")])
    client = await make_client(store=store_kind, input_db=seed)
    text = await scrape(client)
    assert sample(text, "kv_seed_rows_total", outcome="read") == 3
    assert sample(text, "kv_seed_rows_total", outcome="applied") == 2
    assert sample(text, "kv_seed_rows_total", outcome="skipped") == 1


async def test_bulk_rows_and_their_routes(client: Client) -> None:
    lines = [
        b'{"key": "a", "val": "1"}',
        b'{"key": "b", "val": "2", "expires_at": "2000-01-01T00:00:00Z"}',
        b'{"key": "c", "val": "3", "expires_at": null}',
    ]
    assert (await client.post("/import", data=b"\n".join(lines))).status == 200
    assert (await client.post("/import", data=b"not json")).status == 422
    exported = await client.get("/export")
    assert exported.status == 200 and await exported.read()
    # A stream is counted once its handler has returned, which may be a moment after its
    # last byte (the PostgreSQL store closes the export's connection first).
    for _ in range(100):
        text = await scrape(client)
        if sample(text, "kv_requests_total", route="/export", method="GET", status="200"):
            break
        await asyncio.sleep(0.02)
    assert sample(text, "kv_bulk_rows_total", outcome="imported") == 2  # the failed one: none
    assert sample(text, "kv_bulk_rows_total", outcome="skipped") == 1
    assert sample(text, "kv_bulk_rows_total", outcome="exported") == 2
    assert sample(text, "kv_requests_total", route="/import", method="POST", status="422") == 1
    assert sample(text, "kv_requests_total", route="/export", method="GET", status="200") == 1


async def test_purged_keys(make_client: MakeClient, store_kind: str) -> None:
    client = await make_client(store=store_kind, purge_interval=0.05)
    items = [{"key": f"k{n}", "val": "v", "ttl": 0.05} for n in range(30)]
    assert (await client.post("/mset", json={"items": items})).status == 200
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sample(await scrape(client), "kv_expired_keys_purged_total") == 30:
            break
    text = await scrape(client)
    assert sample(text, "kv_expired_keys_purged_total") == 30
    assert sample(text, "kv_keys") == 0


async def test_process_metrics_are_there(client: Client) -> None:
    assert "process_resident_memory_bytes" in await scrape(client)


async def test_metrics_need_the_token_when_one_is_set(make_client: MakeClient) -> None:
    client = await make_client(auth_token="tok3n")
    await assert_error(await client.get("/metrics"), 401, "unauthorized")
    assert "kv_requests_total" in await scrape(client, Authorization="Bearer tok3n")


async def test_metrics_can_be_off(make_client: MakeClient) -> None:
    client = await make_client(metrics=False)
    await assert_error(await client.get("/metrics"), 404, "not_found")
    assert (await client.post("/set", json={"key": "k", "val": "v"})).status == 200


def test_bulk_recording_adds_up_like_observe() -> None:
    """add_observations uses two private attributes of prometheus-client's histograms; this
    fails if they stop meaning what observe means."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    one_by_one = Histogram("one", "", buckets=DURATION_BUCKETS, registry=registry)
    in_bulk = Histogram("bulk", "", buckets=DURATION_BUCKETS, registry=registry)
    values = [0.00005, 0.0003, 0.0003, 0.002, 0.7, 9.0]
    for value in values:
        one_by_one.observe(value)
    bounds = (*DURATION_BUCKETS, float("inf"))
    counts = [0.0] * len(bounds)
    for value in values:
        counts[next(i for i, bound in enumerate(bounds) if value <= bound)] += 1
    add_observations(in_bulk, counts, sum(values))
    text = generate_latest(registry).decode()
    assert text.count("one_bucket") == text.count("bulk_bucket") > 0
    for line in text.splitlines():
        if line.startswith("one_"):
            assert line.replace("one_", "bulk_", 1) in text, line


async def test_the_change_feed_watchers_events_and_history(client: Client) -> None:
    """Watchers by transport while they wait, events sent by transport, and the history's
    rows and compact revision."""
    for number in range(3):
        written = await client.post("/set", json={"key": f"k{number}", "val": "v"})
    third = int(written.headers["ETag"].strip('"'))
    polling = asyncio.ensure_future(
        client.get("/changes", params={"since": str(third), "timeout": "5"})
    )
    stream = await client.get("/changes", headers={"Accept": "text/event-stream"})
    await stream.content.readuntil(b"\n\n")  # its opening progress event
    text = await scrape(client)
    assert sample(text, "kv_watchers", transport="sse") == 1
    assert sample(text, "kv_watchers", transport="longpoll") == 1
    await client.post("/set", json={"key": "k3", "val": "v"})
    assert (await (await polling).json())["events"][0]["key"] == "k3"
    await stream.content.readuntil(b"\n\n")  # the event
    await client.get("/changes", params={"since": "0", "timeout": "0"})  # 4 events at once
    assert await client.app[STORE_KEY].trim_history(3600, 2, 100) == 2
    stream.close()
    text = await scrape(client)
    assert sample(text, "kv_watchers", transport="longpoll") == 0
    assert sample(text, "kv_change_events_sent_total", transport="longpoll") == 1 + 4
    assert sample(text, "kv_change_events_sent_total", transport="sse") == 1
    assert sample(text, "kv_change_history_rows") == 2
    assert sample(text, "kv_change_compact_revision") == third - 1
