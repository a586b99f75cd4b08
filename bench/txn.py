"""POST /txn with one compare and one set against POST /set with If-Match, on one server.

The issue's bar: a transaction of one compare and one set reaches at least 0.8 of the rate of
a conditional /set. Both write a random key of the seeded ones with a 20-byte value only if it
exists (set_if_match.lua: If-Match: *; txn_set.lua: a compare on exists), so both always
write, and differ only in the endpoint.

Method: the service (defaults, sqlite store) is pinned to core 0, seeded from an input.db of
--keys keys; wrk (one thread, --connections) on core 1. The two scripts take turns, --rounds
times each, --seconds each; the table gives each one's median rate, p50 and p99, and the
server's CPU time per request (steadier than the rate on a shared machine), and the ratio of
the medians.

    python bench/txn.py
    python bench/txn.py --rounds 5 --seconds 10 --connections 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from data_api import start, stop  # noqa: E402
from make_input_db import write_input_db  # noqa: E402
from run import LOAD_CORE, WrkResult, free_port, missing_prerequisites, run_wrk  # noqa: E402

SCRIPTS = {
    "POST /set, If-Match: *": "set_if_match.lua",
    "POST /txn, 1 compare + 1 set": "txn_set.lua",
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    missing = missing_prerequisites([])
    if missing:
        print("bench: missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    results: dict[str, list[WrkResult]] = {name: [] for name in SCRIPTS}
    with tempfile.TemporaryDirectory(prefix="kv-bench-txn-") as directory:
        input_db = Path(directory) / "input.db"
        write_input_db(input_db, args.keys)
        port = free_port()
        process = start(input_db, str(Path(directory) / "data"), port)
        try:
            for _ in range(args.rounds):
                for name, script in SCRIPTS.items():
                    result = run_wrk(
                        port, script, args.seconds, args.connections, args.keys, process.pid
                    )
                    results[name].append(result)
                    print(
                        f"{name}: {result.requests_per_second:,.0f} req/s, "
                        f"{result.cpu_us:.0f} µs CPU/request, {result.errors} errors",
                        flush=True,
                    )
        finally:
            stop(process)
    lines = [
        "| endpoint | req/s (median) | p50 ms | p99 ms | server CPU µs/request | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(run.requests_per_second for run in runs)
        lines.append(
            f"| {name} | {medians[name]:,.0f} | {statistics.median(r.p50_ms for r in runs):.2f}"
            f" | {statistics.median(r.p99_ms for r in runs):.2f}"
            f" | {statistics.median(r.cpu_us for r in runs):.0f} | {sum(r.errors for r in runs)} |"
        )
    plain, txn = medians.values()
    print("\n".join(lines))
    print(f"\ntxn / set-with-If-Match rate: {txn / plain:.2f} (the issue's bar: 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
