"""What a connection pooler costs: GET and POST /set rates of one server on PostgreSQL, reached
directly or through PgBouncer.

The contenders, each one server (KV_WORKERS=1) on one PostgreSQL cluster:
  direct               KV_POSTGRES_URL straight to PostgreSQL (KV_POSTGRES_POOLER=none)
  direct-pooler-mode   the same with KV_POSTGRES_POOLER=transaction: the pooler-safe mode's
                       own cost (no statement kept prepared, watchers polling)
  pgbouncer-txn        through PgBouncer, pool_mode = transaction, KV_POSTGRES_POOLER=transaction
  pgbouncer-session    through PgBouncer, pool_mode = session, KV_POSTGRES_POOLER=none

Method: bench/run.py's. The server is pinned to core 0 and wrk (1 thread, 64 connections) to
core 1; PostgreSQL (fsync on) and PgBouncer run unpinned, competing for both. Every run is a
fresh database seeded from the same input.db of --rows keys; after a 2 s warm-up, GETs ask for
uniformly random seeded keys (bench/get_random.lua) and POSTs write 100,000 keys
(bench/set_random.lua). The contenders alternate A B C D A B C D ... for --rounds rounds; the
table shows each one's median and its ratio to the direct connection's. The load average
(/proc/loadavg) is printed before and after: on a shared machine, compare a run's rows with
each other, not with another run's. Beside the rates, the CPU time per request of the whole
path, and of its parts: the server + PgBouncer + every PostgreSQL process. Unlike a rate, CPU
time moves little with what the machine's neighbours take.

    python bench/pooler.py                     # 3 rounds of 10 s, 100,000 keys
    python bench/pooler.py --rounds 5 --duration 15

It needs wrk, taskset, PostgreSQL's server binaries and PgBouncer (Debian: apt-get install wrk
postgresql pgbouncer); it says what is missing and installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from make_input_db import write_input_db  # noqa: E402
from run import (  # noqa: E402
    SERVER_CORE,
    WrkResult,
    cpu_seconds,
    kv_server,
    median_result,
    missing_prerequisites,
    ratio,
    run_wrk,
    stop,
    wait_ready,
)

sys.path.insert(0, str(BENCH.parent))
from tests.kv.e2e_support import free_port  # noqa: E402
from tests.kv.postgres_support import (  # noqa: E402
    PgBouncer,
    PostgresCluster,
    pgbouncer_binary,
    server_binaries,
)

# name: (what it is, how it reaches PostgreSQL: "direct" or PgBouncer's pool_mode, and
# KV_POSTGRES_POOLER, "pooler" in the table)
CONTENDERS = {
    "direct": ("direct, pooler=none", "direct", "none"),
    "direct-pooler-mode": ("direct, pooler=transaction", "direct", "transaction"),
    "pgbouncer-txn": ("PgBouncer transaction, pooler=transaction", "transaction", "transaction"),
    "pgbouncer-session": ("PgBouncer session, pooler=none", "session", "none"),
}
BASELINE = "direct"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Run:
    """One contender's GET or POST run: wrk's figures (with the server's CPU per request), and
    PgBouncer's and PostgreSQL's CPU per request."""

    wrk: WrkResult
    bouncer_cpu_us: float
    postgres_cpu_us: float

    @property
    def path_cpu_us(self) -> float:
        """The CPU per request of the whole path: the server, PgBouncer and PostgreSQL."""
        return self.wrk.cpu_us + self.bouncer_cpu_us + self.postgres_cpu_us


def cpu_of(pids: list[int]) -> float:
    """CPU time of these processes and of the children they have reaped (the postmaster's
    backends: one that ends between two readings still counts once)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend that ended meanwhile
            total += cpu_seconds(pid)
    return total


def others_cpu_seconds(
    postgres: PostgresCluster, bouncer: Optional[PgBouncer]
) -> tuple[float, float]:
    """CPU time of PgBouncer (0 without one) and of every PostgreSQL process."""
    bouncer_pids = [] if bouncer is None or bouncer.process is None else [bouncer.process.pid]
    return cpu_of(bouncer_pids), cpu_of(postgres.processes())


def measure(
    postgres: PostgresCluster,
    bouncer: Optional[PgBouncer],
    pooler: str,
    input_db: Path,
    args: argparse.Namespace,
) -> dict[str, Run]:
    """One server on a fresh database, through ``bouncer`` or straight to ``postgres``: its GET
    and POST runs, after a warm-up."""
    database = postgres.create_database()
    url = (postgres if bouncer is None else bouncer).url(database)
    port = free_port()
    server = kv_server("", KV_STORE="postgres")
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as data_dir:
        values = {"port": str(port), "input_db": str(input_db), "data_dir": data_dir}
        env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
        env.update({key: value.format(**values) for key, value in server.env.items()})
        env.update(KV_POSTGRES_URL=url, KV_POSTGRES_POOLER=pooler)
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *server.command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, process)
            run_wrk(port, "get_random.lua", 2, args.connections, args.rows)  # warm-up
            runs = {}
            for kind, script in (("get", "get_random.lua"), ("set", "set_random.lua")):
                before = others_cpu_seconds(postgres, bouncer)
                result = run_wrk(
                    port, script, args.duration, args.connections, args.rows, process.pid
                )
                after = others_cpu_seconds(postgres, bouncer)
                per_request = 1e6 / max(result.requests, 1)
                bouncer_us, postgres_us = ((b - a) * per_request for a, b in zip(before, after))
                runs[kind] = Run(result, bouncer_us, postgres_us)
            return runs
        finally:
            stop(process)


