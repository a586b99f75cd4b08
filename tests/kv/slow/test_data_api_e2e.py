"""The data API against real server processes: expiry across a restart, and the classic
compare-and-set race with two workers."""

from __future__ import annotations

import json
import threading
import time

from ..e2e_support import Server, ServerPool

JSON_HEADERS = {"Content-Type": "application/json"}


def post(
    server: Server, path: str, document: object, headers: dict[str, str]
) -> tuple[int, dict[str, str], object]:
    answer = server.request(
        "POST", path, json.dumps(document).encode(), {**JSON_HEADERS, **headers}
    )
    return answer.status, dict(answer.headers.items()), answer.json()


def test_expiry_is_absolute_and_survives_a_restart(servers: ServerPool) -> None:
    """A deadline is a moment, not a countdown: a key whose time ran out while the server was
    down is gone when it comes back, and one whose time has not keeps its exact deadline. No
    step has to be quick, so a loaded machine cannot make this fail."""
    server = servers.start()
    status, _, _ = post(server, "/set", {"key": "soon", "val": "v", "ttl": 1}, {})
    assert status == 200
    written_at = time.monotonic()
    status, headers, _ = post(server, "/set", {"key": "later", "val": "v", "ttl": 3600}, {})
    assert status == 200
    expires_at = headers["KV-Expires-At"]
    assert server.stop() == 0
    time.sleep(max(0.0, written_at + 1.05 - time.monotonic()))

    restarted = servers.start(port=server.port)
    assert restarted.request("GET", "/get/soon").status == 404
    answer = restarted.request("GET", "/get/later")
    assert answer.status == 200 and answer.headers["KV-Expires-At"] == expires_at
    listing = json.loads(restarted.request("GET", "/keys").body)
    assert [item["key"] for item in listing["items"]] == ["later"]


def test_the_compare_and_set_race_comes_out_exact_with_two_workers(servers: ServerPool) -> None:
    """8 clients each add 1 to one counter 25 times: read, write with If-Match, and on 412
    read again. Every increment must land exactly once."""
    server = servers.start(env={"KV_WORKERS": "2"})
    assert post(server, "/set", {"key": "counter", "val": "0"}, {})[0] == 200
    clients, increments = 8, 25
    conflicts = [0] * clients
    failures: list[str] = []

    def increment(number: int) -> None:
        try:
            for _ in range(increments):
                while True:
                    answer = server.request("GET", "/get/counter")
                    assert answer.status == 200, answer.body
                    value = int(json.loads(answer.body)["val"])
                    status, _, body = post(
                        server,
                        "/set",
                        {"key": "counter", "val": str(value + 1)},
                        {"If-Match": answer.headers["ETag"]},
                    )
                    if status == 200:
                        break
                    assert status == 412, body
                    conflicts[number] += 1
        except Exception as error:  # reported by the main thread
            failures.append(repr(error))

    threads = [threading.Thread(target=increment, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    answer = server.request("GET", "/get/counter")
    assert json.loads(answer.body)["val"] == str(clients * increments)
    assert sum(conflicts) > 0  # the clients did race
    events = server.log_events()
    assert {event.get("worker") for event in events if event["event"] == "listening"} == {1, 2}
