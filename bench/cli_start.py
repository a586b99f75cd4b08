"""How long the kv command takes, start to exit: `kv get` against a local server, beside the
interpreter's own start, httpx's import, and the import of kv's modules (the command line
and the client), which are most of it.

A server of this tree (bench/watch.py's server(), pinned to core 0) holds one key; each
command runs --runs times as a subprocess on core 1, the commands taking turns, and its wall
time is taken from before the fork to after the exit.

    python bench/cli_start.py                # 30 runs of each
    python bench/cli_start.py --runs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import watch  # noqa: E402

CLIENT_CORE = 1
KEY, VALUE = "bench/greeting", "hello"
CLIENT_MODULE = "mapmg_data_engineer_takehome.client"


def kv_script() -> str:
    """The installed kv command of this interpreter's environment."""
    return str(Path(sys.executable).with_name("kv"))


def wall_times(
    commands: dict[str, list[str]], runs: int, env: dict[str, str]
) -> dict[str, list[float]]:
    """Seconds from spawning each command to its exit, ``runs`` times; each must exit 0. The
    commands take turns, so that a moment of load elsewhere on the machine weighs on all."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return times


def p95(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="runs of each command")
    args = parser.parse_args(argv)
    # What kv imports before it sends anything, as kv imports it (without httpx's own CLI).
    as_kv = "from mapmg_data_engineer_takehome import cli; cli.skip_httpx_command_line(); "
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import httpx": [sys.executable, "-c", as_kv + "import httpx"],
        "import kv's modules": [sys.executable, "-c", as_kv + "import " + CLIENT_MODULE],
        f"kv get {KEY}": [kv_script(), "get", KEY],
    }
    with (
        tempfile.TemporaryDirectory(prefix="kv-cli-start-") as directory,
        watch.server(Path(directory), pinned=True) as (port, _),
    ):
        env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
        env["KV_URL"] = f"http://127.0.0.1:{port}"
        subprocess.run(
            [kv_script(), "set", KEY, VALUE], env=env, check=True, stdout=subprocess.DEVNULL
        )
        os.sched_setaffinity(0, {CLIENT_CORE})  # inherited by every command below
        print(f"{args.runs} runs each, on core {CLIENT_CORE}; server on core 0")
        print(f"{'command':<24} {'median':>9} {'p95':>9} {'min':>9}")
        for name, times in wall_times(commands, args.runs, env).items():
            print(
                f"{name:<24} {statistics.median(times) * 1000:7.0f} ms"
                f" {p95(times) * 1000:6.0f} ms {min(times) * 1000:6.0f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
