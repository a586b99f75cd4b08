"""The cost of a scoped token: GETs with a store token against GETs with KV_AUTH_TOKEN alone.

One server (sqlite, seeded with --rows keys, KV_AUTH_TOKEN set) serves both: a store token
that may read ``key:`` is created in its data file before it starts. wrk (1 thread, 64
connections, pinned to core 1; the server to core 0) sends uniformly random GETs
(bench/get_random.lua) with one token, then the other, for --rounds rounds. Each round's ratio
is the scoped token's rate over the single token's, and the table shows their median (issue
27's bar: at least 0.97).

On a shared 2-core VM wrk's rates move by tens of percent from one minute to the next, and
the second of two identical runs was about 1% slower than the first. So the ratio is taken
within each round, whose two runs are seconds apart, and the rounds alternate which token
goes first. ``--same`` runs the single token against itself, to show what is noise.

``--instructions`` counts instead what the server executes per GET with each token, under
valgrind's callgrind (as bench/instructions.py does): a figure that does not move.

    python bench/access.py                       # 10 rounds of 5 s, 100,000 keys
    python bench/access.py --rounds 20 --duration 8
    python bench/access.py --same                # the single token against itself
    python bench/access.py --instructions        # 3,000 GETs with each token, under callgrind

It needs wrk and taskset on PATH, and two cores; --instructions needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import run  # noqa: E402
from instructions import CONNECTIONS, dumped_instructions, exchange  # noqa: E402
from make_input_db import write_input_db  # noqa: E402
from run import SERVER_CORE, WrkResult, free_port, stop, wait_ready  # noqa: E402

from mapmg_data_engineer_takehome.access import hash_secret, new_secret  # noqa: E402
from mapmg_data_engineer_takehome.store import SqliteStore  # noqa: E402
from mapmg_data_engineer_takehome.store.base import Token, TokenRule  # noqa: E402

# As long as a store token's secret, so that both requests are the same size.
BOOTSTRAP = "kv_bench-bootstrap-token-of-a-store-secret-s-length"[:46]


def create_token(data_path: Path) -> str:
    """A token that may read ``key:``, in the store at ``data_path``; its secret."""
    secret = new_secret()

    async def create() -> None:
        store = SqliteStore(data_path)
        try:
            rules = (TokenRule("key:", "read"),)
            now_ms = int(time.time() * 1000)
            await store.create_token(Token("bench", hash_secret(secret), rules, False, now_ms))
        finally:
            await store.close()

    asyncio.run(create())
    return secret


def run_wrk(port: int, secret: str, seconds: int, keys: int, pid: Optional[int]) -> WrkResult:
    header = f"Authorization: Bearer {secret}"
    return run.run_wrk(port, "get_random.lua", seconds, 64, keys, pid, headers=(header,))


def gets(count: int, rows: int, secret: str) -> list[bytes]:
    rng = random.Random(1)
    return [
        f"GET /get/key:{rng.randrange(rows)} HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {secret}\r\n\r\n".encode()
        for _ in range(count)
    ]


def count_instructions(root: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    """Instructions per GET with each token, the server under callgrind; prints the table."""
    port = int(env["KV_PORT"])
    process = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={root}/callgrind.out.%p",
            sys.executable, "-m", "mapmg_data_engineer_takehome",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    figures = {}
    try:
        wait_ready(port, process)
        secrets = {"KV_AUTH_TOKEN": BOOTSTRAP, "scoped token": create_token(root / "kv.sqlite3")}
        for secret in secrets.values():  # warm-up, and the scoped token's cache entry
            asyncio.run(exchange(port, gets(500, args.rows, secret)))
        for name, secret in secrets.items():
            before = set(root.glob("callgrind.out.*"))
            control = ["callgrind_control", "-z", str(process.pid)]
            subprocess.run(control, check=True, capture_output=True)
            asyncio.run(exchange(port, gets(args.requests, args.rows, secret)))
            control[1] = "-d"
            subprocess.run(control, check=True, capture_output=True)
            figures[name] = dumped_instructions(root, before) / args.requests
    finally:
        stop(process, timeout=120)  # valgrind takes its time
    print(
        f"callgrind, {args.requests:,} GETs with each token over {CONNECTIONS} connections, "
        f"{args.rows:,} keys, Python {sys.version.split()[0]}."
    )
    print()
    print("| token | instructions per GET |")
    print("| --- | ---: |")
    for name, figure in figures.items():
        print(f"| {name} | {figure:,.0f} |")
    single, scoped = figures.values()
    print()
    print(f"scoped / single: instructions per GET {scoped / single:.4f}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rows", type=int, default=100_000, help="keys seeded")
    parser.add_argument(
        "--same", action="store_true", help="the single token against itself (the noise)"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    parser.add_argument("--requests", type=int, default=3000, help="GETs per token, counted")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kv-bench-access-") as directory:
        root = Path(directory)
        input_db = root / "input.db"
        write_input_db(input_db, args.rows)
        data_path = root / "kv.sqlite3"
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
        env.update(
            KV_PORT=str(port),
            KV_INPUT_DB=str(input_db),
            KV_DATA_PATH=str(data_path),
            KV_AUTH_TOKEN=BOOTSTRAP,
            KV_LOG_LEVEL="warning",
        )
        if args.instructions:
            count_instructions(root, env, args)
            return 0
        command = [sys.executable, "-m", "mapmg_data_engineer_takehome"]
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, process)
            # A new token works at once: the server reads it on its first request with it.
            scoped = BOOTSTRAP if args.same else create_token(data_path)
            secrets = {"KV_AUTH_TOKEN": BOOTSTRAP, "scoped token": scoped}
            if args.same:
                secrets = {"KV_AUTH_TOKEN": BOOTSTRAP, "KV_AUTH_TOKEN again": BOOTSTRAP}
            for secret in secrets.values():  # warm-up, and the scoped token's cache entry
                run_wrk(port, secret, 2, args.rows, None)
            results: dict[str, list[WrkResult]] = {name: [] for name in secrets}
            for number in range(args.rounds):
                order = list(secrets.items())
                for name, secret in order if number % 2 == 0 else reversed(order):
                    result = run_wrk(port, secret, args.duration, args.rows, process.pid)
                    if result.errors:
                        raise RuntimeError(f"{name}: {result.errors} errors")
                    results[name].append(result)
        finally:
            stop(process)
    print(
        f"GET /get/<key>, {args.rows:,} keys, {args.rounds} rounds of {args.duration} s "
        f"with each token, Python {sys.version.split()[0]}: medians"
    )
    print()
    print("| token | requests/s | server CPU µs/request | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        rate = statistics.median(run.requests_per_second for run in runs)
        cpu = statistics.median(run.cpu_us for run in runs)
        p50 = statistics.median(run.p50_ms for run in runs)
        p99 = statistics.median(run.p99_ms for run in runs)
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} | {p50:.2f} | {p99:.2f} |")
    (first_name, single), (second_name, scoped_runs) = results.items()
    rate_ratios = [
        b.requests_per_second / a.requests_per_second for a, b in zip(single, scoped_runs)
    ]
    cpu_ratios = [b.cpu_us / a.cpu_us for a, b in zip(single, scoped_runs)]
    print()
    rate_ratio = statistics.median(rate_ratios)
    print(
        f"{second_name} / {first_name}, median of the rounds' ratios: rate {rate_ratio:.3f} "
        f"(rounds from {min(rate_ratios):.3f} to {max(rate_ratios):.3f}), CPU per request "
        f"{statistics.median(cpu_ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
