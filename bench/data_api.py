"""The data API's figures: list pages at different store sizes, batches, and the expiry purge.

Method: the service (defaults, sqlite store) is pinned to core 0, seeded from an input.db of
--sizes keys each in turn; the client and wrk run on core 1.

- list: the median time of a 1000-key page (GET /keys?limit=1000), each from a random point
  of the key space (a cursor made from a random key), one request at a time; with and without
  values. The issue's bound: a page from 10,000,000 keys within 2x one from 1,000.
- batches: the median time of one POST /mget of 1000 keys, one POST /mset of 10,000 items
  and one POST /mdelete of 10,000 keys (at the smallest size).
- purge: with 1,000,000 keys, GET p99 over 5 s of random GETs (wrk -c64) on a quiet store;
  then 100,000 keys are written with a 1-second TTL, and once they have expired, GET p99 over
  the 5 s the purge runs in, and the seconds until the data file holds none of them.

    python bench/data_api.py                              # sizes 1,000 and 1,000,000
    python bench/data_api.py --sizes 1000,10000000 --out bench/data_api.md
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from make_input_db import write_input_db  # noqa: E402
from run import (  # noqa: E402
    LOAD_CORE,
    SERVER_CORE,
    free_port,
    kv_server,
    missing_prerequisites,
    run_wrk,
    wait_ready,
)

PAGE = 1000
SAMPLES = 200
EXPIRING = 100_000


class Client:
    """One keep-alive connection, pinned with the bench process to the load core."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def timed(self, method: str, path: str, document: Any = None) -> tuple[float, Any]:
        body = None if document is None else json.dumps(document).encode()
        started = time.perf_counter()
        self.connection.request(method, path, body=body)
        answer = self.connection.getresponse()
        data = answer.read()
        elapsed = (time.perf_counter() - started) * 1000
        assert answer.status == 200, data[:300]
        return elapsed, json.loads(data)


def cursor_after(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def start(input_db: Path, data_dir: str, port: int) -> subprocess.Popen[bytes]:
    server = kv_server("kv")
    values = {"port": str(port), "input_db": str(input_db), "data_dir": data_dir}
    env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
    env.update({key: value.format(**values) for key, value in server.env.items()})
    process = subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, *server.command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def list_pages(client: Client, size: int, values: bool) -> float:
    """Median ms of a full page: the first one of a store of PAGE keys, from a random cursor
    in a bigger store (keys sort as text, so ``key:{n}`` is followed by enough others)."""
    timings = []
    rng = random.Random(size)
    for _ in range(SAMPLES):
        query = f"/keys?limit={PAGE}&values={str(values).lower()}"
        if size > PAGE:
            query += f"&cursor={cursor_after(f'key:{rng.randrange(size // 2)}')}"
        elapsed, page = client.timed("GET", query)
        assert len(page["items"]) == min(PAGE, size), len(page["items"])
        timings.append(elapsed)
    return statistics.median(timings)


def batches(client: Client) -> dict[str, float]:
    keys = [f"key:{n}" for n in range(PAGE)]
    mget = statistics.median(client.timed("POST", "/mget", {"keys": keys})[0] for _ in range(20))
    items = [{"key": f"batch:{n}", "val": f"value {n}"} for n in range(10_000)]
    mset = statistics.median(client.timed("POST", "/mset", {"items": items})[0] for _ in range(5))
    names = [item["key"] for item in items]
    mdelete = client.timed("POST", "/mdelete", {"keys": names})[0]
    return {"mget 1000": mget, "mset 10000": mset, "mdelete 10000": mdelete}


def expiring_rows(data_path: Path) -> int:
    conn = sqlite3.connect(f"file:{data_path}?mode=ro", uri=True)
    try:
        return int(
            conn.execute("SELECT count(*) FROM kv WHERE expires_at IS NOT NULL").fetchone()[0]
        )
    finally:
        conn.close()


def purge(port: int, data_path: Path, rows: int) -> dict[str, float]:
    quiet = run_wrk(port, "get_random.lua", 5, 64, rows)
    client = Client(port)
    written = time.monotonic()
    for start_at in range(0, EXPIRING, 10_000):
        items = [
            {"key": f"ttl:{n}", "val": "x", "ttl": 1} for n in range(start_at, start_at + 10_000)
        ]
        client.timed("POST", "/mset", {"items": items})
    time.sleep(max(0.0, written + 1.0 - time.monotonic()))
    expired_at = time.monotonic()
    during = run_wrk(port, "get_random.lua", 5, 64, rows)
    while expiring_rows(data_path):
        time.sleep(0.1)
        if time.monotonic() - expired_at > 300:
            raise RuntimeError("expired rows still there after 5 minutes")
    return {
        "quiet p99 ms": quiet.p99_ms,
        "purging p99 ms": during.p99_ms,
        "p99 ratio": during.p99_ms / quiet.p99_ms,
        "seconds until purged": time.monotonic() - expired_at,
        "errors": float(quiet.errors + during.errors),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,1000000", help="keys in input.db, comma-separated")
    parser.add_argument("--purge-rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    missing = missing_prerequisites([])
    if missing:
        print("bench: missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    lines = ["| keys | 1000-key page ms | with values ms |", "| ---: | ---: | ---: |"]
    batch_figures: dict[str, float] = {}
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as directory:
        for size in sizes:
            input_db = Path(directory) / f"input-{size}.db"
            write_input_db(input_db, size)
            data_dir = Path(directory) / f"data-{size}"
            port = free_port()
            process = start(input_db, str(data_dir), port)
            try:
                client = Client(port)
                plain, with_values = list_pages(client, size, False), list_pages(client, size, True)
                lines.append(f"| {size:,} | {plain:.2f} | {with_values:.2f} |")
                print(lines[-1], flush=True)
                if size == sizes[0]:
                    batch_figures = batches(client)
            finally:
                stop(process)
        input_db = Path(directory) / "input-purge.db"
        write_input_db(input_db, args.purge_rows)
        data_dir = Path(directory) / "data-purge"
        port = free_port()
        process = start(input_db, str(data_dir), port)
        try:
            purge_figures = purge(port, data_dir / "kv.sqlite3", args.purge_rows)
        finally:
            stop(process)
    report = "\n".join(
        [
            f"List pages (median of {SAMPLES}, one request at a time):",
            "",
            *lines,
            "",
            "Batches (median ms of one request): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in batch_figures.items()),
            "",
            f"Purge of {EXPIRING:,} keys with a 1 s TTL beside {args.purge_rows:,} keys: "
            + ", ".join(f"{name} {value:.2f}" for name, value in purge_figures.items()),
        ]
    )
    print(f"\n{report}")
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
