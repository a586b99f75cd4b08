"""Export and import: how long they take, what they cost the server, and what they do to others.

Every server is one process of this tree pinned to core 0 (as a container with one CPU runs
it); the clients (this script, wrk) run on core 1. With --rows keys (1,000,000 by default,
the rows of bench/make_input_db.py, about 50 MB of NDJSON):

- export: GET /export of a seeded sqlite server, read as fast as it comes; seconds, and the
  server's peak RSS growth (sampled every 20 ms);
- import: that export POSTed to a server on a new sqlite file, and to one on a new PostgreSQL
  database (a throwaway cluster, when PostgreSQL's binaries are installed); the same;
- GET p99: wrk GETs random seeded keys for --seconds, on a quiet server, then while exports
  run one after another; the p99 of each, and their ratio;
- WAL (--wal-rows, 0 to skip): a server seeded with that many rows exports them while wrk
  POSTs as fast as it can; the sqlite WAL's largest size meanwhile, and its size once the
  writes have gone on for 10 s after the export ended.

    python bench/bulk.py                                # 1,000,000 rows, no WAL run
    python bench/bulk.py --rows 1000000 --wal-rows 10000000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import watch  # noqa: E402
from make_input_db import write_input_db  # noqa: E402
from run import LOAD_CORE, parse_wrk, rss_mib  # noqa: E402

from tests.kv.postgres_support import PostgresCluster, server_binaries  # noqa: E402


@contextmanager
def server(directory: Path, **settings: str) -> Iterator[tuple[int, int]]:
    """A server of this tree on core 0, with its data in ``directory``: (port, pid)."""
    with watch.server(directory, True, KV_MAX_IMPORT_BYTES=str(8 << 30), **settings) as running:
        yield running


@contextmanager
def sampling(read: Callable[[], float], interval: float) -> Iterator[list[float]]:
    """Calls ``read`` every ``interval`` seconds on a thread until the block ends; the list
    it yields holds the largest value read (one, updated)."""
    peak = [read()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(interval)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def timed_with_peak_rss(pid: int, work: Callable[[], bytes]) -> tuple[float, float, bytes]:
    """Seconds ``work`` takes, the server's peak RSS growth meanwhile (MiB), its result."""
    before = rss_mib(pid)
    with sampling(lambda: rss_mib(pid), 0.02) as peak:
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
    return seconds, peak[0] - before, result


def export(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/export", timeout=600) as answer:
        return bytes(answer.read())


def import_(port: int, body: bytes) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/import", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=600) as answer:
        return bytes(answer.read())


def wrk(port: int, script: str, seconds: int, keys: int) -> str:
    command = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c16", f"-d{seconds}s", "--latency",
        "-s", str(BENCH / script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    env = {**os.environ, "KV_BENCH_KEYS": str(keys)}
    return subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout


def exports_meanwhile(port: int, running: threading.Event) -> threading.Thread:
    """Exports one after another, on core 1, until ``running`` is cleared."""

    def loop() -> None:
        os.sched_setaffinity(0, {int(LOAD_CORE)})
        while running.is_set():
            export(port)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def wal_mib(directory: Path) -> float:
    path = directory / "kv.sqlite3-wal"
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=10, help="of each wrk run")
    parser.add_argument("--wal-rows", type=int, default=0, help="rows of the WAL run; 0: none")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    with tempfile.TemporaryDirectory(prefix="kv-bulk-") as temporary:
        root = Path(temporary)
        input_db = root / "input.db"
        write_input_db(input_db, args.rows)
        (root / "seeded").mkdir()
        with server(root / "seeded", KV_INPUT_DB=str(input_db)) as (port, pid):
            seconds, grown, body = timed_with_peak_rss(pid, lambda: export(port))
            print(f"export of {args.rows:,} keys ({len(body) / 1e6:.1f} MB): {seconds:.2f} s, "
                  f"server RSS +{grown:.1f} MiB")  # fmt: skip
            quiet = parse_wrk(wrk(port, "get_random.lua", args.seconds, args.rows))
            running = threading.Event()
            running.set()
            exporting = exports_meanwhile(port, running)
            try:
                busy = parse_wrk(wrk(port, "get_random.lua", args.seconds, args.rows))
            finally:
                running.clear()
                exporting.join()
            print(f"GET p99: quiet {quiet.p99_ms:.2f} ms "
                  f"({quiet.requests_per_second:,.0f} req/s), during exports "
                  f"{busy.p99_ms:.2f} ms ({busy.requests_per_second:,.0f} req/s): "
                  f"{busy.p99_ms / quiet.p99_ms:.2f}x")  # fmt: skip
        (root / "imported").mkdir()
        with server(root / "imported") as (port, pid):
            seconds, grown, answer = timed_with_peak_rss(pid, lambda: import_(port, body))
            print(f"import into sqlite: {seconds:.2f} s, server RSS +{grown:.1f} MiB: "
                  f"{answer.decode()}")  # fmt: skip
        bindir = server_binaries()
        if bindir is None:
            print("import into PostgreSQL: skipped (no PostgreSQL binaries)")
        else:
            cluster = PostgresCluster(bindir, durable=True)
            cluster.start()
            try:
                (root / "postgres").mkdir()
                database = cluster.url(cluster.create_database())
                with server(root / "postgres", KV_STORE="postgres", KV_POSTGRES_URL=database) as (
                    port,
                    pid,
                ):
                    seconds, grown, answer = timed_with_peak_rss(pid, lambda: import_(port, body))
                    print(f"import into PostgreSQL: {seconds:.2f} s, server RSS "
                          f"+{grown:.1f} MiB: {answer.decode()}")  # fmt: skip
            finally:
                cluster.remove()
        if args.wal_rows:
            measure_wal(root, args.wal_rows)
    return 0


def measure_wal(root: Path, rows: int) -> None:
    input_db = root / "wal-input.db"
    write_input_db(input_db, rows)
    directory = root / "wal"
    directory.mkdir()
    with server(directory, KV_INPUT_DB=str(input_db)) as (port, _):
        before = wal_mib(directory)
        command = [
            "taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c16", "-d3600s",
            "-s", str(BENCH / "set_random.lua"), f"http://127.0.0.1:{port}",
        ]  # fmt: skip
        writing = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "KV_BENCH_WRITE_KEYS": str(rows)},
        )
        try:
            with sampling(lambda: wal_mib(directory), 0.05) as peak:
                time.sleep(2)
                started = time.perf_counter()
                size = len(export(port))
                seconds = time.perf_counter() - started
                time.sleep(10)
                after = wal_mib(directory)
        finally:
            writing.terminate()
            writing.wait()
        print(f"WAL during an export of {rows:,} keys ({size / 1e6:.0f} MB, {seconds:.1f} s) "
              f"under writes: {before:.1f} MiB before, {peak[0]:.1f} MiB at most, {after:.1f} "
              "MiB 10 s after it ended")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
