"""Watchers of real servers, for the slow tests: a stream that resumes by itself, and a writer
that records what was acknowledged."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import httpx
from httpx_sse import connect_sse

from .e2e_support import Server

CHANGE_TYPES = ("set", "delete", "expire")


class Follower(threading.Thread):
    """Follows /changes as a stream of Server-Sent Events on ``servers``, moving to the next
    one whenever a stream ends or fails, and resuming from the last id it saw
    (Last-Event-ID), as an EventSource would. Run it with short heartbeats on the servers
    (KV_CHANGES_HEARTBEAT), so that it notices ``stop`` soon."""

    def __init__(
        self, servers: Sequence[Server], prefix: str = "", since: Optional[int] = None
    ) -> None:
        super().__init__(daemon=True)
        self.servers = list(servers)
        self.prefix = prefix
        self.since = since
        self.changes: list[dict[str, Any]] = []  # every change event's data, in order
        self.arrivals: list[float] = []  # when each arrived (time.monotonic())
        # The follower has every change up to this revision: the revision of the last id
        # seen, or the one before it when that id is inside a revision (17.2: 16).
        self.last_id: Optional[int] = None
        # That id as the stream gave it, sent back as Last-Event-ID on a reconnection.
        self.last_event_id: Optional[str] = None
        self.connections = 0  # streams opened with 200
        self.refusals: list[tuple[int, str]] = []  # answers other than 200
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=15)
        assert not self.is_alive(), "the follower did not stop"

    def run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            server = self.servers[attempt % len(self.servers)]
            attempt += 1
            params = {"prefix": self.prefix}
            headers = {}
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = self.last_event_id
            elif self.since is not None:
                params["since"] = str(self.since)
            with contextlib.suppress(httpx.HTTPError, OSError):  # resume on the next
                self._follow(server, params, headers)
            time.sleep(0.05)

    def _follow(self, server: Server, params: dict[str, str], headers: dict[str, str]) -> None:
        url = f"http://127.0.0.1:{server.port}/changes"
        with connect_sse(
            client(), "GET", url, params=params, headers=headers, timeout=5.0
        ) as source:
            if source.response.status_code != 200:
                source.response.read()
                self.refusals.append((source.response.status_code, source.response.text))
                time.sleep(0.2)
                return
            self.connections += 1
            for sse in source.iter_sse():
                now = time.monotonic()
                with self._lock:
                    if sse.event in CHANGE_TYPES:
                        self.changes.append(json.loads(sse.data))
                        self.arrivals.append(now)
                    if sse.id:  # the last id seen, which httpx-sse keeps as the spec says
                        self.last_event_id = sse.id
                        self.last_id = whole_revisions(sse.id)
                if self._stopping.is_set():
                    return

    def wait_for(self, revision: int, timeout: float = 15.0) -> None:
        """Until the follower has seen ``revision`` (its last id is at or past it)."""
        deadline = time.monotonic() + timeout
        while self.last_id is None or self.last_id < revision:
            assert time.monotonic() < deadline, (
                f"the follower is at {self.last_id}, not {revision}; refused {self.refusals}"
            )
            time.sleep(0.02)

    def revisions(self) -> list[int]:
        with self._lock:
            return [change["revision"] for change in self.changes]


def whole_revisions(event_id: str) -> int:
    """The revision up to which a watcher resuming from ``event_id`` has every change: the
    id's own (``17``, a revision's last event, or a heartbeat), or the one before it when the
    id names a place inside a revision (``17.2``: the first two of 17's events)."""
    revision, _, place = event_id.partition(".")
    return int(revision) - 1 if place else int(revision)


_client: Optional[httpx.Client] = None
_client_lock = threading.Lock()


def client() -> httpx.Client:
    """One client for every thread (httpx's are thread-safe), kept: making one costs tens of
    ms, as it loads CA certificates. close_client() closes it."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=70)
        return _client


def close_client() -> None:
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None


def post(server: Server, path: str, body: Any, timeout: float = 10.0) -> httpx.Response:
    return client().post(f"http://127.0.0.1:{server.port}{path}", json=body, timeout=timeout)


def set_key(server: Server, key: str, val: str) -> int:
    """Set ``key``; the revision of the write (its ETag)."""
    answer = post(server, "/set", {"key": key, "val": val})
    assert answer.status_code == 200, answer.text
    return int(answer.headers["ETag"].strip('"'))


def poll(server: Server, **params: Any) -> httpx.Response:
    return client().get(
        f"http://127.0.0.1:{server.port}/changes",
        params={name: str(value) for name, value in params.items()},
    )