def median_run(runs: list[Run]) -> Run:
    return Run(
        median_result([run.wrk for run in runs]),
        statistics.median(run.bouncer_cpu_us for run in runs),
        statistics.median(run.postgres_cpu_us for run in runs),
    )


def cpu_cell(run: Run) -> str:
    """The whole path's CPU per request (server + PgBouncer + PostgreSQL)."""
    parts = (run.wrk.cpu_us, run.bouncer_cpu_us, run.postgres_cpu_us)
    return f"{run.path_cpu_us:.0f} ({' + '.join(f'{part:.0f}' for part in parts)})"


def render(medians: dict[str, dict[str, Run]]) -> str:
    """The figures, then each one's ratio to the direct connection's."""
    lines = [
        "| connection | GET req/s | GET p99 ms | GET CPU µs | POST req/s | POST p99 ms "
        "| POST CPU µs | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in medians.items():
        get, post = result["get"], result["set"]
        lines.append(
            f"| {CONTENDERS[name][0]} | {get.wrk.requests_per_second:,.0f} | "
            f"{get.wrk.p99_ms:.2f} | {cpu_cell(get)} | {post.wrk.requests_per_second:,.0f} | "
            f"{post.wrk.p99_ms:.2f} | {cpu_cell(post)} | {get.wrk.errors + post.wrk.errors} |"
        )
    base = medians.get(BASELINE)
    if base is None:
        return "\n".join(lines)
    lines += [
        "",
        f"| ÷ {CONTENDERS[BASELINE][0]} | GET req/s | GET p99 | GET CPU all | POST req/s "
        "| POST p99 | POST CPU all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in medians.items():
        cells = []
        for kind in ("get", "set"):
            ours, theirs = result[kind], base[kind]
            cells += [
                ratio(ours.wrk.requests_per_second, theirs.wrk.requests_per_second),
                ratio(ours.wrk.p99_ms, theirs.wrk.p99_ms),
                ratio(ours.path_cpu_us, theirs.path_cpu_us),
            ]
        lines.append(f"| {CONTENDERS[name][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rows", type=int, default=100_000, help="keys in input.db")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args(argv)
    chosen = args.contenders.split(",")
    missing = missing_prerequisites([])
    bindir = server_binaries()
    if bindir is None:
        missing.append("PostgreSQL (apt-get install postgresql)")
    if pgbouncer_binary() is None:
        missing.append("PgBouncer (apt-get install pgbouncer)")
    if missing or bindir is None:
        print("bench: missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    # The tests' throwaway cluster, with fsync on: a commit here is a commit.
    cluster = PostgresCluster(bindir, durable=True)
    bouncers: dict[str, PgBouncer] = {}
    try:
        cluster.start()
        for mode in ("transaction", "session"):
            bouncers[mode] = PgBouncer(cluster, mode)
            bouncers[mode].start()
        return run_rounds(chosen, cluster, bouncers, args)
    finally:
        for bouncer in bouncers.values():
            bouncer.remove()
        cluster.remove()


def run_rounds(
    chosen: list[str],
    cluster: PostgresCluster,
    bouncers: dict[str, PgBouncer],
    args: argparse.Namespace,
) -> int:
    print(f"load average before: {load_average()}", flush=True)
    runs: dict[str, list[dict[str, Run]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="kv-bench-input-") as directory:
        input_db = Path(directory) / "input.db"
        write_input_db(input_db, args.rows)
        for round_number in range(1, args.rounds + 1):
            for name in chosen:
                _, route, pooler = CONTENDERS[name]
                bouncer = None if route == "direct" else bouncers[route]
                result = measure(cluster, bouncer, pooler, input_db, args)
                runs[name].append(result)
                get, post = result["get"].wrk, result["set"].wrk
                print(
                    f"round {round_number} {name}: GET {get.requests_per_second:,.0f}/s "
                    f"p99 {get.p99_ms:.1f} ms, POST {post.requests_per_second:,.0f}/s "
                    f"p99 {post.p99_ms:.1f} ms; load average {load_average()}",
                    flush=True,
                )
    medians = {
        name: {kind: median_run([run[kind] for run in results]) for kind in ("get", "set")}
        for name, results in runs.items()
    }
    print(
        f"\n{args.rounds} rounds of {args.duration} s, {args.rows:,} keys, wrk -t1 "
        f"-c{args.connections}, server on core {SERVER_CORE}, PostgreSQL (fsync on) and "
        f"PgBouncer unpinned; medians. Python {sys.version.split()[0]}, {os.cpu_count()} "
        f"cores. Load average after: {load_average()}.\n\n{render(medians)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
