"""The cost of keeping --leases (10,000) live leases alive every --period (10) seconds.

Issue 26's bar: 10,000 leases kept alive every 10 s cost at most 10% of one core.

Method: a server of this tree (--store, sqlite by default) on core 0; this process, one
asyncio client (aiohttp, a pool of keep-alive connections), on core 1. It grants --leases
leases of --ttl seconds and sets one key under each (service/NNNNN, as a service registering
itself would), then reads the server's CPU for --idle seconds with nothing asked of it (what
holding the leases costs: the upkeep loop). Then it keeps every lease alive once per --period,
spread evenly (10,000 every 10 s: one keepalive each millisecond, each sent when due whether
or not the ones before were answered, as many holders would), for one period of warm-up and
the --seconds measured. The figures are the server's CPU time over the measured window (user
and system, from /proc, with any worker processes) as a fraction of one core, the keepalives
sent and their achieved rate, how late this client sent them behind their schedule, their
latency (send to answer) at p50 and p99, and every failed one. At the end every key must still
be there. With --store postgres, PostgreSQL's own processes' CPU is given beside the server's
(a throwaway cluster, fsync on, as bench/run.py's; it is not pinned).

    python bench/leases.py                                   # sqlite, 60 s measured
    python bench/leases.py --store memory --seconds 30
    python bench/leases.py --store postgres --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from pooler import cpu_of  # noqa: E402
from run import LOAD_CORE, children_cpu_seconds, report_missing  # noqa: E402
from watch import server  # noqa: E402

from tests.kv.postgres_support import PostgresCluster, server_binaries  # noqa: E402

PREFIX = "service/"
# Keep-alive connections the client may open; a keepalive that finds none free waits for one,
# and the wait counts in its latency.
CONNECTIONS = 32
# How often the sender wakes to send what has come due: the spacing of 10,000 every 10 s, so
# that the keepalives arrive one by one, not in bursts that would share a commit.
TICK = 0.001


@dataclass
class Tally:
    """What the measured window's keepalives came to."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)  # sent behind schedule
    failures: list[str] = field(default_factory=list)


async def grant_all(session: aiohttp.ClientSession, base: str, count: int, ttl: float) -> list[str]:
    """``count`` leases, each with one key set under it; their ids, in grant order."""
    ids: list[str] = [""] * count
    numbers = iter(range(count))

    async def granter() -> None:
        for number in numbers:
            async with session.post(f"{base}/leases", json={"ttl": ttl}) as answer:
                assert answer.status == 200, await answer.text()
                lease = (await answer.json())["id"]
            registration = {
                "key": f"{PREFIX}{number:05d}",
                "val": f"10.0.{number // 250}.{number % 250}:8080",
                "lease": lease,
            }
            async with session.post(f"{base}/set", json=registration) as answer:
                assert answer.status == 200, await answer.text()
            ids[number] = lease

    await asyncio.gather(*(granter() for _ in range(CONNECTIONS)))
    return ids


# A keepalive request: its path, and the leases it renews in one, if several.
Renewal = tuple[str, Optional[list[str]]]


def renewals(ids: list[str], per_request: int) -> list[Renewal]:
    """Each lease's own POST /leases/{id}/keepalive, or POST /leases/keepalive of
    ``per_request`` leases at a time (as a holder of that many renews them)."""
    if per_request == 1:
        return [(f"/leases/{lease}/keepalive", None) for lease in ids]
    batches = range(0, len(ids), per_request)
    return [("/leases/keepalive", ids[start : start + per_request]) for start in batches]


async def keepalive(
    session: aiohttp.ClientSession, renewal: Renewal, tally: Optional[Tally]
) -> None:
    url, leases = renewal
    started = time.perf_counter()
    try:
        body_sent = None if leases is None else {"ids": leases}
        async with session.post(url, json=body_sent) as answer:
            body = await answer.read()
            status = answer.status
            if leases is not None and status == 200 and b'"not_found":[]' not in body:
                status = 404  # a lease of the batch was not renewed
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        if tally is not None:
            tally.failures.append(f"{url}: {error!r}")
        return
    if tally is None:
        return
    if status == 200:
        tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    else:
        tally.failures.append(f"{url}: {status} {body[:200]!r}")


