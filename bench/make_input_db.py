"""Write an input.db with the brief's table, ``create table keys(key text, val text)``.

Keys are ``{prefix}{i}`` for i in 0..N-1 (default prefix ``key:``); values are short,
pseudo-random hex strings (4 to 32 characters) from a fixed seed, so a run is reproducible.

Run from the repository root:

    python bench/make_input_db.py input.db                # 1,000,000 rows
    python bench/make_input_db.py /tmp/small.db --rows 1000 --key-prefix user:
    python bench/make_input_db.py input.db --force         # replace an existing file

The file is written in one transaction with journal_mode=OFF and synchronous=OFF: it is being
generated, so a crash mid-write only means running the script again.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

DEFAULT_ROWS = 1_000_000
DEFAULT_KEY_PREFIX = "key:"


def _rows(count: int, key_prefix: str, seed: int) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    for i in range(count):
        # 16 to 128 random bits: 4 to 32 hex digits.
        yield f"{key_prefix}{i}", format(rng.getrandbits(16 * rng.randint(1, 8)), "x")


def write_input_db(
    path: Path,
    rows: int = DEFAULT_ROWS,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    seed: int = 0,
    force: bool = False,
) -> None:
    """Create ``path`` with the brief's keys table and ``rows`` rows.

    Raises FileExistsError when ``path`` exists and ``force`` is not set.
    """
    if path.exists() or path.is_symlink():
        if not force:
            raise FileExistsError(f"{path} exists; pass --force to replace it")
        path.unlink()
    for suffix in ("-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute("create table keys(key text, val text)")
        conn.executemany("insert into keys(key, val) values (?, ?)", _rows(rows, key_prefix, seed))
        conn.execute("COMMIT")
    finally:
        conn.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("path", type=Path, help="the input.db to write")
    parser.add_argument(
        "--rows", type=int, default=DEFAULT_ROWS, help=f"rows to write (default {DEFAULT_ROWS:,})"
    )
    parser.add_argument(
        "--key-prefix",
        default=DEFAULT_KEY_PREFIX,
        help=f"text before each key's number (default {DEFAULT_KEY_PREFIX!r})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the values")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error("--rows must not be negative")
    started = time.perf_counter()
    try:
        write_input_db(args.path, args.rows, args.key_prefix, args.seed, args.force)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    size = args.path.stat().st_size / 2**20
    print(f"wrote {args.rows:,} rows to {args.path} ({size:.1f} MiB) in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
