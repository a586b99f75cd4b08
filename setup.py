"""setuptools' build (pyproject.toml says the rest), plus one module that is written, not kept:
the blocking client, generated at every build from the asyncio one, as httpcore does.

``AsyncClient`` in mapmg_data_engineer_takehome/client/_async.py is written by hand;
client/_sync.py's ``Client`` is its translation with unasync's rules (``async`` and ``await``
dropped, ``AsyncIterator`` made ``Iterator``, ``__aenter__`` ``__enter__``, ...) and the names
in REPLACEMENTS. ``pip install .`` and ``pip install -e .`` both write it (build_py runs in
either), so that the two flavours cannot drift apart; it is not in git.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import unasync
from setuptools import setup
from setuptools.command.build_py import build_py

CLIENT = Path(__file__).resolve().parent / "mapmg_data_engineer_takehome" / "client"
SOURCE, TARGET = CLIENT / "_async.py", CLIENT / "_sync.py"
# The names whose blocking twin is not unasync's default (which would make AsyncClient a
# "SyncClient"): httpx's and httpx-sse's pairs, and the wait each flavour does (_core.py).
REPLACEMENTS = {
    "AsyncClient": "Client",
    "AsyncLock": "Lock",
    "AsyncKeeper": "Keeper",
    "AsyncOwner": "Owner",
    "aconnect_sse": "connect_sse",
    "aiter_sse": "iter_sse",
    "aiter_raw": "iter_raw",
    "aread": "read",
    "aclose": "close",
    "async_chunks": "chunks",
    "async_sleep": "sleep",
}
HEADER = (
    "# GENERATED from _async.py when the package is built (setup.py): do not edit. Change\n"
    "# _async.py, then `pip install -e .` writes this file again.\n"
)


def write_sync_client() -> None:
    source_text = SOURCE.read_text(encoding="utf-8")
    # A replacement the source no longer uses is a rule nobody checks any more.
    unused = [name for name in REPLACEMENTS if not re.search(rf"\b{name}\b", source_text)]
    if unused:
        raise SystemExit(f"{SOURCE.name} no longer uses {', '.join(unused)}: drop them")
    with tempfile.TemporaryDirectory(prefix="unasync-") as directory:
        # unasync writes beside its input, naming the output by replacing part of the path.
        source = Path(directory) / SOURCE.name
        source.write_text(source_text, encoding="utf-8")
        unasync.unasync_files(
            [str(source)], [unasync.Rule("/_async.py", "/_sync.py", REPLACEMENTS)]
        )
        text = HEADER + (Path(directory) / TARGET.name).read_text(encoding="utf-8")
    if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
        TARGET.write_text(text, encoding="utf-8")


class BuildWithSyncClient(build_py):  # type: ignore[misc]  # untyped base
    """build_py, after writing client/_sync.py into the source tree: an editable install
    imports it from there, and a wheel's build_py copies it from there."""

    def run(self) -> None:
        write_sync_client()
        super().run()


setup(cmdclass={"build_py": BuildWithSyncClient})
