"""Throughput and latency of the service against the floor and the FastAPI reference.

Method (see docs/performance.md): the server under test is pinned to core 0 and
wrk (1 thread, 64 connections) to core 1; the servers alternate A B C A B C ... for --rounds
rounds and the table shows each one's median. Every server is seeded with the same input.db of
--rows keys; GETs ask for uniformly random seeded keys (bench/get_random.lua), POSTs write JSON
bodies spread over 100,000 keys (bench/set_random.lua).

    python bench/run.py                      # 3 rounds, 10 s per run, 1,000,000 keys
    python bench/run.py --rounds 5 --duration 15 --out bench/results.md
    python bench/run.py --servers kv-baseline,kv --baseline v1.0.0   # before and after
    python bench/run.py --servers kv-postgres-baseline,kv-postgres --baseline REF

``--baseline REF`` adds the contenders kv-baseline and kv-postgres-baseline: this service as it
was at git REF, checked out into a temporary worktree, so that a change is measured against its
parent in one run.

It needs wrk and taskset on PATH, two or more cores, and for the references the packages in
bench/requirements.txt; it says what is missing and installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from make_input_db import write_input_db  # noqa: E402

sys.path.insert(0, str(BENCH.parent))
from tests.kv.postgres_support import PostgresCluster, server_binaries  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
READY_TIMEOUT = 120.0
_LATENCY_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class Server:
    """How to start one contender; ``{port}`` and ``{input_db}`` are filled in."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    cwd: Optional[str] = None  # python -m imports the package from here first


def kv_server(name: str, **settings: str) -> Server:
    """This service, seeded from the bench's input.db into a fresh data file, plus ``settings``."""
    env = {
        "KV_PORT": "{port}",
        "KV_INPUT_DB": "{input_db}",
        "KV_DATA_PATH": "{data_dir}/kv.sqlite3",
        **settings,
    }
    return Server(name, [sys.executable, "-m", "mapmg_data_engineer_takehome"], env=env)


def contenders(workers: int, baseline: Optional[tuple[str, Path]] = None) -> dict[str, Server]:
    python = sys.executable
    extra = {}
    if baseline is not None:
        ref, worktree = baseline
        for name, settings in (
            ("kv-baseline", {}),
            ("kv-postgres-baseline", {"KV_STORE": "postgres", "KV_POSTGRES_URL": "{postgres_url}"}),
        ):
            start = kv_server("", **settings)
            store = " on PostgreSQL" if settings else ""
            extra[name] = Server(
                f"kv{store} at {ref} (baseline)", start.command, start.env, cwd=str(worktree)
            )
    return {
        **extra,
        "floor": Server(
            "floor (aiohttp + uvloop + dict)",
            [python, str(BENCH / "floor_app.py"), "--port", "{port}", "--input-db", "{input_db}"],
            needs=("uvloop",),
        ),
        "kv": kv_server("kv (this service, defaults)", KV_WORKERS=str(workers)),
        "kv-access-log": kv_server("kv (KV_ACCESS_LOG=true)", KV_ACCESS_LOG="true"),
        "kv-no-metrics": kv_server("kv (KV_METRICS=false)", KV_METRICS="false"),
        "kv-memory": kv_server("kv (memory store)", KV_STORE="memory"),
        # PostgreSQL runs on this machine too, unpinned: it competes for the same two cores.
        "kv-postgres": kv_server(
            "kv on PostgreSQL, 1 replica",
            KV_STORE="postgres",
            KV_POSTGRES_URL="{postgres_url}",
        ),
        "kv-postgres-2": kv_server(
            "kv on PostgreSQL, 2 replicas",
            KV_STORE="postgres",
            KV_POSTGRES_URL="{postgres_url}",
            KV_WORKERS="2",
        ),
        "fastapi": Server(
            "FastAPI + uvicorn + dict",
            [python, str(BENCH / "fastapi_app.py"), "--port", "{port}", "--input-db", "{input_db}"],
            needs=("fastapi", "uvicorn", "uvloop", "httptools"),
        ),
    }


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers plus socket errors
    requests: int = 0
    # CPU time the server's processes spent per request, in microseconds. Unlike the rate, it
    # does not move with what a shared machine's neighbours take: the steadier figure for
    # comparing two versions of the server.
    cpu_us: float = 0.0


