"""Transactions, leases and locks through the Python client, both flavours, against live
servers on both stores: a lock excludes, passes in the order its owners came, waits without
polling, and tells its owner at once when it is lost (a flag and a callback; in asyncio, the
cancellation of the block); a write fenced by a lost lock's token is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mapmg_data_engineer_takehome.client import (
    AsyncClient,
    Client,
    LeaseNotFound,
    LockLost,
    Unavailable,
)

from ..e2e_support import Server, ServerPool, free_port, run_in_own_loop


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, servers: ServerPool) -> Server:
    if request.param == "sqlite":
        return servers.start()
    cluster = request.getfixturevalue("postgres_cluster")
    env = {"KV_STORE": "postgres", "KV_POSTGRES_URL": cluster.url(cluster.create_database())}
    return servers.start(env=env)


@pytest.fixture
def kv(server: Server) -> Iterator[Client]:
    with Client(url(server)) as client:
        yield client


def test_a_transaction_and_a_lease_through_the_client(kv: Client) -> None:
    lease = kv.grant_lease(30)
    assert lease.ttl == 30 and lease.keys is None
    first = kv.set("svc/a", "10.0.0.1", lease=lease.id)
    done = kv.txn(
        compare=[{"key": "svc/a", "version": first}],
        success=[
            {"op": "set", "key": "svc/b", "val": "10.0.0.2", "lease": lease.id},
            {"op": "get", "key": "svc/a"},
        ],
    )
    assert (done.succeeded, done.failed) == (True, None)
    assert done.results == [
        {"key": "svc/b", "version": done.revision},
        {"key": "svc/a", "val": "10.0.0.1", "version": first},
    ]
    refused = kv.txn(
        compare=[{"key": "svc/a", "value": "elsewhere"}],
        failure=[{"op": "get", "key": "svc/missing"}],
    )
    assert (refused.succeeded, refused.failed, refused.revision) == (False, 0, done.revision)
    assert refused.results == [{"key": "svc/missing", "val": None, "version": None}]

    renewed = kv.keepalive_lease(lease.id)
    assert renewed.expires_at >= lease.expires_at
    other = kv.grant_lease(5)
    kv.revoke_lease(other.id)
    many = kv.keepalive_leases([other.id, lease.id, other.id])
    assert list(many) == [other.id, lease.id] and many[other.id] is None
    kept = many[lease.id]
    assert kept is not None and kept.expires_at >= renewed.expires_at
    renewed = kv.keepalive_lease(lease.id)
    assert kv.get_lease(lease.id).keys == ("svc/a", "svc/b")
    assert kv.get("svc/b").expires_at == renewed.expires_at
    assert kv.revoke_lease(lease.id) == 2
    assert kv.mget(["svc/a", "svc/b"]) == {"svc/a": None, "svc/b": None}
    for call in (kv.keepalive_lease, kv.get_lease, kv.revoke_lease):
        with pytest.raises(LeaseNotFound) as raised:
            call(lease.id)
        assert (raised.value.status, raised.value.code) == (404, "lease_not_found")


def test_a_lock_excludes_and_passes_in_the_order_its_owners_came(server: Server) -> None:
    """Threads, each its own client, take one lock in turns. What each does under it is
    logged: no two ever overlap, and each owner had the lock in the order of its token,
    which is the order it came in."""
    log: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []

    def owner(number: int) -> None:
        try:
            with Client(url(server)) as kv:
                for _ in range(5):
                    # A ttl far beyond a loaded machine's stalls: this test is of order and
                    # exclusion; the tests below lose leases on purpose.
                    with kv.lock("jobs/nightly", ttl=30) as lock:
                        log.append(("in", number, lock.token))
                        time.sleep(0.005)
                        log.append(("out", number, lock.token))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=owner, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(log) == 2 * 6 * 5
    for entered, left in zip(log[0::2], log[1::2]):
        assert (entered[0], left[0]) == ("in", "out")
        assert entered[1:] == left[1:], "another owner came in before this one left"
    tokens = [token for _, _, token in log[0::2]]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    with Client(url(server)) as kv:
        assert list(kv.keys("jobs/nightly/")) == [], "a released lock leaves no key"


def test_a_waiter_waits_on_the_change_feed_without_polling(server: Server) -> None:
    """A waiter sends the same few requests however long it waits: its lease's grant, its
    key, a listing, one stream of changes, a second listing once the key before it goes,
    and its release; and the keep-alives of its lease."""
    sent: list[str] = []
    with Client(url(server)) as holder_kv, Client(url(server)) as waiter_kv:
        waiter_kv._http.event_hooks["request"].append(
            lambda request: sent.append(f"{request.method} {request.url.path}")
        )
        holder = holder_kv.lock("batch", ttl=3)
        holder.acquire()
        waiter = waiter_kv.lock("batch", ttl=3)
        thread = threading.Thread(target=waiter.acquire)
        thread.start()
        time.sleep(3)  # a keep-alive or two of each lease
        assert waiter.token > holder.token
        assert thread.is_alive(), "the waiter took a held lock"
        holder.release()
        thread.join(timeout=10)
        assert not thread.is_alive()
        waiter.release()
    others = [line for line in sent if not line.endswith("/keepalive")]
    assert [line.split()[0] + " " + line.split()[1].split("/")[1] for line in others] == [
        "POST leases",
        "POST set",
        "GET keys",
        "GET changes",
        "GET keys",
        "DELETE leases",
    ], sent


def test_a_lost_lock_is_signalled_and_its_fenced_write_refused(kv: Client) -> None:
    """The lease of a held lock is revoked behind its owner's back: within a keep-alive
    period the owner's flag is set and its callback called, a write fenced by its token is
    refused, the end of the block raises LockLost, and the next owner gets a greater token."""
    called: list[float] = []
    # A keep-alive period of 1 s against a TTL of 3: noticed at the next renewal, not when
    # the lease would have run out, with room for a loaded machine in between.
    lost_by = kv.lock("deploy", ttl=3, on_lost=lambda: called.append(time.monotonic()))
    with pytest.raises(LockLost), lost_by as lock:
        assert not lock.lost
        assert kv.txn(compare=[lock.fence]).succeeded
        assert lock.lease is not None
        kv.revoke_lease(lock.lease.id)
        revoked = time.monotonic()
        deadline = revoked + 3
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.lost and len(called) == 1
        assert called[0] - revoked <= 1 + 0.8  # the keep-alive period (ttl/3), and slack
        fenced = kv.txn(
            compare=[lock.fence], success=[{"op": "set", "key": "deployed", "val": "v2"}]
        )
        assert (fenced.succeeded, fenced.failed) == (False, 0)
    assert kv.mget(["deployed"]) == {"deployed": None}
    with kv.lock("deploy") as after:
        assert after.token > lock.token


def test_a_lost_lock_cancels_an_asyncio_owners_block(server: Server) -> None:
    async def scenario() -> tuple[float, bool]:
        async with AsyncClient(url(server)) as kv:
            reached_the_end = False
            start = time.monotonic()
            with pytest.raises(LockLost):
                async with kv.lock("deploy", ttl=3) as lock:
                    assert lock.lease is not None
                    await kv.revoke_lease(lock.lease.id)
                    start = time.monotonic()
                    await asyncio.sleep(10)
                    reached_the_end = True
            return time.monotonic() - start, reached_the_end

    took, reached_the_end = run_in_own_loop(scenario())
    assert not reached_the_end
    assert took <= 1 + 0.8  # the keep-alive period (ttl/3), and slack: well before the ttl


def test_an_asyncio_owner_cancelled_from_outside_stays_cancelled(server: Server) -> None:
    """A cancellation that is not the lock's own passes through the block, and the lock is
    released."""

    async def scenario() -> None:
        async with AsyncClient(url(server)) as kv:
            held = asyncio.Event()

            async def owner() -> None:
                async with kv.lock("deploy", ttl=5):
                    held.set()
                    await asyncio.sleep(10)

            task = asyncio.ensure_future(owner())
            await held.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [entry async for entry in kv.keys("deploy/")] == []

    run_in_own_loop(scenario())


def test_a_waiter_whose_lease_runs_out_is_told(kv: Client, server: Server) -> None:
    """A waiter's own key goes (its lease revoked, as when it ran out) while the lock is
    held by another: it stops waiting with LockLost."""
    with kv.lock("report", ttl=5), Client(url(server)) as other:
        waiter = other.lock("report", ttl=5)
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                waiter.acquire()
            except BaseException as error:
                failed.append(error)

        thread = threading.Thread(target=wait)
        thread.start()
        while waiter.lease is None or not list(kv.keys("report/"))[1:]:
            time.sleep(0.01)
        kv.revoke_lease(waiter.lease.id)
        thread.join(timeout=10)
        assert [type(error) for error in failed] == [LockLost]


def test_a_lock_of_a_server_that_is_down_is_unavailable() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retries=0) as kv:
        lock = kv.lock("anything")
        with pytest.raises(Unavailable):
            lock.acquire()
        assert lock.lease is None


def test_the_blocking_and_asyncio_locks_share_one_line(server: Server) -> None:
    """A thread with Client and a task with AsyncClient wait for each other's lock."""
    order: list[Any] = []

    async def async_owner() -> None:
        async with AsyncClient(url(server)) as kv, kv.lock("shared", ttl=5) as lock:
            order.append(("async in", lock.token))
            await asyncio.sleep(0.3)
            order.append(("async out", lock.token))

    with Client(url(server)) as kv:
        with kv.lock("shared", ttl=5) as lock:
            order.append(("sync in", lock.token))
            thread = threading.Thread(target=lambda: run_in_own_loop(async_owner()))
            thread.start()
            time.sleep(0.5)
            order.append(("sync out", lock.token))
        thread.join(timeout=10)
    assert [step for step, _ in order] == ["sync in", "sync out", "async in", "async out"]


