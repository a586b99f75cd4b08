"""Time seeding and server start-up for one input.db.

Measures, each in a fresh temporary directory:
- ``seed_store`` into a new SqliteStore (default durability, "normal") and into a MemoryStore;
- ``python -m mapmg_data_engineer_takehome`` from process start until its port accepts a TCP
  connection, with a new data file (the seed is applied), and again on the same data file
  (the seed is unchanged, so only its fingerprint is computed).

Run from the repository root with the project installed (``pip install -e .``):

    python bench/seed_time.py                      # generates 1,000,000 rows in a temp dir
    python bench/seed_time.py --rows 100000
    python bench/seed_time.py path/to/input.db --repeat 3

With ``--repeat`` each measurement runs that many times and the fastest is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Callable, Optional

import structlog
from make_input_db import DEFAULT_ROWS, write_input_db

from mapmg_data_engineer_takehome.seed import seed_store
from mapmg_data_engineer_takehome.store import MemoryStore, SqliteStore, Store
from mapmg_data_engineer_takehome.store.postgres import PostgresStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kv.postgres_support import PostgresCluster, server_binaries

POLL_SECONDS = 0.01
START_TIMEOUT_SECONDS = 300.0


def _seed_seconds(make_store: Callable[[Path], Awaitable[Store]], input_db: Path) -> float:
    """Seconds ``seed_store`` takes to apply ``input_db`` to a store made in a fresh dir."""

    async def run(directory: Path) -> float:
        store = await make_store(directory)
        try:
            started = time.perf_counter()
            report = await seed_store(store, input_db)
            seconds = time.perf_counter() - started
            if not report.applied:
                raise RuntimeError("the seed was not applied to a fresh store")
            return seconds
        finally:
            await store.close()

    with tempfile.TemporaryDirectory(prefix="kv-bench-") as directory:
        return asyncio.run(run(Path(directory)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=POLL_SECONDS):
            return True
    except OSError:
        return False


def _server_start_seconds(input_db: Path, data_path: Path, log_path: Path) -> float:
    """Seconds from starting the server process until its port accepts a connection."""
    port = _free_port()
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("KV_") and name != "PORT"
    }
    environ.update(
        KV_INPUT_DB=str(input_db),
        KV_DATA_PATH=str(data_path),
        KV_PORT=str(port),
        KV_LOG_FORMAT="json",
    )
    with log_path.open("ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "mapmg_data_engineer_takehome"],
            env=environ,
            cwd=str(log_path.parent),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while not _accepts(port):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with status {process.returncode} before "
                        f"listening:\n{log_path.read_text(errors='replace')}"
                    )
                if time.perf_counter() - started > START_TIMEOUT_SECONDS:
                    raise RuntimeError(
                        f"the server did not listen within {START_TIMEOUT_SECONDS} s"
                    )
                time.sleep(POLL_SECONDS)
            seconds = time.perf_counter() - started
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                status = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise RuntimeError("the server did not stop within 60 s of SIGTERM") from None
    if status != 0:
        raise RuntimeError(f"the server exited with status {status} after SIGTERM")
    return seconds


def _server_seconds(input_db: Path) -> tuple[float, float]:
    """Start-up seconds with a new data file, then again on the data file it left."""
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as directory:
        data_path = Path(directory) / "data" / "kv.sqlite3"
        log_path = Path(directory) / "server.log"
        fresh = _server_start_seconds(input_db, data_path, log_path)
        unchanged = _server_start_seconds(input_db, data_path, log_path)
        return fresh, unchanged


def _row_count(input_db: Path) -> int:
    conn = sqlite3.connect(f"file:{input_db.resolve()}?mode=ro&immutable=1", uri=True)
    try:
        return int(conn.execute("select count(*) from keys").fetchone()[0])
    finally:
        conn.close()


def measure(input_db: Path, repeat: int) -> list[tuple[str, float]]:
    """Each measurement's fastest time over ``repeat`` runs, as (label, seconds)."""
    sqlite_seeds: list[float] = []
    memory_seeds: list[float] = []
    fresh_starts: list[float] = []
    unchanged_starts: list[float] = []
    postgres_seeds: list[float] = []

    async def sqlite_store(directory: Path) -> Store:
        return SqliteStore(directory / "kv.sqlite3")

    async def memory_store(directory: Path) -> Store:
        return MemoryStore()

    bindir = server_binaries()
    cluster = None if bindir is None else PostgresCluster(bindir, durable=True)
    try:
        if cluster is not None:
            cluster.start()

        async def postgres_store(directory: Path) -> Store:
            assert cluster is not None
            return await PostgresStore.open(cluster.url(cluster.create_database()))

        for _ in range(repeat):
            sqlite_seeds.append(_seed_seconds(sqlite_store, input_db))
            memory_seeds.append(_seed_seconds(memory_store, input_db))
            if cluster is not None:
                postgres_seeds.append(_seed_seconds(postgres_store, input_db))
            fresh, unchanged = _server_seconds(input_db)
            fresh_starts.append(fresh)
            unchanged_starts.append(unchanged)
    finally:
        if cluster is not None:
            cluster.remove()
    results = [
        ("seed_store -> SqliteStore (durability=normal)", min(sqlite_seeds)),
        ("seed_store -> MemoryStore", min(memory_seeds)),
        ("server start -> port open (new data file)", min(fresh_starts)),
        ("server restart -> port open (seed unchanged)", min(unchanged_starts)),
    ]
    if postgres_seeds:  # PostgreSQL's server binaries were found
        results.insert(2, ("seed_store -> PostgresStore (COPY, local server)", min(postgres_seeds)))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "input_db", nargs="?", type=Path, help="input.db to measure (default: generate one)"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_ROWS,
        help=f"rows of the generated input.db (default {DEFAULT_ROWS:,})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    # The seed's own log lines would interleave with the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="kv-bench-input-") as directory:
        input_db: Path = args.input_db
        if input_db is None:
            input_db = Path(directory) / "input.db"
            write_input_db(input_db, args.rows)
        elif not input_db.is_file():
            print(f"error: {input_db} does not exist", file=sys.stderr)
            return 1
        input_db = input_db.resolve()
        rows = _row_count(input_db)
        size = input_db.stat().st_size / 2**20
        results = measure(input_db, args.repeat)
    print(f"input.db: {input_db} ({rows:,} rows, {size:.1f} MiB)")
    print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, repeat {args.repeat}")
    width = max(len(label) for label, _ in results)
    print(f"{'measurement':<{width}}  {'seconds':>8}  {'rows/s':>10}")
    for label, seconds in results:
        rate = f"{rows / seconds:,.0f}" if label.startswith("seed_store") and seconds else ""
        print(f"{label:<{width}}  {seconds:>8.3f}  {rate:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