async def keep_alive(
    session: aiohttp.ClientSession,
    requests: list[Renewal],
    period: float,
    begin: float,
    measured_from: float,
    end: float,
) -> Tally:
    """Each of ``requests`` (keepalives) POSTed once per ``period``, from ``begin`` to ``end``
    (monotonic seconds), evenly spread; the tally of those due from ``measured_from``."""
    spacing = period / len(requests)
    tally = Tally()
    running: set[asyncio.Future[None]] = set()
    sent = 0
    while True:
        now = time.monotonic()
        due = begin + sent * spacing
        while due <= now and due < end:
            measured = due >= measured_from
            if measured:
                tally.sent += 1
                tally.lags_ms.append((now - due) * 1000)
            task = asyncio.ensure_future(
                keepalive(session, requests[sent % len(requests)], tally if measured else None)
            )
            running.add(task)
            task.add_done_callback(running.discard)
            sent += 1
            due = begin + sent * spacing
        if due >= end:
            break
        await asyncio.sleep(min(TICK, due - now))
    await asyncio.gather(*running)
    return tally


async def live_keys(session: aiohttp.ClientSession, base: str) -> int:
    """How many keys under PREFIX the server holds now, page by page."""
    count, cursor = 0, None
    while True:
        params = {"prefix": PREFIX, "limit": "1000"}
        if cursor:
            params["cursor"] = cursor
        async with session.get(f"{base}/keys", params=params) as answer:
            page = await answer.json()
        count += len(page["items"])
        cursor = page["cursor"]
        if not cursor:
            return count


def cpu_now(pid: int, others: Callable[[], float]) -> tuple[float, float, float, float]:
    """(monotonic time, the server's CPU seconds, the others', this process's)."""
    return time.monotonic(), children_cpu_seconds(pid), others(), time.process_time()


async def bench(
    port: int, pid: int, others: Callable[[], float], args: argparse.Namespace
) -> Tally:
    base = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        ids = await grant_all(session, "", args.leases, args.ttl)
        granted = time.monotonic() - started
        print(f"granted {len(ids):,} leases of {args.ttl:g} s, one key under each, in "
              f"{granted:.1f} s", flush=True)  # fmt: skip
        if granted + args.idle + args.period >= args.ttl:
            print("  (the first leases may expire before their first keepalive: raise --ttl)")
        before = cpu_now(pid, others)
        await asyncio.sleep(args.idle)
        after = cpu_now(pid, others)
        print(f"idle, {len(ids):,} leases held: server CPU "
              f"{(after[1] - before[1]) / (after[0] - before[0]):.2%} of one core over "
              f"{after[0] - before[0]:.1f} s", flush=True)  # fmt: skip
        begin = time.monotonic()
        measured_from = begin + args.period  # one period of warm-up
        end = measured_from + args.seconds

        async def read_cpu() -> tuple[tuple[float, ...], tuple[float, ...]]:
            await asyncio.sleep(measured_from - time.monotonic())
            first = cpu_now(pid, others)
            await asyncio.sleep(end - time.monotonic())
            return first, cpu_now(pid, others)

        readings = asyncio.ensure_future(read_cpu())
        requests = renewals(ids, args.per_request)
        tally = await keep_alive(session, requests, args.period, begin, measured_from, end)
        first, last = await readings
        keys = await live_keys(session, "")
    wall = last[0] - first[0]
    server_cpu, others_cpu, own_cpu = ((b - a) / wall for a, b in zip(first[1:], last[1:]))
    report(tally, args, wall, server_cpu, others_cpu, own_cpu, keys)
    return tally


