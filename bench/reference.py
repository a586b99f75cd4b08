"""What the two reference servers share: their command line and loading input.db into a dict."""

from __future__ import annotations

import argparse
import sqlite3


def parse_reference_args(description: str, default_port: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--input-db", help="seed the dict from this input.db")
    return parser.parse_args()


def load_input_db(path: str, data: dict[str, str]) -> None:
    """Every row into ``data``, in rowid order; the references skip no row, as users would."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        data.update(conn.execute("SELECT key, val FROM keys ORDER BY rowid"))
    finally:
        conn.close()
