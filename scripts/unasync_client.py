"""Write the blocking client from the asyncio one, as httpcore does: ``AsyncClient`` in
client/_async.py is the one written by hand, and client/_sync.py's ``Client`` is generated
from it with unasync's rules (``async`` and ``await`` dropped, ``AsyncIterator`` made
``Iterator``, ``__aenter__`` ``__enter__``, ...) and this project's names below, then put in
the shape ruff gives it. Nobody edits _sync.py; CI checks that it is what this writes.

    python scripts/unasync_client.py            # rewrite client/_sync.py
    python scripts/unasync_client.py --check    # exit 1, with the difference, if out of step
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import unasync

TOP = Path(__file__).resolve().parent.parent
CLIENT = TOP / "mapmg_data_engineer_takehome" / "client"
SOURCE, TARGET = CLIENT / "_async.py", CLIENT / "_sync.py"
# The names whose blocking twin is not unasync's default (which would make AsyncClient a
# "SyncClient"): httpx's and httpx-sse's pairs, and the wait each flavour does (_core.py).
REPLACEMENTS = {
    "AsyncClient": "Client",
    "aconnect_sse": "connect_sse",
    "aiter_sse": "iter_sse",
    "aiter_raw": "iter_raw",
    "aread": "read",
    "aclose": "close",
    "_async_chunks": "_chunks",
    "_async_sleep": "_sleep",
}
HEADER = (
    "# GENERATED from _async.py by scripts/unasync_client.py: do not edit. Change _async.py,\n"
    "# then run `python scripts/unasync_client.py` to write this file again.\n"
)


def generated() -> str:
    """What _sync.py should hold: the translation of _async.py, sorted and formatted."""
    source_text = SOURCE.read_text(encoding="utf-8")
    # A replacement the source no longer uses is a rule nobody checks any more.
    unused = [name for name in REPLACEMENTS if not re.search(rf"\b{name}\b", source_text)]
    if unused:
        sys.exit(f"{SOURCE.name} no longer uses {', '.join(unused)}: drop them from REPLACEMENTS")
    with tempfile.TemporaryDirectory(prefix="unasync-") as directory:
        # unasync writes beside its input, naming the output by replacing part of the path.
        source = Path(directory) / SOURCE.name
        source.write_text(source_text, encoding="utf-8")
        unasync.unasync_files(
            [str(source)], [unasync.Rule("/_async.py", "/_sync.py", REPLACEMENTS)]
        )
        text = HEADER + (Path(directory) / TARGET.name).read_text(encoding="utf-8")
    # The import lists come out of order where a name was replaced; ruff sorts them (and
    # fails here on anything it cannot fix), then formats, with the project's settings.
    text = ruff("check", "--fix", "--quiet", text=text)
    return ruff("format", "--quiet", text=text)


def ruff(*command: str, text: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        cwd=TOP,
        text=True,
        encoding="utf-8",
    )
    if done.returncode != 0:
        sys.exit(
            f"ruff {command[0]} refused the generated {TARGET.name}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail when _sync.py is out of step"
    )
    args = parser.parse_args(argv)
    expected = generated()
    if not args.check:
        TARGET.write_text(expected, encoding="utf-8")
        return 0
    committed = TARGET.read_text(encoding="utf-8")
    if committed == expected:
        return 0
    where = str(TARGET.relative_to(TOP))
    sys.stdout.writelines(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            where,
            f"{where} (generated)",
        )
    )
    print(f"{where} is not what scripts/unasync_client.py writes: run it and commit the result.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
