"""Instructions per request: the server's CPU cost, counted by valgrind, not timed.

On a shared 2-core VM, wrk's rates move by 30% between identical runs (the neighbours take
the cores in turns), which hides a regression of a few percent. Instructions executed do not
move: each server runs under ``valgrind --tool=callgrind``, is warmed up, has its counters
zeroed with ``callgrind_control -z``, serves a fixed number of requests from 64 connections,
and has its counters dumped with ``callgrind_control -d``. Everything the process executes
is counted: Python, aiohttp, uvloop, SQLite, orjson, pydantic-core.

    python bench/instructions.py --baseline 843d760          # that commit against this tree
    python bench/instructions.py --requests 4000 --rows 100000
    python bench/instructions.py --floor       # and the floor (bench/floor_app.py), for the ratio

It needs valgrind (callgrind_control comes with it) and git for the baseline's worktree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from make_input_db import write_input_db  # noqa: E402
from run import free_port, git_worktree, stop  # noqa: E402

CONNECTIONS = 64
READY_TIMEOUT = 300.0


async def exchange(port: int, requests: list[bytes]) -> None:
    """Send ``requests`` over CONNECTIONS keep-alive connections, each waiting for its answer."""
    queue = list(reversed(requests))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                writer.write(queue.pop())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.decode(errors="replace"))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))


def gets(count: int, rows: int) -> list[bytes]:
    rng = random.Random(1)
    return [
        f"GET /get/key:{rng.randrange(rows)} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        for _ in range(count)
    ]


def posts(count: int) -> list[bytes]:
    rng = random.Random(2)
    requests = []
    for _ in range(count):
        body = json.dumps({"key": f"key:{rng.randrange(100_000)}", "val": "x" * 24}).encode()
        requests.append(
            b"POST /set HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    return requests


def dumped_instructions(directory: Path, before: set[Path]) -> int:
    """The instruction count of the dump written since ``before`` was listed."""
    new = sorted(set(directory.glob("callgrind.out.*")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError("callgrind wrote no dump")
    text = new[-1].read_text(errors="replace")
    match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if not match:
        raise RuntimeError(f"no instruction total in {new[-1]}")
    return int(match.group(1))


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server not ready")


def measure(
    cwd: Optional[Path],
    input_db: Path,
    rows: int,
    count: int,
    keep: Optional[Path] = None,
    settings: Optional[dict[str, str]] = None,
    floor: bool = False,
) -> dict[str, float]:
    """Instructions per GET and per POST of the server run from ``cwd`` (None: this tree), or
    of the floor; the dumps are copied into ``keep`` (for callgrind_annotate) when given."""
    with tempfile.TemporaryDirectory(prefix="kv-callgrind-") as directory:
        out = Path(directory)
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("KV_")}
        env.update(
            KV_PORT=str(port),
            KV_INPUT_DB=str(input_db),
            KV_DATA_PATH=str(out / "data" / "kv.sqlite3"),
            KV_LOG_LEVEL="warning",
        )
        env.update(settings or {})
        server = [sys.executable, "-m", "mapmg_data_engineer_takehome"]
        if floor:
            server = [
                sys.executable, str(BENCH / "floor_app.py"),
                "--port", str(port), "--input-db", str(input_db),
            ]  # fmt: skip
        process = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out.%p",
                *server,
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_ready(port, process)
            asyncio.run(exchange(port, gets(500, rows) + posts(500)))  # warm-up
            figures = {}
            for kind, requests in (("GET", gets(count, rows)), ("POST", posts(count))):
                before = set(out.glob("callgrind.out.*"))
                subprocess.run(
                    ["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True
                )
                asyncio.run(exchange(port, requests))
                subprocess.run(
                    ["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True
                )
                figures[kind] = dumped_instructions(out, before) / count
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    newest = max(set(out.glob("callgrind.out.*")) - before, key=os.path.getmtime)
                    shutil.copyfile(newest, keep / f"{kind.lower()}.callgrind")
            return figures
        finally:
            stop(process, timeout=120)  # valgrind takes its time


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REF", help="also measure this git ref")
    parser.add_argument("--requests", type=int, default=3000, help="of each kind, per server")
    parser.add_argument("--rows", type=int, default=100_000, help="keys in input.db")
    parser.add_argument("--out", type=Path, help="also write the table as markdown here")
    parser.add_argument("--floor", action="store_true", help="also measure the floor")
    parser.add_argument("--keep", type=Path, help="keep the dumps here, for callgrind_annotate")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KV_NAME=VALUE",
        help="a setting for this tree's server (repeatable); the baseline runs with defaults",
    )
    args = parser.parse_args(argv)
    if shutil.which("callgrind_control") is None:
        print("bench: missing prerequisite: valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kv-bench-input-") as directory:
        input_db = Path(directory) / "input.db"
        write_input_db(input_db, args.rows)
        if args.floor:
            results["floor (aiohttp + uvloop + dict)"] = measure(
                None,
                input_db,
                args.rows,
                args.requests,
                None if args.keep is None else args.keep / "floor",
                floor=True,
            )
        if args.baseline:
            with git_worktree(args.baseline) as worktree:
                results[f"kv at {args.baseline}"] = measure(
                    worktree,
                    input_db,
                    args.rows,
                    args.requests,
                    None if args.keep is None else args.keep / "baseline",
                )
        settings = dict(setting.split("=", 1) for setting in args.setting)
        label = " ".join(args.setting)
        results[f"kv (this tree{', ' + label if label else ''})"] = measure(
            None,
            input_db,
            args.rows,
            args.requests,
            None if args.keep is None else args.keep / "tree",
            settings,
        )
    lines = ["| server | instructions per GET | instructions per POST |", "| --- | ---: | ---: |"]
    for name, figures in results.items():
        lines.append(f"| {name} | {figures['GET']:,.0f} | {figures['POST']:,.0f} |")
    ours = list(results.values())[-1]
    for name, other in list(results.items())[:-1]:
        against = "floor" if name.startswith("floor") else "baseline"
        lines.append(
            f"| this tree ÷ {against} | {ours['GET'] / other['GET']:.3f}x | "
            f"{ours['POST'] / other['POST']:.3f}x |"
        )
    header = (
        f"callgrind, {args.requests:,} GETs and {args.requests:,} POSTs over {CONNECTIONS} "
        f"connections, {args.rows:,} keys, Python {sys.version.split()[0]}."
    )
    table = "\n".join(lines)
    print(f"\n{header}\n\n{table}")
    if args.out:
        args.out.write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