def parse_wrk(output: str) -> WrkResult:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not match:
            raise ValueError(f"no {percent}% latency in wrk output:\n{output}")
        return float(match.group(1)) * _LATENCY_UNITS[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rate:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sockets:
        errors += sum(int(number) for number in sockets.groups())
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    return WrkResult(
        float(rate.group(1)),
        latency("50"),
        latency("99"),
        errors,
        requests=int(total.group(1)) if total else 0,
    )


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its reaped children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live child processes (the workers of KV_WORKERS)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += children_cpu_seconds(int(child))
    return total


def rss_mib(pid: int) -> float:
    """A process's resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> float:
    """Seconds from now until /health answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("server not ready in time")


def run_wrk(
    port: int,
    script: str,
    seconds: int,
    connections: int,
    keys: int,
    pid: Optional[int] = None,
    headers: tuple[str, ...] = (),
) -> WrkResult:
    """One wrk run, each request with ``headers`` ("Name: value"); with the server's ``pid``,
    also its CPU time per request."""
    command = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--latency", "-s", str(BENCH / script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    for header in headers:
        command[-1:-1] = ["-H", header]
    env = {**os.environ, "KV_BENCH_KEYS": str(keys)}
    cpu_before = 0.0 if pid is None else children_cpu_seconds(pid)
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    result = parse_wrk(output)
    if pid is not None and result.requests:
        spent = children_cpu_seconds(pid) - cpu_before
        result.cpu_us = spent / result.requests * 1e6
    return result


def measure(
    server: Server,
    input_db: Path,
    args: argparse.Namespace,
    postgres: Optional[PostgresCluster] = None,
) -> dict[str, WrkResult]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as data_dir:
        values = {"port": str(port), "input_db": str(input_db), "data_dir": data_dir}
        if postgres is not None:  # a fresh database for each run, as a data file is
            values["postgres_url"] = postgres.url(postgres.create_database())
        command = [part.format(**values) for part in server.command]
        env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
        env.update({key: value.format(**values) for key, value in server.env.items()})
        several = args.workers > 1 or server.env.get("KV_WORKERS", "1") != "1"
        cores = "0-1" if several else SERVER_CORE
        process = subprocess.Popen(
            ["taskset", "-c", cores, *command],
            cwd=server.cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, process)
            run_wrk(port, "get_random.lua", 2, args.connections, args.rows)  # warm-up
            results = {
                kind: run_wrk(port, script, args.duration, args.connections, args.rows, process.pid)
                for kind, script in (("get", "get_random.lua"), ("set", "set_random.lua"))
            }
        finally:
            stop(process)
    return results


def report_missing(servers: list[Server]) -> bool:
    """Print what the bench needs and lacks; True when something is missing."""
    missing = missing_prerequisites(servers)
    if missing:
        print("bench: missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
    return bool(missing)


def missing_prerequisites(servers: list[Server]) -> list[str]:
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if (os.cpu_count() or 1) < 2:
        missing.append("a second core (the load generator needs its own)")
    for server in servers:
        missing += [
            f"python package {module} (pip install -r bench/requirements.txt)"
            for module in server.needs
            if importlib.util.find_spec(module) is None
        ]
    return sorted(set(missing))


def render(medians: dict[str, dict[str, WrkResult]], servers: dict[str, Server]) -> str:
    lines = [
        "| server | GET req/s | GET p50 ms | GET p99 ms | GET CPU µs | POST req/s | POST p50 ms "
        "| POST p99 ms | POST CPU µs | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, result in medians.items():
        get, post = result["get"], result["set"]
        lines.append(
            f"| {servers[key].name} | {get.requests_per_second:,.0f} | {get.p50_ms:.2f} | "
            f"{get.p99_ms:.2f} | {get.cpu_us:.1f} | {post.requests_per_second:,.0f} | "
            f"{post.p50_ms:.2f} | {post.p99_ms:.2f} | {post.cpu_us:.1f} | "
            f"{get.errors + post.errors} |"
        )
    if "kv" in medians:
        for other in ("floor", "fastapi", "kv-baseline", "kv-no-metrics"):
            if other not in medians:
                continue
            ours, theirs = medians["kv"], medians[other]
            get_rate = ratio(ours["get"].requests_per_second, theirs["get"].requests_per_second)
            set_rate = ratio(ours["set"].requests_per_second, theirs["set"].requests_per_second)
            get_p99 = ratio(ours["get"].p99_ms, theirs["get"].p99_ms)
            set_p99 = ratio(ours["set"].p99_ms, theirs["set"].p99_ms)
            get_cpu = ratio(ours["get"].cpu_us, theirs["get"].cpu_us)
            set_cpu = ratio(ours["set"].cpu_us, theirs["set"].cpu_us)
            lines.append(
                f"| kv ÷ {other} | {get_rate} | | {get_p99} | {get_cpu} | {set_rate} | | "
                f"{set_p99} | {set_cpu} | |"
            )
    return "\n".join(lines)


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.median(result.requests_per_second for result in results),
        statistics.median(result.p50_ms for result in results),
        statistics.median(result.p99_ms for result in results),
        sum(result.errors for result in results),
        sum(result.requests for result in results),
        statistics.median(result.cpu_us for result in results),
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rows", type=int, default=1_000_000, help="keys in input.db")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="KV_WORKERS for the service")
    parser.add_argument("--servers", default="floor,kv,fastapi")
    parser.add_argument("--out", type=Path, help="also write the table as markdown here")
    parser.add_argument("--baseline", metavar="REF", help="git ref for the kv-baseline server")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        baseline = None
        if args.baseline:
            baseline = (args.baseline, stack.enter_context(git_worktree(args.baseline)))
        catalogue = contenders(args.workers, baseline)
        chosen = {name: catalogue[name] for name in args.servers.split(",")}
        if report_missing(list(chosen.values())):
            return 2
        return run_rounds(chosen, args)


@contextlib.contextmanager
def git_worktree(ref: str) -> Iterator[Path]:
    """The repository at ``ref``, checked out in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="kv-bench-baseline-") as directory:
        worktree = Path(directory) / "repo"
        subprocess.run(
            ["git", "-C", str(BENCH.parent), "worktree", "add", "--detach", str(worktree), ref],
            check=True,
            capture_output=True,
        )
        try:
            yield worktree
        finally:
            subprocess.run(
                ["git", "-C", str(BENCH.parent), "worktree", "remove", "--force", str(worktree)],
                check=False,
                capture_output=True,
            )


def run_rounds(chosen: dict[str, Server], args: argparse.Namespace) -> int:
    postgres: Optional[PostgresCluster] = None
    if any("KV_POSTGRES_URL" in server.env for server in chosen.values()):
        bindir = server_binaries()
        if bindir is None:
            print("bench: missing prerequisite: PostgreSQL (apt-get install postgresql)")
            return 2
        # The tests' throwaway cluster, with fsync on: a commit here is a commit.
        postgres = PostgresCluster(bindir, durable=True)
        postgres.start()
    try:
        return _run_rounds(chosen, args, postgres)
    finally:
        if postgres is not None:
            postgres.remove()


def _run_rounds(
    chosen: dict[str, Server], args: argparse.Namespace, postgres: Optional[PostgresCluster]
) -> int:
    with tempfile.TemporaryDirectory(prefix="kv-bench-input-") as directory:
        input_db = Path(directory) / "input.db"
        write_input_db(input_db, args.rows)
        runs: dict[str, list[dict[str, WrkResult]]] = {name: [] for name in chosen}
        for round_number in range(1, args.rounds + 1):
            for name, server in chosen.items():
                needs_postgres = "KV_POSTGRES_URL" in server.env
                result = measure(server, input_db, args, postgres if needs_postgres else None)
                runs[name].append(result)
                get, post = result["get"], result["set"]
                print(
                    f"round {round_number} {name}: GET {get.requests_per_second:,.0f}/s "
                    f"({get.cpu_us:.1f} µs CPU) POST {post.requests_per_second:,.0f}/s "
                    f"({post.cpu_us:.1f} µs CPU)",
                    flush=True,
                )
    medians = {
        name: {kind: median_result([run[kind] for run in results]) for kind in ("get", "set")}
        for name, results in runs.items()
    }
    table = render(medians, chosen)
    header = (
        f"{args.rounds} rounds of {args.duration} s, {args.rows:,} keys, wrk -t1 "
        f"-c{args.connections}, server on core {SERVER_CORE}, wrk on core {LOAD_CORE}; "
        f"medians. Python {sys.version.split()[0]}, {os.cpu_count()} cores."
    )
    print(f"\n{header}\n\n{table}")
    if args.out:
        args.out.write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
