"""Metrics with KV_WORKERS=2: a scrape answered by either worker reports the totals of both
(prometheus-client's multiprocess mode), over a directory the supervisor empties at start."""

from __future__ import annotations

import re
import time

from ..e2e_support import Server, ServerPool


def requests_counted(text: str) -> float:
    return sum(
        float(value)
        for value in re.findall(
            r'^kv_requests_total\{[^}]*route="/get/\{key\}"[^}]*\} (\S+)$', text, re.M
        )
    )


def test_a_scrape_on_any_worker_reports_every_workers_totals(servers: ServerPool) -> None:
    server: Server = servers.start(env={"KV_WORKERS": "2", "KV_ACCESS_LOG": "true"})
    deadline = time.monotonic() + 15  # /health answered once the first worker listened
    while [event["event"] for event in server.log_events()].count("listening") < 2:
        assert time.monotonic() < deadline, server.describe()
        time.sleep(0.05)
    for number in range(60):  # a new connection each: the kernel spreads them over both
        assert server.request("GET", f"/get/k{number}").status == 404
    events = server.log_events()
    assert {event["worker"] for event in events if event["event"] == "request"} == {1, 2}
    time.sleep(1.5)  # each worker writes its counts to the shared files every second
    scrapes = [server.request("GET", "/metrics") for _ in range(6)]
    assert all(scrape.status == 200 for scrape in scrapes)
    counts = {requests_counted(scrape.body.decode()) for scrape in scrapes}
    assert counts == {60.0}, counts  # the same totals, whichever worker answered
    assert server.stop() == 0
