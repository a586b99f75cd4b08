"""The machine, shared between this suite's tests when they run at once (pytest-xdist's workers,
and CI's two Pythons side by side), and taken whole by the few steps whose duration is what
they check.

Every test of this suite runs holding a share of the machine (``shared``, from
tests/kv/conftest.py); a step that must have it whole (``alone``: the grader's pytest, which
must report within a minute) waits until every running test has finished, and no test starts
until it is done. Both are flocks on files in the temporary directory, which the kernel drops
with the process that held them. A turnstile keeps tests that keep starting from starving a
step that waits: a new test passes it before it takes its share, and a waiting step holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path

SHARES = Path(tempfile.gettempdir()) / "kv-tests-machine.lock"
TURNSTILE = Path(tempfile.gettempdir()) / "kv-tests-machine.turnstile"


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """A share of the machine, held as long as the block runs."""
    with open(TURNSTILE, "a") as turnstile, open(SHARES, "a") as shares:
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # waits while a step waits to be alone
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(shares, fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """The whole machine, as far as this suite goes: every test that held a share has ended,
    and none starts before the block does. Never from inside ``shared``: it would wait on
    itself."""
    with open(TURNSTILE, "a") as turnstile, open(SHARES, "a") as shares:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(shares, fcntl.LOCK_EX)  # every share given back
        fcntl.flock(turnstile, fcntl.LOCK_UN)  # new tests now wait on the shares
        yield