def test_an_election_is_a_lock_whose_owners_say_who_they_are(server: Server) -> None:
    """Campaign: hold the lock with a value; resign: leave the block. An observer sees each
    leader in turn, once each, and None while nobody leads."""
    seen: list[Any] = []
    with Client(url(server)) as kv, Client(url(server)) as watcher:
        assert kv.leader("svc/leader") is None
        observed = watcher.observe_leader("svc/leader")
        seen.append(next(observed))
        follow = threading.Thread(target=lambda: seen.extend(next(observed) for _ in range(3)))
        follow.start()
        with kv.lock("svc/leader", value="node-a") as first:
            second = kv.lock("svc/leader", value="node-b")
            waiting = threading.Thread(target=second.acquire)
            waiting.start()
            wait_for_owners(kv, "svc/leader/", 2)
            leader = kv.leader("svc/leader")
            assert leader is not None and (leader.val, leader.version) == ("node-a", first.token)
        waiting.join(timeout=10)
        assert kv.leader("svc/leader").val == "node-b"  # type: ignore[union-attr]
        second.release()
        follow.join(timeout=10)
        observed.close()
    assert [None if entry is None else entry.val for entry in seen] == [
        None,
        "node-a",
        "node-b",
        None,
    ]


def wait_for_owners(kv: Client, prefix: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(list(kv.keys(prefix))) < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_lock_whose_server_hangs_is_lost_within_its_ttl(servers: ServerPool) -> None:
    """A keep-alive that gets no answer waits no longer than the lease may live, however
    long the client's timeout: the owner learns of the loss by the TTL."""
    server = servers.start()
    with Client(url(server), timeout=30) as kv:
        lock = kv.lock("deploy", ttl=3)
        lock.acquire()
        os.killpg(server.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while not lock.lost and time.monotonic() - stopped < 10:
                time.sleep(0.01)
            noticed = time.monotonic() - stopped
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
        assert lock.lost
        assert noticed <= 3 + 0.8  # the ttl, and slack: nowhere near the client's 30 s
        lock.release()


# Eight locks of one client, taken 0.2 s apart, so that their leases fall due at eight
# different moments at first, then held for six keep-alive periods (ttl/3 = 1 s) more.
MANY_LOCKS, TAKEN_APART, LOCK_TTL, HELD_FOR = 8, 0.2, 3.0, 6.0


def check_renewals(renewals: list[tuple[float, list[str]]], taken: dict[str, float]) -> None:
    """The keep-alive requests a client sent, applied as a log: every lease is renewed within
    a period (and slack) of its grant and of its last renewal, and the leases drift into one
    request a period instead of one each."""
    period = LOCK_TTL / 3
    last = dict(taken)
    for sent, leases in renewals:
        for lease in leases:
            assert sent - last[lease] <= period + 0.5, (lease, sent - last[lease])
            last[lease] = sent
    assert set(last) == set(taken)
    # At first the leases go in groups. A request takes every lease due within half a period,
    # so the first group due after another's request takes that group along with its own, and
    # within two periods of the last lock taken, all go in every request. Counted from the
    # last lock taken, not in requests: on a loaded machine the locks take longer to take,
    # and more requests go before the last one is held.
    together = max(taken.values()) + 2 * period + 0.5
    after = [set(leases) for sent, leases in renewals if sent >= together]
    assert len(after) >= 2 and all(leases == set(taken) for leases in after), renewals


def test_a_clients_locks_are_kept_alive_in_one_request_a_period(server: Server) -> None:
    renewals: list[tuple[float, list[str]]] = []

    def record(request: Any) -> None:
        if request.url.path == "/leases/keepalive":
            renewals.append((time.monotonic(), json.loads(request.content)["ids"]))

    with Client(url(server)) as kv:
        kv._http.event_hooks["request"].append(record)
        taken: dict[str, float] = {}
        locks = []
        for number in range(MANY_LOCKS):
            lock = kv.lock(f"jobs/{number}", ttl=LOCK_TTL)
            lock.acquire()
            assert lock.lease is not None
            taken[lock.lease.id] = time.monotonic()
            locks.append(lock)
            time.sleep(TAKEN_APART)
        time.sleep(HELD_FOR)
        assert not any(lock.lost for lock in locks)
        for lock in locks:
            lock.release()
    check_renewals(renewals, taken)


def test_an_async_clients_locks_are_kept_alive_in_one_request_a_period(server: Server) -> None:
    renewals: list[tuple[float, list[str]]] = []

    async def record(request: Any) -> None:
        if request.url.path == "/leases/keepalive":
            renewals.append((time.monotonic(), json.loads(request.content)["ids"]))

    async def scenario() -> dict[str, float]:
        async with AsyncClient(url(server)) as kv:
            kv._http.event_hooks["request"].append(record)
            taken: dict[str, float] = {}
            async with contextlib.AsyncExitStack() as held:
                for number in range(MANY_LOCKS):
                    lock = await held.enter_async_context(kv.lock(f"jobs/{number}", ttl=LOCK_TTL))
                    assert lock.lease is not None
                    taken[lock.lease.id] = time.monotonic()
                    await asyncio.sleep(TAKEN_APART)
                await asyncio.sleep(HELD_FOR)
            return taken

    check_renewals(renewals, run_in_own_loop(scenario()))


def test_an_on_lost_that_raises_is_its_owners_to_hear_and_stops_no_other_lock(kv: Client) -> None:
    """The keep-alive loop is the client's, shared by its locks: an ``on_lost`` that raises
    does not end it. The error is raised by that lock's release."""

    def complain() -> None:
        raise ValueError("on_lost failed")

    other = kv.lock("jobs/other", ttl=LOCK_TTL)
    other.acquire()
    lost = kv.lock("jobs/lost", ttl=LOCK_TTL, on_lost=complain)
    lost.acquire()
    assert lost.lease is not None
    kv.revoke_lease(lost.lease.id)
    deadline = time.monotonic() + LOCK_TTL
    while not lost.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost.lost
    with pytest.raises(ValueError, match="on_lost failed"):
        lost.release()
    time.sleep(2 * LOCK_TTL)  # the other lock outlives its ttl twice over, renewed
    assert not other.lost
    assert other.lease is not None and kv.get_lease(other.lease.id).id == other.lease.id
    other.release()
