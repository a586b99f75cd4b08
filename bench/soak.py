"""Soak: 10 minutes of mixed reads and writes at 256 connections, watching errors and memory.

The service (defaults: sqlite store, normal durability) is seeded with --rows keys, pinned
to core 0, and driven by wrk on core 1 with bench/mixed.lua (80% GETs of random seeded keys,
20% POSTs over 100,000 keys) in back-to-back runs of --interval seconds, so that resident
memory can be read between them. It prints one line per run and a summary: requests, errors
(non-2xx and socket errors), and resident memory after warm-up and at the end.

    python bench/soak.py                       # 10 minutes, 256 connections
    python bench/soak.py --minutes 1 --connections 64

Needs wrk and taskset, like bench/run.py.
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
from run import LOAD_CORE, SERVER_CORE, free_port, parse_wrk, report_missing, wait_ready  # noqa: E402
from scale import resident_mb  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--interval", type=int, default=30, help="seconds per wrk run")
    parser.add_argument("--warm-up", type=int, default=60, help="seconds before the baseline")
    args = parser.parse_args(argv)
    if report_missing([]):
        return 2
    with tempfile.TemporaryDirectory(prefix="kv-soak-") as directory:
        input_db = Path(directory) / "input.db"
        write_input_db(input_db, args.rows)
        port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith("KV_")}
        env.update(
            KV_PORT=str(port),
            KV_INPUT_DB=str(input_db),
            KV_DATA_PATH=f"{directory}/data/kv.sqlite3",
            KV_BENCH_KEYS=str(args.rows),
        )
        server = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "mapmg_data_engineer_takehome"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, server)
            started = time.monotonic()
            baseline: Optional[float] = None
            requests = errors = 0
            peak = 0.0
            while time.monotonic() - started < args.minutes * 60:
                command = [
                    "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{args.connections}",
                    f"-d{args.interval}s", "--latency", "-s", str(BENCH / "mixed.lua"),
                    f"http://127.0.0.1:{port}",
                ]  # fmt: skip
                output = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                ).stdout
                result = parse_wrk(output)
                done = int(output.split(" requests in ")[0].split()[-1])
                requests += done
                errors += result.errors
                rss = resident_mb(server.pid)
                peak = max(peak, rss)
                elapsed = time.monotonic() - started
                if baseline is None and elapsed >= args.warm_up:
                    baseline = rss
                print(
                    f"{elapsed:6.0f} s: {result.requests_per_second:8,.0f} req/s, p99 "
                    f"{result.p99_ms:6.2f} ms, errors {result.errors}, RSS {rss:6.1f} MB",
                    flush=True,
                )
            final = resident_mb(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(timeout=60)
    print(
        f"\n{args.minutes:g} min at {args.connections} connections: {requests:,} requests, "
        f"{errors} errors; RSS after warm-up {baseline or 0:.1f} MB, at the end {final:.1f} MB "
        f"(change {final - (baseline or final):+.1f} MB, peak {peak:.1f} MB); "
        f"server exit status {exit_code}"
    )
    return 0 if errors == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
