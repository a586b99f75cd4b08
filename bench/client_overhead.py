"""What the Python client adds to a request: sequential GETs and SETs of one key through a bare
aiohttp ClientSession, the AsyncClient and the blocking Client, each on one kept-alive
connection, against one server of this tree (bench/watch.py's server(), pinned to core 0;
this process on core 1).

    python bench/client_overhead.py                  # 3,000 requests of each
    python bench/client_overhead.py --requests 10000

Prints the mean and the median time of one request, and the mean's excess over aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable, Optional

import aiohttp

from mapmg_data_engineer_takehome.client import AsyncClient, Client

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import watch  # noqa: E402

CLIENT_CORE = 1
KEY, VALUE = "bench/overhead", "x" * 100


def timed(call: Callable[[], object], requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


async def timed_async(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return times


async def aiohttp_times(url: str, requests: int) -> dict[str, list[float]]:
    async with aiohttp.ClientSession(url) as session:

        async def get() -> None:
            async with session.get(f"/get/{KEY}") as response:
                assert response.status == 200
                await response.json()

        async def set_() -> None:
            async with session.post("/set", json={"key": KEY, "val": VALUE}) as response:
                assert response.status == 200
                await response.json()

        return {
            "GET": await timed_async(get, requests),
            "SET": await timed_async(set_, requests),
        }


async def async_client_times(url: str, requests: int) -> dict[str, list[float]]:
    async with AsyncClient(url) as kv:
        return {
            "GET": await timed_async(lambda: kv.get(KEY), requests),
            "SET": await timed_async(lambda: kv.set(KEY, VALUE), requests),
        }


def client_times(url: str, requests: int) -> dict[str, list[float]]:
    with Client(url) as kv:
        return {
            "GET": timed(lambda: kv.get(KEY), requests),
            "SET": timed(lambda: kv.set(KEY, VALUE), requests),
        }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000, help="requests of each kind")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="kv-client-") as directory,
        watch.server(Path(directory), pinned=True) as (port, _),
    ):
        url = f"http://127.0.0.1:{port}"
        os.sched_setaffinity(0, {CLIENT_CORE})
        with Client(url) as kv:  # the key exists, and the server has warmed up
            for _ in range(500):
                kv.set(KEY, VALUE)
                kv.get(KEY)
        results = {
            "aiohttp.ClientSession": asyncio.run(aiohttp_times(url, args.requests)),
            "client.AsyncClient": asyncio.run(async_client_times(url, args.requests)),
            "client.Client": client_times(url, args.requests),
        }
    print(f"{args.requests} sequential requests of each, on core {CLIENT_CORE}; server on core 0")
    print(f"{'client':<24} {'request':<8} {'mean':>9} {'median':>9} {'excess':>9}")
    for name, kinds in results.items():
        for kind, times in kinds.items():
            mean = statistics.mean(times)
            median = statistics.median(times)
            excess = mean - statistics.mean(results["aiohttp.ClientSession"][kind])
            print(
                f"{name:<24} {kind:<8} {mean * 1e6:6.0f} µs {median * 1e6:6.0f} µs"
                f" {excess * 1e6:+6.0f} µs"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
