"""The change feed under load: watchers of /changes while writes go on.

Scenarios:
- fanout: --watchers (1,000) streams of Server-Sent Events on one server process, pinned to
  core 0; a writer POSTs one key at a time at --rate (200/s) for --duration seconds. Every
  write must reach every watcher. Latency is from the write's 200 (as its writer reads it) to
  the event's arrival at each watcher. The server's RSS is read before the watchers connect
  and at the end.
- workers: two servers on one sqlite file (what KV_WORKERS runs), both on core 0; the writes
  go to one, --cross-watchers (50) watchers follow the other.
- replicas: the same with two PostgreSQL replicas on a throwaway cluster (unpinned, as in
  bench/run.py).

The watchers run in this process, on core 1, as raw asyncio protocols that parse no more of a
stream than its ids and its event names; the writer is a process of its own on core 1, so
that its clock readings are not late behind the watchers' work. Both read time.monotonic(),
one clock for every process.

    python bench/watch.py                                   # every scenario
    python bench/watch.py --scenarios fanout --watchers 1000 --rate 200 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from run import cpu_seconds, free_port, rss_mib, stop, wait_ready  # noqa: E402

from tests.kv.postgres_support import PostgresCluster, server_binaries  # noqa: E402

SERVER_CORE, CLIENT_CORE = "0", "1"


# --- servers --------------------------------------------------------------------------------


def _more_files() -> None:
    """In the server's process: as many open files as allowed (a connection is one)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def server(data_dir: Path, pinned: bool, **settings: str) -> Iterator[tuple[int, int]]:
    """A server of this tree: (port, pid)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
    env.update(
        KV_PORT=str(port),
        KV_DATA_PATH=str(data_dir / "kv.sqlite3"),
        KV_LOG_LEVEL="warning",
        # No heartbeats during a run: every id a watcher sees is a write's.
        KV_CHANGES_HEARTBEAT="3600",
        **settings,
    )
    command = [sys.executable, "-m", "mapmg_data_engineer_takehome"]
    if pinned:
        command = ["taskset", "-c", SERVER_CORE, *command]
    process = subprocess.Popen(
        command,
        cwd=str(data_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_more_files,
    )
    try:
        wait_ready(port, process)
        yield port, process.pid
    finally:
        stop(process)


def revision_of(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/keys?limit=1", timeout=5) as answer:
        return int(answer.headers["KV-Revision"])


# --- the writer, a process of its own -------------------------------------------------------


def write_at_rate(port: int, rate: float, duration: float, results: Connection) -> None:
    """POST one key every 1/rate seconds, whether or not the ones before have been answered
    (on as many keep-alive connections as are busy at once), as many clients would; send back
    (revision, when its 200 was read) for each."""
    os.sched_setaffinity(0, {int(CLIENT_CORE)})
    acknowledged: list[tuple[int, float]] = []

    async def write(
        number: int, idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    ) -> None:
        reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        body = b'{"key":"watched/%d","val":"v"}' % number
        writer.write(
            b"POST /set HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        now = time.monotonic()
        lowered = head.lower()
        await reader.readexactly(int(lowered.split(b"content-length: ")[1].split(b"\r")[0]))
        acknowledged.append((int(lowered.split(b'etag: "')[1].split(b'"')[0]), now))
        idle.append((reader, writer))

    async def run() -> None:
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        writes = []
        start = time.monotonic()
        for number in range(int(duration * rate)):
            await asyncio.sleep(max(0.0, start + number / rate - time.monotonic()))
            writes.append(asyncio.ensure_future(write(number, idle)))
        await asyncio.gather(*writes)
        for _, writer in idle:
            writer.close()

    asyncio.run(run())
    results.send(sorted(acknowledged))


# --- the watchers ---------------------------------------------------------------------------


class Watcher(asyncio.Protocol):
    """One stream: the events it got, and when each write's event arrived (ids are write
    revisions, one key each, so consecutive)."""

    def __init__(self, request: bytes, since: int, arrivals: dict[int, array[float]]) -> None:
        self.request = request
        self.last = since
        self.events = 0
        self.arrivals = arrivals
        self.tail = b""
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport) or hasattr(transport, "write")
        transport.write(self.request)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buffer = self.tail + data
        end = buffer.rfind(b"\n\n") + 2
        whole, self.tail = buffer[:end], buffer[end:]
        self.events += whole.count(b"event: set\n")
        mark = whole.rfind(b"\nid: ")
        if mark < 0:
            return
        # An id is the bare revision on a revision's last event (the revision is whole), and
        # "<revision>.<n>" on an event before it: then the revision before is the last whole.
        number, dot, _ = whole[mark + 5 : whole.index(b"\n", mark + 5)].partition(b".")
        last = int(number) - 1 if dot else int(number)
        for revision in range(self.last + 1, last + 1):
            self.arrivals.setdefault(revision, array("d")).append(now)
        self.last = max(self.last, last)


@dataclass
class Outcome:
    writes: int
    watchers: int
    complete: int  # watchers that saw every write
    latencies_ms: list[float]
    client_lag_ms: float  # how late the watchers' loop ran behind its timers, at most
    server_cpu: float  # the watched server's share of a core while the writes went on
    client_cpu: float  # the watchers' (this process's)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def watch_while_writing(
    watch_port: int, watch_pid: int, write_port: int, watchers: int, rate: float, duration: float
) -> Outcome:
    since = revision_of(watch_port)
    arrivals: dict[int, array[float]] = {}
    loop = asyncio.get_running_loop()
    request = (
        b"GET /changes?since=%d HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
        % since
    )
    protocols = []
    for _ in range(watchers):
        _, protocol = await loop.create_connection(
            lambda: Watcher(request, since, arrivals), "127.0.0.1", watch_port
        )
        protocols.append(protocol)
    await asyncio.sleep(1.0)  # every stream open and idle
    lag = 0.0

    async def measure_lag() -> None:
        nonlocal lag
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            lag = max(lag, loop.time() - before - 0.01)

    lagging = asyncio.ensure_future(measure_lag())
    receiver, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    writer = multiprocessing.get_context("spawn").Process(
        target=write_at_rate, args=(write_port, rate, duration, sender)
    )
    began = time.monotonic()
    cpu = cpu_seconds(watch_pid), cpu_seconds(os.getpid())
    writer.start()
    acknowledged: list[tuple[int, float]] = await loop.run_in_executor(None, receiver.recv)
    writer.join()
    elapsed = time.monotonic() - began
    server_cpu = (cpu_seconds(watch_pid) - cpu[0]) / elapsed
    client_cpu = (cpu_seconds(os.getpid()) - cpu[1]) / elapsed
    final = acknowledged[-1][0]
    deadline = time.monotonic() + 30
    # A condition spread over every protocol: polled, rather than signalled by each.
    while min(protocol.last for protocol in protocols) < final and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    lagging.cancel()
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.close()
    latencies = []
    for revision, when in acknowledged:
        for arrived in arrivals.get(revision, ()):
            latencies.append(max(0.0, arrived - when) * 1000)
    complete = sum(
        protocol.events == len(acknowledged) and protocol.last == final for protocol in protocols
    )
    return Outcome(
        len(acknowledged), watchers, complete, latencies, lag * 1000, server_cpu, client_cpu
    )


def report(title: str, outcome: Outcome, extra: str = "") -> str:
    return (
        f"| {title} | {outcome.watchers:,} | {outcome.writes:,} | "
        f"{outcome.complete:,} of {outcome.watchers:,} | "
        f"{statistics.median(outcome.latencies_ms):.1f} | {outcome.percentile(0.99):.1f} | "
        f"{max(outcome.latencies_ms):.1f} | {outcome.server_cpu:.0%} | {outcome.client_cpu:.0%} "
        f"| {outcome.client_lag_ms:.1f} | {extra} |"
    )


# --- scenarios ------------------------------------------------------------------------------


def fanout(args: argparse.Namespace) -> str:
    with (
        tempfile.TemporaryDirectory(prefix="kv-watch-") as directory,
        server(Path(directory), pinned=True) as (port, pid),
    ):
        before = rss_mib(pid)
        outcome = asyncio.run(
            watch_while_writing(port, pid, port, args.watchers, args.rate, args.duration)
        )
        after = rss_mib(pid)
    return report("fanout: one process", outcome, f"{before:.0f} → {after:.0f} MiB")


def across(args: argparse.Namespace, store: str) -> str:
    with tempfile.TemporaryDirectory(prefix="kv-watch-") as directory:
        settings: dict[str, str] = {}
        cluster: Optional[PostgresCluster] = None
        if store == "postgres":
            bindir = server_binaries()
            if bindir is None:
                return "| replicas | PostgreSQL is not installed (apt-get install postgresql) |"
            cluster = PostgresCluster(bindir, durable=True)
            cluster.start()
            settings = {
                "KV_STORE": "postgres",
                "KV_POSTGRES_URL": cluster.url(cluster.create_database()),
            }
        try:
            pinned = store == "sqlite"
            with (
                server(Path(directory), pinned, **settings) as (write_port, _),
                server(Path(directory), pinned, **settings) as (watch_port, watch_pid),
            ):
                outcome = asyncio.run(
                    watch_while_writing(
                        watch_port,
                        watch_pid,
                        write_port,
                        args.cross_watchers,
                        args.rate,
                        args.duration,
                    )
                )
        finally:
            if cluster is not None:
                cluster.remove()
    title = (
        "workers: two processes on one sqlite file"
        if store == "sqlite"
        else "replicas: two on PostgreSQL"
    )
    return report(title, outcome)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="fanout,workers,replicas")
    parser.add_argument("--watchers", type=int, default=1000, help="streams in fanout")
    parser.add_argument("--cross-watchers", type=int, default=50, help="in workers, replicas")
    parser.add_argument("--rate", type=float, default=200.0, help="writes per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of writes")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("bench: needs two cores", file=sys.stderr)
        return 2
    _more_files()
    os.sched_setaffinity(0, {int(CLIENT_CORE)})
    rows = []
    for scenario in args.scenarios.split(","):
        if scenario == "fanout":
            rows.append(fanout(args))
        elif scenario == "workers":
            rows.append(across(args, "sqlite"))
        elif scenario == "replicas":
            rows.append(across(args, "postgres"))
        else:
            parser.error(f"unknown scenario {scenario}")
        print(rows[-1], flush=True)
    print(
        f"\n{args.rate:g} writes/s for {args.duration:g} s, one key each; latency from the "
        f"write's 200 to the event's arrival; Python {sys.version.split()[0]}.\n\n"
        "| scenario | watchers | writes | watchers that got every write | p50 ms | p99 ms | "
        "max ms | server CPU | watchers' CPU | watchers' lag ms | server RSS |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
