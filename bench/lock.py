"""How long a lock takes: an uncontended acquire and release through the blocking Client and
the AsyncClient, and the handover from one owner to the next waiting for it, against one
server of this tree (bench/watch.py's server(): sqlite, defaults, pinned to core 0; this
process on core 1), on loopback.

    python bench/lock.py                   # 1,000 of each
    python bench/lock.py --times 5000

An acquire is three requests (grant a lease, set the owner's key under it, list the owners)
and a release one (revoke the lease); the keep-alive runs beside them. The issue's bar: an
uncontended acquire and release takes 5 ms or less at p50. The handover is the time from a
release to the moment the next owner, waiting on the change feed, holds the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from mapmg_data_engineer_takehome.client import AsyncClient, Client

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import watch  # noqa: E402

CLIENT_CORE = 1


def blocking(url: str, times: int) -> list[float]:
    took = []
    with Client(url) as kv:
        for _ in range(times):
            start = time.perf_counter()
            with kv.lock("bench/lock"):
                pass
            took.append(time.perf_counter() - start)
    return took


async def in_asyncio(url: str, times: int) -> list[float]:
    took = []
    async with AsyncClient(url) as kv:
        for _ in range(times):
            start = time.perf_counter()
            async with kv.lock("bench/lock"):
                pass
            took.append(time.perf_counter() - start)
    return took


def handovers(url: str, times: int) -> list[float]:
    """Two threads take the lock in turns, each holding it for 5 ms, time for the other to
    queue behind it: each release is timed to the other's acquire."""
    last_release: list[tuple[str, float]] = []
    took: list[float] = []

    def owner(name: str) -> None:
        with Client(url) as kv:
            for _ in range(times // 2):
                lock = kv.lock("bench/handover")
                lock.acquire()
                acquired = time.perf_counter()
                if last_release and last_release[-1][0] != name:
                    took.append(acquired - last_release[-1][1])
                time.sleep(0.005)
                last_release.append((name, time.perf_counter()))
                lock.release()

    threads = [threading.Thread(target=owner, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return took


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--times", type=int, default=1000, help="locks taken of each kind")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="kv-lock-") as directory,
        watch.server(Path(directory), pinned=True) as (port, _),
    ):
        url = f"http://127.0.0.1:{port}"
        os.sched_setaffinity(0, {CLIENT_CORE})
        blocking(url, 200)  # the server warms up
        results = {
            "Client.lock": blocking(url, args.times),
            "AsyncClient.lock": asyncio.run(in_asyncio(url, args.times)),
            "handover": handovers(url, args.times),
        }
    print(f"{args.times} of each, on core {CLIENT_CORE}; server (sqlite) on core 0")
    print(f"{'':<18} {'p50':>8} {'p90':>8} {'p99':>8}")
    for name, times in results.items():
        cuts = statistics.quantiles(times, n=100)
        print(
            f"{name:<18} {statistics.median(times) * 1e3:5.2f} ms"
            f" {cuts[89] * 1e3:5.2f} ms {cuts[98] * 1e3:5.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
