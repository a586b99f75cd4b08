"""The machine, shared between this suite's tests when they run at once (pytest-xdist's workers,
and CI's two Pythons side by side): the ports each claims, and the machine taken whole by the
few steps whose duration is what they check.

Ports: a test that starts a server on a port it chose must own that port. A port found free by
binding port 0 and closing is free for anyone until the server binds it, and two tests at once
were handed the same one: with SO_REUSEPORT (KV_WORKERS) both servers bound it and the kernel
spread each test's requests over both; an in-process test server (port 0) took one that a
server process was about to bind, and got that test's writes. So ``claim_port`` hands out
ports below the kernel's ephemeral range, which port 0 never yields, each claimed with an
flock that this process holds until it exits.

Every test of this suite runs holding a share of the machine (``shared``, from
tests/kv/conftest.py); a step that must have it whole (``alone``: the grader's pytest, which
must report within a minute) waits until every running test has finished, and no test starts
until it is done. Both are flocks on files in the temporary directory, which the kernel drops
with the process that held them. A turnstile keeps tests that keep starting from starving a
step that waits: a new test passes it before it takes its share, and a waiting step holds it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable

PORT_CLAIMS = Path(tempfile.gettempdir()) / "kv-test-ports"
# Where the kernel's ephemeral ports begin (what binding port 0 hands out), and Linux's default
# where it does not say; the claimed ports are the ones below it, from PORTS_FROM.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_FROM = 10_000
# The claims this process holds, until it exits.
_claimed: dict[int, IO[str]] = {}


@atexit.register
def _release_claims() -> None:
    """Close the claims ourselves: left to the interpreter's teardown, each one is an
    "unclosed file" ResourceWarning in the test run's output."""
    for claim in _claimed.values():
        claim.close()
    _claimed.clear()


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


def _ephemeral_from() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def claim_port(bindable: Callable[[int], bool]) -> int:
    """A port no other test on this machine holds, below the ephemeral range, that
    ``bindable`` finds free; this process keeps it until it exits."""
    ports = list(range(PORTS_FROM, _ephemeral_from()))
    start = random.randrange(len(ports))  # processes claiming at once seldom meet
    PORT_CLAIMS.mkdir(exist_ok=True)
    for port in ports[start:] + ports[:start]:
        if port in _claimed:
            continue
        claim = open(PORT_CLAIMS / f"{port}.lock", "w")  # noqa: SIM115 (held past return)
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim.close()
            continue
        if not bindable(port):  # taken by something that is not a test of ours
            claim.close()
            continue
        _claimed[port] = claim
        return port
    raise RuntimeError(f"no port to claim from {PORTS_FROM} to {_ephemeral_from()}")
