"""Revocation, rotation and expiry reach every process within 1 s: two workers on one sqlite
file (KV_WORKERS=2), and two replicas on one PostgreSQL database, real server processes.
Tokens are created, rotated and deleted through a Store handle of the test's own on the same
file or database, as another process (the /tokens endpoints of any worker) would."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from mapmg_data_engineer_takehome.access import hash_secret, new_secret
from mapmg_data_engineer_takehome.store import SqliteStore, Store
from mapmg_data_engineer_takehome.store.base import Token, TokenRule
from mapmg_data_engineer_takehome.store.postgres import PostgresStore

from ..e2e_support import Server, ServerPool, run_in_own_loop
from ..postgres_support import PostgresCluster

BOOTSTRAP = "b00tstrap-t0ken"
# How long a change may take to reach every process, and how many requests (each on a new
# connection) show that every process answers as it should.
WITHIN = 1.0
REQUESTS = 24


@dataclass
class Deployment:
    """The processes that serve one store, and a way to call that store from the test."""

    servers: list[Server]
    call: Callable[[Callable[[Store], Awaitable[Any]]], Any]

    def statuses(self, secret: str) -> dict[int, set[int]]:
        """GET /get/k with ``secret`` REQUESTS times on every server, each on a new connection:
        the statuses answered, by worker (1 and 2) or replica (its index)."""
        seen: dict[int, set[int]] = {}
        for index, server in enumerate(self.servers):
            for _ in range(REQUESTS):
                answer = server.request("GET", "/get/k", headers=bearer(secret))
                seen.setdefault(index, set()).add(answer.status)
        if len(self.servers) == 1:  # the workers: by the access log's worker
            return by_worker(self.servers[0])
        return seen


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def by_worker(server: Server) -> dict[int, set[int]]:
    """The statuses of the latest REQUESTS requests, by the worker that answered each."""
    lines = [event for event in server.log_events() if event["event"] == "request"]
    seen: dict[int, set[int]] = {}
    for event in lines[-REQUESTS:]:
        seen.setdefault(event["worker"], set()).add(event["status"])
    return seen


def run_on(open_store: Callable[[], Awaitable[Store]]) -> Callable[..., Any]:
    def call(action: Callable[[Store], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            store = await open_store()
            try:
                return await action(store)
            finally:
                await store.close()

        return run_in_own_loop(go())

    return call


def wait_listening(server: Server, workers: int) -> None:
    deadline = time.monotonic() + 15
    while [event["event"] for event in server.log_events()].count("listening") < workers:
        assert time.monotonic() < deadline, server.describe()
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, servers: ServerPool) -> Iterator[Deployment]:
    env = {"KV_AUTH_TOKEN": BOOTSTRAP, "KV_ACCESS_LOG": "true"}
    if request.param == "sqlite":
        server = servers.start(env={**env, "KV_WORKERS": "2"})
        wait_listening(server, 2)
        path = servers.data_path

        async def open_sqlite() -> Store:
            return SqliteStore(path)

        yield Deployment([server], run_on(open_sqlite))
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.url(cluster.create_database())
        postgres = {**env, "KV_STORE": "postgres", "KV_POSTGRES_URL": url}
        replicas = [servers.start(env=postgres) for _ in range(2)]

        async def open_postgres() -> Store:
            return await PostgresStore.open(url)

        yield Deployment(replicas, run_on(open_postgres))


def create(deployment: Deployment, name: str, expires_in: float = 0) -> str:
    secret = new_secret()
    now_ms = int(time.time() * 1000)
    token = Token(
        name,
        hash_secret(secret),
        (TokenRule("", "readwrite"),),
        False,
        now_ms,
        int(now_ms + expires_in * 1000) if expires_in else None,
    )
    deployment.call(lambda store: store.create_token(token))
    return secret


def assert_everywhere(deployment: Deployment, secret: str, status: int) -> None:
    seen = deployment.statuses(secret)
    assert len(seen) == 2, seen  # both workers, or both replicas, answered
    assert all(statuses == {status} for statuses in seen.values()), seen


def test_a_deleted_token_is_refused_everywhere_within_a_second(deployment: Deployment) -> None:
    secret = create(deployment, "ci")
    assert_everywhere(deployment, secret, 404)  # allowed (no such key), and now cached
    deployment.call(lambda store: store.delete_token("ci"))
    time.sleep(WITHIN)
    assert_everywhere(deployment, secret, 401)


def test_a_rotated_secret_works_through_its_grace_then_is_refused(
    deployment: Deployment,
) -> None:
    old = create(deployment, "ci")
    assert_everywhere(deployment, old, 404)
    new = new_secret()
    grace_ends = time.time() + 3
    deployment.call(
        lambda store: store.rotate_token("ci", hash_secret(new), int(grace_ends * 1000))
    )
    assert_everywhere(deployment, new, 404)  # at once: a miss reads the store
    time.sleep(WITHIN)
    assert time.time() < grace_ends - 0.5, "the machine is too slow for this test's timing"
    assert_everywhere(deployment, old, 404)
    time.sleep(max(0.0, grace_ends - time.time()))
    assert_everywhere(deployment, old, 401)
    assert_everywhere(deployment, new, 404)
    # Rotated again without grace: the secret it replaces stops within the second.
    newest = new_secret()
    deployment.call(lambda store: store.rotate_token("ci", hash_secret(newest), None))
    time.sleep(WITHIN)
    assert_everywhere(deployment, new, 401)
    assert_everywhere(deployment, newest, 404)


def test_an_expired_token_is_refused_everywhere(deployment: Deployment) -> None:
    expires_at = time.time() + 3
    secret = create(deployment, "ci", expires_in=3)
    assert_everywhere(deployment, secret, 404)
    time.sleep(max(0.0, expires_at + 0.05 - time.time()))
    assert_everywhere(deployment, secret, 401)