def report(
    tally: Tally,
    args: argparse.Namespace,
    wall: float,
    server_cpu: float,
    others_cpu: float,
    own_cpu: float,
    keys: int,
) -> None:
    target = args.leases / args.per_request / args.period
    latencies = sorted(tally.latencies_ms) or [float("nan")]
    lags = sorted(tally.lags_ms) or [float("nan")]

    def at(values: list[float], fraction: float) -> float:
        return values[min(len(values) - 1, int(len(values) * fraction))]

    print(f"\nstore {args.store}: {args.leases:,} leases kept alive every {args.period:g} s "
          f"({target:,.0f}/s), measured over {wall:.1f} s")  # fmt: skip
    print(f"  server CPU:   {server_cpu:.2%} of one core (the issue's bar: 10%)")
    if args.store == "postgres":
        print(f"  PostgreSQL:   {others_cpu:.2%} of one core (its processes, beside the server's)")
    if args.per_request > 1:
        print(f"  renewed:      {args.per_request} leases a request (POST /leases/keepalive)")
    print(f"  requests:     {tally.sent:,} sent, {tally.sent / wall:,.0f}/s "
          f"({tally.sent / wall / target:.1%} of the {target:,.0f}/s asked); "
          f"{len(tally.failures)} failed")  # fmt: skip
    print(f"  latency:      p50 {statistics.median(latencies):.2f} ms, "
          f"p99 {at(latencies, 0.99):.2f} ms, max {latencies[-1]:.2f} ms")  # fmt: skip
    print(f"  sent late by: p50 {statistics.median(lags):.2f} ms, p99 {at(lags, 0.99):.2f} ms, "
          f"max {lags[-1]:.2f} ms")  # fmt: skip
    print(f"  this client:  {own_cpu:.0%} of core {LOAD_CORE}")
    print(f"  keys live at the end: {keys:,} of {args.leases:,}")
    for failure in tally.failures[:10]:
        print(f"  failed: {failure}")


def postgres_settings(stack: ExitStack) -> tuple[dict[str, str], Callable[[], float]]:
    """A throwaway cluster, removed when ``stack`` closes: the server's settings for a fresh
    database in it, and a reading of its processes' CPU seconds."""
    bindir = server_binaries()
    if bindir is None:
        raise SystemExit("bench: missing prerequisite: PostgreSQL (apt-get install postgresql)")
    cluster = PostgresCluster(bindir, durable=True)
    stack.callback(cluster.remove)
    cluster.start()
    url = cluster.url(cluster.create_database())
    return {"KV_STORE": "postgres", "KV_POSTGRES_URL": url}, lambda: cpu_of(cluster.processes())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "memory", "postgres"), default="sqlite")
    parser.add_argument("--durability", choices=("normal", "full"), default="normal")
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--period", type=float, default=10.0, help="seconds between keepalives")
    parser.add_argument(
        "--per-request",
        type=int,
        default=1,
        help="leases renewed a request: 1, each its own POST /leases/{id}/keepalive (10,000 "
        "holders of a lease each); more, POST /leases/keepalive of that many (holders of many)",
    )
    # Long enough for the first leases to outlast the grants (some 30 s on PostgreSQL with
    # fsync), the idle reading and the first period.
    parser.add_argument("--ttl", type=float, default=60.0, help="each lease's ttl, seconds")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds measured idle first")
    args = parser.parse_args(argv)
    if report_missing([]):
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    with ExitStack() as stack:
        settings: dict[str, str] = {"KV_STORE": args.store, "KV_DURABILITY": args.durability}
        others: Callable[[], float] = lambda: 0.0  # noqa: E731
        if args.store == "postgres":
            extra, others = postgres_settings(stack)
            settings.update(extra)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kv-leases-")))
        port, pid = stack.enter_context(server(directory, True, **settings))
        tally = asyncio.run(bench(port, pid, others, args))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
