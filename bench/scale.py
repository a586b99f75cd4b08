"""How the service behaves as the number of keys grows: start-up, memory, read rate.

For each size it writes an input.db (kept in --cache-dir between runs), starts the service
with a new data file pinned to core 0, and reports:
- seconds from process start until the port accepts a connection (seeding included);
- resident memory once it serves, and again after a wrk run of random GETs (core 1);
- GET /get requests/s over uniformly random seeded keys, and p99 latency.

    python bench/scale.py                          # 1,000 and 10,000,000 keys
    python bench/scale.py --sizes 1000,1000000 --duration 10

Needs wrk and taskset, like bench/run.py; the 10,000,000-key input.db takes about 400 MB.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from make_input_db import write_input_db  # noqa: E402
from run import SERVER_CORE, free_port, report_missing, run_wrk  # noqa: E402


def resident_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def port_open_seconds(port: int, process: subprocess.Popen[bytes], started: float) -> float:
    import socket

    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.005)


def measure(input_db: Path, keys: int, duration: int) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kv-scale-") as data_dir:
        env = {name: value for name, value in os.environ.items() if not name.startswith("KV_")}
        env.update(
            KV_PORT=str(port), KV_INPUT_DB=str(input_db), KV_DATA_PATH=f"{data_dir}/kv.sqlite3"
        )
        started = time.monotonic()
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "mapmg_data_engineer_takehome"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            opened = port_open_seconds(port, process, started)
            rss_ready = resident_mb(process.pid)
            result = run_wrk(port, "get_random.lua", duration, 64, keys)
            rss_after = resident_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return {
        "port_open_s": opened,
        "rss_ready_mb": rss_ready,
        "rss_after_mb": rss_after,
        "get_rps": result.requests_per_second,
        "get_p99_ms": result.p99_ms,
        "errors": result.errors,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000000", help="comma-separated key counts")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per size")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "kv-bench-inputs"
    )
    args = parser.parse_args(argv)
    if report_missing([]):
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for keys in (int(size) for size in args.sizes.split(",")):
        input_db = args.cache_dir / f"input-{keys}.db"
        if not input_db.exists():
            write_input_db(input_db, keys)
        result = measure(input_db, keys, args.duration)
        rows.append((keys, result))
        print(f"{keys:,} keys: {result}", flush=True)
    print(
        "\n| keys | port open after (s) | RSS serving (MB) | RSS after GETs (MB) | "
        "GET req/s | GET p99 ms | errors |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for keys, result in rows:
        print(
            f"| {keys:,} | {result['port_open_s']:.2f} | {result['rss_ready_mb']:.0f} | "
            f"{result['rss_after_mb']:.0f} | {result['get_rps']:,.0f} | "
            f"{result['get_p99_ms']:.2f} | {result['errors']:.0f} |"
        )
    if len(rows) > 1:
        smallest, largest = rows[0], rows[-1]
        ratio = largest[1]["get_rps"] / smallest[1]["get_rps"]
        print(f"\nGET rate with {largest[0]:,} keys / with {smallest[0]:,} keys: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
